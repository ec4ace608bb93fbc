"""The tensor ops against the reference token loop (KA-SPEC §2-3), on fresh random inputs."""

import functools

import pytest
import torch

from ka_hf.ops import (
    attention_weights,
    causal_allowed,
    expand_kv_heads,
    ka_attention,
    ka_attention_blocked,
    ka_attention_naive,
    ka_decode_step,
    standard_attention,
)


def random_qkv(batch=2, n_query_heads=4, n_kv_heads=2, length=11, head_dim=5, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_query_heads, length, head_dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, n_kv_heads, length, head_dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, n_kv_heads, length, head_dim, generator=generator, dtype=dtype)
    return q, k, v


def left_padded(batch, length, pads):
    """Causal mask with pads[b] leading padding tokens in row b (a pad query sees nothing)."""
    allowed = torch.ones(batch, 1, length, length, dtype=torch.bool).tril()
    for row, n_pad in enumerate(pads):
        allowed[row, :, :, :n_pad] = False
        allowed[row, :, :n_pad, :] = False
    return allowed


def scalar_reference(q, k, v, scale):
    """KA-SPEC §2 written with Python scalars for one batch row and MHA: the oracle's oracle."""
    n_heads, length, _ = q.shape
    outputs = torch.zeros_like(v)
    for h in range(n_heads):
        for i in range(length):
            scores = [float(q[h, i] @ k[h, j]) * scale for j in range(i + 1)]
            top = max(scores)
            exps = [pow(2.718281828459045, s - top) for s in scores]
            weights = [e / sum(exps) for e in exps]
            outputs[h, i] = sum(weights[j] * outputs[h, j] for j in range(i)) + weights[i] * v[h, i]
    return outputs


def test_naive_matches_scalar_definition():
    q, k, v = random_qkv(batch=1, n_query_heads=2, n_kv_heads=2, length=6, head_dim=3)
    naive = ka_attention_naive(q, k, v, scale=0.7)[0]
    assert torch.allclose(naive, scalar_reference(q[0], k[0], v[0], 0.7), atol=1e-12)


# The two fast kernels; "loop" (ka_attention_naive) is the reference they are held to.
FAST_KERNELS = ["blocked", "parallel"]


