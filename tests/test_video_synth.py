"""Generated video worlds: determinism (bytes), SUTD-TrafficQA rows, DFEW annotation files, cue files, balance."""

from __future__ import annotations

import io
import json
import zipfile
from collections import Counter

import av
import numpy as np
import pytest

from mmadapters.video import synth, synth_faces, synth_traffic


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decoded_frames(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


# ----------------------------------------------------------------------------------------------- shared writing


def test_mp4_and_npz_are_deterministic_and_checked():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
    for codec in ("libx264", "mpeg4"):
        a, b = synth.encode_mp4(frames, codec=codec), synth.encode_mp4(frames, codec=codec)
        assert a == b
        with av.open(io.BytesIO(a)) as c:
            decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(decoded) == 5 and decoded[0].shape == (16, 24, 3)
    with pytest.raises(ValueError, match="even"):
        synth.encode_mp4(frames[:, :15])
    with pytest.raises(ValueError, match="uint8"):
        synth.encode_mp4(frames.astype(np.float32))

    arrays = {"landmarks": rng.normal(size=(3, 68, 2)).astype(np.float32), "masks": rng.integers(0, 5, (3, 8, 8), dtype=np.uint8)}
    blob = synth.npz_bytes(arrays)
    assert blob == synth.npz_bytes(arrays)
    assert all(info.date_time == (1980, 1, 1, 0, 0, 0) for info in zipfile.ZipFile(io.BytesIO(blob)).infolist())
    loaded = np.load(io.BytesIO(blob))
    assert all(np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in arrays.items())


def test_balanced_schedule_counts():
    s = synth.balanced_schedule(23, 5, np.random.default_rng(1))
    counts = np.bincount(s, minlength=5)
    assert counts.sum() == 23 and counts.max() - counts.min() <= 1


# ----------------------------------------------------------------------------------------------- trafficqa


def test_trafficqa_same_seed_same_bytes_via_cli(tmp_path):
    args = ["trafficqa", "--n", "3", "--no-progress", "--frames", "16"]
    assert synth.main([*args, "--seed", "5", "--out", str(tmp_path / "a")]) == 0
    assert synth.main([*args, "--seed", "5", "--out", str(tmp_path / "b")]) == 0
    assert synth.main([*args, "--seed", "6", "--out", str(tmp_path / "c")]) == 0
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb
    videos = [k for k in fa if k.endswith(".mp4")]
    assert len(videos) == 6 and sum(fa[k] != fc.get(k) for k in videos) == 6

    # same arguments again: nothing is rewritten
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}
    synth_traffic.generate_trafficqa(tmp_path / "a", n=3, seed=5, num_frames=16, progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}


def test_trafficqa_rows_videos_and_meta(tmp_path):
    root = synth_traffic.generate_trafficqa(tmp_path / "tq", n=5, seed=2, test_fraction=0.4, frame_dirs=True, progress=False)
    ann = root / "annotations"
    splits = {}
    for name in ("R2_all", "R2_train", "R2_test"):
        lines = (ann / f"{name}.jsonl").read_text().splitlines()
        assert json.loads(lines[0]) == synth_traffic.HEADER
        splits[name] = [json.loads(line) for line in lines[1:]]
    rows = splits["R2_all"]
    assert len(rows) == 15 and len(splits["R2_test"]) == 6 and len(splits["R2_train"]) == 9
    assert sorted(r[0] for r in splits["R2_train"] + splits["R2_test"]) == [r[0] for r in rows] == list(range(15))
    meta = {m["record_id"]: m for m in map(json.loads, (root / "meta.jsonl").read_text().splitlines())}
    vid_of_id: dict[int, str] = {}
    for row in rows:
        record = dict(zip(synth_traffic.HEADER, row, strict=True))
        assert isinstance(record["vid_id"], int) and record["perspective"] == 3
        assert record["q_type"] in ("U", "R", "F") and record["q_body"].endswith("?")
        options = [record[f"option{i}"] for i in range(4)]
        assert len(set(options)) == 4 and all(isinstance(o, str) and o.endswith(".") for o in options)
        assert record["answer"] in range(4)
        assert vid_of_id.setdefault(record["vid_id"], record["vid_filename"]) == record["vid_filename"]
        m = meta[record["record_id"]]
        assert m["vid_filename"] == record["vid_filename"]
        video = root / "videos" / record["vid_filename"]
        if record["q_type"] == "F":
            assert record["vid_filename"].endswith("_obs.mp4")
            assert m["observed_frames"] < m["num_frames"]
            # the answer event is still under way when the prefix ends
            second = m["events"][1]
            assert second["start"] < m["observed_frames"] < second["end"]
        else:
            assert m["observed_frames"] == m["num_frames"] == 24
        assert _decoded_frames(video) == m["observed_frames"]
        frames = sorted((root / "frames" / video.stem).iterdir())
        assert len(frames) == m["observed_frames"] and frames[0].name == "00001.png"
    assert len(set(vid_of_id.values())) == len(vid_of_id) == 10


