"""``mmadapters eval <task>``: every evaluator behind one command and one results schema (torch-free).

Each modality registers its tasks from a light module (``register(sub)``); the heavy evaluator is imported
only when its task runs. Every task writes :mod:`mmadapters.eval.results_schema` results, records samples
as it goes (:mod:`mmadapters.eval.sample_runner`, so a rerun after a crash resumes) and, under torchrun,
shards the samples over the ranks with rank 0 writing the file. Before a task loads its model, its ``--output``
and ``--predictions`` are checked (:func:`check_output_paths`): two different files, in folders that take a file,
on a disk that is not full.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
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


MIN_FREE_BYTES = 1 << 20  # less free space than this on the output's disk counts as full


class OutputNotWritable(ValueError):
    """``--output`` / ``--predictions`` cannot be written: found before the model is loaded, not after the work."""


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # also hard links
    return os.path.realpath(a) == os.path.realpath(b)


def _check_writable(path: Path, flag: str) -> None:
    """A new file can be put at ``path``: its nearest existing folder (the evaluator creates the missing ones)
    takes a file, and its disk has room. A ``{field}`` of an output template is a folder that does not exist yet."""
    if path.is_dir():
        raise OutputNotWritable(f"{flag} {path}: is a folder; expected a file path")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputNotWritable(f"{flag} {path}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mmadapters-write-check.", dir=folder)
        try:
            os.write(fd, b"\0")
            os.fsync(fd)  # a full disk may accept the write and fail only here
        finally:
            os.close(fd)
            os.unlink(probe)
        stat = os.statvfs(folder)
    except OSError as e:
        raise OutputNotWritable(f"{flag} {path}: cannot write in {folder} ({e.strerror or e}); choose another {flag}") from None
    free = stat.f_bavail * stat.f_frsize
    if free < MIN_FREE_BYTES:
        raise OutputNotWritable(f"{flag} {path}: the disk of {folder} is full ({free} bytes free); free some space or "
                                f"choose another {flag}")


def check_output_paths(args: argparse.Namespace, output: str | os.PathLike | None = None) -> None:
    """What every task checks before loading its model: ``--output`` and ``--predictions`` name different files
    (and the predictions are not the output's samples log), and both can be written (:class:`OutputNotWritable`).

    ``output``: ``--output`` with its ``{fields}`` filled in, once the task knows them; before that a template is
    compared only when it has no fields."""
    template = str(output if output is not None else args.output)
    out = Path(template)
    predictions = getattr(args, "predictions", None)
    if predictions and "{" not in template:
        pred = Path(predictions)
        log = re.fullmatch(re.escape(out.name) + r"\.samples(\.rank\d+)?\.jsonl", pred.name)
        if _same_file(pred, out) or (log and _same_file(pred.parent, out.parent)):
            what = "results file" if not log else "results' samples log"
            raise ValueError(f"--predictions {predictions} and --output {template} name the same file: the predictions "
                             f"would replace the {what}; give --predictions another path")
    _check_writable(out, "--output")
    if predictions:
        _check_writable(Path(predictions), "--predictions")


def guard_outputs(task: str, fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``fn`` (a task's ``func``) after :func:`check_output_paths`; a failed check is ``fn``'s usual one-line error."""
    if getattr(fn, "checks_outputs", False):
        return fn

    def run(args: argparse.Namespace) -> int:
        return run_guarded(task, lambda: check_output_paths(args)) or fn(args)

    run.checks_outputs = True  # type: ignore[attr-defined]
    return run


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
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {'—' if v is None else v}"
                      for k, v in list(metrics.items())[:limit])
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
    for task, parser in tasks.choices.items():  # every task: outputs checked before its model is loaded
        parser.set_defaults(func=guard_outputs(task, parser.get_default("func")))
