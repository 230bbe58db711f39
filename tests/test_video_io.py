"""mmadapters.video.io: frame sampling, decoding with decord and PyAV, frame directories, and a VideoError naming the
file (within seconds) for every kind of bad input. Videos are tiny mp4s written here with PyAV; frame i is a flat grey
of level 6*i, so the decoded frames tell which indices were read."""

from __future__ import annotations

import os
import random
import time

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mmadapters.video import io as vio
from mmadapters.video.io import VideoError, load_clip, sample_indices

N = 40
W, H = 64, 32  # decord needs widths it can align (see test_decord_unfriendly_width_falls_back_to_pyav)


def write_mp4(path, n=N, faststart=False, width=W):
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, H, "yuv420p"
        stream.codec_context.gop_size = 8
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((H, width, 3), 6 * i % 250, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_numbers(clip: torch.Tensor) -> list[int]:
    """The frame index each decoded frame shows (its grey level / 6)."""
    return [round(v / 6) for v in clip.float().mean(dim=(1, 2, 3)).tolist()]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    good = write_mp4(root / "good.mp4")
    fast = write_mp4(root / "faststart.mp4", n=200, faststart=True)
    data = good.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov (at the end) is lost
    fdata = fast.read_bytes()
    mdat = fdata.index(b"mdat")  # faststart: the index (moov) comes first, so a cut inside mdat keeps the header
    (root / "truncated_faststart.mp4").write_bytes(fdata[: (mdat + len(fdata)) // 2])  # says 200 frames; fewer decode
    (root / "random.mp4").write_bytes(random.Random(0).randbytes(4096))
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n")
    (root / "no_images").mkdir()
    (root / "no_images" / "notes.txt").write_text("x")
    return root


# -- sampling -------------------------------------------------------------------------------------------------


def test_uniform_is_tsn_middle_of_each_segment_at_test_time():
    assert sample_indices(300, 8) == [18, 56, 93, 131, 168, 206, 243, 281]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # short clips repeat frames


def test_uniform_training_draws_one_frame_inside_each_segment():
    for seed in range(20):
        idx = sample_indices(100, 8, training=True, rng=random.Random(seed))
        for i, j in enumerate(idx):
            assert int(12.5 * i) <= j < int(12.5 * (i + 1))
    assert sample_indices(100, 8, training=True, rng=random.Random(3)) == sample_indices(100, 8, training=True,
                                                                                          rng=random.Random(3))
    draws = {tuple(sample_indices(100, 8, training=True, rng=random.Random(s))) for s in range(10)}
    assert len(draws) > 5


def test_random_and_strided():
    idx = sample_indices(50, 8, "random", rng=random.Random(0))
    assert idx == sorted(idx) and len(set(idx)) == 8 and max(idx) < 50
    assert sorted(set(sample_indices(3, 5, "random", rng=random.Random(0)))) == [0, 1, 2]  # every frame, then repeats
    assert sample_indices(100, 4, "strided", stride=10) == [34, 44, 54, 64]  # centred at test time
    start = sample_indices(100, 4, "strided", stride=10, training=True, rng=random.Random(1))[0]
    assert sample_indices(100, 4, "strided", stride=10, training=True, rng=random.Random(1)) == [start + 10 * k for k in range(4)]
    assert sample_indices(5, 4, "strided", stride=2) == [0, 2, 4, 4]  # window longer than the clip: last frame repeats


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_total=10, num_frames=0), "num_frames"), (dict(num_total=0, num_frames=4), "num_total"),
    (dict(num_total=10, num_frames=4, strategy="dense"), "strategy"), (dict(num_total=10, num_frames=4, stride=0), "stride"),
])
def test_sampling_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_indices(**kwargs)


# -- decoding -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
@pytest.mark.parametrize("timeout_s", [None, 10.0])
def test_load_clip_decodes_the_sampled_frames(videos, backend, timeout_s):
    clip, idx = load_clip(videos / "good.mp4", 8, backend=backend, timeout_s=timeout_s, return_indices=True)
    assert clip.dtype == torch.uint8 and clip.shape == (8, 3, H, W)
    assert idx == sample_indices(N, 8)
    assert frame_numbers(clip) == idx


def test_decord_unfriendly_width_falls_back_to_pyav(tmp_path):
    path = write_mp4(tmp_path / "w48.mp4", n=16, width=48)  # decord 0.6 fails to copy out 48-pixel-wide frames
    with pytest.raises(VideoError, match="decord cannot read it"):
        load_clip(path, 4, backend="decord")
    clip, idx = load_clip(path, 4, return_indices=True)
    assert clip.shape == (4, 3, H, 48) and frame_numbers(clip) == idx


