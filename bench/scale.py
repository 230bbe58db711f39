"""Thousands of adapters (issue 22): routed cost against the number registered, and a serving loop — ratios in one run.

Model: the shipped tiny CLIP's image tower (``load_clip(None).model.visual``, 64×64 images), LoRA r=8 (alpha 16)
on ``mlp.c_fc`` and ``mlp.c_proj`` of every block, adapter weights random (seeded) so that they change the output.

Scale section. For each N in ``--ns``, N adapters are registered on a copy of the tower and kept in host memory
(``mma.offload``; the base runs on ``--device``), with one ``mma.AdapterCache(capacity=--capacity)`` per model.
Each timed call routes a batch of ``--batch`` images whose adapters are drawn from a Zipf popularity over the N
(``p(a_i) ∝ (i+1)^-s``, seeded): exactly k distinct adapters for each k in ``--distinct``, a fresh batch every
repetition (the same sequence for ours and peft), so the cache sees misses as a server's would. Configurations
— the plain tower, ours (``mma.route``) and peft (``PeftModel(x, adapter_names=...)``, same weights) for every
(N, k) — run interleaved round-robin, so drift in machine load hits all alike; medians. Reported: routed/plain,
peft/plain, ours/peft, cache hits; add_adapter time per N (total, per add, and the mean of the last tenth of the
adds: the marginal cost); host memory (RSS growth while building each model — approximate, the allocator keeps
freed memory — and the adapters' tensor bytes); device pool bytes. peft's models are built with ``add_adapter``
under ``--peft-budget`` seconds per N; cells where it does not finish are skipped and marked (or, with
``--peft-direct``, filled in as the serving loop does; marked †).

Serving section. A stream of ``--serve-requests`` requests, each for one of ``--serve-adapters`` adapters drawn
from a Zipf popularity, arriving as a Poisson process at ``--rate`` requests/s (seeded); a server takes the
requests waiting when it is free, up to ``--serve-batch`` (FIFO), and runs them as one routed batch; ours keeps an
``AdapterCache(capacity=--serve-capacity)`` (LRU) over adapters held in host memory, peft keeps every adapter on
the device (it has no other place). Time: a simulated clock driven by measured compute — arrivals follow the
seeded schedule, each batch's forward really runs and its wall time (synchronized) advances that server's clock;
latency = completion − arrival (queueing + compute), no sleeping. Ours and peft serve the same stream in
lockstep (the server whose clock is behind runs its next batch), so load drift hits both alike. peft's 1,000
adapters are registered by filling its LoRA layers' per-adapter dicts directly (``add_adapter`` and even
``LoraLayer.update_layer`` cost O(adapters) per call: 1,000 take minutes); its forward is its own
``adapter_names`` path, and the outputs are checked against ours.

    .venv/bin/python bench/scale.py --quick                  # smoke run, under a minute
    .venv/bin/python bench/scale.py                          # N up to 4,096, batch 32, k 1/8/32, serving
    .venv/bin/python bench/scale.py --device cuda --peft-direct --append-results docs/results.md

Writes ``--out``.json and ``--out``.md (default bench/out/scale); ``--append-results FILE`` appends the table with
the command and the machine.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import mmadapters as mma
from mmadapters.eval.results_io import write_bench_report
from mmadapters.model import wrappers

TARGETS = ["mlp.c_fc", "mlp.c_proj"]


# -- models -----------------------------------------------------------------------------------------------
def tiny_tower(device: str) -> nn.Module:
    from mmadapters.vision.clip import load_clip

    return load_clip(None).model.visual.to(device).eval()


def _settle() -> None:
    # Move every live object out of the cyclic collector's view (cheap, no collection): otherwise a full collection
    # over torch's and peft's heap (≈0.5 s here) lands inside whichever add_adapter call or forward triggers it.
    gc.freeze()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Built:
    model: nn.Module | None
    add_seconds: list[float] = field(default_factory=list)  # one per add_adapter call
    rss_bytes: int = 0  # process RSS growth while building
    note: str = ""  # why peft's cells are skipped, or how its adapters were registered


def add_summary(b: Built, n: int) -> dict:
    s = b.add_seconds
    tail = s[-max(1, len(s) // 10):] if s else []
    return {"adds": len(s), "of": n, "total_s": sum(s), "per_add_s": sum(s) / len(s) if s else None,
            "last_tenth_per_add_s": sum(tail) / len(tail) if tail else None, "note": b.note}


def build_ours(base: nn.Module, n: int, rank: int, device: str, seed: int = 0) -> Built:
    """``base`` (on ``device``) + ``n`` random LoRAs ``a0..a{n-1}`` whose units live in host memory."""
    _settle()
    rss0 = _rss()
    model = copy.deepcopy(base).cpu()
    configs = [mma.LoRAConfig(r=rank, alpha=2 * rank, target_modules=TARGETS) for _ in range(n)]
    times = []
    for i, cfg in enumerate(configs):
        t = time.perf_counter()
        mma.add_adapter(model, f"a{i}", cfg)
        times.append(time.perf_counter() - t)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in wrappers(model):
            for units in w.adapters.values():
                for p in units.parameters():
                    p.normal_(0.0, 0.05, generator=g)  # lora_B starts at zero: make every adapter change the output
    mma.set_active(model, None)
    model.to(device)
    mma.offload(model, device="cpu")  # adapters in host memory; the cache uploads what a batch uses
    return Built(model.eval(), times, _rss() - rss0)


def _peft_cfg(rank: int):
    import peft

    return peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)


def peft_register_direct(model, names: list[str], rank: int) -> None:
    """Register plain LoRA adapters on a PeftModel by filling its layers' per-adapter dicts, as
    ``LoraLayer.update_layer`` does for vanilla LoRA, minus its walks over every adapter already there
    (``set_adapter``, the device move), which make 1,000 registrations take minutes. The entries are exactly
    what peft's ``adapter_names`` forward reads; ``copy_weights`` then overwrites the weights."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    cfg = _peft_cfg(rank)
    for n in names:
        model.peft_config[n] = cfg
        for layer in layers:
            dev = layer.get_base_layer().weight.device
            layer.r[n], layer.lora_alpha[n], layer.scaling[n] = rank, 2 * rank, 2 * rank / rank
            layer.lora_dropout[n] = nn.Identity()
            layer.lora_A[n] = nn.Linear(layer.in_features, rank, bias=False, device=dev)
            layer.lora_B[n] = nn.Linear(rank, layer.out_features, bias=False, device=dev)
            layer.lora_bias[n], layer.use_rslora[n], layer.use_dora[n] = False, False, False
            for p in (*layer.lora_A[n].parameters(), *layer.lora_B[n].parameters()):
                p.requires_grad_(False)


