"""Cue providers for FineCLIPER's middle and high semantic levels.

FineCLIPER looks at a facial-expression clip at three levels: the frames (low), per-frame face-parsing
masks and facial landmarks (middle) and a text description of how the face changes (high). The real
pipeline computes the cues offline (a face parser, a landmark detector, a multimodal LLM) and stores them
next to the data; so does this library:

- :class:`PrecomputedCues` reads them from files: an ``.npz`` per clip holds ``masks`` (N, H, W) uint8 part
  labels and ``landmarks`` (N, K, 2) float (x, y in pixels of the frame) for all N frames of the clip, and
  a JSON per clip (or one JSON mapping for all clips) holds its description. The generated faces
  (``python -m mmadapters.video.synth faces``) are written this way.
- :class:`CallableCues` wraps functions the user supplies, e.g. a face parser and a landmark detector they
  installed, called on the sampled frames.

A missing cue that the model needs is a :class:`CueError` naming the clip, the cue and the file looked
for — never a silent zero input.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

CUE_KINDS = ("masks", "landmarks", "description")

# A fixed palette for part labels 0..15 (0 = background, black); a mask is shown to CLIP as a colour image.
_PALETTE = torch.tensor([
    [0, 0, 0], [230, 190, 150], [120, 60, 20], [40, 40, 200], [200, 30, 60], [250, 250, 250], [60, 180, 75],
    [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
    [210, 245, 60], [250, 190, 212], [0, 128, 128]], dtype=torch.uint8)


class CueError(ValueError):
    """A cue FineCLIPER needs is missing or malformed; the message names the clip, the cue and the file."""


@dataclass
class ClipCues:
    """Cues of one clip at its sampled frames (T of them)."""

    masks: np.ndarray | None = None  # (T, H, W) uint8 part labels (0 = background)
    landmarks: np.ndarray | None = None  # (T, K, 2) float32, x and y in [0, 1] of the frame width/height
    description: str | None = None

    def require(self, needed: Sequence[str], where: str) -> None:
        for kind in needed:
            if kind not in CUE_KINDS:
                raise ValueError(f"unknown cue {kind!r}; expected one of {CUE_KINDS}")
            if getattr(self, kind) is None:
                raise CueError(f"{where}: cue {kind!r} is missing; the model was configured to use it "
                               "(provide it, or drop it from the config's cues)")


class PrecomputedCues:
    """Cues stored next to the data (see the module docstring for the layout).

    Paths are templates relative to ``root``: ``{name}`` is the clip's folder/file stem, ``{clip}`` its path
    relative to ``root``. The first template whose file exists is used, so both layouts below work:

    - per clip in a ``cues/`` folder (the generated faces): ``cues/{name}.npz`` and ``cues/{name}.json``
      (a JSON object with a ``description`` field);
    - inside each clip's frame folder: ``{clip}/cues.npz``, with one ``descriptions.json`` mapping clip
      paths (relative to ``root``) or names to descriptions.
    """

    def __init__(self, root: str | os.PathLike, *, npz: Sequence[str] = ("cues/{name}.npz", "{clip}/cues.npz"),
                 description_json: Sequence[str] = ("cues/{name}.json",), descriptions: str | None = "descriptions.json"):
        self.root = Path(root)
        self.npz_templates = tuple(npz)
        self.description_templates = tuple(description_json)
        self._desc_path = None if descriptions is None else self.root / descriptions
        self._descriptions: dict[str, str] | None = None

    def _load_descriptions(self) -> dict[str, str]:
        if self._descriptions is None:
            path = self._desc_path
            if path is None or not path.is_file():
                self._descriptions = {}
            else:
                data = _read_json(path)
                if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
                    raise CueError(f"{path}: expected a JSON object mapping clip names to description strings")
                self._descriptions = data
        return self._descriptions

    def _find(self, templates: Sequence[str], name: str, rel: str) -> Path | None:
        for t in templates:
            p = self.root / t.format(name=name, clip=rel)
            if p.is_file():
                return p
        return None

    def __call__(self, clip: str | os.PathLike, indices: Sequence[int], size: tuple[int, int],
                 frames: Tensor | None = None) -> ClipCues:
        """Cues of ``clip`` (a frame directory or video file) at frame ``indices``; ``size`` is the frame (H, W)."""
        clip = Path(clip)
        name = clip.name if clip.is_dir() else clip.stem
        try:
            rel = clip.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            rel = name
        cues = ClipCues()
        npz = self._find(self.npz_templates, name, rel)
        if npz is not None:
            self._read_arrays(npz, cues, indices, size)
        per_clip = self._find(self.description_templates, name, rel)
        if per_clip is not None:
            data = _read_json(per_clip)
            if not isinstance(data, dict) or not isinstance(data.get("description"), str):
                raise CueError(f"{per_clip}: expected a JSON object with a string field 'description'")
            cues.description = data["description"]
        else:
            descriptions = self._load_descriptions()
            cues.description = descriptions.get(rel, descriptions.get(name))
        return cues

    @staticmethod
    def _read_arrays(npz: Path, cues: ClipCues, indices: Sequence[int], size: tuple[int, int]) -> None:
        try:
            with np.load(npz, allow_pickle=False) as data:
                masks = data["masks"] if "masks" in data else None
                marks = data["landmarks"] if "landmarks" in data else None
        except (OSError, ValueError, KeyError) as e:
            raise CueError(f"{npz}: cannot read the cue arrays ({e})") from e
        h, w = size
        idx = np.asarray(indices, dtype=np.int64)
        if masks is not None:
            if masks.ndim != 3 or masks.dtype != np.uint8:
                raise CueError(f"{npz}: field 'masks' must be (N, H, W) uint8, got {masks.shape} {masks.dtype}")
            _check_index(npz, "masks", idx, len(masks))
            cues.masks = masks[idx]
        if marks is not None:
            if marks.ndim != 3 or marks.shape[-1] != 2:
                raise CueError(f"{npz}: field 'landmarks' must be (N, K, 2), got {marks.shape}")
            _check_index(npz, "landmarks", idx, len(marks))
            cues.landmarks = marks[idx].astype(np.float32) / np.array([w, h], dtype=np.float32)
            if not np.isfinite(cues.landmarks).all():
                raise CueError(f"{npz}: field 'landmarks' holds NaN or inf")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CueError(f"{path}: cannot read the JSON ({e})") from e


def _check_index(path: Path, field: str, idx: np.ndarray, n: int) -> None:
    if len(idx) and (idx.max() >= n or idx.min() < 0):
        raise CueError(f"{path}: field {field!r} has {n} frames but frame {int(idx.max())} was sampled "
                       "(the cue file and the clip disagree on the frame count)")


class CallableCues:
    """Cues from functions the user supplies (e.g. a face parser and a landmark detector they installed).

    Each function gets the sampled frames as uint8 (T, 3, H, W) and returns masks (T, H, W) uint8,
    landmarks (T, K, 2) in pixels, or a description string. Leave out what you do not have.
    """

    def __init__(self, masks: Callable[[Tensor], np.ndarray] | None = None,
                 landmarks: Callable[[Tensor], np.ndarray] | None = None,
                 description: Callable[[Tensor], str] | None = None):
        self.fns = {"masks": masks, "landmarks": landmarks, "description": description}

    def __call__(self, clip, indices, size, frames: Tensor | None = None) -> ClipCues:
        if frames is None:
            raise CueError(f"{clip}: CallableCues needs the sampled frames")
        h, w = size
        out = ClipCues()
        if self.fns["masks"] is not None:
            out.masks = np.asarray(self.fns["masks"](frames), dtype=np.uint8)
        if self.fns["landmarks"] is not None:
            out.landmarks = np.asarray(self.fns["landmarks"](frames), dtype=np.float32) / np.array([w, h], np.float32)
        if self.fns["description"] is not None:
            out.description = str(self.fns["description"](frames))
        return out


def render_masks(masks: np.ndarray | Tensor, size: int) -> Tensor:
    """Part-label maps (T, H, W) -> colour images uint8 (T, 3, size, size) with a fixed palette (nearest resize)."""
    m = torch.as_tensor(np.asarray(masks)).long()
    if m.ndim != 3:
        raise ValueError(f"masks must be (T, H, W), got {tuple(m.shape)}")
    if m.numel() and (m.min() < 0 or m.max() >= len(_PALETTE)):
        raise ValueError(f"mask labels must lie in 0..{len(_PALETTE) - 1}, got {int(m.min())}..{int(m.max())}")
    img = _PALETTE[m].permute(0, 3, 1, 2)  # (T, 3, H, W)
    if img.shape[-2:] != (size, size):
        img = torch.nn.functional.interpolate(img.float(), size=(size, size), mode="nearest").to(torch.uint8)
    return img
