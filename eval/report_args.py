"""The ``mmadapters report`` subcommand's arguments (no torch, no matplotlib: the work is in
:mod:`mmadapters.eval.report`, imported when the command runs)."""

from __future__ import annotations

import argparse

from .report import DEFAULT_GROUP_BY, GROUP_FIELDS  # stdlib-only at import time


def _run(args: argparse.Namespace) -> int:
    from .report import run_report

    return run_report(args)


def add_report_parser(sub) -> None:
    """Add ``report`` to the subparsers object ``sub`` (from ``parser.add_subparsers()``)."""
    p = sub.add_parser(
        "report", help="merge results files into one table (markdown, CSV) and draw PNG plots",
        description="Merge results files into one table, one row per run (task, dataset, model, main metric, "
        "evaluated/skipped counts, trainable parameters and their share, time, git commit), sorted by task, "
        "dataset, model. Reads the shared results schema of `mmadapters eval` (and `fewshot-compare`), "
        "train_summary.json of `mmadapters train`, and benchmark reports (bench/out/*.json: ratios against a "
        "peer). The markdown goes to stdout; notes to stderr.",
        epilog="Plots (with --plots DIR, only where the data exists): params_<group>.png (metric vs trainable "
        "parameters, log x), wer_by_language_<group>.png (ASR runs), bench_<file>.png (benchmark ratios, line at "
        "1.0). A file named on the command line that is not a results file is an error (the output of a removed "
        "command says which `mmadapters eval <task>` re-runs it); unrecognized files found in a directory or by a "
        "glob are skipped with a warning (--strict: an error).")
    add = p.add_argument
    add("results", nargs="+", metavar="RESULTS",
        help="results files, directories (searched recursively for *.json) or glob patterns (quote them; ** recurses)")
    add("--markdown", default=None, metavar="FILE", help="also write the markdown table to FILE")
    add("--csv", default=None, metavar="FILE", help="write the table as CSV to FILE (every metric in its own column)")
    add("--plots", default=None, metavar="DIR", help="write PNG plots into DIR (created if missing)")
    add("--metric", action="append", default=None, metavar="NAME[,NAME]",
        help="metric column(s) of the table, repeatable or comma-separated; the first is the y axis of the "
        "parameters plot (default: each run's main metric)")
    add("--group-by", nargs="+", default=list(DEFAULT_GROUP_BY), choices=GROUP_FIELDS, metavar="FIELD",
        help=f"fields that make one plot per group and lead the sort order; any of {', '.join(GROUP_FIELDS)} "
        "(default: task dataset)")
    add("--strict", action="store_true", help="fail on any file that is not a results file (default: skip files "
        "found by directory/glob expansion with a warning)")
    add("--quiet", action="store_true", help="do not print the markdown table to stdout")
    p.set_defaults(func=_run)
