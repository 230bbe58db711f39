"""Video datasets that decode in DataLoader workers, and an on-disk cache of frozen-CLIP frame features.

    ds = VideoDataset([("a.mp4", 0), ("b.mp4", 3)], num_frames=8, training=True)
    loader = make_loader(ds, batch_size=4, num_workers=2, shuffle=True)
    for batch in loader:            # batch["frames"]: (B, T, 3, H, W) uint8; bad files are left out of the batch
        ...
    print(loader.num_skipped, loader.skipped)   # every BadSample seen so far (path, reason)

    cache = FrameFeatureCache("out/frame_feats", load_clip_model(), num_frames=8)
    stats = cache.build(paths, num_workers=2)   # decodes + encodes the videos not cached yet
    feats = cache.load(paths)                   # (N, T, D) float32

Decoding happens in ``__getitem__``, i.e. in the worker processes; nothing is opened in ``__init__``, so every
decord reader is created inside a worker (decord readers do not survive a fork). A file that cannot be read gives a
:class:`BadSample` instead of an item (unless ``fail_fast``); :func:`collate_videos` leaves those out of the batch and
lists them under ``"skipped"``, and :class:`VideoLoader` adds them up across batches and workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from .io import DEFAULT_STRIDE, DEFAULT_TIMEOUT_S, STRATEGIES, VideoError, frame_files, load_clip

CACHE_FORMAT = 1


@dataclass(frozen=True)
class BadSample:
    """A row whose clip could not be loaded: its dataset index, path and the reason (from :class:`VideoError`)."""

    index: int
    path: str
    reason: str


def _row(row: Any, i: int) -> tuple[str, Any]:
    if isinstance(row, (str, os.PathLike)):
        return os.fspath(row), None
    if isinstance(row, Sequence) and len(row) == 2 and isinstance(row[0], (str, os.PathLike)):
        return os.fspath(row[0]), row[1]
    raise ValueError(f"row {i}: expected a path or a (path, target) pair, got {row!r}")


class VideoDataset(Dataset):
    """Rows of ``(path, target)`` (or bare paths) -> ``{"frames", "target", "path", "index", "frame_indices"}`` items.

    ``frames`` is :func:`mmadapters.video.io.load_clip`'s uint8 ``(T, 3, H, W)``, or whatever ``transform`` makes of
    it; ``frame_indices`` (T,) the frames it holds. ``target`` is the row's label or extra data (anything
    ``default_collate`` can batch; None for bare paths).
    Relative paths are joined to ``root``. Sampling arguments are :func:`load_clip`'s. In training, ``seed``
    makes the random frames a function of (seed, epoch, index), whichever worker loads the item; call
    :meth:`set_epoch` before each epoch (before the loader's iterator is created). Without ``seed`` they come from
    the worker's ``random`` generator, which the DataLoader seeds from torch's.
    A clip that cannot be loaded gives a :class:`BadSample`, or raises its :class:`VideoError` with ``fail_fast``.
    """

    def __init__(self, rows: Sequence[Any], *, root: str | os.PathLike | None = None, num_frames: int = 8,
                 strategy: str = "uniform", stride: int = DEFAULT_STRIDE, size: int | Sequence[int] | None = None,
                 training: bool = False, transform: Callable[[torch.Tensor], Any] | None = None,
                 timeout_s: float | None = DEFAULT_TIMEOUT_S, fail_fast: bool = False, seed: int | None = None,
                 backend: str = "auto"):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
        parsed = [_row(r, i) for i, r in enumerate(rows)]
        base = Path(root) if root is not None else None
        self.rows = [(str(base / p) if base is not None and not os.path.isabs(p) else p, t) for p, t in parsed]
        self.num_frames, self.strategy, self.stride, self.size = num_frames, strategy, stride, size
        self.training, self.transform, self.timeout_s = training, transform, timeout_s
        self.fail_fast, self.seed, self.backend = fail_fast, seed, backend
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _sample_seed(self, index: int) -> int | None:
        if self.seed is None:
            return None
        digest = hashlib.sha256(f"{self.seed}:{self.epoch}:{index}".encode()).digest()
        return int.from_bytes(digest[:8], "little")

    def __getitem__(self, index: int) -> dict[str, Any] | BadSample:
        path, target = self.rows[index]
        try:
            frames, frame_indices = load_clip(path, self.num_frames, self.strategy, stride=self.stride, size=self.size,
                                              training=self.training, seed=self._sample_seed(index),
                                              timeout_s=self.timeout_s, backend=self.backend, return_indices=True)
        except VideoError as err:
            if self.fail_fast:
                raise
            return BadSample(index, path, str(err))
        if self.transform is not None:
            frames = self.transform(frames)
        return {"frames": frames, "target": target, "path": path, "index": index,
                "frame_indices": torch.tensor(frame_indices, dtype=torch.long)}


def collate_videos(batch: Sequence[dict[str, Any] | BadSample]) -> dict[str, Any]:
    """Batch the good items, list the bad ones.

    Returns ``{"frames": (B, T, ...) or None, "target": collated targets or None, "path": [B], "index": (B,),
    "frame_indices": (B, T), "skipped": [BadSample]}``; ``frames`` is None when every item of the batch was bad.
    """
    good = [item for item in batch if not isinstance(item, BadSample)]
    skipped = [item for item in batch if isinstance(item, BadSample)]
    if not good:
        return {"frames": None, "target": None, "path": [], "index": torch.empty(0, dtype=torch.long),
                "frame_indices": None, "skipped": skipped}
    targets = [item["target"] for item in good]
    return {
        "frames": default_collate([item["frames"] for item in good]),
        "target": None if all(t is None for t in targets) else default_collate(targets),
        "path": [item["path"] for item in good],
        "index": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "frame_indices": torch.stack([item["frame_indices"] for item in good]),
        "skipped": skipped,
    }


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: one torch thread per worker, and ``random``/numpy seeded from the worker's torch seed
    (which the DataLoader derives from the main process's generator, so ``torch.manual_seed`` repeats a run)."""
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class VideoLoader:
    """A DataLoader over a :class:`VideoDataset` that counts the samples it had to skip.

    Iterating yields :func:`collate_videos` batches (batches in which every clip was bad are not yielded).
    ``skipped`` keeps every :class:`BadSample` seen, over all epochs; ``num_skipped`` is its length.
    """

    def __init__(self, dataloader: DataLoader):
        self.dataloader = dataloader
        self.skipped: list[BadSample] = []

    @property
    def dataset(self) -> Dataset:
        return self.dataloader.dataset

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.dataloader:
            self.skipped.extend(batch["skipped"])
            if batch["frames"] is not None:
                yield batch


def make_loader(dataset: VideoDataset, batch_size: int = 8, *, num_workers: int = 2, shuffle: bool = False,
                **kwargs: Any) -> VideoLoader:
    """A :class:`VideoLoader` with :func:`collate_videos` and :func:`seed_worker`; ``kwargs`` go to the DataLoader."""
    kwargs.setdefault("collate_fn", collate_videos)
    kwargs.setdefault("worker_init_fn", seed_worker)
    if num_workers > 0:
        kwargs.setdefault("persistent_workers", False)
    return VideoLoader(DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, **kwargs))


