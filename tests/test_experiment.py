"""The whole study, smaller than the quick preset, end to end: every report file written, every table filled."""

import json
import subprocess
import sys

import pytest

from ka_hf.errors import KAError
from ka_hf.study.experiment import PRESETS, ExperimentConfig, run_experiment

from conftest import REPO_ROOT

TINY = dict(
    num_layers=2,
    hidden_size=32,
    num_heads=2,
    intermediate_size=64,
    vocab_size=320,
    seq_len=32,
    samples=48,
    val_samples=8,
    epochs=2,
    batch_size=8,
    facts=4,
    eval_max_length=32,
    eval_stride=16,
    eval_max_windows=4,
    adapter_fit_blocks=4,
    distill_steps=2,
    distill_batch=2,
    reversal_split="test",
    progress=False,
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, run_experiment(ExperimentConfig.from_preset("quick", str(out), **TINY))


def test_every_report_file_is_written(study):
    out, record = study
    for name in ("report.md", "results.json", "training_curves.png", "nll_gap_by_position.png", "layer_sweep.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for model in ("train-standard", "train-ka"):
        assert (out / model / "best" / "model.safetensors").is_file()
    for adapter in ("least-squares", "distilled"):
        assert (out / "adapters" / adapter / "adapter_config.json").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["findings"]["kv_ppl"] == pytest.approx(record["findings"]["kv_ppl"])


def test_report_tables_are_filled_from_this_run(study):
    out, record = study
    text = (out / "report.md").read_text()
    for heading in (
        "## Configuration",
        "## Training results (standard attention)",
        "## Training results (exact KA attention)",
        "## Inference evaluation (standard-trained model)",
        "### Training vs inference",
        "### Where does the degradation come from?",
        "## Adapter (plan 1)",
        "## Reversal curse",
    ):
        assert heading in text, heading
    assert "nan" not in text.lower().replace("nancy", "")
    standard = {r["mode"]: r for r in record["inference"]["standard"]}
    assert set(standard) == {"kv", "ka", "ka-hybrid", "ka+adapter(least-squares)", "ka+adapter(distilled)"}
    assert f"{standard['ka']['ppl']:.1f}" in text and f"{standard['kv']['ppl']:.1f}" in text
    degradation = (standard["ka"]["ppl"] / standard["kv"]["ppl"] - 1) * 100
    assert record["findings"]["ka_cache_degradation_pct"] == pytest.approx(degradation)
    assert len(record["layer_sweep"]) == 2 and record["layer_sweep"][-1]["ppl"] == pytest.approx(standard["ka"]["ppl"])
    assert all(len(record["training"][a]["epochs"]) >= 1 for a in ("standard", "ka"))
    assert set(record["reversal"]["standard"]) >= {"kv", "ka"}


def test_models_record_the_facts_they_saw(study):
    out, _ = study
    config = json.loads((out / "train-ka" / "best" / "config.json").read_text())
    assert config["ka"]["attention"] == "ka" and config["ka_provenance"]["training"]["facts"]["n"] == TINY["facts"]


def test_presets_and_errors():
    assert PRESETS["seed"]["samples"] == 5000 and PRESETS["seed"]["lr"] == 1e-4 and PRESETS["seed"]["batch_size"] == 8
    with pytest.raises(KAError, match="preset"):
        ExperimentConfig.from_preset("huge", "x")


def test_command_line_reports_a_bad_file_clearly(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ka_hf.experiment",
            "--out",
            str(tmp_path / "o"),
            "--text-file",
            str(tmp_path / "missing.txt"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr


def test_each_model_can_be_published_with_its_results(study):
    from ka_hf.study import hub

    out, record = study
    found = hub.find_results(out / "train-ka" / "best")
    assert set(found) == {"train", "eval", "reversal"}
    card = hub.build_card(out / "train-ka" / "best", found)
    values = [metric.metric_value for metric in card.data.eval_results]
    assert record["inference"]["ka"][1]["ppl"] in values


def test_the_study_writes_the_records_the_scripts_write(study):
    from ka_hf.study import records

    out, _ = study
    assert isinstance(records.read(out / "results.json"), records.StudyRecord)
    for model in ("train-standard", "train-ka"):
        assert isinstance(records.read(out / model / "results.json", "train"), records.TrainRecord)
        assert isinstance(records.read(out / model / "eval" / "results.json", "eval"), records.EvalRecord)
        assert isinstance(records.read(out / model / "reversal" / "results.json", "reversal"), records.ReversalRecord)


def test_an_interrupted_study_resumes(study, tmp_path, capsys):
    """A copy of the finished run, with the KA model's training cut back to "no checkpoint yet" and the report gone
    (as after a crash): --resume keeps the data, tokenizer and standard model, trains the KA model again and
    writes the report; the same flags are needed."""
    import shutil

    from ka_hf.study import experiment

    out, record = study
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "train-ka" / "last")
    (copy / "report.md").unlink()
    tokenizer_before = (copy / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    standard_before = (copy / "train-standard" / "best" / "model.safetensors").read_bytes()

    with pytest.raises(KAError, match="other settings .epochs"):
        run_experiment(ExperimentConfig.from_preset("quick", str(copy), **(TINY | {"epochs": 3})), resume=True)
    resumed = run_experiment(ExperimentConfig.from_preset("quick", str(copy), **TINY), resume=True)
    assert (copy / "report.md").is_file() and (copy / "train-ka" / "last").is_dir()
    assert (copy / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == tokenizer_before
    assert (copy / "train-standard" / "best" / "model.safetensors").read_bytes() == standard_before
    assert resumed["findings"]["kv_ppl"] == pytest.approx(record["findings"]["kv_ppl"])
    assert resumed["training"]["ka"]["best_val_ppl"] == pytest.approx(record["training"]["ka"]["best_val_ppl"])
    assert experiment.STUDY_CONFIG in {path.name for path in copy.iterdir()}


def test_readme_excerpt_is_rewritten_from_the_run(study, tmp_path, capsys):
    """tools/readme_excerpts.py fills README.md's marked excerpt from a run's report.md and results.json only:
    the rest of the README is kept, a second run changes nothing, and every number in it comes from the run."""
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("readme_excerpts", REPO_ROOT / "tools" / "readme_excerpts.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, record = study
    readme = tmp_path / "README.md"
    readme.write_text((REPO_ROOT / "README.md").read_text())
    original = readme.read_text()
    assert tool.main([str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert tool.main([str(out), "--readme", str(readme), "--check"]) == 0 and readme.read_text() == text
    outside = original.split(tool.BEGIN)[0], original.split(tool.END)[1]
    assert (text.split(tool.BEGIN)[0], text.split(tool.END)[1]) == outside
    block = text.split(tool.BEGIN)[1].split(tool.END)[0]
    report_text = (out / "report.md").read_text()
    assert tool.comparison_table(report_text) in block and tool.comparison_table(report_text).count("\n") >= 6
    kv = record["reversal"]["standard"]["kv"]["splits"]["test"]
    assert f"{kv['forward']['answer_ppl']:.1f} forward vs {kv['backward']['answer_ppl']:.1f} backward" in block

    def leaves(value):
        if isinstance(value, dict):
            return [leaf for item in value.values() for leaf in leaves(item)]
        if isinstance(value, list):
            return [leaf for item in value for leaf in leaves(item)]
        return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []

    from_run = set(re.findall(r"\d[\d,]*(?:\.\d+)?", report_text))
    saved = json.loads((out / "results.json").read_text())
    from_run |= {f"{leaf:,.{digits}f}" for leaf in leaves(saved) for digits in range(4)}
    numbers = re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?", block.replace("4.7×", ""))  # (4.7: the original's)
    assert numbers and [n for n in numbers if n not in from_run] == []

    readme.write_text(original.replace(tool.END, ""))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(out), "--readme", str(readme)])
    assert exit_info.value.code == 2 and "exactly one" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(tmp_path / "no-run"), "--readme", str(REPO_ROOT / "README.md")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
