"""Cartoon faces whose expression changes over time, in the DFEW layout with landmarks, masks and descriptions.

Every clip is one face (head ellipse, eyes with irises, brows, nose, lips) that starts from its own resting
face and moves into one of DFEW's 7 expressions: 1 happy, 2 sad, 3 neutral, 4 angry, 5 surprise, 6 disgust,
7 fear. The expression is a set of continuous parameters (mouth-corner curve, mouth opening and width,
upper-lip raise, mouth asymmetry, brow raise, brow tilt, eye opening); each class moves them in its own
direction (:data:`CLASS_DELTAS`) with a per-clip intensity and noise. The clip starts at rest (onset after
10–35% of the frames) and ramps to the apex, so early frames are neutral for every class; identities also
differ in their *resting* face (some smile or frown a little at rest, some have raised or tilted brows),
so the change over time, not the look of one frame, tells the class. Nuisances: blinks, a slow head drift
and roll, per-identity skin tone, face shape, size, position, feature placement and background.

The renderer knows the geometry, so the cues are exact:

- landmarks: iBUG 68-point order (0–16 jaw, 17–21 / 22–26 brows, 27–35 nose, 36–41 / 42–47 eyes, 48–59 outer
  lips, 60–67 inner lips; "left" is the image left), float32 pixel coordinates (x, y), the centre of pixel
  (row r, column c) is (c, r);
- part masks: a face-parsing label map per frame, uint8, :data:`MASK_LABELS` (0 background, 1 skin incl. the
  nose, 2 brows, 3 eyes, 4 mouth = lips and the opening), rasterised from the same polygons;
- a templated description of the change from the first frame to the apex ("the corners of the mouth rise
  and the eyes narrow"), written from the parameter changes of this clip (not from its label).

Layout written by :func:`generate_faces`::

    frames/00001/00001.png ...                 (the face frames; nothing else in the folder)
    videos/00001.mp4                           (the same frames, PyAV libx264 yuv420p, 8 fps)
    cues/00001.npz                             landmarks (T, 68, 2) float32, masks (T, H, W) uint8
    cues/00001.json                            {"clip", "num_frames", "description", "onset_frame",
                                                "apex_frame", "changes": {parameter: change}}  (no label)
    annotation/DFEW_set_{k}_{train,test}.txt   "<frame_dir> <num_frames> <label>" per line, k = 1..folds
    classnames.txt                             line i = class of label i + label_base
    dataset.json                               (written last)

``frame_dir`` is relative to the output folder ("frames/00001") unless ``absolute_paths``. Labels are
balanced: every block of 7 consecutive clips holds each class once, and a fold is made of whole blocks
(so n below 7 x folds leaves some folds empty; ``dataset.json`` lists the fold sizes).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmadapters.io import atomic_write_bytes

from .synth import (
    FPS,
    balanced_schedule,
    encode_mp4,
    key,
    npz_bytes,
    prepare_root,
    rng_for,
    run_jobs,
    write_dataset_record,
    write_frame_dir,
    write_lines,
)

__all__ = [
    "CLASSES",
    "CLASS_DELTAS",
    "MASK_LABELS",
    "NUM_LANDMARKS",
    "PARAMS",
    "FaceClip",
    "describe_change",
    "generate_faces",
    "render_clip",
    "sample_face_clip",
]

GENERATOR_VERSION = 1  # bump when clips or cues change: a folder of another version is rewritten
CLASSES: tuple[str, ...] = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")  # DFEW labels 1..7
MASK_LABELS: tuple[str, ...] = ("background", "skin", "brows", "eyes", "mouth")
NUM_LANDMARKS = 68
PARAMS: tuple[str, ...] = ("mouth_curve", "mouth_open", "mouth_width", "lip_raise", "mouth_asym", "brow_raise", "brow_tilt", "eye_open")

# Apex change of each expression parameter (units: see _geometry). brow_tilt > 0 pulls the inner brow ends
# down (frown), < 0 lifts them (worry); mouth_curve > 0 lifts the mouth corners.
CLASS_DELTAS: dict[str, dict[str, float]] = {
    "happy": {"mouth_curve": 0.9, "mouth_width": 0.3, "mouth_open": 0.25, "eye_open": -0.3, "brow_raise": 0.1},
    "sad": {"mouth_curve": -0.75, "brow_tilt": -0.75, "eye_open": -0.2, "mouth_width": -0.1},
    "neutral": {},
    "angry": {"brow_tilt": 0.85, "brow_raise": -0.5, "mouth_width": -0.3, "mouth_curve": -0.25, "eye_open": 0.1},
    "surprise": {"brow_raise": 0.9, "eye_open": 0.6, "mouth_open": 0.95, "mouth_width": -0.35},
    "disgust": {"lip_raise": 0.85, "mouth_asym": 0.6, "brow_raise": -0.3, "brow_tilt": 0.3, "eye_open": -0.35, "mouth_curve": -0.3},
    "fear": {"brow_raise": 0.6, "brow_tilt": -0.6, "eye_open": 0.5, "mouth_open": 0.45, "mouth_width": 0.4, "mouth_curve": -0.2},
}

SKIN_TONES: tuple[tuple[int, int, int], ...] = (
    (255, 224, 196), (241, 194, 160), (224, 172, 125), (198, 134, 86), (141, 85, 50), (95, 60, 40),
)
BROW_COLOURS: tuple[tuple[int, int, int], ...] = ((40, 30, 25), (80, 55, 35), (150, 110, 60), (25, 25, 30))
IRIS_COLOURS: tuple[tuple[int, int, int], ...] = ((70, 45, 25), (60, 100, 160), (70, 120, 70), (40, 30, 25))

# Phrases for the description, per (parameter, direction); two wordings each.
_PHRASES: dict[tuple[str, int], tuple[str, str]] = {
    ("mouth_curve", 1): ("the corners of the mouth rise", "the mouth corners pull upwards"),
    ("mouth_curve", -1): ("the corners of the mouth turn down", "the mouth corners sink"),
    ("mouth_open", 1): ("the mouth opens", "the lips part"),
    ("mouth_open", -1): ("the mouth closes", "the lips come together"),
    ("mouth_width", 1): ("the lips stretch wide", "the mouth widens"),
    ("mouth_width", -1): ("the lips press together", "the mouth tightens"),
    ("lip_raise", 1): ("the upper lip curls up", "the upper lip lifts"),
    ("lip_raise", -1): ("the upper lip relaxes", "the upper lip drops"),
    ("mouth_asym", 1): ("one corner of the mouth pulls up", "the mouth twists to one side"),
    ("mouth_asym", -1): ("the mouth evens out", "the mouth becomes symmetric"),
    ("brow_raise", 1): ("the eyebrows lift", "the brows go up"),
    ("brow_raise", -1): ("the eyebrows lower", "the brows come down"),
    ("brow_tilt", 1): ("the inner ends of the eyebrows draw down", "the brows knit together"),
    ("brow_tilt", -1): ("the inner ends of the eyebrows rise", "the brows slant upwards in the middle"),
    ("eye_open", 1): ("the eyes widen", "the eyes open wide"),
    ("eye_open", -1): ("the eyes narrow", "the eyes squint"),
}
_STILL = ("the face stays relaxed and barely changes", "the expression stays calm with no clear movement")
_THRESHOLD = 0.18  # smallest parameter change the description mentions


@dataclass(frozen=True)
class Identity:
    """The look of one person: geometry in head units (head half-height = 1) and colours."""

    aspect: float
    eye_x: float
    eye_y: float
    eye_w: float
    brow_gap: float
    brow_th: float
    nose_y: float
    mouth_y: float
    mouth_w: float
    lip_th: float
    skin: tuple[int, int, int]
    brow: tuple[int, int, int]
    iris: tuple[int, int, int]
    background: tuple[int, int, int]
    rest: tuple[float, ...]  # resting value of each of PARAMS


@dataclass(frozen=True)
class FaceClip:
    """A clip: its identity, label, per-frame expression parameters (T, len(PARAMS)), the noise-free
    expression weight (T,), per-frame pose (T, 4) = (centre x px, centre y px, head half-height px, roll rad)."""

    identity: Identity
    label: int  # index into CLASSES
    params: np.ndarray
    weight: np.ndarray
    pose: np.ndarray
    apex_delta: np.ndarray
    onset: int
    apex: int
    size: int


# ----------------------------------------------------------------------------------------------- sampling


def _identity(rng: np.random.Generator) -> Identity:
    skin = np.array(SKIN_TONES[int(rng.integers(len(SKIN_TONES)))], dtype=np.float64) * rng.uniform(0.93, 1.05)
    hue = rng.uniform(0, 1)
    background = np.array([0.5 + 0.5 * math.cos(2 * math.pi * (hue + k / 3)) for k in range(3)]) * rng.uniform(90, 200) + 30
    rest = np.zeros(len(PARAMS))
    for name, lo, hi in (("mouth_curve", -0.3, 0.3), ("brow_raise", -0.2, 0.2), ("brow_tilt", -0.25, 0.25),
                         ("eye_open", -0.12, 0.12), ("mouth_width", -0.1, 0.1)):
        rest[PARAMS.index(name)] = rng.uniform(lo, hi)
    return Identity(
        aspect=float(rng.uniform(0.72, 0.88)),
        eye_x=float(rng.uniform(0.3, 0.37)),
        eye_y=float(rng.uniform(-0.16, -0.06)),
        eye_w=float(rng.uniform(0.14, 0.17)),
        brow_gap=float(rng.uniform(0.15, 0.2)),
        brow_th=float(rng.uniform(0.05, 0.07)),
        nose_y=float(rng.uniform(0.2, 0.27)),
        mouth_y=float(rng.uniform(0.47, 0.55)),
        mouth_w=float(rng.uniform(0.24, 0.3)),
        lip_th=float(rng.uniform(0.04, 0.055)),
        skin=tuple(int(v) for v in np.clip(skin, 0, 255)),
        brow=BROW_COLOURS[int(rng.integers(len(BROW_COLOURS)))],
        iris=IRIS_COLOURS[int(rng.integers(len(IRIS_COLOURS)))],
        background=tuple(int(v) for v in np.clip(background, 0, 255)),
        rest=tuple(float(v) for v in rest),
    )


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def sample_face_clip(rng: np.random.Generator, label: int, *, num_frames: int = 16, size: int = 64) -> FaceClip:
    """Draw one clip of class ``CLASSES[label]``: identity, expression timeline and head motion."""
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"sample_face_clip: label={label}; expected 0..{len(CLASSES) - 1}")
    if num_frames < 8:
        raise ValueError(f"sample_face_clip: num_frames={num_frames}; need at least 8 for onset, ramp and apex")
    ident = _identity(rng)
    t = np.arange(num_frames)
    onset = int(rng.integers(max(1, round(0.1 * num_frames)), max(2, round(0.35 * num_frames)) + 1))
    ramp = int(rng.integers(max(2, round(0.2 * num_frames)), max(3, round(0.4 * num_frames)) + 1))
    apex = min(num_frames - 1, onset + ramp)
    weight = _smoothstep((t - onset) / max(1, apex - onset))
    weight = weight * (1.0 - 0.12 * np.clip((t - apex) / num_frames, 0, 1))  # a slight relaxation after the apex

    intensity = rng.uniform(0.6, 1.0)
    delta = np.array([CLASS_DELTAS[CLASSES[label]].get(p, 0.0) for p in PARAMS]) * intensity
    delta = delta + rng.normal(0.0, 0.06, len(PARAMS)) * (delta != 0)
    params = np.array(ident.rest)[None, :] + weight[:, None] * delta[None, :]
    params = params + rng.normal(0.0, 0.015, params.shape)  # jitter of a live face
    if rng.random() < 0.35:  # a blink: one or two frames with the lids nearly shut
        b = int(rng.integers(0, num_frames - 1))
        params[b : b + int(rng.integers(1, 3)), PARAMS.index("eye_open")] = -0.92
    if CLASSES[label] == "neutral" and rng.random() < 0.5:  # speech-like small mouth movements
        params[:, PARAMS.index("mouth_open")] += 0.08 * np.abs(np.sin(t * rng.uniform(0.8, 1.6) + rng.uniform(0, 6)))

    head = size * rng.uniform(0.4, 0.45)
    cx = size / 2 + size * rng.uniform(-0.04, 0.04)
    cy = size / 2 + size * rng.uniform(-0.02, 0.04)
    roll0, amp, phase = rng.uniform(-0.08, 0.08), rng.uniform(0.0, 0.05), rng.uniform(0, 2 * math.pi)
    drift = rng.uniform(-1.2, 1.2, size=2) * size / 64
    pose = np.stack([
        cx + drift[0] * np.sin(2 * math.pi * t / num_frames + phase),
        cy + drift[1] * np.sin(2 * math.pi * t / num_frames + phase / 2),
        np.full(num_frames, head),
        roll0 + amp * np.sin(2 * math.pi * t / num_frames + phase),
    ], axis=1)
    return FaceClip(ident, label, params, weight, pose, delta, onset, apex, size)


# ----------------------------------------------------------------------------------------------- geometry


def _geometry(ident: Identity, p: np.ndarray) -> dict[str, np.ndarray]:
    """Polygons and landmark points of one frame in head units (centre (0, 0), y down, half-height 1).

    Returns arrays of (x, y) rows: "head", "brow_l"/"brow_r", "eye_l"/"eye_r", "iris_l"/"iris_r" (centre,
    radius x, radius y), "nose", "nostrils", "lips", "inner", "landmarks" (68, 2).
    """
    v = dict(zip(PARAMS, p, strict=True))
    a = ident.aspect
    out: dict[str, np.ndarray] = {}
    th = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    out["head"] = np.stack([a * np.cos(th), np.sin(th)], axis=1)
    jaw_angles = np.deg2rad(170 - 10 * np.arange(17))
    jaw = np.stack([a * np.cos(jaw_angles), np.sin(jaw_angles)], axis=1)

    lm = np.zeros((NUM_LANDMARKS, 2))
    lm[0:17] = jaw
    u6 = np.array([-1.0, -1 / 3, 1 / 3, 1.0, 1 / 3, -1 / 3])  # eye landmark positions along the eye
    upper6 = np.array([False, True, True, False, False, False])
    opening = float(np.clip(1.0 + v["eye_open"], 0.06, 1.9))
    for side, name, first in ((-1, "l", 36), (1, "r", 42)):
        ex, ey, ew = side * ident.eye_x, ident.eye_y, ident.eye_w
        h_up, h_lo = 0.55 * ew * opening, 0.42 * ew * opening
        us = np.linspace(-1, 1, 15)
        prof = (1 - us**2) ** 0.6
        back = us[::-1][1:-1]  # the lower lid, right to left, without the corners
        lower = np.stack([ex + back * ew, ey + h_lo * (1 - back**2) ** 0.6], 1)
        eye = np.concatenate([np.stack([ex + us * ew, ey - h_up * prof], 1), lower])
        out[f"eye_{name}"] = eye
        prof6 = (1 - u6**2) ** 0.6
        lm[first : first + 6] = np.stack([ex + u6 * ew, np.where(upper6, ey - h_up * prof6, ey + h_lo * prof6)], 1)
        r_iris = 0.48 * ew
        out[f"iris_{name}"] = np.array([[ex, ey], [r_iris, r_iris]])

        # brows: left to right in the image; "inner" is the end nearer the nose
        x_left, x_right = (ex - 1.15 * ew, ex + 1.0 * ew) if side < 0 else (ex - 1.0 * ew, ex + 1.15 * ew)
        base = ey - ident.brow_gap - 0.12 * v["brow_raise"]
        inner_dy, outer_dy = 0.1 * v["brow_tilt"], -0.025 * v["brow_tilt"]
        y_left, y_right = (base + outer_dy, base + inner_dy) if side < 0 else (base + inner_dy, base + outer_dy)
        s = np.linspace(0, 1, 9)
        cx_line = x_left + (x_right - x_left) * s
        cy_line = y_left + (y_right - y_left) * s - 0.03 * np.sin(math.pi * s)
        half = 0.5 * ident.brow_th * (0.55 + 0.45 * np.sin(math.pi * s))
        out[f"brow_{name}"] = np.concatenate([np.stack([cx_line, cy_line - half], 1), np.stack([cx_line[::-1], (cy_line + half)[::-1]], 1)])
        idx = np.array([0, 2, 4, 6, 8])
        lm[17 + (0 if side < 0 else 5) : 22 + (0 if side < 0 else 5)] = np.stack([cx_line[idx], cy_line[idx]], 1)

    # nose: bridge 27-30 from between the eyes to the tip; 31-35 the nostril base
    tip_y = ident.nose_y
    lm[27:31] = np.stack([np.zeros(4), ident.eye_y + (tip_y - ident.eye_y) * np.array([0, 1 / 3, 2 / 3, 1])], 1)
    ny = tip_y + 0.05 - 0.05 * max(0.0, v["lip_raise"])
    lm[31:36] = np.stack([np.array([-0.11, -0.055, 0.0, 0.055, 0.11]), ny + np.array([0.0, 0.012, 0.02, 0.012, 0.0])], 1)
    out["nose"] = lm[27:31].copy()
    out["nostrils"] = lm[31:36].copy()

    # mouth: corners move with curve / asymmetry; a mid-line bends between them; lips around it
    mw = ident.mouth_w * (1 + 0.35 * v["mouth_width"])
    my = ident.mouth_y
    y_cl = my - 0.09 * v["mouth_curve"]
    y_cr = my - 0.09 * v["mouth_curve"] - 0.09 * v["mouth_asym"]
    opening_m = 0.17 * float(np.clip(v["mouth_open"], 0.0, 1.2))
    lift = 0.05 * max(0.0, v["lip_raise"])

    def x_of(u: np.ndarray) -> np.ndarray:
        return u * mw * (1 + 0.1 * v["mouth_asym"] * (u > 0))

    def mid(u: np.ndarray) -> np.ndarray:
        return my + u**2 * (np.where(u < 0, y_cl, y_cr) - my)

    def inner_up(u: np.ndarray) -> np.ndarray:
        return mid(u) - (0.5 * opening_m + 0.4 * lift) * (1 - u**2) ** 0.7

    def inner_lo(u: np.ndarray) -> np.ndarray:
        return mid(u) + 0.5 * opening_m * (1 - u**2) ** 0.7

    def outer_up(u: np.ndarray) -> np.ndarray:
        return inner_up(u) - ident.lip_th * (0.3 + 0.7 * (1 - u**2) ** 0.5) - lift * (1 - u**2)

    def outer_lo(u: np.ndarray) -> np.ndarray:
        return inner_lo(u) + 1.2 * ident.lip_th * (0.3 + 0.7 * (1 - u**2) ** 0.5)

    us = np.linspace(-1, 1, 17)
    out["lips"] = np.concatenate([np.stack([x_of(us), outer_up(us)], 1), np.stack([x_of(us[::-1][1:-1]), outer_lo(us[::-1][1:-1])], 1)])
    ui = np.linspace(-0.92, 0.92, 13)
    out["inner"] = np.concatenate([np.stack([x_of(ui), inner_up(ui)], 1), np.stack([x_of(ui[::-1][1:-1]), inner_lo(ui[::-1][1:-1])], 1)])
    u_up = np.array([-2 / 3, -1 / 3, 0, 1 / 3, 2 / 3])
    lm[48] = [x_of(np.array(-1.0)), mid(np.array(-1.0))]
    lm[49:54] = np.stack([x_of(u_up), outer_up(u_up)], 1)
    lm[54] = [x_of(np.array(1.0)), mid(np.array(1.0))]
    lm[55:60] = np.stack([x_of(u_up[::-1]), outer_lo(u_up[::-1])], 1)
    u_in = np.array([-0.5, 0.0, 0.5])
    lm[60] = [x_of(np.array(-0.92)), mid(np.array(-0.92))]
    lm[61:64] = np.stack([x_of(u_in), inner_up(u_in)], 1)
    lm[64] = [x_of(np.array(0.92)), mid(np.array(0.92))]
    lm[65:68] = np.stack([x_of(u_in[::-1]), inner_lo(u_in[::-1])], 1)
    out["landmarks"] = lm
    return out


def _to_pixels(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Head units -> pixel coordinates (pixel centres at integers) for pose (cx, cy, half-height, roll)."""
    cx, cy, scale, roll = pose
    c, s = math.cos(roll), math.sin(roll)
    x, y = points[:, 0] * scale, points[:, 1] * scale
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


