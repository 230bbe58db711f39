"""``mmadapters eval zeroshot`` (and ``mmadapters zeroshot``, the same parser) and ``mmadapters eval fewshot``: their
flags (torch-free).

The evaluators themselves are in :mod:`mmadapters.eval.clip_tasks`, imported only when a task runs.
"""

from __future__ import annotations

import argparse
import os

from .eval_cli import guard_outputs

ZEROSHOT_OUTPUT = "{dataset}_{model}_{method}.json"
FEWSHOT_OUTPUT = "{dataset}_{model}_{kind}.json"
BATCH_SIZE = 64  # images per batch, CLIP_benchmark's default
NUM_WORKERS = min(4, os.cpu_count() or 1)


def _print_adapter(results: dict) -> None:
    adapter = results.get("adapter")
    if adapter:
        shots = f" {adapter['shots']}-shot" if adapter.get("shots") else ""
        print(f"adapter {adapter['kind']}{shots}: {adapter.get('hyperparams')}")


def _seeded_root(args: argparse.Namespace) -> None:
    """--data-seed: draw the generated task afresh from that seed (same recipe) into its own folder and point
    --dataset-root there, so the evaluators open it as they open any generated task (rank 0 alone generates)."""
    if getattr(args, "data_seed", None) is None:
        return
    from pathlib import Path

    from mmadapters.training.trainer import run_on_main
    from mmadapters.vision.readers import prepare_dataset_root

    from .results_io import default_cache_dir

    if args.data_seed < 0:
        raise ValueError(f"--data-seed {args.data_seed}: expected an integer >= 0")
    if args.dataset is None:
        raise ValueError("--data-seed needs --dataset (the generated task to draw afresh)")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    _, root = run_on_main(lambda: prepare_dataset_root(args.dataset, args.dataset_root, cache_dir,
                                                       data_seed=args.data_seed))
    args.dataset_root = str(root)


def _zeroshot(args: argparse.Namespace) -> int:
    from .eval_cli import print_summary, run_guarded

    def go() -> None:
        from .clip_tasks import run_zeroshot

        _seeded_root(args)
        results = run_zeroshot(args)
        if results is not None:
            _print_adapter(results)
            print_summary(results)

    return run_guarded("zeroshot", go)


# `mmadapters zeroshot` is not under `mmadapters eval`, which checks every task's outputs before it runs: one
# function for both doors
_zeroshot_checked = guard_outputs("zeroshot", _zeroshot)


def _fewshot(args: argparse.Namespace) -> int:
    from .eval_cli import print_summary, run_guarded

    def go() -> None:
        from .clip_tasks import run_fewshot

        _seeded_root(args)
        results = run_fewshot(args)
        if results is not None:
            _print_adapter(results)
            print_summary(results)

    return run_guarded("fewshot", go)


def _on_error(value: str) -> bool:
    if value not in ("skip", "fail"):
        raise argparse.ArgumentTypeError(f"expected skip or fail, got {value!r}")
    return value == "fail"


def _dataset_args(p: argparse.ArgumentParser, *, default_dataset: str | None) -> None:
    add = p.add_argument
    shown = default_dataset or "the dataset the adapters were fitted on"
    add("--dataset", default=default_dataset,
        help=f"imagefolder, csv, coop, wds, or a generated task such as synth-shapes (default: {shown})")
    add("--dataset-root", default=None, help="dataset location (generated tasks: a folder in the cache dir by default)")
    add("--data-seed", type=int, default=None, help="generated task: draw it afresh from this seed, same recipe, into "
        "<cache dir>/datasets/<task>_seed<S> (default: the canonical draw, seed 0)")
    add("--split", default="test", help="split to evaluate (default: test)")
    add("--num-workers", type=int, default=NUM_WORKERS,
        help=f"DataLoader worker processes reading images ahead (default: {NUM_WORKERS})")
    add("--cache-dir", default=None, help="classifier/dataset/weights cache (default: $MMADAPTERS_CACHE or ~/.cache/mmadapters)")
    add("--predictions", default=None, help="also write one JSON line per image (id, label, prediction, top5) here")


