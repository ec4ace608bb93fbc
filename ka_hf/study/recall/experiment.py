"""The recall study in one command: train a standard and a KA model on MQAR, read them under every mode, report.

    python -m ka_hf.study.recall --preset quick --out runs/recall          # offline, 2-core CPU, minutes
    python -m ka_hf.study.recall --preset quick --smoke --out runs/r-smoke  # every stage, a few steps (seconds)
    python -m ka_hf.study.recall --preset gpu --out runs/recall-gpu         # Zoology's shapes in full, for a GPU

Per seed, in order (each step's work lives in its own module):

1. training    a standard-attention model and a KA-trained model (ka_hf.enable_ka), the same protocol: curriculum
               over the shapes, early stopping at a validation recall accuracy (ka_hf.study.recall.training);
               the KA model gets at most the steps the standard model took (match_steps; off in the gpu preset)
2. adapter     plan 1 on the standard model: least squares A -> V, then distillation (ka_hf.study.fit_adapters)
3. evaluation  accuracy on the query tokens of the same test sequences (ka_hf.study.recall.scoring): the standard
               model under kv, ka, ka-hybrid, ka+adapter, kv-window@W+S and ka-window@W+S (equal cache bytes);
               the KA-trained model under ka ("ka-trained")

Then the power check (the standard model must recall: kv accuracy at least RECALL_POWER in every seed), the
verdicts (ka_hf.study.recall.verdicts) and DIR/report.md, DIR/results.json, DIR/accuracy_by_distance.png. The
models and adapters of every seed are kept in DIR/seed-N/.
"""

import dataclasses
import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ka_hf.adapters import save_adapter
from ka_hf.errors import KAError
from ka_hf.modes import Mode, parse_modes

from .. import files, report
from ..evaluation.modes import describe
from ..fit_adapters import distill_adapter, fit_adapter_least_squares
from ..records import RecallRecord
from .data import RecallSet, RecallTask, make_recall_set, parse_shapes
from .scoring import score_modes
from .training import RecallModel, RecallTraining, train_batch, train_recall
from .verdicts import conclusions

VAL_SEED = 10_007  # validation sets: VAL_SEED + shape index; test sets: TEST_SEED + shape index (every model seed)
TEST_SEED = 20_011
KA_TRAINED = "ka-trained"  # the KA-trained model's entry (read under ka)


