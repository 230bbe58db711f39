"""Pretrain the shipped tiny VL-T5 with ``mmadapters train vlt5-pretrain`` and write it as a documented asset.

    python scripts/pretrain_tiny_vlt5.py --data data/vl_pretrain --output vision/assets/tiny_vlt5 --steps 6000 --max-minutes 25
    python scripts/pretrain_tiny_vlt5.py ... --resume          # after a crash: the same command plus --resume
    python scripts/pretrain_tiny_vlt5.py ... --max-minutes 50 --resume   # past a budget stop (the budget counts every session)
    python scripts/pretrain_tiny_vlt5.py ... --set recipe.objectives.vqa=0.25 --set recipe.objectives.gqa=0.25 \\
        --set recipe.d_model=256 --set recipe.d_ff=512         # QA-style pretraining of a wider model

Steps: (1) ``mmadapters train vlt5-pretrain`` (:mod:`mmadapters.vision.vlt5_pretrain`: data, objectives, model size,
validation by held-out CIDEr; every ``--set KEY=VALUE`` goes to it) into ``--run-dir``, resumable with ``--resume``;
(2) the best/ (or ``--take last``) VL-T5 scored on the pretraining set's held-out test images (greedy captions:
CIDEr, BLEU-4; the per-token loss of each objective; QA accuracy when trained); (3) saved to ``--output`` in the
shipped layout (fp16 safetensors, tokenizer, ``vlt5.json`` with the whole record under ``"pretraining"``) with a
``README.md``; (4) the grounding check: do greedy captions of fresh *downstream* images name what is in them?
(``--evaluate-only DIR`` runs only this on a saved model.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from mmadapters.io import atomic_write_bytes
from mmadapters.vision.vlt5 import TINY_VLT5_DIR, VLT5

MAX_MB = 15.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--data", default=None, help="pretraining data folder, generated if absent (recipe.data; default data/vl_pretrain)")
    p.add_argument("--output", type=Path, default=TINY_VLT5_DIR, help="VL-T5 directory to write")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="the engine's run folder: history, best/, last/, train_state.pt (default runs/pretrain_vlt5/<output name>)")
    p.add_argument("--config", default=None, help="a vlt5-pretrain run config (e.g. configs/vlt5-pretrain.yaml); flags win")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (trainer.steps; default 3000)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-time budget of training (trainer.max_minutes; default 25, or the --config's)")
    p.add_argument("--init", default=None, help="continue from this VL-T5 directory (recipe.init; its tokenizer kept)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any run-config value, e.g. recipe.d_model=256, trainer.batch_size=64 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --run-dir (same other flags)")
    p.add_argument("--take", choices=["best", "last"], default="best", help="which checkpoint becomes --output")
    p.add_argument("--eval-images", type=int, default=400, help="held-out test images (and questions per QA task) scored")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--grounding-images", type=int, default=200, help="fresh downstream-stream images for the grounding check")
    p.add_argument("--grounding-seed", type=int, default=4242)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--evaluate-only", type=Path, default=None, metavar="DIR",
                   help="skip training: run the grounding check on the model in DIR and add it to DIR/README.md")
    return p.parse_args(argv)


def train_argv(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The ``mmadapters train vlt5-pretrain`` command line this script runs."""
    out = ["train", "vlt5-pretrain", "--output", str(run_dir)] + (["--config", args.config] if args.config else [])
    minutes = args.max_minutes if args.max_minutes is not None or args.config else 25.0
    flags = {"trainer.max_minutes": minutes, "recipe.data": args.data, "trainer.steps": args.steps, "recipe.init": args.init}
    sets = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]  # JSON is YAML: paths stay strings
    sets += ["trainer.progress=false"] if args.quiet else []
    for item in sets + args.overrides:
        out += ["--set", item]
    return out + (["--resume"] if args.resume else [])


