"""Training a causal LM with standard or exact KA attention: the original study's protocol, one call.

    from ka_hf.study.training import TrainConfig, train
    result = train(TrainConfig(out="runs/ka", attention="ka"))
    print(result.best_val_ppl, result.best_dir)

Defaults are the original protocol: a Pythia-70M-shaped GPT-NeoX (6 layers, hidden 512, 8 heads, rotary_pct
0.25) from scratch, 5,000 training blocks of 128 tokens, AdamW lr 1e-4, batch 8, up to 10 epochs, early stopping
with patience 1, a per-epoch train/val PPL table. KA training runs the core's exact parallel form
(`ka_hf.enable_ka`), so it costs one triangular solve per head and layer, not a Python loop over tokens.

What a run writes to `out/`:
    train_config.json   the TrainConfig (what `--resume` reads back)
    tokenizer/          the tokenizer used (trained here when none was given)
    last/               accelerate state after the last finished epoch (model, optimizer, scheduler, RNG) and
                        trainer_state.json (epoch records, best so far): what `resume=True` continues from
    best/               the best epoch's model (save_pretrained, safetensors) + tokenizer; config.ka records
                        how it was trained
    epochs.md, results.json, curves.png   the per-epoch table, the full record, the PPL curves

Determinism: the model is initialized from `seed`, and every epoch reseeds (seed + epoch) and shuffles with its
own generator, so an epoch's result depends only on the state at its start. A resumed run therefore ends with
the same weights as an uninterrupted one (bit for bit on CPU).
"""

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ka_hf.config import ATTENTIONS, VARIANTS, disable_ka, enable_ka, record_provenance
from ka_hf.errors import KAError

from . import files, report
from .data import lm_blocks, load_train_val_texts, tokenize_texts, train_tokenizer
from .evaluation.ppl import sequence_nll
from .models import ARCHITECTURES, load_model, load_tokenizer, model_config
from .records import TrainRecord

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("no", "fp16", "bf16")
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainConfig:
    """One training run. Defaults = the original protocol (see the module docstring)."""

    out: str
    attention: str = "standard"  # "standard" | "ka"
    variant: str = "ka"  # KA variant: "ka" (exact) | "plan2" (the original's plan 2, see docs/plan2.md)
    ka_layers: list[int] | None = None  # layers that train with KA (None = all)
    # model: from scratch (arch + shape, or a config JSON) or fine-tuning (`model`)
    arch: str = "gpt-neox"
    num_layers: int = 6
    hidden_size: int = 512
    num_heads: int = 8
    num_kv_heads: int | None = None
    intermediate_size: int = 2048
    rotary_pct: float = 0.25
    model_config: str | None = None  # a JSON file: an HF config.json, or ka_hf.study.models.model_config keyword args
    model: str | None = None  # a local checkpoint or Hub id to fine-tune
    tokenizer: str | None = None  # None: train a byte-level BPE on the training split (or the model's own)
    vocab_size: int = 8192
    # data (as in eval_ppl.py; neither dataset nor text_file = the offline default corpus)
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    val_split: str = "validation"
    text_file: str | None = None
    val_text_file: str | None = None  # without it, a text file's last `val_fraction` of blocks validates
    text_column: str = "text"
    val_fraction: float = 0.1
    samples: int = 5000  # training blocks
    val_samples: int | None = None  # validation blocks (None = all)
    seq_len: int = 128
    # optimization
    epochs: int = 10
    patience: int = 1  # stop after this many epochs without a better val PPL
    lr: float = 1e-4
    batch_size: int = 8
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    seed: int = 0
    # hardware
    mixed_precision: str = "no"
    cpu: bool = False
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


@dataclass
class TrainResult:
    out_dir: Path
    best_dir: Path
    records: list[dict]  # one per epoch: epoch, train_ppl, val_ppl, seconds, val_seconds, best, note
    best_epoch: int
    best_val_ppl: float
    stopped_early: bool
    train_seconds: float  # sum of the epochs' training time
    train_blocks: int = 0  # blocks of seq_len tokens actually trained on (the text may hold fewer than `samples`)
    val_blocks: int = 0
    files: dict = field(default_factory=dict)  # table, results, plot
    is_main_process: bool = True  # False in the other processes of a multi-process run


