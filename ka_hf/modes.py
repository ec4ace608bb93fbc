"""Inference modes by name: "kv,ka,ka-hybrid,ka@0-2,ka+adapter" -> `Mode`s that make a fresh cache per window.
The one parser for every evaluator: the study's (eval_ppl.py, reversal) and lm-evaluation-harness's (ka_hf.lm_eval).
What each mode means in a report (`describe`) is the study's: ka_hf.study.evaluation.modes.

    kv          DynamicCache                 standard attention (the baseline)
    ka          KACache()                    exact KA over the whole window
    ka-hybrid   KACache(prefill="standard")  the window's context (unscored) tokens, or else its first token, are
                                             a prompt computed with standard attention (outputs cached as A);
                                             the rest is fed through the KA cache
    ka@LAYERS   KACache(ka_layers=[...])     exact KA on those layers, standard attention on the others
    ka+adapter  KACache(adapter=...)         exact KA with a learned map f of cached outputs (plan 1)
    kv-window@W+S  KVWindowCache(W, S)       standard attention over the (K, V) of the first S and last W - 1 tokens
    ka-window@W+S  KACache(window=W, sink=S) exact KA over the (K, A) of the first S and last W - 1 tokens

LAYERS is a list of indices and ranges: `ka@0,1,2`, `ka@0-2`, `ka@0-1,4`. A suffix also works after
`ka-hybrid` and `ka+adapter` (`ka-hybrid@3`). The window modes take a window size and an optional sink count:
`ka-window@256`, `kv-window@256+4`. At equal W and S both window caches hold the same number of tokens.
"""

import re
from dataclasses import dataclass

from transformers import DynamicCache

from ka_hf.cache import KACache, KVWindowCache
from ka_hf.errors import KAError

KINDS = ("kv", "ka", "ka-hybrid", "ka+adapter", "kv-window", "ka-window")
WINDOW_KINDS = ("kv-window", "ka-window")

MODES_HELP = (
    "kv, ka, ka-hybrid, ka@LAYERS (e.g. ka@0-2 or ka@0,1,2), ka+adapter, kv-window@W, ka-window@W "
    "(W tokens; @W+S adds S sink tokens)"
)
_LAYER_PART = re.compile(r"^\d+(-\d+)?$")
_WINDOW_PART = re.compile(r"^(\d+)(?:\+(\d+))?$")


@dataclass(frozen=True)
class Mode:
    """One way of running the model: `kind` (see KINDS) on `layers` (None = every layer)."""

    kind: str
    layers: tuple[int, ...] | None = None
    window: int | None = None  # window modes: tokens a query sees back (itself included), plus `sink` first ones
    sink: int = 0

    @property
    def name(self) -> str:
        if self.window is not None:
            return f"{self.kind}@{self.window}" + (f"+{self.sink}" if self.sink else "")
        return self.kind if self.layers is None else f"{self.kind}@{_compact(self.layers)}"

    @property
    def uses_ka(self) -> bool:
        return self.kind not in ("kv", "kv-window")

    @property
    def needs_adapter(self) -> bool:
        return self.kind == "ka+adapter"

    def new_cache(self, adapter=None):
        """A fresh, empty cache for one window (one cache per model and per batch)."""
        if self.kind == "kv":
            return DynamicCache()
        if self.kind == "kv-window":
            return KVWindowCache(window=self.window, sink=self.sink)
        if self.kind == "ka-window":
            return KACache(window=self.window, sink=self.sink)
        if self.needs_adapter and adapter is None:
            raise KAError(f"mode {self.name} needs a plan-1 adapter (ka_hf.adapters.load_adapter(DIR))")
        return KACache(
            prefill="standard" if self.kind == "ka-hybrid" else "ka",
            ka_layers=None if self.layers is None else list(self.layers),
            adapter=adapter if self.needs_adapter else None,
        )


def parse_modes(text: str, num_layers: int | None = None) -> list[Mode]:
    """Parse a comma-separated mode list, or a list of modes (duplicates dropped, order kept); check layer indices
    if num_layers."""
    if isinstance(text, (list, tuple)):
        if not all(isinstance(piece, str) for piece in text):
            raise KAError(f"modes {text!r}: give mode names (strings), e.g. ['kv', 'ka'] or 'kv,ka'")
        text = ",".join(text)
    elif not isinstance(text, str):
        raise KAError(f"modes {text!r}: give a comma-separated string or a list of modes ({MODES_HELP})")
    modes = []
    for piece in _split_mode_list(text):
        mode = parse_mode(piece, num_layers)
        if mode not in modes:
            modes.append(mode)
    if not modes:
        raise KAError(f"no modes given: use a comma-separated list of {MODES_HELP}")
    return modes


def parse_mode(text: str, num_layers: int | None = None) -> Mode:
    kind, at, layer_text = text.strip().partition("@")
    if kind not in KINDS or (kind == "kv" and at):
        raise KAError(f"unknown mode {text!r}: use {MODES_HELP}")
    if kind in WINDOW_KINDS:
        match = _WINDOW_PART.match(layer_text)
        if not match or int(match.group(1)) < 1:
            raise KAError(f"mode {text!r} needs a window size: write {kind}@W or {kind}@W+S (S sink tokens)")
        return Mode(kind, window=int(match.group(1)), sink=int(match.group(2) or 0))
    if at and not layer_text:  # "ka@" is a mistake, never "every layer"
        raise KAError(f"mode {text!r} names no layers after @: write e.g. {kind}@0-2")
    if not layer_text:
        return Mode(kind)
    return Mode(kind, parse_layers(layer_text, num_layers, mode_text=text))


def parse_layers(text: str, num_layers: int | None = None, mode_text: str = "") -> tuple[int, ...]:
    """'0-2,5' -> (0, 1, 2, 5)."""
    layers = set()
    for part in text.split(","):
        part = part.strip()
        if not _LAYER_PART.match(part):
            raise KAError(f"bad layer list in mode {mode_text or text!r}: use indices and ranges like 0-2,5")
        first, _, last = part.partition("-")
        first, last = int(first), int(last or first)
        if last < first:
            raise KAError(f"bad layer range {part!r} in mode {mode_text or text!r}: write low-high")
        layers.update(range(first, last + 1))
    if num_layers is not None and max(layers) >= num_layers:
        raise KAError(
            f"mode {mode_text or text!r} names layer {max(layers)}, but the model has layers 0-{num_layers - 1}"
        )
    return tuple(sorted(layers))


def _split_mode_list(text: str) -> list[str]:
    """Split on commas, but keep 'ka@0,1,2' together: a bare index or range continues the layer list before it."""
    pieces = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if _LAYER_PART.match(piece) and pieces and "@" in pieces[-1]:
            pieces[-1] += "," + piece
        else:
            pieces.append(piece)
    return pieces


def _compact(layers) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    runs, start = [], layers[0]
    for previous, current in zip(layers, layers[1:] + (None,)):
        if current != previous + 1:
            runs.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ",".join(runs)
