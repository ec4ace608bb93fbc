"""Shared pieces of the KA ops: masks, attention weights, GQA head expansion. No transformers import."""

import torch

# Tokens per block of a long prompt or training sequence (both kernels): memory O(block x T) for "parallel",
# O(block^2 + T) for "blocked". 256 was the fastest of 64-512 for the blocked kernel at T = 2k-8k on a CPU; kernel
# "auto" shortens it for shorter chunks (ops/kernels.py, SHORT_CHUNK_BLOCKS).
DEFAULT_BLOCK_SIZE = 256


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype half inputs are accumulated and solved in: float32 (the CPU `solve_triangular` has no half kernels,
    and the solve's accuracy matters more than its speed); float32/float64 stay as they are. The blocked kernel
    keeps q, k, v and A in their own dtype and converts only per-block tiles; "parallel" and "loop" convert whole
    inputs (they keep O(T^2) weights or run token by token anyway)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def causal_allowed(n_new: int, n_total: int, device, sliding_window: int | None = None, sink: int = 0) -> torch.Tensor:
    """Boolean (1, 1, n_new, n_total) mask: the new tokens sit at absolute positions n_total - n_new ... n_total - 1
    and each may see itself and the keys before it (within `sliding_window`, HF's convention q - k < window; the
    first `sink` positions stay visible beyond the window)."""
    query_pos = torch.arange(n_total - n_new, n_total, device=device)[:, None]
    key_pos = torch.arange(n_total, device=device)[None, :]
    allowed = key_pos <= query_pos
    if sliding_window is not None:
        allowed = allowed & ((query_pos - key_pos < sliding_window) | (key_pos < sink))
    return allowed[None, None]


def expand_kv_heads(x: torch.Tensor, n_query_heads: int) -> torch.Tensor:
    """(B, H_kv, T, d) -> (B, H_q, T, d): query head h reads kv head h // group (HF's `repeat_kv` order)."""
    group = n_query_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention weights (B, H_q, n, T) of `query` (B, H_q, n, d) over `key` (B, H_kv, T, d).

    Keys are shared by each GQA group without being copied (the query heads of a group are folded into the
    row dimension). Masked positions get exactly 0; a row with nothing allowed (a left-pad query) is all 0
    rather than NaN, in the forward pass and in its gradient.
    """
    batch, n_query_heads, n_new, head_dim = query.shape
    n_kv_heads, n_total = key.shape[1], key.shape[-2]
    group = n_query_heads // n_kv_heads
    grouped_query = query.reshape(batch, n_kv_heads, group * n_new, head_dim)
    scores = torch.matmul(grouped_query, key.transpose(-1, -2)).view(batch, n_query_heads, n_new, n_total) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    # A finite fill (not -inf) keeps fully masked rows finite; multiplying by `allowed` then zeroes them.
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * allowed


def plan2_weights(weights: torch.Tensor, allowed: torch.Tensor | None, n_past: int) -> torch.Tensor:
    """The original project's "plan 2" rewritten as a KA weight matrix.

    Plan 2: A[first] = V[first]; A[i] = renormalize(w_i[:i]) @ A[:i] (the current value unused). As weights over
    [past; new]: each row's strictly-earlier weights are renormalized to sum to 1 and its own weight is 0 — except
    a sequence's first allowed token, whose own weight is 1. Every A[i] is then a convex combination of A[first],
    i.e. equal to V[first]: see docs/plan2.md.
    """
    n_new = weights.shape[-2]
    own = torch.zeros_like(weights[0, 0], dtype=torch.bool)
    own[:, n_past:] = torch.eye(n_new, dtype=torch.bool, device=weights.device)
    earlier = weights.masked_fill(own, 0.0)
    if allowed is None:
        allowed = causal_allowed(n_new, weights.shape[-1], weights.device)
    has_earlier = (allowed & ~own).any(dim=-1, keepdim=True)
    is_first = ~has_earlier & (allowed & own).any(dim=-1, keepdim=True)
    mass = earlier.sum(dim=-1, keepdim=True)
    renormalized = earlier / torch.where(has_earlier, mass, torch.ones_like(mass))
    return renormalized + (is_first & own).to(weights.dtype)
