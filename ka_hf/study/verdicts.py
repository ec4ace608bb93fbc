"""What a study run concludes: statistics over seeds, and every sentence of the report that rests on a threshold.

A study trains and evaluates every model once per seed. Each seed gives one `findings` dict (the numbers the
report compares, ka_hf.study.experiment.findings); this module turns the list of them into

- `summarize(per_seed)`: every number as {mean, std, n, values}, and
- `verdicts(per_seed)`: {name: {"verdict": short key, "text": sentence}}, each sentence stating the numbers it
  compares and the rule it applied.

The noise rule. Two quantities measured on the same seeds are compared by their per-seed differences d_1..d_N:
the difference is real when |mean(d)| > NOISE_FACTOR x std(d) (sample standard deviation); otherwise the report
says it is within noise. With one seed there is no spread: the verdict follows the sign of the difference and
says that no spread was measured. Functions here compute; they print and write nothing.
"""

import math
import statistics
from dataclasses import dataclass

from .power import gate, power_checks, power_records

NOISE_FACTOR = 2.0
MOST = 0.5  # "most of the gap": an adapter that recovers at least half of the KA-KV gap


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def stats(values) -> dict:
    """{mean, std, n, values} of the finite values (std is None below two values; mean is None with none)."""
    finite = _finite(values)
    return dict(
        mean=statistics.fmean(finite) if finite else None,
        std=statistics.stdev(finite) if len(finite) > 1 else None,
        n=len(finite),
        values=list(values),
    )


def summarize(per_seed: list):
    """The same structure as one seed's findings, each number replaced by stats() over the seeds (lists of numbers
    element by element; booleans become the count of seeds where they hold; other values are kept from seed 0)."""
    first = per_seed[0]
    if isinstance(first, bool):
        return dict(count=sum(bool(v) for v in per_seed), n=len(per_seed))
    if isinstance(first, int | float) or first is None:
        return stats(per_seed)
    if isinstance(first, dict):
        return {key: summarize([seed[key] for seed in per_seed]) for key in first}
    if isinstance(first, list) and all(len(seed) == len(first) for seed in per_seed):
        return [summarize([seed[i] for seed in per_seed]) for i in range(len(first))]
    return first


def format_stat(stat: dict, digits: int = 1, scale: float = 1.0, unit: str = "") -> str:
    """ "12.3 ± 0.4" over several seeds, "12.3" over one, "–" when nothing was measured."""
    if stat["mean"] is None:
        return "–"
    text = f"{stat['mean'] * scale:,.{digits}f}{unit}"
    if stat["std"] is not None:
        text += f" ± {stat['std'] * scale:,.{digits}f}{unit}"
    return text


@dataclass
class Comparison:
    """a - b over the seeds: the mean difference, its noise band, and which side it falls on."""

    difference: float | None
    spread: float | None  # NOISE_FACTOR x std of the per-seed differences; None with one seed
    n: int

    @property
    def sign(self) -> int:
        """+1: a > b, -1: a < b, 0: within noise (or nothing measured). One seed: the sign of the difference."""
        if self.difference is None:
            return 0
        if self.spread is not None and abs(self.difference) <= self.spread:
            return 0
        return (self.difference > 0) - (self.difference < 0)

    def describe(self, digits: int = 2, unit: str = "") -> str:
        if self.difference is None:
            return "not measured"
        text = f"difference {self.difference:+,.{digits}f}{unit}"
        if self.spread is None:
            return text + " (one seed: no spread measured)"
        return text + f", noise band ±{self.spread:,.{digits}f}{unit} ({NOISE_FACTOR:g} std over {self.n} seeds)"


def compare(a_values, b_values) -> Comparison:
    """Paired per-seed comparison of a and b (seeds where either is not finite are left out)."""
    pairs = [
        (float(a), float(b))
        for a, b in zip(a_values, b_values)
        if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))
    ]
    if not pairs:
        return Comparison(None, None, 0)
    differences = [a - b for a, b in pairs]
    spread = NOISE_FACTOR * statistics.stdev(differences) if len(differences) > 1 else None
    return Comparison(statistics.fmean(differences), spread, len(differences))


def _values(per_seed, *path):
    values = []
    for findings in per_seed:
        for key in path:
            findings = findings[key]
        values.append(findings)
    return values


def _ppl(values) -> str:
    return format_stat(stats(values), 1)


# ---------------------------------------------------------------------------------------------------------
# the report's verdicts, one function each


