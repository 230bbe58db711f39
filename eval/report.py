"""``mmadapters report``: many results files -> one table (markdown, CSV) and PNG plots.

Inputs (each file's shape is detected; see :func:`read_input`):

- ``results`` — the shared results schema (``"schema": "mmadapters.results/1"``) that every ``mmadapters eval
  <task>`` writes; a ``mmadapters fewshot-compare`` file (task ``fewshot_comparison``) gives one run per row of its
  ``summary`` (task x method x shots; zero-shot once per task);
- ``train_summary`` — ``train_summary.json`` of ``mmadapters train`` (best validation metrics, parameter counts);
- ``bench`` — a benchmark report (``bench/out/*.json``: ratios against a peer). Benchmarks are not runs: they
  get their own markdown table and plot, not rows of the runs table or the CSV.

Each run becomes a :class:`Run` (one table row); each benchmark a :class:`BenchReport` (a list of ratios).

Plots (PNG, matplotlib's Agg canvas, written atomically), only where the data exists:

1. ``params_<group>.png`` — the metric (``--metric`` or each group's main metric) against trainable parameters
   (log x; symmetric-log when a run has 0 trainable parameters, e.g. zero-shot), one point per run, labelled;
   one figure per group (``--group-by``, default task and dataset);
2. ``wer_by_language_<group>.png`` — per-language WER bars of ASR runs (``per_group[lang].wer``), grouped bars
   when a group holds several runs;
3. ``bench_<file>.png`` — a benchmark's ratios as horizontal bars, with a line at 1.0.

Unrecognized files: a file named on the command line that is not one of the shapes above is an error
(:class:`ReportInputError`, naming the file and what was expected); files found by expanding a directory or a
glob are skipped with a warning and counted (``--strict``: an error too). The output of a removed command
(``asr eval``, ``videoqa``, ``zeroshot`` before the shared schema) is recognized only to say so and which
``mmadapters eval <task>`` re-runs it.

This module imports no torch (``mmadapters report`` starts fast); matplotlib is imported only to plot.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmadapters.atomic import atomic_write_bytes

from .results_schema import ResultsFormatError, validate_results

COMPARISON_TASK = "fewshot_comparison"  # eval.fewshot_compare.TASK (that module imports torch; this one must not)
TRAIN_SCHEMA_PREFIX = "mmadapters.train_summary/"
GROUP_FIELDS = ("task", "dataset", "model", "pretrained", "method")
DEFAULT_GROUP_BY = ("task", "dataset")
EXPECTED_SHAPES = ("a results file of the shared schema ('schema': 'mmadapters.results/1') of `mmadapters eval`, "
                   "a train_summary.json of `mmadapters train` (best, history, parameters) or a benchmark report of "
                   "bench/*.py (command, machine, ratios)")
# Fields of a train recipe's config that name its data / model / variant (first match wins).
_DATASET_KEYS = ("dataset", "dataset_name", "task", "data", "manifest", "train_manifest", "annotations",
                 "train_annotations", "data_dir", "dataset_root", "root")
_MODEL_KEYS = ("model", "model_name", "backbone", "clip_model", "asr_model")
_METHOD_KEYS = ("method", "variant", "adapter", "adapter_kind", "kind")


class ReportInputError(ResultsFormatError):
    """A file given to ``mmadapters report`` is not readable as one of the supported shapes (names the file)."""


@dataclass
class Run:
    """One results file, normalized: what one row of the report shows."""

    source: str  # the file
    kind: str  # results | train_summary
    task: str
    dataset: str
    model: str
    pretrained: str | None = None
    method: str | None = None  # adapter / method / variant, when the file says
    metrics: dict[str, float] = field(default_factory=dict)  # flat name -> number, main metric first
    evaluated: int | None = None
    skipped: int | None = None
    trainable: int | None = None  # trainable parameters of the evaluated model/adapters
    total_params: int | None = None
    total_s: float | None = None
    git_commit: str | None = None
    per_group: dict[str, dict[str, float]] = field(default_factory=dict)  # e.g. language -> {wer, cer}

    @property
    def main_metric(self) -> str | None:
        return next(iter(self.metrics), None)

    @property
    def trainable_pct(self) -> float | None:
        """Trainable parameters in percent of the total, when both are known."""
        if self.trainable is None or not self.total_params:
            return None
        return 100.0 * self.trainable / self.total_params

    def key(self, field_name: str) -> str:
        value = getattr(self, field_name)
        return "" if value is None else str(value)


@dataclass
class BenchRatio:
    label: str  # e.g. "mixed batch K=1 B=32: ours routed / peft mixed"
    value: float


@dataclass
class BenchReport:
    """A benchmark report: the ratios it measured against its peers."""

    source: str
    name: str  # the benchmark (file stem or its "benchmark" field)
    ratios: list[BenchRatio]
    command: str | None = None


@dataclass
class Collected:
    runs: list[Run] = field(default_factory=list)
    benches: list[BenchReport] = field(default_factory=list)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (file, why) of unrecognized files


@dataclass
class ReportOutcome:
    runs: list[Run]  # sorted as in the table
    benches: list[BenchReport]
    skipped_files: list[tuple[str, str]]
    markdown: str
    written: dict[str, list[str]] = field(default_factory=dict)  # "markdown" | "csv" | "plots" -> paths


# -- small helpers --------------------------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flat_numbers(mapping: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of ``mapping``, in order (nested dicts and lists are left out)."""
    return {str(k): v for k, v in mapping.items() if _is_number(v)}


