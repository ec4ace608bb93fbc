"""Publishing on the Hugging Face Hub: a KA-trained model, or a model with its plan-1 adapter, with a model card
that carries its results and says how to run it.

    from ka_hf.study import hub
    results = hub.find_results("runs/ka/best")        # {"train": Path, "eval": Path, "reversal": Path}, as found
    hub.assemble_folder("runs/ka/best", "runs/ka/hub", results, repo_id="USER/NAME")
    hub.push("runs/ka/hub", "USER/NAME", private=True)             # create_repo + upload_folder
    model, tokenizer, adapter = ka_hf.load_ka_model("USER/NAME")   # loading back is library API: ka_hf.pretrained

The folder is an ordinary transformers checkpoint (safetensors weights, config.json with its `ka` section, the
tokenizer) plus README.md (the card), results/*.json (the results the card was built from) and, for an adapter,
adapter/ (adapter.safetensors + adapter_config.json). No trust_remote_code: with ka_hf imported, a model whose
config.ka["attention"] == "ka" runs exact KA in every forward and generate() uses a KACache by default
(ka_hf.integration); `ka_hf.load_ka_model` also reattaches the adapter.

The card templates live in model_cards/ at the repository root, one copy, found next to this package (a source
checkout or `pip install -e .`) or, for a wheel install, under <prefix>/share/ka_hf/model_cards; or pass
`template_dir=`. Results files are typed records (ka_hf.study.records: each says its `kind`); a section whose
file is missing, or whose optional fields are, is left out of the card (KA-SPEC §5 defines the metrics).
"""

import json
import math
import re
import shutil
import sys
from pathlib import Path

from ka_hf.adapters import CONFIG_NAME as ADAPTER_CONFIG
from ka_hf.adapters import WEIGHTS_NAME as ADAPTER_WEIGHTS
from ka_hf.adapters import attention_shape, check_base, read_adapter_config, read_adapter_weights
from ka_hf.architectures import SUPPORTED_ARCHITECTURES
from ka_hf.config import KAConfig, provenance
from ka_hf.errors import KAError
from ka_hf.preflight import check_model_files
from ka_hf.pretrained import ADAPTER_SUBDIR

from . import files, records, report
from .records import AdapterFitRecord, EvalRecord, Record, ReversalRecord, TrainRecord

# One copy of the templates: model_cards/ of the repository (a checkout or `pip install -e .`); a wheel installs
# the same files as data under <prefix>/share/ka_hf/model_cards (pyproject.toml's data-files).
_TEMPLATE_DIRS = (
    Path(__file__).resolve().parents[2] / "model_cards",
    Path(sys.prefix) / "share" / "ka_hf" / "model_cards",
)
TEMPLATE_DIR = next((d for d in _TEMPLATE_DIRS if d.is_dir()), _TEMPLATE_DIRS[0])
TEMPLATES = {"model": "ka_model.md.j2", "adapter": "ka_adapter.md.j2"}
RESULT_KINDS = ("train", "eval", "reversal")  # the keys of `results`; adapter fits come from the adapter folder
RESULTS_SUBDIR = "results"
# What of a save_pretrained directory goes into the folder (anything else there, e.g. optimizer state, stays).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
REPO_ID = re.compile(r"^[^/\s]+/[^/\s]+$")
TASK = "text-generation"
REVERSAL_PAPER = "https://arxiv.org/abs/2309.12288"


# ---------------------------------------------------------------------------------------------------------
# Checking the inputs


def check_repo_id(repo_id: str) -> str:
    """USER/NAME with a name the Hub accepts, or KAError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    message = f"--repo-id {repo_id!r} is not USER/NAME (e.g. alice/pythia-70m-ka)"
    if not REPO_ID.match(repo_id or ""):
        raise KAError(message)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise KAError(f"{message}: {error}") from None
    return repo_id


def check_model_dir(model_dir) -> Path:
    """A save_pretrained directory of a supported architecture with safetensors weights, or KAError."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise KAError(f"model directory {model_dir} does not exist")
    if model_dir.is_dir() and (model_dir / "config.json").is_file() and not any(model_dir.glob("*.safetensors")):
        other = [path.name for path in model_dir.glob("*.bin")]
        hint = f" (it has {', '.join(other)}: load and re-save it)" if other else ""
        raise KAError(f"{model_dir} has no safetensors weights{hint}: save with model.save_pretrained(dir)")
    check_model_files(model_dir, "--model")  # a folder, config.json readable, weights not truncated
    model_type = _read_json(model_dir / "config.json").get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise KAError(
            f"ka_hf does not support model_type {model_type!r} (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}): there is no KA model to publish"
        )
    return model_dir


