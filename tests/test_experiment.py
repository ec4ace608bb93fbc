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
    assert saved["findings"]["summary"]["kv_ppl"]["mean"] == pytest.approx(record["findings"]["per_seed"][0]["kv_ppl"])


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
    assert record["findings"]["per_seed"][0]["ka_cache_degradation_pct"] == pytest.approx(degradation)
    assert len(record["layer_sweep"]) == 2 and record["layer_sweep"][-1]["ppl"] == pytest.approx(standard["ka"]["ppl"])
    scored = record["inference"]["standard"] + record["inference"]["ka"] + record["layer_sweep"]
    assert len({(r["scored_tokens"], r["targets_checksum"]) for r in scored}) == 1  # every model x mode, same targets
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
    (copy / experiment.SEED_RESULTS).unlink()  # written when a seed finishes: a crash mid-seed leaves none
    tokenizer_before = (copy / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    standard_before = (copy / "train-standard" / "best" / "model.safetensors").read_bytes()

    with pytest.raises(KAError, match="other settings .epochs"):
        run_experiment(ExperimentConfig.from_preset("quick", str(copy), **(TINY | {"epochs": 3})), resume=True)
    resumed = run_experiment(ExperimentConfig.from_preset("quick", str(copy), **TINY), resume=True)
    assert (copy / "report.md").is_file() and (copy / "train-ka" / "last").is_dir()
    assert (copy / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == tokenizer_before
    assert (copy / "train-standard" / "best" / "model.safetensors").read_bytes() == standard_before
    kv_ppl = record["findings"]["per_seed"][0]["kv_ppl"]
    assert resumed["findings"]["per_seed"][0]["kv_ppl"] == pytest.approx(kv_ppl)
    assert resumed["training"]["ka"]["best_val_ppl"] == pytest.approx(record["training"]["ka"]["best_val_ppl"])
    assert experiment.STUDY_CONFIG in {path.name for path in copy.iterdir()}


def test_every_count_in_the_report_comes_from_the_run(study):
    """The configuration table's counts are the run's own (blocks actually trained on, windows, tokens, facts),
    not the settings asked for."""
    out, record = study
    text = (out / "report.md").read_text()
    trained = record["training"]["standard"]["train_blocks"]
    saved = json.loads((out / "train-standard" / "results.json").read_text())
    assert trained == saved["data"]["train_blocks"] and trained > 0
    assert f"{trained:,} blocks of {TINY['seq_len']} tokens" in text
    windows = record["windows"]
    assert f"{windows['count']} windows of {windows['max_length']} tokens" in text
    assert f"{windows['scored_tokens']:,} scored tokens" in text
    data = record["data"]
    assert f"{data['train_texts']:,} training texts + {data['fact_texts']:,} fact sentences" in text
    assert f"{record['model']['parameters'] / 1e6:.2f}M parameters" in text
    assert f"{data['unseen_facts']} unseen facts" in text


def test_the_report_shows_the_unseen_facts_control_beside_the_reversal_metrics(study):
    out, record = study
    text = (out / "report.md").read_text()
    section = text[text.index("## Reversal curse") :]
    assert "Trained facts beside the unseen-facts control" in section
    assert "**unseen facts, test templates**" in section and "**trained facts, test templates**" in section
    control = record["findings"]["per_seed"][0]["reversal_control"]["standard"]
    assert f"{control['unseen']['backward_answer_ppl']:.2f}" in section
    assert record["findings"]["verdicts"]["reversal_standard"]["text"] in section
    unseen = record["reversal_unseen"]["standard"]["kv"]["splits"]["test"]["forward"]
    assert unseen["sentences"] > 0 and unseen["exact_match"] is None  # scored, not generated


def test_every_verdict_is_in_the_report_with_its_numbers(study):
    out, record = study
    text = (out / "report.md").read_text()
    for name, verdict in record["findings"]["verdicts"].items():
        assert verdict["text"] in text, name
    # a tiny run knows none of its facts: the reversal question is not answered, and the report says why
    assert "not answered: standard model forward exact match, held-out templates (mean over seeds) was 0," in text
    assert "## Power" in text and "one measurement" in text


def test_several_seeds_give_mean_and_spread(tmp_path):
    out = tmp_path / "seeds"
    record = run_experiment(
        ExperimentConfig.from_preset("quick", str(out), **(TINY | dict(epochs=1, samples=16, seeds=2)))
    )
    assert [seed["seed"] for seed in record["seeds"]] == [0, 1]
    for seed in (0, 1):
        assert (out / f"seed-{seed}" / "train-ka" / "best" / "model.safetensors").is_file()
    kv = [seed["findings"]["kv_ppl"] for seed in record["seeds"]]
    assert kv[0] != kv[1]  # different initializations
    assert record["findings"]["summary"]["kv_ppl"]["values"] == kv
    text = (out / "report.md").read_text()
    assert "mean ± std over 2 seeds" in text and " ± " in text
    assert "--seeds 2" in record["command"]
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["seeds"]) == 2

    # a finished seed is kept by --resume: nothing is trained again
    before = (out / "seed-1" / "train-ka" / "best" / "model.safetensors").stat().st_mtime_ns
    config = ExperimentConfig.from_preset("quick", str(out), **(TINY | dict(epochs=1, samples=16, seeds=2)))
    resumed = run_experiment(config, resume=True)
    assert (out / "seed-1" / "train-ka" / "best" / "model.safetensors").stat().st_mtime_ns == before
    assert resumed["findings"]["summary"]["kv_ppl"]["values"] == kv


def test_the_seed_preset_runs_every_stage_in_smoke_mode(tmp_path):
    """--preset seed --smoke: the original protocol's model (Pythia-70M shape), every stage, a few steps."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ka_hf.experiment",
            "--preset",
            "seed",
            "--smoke",
            "--no-progress",
            "--out",
            str(tmp_path / "seed"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "seed" / "results.json").read_text())
    assert record["config"]["preset"] == "seed" and record["config"]["smoke"]
    assert record["model"]["num_layers"] == PRESETS["seed"]["num_layers"]
    assert record["model"]["hidden_size"] == PRESETS["seed"]["hidden_size"]
    text = (tmp_path / "seed" / "report.md").read_text()
    assert "the Pile" in text and "--smoke" in text


def test_the_medium_preset_reads_wikitext2():
    from ka_hf.study.data import shared_data_dir

    if not (shared_data_dir() / "wikitext-2-raw" / "train.txt").is_file():
        pytest.skip("../shared/data/wikitext-2-raw is absent: the medium preset would use the Hub dataset")
    config = ExperimentConfig.from_preset("medium", "x")
    assert config.text_file.endswith("wikitext-2-raw/train.txt") and config.test_text_file.endswith("test.txt")
    assert config.seq_len == 256


def test_bad_seed_counts_are_refused():
    with pytest.raises(KAError, match="--seeds"):
        ExperimentConfig.from_preset("quick", "x", seeds=0)


def fact_direction(line: str, fact) -> str:
    """forward when the line names the person before the description ("A is B"), backward otherwise: read from the
    fact's fields, not from ka_hf.study.facts' templates."""
    text = line.lower()
    return "forward" if text.index(fact.name.lower()) < text.index(fact.description.lower()) else "backward"


@pytest.mark.parametrize("include", ["forward", "backward", "both"])
def test_training_data_holds_the_fact_directions_it_records(tmp_path, include):
    """The study trains what it records: train.txt holds every fact in the recorded direction(s), every training
    template once, and nothing of the other direction."""
    from collections import Counter

    from ka_hf.study.experiment import prepare_data
    from ka_hf.study.facts import TEMPLATES, fact_sentences, make_facts, unseen_facts

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Plain line {i} of the corpus, about nobody in particular.\n" for i in range(40)))
    config = ExperimentConfig.from_preset(
        "quick", str(tmp_path / "out"), text_file=str(corpus), facts=12, facts_seed=3, facts_include=include
    )
    data = prepare_data(config, tmp_path / "out")
    lines = (tmp_path / "out" / "data" / "train.txt").read_text().splitlines()
    facts = make_facts(12, seed=3)
    wanted = ("forward", "backward") if include == "both" else (include,)

    fact_lines = [line for line in lines if any(fact.name in line for fact in facts)]
    rendered = [s.text for direction in wanted for s in fact_sentences(facts, direction, "train")]
    assert sorted(fact_lines) == sorted(rendered)  # facts.py's own sentences, each once
    assert len(lines) == 36 + len(fact_lines)  # the corpus's first nine tenths train
    for fact in facts:  # independently of facts.py: the plainest sentence of each direction, and every line's order
        description = fact.description
        assert (f"{fact.name} is {description}." in lines) == ("forward" in wanted)
        assert (f"{description[0].upper()}{description[1:]} is {fact.name}." in lines) == ("backward" in wanted)
        directions = Counter(fact_direction(line, fact) for line in lines if fact.name in line)
        assert directions == {direction: len(TEMPLATES[(direction, "train")]) for direction in wanted}
    assert data["facts"] == dict(n=12, seed=3, include=include, repeats=1) and data["fact_texts"] == len(fact_lines)
    control = unseen_facts(facts, config.n_unseen_facts, seed=3)  # the control facts are never trained on
    assert len(control) == 12 and not any(fact.name in line for fact in control for line in lines)


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


def test_a_finished_report_can_be_rewritten_from_its_results(study, tmp_path):
    """python -m ka_hf.study.experiment_report DIR: the same report from results.json alone (no models needed)."""
    import shutil

    out, _ = study
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(out / "results.json", copy / "results.json")
    result = subprocess.run(
        [sys.executable, "-m", "ka_hf.study.experiment_report", str(copy)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (copy / "report.md").read_text() == (out / "report.md").read_text()
    assert (copy / "layer_sweep.png").is_file()
    missing = subprocess.run(
        [sys.executable, "-m", "ka_hf.study.experiment_report", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error:")
