"""Tests for ka_hf.study.data: loading, the default corpus, tokenizing, PPL windows, batches and blocks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ka_hf.errors import KAError
from ka_hf.study.data import (
    count_scored_tokens,
    default_corpus,
    lm_blocks,
    load_texts,
    pad_batch,
    ppl_windows,
    tokenize_texts,
    train_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(default_corpus("train")[:400], vocab_size=1000)


# -----------------------------------------------------------------------------
# PPL windows


def guide_windows(seq_len, max_length, stride):
    """The loop of the HF guide "Perplexity of fixed-length models", written out independently:
    (begin, end, number of leading -100 labels, number of tokens the model scores)."""
    out, prev_end_loc = [], 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        target = list(range(begin_loc, end_loc))
        target[:-trg_len] = [-100] * len(target[:-trg_len])  # the guide's `target_ids[:, :-trg_len] = -100`
        n_masked = sum(t == -100 for t in target)
        n_scored = sum(t != -100 for t in target[1:])  # the model shifts labels by one
        out.append((begin_loc, end_loc, n_masked, n_scored))
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return out


CASES = [
    (100, 32, 16),
    (100, 32, 32),
    (100, 32, 1),
    (100, 32, 31),
    (33, 32, 16),
    (32, 32, 32),
    (31, 32, 8),
    (2, 2, 1),
    (2, 2, 2),
    (97, 10, 10),
    (97, 10, 3),
    (1000, 128, 64),
    (129, 128, 128),
]


@pytest.mark.parametrize("seq_len,max_length,stride", CASES)
def test_windows_match_hf_guide(seq_len, max_length, stride):
    ids = torch.arange(seq_len) + 7
    windows = ppl_windows(ids, max_length, stride)
    expected = guide_windows(seq_len, max_length, stride)
    assert len(windows) == len(expected)
    for window, (begin, end, n_masked, _) in zip(windows, expected):
        assert (window["begin"], window["end"]) == (begin, end)
        assert torch.equal(window["input_ids"], ids[begin:end])
        assert window["input_ids"].dtype == torch.long and window["labels"].dim() == 1
        assert (window["labels"][:n_masked] == -100).all()
        assert torch.equal(window["labels"][n_masked:], ids[begin + n_masked : end])
    assert windows[-1]["end"] == seq_len
    assert count_scored_tokens(windows) == sum(n for *_, n in expected)


@pytest.mark.parametrize("seq_len,max_length,stride", [c for c in CASES if c[2] < c[1]])
def test_overlapping_windows_score_every_token_but_the_first_once(seq_len, max_length, stride):
    windows = ppl_windows(torch.arange(seq_len), max_length, stride)
    scored = [int(t) for w in windows for t in w["labels"][1:] if t != -100]
    assert scored == list(range(1, seq_len))
    assert count_scored_tokens(windows) == seq_len - 1


def test_disjoint_windows_skip_each_window_first_token():
    windows = ppl_windows(torch.arange(100), max_length=32, stride=32)
    assert [(w["begin"], w["end"]) for w in windows] == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert all((w["labels"] != -100).all() for w in windows)
    assert count_scored_tokens(windows) == 31 * 3 + 3


@pytest.mark.parametrize(
    "ids,max_length,stride",
    [
        (torch.arange(50), 16, 17),
        (torch.arange(50), 16, 0),
        (torch.arange(1), 16, 8),
        (torch.arange(0), 16, 8),
        (torch.arange(50), 1, 1),
    ],
)
def test_window_errors(ids, max_length, stride):
    with pytest.raises(KAError):
        ppl_windows(ids, max_length, stride)


def test_pad_batch_right_pads():
    windows = ppl_windows(torch.arange(1, 45), max_length=16, stride=8)
    input_ids, attention_mask, labels = pad_batch(windows, pad_id=0)
    assert input_ids.shape == attention_mask.shape == labels.shape == (len(windows), 16)
    last = windows[-1]
    n = len(last["input_ids"])
    assert n < 16  # the case under test: a short final window
    assert torch.equal(input_ids[-1, :n], last["input_ids"]) and (input_ids[-1, n:] == 0).all()
    assert attention_mask[-1].tolist() == [1] * n + [0] * (16 - n)
    assert torch.equal(labels[-1, :n], last["labels"]) and (labels[-1, n:] == -100).all()


def test_lm_blocks():
    blocks = lm_blocks(torch.arange(1000), block_size=128)
    assert blocks.shape == (7, 128) and blocks.dtype == torch.long
    assert torch.equal(blocks.reshape(-1), torch.arange(7 * 128))
    assert lm_blocks(torch.arange(1000), 128, max_blocks=3).shape == (3, 128)
    with pytest.raises(KAError):
        lm_blocks(torch.arange(100), 128)


# -----------------------------------------------------------------------------
# loading text


def test_load_local_txt_drops_empty_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\n\n   \nsecond line é\n", encoding="utf-8")
    assert load_texts(text_file=path) == ["first line", "second line é"]


def test_load_local_jsonl_and_parquet(tmp_path):
    rows = [{"body": "alpha beta", "id": 1}, {"body": "", "id": 2}, {"body": "gamma", "id": 3}]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert load_texts(text_file=jsonl, text_column="body") == ["alpha beta", "gamma"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    assert load_texts(text_file=str(parquet), text_column="body") == ["alpha beta", "gamma"]
    with pytest.raises(KAError, match="no column 'text'.*body"):
        load_texts(text_file=parquet)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.txt", b"", "no text in"),
        ("blank.txt", b"\n  \n\n", "no text in"),
        ("bad.txt", b"\xff\xfe\x00bad", "UTF-8"),
        ("bad.jsonl", b'{"text": "\xff\xfe\x00bad"}\n', "UTF-8"),
        ("a.csv", b"text\nhello\n", "unknown text file type"),
    ],
)
def test_load_local_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(KAError, match=message):
        load_texts(text_file=path)


def test_load_missing_file(tmp_path):
    with pytest.raises(KAError, match="not found"):
        load_texts(text_file=tmp_path / "nope.txt")


def test_hub_failure_is_a_kaerror(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(KAError, match="text_file="):
        load_texts(dataset="wikitext", dataset_config="wikitext-2-raw-v1")


def test_load_wikitext_from_shared_data():
    path = SHARED_DATA / "wikitext-2-raw" / "test.txt"
    if not path.is_file():
        pytest.skip(f"WikiText-2 raw not found at {path} (shared test data, not part of the repo)")
    texts = load_texts(text_file=path)
    assert len(texts) > 2000 and all(text.strip() for text in texts)
    assert texts[0].strip() == "= Robert Boulter ="


# -----------------------------------------------------------------------------
# the default corpus


def test_default_corpus_sizes():
    chars = {split: sum(map(len, default_corpus(split))) for split in ("train", "validation", "test")}
    assert chars["train"] >= 300_000
    assert chars["validation"] >= 20_000 and chars["test"] >= 20_000
    assert load_texts() == default_corpus("test")  # the offline default
    train, test = set(default_corpus("train")), set(default_corpus("test"))
    assert not train & test
    assert not any(">>>" in text for text in default_corpus("train"))
    with pytest.raises(KAError):
        default_corpus("dev")


CORPUS_DIGEST = """
import hashlib, sys, types
ka_hf = types.ModuleType("ka_hf")  # skip ka_hf/__init__.py (it imports transformers): keeps this fast
ka_hf.__path__ = ["ka_hf"]
sys.modules["ka_hf"] = ka_hf
from ka_hf.study.data import default_corpus
digest = hashlib.sha256()
for split in ("train", "validation", "test"):
    for text in default_corpus(split):
        digest.update(text.encode() + bytes(1))