# ---------------------------------------------------------------------------------------------------------
# Checking the config


def check_config(config: TrainConfig) -> None:
    """Raise KAError for settings that cannot run, before anything slow happens."""
    choices = dict(attention=ATTENTIONS, variant=VARIANTS, lr_schedule=SCHEDULES, mixed_precision=PRECISIONS)
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise KAError(f"{name}={getattr(config, name)!r} is not known: use one of {', '.join(allowed)}")
    if config.model is None and config.model_config is None and config.arch not in ARCHITECTURES:
        raise KAError(f"arch={config.arch!r} is not known: use one of {', '.join(ARCHITECTURES)}")
    if config.model is None and config.model_config is None:  # the shape is checked now, not mid-run
        model_config(
            config.arch,
            max(config.vocab_size, 1),
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            intermediate_size=config.intermediate_size,
        )
    if config.model is None and config.model_config is None:
        bad_layers = [i for i in config.ka_layers or () if not 0 <= i < config.num_layers]
        if bad_layers:  # (a fine-tuned or --model-config model's layers are checked once it is built)
            raise KAError(f"ka_layers {bad_layers} do not exist: the model has {config.num_layers} layers")
    if config.variant != "ka" and config.attention != "ka":
        raise KAError("a KA variant only applies to KA training: add attention='ka' (--attention ka)")
    if config.dataset is not None and config.text_file is not None:
        raise KAError("give either a dataset (--dataset) or a text file (--text-file), not both")
    positive = dict(
        epochs=config.epochs,
        batch_size=config.batch_size,
        samples=config.samples,
        seq_len=config.seq_len - 1,
        patience=config.patience,
        vocab_size=config.vocab_size - 256,
    )
    for name, value in positive.items():
        if value < 1:
            raise KAError(f"{name} is too small ({getattr(config, name)}): see --help for the valid range")
    if not 0.0 < config.val_fraction < 1.0:
        raise KAError(f"val_fraction must be between 0 and 1, got {config.val_fraction}")
    if config.lr <= 0:
        raise KAError(f"lr must be positive, got {config.lr}")


# ---------------------------------------------------------------------------------------------------------
# Data, tokenizer, model


def load_data_texts(config: TrainConfig):
    """(train texts, validation texts or None, a description of where they came from)."""
    train_texts, val_texts, source = load_train_val_texts(
        config.dataset,
        config.dataset_config,
        config.text_file,
        config.val_text_file,
        config.split,
        config.val_split,
        config.text_column,
    )
    if val_texts is None:
        source += f" (validation: its last {config.val_fraction:.0%} of blocks)"
    return train_texts, val_texts, source


def make_blocks(config: TrainConfig, tokenizer, train_texts, val_texts):
    """Training and validation blocks [n, seq_len]. Without validation texts, the stream's tail validates."""
    train_ids = tokenize_texts(train_texts, tokenizer)
    if val_texts is None:
        blocks = lm_blocks(train_ids, config.seq_len)
        n_val = max(1, round(config.val_fraction * len(blocks)))
        if len(blocks) - n_val < 1:
            raise KAError(
                f"{len(blocks)} block(s) of {config.seq_len} tokens cannot be split into training and "
                "validation: give more text, a smaller --seq-len, or --val-text-file"
            )
        train_blocks, val_blocks = blocks[: len(blocks) - n_val][: config.samples], blocks[len(blocks) - n_val :]
    else:
        train_blocks = lm_blocks(train_ids, config.seq_len, config.samples)
        val_blocks = lm_blocks(tokenize_texts(val_texts, tokenizer), config.seq_len)
    if config.val_samples is not None:
        val_blocks = val_blocks[: config.val_samples]
    return train_blocks, val_blocks