@pytest.mark.parametrize("kernel", FAST_KERNELS)
@pytest.mark.parametrize("n_query_heads,n_kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("block_size", [None, 3, 512])
def test_parallel_equals_loop(n_query_heads, n_kv_heads, block_size, kernel):
    q, k, v = random_qkv(n_query_heads=n_query_heads, n_kv_heads=n_kv_heads, length=13, seed=n_kv_heads)
    reference = ka_attention_naive(q, k, v, scale=0.4)
    parallel = ka_attention(q, k, v, scale=0.4, block_size=block_size, kernel=kernel)
    assert (parallel - reference).abs().max() < 1e-12


@pytest.mark.parametrize("kernel", FAST_KERNELS)
@pytest.mark.parametrize("split", [1, 4, 12])
def test_chunk_with_cached_outputs_equals_whole(split, kernel):
    q, k, v = random_qkv(length=13)
    whole = ka_attention(q, k, v, scale=0.3, kernel=kernel)
    first = ka_attention(q[..., :split, :], k[..., :split, :], v[..., :split, :], scale=0.3, kernel=kernel)
    rest = ka_attention(q[..., split:, :], k, v[..., split:, :], past_outputs=first, scale=0.3, kernel=kernel)
    assert (torch.cat([first, rest], dim=-2) - whole).abs().max() < 1e-12


@pytest.mark.parametrize("kernel", FAST_KERNELS)
def test_token_by_token_equals_whole(kernel):
    q, k, v = random_qkv(length=9)
    outputs = None
    for i in range(9):
        new = ka_attention(
            q[..., i : i + 1, :],
            k[..., : i + 1, :],
            v[..., i : i + 1, :],
            past_outputs=outputs,
            scale=0.5,
            kernel=kernel,
        )
        outputs = new if outputs is None else torch.cat([outputs, new], dim=-2)
    assert (outputs - ka_attention(q, k, v, scale=0.5, kernel=kernel)).abs().max() < 1e-12


@pytest.mark.parametrize("kernel", FAST_KERNELS)
def test_padding_sliding_window_and_softcap(kernel):
    q, k, v = random_qkv(length=12)
    allowed = left_padded(2, 12, pads=[0, 4]) & causal_allowed(12, 12, None, sliding_window=4)
    reference = ka_attention_naive(q, k, v, allowed=allowed, scale=0.6, softcap=2.0)
    parallel = ka_attention(q, k, v, allowed=allowed, scale=0.6, softcap=2.0, block_size=5, kernel=kernel)
    assert (parallel - reference).abs().max() < 1e-12
    assert torch.isfinite(parallel).all()
    assert parallel[1, :, :4].abs().max() == 0  # fully masked (pad) queries output exactly 0


@pytest.mark.parametrize("kernel", FAST_KERNELS)
def test_fully_masked_rows_have_finite_gradients(kernel):
    q, k, v = (t.requires_grad_() for t in random_qkv(length=8))
    allowed = left_padded(2, 8, pads=[3, 8])  # row 1 is all padding
    ka_attention(q, k, v, allowed=allowed, scale=0.5, block_size=3, kernel=kernel).square().sum().backward()
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()
        assert tensor.grad[1].abs().max() == 0  # nothing in the all-padding row reaches the loss


@pytest.mark.parametrize("kernel", FAST_KERNELS)
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_gradcheck_parallel_form(kernel, softcap):
    q, k, v = random_qkv(batch=1, n_query_heads=4, n_kv_heads=2, length=7, head_dim=3)
    allowed = left_padded(1, 7, pads=[1])
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: ka_attention(q, k, v, allowed=allowed, scale=0.5, softcap=softcap, block_size=3, kernel=kernel),
        inputs,
    )


@pytest.mark.parametrize("kernel", FAST_KERNELS)
def test_gradients_match_the_loop(kernel):
    q, k, v = random_qkv(length=10)
    weights_out = torch.randn(2, 4, 10, 5, dtype=torch.float64)
    grads = []
    for op in (functools.partial(ka_attention, kernel=kernel, block_size=4), ka_attention_naive):
        inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
        (op(*inputs, scale=0.5) * weights_out).sum().backward()
        grads.append([t.grad for t in inputs])
    for parallel_grad, loop_grad in zip(*grads):
        assert (parallel_grad - loop_grad).abs().max() < 1e-11


@pytest.mark.parametrize("kernel", FAST_KERNELS)
def test_float32_and_half_dtypes(kernel):
    q, k, v = random_qkv(length=16)
    reference = ka_attention_naive(q, k, v, scale=0.4)
    single = ka_attention(q.float(), k.float(), v.float(), scale=0.4, kernel=kernel)
    assert single.dtype == torch.float32 and (single.double() - reference).abs().max() < 1e-5
    for half in (torch.float16, torch.bfloat16):
        result = ka_attention(q.to(half), k.to(half), v.to(half), scale=0.4, kernel=kernel)
        assert result.dtype == half
        assert (result.double() - reference).abs().max() < 0.05


@pytest.mark.parametrize("kernel", FAST_KERNELS)
def test_blocked_long_prompt_equals_single_solve(kernel):
    q, k, v = random_qkv(batch=1, n_query_heads=2, n_kv_heads=1, length=300, head_dim=4, dtype=torch.float32)
    blocks = ka_attention(q, k, v, scale=0.5, block_size=64, kernel=kernel)
    assert (blocks - ka_attention(q, k, v, scale=0.5, block_size=None, kernel=kernel)).abs().max() < 1e-5


