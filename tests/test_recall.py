"""The recall study (ka_hf.study.recall): the generator against a slow reference, the scorer on a model built by
hand that solves 1-pair recall exactly (under the library's real caches), the verdicts' rules, and --smoke."""

import json

import pytest
import torch

from ka_hf.errors import KAError
from ka_hf.modes import parse_mode
from ka_hf.study.recall.data import IGNORE, RecallSet, RecallShape, RecallTask, make_recall_set, parse_shapes
from ka_hf.study.recall.experiment import RecallConfig, main
from ka_hf.study.recall.scoring import query_hits, score_mode
from ka_hf.study.recall.training import train_batch
from ka_hf.study.recall.verdicts import conclusions, failure_distance, plan3_verdict

TASK = RecallTask(vocab_size=40, filler=4)


# ---------------------------------------------------------------------------------------------------------
# the generator, checked by a token loop


def reference_targets(input_ids: list[int], pairs: int, task: RecallTask):
    """Targets and distances by reading the sequence as a person would: the pairs, then each later key."""
    value_of, position_of = {}, {}
    for i in range(pairs):
        key, value = input_ids[2 * i], input_ids[2 * i + 1]
        assert key in task.key_ids and value in task.value_ids
        assert key not in value_of, "keys repeat within a sequence"
        value_of[key], position_of[key] = value, 2 * i
    targets, distances, queried = [], [], []
    for t, token in enumerate(input_ids):
        if t >= 2 * pairs and token in value_of:
            targets.append(value_of[token])
            distances.append(t - position_of[token])
            queried.append(token)
        else:
            assert t < 2 * pairs or token < task.filler, "the query section holds filler or keys"
            targets.append(IGNORE)
            distances.append(0)
    return targets, distances, queried


@pytest.mark.parametrize("distance", ["uniform", "power:0.01"])
@pytest.mark.parametrize("shape", [RecallShape(16, 1), RecallShape(64, 4), RecallShape(128, 16)])
def test_targets_are_the_paired_values(shape, distance):
    task = RecallTask(vocab_size=40, filler=4, distance=distance)
    recall_set = make_recall_set(task, shape, 24, seed=3)
    assert recall_set.input_ids.shape == (24, shape.seq_len)
    for row in range(24):
        targets, distances, queried = reference_targets(recall_set.input_ids[row].tolist(), shape.pairs, task)
        assert recall_set.targets[row].tolist() == targets
        assert recall_set.distance[row].tolist() == distances
        keys = recall_set.input_ids[row, 0 : 2 * shape.pairs : 2].tolist()
        assert sorted(queried) == sorted(keys), "every key is queried exactly once"
        positions = (recall_set.targets[row] != IGNORE).nonzero().flatten()
        assert all((p - 2 * shape.pairs) % 2 == 0 for p in positions.tolist())


def test_the_data_is_a_function_of_the_seed():
    shape = RecallShape(64, 4)
    first, again, other = (make_recall_set(TASK, shape, 8, seed) for seed in (5, 5, 6))
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.input_ids, other.input_ids)
    assert torch.equal(
        train_batch(TASK, shape, 512, 0, 7, 0).input_ids, train_batch(TASK, shape, 512, 0, 7, 0).input_ids
    )
    assert not torch.equal(
        train_batch(TASK, shape, 512, 0, 7, 0).input_ids, train_batch(TASK, shape, 512, 1, 7, 0).input_ids
    )


def test_power_law_puts_queries_closer_than_uniform():
    shape = RecallShape(256, 8)
    mean_distance = {}
    for distance in ("uniform", "power:0.01"):
        recall_set = make_recall_set(RecallTask(vocab_size=40, filler=4, distance=distance), shape, 200, seed=0)
        scored = recall_set.targets != IGNORE
        mean_distance[distance] = recall_set.distance[scored].float().mean().item()
    assert mean_distance["power:0.01"] < 0.6 * mean_distance["uniform"]


@pytest.mark.parametrize(
    "task, shape, message",
    [
        (RecallTask(vocab_size=20, filler=4), RecallShape(64, 9), "only 8 keys"),
        (TASK, RecallShape(16, 6), "query slots"),
        (RecallTask(distance="zipf"), RecallShape(64, 4), "power:A"),
        (RecallTask(distance="power:-1"), RecallShape(64, 4), "power:A"),
    ],
)
def test_impossible_settings_are_refused(task, shape, message):
    with pytest.raises(KAError, match=message):
        make_recall_set(task, shape, 2, seed=0)