SAME_DISTRIBUTION = 0.9  # layer-mean cosine and CKA of A against V at or above this: "close to V"


def _layer_mean(per_seed, name, key) -> list[float]:
    """Each seed's mean over layers of one A-vs-V statistic."""
    return [statistics.fmean(layer[key] for layer in f["distributions"][name]) for f in per_seed]


def distribution_sentence(per_seed: list) -> str:
    """Hypothesis 1 read from the A-vs-V statistics (ka_hf.study.evaluation.distributions), not from PPL."""
    if not per_seed[0].get("distributions", {}).get("ka"):
        return ""

    def numbers(name):
        return ", ".join(
            f"{label} {format_stat(stats(_layer_mean(per_seed, name, key)), 2)}"
            for key, label in (("cosine", "cosine"), ("cka", "CKA"), ("norm_ratio", "norm ratio"))
        )

    cosine, cka = (stats(_layer_mean(per_seed, "ka", key))["mean"] for key in ("cosine", "cka"))
    close = cosine >= SAME_DISTRIBUTION and cka >= SAME_DISTRIBUTION
    text = (
        f"Measured directly (mean over layers): A against V {numbers('ka')}, so A is "
        f"{'close to' if close else 'far from'} V's distribution (both cosine and CKA ≥ {SAME_DISTRIBUTION} count "
        "as close)."
    )
    for name in per_seed[0]["distributions"]:
        if name == "ka":
            continue
        moved = compare(_layer_mean(per_seed, name, "cka"), _layer_mean(per_seed, "ka", "cka"))
        direction = "closer to" if moved.sign > 0 else "farther from" if moved.sign < 0 else "no closer to"
        text += f" {name}: f(A) against V {numbers(name)} — {direction} V than A is (CKA {moved.describe(2)})."
    return text


def adapter_verdict(per_seed: list) -> dict:
    """Hypothesis 1: does a learned map from A to V-space close most of the KA-KV gap? With the A-vs-V
    statistics, the verdict also says how far A is from V and whether the adapter moved it closer."""
    verdict = _adapter_ppl_verdict(per_seed)
    sentence = distribution_sentence(per_seed)
    return verdict | {"text": f"{verdict['text']} {sentence}".strip()}


def _adapter_ppl_verdict(per_seed: list) -> dict:
    kv, ka = _values(per_seed, "kv_ppl"), _values(per_seed, "ka_cache_ppl")
    names = list(per_seed[0]["adapters"])
    if not names:
        return dict(verdict="no-adapter", text="No adapter was fitted.")
    adapter_ppls = {name: _values(per_seed, "adapters", name, "ppl") for name in names}
    listed = "; ".join(f"{name} {_ppl(values)}" for name, values in adapter_ppls.items())
    gap = compare(ka, kv)
    if gap.sign <= 0:
        return dict(
            verdict="no-gap",
            text=f"KA at inference is no worse than KV here (PPL {_ppl(ka)} vs {_ppl(kv)}; {gap.describe(1)}), so "
            f"there is no gap for an adapter to recover. The adapters reach PPL {listed}.",
        )
    recovered = {name: _values(per_seed, "adapters", name, "gap_recovered") for name in names}
    best = max(names, key=lambda name: stats(recovered[name])["mean"] or -math.inf)
    against_half = compare(recovered[best], [MOST] * len(per_seed))
    shares = "; ".join(f"{name} {format_stat(stats(r), 0, 100, '%')}" for name, r in recovered.items())
    numbers = (
        f"KA {_ppl(ka)} vs KV {_ppl(kv)}; adapters: PPL {listed}; share of the gap recovered: {shares} "
        f"(threshold {MOST:.0%}: {against_half.describe(2)})"
    )
    if max(stats(r)["mean"] or -math.inf for r in recovered.values()) < 0:
        return dict(
            verdict="worse-than-ka",
            text=f"Every adapter makes PPL worse than the KA cache without one, so this fit explains none of the "
            f"degradation ({numbers}).",
        )
    if against_half.sign > 0:
        return dict(
            verdict="most",
            text=f"The best adapter ({best}) closes most of the gap, so the difference between the A and V "
            f"distributions explains most of the degradation ({numbers}).",
        )
    if against_half.sign < 0:
        return dict(
            verdict="part",
            text=f"The best adapter ({best}) closes less than half of the gap, so the difference between the A "
            f"and V distributions explains only part of the degradation ({numbers}).",
        )
    return dict(
        verdict="within-noise",
        text=f"The best adapter ({best}) closes about half of the gap: its share is within noise of {MOST:.0%} "
        f"({numbers}).",
    )