def build_peft(base: nn.Module, n: int, rank: int, budget_s: float, direct: bool) -> Built:
    """peft on ``base`` with ``n`` adapters via ``add_adapter``, stopped once ``budget_s`` is spent (then the
    model is dropped, or, with ``direct``, the rest are registered with :func:`peft_register_direct`)."""
    import peft

    _settle()
    rss0 = _rss()
    configs = [_peft_cfg(rank) for _ in range(n)]
    t = time.perf_counter()
    model = peft.get_peft_model(copy.deepcopy(base), configs[0], adapter_name="a0")
    times = [time.perf_counter() - t]
    for i in range(1, n):
        if sum(times) > budget_s:
            break
        t = time.perf_counter()
        model.add_adapter(f"a{i}", configs[i])
        times.append(time.perf_counter() - t)
    note = ""
    if len(times) < n:
        note = f"add_adapter: {len(times)} of {n} adds in the {budget_s:g} s budget"
        if not direct:
            return Built(None, times, 0, note + "; peft cells skipped")
        peft_register_direct(model, [f"a{i}" for i in range(len(times), n)], rank)
        note += "; the rest registered directly"
    model.eval()
    return Built(model, times, _rss() - rss0, note)


def copy_weights(ours: nn.Module, peft_model: nn.Module, names: list[str] | None = None) -> None:
    """Make peft's adapters equal to ours (same alpha/r, so the same scaling): lora_A/lora_B weights per module."""
    inner = peft_model.base_model.model
    with torch.no_grad():
        for w in wrappers(ours):
            layer = inner.get_submodule(w.module_name)
            for name, units in w.adapters.items():
                if names is not None and name not in names:
                    continue
                unit = next(iter(units.values()))
                layer.lora_A[name].weight.copy_(unit.lora_A.weight)
                layer.lora_B[name].weight.copy_(unit.lora_B.weight)


