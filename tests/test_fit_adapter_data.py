"""examples/fit_adapter.py with no data flags (issue 13): it scores the text the model's training held out, at the
model's own training sequence length, and says which; without a record of that it refuses, naming the flag."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ka_hf.study.data import default_corpus, lm_blocks, tokenize_texts, train_tokenizer
from ka_hf.study.models import load_tokenizer, model_config

from conftest import TINY_TRAIN_FLAGS, load_script

FIT_FLAGS = ["--samples", "4", "--val-samples", "3", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    corpus = [text.replace("\n", " ") for text in default_corpus("train")[:60]]
    (folder / "train.txt").write_text("\n".join(corpus[:40]) + "\n")
    (folder / "valid.txt").write_text("\n".join(corpus[40:]) + "\n")
    return folder


@pytest.fixture(scope="module")
def trained(texts, tmp_path_factory):
    """train.py runs at --seq-len 16: one with a validation file, one that splits its text file's tail off."""
    runs = tmp_path_factory.mktemp("runs")
    train = load_script("train").main
    data = ["--text-file", str(texts / "train.txt"), "--samples", "8", *TINY_TRAIN_FLAGS]
    train([*data, "--val-text-file", str(texts / "valid.txt"), "--out", str(runs / "with-val")])
    train([*data, "--out", str(runs / "tail")])
    return runs


def fit(model_dir, out, capsys, *flags) -> tuple[dict, str]:
    capsys.readouterr()
    load_script("fit_adapter").main(["--model", str(model_dir), "--out", str(out), *FIT_FLAGS, *flags])
    return json.loads((out / "results.json").read_text()), capsys.readouterr().out


def test_scores_the_recorded_validation_file_at_the_training_length(trained, texts, tmp_path, capsys):
    record, printed = fit(trained / "with-val" / "best", tmp_path / "adapter", capsys)
    assert record["seq_len"] == 16 and record["val_blocks"] == 3
    said = record["held_out_text"]
    assert said.startswith(str(texts / "valid.txt")) and "blocks of 16 tokens" in said and "model's record" in said
    assert f"held-out text: {said}" in printed
    # the same PPL as the validation file's first 3 blocks of 16 tokens, scored by hand
    tokenizer = load_tokenizer(str(trained / "with-val" / "best"))
    blocks = lm_blocks(tokenize_texts((texts / "valid.txt").read_text().splitlines(), tokenizer), 16)[:3]
    model = AutoModelForCausalLM.from_pretrained(trained / "with-val" / "best")
    with torch.no_grad():
        loss = model(blocks, labels=blocks).loss
    assert record["ppl"]["kv"] == pytest.approx(float(torch.exp(loss)), rel=1e-4)


def test_scores_the_tail_that_training_held_out(trained, texts, tmp_path, capsys):
    record, _ = fit(trained / "tail" / "best", tmp_path / "adapter", capsys)
    assert record["seq_len"] == 16
    assert "the last 10% of" in record["held_out_text"] and str(texts / "train.txt") in record["held_out_text"]
    other, _ = fit(trained / "tail" / "best", tmp_path / "other", capsys, "--val-text-file", str(texts / "valid.txt"))
    assert other["held_out_text"].startswith(str(texts / "valid.txt"))


def exits_2(argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        load_script("fit_adapter").main([*argv, "--no-progress"])  # (which also silences loading bars)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def unrecorded_model(texts, tmp_path):
    """A saved model that says nothing about its training (as a Hub checkpoint)."""
    tokenizer = train_tokenizer((texts / "train.txt").read_text().splitlines(), vocab_size=300)
    config = model_config("gpt2", vocab_size=len(tokenizer), num_layers=1, hidden_size=32, num_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def test_refuses_without_held_out_text_naming_the_flag(unrecorded_model, texts, tmp_path, capsys):
    model, model_dir = unrecorded_model
    out = tmp_path / "adapter"
    line = exits_2(["--model", str(model_dir), "--out", str(out)], capsys)
    assert "does not record the data" in line and "--text-file" in line and "--val-text-file" in line
    line = exits_2(["--model", str(model_dir), "--out", str(out), "--text-file", str(texts / "train.txt")], capsys)
    assert "--seq-len" in line
    # a record from before validation was recorded: its training file, but not what it held out
    model.config.ka_provenance = {"training": {"text_file": str(texts / "train.txt"), "seq_len": 16}}
    model.save_pretrained(model_dir)
    line = exits_2(["--model", str(model_dir), "--out", str(out)], capsys)
    assert "not which text it held out" in line and "--val-text-file" in line
    assert not out.exists()
