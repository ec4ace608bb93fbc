"""Half precision, KA against standard attention: peak memory of a bf16 forward, bf16 error against float32, and the
dtype of the training gradients (issue "Training as researchers do it", item 4).

    python benchmarks/bench_half.py                        # CPU: 4 x 2048 tokens, 1 layer, hidden 512, bfloat16
    python benchmarks/bench_half.py --device cuda --out /tmp/half

A random-init GPT-NeoX model (1 layer, hidden 512, 8 heads, vocab `--vocab-size`, small so that the logits do not
hide the attention's memory). Measured in one process:
- peak memory of one forward (no grad, and with grad as a training step's forward), `ka_hf.exact_ka` vs standard
  SDPA, both bf16: CPU = peak tensor bytes above the start (torch's MemTracker, which follows every tensor made and
  freed), CUDA = max allocated above the start. Targets: KA / standard <= 1.3x.
- the bf16 logits' error against the same model in float32 (fla's relative RMSE), for KA and for standard
  attention, and their ratio. Target: <= 1.5x.
- after a bf16 training step under `exact_ka`, every parameter's gradient dtype (target: bfloat16).
Prints the ratios, writes bench_half.json and bench_half.md under --out.
"""

import argparse
import platform
import time

import torch
from transformers import AutoModelForCausalLM

import ka_hf
from ka_hf.study import files
from ka_hf.study.cli import (
    add_output_arguments,
    add_runtime_arguments,
    apply_runtime_flags,
    device_of,
    user_errors_exit_2,
)
from ka_hf.study.measure import TensorPeakMemory, relative_rmse
from ka_hf.study.models import model_config


def build(vocab_size, device, dtype, seed=0):
    torch.manual_seed(seed)
    config = model_config(
        "gpt-neox", vocab_size=vocab_size, num_layers=1, hidden_size=512, num_heads=8, max_positions=4096
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device, dtype).eval()


def forward(model, input_ids, mode):
    if mode == "ka":
        with ka_hf.exact_ka(model):
            return model(input_ids, use_cache=False).logits
    return model(input_ids, use_cache=False).logits


def peak_bytes(model, input_ids, mode, grad: bool) -> int:
    with torch.set_grad_enabled(grad), TensorPeakMemory(input_ids.device) as memory:
        logits = forward(model, input_ids, mode)
        del logits
    return memory.peak_bytes


def measure(args) -> dict:
    device, dtype = device_of(args), getattr(torch, args.dtype)
    input_ids = torch.randint(0, args.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(1))
    input_ids = input_ids.to(device)
    model = build(args.vocab_size, device, dtype)
    memory = {}
    for grad in (False, True):
        for mode in ("standard", "ka"):
            memory[f"{mode}{'-grad' if grad else ''}"] = peak_bytes(model, input_ids, mode, grad)
    reference = build(args.vocab_size, device, torch.float32)
    errors = {}
    with torch.no_grad():
        for mode in ("standard", "ka"):
            errors[mode] = relative_rmse(forward(model, input_ids, mode), forward(reference, input_ids, mode))
    model.train()
    with ka_hf.exact_ka(model):
        loss = model(input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    grad_dtypes = sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None})
    return dict(
        memory=memory,
        memory_kind=TensorPeakMemory(device).kind,
        memory_ratio=memory["ka"] / memory["standard"],
        memory_ratio_grad=memory["ka-grad"] / memory["standard-grad"],
        errors=errors,
        error_ratio=errors["ka"] / errors["standard"],
        grad_dtypes=grad_dtypes,
    )


def report(result, args, seconds) -> str:
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    memory = result["memory"]
    return "\n".join(
        [
            f"Machine: {platform.machine()}, {args.device}; torch {torch.__version__}; dtype {args.dtype}; "
            f"GPT-NeoX 1 layer, hidden 512, 8 heads, vocab {args.vocab_size}; {args.batch} x {args.length} tokens; "
            f"memory = {result['memory_kind']}; {seconds:.0f} s",
            "",
            "| measure | standard | KA | KA / standard | target |",
            "|---|---|---|---|---|",
            f"| forward peak memory (no grad) | {mib(memory['standard'])} | {mib(memory['ka'])} | "
            f"**{result['memory_ratio']:.2f}x** | <= 1.3x |",
            f"| forward peak memory (grad enabled) | {mib(memory['standard-grad'])} | {mib(memory['ka-grad'])} | "
            f"**{result['memory_ratio_grad']:.2f}x** | <= 1.3x |",
            f"| logits relative RMSE vs float32 | {result['errors']['standard']:.2e} | {result['errors']['ka']:.2e} | "
            f"**{result['error_ratio']:.2f}x** | <= 1.5x |",
            f"| parameter gradient dtypes (KA step) | | {', '.join(result['grad_dtypes'])} | | {args.dtype} |",
        ]
    )


@user_errors_exit_2
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=1024)
    add_output_arguments(parser, default="bench_half_out", what="bench_half.{json,md}")
    add_runtime_arguments(parser, progress=False)
    parser.set_defaults(dtype="bfloat16")
    args = parser.parse_args(argv)
    args.device = str(device_of(args))
    apply_runtime_flags(args)
    out = files.check_out_dir(args.out, args.overwrite)
    started = time.perf_counter()
    result = measure(args)
    markdown = report(result, args, time.perf_counter() - started)
    print(markdown)
    files.write_json(out / "bench_half.json", dict(args=vars(args), torch=torch.__version__, **result))
    files.write_text(out / "bench_half.md", markdown + "\n")


if __name__ == "__main__":
    main()
