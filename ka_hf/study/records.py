"""Typed results records: what every results.json holds, shared by every writer and reader.

Each results.json is written from one of these dataclasses and starts with its `kind` and `schema_version`:

    kind          written by                                   read by
    train         ka_hf.study.training (examples/train.py)     hub (card, model-index)
    eval          ka_hf.study.evaluation.run (eval_ppl.py)     hub; the study writes one per model too
    reversal      examples/reversal_curse.py                   hub; the study writes one per model too
    adapter_fit   examples/fit_adapter.py                      hub (adapter card)
    study         ka_hf.study.experiment                       the report

Readers ask for a kind (`read(path, "eval")`) and never guess from a file's shape. A file without `kind` was
written before records were typed (schema 0): reading it is a clear KAError that says to re-run the command that
wrote it; `find_results` passes over such files. A newer schema_version than this module knows is refused too.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ka_hf.errors import KAError

SCHEMA_VERSION = 1


@dataclass
class Record:
    """The common part: `kind` (a class constant), `schema_version`, and `extra` for keys a newer minor writer
    added (kept, written back)."""

    KIND: ClassVar[str] = ""
    WRITER: ClassVar[str] = ""

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {"kind": self.KIND, "schema_version": SCHEMA_VERSION, **values, **getattr(self, "extra", {})}

    @classmethod
    def from_dict(cls, values: dict, source: str = "the record") -> "Record":
        kind = values.get("kind")
        if kind is None:
            raise KAError(
                f"{source} has no 'kind': it was written by an older ka_hf, before results records were "
                f"typed; re-run {cls.WRITER} to write it again"
            )
        if kind != cls.KIND:
            found = RECORDS[kind].WRITER if kind in RECORDS else f"kind {kind!r}"
            raise KAError(f"{source} is not the results.json of {cls.WRITER} (it is {found}'s)")
        version = values.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise KAError(
                f"{source} has schema_version {version!r}; this ka_hf reads up to {SCHEMA_VERSION}: upgrade ka_hf"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name in known
            and f.name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise KAError(f"{source} lacks {', '.join(missing)}: it is not a complete {cls.KIND} record")
        return cls.build(values)

    @classmethod
    def build(cls, values: dict) -> "Record":
        """The record of a writer's dict: its fields, and any other keys in `extra`."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {key: value for key, value in values.items() if key not in known | {"kind", "schema_version"}}
        return cls(**{key: values[key] for key in known if key in values}, extra=extra)


@dataclass
class TrainRecord(Record):
    KIND: ClassVar[str] = "train"
    WRITER: ClassVar[str] = "examples/train.py"

    config: dict  # the TrainConfig
    data: dict  # source, train_blocks, val_blocks, seq_len
    epochs: list  # one row per epoch (epoch, train_ppl, val_ppl, seconds, best, note, ...)
    best_epoch: int
    best_val_ppl: float
    train_seconds: float
    environment: dict
    extra: dict = field(default_factory=dict)