def grounding(model: VLT5, clip: tuple, n_images: int, seed: int) -> dict:
    """Do greedy captions of *unseen* scenes name what is in them? Fresh images of the downstream stream
    (``pretrain=False``, ``seed``), captioned with ``"caption: "``; for the colour words, shape words and "N objects"
    counts the captions name: the share true of the captioned image, and of the next image (a chance baseline)."""
    from PIL import Image

    from mmadapters.vision.clip import load_clip
    from mmadapters.vision.synth_vl import NUM_WORDS, VL_COLOURS, VL_SHAPES, generate_vl
    from mmadapters.vision.vl_features import clip_grid_features

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        generate_vl(tmp, n_images=n_images, seed=seed, progress=False)
        scenes = [json.loads(line) for line in (Path(tmp) / "scenes.jsonl").read_text().splitlines()]
        clip, captions = load_clip(*clip), []
        for s in range(0, len(scenes), 64):
            chunk = scenes[s:s + 64]
            images = torch.stack([clip.preprocess(Image.open(Path(tmp) / "images" / f"{x['img_id']}.png").convert("RGB"))
                                  for x in chunk])
            ids, mask = model.encode_text(["caption: "] * len(chunk))
            captions += model.decode(model.generate(ids, mask, clip_grid_features(clip.model, images), max_new_tokens=48))

    def share(truths: list[dict]) -> dict:
        out = {}
        pairs = list(zip(captions, truths, strict=True))
        for key, vocab in (("colour", VL_COLOURS), ("shape", VL_SHAPES)):
            named = [(w, {o[key] for o in t["objects"]}) for c, t in pairs for w in re.findall(rf"\b({'|'.join(vocab)})s?\b", c)]
            out[key], out[f"{key}_mentions"] = round(sum(w in present for w, present in named) / max(len(named), 1), 3), len(named)
        counts = [(NUM_WORDS.index(m.group(1)), len(t["objects"])) for c, t in pairs
                  if (m := re.search(rf"\b({'|'.join(NUM_WORDS)}) (?:objects|shapes)\b", c))]
        out["count"], out["count_mentions"] = round(sum(a == b for a, b in counts) / max(len(counts), 1), 3), len(counts)
        return out

    return {"images": len(scenes), "seed": seed, "captioned_image": share(scenes), "other_image_baseline": share(scenes[1:] + scenes[:1]),
            "examples": captions[:5]}


def add_grounding(directory: Path, args: argparse.Namespace, command: str) -> dict:
    """Run :func:`grounding` on the model in ``directory`` and (re)write that section of its README."""
    meta = json.loads((directory / "vlt5.json").read_text(encoding="utf-8")).get("pretraining", {}).get("config", {})
    clip = (meta.get("clip_model"), meta.get("clip_pretrained"))  # the CLIP the model was pretrained on
    g = grounding(VLT5.from_pretrained(directory), clip, args.grounding_images, args.grounding_seed)
    print(json.dumps(g, indent=1), flush=True)
    rows = "\n".join(f"| {k} | {g['captioned_image'][k]} | {g['other_image_baseline'][k]} | {g['captioned_image'][k + '_mentions']} |"
                     for k in ("colour", "shape", "count"))
    section = f"""
## Grounding on unseen scenes

`{command}`: greedy captions of {g['images']} fresh images of the *downstream* stream
(`generate_vl(..., seed={g['seed']})`, never seen in pretraining). Share of the colour words, shape words and
"N objects" counts the captions name that are true of the captioned image, against the same captions judged
on another image (chance baseline):

| named | captioned image | other image | mentions |
|---|---|---|---|
{rows}

""" + "\n".join(f"- {c}" for c in g["examples"]) + "\n"
    readme = directory / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    atomic_write_bytes(readme, (text.split("\n## Grounding on unseen scenes")[0].rstrip("\n") + "\n" + section).encode())
    return g


def write_readme(output: Path, record: dict, size_mb: float, parameters: int, vocabulary: int) -> None:
    cfg, trainer, test = record["config"], record["trainer"], record["test"]
    metrics = list(record["history"][0]["metrics"]) if record["history"] else []
    history = "\n".join(f"| {e['step']} | {record['train_loss'].get(str(e['step']), '')} | "
                        + " | ".join(f"{e['metrics'][m]:.4g}" for m in metrics) + " |" for e in record["history"])
    others = ", ".join(f"{k} {v:.4g}" for k, v in test.items() if k not in ("images", "caption_bleu4", "caption_cider"))
    weights = ", ".join(f"{k} {v:g}" for k, v in cfg["objectives"].items() if v)
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
| `config.json`, `model.safetensors` | the T5 in transformers' own layout ({'fp16' if cfg['fp16'] else 'fp32'} weights; loads as float32) |
| `visual_projection.safetensors` | Linear(visual dim -> {cfg['d_model']}) + LayerNorm, {cfg['num_visual_tokens']} grid-position \
and 2 image-index embeddings |
| `tokenizer.json`, `tokenizer_config.json` | word-level T5-layout tokenizer (`<pad>`=0, `</s>`=1, `<unk>`=2, 100 \
sentinels), {vocabulary} ids |
| `vlt5.json` | visual_dim, num_visual_tokens, and under `pretraining` the full training record |

Model: T5 v1.0 layout (ReLU FFN, tied embeddings), d_model {cfg['d_model']}, d_ff {cfg['d_ff']}, {cfg['num_layers']} encoder +
{cfg['num_layers']} decoder layers, {cfg['num_heads']} heads, dropout {cfg['dropout']}; {parameters / 1e6:.2f} M parameters;
{size_mb:.2f} MB on disk.
Visual input: {cfg['num_visual_tokens']} CLIP grid tokens per image (`mmadapters.vision.vl_features.clip_grid_features`;
{cfg['clip_model'] or 'the shipped tiny CLIP'}).

## How it was made

```
{record['command']}
```

