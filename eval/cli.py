"""The ``mmadapters`` command line. Subcommands import their heavy dependencies only when they run."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from mmadapters.demo import run_demo

    run_demo(output=args.output, steps=args.steps, seed=args.seed)
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from mmadapters.eval.zeroshot_eval import UnreadableImageError, ZeroShotConfig, evaluate_zeroshot

    config = ZeroShotConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "func", "version")})
    try:
        results = evaluate_zeroshot(config)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, UnreadableImageError) as e:
        print(f"mmadapters zeroshot: error: {e}", file=sys.stderr)
        return 2
    m, c, t = results["metrics"], results["counts"], results["timings"]
    print(f"{results['dataset']} / {results['model']} / {results['task']}: acc1 {m['acc1']:.4f}  acc5 {m['acc5']:.4f}  "
          f"mean per-class recall {m['mean_per_class_recall']:.4f}")
    hit = " (cached)" if t["classifier_cache_hit"] else ""
    print(f"{c['evaluated']} images evaluated, {c['skipped']} skipped; classifier {t['classifier_s']:.2f}s{hit}, "
          f"features {t['features_s']:.2f}s, total {t['total_s']:.2f}s")
    if results.get("adapter"):
        print(f"adapter {results['adapter']['kind']}: {results['adapter']['hyperparams']}")
    if "output" in results:
        print(f"results written to {results['output']}")
    return 0


def _add_zeroshot(sub) -> None:
    import os

    p = sub.add_parser("zeroshot", help="zero-shot (or few-shot adapter) image classification with CLIP",
                       description="Evaluate a CLIP on an image classification dataset, CLIP_benchmark style. "
                       "With no --model the tiny CLIP shipped with mmadapters is used; --dataset synth-shapes "
                       "generates its images on first use.")
    add = p.add_argument
    add("--model", default=None, help="open_clip model name, local-dir:DIR or hf-hub:org/repo (default: the shipped tiny CLIP)")
    add("--pretrained", default=None, help="pretrained tag or local weights file for a built-in model name")
    add("--dataset", default="synth-shapes",
        help="imagefolder, csv, coop, wds, or a generated task such as synth-shapes (default: synth-shapes)")
    add("--dataset-root", default=None, help="dataset location (for generated tasks default: a folder in the cache dir)")
    add("--split", default="test", help="split to evaluate (default: test)")
    add("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    add("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    add("--templates", default=None, help="templates file, one per line with {c} (default: <root>/templates.txt, "
        "<root>/zeroshot_classification_templates.txt, else a built-in set)")
    add("--classnames", default=None, help="class names file, one per line in label order (default: "
        "<root>/classnames.txt, else the dataset's own names)")
    add("--output", default="{dataset}_{model}_{task}.json",
        help="results JSON path; {dataset} {model} {pretrained} {task} are filled in")
    add("--predictions", default=None, help="write one JSON line per image (path, label, prediction, top5) here")
    add("--device", default="cpu", help="cpu or cuda (default: cpu)")
    add("--adapter", default="none", choices=["none", "tip", "tip-f", "caps"], help="few-shot adapter (default: none)")
    add("--shots", type=int, default=16, help="support images per class for --adapter (default: 16)")
    add("--support-root", default=None, help="image folder of support images (default: the dataset's train split)")
    add("--captions", default=None, help="captions JSON lines for --adapter caps (default: <root>/captions.jsonl)")
    add("--val-split", default="val", help="split the adapter's hyperparameters are tuned on (default: val)")
    add("--on-error", default="skip", choices=["skip", "fail"], help="unreadable images: skip and count them, or fail")
    add("--cache-dir", default=None, help="classifier/dataset/weights cache (default: $MMADAPTERS_CACHE or ~/.cache/mmadapters)")
    add("--seed", type=int, default=0, help="seed for shot sampling, Tip-F training, random init (default: 0)")
    add("--overwrite", action="store_true", help="replace an output file that holds a different run's results")
    p.set_defaults(func=_zeroshot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmadapters", description="Parameter-efficient adapters for "
                                     "vision-language and speech models.")
    parser.add_argument("--version", action="store_true", help="print the library version and exit")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="demonstrate the adapter core on a small transformer")
    demo.add_argument("--output", default="out/demo", help="directory for the saved adapters (default: out/demo)")
    demo.add_argument("--steps", type=int, default=60, help="training steps for each adapter (default: 60)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(func=_demo)
    _add_zeroshot(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from mmadapters import __version__

        print(__version__)
        return 0
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
