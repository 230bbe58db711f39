"""Image and evaluation inputs outside the catalogue (issue 17), each with what it now gets; rows 84-93 of
docs/robustness.md. Tiny image folders and a tiny random CLIP written to tmp (local-dir)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import stat
import subprocess

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmadapters.eval.cli import main
from mmadapters.vision.clip import tiny_clip_config, write_clip_dir
from mmadapters.vision.readers import (
    MAX_ASPECT,
    MAX_PIXELS,
    CsvDataset,
    ImageFolderDataset,
    Unreadable,
    open_split,
    read_classnames,
    read_templates,
)

CLASSES = [("red_circle", (230, 30, 30)), ("blue_square", (30, 30, 230)), ("green_star", (30, 200, 30))]


def _write_folder(root, per_split=(("train", 2), ("val", 2), ("test", 2))):
    for split, n in per_split:
        for name, color in CLASSES:
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), tuple(max(0, c - 15 * i) for c in color)).save(folder / f"{i:04d}.png")
    return root


def _strict_json(path):
    """The file parsed as JSON proper: NaN / Infinity (Python's extension) fail."""
    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_clip_dir(tmp_path_factory.mktemp("clip") / "tiny", tiny_clip_config(), seed=0)


@pytest.fixture
def run(clip_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def _run(*args, task=("eval", "zeroshot")):
        return main([*task, "--num-workers", "0", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
                     "--model", f"local-dir:{clip_dir}", *args])

    return _run


@pytest.fixture
def no_model(monkeypatch):
    """Loading a CLIP fails the test: checks that must come first are seen to."""
    import mmadapters.vision.clip as clip_mod

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(clip_mod, "load_clip", boom)


def _mount_tmpfs(path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def read_only_dir(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if not _mount_tmpfs(folder, "ro,size=64k"):  # root writes through permission bits
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture
def full_dir(tmp_path):
    folder = tmp_path / "full"
    folder.mkdir()
    if not _mount_tmpfs(folder, "size=64k"):
        pytest.skip("a full file system needs root and a tmpfs mount here")
    try:
        with pytest.raises(OSError), open(folder / "filler", "wb") as f:
            while True:  # until ENOSPC
                f.write(b"\0" * 4096)
                f.flush()
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


# ----------------------------------------------------------------------- 84: --predictions X --output X

# every `mmadapters eval <task>` with --predictions, with its required flags (the files need not exist: the
# outputs are checked first)
PREDICTION_TASKS = {
    "zeroshot": ["eval", "zeroshot"],
    "fewshot": ["eval", "fewshot", "--adapters", "nowhere"],
    "videoqa": ["eval", "videoqa", "--annotations", "nowhere.jsonl"],
    "dfer": ["eval", "dfer", "--data-dir", "nowhere"],
    "asr": ["eval", "asr", "--manifest", "nowhere.jsonl"],
    "mmadapters zeroshot": ["zeroshot"],
}


@pytest.mark.parametrize("task", list(PREDICTION_TASKS))
def test_predictions_and_output_naming_one_file_are_refused_for_every_task(task, tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results.json"
    results.write_text('{"earlier": "results"}')
    os.symlink(results, tmp_path / "alias.json")
    for predictions in (results, "results.json", tmp_path / "alias.json", tmp_path / "results.json.samples.jsonl"):
        assert main([*PREDICTION_TASKS[task], "--output", str(results), "--predictions", str(predictions)]) == 2
        err = capsys.readouterr().err
        assert f"--predictions {predictions} and --output {results} name the same file" in err, err
        assert err.count("\n") == 1  # one line, no traceback
    assert results.read_text() == '{"earlier": "results"}'


def test_predictions_equal_to_the_filled_in_output_template_are_refused(run, tmp_path, capsys):
    root = _write_folder(tmp_path / "shapes", (("test", 1),))
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--output", "{dataset}.json",
               "--predictions", "shapes.json") == 2
    assert "--predictions shapes.json and --output shapes.json name the same file" in capsys.readouterr().err
    assert not (tmp_path / "shapes.json").exists()


# ----------------------------------------------------------------------- 85: output not writable, disk full

@pytest.mark.parametrize("task", list(PREDICTION_TASKS))
def test_read_only_output_folder_fails_before_the_model_loads(task, read_only_dir, tmp_path, monkeypatch, capsys,
                                                              no_model):
    monkeypatch.chdir(tmp_path)
    assert main([*PREDICTION_TASKS[task], "--output", str(read_only_dir / "sub" / "r.json")]) == 2
    err = capsys.readouterr().err
    assert f"--output {read_only_dir / 'sub' / 'r.json'}: cannot write in {read_only_dir}" in err, err
    assert main([*PREDICTION_TASKS[task], "--output", "r.json", "--predictions", str(read_only_dir / "p.jsonl")]) == 2
    assert f"--predictions {read_only_dir / 'p.jsonl'}: cannot write in {read_only_dir}" in capsys.readouterr().err


def test_vl_tasks_check_their_output_too(read_only_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "vqa", "--annotations", "nowhere.json", "--output", str(read_only_dir / "v.json")]) == 2
    assert f"--output {read_only_dir / 'v.json'}: cannot write in {read_only_dir}" in capsys.readouterr().err


def test_full_disk_fails_before_the_model_loads(full_dir, tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "zeroshot", "--output", str(full_dir / "r.json")]) == 2
    err = capsys.readouterr().err
    assert f"--output {full_dir / 'r.json'}: " in err and ("No space left" in err or "is full" in err), err


def test_output_that_is_a_folder_or_under_a_file_is_named(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    assert main(["eval", "zeroshot", "--output", "folder"]) == 2
    assert "--output folder: is a folder; expected a file path" in capsys.readouterr().err
    assert main(["eval", "zeroshot", "--output", "file/r.json"]) == 2
    assert "--output file/r.json: file is not a folder" in capsys.readouterr().err


# ----------------------------------------------------------------------- 86: symlinks out of an image folder

def test_image_folder_refuses_symlinks_leading_out_of_the_dataset_root(tmp_path):
    outside = _write_folder(tmp_path / "elsewhere", (("", 1),))
    root = _write_folder(tmp_path / "data", (("test", 1), ("train", 1)))
    os.symlink(outside / "red_circle" / "0000.png", root / "test" / "blue_square" / "stolen.png")
    with pytest.raises(ValueError, match=r"image blue_square/stolen.png \(a symlink\): .* escapes the dataset root"):
        open_split("imagefolder", root, "test", None, None)
    os.unlink(root / "test" / "blue_square" / "stolen.png")
    os.symlink(outside / "green_star", root / "test" / "linked_class")  # a whole class folder
    with pytest.raises(ValueError, match=r"image linked_class/0000.png \(a symlink\): .* escapes the dataset root"):
        ImageFolderDataset(root / "test")
    os.unlink(root / "test" / "linked_class")
    # a symlink that stays inside the dataset root (test -> train image) is fine
    os.symlink(root / "train" / "red_circle" / "0000.png", root / "test" / "red_circle" / "from_train.png")
    ds = open_split("imagefolder", root, "test", None, None)
    assert len(ds) == 4 and not any(isinstance(ds[i], Unreadable) for i in range(len(ds)))


# ----------------------------------------------------------------------- 87: class names split at line feeds only

@pytest.mark.parametrize("separator", ["\u0085", "\u2028", "\u2029", "\x0c", "\x0b", "\x1c", "\x1e"])
def test_class_names_with_unicode_line_breaks_inside_stay_one_class(tmp_path, separator):
    names = tmp_path / "classnames.txt"
    names.write_text(f"sea{separator}lion\r\ncat\ndog\n", encoding="utf-8")
    assert read_classnames(names) == [f"sea{separator}lion", "cat", "dog"]
    templates = tmp_path / "templates.txt"
    templates.write_text(f"a photo of a {{c}}{separator}.\na {{c}}.\n", encoding="utf-8")
    assert read_templates(templates) == [f"a photo of a {{c}}{separator}.", "a {c}."]
    # CSV labels by index keep pointing at the right class
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "test.csv").write_text("x.png,2\n")
    ds = CsvDataset(tmp_path / "test.csv", classnames=read_classnames(names))
    assert ds.classnames[ds.samples[0][1]] == "dog"


def test_captions_with_unicode_line_breaks_inside_stay_one_caption(tmp_path):
    from mmadapters.vision.caps_adapter import caption_key, read_captions

    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a red\u2028circle"}, ensure_ascii=False)
                                      + "\n", encoding="utf-8")
    assert read_captions(tmp_path / "c.jsonl") == {caption_key(tmp_path / "a.png"): "a red\u2028circle"}
    (tmp_path / "c.tsv").write_text("a.png\ta red\x0ccircle\n", encoding="utf-8")
    assert read_captions(tmp_path / "c.tsv") == {caption_key(tmp_path / "a.png"): "a red\x0ccircle"}


# ----------------------------------------------------------------------- 88: absurd image sizes

def _tiny_png(size, mode="1") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_images_over_the_pixel_and_aspect_limits_are_skipped_before_decoding(tmp_path):
    root = tmp_path / "data"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "wide.png").write_bytes(_tiny_png((80000, 1)))
    (root / "cat" / "tall.png").write_bytes(_tiny_png((2, 2 * MAX_ASPECT + 1)))
    side = int(MAX_PIXELS ** 0.5) + 1
    (root / "cat" / "huge.png").write_bytes(_tiny_png((side, side)))
    (root / "cat" / "ok.png").write_bytes(_tiny_png((MAX_ASPECT, 1), "RGB"))  # exactly at the aspect limit
    assert (root / "cat" / "wide.png").stat().st_size < 1000
    seen = []
    ds = ImageFolderDataset(root, transform=lambda im: seen.append(im.size) or torch.zeros(3, 2, 2))
    items = {os.path.basename(ds.samples[i][0]): ds[i] for i in range(len(ds))}
    assert items["wide.png"] == Unreadable(str(root / "cat" / "wide.png"), 0, f"aspect ratio over 1:{MAX_ASPECT} (80000x1)")
    assert items["tall.png"].reason == f"aspect ratio over 1:{MAX_ASPECT} (2x{2 * MAX_ASPECT + 1})"
    assert items["huge.png"].reason == f"too many pixels ({side}x{side}; limit {MAX_PIXELS})"
    assert seen == [(MAX_ASPECT, 1)]  # only the image within the limits was decoded and transformed


