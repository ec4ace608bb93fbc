"""What each inference mode means, in words for reports, and the mode lists the evaluations build.

The parser and the caches are library code (`ka_hf.modes`); this is the study's prose about them.
"""

from ka_hf.errors import KAError
from ka_hf.modes import Mode

DEFINITIONS = {
    "kv": "standard attention (DynamicCache semantics): the baseline",
    "ka": "exact KA on every layer: a_i = sum_{j<i} w_ij a_j + w_ii v_i, KACache()",
    "ka-hybrid": (
        "KACache(prefill='standard'): the window's context tokens (the first max_length - trg_len tokens, which "
        "are not scored; if there are none, the first token) are a prompt computed with standard attention and "
        "cached as A; the remaining tokens are fed through the KA cache"
    ),
    "ka@LAYERS": "exact KA on the listed layers only (KACache(ka_layers=[...])), standard attention elsewhere",
    "ka+adapter": "exact KA with the plan-1 adapter f applied to cached outputs (KACache(adapter=...))",
    "kv-window": (
        "standard attention with a bounded cache, ka_hf.KVWindowCache(window={window}, sink={sink}): each token "
        "sees the first {sink} tokens and the last {window} (itself included); older (K, V) are evicted "
        "(StreamingLLM style)"
    ),
    "ka-window": (
        "exact KA with a bounded cache, KACache(window={window}, sink={sink}): each token sees the first {sink} "
        "tokens and the last {window} (itself included); evicted tokens live on only through the outputs A they fed"
    ),
}


def describe(mode: Mode) -> str:
    """What `mode` computes, in a sentence for reports (results.json's `definition`)."""
    if mode.window is not None:
        return DEFINITIONS[mode.kind].format(window=mode.window, sink=mode.sink)
    if mode.layers is None:
        return DEFINITIONS[mode.kind]
    if mode.kind == "ka":
        return f"exact KA on layers {list(mode.layers)} only, standard attention elsewhere (KACache(ka_layers=...))"
    return f"{DEFINITIONS[mode.kind]}; KA on layers {list(mode.layers)} only, standard attention on the others"


def check_adapter_given(modes, adapter) -> None:
    """ka+adapter modes need a saved plan-1 adapter: the one check, made before anything is loaded."""
    if any(mode.needs_adapter for mode in modes) and adapter is None:
        raise KAError("ka+adapter needs --adapter DIR (a saved plan-1 adapter)")


def layer_sweep_modes(num_layers: int, sweep: str = "prefix") -> list[Mode]:
    """'prefix': KA on layers [0..k] for every k (does error accumulate over depth?); 'single': KA on layer k alone."""
    if sweep == "prefix":
        return [Mode("ka", tuple(range(k + 1))) for k in range(num_layers)]
    if sweep == "single":
        return [Mode("ka", (k,)) for k in range(num_layers)]
    raise KAError(f"unknown layer sweep {sweep!r}: use prefix or single")
