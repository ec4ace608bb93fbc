"""The eval_ppl job: load model and data, score every mode on the same windows, write results.json/.md and plots.

`run_ppl_eval(PplRun(model=..., out=...))` is what examples/eval_ppl.py calls; the metrics themselves live in
`ka_hf.study.evaluation.ppl`. Under several processes (torchrun, accelerate launch) every process loads the same data
and scores its share of the windows; only the main process writes files and returns the record.
"""

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ka_hf.architectures import SUPPORTED_ARCHITECTURES, num_kv_heads
from ka_hf.errors import KAError
from ka_hf.modes import parse_modes

from .. import files, report
from ..cli import DTYPES, accelerate_cpu, apply_runtime_flags, check_data_flags, check_model_flags, check_numbers
from ..data import count_scored_tokens, load_texts, ppl_windows, tokenize_texts
from ..models import load_model, load_tokenizer
from ..records import EvalRecord
from .modes import DEFINITIONS, check_adapter_given, layer_sweep_modes
from .ppl import METHOD_DESCRIPTIONS, METHODS, add_degradation, score_modes

SWEEPS = ("prefix", "single")
TABLE_COLUMNS = [
    ("mode", "mode"),
    ("ppl", "PPL"),
    ("degradation_pct", "vs kv (%)"),
    ("mean_nll", "mean NLL"),
    ("scored_tokens", "scored tokens"),
    ("tokens_per_s", "tokens/s"),
    ("decode_tokens_per_s", "decode tokens/s"),
    ("total_time_s", "total time (s)"),
    ("peak_memory_mib", "peak memory (MiB)"),
    ("cache_kib", "cache (KiB)"),
]


@dataclass
class PplRun:
    """Everything a run depends on (the command-line flags of examples/eval_ppl.py)."""

    model: str
    out: str = "eval_ppl_out"
    tokenizer: str | None = None
    modes: str = "kv,ka,ka-hybrid"
    adapter: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "test"
    text_file: str | None = None
    text_column: str = "text"
    max_length: int = 128
    stride: int = 128
    max_windows: int | None = None
    method: str = "parallel"
    layer_sweep: str | None = None
    batch_size: int = 1
    dtype: str = "float32"
    mixed_precision: str | None = None
    device: str = "auto"  # as --device: auto, cpu, cuda (accelerate places the processes)
    threads: int | None = None
    seed: int = 0
    progress: bool = True
    overwrite: bool = False  # replace the results already in `out`


def run_ppl_eval(run: PplRun) -> dict | None:
    """Run it; returns the results record on the main process (with a printable "summary"), None elsewhere.
    Every setting and input is checked first (check_run: one KAError before any work); an `out` that holds
    earlier results is refused unless run.overwrite. When the results cannot be written to `out` at the end, they
    are written next to it (or in the temporary folder) and the KAError says where."""
    from accelerate import Accelerator

    check_run(run)
    apply_runtime_flags(run)
    accelerator = Accelerator(cpu=accelerate_cpu(run.device), mixed_precision=run.mixed_precision)
    try:
        return _run(run, accelerator)
    finally:
        accelerator.end_training()  # tears the process group down cleanly (gloo aborts at exit otherwise)


