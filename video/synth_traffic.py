"""Moving-shape videos with events and 4-option questions, written as SUTD-TrafficQA rows (for Tem-Adapter).

The world: three (optionally two) coloured shapes ("the red circle", "the blue square") in horizontal lanes
on a road-like background. Each clip has two events, one after the other, done by two different objects; the
object hit in a collision takes part in no other event (a clip with a collision always has three objects),
so "what happens to X" has exactly one true answer:

=========  ================================================================================================
left/right the object slides 12–20 px (at 64 px) to the left / right
grow       the object grows to 1.45–1.65 times its radius
colour     the object blinks (dim every other frame) for the first ~60% of the event, then fades to a new
           colour that no object in the clip has
collide    the object slides towards another object in its lane until they touch (at 70% of the event),
           then bounces back a little while the other one is pushed away
=========  ================================================================================================

Questions (SUTD's ``q_type`` letters):

- ``U`` (basic understanding) — "What happens to the red circle?" → "It grows bigger."
- ``R`` (reverse reasoning) — "What happened before the red circle grew bigger?" → the first event, or
  "What happened after ...?" → the second.
- ``F`` (event forecasting) — "What happens next?" The row's ``vid_filename`` is the *observed prefix*
  (``v00012_obs.mp4``): it stops a little past the middle of the second event, so its onset is visible (the
  object is sliding, growing, blinking or heading for another one) but the event completes only after the
  prefix ends. The full clip is ``v00012.mp4``; ``meta.jsonl`` records ``observed_frames``. Writing the prefix
  as its own file keeps SUTD's row format (no extra field) and makes sure no model sees the future.

Answers are balanced: the (second, first) kind pairs follow a permutation schedule over the 20 ordered pairs
(so the answers of every question type are uniform over kinds), the answer position follows a permutation
schedule per (split, q_type), and the four options nearly always have four *different* event kinds
(distractors are events of the other kinds, on objects of the clip, that are clearly false in the asked
window, e.g. the first event as a distractor of "what happens next"), so neither the position nor the
wording of an option tells the answer. Whether an option is true is decided from the
simulated tracks (displacement, radius, colour, contact), not from the script of events.

Layout written by :func:`generate_trafficqa`::

    videos/v00000.mp4, videos/v00000_obs.mp4        (PyAV, libx264 yuv420p, 8 fps)
    frames/v00000/00001.png ...                     (only with frame_dirs=True)
    annotations/R2_all.jsonl, R2_train.jsonl, R2_test.jsonl
    meta.jsonl                                      (per record: events, observed frames, full video)
    dataset.json                                    (written last)

Each annotation file is SUTD-TrafficQA's: the first line is the header list ``["record_id", "vid_id",
"vid_filename", "perspective", "q_body", "q_type", "option0", "option1", "option2", "option3", "answer"]``, every
other line a JSON list in that order; ``answer`` is the index 0–3 of the correct option. ``vid_id`` is unique per
video file (full clip ``2*i``, prefix ``2*i+1``); ``perspective`` is 3 (third person).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmadapters.io import atomic_write_bytes

from .synth import (
    FPS,
    balanced_schedule,
    encode_mp4,
    key,
    prepare_root,
    rng_for,
    run_jobs,
    write_dataset_record,
    write_frame_dir,
    write_lines,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HEADER",
    "KINDS",
    "SHAPES",
    "Clip",
    "Event",
    "Fact",
    "Obj",
    "Track",
    "describe",
    "generate_trafficqa",
    "render",
    "sample_clip",
    "simulate",
    "truth",
]

GENERATOR_VERSION = 1  # bump when clips or questions change: a folder of another version is rewritten
HEADER = ["record_id", "vid_id", "vid_filename", "perspective", "q_body", "q_type", "option0", "option1", "option2", "option3", "answer"]
KINDS: tuple[str, ...] = ("left", "right", "grow", "colour", "collide")
Q_TYPES: tuple[str, ...] = ("U", "R", "F")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "cyan": (40, 205, 215),
    "blue": (40, 80, 220),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "asphalt": (78, 80, 86),
    "night": (28, 32, 46),
    "grass": (84, 128, 70),
    "sand": (190, 172, 130),
}
LANES = (0.22, 0.5, 0.78)  # lane centres as fractions of the frame height
_BLINK_DIM = 0.45
_CONTACT_AT = 0.7  # fraction of a collide event at which the two objects touch
_BLEND_FROM = 0.6  # fraction of a colour event after which the colour fades to the new one
_OBSERVED_AT = 0.55  # fraction of the second event shown in the "what happens next" prefix


@dataclass(frozen=True)
class Obj:
    """One shape: named "the <colour> <shape>" by its starting colour. Positions in pixels."""

    shape: str
    colour: str
    lane: int
    x: float
    r: float

    @property
    def name(self) -> str:
        return f"the {self.colour} {self.shape}"


@dataclass(frozen=True)
class Event:
    """One event over frames ``[start, end)``. ``amount``: px for moves and for the push of a collision,
    radius factor for grow. ``target``: the other object of a collision; ``colour``: the new colour."""

    kind: str
    actor: int
    start: int
    end: int
    amount: float = 0.0
    target: int | None = None
    colour: str | None = None


@dataclass(frozen=True)
class Fact:
    """A statement about the clip ("the red circle moves to the left"), true or false in a time window."""

    kind: str
    actor: int
    target: int | None = None
    colour: str | None = None


@dataclass(frozen=True)
class Clip:
    """A clip: objects, two events in time order, background, frame count, size, frames shown by the prefix."""

    objects: tuple[Obj, ...]
    events: tuple[Event, Event]
    background: str
    num_frames: int
    size: int
    observed: int


@dataclass
class Track:
    """Per-frame state: ``x`` (T, K) centre x in px, ``y`` (K,) lane centre y, ``r`` (T, K) radius,
    ``rgb`` (T, K, 3) float colour, ``bright`` (T, K) brightness factor (blinking)."""

    x: np.ndarray
    y: np.ndarray
    r: np.ndarray
    rgb: np.ndarray
    bright: np.ndarray


def fact_of(event: Event) -> Fact:
    return Fact(event.kind, event.actor, event.target, event.colour)


# ----------------------------------------------------------------------------------------------- simulation


def _progress(t: np.ndarray, start: int, end: int) -> np.ndarray:
    return np.clip((t - start) / max(1, end - 1 - start), 0.0, 1.0)


def contact_frame(event: Event) -> int:
    """The frame at which the two objects of a collide event touch."""
    return event.start + int(round(_CONTACT_AT * (event.end - 1 - event.start)))


def simulate(clip: Clip) -> Track:
    """Run the clip's events on its objects and return the per-frame :class:`Track`."""
    t_count, k = clip.num_frames, len(clip.objects)
    t = np.arange(t_count)
    x = np.tile(np.array([o.x for o in clip.objects], dtype=np.float64), (t_count, 1))
    r = np.tile(np.array([o.r for o in clip.objects], dtype=np.float64), (t_count, 1))
    rgb = np.tile(np.array([COLOURS[o.colour] for o in clip.objects], dtype=np.float64), (t_count, 1, 1))
    bright = np.ones((t_count, k))
    y = np.array([LANES[o.lane] * clip.size for o in clip.objects], dtype=np.float64)
    for ev in clip.events:
        s, a = ev.start, ev.actor
        after = t >= s
        p = _progress(t, ev.start, ev.end)
        if ev.kind in ("left", "right"):
            sign = -1.0 if ev.kind == "left" else 1.0
            x[after, a] = x[s, a] + sign * ev.amount * p[after]
        elif ev.kind == "grow":
            r[after, a] = r[s, a] * (1.0 + (ev.amount - 1.0) * p[after])
        elif ev.kind == "colour":
            blinking = after & (p < _BLEND_FROM) & ((t - s) % 2 == 1)
            bright[blinking, a] = _BLINK_DIM
            alpha = np.clip((p - _BLEND_FROM) / (1.0 - _BLEND_FROM) * 1.6, 0.0, 1.0)
            new = np.array(COLOURS[ev.colour], dtype=np.float64)
            rgb[after, a] = rgb[s, a] + (new - rgb[s, a]) * alpha[after, None]
        elif ev.kind == "collide":
            b = ev.target
            direction = 1.0 if x[s, b] > x[s, a] else -1.0
            gap0 = abs(x[s, b] - x[s, a]) - (r[s, a] + r[s, b])
            c = contact_frame(ev)
            approach = np.clip((t - s) / max(1, c - s), 0.0, 1.0)
            apart = np.clip((t - c) / max(1, ev.end - 1 - c), 0.0, 1.0)
            # the bounce stays under 1.5 px, so "moves the other way" is clearly false
            x[after, a] = x[s, a] + direction * (gap0 * approach[after] - 0.12 * ev.amount * apart[after])
            x[after, b] = x[s, b] + direction * ev.amount * apart[after]
        else:
            raise ValueError(f"simulate: unknown event kind {ev.kind!r}; expected one of {KINDS}")
    return Track(x=x, y=y, r=r, rgb=rgb, bright=bright)


