"""VL annotation readers (VQAv2 Karpathy, GQA, NLVR2, COCO Karpathy) and per-image feature sources."""

from __future__ import annotations

import json
import pickle

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mmadapters.eval.metrics import vqa_accuracy
from mmadapters.vision.vl_readers import (
    FeatureSource,
    H5Features,
    ImageFeatures,
    SafetensorsDirFeatures,
    VLSample,
    VLSplit,
    filter_with_features,
    load_features,
    nlvr2_image_ids,
    read_coco_karpathy,
    read_gqa,
    read_nlvr2,
    read_vqa,
)


def _json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


VQA_ROW = {"img_id": "COCO_val2014_000000000042", "sent": "How many dogs?", "question_id": 42000,
           "label": {"3": 0.3, "2": 1.0}, "answer_type": "number", "question_type": "how many",
           "answers": [{"answer": "2", "answer_id": i} for i in range(9)] + [{"answer": "3", "answer_id": 9}]}


# ------------------------------------------------------------------------------------------ VQA / GQA


def test_read_vqa(tmp_path):
    row2 = {"img_id": 7, "sent": "Is it red?", "question_id": "q2", "label": {}, "answers": ["yes", "no"]}
    split = read_vqa(_json(tmp_path / "karpathy_val.json", [VQA_ROW, row2]))
    assert isinstance(split, VLSplit) and split.task == "vqa" and split.skipped == [] and len(split) == 2
    s = split[0]
    assert isinstance(s, VLSample)
    assert (s.task, s.uid, s.img_ids, s.text) == ("vqa", "42000", ["COCO_val2014_000000000042"], "How many dogs?")
    assert s.targets == ["2", "3"]  # by score, best first
    assert s.label == {"3": 0.3, "2": 1.0}
    assert s.answers == ["2"] * 9 + ["3"]
    assert s.meta["answer_type"] == "number" and s.meta["question_type"] == "how many"
    assert vqa_accuracy("two", s.answers) == 1.0
    assert split[1].uid == "q2" and split[1].img_ids == ["7"] and split[1].targets == [] and split[1].answers == ["yes", "no"]
    assert split.path == tmp_path / "karpathy_val.json"


def test_read_vqa_without_answers_or_label(tmp_path):
    row = {k: v for k, v in VQA_ROW.items() if k not in ("answers", "label")}
    s = read_vqa(_json(tmp_path / "test.json", [row]))[0]
    assert s.answers is None and s.label is None and s.targets == []


@pytest.mark.parametrize("change, field", [
    ({"sent": None}, "sent"),
    ({"img_id": ""}, "img_id"),
    ({"question_id": True}, "question_id"),
    ({"label": {"2": float("nan")}}, "label"),
    ({"label": {"2": -1}}, "label"),
    ({"label": [1]}, "label"),
    ({"answers": []}, "answers"),
    ({"answers": [{"text": "2"}]}, "answers"),
])
def test_read_vqa_bad_rows_name_file_row_and_field(tmp_path, change, field):
    bad = {**VQA_ROW, "question_id": 1, **change}
    path = _json(tmp_path / "v.json", [VQA_ROW, bad])
    with pytest.raises(ValueError, match=rf"v\.json: row 1: field '{field}'"):
        read_vqa(path)
    split = read_vqa(path, on_error="skip")
    assert [s.uid for s in split] == ["42000"]
    assert len(split.skipped) == 1 and split.skipped[0][0] == 1 and f"field '{field}'" in split.skipped[0][1]


def test_read_vqa_missing_field_duplicate_uid_and_non_object(tmp_path):
    missing = {k: v for k, v in VQA_ROW.items() if k != "sent"}
    path = _json(tmp_path / "v.json", [VQA_ROW, missing, VQA_ROW, 5])
    with pytest.raises(ValueError, match=r"row 1: field 'sent': missing"):
        read_vqa(path)
    split = read_vqa(path, on_error="skip")
    assert len(split) == 1
    reasons = [r for _, r in split.skipped]
    assert [i for i, _ in split.skipped] == [1, 2, 3]
    assert "appears twice" in reasons[1] and "expected a JSON object" in reasons[2]


@pytest.mark.parametrize("content, message", [
    ("", "empty file"),
    ("  \n", "empty file"),
    ("[]", "no VQA rows"),
    ('{"a": 1}', "expected a JSON list"),
    ("[{", "not valid JSON"),
])
def test_read_vqa_bad_files_always_raise(tmp_path, content, message):
    path = tmp_path / "v.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_vqa(path, on_error="skip")


