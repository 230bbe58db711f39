"""Generated vision-language tasks: multi-object scenes with VQA-, GQA- and NLVR2-like questions and captions.

The data of the VL-Adapter recipe (VQA, GQA, NLVR2, COCO captioning), made from the shapes of
:mod:`mmadapters.vision.synth` so the tiny CLIP (64x64 images) can see it and a tiny VL-T5 can learn it.

Scenes
    2-4 solid objects (2: 30%, 3: 40%, 4: 30%) on a 3x3 grid, at most one object per cell, each
    centre jittered by at most 2% of the side. Attributes: one of :data:`VL_SHAPES` (6), one of
    :data:`VL_COLOURS` (6), a size of :data:`VL_SIZES` ("small" radius 7.5% of the side, "large" 13%),
    drawn uniformly and independently (duplicates allowed: counting matters). The background is one of
    the backgrounds of :mod:`~mmadapters.vision.synth` at least 120 RGB units from every object colour,
    plain (50%) or with a faint striped / dotted / checkered pattern. Spatial relations come from the grid
    cells: ``a`` is *left of* ``b`` when its column is smaller, *above* when its row is smaller ("above"
    means anywhere higher, as in GQA, not directly above). Distinct cells make every relation unambiguous.

Questions (per image: ``vqa_per_image`` VQA-like, ``gqa_per_image`` GQA-like; question types drawn with
the weights below, a type that does not fit the scene is replaced; no question twice per image).
Referring expressions ("the circle", "the red circle", "the small circle", "the red object", "the small
red circle") always pick out exactly one object.

VQA-like (answers: colours, shapes, digits 0-4, yes/no, small/large), ``question_type`` / ``answer_type``:
    =========================  ===========================================  ======  ========
    question_type              example                                      weight  answer
    =========================  ===========================================  ======  ========
    what color is the          what color is the small circle?              0.25    colour
    what shape is the          what shape is the blue object?               0.20    shape
    how many                   how many squares are there? / how many red   0.25    number
                               objects are there? / how many objects ...?
    is there a                 is there a red triangle? (yes 50%)           0.20    yes/no
    what size is the           what size is the green star?                 0.10    size
    =========================  ===========================================  ======  ========
    Ten human answers per question: a number of wrong answers (0: 50%, 1: 28%, 2: 14%, 3: 8%; a
    plausible wrong value of the same type, sometimes repeated), the rest right, each right answer
    written as a variant with probability 0.15 ("2" -> "two", "red" -> "red.", "circle" -> "a circle").
    ``label`` maps each distinct answer (canonical form, as the VQA normalization gives it) to the
    official soft score of its count: 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.

GQA-like (one answer; answers: shapes, colours, yes/no):
    ===========  =====================================================================  ======
    type         example                                                                weight
    ===========  =====================================================================  ======
    rel_object   what is to the left of the green star?  (the one object there)        0.30
    rel_color    what color is the shape to the right of the small triangle?           0.25
    rel_verify   is the circle above the red square?  (yes 50%)                        0.25
    rel_exist    is there a square below the blue object?  (yes 50%)                   0.10
    same_attr    do the circle and the star have the same color? / ... the same size?  0.10
    ===========  =====================================================================  ======
    rel_object / rel_color are asked only where exactly one object is in that direction. Yes/no types aim
    at 50% yes; same_attr reaches it for sizes, but colour / shape comparisons are about 30% yes (few
    scenes have two objects of one colour or shape). A type that does not fit a scene is redrawn, so the
    realized mix is about rel_object 30%, rel_verify 26%, rel_color 26%, rel_exist 11%, same_attr 6%.

NLVR-like: pairs of images of the same split (``nlvr_per_image`` pairs per image of the split, rounded up
to an even number) with a statement about both; exactly half of each split is true. Templates (drawn
uniformly; parameters are redrawn until the statement has the wanted truth value): more/fewer
``{shape}s`` in the left image than the right, both images contain a ``{colour}`` object, the
left/right image has exactly ``{n}`` ``{shape}s``, exactly one image contains a ``{colour} {shape}``,
the two images have the same number of objects, there are ``{n}`` ``{shape}s`` in total, in the
left/right image a ``{shape}`` is left of / above a ``{shape}``, the left/right image has no
``{colour}`` objects.

Captions: 5 per image from 5 templates (object lists in varied order and detail, the background, and
one spatial relation between two objects), e.g. "a small red circle to the left of a blue square."

Files (``DIR``):
    images/<img_id>.png                      the scenes (img_id ``synth_000123``; ``synthpt_000123`` for pretrain)
    vqa/karpathy_{train,val,test}.json       [{img_id, sent, label, question_id, answer_type, question_type,
                                               answers: [{answer, answer_id} x 10]}]
    gqa/{train,valid,testdev}.json           [{img_id, sent, label: {answer: 1.0}, question_id}]
    nlvr/{train,valid,test}.json             JSONL {identifier, img0, img1, sent, label 0|1, uid}
    coco/dataset_coco.json                   {"images": [{filepath, filename, imgid, cocoid, split, sentids,
                                               sentences: [{raw, tokens, imgid, sentid}]}], "dataset": "coco"}
    scenes.jsonl                             ground truth per image (analysis and tests only)
    dataset.json                             arguments, counts, vocabularies; written last

Splits: images are split 80/10/10 (train/val/test; ``val_fraction``, ``test_fraction``) by a seeded
permutation; every task of an image lives in that image's split, and NLVR pairs join images of one split.
``pretrain=True`` draws the images from another random stream (ids ``synthpt_*``), so a pretraining set
made with the same seed shares no image with the task set.

Determinism: everything is a pure function of (seed, pretrain, image index) and the arguments: the same
arguments give the same bytes, with any number of ``workers``. Files are written to a temporary name and
renamed; ``dataset.json`` is written last, and a folder whose ``dataset.json`` records the same arguments
is left as it is.

Command line::

    python -m mmadapters.vision.synth_vl --out data/vl --n-images 2000 --seed 0 [--image-size 64] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from mmadapters.io import atomic_write_bytes
from mmadapters.vision.synth import BACKGROUNDS, COLOURS, _edge, _shape_mask, _smooth_field, _texture

__all__ = [
    "MIN_IMAGES",
    "VL_COLOURS",
    "VL_SHAPES",
    "VL_SIZES",
    "VLObject",
    "VLScene",
    "above",
    "below",
    "build_parser",
    "captions_for",
    "generate_vl",
    "gqa_questions",
    "left_of",
    "main",
    "nlvr_statement",
    "render_vl",
    "right_of",
    "sample_vl_scene",
    "vqa_questions",
    "vqa_soft_score",
]

GENERATOR_VERSION = 2  # bump when scenes, rendering or texts change: older folders are regenerated
GRID = 3
VL_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
VL_COLOURS: tuple[str, ...] = ("red", "yellow", "green", "blue", "purple", "white")
# Radius as a fraction of the side: a large star (1.1 r) plus the jitter stays inside its grid cell.
VL_SIZES: dict[str, float] = {"small": 0.075, "large": 0.13}
JITTER = 0.02
BG_TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
MIN_IMAGES = 20
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 512
SPLITS = ("train", "val", "test")
VQA_FILES = {"train": "karpathy_train.json", "val": "karpathy_val.json", "test": "karpathy_test.json"}
GQA_FILES = {"train": "train.json", "val": "valid.json", "test": "testdev.json"}
NLVR_FILES = {"train": "train.json", "val": "valid.json", "test": "test.json"}
NUM_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
RELATIONS: dict[str, str] = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
VQA_TYPES: tuple[tuple[str, float], ...] = (
    ("what color is the", 0.25),
    ("what shape is the", 0.20),
    ("how many", 0.25),
    ("is there a", 0.20),
    ("what size is the", 0.10),
)
GQA_TYPES: tuple[tuple[str, float], ...] = (
    ("rel_object", 0.30),
    ("rel_color", 0.25),
    ("rel_verify", 0.25),
    ("rel_exist", 0.10),
    ("same_attr", 0.10),
)
NLVR_TEMPLATES: tuple[str, ...] = ("more", "both_colour", "exactly", "one_image", "same_count", "total", "relation", "none_colour")
DATASET_RECORD = "dataset.json"
_SUBDIRS = ("images", "vqa", "gqa", "nlvr", "coco")


# ----------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class VLObject:
    """One object: attributes, its grid cell (row 0 = top, col 0 = left) and its centre (fractions of the side)."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    x: float
    y: float

    @classmethod
    def at(cls, shape: str, colour: str, size: str, row: int, col: int) -> VLObject:
        """An object at the exact centre of cell (row, col) — for hand-built scenes."""
        return cls(shape, colour, size, row, col, (col + 0.5) / GRID, (row + 0.5) / GRID)


