"""The caches on the HF Cache API whose layers compute their own attention: `KACache` and `KVWindowCache`.

Shaped like `transformers.DynamicCache`: a list of per-layer objects with a small interface (`ka_hf.layers`).
`RoutedCache` is what every such cache shares — binding to one model, the attention hook's entry point
(`attention_for`), the checks on `update`, and offloading — for `KACache`, `KVWindowCache` and
`StaticKACache` (`ka_hf.static_cache`).
"""

import functools
import operator

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, get_layer_types_and_kwargs

from .architectures import SUPPORTED_ARCHITECTURES, ModelSignature
from .errors import KAError
from .layers import KALayer, KAWindowLayer, KVWindowLayer
from .ops import DEFAULT_BLOCK_SIZE
from .settings import KASettings


def layer_windows(config) -> list[int | None]:
    """Each layer's own sliding window (None for full attention), as transformers' caches read it."""
    try:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except (AttributeError, TypeError):
        return []
    return [
        kwargs.get("sliding_window") if kind == "sliding_attention" else None
        for kind, kwargs in zip(layer_types, layer_kwargs)
    ]


class RoutedCache(Cache):
    """A cache whose layers compute their own attention (`layer.attend`), bound to the one model that fills it.

    The attention hook asks `attention_for(layer_idx, config)` at every routed attention call: the cache binds
    itself to the model and answers the layer's attention, or None for a layer that keeps standard attention (a
    `DynamicLayer`). `update` takes states only from such a call, so a model whose attention ka_hf does not route
    can never fill it. Subclasses build their layers in `_new_layer`.
    """

    builds_layers_on_bind = True  # False: the layers were built for a config at construction (StaticKACache)

    def __init__(self, layers=None, offloading: bool = False, offload_only_non_sliding: bool = False):
        self._layers_given = layers is not None
        super().__init__(layers=layers or [], offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)
        self.signature: ModelSignature | None = None
        self._bound_config = None
        self._expected_update: int | None = None  # the layer a routed attention call is about to update

    # ----- binding
    def bind(self, config) -> None:
        """Tie the cache to the first model that uses it (or to `config=`); refuse any other model afterwards —
        another shape always, and another model object (its own config object: another checkpoint, even of the
        same shape) while the cache holds states. An empty cache may be bound again."""
        if config is self._bound_config:  # every layer of every step asks: answer the common case at once
            return
        signature = ModelSignature.of(config)
        name = type(self).__name__
        if self.signature is not None and signature != self.signature:
            raise KAError(
                f"This {name} was built for another model ({self.signature}); it cannot be used with "
                f"{signature}. Create a new {name}() for each model."
            )
        if self._bound_config is not None and self.get_seq_length() > 0:
            raise KAError(
                f"This {name} holds the states of another model object (same shape, but another model or "
                f"checkpoint); it cannot be reused with this one. Create a new {name}() (or reset() it) for each model."
            )
        if self.signature is None or self.builds_layers_on_bind:
            self._check_layers_fit(signature)
            self.signature = signature
            self._build_layers(config)
        self._bound_config = config

    def _check_layers_fit(self, signature: ModelSignature) -> None:
        if self._layers_given and len(self.layers) != signature.num_layers:
            raise KAError(
                f"{type(self).__name__}(layers=...) holds {len(self.layers)} layer objects, but the model has "
                f"{signature.num_layers} layers: give one per layer"
            )

    def _build_layers(self, config) -> None:
        """All layers at once, on binding (an empty cache): at construction with `config=`, as DynamicCache does,
        else at the first forward. Given layers are kept."""
        if not self._layers_given:
            windows = layer_windows(config)
            self.layers = [
                self._new_layer(i, windows[i] if i < len(windows) else None) for i in range(self.signature.num_layers)
            ]

    def _new_layer(self, layer_idx: int, native_window: int | None):
        raise NotImplementedError

    # ----- the attention hook's entry point
    def attention_for(self, layer_idx: int, config):
        """Called by the attention hook for each routed call: bind to the model, allow this layer's one update,
        and return the layer's attention (a callable taking the attention's q, k, v, mask and `AttentionCall`), or
        None when this layer keeps the model's own attention."""
        self.bind(config)
        self._expected_update = layer_idx
        if getattr(self.layers[layer_idx], "attend", None) is None:
            return None
        return functools.partial(self.attend, layer_idx)

    def attend(self, layer_idx: int, query, keys, values, mask, call) -> torch.Tensor:
        """The layer's attention; with offloading the layer then leaves for the CPU (its outputs are stored)."""
        outputs = self.layers[layer_idx].attend(query, keys, values, mask, call)
        if self.offloading:
            self.offload(layer_idx, self.only_non_sliding)
        return outputs

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's `Cache.update`. A layer with its own attention stays on its device until that attention has run
        (it reads and writes the layer after this returns); any other layer is offloaded here, as in
        `Cache.update`."""
        if self._expected_update != layer_idx:
            raise KAError(
                f"{type(self).__name__} was updated by an attention module ka_hf does not route, so KA cannot be "
                f"computed for this model. Supported model types: {', '.join(SUPPORTED_ARCHITECTURES)}."
            )
        self._expected_update = None
        layer = self.layers[layer_idx]
        held = getattr(layer, "keys", None)  # shapes only: a static layer's length is a tensor
        if isinstance(held, torch.Tensor) and held.dim() == key_states.dim() and held.shape[-2]:
            if held.shape[0] != key_states.shape[0]:
                raise KAError(
                    f"{type(self).__name__} holds a batch of {held.shape[0]} sequences but got a batch of "
                    f"{key_states.shape[0]}; use a new {type(self).__name__} for a new batch."
                )
        if self.offloading:
            self._prefetch_after(layer_idx, key_states.device)
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        if self.offloading and getattr(layer, "attend", None) is None:
            self.offload(layer_idx, self.only_non_sliding)
        return keys, values

    def _prefetch_after(self, layer_idx: int, device: torch.device) -> None:
        """Cache.update's prefetch step: wait for the layer brought in for this step, start bringing the next."""
        if self.only_non_sliding and all(self.is_sliding):
            return  # no layer is ever offloaded (and Cache.prefetch would find none to bring back)
        if device.type == "cuda":  # the CPU has one stream: nothing to wait for
            default_stream = torch.cuda.default_stream(device)
            default_stream.wait_stream(self.prefetch_stream)
            self.prefetch_stream.wait_stream(default_stream)  # the last offload's copies must finish first
        self.prefetch(layer_idx + 1, self.only_non_sliding)


