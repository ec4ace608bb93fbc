"""One convention for every script (issue 13): the shared flags are spelled, described and read the same way
everywhere (they come from ka_hf.study.cli), and bad values of them are refused at once: exit status 2, one
`error:` line naming the flag, no file written."""

import importlib.util
import re

import pytest
import torch

from ka_hf.errors import KAError
from ka_hf.study import cli, experiment

from conftest import REPO_ROOT, TINY_TRAIN_FLAGS, load_script

HARDWARE = {"--device", "--cpu", "--threads"}
OUTPUT = {"--out", "--overwrite"}
DATA = {"--dataset", "--dataset-config", "--text-file", "--text-column"}
MODEL_AND_MODES = {"--model", "--tokenizer", "--modes", "--adapter"}
# script -> the shared flags it must have (a script without --dtype chooses precision otherwise: train.py and the
# study have --mixed-precision or the preset's; bench_training times float32; push_to_hub computes nothing)
EXPECTED = {
    "examples/eval_ppl.py": HARDWARE | OUTPUT | DATA | MODEL_AND_MODES | {"--dtype", "--no-progress", "--split"},
    "examples/reversal_curse.py": HARDWARE | OUTPUT | MODEL_AND_MODES | {"--dtype", "--no-progress"},
    "examples/fit_adapter.py": HARDWARE
    | OUTPUT
    | DATA
    | {"--model", "--tokenizer", "--dtype", "--no-progress"}
    | {"--split", "--val-split", "--val-text-file"},
    "examples/train.py": HARDWARE
    | OUTPUT
    | DATA
    | {"--model", "--tokenizer", "--no-progress", "--attention"}
    | {"--split", "--val-split", "--val-text-file"},
    "examples/push_to_hub.py": OUTPUT | {"--model", "--adapter"},
    "python -m ka_hf.experiment": HARDWARE | OUTPUT | DATA | {"--no-progress", "--val-text-file"},
    "benchmarks/bench_core.py": HARDWARE | OUTPUT | {"--dtype"},
    "benchmarks/bench_long.py": HARDWARE | OUTPUT | {"--dtype", "--no-progress"},
    "benchmarks/bench_training.py": HARDWARE | OUTPUT,
    "benchmarks/bench_adapter.py": HARDWARE | OUTPUT,
}
# flags whose help must be word for word the same in every script that has them (--out, --model and --adapter
# say what each script writes or reads)
SAME_HELP = HARDWARE | DATA | {"--dtype", "--no-progress", "--tokenizer", "--modes", "--split", "--val-text-file"}
NOT_SHARED = {"--layers", "--ka-layers", "--folder-out", "--num-threads", "--no-progress-bars", "--gpu"}


def load_file(relative: str):
    path = REPO_ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main_of(script: str):
    if script == "python -m ka_hf.experiment":
        return experiment.main
    if script.startswith("examples/"):
        return load_script(script.removeprefix("examples/").removesuffix(".py")).main
    return load_file(script).main


def options_and_help(script: str, capsys, monkeypatch) -> dict:
    """{option: its help text} from the script's own --help, in-process."""
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main_of(script)(["--help"])
    assert exit_info.value.code == 0
    options = {}
    for line in capsys.readouterr().out.splitlines():
        match = re.match(r"^  (-[^ ].*?)(?: {2,}(.*))?$", line)
        if match:
            for option in re.findall(r"--[\w-]+", match.group(1)):
                options[option] = match.group(2) or ""
    return options


@pytest.mark.parametrize("script", list(EXPECTED))
def test_every_script_has_the_shared_flags(script, capsys, monkeypatch):
    options = options_and_help(script, capsys, monkeypatch)
    assert EXPECTED[script] <= set(options), EXPECTED[script] - set(options)
    assert not NOT_SHARED & set(options)


def test_shared_flags_read_the_same_everywhere(capsys, monkeypatch):
    helps = {script: options_and_help(script, capsys, monkeypatch) for script in EXPECTED}
    for flag in SAME_HELP:
        texts = {
            script: re.sub(r" \(default: [^)]*\)", "", options[flag])
            for script, options in helps.items()
            if flag in options
        }
        assert len(set(texts.values())) == 1, (flag, texts)  # the same words, defaults aside
    overwrite = {options["--overwrite"].split(";")[0] for options in helps.values()}
    assert len(overwrite) == 1, overwrite


def test_cpu_is_the_old_spelling_of_device_cpu():
    parse = load_script("eval_ppl").parse_args
    base = ["--model", "m", "--out", "unused-out"]
    assert parse([*base, "--cpu"]).device == parse([*base, "--device", "cpu"]).device == "cpu"
    assert parse(base).device == "auto"


