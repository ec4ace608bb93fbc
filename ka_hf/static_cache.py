"""`StaticKACache`: a KA cache of fixed shapes, for `torch.compile` (HF's `StaticCache`, holding (K, A)).

Each KA layer allocates its buffers once, at the first update: keys (B, H_kv, L, d_k) and attention outputs
(B, H_q, L, d_v), L = `max_cache_len`, slot i = absolute position i. New tokens are written in place at their
positions (`index_copy_`), their values first as placeholders, then their outputs (`store_outputs`), as in a
`KALayer`. A decode step (one token after a past) reads the whole buffers with the unwritten slots masked, so
every step has the same shapes and one compiled graph serves them all; a prompt chunk reads the written prefix,
exactly as a `KACache` does (its parallel kernels expect the new tokens last).

A model's own sliding-window layers keep all L slots here and apply their window by masking: exact, but without
the memory bound a `KACache` gives them. Layers left out of `ka_layers=` are HF `StaticLayer`s (K, V, standard
attention over the same L slots).
"""

import torch
from transformers.cache_utils import StaticLayer

from .architectures import ModelSignature
from .attention import AttentionCall, ka_chunk_outputs
from .cache import KACacheBase
from .errors import KAError
from .layers import check_attention_ran
from .masks import allowed_from_mask
from .ops import DEFAULT_BLOCK_SIZE, expand_kv_heads
from .settings import DEFAULT_SETTINGS, KASettings


