"""A whole study run: its folder (fresh, resumed, or refused), each seed's steps, the results record and report."""

import dataclasses
import datetime
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ka_hf.errors import KAError

from .. import files, report
from ..data import count_scored_tokens
from ..evaluation import layer_sweep_modes, parse_modes, score_modes
from ..evaluation.distributions import av_statistics
from ..evaluation.ppl import add_degradation
from ..facts import make_facts, unseen_facts
from ..models import load_model, load_tokenizer
from ..records import EvalRecord, ReversalRecord
from ..training import epoch_notes
from ..verdicts import conclusions
from .config import ExperimentConfig
from .findings import findings
from .steps import (
    evaluate_model,
    fit_adapters,
    name_ranks_for,
    prepare_data,
    reversal_for,
    train_model,
    train_shared_tokenizer,
    validation_windows,
)

STUDY_CONFIG = "study_config.json"


def prepare_out_dir(config: ExperimentConfig, overwrite: bool = False, resume: bool = False) -> Path:
    """Check DIR before anything is written or deleted: a folder with earlier results needs overwrite (start
    again) or resume (continue an interrupted run with the same settings: data and tokenizer kept, each model's
    training continued from its checkpoint, the later steps run again)."""
    out = Path(config.out)
    saved = out / STUDY_CONFIG
    if resume and not overwrite:
        if not saved.is_file():
            if files.holds_results(out):
                raise KAError(
                    f"{out} holds no study run to resume (no {STUDY_CONFIG}): pass --overwrite to "
                    "replace what it holds, or choose another --out"
                )
            raise KAError(f"{out} holds no study run to resume: run it without --resume")
        previous, current = json.loads(saved.read_text()), _jsonable_config(config)
        if previous != current:
            changed = sorted(k for k in previous.keys() | current.keys() if previous.get(k) != current.get(k))
            raise KAError(
                f"{out} was run with other settings ({', '.join(changed)}): resume it with the same "
                "flags, or pass --overwrite to start again"
            )
        return out
    failed_start = saved.is_file() and not holds_a_run(out)  # nothing trained yet: nothing to lose by starting again
    if saved.is_file() and not overwrite and not failed_start:
        raise KAError(
            f"{out} already holds a study run: continue it with --resume (same flags), start it again with "
            "--overwrite, or choose another --out"
        )
    files.check_out_dir(out, overwrite or failed_start)
    for name in ("report.md", "results.json"):  # no report left pointing at models that are being replaced
        (out / name).unlink(missing_ok=True)
    files.write_json(saved, _jsonable_config(config))
    return out


def holds_a_run(out: Path) -> bool:
    """Whether DIR holds a study run's results (a trained model, a seed's folder, results.json), not only what a
    start that failed early left (its settings, data, tokenizer)."""
    out = Path(out)
    kept = ("results.json", SEED_RESULTS, "train-standard", "train-ka")
    return any((out / name).exists() for name in kept) or any(out.glob("seed-*"))


def _jsonable_config(config: ExperimentConfig) -> dict:
    """The settings a resumed run must share with the first one (not where the folder is, nor progress bars)."""
    values = dataclasses.asdict(config)
    values.pop("progress")
    values.pop("out")
    return json.loads(json.dumps(values))


def seed_dir(config: ExperimentConfig, out: Path, seed: int) -> Path:
    """Where one seed's models and adapters live: DIR itself for a one-seed run, DIR/seed-S with several."""
    return out if config.seeds == 1 else out / f"seed-{seed}"


SEED_RESULTS = "seed_results.json"  # a finished seed's numbers: --resume keeps the seed instead of redoing it