# ------------------------------------------------------------------------------------------ feature cache


@dataclass
class CacheStats:
    """What :meth:`FrameFeatureCache.build` did: clips found in the cache, clips computed, clips skipped."""

    hits: int = 0
    computed: int = 0
    skipped: list[BadSample] = field(default_factory=list)


@dataclass(frozen=True)
class ClipPreprocess:
    """A CLIP's eval transform on decoded frames: uint8 ``(N, 3, H, W)`` -> normalized float ``(N, 3, S, S)``.

    Resize so the frame covers ``image_size`` (short side, with the CLIP's interpolation and antialiasing), centre
    crop, normalize with ``mean``/``std``. One frame at a time: only one full-size frame is ever held as float
    (a batch of eight 16-frame 4K clips as float would be 25 GB). A plain object, so DataLoader workers get it.
    """

    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        h, w = frames.shape[-2:]
        th, tw = self.image_size
        scale = max(th / h, tw / w)
        resized = (max(th, round(h * scale)), max(tw, round(w * scale)))
        mode = self.interpolation if self.interpolation in ("bilinear", "bicubic") else "bilinear"
        top, left = (resized[0] - th) // 2, (resized[1] - tw) // 2
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        out = torch.empty(frames.shape[0], 3, th, tw)
        for i in range(frames.shape[0]):
            x = frames[i:i + 1].float() / 255.0
            if resized != (h, w):
                x = F.interpolate(x, size=resized, mode=mode, antialias=True, align_corners=False).clamp_(0, 1)
            out[i] = (x[0, :, top:top + th, left:left + tw] - mean) / std
        return out


