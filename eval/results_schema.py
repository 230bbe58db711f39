"""The one results schema every ``mmadapters eval <task>`` writes (torch-free).

CLIP_benchmark's keys first, then what a reader needs to trust and reproduce a number::

    {"schema": "mmadapters.results/1",
     "dataset", "model", "pretrained", "task",          # CLIP_benchmark's identification keys
     "metrics": {name: number | null},                  # flat; the task's main metric first; null: undefined
     "counts": {"total", "evaluated", "skipped", ...},  # every sample is evaluated or skipped
     "skipped": [{"id", "reason"}],                     # one entry per skipped sample
     "per_group": {group: {metric: number}} | null,     # per language / per task / per class / per question type
     "parameters": {"trainable", "total", ...} | null,  # of the evaluated model with its adapters
     "settings": {...},                                 # everything the run depends on
     "timings": {"total_s", ...},                       # seconds
     "library": {"name", "version"}, "git_commit", "git_dirty", "created", "command", "run_key"}

``run_key`` hashes the identification keys and the settings: two files with the same key hold the same run,
which is what the overwrite guard and resumable evaluation check. A number that is not finite (acc5 with fewer
than 5 classes is NaN) is null, in the returned dict as in the file: a results file is always valid JSON.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SCHEMA = "mmadapters.results/1"
TASKS = ("zeroshot_classification", "fewshot_classification", "fewshot_comparison", "asr", "videoqa_multiple_choice",
         "dfer", "vqa", "gqa", "nlvr", "captioning")
REQUIRED_COUNTS = ("total", "evaluated", "skipped")


class ResultsFormatError(ValueError):
    """A results file (or a results dict about to be written) that does not follow the schema."""


def run_key(*, dataset: str, model: str, pretrained: str | None, task: str, settings: Mapping[str, Any]) -> str:
    """A short stable hash of what a run depends on."""
    payload = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout the library runs from; (None, None) for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None, None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mmadapters")
    except Exception:  # noqa: BLE001 - running from a source tree that was never installed
        return "unknown"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def jsonable(value: Any) -> Any:
    """JSON-able plain values: tensors and numpy arrays/scalars via ``.tolist()`` (a 0-d one gives a number),
    tuples as lists, paths as strings, anything else unknown as its ``str``."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return str(value)


