"""The whole KA study in one command: train, fit adapters, evaluate every model x mode, write the report.

    python -m ka_hf.experiment --preset quick --out runs/quick      # offline, 2-core CPU, under 10 minutes
    python -m ka_hf.experiment --preset medium --seeds 3 --out runs/medium   # WikiText-2, ~1 h on a 2-core CPU
    python -m ka_hf.experiment --preset seed --out runs/seed        # the original protocol, for a GPU
    python -m ka_hf.experiment --preset seed --smoke --out runs/seed-smoke   # every stage, a few steps (minutes)
    python -m ka_hf.experiment --preset quick --out runs/quick --resume      # continue an interrupted run
    python -m ka_hf.experiment --preset quick --out runs/quick --overwrite   # start again, replacing it

The path from data to report, in order (each step's work lives in its own module):

1. data        the LM corpus (offline default: ka_hf.study.data.default_corpus; or --text-file / --dataset) with the
               reversal-curse facts (ka_hf.study.facts) mixed into its training split, written to DIR/data/*.txt so
               every later step (and anyone re-running one) reads the same text
2. tokenizer   one byte-level BPE trained on the training text, shared by both models (same tokens, same PPLs)
3. training    the standard-attention model and the exact-KA model (ka_hf.study.training, same data, same seed)
4. adapters    plan 1 on the standard model: least squares A -> V, then distillation (ka_hf.study.fit_adapters)
5. evaluation  every model x mode on the same validation windows (ka_hf.study.evaluation): PPL, tokens/s, time,
               memory, cache bytes, NLL by position, a layer sweep
6. reversal    forward/backward PPL of the facts per model x mode (ka_hf.study.evaluation.reversal)
7. report      DIR/report.md (structured like the original experiment report), DIR/results.json, PNGs

Every number in the report comes from this run; the sentences that interpret them are generated from them.
"""

import argparse
import copy
import dataclasses
import datetime
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ka_hf.adapters import save_adapter
from ka_hf.config import PROVENANCE_KEY
from ka_hf.errors import KAError

from . import files, report
from .data import (
    count_scored_tokens,
    lm_blocks,
    load_texts,
    load_train_val_texts,
    ppl_windows,
    shared_data_dir,
    tokenize_texts,
    train_tokenizer,
)
from .evaluation import Mode, layer_sweep_modes, parse_modes, score_modes
from .evaluation.distributions import av_statistics
from .evaluation.ppl import add_degradation
from .evaluation.ranks import name_ranks
from .evaluation.reversal import reversal_metrics
from .evaluation.run import position_gaps
from .facts import MAX_FACTS, make_facts, training_texts, unseen_facts
from .fit_adapters import distill_adapter, fit_adapter_least_squares, gap_recovered
from .models import PYTHIA_70M_SHAPE, load_model, load_tokenizer
from .power import last_epoch_gain, stopped_by
from .records import EvalRecord, ReversalRecord
from .training import TRAINER_STATE, TrainConfig, check_config, epoch_notes, train
from .verdicts import conclusions


