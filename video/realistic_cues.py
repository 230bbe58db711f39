"""Realistic cues for FineCLIPER: the exact cues degraded the way real cue extractors degrade them.

On the generated faces (``python -m mmadapters.video.synth faces``) the middle and high cue levels come from
the renderer: exact landmarks, exact part masks and descriptions written from the clip's own parameter
changes, so FineCLIPER reaches UAR 1.000 (docs/results.md). A real pipeline runs a landmark detector, a face
parser and a captioner on the frames, and each makes mistakes. :class:`RealisticCues` wraps an exact cue
provider (:class:`~mmadapters.video.cues.PrecomputedCues` or :class:`~mmadapters.video.cues.CallableCues`,
same call interface) and returns, per clip:

- **landmarks with detector noise** — every point of every frame moves by Gaussian jitter of standard
  deviation ``landmark_jitter`` × the face size (the larger side of that frame's landmark bounding box, in
  pixels; default 0.02, about 0.7 px on a 64 px generated face, i.e. a mean point error near 3% of the
  outer inter-ocular distance, the range of a good 68-point detector); on a fraction ``landmark_miss`` of the
  frames (default 0.1) the detector finds no face, and the frame gets what a tracking pipeline does: the
  previous frame's (noisy) landmarks carried forward, or the **mean face** when no earlier frame was detected
  (``mean_face``; for 68 points the default is the generated faces' average identity at rest, centred in the
  frame at the average head size; for other point counts every point at the frame centre);
- **masks from a simple segmenter** (:func:`segment_faces`, ``segmenter=True``, the default) run on the RGB
  frames themselves — never the renderer's masks: background = border-connected pixels close to the border
  colour of their row, skin = the face's median colour, and the dark / white / red features inside the face
  mapped to the part labels (0 background, 1 skin, 2 brows, 3 eyes, 4 mouth) by colour and position;
- **descriptions with captioner errors** — the description is split into its clauses (the faces generator
  writes up to three movements, "A, B and C"); each clause is left out with probability
  ``description_drop`` (default 0.2: the captioner misses a movement), each kept one is replaced with
  probability ``description_wrong`` (default 0.15) by a wrong attribute (half of the time the opposite
  direction of the same part — "the eyes widen" for "the eyes narrow", the most confusable error — else a
  movement of another part, from the generator's own phrases), and each word of the result is dropped with
  probability ``description_word_drop`` (default 0.05: a disfluent caption). A caption that loses every clause
  becomes the generator's "no visible change" sentence; a "no change" caption replaced by a wrong attribute
  becomes a movement.

All noise is a function of ``(seed, clip id, frame index)`` only (the clip id is the clip's path relative to
the exact provider's ``root`` where it has one, else its folder name), so a clip gets the same realistic cues
in training, validation, after ``--resume`` and in ``mmadapters eval dfer``, whatever else is loaded. The
detector runs over the frames asked for, in order (:func:`~mmadapters.video.dfer.load_split` asks for every
frame of the clip), so "previous frame" is the previous frame of the clip. With every rate 0 and
``segmenter=False`` the exact cues come back unchanged.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .cues import ClipCues, CueError

__all__ = ["RATE_FIELDS", "RealisticCues", "cue_record", "cues_from_record", "faces_mean_face", "segment_faces",
           "split_clauses"]

# constructor arguments that are rates in [0, 1] (landmark_jitter is a fraction of the face size)
RATE_FIELDS = ("landmark_jitter", "landmark_miss", "description_drop", "description_wrong", "description_word_drop")
_STREAMS = {"jitter": 1, "miss": 2, "description": 3}


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


@lru_cache(maxsize=1)
def faces_mean_face() -> np.ndarray:
    """(68, 2) float32 in [0, 1]: the generated faces' average identity at rest, centred at the average head size."""
    from .synth_faces import PARAMS, Identity, _geometry

    ident = Identity(aspect=0.8, eye_x=0.335, eye_y=-0.11, eye_w=0.155, brow_gap=0.175, brow_th=0.06, nose_y=0.235,
                     mouth_y=0.51, mouth_w=0.27, lip_th=0.0475, skin=(0, 0, 0), brow=(0, 0, 0), iris=(0, 0, 0),
                     background=(0, 0, 0), rest=(0.0,) * len(PARAMS))
    lm = _geometry(ident, np.zeros(len(PARAMS)))["landmarks"]
    # sample_face_clip: centre x 0.5 ± 0.04, centre y 0.5 + (-0.02..0.04), head half-height 0.40..0.45 of the frame
    return (np.array([0.5, 0.51]) + 0.425 * lm).astype(np.float32)


