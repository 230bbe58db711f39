"""`mmadapters fewshot-compare` end to end on tiny generated tasks with a tiny random CLIP (local-dir in tmp)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from mmadapters.eval.cli import main
from mmadapters.eval.results_schema import read_results
from mmadapters.vision import fewshot as fewshot_mod
from mmadapters.vision import zeroshot as zeroshot_mod
from mmadapters.vision.clip import tiny_clip_config, write_clip_dir

TASKS = ["shapes-sketch", "colours-noisy"]
# 10 classes each; test has 3 per class so that val (2) and test (3) feature matrices differ in shape.
SIZES = ["--train-per-class", "4", "--val-per-class", "2", "--test-per-class", "3", "--image-size", "32"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_clip_dir(tmp_path_factory.mktemp("clip") / "tiny", tiny_clip_config(), seed=0)


def _args(clip_dir, cache, *extra):
    return ["fewshot-compare", "--model", f"local-dir:{clip_dir}", "--num-workers", "0", "--batch-size", "16",
            "--cache-dir", str(cache), *SIZES, *extra]


@pytest.fixture(scope="module")
def compared(clip_dir, tmp_path_factory):
    """One comparison over two tasks, two shot counts, two seeds and all methods, with its calls recorded."""
    tmp = tmp_path_factory.mktemp("compare")
    calls = {"images": [], "texts": [], "fits": []}
    real_extract, real_encode, real_fit = (zeroshot_mod.extract_image_features, zeroshot_mod.encode_texts,
                                           fewshot_mod.fit_fewshot)

    def extract(*args, **kwargs):
        out = real_extract(*args, **kwargs)
        calls["images"].append((kwargs["desc"], out))
        return out

    def encode(model, tokenizer, texts, **kwargs):
        calls["texts"].append((kwargs.get("desc"), len(texts)))
        return real_encode(model, tokenizer, texts, **kwargs)

    def fit(kind, clip_weights, support, val_feats, val_labels, **kwargs):
        calls["fits"].append({"kind": kind, "support": support, "val_feats": val_feats.clone(),
                              "val_labels": val_labels.clone()})
        return real_fit(kind, clip_weights, support, val_feats, val_labels, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setattr(zeroshot_mod, "extract_image_features", extract)
        mp.setattr(zeroshot_mod, "encode_texts", encode)
        mp.setattr(fewshot_mod, "fit_fewshot", fit)
        argv = _args(clip_dir, tmp / "cache", "--task", TASKS[0], "--task", TASKS[1], "--shots", "1,2",
                     "--seeds", "0,1", "--views", "2", "--output", "out/cmp.json", "--markdown", "out/cmp.md")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            rc = main(argv)
    return {"rc": rc, "tmp": tmp, "calls": calls, "printed": printed.getvalue()}


def test_runs_end_to_end_and_writes_json_markdown(compared):
    assert compared["rc"] == 0
    tmp = compared["tmp"]
    results = read_results(tmp / "out" / "cmp.json")  # a valid file of the shared results schema
    assert {"tasks", "runs", "summary", "library", "run_key", "created"} <= set(results)
    assert results["task"] == "fewshot_comparison" and results["dataset"] == ",".join(TASKS)
    assert results["model"] == "tiny" and results["pretrained"] is None
    assert list(results["metrics"]) == ["zeroshot_acc1", "tip_acc1", "tip-f_acc1", "caps_acc1"]
    assert results["counts"] == {"total": 60, "evaluated": 60, "skipped": 0, "runs": 26} and results["skipped"] == []
    s = results["settings"]
    assert s["tasks"] == TASKS and s["shots"] == [1, 2] and s["seeds"] == [0, 1]
    assert s["methods"] == ["zeroshot", "tip", "tip-f", "caps"]
    assert s["sizes"] == {"train_per_class": 4, "val_per_class": 2, "test_per_class": 3, "image_size": 32}
    assert s["splits"] == {"support": "train", "search": "val", "score": "test"}
    # per task: one zero-shot run + 3 methods x 2 shots x 2 seeds
    runs = results["runs"]
    assert len(runs) == 2 * (1 + 3 * 2 * 2)
    for run in runs:
        assert set(run) == {"task", "method", "shots", "seed", "metrics", "hyperparams", "timings"}
        assert set(run["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
        assert 0.0 <= run["metrics"]["acc1"] <= 1.0 and 0.0 <= run["metrics"]["acc5"] <= 1.0  # 10 classes >= 5
    zs = [r for r in runs if r["method"] == "zeroshot"]
    assert [(r["task"], r["shots"], r["seed"]) for r in zs] == [(t, 0, None) for t in TASKS]
    caps = [r for r in runs if r["method"] == "caps"]
    assert all({"alpha", "beta", "gamma", "delta", "val_acc1"} <= set(r["hyperparams"]) for r in caps)
    assert all(r["hyperparams"]["val_images"] == 20 for r in caps)  # 10 classes x 2 val images
    # 2 shots x 10 classes real, and one image generated from each shot's prompt
    assert {r["hyperparams"]["support_images"] for r in caps if r["shots"] == 2} == {40}
    assert all(t["captions"]["captioner"] == "vlt5" and len(t["captions"]["examples"]) == 5
               for t in results["tasks"].values())  # the default captioner, and examples of its prompts
    tip_means = [r["acc1_mean"] for r in results["summary"] if r["method"] == "tip"]
    assert results["metrics"]["tip_acc1"] == pytest.approx(sum(tip_means) / len(tip_means))
    tipf = [r for r in runs if r["method"] == "tip-f"]
    assert all("best_epoch" in r["hyperparams"] for r in tipf)
    # summary: task x shots x method, n = seeds (zero-shot: its one run, repeated in each shots row)
    summary = results["summary"]
    assert len(summary) == 2 * 2 * 4
    row = next(r for r in summary if (r["task"], r["shots"], r["method"]) == (TASKS[1], 2, "tip"))
    accs = [r["metrics"]["acc1"] for r in runs if (r["task"], r["shots"], r["method"]) == (TASKS[1], 2, "tip")]
    assert row["n"] == 2 and row["acc1_mean"] == pytest.approx(sum(accs) / 2)
    assert row["acc1_std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
    assert all(r["n"] == 1 for r in summary if r["method"] == "zeroshot")
    info = results["tasks"][TASKS[0]]
    assert info["counts"]["train"]["evaluated"] == 40 and info["counts"]["test"]["evaluated"] == 30
    assert set(info["timings"]["features_s"]) == {"train", "val", "test"}
    # markdown: both tables with one row per task x shots, and the searched hyperparameters
    md = (tmp / "out" / "cmp.md").read_text()
    assert "| task | shots | zeroshot | tip | tip-f | caps | gate |" in md
    assert md.count(f"| {TASKS[0]} | 2 |") == 3 and "δ" in md
    # the printed table
    printed = compared["printed"]
    header = next(line for line in printed.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "shots", "zeroshot", "tip", "tip-f", "caps", "gate"]
    assert sum(line.split()[:2] in ([TASKS[0], "1"], [TASKS[0], "2"]) for line in printed.splitlines()) == 2
    assert "±" in printed
    # every task carries its gate (16-shot probe capped at the 4 train images per class here), in the JSON, the
    # summary rows, the printed lines and the markdown; a random CLIP's gate is not written into task.json
    for task in TASKS:
        gate = results["tasks"][task]["gate"]
        assert {"linear_probe_acc", "zeroshot_acc", "gap", "passed", "shots"} <= set(gate) and gate["shots"] == 4
        assert gate["gap"] == pytest.approx(gate["linear_probe_acc"] - gate["zeroshot_acc"], abs=1e-5)
        assert gate["passed"] == (gate["gap"] >= 0.10)
        assert {r["gate_passed"] for r in summary if r["task"] == task} == {gate["passed"]}
        line = next(ln for ln in printed.splitlines() if ln.startswith(f"{task}: gate linear probe"))
        assert ("gate not passed: no adapter gain claimed" in line) != gate["passed"]
        assert "gate" not in json.loads((Path(results["tasks"][task]["root"]) / "task.json").read_text())
    assert "**Gates**" in md


def test_report_tables_the_comparison(compared, capsys):
    from mmadapters.eval.report import make_report

    out = compared["tmp"] / "out"
    results = json.loads((out / "cmp.json").read_text())
    assert main(["report", str(out / "cmp.json"), "--metric", "acc1,acc1_std", "--csv", str(out / "cmp.csv")]) == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:7] == ["task", "dataset", "model", "pretrained", "method", "acc1", "acc1_std"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    # per task: zero-shot once, then 3 methods x 2 shot counts
    assert len(rows) == 2 * (1 + 3 * 2)
    row = next(r for r in rows if r[1] == TASKS[1] and r[4] == "tip 2-shot")
    summary = next(r for r in results["summary"] if (r["task"], r["shots"], r["method"]) == (TASKS[1], 2, "tip"))
    assert row[0] == "fewshot_classification" and row[2] == "tiny"
    assert float(row[5]) == pytest.approx(summary["acc1_mean"], abs=1e-4)
    assert float(row[6]) == pytest.approx(summary["acc1_std"], abs=1e-4)
    assert [r[4] for r in rows if r[1] == TASKS[0] and r[0] == "zeroshot_classification"] == ["zeroshot"]
    runs = make_report([out / "cmp.json"]).runs
    assert all(r.evaluated == 30 and r.skipped == 0 for r in runs) and {r.metrics["seeds"] for r in runs} == {1, 2}
    assert (out / "cmp.csv").read_text().count("\n") == 1 + len(rows)


def test_features_extracted_once_per_split_and_captions_once(compared):
    calls = compared["calls"]
    descs = [d for d, _ in calls["images"] if not d.startswith("augmented view")]
    assert sorted(descs) == sorted(f"{t} {s} images" for t in TASKS for s in ("train", "val", "test"))
    # --views 2: two augmented passes over each task's train split, once
    assert [d for d, _ in calls["images"] if d.startswith("augmented view")] == ["augmented view 1/2", "augmented view 2/2"] * 2
    captions = [(d, n) for d, n in calls["texts"] if d and "captions" in d]
    assert captions == [(f"{t} captions", 40) for t in TASKS]  # every train image's caption, once per task
    assert sum(d == "classifier" for d, _ in calls["texts"]) == 2  # one classifier per task (cache was empty)


def test_search_sees_val_only_and_support_comes_from_train(compared):
    calls = compared["calls"]
    feats = {d: out for d, out in calls["images"]}
    assert len(calls["fits"]) == 2 * 3 * 2 * 2
    for task in TASKS:
        train, val, test = (feats[f"{task} {s} images"] for s in ("train", "val", "test"))
        assert all(f["support"].views.shape[0] == 2 for f in calls["fits"] if f["kind"] != "caps")
        fits = [f for f in calls["fits"] if f["val_feats"].shape[0] == val.features.shape[0]
                and torch.equal(f["val_feats"], val.features)]
        assert len(fits) == 3 * 2 * 2  # every fit of this task got exactly the val split
        for f in fits:
            if f["kind"] == "caps":  # CapS: the Tip cache (checked through Tip's fits) + one generated image per shot
                n = len(f["support"]) // 2
                assert torch.equal(f["support"].labels[:n], f["support"].labels[n:])
                assert torch.equal(f["support"].caption_feats[:n], f["support"].caption_feats[n:])
                assert (f["support"].image_feats[n:] @ train.features.T).max() < 1 - 1e-4  # rendered, not a shot
                continue
            assert torch.equal(f["val_labels"], val.labels)
            assert f["val_feats"].shape[0] != test.features.shape[0]
            # each support view is an augmented view of a train image (of the right label), never of test or val;
            # the cache keys are the mean of the views
            views = [out.features for d, out in calls["images"] if d.startswith("augmented view")]
            banks = views[2 * TASKS.index(task) : 2 * TASKS.index(task) + 2]  # --views 2, tasks in order
            for v, bank in enumerate(banks):
                match = (f["support"].views[v] @ bank.T).max(dim=1)
                assert torch.allclose(match.values, torch.ones(len(match.values)), atol=1e-5)
                assert torch.equal(train.labels[match.indices], f["support"].labels)
            keys = torch.nn.functional.normalize(f["support"].views.mean(0), dim=-1)
            assert torch.allclose(f["support"].image_feats, keys, atol=1e-6)


def test_second_run_reuses_cache_and_output_guard(clip_dir, compared, capsys, monkeypatch):
    tmp = compared["tmp"]
    monkeypatch.chdir(tmp)
    first = json.loads((tmp / "out" / "cmp.json").read_text())
    assert all(not t["classifier_cache_hit"] for t in first["tasks"].values())
    base = _args(clip_dir, tmp / "cache", "--task", TASKS[0], "--methods", "zeroshot,tip", "--shots", "1",
                 "--output", "out/cmp.json")
    assert main(base) == 2  # a different comparison does not silently replace the file
    assert "holds the results of a different run" in capsys.readouterr().err
    assert json.loads((tmp / "out" / "cmp.json").read_text())["run_key"] == first["run_key"]
    assert main([*base, "--overwrite"]) == 0
    again = json.loads((tmp / "out" / "cmp.json").read_text())
    assert again["tasks"][TASKS[0]]["classifier_cache_hit"] is True
    assert again["tasks"][TASKS[0]]["timings"]["generate_s"] < first["tasks"][TASKS[0]]["timings"]["generate_s"]
    same_zs = [r["metrics"] for r in first["runs"] if (r["task"], r["method"]) == (TASKS[0], "zeroshot")]
    assert [r["metrics"] for r in again["runs"] if r["method"] == "zeroshot"] == same_zs
    assert main([*base, "--seeds", "0"]) == 0  # the same comparison may refresh its own file
    assert json.loads((tmp / "out" / "cmp.json").read_text())["run_key"] == again["run_key"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "no-such-task"], "--task 'no-such-task'"),
        (["--task", "shapes-sketch", "--methods", "zeroshot,lora"], "--methods 'lora'"),
        (["--task", "shapes-sketch", "--shots", "8"], "--shots 8"),
        (["--task", "shapes-sketch", "--shots", "1", "--generated", "-1"], "--generated -1"),
    ],
)
def test_errors_name_the_flag(extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # errors come before any model is loaded or data generated: the model need not exist
    argv = ["fewshot-compare", "--model", f"local-dir:{tmp_path / 'absent'}", "--cache-dir", str(tmp_path), *SIZES, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "mmadapters fewshot-compare: error:" in err and message in err
    assert not (tmp_path / "datasets").exists() and not (tmp_path / "fewshot_compare.json").exists()


def test_susx_and_noisy_captions(clip_dir, tmp_path, monkeypatch):
    """SuS-X: support images generated from "a photo of a {class}." only (no train image), TIP-X scoring (δ = 0);
    CapS with the noisy captioner: captions differ from the generator's for some images."""
    from mmadapters.vision.caps_adapter import read_captions

    fits = []
    real_fit = fewshot_mod.fit_fewshot

    def fit(kind, clip_weights, support, val_feats, val_labels, **kwargs):
        fits.append((kind, support, kwargs))
        return real_fit(kind, clip_weights, support, val_feats, val_labels, **kwargs)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fewshot_mod, "fit_fewshot", fit)
    argv = _args(clip_dir, tmp_path / "cache", "--task", "colours-noisy", "--shots", "1,2", "--methods", "susx,caps",
                 "--captioner", "noisy", "--views", "1", "--output", "s.json")
    assert main(argv) == 0
    results = json.loads((tmp_path / "s.json").read_text())
    assert results["settings"]["captioner"] == "noisy" and list(results["metrics"]) == ["susx_acc1", "caps_acc1"]
    susx = [r for r in results["runs"] if r["method"] == "susx"]
    assert [r["shots"] for r in susx] == [1, 2]
    assert all(r["hyperparams"]["kind"] == "susx" and r["hyperparams"]["delta"] == 0 for r in susx)
    assert [r["hyperparams"]["support_images"] for r in susx] == [10, 20]
    susx_fits = [(s, kw) for kind, s, kw in fits if kw.get("deltas") == (0.0,)]
    assert len(susx_fits) == 2 and all(kind == "caps" for kind, _, _ in fits)
    info = results["tasks"]["colours-noisy"]
    truth = read_captions(Path(info["root"]) / "captions.jsonl")
    for support, _ in susx_fits:
        assert support.views is None
        # every caption feature of a class is the same prompt's, "a photo of a {class}."
        for c in support.labels.unique():
            rows = support.caption_feats[support.labels == c]
            assert torch.allclose(rows, rows[0].expand_as(rows))
    examples = info["captions"]["examples"]
    assert info["captions"]["captioner"] == "noisy" and all(e.startswith("A photo of ") for e in examples)
    assert any(e.split(". ", 1)[1] not in truth.values() for e in examples)  # some captions were perturbed


def test_caps_without_generated_images_and_with_two(clip_dir, tmp_path, monkeypatch):
    """--generated G: G rendered images per support prompt join the K real shots; 0 keeps the real shots only."""
    monkeypatch.chdir(tmp_path)
    sizes = {}
    for g in (0, 2):
        argv = _args(clip_dir, tmp_path / "cache", "--task", "colours-noisy", "--shots", "1", "--methods", "caps",
                     "--captioner", "truth", "--views", "1", "--generated", str(g), "--output", f"g{g}.json")
        assert main(argv) == 0
        results = json.loads((tmp_path / f"g{g}.json").read_text())
        assert results["settings"]["generated"] == g
        sizes[g] = results["runs"][0]["hyperparams"]["support_images"]
    assert sizes == {0: 10, 2: 30}


def test_bad_captioner_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fewshot-compare", "--captioner", "blip"])
    assert info.value.code == 2 and "--captioner" in capsys.readouterr().err


def test_bad_list_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fewshot-compare", "--shots", "1,four"])
    assert info.value.code == 2 and "comma-separated list of int" in capsys.readouterr().err
