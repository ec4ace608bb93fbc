"""The report's verdicts are computed: each one flips when its findings cross its threshold, stays undecided
within noise, and states the numbers it compares."""

import math

import pytest

from ka_hf.study.verdicts import (
    NOISE_FACTOR,
    adapter_verdict,
    compare,
    depth_verdict,
    mismatch_verdict,
    position_verdict,
    reversal_verdict,
    stats,
    summarize,
    train_time_verdict,
    verdicts,
)


def findings(**overrides) -> dict:
    """One seed's findings, as ka_hf.study.experiment.findings builds them, with KA worse than KV."""
    base = dict(
        kv_ppl=50.0,
        ka_cache_ppl=80.0,
        ka_cache_degradation_pct=60.0,
        ka_trained_ppl=60.0,
        train_time_ratio=1.1,
        adapters={"least-squares": dict(ppl=70.0, degradation_pct=40.0, gap_recovered=1 / 3)},
        sweep_ppl=[55.0, 65.0, 80.0],
        sweep_monotone=True,
        position_gap={"positions 1-8": 0.1, "positions 9-16": 0.2, "positions 17-24": 0.4},
        reversal_control={
            "standard": dict(
                mode="kv",
                trained_on="forward",
                split="test",
                trained=dict(forward_answer_ppl=5.0, backward_answer_ppl=400.0),
                unseen=dict(forward_answer_ppl=300.0, backward_answer_ppl=390.0),
            )
        },
    )
    return base | overrides


def seeds(*per_seed_overrides) -> list[dict]:
    return [findings(**overrides) for overrides in per_seed_overrides]


def with_adapter(ppl: float, kv: float = 50.0, ka: float = 80.0) -> dict:
    recovered = (ka - ppl) / (ka - kv) if ka > kv else math.nan
    return dict(
        kv_ppl=kv,
        ka_cache_ppl=ka,
        adapters={"distilled": dict(ppl=ppl, degradation_pct=(ppl / kv - 1) * 100, gap_recovered=recovered)},
    )


def test_stats_and_summary_over_seeds():
    assert stats([1.0, 3.0]) == dict(mean=2.0, std=pytest.approx(math.sqrt(2)), n=2, values=[1.0, 3.0])
    assert stats([2.0])["std"] is None and stats([math.nan])["mean"] is None
    summary = summarize(seeds({}, dict(kv_ppl=52.0)))
    assert summary["kv_ppl"]["mean"] == 51.0 and summary["sweep_monotone"] == dict(count=2, n=2)
    assert summary["sweep_ppl"][0]["mean"] == 55.0 and summary["adapters"]["least-squares"]["ppl"]["n"] == 2


def test_compare_calls_a_difference_only_beyond_the_noise_band():
    assert compare([2.0, 2.1, 1.9], [1.0, 1.0, 1.0]).sign == 1
    noisy = compare([2.0, 0.0, 4.0], [1.0, 1.0, 1.0])  # mean difference 1, std 2: within 2 std
    assert noisy.sign == 0 and noisy.spread == pytest.approx(NOISE_FACTOR * 2.0)
    assert compare([1.0], [2.0]).sign == -1 and "one seed" in compare([1.0], [2.0]).describe()


@pytest.mark.parametrize(
    "adapter_ppl, expected",
    [(60.0, "most"), (70.0, "part")],  # recovers 2/3, then 1/3, of the gap 80 -> 50
)
def test_adapter_verdict_flips_at_half_the_gap(adapter_ppl, expected):
    verdict = adapter_verdict(seeds(with_adapter(adapter_ppl)))
    assert verdict["verdict"] == expected
    assert "80.0" in verdict["text"] and "50.0" in verdict["text"] and f"{adapter_ppl:.1f}" in verdict["text"]
    assert "50%" in verdict["text"]  # the threshold it compared against


def test_an_adapter_worse_than_ka_explains_nothing():
    verdict = adapter_verdict(seeds(with_adapter(95.0)))
    assert verdict["verdict"] == "worse-than-ka" and "95.0" in verdict["text"] and "-50%" in verdict["text"]


def test_adapter_verdict_within_noise_of_half():
    per_seed = seeds(with_adapter(60.0), with_adapter(70.0), with_adapter(65.0))
    assert adapter_verdict(per_seed)["verdict"] == "within-noise"


