"""Pure tensor math for KA attention: no transformers import here.

- `naive.ka_attention_naive`: the token-by-token reference (test oracle; fallback for non-linear value maps).
- `parallel.ka_attention`: the exact parallel form (blocked triangular solves), with a cached past.
"""

from .common import attention_weights, causal_allowed, expand_kv_heads
from .naive import ka_attention_naive
from .parallel import DEFAULT_BLOCK_SIZE, ka_attention, ka_decode_step, standard_attention

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "attention_weights",
    "causal_allowed",
    "expand_kv_heads",
    "ka_attention",
    "ka_attention_naive",
    "ka_decode_step",
    "standard_attention",
]
