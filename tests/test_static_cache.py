"""StaticKACache (fixed shapes, in-place writes) against KACache: the same logits on every supported family, in a
forward pass (prompt, chunk over a past, decode steps) and in generate(); a torch.compile'd decode step equal to
eager with one graph for every step; unwritten slots never read; clear errors for bad use."""

import oracle
import pytest
import torch
from test_generate_scores import PROMPT, SETTINGS, generate_with_float64_logits, prompt_batch
from transformers import DynamicCache

from ka_hf import KACache, KAError, StaticKACache, StaticKALayer, enable_ka, exact_ka

from conftest import FEATURE_MODELS, VOCAB, tiny_model

TOL = 1e-10
MAX_LEN = 24
CHUNKS = (7, 3, 1, 1, 1)  # a left-padded prompt, a chunk over the past, then decode steps (13 tokens > windows)


def feature_model(name):
    factory, implementations = FEATURE_MODELS[name]
    return factory(implementations[0])


def padded_batch(length=None, seed=3):
    length = length or sum(CHUNKS)
    padding = torch.ones(2, length, dtype=torch.long)
    padding[1, :3] = 0  # row 1: 3 left pads
    input_ids = torch.randint(1, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed)) * padding
    return input_ids, padding


@torch.no_grad()
def chunked_logits(model, cache, input_ids, padding, chunks=CHUNKS, start=0):
    """Logits of `input_ids[:, start:]` fed chunk by chunk through `cache`, with generate()'s positions and 2-D
    mask."""
    positions = oracle.generate_position_ids(padding)
    parts = []
    for size in chunks:
        end = start + size
        out = model(
            input_ids[:, start:end],
            attention_mask=padding[:, :end],
            position_ids=positions[:, start:end],
            cache=cache,
            use_cache=True,
        )
        parts.append(out.logits)
        start = end
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("name", list(FEATURE_MODELS))
def test_prompt_chunk_and_decode_equal_kacache(name):
    model = feature_model(name)
    input_ids, padding = padded_batch()
    cache = StaticKACache(config=model.config, max_cache_len=MAX_LEN)
    static = chunked_logits(model, cache, input_ids, padding)
    dynamic = chunked_logits(model, KACache(), input_ids, padding)
    real = padding.bool()
    assert torch.isfinite(static[real]).all()
    assert (static - dynamic)[real].abs().max() < TOL
    assert cache.is_compileable and int(cache.get_seq_length()) == sum(CHUNKS)
    assert cache.layers[0].keys.shape[-2] == MAX_LEN  # fixed shapes: the buffers never grew
    standard = chunked_logits(model, DynamicCache(), input_ids, padding)
    assert (standard - static)[0].abs().max() > 1e-3  # KA differs from standard attention (row 0: no pads)


@pytest.mark.parametrize("name", list(FEATURE_MODELS))
def test_generate_equals_kacache_step_by_step(name):
    model = feature_model(name)
    input_ids, padding = prompt_batch()
    options = dict(do_sample=False, max_new_tokens=SETTINGS["max_new_tokens"])
    static_cache = StaticKACache(config=model.config, max_cache_len=PROMPT + options["max_new_tokens"])
    static, static_steps = generate_with_float64_logits(model, input_ids, padding, past_key_values=static_cache)
    dynamic, dynamic_steps = generate_with_float64_logits(model, input_ids, padding, past_key_values=KACache())
    assert torch.equal(static.sequences, dynamic.sequences)
    assert len(static_steps) == len(dynamic_steps) == options["max_new_tokens"]
    for step, (got, expected) in enumerate(zip(static_steps, dynamic_steps)):
        assert (got - expected).abs().max() < TOL, f"step {step}"
    for got, expected in zip(static.scores, dynamic.scores):
        assert torch.equal(got, expected) or (got - expected).abs().max() < 1e-6