def test_shapes_parse():
    assert parse_shapes("64x4, 128x8") == [RecallShape(64, 4), RecallShape(128, 8)]
    with pytest.raises(KAError, match="LENGTHxPAIRS"):
        parse_shapes("64-4")


# ---------------------------------------------------------------------------------------------------------
# the scorer, on a GPT-2 built by hand that recalls the one pair of a 1-pair sequence exactly


def hand_built_recaller(task: RecallTask, seq_len: int):
    """One-layer GPT-2 whose residual stream is [one-hot token | one-hot position]. Its single head attends from
    every position to position 1 (the value of the only pair) and copies that token, scaled, into the residual;
    the MLP is zero and the head is tied to the token embedding, so the top logit at a query is the value."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab, d = task.vocab_size, task.vocab_size + seq_len
    config = GPT2Config(
        vocab_size=vocab, n_positions=seq_len, n_embd=d, n_layer=1, n_head=1, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.transformer.wte.weight[:, :vocab] = torch.eye(vocab)
        model.transformer.wpe.weight[:, vocab:] = torch.eye(seq_len)
        for norm in (model.transformer.h[0].ln_1, model.transformer.h[0].ln_2, model.transformer.ln_f):
            norm.weight.fill_(1.0)
        attention = model.transformer.h[0].attn
        weight, bias = attention.c_attn.weight, attention.c_attn.bias  # x @ W + b, columns [q | k | v]
        bias[0] = 200.0  # every query is the same direction ...
        weight[vocab + 1, d + 0] = 1.0  # ... which only the key at position 1 has
        weight[:vocab, 2 * d : 2 * d + vocab] = torch.eye(vocab)  # the value: the token part
        attention.c_proj.weight[:vocab, :vocab] = 10 * torch.eye(vocab)
    model.lm_head.weight = model.transformer.wte.weight
    return model


@pytest.fixture(scope="module")
def one_pair():
    task = RecallTask(vocab_size=24, filler=4)
    recall_set = make_recall_set(task, RecallShape(32, 1), 16, seed=1)
    return hand_built_recaller(task, 32), recall_set


@pytest.mark.parametrize("mode", ["kv", "ka", "ka-hybrid", "kv-window@4+2", "ka-window@4+2"])
def test_a_hand_built_model_recalls_one_pair_exactly(one_pair, mode):
    """Exact under every mode that keeps position 1 (with a sink of 2 the windows do; under KA, position 1
    attends to itself only, so its output A is its value)."""
    model, recall_set = one_pair
    result = score_mode(model, [recall_set], parse_mode(mode))
    assert result["queries"] == 16 and result["accuracy"] == 1.0
    assert sum(cell["queries"] for cell in result["by_distance"].values()) == 16


def test_a_window_that_evicts_the_pair_loses_it(one_pair):
    """kv-window@4 (no sink): a query at t sees t-3..t, so from t = 5 on (distance >= 5 from the key at 0) the
    value at position 1 is evicted and the model must fail there; nearer queries still recall."""
    model, recall_set = one_pair
    result = score_mode(model, [recall_set], parse_mode("kv-window@4"), far=5)
    assert result["far"]["queries"] > 0 and result["far"]["accuracy"] == 0.0


def test_the_scorer_reads_the_value_not_the_key(one_pair):
    model, recall_set = one_pair
    with torch.no_grad():
        logits = model(recall_set.input_ids).logits
    hit, scored = query_hits(logits, recall_set)
    assert int(scored.sum()) == 16 and bool(hit[scored].all())
    # logits whose top token is the key at the query (the input itself) score nothing
    echo = torch.nn.functional.one_hot(recall_set.input_ids, 24).float()
    assert not query_hits(echo, recall_set)[0].any()
    answer = torch.nn.functional.one_hot(recall_set.targets.clamp_min(0), 24).float()
    assert bool(query_hits(answer, recall_set)[0][scored].all())


def test_a_set_splits_into_batches_that_are_sets():
    recall_set = make_recall_set(TASK, RecallShape(32, 2), 10, seed=0)
    pieces = list(recall_set.batches(4))
    assert [len(p) for p in pieces] == [4, 4, 2] and all(isinstance(p, RecallSet) for p in pieces)
    assert torch.equal(torch.cat([p.targets for p in pieces]), recall_set.targets)


# ---------------------------------------------------------------------------------------------------------
# the verdicts' rules, on findings made up to the case


def _mode(accuracy: float, by_distance: dict, far=None, cache_bytes=1000) -> dict:
    return dict(
        accuracy=accuracy, by_shape={"T=64": accuracy}, by_distance=by_distance, far=far, cache_bytes=cache_bytes
    )


def _seed(kv=1.0, ka=(0.9, 0.4, 0.1), trained=0.95, noise=0.0) -> dict:
    bins = ["2-3", "4-7", "8-15"]
    modes = {
        "kv": _mode(kv, dict.fromkeys(bins, kv)),
        "ka": _mode(sum(ka) / 3 + noise, {b: a + noise for b, a in zip(bins, ka)}),
        "ka-trained": _mode(trained + noise, dict.fromkeys(bins, trained + noise)),
        "kv-window@4": _mode(0.5, dict.fromkeys(bins, 0.5), far=0.0, cache_bytes=100),
        "ka-window@4": _mode(0.5 + noise, dict.fromkeys(bins, 0.5), far=0.2 + noise, cache_bytes=100),
    }
    return {"results": {}, "training": {"ka-trained": dict(steps=10, reached_target=False)}, "_findings": modes}


def _conclude(seeds, monkeypatch):
    from ka_hf.study.recall import verdicts

    monkeypatch.setattr(verdicts, "seed_findings", lambda seed: seed["_findings"])
    return conclusions(seeds, window=4, sink=0)


def test_plan3_failure_distance_is_the_first_bin_below_kv_and_below_half(monkeypatch):
    seeds = [_seed(noise=0.0), _seed(noise=0.02), _seed(noise=-0.01)]
    found = _conclude(seeds, monkeypatch)
    assert found["power"][0]["passed"] and found["power"][0]["value"] == 1.0
    per_seed = found["per_seed"]
    assert failure_distance(per_seed, "ka") == dict(below_kv="2-3", below_half="4-7", bins=["2-3", "4-7", "8-15"])
    plan3 = plan3_verdict(per_seed)
    assert plan3["verdict"] == "loses" and "from distance 4-7" in plan3["text"]
    assert found["verdicts"]["ka_training"]["verdict"] == "part"
    assert found["verdicts"]["windows"]["verdict"] == "within-noise"  # overall 0.5 vs 0.5 within the seeds' noise
    assert "equal" in found["verdicts"]["windows"]["text"] and "NOT equal" not in found["verdicts"]["windows"]["text"]


def test_no_verdict_without_the_power_to_see_it(monkeypatch):
    found = _conclude([_seed(kv=0.98)], monkeypatch)
    assert not found["power"][0]["passed"]
    for verdict in found["verdicts"].values():
        assert verdict["verdict"] == "not-answered"
        assert verdict["text"].startswith("not answered: the standard model's kv recall accuracy")
        assert "needs ≥ 0.99" in verdict["text"]


def test_ka_training_that_matches_kv_recovers(monkeypatch):
    found = _conclude([_seed(trained=1.0), _seed(trained=1.0, noise=0.0)], monkeypatch)
    assert found["verdicts"]["ka_training"]["verdict"] == "recovers"


# ---------------------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall") / "run"
    main(["--smoke", "--out", str(out), "--no-progress", "--threads", "1"])
    return out


def test_smoke_runs_every_stage(smoke):
    for name in ("report.md", "results.json", "accuracy_by_distance.png"):
        assert (smoke / name).stat().st_size > 0, name
    results = json.loads((smoke / "results.json").read_text())
    assert results["kind"] == "recall" and results["schema_version"] >= 1
    window = "@8+2"
    modes = {"kv", "ka", "ka-hybrid", "ka+adapter", f"kv-window{window}", f"ka-window{window}", "ka-trained"}
    assert set(results["accuracy"]) == modes
    assert all(0.0 <= value <= 1.0 for value in results["accuracy"].values())
    assert len(results["seeds"]) == 2
    for seed in results["seeds"]:
        assert set(seed["training"]) == {"standard", "ka-trained"}
        assert (smoke / f"seed-{seed['seed']}" / "ka-trained" / "config.json").is_file()
        assert (smoke / f"seed-{seed['seed']}" / "adapter" / "adapter_config.json").is_file()
        kv_bytes = seed["results"]["kv-window" + window]["by_shape"]["T=32,pairs=4"]["cache_bytes_per_sequence"]
        ka_bytes = seed["results"]["ka-window" + window]["by_shape"]["T=32,pairs=4"]["cache_bytes_per_sequence"]
        assert kv_bytes == ka_bytes < seed["results"]["kv"]["by_shape"]["T=32,pairs=4"]["cache_bytes_per_sequence"]
    (power,) = results["power"]
    assert set(power) >= {"question", "check", "value", "threshold", "passed"} and power["threshold"] == 0.99
    text = (smoke / "report.md").read_text()
    assert "## Verdicts" in text and "ka-trained" in text
    if not power["passed"]:  # a smoke run trains two steps: every verdict must say so, none may conclude
        assert text.count("not answered: ") == 3


def test_the_smoke_result_is_a_typed_record(smoke):
    from ka_hf.study.records import read

    record = read(smoke / "results.json", "recall")
    assert record.accuracy["kv"] == record.summary["kv"]["accuracy"]["mean"]
    with pytest.raises(KAError, match="not the results.json of python -m ka_hf.experiment"):
        read(smoke / "results.json", "study")


def test_earlier_results_are_refused(smoke, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--smoke", "--out", str(smoke), "--no-progress"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "--overwrite" in error


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--shapes", "16x9"], "query slots"),
        (["--shapes", "16-2"], "LENGTHxPAIRS"),
        (["--distance", "zipf"], "power:A"),
        (["--seeds", "0"], "--seeds 0"),
        (["--window", "4", "--sink", "5"], "sink 5"),
        (["--preset", "huge"], "invalid choice"),
    ],
)
def test_bad_settings_are_one_error_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        main(["--smoke", "--out", str(tmp_path / "r"), "--no-progress", *flags])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert not (tmp_path / "r").exists()


def test_the_quick_preset_is_what_the_docs_say():
    config = RecallConfig.from_preset("quick", "runs/recall")
    assert config.shape_list == [RecallShape(64, 4), RecallShape(128, 8), RecallShape(256, 16)]
    assert [m.name for m in config.modes][-2:] == ["kv-window@32+4", "ka-window@32+4"]
    assert 64 <= config.hidden_size <= 128 and config.num_layers == 2


def test_the_docstring_commands_reach_the_study(monkeypatch):
    """Each `python -m ka_hf.study.recall` line of the module's docstring runs up to the study, with its settings."""
    import shlex

    from test_docstring_examples import docstring_commands

    from ka_hf.study.recall import experiment

    from conftest import REPO_ROOT

    reached = []
    written = dict(report="report.md", results="results.json")
    monkeypatch.setattr(experiment, "run_recall", lambda config, overwrite: reached.append(config) or written)
    monkeypatch.setattr(experiment.files, "check_out_dir", lambda *args, **kwargs: None)
    commands = docstring_commands(REPO_ROOT / "ka_hf/study/recall/experiment.py")
    assert len(commands) == 3 and all(c.startswith("python -m ka_hf.study.recall ") for c in commands)
    for command in commands:
        argv = shlex.split(command)[3:]
        experiment.main(argv)
        assert reached[-1].out == argv[argv.index("--out") + 1]
        assert reached[-1].preset == argv[argv.index("--preset") + 1] and reached[-1].smoke == ("--smoke" in argv)


