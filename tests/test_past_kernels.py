"""The blocked kernel's past kernels (ka_hf/ops/past.py): every one against the reference loop, on CPU.

The CUDA kernels cannot run here, so they are checked two ways:
- their call sites against torch's own declaration of the ops: the whole blocked forward and backward on `meta`
  tensors, which runs each op's schema and torch's meta kernels (shapes, dtypes, argument order);
- their numerics through CPU stand-ins registered for the two CUDA ops (`emulated_cuda_ops`), written from the
  ops' CUDA sources in torch: the efficient kernel's log-sum-exp padded to 32 rows, its 4-D bias with 16-aligned
  rows in the query's dtype, its backward reading `out` in the (B, n, H, d) layout and a padded L; FlashAttention's
  unpadded contiguous L and no mask. A stand-in refuses what the CUDA kernel would refuse or misread, so a call
  site that slices, pads or lays out a tensor wrongly fails here. On a GPU, benchmarks/gpu_check.py runs the real
  ones against the float64 oracle.
"""

import math

import pytest
import torch
from test_long import padded_window_mask, random_inputs

from ka_hf.ops import ka_attention_blocked, ka_attention_naive, standard_attention
from ka_hf.ops.past import PAST_KERNELS, choose_past_kernel, past_kernel
from ka_hf.study.measure import relative_rmse

# ---------------------------------------------------------------------------------------------------------
# CPU stand-ins for the CUDA ops, from their contracts


def _attention_with_lse(query, key, value, bias, scale):
    scores = query.double() @ key.double().transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.double()
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    return weights @ value.double(), lse


def _attention_backward(grad_out, query, key, value, bias, out, lse, scale):
    """Flash attention's backward: P = exp(S + bias - L), dS = P (dO V^T - D), D = rowsum(dO * out)."""
    grad_out, query, key, value, out = (t.double() for t in (grad_out, query, key, value, out))
    scores = query @ key.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.double()
    weights = torch.exp(scores - lse.double().unsqueeze(-1))
    grad_scores = weights * (grad_out @ value.transpose(-1, -2) - (grad_out * out).sum(-1, keepdim=True))
    return (
        scale * grad_scores @ key,
        scale * grad_scores.transpose(-1, -2) @ query,
        weights.transpose(-1, -2) @ grad_out,
    )


def _bmhk(tensor):
    """The (B, H, n, d) view of a tensor laid out as (B, n, H, d), as the CUDA kernels return their outputs."""
    return tensor.transpose(1, 2).contiguous().transpose(1, 2)


def _lse_dtype(dtype):
    return dtype if dtype == torch.float64 else torch.float32  # the kernels' L is float32; float64 for exact tests


def _check_bias(bias, query, key):
    if bias is None:
        return
    assert bias.dim() == 4 and bias.dtype == query.dtype, "bias: 4-D, in the query's dtype"
    assert bias.shape == (query.shape[0], query.shape[1], query.shape[2], key.shape[2]), "bias shape (B, H, n, P)"
    assert bias.stride(-1) == 1 and bias.stride(2) % 16 == 0, "bias rows: contiguous and 16-aligned"


def efficient_forward(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, scale=None):
    _check_bias(attn_bias, query, key)
    assert compute_log_sumexp and dropout_p == 0.0 and not is_causal
    out, lse = _attention_with_lse(query, key, value, attn_bias, scale)
    n = query.shape[2]
    padded = torch.full((*lse.shape[:-1], math.ceil(n / 32) * 32), float("inf"), dtype=_lse_dtype(query.dtype))
    padded[..., :n] = lse  # the rows past n are garbage: a caller that does not slice reads inf
    seed = torch.empty((), dtype=torch.int64)
    return _bmhk(out.to(query.dtype)), padded, seed, seed.clone()


