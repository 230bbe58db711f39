"""`mmadapters eval zeroshot` / `eval fewshot`: the shared results schema, resume after a crash, skipped images.

A tiny generated task (shapes-sketch: 10 classes, 2 test images per class at 32 px) and the shipped tiny CLIP.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mmadapters.eval import clip_tasks
from mmadapters.eval.cli import main
from mmadapters.eval.results_schema import read_results
from mmadapters.eval.sample_runner import SampleLog
from mmadapters.vision.synth import generate_task

SIZES = {"train_per_class": 2, "val_per_class": 2, "test_per_class": 2, "image_size": 32}


@pytest.fixture(scope="module")
def task_root(tmp_path_factory):
    return generate_task("shapes-sketch", tmp_path_factory.mktemp("data") / "shapes-sketch", progress=False, **SIZES)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _zeroshot(root, cache, output, *extra):
    return ["eval", "zeroshot", "--dataset", "shapes-sketch", "--dataset-root", str(root), "--cache-dir", str(cache),
            "--output", str(output), "--batch-size", "8", "--no-progress", *extra]


@pytest.fixture(scope="module")
def uninterrupted(task_root, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("zs") / "zs.json"
    assert main(_zeroshot(task_root, cache, out)) == 0
    return read_results(out), out


def test_zeroshot_schema_counts_and_metrics_same_as_mmadapters_zeroshot_with_workers(uninterrupted, task_root, cache, tmp_path):
    results, out = uninterrupted
    assert results["task"] == "zeroshot_classification" and results["dataset"] == "shapes-sketch"
    assert results["model"] == "tiny_clip"
    assert results["counts"]["total"] == 20 and results["counts"]["evaluated"] == 20 and results["counts"]["skipped"] == 0
    assert results["skipped"] == [] and results["counts"]["resumed"] == 0
    assert list(results["metrics"]) == ["acc1", "acc5", "mean_per_class_recall"]
    assert set(results["per_group"]) == set((task_root / "classnames.txt").read_text().split("\n")) - {""}
    assert sum(g["images"] for g in results["per_group"].values()) == 20
    recalls = [g["recall"] for g in results["per_group"].values()]
    assert results["metrics"]["mean_per_class_recall"] == pytest.approx(sum(recalls) / len(recalls))
    assert not SampleLog.paths(out)  # the samples log is removed once the results are written
    # `mmadapters zeroshot` is the same run (same run_key, numbers, per-class recalls), here with images read
    # ahead by 2 DataLoader workers
    door = tmp_path / "door.json"
    assert main(["zeroshot", "--dataset", "shapes-sketch", "--dataset-root", str(task_root), "--cache-dir", str(cache),
                 "--output", str(door), "--num-workers", "2", "--batch-size", "8", "--no-progress"]) == 0
    reference = read_results(door)
    assert reference["run_key"] == results["run_key"] and reference["per_group"] == results["per_group"]
    assert json.dumps(reference["metrics"]) == json.dumps(results["metrics"])  # NaN acc5 equal too
    # --num-workers 0: read in this process, same predictions image by image
    threads, preds = tmp_path / "threads.json", tmp_path / "threads.jsonl"
    assert main(["zeroshot", "--dataset", "shapes-sketch", "--dataset-root", str(task_root), "--cache-dir", str(cache),
                 "--output", str(threads), "--num-workers", "0", "--batch-size", "3", "--no-progress",
                 "--predictions", str(preds)]) == 0
    assert read_results(threads)["per_group"] == results["per_group"]
    assert len(preds.read_text().splitlines()) == 20


def test_zeroshot_resumes_after_a_crash_and_skips_done_samples(uninterrupted, task_root, cache, tmp_path, monkeypatch):
    out = tmp_path / "zs.json"
    real = clip_tasks.encode_batch
    calls = []

    def crash_on_third(model, images, device):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies in the middle of batch 3
        return real(model, images, device)

    monkeypatch.setattr(clip_tasks, "encode_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        main(_zeroshot(task_root, cache, out))
    assert not out.exists()
    (log,) = SampleLog.paths(out)
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + 16  # header + two batches of 8
    with open(log, "a") as f:  # and a kill -9 in the middle of writing a line
        f.write('{"id": "test/circle/00')

    calls.clear()
    monkeypatch.setattr(clip_tasks, "encode_batch", lambda *a: (calls.append(len(a[1])), real(*a))[1])
    assert main(_zeroshot(task_root, cache, out)) == 0
    assert sum(calls) == 4  # only the 4 images the first run did not record are encoded
    resumed, reference = read_results(out), uninterrupted[0]
    assert resumed["counts"]["resumed"] == 16
    assert resumed["metrics"] == reference["metrics"] and resumed["per_group"] == reference["per_group"]
    assert resumed["run_key"] == reference["run_key"]
    assert not SampleLog.paths(out)


def test_zeroshot_restart_discards_and_other_run_log_is_refused(task_root, cache, tmp_path, capsys):
    out = tmp_path / "zs.json"
    out.with_name(out.name + ".samples.jsonl").write_text('{"schema": "mmadapters.samples/1", "run_key": "other"}\n')
    assert main(_zeroshot(task_root, cache, out)) == 2
    assert "samples of another run" in capsys.readouterr().err
    assert main(_zeroshot(task_root, cache, out, "--restart")) == 0
    assert read_results(out)["counts"]["evaluated"] == 20


def test_zeroshot_corrupt_image_is_skipped_with_its_reason(task_root, cache, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(task_root, root)
    bad = sorted((root / "test").glob("*/*.png"))[3]
    bad.write_bytes(b"not a png at all")
    out = tmp_path / "zs.json"
    assert main(_zeroshot(root, cache, out)) == 0
    results = read_results(out)
    assert results["counts"] == {**results["counts"], "total": 20, "evaluated": 19, "skipped": 1}
    (entry,) = results["skipped"]
    assert entry["id"] == bad.relative_to(root).as_posix()
    assert entry["reason"].startswith("UnreadableImage: UnidentifiedImageError")
    assert sum(g["images"] for g in results["per_group"].values()) == 19
    # --fail-fast stops at it instead
    assert main(_zeroshot(root, cache, tmp_path / "ff.json", "--fail-fast")) == 2
    assert not (tmp_path / "ff.json").exists()


def test_records_metrics_acc5_is_nan_below_five_classes():
    records = [{"label": 0, "top5": [0, 1]}, {"label": 1, "top5": [0, 1]}, {"label": 1, "top5": [1, 0]}]
    metrics, per_class = clip_tasks.records_metrics(records, ["a", "b"])
    assert metrics["acc1"] == pytest.approx(2 / 3) and math.isnan(metrics["acc5"])
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 0.5) / 2)
    assert per_class == {"a": {"recall": 1.0, "images": 1}, "b": {"recall": 0.5, "images": 2}}


# ---------------------------------------------------------------------------------------------------
# eval fewshot on a fitted cache model


@pytest.fixture(scope="module")
def fitted(task_root, cache, tmp_path_factory):
    """A Tip-Adapter-F cache model fitted by the recipe's task (2 gradient steps by hand) and saved."""
    from mmadapters.vision.fewshot_train import TIP_RECIPE, TipRecipeConfig

    config = TipRecipeConfig(dataset="shapes-sketch", dataset_root=str(task_root), cache_dir=str(cache), shots=2,
                             variant="tip-f")

    class Trainer:
        steps, device, progress = 2, "cpu", False

    task = TIP_RECIPE.build_task(config, Trainer())
    opt = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = task.loss(task.model, task.get_batch(list(range(task.train_size()))))
        opt.zero_grad()
        loss.backward()
        opt.step()
    directory = tmp_path_factory.mktemp("run") / "best"
    task.save(directory)
    return directory