@dataclass
class RecallConfig:
    """One recall run. The defaults are the `quick` preset: a 2-core CPU, no network, minutes."""

    out: str
    preset: str = "quick"
    # data
    shapes: str = "64x4,128x8,256x16"  # LENGTHxPAIRS, the curriculum's order
    vocab_size: int = 136  # 8 filler tokens, 64 keys, 64 values
    filler: int = 8
    distance: str = "uniform"  # or "power:A" (Zoology: power:0.01)
    test_sequences: int = 128  # per shape
    # model
    arch: str = "llama"
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    intermediate_size: int = 256
    # training (both models)
    max_steps: int = 1200
    match_steps: bool = True  # the KA model trains at most the steps the standard model of its seed took
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_tokens: int = 4096
    eval_every: int = 50
    advance_at: float = 0.95
    final_lr_factor: float = 0.3
    target: float = 0.995
    val_sequences: int = 64
    # adapter (plan 1)
    adapter_batches: int = 6  # training batches the adapter is fit and distilled on (shapes taking turns)
    adapter_sequences: int = 8  # sequences per batch
    distill_steps: int = 20
    # bounded caches: kv-window@W+S and ka-window@W+S
    window: int = 32
    sink: int = 4
    seed: int = 0
    seeds: int = 2
    progress: bool = True
    cpu: bool = False
    smoke: bool = False  # every stage for a handful of steps (SMOKE): proves the preset runs, measures nothing

    @classmethod
    def from_preset(cls, preset: str, out: str, smoke: bool = False, **overrides) -> "RecallConfig":
        """The preset's values, then SMOKE's when smoke, then `overrides` (None values ignored)."""
        if preset not in PRESETS:
            raise KAError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        values = dict(PRESETS[preset]) | (SMOKE if smoke else {})
        values |= {key: value for key, value in overrides.items() if value is not None}
        config = cls(out=out, preset=preset, smoke=smoke, **values)
        config.check()
        return config

    @property
    def task(self) -> RecallTask:
        return RecallTask(vocab_size=self.vocab_size, filler=self.filler, distance=self.distance)

    @property
    def shape_list(self):
        return parse_shapes(self.shapes)

    @property
    def model(self) -> RecallModel:
        return RecallModel(self.arch, self.num_layers, self.hidden_size, self.num_heads, self.intermediate_size)

    @property
    def training(self) -> RecallTraining:
        names = [f.name for f in dataclasses.fields(RecallTraining) if hasattr(self, f.name)]
        return RecallTraining(**{name: getattr(self, name) for name in names})

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    @property
    def modes(self) -> list[Mode]:
        """The standard model's modes (the KA-trained model is read under ka)."""
        window = f"@{self.window}" + (f"+{self.sink}" if self.sink else "")
        return parse_modes(f"kv,ka,ka-hybrid,ka+adapter,kv-window{window},ka-window{window}", self.num_layers)

    def check(self) -> None:
        """Settings that cannot run, refused before anything is written."""
        names = ("seeds", "test_sequences", "adapter_batches", "adapter_sequences", "distill_steps", "window")
        for name in names + ("num_layers",):
            if getattr(self, name) < 1:
                raise KAError(f"--{name.replace('_', '-')} {getattr(self, name)}: give at least 1")
        if self.sink < 0 or self.sink > self.window:
            raise KAError(f"sink {self.sink}: give 0 to the window size ({self.window})")
        for shape in self.shape_list:
            self.task.check(shape)
        self.training.check()
        from ..models import model_config

        model_config(self.arch, self.vocab_size, self.num_layers, self.hidden_size, self.num_heads)  # (its checks)


PRESETS = {
    "quick": {},  # the RecallConfig defaults
    # Zoology's MQAR shapes in full (sequence lengths to 512, up to 64 pairs, vocabulary 8,192), a wider model and
    # a longer budget: meant for a GPU.
    "gpu": dict(
        shapes="64x4,128x8,256x16,256x32,512x64",
        vocab_size=8192,
        hidden_size=256,
        num_heads=4,
        intermediate_size=512,
        test_sequences=1000,
        max_steps=20_000,
        batch_tokens=32_768,
        eval_every=250,
        val_sequences=256,
        adapter_batches=16,
        adapter_sequences=32,
        distill_steps=300,
        match_steps=False,
        window=128,
        seeds=3,
    ),
}

# Every stage, a handful of steps: two short shapes, a few sequences, two training steps, one distillation step.
SMOKE = dict(
    shapes="16x2,32x4",
    hidden_size=32,
    num_heads=2,
    intermediate_size=64,
    test_sequences=4,
    val_sequences=4,
    max_steps=2,
    eval_every=1,
    batch_tokens=128,
    adapter_batches=2,
    distill_steps=1,
    window=8,
    sink=2,
    seeds=2,
)


# ---------------------------------------------------------------------------------------------------------
# the steps


def recall_sets(config: RecallConfig, seed_base: int, n: int) -> list[RecallSet]:
    return [make_recall_set(config.task, shape, n, seed_base + i) for i, shape in enumerate(config.shape_list)]


def train_model(config: RecallConfig, attention: str, seed: int, val_sets, max_steps: int | None = None):
    """A fresh model (initialized from `seed`) trained on recall (for at most max_steps, default the config's);
    (model, training record)."""
    shapes = config.shape_list
    model = config.model.build(config.vocab_size, max(s.seq_len for s in shapes), seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not config.cpu else "cpu")
    model.to(device)
    settings = dataclasses.replace(config.training, max_steps=max_steps or config.max_steps)
    record = train_recall(model, config.task, shapes, val_sets, settings, seed, attention, config.progress)
    return model, record | dict(parameters=sum(p.numel() for p in model.parameters()))