def prepare_tokenizer(config: TrainConfig, train_texts, saved_dir: Path):
    """The run's tokenizer: the saved one on resume, a given one, the fine-tuned model's, or a new BPE."""
    if (saved_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(str(saved_dir))
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
    elif config.model is not None:
        tokenizer = load_tokenizer(config.model)
    else:
        tokenizer = train_tokenizer(train_texts, vocab_size=config.vocab_size)
    if tokenizer.eos_token is None:
        raise KAError("the tokenizer has no eos token; pick a tokenizer with one (--tokenizer)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def from_scratch_config(config: TrainConfig, tokenizer):
    """The model config of a from-scratch run; its vocabulary always matches the tokenizer."""
    from transformers import AutoConfig

    if config.model_config is not None:
        path = Path(config.model_config)
        if not path.is_file():
            raise KAError(f"model config file not found: {path}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise KAError(f"{path} is not valid JSON: {error}") from None
        values["vocab_size"] = len(tokenizer)
        if "model_type" in values:  # an HF config.json
            model_config_ = AutoConfig.for_model(values.pop("model_type"), **values)
        else:  # keyword arguments of ka_hf.study.models.model_config, with "arch"
            model_config_ = model_config(values.pop("arch", config.arch), **values)
    else:
        model_config_ = model_config(
            config.arch,
            len(tokenizer),
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            intermediate_size=config.intermediate_size,
            max_positions=max(2048, config.seq_len),
            rotary_pct=config.rotary_pct,
        )
    special = tokenizer.eos_token_id
    model_config_.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else special
    model_config_.eos_token_id = special
    model_config_.pad_token_id = tokenizer.pad_token_id
    return model_config_


def build_model(config: TrainConfig, tokenizer):
    """The model to train (seeded init from scratch, or the checkpoint to fine-tune), its attention set up."""
    from transformers import AutoModelForCausalLM

    if config.model is not None:
        model = load_model(config.model, dtype=torch.float32)  # train in float32; mixed precision is separate
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise KAError(
                f"the tokenizer has {len(tokenizer)} tokens but {config.model} embeds only "
                f"{model.get_input_embeddings().num_embeddings}: use the model's own tokenizer"
            )
    else:
        model = AutoModelForCausalLM.from_config(from_scratch_config(config, tokenizer), attn_implementation="sdpa")
    bad_layers = [i for i in config.ka_layers or () if not 0 <= i < model.config.num_hidden_layers]
    if bad_layers:
        raise KAError(f"ka_layers {bad_layers} do not exist: the model has {model.config.num_hidden_layers} layers")
    set_attention(model, config, training_record(config, status="started"))
    return model


def training_record(config: TrainConfig, **extra) -> dict:
    """What the model's provenance (config.ka_provenance["training"]) says about how it was trained."""
    keys = (
        "attention",
        "variant",
        "ka_layers",
        "model",
        "dataset",
        "dataset_config",
        "split",
        "val_split",
        "text_file",
        "val_text_file",  # with val_fraction: which text was held out (what fit_adapter.py scores by default)
        "val_fraction",
        "text_column",
        "samples",
        "seq_len",
        "epochs",
        "patience",
        "lr",
        "batch_size",
        "weight_decay",
        "lr_schedule",
        "warmup_steps",
        "seed",
    )
    record = {key: getattr(config, key) for key in keys}
    record["from_scratch"] = config.model is None
    return record | extra


def set_attention(model, config: TrainConfig, record: dict) -> None:
    """config.ka: KA on the layers and variant trained with, or standard; the training record goes to the
    model's provenance (config.ka_provenance["training"])."""
    if config.attention == "ka":
        enable_ka(model, ka_layers=config.ka_layers, variant=config.variant)
    else:
        disable_ka(model)
    record_provenance(model.config, training=record)


# ---------------------------------------------------------------------------------------------------------
# Data order


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation per epoch from its own generator (seed + epoch): resumable without sampler state.

    The method is deliberately not called `set_epoch`: accelerate's data loader calls `set_epoch(i)` with its
    own count of iterations, which restarts at 0 in a resumed process.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


# ---------------------------------------------------------------------------------------------------------
# The run


@dataclass
class RunState:
    """Everything besides tensors that a resumed run needs (saved as last/trainer_state.json)."""

    records: list = field(default_factory=list)
    best_epoch: int = 0
    best_val_ppl: float = math.inf
    bad_epochs: int = 0
    finished: bool = False

    @property
    def epochs_done(self) -> int:
        return len(self.records)


def load_train_config(out_dir) -> TrainConfig:
    """The TrainConfig a run in `out_dir` was started with (for resuming it)."""
    path = Path(out_dir) / "train_config.json"
    if not path.is_file():
        raise KAError(f"{out_dir} holds no training run (no train_config.json): check the --resume directory")
    return TrainConfig.from_dict(json.loads(path.read_text()))


def _prepare_run_dir(config: TrainConfig, resume: bool, overwrite: bool, accelerator) -> Path:
    """Check `out` (every process, before anything is written or deleted), then let the main process set it up.

    A folder with a checkpoint continues with --resume; anything else in it (a finished run, a run that failed
    before its first checkpoint, other files) is replaced only with --overwrite. `resume` and `overwrite`
    together restart the run in `out` from scratch with its saved settings.
    """
    out = Path(config.out)
    has_checkpoint = (out / "last" / TRAINER_STATE).is_file()
    if resume and not has_checkpoint:
        raise KAError(
            f"{out} has no checkpoint to resume from (the run stopped before its first epoch ended): "
            f"restart it with --resume {out} --overwrite"
        )
    elif not resume and not overwrite and files.holds_results(out):
        if has_checkpoint:
            raise KAError(
                f"{out} already holds a training run: continue it with --resume {out}, or restart it "
                "with --overwrite, or choose another --out"
            )
        if (out / "train_config.json").is_file():
            raise KAError(
                f"{out} holds a training run that stopped before its first checkpoint: restart it with "
                f"--resume {out} --overwrite, or choose another --out"
            )
        files.check_out_dir(out)
    accelerator.wait_for_everyone()
    if not resume and accelerator.is_main_process:
        for name in ("last", "best", "tokenizer"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("results.json", "epochs.md", "curves.png"):
            (out / name).unlink(missing_ok=True)
        files.write_json(out / "train_config.json", config.to_dict())
    accelerator.wait_for_everyone()
    return out


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False, on_epoch_end=None) -> TrainResult:
    """Train per `config`; with resume=True continue the run in config.out from its last finished epoch.

    A config.out that holds anything is refused (KAError) unless resume=True (it has a checkpoint) or
    overwrite=True (replace it); resume=True with overwrite=True restarts it from scratch.

    on_epoch_end(record) is called after each epoch's checkpoint is written (e.g. for logging). Returns the
    TrainResult; the files are described in this module's docstring.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    check_config(config)
    resume = resume and not overwrite  # both: restart the run in config.out (its settings read back by the caller)
    accelerator = Accelerator(cpu=config.cpu or not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
    out = _prepare_run_dir(config, resume, overwrite, accelerator)
    log = accelerator.print

    train_texts, val_texts, source = load_data_texts(config)
    with accelerator.main_process_first():  # the main process trains and saves it; the others load it
        tokenizer = prepare_tokenizer(config, train_texts, out / "tokenizer")
        if accelerator.is_main_process and not resume:
            with files.staged_dir(out / "tokenizer") as staging:
                tokenizer.save_pretrained(staging)
    train_blocks, val_blocks = make_blocks(config, tokenizer, train_texts, val_texts)
    log(
        f"data: {source}: {len(train_blocks)} training and {len(val_blocks)} validation blocks of "
        f"{config.seq_len} tokens; vocabulary {len(tokenizer)}"
    )

    set_seed(config.seed)
    model = build_model(config, tokenizer)
    log(
        f"model: {model.config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{config.attention} attention" + (f" ({config.variant})" if config.attention == "ka" else "")
    )
    sampler = EpochShuffle(len(train_blocks), config.seed)
    train_loader = torch.utils.data.DataLoader(train_blocks, batch_size=config.batch_size, sampler=sampler)
    val_loader = torch.utils.data.DataLoader(val_blocks, batch_size=config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = (
        "constant_with_warmup" if config.lr_schedule == "constant" and config.warmup_steps else config.lr_schedule
    )
    scheduler = get_scheduler(
        schedule, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.epochs * len(train_loader)
    )
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler
    )

    state = RunState()
    if resume:
        accelerator.load_state(str(out / "last"))
        state = RunState(**json.loads((out / "last" / TRAINER_STATE).read_text()))
        log(f"resuming {out} after epoch {state.epochs_done}")

    for epoch in range(state.epochs_done + 1, config.epochs + 1):
        if state.finished:
            break
        set_seed(config.seed + epoch)  # dropout etc.: an epoch depends only on the state at its start
        sampler.use_epoch(epoch)
        started = time.perf_counter()
        train_nll = _train_epoch(model, train_loader, optimizer, scheduler, accelerator, config, epoch)
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        val_nll = _validate(model, val_loader, accelerator, config, epoch)
        record = dict(
            epoch=epoch,
            train_ppl=math.exp(train_nll),
            val_ppl=math.exp(val_nll),
            seconds=seconds,
            val_seconds=time.perf_counter() - started,
            best=False,
        )
        _update_state(state, record, config)
        if record["best"]:
            _save_best(accelerator, model, tokenizer, config, state, out / "best")
        _save_last(accelerator, state, out)
        log(
            f"epoch {epoch}: train PPL {record['train_ppl']:.2f}, val PPL {record['val_ppl']:.2f}, "
            f"{seconds:.1f} s{'  * best so far' if record['best'] else ''}"
        )
        if on_epoch_end is not None:
            on_epoch_end(record)

    result = _result(out, state)
    result.is_main_process = accelerator.is_main_process
    result.train_blocks, result.val_blocks = len(train_blocks), len(val_blocks)
    if accelerator.is_main_process:
        result.files = write_reports(out, config, state, source, len(train_blocks), len(val_blocks))
    accelerator.wait_for_everyone()
    return result


def _train_epoch(model, loader, optimizer, scheduler, accelerator, config, epoch) -> float:
    """One pass over the training blocks; returns the mean token NLL of the epoch (all processes)."""
    model.train()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    bar = tqdm(
        loader,
        desc=f"epoch {epoch} train",
        leave=False,
        disable=not (config.progress and accelerator.is_local_main_process),
    )
    for input_ids in bar:
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        accelerator.backward(loss)
        if config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        tokens = input_ids.numel() - input_ids.shape[0]
        total += loss.detach().float() * tokens
        count += tokens
        bar.set_postfix(loss=f"{loss.item():.3f}")
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return float(total / count)


@torch.no_grad()
def _validate(model, loader, accelerator, config, epoch) -> float:
    model.eval()
    total, count = 0.0, 0
    bar = tqdm(
        loader,
        desc=f"epoch {epoch} val",
        leave=False,
        disable=not (config.progress and accelerator.is_local_main_process),
    )
    for input_ids in bar:
        with accelerator.autocast():
            nll = sequence_nll(model, input_ids)
        nll = accelerator.gather_for_metrics(nll)
        total += float(nll.sum())
        count += len(nll) * (input_ids.shape[1] - 1)
    return total / count


def _update_state(state: RunState, record: dict, config: TrainConfig) -> None:
    """Best-so-far and early stopping (stop after `patience` epochs without a lower val PPL)."""
    if record["val_ppl"] < state.best_val_ppl:
        state.best_epoch, state.best_val_ppl, state.bad_epochs = record["epoch"], record["val_ppl"], 0
        record["best"] = True
    else:
        state.bad_epochs += 1
    state.records.append(record)
    if state.bad_epochs >= config.patience or record["epoch"] == config.epochs:
        state.finished = True
        record["early_stop"] = state.bad_epochs >= config.patience


def _save_best(accelerator, model, tokenizer, config, state: RunState, best_dir: Path) -> None:
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    status = dict(
        status="best epoch", best_epoch=state.best_epoch, best_val_ppl=state.best_val_ppl, epochs_seen=state.epochs_done
    )
    set_attention(unwrapped, config, training_record(config, **status))
    if accelerator.is_main_process:
        with files.staged_dir(best_dir) as staging:
            unwrapped.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)


def _save_last(accelerator, state: RunState, out: Path) -> None:
    """last/: accelerate's state + trainer_state.json, built complete under a temporary name, then swapped in."""
    staging = out / (files.PARTIAL_PREFIX + "last")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))  # every process (each saves its own RNG state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files.write_json(staging / TRAINER_STATE, dataclasses.asdict(state))
        files.replace_dir(staging, out / "last")
    accelerator.wait_for_everyone()


def _result(out: Path, state: RunState) -> TrainResult:
    return TrainResult(
        out_dir=out,
        best_dir=out / "best",
        records=state.records,
        best_epoch=state.best_epoch,
        best_val_ppl=state.best_val_ppl,
        stopped_early=bool(state.records and state.records[-1].get("early_stop")),
        train_seconds=sum(record["seconds"] for record in state.records),
    )


# ---------------------------------------------------------------------------------------------------------
# Reports


TABLE_COLUMNS = [
    ("epoch", "Epoch"),
    ("train_ppl", "Train PPL"),
    ("val_ppl", "Val PPL"),
    ("seconds", "Epoch s"),
    ("note", "Note"),
]


def epoch_notes(records: list[dict], best_epoch: int) -> list[dict]:
    """The original report's Note column: * = new best, '* best' = the best epoch, 'early stop' = the last."""
    rows = []
    for record in records:
        notes = []
        if record["best"]:
            notes.append("* best" if record["epoch"] == best_epoch else "*")
        if record.get("early_stop"):
            notes.append("early stop")
        rows.append(record | {"note": ", ".join(notes)})
    return rows


def write_reports(out: Path, config: TrainConfig, state: RunState, source: str, n_train: int, n_val: int) -> dict:
    """epochs.md (the original report's table), results.json and curves.png."""
    rows = epoch_notes(state.records, state.best_epoch)
    title = f"{config.attention} attention" + (f" ({config.variant})" if config.attention == "ka" else "")
    table = report.markdown_table(rows, TABLE_COLUMNS, digits=1)
    summary = f"**Best: epoch {state.best_epoch}, val PPL = {state.best_val_ppl:.1f}**"
    files.write_text(out / "epochs.md", f"## Training results ({title})\n\n{table}\n\n{summary}\n")
    files.write_json(
        out / "results.json",
        TrainRecord(
            config=config.to_dict(),
            data=dict(source=source, train_blocks=n_train, val_blocks=n_val, seq_len=config.seq_len),
            epochs=rows,
            best_epoch=state.best_epoch,
            best_val_ppl=state.best_val_ppl,
            train_seconds=sum(record["seconds"] for record in state.records),
            environment=report.environment(),
        ),
    )

    def draw(ax):
        epochs = [record["epoch"] for record in rows]
        ax.plot(epochs, [record["train_ppl"] for record in rows], marker="o", label="train PPL")
        ax.plot(epochs, [record["val_ppl"] for record in rows], marker="o", label="val PPL")
        ax.scatter([state.best_epoch], [state.best_val_ppl], s=120, facecolors="none", edgecolors="k", label="best")
        ax.set(xlabel="epoch", ylabel="perplexity", yscale="log", title=f"Training: {title}")
        ax.legend()

    report.save_plot(out / "curves.png", draw)
    return dict(table=out / "epochs.md", results=out / "results.json", plot=out / "curves.png")
