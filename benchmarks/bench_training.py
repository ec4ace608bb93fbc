"""Training-step time, KA vs standard attention, at the original protocol's shapes, in one run.

    python benchmarks/bench_training.py                      # Pythia-70M shape, batch 8 x 128 tokens
    python benchmarks/bench_training.py --vocab-size 8192 --steps 10 --out bench_training.json

One step = forward + backward + AdamW step on a random-init GPT-NeoX of the Pythia-70M shape (6 layers, hidden
512, 8 heads, rotary_pct 0.25). The three kinds of step are interleaved (standard, KA parallel, KA token loop,
standard, ...) so that machine noise hits them alike; medians and minima are reported, with the ratios to
standard (on a shared machine the minimum is the steadier estimate of the cost).
"KA token loop" runs the reference recursion (`ka_hf.ops.ka_attention_naive`) in place of the parallel solve:
the way the original project trained (it reported 4.7x); --no-loop skips it.
"""

import argparse
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
    device_of,
    user_errors_exit_2,
)
from ka_hf.study.models import PYTHIA_70M_SHAPE, model_config


def make_step(model, optimizer, input_ids, kind, device):
    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        if kind == "standard":
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        else:
            with ka_hf.exact_ka(model, kernel="loop" if kind == "ka loop" else "auto"):
                loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    return step


@user_errors_exit_2
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=50304, help="Pythia's padded vocabulary by default")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per kind")
    parser.add_argument("--loop-steps", type=int, default=2, help="timed steps of the (slow) token loop")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-loop", action="store_true", help="skip the token-loop reference")
    add_output_arguments(parser, what="the results (JSON)", file=True)
    add_runtime_arguments(parser, dtype=False, progress=False)
    args = parser.parse_args(argv)
    if args.out:
        files.check_out_file(args.out, args.overwrite)
    apply_runtime_flags(args)
    device = device_of(args)
    torch.manual_seed(0)
    config = model_config("gpt-neox", args.vocab_size, max_positions=max(2048, args.seq_len), **PYTHIA_70M_SHAPE)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    kinds = ["standard", "ka parallel"] + ([] if args.no_loop else ["ka loop"])
    steps = {kind: make_step(model, optimizer, input_ids, kind, device) for kind in kinds}
    times = {kind: [] for kind in kinds}
    for round_ in range(args.warmup + args.steps):
        for kind in kinds:
            if kind == "ka loop" and round_ >= args.warmup + args.loop_steps:
                continue
            seconds = steps[kind]()
            if round_ >= args.warmup:
                times[kind].append(seconds)

    tokens = args.batch_size * args.seq_len
    baseline = statistics.median(times["standard"])
    best = min(times["standard"])
    rows = [
        dict(
            kind=kind,
            ms=1e3 * statistics.median(t),
            tokens_per_s=tokens / statistics.median(t),
            ratio=statistics.median(t) / baseline,
            min_ms=1e3 * min(t),
            min_ratio=min(t) / best,
            steps=len(t),
        )
        for kind, t in times.items()
    ]
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"training step (forward + backward + AdamW), GPT-NeoX Pythia-70M shape, {parameters / 1e6:.1f}M "
        f"parameters, vocab {args.vocab_size}, batch {args.batch_size} x {args.seq_len} tokens, {device}"
    )
    print(
        report.markdown_table(
            rows,
            [
                ("kind", "attention"),
                ("ms", "median ms/step"),
                ("tokens_per_s", "tokens/s"),
                ("ratio", "x standard"),
                ("min_ms", "min ms/step"),
                ("min_ratio", "x (min)"),
                ("steps", "steps"),
            ],
        )
    )
    print(f"KA (parallel) / standard = {rows[1]['ratio']:.2f}x (median), {rows[1]['min_ratio']:.2f}x (fastest steps)")
    if args.out:
        record = dict(args=vars(args), parameters=parameters, results=rows, environment=report.environment())
        files.write_results(args.out, lambda path: report.write_json(path, record), file=True)


if __name__ == "__main__":
    main()
