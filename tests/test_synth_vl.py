"""Generated VL tasks (mmadapters.vision.synth_vl): determinism, file formats, answers vs. the scene ground truth.

The answers are recomputed here from ``scenes.jsonl`` by parsing the question text with this file's own
regular expressions, so a generator bug cannot hide behind a shared helper.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmadapters.vision import synth_vl
from mmadapters.vision.synth import COLOURS
from mmadapters.vision.synth_vl import VLObject, VLScene, generate_vl

N = 40
REL = r"(to the left of|to the right of|above|below)"
NUMBERS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vl") / "a"
    generate_vl(out, n_images=N, seed=3, progress=False)
    return out


def _scenes(root: Path) -> dict[str, VLScene]:
    rows = [json.loads(line) for line in (root / "scenes.jsonl").read_text().splitlines()]
    return {r["img_id"]: VLScene.from_json(r) for r in rows}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------- an independent oracle


def _singular(word: str) -> str:
    return word[:-2] if word.endswith("sses") else word[:-1]


def _resolve(scene: VLScene, ref: str) -> VLObject:
    """The one object a referring expression ("the small red circle", "the blue object") names."""
    words = ref.split()
    assert words[0] == "the", ref
    attrs = {}
    for w in words[1:]:
        if w in synth_vl.VL_SIZES:
            attrs["size"] = w
        elif w in synth_vl.VL_COLOURS:
            attrs["colour"] = w
        elif w in synth_vl.VL_SHAPES:
            attrs["shape"] = w
        else:
            assert w == "object", ref
    hits = [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]
    assert len(hits) == 1, f"{ref!r} names {len(hits)} objects"
    return hits[0]


def _related(a: VLObject, rel: str, b: VLObject) -> bool:
    return {
        "to the left of": a.col < b.col,
        "to the right of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[rel]


def _yn(value: bool) -> str:
    return "yes" if value else "no"


def _vqa_answer(scene: VLScene, q: str) -> str:
    objs = scene.objects
    if m := re.fullmatch(r"what (color|shape|size) is (the .+)\?", q):
        return getattr(_resolve(scene, m[2]), {"color": "colour", "shape": "shape", "size": "size"}[m[1]])
    if q == "how many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(r"how many (\w+) objects are there\?", q):
        return str(sum(o.colour == m[1] for o in objs))
    if m := re.fullmatch(r"how many (\w+) are there\?", q):
        return str(sum(o.shape == _singular(m[1]) for o in objs))
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", q):
        return _yn(any(o.colour == m[1] and o.shape == m[2] for o in objs))
    raise AssertionError(f"unknown VQA question {q!r}")


def _gqa_answer(scene: VLScene, q: str) -> str:
    objs = scene.objects
    if m := re.fullmatch(rf"what (is|color is the shape) {REL} (the .+)\?", q):
        ref = _resolve(scene, m[3])
        hits = [o for o in objs if o is not ref and _related(o, m[2], ref)]
        assert len(hits) == 1, f"{q!r}: {len(hits)} objects in that relation"
        return hits[0].shape if m[1] == "is" else hits[0].colour
    if m := re.fullmatch(rf"is there a (\w+) {REL} (the .+)\?", q):
        ref = _resolve(scene, m[3])
        return _yn(any(o.shape == m[1] and o is not ref and _related(o, m[2], ref) for o in objs))
    if m := re.fullmatch(rf"is (the .+?) {REL} (the .+)\?", q):
        return _yn(_related(_resolve(scene, m[1]), m[2], _resolve(scene, m[3])))
    if m := re.fullmatch(r"do (the .+?) and (the .+) have the same (color|shape)\?", q):
        attr = "colour" if m[3] == "color" else "shape"
        return _yn(getattr(_resolve(scene, m[1]), attr) == getattr(_resolve(scene, m[2]), attr))
    if m := re.fullmatch(r"are (the .+?) and (the .+) the same size\?", q):
        return _yn(_resolve(scene, m[1]).size == _resolve(scene, m[2]).size)
    raise AssertionError(f"unknown GQA question {q!r}")


def _nlvr_truth(left: VLScene, right: VLScene, s: str) -> bool:
    sides = {"left": left, "right": right}

    def count(scene: VLScene, **attrs: str) -> int:
        return sum(all(getattr(o, k) == v for k, v in attrs.items()) for o in scene.objects)

    if m := re.fullmatch(r"there are (more|fewer) (\w+) in the left image than in the right image\.", s):
        a, b = count(left, shape=_singular(m[2])), count(right, shape=_singular(m[2]))
        return a > b if m[1] == "more" else a < b
    if m := re.fullmatch(r"both images contain a (\w+) object\.", s):
        return count(left, colour=m[1]) > 0 and count(right, colour=m[1]) > 0
    if m := re.fullmatch(r"the (left|right) image has exactly (\w+) (\w+)\.", s):
        shape = m[3] if m[2] == "one" else _singular(m[3])
        return count(sides[m[1]], shape=shape) == NUMBERS[m[2]]
    if m := re.fullmatch(r"exactly one image contains a (\w+) (\w+)\.", s):
        return (count(left, colour=m[1], shape=m[2]) > 0) != (count(right, colour=m[1], shape=m[2]) > 0)
    if s == "the two images have the same number of objects.":
        return len(left.objects) == len(right.objects)
    if m := re.fullmatch(r"there (is|are) (\w+) (\w+) in total\.", s):
        shape = m[3] if m[2] == "one" else _singular(m[3])
        return count(left, shape=shape) + count(right, shape=shape) == NUMBERS[m[2]]
    if m := re.fullmatch(rf"in the (left|right) image, a (\w+) is {REL} a (\w+)\.", s):
        objs = sides[m[1]].objects
        return any(x.shape == m[2] and y.shape == m[4] and _related(x, m[3], y) for x in objs for y in objs if x is not y)
    if m := re.fullmatch(r"the (left|right) image has no (\w+) objects\.", s):
        return count(sides[m[1]], colour=m[2]) == 0
    raise AssertionError(f"unknown NLVR statement {s!r}")


def _normalize(answer: str) -> str:
    """The parts of the VQA answer normalization the generator's variants use."""
    words = [w for w in answer.lower().rstrip(".").split() if w not in ("a", "an", "the")]
    return " ".join(str(NUMBERS.get(w, w)) for w in words)