def test_beam_search_and_reset_for_a_second_batch():
    model = feature_model("llama-gqa")
    input_ids, padding = prompt_batch()
    beams = dict(num_beams=3, num_return_sequences=2, do_sample=False)
    cache = StaticKACache(config=model.config, max_cache_len=PROMPT + SETTINGS["max_new_tokens"])
    static = model.generate(input_ids, attention_mask=padding, past_key_values=cache, **beams, **SETTINGS)
    dynamic = model.generate(input_ids, attention_mask=padding, past_key_values=KACache(), **beams, **SETTINGS)
    assert torch.equal(static.sequences, dynamic.sequences)
    assert (static.sequences_scores - dynamic.sequences_scores).abs().max() < 1e-6

    cache.reset()  # the same buffers, a new batch of the same size
    again = model.generate(input_ids[:, 1:], attention_mask=padding[:, 1:], past_key_values=cache, **beams, **SETTINGS)
    fresh = model.generate(
        input_ids[:, 1:], attention_mask=padding[:, 1:], past_key_values=KACache(), **beams, **SETTINGS
    )
    assert torch.equal(again.sequences, fresh.sequences)


def test_cache_implementation_static_on_a_ka_model():
    """generate(cache_implementation="static") on a model whose config asks for KA builds a StaticKACache (sized as
    transformers sizes its StaticCache), equal to the KACache that generate() uses by default."""
    model = enable_ka(feature_model("qwen2-sliding"), ka_layers=[0, 2])
    input_ids, padding = prompt_batch()
    static, static_steps = generate_with_float64_logits(
        model, input_ids, padding, do_sample=False, cache_implementation="static"
    )
    default, default_steps = generate_with_float64_logits(model, input_ids, padding, do_sample=False)
    assert isinstance(static.cache, StaticKACache) and isinstance(default.cache, KACache)
    assert static.cache.max_cache_len == PROMPT + SETTINGS["max_new_tokens"] - 1  # the last token is not fed
    assert torch.equal(static.sequences, default.sequences)
    assert max((a - b).abs().max() for a, b in zip(static_steps, default_steps)) < TOL
    assert model.generation_config.cache_implementation is None  # the model's own setting is left as it was

    enable_ka(model, variant="plan2", kernel="parallel")
    with pytest.raises(KAError, match="plan2"):
        model.generate(input_ids, attention_mask=padding, cache_implementation="static", **SETTINGS)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "qwen2-sliding"])
def test_layer_subset_and_hybrid_prefill(name):
    model = feature_model(name)
    input_ids, padding = padded_batch()
    with exact_ka(model, ka_layers=[1]):  # cache-less exact KA on layer 1 only, standard attention elsewhere
        expected = model(input_ids, attention_mask=padding, position_ids=oracle.generate_position_ids(padding)).logits
    subset = chunked_logits(
        model, StaticKACache(config=model.config, max_cache_len=MAX_LEN, ka_layers=[1]), input_ids, padding
    )
    real = padding.bool()
    assert (subset - expected)[real].abs().max() < TOL

    hybrid = StaticKACache(config=model.config, max_cache_len=MAX_LEN, prefill="standard")
    got = chunked_logits(model, hybrid, input_ids, padding)
    assert (got - chunked_logits(model, KACache(prefill="standard"), input_ids, padding))[real].abs().max() < TOL


def test_adapter_equals_kacache_with_the_same_adapter():
    from ka_hf.adapters import KAAdapter

    model = feature_model("llama-gqa")
    adapter = KAAdapter.for_model(model).double()
    torch.manual_seed(4)
    with torch.no_grad():  # any f, not the identity
        adapter.weight.add_(0.1 * torch.randn_like(adapter.weight))
        adapter.bias.add_(0.1)
    input_ids, padding = padded_batch()
    static = StaticKACache(config=model.config, max_cache_len=MAX_LEN, adapter=adapter)
    got = chunked_logits(model, static, input_ids, padding)
    expected = chunked_logits(model, KACache(adapter=adapter), input_ids, padding)
    real = padding.bool()
    assert (got - expected)[real].abs().max() < TOL
    assert (got - chunked_logits(model, KACache(), input_ids, padding))[real].abs().max() > 1e-3


