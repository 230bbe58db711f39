"""The ``mmadapters`` command line. Subcommands import their heavy dependencies only when they run."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from mmadapters.demo import run_demo

    run_demo(output=args.output, steps=args.steps, seed=args.seed)
    return 0


def _add_zeroshot(sub) -> None:
    from .eval_clip_args import ZEROSHOT_DESCRIPTION, add_zeroshot_args

    # the CLIP_benchmark-style door into `mmadapters eval zeroshot`: the same flags, defaults, code and results
    p = sub.add_parser("zeroshot", help="zero-shot (or few-shot adapter) image classification with CLIP "
                       "(= mmadapters eval zeroshot)", description=ZEROSHOT_DESCRIPTION)
    add_zeroshot_args(p)


def _csv_list(kind):
    """An argparse type: a comma-separated list of ``kind`` values ("1,4,16")."""

    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        try:
            return [kind(item) for item in items]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__} values, got {text!r}") from e

    return parse


def _fewshot_compare(args: argparse.Namespace) -> int:
    from mmadapters.eval.fewshot_compare import DEFAULT_TASKS, CompareConfig, compare_fewshot, format_gates, format_table

    tasks = [t for group in args.task for t in group] if args.task else list(DEFAULT_TASKS)
    config = CompareConfig(tasks=list(dict.fromkeys(tasks)), shots=args.shots, methods=args.methods, seeds=args.seeds,
                           model=args.model, pretrained=args.pretrained, device=args.device, batch_size=args.batch_size,
                           num_workers=args.num_workers, output=args.output, markdown=args.markdown,
                           cache_dir=args.cache_dir, data_dir=args.data_dir, train_per_class=args.train_per_class,
                           val_per_class=args.val_per_class, test_per_class=args.test_per_class,
                           image_size=args.image_size, data_seed=args.data_seed, views=args.views,
                           captioner=args.captioner, generated=args.generated, overwrite=args.overwrite)
    try:
        results = compare_fewshot(config)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as e:
        print(f"mmadapters fewshot-compare: error: {e}", file=sys.stderr)
        return 2
    seeds = ",".join(str(s) for s in config.seeds)
    spread = f"mean ± std over seeds {seeds}" if len(config.seeds) > 1 else f"seed {seeds}"
    print(f"\ntest top-1 accuracy (%) of {results['model']}; hyperparameters searched on val; {spread}")
    print(format_table(results["summary"], config.methods))
    print("\n".join(format_gates(results)))
    t = results["timings"]
    print(f"total {t['total_s']:.1f}s (model load {t['model_load_s']:.1f}s, fits {t['fits_s']:.1f}s)")
    for key in ("output", "markdown"):
        if key in results:
            print(f"{key} written to {results[key]}")
    return 0


def _add_fewshot_compare(sub) -> None:
    import os

    p = sub.add_parser("fewshot-compare", help="compare zero-shot CLIP with Tip-Adapter, Tip-Adapter-F and CapS-Adapter",
                       description="Zero-shot vs few-shot adapters on generated tasks: each task is generated once, "
                       "its images and captions are encoded once, then every method is fitted on K shots per class "
                       "(per seed) with hyperparameters searched on the val split and scored on test.")
    add = p.add_argument
    add("--task", action="append", type=_csv_list(str), default=None, metavar="TASK[,TASK]",
        help="generated task(s), repeatable (default: shapes-sketch, colours-noisy, combos-heldout)")
    add("--shots", type=_csv_list(int), default=[1, 4, 16], help="shots per class, comma-separated (default: 1,4,16)")
    add("--methods", type=_csv_list(str), default=["zeroshot", "tip", "tip-f", "caps"],
        help="comma-separated subset of zeroshot,tip,tip-f,caps,susx (default: zeroshot,tip,tip-f,caps); susx: SuS-X-style "
        "baseline, support images generated from the class names only (no real shots), scored with TIP-X's KL term")
    add("--captioner", choices=["truth", "noisy", "vlt5"], default="vlt5",
        help="who captions CapS's support images: vlt5 = the shipped tiny VL-T5 (the default: the only real captioner "
        "here, as the paper captions with a multimodal LM), noisy = the generator's caption with each attribute "
        "dropped (p 0.3) or wrong (p 0.15), truth = the generator's own caption (an oracle)")
    add("--generated", type=int, default=1, help="CapS: images the generator renders from each support prompt "
        "\"A photo of {class}. {caption}\" (the paper's text-to-image support images), added to the real shots; "
        "0: the real shots and their captions only (default: 1)")
    add("--seeds", type=_csv_list(int), default=[0], help="shot-sampling seeds, comma-separated (default: 0)")
    add("--model", default=None, help="open_clip model name, local-dir:DIR or hf-hub:org/repo (default: the shipped tiny CLIP)")
    add("--pretrained", default=None, help="pretrained tag or local weights file for a built-in model name")
    add("--device", default="cpu", help="cpu or cuda (default: cpu)")
    add("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    add("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    add("--output", default="fewshot_compare.json", help="results JSON path (default: fewshot_compare.json)")
    add("--markdown", default=None, help="also write the tables as markdown here")
    add("--cache-dir", default=None, help="classifier/dataset/weights cache (default: $MMADAPTERS_CACHE or ~/.cache/mmadapters)")
    add("--data-dir", default=None, help="where tasks are generated (default: <cache dir>/datasets)")
    add("--train-per-class", type=int, default=None, help="generated train images per class (default: the task's)")
    add("--val-per-class", type=int, default=None, help="generated val images per class (default: the task's)")
    add("--test-per-class", type=int, default=None, help="generated test images per class (default: the task's)")
    add("--image-size", type=int, default=None, help="generated image side in pixels (default: the task's)")
    add("--data-seed", type=int, default=None, help="draw the generated tasks afresh from this seed, same recipe, into "
        "folders named with the seed (default: the canonical draw, seed 0)")
    add("--views", type=int, default=10, help="augmented passes (random crop, flip) over the support images: the cache "
        "keys are their mean and Tip-F trains on them (default: 10, the official code's)")
    add("--overwrite", action="store_true", help="replace an output file that holds a different comparison")
    p.set_defaults(func=_fewshot_compare)


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
    _add_fewshot_compare(sub)
    from .asr_transcribe import add_asr_parser

    add_asr_parser(sub)
    from .eval_cli import add_eval_parser

    add_eval_parser(sub)
    from .train_cli import add_train_parser

    add_train_parser(sub)
    from .report_args import add_report_parser

    add_report_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``mmadapters`` command. Run as the console script (``argv`` None), it ends the process itself once the
    command is done (:func:`_fast_exit`); called from Python, it returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from mmadapters import __version__

        print(__version__)
        return 0
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    code = args.func(args)
    if argv is None:
        _fast_exit(code)
    return code


def _fast_exit(code: int) -> None:
    """End the process without tearing the interpreter down. After torch, torchvision, open_clip and transformers
    are imported, Python's module teardown takes about a second on a 2-core CPU (measured: 4.2-4.8 s for
    ``import torch, open_clip`` and exit, 3.3-3.6 s when exiting this way) — longer than many evaluations here.
    Everything a command writes is already flushed, fsynced and renamed into place; exit handlers still run and
    the standard streams and logging are flushed. ``MMADAPTERS_SLOW_EXIT=1`` keeps the normal exit."""
    import os

    if "torch" not in sys.modules or os.environ.get("MMADAPTERS_SLOW_EXIT"):
        return
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
