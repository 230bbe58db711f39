"""Bad media files (images, videos, audio): each is skipped and counted with its reason, or raises an error
naming the file and what was expected. Part of the bad-input catalogue in docs/robustness.md."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmadapters.speech.audio import AudioError, load_audio
from mmadapters.speech.readers import Utterance, iter_audio_batches
from mmadapters.video.dfer import load_split, read_all_frames
from mmadapters.video.io import VideoError, load_clip
from mmadapters.vision.readers import ImageFolderDataset, Unreadable, collate_with_skips

SR = 16000


def _png(color=(200, 30, 30), size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _broken_png_chunk() -> bytes:
    """A PNG whose IDAT length is off by 8: PIL raises SyntaxError ('broken PNG file'), not an OSError."""
    png = _png()
    i = png.find(b"IDAT")
    n = int.from_bytes(png[i - 4:i], "big") - 8
    return png[:i - 4] + n.to_bytes(4, "big") + png[i:]


# ------------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("name, data", [
    ("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10),
    ("truncated.png", _png()[:40]),
    ("empty.png", b""),
    ("broken_chunk.png", _broken_png_chunk()),
])
def test_bad_image_is_skipped_counted_and_named(tmp_path, name, data):
    root = tmp_path / "data"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "good.png").write_bytes(_png())
    (root / "cat" / name).write_bytes(data)
    ds = ImageFolderDataset(root, transform=lambda im: np.asarray(im))
    images, labels, paths, skipped = collate_with_skips([ds[i] for i in range(len(ds))])
    assert len(images) == 1 and paths == [str(root / "cat" / "good.png")]
    assert len(skipped) == 1 and isinstance(skipped[0], Unreadable)
    assert skipped[0].path == str(root / "cat" / name) and skipped[0].label == 0
    assert skipped[0].reason  # "<ExceptionType>: <message>" recorded for the results file


# ------------------------------------------------------------------------------------------------ videos


def _write_mp4(path, n=24, w=64, h=32):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 8 * i % 250, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("kind, expected", [
    ("truncated", "not a readable video|truncated|cannot decode"),
    ("garbage", "not a readable video"),
    ("empty", "empty file"),
])
def test_bad_video_raises_video_error_naming_the_file(tmp_path, kind, expected):
    good = _write_mp4(tmp_path / "good.mp4")
    bad = tmp_path / f"{kind}.mp4"
    data = good.read_bytes()
    bad.write_bytes({"truncated": data[:len(data) // 3], "garbage": bytes(range(256)) * 8, "empty": b""}[kind])
    assert load_clip(good, 4, timeout_s=None).shape == (4, 3, 32, 64)
    with pytest.raises(VideoError, match=expected) as err:
        load_clip(bad, 4, timeout_s=None)
    assert err.value.path == str(bad) and str(err.value).startswith(str(bad))


def test_dfer_frame_dir_with_a_broken_png_is_skipped_and_counted(tmp_path):
    """Regression: a PNG that makes PIL raise SyntaxError used to escape load_split and stop the whole split."""
    good, bad = tmp_path / "clip_good", tmp_path / "clip_bad"
    for d in (good, bad):
        d.mkdir()
        for i in range(3):
            (d / f"{i}.png").write_bytes(_png((10 * i, 0, 0)))
    (bad / "1.png").write_bytes(_broken_png_chunk())
    with pytest.raises(ValueError, match="unreadable frame image") as err:
        read_all_frames(bad)
    assert str(bad / "1.png") in str(err.value)
    split = load_split([(str(good), 0), (str(bad), 1)], progress=False)
    assert [c.path for c in split.clips] == [str(good)]
    assert len(split.skipped) == 1 and split.skipped[0]["path"] == str(bad)
    assert "1.png" in split.skipped[0]["reason"] and "SyntaxError" in split.skipped[0]["reason"]


# ------------------------------------------------------------------------------------------------- audio


def _tone(seconds=0.5, sr=SR, channels=1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * 220 * t)).astype("float32")
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def _wav_with_rate(path, rate: int):
    sf.write(path, _tone(), SR, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[24:28] = struct.pack("<I", rate)  # fmt chunk: sample rate, then byte rate
    data[28:32] = struct.pack("<I", rate * 2)
    path.write_bytes(bytes(data))
    return path


def test_audio_at_another_sample_rate_is_resampled_to_16k(tmp_path):
    sf.write(tmp_path / "8k.wav", _tone(0.5, 8000), 8000)
    wave = load_audio(tmp_path / "8k.wav")
    assert wave.shape == (SR // 2,)  # 0.5 s at 16 kHz


@pytest.mark.parametrize("rate", [1, 50, 2_000_000_000])
def test_implausible_sample_rate_in_the_header_is_corrupt(tmp_path, rate):
    """Regression: a 1 Hz header used to be 'resampled' into 256 M samples (1 GB) with max_seconds=None, and a
    2 GHz one silently into a single sample."""
    path = _wav_with_rate(tmp_path / f"r{rate}.wav", rate)
    with pytest.raises(AudioError, match=f"declares a sample rate of {rate} Hz; expected 1000 to 768000 Hz") as err:
        load_audio(path, max_seconds=None)
    assert err.value.kind == "corrupt" and err.value.path == str(path)


def test_stereo_audio_is_refused_or_mixed(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, _tone(channels=2), SR)
    with pytest.raises(AudioError, match="has 2 channels; expected mono") as err:
        load_audio(path)
    assert err.value.kind == "channels" and str(path) in str(err.value)
    assert load_audio(path, mono="mix").shape == (SR // 2,)


@pytest.mark.parametrize("name, make, kind, expected", [
    ("garbage.wav", lambda p: p.write_bytes(b"RIFF" + bytes(200)), "corrupt", "cannot decode audio"),
    ("truncated.wav", None, "corrupt", "is truncated: its header declares"),
    ("empty.wav", lambda p: p.write_bytes(b""), "empty", "the file is 0 bytes"),
    ("nan.wav", lambda p: sf.write(p, np.array([0.1, np.nan] * 800, "float32"), SR, subtype="FLOAT"), "corrupt",
     "NaN or infinite samples"),
    ("silent.wav", lambda p: sf.write(p, np.zeros(8000, "float32"), SR), "silent", "is silent"),
    ("missing.wav", lambda p: None, "missing", "audio file not found"),
])
def test_bad_audio_is_skipped_and_counted_by_kind(tmp_path, name, make, kind, expected):
    good, bad = tmp_path / "good.wav", tmp_path / name
    sf.write(good, _tone(), SR)
    if make is None:  # truncated: the header declares more samples than the file holds
        bad.write_bytes(good.read_bytes()[:2000])
    else:
        make(bad)
    with pytest.raises(AudioError, match=expected) as err:
        load_audio(bad)
    assert err.value.kind == kind and str(err.value).startswith(str(bad))
    utts = [Utterance("good", str(good), "hi", "en"), Utterance("bad", str(bad), "hi", "en")]
    batches = list(iter_audio_batches(utts, 2))
    assert [u.id for u in batches[0].utterances] == ["good"]
    (skipped,) = batches[0].skipped
    assert skipped.utterance.id == "bad" and skipped.kind == kind and expected in skipped.reason
