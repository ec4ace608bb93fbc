"""Whole models against the independent float64 oracle (tests/oracle.py).

Standard mode proves the oracle reads every model's attention features (scale, softcap, windows, GQA, partial
rotary, padding) exactly as Hugging Face does: it reproduces HF's own eager logits. KA mode is then the reference
for every ka_hf path: one parallel pass with a KACache, chunked prefill, token by token, block sizes, left-padded
batches, 4-D boolean (sdpa), 4-D additive (eager) and 2-D (flash-style) masks, and exact_ka without a cache.
"""

import contextlib
import dataclasses

import oracle
import pytest
import torch

from ka_hf import KACache, exact_ka

from conftest import FEATURE_MODELS, VOCAB

TOL = 1e-10  # float64 logits; every planted bug moves them by far more than this
LENGTH = 13
ROW_LENGTHS = (13, 9)  # row 1 carries 4 left pads
CASES = [(name, impl) for name, (_, impls) in FEATURE_MODELS.items() for impl in impls + ("ka_oracle",)]


def make(name, impl):
    return FEATURE_MODELS[name][0](impl)


def batch(lengths=ROW_LENGTHS, total=LENGTH, seed=1):
    input_ids = torch.randint(1, VOCAB, (len(lengths), total), generator=torch.Generator().manual_seed(seed))
    padding = oracle.left_padding_mask(lengths, total)
    return input_ids, padding, oracle.generate_position_ids(padding)


def assert_close(actual, expected, real, tol=TOL, what=""):
    """Max abs difference over the real (non-pad) positions; every position must be finite."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite logits"
    diff = (actual.double() - expected)[real].abs().max().item()
    assert diff < tol, f"{what}: max |diff| {diff:.3e} >= {tol:.0e}"


# ---------------------------------------------------------------------------------------------------------
# Standard mode: the oracle reproduces HF.


@contextlib.contextmanager
def float64_softmax():
    """HF's eager attention of most families takes its softmax in float32 (`dtype=torch.float32`); within the
    block a float64 input keeps float64, so the rest of HF's eager code runs unchanged in full float64."""
    softmax = torch.nn.functional.softmax

    def softmax_keeping_float64(input, *args, dtype=None, **kwargs):
        if input.dtype == torch.float64:
            dtype = None
        return softmax(input, *args, dtype=dtype, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "softmax", softmax_keeping_float64)
        yield


@pytest.mark.parametrize("name", list(FEATURE_MODELS))
def test_standard_mode_reproduces_hf_eager(name):
    model = make(name, "eager")
    input_ids, padding, positions = batch()
    with torch.no_grad():
        as_shipped = model(input_ids).logits
        with float64_softmax():
            full = model(input_ids).logits
    ours = oracle.oracle_logits(model, input_ids, mode="standard")
    assert_close(ours, full, slice(None), 1e-12, "unpadded")
    assert_close(ours, as_shipped, slice(None), 1e-6, "unpadded, HF's float32 softmax")
    # Left-padded batch (as shipped, HF's float32 softmax turns the float64 mask minimum into -inf, and a fully
    # masked pad row into NaN that spreads to its whole row; with the softmax kept in float64 it does not).
    padded = oracle.oracle_logits(model, input_ids, padding, positions, mode="standard")
    with torch.no_grad(), float64_softmax():
        hf_padded = model(input_ids, attention_mask=padding, position_ids=positions).logits
    assert_close(padded, hf_padded, padding.bool(), 1e-12, "padded")
    for row, n in enumerate(ROW_LENGTHS):
        with torch.no_grad(), float64_softmax():
            alone = model(input_ids[row : row + 1, LENGTH - n :]).logits
        assert_close(padded[row : row + 1, LENGTH - n :], alone, slice(None), 1e-12, f"row {row}")
    if "sdpa" in FEATURE_MODELS[name][1]:
        sdpa = make(name, "sdpa")
        with torch.no_grad():
            hf = sdpa(input_ids, attention_mask=padding, position_ids=positions).logits
        assert_close(padded, hf, padding.bool(), 1e-12, "padded vs sdpa")


FEATURE_EDITS = {
    # model, what the edit drops from the oracle's reading of the config
    "gpt2 scale_attn_by_inverse_layer_idx": ("gpt2-layer-scale", lambda f, cfg, i: dict(scale=f.scale * (i + 1))),
    "gemma2 query_pre_attn_scalar": ("gemma2-softcap", lambda f, cfg, i: dict(scale=cfg.head_dim**-0.5)),
    "gemma2 softcap": ("gemma2-softcap", lambda f, cfg, i: dict(softcap=None)),
    "gemma2 window": ("gemma2-softcap", lambda f, cfg, i: dict(window=None)),
    "gemma2 window off by one": ("gemma2-softcap", lambda f, cfg, i: dict(window=f.window and f.window + 1)),
    "mistral window": ("mistral-sliding", lambda f, cfg, i: dict(window=None)),
    "qwen2 window": ("qwen2-sliding", lambda f, cfg, i: dict(window=None)),
    "qwen3 window": ("qwen3-sliding", lambda f, cfg, i: dict(window=None)),
}