def mismatch_verdict(per_seed: list) -> dict:
    """Hypothesis 2: does training with KA do better than reading a standard model with a KA cache?"""
    trained, cache = _values(per_seed, "ka_trained_ppl"), _values(per_seed, "ka_cache_ppl")
    kv = _values(per_seed, "kv_ppl")
    comparison = compare(trained, cache)
    numbers = (
        f"KA-trained model with KA: PPL {_ppl(trained)}; standard model with a KA cache: {_ppl(cache)}; "
        f"standard model with KV: {_ppl(kv)}; {comparison.describe(1)}"
    )
    if comparison.sign < 0:
        return dict(verdict="removes", text=f"Training with KA removes part of the mismatch ({numbers}).")
    if comparison.sign > 0:
        return dict(verdict="worse", text=f"Training with KA does worse than KA at inference only here ({numbers}).")
    return dict(verdict="within-noise", text=f"Training with KA and KA at inference only are within noise ({numbers}).")


def depth_verdict(per_seed: list) -> dict:
    """Hypothesis 3a: does PPL rise with every added KA layer?"""
    monotone = sum(bool(f["sweep_monotone"]) for f in per_seed)
    first = [f["sweep_ppl"][0] for f in per_seed]
    last = [f["sweep_ppl"][-1] for f in per_seed]
    layers = len(per_seed[0]["sweep_ppl"])
    seeds = len(per_seed)
    where = f"in {monotone} of {seeds} seeds" if monotone < seeds else ("in every seed" if seeds > 1 else "")
    numbers = f"PPL {_ppl(first)} with KA on layer 0, {_ppl(last)} on all {layers} layers"
    if monotone == seeds:
        return dict(
            verdict="rises", text=f"PPL rises with every added KA layer{' ' + where if where else ''} ({numbers})."
        )
    return dict(
        verdict="not-monotone",
        text=f"PPL does not rise with every added KA layer: it does {where} ({numbers}).",
    )


def position_verdict(per_seed: list) -> dict:
    """Hypothesis 3b: does the KA - KV NLL gap grow along the sequence?"""
    ranges = list(per_seed[0]["position_gap"])
    if len(ranges) < 2:
        return dict(verdict="not-measured", text="Too few positions to tell how the gap moves along the sequence.")
    first = _values(per_seed, "position_gap", ranges[0])
    last = _values(per_seed, "position_gap", ranges[-1])
    comparison = compare(last, first)
    gaps = ", ".join(f"{format_stat(stats(_values(per_seed, 'position_gap', r)), 3)} ({r})" for r in ranges)
    numbers = f"mean NLL gap KA − KV: {gaps} nats; last − first range: {comparison.describe(3, ' nats')}"
    if comparison.sign > 0:
        return dict(verdict="grows", text=f"The gap grows along the sequence ({numbers}).")
    if comparison.sign < 0:
        return dict(verdict="shrinks", text=f"The gap shrinks along the sequence ({numbers}).")
    return dict(verdict="within-noise", text=f"The gap does not move along the sequence beyond noise ({numbers}).")


def chance_rank_error(ranks: list[dict]) -> float:
    """The standard error of a mean rank at chance: a rank uniform over N names has variance (N² − 1) / 12, over
    every ranked sentence of every seed. A mean rank counts as better than chance only beyond NOISE_FACTOR of it."""
    names, sentences = ranks[0]["names"], sum(rank["sentences"] for rank in ranks)
    return math.sqrt((names**2 - 1) / 12 / sentences)