def check_adapter_dir(adapter_dir, model_config) -> dict:
    """The adapter config of a save_adapter directory (both files readable and matching) made for this model
    (shape, model_type, KA-trained or not, architecture), or KAError."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    read_adapter_weights(adapter_dir, config)
    shape = attention_shape(model_config)
    mine = {key: config.get(key) for key in ("num_layers", "num_heads", "head_dim")}
    if any(shape[key] != value for key, value in mine.items()):
        raise KAError(
            f"the adapter in {adapter_dir} was made for {mine}, the model has "
            f"{ {key: shape[key] for key in mine} }: publish it with the model it was fitted for"
        )
    check_base(config.get("base_model") or {}, model_config, adapter_dir)
    return config


_read_json = records.read_json_object


# ---------------------------------------------------------------------------------------------------------
# Results files: what each one is, and where they are


def read_results(path, kind: str) -> Record:
    """The typed record in `path`, which must be a `kind` results.json (its `kind` field says so; see
    ka_hf.study.records)."""
    return records.read(path, kind)


def _same_place(recorded, actual: Path) -> bool:
    """Does a path recorded in a results file (relative to wherever that run started) name `actual`?"""
    if not isinstance(recorded, str) or not recorded:
        return False
    if Path(recorded).expanduser().resolve() == actual.resolve():
        return True
    parts = tuple(part for part in Path(recorded).parts if part not in (".", "/"))
    return bool(parts) and ".." not in parts and actual.resolve().parts[-len(parts) :] == parts


def _describes(record: Record, model_dir: Path) -> bool:
    if isinstance(record, TrainRecord):
        return _same_place(record.config.get("out"), model_dir.parent)
    return _same_place(record.model.get("path"), model_dir)


def find_results(model_dir) -> dict[str, Path]:
    """{"train"|"eval"|"reversal": path} of the results.json files next to a model directory that are about it.

    Looked at: the model directory's parent (a training run's out/, whose best/ is the model), the model
    directory, and their subdirectories (e.g. runs/ka/eval/). A file counts when its record's kind is one of the
    three and it names this model (training: its out/ is the parent; evaluations: their --model is this
    directory). Files that are not records (other JSON, or results written before records had a kind) are
    passed over. Several of a kind: the newest.
    """
    model_dir = Path(model_dir)
    candidates = [
        model_dir.parent / "results.json",
        model_dir / "results.json",
        *sorted(model_dir.parent.glob("*/results.json")),
        *sorted(model_dir.glob("*/results.json")),
    ]
    found = {}
    for path in dict.fromkeys(candidates):
        try:
            record = records.read(path)
        except KAError:
            continue
        kind = record.KIND
        if kind in RESULT_KINDS and _describes(record, model_dir):
            if kind not in found or path.stat().st_mtime > found[kind].stat().st_mtime:
                found[kind] = path
    return {kind: found[kind] for kind in RESULT_KINDS if kind in found}


# ---------------------------------------------------------------------------------------------------------
# The card: front matter (ModelCardData with eval_results = the model-index) and the template's variables


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def dataset_fields(dataset=None, dataset_config=None, text_file=None, split=None) -> dict:
    """EvalResult's dataset_* fields: a Hub dataset, a local text file (its name only), or the default corpus."""
    if dataset:
        fields = dict(
            dataset_type=dataset,
            dataset_name=dataset + (f" ({dataset_config})" if dataset_config else ""),
            dataset_config=dataset_config,
        )
    elif text_file:
        fields = dict(dataset_type="text-file", dataset_name=Path(text_file).name)
    else:
        fields = dict(dataset_type="ka_hf-default-corpus", dataset_name="ka_hf default corpus (stdlib docstrings)")
    return fields | dict(dataset_split=split)


