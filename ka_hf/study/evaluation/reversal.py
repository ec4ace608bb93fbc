"""The reversal-curse evaluation (KA-SPEC §5): forward vs backward perplexity of fictitious facts, per mode.

    from ka_hf.study.evaluation import parse_modes
    from ka_hf.study.evaluation.reversal import reversal_metrics
    results = reversal_metrics(model, tokenizer, make_facts(100, seed=0), parse_modes("kv,ka"))
    results["kv"]["splits"]["test"]["answer_ratio"]

A fact "A is B" (ka_hf.study.facts) is written forward ("Orwyn Quillmere is the composer of ...": the answer is the
description B) and backward ("The composer of ... is Orwyn Quillmere": the answer is the name A), with the
training templates (split "train") or the held-out ones (split "test"). Every template puts the answer last.

How a sentence is scored, in every mode. The sentence's tokens are preceded by the tokenizer's bos token (eos
when it has none): the training corpus joins texts with eos, so a fact sentence starts right after one, and
with it every token of the sentence is a scored target. The sentence is one window, fed through a fresh cache
of the mode exactly as eval_ppl feeds a window (`ppl.batch_logits`, method "parallel"), with the prompt = bos +
the tokens before the answer: for ka-hybrid that prompt is computed with standard attention (its outputs cached
as A) and the answer goes through the KA cache. From those logits:

    whole sentence:  mean NLL over every token of the sentence (all but bos)
    answer span:     mean NLL over the tokens that overlap the answer (`facts.answer_span_labels`)

PPL = exp(summed NLL / summed tokens) over all sentences of a (direction, split). Then, per split:

    ratio        = forward PPL / backward PPL   (> 1: forward sentences are harder than backward ones)
    gap          = backward PPL - forward PPL   (> 0: backward is harder)
    answer_ratio, answer_gap: the same over the answer spans alone

Exact match: greedy generation from the prompt with a fresh cache of the mode (ka-hybrid: the prompt prefilled
with standard attention), `answer tokens + 1` new tokens; a match when the continuation, leading whitespace
dropped, starts with the answer and the answer is not followed by a letter or digit. Functions here return
numbers; they print nothing (progress bars go to stderr).
"""

import math
import re

import torch
from tqdm.auto import tqdm

from ka_hf.config import provenance
from ka_hf.errors import KAError
from ka_hf.modes import Mode

from ..facts import answer_span_labels, fact_sentences
from ..measure import Timer
from ..report import markdown_table
from .modes import describe
from .ppl import batch_logits, collate, make_batches, mode_context, prompt_length, token_nll

FACT_SPLITS = ("test", "train")
DIRECTIONS = ("forward", "backward")
TRAINED_ON = ("forward", "backward", "both", "none", "unknown")  # which directions were in training; none: a control
SCORING = (
    "each fact sentence is one window: bos (eos when the tokenizer has no bos) + the sentence's tokens, fed through a "
    "fresh cache of the mode as eval_ppl feeds a window (ppl.batch_logits, parallel), the prompt being bos + the "
    "tokens before the answer (ka-hybrid: prompt with standard attention, answer through the KA cache); whole = NLL "
    "over every sentence token, answer = NLL over the tokens overlapping the answer; PPL = exp(sum NLL / tokens) "
    "over the sentences; ratio = forward PPL / backward PPL, gap = backward PPL - forward PPL; exact match = the "
    "greedy continuation of the prompt (answer tokens + 1 new tokens) starts with the answer, not followed by a letter "
    "or digit"
)


# -----------------------------------------------------------------------------
# sentences -> windows


