"""Exact KA with O(T) memory: a fused-attention forward and a recomputing backward (docs/KA-LONG.md).

Rows are cut into blocks of n tokens. For block b, with "past" P = every key before the block (cached tokens and
earlier blocks):

    (I - W_bb,strict) A_b = W_bP A_P + diag(W_bb) V_b

- W_bP A_P is ordinary attention of the block's queries over the past keys with the past *outputs* as values,
  normalized by the full row normalizer L = logaddexp(L_P, L_D). A fused kernel returns (O_P, L_P) without a
  weight matrix, and W_bP A_P = exp(L_P - L) * O_P. On CPU that kernel is
  `aten._scaled_dot_product_flash_attention_for_cpu`; elsewhere (and with softcapping, which it cannot do) the
  same quantities come from one explicit (n x T) score tile per block.
- W_bb is the small (n x n) tile of the block's own keys; one unit-lower-triangular solve per block.

Only q, k, v, A and the row normalizers L are saved for the backward, which recomputes tiles block by block from
the last block to the first (KA-LONG "Backward"): solve the transposed block system for the multipliers
lambda_b, then the past part is flash attention's backward with dO = lambda_b, values A_P, out = A_b and the
saved L, which yields dq, dK_P and the contribution W_bP^T lambda_b to the earlier blocks' gradients.
"""

import torch

from .common import DEFAULT_BLOCK_SIZE, compute_dtype, expand_kv_heads

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def ka_attention_blocked(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_outputs: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    fused: bool | None = None,
) -> torch.Tensor:
    """Exact KA outputs of n new tokens; same arguments and result as `ka_attention` (variant "ka", no dropout).

    query (B, H_q, n, d); key (B, H_kv, p + n, d); value (B, H_kv, n, d_v); past_outputs (B, H_q, p, d_v) or None;
    allowed: boolean, broadcastable to (B, H_q, n, p + n), None = causal. Returns (B, H_q, n, d_v). Gradients
    flow to query, key, value and past_outputs. fused: the past part through the fused CPU kernel (None: on CPU
    without softcap) or through explicit (block x T) score tiles (False: what other devices run).
    """
    out_dtype = value.dtype
    dtype = compute_dtype(out_dtype)
    n_new, n_total = query.shape[-2], key.shape[-2]
    n_past = n_total - n_new
    if past_outputs is None or n_past == 0:
        past_outputs = value.new_zeros(*query.shape[:2], 0, value.shape[-1])
    block = max(n_new, 1) if block_size is None else block_size
    fusable = softcap is None and query.device.type == "cpu" and key.shape[-1] == value.shape[-1]
    if fused is None:
        fused = fusable
    elif fused and not fusable:
        raise ValueError("the fused past kernel runs on CPU, without softcapping, with equal key and value sizes")
    outputs = _BlockedKA.apply(
        query.to(dtype), key.to(dtype), value.to(dtype), past_outputs.to(dtype), allowed, scale, softcap, block, fused
    )
    return outputs.to(out_dtype)


