"""Long context: the O(T)-memory kernel at long T, and bounded-memory window caches (issue "Long context").

Every fast path against the reference loop in float64; window caches against an uncached windowed reference.
"""

import pytest
import torch

import ka_hf
from ka_hf import KACache, KAError, KAWindowLayer, cache_nbytes, window_attention_mask
from ka_hf.ops import causal_allowed, ka_attention, ka_attention_blocked, ka_attention_naive

from conftest import VOCAB, tiny_model


def random_inputs(length, n_query_heads=4, n_kv_heads=2, n_past=0, batch=2, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = lambda heads, n: (batch, heads, n, head_dim)  # noqa: E731
    q = torch.randn(shape(n_query_heads, length), generator=generator, dtype=torch.float64)
    k = torch.randn(shape(n_kv_heads, n_past + length), generator=generator, dtype=torch.float64)
    v = torch.randn(shape(n_kv_heads, length), generator=generator, dtype=torch.float64)
    past = torch.randn(shape(n_query_heads, n_past), generator=generator, dtype=torch.float64) if n_past else None
    return q, k, v, past


def padded_window_mask(batch, n_new, n_total, pads, window=None, sink=0):
    allowed = causal_allowed(n_new, n_total, None, window, sink).expand(batch, 1, n_new, n_total).clone()
    for row, n_pad in enumerate(pads):
        allowed[row, ..., :n_pad] = False
    return allowed


@pytest.mark.parametrize("block_size", [64, 200, None])
@pytest.mark.parametrize("n_past", [0, 37])
def test_blocked_kernel_at_long_length_equals_the_loop(block_size, n_past):
    length = 520
    q, k, v, past = random_inputs(length, n_past=n_past)
    allowed = padded_window_mask(2, length, n_past + length, pads=[0, n_past + 45])
    reference = ka_attention_naive(q, k, v, past_outputs=past, allowed=allowed, scale=0.3)
    blocked = ka_attention(
        q, k, v, past_outputs=past, allowed=allowed, scale=0.3, block_size=block_size, kernel="blocked"
    )
    assert (blocked - reference).abs().max() < 1e-10
    no_mask = ka_attention(q, k, v, past_outputs=past, scale=0.3, block_size=block_size, kernel="blocked")
    assert (no_mask - ka_attention_naive(q, k, v, past_outputs=past, scale=0.3)).abs().max() < 1e-10
    explicit = ka_attention_blocked(
        q, k, v, past_outputs=past, allowed=allowed, scale=0.3, block_size=block_size, fused=False
    )  # the past as other devices compute it
    assert (explicit - reference).abs().max() < 1e-10


# fused=False: the explicit-tile past that non-CPU devices (and softcapped models) run
@pytest.mark.parametrize(
    "softcap,window,sink,fused",
    [
        (None, None, 0, True),
        (None, 50, 4, True),
        (None, None, 0, False),
        (None, 50, 4, False),
        (3.0, None, 0, False),
        (3.0, 50, 0, False),
    ],
)
def test_blocked_gradients_at_long_length_equal_autograd_through_the_loop(softcap, window, sink, fused):
    length, n_past = 260, 20
    inputs = random_inputs(length, n_past=n_past, seed=1)
    allowed = padded_window_mask(2, length, n_past + length, pads=[0, 30], window=window, sink=sink)
    upstream = torch.randn(2, 4, length, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = []
    for run in (
        lambda q, k, v, p: ka_attention_naive(q, k, v, past_outputs=p, allowed=allowed, scale=0.3, softcap=softcap),
        lambda q, k, v, p: ka_attention_blocked(
            q, k, v, past_outputs=p, allowed=allowed, scale=0.3, softcap=softcap, block_size=64, fused=fused
        ),
    ):
        leaves = [t.clone().requires_grad_() for t in inputs]
        (run(*leaves) * upstream).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, loop_grad, blocked_grad in zip(("query", "key", "value", "past outputs"), *grads):
        assert (blocked_grad - loop_grad).abs().max() < 1e-10, name


def test_blocked_kernel_keeps_no_square_matrix_for_the_backward():
    """What autograd saves for the backward is O(T): q, k, v, A and one normalizer per row, no T x T weights."""
    length = 1024
    q, k, v, _ = random_inputs(length, batch=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ka_attention(*leaves, scale=0.3, kernel="blocked")
    assert max(saved) <= 4 * length * 8  # the largest saved tensor is (1, H_q, T, d), never (.., T, T)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ka_attention(*leaves, scale=0.3, kernel="parallel", block_size=256)
    assert max(saved) >= 4 * 256 * length  # the explicit kernel keeps (block x T) weights per head: the contrast


# ---------------------------------------------------------------------------------------------------------
# Window caches


def generate_logits(model, input_ids, cache, new_tokens):
    """Greedy decoding one token at a time through `cache`; per-step logits and the cache's size after each step."""
    with torch.no_grad():
        logits = model(input_ids, past_key_values=cache, use_cache=True).logits
        steps, sizes, ids = [logits[:, -1]], [], input_ids
        for _ in range(new_tokens):
            ids = torch.cat([ids, steps[-1].argmax(-1, keepdim=True)], dim=-1)
            steps.append(model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1])
            sizes.append((max(layer.keys.shape[-2] for layer in cache.layers), cache_nbytes(cache)))
    return torch.stack(steps, dim=1), ids, sizes


def uncached_ka_logits(model, ids, mask=None):
    with torch.no_grad(), ka_hf.exact_ka(model, kernel="loop"):
        return model(ids, attention_mask=mask, use_cache=False).logits


def test_native_sliding_window_layers_keep_only_their_window():
    """Mistral's own window (5): the KA cache holds at most window - 1 tokens per layer, and decoding 10x the
    window gives exactly the uncached KA logits (the model's window applies to KA as to standard attention)."""
    model = tiny_model("mistral-sliding")
    prompt = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    cache = KACache()
    steps, ids, sizes = generate_logits(model, prompt, cache, new_tokens=50)
    assert all(isinstance(layer, KAWindowLayer) and layer.window == 5 for layer in cache.layers)
    assert max(rows for rows, _ in sizes) == 4
    reference = uncached_ka_logits(model, ids)[:, prompt.shape[1] - 1 :]
    assert (steps - reference).abs().max() < 1e-10
    assert cache.get_seq_length() == ids.shape[1]  # generate()'s positions count every token seen


@pytest.mark.parametrize("arch_name", ["llama-gqa", "gpt-neox", "gpt2"])
def test_window_with_sinks_equals_the_uncached_windowed_reference(arch_name):
    """KACache(window=6, sink=2) decoding token by token = one uncached KA pass under the window-with-sinks mask
    (computed by the reference loop); memory stays flat while generating 10x the window."""
    model = tiny_model(arch_name, max_positions=128)
    prompt = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    cache = KACache(window=6, sink=2)
    steps, ids, sizes = generate_logits(model, prompt, cache, new_tokens=60)
    assert {rows for rows, _ in sizes[5:]} == {2 + 5}
    assert len({nbytes for _, nbytes in sizes[5:]}) == 1  # flat
    mask = window_attention_mask(torch.ones_like(ids), window=6, sink=2, dtype=torch.float64)
    reference = uncached_ka_logits(model, ids, mask)[:, prompt.shape[1] - 1 :]
    assert (steps - reference).abs().max() < 1e-10
    full = uncached_ka_logits(model, ids)[:, prompt.shape[1] - 1 :]
    assert (steps - full).abs().max() > 1e-3  # the window really changes the result


def test_window_cache_with_left_padding_matches_each_row_alone():
    """A window counts positions back from each query, so left padding changes nothing (sinks, by contrast, are
    the batch's first positions: with left padding a padded row's sink slots hold padding, see the docs)."""
    model = tiny_model("llama-gqa", max_positions=128)
    rows = [torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in (9, 5)]
    padded = torch.zeros(2, 9, dtype=torch.long)
    attention_mask = torch.zeros(2, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, 9 - row.shape[1] :], attention_mask[i, 9 - row.shape[1] :] = row, 1
    with torch.no_grad():
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does
        batch_logits = model(
            padded,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=KACache(window=4),
            use_cache=True,
        ).logits
        for i, row in enumerate(rows):
            alone = model(row, past_key_values=KACache(window=4), use_cache=True).logits
            assert (batch_logits[i, 9 - row.shape[1] :] - alone[0]).abs().max() < 1e-10


def test_generate_with_a_window_cache_and_beam_search():
    model = tiny_model("llama-gqa", max_positions=128)
    prompt = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    greedy = model.generate(
        prompt, past_key_values=KACache(window=5, sink=1), max_new_tokens=20, do_sample=False, pad_token_id=0
    )
    steps, ids, _ = generate_logits(model, prompt, KACache(window=5, sink=1), new_tokens=20)
    assert torch.equal(greedy, ids)
    beams = model.generate(
        prompt,
        past_key_values=KACache(window=5, sink=1),
        max_new_tokens=8,
        num_beams=3,
        do_sample=False,
        pad_token_id=0,
    )
    assert beams.shape == (1, 14)


def test_window_options_are_checked():
    for bad in (dict(window=0), dict(sink=2), dict(window=4, sink=-1)):
        with pytest.raises(KAError):
            KACache(**bad)
    with pytest.raises(KAError, match="block_size"):
        KACache(block_size=0)
    with pytest.raises(KAError, match="kernel"):
        KACache(kernel="fast")


def test_decode_writes_into_spare_rows_instead_of_copying_the_cache():
    model = tiny_model("llama-gqa")
    cache = KACache()
    prompt = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    generate_logits(model, prompt, cache, new_tokens=3)
    layer = cache.layers[0]
    pointer = layer.values.data_ptr()
    generate_logits(model, torch.cat([prompt, prompt], dim=1)[:, :1], cache, new_tokens=2)
    assert layer.values.data_ptr() == pointer  # same allocation: rows were appended in place


@pytest.mark.parametrize("arch_name", ["llama-gqa", "mistral-sliding"])
def test_kv_window_cache_equals_standard_attention_under_the_window_mask(arch_name):
    """The KV counterpart: decoding through KVWindowCache = standard attention under the window-with-sinks mask;
    it stores values per key-value head, so with GQA it is smaller than the KA window cache."""
    model = tiny_model(arch_name, max_positions=128)
    prompt = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    cache = ka_hf.KVWindowCache(window=6, sink=2)
    steps, ids, sizes = generate_logits(model, prompt, cache, new_tokens=30)
    assert {rows for rows, _ in sizes[5:]} <= {7, 6}  # 2 sinks + 5 recent (mistral: its own window 5, 4 recent)
    mask = window_attention_mask(torch.ones_like(ids), window=6, sink=2, dtype=torch.float64)
    native = getattr(model.config, "sliding_window", None)
    if native is not None:  # a custom 4-D mask replaces HF's own: apply the model's window too
        mask = torch.minimum(mask, window_attention_mask(torch.ones_like(ids), window=native, dtype=torch.float64))
    with torch.no_grad():
        reference = model(ids, attention_mask=mask, use_cache=False).logits[:, prompt.shape[1] - 1 :]
    assert (steps - reference).abs().max() < 1e-10
    ka_cache = KACache(window=6, sink=2)
    generate_logits(model, prompt, ka_cache, new_tokens=30)
    assert cache_nbytes(cache) < cache_nbytes(ka_cache)  # GQA: V per kv head, A per query head
    with pytest.raises(KAError, match="window"):
        ka_hf.KVWindowCache(window=None)


def test_long_window_decoding_shifts_rows_in_place_and_stays_exact():
    """A window of 40 (+2 sinks) over 100 decode steps: once full, each step moves the kept rows down inside the
    same allocation (no new buffer per step) and the logits still equal the uncached windowed reference."""
    model = tiny_model("llama-gqa", max_positions=160)
    prompt = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    cache = KACache(window=40, sink=2)
    pointers = []
    with torch.no_grad():
        logits = [model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]]
        ids = prompt
        for _ in range(100):
            ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], dim=-1)
            logits.append(model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1])
            pointers.append(cache.layers[0].values.data_ptr())
    assert cache.layers[0].values.shape[-2] == 2 + 39
    assert len(set(pointers[60:])) == 1  # the window is full: rows shift inside one allocation
    mask = window_attention_mask(torch.ones_like(ids), window=40, sink=2, dtype=torch.float64)
    reference = uncached_ka_logits(model, ids, mask)[:, prompt.shape[1] - 1 :]
    assert (torch.stack(logits, dim=1) - reference).abs().max() < 1e-10
