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

    monkeypatch.setattr(experiment, "prepare_data", stop)
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
