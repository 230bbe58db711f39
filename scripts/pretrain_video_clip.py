"""Continue pretraining the tiny CLIP on frames of generated moving-shape videos (the Tem-Adapter world).

    python scripts/pretrain_video_clip.py --output video/assets/video_clip --clips 1200 --steps 1500 --threads 1

Why: the shipped tiny CLIP (``vision/assets/tiny_clip``) saw one large shape per 64 px still. On frames of
the moving-shape VideoQA clips (:mod:`mmadapters.video.synth_traffic`: three small shapes in lanes) its
image features tell the background apart but hardly the objects' colour or shape, and a linear probe
cannot read an object's position or size from them — yet moves, growth and collisions are changes of
exactly those. No adapter on top of frozen features can recover what they do not contain.

What: the same open_clip model (``MODEL_CFG`` of ``scripts/pretrain_tiny_clip.py``, so the same size and
tokenizer), initialized from the shipped tiny CLIP and trained contrastively on (frame, caption) pairs:

- Frames: clips drawn with :func:`~mmadapters.video.synth_traffic.sample_clip` from a seed stream of its
  own (never the clips of a QA set generated with ``python -m mmadapters.video.synth trafficqa``),
  simulated, rendered, and passed through the same mp4 (libx264 yuv420p) encode/decode the QA videos get.
- Captions describe the *state* in one frame, never an event: for one or two objects a random subset of
  size ("small", "big"...), colour (the current one), shape, horizontal position ("at the far left" ...
  "at the far right", 7 bins) and lane, plus "the red circle touches the blue square" when two touch,
  "blinking" for a dimmed object, and sometimes the background. No question, answer or event word.
- A batch holds one frame of each of 64 clips and its mirror image, whose caption makes the same random
  choices with mirrored position words (``--flip``, on by default): the pair is a hard negative that only
  the horizontal position tells apart. Equal captions in a batch are soft positives (as in the tiny
  CLIP's run). Two earlier 11-minute runs did not learn position: with groups of 8 frames of one clip
  (and no mirrors) a partial caption of one frame is usually true of the other seven, so the contrast
  inside a group is noise, and two clips in a batch almost never share colour and shape, so position
  never decided a contrast between groups.

At the start and the end it prints linear-probe scores on held-out clips (position and radius R², colour
and shape accuracy of the middle-lane object) for the initial and the trained image tower.

Output (``--output``): ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg`` and a training record)
and ``open_clip_model.safetensors`` (fp16): the ``local-dir:`` layout :func:`mmadapters.vision.clip.load_clip`
reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_tiny_clip as base  # noqa: E402  (MODEL_CFG, PREPROCESS_CFG, to_tensor, param_groups, contrastive_loss)

from mmadapters.io import atomic_write_bytes  # noqa: E402
from mmadapters.video import synth_traffic as st  # noqa: E402
from mmadapters.video.synth import encode_mp4, key, rng_for  # noqa: E402

POSITIONS = ("at the far left", "at the left", "left of the centre", "in the centre", "right of the centre",
             "at the right", "at the far right")
LANE_WORDS = ("in the top lane", "in the middle lane", "in the bottom lane")
SIZE_EDGES = ((6.5, "small"), (8.5, "medium"), (10.5, "big"), (math.inf, "huge"))  # radius in px at 64 px


def decode_mp4(data: bytes) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 RGB of an mp4 held in memory (PyAV)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def clip_frames(seed: int, index: int, size: int = 64, num_frames: int = 24) -> tuple[np.ndarray, st.Clip, st.Track]:
    """Clip ``index`` of the pretraining stream: mp4 round-tripped frames (T, H, W, 3) uint8, the clip, its track."""
    rng = rng_for(seed, key("video-clip-pretrain"), index)
    second, first = rng.choice(len(st.KINDS), size=2, replace=False)
    clip = st.sample_clip(rng, st.KINDS[int(second)], st.KINDS[int(first)], size=size, num_frames=num_frames)
    track = st.simulate(clip)
    return decode_mp4(encode_mp4(st.render(clip, track, rng))), clip, track


def render_pool(clips: int, seed: int) -> tuple[np.ndarray, list[tuple[st.Clip, st.Track]]]:
    """(clips, T, H, W, 3) uint8 frames and each clip's (Clip, Track)."""
    frames, worlds = [], []
    for i in range(clips):
        f, c, t = clip_frames(seed, i)
        frames.append(f)
        worlds.append((c, t))
    return np.stack(frames), worlds


def mirror_track(clip: st.Clip, track: st.Track) -> st.Track:
    """The track of the horizontally mirrored frames (``frame[:, ::-1]``): pixel column c -> size - 1 - c.

    The world's shapes are left-right symmetric, so only positions change."""
    return dataclasses.replace(track, x=clip.size - 1 - track.x)