def _common_args(p: argparse.ArgumentParser, default_output: str) -> None:
    from .eval_cli import add_common_args

    add_common_args(p, default_output=default_output)
    p.add_argument("--on-error", dest="fail_fast", type=_on_error, metavar="{skip,fail}",
                   default=False, help="unreadable images: skip and count them (default), or fail (= --fail-fast)")
    p.set_defaults(batch_size=BATCH_SIZE)


def add_zeroshot_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``mmadapters eval zeroshot`` and ``mmadapters zeroshot`` (one parser, one implementation)."""
    add = p.add_argument
    add("--model", default=None, help="open_clip model name, local-dir:DIR or hf-hub:org/repo (default: the shipped tiny CLIP)")
    add("--pretrained", default=None, help="pretrained tag or local weights file for a built-in model name")
    _dataset_args(p, default_dataset="synth-shapes")
    add("--templates", default=None, help="templates file, one per line with {c} (default: <root>/templates.txt, "
        "<root>/zeroshot_classification_templates.txt, else a built-in set)")
    add("--classnames", default=None, help="class names file, one per line in label order (default: "
        "<root>/classnames.txt, else the dataset's own names)")
    add("--adapter", default="none", choices=["none", "tip", "tip-f", "caps"],
        help="fit a few-shot adapter first, then score with it (default: none, zero-shot)")
    add("--shots", type=int, default=16, help="support images per class for --adapter (default: 16)")
    add("--support-root", default=None, help="image folder of support images (default: the dataset's train split)")
    add("--captions", default=None, help="captions (JSON lines or TSV) of the support images for --adapter caps "
        "(default: <root>/captions.jsonl)")
    add("--val-split", default="val", help="split the adapter's hyperparameters are searched on (default: val)")
    _common_args(p, ZEROSHOT_OUTPUT)
    p.set_defaults(func=_zeroshot_checked)


ZEROSHOT_DESCRIPTION = ("Zero-shot classification, CLIP_benchmark style, in the shared results schema "
                        "(`mmadapters zeroshot` and `mmadapters eval zeroshot` are one command). With no --model the "
                        "shipped tiny CLIP is used; a generated task such as synth-shapes is generated on first use. "
                        "--adapter tip|tip-f|caps --shots K first fits a few-shot adapter (hyperparameters searched on "
                        "--val-split). Each image's label and top-5 predictions are recorded as it is evaluated, so an "
                        "interrupted run resumes. --output fills in {dataset} {model} {pretrained} {task} {method}.")


def register(sub) -> None:
    """Add ``zeroshot`` and ``fewshot`` to the subparsers of ``mmadapters eval``."""
    p = sub.add_parser("zeroshot", help="zero-shot (or few-shot adapter) image classification with CLIP (acc1, acc5, "
                       "mean per-class recall)", description=ZEROSHOT_DESCRIPTION)
    add_zeroshot_args(p)

    p = sub.add_parser("fewshot", help="a fitted Tip-Adapter / Tip-Adapter-F / CapS-Adapter on the test split",
                       description="Evaluate the cache model written by `mmadapters train tip-adapter|caps-adapter` "
                       "(its best/ folder) on a split of the dataset it was fitted on (default: test). The CLIP is "
                       "the one recorded with the adapters; another one is refused.")
    add = p.add_argument
    add("--adapters", required=True, help="a train output's best/ (or last/) folder holding cache_model.json")
    add("--model", default=None, help="CLIP to load (default: the one recorded in the adapters; must have the same weights)")
    add("--pretrained", default=None, help="pretrained tag or weights file for --model")
    _dataset_args(p, default_dataset=None)
    _common_args(p, FEWSHOT_OUTPUT)
    p.set_defaults(func=_fewshot)
