"""Accuracy cost of low-bit adapter storage on a real task (issue: many adapters, low-bit storage).

Task: a generated few-shot classification task with domain shift (default ``shapes-sketch``) on the
shipped tiny CLIP. An adapter on the image tower (LoRA on attention + MLP, or a Houlsby bottleneck) is
trained with the frozen zero-shot text classifier as the head (logits = 100 · f(x) · W, cross-entropy)
on the task's train split; the best epoch is picked on the val split. The adapter is then saved at full
precision and at 8/4/2/1 bits, reloaded onto a fresh copy of the model, and scored on the test split.

    .venv/bin/python scripts/lowbit_accuracy.py                    # ~2-4 min on 2 CPU cores
    .venv/bin/python scripts/lowbit_accuracy.py --task colours-noisy --epochs 30 --markdown out/lowbit.md
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import mmadapters as mma
from mmadapters.io import atomic_write_bytes
from mmadapters.vision import synth
from mmadapters.vision.clip import load_clip
from mmadapters.vision.zeroshot import build_classifier

METHODS = {
    "lora": lambda: mma.LoRAConfig(r=8, alpha=16, target_modules=["@image_attn", "@image_mlp_in"]),
    "bottleneck": lambda: mma.BottleneckConfig.houlsby(bottleneck_dim=16, target_modules=["@image_attn_out", "@image_ffn_out"]),
}


def load_split(root: Path, split: str, preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    folders = sorted(p for p in (root / split).iterdir() if p.is_dir())
    xs, ys = [], []
    for label, folder in enumerate(folders):
        for path in sorted(folder.glob("*.png")):
            with Image.open(path) as im:
                xs.append(preprocess(im.convert("RGB")))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def accuracy(model, weights, x, y, batch: int = 256) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        f = F.normalize(model.encode_image(x[i : i + batch]), dim=-1)
        correct += ((100 * f @ weights).argmax(-1) == y[i : i + batch]).sum().item()
    return correct / len(x)


def train(model, name, weights, data, epochs: int, lr: float, seed: int) -> tuple[float, int]:
    (xtr, ytr), (xva, yva) = data["train"], data["val"]
    mma.set_active(model, name)
    mma.freeze_base(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    best, best_epoch, best_state = -1.0, -1, None
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=g).split(32):
            f = F.normalize(model.encode_image(xtr[idx]), dim=-1)
            loss = F.cross_entropy(100 * f @ weights, ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        acc = accuracy(model, weights, xva, yva)
        if acc > best:
            best, best_epoch = acc, epoch
            best_state = {k: v.detach().clone() for k, v in mma.adapter_parameters(model, name).items()}
    with torch.no_grad():
        for k, p in mma.adapter_parameters(model, name).items():
            p.copy_(best_state[k])
    return best, best_epoch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="shapes-sketch", choices=sorted(synth.TASKS))
    ap.add_argument("--data-root", default="out/synth", help="generated tasks go to DATA_ROOT/<task>")
    ap.add_argument("--methods", default="lora,bottleneck")
    ap.add_argument("--bits", default="8,4,2,1")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="out/lowbit_accuracy.json")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.time()
    root = synth.generate_task(args.task, Path(args.data_root) / args.task)
    bundle = load_clip(None)
    base = bundle.model
    classnames = (root / "classnames.txt").read_text().splitlines()
    templates = (root / "templates.txt").read_text().splitlines()
    with torch.no_grad():
        weights = build_classifier(base, bundle.tokenizer, classnames, templates)
    data = {s: load_split(root, s, bundle.preprocess) for s in ("train", "val", "test")}
    xte, yte = data["test"]
    rows = [{"method": "zero-shot (no adapter)", "bits": None, "test_acc": accuracy(base, weights, xte, yte)}]
    print(f"zero-shot test accuracy {rows[0]['test_acc']:.4f}", flush=True)
    for method in args.methods.split(","):
        model = copy.deepcopy(base)
        mma.add_adapter(model, method, METHODS[method]())
        val, epoch = train(model, method, weights, data, args.epochs, args.lr, args.seed)
        report = mma.parameter_report(model)
        with tempfile.TemporaryDirectory() as tmp:
            for bits in [None, *[int(b) for b in args.bits.split(",")]]:
                d = Path(tmp) / f"{method}-{bits}"
                mma.save_adapter(model, method, d, bits=bits)
                size = mma.storage_report(d).as_dict()
                fresh = copy.deepcopy(base)
                mma.load_adapter(fresh, d)
                mma.set_active(fresh, method)
                acc = accuracy(fresh.eval(), weights, xte, yte)
                rows.append({"method": method, "bits": bits or 32, "test_acc": acc, "val_acc_fp32": val,
                             "best_epoch": epoch, "adapter_params": report.adapters,
                             "weights_bytes": size["files"]["adapter_model.safetensors"]})
                print(f"{method} bits={bits or 32}: test {acc:.4f} ({rows[-1]['weights_bytes']} bytes)", flush=True)
    result = {"task": args.task, "epochs": args.epochs, "lr": args.lr, "seed": args.seed, "rows": rows,
              "command": " ".join(["scripts/lowbit_accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
              "wall_seconds": round(time.time() - start, 1)}
    md = ["| adapter | bits | test acc | Δ vs fp32 | weights file bytes |", "|---|---:|---:|---:|---:|"]
    fp32 = {r["method"]: r["test_acc"] for r in rows if r["bits"] == 32}
    for r in rows:
        if r["bits"] is None:
            md.append(f"| {r['method']} | — | {r['test_acc']:.3f} | — | — |")
        else:
            md.append(f"| {r['method']} ({r['adapter_params']:,} params) | {r['bits']} | {r['test_acc']:.3f} | "
                      f"{r['test_acc'] - fp32[r['method']]:+.3f} | {r['weights_bytes']:,} |")
    text = "\n".join(md) + "\n"
    print(text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(result, indent=2).encode())
    if args.markdown:
        atomic_write_bytes(Path(args.markdown), text.encode())
    return result


if __name__ == "__main__":
    main()
