"""The recall run's report.md, results.json and accuracy_by_distance.png, from its record (nothing computed
here but formatting)."""

from pathlib import Path

from .. import files
from ..report import markdown_table
from ..verdicts import NOISE_FACTOR, format_stat

TITLES = {  # mode -> (training, inference) for the main table
    "kv": ("standard", "KV cache"),
    "ka": ("standard", "KA cache (plan 3)"),
    "ka-hybrid": ("standard", "ka-hybrid (pairs standard, queries KA)"),
    "ka+adapter": ("standard", "KA cache + distilled adapter (plan 1)"),
    "ka-trained": ("KA", "KA cache"),
}
VERDICT_TITLES = {
    "plan3": "Does plan 3 keep recall?",
    "ka_training": "Does KA training recover it?",
    "windows": "Windows against full caches at equal bytes",
}
PLOT = "accuracy_by_distance.png"


def _title(mode: str) -> tuple[str, str]:
    if mode in TITLES:
        return TITLES[mode]
    kind, _, size = mode.partition("@")
    return "standard", f"{'KV' if kind == 'kv-window' else 'KA'} window {size} (W+S)"


def _stat(stat, digits: int = 3) -> str:
    return format_stat(stat, digits) if isinstance(stat, dict) and "mean" in stat else "–"


def main_table(record) -> str:
    summary = record.summary
    shapes = list(summary["kv"]["by_shape"])
    header = "| mode | training | inference | accuracy | " + " | ".join(shapes) + " | cache bytes / sequence |"
    rule = "|" + "---|" * (5 + len(shapes))
    rows = []
    for mode in record.modes:
        training, inference = _title(mode)
        by_shape = " | ".join(_stat(summary[mode]["by_shape"][shape]) for shape in shapes)
        cache = summary[mode]["cache_bytes"]["mean"]
        rows.append(
            f"| `{mode}` | {training} | {inference} | {_stat(summary[mode]['accuracy'])} | {by_shape} | {cache:,.0f} |"
        )
    guess = record.task.get("guess_accuracy")
    if guess is not None:
        per_shape = " | ".join(f"{1 / _pairs(record, shape):.3f}" for shape in shapes)
        rows.append(f"| guess | – | one of the sequence's values (1/P) | {guess:.3f} | {per_shape} | – |")
    return "\n".join([header, rule, *rows])


def _pairs(record, shape: str) -> int:
    return record.seeds[0]["results"]["kv"]["by_shape"][shape]["pairs"]


def distance_table(record) -> str:
    summary = record.summary
    bins = list(summary["kv"]["by_distance"])
    counts = record.seeds[0]["results"]["kv"]["by_distance"]
    header = "| distance | queries | " + " | ".join(f"`{mode}`" for mode in record.modes) + " |"
    rule = "|" + "---|" * (2 + len(record.modes))
    rows = [
        f"| {key} | {counts[key]['queries']:,} | "
        + " | ".join(_stat(summary[mode]["by_distance"].get(key)) for mode in record.modes)
        + " |"
        for key in bins
    ]
    return "\n".join([header, rule, *rows])


def training_table(record) -> str:
    rows = [
        dict(
            seed=seed["seed"],
            model=name,
            steps=training["steps"],
            reached="yes" if training["reached_target"] else "no",
            stage=training["final_stage"],
            val=training["val_accuracy"],
            seconds=training["seconds"],
        )
        for seed in record.seeds
        for name, training in seed["training"].items()
    ]
    columns = [
        ("seed", "seed"),
        ("model", "model"),
        ("steps", "steps"),
        ("reached", f"reached {record.config['target']:g}"),
        ("stage", "shapes in play"),
        ("val", "final val accuracy"),
        ("seconds", "seconds"),
    ]
    return markdown_table(rows, columns, digits=3)


def power_section(record) -> str:
    lines = [
        f"- {check['question']}: {check['check']} = {_number(check['value'])} (needs "
        f"{'≥' if check['at_least'] else '≤'} {check['threshold']:g}): **{'passed' if check['passed'] else 'FAILED'}**"
        for check in record.power
    ]
    return "\n".join(lines)


def _number(value) -> str:
    return "not measured" if value is None else f"{value:.4f}"


