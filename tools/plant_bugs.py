#!/usr/bin/env python
"""Mutation testing by hand: plant realistic bugs in ka_hf, one at a time, and check that the tests catch each.

Each bug is a textual find/replace patch on ka_hf's source. For every bug the script restores a temporary copy
of the working tree (tracked and untracked-but-not-ignored files; the real tree is never touched), applies the
patch, runs the chosen tests (`python -m pytest -x -q -n 2`) in that copy and records the first failing test.
It prints a table: bug -> caught by (first failing test) / SURVIVED / patch did not apply. The code changes under
these patches: a patch whose text is no longer found exactly once is reported as "patch did not apply"
(update its find text) instead of stopping the run.

    python tools/plant_bugs.py                       # every bug, each with its own tests (default: the core subset)
    python tools/plant_bugs.py --bugs softcap-inside-tanh,decode-ignores-mask
    python tools/plant_bugs.py --tests tests/test_ops.py tests/test_integration.py
    python tools/plant_bugs.py --list

Exit status: 0 when every applied bug was caught, 1 when one survived (or the unpatched tests fail), 2 with
--strict when a patch did not apply.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TESTS = ["tests/test_properties.py", "tests/test_oracle.py", "tests/test_generate_scores.py"]
# The study's plumbing (evaluation split over processes, targets, the training data) is tested apart from the core.
PLUMBING_TESTS = (
    "tests/test_evaluation_plumbing.py",
    "tests/test_experiment.py::test_training_data_holds_the_fact_directions_it_records",
)


@dataclass(frozen=True)
class Bug:
    name: str
    what: str
    path: str
    patches: tuple  # ((find, replace), ...): each find must occur exactly once in `path`
    tests: tuple = ()  # the tests run for this bug when --tests is not given (empty: DEFAULT_TESTS)


BUGS = [
    Bug(
        "scale-ignored",
        "the model's attention scale ignored: always head_dim**-0.5",
        "ka_hf/integration.py",
        (
            (
                "    scale = scaling if scaling is not None else query.shape[-1] ** -0.5\n    dropout_p =",
                "    scale = query.shape[-1] ** -0.5\n    dropout_p =",
            ),
        ),
    ),
    Bug(
        "softcap-inside-tanh",
        "softcap as tanh(s) * c instead of tanh(s / c) * c",
        "ka_hf/ops/common.py",
        (("torch.tanh(scores / softcap) * softcap", "torch.tanh(scores) * softcap"),),
    ),
    Bug(
        "window-off-by-one",
        "sliding window q - k <= window instead of < window",
        "ka_hf/ops/common.py",
        (("(query_pos - key_pos < sliding_window)", "(query_pos - key_pos <= sliding_window)"),),
    ),
    Bug(
        "mask-2d-ignored",
        "the 2-D (flash-style) padding mask ignored",
        "ka_hf/masks.py",
        (("return causal & mask[:, None, None, -n_total:].bool()", "return causal"),),
    ),
    Bug(
        "decode-ignores-mask",
        "ka_decode_step ignores `allowed`",
        "ka_hf/ops/parallel.py",
        (
            ("attn_mask=allowed, scale=scale)", "attn_mask=None, scale=scale)"),
            (
                "return _attend(query, key, attended, allowed, scale, softcap)",
                "return _attend(query, key, attended, None, scale, softcap)",
            ),
        ),
    ),
    Bug(
        "gqa-repeat",
        "GQA kv heads expanded with repeat (h % n_kv) instead of repeat_interleave (h // group)",
        "ka_hf/ops/common.py",
        (("x.repeat_interleave(group, dim=1)", "x.repeat(1, group, 1, 1)"),),
    ),
    Bug(
        "cache-gqa-repeat",
        "KACache placeholders expanded with repeat instead of repeat_interleave",
        "ka_hf/layers.py",
        (
            (
                "return expand_kv_heads(value_states, self.num_query_heads or value_states.shape[1])",
                "return value_states.repeat(1, (self.num_query_heads or value_states.shape[1]) // value_states.shape[1], 1, 1)",
            ),
        ),
    ),
    Bug(
        "diagonal-dropped",
        "the diagonal weight w_ii v_i dropped from the right-hand side",
        "ka_hf/ops/parallel.py",
        (
            (
                "rhs = weights_new.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * new_values",
                "rhs = torch.zeros_like(new_values)",
            ),
        ),
    ),
    Bug(
        "solve-reads-diagonal",
        "the triangular solve reads the diagonal (not unit-triangular)",
        "ka_hf/ops/parallel.py",
        (("upper=False, unitriangular=True)", "upper=False, unitriangular=False)"),),
    ),
    Bug(
        "past-outputs-ignored",
        "a chunk ignores the cached past outputs (W_past A_past dropped)",
        "ka_hf/ops/parallel.py",
        (
            (
                "    if n_past > 0:\n        rhs = rhs + weights[..., :n_past] @ past_outputs",
                "    if False:\n        rhs = rhs + weights[..., :n_past] @ past_outputs",
            ),
        ),
    ),
    Bug(
        "earlier-blocks-forgotten",
        "a block's past omits the blocks solved before it",
        "ka_hf/ops/parallel.py",
        (
            (
                "earlier = ([past_outputs] if past_outputs is not None else []) + block_outputs",
                "earlier = [past_outputs] if past_outputs is not None else []",
            ),
        ),
    ),
    Bug(
        "minus-inf-fill",
        "masked scores filled with -inf (fully masked pad rows become NaN)",
        "ka_hf/ops/common.py",
        (
            (
                "scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)",
                "scores.masked_fill(~allowed, float('-inf'))",
            ),
        ),
    ),
    Bug(
        "causal-top-left",
        "causal mask of a chunk aligned top-left (new tokens at positions 0..n-1)",
        "ka_hf/ops/common.py",
        (
            (
                "query_pos = torch.arange(n_total - n_new, n_total, device=device)[:, None]",
                "query_pos = torch.arange(n_new, device=device)[:, None]",
            ),
        ),
    ),
    Bug(
        "decode-drops-softcap",
        "the fused decode fast path taken with a softcap (softcap ignored)",
        "ka_hf/ops/parallel.py",
        (
            (
                "    if softcap is not None:\n        return _attend(query, key, attended, allowed, scale, softcap)\n",
                "",
            ),
        ),
    ),
    Bug(
        "hybrid-prefill-ignored",
        'KACache(prefill="standard") prefills with KA anyway',
        "ka_hf/attention.py",
        (
            (
                'if settings.prefill == "standard" and past_outputs is None:',
                'if False and settings.prefill == "standard" and past_outputs is None:',
            ),
        ),
    ),
    Bug(
        "layer-subset-ignored",
        "KACache(ka_layers=...) runs KA on every layer",
        "ka_hf/cache.py",
        (("        if not self.is_ka_layer(layer_idx):\n", "        if False:\n"),),
    ),
    Bug(
        "prefill-always-standard",
        "a KACache prefill always runs standard attention (ka-hybrid by accident)",
        "ka_hf/attention.py",
        (('if settings.prefill == "standard" and past_outputs is None:', "if past_outputs is None:"),),
    ),
    Bug(
        "hybrid-evaluated-as-ka",
        "eval mode ka-hybrid builds a plain KACache() (its prompt KA too): ka up to chunking noise",
        "ka_hf/modes.py",
        (('prefill="standard" if self.kind == "ka-hybrid" else "ka",', 'prefill="ka",'),),
        PLUMBING_TESTS,
    ),
    Bug(
        "mode-skips-targets",
        "KA eval modes skip the first batch (the warm-up window), so they score other targets than kv",
        "ka_hf/study/evaluation/ppl.py",
        (("bar = tqdm(my_batches, desc=", "bar = tqdm(my_batches[1:] if mode.uses_ka else my_batches, desc="),),
        PLUMBING_TESTS,
    ),
    Bug(
        "merge-drops-shard",
        "merging the processes' sums keeps the first process's only",
        "ka_hf/study/evaluation/ppl.py",
        (("summed, largest = rows.sum(0), rows.max(0).values", "summed, largest = rows[0], rows.max(0).values"),),
        PLUMBING_TESTS,
    ),
    Bug(
        "shard-double-counted",
        "batches dealt as batches[rank:] instead of batches[rank::world] (later processes repeat earlier ones)",
        "ka_hf/study/evaluation/ppl.py",
        (("return dealt[rank::world]", "return dealt[rank:]"),),
        PLUMBING_TESTS,
    ),
    Bug(
        "recall-scores-key",
        "recall queries scored on the key at the query position instead of its paired value",
        "ka_hf/study/recall/scoring.py",
        (("(logits.argmax(-1) == batch.targets) & scored", "(logits.argmax(-1) == batch.input_ids) & scored"),),
        ("tests/test_recall.py",),
    ),
    Bug(
        "recall-target-is-key",
        "the recall generator's target at a query is the key itself, not the paired value",
        "ka_hf/study/recall/data.py",
        (("targets[rows, query_positions] = values", "targets[rows, query_positions] = keys"),),
        ("tests/test_recall.py",),
    ),
    Bug(
        "study-trains-both-directions",
        "the study trains the facts in both directions while recording facts_include (forward)",
        "ka_hf/study/experiment/steps.py",
        (
            (
                "training_texts(facts, include=config.facts_include, seed=config.facts_seed)",
                'training_texts(facts, include="both", seed=config.facts_seed)',
            ),
        ),
        PLUMBING_TESTS,
    ),
    Bug(
        "verdict-without-power",
        "a verdict is written although its power check failed",
        "ka_hf/study/power.py",
        (("    failed = [check for check in checks if not check.passed]\n", "    failed = []\n"),),
        ("tests/test_verdicts.py",),
    ),
    Bug(
        "power-check-wrong-side",
        "the plateau check passes on the wrong side of its threshold",
        "ka_hf/study/power.py",
        (
            (
                "self.value >= self.threshold if self.at_least else self.value <= self.threshold",
                "self.value >= self.threshold",
            ),
        ),
        ("tests/test_verdicts.py",),
    ),
    Bug(
        "rank-ties-favour-the-right-name",
        "names that tie with the right one do not count against it (a constant model ranks first)",
        "ka_hf/study/evaluation/ranks.py",
        (("+ sum(ll == right[0] for ll in others) / 2)", ")"),),
        ("tests/test_ranks.py",),
    ),
    Bug(
        "values-read-after-the-layer-wrote-outputs",
        "A-vs-V reads the value slots after the layer wrote its outputs over them",
        "ka_hf/study/capture.py",
        (
            (
                "        new_values = values[..., -query.shape[-2] :, :].detach().float().clone()\n"
                "        outputs = attend(layer_idx, query, keys, values, mask, call)\n",
                "        outputs = attend(layer_idx, query, keys, values, mask, call)\n"
                "        new_values = values[..., -query.shape[-2] :, :].detach().float()\n",
            ),
        ),
        ("tests/test_distributions.py",),
    ),
]


def working_tree_files(root: Path) -> list[str]:
    """Tracked files plus untracked files git does not ignore (uncommitted work is tested too)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [name for name in out.split("\0") if name and (root / name).is_file()]