def fit_adapter(config: RecallConfig, model, seed: int):
    """Plan 1 on the standard model: least squares, then distillation from it, on training batches."""
    shapes = config.shape_list
    device = next(model.parameters()).device
    batches = [
        train_batch(config.task, shapes[i % len(shapes)], config.batch_tokens, seed, -1 - i, i % len(shapes))
        .input_ids[: config.adapter_sequences]
        .to(device)
        for i in range(config.adapter_batches)
    ]
    started = time.perf_counter()
    adapter = fit_adapter_least_squares(model, batches, progress=config.progress)
    history = distill_adapter(model, adapter, batches, steps=config.distill_steps, progress=config.progress)
    return adapter, dict(
        batches=len(batches),
        sequences=sum(len(b) for b in batches),
        distill_steps=config.distill_steps,
        first_kl=history[0]["kl"],
        last_kl=history[-1]["kl"],
        seconds=time.perf_counter() - started,
    )


def save_models(out: Path, models: dict, adapter) -> dict:
    """Each trained model (save_pretrained) and the adapter, in out/; their paths."""
    paths = {}
    for name, model in models.items():
        with files.staged_dir(out / name) as staging:
            model.save_pretrained(staging)
        paths[name] = str(out / name)
    with files.staged_dir(out / "adapter") as staging:
        save_adapter(adapter, staging)
    paths["adapter"] = str(out / "adapter")
    return paths


def run_seed(config: RecallConfig, seed: int, val_sets, test_sets, out: Path) -> dict:
    """Train both models with `seed`, fit the adapter, score every mode on the test sets; the seed's record."""
    timings, last = {}, time.perf_counter()

    def step(name):
        nonlocal last
        timings[name], last = time.perf_counter() - last, time.perf_counter()

    standard, standard_training = train_model(config, "standard", seed, val_sets)
    step("training standard")
    budget = standard_training["steps"] if config.match_steps else None
    ka_model, ka_training = train_model(config, "ka", seed, val_sets, budget)
    step("training ka")
    adapter, adapter_record = fit_adapter(config, standard, seed)
    step("adapter")
    results = score_modes(standard, test_sets, config.modes, adapter, config.window, config.progress, "standard")
    trained = score_modes(ka_model, test_sets, parse_modes("ka"), None, config.window, config.progress, "ka-trained")
    results[KA_TRAINED] = trained["ka"] | dict(mode=KA_TRAINED)
    step("evaluation")
    paths = save_models(out / f"seed-{seed}", {"standard": standard, KA_TRAINED: ka_model}, adapter)
    return dict(
        seed=seed,
        training={"standard": standard_training, KA_TRAINED: ka_training},
        adapter=adapter_record,
        results=results,
        files=paths,
        timings_s=timings,
    )


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run_recall(config: RecallConfig, overwrite: bool = False) -> dict:
    """Every step, once per seed; returns the results record (also written to DIR/results.json with
    DIR/report.md and the plot). A DIR with earlier results is refused (KAError) unless overwrite."""
    out = files.check_out_dir(config.out, overwrite)
    started, load_at_start = time.perf_counter(), load_average()
    val_sets = recall_sets(config, VAL_SEED, config.val_sequences)
    test_sets = recall_sets(config, TEST_SEED, config.test_sequences)
    seeds = [
        run_seed(config, seed, val_sets, test_sets, out)
        for seed in tqdm(config.seed_list, desc="seeds", disable=not config.progress or config.seeds == 1)
    ]
    mode_names = list(seeds[0]["results"])
    findings = conclusions(seeds, config.window, config.sink)
    record = RecallRecord(
        title="In-context recall (MQAR) under KA and KV caches",
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        command=command_line(config),
        config=dataclasses.asdict(config),
        task=config.task.to_dict()
        | dict(
            shapes=[dataclasses.asdict(s) for s in config.shape_list],
            test_sequences=config.test_sequences,
            guess_accuracy=findings["guess"],  # picking one of the sequence's P values: 1/P a query, pooled
        ),
        model=dataclasses.asdict(config.model) | dict(parameters=_parameters(seeds[0])),
        modes={name: _definition(name, config) for name in mode_names},
        accuracy={name: findings["summary"][name]["accuracy"]["mean"] for name in mode_names},
        summary=findings["summary"],
        power=findings["power"],
        verdicts=findings["verdicts"],
        seeds=seeds,
        environment=report.environment() | dict(load_average_start=load_at_start, load_average_end=load_average()),
        timings_s={name: sum(seed["timings_s"][name] for seed in seeds) for name in seeds[0]["timings_s"]}
        | dict(total=time.perf_counter() - started),
    )
    from .report import write_report

    return files.write_results(out, lambda folder: write_report(record, folder))


