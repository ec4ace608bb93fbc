"""Routing is per call and per thread: no shared state changes during a call; `uninstall` restores transformers."""

import threading

import pytest
import torch
from transformers import DynamicCache
from transformers.modeling_utils import AttentionInterface

import ka_hf
from ka_hf import KACache, KAError

from conftest import VOCAB, tiny_model


def decode(model, prompt, make_cache, steps=12):
    """Greedy logits of `steps` tokens, one forward per token through the cache `make_cache()` returns."""
    cache = make_cache()
    with torch.no_grad():
        logits = [model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]]
        ids = prompt
        for _ in range(steps):
            ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], dim=-1)
            logits.append(model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("arch_name", ["llama-gqa", "gpt2"])
def test_two_threads_sharing_one_model_get_their_single_threaded_results(arch_name):
    """One thread decodes with a KACache while another uses the same model with a DynamicCache or no cache:
    each gets exactly what it gets alone (under the old routing, which switched the shared config's attention
    implementation during a KA call, the standard thread could run KA)."""
    model = tiny_model(arch_name)
    prompt = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    expected_ka = decode(model, prompt, KACache)
    expected_kv = decode(model, prompt, DynamicCache)
    with torch.no_grad():
        expected_plain = model(ids).logits
    assert (expected_ka - expected_kv).abs().max() > 1e-3  # the two threads really compute different things

    failures, start = [], threading.Barrier(3)

    def repeat(name, compute, expected):
        start.wait()
        for _ in range(15):
            try:
                result = compute()
            except Exception as error:  # noqa: BLE001 (a thread's exception must reach the test)
                failures.append(f"{name}: {type(error).__name__}: {error}")
                return
            if not torch.equal(result, expected):
                failures.append(f"{name}: off by {(result - expected).abs().max():.3g}")
                return

    def plain():
        with torch.no_grad():
            return model(ids).logits

    threads = [
        threading.Thread(target=repeat, args=("KACache", lambda: decode(model, prompt, KACache), expected_ka)),
        threading.Thread(
            target=repeat, args=("DynamicCache", lambda: decode(model, prompt, DynamicCache), expected_kv)
        ),
        threading.Thread(target=repeat, args=("no cache", plain, expected_plain)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures


def test_a_ka_call_changes_no_shared_config():
    model = tiny_model("llama-gqa")
    seen = []
    original = model.model.layers[0].self_attn.forward

    def spy(*args, **kwargs):
        seen.append(model.config._attn_implementation)
        return original(*args, **kwargs)

    model.model.layers[0].self_attn.forward = spy
    with torch.no_grad():
        model(torch.randint(1, VOCAB, (1, 5)), past_key_values=KACache(), use_cache=True)
    assert seen == ["sdpa"]


def test_uninstall_restores_every_original_and_install_routes_again():
    from transformers.generation.utils import GenerationMixin
    from transformers.models.llama.modeling_llama import LlamaAttention

    routed = (LlamaAttention.forward, AttentionInterface.get_interface, GenerationMixin._prepare_cache_for_generation)
    ka_hf.uninstall()
    try:
        assert not hasattr(LlamaAttention.forward, "_ka_hf_routed")
        assert LlamaAttention.forward is not routed[0] and AttentionInterface.get_interface is not routed[1]
        assert GenerationMixin._prepare_cache_for_generation is not routed[2]
        model = tiny_model("llama-gqa")
        with pytest.raises(KAError, match="does not route"), torch.no_grad():
            model(torch.randint(1, VOCAB, (1, 5)), past_key_values=KACache(), use_cache=True)
    finally:
        ka_hf.install()
    assert getattr(LlamaAttention.forward, "_ka_hf_routed", False)
    ka_hf.install()  # idempotent: no double wrapping
    assert LlamaAttention.forward.__wrapped__ is not LlamaAttention.forward
    assert not getattr(LlamaAttention.forward.__wrapped__, "_ka_hf_routed", False)
    with torch.no_grad():
        model(torch.randint(1, VOCAB, (1, 5)), past_key_values=KACache(), use_cache=True)