# ----------------------------------------------------------------------------------------------- tests


def test_same_args_same_bytes_with_any_workers(data: Path, tmp_path: Path) -> None:
    again = tmp_path / "b"
    generate_vl(again, n_images=N, seed=3, workers=2, progress=False)
    assert _files(again) == _files(data)
    other = generate_vl(tmp_path / "c", n_images=N, seed=4, progress=False)
    assert other["args"]["seed"] == 4
    assert (tmp_path / "c" / "scenes.jsonl").read_bytes() != (data / "scenes.jsonl").read_bytes()


def test_rerun_with_same_args_keeps_files_and_other_args_regenerate(tmp_path: Path) -> None:
    out = tmp_path / "d"
    first = generate_vl(out, n_images=20, seed=0, progress=False)
    stamp = (out / "dataset.json").stat().st_mtime_ns
    (out / "images" / "synth_000000.png").write_bytes(b"not touched by a rerun")
    assert generate_vl(out, n_images=20, seed=0, progress=False) == first
    assert (out / "dataset.json").stat().st_mtime_ns == stamp
    generate_vl(out, n_images=20, seed=0, gqa_per_image=1, progress=False)
    assert (out / "images" / "synth_000000.png").read_bytes().startswith(b"\x89PNG")


def test_files_and_fields_follow_the_contract(data: Path) -> None:
    record = json.loads((data / "dataset.json").read_text())
    images = sorted(p.stem for p in (data / "images").glob("*.png"))
    assert images == [f"synth_{i:06d}" for i in range(N)]
    with Image.open(data / "images" / "synth_000000.png") as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    assert record["images"] == {"train": 32, "val": 4, "test": 4}

    for name in ("karpathy_train.json", "karpathy_val.json", "karpathy_test.json"):
        rows = json.loads((data / "vqa" / name).read_text())
        assert rows
        for r in rows:
            assert set(r) == {"img_id", "sent", "label", "question_id", "answer_type", "question_type", "answers"}
            assert isinstance(r["question_id"], int) and r["answer_type"] in ("yes/no", "number", "other")
            assert [a["answer_id"] for a in r["answers"]] == list(range(1, 11))
            assert all(set(a) == {"answer", "answer_id"} for a in r["answers"])
    for name in ("train.json", "valid.json", "testdev.json"):
        for r in json.loads((data / "gqa" / name).read_text()):
            assert set(r) == {"img_id", "sent", "label", "question_id"}
            assert isinstance(r["question_id"], str) and len(r["label"]) == 1 and list(r["label"].values()) == [1.0]
    for name in ("train.json", "valid.json", "test.json"):
        lines = (data / "nlvr" / name).read_text().splitlines()
        assert lines
        for line in lines:
            r = json.loads(line)
            assert set(r) == {"identifier", "img0", "img1", "sent", "label", "uid"}
            assert r["label"] in (0, 1) and r["img0"] != r["img1"]
    coco = json.loads((data / "coco" / "dataset_coco.json").read_text())
    assert coco["dataset"] == "coco" and len(coco["images"]) == N
    for im in coco["images"]:
        assert set(im) == {"filepath", "filename", "imgid", "cocoid", "split", "sentids", "sentences"}
        assert (data / im["filepath"] / im["filename"]).is_file() and im["split"] in ("train", "val", "test")
        assert len(im["sentences"]) == 5 and len({s["raw"] for s in im["sentences"]}) == 5
        assert [s["sentid"] for s in im["sentences"]] == im["sentids"]
        for s in im["sentences"]:
            assert set(s) == {"raw", "tokens", "imgid", "sentid"} and s["imgid"] == im["imgid"]
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())
    # vocabularies stay small for a tiny model
    assert len(record["answers"]["vqa"]) <= 25 and len(record["answers"]["gqa"]) <= 15


