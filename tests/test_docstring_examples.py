"""Every command a script's docstring shows runs as written (issue 13: "every docstring example in the repo is
executed by a test").

Scope: each `python examples/...` line in the docstrings of examples/*.py, run in that order (train, fit_adapter,
eval_ppl, reversal_curse, push_to_hub: later commands read what earlier ones wrote, as a reader following the
docstrings would), in-process, in a scratch folder that plays the repository root. To stay fast each command gets
tiny settings: a 2-layer model (TINY_TRAIN_FLAGS), few blocks, windows and facts, no progress bars; a
../shared/data file is read cut to its first lines. A command that would upload runs with --dry-run. Not run here:
`accelerate launch` / `torchrun` lines (several processes: test_evaluation's two-process test) and the
benchmarks' docstrings (they measure for minutes). The study's `python -m ka_hf.experiment` lines are parsed by
its main() up to the study itself (a whole study is test_experiment's)."""

import ast
import shlex

import pytest

from ka_hf.study import experiment

from conftest import REPO_ROOT, SHARED_DATA, TINY_TRAIN_FLAGS, load_script

ORDER = ["train", "fit_adapter", "eval_ppl", "reversal_curse", "push_to_hub"]
TINY = {
    "train": [*TINY_TRAIN_FLAGS, "--num-layers", "2", "--samples", "8", "--val-samples", "2"],
    "fit_adapter": ["--samples", "4", "--val-samples", "2", "--batch-size", "2", "--no-progress"],
    "eval_ppl": ["--max-windows", "2", "--no-progress"],
    "reversal_curse": ["--no-exact-match", "--no-progress"],
    "push_to_hub": [],
}
CAPS = {"--distill-steps": 2, "--facts": 6}  # at most this many, where a command names them
SHARED_LINES = 200  # lines of a ../shared/data file a command reads here


def docstring_commands(path) -> list[str]:
    """The shell commands in a file's docstring: indented lines, continuation lines joined, comments dropped."""
    text = ast.get_docstring(ast.parse(path.read_text()))
    commands, pending = [], ""
    for line in text.splitlines():
        if not line.startswith("    ") and not pending:
            continue
        line = pending + " " + line.strip() if pending else line.strip()
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        pending = ""
        command = line.split("  #")[0].strip()
        if command.startswith(("python ", "accelerate ", "torchrun ")):
            commands.append(command)
    return commands


def test_every_script_shows_commands():
    scripts = sorted(path.stem for path in (REPO_ROOT / "examples").glob("*.py"))
    assert scripts == sorted(ORDER)
    for name in ORDER:
        assert any(c.startswith("python examples/") for c in docstring_commands(REPO_ROOT / f"examples/{name}.py"))


def shrink(script: str, argv: list[str], scratch) -> list[str]:
    """The command's own argv with tiny settings (see the module docstring)."""
    argv = list(argv)
    for index, word in enumerate(argv):
        if word.startswith("../shared/data/"):
            argv[index] = str(head_of(SHARED_DATA / word.removeprefix("../shared/data/"), scratch))
        if word in CAPS and index + 1 < len(argv):
            argv[index + 1] = str(min(int(argv[index + 1]), CAPS[word]))
    if script == "push_to_hub" and "--dry-run" not in argv:  # an upload: assemble the folder, upload nothing
        argv += ["--dry-run", "--out", str(scratch / f"hub-{len(list(scratch.glob('hub-*')))}")]
    return argv + TINY[script]


def head_of(path, scratch):
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    head = scratch / "shared-heads" / path.parent.name / path.name
    if not head.is_file():
        head.parent.mkdir(parents=True, exist_ok=True)
        head.write_text("".join(path.open().readlines()[:SHARED_LINES]))
    return head


