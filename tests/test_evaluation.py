"""Tests for ka_hf.study.evaluation and examples/eval_ppl.py: KV vs KA perplexity on the same windows.

A tiny random-init GPT-2 with a BPE tokenizer trained on the offline corpus is saved once per module; the script
runs as a subprocess (1 process, then torchrun with 2 CPU processes) and the error cases run concurrently.
"""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from ka_hf.errors import KAError
from ka_hf.study.data import count_scored_tokens, default_corpus, ppl_windows, tokenize_texts, train_tokenizer
from ka_hf.study.evaluation import KA_PERPLEXITY_METRIC, Mode, layer_sweep_modes, parse_modes, score_modes
from ka_hf.study.evaluation.ppl import make_batches, prompt_length, segments
from ka_hf.study.measure import Timer, peak_memory_bytes, reset_peak_memory
from ka_hf.study.models import load_model, load_tokenizer, model_config

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "examples" / "eval_ppl.py"
NUM_LAYERS = 3
RTOL = 1e-6  # the bound for "the same PPL"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer = train_tokenizer(default_corpus("train")[:200], vocab_size=400)
    torch.manual_seed(0)
    config = model_config(
        "gpt2", vocab_size=len(tokenizer), num_layers=NUM_LAYERS, hidden_size=32, num_heads=4, max_positions=128
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "texts.txt"
    path.write_text("\n".join(text.replace("\n", " ") for text in default_corpus("test")[:6]) + "\n")
    return path


@pytest.fixture(scope="module")
def model_and_windows(model_dir, text_file):
    """The model and windows of 32 tokens every 24 (so windows have context, and the last one is short)."""
    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    ids = tokenize_texts(text_file.read_text().splitlines()[:3], tokenizer)[:300]
    return model, ppl_windows(ids, max_length=32, stride=24)


def assert_same_ppl(first, second, rtol=RTOL):
    for a, b in zip(first, second, strict=True):
        assert a["mode"] == b["mode"] and a["scored_tokens"] == b["scored_tokens"]
        assert a["targets_checksum"] == b["targets_checksum"] and a["tokens_by_position"] == b["tokens_by_position"]
        assert a["ppl"] == pytest.approx(b["ppl"], rel=rtol), a["mode"]


# -----------------------------------------------------------------------------
# modes


def test_parse_modes_names_layers_and_errors():
    assert [m.name for m in parse_modes("kv,ka@0,1,2,ka-hybrid,ka@0-1,4,ka+adapter")] == [
        "kv",
        "ka@0-2",
        "ka-hybrid",
        "ka@0-1,4",
        "ka+adapter",
    ]
    assert parse_modes("ka,ka, kv") == [Mode("ka"), Mode("kv")]
    assert parse_modes("ka@0-2")[0].layers == (0, 1, 2)
    assert [m.name for m in layer_sweep_modes(3)] == ["ka@0", "ka@0-1", "ka@0-2"]
    for bad in ("kb", "kv@1", "ka@x", "ka@2-1", ""):
        with pytest.raises(KAError):
            parse_modes(bad)
    with pytest.raises(KAError, match="layers 0-2"):
        parse_modes("ka@3", num_layers=3)
    with pytest.raises(KAError, match="needs a plan-1 adapter"):
        Mode("ka+adapter").new_cache(adapter=None)


def test_segments_and_hybrid_prompt():
    window = {"input_ids": torch.arange(8), "labels": torch.tensor([-100] * 3 + list(range(3, 8)))}
    assert prompt_length(window) == 3  # the context tokens
    assert prompt_length({"input_ids": torch.arange(4), "labels": torch.arange(4)}) == 1  # no context: 1st token
    assert segments(8, Mode("ka"), "parallel", 3) == [(0, 8)]
    assert segments(8, Mode("ka-hybrid"), "parallel", 3) == [(0, 3), (3, 8)]
    assert segments(4, Mode("ka-hybrid"), "token", 2) == [(0, 2), (2, 3), (3, 4)]
    assert segments(3, Mode("kv"), "token", 1) == [(0, 1), (1, 2), (2, 3)]
    windows = ppl_windows(torch.arange(100), max_length=32, stride=24)
    batches = make_batches(windows, batch_size=3)
    assert [len(batch) for batch in batches] == [1, 3]  # the first window (no context) is never mixed in


def test_timer_and_peak_memory():
    reset_peak_memory("cpu")
    with Timer("cpu") as timer:
        block = torch.ones(4_000_000)  # 16 MB
        time.sleep(0.01)
    assert timer.seconds >= 0.01
    assert peak_memory_bytes("cpu") > block.numel() * 4


# -----------------------------------------------------------------------------
# scoring


def test_kv_ppl_equals_exp_mean_loss_of_model_labels(model_and_windows):
    model, windows = model_and_windows
    nll_sum, tokens = 0.0, 0
    with torch.no_grad():
        for window in windows:  # the HF guide's loop, written independently
            n = count_scored_tokens([window])
            if n:
                loss = model(window["input_ids"][None], labels=window["labels"][None]).loss
                nll_sum, tokens = nll_sum + float(loss) * n, tokens + n
    [kv] = score_modes(model, windows, parse_modes("kv"), progress=False)
    assert kv["scored_tokens"] == tokens == count_scored_tokens(windows)
    assert kv["ppl"] == pytest.approx(math.exp(nll_sum / tokens), rel=RTOL)


def test_parallel_equals_token_by_token_and_batched(model_and_windows):
    model, windows = model_and_windows
    modes = parse_modes("kv,ka,ka-hybrid,ka@1")
    parallel = score_modes(model, windows, modes, "parallel", progress=False)
    token = score_modes(model, windows, modes, "token", progress=False)
    batched = score_modes(model, windows, modes, "parallel", batch_size=3, progress=False)
    assert_same_ppl(parallel, token)
    assert_same_ppl(parallel, batched)
    assert all(record["decode_tokens_per_s"] > 0 for record in token)
    # each mode against its float64 oracle, and ka-hybrid far from ka: test_evaluation_plumbing.py
    assert len({record["ppl"] for record in parallel}) == 4


def test_hybrid_equals_ka_without_context(model_and_windows):
    """stride == max_length: the prompt is the first token alone, whose output is v_0 either way."""
    model, windows = model_and_windows
    ids = torch.cat([window["input_ids"] for window in windows])[:200]
    ka, hybrid = score_modes(model, ppl_windows(ids, 32, 32), parse_modes("ka,ka-hybrid"), progress=False)
    assert hybrid["ppl"] == pytest.approx(ka["ppl"], rel=RTOL)


def test_layer_sweep_ends_at_ka(model_and_windows):
    model, windows = model_and_windows
    sweep = score_modes(model, windows[:3], layer_sweep_modes(NUM_LAYERS), progress=False)
    [ka] = score_modes(model, windows[:3], parse_modes("ka"), progress=False)
    assert sweep[-1]["ppl"] == pytest.approx(ka["ppl"], rel=1e-12)


def test_identity_adapter_mode_equals_ka(model_and_windows, tmp_path):
    """An untrained adapter is the identity, so ka+adapter (token recursion) must give ka's PPL."""
    from ka_hf.adapters import KAAdapter, load_adapter, save_adapter

    model, windows = model_and_windows
    adapter = load_adapter(save_adapter(KAAdapter.for_model(model), tmp_path / "adapter"))
    ka, with_adapter = score_modes(model, windows[:4], parse_modes("ka,ka+adapter"), adapter=adapter, progress=False)
    assert with_adapter["ppl"] == pytest.approx(ka["ppl"], rel=RTOL)


def test_evaluate_module_loads_offline_and_matches(model_dir, model_and_windows, text_file):
    import evaluate

    model, windows = model_and_windows
    metric = evaluate.load(KA_PERPLEXITY_METRIC)
    texts = text_file.read_text().splitlines()[:2]
    result = metric.compute(predictions=texts, model_id=str(model_dir), modes="kv,ka", max_length=32, stride=24)
    ids = tokenize_texts(texts, load_tokenizer(str(model_dir)))
    expected = score_modes(model, ppl_windows(ids, 32, 24), parse_modes("kv,ka"), progress=False)
    assert result["scored_tokens"] == expected[0]["scored_tokens"]
    for record in expected:
        assert result["perplexities"][record["mode"]] == pytest.approx(record["ppl"], rel=RTOL)


# -----------------------------------------------------------------------------
# the script


def script_env():
    path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path)
    env.pop("OMP_NUM_THREADS", None)
    return env