def run_seed(config, seed, data, tokenizer_dir, tokenizer, windows, facts, control, out: Path, resume: bool) -> dict:
    """Train both models with `seed`, fit the adapters, evaluate every model x mode, score the facts and the
    unseen-facts control; returns the seed's record (also written to out/seed_results.json)."""
    saved = out / SEED_RESULTS
    if resume and saved.is_file():
        return json.loads(saved.read_text())
    timings, last = {}, time.perf_counter()

    def step(name):
        nonlocal last
        timings[name], last = time.perf_counter() - last, time.perf_counter()

    trained = {
        attention: train_model(config, data, tokenizer_dir, attention, out, resume, seed)
        for attention in ("standard", "ka")
    }
    step("training")
    device = torch.device("cuda" if torch.cuda.is_available() and not config.cpu else "cpu")
    standard = load_model(str(trained["standard"].best_dir), device=device)
    ka_model = load_model(str(trained["ka"].best_dir), device=device)
    fitted = fit_adapters(config, standard, tokenizer, data, out)
    step("adapters")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    distributions = av_statistics(standard, windows, fitted["adapters"], pad_id=pad_id)
    step("A vs V")

    num_layers = standard.config.num_hidden_layers
    inference = {
        "standard": evaluate_model(
            standard, windows, parse_modes("kv,ka,ka-hybrid", num_layers), fitted["adapters"], config.progress
        ),
        "ka": evaluate_model(ka_model, windows, parse_modes("kv,ka", num_layers), progress=config.progress),
    }
    kv_ppl = next(r["ppl"] for r in inference["standard"] if r["mode"] == "kv")
    sweep = add_degradation(
        score_modes(standard, windows, layer_sweep_modes(num_layers, "prefix"), progress=config.progress), kv_ppl
    )
    step("evaluation")

    reversal, reversal_unseen = {}, {}
    for name, model, modes, adapters in (
        ("standard", standard, "kv,ka,ka-hybrid", fitted["adapters"]),
        ("ka", ka_model, "kv,ka", None),
    ):
        reversal[name] = reversal_for(model, tokenizer, facts, parse_modes(modes), adapters, config)
        if control:  # scored like the trained facts; greedy exact match is left out (it is ~0 for unseen facts)
            reversal_unseen[name] = reversal_for(
                model, tokenizer, control, parse_modes(modes), adapters, config, exact_match=False
            )
    ranks, ranks_unseen = name_ranks_for(standard, ka_model, tokenizer, facts, control, fitted["adapters"], config)
    step("reversal")

    record = dict(
        seed=seed,
        dir=str(out),
        model=dict(
            model_type=standard.config.model_type,
            parameters=sum(p.numel() for p in standard.parameters()),
            num_layers=num_layers,
            hidden_size=standard.config.hidden_size,
            num_heads=standard.config.num_attention_heads,
            vocabulary=len(tokenizer),
        ),
        training={
            attention: dict(
                epochs=epoch_notes(result.records, result.best_epoch),
                best_epoch=result.best_epoch,
                best_val_ppl=result.best_val_ppl,
                train_seconds=result.train_seconds,
                train_blocks=result.train_blocks,
                val_blocks=result.val_blocks,
                stopped_early=result.stopped_early,
                best_dir=str(result.best_dir),
            )
            for attention, result in trained.items()
        },
        adapters=fitted["record"],
        inference=inference,
        layer_sweep=sweep,
        reversal=reversal,
        reversal_unseen=reversal_unseen,
        name_ranks=ranks,
        name_ranks_unseen=ranks_unseen,
        distributions=distributions,
        timings_s=timings,
    )
    record["findings"] = findings(record, data["facts"]["include"])
    files.write_json(saved, record)
    return record


