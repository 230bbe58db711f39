"""`mmadapters eval vqa|gqa|nlvr|caption`: the shared results schema, records -> metrics, resume, skipped samples."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from mmadapters.eval import vl_tasks
from mmadapters.eval.cli import main
from mmadapters.eval.metrics import caption_scores, vqa_accuracy
from mmadapters.eval.results_schema import read_results
from mmadapters.eval.sample_runner import SampleLog
from mmadapters.vision.synth_vl import generate_vl
from mmadapters.vision.vl_adapter import open_feature_source, save_trained, task_metrics
from mmadapters.vision.vl_variants import setup_variant
from mmadapters.vision.vlt5 import VLT5

ANNOTATIONS = {"vqa": "vqa/karpathy_test.json", "gqa": "gqa/testdev.json", "nlvr": "nlvr/test.json",
               "caption": "coco/dataset_coco.json"}
MISSING, BROKEN = "synth_000006", "synth_000012"  # two of the three test-split images of the 30-image set below


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 30-image synth_vl folder, its CLIP features (features.h5) and a damaged copy (one image's features
    missing, one NaN), and a trained-adapters directory (perturbed multiple_adapters, one per task)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vl") / "data"
    generate_vl(root, n_images=30, seed=0)
    open_feature_source(None, images=root / "images", num_tokens=16, visual_dim=96, cache=root / "features.h5")
    test_images = {img for s in json.loads((root / ANNOTATIONS["vqa"]).read_text()) for img in [s["img_id"]]}
    assert {MISSING, BROKEN} <= test_images
    with h5py.File(root / "features.h5", "r") as src, h5py.File(root / "damaged.h5", "w") as dst:
        for key in src:
            if key != MISSING:
                dst.create_dataset(key, data=np.full_like(src[key][()], np.nan) if key == BROKEN else src[key][()])
    torch.manual_seed(0)
    model = VLT5.from_pretrained()
    setup = setup_variant(model, "multiple_adapters")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    save_trained(model, setup, root / "best", extra={"model_dir": None})
    return root


def _eval(data, task, output, *extra):
    return main(["eval", task, "--annotations", str(data / ANNOTATIONS[task]), "--features", str(data / "features.h5"),
                 "--adapters", str(data / "best"), "--output", str(output), "--batch-size", "4", "--max-new-tokens", "8",
                 "--no-progress", *extra])


@pytest.mark.parametrize("task", ["vqa", "gqa", "nlvr", "caption"])
def test_each_task_writes_a_valid_results_file(data, tmp_path, task):
    assert _eval(data, task, tmp_path / "r.json") == 0
    results = read_results(tmp_path / "r.json")
    assert results["task"] == vl_tasks.RESULT_TASK[task] and results["model"] == "tiny_vlt5"
    assert results["pretrained"] == str(data / "best")
    counts = results["counts"]
    assert counts["total"] > 0 and counts["evaluated"] == counts["total"] and counts["skipped"] == 0
    main_metric = {"vqa": "vqa_accuracy", "gqa": "accuracy", "nlvr": "accuracy", "caption": "cider"}[task]
    assert list(results["metrics"])[0] == main_metric and 0.0 <= results["metrics"][main_metric] <= 10.0
    assert results["settings"]["active_adapter"] == task  # multiple_adapters: the task's own adapter
    assert results["parameters"]["variant"] == "multiple_adapters" and results["parameters"]["trainable"] > 0
    assert not SampleLog.paths(tmp_path / "r.json")  # the samples log is removed once the results are written
    if task == "vqa":
        assert {g.split("=")[0] for g in results["per_group"]} == {"answer_type", "question_type"}
        assert sum(v["count"] for g, v in results["per_group"].items() if g.startswith("answer_type")) == counts["evaluated"]
    if task == "nlvr":
        assert set(results["per_group"]) <= {"label=true", "label=false"}


def test_metrics_come_from_the_records():
    vqa = [{"id": "1", "prediction": "2", "answers": ["2"] * 10, "label": None, "answer_type": "number",
            "question_type": "how many"},
           {"id": "2", "prediction": "red", "answers": None, "label": {"blue": 1.0, "red": 0.3}, "answer_type": "other"}]
    metrics, groups = task_metrics("vqa", vqa)
    assert metrics["vqa_accuracy"] == pytest.approx((vqa_accuracy("2", ["2"] * 10) + 0.3) / 2)
    assert groups["answer_type=number"] == {"vqa_accuracy": 1.0, "count": 1}
    assert groups["answer_type=other"]["vqa_accuracy"] == pytest.approx(0.3)
    nlvr = [{"id": "a", "prediction": "true", "targets": ["true"]}, {"id": "b", "prediction": "true", "targets": ["false"]}]
    metrics, groups = task_metrics("nlvr", nlvr)
    assert metrics == {"accuracy": 0.5} and groups["label=false"]["accuracy"] == 0.0
    caps = [{"id": str(i), "prediction": f"a red circle {i}", "references": [f"a red circle {i}", "a blue square"]}
            for i in range(3)]
    metrics, _ = task_metrics("caption", caps)
    expected = caption_scores({r["id"]: r["prediction"] for r in caps}, {r["id"]: r["references"] for r in caps})
    assert metrics == {"cider": expected["cider"], "bleu4": expected["bleu4"]}


def test_a_crashed_evaluation_resumes_and_gives_identical_metrics(data, tmp_path, monkeypatch):
    assert _eval(data, "vqa", tmp_path / "full.json") == 0
    full = read_results(tmp_path / "full.json")

    calls = {"n": 0}
    generate = VLT5.generate

    def crash_on_second_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process dies mid-run: the first batch is on disk, the rest is not
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(VLT5, "generate", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _eval(data, "vqa", tmp_path / "crash.json")
    assert not (tmp_path / "crash.json").exists()
    logs = SampleLog.paths(tmp_path / "crash.json")
    assert len(logs) == 1 and len(logs[0].read_text().splitlines()) == 1 + 4  # header + the first batch

    monkeypatch.setattr(VLT5, "generate", generate)
    assert _eval(data, "vqa", tmp_path / "crash.json") == 0
    resumed = read_results(tmp_path / "crash.json")
    assert resumed["counts"]["resumed"] == 4 and full["counts"]["resumed"] == 0
    assert resumed["metrics"] == full["metrics"]
    assert resumed["counts"]["evaluated"] == full["counts"]["evaluated"]
    assert resumed["run_key"] == full["run_key"]  # same settings, other output: the same run


def test_missing_and_nan_features_are_skipped_with_their_reasons(data, tmp_path):
    assert main(["eval", "vqa", "--annotations", str(data / ANNOTATIONS["vqa"]), "--features", str(data / "damaged.h5"),
                 "--adapters", str(data / "best"), "--output", str(tmp_path / "r.json"), "--batch-size", "4",
                 "--max-new-tokens", "4", "--no-progress"]) == 0
    results = read_results(tmp_path / "r.json")
    rows = json.loads((data / ANNOTATIONS["vqa"]).read_text())
    per_image = {img: sum(r["img_id"] == img for r in rows) for img in (MISSING, BROKEN)}
    reasons = [s["reason"] for s in results["skipped"]]
    assert sum("MissingFeaturesError" in r and repr(MISSING) in r for r in reasons) == per_image[MISSING]
    assert sum("NaN" in r and repr(BROKEN) in r for r in reasons) == per_image[BROKEN]
    assert results["counts"]["skipped"] == per_image[MISSING] + per_image[BROKEN]
    assert results["counts"]["evaluated"] == len(rows) - results["counts"]["skipped"]


def test_bad_annotation_rows_are_counted_and_errors_are_named(data, tmp_path, capsys):
    rows = json.loads((data / ANNOTATIONS["gqa"]).read_text())
    del rows[0]["sent"]
    (tmp_path / "gqa.json").write_text(json.dumps(rows))
    assert main(["eval", "gqa", "--annotations", str(tmp_path / "gqa.json"), "--features", str(data / "features.h5"),
                 "--output", str(tmp_path / "r.json"), "--max-new-tokens", "4", "--no-progress"]) == 0
    results = read_results(tmp_path / "r.json")
    assert results["counts"]["bad_rows"] == 1 and results["counts"]["total"] == len(rows)
    assert "field 'sent'" in results["skipped"][0]["reason"] and results["pretrained"] is None
    assert main(["eval", "gqa", "--annotations", str(tmp_path / "gqa.json"), "--output", str(tmp_path / "x.json")]) == 2
    assert "no image features" in capsys.readouterr().err
    assert main(["eval", "nlvr", "--annotations", str(data / ANNOTATIONS["nlvr"]), "--features", str(data / "features.h5"),
                 "--adapters", str(tmp_path), "--output", str(tmp_path / "y.json")]) == 2
    assert "holds no vl_adapter.json" in capsys.readouterr().err
