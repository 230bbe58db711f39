"""Resumable, rank-sharded evaluation one sample at a time.

Every evaluated sample leaves a JSON line in ``<output>.samples.jsonl`` (one file per rank under torchrun:
``<output>.samples.rank<r>.jsonl``) as soon as its batch is done, flushed and fsynced. A run that crashes,
is killed or loses its machine leaves those lines behind; the rerun (same settings, hence the same
``run_key``) reads them, evaluates only the samples that are missing and computes the metrics over all
records, so a resumed evaluation gives the numbers an uninterrupted one gives. Once the results file is
written the evaluator removes the logs (:meth:`SampleLog.remove`).

A record is whatever the task's metric needs (label and top-5, hypothesis and reference, scores of the
candidates...), normalized through JSON so a fresh record and one read back from a log are identical. A
skipped sample is recorded too (``{"id", "skipped": reason}``) and is not retried on resume.

:func:`evaluate` is the one second half of every evaluator (``mmadapters eval zeroshot|fewshot|videoqa|dfer|asr|
vqa|gqa|nlvr|caption``): each task loads its model and samples and describes its settings, then hands over to
it. The flow, in order:

1. ``run_key`` of the task's identity (dataset, model, pretrained, task) and settings;
2. :func:`~mmadapters.eval.results_io.prepare_output`: ``--output`` filled in and checked before any work;
3. :meth:`SampleLog.open`: the records of an interrupted run of the same ``run_key`` (``--restart`` drops them);
4. :func:`run_samples`: every missing sample predicted and logged, sharded over torchrun's ranks, gathered;
5. no evaluated sample at all is an error naming the data and the first sample skipped, with its reason;
6. the task's ``summarize(outcome)``: metrics and per-group numbers from the records alone;
7. :func:`~mmadapters.eval.results_schema.build_results`: counts, skipped samples, settings, timings, parameters;
8. rank 0 writes the results file (and ``--predictions``: one JSON line per evaluated sample); the logs go.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .results_schema import jsonable

T = TypeVar("T")
LOG_SCHEMA = "mmadapters.samples/1"


def _json_line(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True)


def canonical(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as it reads back from a log (plain JSON types)."""
    return json.loads(_json_line(jsonable(record)))


def _dist():
    from mmadapters import distributed

    return distributed


