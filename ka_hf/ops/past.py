"""Attention of a block's queries over the past, with its row log-sum-exp, and the backward the KA kernel needs.

The blocked KA kernel (ops/blocked.py) asks two things of "the past" P of a block (every key before it, with the
past *outputs* as values):

    forward(q, K_P, A_P, allowed)               -> (O_P, L_P)      O_P = softmax_P(S) A_P, L_P = logsumexp_P(S)
    backward(dO, q, K_P, A_P, out, L, allowed)  -> (dq, dK_P, dA_P)

The backward is flash attention's: with P = exp(S - L) for a given row normalizer L, dS = P (dO A_P^T - D) and
D = rowsum(dO * out). KA calls it with dO = lambda (the block's multipliers), out = A_b (the block's outputs) and
L = the full row normalizer, which makes it exactly the past part of the KA gradient (docs/KA-LONG.md). A fused
kernel does both without a (block x T) weight matrix. The kernels, chosen in one place (`choose_past_kernel`):

| name | op | runs | masks | dtypes |
|---|---|---|---|---|
| "cpu-flash" | `aten._scaled_dot_product_flash_attention_for_cpu` (+ `_backward`) | CPU | additive mask | all float |
| "cuda-flash" | `aten._scaled_dot_product_flash_attention` (+ `_backward`), FlashAttention-2 | CUDA | none | fp16, bf16 |
| "cuda-efficient" | `aten._scaled_dot_product_efficient_attention` (+ `_backward`) | CUDA | additive bias | fp32, fp16, bf16 |
| "tiles" | explicit (block x T) score tiles in PyTorch | anywhere | any, and softcapping | all float |

Contract of every kernel: grad_out may come in the accumulation dtype (the kernel converts it); O_P is 0 and L_P is -inf in a row where no past key is allowed; L in the backward is
finite (the full normalizer, 0 for a row that may attend to nothing). Results come in the input dtype or float32
(the caller converts); log-sum-exps are float32 for half inputs.

Not used, on purpose: `flash_attn_func(return_attn_probs=True)` from the flash-attn package, whose backward
ignores the log-sum-exp's gradient (flash-attention issue #889), and flex_attention, which on CUDA needs a
compile per past length (every block has a different one).
"""

import math

import torch

from .common import compute_dtype

HALF = (torch.float16, torch.bfloat16)
PAST_KERNELS = ("cpu-flash", "cuda-flash", "cuda-efficient", "tiles")
# The efficient kernel's log-sum-exp rows come padded to a multiple of 32 (its backward's query block, kAlignLSE);
# its backward reads them with vectorized loads, so the L handed to it is padded the same way.
_LSE_ALIGN = 32
# An attention bias for the efficient kernel needs each row (stride over queries) aligned to 16 elements, as
# F.scaled_dot_product_attention pads it (pad_bias) before calling the same op.
_BIAS_ALIGN = 16


def choose_past_kernel(device, dtype, masked: bool, softcap, head_dim: int, value_dim: int) -> str:
    """The kernel for the past of one KA call: by device and dtype, and whether a mask or softcapping applies.

    CPU: the fused CPU kernel (any float dtype). CUDA: FlashAttention-2 for unmasked fp16/bf16 (every past key is
    visible under a plain causal mask), the memory-efficient kernel otherwise (it takes an additive bias: padding,
    windows; and fp32). Softcapping, float64 on CUDA, other devices and shapes the kernels do not take: tiles.
    """
    device_type = torch.device(device).type
    if softcap is not None:
        return "tiles"
    if device_type == "cpu":
        return "cpu-flash" if head_dim == value_dim else "tiles"
    if device_type == "cuda":
        if not masked and dtype in HALF and head_dim == value_dim and head_dim % 8 == 0 and head_dim <= 256:
            return "cuda-flash"
        align = 16 // torch.empty((), dtype=dtype).element_size()  # 16-byte rows: the kernels' aligned loads
        if dtype in (torch.float32, *HALF) and head_dim % align == 0 and value_dim % align == 0:
            return "cuda-efficient"
    return "tiles"


