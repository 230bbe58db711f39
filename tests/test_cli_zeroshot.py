"""`mmadapters zeroshot` (the CLIP_benchmark-style door into `mmadapters eval zeroshot`) end to end on tiny image
folders with a tiny random CLIP (local-dir in tmp): the shared results schema, its flags, adapters fitted on the fly."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from mmadapters.eval.cli import main
from mmadapters.eval.results_schema import read_results
from mmadapters.vision.clip import tiny_clip_config, write_clip_dir

CLASSES = [("red_circle", (230, 30, 30)), ("blue_square", (30, 30, 230)), ("green_star", (30, 200, 30))]


def _write_folder(root, per_split=(("train", 3), ("val", 2), ("test", 3))):
    for split, n in per_split:
        for name, color in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), tuple(max(0, c - 15 * i) for c in color)).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_clip_dir(tmp_path_factory.mktemp("clip") / "tiny", tiny_clip_config(), seed=0)


@pytest.fixture
def run(clip_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def _run(*args, model=True):
        base = ["zeroshot", "--num-workers", "0", "--cache-dir", str(tmp_path / "cache")]
        return main(base + (["--model", f"local-dir:{clip_dir}"] if model else []) + list(args))

    return _run


def test_zeroshot_end_to_end_schema_skips_cache_predictions(run, clip_dir, tmp_path, capsys):
    root = _write_folder(tmp_path / "shapes")
    (root / "test" / "green_star" / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["--dataset", "imagefolder", "--dataset-root", str(root), "--batch-size", "4",
            "--output", "out/{dataset}_{model}_{pretrained}_{task}.json", "--predictions", "preds.jsonl"]
    assert run(*args) == 0
    out_file = tmp_path / "out" / "shapes_tiny_none_zeroshot_classification.json"
    results = json.loads(out_file.read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(results)
    assert results["dataset"] == "shapes" and results["task"] == "zeroshot_classification"
    assert results["model"] == "tiny" and results["pretrained"] is None
    assert read_results(out_file)["schema"] == "mmadapters.results/1"  # the shared schema, validated
    m = results["metrics"]
    assert set(m) == {"acc1", "acc5", "mean_per_class_recall"}
    assert 0.0 <= m["acc1"] <= 1.0 and m["acc5"] is None  # 3 classes < 5: undefined, null in the file
    counts = results["counts"]
    assert counts["total"] == 10 and counts["evaluated"] == 9 and counts["skipped"] == 1 and counts["classes"] == 3
    assert results["skipped"] == [{"id": "test/green_star/0003.png", "reason": results["skipped"][0]["reason"]}]
    assert results["skipped"][0]["reason"].startswith("UnreadableImage: OSError")  # the reader's reason
    assert len(results["settings"]["templates"]) == 8  # built-in templates, folder class names
    assert results["settings"]["classnames_source"] == "dataset" and results["settings"]["templates_source"] == "built-in"
    assert {"model_load_s", "classifier_s", "evaluate_s", "total_s"} <= set(results["timings"])
    assert results["classifier_cache_hit"] is False and results["parameters"]["trainable"] == 0
    assert results["library"]["version"] and results["run_key"]
    lines = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(lines) == 9 and set(lines[0]) == {"id", "label", "prediction", "top5", "top5_names"}
    assert all(len(p["top5"]) == 3 and p["prediction"] == p["top5"][0] for p in lines)
    acc = sum(p["label"] == p["prediction"] for p in lines) / 9
    assert acc == pytest.approx(m["acc1"])
    assert "skipped" in capsys.readouterr().out

    # second run: the classifier comes from the cache; same numbers; same run may refresh its file
    assert run(*args) == 0
    again = json.loads(out_file.read_text())
    assert again["classifier_cache_hit"] is True
    assert again["metrics"]["acc1"] == m["acc1"] and again["run_key"] == results["run_key"]
    assert len(list((tmp_path / "cache" / "classifiers").glob("*.safetensors"))) == 1

    # a different run (other templates) does not silently replace the file
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n")
    assert run(*args, "--templates", str(tmp_path / "t.txt")) == 2
    assert "holds the results of a different run" in capsys.readouterr().err
    assert json.loads(out_file.read_text())["run_key"] == results["run_key"]
    assert run(*args, "--templates", str(tmp_path / "t.txt"), "--overwrite") == 0
    assert json.loads(out_file.read_text())["settings"]["templates"] == ["a photo of a {c}."]

    # --on-error fail (= --fail-fast) stops at the unreadable image and names it
    for flag in (["--on-error", "fail"], ["--fail-fast"]):
        assert run(*args, *flag, "--output", "fail.json") == 2
        err = capsys.readouterr().err
        assert "0003.png" in err and "cannot read image" in err
        assert not (tmp_path / "fail.json").exists()
    assert run(*args, "--on-error", "skip", "--output", "skip.json") == 0
    assert json.loads((tmp_path / "skip.json").read_text())["run_key"] == results["run_key"]


def test_classnames_and_templates_files_at_root(run, tmp_path):
    root = _write_folder(tmp_path / "shapes", (("test", 2),))
    (root / "classnames.txt").write_text("red circle\nblue square\ngreen star\n")
    (root / "templates.txt").write_text("a {c}.\nthe {c}\n")
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--output", "r.json") == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert len(results["settings"]["templates"]) == 2
    assert results["settings"]["classnames_source"].endswith("classnames.txt")
    (root / "classnames.txt").write_text("one\ntwo\n")
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--output", "r2.json") == 2


def test_wds_and_csv_datasets_through_the_cli(run, tmp_path):
    wds = tmp_path / "wds"
    (wds / "test").mkdir(parents=True)
    (wds / "classnames.txt").write_text("\n".join(f"class {i}" for i in range(6)) + "\n")
    (wds / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nart of the {c}.\n")
    with tarfile.open(wds / "test" / "0.tar", "w") as tar:
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert run("--dataset", "wds", "--dataset-root", str(wds), "--output", "wds.json") == 0
    results = json.loads((tmp_path / "wds.json").read_text())
    assert results["counts"]["evaluated"] == 6 and len(results["settings"]["templates"]) == 2
    assert not math.isnan(results["metrics"]["acc5"])  # 6 classes: acc5 is defined

    root = _write_folder(tmp_path / "imgs", (("test", 1),))
    (root / "test.csv").write_text("path,label\ntest/red_circle/0000.png,red circle\ntest/blue_square/0000.png,blue square\n")
    (root / "classnames.txt").write_text("red circle\nblue square\ngreen star\n")
    assert run("--dataset", "csv", "--dataset-root", str(root), "--output", "csv.json") == 0
    assert json.loads((tmp_path / "csv.json").read_text())["counts"]["evaluated"] == 2
    (root / "test.csv").write_text("path,label\ntest/red_circle/0000.png,purple\n")
    assert run("--dataset", "csv", "--dataset-root", str(root), "--output", "csv2.json") == 2


def test_errors_are_reported_not_raised(run, tmp_path, capsys, monkeypatch):
    assert run("--dataset", "imagefolder") == 2
    assert "needs --dataset-root" in capsys.readouterr().err
    assert run("--dataset", "imagefolder", "--dataset-root", str(tmp_path / "missing")) == 2
    assert "image folder not found" in capsys.readouterr().err
    import mmadapters.vision.clip as clip_mod

    monkeypatch.setattr(clip_mod, "TINY_CLIP_DIR", tmp_path / "absent")
    root = _write_folder(tmp_path / "shapes", (("test", 1),))
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), model=False) == 2
    assert "shipped tiny CLIP is missing" in capsys.readouterr().err


def test_adapters_use_train_shots_and_val_split(run, tmp_path, capsys):
    pytest.importorskip("mmadapters.vision.fewshot")
    root = _write_folder(tmp_path / "shapes")
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--adapter", "tip", "--shots", "2",
               "--output", "tip.json") == 0
    results = json.loads((tmp_path / "tip.json").read_text())
    assert results["task"] == "fewshot_classification"
    assert results["settings"]["method"] == "tip" and results["settings"]["shots"] == 2
    adapter = results["adapter"]
    assert adapter["kind"] == "tip" and adapter["support_images"] == 6 and adapter["val_images"] == 6
    assert adapter["hyperparams"] and adapter["trainable"] == 0 and results["parameters"]["cache"] > 0
    zeroshot = json.loads((tmp_path / "zs.json").read_text()) if run(
        "--dataset", "imagefolder", "--dataset-root", str(root), "--output", "zs.json") == 0 else None
    assert zeroshot["run_key"] != results["run_key"]
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--adapter", "tip", "--shots", "2") == 0
    assert (tmp_path / "shapes_tiny_tip-2shot.json").is_file()  # the default output names the method
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--adapter", "tip", "--shots", "5") == 2
    assert "k=5" in capsys.readouterr().err  # only 3 train images per class
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--adapter", "caps", "--shots", "1") == 2
    assert "needs captions" in capsys.readouterr().err
    with open(root / "captions.jsonl", "w") as f:
        for name, _ in CLASSES:
            for i in range(3):
                f.write(json.dumps({"image": f"train/{name}/{i:04d}.png", "caption": f"a bright {name} shape"}) + "\n")
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--adapter", "caps", "--shots", "1",
               "--output", "caps.json") == 0
    assert json.loads((tmp_path / "caps.json").read_text())["adapter"]["captions"].endswith("captions.jsonl")
    import shutil

    shutil.rmtree(root / "val")
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--adapter", "tip", "--shots", "1") == 2
    assert "validation split" in capsys.readouterr().err


def test_synth_task_is_generated_when_missing(run, tmp_path, monkeypatch):
    synth = pytest.importorskip("mmadapters.vision.synth")
    calls = []
    real = synth.generate_task

    def small(task, root, **kwargs):
        calls.append(task)
        return real(task, root, train_per_class=1, val_per_class=1, test_per_class=1, image_size=32, progress=False)

    monkeypatch.setattr(synth, "generate_task", small)
    root = tmp_path / "synth"
    args = ["--dataset", "synth-shapes", "--dataset-root", str(root), "--output", "{dataset}.json"]
    assert run(*args) == 0
    assert calls == ["synth-shapes"] and (root / "task.json").is_file()
    results = json.loads((tmp_path / "synth-shapes.json").read_text())
    assert results["dataset"] == "synth-shapes" and results["settings"]["templates_source"].endswith("templates.txt")
    assert run(*args) == 0 and calls == ["synth-shapes"]  # already there: not generated again
    assert run("--dataset", "synth-shapes", "--dataset-root", str(root)) == 0
    assert (tmp_path / "synth-shapes_tiny_zeroshot.json").is_file()  # the default output
    other = [t for t in synth.TASKS if t != "synth-shapes"]
    if other:
        assert run("--dataset", other[0], "--dataset-root", str(root)) == 2  # root holds another task


def test_zeroshot_and_eval_zeroshot_are_one_parser():
    from mmadapters.eval.cli import build_parser

    parser = build_parser()
    door, task = vars(parser.parse_args(["zeroshot"])), vars(parser.parse_args(["eval", "zeroshot"]))
    assert door["func"] is task["func"] and door["batch_size"] == task["batch_size"] == 64
    assert {k: v for k, v in door.items() if k in task and k != "command"} == {
        k: v for k, v in task.items() if k in door and k != "command"}
    assert set(task) - set(door) <= {"eval_task", "task"} and set(door) - set(task) == set()
    assert parser.parse_args(["zeroshot", "--on-error", "fail"]).fail_fast is True
    assert parser.parse_args(["eval", "zeroshot", "--on-error", "skip"]).fail_fast is False


def test_help_lists_zeroshot_without_importing_torch():
    code = ("import sys\nfrom mmadapters.eval import cli\nparser = cli.build_parser()\n"
            "assert 'zeroshot' in parser.format_help()\nprint('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