@dataclass
class ExperimentConfig:
    """One study run. The defaults are the `quick` preset: a 2-core CPU, no network, well under 10 minutes — a
    small GPT-NeoX (the original's family, partial rotary) on short blocks, with a higher learning rate than the
    protocol so that a few epochs learn something."""

    out: str
    preset: str = "quick"
    # model and protocol
    arch: str = "gpt-neox"
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    intermediate_size: int = 512
    rotary_pct: float = 0.25
    vocab_size: int = 2048
    seq_len: int = 64
    samples: int = 3200
    val_samples: int | None = 128
    epochs: int = 5
    patience: int = 1
    lr: float = 2e-3
    batch_size: int = 16
    seed: int = 0
    seeds: int = 1  # train and evaluate every model this many times, with seeds seed, seed+1, ...
    # data (neither text_file nor dataset: the offline default corpus)
    text_file: str | None = None
    val_text_file: str | None = None
    test_text_file: str | None = None  # the evaluation windows' text (default: the validation text)
    dataset: str | None = None
    dataset_config: str | None = None
    text_column: str = "text"
    # reversal-curse facts mixed into the training text
    facts: int = 100
    facts_seed: int = 0
    facts_include: str = "forward"
    fact_repeats: int = 1  # each fact sentence this many times per epoch: facts are learned by repetition
    corpus_texts: int | None = None  # keep only the first this many corpus texts (None: all)
    unseen_facts: int | None = None  # the control: facts never trained on, scored like the trained ones (None: facts)
    # evaluation: overlapping windows, so that ka-hybrid has a real prompt (the window's context half)
    eval_max_length: int = 64
    eval_stride: int = 32
    eval_max_windows: int | None = 128
    reversal_split: str = "both"
    # adapters (plan 1)
    adapter_fit_blocks: int = 32
    distill_steps: int = 60
    distill_batch: int = 4
    progress: bool = True
    cpu: bool = False
    smoke: bool = (
        False  # every stage for a handful of steps and windows (SMOKE): proves a preset runs, measures nothing
    )

    @classmethod
    def from_preset(cls, preset: str, out: str, smoke: bool = False, **overrides) -> "ExperimentConfig":
        """The preset's values, then SMOKE's when smoke, then `overrides` (None values ignored)."""
        if preset not in PRESETS:
            raise KAError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        values = dict(PRESETS[preset])
        if preset in PRESET_DATA and not (overrides.get("text_file") or overrides.get("dataset")):
            values = PRESET_DATA[preset]() | values
        if smoke:
            values |= SMOKE
        values |= {k: v for k, v in overrides.items() if v is not None}
        config = cls(out=out, preset=preset, smoke=smoke, **values)
        config.check()
        return config

    def check(self) -> None:
        """Settings that cannot run, refused before anything is written or trained: the study's own numbers here,
        the training settings by the trainer's own check (on the config each model will train with)."""
        at_least = dict(
            seeds=(self.seeds, 1),
            facts=(self.facts, 2),  # the reversal question ranks each right name among the others
            fact_repeats=(self.fact_repeats, 1),
            eval_max_length=(self.eval_max_length, 2),
            eval_stride=(self.eval_stride, 1),
            adapter_fit_blocks=(self.adapter_fit_blocks, 1),
            distill_steps=(self.distill_steps, 1),
            distill_batch=(self.distill_batch, 1),
        )
        optional = dict(unseen_facts=(self.unseen_facts, 0), corpus_texts=(self.corpus_texts, 1))
        optional |= dict(val_samples=(self.val_samples, 1), eval_max_windows=(self.eval_max_windows, 1))
        for name, (value, least) in at_least.items() | {k: v for k, v in optional.items() if v[0] is not None}.items():
            if value < least:
                raise KAError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
        if self.facts > MAX_FACTS:
            raise KAError(f"--facts must be at most {MAX_FACTS}, got {self.facts}")
        check_config(self.train_config("standard", Path(self.out), None, {}, self.seed))

    def train_config(self, attention: str, out: Path, tokenizer_dir, data: dict, seed: int | None) -> TrainConfig:
        """The TrainConfig of one model of this run, trained in out/train-ATTENTION: every setting the two configs
        share (the model's shape, the data's size, the optimization) taken from this one by name."""
        shared = {name: getattr(self, name) for name in SHARED_WITH_TRAINING}
        return TrainConfig(
            **shared,
            out=str(out / f"train-{attention}"),
            attention=attention,
            tokenizer=None if tokenizer_dir is None else str(tokenizer_dir),
            text_file=data.get("train_file"),
            val_text_file=data.get("validation_file"),
            seed=self.seed if seed is None else seed,
        )

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    @property
    def n_unseen_facts(self) -> int:
        return self.facts if self.unseen_facts is None else self.unseen_facts


# The settings an ExperimentConfig hands to each model's TrainConfig under the same name (the data files, the
# tokenizer, the seed and where to write are the run's own, set per model).
SHARED_WITH_TRAINING = tuple(
    name
    for name in (field.name for field in dataclasses.fields(TrainConfig))
    if name in {field.name for field in dataclasses.fields(ExperimentConfig)}
    and name not in ("out", "seed", "text_file", "val_text_file", "dataset", "dataset_config", "text_column")
)


