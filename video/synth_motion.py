"""A VideoQA world a frame-level CLIP can learn: big shapes on plain backgrounds whose position, size or colour
changes, asked about in order-dependent questions (SUTD-TrafficQA rows, for Tem-Adapter).

Each clip shows one or two shapes of different kinds ("the circle", "the square") on a plain background
named as in the tiny CLIP's pretraining captions (:mod:`mmadapters.vision.synth`). One of them, the actor,
changes one attribute the CLIP encodes, held still before and after the change; the other shape (with two: one
shape above the other) stands still at the horizontal centre, small:

=======  =======================================================================================================
move     slides from the left (x = 0.3 of the side) to the right (0.7), or back (``travel``)
size     grows from small to large or shrinks from large to small (radius never under 1.5 CLIP patches: 12 px
         at 64 px)
colour   fades from one colour word to another
=======  =======================================================================================================

One question per clip, ``q_type`` ``"U"``: "What happens to the circle?". The four options are two *reverse
pairs* written in the pretraining captions' words: "The circle starts on the left and ends on the right." /
"... starts on the right and ends on the left.", "... starts small and ends large." / "... starts large and ends
small.", "... starts red and ends blue." / "... starts blue and ends red.". One pair is the actor's true change;
the other is another attribute of the same shape. A frame mean sees the same frames in either order, so it
can at best find the pair (50%); the order inside the pair needs time. Answer positions follow a permutation
schedule per split; the kind and the direction of the change follow balanced schedules.

Ground truth: ``meta.jsonl`` records per clip the rendered tracks (``x``, ``r`` in px and the colour name per
frame and object), from which every answer can be checked. ``dataset.json``'s ``summary.gate`` records the
x-position linear-probe R² of a CLIP's frame features on held-out frames (:mod:`mmadapters.video.gate`), the
check that the frame features encode what changes. The still second shape is what lets a frame say where the
actor is: with it drawn at a random x as well (``distractor_x=None``, generator version 1), the shipped tiny CLIP's
features carry about the mean of the two shapes' x-positions and the actor's x-position R² drops from 0.90 to 0.68
(docs/results.md, issue 19).

Layout: ``videos/m00000.mp4``, ``annotations/R2_{all,train,test}.jsonl``, ``meta.jsonl``, ``dataset.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmadapters.io import atomic_write_bytes

# The pretraining renderer's outlines, so the shapes look as the tiny CLIP learned them.
from ..vision.synth import BACKGROUNDS as CAPTION_BACKGROUNDS
from ..vision.synth import COLOURS as CAPTION_COLOURS
from ..vision.synth import _shape_mask
from .synth import FPS, balanced_schedule, encode_mp4, key, prepare_root, rng_for, run_jobs, write_dataset_record, write_lines
from .synth_traffic import HEADER

__all__ = ["CHANGES", "COLOURS", "KINDS", "SHAPES", "MotionClip", "answer_from_track", "generate_motion", "option_text",
           "render_motion", "sample_motion_clip", "tracks"]

GENERATOR_VERSION = 2  # 2: the non-acting shape stands at the centre (distractor_x 0.5)
KINDS: tuple[str, ...] = ("move", "size", "colour")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
BACKGROUNDS: tuple[str, ...] = ("beige", "cream", "slate", "navy", "sky", "mint")
X_LEFT, X_RIGHT = 0.3, 0.7  # the pretraining captions' "on the left" / "on the right" centres
R_SMALL, R_LARGE = 12.0, 19.0  # px at 64 px: 1.5 and ~2.4 patches of 8 px
# With two shapes (one above the other) "large" is smaller and the other shape is small, so they never touch.
R_TWO_LARGE = 16.0
DISTRACTOR_X = 0.5  # the non-acting shape's centre (fraction of the side); None: drawn like the actor's (version 1)
# The two words of each change, in the (start, end) order of direction 0.
CHANGES: dict[str, tuple[str, str]] = {"move": ("on the left", "on the right"), "size": ("small", "large")}


@dataclass(frozen=True)
class MotionClip:
    """Objects as dicts (shape, colour, x, y, r in px); the actor's change: ``kind`` and its (start, end) values
    (words for colour, px for move and size); frames ``[start, end)`` of the change."""

    objects: tuple[dict, ...]
    actor: int
    kind: str
    values: tuple
    start: int
    end: int
    background: str
    num_frames: int
    size: int


def option_text(shape: str, start_word: str, end_word: str) -> str:
    """``"The circle starts on the left and ends on the right."`` (the captions' words; order is the content)."""
    return f"The {shape} starts {start_word} and ends {end_word}."


def _check_layout(caller: str, travel: tuple[float, float], distractor_x: float | None) -> None:
    lo, hi = travel
    if not 0.0 < lo < hi < 1.0 or min(lo, 1.0 - hi) * 64.0 < R_SMALL:
        raise ValueError(f"{caller}: travel={travel}; expected 0 < LEFT < RIGHT < 1 with room for a radius of "
                         f"{R_SMALL / 64:.4f} of the side at both ends")
    if distractor_x is not None and not R_SMALL / 64.0 <= distractor_x <= 1.0 - R_SMALL / 64.0:
        raise ValueError(f"{caller}: distractor_x={distractor_x}; the shape must fit inside the frame "
                         f"({R_SMALL / 64:.4f} to {1 - R_SMALL / 64:.4f})")


def sample_motion_clip(rng: np.random.Generator, kind: str, direction: int, *, n_objects: int, size: int = 64,
                       num_frames: int = 16, travel: tuple[float, float] = (X_LEFT, X_RIGHT),
                       distractor_x: float | None = DISTRACTOR_X) -> MotionClip:
    """A clip whose actor makes change ``kind`` in ``direction`` (0: left→right, small→large, colour A→B drawn).

    ``travel``: the move's (left, right) centres as fractions of the side; a still shape's centre is drawn in the
    same range (narrowed so the shape stays inside the frame), and a moving shape's radius is capped so it fits at
    both ends. ``distractor_x``: the non-acting shape's centre (fraction of the side); None draws it like the actor's.
    """
    if kind not in KINDS or direction not in (0, 1) or n_objects not in (1, 2):
        raise ValueError(f"sample_motion_clip: kind={kind!r} direction={direction} n_objects={n_objects}; expected kind in "
                         f"{KINDS}, direction 0/1, 1 or 2 objects")
    if num_frames < 8:
        raise ValueError(f"sample_motion_clip: num_frames={num_frames}; need at least 8 (still, change, still)")
    _check_layout("sample_motion_clip", travel, distractor_x)
    lo, hi = travel
    s = size / 64.0
    shapes = [SHAPES[int(i)] for i in rng.permutation(len(SHAPES))[:n_objects]]
    colours = [COLOURS[int(i)] for i in rng.permutation(len(COLOURS))[:n_objects]]
    large = (R_LARGE if n_objects == 1 else R_TWO_LARGE) * s
    ys = [32.0 * s] if n_objects == 1 else [16.0 * s, 47.0 * s]
    actor = int(rng.integers(n_objects))
    objects = []
    for k in range(n_objects):
        r = float(rng.choice([R_SMALL * s, large])) if k == actor else R_SMALL * s
        if k == actor and kind == "move":
            r = min(r, lo * size, (1.0 - hi) * size)
        reach = large if k == actor and kind == "size" else r  # the largest radius the shape takes
        u = float(rng.uniform(0.0, 1.0))
        left, right = max(lo * size, reach), min(hi * size, size - reach)
        x = left + u * (right - left)
        if k != actor and distractor_x is not None:
            x = distractor_x * size
        objects.append({"shape": shapes[k], "colour": colours[k], "x": x, "y": ys[k], "r": r})
    a = objects[actor]
    if kind == "move":
        values = (lo * size, hi * size)
    elif kind == "size":
        values = (R_SMALL * s, large)
    else:
        values = (a["colour"], [c for c in COLOURS if c not in colours][int(rng.integers(len(COLOURS) - n_objects))])
    values = values if direction == 0 else values[::-1]
    a.update({"move": {"x": values[0]}, "size": {"r": values[0]}, "colour": {"colour": values[0]}}[kind])
    # still for at least 2 frames at each end, so the first and last frames show the start and end states
    length = int(rng.integers(num_frames // 2, num_frames - 3))
    start = int(rng.integers(2, num_frames - length - 1))
    return MotionClip(tuple(objects), actor, kind, tuple(values), start, start + length, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
                      num_frames, size)


def tracks(clip: MotionClip) -> dict:
    """Per-frame ground truth: ``x``, ``r`` (T, K) px lists; ``colour`` (T, K) colour names (the nearer end of a
    fade); ``rgb`` (T, K, 3) float."""
    t = np.arange(clip.num_frames)
    p = np.clip((t - clip.start) / max(1, clip.end - 1 - clip.start), 0.0, 1.0)
    x = np.array([[o["x"] for o in clip.objects]] * clip.num_frames)
    r = np.array([[o["r"] for o in clip.objects]] * clip.num_frames)
    rgb = np.array([[CAPTION_COLOURS[o["colour"]] for o in clip.objects]] * clip.num_frames, dtype=np.float64)
    names = [[o["colour"] for o in clip.objects] for _ in t]
    a, (v0, v1) = clip.actor, clip.values
    if clip.kind == "move":
        x[:, a] = v0 + (v1 - v0) * p
    elif clip.kind == "size":
        r[:, a] = v0 + (v1 - v0) * p
    else:
        c0, c1 = np.array(CAPTION_COLOURS[v0], float), np.array(CAPTION_COLOURS[v1], float)
        rgb[:, a] = c0 + (c1 - c0) * p[:, None]
        for i in t:
            names[i][a] = v0 if p[i] < 0.5 else v1
    return {"x": x.round(3).tolist(), "r": r.round(3).tolist(), "colour": names, "rgb": rgb}


def render_motion(clip: MotionClip, track: dict) -> np.ndarray:
    """(T, size, size, 3) uint8 frames: plain background, flat shapes drawn at 2x and downsampled."""
    ss, side = 2, 2 * clip.size
    bg = np.array(CAPTION_BACKGROUNDS[clip.background], dtype=np.float32)
    frames = []
    for i in range(clip.num_frames):
        canvas = np.broadcast_to(bg, (side, side, 3)).astype(np.float32)
        for k, o in enumerate(clip.objects):
            mask = np.asarray(_shape_mask(o["shape"], side, ss * track["x"][i][k], ss * o["y"], ss * track["r"][i][k], 0.0),
                              dtype=np.float32)[..., None] / 255.0
            canvas = canvas * (1 - mask) + track["rgb"][i, k].astype(np.float32) * mask
        img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB").resize((clip.size, clip.size), Image.LANCZOS)
        frames.append(np.asarray(img))
    return np.stack(frames)


def _words(clip: MotionClip, kind: str, direction: int) -> tuple[str, str]:
    """(start, end) words of change ``kind`` of the actor in ``direction`` (0 as in :data:`CHANGES`)."""
    if kind == "colour":
        pair = clip.values if clip.kind == "colour" else (clip.objects[clip.actor]["colour"], _other_colour(clip))
    else:
        pair = CHANGES[kind]
    return pair if direction == 0 else (pair[1], pair[0])


def _other_colour(clip: MotionClip) -> str:
    used = {o["colour"] for o in clip.objects}
    return [c for c in COLOURS if c not in used][clip.start % (len(COLOURS) - len(used))]


def answer_from_track(track: dict, actor: int, shape: str) -> str:
    """The true option, read from the per-frame ``track`` alone (first frame against last)."""
    x0, x1 = track["x"][0][actor], track["x"][-1][actor]
    r0, r1 = track["r"][0][actor], track["r"][-1][actor]
    c0, c1 = track["colour"][0][actor], track["colour"][-1][actor]
    if abs(x1 - x0) > 1:
        words = ("on the left", "on the right") if x1 > x0 else ("on the right", "on the left")
    elif abs(r1 - r0) > 1:
        words = ("small", "large") if r1 > r0 else ("large", "small")
    elif c0 != c1:
        words = (c0, c1)
    else:
        raise ValueError("answer_from_track: the actor does not change")
    return option_text(shape, *words)


def _question(clip: MotionClip, other_kind: str) -> dict:
    """The question of ``clip``: its true option, its reverse, and the two directions of ``other_kind``."""
    shape = clip.objects[clip.actor]["shape"]
    true_dir = 0 if clip.kind == "colour" else (0 if clip.values[1] > clip.values[0] else 1)
    answer = option_text(shape, *_words(clip, clip.kind, true_dir))
    reverse = option_text(shape, *_words(clip, clip.kind, 1 - true_dir))
    others = [option_text(shape, *_words(clip, other_kind, d)) for d in (0, 1)]
    return {"q_body": f"What happens to the {shape}?", "q_type": "U", "answer_text": answer, "reverse": reverse,
            "distractors": [reverse, *others]}


@dataclass(frozen=True)
class _Job:
    root: str
    index: int
    seed: int
    size: int
    num_frames: int
    codec: str
    kind: str
    direction: int
    n_objects: int
    other_kind: str
    travel: tuple[float, float]
    distractor_x: float | None


def _make_clip(job: _Job) -> dict:
    rng = rng_for(job.seed, key("motion"), job.index)
    clip = sample_motion_clip(rng, job.kind, job.direction, n_objects=job.n_objects, size=job.size, num_frames=job.num_frames,
                              travel=job.travel, distractor_x=job.distractor_x)
    track = tracks(clip)
    frames = render_motion(clip, track)
    stem = f"m{job.index:05d}"
    atomic_write_bytes(Path(job.root) / "videos" / f"{stem}.mp4", encode_mp4(frames, codec=job.codec))
    return {"clip": job.index, "stem": stem, "question": _question(clip, job.other_kind),
            "meta": {"num_frames": clip.num_frames, "background": clip.background, "objects": list(clip.objects),
                     "actor": clip.actor, "kind": clip.kind, "values": list(clip.values), "start": clip.start, "end": clip.end,
                     "track": {"x": track["x"], "r": track["r"], "colour": track["colour"]}}}


def generate_motion(out: str | os.PathLike, *, n: int, seed: int = 0, size: int = 64, num_frames: int = 16,
                    codec: str = "libx264", objects: tuple[int, int] = (1, 2), test_fraction: float = 0.2,
                    travel: tuple[float, float] = (X_LEFT, X_RIGHT), distractor_x: float | None = DISTRACTOR_X,
                    gate_model: str | None = None, gate: bool = True, workers: int = 1, progress: bool = True) -> Path:
    """Write ``n`` clips, one question each, under ``out`` (layout in the module docstring); returns the folder.

    ``travel`` and ``distractor_x`` as in :func:`sample_motion_clip` (``distractor_x=None``: the second shape at a
    random x, the version-1 world whose gate the shipped tiny CLIP fails).

    With ``gate`` the x-position probe of ``gate_model`` (None: the shipped tiny CLIP) is measured on the
    written videos and recorded as ``summary.gate`` in ``dataset.json``. Output is the same for any ``workers``.
    """
    if n < 2:
        raise ValueError(f"generate_motion: n={n}; need at least 2 clips (a train and a test split)")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"generate_motion: test_fraction={test_fraction}; expected 0 < value < 1")
    lo, hi = objects
    if not 1 <= lo <= hi <= 2:
        raise ValueError(f"generate_motion: objects={objects}; expected 1 <= MIN <= MAX <= 2")
    if size % 2 or size < 32:
        raise ValueError(f"generate_motion: size={size}; expected an even size >= 32")
    if num_frames < 8:
        raise ValueError(f"generate_motion: num_frames={num_frames}; need at least 8")
    _check_layout("generate_motion", tuple(travel), distractor_x)
    record = {"world": "motion", "generator_version": GENERATOR_VERSION,
              "arguments": {"n": n, "seed": seed, "size": size, "num_frames": num_frames, "codec": codec, "objects": list(objects),
                            "test_fraction": test_fraction, "travel": list(travel), "distractor_x": distractor_x,
                            "gate": gate, "gate_model": gate_model}}
    root, done = prepare_root(out, record, ("videos", "annotations", "meta.jsonl"))
    if done:
        return root
    (root / "videos").mkdir(parents=True, exist_ok=True)
    # kind x direction balanced; the other pair's kind balanced over the two other kinds
    change = balanced_schedule(n, 2 * len(KINDS), rng_for(seed, key("motion-change")))
    other = balanced_schedule(n, 2, rng_for(seed, key("motion-other")))
    count = balanced_schedule(n, hi - lo + 1, rng_for(seed, key("motion-objects")))
    jobs = []
    for i in range(n):
        kind = KINDS[int(change[i]) // 2]
        jobs.append(_Job(str(root), i, seed, size, num_frames, codec, kind, int(change[i]) % 2, lo + int(count[i]),
                         [k for k in KINDS if k != kind][int(other[i])], tuple(travel), distractor_x))
    clips = run_jobs(_make_clip, jobs, workers, "motion clips", progress)

    n_test = max(1, int(round(n * test_fraction)))
    test_clips = {int(i) for i in rng_for(seed, key("motion-test")).permutation(n)[:n_test]}
    slots = {s: balanced_schedule(n, 4, rng_for(seed, key(f"motion-answers-{s}"))) for s in ("train", "test")}
    used = {"train": 0, "test": 0}
    rows: dict[str, list] = {"train": [], "test": []}
    meta_lines = []
    for c in clips:
        split = "test" if c["clip"] in test_clips else "train"
        q = c["question"]
        slot = int(slots[split][used[split]])
        used[split] += 1
        distractors = [q["distractors"][int(j)] for j in rng_for(seed, key("motion-order"), c["clip"]).permutation(3)]
        options = distractors[:slot] + [q["answer_text"]] + distractors[slot:]
        row = [c["clip"], c["clip"], f"{c['stem']}.mp4", 3, q["q_body"], "U", *options, slot]
        rows[split].append(row)
        meta_lines.append(json.dumps({"record_id": c["clip"], "split": split, "vid_filename": row[2],
                                      "reverse_option": options.index(q["reverse"]), **c["meta"]}))
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    every = sorted(rows["train"] + rows["test"], key=lambda r: r[0])
    for name, split_rows in (("R2_all", every), ("R2_train", rows["train"]), ("R2_test", rows["test"])):
        write_lines(ann / f"{name}.jsonl", [json.dumps(HEADER)] + [json.dumps(r) for r in split_rows])
    write_lines(root / "meta.jsonl", meta_lines)

    answers = np.array([r[-1] for r in every])
    record["summary"] = {
        "clips": n, "records": {"all": len(every), "train": len(rows["train"]), "test": len(rows["test"])},
        "answer_index_counts": [int((answers == i).sum()) for i in range(4)],
        "change_kinds": {k: int(sum(KINDS[int(c) // 2] == k for c in change)) for k in KINDS}, "fps": FPS, "frame_size": size,
    }
    if gate:
        from .gate import x_position_gate

        record["summary"]["gate"] = x_position_gate(root, gate_model)
    write_dataset_record(root, record)
    return root
