"""torch.compile traces the KA routing: no graph break per attention call (counted with torch._dynamo.explain),
one graph for several lengths with dynamic=True, and a StaticKACache decode step under fullgraph=True — each
equal to eager. The Dynamo-only "eager" backend keeps these fast: what is checked is the tracing."""

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounter

import ka_hf

from conftest import VOCAB, tiny_model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def random_ids(length, batch=2, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch_name", ["gpt2", "gpt-neox", "llama-gqa"])
def test_no_graph_break_in_a_ka_forward(arch_name):
    model = ka_hf.enable_ka(tiny_model(arch_name, dtype=torch.float32))
    with torch.no_grad():
        model(random_ids(5))  # the first call resolves config.ka (Python validation, outside any graph)
        explained = dynamo.explain(lambda ids: model(ids).logits)(random_ids(12))
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        cached = dynamo.explain(lambda ids: model(ids, cache=ka_hf.KACache(), use_cache=True).logits)(random_ids(12))
        assert (cached.graph_count, cached.graph_break_count) == (1, 0), cached.break_reasons


def test_dynamic_shapes_compile_one_graph_for_several_lengths():
    model = ka_hf.enable_ka(tiny_model("llama-gqa", dtype=torch.float32))
    counter = CompileCounter()
    compiled = torch.compile(lambda ids: model(ids).logits, backend=counter, dynamic=True)
    with torch.no_grad():
        model(random_ids(4))
        for length in (9, 13, 30):
            ids = random_ids(length, seed=length)
            torch.testing.assert_close(compiled(ids), model(ids).logits, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_static_cache_decode_compiles_with_fullgraph():
    model = tiny_model("llama-gqa", dtype=torch.float32)
    prompt = random_ids(6, batch=1)
    static = ka_hf.StaticKACache(config=model.config, max_cache_len=16)
    dynamic = ka_hf.KACache()
    with torch.no_grad():
        token = model(prompt, cache=static, use_cache=True).logits[:, -1:].argmax(-1)
        model(prompt, cache=dynamic, use_cache=True)
        step = torch.compile(
            lambda ids, position: model(ids, cache=static, use_cache=True, cache_position=position).logits,
            backend="eager",
            fullgraph=True,
        )
        for index in range(5):
            position = torch.tensor([prompt.shape[1] + index])
            compiled = step(token, position)
            eager = model(token, cache=dynamic, use_cache=True).logits
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
            token = compiled[:, -1:].argmax(-1)