def data_name(settings: dict) -> str:
    """How the card names the data of a run's settings (TrainConfig or PplRun as a dict)."""
    fields = dataset_fields(settings.get("dataset"), settings.get("dataset_config"), settings.get("text_file"))
    return fields["dataset_name"]


def _eval_result(dataset: dict, metric_type: str, value, name: str):
    from huggingface_hub import EvalResult

    return EvalResult(task_type=TASK, metric_type=metric_type, metric_value=value, metric_name=name, **dataset)


def train_eval_results(record: TrainRecord) -> list:
    """The best epoch's validation PPL."""
    config = record.config
    value = record.best_val_ppl
    if not _finite(value):
        return []
    text_file = config.get("val_text_file") or config.get("text_file")
    split = "validation" if text_file else config.get("val_split")
    dataset = dataset_fields(config.get("dataset"), config.get("dataset_config"), text_file, split)
    return [_eval_result(dataset, "perplexity", value, "val PPL (training, best epoch)")]


def ppl_eval_results(record: EvalRecord) -> list:
    """One PPL per mode: "PPL (kv)", "PPL (ka)", ..."""
    run = record.run
    dataset = dataset_fields(run.get("dataset"), run.get("dataset_config"), run.get("text_file"), run.get("split"))
    return [
        _eval_result(dataset, "perplexity", result["ppl"], f"PPL ({result['mode']})")
        for result in record.results
        if _finite(result.get("ppl"))
    ]


REVERSAL_METRICS = (  # (label, metric type, where in splits[split])
    ("forward PPL", "perplexity", ("forward", "ppl")),
    ("backward PPL", "perplexity", ("backward", "ppl")),
    ("ratio", "reversal_ratio", ("ratio",)),
    ("answer ratio", "reversal_ratio", ("answer_ratio",)),
    ("forward exact match", "exact_match", ("forward", "exact_match")),
    ("backward exact match", "exact_match", ("backward", "exact_match")),
)


def _dig(record, keys):
    for key in keys:
        record = record.get(key) if isinstance(record, dict) else None
    return record


def reversal_eval_results(record: ReversalRecord) -> list:
    """Per mode and template split: forward/backward PPL, ratio, answer ratio, exact match forward/backward."""
    facts = record.facts
    name = f"ka_hf facts: make_facts({facts.get('n', '?')}, seed={facts.get('seed', '?')})"
    results = []
    for mode, mode_record in record.results.items():
        for split, summary in (mode_record.get("splits") or {}).items():
            dataset = dict(dataset_type="ka_hf-facts", dataset_name=name, dataset_split=split)
            for label, metric_type, keys in REVERSAL_METRICS:
                value = _dig(summary, keys)
                if _finite(value):
                    results.append(_eval_result(dataset, metric_type, value, f"reversal {label} ({mode})"))
    return results


def eval_results(by_kind: dict[str, Record]) -> list:
    """The model-index entries of every results record given ({"train"|"eval"|"reversal": record})."""
    makers = dict(train=train_eval_results, eval=ppl_eval_results, reversal=reversal_eval_results)
    return [result for kind, record in by_kind.items() for result in makers[kind](record)]


def model_summary(model_dir: Path) -> dict:
    """Shape, parameter count, dtype and the KA section of a saved model, without loading its weights."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    shape = attention_shape(config)
    parameters, dtype = 0, None
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                tensor = weights.get_slice(name)
                parameters += math.prod(tensor.get_shape())
                dtype = dtype or tensor.get_dtype()
    setting = KAConfig.from_model_config(config) or KAConfig(attention="standard")
    layers = setting.ka_layers
    layers_text = "every layer" if layers is None else f"layers {', '.join(map(str, layers))} (standard elsewhere)"
    return dict(
        config=config,
        model_type=config.model_type,
        parameters=parameters,
        parameters_text=f"{parameters / 1e6:.2f}M",
        dtype=dtype,
        hidden_size=config.hidden_size,
        **shape,
        cache_ratio=(shape["num_kv_heads"] + shape["num_heads"]) / (2 * shape["num_kv_heads"]),
        ka_trained=setting.is_ka,
        ka_variant=setting.variant,
        ka_layers_text=layers_text,
        ka_section=json.dumps(setting.to_dict()),
        base_model=_hub_id((provenance(config).get("training") or {}).get("model")),
    )


def _hub_id(name) -> str | None:
    """A fine-tuned model's starting point, when it is a Hub id (not a local path)."""
    return name if isinstance(name, str) and REPO_ID.match(name) and not Path(name).exists() else None