def test_resolve_device():
    assert cli.resolve_device("cpu") == torch.device("cpu")
    assert cli.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "meta", ""):
        with pytest.raises(KAError, match="is not a device"):
            cli.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(KAError, match="no CUDA GPU"):
            cli.resolve_device("cuda")


def test_attention_layers_are_written_as_in_modes():
    assert cli.parse_attention("standard") == ("standard", None)
    assert cli.parse_attention("ka") == ("ka", None)
    assert cli.parse_attention("ka@0-1,3") == ("ka", [0, 1, 3])
    for bad in ("kv", "ka-hybrid", "ka@", "ka@1-0", "ka+adapter", "standard@0"):
        with pytest.raises(KAError, match="--attention"):
            cli.parse_attention(bad)


# ---------------------------------------------------------------------------------------------------------
# Bad values of the shared flags: exit 2, one line naming the flag, nothing written


def refused(main, argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def bad_argv(script: str, out) -> list[str]:
    """The least a script needs besides the flag under test."""
    needs = {
        "examples/eval_ppl.py": ["--model", "runs/m"],
        "examples/reversal_curse.py": ["--model", "runs/m"],
        "examples/fit_adapter.py": ["--model", "runs/m"],
        "examples/train.py": [],
        "python -m ka_hf.experiment": [],
    }
    return [*needs.get(script, []), "--out", str(out)]


BAD_DEVICES = [("--device", "gpu", "is not a device"), ("--threads", "0", "--threads 0")]
if not torch.cuda.is_available():
    BAD_DEVICES.append(("--device", "cuda", "no CUDA GPU"))


@pytest.mark.parametrize("flag, value, message", BAD_DEVICES)
@pytest.mark.parametrize("script", [s for s in EXPECTED if "--device" in EXPECTED[s]])
def test_bad_hardware_flags_are_refused_before_any_work(script, flag, value, message, tmp_path, capsys):
    out = tmp_path / "out"
    line = refused(main_of(script), [*bad_argv(script, out), flag, value], capsys)
    assert message in line and not out.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_train_attention_flag(tmp_path, capsys, text_file):
    train = load_script("train").main
    out = tmp_path / "run"
    common = ["--text-file", str(text_file), "--samples", "8", *TINY_TRAIN_FLAGS, "--num-layers", "2"]
    line = refused(train, ["--attention", "kv", "--out", str(out), *common], capsys)
    assert "--attention 'kv'" in line and not out.exists()
    line = refused(train, ["--attention", "ka@5", "--out", str(out), *common], capsys)
    assert "5" in line and "2 layers" in line and not out.exists()
    train(["--attention", "ka@1", "--out", str(out), *common])
    from transformers import AutoConfig

    from ka_hf.config import KAConfig

    saved = KAConfig.from_model_config(AutoConfig.from_pretrained(out / "best"))
    assert saved.attention == "ka" and list(saved.ka_layers) == [1]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from ka_hf.study.data import default_corpus

    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(text.replace("\n", " ") for text in default_corpus("train")[:20]) + "\n")
    return path


def test_default_threads_leave_busy_cores_alone(monkeypatch, capsys):
    """torch's default (OMP_NUM_THREADS, else the CPU affinity), lowered to the cores the load average leaves
    free: on a busy machine threads on busy cores wait for each other (benchmarks/bench_threads.py)."""
    import argparse

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        for load, expected in ((0.2, 4), (1.4, 3), (3.0, 1), (10.0, 1)):
            monkeypatch.setattr(cli.os, "getloadavg", lambda load=load: (load, load, load))
            threads, note = cli.default_threads()
            assert threads == expected, load
            assert (note is None) == (expected == 4) and (note is None or "--threads N" in note), note
        monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's choice is kept, busy or not
        assert cli.default_threads() == (4, None)
        monkeypatch.delenv("OMP_NUM_THREADS")
        args = argparse.Namespace(threads=None)
        cli.apply_runtime_flags(args)
        assert args.threads == torch.get_num_threads() == 1  # (load 10: what the results record says)
        assert capsys.readouterr().err.startswith("torch threads: 1 of 4 (load average 10.0 on 4 cores")
        cli.apply_runtime_flags(argparse.Namespace(threads=3))
        assert torch.get_num_threads() == 3 and capsys.readouterr().err == ""
    finally:
        torch.set_num_threads(before)


def test_a_bad_command_line_is_one_error_line(capsys):
    parser = cli.ArgumentParser(prog="script.py")
    parser.add_argument("--n", type=int, required=True)
    for argv, message in (([], "the following arguments are required: --n"), (["--n", "x"], "invalid int value")):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        err = capsys.readouterr().err.splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
        assert err[0].startswith("error: ") and err[0].endswith("(see script.py --help)")