def script_args(model_dir, text_file, out):
    return [
        str(SCRIPT),
        "--model",
        str(model_dir),
        "--text-file",
        str(text_file),
        "--modes",
        "kv,ka,ka-hybrid,ka@0-1",
        "--max-length",
        "32",
        "--stride",
        "24",
        "--max-windows",
        "25",
        "--no-progress",
        "--out",
        str(out),
    ]


def run_script(args, launcher=(sys.executable,)):
    return subprocess.run(
        [*launcher, *args], capture_output=True, text=True, env=script_env(), cwd=REPO_ROOT, timeout=240
    )


@pytest.fixture(scope="module")
def one_process_run(model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    result = run_script(script_args(model_dir, text_file, out) + ["--layer-sweep", "--threads", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_script_writes_table_json_and_plots(one_process_run):
    out, result = one_process_run
    record = json.loads((out / "results.json").read_text())
    assert {"model", "data", "windows", "seed", "environment", "method", "results", "layer_sweep"} <= set(record)
    assert record["method"] == "parallel" and "scoring: parallel" in result.stdout
    scored = record["windows"]["scored_tokens"]
    assert f"{scored:,} scored tokens" in result.stdout
    assert [r["mode"] for r in record["results"]] == ["kv", "ka", "ka-hybrid", "ka@0-1"]
    assert all(
        r["scored_tokens"] == scored and r["tokens_per_s"] > 0 and r["cache_bytes"] > 0 for r in record["results"]
    )
    assert len({r["targets_checksum"] for r in record["results"] + record["layer_sweep"]["results"]}) == 1
    assert record["results"][0]["degradation_pct"] == 0.0
    assert [r["mode"] for r in record["layer_sweep"]["results"]] == ["ka@0", "ka@0-1", "ka@0-2"]
    markdown = (out / "results.md").read_text()
    assert "| mode | PPL | vs kv (%)" in markdown and "ka-hybrid" in markdown
    for png in ("nll_by_position.png", "nll_gap_by_position.png", "layer_sweep.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_two_cpu_processes_give_the_one_process_ppl(one_process_run, model_dir, text_file, tmp_path):
    out, _ = one_process_run
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2")
    result = run_script(script_args(model_dir, text_file, tmp_path), launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((d / "results.json").read_text()) for d in (out, tmp_path))
    assert two["processes"] == 2 and one["processes"] == 1
    assert_same_ppl(one["results"], two["results"])


ERROR_CASES = {
    "empty dataset": (["--text-file", "{empty}"], "no text"),
    "stride > max-length": (["--stride", "64", "--max-length", "32"], "--stride"),
    "unknown mode": (["--modes", "kv,kx"], "unknown mode 'kx'"),
    "missing model": (["--model", "{missing}"], "does not exist"),
    "undecodable text file": (["--text-file", "{binary}"], "decode"),
}


@pytest.fixture(scope="module")
def error_runs(model_dir, tmp_path_factory):
    """Every error case as its own subprocess, all started at once (each pays the import time)."""
    scratch = tmp_path_factory.mktemp("errors")
    (scratch / "empty.txt").write_text("\n \n\n")
    (scratch / "binary.txt").write_bytes(b"ok line\n\xff\xfe\xfa\xfb not utf-8\n")
    paths = {"empty": scratch / "empty.txt", "binary": scratch / "binary.txt", "missing": scratch / "no_such_model"}
    processes = {}
    for name, (extra, _) in ERROR_CASES.items():
        args = [str(SCRIPT), "--model", str(model_dir), "--out", str(scratch / "out"), "--no-progress"]
        args += [arg.format(**paths) for arg in extra]
        processes[name] = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=script_env(),
            cwd=REPO_ROOT,
        )
    return {name: (process.wait(timeout=240), process.stderr.read()) for name, process in processes.items()}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_clear_errors_exit_2(error_runs, case):
    returncode, stderr = error_runs[case]
    assert returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: ")
    assert ERROR_CASES[case][1] in stderr


def test_flag_errors_in_process(capsys):
    """Flag checks run before anything loads; the same exit-2 path, without a subprocess."""
    import runpy

    main = runpy.run_path(str(SCRIPT))["main"]
    for argv, message in (
        (["--modes", "kv,ka+adapter"], "--adapter DIR"),
        (["--max-length", "1"], "--max-length"),
        (["--max-windows", "0"], "--max-windows"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", "unused", *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_adapter_dir_without_adapter_is_a_clear_error(model_and_windows, tmp_path):
    from ka_hf.study.evaluation.run import load_checked_adapter

    with pytest.raises(KAError, match="no ka_hf adapter"):
        load_checked_adapter(tmp_path, model_and_windows[0], "cpu")


# -----------------------------------------------------------------------------
# window modes (bounded caches)


def test_window_modes_parse_and_name():
    modes = parse_modes("kv-window@16,ka-window@16+2")
    assert [m.name for m in modes] == ["kv-window@16", "ka-window@16+2"]
    assert (modes[1].window, modes[1].sink) == (16, 2) and modes[1].uses_ka and not modes[0].uses_ka
    for bad in ("ka-window", "ka-window@", "kv-window@0", "ka-window@4+x", "ka-window@-3"):
        with pytest.raises(KAError, match="window size"):
            parse_modes(bad)


def test_window_modes_score_exactly_the_windowed_reference(model_and_windows):
    """A window as long as the scoring window changes nothing; a short one equals one uncached pass under the
    window-with-sinks mask (KA computed by the reference loop); parallel = token by token; bytes are bounded."""
    import ka_hf
    from ka_hf.study.evaluation.ppl import token_nll

    model, windows = model_and_windows
    wide = score_modes(model, windows, parse_modes("kv,ka,kv-window@32,ka-window@32"), progress=False)
    by_mode = {record["mode"]: record for record in wide}
    assert by_mode["kv-window@32"]["ppl"] == pytest.approx(by_mode["kv"]["ppl"], rel=RTOL)
    assert by_mode["ka-window@32"]["ppl"] == pytest.approx(by_mode["ka"]["ppl"], rel=RTOL)

    modes = parse_modes("kv-window@6+2,ka-window@6+2")
    parallel = score_modes(model, windows, modes, "parallel", progress=False)
    assert_same_ppl(parallel, score_modes(model, windows, modes, "token", progress=False))
    for record, attention in zip(parallel, ("standard", "ka")):
        nll_sum, tokens = 0.0, 0
        for window in windows:
            ids, labels = window["input_ids"][None], window["labels"][None]
            mask = ka_hf.window_attention_mask(torch.ones_like(ids), window=6, sink=2)
            with (
                torch.no_grad(),
                ka_hf.exact_ka(model, kernel="loop") if attention == "ka" else ka_hf.without_ka(model),
            ):
                nll, scored = token_nll(model(ids, attention_mask=mask, use_cache=False).logits, labels)
            nll_sum, tokens = nll_sum + float(nll[scored].sum()), tokens + int(scored.sum())
        assert record["ppl"] == pytest.approx(math.exp(nll_sum / tokens), rel=RTOL), record["mode"]
        assert record["window"] == 6 and record["sink"] == 2
    kv_window, ka_window = parallel
    assert abs(kv_window["ppl"] / by_mode["kv"]["ppl"] - 1) > 1e-5  # the window really bites (random model: a little)
    # bounded: 2 sinks + 5 recent tokens per layer; K, V per kv head vs K, A per query head (MHA: equal)
    assert kv_window["cache_bytes"] == ka_window["cache_bytes"] < by_mode["kv"]["cache_bytes"] / 3
