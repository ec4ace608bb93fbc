"""Hypothesis 1, measured directly: do the cached KA outputs A have another distribution than the values V?

Plan 3 reads a standard-trained model with a KA cache: later tokens attend over past outputs A where the model
learned to attend over values V. The original report's first explanation of the degradation is that A and V
differ in distribution. Here the difference is measured on the evaluation windows, per layer, in the same KA
forward (`capture.capture_ka_outputs`), over every real (unpadded) token and query head:

    norm ratio  mean of ||a_i|| / ||v_i||                       (1: same scale)
    cosine      mean of cos(a_i, v_i)                           (1: same direction, token by token)
    CKA         linear CKA of A and V as (tokens x heads*dim)   (1: same geometry up to rotation and scale)
                = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc, Yc column-centred (Kornblith et al. 2019)

and the same for f(A) against V for each plan-1 adapter (its own ka+adapter forward): an adapter that maps A
back into V's distribution moves the three towards 1.
"""

import torch

from ka_hf.modes import Mode

from ..capture import capture_ka_outputs
from .ppl import collate, make_batches


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (samples x features) matrices, in float64."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


def pair_statistics(outputs: torch.Tensor, values: torch.Tensor) -> dict:
    """norm ratio, cosine and CKA of token rows: outputs, values (tokens, heads, dim)."""
    norm_ratio = outputs.norm(dim=-1) / values.norm(dim=-1).clamp_min(1e-12)
    cosine = torch.nn.functional.cosine_similarity(outputs, values, dim=-1, eps=1e-12)
    return dict(
        norm_ratio=float(norm_ratio.double().mean()),
        cosine=float(cosine.double().mean()),
        cka=linear_cka(outputs.flatten(1), values.flatten(1)),
    )


def _token_rows(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) -> (real tokens, H, d)."""
    return tensor.transpose(1, 2)[keep]


def collect_pairs(model, windows, mode: Mode, adapter=None, batch_size: int = 8, pad_id: int = 0) -> dict:
    """{layer: (mapped outputs, values)} as (tokens, heads, dim) over the windows' real tokens, from forwards
    through fresh caches of `mode`; with an adapter, the outputs are f(A)."""
    device = next(model.parameters()).device
    pairs: dict[int, tuple[list, list]] = {}
    for batch in make_batches(windows, batch_size):
        input_ids, attention_mask, _ = collate(batch, pad_id)
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        mask = None if attention_mask is None else attention_mask.to(device)
        captured = capture_ka_outputs(model, input_ids.to(device), mode.new_cache(adapter), mask)
        for layer, (outputs, values) in captured.items():
            if adapter is not None:
                outputs = adapter.map_outputs(layer, outputs.to(next(adapter.parameters()).dtype)).float()
            rows = pairs.setdefault(layer, ([], []))
            rows[0].append(_token_rows(outputs, keep.to(outputs.device)).cpu())
            rows[1].append(_token_rows(values, keep.to(values.device)).cpu())
    return {layer: (torch.cat(a), torch.cat(v)) for layer, (a, v) in pairs.items()}


@torch.no_grad()
def av_statistics(model, windows, adapters: dict | None = None, max_windows: int = 32, pad_id: int = 0) -> dict:
    """{"ka": [per layer {layer, norm_ratio, cosine, cka}], "ka+adapter(NAME)": [...]}: A (or f(A)) against V."""
    windows = windows[:max_windows]
    runs = {"ka": (Mode("ka"), None)} | {
        f"ka+adapter({name})": (Mode("ka+adapter"), a) for name, a in (adapters or {}).items()
    }
    result = {}
    for name, (mode, adapter) in runs.items():
        pairs = collect_pairs(model, windows, mode, adapter, pad_id=pad_id)
        result[name] = [dict(layer=layer) | pair_statistics(a, v) for layer, (a, v) in pairs.items()]
    return result
