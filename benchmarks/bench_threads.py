"""How many torch threads eval_ppl.py should use: tokens/s with --threads 1 and with torch's default, on an idle
machine and on one whose every core is kept busy by other processes (as on a shared machine).

    python benchmarks/bench_threads.py --out bench_threads.json
    python benchmarks/bench_threads.py --busy 0,2 --threads 1,2,default --windows 200 --out /tmp/threads.json

The model has the quick study's shape (GPT-NeoX, 4 layers, hidden 128; random weights: speed does not depend on
them). Each setting is one `examples/eval_ppl.py` process (kv and ka modes, 64-token windows); "busy N" runs N
processes that spin on a core each meanwhile. torch's default is its intra-op thread count: OMP_NUM_THREADS when
set, else the cores this process may run on (its CPU affinity). Prints a markdown table of tokens/s and the ratio
of each setting to --threads 1 under the same load; writes them as JSON to --out.
"""

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ka_hf.study import files, report
from ka_hf.study.cli import ArgumentParser, add_output_arguments, user_errors_exit_2
from ka_hf.study.data import default_corpus, train_tokenizer
from ka_hf.study.models import model_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def spin() -> None:
    while True:
        pass


def quick_shaped_model(folder: Path) -> Path:
    tokenizer = train_tokenizer(default_corpus("train"), vocab_size=2048)
    torch.manual_seed(0)
    config = model_config("gpt-neox", len(tokenizer), num_layers=4, hidden_size=128, num_heads=4, intermediate_size=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def eval_tokens_per_s(model: Path, threads: str, windows: int, scratch: Path) -> dict:
    """{mode: tokens/s} of one eval_ppl.py process."""
    out = scratch / f"eval-{threads}-{len(list(scratch.iterdir()))}"
    command = [sys.executable, str(REPO_ROOT / "examples/eval_ppl.py"), "--model", str(model), "--modes", "kv,ka"]
    command += ["--max-length", "64", "--stride", "64", "--max-windows", str(windows), "--device", "cpu"]
    command += ["--no-progress", "--out", str(out)] + ([] if threads == "default" else ["--threads", threads])
    subprocess.run(command, check=True, capture_output=True, cwd=REPO_ROOT)
    results = json.loads((out / "results.json").read_text())["results"]
    return {record["mode"]: record["tokens_per_s"] for record in results}


@user_errors_exit_2
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", default=f"0,{os.cpu_count()}", help="spinning processes, comma-separated")
    parser.add_argument("--threads", default="1,default", help="--threads values, comma-separated (or default)")
    parser.add_argument("--windows", type=int, default=100, help="64-token windows per run")
    add_output_arguments(parser, what="the results (JSON)", file=True)
    args = parser.parse_args(argv)
    if args.out:
        files.check_out_file(args.out, args.overwrite)
    busy_counts = [int(n) for n in args.busy.split(",")]
    settings = args.threads.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ka_hf_threads_") as scratch:
        scratch = Path(scratch)
        model = quick_shaped_model(scratch / "model")
        runs = scratch / "runs"
        runs.mkdir()
        for busy in busy_counts:
            spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
            for spinner in spinners:
                spinner.start()
            try:
                measured = {threads: eval_tokens_per_s(model, threads, args.windows, runs) for threads in settings}
            finally:
                for spinner in spinners:
                    spinner.terminate()
            for threads, speeds in measured.items():
                base = measured[settings[0]]
                rows.append(
                    dict(
                        busy=busy,
                        threads=threads,
                        **{f"{mode}_tokens_per_s": speed for mode, speed in speeds.items()},
                        **{f"{mode}_vs_{settings[0]}": speed / base[mode] for mode, speed in speeds.items()},
                    )
                )
    columns = [("busy", "busy processes"), ("threads", "--threads")]
    columns += [(key, key.replace("_", " ")) for key in rows[0] if key not in ("busy", "threads")]
    print(f"torch default threads here: {torch.get_num_threads()} ({os.cpu_count()} CPUs)")
    print(report.markdown_table(rows, columns))
    if args.out:
        record = dict(rows=rows, default_threads=torch.get_num_threads(), environment=report.environment())
        files.write_results(args.out, lambda path: files.write_json(path, record), file=True)


if __name__ == "__main__":
    main()