class _BlockedKA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, past_outputs, allowed, scale, softcap, block, fused):
        n_past = past_outputs.shape[-2]
        n_new = query.shape[-2]
        keys = expand_kv_heads(key, query.shape[1])  # (B, H_q, p + n, d): the fused kernel wants per-head keys
        values = expand_kv_heads(value, query.shape[1])
        # One buffer holds every output the later blocks attend over: [cached outputs; this call's outputs].
        attended = torch.cat([past_outputs, values.new_empty(values.shape)], dim=-2)
        normalizers = query.new_empty(query.shape[:-1])  # L per new row (B, H_q, n)
        for start, stop in _block_bounds(n_new, block):
            tile = _Tile(query, keys, allowed, scale, softcap, fused, n_past, start, stop)
            past_out, past_lse = tile.past_attention(attended)
            own_weights, lse = tile.own_weights(past_lse)
            # rhs = W_bP A_P + diag(W_bb) V_b; exp(L_P - L) rescales the past part to the full normalizer.
            rhs = own_weights.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * values[..., start:stop, :]
            if past_out is not None:
                rhs = rhs + torch.exp(past_lse - lse).unsqueeze(-1) * past_out
            # unitriangular=True reads only the strictly-lower part of -W_bb: exactly (I - W_bb,strict).
            block_outputs = torch.linalg.solve_triangular(-own_weights, rhs, upper=False, unitriangular=True)
            attended[..., n_past + start : n_past + stop, :] = block_outputs
            normalizers[..., start:stop] = lse
        outputs = attended[..., n_past:, :]
        ctx.save_for_backward(query, key, value, past_outputs, outputs, normalizers)
        ctx.allowed, ctx.scale, ctx.softcap, ctx.block, ctx.fused = allowed, scale, softcap, block, fused
        return outputs

    @staticmethod
    def backward(ctx, grad_outputs):
        query, key, value, past_outputs, outputs, normalizers = ctx.saved_tensors
        allowed, scale, softcap, block, fused = ctx.allowed, ctx.scale, ctx.softcap, ctx.block, ctx.fused
        n_query_heads, n_new = query.shape[1], query.shape[-2]
        n_past = past_outputs.shape[-2]
        keys = expand_kv_heads(key, n_query_heads)
        values = expand_kv_heads(value, n_query_heads)
        attended = torch.cat([past_outputs, outputs], dim=-2)
        # grad_attended: dLoss/dA for every attended row; later blocks add their W^T lambda to earlier rows.
        grad_attended = torch.cat([torch.zeros_like(past_outputs), grad_outputs.to(outputs.dtype)], dim=-2)
        grad_query = torch.zeros_like(query)
        grad_keys = torch.zeros_like(keys)
        grad_values = torch.zeros_like(values)

        for start, stop in reversed(_block_bounds(n_new, block)):
            rows = slice(n_past + start, n_past + stop)
            tile = _Tile(query, keys, allowed, scale, softcap, fused, n_past, start, stop)
            lse = normalizers[..., start:stop]
            own_scores = tile.own_scores()
            own_weights = tile.own_weights_from(own_scores, lse)
            # (I - W_bb,strict)^T lambda = G_b: upper triangular, solved backwards.
            multipliers = torch.linalg.solve_triangular(
                -own_weights.transpose(-1, -2), grad_attended[..., rows, :], upper=True, unitriangular=True
            )
            block_outputs = attended[..., rows, :]
            # dS_cj = w_cj (lambda_c . x_j - lambda_c . a_c), x_j = a_j (j < c), x_c = v_c.
            products = multipliers @ block_outputs.transpose(-1, -2)
            own_products = (multipliers * values[..., start:stop, :]).sum(-1)
            products = products - torch.diag_embed(products.diagonal(dim1=-2, dim2=-1) - own_products)
            row_dots = (multipliers * block_outputs).sum(-1, keepdim=True)
            grad_scores = tile.through_softcap(own_weights * (products - row_dots), own_scores)
            grad_query[..., start:stop, :] += scale * grad_scores @ keys[..., rows, :]
            grad_keys[..., rows, :] += scale * grad_scores.transpose(-1, -2) @ query[..., start:stop, :]
            grad_values[..., start:stop, :] = own_weights.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * multipliers
            if n_past + start > 0:
                past_rows = slice(0, n_past + start)
                d_query, d_keys, d_attended = tile.past_attention_backward(multipliers, attended, block_outputs, lse)
                grad_query[..., start:stop, :] += d_query
                grad_keys[..., past_rows, :] += d_keys
                grad_attended[..., past_rows, :] += d_attended

        grad_key = _sum_query_head_groups(grad_keys, key.shape[1])
        grad_value = _sum_query_head_groups(grad_values, value.shape[1])
        grad_past = grad_attended[..., :n_past, :] if ctx.needs_input_grad[3] else None
        return grad_query, grad_key, grad_value, grad_past, None, None, None, None, None


def _block_bounds(n_new, block: int) -> list[tuple]:
    """(start, stop) of each block of rows. An input of at most one block is one block without a loop over its
    length, so torch.compile(dynamic=True) traces it once for every such length (a range over a symbolic length
    would fix the length)."""
    if n_new <= block:
        return [(0, n_new)]
    return [(start, min(start + block, n_new)) for start in range(0, n_new, block)]