def reversal_verdict(per_seed: list, model: str) -> dict:
    """The reversal curse (Berglund et al. 2023), read from two controls.

    Its power check (ka_hf.study.power) asks that the model knows its facts forward on held-out templates. Then:
    the strict control ranks the right name among all trained names for each backward sentence (held-out
    templates, the model's own attention): a model that did not reverse its facts ranks it at chance, (N + 1) / 2,
    however familiar the names are. The curse is a mean rank not better than chance beyond noise
    (`chance_rank_error`). The
    unseen-facts control (answer PPL of facts never trained on) is reported beside it.
    """
    control = [f["reversal_control"][model] for f in per_seed]
    mode, included = control[0]["mode"], control[0]["trained_on"]
    trained_fwd = [c["trained"]["forward_answer_ppl"] for c in control]
    unseen_fwd = [c["unseen"]["forward_answer_ppl"] for c in control]
    trained_bwd = [c["trained"]["backward_answer_ppl"] for c in control]
    unseen_bwd = [c["unseen"]["backward_answer_ppl"] for c in control]
    transfer = compare(trained_bwd, unseen_bwd)
    numbers = (
        f"answer PPL in {mode}, trained vs unseen facts: forward {_ppl(trained_fwd)} vs {_ppl(unseen_fwd)}; "
        f"backward {_ppl(trained_bwd)} vs {_ppl(unseen_bwd)} ({transfer.describe(1)})"
    )
    who = f"The {model}-trained model"
    ranks = [f.get("name_rank", {}).get(model, {}).get(mode) for f in per_seed]
    if any(rank is None for rank in ranks):  # no rank control measured: the PPL control alone
        learned = compare(trained_fwd, unseen_fwd)
        if learned.sign >= 0:
            return dict(
                verdict="not-learned",
                text=f"{who} did not learn its facts: their forward answers are no easier than unseen facts' "
                f"({numbers}), so its reversal numbers say nothing about the reversal curse.",
            )
        side = "easier" if transfer.sign < 0 else "no easier"
        return dict(
            verdict="no-rank-control",
            text=f"{who}'s backward answers are {side} than unseen facts' ({numbers}); without the rank among "
            "trained names this does not separate knowing the facts from knowing the names.",
        )
    mean_rank = [rank["mean_rank"] for rank in ranks]
    chance, margin = ranks[0]["chance_rank"], NOISE_FACTOR * chance_rank_error(ranks)
    above_chance = chance - statistics.fmean(mean_rank) > margin
    rank_numbers = (
        f"right name's mean rank among the {ranks[0]['names']} trained names {_ppl(mean_rank)} (chance "
        f"{chance:.1f}; better than chance needs more than {margin:.1f} below it), "
        f"top-1 {format_stat(stats([r['top1'] for r in ranks]), 2)}"
    )
    if included != "forward":
        side = "better than" if above_chance else "no better than"
        return dict(
            verdict=f"trained-{included}",
            text=f"{who} was trained on {included} sentences; its backward rank is {side} chance "
            f"({rank_numbers}; {numbers}).",
        )
    if above_chance:
        return dict(
            verdict="no-curse",
            text=f"{who} knows its facts forward and ranks the right name above chance backward, so this run "
            f"does not show the reversal curse ({rank_numbers}; {numbers}).",
        )
    return dict(
        verdict="curse",
        text=f"{who} knows its facts forward, but backward the right name ranks no better than chance among the "
        f"trained names: the reversal curse ({rank_numbers}; {numbers}).",
    )


def train_time_verdict(per_seed: list) -> dict:
    """KA training time / standard training time, wall clock — with its spread, or a warning when there is none."""
    ratios = _values(per_seed, "train_time_ratio")
    ratio = stats(ratios)
    text = f"KA training took {format_stat(ratio, 2)}x the standard training time (wall clock"
    if ratio["std"] is None:
        return dict(
            verdict="one-measure",
            text=text + ", one measurement: on a machine shared with other jobs a wall-time ratio can be off by "
            "a large factor; benchmarks/bench_training.py measures it with repeats).",
        )
    noisy = ratio["mean"] and ratio["std"] / ratio["mean"] > 0.1
    return dict(
        verdict="noisy" if noisy else "measured",
        text=text
        + f", {ratio['n']} seeds"
        + (": a spread over 10% of the mean says the machine was busy; read it as rough)." if noisy else ")."),
    )


def verdicts(per_seed: list) -> dict:
    """Every verdict of the report, from the per-seed findings; a verdict whose power check failed
    (ka_hf.study.power) says "not answered" instead."""
    result = dict(
        adapter=adapter_verdict(per_seed),
        mismatch=mismatch_verdict(per_seed),
        depth=depth_verdict(per_seed),
        position=position_verdict(per_seed),
        train_time=train_time_verdict(per_seed),
    )
    for model in per_seed[0].get("reversal_control", {}):
        result[f"reversal_{model}"] = reversal_verdict(per_seed, model)
    for key, checks in power_checks(per_seed).items():
        if key in result:
            result[key] = gate(result[key], checks)
    return result


def conclusions(per_seed: list) -> dict:
    """A run's findings: each seed's, their summary over the seeds, the power checks and the verdicts."""
    return dict(
        per_seed=per_seed, summary=summarize(per_seed), power=power_records(per_seed), verdicts=verdicts(per_seed)
    )
