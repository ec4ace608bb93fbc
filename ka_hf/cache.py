"""`KACache`: the HF Cache API holding, per KA layer, keys (kv heads) and attention outputs (query heads).

Shaped like `transformers.DynamicCache`: a list of per-layer objects with a small interface. A `KALayer` is a
`DynamicLayer` whose `values` slot holds the attention outputs A of past tokens instead of their values V, so
cropping, beam reordering, batch selection and offloading work unchanged. Layers left out of `layers=` are plain
`DynamicLayer`s (K, V, standard attention).

The attention itself lives in `ka_hf.integration`; this module only stores tensors and checks that the cache is
used consistently.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .errors import KAError

PREFILL_MODES = ("ka", "standard")
VARIANTS = ("ka", "plan2")


class KALayer(DynamicLayer):
    """One KA layer: `keys` (B, H_kv, T, d) and `values` = attention outputs A (B, H_q, T, d_v).

    `update(k, v)` appends the new keys, and appends the new tokens' own values (expanded to query heads) as
    placeholders in the output slots: the new token's row of attention then reads exactly [A_past; v_new], so a
    decode step is plain attention over `values`. The attention then overwrites the placeholders with the real
    outputs (`store_outputs`). With an adapter the stored outputs are f(A), which is what later tokens attend over.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pending = 0  # new tokens whose output slots still hold their values

    @property
    def outputs(self) -> torch.Tensor | None:
        return self.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, num_query_heads: int | None = None,
               *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending:
            raise KAError(
                "KACache: the previous step's attention outputs were never stored, so this model's attention did "
                "not run through ka_hf. Use a supported architecture (see ka_hf.SUPPORTED_ARCHITECTURES)."
            )
        group = (num_query_heads or value_states.shape[1]) // value_states.shape[1]
        placeholders = value_states.repeat_interleave(group, dim=1) if group > 1 else value_states
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, placeholders], dim=-2)
        self.pending = key_states.shape[-2]
        return self.keys, self.values

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
        else:
            self.values[..., n_past:, :] = outputs  # no copy of the past: a decode step writes one row
        self.pending = 0

    def reset(self) -> None:
        self.pending = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if self.pending:
            raise RuntimeError("KACache.crop called between a key update and its outputs")
        super().crop(tokens_to_remove)


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
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        )


class KACache(Cache):
    """A cache of keys and attention outputs (K, A) for exact KA inference with any supported HF model.

        model.generate(**inputs, past_key_values=KACache())

    Args:
        prefill: "ka" (default) computes the prompt with exact KA (parallel solve); "standard" computes it with
            standard attention and caches its outputs as A, then generates with KA (the ka-hybrid mode).
        layers: indices of the layers that use KA (None = all). The others keep K, V and standard attention.
        adapter: optional plan-1 adapter: an object with `map_outputs(layer_idx, outputs) -> outputs'`; cached
            outputs are mapped by it where they serve as values.
        variant: "ka" (exact KA, KA-SPEC §2) or "plan2" (the original project's plan 2; see docs/plan2.md:
            every output collapses to the first token's value).
        block_size: tokens per triangular solve when a long prompt is prefilled (memory O(block x T)).
    """

    def __init__(
        self,
        prefill: str = "ka",
        layers=None,
        adapter=None,
        variant: str = "ka",
        block_size: int | None = 512,
    ):
        if prefill not in PREFILL_MODES:
            raise KAError(f"KACache(prefill={prefill!r}): use one of {PREFILL_MODES}")
        if variant not in VARIANTS:
            raise KAError(f"KACache(variant={variant!r}): use one of {VARIANTS}")
        super().__init__(layers=[])
        self.prefill = prefill
        self.ka_layers = None if layers is None else frozenset(int(i) for i in layers)
        self.adapter = adapter
        self.variant = variant
        self.block_size = block_size
        self.signature: ModelSignature | None = None
        self._bound_config = None

    def __repr__(self):
        layers = "all" if self.ka_layers is None else sorted(self.ka_layers)
        return f"KACache(prefill={self.prefill!r}, layers={layers}, variant={self.variant!r}, seq_len={self.get_seq_length()})"

    def is_ka_layer(self, layer_idx: int) -> bool:
        return self.ka_layers is None or layer_idx in self.ka_layers

    def bind(self, config) -> None:
        """Tie the cache to the first model that uses it; refuse any other model afterwards."""
        if config is self._bound_config:  # every layer of every step asks: answer the common case at once
            return
        signature = ModelSignature.of(config)
        if self.signature is None:
            bad = sorted(i for i in (self.ka_layers or ()) if not 0 <= i < signature.num_layers)
            if bad:
                raise KAError(f"KACache(layers=...) names layers {bad}, but the model has {signature.num_layers} layers")
            self.signature = signature
            self._bound_config = config
        elif signature != self.signature:
            raise KAError(
                f"This KACache holds the states of another model ({self.signature}); it cannot be reused with "
                f"{signature}. Create a new KACache() for each model."
            )

    def _new_layer(self, layer_idx: int):
        return KALayer() if self.is_ka_layer(layer_idx) else DynamicLayer()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        from .integration import check_routed  # the attention hook and the cache check each other

        check_routed(self, layer_idx)
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        layer = self.layers[layer_idx]
        cached = layer.get_seq_length()
        if cached and layer.keys.shape[0] != key_states.shape[0]:
            raise KAError(
                f"KACache holds a batch of {layer.keys.shape[0]} sequences but got a batch of {key_states.shape[0]}; "
                "use a new KACache for a new batch."
            )
        if isinstance(layer, KALayer):
            return layer.update(key_states, value_states, self.signature.num_heads)
        return layer.update(key_states, value_states, *args, **kwargs)


def cache_nbytes(cache) -> int:
    """Bytes held by a cache's tensors (keys + values for a DynamicCache, keys + outputs for a KACache)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
