"""The plan-1 adapter's prompt pass against plain KA's, measured in one run (issue: "a fast exact plan-1 adapter").

    python benchmarks/bench_adapter.py                        # GPT-NeoX hidden 256, 4 layers, T = 512 and 4096
    python benchmarks/bench_adapter.py --lengths 512 --loop   # also the old token loop (slow)
    python benchmarks/bench_adapter.py --device cuda --out bench_adapter.json

A random-init GPT-NeoX (hidden 256, 4 layers, 8 heads of 32, rotary_pct 0.25, vocab 12,288: the medium preset's
attention shape), float32, batch 1. One prompt pass = `model(ids, cache=KACache(...))` under no_grad, with the
logits of every position. Kinds, interleaved round by round so machine noise hits them alike:
- "ka": `KACache()` (the blocked kernel);
- "ka+adapter": `KACache(adapter=...)` with an affine adapter (M = I + noise, b = noise), the exact block kernel;
- "ka+adapter mlp": the same with a residual MLP (nonlinear f: blocks with the past fused, a token loop inside);
- "ka+adapter loop" (--loop): `kernel="loop"`, the token recursion every adapter used to run.
Reports medians over --repeats (after a warm-up) and each kind's ratio to "ka" at the same length, with the
1-minute load average: timings are meaningful only on a quiet machine.
"""

import argparse
import functools
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

import ka_hf
from ka_hf.adapters import KAAdapter
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
from ka_hf.study.models import model_config

SHAPE = dict(num_layers=4, hidden_size=256, num_heads=8, intermediate_size=1024, rotary_pct=0.25)


def random_adapter(model, mlp_hidden: int = 0, seed: int = 0) -> KAAdapter:
    """An adapter away from the identity (an identity one would hide nothing, but neither measure anything)."""
    adapter = KAAdapter.for_model(model, mlp_hidden=mlp_hidden)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head_dim = adapter.head_dim
        adapter.weight.add_(torch.randn(adapter.weight.shape, generator=generator) * 0.3 / head_dim**0.5)
        adapter.bias.add_(torch.randn(adapter.bias.shape, generator=generator) * 0.1)
        if adapter.mlp is not None:
            for mlp in adapter.mlp:
                mlp.down.weight.normal_(0.0, 0.02, generator=generator)
    return adapter.to(next(model.parameters()).device)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def prompt_pass(model, input_ids, make_cache, device):
    @torch.no_grad()
    def run() -> float:
        synchronize(device)
        started = time.perf_counter()
        model(input_ids, cache=make_cache(), use_cache=True)
        synchronize(device)
        return time.perf_counter() - started

    return run


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


@user_errors_exit_2
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,4096", help="comma-separated prompt lengths (default: 512,4096)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per kind and length")
    parser.add_argument("--vocab-size", type=int, default=12288)
    parser.add_argument("--loop", action="store_true", help="also time the token loop (kernel='loop'; slow)")
    parser.add_argument("--no-mlp", action="store_true", help="skip the residual-MLP adapter")
    add_output_arguments(parser, what="the results (JSON)", file=True)
    add_runtime_arguments(parser, dtype=False, progress=False)
    args = parser.parse_args(argv)
    try:
        lengths = [int(text) for text in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    check_numbers(args, at_least={"repeats": 1, "vocab_size": 2})
    if min(lengths) < 2:
        parser.error("--lengths must be at least 2 tokens each")
    if args.out:
        files.check_out_file(args.out, args.overwrite)
    apply_runtime_flags(args)
    device = device_of(args)

    torch.manual_seed(0)
    config = model_config("gpt-neox", args.vocab_size, max_positions=max(2048, max(lengths)), **SHAPE)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).eval()
    affine, with_mlp = random_adapter(model), random_adapter(model, mlp_hidden=64)
    caches = {"ka": ka_hf.KACache, "ka+adapter": functools.partial(ka_hf.KACache, adapter=affine)}
    if not args.no_mlp:
        caches["ka+adapter mlp"] = functools.partial(ka_hf.KACache, adapter=with_mlp)
    if args.loop:
        caches["ka+adapter loop"] = functools.partial(ka_hf.KACache, adapter=affine, kernel="loop")

    rows = []
    for length in lengths:
        input_ids = torch.randint(0, args.vocab_size, (1, length), device=device)
        runs = {kind: prompt_pass(model, input_ids, make, device) for kind, make in caches.items()}
        times = {kind: [] for kind in runs}
        loads = [load_average()]
        for round_ in range(1 + args.repeats):  # round 0 warms up
            for kind, run in runs.items():
                seconds = run()
                if round_:
                    times[kind].append(seconds)
            loads.append(load_average())
        baseline = statistics.median(times["ka"])
        for kind, seconds in times.items():
            median = statistics.median(seconds)
            rows.append(
                dict(
                    tokens=length,
                    kind=kind,
                    ms=1e3 * median,
                    min_ms=1e3 * min(seconds),
                    ratio=median / baseline,
                    load=max(load for load in loads if load is not None) if loads[0] is not None else None,
                )
            )
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"prompt pass (no_grad, logits of every position), GPT-NeoX hidden 256 x 4 layers, 8 heads of 32, "
        f"{parameters / 1e6:.1f}M parameters, float32, batch 1, {device}, torch threads {torch.get_num_threads()}"
    )
    columns = [
        ("tokens", "tokens"),
        ("kind", "cache"),
        ("ms", "median ms"),
        ("min_ms", "min ms"),
        ("ratio", "x ka"),
        ("load", "load avg (1 min, max)"),
    ]
    print(report.markdown_table(rows, columns))
    for row in rows:
        if row["kind"] == "ka+adapter":
            print(f"ka+adapter / ka at {row['tokens']} tokens: {row['ratio']:.2f}x (bar: <= 1.5x, goal <= 1.1x)")
    if args.out:
        record = dict(args=vars(args), parameters=parameters, results=rows, environment=report.environment())
        files.write_results(args.out, lambda path: report.write_json(path, record), file=True)


if __name__ == "__main__":
    main()