def _gaps(track: Track) -> np.ndarray:
    """(T, K, K) distance between the objects' outlines (circle approximation); +inf on the diagonal."""
    dx = track.x[:, :, None] - track.x[:, None, :]
    dy = (track.y[:, None] - track.y[None, :])[None]
    gap = np.sqrt(dx**2 + dy**2) - (track.r[:, :, None] + track.r[:, None, :])
    k = track.x.shape[1]
    gap[:, np.arange(k), np.arange(k)] = np.inf
    return gap


def truth(fact: Fact, track: Track, window: tuple[int, int], size: int = 64) -> str:
    """Whether ``fact`` holds in frames ``[window)``: "true", "false", or "unclear" (never used as an option).

    Decided from the track: slide of at least 5 px (at 64 px) for moves, radius x1.2 for grow, a colour change
    to that colour for colour, contact for collide; "false" needs a clear margin (under 1.5 px, x1.04, no
    colour or brightness change, never closer than 2 px).
    """
    w0, w1 = window
    s = size / 64.0
    a = fact.actor
    if fact.kind in ("left", "right"):
        xs = track.x[w0:w1, a] - track.x[w0, a]
        moved = float(xs.max() if fact.kind == "right" else -xs.min())
        return "true" if moved >= 5 * s else "false" if moved < 1.5 * s else "unclear"
    if fact.kind == "grow":
        factor = float(track.r[w0:w1, a].max() / track.r[w0, a])
        return "true" if factor >= 1.2 else "false" if factor < 1.04 else "unclear"
    if fact.kind == "colour":
        changed = (np.abs(track.rgb[w0:w1, a] - track.rgb[w0, a]) > 0.5).any() or (track.bright[w0:w1, a] != 1.0).any()
        if not changed:
            return "false"
        end = track.rgb[w1 - 1, a]
        return "true" if np.abs(end - np.array(COLOURS[fact.colour])).max() < 1.0 else "unclear"
    if fact.kind == "collide":
        gap = float(_gaps(track)[w0:w1, a, fact.target].min())
        return "true" if gap <= 0.5 * s else "false" if gap > 2.0 * s else "unclear"
    raise ValueError(f"truth: unknown fact kind {fact.kind!r}; expected one of {KINDS}")