def _as_int(value: Any) -> int | None:
    return int(value) if _is_number(value) and not (isinstance(value, float) and math.isnan(value)) else None


def _as_float(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _label_of_path(value: str) -> str:
    """A dataset given as a path is shown by its last meaningful part (``data/shapes/train.jsonl`` -> ``shapes/train``)."""
    p = Path(value)
    if len(p.parts) <= 1:
        return value
    stem = p.stem if p.suffix else p.name
    return f"{p.parent.name}/{stem}" if p.parent.name else stem


def short_commit(commit: str | None) -> str:
    """The first 8 hex digits of a commit, keeping a suffix such as ``-dirty``."""
    if not commit:
        return ""
    m = re.match(r"([0-9a-fA-F]{7,64})(.*)", commit)
    return m.group(1)[:8] + m.group(2) if m else commit


def slug(text: str) -> str:
    """A file-name-safe form of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:80] or "all"


# -- reading one file -----------------------------------------------------------------------------------------

# Files of the commands that wrote their own JSON before the shared schema: the removed command (by the file's
# shape) and the `mmadapters eval` task that re-runs it.
_REMOVED_COMMANDS = {"asr": ("`mmadapters asr eval`", "asr"), "videoqa": ("`mmadapters videoqa`", "videoqa"),
                     "zeroshot": ("the old `mmadapters zeroshot`, before it wrote the shared schema", "zeroshot")}


def detect_kind(obj: Any) -> str | None:
    """The shape of a parsed JSON file: results, train_summary, bench, a key of :data:`_REMOVED_COMMANDS`
    (the output of a removed command), or None."""
    if not isinstance(obj, dict):
        return None
    schema = obj.get("schema")
    if isinstance(schema, str) and schema.startswith(TRAIN_SCHEMA_PREFIX):
        return "train_summary"
    if "schema" in obj:
        return "results"  # other schema names are refused there, naming the field
    legacy = sum(k in obj for k in ("dataset", "model", "task", "metrics"))
    if legacy >= 3 or (legacy >= 2 and "metrics" in obj):
        task = obj.get("task")
        metrics = _dict(obj, "metrics")
        if task == "asr" or "per_language" in metrics:
            return "asr"
        if task == "videoqa_multiple_choice" or "acc_by_q_type" in metrics:
            return "videoqa"
        return "zeroshot"
    if "history" in obj and ("best" in obj or "best_metrics" in obj or "parameters" in obj):
        return "train_summary"
    if "command" in obj and ("machine" in obj or "wall_seconds" in obj or "benchmark" in obj):
        return "bench"
    return None


def read_input(path: str | os.PathLike) -> Run | list[Run] | BenchReport:
    """Read one file as a :class:`Run` (a list of them for a fewshot-compare file) or a :class:`BenchReport`.

    Raises :class:`ReportInputError` (naming the file, and the field where one is missing or of the wrong
    type) when the file is not JSON or not one of the supported shapes.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ReportInputError(f"{source}: not a UTF-8 text file ({e.reason}); expected a JSON results file") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportInputError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                               f"expected {EXPECTED_SHAPES}") from e
    except (ValueError, RecursionError) as e:  # an integer of > 4300 digits; nesting deeper than the parser's stack
        raise ReportInputError(f"{source}: JSON not readable ({type(e).__name__}: {str(e)[:120]}); "
                               f"expected {EXPECTED_SHAPES}") from e
    kind = detect_kind(obj)
    if kind is None:
        what = f"a JSON {type(obj).__name__}" + (f" with keys {sorted(obj)[:8]}" if isinstance(obj, dict) else "")
        raise ReportInputError(f"{source}: not a results file ({what}); expected {EXPECTED_SHAPES}")
    if kind in _REMOVED_COMMANDS:
        command, task = _REMOVED_COMMANDS[kind]
        raise ReportInputError(f"{source}: the output of a removed command ({command}; no 'schema' field); "
                               f"re-run it with `mmadapters eval {task}`, which writes the shared results schema")
    return _READERS[kind](obj, source)