def test_every_docstring_command_runs(tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.chdir(tmp_path)  # "runs/..." in the commands lands here
    ran = []
    for name in ORDER:
        for command in docstring_commands(REPO_ROOT / f"examples/{name}.py"):
            if not command.startswith("python "):
                continue  # accelerate launch / torchrun: see the module docstring
            words = shlex.split(command)
            script = words[1].removeprefix("examples/").removesuffix(".py")
            load_script(script).main(shrink(script, words[2:], scratch))
            ran.append(command)
    assert len(ran) >= 14, ran
    out = capsys.readouterr().out
    assert "held-out text:" in out and "dry run:" in out
    for folder in ("runs/standard/best", "runs/ka/best", "runs/wiki/best", "runs/standard/adapter"):
        assert (tmp_path / folder).is_dir(), folder
    for results in ("runs/standard/eval", "runs/standard/eval-wikitext", "runs/standard/adapter-eval"):
        assert (tmp_path / results / "results.json").is_file(), results


class StudyReached(Exception):
    pass


def test_study_docstring_commands_parse(tmp_path, monkeypatch):
    """Each `python -m ka_hf.experiment` line in the study's docstring reaches the study with its settings."""
    reached = []

    def run_experiment(config, overwrite, resume):
        reached.append((config, overwrite, resume))
        raise StudyReached

    monkeypatch.setattr(experiment.command, "run_experiment", run_experiment)
    commands = docstring_commands(REPO_ROOT / "ka_hf/study/experiment/__init__.py")
    assert commands and all(c.startswith("python -m ka_hf.experiment ") for c in commands)
    for command in commands:
        argv = shlex.split(command)[3:]
        with pytest.raises(StudyReached):
            experiment.main(argv)
        config, overwrite, resume = reached[-1]
        assert config.out == argv[argv.index("--out") + 1]
        assert (overwrite, resume) == ("--overwrite" in argv, "--resume" in argv)


# ---------------------------------------------------------------------------------------------------------
# The README's commands, as a user runs them in a fresh clone: in an empty folder that has the repository's
# examples/ (as a clone does) and no ../shared beside it, top to bottom, after the quick study they start with.

README_SKIPPED = (
    "pip ",  # installing: done here already
    "ruff ",  # the lint step of the test command
    "HF_HUB_OFFLINE=1 python -m pytest",  # the test suite itself
    "accelerate launch ",  # several processes: test_evaluation's two-process test
    "torchrun ",
)
README_TINY = {  # (the studies: every stage with a handful of steps, as --smoke runs it)
    "ka_hf.experiment": ["--smoke", "--no-progress"],
    "ka_hf.study.recall": ["--smoke", "--no-progress"],
    "ka_hf.lm_eval": ["--limit", "2"],
}


def readme_commands() -> list[str]:
    """The commands in README.md's ```bash blocks: continuation lines joined, comments dropped, `a && b` split,
    each distinct command once (the README shows the quick study's command twice)."""
    import re

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = re.split(r"\s#\s|^#", line)[0].strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return list(dict.fromkeys(commands))


@pytest.mark.slow
def test_every_readme_command_runs_in_a_fresh_clone(tmp_path, monkeypatch, capsys):
    import sys

    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "examples").symlink_to(REPO_ROOT / "examples")
    monkeypatch.chdir(clone)
    monkeypatch.setenv("KA_HF_DATA", str(tmp_path / "no-shared-data"))  # the study's default data home: absent
    ran, skipped = [], []
    for command in readme_commands():
        if command.startswith(README_SKIPPED):
            skipped.append(command)
            continue
        words = shlex.split(command)
        assert words[0] == "python", f"a README command this test does not know how to run: {command}"
        assert not any("../shared" in word for word in words), f"reads data a fresh clone lacks: {command}"
        if words[1] == "-m":
            module, argv = words[2], words[3:] + README_TINY.get(words[2], [])
            if module == "ka_hf.experiment":
                experiment.main(argv)
            elif module == "ka_hf.study.recall":
                from ka_hf.study.recall.experiment import main as recall_main

                recall_main(argv)
            elif module == "ka_hf.lm_eval":
                pytest.importorskip("lm_eval")
                from ka_hf.lm_eval.__main__ import main

                monkeypatch.setattr(sys, "argv", ["python -m ka_hf.lm_eval", *argv])
                main()
            else:
                raise AssertionError(f"a README command this test does not know how to run: {command}")
        else:
            script = words[1].removeprefix("examples/").removesuffix(".py")
            load_script(script).main(shrink(script, words[2:], tmp_path))
        ran.append(command)
    assert len(ran) >= 10 and any("ka_hf.lm_eval" in c for c in ran), ran
    assert {c.split()[0] for c in skipped} <= {"pip", "ruff", "HF_HUB_OFFLINE=1", "accelerate", "torchrun"}
    out = capsys.readouterr().out
    assert "quick_study_validation" in out and "dry run:" in out
    for results in ("runs/quick/report.md", "runs/quick-eval/results.json", "R/results.json"):
        assert (clone / results).is_file(), results
