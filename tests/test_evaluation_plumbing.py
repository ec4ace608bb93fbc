"""The evaluation plumbing, in this process: every mode scores the same targets, each mode computes what it names
(against the float64 oracle), and a split over processes adds up to the 1-process result.

Tiny float64 GPT-2, GPT-NeoX (partial rotary) and Llama (GQA, RoPE) with large initial weights
(initializer_range 0.3), so that attention is peaked and the modes differ by far more than float noise; windows
of 16 tokens every 10 (6 context tokens each, the last window shorter: right padding in a batch of 3).
"""

import math

import oracle
import pytest
import torch
import torch.nn.functional as F

from ka_hf.errors import KAError
from ka_hf.study.data import ppl_windows
from ka_hf.study.evaluation import parse_modes, score_mode, score_modes
from ka_hf.study.evaluation.ppl import merge_shards, prompt_length, score_shard, shard_batches, targets_checksum

from conftest import VOCAB, tiny_model

ARCHS = ("gpt2", "gpt-neox", "llama-gqa")
EXACT = 1e-10  # float64 model, float64 NLL
MAX_LENGTH, STRIDE = 16, 10


def peaked_model(name):
    return tiny_model(name, initializer_range=0.3)


def random_windows(tokens=75, max_length=MAX_LENGTH, stride=STRIDE, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return ppl_windows(torch.randint(0, VOCAB, (tokens,), generator=generator), max_length, stride)


def test_windows_have_context_and_a_padded_last_batch():
    windows = random_windows()
    assert [prompt_length(window) for window in windows] == [1] + [MAX_LENGTH - STRIDE] * (len(windows) - 1)
    assert len(windows[-1]["input_ids"]) < MAX_LENGTH  # batched with full windows: right padding


# -----------------------------------------------------------------------------
# each mode computes what it names


def oracle_mean_nll(model, windows, mode: str, hybrid: bool = False, **options) -> tuple[float, int]:
    """(mean NLL, scored tokens) of the windows, each alone through the oracle, the NLL written out by hand.
    hybrid: each window's prompt (its context) gets standard attention outputs, cached as A."""
    total, count = 0.0, 0
    for window in windows:
        ids, labels = window["input_ids"][None], window["labels"]
        prefix = {"standard_prefix": prompt_length(window)} if hybrid else {}
        log_probs = oracle.oracle_logits(model, ids, mode=mode, **options, **prefix)[0].log_softmax(-1)
        for t in range(1, len(labels)):
            if labels[t] != -100:
                total, count = total - float(log_probs[t - 1, labels[t]]), count + 1
    return total / count, count


ORACLE_OPTIONS = {
    "kv": dict(mode="standard"),
    "ka": dict(mode="ka"),
    "ka-hybrid": dict(mode="ka", hybrid=True),  # standard attention over each window's context, KA after it
    "ka@1": dict(mode="ka", ka_layers=[1]),
}


@pytest.mark.parametrize("name", ARCHS)
def test_every_mode_equals_its_oracle_and_hybrid_is_not_ka(name):
    model, windows = peaked_model(name), random_windows()
    records = score_modes(model, windows, parse_modes(list(ORACLE_OPTIONS)), batch_size=3, progress=False)
    hybrid_token = score_modes(model, windows, parse_modes("ka-hybrid"), "token", progress=False)[0]
    by_mode = {record["mode"]: record for record in records}
    expected = {mode: oracle_mean_nll(model, windows, **options) for mode, options in ORACLE_OPTIONS.items()}
    for mode, (mean_nll, scored) in expected.items():
        assert by_mode[mode]["scored_tokens"] == scored, mode
        assert by_mode[mode]["mean_nll"] == pytest.approx(mean_nll, rel=EXACT), mode
    assert hybrid_token["mean_nll"] == pytest.approx(expected["ka-hybrid"][0], rel=EXACT)
    # ka-hybrid is neither ka nor kv: differences 10^7 times the tolerance, in the scores and in the oracle
    for other in ("ka", "kv"):
        assert abs(expected["ka-hybrid"][0] / expected[other][0] - 1) > 1e-3, other
        assert abs(by_mode["ka-hybrid"]["mean_nll"] / by_mode[other]["mean_nll"] - 1) > 1e-3, other


@pytest.mark.parametrize("name", ARCHS)
def test_hybrid_equals_ka_without_context(name):
    """stride == max_length: the prompt is each window's first token, whose output is its value either way."""
    model, windows = peaked_model(name), random_windows(max_length=MAX_LENGTH, stride=MAX_LENGTH)
    assert all(prompt_length(window) == 1 for window in windows)
    ka, hybrid = score_modes(model, windows, parse_modes("ka,ka-hybrid"), batch_size=2, progress=False)
    assert hybrid["mean_nll"] == pytest.approx(ka["mean_nll"], rel=1e-12)
    assert hybrid["targets_checksum"] == ka["targets_checksum"]


# -----------------------------------------------------------------------------
# every mode scores the same targets


def expected_targets(windows):
    """Scored tokens by position and the targets checksum, window by window (no batches, no modes)."""
    counts = [0] * MAX_LENGTH
    checksum = 0
    for index, window in enumerate(windows):
        for t in (window["labels"] != -100).nonzero().flatten().tolist():
            counts[t] += t > 0
        checksum += targets_checksum(index, window["labels"][None])
    return counts, checksum % (2**31 - 1)


def test_targets_checksum_tells_target_sets_apart():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 8, 9, -100, -100]])
    whole = targets_checksum(3, labels)
    assert whole == (targets_checksum(3, labels[:1]) + targets_checksum(4, labels[1:])) % (2**31 - 1)
    changed = {
        "one target dropped": labels.masked_fill(torch.tensor([[0, 0, 0, 0, 1], [0] * 5]).bool(), -100),
        "one target moved": torch.tensor([[-100, -100, 5, 6, 7], [-100, -100, 9, 8, -100]]),
        "targets of two windows swapped": labels.flip(0),
        "another token": torch.tensor([[-100, -100, 5, 6, 1], [-100, 8, 9, -100, -100]]),
    }
    for what, other in changed.items():
        assert targets_checksum(3, other) != whole, what
    assert targets_checksum(4, labels) != whole  # the same labels in other windows are other targets


