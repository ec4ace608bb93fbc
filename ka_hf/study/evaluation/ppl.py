"""Perplexity of every inference mode on the same windows: the numbers behind examples/eval_ppl.py.

How a window is scored (KA-SPEC §5). The model sees the window's tokens; the NLL is taken over the labels that
are not -100, with the usual shift (logits at position t predict token t + 1). The logits come from feeding the
window through a fresh cache of the mode (`Mode.new_cache`) in segments:

    method "parallel":  one forward of the whole window (ka: one parallel triangular solve)
    method "token":     one token at a time (gives decode tokens/s)
    mode ka-hybrid:     first the window's context tokens as a prompt (standard attention, outputs cached as A),
                        then the rest in one forward ("parallel") or token by token ("token")

Prefill = decode for exact KA, so both methods give the same PPL up to float error (tests check it).

Across processes the batches of windows are dealt round-robin (`shard_batches`: `batches[rank::world]`); each
process sums NLL and token counts per position in float64 (`score_shard`), the sums are gathered with
`accelerator.gather_for_metrics` and added (`merge_shards`), so N processes give the 1-process PPL. Both steps are
plain functions of (rank, world), so the tests run every rank of a split in one process.

Every record says which targets it scored: `scored_tokens`, `tokens_by_position` and `targets_checksum`, a sum of
a hash of every scored (window index, position, token) — equal in two records when they scored the same targets
(a different set gives equal sums with probability about 2^-31). Functions here return numbers and records; they
print nothing (progress bars go to stderr).
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ka_hf.cache import cache_nbytes
from ka_hf.config import without_ka
from ka_hf.errors import KAError
from ka_hf.modes import Mode

from ..data import count_scored_tokens
from ..measure import Timer, peak_memory_bytes, peak_memory_kind, reset_peak_memory
from .modes import describe

METHODS = ("parallel", "token")
METHOD_DESCRIPTIONS = {
    "parallel": "one forward per window (KA: one parallel triangular solve); ka-hybrid: prompt, then the rest",
    "token": "token by token through the mode's cache (KA: KACache decode steps); ka-hybrid: prompt, then tokens",
}
# Where the scalar totals sit after the per-position sums in the gathered vector.
_SCALARS = ("seconds", "decode_seconds", "decode_tokens", "peak_memory_bytes", "targets_checksum")
# targets_checksum is a sum modulo this prime of per-target hashes below it: each process's checksum is an integer
# under 2**31, so the sum of the gathered float64 rows stays exact (up to 2**22 processes).
_CHECKSUM_PRIME = 2**31 - 1


# -----------------------------------------------------------------------------
# windows -> batches -> segments


def prompt_length(window) -> int:
    """ka-hybrid's prompt: the window's context (leading unscored) tokens, at least the first token."""
    labels = window["labels"]
    scored = (labels != -100).nonzero()
    context = int(scored[0]) if len(scored) else len(labels)
    return min(max(context, 1), len(labels))


def make_batches(windows, batch_size: int = 1) -> list[list[dict]]:
    """Consecutive windows, up to batch_size each; a batch never mixes prompt lengths (ka-hybrid needs one)."""
    if batch_size < 1:
        raise KAError(f"--batch-size must be at least 1, got {batch_size}")
    batches = []
    for window in windows:
        if batches and len(batches[-1]) < batch_size and prompt_length(batches[-1][0]) == prompt_length(window):
            batches[-1].append(window)
        else:
            batches.append([window])
    return batches


def segments(length: int, mode: Mode, method: str, prompt: int) -> list[tuple[int, int]]:
    """(start, end) pieces in which a window of `length` tokens is fed to the model."""
    if method not in METHODS:
        raise KAError(f"unknown scoring method {method!r}: use one of {', '.join(METHODS)}")
    start = prompt if mode.kind == "ka-hybrid" else 0
    head = [(0, start)] if start else []
    if start >= length:
        return head
    if method == "parallel":
        return head + [(start, length)]
    return head + [(t, t + 1) for t in range(start, length)]


def collate(batch, pad_id: int):
    """Right-padded (input_ids, attention_mask or None, labels); the mask only when some row is padded."""
    longest = max(len(window["input_ids"]) for window in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, window in enumerate(batch):
        n = len(window["input_ids"])
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = window["input_ids"], window["labels"], 1
    return input_ids, (None if bool(attention_mask.all()) else attention_mask), labels


# -----------------------------------------------------------------------------
# one batch


@torch.no_grad()
def batch_logits(model, input_ids, attention_mask, mode: Mode, method: str, prompt: int, adapter=None, device="cpu"):
    """Logits [B, T, V] of one batch fed in the mode's segments through a fresh cache.

    Returns (logits, cache, decode_seconds, decode_tokens): decode_* cover the single-token steps only.
    """
    cache = mode.new_cache(adapter)
    pieces, decode_seconds, decode_tokens = [], 0.0, 0
    plan = segments(input_ids.shape[1], mode, method, prompt)
    for index, (start, end) in enumerate(plan):
        mask = None if attention_mask is None else attention_mask[:, :end]
        decode = method == "token" and not (mode.kind == "ka-hybrid" and index == 0)  # the prompt is no decode
        with Timer(device) as timer:
            output = model(input_ids[:, start:end], attention_mask=mask, cache=cache, use_cache=True)
        pieces.append(output.logits)
        if decode:
            decode_seconds += timer.seconds
            decode_tokens += input_ids.shape[0]
    return torch.cat(pieces, dim=1), cache, decode_seconds, decode_tokens


def token_nll(logits, labels):
    """NLL [B, T-1] of tokens 1..T-1 (0 where not scored) and the mask of scored tokens; in float32, or float64 for
    float64 logits (so a float64 model is scored exactly)."""
    targets = labels[:, 1:]
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return nll, targets != -100


def targets_checksum(first_window: int, labels) -> int:
    """Sum modulo _CHECKSUM_PRIME of a hash of every scored (window index, position, token) of a batch whose rows
    are the windows first_window, first_window + 1, ... (the position is that of the predicted token)."""
    targets = labels[:, 1:].cpu()
    windows = torch.arange(first_window, first_window + len(targets))[:, None].expand_as(targets)
    positions = torch.arange(1, targets.shape[1] + 1)[None].expand_as(targets)
    scored = targets != -100
    return int(_target_hash(windows[scored], positions[scored], targets[scored]).sum()) % _CHECKSUM_PRIME


def _target_hash(windows, positions, tokens):
    """A hash in [0, _CHECKSUM_PRIME) per target; every product stays under 2**63 in int64."""
    p = _CHECKSUM_PRIME
    key = ((windows % p) * 1_000_003 + positions) % p
    key = (key * 1_000_033 + tokens % p) % p
    key = (key * 1_103_515_245 + 12_345) % p
    key = key ^ (key >> 16)
    return (key * 2_654_435_761) % p


def sequence_nll(model, input_ids: torch.Tensor, make_cache=None) -> torch.Tensor:
    """Summed next-token NLL of each row of full blocks [B, T] (T - 1 scored tokens per row), float32 [B].

    make_cache: None = one plain forward (the model's own attention: standard, or KA for a KA-trained model);
    otherwise a function returning a fresh cache (e.g. `lambda: KACache(adapter=...)`) passed to the forward.
    """
    kwargs = {"use_cache": False} if make_cache is None else {"cache": make_cache()}
    nll, _ = token_nll(model(input_ids=input_ids, **kwargs).logits, input_ids)
    return nll.sum(dim=1)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, make_cache=None, progress: bool = False) -> float:
    """exp(mean token NLL) over full blocks [n, T] (each scores T - 1 tokens), on the model's device: what training
    validates with; windows with context and modes are `score_mode`'s."""
    device = next(model.parameters()).device
    total = 0.0
    for start in tqdm(range(0, len(blocks), batch_size), desc="ppl", disable=not progress, leave=False):
        total += float(sequence_nll(model, blocks[start : start + batch_size].to(device), make_cache).sum())
    return math.exp(total / (len(blocks) * (blocks.shape[1] - 1)))


# -----------------------------------------------------------------------------
# one mode over all windows


class Totals:
    """Per-position NLL sums and token counts (float64) plus timings and the targets checksum, for one process."""

    def __init__(self, max_length: int):
        self.nll = torch.zeros(max_length, dtype=torch.float64)
        self.tokens = torch.zeros(max_length, dtype=torch.float64)
        self.scalars = dict.fromkeys(_SCALARS, 0.0)

    def add(self, nll, scored):
        # position of the predicted token within its window: 1 .. T-1
        nll = torch.where(scored, nll, torch.zeros_like(nll)).double().sum(0).cpu()
        counts = scored.double().sum(0).cpu()
        self.nll[1 : 1 + len(nll)] += nll
        self.tokens[1 : 1 + len(counts)] += counts

    def add_checksum(self, checksum: int):
        self.scalars["targets_checksum"] = float((int(self.scalars["targets_checksum"]) + checksum) % _CHECKSUM_PRIME)

    def vector(self, device="cpu"):
        scalars = torch.tensor([self.scalars[key] for key in _SCALARS], dtype=torch.float64)
        return torch.cat([self.nll, self.tokens, scalars]).to(device)


@dataclass
class Shard:
    """What one process scored of one mode: its `totals` and what every process measures alike."""

    mode: Mode
    method: str
    windows: int  # windows of the whole run (every process's share together)
    totals: Totals
    cache_bytes: int
    cache_tokens: int
    memory_kind: str


def shard_batches(windows, batch_size: int, rank: int = 0, world: int = 1) -> list[tuple[int, list[dict]]]:
    """Process `rank`'s share of `world`: (index of the batch's first window, batch), the batches dealt round-robin."""
    if not 0 <= rank < world:
        raise KAError(f"process rank {rank} is not in 0..{world - 1}")
    dealt, first = [], 0
    for batch in make_batches(windows, batch_size):
        dealt.append((first, batch))
        first += len(batch)
    return dealt[rank::world]


def merge_shards(rows: torch.Tensor, shard: Shard) -> dict:
    """The mode's record from the stacked `Totals.vector()` of every process (one row each) and any one shard:
    sums and token counts added, times and memory the largest, the targets checksum added modulo its prime."""
    rows = rows.double().cpu()
    n = len(shard.totals.nll)
    summed, largest = rows.sum(0), rows.max(0).values
    scalars = {key: float(largest[2 * n + i]) for i, key in enumerate(_SCALARS)}
    for key in ("decode_tokens", "targets_checksum"):
        scalars[key] = float(summed[2 * n + _SCALARS.index(key)])
    scalars["targets_checksum"] = int(scalars["targets_checksum"]) % _CHECKSUM_PRIME
    return _mode_record(shard, summed[:n], summed[n : 2 * n], scalars)


def mode_context(model, mode: Mode):
    """kv is standard attention even for a model whose config asks for KA (a KA-trained model)."""
    return without_ka(model) if mode.kind == "kv" else contextlib.nullcontext()


def score_mode(
    model,
    windows,
    mode: Mode,
    method: str = "parallel",
    batch_size: int = 1,
    accelerator=None,
    adapter=None,
    pad_id: int = 0,
    progress: bool = True,
) -> dict:
    """PPL and costs of one mode over `windows` (every process passes all windows; each scores its share)."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    shard = score_shard(model, windows, mode, method, batch_size, rank, world, accelerator, adapter, pad_id, progress)
    device = accelerator.device if accelerator is not None else "cpu"
    rows = shard.totals.vector(device)[None]
    if world > 1:
        rows = accelerator.gather_for_metrics(rows)  # one row per process, nothing to de-duplicate
    return merge_shards(rows, shard)


def score_shard(
    model,
    windows,
    mode: Mode,
    method: str = "parallel",
    batch_size: int = 1,
    rank: int = 0,
    world: int = 1,
    accelerator=None,
    adapter=None,
    pad_id: int = 0,
    progress: bool = True,
) -> Shard:
    """Process `rank` of `world` scores its share of `windows` (`shard_batches`); accelerator: device and autocast.

    The first window is run once untimed (warm-up) and gives `cache_bytes`: the bytes of the mode's cache after
    that one window (batch of 1), the same on every process.
    """
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    totals = Totals(max(len(window["input_ids"]) for window in windows))
    my_batches = shard_batches(windows, batch_size, rank, world)
    with mode_context(model, mode), autocast:
        first = windows[0]
        ids, mask, _ = collate([first], pad_id)
        _, cache, _, _ = batch_logits(model, ids.to(device), mask, mode, method, prompt_length(first), adapter, device)
        cache_bytes = cache_nbytes(cache)
        del cache
        reset_worked = reset_peak_memory(device)
        bar = tqdm(my_batches, desc=f"{mode.name} ({method})", disable=not progress, leave=False, unit="batch")
        with Timer(device) as wall:
            for first_window, batch in bar:
                ids, mask, labels = collate(batch, pad_id)
                mask = None if mask is None else mask.to(device)
                logits, _, decode_seconds, decode_tokens = batch_logits(
                    model, ids.to(device), mask, mode, method, prompt_length(batch[0]), adapter, device
                )
                totals.add(*token_nll(logits, labels.to(device)))
                totals.add_checksum(targets_checksum(first_window, labels))
                totals.scalars["decode_seconds"] += decode_seconds
                totals.scalars["decode_tokens"] += decode_tokens
        totals.scalars["seconds"] = wall.seconds
        totals.scalars["peak_memory_bytes"] = float(peak_memory_bytes(device))
    memory_kind = peak_memory_kind(device, reset_worked)
    return Shard(mode, method, len(windows), totals, cache_bytes, len(first["input_ids"]), memory_kind)


def _mode_record(shard: Shard, nll_by_position, tokens_by_position, scalars):
    scored = int(tokens_by_position.sum())
    if scored == 0:
        raise KAError("the windows score no tokens: give more text (at least 2 tokens per window)")
    mean_nll = float(nll_by_position.sum() / scored)
    seconds = scalars["seconds"]
    decode_seconds = scalars["decode_seconds"]
    mode = shard.mode
    return {
        "mode": mode.name,
        "layers": None if mode.layers is None else list(mode.layers),
        "window": mode.window,
        "sink": mode.sink,
        "definition": describe(mode),
        "method": shard.method,
        "ppl": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "scored_tokens": scored,
        "targets_checksum": scalars["targets_checksum"],
        "windows": shard.windows,
        "tokens_per_s": scored / seconds if seconds > 0 else None,
        "decode_tokens_per_s": scalars["decode_tokens"] / decode_seconds if decode_seconds > 0 else None,
        "total_time_s": seconds,
        "peak_memory_bytes": int(scalars["peak_memory_bytes"]),
        "peak_memory_kind": shard.memory_kind,
        "cache_bytes": shard.cache_bytes,
        "cache_bytes_after": f"the first window ({shard.cache_tokens} tokens, batch 1)",
        "nll_by_position": _position_means(nll_by_position, tokens_by_position),
        "tokens_by_position": [int(n) for n in tokens_by_position],
    }


def _position_means(nll_by_position, tokens_by_position):
    return [float(s / n) if n > 0 else None for s, n in zip(nll_by_position, tokens_by_position)]


def score_modes(
    model, windows, modes, method="parallel", batch_size=1, accelerator=None, adapter=None, pad_id=0, progress=True
) -> list[dict]:
    """`score_mode` for each mode on the same windows, plus `degradation_pct` vs the kv mode when it ran."""
    # a trailing 1-token window scores nothing
    windows = [window for window in windows if count_scored_tokens([window]) > 0]
    if not windows:
        raise KAError("no window scores any token: give more text or a larger --max-length")
    records = [
        score_mode(model, windows, mode, method, batch_size, accelerator, adapter, pad_id, progress) for mode in modes
    ]
    return add_degradation(records)


def add_degradation(records: list[dict], baseline: float | None = None) -> list[dict]:
    """degradation_pct = (PPL - PPL_kv) / PPL_kv * 100 for every record; the kv PPL is `baseline` or the kv
    record's (None when there is neither)."""
    if baseline is None:
        baseline = next((record["ppl"] for record in records if record["mode"] == "kv"), None)
    for record in records:
        record["degradation_pct"] = None if baseline is None else (record["ppl"] / baseline - 1.0) * 100.0
    return records
