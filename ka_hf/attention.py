"""KA attention of one chunk of new tokens, from the settings: what every KA layer's `attend` runs.

Which computation a chunk needs follows from its settings and its shape alone:
- a ka-hybrid prompt (prefill="standard", nothing cached yet): standard attention, its outputs cached as A;
- one new token after a past: plain attention over [A_past; v_new] (KA-SPEC §3 with n = 1, no solve);
- an adapter: the recursion with f applied to each output before later tokens attend over it (exact by blocks
  for an affine f, KA-SPEC §3.1; block-sequential with a token loop inside each block for any other f);
- otherwise the chosen kernel (`ka_hf.ops.ka_attention`: blocked, parallel or the loop).

`UncachedKA` is the attention of a model that runs KA without a cache (`enable_ka` / `exact_ka`: training and
scoring): the whole input is one chunk with nothing cached.
"""

import functools
from dataclasses import dataclass

import torch

from .errors import KAError
from .masks import allowed_from_mask
from .ops import (
    auto_block_size,
    ka_attention,
    ka_attention_adapted,
    ka_attention_mapped,
    ka_attention_naive,
    ka_decode_step,
    standard_attention,
)
from .settings import KASettings


@dataclass(frozen=True)
class AttentionCall:
    """What one call of a model's attention passes besides q, k, v and the mask."""

    scale: float
    softcap: float | None = None
    dropout_p: float = 0.0
    sliding_window: int | None = None  # the model's own window for this layer (HF's q - k < window)


def ka_chunk_outputs(
    settings: KASettings, layer_idx, query, keys, attended, past_outputs, allowed, call: AttentionCall
) -> torch.Tensor:
    """KA outputs (B, H_q, n, d_v) of a chunk's n new tokens.

    query (B, H_q, n, d); keys (B, H_kv, p + n, d); attended (B, H_q, p + n, d_v): the layer's output slots,
    the p cached outputs then the new tokens' values (per query head); past_outputs: its first p rows or None.
    """
    n_new = query.shape[-2]
    new_values = attended[..., -n_new:, :]
    scale, softcap = call.scale, call.softcap
    if settings.prefill == "standard" and past_outputs is None:
        return standard_attention(query, keys, new_values, allowed, scale, softcap)
    if n_new == 1 and settings.variant == "ka" and settings.kernel != "loop":
        return ka_decode_step(query, keys, attended, allowed, scale, softcap)
    if settings.adapter is not None:
        return adapted_chunk_outputs(settings, layer_idx, query, keys, new_values, past_outputs, allowed, call)
    return ka_attention(
        query,
        keys,
        new_values,
        past_outputs=past_outputs,
        allowed=allowed,
        scale=scale,
        softcap=softcap,
        variant=settings.variant,
        dropout_p=call.dropout_p,
        block_size=settings.block_size,
        kernel=settings.kernel,
    )


def adapted_chunk_outputs(settings: KASettings, layer_idx, query, keys, new_values, past_outputs, allowed, call):
    """KA outputs of a multi-token chunk whose later tokens attend over f(outputs) (a plan-1 adapter): exact by
    blocks for an affine f (KA-SPEC §3.1), block-sequential for any other f; the token loop for kernel "loop" and
    for plan 2 (which the block kernels do not compute). Attention dropout does not apply here (an adapter is
    fitted and used in eval mode)."""
    adapter, scale, softcap = settings.adapter, call.scale, call.softcap
    value_map = functools.partial(adapter.map_outputs, layer_idx)
    if settings.kernel == "loop" or settings.variant != "ka":
        return ka_attention_naive(
            query,
            keys,
            new_values,
            past_outputs=past_outputs,
            allowed=allowed,
            scale=scale,
            softcap=softcap,
            variant=settings.variant,
            value_map=value_map,
        )
    affine_map = getattr(adapter, "affine_map", None)  # the adapter contract needs only map_outputs
    shape = (*query.shape[:-1], new_values.shape[-1])
    maps = affine_map(layer_idx, shape) if affine_map is not None else None
    # The same blocks as the blocked kernel's (kernel "auto" shortens them for a short chunk).
    block_size = settings.block_size
    if settings.kernel == "auto":
        block_size = auto_block_size(query.shape[-2], block_size)
    common = dict(past_outputs=past_outputs, allowed=allowed, scale=scale, softcap=softcap, block_size=block_size)
    if maps is None:
        return ka_attention_mapped(query, keys, new_values, value_map, **common)
    weight, bias = maps
    return ka_attention_adapted(query, keys, new_values, weight, bias, **common)


class UncachedKA:
    """The attention of a KA layer with no KA cache: exact KA over the call's whole input."""

    def __init__(self, settings: KASettings):
        self.settings = settings

    def attend(self, query, keys, values, mask, call: AttentionCall) -> torch.Tensor:
        n_new, n_total = query.shape[-2], keys.shape[-2]
        if n_total != n_new:
            raise KAError(
                "This model runs KA attention, which needs the attention outputs of past tokens: its cache holds "
                "values instead. Pass past_key_values=ka_hf.KACache() (generate() does so by default for KA "
                "models) or use_cache=False."
            )
        allowed = allowed_from_mask(mask, n_new, n_total, call.sliding_window, query.device)
        settings = self.settings
        return ka_attention(
            query,
            keys,
            values,
            allowed=allowed,
            scale=call.scale,
            softcap=call.softcap,
            variant=settings.variant,
            dropout_p=call.dropout_p,
            block_size=settings.block_size,
            kernel=settings.kernel,
        )
