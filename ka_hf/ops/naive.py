"""The reference KA recursion, one token at a time (KA-SPEC §2).

    a_i = sum_{j<i} w_ij a_j + w_ii v_i,    w_i = softmax_j(q_i . k_j * scale + mask_ij)

It is the test oracle for the parallel and block kernels, also with a `value_map` (an adapter f applied to
outputs before later tokens attend over them; ops/adapted.py computes that by blocks), and kernel="loop".
Vectorized over batch and heads only; the loop over positions is the point.
"""

import torch

from .common import attention_weights, causal_allowed, compute_dtype, expand_kv_heads, plan2_weights


def ka_attention_naive(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_outputs: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    variant: str = "ka",
    value_map=None,
) -> torch.Tensor:
    """KA outputs of n new tokens, token by token.

    query (B, H_q, n, d); key (B, H_kv, p + n, d) — the p cached keys then the new ones; value (B, H_kv, n, d_v)
    of the new tokens; past_outputs (B, H_q, p, d_v), what cached tokens offer as values (their outputs, or
    f(outputs) with an adapter); allowed: boolean mask broadcastable to (B, H_q, n, p + n), None = causal.
    value_map: f applied to each new output before later tokens attend over it. Returns (B, H_q, n, d_v).
    """
    out_dtype = value.dtype
    dtype = compute_dtype(out_dtype)
    n_query_heads, n_new, n_total = query.shape[1], query.shape[-2], key.shape[-2]
    n_past = n_total - n_new
    query, key = query.to(dtype), key.to(dtype)
    new_values = expand_kv_heads(value.to(dtype), n_query_heads)
    if allowed is None:
        allowed = causal_allowed(n_new, n_total, query.device)
    attended = past_outputs.to(dtype) if past_outputs is not None else new_values[..., :0, :]

    outputs = []
    for i in range(n_new):
        visible = n_past + i + 1
        row_allowed = allowed[..., i : i + 1, :visible]
        weights = attention_weights(query[..., i : i + 1, :], key[..., :visible, :], row_allowed, scale, softcap)
        if variant == "plan2":
            weights = plan2_weights(weights, row_allowed, visible - 1)
        output = weights[..., :-1] @ attended + weights[..., -1:] * new_values[..., i : i + 1, :]
        outputs.append(output)
        attended = torch.cat([attended, value_map(output) if value_map is not None else output], dim=-2)
    return torch.cat(outputs, dim=-2).to(out_dtype)