def efficient_backward(
    grad_out,
    query,
    key,
    value,
    attn_bias,
    out,
    logsumexp,
    seed,
    offset,
    dropout_p,
    grad_input_mask,
    causal=False,
    scale=None,
):
    _check_bias(attn_bias, query, key)
    n = query.shape[2]
    assert logsumexp.shape[-1] == math.ceil(n / 32) * 32 and logsumexp.stride(1) % 8 == 0, "L padded to 32 rows"
    assert out.transpose(1, 2).is_contiguous(), "out must have the forward's (B, n, H, d) layout (o_strideM)"
    assert list(grad_input_mask) == [True, True, True, False] and dropout_p == 0.0 and not causal
    grads = _attention_backward(grad_out, query, key, value, attn_bias, out, logsumexp[..., :n], scale)
    return (*(g.to(query.dtype) for g in grads), torch.empty(0))


def flash_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, scale=None):
    assert dropout_p == 0.0 and not is_causal and not return_debug_mask
    assert query.shape[-1] % 8 == 0 and query.shape[-1] == value.shape[-1]
    out, lse = _attention_with_lse(query, key, value, None, scale)
    rng = torch.empty(2, dtype=torch.int64)
    empty = torch.empty(0)
    return _bmhk(out.to(query.dtype)), lse.to(_lse_dtype(query.dtype)), empty, empty, 0, 0, rng, empty, empty


def flash_backward(
    grad_out, query, key, value, out, logsumexp, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, seed, offset, scale
):
    assert cum_q is None and cum_k is None and dropout_p == 0.0 and not is_causal
    assert logsumexp.shape == query.shape[:3] and logsumexp.is_contiguous(), "L: contiguous (B, H, n)"
    assert max_q == query.shape[2] and max_k == key.shape[2]
    grads = _attention_backward(grad_out, query, key, value, None, out, logsumexp, scale)
    return tuple(g.to(query.dtype) for g in grads)


@pytest.fixture(scope="module")
def emulated_cuda_ops():
    library = torch.library.Library("aten", "IMPL")
    library.impl("_scaled_dot_product_efficient_attention", efficient_forward, "CPU")
    library.impl("_scaled_dot_product_efficient_attention_backward", efficient_backward, "CPU")
    library.impl("_scaled_dot_product_flash_attention", flash_forward, "CPU")
    library.impl("_scaled_dot_product_flash_attention_backward", flash_backward, "CPU")
    yield
    library._destroy()


# ---------------------------------------------------------------------------------------------------------
# Every past kernel: values and gradients equal autograd through the loop (float64)

KERNEL_CASES = [
    ("cpu-flash", True),
    ("tiles", True),
    ("cuda-efficient", True),
    ("cuda-efficient", False),
    ("cuda-flash", False),  # FlashAttention takes no mask: plain causal only
]


@pytest.mark.parametrize("kernel, masked", KERNEL_CASES)
def test_each_past_kernel_gives_exact_ka_values_and_gradients(emulated_cuda_ops, kernel, masked):
    length, n_past = 150, 13
    inputs = random_inputs(length, n_past=n_past, seed=3, head_dim=8)
    allowed = padded_window_mask(2, length, n_past + length, pads=[0, 21], window=70, sink=2) if masked else None
    upstream = torch.randn(2, 4, length, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads, values = [], []
    for run in (
        lambda q, k, v, p: ka_attention_naive(q, k, v, past_outputs=p, allowed=allowed, scale=0.3),
        lambda q, k, v, p: ka_attention_blocked(
            q, k, v, past_outputs=p, allowed=allowed, scale=0.3, block_size=40, fused=kernel
        ),
    ):
        leaves = [t.clone().requires_grad_() for t in inputs]
        outputs = run(*leaves)
        (outputs * upstream).sum().backward()
        values.append(outputs)
        grads.append([t.grad for t in leaves])
    assert (values[1] - values[0]).abs().max() < 1e-10
    for name, loop_grad, blocked_grad in zip(("query", "key", "value", "past outputs"), *grads):
        assert (blocked_grad - loop_grad).abs().max() < 1e-10, name


def test_the_stand_ins_refuse_what_the_cuda_kernels_misread(emulated_cuda_ops):
    """The checks above can fail: an unsliced L, an unpadded L and a plainly laid-out `out` are refused."""
    q, k, v, _ = random_inputs(40, n_query_heads=2, n_kv_heads=2, head_dim=8)
    out, padded, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=0.5)
    assert padded.shape[-1] == 64 and torch.isinf(padded[..., 40:]).all()  # why the kernel's L must be sliced
    mask = [True, True, True, False]
    backward = torch.ops.aten._scaled_dot_product_efficient_attention_backward
    with pytest.raises(AssertionError, match="padded"):
        backward(out, q, k, v, None, out, padded[..., :40].contiguous(), seed, offset, 0.0, mask, False, scale=0.5)
    with pytest.raises(AssertionError, match="layout"):
        backward(out, q, k, v, None, out.contiguous(), padded, seed, offset, 0.0, mask, False, scale=0.5)
    kernel = past_kernel("cuda-efficient", scale=0.5)
    grads = kernel.backward(out, q, k, v, out.contiguous(), padded[..., :40], None)  # the call site fixes both
    assert all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------------------