def check_window(owner: str, window, sink) -> None:
    """KAError unless `window` is a positive number of tokens (or None) and `sink` a count of first tokens kept
    beside a window, no larger than it (more sinks than window positions is a swapped pair)."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise KAError(f"{owner}(window={window!r}): use a positive number of tokens, or None for no window")
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0 or (sink and window is None):
        raise KAError(f"{owner}(sink={sink!r}): sinks are a count of first tokens kept beside a window=")
    if window is not None and sink > window:
        raise KAError(
            f"{owner}(window={window}, sink={sink}): {sink} sink tokens but a window of only {window}; the window "
            "is the recent tokens a query sees (itself included), the sinks the first ones — did you swap them?"
        )


class KACacheBase(RoutedCache):
    """What the KA caches (`KACache`, `StaticKACache`) share: one `KASettings` for every KA layer, and the
    selection of layers that run KA (`ka_layers`, None = all)."""

    settings: KASettings
    ka_layers: frozenset[int] | None = None

    # The settings' fields, read where a cache is described (reports, repr, tests).
    prefill = property(lambda self: self.settings.prefill)
    variant = property(lambda self: self.settings.variant)
    kernel = property(lambda self: self.settings.kernel)
    block_size = property(lambda self: self.settings.block_size)
    adapter = property(lambda self: self.settings.adapter)

    def is_ka_layer(self, layer_idx: int) -> bool:
        return self.ka_layers is None or layer_idx in self.ka_layers

    def _check_layers_fit(self, signature: ModelSignature) -> None:
        super()._check_layers_fit(signature)
        bad = sorted(i for i in (self.ka_layers or ()) if not 0 <= i < signature.num_layers)
        if bad and not self._layers_given:
            raise KAError(
                f"{type(self).__name__}(ka_layers=...) names layers {bad}, but the model has {signature.num_layers} "
                "layers"
            )


class KACache(KACacheBase):
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
        try:
            self.settings = KASettings(variant, kernel, block_size, prefill, adapter)
        except KAError as error:
            raise KAError(f"KACache: {error}") from None
        check_window("KACache", window, sink)
        given = _given_layers(layers, ka_layers, window)
        super().__init__(given, offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)
        self.ka_layers = _layer_indices(ka_layers) if given is None else _ka_indices(given)
        self.window, self.sink = window, sink
        if config is not None:
            self.bind(config)

    def __repr__(self):
        layers = "all" if self.ka_layers is None else sorted(self.ka_layers)
        window = "" if self.window is None else f", window={self.window}, sink={self.sink}"
        return (
            f"{type(self).__name__}(prefill={self.prefill!r}, ka_layers={layers}, variant={self.variant!r}, "
            f"kernel={self.kernel!r}{window}, seq_len={self.get_seq_length()})"
        )

    def _build_layers(self, config) -> None:
        """Given layers are kept; their KA layers learn the model's query heads, their index and the settings."""
        super()._build_layers(config)
        if self._layers_given:
            for index, layer in enumerate(self.layers):
                if isinstance(layer, KALayer):
                    layer.num_query_heads = layer.num_query_heads or self.signature.num_heads
                    layer.settings = layer.settings or self.settings
                    layer.layer_idx = index

    def _new_layer(self, layer_idx: int, native_window: int | None):
        if not self.is_ka_layer(layer_idx):
            # A KV layer keeps everything, even on a sliding-window layer: HF sizes one sliding mask for every
            # sliding layer of the cache, and the KA window layers read that mask over all positions.
            return DynamicLayer()
        common = dict(num_query_heads=self.signature.num_heads, settings=self.settings, layer_idx=layer_idx)
        windows = [w for w in (self.window, native_window) if w is not None]
        if windows:
            return KAWindowLayer(window=min(windows), sink=self.sink if self.window is not None else 0, **common)
        return KALayer(**common)