def _read_results(obj: dict[str, Any], source: str) -> Run | list[Run]:
    try:  # the schema's own validator is the authority: it names the field (schema, metrics.<name>, counts...)
        obj = validate_results(obj, source)
    except ResultsFormatError as e:
        raise ReportInputError(str(e)) from e
    if obj["task"] == COMPARISON_TASK:
        return _comparison_runs(obj, source)
    metrics = {name: math.nan if value is None else value for name, value in obj["metrics"].items()}  # null: undefined
    counts = obj["counts"]
    parameters = _dict(obj, "parameters")
    timings = _dict(obj, "timings")
    per_group = _dict(obj, "per_group")
    settings = _dict(obj, "settings")
    return Run(source=source, kind="results", task=obj["task"], dataset=obj["dataset"], model=obj["model"],
               pretrained=_str(obj, "pretrained"),
               method=_results_method(obj, settings, parameters), metrics=dict(metrics),
               evaluated=counts["evaluated"], skipped=counts["skipped"],
               trainable=_as_int(parameters.get("trainable")), total_params=_as_int(parameters.get("total")),
               total_s=_as_float(timings.get("total_s")), git_commit=_commit(obj),
               per_group={str(g): _flat_numbers(v) for g, v in per_group.items() if isinstance(v, dict)})


def _comparison_runs(obj: dict[str, Any], source: str) -> list[Run]:
    """The rows of a ``mmadapters fewshot-compare`` file's ``summary`` as runs: dataset = the generated task, method
    ``<method> <K>-shot`` (zero-shot once per task), metrics = the means over seeds, their std and the seed count."""
    summary = obj.get("summary")
    if not isinstance(summary, list) or not summary:
        raise ReportInputError(f"{source}: field 'summary' is {_short(summary)}; expected the comparison's rows")
    runs, seen = [], set()
    for i, row in enumerate(summary):
        if (not isinstance(row, dict) or not isinstance(row.get("task"), str) or not isinstance(row.get("method"), str)
                or not isinstance(row.get("shots"), int)):
            raise ReportInputError(f"{source}: field 'summary[{i}]' is {_short(row)}; expected an object with task, "
                                   "method, shots and <metric>_mean / <metric>_std numbers")
        zeroshot = row["method"] == "zeroshot"
        key = (row["task"], row["method"], 0 if zeroshot else row["shots"])
        if key in seen:  # zero-shot does not depend on shots: the summary repeats it in every shots row
            continue
        seen.add(key)
        metrics = {}
        for name in ("acc1", "mean_per_class_recall"):
            for suffix, label in (("mean", name), ("std", f"{name}_std")):
                if _is_number(row.get(f"{name}_{suffix}")):
                    metrics[label] = row[f"{name}_{suffix}"]
        if _is_number(row.get("n")):
            metrics["seeds"] = row["n"]
        test = _dict(_dict(_dict(_dict(obj, "tasks"), row["task"]), "counts"), "test")
        runs.append(Run(source=source, kind="results", task="zeroshot_classification" if zeroshot else "fewshot_classification",
                        dataset=row["task"], model=obj["model"], pretrained=_str(obj, "pretrained"),
                        method="zeroshot" if zeroshot else f"{row['method']} {row['shots']}-shot", metrics=metrics,
                        evaluated=_as_int(test.get("evaluated")), skipped=_as_int(test.get("skipped")),
                        trainable=0 if zeroshot else None, git_commit=_commit(obj)))
    return runs


def _results_method(obj: Mapping[str, Any], settings: Mapping[str, Any], parameters: Mapping[str, Any]) -> str | None:
    """The method of a shared-schema run, where the evaluator recorded one: ``settings.method|variant|kind``
    (video, few-shot CLIP), the ``adapter.kind`` extra, ``parameters.variant`` (VL-Adapter), else the name of
    the ``settings.adapters`` directory (a path, or ``{path, files}`` as ``eval asr`` records it)."""
    adapters = settings.get("adapters")
    adapters = adapters.get("path") if isinstance(adapters, dict) else adapters
    return (_first_str(settings, _METHOD_KEYS) or _first_str(_dict(obj, "adapter"), ("kind",))
            or _first_str(parameters, ("variant",))
            or (Path(adapters).name if isinstance(adapters, str) and adapters else None))