@dataclass
class EvalRecord(Record):
    """Perplexity per mode on the same windows. The study writes the fields up to `environment`."""

    KIND: ClassVar[str] = "eval"
    WRITER: ClassVar[str] = "examples/eval_ppl.py"

    model: dict  # path (+ model_type, parameters, shape, dtype, ka_config from eval_ppl)
    results: list  # one dict per mode: mode, ppl, mean_nll, scored_tokens, ..., degradation_pct
    run: dict = field(default_factory=dict)  # the PplRun settings (model, data, max_length, stride, ...)
    windows: dict = field(default_factory=dict)  # count, scored_tokens, max_length, stride, ...
    command: str = ""
    method: str = "parallel"
    environment: dict = field(default_factory=dict)
    method_description: str | None = None
    data: dict | None = None
    modes: dict | None = None
    mode_definitions: dict | None = None
    seed: int | None = None
    processes: int | None = None
    batch_size: int | None = None
    mixed_precision: str | None = None
    layer_sweep: dict | None = None
    adapter: dict | None = None
    files: list | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class ReversalRecord(Record):
    """Forward vs backward PPL of the facts per mode. The study writes the fields up to `environment`."""

    KIND: ClassVar[str] = "reversal"
    WRITER: ClassVar[str] = "examples/reversal_curse.py"

    model: dict  # path (+ model_type, parameters, num_layers, dtype, ka_config from the script)
    results: dict  # mode -> {"definition", "splits": {split: {...}}}
    facts: dict = field(default_factory=dict)  # n, seed, trained_on (+ source, recorded)
    splits: list = field(default_factory=list)  # template splits scored: "test", "train"
    command: str = ""
    environment: dict = field(default_factory=dict)
    templates: dict | None = None
    scoring: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class AdapterFitRecord(Record):
    KIND: ClassVar[str] = "adapter_fit"
    WRITER: ClassVar[str] = "examples/fit_adapter.py"

    model: str
    adapter: str
    val_blocks: int
    seq_len: int
    ppl: dict  # mode -> PPL on the validation blocks
    fit: dict  # the adapter's fit record (least squares, distillation)
    environment: dict
    extra: dict = field(default_factory=dict)


@dataclass
class StudyRecord(Record):
    KIND: ClassVar[str] = "study"
    WRITER: ClassVar[str] = "python -m ka_hf.experiment"

    title: str
    date: str
    command: str
    config: dict  # the ExperimentConfig
    data: dict
    model: dict
    training: dict  # attention -> epochs, best epoch, ...
    adapters: dict
    windows: dict
    inference: dict  # model -> eval results per mode
    layer_sweep: list
    reversal: dict  # model -> reversal results per mode
    environment: dict
    reversal_unseen: dict = field(default_factory=dict)  # the same for facts never trained on (the control)
    name_ranks: dict = field(default_factory=dict)  # model -> mode -> the right name's rank among trained names
    name_ranks_unseen: dict = field(default_factory=dict)  # model -> the control facts' rank among their names
    distributions: dict = field(default_factory=dict)  # A (or f(A)) against V per layer: hypothesis 1
    power: list = field(default_factory=list)  # ka_hf.study.power: {question, check, value, threshold, passed}
    seeds: list = field(default_factory=list)  # every seed's own record (the top-level fields are the first seed's)
    timings_s: dict = field(default_factory=dict)
    findings: dict = field(default_factory=dict)  # per_seed, summary (mean/std), verdicts
    files: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


RECORDS: dict[str, type[Record]] = {
    cls.KIND: cls for cls in (TrainRecord, EvalRecord, ReversalRecord, AdapterFitRecord, StudyRecord)
}


def from_dict(values: Any, source: str = "the record", kind: str | None = None) -> Record:
    """The typed record of a results dict: of `kind` when given, else of the kind it names."""
    if not isinstance(values, dict):
        raise KAError(f"{source} does not hold a JSON object")
    if kind is not None:
        return RECORDS[kind].from_dict(values, source)
    named = values.get("kind")
    if named not in RECORDS:
        if named is None:
            raise KAError(
                f"{source} has no 'kind': it was written by an older ka_hf, before results records were "
                "typed; re-run the command that wrote it"
            )
        raise KAError(f"{source} has an unknown kind {named!r} (known: {', '.join(RECORDS)})")
    return RECORDS[named].from_dict(values, source)


def read_json_object(path) -> dict:
    """The JSON object in `path`, or KAError (missing, not JSON, not an object)."""
    path = Path(path)
    if not path.is_file():
        raise KAError(f"{path} does not exist")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KAError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise KAError(f"{path} does not hold a JSON object")
    return values


def read(path, kind: str | None = None) -> Record:
    """The record in the results.json at `path` (of `kind` when given), or KAError saying what is wrong."""
    return from_dict(read_json_object(path), str(path), kind)
