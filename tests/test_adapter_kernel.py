"""The plan-1 adapter's block kernels (ka_hf/ops/adapted.py, KA-SPEC §3.1) against the token loop: the ops on
random inputs (float64 and float32, GQA, padding, softcap, past, every block size), their gradients and a
gradcheck, then real tiny transformers models through a KACache: one prompt pass = the loop = chunks = decoding
token by token through the same adapter, with padding and batch 2."""

import copy

import pytest
import torch

import ka_hf
from ka_hf.adapters import KAAdapter
from ka_hf.ops import ka_attention_adapted, ka_attention_mapped, ka_attention_naive

from conftest import VOCAB, tiny_model

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def random_inputs(dtype=torch.float64, batch=2, query_heads=4, kv_heads=2, n_new=13, n_past=5, dim=6, pads=7, seed=0):
    """q, k, v, mapped past outputs, M, b and a mask: batch row 1 left-padded (its first `pads` slots masked), so
    some of its rows may attend to nothing."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    query, key = randn(batch, query_heads, n_new, dim), randn(batch, kv_heads, n_past + n_new, dim) * 2
    value, past = randn(batch, kv_heads, n_new, dim), randn(batch, query_heads, n_past, dim)
    weight = torch.eye(dim, dtype=dtype) + 0.4 * randn(query_heads, dim, dim) / dim**0.5
    bias = 0.5 * randn(query_heads, dim)
    allowed = torch.ones(batch, 1, n_new, n_past + n_new, dtype=torch.bool).tril(n_past)
    allowed[1, :, :, :pads] = False
    return query, key, value, past, weight, bias, allowed


def affine(weight, bias):
    return lambda outputs: outputs @ weight + bias[:, None, :]


def loop(query, key, value, past, weight, bias, allowed, **options):
    return ka_attention_naive(
        query, key, value, past_outputs=past, allowed=allowed, value_map=affine(weight, bias), **options
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block_size", [1, 3, 4, 32, None])
@pytest.mark.parametrize("fused", [None, False])
def test_affine_kernel_equals_the_token_loop(dtype, block_size, fused):
    query, key, value, past, weight, bias, allowed = random_inputs(dtype)
    expected = loop(query, key, value, past, weight, bias, allowed, scale=0.6)
    outputs = ka_attention_adapted(
        query, key, value, weight, bias, past, allowed, scale=0.6, block_size=block_size, fused=fused
    )
    torch.testing.assert_close(outputs, expected, rtol=0, atol=TOLERANCE[dtype])
    assert outputs[1, :, 0].abs().max() == 0  # a row with nothing allowed: 0, never NaN
    plain = ka_attention_naive(query, key, value, past_outputs=past, allowed=allowed, scale=0.6)
    assert (outputs - plain).abs().max() > 0.1  # the map matters here


@pytest.mark.parametrize("n_past", [0, 4])
def test_affine_kernel_causal_mha_softcap(n_past):
    """No mask (causal), multi-head, softcapped scores (the explicit past tiles), with and without a past."""
    query, key, value, past, weight, bias, _ = random_inputs(query_heads=3, kv_heads=3, n_past=n_past)
    past = past if n_past else None
    expected = loop(query, key, value, past, weight, bias, None, scale=0.5, softcap=2.0)
    outputs = ka_attention_adapted(query, key, value, weight, bias, past, None, scale=0.5, softcap=2.0, block_size=4)
    torch.testing.assert_close(outputs, expected, rtol=0, atol=1e-10)


def test_affine_kernel_gradients_equal_the_loop():
    inputs = [tensor.requires_grad_() for tensor in random_inputs()[:6]]
    allowed = random_inputs()[6]
    grad = torch.randn(2, 4, 13, 6, dtype=torch.float64)
    fast = torch.autograd.grad(
        (ka_attention_adapted(*inputs[:3], *inputs[4:], inputs[3], allowed, scale=0.6, block_size=4) * grad).sum(),
        inputs,
    )
    reference = torch.autograd.grad((loop(*inputs, allowed, scale=0.6) * grad).sum(), inputs)
    for name, got, expected in zip(("query", "key", "value", "past", "weight", "bias"), fast, reference):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10, msg=name)


def test_affine_kernel_gradcheck():
    query, key, value, past, weight, bias, allowed = random_inputs(n_new=5, n_past=2, dim=3, pads=3)
    tensors = [tensor.requires_grad_() for tensor in (query, key, value, past, weight, bias)]

    def kernel(query, key, value, past, weight, bias):
        return ka_attention_adapted(query, key, value, weight, bias, past, allowed, scale=0.7, block_size=2)

    assert torch.autograd.gradcheck(kernel, tensors)


def mlp_map(dim, seed=1):
    """A nonlinear f, as the residual-MLP adapter's."""
    generator = torch.Generator().manual_seed(seed)
    up, down = (torch.randn(dim, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    return lambda outputs: outputs + torch.tanh(outputs @ up) @ down * 0.3


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("block_size", [1, 4, None])
def test_mapped_kernel_equals_the_token_loop(grad, block_size):
    """Any f: the past through the fused kernel (no autograd) or explicit tiles (autograd), the block's own rows
    token by token; the outputs and the gradients are the loop's."""
    query, key, value, past, _, _, allowed = random_inputs()
    value_map = mlp_map(6)
    inputs = [tensor.clone().requires_grad_(grad) for tensor in (query, key, value, past)]
    with torch.set_grad_enabled(grad):
        outputs = ka_attention_mapped(*inputs[:3], value_map, inputs[3], allowed, scale=0.6, block_size=block_size)
        expected = ka_attention_naive(
            *inputs[:3], past_outputs=inputs[3], allowed=allowed, scale=0.6, value_map=value_map
        )
    torch.testing.assert_close(outputs, expected, rtol=0, atol=1e-10)
    if grad:
        fast = torch.autograd.grad(outputs.sum(), inputs)
        reference = torch.autograd.grad(expected.sum(), inputs)
        for got, want in zip(fast, reference):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_affine_kernel_half_inputs_stay_half(half):
    """Half q, k, v, past: float32 tiles, solves and M, b inside; outputs in the input dtype; gradients finite."""
    query, key, value, past, weight, bias, allowed = random_inputs()
    expected = loop(query, key, value, past, weight, bias, allowed, scale=0.6)
    inputs = [tensor.to(half).requires_grad_() for tensor in (query, key, value, past)]
    outputs = ka_attention_adapted(*inputs[:3], weight, bias, inputs[3], allowed, scale=0.6, block_size=4)
    assert outputs.dtype == half and (outputs.double() - expected).abs().max() < 0.05
    outputs.float().sum().backward()
    assert all(tensor.grad.dtype == half and torch.isfinite(tensor.grad).all() for tensor in inputs)


def test_affine_kernel_refuses_a_map_of_the_wrong_shape():
    query, key, value, past, weight, bias, allowed = random_inputs()
    with pytest.raises(ValueError, match="needs weight"):
        ka_attention_adapted(query, key, value, weight[:2], bias, past, allowed)


# ---------------------------------------------------------------------------------------------------------
# Real tiny models through a KACache


def random_adapter(model, mlp_hidden=0, seed=0) -> KAAdapter:
    """An affine (or affine + MLP) adapter well away from the identity."""
    adapter = KAAdapter.for_model(model, mlp_hidden=mlp_hidden).to(model.dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.weight.add_(0.3 * torch.randn(adapter.weight.shape, generator=generator, dtype=model.dtype))
        adapter.bias.add_(0.2 * torch.randn(adapter.bias.shape, generator=generator, dtype=model.dtype))
        for mlp in adapter.mlp or []:
            mlp.down.weight.normal_(0.0, 0.3, generator=generator)
    return adapter


def padded_batch(length=14, pads=4, seed=3):
    """Two rows, the second left-padded by `pads`; positions as generate() makes them."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :pads] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


@torch.no_grad()
def chunked_logits(model, adapter, chunks, kernel="auto", length=14):
    """Logits of the padded batch fed in chunks of the given sizes through one KACache(adapter=...)."""
    input_ids, attention_mask, position_ids = padded_batch(length)
    cache = ka_hf.KACache(adapter=adapter, kernel=kernel)
    parts, start = [], 0
    for size in chunks:
        stop = start + size
        parts.append(
            model(
                input_ids[:, start:stop],
                attention_mask=attention_mask[:, :stop],
                position_ids=position_ids[:, start:stop],
                cache=cache,
            ).logits
        )
        start = stop
    return torch.cat(parts, dim=1), attention_mask.bool()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch", ["gpt2", "gpt-neox", "llama-gqa", "mistral-sliding"])
def test_prompt_pass_equals_the_loop_and_decoding(arch, dtype):
    model = tiny_model(arch, dtype=dtype, num_layers=2)
    adapter = random_adapter(model)
    prompt, keep = chunked_logits(model, adapter, [14])
    tolerance = TOLERANCE[dtype]
    for kernel, chunks in (("loop", [14]), ("auto", [5, 1, 8]), ("auto", [1] * 14)):
        other, _ = chunked_logits(model, adapter, chunks, kernel)
        torch.testing.assert_close(other[keep], prompt[keep], rtol=0, atol=tolerance, msg=f"{kernel} {chunks}")
    plain, _ = chunked_logits(model, None, [14])
    assert (plain - prompt)[keep].abs().max() > 1e-3  # the adapter changes the logits


@pytest.mark.parametrize("arch", ["gpt-neox", "llama-gqa"])
def test_mlp_adapter_prompt_pass_equals_the_loop(arch):
    model = tiny_model(arch, num_layers=2)
    adapter = random_adapter(model, mlp_hidden=5)
    assert adapter.affine_map(0, (2, adapter.num_heads, 3, adapter.head_dim)) is None
    prompt, keep = chunked_logits(model, adapter, [14])
    for kernel, chunks in (("loop", [14]), ("auto", [6, 1, 7])):
        other, _ = chunked_logits(model, adapter, chunks, kernel)
        torch.testing.assert_close(other[keep], prompt[keep], rtol=0, atol=1e-10)


@pytest.mark.parametrize("mlp_hidden", [0, 4])
def test_distillation_gradients_equal_the_loop(mlp_hidden):
    """The KL's gradient on the adapter (what distillation steps on) through the block kernels = the loop's."""
    model = tiny_model("llama-gqa", num_layers=2).requires_grad_(False)
    input_ids, attention_mask, position_ids = padded_batch()
    grads, first = {}, random_adapter(model, mlp_hidden)
    for kernel in ("auto", "loop"):
        adapter = copy.deepcopy(first)
        cache = ka_hf.KACache(adapter=adapter, kernel=kernel)
        logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache).logits
        (logits[attention_mask.bool()].log_softmax(-1)[:, :7].sum()).backward()
        grads[kernel] = {name: parameter.grad for name, parameter in adapter.named_parameters()}
    for name, grad in grads["loop"].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads["auto"][name], grad, rtol=0, atol=1e-10, msg=name)
