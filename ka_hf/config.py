"""A model's own KA setting, `model.config.ka`: the typed `KAConfig`, and the calls that set it.

    ka_hf.enable_ka(model, ka_layers=[0, 1])     # every forward runs KA on layers 0, 1 (saved by save_pretrained)
    with ka_hf.exact_ka(model): ...              # the same, within the block only (training, scoring)
    with ka_hf.without_ka(model): ...            # standard attention within the block
    KAConfig.from_model_config(model.config)     # -> KAConfig, or None when the model has no KA section

In the manner of transformers' `quantization_config`: a frozen dataclass with to_dict / from_dict, stored in the
config as a plain dict (so config.json stays JSON). `KAConfig` owns the runtime setting only — attention ("ka" |
"standard"), ka_layers, variant, kernel, block_size — and makes, once, the `KASettings` its layers compute with.
How a model was trained (the training record, the facts it saw) is provenance and lives apart, in
`model.config.ka_provenance` (`provenance()`, `record_provenance()`).
"""

import contextlib
from dataclasses import dataclass, field, fields

from .architectures import ModelSignature
from .errors import KAError
from .ops import DEFAULT_BLOCK_SIZE, KERNELS, VARIANTS
from .settings import KASettings
from .wrapped import unwrap_model

CONFIG_KEY = "ka"
PROVENANCE_KEY = "ka_provenance"
ATTENTIONS = ("ka", "standard")


