"""ka_hf: KA caching for Hugging Face transformers — cache keys and attention outputs (K, A), attend over past
outputs, exactly (KA-SPEC §2) and in parallel (§3).

    import ka_hf
    model.generate(**inputs, past_key_values=ka_hf.KACache())
"""

from .cache import KACache, KALayer, KAWindowLayer, KVWindowCache, cache_nbytes
from .config import KAConfig
from .errors import KAError
from .integration import (
    SUPPORTED_ARCHITECTURES,
    disable_ka,
    enable_ka,
    exact_ka,
    install,
    ka_spec,
    uninstall,
    window_attention_mask,
    without_ka,
)
from .static_cache import StaticKACache, StaticKALayer

install()

__version__ = "0.1.0"

__all__ = [
    "KACache",
    "KAConfig",
    "KAError",
    "KALayer",
    "KAWindowLayer",
    "KVWindowCache",
    "SUPPORTED_ARCHITECTURES",
    "StaticKACache",
    "StaticKALayer",
    "cache_nbytes",
    "disable_ka",
    "enable_ka",
    "exact_ka",
    "ka_spec",
    "install",
    "uninstall",
    "window_attention_mask",
    "without_ka",
]