def run_experiment(config: ExperimentConfig, overwrite: bool = False, resume: bool = False) -> dict:
    """Run every step, once per seed; returns the results record (also written to DIR/results.json with
    DIR/report.md).

    A DIR with earlier results is refused (KAError) unless overwrite=True or resume=True (see prepare_out_dir).
    """
    out = prepare_out_dir(config, overwrite, resume)
    resume = resume and not overwrite
    started = time.perf_counter()
    data = prepare_data(config, out)
    tokenizer_dir = train_shared_tokenizer(config, data, out, resume)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    windows = validation_windows(config, data, tokenizer)
    facts = make_facts(config.facts, config.facts_seed)
    control = unseen_facts(facts, config.n_unseen_facts, config.facts_seed)
    timings = {"data and tokenizer": time.perf_counter() - started}

    seeds = [
        run_seed(
            config, seed, data, tokenizer_dir, tokenizer, windows, facts, control, seed_dir(config, out, seed), resume
        )
        for seed in tqdm(config.seed_list, desc="seeds", disable=not config.progress or config.seeds == 1)
    ]
    for name in seeds[0]["timings_s"]:
        timings[name] = sum(seed["timings_s"][name] for seed in seeds)
    first = seeds[0]
    per_seed = [seed["findings"] for seed in seeds]
    record = dict(
        title="KA cache study",
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        command=command_line(config),
        config=dataclasses.asdict(config),
        data=data | dict(unseen_facts=len(control)),
        model=first["model"],
        # seed 0's models at the top level, as a one-seed run has them; every seed's under "seeds"
        training=first["training"],
        adapters=first["adapters"],
        windows=dict(
            count=len(windows),
            max_length=config.eval_max_length,
            stride=config.eval_stride,
            scored_tokens=count_scored_tokens(windows),
            source=data.get("evaluation_file", data["validation_file"]),
        ),
        inference=first["inference"],
        layer_sweep=first["layer_sweep"],
        reversal=first["reversal"],
        reversal_unseen=first["reversal_unseen"],
        name_ranks=first["name_ranks"],
        name_ranks_unseen=first["name_ranks_unseen"],
        distributions=first["distributions"],
        seeds=seeds,
        environment=report.environment(),
    )
    timings["total"] = time.perf_counter() - started
    record["timings_s"] = timings
    record["findings"] = conclusions(per_seed)
    record["power"] = record["findings"]["power"]
    from ..experiment_report import write_experiment_report

    record["files"] = write_experiment_report(record, out)
    for seed in seeds:
        for attention, training in seed["training"].items():
            write_model_results(record, seed, attention, Path(training["best_dir"]))
    return record


def command_line(config: ExperimentConfig) -> str:
    """The command that reproduces this run: the preset and every setting that differs from it."""
    preset = ExperimentConfig.from_preset(config.preset, config.out, smoke=config.smoke)
    flags = {"seeds": "--seeds", "seed": "--seed", "epochs": "--epochs", "samples": "--samples", "facts": "--facts"}
    flags |= {"fact_repeats": "--fact-repeats"}
    flags |= {"text_file": "--text-file", "val_text_file": "--val-text-file", "facts_include": "--facts-include"}
    flags |= {"test_text_file": "--test-text-file", "dataset": "--dataset", "dataset_config": "--dataset-config"}
    parts = ["python -m ka_hf.experiment", f"--preset {config.preset}", f"--out {config.out}"]
    parts += ["--smoke"] if config.smoke else []
    parts += [
        f"{flag} {getattr(config, key)}" for key, flag in flags.items() if getattr(config, key) != getattr(preset, key)
    ]
    return " ".join(parts)


def write_model_results(record: dict, seed: dict, attention: str, model_dir: Path) -> None:
    """Each model's own eval and reversal results.json (from its seed's record), the same records eval_ppl.py and
    reversal_curse.py write, next to its checkpoint: what examples/push_to_hub.py finds and puts on the model
    card."""
    run_dir = Path(model_dir).parent
    model = dict(path=str(model_dir))
    windows = record["windows"]
    report.write_json(
        run_dir / "eval" / "results.json",
        EvalRecord(
            command=record["command"],
            model=model,
            method="parallel",
            windows=windows,
            run=dict(
                model=str(model_dir),
                text_file=windows["source"],
                split="evaluation",
                max_length=windows["max_length"],
                stride=windows["stride"],
            ),
            results=seed["inference"][attention],
            environment=record["environment"],
        ),
    )
    facts = record["data"]["facts"]
    report.write_json(
        run_dir / "reversal" / "results.json",
        ReversalRecord(
            command=record["command"],
            model=model,
            results=seed["reversal"][attention],
            facts=dict(n=facts["n"], seed=facts["seed"], trained_on=facts["include"]),
            splits=["test", "train"]
            if record["config"]["reversal_split"] == "both"
            else [record["config"]["reversal_split"]],
            environment=record["environment"],
        ),
    )
