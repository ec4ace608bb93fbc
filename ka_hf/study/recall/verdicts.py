"""What a recall run concludes: per-seed findings -> mean ± std, the power check, and the verdicts' sentences.

The noise rule is the study's (ka_hf.study.verdicts): two modes are compared by their per-seed differences on the
same test queries, and a difference is called only when it exceeds NOISE_FACTOR standard deviations of them (one
seed: by its sign, saying that no spread was measured). The power check is the study's too (ka_hf.study.power):
every verdict rests on the standard model recalling under its own KV cache; when it does not, each verdict says
"not answered: <check> was <value>, needs <threshold>".

The guess level is the accuracy of a model that knows which tokens are values but not which key each belongs to
and picks one of the sequence's P values: 1/P a query, pooled like the modes' accuracy. A mode at or under it has
learned nothing about the pairing.

"Fails at a distance" has two readings, both given: the shortest distance bin where a mode is below kv beyond
noise, and the shortest where it answers fewer than FAIL_BELOW of its queries.
"""

from ..power import PowerCheck, gate
from ..verdicts import compare, format_stat, stats, summarize

RECALL_POWER = 0.99  # the standard model's kv accuracy, worst seed
FAIL_BELOW = 0.5
KV, KA, HYBRID, ADAPTER, TRAINED = "kv", "ka", "ka-hybrid", "ka+adapter", "ka-trained"


def seed_findings(seed: dict) -> dict:
    """One seed's numbers per mode: accuracy overall, by shape, by distance bin, beyond the window, cache bytes."""
    findings = {}
    for name, result in seed["results"].items():
        shapes = result["by_shape"]
        longest = list(shapes)[-1]
        findings[name] = dict(
            accuracy=result["accuracy"],
            by_shape={shape: values["accuracy"] for shape, values in shapes.items()},
            by_distance={key: values["accuracy"] for key, values in result["by_distance"].items()},
            far=result.get("far", {}).get("accuracy"),
            cache_bytes=shapes[longest]["cache_bytes_per_sequence"],
        )
    return findings


def _values(per_seed, mode, *path):
    values = []
    for findings in per_seed:
        value = findings[mode]
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        values.append(value)
    return values


def _acc(values) -> str:
    return format_stat(stats(values), 3)


def guess_level(seed: dict) -> float | None:
    """The pooled accuracy of guessing one of the sequence's values (1/P a query) on the seed's test queries."""
    shapes = seed["results"][KV]["by_shape"].values()
    queries = sum(shape["queries"] for shape in shapes)
    return sum(shape["queries"] / shape["pairs"] for shape in shapes) / queries if queries else None


def _guess(guess: float | None) -> str:
    return "" if guess is None else f"; guessing one of the sequence's values: {guess:.3f}"


def power_check(per_seed: list) -> PowerCheck:
    kv = [f[KV]["accuracy"] for f in per_seed]
    worst = None if any(v is None for v in kv) else min(kv)
    return PowerCheck(
        question="in-context recall (every verdict of this report)",
        check="the standard model's kv recall accuracy on the test queries (worst seed)",
        value=worst,
        threshold=RECALL_POWER,
        at_least=True,
    )


def failure_distance(per_seed: list, mode: str) -> dict:
    """{"below_kv": the shortest distance bin where `mode` is below kv beyond noise, "below_half": the shortest
    where its accuracy is under FAIL_BELOW} (None: nowhere)."""
    bins = list(per_seed[0][KV]["by_distance"])
    below_kv = below_half = None
    for key in bins:
        mine = _values(per_seed, mode, "by_distance", key)
        if below_kv is None and compare(mine, _values(per_seed, KV, "by_distance", key)).sign < 0:
            below_kv = key
        mean = stats(mine)["mean"]
        if below_half is None and mean is not None and mean < FAIL_BELOW:
            below_half = key
    return dict(below_kv=below_kv, below_half=below_half, bins=bins)