def test_decode_never_reads_unwritten_slots():
    """Garbage in every slot not yet written (as after reset() or crop()) changes nothing: the mask hides them."""
    model = feature_model("mistral-sliding")
    input_ids, padding = padded_batch()
    clean = StaticKACache(config=model.config, max_cache_len=MAX_LEN)
    expected = chunked_logits(model, clean, input_ids, padding)
    dirty = StaticKACache(config=model.config, max_cache_len=MAX_LEN)
    prompt = chunked_logits(model, dirty, input_ids, padding, chunks=CHUNKS[:1])
    for layer in dirty.layers:
        layer.keys[..., CHUNKS[0] :, :] = 1e4
        layer.values[..., CHUNKS[0] :, :] = -1e4
    rest = chunked_logits(model, dirty, input_ids, padding, chunks=CHUNKS[1:], start=CHUNKS[0])
    real = padding.bool()
    assert (torch.cat([prompt, rest], dim=1) - expected)[real].abs().max() < TOL


def test_layer_reads_written_prefix_for_a_prompt_and_every_slot_for_a_decode_step():
    layer = StaticKALayer(max_cache_len=8, num_query_heads=4, sliding_window=3)
    keys, values = torch.randn(1, 2, 5, 6), torch.randn(1, 2, 5, 6)
    layer.update(keys, values)
    assert not layer.is_fixed_shape_step() and layer.past_outputs() is None
    assert torch.equal(layer.values[:, ::2, :5], values)  # placeholders: each kv head's values, per query head
    layer.store_outputs(torch.ones(1, 4, 5, 6))
    layer.update(torch.randn(1, 2, 1, 6), torch.randn(1, 2, 1, 6))
    assert layer.is_fixed_shape_step() and torch.equal(layer.past_outputs(), torch.ones(1, 4, 5, 6))
    # the new token sits at position 5: it sees itself and 2 back (window 3), nothing unwritten
    expected = torch.tensor([False, False, False, True, True, True, False, False])
    assert torch.equal(layer.visible_slots().flatten(), expected)
    with pytest.raises(KAError, match="never stored"):
        layer.update(torch.randn(1, 2, 1, 6), torch.randn(1, 2, 1, 6))


def test_crop_then_refeed_equals_never_cropped():
    """crop(-n) (HF's static convention) rewinds the slots; the re-fed tokens overwrite the stale ones."""
    model = feature_model("llama-gqa")
    input_ids, padding = padded_batch()
    expected = chunked_logits(model, StaticKACache(config=model.config, max_cache_len=MAX_LEN), input_ids, padding)
    cache = StaticKACache(config=model.config, max_cache_len=MAX_LEN)
    first = chunked_logits(model, cache, input_ids, padding, chunks=CHUNKS[:2])
    cache.crop(-CHUNKS[1])
    assert int(cache.get_seq_length()) == CHUNKS[0]
    again = chunked_logits(model, cache, input_ids, padding, chunks=CHUNKS[1:], start=CHUNKS[0])
    real = padding.bool()
    assert (torch.cat([first[:, : CHUNKS[0]], again], dim=1) - expected)[real].abs().max() < TOL


@torch.no_grad()
def _decode_run(model, step, input_ids, padding, max_len):
    """Prefill eagerly, then feed the rest token by token through `step` with fixed-shape inputs (the 2-D mask
    always max_len long, as a compiled decode step needs). Returns the logits and the graphs compiled per step."""
    from torch._dynamo.utils import counters

    prompt = 4
    positions = oracle.generate_position_ids(padding)
    full_mask = torch.zeros(padding.shape[0], max_len, dtype=torch.long)
    full_mask[:, : padding.shape[1]] = padding
    cache = StaticKACache(config=model.config, max_cache_len=max_len)
    logits = [model(input_ids[:, :prompt], attention_mask=padding[:, :prompt], cache=cache, use_cache=True).logits]
    graphs = []
    for t in range(prompt, input_ids.shape[1]):
        logits.append(step(input_ids[:, t : t + 1], full_mask, positions[:, t : t + 1], cache).logits)
        graphs.append(counters["stats"]["unique_graphs"])
    return torch.cat(logits, dim=1), graphs


