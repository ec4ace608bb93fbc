"""Fitting plan-1 adapters (the adapter itself, and loading/applying it, live in the library: ka_hf.adapters).

Two ways to fit f, the base model frozen:

- `fit_adapter_least_squares`: closed form. Run the frozen model with standard attention, collect per head the
  weights, the outputs A (what the cache would hold) and the values V (what standard attention used; with GQA
  the kv head of the group) and solve a ridge least squares from A to V: on the attention-weighted sums each
  token receives from its past (default), or token by token (target="values").
- `distill_adapter`: end to end. Minimize KL(standard logits || KA+adapter logits) through the exact KA
  recursion, with gradients to M, b (and the MLP).

`gap_recovered` and `compare_ppl` measure the result: the share of the KA-vs-KV PPL gap an adapter recovers.
"""

import functools
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ka_hf.adapters import KAAdapter, attention_shape
from ka_hf.architectures import SUPPORTED_ARCHITECTURES
from ka_hf.cache import KACache
from ka_hf.config import ka_spec
from ka_hf.errors import KAError

from .capture import Captured, capture_attention


def _batches(batches):
    """Accept tensors [B, T] or dicts with input_ids (and attention_mask)."""
    for batch in batches:
        if isinstance(batch, dict):
            yield batch["input_ids"], batch.get("attention_mask")
        else:
            yield batch, None


