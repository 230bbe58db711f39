"""A seeded procedural world of captioned images: shapes, colours, sizes, textures, positions, backgrounds, styles.

Every image is one object described by a :class:`Scene` (its attributes) and rendered by :func:`render`
with PIL + numpy. Captions describe the scene ("a photo of a small red striped circle on the left of a
beige background"). Everything is a pure function of a seed, so the same seed gives the same bytes.

Three uses:

- :func:`caption_pairs` streams (image, caption) pairs for pretraining the shipped tiny CLIP
  (``scripts/pretrain_tiny_clip.py``). Pretraining uses :data:`PRETRAIN_STYLES` (photo and cartoon
  mostly, sketch and noisy rare) and never shows the colour–shape pairs in :data:`HELDOUT_COMBOS`.
- :func:`generate_task` writes a named task of :data:`TASKS` as image folders with captions, class
  names and prompt templates, the layout ``mmadapters zeroshot`` and the few-shot adapters read.
- The benchmark tasks shift the domain away from pretraining (sketch or noisy style, held-out
  combinations), so few-shot adapters have something to learn.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from mmadapters.io import atomic_write_bytes

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HELDOUT_COMBOS",
    "POSITIONS",
    "PRETRAIN_STYLES",
    "SHAPES",
    "SIZES",
    "STYLES",
    "TASKS",
    "TEXTURES",
    "ClassSpec",
    "Scene",
    "TaskSpec",
    "caption",
    "caption_pairs",
    "generate_task",
    "novel_words",
    "position_words",
    "random_centre",
    "render",
    "sample_scene",
    "spatial_caption",
]

# Bump when rendering or captions change: a task folder written by another version is regenerated.
GENERATOR_VERSION = 2
SPLITS = ("train", "val", "test")

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "pentagon", "crescent")

# Object colours (RGB). The first ten are the colour classes of the benchmark tasks.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "orange": (240, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 160, 60),
    "cyan": (30, 200, 210),
    "blue": (35, 70, 205),
    "purple": (130, 50, 170),
    "pink": (240, 120, 180),
    "brown": (120, 75, 35),
    "black": (25, 25, 25),
    "gray": (135, 135, 135),
    "white": (245, 245, 245),
}
TASK_COLOURS: tuple[str, ...] = tuple(COLOURS)[:10]

# Background colours have their own names so that "red" in a caption always means the object.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "beige": (225, 210, 180),
    "cream": (250, 245, 225),
    "slate": (70, 80, 95),
    "navy": (20, 30, 70),
    "sky": (170, 205, 240),
    "mint": (180, 235, 200),
    "lavender": (210, 195, 240),
    "sand": (200, 180, 130),
}

# Radius of the object as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.15, "medium": 0.23, "large": 0.32}
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
# Centre of the object (x, y) as fractions of the image side, and the caption phrase.
POSITIONS: dict[str, tuple[float, float, str]] = {
    "left": (0.3, 0.5, "on the left"),
    "right": (0.7, 0.5, "on the right"),
    "top": (0.5, 0.3, "at the top"),
    "bottom": (0.5, 0.7, "at the bottom"),
    "center": (0.5, 0.5, "in the center"),
}
# "falsecolour" is a photo whose channels are rotated (R, G, B) -> (G, B, R), as a false-colour satellite or
# infrared image maps bands to colours: consistent, so a few shots learn it, but never seen in pretraining.
STYLES: tuple[str, ...] = ("photo", "cartoon", "sketch", "noisy", "falsecolour")
_STYLE_PREFIX = {"photo": "a photo of", "cartoon": "a cartoon of", "sketch": "a sketch of", "noisy": "a noisy photo of",
                 "falsecolour": "a false-colour photo of"}

# The style mix of pretraining: sketch and noisy are rare, so the shifted benchmark tasks stay hard.
PRETRAIN_STYLES: tuple[tuple[str, float], ...] = (("photo", 0.6), ("cartoon", 0.3), ("sketch", 0.05), ("noisy", 0.05))

# Colour–shape pairs never rendered during pretraining (two colours per shape); the classes of
# "combos-heldout".
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    (TASK_COLOURS[(3 * i + k * 5) % 10], shape) for i, shape in enumerate(SHAPES) for k in (0, 1)
)


@dataclass(frozen=True)
class Scene:
    """The attributes of one image; :func:`render` adds the continuous jitter (exact size, angle, offsets)."""

    shape: str
    colour: str
    size: str
    texture: str
    position: str
    background: str
    style: str


@dataclass(frozen=True)
class ClassSpec:
    """One class of a task: its folder name, its human name and the scene attributes it fixes."""

    folder: str
    name: str
    fixed: Mapping[str, str]


@dataclass(frozen=True)
class TaskSpec:
    """A task of the generated world.

    ``classes`` lists the classes (folder order need not be sorted; label indices follow the sorted folder
    names). With ``images_of`` the images are those of that task, byte for byte (its class folders and styles
    must be the same); only the class names and templates differ. ``styles`` gives, per split, the style mix
    as (style, weight) pairs. Attributes a class does not fix are drawn uniformly; ``avoid_heldout`` keeps
    :data:`HELDOUT_COMBOS` out of classes that do not fix both colour and shape. ``templates`` are the
    zero-shot prompts with ``{c}``.
    """

    name: str
    description: str
    classes: tuple[ClassSpec, ...]
    styles: Mapping[str, tuple[tuple[str, float], ...]]
    templates: tuple[str, ...]
    avoid_heldout: bool = field(default=True)
    # Draw the images of another task (same seed streams, same class folders): only the names differ.
    images_of: str | None = None


def _shape_classes() -> tuple[ClassSpec, ...]:
    return tuple(ClassSpec(s, s, {"shape": s}) for s in SHAPES)


def _all_splits(mix: tuple[tuple[str, float], ...]) -> dict[str, tuple[tuple[str, float], ...]]:
    return {split: mix for split in SPLITS}


def novel_words(n: int, key: str) -> tuple[str, ...]:
    """``n`` distinct pronounceable made-up words, a pure function of ``key`` ("vostrel", "kimbrask"...).

    Built from syllables whose letters pairs are rare in English (and absent from every word the
    pretraining captions use: tested against the tokenizer), so the tiny CLIP's text tower never saw
    them: zero-shot CLIP knows nothing about a class named this way, as with a new species name.
    """
    onsets = ("v", "z", "kr", "thl", "gw", "sk", "dr", "qu", "br", "j")
    vowels = ("o", "u", "ei", "ao", "y")
    codas = ("x", "sk", "vn", "lt", "zz", "mb", "rk")
    rng = np.random.default_rng(zlib.crc32(key.encode("utf-8")))

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    words: list[str] = []
    while len(words) < n:
        word = "".join(pick(onsets) + pick(vowels) for _ in range(2)) + pick(codas)
        if word not in words:
            words.append(word)
    return tuple(words)


_GENERIC_TEMPLATES = ("a {c}.", "a photo of a {c}.", "a cartoon of a {c}.", "a sketch of a {c}.", "a noisy photo of a {c}.")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            name="synth-shapes",
            description="10 shape classes in the pretraining style mix (photo 60%, cartoon 30%, sketch 5%, noisy 5%): "
            "the default dataset of `mmadapters zeroshot`; measures plain zero-shot quality of the tiny CLIP.",
            classes=_shape_classes(),
            styles=_all_splits(PRETRAIN_STYLES),
            templates=_GENERIC_TEMPLATES,
        ),
        TaskSpec(
            name="shapes-sketch",
            description="10 shape classes, every split in sketch style (outline only on paper), a style that is "
            "rare in pretraining; few-shot support comes from the target (sketch) domain.",
            classes=_shape_classes(),
            styles=_all_splits((("sketch", 1.0),)),
            templates=("a sketch of a {c}.", "a {c}.", "a sketch of a small {c}.", "a sketch of a large {c}."),
        ),
        TaskSpec(
            name="colours-noisy",
            description="10 colour classes (any shape), every split in noisy style (heavy blur and noise, colour "
            "cast), a style that is rare in pretraining.",
            classes=tuple(ClassSpec(c, c, {"colour": c}) for c in TASK_COLOURS),
            styles=_all_splits((("noisy", 1.0),)),
            templates=("a noisy photo of a {c} shape.", "a {c} shape.", "a photo of a {c} shape.", "a noisy photo of something {c}."),
        ),
        TaskSpec(
            name="combos-heldout",
            description="20 colour-shape classes whose combinations never appear in pretraining (HELDOUT_COMBOS), "
            "photo and cartoon style: tests attribute binding on new combinations.",
            classes=tuple(ClassSpec(f"{c}_{s}", f"{c} {s}", {"colour": c, "shape": s}) for c, s in sorted(HELDOUT_COMBOS)),
            styles=_all_splits((("photo", 0.7), ("cartoon", 0.3))),
            templates=("a {c}.", "a photo of a {c}.", "a cartoon of a {c}."),
        ),
        TaskSpec(
            name="synth-novel",
            description="the images of synth-shapes (10 shape classes, pretraining style mix), but each class is named "
            "with a made-up word the text tower never saw (novel_words): zero-shot is at chance, a few shots carry "
            "what the prompts miss, as with new species or EuroSAT on real CLIP. Class folders keep the shape names.",
            classes=tuple(ClassSpec(s, w, {"shape": s}) for s, w in zip(SHAPES, novel_words(len(SHAPES), "synth-novel"),
                                                                           strict=True)),
            styles=_all_splits(PRETRAIN_STYLES),
            templates=_GENERIC_TEMPLATES,
            images_of="synth-shapes",
        ),
        TaskSpec(
            name="combos-colour-named",
            description="10 classes = 5 colours x 2 shapes (red circle, red star, ...), named by the colour only "
            "(\"red one\", \"red two\"): the names give one attribute, the class is defined by two, so zero-shot "
            "can at best find the colour; the shots show the shape.",
            classes=tuple(ClassSpec(f"{c}_{s}", f"{c} {('one', 'two')[k]}", {"colour": c, "shape": s})
                          for i, c in enumerate(TASK_COLOURS[::2]) for k, s in enumerate((SHAPES[i], SHAPES[i + 5]))),
            styles=_all_splits((("photo", 0.7), ("cartoon", 0.3))),
            templates=("a {c}.", "a photo of a {c}.", "a cartoon of a {c}.", "a photo of a {c} shape."),
        ),
        TaskSpec(
            name="shapes-noisy",
            description="10 shape classes, every split (the shots too) in noisy style (heavy blur, noise, colour "
            "cast), rare in pretraining: a style-shifted target domain whose few shots are in the target style.",
            classes=_shape_classes(),
            styles=_all_splits((("noisy", 1.0),)),
            templates=("a noisy photo of a {c}.", "a {c}.", "a photo of a {c}.", "a noisy photo of a small {c}."),
        ),
        TaskSpec(
            name="colours-falsecolour",
            description="10 colour classes (any shape), every split (the shots too) in false colour (the photo's "
            "channels rotated, as in false-colour satellite imagery), a style never seen in pretraining: the colour "
            "names point at the wrong colours, a few target-style shots show the mapping.",
            classes=tuple(ClassSpec(c, c, {"colour": c}) for c in TASK_COLOURS),
            styles=_all_splits((("falsecolour", 1.0),)),
            templates=("a false-colour photo of a {c} shape.", "a {c} shape.", "a photo of a {c} shape.",
                       "a photo of something {c}."),
        ),
        TaskSpec(
            name="combos-100",
            description="100 colour-shape classes (10 colours x 10 shapes, held-out pairs included) in the pretraining "
            "style mix: the many-class set of the zero-shot speed benchmark (2,000 images = 20 per class).",
            classes=tuple(ClassSpec(f"{c}_{s}", f"{c} {s}", {"colour": c, "shape": s}) for c in TASK_COLOURS for s in SHAPES),
            styles=_all_splits(PRETRAIN_STYLES),
            templates=_GENERIC_TEMPLATES,
        ),
    )
}


# ----------------------------------------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _pick_weighted(rng: np.random.Generator, mix: Sequence[tuple[str, float]]) -> str:
    names = [m[0] for m in mix]
    weights = np.asarray([m[1] for m in mix], dtype=np.float64)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def sample_scene(
    rng: np.random.Generator,
    fixed: Mapping[str, str] | None = None,
    styles: Sequence[tuple[str, float]] = PRETRAIN_STYLES,
    *,
    avoid: frozenset[tuple[str, str]] = HELDOUT_COMBOS,
) -> Scene:
    """Draw a scene: attributes in ``fixed`` are kept, the rest drawn uniformly (style from ``styles``).

    Colour–shape pairs in ``avoid`` are redrawn unless ``fixed`` sets both colour and shape.
    """
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(Scene.__dataclass_fields__)
    if unknown:
        expected = list(Scene.__dataclass_fields__)
        raise ValueError(f"sample_scene: unknown attribute(s) {sorted(unknown)} in fixed; expected some of {expected}")
    while True:
        shape = fixed.get("shape") or _pick(rng, SHAPES)
        colour = fixed.get("colour") or _pick(rng, tuple(COLOURS))
        if (colour, shape) not in avoid or ("colour" in fixed and "shape" in fixed):
            break
    style = fixed.get("style") or _pick_weighted(rng, styles)
    # Backgrounds that are too close to the object colour would hide it: redraw them.
    bg_options = [b for b, rgb in BACKGROUNDS.items() if _distance(rgb, COLOURS[colour]) > 90]
    scene = Scene(
        shape=shape,
        colour=colour,
        size=fixed.get("size") or _pick(rng, tuple(SIZES)),
        texture=fixed.get("texture") or _pick(rng, TEXTURES),
        position=fixed.get("position") or _pick(rng, tuple(POSITIONS)),
        background=fixed.get("background") or _pick(rng, bg_options),
        style=style,
    )
    for name, value, allowed in (
        ("shape", scene.shape, SHAPES),
        ("colour", scene.colour, COLOURS),
        ("size", scene.size, SIZES),
        ("texture", scene.texture, TEXTURES),
        ("position", scene.position, POSITIONS),
        ("background", scene.background, BACKGROUNDS),
        ("style", scene.style, STYLES),
    ):
        if value not in allowed:
            raise ValueError(f"sample_scene: {name}={value!r} is not one of {list(allowed)}")
    return scene


def _distance(a: Sequence[int], b: Sequence[int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


# ----------------------------------------------------------------------------------------------- captions


def _article(word: str, rng: np.random.Generator | None) -> str:
    # Prompt templates write "a {c}" whatever {c} is, so pretraining captions use both "a" and "an"
    # before vowels; canonical captions (rng None) are grammatical.
    if word[0] in "aeiou" and (rng is None or rng.random() < 0.5):
        return "an"
    return "a"


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Describe ``scene`` in words.

    With ``rng`` None the caption is canonical and complete (style, size, colour, texture, shape,
    position, background). With an ``rng`` attributes are dropped at random, as web captions are
    partial, so that short prompts such as "a photo of a circle." match.
    """

    # A third of pretraining captions are short ("a star", "a sketch of a red star"), like prompt
    # templates; they also make the shape, the hardest attribute to see, decide more contrasts.
    short = rng is not None and rng.random() < 0.3

    def keep(p: float) -> bool:
        return rng is None or rng.random() < p

    # Unusual styles are named more often than photos, as people caption what is unusual.
    prefix = _STYLE_PREFIX[scene.style] if keep(0.5 if scene.style == "photo" else 0.8) else ""
    words: list[str] = []
    if not short and keep(0.6):
        words.append(scene.size)
    if keep(0.5 if short else 0.9):
        words.append(scene.colour)
    if not short and scene.style != "sketch" and scene.texture != "solid" and keep(0.6):
        words.append(scene.texture)
    words.append(scene.shape if short or keep(0.93) else "shape")
    noun_phrase = " ".join(words)
    text = f"{_article(noun_phrase, rng)} {noun_phrase}"
    if prefix:
        text = f"{prefix} {text}"
    where = POSITIONS[scene.position][2] if not short and keep(0.5) else ""
    background = not short and scene.style != "sketch" and keep(0.5)
    if where and background:
        text += f" {where} of {_article(scene.background, rng)} {scene.background} background"
    elif where:
        text += f" {where}"
    elif background:
        text += f" on {_article(scene.background, rng)} {scene.background} background"
    # Prompt templates usually end with a full stop; the canonical caption does not.
    if rng is not None and rng.random() < 0.5:
        text += "."
    return text