@dataclass(frozen=True)
class KAConfig:
    """The KA runtime setting of a model. attention "standard" keeps the other settings for later."""

    attention: str = "ka"  # "ka" | "standard"
    ka_layers: tuple[int, ...] | None = None  # layers that run KA; None = every layer
    variant: str = "ka"  # one of VARIANTS ("plan2": the original project's plan 2, docs/plan2.md)
    kernel: str = "auto"  # one of KERNELS (ka_hf.ops.kernels)
    block_size: int | None = DEFAULT_BLOCK_SIZE  # tokens per block of the blocked/parallel kernels; None = one
    settings: KASettings = field(init=False, repr=False, compare=False)  # what the KA layers compute with

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise KAError(f"KA attention {self.attention!r} is not known: use one of {', '.join(ATTENTIONS)}")
        if self.ka_layers is not None:
            if isinstance(self.ka_layers, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.ka_layers
            ):
                raise KAError(f"KA layers must be layer indices (ints >= 0) or None, got {self.ka_layers!r}")
            object.__setattr__(self, "ka_layers", tuple(sorted(set(self.ka_layers))))
        object.__setattr__(self, "settings", KASettings(self.variant, self.kernel, self.block_size))

    @property
    def is_ka(self) -> bool:
        return self.attention == "ka"

    def covers(self, layer_idx: int) -> bool:
        """Does layer `layer_idx` run KA (given attention == "ka")?"""
        return self.ka_layers is None or layer_idx in self.ka_layers

    def to_dict(self) -> dict:
        """What config.json holds (layers as a list or null)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        values["ka_layers"] = None if self.ka_layers is None else list(self.ka_layers)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "KAConfig":
        if not isinstance(values, dict):
            raise KAError(f"config.ka must be a dict, got {type(values).__name__}")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KAError(
                f"config.ka has unknown keys {unknown}: it holds {sorted(known)} (how a model was trained goes in "
                f"config.{PROVENANCE_KEY})"
            )
        return cls(**values)

    @classmethod
    def from_model_config(cls, config) -> "KAConfig | None":
        """The KAConfig in a transformers config (its `ka` attribute), or None when there is none."""
        section = getattr(config, CONFIG_KEY, None)
        if section is None:
            return None
        return section if isinstance(section, cls) else cls.from_dict(section)

    def replace(self, **changes) -> "KAConfig":
        return KAConfig(**(self.to_dict() | changes))


def ka_spec(config) -> KAConfig | None:
    """The KA setting recorded in a model config, or None when the model runs standard attention."""
    setting = KAConfig.from_model_config(config)
    return setting if setting is not None and setting.is_ka else None


def provenance(config) -> dict:
    """How the model came to be what it is (e.g. {"training": {...}}): config.ka_provenance, or {}."""
    recorded = getattr(config, PROVENANCE_KEY, None)
    return recorded if isinstance(recorded, dict) else {}


def record_provenance(config, **record) -> None:
    """Add `record` (e.g. training={...}) to config.ka_provenance."""
    setattr(config, PROVENANCE_KEY, provenance(config) | record)


def enable_ka(
    model, ka_layers=None, variant: str = "ka", kernel: str = "auto", block_size: int | None = DEFAULT_BLOCK_SIZE
):
    """Make `model` run exact KA attention on `ka_layers` (None = all) in every forward, with or without a cache.

    `kernel` picks how KA is computed ("auto", "blocked", "parallel" or "loop"; see `ka_hf.ops.kernels`) and
    `block_size` how many tokens a block holds. The setting lives in `model.config.ka`, so `save_pretrained` keeps
    it and a model loaded back (with ka_hf imported) runs KA again; `generate()` then uses a `KACache` by default.
    How the model was trained goes apart: `record_provenance(model.config, training={...})`. A wrapped model
    (DDP, FSDP2, PEFT, torch.compile, accelerate) is set through the model it wraps. Returns `model`.
    """
    target = unwrap_model(model)
    ModelSignature.of(target.config)  # a supported model type with a valid head layout
    setting = KAConfig(
        attention="ka",
        ka_layers=None if ka_layers is None else [int(i) for i in ka_layers],
        variant=variant,
        kernel=kernel,
        block_size=block_size,
    )
    setattr(target.config, CONFIG_KEY, setting.to_dict())
    return model


def disable_ka(model):
    """Back to standard attention for cache-less forwards (the other settings and the provenance are kept).
    Returns the model."""
    config = unwrap_model(model).config
    current = KAConfig.from_model_config(config) or KAConfig()
    setattr(config, CONFIG_KEY, current.replace(attention="standard").to_dict())
    return model


@contextlib.contextmanager
def _config_ka_within(model, set_section):
    config = unwrap_model(model).config
    saved = {key: (hasattr(config, key), getattr(config, key, None)) for key in (CONFIG_KEY, PROVENANCE_KEY)}
    set_section(model)
    try:
        yield model
    finally:
        for key, (had, previous) in saved.items():
            if had:
                setattr(config, key, previous)
            elif hasattr(config, key):  # leave no `"ka": null` behind for save_pretrained
                delattr(config, key)


def exact_ka(
    model, ka_layers=None, variant: str = "ka", kernel: str = "auto", block_size: int | None = DEFAULT_BLOCK_SIZE
):
    """Within the block, forwards of `model` use exact parallel KA attention (gradients flow):

        with ka_hf.exact_ka(model):
            loss = model(input_ids, labels=input_ids).loss
        loss.backward()          # also with gradient checkpointing: the recomputation runs KA too

    kernel="loop" runs the token-by-token reference instead (slow; for checking).
    """
    return _config_ka_within(
        model, lambda m: enable_ka(m, ka_layers=ka_layers, variant=variant, kernel=kernel, block_size=block_size)
    )


def without_ka(model):
    """Within the block, cache-less forwards of `model` use standard attention, even if its config asks for KA
    (e.g. reading a KA-trained model with a KV cache). A KACache passed explicitly still runs KA."""
    return _config_ka_within(model, disable_ka)


__all__ = [
    "ATTENTIONS",
    "CONFIG_KEY",
    "KAConfig",
    "KERNELS",
    "PROVENANCE_KEY",
    "VARIANTS",
    "disable_ka",
    "enable_ka",
    "exact_ka",
    "ka_spec",
    "provenance",
    "record_provenance",
    "without_ka",
]
