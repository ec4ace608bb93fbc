"""Tests for ka_hf.study.evaluation.reversal and examples/reversal_curse.py: forward vs backward PPL of fact sentences.

The PPL numbers are checked against an independent computation: a plain `model(input_ids, labels=...)` loss per
sentence with -100 outside the span (under `ka_hf.exact_ka(model)` for ka). Exact match is checked on tiny models
trained here to memorize three facts, with standard attention (kv) and with exact KA (ka).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import ka_hf
from ka_hf.errors import KAError
from ka_hf.study.data import train_tokenizer
from ka_hf.study.evaluation import Mode, parse_modes
from ka_hf.study.evaluation.reversal import (
    answer_matches,
    greedy_continuations,
    prompt_batches,
    recorded_facts,
    reversal_metrics,
    reversal_table,
    sentence_windows,
)
from ka_hf.study.facts import TEMPLATES, answer_span_labels, fact_sentences, make_facts, training_texts
from ka_hf.study.models import model_config

from conftest import REPO_ROOT, load_script

SCRIPT = REPO_ROOT / "examples" / "reversal_curse.py"
FACTS = make_facts(4, seed=1)
RTOL = 1e-6  # the bound for "the same PPL" (ppl.token_nll takes the NLL in float32)


@pytest.fixture(scope="module")
def tokenizer():
    facts = make_facts(40, seed=1)
    texts = training_texts(facts) + [s.text for d in ("forward", "backward") for s in fact_sentences(facts, d, "test")]
    return train_tokenizer(texts, vocab_size=500)


def new_model(tokenizer, dtype=torch.float64, seed=0, hidden_size=32):
    torch.manual_seed(seed)
    config = model_config(
        "gpt2", vocab_size=len(tokenizer), num_layers=2, hidden_size=hidden_size, num_heads=4, max_positions=64
    )
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return new_model(tokenizer)


# -----------------------------------------------------------------------------
# PPL = an independent loss computation over the same spans


def independent_ppl(model, tokenizer, sentences, span: str):
    """exp(token-weighted mean of HF's own loss), sentence by sentence: bos + sentence, -100 outside the span."""
    nll, tokens = 0.0, 0
    for sentence in sentences:
        ids, whole, answer = answer_span_labels(sentence, tokenizer)
        input_ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])[None]
        labels = torch.cat([torch.tensor([-100]), whole if span == "whole" else answer])[None]
        count = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            nll += float(model(input_ids, labels=labels).loss) * count
        tokens += count
    return math.exp(nll / tokens), tokens


@pytest.mark.parametrize("kind", ["kv", "ka"])
def test_ppl_equals_independent_loss(model, tokenizer, kind):
    results = reversal_metrics(model, tokenizer, FACTS, [Mode(kind)], batch_size=3, exact_match=False, progress=False)
    for split, summary in results[kind]["splits"].items():
        for direction in ("forward", "backward"):
            record = summary[direction]
            sentences = fact_sentences(FACTS, direction, split)
            assert record["sentences"] == len(sentences)
            with ka_hf.exact_ka(model) if kind == "ka" else torch.no_grad():
                whole_ppl, whole_tokens = independent_ppl(model, tokenizer, sentences, "whole")
                answer_ppl, answer_tokens = independent_ppl(model, tokenizer, sentences, "answer")
            assert record["ppl"] == pytest.approx(whole_ppl, rel=RTOL)
            assert record["answer_ppl"] == pytest.approx(answer_ppl, rel=RTOL)
            assert (record["tokens"], record["answer_tokens"]) == (whole_tokens, answer_tokens)
            assert 0 < answer_tokens < whole_tokens
        forward, backward = summary["forward"], summary["backward"]
        assert summary["ratio"] == pytest.approx(forward["ppl"] / backward["ppl"], rel=1e-12)
        assert summary["gap"] == pytest.approx(backward["ppl"] - forward["ppl"], rel=1e-12)
        assert summary["answer_ratio"] == pytest.approx(forward["answer_ppl"] / backward["answer_ppl"], rel=1e-12)
        assert summary["answer_gap"] == pytest.approx(backward["answer_ppl"] - forward["answer_ppl"], rel=1e-12)


