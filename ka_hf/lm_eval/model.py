"""`KALM`: lm-evaluation-harness's `hf` model (HFLM) run in one ka_hf mode, registered as `--model ka_hf`.

Everything HFLM does (tokenizing, truncation, batching, rolling windows, stop sequences) stays HFLM's; only the
forward and generate calls change, per `ka_mode` (ka_hf.modes):

    kv          standard attention (`without_ka`: also for a model saved with config.ka) — the `hf` numbers
    ka, ka@L    scoring: one exact parallel KA forward (`exact_ka`, no cache); generation: `KACache()`
    ka+adapter  scoring: one forward through `KACache(adapter=...)`; generation: the same cache
    ka-hybrid   scoring: the context (every request token before the first scored one) as a prompt with standard
                attention, then the continuation through the KA cache (`KACache(prefill="standard")`, as
                eval_ppl.py scores a window); generation: standard prompt, KA decoding

A scored request's input is HFLM's: (context + continuation)[-(max_length + 1):][:-1], right-padded in a batch.
KA is causal like standard attention (a_i reads only tokens j <= i), so right padding changes no scored logit.
"""

import contextlib
from collections import defaultdict

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ka_hf.adapters import load_adapter
from ka_hf.config import exact_ka, without_ka
from ka_hf.errors import KAError, KAInternalError
from ka_hf.modes import WINDOW_KINDS, parse_mode
from ka_hf.preflight import check_model_files

MODEL_NAME = "ka_hf"
LM_EVAL_MODES = "kv, ka, ka-hybrid, ka@LAYERS (e.g. ka@0-2) or ka+adapter (with adapter=DIR)"


def hybrid_prompt_length(context: list[int], continuation: list[int], max_length: int) -> int:
    """ka-hybrid's prompt within HFLM's input for one request: every context token the input keeps (the last one's
    logits predict the first continuation token). At least 1, since the continuation is at most max_length long."""
    input_length = min(len(context) + len(continuation), max_length + 1) - 1
    return input_length - len(continuation) + 1


def check_lm_eval_mode(ka_mode: str, adapter, num_layers: int | None = None):
    """The `Mode` for `ka_mode`, or KAError (bad name, a window mode, an adapter missing or given for nothing)."""
    if not isinstance(ka_mode, str):
        raise KAError(f"ka_mode={ka_mode!r}: give one mode name: {LM_EVAL_MODES}")
    mode = parse_mode(ka_mode, num_layers)
    if mode.kind in WINDOW_KINDS:
        raise KAError(f"ka_mode={ka_mode!r}: window modes are eval_ppl.py's; here use {LM_EVAL_MODES}")
    if mode.needs_adapter and not adapter:
        raise KAError(f"ka_mode={ka_mode} needs adapter=DIR (a saved plan-1 adapter)")
    if adapter and not mode.needs_adapter:
        raise KAError(f"adapter={adapter} is used only by ka_mode=ka+adapter, not ka_mode={ka_mode}")
    return mode


@register_model(MODEL_NAME)
class KALM(HFLM):
    """HFLM in a ka_hf inference mode: `KALM(pretrained=PATH_OR_MODEL, ka_mode="ka", adapter=None, **hflm_args)`."""

    def __init__(self, pretrained, ka_mode: str = "ka", adapter: str | None = None, **kwargs):
        check_lm_eval_mode(ka_mode, adapter)  # before the model loads
        if isinstance(pretrained, str):  # (a model object is HFLM's to check)
            check_model_files(pretrained, "pretrained=")
        super().__init__(pretrained=pretrained, **kwargs)
        self.mode = check_lm_eval_mode(ka_mode, adapter, self.model.config.num_hidden_layers)
        self.adapter = load_adapter(adapter, self.device, self.model.dtype) if adapter else None
        self._hybrid_prompt = None  # ka-hybrid: the prompt length of the requests being scored

    # -- scoring --------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.mode.kind != "ka-hybrid":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        # One forward takes one prompt for all its rows (the KACache's first call), so requests are scored in
        # groups of equal prompt length; HFLM batches within a group.
        groups = defaultdict(list)
        for index, (_, context, continuation) in enumerate(requests):
            groups[hybrid_prompt_length(context, continuation, self.max_length)].append(index)
        results = [None] * len(requests)
        for prompt, indices in groups.items():
            self._hybrid_prompt = prompt
            try:
                scored = super()._loglikelihood_tokens([requests[i] for i in indices], disable_tqdm, override_bs)
            finally:
                self._hybrid_prompt = None
            for index, result in zip(indices, scored):
                results[index] = result
        return results

    def _detect_batch_size(self, requests=None, pos: int = 0):
        self._hybrid_prompt = 1  # memory only: any prompt length will do
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self._hybrid_prompt = None

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self.mode.kind in ("kv", "ka"):  # "ka" with or without @LAYERS
            with self._cacheless_attention():
                return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad(), self._autocast():
            return self._cache_logits(inps)

    def _cacheless_attention(self):
        if self.mode.kind == "kv":
            return without_ka(self.model)
        return exact_ka(self.model, ka_layers=self.mode.layers)

    def _cache_logits(self, inps):
        """Logits of `inps` fed through a fresh cache of the mode: ka-hybrid's prompt first, then the rest."""
        prompt = inps.shape[1]
        if self.mode.kind == "ka-hybrid":
            if self._hybrid_prompt is None:
                raise KAInternalError("ka-hybrid scoring reached the model without a prompt length")
            prompt = min(self._hybrid_prompt, inps.shape[1])
        cache = self.mode.new_cache(self.adapter)
        pieces = [self.model(inps[:, :prompt], cache=cache, use_cache=True).logits]
        if prompt < inps.shape[1]:
            pieces.append(self.model(inps[:, prompt:], cache=cache, use_cache=True).logits)
        return torch.cat(pieces, dim=1)

    def _autocast(self):
        """HFLM's mixed precision, as its own _model_call applies it."""
        if self.mixed_precision_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype)

    # -- generation -----------------------------------------------------------------------------------------

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.mode.kind == "kv":
            with without_ka(self.model):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
        cache = self.mode.new_cache(self.adapter)
        return super()._model_generate(context, max_length, stop, cache=cache, **generation_kwargs)
