"""The motion VideoQA world (issue 19): determinism, answers checked against the recorded tracks, reverse options,
the layout flags, the recorded x-position gate (passed by the shipped tiny CLIP on the default world)."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from mmadapters.video import gate, synth, synth_motion, synth_traffic


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(root, name="R2_all"):
    lines = (root / "annotations" / f"{name}.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == synth_traffic.HEADER
    return [dict(zip(synth_traffic.HEADER, json.loads(line), strict=True)) for line in lines[1:]]


def test_motion_same_seed_same_bytes_via_cli(tmp_path):
    args = ["motion", "--n", "6", "--no-progress", "--frames", "8", "--no-gate"]
    assert synth.main([*args, "--seed", "3", "--out", str(tmp_path / "a")]) == 0
    assert synth.main([*args, "--seed", "3", "--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    assert synth.main([*args, "--seed", "4", "--out", str(tmp_path / "c")]) == 0
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb
    videos = [k for k in fa if k.endswith(".mp4")]
    assert len(videos) == 6 and sum(fa[k] != fc.get(k) for k in videos) >= 5


def test_motion_answers_follow_tracks_and_reverse_options_exist(tmp_path):
    root = synth_motion.generate_motion(tmp_path / "m", n=24, seed=1, gate=False, progress=False)
    rows = _rows(root)
    assert len(rows) == 24 and len(_rows(root, "R2_test")) + len(_rows(root, "R2_train")) == 24
    counts_by_slot = np.bincount([r["answer"] for r in rows], minlength=4)  # balanced within each split
    assert counts_by_slot.max() - counts_by_slot.min() <= 2
    meta = {m["record_id"]: m for m in map(json.loads, (root / "meta.jsonl").read_text().splitlines())}
    kinds, counts = set(), set()
    for row in rows:
        m = meta[row["record_id"]]
        options = [row[f"option{i}"] for i in range(4)]
        assert len(set(options)) == 4
        actor = m["objects"][m["actor"]]
        track = m["track"]
        assert row["q_body"] == f"What happens to the {actor['shape']}?"
        # the answer read from the recorded per-frame track alone (first frame against last)
        assert options[row["answer"]] == synth_motion.answer_from_track(track, m["actor"], actor["shape"])
        # the reverse option: same words, swapped order
        start, end = options[row["answer"]][len(f"The {actor['shape']} starts "):-1].split(" and ends ")
        assert options[m["reverse_option"]] == synth_motion.option_text(actor["shape"], end, start)
        # the other pair is also a reverse pair, of another attribute
        rest = [o for i, o in enumerate(options) if i not in (row["answer"], m["reverse_option"])]
        s0, e0 = rest[0][len(f"The {actor['shape']} starts "):-1].split(" and ends ")
        assert rest[1] == synth_motion.option_text(actor["shape"], e0, s0)
        # tracks: radius never under 1.5 patches, shapes inside the frame, the change inside [start, end)
        x, r = np.array(track["x"]), np.array(track["r"])
        assert x.shape == r.shape == (m["num_frames"], len(m["objects"]))
        assert r.min() >= 12.0 - 1e-6 and (x - r >= 0).all() and (x + r <= 64).all()
        changed = {"move": x, "size": r}.get(m["kind"])
        if changed is not None:
            still = np.r_[0 : m["start"] + 1, m["end"] - 1 : m["num_frames"]]
            assert np.ptp(changed[: m["start"] + 1, m["actor"]]) == 0 and np.ptp(changed[m["end"] - 1 :, m["actor"]]) == 0
            assert np.ptp(changed[still, m["actor"]]) >= 4
        else:
            assert track["colour"][0][m["actor"]] != track["colour"][-1][m["actor"]]
        # the non-acting shape stands still at the horizontal centre (the default distractor_x 0.5)
        for k in range(len(m["objects"])):
            if k != m["actor"]:
                assert (x[:, k] == 32.0).all() and (r[:, k] == 12.0).all()
        kinds.add(m["kind"])
        counts.add(len(m["objects"]))
        with av.open(str(root / "videos" / row["vid_filename"])) as c:
            assert sum(1 for _ in c.decode(video=0)) == m["num_frames"]
    assert kinds == set(synth_motion.KINDS) and counts == {1, 2}


def test_motion_options_use_pretraining_caption_words():
    from mmadapters.vision import synth as vision_synth

    vocabulary = set(vision_synth.COLOURS) | set(vision_synth.SHAPES) | {"small", "large", "on", "the", "left", "right"}
    for i, kind in enumerate(synth_motion.KINDS * 4):
        clip = synth_motion.sample_motion_clip(np.random.default_rng([5, i]), kind, i % 2, n_objects=1 + i % 2)
        q = synth_motion._question(clip, synth_motion.KINDS[(synth_motion.KINDS.index(kind) + 1) % 3])
        for option in [q["answer_text"], *q["distractors"]]:
            words = option.rstrip(".").split()
            assert words[0] == "The" and words[2] == "starts" and "ends" in words
            content = [w for w in words if w not in ("The", "starts", "and", "ends")]
            assert set(content) <= vocabulary, option


def _meta(root):
    return [json.loads(line) for line in (root / "meta.jsonl").read_text().splitlines()]


def test_motion_layout_flags_via_cli(tmp_path):
    args = ["motion", "--n", "18", "--seed", "2", "--frames", "8", "--no-gate", "--no-progress"]
    assert synth.main([*args, "--out", str(tmp_path / "d")]) == 0
    assert synth.main([*args, "--out", str(tmp_path / "r"), "--distractor-x", "random", "--travel", "0.25", "0.75"]) == 0
    default = json.loads((tmp_path / "d" / "dataset.json").read_text())
    wide = json.loads((tmp_path / "r" / "dataset.json").read_text())
    assert default["generator_version"] == synth_motion.GENERATOR_VERSION == 2
    assert default["arguments"]["distractor_x"] == 0.5 and default["arguments"]["travel"] == [0.3, 0.7]
    assert wide["arguments"]["distractor_x"] is None and wide["arguments"]["travel"] == [0.25, 0.75]
    others = []
    for m in _meta(tmp_path / "r"):
        x, r = np.array(m["track"]["x"]), np.array(m["track"]["r"])
        assert (x - r >= 0).all() and (x + r <= 64).all()
        if m["kind"] == "move":  # the travel's ends, with a radius that fits there
            assert sorted([x[0, m["actor"]], x[-1, m["actor"]]]) == [16.0, 48.0] and r[0, m["actor"]] <= 16.0
        others += [x[0, k] for k in range(len(m["objects"])) if k != m["actor"]]
    assert len(others) >= 6 and len(set(others)) == len(others)  # 'random': drawn per clip, not the centre
    assert 32.0 not in others


def test_gate_recorded_on_tiny_set(tmp_path):
    root = synth_motion.generate_motion(tmp_path / "g", n=10, seed=0, num_frames=8, progress=False)
    record = json.loads((root / "dataset.json").read_text())
    g = record["summary"]["gate"]
    assert g["frames"] == {"train": 64, "test": 16} and g["aim"] == gate.GATE_AIM
    assert np.isfinite(g["x_position_probe_r2"]) and g["passed"] == (g["x_position_probe_r2"] >= 0.8)
    assert g["model"] == "tiny_clip (shipped)"
    # the same arguments again: the folder is kept as it is
    before = (root / "dataset.json").stat().st_mtime_ns
    synth_motion.generate_motion(tmp_path / "g", n=10, seed=0, num_frames=8, progress=False)
    assert (root / "dataset.json").stat().st_mtime_ns == before


def test_gate_passes_with_the_still_distractor_and_fails_with_a_random_one(tmp_path):
    # issue 19: with the second shape at a random x the shipped tiny CLIP's frames carry about the mean of the two
    # shapes' x-positions, not the actor's (0.683 on --n 600; 0.619 here); with it still at the centre the gate
    # passes (0.903 on --n 600; 0.849 here, 60 clips of 8 frames)
    r2 = {}
    for name, dx in (("still", 0.5), ("random", None)):
        root = synth_motion.generate_motion(tmp_path / name, n=60, seed=0, num_frames=8, distractor_x=dx, progress=False)
        r2[name] = json.loads((root / "dataset.json").read_text())["summary"]["gate"]["x_position_probe_r2"]
    assert r2["still"] >= gate.GATE_AIM, r2
    assert r2["random"] < 0.72 and r2["still"] - r2["random"] > 0.15, r2


def test_ridge_r2_reads_a_linear_target_and_rejects_tiny_sets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8))
    y = x @ rng.normal(size=8) + 0.01 * rng.normal(size=200)
    r2, _ = gate.ridge_r2(x[:150], y[:150], x[150:], y[150:])
    assert r2 > 0.99
    noise, _ = gate.ridge_r2(x[:150], rng.normal(size=150), x[150:], rng.normal(size=50))
    assert noise < 0.2
    with pytest.raises(ValueError, match="at least 2"):
        gate.ridge_r2(x[:1], y[:1], x[1:3], y[1:3])


def test_motion_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="objects"):
        synth_motion.generate_motion(tmp_path / "x", n=4, objects=(1, 3), progress=False)
    with pytest.raises(ValueError, match="n=1"):
        synth_motion.generate_motion(tmp_path / "x", n=1, progress=False)
    with pytest.raises(ValueError, match="travel"):
        synth_motion.generate_motion(tmp_path / "x", n=4, travel=(0.1, 0.9), progress=False)
    with pytest.raises(ValueError, match="travel"):
        synth_motion.generate_motion(tmp_path / "x", n=4, travel=(0.7, 0.3), progress=False)
    with pytest.raises(ValueError, match="distractor_x"):
        synth_motion.generate_motion(tmp_path / "x", n=4, distractor_x=0.05, progress=False)
    with pytest.raises(SystemExit):
        synth.main(["motion", "--n", "4", "--out", str(tmp_path / "x"), "--distractor-x", "middle"])
    with pytest.raises(FileNotFoundError, match="meta.jsonl"):
        gate.x_position_gate(tmp_path)
