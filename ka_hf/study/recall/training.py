"""Training a model on recall until it recalls: a curriculum over the shapes, early stopping on accuracy.

The same protocol for standard and KA attention (KA: `ka_hf.enable_ka`, as ka_hf.study.training trains its KA
models: every forward runs exact KA through the parallel solve, gradients included):

- every step draws a fresh batch of one shape (about `batch_tokens` tokens), deterministic from the seed and step;
  the loss is the cross-entropy of the paired values at the query positions only (Zoology's);
- curriculum: training starts on the first shape alone; every `eval_every` steps the validation accuracy on the
  shapes in play is measured, and when it reaches `advance_at` the next shape joins (shapes take turns); when
  the last one joins, the learning rate drops to `final_lr_factor` of itself (polishing);
- early stopping: once every shape is in play, training stops when the validation accuracy over all of them
  reaches `target` — or after `max_steps`, whichever comes first. (The study gives the KA model at most the steps
  its standard twin took: ka_hf.study.recall.experiment, `match_steps`.)
"""

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ka_hf.config import enable_ka
from ka_hf.errors import KAError

from ..models import model_config
from .data import IGNORE, RecallSet, RecallShape, RecallTask, make_recall_set
from .scoring import query_hits

TRAIN_SEED_BASE = 1_000_003  # training batches: seeds far from the validation and test sets'


@dataclass(frozen=True)
class RecallModel:
    """The model trained on recall: a tiny Llama (RoPE, SwiGLU), dropout off."""

    arch: str = "llama"
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    intermediate_size: int = 256

    def build(self, vocab_size: int, max_positions: int, seed: int):
        from transformers import AutoModelForCausalLM

        config = model_config(
            self.arch,
            vocab_size,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_positions=max_positions,
        )
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


@dataclass(frozen=True)
class RecallTraining:
    max_steps: int = 2000
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_tokens: int = 4096  # tokens per step: 64 sequences of 64, 16 of 256
    eval_every: int = 100
    advance_at: float = 0.95  # curriculum: the next shape joins at this validation accuracy
    final_lr_factor: float = 0.3  # the learning rate is multiplied by this once every shape is in play: measured
    # here, the standard model then went from 0.97 to 0.995 in 150 steps instead of 300-450
    target: float = 0.995  # early stopping: validation accuracy over every shape
    val_sequences: int = 64  # per shape
    ka_kernel: str = "parallel"  # how KA training computes a chunk (exact either way); at T <= 256 on a CPU the
    # explicit-weights kernel was the fastest (0.36 s against 0.49 s "blocked" a step at T = 256, d_model 128)

    def check(self) -> None:
        for name in ("max_steps", "batch_tokens", "eval_every", "val_sequences"):
            if getattr(self, name) < 1:
                raise KAError(f"{name} {getattr(self, name)}: give at least 1")
        if not self.lr > 0:
            raise KAError(f"lr {self.lr}: give a number above 0")
        for name in ("advance_at", "target", "final_lr_factor"):
            if not 0 < getattr(self, name) <= 1:
                raise KAError(f"{name} {getattr(self, name)}: give a number in (0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


def train_batch(task: RecallTask, shape: RecallShape, batch_tokens: int, seed: int, step: int, index: int):
    """The batch of training step `step` (shape number `index`), the same for the same arguments."""
    size = max(1, batch_tokens // shape.seq_len)
    return make_recall_set(task, shape, size, TRAIN_SEED_BASE * (seed + 1) + 16 * step + index)


def recall_loss(logits, targets) -> torch.Tensor:
    """Mean cross-entropy of the paired values at the queries."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE)


@torch.no_grad()
def accuracy(model, sets: list[RecallSet], batch_size: int = 64) -> float:
    """Pooled query accuracy of the model's own attention (standard, or KA for a KA-trained model), no cache."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = queries = 0
    for recall_set in sets:
        for batch in recall_set.batches(batch_size):
            logits = model(batch.input_ids.to(device), use_cache=False).logits.cpu()
            hit, scored = query_hits(logits, batch)
            hits, queries = hits + int(hit.sum()), queries + int(scored.sum())
    model.train(was_training)
    return hits / queries


def train_recall(
    model,
    task: RecallTask,
    shapes: list[RecallShape],
    val_sets: list[RecallSet],
    settings: RecallTraining,
    seed: int,
    attention: str = "standard",
    progress: bool = True,
) -> dict:
    """Train `model` in place (KA: enable_ka first) and return the record: steps, whether the target was reached,
    seconds, the history of validation checks [{step, stage, loss, val_accuracy, seconds}]."""
    if attention == "ka":
        enable_ka(model, kernel=settings.ka_kernel)
    elif attention != "standard":
        raise KAError(f"attention {attention!r}: use standard or ka")
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    stage, history, reached, step = 1, [], False, 0
    started = time.perf_counter()
    bar = tqdm(range(1, settings.max_steps + 1), desc=f"train {attention}", disable=not progress, leave=False)
    for step in bar:
        index = step % stage
        batch = train_batch(task, shapes[index], settings.batch_tokens, seed, step, index)
        logits = model(batch.input_ids.to(device), use_cache=False).logits
        loss = recall_loss(logits, batch.targets.to(device))
        if not math.isfinite(loss.item()):
            raise KAError(f"training diverged at step {step} (loss {loss.item()}): lower the learning rate")
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % settings.eval_every and step != settings.max_steps:
            continue
        in_play = accuracy(model, val_sets[:stage])
        overall = in_play if stage == len(shapes) else accuracy(model, val_sets)
        history.append(
            dict(
                step=step,
                stage=stage,
                loss=loss.item(),
                val_accuracy=overall,
                val_accuracy_in_play=in_play,
                seconds=time.perf_counter() - started,
            )
        )
        bar.set_postfix(stage=stage, val=f"{overall:.3f}")
        if stage == len(shapes) and overall >= settings.target:
            reached = True
            break
        if in_play >= settings.advance_at and stage < len(shapes):
            stage += 1
            if stage == len(shapes):
                for group in optimizer.param_groups:
                    group["lr"] = settings.lr * settings.final_lr_factor
    model.eval()
    if attention == "ka":  # the saved setting: the default kernel, which any sequence length can use
        enable_ka(model)
    return dict(
        attention=attention,
        steps=step,
        max_steps=settings.max_steps,
        reached_target=reached,
        target=settings.target,
        final_stage=stage,
        val_accuracy=history[-1]["val_accuracy"] if history else None,
        seconds=time.perf_counter() - started,
        history=history,
    )