def _dict(obj: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def _str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _first_str(mapping: Mapping[str, Any], keys: Iterable[str]) -> str | None:
    for key in keys:
        value = mapping.get(key)
        if isinstance(value, str) and value and value.lower() != "none":
            return value
    return None


def _read_train_summary(obj: dict[str, Any], source: str) -> Run:
    """``train_summary.json`` (:class:`mmadapters.training.trainer.TrainSummary`): the best validation metrics
    (the selection metric first; ``final_metrics`` when no validation improved), parameter counts, timings.

    Also accepted: ``best: {step, metrics: {...}}`` or ``best: {step, <metric>: number}``, and, without any of
    these, the last ``history`` entry's metrics. The row's task is ``train:<recipe>`` (``recipe`` or
    ``config.recipe_name`` where the summary names it), its dataset and model come from the recipe config.
    """
    config = _dict(obj, "config")
    trainer = _dict(config, "trainer")
    recipe_cfg = _dict(config, "recipe")
    best = obj.get("best")
    if isinstance(obj.get("best_metrics"), dict):
        metrics = _flat_numbers(obj["best_metrics"])
    elif isinstance(best, dict) and isinstance(best.get("metrics"), dict):
        metrics = _flat_numbers(best["metrics"])
    elif isinstance(best, dict):
        metrics = {k: v for k, v in _flat_numbers(best).items() if k not in ("step", "epoch")}
    elif isinstance(obj.get("final_metrics"), dict):
        metrics = _flat_numbers(obj["final_metrics"])
    else:
        history = obj.get("history")
        if not isinstance(history, list):
            raise ReportInputError(f"{source}: field 'best_metrics' missing and field 'history' is {_short(history)}; "
                                   "expected the best validation metrics or a list of evaluations")
        last = history[-1] if history and isinstance(history[-1], dict) else {}
        values = last.get("metrics", last)
        metrics = {k: v for k, v in _flat_numbers(values if isinstance(values, dict) else {}).items() if k != "step"}
    select = (_first_str(obj, ("select_metric",)) or _first_str(best if isinstance(best, dict) else {}, ("metric",))
              or _first_str(trainer, ("select_metric",)))
    if select in metrics:
        metrics = {select: metrics[select], **{k: v for k, v in metrics.items() if k != select}}
    parameters = obj.get("parameters") or obj.get("parameter_counts") or {}
    parameters = parameters if isinstance(parameters, dict) else {}
    timings = _dict(obj, "timings")
    recipe = _first_str(obj, ("recipe", "recipe_name")) or _first_str(config, ("recipe_name", "name"))
    dataset = _first_str(recipe_cfg, _DATASET_KEYS)
    total_s = _as_float(timings.get("total_s"))
    if total_s is None:
        total_s = _as_float(timings.get("train_s"))
    return Run(source=source, kind="train_summary", task=f"train:{recipe}" if recipe else "train",
               dataset=_label_of_path(dataset) if dataset else "-",
               model=_first_str(recipe_cfg, _MODEL_KEYS) or "-", pretrained=_first_str(recipe_cfg, ("pretrained",)),
               method=_first_str(recipe_cfg, _METHOD_KEYS) or recipe, metrics=metrics,
               trainable=_as_int(parameters.get("trainable")), total_params=_as_int(parameters.get("total")),
               total_s=total_s, git_commit=_commit(obj))


def _commit(obj: Mapping[str, Any]) -> str | None:
    commit = obj.get("git_commit")
    if not isinstance(commit, str) or not commit:
        return None
    return commit + ("-dirty" if obj.get("git_dirty") is True else "")


def _bench_context(node: Mapping[str, Any]) -> str:
    """What a ratios dict belongs to: its section / model / mode, and small settings such as K and B."""
    parts = [str(node[k]) for k in ("section", "model", "mode") if isinstance(node.get(k), str)]
    parts += [f"{k}={node[k]}" for k in ("K", "B") if _is_number(node.get(k))]
    return " ".join(parts)


def _bench_ratios(node: Any, context: str, out: list[BenchRatio], peer: str | None) -> None:
    if isinstance(node, list):
        for item in node:
            _bench_ratios(item, context, out, peer)
        return
    if not isinstance(node, dict):
        return
    here = _bench_context(node) or context
    prefix = f"{here}: " if here else ""
    for key, value in node.items():
        if key == "ratios" and isinstance(value, dict):  # bench/core.py, bench/asr.py
            out.extend(BenchRatio(f"{prefix}{name}", float(v)) for name, v in value.items() if _is_number(v))
        elif key == "variants" and isinstance(value, dict):  # bench/video.py: variant -> {ratio vs the peer}
            for name, entry in value.items():
                if isinstance(entry, dict) and _is_number(entry.get("ratio")) and name != peer:
                    against = f" vs {peer}" if peer else ""
                    out.append(BenchRatio(f"{prefix}{name}{against}", float(entry["ratio"])))
        elif key.startswith("speedup") and _is_number(value):  # bench/zeroshot.py
            out.append(BenchRatio(f"{prefix}{key}", float(value)))
        elif isinstance(value, dict | list) and key not in ("machine", "settings", "target"):
            _bench_ratios(value, here, out, peer)


def _read_bench(obj: dict[str, Any], source: str) -> BenchReport:
    ratios: list[BenchRatio] = []
    _bench_ratios(obj, "", ratios, _str(obj, "peer"))
    if not ratios:
        raise ReportInputError(f"{source}: benchmark report holds no ratios; expected 'ratios' objects, "
                               "'variants' with a 'ratio' each, or 'speedup_*' numbers (see bench/*.py)")
    name = obj.get("benchmark") if isinstance(obj.get("benchmark"), str) else Path(source).stem
    return BenchReport(source=source, name=name, ratios=ratios,
                       command=_str(obj, "command"))


_READERS = {"results": _read_results, "train_summary": _read_train_summary, "bench": _read_bench}


# -- many files -----------------------------------------------------------------------------------------------

def expand_inputs(items: Sequence[str | os.PathLike]) -> list[tuple[Path, bool]]:
    """Files to read, each with whether it was named explicitly (``True``) or found by expansion.

    A directory is searched recursively for ``*.json`` (hidden folders left out); an item with ``*``, ``?``
    or ``[`` that is not an existing path is a glob (``**`` recursive). Order: as given, each expansion
    sorted; a file reached twice is read once. A missing file, or a glob or directory that matches no
    JSON file, is a FileNotFoundError.
    """
    out: list[tuple[Path, bool]] = []
    seen: set[Path] = set()

    def add(p: Path, explicit: bool) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append((p, explicit))

    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.json")
                           if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no *.json files")
            for f in found:
                add(f, False)
        elif p.is_file():
            add(p, True)
        elif any(c in str(item) for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            files = [m for m in matches if m.is_file()]
            for d in (m for m in matches if m.is_dir()):
                files += sorted(f for f in d.rglob("*.json") if f.is_file())
            if not files:
                raise FileNotFoundError(f"{item}: no file matches this pattern")
            for f in files:
                add(f, False)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return out


def collect(items: Sequence[str | os.PathLike], *, strict: bool = False, warn=None) -> Collected:
    """Read every input (see :func:`expand_inputs`). Unrecognized files found by expansion are skipped and
    listed in ``skipped_files`` (with ``warn(message)`` called for each) unless ``strict``; an unrecognized
    file named explicitly always raises :class:`ReportInputError`."""
    collected = Collected()
    for path, explicit in expand_inputs(items):
        try:
            item = read_input(path)
        except ReportInputError as e:
            if explicit or strict:
                raise
            collected.skipped_files.append((str(path), str(e)))
            if warn is not None:
                warn(f"skipped {e}")
            continue
        if isinstance(item, list):
            collected.runs.extend(item)
        else:
            (collected.runs if isinstance(item, Run) else collected.benches).append(item)
    return collected


def sort_runs(runs: Iterable[Run], group_by: Sequence[str] = ()) -> list[Run]:
    """Stable sort by the group-by fields, then (task, dataset, model); ties keep the input order."""
    keys = [*group_by, *(k for k in ("task", "dataset", "model") if k not in group_by)]
    return sorted(runs, key=lambda r: tuple(r.key(k) for k in keys))


def group_runs(runs: Iterable[Run], group_by: Sequence[str]) -> dict[tuple[str, ...], list[Run]]:
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.key(k) for k in group_by), []).append(run)
    return groups