def colour_name(rgb: np.ndarray) -> str:
    """The named colour nearest to ``rgb`` (3,) float."""
    names = list(st.COLOURS)
    dist = [np.linalg.norm(rgb - np.array(st.COLOURS[n])) for n in names]
    return names[int(np.argmin(dist))]


def object_phrase(clip: st.Clip, track: st.Track, f: int, j: int, rng: np.random.Generator | None) -> str:
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


def frame_caption(clip: st.Clip, track: st.Track, f: int, rng: np.random.Generator | None = None) -> str:
    """A partial description of frame ``f``: one or two objects, a contact when there is one, maybe the background.

    With ``rng`` None: every object, all attributes (the canonical caption)."""
    k = len(clip.objects)
    gaps = st._gaps(track)[f]
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


# ----------------------------------------------------------------------------------------------- probes


def _ridge(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, lam: float = 1e-2) -> torch.Tensor:
    a = torch.cat([xtr, torch.ones(len(xtr), 1)], 1)
    b = torch.cat([xte, torch.ones(len(xte), 1)], 1)
    return b @ torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1]), a.T @ ytr)


def probe_targets(worlds: list[tuple[st.Clip, st.Track]], frames_per_clip: int) -> dict[str, torch.Tensor]:
    """Per-frame state of the middle-lane object (NaN / -1 where the lane is empty), frames flattened clip-major."""
    out: dict[str, list] = {"x": [], "r": [], "colour": [], "shape": []}
    for clip, track in worlds:
        lane = {o.lane: j for j, o in enumerate(clip.objects)}
        j = lane.get(1, -1)
        for f in range(frames_per_clip):
            out["x"].append(track.x[f, j] if j >= 0 else math.nan)
            out["r"].append(track.r[f, j] if j >= 0 else math.nan)
            out["colour"].append(list(st.COLOURS).index(colour_name(track.rgb[f, j])) if j >= 0 else -1)
            out["shape"].append(st.SHAPES.index(clip.objects[j].shape) if j >= 0 else -1)
    return {k: torch.tensor(v) for k, v in out.items()}


@torch.no_grad()
def linear_probes(model: torch.nn.Module, frames: np.ndarray, worlds: list[tuple[st.Clip, st.Track]]) -> dict[str, float]:
    """Ridge probes from L2-normalized image features, half the clips to fit, half to score.

    Returns R² of the middle-lane object's x and radius, accuracy of its (current) colour and shape, and the
    zero-shot accuracy of picking the right one of the 7 position phrases for the first object (chance 1/7)."""
    model.eval()
    n, t = frames.shape[:2]
    x = torch.cat([model.encode_image(base.to_tensor(frames[i])) for i in range(n)])
    x = F.normalize(x.float(), dim=-1)
    y = probe_targets(worlds, t)
    half = (n // 2) * t
    out = {}
    for name in ("x", "r"):
        a, b = ~y[name][:half].isnan(), ~y[name][half:].isnan()
        pred = _ridge(x[:half][a], y[name][:half][a, None].float(), x[half:][b])[:, 0]
        true = y[name][half:][b].float()
        out[f"{name}_r2"] = round(1 - ((pred - true) ** 2).mean().item() / true.var().item(), 4)
    for name, classes in (("colour", len(st.COLOURS)), ("shape", len(st.SHAPES))):
        a, b = y[name][:half] >= 0, y[name][half:] >= 0
        pred = _ridge(x[:half][a], F.one_hot(y[name][:half][a], classes).float(), x[half:][b]).argmax(1)
        out[f"{name}_acc"] = round((pred == y[name][half:][b]).float().mean().item(), 4)
    # zero-shot: which of the 7 position phrases fits "a <colour> <shape> ..." of the clip's first object
    hits = 0
    tokenizer = _tokenizer()
    for (clip, track), feats in zip(worlds, x.view(n, t, -1), strict=True):
        texts = [f"a {colour_name(track.rgb[0, 0])} {clip.objects[0].shape} {pos}" for pos in POSITIONS]
        text = F.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1)
        true = torch.tensor([_position_bin(track.x[f, 0], clip.size) for f in range(t)])
        hits += int(((feats @ text.T).argmax(1) == true).sum())
    out["position_zeroshot_acc"] = round(hits / (n * t), 4)
    return out


def _tokenizer():
    import open_clip

    return open_clip.SimpleTokenizer(context_length=base.MODEL_CFG["text_cfg"]["context_length"])


def _position_bin(x: float, size: int) -> int:
    return int(np.clip(x / size * len(POSITIONS), 0, len(POSITIONS) - 1))


# ----------------------------------------------------------------------------------------------- training


def load_init(model: torch.nn.Module, directory: Path) -> None:
    from safetensors.torch import load_file

    path = directory / "open_clip_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--init {directory}: expected the weights file {path}")
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)


