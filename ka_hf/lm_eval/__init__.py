"""KA models in EleutherAI's lm-evaluation-harness (the optional extra: `pip install "ka_hf[lm-eval]"`).

    python -m ka_hf.lm_eval --model ka_hf --model_args pretrained=PATH,ka_mode=ka --tasks wikitext

accepts lm-eval's own command line (`lm_eval ...`) with one more model, `ka_hf`; in Python the same model is
`ka_hf.lm_eval.KALM(pretrained=PATH_OR_MODEL, ka_mode="ka")`. Modes and what they run: `ka_hf.lm_eval.model`.
`import ka_hf` does not import this module (nor lm-eval); importing it registers the model name `ka_hf` with lm-eval.
"""

try:
    from .model import KALM, MODEL_NAME, hybrid_prompt_length
except ModuleNotFoundError as error:
    if error.name is None or error.name.split(".")[0] != "lm_eval":
        raise
    raise ModuleNotFoundError(
        'ka_hf.lm_eval needs lm-evaluation-harness: pip install "ka_hf[lm-eval]"', name=error.name
    ) from error

__all__ = ["KALM", "MODEL_NAME", "hybrid_prompt_length"]
