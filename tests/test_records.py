"""Typed results records (ka_hf.study.records): every results.json says its kind and schema version; readers ask
for a kind and never guess from shapes; old files without a kind get a clear error."""

import json

import pytest

from ka_hf.errors import KAError
from ka_hf.study import files, hub, records
from ka_hf.study.records import SCHEMA_VERSION, EvalRecord, ReversalRecord, TrainRecord


def train_record(**changes):
    values = dict(
        config={"out": "runs/ka"},
        data={"seq_len": 16},
        epochs=[{"epoch": 1, "val_ppl": 9.0}],
        best_epoch=1,
        best_val_ppl=9.0,
        train_seconds=1.5,
        environment={"device": "CPU"},
    )
    return TrainRecord(**(values | changes))


def test_a_record_round_trips_with_its_kind_and_version(tmp_path):
    path = files.write_json(tmp_path / "results.json", train_record(extra={"note": "kept"}))
    saved = json.loads(path.read_text())
    assert list(saved)[:2] == ["kind", "schema_version"]
    assert saved["kind"] == "train" and saved["schema_version"] == SCHEMA_VERSION and saved["note"] == "kept"
    record = records.read(path)
    assert isinstance(record, TrainRecord) and record == train_record(extra={"note": "kept"})
    assert records.read(path, "train") == record


def test_readers_ask_for_a_kind_and_old_files_get_a_clear_error(tmp_path):
    path = files.write_json(tmp_path / "results.json", train_record())
    with pytest.raises(KAError, match="is not the results.json of examples/eval_ppl.py .it is examples/train.py's"):
        records.read(path, "eval")
    old = dict(train_record().to_dict())
    del old["kind"], old["schema_version"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(KAError, match="has no 'kind': it was written by an older ka_hf.*re-run examples/train.py"):
        records.read(tmp_path / "old.json", "train")
    with pytest.raises(KAError, match="has no 'kind'"):
        records.read(tmp_path / "old.json")
    (tmp_path / "newer.json").write_text(json.dumps(train_record().to_dict() | {"schema_version": 99}))
    with pytest.raises(KAError, match="upgrade ka_hf"):
        records.read(tmp_path / "newer.json")
    (tmp_path / "partial.json").write_text(json.dumps({"kind": "eval", "schema_version": 1, "results": []}))
    with pytest.raises(KAError, match="lacks model"):
        records.read(tmp_path / "partial.json")


def test_find_results_uses_the_kind_and_passes_over_files_without_one(tmp_path):
    model_dir = tmp_path / "run" / "best"
    model_dir.mkdir(parents=True)
    files.write_json(tmp_path / "run" / "results.json", train_record(config={"out": str(tmp_path / "run")}))
    files.write_json(
        tmp_path / "run" / "eval" / "results.json",
        EvalRecord(model={"path": str(model_dir)}, results=[{"mode": "kv", "ppl": 3.0}]),
    )
    # an eval-shaped file without a kind (an old one) and a reversal record of another model: not this model's
    old = EvalRecord(model={"path": str(model_dir)}, results=[{"mode": "kv", "ppl": 4.0}]).to_dict()
    del old["kind"]
    (tmp_path / "run" / "old").mkdir()
    (tmp_path / "run" / "old" / "results.json").write_text(json.dumps(old))
    files.write_json(
        tmp_path / "run" / "reversal" / "results.json",
        ReversalRecord(model={"path": "elsewhere/best"}, results={"kv": {"splits": {}}}),
    )
    assert hub.find_results(model_dir) == {
        "train": tmp_path / "run" / "results.json",
        "eval": tmp_path / "run" / "eval" / "results.json",
    }
