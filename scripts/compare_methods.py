"""Adapter methods compared on one generated vision task, at matched parameter budgets.

Task: a generated classification task with domain shift (default ``shapes-sketch``: 10 shapes drawn as
sketches, a style that is rare in the tiny CLIP's pretraining) on the shipped tiny CLIP. Each method
adapts the image tower; the head is the frozen zero-shot text classifier (logits = 100 * f(x) . W),
the loss cross-entropy, the optimizer AdamW. Each method runs at every learning rate of ``--lr`` and
every seed; the best epoch and then the learning rate (mean over seeds) are picked on the val split
only, and the test split is scored with that epoch's adapter, reloaded from disk onto a fresh copy of the model
(so the storage column is the real file and the score is what a user who loads it gets).

Methods (``--methods``; default all):

- LLM-Adapters' comparison: ``series_*`` / ``parallel_*`` bottleneck adapters and ``lora_*`` placed
  after attention (``attn``), after the MLP (``ffn``) or both, each sized to the same budget
  (``--budget`` trainable parameters: the size whose count is closest is picked and reported).
- The core's other methods: ``compacter``, ``phm_adapter``.
- The founding papers' extra methods: ``mosa`` (Split & Merge: sparse training, merged into one
  bottleneck after training, so it is scored and stored as a plain adapter), ``sorsa`` (SVD-initialized
  principal part with the orthonormal regularizer, ``--sorsa-gamma``), ``sparse_ft`` (lottery-ticket
  sparse fine-tuning: dense phase, keep the top-K changed weights, retrain those from zero; K = budget),
  ``llama_adapter`` (zero-gated adaptation prompts in the top attention layers plus unlocked bias/scale/
  norm parameters).

    .venv/bin/python scripts/compare_methods.py --markdown out/compare_methods.md         # ~15 min, 2 CPU cores
    .venv/bin/python scripts/compare_methods.py --methods series_both,lora_both --epochs 2 --seeds 0
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import mmadapters as mma
from mmadapters.io import atomic_write_bytes
from mmadapters.vision import synth
from mmadapters.vision.clip import load_clip
from mmadapters.vision.zeroshot import build_classifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lowbit_accuracy import accuracy as _accuracy  # noqa: E402  (the same task loading and scoring)
from lowbit_accuracy import load_split  # noqa: E402

ATTN, FFN = "@image_attn_out", "@image_ffn_out"
PLACES = {"attn": [ATTN], "ffn": [FFN], "both": [ATTN, FFN]}
PLACE_WORDS = {"attn": "attention", "ffn": "the MLP", "both": "attention and the MLP"}
LORA_PLACES = {"attn": ["@image_attn"], "ffn": ["@image_mlp_in", FFN], "both": ["@image_attn", "@image_mlp_in", FFN]}
TOP_ATTN = ["visual.transformer.resblocks.1.attn", "visual.transformer.resblocks.2.attn"]


@dataclass
class Method:
    """How to build one method at a given size, and what its training needs beyond the common loop."""

    family: str
    make: Callable[[int], mma.AdapterConfig]  # size -> config
    sizes: tuple[int, ...]  # candidate sizes; the one closest to the budget is used
    note: str = ""
    after_training: Callable | None = None  # (model, name) -> None, before saving
    regularizer: Callable | None = None  # (model, name) -> scalar tensor added to the loss
    procedure: str = "plain"  # "plain" | "lottery_ticket"
    fixed_size: bool = False  # the size is not matched to the budget (e.g. prompts)
    extra: dict = field(default_factory=dict)


def _methods(args) -> dict[str, Method]:
    out: dict[str, Method] = {}
    dims = tuple(range(1, 65))
    for place, targets in PLACES.items():
        out[f"series_{place}"] = Method("series", lambda b, t=targets: mma.BottleneckConfig(
            placement="series", bottleneck_dim=b, target_modules=t), dims, f"series adapter after {PLACE_WORDS[place]}")
        out[f"parallel_{place}"] = Method("parallel", lambda b, t=targets: mma.BottleneckConfig(
            placement="parallel", bottleneck_dim=b, target_modules=t), dims, f"parallel adapter beside {PLACE_WORDS[place]}")
    for place, targets in LORA_PLACES.items():
        out[f"lora_{place}"] = Method("lora", lambda r, t=targets: mma.LoRAConfig(r=r, alpha=2 * r, target_modules=t),
                                      dims, f"LoRA on the projections of {PLACE_WORDS[place]}")
    out["compacter"] = Method("compacter", lambda b: mma.CompacterConfig.compacter(
        bottleneck_dim=4 * b, phm_dim=4, target_modules=PLACES["both"]), tuple(range(1, 33)), "Compacter (factorized, shared rule)")
    out["phm_adapter"] = Method("phm_adapter", lambda b: mma.CompacterConfig.phm_adapter(
        bottleneck_dim=4 * b, phm_dim=4, target_modules=PLACES["both"]), tuple(range(1, 33)), "plain PHM adapter")
    try:
        from mmadapters.methods import mosa

        out["mosa"] = Method("mosa", lambda b: mosa.MoSAConfig(bottleneck_dim=b, num_modules=args.mosa_modules,
                                                               target_modules=PLACES["both"]),
                             tuple(range(args.mosa_modules, 65)), f"MoSA, {args.mosa_modules} modules, merged after training",
                             after_training=lambda m, n: mosa.merge_mosa(m, n))
    except ImportError:
        pass
    try:
        from mmadapters.methods import sorsa

        out["sorsa"] = Method("sorsa", lambda r: sorsa.SORSAConfig(r=r, target_modules=["@image_attn", "@image_mlp_in", FFN]),
                              dims, f"SORSA (gamma {args.sorsa_gamma})",
                              regularizer=lambda m, n: args.sorsa_gamma * sorsa.orthonormal_regularizer(m, n))
    except ImportError:
        pass
    try:
        from mmadapters.methods import sparse_ft

        out["sparse_ft"] = Method("sparse_ft", lambda k: sparse_ft.SparseFTConfig(
            num_params=k, target_modules=["@image_attn", "@image_mlp_in", FFN]), (), "lottery-ticket sparse FT",
            procedure="lottery_ticket")
    except ImportError:
        pass
    try:
        from mmadapters.methods import llama_adapter

        out["llama_adapter"] = Method("llama_adapter", lambda p: llama_adapter.LlamaAdapterConfig(
            num_prompts=p, target_modules=TOP_ATTN), tuple(range(1, 65)),
            "LLaMA-Adapter (V1): gated prompts in the top 2 attention layers")
        out["llama_adapter_v2"] = Method("llama_adapter_v2", lambda p: llama_adapter.LlamaAdapterConfig.v2(
            bias_scale=["@image_attn", "@image_mlp_in", FFN], num_prompts=p, target_modules=TOP_ATTN), tuple(range(1, 65)),
            "LLaMA-Adapter V2: + bias/scale of every linear layer and norms")
    except ImportError:
        pass
    return out


@torch.no_grad()
def accuracy(model, weights, x, y) -> float:
    model.eval()
    return _accuracy(model, weights, x, y)


def count_trainable(base, method: Method, size: int) -> int:
    model = copy.deepcopy(base)
    mma.add_adapter(model, "probe", method.make(size))
    return sum(p.numel() for p in mma.adapter_parameters(model, "probe").values())


def pick_size(base, method: Method, budget: int) -> tuple[int, int]:
    """The candidate size whose trainable-parameter count is closest to ``budget`` (counts grow with size)."""
    if method.procedure == "lottery_ticket":
        return budget, budget
    best = None
    for size in method.sizes:
        n = count_trainable(base, method, size)
        if best is None or abs(n - budget) < abs(best[1] - budget):
            best = (size, n)
        if n > budget:
            break
    return best


class Trainer:
    """The common loop: AdamW, cross-entropy against the frozen text head, val-selected best state."""

    def __init__(self, model, name: str, weights, data, args, method: Method, seed: int, lr: float):
        self.model, self.name, self.weights, self.data, self.args, self.method = model, name, weights, data, args, method
        self.lr = lr
        self.gen = torch.Generator().manual_seed(seed)

    def batches(self):
        xtr, ytr = self.data["train"]
        while True:
            for idx in torch.randperm(len(xtr), generator=self.gen).split(self.args.batch_size):
                yield xtr[idx], ytr[idx]

    def steps(self, params: list[torch.Tensor], steps: int, select: bool = True) -> tuple[float, int]:
        """Train ``params`` for ``steps`` steps; with ``select``, evaluate on val every epoch and restore the best."""
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        per_epoch = -(-len(self.data["train"][0]) // self.args.batch_size)
        best, best_step, best_state = -1.0, 0, None
        it = self.batches()
        for step in range(1, steps + 1):
            self.model.train()
            x, y = next(it)
            f = F.normalize(self.model.encode_image(x), dim=-1)
            loss = F.cross_entropy(100 * f @ self.weights, y)
            if self.method.regularizer is not None:
                loss = loss + self.method.regularizer(self.model, self.name)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if select and (step % per_epoch == 0 or step == steps):
                acc = accuracy(self.model, self.weights, *self.data["val"])
                if acc > best:
                    best, best_step = acc, step
                    best_state = {k: v.detach().clone() for k, v in mma.adapter_parameters(self.model, self.name).items()}
        if select and best_state is not None:
            with torch.no_grad():
                for k, p in mma.adapter_parameters(self.model, self.name).items():
                    p.copy_(best_state[k])
        return best, best_step


def run_one(base, name: str, method: Method, size: int, weights, data, args, seed: int, lr: float) -> dict:
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    per_epoch = -(-len(data["train"][0]) // args.batch_size)
    total = args.epochs * per_epoch
    start = time.perf_counter()
    if method.procedure == "lottery_ticket":
        from mmadapters.methods import sparse_ft

        trainer = Trainer(model, name, weights, data, args, method, seed, lr)
        config = method.make(size)
        results = {}

        def train_fn(m, params, steps):
            results["val"] = trainer.steps(list(params), steps, select=results.get("phase", 0) == 1)
            results["phase"] = results.get("phase", 0) + 1

        sparse_ft.lottery_ticket_sparse_ft(model, name, config, train_fn, full_steps=total, sparse_steps=total)
        val, best_step = results["val"]
    else:
        mma.add_adapter(model, name, method.make(size))
        mma.set_active(model, name)
        mma.freeze_base(model)
        trainer = Trainer(model, name, weights, data, args, method, seed, lr)
        val, best_step = trainer.steps([p for p in model.parameters() if p.requires_grad], total)
    if method.after_training is not None:
        method.after_training(model, name)
    train_s = time.perf_counter() - start
    trainable = sum(p.numel() for p in mma.adapter_parameters(model, name).values())
    with tempfile.TemporaryDirectory() as tmp:
        mma.save_adapter(model, name, Path(tmp) / name)
        stored = mma.storage_report(Path(tmp) / name).as_dict()["files"]["adapter_model.safetensors"]
        fresh = copy.deepcopy(base)
        mma.load_adapter(fresh, Path(tmp) / name)
        mma.set_active(fresh, name)
        test = accuracy(fresh, weights, *data["test"])
    return {"method": name, "family": method.family, "size": size, "seed": seed, "lr": lr, "trainable": trainable,
            "storage_bytes": stored, "val_acc": val, "best_epoch": best_step / per_epoch, "test_acc": test,
            "train_seconds": round(train_s, 1)}


def summarize(rows: list[dict], backbone: int, methods: dict[str, Method]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == name]
        lrs = sorted({r["lr"] for r in runs})
        best_lr = max(lrs, key=lambda lr: statistics.mean(r["val_acc"] for r in runs if r["lr"] == lr))
        rs = [r for r in runs if r["lr"] == best_lr]
        accs = [r["test_acc"] for r in rs]
        out.append({"method": name, "note": methods[name].note if name in methods else "", "size": rs[0]["size"],
                    "trainable": rs[0]["trainable"], "trainable_pct": 100 * rs[0]["trainable"] / backbone,
                    "storage_bytes": rs[0]["storage_bytes"], "lr": best_lr,
                    "val_mean": statistics.mean(r["val_acc"] for r in rs), "test_mean": statistics.mean(accs),
                    "test_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0, "seeds": len(accs),
                    "train_seconds": statistics.mean(r["train_seconds"] for r in rs)})
    return out


def markdown(summary: list[dict], zeroshot: float) -> str:
    lines = ["| method | size | trainable | % of image tower | storage bytes | lr (val) | test acc | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| zero-shot (no adapter) | — | 0 | 0 | — | — | {zeroshot:.3f} | — |"]
    for s in summary:
        lines.append(f"| {s['method']} — {s['note']} | {s['size']} | {s['trainable']:,} | {s['trainable_pct']:.2f} | "
                     f"{s['storage_bytes']:,} | {s['lr']:g} | {s['test_mean']:.3f} ± {s['test_std']:.3f} | {s['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="shapes-sketch", choices=sorted(synth.TASKS))
    ap.add_argument("--data-root", default="out/synth_compare", help="the generated task goes to DATA_ROOT/<task>")
    ap.add_argument("--train-per-class", type=int, default=48)
    ap.add_argument("--val-per-class", type=int, default=16)
    ap.add_argument("--test-per-class", type=int, default=40)
    ap.add_argument("--methods", default="all", help="comma-separated method names, or 'all'")
    ap.add_argument("--budget", type=int, default=9216, help="trainable parameters each budget-matched method aims at")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", default="3e-3,1e-2", help="comma-separated learning rates; the best is picked on val")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--mosa-modules", type=int, default=4)
    ap.add_argument("--sorsa-gamma", type=float, default=4e-4, help="weight of the orthonormal regularizer (official default)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default="out/compare_methods.json")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    methods = _methods(args)
    names = list(methods) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in methods]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; available: {sorted(methods)}")
    root = synth.generate_task(args.task, Path(args.data_root) / args.task, train_per_class=args.train_per_class,
                               val_per_class=args.val_per_class, test_per_class=args.test_per_class)
    bundle = load_clip(None)
    base = bundle.model.eval()
    backbone = sum(p.numel() for p in base.visual.parameters())
    classnames = (root / "classnames.txt").read_text().splitlines()
    templates = (root / "templates.txt").read_text().splitlines()
    with torch.no_grad():
        weights = build_classifier(base, bundle.tokenizer, classnames, templates)
    data = {s: load_split(root, s, bundle.preprocess) for s in ("train", "val", "test")}
    zeroshot = accuracy(base, weights, *data["test"])
    print(f"zero-shot test accuracy {zeroshot:.4f}; image tower {backbone:,} parameters", flush=True)
    rows = []
    for name in names:
        method = methods[name]
        size, n = pick_size(base, method, args.budget)
        for lr in (float(v) for v in args.lr.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                row = run_one(base, name, method, size, weights, data, args, seed, lr)
                rows.append(row)
                print(f"{name} size={size} trainable={row['trainable']:,} lr={lr:g} seed={seed}: val {row['val_acc']:.3f} "
                      f"test {row['test_acc']:.3f} ({row['train_seconds']:.0f} s)", flush=True)
    summary = summarize(rows, backbone, methods)
    text = markdown(summary, zeroshot)
    print(text)
    result = {"task": args.task, "settings": {k: v for k, v in vars(args).items() if k not in ("output", "markdown")},
              "zeroshot_test_acc": zeroshot, "image_tower_params": backbone, "rows": rows, "summary": summary,
              "command": " ".join(["scripts/compare_methods.py", *(argv if argv is not None else sys.argv[1:])]),
              "wall_seconds": round(time.time() - start, 1)}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(result, indent=2).encode())
    if args.markdown:
        atomic_write_bytes(Path(args.markdown), text.encode())
    return result


if __name__ == "__main__":
    main()