def test_every_mode_method_and_batch_size_scores_the_same_targets(tmp_path):
    from ka_hf.adapters import KAAdapter, load_adapter, save_adapter

    model, windows = peaked_model("llama-gqa"), random_windows()
    adapter = load_adapter(save_adapter(KAAdapter.for_model(model), tmp_path / "adapter"), dtype=torch.float64)
    modes = parse_modes("kv,ka,ka-hybrid,ka@0-1,ka-hybrid@1,ka+adapter,kv-window@6+2,ka-window@6+2")
    counts, checksum = expected_targets(windows)
    records = []
    for method in ("parallel", "token"):
        for batch_size in (1, 3):
            records += score_modes(model, windows, modes, method, batch_size, adapter=adapter, progress=False)
    assert len(records) == 4 * len(modes)
    for record in records:
        what = f"{record['mode']} ({record['method']})"
        assert record["tokens_by_position"] == counts, what
        assert record["scored_tokens"] == sum(counts) == windows[-1]["end"] - 1, what  # every token but the first
        assert record["targets_checksum"] == checksum, what


# -----------------------------------------------------------------------------
# several processes add up to one


def test_shards_deal_every_batch_to_exactly_one_process():
    windows = random_windows(tokens=95)
    for batch_size in (1, 2, 3):
        every = [first for first, _ in shard_batches(windows, batch_size)]
        for world in (2, 3):
            dealt = [first for rank in range(world) for first, _ in shard_batches(windows, batch_size, rank, world)]
            assert sorted(dealt) == every, (batch_size, world)
    with pytest.raises(KAError, match="rank 2"):
        shard_batches(windows, 1, rank=2, world=2)


def split_over_processes(model, windows, mode, world, **options) -> dict:
    """The record that `world` processes produce: each rank scores its shard here, then the rows are merged."""
    shards = [
        score_shard(model, windows, mode, rank=rank, world=world, progress=False, **options) for rank in range(world)
    ]
    assert all(shard.totals.tokens.sum() > 0 for shard in shards)  # every process really scored something
    return merge_shards(torch.stack([shard.totals.vector() for shard in shards]), shards[0])


@pytest.mark.parametrize("world", [2, 3])
def test_processes_give_the_one_process_record(world):
    model, windows = peaked_model("gpt-neox"), random_windows(tokens=95)
    for mode in parse_modes("kv,ka,ka-hybrid,ka-window@6+2"):
        for batch_size in (1, 2):
            options = dict(method="parallel", batch_size=batch_size)
            one = score_mode(model, windows, mode, progress=False, **options)
            split = split_over_processes(model, windows, mode, world, **options)
            what = f"{mode.name}, batch {batch_size}, {world} processes"
            for key in ("scored_tokens", "tokens_by_position", "targets_checksum", "windows", "cache_bytes"):
                assert split[key] == one[key], (what, key)
            assert split["mean_nll"] == pytest.approx(one["mean_nll"], rel=1e-12), what
            for a, b in zip(split["nll_by_position"], one["nll_by_position"], strict=True):
                assert (a is None and b is None) or a == pytest.approx(b, rel=1e-12), what
            assert math.isfinite(split["ppl"])


def test_merge_adds_sums_and_keeps_the_largest_time():
    model, windows = peaked_model("gpt2"), random_windows()
    mode = parse_modes("kv")[0]
    shards = [score_shard(model, windows, mode, rank=rank, world=2, progress=False) for rank in (0, 1)]
    rows = torch.stack([shard.totals.vector() for shard in shards])
    merged = merge_shards(rows, shards[0])
    nll_sums = [shard.totals.nll for shard in shards]
    assert merged["scored_tokens"] == int(sum(shard.totals.tokens.sum() for shard in shards))
    assert merged["mean_nll"] * merged["scored_tokens"] == pytest.approx(float(sum(s.sum() for s in nll_sums)))
    assert merged["total_time_s"] == max(shard.totals.scalars["seconds"] for shard in shards)
    # the NLL sums agree with an independent cross-entropy of the same windows
    total = 0.0
    with torch.no_grad():
        for window in windows:
            logits = model(window["input_ids"][None]).logits[0, :-1]
            total += float(F.cross_entropy(logits, window["labels"][1:], ignore_index=-100, reduction="sum"))
    assert merged["mean_nll"] == pytest.approx(total / merged["scored_tokens"], rel=EXACT)
