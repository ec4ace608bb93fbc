"""generate() with a KACache, compared step by step on its logits and scores (not only its tokens) with the
independent oracle's KA logits of the generated sequences (tests/oracle.py): greedy left-padded batches, beam
search (per-beam logits via beam_indices, sequences_scores, transition scores) and sampling with a fixed seed.

Each step is checked twice: the float64 logits the model returned inside generate (a forward hook), to 1e-10,
and generate's own float32 `logits` output, to float32 rounding.
"""

import oracle
import pytest
import torch

from ka_hf import KACache

from conftest import FEATURE_MODELS, VOCAB

PROMPT, NEW = 7, 6
ROW_LENGTHS = (7, 4)  # row 1 carries 3 left pads
TOL = 1e-10
SETTINGS = dict(
    max_new_tokens=NEW,
    pad_token_id=0,
    eos_token_id=None,
    return_dict_in_generate=True,
    output_logits=True,
    output_scores=True,
)
CASES = [(name, impl) for name, (_, impls) in FEATURE_MODELS.items() for impl in (impls[0], "ka_oracle")]


def prompt_batch(seed=2):
    padding = oracle.left_padding_mask(ROW_LENGTHS, PROMPT)
    input_ids = torch.randint(1, VOCAB, (len(ROW_LENGTHS), PROMPT), generator=torch.Generator().manual_seed(seed))
    return input_ids * padding, padding


def generate_with_float64_logits(model, input_ids, padding, **options):
    """generate(...) and the float64 logits of the last position of every forward it made."""
    steps = []
    hook = model.register_forward_hook(lambda module, args, output: steps.append(output.logits[:, -1].detach().clone()))
    try:
        out = model.generate(input_ids, attention_mask=padding, **SETTINGS, **options)
    finally:
        hook.remove()
    return out, steps


def oracle_step_logits(model, sequences, prompt_padding):
    """Oracle KA logits (n_sequences, generated, vocab) that predicted each token of `sequences` after the prompt
    (`prompt_padding`: the prompt's 2-D mask, one row per prompt)."""
    prompt = prompt_padding.shape[1]
    repeat = sequences.shape[0] // prompt_padding.shape[0]
    padding = torch.cat(
        [
            prompt_padding.repeat_interleave(repeat, 0),
            torch.ones(sequences.shape[0], sequences.shape[1] - prompt, dtype=torch.long),
        ],
        dim=1,
    )
    logits = oracle.oracle_logits(model, sequences, padding, oracle.generate_position_ids(padding))
    return logits[:, prompt - 1 : -1]


def assert_steps_match(out, steps, expected, rows=None):
    """Per step t: the row of the batch (or beam) that produced token t, against the oracle. `steps` None: only
    generate's float32 logits are compared."""
    n, n_steps = expected.shape[:2]
    assert len(out.logits) == n_steps and (steps is None or len(steps) == n_steps)
    for t in range(n_steps):
        index = torch.arange(n) if rows is None else rows[:, t].long()
        if steps is not None:
            float64 = steps[t][index]
            diff = (float64 - expected[:, t]).abs().max().item()
            assert torch.isfinite(float64).all() and diff < TOL, f"step {t}: float64 logits off by {diff:.3e}"
        float32 = out.logits[t][index].double()
        f32_tol = 2 * torch.finfo(torch.float32).eps * max(1.0, expected[:, t].abs().max().item())
        diff = (float32 - expected[:, t]).abs().max().item()
        assert diff <= f32_tol, f"step {t}: generate's logits off by {diff:.3e}"


@pytest.mark.parametrize("name,impl", CASES)
def test_greedy_left_padded_batch_logits(name, impl):
    model = FEATURE_MODELS[name][0](impl)
    input_ids, padding = prompt_batch()
    out, steps = generate_with_float64_logits(model, input_ids, padding, past_key_values=KACache(), do_sample=False)
    expected = oracle_step_logits(model, out.sequences, padding)
    assert_steps_match(out, steps, expected)
    assert torch.equal(out.sequences[:, PROMPT:], expected.argmax(-1))