# -- table ----------------------------------------------------------------------------------------------------

def _fmt_value(value: float | None) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):  # undefined (null in the file, e.g. acc5 with fewer than 5 classes)
        return "—"
    return f"{value:.4f}"


def _fmt_pct(pct: float | None) -> str:
    if pct is None:
        return ""
    return f"{pct:.3g}%" if pct < 10 else f"{pct:.1f}%"


def table_rows(runs: Sequence[Run], metrics: Sequence[str] = ()) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the markdown table. With ``metrics`` one column per named metric (blank where a run
    lacks it), else a ``metric`` column (each run's main metric) and its ``value``."""
    header = ["task", "dataset", "model", "pretrained", "method"]
    header += list(metrics) if metrics else ["metric", "value"]
    header += ["evaluated", "skipped", "trainable", "trainable %", "time (s)", "git", "file"]
    rows = []
    for r in runs:
        row = [r.task, r.dataset, r.model, r.pretrained or "", r.method or ""]
        if metrics:
            row += [_fmt_value(r.metrics.get(m)) for m in metrics]
        else:
            main = r.main_metric
            row += [main or "", _fmt_value(r.metrics.get(main)) if main else ""]
        row += ["" if r.evaluated is None else str(r.evaluated), "" if r.skipped is None else str(r.skipped),
                "" if r.trainable is None else f"{r.trainable:,}", _fmt_pct(r.trainable_pct),
                "" if r.total_s is None else f"{r.total_s:.1f}", short_commit(r.git_commit), r.source]
        rows.append(row)
    return header, rows


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Iterable[int] = ()) -> str:
    """A pipe table with padded columns (numeric columns right-aligned)."""
    numeric = set(numeric)
    cells = [[_escape(c) for c in header]] + [[_escape(c) for c in row] for row in rows]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(row, widths, strict=True))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def format_markdown(runs: Sequence[Run], benches: Sequence[BenchReport] = (), metrics: Sequence[str] = (),
                    skipped_files: Sequence[tuple[str, str]] = ()) -> str:
    """The report as markdown: the runs table, then the benchmark ratios, then the skipped files."""
    parts = []
    if runs:
        header, rows = table_rows(runs, metrics)
        textual = {"task", "dataset", "model", "pretrained", "method", "metric", "git", "file"}
        parts.append(markdown_table(header, rows, [i for i, h in enumerate(header) if h not in textual]))
    if benches:
        rows = [[b.name, r.label, f"{r.value:.3f}"] for b in benches for r in b.ratios]
        parts.append("Benchmark ratios\n\n" + markdown_table(["benchmark", "ratio", "value"], rows, [2]))
    if skipped_files:
        parts.append(f"{len(skipped_files)} file(s) skipped (not results):\n"
                     + "\n".join(f"- {_escape(f)}" for f, _ in skipped_files))
    return "\n\n".join(parts) + "\n"