def test_trafficqa_answers_are_balanced_and_options_not_telling(tmp_path):
    root = synth_traffic.generate_trafficqa(tmp_path / "tq", n=20, seed=0, q_types=("F", "U"), num_frames=16, progress=False)
    rows = [json.loads(line) for line in (root / "annotations" / "R2_all.jsonl").read_text().splitlines()[1:]]
    for q in ("F", "U"):
        counts = np.bincount([r[-1] for r in rows if r[5] == q], minlength=4)
        assert list(counts) == [5, 5, 5, 5], counts
    summary = json.loads((root / "dataset.json").read_text())["summary"]
    assert set(summary["second_event_kinds"].values()) == {4}

    # In memory, many clips: the options of a question are events of four different kinds, answer kinds are
    # uniform, and "the longest option" is no better than chance.
    kinds_distinct, answer_kinds, longest = 0, Counter(), 0
    pairs = [(a, b) for a in synth_traffic.KINDS for b in synth_traffic.KINDS if a != b]
    n = 160
    schedule = synth.balanced_schedule(n, len(pairs), np.random.default_rng(0))
    for i in range(n):
        rng = np.random.default_rng([7, i])
        clip = synth_traffic.sample_clip(rng, *pairs[schedule[i]])
        track = synth_traffic.simulate(clip)
        for q in synth_traffic._questions(clip, track, rng, ("U", "R", "F"), i % 2, (i // 2) % 2):
            options = [q["answer_text"], *q["distractors"]]
            kinds_distinct += len({_kind_of(o) for o in options}) == 4
            answer_kinds[q["q_type"], q["answer_kind"]] += 1
            longest += max(range(4), key=lambda j: (len(options[j]), -j)) == 0
    assert kinds_distinct >= 0.95 * 3 * n
    assert {answer_kinds["F", k] for k in synth_traffic.KINDS} == {32}
    assert all(22 <= answer_kinds[q, k] <= 42 for q in ("U", "R") for k in synth_traffic.KINDS), answer_kinds
    assert longest / (3 * n) < 0.4


def _kind_of(option: str) -> str:
    for word, kind in (("left", "left"), ("right", "right"), ("bigger", "grow"), ("turn", "colour"), ("collide", "collide")):
        if word in option:
            return kind
    raise AssertionError(option)


def test_trafficqa_truth_and_forecast_prefix():
    for i, kind in enumerate(synth_traffic.KINDS * 4):
        rng = np.random.default_rng([3, i])
        clip = synth_traffic.sample_clip(rng, kind, num_frames=24)
        track = synth_traffic.simulate(clip)
        first, second = clip.events
        assert first.end <= second.start and first.actor != second.actor and first.kind != second.kind
        assert second.start < clip.observed < second.end
        whole = (0, clip.num_frames)
        for ev in clip.events:
            assert synth_traffic.truth(synth_traffic.fact_of(ev), track, whole) == "true"
        # what already happened does not happen again after the cut
        assert synth_traffic.truth(synth_traffic.fact_of(first), track, (clip.observed, clip.num_frames)) == "false"
        if kind == "collide":
            gaps = synth_traffic._gaps(track)[:, second.actor, second.target]
            assert gaps[: clip.observed].min() > 1.0 and gaps.min() <= 0.5  # contact only after the prefix
        assert (track.x - track.r >= 1).all() and (track.x + track.r <= clip.size - 2).all()


# ----------------------------------------------------------------------------------------------- faces


def test_faces_same_seed_same_bytes_via_cli(tmp_path):
    args = ["faces", "--n", "3", "--no-progress", "--frames", "8"]
    assert synth.main([*args, "--seed", "1", "--out", str(tmp_path / "a")]) == 0
    assert synth.main([*args, "--seed", "1", "--out", str(tmp_path / "b")]) == 0
    assert synth.main([*args, "--seed", "2", "--out", str(tmp_path / "c")]) == 0
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb
    assert all(fa[k] != fc[k] for k in fa if k.endswith((".mp4", ".npz")))


def test_faces_annotation_frames_videos_and_cues(tmp_path):
    root = synth_faces.generate_faces(tmp_path / "f", n=14, seed=0, num_frames=8, max_frames=10, folds=2, progress=False)
    names = [f"{i:05d}" for i in range(1, 15)]
    assert (root / "classnames.txt").read_text().splitlines() == list(synth_faces.CLASSES)
    tests = []
    for k in (1, 2):
        parsed = {}
        for split in ("train", "test"):
            lines = (root / "annotation" / f"DFEW_set_{k}_{split}.txt").read_text().splitlines()
            parsed[split] = [line.split(" ") for line in lines]
        train_dirs = {p[0] for p in parsed["train"]}
        test_dirs = {p[0] for p in parsed["test"]}
        assert not train_dirs & test_dirs and len(train_dirs | test_dirs) == 14
        tests.append(test_dirs)
        for frame_dir, num, label in parsed["train"] + parsed["test"]:
            frames = sorted((root / frame_dir).iterdir())
            assert [p.name for p in frames] == [f"{j:05d}.png" for j in range(1, int(num) + 1)]
            assert 8 <= int(num) <= 10 and 1 <= int(label) <= 7
        assert sorted(Counter(int(p[2]) for p in parsed["test"]).values()) == [1] * 7  # one of each class per fold
    assert tests[0].isdisjoint(tests[1]) and tests[0] | tests[1] == {f"frames/{n}" for n in names}

    num_frames = {p[0].split("/")[1]: int(p[1]) for p in (line.split(" ") for line in
                  (root / "annotation" / "DFEW_set_1_train.txt").read_text().splitlines()
                  + (root / "annotation" / "DFEW_set_1_test.txt").read_text().splitlines())}
    for name in names:
        t = num_frames[name]
        assert _decoded_frames(root / "videos" / f"{name}.mp4") == t
        cues = np.load(root / "cues" / f"{name}.npz")
        lm, masks = cues["landmarks"], cues["masks"]
        assert lm.shape == (t, 68, 2) and lm.dtype == np.float32
        assert masks.shape == (t, 64, 64) and masks.dtype == np.uint8 and set(np.unique(masks)) <= set(range(5))
        assert np.isfinite(lm).all() and (lm > -8).all() and (lm < 72).all()
        _check_masks_match_landmarks(lm, masks)
        meta = json.loads((root / "cues" / f"{name}.json").read_text())
        assert meta["clip"] == name and meta["num_frames"] == t and "label" not in meta
        assert isinstance(meta["description"], str) and len(meta["description"]) > 10
        assert 0 < meta["onset_frame"] < meta["apex_frame"] < t


def _check_masks_match_landmarks(lm: np.ndarray, masks: np.ndarray) -> None:
    """Every part of the label map lies where its landmarks are (1.5 px tolerance; brows have thickness)."""
    parts = {4: np.r_[48:60], 3: np.r_[36:48], 2: np.r_[17:27]}
    pad = {4: 1.5, 3: 1.5, 2: 4.0}
    for t in range(len(lm)):
        for label, idx in parts.items():
            ys, xs = np.nonzero(masks[t] == label)
            if len(xs) == 0:
                assert label == 3  # shut eyes (a blink) may cover no pixel
                continue
            pts = lm[t, idx]
            assert xs.min() >= pts[:, 0].min() - pad[label] and xs.max() <= pts[:, 0].max() + pad[label]
            assert ys.min() >= pts[:, 1].min() - pad[label] and ys.max() <= pts[:, 1].max() + pad[label]
        # the mouth centre is mouth, the face (skin) surrounds the nose tip
        mx, my = np.round(lm[t, [51, 57]].mean(0)).astype(int)
        assert masks[t, my, mx] == 4
        nx, ny = np.round(lm[t, 30]).astype(int)
        assert masks[t, ny, nx] == 1


def test_faces_labels_balanced_and_change_needed_to_classify():
    n = 700
    labels = synth.balanced_schedule(n, 7, synth.rng_for(0, synth.key("labels")))
    assert set(np.bincount(labels, minlength=7)) == {100}
    folds = [(i // 7) % 5 for i in range(n)]
    for k in range(5):
        assert set(np.bincount(labels[np.array(folds) == k], minlength=7)) == {20}

    # The first frame is neutral for every class (and resting faces differ), the change to the apex tells the class:
    # a nearest-class-mean on pose-free landmarks is near chance on frame 0 and accurate on the change.
    n = 210
    labels = synth.balanced_schedule(n, 7, np.random.default_rng(0))
    first, change = [], []
    for i in range(n):
        clip = synth_faces.sample_face_clip(np.random.default_rng([11, i]), int(labels[i]))
        assert clip.weight[0] == 0 and clip.weight[clip.apex] > 0.85
        lm0 = synth_faces._geometry(clip.identity, clip.params[0])["landmarks"][17:].ravel()
        lma = synth_faces._geometry(clip.identity, clip.params[clip.apex])["landmarks"][17:].ravel()
        first.append(lm0)
        change.append(lma - lm0)

    def nearest_mean_accuracy(x):
        x, train = np.array(x), np.arange(n) % 2 == 0
        scale = x[train].std(0) + 1e-6
        means = np.stack([x[train & (labels == k)].mean(0) for k in range(7)]) / scale
        pred = (((x[~train] / scale)[:, None] - means[None]) ** 2).sum(-1).argmin(1)
        return (pred == labels[~train]).mean()

    assert nearest_mean_accuracy(first) < 0.3
    assert nearest_mean_accuracy(change) > 0.8


def test_describe_change_names_the_largest_changes():
    rng = np.random.default_rng(0)
    change = np.zeros(len(synth_faces.PARAMS))
    change[synth_faces.PARAMS.index("mouth_curve")] = 0.8
    change[synth_faces.PARAMS.index("eye_open")] = -0.3
    text = synth_faces.describe_change(change, rng)
    assert ("mouth" in text) and ("narrow" in text or "squint" in text) and " and " in text
    assert synth_faces.describe_change(np.full(len(synth_faces.PARAMS), 0.05), rng) in synth_faces._STILL
