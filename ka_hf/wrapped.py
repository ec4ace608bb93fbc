"""The transformers model inside the wrappers that training puts around it.

`enable_ka`, `disable_ka`, `exact_ka` and `without_ka` set the KA setting in the model's config
(`model.config.ka`), which a wrapper shares with the model it wraps. So they accept a wrapped model, reach the
`PreTrainedModel` inside it, and set its config; the wrapper runs KA on its next forward, and the caller keeps
calling the wrapper (the one that syncs gradients or runs the compiled code).

    DistributedDataParallel, DataParallel, FSDP (1), a DeepSpeed engine   .module
    torch.compile's OptimizedModule                                       ._orig_mod
    PEFT's PeftModel (LoRA and the other adapters)                        .get_base_model()

FSDP2's `fully_shard` changes the model's class in place (it stays a PreTrainedModel), and accelerate's
`prepare` returns one of the above (DDP across processes, compiled if asked) or the model itself.
"""

import torch
from transformers import PreTrainedModel

from .errors import KAError

_MAX_DEPTH = 8  # wrappers around wrappers: accelerate may compile a DDP model; more than this is a cycle


def unwrap_model(model) -> PreTrainedModel:
    """The transformers model whose config carries the KA setting: `model` itself, or the one its wrappers
    (DDP, FSDP, torch.compile, PEFT, DeepSpeed) hold. KAError, naming what to pass instead, for anything else."""
    chain = []
    for _ in range(_MAX_DEPTH):
        if isinstance(model, PreTrainedModel):
            return model
        chain.append(type(model).__name__)
        inner = _inner_model(model)
        if inner is None:
            break
        model = inner
    raise KAError(_not_a_model_message(model, " inside ".join(reversed(chain))))


def _inner_model(wrapper):
    """The module a known wrapper runs, or None."""
    if not isinstance(wrapper, torch.nn.Module):
        return None
    if isinstance(wrapper, torch._dynamo.eval_frame.OptimizedModule):
        return wrapper._orig_mod
    if callable(getattr(type(wrapper), "get_base_model", None)):  # peft.PeftModel (peft need not be installed)
        return wrapper.get_base_model()
    inner = getattr(wrapper, "module", None)  # DDP, DataParallel, FSDP, DeepSpeed
    return inner if isinstance(inner, torch.nn.Module) else None


def _not_a_model_message(found, given: str) -> str:
    message = f"ka_hf sets KA on a transformers model (a PreTrainedModel); got {given}"
    if not isinstance(found, torch.nn.Module):
        return message + ". Pass the model from_pretrained returned, or its DDP, FSDP, PEFT or torch.compile wrapper."
    inside = [name for name, child in found.named_children() if isinstance(child, PreTrainedModel)]
    if len(inside) == 1:
        return message + f", which holds one as .{inside[0]}: pass that (e.g. ka_hf.exact_ka(wrapper.{inside[0]}))."
    return message + (
        ", which ka_hf cannot see into (it unwraps DDP, FSDP and DeepSpeed .module, torch.compile and PEFT models). "
        "Pass the transformers model it wraps."
    )