CSV_COLUMNS = ("file", "kind", "task", "dataset", "model", "pretrained", "method", "main_metric", "main_value",
               "evaluated", "skipped", "trainable", "total_params", "trainable_pct", "total_s", "git_commit")


def csv_text(runs: Sequence[Run]) -> str:
    """One CSV row per run: :data:`CSV_COLUMNS`, then ``metric:<name>`` for every metric any run has
    (numbers unrounded; empty where unknown)."""
    names = list(dict.fromkeys(name for r in runs for name in r.metrics))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *(f"metric:{n}" for n in names)])
    for r in runs:
        main = r.main_metric
        values = [r.source, r.kind, r.task, r.dataset, r.model, r.pretrained, r.method, main,
                  r.metrics.get(main) if main else None, r.evaluated, r.skipped, r.trainable, r.total_params,
                  r.trainable_pct, r.total_s, r.git_commit]
        values += [r.metrics.get(n) for n in names]
        writer.writerow(["" if v is None else v for v in values])
    return buf.getvalue()


# -- writing --------------------------------------------------------------------------------------------------

def _atomic_write(path: Path, data: bytes) -> None:
    """``data`` into ``path`` atomically, with the mode a plain ``open()`` gives (the umask honoured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    _atomic_write(Path(path), text.encode("utf-8"))


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _atomic_write(path, buf.getvalue())


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no pyplot state
    return fig


def _short_model(model: str) -> str:
    """A model named by a path (``local-dir:/a/b/tiny_clip``) shown by its last part (``local-dir:tiny_clip``)."""
    if "/" not in model or len(model) <= 24 or model.startswith("hf-hub:"):
        return model
    scheme, sep, rest = model.rpartition(":") if re.match(r"^[a-z][a-z-]*:", model) else ("", "", model)
    return f"{scheme}{sep}{Path(rest).name}"


def _run_labels(runs: Sequence[Run]) -> list[str]:
    """Short labels that tell the runs of one plot apart: model [method], then the file (relative to the files'
    common folder) where that is still ambiguous."""
    labels = [_short_model(r.model) + (f" [{r.method}]" if r.method else "") for r in runs]
    out = list(labels)
    for label in set(labels):
        same = [i for i, other in enumerate(labels) if other == label]
        if len(same) > 1:
            paths = [os.path.abspath(runs[i].source) for i in same]
            common = os.path.commonpath(paths)
            for i, p in zip(same, paths, strict=True):
                out[i] = f"{label} ({os.path.splitext(os.path.relpath(p, common))[0]})"
    return out


def _unique_path(directory: Path, stem: str, used: set[str]) -> Path:
    name, n = stem, 2
    while name in used:
        name, n = f"{stem}-{n}", n + 1
    used.add(name)
    return directory / f"{name}.png"


def plot_metric_vs_params(runs: Sequence[Run], directory: str | os.PathLike, *, metric: str | None = None,
                          group_by: Sequence[str] = DEFAULT_GROUP_BY, used: set[str] | None = None) -> list[Path]:
    """One figure per group: ``metric`` (default: the group's most common main metric) against trainable
    parameters, one labelled point per run whose parameter count and metric are known."""
    directory, used = Path(directory), used if used is not None else set()
    written = []
    for key, group in group_runs(runs, group_by).items():
        name = metric
        if name is None:
            mains = [r.main_metric for r in group if r.main_metric]
            name = max(dict.fromkeys(mains), key=mains.count) if mains else None
        points = [r for r in group if r.trainable is not None and r.trainable >= 0 and _is_number(r.metrics.get(name))
                  and math.isfinite(r.metrics[name])]
        if name is None or not points:
            continue
        fig = _new_figure(7.0, 4.5)
        ax = fig.add_subplot()
        xs, ys = [r.trainable for r in points], [r.metrics[name] for r in points]
        ax.scatter(xs, ys, zorder=3)
        middle = sorted(xs)[len(xs) // 2]
        for x, y, label in zip(xs, ys, _run_labels(points), strict=True):
            right = len(set(xs)) > 1 and x >= middle  # labels of the right half point left, to stay inside
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(-4 if right else 4, 4),
                        ha="right" if right else "left", fontsize=8)
        if min(xs) <= 0:
            ax.set_xscale("symlog", linthresh=1.0)  # 0 trainable parameters (zero-shot) stays on the axis
            ax.set_xlim(-0.5, max(10.0, 3.0 * max(xs)))
        else:
            ax.set_xscale("log")
            ax.set_xlim(min(xs) / 3.0, max(xs) * 3.0)
        ax.set_xlabel("trainable parameters" + (" (symlog: 0 = nothing trained)" if min(xs) <= 0 else ""))
        ax.set_ylabel(name)
        title = " / ".join(k for k in key if k) or "all runs"
        ax.set_title(f"{title}: {name} vs trainable parameters", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        path = _unique_path(directory, slug(f"params_{'_'.join(k for k in key if k)}_{name}"), used)
        _save_figure(fig, path)
        written.append(path)
    return written


def plot_wer_by_language(runs: Sequence[Run], directory: str | os.PathLike, *,
                         group_by: Sequence[str] = DEFAULT_GROUP_BY, used: set[str] | None = None) -> list[Path]:
    """Per-language WER bars of the ASR runs (runs with ``wer`` in their per-group metrics), one figure per
    group, one bar series per run."""
    directory, used = Path(directory), used if used is not None else set()
    asr = [r for r in runs if any("wer" in g for g in r.per_group.values())]
    written = []
    for key, group in group_runs(asr, group_by).items():
        langs = sorted({lang for r in group for lang, g in r.per_group.items() if "wer" in g})
        fig = _new_figure(max(5.0, 0.7 * len(langs) * max(1, len(group)) ** 0.5 + 2.0), 4.2)
        ax = fig.add_subplot()
        width = 0.8 / len(group)
        for i, (run, label) in enumerate(zip(group, _run_labels(group), strict=True)):
            heights = [run.per_group.get(lang, {}).get("wer", math.nan) for lang in langs]
            offsets = [j - 0.4 + width * (i + 0.5) for j in range(len(langs))]
            ax.bar(offsets, heights, width=width, label=label, zorder=3)
        ax.set_xticks(range(len(langs)), langs)
        ax.set_xlabel("language")
        ax.set_ylabel("WER")
        title = " / ".join(k for k in key if k) or "ASR"
        ax.set_title(f"{title}: WER per language", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        if len(group) > 1:
            ax.legend(fontsize=8)
        path = _unique_path(directory, slug(f"wer_by_language_{'_'.join(k for k in key if k)}"), used)
        _save_figure(fig, path)
        written.append(path)
    return written


def plot_bench_ratios(benches: Sequence[BenchReport], directory: str | os.PathLike, *,
                      used: set[str] | None = None) -> list[Path]:
    """One figure per benchmark report: its ratios as horizontal bars with a line at 1.0 (parity with the peer)."""
    directory, used = Path(directory), used if used is not None else set()
    written = []
    for bench in benches:
        ratios = [r for r in bench.ratios if math.isfinite(r.value)]
        if not ratios:
            continue
        fig = _new_figure(8.0, 1.2 + 0.35 * len(ratios))
        ax = fig.add_subplot()
        labels = [r.label for r in ratios]
        values = [r.value for r in ratios]
        ax.barh(range(len(values)), values, zorder=3)
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()  # first ratio on top, as in the report
        ax.axvline(1.0, color="black", linewidth=1.0, linestyle="--", zorder=4)
        for y, v in enumerate(values):
            ax.annotate(f"{v:.2f}", (v, y), textcoords="offset points", xytext=(3, 0), va="center", fontsize=7)
        ax.set_xlabel("ratio (1.0 = parity)")
        ax.set_title(f"benchmark: {bench.name}", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        path = _unique_path(directory, slug(f"bench_{Path(bench.source).stem}"), used)
        _save_figure(fig, path)
        written.append(path)
    return written


# -- the whole report -----------------------------------------------------------------------------------------

def make_report(inputs: Sequence[str | os.PathLike], *, markdown: str | os.PathLike | None = None,
                csv_path: str | os.PathLike | None = None, plots: str | os.PathLike | None = None,
                metrics: Sequence[str] = (), group_by: Sequence[str] = DEFAULT_GROUP_BY, strict: bool = False,
                warn=None) -> ReportOutcome:
    """Read ``inputs``, build the table, write the requested outputs. Raises FileNotFoundError for missing
    inputs, :class:`ReportInputError` for unreadable ones (see :func:`collect`) and ValueError when nothing
    usable was found or a ``group_by`` field is unknown."""
    bad = [g for g in group_by if g not in GROUP_FIELDS]
    if bad:
        raise ValueError(f"group_by {bad}: expected fields among {', '.join(GROUP_FIELDS)}")
    collected = collect(inputs, strict=strict, warn=warn)
    if not collected.runs and not collected.benches:
        raise ValueError(f"no results or benchmark reports found in {', '.join(map(str, inputs))} "
                         f"({len(collected.skipped_files)} file(s) skipped); expected {EXPECTED_SHAPES}")
    runs = sort_runs(collected.runs, group_by)
    text = format_markdown(runs, collected.benches, metrics, collected.skipped_files)
    outcome = ReportOutcome(runs=runs, benches=collected.benches, skipped_files=collected.skipped_files, markdown=text)
    if markdown is not None:
        write_text(markdown, text)
        outcome.written["markdown"] = [str(markdown)]
    if csv_path is not None:
        write_text(csv_path, csv_text(runs))
        outcome.written["csv"] = [str(csv_path)]
    if plots is not None:
        used: set[str] = set()
        written = plot_metric_vs_params(runs, plots, metric=metrics[0] if metrics else None, group_by=group_by, used=used)
        written += plot_wer_by_language(runs, plots, group_by=group_by, used=used)
        written += plot_bench_ratios(collected.benches, plots, used=used)
        outcome.written["plots"] = [str(p) for p in written]
    return outcome


def run_report(args) -> int:
    """The ``mmadapters report`` command (``args`` from :func:`mmadapters.eval.report_args.add_report_parser`)."""

    def warn(message: str) -> None:
        print(f"mmadapters report: warning: {message}", file=sys.stderr)

    metrics = [m for item in (args.metric or []) for m in item.split(",") if m.strip()]
    try:
        outcome = make_report(args.results, markdown=args.markdown, csv_path=args.csv, plots=args.plots,
                              metrics=[m.strip() for m in metrics], group_by=args.group_by, strict=args.strict,
                              warn=warn)
    except (FileNotFoundError, ValueError) as e:  # ReportInputError is a ValueError
        print(f"mmadapters report: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        sys.stdout.write(outcome.markdown)
        sys.stdout.flush()
    notes = [f"{len(outcome.runs)} run(s), {len(outcome.benches)} benchmark report(s)"
             + (f", {len(outcome.skipped_files)} file(s) skipped" if outcome.skipped_files else "")]
    for kind in ("markdown", "csv"):
        notes += [f"{kind} written to {p}" for p in outcome.written.get(kind, [])]
    if "plots" in outcome.written:
        plots = outcome.written["plots"]
        notes.append(f"{len(plots)} plot(s) written" + (":" if plots else " (no data for any plot)"))
        notes += [f"  {p}" for p in plots]
    print("\n".join(notes), file=sys.stderr)
    return 0