# ----------------------------------------------------------------------------------------------- rendering


def _poly(points: np.ndarray, ss: int) -> list[tuple[float, float]]:
    # pixel (c, r) of the small image covers supersampled pixels [c*ss, c*ss+ss): its centre is c*ss + (ss-1)/2
    return [(float(x) * ss + (ss - 1) / 2, float(y) * ss + (ss - 1) / 2) for x, y in points]


def render_clip(clip: FaceClip, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the clip. Returns frames (T, S, S, 3) uint8, landmarks (T, 68, 2) float32, masks (T, S, S) uint8."""
    ident, size, ss = clip.identity, clip.size, 4
    t_count = clip.params.shape[0]
    side = size * ss
    frames = np.empty((t_count, size, size, 3), dtype=np.uint8)
    landmarks = np.empty((t_count, NUM_LANDMARKS, 2), dtype=np.float32)
    masks = np.empty((t_count, size, size), dtype=np.uint8)
    bg = np.array(ident.background, dtype=np.float64)
    yy = np.linspace(-0.5, 0.5, side)[:, None, None]
    background = Image.fromarray(np.clip(bg * (1.0 + 0.2 * yy), 0, 255).astype(np.uint8).repeat(side, axis=1), "RGB")
    skin = np.array(ident.skin, dtype=np.float64)
    shade = tuple(int(v) for v in skin * 0.72)
    lip = tuple(int(v) for v in np.clip(skin * np.array([0.85, 0.5, 0.5]) + np.array([40, 0, 0]), 0, 255))
    for f in range(t_count):
        geo = _geometry(ident, clip.params[f])
        pose = clip.pose[f]
        px = {k: _to_pixels(v, pose) for k, v in geo.items() if not k.startswith("iris")}
        landmarks[f] = px["landmarks"].astype(np.float32)

        img = background.copy()
        d = ImageDraw.Draw(img)
        d.polygon(_poly(px["head"], ss), fill=ident.skin, outline=shade, width=ss)
        d.line(_poly(px["nose"], ss), fill=shade, width=max(1, ss // 2))
        d.line(_poly(px["nostrils"], ss), fill=shade, width=ss)
        for name in ("l", "r"):
            d.polygon(_poly(px[f"brow_{name}"], ss), fill=ident.brow)
            eye = _poly(px[f"eye_{name}"], ss)
            eye_mask = Image.new("L", img.size, 0)
            ImageDraw.Draw(eye_mask).polygon(eye, fill=255)
            iris_layer = Image.new("RGB", img.size, (248, 248, 245))
            centre, radii = geo[f"iris_{name}"]
            (icx, icy), = _poly(_to_pixels(centre[None], pose), ss)
            ir = radii[0] * pose[2] * ss
            di = ImageDraw.Draw(iris_layer)
            di.ellipse((icx - ir, icy - ir, icx + ir, icy + ir), fill=ident.iris)
            di.ellipse((icx - 0.45 * ir, icy - 0.45 * ir, icx + 0.45 * ir, icy + 0.45 * ir), fill=(15, 15, 15))
            img.paste(iris_layer, (0, 0), eye_mask)
            d.line(eye[:15], fill=(35, 25, 20), width=ss)  # upper lid
        d.polygon(_poly(px["lips"], ss), fill=lip)
        if np.ptp(geo["inner"][:, 1]) > 0.02:  # the lips are apart: a dark opening
            d.polygon(_poly(px["inner"], ss), fill=(70, 20, 25))
        small = np.asarray(img.resize((size, size), Image.BOX), dtype=np.float64)
        frames[f] = np.clip(small + rng.normal(0.0, 2.0, small.shape), 0, 255).astype(np.uint8)

        m = Image.new("L", (size, size), 0)
        dm = ImageDraw.Draw(m)
        dm.polygon(_poly(px["head"], 1), fill=1)
        for name in ("l", "r"):
            dm.polygon(_poly(px[f"brow_{name}"], 1), fill=2)
            dm.polygon(_poly(px[f"eye_{name}"], 1), fill=3)
        dm.polygon(_poly(px["lips"], 1), fill=4)
        masks[f] = np.asarray(m, dtype=np.uint8)
    return frames, landmarks, masks


# ----------------------------------------------------------------------------------------------- description


def describe_change(change: np.ndarray, rng: np.random.Generator) -> str:
    """A sentence for the parameter change ``change`` (len(PARAMS),) from the first frame to the apex.

    Mentions up to three of the largest changes above a threshold ("the corners of the mouth rise and the
    eyes narrow"); a face that barely moves gets a "stays relaxed" sentence.
    """
    order = np.argsort(-np.abs(change), kind="stable")
    picked = [int(i) for i in order if abs(change[i]) >= _THRESHOLD][:3]
    if not picked:
        return _STILL[int(rng.integers(len(_STILL)))]
    phrases = [_PHRASES[PARAMS[i], 1 if change[i] > 0 else -1][int(rng.integers(2))] for i in picked]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text


# ----------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Job:
    root: str
    index: int  # 0-based; the clip is named index + 1
    seed: int
    label: int
    size: int
    num_frames: tuple[int, int]
    codec: str
    videos: bool


def _make_clip(job: _Job) -> dict:
    rng = rng_for(job.seed, key("faces"), job.index)
    lo, hi = job.num_frames
    t = lo if hi <= lo else int(rng.integers(lo, hi + 1))
    clip = sample_face_clip(rng, job.label, num_frames=t, size=job.size)
    frames, landmarks, masks = render_clip(clip, rng)
    name = f"{job.index + 1:05d}"
    root = Path(job.root)
    write_frame_dir(root / "frames" / name, frames)
    if job.videos:
        atomic_write_bytes(root / "videos" / f"{name}.mp4", encode_mp4(frames, codec=job.codec))
    atomic_write_bytes(root / "cues" / f"{name}.npz", npz_bytes({"landmarks": landmarks, "masks": masks}))
    change = clip.apex_delta * clip.weight[clip.apex]
    cue = {
        "clip": name,
        "num_frames": t,
        "description": describe_change(change, rng),
        "onset_frame": clip.onset,
        "apex_frame": clip.apex,
        "changes": {p: round(float(c), 3) for p, c in zip(PARAMS, change, strict=True) if abs(c) >= 0.01},
    }
    atomic_write_bytes(root / "cues" / f"{name}.json", (json.dumps(cue, indent=1) + "\n").encode("utf-8"))
    return {"name": name, "num_frames": t, "label": job.label}


def generate_faces(
    out: str | os.PathLike,
    *,
    n: int,
    seed: int = 0,
    size: int = 64,
    num_frames: int = 16,
    max_frames: int | None = None,
    codec: str = "libx264",
    folds: int = 5,
    label_base: int = 1,
    absolute_paths: bool = False,
    videos: bool = True,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write ``n`` face clips under ``out`` (layout in the module docstring) and return the folder.

    Clip lengths are ``num_frames``, or drawn in ``[num_frames, max_frames]``. Clip ``i`` depends only on
    (seed, i) and the label schedule, so the output is the same for any ``workers``. A folder whose
    ``dataset.json`` records the same arguments is kept as it is.
    """
    if n < 1:
        raise ValueError(f"generate_faces: n={n}; need at least one clip")
    if folds < 2:
        raise ValueError(f"generate_faces: folds={folds}; need at least 2 (train/test per fold)")
    if label_base not in (0, 1):
        raise ValueError(f"generate_faces: label_base={label_base}; expected 0 or 1")
    if size % 2 or size < 32:
        raise ValueError(f"generate_faces: size={size}; expected an even size >= 32")
    hi = num_frames if max_frames is None else max_frames
    if hi < num_frames:
        raise ValueError(f"generate_faces: max_frames={max_frames} is below num_frames={num_frames}")
    root_path = Path(out).resolve() if absolute_paths else Path(out)
    record = {
        "world": "faces",
        "generator_version": GENERATOR_VERSION,
        "arguments": {"n": n, "seed": seed, "size": size, "num_frames": num_frames, "max_frames": hi, "codec": codec,
                      "folds": folds, "label_base": label_base, "absolute_paths": absolute_paths, "videos": videos},
    }
    root, done = prepare_root(out, record, ("frames", "videos", "cues", "annotation", "classnames.txt"))
    if done:
        return root
    for sub in ("frames", "cues") + (("videos",) if videos else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)

    labels = balanced_schedule(n, len(CLASSES), rng_for(seed, key("labels")))
    jobs = [_Job(str(root), i, seed, int(labels[i]), size, (num_frames, hi), codec, videos) for i in range(n)]
    results: list[dict] = run_jobs(_make_clip, jobs, workers, "face clips", progress)

    # folds of whole blocks of 7 clips (one of each class), so every fold is balanced
    fold_of = [(i // len(CLASSES)) % folds for i in range(n)]
    ann = root / "annotation"
    ann.mkdir(parents=True, exist_ok=True)
    prefix = root_path if absolute_paths else Path()
    for k in range(folds):
        for split, keep in (("train", lambda f, k=k: f != k), ("test", lambda f, k=k: f == k)):
            lines = [f"{(prefix / 'frames' / r['name']).as_posix()} {r['num_frames']} {r['label'] + label_base}"
                     for r, f in zip(results, fold_of, strict=True) if keep(f)]
            write_lines(ann / f"DFEW_set_{k + 1}_{split}.txt", lines)
    write_lines(root / "classnames.txt", CLASSES)
    counts = np.bincount(labels, minlength=len(CLASSES))
    record["summary"] = {
        "clips": n,
        "class_counts": {c: int(counts[i]) for i, c in enumerate(CLASSES)},
        "labels": {c: i + label_base for i, c in enumerate(CLASSES)},
        "mask_labels": dict(enumerate(MASK_LABELS)),
        "fold_sizes": [fold_of.count(k) for k in range(folds)],
        "fps": FPS,
        "frame_size": size,
    }
    write_dataset_record(root, record)
    return root