def test_splits_are_disjoint_and_tasks_follow_their_image(data: Path) -> None:
    split_of = {r["img_id"]: r["split"] for r in map(json.loads, (data / "scenes.jsonl").read_text().splitlines())}
    files = {"vqa": ("karpathy_{}.json", ("train", "val", "test")), "gqa": ("{}.json", ("train", "valid", "testdev"))}
    for task, (pattern, names) in files.items():
        for split, name in zip(("train", "val", "test"), names, strict=True):
            for r in json.loads((data / task / pattern.format(name)).read_text()):
                assert split_of[r["img_id"]] == split
    for split, name in zip(("train", "val", "test"), ("train", "valid", "test"), strict=True):
        for line in (data / "nlvr" / f"{name}.json").read_text().splitlines():
            r = json.loads(line)
            assert split_of[r["img0"]] == split_of[r["img1"]] == split
    coco = json.loads((data / "coco" / "dataset_coco.json").read_text())
    assert all(split_of[Path(im["filename"]).stem] == im["split"] for im in coco["images"])


def test_vqa_answers_and_labels_match_the_scenes(data: Path) -> None:
    scenes = _scenes(data)
    types = Counter()
    for name in ("karpathy_train.json", "karpathy_val.json", "karpathy_test.json"):
        for r in json.loads((data / "vqa" / name).read_text()):
            truth = _vqa_answer(scenes[r["img_id"]], r["sent"])
            best = max(r["label"], key=r["label"].get)
            assert best == truth and r["label"][truth] == 1.0, r
            counts = Counter(_normalize(a["answer"]) for a in r["answers"])
            soft = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}
            assert r["label"] == {a: soft.get(c, 1.0) for a, c in counts.items()}, r
            types[r["question_type"]] += 1
    assert set(types) == {"what color is the", "what shape is the", "how many", "is there a", "what size is the"}


def test_vqa_answers_include_variants_and_wrong_answers(data: Path) -> None:
    rows = json.loads((data / "vqa" / "karpathy_train.json").read_text())
    raw = [a["answer"] for r in rows for a in r["answers"]]
    assert any(a in ("one", "two", "three", "four") for a in raw)  # number words beside digits
    assert sum(len(r["label"]) > 1 for r in rows) > len(rows) // 5  # some annotators disagree
    assert any(0 < s < 1 for r in rows for s in r["label"].values())  # soft scores below 1 occur


