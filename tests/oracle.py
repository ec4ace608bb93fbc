"""An independent float64 oracle for standard and KA attention, at the level of whole transformers models.

Written from docs/KA-SPEC.md §2 and Hugging Face's own definitions, importing nothing from ka_hf, so that a
mask, scale, softcap or GQA bug in ka_hf cannot hide by being shared with its reference:

- its own masks: causal (key position <= query position), HF's sliding-window rule
  (`transformers.masking_utils.sliding_window_overlay`: kv_idx > q_idx - sliding_window) and the 2-D padding
  mask applied to keys (`padding_mask_function`: padding_mask[batch, kv_idx]); positions are slot indices,
  pads included, as HF's mask functions use them;
- its own reading of each model's scale, softcap and window from the config (`layer_features`), which it
  checks against the values the attention module hands it;
- its own GQA mapping: query head h reads kv head h // (n_heads / n_kv_heads);
- its own softmax over the allowed keys only (a row with no allowed key has weight 0 everywhere);
- KA computed token by token: a_i = sum_{j<i} w_ij a_j + w_ii v_i.

Use it through `oracle(model, mode)` / `oracle_logits(...)`: for the duration of the block the model's
attention implementation is "ka_oracle", an attention function registered with transformers'
`AttentionInterface` that receives the module's own q, k, v (after projections, RoPE, q/k norms). Its mask
function hands the attention function the plain 2-D padding mask, never a 4-D mask, so the oracle builds the
allowed set itself. A model can also be loaded with attn_implementation="ka_oracle": a `KACache` then routes
it through ka_hf as usual, and ka_hf receives the flash-style 2-D padding mask.
"""

import contextlib
import contextvars
import math
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ORACLE_IMPLEMENTATION = "ka_oracle"
MODES = ("standard", "ka")


# ---------------------------------------------------------------------------------------------------------
# Each model's attention features, read from its config the way HF's attention classes read them.


@dataclass(frozen=True)
class LayerFeatures:
    scale: float
    softcap: float | None
    window: int | None