def test_eval_zeroshot_counts_an_oversized_image_as_skipped(run, tmp_path):
    root = _write_folder(tmp_path / "shapes", (("test", 1),))
    (root / "test" / "red_circle" / "wide.png").write_bytes(_tiny_png((80000, 1)))
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--output", "r.json") == 0
    results = _strict_json(tmp_path / "r.json")
    assert results["counts"]["skipped"] == 1 and results["counts"]["evaluated"] == 3
    assert results["skipped"] == [{"id": "test/red_circle/wide.png",
                                   "reason": f"UnreadableImage: aspect ratio over 1:{MAX_ASPECT} (80000x1)"}]


# ----------------------------------------------------------------------- 89: flat folder and --split

def test_flat_image_folder_with_another_split_is_refused(run, tmp_path, capsys):
    root = _write_folder(tmp_path / "flat", (("", 1),))
    with pytest.raises(ValueError, match=r"a flat image folder .* has no split 'val'"):
        open_split("imagefolder", root, "val", None, None)
    assert len(open_split("imagefolder", root, "test", None, None)) == 3  # the default split: the whole folder
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--split", "val", "--output", "r.json") == 2
    assert "has no split 'val'" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
    # fitting an adapter on a flat folder would take its support and validation images from the evaluated ones
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--adapter", "tip", "--shots", "1",
               "--output", "a.json") == 2
    assert "samples its support images from the train split (or --support-root)" in capsys.readouterr().err


