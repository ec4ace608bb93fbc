"""KA against KV at long context: time and peak memory of a prefill and a training step, and the decode step.

    python benchmarks/bench_long.py                                  # CPU, float32, T in 512 .. 8192
    python benchmarks/bench_long.py --lengths 512,1024 --out /tmp/long   # a quick look
    python benchmarks/bench_long.py --device cuda --dtype bfloat16

Random-init models, batch 1:
- Pythia-70M shape (GPT-NeoX, 6 x 512, 8 heads, MHA): prefill (`KACache` vs `DynamicCache`, the prompt's last
  logits only, as generate() computes them), training step (forward + backward, `ka_hf.exact_ka` vs SDPA, loss
  over all T positions), and one decode step after a T-token context;
- a Llama shape with grouped-query attention (6 x 1024, 16 query / 4 key-value heads): the decode step.

Every measurement runs in a fresh process, so its peak memory is its own: peak RSS (CUDA: max allocated) above
what the process held once the model and inputs were ready. Times are medians of `--repeats` runs after a warm-up
(decode: median over `--decode-steps` steps; its context is prefilled with standard attention for both, so the KA
cache then holds standard outputs: the timed steps are pure KA decode steps). Prints a markdown table of the
ratios measured in this run, writes `bench_long.json`, `bench_long.md` and `bench_long.png` under `--out`.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from ka_hf.study import files
from ka_hf.study.cli import (
    ArgumentParser,
    add_output_arguments,
    add_runtime_arguments,
    apply_runtime_flags,
    device_of,
    user_errors_exit_2,
)

MODELS = {
    "pythia-70m": dict(
        arch="gpt-neox",
        vocab_size=50304,
        num_layers=6,
        hidden_size=512,
        num_heads=8,
        intermediate_size=2048,
        rotary_pct=0.25,
    ),
    "llama-gqa": dict(
        arch="llama",
        vocab_size=32000,
        num_layers=6,
        hidden_size=1024,
        num_heads=16,
        num_kv_heads=4,
        intermediate_size=2816,
    ),
}
KINDS = {"prefill": "pythia-70m", "train": "pythia-70m", "decode-mha": "pythia-70m", "decode-gqa": "llama-gqa"}


# ---------------------------------------------------------------------------------------------------------
# One measurement (a child process)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory above the level at `start()`: CUDA max allocated, or the process's peak RSS (VmHWM, reset)."""

    def __init__(self, device):
        self.device = device

    def start(self):
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current RSS
            self.base = _rss_bytes("VmRSS")

    def peak_above_start(self) -> int:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return _rss_bytes("VmHWM") - self.base


