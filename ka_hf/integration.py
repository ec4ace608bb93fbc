"""The one place where Hugging Face attention is routed through KA.

How a call becomes KA: each supported attention class's `forward` is wrapped (once, at `import ka_hf`; undone by
`ka_hf.uninstall()`). For a call whose cache is a `KACache` (or whose model config asks for KA, see
`enable_ka`/`exact_ka`), the wrapper sets a `Route` in a context variable for the duration of that call, and
transformers' attention lookup (`AttentionInterface.get_interface`, which every supported model calls) answers
`ka_attention_forward` while a KA route is active in the calling thread. The module itself still computes q, k, v
exactly as it always does (projections, RoPE, partial rotary, GQA heads, scale, softcap), calls `cache.update`,
and hands q, k, v and its mask to the attention function — which is now ours. Nothing shared is mutated during a
call: another thread using the same model without a KACache at the same moment runs the untouched original code,
as does everything else (no cache, a `DynamicCache`, models without a KA config).

Two guards keep results honest: a `KACache` refuses updates from modules that were not routed (an unsupported
architecture), and a routed call that never reached the KA function (a model path that bypasses the attention
interface) raises instead of returning standard attention.
"""

import contextlib
import contextvars
import functools
import importlib
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.generation.utils import GenerationMixin

from .cache import KACache
from .config import CONFIG_KEY, PROVENANCE_KEY, KAConfig, provenance, record_provenance
from .errors import KAError
from .ops import (
    DEFAULT_BLOCK_SIZE,
    attention_weights,
    causal_allowed,
    expand_kv_heads,
    ka_attention,
    ka_attention_naive,
    ka_decode_step,
    standard_attention,
)
from .route import ACTIVE_ROUTE, SUPPORTED_ARCHITECTURES, Route, check_routed  # noqa: F401 (check_routed: API)
from .static_cache import StaticKACache, StaticKALayer
from .wrapped import unwrap_model

# The caches whose layers hold (K, A) and route a call through KA. Listed here rather than found through a common
# base class, so that each cache keeps its own constructor.
KA_CACHES = (KACache, StaticKACache)

# The attention-implementation name the wrapper switches a routed call to. Not meant for from_pretrained:
# use enable_ka / exact_ka / KACache instead (they know which layers and which cache).
KA_IMPLEMENTATION = "ka_hf"


# ---------------------------------------------------------------------------------------------------------
# The model's KA setting (config.ka), for full-sequence KA without a KACache: training and scoring.


KASpec = KAConfig  # the former name of the typed setting (ka_hf.config)


def ka_spec(config) -> KAConfig | None:
    """The KA setting recorded in a model config (config.ka, old or new), or None when it runs standard attention."""
    section = getattr(config, CONFIG_KEY, None)
    if not isinstance(section, (dict, KAConfig)):
        return None
    spec = KAConfig.from_model_config(config)
    return spec if spec.is_ka else None


def _check_supported(model) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise KAError(
            f"ka_hf does not support model_type {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def enable_ka(
    model,
    ka_layers=None,
    variant: str = "ka",
    kernel: str = "auto",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    **record,
):
    """Make `model` run exact KA attention on `ka_layers` (None = all) in every forward, with or without a cache.

    `kernel` picks how KA is computed ("auto", "blocked", "parallel" or "loop"; see `ka_hf.ops.kernels`) and
    `block_size` how many tokens a block holds. The
    setting lives in `model.config.ka`, so `save_pretrained` keeps it and a model loaded back (with ka_hf
    imported) runs KA again; `generate()` then uses a `KACache` by default. Extra keyword arguments are recorded
    as provenance, in `model.config.ka_provenance` (e.g. how the model was trained), apart from the typed
    runtime setting (`ka_hf.KAConfig`). Returns the model. A wrapped model (DDP, FSDP, PEFT, torch.compile)
    gets the setting on the transformers model inside it (`ka_hf.wrapped`) and is returned as given.
    """
    given, model = model, unwrap_model(model)
    _check_supported(model)
    if "layers" in record:  # the former name: recorded as provenance it would silently put KA on every layer
        raise KAError(f"enable_ka(layers=...) is now enable_ka(ka_layers={record['layers']!r})")
    setting = KAConfig(
        attention="ka",
        ka_layers=None if ka_layers is None else [int(i) for i in ka_layers],
        variant=variant,
        kernel=kernel,
        block_size=block_size,
    )
    _set_config(model.config, setting, record)
    return given


