"""KA through real transformers models: exactness against the token loop, generate(), padding, guards."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import ka_hf
import ka_hf.integration
from ka_hf import KACache, KAError, exact_ka

from conftest import REPO_ROOT, VOCAB, tiny_model


def random_ids(batch=2, length=12, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def chunked_logits(model, input_ids, chunk, **cache_kwargs):
    cache = KACache(**cache_kwargs)
    with torch.no_grad():
        parts = [
            model(input_ids[:, start : start + chunk], past_key_values=cache, use_cache=True).logits
            for start in range(0, input_ids.shape[1], chunk)
        ]
    return torch.cat(parts, dim=1), cache


@pytest.mark.parametrize("kernel", ["auto", "parallel"])
def test_parallel_equals_chunks_tokens_and_reference_float64(arch_name, kernel):
    model = tiny_model(arch_name)
    input_ids = random_ids(length=13)
    parallel, _ = chunked_logits(model, input_ids, chunk=13, kernel=kernel, block_size=4)
    for chunk in (1, 3, 5):
        assert (chunked_logits(model, input_ids, chunk, kernel=kernel)[0] - parallel).abs().max() < 1e-10
    with torch.no_grad():
        standard = model(input_ids).logits
    assert (standard - parallel).abs().max() > 1e-3  # KA really differs from standard attention
    reference, _ = chunked_logits(model, input_ids, chunk=13, kernel="loop")
    assert (reference - parallel).abs().max() < 1e-10


def test_float32_prefill_equals_decode(arch_name):
    model = tiny_model(arch_name, dtype=torch.float32)
    input_ids = random_ids(length=16)
    parallel, _ = chunked_logits(model, input_ids, chunk=16)
    tokens, _ = chunked_logits(model, input_ids, chunk=1)
    assert (parallel - tokens).abs().max() <= 1e-4


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_left_padded_batch_matches_each_row_alone(arch_name, implementation):
    model = tiny_model(arch_name, attn_implementation=implementation)
    input_ids = random_ids(length=10)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # row 1: 4 left pads
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does (GPT-2 has absolute positions)
    with torch.no_grad():
        batch = model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=KACache(),
            use_cache=True,
        ).logits
        alone = model(input_ids[1:, 4:], past_key_values=KACache(), use_cache=True).logits
        first = model(input_ids[:1], past_key_values=KACache(), use_cache=True).logits
    assert torch.isfinite(batch).all()
    assert (batch[1:, 4:] - alone).abs().max() < 1e-10
    assert (batch[:1] - first).abs().max() < 1e-10


def test_exact_ka_context_equals_cache_and_gradients_flow(arch_name):
    model = tiny_model(arch_name)
    input_ids = random_ids()
    with torch.no_grad():
        with_cache = model(input_ids, past_key_values=KACache(), use_cache=True).logits
    with exact_ka(model):
        loss = model(input_ids, labels=input_ids).loss
        no_cache = model(input_ids, use_cache=False).logits
    loss.backward()
    assert (no_cache - with_cache).abs().max() < 1e-12
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():  # the context is gone: standard attention again
        assert (model(input_ids).logits - with_cache).abs().max() > 1e-3


def test_dynamic_cache_after_ka_cache_is_standard(arch_name):
    model = tiny_model(arch_name)
    input_ids = random_ids()
    with torch.no_grad():
        before = model(input_ids, past_key_values=DynamicCache(), use_cache=True).logits
        model(input_ids, past_key_values=KACache(), use_cache=True)
        after = model(input_ids, past_key_values=DynamicCache(), use_cache=True).logits
        plain = model(input_ids).logits
    assert torch.equal(before, after) and (plain - before).abs().max() < 1e-12


def test_generate_greedy_equals_argmax_of_teacher_forced_ka(arch_name):
    model = tiny_model(arch_name)
    prompt = random_ids(length=6)
    generated = model.generate(
        prompt, past_key_values=KACache(), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    with exact_ka(model), torch.no_grad():
        logits = model(generated).logits
    assert torch.equal(logits[:, 5:-1].argmax(-1), generated[:, 6:])


def test_left_padded_generate_equals_each_prompt_alone(arch_name):
    model = tiny_model(arch_name)
    long_prompt, short_prompt = random_ids(1, 7, seed=3), random_ids(1, 4, seed=4)
    input_ids = torch.cat([long_prompt, torch.cat([torch.zeros(1, 3, dtype=torch.long), short_prompt], 1)])
    attention_mask = (torch.arange(7) >= torch.tensor([[0], [3]])).long()
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    batch = model.generate(input_ids, attention_mask=attention_mask, past_key_values=KACache(), **settings)
    for row, prompt in enumerate((long_prompt, short_prompt)):
        alone = model.generate(prompt, past_key_values=KACache(), **settings)
        assert torch.equal(batch[row, -6:], alone[0, -6:])


@pytest.mark.parametrize("arch_name", ["gpt2", "llama-gqa"])
def test_beam_search_and_sampling_agree_with_uncached_ka(arch_name):
    model = tiny_model(arch_name)
    prompt = random_ids(length=5)
    settings = dict(max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    for options in (dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=20)):
        torch.manual_seed(7)
        cached = model.generate(prompt, past_key_values=KACache(), **options, **settings)
        with exact_ka(model):
            torch.manual_seed(7)
            uncached = model.generate(prompt, use_cache=False, **options, **settings)
        assert torch.equal(cached, uncached), options


def test_assisted_decoding_equals_greedy():
    model = tiny_model("llama-gqa")
    assistant = tiny_model("llama-gqa", seed=5)
    prompt = random_ids(1, 6)
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    greedy = model.generate(prompt, past_key_values=KACache(), **settings)
    assisted = model.generate(prompt, past_key_values=KACache(), assistant_model=assistant, **settings)
    assert torch.equal(greedy, assisted)


def test_cache_reuse_across_generate_calls():
    model = tiny_model("gpt-neox")
    prompt = random_ids(1, 5)
    settings = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    cache = KACache()
    first = model.generate(prompt, past_key_values=cache, max_new_tokens=4, **settings)
    second = model.generate(first, past_key_values=cache, max_new_tokens=4, **settings)
    at_once = model.generate(prompt, past_key_values=KACache(), max_new_tokens=8, **settings)
    assert torch.equal(second, at_once)


def test_both_cache_argument_spellings():
    model = tiny_model("llama-gqa")
    input_ids = random_ids()
    with torch.no_grad():
        old = model(input_ids, past_key_values=KACache(), use_cache=True).logits
        new = model(input_ids, cache=KACache(), use_cache=True).logits
    assert torch.equal(old, new)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(
        model.generate(input_ids, past_key_values=KACache(), **settings),
        model.generate(input_ids, cache=KACache(), **settings),
    )


def test_hybrid_prefill_is_standard_then_ka():
    model = tiny_model("gpt2")
    input_ids = random_ids(length=10)
    with torch.no_grad():
        standard = model(input_ids).logits
        cache = KACache(prefill="standard")
        prompt_logits = model(input_ids[:, :6], past_key_values=cache, use_cache=True).logits
        next_logits = model(input_ids[:, 6:], past_key_values=cache, use_cache=True).logits
        ka = model(input_ids, past_key_values=KACache(), use_cache=True).logits
    assert (prompt_logits - standard[:, :6]).abs().max() < 1e-12
    assert (next_logits - standard[:, 6:]).abs().max() > 1e-4 and (next_logits - ka[:, 6:]).abs().max() > 1e-4


def test_layer_subset():
    model = tiny_model("qwen2-gqa")
    input_ids = random_ids()
    with torch.no_grad():
        cache = KACache(ka_layers=[1])
        subset = model(input_ids, past_key_values=cache, use_cache=True).logits
        with exact_ka(model, ka_layers=[1]):
            context = model(input_ids).logits
        tokens, _ = chunked_logits(model, input_ids, chunk=1, ka_layers=[1])
    assert (subset - context).abs().max() < 1e-12 and (tokens - subset).abs().max() < 1e-10
    assert type(cache.layers[0]).__name__ == "DynamicLayer" and type(cache.layers[1]).__name__ == "KALayer"


def test_cache_bytes_equal_for_mha_and_ratio_for_gqa():
    input_ids = random_ids()
    for name, ratio in (("gpt2", 1.0), ("llama-gqa", (2 + 4) / (2 * 2))):
        model = tiny_model(name)
        with torch.no_grad():
            dynamic = model(input_ids, past_key_values=DynamicCache(), use_cache=True).past_key_values
            ka = model(input_ids, past_key_values=KACache(), use_cache=True).past_key_values
        assert ka_hf.cache_nbytes(ka) == ratio * ka_hf.cache_nbytes(dynamic) > 0


def test_enable_ka_survives_save_and_load(tmp_path):
    model = tiny_model("gpt-neox", dtype=torch.float32)
    input_ids = random_ids()
    with torch.no_grad():
        expected = model(input_ids, past_key_values=KACache(), use_cache=True).logits
    ka_hf.enable_ka(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.ka["attention"] == "ka"
    with torch.no_grad():
        assert (loaded(input_ids).logits - expected).abs().max() < 1e-5
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(
        loaded.generate(input_ids, **settings), loaded.generate(input_ids, past_key_values=KACache(), **settings)
    )
    with pytest.raises(KAError, match="KACache"):  # a DynamicCache cannot continue KA
        loaded.generate(input_ids, past_key_values=DynamicCache(), **settings)


def test_cache_reused_with_another_model_or_batch():
    cache = KACache()
    input_ids = random_ids()
    with torch.no_grad():
        first = tiny_model("gpt2")
        first(input_ids, cache=cache, use_cache=True)
        other = tiny_model("gpt2", num_layers=2)
        with pytest.raises(KAError, match="another model"):
            other(input_ids, cache=cache, use_cache=True)
        with pytest.raises(KAError, match="another model object"):  # same shape, another model: refused too
            tiny_model("gpt2")(input_ids, cache=cache, use_cache=True)
        with pytest.raises(KAError, match="batch"):
            first(random_ids(batch=3), cache=cache, use_cache=True)


def test_unsupported_architecture_is_refused():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    ).eval()
    with pytest.raises(KAError, match="gpt2, gpt_neox, llama"):
        model(random_ids(), past_key_values=KACache(), use_cache=True)
    with pytest.raises(KAError, match="does not support model_type 'opt'"):
        ka_hf.enable_ka(model)


def test_bad_options():
    with pytest.raises(KAError):
        KACache(prefill="magic")
    with pytest.raises(KAError, match="layers"):
        tiny_model("gpt2")(random_ids(), past_key_values=KACache(ka_layers=[7]), use_cache=True)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "qwen3"])
def test_other_llama_family_members(family):
    """Gemma (scaled embeddings), Gemma-2 (attention softcap, alternating sliding window) and Qwen3 (q/k norms)."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    extra = dict(attn_logit_softcapping=2.0, sliding_window=4, query_pre_attn_scalar=8) if family == "gemma2" else {}
    config = AutoConfig.for_model(
        family,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").double().eval()
    input_ids = random_ids(length=9)
    parallel, _ = chunked_logits(model, input_ids, chunk=9)
    tokens, _ = chunked_logits(model, input_ids, chunk=1)
    with torch.no_grad():
        standard = model(input_ids).logits
    assert (parallel - tokens).abs().max() < 1e-10 and (parallel - standard).abs().max() > 1e-4


def test_readme_quickstart_runs(tmp_path):
    """The README's quickstart, verbatim, on a tiny GPT-2 saved with a locally trained tokenizer."""
    import re

    from ka_hf.study.data import train_tokenizer
    from ka_hf.study.models import model_config

    tokenizer = train_tokenizer(["The capital of France is Paris."] * 20 + ["KA caches outputs."] * 20, vocab_size=300)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_config("gpt2", vocab_size=len(tokenizer))).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    readme = (REPO_ROOT / "README.md").read_text()
    snippet = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert "past_key_values=" not in snippet  # the spelling that warns at every call
    namespace = {"path": str(tmp_path)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the quickstart prints no warning
        exec(snippet, namespace)
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    assert torch.equal(namespace["out_static"], namespace["out"])
    assert (namespace["logits"] - namespace["logits_std"]).abs().max() > 0


@pytest.mark.parametrize("arch_name", ["gpt-neox", "llama-gqa", "mistral-sliding"])
def test_every_tensor_follows_the_inputs_device(arch_name):
    """No GPU here: the meta device stands in for one. A mask or index built on the CPU would fail to mix."""
    model = tiny_model(arch_name, dtype=torch.float32).to("meta")
    input_ids = torch.randint(1, VOCAB, (2, 9), device="meta")
    with torch.no_grad():
        for cache in (KACache(), KACache(prefill="standard"), KACache(variant="plan2")):
            assert model(input_ids, cache=cache, use_cache=True).logits.device.type == "meta"
            assert model(input_ids[:, :1], cache=cache, use_cache=True).logits.device.type == "meta"
        with exact_ka(model):
            assert model(input_ids).logits.device.type == "meta"