def configuration(record) -> str:
    config, task, model = record.config, record.task, record.model
    shapes = ", ".join(f"T={s['seq_len']} with {s['pairs']} pairs" for s in task["shapes"])
    environment = record.environment
    load = [environment.get("load_average_start"), environment.get("load_average_end")]
    load_text = " → ".join(f"{v:.1f}" for v in load if v is not None) or "not measured"
    return "\n".join(
        [
            f"- Command: `{record.command}` ({record.date}), {record.timings_s['total']:.0f} s in all on "
            f"{environment['device']} (1-minute load average {load_text}; torch {environment['torch']}, "
            f"transformers {environment['transformers']}).",
            f"- Data (MQAR, Zoology): {shapes}; vocabulary {task['vocab_size']} ({task['filler']} filler tokens, "
            f"{(task['vocab_size'] - task['filler']) // 2} keys, as many values); query placement `{task['distance']}`; "
            f"{task['test_sequences']} test sequences per shape, the same for every mode and seed.",
            f"- Model: {model['arch']}, {model['num_layers']} layers, d_model {model['hidden_size']}, "
            f"{model['num_heads']} heads, MLP {model['intermediate_size']} ({_count(model.get('parameters'))} "
            "parameters), from scratch.",
            f"- Training (both models): AdamW lr {config['lr']:g}, ~{config['batch_tokens']:,} tokens a step, loss on "
            f"the queries only; curriculum over the shapes (the next joins at validation accuracy "
            f"{config['advance_at']:g}; with the last one the learning rate drops to {config['final_lr_factor']:g}x); "
            f"early stopping at {config['target']:g} over every shape; at most {config['max_steps']:,} steps"
            + (", the KA model at most its standard twin's." if config.get("match_steps") else "."),
            f"- Seeds: {config['seeds']} ({', '.join(str(s['seed']) for s in record.seeds)}); numbers are mean ± "
            f"std over them; a difference is called when it exceeds {NOISE_FACTOR:g} std of the per-seed "
            "differences.",
        ]
    )


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "–"


def render(record) -> str:
    verdicts = "\n".join(
        f"{i}. **{VERDICT_TITLES[key]}** {verdict['text']}"
        for i, (key, verdict) in enumerate(record.verdicts.items(), 1)
    )
    definitions = "\n".join(f"- `{mode}`: {text}" for mode, text in record.modes.items())
    return f"""# {record.title}

Accuracy on the query tokens: at each query (a key seen earlier in the sequence) the model's top token must be
the key's paired value.

## Configuration

{configuration(record)}

## Power

{power_section(record)}

## Accuracy

{main_table(record)}

Accuracy is pooled over every query of every shape (columns: per shape). "guess": the accuracy of picking one
of the sequence's P values at random (knowing which tokens are values, not which key each belongs to). Cache
bytes: one sequence of the longest shape, measured with `ka_hf.cache_nbytes` after the whole sequence.

### By key → query distance (tokens)

{distance_table(record)}

![accuracy by distance]({PLOT})

## Verdicts

{verdicts}

## Training

{training_table(record)}

## Modes

{definitions}
"""


def draw_plot(record, path: Path) -> Path:
    summary = record.summary
    bins = list(summary["kv"]["by_distance"])
    window = record.config["window"]

    def draw(ax):
        for index, mode in enumerate(record.modes):
            means = [summary[mode]["by_distance"].get(key, {}).get("mean") for key in bins]
            stds = [summary[mode]["by_distance"].get(key, {}).get("std") or 0.0 for key in bins]
            x = [i for i, m in enumerate(means) if m is not None]
            style = "--" if "window" in mode else "-"  # (ka-window and ka can lie on top of each other)
            ax.errorbar(
                x, [means[i] for i in x], yerr=[stds[i] for i in x], marker="os^vDPX"[index % 7], linestyle=style,
                capsize=3, label=mode,
            )  # fmt: skip
        edge = next((i for i, key in enumerate(bins) if int(key.split("-")[0]) >= window), None)
        if edge is not None:
            ax.axvline(edge - 0.5, color="grey", linestyle=":", linewidth=1)
            ax.text(edge - 0.55, 0.35, f"window W = {window} →", fontsize=7, color="grey", ha="right", va="center")
        ax.set_xticks(range(len(bins)), bins)
        ax.set_xlabel("key → query distance (tokens)")
        ax.set_ylabel("recall accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"MQAR recall by distance (mean ± std over {record.config['seeds']} seeds)")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))

    return files.save_plot(path, draw)


def write_report(record, out) -> dict:
    """DIR/report.md, DIR/results.json and the plot; their paths (also in record.files)."""
    out = Path(out)
    record.files = dict(report=str(out / "report.md"), results=str(out / "results.json"), plot=str(out / PLOT))
    draw_plot(record, out / PLOT)
    files.write_text(out / "report.md", render(record))
    files.write_json(out / "results.json", record)
    return record.files