def _set_config(config, setting: KAConfig, record: dict) -> None:
    """config.ka = the setting; `record` (and the records of an old flat section) go to config.ka_provenance."""
    if record or provenance(config) and not isinstance(getattr(config, PROVENANCE_KEY, None), dict):
        record_provenance(config, **record)
    setattr(config, CONFIG_KEY, setting.to_dict())


def disable_ka(model):
    """Back to standard attention for cache-less forwards (the other settings and the provenance are kept).
    Returns the model (as given: a wrapped one too, see enable_ka)."""
    given, model = model, unwrap_model(model)
    current = KAConfig.from_model_config(model.config) or KAConfig()
    _set_config(model.config, current.replace(attention="standard"), {})
    return given


@contextlib.contextmanager
def _config_ka_within(model, set_section):
    config = unwrap_model(model).config  # exact_ka / without_ka take wrapped models too (ka_hf.wrapped)
    saved = {key: (hasattr(config, key), getattr(config, key, None)) for key in (CONFIG_KEY, PROVENANCE_KEY)}
    set_section(model)
    try:
        yield model
    finally:
        for key, (had, previous) in saved.items():
            if had:
                setattr(config, key, previous)
            elif hasattr(config, key):  # leave no `"ka": null` behind for save_pretrained
                delattr(config, key)


def exact_ka(
    model, ka_layers=None, variant: str = "ka", kernel: str = "auto", block_size: int | None = DEFAULT_BLOCK_SIZE
):
    """Within the block, forwards of `model` use exact parallel KA attention (gradients flow):

        with ka_hf.exact_ka(model):
            loss = model(input_ids, labels=input_ids).loss

    kernel="loop" runs the token-by-token reference instead (slow; for checking).
    """
    return _config_ka_within(
        model, lambda m: enable_ka(m, ka_layers=ka_layers, variant=variant, kernel=kernel, block_size=block_size)
    )


def without_ka(model):
    """Within the block, cache-less forwards of `model` use standard attention, even if its config asks for KA
    (e.g. reading a KA-trained model with a KV cache). A KACache passed explicitly still runs KA."""
    return _config_ka_within(model, disable_ka)


# ---------------------------------------------------------------------------------------------------------
# Masks: whatever format the model's attention implementation produced -> boolean "may attend".


def allowed_from_mask(mask, n_new: int, n_total: int, sliding_window: int | None = None, device=None):
    """Boolean mask broadcastable to (B, H, n_new, n_total), or None for plain causal (lower-right aligned: the
    new tokens are the last ones), which lets the kernels skip masking altogether.

    HF hands the attention function None (causal implied, lower-right aligned), a boolean 4D mask (sdpa:
    True = attend), an additive float 4D mask (eager: 0 or the dtype's minimum) or a 2D padding mask (flash).
    """
    if mask is None:
        if sliding_window is None:
            return None
        return causal_allowed(n_new, n_total, device, sliding_window)  # on the queries' device (GPU or CPU)
    if not isinstance(mask, torch.Tensor):
        raise KAError(
            f"KA cannot read an attention mask of type {type(mask).__name__} (flex attention); load the model "
            "with attn_implementation='sdpa' or 'eager'"
        )
    if mask.dim() == 2:  # flash-attention style (B, T) padding mask
        causal = causal_allowed(n_new, n_total, mask.device, sliding_window)
        return causal & mask[:, None, None, -n_total:].bool()
    mask = mask[..., :n_total]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def window_attention_mask(attention_mask: torch.Tensor, window: int, sink: int = 0, dtype=torch.float32):
    """A 4-D additive mask (B, 1, T, T) for a whole sequence that gives every query what a window cache with sinks
    leaves it: the first `sink` tokens and the last `window` (itself included), minus padding (`attention_mask`
    (B, T), 1 = token). Passed as `attention_mask=` it scores in one parallel pass exactly what token-by-token
    decoding with `KACache(window=, sink=)` (under KA) or a window-with-sinks KV cache (under standard attention)
    computes; any attention implementation reads it."""
    length = attention_mask.shape[-1]
    allowed = (
        causal_allowed(length, length, attention_mask.device, window, sink) & attention_mask[:, None, None, :].bool()
    )
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def window_allowed(
    mask, key_positions, n_seen: int, n_new: int, window: int, sink: int, sliding_window: int | None = None, device=None
):
    """Boolean mask (B or 1, 1, n_new, K) of a window layer whose K kept keys sit at absolute `key_positions`
    (the new tokens last) after `n_seen` tokens in all: a query sees the sinks and the keys less than `window`
    positions back, and what HF's mask over all `n_seen` positions allows (padding, the model's own window)."""
    query_positions = key_positions[-n_new:]
    distance = query_positions[:, None] - key_positions[None, :]
    rule = (distance >= 0) & ((distance < window) | (key_positions[None, :] < sink))
    if sliding_window is not None:
        rule = rule & (distance < sliding_window)
    seen = allowed_from_mask(mask, n_new, n_seen, None, device)
    return rule[None, None] if seen is None else seen[..., key_positions] & rule