def past_kernel(name: str, scale: float, softcap: float | None = None):
    """The kernel object for `name` (one of PAST_KERNELS)."""
    if name not in PAST_KERNELS:
        raise ValueError(f"unknown past kernel {name!r}: use one of {PAST_KERNELS}")
    if softcap is not None and name != "tiles":
        raise ValueError(f"the {name!r} past kernel cannot softcap scores; use 'tiles'")
    return {"cpu-flash": CpuFlash, "cuda-flash": CudaFlash, "cuda-efficient": CudaEfficient, "tiles": Tiles}[name](
        scale, softcap
    )


def additive_mask(allowed: torch.Tensor | None, dtype, align: int = 1) -> torch.Tensor | None:
    """0 where allowed, -inf elsewhere, in `dtype` (the fused kernels add it to the scores); None stays None. With
    `align` > 1 the rows are stored with their length padded to a multiple of it (a view of the first columns)."""
    if allowed is None:
        return None
    n_keys = allowed.shape[-1]
    padded = math.ceil(n_keys / align) * align
    storage = torch.zeros(*allowed.shape[:-1], padded, dtype=dtype, device=allowed.device)
    mask = storage[..., :n_keys]
    mask.masked_fill_(~allowed, float("-inf"))
    return mask


def _no_past_rows(out, lse, allowed):
    """Rows with no allowed past key: O_P = 0 and L_P = -inf, whatever the kernel made of them (0, NaN)."""
    if allowed is None:
        return out, lse
    any_allowed = allowed.any(-1)
    return torch.where(any_allowed.unsqueeze(-1), out, 0.0), torch.where(any_allowed, lse, float("-inf"))


class CpuFlash:
    """The fused CPU kernel: takes a broadcastable additive mask, returns L_P of shape (B, H, n)."""

    def __init__(self, scale, softcap=None):
        self.scale = scale

    def forward(self, queries, keys, values, allowed):
        mask = additive_mask(allowed, queries.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            queries, keys, values, attn_mask=mask, scale=self.scale
        )
        return _no_past_rows(out, lse, allowed)

    def backward(self, grad_out, queries, keys, values, out, lse, allowed):
        mask = additive_mask(allowed, queries.dtype)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.to(queries.dtype), queries, keys, values, out, lse, 0.0, False, attn_mask=mask, scale=self.scale
        )


class CudaFlash:
    """FlashAttention-2 through torch (fp16/bf16, no mask). Forward returns (out, lse (B, H, n) fp32, cum_seq_q,
    cum_seq_k, max_q, max_k, rng_state, unused, debug_mask); its backward takes out, lse (read as a contiguous
    (B, H, n) array) and the forward's bookkeeping values, which without dropout carry nothing."""

    def __init__(self, scale, softcap=None):
        self.scale = scale

    def forward(self, queries, keys, values, allowed):
        if allowed is not None:
            raise ValueError("the 'cuda-flash' past kernel takes no mask; use 'cuda-efficient'")
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            queries, keys, values, 0.0, False, False, scale=self.scale
        )[:2]
        return out, lse

    def backward(self, grad_out, queries, keys, values, out, lse, allowed):
        n_queries = queries.shape[-2]
        # The forward's rng_state (2 int64 on the device) and its unused offset: read only with dropout, which is 0.
        rng_state = torch.zeros(2, dtype=torch.int64, device=queries.device)
        unused = torch.zeros((), dtype=torch.int64, device=queries.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out.to(queries.dtype).contiguous(),
            queries,
            keys,
            values,
            out,
            lse.contiguous(),  # float32 for its half inputs
            None,  # cum_seq_q, cum_seq_k: a dense (not nested) batch
            None,
            n_queries,
            keys.shape[-2],
            0.0,
            False,
            rng_state,
            unused,
            scale=self.scale,
        )