def test_reader_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="VQA annotation file not found"):
        read_vqa(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="on_error"):
        read_vqa(_json(tmp_path / "v.json", [VQA_ROW]), on_error="ignore")


def test_read_gqa(tmp_path):
    rows = [{"img_id": "n1", "sent": "What is left of the cup?", "question_id": "g1", "label": {"spoon": 1.0}},
            {"img_id": "n2", "sent": "Color?", "question_id": "g2", "label": "red"},
            {"img_id": "n3", "sent": "Which?", "question_id": "g3", "label": {"a": 0.5, "b": 1.0}}]
    split = read_gqa(_json(tmp_path / "testdev.json", rows))
    assert [s.targets for s in split] == [["spoon"], ["red"], ["b"]]
    assert split[1].label == {"red": 1.0} and split[0].task == "gqa" and split[0].img_ids == ["n1"]
    with pytest.raises(ValueError, match=r"row 0: field 'question_id': missing"):
        read_gqa(_json(tmp_path / "bad.json", [{"img_id": "n1", "sent": "q", "label": "x"}]))


# ------------------------------------------------------------------------------------------ NLVR2


def test_read_nlvr2_vlt5_rows(tmp_path):
    rows = [{"identifier": "dev-1-0-0", "img0": "dev-1-0-img0", "img1": "dev-1-0-img1", "sent": "Two dogs.",
             "label": 1, "uid": "nlvr2_dev_0"},
            {"identifier": "dev-1-0-1", "img0": "a", "img1": "b", "sent": "No dogs.", "label": 0}]
    split = read_nlvr2(_jsonl(tmp_path / "valid.json", rows))
    assert [s.targets for s in split] == [["true"], ["false"]]
    assert split[0].img_ids == ["dev-1-0-img0", "dev-1-0-img1"] and split[0].uid == "dev-1-0-0"
    assert split[0].meta["uid"] == "nlvr2_dev_0" and split[0].meta["label"] == 1 and split[0].text == "Two dogs."
    # a JSON list is read too
    assert [s.uid for s in read_nlvr2(_json(tmp_path / "list.json", rows))] == ["dev-1-0-0", "dev-1-0-1"]


def test_read_nlvr2_raw_release_rows(tmp_path):
    rows = [{"identifier": "test1-850-2-3", "sentence": "One image has a bird.", "label": "True",
             "left_url": "http://x", "synset": "n1"},
            {"identifier": "test1-850-2-4", "sentence": "Nothing.", "label": "false"}]
    split = read_nlvr2(_jsonl(tmp_path / "test1.jsonl", rows))
    assert split[0].img_ids == ["test1-850-2-img0", "test1-850-2-img1"]
    assert [s.targets for s in split] == [["true"], ["false"]]
    assert nlvr2_image_ids("dev-850-0-3") == ("dev-850-0-img0", "dev-850-0-img1")


def test_read_nlvr2_bad_lines(tmp_path):
    good = {"identifier": "dev-1-0-0", "img0": "a", "img1": "b", "sent": "s", "label": 1}
    lines = [good,
             "{not json",                                        # line 2
             {**good, "identifier": "dev-1-0-1", "label": 2},    # line 3: label not 0/1
             {**good, "identifier": "dev-1-0-2", "label": "maybe"},
             {"identifier": "dev-1-0-3", "img0": "a", "sent": "s", "label": 0},  # img1 missing
             {"identifier": "x", "sent": "s", "label": 0},       # no image ids and none derivable
             {"identifier": "dev-1-0-4", "img0": "a", "img1": "b", "label": 0}]  # no sentence
    path = _jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: not valid JSON"):
        read_nlvr2(path)
    split = read_nlvr2(path, on_error="skip")
    assert [s.uid for s in split] == ["dev-1-0-0"]
    assert [i for i, _ in split.skipped] == [2, 3, 4, 5, 6, 7]
    reasons = dict(split.skipped)
    assert "field 'label': expected 0 or 1" in reasons[3] and "field 'label'" in reasons[4]
    assert "field 'img1': missing" in reasons[5]
    assert "cannot derive image ids" in reasons[6]
    assert "field 'sentence': missing" in reasons[7]