# ---------------------------------------------------------------------------------------------------------
# The attention function a routed call runs.


def ka_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, sliding_window=None, **kwargs
):
    route = ACTIVE_ROUTE.get()
    if route is None or route.kind != "ka":
        raise KAError(
            f"attn_implementation={KA_IMPLEMENTATION!r} is set per call by ka_hf; do not load a model with it. "
            "Use ka_hf.KACache(), ka_hf.enable_ka(model) or ka_hf.exact_ka(model)."
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    n_new, n_total = query.shape[-2], key.shape[-2]
    dropout_p = dropout if module.training else 0.0
    cache = route.cache
    layer = cache.layers[route.layer_idx] if isinstance(cache, KA_CACHES) else None
    positions = layer.key_positions() if layer is not None else None
    if isinstance(layer, StaticKALayer):
        key, value, allowed = _static_view(layer, key, value, attention_mask, n_new, sliding_window, query.device)
    elif positions is None:
        allowed = allowed_from_mask(attention_mask, n_new, n_total, sliding_window, query.device)
    else:
        allowed = window_allowed(
            attention_mask,
            positions,
            layer.cumulative_length,
            n_new,
            layer.window,
            layer.sink,
            sliding_window,
            query.device,
        )

    if layer is not None:
        outputs = _ka_with_cache(cache, route.layer_idx, query, key, value, allowed, scale, softcap, dropout_p)
    else:
        if n_total != n_new:
            raise KAError(
                "This model runs KA attention, which needs the attention outputs of past tokens: a "
                f"{type(cache).__name__} holds values instead. Pass past_key_values=ka_hf.KACache() "
                "(generate() does so by default for KA models) or use_cache=False."
            )
        outputs = ka_attention(
            query,
            key,
            value,
            allowed=allowed,
            scale=scale,
            softcap=softcap,
            variant=route.variant,
            dropout_p=dropout_p,
            block_size=route.block_size,
            kernel=route.kernel,
        )
    route.used = True
    return outputs.transpose(1, 2), None


def _static_view(layer, keys, values, attention_mask, n_new, sliding_window, device):
    """(keys, output slots, allowed) that a StaticKALayer's call reads. A prompt chunk reads the written prefix, the
    new tokens last, as a KACache holds them. A decode step reads all max_cache_len slots, the unwritten ones (and
    those outside the layer's own window) masked: the same shapes every step, so one compiled graph serves all."""
    if not layer.is_fixed_shape_step():
        n_total = layer.n_cached
        allowed = allowed_from_mask(attention_mask, n_new, n_total, sliding_window, device)
        return keys[..., :n_total, :], values[..., :n_total, :], allowed
    # No sliding_window here: a missing mask would mean "the new token is the last slot"; the layer's rule knows.
    allowed = allowed_from_mask(attention_mask, n_new, keys.shape[-2], None, device)
    visible = layer.visible_slots()
    return keys, values, visible if allowed is None else allowed & visible


def _ka_with_cache(cache, layer_idx, query, keys, values, allowed, scale, softcap, dropout_p):
    """`values` is the layer's output slots: past outputs, then the new tokens' values as placeholders."""
    layer = cache.layers[layer_idx]
    past_outputs = layer.past_outputs()
    n_new = query.shape[-2]
    new_values = values[..., -n_new:, :]  # already expanded to query heads: a GQA group reads one kv head
    adapter = cache.adapter
    if cache.attends_values:  # KVWindowCache: standard attention over the kept keys and values
        outputs = standard_attention(query, keys, values, allowed, scale, softcap)
    elif cache.prefill == "standard" and past_outputs is None:
        outputs = standard_attention(query, keys, new_values, allowed, scale, softcap)
    elif n_new == 1 and cache.variant == "ka" and cache.kernel != "loop":
        outputs = ka_decode_step(query, keys, values, allowed, scale, softcap)
    elif adapter is not None:
        # f applied to outputs inside the chunk has no exact triangular solve in general: run the recursion.
        outputs = ka_attention_naive(
            query,
            keys,
            new_values,
            past_outputs=past_outputs,
            allowed=allowed,
            scale=scale,
            softcap=softcap,
            variant=cache.variant,
            value_map=functools.partial(adapter.map_outputs, layer_idx),
        )
    else:
        outputs = ka_attention(
            query,
            keys,
            new_values,
            past_outputs=past_outputs,
            allowed=allowed,
            scale=scale,
            softcap=softcap,
            variant=cache.variant,
            dropout_p=dropout_p,
            block_size=cache.block_size,
            kernel=cache.kernel,
        )
    cache.store_outputs(layer_idx, outputs if adapter is None else adapter.map_outputs(layer_idx, outputs))
    return outputs


# ---------------------------------------------------------------------------------------------------------
# Capturing the standard model's attention: weights, outputs A and values V of every layer

CAPTURE_IMPLEMENTATION = "ka_hf_capture"  # set per call by `capture_attention`; never load a model with it
_CAPTURED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ka_hf_capture", default=None)


@dataclass
class Captured:
    """One layer's standard attention: weights [B, H_q, T, T], outputs A [B, H_q, T, d], values V [B, H_kv, T, d]."""

    weights: torch.Tensor
    outputs: torch.Tensor
    values: torch.Tensor


def _capture_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, sliding_window=None, **kwargs
):
    """Standard attention (the KA ops' weights, so masks match KA exactly) that records what it computed."""
    records = _CAPTURED.get()
    if records is None:
        raise KAError(
            f"attn_implementation={CAPTURE_IMPLEMENTATION!r} is set per call by "
            "ka_hf.integration.capture_attention; do not load a model with it"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    n_new, n_total = query.shape[-2], key.shape[-2]
    allowed = allowed_from_mask(attention_mask, n_new, n_total, sliding_window, query.device)
    if allowed is None:
        allowed = causal_allowed(n_new, n_total, query.device)
    weights = attention_weights(query.float(), key.float(), allowed, scale, softcap)
    outputs = weights @ expand_kv_heads(value.float(), query.shape[1])
    records[module.layer_idx] = Captured(weights.detach(), outputs.detach(), value.detach().float())
    return outputs.to(value.dtype).transpose(1, 2), None


@torch.no_grad()
def capture_attention(model, input_ids, attention_mask=None) -> dict[int, Captured]:
    """{layer: Captured} of one standard-attention forward of `model` (KA-SPEC §2: A is each query head's output
    before the output projection, V the values the layer computed, per kv head)."""
    token = _CAPTURED.set({})  # the attention lookup answers the capture function in this context
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return dict(sorted(_CAPTURED.get().items()))
    finally:
        _CAPTURED.reset(token)


# ---------------------------------------------------------------------------------------------------------
# The hook: wrap the supported attention classes' forward.


def _cache_argument(kwargs):
    for name in ("cache", "past_key_values", "layer_past"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _route_for(module, kwargs) -> Route | None:
    cache = _cache_argument(kwargs)
    if isinstance(cache, KA_CACHES):
        cache.bind(module.config)
        kind = "ka" if cache.is_ka_layer(module.layer_idx) else "standard"
        return Route(cache, module.layer_idx, kind, cache.variant, cache.block_size, cache.kernel)
    spec = ka_spec(module.config)
    if spec is not None and spec.covers(module.layer_idx):
        return Route(cache, module.layer_idx, "ka", spec.variant, spec.block_size, spec.kernel)
    return None


def _routed(original_forward):
    @functools.wraps(original_forward)
    def forward(self, *args, **kwargs):
        route = _route_for(self, kwargs)
        if route is None:
            return original_forward(self, *args, **kwargs)
        token = ACTIVE_ROUTE.set(route)
        try:
            result = original_forward(self, *args, **kwargs)
        finally:
            ACTIVE_ROUTE.reset(token)
        if route.kind == "ka" and not route.used:
            raise KAError(
                f"{type(self).__name__} (layer {route.layer_idx}) computed attention without going through KA "
                "(e.g. GPT-2 with reorder_and_upcast_attn under eager attention); load the model with "
                "attn_implementation='sdpa'."
            )
        return result

    forward._ka_hf_routed = True
    return forward


def _attention_lookup(original_get_interface):
    """transformers' attention lookup, answering KA (or the capture function) while this context has a KA route."""

    @functools.wraps(original_get_interface)
    def get_interface(self, attn_implementation, default):
        route = ACTIVE_ROUTE.get()
        if route is not None and route.kind == "ka":
            return ka_attention_forward
        if _CAPTURED.get() is not None:
            return _capture_attention_forward
        return original_get_interface(self, attn_implementation, default)

    return get_interface


# generate(cache_implementation=...) values a KA model can honour with a KACache (None: the default, dynamic).
KA_CACHE_IMPLEMENTATIONS = (None, "dynamic", "offloaded")


def _prepare_cache_with_ka_default(original):
    """generate() on a model whose config asks for KA gets a KACache when the caller gave no cache, built from the
    model's config as generate() builds its DynamicCache (`cache_implementation="offloaded"`: an offloading one)."""

    @functools.wraps(original)
    def prepare(self, generation_config, model_kwargs, *args, **kwargs):
        spec = ka_spec(self.config)
        wants_cache = model_kwargs.get("cache") is None and generation_config.use_cache is not False
        if spec is not None and wants_cache and generation_config.cache_implementation == "static":
            _static_ka_default(self.config, spec, generation_config, model_kwargs, *args, **kwargs)
        if spec is not None and model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            implementation = generation_config.cache_implementation
            if implementation not in KA_CACHE_IMPLEMENTATIONS:
                raise KAError(
                    f"generate(cache_implementation={implementation!r}): this model runs KA, which caches attention "
                    "outputs in a KACache; use 'dynamic', 'offloaded' or 'static', or pass cache=ka_hf.KACache(...)"
                )
            model_kwargs["cache"] = KACache(
                self.config.get_text_config(decoder=True),
                ka_layers=spec.ka_layers,
                variant=spec.variant,
                block_size=spec.block_size,
                kernel=spec.kernel,
                offloading=implementation == "offloaded",
            )
            generation_config.cache_implementation = None  # generate's own copy: it refuses a cache and a name
        return original(self, generation_config, model_kwargs, *args, **kwargs)

    return prepare


def _static_ka_default(
    config, spec, generation_config, model_kwargs, generation_mode=None, batch_size=None, max_cache_length=None
):
    """cache_implementation="static" on a model whose config asks for KA: a StaticKACache of the length
    transformers would give its StaticCache (this generate() call's prompt + new tokens, or max_cache_len if
    larger), in place of that StaticCache."""
    if spec.variant != "ka":
        raise KAError(
            f"cache_implementation='static' runs exact KA, but this model's config asks for variant {spec.variant!r}:"
            " generate without cache_implementation (a KACache)"
        )
    length = max(max_cache_length or 0, generation_config.max_cache_len or 0)
    model_kwargs["cache"] = StaticKACache(
        config=config, max_cache_len=length, ka_layers=spec.ka_layers, kernel=spec.kernel, block_size=spec.block_size
    )
    generation_config.cache_implementation = None  # this call's copy: the cache is given now


def _load_class(path: str):
    module_name, class_name = path.split(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None  # an older transformers without this model: nothing to route


_INSTALLED: dict = {}  # (owner, attribute) -> the original, for uninstall()


def _replace(owner, name: str, wrap) -> None:
    original = getattr(owner, name)
    if getattr(original, "_ka_hf_routed", False):  # inherited from a class routed already
        return
    _INSTALLED[(owner, name)] = (original, name in vars(owner))
    setattr(owner, name, wrap(original))


def install() -> None:
    """Route the supported attention classes (idempotent; runs at `import ka_hf`)."""
    if _INSTALLED:
        return
    AttentionInterface.register(KA_IMPLEMENTATION, ka_attention_forward)
    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention_forward)
    for path in SUPPORTED_ARCHITECTURES.values():
        attention_class = _load_class(path)
        if attention_class is not None:
            _replace(attention_class, "forward", _routed)
    _replace(AttentionInterface, "get_interface", _attention_lookup)
    _replace(GenerationMixin, "_prepare_cache_for_generation", _prepare_cache_with_ka_default)


def uninstall() -> None:
    """Restore every original transformers function that `install` replaced (KACache stops working until
    `install()` runs again)."""
    for (owner, name), (original, owned) in reversed(list(_INSTALLED.items())):
        if owned:
            setattr(owner, name, original)
        else:
            delattr(owner, name)
    _INSTALLED.clear()