def _where(failure: dict) -> str:
    """Where a mode fails, in words: "below kv ... from distance bin X; under half ... from Y"."""

    def at(key):
        if key is None:
            return "at no distance measured"
        return f"at every distance, from the shortest ({key})" if key == failure["bins"][0] else f"from distance {key}"

    below_kv, below_half = at(failure["below_kv"]), at(failure["below_half"])
    if failure["below_kv"] == failure["below_half"]:
        return f"it is below kv beyond noise and answers under {FAIL_BELOW:.0%} of its queries {below_kv} (tokens)"
    return (
        f"it is below kv beyond noise {below_kv} and answers under {FAIL_BELOW:.0%} of its queries {below_half} "
        "(key -> query distance, tokens)"
    )


def plan3_verdict(per_seed: list, guess: float | None = None) -> dict:
    """Does plan 3 (a standard-trained model read with a KA cache) keep recall, and from what distance not?"""
    kv, ka = _values(per_seed, KV, "accuracy"), _values(per_seed, KA, "accuracy")
    gap = compare(ka, kv)
    others = "; ".join(
        f"{mode} {_acc(_values(per_seed, mode, 'accuracy'))}" for mode in (HYBRID, ADAPTER) if mode in per_seed[0]
    )
    numbers = f"accuracy ka {_acc(ka)} vs kv {_acc(kv)}, {gap.describe(3)}" + (f"; {others}" if others else "")
    numbers += _guess(guess)
    if gap.sign >= 0:
        return dict(
            verdict="keeps", text=f"Plan 3 keeps recall: the KA cache is not below KV beyond noise ({numbers})."
        )
    failure = failure_distance(per_seed, KA)
    return dict(
        verdict="loses",
        failure=failure,
        text=f"Plan 3 loses recall: {_where(failure)} ({numbers}).",
    )


def ka_training_verdict(per_seed: list, training: list, guess: float | None = None) -> dict:
    """Does training with KA recover what the KA cache loses? (Above the KA cache but not above guessing among
    the sequence's values is said so: it learned no pairing.)"""
    kv, ka, trained = (_values(per_seed, mode, "accuracy") for mode in (KV, KA, TRAINED))
    over_ka, against_kv = compare(trained, ka), compare(trained, kv)
    over_guess = compare(trained, [guess] * len(trained)) if guess is not None else None
    steps = ", ".join(
        f"{t['steps']} of at most {t.get('max_steps', t['steps'])} steps "
        + ("(target reached)" if t["reached_target"] else "(budget spent, target not reached)")
        for t in training
    )
    numbers = (
        f"KA-trained model under ka {_acc(trained)}; standard model under ka {_acc(ka)} ({over_ka.describe(3)}), "
        f"under kv {_acc(kv)} ({against_kv.describe(3)}){_guess(guess)}"
        + (f" ({over_guess.describe(3)})" if over_guess is not None else "")
        + f"; KA training: {steps}"
    )
    if compare(ka, kv).sign >= 0:
        return dict(
            verdict="nothing-lost", text=f"Plan 3 loses no recall here, so there is nothing to recover ({numbers})."
        )
    if over_ka.sign <= 0:
        return dict(verdict="does-not", text=f"KA training does not recover recall ({numbers}).")
    if against_kv.sign >= 0:
        return dict(verdict="recovers", text=f"KA training recovers recall: it matches KV ({numbers}).")
    if over_guess is not None and over_guess.sign <= 0:
        return dict(
            verdict="guess-level",
            text=f"The KA-trained model recalls more than the KA cache, but no more than guessing one of the "
            f"sequence's values: it learned no pairing ({numbers}).",
        )
    failure = failure_distance(per_seed, TRAINED)
    return dict(
        verdict="part",
        failure=failure,
        text=f"KA training recovers part of the recall the KA cache loses (above guessing, far below KV); for the "
        f"KA-trained model {_where(failure)} ({numbers}).",
    )


