"""Pretrain the shipped tiny VL-T5 on generated scenes: captioning + span-corruption denoising only.

    python scripts/pretrain_tiny_vlt5.py --data data/vl_pretrain --output vision/assets/tiny_vlt5 --max-minutes 25

Steps:

1. Generate a *pretraining* set with :func:`mmadapters.vision.synth_vl.generate_vl` (``pretrain=True``: its own
   random stream and ``synthpt_*`` ids, and ``--seed 1`` where the downstream tasks use seed 0), so no
   downstream image is ever seen here.
2. CLIP grid features of every image from the shipped tiny CLIP (last visual block, 16 tokens of width 96),
   cached in ``DATA/features_tiny_clip_16.h5`` (:func:`mmadapters.vision.vl_features.extract_features`).
3. A word-level T5-layout tokenizer (:mod:`mmadapters.vision.vl_tokenizer`) over every text of the
   pretraining set (captions, questions, answers, statements) plus the task prefixes, so downstream
   fine-tuning finds its words (words only: nothing of a question's answer is trained here).
4. Training, the two VL-T5 objectives that need no downstream labels, drawn per sample:
   ``"caption: "`` -> one of the image's reference captions, and ``"span prediction: "`` + a caption or a
   question of the image with T5 span corruption (15% noise, mean span 3, sentinels) -> the masked spans,
   conditioned on the image as VL-T5's visual MLM is. No question answering (the downstream tasks stay
   unseen). AdamW, linear warmup, cosine decay; a wall-clock bound (``--max-minutes``) ends training early.
5. Evaluation on the pretraining set's held-out test images: loss of both objectives and greedy captions
   scored by ``mmadapters.eval.metrics.caption_scores`` (BLEU-4, CIDEr).
6. ``VLT5.save_pretrained(output, fp16=True)`` (the training record goes into ``vlt5.json`` under
   ``"pretraining"``) and ``README.md`` with the command and the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from mmadapters.io import atomic_write_bytes
from mmadapters.vision.vlt5 import TINY_VLT5_DIR, VLT5, tiny_t5_config

PREFIXES = ("caption: ", "span prediction: ", "vqa: ", "gqa: ", "nlvr: ")
MAX_MB = 15.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--data", type=Path, default=Path("data/vl_pretrain"), help="pretraining data folder (generated if absent)")
    p.add_argument("--output", type=Path, default=TINY_VLT5_DIR)
    p.add_argument("--n-images", type=int, default=6000)
    p.add_argument("--seed", type=int, default=1, help="data seed (the downstream tasks use 0)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--layers", type=int, default=3, help="encoder and decoder layers each")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--num-tokens", type=int, default=16, help="CLIP grid tokens per image")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--caption-fraction", type=float, default=0.5, help="share of captioning samples (rest: span corruption)")
    p.add_argument("--noise-density", type=float, default=0.15)
    p.add_argument("--mean-span", type=float, default=3.0)
    p.add_argument("--max-minutes", type=float, default=25.0, help="wall-clock bound on training")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-images", type=int, default=400, help="held-out test images to caption at the end")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--grounding-images", type=int, default=200, help="fresh downstream-stream images for the grounding check")
    p.add_argument("--grounding-seed", type=int, default=4242)
    p.add_argument("--evaluate-only", type=Path, default=None, metavar="DIR",
                   help="skip training: run the grounding check on the model in DIR and add it to DIR/README.md")
    return p.parse_args(argv)


# ---- data ------------------------------------------------------------------------------------------------------------
def read_texts(data: Path) -> tuple[dict[str, str], dict[str, list[str]], dict[str, list[str]], list[str]]:
    """(img_id -> split, img_id -> captions, img_id -> questions, every text for the vocabulary)."""
    coco = json.loads((data / "coco" / "dataset_coco.json").read_text(encoding="utf-8"))
    split: dict[str, str] = {}
    captions: dict[str, list[str]] = {}
    for row in coco["images"]:
        img_id = Path(row["filename"]).stem
        split[img_id] = row["split"]
        captions[img_id] = [s["raw"] for s in row["sentences"]]
    questions: dict[str, list[str]] = {i: [] for i in split}
    vocab_texts = [t for caps in captions.values() for t in caps] + list(PREFIXES) + ["true false yes no"]
    for pattern in ("vqa/*.json", "gqa/*.json"):
        for path in sorted(data.glob(pattern)):
            for row in json.loads(path.read_text(encoding="utf-8")):
                questions[row["img_id"]].append(row["sent"])
                vocab_texts.append(row["sent"])
                vocab_texts.extend(row.get("label", {}))
                vocab_texts.extend(a["answer"] for a in row.get("answers", []))
    for path in sorted(data.glob("nlvr/*.json")):
        vocab_texts.extend(json.loads(line)["sent"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return split, captions, questions, vocab_texts


def load_features(data: Path, ids: list[str], num_tokens: int) -> torch.Tensor:
    """(len(ids), num_tokens, 96) float32 grid features of the shipped tiny CLIP (cached in DATA/*.h5)."""
    import h5py

    from mmadapters.vision.clip import load_clip
    from mmadapters.vision.vl_features import extract_features

    path = data / f"features_tiny_clip_{num_tokens}.h5"
    if not path.is_file():
        bundle = load_clip()
        extract_features({i: data / "images" / f"{i}.png" for i in ids}, bundle, path, num_tokens=num_tokens, batch_size=128)
    with h5py.File(path, "r") as f:
        return torch.stack([torch.from_numpy(f[i][()]).float() for i in ids])


def span_corrupt(ids: list[int], rng: random.Random, sentinels: list[int], density: float, mean_span: float) -> tuple[list[int], list[int]]:
    """T5 span corruption of a token list: (input with each noise span replaced by a sentinel, target of
    sentinel + span tokens). Spans alternate with kept runs, starting with a kept run."""
    n = len(ids)
    num_noise = min(max(1, round(n * density)), n - 1) if n > 1 else 0
    if num_noise == 0:
        return list(ids), []
    num_spans = max(1, min(round(num_noise / mean_span), num_noise, n - num_noise))

    def parts(total: int, k: int) -> list[int]:
        cuts = sorted(rng.sample(range(1, total), k - 1)) if k > 1 else []
        return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]

    noise, keep = parts(num_noise, num_spans), parts(n - num_noise, num_spans)
    inp: list[int] = []
    tgt: list[int] = []
    pos = 0
    for k in range(num_spans):
        inp.extend(ids[pos:pos + keep[k]])
        pos += keep[k]
        inp.append(sentinels[k])
        tgt.append(sentinels[k])
        tgt.extend(ids[pos:pos + noise[k]])
        pos += noise[k]
    inp.extend(ids[pos:])
    return inp, tgt


def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


class Batcher:
    """Builds mixed caption / span-corruption batches from pre-tokenized texts."""

    def __init__(self, tokenizer, feats: torch.Tensor, captions: list[list[str]], questions: list[list[str]], args: argparse.Namespace):
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.sentinels = [tokenizer.convert_tokens_to_ids(f"<extra_id_{k}>") for k in range(100)]

        def enc(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        self.caption_prefix, self.span_prefix = enc("caption: "), enc("span prediction: ")
        self.feats = feats
        self.captions = [[enc(c) for c in caps] for caps in captions]
        self.texts = [caps + [enc(q) for q in qs] for caps, qs in zip(self.captions, questions, strict=True)]
        self.args = args

    def sample(self, index: int, rng: random.Random, objective: str) -> tuple[list[int], list[int]]:
        if objective == "caption":
            return self.caption_prefix + [self.eos], rng.choice(self.captions[index]) + [self.eos]
        inp, tgt = span_corrupt(rng.choice(self.texts[index]), rng, self.sentinels, self.args.noise_density, self.args.mean_span)
        return self.span_prefix + inp + [self.eos], tgt + [self.eos]

    def batch(self, indices: list[int], rng: random.Random, objective: str | None = None):
        inputs, targets = [], []
        for i in indices:
            obj = objective or ("caption" if rng.random() < self.args.caption_fraction else "span")
            a, b = self.sample(i, rng, obj)
            inputs.append(a)
            targets.append(b)
        ids = pad(inputs, self.pad)
        return ids, (ids != self.pad).long(), self.feats[indices], pad(targets, -100)


@torch.no_grad()
def eval_loss(model: VLT5, batcher: Batcher, indices: list[int], objective: str, batch_size: int = 128) -> float:
    model.eval()
    rng = random.Random(1234)  # the same corruption every time: comparable numbers
    total, count = 0.0, 0
    for s in range(0, len(indices), batch_size):
        ids, mask, feats, labels = batcher.batch(indices[s:s + batch_size], rng, objective)
        loss = model(ids, mask, feats, labels=labels).loss
        n = int((labels != -100).sum())
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def caption_eval(model: VLT5, batcher: Batcher, indices: list[int], ids_of: list[str], refs: list[list[str]]) -> dict:
    model.eval()
    preds: dict[str, str] = {}
    for s in range(0, len(indices), 64):
        chunk = indices[s:s + 64]
        ids = torch.tensor([batcher.caption_prefix + [batcher.eos]] * len(chunk))
        out = model.generate(ids, torch.ones_like(ids), batcher.feats[chunk], max_new_tokens=48)
        for i, text in zip(chunk, model.decode(out), strict=True):
            preds[ids_of[i]] = text
    model.train()
    result: dict = {"count": len(preds), "examples": {k: preds[k] for k in list(preds)[:5]}}
    try:
        from mmadapters.eval.metrics import caption_scores
    except ImportError as err:  # the metric module is optional for this script
        result["scores_unavailable"] = str(err)
        return result
    result.update(caption_scores(preds, {ids_of[i]: r for i, r in zip(indices, refs, strict=True)}))
    return result


@torch.no_grad()
def grounding(model: VLT5, n_images: int, seed: int) -> dict:
    """Do greedy captions of *unseen* scenes name what is in them? Fresh images of the downstream stream
    (``pretrain=False``, ``seed``; pretraining never saw that stream), captioned with ``"caption: "``; for the
    colour words, shape words and "N objects/shapes" counts the captions name: the share that is true of the
    captioned image, and of another image (the captions of the next image's scene: a chance baseline)."""
    import re
    import tempfile

    from PIL import Image

    from mmadapters.vision.clip import load_clip
    from mmadapters.vision.synth_vl import NUM_WORDS, VL_COLOURS, VL_SHAPES, generate_vl
    from mmadapters.vision.vl_features import clip_grid_features

    with tempfile.TemporaryDirectory() as tmp:
        generate_vl(tmp, n_images=n_images, seed=seed, progress=False)
        scenes = [json.loads(line) for line in (Path(tmp) / "scenes.jsonl").read_text().splitlines()]
        clip = load_clip()
        captions: list[str] = []
        for s in range(0, len(scenes), 64):
            chunk = scenes[s:s + 64]
            images = torch.stack([clip.preprocess(Image.open(Path(tmp) / "images" / f"{x['img_id']}.png").convert("RGB"))
                                  for x in chunk])
            ids, mask = model.encode_text(["caption: "] * len(chunk))
            captions += model.decode(model.generate(ids, mask, clip_grid_features(clip.model, images), max_new_tokens=48))

    def share(truths: list[dict]) -> dict:
        out = {}
        for key, vocab in (("colour", VL_COLOURS), ("shape", VL_SHAPES)):
            named = [(w, {o[key] for o in t["objects"]}) for c, t in zip(captions, truths, strict=True)
                     for w in re.findall(rf"\b({'|'.join(vocab)})s?\b", c)]
            out[key] = round(sum(w in present for w, present in named) / max(len(named), 1), 3)
            out[f"{key}_mentions"] = len(named)
        counts = [(NUM_WORDS.index(m.group(1)), len(t["objects"])) for c, t in zip(captions, truths, strict=True)
                  if (m := re.search(rf"\b({'|'.join(NUM_WORDS)}) (?:objects|shapes)\b", c))]
        out["count"] = round(sum(a == b for a, b in counts) / max(len(counts), 1), 3)
        out["count_mentions"] = len(counts)
        return out

    return {"images": len(scenes), "seed": seed, "stream": "downstream (pretrain=False)", "captioned_image": share(scenes),
            "other_image_baseline": share(scenes[1:] + scenes[:1]), "examples": captions[:5]}


def grounding_markdown(g: dict, command: str) -> str:
    rows = "\n".join(f"| {k} | {g['captioned_image'][k]} | {g['other_image_baseline'][k]} | {g['captioned_image'][k + '_mentions']} |"
                     for k in ("colour", "shape", "count"))
    examples = "\n".join(f"- {c}" for c in g["examples"])
    return f"""
## Grounding on unseen scenes

`{command}`: greedy captions of {g['images']} fresh images of the *downstream* stream
(`generate_vl(..., seed={g['seed']})`, never seen in pretraining). Share of the colour words, shape words and
"N objects" counts the captions name that are true of the captioned image, against the same captions judged
on another image (chance baseline):

| named | captioned image | other image | mentions |
|---|---|---|---|
{rows}

{examples}
"""


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate_only is not None:
        return evaluate_only(args, argv)
    from tqdm.auto import tqdm
    from transformers import T5ForConditionalGeneration

    from mmadapters.vision.synth_vl import generate_vl
    from mmadapters.vision.vl_tokenizer import build_word_tokenizer

    t_start = time.time()
    summary = generate_vl(args.data, n_images=args.n_images, seed=args.seed, pretrain=True, progress=True)
    split, captions, questions, vocab_texts = read_texts(args.data)
    ids_of = sorted(split)
    feats = load_features(args.data, ids_of, args.num_tokens)
    t_data = time.time() - t_start
    tokenizer = build_word_tokenizer(vocab_texts, extra_ids=100)
    batcher = Batcher(tokenizer, feats, [captions[i] for i in ids_of], [questions[i] for i in ids_of], args)
    train_idx = [k for k, i in enumerate(ids_of) if split[i] == "train"]
    val_idx = [k for k, i in enumerate(ids_of) if split[i] == "val"]
    test_idx = [k for k, i in enumerate(ids_of) if split[i] == "test"][:args.eval_images]
    print(f"data: {len(train_idx)} train / {len(val_idx)} val / {len(test_idx)} test images, vocabulary {len(tokenizer)} "
          f"({len(tokenizer) - 103} words), features {tuple(feats.shape)}, {t_data:.0f} s", flush=True)

    torch.manual_seed(args.train_seed)
    t5 = T5ForConditionalGeneration(tiny_t5_config(len(tokenizer), d_model=args.d_model, d_ff=args.d_ff, num_layers=args.layers,
                                                   num_heads=args.heads, dropout_rate=args.dropout,
                                                   relative_attention_num_buckets=32, relative_attention_max_distance=128))
    model = VLT5(t5, feats.shape[-1], args.num_tokens, tokenizer=tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n and "shared" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n and "shared" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))))

    rng = random.Random(args.train_seed)
    history: list[dict] = []
    model.train()
    t_train = time.time()
    bar = tqdm(range(args.steps), desc="pretraining tiny VL-T5", unit="step")
    running, step = None, 0
    stopped_early = False
    for step in bar:
        if (time.time() - t_train) / 60 > args.max_minutes:
            stopped_early = True
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ids, mask, f, labels = batcher.batch(rng.sample(train_idx, args.batch_size), rng)
        loss = model(ids, mask, f, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % args.eval_every == 0:
            row = {"step": step + 1, "minutes": round((time.time() - t_train) / 60, 2), "train_loss": round(running, 4),
                   "val_caption_loss": round(eval_loss(model, batcher, val_idx, "caption"), 4),
                   "val_span_loss": round(eval_loss(model, batcher, val_idx, "span"), 4)}
            history.append(row)
            tqdm.write(json.dumps(row))
    else:
        step = args.steps
    steps_done = step if stopped_early else args.steps
    train_minutes = (time.time() - t_train) / 60
    model.eval()
    final = {"steps": steps_done, "train_minutes": round(train_minutes, 1), "train_loss_ema": round(running or float("nan"), 4),
             "val_caption_loss": round(eval_loss(model, batcher, val_idx, "caption"), 4),
             "val_span_loss": round(eval_loss(model, batcher, val_idx, "span"), 4),
             "test_caption_loss": round(eval_loss(model, batcher, test_idx, "caption"), 4),
             "test_span_loss": round(eval_loss(model, batcher, test_idx, "span"), 4)}
    t_eval = time.time()
    final["test_captioning_greedy"] = caption_eval(model, batcher, test_idx, ids_of, [captions[ids_of[i]] for i in test_idx])
    final["caption_eval_seconds"] = round(time.time() - t_eval, 1)
    print(json.dumps(final, indent=1), flush=True)

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    record = {"command": command, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "data": {"generator": "mmadapters.vision.synth_vl.generate_vl", "pretrain": True, "seed": args.seed,
                       "n_images": args.n_images, "images": summary.get("images"),
                       "features": f"shipped tiny CLIP, last block, {args.num_tokens} grid tokens"},
              "parameters": n_params, "vocabulary": len(tokenizer), "stopped_by_time_bound": stopped_early,
              "history": history, "final": final}
    model.save_pretrained(args.output, fp16=True, extra={"pretraining": record})
    size_mb = sum(p.stat().st_size for p in args.output.iterdir() if p.is_file()) / 2**20
    if size_mb > MAX_MB:
        print(f"warning: {args.output} is {size_mb:.1f} MB (> {MAX_MB} MB)", file=sys.stderr)
    write_readme(args, record, size_mb)
    add_grounding(args.output, args, f"python scripts/pretrain_tiny_vlt5.py --evaluate-only {args.output}")
    print(f"saved {args.output} ({size_mb:.2f} MB) in {(time.time() - t_start) / 60:.1f} min", flush=True)
    return 0


def add_grounding(directory: Path, args: argparse.Namespace, command: str) -> dict:
    """Run :func:`grounding` on the model in ``directory`` and (re)write that section of its README."""
    model = VLT5.from_pretrained(directory)
    g = grounding(model, args.grounding_images, args.grounding_seed)
    print(json.dumps(g, indent=1), flush=True)
    readme = directory / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    text = text.split("\n## Grounding on unseen scenes")[0].rstrip("\n") + "\n" + grounding_markdown(g, command)
    atomic_write_bytes(readme, text.encode())
    return g


def evaluate_only(args: argparse.Namespace, argv: list[str] | None) -> int:
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    add_grounding(args.evaluate_only, args, command)
    return 0


def write_readme(args: argparse.Namespace, record: dict, size_mb: float) -> None:
    final, cap = record["final"], record["final"]["test_captioning_greedy"]
    hist = "\n".join(f"| {r['step']} | {r['minutes']} | {r['train_loss']} | {r['val_caption_loss']} | {r['val_span_loss']} |"
                     for r in record["history"])
    examples = "\n".join(f"- `{k}`: {v}" for k, v in cap.get("examples", {}).items())
    scores = (f"BLEU-4 **{cap['bleu4']:.3f}**, CIDEr **{cap['cider']:.3f}**" if "bleu4" in cap
              else f"(not scored: {cap.get('scores_unavailable')})")
    stopped = " (stopped by the --max-minutes bound)" if record["stopped_by_time_bound"] else ""
    text = f"""# tiny_vlt5 — the embedded default VL-T5 of mmadapters

A tiny VL-T5 (stock `transformers` `T5ForConditionalGeneration` + a visual projection of CLIP grid features,
see `mmadapters/vision/vlt5.py`) pretrained from scratch on generated scenes, so the VL-Adapter recipe
has a backbone that already reads images and writes text. It knows nothing of real images.

```python
from mmadapters.vision.vlt5 import VLT5
model = VLT5.from_pretrained()          # this directory; or VLT5.from_pretrained("path/to/dir")
```

## Files

| file | content |
|---|---|
| `config.json`, `model.safetensors` | the T5 in transformers' own layout (fp16 weights; loads as float32) |
| `visual_projection.safetensors` | Linear(96 -> {args.d_model}) + LayerNorm, 16 grid-position and 2 image-index embeddings (fp16) |
| `tokenizer.json`, `tokenizer_config.json` | word-level T5-layout tokenizer (`<pad>`=0, `</s>`=1, `<unk>`=2, \
100 sentinels), {record['vocabulary']} ids |
| `vlt5.json` | visual_dim 96, num_visual_tokens {args.num_tokens}, and under `pretraining` the full training record |

Model: T5 v1.0 layout (ReLU FFN, tied embeddings), d_model {args.d_model}, d_ff {args.d_ff}, {args.layers} encoder + {args.layers} decoder
layers, {args.heads} heads, dropout {args.dropout}; {record['parameters'] / 1e6:.2f} M parameters; {size_mb:.2f} MB on disk.
Visual input: the shipped tiny CLIP's last visual block (8x8 patch tokens after `ln_post`) average-pooled to
4x4 = {args.num_tokens} tokens of width 96 (`mmadapters.vision.vl_features.clip_grid_features`).

## How it was made

```
{record['command']}
```

Data: `generate_vl(DATA, n_images={args.n_images}, seed={args.seed}, pretrain=True)` — the pretraining stream
(`synthpt_*` images), disjoint from the downstream tasks (seed 0, `synth_*`); splits {record['data']['images']}.
Objectives, drawn per sample ({args.caption_fraction:.0%} captioning): `caption: ` -> one of the image's 5
reference captions; `span prediction: ` + one of the image's captions or questions with T5 span corruption
(noise {args.noise_density}, mean span {args.mean_span}) -> the sentinel-marked spans, conditioned on the image.
No question answering, no NLVR, no downstream images: those stay for the VL-Adapter recipe. The vocabulary
covers every word of the pretraining set's texts (captions, questions, answers, statements) and the task prefixes.
AdamW lr {args.lr} (warmup {args.warmup}, cosine over {args.steps} steps), weight decay {args.weight_decay},
batch {args.batch_size}, gradient clip 1.0, {args.threads} CPU thread(s).
Ran {final['steps']} steps in {final['train_minutes']} min{stopped}.

| step | minutes | train loss (EMA) | val caption loss | val span loss |
|---|---|---|---|---|
{hist}

## Measured (held-out pretraining test images)

Per-token cross-entropy: captioning {final['test_caption_loss']}, span prediction {final['test_span_loss']}
(val: {final['val_caption_loss']} / {final['val_span_loss']}).

Greedy captions of {cap['count']} test images (`max_new_tokens=48`) against their 5 references,
`mmadapters.eval.metrics.caption_scores` (pycocoevalcap BLEU(4) + CIDEr, Python tokenizer): {scores}.

Examples:
{examples}

`tests/test_vlt5.py` loads this directory by default and captions fresh downstream images (see the test
for its measured threshold).
"""
    args.output.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.output / "README.md", text.encode())


if __name__ == "__main__":
    raise SystemExit(main())
