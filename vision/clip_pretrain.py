"""CLIP contrastive pretraining on generated data, on the training engine: ``mmadapters train clip-pretrain``.

    mmadapters train clip-pretrain --config configs/clip-pretrain.yaml --set trainer.max_minutes=22
    mmadapters train clip-pretrain --config configs/clip-pretrain.yaml --resume      # after a crash

An open_clip ``CLIP`` built from ``model_cfg`` (deep-merged over :data:`MODEL_CFG`, the shipped tiny CLIP's; the
tokenizer is open_clip's bundled SimpleTokenizer) or loaded from ``init`` (a ``local-dir:`` folder); every
parameter trains. ``recipe.data`` picks the pools, rendered once and re-captioned on every step:

- ``stills`` (:mod:`~mmadapters.vision.synth`, pretraining style mix, held-out colour–shape pairs never shown,
  captions of :func:`~mmadapters.vision.synth.caption`). An *item* is ``group`` scenes that share colour, style,
  size, texture and background and differ in shape: hard negatives only the shape tells apart (without them the
  tiny model matches captions by colour and never learns shapes).
- ``video-frames`` (clips of :mod:`mmadapters.video.synth_traffic` from a stream of their own, after the mp4 round
  trip the QA videos get; :func:`frame_caption` names the state in one frame, never an event). An item is
  ``frames_per_clip`` frames of one clip, each with its mirror image (``flip``) whose caption makes the same
  random choices with mirrored position words: a hard negative only the position tells apart. (Several frames
  of one clip without mirrors taught two 11-minute runs nothing about position: a partial caption of one frame
  is usually true of the others.)
- ``both``: items drawn from the union of the two pools.

``trainer.batch_size`` counts items (16 groups of 8 stills = 128 images; ``grad_accum_steps`` would shrink the
set of in-batch negatives). Equal captions in a batch are positives of each other. Caption draws are seeded by
``(trainer.seed, the batch's item indices)``, so ``--resume`` repeats them. Loss: :func:`clip_loss`; an image–image
term (SLIP: two augmented views) goes beside it in :meth:`ClipPretrainTask.loss`, its views made in ``get_batch``.

Validation (picks ``best/``): zero-shot top-1 on the test split of each of ``eval_tasks`` (``generate_task`` with
``eval_seed``), ``zeroshot_acc1`` their mean; with ``probe_clips``, :func:`linear_probes` on held-out clips.
``best/`` and ``last/`` are open_clip ``local-dir:`` folders: ``open_clip_config.json`` (``model_cfg``,
``preprocess_cfg``, under ``mmadapters`` the training record) and fp16 ``open_clip_model.safetensors``.

Optimizer as open_clip's (configs/clip-pretrain.yaml): AdamW betas 0.9/0.98, eps 1e-6, no weight decay on norms,
biases, embeddings and the temperature (the engine's ``trainer.no_decay``, ``adam_betas``, ``adam_eps``).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmadapters.training.recipe import Recipe

from . import synth

RECIPE_NAME = "clip-pretrain"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
MODEL_CFG: dict[str, Any] = {
    "embed_dim": 96,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 96, "head_width": 32, "patch_size": 8},
    # vocab_size 49408 = open_clip's SimpleTokenizer; the token table (49408 x 64) dominates the file size.
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
EVAL_TASKS = ("synth-shapes", "shapes-sketch", "colours-noisy", "combos-heldout", "combos-100")
MAX_LOGIT_SCALE = math.log(100)
NUM_FRAMES = 24  # frames of a pretraining clip
PRETRAIN_STREAM, HELDOUT_STREAM = "video-clip-pretrain", "video-clip-heldout"


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, same: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE with soft targets.

    ``image_features``, ``text_features``: (B, D) L2-normalized; ``logit_scale``: () the exp of the learnt
    temperature; ``same``: (B, B) 1.0 where captions i and j are equal (diagonal included), so an image's target
    is spread evenly over every caption equal to its own. With ``same`` the identity this is CLIP's loss."""
    logits = logit_scale * image_features @ text_features.T  # (B, B): image i against caption j
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def simclr_loss(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR's NT-Xent as SLIP uses it (temperature 0.1): ``z1``, ``z2`` (N, D) head outputs of two views of N
    images (normalized here). Each of the 2N views must pick the other view of its image among the other 2N - 1."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = len(z1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


def image_mlp(width: int, hidden: int = 512, out: int = 128) -> nn.Sequential:
    """SLIP's image-SSL head (Linear, BN, ReLU, Linear, BN, ReLU, Linear; theirs 4096 wide, 256 out) on the vision
    trunk's pooled output (before CLIP's projection): (N, width) -> (N, out). Trained, never shipped."""
    return nn.Sequential(nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


def vision_trunk(visual: nn.Module, images: Tensor) -> Tensor:
    """open_clip's pooled vision output before ``visual.proj``: (N, 3, H, W) -> (N, width)."""
    proj = visual.proj
    try:  # open_clip's VisionTransformer skips the projection when proj is None
        visual.proj = None
        return visual(images)
    finally:
        visual.proj = proj


def object_crops(images: Tensor, boxes: np.ndarray, rng: np.random.Generator, min_side: float = 0.75) -> Tensor:
    """A random square crop of each image that holds its object's box, resized back (bilinear); no flip.

    ``images`` (N, 3, H, W), ``boxes`` (N, 4) x0, y0, x1, y1 fractions of the side -> (N, 3, H, W). The side is
    uniform in [max(min_side, box width, box height), 1] and the offset uniform over the crops that hold the box:
    SimCLR's random resized crop, bounded so that the object stays whole and moves by at most 1 - side. No flip: a
    mirror would teach the features that left and right are the same, which position captions and the x-probe need
    told apart. No colour jitter: colour names a class here."""
    theta = torch.zeros(len(images), 2, 3)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        side = rng.uniform(max(min_side, x1 - x0, y1 - y0), 1.0)
        ox, oy = rng.uniform(max(0.0, x1 - side), min(x0, 1.0 - side)), rng.uniform(max(0.0, y1 - side), min(y0, 1.0 - side))
        theta[k] = torch.tensor([[side, 0.0, 2 * ox + side - 1], [0.0, side, 2 * oy + side - 1]])
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_tensor(images: np.ndarray) -> Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float normalized as the model's preprocess does."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------------- stills


def render_stills(size: int, seed: int, group: int = 8, image_size: int = 64, progress: bool = False,
                  spatial: bool = False) -> tuple[np.ndarray, list[list[synth.Scene]], np.ndarray | None]:
    """``size // group`` groups of pretraining scenes: images (G, group, H, W, 3) uint8, each group's scenes and
    the objects' centres (G, group, 2) as fractions of the side (``spatial``) or None.

    A group shares colour, style, size, texture and background and differs in shape (see the module docstring).
    ``spatial``: each object at a centre of its own (:func:`~mmadapters.vision.synth.random_centre`, every x and y
    the object fits at, not the five positions of ``caption``), which ``spatial_caption`` names; without it the
    pool is what it always was, draw for draw."""
    images = np.empty((size // group, group, image_size, image_size, 3), dtype=np.uint8)
    centres = np.empty((size // group, group, 2)) if spatial else None
    scenes: list[list[synth.Scene]] = []
    for g in tqdm(range(len(images)), desc="rendering stills", disable=not progress, leave=False):
        rng = np.random.default_rng([seed, synth._key("pretrain"), g])
        base = synth.sample_scene(rng, None, synth.PRETRAIN_STYLES)
        allowed = [s for s in synth.SHAPES if (base.colour, s) not in synth.HELDOUT_COMBOS]
        row = []
        for j, shape in enumerate(rng.choice(allowed, size=group, replace=False)):
            fixed = {"shape": str(shape), "colour": base.colour, "style": base.style, "size": base.size,
                     "texture": base.texture, "background": base.background}
            row.append(synth.sample_scene(rng, fixed))
            centre = None
            if centres is not None:
                centre = centres[g, j] = synth.random_centre(row[-1], rng)
            images[g, j] = np.asarray(synth.render(row[-1], image_size, rng, centre=centre))
        scenes.append(row)
    return images, scenes, centres


@dataclass
class Stills:
    """Items of ``data: stills``: group ``i`` gives its images (group, H, W, 3) and fresh partial captions
    (:func:`~mmadapters.vision.synth.spatial_caption` of the object's centre when ``centres`` is set)."""

    images: np.ndarray
    scenes: list[list[synth.Scene]]
    centres: np.ndarray | None = None  # (G, group, 2) x, y fractions of the side

    def __len__(self) -> int:
        return len(self.images)

    def item(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        if self.centres is not None:
            return self.images[i], [synth.spatial_caption(s, tuple(c), rng) for s, c in zip(self.scenes[i], self.centres[i], strict=True)]
        return self.images[i], [synth.caption(s, rng) for s in self.scenes[i]]

    def object_boxes(self, i: int) -> np.ndarray:
        """(group, 4) x0, y0, x1, y1 (fractions of the side) that hold group ``i``'s objects, for crops that keep them.

        Bounds, not the exact extent: render's radius jitter (x1.1) and margin (x1.12), and without centres the
        position's +-0.04 jitter."""
        out = np.empty((len(self.scenes[i]), 4))
        for j, scene in enumerate(self.scenes[i]):
            r = synth.centre_margin(scene.size)
            if self.centres is not None:
                lo = hi = self.centres[i, j]
            else:  # render clips the jittered centre into [margin, 1 - margin], margin <= r
                p = np.array(synth.POSITIONS[scene.position][:2])
                lo, hi = np.minimum(p - 0.04, 1 - r), np.maximum(p + 0.04, r)
            out[j] = np.clip([*(lo - r), *(hi + r)], 0.0, 1.0)
        return out


# ----------------------------------------------------------------------------------------------- video frames

POSITIONS = ("at the far left", "at the left", "left of the centre", "in the centre", "right of the centre",
             "at the right", "at the far right")
LANE_WORDS = ("in the top lane", "in the middle lane", "in the bottom lane")
SIZE_EDGES = ((6.5, "small"), (8.5, "medium"), (10.5, "big"), (math.inf, "huge"))  # radius in px at 64 px


def decode_mp4(data: bytes) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 RGB of an mp4 held in memory (PyAV)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def clip_frames(seed: int, index: int, size: int = 64, stream: str = PRETRAIN_STREAM):
    """Clip ``index`` of a seeded stream: mp4 round-tripped frames (T, H, W, 3) uint8, its ``Clip`` and ``Track``."""
    from mmadapters.video import synth_traffic as st
    from mmadapters.video.synth import encode_mp4, key, rng_for

    rng = rng_for(seed, key(stream), index)
    second, first = rng.choice(len(st.KINDS), size=2, replace=False)
    clip = st.sample_clip(rng, st.KINDS[int(second)], st.KINDS[int(first)], size=size, num_frames=NUM_FRAMES)
    track = st.simulate(clip)
    return decode_mp4(encode_mp4(st.render(clip, track, rng))), clip, track


def render_clips(n: int, seed: int, size: int = 64, stream: str = PRETRAIN_STREAM,
                 progress: bool = False) -> tuple[np.ndarray, list[tuple[Any, Any]]]:
    """(n, T, H, W, 3) uint8 frames of clips ``0..n-1`` of ``stream`` and each clip's (Clip, Track)."""
    made = [clip_frames(seed, i, size, stream) for i in tqdm(range(n), desc=stream, disable=not progress, leave=False)]
    return np.stack([m[0] for m in made]), [(m[1], m[2]) for m in made]


def colour_name(rgb: np.ndarray) -> str:
    """The named colour of the video world nearest to ``rgb`` (3,) float."""
    from mmadapters.video.synth_traffic import COLOURS

    names = list(COLOURS)
    return names[int(np.argmin([np.linalg.norm(rgb - np.array(COLOURS[n])) for n in names]))]


def _position_bin(x: float, size: int) -> int:
    return int(np.clip(x / size * len(POSITIONS), 0, len(POSITIONS) - 1))


def object_phrase(clip, track, f: int, j: int, rng: np.random.Generator | None) -> str:
    """"a big blinking red circle at the left in the top lane" (attributes dropped at random with ``rng``)."""

    def keep(p: float) -> bool:
        return rng is None or rng.random() < p

    o = clip.objects[j]
    r = track.r[f, j] * 64.0 / clip.size
    words = []
    if keep(0.7):
        words.append(next(name for edge, name in SIZE_EDGES if r < edge))
    if track.bright[f, j] < 1.0 and keep(0.8):
        words.append("blinking")
    if keep(0.85):
        words.append(colour_name(track.rgb[f, j]))
    words.append(o.shape if keep(0.85) else "shape")
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    if keep(0.9):
        text += " " + POSITIONS[_position_bin(track.x[f, j], clip.size)]
    if keep(0.4):
        text += " " + LANE_WORDS[o.lane]
    return text


def frame_caption(clip, track, f: int, rng: np.random.Generator | None = None) -> str:
    """A partial description of frame ``f``: one or two objects, a contact when there is one, maybe the background.

    With ``rng`` None: every object, all attributes (the canonical caption)."""
    from mmadapters.video.synth_traffic import _gaps

    k = len(clip.objects)
    gaps = _gaps(track)[f]
    touching = [(a, b) for a in range(k) for b in range(a + 1, k) if gaps[a, b] <= 0.5 * clip.size / 64.0]
    if rng is None:
        parts = [object_phrase(clip, track, f, j, None) for j in range(k)]
    elif touching and rng.random() < 0.5:
        a, b = touching[0] if rng.random() < 0.5 else touching[0][::-1]
        name = lambda j: f"the {colour_name(track.rgb[f, j])} {clip.objects[j].shape}"  # noqa: E731
        parts = [f"{name(a)} touches {name(b)}"]
    else:
        chosen = rng.permutation(k)[: 1 + int(rng.random() < 0.2)]
        parts = [object_phrase(clip, track, f, int(j), rng) for j in chosen]
    text = " and ".join(parts)
    if rng is None or rng.random() < 0.2:
        text += f" on {clip.background}"
    return text


class Frames:
    """Items of ``data: video-frames``: clip ``i`` gives ``frames_per_clip`` frames (each followed by its mirror
    image with ``flip``) as (k, H, W, 3) and fresh partial captions; a frame and its mirror share caption choices."""

    def __init__(self, frames: np.ndarray, worlds: list, frames_per_clip: int, flip: bool):
        self.frames, self.worlds, self.frames_per_clip, self.flip = frames, worlds, frames_per_clip, flip
        # the tracks of the mirrored frames (frame[:, ::-1]): the shapes are symmetric, so only x changes
        self.mirrored = [dataclasses.replace(track, x=clip.size - 1 - track.x) for clip, track in worlds]

    def __len__(self) -> int:
        return len(self.frames)

    def item(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        clip, track = self.worlds[i]
        images, captions = [], []
        for f in rng.choice(self.frames.shape[1], size=self.frames_per_clip, replace=False):
            choices = int(rng.integers(2**62))
            images.append(self.frames[i, f])
            captions.append(frame_caption(clip, track, int(f), np.random.default_rng(choices)))
            if self.flip:
                images.append(self.frames[i, f, :, ::-1])
                captions.append(frame_caption(clip, self.mirrored[i], int(f), np.random.default_rng(choices)))
        return np.stack(images), captions


# ----------------------------------------------------------------------------------------------- evaluation


@dataclass
class HeldOutTask:
    """The test split of a generated task, in memory: images (N, H, W, 3) uint8, labels (N,), prompts."""

    name: str
    images: np.ndarray
    labels: Tensor
    classnames: list[str]
    templates: list[str]


def load_heldout_task(name: str, per_class: int, seed: int, image_size: int = 64) -> HeldOutTask:
    """Render task ``name``'s test split with :func:`~mmadapters.vision.synth.generate_task` and read it back."""
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="clip_pretrain_eval_") as tmp:
        root = synth.generate_task(name, Path(tmp) / name, train_per_class=0, val_per_class=0,
                                   test_per_class=per_class, seed=seed, image_size=image_size, progress=False)
        folders = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
        paths = [(p, label) for label, folder in enumerate(folders) for p in sorted((root / "test" / folder).glob("*.png"))]
        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in paths])
        return HeldOutTask(name, images, torch.tensor([label for _, label in paths]),
                           (root / "classnames.txt").read_text().splitlines(), (root / "templates.txt").read_text().splitlines())


def zero_shot_accuracy(model: nn.Module, tokenizer, task: HeldOutTask, *, device: torch.device | str = "cpu",
                       batch_size: int = 256) -> float:
    """Top-1 of the template-ensembled zero-shot classifier on ``task`` (call under no_grad, model in eval mode)."""
    from .zeroshot import build_classifier

    weights = build_classifier(model, tokenizer, task.classnames, task.templates, device=device, progress=False).to(device)
    correct = 0
    for start in range(0, len(task.labels), batch_size):
        feats = F.normalize(model.encode_image(to_tensor(task.images[start:start + batch_size]).to(device)).float(), dim=-1)
        correct += int(((feats @ weights).argmax(-1).cpu() == task.labels[start:start + batch_size]).sum())
    return correct / len(task.labels)


def _ridge(xtr: Tensor, ytr: Tensor, xte: Tensor, lam: float = 1e-2) -> Tensor:
    a = torch.cat([xtr, torch.ones(len(xtr), 1)], 1)
    b = torch.cat([xte, torch.ones(len(xte), 1)], 1)
    return b @ torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1]), a.T @ ytr)


def r2(pred: Tensor, true: Tensor) -> float:
    """Coefficient of determination of ``pred`` for ``true`` (both (N,)); NaN without spread (tiny probe sets)."""
    spread = true.var().item() if len(true) > 1 else 0.0
    return round(1 - ((pred - true) ** 2).mean().item() / spread, 4) if spread > 0 else math.nan


def render_probe_stills(n: int, seed: int, image_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``n`` held-out pretraining-style stills, each object at a random centre: images (n, H, W, 3) uint8 and the
    centres (n, 2), x and y as fractions of the side (a stream of their own: never a training pool's)."""
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    centres = np.empty((n, 2))
    for k in range(n):
        rng = np.random.default_rng([seed, synth._key("probe-stills"), k])
        scene = synth.sample_scene(rng, None, synth.PRETRAIN_STYLES)
        centres[k] = synth.random_centre(scene, rng)
        images[k] = np.asarray(synth.render(scene, image_size, rng, centre=tuple(centres[k])))
    return images, centres


def stills_probe(model: nn.Module, images: np.ndarray, centres: np.ndarray, *, device: torch.device | str = "cpu",
                 batch_size: int = 256) -> dict[str, float]:
    """``stills_x_r2``, ``stills_y_r2``: R² of ridge probes from L2-normalized image features of ``images``
    (n, H, W, 3) to the objects' centres (n, 2); the first half fits, the second scores. Call under no_grad, eval mode."""
    x = torch.cat([model.encode_image(to_tensor(images[s:s + batch_size]).to(device)).float().cpu()
                   for s in range(0, len(images), batch_size)])
    x, y = F.normalize(x, dim=-1), torch.from_numpy(centres).float()
    half = len(x) // 2
    pred = _ridge(x[:half], y[:half], x[half:])
    return {"stills_x_r2": r2(pred[:, 0], y[half:, 0]), "stills_y_r2": r2(pred[:, 1], y[half:, 1])}


def probe_targets(worlds: list, frames_per_clip: int) -> dict[str, Tensor]:
    """Per-frame state of the middle-lane object (NaN / -1 where the lane is empty), frames flattened clip-major."""
    from mmadapters.video.synth_traffic import COLOURS, SHAPES

    out: dict[str, list] = {"x": [], "r": [], "colour": [], "shape": []}
    for clip, track in worlds:
        j = {o.lane: j for j, o in enumerate(clip.objects)}.get(1, -1)
        for f in range(frames_per_clip):
            out["x"].append(track.x[f, j] if j >= 0 else math.nan)
            out["r"].append(track.r[f, j] if j >= 0 else math.nan)
            out["colour"].append(list(COLOURS).index(colour_name(track.rgb[f, j])) if j >= 0 else -1)
            out["shape"].append(SHAPES.index(clip.objects[j].shape) if j >= 0 else -1)
    return {k: torch.tensor(v) for k, v in out.items()}


def linear_probes(model: nn.Module, tokenizer, frames: np.ndarray, worlds: list, *,
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """Ridge probes from L2-normalized image features of ``frames`` (n, T, H, W, 3): half the clips fit, half score.

    R² of the middle-lane object's x and radius (``x_r2``, ``r_r2``), accuracy of its current colour and shape,
    and ``position_zeroshot_acc``: picking the right one of the 7 position phrases for the clip's first object
    (chance 1/7). Call under no_grad with the model in eval mode."""
    from mmadapters.video.synth_traffic import COLOURS, SHAPES

    n, t = frames.shape[:2]
    x = torch.cat([model.encode_image(to_tensor(frames[i]).to(device)).float().cpu() for i in range(n)])
    x = F.normalize(x, dim=-1)
    y = probe_targets(worlds, t)
    half = (n // 2) * t
    out = {}
    for name in ("x", "r"):
        a, b = ~y[name][:half].isnan(), ~y[name][half:].isnan()
        pred = _ridge(x[:half][a], y[name][:half][a, None].float(), x[half:][b])[:, 0]
        out[f"{name}_r2"] = r2(pred, y[name][half:][b].float())
    for name, classes in (("colour", len(COLOURS)), ("shape", len(SHAPES))):
        a, b = y[name][:half] >= 0, y[name][half:] >= 0
        pred = _ridge(x[:half][a], F.one_hot(y[name][:half][a], classes).float(), x[half:][b]).argmax(1)
        out[f"{name}_acc"] = round((pred == y[name][half:][b]).float().mean().item(), 4)
    hits = 0
    for (clip, track), feats in zip(worlds, x.view(n, t, -1), strict=True):
        texts = [f"a {colour_name(track.rgb[0, 0])} {clip.objects[0].shape} {pos}" for pos in POSITIONS]
        text = F.normalize(model.encode_text(tokenizer(texts).to(device)).float().cpu(), dim=-1)
        true = torch.tensor([_position_bin(track.x[f, 0], clip.size) for f in range(t)])
        hits += int(((feats @ text.T).argmax(1) == true).sum())
    out["position_zeroshot_acc"] = round(hits / (n * t), 4)
    return out


# ----------------------------------------------------------------------------------------------- the recipe


@dataclass
class ClipPretrainConfig:
    """The ``recipe:`` section of ``mmadapters train clip-pretrain`` (configs/clip-pretrain.yaml comments each field)."""

    data: Literal["stills", "video-frames", "both"] = "stills"
    init: str | None = None  # a local-dir CLIP folder to start from (None: random initialization)
    model_cfg: dict[str, Any] = field(default_factory=dict)  # deep-merged over MODEL_CFG (with init: must match it)
    pool_size: int = 24576  # stills rendered once
    group: int = 8  # stills per item
    clips: int = 1200  # training clips rendered once
    frames_per_clip: int = 1
    flip: bool = True
    eval_tasks: list[str] = field(default_factory=lambda: list(EVAL_TASKS))
    eval_per_class: int = 10
    eval_seed: int = 1000  # held-out tasks and clips
    probe_clips: int = 0
    eval_batch_size: int = 256
    captions: Literal["classic", "spatial"] = "classic"  # spatial: stills at random centres, spatial_caption
    image_loss_weight: float = 0.0  # > 0: SLIP's image-image term on two object-keeping crops (stills only)
    crop_min_side: float = 0.75  # smallest crop side of the image-image views (fraction of the image)
    probe_stills: int = 0  # > 0: x / y-position ridge probes (stills_x_r2) on held-out stills at random centres

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> None:
            raise ValueError(f"recipe.{name}: expected {expected}, got {getattr(self, name)!r}")

        if not 2 <= self.group <= 8:
            bad("group", "2..8 (a group's stills differ in shape; 8 shapes are allowed with every colour)")
        if self.data != "video-frames" and self.pool_size < self.group:
            bad("pool_size", f"at least recipe.group={self.group} stills")
        if self.data != "stills" and self.clips < 1:
            bad("clips", "at least 1 clip")
        if not 1 <= self.frames_per_clip <= NUM_FRAMES:
            bad("frames_per_clip", f"1..{NUM_FRAMES} (frames of a clip)")
        if unknown := [t for t in self.eval_tasks if t not in synth.TASKS]:
            bad("eval_tasks", f"names of generated tasks ({', '.join(sorted(synth.TASKS))}); unknown: {unknown}")
        for name in ("eval_per_class", "eval_batch_size"):
            if getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if self.probe_clips == 1 or self.probe_clips < 0:
            bad("probe_clips", "0 or at least 2 (half the clips fit the probes, half score them)")
        if self.probe_stills == 1 or self.probe_stills < 0:
            bad("probe_stills", "0 or at least 2 (half the stills fit the probes, half score them)")
        if not self.eval_tasks and not self.probe_clips and not self.probe_stills:
            bad("eval_tasks", "at least one task, or recipe.probe_clips / probe_stills > 0 (validation needs a measure)")
        if self.captions not in ("classic", "spatial"):
            bad("captions", "classic or spatial")
        if self.captions == "spatial" and self.data == "video-frames":
            bad("captions", "classic with data: video-frames (spatial captions are for stills; frames name position already)")
        if not (isinstance(self.image_loss_weight, (int, float)) and math.isfinite(self.image_loss_weight)
                and self.image_loss_weight >= 0):
            bad("image_loss_weight", "a finite number >= 0")
        if self.image_loss_weight > 0 and self.data != "stills":
            bad("image_loss_weight", "0 unless recipe.data is stills (the views' crops keep a still's object whole)")
        if not 0 < self.crop_min_side <= 1:
            bad("crop_min_side", "a fraction in (0, 1]")

    def images_per_item(self) -> int:
        """Images of one training item (``trainer.batch_size`` counts items)."""
        if self.data == "both":
            raise ValueError("recipe.data: both mixes items of two sizes; images per item are not fixed")
        return self.group if self.data == "stills" else self.frames_per_clip * (2 if self.flip else 1)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_model(config: ClipPretrainConfig) -> tuple[dict[str, Any], nn.Module]:
    """(model_cfg, open_clip CLIP in float32): random from ``model_cfg`` or loaded from ``init``."""
    import open_clip
    from safetensors.torch import load_file

    base, state = MODEL_CFG, None
    if config.init:
        directory = Path(config.init).expanduser()
        try:
            base = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))["model_cfg"]
            state = {k: v.float() for k, v in load_file(str(directory / WEIGHTS_NAME)).items()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"recipe.init: {directory}: expected a local-dir CLIP ({CONFIG_NAME} with a model_cfg, "
                             f"{WEIGHTS_NAME}); {type(err).__name__}: {err}") from None
    cfg = _merge(base, config.model_cfg)
    if state is not None and cfg != base:
        raise ValueError(f"recipe.model_cfg: {config.model_cfg} changes the model of recipe.init ({config.init}); "
                         "a model initialized from a file keeps its shape (leave model_cfg empty)")
    try:
        model = open_clip.CLIP(**cfg)
        if state is not None:
            model.load_state_dict(state)
    except (TypeError, KeyError, ValueError, RuntimeError) as err:
        what = f"recipe.init: {config.init}: the weights do not fit" if state is not None else "recipe.model_cfg: open_clip.CLIP refuses"
        raise ValueError(f"{what} {cfg} ({type(err).__name__}: {err})") from None
    return cfg, model.float()


class ClipPretrainTask:
    """The engine's TrainTask: every parameter of an open_clip CLIP, contrastive loss, held-out zero-shot validation."""

    select_mode = "max"

    def __init__(self, model: nn.Module, model_cfg: dict[str, Any], tokenizer, sources: list, *,
                 heldout: list[HeldOutTask], probe: tuple[np.ndarray, list] | None, record: dict[str, Any],
                 device: torch.device | str = "cpu", eval_batch_size: int = 256, seed: int = 0,
                 probe_stills: tuple[np.ndarray, np.ndarray] | None = None, image_loss_weight: float = 0.0,
                 crop_min_side: float = 0.75):
        self.model: nn.Module = model.to(device).train()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.model_cfg, self.tokenizer, self.sources, self.device = model_cfg, tokenizer, sources, torch.device(device)
        self.heldout, self.probe, self.record, self.eval_batch_size, self.seed = heldout, probe, record, eval_batch_size, seed
        self.probe_stills, self.image_loss_weight, self.crop_min_side = probe_stills, image_loss_weight, crop_min_side
        if image_loss_weight > 0 and not hasattr(self.model, "ssl_head"):
            raise ValueError("image_loss_weight > 0 needs the model's ssl_head (image_mlp), as build_task adds it")
        self.select_metric = ("zeroshot_acc1" if heldout else "position_zeroshot_acc" if probe is not None
                              else "stills_x_r2")
        self.metrics: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []

    def train_size(self) -> int:
        return sum(len(s) for s in self.sources)

    def get_batch(self, indices: list[int]) -> dict[str, Tensor]:
        """{"images": (B, 3, H, W), "tokens": (B, L), "same": (B, B)} for the items' images (B = their image count);
        with ``image_loss_weight`` also "views": (2B, 3, H, W), two :func:`object_crops` of every image."""
        rng = np.random.default_rng([self.seed, *indices])
        images, captions = [], []
        for i in indices:
            for source in self.sources:
                if i < len(source):
                    im, caps = source.item(i, rng)
                    images.append(im)
                    captions += caps
                    break
                i -= len(source)
        ids = torch.from_numpy(np.unique(np.array(captions), return_inverse=True)[1].reshape(-1))
        batch = {"images": to_tensor(np.concatenate(images)), "tokens": self.tokenizer(captions),
                 "same": (ids[:, None] == ids[None, :]).float()}
        if self.image_loss_weight > 0:  # drawn after the captions: the captions stay those of the weight-0 run
            boxes = np.concatenate([self.sources[0].object_boxes(i) for i in indices])
            batch["views"] = torch.cat([object_crops(batch["images"], boxes, rng, self.crop_min_side) for _ in range(2)])
        return {k: v.to(self.device) for k, v in batch.items()}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)  # CLIP's cap on the temperature
        if "views" not in batch:
            image_features, text_features, logit_scale = model(batch["images"], batch["tokens"])[:3]
            return clip_loss(image_features, text_features, logit_scale, batch["same"])
        # SLIP: CLIP's loss on the plain images, SimCLR's on the two views through the SSL head, one trunk pass
        n = len(batch["images"])
        pooled = vision_trunk(model.visual, torch.cat([batch["images"], batch["views"]]))  # (3n, width)
        image_features = F.normalize(pooled[:n] @ model.visual.proj, dim=-1)
        text_features = model.encode_text(batch["tokens"], normalize=True)
        contrastive = clip_loss(image_features, text_features, model.logit_scale.exp(), batch["same"])
        return contrastive + self.image_loss_weight * simclr_loss(*model.ssl_head(pooled[n:]).chunk(2))

    def validate(self) -> dict[str, float]:
        """``<task>_acc1`` per held-out task and their mean ``zeroshot_acc1``; the probes' metrics with probe clips."""
        metrics = {f"{t.name}_acc1": zero_shot_accuracy(self.model, self.tokenizer, t, device=self.device,
                                                        batch_size=self.eval_batch_size) for t in self.heldout}
        if metrics:
            metrics["zeroshot_acc1"] = sum(metrics.values()) / len(metrics)
        if self.probe is not None:
            metrics.update(linear_probes(self.model, self.tokenizer, *self.probe, device=self.device))
        if self.probe_stills is not None:
            metrics.update(stills_probe(self.model, *self.probe_stills, device=self.device, batch_size=self.eval_batch_size))
        self.metrics = {k: round(v, 4) for k, v in metrics.items()}
        return metrics

    def on_validated(self, step: int, metrics: dict[str, float], output_dir: Path) -> None:
        from mmadapters.training.trainer import HISTORY_NAME

        # the engine's history (rewritten on --resume) is the record of every validation so far
        lines = (Path(output_dir) / HISTORY_NAME).read_text(encoding="utf-8").splitlines()
        self.history = [{"step": e["step"], **{k: round(v, 4) for k, v in e["metrics"].items()}}
                        for e in map(json.loads, lines) if e.get("kind") == "eval"]

    def save(self, directory: Path) -> None:
        """``open_clip_config.json`` (model_cfg, preprocess_cfg, training record) + fp16 ``open_clip_model.safetensors``."""
        from safetensors.torch import save

        size = self.model_cfg["vision_cfg"]["image_size"]
        state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in self.model.state_dict().items()
                 if not k.startswith("ssl_head.")}  # SLIP's head is for training only
        state["logit_scale"] = state["logit_scale"].clamp(0, MAX_LOGIT_SCALE)
        zero_shot = {t.name: self.metrics[f"{t.name}_acc1"] for t in self.heldout if f"{t.name}_acc1" in self.metrics}
        config = {"model_cfg": self.model_cfg,
                  "preprocess_cfg": {"size": size, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
                                     "resize_mode": "shortest"},
                  "mmadapters": {**self.record, "metrics": self.metrics, "zero_shot_test_acc1": zero_shot,
                                 "history": self.history}}
        (directory / WEIGHTS_NAME).write_bytes(save(state))
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def parameter_counts(self) -> dict[str, int]:
        n = sum(p.numel() for p in self.model.parameters())
        return {"trainable": n, "total": n}


def build_task(config: ClipPretrainConfig, trainer: Any) -> ClipPretrainTask:
    """The engine's entry point: build (or load) the model, render the pools and the held-out sets."""
    import open_clip

    from mmadapters.distributed import device_for_rank
    from mmadapters.training.config_io import to_mapping

    device = device_for_rank(trainer.device)
    model_cfg, model = build_model(config)
    size = model_cfg["vision_cfg"]["image_size"]
    tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    sources: list = []
    if config.data in ("stills", "both"):
        sources.append(Stills(*render_stills(config.pool_size, trainer.seed, config.group, size, trainer.progress,
                                             spatial=config.captions == "spatial")))
    if config.data in ("video-frames", "both"):
        frames, worlds = render_clips(config.clips, trainer.seed, size, progress=trainer.progress)
        sources.append(Frames(frames, worlds, config.frames_per_clip, config.flip))
    heldout = [load_heldout_task(name, config.eval_per_class, config.eval_seed, size) for name in config.eval_tasks]
    probe = render_clips(config.probe_clips, config.eval_seed, size, HELDOUT_STREAM) if config.probe_clips else None
    probe_stills = render_probe_stills(config.probe_stills, config.eval_seed, size) if config.probe_stills else None
    if config.image_loss_weight > 0:  # after the pools: the weight-0 run's draws are unchanged
        model.ssl_head = image_mlp(model.visual.proj.shape[0])
    rng = np.random.default_rng(0)
    record = {"trained_by": f"mmadapters train {RECIPE_NAME}", "recipe": to_mapping(config), "trainer": to_mapping(trainer),
              "heldout_combos": sorted(" ".join(c) for c in synth.HELDOUT_COMBOS),
              "example_captions": [c for s in sources for c in s.item(0, rng)[1][:4]]}
    task = ClipPretrainTask(model, model_cfg, tokenizer, sources, heldout=heldout, probe=probe, record=record,
                            device=device, eval_batch_size=config.eval_batch_size, seed=trainer.seed,
                            probe_stills=probe_stills, image_loss_weight=config.image_loss_weight,
                            crop_min_side=config.crop_min_side)
    if config.init:  # what training starts from (e.g. the still-image CLIP's probes before video frames)
        task.model.eval()
        with torch.no_grad():
            record["initial_metrics"] = {k: round(v, 4) for k, v in task.validate().items()}
        task.model.train()
    return task


RECIPE = Recipe(
    name=RECIPE_NAME, config_class=ClipPretrainConfig, build_task=build_task,
    trainer_defaults={"steps": 6000, "batch_size": 16, "lr": 2e-3, "weight_decay": 0.05, "warmup_ratio": 0.0167,
                      "schedule": "cosine", "grad_clip": None, "eval_every": 200, "checkpoint_every": 200},
    description="CLIP contrastive pretraining from scratch or an init on generated stills and/or video frames "
                "(open_clip local-dir output, fp16)")