which ran `mmadapters {' '.join(shlex.quote(a) for a in record['train_argv'])}` (the recipe
`mmadapters.vision.vlt5_pretrain`; the run folder's `config.yaml` holds every setting). Data:
`generate_vl(DATA, n_images={cfg['n_images']}, seed={cfg['data_seed']}, pretrain=True)`, the pretraining stream (`synthpt_*`
images), disjoint from the downstream tasks (seed 0, `synth_*`); splits {record['data'].get('images')}. Objectives
(weights): {weights}; span corruption noise {cfg['noise_density']}, mean span {cfg['mean_span']}.
AdamW lr {trainer['lr']:g} ({trainer['schedule']}, warmup {trainer['warmup_ratio']:g} of the steps), weight decay
{trainer['weight_decay']:g}, batch {trainer['batch_size']}, gradient clip {trainer['grad_clip']}, {record['threads']} CPU thread(s).
Ran {record['steps']} steps in {record['train_minutes']:.1f} min (stopped by {record['stopped_by']}); this is
the {record['take']} checkpoint (step {record['checkpoint_step']}, selected on validation CIDEr).

Validation on the held-out val images (greedy captions: CIDEr, BLEU-4; per-token losses under a fixed draw):

| step | train loss | {' | '.join(metrics)} |
|---|---|{'---|' * len(metrics)}
{history}

## Measured (held-out pretraining test images)

{test['images']} test images: greedy captions (`max_new_tokens={cfg['max_new_tokens']}`) against their 5 references,
`mmadapters.eval.metrics.caption_scores` (pycocoevalcap BLEU(4) + CIDEr): BLEU-4 **{test['caption_bleu4']:.3f}**,
CIDEr **{test['caption_cider']:.3f}**. {others}.

Examples:
""" + "\n".join(f"- `{k}`: {v}" for k, v in record["examples"].items()) + """

`tests/test_vlt5.py` loads this directory by default and captions fresh downstream images (see the test
for its measured threshold).
"""
    atomic_write_bytes(output / "README.md", text.encode())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python scripts/pretrain_tiny_vlt5.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.evaluate_only is not None:
        add_grounding(args.evaluate_only, args, command)
        return 0
    from mmadapters.eval.cli import main as cli
    from mmadapters.training.config_io import load_yaml
    from mmadapters.training.recipe import build_run_config
    from mmadapters.vision.vlt5_pretrain import RECIPE, VLT5PretrainTask

    run_dir = args.run_dir or Path("runs/pretrain_vlt5") / args.output.name
    argv_train = train_argv(args, run_dir)
    status = cli(argv_train)
    if status:
        return status

    run = load_yaml(run_dir / "config.yaml")
    config = build_run_config(RECIPE, run, source=str(run_dir / "config.yaml")).recipe
    summary = json.loads((run_dir / "train_summary.json").read_text(encoding="utf-8"))
    taken = run_dir / args.take
    if not (taken / "vlt5.json").is_file():
        print(f"pretrain_tiny_vlt5: {taken} holds no model (no validation improved caption_cider?); try --take last",
              file=sys.stderr)
        return 2
    task = VLT5PretrainTask(dataclasses.replace(config, init=str(taken)), progress=not args.quiet)  # the trained weights
    test, records = task.evaluate("test", args.eval_images, args.eval_images)
    train_loss = {str(e["step"]): round(e["loss"], 4) for e in map(json.loads, (run_dir / "history.jsonl").read_text().splitlines())
                  if e["kind"] == "train"}
    record = {"command": command, "train_argv": argv_train, "run_dir": str(run_dir), "config": run["recipe"], "trainer": run["trainer"],
              "data": task.dataset.get("args", {}) | {"images": task.dataset.get("images")}, "take": args.take,
              "checkpoint_step": summary["best_step"] if args.take == "best" else summary["steps"],
              "steps": summary["steps"], "stopped_by": summary["stopped_by"], "threads": args.threads,
              "train_minutes": sum(summary["timings"][k] for k in ("train_s", "validate_s", "checkpoint_s")) / 60,
              "history": summary["history"], "train_loss": train_loss,
              "test": {"images": len(records), **{k: round(v, 4) for k, v in test.items()}},
              "examples": {r["img_ids"][0]: r["prediction"] for r in records[:5]}}
    print(json.dumps(record["test"], indent=1), flush=True)
    task.model.save_pretrained(args.output, fp16=config.fp16, extra={"pretraining": record})
    size_mb = sum(p.stat().st_size for p in args.output.iterdir() if p.is_file() and p.name != "README.md") / 2**20
    if size_mb > MAX_MB:
        print(f"warning: {args.output} is {size_mb:.1f} MB (> {MAX_MB} MB)", file=sys.stderr)
    write_readme(args.output, record, size_mb, task.parameter_counts()["total"], len(task.model.tokenizer))
    add_grounding(args.output, args, f"python scripts/pretrain_tiny_vlt5.py --evaluate-only {args.output}")
    print(f"saved {args.output} ({size_mb:.2f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
