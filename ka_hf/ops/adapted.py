"""Exact KA with a plan-1 adapter f applied to outputs before later tokens attend over them (KA-SPEC §3.1).

    a_i = sum_{j<i} w_ij f(a_j) + w_ii v_i,    f = the adapter of this layer and query head

Rows are cut into blocks, as in the blocked kernel (ops/blocked.py): the past P of a block (cached tokens and
earlier blocks) offers its *mapped* outputs F_P = f(A_P) as values, through the same fused attention
(ops/past.py), so only the block's own recursion is left. Two kernels:

- `ka_attention_adapted`: f(a) = a M + b (the affine adapter). Within a block of n rows, with L the strictly-lower
  part of the block's own weights and D their diagonal,

      A_b = C + L A_b M,    C = W_bP F_P + D V_b + (L 1) b^T

  is linear in A_b and L is nilpotent (L^n = 0), so A_b = sum_{k<n} L^k C M^k exactly. It is summed by doubling:
  X <- X + L^(2^j) X M^(2^j) for j = 0 .. ceil(log2 n) - 1. The backward is the same sum for the adjoint
  Lambda = G + L^T Lambda M^T, with the past through the fused kernel's backward, recomputing tiles block by block
  (only q, k, v, M, b, A, f(A) and the row normalizers are saved): O(T) memory like the blocked kernel. The
  doubling costs n^3 log n for n rows, so it runs on chunks of 32 rows (`LEAF_ROWS`) one after the other, each
  after the earlier chunks' contribution to it; the blocks themselves are as long as the blocked kernel's.
- `ka_attention_mapped`: any f (the residual-MLP adapter): the same blocks with the past fused (explicit weight
  tiles where autograd needs them), and the block's own recursion token by token.

Half inputs: per-block tiles, solves and M, b in float32, the buffers in the input dtype (as ops/blocked.py).
"""

import torch

from .blocked import _block_bounds, _past_kernel_name, _sum_query_head_groups, _Tile, _without_autocast
from .common import DEFAULT_BLOCK_SIZE, attention_weights, causal_allowed, compute_dtype, expand_kv_heads
from .past import past_kernel

# Rows per doubling: within a block the rows go in chunks of this many, each chunk's Neumann sum by doubling
# (~n^3 log2(n) for n rows, so short) after the earlier chunks' contribution (one product). 32 was the fastest of
# 16, 32 and 64 as the block itself (one layer, 8 x 32 and 4 x 64 heads, T = 512 and 4096, a CPU).
LEAF_ROWS = 32


def ka_attention_adapted(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    past_outputs: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    fused: bool | str | None = None,
) -> torch.Tensor:
    """Exact KA outputs A (B, H_q, n, d_v) of n new tokens whose later tokens attend over f(A) = A @ M + b.

    query (B, H_q, n, d); key (B, H_kv, p + n, d); value (B, H_kv, n, d_v); weight M (H_q, d_v, d_v) and bias b
    (H_q, d_v), one map per query head; past_outputs (B, H_q, p, d_v): what the cached tokens offer as values,
    already mapped (f(A_past)); allowed: boolean, broadcastable to (B, H_q, n, p + n), None = causal. fused: as in
    `ka_attention_blocked`. Gradients flow to query, key, value, past_outputs, weight and bias.
    """
    dtype, acc = value.dtype, compute_dtype(value.dtype)
    n_query_heads, value_dim = query.shape[1], value.shape[-1]
    if weight.shape != (n_query_heads, value_dim, value_dim) or bias.shape != (n_query_heads, value_dim):
        raise ValueError(
            f"an affine map for {n_query_heads} heads of size {value_dim} needs weight "
            f"{(n_query_heads, value_dim, value_dim)} and bias {(n_query_heads, value_dim)}, got "
            f"{tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    n_new, n_past = query.shape[-2], key.shape[-2] - query.shape[-2]
    if past_outputs is None or n_past == 0:
        past_outputs = value.new_zeros(*query.shape[:2], 0, value_dim)
    block = max(n_new, 1) if block_size is None else block_size
    kernel = _past_kernel_name(fused, query.device, dtype, allowed is not None, softcap, key.shape[-1], value_dim)
    return _AdaptedKA.apply(
        query.to(dtype),
        key.to(dtype),
        value,
        past_outputs.to(dtype),
        weight.to(acc),
        bias.to(acc),
        allowed,
        scale,
        softcap,
        block,
        kernel,
    )


class _AdaptedKA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, past_outputs, weight, bias, allowed, scale, softcap, block, kernel):
        with _without_autocast(query.device.type):
            outputs, mapped, normalizers = _forward(
                query, key, value, past_outputs, weight, bias, allowed, scale, softcap, block, kernel
            )
        ctx.save_for_backward(query, key, value, past_outputs, weight, outputs, mapped, normalizers)
        ctx.allowed, ctx.scale, ctx.softcap, ctx.block, ctx.kernel = allowed, scale, softcap, block, kernel
        return outputs

    @staticmethod
    def backward(ctx, grad_outputs):
        with _without_autocast(grad_outputs.device.type):
            grads = _backward(ctx, grad_outputs)
        return (*grads, None, None, None, None, None)


