"""ka_hf: KA caching for Hugging Face transformers — cache keys and attention outputs (K, A), attend over past
outputs, exactly (KA-SPEC §2) and in parallel (§3).

    import ka_hf
    model.generate(**inputs, past_key_values=ka_hf.KACache())
"""

from .architectures import SUPPORTED_ARCHITECTURES
from .cache import KACache, KVWindowCache, cache_nbytes
from .config import KAConfig, disable_ka, enable_ka, exact_ka, ka_spec, without_ka
from .errors import KAError
from .integration import install, uninstall
from .layers import KALayer, KAWindowLayer, KVWindowLayer
from .masks import window_attention_mask
from .pretrained import load_ka_model
from .settings import KASettings
from .static_cache import StaticKACache, StaticKALayer

install()

__version__ = "0.1.0"

__all__ = [
    "KACache",
    "KAConfig",
    "KAError",
    "KALayer",
    "KASettings",
    "KAWindowLayer",
    "KVWindowCache",
    "KVWindowLayer",
    "SUPPORTED_ARCHITECTURES",
    "StaticKACache",
    "StaticKALayer",
    "cache_nbytes",
    "disable_ka",
    "enable_ka",
    "exact_ka",
    "install",
    "ka_spec",
    "load_ka_model",
    "uninstall",
    "window_attention_mask",
    "without_ka",
]