def measure(kind: str, mode: str, length: int, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    import ka_hf
    from ka_hf.study.models import model_config

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = dict(getattr(args, "models", MODELS)[KINDS[kind]])  # args.models: other shapes (gpu_check --tiny)
    torch.manual_seed(0)
    config = model_config(spec.pop("arch"), max_positions=max(length + args.decode_steps + 8, 2048), **spec)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device, dtype)
    input_ids = torch.randint(0, config.vocab_size, (1, length), device=device)
    new_cache = ka_hf.KACache if mode == "ka" else DynamicCache

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def prefill():
        with torch.no_grad():
            model(input_ids, past_key_values=new_cache(), use_cache=True, logits_to_keep=1)

    def train_step():
        model.zero_grad(set_to_none=True)
        if mode == "ka":
            with ka_hf.exact_ka(model):
                loss = model(input_ids, labels=input_ids, use_cache=False).loss
        else:
            loss = model(input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()

    if kind.startswith("decode"):
        return dict(seconds=decode_step_seconds(model, input_ids, mode, args.decode_steps, sync))
    model.train(kind == "train")
    run = train_step if kind == "train" else prefill
    if kind == "train":  # the parameters' gradients exist in both modes: allocate them before the baseline
        train_step()
    memory = PeakMemory(device)
    memory.start()
    run()  # warm-up, and the peak-memory measurement
    sync()
    peak = memory.peak_above_start()
    seconds = []
    for _ in range(args.repeats):
        sync()
        started = time.perf_counter()
        run()
        sync()
        seconds.append(time.perf_counter() - started)
    return dict(seconds=statistics.median(seconds), peak_bytes=peak)


def decode_step_seconds(model, input_ids, mode, steps, sync) -> float:
    import torch
    from transformers import DynamicCache

    import ka_hf

    cache = ka_hf.KACache(prefill="standard") if mode == "ka" else DynamicCache()
    with torch.no_grad():
        token = model(input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
        seconds = []
        for _ in range(steps + 2):  # the first two steps warm up
            sync()
            started = time.perf_counter()
            token = model(token, past_key_values=cache, use_cache=True).logits.argmax(-1)
            sync()
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[2:])


# ---------------------------------------------------------------------------------------------------------
# The driver


def run_child(kind, mode, length, args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        mode,
        str(length),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--decode-steps",
        str(args.decode_steps),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table(rows) -> str:
    lines = [
        "| T | prefill KA/KV time | prefill KA/KV memory | train step KA/KV time | train step KA/KV memory "
        "| decode MHA KA/KV time | decode GQA KA/KV time |",
        "|" + "---|" * 7,
    ]
    for row in rows:
        cells = [f"{row['T']:,}"]
        for kind in ("prefill", "train"):
            ka, kv = row[kind]["ka"], row[kind]["kv"]
            cells.append(f"**{ka['seconds'] / kv['seconds']:.2f}x** ({ka['seconds']:.2f} s / {kv['seconds']:.2f} s)")
            cells.append(
                f"**{ka['peak_bytes'] / kv['peak_bytes']:.2f}x** ({format_bytes(ka['peak_bytes'])} / "
                f"{format_bytes(kv['peak_bytes'])})"
            )
        for kind in ("decode-mha", "decode-gqa"):
            ka, kv = row[kind]["ka"], row[kind]["kv"]
            cells.append(
                f"**{ka['seconds'] / kv['seconds']:.2f}x** ({ka['seconds'] * 1e3:.1f} ms / "
                f"{kv['seconds'] * 1e3:.1f} ms)"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [row["T"] for row in rows]
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, label in (
        ("prefill", "prefill"),
        ("train", "train step"),
        ("decode-mha", "decode, MHA"),
        ("decode-gqa", "decode, GQA 16/4"),
    ):
        time_axis.plot(lengths, [r[kind]["ka"]["seconds"] / r[kind]["kv"]["seconds"] for r in rows], "o-", label=label)
    for kind, label in (("prefill", "prefill"), ("train", "train step")):
        memory_axis.plot(
            lengths, [r[kind]["ka"]["peak_bytes"] / r[kind]["kv"]["peak_bytes"] for r in rows], "o-", label=label
        )
    for axis, title in ((time_axis, "time, KA / KV"), (memory_axis, "peak memory, KA / KV")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [f"{t // 1024}k" if t >= 1024 else str(t) for t in lengths])
        axis.axhline(1.0, color="gray", linewidth=0.8)
        axis.axhline(1.5, color="gray", linewidth=0.8, linestyle="--")
        axis.set_xlabel("context length T (tokens)")
        axis.set_title(title)
        axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    with files.atomic_path(path) as temporary:  # a crash leaves no half-written plot
        figure.savefig(temporary, dpi=120, format="png")


@user_errors_exit_2
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-steps", type=int, default=16)
    add_output_arguments(parser, default="bench_long_out", what="bench_long.{json,md,png}")
    add_runtime_arguments(parser)  # --threads default here: every CPU core
    parser.add_argument("--child", nargs=3, metavar=("KIND", "MODE", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = str(device_of(args))  # resolved once, so every child measures on the same device
    args.threads = args.threads if args.threads is not None else os.cpu_count()
    apply_runtime_flags(args)
    if args.child:
        kind, mode, length = args.child
        print(json.dumps(measure(kind, mode, int(length), args)))
        return

    from tqdm.auto import tqdm

    out = files.check_out_dir(args.out, args.overwrite)  # before anything is measured
    lengths = [int(t) for t in args.lengths.split(",")]
    kinds = args.kinds.split(",")
    jobs = [(length, kind, mode) for length in lengths for kind in kinds for mode in ("kv", "ka")]
    results = {}
    started = time.perf_counter()
    for length, kind, mode in tqdm(jobs, desc="measurements", disable=not args.progress):
        results.setdefault(length, {"T": length}).setdefault(kind, {})[mode] = run_child(kind, mode, length, args)
    rows = [results[length] for length in lengths]
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {args.threads} torch threads"
    if args.device.startswith("cuda"):
        import torch

        machine = torch.cuda.get_device_name(0)
    header = (
        f"Machine: {machine}; {platform.platform()}; dtype {args.dtype}; batch 1; "
        f"{time.perf_counter() - started:.0f} s in all\n"
    )
    markdown = header + "\n" + table(rows) if set(kinds) == set(KINDS) else header
    print(markdown)

    def write(folder):
        folder.mkdir(parents=True, exist_ok=True)
        files.write_json(folder / "bench_long.json", dict(machine=machine, dtype=args.dtype, rows=rows))
        files.write_text(folder / "bench_long.md", markdown + "\n")
        if set(kinds) == set(KINDS):
            plot(rows, folder / "bench_long.png")

    files.write_results(out, write)
    print(f"wrote {out}/bench_long.json, .md, .png")


if __name__ == "__main__":
    main()
