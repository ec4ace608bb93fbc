"""Publish a KA-trained model (or a model with its plan-1 adapter) on the Hugging Face Hub, with a model card that
carries its training, KV-vs-KA and reversal results and says how to run it.

    python examples/push_to_hub.py --model runs/ka/best --repo-id alice/tiny-ka --dry-run   # write + list, no upload
    python examples/push_to_hub.py --model runs/ka/best --repo-id alice/tiny-ka --private
    python examples/push_to_hub.py --model runs/standard/best --adapter runs/standard/adapter --repo-id alice/tiny

Results files: the flags, else the results.json files found next to --model (the training run's, and eval_ppl /
reversal_curse runs whose --model was this directory; see ka_hf.study.hub.find_results). The token is
huggingface_hub's usual one (HF_TOKEN or `hf auth login`). See docs/hub.md.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from ka_hf.study import hub
from ka_hf.study.cli import ArgumentParser, add_output_arguments, user_errors_exit_2


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="DIR", help="a save_pretrained directory (a run's best/)")
    parser.add_argument("--repo-id", required=True, metavar="USER/NAME")
    parser.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)"
    )
    parser.add_argument("--dry-run", action="store_true", help="write the folder and list it; upload nothing")
    parser.add_argument("--train-results", metavar="PATH", help="examples/train.py's results.json")
    parser.add_argument("--eval-results", metavar="PATH", help="examples/eval_ppl.py's results.json")
    parser.add_argument("--reversal-results", metavar="PATH", help="examples/reversal_curse.py's results.json")
    parser.add_argument(
        "--adapter",
        metavar="DIR",
        help="a plan-1 adapter (examples/fit_adapter.py --out) to publish with the model: an adapter card",
    )
    add_output_arguments(
        parser,
        what="the upload is assembled in (default: a temporary one; with --dry-run: MODEL/../hub_NAME)",
        aliases=("--folder",),
    )
    parser.add_argument("--license", help="a Hub license id for the card, e.g. apache-2.0")
    args = parser.parse_args(argv)
    hub.check_repo_id(args.repo_id)
    hub.check_model_dir(args.model)
    return args


def results_paths(args) -> dict:
    """The flags' results files, else the ones found next to the model; says which are used."""
    given = dict(train=args.train_results, eval=args.eval_results, reversal=args.reversal_results)
    found = hub.find_results(args.model)
    paths = {}
    for kind, flag in given.items():
        path = Path(flag) if flag else found.get(kind)
        if path is None:
            print(f"{kind} results: none found next to the model (--{kind}-results PATH adds them)")
        else:
            print(f"{kind} results: {path} ({'given' if flag else 'found'})")
            paths[kind] = path
    return paths


def list_files(folder: Path, files) -> None:
    for path in files:
        print(f"  {path.relative_to(folder)}  ({path.stat().st_size:,} bytes)")


@user_errors_exit_2
def main(argv=None):
    args = parse_args(argv)
    results = results_paths(args)
    name = args.repo_id.split("/")[1]
    with tempfile.TemporaryDirectory(prefix="ka_hf_hub_") as scratch:
        default = Path(args.model).resolve().parent / f"hub_{name}" if args.dry_run else Path(scratch) / name
        folder = Path(args.out) if args.out else default
        files = hub.assemble_folder(
            args.model,
            folder,
            results,
            adapter_dir=args.adapter,
            repo_id=args.repo_id,
            license=args.license,
            overwrite=args.overwrite,
        )
        visibility = "private" if args.private else "public"
        if args.dry_run:
            print(
                f"dry run: {folder} holds what would be uploaded to https://huggingface.co/{args.repo_id} "
                f"({visibility}, create_repo + upload_folder):"
            )
            list_files(folder, files)
            return
        print(f"uploading {len(files)} files to {args.repo_id} ({visibility}) ...")
        print(f"done: {hub.push(folder, args.repo_id, private=args.private)}")


if __name__ == "__main__":
    sys.exit(main())