def split_clauses(text: str) -> list[str]:
    """The clauses of a generated description: "A, B and C" -> [A, B, C] (a known one-clause sentence stays whole)."""
    from .synth_faces import _STILL

    text = text.strip()
    if text in _STILL:
        return [text]
    return [c.strip() for c in re.split(r",\s*|\s+and\s+", text) if c.strip()]


def _join(clauses: Sequence[str]) -> str:
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


def _phrase_table() -> tuple[dict[str, tuple[str, int]], dict[tuple[str, int], tuple[str, ...]], tuple[str, ...]]:
    from .synth_faces import _PHRASES, _STILL

    lookup = {p: key for key, phrases in _PHRASES.items() for p in phrases}
    return lookup, dict(_PHRASES), tuple(_STILL)


# ------------------------------------------------------------------------------------------------- segmenter


def _dilate(mask: Tensor, radius: int = 1) -> Tensor:
    """Binary dilation of (T, H, W) bool with a (2r+1)² square."""
    k = 2 * radius + 1
    return F.max_pool2d(mask[:, None].float(), k, stride=1, padding=radius)[:, 0] > 0


def segment_faces(frames: Tensor | np.ndarray, *, background_threshold: float = 30.0) -> np.ndarray:
    """A simple colour segmenter: RGB frames uint8 (T, 3, H, W) -> part labels uint8 (T, H, W).

    Labels follow the faces generator's ``MASK_LABELS``: 0 background, 1 skin, 2 brows, 3 eyes, 4 mouth.

    1. Background: pixels within ``background_threshold`` (RGB distance) of the left or right border pixel of
       their row, and connected to the frame border through such pixels (so a dark brow inside the face is
       never background, whatever the background colour).
    2. Skin colour: the median colour of the rest (the face), luminance ``Ls``. Pixels within one pixel of the
       background (anti-aliased outline) are skin.
    3. Features: pixels darker than 0.6 ``Ls`` or of another chromaticity than the skin (unit-colour distance >
       0.12; shading, which only darkens the skin, is not a feature), white pixels (every channel > 215, grey)
       and red pixels (R / (G + B) above 1.6 × the skin's).
    4. Position, from the face's centroid row ``cy`` and half-height ``hh``: above ``cy + 0.12 hh`` white pixels
       and the features within 2 px of them are eyes, the other dark features brows; below ``cy + 0.2 hh``
       red or dark features are the mouth. Everything else in the face is skin.

    It errs the way such segmenters do: a background near the skin colour leaks into the face, shut eyes
    become brows, brows as dark as the skin are missed.
    """
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, Tensor) else frames)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"segment_faces: frames must be (T, 3, H, W) RGB, got {tuple(x.shape)}")
    x = x.float().permute(0, 2, 3, 1)  # (T, H, W, 3)
    t, h, w, _ = x.shape
    if t == 0:
        return np.zeros((0, h, w), np.uint8)
    left, right = x[:, :, :1], x[:, :, -1:]
    near_bg = ((x - left).norm(dim=-1) < background_threshold) | ((x - right).norm(dim=-1) < background_threshold)
    border = torch.zeros(t, h, w, dtype=torch.bool)
    border[:, 0], border[:, -1], border[:, :, 0], border[:, :, -1] = True, True, True, True
    bg = near_bg & border
    for _ in range(h * w):  # geodesic dilation: grow from the border through background-like pixels
        grown = _dilate(bg) & near_bg
        if torch.equal(grown, bg):
            break
        bg = grown
    face = ~bg
    inner = face & ~_dilate(bg)  # the anti-aliased outline (one pixel) stays skin
    n_face = face.flatten(1).sum(1).clamp(min=1)  # (T,)
    masked = x.masked_fill(~face[..., None], float("nan")).view(t, h * w, 3)
    skin = torch.nanmedian(masked, dim=1).values.nan_to_num(128.0)[:, None, None, :]  # (T, 1, 1, 3)
    ls = skin.mean(dim=-1)  # (T, 1, 1)
    lum = x.mean(dim=-1)
    spread = x.max(dim=-1).values - x.min(dim=-1).values
    skin_spread = skin.max(dim=-1).values - skin.min(dim=-1).values
    chroma = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
    skin_chroma = skin / (skin.norm(dim=-1, keepdim=True) + 1e-6)
    other = (chroma - skin_chroma).norm(dim=-1) > 0.12
    # white: bright and grey, well above the skin on lum - 2 * spread (eye whites; not pale skin)
    white = (lum - 2 * spread > ls - 2 * skin_spread + 60) & (lum > ls)
    ratio = x[..., 0] / (x[..., 1] + x[..., 2] + 1.0)
    red = ratio > 1.6 * skin[..., 0] / (skin[..., 1] + skin[..., 2] + 1.0)
    rows = torch.arange(h, dtype=torch.float32)[None, :, None].expand(t, h, w)
    cy = (rows * face).flatten(1).sum(1) / n_face
    top = rows.masked_fill(~face, float("inf")).flatten(1).amin(1)
    bottom = rows.masked_fill(~face, float("-inf")).flatten(1).amax(1)
    hh = ((bottom - top) / 2).clamp(min=1.0)
    cy, hh = cy[:, None, None], hh[:, None, None]
    upper, lower = rows < cy + 0.12 * hh, rows > cy + 0.2 * hh
    white_up = inner & white & upper
    cand = inner & upper & ((lum < 0.82 * ls) | other | white)
    eyes = white_up | (cand & _dilate(white_up, 2))
    # brows lie above the eyes: above the eye-white centre row (the nose bridge starts there), else above cy - 0.15 hh
    n_white = white_up.flatten(1).sum(1)
    eye_row = torch.where(n_white > 0, (rows * white_up).flatten(1).sum(1) / n_white.clamp(min=1), cy[:, 0, 0] - 0.05 * hh[:, 0, 0])
    brows = cand & ~eyes & ~white & (rows < eye_row[:, None, None] - 0.1 * hh)
    mouth = inner & lower & (red | (lum < 0.6 * ls))
    labels = torch.zeros(t, h, w, dtype=torch.uint8)
    labels[face] = 1
    labels[brows] = 2
    labels[eyes] = 3
    labels[mouth] = 4
    labels[n_face[:, None, None].expand(t, h, w) < 9] = 0
    return labels.numpy()


