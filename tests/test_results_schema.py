"""The shared results schema and the resumable, sharded sample runner."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmadapters.eval.results_schema import SCHEMA, ResultsFormatError, build_results, read_results, validate_results, write_results
from mmadapters.eval.sample_runner import SampleLog, Summary, evaluate, run_samples


def _results(**overrides):
    kwargs = dict(dataset="d", model="m", pretrained=None, task="vqa", metrics={"acc": 0.5},
                  counts={"total": 3, "evaluated": 2, "skipped": 1}, skipped=[{"id": "x", "reason": "bad"}],
                  settings={"batch_size": 4, "root": Path("/data")}, timings={"total_s": 1.0})
    kwargs.update(overrides)
    return build_results(**kwargs)


def test_build_results_has_the_schema_keys():
    r = _results(parameters={"trainable": 10, "total": 1000}, per_group={"en": {"wer": 0.1}})
    assert r["schema"] == SCHEMA
    for key in ("dataset", "model", "pretrained", "task", "metrics", "counts", "skipped", "settings", "timings",
                "library", "git_commit", "created", "run_key", "per_group", "parameters"):
        assert key in r
    assert r["settings"]["root"] == "/data"  # paths as strings
    assert r["library"]["name"] == "mmadapters"
    # the same identification and settings give the same run key
    assert _results()["run_key"] == r["run_key"]
    assert _results(settings={"batch_size": 8})["run_key"] != r["run_key"]


@pytest.mark.parametrize("field, value, fragment", [
    ("metrics", {"acc": "high"}, "metrics.acc"),
    ("metrics", {}, "metrics"),
    ("counts", {"total": 3, "evaluated": 1, "skipped": 1}, "evaluated + skipped == total"),
    ("counts", {"total": 3, "evaluated": 2}, "counts.skipped"),
    ("skipped", [{"id": "x"}], "skipped[0]"),
    ("skipped", [], "counts.skipped"),
    ("task", "", "task"),
])
def test_validation_names_the_field(field, value, fragment):
    good = _results()
    bad = dict(good, **{field: value})
    with pytest.raises(ResultsFormatError, match="results.json") as info:
        validate_results(bad, "results.json")
    assert fragment in str(info.value)


def test_write_read_round_trip_and_overwrite_guard(tmp_path):
    path = tmp_path / "r.json"
    r = _results()
    write_results(path, r)
    assert read_results(path)["metrics"] == {"acc": 0.5}
    write_results(path, _results())  # same run: fine
    other = _results(settings={"batch_size": 99})
    with pytest.raises(FileExistsError, match="different run"):
        write_results(path, other)
    assert read_results(path)["run_key"] == r["run_key"]  # untouched
    write_results(path, other, overwrite=True)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ResultsFormatError, match="bad.json: line 1"):
        read_results(tmp_path / "bad.json")


def _predict_factory(calls, fail_after=None, bad=()):
    def predict(batch):
        calls.append(list(batch))
        if fail_after is not None and len(calls) > fail_after:
            raise KeyboardInterrupt  # a crash in the middle of the run
        if any(s in bad for s in batch):
            raise OSError("cannot read")
        return [{"pred": s * 2, "score": s / 3} for s in batch]
    return predict


def test_run_samples_skips_bad_samples_and_keeps_order():
    calls = []
    out = run_samples(list(range(10)), sample_id=str, predict=_predict_factory(calls, bad={3}), batch_size=4, progress=False)
    assert list(out.records) == [str(i) for i in range(10) if i != 3]
    assert out.skipped == [{"id": "3", "reason": "OSError: cannot read"}]
    assert out.records["4"] == {"pred": 8, "score": 4 / 3, "id": "4"}
    with pytest.raises(OSError):
        run_samples(list(range(10)), sample_id=str, predict=_predict_factory([], bad={3}), batch_size=4, progress=False,
                    fail_fast=True)
    with pytest.raises(ValueError, match="appears twice"):
        run_samples([1, 1], sample_id=str, predict=_predict_factory([]), batch_size=2, progress=False)


def test_crashed_run_resumes_from_its_log(tmp_path):
    output = tmp_path / "res.json"
    samples = list(range(23))
    with pytest.raises(KeyboardInterrupt):
        run_samples(samples, sample_id=str, predict=_predict_factory([], fail_after=2, bad={13}), batch_size=4,
                    log=SampleLog.open(output, "key"), progress=False)
    log_file = SampleLog.paths(output)[0]
    with open(log_file, "a") as f:
        f.write('{"id": "torn", "pre')  # the line being written when the process died
    calls = []
    log = SampleLog.open(output, "key")
    assert len(log.done) == 8
    resumed = run_samples(samples, sample_id=str, predict=_predict_factory(calls, bad={13}), batch_size=4, log=log,
                          progress=False)
    assert resumed.resumed == 8 and {s for c in calls for s in c} == set(range(8, 23))
    fresh = run_samples(samples, sample_id=str, predict=_predict_factory([], bad={13}), batch_size=4, progress=False)
    assert resumed.records == fresh.records and resumed.skipped == fresh.skipped
    for line in log_file.read_text().splitlines():
        json.loads(line)  # the torn line was dropped before appending
    with pytest.raises(ValueError, match="another run"):
        SampleLog.open(output, "other-key")
    assert SampleLog.open(output, "other-key", restart=True).done == {}
    (claimed,) = SampleLog.paths(output)  # the old log is gone; the new run's log exists with its header
    assert json.loads(claimed.read_text().splitlines()[0])["run_key"] == "other-key"


def test_two_runs_on_one_output_never_resume_on_each_others_records(tmp_path):
    """Regression: the header was written only at the first append, so a run that opened the log earlier appended
    under the other run's key, and a resume then took the other run's predictions."""
    output = tmp_path / "res.json"
    first = SampleLog.open(output, "key-A")  # opened, nothing evaluated yet
    with pytest.raises(ValueError, match="samples of another run"):
        SampleLog.open(output, "key-B")  # a second run with other settings, same --output
    second = SampleLog.open(output, "key-B", restart=True)  # ... told to discard: it takes the file over
    with pytest.raises(ValueError, match="belongs to another run"):
        first.append([{"id": "0", "pred": 1}])
    second.append([{"id": "0", "pred": 2}])
    assert SampleLog.open(output, "key-B").done == {"0": {"id": "0", "pred": 2}}
    second.remove()
    first_again = SampleLog.open(output, "key-A")
    second.path.unlink()  # removed under a running evaluation
    with pytest.raises(ValueError, match="was removed while it ran"):
        first_again.append([{"id": "1", "pred": 3}])


def _evaluate_toy(tmp_path, samples, **overrides):
    """``evaluate`` on integer samples (odd ones refused by ``predict``); metrics: the mean of the even ones."""
    import argparse

    args = argparse.Namespace(output=str(tmp_path / "{task}.json"), overwrite=False, restart=False, batch_size=3,
                              fail_fast=False, progress=False, predictions=str(tmp_path / "p" / "preds.jsonl"))
    kwargs = dict(
        identity={"dataset": "toy", "model": "m", "pretrained": None, "task": "toy"}, settings={"k": 1}, samples=samples,
        sample_id=lambda s: f"s{s}", predict=lambda b: [ValueError(f"odd {s}") if s % 2 else {"x": s} for s in b],
        summarize=lambda o: Summary({"mean": sum(r["x"] for r in o.records.values()) / len(o.records)},
                                    timings={"from_records": 1.23456}),
        source="toy.jsonl", what="toys", desc="toy", t_start=0.0, timings={"model_load_s": 0.123456})
    return evaluate(args, **{**kwargs, **overrides}), args


def test_evaluate_writes_results_and_predictions_and_removes_the_log(tmp_path):
    opened = []

    class Reader:  # what on_open hands back is entered around the sample loop, with the log's pending samples known
        def __init__(self, log):
            self.pending = [s for s in range(6) if f"s{s}" not in log.done]

        def __enter__(self):
            opened.append(("enter", self.pending))

        def __exit__(self, *exc):
            opened.append("exit")

    results, args = _evaluate_toy(tmp_path, list(range(6)), counts={"toys": 6}, rejected=[{"id": "row9", "reason": "bad"}],
                                  prediction=lambda i, r: {"id": i, "double": 2 * r["x"]}, on_open=Reader)
    assert opened == [("enter", list(range(6))), "exit"]
    written = read_results(tmp_path / "toy.json")
    assert results["output"] == str(tmp_path / "toy.json") and results["predictions"] == args.predictions
    assert written["counts"] == {"total": 7, "evaluated": 3, "skipped": 4, "resumed": 0, "toys": 6}
    assert [s["id"] for s in written["skipped"]] == ["row9", "s1", "s3", "s5"]  # refused rows first, then sample order
    assert written["metrics"] == {"mean": 2.0}
    assert list(written["timings"]) == ["model_load_s", "evaluate_s", "from_records", "total_s"]
    assert written["timings"]["model_load_s"] == 0.1235 and written["timings"]["from_records"] == 1.23456
    lines = [json.loads(line) for line in Path(args.predictions).read_text().splitlines()]
    assert lines == [{"id": "s0", "double": 0}, {"id": "s2", "double": 4}, {"id": "s4", "double": 8}]
    assert not SampleLog.paths(tmp_path / "toy.json")


def test_evaluate_refuses_a_run_where_nothing_could_be_evaluated(tmp_path):
    with pytest.raises(ValueError, match=r"^toy.jsonl: none of the 2 toys could be evaluated \(first skipped: s1: "
                                         r"ValueError: odd 1\); .* pass --restart once the data is fixed"):
        _evaluate_toy(tmp_path, [1, 3])
    assert not (tmp_path / "toy.json").exists() and SampleLog.paths(tmp_path / "toy.json")  # the records stay
    results, _ = _evaluate_toy(tmp_path, [1, 3, 4], loop_timing=None)  # same settings: s1, s3 resumed
    assert results["counts"]["resumed"] == 2 and "evaluate_s" not in results["timings"]


def test_two_ranks_shard_and_gather(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from mmadapters import distributed
        from mmadapters.eval.sample_runner import SampleLog, run_samples
        distributed.init_from_env("cpu")
        seen = []
        def predict(batch):
            seen.extend(batch)
            return [{{"pred": s * s}} for s in batch]
        log = SampleLog.open({str(tmp_path / "out.json")!r}, "k")
        out = run_samples(list(range(11)), sample_id=str, predict=predict, batch_size=3, log=log, progress=False)
        row = {{"rank": distributed.rank(), "seen": seen, "n": len(out.records),
               "sum": sum(r["pred"] for r in out.records.values())}}
        with open({str(tmp_path)!r} + f"/rank{{distributed.rank()}}.result", "w") as f:  # not stdout: ranks interleave
            json.dump(row, f)
        distributed.cleanup()
    """))
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.result"))]
    assert len(rows) == 2
    assert sorted(s for r in rows for s in r["seen"]) == list(range(11))  # each sample on exactly one rank
    assert all(r["n"] == 11 and r["sum"] == sum(i * i for i in range(11)) for r in rows)  # gathered everywhere
    assert len(list(tmp_path.glob("out.json.samples.rank*.jsonl"))) == 2
    assert math.isfinite(rows[0]["sum"])
