"""The reversal curse's strict control: the right name's rank among all trained names (Berglund et al. 2023).

Backward exact match and answer PPL can rise for a reason that is not knowledge of the fact: a model that saw a
set of names many times finds any of them likelier than a name it never saw. The control that separates the two:
for each backward sentence "B is A" (held-out templates), score the prompt "... B is" followed by every trained
name, and rank the right one.

    log-likelihood of a name = summed log-probability of the tokens overlapping it (`facts.answer_span_labels`)
    rank = 1 + the number of other names with a higher log-likelihood, + half of those with an equal one
           (1 = the right name is the likeliest; ties share their ranks, so a constant model ranks at chance)

A model that knows nothing backward but knows the names ranks the right one at chance, (N + 1) / 2 on average; a
model that reversed its facts ranks it near 1. Each candidate sentence is one window, fed through a fresh cache
of the mode exactly as `reversal.score_reversal_mode` feeds the true sentence (the prompt as a ka-hybrid prompt).
"""

import statistics

import torch
from tqdm.auto import tqdm

from ka_hf.errors import KAError
from ka_hf.modes import Mode

from ..facts import Fact, fact_sentences, render
from .ppl import batch_logits, collate, mode_context, prompt_length, token_nll
from .reversal import prompt_batches, sentence_windows


def candidate_windows(facts, tokenizer, split: str = "test") -> list[dict]:
    """Every backward sentence of `split`, written once with each fact's name: windows tagged with the sentence
    (`sentence`) and whether the name is the right one (`right`)."""
    names = [fact.name for fact in facts]
    windows = []
    for sentence_index, sentence in enumerate(fact_sentences(facts, "backward", split)):
        description = facts[sentence.fact_index].description
        candidates = [
            render(Fact(name, description), sentence.template, "backward", sentence.fact_index) for name in names
        ]
        for window, name in zip(sentence_windows(candidates, tokenizer), names):
            windows.append(window | {"sentence": sentence_index, "right": name == sentence.answer})
    return windows


@torch.no_grad()
def answer_log_likelihoods(model, batch, mode: Mode, adapter, pad_id: int, device) -> list[float]:
    """Each window's summed log-probability of its answer tokens, from one forward of the batch."""
    input_ids, attention_mask, answer_labels = collate(batch, pad_id)
    mask = None if attention_mask is None else attention_mask.to(device)
    logits = batch_logits(
        model, input_ids.to(device), mask, mode, "parallel", prompt_length(batch[0]), adapter, device
    )[0]
    nll, scored = token_nll(logits, answer_labels.to(device))
    return (-(nll * scored).double().sum(dim=1)).tolist()


def rank_summary(windows, log_likelihoods) -> dict:
    """Per sentence, the right name's rank among the candidates; summarized over sentences."""
    by_sentence: dict[int, list] = {}
    for window, log_likelihood in zip(windows, log_likelihoods):
        by_sentence.setdefault(window["sentence"], []).append((log_likelihood, window["right"]))
    ranks, right_ll, other_ll = [], [], []
    for candidates in by_sentence.values():
        right = [ll for ll, is_right in candidates if is_right]
        if len(right) != 1:
            raise KAError("each backward sentence needs exactly one right name among the candidates")
        others = [ll for ll, is_right in candidates if not is_right]
        # ties share their ranks (midrank): a model that scores every name alike ranks the right one at chance
        ranks.append(1 + sum(ll > right[0] for ll in others) + sum(ll == right[0] for ll in others) / 2)
        right_ll.append(right[0])
        other_ll.append(statistics.fmean(others))
    n_names = len(next(iter(by_sentence.values())))
    return dict(
        sentences=len(ranks),
        names=n_names,
        mean_rank=statistics.fmean(ranks),
        chance_rank=(n_names + 1) / 2,
        top1=sum(rank == 1 for rank in ranks) / len(ranks),
        mean_reciprocal_rank=statistics.fmean(1 / rank for rank in ranks),
        right_log_likelihood=statistics.fmean(right_ll),
        other_log_likelihood=statistics.fmean(other_ll),
    )


def name_ranks(
    model, tokenizer, facts, mode: Mode, adapter=None, split: str = "test", batch_size: int = 64, progress=True
) -> dict:
    """The right name's rank among the names of `facts` for every backward sentence of `split`, in `mode`."""
    if len(facts) < 2:
        raise KAError("ranking a name among the trained names needs at least 2 facts")
    windows = candidate_windows(facts, tokenizer, split)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = {id(window): index for index, window in enumerate(windows)}
    log_likelihoods = [0.0] * len(windows)
    batches = prompt_batches(windows, batch_size)
    with mode_context(model, mode):
        for batch in tqdm(batches, desc=f"name ranks {mode.name}", disable=not progress, leave=False, unit="batch"):
            for window, value in zip(batch, answer_log_likelihoods(model, batch, mode, adapter, pad_id, device)):
                log_likelihoods[order[id(window)]] = value
    return rank_summary(windows, log_likelihoods) | {"mode": mode.name, "split": split}
