"""Capturing a standard-attention forward: the weights, outputs A and values V of every layer (plan-1 fitting).

`capture_attention(model, ids)` runs one forward of a standard-attention model with its attention implementation
switched, for that call, to a recording one: standard attention computed with the KA ops' weights (so masks,
scale, softcap and GQA are read exactly as KA reads them) that keeps what it computed. The switch is on the
model's config for the duration of the call: a study tool, not for a model another thread is using.
"""

import contextlib
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ka_hf.masks import allowed_from_mask
from ka_hf.ops import attention_weights, causal_allowed, expand_kv_heads

CAPTURE_IMPLEMENTATION = "ka_hf_capture"


@dataclass
class Captured:
    """One layer's standard attention: weights [B, H_q, T, T], outputs A [B, H_q, T, d], values V [B, H_kv, T, d]."""

    weights: torch.Tensor
    outputs: torch.Tensor
    values: torch.Tensor


def _recording_attention(records: dict):
    def attention(
        module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, sliding_window=None, **_
    ):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        n_new, n_total = query.shape[-2], key.shape[-2]
        allowed = allowed_from_mask(attention_mask, n_new, n_total, sliding_window, query.device)
        if allowed is None:
            allowed = causal_allowed(n_new, n_total, query.device)
        weights = attention_weights(query.float(), key.float(), allowed, scale, softcap)
        outputs = weights @ expand_kv_heads(value.float(), query.shape[1])
        records[module.layer_idx] = Captured(weights.detach(), outputs.detach(), value.detach().float())
        return outputs.to(value.dtype).transpose(1, 2), None

    return attention


@contextlib.contextmanager
def _attention_implementation(model, name: str, function):
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)  # boolean masks, read by allowed_from_mask
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@torch.no_grad()
def capture_attention(model, input_ids, attention_mask=None) -> dict[int, Captured]:
    """{layer: Captured} of one standard-attention forward of `model` (KA-SPEC §2: A is each query head's output
    before the output projection, V the values the layer computed, per kv head)."""
    records: dict[int, Captured] = {}
    with _attention_implementation(model, CAPTURE_IMPLEMENTATION, _recording_attention(records)):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return dict(sorted(records.items()))


@torch.no_grad()
def capture_ka_outputs(model, input_ids, cache, attention_mask=None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (A, V)} of one forward of `model` through a fresh KA `cache` (a `KACache`, with or without an
    adapter): A [B, H_q, T, d] the KA outputs each layer computed (before an adapter's map), V [B, H_q, T, d] the
    values of the same tokens in the same forward (per query head), both float32."""
    records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    attend = cache.attend  # the cache's attention entry point, asked for by the hook for each routed layer

    def recording(layer_idx, query, keys, values, mask, call):
        # a copy first: the layer writes its outputs over these value slots in place
        new_values = values[..., -query.shape[-2] :, :].detach().float().clone()
        outputs = attend(layer_idx, query, keys, values, mask, call)
        records[layer_idx] = (outputs.detach().float(), new_values)
        return outputs

    cache.attend = recording
    model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    return dict(sorted(records.items()))