def test_ka_differs_from_kv_and_batching_changes_nothing(model, tokenizer):
    modes = parse_modes("kv,ka,ka-hybrid")
    one = reversal_metrics(
        model, tokenizer, FACTS, modes, split="test", batch_size=1, exact_match=False, progress=False
    )
    padded = reversal_metrics(
        model, tokenizer, FACTS, modes, split="test", batch_size=8, exact_match=False, progress=False
    )
    for name in one:
        for direction in ("forward", "backward"):
            a, b = one[name]["splits"]["test"][direction], padded[name]["splits"]["test"][direction]
            assert a["ppl"] == pytest.approx(b["ppl"], rel=RTOL)
            assert a["answer_ppl"] == pytest.approx(b["answer_ppl"], rel=RTOL)
    assert one["ka"]["splits"]["test"]["forward"]["ppl"] != pytest.approx(one["kv"]["splits"]["test"]["forward"]["ppl"])
    assert list(one["kv"]["splits"]) == ["test"]


def test_prompt_is_the_text_before_the_answer(tokenizer):
    sentence = fact_sentences(FACTS, "backward", "test")[0]
    [window] = sentence_windows([sentence], tokenizer)
    [[batched]] = prompt_batches([window], 4)
    prompt = int((batched["labels"] != -100).nonzero()[0])
    assert window["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode(window["input_ids"][1:prompt]) + " " == sentence.prompt
    assert tokenizer.decode(window["input_ids"][prompt : prompt + window["answer_tokens"]]).strip() == sentence.answer


# -----------------------------------------------------------------------------
# exact match


def test_answer_matches():
    assert answer_matches(" the inventor of the amber loom.", "the inventor of the amber loom")
    assert answer_matches("Orwyn Quillmere", "Orwyn Quillmere")
    assert answer_matches(" Orwyn Quillmere, who", "Orwyn Quillmere")
    assert not answer_matches(" Orwyn Quillmeres", "Orwyn Quillmere")
    assert not answer_matches(" Orwyn Quill", "Orwyn Quillmere")
    assert not answer_matches(" the inventor", "the inventor of the amber loom")


def memorizing_model(tokenizer, sentences, attention: str, steps: int = 150):
    """A tiny model trained until it has the sentences (bos + text) by heart, with standard or exact KA attention."""
    model = new_model(tokenizer, dtype=torch.float32, seed=1, hidden_size=64).train()
    windows = sentence_windows(sentences, tokenizer)
    longest = max(len(window["input_ids"]) for window in windows)
    input_ids = torch.stack(
        [torch.cat([w["input_ids"], torch.full((longest - len(w["input_ids"]),), 0)]) for w in windows]
    )
    labels = torch.stack(
        [torch.cat([w["input_ids"], torch.full((longest - len(w["input_ids"]),), -100)]) for w in windows]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    with ka_hf.exact_ka(model) if attention == "ka" else torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = model(input_ids, labels=labels).loss
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.mark.parametrize("kind", ["kv", "ka"])
def test_exact_match_of_memorized_facts(tokenizer, kind):
    facts = FACTS[:3]
    sentences = fact_sentences(facts, "forward", "test")
    model = memorizing_model(tokenizer, sentences, "ka" if kind == "ka" else "standard")
    results = reversal_metrics(model, tokenizer, facts, [Mode(kind)], split="test", progress=False)
    forward = results[kind]["splits"]["test"]["forward"]
    assert forward["exact_match"] == 1.0 and forward["exact_match_count"] == len(sentences)
    assert forward["answer_ppl"] < 1.1
    assert results[kind]["splits"]["test"]["backward"]["exact_match"] < 1.0  # never seen backward
    # batched greedy decoding (one prompt length per batch) = generate(), one prompt at a time, with the same cache
    windows = sentence_windows(sentences + fact_sentences(facts, "backward", "test"), tokenizer)
    for batch in prompt_batches(windows, 8):
        together = greedy_continuations(model, batch, tokenizer, Mode(kind), None, "cpu")
        assert together == [hf_generate(model, tokenizer, window, Mode(kind)) for window in batch]


def hf_generate(model, tokenizer, window, mode):
    prompt = int((window["labels"] != -100).nonzero()[0])
    output = model.generate(
        window["input_ids"][None, :prompt],
        max_new_tokens=window["answer_tokens"] + 1,
        do_sample=False,
        cache=mode.new_cache(),
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, prompt:], skip_special_tokens=True)


def test_untrained_model_matches_nothing(model, tokenizer):
    results = reversal_metrics(model, tokenizer, FACTS[:2], [Mode("ka-hybrid")], split="test", progress=False)
    summary = results["ka-hybrid"]["splits"]["test"]
    assert summary["forward"]["exact_match"] == summary["backward"]["exact_match"] == 0.0
    assert results["ka-hybrid"]["seconds"] >= results["ka-hybrid"]["generation_seconds"] > 0


def test_bad_arguments(model, tokenizer):
    with pytest.raises(KAError, match="no facts"):
        reversal_metrics(model, tokenizer, [], [Mode("kv")])
    with pytest.raises(KAError, match="template split"):
        reversal_metrics(model, tokenizer, FACTS, [Mode("kv")], split="validation")
    with pytest.raises(KAError, match="adapter"):
        reversal_metrics(model, tokenizer, FACTS, [Mode("ka+adapter")], progress=False)


# -----------------------------------------------------------------------------
# the script


def reversal_script():
    return load_script("reversal_curse")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny saved model whose config.ka records its training facts (as the experiment writes it)."""
    directory = tmp_path_factory.mktemp("tiny_facts_model")
    model = new_model(tokenizer, dtype=torch.float32)
    model.config.ka = {"attention": "standard"}
    model.config.ka_provenance = {"training": {"facts": {"n": 3, "seed": 7, "include": "forward"}}}
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_script_end_to_end(model_dir, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--model",
            str(model_dir),
            "--modes",
            "kv,ka,ka-hybrid",
            "--out",
            str(out),
            "--threads",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
    )  # this checkout's ka_hf
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "results.json").read_text())
    facts = record["facts"]
    assert (facts["n"], facts["seed"], facts["trained_on"]) == (3, 7, "forward")
    assert facts["source"] == "config.ka_provenance['training']['facts']"
    assert list(record["results"]) == ["kv", "ka", "ka-hybrid"] and record["splits"] == ["test", "train"]
    assert record["results"]["kv"]["splits"]["test"]["forward"]["sentences"] == 3 * len(TEMPLATES[("forward", "test")])
    assert {"torch", "transformers", "device"} <= set(record["environment"])
    markdown = (out / "results.md").read_text()
    assert "## test split" in markdown and "## train split" in markdown
    assert reversal_table(record["results"], "train") in markdown
    assert (
        "| mode | fwd PPL | bwd PPL | ratio | gap | fwd answer PPL | bwd answer PPL | answer ratio | EM fwd | EM bwd |"
    ) in markdown


def test_script_flags_override_the_record(model_dir, tmp_path, capsys):
    script = reversal_script()
    script.main(
        [
            "--model",
            str(model_dir),
            "--modes",
            "kv",
            "--facts",
            "2",
            "--facts-seed",
            "3",
            "--trained-on",
            "both",
            "--templates",
            "test",
            "--no-exact-match",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    record = json.loads((tmp_path / "results.json").read_text())
    assert (record["facts"]["n"], record["facts"]["seed"], record["facts"]["trained_on"]) == (2, 3, "both")
    assert record["results"]["kv"]["splits"]["test"]["forward"]["exact_match"] is None
    assert "test:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "/no/such/model"], "does not exist"),
        (["--model", "M", "--modes", "kv,qa"], "unknown mode"),
        (["--model", "M", "--modes", "ka+adapter"], "--adapter"),
        (["--model", "MODEL_DIR", "--modes", "ka@7"], "layer 7"),
    ],
)
def test_script_user_errors_exit_2(model_dir, tmp_path, capsys, flags, message):
    flags = [str(model_dir) if flag == "MODEL_DIR" else flag for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        reversal_script().main(flags + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after any loading progress bar
    assert error.startswith("error: ") and message in error


def test_script_needs_the_facts_when_the_model_does_not_record_them(tokenizer, tmp_path, capsys):
    new_model(tokenizer, dtype=torch.float32).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert recorded_facts(AutoModelForCausalLM.from_pretrained(tmp_path / "m").config) == {}
    with pytest.raises(SystemExit) as exit_info:
        reversal_script().main(["--model", str(tmp_path / "m"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "--facts N" in capsys.readouterr().err
