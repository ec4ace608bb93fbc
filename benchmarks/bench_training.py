"""Training-step time, KA vs standard attention, at every shape the study's presets train, in one run.

    python benchmarks/bench_training.py                              # every preset: quick, facts, ..., seed
    python benchmarks/bench_training.py --presets medium --steps 5 --out bench_training.json
    python benchmarks/bench_training.py --presets seed --loop         # also the token loop (slow)

One step = forward + backward + AdamW step on a random-init model of the preset's shape (architecture, layers,
hidden size, heads, MLP, vocabulary) at its training batch (batch size x seq_len), float32. Kinds, interleaved
round by round (standard, KA auto, KA blocked, KA parallel, standard, ...) so that machine noise hits them alike:
- "standard": SDPA;
- "ka auto": `ka_hf.exact_ka(model)` with the default kernel choice, what training runs;
- "ka blocked" / "ka parallel": the same with that kernel named (ops/kernels.py);
- "ka loop" (--loop): the reference recursion, the way the original project trained (it reported 4.7x).
Per shape: median and minimum ms per step of each kind and its ratio to standard (on a shared machine the
minimum is the steadier estimate), with the 1-minute load average: timings mean something only on a quiet machine.
"""

import argparse
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

import ka_hf
from ka_hf.study import files, report
from ka_hf.study.cli import (
    ArgumentParser,
    add_output_arguments,
    add_runtime_arguments,
    apply_runtime_flags,
    check_numbers,
    device_of,
    user_errors_exit_2,
)
from ka_hf.study.experiment import PRESETS, ExperimentConfig
from ka_hf.study.models import model_config

SHAPE_KEYS = ("arch", "num_layers", "hidden_size", "num_heads", "intermediate_size", "rotary_pct", "vocab_size")
KERNELS = {"standard": None, "ka auto": "auto", "ka blocked": "blocked", "ka parallel": "parallel", "ka loop": "loop"}


def preset_shape(preset: str) -> dict:
    """The model shape and training batch of a preset (its ExperimentConfig, nothing read or written)."""
    config = ExperimentConfig.from_preset(preset, out="unused")
    shape = {key: getattr(config, key) for key in SHAPE_KEYS}
    return dict(shape, seq_len=config.seq_len, batch_size=config.batch_size)


def make_step(model, optimizer, input_ids, kernel, device):
    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        if kernel is None:
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        else:
            with ka_hf.exact_ka(model, kernel=kernel):
                loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    return step


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def time_shape(preset: str, shape: dict, kinds: list[str], args, device) -> dict:
    """One row: the preset's shape, each kind's median / min ms per step and ratios to standard."""
    torch.manual_seed(0)
    spec = {key: shape[key] for key in SHAPE_KEYS}
    arch, vocab_size = spec.pop("arch"), spec.pop("vocab_size")
    config = model_config(arch, vocab_size, max_positions=max(2048, shape["seq_len"]), **spec)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(0, vocab_size, (shape["batch_size"], shape["seq_len"]), device=device)
    steps = {kind: make_step(model, optimizer, input_ids, KERNELS[kind], device) for kind in kinds}
    times = {kind: [] for kind in kinds}
    loads = [load_average()]
    for round_ in range(args.warmup + args.steps):
        for kind in kinds:
            if kind == "ka loop" and round_ >= args.warmup + args.loop_steps:
                continue
            seconds = steps[kind]()
            if round_ >= args.warmup:
                times[kind].append(seconds)
        loads.append(load_average())
    row = dict(
        preset=preset,
        arch=arch,
        shape=f"{shape['num_layers']} x {shape['hidden_size']}",
        head_size=shape["hidden_size"] // shape["num_heads"],
        seq_len=shape["seq_len"],
        batch=shape["batch_size"],
        load=max(loads) if None not in loads else None,
    )
    standard, fastest = statistics.median(times["standard"]), min(times["standard"])
    for kind, seconds in times.items():
        row[f"{kind} ms"] = 1e3 * statistics.median(seconds)
        if kind != "standard":
            row[f"{kind} x"] = statistics.median(seconds) / standard
            row[f"{kind} x min"] = min(seconds) / fastest
    row["standard min ms"] = 1e3 * fastest
    return row


@user_errors_exit_2
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--presets", default=",".join(PRESETS), help=f"comma-separated presets (default: all: {','.join(PRESETS)})"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per kind")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--loop", action="store_true", help="also time the token-loop reference (slow)")
    parser.add_argument("--loop-steps", type=int, default=2, help="timed steps of the token loop")
    add_output_arguments(parser, what="the results (JSON)", file=True)
    add_runtime_arguments(parser, dtype=False, progress=False)
    args = parser.parse_args(argv)
    presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    unknown = [name for name in presets if name not in PRESETS]
    if unknown or not presets:
        parser.error(f"--presets {args.presets!r}: use some of {', '.join(PRESETS)}")
    check_numbers(args, at_least={"steps": 1, "warmup": 0, "loop_steps": 1})
    if args.out:
        files.check_out_file(args.out, args.overwrite)
    apply_runtime_flags(args)
    device = device_of(args)
    kinds = ["standard", "ka auto", "ka blocked", "ka parallel"] + (["ka loop"] if args.loop else [])

    rows = [time_shape(preset, preset_shape(preset), kinds, args, device) for preset in presets]
    print(f"training step (forward + backward + AdamW), float32, {device}, torch threads {torch.get_num_threads()}")
    columns = [
        ("preset", "preset"),
        ("arch", "arch"),
        ("shape", "layers x hidden"),
        ("head_size", "head size"),
        ("seq_len", "T"),
        ("batch", "batch"),
        ("standard ms", "standard ms"),
    ]
    for kind in kinds[1:]:
        columns += [(f"{kind} x", f"{kind} x"), (f"{kind} x min", "(min)")]
    columns.append(("load", "load avg"))
    print(report.markdown_table(rows, columns))
    worst = max(rows, key=lambda row: row["ka auto x"])
    print(f"KA (auto) / standard: at most {worst['ka auto x']:.2f}x (median, {worst['preset']}); target <= 1.2x")
    if args.out:
        record = dict(args=vars(args), results=rows, environment=report.environment())
        files.write_results(args.out, lambda path: report.write_json(path, record), file=True)


if __name__ == "__main__":
    main()
