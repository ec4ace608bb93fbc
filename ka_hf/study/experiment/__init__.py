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

The package, one job a module: `config` (ExperimentConfig, the presets), `steps` (steps 1-6), `findings` (one
seed's numbers for the verdicts), `run` (the folder, each seed, the results record and report), `command` (the
command line).
"""

from ka_hf.errors import KAError

from .command import main
from .config import ANCHORS, PRESET_DATA, PRESETS, SHARED_WITH_TRAINING, SMOKE, ExperimentConfig
from .findings import OWN_MODE, findings
from .run import (
    SEED_RESULTS,
    STUDY_CONFIG,
    command_line,
    holds_a_run,
    prepare_out_dir,
    run_experiment,
    run_seed,
    seed_dir,
    write_model_results,
)
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

__all__ = [
    "ANCHORS",
    "OWN_MODE",
    "PRESETS",
    "PRESET_DATA",
    "SEED_RESULTS",
    "SHARED_WITH_TRAINING",
    "SMOKE",
    "STUDY_CONFIG",
    "ExperimentConfig",
    "KAError",
    "command_line",
    "evaluate_model",
    "findings",
    "fit_adapters",
    "holds_a_run",
    "main",
    "name_ranks_for",
    "prepare_data",
    "prepare_out_dir",
    "reversal_for",
    "run_experiment",
    "run_seed",
    "seed_dir",
    "train_model",
    "train_shared_tokenizer",
    "validation_windows",
    "write_model_results",
]