@pytest.mark.slow  # inductor compiles several graphs: about a minute on a loaded 2-core CPU
def test_compiled_decode_step_equals_eager():
    """torch.compile (inductor, CPU) of a decode step: equal to eager, and after the first two steps (the second
    makes the token count a symbol) every step reuses the compiled graphs: no recompilation."""
    import torch._dynamo

    torch._dynamo.reset()
    model = tiny_model("llama-gqa", dtype=torch.float32, num_layers=1)
    input_ids, padding = padded_batch(length=7)

    def step(token, mask, position, cache):
        return model(token, attention_mask=mask, position_ids=position, cache=cache, use_cache=True)

    eager, _ = _decode_run(model, step, input_ids, padding, max_len=10)
    compiled, graphs = _decode_run(model, torch.compile(step, backend="inductor"), input_ids, padding, max_len=10)
    real = padding.bool()
    assert (compiled - eager)[real].abs().max() < 1e-5
    assert graphs[1] > 0 and graphs[1:] == [graphs[1]] * len(graphs[1:]), graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["gpt-neox-partial-rotary", "llama-gqa", "qwen2-sliding"])
def test_every_tensor_follows_the_inputs_device(name):
    """No GPU here: the meta device stands in for one. A position, slot index or mask built on the CPU would fail
    to mix with the buffers."""
    model = feature_model(name).to("meta")
    input_ids = torch.randint(1, VOCAB, (2, 5), device="meta")
    cache = StaticKACache(config=model.config, max_cache_len=8)
    with torch.no_grad():
        for chunk in (input_ids, input_ids[:, :1], input_ids[:, :1]):  # a prompt, then decode steps
            assert model(chunk, cache=cache, use_cache=True).logits.device.type == "meta"
    assert cache.layers[0].values.device.type == "meta"


def test_compiled_generate_equals_kacache():
    """generate() compiles its decode forward by itself for a compileable cache on a GPU; `_compile_all_devices`
    (transformers' switch "for testing purposes") makes it do so on this CPU too: the same tokens and logits."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = tiny_model("llama-gqa", dtype=torch.float32, num_layers=1)
    input_ids, padding = prompt_batch()
    settings = dict(SETTINGS, max_new_tokens=5, do_sample=False)
    compile_config = CompileConfig(backend="inductor", mode="default")
    compile_config._compile_all_devices = True
    cache = StaticKACache(config=model.config, max_cache_len=PROMPT + 5)
    graphs = counters["stats"]["unique_graphs"]
    out = model.generate(input_ids, attention_mask=padding, cache=cache, compile_config=compile_config, **settings)
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile
    expected = model.generate(input_ids, attention_mask=padding, cache=KACache(), **settings)
    assert torch.equal(out.sequences, expected.sequences)
    assert max((a - b).abs().max() for a, b in zip(out.logits, expected.logits)) < 1e-5
    torch._dynamo.reset()


def test_overflow_is_a_clear_error():
    model = feature_model("gpt2")
    input_ids, padding = prompt_batch()
    cache = StaticKACache(config=model.config, max_cache_len=PROMPT + 2)
    with pytest.raises(KAError, match=r"max_cache_len=9\) is full: it holds 9 tokens and got 1 more"):
        model.generate(input_ids, attention_mask=padding, past_key_values=cache, **SETTINGS)


def test_bad_arguments_and_another_model_are_clear_errors():
    model = feature_model("llama-gqa")
    config = model.config
    for bad in (0, -3, 2.5, True):
        with pytest.raises(KAError, match="max_cache_len"):
            StaticKACache(config=config, max_cache_len=bad)
    with pytest.raises(KAError, match=r"names layers \[3\]"):
        StaticKACache(config=config, max_cache_len=8, ka_layers=[0, 3])
    with pytest.raises(KAError, match="KACache\\(kernel='loop'\\)"):
        StaticKACache(config=config, max_cache_len=8, kernel="loop")
    with pytest.raises(KAError, match="prefill"):
        StaticKACache(config=config, max_cache_len=8, prefill="kv")
    other = feature_model("gpt2")
    with pytest.raises(KAError, match="built for"), torch.no_grad():
        other(torch.ones(1, 3, dtype=torch.long), cache=StaticKACache(config=config, max_cache_len=8), use_cache=True)
    cache = StaticKACache(config=config, max_cache_len=8)
    with torch.no_grad():
        model(torch.ones(2, 3, dtype=torch.long), cache=cache, use_cache=True)
        with pytest.raises(KAError, match="batch of 2 sequences but got a batch of 1"):
            model(torch.ones(1, 1, dtype=torch.long), cache=cache, use_cache=True)
