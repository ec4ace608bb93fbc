"""`KACache`: the HF Cache API holding, per KA layer, keys (kv heads) and attention outputs (query heads).

Shaped like `transformers.DynamicCache`: a list of per-layer objects with a small interface. A `KALayer` is a
`DynamicLayer` whose `values` slot holds the attention outputs A of past tokens instead of their values V, so
cropping, beam reordering and batch selection act on A as they act on V. Layers left out of `ka_layers=` are plain
`DynamicLayer`s (K, V, standard attention). Offloading (`offloading=True`) moves K and A of each layer to the CPU
once its attention has stored its outputs, and brings the next layer back ahead of time, as `DynamicCache` does.

The attention itself lives in `ka_hf.integration`; this module only stores tensors and checks that the cache is
used consistently.
"""

import operator
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, get_layer_types_and_kwargs

from .errors import KAError
from .ops import DEFAULT_BLOCK_SIZE, check_kernel, expand_kv_heads
from .route import check_routed

PREFILL_MODES = ("ka", "standard")


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


class KALayer(DynamicLayer):
    """One KA layer: `keys` (B, H_kv, T, d) and `values` = attention outputs A (B, H_q, T, d_v).

    `update(k, v)` appends the new keys, and appends the new tokens' own values (expanded to query heads) as
    placeholders in the output slots: the new token's row of attention then reads exactly [A_past; v_new], so a
    decode step is plain attention over `values`. The attention then overwrites the placeholders with the real
    outputs (`store_outputs`). With an adapter the stored outputs are f(A), which is what later tokens attend over.
    """

    holds = "outputs"  # what the value slots keep: "outputs" (A) or, in a KVWindowCache, "values" (V)

    def __init__(self, num_query_heads: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.num_query_heads = num_query_heads
        self.pending = 0  # new tokens whose output slots still hold their values
        self._key_buffer = self._value_buffer = None

    @property
    def outputs(self) -> torch.Tensor | None:
        return self.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """HF's layer signature; extra arguments (`cache_kwargs`, transformers' `kwargs=`) carry nothing KA needs."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending:
            raise KAError(
                "KACache: the previous step's attention outputs were never stored, so this model's attention did "
                "not run through ka_hf. Use a supported architecture (see ka_hf.SUPPORTED_ARCHITECTURES)."
            )
        placeholders = expand_kv_heads(value_states, self.num_query_heads or value_states.shape[1])
        self.keys, self._key_buffer = _append(self.keys, key_states, self._key_buffer)
        self.values, self._value_buffer = _append(self.values, placeholders, self._value_buffer)
        self.pending = key_states.shape[-2]
        return self.keys, self.values

    def key_positions(self) -> torch.Tensor | None:
        """Absolute positions of the rows of `keys` when they are not simply 0 .. T-1 (window layers)."""
        return None

    def past_outputs(self) -> torch.Tensor | None:
        """Outputs of the tokens cached before the pending update (None when there are none)."""
        n_past = self.values.shape[-2] - self.pending
        return self.values[..., :n_past, :] if n_past else None

    def store_outputs(self, outputs: torch.Tensor) -> None:
        """Replace the pending placeholders by the new tokens' outputs."""
        if outputs.shape[-2] != self.pending:
            raise RuntimeError(f"expected outputs for {self.pending} new tokens, got {outputs.shape[-2]}")
        n_past = self.values.shape[-2] - self.pending
        if self.holds == "values":  # the values stay; nothing to overwrite
            pass
        elif torch.is_grad_enabled() and (outputs.requires_grad or self.values.requires_grad):
            self.values = torch.cat([self.values[..., :n_past, :], outputs], dim=-2)  # keep autograd history
            self._value_buffer = None
        else:
            self.values[..., n_past:, :] = outputs  # no copy of the past: a decode step writes one row
        self.pending = 0

    def offload(self) -> None:
        """K and A (with their spare rows) to the CPU, as `DynamicLayer.offload` moves K and V."""
        if self.is_initialized:
            self._move_to("cpu", "offload")

    def prefetch(self) -> None:
        """K and A back to the layer's device ahead of their use (`DynamicLayer.prefetch`)."""
        if self.is_initialized and self.keys.device != self.device:
            self._move_to(self.device, "prefetch")

    def _move_to(self, device, what: str) -> None:
        self._check_not_pending(what)  # the attention still has to read and write this layer's A
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
            raise RuntimeError(f"KACache.{what} called between a key update and its attention outputs")


class KAWindowLayer(KALayer):
    """A KA layer with bounded memory: it keeps the (K, A) of the first `sink` tokens and of the last `window - 1`.

    A new token attends to the sinks and to the tokens less than `window` positions back, itself included (HF's
    sliding-window convention q - k < window). Evicted tokens live on only through the outputs they fed. A model's
    own sliding-window layers (Mistral, Qwen2, Gemma-2's local layers) are window layers with no sinks: for them
    this is exact and equal to keeping the whole history, as `DynamicSlidingWindowLayer` is for K, V.
    """

    is_sliding = True  # bounded, like DynamicSlidingWindowLayer (offload_only_non_sliding keeps it on its device)

    def __init__(
        self, window: int, sink: int = 0, num_query_heads: int | None = None, holds: str = "outputs", **kwargs
    ):
        super().__init__(num_query_heads=num_query_heads, **kwargs)
        self.window, self.sink, self.holds = window, sink, holds
        self.cumulative_length = 0  # tokens seen, evicted or not: positions and generate()'s cache_position
        self.positions: torch.Tensor | None = None  # absolute position of each row of keys / values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        n_new = key_states.shape[-2]
        new_positions = torch.arange(self.cumulative_length, self.cumulative_length + n_new, device=keys.device)
        self.positions = new_positions if self.positions is None else torch.cat([self.positions, new_positions])
        self.cumulative_length += n_new
        return keys, values

    def key_positions(self) -> torch.Tensor | None:
        return self.positions

    def store_outputs(self, outputs: torch.Tensor) -> None:
        super().store_outputs(outputs)
        self._evict()

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
        # HF builds the mask over every position seen (padding included); the attention keeps the kept columns.
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return self.sink + self.window

    def reset(self) -> None:
        self.cumulative_length = 0
        self.positions = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if self.positions is not None and self.positions.numel() < self.cumulative_length:
            raise KAError("a windowed KACache cannot be cropped once it has evicted tokens")
        super().crop(tokens_to_remove)
        self.cumulative_length = self.keys.shape[-2] if self.keys is not None and self.keys.dim() > 1 else 0
        if self.positions is not None:
            self.positions = self.positions[: self.cumulative_length]


@dataclass(frozen=True)
class ModelSignature:
    """What a cache must agree on with the model that fills it."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int

    @classmethod
    def of(cls, config) -> "ModelSignature":
        num_heads = config.num_attention_heads
        return cls(
            model_type=getattr(config, "model_type", "?"),
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,  # = ka_hf.config.num_kv_heads
        )


class KACache(Cache):
    """A cache of keys and attention outputs (K, A) for exact KA inference with any supported HF model.

        model.generate(**inputs, cache=KACache(config=model.config))    # or KACache(): layers made on first use

    Args:
        config: the model's config (as for `DynamicCache(config=...)`): the layers are built up front — KA layers,
            KV layers for the layers left out of `ka_layers`, window layers for the model's own sliding-window
            layers — and the cache is bound to that model. Without it the same layers are made at the first
            forward.
        prefill: "ka" (default) computes the prompt with exact KA (parallel solve); "standard" computes it with
            standard attention and caches its outputs as A, then generates with KA (the ka-hybrid mode).
        ka_layers: indices of the layers that use KA (None = all). The others keep K, V and standard attention.
        adapter: optional plan-1 adapter: an object with `map_outputs(layer_idx, outputs) -> outputs'`; cached
            outputs are mapped by it where they serve as values.
        variant: "ka" (exact KA, KA-SPEC §2) or "plan2" (the original project's plan 2; see docs/plan2.md:
            every output collapses to the first token's value).
        block_size: tokens per block when a long prompt is prefilled.
        kernel: how a multi-token chunk is computed: "auto" (default: "blocked" where it applies, O(T) memory),
            "blocked", "parallel" (explicit weights) or "loop" (the token-by-token reference). See ka_hf.ops.kernels.
        window, sink: bounded memory. Each KA layer keeps the (K, A) of the first `sink` tokens and the last
            `window - 1`; a token attends to the sinks and to the tokens less than `window` positions back (itself
            included). None (default) keeps everything. A model's own sliding-window layers always keep only their
            window (that is exact).
        layers: HF's `Cache(layers=...)`: ready-made layer objects, one per model layer (`KALayer` for KA,
            `DynamicLayer` for standard attention). Instead of `ka_layers`, `window` and `config`'s layer types.
        offloading, offload_only_non_sliding: as in `DynamicCache`: keep each layer's K and A on the CPU except
            while its attention runs, prefetching the next layer (on CUDA, on a side stream).
    """

    attends_values = False  # a KVWindowCache runs standard attention over its cached values

    def __init__(
        self,
        config=None,
        *,
        prefill: str = "ka",
        ka_layers=None,
        adapter=None,
        variant: str = "ka",
        block_size: int | None = DEFAULT_BLOCK_SIZE,
        kernel: str = "auto",
        window: int | None = None,
        sink: int = 0,
        layers: list | None = None,
        offloading: bool = False,
        offload_only_non_sliding: bool = False,
    ):
        if prefill not in PREFILL_MODES:
            raise KAError(f"KACache(prefill={prefill!r}): use one of {PREFILL_MODES}")
        try:
            check_kernel(kernel, variant, block_size)
        except ValueError as error:
            raise KAError(f"KACache: {error}") from None
        if window is not None and (not isinstance(window, int) or window < 1):
            raise KAError(f"KACache(window={window!r}): use a positive number of tokens, or None for no window")
        if not isinstance(sink, int) or sink < 0 or (sink and window is None):
            raise KAError(f"KACache(sink={sink!r}): sinks are a count of first tokens kept beside a window=")
        given = _given_layers(layers, ka_layers, window)
        super().__init__(layers=given or [], offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)
        self.prefill = prefill
        self.ka_layers = _layer_indices(ka_layers) if given is None else _ka_indices(given)
        self.adapter = adapter
        self.variant = variant
        self.block_size = block_size
        self.kernel = kernel
        self.window, self.sink = window, sink
        self.signature: ModelSignature | None = None
        self._bound_config = None
        self._native_windows: list[int | None] = []
        self._layers_given = given is not None
        if config is not None:
            self.bind(config)

    def __repr__(self):
        layers = "all" if self.ka_layers is None else sorted(self.ka_layers)
        window = "" if self.window is None else f", window={self.window}, sink={self.sink}"
        return (
            f"{type(self).__name__}(prefill={self.prefill!r}, ka_layers={layers}, variant={self.variant!r}, "
            f"kernel={self.kernel!r}{window}, seq_len={self.get_seq_length()})"
        )

    def is_ka_layer(self, layer_idx: int) -> bool:
        return self.ka_layers is None or layer_idx in self.ka_layers

    def bind(self, config) -> None:
        """Tie the cache to the first model that uses it (or to `config=`); refuse any other model afterwards —
        another shape always, and another model object (its own config object: another checkpoint, even of the
        same shape) while the cache holds states. An empty cache may be bound again."""
        if config is self._bound_config:  # every layer of every step asks: answer the common case at once
            return
        signature = ModelSignature.of(config)
        if self.signature is not None and signature == self.signature:
            if self.get_seq_length() > 0:
                raise KAError(
                    "This KACache holds the states of another model object (same shape, but another model or "
                    "checkpoint); it cannot be reused with this one. Create a new KACache() for each model."
                )
            self.signature = None  # empty: bind again to this model
        if self.signature is None:
            self._check_layers_fit(signature)
            self.signature = signature
            self._bound_config = config
            self._native_windows = _native_windows(config)
            self._build_layers()
        elif signature != self.signature:
            raise KAError(
                f"This KACache holds the states of another model ({self.signature}); it cannot be reused with "
                f"{signature}. Create a new KACache() for each model."
            )

    def _check_layers_fit(self, signature: "ModelSignature") -> None:
        bad = sorted(i for i in (self.ka_layers or ()) if not 0 <= i < signature.num_layers)
        if bad and not self._layers_given:
            raise KAError(f"KACache(ka_layers=...) names layers {bad}, but the model has {signature.num_layers} layers")
        if self._layers_given and len(self.layers) != signature.num_layers:
            raise KAError(
                f"KACache(layers=...) holds {len(self.layers)} layer objects, but the model has "
                f"{signature.num_layers} layers: give one per layer"
            )

    def _build_layers(self) -> None:
        """All layers at once, on binding (an empty cache): at construction with `config=`, as DynamicCache does,
        else at the first forward. Given layers are kept; their KA layers learn the model's query heads."""
        if self._layers_given:
            for layer in self.layers:
                if isinstance(layer, KALayer) and layer.num_query_heads is None:
                    layer.num_query_heads = self.signature.num_heads
        else:
            self.layers = [self._new_layer(i) for i in range(self.signature.num_layers)]

    def _new_layer(self, layer_idx: int):
        if not self.is_ka_layer(layer_idx):
            # A KV layer keeps everything, even on a sliding-window layer: HF sizes one sliding mask for every
            # sliding layer of the cache, and the KA window layers read that mask over all positions.
            return DynamicLayer()
        native = self._native_windows[layer_idx] if layer_idx < len(self._native_windows) else None
        windows = [w for w in (self.window, native) if w is not None]
        if windows:
            sink = self.sink if self.window is not None else 0
            return KAWindowLayer(window=min(windows), sink=sink, num_query_heads=self.signature.num_heads)
        return KALayer(num_query_heads=self.signature.num_heads)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's `Cache.update`. A KA layer stays on its device until `store_outputs` (its attention reads and
        writes A after this returns); any other layer is offloaded here, as in `Cache.update`."""
        check_routed(self, layer_idx)  # a routed call has bound the cache, so its layers exist
        layer = self.layers[layer_idx]
        cached = layer.get_seq_length()
        if cached and layer.keys.shape[0] != key_states.shape[0]:
            raise KAError(
                f"KACache holds a batch of {layer.keys.shape[0]} sequences but got a batch of {key_states.shape[0]}; "
                "use a new KACache for a new batch."
            )
        if self.offloading:
            self._prefetch_after(layer_idx, key_states.device)
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        if self.offloading and not isinstance(layer, KALayer):
            self.offload(layer_idx, self.only_non_sliding)
        return keys, values

    def store_outputs(self, layer_idx: int, outputs: torch.Tensor) -> None:
        """The attention's outputs for the tokens of the last update of `layer_idx`; then the layer may leave."""
        self.layers[layer_idx].store_outputs(outputs)
        if self.offloading:
            self.offload(layer_idx, self.only_non_sliding)

    def _prefetch_after(self, layer_idx: int, device: torch.device) -> None:
        """Cache.update's prefetch step: wait for the layer brought in for this step, start bringing the next."""
        if self.only_non_sliding and all(self.is_sliding):
            return  # no layer is ever offloaded (and Cache.prefetch would find none to bring back)
        if device.type == "cuda":  # the CPU has one stream: nothing to wait for
            default_stream = torch.cuda.default_stream(device)
            default_stream.wait_stream(self.prefetch_stream)
            self.prefetch_stream.wait_stream(default_stream)  # the last offload's copies must finish first
        self.prefetch(layer_idx + 1, self.only_non_sliding)