def sentence_windows(sentences, tokenizer) -> list[dict]:
    """One eval_ppl-style window per sentence: input_ids = bos + sentence, labels = the answer span.

    `labels` (answer span, -100 elsewhere) makes `ppl.prompt_length` the prompt's length (bos + the tokens before
    the answer); `whole_labels` scores every sentence token. Also: answer text and answer token count.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = [] if start is None else [start]
    windows = []
    for sentence in sentences:
        ids, whole, answer = answer_span_labels(sentence, tokenizer)
        ignore = torch.full((len(prefix),), -100, dtype=torch.long)
        windows.append(
            {
                "input_ids": torch.cat([torch.tensor(prefix, dtype=torch.long), ids]),
                "labels": torch.cat([ignore, answer]),
                "whole_labels": torch.cat([ignore, whole]),
                "answer": sentence.answer,
                "answer_tokens": int((answer != -100).sum()),
            }
        )
    return windows


def prompt_batches(windows, batch_size: int) -> list[list[dict]]:
    """Batches of windows with one prompt length each (ka-hybrid and batched generation need that), little padding."""
    ordered = sorted(windows, key=lambda window: (prompt_length(window), len(window["input_ids"])))
    return make_batches(ordered, batch_size)


# -----------------------------------------------------------------------------
# one batch: NLL sums and greedy exact matches


def batch_nll_sums(model, batch, mode: Mode, adapter, pad_id: int, device) -> dict:
    """Summed NLL and token counts of the whole sentences and of the answer spans, from one forward."""
    input_ids, attention_mask, answer_labels = collate(batch, pad_id)
    whole_labels = collate([window | {"labels": window["whole_labels"]} for window in batch], pad_id)[2]
    mask = None if attention_mask is None else attention_mask.to(device)
    logits = batch_logits(
        model, input_ids.to(device), mask, mode, "parallel", prompt_length(batch[0]), adapter, device
    )[0]
    sums = {}
    for key, labels in (("whole", whole_labels), ("answer", answer_labels)):
        nll, scored = token_nll(logits, labels.to(device))
        sums[f"{key}_nll"] = float(nll[scored].double().sum())
        sums[f"{key}_tokens"] = int(scored.sum())
    return sums


@torch.no_grad()
def greedy_continuations(model, batch, tokenizer, mode: Mode, adapter, device) -> list[str]:
    """Greedy continuation of each window's prompt through a fresh cache of the mode, `answer tokens + 1` tokens
    per row, cut at eos, decoded. One prompt length per batch, so no padding: rows are independent and this
    equals one prompt at a time. A plain argmax loop, not `generate()`: a checkpoint's generation_config (e.g.
    repetition_penalty) would otherwise change what "greedy" means."""
    prompt = prompt_length(batch[0])
    input_ids = torch.stack([window["input_ids"][:prompt] for window in batch]).to(device)
    steps = max(window["answer_tokens"] for window in batch) + 1
    cache = mode.new_cache(adapter)
    logits = model(input_ids, cache=cache, use_cache=True).logits[:, -1]
    new_tokens = [logits.argmax(-1, keepdim=True)]
    while len(new_tokens) < steps:
        logits = model(new_tokens[-1], cache=cache, use_cache=True).logits[:, -1]
        new_tokens.append(logits.argmax(-1, keepdim=True))
    rows = torch.cat(new_tokens, dim=1).tolist()
    return [
        tokenizer.decode(_until(row[: window["answer_tokens"] + 1], tokenizer.eos_token_id), skip_special_tokens=True)
        for row, window in zip(rows, batch)
    ]


def _until(tokens: list[int], stop: int | None) -> list[int]:
    return tokens[: tokens.index(stop)] if stop in tokens else tokens


def answer_matches(continuation: str, answer: str) -> bool:
    """The continuation (leading whitespace dropped) starts with the whole answer: not followed by a letter or digit."""
    return re.match(re.escape(answer) + r"(?![^\W_])", continuation.lstrip()) is not None


# -----------------------------------------------------------------------------
# one mode


def _direction_record(sums: dict, sentences: int, matches: int | None) -> dict:
    if sums["whole_tokens"] == 0 or sums["answer_tokens"] == 0:
        raise KAError("the fact sentences score no tokens: give at least one fact")
    whole_nll, answer_nll = sums["whole_nll"] / sums["whole_tokens"], sums["answer_nll"] / sums["answer_tokens"]
    return {
        "sentences": sentences,
        "ppl": math.exp(whole_nll),
        "mean_nll": whole_nll,
        "tokens": sums["whole_tokens"],
        "answer_ppl": math.exp(answer_nll),
        "answer_mean_nll": answer_nll,
        "answer_tokens": sums["answer_tokens"],
        "exact_match": None if matches is None else matches / sentences,
        "exact_match_count": matches,
    }


def reversal_summary(forward: dict, backward: dict) -> dict:
    """ratio = forward PPL / backward PPL; gap = backward PPL - forward PPL; the same over the answer spans."""
    return {
        "forward": forward,
        "backward": backward,
        "ratio": forward["ppl"] / backward["ppl"],
        "gap": backward["ppl"] - forward["ppl"],
        "answer_ratio": forward["answer_ppl"] / backward["answer_ppl"],
        "answer_gap": backward["answer_ppl"] - forward["answer_ppl"],
    }


def score_reversal_mode(
    model,
    tokenizer,
    windows_by_part: dict,
    mode: Mode,
    adapter=None,
    batch_size: int = 32,
    exact_match: bool = True,
    progress: bool = True,
) -> dict:
    """The reversal record of one mode; windows_by_part: {(split, direction): windows}."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    jobs = [(part, batch) for part, windows in windows_by_part.items() for batch in prompt_batches(windows, batch_size)]
    sums = {part: dict(whole_nll=0.0, whole_tokens=0, answer_nll=0.0, answer_tokens=0) for part in windows_by_part}
    matches = dict.fromkeys(windows_by_part, 0)
    seconds = dict(scoring=0.0, generation=0.0)
    with mode_context(model, mode):  # kv: standard attention even for a KA-configured model
        for part, batch in tqdm(jobs, desc=f"reversal {mode.name}", disable=not progress, leave=False, unit="batch"):
            with Timer(device) as timer:
                for key, value in batch_nll_sums(model, batch, mode, adapter, pad_id, device).items():
                    sums[part][key] += value
            seconds["scoring"] += timer.seconds
            if exact_match:
                with Timer(device) as timer:
                    continuations = greedy_continuations(model, batch, tokenizer, mode, adapter, device)
                matches[part] += sum(
                    answer_matches(text, window["answer"]) for text, window in zip(continuations, batch)
                )
                seconds["generation"] += timer.seconds
    splits = {}
    for split in dict.fromkeys(split for split, _ in windows_by_part):
        forward, backward = (
            _direction_record(
                sums[(split, direction)],
                len(windows_by_part[(split, direction)]),
                matches[(split, direction)] if exact_match else None,
            )
            for direction in DIRECTIONS
        )
        splits[split] = reversal_summary(forward, backward)
    return {
        "mode": mode.name,
        "layers": None if mode.layers is None else list(mode.layers),
        "definition": describe(mode),
        "splits": splits,
        "seconds": seconds["scoring"] + seconds["generation"],
        "scoring_seconds": seconds["scoring"],
        "generation_seconds": seconds["generation"],
    }


