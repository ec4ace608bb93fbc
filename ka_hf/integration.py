"""The one place where Hugging Face attention is routed through KA: the hooks, and nothing else.

How a call becomes KA. Each supported attention class's `forward` is wrapped (once, at `import ka_hf`; undone by
`ka_hf.uninstall()`). The wrapper asks who owns this call's attention:
- a cache whose layers compute their own attention (`KACache`, `StaticKACache`, `KVWindowCache`: they have
  `attention_for`) answers for its layer — or None for a layer that keeps standard attention;
- otherwise the model's own KA setting (`config.ka`, see `enable_ka` / `exact_ka`), resolved once per setting.
When there is an owner, the wrapper passes it down as one extra keyword argument, which the module's own code
carries, with its other keyword arguments, to the attention function: transformers' attention lookup
(`AttentionInterface.get_interface`) is wrapped to answer a dispatcher that hands q, k, v and the mask to the
owner's `attend` when the argument is there, and runs the model's own implementation untouched when it is not.
So the module still computes q, k, v exactly as it always does (projections, RoPE, partial rotary, GQA heads,
scale, softcap, `cache.update`), nothing shared is mutated during a call (another thread using the same model
without KA at the same moment runs the original code), and nothing here is a context variable, so
`torch.compile` traces the routing.

Two guards keep results honest: a routed cache takes `update`s only from routed calls (an unsupported
architecture cannot fill it), and a routed call whose attention never reached the owner (a model path that
bypasses the attention interface) raises instead of returning standard attention.

Gradient checkpointing recomputes each layer's forward during `backward()`, often after an `exact_ka` block has
ended: the routing of a checkpointed layer is pinned at its first run and replayed by the recomputation, so
the recomputed attention is the one whose tensors were saved.
"""

import copy
import functools
import importlib

import torch
from transformers import AttentionInterface
from transformers.generation.utils import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer

from .architectures import SUPPORTED_ARCHITECTURES
from .attention import AttentionCall, UncachedKA
from .config import CONFIG_KEY, ka_spec
from .errors import KAError
from .generation import prepare_cache_with_ka_default

ROUTE_KWARG = "ka_hf_route"  # the keyword argument that carries a routed call's owner to the attention function
_PIN = "_ka_hf_pin"  # on an attention module: the routes pinned by the checkpointed layer around it
_SETTING = "_ka_hf_setting"  # on an attention module: (its config.ka section, the attention it resolved to)


class _RoutedCall:
    """One routed attention call: the owner's `attend`, and whether the attention function reached it."""

    __slots__ = ("attend", "used")

    def __init__(self, attend):
        self.attend, self.used = attend, False


