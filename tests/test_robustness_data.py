"""Bad numbers and degenerate datasets: NaN/inf features, unreadable feature files, empty datasets and repeated
class names raise errors naming the file or argument and what was expected. Part of the bad-input catalogue in
docs/robustness.md."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmadapters.video.readers import AnnotationError, read_dfer_annotation
from mmadapters.vision.fewshot import SupportSet, check_features
from mmadapters.vision.readers import CsvDataset, ImageFolderDataset
from mmadapters.vision.vl_readers import H5Features, SafetensorsDirFeatures, read_vqa
from mmadapters.vision.zeroshot import build_classifier, cached_classifier


def _names(err: pytest.ExceptionInfo, *parts: str) -> None:
    text = str(err.value)
    for part in parts:
        assert part in text, f"{part!r} not in {text!r}"


# ---------------------------------------------------------------------------------------- NaN / inf features


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fewshot_support_features_with_nan_or_inf(bad):
    feats = F.normalize(torch.randn(4, 8), dim=-1)
    feats[2, 3] = bad
    with pytest.raises(ValueError) as err:
        SupportSet(feats, torch.tensor([0, 1, 0, 1]))
    _names(err, "support.image_feats", "contains NaN or inf")
    with pytest.raises(ValueError) as err:
        check_features("val_feats", feats)
    _names(err, "val_feats", "contains NaN or inf")


def test_vl_h5_features_with_nan(tmp_path):
    path = tmp_path / "feats.h5"
    with h5py.File(path, "w") as f:
        f["img0"] = np.ones((3, 4), np.float32)
        bad = np.ones((3, 4), np.float32)
        bad[1, 2] = np.nan
        f.create_group("img1")["features"] = bad
    source = H5Features(path)
    assert source("img0").shape == (3, 4)
    with pytest.raises(ValueError) as err:
        source("img1")
    _names(err, str(path), "image 'img1'", "NaN or inf")


def test_vl_h5_features_that_are_not_numbers(tmp_path):
    """Regression: a string dataset raised a bare TypeError from torch.as_tensor."""
    path = tmp_path / "feats.h5"
    with h5py.File(path, "w") as f:
        f["img0"] = np.array([[b"a", b"b"]])
    with pytest.raises(ValueError) as err:
        H5Features(path)("img0")
    _names(err, str(path), "image 'img0'", "not numeric", "expected a float (N, D) array")


def test_vl_safetensors_features_with_inf_and_a_truncated_file(tmp_path):
    save_file({"features": torch.ones(3, 4)}, str(tmp_path / "img0.safetensors"))
    save_file({"features": torch.full((3, 4), float("inf"))}, str(tmp_path / "img1.safetensors"))
    good = (tmp_path / "img0.safetensors").read_bytes()
    (tmp_path / "img2.safetensors").write_bytes(good[:len(good) // 2])
    source = SafetensorsDirFeatures(tmp_path)
    with pytest.raises(ValueError) as err:
        source("img1")
    _names(err, str(tmp_path), "image 'img1'", "NaN or inf")
    with pytest.raises(ValueError) as err:
        source("img2")
    _names(err, str(tmp_path), "img2.safetensors", "not a readable safetensors file")


def test_vl_safetensors_feature_folder_whose_first_file_is_garbage(tmp_path):
    """Regression: SafetensorError (not a ValueError, naming no file) escaped the constructor."""
    (tmp_path / "a.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(ValueError) as err:
        SafetensorsDirFeatures(tmp_path)
    _names(err, str(tmp_path / "a.safetensors"), "not a readable safetensors file", "'features'")


# --------------------------------------------------------------------------------------------- empty datasets


def test_empty_image_folder(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError) as err:
        ImageFolderDataset(tmp_path)
    _names(err, str(tmp_path), "no images")


def test_empty_csv(tmp_path):
    (tmp_path / "test.csv").write_text("\n\n")
    with pytest.raises(ValueError) as err:
        CsvDataset(tmp_path / "test.csv")
    _names(err, str(tmp_path / "test.csv"), "empty CSV", "expected rows 'path,label'")


def test_empty_vqa_list(tmp_path):
    path = tmp_path / "karpathy_test.json"
    path.write_text(json.dumps([]))
    with pytest.raises(ValueError) as err:
        read_vqa(path, on_error="skip")
    _names(err, str(path), "the list holds no VQA rows")


def test_empty_dfer_list(tmp_path):
    path = tmp_path / "DFEW_set_1_test.txt"
    path.write_text("\n  \n")
    with pytest.raises(AnnotationError) as err:
        read_dfer_annotation(path, "dfew")
    _names(err, str(path), "no clips")


# ---------------------------------------------------------------------------------- repeated class names


class _ToyText(torch.nn.Module):
    """A text 'tower' whose features depend on the tokens only: enough to build a classifier."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(256, 8)

    def encode_text(self, tokens):
        return self.emb(tokens).mean(1)


def _tokenize(texts):
    return torch.tensor([[ord(c) % 256 for c in t[:16].ljust(16)] for t in texts])


def test_zeroshot_classnames_with_duplicates(tmp_path):
    """Regression: repeated names built two identical classifier columns; argmax never chose the second."""
    model = _ToyText()
    assert build_classifier(model, _tokenize, ["cat", "dog"], ["a {c}."], progress=False).shape == (8, 2)
    with pytest.raises(ValueError) as err:
        build_classifier(model, _tokenize, ["cat", "dog", "cat"], ["a {c}."], progress=False)
    _names(err, "classnames[2]", "class name 'cat' repeats classnames[0]", "expected distinct class names")
    with pytest.raises(ValueError, match="repeats classnames"):  # checked before a cache lookup too
        cached_classifier(model, _tokenize, ["cat", "cat"], ["a {c}."], model_name="toy", weights_identity="x",
                          cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.iterdir())