class SampleLog:
    """The samples log of one results file (see the module docstring)."""

    def __init__(self, output: Path, run_key: str, done: dict[str, dict], path: Path):
        self.output, self.run_key, self.done, self.path = output, run_key, done, path
        self._file = None

    @staticmethod
    def paths(output: str | os.PathLike) -> list[Path]:
        """Every samples log of ``output`` on disk (all ranks of all earlier runs)."""
        output = Path(output)
        parent = output.parent if str(output.parent) else Path(".")
        if not parent.is_dir():
            return []
        return sorted(p for p in parent.glob(f"{output.name}.samples*.jsonl") if p.is_file())

    @classmethod
    def open(cls, output: str | os.PathLike, run_key: str, *, restart: bool = False) -> SampleLog:
        """Read the logs left by earlier runs of ``output``; ``restart`` discards them instead.

        A log of a different run (another ``run_key``: other settings, another model...) is an error
        unless ``restart``: mixing samples of two runs would give a number neither run measured.
        """
        dist = _dist()
        output = Path(output)
        done: dict[str, dict] = {}
        existing = cls.paths(output)
        if not restart:
            for path in existing:
                cls._read(path, run_key, done)
        dist.barrier()
        if restart and dist.is_main():
            for path in existing:
                path.unlink(missing_ok=True)
        dist.barrier()
        suffix = f".samples.rank{dist.rank()}.jsonl" if dist.is_distributed() else ".samples.jsonl"
        log = cls(output, run_key, done, output.with_name(output.name + suffix))
        log._claim()
        return log

    def _header(self) -> bytes:
        return (_json_line({"schema": LOG_SCHEMA, "run_key": self.run_key}) + "\n").encode()

    def _claim(self) -> None:
        """Create this rank's log with its header now (not at the first append), atomically: the file appears
        with its header or not at all, so a second run opening the same output sees whose log it is."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._header())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)  # fails when the log exists: then it must be this run's
            except FileExistsError:
                if self.path.stat().st_size == 0:  # created empty by an older version
                    with open(self.path, "r+b") as f:
                        f.write(self._header())
        finally:
            os.unlink(tmp)
        self._check_header()

    def _check_header(self) -> None:
        try:
            with open(self.path, "rb") as f:
                first = f.readline()
        except FileNotFoundError:
            raise ValueError(f"{self.path}: this run's samples log was removed while it ran (another run of the same "
                             "--output with --restart?); choose another --output") from None
        if first != self._header():
            raise ValueError(f"{self.path}: the samples log now belongs to another run (its header is {first[:200]!r}, "
                             f"this run's run_key is {self.run_key!r}); two evaluations share --output: choose another")

    @staticmethod
    def _read(path: Path, run_key: str, done: dict[str, dict]) -> None:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        if not lines or not lines[0].strip():
            return  # created, nothing written yet
        try:
            header = json.loads(lines[0])
        except ValueError:
            raise ValueError(f"{path}: line 1: not a samples-log header (expected JSON with schema {LOG_SCHEMA!r}); "
                             "remove the file or pass --restart") from None
        if not isinstance(header, dict) or header.get("schema") != LOG_SCHEMA:
            raise ValueError(f"{path}: line 1: expected a samples-log header with schema {LOG_SCHEMA!r}; "
                             "remove the file or pass --restart")
        if header.get("run_key") != run_key:
            raise ValueError(f"{path}: samples of another run (run_key {header.get('run_key')!r}, this run {run_key!r}); "
                             "pass --restart to discard them, or choose another --output")
        body = lines[1:]
        for n, line in enumerate(body, start=2):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                if n == len(lines) or all(not rest.strip() for rest in body[n - 1:]):
                    break  # the line being written when the previous run died
                raise ValueError(f"{path}: line {n}: not a JSON record; the log is damaged "
                                 "(pass --restart to evaluate everything again)") from None
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise ValueError(f"{path}: line {n}: expected a record with a string 'id'")
            done[record["id"]] = record

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Add ``records`` (each with an ``id``) to this rank's log, durably."""
        if not records:
            return
        self._check_header()  # before every append: another run must not have taken the file over
        if self._file is None:
            with open(self.path, "rb+") as f:  # drop a torn last line so new lines start clean
                data = f.read()
                if not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across batches
        self._file.write("".join(_json_line(r) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file; a log that never got a record (the run failed before its first sample) is removed, so
        it does not claim the output for nothing."""
        if self._file is not None:
            self._file.close()
            self._file = None
        try:
            if self.path.stat().st_size == len(self._header()) and self.path.read_bytes() == self._header():
                self.path.unlink()
        except FileNotFoundError:
            pass

    def remove(self) -> None:
        """Delete the logs of this output (call after the results file is safely written)."""
        dist = _dist()
        self.close()
        dist.barrier()
        if dist.is_main():
            for path in self.paths(self.output):
                path.unlink(missing_ok=True)
        dist.barrier()


@dataclass
class SampleOutcome:
    """All records of an evaluation, gathered from every rank and every (resumed) run, in sample order."""

    records: dict[str, dict] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    resumed: int = 0

    @property
    def total(self) -> int:
        return len(self.records) + len(self.skipped)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def run_samples(samples: Sequence[T], *, sample_id: Callable[[T], str],
                predict: Callable[[list[T]], list[dict[str, Any] | BaseException]], batch_size: int,
                log: SampleLog | None = None, fail_fast: bool = False, progress: bool = True,
                desc: str = "evaluating") -> SampleOutcome:
    """Evaluate every sample not already in ``log``; see the module docstring.

    ``predict(batch)`` returns one entry per sample: its record, or an exception instance for a sample that
    could not be evaluated (skipped with the reason ``"Type: message"``). When ``predict`` raises, the batch
    is retried one sample at a time so one bad sample does not take its neighbours down (``fail_fast``
    re-raises instead). Under torchrun each rank takes every world-th pending sample and the outcome is
    gathered on all ranks.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    dist = _dist()
    ids = [str(sample_id(s)) for s in samples]
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"sample id {i!r} appears twice; sample ids must be unique to record and resume an evaluation")
        seen.add(i)
    done = log.done if log is not None else {}
    pending = [(i, s) for i, s in zip(ids, samples, strict=True) if i not in done]
    mine = dist.shard(pending)

    def one_batch(batch: list[tuple[str, T]]) -> list[dict[str, Any]]:
        items = [s for _, s in batch]
        try:
            outs = predict(items)
            if len(outs) != len(items):
                raise RuntimeError(f"predict returned {len(outs)} results for a batch of {len(items)} samples")
        except Exception as error:
            if fail_fast or len(items) == 1:
                if fail_fast:
                    raise
                outs = [error]
            else:
                outs = [one_batch([pair])[0] for pair in batch]
                return outs
        records = []
        for (i, _), out in zip(batch, outs, strict=True):
            if isinstance(out, BaseException):
                if fail_fast:
                    raise out
                records.append({"id": i, "skipped": _reason(out)})
            else:
                records.append(canonical({**out, "id": i}))
        return records

    new: list[dict[str, Any]] = []
    bar = None
    if progress and dist.is_main() and mine:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=desc, unit="sample", dynamic_ncols=True)
    try:
        for start in range(0, len(mine), batch_size):
            records = one_batch(mine[start:start + batch_size])
            if log is not None:
                log.append(records)
            new.extend(records)
            if bar is not None:
                bar.update(len(records))
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    everything = dict(done)
    for part in dist.gather_objects(new):
        everything.update({r["id"]: r for r in part})
    outcome = SampleOutcome(resumed=sum(1 for i in ids if i in done))
    for i in ids:
        record = everything.get(i)
        if record is None:
            raise RuntimeError(f"sample {i!r} was neither evaluated nor skipped (a rank lost its records)")
        if "skipped" in record:
            outcome.skipped.append({"id": i, "reason": str(record["skipped"])})
        else:
            outcome.records[i] = record
    return outcome


