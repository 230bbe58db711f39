"""Pretrain the shipped tiny CLIP contrastively on generated image–caption pairs.

    python scripts/pretrain_tiny_clip.py --output vision/assets/tiny_clip --steps 1200 --batch-size 128 --threads 1

The model is an open_clip ``CLIP`` built from a custom config (ViT image tower on 64 px images,
transformer text tower with open_clip's bundled SimpleTokenizer, so nothing is downloaded). Training
pairs come from :func:`mmadapters.vision.synth.caption_pairs` (pretraining style mix, held-out
colour–shape pairs never shown): a pool of images is rendered once and every step re-draws a partial
caption for each image. Captions that are equal within a batch count as positives of each other
(soft targets), since the world repeats descriptions often.

Output: ``open_clip_config.json`` ({"model_cfg", "preprocess_cfg"} + a training record) and
``open_clip_model.safetensors`` (fp16), the layout ``open_clip.create_model_and_transforms(
"local-dir:DIR")`` loads. Held-out zero-shot top-1 on the synth-shapes test split is printed every
``--eval-every`` steps and, at the end, on every task's test split.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save
from tqdm.auto import tqdm

from mmadapters.io import atomic_write_bytes
from mmadapters.vision import synth

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

MODEL_CFG: dict = {
    "embed_dim": 96,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 96, "head_width": 32, "patch_size": 8},
    # vocab_size 49408 = open_clip's SimpleTokenizer; the token table (49408 x 64) dominates the file size.
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
PREPROCESS_CFG: dict = {"size": 64, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic", "resize_mode": "shortest"}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float normalized as the model's preprocess does."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def render_pool(size: int, seed: int, group: int = 8) -> tuple[np.ndarray, list[synth.Scene]]:
    """Render ``size`` pretraining scenes once: (size, 64, 64, 3) uint8 images and their scenes.

    Scenes come in groups of ``group`` that share colour, style, size, texture and background and
    differ in shape (and position): a batch of whole groups holds hard negatives that only the shape
    tells apart. Without them the tiny model matches captions by colour and never learns shapes.
    """
    images = np.empty((size, 64, 64, 3), dtype=np.uint8)
    scenes: list[synth.Scene] = []
    for g in tqdm(range(size // group), desc="rendering pretraining pool", unit="group"):
        rng = np.random.default_rng([seed, synth._key("pretrain"), g])
        base = synth.sample_scene(rng, None, synth.PRETRAIN_STYLES)
        allowed = [s for s in synth.SHAPES if (base.colour, s) not in synth.HELDOUT_COMBOS]
        for shape in rng.choice(allowed, size=min(group, len(allowed)), replace=False):
            fixed = {"shape": str(shape), "colour": base.colour, "style": base.style, "size": base.size}
            fixed.update(texture=base.texture, background=base.background)
            scene = synth.sample_scene(rng, fixed)
            images[len(scenes)] = np.asarray(synth.render(scene, 64, rng))
            scenes.append(scene)
    return images[: len(scenes)], scenes


@torch.no_grad()
def zero_shot_accuracy(model: open_clip.CLIP, tokenizer, root: Path, split: str = "test", device: str = "cpu") -> float:
    """Top-1 of the template-ensembled zero-shot classifier on ``root/split`` (a generate_task folder)."""
    classnames = (root / "classnames.txt").read_text().splitlines()
    templates = (root / "templates.txt").read_text().splitlines()
    folders = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    texts = [t.replace("{c}", c) for c in classnames for t in templates]
    emb = F.normalize(model.encode_text(tokenizer(texts).to(device)), dim=-1).view(len(classnames), len(templates), -1)
    weights = F.normalize(emb.mean(1), dim=-1)  # (C, D)
    paths, labels = [], []
    for label, folder in enumerate(folders):
        for p in sorted((root / split / folder).glob("*.png")):
            paths.append(p)
            labels.append(label)
    correct = 0
    for start in range(0, len(paths), 256):
        batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[start : start + 256]])
        feats = F.normalize(model.encode_image(to_tensor(batch).to(device)), dim=-1)
        pred = (feats @ weights.T).argmax(-1).cpu()
        correct += int((pred == torch.tensor(labels[start : start + 256])).sum())
    return correct / max(1, len(paths))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Norms, biases, embeddings and the temperature are not decayed (the token table would shrink
        # towards zero for every token the world never uses).
        if p.ndim < 2 or "embedding" in name or "token" in name or name.endswith("class_embedding") or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: ``same`` (B, B) marks pairs whose captions are equal."""
    logits = scale * image_features @ text_features.T
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="vision/assets/tiny_clip", help="folder for open_clip_config.json + weights")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--pool-size", type=int, default=24576, help="pretraining images rendered once, re-captioned each step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--max-minutes", type=float, default=None, help="end the cosine schedule early when this wall time is reached")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy 2-core machine)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.batch_size % 8:
        raise SystemExit(f"--batch-size {args.batch_size}: expected a multiple of 8 (batches are groups of 8 scenes)")
    model = open_clip.CLIP(**MODEL_CFG).to(args.device)
    tokenizer = open_clip.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    images, scenes = render_pool(args.pool_size, args.seed)
    eval_root = Path(tempfile.mkdtemp(prefix="tiny_clip_eval_"))
    held_out = synth.generate_task(
        "synth-shapes", eval_root / "synth-shapes", train_per_class=0, val_per_class=0, seed=1000 + args.seed, progress=False
    )

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)

    train_start = time.time()

    def schedule_progress(step: int) -> float:
        """Fraction of the run done: by steps, or by wall time when --max-minutes is the tighter bound."""
        by_steps = (step - args.warmup) / max(1, args.steps - args.warmup)
        if args.max_minutes is None:
            return by_steps
        return max(by_steps, (time.time() - train_start) / (60 * args.max_minutes))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, schedule_progress(step))))

    rng = np.random.default_rng([args.seed, 1])
    history: list[dict] = []
    bar = tqdm(range(args.steps), desc="pretraining", unit="step")
    for step in bar:
        model.train()
        groups = rng.choice(len(scenes) // 8, size=args.batch_size // 8, replace=False)
        idx = (groups[:, None] * 8 + np.arange(8)).reshape(-1)
        captions = [synth.caption(scenes[i], rng) for i in idx]
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32, device=args.device)
        x = to_tensor(images[idx]).to(args.device)
        tokens = tokenizer(captions).to(args.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        img_f, txt_f, scale = model(x, tokens)[:3]
        loss = contrastive_loss(img_f, txt_f, scale, same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{scale.item():.1f}")
        last = step + 1 == args.steps or (step >= args.warmup and schedule_progress(step) >= 1.0)
        if (step + 1) % args.eval_every == 0 or last:
            model.eval()
            acc = zero_shot_accuracy(model, tokenizer, held_out, device=args.device)
            history.append({"step": step + 1, "loss": round(loss.item(), 4), "synth-shapes_test_acc1": round(acc, 4)})
            tqdm.write(f"step {step + 1}: loss {loss.item():.3f}  held-out synth-shapes zero-shot top-1 {acc:.3f}")
        if last:
            break
    bar.close()
    steps_done = step + 1
    train_seconds = time.time() - started

    model.eval()
    results = {}
    for name in synth.TASKS:
        root = synth.generate_task(name, eval_root / name, train_per_class=0, val_per_class=0, seed=1000 + args.seed, progress=False)
        results[name] = round(zero_shot_accuracy(model, tokenizer, root, device=args.device), 4)
        chance = 1 / len(synth.TASKS[name].classes)
        print(f"zero-shot top-1 {name:16s} {results[name]:.3f}  (chance {chance:.3f})")

    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out_dir / "open_clip_model.safetensors", save(state))
    config = {
        "model_cfg": MODEL_CFG,
        "preprocess_cfg": PREPROCESS_CFG,
        "mmadapters": {
            "trained_by": "scripts/pretrain_tiny_clip.py",
            "args": vars(args),
            "steps_done": steps_done,
            "train_seconds": round(train_seconds, 1),
            "history": history,
            "zero_shot_test_acc1": results,
            "eval_seed": 1000 + args.seed,
            "heldout_combos": sorted(" ".join(c) for c in synth.HELDOUT_COMBOS),
        },
    }
    atomic_write_bytes(out_dir / "open_clip_config.json", (json.dumps(config, indent=2) + "\n").encode("utf-8"))
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    print(f"saved to {out_dir} ({size / 1e6:.2f} MB) in {train_seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