class StaticKALayer(StaticLayer):
    """One KA layer of fixed size: `keys` (B, H_kv, L, d_k), `values` = attention outputs A (B, H_q, L, d_v)."""

    def __init__(
        self,
        max_cache_len: int,
        num_query_heads: int,
        sliding_window: int | None = None,
        settings: KASettings | None = None,
        layer_idx: int | None = None,
    ):
        super().__init__(max_cache_len=max_cache_len)
        self.num_query_heads = num_query_heads
        self.sliding_window = sliding_window  # the model's own window for this layer (None: full attention)
        self.settings, self.layer_idx = settings, layer_idx
        self.n_cached = 0  # tokens written, as a Python int: the overflow check and a prompt's slices
        self.pending = 0  # new tokens whose output slots still hold their values
        self._new_slots: torch.Tensor | None = None  # positions of the pending tokens

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        # HF's StaticLayer sizes values by the key heads; A has one row per query head.
        self.values = self.values.new_zeros(
            self.batch_size, self.num_query_heads, self.max_cache_len, self.values.shape[-1]
        )
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_fits(key_states)
        n_new = key_states.shape[-2]
        slots = torch.arange(n_new, device=self.device) + self.cumulative_length
        self.keys.index_copy_(2, slots, key_states)
        # Placeholders: the new tokens' own values, per query head, so a decode step reads [A_past; v_new].
        self.values.index_copy_(2, slots, expand_kv_heads(value_states, self.num_query_heads))
        self.cumulative_length.add_(n_new)
        self.n_cached += n_new
        self.pending, self._new_slots = n_new, slots
        return self.keys, self.values

    def _check_fits(self, key_states: torch.Tensor) -> None:
        check_attention_ran(self, "StaticKACache")
        n_new = key_states.shape[-2]
        if self.n_cached + n_new > self.max_cache_len:
            raise KAError(
                f"StaticKACache(max_cache_len={self.max_cache_len}) is full: it holds {self.n_cached} tokens and "
                f"got {n_new} more. Create it with max_cache_len >= prompt length + max_new_tokens."
            )

    def is_fixed_shape_step(self) -> bool:
        """True for a decode step (one new token after a past): the attention reads all L slots, the unwritten
        ones masked. A prompt chunk reads the written prefix instead."""
        return self.pending == 1 and self.n_cached > 1

    def visible_slots(self) -> torch.Tensor:
        """Boolean (1, 1, 1, L): the slots a decode step's token may see — the written ones, within this layer's own
        window. Built from the position tensor, not a Python int, so a compiled step keeps its graph."""
        slots = torch.arange(self.max_cache_len, device=self.device)
        position = self.cumulative_length - 1  # the new token's
        visible = slots <= position
        if self.sliding_window is not None:  # HF's convention: q - k < window
            visible = visible & (slots > position - self.sliding_window)
        return visible[None, None, None, :]

    def attend(self, query, keys, values, mask, call: AttentionCall) -> torch.Tensor:
        """The KA outputs of the pending tokens, written in place. A prompt chunk reads the written prefix, the new
        tokens last, as a KACache holds them. A decode step reads all max_cache_len slots, the unwritten ones (and
        those outside the layer's own window) masked: the same shapes every step, so one compiled graph serves all."""
        n_new = query.shape[-2]
        if self.is_fixed_shape_step():
            # No sliding_window here: a missing mask would mean "the new token is the last slot"; the layer knows.
            allowed = allowed_from_mask(mask, n_new, keys.shape[-2], None, query.device)
            visible = self.visible_slots()
            allowed = visible if allowed is None else allowed & visible
        else:
            n_total = self.n_cached
            allowed = allowed_from_mask(mask, n_new, n_total, call.sliding_window, query.device)
            keys, values = keys[..., :n_total, :], values[..., :n_total, :]
        settings = self.settings or DEFAULT_SETTINGS
        outputs = ka_chunk_outputs(settings, self.layer_idx, query, keys, values, self.past_outputs(), allowed, call)
        adapter = settings.adapter
        self.store_outputs(outputs if adapter is None else adapter.map_outputs(self.layer_idx, outputs))
        return outputs

    def past_outputs(self) -> torch.Tensor | None:
        """Outputs of the tokens cached before the pending update (None when there are none)."""
        n_past = self.n_cached - self.pending
        return self.values[..., :n_past, :] if n_past else None

    def store_outputs(self, outputs: torch.Tensor) -> None:
        """Write the pending tokens' outputs over their placeholders, in place."""
        if outputs.shape[-2] != self.pending:
            raise RuntimeError(f"expected outputs for {self.pending} new tokens, got {outputs.shape[-2]}")
        self.values.index_copy_(2, self._new_slots, outputs.to(self.values.dtype))
        self.pending, self._new_slots = 0, None

    def crop(self, tokens_to_remove: int) -> None:
        if self.pending:
            raise RuntimeError("StaticKACache.crop called between a key update and its outputs")
        super().crop(tokens_to_remove)  # HF's static convention: a negative count of tokens to drop
        self.n_cached -= abs(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self.n_cached = self.pending = 0
        self._new_slots = None


class StaticKACache(KACacheBase):
    """A KA cache of fixed shapes (keys and attention outputs), for `torch.compile` and compiled `generate()`.

        cache = ka_hf.StaticKACache(config=model.config, max_cache_len=prompt_len + max_new_tokens)
        model.generate(**inputs, past_key_values=cache, max_new_tokens=max_new_tokens)

    Equal to `KACache` (exact KA); each layer allocates (K, A) for `max_cache_len` tokens at its first update, and
    a decode step reads and writes those buffers in place, so its shapes never change.

    Args:
        config: the model's config (its layers, heads and own sliding windows).
        max_cache_len: tokens the cache holds (prompt + generated); more raise a KAError.
        ka_layers: indices of the layers that use KA (None = all). The others keep K, V and standard attention.
        prefill: "ka" (default) or "standard" (the ka-hybrid mode), as in `KACache`.
        adapter: an optional plan-1 adapter, as in `KACache`.
        kernel, block_size: how a prompt chunk is computed ("auto", "blocked" or "parallel"), as in `KACache`.
            The token loop (the reference) is `KACache(kernel="loop")`.
    """

    builds_layers_on_bind = False  # built for `config` at construction; a forward only checks the model

    def __init__(
        self,
        config,
        max_cache_len: int,
        ka_layers=None,
        prefill: str = "ka",
        adapter=None,
        kernel: str = "auto",
        block_size: int | None = DEFAULT_BLOCK_SIZE,
    ):
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise KAError(f"StaticKACache(max_cache_len={max_cache_len!r}): use a positive number of tokens")
        if kernel == "loop":
            raise KAError("StaticKACache(kernel='loop'): the token loop is the reference; use KACache(kernel='loop')")
        try:  # plan 2 is a KACache(variant="plan2") feature
            self.settings = KASettings("ka", kernel, block_size, prefill, adapter)
        except KAError as error:
            raise KAError(f"StaticKACache: {error}") from None
        super().__init__()
        self.ka_layers = None if ka_layers is None else frozenset(int(i) for i in ka_layers)
        self.max_cache_len = max_cache_len
        self.signature = ModelSignature.of(config)
        self._check_layers_fit(self.signature)
        self._build_layers(config)

    def _new_layer(self, layer_idx: int, native_window: int | None):
        if self.is_ka_layer(layer_idx):
            return StaticKALayer(
                self.max_cache_len, self.signature.num_heads, native_window, settings=self.settings, layer_idx=layer_idx
            )
        # Standard attention over all L slots under HF's mask (its window included): exact for sliding layers too.
        return StaticLayer(max_cache_len=self.max_cache_len)

    def __repr__(self):
        layers = "all" if self.ka_layers is None else sorted(self.ka_layers)
        return (
            f"StaticKACache(max_cache_len={self.max_cache_len}, ka_layers={layers}, prefill={self.prefill!r}, "
            f"kernel={self.kernel!r}, seq_len={int(self.get_seq_length())})"
        )
