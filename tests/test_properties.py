"""Property-based tests: ka_hf's ops and mask reading against the independent oracle (tests/oracle.py), in
float64, over random shapes (batch, query/kv head groupings, head and value dims, lengths), cached-past splits,
block sizes, left paddings (fully padded rows included), sliding windows, scales and softcaps.

Runs are reproducible by default (derandomized, no example database). To explore new examples:
    KA_HYPOTHESIS_EXPLORE=1 python -m pytest tests/test_properties.py
"""

import os

import oracle
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ka_hf.masks import allowed_from_mask
from ka_hf.ops import ka_attention, ka_attention_naive, ka_decode_step, standard_attention

TOL = 1e-10
EXPLORE = bool(os.environ.get("KA_HYPOTHESIS_EXPLORE"))


def examples(n: int):
    return settings(max_examples=n * (10 if EXPLORE else 1), deadline=None, derandomize=not EXPLORE, database=None)


@st.composite
def cases(draw, max_length=12):
    length = draw(st.integers(1, max_length))
    batch = draw(st.integers(1, 3))
    n_kv_heads = draw(st.integers(1, 3))
    case = dict(
        batch=batch,
        n_kv_heads=n_kv_heads,
        n_query_heads=n_kv_heads * draw(st.integers(1, 3)),
        head_dim=draw(st.integers(1, 6)),
        value_dim=draw(st.integers(1, 6)),
        length=length,
        pads=draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch)),
        window=draw(st.one_of(st.none(), st.integers(1, length + 1))),
        softcap=draw(st.one_of(st.none(), st.floats(0.3, 5.0))),
        scale=draw(st.floats(0.05, 1.5)),
        past=draw(st.integers(0, length - 1)),
        block_size=draw(st.one_of(st.none(), st.integers(1, length + 1), st.just(512))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    plain = not any(case["pads"]) and case["window"] is None
    case["explicit_mask"] = draw(st.booleans()) if plain else True  # allowed=None means plain causal
    return case


def tensors(case):
    generator = torch.Generator().manual_seed(case["seed"])

    def randn(heads, dim):
        return 1.5 * torch.randn(case["batch"], heads, case["length"], dim, generator=generator, dtype=torch.float64)

    q = randn(case["n_query_heads"], case["head_dim"])
    k = randn(case["n_kv_heads"], case["head_dim"])
    v = randn(case["n_kv_heads"], case["value_dim"])
    padding = oracle.left_padding_mask([case["length"] - p for p in case["pads"]], case["length"])
    allowed = oracle.allowed_keys(case["length"], case["length"], padding, case["window"])[:, None]
    return q, k, v, padding, allowed


def assert_close(actual, expected, case):
    assert torch.isfinite(actual).all(), case
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert diff < TOL, f"max |diff| {diff:.3e} for {case}"


@examples(150)
@given(cases())
def test_ka_attention_after_a_cached_past_equals_the_oracle(case):
    """ka_attention on tokens past.. given the oracle's outputs of tokens ..past as the cache."""
    q, k, v, _, allowed = tensors(case)
    expected = oracle.ka_reference(q, k, v, allowed, case["scale"], case["softcap"])
    p = case["past"]
    got = ka_attention(
        q[..., p:, :],
        k,
        v[..., p:, :],
        past_outputs=expected[..., :p, :] if p else None,
        allowed=allowed[..., p:, :] if case["explicit_mask"] else None,
        scale=case["scale"],
        softcap=case["softcap"],
        block_size=case["block_size"],
    )
    assert_close(got, expected[..., p:, :], case)


@examples(40)
@given(cases())
def test_reference_loop_equals_the_oracle(case):
    q, k, v, _, allowed = tensors(case)
    expected = oracle.ka_reference(q, k, v, allowed, case["scale"], case["softcap"])
    got = ka_attention_naive(
        q, k, v, allowed=allowed if case["explicit_mask"] else None, scale=case["scale"], softcap=case["softcap"]
    )
    assert_close(got, expected, case)


@examples(100)
@given(cases())
def test_decode_step_equals_the_oracle(case):
    """One new token over [the oracle's past outputs; its own value] (the KACache layout)."""
    q, k, v, _, allowed = tensors(case)
    expected = oracle.ka_reference(q, k, v, allowed, case["scale"], case["softcap"])
    own_value = oracle.query_head_keys(v[..., -1:, :], case["n_query_heads"])
    attended = torch.cat([expected[..., :-1, :], own_value], dim=-2)
    got = ka_decode_step(
        q[..., -1:, :],
        k,
        attended,
        allowed[..., -1:, :] if case["explicit_mask"] else None,
        scale=case["scale"],
        softcap=case["softcap"],
    )
    assert_close(got, expected[..., -1:, :], case)


@examples(40)
@given(cases())
def test_standard_attention_equals_the_oracle(case):
    q, k, v, _, allowed = tensors(case)
    expected = oracle.standard_reference(q, k, v, allowed, case["scale"], case["softcap"])
    got = standard_attention(q, k, v, allowed if case["explicit_mask"] else None, case["scale"], case["softcap"])
    real_queries = allowed.any(-1, keepdim=True)  # ka_hf gives 0 for a fully masked row, as the oracle does
    assert_close(got * real_queries, expected, case)


@examples(100)
@given(cases(), st.integers(1, 12))
def test_masks_in_every_hf_format_are_read_as_the_oracle_builds_them(case, n_new):
    """allowed_from_mask on what HF hands the attention function for n_new new tokens after a cached past:
    the 2-D padding mask (flash style; the window comes as `sliding_window`), a 4-D boolean mask (sdpa),
    a 4-D additive float mask (eager), or None (plain causal)."""
    n_total = case["length"]
    n_new = min(n_new, n_total)
    padding = oracle.left_padding_mask([n_total - p for p in case["pads"]], n_total)
    window = case["window"]
    expected = oracle.allowed_keys(n_new, n_total, padding, window)[:, None]
    shape = (case["batch"], 1, n_new, n_total)

    def read(mask, sliding_window=None):
        got = allowed_from_mask(mask, n_new, n_total, sliding_window, torch.device("cpu"))
        if got is None:  # None means plain causal, lower-right aligned (the kernels then skip masking)
            return oracle.allowed_keys(n_new, n_total, None, None)[:, None].expand(shape)
        return got.expand(shape)

    assert torch.equal(read(padding, window), expected.expand(shape)), ("2-D", case, n_new)
    assert torch.equal(read(expected), expected.expand(shape)), ("4-D bool", case, n_new)
    additive = torch.zeros(shape, dtype=torch.float64).masked_fill(~expected, torch.finfo(torch.float64).min)
    assert torch.equal(read(additive), expected.expand(shape)), ("4-D additive", case, n_new)
    no_padding = oracle.allowed_keys(n_new, n_total, None, window)[:, None]
    assert torch.equal(read(None, window)[:1], no_padding.expand(1, 1, n_new, n_total)), ("None", case, n_new)
