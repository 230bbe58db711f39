"""mmadapters.video.data: decoding in DataLoader workers, skipping and counting bad files, seeded training sampling,
and the frozen-CLIP frame-feature cache (keys, reuse, atomic entries) with the shipped tiny CLIP."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmadapters.video.data import BadSample, FrameFeatureCache, VideoDataset, collate_videos, make_loader
from mmadapters.video.io import VideoError, sample_indices

N, W, H = 24, 64, 32


def write_mp4(path, level0=0, n=N):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), (level0 + 8 * i) % 250, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    good = [write_mp4(root / f"v{i}.mp4", level0=i) for i in range(3)]
    bad = root / "broken.mp4"
    bad.write_bytes(b"\x00" * 100)
    (root / "empty.mp4").write_bytes(b"")
    return {"good": good, "bad": str(bad), "empty": str(root / "empty.mp4"), "root": root}


def test_item_and_relative_rows(files):
    ds = VideoDataset([("v0.mp4", 3), ("v1.mp4", {"question": "q"})], root=files["root"], num_frames=4)
    item = ds[0]
    assert item["frames"].shape == (4, 3, H, W) and item["frames"].dtype == torch.uint8
    assert item["target"] == 3 and item["path"] == str(files["root"] / "v0.mp4") and item["index"] == 0
    assert item["frame_indices"].tolist() == sample_indices(N, 4)
    assert ds[1]["target"] == {"question": "q"}
    with pytest.raises(ValueError, match="row 0"):
        VideoDataset([(1, 2, 3)])


def test_loader_with_workers_skips_and_counts_bad_files(files):
    rows = [(files["good"][0], 0), (files["bad"], 1), (files["good"][1], 2), (files["empty"], 3), (files["good"][2], 4)]
    loader = make_loader(VideoDataset(rows, num_frames=4, size=16), batch_size=2, num_workers=2)
    batches = list(loader)
    frames = torch.cat([b["frames"] for b in batches])
    assert frames.shape == (3, 4, 3, 16, 32)
    assert torch.cat([b["target"] for b in batches]).tolist() == [0, 2, 4]
    assert loader.num_skipped == 2 and sorted(s.index for s in loader.skipped) == [1, 3]
    assert {s.path for s in loader.skipped} == {files["bad"], files["empty"]}
    assert all(s.path in s.reason for s in loader.skipped)
    list(loader)
    assert loader.num_skipped == 4  # counts add up over epochs


def test_fail_fast_raises_the_video_error(files):
    ds = VideoDataset([files["bad"]], fail_fast=True)
    with pytest.raises(VideoError, match="broken.mp4"):
        ds[0]
    with pytest.raises(VideoError, match="broken.mp4"):  # re-raised from the worker
        list(make_loader(ds, batch_size=1, num_workers=1))


def test_collate_of_only_bad_items():
    out = collate_videos([BadSample(0, "a.mp4", "a.mp4: empty file (0 bytes)")])
    assert out["frames"] is None and out["path"] == [] and len(out["skipped"]) == 1


def test_seeded_training_sampling_does_not_depend_on_workers(files):
    rows = [(p, 0) for p in files["good"]] * 2

    def indices(num_workers, epoch=0):
        ds = VideoDataset(rows, num_frames=4, training=True, seed=7)
        ds.set_epoch(epoch)
        return torch.cat([b["frame_indices"] for b in make_loader(ds, batch_size=2, num_workers=num_workers)])

    a, b = indices(0), indices(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, indices(0, epoch=1))
    assert not torch.equal(a[0], a[3]) or not torch.equal(a[1], a[4])  # same file, different rows: own draws


@pytest.fixture(scope="module")
def tiny_clip():
    from mmadapters.vision.clip import load_clip

    return load_clip()


def test_feature_cache_computes_once_and_is_reused(files, tiny_clip, tmp_path):
    paths = files["good"] + [files["bad"]]
    cache = FrameFeatureCache(tmp_path / "feats", tiny_clip, num_frames=4, batch_size=2)
    stats = cache.build(paths, num_workers=0)
    assert (stats.hits, stats.computed) == (0, 3) and [s.index for s in stats.skipped] == [3]
    feats = cache.load(files["good"])
    dim = tiny_clip.model.visual.output_dim
    assert feats.shape == (3, 4, dim) and feats.dtype == torch.float32
    # the cached features are the model's own on the same frames
    frames = torch.stack([VideoDataset([p], num_frames=4)[0]["frames"] for p in files["good"]])
    with torch.inference_mode():
        direct = tiny_clip.model.encode_image(cache.preprocess(frames.flatten(0, 1))).view(3, 4, -1)
    torch.testing.assert_close(feats, direct.float(), atol=1e-5, rtol=1e-4)
    # a second epoch, or another recipe with its own cache object: nothing is encoded again
    again = FrameFeatureCache(tmp_path / "feats", tiny_clip, num_frames=4)
    stats = again.build(files["good"])
    assert (stats.hits, stats.computed, again.encoded) == (3, 0, 0)
    torch.testing.assert_close(again.get(files["good"][1]), feats[1])
    entry = load_file(again.entry_path(files["good"][0]))
    assert entry["indices"].tolist() == sample_indices(N, 4)
    assert not [p for p in (tmp_path / "feats").rglob("*") if p.name.endswith(".tmp")]  # atomic: no leftovers
    with pytest.raises(KeyError, match="broken.mp4"):
        cache.load([files["bad"]])
    with pytest.raises(VideoError, match="broken.mp4"):
        cache.get(files["bad"])


def test_feature_cache_keys(files, tiny_clip, tmp_path):
    path = write_mp4(tmp_path / "k.mp4")
    cache = FrameFeatureCache(tmp_path / "feats", tiny_clip, num_frames=4)
    key = cache.key(path)
    assert FrameFeatureCache(tmp_path / "feats", tiny_clip, num_frames=8).key(path) != key  # sampling
    assert FrameFeatureCache(tmp_path / "feats", tiny_clip, num_frames=4, strategy="strided").key(path) != key

    class OtherWeights:
        def identity(self):
            return "sha256:" + "0" * 64

    other = FrameFeatureCache(tmp_path / "feats", type("B", (), {"model": tiny_clip.model, "info": OtherWeights()})(),
                              num_frames=4)
    assert other.key(path) != key  # CLIP weights
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.key(path) != key  # file changed (mtime)
    by_content = FrameFeatureCache(tmp_path / "feats", tiny_clip, num_frames=4, file_key="content")
    copy = tmp_path / "copy.mp4"
    copy.write_bytes(open(path, "rb").read())
    assert by_content.key(copy) == by_content.key(path) != cache.key(copy)


def test_damaged_entry_is_recomputed(files, tiny_clip, tmp_path):
    cache = FrameFeatureCache(tmp_path / "feats", tiny_clip, num_frames=2)
    first = cache.get(files["good"][0])
    cache.entry_path(files["good"][0]).write_bytes(b"not safetensors")
    torch.testing.assert_close(cache.get(files["good"][0]), first)
    assert cache.encoded == 2


def test_feature_cache_argument_errors(tiny_clip, tmp_path):
    with pytest.raises(ValueError, match="file_key"):
        FrameFeatureCache(tmp_path, tiny_clip, file_key="inode")
    with pytest.raises(TypeError, match="ClipBundle"):
        FrameFeatureCache(tmp_path, object())