def _doubling_steps(n: int) -> int:
    """ceil(log2 n): the doubling steps after which sum_{k < 2^steps} L^k ... covers every k < n (L^n = 0)."""
    return max(n - 1, 0).bit_length()


def _map_powers(weight: torch.Tensor, steps: int, batch: int, transpose: bool = False) -> list[torch.Tensor]:
    """[M, M^2, M^4, ...] (or their transposes): `steps` powers M^(2^j) (M itself at least), one square each, each
    repeated for the batch as (batch * H, d, d), the layout `_neumann_sum`'s batched products take."""
    steps = max(steps, 1)
    powers = [weight]
    for _ in range(steps - 1):
        powers.append(powers[-1] @ powers[-1])
    n_heads, dim = weight.shape[0], weight.shape[-1]
    return [
        (power.transpose(-1, -2) if transpose else power).expand(batch, n_heads, dim, dim).reshape(-1, dim, dim)
        for power in powers[:steps]
    ]


def _doubling(strict: torch.Tensor, rhs: torch.Tensor, map_powers: list[torch.Tensor]) -> torch.Tensor:
    """X = sum_{k<n} L^k C M^k, the solution of X = C + L X M for a strictly lower-triangular (n x n) L, by doubling:
    after step j, X holds the terms k < 2^(j+1). strict: L (B, H, n, n); rhs: C (B, H, n, d); map_powers: M^(2^j)
    as (B * H, d, d) (`_map_powers`), at least ceil(log2 n) of them. The products run as 3-D bmm / baddbmm: at these
    sizes each op's overhead counts as much as its arithmetic."""
    shape, n_rows = rhs.shape, strict.shape[-1]
    solution = rhs.reshape(-1, n_rows, shape[-1])
    power = strict.reshape(-1, n_rows, n_rows)
    steps = _doubling_steps(n_rows)
    for step in range(steps):
        solution = torch.baddbmm(solution, torch.bmm(power, solution), map_powers[step])
        if step + 1 < steps:
            power = torch.bmm(power, power)
    return solution.view(shape)


def _neumann_sum(strict: torch.Tensor, rhs: torch.Tensor, map_powers: list[torch.Tensor]) -> tuple:
    """(X, X M) for the solution of X = C + L X M (shapes as in `_doubling`), by chunks of LEAF_ROWS rows in order:
    chunk c solves X_c = (C_c + L_{c,<c} X_{<c} M) + L_cc X_c M by doubling, the earlier chunks' part one product."""
    n_rows, dim = strict.shape[-1], rhs.shape[-1]
    weight = map_powers[0]

    def times_map(rows):  # X_c M, as the (B * H, d, d) powers are laid out
        return torch.bmm(rows.reshape(-1, rows.shape[-2], dim), weight).view(rows.shape)

    if n_rows <= LEAF_ROWS:
        solution = _doubling(strict, rhs, map_powers)
        return solution, times_map(solution)
    solution, mapped = torch.empty_like(rhs), torch.empty_like(rhs)  # filled chunk by chunk
    for start in range(0, n_rows, LEAF_ROWS):
        rows = slice(start, min(start + LEAF_ROWS, n_rows))
        chunk_rhs = rhs[..., rows, :]
        if start:
            chunk_rhs = chunk_rhs + strict[..., rows, :start] @ mapped[..., :start, :]
        chunk = _doubling(strict[..., rows, rows], chunk_rhs, map_powers)
        solution[..., rows, :] = chunk
        mapped[..., rows, :] = times_map(chunk)
    return solution, mapped


