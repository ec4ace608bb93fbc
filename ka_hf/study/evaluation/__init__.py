"""Evaluation: perplexity of every inference mode (kv, ka, ka-hybrid, ka@LAYERS, ka+adapter) on the same windows.

    from ka_hf.study.evaluation import parse_modes, score_modes
    records = score_modes(model, windows, parse_modes("kv,ka"))   # windows: ka_hf.study.data.ppl_windows(...)

`run_ppl_eval` is the whole job behind examples/eval_ppl.py; `KA_PERPLEXITY_METRIC` is the local path of the same
metric as an `evaluate` module: `evaluate.load(KA_PERPLEXITY_METRIC)`.
"""

from pathlib import Path

from ka_hf.modes import MODES_HELP, Mode, parse_modes

from .modes import DEFINITIONS, check_adapter_given, describe, layer_sweep_modes
from .ppl import METHODS, score_mode, score_modes
from .run import SWEEPS, PplRun, run_ppl_eval

KA_PERPLEXITY_METRIC = str(Path(__file__).resolve().parents[1] / "metrics" / "ka_perplexity")

__all__ = [
    "DEFINITIONS",
    "KA_PERPLEXITY_METRIC",
    "METHODS",
    "MODES_HELP",
    "Mode",
    "PplRun",
    "SWEEPS",
    "check_adapter_given",
    "describe",
    "layer_sweep_modes",
    "parse_modes",
    "run_ppl_eval",
    "score_mode",
    "score_modes",
]