def _sum_query_head_groups(grad: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(B, H_q, T, d) -> (B, H_kv, T, d): a kv head's gradient is the sum over the query heads that read it."""
    batch, n_query_heads = grad.shape[:2]
    if n_query_heads == n_kv_heads:
        return grad
    return grad.view(batch, n_kv_heads, n_query_heads // n_kv_heads, *grad.shape[2:]).sum(2)


class _Tile:
    """The rows [start, stop) of the new tokens (absolute positions p + start ...): their scores over the past
    keys and over the block's own keys, with the masks that apply to each part."""

    def __init__(self, query, keys, allowed, scale, softcap, fused, n_past, start, stop):
        self.queries = query[..., start:stop, :]
        self.keys = keys
        self.scale, self.softcap, self.fused = scale, softcap, fused
        self.past_end = n_past + start
        self.own = slice(n_past + start, n_past + stop)
        n = stop - start
        causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
        if allowed is None:
            self.past_allowed = None
            self.own_allowed = causal
        else:
            block_allowed = allowed[..., start:stop, :]
            self.past_allowed = block_allowed[..., : self.past_end]
            self.own_allowed = block_allowed[..., self.own] & causal

    # ----- scores
    def _capped(self, scores):
        return scores if self.softcap is None else torch.tanh(scores / self.softcap) * self.softcap

    def own_scores(self):
        return self._capped(self.queries @ self.keys[..., self.own, :].transpose(-1, -2) * self.scale)

    def through_softcap(self, grad_capped, capped):
        """dLoss/d(raw score) from dLoss/d(capped score): d(c tanh(s / c))/ds = 1 - (capped / c)^2."""
        if self.softcap is None:
            return grad_capped
        return grad_capped * (1 - (capped / self.softcap) ** 2)

    def own_weights_from(self, scores, lse):
        """W_bb = exp(S_bb - L), exactly 0 where masked (and in rows with nothing allowed, whose L is 0)."""
        return torch.exp(scores.masked_fill(~self.own_allowed, float("-inf")) - lse.unsqueeze(-1))

    def own_weights(self, past_lse):
        """(W_bb, L): the block's own weights and the full row normalizer L = logaddexp(L_P, L_D)."""
        scores = self.own_scores().masked_fill(~self.own_allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        if past_lse is not None:
            lse = torch.logaddexp(lse, past_lse)
        # A row that may attend to nothing (a left-pad query): L = 0 keeps every weight exactly 0, never NaN.
        lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        return torch.exp(scores - lse.unsqueeze(-1)), lse

    # ----- the past part: attention over earlier outputs
    def _past_mask(self):
        """Additive mask for the fused kernel (it takes the query's dtype), None when every past key is visible."""
        if self.past_allowed is None:
            return None
        zeros = torch.zeros((), dtype=self.queries.dtype, device=self.queries.device)
        return zeros.masked_fill(~self.past_allowed, float("-inf"))

    def past_attention(self, attended):
        """(O_P, L_P): attention over past keys with past outputs as values and its row log-sum-exp (-inf where
        no past key is allowed); (None, None) when the block has no past."""
        if self.past_end == 0:
            return None, None
        past_keys, past_outputs = self.keys[..., : self.past_end, :], attended[..., : self.past_end, :]
        if self.fused:
            out, lse = _flash_cpu(self.queries, past_keys, past_outputs, attn_mask=self._past_mask(), scale=self.scale)
        else:
            scores = self._past_scores(past_keys)
            lse = torch.logsumexp(scores, dim=-1)
            out = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0) @ past_outputs
        if self.past_allowed is not None:  # the fused kernel reports 0, not -inf, for a row with nothing allowed
            lse = torch.where(self.past_allowed.any(-1), lse, float("-inf"))
            out = out.nan_to_num(0.0)
        return out, lse

    def _past_scores(self, past_keys):
        scores = self._capped(self.queries @ past_keys.transpose(-1, -2) * self.scale)
        if self.past_allowed is not None:
            scores = scores.masked_fill(~self.past_allowed, float("-inf"))
        return scores

    def past_attention_backward(self, multipliers, attended, block_outputs, lse):
        """Flash attention's backward over the past with dO = lambda, values A_P, out = A_b and the full L:
        returns (dq_b, dK_P, dA_P), dA_P = W_bP^T lambda."""
        past_keys, past_outputs = self.keys[..., : self.past_end, :], attended[..., : self.past_end, :]
        if self.fused:
            return _flash_cpu_backward(
                multipliers,
                self.queries,
                past_keys,
                past_outputs,
                block_outputs,
                lse,
                0.0,
                False,
                attn_mask=self._past_mask(),
                scale=self.scale,
            )
        scores = self._past_scores(past_keys)
        weights = torch.exp(scores - lse.unsqueeze(-1))
        row_dots = (multipliers * block_outputs).sum(-1, keepdim=True)
        grad_scores = weights * (multipliers @ past_outputs.transpose(-1, -2) - row_dots)
        if self.softcap is not None:
            grad_scores = self.through_softcap(grad_scores, scores.masked_fill(torch.isneginf(scores), 0.0))
        d_query = self.scale * grad_scores @ past_keys
        d_keys = self.scale * grad_scores.transpose(-1, -2) @ self.queries
        return d_query, d_keys, weights.transpose(-1, -2) @ multipliers