# ----------------------------------------------------------------------------------------------- sampling


def _timeline(rng: np.random.Generator, t: int) -> tuple[int, int, int, int, int]:
    """(start1, end1, start2, end2, observed) for a clip of ``t`` frames."""
    s1 = max(1, int(round(rng.uniform(0.03, 0.09) * t)))
    d1 = max(4, int(round(rng.uniform(0.22, 0.30) * t)))
    s2 = s1 + d1 + max(1, int(round(rng.uniform(0.03, 0.08) * t)))
    e2 = t - int(round(rng.uniform(0.0, 0.08) * t))
    observed = s2 + int(math.floor(_OBSERVED_AT * (e2 - 1 - s2) + 0.5))
    return s1, s1 + d1, s2, e2, observed


def _valid(clip: Clip, track: Track) -> bool:
    s = clip.size / 64.0
    if (track.x - track.r < 1).any() or (track.x + track.r > clip.size - 2).any():
        return False
    gaps = _gaps(track)
    collide = [ev for ev in clip.events if ev.kind == "collide"]
    pair = {collide[0].actor, collide[0].target} if collide else set()
    k = len(clip.objects)
    for i in range(k):
        for j in range(i + 1, k):
            if {i, j} == pair:
                ev = collide[0]
                g0 = gaps[ev.start, i, j]
                if not (8 * s <= g0 <= 26 * s) or gaps[: ev.start, i, j].min() < 3 * s:
                    return False
                if ev.end < clip.num_frames and gaps[ev.end :, i, j].min() < 3 * s:  # they meet once only
                    return False
            elif gaps[:, i, j].min() < 2.5 * s:
                return False
    return True