@dataclass(frozen=True)
class VLScene:
    """Objects (in distinct cells) on a background; ``bg_texture`` is "plain" or a pattern of :data:`BG_TEXTURES`."""

    objects: tuple[VLObject, ...]
    background: str
    bg_texture: str = "plain"

    def __post_init__(self) -> None:
        cells = [(o.row, o.col) for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"VLScene: two objects share a grid cell: {cells}")
        for o in self.objects:
            for name, value, allowed in (("shape", o.shape, VL_SHAPES), ("colour", o.colour, VL_COLOURS), ("size", o.size, VL_SIZES)):
                if value not in allowed:
                    raise ValueError(f"VLScene: object {name}={value!r} is not one of {list(allowed)}")
            if not (0 <= o.row < GRID and 0 <= o.col < GRID):
                raise ValueError(f"VLScene: object cell ({o.row}, {o.col}) is outside the {GRID}x{GRID} grid")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"VLScene: background={self.background!r} is not one of {list(BACKGROUNDS)}")
        if self.bg_texture not in BG_TEXTURES:
            raise ValueError(f"VLScene: bg_texture={self.bg_texture!r} is not one of {list(BG_TEXTURES)}")

    def to_json(self) -> dict[str, Any]:
        return {"background": self.background, "bg_texture": self.bg_texture, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VLScene:
        return cls(tuple(VLObject(**o) for o in data["objects"]), data["background"], data["bg_texture"])


def left_of(a: VLObject, b: VLObject) -> bool:
    """``a`` is (anywhere) to the left of ``b``: a smaller grid column."""
    return a.col < b.col


def right_of(a: VLObject, b: VLObject) -> bool:
    return a.col > b.col


def above(a: VLObject, b: VLObject) -> bool:
    """``a`` is (anywhere) above ``b``: a smaller grid row (row 0 is the top)."""
    return a.row < b.row


def below(a: VLObject, b: VLObject) -> bool:
    return a.row > b.row


_REL_FN: dict[str, Callable[[VLObject, VLObject], bool]] = {"left": left_of, "right": right_of, "above": above, "below": below}


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _pick_weighted(rng: np.random.Generator, mix: Sequence[tuple[str, float]]) -> str:
    weights = np.asarray([w for _, w in mix], dtype=np.float64)
    return mix[int(rng.choice(len(mix), p=weights / weights.sum()))][0]


def _distance(a: Sequence[int], b: Sequence[int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def sample_vl_scene(rng: np.random.Generator) -> VLScene:
    """Draw a scene: 2-4 objects in distinct cells of the 3x3 grid, a background that keeps them visible."""
    n = int(rng.choice([2, 3, 4], p=[0.3, 0.4, 0.3]))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objects = []
    for cell in sorted(int(c) for c in cells):
        row, col = divmod(cell, GRID)
        x = (col + 0.5) / GRID + float(rng.uniform(-JITTER, JITTER))
        y = (row + 0.5) / GRID + float(rng.uniform(-JITTER, JITTER))
        shape, colour, size = _pick(rng, VL_SHAPES), _pick(rng, VL_COLOURS), _pick(rng, tuple(VL_SIZES))
        objects.append(VLObject(shape, colour, size, row, col, round(x, 4), round(y, 4)))
    far = {b: min(_distance(rgb, COLOURS[o.colour]) for o in objects) for b, rgb in BACKGROUNDS.items()}
    options = [b for b, d in far.items() if d > 120] or [max(far, key=far.get)]
    texture = "plain" if rng.random() < 0.5 else _pick(rng, BG_TEXTURES[1:])
    return VLScene(tuple(objects), _pick(rng, options), texture)


# ----------------------------------------------------------------------------------------------- rendering


def render_vl(scene: VLScene, image_size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """Render ``scene`` as an RGB ``image_size`` x ``image_size`` image (drawn at 2x or more, downsampled).

    ``rng`` draws the small continuous jitter (tones, angles, radii, lighting, noise); the same rng state
    gives the same pixels. Objects are shaded, with a soft drop shadow and a faint dark outline so that
    light objects stay visible on light backgrounds.
    """
    if image_size < 8:
        raise ValueError(f"render_vl: image_size={image_size} is too small; expected at least 8")
    rng = rng if rng is not None else np.random.default_rng(0)
    ss = max(2, math.ceil(128 / image_size))
    side = image_size * ss
    bg = np.clip(np.asarray(BACKGROUNDS[scene.background], dtype=np.float32) + rng.normal(0, 5, size=3), 0, 255)
    yy = np.mgrid[0:side, 0:side][0].astype(np.float32) / side
    light = (1.0 + 0.10 * (0.5 - yy) + 0.05 * _smooth_field(rng, side, 4))[..., None]
    canvas = np.broadcast_to(bg, (side, side, 3)).astype(np.float32)
    if scene.bg_texture != "plain":
        # a faint pattern: the background stays one colour for the colour questions
        canvas = 0.8 * canvas + 0.2 * _texture(scene.bg_texture, side, bg, rng, scale=side / 9)
    canvas = canvas * light
    # Each object is drawn in a box around it (shadow and outline included): the canvas is padded so a box
    # never leaves it, and every per-object filter runs on the box only.
    pad = math.ceil(1.25 * max(VL_SIZES.values()) * 1.07 * side + 3 * ss)
    canvas = np.pad(canvas, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    for obj in scene.objects:
        colour = np.clip(np.asarray(COLOURS[obj.colour], dtype=np.float32) + rng.normal(0, 8, size=3), 0, 255)
        r = VL_SIZES[obj.size] * float(rng.uniform(0.93, 1.07)) * side
        x0, y0 = int(obj.x * side), int(obj.y * side)  # corner of the box (side 2 * pad) in padded coordinates
        cx, cy = obj.x * side + pad - x0, obj.y * side + pad - y0  # centre inside the box
        box = 2 * pad
        mask_img = _shape_mask(obj.shape, box, cx, cy, r, float(rng.uniform(-0.2, 0.2)))
        mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0
        shadow_img = mask_img.transform(mask_img.size, Image.AFFINE, (1, 0, -ss, 0, 1, -ss)).filter(ImageFilter.GaussianBlur(ss))
        region = canvas[y0 : y0 + box, x0 : x0 + box]
        region = region * (1 - 0.3 * np.asarray(shadow_img, dtype=np.float32)[..., None] / 255.0)
        by, bx = np.mgrid[0:box, 0:box].astype(np.float32)
        lx, ly = cx - 0.35 * r, cy - 0.35 * r
        shade = np.clip(1.12 - 0.6 * np.sqrt((bx - lx) ** 2 + (by - ly) ** 2)[..., None] / max(1e-6, 2 * r), 0.8, 1.12)
        region = region * (1 - mask) + colour * shade * mask
        outline = np.asarray(_edge(mask_img, ss), dtype=np.float32)[..., None] / 255.0
        canvas[y0 : y0 + box, x0 : x0 + box] = region * (1 - 0.35 * outline) + 30.0 * 0.35 * outline
    canvas = canvas[pad : pad + side, pad : pad + side]
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB").resize((image_size, image_size), Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 2.5, size=(image_size, image_size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _render_job(job: tuple[dict, int, int, int, int]) -> bytes:
    """PNG bytes of one image (module level: runs in worker processes)."""
    scene_json, image_size, seed, stream, index = job
    scene = VLScene.from_json(scene_json)
    return _png(render_vl(scene, image_size, _rng(seed, stream, _key("render"), index)))


# ----------------------------------------------------------------------------------------------- language helpers


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _count_phrase(n: int, shape: str) -> str:
    return f"{NUM_WORDS[n]} {shape if n == 1 else _plural(shape)}"


# Referring-expression forms: the attributes they name (in word order).
_REF_FORMS: tuple[tuple[str, ...], ...] = (("shape",), ("colour", "shape"), ("size", "shape"), ("colour",), ("size", "colour", "shape"))


def _matches(o: VLObject, attrs: Mapping[str, str]) -> bool:
    return all(getattr(o, k) == v for k, v in attrs.items())


def _ref_text(attrs: Mapping[str, str]) -> str:
    words = [attrs[k] for k in ("size", "colour", "shape") if k in attrs]
    return "the " + " ".join(words) + ("" if "shape" in attrs else " object")


def _unique_refs(scene: VLScene, obj: VLObject, exclude: Iterable[str] = ()) -> list[str]:
    """Referring expressions ("the red circle", ...) that pick out exactly ``obj``, not naming ``exclude``."""
    exclude = set(exclude)
    refs = []
    for form in _REF_FORMS:
        if exclude & set(form):
            continue
        attrs = {k: getattr(obj, k) for k in form}
        if sum(_matches(o, attrs) for o in scene.objects) == 1:
            refs.append(_ref_text(attrs))
    return refs


def _referable(scene: VLScene, exclude: Iterable[str] = ()) -> list[tuple[VLObject, list[str]]]:
    exclude = tuple(exclude)
    out = []
    for o in scene.objects:
        refs = _unique_refs(scene, o, exclude)
        if refs:
            out.append((o, refs))
    return out


# ----------------------------------------------------------------------------------------------- VQA-like


def vqa_soft_score(count: int) -> float:
    """The official VQA soft score of an answer given by ``count`` of the 10 annotators (0/0.3/0.6/0.9/1)."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def _vqa_one(scene: VLScene, qtype: str, rng: np.random.Generator) -> tuple[str, str, str] | None:
    """(question, answer, answer_type) of type ``qtype``, or None when the scene does not allow it."""
    objs = scene.objects
    if qtype == "what color is the":
        cands = _referable(scene, exclude=("colour",))
        if not cands:
            return None
        o, refs = _pick(rng, cands)
        return f"what color is {_pick(rng, refs)}?", o.colour, "other"
    if qtype == "what shape is the":
        cands = _referable(scene, exclude=("shape",))
        if not cands:
            return None
        o, refs = _pick(rng, cands)
        return f"what shape is {_pick(rng, refs)}?", o.shape, "other"
    if qtype == "what size is the":
        cands = _referable(scene, exclude=("size",))
        if not cands:
            return None
        o, refs = _pick(rng, cands)
        return f"what size is {_pick(rng, refs)}?", o.size, "other"
    if qtype == "how many":
        kind = _pick_weighted(rng, (("shape", 0.5), ("colour", 0.3), ("all", 0.2)))
        if kind == "all":
            return "how many objects are there?", str(len(objs)), "number"
        if kind == "shape":
            shape = _pick(rng, [o.shape for o in objs]) if rng.random() < 0.8 else _pick(rng, VL_SHAPES)
            return f"how many {_plural(shape)} are there?", str(sum(o.shape == shape for o in objs)), "number"
        colour = _pick(rng, [o.colour for o in objs]) if rng.random() < 0.8 else _pick(rng, VL_COLOURS)
        return f"how many {colour} objects are there?", str(sum(o.colour == colour for o in objs)), "number"
    if qtype == "is there a":
        present = sorted({(o.colour, o.shape) for o in objs})
        if rng.random() < 0.5:
            colour, shape = _pick(rng, present)
            return f"is there a {colour} {shape}?", "yes", "yes/no"
        # a near miss when possible: a colour or a shape of the scene, in a combination it does not have
        near = [(c, s) for c in VL_COLOURS for s in VL_SHAPES if (c, s) not in present and any(c == pc or s == ps for pc, ps in present)]
        colour, shape = _pick(rng, near)
        return f"is there a {colour} {shape}?", "no", "yes/no"
    raise ValueError(f"vqa question type {qtype!r} is not one of {[t for t, _ in VQA_TYPES]}")


def _variant(answer: str, answer_type: str, rng: np.random.Generator) -> str:
    """A surface variant the VQA normalization maps back to ``answer``."""
    if answer_type == "number":
        return NUM_WORDS[int(answer)]
    if answer in VL_SHAPES:
        return _pick(rng, (f"a {answer}", f"{answer}."))
    return f"{answer}."


def _wrong(answer: str, answer_type: str, rng: np.random.Generator) -> str:
    if answer_type == "yes/no":
        return "no" if answer == "yes" else "yes"
    if answer_type == "number":
        n = int(answer)
        return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    for pool in (VL_COLOURS, VL_SHAPES, tuple(VL_SIZES)):
        if answer in pool:
            return _pick(rng, [a for a in pool if a != answer])
    raise ValueError(f"no wrong answer for {answer!r}")


def _human_answers(answer: str, answer_type: str, rng: np.random.Generator) -> tuple[list[str], dict[str, float]]:
    """Ten annotator answers (raw strings) and the label {canonical answer: soft score}."""
    n_wrong = int(rng.choice(4, p=[0.5, 0.28, 0.14, 0.08]))
    wrong_value = _wrong(answer, answer_type, rng)
    canon: list[str] = []
    for k in range(10):
        if k < n_wrong:
            canon.append(wrong_value if rng.random() < 0.7 else _wrong(answer, answer_type, rng))
        else:
            canon.append(answer)
    order = rng.permutation(10)
    canon = [canon[int(i)] for i in order]
    raw = [_variant(a, answer_type, rng) if rng.random() < 0.15 else a for a in canon]
    counts = Counter(canon)
    label = {a: vqa_soft_score(c) for a, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}
    return raw, label


def vqa_questions(scene: VLScene, rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    """``n`` distinct VQA-like questions about ``scene`` (fewer if the scene runs out).

    Each: {"sent", "answer" (canonical), "answer_type", "question_type", "answers" (10 raw), "label"}.
    """
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(20 * max(n, 1)):
        if len(out) >= n:
            break
        qtype = _pick_weighted(rng, VQA_TYPES)
        q = _vqa_one(scene, qtype, rng)
        if q is None or q[0] in seen:
            continue
        sent, answer, answer_type = q
        seen.add(sent)
        raw, label = _human_answers(answer, answer_type, rng)
        out.append({"sent": sent, "answer": answer, "answer_type": answer_type, "question_type": qtype, "answers": raw, "label": label})
    return out


# ----------------------------------------------------------------------------------------------- GQA-like


def _gqa_one(scene: VLScene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    objs = scene.objects
    if qtype in ("rel_object", "rel_color"):
        # (reference, relation) pairs with exactly one object in that relation
        cands = []
        for ref_obj, refs in _referable(scene):
            for rel, fn in _REL_FN.items():
                related = [o for o in objs if o is not ref_obj and fn(o, ref_obj)]
                if len(related) == 1:
                    cands.append((refs, rel, related[0]))
        if not cands:
            return None
        refs, rel, target = _pick(rng, cands)
        if qtype == "rel_object":
            return f"what is {RELATIONS[rel]} {_pick(rng, refs)}?", target.shape
        return f"what color is the shape {RELATIONS[rel]} {_pick(rng, refs)}?", target.colour
    if qtype == "rel_verify":
        referable = _referable(scene)
        if len(referable) < 2:
            return None
        want = bool(rng.random() < 0.5)
        pairs = [(a, b) for a in referable for b in referable if a[0] is not b[0]]
        order = rng.permutation(len(pairs))
        for i in order:
            (a, refs_a), (b, refs_b) = pairs[int(i)]
            rels = [rel for rel, fn in _REL_FN.items() if fn(a, b) == want]
            if rels:
                rel = _pick(rng, rels)
                return f"is {_pick(rng, refs_a)} {RELATIONS[rel]} {_pick(rng, refs_b)}?", "yes" if want else "no"
        return None
    if qtype == "rel_exist":
        # yes and no equally often: a "yes" needs a reference with something in that direction
        want = bool(rng.random() < 0.5)
        cands = []
        for ref_obj, refs in _referable(scene):
            for rel, fn in _REL_FN.items():
                there = sorted({o.shape for o in objs if o is not ref_obj and fn(o, ref_obj)})
                if bool(there) or not want:
                    cands.append((refs, rel, there))
        if not cands:
            return None
        refs, rel, there = _pick(rng, cands)
        if want:
            shape = _pick(rng, there)
        else:  # half the time a shape the scene has elsewhere: the relation, not the shape, decides
            elsewhere = sorted({o.shape for o in objs} - set(there))
            shape = _pick(rng, elsewhere) if elsewhere and rng.random() < 0.5 else _pick(rng, [x for x in VL_SHAPES if x not in there])
        return f"is there a {shape} {RELATIONS[rel]} {_pick(rng, refs)}?", "yes" if want else "no"
    if qtype == "same_attr":
        # yes and no equally often for each attribute: a scene without a fitting pair gets another question type
        attr = _pick(rng, ("colour", "size", "shape"))
        want = bool(rng.random() < 0.5)
        referable = _referable(scene, exclude=(attr,))
        pairs = [(a, b) for k, a in enumerate(referable) for b in referable[k + 1 :]]
        fitting = [(a, b) for a, b in pairs if (getattr(a[0], attr) == getattr(b[0], attr)) == want]
        if not fitting:
            return None
        (a, refs_a), (b, refs_b) = _pick(rng, fitting)
        if rng.random() < 0.5:
            (a, refs_a), (b, refs_b) = (b, refs_b), (a, refs_a)
        same = getattr(a, attr) == getattr(b, attr)
        ra, rb = _pick(rng, refs_a), _pick(rng, refs_b)
        if attr == "size":
            return f"are {ra} and {rb} the same size?", "yes" if same else "no"
        return f"do {ra} and {rb} have the same {'color' if attr == 'colour' else 'shape'}?", "yes" if same else "no"
    raise ValueError(f"gqa question type {qtype!r} is not one of {[t for t, _ in GQA_TYPES]}")


def gqa_questions(scene: VLScene, rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    """``n`` distinct GQA-like questions about ``scene``: each {"sent", "answer", "question_type"}."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(20 * max(n, 1)):
        if len(out) >= n:
            break
        qtype = _pick_weighted(rng, GQA_TYPES)
        q = _gqa_one(scene, qtype, rng)
        if q is None or q[0] in seen:
            continue
        seen.add(q[0])
        out.append({"sent": q[0], "answer": q[1], "question_type": qtype})
    return out


# ----------------------------------------------------------------------------------------------- NLVR-like


def _count(scene: VLScene, **attrs: str) -> int:
    return sum(_matches(o, attrs) for o in scene.objects)


def _nlvr_candidate(template: str, left: VLScene, right: VLScene, rng: np.random.Generator) -> tuple[str, bool]:
    """A random statement of ``template`` about the pair and its truth value."""
    sides = {"left": left, "right": right}
    both = left.objects + right.objects
    if template == "more":
        shape = _pick(rng, [o.shape for o in both])
        a, b = _count(left, shape=shape), _count(right, shape=shape)
        if rng.random() < 0.5:
            return f"there are more {_plural(shape)} in the left image than in the right image.", a > b
        return f"there are fewer {_plural(shape)} in the left image than in the right image.", a < b
    if template == "both_colour":
        colour = _pick(rng, VL_COLOURS)
        return f"both images contain a {colour} object.", _count(left, colour=colour) > 0 and _count(right, colour=colour) > 0
    if template == "exactly":
        side = _pick(rng, ("left", "right"))
        shape = _pick(rng, [o.shape for o in both])
        n = int(rng.integers(1, 4))
        return f"the {side} image has exactly {_count_phrase(n, shape)}.", _count(sides[side], shape=shape) == n
    if template == "one_image":
        o = _pick(rng, both)
        colour, shape = (o.colour, o.shape) if rng.random() < 0.7 else (_pick(rng, VL_COLOURS), _pick(rng, VL_SHAPES))
        has = [_count(s, colour=colour, shape=shape) > 0 for s in (left, right)]
        return f"exactly one image contains a {colour} {shape}.", sum(has) == 1
    if template == "same_count":
        return "the two images have the same number of objects.", len(left.objects) == len(right.objects)
    if template == "total":
        shape = _pick(rng, [o.shape for o in both])
        total = _count(left, shape=shape) + _count(right, shape=shape)
        n = max(1, total + int(rng.integers(-1, 2)))
        return f"there {'is' if n == 1 else 'are'} {_count_phrase(n, shape)} in total.", total == n
    if template == "relation":
        side = _pick(rng, ("left", "right"))
        scene = sides[side]
        rel = _pick(rng, ("left", "above"))
        a, b = _pick(rng, both).shape, _pick(rng, both).shape
        truth = any(x.shape == a and y.shape == b and _REL_FN[rel](x, y) for x in scene.objects for y in scene.objects if x is not y)
        return f"in the {side} image, a {a} is {RELATIONS[rel]} a {b}.", truth
    if template == "none_colour":
        side = _pick(rng, ("left", "right"))
        colour = _pick(rng, VL_COLOURS)
        return f"the {side} image has no {colour} objects.", _count(sides[side], colour=colour) == 0
    raise ValueError(f"nlvr template {template!r} is not one of {list(NLVR_TEMPLATES)}")


def nlvr_statement(left: VLScene, right: VLScene, rng: np.random.Generator, label: bool) -> tuple[str, str]:
    """A statement about the pair (left, right) whose truth value is ``label``; returns (statement, template)."""
    for t in rng.permutation(len(NLVR_TEMPLATES)):
        template = NLVR_TEMPLATES[int(t)]
        for _ in range(30):
            sent, truth = _nlvr_candidate(template, left, right, rng)
            if truth == label:
                return sent, template
    raise RuntimeError(f"nlvr_statement: no template gives a {label} statement for this pair")  # unreachable in practice


# ----------------------------------------------------------------------------------------------- captions


def _noun_phrase(o: VLObject, rng: np.random.Generator) -> str:
    return f"a {o.size} {o.colour} {o.shape}" if rng.random() < 0.6 else f"a {o.colour} {o.shape}"


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions_for(scene: VLScene, rng: np.random.Generator) -> list[str]:
    """Five reference captions of ``scene`` (five templates): the objects, the background, one spatial relation."""
    objs = list(scene.objects)
    pairs = [(a, b) for a in objs for b in objs if a is not b]
    named = [(a, b) for a, b in pairs if _unique_refs(scene, a) and _unique_refs(scene, b)]
    a, b = _pick(rng, named or pairs)
    rel = _pick(rng, [r for r, fn in _REL_FN.items() if fn(a, b)])

    def ref(o: VLObject) -> str:  # the shortest expression naming only ``o`` ("the circle", "the red star")
        refs = _unique_refs(scene, o)
        return refs[0] if refs else f"the {o.colour} {o.shape}"

    rest = [o for o in objs if o is not a and o is not b]

    def listing(order: Sequence[VLObject]) -> str:
        return _join([_noun_phrase(o, rng) for o in order])

    shuffled = [objs[int(i)] for i in rng.permutation(len(objs))]
    reading = sorted(objs, key=lambda o: (o.row, o.col))
    pattern = "" if scene.bg_texture == "plain" else "patterned "
    count = NUM_WORDS[len(objs)]
    caps = [
        f"{listing(shuffled)}.",
        f"{_noun_phrase(a, rng)} {RELATIONS[rel]} {_noun_phrase(b, rng)}" + (f", and {listing(rest)}." if rest else "."),
        f"{count} shapes on a {pattern}{scene.background} background: {listing(reading)}.",
        f"there is {listing(shuffled)}. {ref(a)} is {RELATIONS[rel]} {ref(b)}.",
        f"a picture of {count} objects, with {ref(a)} {RELATIONS[rel]} {ref(b)}.",
    ]
    return caps


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


# ----------------------------------------------------------------------------------------------- writing


def _split_of(n_images: int, seed: int, stream: int, val_fraction: float, test_fraction: float) -> list[str]:
    n_val = max(2, round(n_images * val_fraction))
    n_test = max(2, round(n_images * test_fraction))
    if n_images - n_val - n_test < 2:
        raise ValueError(
            f"generate_vl: n_images={n_images} leaves {n_images - n_val - n_test} train images after {n_val} val and {n_test} test; "
            f"expected at least {MIN_IMAGES} images"
        )
    perm = _rng(seed, stream, _key("split")).permutation(n_images)
    split = ["train"] * n_images
    for k, i in enumerate(perm):
        if k < n_val:
            split[int(i)] = "val"
        elif k < n_val + n_test:
            split[int(i)] = "test"
    return split


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj) + "\n").encode("utf-8"))


def _write_lines(path: Path, rows: Iterable[Any]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))


def _write_image(path: Path, data: bytes) -> None:
    # temp + rename (atomic); no fsync per image: thousands of them, and dataset.json (fsynced, last) marks completion
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"generate_vl: {name}={value!r}; expected an integer")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"generate_vl: {name}={value}; expected an integer {bound}")
    return int(value)


