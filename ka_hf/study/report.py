"""Reports: JSON records, markdown tables, the run's environment, PNG plots. Functions return or write; they
compute no metrics."""

import json
import math
import os
import platform
from pathlib import Path

import torch


def environment() -> dict:
    """Library versions and the device, recorded in every results.json."""
    import accelerate
    import datasets
    import transformers

    import ka_hf

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {
        "ka_hf": ka_hf.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }


def write_json(path, record) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def format_number(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 1e5 or (0 < abs(value) < 10 ** -digits):
            return f"{value:.{digits}e}"
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]], digits: int = 2) -> str:
    """rows: dicts; columns: (key, header) pairs. Numbers are formatted, missing cells shown as –."""
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format_number(row.get(key), digits) for key, _ in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def save_plot(path, draw) -> Path:
    """Create a figure, let `draw(ax)` fill it, save it as PNG and close it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    draw(ax)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