class CudaEfficient:
    """The memory-efficient kernel: an additive bias (B, H, n, P) in the query dtype with 16-aligned rows; its
    log-sum-exp comes padded to a multiple of 32 rows (sliced here), and its backward reads L padded the same way."""

    def __init__(self, scale, softcap=None):
        self.scale = scale

    @staticmethod
    def _bias(allowed, queries, n_keys):
        mask = additive_mask(allowed, queries.dtype, align=_BIAS_ALIGN)
        if mask is None:
            return None
        return mask.expand(queries.shape[0], queries.shape[1], queries.shape[2], n_keys)  # 4-D, stride 0 allowed

    def forward(self, queries, keys, values, allowed):
        bias = self._bias(allowed, queries, keys.shape[-2])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            queries, keys, values, bias, True, 0.0, False, scale=self.scale
        )[:2]
        return _no_past_rows(out, lse[..., : queries.shape[-2]], allowed)

    def backward(self, grad_out, queries, keys, values, out, lse, allowed):
        bias = self._bias(allowed, queries, keys.shape[-2])
        # The kernel reads `out` with the row stride of the layout its forward returns (B, n, H, d) (o_strideM =
        # H * d_v in kernel_backward.h), whatever the tensor's own strides say: hand it that layout.
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
        n_queries = queries.shape[-2]
        padded = lse.new_zeros(*lse.shape[:-1], math.ceil(n_queries / _LSE_ALIGN) * _LSE_ALIGN)
        padded[..., :n_queries] = lse
        # The philox seed and offset the forward returns (0-dim int64 on the CPU): read only with dropout.
        unused = torch.zeros((), dtype=torch.int64)
        grad_query, grad_key, grad_value, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out.to(queries.dtype),
            queries,
            keys,
            values,
            bias,
            out,
            padded,
            unused,
            unused,
            0.0,
            [True, True, True, False],  # no gradient for the bias
            False,
            scale=self.scale,
        )
        return grad_query, grad_key, grad_value


class Tiles:
    """Explicit (n x P) score tiles in PyTorch: any device and dtype, softcapping; half inputs are computed in
    float32 tile by tile (the tile exists anyway; the fused kernels accumulate in float32 too)."""

    def __init__(self, scale, softcap=None):
        self.scale, self.softcap = scale, softcap

    def _scores(self, queries, keys, allowed):
        acc = compute_dtype(queries.dtype)
        scores = queries.to(acc) @ keys.to(acc).transpose(-1, -2) * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return scores

    def forward(self, queries, keys, values, allowed):
        scores = self._scores(queries, keys, allowed)
        lse = torch.logsumexp(scores, dim=-1)
        weights = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # NaN only in rows with nothing allowed
        return _no_past_rows(weights @ values.to(scores.dtype), lse, allowed)

    def backward(self, grad_out, queries, keys, values, out, lse, allowed):
        scores = self._scores(queries, keys, allowed)
        acc = scores.dtype
        grad_out, values = grad_out.to(acc), values.to(acc)
        weights = torch.exp(scores - lse.unsqueeze(-1))
        row_dots = (grad_out * out.to(acc)).sum(-1, keepdim=True)
        grad_scores = weights * (grad_out @ values.transpose(-1, -2) - row_dots)
        if self.softcap is not None:  # d(c tanh(s / c))/ds = 1 - (capped / c)^2
            capped = scores.masked_fill(torch.isneginf(scores), 0.0)
            grad_scores = grad_scores * (1 - (capped / self.softcap) ** 2)
        grad_query = self.scale * grad_scores @ keys.to(acc)
        grad_keys = self.scale * grad_scores.transpose(-1, -2) @ queries.to(acc)
        return grad_query, grad_keys, weights.transpose(-1, -2) @ grad_out
