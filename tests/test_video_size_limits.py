"""Videos and frame folders over the frame-size limits (mmadapters.video.io.MAX_FRAME_PIXELS, MAX_ASPECT) are
refused from their headers, before any frame is decoded: evaluation skips and counts them with the reason, training
leaves them out. Before, an 8000x8000 3-frame video (23 KB) took 6.5 GB in `mmadapters eval videoqa`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from mmadapters.eval import cli
from mmadapters.eval.results_schema import read_results
from mmadapters.vision.clip import tiny_clip_config, write_clip_dir

PIXELS_REASON = "frames are 4100x4100 (width x height: 16,810,000 pixels); expected at most 16,777,216 pixels per frame"
ASPECT_REASON = "frames are 2100x100 (width x height: 21:1); expected a long side at most 20 times the short side"


def write_flat_mp4(path: Path, width: int, height: int, n: int) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clip")
    write_clip_dir(d, tiny_clip_config(embed_dim=16, image_size=32, width=32, layers=1))
    return d


@pytest.fixture(scope="module")
def qa_root(tmp_path_factory) -> tuple[Path, str, str]:
    """Generated TrafficQA; the video of the first test question and that of the first training question are
    replaced by an oversized one: (root, test video, training video)."""
    from mmadapters.video.synth_traffic import generate_trafficqa

    root = generate_trafficqa(tmp_path_factory.mktemp("qa"), n=6, seed=0, size=32, num_frames=16, progress=False)
    names = []
    for split in ("test", "train"):
        name = json.loads((root / "annotations" / f"R2_{split}.jsonl").read_text().splitlines()[1])[2]
        names.append(name)
    big = write_flat_mp4(root / "big.mp4", 4100, 4100, 2)
    for name in names:
        shutil.copy(big, root / "videos" / name)
    return root, names[0], names[1]


@pytest.fixture(scope="module")
def faces_root(tmp_path_factory) -> tuple[Path, str]:
    """Generated DFEW faces; the frames of the first test clip are replaced by 2100x100 ones: (root, clip folder)."""
    from mmadapters.video.synth_faces import generate_faces

    root = generate_faces(tmp_path_factory.mktemp("faces"), n=14, seed=0, size=32, num_frames=8, folds=2, videos=False,
                          progress=False)
    first = (root / "annotation" / "DFEW_set_1_test.txt").read_text().split()[0]
    for frame in sorted((root / first).iterdir()):
        Image.fromarray(np.zeros((100, 2100, 3), np.uint8)).save(frame)
    return root, first


def test_eval_videoqa_skips_and_counts_an_oversized_video(qa_root, clip_dir, tmp_path, capsys):
    root, name, _ = qa_root
    test = root / "annotations" / "R2_test.jsonl"
    asked = sum(json.loads(line)[2] == name for line in test.read_text().splitlines()[1:])
    args = ["eval", "videoqa", "--annotations", str(test), "--video-root", str(root / "videos"),
            "--model", f"local-dir:{clip_dir}", "--num-frames", "2", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress"]
    assert cli.main([*args, "--output", str(tmp_path / "r.json")]) == 0
    r = read_results(tmp_path / "r.json")
    assert r["counts"]["skipped"] == asked and r["counts"]["evaluated"] == r["counts"]["total"] - asked
    assert all(s["reason"].startswith(f"VideoError: {root / 'videos' / name}: {PIXELS_REASON}") for s in r["skipped"])
    capsys.readouterr()
    assert cli.main([*args, "--output", str(tmp_path / "ff.json"), "--fail-fast"]) == 2
    assert PIXELS_REASON in capsys.readouterr().err


def test_tem_adapter_training_leaves_an_oversized_video_out(qa_root, clip_dir, tmp_path):
    from mmadapters.video.qa_features import encode_split
    from mmadapters.vision.clip import load_clip

    root, _, name = qa_root
    clip = load_clip(f"local-dir:{clip_dir}")
    split = encode_split(clip, root / "annotations" / "R2_train.jsonl", video_root=root / "videos", num_frames=2,
                         cache_dir=tmp_path / "cache")
    assert [s["video"] for s in split.skipped] == [str(root / "videos" / name)]
    assert PIXELS_REASON in split.skipped[0]["reason"] and name not in split.vid_filenames


def test_eval_dfer_skips_and_fineclipper_training_leaves_out_an_elongated_clip(faces_root, clip_dir, tmp_path):
    from mmadapters.video.dfer import load_split

    root, first = faces_root
    assert cli.main(["eval", "dfer", "--data-dir", str(root), "--fold", "1", "--split", "test", "--model",
                     f"local-dir:{clip_dir}", "--num-frames", "3", "--output", str(tmp_path / "r.json"),
                     "--no-progress"]) == 0
    r = read_results(tmp_path / "r.json")
    assert r["counts"]["skipped"] == 1 and r["skipped"][0]["id"] == first and ASPECT_REASON in r["skipped"][0]["reason"]
    split = load_split([(str(root / first), 0)], progress=False)
    assert not split.clips and ASPECT_REASON in split.skipped[0]["reason"]


def test_a_frame_folder_over_the_memory_budget_is_refused_before_decoding(tmp_path, monkeypatch):
    from mmadapters.video import dfer

    for i in range(4):
        Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(dfer, "MAX_CLIP_BYTES", 3 * 40 * 50 * 3)  # room for three of the four frames
    with pytest.raises(ValueError, match=r"4 frames of 50x40 would take 24,000 bytes decoded; expected at most 18,000 "
                                         r"per clip \(MAX_CLIP_BYTES") as err:
        dfer.read_all_frames(tmp_path)
    assert err.value.path == str(tmp_path)