# ------------------------------------------------------------------------------------------------- provider


class RealisticCues:
    """An exact cue provider with detector-like landmarks, segmenter masks and captioner descriptions.

    See the module docstring for what each rate does. Args:
        exact: the exact cue provider (``PrecomputedCues`` / ``CallableCues`` or any callable
            ``(clip, indices, size, frames=None) -> ClipCues``).
        seed: seed of every random choice (with the clip id and the frame index).
        landmark_jitter: Gaussian std of each landmark coordinate, as a fraction of the face size (>= 0).
        landmark_miss: share of frames where the detector finds no face (in [0, 1]).
        segmenter: masks from :func:`segment_faces` on the frames (True) or the exact provider's (False).
        description_drop / description_wrong / description_word_drop: captioner error rates (in [0, 1]).
        mean_face: (K, 2) landmarks in [0, 1] used when no earlier frame was detected (default: see above).
    """

    def __init__(self, exact, *, seed: int = 0, landmark_jitter: float = 0.02, landmark_miss: float = 0.1,
                 segmenter: bool = True, description_drop: float = 0.2, description_wrong: float = 0.15,
                 description_word_drop: float = 0.05, mean_face: np.ndarray | None = None):
        self.exact = exact
        self.seed = int(seed)
        self.landmark_jitter = float(landmark_jitter)
        self.landmark_miss = float(landmark_miss)
        self.segmenter = bool(segmenter)
        self.description_drop = float(description_drop)
        self.description_wrong = float(description_wrong)
        self.description_word_drop = float(description_word_drop)
        for name in RATE_FIELDS:
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"RealisticCues: {name}={value!r}; expected a number in [0, 1]")
        self.mean_face = None if mean_face is None else np.asarray(mean_face, dtype=np.float32)
        if self.mean_face is not None and (self.mean_face.ndim != 2 or self.mean_face.shape[1] != 2):
            raise ValueError(f"RealisticCues: mean_face must be (K, 2), got {self.mean_face.shape}")
        self._phrases = _phrase_table()

    def settings(self) -> dict:
        """The settings a run records (and ``mmadapters eval dfer`` rebuilds the provider from)."""
        return {"seed": self.seed, "segmenter": self.segmenter, **{name: getattr(self, name) for name in RATE_FIELDS}}

    # -- ids and random streams -------------------------------------------------------------------------------

    def clip_id(self, clip: str | os.PathLike) -> str:
        clip = Path(clip)
        name = clip.name if clip.is_dir() or not clip.suffix else clip.stem
        root = getattr(self.exact, "root", None)
        if root is not None:
            try:
                return clip.resolve().relative_to(Path(root).resolve()).as_posix()
            except ValueError:
                pass
        return name

    def _rng(self, clip_id: str, stream: str, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _stable_hash(clip_id), _STREAMS[stream], *extra])

    # -- the cues ---------------------------------------------------------------------------------------------

    def __call__(self, clip: str | os.PathLike, indices: Sequence[int], size: tuple[int, int],
                 frames: Tensor | None = None) -> ClipCues:
        cues = self.exact(clip, indices, size, frames=frames)
        cid = self.clip_id(clip)
        idx = [int(i) for i in indices]
        out = ClipCues(masks=cues.masks, landmarks=cues.landmarks, description=cues.description)
        if self.segmenter:
            if frames is None:
                raise CueError(f"{clip}: RealisticCues' segmenter needs the frames (segmenter=True)")
            if len(frames) != len(idx):
                raise CueError(f"{clip}: {len(frames)} frames given for {len(idx)} frame indices")
            out.masks = segment_faces(frames)
        if cues.landmarks is not None and (self.landmark_jitter > 0 or self.landmark_miss > 0):
            out.landmarks = self.noisy_landmarks(cid, cues.landmarks, idx, size)
        if cues.description is not None and (self.description_drop > 0 or self.description_wrong > 0
                                             or self.description_word_drop > 0):
            out.description = self.noisy_description(cid, cues.description)
        return out

    def noisy_landmarks(self, clip_id: str, landmarks: np.ndarray, indices: Sequence[int], size: tuple[int, int]) -> np.ndarray:
        """(T, K, 2) exact landmarks in [0, 1] at frames ``indices`` -> what the detector gives (see the module docstring)."""
        h, w = size
        scale = np.array([w, h], dtype=np.float64)
        out = np.empty_like(landmarks, dtype=np.float32)
        previous: np.ndarray | None = None
        for i, k in enumerate(indices):
            missed = self.landmark_miss > 0 and self._rng(clip_id, "miss", k).random() < self.landmark_miss
            if missed:
                out[i] = previous if previous is not None else self._mean_face(landmarks.shape[1])
                continue
            px = landmarks[i].astype(np.float64) * scale
            if self.landmark_jitter > 0:
                face = float(np.max(px.max(axis=0) - px.min(axis=0)))
                px = px + self._rng(clip_id, "jitter", k).normal(0.0, self.landmark_jitter * face, px.shape)
            out[i] = (px / scale).astype(np.float32)
            previous = out[i]
        return out

    def _mean_face(self, k: int) -> np.ndarray:
        if self.mean_face is not None:
            if len(self.mean_face) != k:
                raise CueError(f"RealisticCues: mean_face has {len(self.mean_face)} points, the landmarks {k}")
            return self.mean_face
        if k == 68:
            return faces_mean_face()
        return np.full((k, 2), 0.5, np.float32)

    def noisy_description(self, clip_id: str, text: str) -> str:
        """``text`` with the captioner's errors (clauses dropped or wrong, words dropped), seeded by the clip id."""
        lookup, phrases, still = self._phrases
        rng = self._rng(clip_id, "description")
        clauses = split_clauses(text)
        kept, changed = [], False
        for c in clauses:
            if rng.random() < self.description_drop:
                changed = True
                continue
            if rng.random() < self.description_wrong:
                kept.append(self._wrong(c, clauses, rng, lookup, phrases, still))
                changed = True
            else:
                kept.append(c)
        if not kept:
            kept = [still[int(rng.integers(len(still)))]]
        words_out = _join(kept).split(" ") if changed else text.split(" ")
        if self.description_word_drop > 0:
            keep = rng.random(len(words_out)) >= self.description_word_drop
            if not keep.all():
                changed = True
                words_out = [wd for wd, k in zip(words_out, keep, strict=True) if k] or words_out[:1]
        return " ".join(words_out) if changed else text

    @staticmethod
    def _wrong(clause: str, clauses: Sequence[str], rng: np.random.Generator, lookup, phrases, still) -> str:
        """A wrong attribute for ``clause``: the same part moving the other way (half of the time), else another part."""
        key = lookup.get(clause)
        if key is not None and rng.random() < 0.5:
            return phrases[key[0], -key[1]][int(rng.integers(2))]
        used = {lookup[c][0] for c in clauses if c in lookup}
        options = sorted(k for k in phrases if k[0] not in used)
        param, direction = options[int(rng.integers(len(options)))]
        return phrases[param, direction][int(rng.integers(2))]


