"""FineCLIPER on generated cartoon-face expression clips: cue-level ablation against CLIP baselines.

    python scripts/run_fineclipper.py --data out/faces --n 700 --fold 1 --epochs 15 --output out/fineclipper

Generates the faces (``python -m mmadapters.video.synth faces``) if ``--data`` holds none, reads the DFEW-style
fold files, and reports UAR / WAR on the fold's test split for:

- frozen CLIP zero-shot (frame-mean feature scored against the positive/negative class descriptions),
- a CLIP linear probe on frozen frame-mean features,
- FineCLIPER with frames only, frames + middle level (masks, landmarks), frames + high level
  (descriptions), and all levels,

with trainable parameters and training time per variant. Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mmadapters.eval.results_io import json_bytes
from mmadapters.io import atomic_write_bytes
from mmadapters.video.cues import PrecomputedCues
from mmadapters.video.dfer import evaluate_fineclipper, linear_probe, load_split, train_fineclipper
from mmadapters.video.fineclipper import FineClipper, FineClipperConfig, parameter_report
from mmadapters.video.readers import DFEW_CLASSES, dfer_annotation_path, read_dfer_annotation
from mmadapters.vision.clip import load_clip

VARIANTS = {
    "FineCLIPER: frames only": (),
    "FineCLIPER: frames + masks + landmarks": ("masks", "landmarks"),
    "FineCLIPER: frames + descriptions": ("description",),
    "FineCLIPER: all levels": ("masks", "landmarks", "description"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="out/faces", help="generated faces folder (created if missing)")
    ap.add_argument("--n", type=int, default=700, help="clips to generate when --data is empty")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fold", type=int, default=1)
    ap.add_argument("--num-frames", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--adapter-dim", type=int, default=16)
    ap.add_argument("--model", default=None, help="CLIP (default: the shipped tiny CLIP)")
    ap.add_argument("--variants", default=None, help="comma-separated subset of: zeroshot,probe,frames,middle,high,all")
    ap.add_argument("--output", default="out/fineclipper")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = Path(args.data)
    if not (data / "dataset.json").is_file():
        from mmadapters.video.synth_faces import generate_faces

        generate_faces(data, n=args.n, seed=args.seed)
    cues = PrecomputedCues(data)
    rows = {}
    for split in ("train", "test"):
        ann = read_dfer_annotation(dfer_annotation_path("dfew", data / "annotation", split, args.fold), "dfew", root=data)
        rows[split] = [(str(a.frame_dir), a.label) for a in ann]
    needed = ("masks", "landmarks", "description")
    train = load_split(rows["train"], cues=cues, needed=needed, desc="train clips")
    test = load_split(rows["test"], cues=cues, needed=needed, desc="test clips")
    print(f"train {len(train.clips)} clips ({len(train.skipped)} skipped), test {len(test.clips)} ({len(test.skipped)} skipped)")

    wanted = set((args.variants or "zeroshot,probe,frames,middle,high,all").split(","))
    keys = dict(zip(("frames", "middle", "high", "all"), VARIANTS, strict=True))
    results = []

    def fresh(cue_levels, adapter_dim):
        bundle = load_clip(args.model)
        lm = train.clips[0].landmarks.shape[1] if train.clips and train.clips[0].landmarks is not None else None
        cfg = FineClipperConfig(cues=cue_levels, adapter_dim=adapter_dim, num_landmarks=lm)
        return FineClipper(bundle.model, bundle.tokenizer, DFEW_CLASSES, cfg)

    if "zeroshot" in wanted:
        model = fresh((), 0)
        res = evaluate_fineclipper(model, test, num_frames=args.num_frames)
        results.append({"variant": "CLIP zero-shot (frame mean, pos/neg descriptions)", "trainable_params": 0,
                        "trainable_pct": 0.0, "train_seconds": 0.0, **_metrics(res)})
    if "probe" in wanted:
        model = fresh((), 0)
        res = linear_probe(model, train, test, num_frames=args.num_frames, seed=args.seed)
        rep = parameter_report(model)
        results.append({"variant": "CLIP linear probe (frozen frame mean)", "trainable_params": res["trainable_params"],
                        "trainable_pct": 100.0 * res["trainable_params"] / rep["backbone_params"],
                        "train_seconds": res["train_seconds"], **_metrics(res)})
    for short, name in keys.items():
        if short not in wanted:
            continue
        torch.manual_seed(args.seed)
        model = fresh(VARIANTS[name], args.adapter_dim)
        rep = parameter_report(model)
        fit = train_fineclipper(model, train, num_frames=args.num_frames, epochs=args.epochs, batch_size=args.batch_size,
                                lr=args.lr, seed=args.seed)
        res = evaluate_fineclipper(model, test, num_frames=args.num_frames)
        results.append({"variant": name, "trainable_params": rep["trainable_params"], "trainable_pct": rep["trainable_pct"],
                        "train_seconds": fit["train_seconds"], "final_loss": fit["history"][-1]["loss"], **_metrics(res)})
        print(f"{name}: UAR {res['uar']:.3f} WAR {res['war']:.3f}")

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
               "data": str(data), "fold": args.fold, "train_clips": len(train.clips), "test_clips": len(test.clips),
               "skipped": {"train": len(train.skipped), "test": len(test.skipped)},
               "settings": {k: v for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "results": results}
    atomic_write_bytes(out / "results.json", json_bytes(payload))
    lines = ["| variant | trainable params (% of CLIP) | UAR | WAR | train s |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['trainable_params']:,} ({r['trainable_pct']:.2f}%) | {r['uar']:.3f} | "
                     f"{r['war']:.3f} | {r['train_seconds']:.0f} |")
    atomic_write_bytes(out / "results.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    print(json.dumps({"output": str(out / "results.json")}))
    return 0


def _metrics(res: dict) -> dict:
    return {"uar": res["uar"], "war": res["war"], "n": res["n"], "per_class_recall": res.get("per_class_recall", {})}


if __name__ == "__main__":
    raise SystemExit(main())