@pytest.mark.parametrize("name", ["gpt2-layer-scale", "llama-gqa", "mistral-sliding", "gemma2-softcap"])
def test_beam_search_scores(name):
    model = FEATURE_MODELS[name][0](FEATURE_MODELS[name][1][0])
    input_ids, padding = prompt_batch()
    beams = dict(num_beams=3, num_return_sequences=2, do_sample=False, length_penalty=1.0)
    out, steps = generate_with_float64_logits(model, input_ids, padding, past_key_values=KACache(), **beams)
    expected = oracle_step_logits(model, out.sequences, padding)
    assert_steps_match(out, steps, expected, rows=out.beam_indices)

    log_probs = torch.log_softmax(expected, -1).gather(-1, out.sequences[:, PROMPT:, None])[..., 0]
    transition = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
    assert (transition.double() - log_probs).abs().max() < 1e-5
    assert (out.sequences_scores.double() - log_probs.sum(-1) / NEW).abs().max() < 1e-5  # length_penalty 1

    # The oracle itself, uncached, with the same beam settings: the same beams.
    with oracle.oracle(model, "ka"):
        reference = model.generate(input_ids, attention_mask=padding, use_cache=False, **beams, **SETTINGS)
    assert torch.equal(reference.sequences, out.sequences)
    assert (reference.sequences_scores - out.sequences_scores).abs().max() < 1e-6


@pytest.mark.parametrize("name", ["gpt-neox-partial-rotary", "qwen2-sliding", "gemma2-softcap"])
def test_sampling_with_a_fixed_seed(name):
    model = FEATURE_MODELS[name][0](FEATURE_MODELS[name][1][0])
    input_ids, padding = prompt_batch()
    sampling = dict(do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(11)
    out, steps = generate_with_float64_logits(model, input_ids, padding, past_key_values=KACache(), **sampling)
    expected = oracle_step_logits(model, out.sequences, padding)
    assert_steps_match(out, steps, expected)
    with oracle.oracle(model, "ka"):
        torch.manual_seed(11)
        reference = model.generate(input_ids, attention_mask=padding, use_cache=False, **sampling, **SETTINGS)
    assert torch.equal(reference.sequences, out.sequences)


@pytest.mark.parametrize("name", ["llama-gqa", "gemma2-softcap"])
def test_second_turn_on_the_same_cache(name):
    """A second generate() on the same KACache: its prompt (the first answer's last token and a new turn of 3
    tokens) is one chunk over the cached past."""
    model = FEATURE_MODELS[name][0](FEATURE_MODELS[name][1][0])
    input_ids, padding = prompt_batch()
    cache = KACache()
    first, _ = generate_with_float64_logits(model, input_ids, padding, past_key_values=cache, do_sample=False)
    turn = torch.randint(1, VOCAB, (len(ROW_LENGTHS), 3), generator=torch.Generator().manual_seed(5))
    input_ids = torch.cat([first.sequences, turn], dim=1)
    padding = torch.cat([padding, torch.ones_like(input_ids[:, PROMPT:])], dim=1)
    second, steps = generate_with_float64_logits(model, input_ids, padding, past_key_values=cache, do_sample=False)
    assert_steps_match(second, steps, oracle_step_logits(model, second.sequences, padding))


def test_assisted_decoding_logits():
    """Assisted decoding verifies several candidate tokens in one chunk over the cached past, then crops."""
    model = FEATURE_MODELS["llama-gqa"][0]("sdpa")
    assistant = FEATURE_MODELS["llama-gqa"][0]("sdpa")
    torch.manual_seed(5)
    for parameter in assistant.parameters():  # a different but related model: some candidates are rejected
        parameter.data.add_(0.02 * torch.randn_like(parameter))
    input_ids, padding = prompt_batch()
    input_ids, padding = input_ids[:1], padding[:1]
    out = model.generate(
        input_ids,
        attention_mask=padding,
        past_key_values=KACache(),
        assistant_model=assistant,
        do_sample=False,
        **SETTINGS,
    )
    assert_steps_match(out, None, oracle_step_logits(model, out.sequences, padding))