# ----------------------------------------------------------------------- 90: NaN in results JSON

def test_undefined_acc5_is_null_in_the_file_and_a_dash_in_the_report(run, tmp_path, capsys):
    from mmadapters.eval.report import make_report
    from mmadapters.eval.results_schema import read_results

    root = _write_folder(tmp_path / "shapes", (("test", 1),))  # 3 classes: acc5 is undefined
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--output", "r.json") == 0
    assert "acc5 —" in capsys.readouterr().out
    results = _strict_json(tmp_path / "r.json")
    assert results["metrics"]["acc5"] is None and isinstance(results["metrics"]["acc1"], float)
    assert read_results(tmp_path / "r.json")["metrics"]["acc5"] is None
    outcome = make_report([tmp_path / "r.json"], metrics=["acc1", "acc5"])
    row = [c.strip() for c in outcome.markdown.splitlines()[2].strip("|").split(" | ")]
    assert row[6] == "—" and row[5] not in ("", "—")


def test_build_results_writes_null_for_every_non_finite_number(tmp_path):
    from mmadapters.eval.results_schema import build_results, write_results

    results = build_results(dataset="d", model="m", pretrained=None, task="asr", settings={"x": float("inf")},
                            metrics={"wer": 0.5, "relative_wer_reduction": float("nan")},
                            counts={"total": 1, "evaluated": 1, "skipped": 0}, timings={"total_s": 1.0},
                            per_group={"xx": {"wer": float("-inf")}})
    assert results["metrics"]["relative_wer_reduction"] is None and results["settings"]["x"] is None
    write_results(tmp_path / "r.json", results)
    assert _strict_json(tmp_path / "r.json")["per_group"] == {"xx": {"wer": None}}


