"""Nothing is lost: every command that writes a folder refuses one that holds earlier results (exit 2, one `error:`
line naming the folder and the flag, no file touched) unless told to overwrite or resume it; writes are atomic."""

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ka_hf.errors import KAError
from ka_hf.study import experiment, files, training
from ka_hf.study.data import default_corpus, train_tokenizer
from ka_hf.study.models import model_config

from conftest import TINY_TRAIN_FLAGS, load_script

TRAIN_FLAGS = ["--samples", "8", *TINY_TRAIN_FLAGS]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(text.replace("\n", " ") for text in default_corpus("train")[:20]) + "\n")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, text_file):
    """A tiny saved GPT-2 with its tokenizer; config.ka records training facts (as the study writes them)."""
    directory = tmp_path_factory.mktemp("tiny_model")
    tokenizer = train_tokenizer(text_file.read_text().splitlines(), vocab_size=300)
    torch.manual_seed(0)
    config = model_config(
        "gpt2", vocab_size=len(tokenizer), num_layers=1, hidden_size=32, num_heads=2, max_positions=256
    )
    model = AutoModelForCausalLM.from_config(config)
    model.config.ka = {"attention": "standard"}
    model.config.ka_provenance = {"training": {"facts": {"n": 2, "seed": 0, "include": "forward"}}}
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def earlier_results(folder):
    """A folder as an earlier run left it."""
    (folder / "best").mkdir(parents=True)
    (folder / "results.json").write_text('{"kind": "earlier"}\n')
    (folder / "report.md").write_text("# earlier\n")
    (folder / "best" / "model.safetensors").write_bytes(b"weights")
    return folder