def pool_bytes(cache: mma.AdapterCache) -> int:
    # AdapterCache has no public accessor for its device pools: read the private ``_pools`` (group -> _Pool,
    # whose ``tensors`` are the stacked slots).
    return sum(t.nbytes for pool in cache._pools.values() for t in pool.tensors.values())


def adapter_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for w in wrappers(model) for p in w.adapters.parameters())


# -- batches ------------------------------------------------------------------------------------------------
def zipf_p(n: int, s: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** s
    return p / p.sum()


def zipf_batch(rng: np.random.Generator, n: int, k: int, batch: int, s: float) -> list[str]:
    """``batch`` adapter names with exactly ``k`` distinct ones, drawn by Zipf popularity over ``a0..a{n-1}``."""
    p = zipf_p(n, s)
    chosen = rng.choice(n, size=k, replace=False, p=p)
    rest = rng.choice(chosen, size=batch - k, p=p[chosen] / p[chosen].sum())
    ids = np.concatenate([chosen, rest])
    rng.shuffle(ids)
    return [f"a{i}" for i in ids]


def routed(model: nn.Module, cache: mma.AdapterCache, names: list[str], x: torch.Tensor) -> torch.Tensor:
    with mma.route(model, names, cache=cache):
        return model(x)


def per_sample(model: nn.Module, names: list[str], x: torch.Tensor, device: str) -> torch.Tensor:
    """Reference: each sample alone with its adapter active (units brought to ``device`` for it, then back)."""
    distinct = list(dict.fromkeys(names))
    mma.offload(model, distinct, device)
    try:
        outs = []
        for i, n in enumerate(names):
            mma.set_active(model, n)
            outs.append(model(x[i:i + 1]))
    finally:
        mma.set_active(model, None)
        mma.offload(model, distinct, "cpu")
    return torch.cat(outs)


# -- timing -------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Cell:
    fn: Callable[[int], object]  # round index -> output
    cache: mma.AdapterCache | None = None
    seconds: list[float] = field(default_factory=list)
    hits: int = 0
    misses: int = 0


def interleaved(cells: dict[str, Cell], reps: int, warmup: int, device: str) -> None:
    """Fill each cell's ``seconds`` with ``reps`` timed calls, the cells run round-robin."""
    _settle()
    with torch.inference_mode():
        for r in range(warmup + reps):
            for cell in cells.values():
                before = (cell.cache.stats.hits, cell.cache.stats.misses) if cell.cache else (0, 0)
                sync(device)
                t = time.perf_counter()
                cell.fn(r)
                sync(device)
                if r >= warmup:
                    cell.seconds.append(time.perf_counter() - t)
                    if cell.cache:
                        cell.hits += cell.cache.stats.hits - before[0]
                        cell.misses += cell.cache.stats.misses - before[1]


def median(cell: Cell | None) -> float | None:
    return statistics.median(cell.seconds) if cell and cell.seconds else None


# -- scale section ------------------------------------------------------------------------------------------
def bench_scale(base: nn.Module, args) -> dict:
    x = torch.randn(args.batch, 3, *base.image_size, generator=torch.Generator().manual_seed(1)).to(args.device)
    ours: dict[int, Built] = {}
    peft: dict[int, Built] = {}
    caches: dict[int, mma.AdapterCache] = {}
    peft_failed_at = None
    for n in args.ns:
        ours[n] = build_ours(base, n, args.rank, args.device, seed=n)
        caches[n] = mma.AdapterCache(capacity=args.capacity)
        if peft_failed_at is not None and not args.peft_direct:
            peft[n] = Built(None, note=f"skipped: add_adapter did not finish N={peft_failed_at} in the budget")
        elif peft_failed_at is not None:  # more adds would not finish either: straight to direct registration
            peft[n] = build_peft(base, n, args.rank, 0.0, True)
            peft[n].note = f"registered directly: add_adapter did not finish N={peft_failed_at} in the budget"
        else:
            peft[n] = build_peft(base, n, args.rank, args.peft_budget, args.peft_direct)
            if peft[n].note:
                peft_failed_at = n
        if peft[n].model is not None:
            copy_weights(ours[n].model, peft[n].model)
        a, p = add_summary(ours[n], n), add_summary(peft[n], n)
        print(f"N={n}: ours add_adapter {a['total_s']:.2f} s ({1e3 * a['per_add_s']:.2f} ms/add); peft "
              f"{p['total_s']:.2f} s for {p['adds']} adds {p['note']}", flush=True)

    rng = np.random.default_rng(args.seed)
    rounds = args.warmup + args.reps
    batches = {(n, k): [zipf_batch(rng, n, k, args.batch, args.zipf) for _ in range(rounds)]
               for n in args.ns for k in args.distinct if k <= n}
    checks: dict[tuple[int, int], dict] = {key: {} for key in batches}
    with torch.inference_mode():
        for (n, k), bs in batches.items():  # correctness first: ours against peft on the first batch of each cell
            if peft[n].model is not None:
                diff = routed(ours[n].model, caches[n], bs[0], x) - peft[n].model(x, adapter_names=bs[0])
                checks[(n, k)]["max_abs_diff_vs_peft"] = diff.abs().max().item()
        n, k = max(batches)  # and against each sample run alone, for the largest configuration
        names = batches[(n, k)][0]
        diff = routed(ours[n].model, caches[n], names, x) - per_sample(ours[n].model, names, x, args.device)
        checks[(n, k)]["max_abs_diff_vs_per_sample"] = diff.abs().max().item()

    cells: dict[str, Cell] = {"plain": Cell(lambda r: base(x))}  # build_* deep-copy: base stays plain
    for (n, k), bs in batches.items():
        cells[f"ours N={n} k={k}"] = Cell(lambda r, m=ours[n].model, c=caches[n], bs=bs: routed(m, c, bs[r], x), caches[n])
        if peft[n].model is not None:
            cells[f"peft N={n} k={k}"] = Cell(lambda r, m=peft[n].model, bs=bs: m(x, adapter_names=bs[r]))
    interleaved(cells, args.reps, args.warmup, args.device)

    t_plain = median(cells["plain"])
    rows = []
    for n in args.ns:
        row = {"N": n, "add": {"ours": add_summary(ours[n], n), "peft": add_summary(peft[n], n)},
               "memory": {"host_rss_ours_bytes": ours[n].rss_bytes, "host_rss_peft_bytes": peft[n].rss_bytes if peft[n].model else None,
                          "adapter_bytes": adapter_bytes(ours[n].model), "device_pool_bytes": pool_bytes(caches[n])},
               "cells": []}
        for k in args.distinct:
            if k > n:
                continue
            o, p = cells[f"ours N={n} k={k}"], cells.get(f"peft N={n} k={k}")
            to, tp = median(o), median(p)
            row["cells"].append({
                "k": k, "ours_s": to, "peft_s": tp, "routed_over_plain": to / t_plain,
                "peft_over_plain": tp / t_plain if tp else None, "ours_over_peft": to / tp if tp else None,
                "cache_hit_rate": o.hits / max(1, o.hits + o.misses), **checks[(n, k)]})
            c = row["cells"][-1]
            print(f"N={n} k={k}: routed/plain {c['routed_over_plain']:.3f}"
                  + (f", ours/peft {c['ours_over_peft']:.3f}" if tp else ", peft skipped"), flush=True)
        rows.append(row)
    return {"plain_s": t_plain, "rows": rows}


# -- serving section ----------------------------------------------------------------------------------------
@dataclass
class Server:
    run: Callable[[list[str], torch.Tensor], torch.Tensor]
    clock: float = 0.0
    next: int = 0  # first request not yet served
    latencies: list[float] = field(default_factory=list)
    batches: int = 0


def serve(servers: dict[str, Server], arrivals: np.ndarray, adapters: list[str], images: torch.Tensor,
          max_batch: int, device: str) -> None:
    """Run every server over the same stream in lockstep (the one whose clock is behind goes next)."""
    total = len(arrivals)
    with torch.inference_mode():
        while True:
            live = [s for s in servers.values() if s.next < total]
            if not live:
                return
            s = min(live, key=lambda v: v.clock)
            i = s.next
            s.clock = max(s.clock, float(arrivals[i]))  # idle until the next request arrives
            j = i
            while j < total and j - i < max_batch and arrivals[j] <= s.clock:
                j += 1
            sync(device)
            t = time.perf_counter()
            s.run(adapters[i:j], images[: j - i])
            sync(device)
            s.clock += time.perf_counter() - t
            s.latencies += [s.clock - float(a) for a in arrivals[i:j]]
            s.next, s.batches = j, s.batches + 1


def bench_serving(base: nn.Module, args, plain_batch_s: float) -> dict:
    n = args.serve_adapters
    built = build_ours(base, n, args.rank, args.device, seed=7)
    model, cache = built.model, mma.AdapterCache(capacity=args.serve_capacity)
    import peft as peft_lib

    pmodel = peft_lib.get_peft_model(copy.deepcopy(base), _peft_cfg(args.rank), adapter_name="a0")
    peft_register_direct(pmodel, [f"a{i}" for i in range(1, n)], args.rank)
    copy_weights(model, pmodel)
    pmodel.eval()

    rate = args.rate or 0.5 * args.serve_batch / plain_batch_s
    rng = np.random.default_rng(args.seed + 1)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=args.serve_requests))
    adapters = [f"a{i}" for i in rng.choice(n, size=args.serve_requests, p=zipf_p(n, args.zipf))]
    images = torch.randn(args.serve_batch, 3, *base.image_size, generator=torch.Generator().manual_seed(2)).to(args.device)
    servers = {"ours": Server(lambda names, x: routed(model, cache, names, x)),
               "peft": Server(lambda names, x: pmodel(x, adapter_names=names))}
    with torch.inference_mode():
        first = adapters[: args.serve_batch]
        diff = (servers["ours"].run(first, images) - servers["peft"].run(first, images)).abs().max().item()
    hits0, misses0 = cache.stats.hits, cache.stats.misses  # the check above warmed both; count the stream's only
    _settle()
    serve(servers, arrivals, adapters, images, args.serve_batch, args.device)
    out = {"adapters": n, "requests": args.serve_requests, "max_batch": args.serve_batch,
           "cache_capacity": args.serve_capacity, "offered_rate": rate, "rate_auto": args.rate is None,
           "max_abs_diff_ours_vs_peft": diff, "servers": {}}
    for name, s in servers.items():
        lat = np.array(s.latencies)
        out["servers"][name] = {
            "requests_per_s": len(lat) / (s.clock - float(arrivals[0])), "p50_ms": 1e3 * float(np.percentile(lat, 50)),
            "p99_ms": 1e3 * float(np.percentile(lat, 99)), "mean_batch": len(lat) / s.batches}
    hits, misses = cache.stats.hits - hits0, cache.stats.misses - misses0
    out["servers"]["ours"]["cache_hit_rate"] = hits / max(1, hits + misses)
    for name, v in out["servers"].items():
        print(f"serving {name}: {v['requests_per_s']:.0f} req/s, p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms, "
              f"mean batch {v['mean_batch']:.1f}", flush=True)
    return out