def build_results(*, dataset: str, model: str, pretrained: str | None, task: str, metrics: Mapping[str, float],
                  counts: Mapping[str, int], skipped: Sequence[Mapping[str, Any]] = (), settings: Mapping[str, Any],
                  timings: Mapping[str, float], parameters: Mapping[str, Any] | None = None,
                  per_group: Mapping[str, Mapping[str, float]] | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A results dict in the shared schema (validated). ``extra`` keys go at the top level after the rest."""
    settings = jsonable(dict(settings))
    commit, dirty = git_state()
    results: dict[str, Any] = {
        "schema": SCHEMA, "dataset": str(dataset), "model": str(model),
        "pretrained": None if pretrained is None else str(pretrained), "task": task,
        "metrics": jsonable(dict(metrics)), "counts": jsonable(dict(counts)),
        "skipped": [jsonable(dict(s)) for s in skipped],
        "per_group": None if per_group is None else jsonable({str(k): dict(v) for k, v in per_group.items()}),
        "parameters": None if parameters is None else jsonable(dict(parameters)),
        "settings": settings, "timings": jsonable(dict(timings)),
        "library": {"name": "mmadapters", "version": _version()}, "git_commit": commit, "git_dirty": dirty,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else None,
        "run_key": run_key(dataset=str(dataset), model=str(model), pretrained=pretrained, task=task, settings=settings),
    }
    for key, value in (extra or {}).items():
        if key in results:
            raise ResultsFormatError(f"extra key {key!r} would replace the schema field of the same name")
        results[key] = jsonable(value)
    from .results_io import null_non_finite

    return validate_results(null_non_finite(results), "<results being written>")


def validate_results(obj: Any, source: str) -> dict[str, Any]:
    """Check ``obj`` against the schema; errors name ``source`` (a file) and the field."""

    def fail(field: str, expected: str, got: Any = ...) -> ResultsFormatError:
        shown = "" if got is ... else f", got {got!r}"[:200]
        return ResultsFormatError(f"{source}: {field}: expected {expected}{shown}")

    if not isinstance(obj, Mapping):
        raise fail("(top level)", "a JSON object", type(obj).__name__)
    if obj.get("schema") != SCHEMA:
        raise fail("schema", f"{SCHEMA!r}", obj.get("schema"))
    for key in ("dataset", "model", "task"):
        if not isinstance(obj.get(key), str) or not obj.get(key):
            raise fail(key, "a non-empty string", obj.get(key))
    if obj.get("pretrained") is not None and not isinstance(obj["pretrained"], str):
        raise fail("pretrained", "a string or null", obj["pretrained"])
    metrics = obj.get("metrics")
    if not isinstance(metrics, Mapping) or not metrics:
        raise fail("metrics", "a non-empty object of name -> number", metrics)
    for name, value in metrics.items():
        if value is not None and not _number(value):
            raise fail(f"metrics.{name}", "a number (or null where undefined)", value)
    counts = obj.get("counts")
    if not isinstance(counts, Mapping):
        raise fail("counts", "an object", counts)
    for name in REQUIRED_COUNTS:
        if not isinstance(counts.get(name), int) or isinstance(counts.get(name), bool) or counts[name] < 0:
            raise fail(f"counts.{name}", "a non-negative integer", counts.get(name))
    if counts["evaluated"] + counts["skipped"] != counts["total"]:
        raise fail("counts", f"evaluated + skipped == total ({counts['evaluated']} + {counts['skipped']} != {counts['total']})")
    skipped = obj.get("skipped")
    if not isinstance(skipped, list):
        raise fail("skipped", "a list of {id, reason}", skipped)
    for i, entry in enumerate(skipped):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("reason"), str) or "id" not in entry:
            raise fail(f"skipped[{i}]", "an object with id and reason", entry)
    if len(skipped) != counts["skipped"]:
        raise fail("skipped", f"{counts['skipped']} entries (counts.skipped)", len(skipped))
    per_group = obj.get("per_group")
    if per_group is not None:
        if not isinstance(per_group, Mapping):
            raise fail("per_group", "an object of group -> {metric: number} or null", per_group)
        for group, values in per_group.items():
            if not isinstance(values, Mapping):
                raise fail(f"per_group.{group}", "an object of metric -> number", values)
            for name, value in values.items():
                if value is not None and not _number(value):
                    raise fail(f"per_group.{group}.{name}", "a number", value)
    parameters = obj.get("parameters")
    if parameters is not None and (not isinstance(parameters, Mapping)
                                   or not all(_number(parameters.get(k)) for k in ("trainable", "total"))):
        raise fail("parameters", "null or an object with numeric trainable and total", parameters)
    for key in ("settings", "timings", "library"):
        if not isinstance(obj.get(key), Mapping):
            raise fail(key, "an object", obj.get(key))
    for name, value in obj["timings"].items():
        if value is not None and not _number(value):
            raise fail(f"timings.{name}", "a number of seconds (or null)", value)
    if not isinstance(obj.get("run_key"), str):
        raise fail("run_key", "a string", obj.get("run_key"))
    return dict(obj)


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a results file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such results file") from None
    except UnicodeDecodeError as e:
        raise ResultsFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultsFormatError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # integers over Python's digit limit; absurdly deep nesting
        raise ResultsFormatError(f"{path}: not a readable results file ({type(e).__name__}: {str(e)[:120]})") from None
    return validate_results(obj, str(path))


def is_finite_number(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


def write_results(path: str | os.PathLike, results: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Validate and write ``results`` atomically; an existing file of another run is kept unless ``overwrite``."""
    from mmadapters.atomic import atomic_write_bytes

    from .results_io import check_overwrite, json_bytes

    path = Path(path)
    validate_results(results, str(path))
    check_overwrite(path, results["run_key"], overwrite)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json_bytes(results))
    return path
