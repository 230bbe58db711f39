"""Dataset readers (image folder, CSV, CoOp split JSON, CLIP_benchmark wds tars) and classification metrics."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mmadapters.eval.metrics import classification_metrics, mean_per_class_recall, topk_accuracy
from mmadapters.vision.readers import (
    CoopSplitDataset,
    CsvDataset,
    ImageFolderDataset,
    Unreadable,
    WdsDataset,
    collate_with_skips,
    read_templates,
)


def _png(color, size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    for ci, name in enumerate(["red_thing", "blue"]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"{i}.png").write_bytes(_png((200 * (ci == 0), 0, 200 * (ci == 1))))
    (root / "blue" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_sorted_classes_and_items(folder):
    ds = ImageFolderDataset(folder, transform=_to_tensor)
    assert ds.classnames == ["blue", "red thing"] and ds.labels == [0, 0, 1, 1]
    image, label, path = ds[2]
    assert image.shape == (3, 8, 8) and label == 1 and path.endswith("red_thing/0.png")
    assert image[0].mean() > 0.7  # red channel of a red image


def test_corrupt_image_is_a_marker_and_collate_sets_it_aside(folder):
    (folder / "blue" / "1.png").write_bytes(_png((0, 0, 255))[:40])  # truncated
    ds = ImageFolderDataset(folder, transform=_to_tensor)
    bad = ds[1]
    assert isinstance(bad, Unreadable) and bad.label == 0 and bad.path.endswith("1.png") and bad.reason
    images, labels, paths, skipped = collate_with_skips([ds[i] for i in range(len(ds))])
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [0, 1, 1] and len(paths) == 3
    assert [s.path for s in skipped] == [bad.path]
    images, labels, paths, skipped = collate_with_skips([bad])
    assert images is None and labels.numel() == 0 and len(skipped) == 1


def test_csv_indices_names_header_and_errors(folder, tmp_path):
    csv_path = folder / "list.csv"
    csv_path.write_text("path,label\nblue/0.png,blue\nred_thing/1.png,red thing\n")
    ds = CsvDataset(csv_path, transform=_to_tensor)
    assert ds.classnames == ["blue", "red thing"] and ds.labels == [0, 1]
    assert ds[1][0][0].mean() > 0.7
    csv_path.write_text("blue/0.png,1\nred_thing/1.png,0\n")  # no header, indices
    assert CsvDataset(csv_path, classnames=["x", "y"]).labels == [1, 0]
    with pytest.raises(ValueError, match="labels are class indices; give the class names"):
        CsvDataset(csv_path)
    csv_path.write_text("path,label\nblue/0.png,0\nred_thing/1.png,7\n")
    with pytest.raises(ValueError, match=r"list\.csv: row 3 field 'label': class index 7 is outside \[0, 2\)"):
        CsvDataset(csv_path, classnames=["x", "y"])
    csv_path.write_text("blue/0.png,zebra\n")
    with pytest.raises(ValueError, match=r"row 1 field 'label': expected a class index or one of the 2 class names, got 'zebra'"):
        CsvDataset(csv_path, classnames=["x", "y"])
    csv_path.write_text("../outside.png,x\n")
    with pytest.raises(ValueError, match=r"row 1 field 'path': path '../outside.png' escapes the dataset root"):
        CsvDataset(csv_path, classnames=["x"])
    csv_path.write_text("blue/0.png\n")
    with pytest.raises(ValueError, match="row 1: expected fields 'path,label'"):
        CsvDataset(csv_path, classnames=["x"])
    with pytest.raises(FileNotFoundError, match="CSV file not found"):
        CsvDataset(tmp_path / "missing.csv")


def test_coop_split_json(folder):
    images = folder.parent / "coop" / "images"
    images.parent.mkdir()
    folder.rename(images)
    split = {
        "train": [["blue/0.png", 0, "blue"], ["red_thing/0.png", 1, "red thing"]],
        "val": [["blue/1.png", 0, "blue"]],
        "test": [["red_thing/1.png", 1, "red thing"], ["blue/1.png", 0, "blue"]],
    }
    (images.parent / "split_zhou_Toy.json").write_text(json.dumps(split))
    ds = CoopSplitDataset(images.parent, "test", transform=_to_tensor)
    assert ds.classnames == ["blue", "red thing"] and ds.labels == [1, 0] and ds.image_root == images
    assert ds[0][0][0].mean() > 0.7
    assert len(CoopSplitDataset(images.parent, "train")) == 2
    with pytest.raises(ValueError, match="no split 'dev'"):
        CoopSplitDataset(images.parent, "dev")
    split["test"].append(["../../x.png", 0, "blue"])
    (images.parent / "split_zhou_Toy.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match=r"test\[2\] field 'path': path '../../x.png' escapes"):
        CoopSplitDataset(images.parent, "test", image_root=images)
    split["test"][-1] = ["blue/0.png", "zero", "blue"]
    (images.parent / "split_zhou_Toy.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match=r"test\[2\]: expected \[relative path, integer label, class name\]"):
        CoopSplitDataset(images.parent, "test")


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_wds_layout_tars_written_here(tmp_path):
    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("cat\ndog\nbird\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        _add(tar, "s000.webp", _png((255, 0, 0)))  # PIL sniffs the content, not the extension
        _add(tar, "s000.cls", b"2")
        _add(tar, "s001.png", _png((0, 255, 0)))
        _add(tar, "s001.cls", b"0\n")
    with tarfile.open(root / "test" / "1.tar", "w") as tar:
        _add(tar, "s002.jpg", b"this is not a jpeg")
        _add(tar, "s002.cls", b"1")
    ds = WdsDataset(root, "test", transform=_to_tensor)
    assert ds.classnames == ["cat", "dog", "bird"] and ds.labels == [2, 0, 1]
    assert ds[0][0][0].mean() > 0.9 and ds[1][0][1].mean() > 0.9
    assert ds[0][2].endswith("0.tar/s000.webp")
    assert isinstance(ds[2], Unreadable) and ds[2].label == 1
    assert read_templates(root / "zeroshot_classification_templates.txt") == ["a photo of a {c}."]
    with tarfile.open(root / "test" / "2.tar", "w") as tar:
        _add(tar, "s003.png", _png((0, 0, 0)))
        _add(tar, "s003.cls", b"9")
    with pytest.raises(ValueError, match=r"2\.tar: sample 's003' field 'cls': expected a class index in \[0, 3\), got '9'"):
        WdsDataset(root, "test")
    with pytest.raises(FileNotFoundError, match="expected webdataset shards"):
        WdsDataset(root, "train")


def test_templates_need_placeholder(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {c}.\nno placeholder\n")
    with pytest.raises(ValueError, match=r"templates\.txt: template 2 'no placeholder' has no '\{c\}'"):
        read_templates(path)


def test_metrics_conventions():
    logits = torch.tensor([[3.0, 2, 1, 0, -1, -2], [0, 3, 2, 1, -1, -2], [0, 1, 3, 2, -1, -2], [0, 1, 2, 3, 4, 5]])
    labels = torch.tensor([0, 0, 2, 0])
    assert topk_accuracy(logits, labels, 1) == 0.5
    assert topk_accuracy(logits, labels, 2) == 0.5
    assert topk_accuracy(logits, labels, 4) == 0.75  # row 2 ranks class 0 fourth
    assert topk_accuracy(logits, labels, 5) == 0.75  # the last row ranks class 0 sixth
    assert math.isnan(topk_accuracy(logits[:, :4], labels, 5))  # fewer than 5 classes
    # recall per present class: class 0 -> 1/3, class 2 -> 1/1; mean 2/3 (absent classes do not count)
    assert mean_per_class_recall(logits.argmax(1), labels, 6) == pytest.approx(2 / 3)
    m = classification_metrics(logits.numpy(), labels.numpy())
    assert m["acc1"] == 0.5 and m["acc5"] == 0.75 and m["mean_per_class_recall"] == pytest.approx(2 / 3)
    assert math.isnan(classification_metrics(logits[:, :3], labels)["acc5"])
    with pytest.raises(ValueError, match=r"expected logits \(N, C\) and labels \(N,\)"):
        topk_accuracy(logits, labels[:2], 1)
