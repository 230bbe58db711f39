"""Core benchmark: mixed-adapter batches, adapter overheads, training steps — ratios against peers.

One process measures everything (memory of training steps is measured in fresh child processes, since a
process's RSS high-water mark cannot be reset); every figure is a ratio of medians taken in this run,
with the configurations interleaved round-robin so that drift in machine load hits all of them alike.

Model: open_clip's ViT-B-32 visual tower, random init; LoRA r=8 on the MLP linears (c_fc, c_proj).

    .venv/bin/python bench/core.py                      # full run (CPU: a few minutes)
    .venv/bin/python bench/core.py --quick              # smoke run, under a minute
    .venv/bin/python bench/core.py --device cuda --batch 64 --ks 1,16,64 --rank 16   # the GPU setting

Writes ``--out``.json and ``--out``.md; ``--append-results docs/results.md`` appends the table with the
command and the machine.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import threading
import time

import torch
from torch import nn

import mmadapters as mma
from mmadapters.eval.results_io import write_bench_report

TARGETS = ["c_fc", "c_proj"]


# -- setup ------------------------------------------------------------------------------------------------
def vit_b32(device: str) -> nn.Module:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    return model.visual.to(device).eval()


def randomize_(params, seed: int, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype))


def ours_lora(base: nn.Module, names: list[str], rank: int) -> nn.Module:
    model = copy.deepcopy(base)
    for i, n in enumerate(names):
        mma.add_adapter(model, n, mma.LoRAConfig(r=rank, alpha=2 * rank, target_modules=TARGETS))
        randomize_(mma.adapter_parameters(model, n).values(), i)
    return model


def ours_bottleneck(base: nn.Module, names: list[str], dim: int) -> nn.Module:
    model = copy.deepcopy(base)
    for i, n in enumerate(names):
        mma.add_adapter(model, n, mma.BottleneckConfig(bottleneck_dim=dim, target_modules=["mlp.c_proj"]))
        randomize_(mma.adapter_parameters(model, n).values(), i)
    return model


def peft_lora(base: nn.Module, names: list[str], rank: int) -> nn.Module:
    import peft

    cfg = dict(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg), adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, peft.LoraConfig(**cfg))
    for i, n in enumerate(names):
        randomize_([p for k, p in model.named_parameters() if f".{n}." in k and "lora_" in k], i)
    model.set_adapter(names[0])
    return model.eval()


def mixed_names(batch: int, k: int) -> list[str]:
    return [f"a{i % k}" for i in range(batch)]


# -- timing -----------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict, reps: int, device: str, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, run round-robin."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(reps):
            for k, fn in fns.items():
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# -- sections ---------------------------------------------------------------------------------------------
def bench_mixed(base, args, x) -> list[dict]:
    b = x.shape[0]
    kmax = max(args.ks)
    names = [f"a{i}" for i in range(kmax)]
    ours = ours_lora(base, names, args.rank)
    peft_model = peft_lora(base, names, args.rank)
    bott = ours_bottleneck(base, names, args.bottleneck_dim)
    mma.set_active(ours, "a0")
    mma.set_active(bott, "a0")
    rows = []
    for k in args.ks:
        batch_names = mixed_names(b, k)
        groups = {n: [i for i, m in enumerate(batch_names) if m == n] for n in dict.fromkeys(batch_names)}

        def routed(model=ours, bn=batch_names):
            with mma.route(model, bn):
                return model(x)

        def loop(model=ours, gr=groups):
            out = torch.empty(b, model.output_dim if hasattr(model, "output_dim") else 512, device=x.device)
            for n, idx in gr.items():
                mma.set_active(model, n)
                out[idx] = model(x[idx])
            mma.set_active(model, "a0")
            return out

        fns = {
            "ours_single": lambda: ours(x),
            "ours_routed": routed,
            "ours_loop_groups": loop,
            "peft_single": lambda: peft_model(x),
            "peft_mixed": lambda bn=batch_names: peft_model(x, adapter_names=bn),
            "bottleneck_single": lambda: bott(x),
            "bottleneck_routed": lambda bn=batch_names: routed(bott, bn),
        }
        t = interleaved(fns, args.reps, args.device)
        rows.append({"section": "mixed batch", "K": k, "B": b, "seconds": t, "ratios": {
            "ours routed / ours single": t["ours_routed"] / t["ours_single"],
            "ours routed / peft mixed": t["ours_routed"] / t["peft_mixed"],
            "ours routed / ours loop over groups": t["ours_routed"] / t["ours_loop_groups"],
            "peft mixed / peft single": t["peft_mixed"] / t["peft_single"],
            "bottleneck routed / bottleneck single": t["bottleneck_routed"] / t["bottleneck_single"],
        }})
        print(f"mixed K={k}: " + ", ".join(f"{r} {v:.3f}" for r, v in rows[-1]["ratios"].items()), flush=True)
    return rows


def bench_overhead(base, args, xs) -> list[dict]:
    lora = ours_lora(base, ["a"], args.rank)
    mma.set_active(lora, "a")
    merged = ours_lora(base, ["a"], args.rank)
    mma.set_active(merged, "a")
    mma.merge(merged)
    peft_model = peft_lora(base, ["a"], args.rank)
    bott = ours_bottleneck(base, ["a"], args.bottleneck_dim)
    mma.set_active(bott, "a")
    rows = []
    for x in xs:
        fns = {"base": lambda x=x: base(x), "ours_merged_lora": lambda x=x: merged(x),
               "ours_unmerged_lora": lambda x=x: lora(x), "peft_unmerged_lora": lambda x=x: peft_model(x),
               "ours_unmerged_bottleneck": lambda x=x: bott(x)}
        t = interleaved(fns, args.reps, args.device)
        rows.append({"section": "overhead", "B": x.shape[0], "seconds": t, "ratios": {
            "ours merged LoRA / base": t["ours_merged_lora"] / t["base"],
            "ours unmerged LoRA / base": t["ours_unmerged_lora"] / t["base"],
            "peft unmerged LoRA / base": t["peft_unmerged_lora"] / t["base"],
            "ours unmerged bottleneck / base": t["ours_unmerged_bottleneck"] / t["base"],
        }})
        print(f"overhead B={x.shape[0]}: " + ", ".join(f"{r} {v:.3f}" for r, v in rows[-1]["ratios"].items()), flush=True)
    return rows


def training_setup(kind: str, base: nn.Module, rank: int):
    if kind == "ours_lora":
        model = ours_lora(base, ["a"], rank)
        mma.set_active(model, "a")
        mma.freeze_base(model)
    elif kind == "peft_lora":
        model = peft_lora(base, ["a"], rank)
    else:
        model = copy.deepcopy(base)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(x):
        loss = model(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, step


KINDS = ("full_finetune", "ours_lora", "peft_lora")


def bench_training_time(base, args, x) -> dict:
    steps = {k: training_setup(k, base, args.rank)[1] for k in KINDS}
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for k in KINDS:
        steps[k](x)  # warm-up (allocates optimizer state)
    for _ in range(args.reps):
        for k in KINDS:
            sync(args.device)
            t = time.perf_counter()
            steps[k](x)
            sync(args.device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_child(kind: str, batch: int, rank: int, device: str, image: int, queue) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = vit_b32(device)
    _, step = training_setup(kind, base, rank)
    x = torch.randn(batch, 3, image, image, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        idle = torch.cuda.memory_allocated()
        for _ in range(2):
            step(x)
        torch.cuda.synchronize()
        queue.put((kind, torch.cuda.max_memory_allocated() - idle))
        return
    idle, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    for _ in range(2):
        step(x)
    done.set()
    th.join()
    queue.put((kind, max(peak[0], _rss()) - idle))


def bench_training_memory(args) -> dict:
    ctx = mp.get_context("spawn")
    out = {}
    for kind in KINDS:
        q = ctx.Queue()
        p = ctx.Process(target=_memory_child, args=(kind, args.train_batch, args.rank, args.device, args.image, q))
        p.start()
        k, v = q.get()
        p.join()
        out[k] = v
    return out


# -- report -----------------------------------------------------------------------------------------------
TARGETS_TEXT = {
    "ours routed / ours single": ("≤ 1.05 at K=32", lambda r, row: row.get("K") != 32 or r <= 1.05),
    "ours routed / peft mixed": ("≤ 1.00", lambda r, row: r <= 1.0),
    "ours merged LoRA / base": ("0.97–1.03", lambda r, row: 0.97 <= r <= 1.03),
    "ours unmerged bottleneck / base": ("≤ 1.10", lambda r, row: r <= 1.10),
}


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']}; device {result['device']}; torch {result['torch']}, "
             f"{result['threads']} threads; peft {result['peft']}; {result['reps']} interleaved repetitions, medians.",
             "", "| section | setting | ratio | value | target | met |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        setting = f"B={row['B']}" + (f", K={row['K']}" if "K" in row else "")
        for name, value in row["ratios"].items():
            target, ok = TARGETS_TEXT.get(name, ("", None))
            met = "" if ok is None else ("yes" if ok(value, row) else "**no**")
            if name == "ours unmerged LoRA / base":
                peft = row["ratios"]["peft unmerged LoRA / base"]
                target, met = f"≤ peft ({peft:.3f})", "yes" if value <= peft else "**no**"
            lines.append(f"| {row['section']} | {setting} | {name} | {value:.3f} | {target} | {met} |")
    tr = result["training"]
    t, m = tr["seconds"], tr["peak_bytes"]
    lines.append(f"| training step | B={tr['B']}, AdamW | ours LoRA / peft LoRA time | {t['ours_lora'] / t['peft_lora']:.3f} "
                 f"| ≤ 1.00 | {'yes' if t['ours_lora'] <= t['peft_lora'] else '**no**'} |")
    lines.append(f"| training step | B={tr['B']}, AdamW | ours LoRA / full fine-tuning time | "
                 f"{t['ours_lora'] / t['full_finetune']:.3f} |  |  |")
    lines.append(f"| training step | B={tr['B']}, AdamW | peft LoRA / full fine-tuning time | "
                 f"{t['peft_lora'] / t['full_finetune']:.3f} |  |  |")
    for k in ("ours_lora", "peft_lora"):
        lines.append(f"| training step | B={tr['B']}, AdamW | {k.replace('_', ' ')} / full fine-tuning peak memory | "
                     f"{m[k] / m['full_finetune']:.3f} |  |  |")
    lines.append("")
    lines.append("Absolute medians (s): " + "; ".join(
        f"{row['section']} B={row['B']}{', K=' + str(row['K']) if 'K' in row else ''}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in row["seconds"].items()) for row in result["rows"]))
    lines.append(f"Training step (s): {', '.join(f'{k} {v:.3f}' for k, v in t.items())}; peak memory above idle "
                 f"(MB): {', '.join(f'{k} {v / 2**20:.0f}' for k, v in m.items())}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small batch, few repetitions: a smoke run under a minute")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ks", default="1,4,16,32", help="numbers of distinct adapters in the mixed batch")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--bottleneck-dim", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default="bench/out/core")
    ap.add_argument("--append-results", default=None, help="append the markdown table to this file (docs/results.md)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.ks, args.reps, args.train_batch = 4, "1,4", 1, 2
    args.ks = [int(k) for k in str(args.ks).split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft

    start = time.time()
    base = vit_b32(args.device)
    x = torch.randn(args.batch, 3, args.image, args.image, device=args.device)
    rows = bench_mixed(base, args, x)
    rows += bench_overhead(base, args, [x[:1], x])
    xt = torch.randn(args.train_batch, 3, args.image, args.image, device=args.device)
    train_t = bench_training_time(base, args, xt)
    print("training step (s):", {k: round(v, 4) for k, v in train_t.items()}, flush=True)
    train_m = bench_training_memory(args)
    print("training peak memory above idle (MB):", {k: round(v / 2**20) for k, v in train_m.items()}, flush=True)
    result = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/core.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.node() or 'host'}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
                   + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "device": args.device, "torch": torch.__version__, "peft": peft.__version__,
        "threads": torch.get_num_threads(), "reps": args.reps, "rows": rows,
        "training": {"B": args.train_batch, "seconds": train_t, "peak_bytes": train_m},
        "wall_seconds": round(time.time() - start, 1),
    }
    write_bench_report(args.out, result, markdown(result), title=f"Core benchmark, {args.device}", append_to=args.append_results)
    return result


if __name__ == "__main__":
    main()
