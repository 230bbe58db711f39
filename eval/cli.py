"""The ``mmadapters`` command line. Subcommands import their heavy dependencies only when they run."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from mmadapters.demo import run_demo

    run_demo(output=args.output, steps=args.steps, seed=args.seed)
    return 0


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
