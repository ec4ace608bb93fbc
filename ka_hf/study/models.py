"""Model configs and loading: the one home for "which model, from where".

`model_config` builds a from-scratch config for each supported family (the test suite's tiny models, the
training script's `--arch`, the Pythia-70M shape of the original study). `load_model` loads a checkpoint from a
local directory or the Hub with a clear error when it is neither.
"""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ka_hf.errors import KAError
from ka_hf.preflight import check_local_path, check_model_files, check_tokenizer_files

ARCHITECTURES = ("gpt2", "gpt-neox", "llama", "mistral", "qwen2")

# The original study's model: Pythia-70M's shape (GPT-NeoX, 6 layers, hidden 512, 8 heads, rotary_pct 0.25).
PYTHIA_70M_SHAPE = dict(num_layers=6, hidden_size=512, num_heads=8, intermediate_size=2048, rotary_pct=0.25)


def model_config(
    arch: str,
    vocab_size: int,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_positions: int = 2048,
    rotary_pct: float = 0.25,
    sliding_window: int | None = None,
    **extra,
):
    """A from-scratch config of family `arch` (dropout off: exactness tests and short trainings want it off)."""
    intermediate_size = intermediate_size or 4 * hidden_size
    num_kv_heads = num_kv_heads or num_heads
    if num_heads < 1 or hidden_size % num_heads:
        raise KAError(f"--hidden-size {hidden_size} is not a multiple of --num-heads {num_heads}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise KAError(f"--num-heads {num_heads} is not a multiple of --num-kv-heads {num_kv_heads}")
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "gpt2":
        from transformers import GPT2Config

        if num_kv_heads != num_heads:
            raise KAError("gpt2 has no grouped-query attention: drop num_kv_heads")
        return GPT2Config(
            n_layer=num_layers,
            n_embd=hidden_size,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
            **extra,
        )
    if arch == "gpt-neox":
        from transformers import GPTNeoXConfig

        if num_kv_heads != num_heads:
            raise KAError("gpt-neox has no grouped-query attention: drop num_kv_heads")
        return GPTNeoXConfig(
            num_hidden_layers=num_layers,
            hidden_size=hidden_size,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_positions,
            rotary_pct=rotary_pct,
            use_parallel_residual=True,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            **common,
            **extra,
        )
    if arch in ("llama", "mistral", "qwen2"):
        from transformers import LlamaConfig, MistralConfig, Qwen2Config

        config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
        kwargs = dict(
            num_hidden_layers=num_layers,
            hidden_size=hidden_size,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_positions,
            **common,
            **extra,
        )
        if arch != "llama":
            kwargs["sliding_window"] = sliding_window
            if arch == "qwen2" and sliding_window is not None:
                kwargs["use_sliding_window"] = True
        elif sliding_window is not None:
            raise KAError("llama has no sliding window: use mistral or qwen2")
        return config_class(**kwargs)
    raise KAError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def _check_exists(path_or_id: str) -> None:
    check_local_path(path_or_id)


def load_model(path_or_id: str, dtype: torch.dtype | str | None = None, device=None, attn_implementation="sdpa"):
    """Load a causal LM (local `save_pretrained` directory or Hub id) in eval mode; a folder or id that is not a
    loadable model is refused first, cheaply (ka_hf.preflight.check_model_files)."""
    check_model_files(path_or_id, "model path")
    try:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as error:
        raise KAError(f"cannot load model {path_or_id!r}: {error}") from None
    if device is not None:
        model.to(device)
    return model.eval()


def load_tokenizer(path_or_id: str):
    check_tokenizer_files(path_or_id, "tokenizer path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    except OSError as error:
        raise KAError(f"cannot load a tokenizer from {path_or_id!r}: {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