def test_vqa_metric_scores_the_right_answer_one_when_available(data: Path) -> None:
    metrics = pytest.importorskip("mmadapters.eval.metrics")
    for r in json.loads((data / "vqa" / "karpathy_val.json").read_text()):
        answers = [a["answer"] for a in r["answers"]]
        best = max(r["label"], key=r["label"].get)
        assert metrics.vqa_accuracy(best, answers) == pytest.approx(1.0)


def test_gqa_answers_match_the_scenes(data: Path) -> None:
    scenes = _scenes(data)
    answers: dict[str, Counter] = {"what": Counter(), "is": Counter(), "do": Counter(), "are": Counter()}
    for name in ("train.json", "valid.json", "testdev.json"):
        for r in json.loads((data / "gqa" / name).read_text()):
            assert list(r["label"]) == [_gqa_answer(scenes[r["img_id"]], r["sent"])], r
            answers[r["sent"].split()[0]][list(r["label"])[0]] += 1
    record = json.loads((data / "dataset.json").read_text())
    assert set(record["question_types"]["gqa"]) == {"rel_object", "rel_color", "rel_verify", "rel_exist", "same_attr"}
    yes_no = answers["is"] + answers["do"] + answers["are"]
    assert 0.35 < yes_no["yes"] / (yes_no["yes"] + yes_no["no"]) < 0.65  # no answer prior to exploit


def test_nlvr_is_balanced_and_true_to_the_scenes(data: Path) -> None:
    scenes = _scenes(data)
    for name in ("train.json", "valid.json", "test.json"):
        rows = [json.loads(line) for line in (data / "nlvr" / name).read_text().splitlines()]
        assert len(rows) % 2 == 0 and sum(r["label"] for r in rows) == len(rows) // 2
        assert len({r["identifier"] for r in rows}) == len(rows)
        for r in rows:
            assert int(_nlvr_truth(scenes[r["img0"]], scenes[r["img1"]], r["sent"])) == r["label"], r


def test_captions_describe_the_objects_and_a_true_relation(data: Path) -> None:
    scenes = _scenes(data)
    coco = json.loads((data / "coco" / "dataset_coco.json").read_text())
    for im in coco["images"]:
        scene = scenes[Path(im["filename"]).stem]
        for s in im["sentences"]:
            for colour, shape in re.findall(r"(\w+) (circle|square|triangle|star|cross|diamond)\b", s["raw"]):
                if colour in synth_vl.VL_COLOURS:
                    assert any(o.colour == colour and o.shape == shape for o in scene.objects), s["raw"]
        # captions 4 and 5 state one relation between two objects named by referring expressions
        second = im["sentences"][3]["raw"].split(". ")[1]
        m = re.fullmatch(rf"(the .+?) is {REL} (the .+)\.", second)
        assert m, second
        assert _related(_resolve(scene, m[1]), m[2], _resolve(scene, m[3])), second
        m = re.fullmatch(rf"a picture of (\w+) objects, with (the .+?) {REL} (the .+)\.", im["sentences"][4]["raw"])
        assert m and NUMBERS[m[1]] == len(scene.objects), im["sentences"][4]["raw"]
        assert _related(_resolve(scene, m[2]), m[3], _resolve(scene, m[4]))


def test_objects_are_visible_in_their_colour(data: Path) -> None:
    palette = {c: np.asarray(COLOURS[c], dtype=np.float32) for c in synth_vl.VL_COLOURS}
    hits = total = 0
    for img_id, scene in _scenes(data).items():
        arr = np.asarray(Image.open(data / "images" / f"{img_id}.png"), dtype=np.float32)
        for o in scene.objects:
            x, y = int(o.x * 64), int(o.y * 64)
            patch = arr[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)
            nearest = min(palette, key=lambda c: float(np.linalg.norm(palette[c] - patch)))
            hits += nearest == o.colour
            total += 1
    assert hits / total > 0.95