def test_no_gap_reads_sensibly_when_ka_is_no_worse_than_kv():
    verdict = adapter_verdict(seeds(with_adapter(49.0, kv=50.0, ka=49.5)))
    assert verdict["verdict"] == "no-gap"
    assert "nan" not in verdict["text"].lower() and "no gap" in verdict["text"] and "49.5" in verdict["text"]


@pytest.mark.parametrize("trained, expected", [(60.0, "removes"), (90.0, "worse")])
def test_mismatch_verdict_flips(trained, expected):
    verdict = mismatch_verdict(seeds(dict(ka_trained_ppl=trained)))
    assert verdict["verdict"] == expected and f"{trained:.1f}" in verdict["text"] and "80.0" in verdict["text"]


def test_mismatch_within_noise():
    per_seed = seeds(dict(ka_trained_ppl=70.0), dict(ka_trained_ppl=90.0), dict(ka_trained_ppl=80.0))
    assert mismatch_verdict(per_seed)["verdict"] == "within-noise"


def test_depth_verdict_counts_the_seeds():
    assert depth_verdict(seeds({}, {}))["verdict"] == "rises"
    verdict = depth_verdict(seeds({}, dict(sweep_ppl=[55.0, 90.0, 80.0], sweep_monotone=False)))
    assert verdict["verdict"] == "not-monotone" and "1 of 2 seeds" in verdict["text"]


@pytest.mark.parametrize(
    "gaps, expected",
    [((0.1, 0.4), "grows"), ((0.4, 0.1), "shrinks")],
)
def test_position_verdict_flips(gaps, expected):
    per_seed = seeds(dict(position_gap={"positions 1-8": gaps[0], "positions 9-16": gaps[1]}))
    verdict = position_verdict(per_seed)
    assert verdict["verdict"] == expected and f"{gaps[0]:.3f}" in verdict["text"]


def control(trained_fwd, trained_bwd, unseen_fwd=300.0, unseen_bwd=390.0, trained_on="forward") -> dict:
    return dict(
        reversal_control={
            "standard": dict(
                mode="kv",
                trained_on=trained_on,
                split="test",
                trained=dict(forward_answer_ppl=trained_fwd, backward_answer_ppl=trained_bwd),
                unseen=dict(forward_answer_ppl=unseen_fwd, backward_answer_ppl=unseen_bwd),
            )
        }
    )


@pytest.mark.parametrize(
    "trained_bwd, expected",
    [(400.0, "curse"), (390.0, "curse"), (100.0, "no-curse")],  # no better than unseen = the curse
)
def test_reversal_curse_is_called_against_the_unseen_facts(trained_bwd, expected):
    verdict = reversal_verdict(seeds(control(5.0, trained_bwd)), "standard")
    assert verdict["verdict"] == expected
    assert f"{trained_bwd:.1f}" in verdict["text"] and "390.0" in verdict["text"] and "300.0" in verdict["text"]


def test_no_reversal_verdict_when_the_facts_were_not_learned():
    verdict = reversal_verdict(seeds(control(320.0, 400.0)), "standard")
    assert verdict["verdict"] == "not-learned" and "curse" in verdict["text"]


def test_reversal_within_noise_is_not_called_a_transfer():
    per_seed = seeds(control(5.0, 300.0), control(5.0, 480.0), control(6.0, 390.0))
    assert reversal_verdict(per_seed, "standard")["verdict"] == "curse"


def test_train_time_carries_its_spread_or_a_warning():
    one = train_time_verdict(seeds({}))
    assert one["verdict"] == "one-measure" and "1.10x" in one["text"] and "shared" in one["text"]
    steady = train_time_verdict(seeds(dict(train_time_ratio=1.0), dict(train_time_ratio=1.02)))
    assert steady["verdict"] == "measured" and "±" in steady["text"]
    noisy = train_time_verdict(seeds(dict(train_time_ratio=0.13), dict(train_time_ratio=1.0)))
    assert noisy["verdict"] == "noisy" and "busy" in noisy["text"]


def test_every_verdict_is_produced():
    names = set(verdicts(seeds({}, {})))
    assert names == {"adapter", "mismatch", "depth", "position", "train_time", "reversal_standard"}