def _wikitext2() -> dict:
    """WikiText-2 raw: the local copy in ../shared/data beside the repository when there is one (offline), else
    the Hub dataset (needs network)."""
    local = shared_data_dir() / "wikitext-2-raw"
    if (local / "train.txt").is_file():
        return dict(
            text_file=str(local / "train.txt"),
            val_text_file=str(local / "valid.txt"),
            test_text_file=str(local / "test.txt"),
        )
    return dict(dataset="Salesforce/wikitext", dataset_config="wikitext-2-raw-v1")


def _tiny_shakespeare() -> dict:
    """Tiny Shakespeare (char-rnn's input.txt) from ../shared/data beside the repository; its last tenth
    validates, as in nanoGPT's shakespeare_char."""
    local = shared_data_dir() / "tinyshakespeare" / "input.txt"
    if not local.is_file():
        raise KAError(
            f"the shakespeare-char preset reads {local}, which is not here: give --text-file with char-rnn's "
            "tinyshakespeare input.txt"
        )
    return dict(text_file=str(local))


# where a preset's text comes from, resolved when the preset is chosen
PRESET_DATA = {"medium": _wikitext2, "shakespeare-char": _tiny_shakespeare}

# A recognized figure each such preset's standard model can be held to: (validation loss in nats per token, what)
ANCHORS = {
    "shakespeare-char": (
        1.88,
        "nanoGPT's baby character-level Shakespeare model on a CPU (4 layers, 4 heads, width 128, 64-character "
        "blocks, 2,000 steps of batch 12; its README)",
    )
}

# Every stage, a handful of steps: samples and windows cut, one epoch, a few facts, a few adapter steps.
SMOKE = dict(
    samples=16,
    val_samples=8,
    epochs=1,
    facts=8,
    unseen_facts=8,
    eval_max_windows=4,
    adapter_fit_blocks=4,
    distill_steps=2,
    distill_batch=2,
    reversal_split="test",
)

PRESETS = {
    "quick": {},  # the ExperimentConfig defaults
    # The reversal curse with the power to see it (Berglund et al. 2023's design): 60 fictitious facts, forward
    # sentences only, each of the 10 training templates 10 times per epoch, beside 600 texts of the offline corpus;
    # held-out templates measure. Sized by measuring (docs/results/facts/): early stopping ends both models at
    # epoch 6 (the corpus overfits), by when the standard model's forward exact match on the held-out templates is
    # 0.99 (the power check needs 0.9); one seed takes about 7 minutes on 2 CPU cores.
    "facts": dict(
        num_layers=4,
        hidden_size=128,
        num_heads=4,
        intermediate_size=512,
        vocab_size=2048,
        seq_len=64,
        samples=100_000,  # every block of the text
        val_samples=64,
        epochs=16,  # a safety cap: early stopping (patience 1) ends training
        patience=1,
        lr=2e-3,
        batch_size=16,
        facts=60,
        fact_repeats=10,
        corpus_texts=600,
        eval_max_length=64,
        eval_stride=32,
        eval_max_windows=64,
        reversal_split="test",
        adapter_fit_blocks=32,
        distill_steps=40,
    ),
    # An anchor: nanoGPT's CPU character-level Shakespeare model (GPT-2 style, 4 x 128, 64-character blocks,
    # batch 12, lr 1e-3) reaches a validation loss of about 1.88. Byte-level BPE with no merges (vocabulary 257:
    # the 256 bytes and eos) is a character tokenizer for this ASCII text; each line break becomes an eos.
    "shakespeare-char": dict(
        arch="gpt2",
        num_layers=4,
        hidden_size=128,
        num_heads=4,
        intermediate_size=512,
        vocab_size=257,
        seq_len=64,
        samples=100_000,  # every block: about 15,600 per epoch
        val_samples=256,
        epochs=4,
        patience=1,
        lr=1e-3,
        batch_size=12,
        facts=20,
        eval_max_length=64,
        eval_stride=32,
        eval_max_windows=64,
        reversal_split="test",
    ),
    # The original protocol (KA-SPEC §1): Pythia-70M shape, 5,000 x 128 tokens, lr 1e-4, batch 8, <= 10 epochs,
    # patience 1. Meant for a GPU.
    "seed": dict(
        **PYTHIA_70M_SHAPE,
        vocab_size=8192,
        seq_len=128,
        samples=5000,
        val_samples=None,
        epochs=10,
        patience=1,
        lr=1e-4,
        batch_size=8,
        facts=500,
        eval_max_length=128,
        eval_stride=64,
        eval_max_windows=None,
        adapter_fit_blocks=256,
        distill_steps=300,
        distill_batch=8,
    ),
    # About an hour on a 2-core CPU with --seeds 3: a 12M-parameter GPT-NeoX (Pythia's family and rotary) on
    # WikiText-2 raw (train / valid / test), 256-token blocks, the protocol otherwise (early stopping, adapters,
    # layer sweep, facts and their unseen control). Sized by measuring, see docs/results/medium/.
    "medium": dict(
        num_layers=6,
        hidden_size=256,
        num_heads=8,
        intermediate_size=1024,
        vocab_size=12288,
        seq_len=256,
        samples=1400,
        val_samples=64,
        epochs=12,  # a safety cap: early stopping (patience 1) ends training at the plateau
        patience=1,
        lr=1e-3,
        batch_size=16,
        facts=100,
        fact_repeats=10,
        eval_max_length=256,
        eval_stride=128,
        eval_max_windows=48,
        reversal_split="test",
        adapter_fit_blocks=32,
        distill_steps=40,
        distill_batch=4,
    ),
}