# ------------------------------------------------------------------------------------------ COCO Karpathy


def _coco(tmp_path):
    def image(imgid, split, caps, name=None):
        name = name or f"COCO_val2014_{imgid:012d}.jpg"
        return {"filepath": "val2014", "filename": name, "imgid": imgid, "cocoid": 1000 + imgid, "split": split,
                "sentids": list(range(len(caps))),
                "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": imgid, "sentid": j} for j, c in enumerate(caps)]}

    data = {"dataset": "coco", "images": [image(0, "test", ["A dog.", "A brown dog runs."]), image(1, "train", ["Cat."]),
                                          image(2, "restval", ["Bird."]), image(3, "val", ["Car."])]}
    return _json(tmp_path / "dataset_coco.json", data), data


def test_read_coco_karpathy(tmp_path):
    path, _ = _coco(tmp_path)
    test = read_coco_karpathy(path)
    assert len(test) == 1 and test.task == "caption"
    s = test[0]
    assert (s.uid, s.img_ids, s.text, s.targets) == ("0", ["COCO_val2014_000000000000"], "", ["A dog.", "A brown dog runs."])
    assert s.meta["split"] == "test" and s.meta["cocoid"] == 1000
    train = read_coco_karpathy(path, splits=("train",))
    assert sorted(s.uid for s in train) == ["1", "2"]  # restval counts as train
    assert [s.uid for s in read_coco_karpathy(path, split="restval")] == ["2"]
    assert [s.uid for s in read_coco_karpathy(path, "val")] == ["3"]
    with pytest.raises(ValueError, match="unknown COCO Karpathy split"):
        read_coco_karpathy(path, splits=("dev",))


def test_read_coco_karpathy_image_root_and_bad_images(tmp_path):
    path, data = _coco(tmp_path)
    root = tmp_path / "images"
    s = read_coco_karpathy(path, image_root=root)[0]
    assert s.meta["path"] == str((root / "val2014" / "COCO_val2014_000000000000.jpg").resolve())
    data["images"][0]["filepath"] = "../.."
    data["images"][3]["split"] = "holdout"
    data["images"].append({"filename": "x.jpg", "imgid": 9, "split": "test", "sentences": []})
    bad = _json(tmp_path / "bad.json", data)
    with pytest.raises(ValueError, match=r"bad\.json: images\[0\]: .*escapes the dataset root"):
        read_coco_karpathy(bad, image_root=root)
    split = read_coco_karpathy(bad, splits=("test", "val"), image_root=root, on_error="skip")
    assert len(split) == 0 and [i for i, _ in split.skipped] == [0, 3, 4]
    assert "unknown split 'holdout'" in split.skipped[1][1] and "field 'sentences'" in split.skipped[2][1]
    with pytest.raises(ValueError, match="no images in split"):
        read_coco_karpathy(_json(tmp_path / "c.json", {"images": [data["images"][1]]}), splits="test")
    with pytest.raises(ValueError, match=r"expected \{\"images\""):
        read_coco_karpathy(_json(tmp_path / "d.json", []))


# ------------------------------------------------------------------------------------------ features


def _feats(seed, n=4, d=6):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_h5_features_both_layouts(tmp_path):
    path = tmp_path / "feats.h5"
    with h5py.File(path, "w") as f:
        f["img_a"] = _feats(0).numpy()
        f.create_group("img_b")["features"] = _feats(1).numpy().astype(np.float16)  # VL-T5's group layout
        f["img_nan"] = np.full((4, 6), np.nan, dtype=np.float32)
        f["img_wide"] = np.zeros((4, 7), dtype=np.float32)
    src = load_features(path)
    assert isinstance(src, H5Features) and isinstance(src, FeatureSource)
    assert (src.num_tokens, src.dim) == (4, 6) and "img_a" in src and "nope" not in src and len(src) == 4
    assert torch.equal(src("img_a"), _feats(0))
    b = src("img_b")
    assert b.dtype == torch.float32 and torch.allclose(b, _feats(1), atol=1e-2)
    assert src.stack(["img_a", "img_b"]).shape == (2, 4, 6)
    with pytest.raises(KeyError, match=r"feats\.h5.*'nope'"):
        src("nope")
    with pytest.raises(ValueError, match=r"feats\.h5.*'img_nan'.*NaN"):
        src("img_nan")
    with pytest.raises(ValueError, match=r"'img_wide'.*\(4, 7\)"):
        src("img_wide")
    clone = pickle.loads(pickle.dumps(src))  # no open handle travels to DataLoader workers
    assert torch.equal(clone("img_a"), _feats(0))


