"""Attention masks: whatever format the model's attention implementation produced -> boolean "may attend".

HF hands the attention function None (causal implied, lower-right aligned), a boolean 4-D mask (sdpa: True =
attend), an additive float 4-D mask (eager: 0 or the dtype's minimum) or a 2-D padding mask (flash). The KA
kernels take one boolean form, or None for plain causal (which lets them skip masking altogether).
"""

import torch

from .errors import KAError
from .ops import causal_allowed


def allowed_from_mask(mask, n_new: int, n_total: int, sliding_window: int | None = None, device=None):
    """Boolean mask broadcastable to (B, H, n_new, n_total), or None for plain causal (lower-right aligned: the
    new tokens are the last ones)."""
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