@pytest.mark.parametrize("feature", list(FEATURE_EDITS))
def test_every_feature_moves_the_logits(feature, monkeypatch):
    """The features above are live in these models: an oracle that misreads one no longer matches HF."""
    name, edit = FEATURE_EDITS[feature]
    model = make(name, "eager")
    input_ids, _, _ = batch()
    with torch.no_grad(), float64_softmax():
        hf = model(input_ids).logits
    original = oracle.layer_features

    def misread(config, layer_idx):
        features = original(config, layer_idx)
        return dataclasses.replace(features, **edit(features, config, layer_idx))

    monkeypatch.setattr(oracle, "layer_features", misread)
    with pytest.raises(AssertionError, match="module"):  # the cross-check with the module's own values
        oracle.oracle_logits(model, input_ids, mode="standard")
    monkeypatch.setattr(oracle, "check_module_features", lambda *args: None)
    wrong = oracle.oracle_logits(model, input_ids, mode="standard")
    assert (wrong - hf).abs().max() > 1e-6  # and the logits alone would have shown it


# ---------------------------------------------------------------------------------------------------------
# KA mode: every ka_hf path against the oracle.


@pytest.mark.parametrize("name,impl", CASES)
def test_ka_cache_parallel_pass(name, impl):
    """One parallel pass with a KACache, left-padded batch; impl ka_oracle hands ka_hf a 2-D padding mask."""
    model = make(name, impl)
    input_ids, padding, positions = batch()
    expected = oracle.oracle_logits(model, input_ids, padding, positions)
    with torch.no_grad():
        padded = model(
            input_ids, attention_mask=padding, position_ids=positions, past_key_values=KACache(), use_cache=True
        ).logits
        plain = model(input_ids, past_key_values=KACache(), use_cache=True).logits
    assert_close(padded, expected, padding.bool(), what="left-padded")
    assert_close(plain, oracle.oracle_logits(model, input_ids), slice(None), what="no mask")
    standard = oracle.oracle_logits(model, input_ids, padding, positions, mode="standard")
    assert (standard - expected)[padding.bool()].abs().max() > 1e-4  # KA really differs here


def chunked(model, input_ids, chunk, padding=None, positions=None, **cache_kwargs):
    cache = KACache(**cache_kwargs)
    parts = []
    with torch.no_grad():
        for start in range(0, input_ids.shape[1], chunk):
            stop = start + chunk
            extra = (
                {} if padding is None else dict(attention_mask=padding[:, :stop], position_ids=positions[:, start:stop])
            )
            parts.append(model(input_ids[:, start:stop], past_key_values=cache, use_cache=True, **extra).logits)
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("name,impl", CASES)
def test_ka_cache_chunks_and_tokens(name, impl):
    """Chunked prefill (4, 5 tokens) and token by token (1), with and without left padding."""
    model = make(name, impl)
    input_ids, padding, positions = batch()
    expected_padded = oracle.oracle_logits(model, input_ids, padding, positions)
    expected_plain = oracle.oracle_logits(model, input_ids)
    everything = torch.ones_like(padding, dtype=torch.bool)
    for chunk in (1, 4, 5):
        assert_close(
            chunked(model, input_ids, chunk, padding, positions),
            expected_padded,
            padding.bool(),
            what=f"padded, chunk {chunk}",
        )
        assert_close(chunked(model, input_ids, chunk), expected_plain, everything, what=f"no mask, chunk {chunk}")


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-sliding", "gemma2-softcap", "gpt2-layer-scale"])
@pytest.mark.parametrize("block_size", [1, 3, 5])
def test_ka_cache_block_sizes(name, block_size):
    """The blocked solve (block_size tokens per triangular solve), in one pass and after a cached chunk."""
    model = make(name, FEATURE_MODELS[name][1][0])
    input_ids, padding, positions = batch()
    expected = oracle.oracle_logits(model, input_ids, padding, positions)
    with torch.no_grad():
        whole = model(
            input_ids,
            attention_mask=padding,
            position_ids=positions,
            past_key_values=KACache(block_size=block_size),
            use_cache=True,
        ).logits
    assert_close(whole, expected, padding.bool(), what="one pass")
    assert_close(
        chunked(model, input_ids, 7, padding, positions, block_size=block_size),
        expected,
        padding.bool(),
        what="two chunks",
    )


