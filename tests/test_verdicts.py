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
        # trained to a plateau (early stopping fired), facts known forward: every power check passes
        plateau={attention: dict(last_epoch_gain=0.0, stopped_by="early stopping") for attention in ("standard", "ka")},
        forward_exact_match={"standard": 0.97},
        name_rank={"standard": {"kv": rank(30.0)}},
    )
    return base | overrides


def rank(mean_rank: float, chance: float = 30.5) -> dict:
    return dict(mean_rank=mean_rank, chance_rank=chance, top1=0.02, mean_reciprocal_rank=0.1, names=60, sentences=180)


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
    "mean_rank, expected",
    # chance 30.5 among 60 names over 180 sentences: standard error 1.29, so "better" needs a mean rank below 27.9
    [(30.5, "curse"), (35.0, "curse"), (28.5, "curse"), (27.0, "no-curse"), (3.0, "no-curse")],
)
def test_reversal_curse_is_called_against_chance_rank(mean_rank, expected):
    verdict = reversal_verdict(
        seeds(control(5.0, 100.0) | dict(name_rank={"standard": {"kv": rank(mean_rank)}})), "standard"
    )
    assert verdict["verdict"] == expected
    assert f"{mean_rank:.1f}" in verdict["text"] and "chance 30.5" in verdict["text"] and "300.0" in verdict["text"]


def test_familiar_names_alone_are_not_a_reversal():
    """Backward answers easier than unseen facts' (the names are familiar) but the right name at chance rank:
    the curse, which the PPL control alone would have missed."""
    verdict = reversal_verdict(seeds(control(5.0, 100.0)), "standard")
    assert verdict["verdict"] == "curse"


def test_without_the_rank_control_unlearned_facts_give_no_verdict():
    verdict = reversal_verdict(seeds(control(320.0, 400.0) | dict(name_rank={})), "standard")
    assert verdict["verdict"] == "not-learned" and "curse" in verdict["text"]


def test_reversal_within_noise_is_not_called_a_transfer():
    per_seed = seeds(*(dict(name_rank={"standard": {"kv": rank(r)}}) for r in (29.0, 30.0, 29.5)))
    assert reversal_verdict(per_seed, "standard")["verdict"] == "curse"


@pytest.mark.parametrize("exact_match, answered", [(0.89, False), (0.9, True), (0.97, True)])
def test_reversal_power_gate_flips_at_its_threshold(exact_match, answered):
    verdict = verdicts(seeds(dict(forward_exact_match={"standard": exact_match})))["reversal_standard"]
    assert (verdict["verdict"] != "not-answered") is answered
    if not answered:
        assert verdict["text"] == (
            "not answered: standard model forward exact match, held-out templates (mean over seeds) was 0.89, "
            "needs ≥ 0.9."
        )


@pytest.mark.parametrize("gain, answered", [(0.0, True), (0.01, True), (0.05, False), (None, False)])
def test_lm_power_gate_flips_at_the_plateau(gain, answered):
    plateau = {attention: dict(last_epoch_gain=gain, stopped_by="epoch cap") for attention in ("standard", "ka")}
    result = verdicts(seeds(dict(plateau=plateau)))
    for key in ("adapter", "mismatch", "depth", "position"):
        assert (result[key]["verdict"] != "not-answered") is answered, key
        if not answered:
            assert result[key]["text"].startswith("not answered: the standard model's fall of best val PPL")
    assert result["train_time"]["verdict"] != "not-answered"  # a measurement, not a question needing power


def test_one_seed_short_of_a_plateau_fails_the_check():
    plateaus = [{a: dict(last_epoch_gain=gain, stopped_by="x") for a in ("standard", "ka")} for gain in (0.0, 0.2, 0.0)]
    result = verdicts(seeds(*(dict(plateau=p) for p in plateaus)))
    assert result["depth"]["verdict"] == "not-answered" and "was 0.2," in result["depth"]["text"]


def test_power_records_carry_every_check():
    from ka_hf.study.verdicts import conclusions

    records = conclusions(seeds(dict(forward_exact_match={"standard": 0.5})))["power"]
    assert [set(r) >= {"question", "check", "value", "threshold", "passed"} for r in records] == [True] * len(records)
    reversal = [r for r in records if r["question"].startswith("reversal")]
    assert reversal == [
        dict(
            question="reversal curse (standard-trained model)",
            check="standard model forward exact match, held-out templates (mean over seeds)",
            value=0.5,
            threshold=0.9,
            at_least=True,
            passed=False,
        )
    ]
    assert {r["question"] for r in records if r["passed"]} >= {"adapter recovery (hypothesis 1)"}


def test_last_epoch_gain():
    from ka_hf.study.power import last_epoch_gain

    assert last_epoch_gain([100.0]) is None
    assert last_epoch_gain([100.0, 90.0]) == pytest.approx(0.1)
    assert last_epoch_gain([100.0, 90.0, 95.0]) == 0.0  # the last epoch found no better model


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