def _neumann_sum_upper(strict_upper: torch.Tensor, rhs: torch.Tensor, map_powers: list[torch.Tensor]) -> torch.Tensor:
    """The solution of X = C + U X M^T for a strictly upper-triangular U (the adjoint pass, U = L^T, powers of M^T):
    with the rows in reverse order U is strictly lower, and it is `_neumann_sum`."""
    return _neumann_sum(strict_upper.flip(-2, -1), rhs.flip(-2), map_powers)[0].flip(-2)


def _forward(query, key, value, past_outputs, weight, bias, allowed, scale, softcap, block, kernel):
    """(outputs A and mapped outputs f(A), both in the input dtype; row normalizers L in the accumulation dtype)."""
    acc = weight.dtype
    n_past, n_new = past_outputs.shape[-2], query.shape[-2]
    past = past_kernel(kernel, scale, softcap)
    keys = expand_kv_heads(key, query.shape[1])
    values = expand_kv_heads(value, query.shape[1])
    map_powers = _map_powers(weight, _doubling_steps(min(block, n_new, LEAF_ROWS)), query.shape[0])
    row_bias = bias[:, None, :]  # (H, 1, d): broadcast over batch and rows
    # The values the later blocks attend over: [cached mapped outputs; this call's mapped outputs].
    attended = torch.cat([past_outputs, values.new_empty(values.shape)], dim=-2)
    outputs = values.new_empty(values.shape)
    normalizers = query.new_empty(query.shape[:-1], dtype=acc)
    for start, stop in _block_bounds(n_new, block):
        tile = _Tile(query, keys, allowed, scale, softcap, past, n_past, start, stop)
        past_out, past_lse = tile.past_attention(attended)
        own_weights, lse = tile.own_weights(past_lse)
        # C = W_bP F_P + D V_b + (L 1) b^T: the strictly-earlier rows of the block add their bias through L.
        diagonal = own_weights.diagonal(dim1=-2, dim2=-1)
        rhs = diagonal.unsqueeze(-1) * values[..., start:stop, :].to(acc)
        strict = own_weights
        diagonal.zero_()  # L = W_bb without its diagonal, in place (a fresh tile; its upper triangle is 0)
        rhs = rhs + strict.sum(-1, keepdim=True) * row_bias
        if past_out is not None:
            rhs = rhs + torch.exp(past_lse - lse).unsqueeze(-1) * past_out
        block_outputs, times_map = _neumann_sum(strict, rhs, map_powers)
        outputs[..., start:stop, :] = block_outputs
        attended[..., n_past + start : n_past + stop, :] = times_map + row_bias
        normalizers[..., start:stop] = lse
    return outputs, attended[..., n_past:, :], normalizers


