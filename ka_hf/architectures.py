"""The model types ka_hf routes, and what a model's attention shape must satisfy for exact KA."""

from dataclasses import dataclass

from .errors import KAError

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


def num_kv_heads(config) -> int:
    """Key/value heads of a transformers config: num_key_value_heads (GQA), else the attention heads (MHA)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


@dataclass(frozen=True)
class ModelSignature:
    """What a cache must agree on with the model that fills it."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int

    @classmethod
    def of(cls, config) -> "ModelSignature":
        """The signature of a model config, checked: a supported model type whose query heads split evenly
        into groups over its key/value heads (else KAError, naming the numbers)."""
        signature = cls(
            model_type=getattr(config, "model_type", "?"),
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=num_kv_heads(config),
        )
        check_supported(signature.model_type)
        if signature.num_kv_heads < 1 or signature.num_heads % signature.num_kv_heads:
            raise KAError(
                f"{signature.model_type}: {signature.num_heads} query heads do not split evenly over "
                f"{signature.num_kv_heads} key/value heads, so grouped-query attention (and KA) is undefined; use a "
                "num_key_value_heads that divides num_attention_heads"
            )
        return signature


def check_supported(model_type) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise KAError(
            f"ka_hf does not support model_type {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
