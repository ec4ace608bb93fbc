"""`KASettings`: how a KA layer computes its attention — one frozen object, validated once when it is made.

A `KACache` or `StaticKACache` makes one from its arguments and every layer it builds holds it; a model whose
config asks for KA (`config.ka`, see `ka_hf.config`) gets one from its `KAConfig`, once per setting, not per call.
The attention reads it and never re-checks it.
"""

from dataclasses import dataclass, field

from .errors import KAError
from .ops import DEFAULT_BLOCK_SIZE, check_kernel

PREFILL_MODES = ("ka", "standard")


@dataclass(frozen=True)
class KASettings:
    """variant: "ka" (exact KA, KA-SPEC §2) or "plan2" (docs/plan2.md). kernel: how a multi-token chunk is computed
    ("auto", "blocked", "parallel", "loop"; `ka_hf.ops.kernels`). block_size: tokens per block of a long chunk.
    prefill: "ka", or "standard" (ka-hybrid: a prompt computed with standard attention, its outputs cached as A).
    adapter: a plan-1 adapter (`map_outputs(layer_idx, outputs)`), applied where cached outputs serve as values."""

    variant: str = "ka"
    kernel: str = "auto"
    block_size: int | None = DEFAULT_BLOCK_SIZE
    prefill: str = "ka"
    adapter: object = field(default=None, compare=False)

    def __post_init__(self):
        if self.prefill not in PREFILL_MODES:
            raise KAError(f"prefill={self.prefill!r}: use one of {PREFILL_MODES}")
        try:
            check_kernel(self.kernel, self.variant, self.block_size)
        except ValueError as error:
            raise KAError(str(error)) from None


DEFAULT_SETTINGS = KASettings()
