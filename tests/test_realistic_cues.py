"""Realistic FineCLIPER cues (video/realistic_cues.py): detector-like landmarks, a segmenter on the frames, captioner
errors; their determinism, rates and zero-rate identity, the recipe's cue_source option end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mmadapters.video.cues import ClipCues, CueError, PrecomputedCues
from mmadapters.video.dfer import read_all_frames
from mmadapters.video.realistic_cues import (
    RealisticCues,
    cues_from_record,
    faces_mean_face,
    segment_faces,
    split_clauses,
)
from mmadapters.vision.clip import tiny_clip_config, write_clip_dir

ZERO = {"landmark_jitter": 0.0, "landmark_miss": 0.0, "description_drop": 0.0, "description_wrong": 0.0,
        "description_word_drop": 0.0}


@pytest.fixture(scope="module")
def faces_root(tmp_path_factory) -> Path:
    from mmadapters.video.synth_faces import generate_faces

    return generate_faces(tmp_path_factory.mktemp("faces"), n=14, seed=0, size=64, num_frames=8, folds=2, videos=False,
                          progress=False)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clip")
    write_clip_dir(d, tiny_clip_config(embed_dim=16, image_size=32, width=32, layers=1))
    return d


def clips(root: Path) -> list[Path]:
    return sorted((root / "frames").iterdir())


def cues_of(provider, clip: Path) -> tuple[ClipCues, object]:
    frames = read_all_frames(clip)
    return provider(clip, list(range(len(frames))), tuple(frames.shape[-2:]), frames=frames), frames


class FakeExact:
    """An exact provider with many frames of distinct landmarks (no files)."""

    def __init__(self, frames: int, points: int = 68):
        rng = np.random.default_rng(7)
        self.marks = rng.uniform(0.3, 0.7, (frames, points, 2)).astype(np.float32)

    def __call__(self, clip, indices, size, frames=None) -> ClipCues:
        return ClipCues(landmarks=self.marks[list(indices)].copy(), description="the eyes widen")


def test_zero_rates_without_segmenter_give_the_exact_cues(faces_root):
    exact = PrecomputedCues(faces_root)
    same = RealisticCues(exact, segmenter=False, **ZERO)
    for clip in clips(faces_root):
        want, _ = cues_of(exact, clip)
        got, _ = cues_of(same, clip)
        np.testing.assert_array_equal(got.masks, want.masks)
        np.testing.assert_array_equal(got.landmarks, want.landmarks)
        assert got.description == want.description
    # the default rates change every cue
    noisy, _ = cues_of(RealisticCues(exact), clips(faces_root)[0])
    want, _ = cues_of(exact, clips(faces_root)[0])
    assert not np.array_equal(noisy.landmarks, want.landmarks) and not np.array_equal(noisy.masks, want.masks)


def test_realistic_cues_are_deterministic_per_seed_and_clip(faces_root):
    a, b = RealisticCues(PrecomputedCues(faces_root)), RealisticCues(PrecomputedCues(faces_root))
    first, second = clips(faces_root)[:2]
    cues_of(b, second)  # what else was loaded before does not matter
    for clip in (first, second):
        x, _ = cues_of(a, clip)
        y, _ = cues_of(b, clip)
        np.testing.assert_array_equal(x.landmarks, y.landmarks)
        np.testing.assert_array_equal(x.masks, y.masks)
        assert x.description == y.description
    assert a.clip_id(first) == "frames/00001"
    other, _ = cues_of(RealisticCues(PrecomputedCues(faces_root), seed=1), first)
    x, _ = cues_of(a, first)
    assert not np.array_equal(other.landmarks, x.landmarks)
    # two clips get different noise: their (noisy - exact) residuals differ
    exact = PrecomputedCues(faces_root)
    r1 = cues_of(a, first)[0].landmarks - cues_of(exact, first)[0].landmarks
    r2 = cues_of(a, second)[0].landmarks - cues_of(exact, second)[0].landmarks
    assert not np.allclose(r1, r2)


def test_landmark_jitter_is_gaussian_at_the_face_size_fraction(faces_root):
    exact = PrecomputedCues(faces_root)
    noisy = RealisticCues(exact, **{**ZERO, "landmark_jitter": 0.05}, segmenter=False)
    residuals = []
    for clip in clips(faces_root):
        want, frames = cues_of(exact, clip)
        got, _ = cues_of(noisy, clip)
        size = np.array(frames.shape[-2:][::-1], dtype=np.float64)  # (w, h)
        px = want.landmarks * size
        face = (px.max(axis=1) - px.min(axis=1)).max(axis=1)  # (T,) larger side of the landmark box
        residuals.append(((got.landmarks - want.landmarks) * size / face[:, None, None]).ravel())
    r = np.concatenate(residuals)  # 14 clips x 8 frames x 68 points x 2
    assert abs(r.mean()) < 0.003 and r.std() == pytest.approx(0.05, rel=0.05)
    assert abs(np.mean(np.abs(r) < 0.05) - 0.683) < 0.02  # one sigma holds ~68%


def test_landmark_misses_carry_the_previous_frame_or_the_mean_face():
    exact = FakeExact(4000)
    provider = RealisticCues(exact, **{**ZERO, "landmark_miss": 0.1}, segmenter=False)
    got = provider("clip", range(4000), (64, 64)).landmarks
    detected = np.all(got == exact.marks, axis=(1, 2))
    assert abs((~detected).mean() - 0.1) < 0.015  # the miss rate
    for i in np.flatnonzero(~detected):  # a missed frame repeats what the detector gave for the frame before
        np.testing.assert_array_equal(got[i], got[i - 1] if i else faces_mean_face())
    # no frame ever detected: the mean face everywhere (68 points: the faces' average identity; else the centre)
    all_missed = RealisticCues(exact, **{**ZERO, "landmark_miss": 1.0}, segmenter=False)
    np.testing.assert_array_equal(all_missed("clip", range(5), (64, 64)).landmarks, np.stack([faces_mean_face()] * 5))
    mean = faces_mean_face()
    assert mean.shape == (68, 2) and 0.1 < mean.min() and mean.max() < 1.0 and mean[8, 1] > mean[27, 1]  # chin below nose
    few = RealisticCues(FakeExact(3, points=5), **{**ZERO, "landmark_miss": 1.0}, segmenter=False)
    np.testing.assert_array_equal(few("clip", range(3), (64, 64)).landmarks, np.full((3, 5, 2), 0.5, np.float32))
    given = RealisticCues(FakeExact(3, points=5), **{**ZERO, "landmark_miss": 1.0}, segmenter=False,
                          mean_face=np.full((5, 2), 0.25))
    assert np.all(given("clip", range(3), (64, 64)).landmarks == 0.25)
    wrong = RealisticCues(FakeExact(3, points=5), **{**ZERO, "landmark_miss": 1.0}, segmenter=False,
                          mean_face=np.full((4, 2), 0.25))
    with pytest.raises(CueError, match="mean_face has 4 points"):
        wrong("clip", range(3), (64, 64))
    # the noise of a frame depends on its index, not on which other frames were asked for
    jitter = RealisticCues(exact, **{**ZERO, "landmark_jitter": 0.02}, segmenter=False)
    np.testing.assert_array_equal(jitter("clip", [5, 9], (64, 64)).landmarks, jitter("clip", range(10), (64, 64)).landmarks[[5, 9]])


def test_segmenter_labels_a_generated_face_from_its_pixels(faces_root):
    exact = PrecomputedCues(faces_root)
    accuracy, face_iou, present = [], [], set()
    for clip in clips(faces_root):
        want, frames = cues_of(exact, clip)
        seg = segment_faces(frames)
        assert seg.shape == tuple(want.masks.shape) and seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1, 2, 3, 4}
        accuracy.append(np.mean(seg == want.masks))
        face_iou.append(np.sum((seg > 0) & (want.masks > 0)) / np.sum((seg > 0) | (want.masks > 0)))
        present |= set(np.unique(seg).tolist())
        assert not np.array_equal(seg, want.masks)  # a segmenter's labels, not the renderer's
    assert present == {0, 1, 2, 3, 4}
    assert np.mean(accuracy) > 0.93 and min(face_iou) > 0.9
    # the provider's masks are the segmenter's on the frames it was given
    got, frames = cues_of(RealisticCues(exact), clips(faces_root)[0])
    np.testing.assert_array_equal(got.masks, segment_faces(frames))
    with pytest.raises(CueError, match="needs the frames"):
        RealisticCues(exact)(clips(faces_root)[0], [0], (64, 64))
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        segment_faces(np.zeros((2, 64, 64), np.uint8))
    assert segment_faces(np.zeros((0, 3, 8, 8), np.uint8)).shape == (0, 8, 8)


def test_description_errors_happen_at_their_rates():
    from mmadapters.video.synth_faces import _PHRASES, _STILL

    text = "the corners of the mouth rise, the lips part and the eyes narrow"
    assert split_clauses(text) == ["the corners of the mouth rise", "the lips part", "the eyes narrow"]
    assert split_clauses(_STILL[0]) == [_STILL[0]]  # its "and" does not split it
    ids = [f"frames/{i:05d}" for i in range(2000)]

    drop = RealisticCues(FakeExact(1), **{**ZERO, "description_drop": 0.3}, segmenter=False)
    kept = [split_clauses(drop.noisy_description(c, text)) for c in ids]
    originals = set(split_clauses(text))
    n_kept = sum(len([c for c in k if c in originals]) for k in kept)
    assert n_kept / (3 * len(ids)) == pytest.approx(0.7, abs=0.03)
    assert all(k == [_STILL[0]] or k == [_STILL[1]] or set(k) <= originals for k in kept)  # nothing else appears
    assert any(k[0] in _STILL for k in kept)  # every movement missed: the captioner says nothing changes

    wrong = RealisticCues(FakeExact(1), **{**ZERO, "description_wrong": 0.4}, segmenter=False)
    lookup = {p: key for key, ps in _PHRASES.items() for p in ps}
    replaced = flipped = 0
    for c in ids:
        out = split_clauses(wrong.noisy_description(c, text))
        assert len(out) == 3 and all(o in lookup for o in out)  # wrong attributes come from the generator's phrases
        for before, after in zip(split_clauses(text), out, strict=True):
            if after != before:
                replaced += 1
                flipped += lookup[after] == (lookup[before][0], -lookup[before][1])
    assert replaced / (3 * len(ids)) == pytest.approx(0.4, abs=0.03)
    assert flipped / replaced == pytest.approx(0.5, abs=0.05)  # half: the same part moving the other way

    words = RealisticCues(FakeExact(1), **{**ZERO, "description_word_drop": 0.1}, segmenter=False)
    n_words = len(text.split())
    ratio = np.mean([len(words.noisy_description(c, text).split()) / n_words for c in ids])
    assert ratio == pytest.approx(0.9, abs=0.01)
    # a still face's caption can gain a movement
    still = RealisticCues(FakeExact(1), **{**ZERO, "description_wrong": 1.0}, segmenter=False)
    assert still.noisy_description("x", _STILL[0]) in lookup
    assert drop.noisy_description("frames/00001", text) == drop.noisy_description("frames/00001", text)


def test_rates_and_records_are_validated(tmp_path, capsys):
    from mmadapters.eval.cli import main
    from mmadapters.video.fineclipper_train import FineClipperRecipeConfig

    for field_name, value in (("landmark_miss", 1.5), ("landmark_jitter", -0.1), ("description_drop", float("nan")),
                              ("description_wrong", True)):
        with pytest.raises(ValueError, match=rf"recipe\.{field_name}: expected a number in \[0, 1\]"):
            FineClipperRecipeConfig(data_dir="x", cue_source="realistic", **{field_name: value})
    assert isinstance(FineClipperRecipeConfig(data_dir="x").cue_provider(), PrecomputedCues)
    real = FineClipperRecipeConfig(data_dir="x", cue_source="realistic", landmark_miss=0.3, cues=("landmarks",)).cue_provider()
    assert isinstance(real, RealisticCues) and real.landmark_miss == 0.3 and not real.segmenter  # masks unused
    with pytest.raises(ValueError, match="landmark_miss=2.0"):
        RealisticCues(FakeExact(1), landmark_miss=2.0)
    config = tmp_path / "c.yaml"
    config.write_text("output: x\nrecipe: {data_dir: x, cue_source: noisy}\n")
    assert main(["train", "fineclipper", "--config", str(config)]) == 2
    assert "recipe.cue_source" in capsys.readouterr().err
    config.write_text("output: x\nrecipe: {data_dir: x, description_word_drop: 3}\n")
    assert main(["train", "fineclipper", "--config", str(config)]) == 2
    assert "recipe.description_word_drop" in capsys.readouterr().err
    exact = FakeExact(1)
    assert cues_from_record(None, exact) is exact and cues_from_record({"source": "exact"}, exact) is exact
    rebuilt = cues_from_record({"source": "realistic", **real.settings()}, exact)
    assert rebuilt.settings() == real.settings()
    for bad, match in (({"source": "noisy"}, "expected"), ({"source": "realistic", "landmark_mis": 0.1}, "unknown field"),
                       ({"source": "realistic", "landmark_miss": 7}, "landmark_miss=7"),
                       ({"source": "realistic", "segmenter": "yes"}, "segmenter")):
        with pytest.raises(ValueError, match=match):
            cues_from_record(bad, exact, where="run.json: field 'cue_source'")


def test_train_and_eval_fineclipper_with_realistic_cues(faces_root, clip_dir, tmp_path):
    """`mmadapters train fineclipper --set recipe.cue_source=realistic` on the example config shrunk to seconds; the
    run records its cues and `mmadapters eval dfer --adapters` reads the test clips the same way."""
    from types import SimpleNamespace

    from mmadapters.eval.cli import main
    from mmadapters.eval.results_schema import read_results
    from mmadapters.video.fineclipper_train import FineClipperRecipeConfig, build_task, load_fineclipper_run

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    recipe = {"data_dir": str(faces_root), "model": f"local-dir:{clip_dir}", "num_frames": 3, "adapter_dim": 4,
              "cue_source": "realistic", "landmark_miss": 0.3,
              "val_annotation": str(faces_root / "annotation" / "DFEW_set_1_train.txt")}  # one clip per class: all train
    sets = [a for k, v in {"trainer.steps": 4, "trainer.batch_size": 4, "trainer.eval_every": 2, "trainer.checkpoint_every": 2,
                           "trainer.progress": False, **{f"recipe.{k}": v for k, v in recipe.items()}}.items()
            for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["train", "fineclipper", "--config", str(repo / "configs" / "fineclipper.yaml"), "--output", str(out),
                 *sets]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    model, meta = load_fineclipper_run(out / "best")
    assert meta["cue_source"] == {"source": "realistic", "seed": 0, "segmenter": True, "landmark_jitter": 0.02,
                                  "landmark_miss": 0.3, "description_drop": 0.2, "description_wrong": 0.15,
                                  "description_word_drop": 0.05}
    task = build_task(FineClipperRecipeConfig(**recipe), SimpleNamespace(device="cpu", seed=0, batch_size=4))
    clip = task.train.clips[0]
    exact, _ = cues_of(PrecomputedCues(faces_root), Path(clip.path))
    assert not np.array_equal(clip.masks, exact.masks) and not np.array_equal(clip.landmarks, exact.landmarks)
    task.model = model
    assert task.validate() == summary["best_metrics"]  # the same realistic cues again
    assert main(["eval", "dfer", "--data-dir", str(faces_root), "--adapters", str(out / "best"), "--no-progress",
                 "--output", str(tmp_path / "test.json")]) == 0
    results = read_results(tmp_path / "test.json")
    assert results["settings"]["cue_source"] == meta["cue_source"] and results["counts"]["evaluated"] == 7


def test_sweep_runs_the_cue_variants_with_each_cue_source(faces_root, clip_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("run_fineclipper", Path(__file__).resolve().parents[1] / "scripts" /
                                                  "run_fineclipper.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "out"
    assert sweep.main(["--data", str(faces_root), "--model", f"local-dir:{clip_dir}", "--num-frames", "3", "--epochs", "1",
                       "--batch-size", "4", "--adapter-dim", "4", "--output", str(out), "--variants", "frames,high",
                       "--cues", "exact,realistic"]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [(r["key"], r["cues"]) for r in rows] == [("frames", "exact"), ("high", "exact"), ("high-realistic", "realistic")]
    recipe = json.loads((Path(rows[2]["run"]) / "train_summary.json").read_text())["config"]["recipe"]
    assert recipe["cue_source"] == "realistic" and recipe["cues"] == ["description"]
    assert "(realistic cues)" in (out / "results.md").read_text()
    with pytest.raises(SystemExit, match="--cues"):
        sweep.main(["--data", str(faces_root), "--cues", "noisy", "--output", str(out)])