def copy_tree(root: Path, destination: Path) -> None:
    for name in working_tree_files(root):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)


def apply(bug: Bug, text: str) -> str | None:
    """The patched text, or None when some find text does not occur exactly once."""
    for find, replace in bug.patches:
        if text.count(find) != 1:
            return None
        text = text.replace(find, replace)
    return text


FAILED_LINE = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)


def run_tests(copy: Path, tests: list[str], workers: int, timeout: float) -> tuple[int | None, str]:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    if workers > 1:
        command[4:4] = ["-n", str(workers)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    try:
        result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, ""
    return result.returncode, result.stdout + result.stderr


def verdict(returncode: int | None, output: str) -> tuple[str, bool]:
    """(text for the table, survived?)"""
    if returncode is None:
        return "caught? (tests timed out)", False
    if returncode == 0:
        return "SURVIVED", True
    match = FAILED_LINE.search(output)
    if match:
        return f"{match.group(2)}", False
    return f"caught (pytest exit {returncode}, no test named)", False


def tests_for(bug: Bug, tests: list[str] | None) -> list[str]:
    """--tests when given, else the bug's own tests, else DEFAULT_TESTS."""
    return list(tests or bug.tests or DEFAULT_TESTS)


def baseline_tests(bugs: list[Bug], tests: list[str] | None) -> list[str]:
    """Every test some chosen bug will run, once each, in first-seen order."""
    return list(dict.fromkeys(test for bug in bugs for test in tests_for(bug, tests)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bugs", help="comma-separated bug names (default: all)")
    parser.add_argument(
        "--tests", nargs="+", help="test files or node ids to run for every bug (default: each bug's own tests)"
    )
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (-n); 1 = no xdist")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unpatched copy")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a patch did not apply")
    parser.add_argument("--list", action="store_true", help="list the bugs and exit")
    args = parser.parse_args(argv)

    bugs = BUGS
    if args.bugs:
        wanted = [name.strip() for name in args.bugs.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {bug.name for bug in BUGS})
        if unknown:
            parser.error(f"unknown bugs: {', '.join(unknown)}")
        bugs = [bug for bug in BUGS if bug.name in wanted]
    if args.list:
        for bug in bugs:
            print(f"{bug.name:28} {bug.path:32} {bug.what}")
        return 0

    rows, survived, not_applied = [], 0, 0
    with tempfile.TemporaryDirectory(prefix="ka_hf-plant-") as scratch:
        copy = Path(scratch) / "repo"
        copy_tree(REPO_ROOT, copy)
        where = subprocess.run(
            [sys.executable, "-c", "import ka_hf; print(ka_hf.__file__)"], cwd=copy, capture_output=True, text=True
        ).stdout.strip()
        if not where.startswith(str(copy)):
            print(f"the copy imports ka_hf from {where!r}, not from the copy: aborting", file=sys.stderr)
            return 1
        if not args.no_baseline:
            start = time.time()
            code, output = run_tests(copy, baseline_tests(bugs, args.tests), args.workers, args.timeout)
            if code != 0:
                print(output[-3000:])
                print(f"The unpatched tests fail (exit {code}): fix them before planting bugs.", file=sys.stderr)
                return 1
            print(f"baseline: tests pass on the unpatched copy ({time.time() - start:.0f} s)", flush=True)
        for bug in bugs:
            target = copy / bug.path
            original = target.read_text() if target.exists() else None
            patched = apply(bug, original) if original is not None else None
            if patched is None:
                rows.append((bug, "patch did not apply", 0.0))
                not_applied += 1
                print(f"{bug.name}: patch did not apply", flush=True)
                continue
            start = time.time()
            try:
                target.write_text(patched)
                code, output = run_tests(copy, tests_for(bug, args.tests), args.workers, args.timeout)
            finally:
                target.write_text(original)
            text, lived = verdict(code, output)
            survived += lived
            rows.append((bug, text, time.time() - start))
            print(f"{bug.name}: {text} ({time.time() - start:.0f} s)", flush=True)

    print()
    print("| bug | file | caught by (first failing test) |")
    print("|---|---|---|")
    for bug, text, _ in rows:
        print(f"| `{bug.name}`: {bug.what} | {bug.path} | {text} |")
    print()
    print(
        f"{len(rows)} bugs: {len(rows) - survived - not_applied} caught, {survived} survived, "
        f"{not_applied} did not apply"
    )
    if survived:
        return 1
    if not_applied and args.strict:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
