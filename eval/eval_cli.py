"""``mmadapters eval <task>``: every evaluator behind one command and one results schema (torch-free).

Each modality registers its tasks from a light module (``register(sub)``); the heavy evaluator is imported
only when its task runs. Every task writes :mod:`mmadapters.eval.results_schema` results, records samples
as it goes (:mod:`mmadapters.eval.sample_runner`, so a rerun after a crash resumes) and, under torchrun,
shards the samples over the ranks with rank 0 writing the file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

# (module, tasks it registers) — the modules are light; see each one's register()
TASK_MODULES = (
    ("mmadapters.eval.eval_clip_args", ("zeroshot", "fewshot")),
    ("mmadapters.eval.eval_vl_args", ("vqa", "gqa", "nlvr", "caption")),
    ("mmadapters.eval.eval_video_args", ("videoqa", "dfer")),
    ("mmadapters.eval.eval_asr_args", ("asr",)),
)


def add_common_args(p: argparse.ArgumentParser, *, default_output: str) -> None:
    """The flags every evaluation task takes."""
    add = p.add_argument
    add("--output", default=default_output, help=f"results JSON (default: {default_output})")
    add("--overwrite", action="store_true", help="replace an output file that holds a different run's results")
    add("--restart", action="store_true", help="discard the samples recorded by an interrupted earlier run of this "
        "output instead of resuming from them")
    add("--fail-fast", action="store_true", help="stop at the first unreadable sample instead of skipping and counting it")
    add("--device", default="cpu", help="cpu or cuda (default: cpu; under torchrun, cuda means each rank's GPU)")
    add("--batch-size", type=int, default=16, help="samples per batch (default: %(default)s)")
    add("--seed", type=int, default=0, help="random seed (default: 0)")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_guarded(task: str, fn: Callable[[], Any]) -> int:
    """Run ``fn``; a user error becomes ``mmadapters eval <task>: error: ...`` and exit code 2."""
    try:
        fn()
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mmadapters eval {task}: error: {message}", file=sys.stderr)
        return 2
    return 0


def print_summary(results: dict[str, Any], *, limit: int = 8) -> None:
    """A few readable lines: identification, main metrics, counts, where the file went."""
    metrics = results["metrics"]
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in list(metrics.items())[:limit])
    c, t = results["counts"], results["timings"]
    print(f"{results['dataset']} / {results['model']} / {results['task']}: {shown}")
    resumed = f", {c['resumed']} taken from an interrupted run" if c.get("resumed") else ""
    print(f"{c['evaluated']} of {c['total']} samples evaluated, {c['skipped']} skipped{resumed}; "
          f"total {t.get('total_s', float('nan')):.1f}s")
    for entry in results["skipped"][:3]:
        print(f"  skipped {entry['id']}: {entry['reason']}")
    if c["skipped"] > 3:
        print(f"  ... {c['skipped'] - 3} more in the results file")
    if results.get("output"):
        print(f"results written to {results['output']}")


def add_eval_parser(sub) -> None:
    import importlib

    p = sub.add_parser("eval", help="evaluate on a benchmark task; one results JSON schema for every task",
                       description="Evaluate a backbone (with adapters) on a task. Every task writes the same results "
                       "schema (CLIP_benchmark's dataset/model/pretrained/task/metrics plus counts, skipped samples "
                       "with reasons, settings, version, git commit, timings), records finished samples so an "
                       "interrupted run resumes, and shards samples over ranks under torchrun.")
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True
    for module, _ in TASK_MODULES:
        importlib.import_module(module).register(tasks)
