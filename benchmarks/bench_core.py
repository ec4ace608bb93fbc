"""Core speed ratios, measured in one run on the same models (KA-SPEC §3, issue "Core").

    python benchmarks/bench_core.py                 # CPU, float32
    python benchmarks/bench_core.py --device cuda --dtype bfloat16

For a GPT-2-small-shaped model (12 layers, 768 wide, 12 heads) and a Pythia-70M-shaped GPT-NeoX (random init):
  1. decode tokens/s with KACache / with DynamicCache                   (target >= 0.95)
  2. parallel KA prefill of a 512-token prompt vs feeding it token by token (target >= 30x), next to the same
     ratio for a DynamicCache (what the hardware allows) and KA's parallel prefill time over KV's
  3. training step (forward + backward, batch 8) with exact KA / with standard SDPA at T=128 and T=512
     (target <= 1.2x at 128, <= 1.5x at 512; the original project's token loop was 4.7x)
  4. decode tokens/s with a StaticKACache (fixed shapes), eager and under torch.compile, / with KACache
     (--no-compile skips the compiled one; `--models tiny` is a 2-layer Llama shape for checking the script)
Prints a markdown table and writes it (with the machine) as JSON when --out is given.
"""

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import ka_hf
from ka_hf.study import files
from ka_hf.study.cli import (
    DTYPES,
    ArgumentParser,
    add_output_arguments,
    add_runtime_arguments,
    apply_runtime_flags,
    device_of,
    user_errors_exit_2,
)
from ka_hf.study.models import PYTHIA_70M_SHAPE, model_config

MODELS = {
    "gpt2-small": dict(arch="gpt2", num_layers=12, hidden_size=768, num_heads=12, vocab_size=50257),
    "pythia-70m": dict(arch="gpt-neox", vocab_size=50304, **PYTHIA_70M_SHAPE),
    "tiny": dict(arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=128),
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Median wall seconds of `repeats` calls after one warm-up call."""
    fn()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def build(name, device, dtype):
    spec = dict(MODELS[name])
    config = model_config(spec.pop("arch"), max_positions=2048, **spec)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device, dtype).eval()


@torch.no_grad()
def decode_seconds_per_token(model, make_cache, prompt_len, new_tokens, device):
    """Seconds per decode step after a prompt: a manual greedy loop, so generate()'s own overhead is not timed."""
    input_ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)

    def run():
        cache = make_cache()
        logits = model(input_ids, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        synchronize(device)
        return (time.perf_counter() - start) / new_tokens

    run()
    return statistics.median(run() for _ in range(3))


def static_decode_ratios(model, ka_step, args, device) -> dict:
    """Decode tokens/s with a StaticKACache ÷ with a KACache (`ka_step`: its seconds per step), eager and compiled.
    One cache is reset for every run, as a compiled model needs (its buffers keep their addresses)."""
    cache = ka_hf.StaticKACache(config=model.config, max_cache_len=args.decode_prompt + args.new_tokens + 1)

    def make_cache():
        cache.reset()
        return cache

    eager_step = decode_seconds_per_token(model, make_cache, args.decode_prompt, args.new_tokens, device)
    row = dict(decode_static_tok_s=1 / eager_step, decode_static_ratio=ka_step / eager_step)
    if not args.no_compile:
        forward = model.forward
        model.forward = torch.compile(forward, mode=args.compile_mode)  # the prompt runs compiled too: one graph set
        try:
            compiled_step = decode_seconds_per_token(model, make_cache, args.decode_prompt, args.new_tokens, device)
        finally:
            model.forward = forward
        row.update(decode_compiled_tok_s=1 / compiled_step, decode_compiled_ratio=ka_step / compiled_step)
    return row


@torch.no_grad()
def prefill_seconds(model, make_cache, prompt_len, device, repeats):
    """(one parallel pass, token by token) seconds to prefill a prompt into a fresh cache."""
    input_ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)

    def parallel():
        model(input_ids, past_key_values=make_cache(), use_cache=True)

    def token_by_token():
        cache = make_cache()
        for i in range(prompt_len):
            model(input_ids[:, i : i + 1], past_key_values=cache, use_cache=True)

    return timed(parallel, device, repeats), timed(token_by_token, device, 1)