# ----------------------------------------------------------------------- 91: report files honour the umask

def test_report_png_and_markdown_honour_the_umask(run, tmp_path):
    from mmadapters.eval.report import make_report
    from mmadapters.eval.results_schema import build_results, write_results

    for i, acc in enumerate((0.5, 0.7)):
        write_results(tmp_path / f"{i}.json", build_results(
            dataset="shapes", model=f"m{i}", pretrained=None, task="fewshot_classification", settings={"method": "tip"},
            metrics={"acc1": acc}, counts={"total": 1, "evaluated": 1, "skipped": 0}, timings={"total_s": 1.0},
            parameters={"trainable": 10 * (i + 1), "total": 1000}))
    old = os.umask(0o022)
    try:
        outcome = make_report([tmp_path / "0.json", tmp_path / "1.json"], markdown=tmp_path / "r.md",
                              csv_path=tmp_path / "r.csv", plots=tmp_path / "plots")
    finally:
        os.umask(old)
    written = [*outcome.written["plots"], *outcome.written["markdown"], *outcome.written["csv"]]
    assert len(written) == 3 and written[0].endswith(".png")
    assert {oct(stat.S_IMODE(os.stat(p).st_mode)) for p in written} == {"0o644"}


# ----------------------------------------------------------------------- 92: random weights say so in the results

def _random_init_loader(monkeypatch):
    """load_clip that marks what it loads as a built-in name without weights (random init from seed 0)."""
    import mmadapters.vision.clip as clip_mod

    real = clip_mod.load_clip

    def load(model=None, pretrained=None, **kwargs):
        bundle = real(model, pretrained, **kwargs)
        bundle.info = dataclasses.replace(bundle.info, model="ViT-B-32", pretrained=None, seed=0, weights_sha256=None)
        return bundle

    monkeypatch.setattr(clip_mod, "load_clip", load)


def test_zeroshot_and_fewshot_results_say_random_init(run, tmp_path, monkeypatch, clip_dir):
    from mmadapters.vision.clip import load_clip
    from mmadapters.vision.fewshot import SupportSet
    from mmadapters.vision.fewshot_train import save_cache_model
    from mmadapters.vision.tip_adapter import TipAdapter

    root = _write_folder(tmp_path / "shapes", (("test", 1),))
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--output", "loaded.json") == 0
    assert _strict_json(tmp_path / "loaded.json")["random_init"] is False
    # a cache model for the tiny CLIP's feature size
    dim = load_clip(f"local-dir:{clip_dir}").model.encode_image(torch.zeros(1, 3, 32, 32)).shape[-1]
    g = torch.Generator().manual_seed(0)
    tip = TipAdapter(F.normalize(torch.randn(3, dim, generator=g), dim=-1).T.contiguous(),
                     SupportSet(F.normalize(torch.randn(3, dim, generator=g), dim=-1), torch.tensor([0, 1, 2])))
    save_cache_model(tip, tmp_path / "tip", {"classnames": [n.replace("_", " ") for n, _ in CLASSES],
                                             "clip": {"model": f"local-dir:{clip_dir}", "pretrained": None}})
    _random_init_loader(monkeypatch)
    assert run("--dataset", "imagefolder", "--dataset-root", str(root), "--output", "random.json") == 0
    results = _strict_json(tmp_path / "random.json")
    assert results["random_init"] is True and results["pretrained"] is None
    assert run("--adapters", str(tmp_path / "tip"), "--dataset", "imagefolder", "--dataset-root", str(root),
               "--output", "fewshot.json", task=("eval", "fewshot")) == 0
    results = _strict_json(tmp_path / "fewshot.json")
    assert results["random_init"] is True and results["pretrained"] is None


# ----------------------------------------------------------------------- 93: cache_model.json / .safetensors

