"""Exact KA in parallel: one unit-lower-triangular solve per chunk (KA-SPEC §3).

Split a chunk's weights over [cached; new] into W_past (n x p), the strictly-lower part W_s of W_new (n x n)
and its diagonal D. The recursion a_i = sum_{j<i} w_ij a_j + w_ii v_i is then

    (I - W_s) A_new = W_past A_past + D V_new

which `torch.linalg.solve_triangular` (autograd-aware) solves for the whole chunk at once. Long inputs are cut
into blocks: each block is a chunk whose "past" includes the blocks before it, so memory is O(block x T), never
a T x T matrix per head.
"""

import torch

from .common import DEFAULT_BLOCK_SIZE, attention_weights, causal_allowed, compute_dtype, expand_kv_heads, plan2_weights


def ka_attention_chunk(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_outputs: torch.Tensor | None,
    allowed: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
    variant: str = "ka",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """One chunk of n new tokens after p cached ones, in the compute dtype. Shapes as in `ka_attention_parallel`."""
    n_query_heads, n_new, n_total = query.shape[1], query.shape[-2], key.shape[-2]
    n_past = n_total - n_new
    weights = attention_weights(query, key, allowed, scale, softcap)
    if variant == "plan2":
        weights = plan2_weights(weights, allowed, n_past)
    if dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p, training=True)
    new_values = expand_kv_heads(value, n_query_heads)
    weights_new = weights[..., n_past:]
    rhs = weights_new.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * new_values
    if n_past > 0:
        rhs = rhs + weights[..., :n_past] @ past_outputs
    if n_new == 1:  # a decode step: plain attention over [past outputs; v_new], nothing to solve
        return rhs
    # unitriangular=True reads only the strictly-lower part of -W_new: exactly (I - W_s).
    return torch.linalg.solve_triangular(-weights_new, rhs, upper=False, unitriangular=True)


def ka_attention_parallel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_outputs: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    variant: str = "ka",
    dropout_p: float = 0.0,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """Exact KA outputs of n new tokens, in parallel, with explicit (block x T) weight matrices.

    The "parallel" kernel: autograd differentiates through the weights (so a training step keeps them all, O(T^2)
    per head); it also computes plan 2 and attention dropout, which the O(T)-memory "blocked" kernel does not.

    query (B, H_q, n, d); key (B, H_kv, p + n, d) — the p cached keys then the new ones; value (B, H_kv, n, d_v)
    of the new tokens; past_outputs (B, H_q, p, d_v), what the cached tokens offer as values; allowed: boolean
    mask broadcastable to (B, H_q, n, p + n), True = may attend, None = causal. variant: "ka" (exact KA) or
    "plan2" (the original project's plan 2). Half inputs are computed in float32 and returned in their dtype.
    Returns (B, H_q, n, d_v).
    """
    if variant not in ("ka", "plan2"):
        raise ValueError(f"unknown KA variant {variant!r}: use 'ka' or 'plan2'")
    out_dtype = value.dtype
    dtype = compute_dtype(out_dtype)
    n_new, n_total = query.shape[-2], key.shape[-2]
    n_past = n_total - n_new
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    past_outputs = past_outputs.to(dtype) if past_outputs is not None and n_past > 0 else None
    if allowed is None and n_new > 1:
        allowed = causal_allowed(n_new, n_total, query.device)

    block = n_new if block_size is None else block_size
    block_outputs = []
    for start in range(0, n_new, block):
        stop = min(start + block, n_new)
        earlier = ([past_outputs] if past_outputs is not None else []) + block_outputs
        block_past = torch.cat(earlier, dim=-2) if len(earlier) > 1 else (earlier[0] if earlier else None)
        block_allowed = None if allowed is None else allowed[..., start:stop, : n_past + stop]
        block_outputs.append(
            ka_attention_chunk(
                query[..., start:stop, :],
                key[..., : n_past + stop, :],
                value[..., start:stop, :],
                block_past,
                block_allowed,
                scale,
                softcap,
                variant,
                dropout_p,
            )
        )
    outputs = block_outputs[0] if len(block_outputs) == 1 else torch.cat(block_outputs, dim=-2)
    return outputs.to(out_dtype)


def standard_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Ordinary softmax attention over values (B, H_kv, T, d_v): the ka-hybrid prefill (whose outputs are cached
    as A) and a KVWindowCache. One fused SDPA call, so a long prompt needs no (n x T) weights; with softcapping the
    explicit form. A fully masked (left-pad) row gives 0. Returns (B, H_q, n, d_v)."""
    n_new, n_total = query.shape[-2], key.shape[-2]
    if allowed is None and n_new != n_total:  # None = causal, lower-right aligned: SDPA's is_causal is top-left
        allowed = causal_allowed(n_new, n_total, query.device)
    values = expand_kv_heads(value, query.shape[1])
    if softcap is not None:
        return _attend(query, key, values, allowed, scale, softcap)
    # In the inputs' dtype, half included: SDPA's fused kernels accumulate in float32 themselves.
    outputs = torch.nn.functional.scaled_dot_product_attention(
        query.to(values.dtype),
        expand_kv_heads(key, query.shape[1]).to(values.dtype),
        values,
        attn_mask=allowed,
        is_causal=allowed is None,
        scale=scale,
    )
    if allowed is not None:  # rows with nothing allowed: 0, whatever the backend makes of them
        outputs = outputs.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return outputs


def ka_decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    attended: torch.Tensor,
    allowed: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """One new token: a = softmax(q K^T) [A_past; v_new] — ordinary attention, no solve (KA-SPEC §3, n = 1).

    query (B, H_q, 1, d); key (B, H_kv, p + 1, d); attended (B, H_q, p + 1, d_v) = past outputs then v_new,
    already per query head. Without softcap this is one fused SDPA call (a fully masked row gives 0). With GQA
    the H_q / H_kv query heads of a group become SDPA "heads" of a batch entry per kv head, and their shared keys
    a stride-0 view: no key is copied per query head.
    """
    if softcap is not None:
        return _attend(query, key, attended, allowed, scale, softcap)
    batch, n_query_heads, _, head_dim = query.shape
    n_kv_heads, n_total = key.shape[1], key.shape[-2]
    if n_query_heads == n_kv_heads:
        return torch.nn.functional.scaled_dot_product_attention(query, key, attended, attn_mask=allowed, scale=scale)
    group = n_query_heads // n_kv_heads
    folded = batch * n_kv_heads
    keys = key.reshape(folded, 1, n_total, head_dim).expand(folded, group, n_total, head_dim)
    mask = None
    if allowed is not None:  # (B or 1, 1 or H_q, 1, T) -> (B * H_kv, group, 1, T)
        mask = allowed.expand(batch, n_query_heads, 1, n_total).reshape(folded, group, 1, n_total)
    outputs = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(folded, group, 1, head_dim),
        keys,
        attended.reshape(folded, group, n_total, attended.shape[-1]),
        attn_mask=mask,
        scale=scale,
    )
    return outputs.view(batch, n_query_heads, 1, attended.shape[-1])


def _attend(query, key, values, allowed, scale, softcap):
    """softmax(q K^T) @ values, values already per query head; computed in the compute dtype."""
    out_dtype = values.dtype
    dtype = compute_dtype(out_dtype)
    weights = attention_weights(query.to(dtype), key.to(dtype), allowed, scale, softcap)
    return (weights @ values.to(dtype)).to(out_dtype)