# The CUDA call sites against torch's declarations of the ops (meta tensors: schemas and meta kernels)


@pytest.mark.parametrize("kernel, masked", [("cuda-efficient", True), ("cuda-efficient", False), ("cuda-flash", False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_call_sites_fit_the_ops_declared_signatures(kernel, masked, dtype):
    batch, n_query_heads, n_kv_heads, length, n_past, head_dim = 2, 8, 2, 100, 30, 64
    meta = dict(device="meta", dtype=dtype)
    q = torch.empty(batch, n_query_heads, length, head_dim, **meta, requires_grad=True)
    k = torch.empty(batch, n_kv_heads, n_past + length, head_dim, **meta, requires_grad=True)
    v = torch.empty(batch, n_kv_heads, length, head_dim, **meta, requires_grad=True)
    past = torch.empty(batch, n_query_heads, n_past, head_dim, **meta, requires_grad=True)
    allowed = torch.ones(batch, 1, length, n_past + length, dtype=torch.bool, device="meta") if masked else None
    outputs = ka_attention_blocked(
        q, k, v, past_outputs=past, allowed=allowed, scale=0.125, block_size=32, fused=kernel
    )
    assert outputs.shape == (batch, n_query_heads, length, head_dim) and outputs.dtype == dtype
    outputs.backward(torch.empty_like(outputs))
    for leaf in (q, k, v, past):
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == dtype  # gradients in the parameter dtype


# ---------------------------------------------------------------------------------------------------------
# The one place the past kernel is chosen


def test_the_past_kernel_is_chosen_by_device_dtype_mask_and_softcap():
    bf16, fp32, fp64 = torch.bfloat16, torch.float32, torch.float64
    cases = {
        ("cpu", bf16, True, None, 64, 64): "cpu-flash",
        ("cpu", fp64, False, None, 64, 64): "cpu-flash",
        ("cpu", fp32, False, None, 64, 32): "tiles",  # the CPU kernel needs equal key and value sizes
        ("cpu", fp32, False, 30.0, 64, 64): "tiles",  # softcapping: only the tiles
        ("cuda", bf16, False, None, 64, 64): "cuda-flash",
        ("cuda", torch.float16, False, None, 128, 128): "cuda-flash",
        ("cuda", bf16, True, None, 64, 64): "cuda-efficient",  # a mask (padding, windows): the efficient kernel
        ("cuda", fp32, False, None, 64, 64): "cuda-efficient",
        ("cuda", bf16, False, None, 512, 512): "cuda-efficient",  # FlashAttention: head size <= 256
        ("cuda", bf16, True, None, 60, 60): "tiles",  # rows of 60 bf16 are not 16-byte aligned
        ("cuda", fp64, False, None, 64, 64): "tiles",
        ("cuda", bf16, False, 50.0, 64, 64): "tiles",
        ("mps", fp32, False, None, 64, 64): "tiles",
    }
    for arguments, expected in cases.items():
        assert choose_past_kernel(*arguments) == expected, arguments
    assert set(cases.values()) == set(PAST_KERNELS)
    with pytest.raises(ValueError, match="softcap"):
        past_kernel("cuda-efficient", scale=1.0, softcap=30.0)
    q, k, v, _ = random_inputs(10, head_dim=8)
    with pytest.raises(ValueError, match="no fused past kernel"):
        ka_attention_blocked(q, k, v, scale=0.3, softcap=5.0, fused=True)
    with pytest.raises(ValueError, match="fused must be"):
        ka_attention_blocked(q, k, v, scale=0.3, fused="flex")


# ---------------------------------------------------------------------------------------------------------
# Half precision: native tiles, float32 solves, no whole-tensor float32 copies


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", ["cpu-flash", "tiles"])
def test_half_inputs_stay_close_to_float64_values_and_gradients(dtype, kernel):
    """As close to float64 as standard attention gets in the same dtype (the issue's bound: 1.5x its error), in
    fla's relative-RMSE measure; gradients come back in the input dtype."""
    length, n_past = 300, 20
    inputs = random_inputs(length, n_past=n_past, seed=5, head_dim=16)
    allowed = padded_window_mask(2, length, n_past + length, pads=[0, 17])
    upstream = torch.randn(2, 4, length, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def run(tensors):
        leaves = [t.clone().requires_grad_() for t in tensors]
        outputs = ka_attention_blocked(*leaves[:3], past_outputs=leaves[3], allowed=allowed, scale=0.25, fused=kernel)
        (outputs * upstream.to(outputs.dtype)).sum().backward()
        return outputs, [t.grad for t in leaves]

    exact, exact_grads = run(inputs)
    half, half_grads = run([t.to(dtype) for t in inputs])
    assert half.dtype == dtype and all(g.dtype == dtype for g in half_grads)
    q, k, v = inputs[0], inputs[1][..., n_past:, :], inputs[2]  # standard attention over the new tokens alone
    own = allowed[..., n_past:]
    exact_standard = standard_attention(q, k, v, allowed=own, scale=0.25)
    standard = standard_attention(q.to(dtype), k.to(dtype), v.to(dtype), allowed=own, scale=0.25)
    standard_error = relative_rmse(standard, exact_standard)
    assert relative_rmse(half, exact) < 1.5 * standard_error  # measured: 0.7-0.8x standard attention's own error
    for name, grad, exact_grad in zip(("query", "key", "value", "past"), half_grads, exact_grads):
        assert relative_rmse(grad, exact_grad) < torch.finfo(dtype).eps, name  # measured: 0.35-0.7 eps


def test_a_half_forward_makes_no_whole_tensor_float32_copy():
    """Every float32 tensor made during a bf16 forward is a per-block tile or a per-row normalizer: none has the
    whole sequence (T rows) of a head-sized dimension, as a float32 copy of q, k, v or A would."""
    from torch.utils._python_dispatch import TorchDispatchMode

    length, n_past, head_dim = 600, 40, 16
    q, k, v, past = (t.to(torch.bfloat16) for t in random_inputs(length, n_past=n_past, head_dim=head_dim))
    whole_rows = {length, n_past + length, n_past}

    class Float32Shapes(TorchDispatchMode):
        shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for tensor in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.dim() >= 2:
                    self.shapes.append(tuple(tensor.shape))
            return result

    with Float32Shapes() as recorder:
        ka_attention_blocked(q, k, v, past_outputs=past, scale=0.25, block_size=128)
    assert recorder.shapes  # the tiles and solves are float32
    copies = [s for s in recorder.shapes if s[-1] == head_dim and s[-2] in whole_rows]
    assert not copies, copies
