"""Rewrite README.md's excerpt of a real study run from that run's own files, so that no number in it is typed.

    python -m ka_hf.experiment --preset quick --out runs/quick       # a real run (a few minutes on a CPU)
    python tools/readme_excerpts.py runs/quick                      # rewrite README.md's quick-study excerpt
    python tools/readme_excerpts.py runs/quick --check              # exit 1 if README.md is not what it gives

The excerpt is the part of README.md between `<!-- begin excerpt: quick-study -->` and
`<!-- end excerpt: quick-study -->`. Everything in it comes from the run: the table and the finding on layers are
copied from its report.md, the other sentences are formatted from its results.json (kind "study"). Nothing
outside the markers changes.
"""

import argparse
import re
import sys
from pathlib import Path

from ka_hf.errors import KAError
from ka_hf.study import records
from ka_hf.study.cli import user_errors_exit_2

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = "quick-study"
BEGIN, END = f"<!-- begin excerpt: {NAME} -->", f"<!-- end excerpt: {NAME} -->"


def read_run(run_dir: Path) -> tuple[dict, str]:
    """(results.json, report.md) of a finished study run; KAError naming what is missing or wrong."""
    report_path = run_dir / "report.md"
    record = records.read(run_dir / "results.json", "study").to_dict()
    if not report_path.is_file():
        raise KAError(f"{report_path} does not exist: give the --out folder of a finished `python -m ka_hf.experiment`")
    return record, report_path.read_text()


def report_section(report: str, heading: str) -> str:
    """The text under `heading` in report.md, up to the next heading."""
    match = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^#|\Z)", report, flags=re.M | re.S)
    if match is None:
        raise KAError(f"the run's report.md has no section {heading!r}: was it written by this ka_hf?")
    return match.group(1).strip()


def comparison_table(report: str) -> str:
    """The training-vs-inference table, as report.md has it."""
    section = report_section(report, "### Training vs inference")
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def layer_finding(report: str) -> str:
    """Finding 3 (error over layers and positions), as report.md words it, as a quote."""
    section = report_section(report, "### Where does the degradation come from?")
    item = next((line for line in section.splitlines() if line.startswith("3. ")), None)
    if item is None:
        raise KAError("the run's report.md has no finding 3 under 'Where does the degradation come from?'")
    return "> " + item


def introduction(record: dict) -> str:
    config, model, windows = record["config"], record["model"], record["windows"]
    return (
        f"An excerpt of a real report (`--preset {config['preset']}`, {record['environment']['device']}, "
        f"{record['timings_s']['total']:.0f} s in all; a {model['num_layers']}-layer {model['model_type']} of "
        f"{model['parameters'] / 1e6:.2f}M parameters, {record['training']['standard']['train_blocks']:,} blocks of "
        f"{config['seq_len']} tokens, "
        f"at most {config['epochs']} epochs; every model and mode scored on the same {windows['count']} validation "
        f"windows of {windows['max_length']} tokens):"
    )


def reversal_sentence(record: dict) -> str:
    facts, reversal = record["data"]["facts"], record["reversal"]
    verdicts = record["findings"]["verdicts"]
    split = "test" if "test" in reversal["standard"]["kv"]["splits"] else "train"
    templates = "held-out templates" if split == "test" else "training templates"

    def answers(model: str, mode: str) -> str:
        result = reversal[model][mode]["splits"][split]
        return (
            f"{result['forward']['answer_ppl']:.1f} forward vs {result['backward']['answer_ppl']:.1f} backward "
            f"(answer ratio {result['answer_ratio']:.3f})"
        )

    return (
        f"Reversal curse ({facts['n']} facts trained {facts['include']} only, {templates}): the standard model's "
        f"answer PPL is {answers('standard', 'kv')} under KV and {answers('standard', 'ka')} under a KA cache; the "
        f"KA-trained model under KA: {answers('ka', 'ka')}. The unseen-facts control ({record['data']['unseen_facts']} facts never trained on): "
        f"{verdicts['reversal_standard']['text']} {verdicts['train_time']['text']} (The original project's token "
        "loop: 4.7×.)"
    )


def excerpt(run_dir: Path) -> str:
    record, report = read_run(run_dir)
    parts = [introduction(record), comparison_table(report), layer_finding(report), reversal_sentence(record)]
    return "\n\n".join(parts)


def rewrite(readme_text: str, block: str) -> str:
    """README text with the marked block's content replaced by `block`."""
    if (
        readme_text.count(BEGIN) != 1
        or readme_text.count(END) != 1
        or readme_text.index(BEGIN) > readme_text.index(END)
    ):
        raise KAError(f"README.md must hold exactly one {BEGIN} ... {END} pair, in that order")
    before, rest = readme_text.split(BEGIN)
    _, after = rest.split(END)
    return f"{before}{BEGIN}\n{block}\n{END}{after}"


@user_errors_exit_2
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", metavar="RUN_DIR", help="the --out folder of a finished quick study")
    parser.add_argument("--readme", default=str(REPO_ROOT / "README.md"), metavar="FILE", help="default: README.md")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if the excerpt differs")
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    if not readme.is_file():
        raise KAError(f"{readme} does not exist: give --readme FILE")
    text = readme.read_text()
    updated = rewrite(text, excerpt(Path(args.run)))
    if args.check:
        same = updated == text
        print(f"{readme}: the excerpt {'matches' if same else 'differs from'} {args.run}")
        return 0 if same else 1
    if updated != text:
        from ka_hf.study.files import write_text

        write_text(readme, updated)
    print(f"{readme}: excerpt {NAME} {'rewritten' if updated != text else 'already up to date'} from {args.run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
