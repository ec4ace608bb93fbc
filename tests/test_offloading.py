"""KACache(offloading=True), as DynamicCache(offloading=True): each layer's K and A live on the CPU except while
its attention runs; the next layer is brought back ahead of time. Equal results everywhere; the moves themselves
are checked on CPU and meta here, and on CUDA where one is at hand."""

import pytest
import torch

import ka_hf
from ka_hf import KACache, KALayer, KVWindowCache

from conftest import VOCAB, tiny_model

SETTINGS = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def random_ids(batch=2, length=7, seed=1, device="cpu"):
    ids = torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(device)


@pytest.mark.parametrize(
    "arch_name, options",
    [
        ("gpt2", {}),
        ("llama-gqa", dict(ka_layers=[0, 2])),  # the KV layer in between is offloaded at once
        ("mistral-sliding", {}),  # the model's own window layers
        ("gpt-neox", dict(window=5, sink=1)),
    ],
)
def test_offloaded_generate_equals_resident(arch_name, options):
    model = tiny_model(arch_name)
    prompt = random_ids()
    for extra in (dict(max_new_tokens=12), dict(max_new_tokens=6, num_beams=3, num_return_sequences=2)):
        resident = model.generate(prompt, cache=KACache(**options), **extra, **SETTINGS)
        offloaded = model.generate(prompt, cache=KACache(offloading=True, **options), **extra, **SETTINGS)
        assert torch.equal(offloaded, resident), extra
    kv_window = model.generate(prompt, cache=KVWindowCache(6, 1), max_new_tokens=8, **SETTINGS)
    assert torch.equal(
        model.generate(prompt, cache=KVWindowCache(6, 1, offloading=True), max_new_tokens=8, **SETTINGS), kv_window
    )


def record_calls(cache, names, events):
    """Wrap the named methods of every layer of `cache` so each call appends (name, layer index) to `events`."""
    for index, layer in enumerate(cache.layers):
        for name in names:
            if not hasattr(layer, name):
                continue
            method = getattr(layer, name)

            def recorded(*args, _method=method, _event=(name, index), **kwargs):
                events.append(_event)
                return _method(*args, **kwargs)

            setattr(layer, name, recorded)


def test_a_ka_layer_leaves_only_after_its_outputs_are_stored():
    """The order Cache.update keeps for K, V, extended to A: the next layer is prefetched before this layer's
    update, and a KA layer is offloaded once its attention has written A (a KV layer right after its update)."""
    model = tiny_model("llama-gqa")
    cache = KACache(config=model.config, ka_layers=[0, 2], offloading=True)
    events = []
    record_calls(cache, ("update", "prefetch", "offload", "store_outputs"), events)
    with torch.no_grad():
        model(random_ids(), cache=cache, use_cache=True)
    assert events == [
        ("prefetch", 1), ("update", 0), ("store_outputs", 0), ("offload", 0),
        ("prefetch", 2), ("update", 1), ("offload", 1),
        ("prefetch", 0), ("update", 2), ("store_outputs", 2), ("offload", 2),
    ]  # fmt: skip


def test_window_layers_count_as_sliding_for_offload_only_non_sliding():
    model = tiny_model("mistral-sliding")  # every layer has the model's own window: KAWindowLayer
    for only_non_sliding, expected in ((True, []), (False, [("offload", 0), ("offload", 1), ("offload", 2)])):
        cache = KACache(config=model.config, offloading=True, offload_only_non_sliding=only_non_sliding)
        events = []
        record_calls(cache, ("offload",), events)
        with torch.no_grad():
            model(random_ids(), cache=cache, use_cache=True)
        assert cache.is_sliding == [True] * 3 and events == expected


def test_a_layer_moves_keys_outputs_and_spare_rows_together():
    """Offload then prefetch, on a layer whose home is the meta device (no GPU here): K, A and the buffers they
    grow in travel together, so the next decode step still appends in place and A's write-back lands there."""
    layer = KALayer(num_query_heads=4)
    keys, values = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    layer.update(keys, values)
    layer.store_outputs(torch.randn(1, 4, 5, 8))
    layer.update(keys[..., :1, :], values[..., :1, :])  # a decode step: the buffers now have spare rows
    layer.store_outputs(torch.randn(1, 4, 1, 8))
    outputs = layer.values.clone()
    layer.offload()
    assert layer.keys.device.type == layer.values.device.type == "cpu"
    assert layer.values.data_ptr() == layer._value_buffer.data_ptr() and torch.equal(layer.values, outputs)

    layer.device = torch.device("meta")
    layer.prefetch()
    moved = (layer.keys, layer.values, layer._key_buffer, layer._value_buffer)
    assert {tensor.device.type for tensor in moved} == {"meta"}
    assert layer._value_buffer.shape[-2] > layer.values.shape[-2] == 6  # the spare rows came along
    layer.update(keys[..., :1, :].to("meta"), values[..., :1, :].to("meta"))
    layer.store_outputs(torch.empty(1, 4, 1, 8, device="meta"))
    assert layer.values.device.type == "meta" and layer.values.shape == (1, 4, 7, 8)


def test_generate_with_cache_implementation_offloaded_on_a_ka_model():
    """generate(cache_implementation="offloaded") on a KA-configured model gets an offloading KACache."""
    model = ka_hf.enable_ka(tiny_model("gpt-neox"))
    prompt = random_ids()
    out = model.generate(
        prompt, cache_implementation="offloaded", max_new_tokens=6, return_dict_in_generate=True, **SETTINGS
    )
    assert isinstance(out.cache, KACache) and out.cache.offloading and len(out.cache) == 3
    assert torch.equal(out.sequences, model.generate(prompt, cache=KACache(), max_new_tokens=6, **SETTINGS))
    with pytest.raises(ka_hf.KAError, match="cache_implementation='quantized'"):
        model.generate(prompt, cache_implementation="quantized", max_new_tokens=2, **SETTINGS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch_name", ["llama-gqa", "mistral-sliding"])
def test_offloading_on_cuda_keeps_layers_on_the_cpu(arch_name):
    model = tiny_model(arch_name, dtype=torch.float32).to("cuda")
    prompt = random_ids(device="cuda")
    resident = model.generate(prompt, cache=KACache(), max_new_tokens=10, **SETTINGS)
    cache = KACache(config=model.config, offloading=True)
    offloaded = model.generate(prompt, cache=cache, max_new_tokens=10, **SETTINGS)
    assert torch.equal(offloaded, resident)
    # after a step every layer is on the CPU but the first, which was prefetched for the next step
    assert [layer.keys.device.type for layer in cache.layers] == ["cuda"] + ["cpu"] * (len(cache.layers) - 1)
    assert [layer.values.device.type for layer in cache.layers] == ["cuda"] + ["cpu"] * (len(cache.layers) - 1)
