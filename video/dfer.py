"""Dynamic facial expression recognition data, training and evaluation for FineCLIPER.

Clips are frame directories (DFEW ships extracted face frames) or video files. A split is loaded once
into memory — every frame of every clip plus its cues — and frames are sampled TSN-style each time a
batch is drawn: ``num_frames`` equal segments, a random frame of each in training, the middle frame at
test. Bad clips (unreadable, missing cues the model needs) are skipped and counted with their reason,
unless ``fail_fast``.

Metrics are DFER's: UAR (mean per-class recall) and WAR (accuracy), from :mod:`mmadapters.eval.metrics`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from mmadapters.eval.metrics import uar, war

from .cues import ClipCues, CueError, render_masks
from .fineclipper import FineClipper
from .io import IMAGE_EXTENSIONS, frame_files


@dataclass
class DferClip:
    """One clip held in memory: all its frames and cues (sampled per batch)."""

    path: str
    label: int  # 0-based class index
    frames: Tensor  # uint8 (N, 3, H, W), all frames
    masks: np.ndarray | None = None  # (N, H, W) uint8
    landmarks: np.ndarray | None = None  # (N, K, 2) in [0, 1]
    description: str | None = None


@dataclass
class DferSplit:
    clips: list[DferClip]
    skipped: list[dict]  # {"path", "reason"}


def tsn_indices(n: int, t: int, training: bool, generator: torch.Generator | None = None) -> list[int]:
    """``t`` frame indices from ``n`` frames: one per equal segment (random in training, middle at test)."""
    if n <= 0:
        raise ValueError("a clip with no frames cannot be sampled")
    edges = np.linspace(0, n, t + 1)
    out = []
    for i in range(t):
        lo, hi = edges[i], edges[i + 1]
        if training:
            u = float(torch.rand((), generator=generator))
            k = int(lo + u * (hi - lo))
        else:
            k = int((lo + hi) / 2)
        out.append(min(max(k, 0), n - 1))
    return out


def read_all_frames(path: str | os.PathLike) -> Tensor:
    """Every frame of a frame directory (sorted image files) or video file -> uint8 (N, 3, H, W)."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        files = frame_files(path)
        if not files:
            raise ValueError(f"{path}: frame directory holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        frames = []
        for f in files:
            try:
                with Image.open(f) as im:
                    frames.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
            except Exception as e:  # PIL raises OSError, ValueError, SyntaxError (broken PNG chunks), ...
                raise ValueError(f"{f}: unreadable frame image ({type(e).__name__}: {e})") from e
        if len({tuple(x.shape) for x in frames}) != 1:
            raise ValueError(f"{path}: frames differ in size")
        return torch.stack(frames)
    raise ValueError(f"{path}: expected a frame directory (video files: extract frames first)")


def load_split(rows: Sequence[tuple[str, int]], *, cues=None, needed: Sequence[str] = (), fail_fast: bool = False,
               progress: bool = True, desc: str = "clips") -> DferSplit:
    """Load ``rows`` of (clip path, 0-based label) with their cues from the ``cues`` provider."""
    clips, skipped = [], []
    for path, label in tqdm(rows, desc=desc, disable=None if progress else True, leave=False):
        try:
            frames = read_all_frames(path)
            c = ClipCues()
            if cues is not None and needed:
                c = cues(path, list(range(len(frames))), tuple(frames.shape[-2:]), frames=frames)
            c.require(needed, str(path))
            clips.append(DferClip(str(path), int(label), frames, c.masks, c.landmarks, c.description))
        except (ValueError, OSError, CueError) as e:
            if fail_fast:
                raise
            skipped.append({"path": str(path), "reason": str(e)})
    return DferSplit(clips, skipped)


class Batcher:
    """Turns clips into model inputs: TSN-sampled frames, rendered masks, landmarks, description features."""

    def __init__(self, model: FineClipper, num_frames: int):
        self.model = model
        self.num_frames = num_frames
        self._desc_cache: dict[str, Tensor] = {}

    def descriptions(self, clips: Sequence[DferClip]) -> Tensor:
        missing = sorted({c.description for c in clips if c.description is not None and c.description not in self._desc_cache})
        if missing:
            feats = self.model.encode_text(missing)
            self._desc_cache.update(zip(missing, feats, strict=True))
        return torch.stack([self._desc_cache[c.description] for c in clips])

    def __call__(self, clips: Sequence[DferClip], training: bool, generator: torch.Generator | None = None) -> dict:
        cues = self.model.config.cues
        idx = [tsn_indices(len(c.frames), self.num_frames, training, generator) for c in clips]
        device = self.model.pos_text.device
        out: dict = {"frames": torch.stack([c.frames[i] for c, i in zip(clips, idx, strict=True)]).to(device)}
        if "masks" in cues:
            out["mask_images"] = torch.stack([render_masks(c.masks[i], self.model.image_size)
                                              for c, i in zip(clips, idx, strict=True)]).to(device)
        if "landmarks" in cues:
            out["landmarks"] = torch.stack([torch.from_numpy(c.landmarks[i]) for c, i in zip(clips, idx, strict=True)]).to(device)
        if "description" in cues:
            out["description"] = self.descriptions(clips).to(device)
        return out


def train_fineclipper(model: FineClipper, split: DferSplit, *, num_frames: int = 16, epochs: int = 10,
                      batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 0.01, seed: int = 0,
                      progress: bool = True) -> dict:
    """Train the trainable parts of ``model`` with cross-entropy over the description scores.

    AdamW with a cosine schedule; TSN random frames each epoch; seeded. Returns a history dict.
    """
    if not split.clips:
        raise ValueError("the training split is empty (all clips skipped?)")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(split.clips) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    batcher = Batcher(model, num_frames)
    labels = torch.tensor([c.label for c in split.clips])
    history, start = [], time.perf_counter()
    bar = tqdm(total=steps, desc="FineCLIPER train", disable=None if progress else True, leave=False)
    model.train()
    model.clip.eval()  # the backbone keeps eval-mode behaviour (dropout off); adapters train
    for epoch in range(epochs):
        order = torch.randperm(len(split.clips), generator=g)
        total = 0.0
        for s in range(0, len(order), batch_size):
            ids = order[s:s + batch_size].tolist()
            batch = batcher([split.clips[i] for i in ids], training=True, generator=g)
            loss = F.cross_entropy(model(**batch), labels[ids].to(batch["frames"].device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(ids)
            bar.update(1)
        history.append({"epoch": epoch + 1, "loss": total / len(order)})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    bar.close()
    model.eval()
    return {"history": history, "train_seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate_fineclipper(model: FineClipper, split: DferSplit, *, num_frames: int = 16, batch_size: int = 32,
                         progress: bool = True) -> dict:
    """UAR, WAR and per-class recall on ``split`` (test-time TSN: middle frame of each segment)."""
    model.eval()
    batcher = Batcher(model, num_frames)
    preds = []
    for s in tqdm(range(0, len(split.clips), batch_size), desc="FineCLIPER eval", disable=None if progress else True, leave=False):
        clips = split.clips[s:s + batch_size]
        preds.append(model(**batcher(clips, training=False)).argmax(dim=1).cpu())
    y = torch.tensor([c.label for c in split.clips], dtype=torch.long)
    p = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    n = len(model.classes)
    per_class = {}
    for k, name in enumerate(model.classes):
        m = y == k
        per_class[name] = float((p[m] == k).double().mean()) if m.any() else math.nan
    return {"uar": uar(y, p, n), "war": war(y, p), "n": len(split.clips), "skipped": len(split.skipped),
            "skipped_reasons": split.skipped, "per_class_recall": per_class}


@torch.no_grad()
def frame_mean_features(model: FineClipper, split: DferSplit, *, num_frames: int = 16, batch_size: int = 32) -> Tensor:
    """Frozen-CLIP (adapters off) mean frame features (N, D), L2-normalised, with test-time TSN sampling."""
    import mmadapters as mma

    active = mma.get_active(model.clip) if mma.adapter_names(model.clip) else None
    if active is not None:
        mma.set_active(model.clip, None)
    try:
        out = []
        for s in range(0, len(split.clips), batch_size):
            clips = split.clips[s:s + batch_size]
            frames = torch.stack([c.frames[tsn_indices(len(c.frames), num_frames, False)] for c in clips])
            out.append(F.normalize(model.encode_images(frames.to(model.pos_text.device)).mean(1), dim=-1).cpu())
    finally:
        if active is not None:
            mma.set_active(model.clip, active)
    return torch.cat(out) if out else torch.empty(0, model.dim)


def linear_probe(model: FineClipper, train: DferSplit, test: DferSplit, *, num_frames: int = 16, epochs: int = 300,
                 lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> dict:
    """The CLIP linear-probe baseline: logistic regression on frozen mean frame features; UAR/WAR on ``test``."""
    torch.manual_seed(seed)
    xtr, xte = frame_mean_features(model, train, num_frames=num_frames), frame_mean_features(model, test, num_frames=num_frames)
    ytr = torch.tensor([c.label for c in train.clips])
    yte = torch.tensor([c.label for c in test.clips])
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    head = torch.nn.Linear(xtr.shape[1], len(model.classes))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    start = time.perf_counter()
    for _ in range(epochs):  # full batch: the features are small
        loss = F.cross_entropy(head((xtr - mu) / sd), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = head((xte - mu) / sd).argmax(1)
    return {"uar": uar(yte, pred, len(model.classes)), "war": war(yte, pred), "n": len(test.clips),
            "trainable_params": sum(p.numel() for p in head.parameters()), "train_seconds": time.perf_counter() - start}