def test_relations_on_a_hand_built_scene() -> None:
    # red circle top-left, blue square top-right, small green star bottom-middle
    circle = VLObject.at("circle", "red", "large", 0, 0)
    square = VLObject.at("square", "blue", "large", 0, 2)
    star = VLObject.at("star", "green", "small", 2, 1)
    scene = VLScene((circle, square, star), "beige")
    assert synth_vl.left_of(circle, square) and synth_vl.right_of(square, star) and not synth_vl.left_of(square, circle)
    assert synth_vl.above(circle, star) and synth_vl.below(star, square) and not synth_vl.above(circle, square)
    seen = {}
    for k in range(200):
        for q in synth_vl.gqa_questions(scene, np.random.default_rng(k), 3):
            seen[q["sent"]] = q["answer"]
            assert q["answer"] == _gqa_answer(scene, q["sent"]), q
    # things only one answer fits are asked; "what is to the left of the square?" (circle and star) never is
    assert seen.get("what is to the right of the circle?", "star") in ("star",)
    assert seen.get("what color is the shape to the left of the star?", "red") == "red"
    assert seen.get("is the circle above the star?", "yes") == "yes"
    assert seen.get("is the square above the circle?", "no") == "no"
    assert "what is to the left of the square?" not in seen and "what is above the star?" not in seen
    assert len(seen) > 20
    yes = sum(a == "yes" for a in seen.values())
    no = sum(a == "no" for a in seen.values())
    assert yes > 3 and no > 3


def test_nlvr_statement_gives_the_wanted_truth() -> None:
    left = VLScene((VLObject.at("circle", "red", "small", 0, 0), VLObject.at("circle", "blue", "large", 1, 1)), "cream")
    right = VLScene((VLObject.at("square", "red", "large", 2, 2),), "sky", "striped")
    for k in range(60):
        label = bool(k % 2)
        sent, template = synth_vl.nlvr_statement(left, right, np.random.default_rng(k), label)
        assert template in synth_vl.NLVR_TEMPLATES
        assert _nlvr_truth(left, right, sent) == label, sent


def test_pretrain_set_is_disjoint(data: Path, tmp_path: Path) -> None:
    record = generate_vl(tmp_path / "pt", n_images=20, seed=3, pretrain=True, progress=False)
    assert record["args"]["pretrain"] is True
    ids = {p.stem for p in (tmp_path / "pt" / "images").glob("*.png")}
    assert ids and all(i.startswith("synthpt_") for i in ids)
    task_scenes = {json.dumps(s.to_json()) for s in _scenes(data).values()}
    assert not task_scenes & {json.dumps(s.to_json()) for s in _scenes(tmp_path / "pt").values()}


def test_scene_validation() -> None:
    with pytest.raises(ValueError, match="share a grid cell"):
        VLScene((VLObject.at("circle", "red", "small", 0, 0), VLObject.at("star", "blue", "small", 0, 0)), "beige")
    with pytest.raises(ValueError, match="colour='teal'"):
        VLScene((VLObject.at("circle", "teal", "small", 0, 0),), "beige")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_images": 5}, r"n_images=5; expected an integer >= 20"),
        ({"n_images": 40, "image_size": 16}, r"image_size=16; expected an integer in \[32, 512\]"),
        ({"n_images": 40, "image_size": 64.0}, r"image_size=64.0; expected an integer"),
        ({"n_images": 40, "workers": 0}, r"workers=0"),
        ({"n_images": 40, "val_fraction": 0.6}, r"val_fraction=0.6"),
        ({"n_images": 40, "nlvr_per_image": 0}, r"nlvr_per_image=0"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_vl(tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli_reports_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert synth_vl.main(["--out", str(tmp_path / "x"), "--n-images", "3"]) == 2
    assert "n_images=3" in capsys.readouterr().err


def test_cli_sets_the_split_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--val-fraction / --test-fraction: a large test split beside a smaller training set (issue 19's fair-scale
    table needs >= 500 test images, not a 5,000-image training set); a bad share names the field."""
    out = tmp_path / "x"
    assert synth_vl.main(["--out", str(out), "--n-images", "40", "--val-fraction", "0.05", "--test-fraction", "0.25",
                          "--vqa-per-image", "1", "--gqa-per-image", "1", "--quiet"]) == 0
    record = json.loads((out / "dataset.json").read_text())
    assert record["images"] == {"train": 28, "val": 2, "test": 10}
    assert record["args"]["test_fraction"] == 0.25 and record["args"]["val_fraction"] == 0.05
    capsys.readouterr()
    assert synth_vl.main(["--out", str(tmp_path / "y"), "--n-images", "40", "--test-fraction", "0.5"]) == 2
    assert "test_fraction=0.5" in capsys.readouterr().err