# -----------------------------------------------------------------------------
# every mode


def check_split(split: str) -> tuple[str, ...]:
    """'train' | 'test' | 'both' -> the template splits to evaluate."""
    if split == "both":
        return FACT_SPLITS
    if split not in FACT_SPLITS:
        raise KAError(f"unknown template split {split!r}: use train, test or both")
    return (split,)


def reversal_metrics(
    model,
    tokenizer,
    facts,
    modes,
    split: str = "both",
    adapter=None,
    batch_size: int = 32,
    exact_match: bool = True,
    progress: bool = True,
) -> dict:
    """{mode name: record} for each mode on the same fact sentences. A record holds definition, seconds and
    splits[split] = {forward, backward, ratio, gap, answer_ratio, answer_gap}; forward/backward = {sentences, ppl,
    mean_nll, tokens, answer_ppl, answer_mean_nll, answer_tokens, exact_match, exact_match_count}.

    facts: ka_hf.study.facts.make_facts(n, seed) (the facts the model was trained on); modes: Mode objects
    (ka_hf.study.evaluation.parse_modes); split: which templates, "train", "test" or "both".
    """
    if not facts:
        raise KAError("no facts to evaluate: give at least one (make_facts(n, seed) with n >= 1)")
    if batch_size < 1:
        raise KAError(f"batch_size must be at least 1, got {batch_size}")
    windows_by_part = {
        (name, direction): sentence_windows(fact_sentences(facts, direction, name), tokenizer)
        for name in check_split(split)
        for direction in DIRECTIONS
    }
    return {
        mode.name: score_reversal_mode(
            model, tokenizer, windows_by_part, mode, adapter, batch_size, exact_match, progress
        )
        for mode in modes
    }


# -----------------------------------------------------------------------------
# what the model's config says about its training facts, and the table


def recorded_facts(config) -> dict:
    """The model's provenance["training"]["facts"] = {"n": int, "seed": int, "include": "forward"|"backward"|"both"},
    or {} (config.ka_provenance; an older config.json: its flat config.ka)."""
    training = provenance(config).get("training")
    facts = training.get("facts") if isinstance(training, dict) else None
    return dict(facts) if isinstance(facts, dict) else {}


TABLE_COLUMNS = [
    ("mode", "mode"),
    ("fwd_ppl", "fwd PPL"),
    ("bwd_ppl", "bwd PPL"),
    ("ratio", "ratio"),
    ("gap", "gap"),
    ("fwd_answer_ppl", "fwd answer PPL"),
    ("bwd_answer_ppl", "bwd answer PPL"),
    ("answer_ratio", "answer ratio"),
    ("em_fwd", "EM fwd"),
    ("em_bwd", "EM bwd"),
]


def table_rows(results: dict, split: str) -> list[dict]:
    """One row per mode for `split`, keyed as TABLE_COLUMNS."""
    rows = []
    for name, record in results.items():
        summary = record["splits"][split]
        forward, backward = summary["forward"], summary["backward"]
        rows.append(
            {
                "mode": name,
                "fwd_ppl": forward["ppl"],
                "bwd_ppl": backward["ppl"],
                "ratio": summary["ratio"],
                "gap": summary["gap"],
                "fwd_answer_ppl": forward["answer_ppl"],
                "bwd_answer_ppl": backward["answer_ppl"],
                "answer_ratio": summary["answer_ratio"],
                "em_fwd": forward["exact_match"],
                "em_bwd": backward["exact_match"],
            }
        )
    return rows


def reversal_table(results: dict, split: str) -> str:
    """The markdown reversal table of `split` (mode | fwd PPL | bwd PPL | ratio | gap | ... | EM fwd | EM bwd)."""
    return markdown_table(table_rows(results, split), TABLE_COLUMNS, digits=3)