def _backward(ctx, grad_outputs):
    """Per block, last to first. With G the gradient on A_b and H the gradient on f(A_b) from later blocks (their
    past attention), the multipliers Lambda = (G + H M^T) + L^T Lambda M^T (the adjoint sum); Phi = H + L^T Lambda
    is the whole gradient on f(A_b), so dM += A_b^T Phi, db += 1^T Phi. The scores' gradient is the blocked kernel's
    with the block's values X = f(A_b) off the diagonal and V_b on it: dS_cj = w_cj (Lambda_c . x_j - Lambda_c . a_c).
    """
    query, key, value, past_outputs, weight, outputs, mapped, normalizers = ctx.saved_tensors
    allowed, scale, softcap, block = ctx.allowed, ctx.scale, ctx.softcap, ctx.block
    dtype, acc = value.dtype, weight.dtype
    n_query_heads, n_new, n_past = query.shape[1], query.shape[-2], past_outputs.shape[-2]
    past = past_kernel(ctx.kernel, scale, softcap)
    keys = expand_kv_heads(key, n_query_heads)
    values = expand_kv_heads(value, n_query_heads)
    attended = torch.cat([past_outputs, mapped], dim=-2)
    weight_t = weight.transpose(-1, -2)
    map_powers_t = _map_powers(weight, _doubling_steps(min(block, n_new, LEAF_ROWS)), query.shape[0], transpose=True)
    grad_outputs = grad_outputs.to(acc)
    grad_mapped = torch.zeros_like(attended, dtype=acc)  # H: dLoss/df(A) of every attended row, summed over blocks
    grad_keys = torch.zeros_like(keys, dtype=acc)
    grad_weight = torch.zeros_like(weight)
    grad_bias = weight.new_zeros(weight.shape[:-1])
    grad_query = torch.empty_like(query)
    grad_values = torch.empty_like(values)

    for start, stop in reversed(_block_bounds(n_new, block)):
        rows = slice(n_past + start, n_past + stop)
        tile = _Tile(query, keys, allowed, scale, softcap, past, n_past, start, stop)
        lse = normalizers[..., start:stop]
        own_scores = tile.own_scores()
        own_weights = tile.own_weights_from(own_scores, lse)
        strict_t = own_weights.tril(-1).transpose(-1, -2)
        later = grad_mapped[..., rows, :]
        multipliers = _neumann_sum_upper(strict_t, grad_outputs[..., start:stop, :] + later @ weight_t, map_powers_t)
        grad_mapped_block = later + strict_t @ multipliers  # Phi
        block_outputs = outputs[..., start:stop, :]
        own_outputs = block_outputs.to(acc)
        grad_weight += torch.einsum("bhnd,bhne->hde", own_outputs, grad_mapped_block)
        grad_bias += grad_mapped_block.sum(dim=(0, 2))

        own_mapped, own_values = attended[..., rows, :].to(acc), values[..., start:stop, :].to(acc)
        products = multipliers @ own_mapped.transpose(-1, -2)
        own_products = (multipliers * own_values).sum(-1)
        products.diagonal(dim1=-2, dim2=-1).copy_(own_products)  # a fresh tensor: written in place
        row_dots = (multipliers * own_outputs).sum(-1, keepdim=True)
        grad_scores = tile.through_softcap(products.sub_(row_dots).mul_(own_weights), own_scores)
        block_grad_query = (grad_scores @ keys[..., rows, :].to(acc)) * scale
        grad_keys[..., rows, :] += (grad_scores.transpose(-1, -2) @ query[..., start:stop, :].to(acc)) * scale
        grad_values[..., start:stop, :] = own_weights.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * multipliers
        if n_past + start > 0:
            d_query, d_keys, d_mapped = tile.past_attention_backward(multipliers, attended, block_outputs, lse)
            block_grad_query = block_grad_query + d_query
            grad_keys[..., : n_past + start, :] += d_keys
            grad_mapped[..., : n_past + start, :] += d_mapped
        grad_query[..., start:stop, :] = block_grad_query

    grad_key = _sum_query_head_groups(grad_keys, key.shape[1]).to(dtype)
    grad_value = _sum_query_head_groups(grad_values, value.shape[1])
    grad_past = grad_mapped[..., :n_past, :].to(dtype) if ctx.needs_input_grad[3] else None
    return grad_query, grad_key, grad_value, grad_past, grad_weight, grad_bias


