"""``mmadapters eval videoqa`` and ``mmadapters eval dfer``: their flags (torch-free).

The evaluators are in :mod:`mmadapters.eval.video_tasks`, imported only when a task runs.
"""

from __future__ import annotations

import argparse

VIDEOQA_OUTPUT = "{dataset}_{model}_{task}.json"
DFER_OUTPUT = "{dataset}_{model}_{task}.json"


def _run(task: str, entry: str):
    def fn(args: argparse.Namespace) -> int:
        from .eval_cli import print_summary, run_guarded

        def go() -> None:
            from . import video_tasks

            results = getattr(video_tasks, entry)(args)
            if results is not None:
                print_summary(results)

        return run_guarded(task, go)

    return fn


def register(sub) -> None:
    """Add ``videoqa`` and ``dfer`` to the subparsers of ``mmadapters eval``."""
    from .eval_cli import add_common_args

    p = sub.add_parser("videoqa", help="multiple-choice VideoQA accuracy (SUTD-TrafficQA rows): zero-shot CLIP or Tem-Adapter",
                       description="Score every question's candidates with frozen CLIP frame features: a Tem-Adapter "
                       "trained by `mmadapters train tem-adapter` (--adapters OUTPUT/best) or, without --adapters, the "
                       "zero-shot frame-mean baseline. Frame features are cached on disk; each question is recorded as it "
                       "is scored, so an interrupted run resumes; unreadable videos are skipped with their reason.")
    add = p.add_argument
    add("--annotations", required=True, help="SUTD-TrafficQA jsonl of the evaluated split")
    add("--video-root", default=None, help="folder the vid_filename paths are relative to (default: the jsonl's folder)")
    add("--adapters", default=None, help="a `mmadapters train tem-adapter` output's best/ (or last/) folder "
        "(default: zero-shot frame-mean CLIP)")
    add("--model", default=None, help="CLIP: open_clip name, local-dir:DIR or hf-hub:org/repo (default: the one recorded "
        "with --adapters, else the shipped tiny CLIP)")
    add("--pretrained", default=None, help="pretrained tag or weights file for a built-in --model name")
    add("--num-frames", type=int, default=None, help="frames per video (default: the adapters' setting, else 8; the "
        "official Tem-Adapter: 128 = 8 clips x 16 frames)")
    add("--candidate-text", default=None, choices=("question_answer", "options"), help="candidate texts: the question "
        "and option fused by --template, or the option alone as the official code scores them (default: the adapters' "
        "setting, else question_answer)")
    add("--template", default=None, help="question+answer fusion template (default: the adapters' setting, else "
        "'{question} {answer}')")
    add("--dataset", default=None, help="dataset name in the results (default: the annotation file's stem)")
    add("--cache-dir", default=None, help="frame-feature and weights cache (default: $MMADAPTERS_CACHE or ~/.cache/mmadapters)")
    add("--num-workers", type=int, default=0, help="video decoding worker processes (default: 0)")
    add("--predictions", default=None, help="also write one JSON line per question (id, scores, prediction, answer, "
        "options, q_type, video) here")
    add_common_args(p, default_output=VIDEOQA_OUTPUT)
    p.set_defaults(func=_run("videoqa", "run_videoqa"))

    p = sub.add_parser("dfer", help="dynamic facial expression recognition UAR / WAR (DFEW / MAFW / FERV39k lists): "
                       "zero-shot CLIP or FineCLIPER",
                       description="Classify every clip of a DFER fold file: a FineCLIPER trained by `mmadapters train "
                       "fineclipper` (--adapters OUTPUT/best) or, without --adapters, frozen CLIP's frame mean scored "
                       "against the positive/negative class descriptions. Each clip is recorded as it is classified, so "
                       "an interrupted run resumes; unreadable clips or missing cues are skipped with their reason.")
    add = p.add_argument
    add("--data-dir", required=True, help="dataset root: frame folders resolve against it; annotation/ and cues/ inside")
    add("--dataset", default="dfew", choices=("dfew", "mafw", "ferv39k"), help="label set and file naming (default: dfew)")
    add("--fold", type=int, default=1, help="fold of the annotation files (default: 1)")
    add("--split", default="test", choices=("train", "test"), help="split of the fold to evaluate (default: test)")
    add("--annotation", default=None, help="the list to evaluate (default: DATA_DIR/annotation/<DATASET>_set_<fold>_<split>.txt)")
    add("--label-base", type=int, default=1, choices=(0, 1), help="number of the first class in the list (default: 1)")
    add("--strip-prefix", default=None, help="leading part of absolute frame paths to drop")
    add("--cues-root", default=None, help="root of the precomputed cues (default: --data-dir)")
    add("--adapters", default=None, help="a `mmadapters train fineclipper` output's best/ (or last/) folder "
        "(default: zero-shot frozen CLIP)")
    add("--model", default=None, help="CLIP for zero-shot (default: the shipped tiny CLIP; with --adapters the recorded one)")
    add("--pretrained", default=None, help="pretrained tag or weights file for a built-in --model name")
    add("--num-frames", type=int, default=None, help="TSN segments per clip (default: the adapters' setting, else 16)")
    add("--cache-dir", default=None, help="weights cache (default: $MMADAPTERS_CACHE or ~/.cache/mmadapters)")
    add("--predictions", default=None, help="also write one JSON line per clip (id, pred, label) here")
    add_common_args(p, default_output=DFER_OUTPUT)
    p.set_defaults(func=_run("dfer", "run_dfer"))