def window_verdict(per_seed: list, window: int, sink: int) -> dict:
    """kv-window@W+S against ka-window@W+S at equal cache bytes, and both against the full caches."""
    suffix = f"@{window}" + (f"+{sink}" if sink else "")
    kv_window, ka_window = f"kv-window{suffix}", f"ka-window{suffix}"
    if kv_window not in per_seed[0] or ka_window not in per_seed[0]:
        return dict(verdict="not-measured", text="No window modes were run.")
    bytes_kv = stats(_values(per_seed, kv_window, "cache_bytes"))["mean"]
    bytes_ka = stats(_values(per_seed, ka_window, "cache_bytes"))["mean"]
    bytes_full = stats(_values(per_seed, KV, "cache_bytes"))["mean"]
    equal = "equal" if bytes_kv == bytes_ka else "NOT equal"
    overall = compare(_values(per_seed, ka_window, "accuracy"), _values(per_seed, kv_window, "accuracy"))
    far = compare(_values(per_seed, ka_window, "far"), _values(per_seed, kv_window, "far"))
    numbers = (
        f"cache bytes per sequence at the longest shape: {bytes_ka:,.0f} (ka-window), {bytes_kv:,.0f} (kv-window): "
        f"{equal}; full caches {bytes_full:,.0f}. Accuracy ka-window {_acc(_values(per_seed, ka_window, 'accuracy'))} "
        f"vs kv-window {_acc(_values(per_seed, kv_window, 'accuracy'))} ({overall.describe(3)}); beyond the window "
        f"(distance >= {window}{f'; kv-window still sees the {sink} sink tokens' if sink else ''}) "
        f"{_acc(_values(per_seed, ka_window, 'far'))} vs {_acc(_values(per_seed, kv_window, 'far'))} "
        f"({far.describe(3)}); full kv {_acc(_values(per_seed, KV, 'accuracy'))}, full ka "
        f"{_acc(_values(per_seed, KA, 'accuracy'))}"
    )
    if overall.sign > 0:
        verdict, text = "ka-window-better", "At equal cache bytes the KA window recalls more than the KV window"
    elif overall.sign < 0:
        verdict, text = "kv-window-better", "At equal cache bytes the KV window recalls more than the KA window"
    else:
        verdict, text = "within-noise", "At equal cache bytes the KA and KV windows recall the same within noise"
    against_full = compare(_values(per_seed, kv_window, "accuracy"), _values(per_seed, KV, "accuracy"))
    full = "below" if against_full.sign < 0 else "not below"
    return dict(
        verdict=verdict,
        text=f"{text}; the KV window is {full} the full KV cache ({against_full.describe(3)}) ({numbers}).",
    )


def verdicts(per_seed: list, training: list, window: int, sink: int, guess: float | None = None) -> dict:
    """Every verdict, each gated by the power check."""
    check = power_check(per_seed)
    result = dict(
        plan3=plan3_verdict(per_seed, guess),
        ka_training=ka_training_verdict(per_seed, training, guess),
        windows=window_verdict(per_seed, window, sink),
    )
    return {key: gate(verdict, [check]) for key, verdict in result.items()}


def conclusions(seeds: list, window: int, sink: int) -> dict:
    """{per_seed, summary (mode -> mean/std of every number), guess (level), power (records), verdicts} of a run's
    seeds (every seed scores the same test queries, so the guess level is seed 0's)."""
    per_seed = [seed_findings(seed) for seed in seeds]
    training = [seed["training"][TRAINED] for seed in seeds]
    guess = guess_level(seeds[0]) if seeds[0].get("results") else None
    return dict(
        per_seed=per_seed,
        summary=summarize(per_seed),
        guess=guess,
        power=[power_check(per_seed).to_dict()],
        verdicts=verdicts(per_seed, training, window, sink, guess),
    )