def main(argv: list[str] | None = None) -> int:
    import open_clip

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, default=Path("video/assets/video_clip"))
    ap.add_argument("--init", type=Path, default=Path(__file__).resolve().parent.parent / "vision/assets/tiny_clip",
                    help="a local-dir CLIP with MODEL_CFG to start from ('none': random initialization)")
    ap.add_argument("--clips", type=int, default=1200, help="pretraining clips rendered once (24 frames each)")
    ap.add_argument("--probe-clips", type=int, default=80, help="held-out clips for the linear probes")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--group", type=int, default=2,
                    help="frames of one clip per batch, mirror images included (more than one frame per clip adds "
                         "noise: a partial caption of one frame is usually true of the clip's other frames)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                    help="pair every frame with its mirror image (mirrored position words): in-batch negatives that "
                         "only the horizontal position tells apart")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None, help="end the cosine schedule early at this wall time")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.batch_size % args.group or (args.flip and args.group % 2):
        raise SystemExit(f"--batch-size {args.batch_size}: expected a multiple of --group {args.group} (even with --flip)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    model = open_clip.CLIP(**base.MODEL_CFG)
    if str(args.init).lower() != "none":
        load_init(model, args.init)
    tokenizer = _tokenizer()

    t0 = time.time()
    frames, worlds = render_pool(args.clips, args.seed)
    probe_frames, probe_worlds = render_pool(args.probe_clips, args.seed + 10_000)
    print(f"rendered {args.clips} + {args.probe_clips} clips in {time.time() - t0:.0f}s", flush=True)
    before = linear_probes(model, probe_frames, probe_worlds)
    print(f"probes before: {before}", flush=True)

    opt = torch.optim.AdamW(base.param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    train_start = time.time()

    def progress(step: int) -> float:
        by_steps = (step - args.warmup) / max(1, args.steps - args.warmup)
        if args.max_minutes is None:
            return by_steps
        return max(by_steps, (time.time() - train_start) / (60 * args.max_minutes))

    rng = np.random.default_rng([args.seed, 1])
    t_frames = frames.shape[1]
    mirrored = [mirror_track(clip, track) for clip, track in worlds]
    history = []
    step = -1
    for step in range(args.steps):
        model.train()
        clips = rng.choice(len(worlds), size=args.batch_size // args.group, replace=False)
        per_clip = args.group // 2 if args.flip else args.group
        picks = [(int(c), int(f), flip) for c in clips for f in rng.choice(t_frames, size=per_clip, replace=False)
                 for flip in ((False, True) if args.flip else (False,))]
        # a frame and its mirror get the same caption choices: their captions differ only in position words
        seeds = {(c, f): int(rng.integers(2**62)) for c, f, _ in picks}
        captions = [frame_caption(worlds[c][0], mirrored[c] if flip else worlds[c][1], f, np.random.default_rng(seeds[c, f]))
                    for c, f, flip in picks]
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        x = base.to_tensor(np.stack([frames[c, f, :, ::-1] if flip else frames[c, f] for c, f, flip in picks]))
        lr = args.lr * (step + 1) / args.warmup if step < args.warmup else \
            args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress(step))))
        for g in opt.param_groups:
            g["lr"] = lr
        img_f, txt_f, scale = model(x, tokenizer(captions))[:3]
        loss = base.contrastive_loss(img_f, txt_f, scale, same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % 100 == 0:
            history.append({"step": step + 1, "loss": round(loss.item(), 4), "lr": lr})
            print(f"step {step + 1}: loss {loss.item():.3f} lr {lr:.2e} ({time.time() - train_start:.0f}s)", flush=True)
        if step >= args.warmup and progress(step) >= 1.0:
            break
    steps_done = step + 1
    after = linear_probes(model, probe_frames, probe_worlds)
    print(f"probes after {steps_done} steps: {after}", flush=True)

    args.output.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save

    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(args.output / "open_clip_model.safetensors", save(state))
    config = {
        "model_cfg": base.MODEL_CFG,
        "preprocess_cfg": base.PREPROCESS_CFG,
        "mmadapters": {
            "trained_by": "scripts/pretrain_video_clip.py",
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "steps_done": steps_done,
            "train_seconds": round(time.time() - started, 1),
            "history": history,
            "probes_before": before,
            "probes_after": after,
            "example_captions": [frame_caption(*worlds[0], f, np.random.default_rng(f)) for f in (0, 12, 23)],
        },
    }
    atomic_write_bytes(args.output / "open_clip_config.json", (json.dumps(config, indent=2) + "\n").encode())
    size = sum(p.stat().st_size for p in args.output.iterdir() if p.is_file())
    print(f"saved to {args.output} ({size / 1e6:.2f} MB) in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
