"""The cache layers that compute their own attention, on HF's `DynamicLayer`.

Each layer kind owns three things: its storage, its mask geometry (which columns of HF's mask it reads) and its
attention, through one method, `attend(query, keys, values, mask, call)`, which the attention hook
(`ka_hf.integration`) hands every routed call. `call` holds what the model's attention passed in (scale,
softcap, dropout, its own sliding window).

- `KALayer`: keys (kv heads) and attention outputs A (query heads) of every past token; exact KA.
- `KAWindowLayer`: the same for the first `sink` tokens and the last `window - 1` (bounded memory), and for a
  model's own sliding-window layers (exact there).
- `KVWindowLayer`: keys and *values* of the first `sink` and last `window - 1` tokens, standard attention over
  them (StreamingLLM style): the KV counterpart at equal memory.

Layers left out of a `KACache(ka_layers=...)` are plain `DynamicLayer`s, which have no `attend`: the model's own
attention runs for them.
"""

import torch
from transformers.cache_utils import DynamicLayer

from .attention import AttentionCall, ka_chunk_outputs
from .errors import KAError
from .masks import allowed_from_mask, window_allowed
from .ops import expand_kv_heads, standard_attention
from .settings import DEFAULT_SETTINGS, KASettings


def _append(current: torch.Tensor, new: torch.Tensor, buffer: torch.Tensor | None):
    """(current ++ new along the sequence, the buffer that holds it).

    When `current` is the prefix view of `buffer` and the buffer has room, `new` is written in place: a decode step
    copies one row, not the whole cache (DynamicLayer's torch.cat copies everything every step). Otherwise a new
    buffer is made: exactly sized for a prompt, with 25% headroom for decoding. Under autograd it is a plain cat.
    """
    if torch.is_grad_enabled() and (current.requires_grad or new.requires_grad):
        return torch.cat([current, new], dim=-2), None
    length = current.shape[-2] if current.dim() == new.dim() else 0  # a fresh layer holds a 1-D empty tensor
    n_new = new.shape[-2]
    fits = (
        buffer is not None
        and length > 0
        and current.data_ptr() == buffer.data_ptr()
        and current.stride() == buffer.stride()
        and current.shape[:-2] == new.shape[:-2]
        and length + n_new <= buffer.shape[-2]
        and buffer.dtype == new.dtype
    )
    if not fits:
        headroom = 0 if n_new > 1 else max(16, length // 4)
        buffer = new.new_empty(*new.shape[:-2], length + n_new + headroom, new.shape[-1])
        if length:
            buffer[..., :length, :] = current
    buffer[..., length : length + n_new, :] = new
    return buffer[..., : length + n_new, :], buffer


def _keep_rows(tensor: torch.Tensor, buffer: torch.Tensor | None, head: int, tail: int) -> torch.Tensor:
    """The first `head` and the last `tail` rows of `tensor`. When `tensor` is the prefix view of a growing buffer
    not much larger than what is kept (a decode step), the tail is moved down in place, so the next append writes
    one row instead of reallocating; otherwise (after a long prompt) the kept rows get a compact tensor of their own
    and the large one is freed."""
    n_rows = tensor.shape[-2]
    in_place = buffer is not None and buffer.shape[-2] <= 2 * (head + tail)
    if in_place and tensor.data_ptr() == buffer.data_ptr() and tensor.stride() == buffer.stride():
        buffer[..., head : head + tail, :] = tensor[..., n_rows - tail :, :].clone()  # clone: the ranges overlap
        return buffer[..., : head + tail, :]
    return torch.cat([tensor[..., :head, :], tensor[..., n_rows - tail :, :]], dim=-2)


def _moved(tensor: torch.Tensor, buffer: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(`tensor` on `device`, its growth buffer there): a tensor that is the prefix view of its buffer moves with the
    buffer, so appending after a move still writes in place; any other tensor moves alone and loses its buffer."""
    if buffer is not None and tensor.data_ptr() == buffer.data_ptr() and tensor.stride() == buffer.stride():
        buffer = buffer.to(device, non_blocking=True)
        return buffer[..., : tensor.shape[-2], :], buffer
    return tensor.to(device, non_blocking=True), None


def check_attention_ran(layer, cache_name: str) -> None:
    """A layer's previous update must have been followed by its attention (else the model's attention did not run
    through ka_hf, and the layer holds values where outputs belong)."""
    if layer.pending:
        raise KAError(
            f"{cache_name}: the previous step's attention outputs were never stored, so this model's attention did "
            "not run through ka_hf. Use a supported architecture (see ka_hf.SUPPORTED_ARCHITECTURES)."
        )


class _GrowingLayer(DynamicLayer):
    """Keys and value slots appended in place (`_append`); the last update's `pending` tokens await `attend`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pending = 0
        self._key_buffer = self._value_buffer = None

    def _value_slots(self, value_states: torch.Tensor) -> torch.Tensor:
        return value_states

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """HF's layer signature; extra arguments (`cache_kwargs`, transformers' `kwargs=`) carry nothing KA needs."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        check_attention_ran(self, "KACache")
        self.keys, self._key_buffer = _append(self.keys, key_states, self._key_buffer)
        self.values, self._value_buffer = _append(self.values, self._value_slots(value_states), self._value_buffer)
        self.pending = key_states.shape[-2]
        return self.keys, self.values

    def offload(self) -> None:
        """K and the value slots (with their spare rows) to the CPU, as `DynamicLayer.offload` moves K and V."""
        if self.is_initialized:
            self._move_to("cpu", "offload")

    def prefetch(self) -> None:
        """Back to the layer's device ahead of their use (`DynamicLayer.prefetch`)."""
        if self.is_initialized and self.keys.device != self.device:
            self._move_to(self.device, "prefetch")

    def _move_to(self, device, what: str) -> None:
        self._check_not_pending(what)  # the attention still has to read (and write) this layer
        self.keys, self._key_buffer = _moved(self.keys, self._key_buffer, device)
        self.values, self._value_buffer = _moved(self.values, self._value_buffer, device)

    def reset(self) -> None:
        self.pending = 0
        self._key_buffer = self._value_buffer = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        self._check_not_pending("crop")
        super().crop(tokens_to_remove)  # keys, values stay prefix views of their buffers: appending reuses them

    # Beam search and batch edits make new tensors: drop the old buffers so they do not hold memory.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._check_not_pending("reorder_cache")
        super().reorder_cache(beam_idx)
        self._key_buffer = self._value_buffer = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._check_not_pending("batch_repeat_interleave")
        super().batch_repeat_interleave(repeats)
        self._key_buffer = self._value_buffer = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._check_not_pending("batch_select_indices")
        super().batch_select_indices(indices)
        self._key_buffer = self._value_buffer = None

    def _check_not_pending(self, what: str) -> None:
        if self.pending:
            raise RuntimeError(f"KACache.{what} called between a key update and its attention")


class KALayer(_GrowingLayer):
    """One KA layer: `keys` (B, H_kv, T, d) and `values` = attention outputs A (B, H_q, T, d_v).

    `update(k, v)` appends the new keys, and appends the new tokens' own values (expanded to query heads) as
    placeholders in the output slots: the new token's row of attention then reads exactly [A_past; v_new], so a
    decode step is plain attention over `values`. `attend` computes the outputs and writes them over the
    placeholders (`store_outputs`). With an adapter the stored outputs are f(A), which later tokens attend over.

    settings: how the attention is computed (`KASettings`; a `KACache` gives its layers its own). layer_idx: the
    model layer (an adapter maps each layer's outputs with its own f). Both are set by the cache that holds it.
    """

    def __init__(
        self,
        num_query_heads: int | None = None,
        settings: KASettings | None = None,
        layer_idx: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_query_heads = num_query_heads
        self.settings = settings
        self.layer_idx = layer_idx

    @property
    def outputs(self) -> torch.Tensor | None:
        return self.values

    def _value_slots(self, value_states: torch.Tensor) -> torch.Tensor:
        return expand_kv_heads(value_states, self.num_query_heads or value_states.shape[1])

    def allowed(self, mask, n_new: int, n_total: int, call: AttentionCall, device) -> torch.Tensor | None:
        """This layer's mask geometry: HF's mask covers every cached row, the new tokens last."""
        return allowed_from_mask(mask, n_new, n_total, call.sliding_window, device)

    def attend(self, query, keys, values, mask, call: AttentionCall) -> torch.Tensor:
        """The KA outputs (B, H_q, n, d_v) of the last update's tokens, stored as this layer's A."""
        settings = self.settings or DEFAULT_SETTINGS
        allowed = self.allowed(mask, query.shape[-2], keys.shape[-2], call, query.device)
        outputs = ka_chunk_outputs(settings, self.layer_idx, query, keys, values, self.past_outputs(), allowed, call)
        adapter = settings.adapter
        self.store_outputs(outputs if adapter is None else adapter.map_outputs(self.layer_idx, outputs))
        return outputs

    def past_outputs(self) -> torch.Tensor | None:
        """Outputs of the tokens cached before the pending update (None when there are none)."""
        n_past = self.values.shape[-2] - self.pending
        return self.values[..., :n_past, :] if n_past else None

    def store_outputs(self, outputs: torch.Tensor) -> None:
        """Replace the pending placeholders by the new tokens' outputs."""
        if outputs.shape[-2] != self.pending:
            raise RuntimeError(f"expected outputs for {self.pending} new tokens, got {outputs.shape[-2]}")
        n_past = self.values.shape[-2] - self.pending
        if torch.is_grad_enabled() and (outputs.requires_grad or self.values.requires_grad):
            self.values = torch.cat([self.values[..., :n_past, :], outputs], dim=-2)  # keep autograd history
            self._value_buffer = None
        else:
            self.values[..., n_past:, :] = outputs  # no copy of the past: a decode step writes one row
        self.pending = 0


class _WindowRows:
    """The bookkeeping of a layer that keeps the rows of the first `sink` tokens and of the last `window - 1`.

    A new token attends to the sinks and to the tokens less than `window` positions back, itself included (HF's
    sliding-window convention q - k < window). Rows are evicted after each attention. The mask geometry: HF sizes
    the mask over every position seen (`get_mask_sizes`), and `allowed` keeps the kept rows' columns — the sinks
    are not the last window, so HF's kv_offset (one contiguous range) cannot describe them.
    """

    is_sliding = True  # bounded, like DynamicSlidingWindowLayer (offload_only_non_sliding keeps it on its device)

    def __init__(self, window: int, sink: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.window, self.sink = window, sink
        self.cumulative_length = 0  # tokens seen, evicted or not: positions and generate()'s cache_position
        self.positions: torch.Tensor | None = None  # absolute position of each row of keys / values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        n_new = key_states.shape[-2]
        new_positions = torch.arange(self.cumulative_length, self.cumulative_length + n_new, device=keys.device)
        self.positions = new_positions if self.positions is None else torch.cat([self.positions, new_positions])
        self.cumulative_length += n_new
        return keys, values

    def allowed(self, mask, n_new: int, n_total: int, call: AttentionCall, device) -> torch.Tensor:
        return window_allowed(
            mask, self.positions, self.cumulative_length, n_new, self.window, self.sink, call.sliding_window, device
        )

    def _evict(self) -> None:
        """Keep the sinks (always the first rows) and the last window - 1 rows."""
        n_rows = self.positions.numel()
        n_sinks = min(self.sink, self.cumulative_length)  # positions 0 .. sink-1, never evicted
        tail = self.window - 1
        if n_rows <= n_sinks + tail:
            return
        self.keys = _keep_rows(self.keys, self._key_buffer, n_sinks, tail)
        self.values = _keep_rows(self.values, self._value_buffer, n_sinks, tail)
        self.positions = torch.cat([self.positions[:n_sinks], self.positions[n_rows - tail :]])

    @property
    def is_croppable(self) -> bool:
        """crop can restore any earlier state only until the window has evicted a token."""
        return self.positions is None or self.positions.numel() == self.cumulative_length

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return self.sink + self.window

    def reset(self) -> None:
        self.cumulative_length = 0
        self.positions = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_croppable:
            raise KAError("a windowed cache cannot be cropped once it has evicted tokens")
        super().crop(tokens_to_remove)
        self.cumulative_length = self.keys.shape[-2] if self.keys is not None and self.keys.dim() > 1 else 0
        if self.positions is not None:
            self.positions = self.positions[: self.cumulative_length]


class KAWindowLayer(_WindowRows, KALayer):
    """A KA layer with bounded memory: the (K, A) of the first `sink` tokens and of the last `window - 1`. Evicted
    tokens live on only through the outputs they fed. A model's own sliding-window layers (Mistral, Qwen2,
    Gemma-2's local layers) are window layers with no sinks: for them this is exact and equal to keeping the whole
    history, as `DynamicSlidingWindowLayer` is for K, V."""

    def store_outputs(self, outputs: torch.Tensor) -> None:
        super().store_outputs(outputs)
        self._evict()


class KVWindowLayer(_WindowRows, _GrowingLayer):
    """Standard attention over the keys and values (per kv head) of the first `sink` tokens and the last
    `window - 1`; evicted tokens are simply gone."""

    def attend(self, query, keys, values, mask, call: AttentionCall) -> torch.Tensor:
        allowed = self.allowed(mask, query.shape[-2], keys.shape[-2], call, query.device)
        outputs = standard_attention(query, keys, values, allowed, call.scale, call.softcap)
        self.pending = 0
        self._evict()
        return outputs
