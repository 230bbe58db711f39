"""`mmadapters report`: every input shape, the table (markdown, CSV), the plots, bad inputs, expansion, the CLI.

Results files of `mmadapters eval zeroshot|asr|videoqa` are made with the schema's own builder (build_results);
the rest by hand, following the shared schema (eval/results_schema.py) and the shapes the training engine and
bench/*.py write. The outputs of removed commands are refused, naming the command that re-runs them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys

import pytest
from PIL import Image

from mmadapters.eval.report import (
    CSV_COLUMNS,
    BenchReport,
    ReportInputError,
    Run,
    collect,
    csv_text,
    expand_inputs,
    format_markdown,
    make_report,
    read_input,
    short_commit,
    sort_runs,
)
from mmadapters.eval.report_args import add_report_parser
from mmadapters.eval.results_schema import ResultsFormatError, build_results, validate_results

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# -- inputs of every kind, by hand ------------------------------------------------------------------------------

def schema_results(*, dataset="shapes", model="tiny-clip", task="fewshot_classification", metrics=None,
                   trainable=1000, total=100_000, per_group=None, skipped=1, evaluated=9, total_s=12.5,
                   method="tip") -> dict:
    return {
        "schema": "mmadapters.results/1", "dataset": dataset, "model": model, "pretrained": None, "task": task,
        "metrics": metrics if metrics is not None else {"acc1": 0.75, "acc5": 0.95},
        "counts": {"total": evaluated + skipped, "evaluated": evaluated, "skipped": skipped},
        "skipped": [{"id": f"img{i}", "reason": "UnreadableImageError: truncated"} for i in range(skipped)],
        "per_group": per_group,
        "parameters": None if trainable is None else {"trainable": trainable, "total": total},
        "settings": {"method": method, "shots": 4, "seed": 0}, "timings": {"total_s": total_s, "features_s": 1.0},
        "library": {"name": "mmadapters", "version": "0.1.0"}, "git_commit": COMMIT, "git_dirty": False,
        "created": "2026-01-01T00:00:00+00:00", "command": "mmadapters eval fewshot", "run_key": "abcd" * 4,
    }


def eval_results(*, task: str, dataset: str, model: str, metrics: dict, per_group: dict | None = None,
                 parameters: dict | None = None, settings: dict | None = None, evaluated: int = 10, skipped: int = 0,
                 total_s: float = 1.25) -> dict:
    """A results file as `mmadapters eval <task>` writes it, with the git fields fixed (build_results records
    those of the checkout running the tests)."""
    results = build_results(dataset=dataset, model=model, pretrained=None, task=task, metrics=metrics,
                            counts={"total": evaluated + skipped, "evaluated": evaluated, "skipped": skipped},
                            skipped=[{"id": f"s{i}", "reason": "corrupt: bad header"} for i in range(skipped)],
                            settings=settings or {}, timings={"model_load_s": 0.5, "total_s": total_s},
                            parameters=parameters, per_group=per_group)
    return results | {"git_commit": None, "git_dirty": None}


def zeroshot_results(dataset="shapes", model="tiny-clip", acc1=0.5) -> dict:  # eval zeroshot / mmadapters zeroshot
    return eval_results(task="zeroshot_classification", dataset=dataset, model=model,
                        metrics={"acc1": acc1, "acc5": 0.9, "mean_per_class_recall": 0.48},
                        per_group={"circle": {"recall": 0.5, "images": 5}, "square": {"recall": 0.46, "images": 5}},
                        parameters={"trainable": 0, "total": 1_000_000}, settings={"method": "zeroshot", "seed": 0})


def asr_results(wers: dict[str, float], *, adapters: bool = True, dataset="synth-speech", model="tiny-asr") -> dict:
    """eval asr: per_group[lang] = {wer, cer, ...}; parameters only with language adapters (base + adapters)."""
    per_group = {lang: {"wer": w, "cer": w / 2, "utterances": 4, "skipped": 0, "words": 20, "chars": 90,
                        "audio_s": 8.0} for lang, w in wers.items()}
    parameters = ({"trainable": 4000 * len(wers), "total": 1_000_000 + 4000 * len(wers), "base": 1_000_000,
                   "per_adapter": dict.fromkeys(wers, 4000)} if adapters else None)
    return eval_results(task="asr", dataset=dataset, model=model, per_group=per_group, parameters=parameters,
                        metrics={"wer": sum(wers.values()) / len(wers), "cer": 0.1, "wer_pooled": 0.3,
                                 "cer_pooled": 0.1, "languages": len(wers)},
                        settings={"adapters": {"path": "/runs/lda/best", "files": {}} if adapters else None,
                                  "decode": "greedy"},
                        evaluated=4 * len(wers) - 1, skipped=1, total_s=2.0)


def videoqa_results(method="tem-adapter") -> dict:  # eval videoqa: accuracy per question type
    return eval_results(task="videoqa_multiple_choice", dataset="trafficqa-synth", model="tiny-clip",
                        metrics={"acc": 0.4, "chance": 0.25},
                        per_group={"B": {"acc": 0.5, "questions": 4}, "C": {"acc": 0.25, "questions": 4}},
                        parameters={"trainable": 5000 if method == "tem-adapter" else 0, "total": 105_000},
                        settings={"method": method}, evaluated=8, skipped=2)


def train_summary() -> dict:
    return {"schema": "mmadapters.train_summary/1", "output": "runs/tem", "steps": 20, "select_metric": "acc",
            "select_mode": "max", "best_step": 10, "best_score": 0.6,
            "best_metrics": {"loss": 0.9, "acc": 0.6}, "best_dir": "runs/tem/best", "last_dir": "runs/tem/last",
            "final_metrics": {"loss": 0.8, "acc": 0.55}, "resumed_from": None, "world_size": 1, "stopped_by": "steps",
            "parameters": {"trainable": 2500, "total": 250_000}, "timings": {"train_s": 3.0, "total_s": 4.0},
            "history": [{"kind": "eval", "step": 10, "metrics": {"loss": 0.9, "acc": 0.6}, "best": True}],
            "library": {"name": "mmadapters", "version": "0.1.0"}, "git_commit": COMMIT,
            "config": {"output": "runs/tem", "trainer": {"steps": 20, "select_metric": None},
                       "recipe": {"train_annotations": "data/trafficqa/train.jsonl", "model": None, "num_frames": 4}},
            "created": "x"}


def bench_core() -> dict:  # bench/core.py: rows with a section and a ratios object
    return {"command": "bench/core.py --quick", "machine": "vm", "device": "cpu", "threads": 2, "reps": 3,
            "rows": [{"section": "mixed batch", "K": 4, "B": 32, "seconds": {"ours": 1.0},
                      "ratios": {"ours routed / peft mixed": 0.9, "ours routed / ours single": 1.02}},
                     {"section": "overhead", "B": 1, "seconds": {}, "ratios": {"ours merged LoRA / base": 1.01}}],
            "training": {"B": 16, "seconds": {"ours_lora": 1.0}}, "wall_seconds": 10.0}


def bench_video() -> dict:  # bench/video.py: variants with a ratio against the peer
    return {"command": "bench/video.py", "machine": "vm", "peer": "pyav decode-all", "settings": {"clips": 3},
            "variants": {"pyav decode-all": {"seconds": [1.0], "median_s": 1.0, "clips_per_s": 3.0, "ratio": 1.0},
                         "ours decord": {"seconds": [0.2], "median_s": 0.2, "clips_per_s": 15.0, "ratio": 5.0}},
            "target": {"variant": "ours decord", "ratio": 3.0, "met": True}, "wall_seconds": 5.0}


def bench_zeroshot() -> dict:  # bench/zeroshot.py: per-model speedups
    return {"benchmark": "zeroshot", "command": "bench/zeroshot.py --quick", "machine": {"cpu_count": 2},
            "settings": {"images": 50}, "models": [{"model": "tiny", "speedup_end_to_end": 3.5,
                                                   "speedup_classifier": 8.0, "wall_s": {"ours_median": 1.0}}]}


def write(path, obj) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def test_hand_written_schema_file_passes_the_schema_validator():
    validate_results(schema_results(per_group={"a": {"acc1": 0.5}}), "hand-written")


# -- reading ----------------------------------------------------------------------------------------------------

def test_reads_every_kind(tmp_path):
    runs = {name: read_input(write(tmp_path / f"{name}.json", obj)) for name, obj in {
        "schema": schema_results(), "zeroshot": zeroshot_results(), "asr": asr_results({"pl": 0.4, "cs": 0.2}),
        "videoqa": videoqa_results(), "train": train_summary(), "bench": bench_core()}.items()}

    r = runs["schema"]
    assert (r.kind, r.task, r.dataset, r.model, r.method) == ("results", "fewshot_classification", "shapes", "tiny-clip", "tip")
    assert r.metrics == {"acc1": 0.75, "acc5": 0.95} and r.main_metric == "acc1"
    assert (r.evaluated, r.skipped, r.trainable, r.total_params, r.total_s) == (9, 1, 1000, 100_000, 12.5)
    assert r.trainable_pct == pytest.approx(1.0) and r.git_commit == COMMIT

    z = runs["zeroshot"]
    assert (z.kind, z.task, z.main_metric, z.method, z.trainable, z.total_params, z.evaluated) == (
        "results", "zeroshot_classification", "acc1", "zeroshot", 0, 1_000_000, 10)
    assert z.trainable_pct == 0.0 and z.git_commit is None
    assert list(z.metrics) == ["acc1", "acc5", "mean_per_class_recall"]

    a = runs["asr"]
    assert (a.kind, a.task, a.main_metric, a.metrics["wer"], a.method) == ("results", "asr", "wer", pytest.approx(0.3), "best")
    assert (a.evaluated, a.skipped, a.total_s) == (7, 1, 2.0)
    assert a.per_group == {"pl": pytest.approx({"wer": 0.4, "cer": 0.2, "utterances": 4, "skipped": 0, "words": 20,
                                                "chars": 90, "audio_s": 8.0}),
                           "cs": pytest.approx({"wer": 0.2, "cer": 0.1, "utterances": 4, "skipped": 0, "words": 20,
                                                "chars": 90, "audio_s": 8.0})}
    assert (a.trainable, a.total_params) == (8000, 1_008_000)  # both languages' adapters; base + adapters

    v = runs["videoqa"]
    assert (v.kind, v.task, v.main_metric, v.method, v.trainable) == ("results", "videoqa_multiple_choice", "acc", "tem-adapter", 5000)
    assert v.per_group == {"B": {"acc": 0.5, "questions": 4}, "C": {"acc": 0.25, "questions": 4}}
    assert v.metrics == {"acc": 0.4, "chance": 0.25} and (v.evaluated, v.skipped) == (8, 2)

    t = runs["train"]
    assert (t.kind, t.task, t.dataset, t.model) == ("train_summary", "train", "trafficqa/train", "-")
    assert list(t.metrics) == ["acc", "loss"]  # the selection metric first
    assert (t.trainable, t.total_params, t.total_s) == (2500, 250_000, 4.0)

    b = runs["bench"]
    assert isinstance(b, BenchReport) and b.name == "bench"
    assert [(r.label, r.value) for r in b.ratios] == [
        ("mixed batch K=4 B=32: ours routed / peft mixed", 0.9), ("mixed batch K=4 B=32: ours routed / ours single", 1.02),
        ("overhead B=1: ours merged LoRA / base", 1.01)]


def test_bench_variants_and_speedups(tmp_path):
    video = read_input(write(tmp_path / "video.json", bench_video()))
    assert [(r.label, r.value) for r in video.ratios] == [("ours decord vs pyav decode-all", 5.0)]  # the peer itself left out
    zs = read_input(write(tmp_path / "zs.json", bench_zeroshot()))
    assert zs.name == "zeroshot"
    assert [(r.label, r.value) for r in zs.ratios] == [("tiny: speedup_end_to_end", 3.5), ("tiny: speedup_classifier", 8.0)]


def test_train_summary_without_improvement_uses_final_metrics(tmp_path):
    obj = train_summary() | {"best_metrics": None, "best_step": None}
    run = read_input(write(tmp_path / "train_summary.json", obj))
    assert run.metrics == {"acc": 0.55, "loss": 0.8}


def test_dirty_commit_and_short_commit(tmp_path):
    run = read_input(write(tmp_path / "r.json", schema_results() | {"git_dirty": True}))
    assert run.git_commit == COMMIT + "-dirty"
    assert short_commit(run.git_commit) == "01234567-dirty"
    assert short_commit(None) == "" and short_commit("unknown") == "unknown"


# -- bad inputs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON (line 1"),
    ("[1, 2, 3]", "not a results file (a JSON list)"),
    ('{"rows": [], "name": "x"}', "not a results file (a JSON dict with keys ['name', 'rows'])"),
    (json.dumps({k: v for k, v in schema_results().items() if k != "metrics"}), "metrics"),
    (json.dumps(schema_results() | {"schema": "mmadapters.results/99"}), "schema"),
    (json.dumps(schema_results(metrics={"acc1": "high"})), "metrics.acc1"),
    (json.dumps({k: v for k, v in zeroshot_results().items() if k != "dataset"}), "dataset: expected a non-empty string"),
    (json.dumps(asr_results({"pl": 0.1}) | {"per_group": {"pl": {"wer": "0.1"}}}), "per_group.pl.wer: expected a number"),
    (json.dumps(videoqa_results() | {"counts": {"total": 10, "evaluated": 9, "skipped": 2}}),
     "counts: expected evaluated + skipped == total"),
    (json.dumps(videoqa_results() | {"parameters": {"trainable": 5}}), "parameters: expected null or an object"),
    (json.dumps({"command": "bench/x.py", "machine": "vm", "wall_seconds": 1.0}), "benchmark report holds no ratios"),
])
def test_bad_file_gives_a_named_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ReportInputError) as info:
        read_input(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)
    assert isinstance(info.value, ResultsFormatError | ValueError)


def test_unparsable_json_is_named(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    huge = tmp_path / "huge.json"
    huge.write_text('{"metrics": {"acc": ' + "9" * 5000 + "}}", encoding="utf-8")
    for path in (deep, huge):
        with pytest.raises(ReportInputError, match=f"{path.name}: JSON not readable"):
            read_input(path)


def test_non_finite_values_are_left_out_of_plots(tmp_path):
    files = [write(tmp_path / "a.json", schema_results(model="a", metrics={"acc1": math.inf})),
             write(tmp_path / "b.json", bench_core() | {"rows": [{"section": "s", "ratios": {"x / y": math.nan}}]})]
    outcome = make_report(files, plots=tmp_path / "plots")
    assert outcome.written["plots"] == []
    runs_table, bench_table = (_table(part) for part in outcome.markdown.split("Benchmark ratios"))
    assert runs_table[2][6] == "inf" and bench_table[2] == ["b", "s: x / y", "nan"]


def test_binary_file_is_named(tmp_path):
    path = tmp_path / "weights.json"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ReportInputError, match="weights.json: not a UTF-8 text file"):
        read_input(path)


# The shapes the removed commands wrote (no 'schema' field): refused, naming the command and its replacement.
REMOVED_OUTPUTS = [
    ({"dataset": "shapes", "model": "tiny-clip", "pretrained": None, "task": "zeroshot_classification",
      "metrics": {"acc1": 0.5, "acc5": 0.9, "mean_per_class_recall": 0.48},
      "counts": {"images": 10, "evaluated": 10, "skipped": 0, "skipped_images": []}, "mmadapters_version": "0.1.0"},
     "the old `mmadapters zeroshot`, before it wrote the shared schema", "zeroshot"),
    ({"dataset": "synth-speech", "model": "tiny-asr", "task": "asr",
      "metrics": {"wer": 0.3, "cer": 0.1, "per_language": {"pl": {"wer": 0.3, "cer": 0.1}}},
      "counts": {"utterances": 4, "evaluated": 4, "skipped": 0}, "adapters": None},
     "`mmadapters asr eval`", "asr"),
    ({"dataset": "trafficqa-synth", "model": "tiny-clip", "task": "videoqa_multiple_choice",
      "metrics": {"acc": 0.4, "acc_by_q_type": {"B": 0.5}, "chance": 0.25}, "counts": {"questions": 10}},
     "`mmadapters videoqa`", "videoqa"),
]


@pytest.mark.parametrize(("obj", "command", "task"), REMOVED_OUTPUTS, ids=["zeroshot", "asr", "videoqa"])
def test_output_of_a_removed_command_is_refused_naming_its_replacement(tmp_path, capsys, obj, command, task):
    path = write(tmp_path / "old" / "results.json", obj)
    expected = (f"{path}: the output of a removed command ({command}; no 'schema' field); "
                f"re-run it with `mmadapters eval {task}`, which writes the shared results schema")
    with pytest.raises(ReportInputError) as info:  # named on the command line: an error
        read_input(path)
    assert str(info.value) == expected
    args = _parser().parse_args(["report", path])
    assert args.func(args) == 2
    assert capsys.readouterr().err == f"mmadapters report: error: {expected}\n"  # one line

    write(tmp_path / "old" / "new.json", schema_results())  # found in a directory: skipped with that warning
    args = _parser().parse_args(["report", str(tmp_path / "old"), "--quiet"])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert f"mmadapters report: warning: skipped {expected}\n" in err and "1 run(s), 0 benchmark report(s), 1 file(s) skipped" in err
    with pytest.raises(ReportInputError, match="removed command"):
        collect([tmp_path / "old"], strict=True)


# -- expansion --------------------------------------------------------------------------------------------------

def test_directory_and_glob_expansion(tmp_path):
    root = tmp_path / "runs"
    write(root / "b" / "results.json", schema_results(dataset="b"))
    write(root / "a" / "deep" / "results.json", schema_results(dataset="a"))
    write(root / "a" / "adapter_config.json", {"format_version": 1, "config": {}})  # not a results file
    write(root / ".hidden" / "results.json", schema_results(dataset="hidden"))
    (root / "notes.txt").write_text("x")

    found = expand_inputs([root])
    assert [p.relative_to(root).as_posix() for p, _ in found] == ["a/adapter_config.json", "a/deep/results.json", "b/results.json"]
    assert not any(explicit for _, explicit in found)

    warnings = []
    got = collect([root], warn=warnings.append)
    assert [r.dataset for r in got.runs] == ["a", "b"]
    assert [f for f, _ in got.skipped_files] == [str(root / "a" / "adapter_config.json")]
    assert len(warnings) == 1 and "adapter_config.json: not a results file" in warnings[0]
    with pytest.raises(ReportInputError, match="adapter_config.json"):
        collect([root], strict=True)
    with pytest.raises(ReportInputError, match="adapter_config.json"):  # named explicitly: always an error
        collect([root / "a" / "adapter_config.json"])

    by_glob = collect([str(root / "*" / "results.json")])
    assert [r.dataset for r in by_glob.runs] == ["b"]
    recursive = collect([str(root / "**" / "results.json"), root / "b" / "results.json"])  # read once
    assert [r.dataset for r in recursive.runs] == ["a", "b"]

    with pytest.raises(FileNotFoundError, match="no such file"):
        expand_inputs([tmp_path / "missing.json"])
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_inputs([str(tmp_path / "*.nothing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        expand_inputs([tmp_path / "empty"])


# -- table ------------------------------------------------------------------------------------------------------

def _runs(tmp_path) -> list[str]:
    return [
        write(tmp_path / "4.json", schema_results(dataset="shapes", model="zeta", trainable=500, total=200_000)),
        write(tmp_path / "1.json", schema_results(dataset="colours", model="alpha", metrics={"acc1": math.nan})),
        write(tmp_path / "3.json", zeroshot_results(dataset="shapes", model="alpha", acc1=0.5)),
        write(tmp_path / "2.json", schema_results(dataset="shapes", model="alpha", trainable=2000, total=100_000)),
        write(tmp_path / "5.json", asr_results({"pl": 0.4, "cs": 0.2})),
    ]


def _table(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]


def test_markdown_table_values_and_order(tmp_path):
    files = _runs(tmp_path)
    outcome = make_report(files)
    rows = _table(outcome.markdown)
    header, rule, body = rows[0], rows[1], rows[2:]
    assert header == ["task", "dataset", "model", "pretrained", "method", "metric", "value", "evaluated", "skipped",
                      "trainable", "trainable %", "time (s)", "git", "file"]
    assert rule[0].startswith("---")
    col = {name: i for i, name in enumerate(header)}
    # sorted by (task, dataset, model); ties (2.json, 4.json differ by model) resolved by model
    assert [(r[col["task"]], r[col["dataset"]], r[col["model"]]) for r in body] == [
        ("asr", "synth-speech", "tiny-asr"),
        ("fewshot_classification", "colours", "alpha"),
        ("fewshot_classification", "shapes", "alpha"),
        ("fewshot_classification", "shapes", "zeta"),
        ("zeroshot_classification", "shapes", "alpha")]
    asr, colours, alpha, zeta, zeroshot = body
    assert (asr[col["metric"]], asr[col["value"]], asr[col["trainable"]], asr[col["trainable %"]]) == ("wer", "0.3000", "8,000", "0.794%")
    assert colours[col["value"]] == "—"  # NaN (null in a results file): undefined
    assert (alpha[col["value"]], alpha[col["trainable"]], alpha[col["trainable %"]]) == ("0.7500", "2,000", "2%")
    assert (zeta[col["trainable"]], zeta[col["trainable %"]]) == ("500", "0.25%")
    assert (alpha[col["evaluated"]], alpha[col["skipped"]], alpha[col["time (s)"]]) == ("9", "1", "12.5")
    assert alpha[col["git"]] == "01234567" and alpha[col["file"]] == files[3]
    assert (zeroshot[col["trainable"]], zeroshot[col["trainable %"]], zeroshot[col["git"]]) == ("0", "0%", "")
    assert (asr[col["method"]], asr[col["evaluated"]], asr[col["skipped"]], asr[col["time (s)"]]) == ("best", "7", "1", "2.0")
    # the pipes line up: every table line has the same length
    assert len({len(line) for line in outcome.markdown.splitlines() if line.startswith("|")}) == 1


def test_metric_columns_and_group_by(tmp_path):
    files = _runs(tmp_path)
    outcome = make_report(files, metrics=["acc5", "wer"], group_by=["model"])
    rows = _table(outcome.markdown)
    header, body = rows[0], rows[2:]
    assert header[5:7] == ["acc5", "wer"]
    assert [r[2] for r in body] == ["alpha", "alpha", "alpha", "tiny-asr", "zeta"]  # model first
    assert [(r[1], r[5], r[6]) for r in body] == [("colours", "", ""), ("shapes", "0.9500", ""), ("shapes", "0.9000", ""),
                                                  ("synth-speech", "", "0.3000"), ("shapes", "0.9500", "")]
    with pytest.raises(ValueError, match="group_by"):
        make_report(files, group_by=["colour"])


def test_sort_is_stable():
    runs = [Run(source=f"{i}.json", kind="results", task="t", dataset="d", model="m") for i in (3, 1, 2)]
    assert [r.source for r in sort_runs(runs)] == ["3.json", "1.json", "2.json"]


def test_csv_is_parsable_and_matches_the_runs(tmp_path):
    files = _runs(tmp_path)
    outcome = make_report(files, csv_path=tmp_path / "out" / "table.csv")
    with open(tmp_path / "out" / "table.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(outcome.runs) == 5
    assert list(rows[0])[:len(CSV_COLUMNS)] == list(CSV_COLUMNS)
    assert {"metric:acc1", "metric:acc5", "metric:wer", "metric:mean_per_class_recall"} <= set(rows[0])
    for row, run in zip(rows, outcome.runs, strict=True):
        assert (row["file"], row["task"], row["dataset"], row["model"]) == (run.source, run.task, run.dataset, run.model)
        assert row["main_metric"] == run.main_metric
        value = float(row["main_value"])
        assert math.isnan(value) if math.isnan(run.metrics[run.main_metric]) else value == run.metrics[run.main_metric]
    alpha = rows[2]
    assert (alpha["trainable"], alpha["total_params"], float(alpha["trainable_pct"])) == ("2000", "100000", 2.0)
    assert (alpha["metric:acc5"], alpha["metric:wer"], alpha["git_commit"]) == ("0.95", "", COMMIT)
    assert csv_text([]) == ",".join(CSV_COLUMNS) + "\n"


def test_markdown_lists_benchmarks_and_skipped_files(tmp_path):
    write(tmp_path / "in" / "run.json", schema_results())
    write(tmp_path / "in" / "core.json", bench_core())
    write(tmp_path / "in" / "other.json", {"hello": 1})
    outcome = make_report([tmp_path / "in"], markdown=tmp_path / "report.md")
    assert "Benchmark ratios" in outcome.markdown
    bench_rows = _table(outcome.markdown.split("Benchmark ratios")[1])
    assert bench_rows[0] == ["benchmark", "ratio", "value"]
    assert bench_rows[2:] == [["core", "mixed batch K=4 B=32: ours routed / peft mixed", "0.900"],
                              ["core", "mixed batch K=4 B=32: ours routed / ours single", "1.020"],
                              ["core", "overhead B=1: ours merged LoRA / base", "1.010"]]
    assert "1 file(s) skipped (not results):" in outcome.markdown and "other.json" in outcome.markdown
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == outcome.markdown
    assert outcome.written["markdown"] == [str(tmp_path / "report.md")]


def test_nothing_usable_is_an_error(tmp_path):
    write(tmp_path / "in" / "other.json", {"hello": 1})
    with pytest.raises(ValueError, match="no results or benchmark reports found"):
        make_report([tmp_path / "in"])


def test_format_markdown_escapes_pipes():
    run = Run(source="a|b.json", kind="results", task="t", dataset="d|e", model="m", metrics={"acc": 1.0})
    assert "d\\|e" in format_markdown([run])


# -- plots ------------------------------------------------------------------------------------------------------

def _valid_png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        im.load()
        assert im.width > 0 and im.height > 0
        return im.size


def test_every_plot_kind_is_a_valid_png(tmp_path):
    files = _runs(tmp_path) + [
        write(tmp_path / "6.json", asr_results({"pl": 0.3, "uk": 0.5}, adapters=False)),  # 2 ASR runs: grouped bars
        write(tmp_path / "7.json", schema_results(task="asr", dataset="synth-speech", model="tiny-asr-2",
                                                  metrics={"wer": 0.25}, per_group={"pl": {"wer": 0.2, "cer": 0.1}},
                                                  method="lda")),
        write(tmp_path / "core.json", bench_core()), write(tmp_path / "video.json", bench_video()),
    ]
    plots = tmp_path / "plots"
    outcome = make_report(files, plots=plots)
    names = sorted(p.rsplit("/", 1)[-1] for p in outcome.written["plots"])
    # no params plot for (fewshot_classification, colours): its only run has a NaN accuracy
    assert names == sorted(["params_asr_synth-speech_wer.png", "params_fewshot_classification_shapes_acc1.png",
                            "params_zeroshot_classification_shapes_acc1.png", "wer_by_language_asr_synth-speech.png",
                            "bench_core.png", "bench_video.png"])
    for path in outcome.written["plots"]:
        _valid_png(path)
    assert sorted(p.name for p in plots.iterdir()) == names  # no temporary files left behind


def test_plots_only_where_data_exists(tmp_path):
    only = write(tmp_path / "r.json", schema_results(trainable=None))  # no parameter counts, no ASR, no bench
    outcome = make_report([only], plots=tmp_path / "plots")
    assert outcome.written["plots"] == []
    bench_only = make_report([write(tmp_path / "video.json", bench_video())], plots=tmp_path / "plots2")
    assert [p.rsplit("/", 1)[-1] for p in bench_only.written["plots"]] == ["bench_video.png"]
    _valid_png(bench_only.written["plots"][0])


def test_metric_option_picks_the_plotted_metric(tmp_path):
    files = [write(tmp_path / "a.json", schema_results(model="a", trainable=10)),
             write(tmp_path / "b.json", schema_results(model="b", trainable=10_000))]
    outcome = make_report(files, plots=tmp_path / "plots", metrics=["acc5"])
    assert [p.rsplit("/", 1)[-1] for p in outcome.written["plots"]] == ["params_fewshot_classification_shapes_acc5.png"]
    size = _valid_png(outcome.written["plots"][0])
    assert size[0] > 300 and size[1] > 200


# -- CLI --------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmadapters")
    add_report_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_parser_and_func(tmp_path, capsys):
    files = [*_runs(tmp_path), write(tmp_path / "core.json", bench_core())]
    args = _parser().parse_args(["report", *files, "--csv", str(tmp_path / "t.csv"), "--markdown", str(tmp_path / "t.md"),
                                 "--plots", str(tmp_path / "plots"), "--metric", "acc1,wer", "--group-by", "task"])
    assert (args.metric, args.group_by, args.strict, args.quiet) == (["acc1,wer"], ["task"], False, False)
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert out == (tmp_path / "t.md").read_text(encoding="utf-8")
    assert _table(out)[0][5:7] == ["acc1", "wer"] and "Benchmark ratios" in out
    assert "5 run(s), 1 benchmark report(s)" in err and "plot(s) written:" in err and "bench_core.png" in err
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 5

    quiet = _parser().parse_args(["report", files[0], "--quiet"])
    assert quiet.func(quiet) == 0
    out, err = capsys.readouterr()
    assert out == "" and "1 run(s)" in err

    bad = tmp_path / "bad.json"
    bad.write_text("[]", encoding="utf-8")
    args = _parser().parse_args(["report", str(bad)])
    assert args.func(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"mmadapters report: error: {bad}: not a results file" in err

    args = _parser().parse_args(["report", str(tmp_path / "nope.json")])
    assert args.func(args) == 2 and "no such file" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        _parser().parse_args(["report", files[0], "--group-by", "colour"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["report"])


def test_cli_strict_and_warnings(tmp_path, capsys):
    write(tmp_path / "in" / "run.json", schema_results())
    write(tmp_path / "in" / "other.json", {"hello": 1})
    args = _parser().parse_args(["report", str(tmp_path / "in"), "--quiet"])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "warning: skipped" in err and "other.json" in err and "1 file(s) skipped" in err
    args = _parser().parse_args(["report", str(tmp_path / "in"), "--strict"])
    assert args.func(args) == 2 and "other.json: not a results file" in capsys.readouterr().err


def test_report_does_not_import_torch(tmp_path):
    path = write(tmp_path / "r.json", schema_results())
    code = ("import sys; from mmadapters.eval.report_args import add_report_parser; import argparse\n"
            "p = argparse.ArgumentParser(); add_report_parser(p.add_subparsers())\n"
            f"a = p.parse_args(['report', {path!r}, '--plots', {str(tmp_path / 'plots')!r}, '--quiet'])\n"
            "assert a.func(a) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "plots" / "params_fewshot_classification_shapes_acc1.png").is_file()


# -- the real writers' shapes -----------------------------------------------------------------------------------

def test_reads_what_build_results_writes(tmp_path):
    from mmadapters.eval.results_schema import build_results

    results = build_results(dataset="shapes", model="tiny-clip", pretrained="w.safetensors", task="asr",
                            metrics={"wer": 0.25, "cer": 0.1}, counts={"total": 3, "evaluated": 2, "skipped": 1},
                            skipped=[{"id": "u3", "reason": "corrupt: bad header"}], settings={"adapters": "out/lda/best"},
                            timings={"total_s": 3.5}, parameters={"trainable": 10, "total": 1010},
                            per_group={"pl": {"wer": 0.25, "cer": 0.1}})
    run = read_input(write(tmp_path / "r.json", results))
    assert (run.kind, run.task, run.pretrained, run.method, run.main_metric) == ("results", "asr", "w.safetensors", "best", "wer")
    assert (run.evaluated, run.skipped, run.total_s) == (2, 1, 3.5)
    assert run.trainable_pct == pytest.approx(100 * 10 / 1010)
    assert run.per_group == {"pl": {"wer": 0.25, "cer": 0.1}}
    assert run.git_commit == (None if results["git_commit"] is None
                              else results["git_commit"] + ("-dirty" if results["git_dirty"] else ""))


def test_hand_written_train_summary_has_the_engine_fields():
    from dataclasses import fields

    from mmadapters.training.trainer import TrainSummary

    assert set(train_summary()) - {"schema"} == {f.name for f in fields(TrainSummary)}


@pytest.mark.parametrize(("changes", "method"), [
    ({"settings": {"kind": "caps"}}, "caps"),  # few-shot CLIP
    ({"settings": {}, "adapter": {"kind": "tip-f"}}, "tip-f"),  # the few-shot CLIP extra
    ({"settings": {}, "parameters": {"trainable": 1, "total": 2, "variant": "hyperformer"}}, "hyperformer"),  # VL-Adapter
    ({"settings": {"adapters": "/runs/lda/best"}}, "best"),  # an adapters directory
    ({"settings": {"adapters": {"path": "/runs/lda/best", "files": {}}}}, "best"),  # as eval asr records it
    ({"settings": {"adapter": "none"}}, None),
])
def test_method_of_a_schema_run(tmp_path, changes, method):
    assert read_input(write(tmp_path / "r.json", schema_results() | changes)).method == method
