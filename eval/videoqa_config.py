"""The VideoQA evaluator's settings and its ``mmadapters videoqa`` command line.

Light on purpose (no torch import): ``mmadapters --help`` builds every subcommand's parser. The evaluator
itself is :mod:`mmadapters.eval.videoqa_eval`.
"""

from __future__ import annotations

from dataclasses import dataclass

TASK = "videoqa_multiple_choice"
METHODS = ("zeroshot", "tem-adapter")
DEFAULT_OUTPUT = "{dataset}_{model}_{task}.json"


@dataclass
class VideoQAConfig:
    """Everything a run depends on; field names follow the command-line flags."""

    annotations: str = ""  # the evaluated split (jsonl)
    train_annotations: str | None = None  # the training split (tem-adapter)
    video_root: str | None = None  # default: each annotation file's folder
    method: str = "tem-adapter"
    official_repeat_pairing: bool = False
    official_unshifted_future: bool = False
    model: str | None = None  # None: the shipped tiny CLIP
    pretrained: str | None = None
    num_frames: int = 8
    template: str = "{question} {answer}"
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-4
    lr_halve_every: int = 10
    seed: int = 0
    device: str = "cpu"
    dataset: str | None = None  # name in the results (default: the annotation file's stem)
    output: str | None = DEFAULT_OUTPUT
    predictions: str | None = None
    cache_dir: str | None = None
    on_error: str = "skip"
    num_workers: int = 0  # decoding workers
    overwrite: bool = False
    progress: bool = True


# -- command line: mmadapters videoqa --------------------------------------------------------------------


def add_videoqa_parser(sub) -> None:
    """``mmadapters videoqa``: multiple-choice VideoQA (SUTD-TrafficQA format), zero-shot or Tem-Adapter."""
    defaults = VideoQAConfig()
    p = sub.add_parser("videoqa", help="multiple-choice VideoQA accuracy: frame-mean CLIP zero-shot or Tem-Adapter",
                       description="Score 4-option video questions (SUTD-TrafficQA jsonl rows) with frozen CLIP frame "
                       "features: zero-shot (frame mean vs question+answer text) or a Tem-Adapter trained on "
                       "--train-annotations. Frame features are cached on disk; unreadable videos are skipped and counted.")
    add = p.add_argument
    add("--annotations", required=True, help="jsonl of the evaluated split")
    add("--train-annotations", default=None, help="jsonl of the training split (--method tem-adapter)")
    add("--video-root", default=None, help="folder of the videos (default: each annotation file's folder)")
    add("--method", default=defaults.method, choices=METHODS, help=f"(default: {defaults.method})")
    add("--official-repeat-pairing", action="store_true", help="reproduce the official code's candidate/video pairing bug")
    add("--official-unshifted-future", action="store_true", help="reproduce the official code's unshifted future target")
    add("--model", default=None, help="open_clip model, local-dir:DIR or hf-hub:org/repo (default: the shipped tiny CLIP)")
    add("--pretrained", default=None, help="pretrained tag or weights file for a built-in model name")
    add("--num-frames", type=int, default=defaults.num_frames, help=f"TSN frames per video (default: {defaults.num_frames})")
    add("--template", default=defaults.template, help="question+answer fusion template")
    add("--epochs", type=int, default=defaults.epochs)
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--lr", type=float, default=defaults.lr)
    add("--lr-halve-every", type=int, default=defaults.lr_halve_every)
    add("--seed", type=int, default=defaults.seed)
    add("--device", default=defaults.device, help="cpu or cuda")
    add("--dataset", default=None, help="dataset name in the results (default: the annotation file's stem)")
    add("--output", default=defaults.output, help=f"results JSON ({{dataset}} {{model}} {{task}} filled in; default {defaults.output})")
    add("--predictions", default=None, help="also write per-question scores as jsonl here")
    add("--cache-dir", default=None, help="frame-feature and weights cache (default: $MMADAPTERS_CACHE or ~/.cache/mmadapters)")
    add("--on-error", default=defaults.on_error, choices=("skip", "fail"), help="unreadable videos: skip and count, or stop")
    add("--num-workers", type=int, default=defaults.num_workers, help="decoding worker processes")
    add("--overwrite", action="store_true", help="replace an output file that holds a different run")
    p.set_defaults(func=_run_videoqa)


def _run_videoqa(args) -> int:
    import sys

    from .videoqa_eval import UnreadableVideoError, evaluate_videoqa

    fields = {f for f in VideoQAConfig.__dataclass_fields__}
    config = VideoQAConfig(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        results = evaluate_videoqa(config)
    except (ValueError, FileNotFoundError, FileExistsError, UnreadableVideoError) as e:
        print(f"mmadapters videoqa: error: {e}", file=sys.stderr)
        return 2
    m, c = results["metrics"], results.get("counts", {})
    print(f"{results['dataset']} {results['task']}: accuracy {m['acc']:.4f} "
          f"({c.get('evaluated', '?')} questions, {c.get('skipped', 0)} skipped)")
    if "output" in results:
        print(f"results written to {results['output']}")
    return 0
