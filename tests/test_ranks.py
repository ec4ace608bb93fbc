"""The right name's rank among the trained names (ka_hf.study.evaluation.ranks): candidates built right, each
candidate's log-likelihood equal to HF's own loss over the name, ranks by hand, and a model that learned the
backward sentences ranks every right name first while an untrained one ranks near chance."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import ka_hf
from ka_hf.errors import KAError
from ka_hf.modes import Mode
from ka_hf.study.data import train_tokenizer
from ka_hf.study.evaluation.ranks import candidate_windows, name_ranks, rank_summary
from ka_hf.study.evaluation.reversal import sentence_windows
from ka_hf.study.facts import TEMPLATES, fact_sentences, make_facts, training_texts
from ka_hf.study.models import model_config

FACTS = make_facts(5, seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    facts = make_facts(40, seed=3)
    texts = training_texts(facts) + [s.text for d in ("forward", "backward") for s in fact_sentences(facts, d, "test")]
    return train_tokenizer(texts, vocab_size=500)


def new_model(tokenizer, dtype=torch.float64, seed=0, hidden_size=32):
    torch.manual_seed(seed)
    config = model_config(
        "gpt-neox", vocab_size=len(tokenizer), num_layers=2, hidden_size=hidden_size, num_heads=4, max_positions=64
    )
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def test_candidates_are_the_backward_sentence_with_every_name(tokenizer):
    windows = candidate_windows(FACTS, tokenizer)
    sentences = fact_sentences(FACTS, "backward", "test")
    assert len(windows) == len(sentences) * len(FACTS) == len(FACTS) * len(TEMPLATES[("backward", "test")]) * 5
    truth = sentence_windows(sentences, tokenizer)
    for index, true_window in enumerate(truth):
        candidates = [w for w in windows if w["sentence"] == index]
        right = [w for w in candidates if w["right"]]
        assert len(candidates) == len(FACTS) and len(right) == 1
        assert torch.equal(right[0]["input_ids"], true_window["input_ids"])
        assert {w["answer"] for w in candidates} == {fact.name for fact in FACTS}
        prompt = [int((w["labels"] != -100).nonzero()[0]) for w in candidates]
        assert len(set(prompt)) == 1  # every candidate continues the same prompt


@pytest.mark.parametrize("kind", ["kv", "ka"])
def test_log_likelihood_equals_hf_loss_over_the_name(tokenizer, kind):
    from ka_hf.study.evaluation.ranks import answer_log_likelihoods

    model = new_model(tokenizer)
    windows = candidate_windows(FACTS[:3], tokenizer)[:6]
    ours = []
    for window in windows:  # one at a time: no padding
        ours += answer_log_likelihoods(model, [window], Mode(kind), None, 0, "cpu")
    for window, value in zip(windows, ours):
        labels = window["labels"][None]
        with ka_hf.exact_ka(model) if kind == "ka" else torch.no_grad(), torch.no_grad():
            loss = model(window["input_ids"][None], labels=labels).loss
        count = int((labels[:, 1:] != -100).sum())
        assert value == pytest.approx(-float(loss) * count, rel=1e-6)  # HF takes its loss in float32


def test_rank_summary_by_hand():
    windows = [dict(sentence=s, right=r) for s in (0, 1) for r in (True, False, False)]
    # sentence 0: the right name is the likeliest (rank 1); sentence 1: one other name is likelier (rank 2)
    summary = rank_summary(windows, [-1.0, -3.0, -2.0, -2.0, -1.0, -5.0])
    assert summary["mean_rank"] == 1.5 and summary["top1"] == 0.5 and summary["chance_rank"] == 2.0
    assert summary["mean_reciprocal_rank"] == pytest.approx(0.75)
    assert summary["right_log_likelihood"] == -1.5 and summary["other_log_likelihood"] == pytest.approx(-2.75)
    # ties share their ranks: every name scored alike is chance, not a perfect rank
    tied = rank_summary([dict(sentence=0, right=r) for r in (True, False, False, False)], [-2.0] * 4)
    assert tied["mean_rank"] == tied["chance_rank"] == 2.5 and tied["top1"] == 0.0
    with pytest.raises(KAError, match="exactly one right name"):
        rank_summary([dict(sentence=0, right=False)] * 2, [0.0, 0.0])


def learned_backward_model(tokenizer, facts, steps=150):
    """A tiny model trained on the backward held-out sentences themselves: it knows which name ends each."""
    model = new_model(tokenizer, dtype=torch.float32, seed=1, hidden_size=64).train()
    windows = sentence_windows(fact_sentences(facts, "backward", "test"), tokenizer)
    longest = max(len(w["input_ids"]) for w in windows)
    pad = [longest - len(w["input_ids"]) for w in windows]
    input_ids = torch.stack(
        [torch.cat([w["input_ids"], torch.zeros(p, dtype=torch.long)]) for w, p in zip(windows, pad)]
    )
    labels = torch.stack([torch.cat([w["input_ids"], torch.full((p,), -100)]) for w, p in zip(windows, pad)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids, labels=labels).loss.backward()
        optimizer.step()
    return model.eval()


def test_a_model_that_knows_the_names_backward_ranks_them_first(tokenizer):
    learned = learned_backward_model(tokenizer, FACTS)
    ranks = name_ranks(learned, tokenizer, FACTS, Mode("kv"), progress=False)
    assert ranks["top1"] == 1.0 and ranks["mean_rank"] == 1.0 and ranks["sentences"] == 15
    # batched with padding (several prompt lengths, names of several lengths) = one candidate at a time
    one_by_one = name_ranks(learned, tokenizer, FACTS, Mode("ka-hybrid"), batch_size=1, progress=False)
    batched = name_ranks(learned, tokenizer, FACTS, Mode("ka-hybrid"), batch_size=64, progress=False)
    assert batched == pytest.approx(one_by_one, rel=1e-5)
    untrained = name_ranks(new_model(tokenizer), tokenizer, FACTS, Mode("kv"), progress=False)
    assert untrained["mean_rank"] > 1.5 and untrained["chance_rank"] == 3.0


def test_ranking_needs_two_facts(tokenizer):
    with pytest.raises(KAError, match="at least 2 facts"):
        name_ranks(new_model(tokenizer), tokenizer, FACTS[:1], Mode("kv"), progress=False)