def ka_attention_mapped(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    value_map,
    past_outputs: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    fused: bool | str | None = None,
) -> torch.Tensor:
    """Exact KA outputs (B, H_q, n, d_v) whose later tokens attend over value_map(A), for any value_map (e.g. the
    residual-MLP adapter): block by block, the past through the fused attention, the block's own recursion token by
    token. Shapes as in `ka_attention_adapted`. With autograd on, the past is explicit (block x T) weight tiles that
    autograd differentiates (O(T^2) memory over a call, as the "parallel" kernel); without it, the fused kernel.
    """
    dtype, acc = value.dtype, compute_dtype(value.dtype)
    n_query_heads, n_new = query.shape[1], query.shape[-2]
    n_past = key.shape[-2] - n_new
    differentiable = torch.is_grad_enabled()
    kernel = None
    if not differentiable:
        kernel = _past_kernel_name(
            fused, query.device, dtype, allowed is not None, softcap, key.shape[-1], value.shape[-1]
        )
    keys = expand_kv_heads(key.to(dtype), n_query_heads)
    values = expand_kv_heads(value, n_query_heads)
    attended = [past_outputs.to(dtype)] if past_outputs is not None and n_past > 0 else []
    outputs = []
    block = max(n_new, 1) if block_size is None else block_size
    for start, stop in _block_bounds(n_new, block):
        past_end = n_past + start
        past_values = torch.cat(attended, dim=-2) if len(attended) > 1 else (attended[0] if attended else None)
        if differentiable:
            rhs, strict = _explicit_block(
                query, keys, values, past_values, allowed, scale, softcap, past_end, start, stop
            )
        else:
            tile = _Tile(
                query.to(dtype), keys, allowed, scale, softcap, past_kernel(kernel, scale, softcap), n_past, start, stop
            )
            past_out, past_lse = tile.past_attention(past_values)
            own_weights, lse = tile.own_weights(past_lse)
            strict = own_weights.tril(-1)
            rhs = own_weights.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * values[..., start:stop, :].to(acc)
            if past_out is not None:
                rhs = rhs + torch.exp(past_lse - lse).unsqueeze(-1) * past_out
        block_outputs, block_mapped = _recursion(rhs, strict, value_map)
        outputs.append(block_outputs.to(dtype))
        attended.append(block_mapped.to(dtype))
    return torch.cat(outputs, dim=-2)


def _explicit_block(query, keys, values, past_values, allowed, scale, softcap, past_end, start, stop):
    """(C = W_bP F_P + D V_b, strict(W_bb)) of one block from explicit weights over its visible keys, which autograd
    differentiates (a row with nothing allowed has weight 0 and a finite gradient)."""
    acc = compute_dtype(values.dtype)
    n_visible = past_end + stop - start
    visible = causal_allowed(stop - start, n_visible, query.device)
    if allowed is not None:
        visible = visible & allowed[..., start:stop, :n_visible]
    weights = attention_weights(
        query[..., start:stop, :].to(acc), keys[..., :n_visible, :].to(acc), visible, scale, softcap
    )
    own_weights = weights[..., past_end:]
    rhs = own_weights.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * values[..., start:stop, :].to(acc)
    if past_values is not None:
        rhs = rhs + weights[..., :past_end] @ past_values.to(acc)
    return rhs, own_weights.tril(-1)


def _recursion(rhs, strict, value_map):
    """a_i = C_i + sum_{j<i} L_ij f(a_j) over the block's rows, one at a time: (A_b, f(A_b)). Without autograd the
    rows are written into buffers in place; with it they are concatenated (in-place writes would break autograd)."""
    n_rows = rhs.shape[-2]
    if not torch.is_grad_enabled():
        outputs, mapped = torch.empty_like(rhs), torch.empty_like(rhs)
        for row in range(n_rows):
            output = rhs[..., row : row + 1, :]
            if row:
                output = output + strict[..., row : row + 1, :row] @ mapped[..., :row, :]
            outputs[..., row : row + 1, :] = output
            mapped[..., row : row + 1, :] = value_map(output)
        return outputs, mapped
    outputs, mapped = [], []
    for row in range(n_rows):
        output = rhs[..., row : row + 1, :]
        if row:
            output = output + strict[..., row : row + 1, :row] @ torch.cat(mapped, dim=-2)
        outputs.append(output)
        mapped.append(value_map(output).to(output.dtype))
    return torch.cat(outputs, dim=-2), torch.cat(mapped, dim=-2)