def _given_layers(layers, ka_layers, window) -> list | None:
    """HF's `layers=` (layer objects), checked; None when not given. Integers are the old KA-layer selection."""
    if layers is None:
        return None
    layers = list(layers)
    if any(_is_index(item) for item in layers):
        raise KAError(
            "KACache(layers=...) takes cache layer objects, as transformers' Cache(layers=...) does; to choose the "
            f"layers that run KA by index, use KACache(ka_layers={layers!r})"
        )
    if not all(isinstance(item, CacheLayerMixin) for item in layers):
        kinds = sorted({type(item).__name__ for item in layers if not isinstance(item, CacheLayerMixin)})
        raise KAError(f"KACache(layers=...) takes cache layer objects (KALayer, DynamicLayer), got {kinds}")
    if ka_layers is not None or window is not None:
        raise KAError("KACache: give either layers= (ready-made layer objects) or ka_layers=/window=, not both")
    return layers


def _is_index(item) -> bool:
    try:
        operator.index(item)
    except TypeError:
        return False
    return True


def _layer_indices(ka_layers) -> frozenset[int] | None:
    if ka_layers is None:
        return None
    if isinstance(ka_layers, (str, bytes)) or not all(_is_index(i) for i in ka_layers):
        raise KAError(f"KACache(ka_layers={ka_layers!r}): use layer indices (ints), or None for every layer")
    return frozenset(operator.index(i) for i in ka_layers)