def test_safetensors_dir_features(tmp_path):
    folder = tmp_path / "feats"
    folder.mkdir()
    save_file({"features": _feats(0)}, str(folder / "img_a.safetensors"))
    save_file({"features": torch.full((4, 6), float("inf"))}, str(folder / "img_inf.safetensors"))
    save_file({"other": _feats(0)}, str(folder / "img_z.safetensors"))
    (tmp_path / "secret.safetensors").write_bytes(b"")
    src = load_features(folder)
    assert isinstance(src, SafetensorsDirFeatures) and (src.num_tokens, src.dim) == (4, 6)
    assert torch.equal(src("img_a"), _feats(0)) and src.ids == ["img_a", "img_inf", "img_z"]
    with pytest.raises(KeyError, match=r"feats.*'missing'"):
        src("missing")
    with pytest.raises(KeyError, match="no features"):
        src("../secret")  # ids never reach outside the folder
    assert "../secret" not in src
    with pytest.raises(ValueError, match=r"'img_inf'.*NaN or inf"):
        src("img_inf")
    with pytest.raises(ValueError, match=r"img_z\.safetensors has no tensor 'features'"):
        src("img_z")


def test_image_features_encode_once_and_cache(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (8, 8), color).save(root / f"im{i}.png")
    (root / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    calls = []

    def encode(images):
        calls.append(len(images))
        x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).mean(dim=(0, 1)) for im in images])
        return x[:, None, :].expand(-1, 2, -1)  # (B, 2 tokens, 3 channels)

    src = load_features(root, encode=encode)
    assert isinstance(src, ImageFeatures)
    assert (src.num_tokens, src.dim) == (2, 3)  # probed by encoding the first readable image ("broken" sorts first)
    out = src.stack(["im1", "im2", "im1"])
    assert out.shape == (3, 2, 3) and torch.equal(out[0], out[2])
    assert out[0, 0].tolist() == [0.0, 0.0, 255.0]
    assert calls == [1, 2]  # one probe, then the two uncached images in one call
    src("im1")
    assert calls == [1, 2]
    with pytest.raises(KeyError, match="'im9'"):
        src("im9")
    with pytest.raises(ValueError, match="escapes the image root"):
        src("../outside")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        src("broken")
    nan_src = ImageFeatures(root, lambda ims: torch.full((len(ims), 2, 3), float("nan")))
    with pytest.raises(ValueError, match=r"'im0'.*NaN"):
        nan_src("im0")
    bad_shape = ImageFeatures(root, lambda ims: torch.zeros(len(ims), 3))
    with pytest.raises(ValueError, match=r"expected \(B, N, D\)"):
        bad_shape("im0")
    with pytest.raises(ValueError, match="no readable image to probe"):
        _ = bad_shape.dim
    given = ImageFeatures(root, encode, dim=3, num_tokens=5)
    assert given.dim == 3
    with pytest.raises(ValueError, match=r"\(num_tokens, dim\) = \(5, 3\)"):
        given("im0")


def test_load_features_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_features(tmp_path / "none.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a feature source"):
        load_features(tmp_path / "empty")
    with h5py.File(tmp_path / "nothing.h5", "w") as f:
        f.create_group("g")
    with pytest.raises(ValueError, match="no feature datasets"):
        load_features(tmp_path / "nothing.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        load_features(tmp_path / "junk.h5")


def test_filter_with_features(tmp_path):
    path = tmp_path / "feats.h5"
    with h5py.File(path, "w") as f:
        for name in ("a", "b"):
            f[name] = _feats(0).numpy()
    samples = VLSplit([VLSample("nlvr", "1", ["a", "b"], "s", ["true"]), VLSample("nlvr", "2", ["a", "c"], "s", ["false"])],
                      path=tmp_path / "x.json", task="nlvr", skipped=[(9, "earlier")])
    kept = filter_with_features(samples, H5Features(path))
    assert [s.uid for s in kept] == ["1"] and kept.task == "nlvr"
    assert kept.skipped[0] == (9, "earlier") and kept.skipped[1][0] == 1 and "['c']" in kept.skipped[1][1]