def _file_identity(path: str, mode: str) -> dict[str, Any]:
    """What the cache key knows of a video file or frame directory: (resolved path, size, mtime) or content hash."""
    p = Path(path)
    files = frame_files(p) if p.is_dir() else [p]
    if mode == "stat":
        entries = []
        for f in files:
            st = f.stat()
            entries.append([f.name, st.st_size, st.st_mtime_ns])
        return {"path": str(p.resolve()), "files": entries}
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" if p.is_dir() else b"")
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return {"sha256": h.hexdigest()}


class FrameFeatureCache:
    """Frozen-CLIP features of sampled frames, computed once per (weights, file, sampling) and kept on disk.

    ``clip`` is a :class:`mmadapters.vision.clip.ClipBundle` (``load_clip()`` from ``mmadapters.vision.clip``). Frames
    are sampled at test time (deterministic: TSN middles, or a centred strided window), preprocessed as the bundle's
    own eval transform does (resize the short side with its interpolation, centre crop, normalize with its mean/std,
    read from ``model.visual.preprocess_cfg``), and encoded with ``model.encode_image``. Features are stored
    unnormalized, float32, shape ``(T, D)``.

    The key (SHA-256 of a JSON) holds: ``ClipInfo.identity()`` (a content hash of local weights), the preprocessing,
    the sampling (num_frames, strategy, stride) and the file's identity — its resolved path, size and mtime
    (``file_key="stat"``, free) or a SHA-256 of its bytes (``"content"``: survives moves and copies, costs a read).
    Any recipe that asks for the same features finds them. Files are ``root/<key[:2]>/<key>.safetensors`` (tensors
    ``features`` (T, D) and ``indices`` (T,); the key's JSON in the metadata), written atomically; an unreadable
    entry is recomputed.
    """

    def __init__(self, root: str | os.PathLike, clip: Any, *, num_frames: int = 8, strategy: str = "uniform",
                 stride: int = DEFAULT_STRIDE, file_key: str = "stat", device: str | torch.device = "cpu",
                 batch_size: int = 8, timeout_s: float | None = DEFAULT_TIMEOUT_S):
        if file_key not in ("stat", "content"):
            raise ValueError(f"file_key={file_key!r}: expected 'stat' or 'content'")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
        for name in ("model", "info"):
            if not hasattr(clip, name):
                raise TypeError(f"clip: expected a ClipBundle (mmadapters.vision.clip.load_clip()); it has no {name!r}")
        self.root = Path(root)
        self.model, self.info = clip.model, clip.info
        self.num_frames, self.strategy, self.stride = num_frames, strategy, stride
        self.file_key, self.device, self.batch_size, self.timeout_s = file_key, torch.device(device), batch_size, timeout_s
        cfg = dict(getattr(self.model.visual, "preprocess_cfg", None) or {})
        image_size = cfg.get("size", getattr(self.model.visual, "image_size", None))
        if image_size is None:
            raise ValueError("clip.model.visual: expected 'preprocess_cfg' or 'image_size' to size the frames")
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.mean = tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self.interpolation = cfg.get("interpolation", "bicubic")
        self._preprocess = ClipPreprocess(self.image_size, self.mean, self.std, self.interpolation)
        self.encoded = 0  # clips encoded by this object (what a second epoch or recipe should leave at 0)

    # -- keys
    def key_fields(self, path: str | os.PathLike) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "clip": self.info.identity(),
            "preprocess": {"size": list(self.image_size), "mean": list(self.mean), "std": list(self.std),
                           "interpolation": self.interpolation},
            "sampling": {"num_frames": self.num_frames, "strategy": self.strategy, "stride": self.stride},
            "file": _file_identity(os.fspath(path), self.file_key),
        }

    def key(self, path: str | os.PathLike) -> str:
        return hashlib.sha256(json.dumps(self.key_fields(path), sort_keys=True).encode()).hexdigest()

    def entry_path(self, path: str | os.PathLike) -> Path:
        key = self.key(path)
        return self.root / key[:2] / f"{key}.safetensors"

    # -- reading and writing entries
    def _read(self, entry: Path) -> torch.Tensor | None:
        from safetensors import SafetensorError
        from safetensors.torch import load

        if not entry.is_file():
            return None
        try:  # read into memory: a memory-mapped tensor would change under us if someone rewrote the file in place
            feats = load(entry.read_bytes())["features"]
        except (SafetensorError, OSError, KeyError):
            return None  # a damaged entry is recomputed
        return feats if feats.ndim == 2 and feats.shape[0] == self.num_frames else None

    def _write(self, entry: Path, feats: torch.Tensor, indices: list[int], fields: dict) -> None:
        from safetensors.torch import save

        from mmadapters.io import atomic_write_bytes

        entry.parent.mkdir(parents=True, exist_ok=True)
        data = save({"features": feats.float().cpu().contiguous(), "indices": torch.tensor(indices, dtype=torch.long)},
                    metadata={"key": json.dumps(fields, sort_keys=True)})
        atomic_write_bytes(entry, data)

    # -- encoding
    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, 3, H, W)`` -> normalized float ``(N, 3, S, S)`` as the CLIP's eval transform makes them."""
        return self._preprocess(frames)

    @torch.inference_mode()
    def encode(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, T, 3, H, W)`` -> features ``(B, T, D)`` float32."""
        return self._encode_preprocessed(self.preprocess(clips.flatten(0, 1)).unflatten(0, clips.shape[:2]))

    @torch.inference_mode()
    def _encode_preprocessed(self, clips: torch.Tensor) -> torch.Tensor:
        """normalized float ``(B, T, 3, S, S)`` -> features ``(B, T, D)`` float32."""
        b, t = clips.shape[:2]
        feats = self.model.encode_image(clips.flatten(0, 1).to(self.device)).float().cpu()
        self.encoded += b
        return feats.view(b, t, -1)

    # -- public
    def build(self, paths: Sequence[str | os.PathLike], *, num_workers: int = 0, fail_fast: bool = False) -> CacheStats:
        """Compute and store the features of every path not cached yet (decoding in ``num_workers`` workers).

        Bad files are skipped and listed in the returned :class:`CacheStats` (``fail_fast`` raises instead)."""
        stats = CacheStats()
        todo: list[str] = []
        for i, p in enumerate(paths):
            p = os.fspath(p)
            try:
                cached = self._read(self.entry_path(p))
            except OSError as err:  # the file vanished or cannot be stat'ed: no key, so a bad sample
                reason = VideoError(p, f"cannot read it ({err.strerror or err})")
                if fail_fast:
                    raise reason from None
                stats.skipped.append(BadSample(i, p, str(reason)))
                continue
            if cached is not None:
                stats.hits += 1
            else:
                todo.append(p)
        if not todo:
            return stats
        # each clip is preprocessed where it is decoded (in its worker): batches hold (T, 3, S, S) floats, and a
        # full-size clip exists once, as uint8, never a batch of them
        dataset = VideoDataset(todo, num_frames=self.num_frames, strategy=self.strategy, stride=self.stride,
                               training=False, timeout_s=self.timeout_s, fail_fast=fail_fast, transform=self._preprocess)
        loader = make_loader(dataset, self.batch_size, num_workers=num_workers)
        for batch in loader:
            feats = self._encode_preprocessed(batch["frames"])
            for p, f, idx in zip(batch["path"], feats, batch["frame_indices"].tolist(), strict=True):
                fields = self.key_fields(p)
                key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
                self._write(self.root / key[:2] / f"{key}.safetensors", f, idx, fields)
                stats.computed += 1
        position = {p: i for i, p in enumerate(os.fspath(p) for p in paths)}
        stats.skipped.extend(BadSample(position.get(b.path, b.index), b.path, b.reason) for b in loader.skipped)
        return stats

    def get(self, path: str | os.PathLike) -> torch.Tensor:
        """Features ``(T, D)`` of one clip, computed and stored on a miss; :class:`VideoError` for a bad file."""
        feats = self._read(self.entry_path(path))
        if feats is None:
            self.build([path], fail_fast=True)
            feats = self._read(self.entry_path(path))
            if feats is None:
                raise OSError(f"{self.entry_path(path)}: cache entry for {os.fspath(path)} was written but cannot be read")
        return feats

    def load(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """Features ``(N, T, D)`` of clips already cached (:meth:`build` first); a missing one raises ``KeyError``."""
        out = []
        for p in paths:
            feats = self._read(self.entry_path(p))
            if feats is None:
                raise KeyError(f"{os.fspath(p)}: no cached features under {self.root} for this CLIP and sampling "
                               "(run FrameFeatureCache.build first; bad files are never cached)")
            out.append(feats)
        return torch.stack(out) if out else torch.empty(0, self.num_frames, 0)