def test_the_guess_level_is_one_over_the_pairs_pooled():
    from ka_hf.study.recall.verdicts import guess_level

    shapes = {"a": dict(queries=40, pairs=4), "b": dict(queries=160, pairs=16)}
    assert guess_level({"results": {"kv": {"by_shape": shapes}}}) == pytest.approx((10 + 10) / 200)


def test_ka_training_at_the_guess_level_learned_no_pairing(monkeypatch):
    from ka_hf.study.recall import verdicts

    seeds = [_seed(trained=0.1), _seed(trained=0.1, noise=0.01)]
    per_seed = [seed["_findings"] for seed in seeds]
    training = [seed["training"]["ka-trained"] for seed in seeds]
    assert verdicts.ka_training_verdict(per_seed, training, guess=0.2)["verdict"] == "does-not"  # below the KA cache
    seeds = [_seed(ka=(0.05, 0.05, 0.05), trained=0.2), _seed(ka=(0.05, 0.05, 0.05), trained=0.21)]
    per_seed = [seed["_findings"] for seed in seeds]
    verdict = verdicts.ka_training_verdict(per_seed, training, guess=0.25)
    assert verdict["verdict"] == "guess-level" and "guessing one of the sequence's values: 0.250" in verdict["text"]
    assert verdicts.ka_training_verdict(per_seed, training, guess=0.1)["verdict"] == "part"
