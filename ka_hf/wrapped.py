"""The transformers model inside a wrapper (DDP, torch.compile, PEFT, accelerate): the one whose config holds `ka`."""

from .errors import KAError


def unwrap_model(model):
    """`model` itself when it has a transformers config, else the model it wraps: DistributedDataParallel and
    DataParallel (`.module`), torch.compile's OptimizedModule (`._orig_mod`), a PEFT PeftModel
    (`get_base_model()`), and any nesting of these (accelerate's `prepare` returns one of them). An FSDP2
    `fully_shard`ed model is the model itself. Anything else is a KAError naming what was given."""
    current = model
    for _ in range(8):  # wrappers nest a few deep at most (e.g. DDP around a compiled PEFT model)
        if _has_transformers_config(current):
            return current
        if hasattr(current, "get_base_model"):
            current = current.get_base_model()
        elif hasattr(current, "_orig_mod"):
            current = current._orig_mod
        elif hasattr(current, "module"):
            current = current.module
        else:
            break
    raise KAError(
        f"{type(model).__name__} is not a transformers model and wraps none that ka_hf can find (it looks through "
        "DistributedDataParallel, torch.compile, PEFT and accelerate wrappers): pass the model itself"
    )


def _has_transformers_config(module) -> bool:
    from transformers import PretrainedConfig

    return isinstance(getattr(module, "config", None), PretrainedConfig)
