"""Power before verdict: could each question's experiment have seen its answer?

A verdict from an experiment that could not detect its effect is worse than no verdict. So every question of the
study first passes a check on the run itself, and `ka_hf.study.verdicts` writes its sentence only when the check
passed; otherwise the report says "not answered: <check> was <value>, needs <threshold>".

- The reversal curse: the model must know its facts forward, on templates it never trained on. Check: forward
  exact match on the held-out templates (its own attention), mean over seeds, at least FORWARD_EXACT_MATCH.
  Without it, a backward failure says nothing: nothing was learned that could fail to reverse.
- The language-model questions (adapter recovery, train/inference mismatch, depth, position): the models must be
  trained to a plateau, or a PPL gap may be the gap between two undertrained models. Check: the share by which
  the best validation PPL fell during the last epoch (0 when early stopping ended training), worst seed, at most
  PLATEAU_GAIN.

Each check is a `PowerCheck`, written to results.json as `power` records {question, check, value, threshold,
passed} (and `at_least`: which side of the threshold passes).
"""

import math
from dataclasses import asdict, dataclass

FORWARD_EXACT_MATCH = 0.9
PLATEAU_GAIN = 0.01

REVERSAL_QUESTION = "reversal curse ({model}-trained model)"
LM_QUESTIONS = {  # verdict key -> (question, the models whose training it rests on)
    "adapter": ("adapter recovery (hypothesis 1)", ("standard",)),
    "mismatch": ("train/inference mismatch (hypothesis 2)", ("standard", "ka")),
    "depth": ("error over depth (hypothesis 3a)", ("standard",)),
    "position": ("error over position (hypothesis 3b)", ("standard",)),
}


@dataclass(frozen=True)
class PowerCheck:
    question: str
    check: str
    value: float | None  # None: not measured (counts as failed)
    threshold: float
    at_least: bool  # True: passes when value >= threshold; False: when value <= threshold

    @property
    def passed(self) -> bool:
        if self.value is None or not math.isfinite(self.value):
            return False
        return self.value >= self.threshold if self.at_least else self.value <= self.threshold

    def not_answered(self) -> str:
        value = "not measured" if self.value is None else f"{self.value:.3g}"
        needs = f"{'≥' if self.at_least else '≤'} {self.threshold:g}"
        return f"not answered: {self.check} was {value}, needs {needs}."

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


def last_epoch_gain(val_ppls: list[float]) -> float | None:
    """How much the best validation PPL fell during the last epoch, relative (0: the last epoch found no better
    model). None with fewer than two epochs: one epoch cannot show a plateau."""
    if len(val_ppls) < 2:
        return None
    before, after = min(val_ppls[:-1]), min(val_ppls)
    return (before - after) / before


def stopped_by(epochs: list[dict]) -> str:
    """What ended a model's training: "early stopping" (patience ran out) or "epoch cap"."""
    return "early stopping" if epochs and epochs[-1].get("early_stop") else "epoch cap"


def plateau_check(question: str, model: str, per_seed: list) -> PowerCheck:
    gains = [f["plateau"][model]["last_epoch_gain"] for f in per_seed]
    worst = None if any(g is None for g in gains) else max(gains)
    return PowerCheck(
        question=question,
        check=f"the {model} model's fall of best val PPL in its last epoch (worst seed; 0 = early stopping fired)",
        value=worst,
        threshold=PLATEAU_GAIN,
        at_least=False,
    )


def reversal_check(model: str, per_seed: list) -> PowerCheck:
    matches = [f["forward_exact_match"].get(model) for f in per_seed]
    known = [m for m in matches if m is not None]
    return PowerCheck(
        question=REVERSAL_QUESTION.format(model=model),
        check=f"{model} model forward exact match, held-out templates (mean over seeds)",
        value=sum(known) / len(known) if known and len(known) == len(matches) else None,
        threshold=FORWARD_EXACT_MATCH,
        at_least=True,
    )


def power_checks(per_seed: list) -> dict[str, list[PowerCheck]]:
    """{verdict key: the checks its verdict rests on} from the seeds' findings."""
    checks = {
        key: [plateau_check(question, model, per_seed) for model in models]
        for key, (question, models) in LM_QUESTIONS.items()
    }
    for model in per_seed[0].get("forward_exact_match", {}):
        checks[f"reversal_{model}"] = [reversal_check(model, per_seed)]
    return checks


def gate(verdict: dict, checks: list[PowerCheck]) -> dict:
    """The verdict when every check passed; else "not answered", naming the first failed check."""
    failed = [check for check in checks if not check.passed]
    if not failed:
        return verdict
    return dict(verdict="not-answered", text=" ".join(check.not_answered() for check in failed))


def power_records(per_seed: list) -> list[dict]:
    """results.json's `power` list: one record per check, in the report's order."""
    return [check.to_dict() for checks in power_checks(per_seed).values() for check in checks]