def _run(run: PplRun, accelerator) -> dict | None:
    from accelerate.utils import set_seed

    log = accelerator.print
    set_seed(run.seed)
    model = load_model(run.model, dtype=DTYPES[run.dtype], device=accelerator.device)
    adapter = load_checked_adapter(run.adapter, model, accelerator.device) if run.adapter else None
    modes = parse_modes(run.modes, model.config.num_hidden_layers)
    tokenizer = load_tokenizer(run.tokenizer or run.model)

    data, windows = load_windows(run, tokenizer)
    log(
        f"data: {data['source']}: {data['texts']:,} texts, {data['tokens']:,} tokens -> {len(windows):,} windows "
        f"(max_length {run.max_length}, stride {run.stride}), {count_scored_tokens(windows):,} scored tokens"
    )
    log(
        f"scoring: {run.method} ({METHOD_DESCRIPTIONS[run.method]}); {accelerator.num_processes} process(es) "
        f"on {accelerator.device}; modes: {', '.join(mode.name for mode in modes)}"
    )

    common = dict(
        method=run.method,
        batch_size=run.batch_size,
        accelerator=accelerator,
        adapter=adapter,
        pad_id=tokenizer.pad_token_id or 0,
        progress=run.progress and accelerator.is_main_process,
    )
    results = score_modes(model, windows, modes, **common)
    sweep = None
    if run.layer_sweep:
        sweep_modes = layer_sweep_modes(model.config.num_hidden_layers, run.layer_sweep)
        kv_ppl = next((record["ppl"] for record in results if record["mode"] == "kv"), None)
        sweep = add_degradation(score_modes(model, windows, sweep_modes, **common), kv_ppl)
    if not accelerator.is_main_process:
        return None
    record = results_record(run, model, data, windows, results, sweep, accelerator)
    record["adapter"] = None if adapter is None else {"path": run.adapter, **adapter.config_dict()}
    record["files"] = files.write_results(run.out, lambda folder: write_report(record, folder))
    record["summary"] = results_markdown(record, with_header=False) + f"\n\nwritten to {run.out}/"
    return record


# -----------------------------------------------------------------------------
# inputs


def load_checked_adapter(path, model, device):
    """The plan-1 adapter saved in `path`, checked against `model`."""
    from ka_hf.adapters import load_adapter

    adapter = load_adapter(path, device=device)
    adapter.check_model(model)
    return adapter


def check_run(run: PplRun) -> None:
    """Every setting and every file the run reads or writes, cheaply, before any work; one KAError naming the flag:
    the numbers, modes and device; the model (config and weight headers), tokenizer and adapter; the modes'
    layers and --max-length against the model's config; the text file; --out (earlier results, writable)."""
    if run.stride > run.max_length:
        raise KAError(f"--stride ({run.stride}) must not exceed --max-length ({run.max_length})")
    if run.stride < 1 or run.max_length < 2:
        raise KAError("need --stride >= 1 and --max-length >= 2")
    check_numbers(run, at_least=dict(batch_size=1, max_windows=1, threads=1))
    if run.method not in METHODS:
        raise KAError(f"method={run.method!r}: use one of {', '.join(METHODS)}")
    if run.layer_sweep is not None and run.layer_sweep not in SWEEPS:
        raise KAError(f"layer_sweep={run.layer_sweep!r}: use one of {', '.join(SWEEPS)}")
    if run.dtype not in DTYPES:
        raise KAError(f"dtype={run.dtype!r}: use one of {', '.join(DTYPES)}")
    check_adapter_given(parse_modes(run.modes), run.adapter)  # unknown modes fail before the model is read
    accelerate_cpu(run.device)  # a device that is not here
    config = check_model_flags(run)
    check_model(config, parse_modes(run.modes, config.num_hidden_layers), run.max_length)
    check_data_flags(run)
    files.check_out_dir(run.out, run.overwrite)


def check_model(config, modes, max_length: int) -> None:
    """KA modes need a supported architecture; the windows must fit the model's positions."""
    if any(mode.uses_ka for mode in modes) and config.model_type not in SUPPORTED_ARCHITECTURES:
        raise KAError(
            f"KA modes need a supported architecture ({', '.join(SUPPORTED_ARCHITECTURES)}); this "
            f"model is {config.model_type!r}: use --modes kv"
        )
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and max_length > positions:
        raise KAError(f"--max-length {max_length} exceeds the model's {positions} positions")