def _ka_indices(layers: list) -> frozenset[int]:
    """The KA layers of a ready-made list: the ones that hold outputs."""
    return frozenset(i for i, layer in enumerate(layers) if isinstance(layer, KALayer))


class KVWindowCache(KACache):
    """The KV counterpart of `KACache(window=, sink=)` (StreamingLLM style, positions not renumbered): standard
    attention over a bounded cache of keys and *values* (per key-value head) of the first `sink` tokens and the
    last `window - 1`. Evicted tokens are simply gone. For comparisons at equal cache memory:

        model.generate(**inputs, past_key_values=ka_hf.KVWindowCache(window=1024, sink=4))
    """

    attends_values = True

    def __init__(
        self, window: int, sink: int = 0, *, config=None, offloading: bool = False, offload_only_non_sliding=False
    ):
        if window is None:
            raise KAError("KVWindowCache(window=...) needs a window: for an unbounded KV cache use DynamicCache()")
        super().__init__(
            config,
            window=window,
            sink=sink,
            offloading=offloading,
            offload_only_non_sliding=offload_only_non_sliding,
        )

    def __repr__(self):
        return f"KVWindowCache(window={self.window}, sink={self.sink}, seq_len={self.get_seq_length()})"

    def _new_layer(self, layer_idx: int):
        native = self._native_windows[layer_idx] if layer_idx < len(self._native_windows) else None
        return KAWindowLayer(
            window=min(w for w in (self.window, native) if w is not None), sink=self.sink, holds="values"
        )


def _native_windows(config) -> list[int | None]:
    """Each layer's own sliding window (None for full attention), as transformers' caches read it."""
    try:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except (AttributeError, TypeError):
        return []
    return [
        kwargs.get("sliding_window") if kind == "sliding_attention" else None
        for kind, kwargs in zip(layer_types, layer_kwargs)
    ]


def cache_nbytes(cache) -> int:
    """Bytes of memory a cache's tensors hold (keys + values for a DynamicCache, keys + outputs for a KACache),
    counting each allocation once and in full: a growing KACache's spare rows count too."""
    storages = {}
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