def _make_event(rng: np.random.Generator, kind: str, actor: int, start: int, end: int, scale: float, new_colour: str,
                target: int | None) -> Event:
    if kind in ("left", "right"):
        return Event(kind, actor, start, end, amount=float(rng.uniform(12, 20) * scale))
    if kind == "grow":
        return Event(kind, actor, start, end, amount=float(rng.uniform(1.45, 1.65)))
    if kind == "colour":
        return Event(kind, actor, start, end, colour=new_colour)
    return Event(kind, actor, start, end, amount=float(rng.uniform(6, 9) * scale), target=target)


def sample_clip(rng: np.random.Generator, second_kind: str, first_kind: str | None = None, *, size: int = 64,
                num_frames: int = 24, objects: tuple[int, int] = (3, 3)) -> Clip:
    """Draw a valid clip whose events have kinds ``first_kind`` (drawn among the others when None) and
    ``second_kind``. Only the layout is redrawn until the tracks are valid, so the kinds keep their balance."""
    if num_frames < 16:
        raise ValueError(f"sample_clip: num_frames={num_frames}; need at least 16 for two events and a prefix")
    lo, hi = objects
    if not 2 <= lo <= hi <= 3:
        raise ValueError(f"sample_clip: objects={objects}; expected 2 <= MIN <= MAX <= 3")
    if second_kind not in KINDS or (first_kind is not None and first_kind not in KINDS) or first_kind == second_kind:
        raise ValueError(f"sample_clip: kinds ({first_kind!r}, {second_kind!r}) must be two different values of {KINDS}")
    if first_kind is None:
        first_kind = [q for q in KINDS if q != second_kind][int(rng.integers(len(KINDS) - 1))]
    s = size / 64.0
    for _ in range(500):
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        bg = np.array(BACKGROUNDS[background], dtype=np.float64)
        usable = [c for c, rgb in COLOURS.items() if np.linalg.norm(np.subtract(rgb, bg)) > 110]
        k = 3 if "collide" in (first_kind, second_kind) else int(rng.integers(lo, hi + 1))
        colours = [usable[i] for i in rng.permutation(len(usable))[: k + 1]]  # k objects + one new colour
        actors = rng.permutation(k)[:2]  # second event's actor, first event's actor
        a2, a1 = int(actors[0]), int(actors[1])
        lanes = list(rng.permutation(len(LANES))[:k])
        targets: dict[int, int] = {}
        for kind, actor in ((second_kind, a2), (first_kind, a1)):
            if kind == "collide":
                target = next(j for j in range(k) if j not in (a1, a2))  # the object with no event of its own
                targets[actor] = target
                lanes[target] = lanes[actor]
        objs = tuple(
            Obj(
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                colour=colours[j],
                lane=int(lanes[j]),
                x=float(rng.uniform(9 * s, size - 9 * s)),
                r=float(rng.uniform(5.5, 7.5) * s),
            )
            for j in range(k)
        )
        s1, e1, s2, e2, observed = _timeline(rng, num_frames)

        events = (
            _make_event(rng, first_kind, a1, s1, e1, s, colours[k], targets.get(a1)),
            _make_event(rng, second_kind, a2, s2, e2, s, colours[k], targets.get(a2)),
        )
        clip = Clip(objs, events, background, num_frames, size, observed)
        if events[1].kind == "collide" and contact_frame(events[1]) < observed + 1:
            continue
        track = simulate(clip)
        if _valid(clip, track):
            return clip
    raise RuntimeError(f"sample_clip: no valid clip with second event {second_kind!r} in 500 tries (size={size})")