def check_fittable(model) -> None:
    """KAError unless an adapter can be fit for `model`: a supported architecture, trained with standard attention."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise KAError(
            f"ka_hf does not support model_type {model_type!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)}): "
            "there is no KA cache to fit an adapter for"
        )
    if ka_spec(model.config) is not None:
        raise KAError(
            "this model runs KA attention already (config.ka); adapters map a standard-trained model's "
            "cached outputs to values: use a standard-trained model"
        )


# ---------------------------------------------------------------------------------------------------------
# (a) the closed-form fit


def fit_adapter_least_squares(
    model,
    batches,
    adapter: KAAdapter | None = None,
    target: str = "attention",
    ridge: float = 1e-4,
    progress: bool = False,
) -> KAAdapter:
    """Fit M, b of every layer and head in closed form on the frozen standard model's own activations.

    target="values": min sum_j ||f(a_j) - v_j||^2, token by token (f(A) = V makes KA equal standard attention).
    target="attention" (default): min sum_i ||sum_{j<i} w_ij f(a_j) - sum_{j<i} w_ij v_j||^2 with the standard
        weights w: the same least squares from A to V, on the attention-weighted sums that actually reach each
        token's output (what a token receives from its past under KA vs under standard attention). Tokens that
        receive much attention count more; errors that average out do not count.
    batches: tensors [B, T] of token ids (or dicts with input_ids/attention_mask; padded positions are left out).
    ridge: relative L2 penalty on M (times the mean of the features' squared norms per dimension). Returns the
    adapter (a new identity adapter when none is given; an MLP, if present, is left as it is).
    """
    if target not in ("attention", "values"):
        raise KAError(f"target={target!r}: use 'attention' or 'values'")
    check_fittable(model)
    adapter = adapter if adapter is not None else KAAdapter.for_model(model)
    adapter.check_model(model)
    shape = attention_shape(model.config)
    group, d = shape["num_heads"] // shape["num_kv_heads"], shape["head_dim"]
    gram = torch.zeros(shape["num_layers"], shape["num_heads"], d + 1, d + 1, dtype=torch.float64)
    cross = torch.zeros(shape["num_layers"], shape["num_heads"], d + 1, d, dtype=torch.float64)
    tokens = 0
    for input_ids, attention_mask in tqdm(_batches(batches), desc="least squares", disable=not progress):
        keep = None if attention_mask is None else attention_mask.bool().cpu()
        for layer, captured in capture_attention(model, input_ids, attention_mask).items():
            features, targets = _regression_rows(captured, group, target)
            x, y = _rows(features, keep), _rows(targets, keep)  # [H, N, d + 1], [H, N, d]
            gram[layer] += x.transpose(-1, -2) @ x
            cross[layer] += x.transpose(-1, -2) @ y
        tokens += int(keep.sum()) if keep is not None else input_ids.numel()
    if tokens == 0:
        raise KAError("no tokens to fit the adapter on: pass at least one batch of token ids")
    penalty = torch.ones(d + 1, dtype=torch.float64)
    penalty[d] = 0.0  # the bias is not shrunk
    scale = gram[..., :d, :d].diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]
    solution = torch.linalg.solve(gram + ridge * scale * torch.diag(penalty), cross)  # [L, H, d + 1, d]
    with torch.no_grad():
        adapter.weight.copy_(solution[..., :d, :])
        adapter.bias.copy_(solution[..., d, :])
    adapter.fit_record = dict(adapter.fit_record, least_squares=dict(target=target, tokens=tokens, ridge=ridge))
    return adapter


def _regression_rows(captured: Captured, group: int, target: str):
    """Features [B, H, T, d + 1] (with the bias column) and targets [B, H, T, d] of one layer."""
    outputs, values = captured.outputs, captured.values.repeat_interleave(group, dim=1)  # V of each query head
    if target == "values":
        return torch.cat([outputs, torch.ones_like(outputs[..., :1])], dim=-1), values
    earlier = captured.weights.tril(-1)  # w_ij for j < i: what token i takes from its past
    features = torch.cat([earlier @ outputs, earlier.sum(-1, keepdim=True)], dim=-1)
    return features, earlier @ values


def _rows(tensor, keep):
    """[B, H, T, k] -> [H, N, k] float64 over the kept (unpadded) positions."""
    tensor = tensor.to("cpu", torch.float64).transpose(0, 1)  # [H, B, T, k]
    if keep is None:
        return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])
    return tensor[:, keep]


# ---------------------------------------------------------------------------------------------------------
# (b) end-to-end distillation


def kl_to_standard(
    model, adapter: KAAdapter | None, input_ids, attention_mask=None, teacher_logits=None, ka_layers=None
) -> torch.Tensor:
    """Mean over (unpadded) tokens of KL(standard-attention logits || KA(+adapter) logits) of `model`."""
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    cache = KACache(ka_layers=ka_layers, adapter=adapter)
    student_logits = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache).logits
    kl = F.kl_div(
        F.log_softmax(student_logits.float(), -1),
        F.log_softmax(teacher_logits.float(), -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    if attention_mask is None:
        return kl.mean()
    keep = attention_mask.to(kl.dtype)
    return (kl * keep).sum() / keep.sum()


def distill_adapter(
    model, adapter: KAAdapter, batches, steps: int, lr: float = 1e-3, ka_layers=None, progress: bool = True
) -> list[dict]:
    """Train the adapter (model frozen) to minimize KL(standard logits || KA+adapter logits) for `steps` steps.

    batches: a list of token-id tensors [B, T] (or dicts with input_ids/attention_mask), cycled through.
    Gradients flow through the exact KA recursion of the KACache. Returns the history [{step, kl, seconds}].
    """
    check_fittable(model)
    adapter.check_model(model)
    batches = list(_batches(batches))
    if not batches or steps < 1:
        raise KAError("distillation needs at least one batch and one step")
    model.eval()
    model.requires_grad_(False)
    adapter.train()
    optimizer = torch.optim.Adam(adapter.parameters(), lr=lr)
    device = next(model.parameters()).device
    history, started = [], time.perf_counter()
    bar = tqdm(range(steps), desc="distill adapter", disable=not progress)
    for step in bar:
        input_ids, attention_mask = batches[step % len(batches)]
        input_ids = input_ids.to(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)
        loss = kl_to_standard(model, adapter, input_ids, attention_mask, ka_layers=ka_layers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(dict(step=step + 1, kl=loss.item(), seconds=time.perf_counter() - started))
        bar.set_postfix(kl=f"{loss.item():.4f}")
    adapter.eval()
    adapter.fit_record = dict(
        adapter.fit_record,
        distillation=dict(
            steps=steps, lr=lr, first_kl=history[0]["kl"], last_kl=history[-1]["kl"], seconds=history[-1]["seconds"]
        ),
    )
    return history


# ---------------------------------------------------------------------------------------------------------
# Measuring it


def gap_recovered(ppl_kv: float, ppl_ka: float, ppl_adapter: float) -> float:
    """The fraction of the KA-vs-KV PPL gap an adapter recovers: (ka - adapter) / (ka - kv); nan when no gap."""
    gap = ppl_ka - ppl_kv
    return (ppl_ka - ppl_adapter) / gap if gap > 0 else math.nan


def compare_ppl(model, adapters: dict, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> dict:
    """PPL of `model` on full blocks [n, T] as kv (standard attention), ka (KACache) and ka+adapter for each
    {name: adapter}, on the same blocks in the same run, with the share of the KA-vs-KV gap each recovers."""
    from .evaluation.ppl import perplexity

    results = {
        "kv": perplexity(model, blocks, batch_size, progress=progress),
        "ka": perplexity(model, blocks, batch_size, make_cache=KACache, progress=progress),
    }
    for name, adapter in adapters.items():
        ppl = perplexity(
            model, blocks, batch_size, make_cache=functools.partial(KACache, adapter=adapter), progress=progress
        )
        results[name] = ppl
        results[f"{name} gap recovered"] = gap_recovered(results["kv"], results["ka"], ppl)
    return results