print(digest.hexdigest())
"""


def test_default_corpus_is_deterministic_across_processes():
    def run(hash_seed):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(
            [sys.executable, "-c", CORPUS_DIGEST], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
        )
        return result.stdout.strip().splitlines()[-1]

    assert run("1") == run("12345")


# -----------------------------------------------------------------------------
# tokenizing


def test_tokenizer_round_trip(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None
    assert tokenizer.model_max_length >= 1_000_000
    text = "Return the list of words, héllo wörld — 😀\n  indented."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level: lossless on any text

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len(reloaded) == len(tokenizer) <= 1000
    batch = reloaded(["a b c", "a"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2  # pad token set: batching works


def test_tokenize_texts_separates_with_eos(tokenizer):
    texts = ["The first text.", "A second one", "third"]
    ids = tokenize_texts(texts, tokenizer)
    assert ids.dtype == torch.long and ids.dim() == 1
    eos = tokenizer.eos_token_id
    assert int((ids == eos).sum()) == len(texts) - 1
    pieces, start = [], 0
    for position in (ids == eos).nonzero().flatten().tolist() + [len(ids)]:
        pieces.append(tokenizer.decode(ids[start:position]))
        start = position + 1
    assert pieces == texts


def test_train_tokenizer_rejects_no_text():
    with pytest.raises(KAError):
        train_tokenizer([])
