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


# train.py flags for the smallest run that trains something (tests of the script's behaviour, not of learning).
# The one tiny training run the tests share (TrainConfig keywords); a test changes what it needs with `|`.
TINY_TRAIN = dict(
    num_layers=2,
    hidden_size=32,
    num_heads=4,
    intermediate_size=64,
    vocab_size=400,
    seq_len=24,
    lr=3e-3,
    batch_size=8,
    samples=48,
    val_samples=16,
    epochs=2,
    progress=False,
)

TINY_TRAIN_FLAGS = [
    "--epochs", "1", "--num-layers", "1", "--hidden-size", "32", "--num-heads", "2", "--intermediate-size", "64",
    "--vocab-size", "300", "--seq-len", "16", "--no-progress",
]  # fmt: skip


def load_script(name: str):
    """Import examples/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_family_model(
    family: str, dtype=torch.float64, seed: int = 0, attn_implementation: str = "eager", num_layers: int = 3, **extra
):
    """Tiny Gemma / Gemma-2 / Qwen3 (families `ka_hf.models.model_config` does not build): GQA 4/2, head_dim 8."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        family,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.to(dtype).eval()


# Every supported model_type, each with the non-default attention features ka_hf must read from the model:
# name -> (factory(attn_implementation), attention implementations it supports).
FEATURE_MODELS = {
    "gpt2": (lambda impl: tiny_model("gpt2", attn_implementation=impl), ("sdpa", "eager")),
    "gpt2-layer-scale": (
        lambda impl: tiny_model("gpt2", attn_implementation=impl, scale_attn_by_inverse_layer_idx=True),
        ("sdpa", "eager"),
    ),
    "gpt-neox-partial-rotary": (lambda impl: tiny_model("gpt-neox", attn_implementation=impl), ("sdpa", "eager")),
    "llama-gqa": (lambda impl: tiny_model("llama-gqa", attn_implementation=impl), ("sdpa", "eager")),
    "mistral-sliding": (lambda impl: tiny_model("mistral-sliding", attn_implementation=impl), ("sdpa", "eager")),
    # layers 1 and 2 windowed (window 4), layer 0 full
    "qwen2-sliding": (
        lambda impl: tiny_model("qwen2-gqa", attn_implementation=impl, sliding_window=4, max_window_layers=1),
        ("sdpa", "eager"),
    ),
    "qwen3-sliding": (
        lambda impl: tiny_family_model(
            "qwen3", attn_implementation=impl, use_sliding_window=True, sliding_window=4, max_window_layers=1
        ),
        ("sdpa", "eager"),
    ),
    "gemma": (lambda impl: tiny_family_model("gemma", attn_implementation=impl), ("sdpa", "eager")),
    # softcap, query_pre_attn_scalar != head_dim (8), alternating sliding window 4; no sdpa for Gemma-2
    "gemma2-softcap": (
        lambda impl: tiny_family_model(
            "gemma2", attn_implementation=impl, attn_logit_softcapping=2.0, query_pre_attn_scalar=5, sliding_window=4
        ),
        ("eager",),
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: refused at once, with one line, writing nothing (tests/test_safe_inputs.py and its neighbours)


def refused_at_once(main, argv, capsys, max_cpu_seconds: float = 2.0) -> str:
    """Run a script's main(argv); it must exit 2 with exactly one `error:` line on stderr, spending less than
    `max_cpu_seconds` of CPU (this process's: a busy machine stretches wall time, not CPU time). Returns the line."""
    import time

    capsys.readouterr()
    started = time.process_time()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    spent = time.process_time() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, (argv, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert spent < max_cpu_seconds, f"{spent:.2f} s of CPU before the refusal: {argv}"
    assert "Traceback" not in err[0] and "weights_only" not in err[0], err
    return err[0]


def tree_state(folder) -> dict:
    """Every path under `folder`, with each file's bytes and mtime: equal before and after = nothing written."""
    return {
        str(path): (path.read_bytes(), path.stat().st_mtime_ns) if path.is_file() else "folder"
        for path in sorted(Path(folder).rglob("*"))
    }


def _stops_writes(folder) -> bool:
    try:
        (Path(folder) / "probe").write_text("x")
    except OSError:
        return True
    (Path(folder) / "probe").unlink()
    return False


@pytest.fixture(params=["read-only folder", "under /proc", "under a file"])
def unwritable_out(request, tmp_path):
    """An --out that cannot be written, by root too (mode bits alone do not stop root): a folder made immutable
    (chattr +i as root; mode 0555 otherwise, which stops any other user), a path under /proc, a path below a
    file. Skips the first kind where neither works here."""
    import os
    import subprocess

    if request.param == "under /proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc here")
        yield Path("/proc/ka_hf_out")
        return
    if request.param == "under a file":
        (tmp_path / "a-file").write_text("not a folder")
        yield tmp_path / "a-file" / "out"
        return
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    else:
        folder.chmod(0o555)
        made = True
    if not made or not _stops_writes(folder):
        pytest.skip("no way to make a folder read-only for this user here (chattr +i needs root on ext4/xfs)")
    try:
        yield folder / "out"
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)