@pytest.mark.parametrize("name", ["gpt2-layer-scale", "qwen2-sliding", "gemma2-softcap"])
def test_ka_on_some_layers_only(name):
    """KACache(ka_layers=[1]) and exact_ka(model, ka_layers=[1]): KA on layer 1, HF's own attention elsewhere (its
    eager softmax kept in float64, see float64_softmax)."""
    model = make(name, FEATURE_MODELS[name][1][0])
    input_ids, padding, positions = batch()
    expected = oracle.oracle_logits(model, input_ids, padding, positions, ka_layers=[1])
    with torch.no_grad(), float64_softmax():
        whole = model(
            input_ids,
            attention_mask=padding,
            position_ids=positions,
            past_key_values=KACache(ka_layers=[1]),
            use_cache=True,
        ).logits
        with exact_ka(model, ka_layers=[1]):
            context = model(input_ids, attention_mask=padding, position_ids=positions).logits
        tokens = chunked(model, input_ids, 1, padding, positions, ka_layers=[1])
    assert_close(whole, expected, padding.bool(), what="KACache(ka_layers=[1])")
    assert_close(context, expected, padding.bool(), what="exact_ka(ka_layers=[1])")
    assert_close(tokens, expected, padding.bool(), what="token by token")


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "mistral-sliding", "gemma2-softcap"])
@pytest.mark.parametrize("prompt", [1, 6])
def test_hybrid_prefill_then_ka(name, prompt):
    """KACache(prefill="standard"): the prompt's standard attention outputs are cached as A, later tokens run
    KA over them (one chunk of 3, then token by token)."""
    model = make(name, FEATURE_MODELS[name][1][0])
    input_ids, padding, positions = batch()
    expected = oracle.oracle_logits(model, input_ids, padding, positions, standard_prefix=prompt)
    cache = KACache(prefill="standard")
    bounds = [0, prompt, prompt + 3, *range(prompt + 4, LENGTH + 1)]
    parts = []
    with torch.no_grad():
        for start, stop in zip(bounds, bounds[1:]):
            parts.append(
                model(
                    input_ids[:, start:stop],
                    attention_mask=padding[:, :stop],
                    position_ids=positions[:, start:stop],
                    past_key_values=cache,
                    use_cache=True,
                ).logits
            )
    assert_close(torch.cat(parts, dim=1), expected, padding.bool(), what=f"hybrid, prompt {prompt}")
    if prompt > 1:  # one token's standard output is its value, its KA output too; longer prompts differ
        pure_ka = oracle.oracle_logits(model, input_ids, padding, positions)
        assert (pure_ka - expected)[padding.bool()].abs().max() > 1e-4


@pytest.mark.parametrize("name", list(FEATURE_MODELS))
def test_exact_ka_without_cache(name):
    model = make(name, FEATURE_MODELS[name][1][0])
    input_ids, padding, positions = batch()
    with exact_ka(model), torch.no_grad():
        padded = model(input_ids, attention_mask=padding, position_ids=positions).logits
        plain = model(input_ids).logits
    assert_close(padded, oracle.oracle_logits(model, input_ids, padding, positions), padding.bool(), what="padded")
    assert_close(plain, oracle.oracle_logits(model, input_ids), slice(None), what="no mask")


def test_oracle_token_loop_matches_the_scalar_definition():
    """The oracle's KA loop against KA-SPEC §2 with Python floats (one row, GQA 2/1, a window and a pad)."""
    import math

    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 6, 3, generator=generator, dtype=torch.float64) for h in (2, 1, 1))
    padding = torch.tensor([[0, 1, 1, 1, 1, 1]])
    allowed = oracle.allowed_keys(6, 6, padding, window=3)[:, None]
    got = oracle.ka_reference(q, k, v, allowed, scale=0.7, softcap=1.5)
    for h in range(2):
        outputs = []
        for i in range(6):
            seen = [j for j in range(i + 1) if padding[0, j] and j > i - 3]
            scores = {j: 1.5 * math.tanh(float(q[0, h, i] @ k[0, 0, j]) * 0.7 / 1.5) for j in seen}
            z = sum(math.exp(s) for s in scores.values())
            w = {j: math.exp(s) / z for j, s in scores.items()}
            out = w.get(i, 0.0) * v[0, 0, i] + sum(w[j] * outputs[j] for j in seen if j < i)
            outputs.append(out if seen else torch.zeros(3, dtype=torch.float64))
        assert (got[0, h] - torch.stack(outputs)).abs().max() < 1e-14
