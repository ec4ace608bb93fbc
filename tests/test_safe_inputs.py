"""Issue 13, "safe by default": every bad input is refused at once with one line naming the file, flag or value
(KAError from the library, `error:` + exit status 2 from the scripts), before any work and without changing a file."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import ka_hf
from ka_hf import KACache, KAError
from ka_hf.adapters import KAAdapter, load_adapter, save_adapter
from ka_hf.study.models import load_model, load_tokenizer, model_config

from conftest import VOCAB, load_script, tiny_model


def exits_2(script, argv, capsys) -> str:
    """Run a script's main; it must exit 2 with exactly one `error:` line on stderr. Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2, argv
    err = capsys.readouterr().err.strip().splitlines()  # (progress bars of a model load may come before it)
    assert [line for line in err if line.startswith("error: ")] == err[-1:], err
    return err[-1]


def tree(path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


# ---------------------------------------------------------------------------------------------------------
# A mistyped local path: "does not exist", at once, never a Hub error (HF_HUB_OFFLINE=1 would name the Hub)


def test_missing_local_model_path_is_named_without_the_network(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("./missing", str(tmp_path / "missing"), "runs/typo", "runs/quick/best", "~/no-such-ka-dir"):
        for load in (load_model, load_tokenizer):
            with pytest.raises(KAError, match="does not exist") as error:
                load(name)
            assert name in str(error.value) and "hub" not in str(error.value).lower()
    line = exits_2(load_script("eval_ppl"), ["--model", "runs/typo", "--out", str(tmp_path / "out")], capsys)
    assert "'runs/typo' does not exist" in line and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# Adapters: checked on load (format, tensor shapes) and against the model they were fit for


@pytest.fixture
def adapter_dir(tmp_path):
    return save_adapter(KAAdapter.for_model(tiny_model("gpt-neox")), tmp_path / "adapter")


def test_corrupt_adapter_files_are_named(adapter_dir):
    weights, config = adapter_dir / "adapter.safetensors", adapter_dir / "adapter_config.json"
    good_weights, good_config = weights.read_bytes(), config.read_text()
    weights.write_bytes(b"\xff" * 70)  # garbage: safetensors says "header too large"
    with pytest.raises(KAError, match="adapter.safetensors is not a readable safetensors file"):
        load_adapter(adapter_dir)
    weights.write_bytes(good_weights)
    config.write_text(good_config[:40])
    with pytest.raises(KAError, match="adapter_config.json is not valid JSON"):
        load_adapter(adapter_dir)
    values = json.loads(good_config)
    config.write_text(json.dumps(values | {"head_dim": values["head_dim"] * 2}))
    with pytest.raises(KAError, match="adapter.safetensors does not match"):
        load_adapter(adapter_dir)


def test_adapter_refuses_another_model(adapter_dir):
    adapter = load_adapter(adapter_dir)
    assert adapter.base["fingerprint"] and adapter.base["ka_model"] is False
    with pytest.raises(KAError, match="model_type"):  # same shape, another family
        adapter.check_model(tiny_model("llama-gqa", num_kv_heads=None))
    ka_model = tiny_model("gpt-neox")
    ka_hf.enable_ka(ka_model)
    with pytest.raises(KAError, match="KA-trained"):
        adapter.check_model(ka_model)


def test_push_to_hub_refuses_bad_adapters(tmp_path, capsys):
    from ka_hf.study.data import train_tokenizer

    tokenizer = train_tokenizer(["The capital of France is Paris."] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = model_config("gpt-neox", len(tokenizer))
    standard = AutoModelForCausalLM.from_config(config)
    adapter_dir = save_adapter(KAAdapter.for_model(standard), tmp_path / "adapter")
    ka_model = AutoModelForCausalLM.from_config(config)
    ka_hf.enable_ka(ka_model)
    ka_model.save_pretrained(tmp_path / "ka")
    tokenizer.save_pretrained(tmp_path / "ka")
    push = load_script("push_to_hub")
    argv = ["--model", str(tmp_path / "ka"), "--repo-id", "alice/x", "--dry-run", "--folder", str(tmp_path / "f")]
    before = tree(tmp_path)
    line = exits_2(push, [*argv, "--adapter", str(adapter_dir)], capsys)  # a standard model's adapter
    assert "KA-trained" in line and str(adapter_dir) in line and tree(tmp_path) == before
    (adapter_dir / "adapter.safetensors").write_bytes(b"\x00" * 70)
    before = tree(tmp_path)
    line = exits_2(push, [*argv, "--adapter", str(adapter_dir)], capsys)
    assert "adapter.safetensors is not a readable safetensors file" in line
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------
# Model shapes, modes, unsupported models: refused before any work


def test_heads_not_a_multiple_of_kv_heads(tmp_path, capsys):
    with pytest.raises(KAError, match="--num-heads 4 is not a multiple of --num-kv-heads 3"):
        model_config("llama", VOCAB, num_heads=4, num_kv_heads=3)
    argv = ["--arch", "llama", "--num-heads", "4", "--num-kv-heads", "3", "--out", str(tmp_path / "run")]
    assert "--num-kv-heads 3" in exits_2(load_script("train"), argv, capsys)
    assert not (tmp_path / "run").exists()


def test_modes_as_a_list():
    from ka_hf.study.evaluation import parse_modes

    assert parse_modes(["kv", "ka"]) == parse_modes("kv,ka")
    with pytest.raises(KAError, match="modes"):
        parse_modes(3)


def test_fit_adapter_refuses_an_unsupported_model_before_fitting(tmp_path, capsys):
    from transformers import OPTConfig

    from ka_hf.study.data import train_tokenizer

    tokenizer = train_tokenizer(["The capital of France is Paris."] * 20, vocab_size=300)
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    argv = ["--model", str(tmp_path / "opt"), "--out", str(tmp_path / "adapter")]
    assert "model_type 'opt'" in exits_2(load_script("fit_adapter"), argv, capsys)
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------------------------------------------------
# KACache: one model per cache, even of the same shape


def test_kacache_refuses_a_second_model_of_the_same_shape():
    first, second = tiny_model("gpt-neox", seed=0), tiny_model("gpt-neox", seed=1)
    ids = torch.randint(1, VOCAB, (1, 6))
    cache = KACache()
    with torch.no_grad():
        first(ids, cache=cache, use_cache=True)
        first(ids[:, :1], cache=cache, use_cache=True)  # the same model again: fine
        with pytest.raises(KAError, match="another model object"):
            second(ids[:, :1], cache=cache, use_cache=True)
        empty = KACache()
        empty.bind(first.config)
        second(ids, cache=empty, use_cache=True)  # a cache that holds no states yet may serve another model
