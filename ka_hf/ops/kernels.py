"""The KA kernels, chosen by name: one entry point for the model integration, tests and benchmarks.

| kernel | what | memory | also computes |
|---|---|---|---|
| "blocked" | fused attention over past outputs + one small solve per block (ops/blocked.py) | O(T) | exact KA |
| "parallel" | explicit (block x T) weights + triangular solve (ops/parallel.py) | O(T^2) in training | plan 2, dropout |
| "loop" | the token-by-token reference (ops/naive.py) | O(T) | everything (slow) |

"auto" (the default) is "blocked" wherever it applies (variant "ka", no attention dropout), else "parallel"; for
"blocked" it also shortens the blocks of a short chunk (`auto_block_size`).
"""

from .blocked import ka_attention_blocked
from .common import DEFAULT_BLOCK_SIZE
from .naive import ka_attention_naive
from .parallel import ka_attention_parallel

KERNELS = ("auto", "blocked", "parallel", "loop")
VARIANTS = ("ka", "plan2")


def check_kernel(kernel: str, variant: str = "ka", block_size: int | None = DEFAULT_BLOCK_SIZE) -> None:
    """Raise ValueError for an unknown kernel or variant, a kernel that cannot compute the variant, or a block size
    that is not a positive int (None = one block for the whole input)."""
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown KA kernel {kernel!r}: use one of {KERNELS}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown KA variant {variant!r}: use one of {VARIANTS}")
    if kernel == "blocked" and variant != "ka":
        raise ValueError(f"the 'blocked' kernel computes exact KA only; variant {variant!r} needs 'parallel' or 'loop'")


# The blocked kernel's fastest block grows with the chunk: its (n x n) tiles cost ~T n elementwise work and T n d
# for the solves, its past ~T^2 d / 2 for any n plus a fused-kernel call per block. Measured on a CPU (one layer,
# forward + backward, 1 thread; benchmarks/bench_training.py for whole steps): at T = 64-512, head size 32, blocks
# of 64 took 0.4-0.5x the time of 256 (T = 256: 99 ms vs 238 ms); at T = 512-1024, head size 64, 128 was fastest
# (0.8-0.95x of 256); from T = 2048 on, 256 (backward) or 128 (forward) are within 10%, and 256 stays.
SHORT_CHUNK_BLOCKS = ((512, 64), (1024, 128))  # (longest chunk, block) in increasing order


def auto_block_size(n_new: int, block_size: int | None) -> int | None:
    """The block "auto" gives the blocked kernel for a chunk of n_new tokens: the caller's block, shortened for a
    short chunk (SHORT_CHUNK_BLOCKS); a smaller one the caller chose is kept."""
    for longest, block in SHORT_CHUNK_BLOCKS:
        if n_new <= longest:
            return block if block_size is None else min(block, block_size)
    return block_size


def resolve_kernel(kernel: str, variant: str = "ka", dropout_p: float = 0.0) -> str:
    """The concrete kernel a call runs."""
    if kernel != "auto":
        return kernel
    return "blocked" if variant == "ka" and dropout_p == 0.0 else "parallel"


def ka_attention(
    query,
    key,
    value,
    *,
    past_outputs=None,
    allowed=None,
    scale: float = 1.0,
    softcap: float | None = None,
    variant: str = "ka",
    dropout_p: float = 0.0,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    kernel: str = "auto",
):
    """Exact KA outputs (B, H_q, n, d_v) of n new tokens after p cached ones, by the named kernel.

    query (B, H_q, n, d); key (B, H_kv, p + n, d) — the cached keys then the new ones; value (B, H_kv, n, d_v);
    past_outputs (B, H_q, p, d_v), what the cached tokens offer as values; allowed: boolean mask broadcastable to
    (B, H_q, n, p + n), True = may attend, None = causal. Half inputs: "blocked" keeps them in their dtype
    (float32 tiles and solves per block), "parallel" and "loop" compute in float32.
    """
    check_kernel(kernel, variant, block_size)
    if kernel == "auto" and resolve_kernel(kernel, variant, dropout_p) == "blocked":
        block_size = auto_block_size(query.shape[-2], block_size)
    kernel = resolve_kernel(kernel, variant, dropout_p)
    if kernel == "blocked":
        if dropout_p > 0.0:
            raise ValueError("the 'blocked' kernel has no attention dropout; use kernel='parallel' (or 'auto')")
        return ka_attention_blocked(
            query,
            key,
            value,
            past_outputs=past_outputs,
            allowed=allowed,
            scale=scale,
            softcap=softcap,
            block_size=block_size,
        )
    if kernel == "parallel":
        return ka_attention_parallel(
            query,
            key,
            value,
            past_outputs=past_outputs,
            allowed=allowed,
            scale=scale,
            softcap=softcap,
            variant=variant,
            dropout_p=dropout_p,
            block_size=block_size,
        )
    if dropout_p > 0.0:
        raise ValueError("the 'loop' kernel has no attention dropout; use kernel='parallel' (or 'auto')")
    return ka_attention_naive(
        query, key, value, past_outputs=past_outputs, allowed=allowed, scale=scale, softcap=softcap, variant=variant
    )
