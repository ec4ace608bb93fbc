"""Pure tensor math for KA attention: no transformers import here.

- `naive.ka_attention_naive`: the token-by-token reference (the test oracle; kernel="loop").
- `parallel.ka_attention_parallel`: explicit weights and one triangular solve per block; plan 2 and dropout.
- `blocked.ka_attention_blocked`: O(T) memory, fused attention over past outputs, recomputing backward.
- `adapted.ka_attention_adapted`: KA with an affine adapter f(a) = a M + b inside the recursion (plan 1), exact
  by blocks; `adapted.ka_attention_mapped`: any f, block-sequential.
- `kernels.ka_attention`: the entry point, `kernel="auto" | "blocked" | "parallel" | "loop"`.
- `parallel.ka_decode_step`: one new token, one fused attention over [A_past; v_new].
"""

from .adapted import ka_attention_adapted, ka_attention_mapped
from .blocked import ka_attention_blocked
from .common import DEFAULT_BLOCK_SIZE, attention_weights, causal_allowed, expand_kv_heads
from .kernels import KERNELS, VARIANTS, auto_block_size, check_kernel, ka_attention, resolve_kernel
from .naive import ka_attention_naive
from .parallel import ka_attention_parallel, ka_decode_step, standard_attention

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "KERNELS",
    "VARIANTS",
    "attention_weights",
    "auto_block_size",
    "causal_allowed",
    "check_kernel",
    "expand_kv_heads",
    "ka_attention",
    "ka_attention_adapted",
    "ka_attention_blocked",
    "ka_attention_mapped",
    "ka_attention_naive",
    "ka_attention_parallel",
    "ka_decode_step",
    "resolve_kernel",
    "standard_attention",
]