def load_windows(run: PplRun, tokenizer):
    """(data record, windows that score at least one token), the first --max-windows of them if given."""
    texts = load_texts(run.dataset, run.dataset_config, run.split, run.text_file, run.text_column)
    ids = tokenize_texts(texts, tokenizer)
    windows = [window for window in ppl_windows(ids, run.max_length, run.stride) if count_scored_tokens([window]) > 0]
    if not windows:
        raise KAError("no window scores a token: give more text")
    all_windows = len(windows)
    windows = windows[: run.max_windows] if run.max_windows else windows
    if run.text_file:
        source = run.text_file
    elif run.dataset:
        source = f"{run.dataset} ({run.dataset_config}) [{run.split}]"
    else:
        source = f"ka_hf.study.data.default_corpus('{run.split}') (offline stdlib docstrings)"
    data = dict(
        source=source,
        texts=len(texts),
        tokens=len(ids),
        text_column=run.text_column,
        joined="texts tokenized without special tokens and joined with eos between them",
        tokenizer=run.tokenizer or run.model,
        vocabulary=len(tokenizer),
    )
    data["windows_available"] = all_windows
    return data, windows


# -----------------------------------------------------------------------------
# the record and the report


def results_record(run, model, data, windows, results, sweep, accelerator) -> dict:
    config = model.config
    return {
        "command": " ".join(sys.argv),
        "run": asdict(run),
        "model": {
            "path": run.model,
            "model_type": config.model_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "num_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "num_heads": config.num_attention_heads,
            "num_kv_heads": num_kv_heads(config),
            "dtype": run.dtype,
            "ka_config": getattr(config, "ka", None),
        },
        "data": data,
        "windows": {
            "max_length": run.max_length,
            "stride": run.stride,
            "count": len(windows),
            "scored_tokens": count_scored_tokens(windows),
            "scoring": "NLL over labels != -100 with the usual shift; context tokens (already scored by the "
            "previous window) are -100; windows that score no token are dropped",
            "limited_to_first": run.max_windows,
        },
        "method": run.method,
        "method_description": METHOD_DESCRIPTIONS[run.method],
        "modes": {record["mode"]: record["definition"] for record in results},
        "mode_definitions": DEFINITIONS,
        "seed": run.seed,
        "processes": accelerator.num_processes,
        "batch_size": run.batch_size,
        "mixed_precision": accelerator.mixed_precision,
        "environment": report.environment(),
        "results": results,
        "layer_sweep": None if sweep is None else {"kind": run.layer_sweep, "results": sweep},
    }


def table_rows(records):
    """Table cells: memory in MiB/KiB, mean NLL with 4 decimals (PPL gaps can be small)."""
    return [
        record
        | {
            "peak_memory_mib": record["peak_memory_bytes"] / 2**20,
            "cache_kib": record["cache_bytes"] / 1024,
            "mean_nll": f"{record['mean_nll']:.4f}",
        }
        for record in records
    ]


def results_markdown(record: dict, with_header: bool = True) -> str:
    """results.md: the run's settings, the table, the diagnostics."""
    results = record["results"]
    lines = []
    if with_header:
        model, data, windows = record["model"], record["data"], record["windows"]
        lines += [
            "# Perplexity: KV vs KA on the same model, windows and run",
            "",
            f"- model: `{model['path']}` ({model['model_type']}, {model['parameters'] / 1e6:.2f}M parameters, "
            f"{model['num_layers']} layers, hidden {model['hidden_size']}, {model['num_heads']} heads, {model['dtype']})",
            f"- data: {data['source']}: {data['tokens']:,} tokens; {windows['count']:,} windows of "
            f"{windows['max_length']} every {windows['stride']} tokens; {windows['scored_tokens']:,} scored tokens",
            f"- scoring: {record['method']} ({record['method_description']})",
            f"- device: {record['environment']['device']}, {record['processes']} process(es), batch "
            f"{record['batch_size']}, mixed precision {record['mixed_precision']}; seed {record['seed']}",
            f"- peak memory: {results[0]['peak_memory_kind']}; cache: bytes after {results[0]['cache_bytes_after']}",
            "",
        ]
    lines.append(report.markdown_table(table_rows(results), TABLE_COLUMNS))
    if with_header:
        lines += ["", "## Modes", ""] + [f"- `{name}`: {text}" for name, text in record["modes"].items()]
        lines += ["", "## Diagnostics", ""] + diagnostics_lines(record)
    return "\n".join(lines)