@pytest.fixture
def cache_model(tmp_path):
    from mmadapters.vision.fewshot import SupportSet
    from mmadapters.vision.fewshot_train import save_cache_model
    from mmadapters.vision.tip_adapter import TipAdapterF

    g = torch.Generator().manual_seed(0)
    w = F.normalize(torch.randn(3, 8, generator=g), dim=-1).T.contiguous()
    model = TipAdapterF(w, SupportSet(F.normalize(torch.randn(6, 8, generator=g), dim=-1), torch.tensor([0, 0, 1, 1, 2, 2])),
                        alpha=2.0, beta=3.0)
    save_cache_model(model, tmp_path / "tip", {"classnames": ["a", "b", "c"], "validation": {"val_acc5": float("nan")}})
    return tmp_path / "tip"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_cache_model_with_a_non_finite_hyperparameter_is_refused(cache_model, value):
    from mmadapters.vision.fewshot_train import CACHE_CONFIG, load_cache_model

    config = _strict_json(cache_model / CACHE_CONFIG)  # the save itself is JSON proper (val_acc5 null)
    assert config["validation"] == {"val_acc5": None} and config["dtypes"]["cache_labels"] == "int64"
    load_cache_model(cache_model)
    text = (cache_model / CACHE_CONFIG).read_text()
    (cache_model / CACHE_CONFIG).write_text(text.replace('"alpha": 2.0', f'"alpha": {value}'))
    with pytest.raises(ValueError, match=rf"{CACHE_CONFIG}: field 'hyperparams.alpha' is not a finite number"):
        load_cache_model(cache_model)


@pytest.mark.parametrize("key, change, message", [
    ("keys.weight", lambda t: t.index_fill(1, torch.tensor([0]), float("nan")),
     "tensor 'keys.weight' holds NaN or infinite values"),
    ("cache_keys", lambda t: t.index_fill(1, torch.tensor([0]), float("inf")),
     "tensor 'cache_keys' holds NaN or infinite values"),
    ("clip_weights", lambda t: (100 * t).to(torch.int8),
     "tensor 'clip_weights' is stored as int8 but field 'dtypes' of .* declares float32"),
    ("keys.weight", lambda t: t.double(), "tensor 'keys.weight' is stored as float64 but field 'dtypes'"),
    ("cache_labels", lambda t: t.to(torch.uint8), "tensor 'cache_labels' is stored as uint8 but field 'dtypes'"),
])
def test_cache_model_tensor_with_non_finite_values_or_an_undeclared_dtype_is_refused(cache_model, key, change, message):
    from safetensors.torch import load_file, save_file

    from mmadapters.vision.fewshot_train import CACHE_WEIGHTS, load_cache_model

    state = load_file(cache_model / CACHE_WEIGHTS)
    save_file({**state, key: change(state[key]).contiguous()}, cache_model / CACHE_WEIGHTS)
    with pytest.raises(ValueError, match=rf"{CACHE_WEIGHTS}: {message}"):
        load_cache_model(cache_model)


def test_cache_model_written_before_dtypes_were_declared_refuses_other_dtypes(cache_model):
    from safetensors.torch import load_file, save_file

    from mmadapters.vision.fewshot_train import CACHE_CONFIG, CACHE_WEIGHTS, load_cache_model

    config = json.loads((cache_model / CACHE_CONFIG).read_text())
    del config["dtypes"]
    (cache_model / CACHE_CONFIG).write_text(json.dumps(config))
    load_cache_model(cache_model)  # an older file in the dtypes the model holds still loads
    state = load_file(cache_model / CACHE_WEIGHTS)
    save_file({**state, "cache_labels": state["cache_labels"].to(torch.int8)}, cache_model / CACHE_WEIGHTS)
    with pytest.raises(ValueError, match=rf"{CACHE_WEIGHTS}: tensor 'cache_labels' is stored as int8; a tip-f cache model "
                                         "holds int64"):
        load_cache_model(cache_model)
    save_file({**state, "clip_weights": (100 * state["clip_weights"]).to(torch.int8)}, cache_model / CACHE_WEIGHTS)
    with pytest.raises(ValueError, match=rf"{CACHE_WEIGHTS}: clip_weights.* expected a floating-point tensor"):
        load_cache_model(cache_model)


def test_prepare_output_catches_a_filled_template_that_names_the_predictions_file(tmp_path):
    """Every task (zeroshot, fewshot, asr, vqa/gqa/nlvr/caption, videoqa, dfer) opens its results file through
    results_io.prepare_output: a --output template that fills in to the --predictions path is refused too."""
    import argparse

    from mmadapters.eval.results_io import prepare_output

    args = argparse.Namespace(output=str(tmp_path / "{dataset}.json"), predictions=str(tmp_path / "d.json"),
                              overwrite=False)
    with pytest.raises(ValueError, match="name the same file"):
        prepare_output(args, "key", dataset="d")
    args.predictions = str(tmp_path / "preds.jsonl")
    assert prepare_output(args, "key", dataset="d") == tmp_path / "d.json"
