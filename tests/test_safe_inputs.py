"""Issue 13, "safe by default": every bad input is refused at once with one line naming the file, flag or value
(KAError from the library, `error:` + exit status 2 from the scripts), before any work and without changing a file."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import ka_hf
from ka_hf import KACache, KAError
from ka_hf.adapters import KAAdapter, load_adapter, save_adapter
from ka_hf.study.models import load_model, load_tokenizer, model_config

from conftest import REPO_ROOT, TINY_TRAIN_FLAGS, VOCAB, load_script, refused_at_once, tiny_model, tree_state


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


# ---------------------------------------------------------------------------------------------------------
# Issue 25, "fail before the work": every CLI checks its model folder, text files, numbers and --out (that it can
# be written) before anything loads or runs: exit 2, one `error:` line, under 2 s of CPU, nothing written.

BROKEN_MODELS = ("a file", "no config.json", "truncated weights", "config.json not JSON", "no weights")
MODEL_SCRIPTS = ("eval_ppl", "reversal_curse", "fit_adapter", "push_to_hub", "train", "lm_eval")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny saved GPT-2 with its tokenizer, recording its training facts, text and sequence length (as the
    study's models do), its text file, and broken copies of it."""
    import shutil

    from ka_hf.study.data import default_corpus, train_tokenizer

    root = tmp_path_factory.mktemp("saved")
    text = root / "train.txt"
    text.write_text("\n".join(t.replace("\n", " ") for t in default_corpus("train")[:40]) + "\n")
    tokenizer = train_tokenizer(text.read_text().splitlines(), vocab_size=300)
    torch.manual_seed(0)
    config = model_config("gpt2", len(tokenizer), num_layers=1, hidden_size=32, num_heads=2, max_positions=256)
    model = AutoModelForCausalLM.from_config(config)
    training = {"facts": {"n": 2, "seed": 0, "include": "forward"}, "text_file": str(text), "val_fraction": 0.1}
    model.config.ka_provenance = {"training": training | {"seq_len": 16}}
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    broken = {"a file": text}
    for name in BROKEN_MODELS[1:]:
        broken[name] = Path(shutil.copytree(root / "model", root / name.replace(" ", "-")))
    (broken["no config.json"] / "config.json").unlink()
    weights = broken["truncated weights"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (broken["config.json not JSON"] / "config.json").write_text('{"model_type": "gpt2", ')
    (broken["no weights"] / "model.safetensors").unlink()
    return {"model": root / "model", "text": text, "broken": broken}


def script_main(name: str, monkeypatch):
    """main(argv) of a command: an examples/ script, or `python -m ka_hf.lm_eval` (which reads sys.argv)."""
    if name != "lm_eval":
        return load_script(name).main
    pytest.importorskip("lm_eval")
    from ka_hf.lm_eval.__main__ import main

    def run(argv):
        monkeypatch.setattr("sys.argv", ["python -m ka_hf.lm_eval", *argv])
        main()

    return run


def command(name: str, model, out, text) -> list[str]:
    """The least each command needs, with `model` as its model and `out` as where it writes."""
    return {
        "eval_ppl": ["--model", str(model), "--max-windows", "2", "--no-progress", "--device", "cpu"],
        "reversal_curse": ["--model", str(model), "--no-progress", "--device", "cpu"],
        "fit_adapter": ["--model", str(model), "--device", "cpu"],
        "push_to_hub": ["--model", str(model), "--repo-id", "alice/x", "--dry-run"],
        "train": ["--model", str(model), "--text-file", str(text), *TINY_TRAIN_FLAGS],
        "lm_eval": [
            "--model",
            "ka_hf",
            "--model_args",
            f"pretrained={model},ka_mode=ka",
            "--tasks",
            "wikitext2_local",
            "--include_path",
            str(REPO_ROOT / "examples" / "lm_eval_tasks"),
            "--limit",
            "1",
            "--output_path",
        ],  # fmt: skip
    }[name] + ([str(out)] if name == "lm_eval" else ["--out", str(out)])


@pytest.mark.parametrize("broken", BROKEN_MODELS)
@pytest.mark.parametrize("script", MODEL_SCRIPTS)
def test_a_model_folder_that_does_not_load_is_refused_at_once(
    script, broken, saved_model, tmp_path, monkeypatch, capsys
):
    model = saved_model["broken"][broken]
    before = tree_state(tmp_path)
    line = refused_at_once(
        script_main(script, monkeypatch), command(script, model, tmp_path / "out", saved_model["text"]), capsys
    )
    assert str(model) in line, line
    expected = {
        "a file": "is a file, not a model folder",
        "no config.json": "has no config.json",
        "truncated weights": "model.safetensors is truncated or damaged",
        "config.json not JSON": "config.json is not valid JSON",
        "no weights": "weights",
    }[broken]
    assert expected in line, line
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("script", ["eval_ppl", "reversal_curse", "fit_adapter", "lm_eval"])
def test_a_model_that_is_neither_here_nor_on_the_hub_is_refused_at_once(
    script, saved_model, tmp_path, monkeypatch, capsys
):
    for model in (tmp_path / "missing", "no-such-user/no-such-model-ka-hf"):  # (HF_HUB_OFFLINE=1: never fetched)
        line = refused_at_once(script_main(script, monkeypatch), command(script, model, tmp_path / "out", None), capsys)
        assert str(model) in line and "Traceback" not in line, line
    assert list(tmp_path.iterdir()) == []


UNWRITABLE_SCRIPTS = [*MODEL_SCRIPTS, "bench_core", "bench_training", "bench_long", "bench_threads", "bench_adapter"]


@pytest.mark.parametrize("script", UNWRITABLE_SCRIPTS)
def test_an_out_that_cannot_be_written_is_refused_before_any_work(
    script, unwritable_out, saved_model, tmp_path, monkeypatch, capsys
):
    if script.startswith("bench_"):
        from test_cli import load_file

        main = load_file(f"benchmarks/{script}.py").main
        out = unwritable_out.with_suffix(".json") if script != "bench_long" else unwritable_out
        argv = ["--out", str(out), "--device", "cpu"] if script != "bench_threads" else ["--out", str(out)]
    else:
        main, out = script_main(script, monkeypatch), unwritable_out
        argv = command(script, saved_model["model"], out, saved_model["text"])
    before = tree_state(tmp_path)
    line = refused_at_once(main, argv, capsys)
    assert str(out) in line and ("not writable" in line or "is a file, not a folder" in line), line
    assert tree_state(tmp_path) == before


BAD_TEXT = {
    "missing": (None, "not found"),
    "a folder": ("folder", "is a folder, not a file"),
    "empty": (b"", "the file is empty"),
    "only white space": (b"  \n\n \t\n", "only white space"),
    "not a text type": (b"a,b\n", "unknown text file type '.csv'"),
    "not UTF-8": (b"\xff\xfe\x00\x81" * 50, "cannot decode"),
}


@pytest.mark.parametrize("kind", list(BAD_TEXT))
@pytest.mark.parametrize(
    "script, flag",
    [
        ("eval_ppl", "--text-file"),
        ("fit_adapter", "--text-file"),
        ("fit_adapter", "--val-text-file"),
        ("train", "--text-file"),
        ("train", "--val-text-file"),
    ],
)
def test_a_bad_text_file_is_refused_before_any_work(script, flag, kind, saved_model, tmp_path, capsys):
    content, message = BAD_TEXT[kind]
    path = tmp_path / ("data.csv" if kind == "not a text type" else "data.txt")
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    base = {
        "eval_ppl": ["--model", str(saved_model["model"]), "--no-progress"],
        "fit_adapter": ["--model", str(saved_model["model"]), "--seq-len", "16"],
        "train": TINY_TRAIN_FLAGS,
    }[script]
    argv = [*base, "--out", str(tmp_path / "out"), flag, str(path)]
    if flag == "--val-text-file":
        argv += ["--text-file", str(saved_model["text"])]
    before = tree_state(tmp_path)
    line = refused_at_once(load_script(script).main, argv, capsys)
    assert message in line and str(path) in line, line
    assert tree_state(tmp_path) == before  # train.py: no train_config.json that would block the retry


BAD_NUMBERS = [
    ("fit_adapter", ["--batch-size", "0"], "--batch-size 0"),
    ("fit_adapter", ["--samples", "0"], "--samples 0"),
    ("fit_adapter", ["--seq-len", "0"], "--seq-len 0"),  # (was silently replaced by the model's 16)
    ("fit_adapter", ["--val-samples", "0"], "--val-samples 0"),
    ("fit_adapter", ["--distill-steps", "-1"], "--distill-steps -1"),
    ("fit_adapter", ["--mlp-hidden", "-1"], "--mlp-hidden -1"),
    ("fit_adapter", ["--ridge", "-1"], "--ridge -1"),
    ("fit_adapter", ["--lr", "0"], "--lr 0"),
    ("reversal_curse", ["--batch-size", "0"], "--batch-size 0"),
    ("reversal_curse", ["--facts", "0"], "--facts 0"),
    ("reversal_curse", ["--facts", "-3"], "--facts -3"),
    ("eval_ppl", ["--batch-size", "0"], "--batch-size 0"),
    ("eval_ppl", ["--max-windows", "0"], "--max-windows 0"),
    ("eval_ppl", ["--max-length", "512", "--stride", "512"], "--max-length 512 exceeds the model's 256 positions"),
    ("eval_ppl", ["--modes", "kv,ka@3"], "layer 3"),
    ("train", ["--val-samples", "0"], "--val-samples 0"),
    ("train", ["--samples", "0"], "samples"),
]


@pytest.mark.parametrize("script, flags, message", BAD_NUMBERS)
def test_a_bad_number_is_refused_before_any_work(script, flags, message, saved_model, tmp_path, capsys):
    base = TINY_TRAIN_FLAGS if script == "train" else ["--model", str(saved_model["model"])]
    before = tree_state(tmp_path)
    line = refused_at_once(load_script(script).main, [*base, *flags, "--out", str(tmp_path / "out")], capsys)
    assert message in line, line
    assert "tokens are fewer" not in line
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("script", ["eval_ppl", "reversal_curse", "fit_adapter", "train", "push_to_hub"])
def test_a_bad_command_line_is_one_line(script, tmp_path, capsys):
    main = load_script(script).main
    for argv in (["--no-such-flag"], ["--out", str(tmp_path / "o"), "--threads", "many"]):
        line = refused_at_once(main, argv, capsys)
        assert "--help" in line and "usage:" not in line, line
    assert list(tmp_path.iterdir()) == []


def test_cheap_model_checks(saved_model, tmp_path):
    """ka_hf.preflight reads headers only; its verdict on each broken copy matches what loading would say."""
    from ka_hf.preflight import check_model_files, check_weight_file

    config = check_model_files(saved_model["model"])
    assert config.model_type == "gpt2" and config.num_hidden_layers == 1
    for name, path in saved_model["broken"].items():
        with pytest.raises(KAError):
            check_model_files(path)
        if name in ("a file", "no config.json"):
            continue
        with pytest.raises(Exception):  # noqa: B017 (the same folder really does not load: what the check spares)
            AutoModelForCausalLM.from_pretrained(path)
    weights = (saved_model["model"] / "model.safetensors").read_bytes()
    for damaged in (weights[:5], weights[:8] + b"{not json" + weights[17:], weights + b"\0"):  # short, header, extra
        (tmp_path / "model.safetensors").write_bytes(damaged)
        with pytest.raises(KAError, match="truncated or damaged"):
            check_weight_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "shard-1.safetensors"}}))
    with pytest.raises(KAError, match="shard-1.safetensors is missing"):
        check_weight_file(tmp_path / "model.safetensors.index.json")
