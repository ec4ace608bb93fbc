"""The typed KA settings a model carries in `model.config.ka`, and the record of how it came to be KA.

    cfg = KAConfig(ka_layers=[0, 1], kernel="blocked")     # validated on construction
    model.config.ka = cfg.to_dict()                         # what enable_ka does; save_pretrained keeps it
    KAConfig.from_model_config(model.config)                # -> KAConfig, or None when the model has no KA section

In the manner of transformers' `quantization_config`: a dataclass with to_dict / from_dict, stored in the config
as a plain dict (so config.json stays JSON). `KAConfig` owns the runtime settings only — attention ("ka" |
"standard"), ka_layers, variant, kernel, block_size. How a model was trained (the training record, the facts it
saw) is provenance and lives apart, in `model.config.ka_provenance` (`provenance()`, `record_provenance()`).

Old config.json files have one flat `ka` dict with `attention`, `layers`, `variant`, `block_size` and possibly
`training` or other record keys: `KAConfig.from_dict` reads the runtime keys (`layers` as the former name of
`ka_layers`, the same name `KACache(ka_layers=...)` uses) and ignores the rest, and `provenance()` finds those other
keys there when the model has no `ka_provenance`.
"""

from dataclasses import dataclass, fields

from .errors import KAError
from .ops.common import DEFAULT_BLOCK_SIZE
from .ops.kernels import KERNELS, VARIANTS, check_kernel

CONFIG_KEY = "ka"
PROVENANCE_KEY = "ka_provenance"
ATTENTIONS = ("ka", "standard")
LEGACY_LAYERS_KEY = "layers"  # config.json files written before `ka_layers` call the selection this


@dataclass(frozen=True)
class KAConfig:
    """The KA runtime settings of a model. attention "standard" keeps the other settings for later."""

    attention: str = "ka"  # "ka" | "standard"
    ka_layers: tuple[int, ...] | None = None  # layers that run KA; None = every layer
    variant: str = "ka"  # one of VARIANTS ("plan2": the original project's plan 2, docs/plan2.md)
    kernel: str = "auto"  # one of KERNELS
    block_size: int | None = DEFAULT_BLOCK_SIZE  # tokens per block of the blocked/parallel kernels; None = one

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise KAError(f"KA attention {self.attention!r} is not known: use one of {', '.join(ATTENTIONS)}")
        if self.ka_layers is not None:
            if isinstance(self.ka_layers, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.ka_layers
            ):
                raise KAError(f"KA layers must be layer indices (ints >= 0) or None, got {self.ka_layers!r}")
            object.__setattr__(self, "ka_layers", tuple(sorted(set(self.ka_layers))))
        try:
            check_kernel(self.kernel, self.variant, self.block_size)
        except ValueError as error:
            raise KAError(str(error)) from None

    @property
    def is_ka(self) -> bool:
        return self.attention == "ka"

    def covers(self, layer_idx: int) -> bool:
        """Does layer `layer_idx` run KA (given attention == "ka")?"""
        return self.ka_layers is None or layer_idx in self.ka_layers

    def to_dict(self) -> dict:
        """What config.json holds (layers as a list or null)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["ka_layers"] = None if self.ka_layers is None else list(self.ka_layers)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "KAConfig":
        """From a `ka` section, old or new: the runtime keys are read, anything else (provenance) is ignored."""
        if not isinstance(values, dict):
            raise KAError(f"config.ka must be a dict, got {type(values).__name__}")
        if LEGACY_LAYERS_KEY in values and "ka_layers" not in values:  # written before the rename
            values = {("ka_layers" if key == LEGACY_LAYERS_KEY else key): value for key, value in values.items()}
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    @classmethod
    def from_model_config(cls, config) -> "KAConfig | None":
        """The KAConfig in a transformers config (its `ka` attribute), or None when there is none."""
        section = getattr(config, CONFIG_KEY, None)
        if section is None:
            return None
        return section if isinstance(section, cls) else cls.from_dict(section)

    def replace(self, **changes) -> "KAConfig":
        return KAConfig(**(self.to_dict() | changes))


def provenance(config) -> dict:
    """How the model came to be what it is (e.g. {"training": {...}}): config.ka_provenance, or, for a config.json
    written before provenance had its own key, the non-runtime keys of its flat `ka` section."""
    recorded = getattr(config, PROVENANCE_KEY, None)
    if isinstance(recorded, dict):
        return recorded
    section = getattr(config, CONFIG_KEY, None)
    if isinstance(section, dict):
        return {key: value for key, value in section.items() if key not in _runtime_keys()}
    return {}


def record_provenance(config, **record) -> None:
    """Add `record` (e.g. training={...}) to config.ka_provenance, moving an old flat section's records there."""
    merged = dict(provenance(config)) | record
    setattr(config, PROVENANCE_KEY, merged)
    section = getattr(config, CONFIG_KEY, None)
    if isinstance(section, dict):  # the runtime section keeps runtime keys only
        setattr(config, CONFIG_KEY, {key: value for key, value in section.items() if key in _runtime_keys()})


def _runtime_keys() -> set[str]:
    return {f.name for f in fields(KAConfig)} | {LEGACY_LAYERS_KEY}


def num_kv_heads(config) -> int:
    """Key/value heads of a transformers config: num_key_value_heads (GQA), else the attention heads (MHA).
    The one home of this rule (ka_hf.cache keeps its own copy for now; it should call this)."""
    heads = getattr(config, "num_key_value_heads", None)
    return heads or config.num_attention_heads


__all__ = [
    "ATTENTIONS",
    "CONFIG_KEY",
    "KAConfig",
    "KERNELS",
    "PROVENANCE_KEY",
    "VARIANTS",
    "num_kv_heads",
    "provenance",
    "record_provenance",
]