# ----------------------------------------------------------------------------------------------- rendering


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    # Every shape spans [cx - r, cx + r] horizontally, so contact at |dx| = r1 + r2 looks like contact.
    if shape == "square":
        h = 0.9 * r
        return [(cx - r, cy - h), (cx + r, cy - h), (cx + r, cy + h), (cx - r, cy + h)]
    if shape == "triangle":
        return [(cx - r, cy + 0.85 * r), (cx + r, cy + 0.85 * r), (cx, cy - 1.05 * r)]
    if shape == "diamond":
        return [(cx - r, cy), (cx, cy - 1.2 * r), (cx + r, cy), (cx, cy + 1.2 * r)]
    n = 28
    return [(cx + r * math.cos(2 * math.pi * i / n), cy + r * math.sin(2 * math.pi * i / n)) for i in range(n)]


def render(clip: Clip, track: Track, rng: np.random.Generator) -> np.ndarray:
    """Frames of the clip: (T, size, size, 3) uint8 RGB (4x supersampled shapes, light sensor noise)."""
    ss, size = 4, clip.size
    side = size * ss
    bg = np.array(BACKGROUNDS[clip.background], dtype=np.float64)
    yy = np.linspace(-0.5, 0.5, side)[:, None, None]
    base = Image.fromarray(np.clip(np.broadcast_to(bg * (1.0 - 0.12 * yy), (side, side, 3)), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(base)
    mark = tuple(int(v) for v in np.clip(bg + 55, 0, 255))
    dash = 6 * ss
    for boundary in (0.36, 0.64):  # dashed lane marks between the lanes
        yb = boundary * side
        for x0 in range(int(rng.integers(0, 2 * dash)) - 2 * dash, side, 2 * dash):
            draw.rectangle((x0, yb - ss // 2, x0 + dash, yb + ss // 2), fill=mark)
    frames = np.empty((clip.num_frames, size, size, 3), dtype=np.uint8)
    order = np.argsort([o.lane for o in clip.objects], kind="stable")
    for f in range(clip.num_frames):
        img = base.copy()
        draw = ImageDraw.Draw(img)
        for j in order:
            o = clip.objects[j]
            colour = tuple(int(v) for v in np.clip(track.rgb[f, j] * track.bright[f, j], 0, 255))
            edge = tuple(int(v * 0.35) for v in colour)
            pts = _shape_points(o.shape, track.x[f, j] * ss + ss / 2, track.y[j] * ss + ss / 2, track.r[f, j] * ss)
            draw.polygon(pts, fill=colour, outline=edge, width=ss)
        small = np.asarray(img.resize((size, size), Image.BOX), dtype=np.float64)
        frames[f] = np.clip(small + rng.normal(0.0, 2.0, small.shape), 0, 255).astype(np.uint8)
    return frames


# ----------------------------------------------------------------------------------------------- language


def _cap(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def describe(fact: Fact, objects: Sequence[Obj], *, past: bool = False, pronoun: bool = False) -> str:
    """The statement as a sentence without the final stop: "the red circle moves to the left" (or "it ...")."""
    subject = "it" if pronoun else objects[fact.actor].name
    if fact.kind in ("left", "right"):
        verb = ("moved" if past else "moves") + f" to the {fact.kind}"
    elif fact.kind == "grow":
        verb = "grew bigger" if past else "grows bigger"
    elif fact.kind == "colour":
        verb = ("turned " if past else "turns ") + fact.colour
    elif fact.kind == "collide":
        verb = ("collided with " if past else "collides with ") + objects[fact.target].name
    else:
        raise ValueError(f"describe: unknown fact kind {fact.kind!r}")
    return f"{subject} {verb}"


def _candidates(clip: Clip, actors: Sequence[int]) -> list[Fact]:
    k = len(clip.objects)
    used = {o.colour for o in clip.objects}
    new_colours = sorted({ev.colour for ev in clip.events if ev.colour} | (set(COLOURS) - used))
    facts: list[Fact] = []
    for a in actors:
        facts += [Fact("left", a), Fact("right", a), Fact("grow", a)]
        facts += [Fact("colour", a, colour=c) for c in new_colours]
        facts += [Fact("collide", a, target=b) for b in range(k) if b != a]
    return facts


def _distractors(answer: Fact, pool: list[Fact], rng: np.random.Generator, forced: Fact | None = None) -> list[Fact]:
    """Three false facts: of kinds other than the answer's and different from each other when possible."""
    chosen: list[Fact] = [forced] if forced is not None else []
    while len(chosen) < 3:
        taken = {answer.kind} | {f.kind for f in chosen}
        fresh = [f for f in pool if f.kind not in taken and f not in chosen]
        other = [f for f in pool if f.kind != answer.kind and f not in chosen]
        anything = [f for f in pool if f not in chosen]
        options = fresh or other or anything
        if not options:
            raise RuntimeError("_distractors: not enough false statements for a question")
        if fresh:  # a uniform kind first, then a uniform statement of it: kinds stay balanced
            kinds = sorted({f.kind for f in fresh})
            kind = kinds[int(rng.integers(len(kinds)))]
            options = [f for f in fresh if f.kind == kind]
        chosen.append(options[int(rng.integers(len(options)))])
    return chosen


def _questions(clip: Clip, track: Track, rng: np.random.Generator, q_types: Sequence[str], u_event: int, r_form: int) -> list[dict]:
    """One question per q_type: body, answer text, three distractor texts, and which video it needs."""
    objs, (e1, e2) = clip.objects, clip.events
    full = (0, clip.num_frames)
    everyone = range(len(objs))
    out = []
    for q in q_types:
        if q == "U":
            ev = clip.events[u_event]
            answer = fact_of(ev)
            pool = [f for f in _candidates(clip, [ev.actor]) if f != answer and truth(f, track, full, clip.size) == "false"]
            wording = ("What happens to {x}?", "What does {x} do?")[int(rng.integers(2))]
            body = wording.format(x=objs[ev.actor].name)
            texts = [_cap(describe(f, objs, pronoun=True)) for f in [answer, *_distractors(answer, pool, rng)]]
            window, video = full, "full"
        elif q == "R":
            if r_form == 0:
                answer, about, body = fact_of(e1), fact_of(e2), "What happened before {e}?"
            else:
                answer, about, body = fact_of(e2), fact_of(e1), "What happened after {e}?"
            body = body.format(e=describe(about, objs, past=True))
            pool = [f for f in _candidates(clip, everyone) if f not in (answer, about) and truth(f, track, full, clip.size) == "false"]
            texts = [_cap(describe(f, objs, past=True)) for f in [answer, *_distractors(answer, pool, rng)]]
            window, video = full, "full"
        elif q == "F":
            answer = fact_of(e2)
            window = (clip.observed, clip.num_frames)
            pool = [f for f in _candidates(clip, everyone) if f != answer and truth(f, track, window, clip.size) == "false"]
            first = fact_of(e1)
            forced = first if first in pool else None  # what already happened is the hardest wrong "next"
            body = ("What happens next?", "What will happen next?")[int(rng.integers(2))]
            texts = [_cap(describe(f, objs)) for f in [answer, *_distractors(answer, pool, rng, forced)]]
            # the answer is the event under way at the cut: it holds over the event and ends after the cut
            window, video = (e2.start, clip.num_frames), "observed"
            if e2.end <= clip.observed:
                raise RuntimeError(f"internal: the second event ends at frame {e2.end}, before the cut {clip.observed}")
        else:
            raise ValueError(f"q_types: unknown question type {q!r}; expected some of {Q_TYPES}")
        if truth(answer, track, window, clip.size) != "true":
            raise RuntimeError(f"internal: the answer {answer} of a {q} question is not true in frames {window}")
        if len(set(texts)) != 4:
            raise RuntimeError(f"internal: repeated option in a {q} question: {texts}")
        out.append({"q_type": q, "q_body": body, "answer_text": texts[0], "distractors": texts[1:], "video": video,
                    "answer_kind": answer.kind})
    return out


# ----------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Job:
    root: str
    index: int
    seed: int
    size: int
    num_frames: int
    codec: str
    objects: tuple[int, int]
    q_types: tuple[str, ...]
    frame_dirs: bool
    second_kind: str
    first_kind: str
    u_event: int
    r_form: int


def _make_clip(job: _Job) -> dict:
    """Sample, render and write clip ``job.index``; returns its questions and metadata."""
    rng = rng_for(job.seed, key("trafficqa"), job.index)
    clip = sample_clip(rng, job.second_kind, job.first_kind, size=job.size, num_frames=job.num_frames, objects=job.objects)
    track = simulate(clip)
    frames = render(clip, track, rng)
    root, stem = Path(job.root), f"v{job.index:05d}"
    atomic_write_bytes(root / "videos" / f"{stem}.mp4", encode_mp4(frames, codec=job.codec))
    atomic_write_bytes(root / "videos" / f"{stem}_obs.mp4", encode_mp4(frames[: clip.observed], codec=job.codec))
    if job.frame_dirs:
        write_frame_dir(root / "frames" / stem, frames)
        write_frame_dir(root / "frames" / f"{stem}_obs", frames[: clip.observed])
    questions = _questions(clip, track, rng, job.q_types, job.u_event, job.r_form)
    events = [
        {**{k: v for k, v in asdict(ev).items() if v is not None}, "text": describe(fact_of(ev), clip.objects)}
        for ev in clip.events
    ]
    return {
        "clip": job.index,
        "stem": stem,
        "num_frames": clip.num_frames,
        "observed_frames": clip.observed,
        "objects": [asdict(o) | {"name": o.name} for o in clip.objects],
        "background": clip.background,
        "events": events,
        "questions": questions,
    }


def generate_trafficqa(
    out: str | os.PathLike,
    *,
    n: int,
    seed: int = 0,
    size: int = 64,
    num_frames: int = 24,
    codec: str = "libx264",
    objects: tuple[int, int] = (3, 3),
    test_fraction: float = 0.2,
    q_types: Sequence[str] = Q_TYPES,
    frame_dirs: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write ``n`` clips with ``len(q_types)`` questions each under ``out`` (layout in the module docstring).

    Clip ``i`` depends only on (seed, i) and the balanced schedules; the output is the same for any ``workers``.
    Returns the output folder. An output folder whose ``dataset.json`` records the same arguments is kept.
    """
    if n < 1:
        raise ValueError(f"generate_trafficqa: n={n}; need at least one clip")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"generate_trafficqa: test_fraction={test_fraction}; expected 0 <= value < 1")
    q_types = tuple(q_types)
    if not q_types or any(q not in Q_TYPES for q in q_types) or len(set(q_types)) != len(q_types):
        raise ValueError(f"generate_trafficqa: q_types={q_types}; expected distinct values among {Q_TYPES}")
    if size % 2 or size < 32:
        raise ValueError(f"generate_trafficqa: size={size}; expected an even size >= 32")
    record = {
        "world": "trafficqa",
        "generator_version": GENERATOR_VERSION,
        "arguments": {"n": n, "seed": seed, "size": size, "num_frames": num_frames, "codec": codec, "objects": list(objects),
                      "test_fraction": test_fraction, "q_types": list(q_types), "frame_dirs": frame_dirs},
    }
    root, done = prepare_root(out, record, ("videos", "frames", "annotations", "meta.jsonl"))
    if done:
        return root
    (root / "videos").mkdir(parents=True, exist_ok=True)

    # (second, first) kind pairs from a permutation schedule: both kinds are balanced over the clips
    pairs = [(a, b) for a in KINDS for b in KINDS if a != b]
    pair_of = balanced_schedule(n, len(pairs), rng_for(seed, key("kind-pairs")))
    second = np.array([KINDS.index(pairs[int(p)][0]) for p in pair_of])
    u_event = balanced_schedule(n, 2, rng_for(seed, key("u-event")))
    r_form = balanced_schedule(n, 2, rng_for(seed, key("r-form")))
    jobs = [
        _Job(str(root), i, seed, size, num_frames, codec, tuple(objects), q_types, frame_dirs, *pairs[int(pair_of[i])],
             int(u_event[i]), int(r_form[i]))
        for i in range(n)
    ]
    clips: list[dict] = run_jobs(_make_clip, jobs, workers, "trafficqa clips", progress)

    n_test = int(round(n * test_fraction))
    test_clips = set(int(i) for i in rng_for(seed, key("test-split")).permutation(n)[:n_test])
    # Answer positions: a permutation schedule per (split, q_type), so every index is (almost) equally often right.
    slots = {
        (split, q): balanced_schedule(n, 4, rng_for(seed, key(f"answers-{split}-{q}"))) for split in ("train", "test") for q in q_types
    }
    used = {k: 0 for k in slots}
    rows = {"train": [], "test": []}
    meta_lines: list[str] = []
    record_id = 0
    for c in clips:
        split = "test" if c["clip"] in test_clips else "train"
        order_rng = rng_for(seed, key("option-order"), c["clip"])
        for q in c["questions"]:
            slot = int(slots[split, q["q_type"]][used[split, q["q_type"]]])
            used[split, q["q_type"]] += 1
            distractors = [q["distractors"][i] for i in order_rng.permutation(3)]
            options = distractors[:slot] + [q["answer_text"]] + distractors[slot:]
            observed = q["video"] == "observed"
            vid_filename = f"{c['stem']}_obs.mp4" if observed else f"{c['stem']}.mp4"
            vid_id = 2 * c["clip"] + int(observed)
            rows[split].append([record_id, vid_id, vid_filename, 3, q["q_body"], q["q_type"], *options, slot])
            meta_lines.append(json.dumps({
                "record_id": record_id, "split": split, "clip": c["clip"], "q_type": q["q_type"], "vid_filename": vid_filename,
                "full_video": f"{c['stem']}.mp4", "num_frames": c["num_frames"],
                "observed_frames": c["observed_frames"] if observed else c["num_frames"], "answer_kind": q["answer_kind"],
                "objects": c["objects"], "background": c["background"], "events": c["events"],
            }))
            record_id += 1

    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    every = sorted(rows["train"] + rows["test"], key=lambda row: row[0])
    for name, split_rows in (("R2_all", every), ("R2_train", rows["train"]), ("R2_test", rows["test"])):
        write_lines(ann / f"{name}.jsonl", [json.dumps(HEADER)] + [json.dumps(row) for row in split_rows])
    write_lines(root / "meta.jsonl", meta_lines)

    answers = np.array([row[-1] for row in every])
    record["summary"] = {
        "clips": n,
        "records": {"all": len(every), "train": len(rows["train"]), "test": len(rows["test"])},
        "answer_index_counts": [int((answers == i).sum()) for i in range(4)],
        "second_event_kinds": {kind: int((second == i).sum()) for i, kind in enumerate(KINDS)},
        "fps": FPS,
        "frame_size": size,
    }
    write_dataset_record(root, record)
    return root