def test_training_sampling_is_seeded(videos):
    a, ia = load_clip(videos / "good.mp4", 4, training=True, seed=5, return_indices=True)
    b, ib = load_clip(videos / "good.mp4", 4, training=True, seed=5, return_indices=True)
    assert ia == ib and torch.equal(a, b)
    assert frame_numbers(a) == ia
    _, strided = load_clip(videos / "good.mp4", 4, "strided", stride=3, return_indices=True, timeout_s=None)
    assert strided == [15, 18, 21, 24]


def test_resize_short_side_or_exact(videos):
    assert load_clip(videos / "good.mp4", 2, size=16).shape == (2, 3, 16, 32)  # short side 16, aspect kept
    clip = load_clip(videos / "good.mp4", 2, size=(20, 10))
    assert clip.shape == (2, 3, 20, 10) and clip.dtype == torch.uint8
    with pytest.raises(ValueError, match="size"):
        load_clip(videos / "good.mp4", 2, size=(0, 3))


def test_frame_directory_natural_order(tmp_path):
    for i in range(12):  # 1.png ... 12.png: natural order, not 1, 10, 11, 12, 2, ...
        Image.fromarray(np.full((8, 10, 3), 6 * i, np.uint8)).save(tmp_path / f"{i + 1}.png")
    (tmp_path / "labels.txt").write_text("not a frame")
    clip, idx = load_clip(tmp_path, 4, return_indices=True)
    assert clip.shape == (4, 3, 8, 10) and idx == [1, 4, 7, 10]
    assert frame_numbers(clip) == idx
    assert torch.equal(load_clip(tmp_path, 4, timeout_s=None), clip)


def test_lying_frame_count_small_shortfall_resamples_large_one_raises(videos, monkeypatch):
    real = vio._pyav_claimed_frames
    monkeypatch.setattr(vio, "_pyav_claimed_frames", lambda c, s: real(c, s) + 1)  # header claims one frame too many
    clip, idx = load_clip(videos / "good.mp4", N, backend="pyav", timeout_s=None, return_indices=True)
    assert idx == list(range(N)) and frame_numbers(clip) == idx  # frame N is missing: re-sampled over the N that decode
    monkeypatch.setattr(vio, "_pyav_claimed_frames", lambda c, s: 3 * real(c, s))
    with pytest.raises(VideoError, match=f"claims {3 * N} frames but only {N} decode"):
        load_clip(videos / "good.mp4", 8, backend="pyav", timeout_s=None)


# -- bad inputs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, match", [
    ("truncated.mp4", "not a readable video"),
    ("truncated_faststart.mp4", "header claims 200 frames but only"),
    ("random.mp4", "not a readable video"),
    ("empty.mp4", "empty file"),
    ("text.mp4", "not a readable video"),
    ("no_images", "no image files"),
    ("missing.mp4", "no such file"),
])
@pytest.mark.parametrize("timeout_s", [None, 10.0])
def test_bad_inputs_raise_video_error_naming_the_file(videos, name, match, timeout_s):
    t0 = time.monotonic()
    with pytest.raises(VideoError, match=match) as err:
        load_clip(videos / name, 8, timeout_s=timeout_s)
    assert str(videos / name) in str(err.value) and err.value.path == str(videos / name)
    assert isinstance(err.value, ValueError)
    assert time.monotonic() - t0 < 5


def test_corrupt_image_in_frame_directory_names_the_image(tmp_path):
    for i in range(4):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i:03d}.jpg")
    (tmp_path / "002.jpg").write_bytes(b"garbage")
    with pytest.raises(VideoError, match="frame 2 of frame directory") as err:
        load_clip(tmp_path, 4)
    assert err.value.path == str(tmp_path / "002.jpg")


def test_a_stalled_file_times_out_and_the_next_clip_loads(videos, tmp_path):
    fifo = tmp_path / "stalled.mp4"
    os.mkfifo(fifo)  # opening it for reading blocks forever: a hang inside native code
    t0 = time.monotonic()
    with pytest.raises(VideoError, match="did not finish within 1 s") as err:
        load_clip(fifo, 8, timeout_s=1.0)
    assert err.value.path == str(fifo) and time.monotonic() - t0 < 4
    assert load_clip(videos / "good.mp4", 2).shape == (2, 3, H, W)  # a fresh helper took over


def test_a_dead_helper_is_replaced(videos):
    load_clip(videos / "good.mp4", 2)
    vio._decoder.proc.kill()
    vio._decoder.proc.wait()
    assert frame_numbers(load_clip(videos / "good.mp4", 2)) == sample_indices(N, 2)


def test_argument_errors(videos):
    with pytest.raises(ValueError, match="backend"):
        load_clip(videos / "good.mp4", backend="opencv")
    with pytest.raises(ValueError, match="timeout_s"):
        load_clip(videos / "good.mp4", timeout_s=0)
    with pytest.raises(ValueError, match="strategy"):
        load_clip(videos / "good.mp4", strategy="dense")


def test_video_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(VideoError("a.mp4", "empty file (0 bytes)")))
    assert isinstance(err, VideoError) and str(err) == "a.mp4: empty file (0 bytes)"