# ------------------------------------------------------------------------------------------------- run records


def cue_record(source: str, provider: RealisticCues | None = None) -> dict:
    """What a run records about its cues: ``{"source": "exact"}`` or ``{"source": "realistic", seed, segmenter, rates}``."""
    if source == "exact":
        return {"source": "exact"}
    if source != "realistic" or provider is None:
        raise ValueError(f"cue source {source!r}: expected 'exact', or 'realistic' with its RealisticCues")
    return {"source": "realistic", **provider.settings()}


def cues_from_record(record: dict | None, exact, *, where: str = "cue_source"):
    """The cue provider a run's record (:func:`cue_record`; None: a run from before the option, exact) names."""
    if record is None:
        return exact
    if not isinstance(record, dict) or record.get("source") not in ("exact", "realistic"):
        raise ValueError(f"{where}: expected {{'source': 'exact' | 'realistic', ...}}, got {record!r}")
    if record["source"] == "exact":
        return exact
    known = {"seed", "segmenter", *RATE_FIELDS}
    unknown = sorted(set(record) - known - {"source"})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; expected among {sorted(known)}")
    if not isinstance(record.get("segmenter", True), bool) or isinstance(record.get("seed", 0), bool) \
            or not isinstance(record.get("seed", 0), int):
        raise ValueError(f"{where}: 'segmenter' must be true or false and 'seed' an integer, got {record!r}")
    try:
        return RealisticCues(exact, **{k: v for k, v in record.items() if k != "source"})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
