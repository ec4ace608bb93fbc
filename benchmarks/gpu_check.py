"""One prepared GPU check of ka_hf: exactness, long context, offloading, static decode and the seed preset.

    python benchmarks/gpu_check.py --out DIR                        # one CUDA GPU: about 8 minutes on an H200
    python benchmarks/gpu_check.py --device cpu --tiny --out DIR    # every section at tiny shapes (CI, a laptop)
    python benchmarks/gpu_check.py --out DIR --sections exactness,long   # some sections only

Sections, in order (docs/benchmarks.md, "GPU check", says what each measures):
- versions     python, torch, CUDA, GPU, transformers, ka_hf's commit: printed first and recorded;
- exactness    each past kernel the device has (ops/past.py) against the float64 reference loop, values and
               gradients, fp32 and bf16; whole tiny models (GPT-2, GPT-NeoX, Llama with GQA) in fp32 against the
               float64 oracle (tests/oracle.py), with and without left padding, uncached and through a KACache
               (prefill and decode steps), their fp32 training gradients against the float64 loop, and their bf16
               logits against fp32 next to standard attention's own bf16 error;
- long         bf16 KA / KV (flash SDPA): prefill at 8k and 32k, a training step at 4k and 8k, a decode step
               after 8k and 32k with GQA; time and peak memory (benchmarks/bench_long.py's measurement);
- offloading   tests/test_offloading.py's CUDA tests (and one CPU offloading test), through pytest;
- static       decode tokens/s with `StaticKACache` against HF's `StaticCache`, eager and torch.compile'd;
- seed         `python -m ka_hf.experiment --preset seed --seeds 3` in the time left of `--budget-s`; what was
               finished is reported as such (--tiny: the preset's smoke run for its first 20 s).

A failure in one section is recorded (with its traceback) and the others still run. gpu_check.json and
gpu_check.md under --out are rewritten after every section, so a run cut short still leaves what it measured.
Exit status: 0 when every section ran and every exactness entry passed, 1 otherwise.
"""

import argparse
import functools
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
# Runs from a checkout, installed or not (the GPU machine's environment is its own): the tree first on the path,
# here and in the subprocesses; tests/ for the oracle, benchmarks/ for bench_long's and bench_core's measurements.
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import torch  # noqa: E402

import ka_hf  # noqa: E402
from ka_hf.ops import ka_attention_blocked, ka_attention_naive, standard_attention  # noqa: E402
from ka_hf.ops.past import choose_past_kernel  # noqa: E402
from ka_hf.study import files  # noqa: E402
from ka_hf.study.cli import add_output_arguments, resolve_device, user_errors_exit_2  # noqa: E402
from ka_hf.study.measure import relative_rmse  # noqa: E402
from ka_hf.study.models import model_config  # noqa: E402

# `past_key_values=` is the spelling every supported transformers accepts (5.25 prefers `cache=`, 5.17 knows only it)
warnings.filterwarnings("ignore", message="`past_key_values` is deprecated")

TINY_SEED_S = 12
SECTIONS = ("versions", "exactness", "long", "offloading", "static", "seed")
MIN_TRANSFORMERS = (5, 20)  # pyproject's lower bound; docs/benchmarks.md lists the wheels to bring for older ones

# Bounds, in fla's relative RMSE against float64 (`relative_rmse`). fp32: rounding only. bf16: the outputs within
# 1.5x standard attention's own bf16 error on the same inputs, gradients within two bf16 epsilons (2^-7).
FP32_BOUND = 1e-5
BF16_OUTPUT_FACTOR = 1.5
BF16_GRAD_BOUND = 2 * torch.finfo(torch.bfloat16).eps


# ---------------------------------------------------------------------------------------------------------
# Shapes: the GPU check's and the tiny ones


