"""Per-call routing state shared by the attention hook (integration.py) and the cache (cache.py).

A routed attention call sets a `Route` in a context variable for its duration: each thread (and each asyncio
task) sees only its own, so two threads sharing one model never see each other's routes.
"""

import contextvars
from dataclasses import dataclass

from .errors import KAError
from .ops import DEFAULT_BLOCK_SIZE

# model_type -> the attention class whose forward is routed. Llama-family models carry their own copy of
# Llama's attention code (same q/k/v -> cache.update -> attention interface flow), so each is listed.
SUPPORTED_ARCHITECTURES = {
    "gpt2": "transformers.models.gpt2.modeling_gpt2:GPT2Attention",
    "gpt_neox": "transformers.models.gpt_neox.modeling_gpt_neox:GPTNeoXAttention",
    "llama": "transformers.models.llama.modeling_llama:LlamaAttention",
    "mistral": "transformers.models.mistral.modeling_mistral:MistralAttention",
    "qwen2": "transformers.models.qwen2.modeling_qwen2:Qwen2Attention",
    "qwen3": "transformers.models.qwen3.modeling_qwen3:Qwen3Attention",
    "gemma": "transformers.models.gemma.modeling_gemma:GemmaAttention",
    "gemma2": "transformers.models.gemma2.modeling_gemma2:Gemma2Attention",
}


@dataclass
class Route:
    """One routed attention call: which cache and layer, how KA is computed, and whether the KA function ran."""

    cache: object
    layer_idx: int
    kind: str  # "ka" or "standard" (a non-KA layer of a KACache)
    variant: str = "ka"
    block_size: int | None = DEFAULT_BLOCK_SIZE
    kernel: str = "auto"
    used: bool = False


ACTIVE_ROUTE: contextvars.ContextVar[Route | None] = contextvars.ContextVar("ka_hf_route", default=None)


def check_routed(cache, layer_idx: int) -> None:
    """Called by `KACache.update`: the update must come from a routed attention call of this cache and layer."""
    route = ACTIVE_ROUTE.get()
    if route is None or route.cache is not cache or route.layer_idx != layer_idx:
        raise KAError(
            "KACache was updated by an attention module ka_hf does not route, so KA cannot be computed for this "
            f"model. Supported model types: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
