"""The generated image world: determinism, task layout, captions, reuse of an existing task folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmadapters.vision import synth

TINY = dict(train_per_class=2, val_per_class=1, test_per_class=1, image_size=24, progress=False)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = synth.generate_task("shapes-sketch", tmp_path / "a", seed=3, **TINY)
    b = synth.generate_task("shapes-sketch", tmp_path / "b", seed=3, **TINY)
    c = synth.generate_task("shapes-sketch", tmp_path / "c", seed=4, **TINY)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    pngs = [k for k in fa if k.endswith(".png")]
    assert sum(fa[k] != fc[k] for k in pngs) > len(pngs) // 2


def test_caption_pairs_deterministic_and_avoid_heldout_combos():
    first = [(np.asarray(im), cap) for im, cap in synth.caption_pairs(6, seed=7, image_size=32)]
    again = [(np.asarray(im), cap) for im, cap in synth.caption_pairs(6, seed=7, image_size=32)]
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(first, again, strict=True))
    assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im, _ in first)
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = synth.sample_scene(rng)
        assert (scene.colour, scene.shape) not in synth.HELDOUT_COMBOS


@pytest.mark.parametrize("task", sorted(synth.TASKS))
def test_task_layout_classnames_and_captions(tmp_path, task):
    spec = synth.TASKS[task]
    counts = {"train": 1, "val": 0, "test": 1} if len(spec.classes) > 20 else {"train": 2, "val": 1, "test": 1}
    root = synth.generate_task(
        task, tmp_path / task, train_per_class=counts["train"], val_per_class=counts["val"], test_per_class=counts["test"],
        image_size=16, progress=False,
    )
    folders = sorted(c.folder for c in spec.classes)
    for split, n in counts.items():
        assert sorted(p.name for p in (root / split).iterdir()) == folders
        for folder in folders:
            names = sorted(p.name for p in (root / split / folder).iterdir())
            assert names == [f"{i:04d}.png" for i in range(n)]
    with Image.open(root / "test" / folders[0] / "0000.png") as im:
        assert im.size == (16, 16) and im.mode == "RGB"

    # classnames.txt follows the sorted folders: line i is the name of label i
    by_folder = {c.folder: c.name for c in spec.classes}
    assert (root / "classnames.txt").read_text().splitlines() == [by_folder[f] for f in folders]
    templates = (root / "templates.txt").read_text().splitlines()
    assert templates and all("{c}" in t for t in templates)

    # one caption per image, naming the class's fixed attributes
    records = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    assert sorted(r["image"] for r in records) == images
    fixed = {c.folder: c.fixed for c in spec.classes}
    for r in records:
        for value in fixed[r["image"].split("/")[1]].values():
            assert value in r["caption"].split()

    meta = json.loads((root / "task.json").read_text())
    assert meta["task"] == task and meta["per_class"] == counts and meta["num_classes"] == len(spec.classes)
    assert set(meta["styles"]) == {"train", "val", "test"}


def test_styles_follow_the_task(tmp_path):
    root = synth.generate_task("shapes-sketch", tmp_path / "s", **TINY)
    captions = [json.loads(line)["caption"] for line in (root / "captions.jsonl").read_text().splitlines()]
    assert all(c.startswith("a sketch of") for c in captions)
    root = synth.generate_task("colours-noisy", tmp_path / "n", **TINY)
    captions = [json.loads(line)["caption"] for line in (root / "captions.jsonl").read_text().splitlines()]
    assert all(c.startswith("a noisy photo of") for c in captions)


def test_existing_task_is_reused_and_changed_arguments_regenerate(tmp_path):
    root = synth.generate_task("synth-shapes", tmp_path / "t", **TINY)
    marker = root / "train" / "circle" / "0000.png"
    stamp = marker.stat().st_mtime_ns
    marker.write_bytes(b"sentinel")  # a reuse must not touch the files
    synth.generate_task("synth-shapes", root, **TINY)
    assert marker.read_bytes() == b"sentinel" and marker.stat().st_mtime_ns >= stamp

    # different counts: stale images of the old run are gone, new layout complete
    synth.generate_task("synth-shapes", root, **{**TINY, "train_per_class": 1})
    assert sorted(p.name for p in (root / "train" / "circle").iterdir()) == ["0000.png"]
    assert marker.read_bytes() != b"sentinel"

    # an interrupted run (no task.json) is regenerated
    (root / "task.json").unlink()
    (root / "val" / "star" / "0000.png").unlink()
    synth.generate_task("synth-shapes", root, **{**TINY, "train_per_class": 1})
    assert (root / "val" / "star" / "0000.png").is_file() and (root / "task.json").is_file()


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        synth.generate_task("nope", tmp_path)
    with pytest.raises(ValueError, match="test_per_class=-1"):
        synth.generate_task("synth-shapes", tmp_path, test_per_class=-1)
    with pytest.raises(ValueError, match="unknown attribute"):
        synth.sample_scene(np.random.default_rng(0), {"hue": "red"})
    with pytest.raises(ValueError, match="shape='blob'"):
        synth.sample_scene(np.random.default_rng(0), {"shape": "blob"})


def test_world_size_and_captions_describe_the_scene():
    assert len(synth.SHAPES) >= 8 and len(synth.COLOURS) >= 10 and len(synth.TEXTURES) >= 3
    assert {"photo", "sketch", "noisy"} <= set(synth.STYLES)
    assert len(synth.TASKS["combos-100"].classes) == 100
    scene = synth.Scene("circle", "red", "small", "striped", "left", "sky", "photo")
    assert synth.caption(scene) == "a photo of a small red striped circle on the left of a sky background"
    orange = synth.Scene("star", "orange", "large", "solid", "center", "beige", "cartoon")
    assert synth.caption(orange) == "a cartoon of a large orange star in the center of a beige background"
    rng = np.random.default_rng(0)
    partial = {synth.caption(scene, rng) for _ in range(50)}
    assert len(partial) > 5 and all(c.startswith(("a ", "an ")) for c in partial)


def test_synth_novel_has_the_images_of_synth_shapes_and_made_up_names(tmp_path):
    kw = dict(train_per_class=1, val_per_class=1, test_per_class=1, image_size=16, progress=False)
    shapes = _files(synth.generate_task("synth-shapes", tmp_path / "s", **kw))
    novel = _files(synth.generate_task("synth-novel", tmp_path / "n", **kw))
    pngs = [k for k in shapes if k.endswith(".png")]
    assert pngs and all(novel[k] == shapes[k] for k in pngs)  # byte for byte
    names = (tmp_path / "n" / "classnames.txt").read_text().splitlines()
    assert len(set(names)) == 10 and not set(names) & set(synth.SHAPES)
    assert synth.novel_words(10, "synth-novel") == tuple(c.name for c in synth.TASKS["synth-novel"].classes)
    assert synth.novel_words(10, "other") != synth.novel_words(10, "synth-novel")


def test_novel_words_share_no_token_with_pretraining_captions():
    from mmadapters.vision.clip import load_clip

    tokenizer = load_clip(None, None, declare_points=False).tokenizer
    rng = np.random.default_rng(0)
    texts = [synth.caption(synth.sample_scene(rng, None, synth.PRETRAIN_STYLES), rng) for _ in range(2000)]
    seen = set(tokenizer(texts).flatten().tolist())
    novel = set(tokenizer([c.name for c in synth.TASKS["synth-novel"].classes]).flatten().tolist())
    special = set(tokenizer([""]).flatten().tolist())  # start, end, padding
    assert novel - special and not (novel - special) & seen


def test_false_colour_is_the_photo_with_channels_rotated_and_colour_named_classes():
    scene = synth.Scene("star", "red", "large", "solid", "center", "beige", "photo")
    photo = np.asarray(synth.render(scene, 32, np.random.default_rng(1)))
    false = np.asarray(synth.render(synth.Scene(**{**scene.__dict__, "style": "falsecolour"}), 32, np.random.default_rng(1)))
    assert np.array_equal(false, photo[..., [1, 2, 0]])
    spec = synth.TASKS["combos-colour-named"]
    assert all(set(c.fixed) == {"colour", "shape"} and c.name.split()[0] == c.fixed["colour"] for c in spec.classes)
    colours = [c.fixed["colour"] for c in spec.classes]
    assert all(colours.count(c) == 2 for c in colours)  # the name alone cannot tell a class from its twin