# Horizontal / vertical words of a spatial caption: thirds of the range an object's centre can take.
_SIDE_EDGES = (0.42, 0.58)


def centre_margin(size: str) -> float:
    """The largest margin :func:`render` keeps between the object's centre and the border (fraction of the side)."""
    return 1.12 * SIZES[size] * 1.1


def random_centre(scene: Scene, rng: np.random.Generator) -> tuple[float, float]:
    """A centre (x, y), fractions of the side, uniform over where the whole object fits (render never clips it)."""
    m = centre_margin(scene.size)
    return float(rng.uniform(m, 1 - m)), float(rng.uniform(m, 1 - m))


def position_words(centre: tuple[float, float]) -> str:
    """"at the top left", "on the right", "at the bottom", "in the centre" for a centre (x, y) in fractions."""
    x, y = centre
    horizontal = "left" if x < _SIDE_EDGES[0] else "right" if x > _SIDE_EDGES[1] else ""
    vertical = "top" if y < _SIDE_EDGES[0] else "bottom" if y > _SIDE_EDGES[1] else ""
    if vertical:
        return f"at the {vertical} {horizontal}".rstrip()
    return f"on the {horizontal}" if horizontal else "in the centre"


def spatial_caption(scene: Scene, centre: tuple[float, float], rng: np.random.Generator | None = None) -> str:
    """A pretraining caption that names where the object is (from ``centre``, see :func:`position_words`), its size
    (small / medium / large) and the count (one object) more often than :func:`caption` does.

    "one small red striped circle at the top left of a beige background". A mirrored image (x -> 1 - x) takes the
    mirrored centre, so left and right swap with the pixels. With ``rng`` None: canonical and complete."""

    def keep(p: float) -> bool:
        return rng is None or rng.random() < p

    prefix = _STYLE_PREFIX[scene.style] if keep(0.5 if scene.style == "photo" else 0.8) else ""
    words = [scene.size] if keep(0.8) else []
    if keep(0.8):
        words.append(scene.colour)
    if scene.style != "sketch" and scene.texture != "solid" and keep(0.4):
        words.append(scene.texture)
    words.append(scene.shape if keep(0.93) else "shape")
    noun_phrase = " ".join(words)
    article = "one" if rng is not None and rng.random() < 0.2 else _article(noun_phrase, rng)
    text = f"{article} {noun_phrase}"
    if prefix:
        text = f"{prefix} {text}"
    where = position_words(centre) if keep(0.85) else ""
    background = scene.style != "sketch" and keep(0.4)
    if where and background:
        text += f" {where} of {_article(scene.background, rng)} {scene.background} background"
    elif where:
        text += f" {where}"
    elif background:
        text += f" on {_article(scene.background, rng)} {scene.background} background"
    if rng is not None and rng.random() < 0.5:
        text += "."
    return text