def test_auto_shortens_the_blocks_of_a_short_chunk():
    from ka_hf.ops.kernels import auto_block_size

    assert [auto_block_size(n, 256) for n in (1, 64, 512, 513, 1024, 1025, 8192)] == [64, 64, 64, 128, 128, 256, 256]
    assert auto_block_size(100, 32) == 32 and auto_block_size(100, None) == 64 and auto_block_size(5000, None) is None
    q, k, v = random_qkv(batch=2, length=150, head_dim=4)
    allowed = left_padded(2, 150, [0, 70])  # row 1's padding covers the first block and part of the second
    auto = ka_attention(q, k, v, allowed=allowed, scale=0.5, kernel="auto")
    torch.testing.assert_close(auto, ka_attention_naive(q, k, v, allowed=allowed, scale=0.5), rtol=0, atol=1e-10)
    assert torch.equal(auto, ka_attention_blocked(q, k, v, allowed=allowed, scale=0.5, block_size=64))


def test_kernel_options_are_checked():
    q, k, v = random_qkv(length=4)
    with pytest.raises(ValueError, match="unknown KA kernel"):
        ka_attention(q, k, v, kernel="flash")
    with pytest.raises(ValueError, match="exact KA only"):
        ka_attention(q, k, v, variant="plan2", kernel="blocked")
    with pytest.raises(ValueError, match="block_size"):
        ka_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="dropout"):
        ka_attention(q, k, v, dropout_p=0.1, kernel="blocked")


def test_plan2_collapses_to_first_value():
    q, k, v = random_qkv(length=9)
    allowed = left_padded(2, 9, pads=[0, 3])
    outputs = ka_attention(q, k, v, allowed=allowed, scale=0.5, variant="plan2")
    assert (outputs - ka_attention_naive(q, k, v, allowed=allowed, scale=0.5, variant="plan2")).abs().max() < 1e-12
    first_values = v.repeat_interleave(2, dim=1)
    assert torch.allclose(outputs[0], first_values[0, :, :1].expand(-1, 9, -1), atol=1e-12)
    assert torch.allclose(outputs[1, :, 3:], first_values[1, :, 3:4].expand(-1, 6, -1), atol=1e-12)


def test_standard_attention_matches_sdpa():
    q, k, v = random_qkv(length=7)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.5
    )
    assert (standard_attention(q, k, v, scale=0.5) - expected).abs().max() < 1e-12


def test_weights_rows_sum_to_one_or_zero():
    q, k, _ = random_qkv(length=6)
    weights = attention_weights(q, k, left_padded(2, 6, pads=[2, 0]), scale=1.0)
    sums = weights.sum(-1)
    assert torch.allclose(sums[0, :, 2:], torch.ones_like(sums[0, :, 2:])) and sums[0, :, :2].abs().max() == 0


@pytest.mark.parametrize("n_query_heads,n_kv_heads,softcap", [(4, 4, None), (4, 2, None), (6, 2, None), (4, 4, 1.5)])
def test_decode_step_equals_the_loop(n_query_heads, n_kv_heads, softcap):
    """The decode fast path (fused SDPA for MHA, grouped form for GQA/softcap) against the reference loop."""
    q, k, v = random_qkv(n_query_heads=n_query_heads, n_kv_heads=n_kv_heads, length=8)
    for allowed in (None, left_padded(2, 8, pads=[0, 3])):
        reference = ka_attention_naive(q, k, v, allowed=allowed, scale=0.5, softcap=softcap)
        attended = torch.cat([reference[..., :-1, :], expand_kv_heads(v, n_query_heads)[..., -1:, :]], dim=-2)
        last_row = None if allowed is None else allowed[..., -1:, :]
        step = ka_decode_step(q[..., -1:, :], k, attended, last_row, scale=0.5, softcap=softcap)
        assert (step - reference[..., -1:, :]).abs().max() < 1e-12
