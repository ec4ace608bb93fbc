import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import ka_hf  # noqa: E402, F401  (installs the attention routing)
from ka_hf.study.models import model_config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Tiny configs of every family the core must handle: MHA, GQA + RoPE, partial rotary, sliding window.
TINY_ARCHS = {
    "gpt2": dict(arch="gpt2"),
    "gpt-neox": dict(arch="gpt-neox", rotary_pct=0.25),
    "llama-gqa": dict(arch="llama", num_kv_heads=2),
    "mistral-sliding": dict(arch="mistral", num_kv_heads=2, sliding_window=5),
    "qwen2-gqa": dict(arch="qwen2", num_kv_heads=2),
}
VOCAB = 97


def tiny_model(name: str, dtype=torch.float64, seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    spec = {**TINY_ARCHS[name], **overrides}
    spec.setdefault("num_layers", 3)
    config = model_config(vocab_size=VOCAB, hidden_size=32, num_heads=4, **spec)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.to(dtype).eval()


@pytest.fixture(params=list(TINY_ARCHS))
def arch_name(request):
    return request.param


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest (and steadiest on a shared 2-core machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script(name: str):
    """Import examples/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
