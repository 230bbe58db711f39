"""Dynamic facial expression recognition data for FineCLIPER: clips with their cues, TSN sampling, batches.

Clips are frame directories (DFEW ships extracted face frames; extract a video's frames first). A split is loaded once
into memory — every frame of every clip plus its cues — and frames are sampled TSN-style each time a
batch is drawn: ``num_frames`` equal segments, a random frame of each in training, the middle frame at
test. Bad clips (unreadable, missing cues the model needs) are skipped and counted with their reason,
unless ``fail_fast``.

Training is ``mmadapters train fineclipper`` (:mod:`.fineclipper_train`), evaluation ``mmadapters eval dfer``;
both read clips with :func:`load_split` and batch them with :class:`Batcher`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .cues import ClipCues, CueError, render_masks
from .fineclipper import FineClipper
from .io import IMAGE_EXTENSIONS, VideoError, check_frame_size, frame_files

MAX_CLIP_BYTES = 2 * 2**30  # decoded size of one clip held in memory (DFEW clips: a few MB)


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


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image from its header (nothing is decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError (broken PNG chunks), ...
        raise ValueError(f"{path}: unreadable frame image ({type(e).__name__}: {e})") from e


def read_all_frames(path: str | os.PathLike) -> Tensor:
    """Every frame of a frame directory (sorted image files) or video file -> uint8 (N, 3, H, W)."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        files = frame_files(path)
        if not files:
            raise ValueError(f"{path}: frame directory holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        # the whole clip is held in memory: check its size from the first image's header before decoding any
        first = _image_size(files[0])
        check_frame_size(files[0], *first)
        total = len(files) * first[0] * first[1] * 3
        if total > MAX_CLIP_BYTES:
            raise VideoError(path, f"{len(files)} frames of {first[0]}x{first[1]} would take {total:,} bytes decoded; "
                                   f"expected at most {MAX_CLIP_BYTES:,} per clip (MAX_CLIP_BYTES: every frame of a "
                                   "DFER clip is kept in memory); refused before decoding")
        frames = torch.empty(len(files), 3, first[1], first[0], dtype=torch.uint8)
        for i, f in enumerate(files):
            try:
                with Image.open(f) as im:
                    size = im.size
                    pixels = np.array(im.convert("RGB")) if size == first else None  # decoded only at the checked size
            except Exception as e:  # PIL raises OSError, ValueError, SyntaxError (broken PNG chunks), ...
                raise ValueError(f"{f}: unreadable frame image ({type(e).__name__}: {e})") from e
            if pixels is None:
                raise ValueError(f"{path}: frames differ in size ({files[0].name} is {first[0]}x{first[1]}, "
                                 f"{f.name} is {size[0]}x{size[1]})")
            frames[i] = torch.from_numpy(pixels).permute(2, 0, 1)
        return frames
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

    def encode_descriptions(self, clips: Sequence[DferClip]) -> None:
        """Encode the descriptions of ``clips`` that are not encoded yet, each text on its own (a batch of one).

        The text tower's output for a text depends on the other texts of its batch (matrix-multiply blocking and
        the batch's trimmed length: about 1e-7), so a text is always encoded alone: its feature is a function of
        the text only, whichever clips share a batch, in training, validation, after ``--resume`` or in
        ``mmadapters eval dfer``. Training encodes every description of its splits once, when the task is built.
        """
        for text in sorted({c.description for c in clips if c.description is not None} - self._desc_cache.keys()):
            self._desc_cache[text] = self.model.encode_text([text])[0]

    def descriptions(self, clips: Sequence[DferClip]) -> Tensor:
        """(B, D) text features of the clips' descriptions."""
        self.encode_descriptions(clips)
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