def diagnostics_lines(record) -> list[str]:
    """Words for the two hypotheses: error along the sequence (NLL gap by position) and over depth (sweep)."""
    lines = []
    kv = next((r for r in record["results"] if r["mode"] == "kv"), None)
    if kv is not None:
        lines += [
            "Mean NLL gap to kv (nats) by position in the window, in four equal ranges of the positions scored "
            "by most windows (does the error accumulate along the sequence?):",
            "",
        ]
        rows = [{"mode": r["mode"], **position_gaps(r, kv)} for r in record["results"] if r["mode"] != "kv"]
        quarter_keys = [key for key in (rows[0] if rows else {}) if key != "mode"]
        lines += [report.markdown_table(rows, [("mode", "mode")] + [(key, key) for key in quarter_keys], digits=4), ""]
    lines += window_lines(record)
    lines.append("![mean NLL by position](nll_by_position.png)")
    if kv is not None:
        lines.append("![NLL gap to kv by position](nll_gap_by_position.png)")
    sweep = record.get("layer_sweep")
    if sweep:
        what = "layers [0..k]" if sweep["kind"] == "prefix" else "layer k alone"
        lines += [
            "",
            f"Layer sweep: KA on {what} (does the error accumulate over depth?):",
            "",
            report.markdown_table(table_rows(sweep["results"]), TABLE_COLUMNS[:4]),
            "",
            "![layer sweep](layer_sweep.png)",
        ]
    return lines


def window_lines(record) -> list[str]:
    """Window modes: mean NLL in position ranges before and after the (smallest) window's end, beside every other
    mode, with the bytes each cache holds (do KA's outputs carry context past the window better than KV's?)."""
    windows = sorted({r["window"] for r in record["results"] if r.get("window")})
    if not windows:
        return []
    window, last = windows[0], len(record["results"][0]["tokens_by_position"]) - 1
    edges = [1, window]
    while edges[-1] <= last:
        edges.append(2 * edges[-1])
    ranges = [(start, min(stop, last + 1) - 1) for start, stop in zip(edges, edges[1:]) if start <= last]
    columns = [("mode", "mode"), ("cache_kib", "cache (KiB)")]
    rows = []
    for result in record["results"]:
        row = {"mode": result["mode"], "cache_kib": result["cache_bytes"] / 1024}
        for first, final in ranges:
            positions = range(first, final + 1)
            tokens = sum(result["tokens_by_position"][i] for i in positions)
            nll = sum((result["nll_by_position"][i] or 0.0) * result["tokens_by_position"][i] for i in positions)
            row[f"{first}-{final}"] = nll / tokens if tokens else None
        rows.append(row)
    columns += [(f"{first}-{final}", f"positions {first}-{final}") for first, final in ranges]
    return [
        f"Mean NLL (nats) by position of the predicted token, around the end of the {window}-token window "
        f"(positions {window} and later see the window only; caches measured after the first window):",
        "",
        report.markdown_table(rows, columns, digits=3),
        "",
    ]