def _cache_argument(kwargs):
    for name in ("cache", "past_key_values", "layer_past"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _owner_of(module, kwargs):
    """The `attend` that owns this call's attention, or None for the model's own attention."""
    attention_for = getattr(_cache_argument(kwargs), "attention_for", None)
    if attention_for is not None:
        return attention_for(module.layer_idx, module.config)
    pinned = getattr(module, _PIN, None)
    if pinned is None:
        return _model_attention(module)
    if module not in pinned:  # the checkpointed layer's first run: pin; its recomputation: replay
        pinned[module] = _model_attention(module)
    return pinned[module]


def _model_attention(module):
    """The attention the model's own KA setting (config.ka) gives this layer, resolved once per setting."""
    section = getattr(module.config, CONFIG_KEY, None)
    if section is None:
        return None
    resolved = getattr(module, _SETTING, None)
    if resolved is None or resolved[0] != section:
        resolved = _resolve(module, section)
    return resolved[1]


@torch.compiler.disable  # validation is Python work: compiled code reads the resolved pair, traced after the first call
def _resolve(module, section):
    spec = ka_spec(module.config)
    attend = UncachedKA(spec.settings).attend if spec is not None and spec.covers(module.layer_idx) else None
    resolved = (copy.deepcopy(section), attend)
    setattr(module, _SETTING, resolved)
    return resolved


def _routed(original_forward):
    @functools.wraps(original_forward)
    def forward(self, *args, **kwargs):
        attend = _owner_of(self, kwargs)
        if attend is None:
            return original_forward(self, *args, **kwargs)
        call = _RoutedCall(attend)
        result = original_forward(self, *args, **kwargs, **{ROUTE_KWARG: call})
        if not call.used:
            raise KAError(
                f"{type(self).__name__} (layer {self.layer_idx}) computed attention without going through KA "
                "(e.g. GPT-2 with reorder_and_upcast_attn under eager attention); load the model with "
                "attn_implementation='sdpa'."
            )
        return result

    forward._ka_hf_routed = True
    return forward


def _dispatching(implementation):
    """The attention function transformers looked up, or the owner's attention when the call carries one."""

    @functools.wraps(implementation)
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        call = kwargs.pop(ROUTE_KWARG, None)
        if call is None:
            return implementation(module, query, key, value, attention_mask, *args, **kwargs)
        return _owned_attention(call, module, query, key, value, attention_mask, *args, **kwargs)

    return attention


def _owned_attention(
    call, module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, sliding_window=None, **_
):
    """The owner's attention, with HF's attention-function arguments; returns (outputs (B, n, H, d), no weights)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    dropout_p = dropout if module.training else 0.0
    outputs = call.attend(query, key, value, attention_mask, AttentionCall(scale, softcap, dropout_p, sliding_window))
    call.used = True
    return outputs.transpose(1, 2), None


@functools.cache
def _dispatcher(implementation):
    return _dispatching(implementation)


def _attention_lookup(original_get_interface):
    @functools.wraps(original_get_interface)
    def get_interface(self, attn_implementation, default):
        return _dispatcher(original_get_interface(self, attn_implementation, default))

    return get_interface


def _pinning_checkpoint(layer):
    """A checkpointed layer's `_gradient_checkpointing_func`, with the routing of the attention modules inside it
    pinned for the layer's run and replayed by its recomputation (both run the function this wraps)."""
    checkpoint = layer.__dict__.get("_gradient_checkpointing_func")
    if checkpoint is None:
        raise AttributeError("_gradient_checkpointing_func")

    def checkpointed(function, *args, **kwargs):
        routes = {}
        attention_modules = [m for m in layer.modules() if getattr(type(m).forward, "_ka_hf_routed", False)]

        def run(*run_args, **run_kwargs):
            for module in attention_modules:
                setattr(module, _PIN, routes)
            try:
                return function(*run_args, **run_kwargs)
            finally:
                for module in attention_modules:
                    delattr(module, _PIN)

        return checkpoint(run, *args, **kwargs)

    return checkpointed


def _store_checkpoint(layer, function) -> None:
    layer.__dict__["_gradient_checkpointing_func"] = function


def _load_class(path: str):
    module_name, class_name = path.split(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None  # an older transformers without this model: nothing to route


_INSTALLED: dict = {}  # (owner, attribute) -> (the original, whether the owner defined it itself)


def _replace(owner, name: str, replacement) -> None:
    original = owner.__dict__.get(name, getattr(owner, name, None))
    _INSTALLED[(owner, name)] = (original, name in vars(owner))
    setattr(owner, name, replacement)


def install() -> None:
    """Route the supported attention classes (idempotent; runs at `import ka_hf`)."""
    if _INSTALLED:
        return
    for path in SUPPORTED_ARCHITECTURES.values():
        attention_class = _load_class(path)
        if attention_class is not None and not getattr(attention_class.forward, "_ka_hf_routed", False):
            _replace(attention_class, "forward", _routed(attention_class.forward))
    _replace(AttentionInterface, "get_interface", _attention_lookup(AttentionInterface.get_interface))
    prepare = GenerationMixin._prepare_cache_for_generation
    _replace(GenerationMixin, "_prepare_cache_for_generation", prepare_cache_with_ka_default(prepare))
    _replace(
        GradientCheckpointingLayer, "_gradient_checkpointing_func", property(_pinning_checkpoint, _store_checkpoint)
    )


def uninstall() -> None:
    """Restore every original transformers function that `install` replaced (KACache stops working until
    `install()` runs again)."""
    for (owner, name), (original, owned) in reversed(list(_INSTALLED.items())):
        if owned:
            setattr(owner, name, original)
        else:
            delattr(owner, name)
    _INSTALLED.clear()
