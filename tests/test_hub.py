"""Tests for ka_hf.study.hub and examples/push_to_hub.py: tiny models, real training/eval/reversal results, no
network."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants
from transformers import AutoModelForCausalLM

import ka_hf
from ka_hf.adapters import KAAdapter, save_adapter
from ka_hf.errors import KAError
from ka_hf.study import hub
from ka_hf.study.data import default_corpus
from ka_hf.study.evaluation import PplRun, run_ppl_eval
from ka_hf.study.fit_adapters import fit_adapter_least_squares
from ka_hf.study.models import load_tokenizer, model_config
from ka_hf.study.records import AdapterFitRecord
from ka_hf.study.training import TrainConfig, train

from conftest import TINY_TRAIN, load_script

TINY_RUN = TINY_TRAIN | dict(vocab_size=300, seq_len=16, samples=16, val_samples=4, epochs=1)


push_script = load_script("push_to_hub")


@pytest.fixture(scope="module")
def ka_run(tmp_path_factory):
    """A KA-trained tiny model with the results.json of its training, of eval_ppl and of reversal_curse, laid out as
    the scripts write them: runs/ka/{results.json, best/, eval/results.json, reversal/results.json}."""
    root = tmp_path_factory.mktemp("runs")
    text_file = root / "train.txt"
    text_file.write_text("\n".join(text.replace("\n", " ") for text in default_corpus("train")[:20]))
    result = train(TrainConfig(out=str(root / "ka"), text_file=str(text_file), attention="ka", **TINY_RUN))
    run_ppl_eval(
        PplRun(
            model=str(result.best_dir),
            out=str(result.out_dir / "eval"),
            text_file=str(text_file),
            modes="kv,ka",
            max_length=16,
            stride=16,
            max_windows=2,
            progress=False,
        )
    )
    load_script("reversal_curse").main(
        [
            "--model",
            str(result.best_dir),
            "--facts",
            "2",
            "--modes",
            "kv,ka",
            "--templates",
            "test",
            "--no-exact-match",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(result.out_dir / "reversal"),
        ]
    )
    return result


@pytest.fixture(scope="module")
def published(ka_run, tmp_path_factory):
    """The dry-run folder of the KA run, made by the script with the results it found on its own."""
    folder = tmp_path_factory.mktemp("hub") / "folder"
    push_script.main(
        [
            "--model",
            str(ka_run.best_dir),
            "--repo-id",
            "alice/tiny-ka",
            "--dry-run",
            "--folder",
            str(folder),
            "--license",
            "apache-2.0",
        ]
    )
    return folder


def sample_ids(vocab: int, shape=(2, 12)):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(0))


def front_matter(readme: Path) -> dict:
    _, header, _ = readme.read_text().split("---\n", 2)
    return yaml.safe_load(header)


# ---------------------------------------------------------------------------------------------------------
# The folder loads back: identical logits, KA by default


def test_dry_run_folder_loads_back_running_ka_by_default(ka_run, published):
    names = {str(path.relative_to(published)) for path in published.rglob("*") if path.is_file()}
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "results/train.json",
        "results/eval.json",
        "results/reversal.json",
    } <= names
    assert json.loads((published / "config.json").read_text())["ka"]["attention"] == "ka"

    model, tokenizer, adapter = ka_hf.load_ka_model(str(published))
    assert adapter is None and tokenizer is not None and ka_hf.ka_spec(model.config) is not None
    original = AutoModelForCausalLM.from_pretrained(str(ka_run.best_dir), attn_implementation="sdpa").eval()
    ids = sample_ids(len(tokenizer))
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, original(ids).logits)  # the same weights, the same attention
        assert torch.allclose(logits, model(ids, cache=ka_hf.KACache()).logits, atol=1e-5)  # plain forward = KA
        ka_hf.disable_ka(model)
        standard = model(ids).logits
        ka_hf.enable_ka(model)
    assert not torch.allclose(logits, standard, atol=1e-3)  # so KA really was on without being asked for

    prompt = ids[:1, :5]
    default = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    explicit = model.generate(
        prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id, cache=ka_hf.KACache()
    )
    assert torch.equal(default, explicit)


# ---------------------------------------------------------------------------------------------------------
# The card: YAML, model-index = the JSON, the sections


def expected_index(ka_run) -> dict:
    """{(metric name, split): value} straight from the three results.json files."""
    train_record = json.loads((ka_run.out_dir / "results.json").read_text())
    eval_record = json.loads((ka_run.out_dir / "eval" / "results.json").read_text())
    reversal_record = json.loads((ka_run.out_dir / "reversal" / "results.json").read_text())
    expected = {("val PPL (training, best epoch)", "validation"): train_record["best_val_ppl"]}
    split = eval_record["run"]["split"]
    expected |= {(f"PPL ({r['mode']})", split): r["ppl"] for r in eval_record["results"]}
    for mode, record in reversal_record["results"].items():
        summary = record["splits"]["test"]
        metrics = {
            "forward PPL": summary["forward"]["ppl"],
            "backward PPL": summary["backward"]["ppl"],
            "ratio": summary["ratio"],
            "answer ratio": summary["answer_ratio"],
            "forward exact match": summary["forward"]["exact_match"],  # None: --no-exact-match, so not in the index
            "backward exact match": summary["backward"]["exact_match"],
        }
        expected |= {
            (f"reversal {label} ({mode})", "test"): value for label, value in metrics.items() if value is not None
        }
    return expected


def test_card_yaml_parses_and_its_model_index_equals_the_json(ka_run, published):
    meta = front_matter(published / "README.md")
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert {"ka-cache", "ka-trained", "gpt_neox"} <= set(meta["tags"])
    assert meta["model-index"][0]["name"] == "tiny-ka"

    card = ModelCard.load(published / "README.md")
    index = {(r.metric_name, r.dataset_split): r.metric_value for r in card.data.eval_results}
    assert index == expected_index(ka_run)
    assert all(r.task_type == "text-generation" for r in card.data.eval_results)

    text = card.text
    for needle in (
        "a_i = Σ_{j<i} w_ij a_j + w_ii v_i",
        'from_pretrained("alice/tiny-ka")',
        "import ka_hf",
        "KACache",
        "## Training",
        "| Epoch | Train PPL | Val PPL |",
        "## Evaluation: KV vs KA",
        "| mode | PPL | vs kv (%) |",
        "## Reversal curse",
        "| mode | fwd PPL | bwd PPL | ratio |",
        "## Limitations",
        "(n_kv + n_q) / (2 n_kv)",
        "The Reversal Curse",
        "arXiv:2309.12288",
    ):
        assert needle in text, needle


def test_missing_results_are_left_out_and_others_are_ignored(ka_run, tmp_path):
    # an eval of another model next to this one is not this model's
    other = ka_run.out_dir / "other_eval"
    record = json.loads((ka_run.out_dir / "eval" / "results.json").read_text())
    other.mkdir(exist_ok=True)
    (other / "results.json").write_text(json.dumps(record | {"model": {"path": "runs/other/best"}}))
    try:
        found = hub.find_results(ka_run.best_dir)
    finally:
        (other / "results.json").unlink()
    assert found == {
        "train": ka_run.out_dir / "results.json",
        "eval": ka_run.out_dir / "eval" / "results.json",
        "reversal": ka_run.out_dir / "reversal" / "results.json",
    }

    # training only: no evaluation or reversal section, one model-index entry
    card = hub.build_card(ka_run.best_dir, {"train": found["train"]})
    assert "## Training" in card.text and "## Evaluation" not in card.text and "## Reversal" not in card.text
    assert [r.metric_name for r in card.data.eval_results] == ["val PPL (training, best epoch)"]

    # an eval record with fields missing still gives its table (missing cells: –)
    for result in record["results"]:
        del result["tokens_per_s"], result["cache_bytes"]
    for key in ("windows", "environment", "method"):
        del record[key]
    (tmp_path / "eval.json").write_text(json.dumps(record))
    card = hub.build_card(ka_run.best_dir, {"eval": tmp_path / "eval.json"})
    assert "| kv |" in card.text and "## Training" not in card.text

    # reversal exact matches (when the run measured them) reach the model-index too
    reversal = json.loads((ka_run.out_dir / "reversal" / "results.json").read_text())
    reversal["results"]["kv"]["splits"]["test"]["forward"]["exact_match"] = 0.5
    (tmp_path / "reversal.json").write_text(json.dumps(reversal))
    card = hub.build_card(ka_run.best_dir, {"reversal": tmp_path / "reversal.json"})
    assert {r.metric_name: r.metric_value for r in card.data.eval_results}["reversal forward exact match (kv)"] == 0.5

    # no results at all: a card that still says how to run the model
    card = hub.build_card(ka_run.best_dir, {})
    assert card.data.eval_results is None and "generate()" in card.text


# ---------------------------------------------------------------------------------------------------------
# An adapter travels in adapter/ and reattaches


def test_adapter_folder_reattaches(ka_run, tmp_path):
    tokenizer = load_tokenizer(str(ka_run.best_dir))
    torch.manual_seed(0)
    config = model_config("llama", len(tokenizer), num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    model.save_pretrained(tmp_path / "standard" / "best")
    tokenizer.save_pretrained(tmp_path / "standard" / "best")
    ids = sample_ids(len(tokenizer), (4, 12))
    adapter = fit_adapter_least_squares(model, [ids], KAAdapter.for_model(model))
    adapter_dir = save_adapter(adapter, tmp_path / "standard" / "adapter")
    fit = {
        "model": "runs/standard/best",
        "adapter": str(adapter_dir),
        "val_blocks": 4,
        "seq_len": 12,
        "ppl": {
            "kv": 90.0,
            "ka": 120.0,
            "ka+adapter (least squares)": 100.0,
            "ka+adapter (least squares) gap recovered": 2 / 3,
        },
        "fit": adapter.fit_record,
    }
    (adapter_dir / "results.json").write_text(json.dumps(AdapterFitRecord(**fit, environment={}).to_dict()))

    folder = tmp_path / "folder"
    push_script.main(
        [
            "--model",
            str(tmp_path / "standard" / "best"),
            "--adapter",
            str(adapter_dir),
            "--repo-id",
            "alice/tiny-adapter",
            "--dry-run",
            "--folder",
            str(folder),
        ]
    )
    assert (folder / "adapter" / "adapter.safetensors").is_file() and (folder / "results/adapter_fit.json").is_file()
    card = ModelCard.load(folder / "README.md")
    assert "ka-adapter" in card.data.tags and "KA adapter" in card.text and "1.50×" in card.text  # GQA 2 of 4
    assert "| ka+adapter (least squares) | 100.000 | 0.667 |" in card.text

    loaded, _, reattached = ka_hf.load_ka_model(str(folder))
    assert reattached is not None and ka_hf.ka_spec(loaded.config) is None  # a standard model: KV by default
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        expected = model(ids, cache=ka_hf.KACache(adapter=adapter)).logits
        assert torch.equal(loaded(ids, cache=ka_hf.KACache(adapter=reattached)).logits, expected)


# ---------------------------------------------------------------------------------------------------------
# User errors and the network call


def test_bad_input_exits_2_with_a_clear_message(ka_run, published, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    cases = [
        (["--model", str(empty), "--repo-id", "alice/x"], "no safetensors weights"),
        (["--model", str(tmp_path / "missing"), "--repo-id", "alice/x"], "does not exist"),
        (["--model", str(ka_run.best_dir), "--repo-id", "just-a-name"], "is not USER/NAME"),
        (["--model", str(ka_run.best_dir), "--repo-id", "alice/bad--name"], "is not USER/NAME"),
        (
            [
                "--model",
                str(ka_run.best_dir),
                "--repo-id",
                "alice/x",
                "--dry-run",
                "--eval-results",
                str(ka_run.out_dir / "results.json"),
            ],
            "is not the results.json of examples/eval_ppl.py",
        ),
        (
            ["--model", str(ka_run.best_dir), "--repo-id", "alice/x", "--dry-run", "--folder", str(published)],
            "pass --overwrite",
        ),
        (
            [
                "--model",
                str(ka_run.best_dir),
                "--repo-id",
                "alice/x",
                "--dry-run",
                "--folder",
                str(tmp_path / "f"),
                "--adapter",
                str(empty),
            ],
            "holds no ka_hf adapter",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            push_script.main(argv)
        assert exit_info.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(KAError, match="template"):
        hub.build_card(ka_run.best_dir, {}, template_dir=tmp_path)
    with pytest.raises(KAError, match="not a local folder"):
        ka_hf.load_ka_model("alice/not-downloaded", cache_dir=str(tmp_path / "cache"))


@pytest.mark.skipif(not constants.HF_HUB_OFFLINE, reason="needs HF_HUB_OFFLINE=1 so that no request leaves")
def test_upload_is_create_repo_plus_upload_folder_and_refused_offline(ka_run, published, capsys):
    with pytest.raises(KAError, match="HF_HUB_OFFLINE"):
        hub.push(published, "alice/tiny-ka", private=True)
    with pytest.raises(SystemExit) as exit_info:  # the script without --dry-run goes as far as the call
        push_script.main(["--model", str(ka_run.best_dir), "--repo-id", "alice/tiny-ka"])
    assert exit_info.value.code == 2 and "HF_HUB_OFFLINE" in capsys.readouterr().err