# ----------------------------------------------------------------------------------------------- rendering


def _regular_polygon(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n)) for k in range(n)]


def _rotate(points: Sequence[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _shape_mask(shape: str, side: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    """(side, side) "L" mask of the shape, 255 inside."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    up = -math.pi / 2 + angle
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        inner = 0.55 * r
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ox, oy = cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle)
        inner = 0.85 * r
        draw.ellipse((ox - inner, oy - inner, ox + inner, oy + inner), fill=0)
    elif shape == "square":
        draw.polygon(_regular_polygon(cx, cy, r * 1.05, 4, math.pi / 4 + angle), fill=255)
    elif shape == "diamond":
        # A rhombus narrower than tall, so it is not a rotated square.
        pts = [(cx, cy - 1.1 * r), (cx + 0.65 * r, cy), (cx, cy + 1.1 * r), (cx - 0.65 * r, cy)]
        draw.polygon(_rotate(pts, cx, cy, angle), fill=255)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + 0.15 * r, 1.1 * r, 3, up), fill=255)
    elif shape == "pentagon":
        draw.polygon(_regular_polygon(cx, cy, r, 5, up), fill=255)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, angle), fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r * (1.1 if k % 2 == 0 else 0.45)
            a = up + math.pi * k / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(pts, fill=255)
    elif shape == "cross":
        t = 0.34 * r
        arms = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
        draw.polygon(_rotate([(cx + x, cy + y) for x, y in arms], cx, cy, angle), fill=255)
    else:
        raise ValueError(f"render: shape={shape!r} is not one of {list(SHAPES)}")
    return mask


def _texture(texture: str, side: int, rgb: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    """(side, side, 3) float fill: the object colour with a pattern in a lighter or darker tone."""
    base = np.broadcast_to(rgb, (side, side, 3)).astype(np.float32)
    if texture == "solid":
        return base.copy()
    light = rgb.mean() < 110
    second = rgb + (255 - rgb) * 0.55 if light else rgb * 0.5
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    period = scale * float(rng.uniform(0.8, 1.2))
    if texture == "striped":
        a = float(rng.uniform(0, math.pi))
        u = xx * math.cos(a) + yy * math.sin(a)
        pattern = (np.mod(u, period) < period / 2).astype(np.float32)
    elif texture == "dotted":
        ox, oy = rng.uniform(0, period, size=2)
        dx = np.mod(xx + ox, period) - period / 2
        dy = np.mod(yy + oy, period) - period / 2
        pattern = (dx * dx + dy * dy < (period * 0.28) ** 2).astype(np.float32)
    elif texture == "checkered":
        ox, oy = rng.uniform(0, period, size=2)
        pattern = ((np.floor((xx + ox) / (period / 1.4)) + np.floor((yy + oy) / (period / 1.4))) % 2).astype(np.float32)
    else:
        raise ValueError(f"render: texture={texture!r} is not one of {list(TEXTURES)}")
    return base * (1 - pattern[..., None]) + second.astype(np.float32) * pattern[..., None]


def _smooth_field(rng: np.random.Generator, side: int, cells: int) -> np.ndarray:
    """(side, side) low-frequency noise in [-1, 1]."""
    coarse = Image.fromarray(((rng.random((cells, cells)) * 255)).astype(np.uint8), "L")
    return np.asarray(coarse.resize((side, side), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0


def _edge(mask: Image.Image, width: int) -> Image.Image:
    """The outline of ``mask``, about ``width`` pixels thick."""
    k = 2 * max(1, width // 2) + 1
    return ImageChops.subtract(mask.filter(ImageFilter.MaxFilter(k)), mask.filter(ImageFilter.MinFilter(k)))


def render(scene: Scene, image_size: int = 64, rng: np.random.Generator | None = None, *,
           centre: tuple[float, float] | None = None) -> Image.Image:
    """Render ``scene`` as an RGB image of ``image_size`` x ``image_size``.

    ``rng`` draws the continuous jitter (exact radius, angle, offset, tones, noise); the same rng state
    gives the same pixels. Drawing happens at 2x (at least 64 px) and is downsampled, for smooth edges.
    ``centre``: the object's exact centre (x, y) as fractions of the side instead of ``scene.position`` with
    jitter (see :func:`random_centre`); the rng draws stay the same, so None renders what it always did.
    """
    if image_size < 8:
        raise ValueError(f"render: image_size={image_size} is too small; expected at least 8")
    rng = rng if rng is not None else np.random.default_rng(0)
    ss = max(2, math.ceil(64 / image_size))
    side = image_size * ss
    colour = np.asarray(COLOURS[scene.colour], dtype=np.float32)
    colour = np.clip(colour + rng.normal(0, 10, size=3), 0, 255)
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    bg = np.clip(bg + rng.normal(0, 8, size=3), 0, 255)

    r = SIZES[scene.size] * float(rng.uniform(0.9, 1.1)) * side
    px, py = centre if centre is not None else POSITIONS[scene.position][:2]
    jitter = 0.0 if centre is not None else 0.04
    margin = 1.12 * r / side
    cx = float(np.clip(px + rng.uniform(-jitter, jitter), margin, 1 - margin)) * side
    cy = float(np.clip(py + rng.uniform(-jitter, jitter), margin, 1 - margin)) * side
    angle = float(rng.uniform(-0.25, 0.25))
    mask_img = _shape_mask(scene.shape, side, cx, cy, r, angle)
    mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0

    if scene.style == "sketch":
        # Outline only, in the object colour, on paper; white objects are drawn in chalk on a board.
        paper = np.array([40, 45, 50] if scene.colour == "white" else [246, 244, 238], dtype=np.float32)
        canvas = np.broadcast_to(paper, (side, side, 3)) + 6 * _smooth_field(rng, side, 6)[..., None]
        for k in range(2):  # two slightly offset pencil strokes
            shift = rng.integers(-ss, ss + 1, size=2) if k else (0, 0)
            edge = _edge(mask_img, ss + ss // 2).transform(
                mask_img.size, Image.AFFINE, (1, 0, int(shift[0]), 0, 1, int(shift[1])), resample=Image.NEAREST
            )
            alpha = np.asarray(edge, dtype=np.float32)[..., None] / 255.0 * (1.0 if k == 0 else 0.5)
            canvas = canvas * (1 - alpha) + colour * alpha
        out = canvas
    else:
        fill = _texture(scene.texture, side, colour, rng, scale=side / 8)
        if scene.style == "cartoon":
            canvas = np.broadcast_to(bg, (side, side, 3)).astype(np.float32)
            out = canvas * (1 - mask) + fill * mask
            outline = np.asarray(_edge(mask_img, 2 * ss), dtype=np.float32)[..., None] / 255.0
            out = out * (1 - outline) + 20.0 * outline
        else:  # photo, noisy and falsecolour: soft lit background, shaded object, drop shadow
            yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
            light = 1.0 + 0.12 * (0.5 - yy)[..., None] + 0.06 * _smooth_field(rng, side, 4)[..., None]
            canvas = np.broadcast_to(bg, (side, side, 3)) * light
            shadow_img = mask_img.transform(mask_img.size, Image.AFFINE, (1, 0, -ss * 2, 0, 1, -ss * 2)).filter(
                ImageFilter.GaussianBlur(ss * 1.5)
            )
            shadow = np.asarray(shadow_img, dtype=np.float32)[..., None] / 255.0
            canvas = canvas * (1 - 0.35 * shadow)
            lx, ly = cx / side - 0.35 * r / side, cy / side - 0.35 * r / side
            shade = 1.15 - 0.9 * np.sqrt((xx - lx) ** 2 + (yy - ly) ** 2)[..., None] / max(1e-6, 2 * r / side)
            out = canvas * (1 - mask) + fill * np.clip(shade, 0.7, 1.15) * mask
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB").resize((image_size, image_size), Image.LANCZOS)

    if scene.style in ("photo", "noisy", "falsecolour"):
        sigma = float(rng.uniform(22, 38)) if scene.style == "noisy" else 3.0
        blur = float(rng.uniform(0.8, 1.4)) * image_size / 64 if scene.style == "noisy" else 0.4
        img = img.filter(ImageFilter.GaussianBlur(blur))
        arr = np.asarray(img, dtype=np.float32)
        if scene.style == "noisy":
            # washed-out colours, exposure and a colour cast: the colour names get harder to read
            grey = arr.mean(axis=2, keepdims=True)
            arr = grey + (arr - grey) * rng.uniform(0.45, 0.9)
            arr = arr * rng.uniform(0.75, 1.1) + rng.normal(0, 22, size=3)
        arr = arr + rng.normal(0, sigma, size=arr.shape)
        if scene.style == "falsecolour":
            arr = arr[..., [1, 2, 0]]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img


# ----------------------------------------------------------------------------------------------- streams and tasks


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(list(keys))


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def caption_pairs(
    n: int,
    seed: int = 0,
    *,
    styles: Sequence[tuple[str, float]] = PRETRAIN_STYLES,
    avoid: frozenset[tuple[str, str]] = HELDOUT_COMBOS,
    image_size: int = 64,
) -> Iterator[tuple[Image.Image, str]]:
    """Yield ``n`` (RGB image, partial caption) pairs for contrastive pretraining.

    Pair ``i`` depends only on (seed, i), never on the task generator's streams, so pretraining
    images are not the test images of :func:`generate_task`. Colour–shape pairs in ``avoid`` never occur.
    """
    for i in range(n):
        rng = _rng(seed, _key("pretrain"), i)
        scene = sample_scene(rng, None, styles, avoid=avoid)
        yield render(scene, image_size, rng), caption(scene, rng)


def _task_record(spec: TaskSpec, seed: int, image_size: int, counts: Mapping[str, int]) -> dict:
    return {
        "task": spec.name,
        **({"images_of": spec.images_of} if spec.images_of else {}),
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "per_class": dict(counts),
        "num_classes": len(spec.classes),
        "images": {split: counts[split] * len(spec.classes) for split in SPLITS},
        "styles": {split: dict(spec.styles[split]) for split in SPLITS},
        "description": spec.description,
    }


def generate_task(
    task: str,
    root: str | Path,
    *,
    train_per_class: int = 16,
    val_per_class: int = 4,
    test_per_class: int = 10,
    seed: int = 0,
    image_size: int = 64,
    progress: bool = True,
) -> Path:
    """Write task ``task`` of :data:`TASKS` under ``root`` and return ``root``.

    Layout: ``{train,val,test}/<class folder>/<NNNN>.png``; ``captions.jsonl`` (one
    ``{"image": "train/red_circle/0003.png", "caption": ...}`` per image); ``classnames.txt`` (class
    names in the order of the sorted class folders = label indices); ``templates.txt`` (one prompt
    template with ``{c}`` per line); ``task.json`` (written last). If ``task.json`` already records
    the same arguments nothing is written (its ``gate``, added by :mod:`mmadapters.vision.gate` when a
    CLIP first meets the task, is kept); otherwise the three split folders are rebuilt.
    Image ``i`` of a class depends only on (seed, task — or the task named by ``images_of`` —, split,
    class folder, i); another ``seed`` draws the task afresh with the same recipe.
    """
    if task not in TASKS:
        raise KeyError(f"generate_task: unknown task {task!r}; expected one of {sorted(TASKS)}")
    spec = TASKS[task]
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"generate_task: {split}_per_class={n} must be >= 0")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"generate_task: root {root} exists and is not a directory")
    record = _task_record(spec, seed, image_size, counts)
    meta = root / "task.json"
    if meta.is_file():
        try:
            recorded = json.loads(meta.read_text(encoding="utf-8"))
            if isinstance(recorded, dict) and {k: v for k, v in recorded.items() if k != "gate"} == record:
                return root
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # unreadable: regenerate
        meta.unlink()
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        if (root / split).exists():
            shutil.rmtree(root / split)

    classes = sorted(spec.classes, key=lambda c: c.folder)
    total = sum(counts.values()) * len(classes)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"generating {task}", unit="img", disable=None)  # off when not a terminal
    lines: list[str] = []
    avoid = HELDOUT_COMBOS if spec.avoid_heldout else frozenset()
    stream = _key(spec.images_of or task)
    for split_index, split in enumerate(SPLITS):
        for cls in classes:
            folder = root / split / cls.folder
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                rng = _rng(seed, stream, split_index, _key(cls.folder), i)
                scene = sample_scene(rng, cls.fixed, spec.styles[split], avoid=avoid)
                img = render(scene, image_size, rng)
                rel = f"{split}/{cls.folder}/{i:04d}.png"
                img.save(root / rel, format="PNG")
                lines.append(json.dumps({"image": rel, "caption": caption(scene)}))
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    atomic_write_bytes(root / "captions.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
    atomic_write_bytes(root / "classnames.txt", ("\n".join(c.name for c in classes) + "\n").encode("utf-8"))
    atomic_write_bytes(root / "templates.txt", ("\n".join(spec.templates) + "\n").encode("utf-8"))
    atomic_write_bytes(meta, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    return root