# ---------------------------------------------------------------------------------------------------------
# 1-2. data and tokenizer


def _one_line(text: str) -> str:
    """A .txt corpus is one text per line: a text's own line breaks become spaces."""
    return " ".join(text.split())


def prepare_data(config: ExperimentConfig, out: Path) -> dict:
    """Write DIR/data/train.txt (corpus + facts, shuffled) and validation.txt; return what was written."""
    train_texts, val_texts, source = load_train_val_texts(
        config.dataset, config.dataset_config, config.text_file, config.val_text_file, text_column=config.text_column
    )
    if val_texts is None:  # a text file without a validation file: the last tenth of the texts validates
        cut = max(1, len(train_texts) * 9 // 10)
        train_texts, val_texts = train_texts[:cut], train_texts[cut:]
    if not config.text_file and not config.dataset:
        source = "ka_hf.study.data.default_corpus (Python standard-library docstrings, offline)"
    if not val_texts:
        raise KAError("no validation text: give --val-text-file or a longer --text-file")

    facts = make_facts(config.facts, config.facts_seed)
    fact_texts = training_texts(facts, include=config.facts_include, seed=config.facts_seed) if facts else []
    fact_texts = fact_texts * config.fact_repeats
    train_texts = train_texts[: config.corpus_texts] if config.corpus_texts is not None else train_texts
    corpus = [_one_line(text) for text in train_texts + fact_texts]
    random.Random(config.seed).shuffle(corpus)  # facts spread through the epochs, not in one block
    data_dir = out / "data"
    files.write_text(data_dir / "train.txt", "\n".join(corpus) + "\n")
    files.write_text(data_dir / "validation.txt", "\n".join(_one_line(t) for t in val_texts) + "\n")
    test_file = data_dir / "validation.txt"
    if config.test_text_file:
        test_texts = load_texts(text_file=config.test_text_file, text_column=config.text_column)
        test_file = data_dir / "test.txt"
        files.write_text(test_file, "\n".join(_one_line(t) for t in test_texts) + "\n")
        source += f" (evaluation: {config.test_text_file})"
    return dict(
        source=source,
        train_texts=len(train_texts),
        validation_texts=len(val_texts),
        fact_texts=len(fact_texts),
        facts=dict(n=config.facts, seed=config.facts_seed, include=config.facts_include, repeats=config.fact_repeats),
        train_file=str(data_dir / "train.txt"),
        validation_file=str(data_dir / "validation.txt"),
        evaluation_file=str(test_file),
    )


def train_shared_tokenizer(config: ExperimentConfig, data: dict, out: Path, resume: bool = False) -> Path:
    """out/tokenizer: trained on the training text (kept as it is when resuming a run that has it)."""
    if resume and (out / "tokenizer" / "tokenizer_config.json").is_file():
        return out / "tokenizer"
    texts = Path(data["train_file"]).read_text().splitlines()
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
    with files.staged_dir(out / "tokenizer") as staging:
        tokenizer.save_pretrained(staging)
    return out / "tokenizer"


# ---------------------------------------------------------------------------------------------------------
# 3. training


def train_model(
    config: ExperimentConfig,
    data: dict,
    tokenizer_dir: Path,
    attention: str,
    out: Path,
    resume: bool = False,
    seed: int | None = None,
):
    """One model in out/train-ATTENTION; resume: continue it from its checkpoint when it has one."""
    train_config = config.train_config(attention, out, tokenizer_dir, data, seed)
    resume = resume and (Path(train_config.out) / "last" / TRAINER_STATE).is_file()
    result = train(train_config, resume=resume, overwrite=not resume)
    _record_facts(result.best_dir, data["facts"])
    return result


def _record_facts(model_dir: Path, facts: dict) -> None:
    """The model's provenance["training"]["facts"]: which facts it saw (read back by examples/reversal_curse.py)."""
    config_path = Path(model_dir) / "config.json"
    config = json.loads(config_path.read_text())
    section = config.setdefault(PROVENANCE_KEY, {})
    section.setdefault("training", {})["facts"] = facts
    files.write_json(config_path, config)


# ---------------------------------------------------------------------------------------------------------
# 4. adapters


def fit_adapters(config: ExperimentConfig, model, tokenizer, data: dict, out: Path) -> dict:
    """Least squares, then distillation starting from it, on training blocks of the standard model."""
    texts = Path(data["train_file"]).read_text().splitlines()
    blocks = lm_blocks(
        tokenize_texts(texts[: 4 * config.adapter_fit_blocks], tokenizer), config.seq_len, config.adapter_fit_blocks
    )
    device = next(model.parameters()).device
    batches = [batch.to(device) for batch in blocks.split(config.distill_batch)]
    started = time.perf_counter()
    least_squares = fit_adapter_least_squares(model, batches, progress=config.progress)
    fit_seconds = time.perf_counter() - started
    with files.staged_dir(out / "adapters" / "least-squares") as staging:
        save_adapter(least_squares, staging)

    distilled = copy.deepcopy(least_squares)  # distillation starts from the least-squares fit
    history = distill_adapter(model, distilled, batches, steps=config.distill_steps, progress=config.progress)
    with files.staged_dir(out / "adapters" / "distilled") as staging:
        save_adapter(distilled, staging)
    return dict(
        adapters={"least-squares": least_squares, "distilled": distilled},
        record=dict(
            fit_blocks=len(blocks),
            seq_len=config.seq_len,
            least_squares_seconds=fit_seconds,
            distill_steps=config.distill_steps,
            distill_seconds=history[-1]["seconds"],
            first_kl=history[0]["kl"],
            last_kl=history[-1]["kl"],
            dirs={name: str(out / "adapters" / name) for name in ("least-squares", "distilled")},
        ),
    )


# ---------------------------------------------------------------------------------------------------------
# 5-6. evaluation


def validation_windows(config: ExperimentConfig, data: dict, tokenizer) -> list[dict]:
    texts = load_texts(text_file=data.get("evaluation_file", data["validation_file"]))
    windows = ppl_windows(tokenize_texts(texts, tokenizer), config.eval_max_length, config.eval_stride)
    windows = [window for window in windows if count_scored_tokens([window]) > 0]
    return windows[: config.eval_max_windows] if config.eval_max_windows else windows


def evaluate_model(model, windows, modes, adapters=None, progress=True) -> list[dict]:
    """score_modes on the same windows; each adapter becomes a mode 'ka+adapter(name)'."""
    records = score_modes(model, windows, modes, progress=progress)
    for name, adapter in (adapters or {}).items():
        record = score_modes(model, windows, [Mode("ka+adapter")], adapter=adapter, progress=progress)[0]
        records.append(record | {"mode": f"ka+adapter({name})"})
    return add_degradation(records)


def reversal_for(model, tokenizer, facts, modes, adapters, config, exact_match: bool = True) -> dict:
    results = reversal_metrics(
        model, tokenizer, facts, modes, split=config.reversal_split, exact_match=exact_match, progress=config.progress
    )
    for name, adapter in (adapters or {}).items():
        extra = reversal_metrics(
            model,
            tokenizer,
            facts,
            [Mode("ka+adapter")],
            split=config.reversal_split,
            adapter=adapter,
            exact_match=exact_match,
            progress=config.progress,
        )
        results[f"ka+adapter({name})"] = extra["ka+adapter"]
    return results


RANKED_MODES = {"standard": ("kv", "ka", "ka-hybrid", "ka+adapter"), "ka": ("ka",)}
RANKED_ADAPTER = "distilled"  # the adapter of the ka+adapter rank (the study's best fit)


def name_ranks_for(standard, ka_model, tokenizer, facts, control, adapters, config) -> tuple[dict, dict]:
    """The right name's rank among the trained names (held-out backward templates): each model in RANKED_MODES,
    and the unseen-facts control (ranked among the control's own names) in each model's own attention."""
    models = {"standard": standard, "ka": ka_model}
    ranks, unseen = {}, {}
    for name, model in models.items():
        ranks[name] = {}
        for mode in parse_modes(",".join(RANKED_MODES[name])):
            adapter = adapters.get(RANKED_ADAPTER) if mode.kind == "ka+adapter" else None
            if mode.kind == "ka+adapter" and adapter is None:
                continue
            key = f"ka+adapter({RANKED_ADAPTER})" if adapter is not None else mode.name
            ranks[name][key] = name_ranks(model, tokenizer, facts, mode, adapter, progress=config.progress)
        if len(control) >= 2:
            own = parse_modes(OWN_MODE[name])[0]
            unseen[name] = name_ranks(model, tokenizer, control, own, progress=config.progress)
    return ranks, unseen


# ---------------------------------------------------------------------------------------------------------
# the whole study


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
    from .experiment_report import write_experiment_report

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


# ---------------------------------------------------------------------------------------------------------
# interpretation, generated from the numbers


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


# ---------------------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    from .cli import (
        accelerate_cpu,
        add_data_arguments,
        add_output_arguments,
        add_runtime_arguments,
        apply_runtime_flags,
        check_data_flags,
        on_interrupt,
        user_errors_exit_2,
    )

    parser = argparse.ArgumentParser(
        prog="python -m ka_hf.experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="quick", choices=list(PRESETS))
    add_output_arguments(parser, default="runs/quick", what="the report, results, models and plots")
    add_data_arguments(parser, val_text_file=True, default="the offline corpus; --val-text-file: the last tenth")
    parser.add_argument("--facts", type=int, help="number of reversal-curse facts mixed into training")
    parser.add_argument("--facts-include", choices=["forward", "backward", "both"])
    parser.add_argument("--fact-repeats", type=int, help="each fact sentence this many times per epoch")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--samples", type=int, help="training blocks")
    parser.add_argument("--seed", type=int, help="the first seed (default: the preset's, 0)")
    parser.add_argument(
        "--seeds",
        type=int,
        help="train and evaluate every model this many times (seeds seed, seed+1, ...); "
        "the report gives mean ± std and calls a difference only when it exceeds the spread (default 1)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every stage of the preset for a handful of steps and windows: "
        "proves the preset runs (minutes on a CPU); its numbers mean nothing",
    )
    parser.add_argument("--test-text-file", help="the evaluation windows' text (default: the validation text)")
    add_runtime_arguments(parser, dtype=False)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out (same flags): finished steps are kept",
    )
    args = parser.parse_args(argv)

    @user_errors_exit_2
    def run():
        apply_runtime_flags(args)
        config = ExperimentConfig.from_preset(
            args.preset,
            args.out,
            text_file=args.text_file,
            val_text_file=args.val_text_file,
            dataset=args.dataset,
            dataset_config=args.dataset_config,
            text_column=args.text_column,
            facts=args.facts,
            facts_include=args.facts_include,
            fact_repeats=args.fact_repeats,
            epochs=args.epochs,
            samples=args.samples,
            seed=args.seed,
            seeds=args.seeds,
            smoke=args.smoke,
            test_text_file=args.test_text_file,
            cpu=None if args.device == "auto" else accelerate_cpu(args.device),  # None: the preset's
            progress=args.progress,
        )
        check_data_flags(args)

        def where():
            again = command_line(config) + ("" if "--resume" in command_line(config) else " --resume")
            return f"the run so far is in {config.out} (finished steps are kept); continue it with: {again}"

        with on_interrupt(where):
            record = run_experiment(config, overwrite=args.overwrite, resume=args.resume)
        print(f"\nreport: {record['files']['report']}\nresults: {record['files']['results']}")

    run()


if __name__ == "__main__":
    main()
