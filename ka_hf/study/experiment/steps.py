"""Steps 1-6 of a study run, one function each: data, tokenizer, training, adapters, evaluation, reversal."""

import copy
import json
import random
import time
from pathlib import Path

from ka_hf.adapters import save_adapter
from ka_hf.config import PROVENANCE_KEY
from ka_hf.errors import KAError

from .. import files
from ..data import (
    count_scored_tokens,
    lm_blocks,
    load_texts,
    load_train_val_texts,
    ppl_windows,
    tokenize_texts,
    train_tokenizer,
)
from ..evaluation import Mode, parse_modes, score_modes
from ..evaluation.ppl import add_degradation
from ..evaluation.ranks import name_ranks
from ..evaluation.reversal import reversal_metrics
from ..facts import make_facts, training_texts
from ..fit_adapters import distill_adapter, fit_adapter_least_squares
from ..training import TRAINER_STATE, train
from .config import ExperimentConfig
from .findings import OWN_MODE


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
