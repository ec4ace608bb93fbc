"""Exact KA with O(T) memory: a fused-attention forward and a recomputing backward (docs/KA-LONG.md).

Rows are cut into blocks of n tokens. For block b, with "past" P = every key before the block (cached tokens and
earlier blocks):

    (I - W_bb,strict) A_b = W_bP A_P + diag(W_bb) V_b

- W_bP A_P is ordinary attention of the block's queries over the past keys with the past *outputs* as values,
  normalized by the full row normalizer L = logaddexp(L_P, L_D). A fused kernel returns (O_P, L_P) without a
  weight matrix, and W_bP A_P = exp(L_P - L) * O_P. Which kernel runs is chosen once per call by device and dtype
  (ops/past.py): on CPU `aten._scaled_dot_product_flash_attention_for_cpu`; on CUDA FlashAttention-2 or the
  memory-efficient kernel (with a mask); with softcapping and elsewhere one explicit (n x T) score tile per block.
- W_bb is the small (n x n) tile of the block's own keys; one unit-lower-triangular solve per block.

Only q, k, v, A and the row normalizers L are saved for the backward, which recomputes tiles block by block from
the last block to the first (KA-LONG "Backward"): solve the transposed block system for the multipliers
lambda_b, then the past part is flash attention's backward with dO = lambda_b, values A_P, out = A_b and the
saved L, which yields dq, dK_P and the contribution W_bP^T lambda_b to the earlier blocks' gradients.

Half precision (fp16/bf16) is native: q, k, v and A stay in their dtype and no whole tensor is copied to float32.
Per block the (n x n) tile, the row normalizers and the triangular solve are float32 (as flash-linear-attention's
chunk kernels solve in float32); the past goes through the fused kernel in the input dtype (it accumulates in
float32 and returns a float32 L); the block's outputs are stored in the input dtype, as standard attention
stores its outputs. The backward accumulates dK and dA over blocks in float32 and returns gradients in the input
dtypes. Autocast is off inside: the kernel manages its own precision.
"""

import contextlib
import math

import torch

from .common import DEFAULT_BLOCK_SIZE, compute_dtype, expand_kv_heads
from .past import PAST_KERNELS, choose_past_kernel, past_kernel


def ka_attention_blocked(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_outputs: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    fused: bool | str | None = None,
) -> torch.Tensor:
    """Exact KA outputs of n new tokens; same arguments and result as `ka_attention` (variant "ka", no dropout).

    query (B, H_q, n, d); key (B, H_kv, p + n, d); value (B, H_kv, n, d_v); past_outputs (B, H_q, p, d_v) or None;
    allowed: boolean, broadcastable to (B, H_q, n, p + n), None = causal. Returns (B, H_q, n, d_v) in value's dtype.
    Gradients flow to query, key, value and past_outputs. fused: how the past part is computed — None: the fused
    kernel this device and dtype have (`ops.past.choose_past_kernel`), True: that kernel and an error if there is
    none, False: explicit (block x T) score tiles, or a kernel's name from `ops.past.PAST_KERNELS`.
    """
    dtype = value.dtype
    n_new, n_total = query.shape[-2], key.shape[-2]
    n_past = n_total - n_new
    if past_outputs is None or n_past == 0:
        past_outputs = value.new_zeros(*query.shape[:2], 0, value.shape[-1])
    block = max(n_new, 1) if block_size is None else block_size
    kernel = _past_kernel_name(fused, query.device, dtype, allowed is not None, softcap, key.shape[-1], value.shape[-1])
    return _BlockedKA.apply(
        query.to(dtype), key.to(dtype), value, past_outputs.to(dtype), allowed, scale, softcap, block, kernel
    )


def _past_kernel_name(fused, device, dtype, masked, softcap, head_dim, value_dim) -> str:
    chosen = choose_past_kernel(device, dtype, masked, softcap, head_dim, value_dim)
    if fused is None:
        return chosen
    if fused is False:
        return "tiles"
    if fused is True:
        if chosen == "tiles":
            raise ValueError(
                f"no fused past kernel for this call ({torch.device(device).type}, {dtype}, softcap={softcap}, "
                f"key size {head_dim}, value size {value_dim}); see ka_hf.ops.past"
            )
        return chosen
    if fused not in PAST_KERNELS:
        raise ValueError(f"fused must be None, True, False or one of {PAST_KERNELS}, got {fused!r}")
    return fused


