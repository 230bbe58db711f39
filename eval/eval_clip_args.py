"""``mmadapters eval zeroshot`` and ``mmadapters eval fewshot``: their flags (torch-free).

The evaluators themselves are in :mod:`mmadapters.eval.clip_tasks`, imported only when a task runs.
"""

from __future__ import annotations

import argparse

ZEROSHOT_OUTPUT = "{dataset}_{model}_zeroshot.json"
FEWSHOT_OUTPUT = "{dataset}_{model}_{kind}.json"


def _zeroshot(args: argparse.Namespace) -> int:
    from .eval_cli import print_summary, run_guarded

    def go() -> None:
        from .clip_tasks import run_zeroshot

        results = run_zeroshot(args)
        if results is not None:
            print_summary(results)

    return run_guarded("zeroshot", go)


def _fewshot(args: argparse.Namespace) -> int:
    from .eval_cli import print_summary, run_guarded

    def go() -> None:
        from .clip_tasks import run_fewshot

        results = run_fewshot(args)
        if results is not None:
            print_summary(results)

    return run_guarded("fewshot", go)


def _dataset_args(p: argparse.ArgumentParser, *, default_dataset: str | None) -> None:
    add = p.add_argument
    shown = default_dataset or "the dataset the adapters were fitted on"
    add("--dataset", default=default_dataset,
        help=f"imagefolder, csv, coop, wds, or a generated task such as synth-shapes (default: {shown})")
    add("--dataset-root", default=None, help="dataset location (generated tasks: a folder in the cache dir by default)")
    add("--split", default="test", help="split to evaluate (default: test)")
    add("--cache-dir", default=None, help="classifier/dataset/weights cache (default: $MMADAPTERS_CACHE or ~/.cache/mmadapters)")
    add("--predictions", default=None, help="also write one JSON line per image (id, label, prediction, top5) here")


def register(sub) -> None:
    """Add ``zeroshot`` and ``fewshot`` to the subparsers of ``mmadapters eval``."""
    from .eval_cli import add_common_args

    p = sub.add_parser("zeroshot", help="zero-shot image classification with CLIP (acc1, acc5, mean per-class recall)",
                       description="Zero-shot classification, CLIP_benchmark style, in the shared results schema. The "
                       "same datasets as `mmadapters zeroshot`; each image's label and top-5 predictions are recorded as "
                       "it is evaluated, so an interrupted run resumes. With no --model the shipped tiny CLIP is used.")
    add = p.add_argument
    add("--model", default=None, help="open_clip model name, local-dir:DIR or hf-hub:org/repo (default: the shipped tiny CLIP)")
    add("--pretrained", default=None, help="pretrained tag or local weights file for a built-in model name")
    _dataset_args(p, default_dataset="synth-shapes")
    add("--templates", default=None, help="templates file, one per line with {c} (default: <root>/templates.txt, "
        "<root>/zeroshot_classification_templates.txt, else a built-in set)")
    add("--classnames", default=None, help="class names file, one per line in label order (default: "
        "<root>/classnames.txt, else the dataset's own names)")
    add_common_args(p, default_output=ZEROSHOT_OUTPUT)
    p.set_defaults(func=_zeroshot)

    p = sub.add_parser("fewshot", help="a fitted Tip-Adapter / Tip-Adapter-F / CapS-Adapter on the test split",
                       description="Evaluate the cache model written by `mmadapters train tip-adapter|caps-adapter` "
                       "(its best/ folder) on a split of the dataset it was fitted on (default: test). The CLIP is "
                       "the one recorded with the adapters; another one is refused.")
    add = p.add_argument
    add("--adapters", required=True, help="a train output's best/ (or last/) folder holding cache_model.json")
    add("--model", default=None, help="CLIP to load (default: the one recorded in the adapters; must have the same weights)")
    add("--pretrained", default=None, help="pretrained tag or weights file for --model")
    _dataset_args(p, default_dataset=None)
    add_common_args(p, default_output=FEWSHOT_OUTPUT)
    p.set_defaults(func=_fewshot)