def generate_vl(
    out: str | os.PathLike,
    *,
    n_images: int,
    seed: int = 0,
    image_size: int = 64,
    vqa_per_image: int = 3,
    gqa_per_image: int = 3,
    nlvr_per_image: float = 1.0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    pretrain: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the generated VL tasks under ``out`` (layout in the module docstring); returns the summary.

    The summary is the content of ``dataset.json``: ``args``, ``images`` (per split), ``counts``
    (task -> split -> rows), ``question_types``, ``nlvr_true`` (true statements per split),
    ``answers`` (answer vocabulary per task), ``files``. ``pretrain=True`` draws a disjoint set of
    images (another random stream, ids ``synthpt_*``). Raises ValueError on bad arguments.
    """
    n_images = _check_int("n_images", n_images, MIN_IMAGES)
    seed = _check_int("seed", seed, 0)
    image_size = _check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    vqa_per_image = _check_int("vqa_per_image", vqa_per_image, 0, 10)
    gqa_per_image = _check_int("gqa_per_image", gqa_per_image, 0, 10)
    workers = _check_int("workers", workers, 1)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or not 0.0 < value < 0.5:
            raise ValueError(f"generate_vl: {name}={value!r}; expected a number in (0, 0.5)")
    if not isinstance(nlvr_per_image, (int, float)) or not 0.0 < nlvr_per_image <= 10.0:
        raise ValueError(f"generate_vl: nlvr_per_image={nlvr_per_image!r}; expected a number in (0, 10]")
    stream_name = "pretrain" if pretrain else "tasks"
    stream = _key(stream_name)
    prefix = "synthpt" if pretrain else "synth"
    split = _split_of(n_images, seed, stream, float(val_fraction), float(test_fraction))
    args = {
        "n_images": n_images, "seed": seed, "image_size": image_size, "vqa_per_image": vqa_per_image,
        "gqa_per_image": gqa_per_image, "nlvr_per_image": float(nlvr_per_image), "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction), "pretrain": bool(pretrain),
    }
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"generate_vl: output path {root} exists and is not a directory")
    meta = root / DATASET_RECORD
    if meta.is_file():
        try:
            stored = json.loads(meta.read_text(encoding="utf-8"))
            if stored.get("generator_version") == GENERATOR_VERSION and stored.get("args") == args:
                return stored
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # unreadable: regenerate
        meta.unlink()
    root.mkdir(parents=True, exist_ok=True)
    for sub in _SUBDIRS:  # never mix files of two runs
        if (root / sub).is_dir():
            shutil.rmtree(root / sub)
        (root / sub).mkdir()

    # scenes and texts: cheap, in this process
    ids = [f"{prefix}_{i:06d}" for i in range(n_images)]
    scenes = [sample_vl_scene(_rng(seed, stream, _key("scene"), i)) for i in range(n_images)]

    # images: the expensive part, optionally in worker processes; the bytes depend only on (seed, stream, i)
    jobs = [(scenes[i].to_json(), image_size, seed, stream, i) for i in range(n_images)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_images, desc="rendering VL scenes", unit="img", disable=None)
    if workers > 1:
        import multiprocessing

        # spawn: clean workers (no forked torch/OpenMP state); imap keeps the order
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for i, data in enumerate(pool.imap(_render_job, jobs, chunksize=max(1, min(32, n_images // (4 * workers))))):
                _write_image(root / "images" / f"{ids[i]}.png", data)
                if bar is not None:
                    bar.update(1)
    else:
        for i, job in enumerate(jobs):
            _write_image(root / "images" / f"{ids[i]}.png", _render_job(job))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    vqa: dict[str, list[dict]] = {s: [] for s in SPLITS}
    gqa: dict[str, list[dict]] = {s: [] for s in SPLITS}
    qtypes: dict[str, Counter] = {"vqa": Counter(), "gqa": Counter(), "nlvr": Counter()}
    coco_images = []
    scene_rows = []
    for i in range(n_images):
        scene, img_id, s = scenes[i], ids[i], split[i]
        scene_rows.append({"img_id": img_id, "split": s, **scene.to_json()})
        for k, q in enumerate(vqa_questions(scene, _rng(seed, stream, _key("vqa"), i), vqa_per_image)):
            qtypes["vqa"][q["question_type"]] += 1
            vqa[s].append({
                "img_id": img_id, "sent": q["sent"], "label": q["label"], "question_id": i * 100 + k,
                "answer_type": q["answer_type"], "question_type": q["question_type"],
                "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(q["answers"])],
            })
        for k, q in enumerate(gqa_questions(scene, _rng(seed, stream, _key("gqa"), i), gqa_per_image)):
            qtypes["gqa"][q["question_type"]] += 1
            gqa[s].append({"img_id": img_id, "sent": q["sent"], "label": {q["answer"]: 1.0}, "question_id": f"{i * 100 + k}"})
        caps = captions_for(scene, _rng(seed, stream, _key("caption"), i))
        coco_images.append({
            "filepath": "images", "filename": f"{img_id}.png", "imgid": i, "cocoid": i, "split": s,
            "sentids": [5 * i + j for j in range(len(caps))],
            "sentences": [{"raw": c, "tokens": _tokens(c), "imgid": i, "sentid": 5 * i + j} for j, c in enumerate(caps)],
        })

    nlvr: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for si, s in enumerate(SPLITS):
        members = [i for i in range(n_images) if split[i] == s]
        n_pairs = 2 * math.ceil(len(members) * nlvr_per_image / 2)
        rng = _rng(seed, stream, _key("nlvr"), si)
        labels = rng.permutation([1] * (n_pairs // 2) + [0] * (n_pairs // 2))
        for k in range(n_pairs):
            a, b = rng.choice(len(members), size=2, replace=False)
            ia, ib = members[int(a)], members[int(b)]
            sent, template = nlvr_statement(scenes[ia], scenes[ib], rng, bool(labels[k]))
            qtypes["nlvr"][template] += 1
            identifier = f"{NLVR_FILES[s].removesuffix('.json')}-{k}-0-0"
            row = {"identifier": identifier, "img0": ids[ia], "img1": ids[ib], "sent": sent, "label": int(labels[k]), "uid": identifier}
            nlvr[s].append(row)

    for s in SPLITS:
        _write_json(root / "vqa" / VQA_FILES[s], vqa[s])
        _write_json(root / "gqa" / GQA_FILES[s], gqa[s])
        _write_lines(root / "nlvr" / NLVR_FILES[s], nlvr[s])
    _write_json(root / "coco" / "dataset_coco.json", {"images": coco_images, "dataset": "coco"})
    _write_lines(root / "scenes.jsonl", scene_rows)

    record = {
        "generator": "mmadapters.vision.synth_vl",
        "generator_version": GENERATOR_VERSION,
        "args": args,
        "images": {s: split.count(s) for s in SPLITS},
        "counts": {
            "vqa": {s: len(vqa[s]) for s in SPLITS},
            "gqa": {s: len(gqa[s]) for s in SPLITS},
            "nlvr": {s: len(nlvr[s]) for s in SPLITS},
            "caption": {s: 5 * split.count(s) for s in SPLITS},
        },
        "nlvr_true": {s: sum(r["label"] for r in nlvr[s]) for s in SPLITS},
        "question_types": {task: dict(sorted(c.items())) for task, c in qtypes.items()},
        "answers": {
            "vqa": sorted({a for rows in vqa.values() for r in rows for a in r["label"]}),
            "gqa": sorted({a for rows in gqa.values() for r in rows for a in r["label"]}),
        },
        "files": {
            "images": "images/<img_id>.png",
            "vqa": {s: f"vqa/{VQA_FILES[s]}" for s in SPLITS},
            "gqa": {s: f"gqa/{GQA_FILES[s]}" for s in SPLITS},
            "nlvr": {s: f"nlvr/{NLVR_FILES[s]}" for s in SPLITS},
            "caption": "coco/dataset_coco.json",
            "scenes": "scenes.jsonl",
        },
    }
    atomic_write_bytes(meta, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    return record


# ----------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mmadapters.vision.synth_vl",
        description="Write generated VQA / GQA / NLVR2 / COCO-caption style tasks on multi-object scenes.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--n-images", type=int, required=True, help=f"number of images (>= {MIN_IMAGES}), split 80/10/10 by default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64, the tiny CLIP's)")
    parser.add_argument("--vqa-per-image", type=int, default=3)
    parser.add_argument("--gqa-per-image", type=int, default=3)
    parser.add_argument("--nlvr-per-image", type=float, default=1.0, help="NLVR pairs per image of a split")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the images in val (default 0.1)")
    parser.add_argument("--test-fraction", type=float, default=0.1,
                        help="share of the images in test (default 0.1; e.g. 0.25 of 2,000 images: 500 test images "
                             "beside a smaller training set)")
    parser.add_argument("--pretrain", action="store_true", help="draw a disjoint image set for pretraining (ids synthpt_*)")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes; the output does not depend on it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints the summary and the time taken; returns 2 with a message on bad arguments."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        record = generate_vl(
            args.out, n_images=args.n_images, seed=args.seed, image_size=args.image_size, vqa_per_image=args.vqa_per_image,
            gqa_per_image=args.gqa_per_image, nlvr_per_image=args.nlvr_per_image, val_fraction=args.val_fraction,
            test_fraction=args.test_fraction, pretrain=args.pretrain,
            workers=args.workers, progress=not args.quiet,
        )
    except (ValueError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: record[k] for k in ("images", "counts", "nlvr_true")}, indent=2))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # run the functions from the importable module, so spawned workers find them under their real name
    from mmadapters.vision import synth_vl as _synth_vl

    raise SystemExit(_synth_vl.main())
