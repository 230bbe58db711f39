"""``mmadapters eval vqa|gqa|nlvr|caption``: the command-line side of the VL-T5 evaluations (torch-free).

The work happens in :mod:`mmadapters.eval.vl_tasks`, imported when a task runs.
"""

from __future__ import annotations

import argparse

from . import eval_cli

VL_TASKS = {  # command -> (what it evaluates, the annotation file it reads)
    "vqa": ("VQA accuracy of a VL-T5 (with adapters) on VQAv2-style questions",
            "VQAv2 Karpathy-split JSON (VL-T5's karpathy_test.json: img_id, sent, question_id, label, answers?)"),
    "gqa": ("exact-match accuracy of a VL-T5 (with adapters) on GQA-style questions",
            "VL-T5's GQA JSON (testdev.json: img_id, sent, question_id, label)"),
    "nlvr": ("accuracy of a VL-T5 (with adapters) on NLVR2 true/false statements about image pairs",
             "NLVR2 JSON lines (VL-T5's rows with img0/img1, or the raw release's)"),
    "caption": ("BLEU-4 and CIDEr of a VL-T5's (with adapters) greedy captions",
                "Karpathy's dataset_coco.json (the images of --split)"),
}


def register(sub) -> None:
    """Add the ``vqa``, ``gqa``, ``nlvr`` and ``caption`` parsers to ``mmadapters eval``'s subparsers."""
    for task, (what, file_format) in VL_TASKS.items():
        p = sub.add_parser(task, help=what, description=f"Evaluate the {what}. Image features come from --features "
                           "(an .h5 file or a folder of <img_id>.safetensors) or are computed from --images with a CLIP. "
                           "--adapters takes a `mmadapters train vl-adapter` output's best/ (or last/) or a directory "
                           "of core adapters. Samples whose features are missing or unusable are skipped with the reason.")
        add = p.add_argument
        add("--annotations", required=True, help=f"annotation file: {file_format}")
        if task == "caption":
            add("--split", default="test", choices=["train", "val", "test", "restval"],
                help="Karpathy split to caption (default: test)")
        add("--features", default=None, help="image features: an .h5 file or a folder of <img_id>.safetensors")
        add("--images", default=None, help="image folder to compute features from with --clip-model (instead of --features)")
        add("--image-pattern", default="{img_id}.png", help="file name of an image in --images (default: {img_id}.png)")
        add("--clip-model", default=None, help="open_clip model for --images (default: the shipped tiny CLIP)")
        add("--clip-pretrained", default=None, help="pretrained tag or weights file for --clip-model")
        add("--model", default=None, help="VL-T5 directory (default: the one the --adapters were trained on, else the "
            "shipped tiny VL-T5)")
        add("--adapters", default=None, help="trained adapters: a train output's best/ or last/ (vl_adapter.json), a "
            "directory of <name>/adapter_config.json, or one adapter directory")
        add("--adapter-name", default=None, help="adapter to activate when --adapters holds several and none is named "
            "after the task (default: the task's, else 'shared', else the only one)")
        add("--dataset", default=None, help="dataset name in the results (default: from the annotation file name)")
        add("--max-samples", type=int, default=None, help="evaluate only the first N samples")
        add("--max-text-length", type=int, default=40, help="encoder tokens kept (task prefix + question; default: 40)")
        add("--max-new-tokens", type=int, default=20, help="generated tokens at most (default: 20)")
        add("--num-beams", type=int, default=1, help="beam search width (default: 1, greedy)")
        add("--on-bad-rows", default="skip", choices=["skip", "raise"],
            help="malformed annotation rows: skip them (recorded with the reason) or stop (default: skip)")
        eval_cli.add_common_args(p, default_output=f"{task}_results.json")
        p.set_defaults(func=_run, vl_task=task)


def _run(args: argparse.Namespace) -> int:
    def go() -> None:
        from .vl_tasks import evaluate_vl_task

        results = evaluate_vl_task(args)
        if results is not None:
            eval_cli.print_summary(results)

    return eval_cli.run_guarded(args.vl_task, go)
