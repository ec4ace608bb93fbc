"""The facts preset (issue: powered answers) runs every stage; the study refuses bad numbers before any work, a
failed start does not block its own retry, and Ctrl-C prints where the run is and how to continue it."""

import json
import subprocess
import sys

import pytest

from ka_hf.study import experiment

from conftest import REPO_ROOT, refused_at_once


def test_facts_preset_runs_every_stage_in_smoke_mode(tmp_path):
    out = tmp_path / "facts"
    done = subprocess.run(
        [sys.executable, "-m", "ka_hf.experiment", "--preset", "facts", "--smoke", "--out", str(out), "--no-progress"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["preset"] == "facts" and record["config"]["fact_repeats"] == 10
    questions = [check["question"] for check in record["power"]]
    assert "reversal curse (standard-trained model)" in questions and "reversal curse (ka-trained model)" in questions
    assert all(set(check) >= {"question", "check", "value", "threshold", "passed"} for check in record["power"])
    assert set(record["name_ranks"]["standard"]) == {"kv", "ka", "ka-hybrid", "ka+adapter(distilled)"}
    assert set(record["name_ranks"]["ka"]) == {"ka"} and set(record["name_ranks_unseen"]) == {"standard", "ka"}
    assert set(record["distributions"]) == {"ka", "ka+adapter(least-squares)", "ka+adapter(distilled)"}
    report = (out / "report.md").read_text()
    for text in ("## Power", "right name's rank among all trained names", "Hypothesis 1, measured", "Stopped by:"):
        assert text in report, text
    assert (out / "a_vs_v.png").stat().st_size > 0
    # a smoke run's facts are not learned: its reversal verdicts say so instead of answering
    verdicts = record["findings"]["verdicts"]
    assert verdicts["reversal_standard"]["text"].startswith("not answered: standard model forward exact match")
    assert "not answered:" in report


def test_the_facts_training_text_holds_each_forward_sentence_repeats_times(tmp_path):
    from ka_hf.study.facts import fact_sentences, make_facts

    config = experiment.ExperimentConfig.from_preset("facts", str(tmp_path), facts=3, fact_repeats=4, corpus_texts=5)
    data = experiment.prepare_data(config, tmp_path)
    lines = (tmp_path / "data" / "train.txt").read_text().splitlines()
    forward = [s.text for s in fact_sentences(make_facts(3, config.facts_seed), "forward", "train")]
    assert all(lines.count(text) == 4 for text in forward)
    backward = [s.text for s in fact_sentences(make_facts(3, config.facts_seed), "backward", "train")]
    assert not set(backward) & set(lines)  # forward only
    assert len(lines) == 5 + 4 * len(forward) and data["facts"]["repeats"] == 4


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--facts", "0"], "--facts must be at least 2"),
        (["--facts", "1"], "--facts must be at least 2"),
        (["--fact-repeats", "0"], "--fact-repeats must be at least 1"),
        (["--epochs", "0"], "epochs is too small"),
        (["--samples", "0"], "samples is too small"),
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--facts", "99999999"], "--facts must be at most"),
    ],
)
def test_study_numbers_refused_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    line = refused_at_once(experiment.main, ["--out", str(out), "--no-progress", *flags], capsys)
    assert message in line
    assert not out.exists()  # nothing written


def test_a_failed_start_does_not_block_its_retry(tmp_path, capsys):
    out = tmp_path / "run"
    one_text = tmp_path / "one.txt"
    one_text.write_text("A single text is too little to hold out a validation part.\n")
    with pytest.raises(SystemExit) as failed:
        experiment.main(["--out", str(out), "--no-progress", "--text-file", str(one_text)])
    assert failed.value.code == 2 and (out / experiment.STUDY_CONFIG).is_file()
    assert not experiment.holds_a_run(out)
    # the retry (other settings) starts instead of being refused as "already holds a study run"
    config = experiment.ExperimentConfig.from_preset("quick", str(out), smoke=True, progress=False)
    assert experiment.prepare_out_dir(config) == out
    (out / "train-standard").mkdir()  # once a model is trained, the folder is a run and is kept
    with pytest.raises(experiment.KAError, match="already holds a study run"):
        experiment.prepare_out_dir(config)


def test_ctrl_c_names_the_folder_and_the_resume_command(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment.command, "run_experiment", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(["--preset", "facts", "--out", str(out), "--no-progress", "--seeds", "2"])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted: ") and str(out) in err[0]
    assert f"python -m ka_hf.experiment --preset facts --out {out} --seeds 2 --resume" in err[0]