def _parameters(seed: dict) -> int | None:
    return seed["training"]["standard"].get("parameters")


def _definition(name: str, config: RecallConfig) -> str:
    if name == KA_TRAINED:
        return "the KA-trained model (ka_hf.enable_ka during training) read with exact KA, KACache()"
    mode = next(m for m in config.modes if m.name == name)
    text = describe(mode)
    if mode.kind == "ka-hybrid":
        text += " (here the prompt is the key-value pairs; the queries run through the KA cache)"
    return text


def command_line(config: RecallConfig) -> str:
    """The command that reproduces this run: the preset and every flag-settable value that differs from it."""
    preset = RecallConfig.from_preset(config.preset, config.out, smoke=config.smoke)
    parts = ["python -m ka_hf.study.recall", f"--preset {config.preset}", f"--out {config.out}"]
    parts += ["--smoke"] if config.smoke else []
    parts += [
        f"--{key.replace('_', '-')} {getattr(config, key)}"
        for key in FLAGS
        if getattr(config, key) != getattr(preset, key)
    ]
    return " ".join(parts)


FLAGS = {  # the settings the command line sets: key -> (type, help)
    "seeds": (int, "train and evaluate every model this many times (seeds seed, seed+1, ...)"),
    "seed": (int, "the first seed (default 0)"),
    "shapes": (str, "LENGTHxPAIRS,...: the sequence shapes, in curriculum order (e.g. 64x4,128x8,256x16)"),
    "distance": (str, "where queries go: uniform, or power:A (Zoology's power law, A = 0.01)"),
    "max_steps": (int, "the training budget of each model, in steps"),
    "window": (int, "W of kv-window@W+S and ka-window@W+S"),
    "sink": (int, "S of kv-window@W+S and ka-window@W+S"),
}


# ---------------------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    import argparse

    from ..cli import (
        ArgumentParser,
        accelerate_cpu,
        add_output_arguments,
        add_runtime_arguments,
        apply_runtime_flags,
        user_errors_exit_2,
    )

    parser = ArgumentParser(
        prog="python -m ka_hf.study.recall", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="quick", choices=list(PRESETS))
    add_output_arguments(parser, default="runs/recall", what="the report, results, models and plot")
    for key, (kind, help_text) in FLAGS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, help=help_text)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every stage of the preset for a handful of steps: proves it runs (seconds); its numbers mean nothing",
    )
    add_runtime_arguments(parser, dtype=False)
    args = parser.parse_args(argv)

    @user_errors_exit_2
    def run():
        apply_runtime_flags(args)
        config = RecallConfig.from_preset(
            args.preset,
            args.out,
            smoke=args.smoke,
            cpu=None if args.device == "auto" else accelerate_cpu(args.device),
            progress=args.progress,
            **{key: getattr(args, key) for key in FLAGS},
        )
        files.check_out_dir(config.out, args.overwrite)  # before any work
        written = run_recall(config, overwrite=args.overwrite)
        print(f"\nreport: {written['report']}\nresults: {written['results']}")

    run()