def shapes(tiny: bool) -> SimpleNamespace:
    if tiny:
        return SimpleNamespace(
            op_length=96,
            op_block=32,
            model_length=24,
            model_block=8,
            decode_steps=3,
            long=dict(prefill=[64, 128], train=[64], decode=[64, 128]),
            long_models=dict(
                small=dict(arch="gpt-neox", vocab_size=256, num_layers=1, hidden_size=64, num_heads=4),
                gqa=dict(arch="llama", vocab_size=256, num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2),
            ),
            long_repeats=1,
            long_decode_steps=2,
            static=dict(model="tiny", prompt=8, new_tokens=4, compile=False),
        )
    return SimpleNamespace(
        op_length=512,
        op_block=128,
        model_length=300,
        model_block=128,
        decode_steps=4,
        long=dict(prefill=[8192, 32768], train=[4096, 8192], decode=[8192, 32768]),
        long_models=None,  # bench_long's: the Pythia-70M shape and a 6-layer Llama with GQA 16/4
        long_repeats=2,
        long_decode_steps=16,
        static=dict(model="pythia-70m", prompt=128, new_tokens=64, compile=True),
    )


# ---------------------------------------------------------------------------------------------------------
# versions


def versions(device) -> dict:
    import transformers

    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        device=str(device),
        machine=f"{platform.machine()}, {os.cpu_count()} CPU cores",
    )
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1))
        info["compute_capability"] = f"{properties.major}.{properties.minor}"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        info["ka_hf_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["ka_hf_commit"] = None
    found = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    if found < MIN_TRANSFORMERS:
        info["warning"] = (
            f"transformers {transformers.__version__} is older than ka_hf's {MIN_TRANSFORMERS[0]}.{MIN_TRANSFORMERS[1]}"
            " (its Cache API differs): bring the wheels listed in docs/benchmarks.md, 'GPU check'"
        )
    return dict(info=info)


# ---------------------------------------------------------------------------------------------------------
# exactness


def entry(name, error, bound, **extra) -> dict:
    return dict(name=name, error=error, bound=bound, passed=bool(error <= bound), **extra)


def op_inputs(length, n_past, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch, n_query_heads, n_kv_heads, head_dim = 2, 8, 2, 64
    shape = lambda heads, n: (batch, heads, n, head_dim)  # noqa: E731
    tensors = [
        torch.randn(shape(n_query_heads, length), generator=generator, dtype=torch.float64),
        torch.randn(shape(n_kv_heads, n_past + length), generator=generator, dtype=torch.float64),
        torch.randn(shape(n_kv_heads, length), generator=generator, dtype=torch.float64),
        torch.randn(shape(n_query_heads, n_past), generator=generator, dtype=torch.float64),
    ]
    upstream = torch.randn(shape(n_query_heads, length), generator=generator, dtype=torch.float64)
    allowed = torch.ones(batch, 1, length, n_past + length, dtype=torch.bool).tril(n_past)
    allowed[1, ..., : n_past + 37] = False  # row 1: left padding, its first queries see nothing
    return tensors, upstream, allowed


def op_values_and_grads(run, tensors, upstream, device, dtype):
    leaves = [t.detach().to(device, dtype, copy=True).requires_grad_() for t in tensors]
    outputs = run(*leaves)
    (outputs * upstream.to(device, outputs.dtype)).sum().backward()
    return outputs.detach().cpu(), [leaf.grad.cpu() for leaf in leaves]


def op_cases(device) -> list[tuple[str, torch.dtype, bool, float | None]]:
    """(past kernel, dtype, masked, softcap) for every kernel this device has, fp32 and bf16."""
    if device.type == "cuda":
        return [
            ("cuda-efficient", torch.float32, True, None),
            ("cuda-efficient", torch.float32, False, None),
            ("cuda-efficient", torch.bfloat16, True, None),
            ("cuda-flash", torch.bfloat16, False, None),
            ("tiles", torch.float32, True, 20.0),
            ("tiles", torch.bfloat16, True, 20.0),
        ]
    return [
        ("cpu-flash", torch.float32, True, None),
        ("cpu-flash", torch.bfloat16, False, None),
        ("tiles", torch.float32, True, 20.0),
        ("tiles", torch.bfloat16, True, 20.0),
    ]


def op_exactness(device, size) -> list[dict]:
    entries = []
    tensors, upstream, mask = op_inputs(size.op_length, 40, device)
    scale, references = 0.125, {}
    for kernel, dtype, masked, softcap in op_cases(device):
        allowed = mask if masked else None
        chosen = choose_past_kernel(device, dtype, masked, softcap, 64, 64)
        if (masked, softcap) not in references:  # the float64 loop on CPU: the reference for every kernel
            references[masked, softcap] = op_values_and_grads(
                functools.partial(ka_attention_naive, allowed=allowed, scale=scale, softcap=softcap),
                tensors,
                upstream,
                "cpu",
                torch.float64,
            )
        reference, reference_grads = references[masked, softcap]
        device_allowed = None if allowed is None else allowed.to(device)
        run = functools.partial(
            ka_attention_blocked,
            allowed=device_allowed,
            scale=scale,
            softcap=softcap,
            block_size=size.op_block,
            fused=kernel,
        )
        outputs, grads = op_values_and_grads(run, tensors, upstream, device, dtype)
        name = f"op {kernel} {str(dtype).removeprefix('torch.')} {'masked' if masked else 'causal'}"
        name += f" softcap {softcap}" if softcap else ""
        if dtype == torch.float32:
            output_bound = grad_bound = FP32_BOUND
        else:  # standard attention over the same queries and new keys, in bf16, against float64
            new = [tensors[0], tensors[1][..., 40:, :], tensors[2]]
            own = None if allowed is None else allowed[..., 40:]
            exact = standard_attention(*new, allowed=own, scale=scale, softcap=softcap)
            own_device = None if own is None else own.to(device)
            half = standard_attention(
                *(t.to(device, dtype) for t in new), allowed=own_device, scale=scale, softcap=softcap
            )
            output_bound = BF16_OUTPUT_FACTOR * relative_rmse(half.cpu(), exact)
            grad_bound = BF16_GRAD_BOUND
        entries.append(entry(f"{name}: outputs", relative_rmse(outputs, reference), output_bound, auto=chosen))
        worst = max(relative_rmse(g, r) for g, r in zip(grads, reference_grads))
        entries.append(entry(f"{name}: gradients (q, k, v, past; worst)", worst, grad_bound))
    return entries


MODEL_ARCHS = {
    "gpt2": dict(arch="gpt2"),
    "gpt-neox": dict(arch="gpt-neox", rotary_pct=0.25),
    "llama-gqa": dict(arch="llama", num_kv_heads=2),
}


def tiny_model(name, device, dtype, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = model_config(vocab_size=97, hidden_size=64, num_heads=4, num_layers=2, **MODEL_ARCHS[name])
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device, dtype).eval()


def model_inputs(length, padded: bool):
    from oracle import generate_position_ids, left_padding_mask

    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(1, 97, (2, length), generator=generator)
    if not padded:
        return dict(input_ids=input_ids)
    attention_mask = left_padding_mask([length, length - 9], length)
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=generate_position_ids(attention_mask))


def on(device, inputs):
    return {key: value.to(device) for key, value in inputs.items()}


def real_rows(logits, inputs):
    """Logits at real (not padding) positions only: padding rows are undefined in every implementation."""
    mask = inputs.get("attention_mask")
    return logits if mask is None else logits[mask.bool().to(logits.device)]


@torch.no_grad()
def cached_logits(model, inputs, steps, device):
    """Prefill all but the last `steps` tokens through a KACache, then feed those one at a time."""
    cache = ka_hf.KACache()
    prompt = {key: value[:, :-steps] for key, value in inputs.items()}
    logits = [model(**on(device, prompt), past_key_values=cache, use_cache=True).logits]
    for i in range(steps, 0, -1):
        step = dict(input_ids=inputs["input_ids"][:, -i:][:, :1])
        if "attention_mask" in inputs:
            step["attention_mask"] = inputs["attention_mask"][:, : inputs["attention_mask"].shape[1] - i + 1]
            step["position_ids"] = inputs["position_ids"][:, -i:][:, :1]
        logits.append(model(**on(device, step), past_key_values=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1).double().cpu()


def model_exactness(device, size) -> list[dict]:
    from oracle import oracle_logits

    entries = []
    for name in MODEL_ARCHS:
        reference_model = tiny_model(name, "cpu", torch.float64)
        model = tiny_model(name, device, torch.float32)
        half = tiny_model(name, device, torch.bfloat16)
        for padded in (False, True):
            inputs = model_inputs(size.model_length, padded)
            oracle_ka = oracle_logits(reference_model, **inputs, mode="ka")
            label = f"model {name} {'left-padded' if padded else 'unpadded'}"
            with torch.no_grad(), ka_hf.exact_ka(model, block_size=size.model_block):
                ka = model(**on(device, inputs), use_cache=False).logits.double().cpu()
            entries.append(
                entry(f"{label}: fp32 KA logits vs oracle", relative_rmse(real_rows(ka, inputs), real_rows(oracle_ka, inputs)), FP32_BOUND)
            )  # fmt: skip
            cached = cached_logits(model, inputs, size.decode_steps, device)
            entries.append(
                entry(f"{label}: fp32 KACache prefill + decode vs oracle", relative_rmse(real_rows(cached, inputs), real_rows(oracle_ka, inputs)), FP32_BOUND)
            )  # fmt: skip
            with torch.no_grad():
                standard32 = model(**on(device, inputs), use_cache=False).logits.double().cpu()
                standard16 = half(**on(device, inputs), use_cache=False).logits.double().cpu()
                with ka_hf.exact_ka(half, block_size=size.model_block):
                    ka16 = half(**on(device, inputs), use_cache=False).logits.double().cpu()
            standard_error = relative_rmse(real_rows(standard16, inputs), real_rows(standard32, inputs))
            entries.append(
                entry(
                    f"{label}: bf16 KA logits vs fp32 KA (bound: {BF16_OUTPUT_FACTOR}x standard's bf16 error)",
                    relative_rmse(real_rows(ka16, inputs), real_rows(ka, inputs)),
                    BF16_OUTPUT_FACTOR * standard_error,
                    standard_error=standard_error,
                )
            )
        entries += gradient_exactness(
            name, model, half, reference_model, model_inputs(size.model_length, True), size, device
        )
    return entries


def gradient_exactness(name, model, half, reference_model, inputs, size, device) -> list[dict]:
    """Training gradients of every parameter, loss over the real tokens: fp32 KA (the blocked kernel on this
    device) against the float64 loop on CPU; bf16 KA against it within 1.5x standard attention's own bf16 error
    (bf16 standard against float64 standard); and bf16 gradients stay bf16."""
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def gradients(net, target, kernel):
        net.zero_grad(set_to_none=True)
        if kernel is None:
            loss = net(**on(target, inputs), labels=labels.to(target), use_cache=False).loss
        else:
            with ka_hf.exact_ka(net, kernel=kernel, block_size=size.model_block):
                loss = net(**on(target, inputs), labels=labels.to(target), use_cache=False).loss
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        return torch.cat([g.double().cpu().flatten() for g in grads]), {str(g.dtype) for g in grads}

    reference, _ = gradients(reference_model, "cpu", "loop")
    fp32, _ = gradients(model, device, "auto")
    bf16, dtypes = gradients(half, device, "auto")
    standard_reference, _ = gradients(reference_model, "cpu", None)
    standard_bf16, _ = gradients(half, device, None)
    standard_error = relative_rmse(standard_bf16, standard_reference)
    label = f"model {name} left-padded"
    return [
        entry(f"{label}: fp32 KA gradients vs float64 loop", relative_rmse(fp32, reference), FP32_BOUND),
        entry(
            f"{label}: bf16 KA gradients vs float64 loop (bound: {BF16_OUTPUT_FACTOR}x standard's bf16 error)",
            relative_rmse(bf16, reference),
            BF16_OUTPUT_FACTOR * standard_error,
            standard_error=standard_error,
        ),
        entry(f"model {name}: bf16 gradients stay bf16 ({', '.join(sorted(dtypes))})", float(dtypes != {"torch.bfloat16"}), 0.0),
    ]  # fmt: skip


def exactness(device, size) -> dict:
    entries = op_exactness(device, size) + model_exactness(device, size)
    return dict(entries=entries, passed=all(e["passed"] for e in entries))


# ---------------------------------------------------------------------------------------------------------
# long context


def long_context(device, size) -> dict:
    import bench_long

    args = SimpleNamespace(
        device=str(device), dtype="bfloat16", threads=torch.get_num_threads(), repeats=size.long_repeats,
        decode_steps=size.long_decode_steps,
    )  # fmt: skip
    if size.long_models is not None:
        small, gqa = size.long_models["small"], size.long_models["gqa"]
        args.models = {"pythia-70m": small, "llama-gqa": gqa}
    jobs = [("prefill", t) for t in size.long["prefill"]] + [("train", t) for t in size.long["train"]]
    jobs += [("decode-gqa", t) for t in size.long["decode"]]
    rows = []
    for kind, length in jobs:
        row = dict(kind=kind, T=length)
        for mode in ("kv", "ka"):
            try:
                row[mode] = bench_long.measure(kind, mode, length, args)
            except torch.OutOfMemoryError as error:
                row[mode] = dict(error=f"out of memory: {str(error)[:200]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "seconds" in row["ka"] and "seconds" in row["kv"]:
            row["time_ratio"] = row["ka"]["seconds"] / row["kv"]["seconds"]
            if "peak_bytes" in row["ka"]:
                row["memory_ratio"] = row["ka"]["peak_bytes"] / max(row["kv"]["peak_bytes"], 1)
        rows.append(row)
    return dict(rows=rows, dtype="bfloat16", models=args.__dict__.get("models", "bench_long.MODELS"))


# ---------------------------------------------------------------------------------------------------------
# offloading (pytest) and static decode


def offloading(device, size) -> dict:
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(ROOT / "tests" / "test_offloading.py"),
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    command += ["-k", "cuda or (test_offloaded_generate_equals_resident and gpt2)"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    summary = [
        line for line in result.stdout.splitlines() if " passed" in line or " failed" in line or "skipped" in line
    ]
    return dict(
        command=" ".join(command[2:]),
        returncode=result.returncode,
        summary=summary[-1] if summary else result.stdout[-300:],
        cuda_tests_ran=device.type == "cuda",
        passed=result.returncode == 0,
        output_tail=result.stdout[-2000:] + result.stderr[-1000:],
    )


def static_decode(device, size) -> dict:
    import bench_core
    from transformers import StaticCache

    spec = size.static
    model = bench_core.build(spec["model"], device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    length = spec["prompt"] + spec["new_tokens"] + 1
    caches = {
        "StaticCache (standard attention)": StaticCache(config=model.config, max_cache_len=length),
        "StaticKACache (KA)": ka_hf.StaticKACache(config=model.config, max_cache_len=length),
    }
    rows = []
    for name, cache in caches.items():

        def make_cache(cache=cache):
            cache.reset()
            return cache

        row = dict(cache=name)
        row["eager_tok_s"] = 1 / bench_core.decode_seconds_per_token(
            model, make_cache, spec["prompt"], spec["new_tokens"], device
        )
        if spec["compile"]:
            forward = model.forward
            torch._dynamo.reset()
            model.forward = torch.compile(forward)
            try:
                started = time.perf_counter()
                step = bench_core.decode_seconds_per_token(
                    model, make_cache, spec["prompt"], spec["new_tokens"], device
                )
                row.update(compiled_tok_s=1 / step, compile_and_run_s=time.perf_counter() - started)
            finally:
                model.forward = forward
        rows.append(row)
    standard, ka = rows
    ratios = {
        f"{key} KA / standard": ka[key] / standard[key] for key in ka if key.endswith("tok_s") and key in standard
    }
    return dict(model=spec["model"], prompt=spec["prompt"], new_tokens=spec["new_tokens"], rows=rows, ratios=ratios)


# ---------------------------------------------------------------------------------------------------------
# the seed preset


def seed_preset(device, size, out: Path, seconds_left: float, tiny: bool) -> dict:
    """The seed preset in the time there is. On a GPU: 3 seeds at the original protocol, cut at the budget (a cut
    run says how many seeds finished and how to resume). --tiny: the preset's smoke run, one seed, cut after
    `TINY_SEED_S` by design (data, tokenizer and the start of training: that the command runs on this machine;
    tests/test_experiment.py runs the smoke to the end)."""
    run_dir = out / "seed"
    if tiny:
        flags, what, timeout = (
            ["--smoke", "--seeds", "1"],
            f"the seed preset's smoke run, one seed, its first {TINY_SEED_S} s (--tiny)",
            TINY_SEED_S,
        )
    else:
        flags, what, timeout = (
            ["--seeds", "3"],
            "the seed preset (the original protocol), 3 seeds",
            max(seconds_left, 30.0),
        )
    command = [sys.executable, "-m", "ka_hf.experiment", "--preset", "seed", *flags, "--out", str(run_dir)]
    command += ["--overwrite", "--no-progress"] + (["--device", "cpu"] if device.type == "cpu" else [])
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        returncode, tail, timed_out = result.returncode, result.stdout[-1500:] + result.stderr[-1500:], False
    except subprocess.TimeoutExpired as expired:
        returncode, timed_out = None, True
        output = expired.stdout or ""
        tail = (output.decode(errors="replace") if isinstance(output, bytes) else output)[-1500:]
    seeds_done = sorted(str(p.parent.relative_to(run_dir)) for p in run_dir.glob("**/seed_results.json"))
    record = dict(
        what=what,
        command=" ".join(command[2:]),
        seconds=time.perf_counter() - started,
        timeout_s=timeout,
        timed_out=timed_out,
        returncode=returncode,
        seeds_finished=seeds_done,
        output_tail=tail,
    )
    if timed_out:
        last = [line for line in tail.splitlines() if line.strip()]
        record["ran"] = f"{what}: cut at {timeout:.0f} s, {len(seeds_done)} seed(s) finished"
        record["ran"] += f"; last line: {last[-1][:160]!r}" if last else ""
        if not tiny:
            record["ran"] += "; continue with the same command and --resume instead of --overwrite"
    results = run_dir / "results.json"
    if returncode == 0 and results.exists():
        record["ran"] = what + ", complete"
        record["results"] = str(results)
    record["passed"] = returncode == 0 or timed_out  # cut by the budget is what this section expects; a crash is not
    return record


# ---------------------------------------------------------------------------------------------------------
# The driver: every section guarded, results written after each


class Check:
    def __init__(self, out: Path, args):
        self.out, self.args = out, args
        self.record = dict(command=" ".join(sys.argv), tiny=args.tiny, budget_s=args.budget_s, sections={})
        self.started = time.perf_counter()

    def seconds_left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def run(self, name, fn):
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        try:
            result = fn()
            status = "ok" if result.get("passed", True) else "failed"
        except Exception as error:  # noqa: BLE001 (a section's failure is recorded; the next section runs)
            result = dict(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-4000:])
            status = "error"
        result.update(status=status, seconds=round(time.perf_counter() - started, 2))
        self.record["sections"][name] = result
        self.record["wall_s"] = round(time.perf_counter() - self.started, 2)
        print(section_markdown(name, result), flush=True)
        self.write()

    def write(self):
        files.write_json(self.out / "gpu_check.json", self.record)
        files.write_text(self.out / "gpu_check.md", markdown(self.record))

    @property
    def passed(self) -> bool:
        return all(section["status"] == "ok" for section in self.record["sections"].values())


def fmt_bytes(n) -> str:
    return "—" if n is None else (f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB")


def section_markdown(name, result) -> str:
    lines = [f"## {name}: {result['status']} ({result['seconds']:.1f} s)", ""]
    if "error" in result:
        lines += ["```", result.get("traceback", result["error"])[-1500:], "```"]
        return "\n".join(lines)
    if name == "versions":
        lines += [f"- {key}: {value}" for key, value in result["info"].items()]
    elif name == "exactness":
        lines += ["| check | relative RMSE | bound | passed |", "|---|---|---|---|"]
        for e in result["entries"]:
            lines.append(
                f"| {e['name']} | {e['error']:.2e} | {e['bound']:.2e} | {'yes' if e['passed'] else '**NO**'} |"
            )
    elif name == "long":
        lines += [
            f"bf16; peak memory: torch.cuda.max_memory_allocated above the start on CUDA (on CPU the process's peak "
            f"RSS, meaningless at --tiny shapes); models: {result['models']}",
            "",
            "| measurement | T | KV | KA | KA / KV time | KA / KV memory |",
            "|---|---|---|---|---|---|",
        ]
        for row in result["rows"]:
            cells = []
            for mode in ("kv", "ka"):
                m = row[mode]
                cells.append(m.get("error") or f"{m['seconds'] * 1e3:.1f} ms, {fmt_bytes(m.get('peak_bytes'))}")
            time_ratio = f"{row['time_ratio']:.2f}x" if "time_ratio" in row else "—"
            memory_ratio = f"{row['memory_ratio']:.2f}x" if "memory_ratio" in row else "—"
            lines.append(f"| {row['kind']} | {row['T']:,} | {cells[0]} | {cells[1]} | {time_ratio} | {memory_ratio} |")
    elif name == "static":
        lines += ["| cache | eager tok/s | compiled tok/s |", "|---|---|---|"]
        for row in result["rows"]:
            compiled = f"{row['compiled_tok_s']:.1f}" if "compiled_tok_s" in row else "not compiled"
            lines.append(f"| {row['cache']} | {row['eager_tok_s']:.1f} | {compiled} |")
        lines += [""] + [f"- {key}: {value:.3f}" for key, value in result["ratios"].items()]
    elif name == "offloading":
        lines += [f"- `{result['command']}`: {result['summary']}"]
    elif name == "seed":
        lines += [f"- {result.get('ran', result['what'])}", f"- `{result['command']}` ({result['seconds']:.0f} s)"]
        lines += [f"- seeds finished: {', '.join(result['seeds_finished']) or 'none'}"]
    return "\n".join(lines)


def markdown(record) -> str:
    info = record["sections"].get("versions", {}).get("info", {})
    header = [
        "# ka_hf GPU check",
        "",
        f"`{record['command']}`; wall time {record.get('wall_s', 0):.0f} s (budget {record['budget_s']:.0f} s)",
        f"GPU: {info.get('gpu', 'none')}; torch {info.get('torch')}, CUDA {info.get('cuda')}, "
        f"transformers {info.get('transformers')}",
        "",
    ]
    body = [section_markdown(name, result) + "\n" for name, result in record["sections"].items()]
    return "\n".join(header + body)


@user_errors_exit_2
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: every section in well under a minute")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--budget-s", type=float, default=480.0, help="the whole check's time; the seed preset gets what is left"
    )
    add_output_arguments(parser, default="gpu_check_out", what="gpu_check.{json,md} and the seed run")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    chosen = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise ka_hf.KAError(f"--sections: unknown {', '.join(unknown)}; use {', '.join(SECTIONS)}")
    out = files.check_out_dir(args.out, args.overwrite)
    size = shapes(args.tiny)
    check = Check(out, args)
    jobs = dict(
        versions=lambda: versions(device),
        exactness=lambda: exactness(device, size),
        long=lambda: long_context(device, size),
        offloading=lambda: offloading(device, size),
        static=lambda: static_decode(device, size),
        seed=lambda: seed_preset(device, size, out, check.seconds_left() - 10, args.tiny),
    )
    for name in SECTIONS:
        if name in chosen:
            check.run(name, jobs[name])
    print(f"\nwrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({check.record['wall_s']:.0f} s)")
    return 0 if check.passed else 1


if __name__ == "__main__":
    sys.exit(main())