def layer_features(config, layer_idx: int) -> LayerFeatures:
    model_type = config.model_type
    if model_type == "gpt2":
        head_dim = config.n_embd // config.n_head
        scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale = scale / (layer_idx + 1)
        return LayerFeatures(scale, None, None)
    if model_type == "gpt_neox":
        return LayerFeatures((config.hidden_size // config.num_attention_heads) ** -0.5, None, None)
    if model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        scale, softcap, window = head_dim**-0.5, None, None
        if model_type == "gemma2":
            scale = config.query_pre_attn_scalar**-0.5
            softcap = config.attn_logit_softcapping
        if model_type == "mistral":
            window = config.sliding_window
        elif model_type in ("qwen2", "qwen3", "gemma2"):
            if config.layer_types[layer_idx] == "sliding_attention":
                window = config.sliding_window
        return LayerFeatures(scale, softcap, window)
    raise NotImplementedError(f"the oracle does not know model_type {model_type!r}")


# ---------------------------------------------------------------------------------------------------------
# Masks and weights.


def allowed_keys(n_query: int, n_key: int, padding: torch.Tensor | None = None, window: int | None = None):
    """Boolean (B or 1, n_query, n_key): may query i (slot n_key - n_query + i) attend to key slot j?

    causal: j <= i; window (HF): j > i - window; padding (B, n_key), 1 = real token: applied to keys.
    """
    query_slots = torch.arange(n_key - n_query, n_key)
    key_slots = torch.arange(n_key)
    allowed = torch.zeros(n_query, n_key, dtype=torch.bool)
    for row, i in enumerate(query_slots.tolist()):
        for j in key_slots.tolist():
            allowed[row, j] = j <= i and (window is None or j > i - window)
    allowed = allowed[None]
    if padding is not None:
        allowed = allowed & padding.to(torch.bool)[:, None, -n_key:]
    return allowed


def left_padding_mask(lengths, total: int) -> torch.Tensor:
    """(B, total) long mask, 1 = real token, with row b's lengths[b] real tokens at the right end."""
    return torch.tensor([[0] * (total - n) + [1] * n for n in lengths], dtype=torch.long)


def generate_position_ids(padding: torch.Tensor) -> torch.Tensor:
    """Positions of the real tokens of a left-padded batch: 0, 1, ... from each row's first real token."""
    positions = padding.long().cumsum(-1) - 1
    return positions.masked_fill(padding == 0, 0)


def query_head_keys(key: torch.Tensor, n_query_heads: int) -> torch.Tensor:
    """(B, H_kv, T, d) -> (B, H_q, T, d): query head h reads kv head h // group."""
    n_kv_heads = key.shape[1]
    if n_query_heads % n_kv_heads:
        raise ValueError(f"{n_query_heads} query heads cannot share {n_kv_heads} kv heads")
    group = n_query_heads // n_kv_heads
    kv_head = torch.tensor([h // group for h in range(n_query_heads)])
    return key.index_select(1, kv_head)


def weights(query, key, allowed, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Softmax weights (B, H_q, n, T) in float64 over the allowed keys only; no allowed key: all 0.

    query (B, H_q, n, d); key (B, H_kv, T, d); allowed broadcastable to (B, 1 or H_q, n, T).
    """
    query = query.to(torch.float64)
    key = query_head_keys(key.to(torch.float64), query.shape[1])
    scores = torch.einsum("bhid,bhjd->bhij", query, key) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = allowed.expand(scores.shape) if allowed is not None else torch.ones_like(scores, dtype=torch.bool)
    top = torch.where(allowed, scores, torch.full_like(scores, -math.inf)).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    exps = torch.where(allowed, torch.exp(scores - top), torch.zeros_like(scores))
    total = exps.sum(-1, keepdim=True)
    return torch.where(total > 0, exps / torch.where(total > 0, total, torch.ones_like(total)), exps)


def standard_reference(query, key, value, allowed, scale, softcap=None) -> torch.Tensor:
    """Standard attention (B, H_q, n, d_v) in float64."""
    values = query_head_keys(value.to(torch.float64), query.shape[1])
    return weights(query, key, allowed, scale, softcap) @ values


def ka_reference(query, key, value, allowed, scale, softcap=None, standard_prefix: int = 0) -> torch.Tensor:
    """KA outputs (B, H_q, T, d_v) of a whole sequence in float64, one token at a time (KA-SPEC §2).

    query (B, H_q, T, d), key (B, H_kv, T, d), value (B, H_kv, T, d_v): every token of the sequence, no cache.
    standard_prefix: the first slots get standard attention outputs (the ka-hybrid mode, KA-SPEC §4), which the
    later tokens then attend over as their A.
    """
    n = query.shape[-2]
    if key.shape[-2] != n or value.shape[-2] != n:
        raise ValueError("the KA oracle takes whole sequences (no cached past)")
    w = weights(query, key, allowed, scale, softcap)
    values = query_head_keys(value.to(torch.float64), query.shape[1])
    outputs = []
    for i in range(n):
        if i < standard_prefix:
            outputs.append(w[..., i : i + 1, :] @ values)
            continue
        output = w[..., i, i, None, None] * values[..., i : i + 1, :]
        for j in range(i):
            output = output + w[..., i, j, None, None] * outputs[j]
        outputs.append(output)
    return torch.cat(outputs, dim=-2)


# ---------------------------------------------------------------------------------------------------------
# The attention function and its mask function, registered with transformers.


@dataclass
class _Run:
    mode: str
    ka_layers: frozenset | None = None  # KA mode: the layers that run KA (None = all), the others standard
    standard_prefix: int = 0  # KA mode: slots computed with standard attention first (ka-hybrid)
    layers_called: set = field(default_factory=set)


_RUN: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("ka_oracle_run", default=None)


def _padding_mask_only(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs
):
    """The mask function of "ka_oracle": the 2-D padding mask itself (flash style), or None."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].to(torch.bool)


def check_module_features(layer_idx, features: LayerFeatures, scaling, softcap, sliding_window) -> None:
    """The module hands over what HF's own attention reads; the oracle must have derived the same."""
    if scaling is not None and not math.isclose(scaling, features.scale, rel_tol=1e-15):
        raise AssertionError(f"layer {layer_idx}: module scaling {scaling} != oracle {features.scale}")
    if softcap != features.softcap or (sliding_window is not None and sliding_window != features.window):
        raise AssertionError(
            f"layer {layer_idx}: module softcap/window {softcap}/{sliding_window} != "
            f"oracle {features.softcap}/{features.window}"
        )


def oracle_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, sliding_window=None, **kwargs
):
    run = _RUN.get()
    if run is None:
        raise RuntimeError("the ka_oracle attention runs inside tests.oracle.oracle(model, mode) only")
    if module.training and dropout:
        raise RuntimeError("the oracle has no dropout: put the model in eval mode")
    features = layer_features(module.config, module.layer_idx)
    check_module_features(module.layer_idx, features, scaling, softcap, sliding_window)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise AssertionError("the oracle expects the 2-D padding mask of its own mask function")
    n_query, n_key = query.shape[-2], key.shape[-2]
    allowed = allowed_keys(n_query, n_key, attention_mask, features.window)[:, None]
    if run.mode == "ka" and (run.ka_layers is None or module.layer_idx in run.ka_layers):
        output = ka_reference(query, key, value, allowed, features.scale, features.softcap, run.standard_prefix)
    else:
        output = standard_reference(query, key, value, allowed, features.scale, features.softcap)
    run.layers_called.add(module.layer_idx)
    return output.to(value.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(ORACLE_IMPLEMENTATION, oracle_attention)
AttentionMaskInterface.register(ORACLE_IMPLEMENTATION, _padding_mask_only)


@contextlib.contextmanager
def oracle(model, mode: str = "ka", ka_layers=None, standard_prefix: int = 0):
    """Within the block, `model`'s attention is the oracle's (standard or KA), whatever it was loaded with.

    KA mode options: ka_layers (KA on these layers only, standard attention on the others) and standard_prefix
    (the first slots of every sequence get standard attention outputs, cached as their A: ka-hybrid)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: use one of {MODES}")
    config = model.config
    previous = config._attn_implementation
    run = _Run(mode, None if ka_layers is None else frozenset(ka_layers), standard_prefix)
    token = _RUN.set(run)
    config._attn_implementation = ORACLE_IMPLEMENTATION
    try:
        yield run
    finally:
        config._attn_implementation = previous
        _RUN.reset(token)


@torch.no_grad()
def oracle_logits(
    model, input_ids, attention_mask=None, position_ids=None, mode: str = "ka", **options
) -> torch.Tensor:
    """Logits (float64) of one uncached forward of `model` with the oracle's attention on every layer
    (options: those of `oracle`)."""
    if getattr(model.config, "ka", None):
        raise RuntimeError("the model's config asks ka_hf for KA: the oracle would not be called")
    with oracle(model, mode, **options) as run:
        logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    if run.layers_called != set(range(model.config.num_hidden_layers)):
        raise AssertionError(f"the oracle ran on layers {sorted(run.layers_called)} only")
    return logits.to(torch.float64)