@dataclass
class Summary:
    """What a task makes of its records: the results' ``metrics`` and ``per_group``, and ``timings`` measured in the
    records themselves (ASR's decoding seconds and real-time factor), written as the task rounded them."""

    metrics: dict[str, Any]
    per_group: dict[str, dict[str, Any]] | None = None
    timings: dict[str, Any] = field(default_factory=dict)


def evaluate(args: Any, *, identity: Mapping[str, Any], settings: Mapping[str, Any], samples: Sequence[T],
             sample_id: Callable[[T], str], predict: Callable[[list[T]], list[dict[str, Any] | BaseException]],
             summarize: Callable[[SampleOutcome], Summary], source: str | os.PathLike, desc: str, what: str = "samples",
             t_start: float, timings: Mapping[str, float] | None = None, loop_timing: str | None = "evaluate_s",
             output_fields: Mapping[str, Any] | None = None, counts: Mapping[str, int] | None = None,
             rejected: Sequence[dict[str, Any]] = (), parameters: Mapping[str, Any] | None = None,
             extra: Mapping[str, Any] | None = None,
             prediction: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
             on_open: Callable[[SampleLog], AbstractContextManager[Any]] | None = None) -> dict[str, Any] | None:
    """Evaluate ``samples`` resumably and write the results (steps 1-8 of the module docstring).

    ``args``: the task's parsed flags; used here: ``output``, ``overwrite``, ``restart``, ``batch_size``,
    ``fail_fast``, ``progress`` and, when the task has it, ``predictions``.

    - ``identity``: ``dataset``, ``model``, ``pretrained``, ``task`` of the results (and of the ``run_key`` with
      ``settings``); ``output_fields`` fill the ``{fields}`` of ``--output`` (default: ``identity``).
    - ``sample_id``, ``predict``: as :func:`run_samples` takes them; ``desc`` labels its progress bar.
    - ``summarize(outcome)`` -> :class:`Summary`, from the records (in sample order) and the skipped samples.
    - ``source`` and ``what`` name the data in the error raised when no sample could be evaluated:
      ``"<source>: none of the <N> <what> could be evaluated (first skipped: <id>: <reason>)"``.
    - ``timings``: what the task measured before (``model_load_s``...); the sample loop's seconds are added as
      ``loop_timing`` (None: not recorded), then the summary's timings, then ``total_s`` since ``t_start``.
    - ``counts``: the task's counts after ``total``, ``evaluated``, ``skipped``, ``resumed``; ``rejected``:
      ``{"id", "reason"}`` of samples refused before the run (malformed rows), listed first in ``skipped``
      and counted in ``total``.
    - ``parameters``, ``extra``: the results' fields of those names (``extra`` at the top level).
    - ``prediction(id, record)``: the ``--predictions`` line of an evaluated sample (default ``{"id", **record}``),
      one per evaluated sample in sample order, UTF-8, when the task has that flag and it is given.
    - ``on_open(log)``: a context manager entered around the sample loop once the log is open (what is left
      to do is known then): the image evaluators read their pending images ahead in it.

    Returns the results (with ``output`` and ``predictions`` paths) on rank 0, None on the other ranks.
    """
    from .results_io import prepare_output
    from .results_schema import build_results, run_key, write_results

    dist = _dist()
    key = run_key(settings=settings, **identity)
    output = prepare_output(args, key, **(identity if output_fields is None else output_fields))  # before any work
    log = SampleLog.open(output, key, restart=args.restart)
    with on_open(log) if on_open is not None else nullcontext():
        t0 = time.perf_counter()
        outcome = run_samples(samples, sample_id=sample_id, predict=predict, batch_size=args.batch_size, log=log,
                              fail_fast=args.fail_fast, progress=args.progress, desc=desc)
        loop_s = time.perf_counter() - t0
    skipped = [*rejected, *outcome.skipped]
    total = len(rejected) + outcome.total
    if not outcome.records:
        first = f" (first skipped: {skipped[0]['id']}: {skipped[0]['reason']})" if skipped else ""
        raise ValueError(f"{source}: none of the {total} {what} could be evaluated{first}; skipped samples are not "
                         "retried on resume: pass --restart once the data is fixed")
    summary = summarize(outcome)
    measured = {**(timings or {}), **({loop_timing: loop_s} if loop_timing else {})}
    results = build_results(
        metrics=summary.metrics, per_group=summary.per_group, skipped=skipped, settings=settings,
        counts={"total": total, "evaluated": len(outcome.records), "skipped": len(skipped), "resumed": outcome.resumed,
                **(counts or {})},
        timings={**{k: round(v, 4) for k, v in measured.items()}, **summary.timings,
                 "total_s": round(time.perf_counter() - t_start, 4)},
        parameters=parameters, extra=extra, **identity)
    if results["run_key"] != key:  # the samples log and the output check used `key`
        raise RuntimeError(f"run key changed while evaluating ({key} -> {results['run_key']}); settings are not JSON-stable")
    if dist.is_main():
        write_results(output, results, overwrite=args.overwrite)
        results["output"] = str(output)
        if getattr(args, "predictions", None):
            from mmadapters.atomic import atomic_write_bytes

            line = prediction or (lambda i, r: {"id": i, **r})
            Path(args.predictions).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(Path(args.predictions), "".join(json.dumps(line(i, r), ensure_ascii=False) + "\n"
                                                               for i, r in outcome.records.items()).encode())
            results["predictions"] = str(args.predictions)
    log.remove()
    return results if dist.is_main() else None