# -- size bounds ----------------------------------------------------------------------------------------------


def write_sized_mp4(path, width, height, n):
    """``n`` flat frames of ``width`` x ``height``: a few KB on disk however large the frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 6 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    root = tmp_path_factory.mktemp("sized")
    return {"pixels": write_sized_mp4(root / "4100x4100.mp4", 4100, 4100, 2),  # 16.8 Mpx: just over the limit
            "aspect": write_sized_mp4(root / "2100x100.mp4", 2100, 100, 4),  # 21:1
            "at_limits": write_sized_mp4(root / "2000x100.mp4", 2000, 100, 4)}  # 20:1 is allowed


LIMIT_ERRORS = {"pixels": r"frames are 4100x4100 \(width x height: 16,810,000 pixels\); expected at most 16,777,216 "
                          r"pixels per frame \(MAX_FRAME_PIXELS, 4096x4096\); refused before decoding",
                "aspect": r"frames are 2100x100 \(width x height: 21:1\); expected a long side at most 20 times the "
                          r"short side \(MAX_ASPECT\); refused before decoding"}


@pytest.mark.parametrize("kind", ["pixels", "aspect"])
@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_frames_over_the_pixel_or_aspect_limit_are_refused_before_decoding(sized, kind, backend, monkeypatch):
    """An 8000x8000 3-frame clip (367 KB) took 6.9 GB in `eval videoqa`, a 10000x10 one 6 GB per clip at size=224."""
    with pytest.raises(VideoError, match=LIMIT_ERRORS[kind]) as err:  # through the helper process
        load_clip(sized[kind], 2, size=224, backend=backend)
    assert err.value.path == str(sized[kind])

    def no_decoding(*args, **kwargs):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(vio, "_decode_decord", no_decoding)  # in-process: the header alone refuses it
    monkeypatch.setattr(vio, "_pyav_read", no_decoding)
    with pytest.raises(VideoError, match=LIMIT_ERRORS[kind]):
        load_clip(sized[kind], 2, size=224, backend=backend, timeout_s=None)


def test_frames_at_the_limits_load(sized):
    assert load_clip(sized["at_limits"], 4, size=10).shape == (4, 3, 10, 200)


def test_frame_directory_over_the_aspect_limit_names_the_image(tmp_path):
    for i in range(3):
        Image.fromarray(np.zeros((100, 2100 if i == 1 else 100, 3), np.uint8)).save(tmp_path / f"{i}.png")
    with pytest.raises(VideoError, match=LIMIT_ERRORS["aspect"]) as err:
        load_clip(tmp_path, 3)
    assert err.value.path == str(tmp_path / "1.png")


def test_resizing_holds_one_frame_as_float_not_the_clip(tmp_path):
    """Peak memory of load_clip(8 frames of 2048x2048, size=32) through the helper: the clip's bytes once (the
    buffer it arrives in) plus one frame as float. Before: the whole clip as float, and the bytes twice more
    (587 MB over the 96 MB clip; now about 224 MB)."""
    big = write_sized_mp4(tmp_path / "2048.mp4", 2048, 2048, 8)
    small = write_mp4(tmp_path / "small.mp4", n=8)
    # the process's own high-water mark (VmHWM, reset through clear_refs); ru_maxrss would include the forked
    # parent's memory from before exec
    code = ("import sys; from mmadapters.video.io import load_clip\n"
            "def kb(field): return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1])\n"
            "load_clip(sys.argv[2], 8, size=32)  # starts the helper, warms torch up\n"
            "open('/proc/self/clear_refs', 'w').write('5')  # VmHWM := VmRSS\n"
            "base = kb('VmHWM')\n"
            "clip = load_clip(sys.argv[1], 8, size=32)\n"
            "assert clip.shape == (8, 3, 32, 32), clip.shape\n"
            "print((kb('VmHWM') - base) * 1024)")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code, str(big), str(small)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    clip_bytes = 8 * 2048 * 2048 * 3
    grew = int(out.stdout.split()[-1])
    assert grew < 3 * clip_bytes, f"peak grew by {grew / 2**20:.0f} MB for a {clip_bytes / 2**20:.0f} MB clip"


def test_a_stream_of_unknown_length_keeps_only_the_sampled_frames(videos, monkeypatch):
    """PyAV counts a stream without a frame count in one pass keeping nothing (it used to keep every frame)."""
    held = []
    real_read = vio._pyav_read

    def read(path, wanted):
        got, n = real_read(path, wanted)
        held.append(len(got))
        return got, n

    monkeypatch.setattr(vio, "_pyav_claimed_frames", lambda c, s: 0)
    monkeypatch.setattr(vio, "_pyav_read", read)
    clip, idx = load_clip(videos / "good.mp4", 8, backend="pyav", timeout_s=None, return_indices=True)
    assert idx == sample_indices(N, 8) and frame_numbers(clip) == idx
    assert max(held) == 8