def train_step_seconds(model, seq_len, batch, device, ka, repeats):
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        if ka:
            with ka_hf.exact_ka(model):
                loss = model(input_ids, labels=input_ids, use_cache=False).loss
        else:
            loss = model(input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()

    seconds = timed(step, device, repeats)
    model.eval()
    return seconds


@user_errors_exit_2
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-small,pythia-70m")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--train-lengths", default="128,512")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd StaticKACache decode")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead on a GPU")
    add_output_arguments(parser, what="the results (JSON)", file=True)
    add_runtime_arguments(parser, progress=False)
    args = parser.parse_args(argv)
    if args.out:
        files.check_out_file(args.out, args.overwrite)
    apply_runtime_flags(args)
    device, dtype = device_of(args), DTYPES[args.dtype]
    torch.set_grad_enabled(True)

    rows = []
    for name in args.models.split(","):
        model = build(name, device, dtype)
        kv_step = decode_seconds_per_token(model, DynamicCache, args.decode_prompt, args.new_tokens, device)
        ka_step = decode_seconds_per_token(model, ka_hf.KACache, args.decode_prompt, args.new_tokens, device)
        row = dict(model=name, decode_kv_tok_s=1 / kv_step, decode_ka_tok_s=1 / ka_step, decode_ratio=kv_step / ka_step)
        row.update(static_decode_ratios(model, ka_step, args, device))
        parallel_s, loop_s = prefill_seconds(model, ka_hf.KACache, args.prompt_len, device, args.repeats)
        kv_parallel_s, kv_loop_s = prefill_seconds(model, DynamicCache, args.prompt_len, device, args.repeats)
        row.update(
            prefill_parallel_s=parallel_s,
            prefill_loop_s=loop_s,
            prefill_speedup=loop_s / parallel_s,
            kv_prefill_speedup=kv_loop_s / kv_parallel_s,
            prefill_ka_over_kv=parallel_s / kv_parallel_s,
        )
        for seq_len in (int(t) for t in args.train_lengths.split(",")):
            standard_s = train_step_seconds(model, seq_len, args.batch, device, ka=False, repeats=args.repeats)
            ka_s = train_step_seconds(model, seq_len, args.batch, device, ka=True, repeats=args.repeats)
            row.update(
                {
                    f"train_T{seq_len}_standard_s": standard_s,
                    f"train_T{seq_len}_ka_s": ka_s,
                    f"train_T{seq_len}_ratio": ka_s / standard_s,
                }
            )
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
        del model

    machine = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nMachine: {machine}; {platform.platform()}; torch {torch.__version__}; dtype {args.dtype}\n")
    lengths = args.train_lengths.split(",")
    header = [
        "model",
        "decode KA/KV tok/s",
        "KV tok/s",
        "KA tok/s",
        "static/dynamic KA decode: eager",
        "compiled",
        f"KA prefill {args.prompt_len}: loop/parallel",
        "same for KV",
        "KA/KV parallel prefill time",
    ]
    header += [f"train T={t}: KA/SDPA" for t in lengths]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        cells = [
            row["model"],
            f"{row['decode_ratio']:.3f}",
            f"{row['decode_kv_tok_s']:.1f}",
            f"{row['decode_ka_tok_s']:.1f}",
            f"{row['decode_static_ratio']:.3f}",
            f"{row['decode_compiled_ratio']:.3f}" if "decode_compiled_ratio" in row else "not run",
            f"{row['prefill_speedup']:.1f}x ({row['prefill_loop_s']:.2f} s / {row['prefill_parallel_s']:.3f} s)",
            f"{row['kv_prefill_speedup']:.1f}x",
            f"{row['prefill_ka_over_kv']:.2f}",
        ]
        cells += [
            f"{row[f'train_T{t}_ratio']:.2f}x ({row[f'train_T{t}_ka_s']:.2f} s / {row[f'train_T{t}_standard_s']:.2f} s)"
            for t in lengths
        ]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        record = dict(machine=machine, dtype=args.dtype, torch=torch.__version__, rows=rows)
        files.write_results(args.out, lambda path: files.write_json(path, record), file=True)


if __name__ == "__main__":
    main()
