"""VL-Adapter variants on generated VQA / GQA / NLVR2 / captioning data: trainable %, scores, average, time.

    python scripts/run_vl_adapter.py --data DATA --model VLT5_DIR --out out/vl_adapter
    python scripts/run_vl_adapter.py --data DATA --variants full_ft,shared_adapter --steps 20   # a quick check
    python scripts/run_vl_adapter.py --merge A/vl_adapter_results.json B/vl_adapter_results.json --out OUT
        # one table from runs made in parallel processes (same data, model and training settings required)

``DATA`` is a folder written by ``python -m mmadapters.vision.synth_vl`` (VQAv2 Karpathy JSON, GQA JSON,
NLVR2 JSONL, COCO Karpathy ``dataset_coco.json``, ``images/``); it is read with
:mod:`mmadapters.eval.vl_readers` (unreadable rows skipped and counted). ``--model`` is a VL-T5 directory
(default: the shipped tiny VL-T5). Image features come from ``--features`` (an ``.h5`` file or a folder of
``<img_id>.safetensors``) or are extracted once with the shipped tiny CLIP into ``OUT/features.h5``.

Every variant starts from the same fresh model, trains on the four train splits together
(:func:`mmadapters.vision.vl_adapter.train_multitask`; validation on the val splits picks the best
checkpoint), and is scored on the test splits: VQA accuracy, GQA and NLVR2 accuracy, COCO CIDEr (all x 100)
and their average. Writes ``OUT/vl_adapter_results.json`` (all runs, updated after each variant) and
``OUT/vl_adapter_results.md`` (the table for docs/results.md).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmadapters.vision.vl_adapter import VARIANTS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="generated VL data folder (python -m mmadapters.vision.synth_vl)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="RESULTS_JSON",
                   help="instead of training: merge the runs of these results files into OUT (first run of a variant wins)")
    p.add_argument("--model", type=Path, default=None, help="VL-T5 directory (default: the shipped tiny VL-T5)")
    p.add_argument("--features", type=Path, default=None, help="image features: .h5 file or folder of <img_id>.safetensors "
                   "(default: extracted with the shipped tiny CLIP into OUT/features.h5)")
    p.add_argument("--out", type=Path, default=Path("out/vl_adapter"), help="results folder")
    p.add_argument("--variants", default="all", help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training data (paper: 20)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: every epoch)")
    p.add_argument("--max-val", type=int, default=200, help="validation samples per task (0: all)")
    p.add_argument("--max-test", type=int, default=0, help="test samples per task (0: all)")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiply every variant's default learning rate")
    p.add_argument("--reduction-factor", type=float, default=8.0)
    p.add_argument("--per-task", action="store_true", help="compacter, phm_adapter, lora, prompt: one set per task "
                   "(the paper's 'multiple' rows) instead of one for all tasks")
    p.add_argument("--max-new-tokens", type=int, default=20, help="generation length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save-checkpoints", action="store_true", help="write each variant's trained parameters under OUT/<variant>/")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.merge is None and args.data is None:
        p.error("--data is required (unless --merge)")
    args.variants = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    return args


PER_TASK_OPTIONAL = ("compacter", "phm_adapter", "lora", "prompt")
SPLIT_FILES = {  # task -> (reader, {split: file relative to DATA})
    "vqa": ("read_vqa", {"train": "vqa/karpathy_train.json", "val": "vqa/karpathy_val.json", "test": "vqa/karpathy_test.json"}),
    "gqa": ("read_gqa", {"train": "gqa/train.json", "val": "gqa/valid.json", "test": "gqa/testdev.json"}),
    "nlvr": ("read_nlvr2", {"train": "nlvr/train.json", "val": "nlvr/valid.json", "test": "nlvr/test.json"}),
}


def load_splits(data: Path) -> tuple[dict[str, dict[str, list]], dict[str, Any]]:
    """split -> task -> samples, and per file how many rows were skipped."""
    from mmadapters.eval import vl_readers

    splits: dict[str, dict[str, list]] = {"train": {}, "val": {}, "test": {}}
    skipped: dict[str, int] = {}
    for task, (reader, files) in SPLIT_FILES.items():
        for split, rel in files.items():
            rows = getattr(vl_readers, reader)(data / rel, on_error="skip")
            splits[split][task] = list(rows)
            skipped[rel] = len(rows.skipped)
    coco = data / "coco" / "dataset_coco.json"
    for split in ("train", "val", "test"):
        rows = vl_readers.read_coco_karpathy(coco, (split,), on_error="skip")
        splits[split]["caption"] = list(rows)
        skipped[f"coco/dataset_coco.json[{split}]"] = len(rows.skipped)
    return splits, skipped


def feature_source(args: argparse.Namespace, num_tokens: int, visual_dim: int):
    from mmadapters.eval.vl_readers import H5Features, SafetensorsDirFeatures

    path = args.features
    if path is None:
        path = args.out / "features.h5"
        if not path.exists():
            from mmadapters.vision.clip import load_clip
            from mmadapters.vision.vl_features import extract_features

            images = {p.stem: p for p in sorted((args.data / "images").glob("*.png"))}
            if not images:
                raise FileNotFoundError(f"{args.data / 'images'}: no .png images to extract features from")
            extract_features(images, load_clip(), path, num_tokens=num_tokens, progress=not args.quiet)
    source = H5Features(path) if path.suffix in (".h5", ".hdf5") else SafetensorsDirFeatures(path)
    if (source.num_tokens, source.dim) != (num_tokens, visual_dim):
        raise ValueError(f"{path}: features are {source.num_tokens} tokens x {source.dim}, the VL-T5 expects "
                         f"{num_tokens} x {visual_dim} (its vlt5.json)")
    return source


def markdown(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    full = next((r for r in runs if r["variant"] == "full_ft"), None)
    lines = [f"VL-Adapter variants on generated data ({meta['data']}), model {meta['model']}, "
             f"{meta['backbone_params']:,} backbone parameters, device {meta['device']}.", "",
             "| variant | trainable params | trainable % | VQA | GQA | NLVR | CIDEr | average | vs full FT | train s | steps |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def score(run, task):
        t = run["test"].get(task)
        return "–" if t is None or t["score"] is None or math.isnan(t["score"]) else f"{100 * t['score']:.1f}"

    for r in runs:
        delta = "–" if full is None or r is full else f"{r['average'] - full['average']:+.1f}"
        h = r["history"]
        name = r["variant"] + (" (per task)" if r["config"].get("per_task") else "")
        params = r["parameters"]
        lines.append(f"| {name} | {params['trainable']:,} | {params['trainable_pct']:.2f} | {score(r, 'vqa')} | {score(r, 'gqa')} | "
                     f"{score(r, 'nlvr')} | {score(r, 'caption')} | {r['average']:.1f} | {delta} | "
                     f"{h['train_seconds']:.0f} | {h['total_steps']} |")
    return "\n".join(lines) + "\n"


SAME_SETTINGS = ("--data", "--model", "--features", "--epochs", "--steps", "--batch-size", "--eval-every", "--max-val",
                 "--max-test", "--lr-scale", "--reduction-factor", "--per-task", "--max-new-tokens", "--seed", "--device")


def _settings(argv: list[str]) -> dict[str, str]:
    """The training settings a results file was made with (flags of SAME_SETTINGS -> value)."""
    out, i = {}, 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in SAME_SETTINGS:
            if "=" in argv[i]:
                out[flag] = argv[i].split("=", 1)[1]
            elif flag == "--per-task":
                out[flag] = "on"
            elif i + 1 < len(argv):
                out[flag], i = argv[i + 1], i + 1
        i += 1
    return out


def merge(files: list[Path], out: Path) -> int:
    """One table from several results files whose runs share data, model and settings (else a named error)."""
    import json

    from mmadapters.eval.results_io import write_results
    from mmadapters.io import atomic_write_bytes

    payloads = [(f, json.loads(f.read_text(encoding="utf-8"))) for f in files]
    ref_file, ref = payloads[0]
    runs, seen = [], set()
    for f, payload in payloads:
        for key in ("data", "model", "backbone_params", "counts"):
            if payload["meta"].get(key) != ref["meta"].get(key):
                raise SystemExit(f"--merge: {f}: meta field {key!r} differs from {ref_file}'s")
        a, b = _settings(ref["meta"]["argv"]), _settings(payload["meta"]["argv"])
        diff = sorted(k for k in set(a) | set(b) if k != "--features" and a.get(k) != b.get(k))
        if diff:
            raise SystemExit(f"--merge: {f}: settings {diff} differ from {ref_file}'s ({[a.get(k) for k in diff]} vs "
                             f"{[b.get(k) for k in diff]})")
        runs += [r for r in payload["runs"] if r["variant"] not in seen]
        seen |= {r["variant"] for r in payload["runs"]}
    meta = {**ref["meta"], "merged_from": [str(f) for f in files]}
    out.mkdir(parents=True, exist_ok=True)
    write_results(out / "vl_adapter_results.json", {"meta": meta, "runs": runs})
    atomic_write_bytes(out / "vl_adapter_results.md", markdown(runs, meta).encode())
    print(markdown(runs, meta))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge is not None:
        return merge(args.merge, args.out)
    from mmadapters.eval.results_io import jsonable, write_results
    from mmadapters.io import atomic_write_bytes
    from mmadapters.vision.vl_adapter import DEFAULT_LR, FeatureCache, VLAdapterConfig, run_variant
    from mmadapters.vision.vlt5 import VLT5, resolve_vlt5_dir

    model_dir = resolve_vlt5_dir(args.model)
    probe = VLT5.from_pretrained(model_dir)
    backbone = sum(p.numel() for p in {id(p): p for p in probe.parameters()}.values())
    splits, skipped_rows = load_splits(args.data)
    features = FeatureCache(feature_source(args, probe.num_visual_tokens, probe.visual_dim))
    del probe
    if args.max_val:
        splits["val"] = {t: s[: args.max_val] for t, s in splits["val"].items()}
    if args.max_test:
        splits["test"] = {t: s[: args.max_test] for t, s in splits["test"].items()}
    meta = {"data": str(args.data), "model": str(model_dir), "device": args.device, "backbone_params": backbone,
            "counts": {split: {t: len(s) for t, s in by_task.items()} for split, by_task in splits.items()},
            "skipped_rows": skipped_rows, "argv": sys.argv[1:] if argv is None else list(argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for variant in args.variants:
        config = VLAdapterConfig(variant=variant, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
                                 eval_every=args.eval_every, lr=DEFAULT_LR[variant] * args.lr_scale,
                                 reduction_factor=args.reduction_factor, seed=args.seed, device=args.device,
                                 max_new_tokens=args.max_new_tokens, progress=not args.quiet,
                                 per_task=True if args.per_task and variant in PER_TASK_OPTIONAL else None)
        print(f"[{variant}] lr {config.learning_rate:g}", flush=True)
        result = run_variant(lambda: VLT5.from_pretrained(model_dir), config, splits["train"], splits["test"], features,
                             val=splits["val"], output_dir=args.out / variant if args.save_checkpoints else None)
        run = result.as_dict()
        run["history"]["losses"] = run["history"]["losses"][-50:]  # the tail is enough for the record
        runs.append(jsonable(run))
        print(f"[{variant}] trainable {result.parameters.trainable_pct:.2f}%  average {result.average:.1f}  "
              f"train {result.history.train_seconds:.0f}s  " +
              "  ".join(f"{t} {100 * r['score']:.1f}" for t, r in result.test.items()), flush=True)
        payload = {"meta": {**meta, "seconds": time.perf_counter() - t_all},
                   "runs": runs}
        write_results(args.out / "vl_adapter_results.json", payload)
        atomic_write_bytes(args.out / "vl_adapter_results.md", markdown(runs, meta).encode())
    print(markdown(runs, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