def train_context(record: TrainRecord) -> dict:
    from .training import TABLE_COLUMNS

    config, data = record.config, record.data
    epochs = [row for row in record.epochs if isinstance(row, dict)]
    return dict(
        config=config,
        best_epoch=record.best_epoch,
        epochs_run=len(epochs),
        best_val_ppl=report.format_number(record.best_val_ppl),
        stopped_early=bool(epochs and epochs[-1].get("early_stop")),
        train_seconds=report.format_number(record.train_seconds, 1),
        data=data_name(config),
        train_blocks=data.get("train_blocks"),
        val_blocks=data.get("val_blocks"),
        seq_len=data.get("seq_len", config.get("seq_len")),
        device=record.environment.get("device"),
        table=report.markdown_table(epochs, TABLE_COLUMNS, digits=1) if epochs else None,
    )


EVAL_COLUMNS = [
    ("mode", "mode"),
    ("ppl", "PPL"),
    ("degradation_pct", "vs kv (%)"),
    ("scored_tokens", "scored tokens"),
    ("tokens_per_s", "tokens/s"),
    ("cache_kib", "cache (KiB)"),
]


def eval_context(record: EvalRecord) -> dict:
    run, windows = record.run, record.windows
    rows = [
        result | {"cache_kib": result["cache_bytes"] / 1024 if _finite(result.get("cache_bytes")) else None}
        for result in record.results
    ]
    return dict(
        data=data_name(run),
        split=run.get("split"),
        max_length=windows.get("max_length"),
        stride=windows.get("stride"),
        windows=windows.get("count"),
        scored_tokens=report.format_number(windows.get("scored_tokens")),
        method=record.method,
        method_description=record.method_description,
        device=record.environment.get("device"),
        table=report.markdown_table(rows, EVAL_COLUMNS),
        degradation=[
            (row["mode"], f"{row['degradation_pct']:+.1f}%")
            for row in rows
            if row.get("mode") != "kv" and _finite(row.get("degradation_pct"))
        ],
    )


def reversal_context(record: ReversalRecord) -> dict:
    from .evaluation.reversal import TABLE_COLUMNS, table_rows

    splits = []
    first_mode = next(iter(record.results.values()))
    for split in record.splits or list(first_mode.get("splits") or {}):
        try:
            rows = table_rows(record.results, split)
        except (KeyError, TypeError):  # a mode without this split, or fields missing: leave the split out
            continue
        title = "held-out templates" if split == "test" else "training templates" if split == "train" else split
        splits.append(dict(name=split, title=title, table=report.markdown_table(rows, TABLE_COLUMNS, digits=3)))
    facts = record.facts
    return dict(n=facts.get("n"), seed=facts.get("seed"), trained_on=facts.get("trained_on", "unknown"), splits=splits)


ADAPTER_FIT_COLUMNS = [("mode", "mode"), ("ppl", "PPL"), ("recovered", "share of the KA-vs-KV gap recovered")]


def adapter_context(adapter_config: dict, fit_record: AdapterFitRecord | None) -> dict:
    """The adapter's kind, how it was fitted (in words), and fit_adapter.py's PPL table (when its results.json is
    in the adapter folder)."""
    fit = adapter_config.get("fit") or {}
    table = None
    if fit_record is not None:
        ppl = fit_record.ppl
        rows = [
            dict(mode=name, ppl=value, recovered=ppl.get(f"{name} gap recovered"))
            for name, value in ppl.items()
            if not name.endswith(" gap recovered")
        ]
        table = report.markdown_table(rows, ADAPTER_FIT_COLUMNS, digits=3)
    return dict(
        kind=adapter_config.get("kind"),
        mlp_hidden=adapter_config.get("mlp_hidden"),
        fitted=fit_words(fit),
        fit_table=table,
        fit_val_blocks=fit_record.val_blocks if fit_record else None,
        fit_seq_len=fit_record.seq_len if fit_record else None,
    )