def position_gaps(result, kv, parts: int = 4) -> dict:
    """Mean NLL gap (result - kv), token-weighted, over `parts` equal ranges of the scored positions."""
    positions = well_scored_positions(kv)
    gaps = {}
    for part in range(parts):
        chunk = positions[part * len(positions) // parts : (part + 1) * len(positions) // parts]
        if not chunk:
            continue
        tokens = sum(kv["tokens_by_position"][i] for i in chunk)
        gap = sum(
            (result["nll_by_position"][i] - kv["nll_by_position"][i]) * kv["tokens_by_position"][i] for i in chunk
        )
        gaps[f"positions {chunk[0]}-{chunk[-1]}"] = gap / tokens
    return gaps


def write_report(record: dict, out: Path) -> list[str]:
    """results.json (first: the scores), results.md and the PNGs in `out`; returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    plots = {"nll_by_position.png": plot_nll_by_position}
    if any(r["mode"] == "kv" for r in record["results"]):
        plots["nll_gap_by_position.png"] = plot_nll_gap_by_position
    if record.get("layer_sweep"):
        plots["layer_sweep.png"] = plot_layer_sweep
    names = ["results.json", "results.md", *plots]
    report.write_json(out / "results.json", EvalRecord.build(record | {"files": names}))
    report.write_text(out / "results.md", results_markdown(record) + "\n")
    for name, plot in plots.items():
        plot(record, out / name)
    return names


def well_scored_positions(result) -> list[int]:
    """Positions scored in at least half as many windows as the most scored one. With --stride < --max-length
    the early positions are scored by the first window alone: one window's noise, left out of the diagnostics."""
    counts = result["tokens_by_position"]
    return [i for i, n in enumerate(counts) if n > 0 and 2 * n >= max(counts)]


def _position_series(result, bins: int = 128):
    """(position, mean NLL) of the well-scored positions; long windows are averaged in about `bins` bins."""
    series = [(i, result["nll_by_position"][i], result["tokens_by_position"][i]) for i in well_scored_positions(result)]
    width = max(1, len(series) // bins)
    binned = []
    for start in range(0, len(series), width):
        chunk = series[start : start + width]
        tokens = sum(n for _, _, n in chunk)
        binned.append((sum(i for i, _, _ in chunk) / len(chunk), sum(nll * n for _, nll, n in chunk) / tokens))
    return binned


def _finish_position_axes(ax, record, ylabel, title):
    """Labels, a dashed line at each window mode's window end, the legend outside the data."""
    for window in sorted({r["window"] for r in record["results"] if r.get("window")}):
        ax.axvline(window, color="gray", linestyle="--", linewidth=0.8)
        ax.annotate(
            f"window {window}", (window, 1.0), xycoords=("data", "axes fraction"), fontsize=8, ha="left", va="top"
        )
    ax.set(xlabel="position of the predicted token in the window", ylabel=ylabel, title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_nll_by_position(record, path):
    def draw(ax):
        for result in record["results"]:
            positions, nll = zip(*_position_series(result))
            ax.plot(positions, nll, label=result["mode"], linewidth=1.2)
        _finish_position_axes(ax, record, "mean NLL (nats)", "Mean NLL by position")

    return report.save_plot(path, draw)


def plot_nll_gap_by_position(record, path):
    kv = next(r for r in record["results"] if r["mode"] == "kv")

    def draw(ax):
        for result in record["results"]:
            if result is kv:
                continue
            (positions, nll), (_, kv_nll) = zip(*_position_series(result)), zip(*_position_series(kv))
            ax.plot(positions, [a - b for a, b in zip(nll, kv_nll)], label=f"{result['mode']} - kv", linewidth=1.2)
        ax.axhline(0.0, color="black", linewidth=0.8)
        _finish_position_axes(ax, record, "NLL gap to kv (nats)", "Does the KA error accumulate along the sequence?")

    return report.save_plot(path, draw)


def plot_layer_sweep(record, path):
    sweep = record["layer_sweep"]
    reference = {r["mode"]: r["ppl"] for r in record["results"]}

    def draw(ax):
        ks = [max(r["layers"]) for r in sweep["results"]]
        ax.plot(
            ks,
            [r["ppl"] for r in sweep["results"]],
            marker="o",
            label="KA on " + ("layers 0..k" if sweep["kind"] == "prefix" else "layer k only"),
        )
        for name, style in (("kv", "--"), ("ka", ":")):
            if name in reference:
                ax.axhline(reference[name], linestyle=style, color="gray", label=f"{name} ({reference[name]:.4g})")
        ax.set(xlabel="k", ylabel="PPL", title="Does the KA error accumulate over depth?")
        ax.set_xticks(ks)
        ax.legend()

    return report.save_plot(path, draw)
