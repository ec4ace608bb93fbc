"""The study's settings: `ExperimentConfig` (its defaults are the quick preset), the presets, and where a preset's
text comes from."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ka_hf.errors import KAError

from ..data import shared_data_dir
from ..facts import MAX_FACTS
from ..models import PYTHIA_70M_SHAPE
from ..training import TrainConfig, check_config


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