def test_fewshot_eval_scores_the_saved_cache_model(fitted, task_root, cache, tmp_path):
    from mmadapters.vision.clip import load_clip
    from mmadapters.vision.fewshot_train import load_cache_model
    from mmadapters.vision.readers import ImageFolderDataset, collate_with_skips
    from mmadapters.vision.zeroshot import extract_image_features

    out, preds = tmp_path / "fs.json", tmp_path / "preds.jsonl"
    assert main(["eval", "fewshot", "--adapters", str(fitted), "--cache-dir", str(cache), "--output", str(out),
                 "--batch-size", "6", "--no-progress", "--predictions", str(preds)]) == 0
    results = read_results(out)
    assert results["task"] == "fewshot_classification" and results["dataset"] == "shapes-sketch"
    assert results["counts"]["total"] == results["counts"]["evaluated"] == 20
    assert results["adapter"]["kind"] == "tip-f" and results["settings"]["split"] == "test"
    # reference: the loaded model on test features encoded by the batched zero-shot path
    clip = load_clip(None, declare_points=False)
    loaded = load_cache_model(fitted)
    ds = ImageFolderDataset(task_root / "test", clip.preprocess, loaded.classnames)
    loader = torch.utils.data.DataLoader(ds, batch_size=20, collate_fn=collate_with_skips)
    feats = extract_image_features(clip.model, loader, progress=False)
    logits = loaded.model.logits(feats.features)
    assert results["parameters"]["trainable"] == 20 * feats.features.shape[1]  # the keys: 2 shots x 10 classes, (N, D)
    assert results["metrics"]["acc1"] == pytest.approx((logits.argmax(1) == feats.labels).double().mean().item())
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [p["prediction"] for p in lines] == logits.argmax(1).tolist() and [p["label"] for p in lines] == feats.labels.tolist()


def test_fewshot_eval_refuses_another_clip(fitted, cache, tmp_path, capsys):
    from mmadapters.vision.clip import tiny_clip_config, write_clip_dir

    other = write_clip_dir(tmp_path / "other", tiny_clip_config(), seed=1)
    assert main(["eval", "fewshot", "--adapters", str(fitted), "--model", f"local-dir:{other}", "--cache-dir", str(cache),
                 "--output", str(tmp_path / "fs.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "clip.identity" in err and "cache_model.json" in err


def test_fewshot_eval_on_a_folder_without_cache_model(tmp_path, capsys):
    assert main(["eval", "fewshot", "--adapters", str(tmp_path), "--output", str(tmp_path / "x.json"), "--no-progress"]) == 2
    assert "no cache_model.json" in capsys.readouterr().err


def test_console_script_ends_fast_with_complete_files_and_its_exit_code(uninterrupted, task_root, cache, tmp_path):
    """The `mmadapters` console script skips interpreter teardown after a command (cli._fast_exit): the results and
    predictions it wrote are complete, stdout is flushed, and the exit code is the command's."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("mmadapters") or str(Path(sys.executable).with_name("mmadapters"))
    out, preds = tmp_path / "zs.json", tmp_path / "zs.jsonl"
    done = subprocess.run([exe, *_zeroshot(task_root, cache, out, "--predictions", str(preds))], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"results written to {out}" in done.stdout
    results, _ = uninterrupted
    assert read_results(out)["per_group"] == results["per_group"]
    assert len(preds.read_text().splitlines()) == results["counts"]["evaluated"]
    bad = subprocess.run([exe, "eval", "zeroshot", "--dataset", "no-such-task", "--cache-dir", str(cache),
                          "--output", str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error" in bad.stderr
