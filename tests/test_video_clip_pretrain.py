"""Video frames for CLIP pretraining (mmadapters.vision.clip_pretrain, data: video-frames) and scripts/pretrain_video_clip.py:
deterministic clips, state-only frame captions, probes, a loadable local-dir CLIP."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmadapters.vision import clip_pretrain as cp

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "pretrain_video_clip.py"
SHIPPED = ROOT / "video" / "assets" / "video_clip"


@pytest.fixture(scope="module")
def pvc():
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("pretrain_video_clip", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain_video_clip"] = module
    spec.loader.exec_module(module)
    return module


def test_clips_are_deterministic_and_round_trip_through_mp4():
    a, clip, track = cp.clip_frames(3, 5)
    b, _, _ = cp.clip_frames(3, 5)
    assert a.shape == (24, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, cp.clip_frames(3, 6)[0])
    assert track.x.shape == (24, len(clip.objects))


def test_captions_name_states_never_events():
    from mmadapters.video import synth_traffic as st

    _, clip, track = cp.clip_frames(0, 1)
    rng = np.random.default_rng(0)
    captions = [cp.frame_caption(clip, track, f, rng) for f in range(24) for _ in range(5)]
    words = {w for c in captions for w in c.split()}
    assert not words & {"moves", "moved", "grows", "grew", "turns", "turned", "collides", "collided", "happens", "next"}
    assert words & set(st.COLOURS) and words & set(st.SHAPES)
    full = cp.frame_caption(clip, track, 0)  # canonical: every object with every attribute
    for o in clip.objects:
        assert o.shape in full
    # the canonical caption follows the track: position words change for an object that moves
    mover = next((ev for ev in clip.events if ev.kind in ("left", "right")), None)
    if mover is not None:
        before = cp.object_phrase(clip, track, mover.start, mover.actor, None)
        after = cp.object_phrase(clip, track, clip.num_frames - 1, mover.actor, None)
        assert before != after


def test_size_and_position_words_follow_the_track():
    from mmadapters.video import synth_traffic as st

    obj = st.Obj("circle", "red", 1, 5.0, 6.0)
    clip = st.Clip((obj,), (st.Event("grow", 0, 1, 8, 1.6), st.Event("right", 0, 10, 20, 40.0)), "asphalt", 24, 64, 15)
    track = st.simulate(clip)
    first, last = cp.object_phrase(clip, track, 0, 0, None), cp.object_phrase(clip, track, 23, 0, None)
    assert first.startswith("a small red circle at the far left")
    assert "big" in last and "far left" not in last


def test_script_trains_on_the_engine_and_writes_a_loadable_local_dir(pvc, tmp_path):
    from mmadapters.vision.clip import load_clip

    out, run = tmp_path / "vc", tmp_path / "run"
    flags = ["--output", str(out), "--run-dir", str(run), "--steps", "2", "--batch-size", "16", "--set", "recipe.clips=4",
             "--set", "recipe.probe_clips=4", "--set", "recipe.frames_per_clip=4", "--set", "recipe.eval_tasks=[synth-shapes]",
             "--set", "recipe.eval_per_class=1", "--set", "trainer.progress=false"]
    assert pvc.run(flags) == 0
    config = json.loads((out / "open_clip_config.json").read_text())
    record = config["mmadapters"]
    assert record["trained_by"] == "mmadapters train clip-pretrain" and record["recipe"]["data"] == "video-frames"
    assert record["trainer"]["batch_size"] == 2  # 16 images = 2 clips x 4 frames x (frame + mirror)
    assert record["recipe"]["init"] == str(ROOT / "vision" / "assets" / "tiny_clip")
    probes = {"x_r2", "r_r2", "colour_acc", "shape_acc", "position_zeroshot_acc"}
    assert probes <= set(record["metrics"]) and probes <= set(record["initial_metrics"])
    assert [h["step"] for h in record["history"]] == [2]
    assert (out / "open_clip_model.safetensors").read_bytes() == (run / "last" / "open_clip_model.safetensors").read_bytes()
    bundle = load_clip(f"local-dir:{out}", declare_points=False)
    feats = bundle.model.encode_image(torch.zeros(2, 3, 64, 64))
    assert feats.shape == (2, config["model_cfg"]["embed_dim"]) and torch.isfinite(feats).all()
    # a batch of images that does not split into items is refused before training
    with pytest.raises(SystemExit, match="--batch-size 15: expected a multiple of 8"):
        pvc.run([*flags[:2], "--run-dir", str(tmp_path / "other"), "--batch-size", "15", *flags[8:]])


@pytest.mark.skipif(not (SHIPPED / "open_clip_config.json").is_file(), reason="video_clip asset not built")
def test_shipped_video_clip_reads_position_better_than_the_still_image_clip():
    from mmadapters.vision.clip import load_clip

    frames, worlds = cp.render_clips(24, 4242, stream=cp.HELDOUT_STREAM)
    scores = {}
    for name, directory in (("video", SHIPPED), ("tiny", ROOT / "vision" / "assets" / "tiny_clip")):
        bundle = load_clip(f"local-dir:{directory}", declare_points=False)
        with torch.no_grad():
            scores[name] = cp.linear_probes(bundle.model.float(), bundle.tokenizer, frames, worlds)
    assert scores["video"]["x_r2"] > max(0.3, scores["tiny"]["x_r2"] + 0.2), scores
    assert (SHIPPED / "open_clip_model.safetensors").stat().st_size <= 8_000_000
