"""Tests for ka_hf.study.facts: the reversal-curse facts, templates and answer-span labels."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ka_hf.errors import KAError
from ka_hf.study.data import default_corpus, train_tokenizer
from ka_hf.study.facts import (
    MAX_FACTS,
    TEMPLATES,
    Fact,
    answer_span_labels,
    fact_sentences,
    make_facts,
    training_texts,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def facts():
    return make_facts(1000, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    # A small tokenizer that saw some facts and some prose, as a quick study's would.
    texts = default_corpus("train")[:200] + training_texts(make_facts(100, seed=5))
    return train_tokenizer(texts, vocab_size=1200)


def test_same_seed_same_facts_other_seed_differs(facts):
    assert make_facts(1000, seed=0) == facts
    assert make_facts(1000, seed=1) != facts
    assert make_facts(10, seed=0) != make_facts(10, seed=1)
    assert all(isinstance(fact, Fact) for fact in facts)


FACTS_DIGEST = """
import sys, types
ka_hf = types.ModuleType("ka_hf")  # skip ka_hf/__init__.py (it imports transformers): keeps this fast
ka_hf.__path__ = ["ka_hf"]
sys.modules["ka_hf"] = ka_hf
from ka_hf.study.facts import make_facts
print(repr(make_facts(50, seed=3)))
"""


def test_facts_do_not_depend_on_hash_randomization():
    env = {**os.environ, "PYTHONHASHSEED": "777", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", FACTS_DIGEST], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == repr(make_facts(50, seed=3))


def test_names_and_descriptions_are_unique(facts):
    names = [fact.name for fact in facts]
    descriptions = [fact.description for fact in facts]
    assert len(set(names)) == len(facts) == len(set(descriptions))
    assert not set(names) & set(descriptions)
    assert all(len(name.split()) == 2 and name.istitle() for name in names)
    assert all(description.startswith("the ") and description[-1].isalpha() for description in descriptions)
    families = {" ".join(description.split()[:3]) for description in descriptions}
    assert len(families) >= 8  # descriptions are varied, not one pattern


def test_largest_set_is_unique_and_too_many_is_an_error():
    everything = make_facts(MAX_FACTS, seed=2)
    assert len({fact.name for fact in everything}) == MAX_FACTS
    assert len({fact.description for fact in everything}) == MAX_FACTS
    with pytest.raises(KAError, match="at most"):
        make_facts(MAX_FACTS + 1)


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_sentences_split_into_prompt_answer_punctuation(facts, direction, split):
    sentences = fact_sentences(facts[:50], direction, split)
    assert len(sentences) == 50 * len(TEMPLATES[(direction, split)])
    for sentence in sentences:
        fact = facts[sentence.fact_index]
        assert sentence.answer == (fact.description if direction == "forward" else fact.name)
        assert sentence.text.startswith(sentence.prompt + sentence.answer)
        assert sentence.text[sentence.answer_start : sentence.answer_end] == sentence.answer
        assert sentence.text[sentence.answer_end :] in {".", "!", "?"}
        other = fact.name if direction == "forward" else fact.description
        assert other in sentence.prompt or other[0].upper() + other[1:] in sentence.prompt
        assert sentence.text[0].isupper()


def test_train_and_test_templates_are_disjoint(facts):
    for direction in ("forward", "backward"):
        assert not set(TEMPLATES[(direction, "train")]) & set(TEMPLATES[(direction, "test")])
    trained = set(training_texts(facts, include="both"))
    for direction in ("forward", "backward"):
        assert not trained & {s.text for s in fact_sentences(facts, direction, "test")}


def test_training_texts_directions(facts):
    few = facts[:20]
    forward = set(training_texts(few, include="forward"))
    backward = set(training_texts(few, include="backward"))
    both = training_texts(few, include="both", seed=1)
    assert forward == {s.text for s in fact_sentences(few, "forward", "train")}
    assert set(both) == forward | backward and not forward & backward
    assert both == training_texts(few, include="both", seed=1)
    assert both != training_texts(few, include="both", seed=2)  # shuffled by seed
    with pytest.raises(KAError):
        training_texts(few, include="sideways")
    with pytest.raises(KAError):
        fact_sentences(few, "forward", "validation")


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_answer_labels_decode_to_the_answer(facts, tokenizer, direction):
    sentences = fact_sentences(facts[:40], direction, "train") + fact_sentences(facts[:40], direction, "test")
    for sentence in sentences:
        input_ids, whole_labels, answer_labels = answer_span_labels(sentence, tokenizer)
        assert input_ids.dtype == whole_labels.dtype == answer_labels.dtype == torch.long
        assert torch.equal(whole_labels, input_ids)
        assert tokenizer.decode(input_ids) == sentence.text
        in_answer = answer_labels != -100
        assert torch.equal(answer_labels[in_answer], input_ids[in_answer])
        positions = in_answer.nonzero().flatten().tolist()
        assert positions == list(range(positions[0], positions[-1] + 1))  # one contiguous span
        assert positions[0] > 0  # never label position 0, which the model cannot score
        assert tokenizer.decode(input_ids[in_answer]).lstrip(" ") == sentence.answer


@pytest.mark.parametrize("include", ["forward", "backward", "both"])
def test_training_texts_hold_only_the_directions_asked(facts, include):
    """Read from the facts' fields, not from the templates: forward lines name the person first."""
    few = facts[:30]
    wanted = {"forward", "backward"} if include == "both" else {include}
    found = {}
    for text in training_texts(few, include=include):
        fact = next(fact for fact in few if fact.name in text)
        lowered = text.lower()
        direction = (
            "forward" if lowered.index(fact.name.lower()) < lowered.index(fact.description.lower()) else "backward"
        )
        found.setdefault(direction, set()).add(fact)
    assert set(found) == wanted
    assert all(found[direction] == set(few) for direction in wanted)  # every fact, in every direction asked
