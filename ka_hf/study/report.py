"""Reports: JSON records, markdown tables, the run's environment, PNG plots. Functions return or write; they
compute no metrics. Files are written atomically by ka_hf.study.files (re-exported here)."""

import math
import os
import platform

import torch

from .files import check_out_dir, save_plot, write_json, write_text  # noqa: F401  (the writers' one home)


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
        if abs(value) >= 1e5 or (0 < abs(value) < 10**-digits):
            return f"{value:.{digits}e}"
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]], digits: int = 2) -> str:
    """rows: dicts; columns: (key, header) pairs. Numbers are formatted, missing cells shown as –."""
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format_number(row.get(key), digits) for key, _ in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])