def fit_words(fit: dict) -> str:
    """adapter_config.json's fit record in words: least squares and/or distillation, with their settings."""
    steps = []
    least_squares, distillation = fit.get("least_squares"), fit.get("distillation")
    if isinstance(least_squares, dict):
        steps.append(
            f"closed-form least squares ({least_squares.get('target', '?')} target, ridge "
            f"{least_squares.get('ridge', '?')}, {report.format_number(least_squares.get('tokens'))} tokens)"
        )
    if isinstance(distillation, dict):
        kl = " → ".join(report.format_number(distillation.get(key), 4) for key in ("first_kl", "last_kl"))
        steps.append(
            f"distillation ({distillation.get('steps', '?')} steps of KL(standard logits ‖ KA+adapter "
            f"logits), lr {distillation.get('lr', '?')}, KL {kl})"
        )
    return ", then ".join(steps) or "not recorded"


def template_path(kind: str, template_dir=None) -> Path:
    if kind not in TEMPLATES:
        raise KAError(f"unknown card kind {kind!r}: use 'model' or 'adapter'")
    path = Path(template_dir or TEMPLATE_DIR) / TEMPLATES[kind]
    if not path.is_file():
        raise KAError(
            f"model card template {path} not found: the templates are in model_cards/ of the ka_hf "
            "repository (installed to <prefix>/share/ka_hf/model_cards); pass template_dir="
        )
    return path


def build_card(
    model_dir,
    results: dict[str, Path] | None = None,
    kind: str | None = None,
    adapter_dir=None,
    repo_id: str | None = None,
    license: str | None = None,
    template_dir=None,
):
    """The huggingface_hub.ModelCard of a model directory, from its results files.

    results: {"train"|"eval"|"reversal": path to that job's results.json}; a missing key leaves its section out.
    kind: "model" (ka_model.md.j2) or "adapter" (ka_adapter.md.j2; needs adapter_dir); default: "adapter" when
    adapter_dir is given. The front matter's model-index (eval_results) carries every number of the tables'
    headline metrics exactly as the JSON has them.
    """
    import huggingface_hub
    import transformers
    from huggingface_hub import ModelCard, ModelCardData

    import ka_hf

    model_dir = check_model_dir(model_dir)
    kind = kind or ("adapter" if adapter_dir is not None else "model")
    if kind == "adapter" and adapter_dir is None:
        raise KAError("an adapter card needs the adapter: pass adapter_dir (--adapter DIR)")
    unknown = set(results or {}) - set(RESULT_KINDS)
    if unknown:
        raise KAError(f"unknown results kind(s) {sorted(unknown)}: use {', '.join(RESULT_KINDS)}")
    found = {key: read_results(path, key) for key, path in (results or {}).items() if path is not None}
    model = model_summary(model_dir)
    adapter = None
    if adapter_dir is not None:
        fit_path = Path(adapter_dir) / "results.json"
        fit_record = read_results(fit_path, "adapter_fit") if fit_path.is_file() else None
        adapter = adapter_context(check_adapter_dir(adapter_dir, model["config"]), fit_record)

    name = repo_id.split("/")[-1] if repo_id else model_dir.resolve().name
    tags = [
        "ka-cache",
        "ka-attention",
        "ka_hf",
        model["model_type"],
        "ka-trained" if model["ka_trained"] else "ka-adapter" if adapter else "standard-attention",
    ]
    datasets = _hub_datasets(found)
    card_data = ModelCardData(
        model_name=name,
        library_name="transformers",
        pipeline_tag=TASK,
        license=license,
        tags=tags,
        datasets=datasets or None,
        base_model=model["base_model"],
        eval_results=eval_results(found) or None,
    )
    context = dict(
        model_name=name,
        repo_id=repo_id or "USER/NAME",
        model=model,
        adapter=adapter,
        training=train_context(found["train"]) if "train" in found else None,
        evaluation=eval_context(found["eval"]) if "eval" in found else None,
        reversal=reversal_context(found["reversal"]) if "reversal" in found else None,
        ka_hf_version=ka_hf.__version__,
        transformers_version=transformers.__version__,
        huggingface_hub_version=huggingface_hub.__version__,
        reversal_paper=REVERSAL_PAPER,
    )
    return ModelCard.from_template(card_data, template_path=str(template_path(kind, template_dir)), **context)