def snapshot(folder) -> dict:
    return {
        str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def commands(model_dir, text_file, out):
    """Each command's argv into `out` (the study's main is a function, the others are examples/ scripts)."""
    return {
        "experiment": (experiment.main, ["--out", str(out), "--no-progress"]),
        "train": (load_script("train").main, ["--text-file", str(text_file), "--out", str(out), *TRAIN_FLAGS]),
        "eval_ppl": (
            load_script("eval_ppl").main,
            [
                "--model",
                str(model_dir),
                "--modes",
                "kv,ka",
                "--text-file",
                str(text_file),
                "--max-length",
                "16",
                "--stride",
                "16",
                "--max-windows",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ],
        ),
        "fit_adapter": (
            load_script("fit_adapter").main,
            [
                "--model",
                str(model_dir),
                "--text-file",
                str(text_file),
                "--samples",
                "4",
                "--val-samples",
                "2",
                "--seq-len",
                "16",
                "--batch-size",
                "2",
                "--out",
                str(out),
            ],
        ),
        "reversal_curse": (
            load_script("reversal_curse").main,
            [
                "--model",
                str(model_dir),
                "--modes",
                "kv",
                "--templates",
                "test",
                "--no-exact-match",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--no-progress",
            ],
        ),
        "push_to_hub": (
            load_script("push_to_hub").main,
            ["--model", str(model_dir), "--repo-id", "alice/tiny", "--dry-run", "--out", str(out)],
        ),
    }


COMMANDS = ["experiment", "train", "eval_ppl", "fit_adapter", "reversal_curse", "push_to_hub"]


@pytest.mark.parametrize("name", COMMANDS)
def test_a_folder_with_earlier_results_is_refused_and_left_alone(name, model_dir, text_file, tmp_path, capsys):
    out = earlier_results(tmp_path / "out")
    before = snapshot(out)
    main, argv = commands(model_dir, text_file, out)[name]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.count("\n") == 1 and error.startswith("error: "), error
    assert str(out) in error and "--overwrite" in error
    # (train names --resume for a folder with a checkpoint: test_training and the failed-run test below)
    assert snapshot(out) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no temporary folder left next to it


@pytest.mark.parametrize("name", ["train", "eval_ppl", "fit_adapter", "reversal_curse", "push_to_hub"])
def test_overwrite_proceeds(name, model_dir, text_file, tmp_path, capsys):
    out = earlier_results(tmp_path / "out")
    main, argv = commands(model_dir, text_file, out)[name]
    main(argv + ["--overwrite"])
    written = out / ("README.md" if name == "push_to_hub" else "results.json")
    assert written.is_file() and "earlier" not in written.read_text()
    assert not [path for path in tmp_path.rglob("*") if path.name.startswith(files.PARTIAL_PREFIX)]


def test_an_interrupted_study_is_refused_naming_resume(tmp_path, capsys):
    out = earlier_results(tmp_path / "out")
    experiment.prepare_out_dir(experiment.ExperimentConfig(out=str(tmp_path / "first")))  # a study_config.json
    (tmp_path / "first" / experiment.STUDY_CONFIG).rename(out / experiment.STUDY_CONFIG)
    before = snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(["--out", str(out), "--no-progress"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert f"{out} already holds a study run: continue it with --resume" in error and "--overwrite" in error
    assert snapshot(out) == before


def test_study_overwrite_and_resume_pass_the_check(tmp_path, monkeypatch, capsys):
    """The study goes past its folder check with --overwrite (the data step is stopped at once here), removing
    the old report first; --resume needs a study run in the folder."""
    out = earlier_results(tmp_path / "out")

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(experiment.run, "prepare_data", stop)
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(["--out", str(out), "--resume", "--no-progress"])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(Stop):
        experiment.main(["--out", str(out), "--overwrite", "--no-progress"])
    assert not (out / "report.md").exists() and (out / experiment.STUDY_CONFIG).is_file()
    with pytest.raises(Stop):  # now it holds a study run with the same settings: --resume continues it
        experiment.main(["--out", str(out), "--resume", "--no-progress"])
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(["--out", str(out), "--resume", "--epochs", "7", "--no-progress"])
    assert exit_info.value.code == 2 and "epochs" in capsys.readouterr().err


def test_a_failed_training_run_restarts_with_the_command_it_names(text_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    script = load_script("train")
    argv = ["--text-file", str(text_file), "--out", str(out), *TRAIN_FLAGS]

    def crash(*args, **kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(training, "_train_epoch", crash)
        with pytest.raises(RuntimeError):
            script.main(argv)
    assert (out / "train_config.json").is_file() and not (out / "last").exists()

    for again in (argv, ["--resume", str(out)]):
        with pytest.raises(SystemExit) as exit_info:
            script.main(again)
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"--resume {out} --overwrite" in error, error
    script.main(["--resume", str(out), "--overwrite"])  # the command the message names
    assert (out / "best" / "model.safetensors").is_file() and (out / "last" / training.TRAINER_STATE).is_file()
    assert "best checkpoint" in capsys.readouterr().out


def test_atomic_writes_leave_the_old_file_when_writing_fails(tmp_path):
    path = files.write_json(tmp_path / "results.json", {"ppl": 1.5})
    before = path.read_bytes()
    with pytest.raises(TypeError):  # not serializable: fails before anything is written
        files.write_json(path, {"ppl": 2.0, "model": object()})
    with pytest.raises(RuntimeError):  # fails midway through writing the temporary file
        with files.atomic_path(path) as temporary:
            temporary.write_text('{"ppl": 2.')
            raise RuntimeError("disk full")
    with pytest.raises(ZeroDivisionError):
        files.save_plot(tmp_path / "results.json", lambda ax: 1 / 0)
    assert path.read_bytes() == before and json.loads(before) == {"ppl": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    folder = tmp_path / "adapter"
    with files.staged_dir(folder) as staging:
        (staging / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with files.staged_dir(folder) as staging:
            (staging / "weights").write_text("new, half written")
            raise RuntimeError("killed")
    assert (folder / "weights").read_text() == "old"
    with files.staged_dir(folder) as staging:
        (staging / "weights").write_text("new")
    assert (folder / "weights").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_check_out_dir(tmp_path):
    assert files.check_out_dir(tmp_path / "new") == tmp_path / "new"  # missing or empty: nothing to lose
    (tmp_path / "file").write_text("x")
    with pytest.raises(KAError, match="is a file"):
        files.check_out_dir(tmp_path / "file")
    with pytest.raises(KAError, match=f"{tmp_path} already holds earlier results: pass --overwrite"):
        files.check_out_dir(tmp_path)
    files.check_out_dir(tmp_path, overwrite=True)


def test_only_user_errors_exit_2(capsys):
    from ka_hf.errors import KAInternalError
    from ka_hf.study.cli import user_errors_exit_2

    @user_errors_exit_2
    def main(error):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        main(KAError("bad input\nsecond line"))
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: bad input second line\n"
    for internal in (KAInternalError("invariant broken"), RuntimeError("bug")):
        with pytest.raises(type(internal)):  # a traceback, not exit 2
            main(internal)


# ---------------------------------------------------------------------------------------------------------
# Issue 25: the scores survive a final write that fails; files get the umask's modes; Ctrl-C says how to go on


def lock(folder):
    """Make `folder` refuse new files, for root too (chattr +i; mode 0555 for other users), or skip."""
    import os
    import subprocess

    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i does not work here (root ignores mode bits)")
    else:
        folder.chmod(0o555)


def unlock(folder):
    import os
    import subprocess

    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def one_error_line(capsys) -> str:
    """The one `error:` line, the last on stderr (progress bars of the work before it may come first)."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert [line for line in err if line.startswith("error: ")] == err[-1:], err
    return err[-1]


def saved_in(line: str):
    from pathlib import Path

    assert " they are saved in " in line and line.endswith(" instead"), line
    return Path(line.split(" they are saved in ")[1].removesuffix(" instead"))


SCORING = {"eval_ppl": "score_modes", "reversal_curse": "reversal_metrics", "fit_adapter": "compare_ppl"}


@pytest.mark.parametrize("name", list(SCORING))
def test_scores_survive_an_out_that_fails_after_scoring(name, model_dir, text_file, tmp_path, monkeypatch, capsys):
    """--out passes its check, then something else takes its place while the scores are computed (here: a file):
    the final write fails for real, and the results go next to it, complete, with the path in the message."""
    out = tmp_path / "out"
    main, argv = commands(model_dir, text_file, out)[name]
    if name == "eval_ppl":
        from ka_hf.study.evaluation import run

        namespace = vars(run)
    else:
        namespace = main.__wrapped__.__globals__  # the script module's (main is wrapped by user_errors_exit_2)
    real = namespace[SCORING[name]]

    def score_then_block(*args, **kwargs):
        scores = real(*args, **kwargs)
        out.write_text("a file where the results folder was to be")
        return scores

    monkeypatch.setitem(namespace, SCORING[name], score_then_block)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    line = one_error_line(capsys)
    rescued = saved_in(line)
    assert f"cannot write the results to --out {out}" in line and rescued.parent == tmp_path
    record = json.loads((rescued / "results.json").read_text())
    assert record["kind"] == {"eval_ppl": "eval", "reversal_curse": "reversal", "fit_adapter": "adapter_fit"}[name]
    if name == "eval_ppl":
        assert {r["mode"] for r in record["results"]} == {"kv", "ka"} and (rescued / "nll_by_position.png").is_file()
    if name == "fit_adapter":
        assert (rescued / "adapter.safetensors").is_file() and record["ppl"]
    assert not [path for path in tmp_path.rglob("*") if path.name.startswith(files.PARTIAL_PREFIX)]


def test_scores_go_to_the_temporary_folder_when_nothing_next_to_out_can_be_written(
    model_dir, text_file, tmp_path, monkeypatch, capsys
):
    import tempfile

    from ka_hf.study.evaluation import run

    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "eval"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    main, argv = commands(model_dir, text_file, out)["eval_ppl"]
    real = run.score_modes

    def score_then_lock(*args, **kwargs):
        scores = real(*args, **kwargs)
        lock(parent)
        return scores

    monkeypatch.setattr(run, "score_modes", score_then_lock)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
    finally:
        unlock(parent)
    assert exit_info.value.code == 2
    rescued = saved_in(one_error_line(capsys))
    assert rescued.parent == tmp_path / "tmp" and json.loads((rescued / "results.json").read_text())["results"]
    assert list(parent.iterdir()) == []


def test_write_results_for_a_file_and_when_nowhere_can_be_written(tmp_path, monkeypatch):
    import tempfile

    target = tmp_path / "bench.json"
    assert files.write_results(target, lambda path: files.write_json(path, {"ratio": 2.0}), file=True) == target
    blocked = tmp_path / "folder-in-the-way"
    blocked.mkdir()
    with pytest.raises(KAError) as error:  # writing a file over a folder fails: the record goes next to it
        files.write_results(blocked, lambda path: files.write_json(path, {"ratio": 3.0}), file=True)
    rescued = saved_in(str(error.value))
    assert rescued.parent == tmp_path and json.loads(rescued.read_text()) == {"ratio": 3.0}
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-temporary-folder"))

    def fail(path):
        raise OSError(28, "No space left on device")

    with pytest.raises(KAError, match="No space left on device.*nor next to it or in"):
        files.write_results(tmp_path / "x", fail)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bench.json", blocked.name, rescued.name]


@pytest.fixture
def umask():
    import os

    def set_to(mask):
        os.umask(mask)

    old = os.umask(0o022)
    os.umask(old)
    yield set_to
    os.umask(old)


def test_written_files_and_folders_honour_the_umask(tmp_path, umask):
    for mask, file_mode, folder_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o077, 0o600, 0o700)):
        umask(mask)
        folder = tmp_path / f"mask-{mask:o}"
        paths = [
            files.write_text(folder / "report.md", "# report\n"),
            files.write_json(folder / "results.json", {"ppl": 1.0}),
            files.save_plot(folder / "curve.png", lambda ax: ax.plot([0, 1])),
        ]
        with files.staged_dir(folder / "adapter") as staging:
            paths.append(files.write_text(staging / "weights", "w"))
        paths = [folder / "adapter" / "weights" if path.parent.name.startswith(".partial") else path for path in paths]
        assert {oct(path.stat().st_mode & 0o777) for path in paths} == {oct(file_mode)}, mask
        assert oct((folder / "adapter").stat().st_mode & 0o777) == oct(folder_mode)
    umask(0o022)
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    kept.chmod(0o640)
    files.write_json(kept, {"replaced": True})  # replacing a file keeps its mode, as open(path, "w") does
    assert kept.stat().st_mode & 0o777 == 0o640 and json.loads(kept.read_text()) == {"replaced": True}


def test_an_evaluation_run_honours_the_umask(model_dir, text_file, tmp_path, umask):
    umask(0o027)
    out = tmp_path / "out"
    main, argv = commands(model_dir, text_file, out)["eval_ppl"]
    main(argv)
    modes = {path.name: path.stat().st_mode & 0o777 for path in [out, *out.iterdir()]}
    assert modes == {"out": 0o750} | {path.name: 0o640 for path in out.iterdir()}, modes


def interrupt_at_epoch(monkeypatch, epoch: int):
    """Ctrl-C (the KeyboardInterrupt Python raises for SIGINT) during training epoch `epoch`."""
    real = training._train_epoch

    def train_epoch(model, loader, optimizer, scheduler, accelerator, config, current):
        if current == epoch:
            raise KeyboardInterrupt
        return real(model, loader, optimizer, scheduler, accelerator, config, current)

    monkeypatch.setattr(training, "_train_epoch", train_epoch)


@pytest.mark.parametrize("epoch", [1, 2])
def test_ctrl_c_in_training_names_the_checkpoint_and_the_command(epoch, text_file, tmp_path, monkeypatch, capsys):
    import shlex

    out = tmp_path / "run"
    script = load_script("train")
    argv = ["--text-file", str(text_file), "--out", str(out), *TRAIN_FLAGS, "--epochs", "2"]
    with monkeypatch.context() as patch:
        interrupt_at_epoch(patch, epoch)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            script.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 130 and len(err) == 1, err
    if epoch == 2:
        expected = f"interrupted: the checkpoint after epoch 1 is in {out / 'last'}; continue with: "
        assert err[0] == expected + f"python examples/train.py --resume {out}"
        assert (out / "last" / training.TRAINER_STATE).is_file() and (out / "best").is_dir()
    else:
        assert err[0].startswith(f"interrupted: no checkpoint yet in {out} (the first epoch had not ended)"), err
    command = shlex.split(err[0].split("with: ")[1])
    assert command[:2] == ["python", "examples/train.py"]
    script.main(command[2:])  # the command it names finishes the run
    records = json.loads((out / "results.json").read_text())["epochs"]
    assert [record["epoch"] for record in records] == [1, 2]


def test_a_real_ctrl_c_stops_training_with_one_line_and_status_130(text_file, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO_ROOT

    out = tmp_path / "run"
    argv = [sys.executable, str(REPO_ROOT / "examples/train.py"), "--text-file", str(text_file), "--out", str(out)]
    argv += [*TRAIN_FLAGS, "--epochs", "200", "--patience", "200", "--threads", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:  # wait for the first checkpoint, then press Ctrl-C
        if line.startswith("epoch 1:"):
            process.send_signal(signal.SIGINT)
            break
    process.stdout.read()
    err = [line for line in process.stderr.read().splitlines() if line.strip()]
    assert process.wait(timeout=300) == 130, err
    assert len(err) == 1 and err[0].startswith("interrupted: the checkpoint after epoch "), err
    assert f"continue with: python examples/train.py --resume {out}" in err[0]
    assert (out / "last" / training.TRAINER_STATE).is_file()


def test_ctrl_c_during_scoring_says_nothing_was_written(model_dir, text_file, tmp_path, monkeypatch, capsys):
    from ka_hf.study.evaluation import run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "score_modes", interrupted)
    out = tmp_path / "out"
    main, argv = commands(model_dir, text_file, out)["eval_ppl"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 130 and len(err) == 1, err
    assert err[0].startswith(f"interrupted: no results were written to {out}"), err
    assert not out.exists()
