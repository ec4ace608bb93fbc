"""One seed's findings: the numbers the report's prose compares (ka_hf.study.verdicts turns the seeds' findings
into the verdicts, ka_hf.study.power into the power checks), computed from the seed's record so that the text and
the JSON agree."""

from ..evaluation.run import position_gaps
from ..fit_adapters import gap_recovered
from ..power import last_epoch_gain, stopped_by


def _by_mode(records):
    return {record["mode"]: record for record in records}


def findings(record: dict, facts_include: str = "forward") -> dict:
    """One seed's numbers that the report's prose compares (ka_hf.study.verdicts turns the seeds' findings into
    the verdicts), computed here so the text and the JSON agree."""
    standard = _by_mode(record["inference"]["standard"])
    ka_trained = _by_mode(record["inference"]["ka"])
    kv, ka, hybrid = standard["kv"]["ppl"], standard["ka"]["ppl"], standard["ka-hybrid"]["ppl"]
    result = dict(
        kv_ppl=kv,
        ka_cache_ppl=ka,
        ka_cache_degradation_pct=standard["ka"]["degradation_pct"],
        hybrid_ppl=hybrid,
        hybrid_degradation_pct=standard["ka-hybrid"]["degradation_pct"],
        ka_trained_ppl=ka_trained["ka"]["ppl"],
        ka_trained_vs_standard_pct=(ka_trained["ka"]["ppl"] / kv - 1) * 100,
        ka_trained_under_kv_ppl=ka_trained["kv"]["ppl"],
        train_time_ratio=record["training"]["ka"]["train_seconds"] / record["training"]["standard"]["train_seconds"],
        adapters={
            name.removeprefix("ka+adapter(").rstrip(")"): dict(
                ppl=r["ppl"], degradation_pct=r["degradation_pct"], gap_recovered=gap_recovered(kv, ka, r["ppl"])
            )
            for name, r in standard.items()
            if name.startswith("ka+adapter(")
        },
    )
    sweep = [r["ppl"] for r in record["layer_sweep"]]
    result["sweep_ppl"] = sweep
    result["sweep_monotone"] = all(b >= a for a, b in zip(sweep, sweep[1:]))
    result["position_gap"] = position_gaps(standard["ka"], standard["kv"])  # {"positions a-b": nats}
    result["reversal"] = {
        model: {
            mode: dict(ratio=r["splits"][s]["ratio"], answer_ratio=r["splits"][s]["answer_ratio"])
            for mode, r in modes.items()
            for s in [_reversal_split(r)]
        }
        for model, modes in record["reversal"].items()
    }
    result["distributions"] = {
        name: [{key: layer[key] for key in ("norm_ratio", "cosine", "cka")} for layer in layers]
        for name, layers in record.get("distributions", {}).items()
    }
    result["plateau"] = {
        attention: dict(
            last_epoch_gain=last_epoch_gain([epoch["val_ppl"] for epoch in training["epochs"]]),
            stopped_by=stopped_by(training["epochs"]),
        )
        for attention, training in record["training"].items()
    }
    result["forward_exact_match"] = {
        model: _held_out_forward_match(modes[OWN_MODE[model]]) for model, modes in record["reversal"].items()
    }
    result["name_rank"] = {
        model: {mode: _rank_numbers(summary) for mode, summary in modes.items()}
        for model, modes in record.get("name_ranks", {}).items()
    }
    result["name_rank_unseen"] = {
        model: _rank_numbers(summary) for model, summary in record.get("name_ranks_unseen", {}).items()
    }
    result["reversal_control"] = {
        model: dict(
            mode=OWN_MODE[model],
            trained_on=facts_include,
            split=_reversal_split(record["reversal"][model][OWN_MODE[model]]),
            trained=_answer_ppls(record["reversal"][model][OWN_MODE[model]]),
            unseen=_answer_ppls(record["reversal_unseen"][model][OWN_MODE[model]]),
        )
        for model in record.get("reversal_unseen", {})
    }
    return result


OWN_MODE = {"standard": "kv", "ka": "ka"}  # each model read with the attention it was trained with


def _held_out_forward_match(mode_record) -> float | None:
    """Forward exact match on the held-out templates (None when they were not scored)."""
    split = mode_record["splits"].get("test")
    return None if split is None else split["forward"]["exact_match"]


def _rank_numbers(summary) -> dict:
    keys = ("mean_rank", "chance_rank", "top1", "mean_reciprocal_rank", "right_log_likelihood", "other_log_likelihood")
    keys += ("names", "sentences")
    return {key: summary[key] for key in keys}


def _answer_ppls(mode_record) -> dict:
    summary = mode_record["splits"][_reversal_split(mode_record)]
    return dict(
        forward_answer_ppl=summary["forward"]["answer_ppl"],
        backward_answer_ppl=summary["backward"]["answer_ppl"],
        forward_ppl=summary["forward"]["ppl"],
        backward_ppl=summary["backward"]["ppl"],
    )


def _reversal_split(mode_record) -> str:
    return "test" if "test" in mode_record["splits"] else next(iter(mode_record["splits"]))