def _hub_datasets(by_kind: dict[str, Record]) -> list[str]:
    """Hub dataset ids the results were measured on (local files and the default corpus are not Hub datasets)."""
    names = [
        by_kind["train"].config.get("dataset") if "train" in by_kind else None,
        by_kind["eval"].run.get("dataset") if "eval" in by_kind else None,
    ]
    return list(dict.fromkeys(name for name in names if name))


# ---------------------------------------------------------------------------------------------------------
# The folder, the upload, loading back


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    return target


def _check_upload_dir(out_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    files.check_out_dir(out_dir, overwrite, option="--out")
    resolved = out_dir.resolve()
    if any(resolved == path.resolve() or resolved in path.resolve().parents for path in inputs):
        raise KAError(f"{out_dir} holds the model, adapter or results being published: choose another folder")


def assemble_folder(
    model_dir,
    out_dir,
    results: dict[str, Path] | None = None,
    adapter_dir=None,
    repo_id: str | None = None,
    license: str | None = None,
    overwrite: bool = False,
    template_dir=None,
) -> list[Path]:
    """Write the folder to upload: model files (MODEL_FILES), adapter/ (when adapter_dir), results/<kind>.json
    (+ adapter_fit.json), README.md (the card). Returns the files written, sorted. The card is built first, so
    bad inputs fail before anything is written; a non-empty out_dir is refused unless overwrite, and the folder
    is built complete next to it before it replaces it."""
    card = build_card(
        model_dir, results, adapter_dir=adapter_dir, repo_id=repo_id, license=license, template_dir=template_dir
    )
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    results = {key: Path(path) for key, path in (results or {}).items() if path is not None}
    inputs = [model_dir, *results.values()] + ([Path(adapter_dir)] if adapter_dir is not None else [])
    _check_upload_dir(out_dir, inputs, overwrite)
    with files.staged_dir(out_dir) as staging:
        names = [
            _copy(path, staging / path.name) for pattern in MODEL_FILES for path in sorted(model_dir.glob(pattern))
        ]
        names += [_copy(path, staging / RESULTS_SUBDIR / f"{key}.json") for key, path in results.items()]
        if adapter_dir is not None:
            adapter_dir = Path(adapter_dir)
            names += [
                _copy(adapter_dir / name, staging / ADAPTER_SUBDIR / name) for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
            ]
            if (adapter_dir / "results.json").is_file():
                names.append(_copy(adapter_dir / "results.json", staging / RESULTS_SUBDIR / "adapter_fit.json"))
        card.save(staging / "README.md")
        names.append(staging / "README.md")
    return sorted(dict.fromkeys(out_dir / path.relative_to(staging) for path in names))


def push(
    folder,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload a KA model with ka_hf",
) -> str:
    """create_repo (exist_ok: an existing repo keeps its visibility) + upload_folder; returns the commit URL.
    token None = huggingface_hub's usual one (HF_TOKEN, or `hf auth login`)."""
    from huggingface_hub import create_repo, upload_folder
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    check_repo_id(repo_id)
    folder = Path(folder)
    if not (folder / "README.md").is_file() or not (folder / "config.json").is_file():
        raise KAError(f"{folder} is not an assembled folder (no README.md / config.json): use assemble_folder")
    try:
        create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        commit = upload_folder(
            repo_id=repo_id, folder_path=str(folder), token=token, commit_message=commit_message, repo_type="model"
        )
    except OfflineModeIsEnabled:
        raise KAError("HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, or use --dry-run") from None
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            raise KAError(
                f"the Hub refused {repo_id} ({status}): log in with `hf auth login` or set HF_TOKEN "
                "to a token with write access"
            ) from None
        raise
    return commit.commit_url
