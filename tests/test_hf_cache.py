"""KACache on the transformers Cache contract (issue "HF-native"): construction from a config, HF's `layers=`, the
`update` signature, and each DynamicCache method (get_mask_sizes, crop, reorder_cache, batch_repeat_interleave,
batch_select_indices, reset, is_compileable) held to DynamicCache and to KA computed without the method."""

import inspect

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from ka_hf import KACache, KAError, KALayer, KAWindowLayer, exact_ka

from conftest import VOCAB, tiny_model

SETTINGS = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def random_ids(batch=2, length=9, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def forward(model, input_ids, cache):
    with torch.no_grad():
        return model(input_ids, cache=cache, use_cache=True).logits


def uncached_ka(model, input_ids):
    with torch.no_grad(), exact_ka(model, kernel="loop"):
        return model(input_ids).logits


# ---------------------------------------------------------------------------------------------------------
# Construction


def test_config_builds_every_layer_up_front_like_dynamic_cache():
    """Qwen2 with its own window (4) on layers 1 and 2: KA layers, window layers for the model's sliding layers,
    KV layers outside ka_layers — all there before the first forward, one per layer as in DynamicCache."""
    model = tiny_model("qwen2-gqa", sliding_window=4, max_window_layers=1)
    cache = KACache(config=model.config)
    assert len(cache) == len(DynamicCache(config=model.config)) == 3
    assert [type(layer) for layer in cache.layers] == [KALayer, KAWindowLayer, KAWindowLayer]
    assert [getattr(layer, "window", None) for layer in cache.layers] == [None, 4, 4]
    assert all(layer.num_query_heads == 4 for layer in cache.layers)
    subset = KACache(model.config, ka_layers=[1])
    assert [type(layer) for layer in subset.layers] == [DynamicLayer, KAWindowLayer, DynamicLayer]

    input_ids = random_ids(length=11)
    built = model.generate(input_ids, cache=KACache(config=model.config), max_new_tokens=6, **SETTINGS)
    lazy = model.generate(input_ids, cache=KACache(), max_new_tokens=6, **SETTINGS)
    assert torch.equal(built, lazy)
    with torch.no_grad(), exact_ka(model, kernel="loop"):
        assert torch.equal(model(built).logits[:, 10:-1].argmax(-1), built[:, 11:])


def test_a_cache_built_for_one_config_refuses_another_model():
    cache = KACache(config=tiny_model("gpt2").config)
    with pytest.raises(KAError, match="another model"):
        forward(tiny_model("gpt2", num_layers=2), random_ids(), cache)
    with pytest.raises(KAError, match="ka_layers=.*names layers \\[5\\]"):
        KACache(config=tiny_model("gpt2").config, ka_layers=[5])


def test_layers_takes_layer_objects_as_in_hf():
    model = tiny_model("llama-gqa")
    input_ids = random_ids()
    given = KACache(layers=[KALayer(), DynamicLayer(), KALayer()])  # GQA: the KA layers learn 4 query heads
    assert given.ka_layers == {0, 2}
    assert (forward(model, input_ids, given) - forward(model, input_ids, KACache(ka_layers=[0, 2]))).abs().max() == 0
    with pytest.raises(KAError, match=r"layer objects .* got \['int'\]; to choose .*ka_layers="):
        KACache(layers=[0, 2])
    with pytest.raises(KAError, match="layer objects"):
        KACache(layers=["0"])
    with pytest.raises(KAError, match="not both"):
        KACache(layers=[KALayer()], ka_layers=[0])
    with pytest.raises(KAError, match="one per layer"):
        forward(model, input_ids, KACache(layers=[KALayer(), KALayer()]))


def test_update_has_hfs_signature_and_layers_accept_hfs_extra_arguments():
    assert list(inspect.signature(KACache.update).parameters) == list(inspect.signature(Cache.update).parameters)
    keys, values = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    for extra_args, extra_kwargs in (((), {}), (({"cache_position": None},), {}), ((), {"cache_kwargs": None})):
        layer = KALayer(num_query_heads=2)
        out_keys, out_values = layer.update(keys, values, *extra_args, **extra_kwargs)
        assert torch.equal(out_keys, keys) and torch.equal(out_values, values)  # placeholders: the new values
    with pytest.raises(KAError, match="does not route"):  # the cache itself only takes updates from KA attention
        KACache().update(keys, values, 0, {"cache_position": None})


# ---------------------------------------------------------------------------------------------------------
# The DynamicCache methods, each against DynamicCache and against KA computed without it


@pytest.mark.parametrize("arch_name", ["gpt2", "llama-gqa", "qwen2-gqa"])
def test_get_mask_sizes_equal_dynamic_cache(arch_name):
    model = tiny_model(arch_name)
    input_ids = random_ids()
    ka, kv = KACache(config=model.config), DynamicCache(config=model.config)
    for cache in (ka, kv):
        assert [cache.get_mask_sizes(4, i) for i in range(3)] == [(4, 0)] * 3
    forward(model, input_ids, ka)
    with torch.no_grad():
        model(input_ids, cache=kv, use_cache=True)
    for query_length in (1, 5):
        assert [ka.get_mask_sizes(query_length, i) for i in range(3)] == [
            kv.get_mask_sizes(query_length, i) for i in range(3)
        ]


def test_window_layers_size_the_mask_over_every_position():
    """A KA window layer reads the mask over every position seen and keeps its own columns (its sinks are not the
    last window), so its size is the whole history where DynamicSlidingWindowLayer's is the window."""
    model = tiny_model("mistral-sliding")
    cache = KACache(config=model.config)
    forward(model, random_ids(length=9), cache)
    assert cache.get_mask_sizes(1, 0) == (10, 0) and cache.layers[0].keys.shape[-2] == 4


@pytest.mark.parametrize("arch_name", ["gpt2", "gpt-neox", "llama-gqa"])
def test_crop_then_refeed_equals_one_pass(arch_name):
    """crop(-3) forgets the last 3 tokens exactly (K and A), as DynamicCache does for K and V: feeding them again
    gives the one-pass logits, and the cache lengths match DynamicCache's at every step."""
    model = tiny_model(arch_name)
    input_ids = random_ids(length=10)
    ka, kv = KACache(), DynamicCache()
    forward(model, input_ids, ka)
    with torch.no_grad():
        model(input_ids, cache=kv, use_cache=True)
    ka.crop(-3), kv.crop(-3)
    assert ka.get_seq_length() == kv.get_seq_length() == 7
    again = forward(model, input_ids[:, 7:], ka)
    assert (again - uncached_ka(model, input_ids)[:, 7:]).abs().max() < 1e-10


def test_crop_of_a_window_cache_only_until_it_evicts():
    model = tiny_model("llama-gqa")
    cache = KACache(window=6)
    forward(model, random_ids(length=4), cache)
    assert cache.is_croppable
    cache.crop(-1)
    forward(model, random_ids(length=5), cache)
    assert not cache.is_croppable
    with pytest.raises(KAError, match="cannot be cropped"):
        cache.crop(-1)


@pytest.mark.parametrize("arch_name", ["gpt2", "llama-gqa", "mistral-sliding"])
def test_beam_search_and_return_sequences_equal_uncached_ka(arch_name):
    """generate(num_beams=3, num_return_sequences=2) reorders the cache every step (reorder_cache) and expands
    the batch: the KA result equals beam search over uncached exact KA."""
    model = tiny_model(arch_name)
    prompt = random_ids(length=5)
    options = dict(num_beams=3, num_return_sequences=2, max_new_tokens=7, **SETTINGS)
    cached = model.generate(prompt, cache=KACache(config=model.config), **options)
    with exact_ka(model):
        uncached = model.generate(prompt, use_cache=False, **options)
    assert cached.shape == (4, 12) and torch.equal(cached, uncached)


def test_reorder_cache_moves_keys_and_outputs_with_the_rows():
    model = tiny_model("llama-gqa")
    input_ids = random_ids(batch=3)
    order = torch.tensor([2, 0, 0])
    ka, kv = KACache(), DynamicCache()
    forward(model, input_ids, ka)
    with torch.no_grad():
        model(input_ids, cache=kv, use_cache=True)
    ka.reorder_cache(order), kv.reorder_cache(order)
    assert torch.equal(ka.layers[0].keys, kv.layers[0].keys)  # layer 0's keys do not depend on attention
    next_ids = random_ids(batch=3, length=2, seed=5)
    reordered = forward(model, next_ids, ka)
    expected = uncached_ka(model, torch.cat([input_ids[order], next_ids], dim=1))[:, -2:]
    assert (reordered - expected).abs().max() < 1e-10


@pytest.mark.parametrize("arch_name", ["gpt-neox", "llama-gqa"])
def test_batch_repeat_interleave_and_select_indices(arch_name):
    model = tiny_model(arch_name)
    input_ids, next_ids = random_ids(batch=2), random_ids(batch=6, length=3, seed=7)
    ka, kv = KACache(), DynamicCache()
    forward(model, input_ids, ka)
    with torch.no_grad():
        model(input_ids, cache=kv, use_cache=True)
    ka.batch_repeat_interleave(3), kv.batch_repeat_interleave(3)
    assert all(a.keys.shape == b.keys.shape for a, b in zip(ka.layers, kv.layers))
    repeated = input_ids.repeat_interleave(3, dim=0)
    expected = uncached_ka(model, torch.cat([repeated, next_ids], dim=1))[:, -3:]
    assert (forward(model, next_ids, ka) - expected).abs().max() < 1e-10

    rows = torch.tensor([4, 1])
    ka.batch_select_indices(rows), kv.batch_select_indices(rows)
    assert ka.layers[0].keys.shape[0] == kv.layers[0].keys.shape[0] == 2
    last = random_ids(batch=2, length=1, seed=8)
    whole = torch.cat([torch.cat([repeated, next_ids], dim=1)[rows], last], dim=1)
    assert (forward(model, last, ka) - uncached_ka(model, whole)[:, -1:]).abs().max() < 1e-10


def test_reset_keeps_the_layer_objects_and_starts_over():
    model = tiny_model("mistral-sliding")
    cache = KACache(config=model.config, window=4, sink=1)
    layers = list(cache.layers)
    first = forward(model, random_ids(length=8), cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and all(a is b for a, b in zip(layers, cache.layers))
    assert torch.equal(forward(model, random_ids(length=8), cache), first)


def test_is_compileable_as_dynamic_cache():
    model = tiny_model("gpt2")
    for ka, kv in ((KACache(), DynamicCache()), (KACache(config=model.config), DynamicCache(config=model.config))):
        assert ka.is_compileable is kv.is_compileable is False
        forward(model, random_ids(), ka)
        assert ka.is_compileable is False
