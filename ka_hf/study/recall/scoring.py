"""Recall accuracy of one model under one inference mode: the library's own caches (ka_hf.modes), fed as the
study's evaluation feeds a window (ka_hf.study.evaluation.ppl.batch_logits).

A query is correct when the argmax of the logits at its position is its paired value. The count is kept per
shape (sequence length and pairs) and per key -> query distance, so every table of the report is a sum of the
same counts. Accuracy overall is pooled over every query of every shape.

ka-hybrid's prompt is the pairs (the first 2P tokens, none of them scored): computed with standard attention and
cached as A; the query section then runs through the KA cache.
"""

import torch
from tqdm.auto import tqdm

from ka_hf.cache import cache_nbytes
from ka_hf.modes import Mode

from ..evaluation.ppl import batch_logits, mode_context
from .data import IGNORE, RecallSet

# Key -> query distance bins for the tables and the plot: [low, high] (inclusive), powers of two.
DISTANCE_BINS = [(2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 127), (128, 255), (256, 511), (512, 1023)]


def query_hits(logits: torch.Tensor, batch: RecallSet):
    """(hit, scored) [B, T]: hit is True where position t is a query and the model's top token there is its paired
    value (batch.targets; the token at that position, batch.input_ids, is the key); scored marks the queries."""
    scored = batch.targets != IGNORE
    return (logits.argmax(-1) == batch.targets) & scored, scored


@torch.no_grad()
def recall_counts(model, recall_set: RecallSet, mode: Mode, adapter=None, batch_size: int = 64) -> dict:
    """Counts of one mode on one set: {"correct", "queries", "by_distance": {distance: [correct, queries]},
    "cache_bytes_per_sequence"} (the cache's bytes after a whole sequence, per row of the batch)."""
    device = next(model.parameters()).device
    prompt = 2 * recall_set.shape.pairs
    correct = queries = 0
    by_distance: dict[int, list[int]] = {}
    cache_bytes = 0
    with mode_context(model, mode):
        for batch in recall_set.batches(batch_size):
            input_ids = batch.input_ids.to(device)
            logits, cache, _, _ = batch_logits(model, input_ids, None, mode, "parallel", prompt, adapter, device)
            hit, scored = query_hits(logits.cpu(), batch)
            correct, queries = correct + int(hit.sum()), queries + int(scored.sum())
            for d, h in zip(batch.distance[scored].tolist(), hit[scored].tolist()):
                cell = by_distance.setdefault(d, [0, 0])
                cell[0], cell[1] = cell[0] + int(h), cell[1] + 1
            cache_bytes = max(cache_bytes, cache_nbytes(cache) // len(batch))
    return dict(correct=correct, queries=queries, by_distance=by_distance, cache_bytes_per_sequence=cache_bytes)


def score_mode(model, sets: list[RecallSet], mode: Mode, adapter=None, far: int | None = None) -> dict:
    """One mode on every set: accuracy overall, per shape, per distance bin and (far=W) at distances >= W, with
    the counts behind them."""
    by_shape = {s.shape.name: recall_counts(model, s, mode, adapter) for s in sets}
    return summarize_counts(mode.name, by_shape, {s.shape.name: s.shape.pairs for s in sets}, far)


def _accuracy(hit: int, total: int) -> float | None:
    return hit / total if total else None


def summarize_counts(name: str, by_shape: dict, pairs: dict, far: int | None = None) -> dict:
    """The record of one mode from recall_counts per shape."""
    distances: dict[int, list[int]] = {}
    for counts in by_shape.values():
        for d, (hit, total) in counts["by_distance"].items():
            cell = distances.setdefault(d, [0, 0])
            cell[0], cell[1] = cell[0] + hit, cell[1] + total
    bins = {}
    for low, high in DISTANCE_BINS:
        hit = sum(h for d, (h, _) in distances.items() if low <= d <= high)
        total = sum(t for d, (_, t) in distances.items() if low <= d <= high)
        if total:
            bins[f"{low}-{high}"] = dict(accuracy=hit / total, queries=total)
    correct = sum(c["correct"] for c in by_shape.values())
    queries = sum(c["queries"] for c in by_shape.values())
    record = dict(
        mode=name,
        accuracy=_accuracy(correct, queries),
        correct=correct,
        queries=queries,
        by_shape={
            shape: dict(
                pairs=pairs[shape],
                accuracy=_accuracy(c["correct"], c["queries"]),
                queries=c["queries"],
                cache_bytes_per_sequence=c["cache_bytes_per_sequence"],
            )
            for shape, c in by_shape.items()
        },
        by_distance=bins,
    )
    if far is not None:
        hit = sum(h for d, (h, _) in distances.items() if d >= far)
        total = sum(t for d, (_, t) in distances.items() if d >= far)
        record["far"] = dict(min_distance=far, accuracy=_accuracy(hit, total), queries=total)
    return record


def score_modes(
    model, sets, modes: list[Mode], adapter=None, far: int | None = None, progress: bool = True, desc: str = "recall"
) -> dict:
    """{mode name: score_mode(...)}, a tqdm bar over the modes."""
    return {
        mode.name: score_mode(model, sets, mode, adapter, far)
        for mode in tqdm(modes, desc=desc, disable=not progress, leave=False)
    }