class _BlockedKA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, past_outputs, allowed, scale, softcap, block, kernel):
        with _without_autocast(query.device.type):
            outputs, normalizers = _forward(query, key, value, past_outputs, allowed, scale, softcap, block, kernel)
        ctx.save_for_backward(query, key, value, past_outputs, outputs, normalizers)
        ctx.allowed, ctx.scale, ctx.softcap, ctx.block, ctx.kernel = allowed, scale, softcap, block, kernel
        return outputs

    @staticmethod
    def backward(ctx, grad_outputs):
        with _without_autocast(grad_outputs.device.type):
            grads = _backward(ctx, grad_outputs)
        return (*grads, None, None, None, None, None)


def _without_autocast(device_type: str):
    """Autocast off (the kernel sets its own precision) on devices that have it."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _block_bounds(n_new, block: int) -> list[tuple]:
    """(start, stop) of each block of rows. An input of at most one block is one block without a loop over its
    length, so torch.compile(dynamic=True) traces it once for every such length (a range over a symbolic length
    would fix the length)."""
    if n_new <= block:
        return [(0, n_new)]
    return [(start, min(start + block, n_new)) for start in range(0, n_new, block)]


def _forward(query, key, value, past_outputs, allowed, scale, softcap, block, kernel):
    """(outputs in the input dtype, row normalizers L in the accumulation dtype)."""
    acc = compute_dtype(value.dtype)
    n_past, n_new = past_outputs.shape[-2], query.shape[-2]
    past = past_kernel(kernel, scale, softcap)
    keys = expand_kv_heads(key, query.shape[1])  # (B, H_q, p + n, d): the fused kernels want per-head keys
    values = expand_kv_heads(value, query.shape[1])
    # One buffer holds every output the later blocks attend over: [cached outputs; this call's outputs].
    attended = torch.cat([past_outputs, values.new_empty(values.shape)], dim=-2)
    normalizers = query.new_empty(query.shape[:-1], dtype=acc)  # L per new row (B, H_q, n)
    for start, stop in _block_bounds(n_new, block):
        tile = _Tile(query, keys, allowed, scale, softcap, past, n_past, start, stop)
        past_out, past_lse = tile.past_attention(attended)
        own_weights, lse = tile.own_weights(past_lse)
        # rhs = W_bP A_P + diag(W_bb) V_b; exp(L_P - L) rescales the past part to the full normalizer.
        rhs = own_weights.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * values[..., start:stop, :].to(acc)
        if past_out is not None:
            rhs = rhs + torch.exp(past_lse - lse).unsqueeze(-1) * past_out
        # unitriangular=True reads only the strictly-lower part of -W_bb: exactly (I - W_bb,strict).
        block_outputs = torch.linalg.solve_triangular(-own_weights, rhs, upper=False, unitriangular=True)
        attended[..., n_past + start : n_past + stop, :] = block_outputs
        normalizers[..., start:stop] = lse
    return attended[..., n_past:, :], normalizers


def _backward(ctx, grad_outputs):
    query, key, value, past_outputs, outputs, normalizers = ctx.saved_tensors
    allowed, scale, softcap, block = ctx.allowed, ctx.scale, ctx.softcap, ctx.block
    dtype, acc = value.dtype, normalizers.dtype
    n_query_heads, n_new = query.shape[1], query.shape[-2]
    n_past = past_outputs.shape[-2]
    past = past_kernel(ctx.kernel, scale, softcap)
    keys = expand_kv_heads(key, n_query_heads)
    values = expand_kv_heads(value, n_query_heads)
    attended = torch.cat([past_outputs, outputs], dim=-2)
    # grad_attended: dLoss/dA for every attended row; later blocks add their W^T lambda to earlier rows. It and
    # grad_keys are sums over blocks: accumulated in the accumulation dtype (float32 for half inputs).
    grad_attended = torch.cat([torch.zeros_like(past_outputs, dtype=acc), grad_outputs.to(acc)], dim=-2)
    grad_keys = torch.zeros_like(keys, dtype=acc)
    grad_query = torch.empty_like(query)
    grad_values = torch.empty_like(values)

    for start, stop in reversed(_block_bounds(n_new, block)):
        rows = slice(n_past + start, n_past + stop)
        tile = _Tile(query, keys, allowed, scale, softcap, past, n_past, start, stop)
        lse = normalizers[..., start:stop]
        own_scores = tile.own_scores()
        own_weights = tile.own_weights_from(own_scores, lse)
        # (I - W_bb,strict)^T lambda = G_b: upper triangular, solved backwards.
        multipliers = torch.linalg.solve_triangular(
            -own_weights.transpose(-1, -2), grad_attended[..., rows, :], upper=True, unitriangular=True
        )
        block_outputs = attended[..., rows, :]
        own_outputs, own_values = block_outputs.to(acc), values[..., start:stop, :].to(acc)
        # dS_cj = w_cj (lambda_c . x_j - lambda_c . a_c), x_j = a_j (j < c), x_c = v_c.
        products = multipliers @ own_outputs.transpose(-1, -2)
        own_products = (multipliers * own_values).sum(-1)
        products.diagonal(dim1=-2, dim2=-1).copy_(own_products)  # a fresh tensor: written in place
        row_dots = (multipliers * own_outputs).sum(-1, keepdim=True)
        grad_scores = tile.through_softcap(products.sub_(row_dots).mul_(own_weights), own_scores)
        # the scale applied to the (n x d) products, not to the (n x n) tile
        block_grad_query = (grad_scores @ keys[..., rows, :].to(acc)) * scale
        grad_keys[..., rows, :] += (grad_scores.transpose(-1, -2) @ query[..., start:stop, :].to(acc)) * scale
        grad_values[..., start:stop, :] = own_weights.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * multipliers
        if n_past + start > 0:
            past_rows = slice(0, n_past + start)
            d_query, d_keys, d_attended = tile.past_attention_backward(multipliers, attended, block_outputs, lse)
            block_grad_query = block_grad_query + d_query
            grad_keys[..., past_rows, :] += d_keys
            grad_attended[..., past_rows, :] += d_attended
        grad_query[..., start:stop, :] = block_grad_query

    grad_key = _sum_query_head_groups(grad_keys, key.shape[1]).to(dtype)
    grad_value = _sum_query_head_groups(grad_values, value.shape[1])
    grad_past = grad_attended[..., :n_past, :].to(dtype) if ctx.needs_input_grad[3] else None
    return grad_query, grad_key, grad_value, grad_past


def _sum_query_head_groups(grad: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(B, H_q, T, d) -> (B, H_kv, T, d): a kv head's gradient is the sum over the query heads that read it."""
    batch, n_query_heads = grad.shape[:2]
    if n_query_heads == n_kv_heads:
        return grad
    return grad.view(batch, n_kv_heads, n_query_heads // n_kv_heads, *grad.shape[2:]).sum(2)


class _Tile:
    """The rows [start, stop) of the new tokens (absolute positions p + start ...): their scores over the past
    keys and over the block's own keys, with the masks that apply to each part. The own (n x n) tile is computed
    in the accumulation dtype; the past goes through the past kernel (ops/past.py)."""

    def __init__(self, query, keys, allowed, scale, softcap, past, n_past, start, stop):
        self.queries = query[..., start:stop, :]
        self.keys = keys
        self.scale, self.softcap, self.past = scale, softcap, past
        self.acc = compute_dtype(query.dtype)
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
        # The mask as a 0/1 factor and as an additive 0/-inf term: a multiply and an add, cheaper than masked_fill
        # with a broadcast boolean mask.
        self.own_keep = self.own_allowed.to(self.acc)
        self.own_bias = torch.zeros_like(self.own_keep).masked_fill_(~self.own_allowed, float("-inf"))
        # exp() of -inf, or of an argument whose result underflows, takes a slow path on CPUs (10x the time of
        # ordinary arguments, measured on a (16, 4, 64, 64) float32 tile): exponents are clamped to where exp is
        # a normal number, and the masked entries are zeroed by the 0/1 factor. A weight below the smallest normal
        # number (1e-38 in float32) becomes that number; masked ones are exactly 0.
        finfo = torch.finfo(self.acc)
        self.exp_range = (math.log(finfo.tiny) + 1.0, math.log(finfo.max) - 1.0)

    # ----- the block's own (n x n) tile. Its elementwise steps run in place on fresh tiles: on a CPU an op that
    # allocates a new (n x n) tile costs 2-3x one that does not.
    def own_scores(self):
        """The block's scores over its own keys (a fresh tile; the scale applied to the (n x d) queries)."""
        queries = self.queries.to(self.acc) * self.scale
        scores = queries @ self.keys[..., self.own, :].to(self.acc).transpose(-1, -2)
        return scores if self.softcap is None else torch.tanh(scores / self.softcap) * self.softcap

    def through_softcap(self, grad_capped, capped):
        """dLoss/d(raw score) from dLoss/d(capped score): d(c tanh(s / c))/ds = 1 - (capped / c)^2."""
        if self.softcap is None:
            return grad_capped
        return grad_capped * (1 - (capped / self.softcap) ** 2)

    def _masked_exp_(self, exponents):
        """exp(exponents) where allowed, exactly 0 where masked, in place; no exp() of -inf or of an underflowing
        argument."""
        return exponents.clamp_(*self.exp_range).exp_().mul_(self.own_keep)

    def own_weights_from(self, scores, lse):
        """W_bb = exp(S_bb - L), exactly 0 where masked (and in rows with nothing allowed, whose L is 0). Overwrites
        `scores`, except with softcapping, whose gradient reads them again."""
        exponents = scores.clone() if self.softcap is not None else scores
        return self._masked_exp_(exponents.sub_(lse.unsqueeze(-1)))

    def own_weights(self, past_lse):
        """(W_bb, L): the block's own weights and the full row normalizer L = logaddexp(L_P, L_D)."""
        scores = self.own_scores().add_(self.own_bias)  # -inf where masked
        row_max = scores.amax(dim=-1, keepdim=True)  # -inf only in a row with nothing allowed
        row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
        unnormalized = self._masked_exp_(scores.sub_(row_max))
        lse = torch.log(unnormalized.sum(-1)) + row_max.squeeze(-1)
        if past_lse is not None:
            lse = torch.logaddexp(lse, past_lse)
        # A row that may attend to nothing (a left-pad query): L = 0 keeps every weight exactly 0, never NaN.
        lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        # W = exp(S - m) exp(m - L): one pass over the tile instead of a second exp (exp(m - L) <= 1 per row).
        return unnormalized.mul_(torch.exp(row_max - lse.unsqueeze(-1))), lse

    # ----- the past part: attention over earlier outputs
    def past_attention(self, attended):
        """(O_P, L_P) in the accumulation dtype: attention over past keys with past outputs as values and its row
        log-sum-exp (-inf where no past key is allowed); (None, None) when the block has no past."""
        if self.past_end == 0:
            return None, None
        past_keys, past_outputs = self.keys[..., : self.past_end, :], attended[..., : self.past_end, :]
        out, lse = self.past.forward(self.queries, past_keys, past_outputs, self.past_allowed)
        return out.to(self.acc), lse.to(self.acc)

    def past_attention_backward(self, multipliers, attended, block_outputs, lse):
        """Flash attention's backward over the past with dO = lambda, values A_P, out = A_b and the full L:
        returns (dq_b, dK_P, dA_P) in the accumulation dtype, dA_P = W_bP^T lambda."""
        past_keys, past_outputs = self.keys[..., : self.past_end, :], attended[..., : self.past_end, :]
        grads = self.past.backward(
            multipliers, self.queries, past_keys, past_outputs, block_outputs, lse, self.past_allowed
        )
        return tuple(grad.to(self.acc) for grad in grads)