def _given_layers(layers, ka_layers, window) -> list | None:
    """HF's `layers=` (layer objects), checked; None when not given."""
    if layers is None:
        return None
    layers = list(layers)
    if not all(isinstance(item, CacheLayerMixin) for item in layers):
        kinds = sorted({type(item).__name__ for item in layers if not isinstance(item, CacheLayerMixin)})
        raise KAError(
            f"KACache(layers=...) takes cache layer objects (KALayer, DynamicLayer), got {kinds}; to choose the "
            "layers that run KA by index, use KACache(ka_layers=[...])"
        )
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


class KVWindowCache(RoutedCache):
    """The KV counterpart of `KACache(window=, sink=)` (StreamingLLM style, positions not renumbered): standard
    attention over a bounded cache of keys and *values* (per key-value head) of the first `sink` tokens and the
    last `window - 1`. Evicted tokens are simply gone. For comparisons at equal cache memory:

        model.generate(**inputs, past_key_values=ka_hf.KVWindowCache(window=1024, sink=4))
    """

    def __init__(
        self, window: int, sink: int = 0, *, config=None, offloading: bool = False, offload_only_non_sliding=False
    ):
        if window is None:
            raise KAError("KVWindowCache(window=...) needs a window: for an unbounded KV cache use DynamicCache()")
        check_window("KVWindowCache", window, sink)
        super().__init__(offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)
        self.window, self.sink = window, sink
        if config is not None:
            self.bind(config)

    def __repr__(self):
        return f"KVWindowCache(window={self.window}, sink={self.sink}, seq_len={self.get_seq_length()})"

    def _new_layer(self, layer_idx: int, native_window: int | None):
        window = min(w for w in (self.window, native_window) if w is not None)
        return KVWindowLayer(window=window, sink=self.sink)


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