# -- report -------------------------------------------------------------------------------------------------
def _f(v, fmt=".3f", none="—") -> str:
    return none if v is None else format(v, fmt)


def _ms(v, none="—") -> str:
    return none if v is None else f"{1e3 * v:.2f}"


def _mb(v) -> str:
    return "—" if v is None else f"{v / 2**20:.1f}"


def aims(scale: dict) -> list[tuple[str, bool | None]]:
    """The issue's aims, each with met / not met (None: not measured in this run)."""
    cells = {(r["N"], c["k"]): c for r in scale["rows"] for c in r["cells"]}
    k32 = [c for (n, k), c in cells.items() if k == 32]
    out = [("routed with 32 distinct ≤ 1.3× plain at every N",
            all(c["routed_over_plain"] <= 1.3 for c in k32) if k32 else None)]
    a, b = cells.get((4096, 32)), cells.get((32, 32))
    out.append(("routed/plain at N=4096 within 10% of N=32 (k=32)",
                abs(a["routed_over_plain"] / b["routed_over_plain"] - 1) <= 0.10 if a and b else None))
    vs = [(n, c["ours_over_peft"]) for (n, k), c in cells.items() if n >= 256 and c["ours_over_peft"] is not None]
    where = f" (peft measured at N={', '.join(str(n) for n in sorted({n for n, _ in vs}))})" if vs else ""
    out.append((f"≥ 1.5× faster than peft's mixed batch at N ≥ 256{where}",
                all(v <= 1 / 1.5 for _, v in vs) if vs else None))
    return out


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Machine: {result['machine']}; device {result['device']}; torch {result['torch']}, {result['threads']} "
             f"threads; peft {result['peft']}; load average at start {result['load_average_start']}, at end "
             f"{result['load_average_end']}.",
             f"Tiny CLIP image tower, batch {s['batch']}, LoRA r={s['rank']} on {', '.join(TARGETS)}; Zipf s={s['zipf']}; "
             f"AdapterCache(capacity={s['capacity']}); {s['reps']} interleaved repetitions, medians.", ""]
    sc = result.get("scale")
    if sc:
        lines += [f"Plain forward: {1e3 * sc['plain_s']:.2f} ms.", "",
                  "| N | k distinct | routed / plain | peft / plain | ours / peft | ours ms | peft ms | cache hits | "
                  "max diff vs peft |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            mark = " †" if "directly" in r["add"]["peft"]["note"] else ""  # peft's adapters not all from add_adapter
            for c in r["cells"]:
                skipped = "skipped" if c["peft_s"] is None else None
                lines.append(f"| {r['N']} | {c['k']} | {c['routed_over_plain']:.3f} | {_f(c['peft_over_plain'], none=skipped)}{mark} "
                             f"| {_f(c['ours_over_peft'], none=skipped)}{mark} | {1e3 * c['ours_s']:.2f} | "
                             f"{_ms(c['peft_s'], skipped)} | {c['cache_hit_rate']:.0%} | "
                             f"{_f(c.get('max_abs_diff_vs_peft'), '.1e')} |")
        lines += ["", "| N | ours add_adapter total s | ours ms / add (last tenth) | peft add_adapter total s | "
                  "peft ms / add (last tenth) | host RSS ours / peft MB | adapter tensors MB | device pool MB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            o, p, m = r["add"]["ours"], r["add"]["peft"], r["memory"]
            peft_total = f"{p['total_s']:.2f}" + (f" ({p['adds']} of {p['of']} adds)" if p["adds"] < p["of"] else "")
            lines.append(f"| {r['N']} | {o['total_s']:.2f} | {_ms(o['per_add_s'])} ({_ms(o['last_tenth_per_add_s'])}) "
                         f"| {peft_total if p['adds'] else '—'} | "
                         f"{_ms(p['per_add_s'])} ({_ms(p['last_tenth_per_add_s'])}) "
                         f"| {_mb(m['host_rss_ours_bytes'])} / {_mb(m['host_rss_peft_bytes'])} | {_mb(m['adapter_bytes'])} "
                         f"| {_mb(m['device_pool_bytes'])} |")
        notes = sorted({r["add"]["peft"]["note"] for r in sc["rows"] if r["add"]["peft"]["note"]})
        lines += [""] + [f"- peft: {n}." for n in notes]
        if any("directly" in n for n in notes):
            lines.append("- †: peft's adapters (beyond those add_adapter made in the budget) registered directly; "
                         "its forward is its own adapter_names path.")
        worst = max((c.get("max_abs_diff_vs_per_sample", 0.0) for r in sc["rows"] for c in r["cells"]), default=0.0)
        lines.append(f"- Routed output against each sample run alone (largest N and k): max |diff| {worst:.1e}.")
        lines.append("- Aims: " + "; ".join(f"{t}: {'—' if ok is None else ('yes' if ok else '**no**')}"
                                           for t, ok in aims(sc)) + ".")
    sv = result.get("serving")
    if sv:
        lines += ["", f"Serving: {sv['requests']} requests, Zipf over {sv['adapters']} adapters, Poisson arrivals at "
                  f"{sv['offered_rate']:.0f} req/s{' (auto: half the plain tower at full batches)' if sv['rate_auto'] else ''}, "
                  f"batches up to {sv['max_batch']}, ours with AdapterCache(capacity={sv['cache_capacity']}); simulated "
                  f"clock driven by measured compute; outputs ours vs peft max |diff| {sv['max_abs_diff_ours_vs_peft']:.1e}.",
                  "", "| server | requests/s | p50 latency ms | p99 latency ms | mean batch | cache hits |",
                  "|---|---|---|---|---|---|"]
        for name, v in sv["servers"].items():
            hit = f"{v['cache_hit_rate']:.0%}" if "cache_hit_rate" in v else "all on device"
            lines.append(f"| {name} | {v['requests_per_s']:.0f} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | "
                         f"{v['mean_batch']:.1f} | {hit} |")
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------------------------
def _ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"bench/scale.py: {flag} expects comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N 1,8,32, k 1,8, few repetitions, a short stream: under a minute")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ns", default=None, help="numbers of registered adapters (default 1,32,256,1024,4096)")
    ap.add_argument("--distinct", default=None, help="distinct adapters per batch (default 1,8,32)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--capacity", type=int, default=64, help="AdapterCache capacity of the scale section (≥ max --distinct)")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s of adapter popularity")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 15; quick 3)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--peft-budget", type=float, default=None, metavar="S",
                    help="seconds of peft add_adapter per N before its cells are skipped (default 60; quick 20)")
    ap.add_argument("--peft-direct", action="store_true",
                    help="past the budget, register peft's remaining adapters directly instead of skipping its cells")
    ap.add_argument("--sections", default="scale,serve", help="comma-separated: scale, serve")
    ap.add_argument("--serve-adapters", type=int, default=None, help="adapters of the serving stream (default 1000; quick 64)")
    ap.add_argument("--serve-requests", type=int, default=None, help="requests in the stream (default 2000; quick 128)")
    ap.add_argument("--serve-batch", type=int, default=32, help="B: the most requests per served batch")
    ap.add_argument("--serve-capacity", type=int, default=64, help="AdapterCache capacity of the serving loop")
    ap.add_argument("--rate", type=float, default=None,
                    help="arrivals per second (default: half the plain tower's throughput at full batches)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default="bench/out/scale")
    ap.add_argument("--append-results", default=None, help="append the markdown table to this file (docs/results.md)")
    a = ap.parse_args(argv)
    q = a.quick
    a.ns = _ints("--ns", a.ns or ("1,8,32" if q else "1,32,256,1024,4096"))
    a.distinct = _ints("--distinct", a.distinct or ("1,8" if q else "1,8,32"))
    a.reps = a.reps or (3 if q else 15)
    a.peft_budget = a.peft_budget if a.peft_budget is not None else (20.0 if q else 60.0)
    a.serve_adapters = a.serve_adapters or (64 if q else 1000)
    a.serve_requests = a.serve_requests or (128 if q else 2000)
    a.sections = {v.strip() for v in a.sections.split(",") if v.strip()}
    problems = []
    if not a.sections or a.sections - {"scale", "serve"}:
        problems.append(f"--sections: expected scale and/or serve, got {','.join(sorted(a.sections)) or 'nothing'}")
    if max(a.distinct) > a.batch:
        problems.append(f"--distinct {max(a.distinct)} exceeds --batch {a.batch}")
    if max(a.distinct) > a.capacity:
        problems.append(f"--capacity {a.capacity} is below --distinct {max(a.distinct)}: a batch needs a slot per adapter")
    if a.serve_batch > a.serve_capacity:
        problems.append(f"--serve-capacity {a.serve_capacity} is below --serve-batch {a.serve_batch}")
    if min(a.batch, a.rank, a.reps, a.serve_batch, a.serve_adapters, a.serve_requests) < 1 or a.warmup < 0:
        problems.append("--batch, --rank, --reps, --serve-* must be ≥ 1 and --warmup ≥ 0")
    if a.rate is not None and a.rate <= 0:
        problems.append(f"--rate must be positive, got {a.rate}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {a.device}: torch.cuda.is_available() is False on this machine")
    if problems:
        ap.error("; ".join(problems))
    return a


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft

    start = time.time()
    load0 = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    base = tiny_tower(args.device)
    result: dict = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/scale.py",
                                                      *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.node() or 'host'}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
                   + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "device": args.device, "torch": torch.__version__, "peft": peft.__version__, "threads": torch.get_num_threads(),
        "load_average_start": load0,
        "settings": {k: getattr(args, k) for k in ("batch", "rank", "capacity", "zipf", "reps", "warmup", "peft_budget",
                                                   "peft_direct", "seed")} | {"ns": args.ns, "distinct": args.distinct},
    }
    if "scale" in args.sections:
        result["scale"] = bench_scale(base, args)
    if "serve" in args.sections:
        xb = torch.randn(args.serve_batch, 3, *base.image_size).to(args.device)
        cell = Cell(lambda r: base(xb))
        interleaved({"plain": cell}, 5, 1, args.device)
        result["serving"] = bench_serving(base, args, median(cell))
    gc.unfreeze()  # hand what _settle froze back to the collector (a caller's process goes on)
    result["load_average_end"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    result["wall_seconds"] = round(time.time() - start, 1)
    write_bench_report(args.out, result, markdown(result), title=f"Scale benchmark (issue 22), {args.device}",
                       append_to=args.append_results)
    return result


if __name__ == "__main__":
    main()
