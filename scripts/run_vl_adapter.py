"""VL-Adapter variants on generated VQA / GQA / NLVR2 / captioning data: trainable %, scores, average, time.

    python scripts/run_vl_adapter.py --data DATA --model VLT5_DIR --out out/vl_adapter
    python scripts/run_vl_adapter.py --data DATA --variants full_ft,shared_adapter --steps 20   # a quick check
    python scripts/run_vl_adapter.py --merge A/vl_adapter_results.json B/vl_adapter_results.json --out OUT
        # one table from runs made in parallel processes (same data, model and training settings required)

A sweep over the library's own commands, nothing more. For every variant and seed it runs (in this process,
through the ``mmadapters`` entry point; each command is printed first, so any run can be repeated by hand)::

    mmadapters train vl-adapter --output OUT/runs/<variant>-seed<s> --set recipe.variant=<variant> --set ...
    mmadapters eval vqa|gqa|nlvr|caption --adapters OUT/runs/<variant>-seed<s>/best --output .../test_<task>.json

and tables what they wrote (``train_summary.json`` and the four results files). ``DATA`` is a folder written
by ``python -m mmadapters.vision.synth_vl``; ``--model`` a VL-T5 directory (default: the shipped tiny VL-T5).
Image features come from ``--features`` (an ``.h5`` file or a folder of ``<img_id>.safetensors``) or are
computed once with the shipped tiny CLIP into ``OUT/features.h5`` by the first training run.

Every run starts from the same fresh model and trains on the four train splits together (the best of its
validations on the val splits is kept), then each task's test split is scored: VQA accuracy, GQA and NLVR2
accuracy, COCO CIDEr — fractions in the results files, x 100 in the table — and their average. A rerun with
the same settings continues interrupted trainings (``--resume``) instead of starting them again. Writes
``OUT/vl_adapter_results.json`` (all runs, updated after each) and ``OUT/vl_adapter_results.md`` (the table
for docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

PER_TASK_OPTIONAL = ("compacter", "phm_adapter", "lora", "prompt")
TASKS = ("vqa", "gqa", "nlvr", "caption")  # the table's column order
PRETRAINED = "pretrained"  # the row of the model without fine-tuning
# the world's gate: what full fine-tuning adds over the pretrained model, on the average. The paper's claim is a
# difference of <= 1 point between a shared adapter and full fine-tuning; it says something only where fine-tuning
# has far more than that to learn.
GATE_POINTS = 5.0
EVAL_BATCH_SIZE = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmadapters.vision.vl_variants import VARIANTS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="generated VL data folder (python -m mmadapters.vision.synth_vl)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="RESULTS_JSON",
                   help="instead of training: merge the runs of these results files into OUT (first run of a variant "
                        "and seed wins)")
    p.add_argument("--model", type=Path, default=None, help="VL-T5 directory (default: the shipped tiny VL-T5)")
    p.add_argument("--features", type=Path, default=None, help="image features: .h5 file or folder of <img_id>.safetensors "
                   "(default: computed with the shipped tiny CLIP into OUT/features.h5)")
    p.add_argument("--out", type=Path, default=Path("out/vl_adapter"), help="results folder (runs in OUT/runs/)")
    p.add_argument("--variants", default="all", help=f"comma-separated subset of {','.join(VARIANTS)} (default: all), "
                   f"and/or {PRETRAINED}: the VL-T5 as pretrained, scored once without fine-tuning (with its pretraining "
                   "task prefixes), what fine-tuning adds")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training data (paper: 20)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch (trainer.batch_size)")
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: every epoch)")
    p.add_argument("--max-val", type=int, default=200, help="validation samples per task (0: all)")
    p.add_argument("--max-test", type=int, default=0, help="test samples per task (0: all)")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiply every variant's default learning rate")
    p.add_argument("--reduction-factor", type=float, default=8.0)
    p.add_argument("--per-task", action="store_true", help="compacter, phm_adapter, lora, prompt: one set per task "
                   "(the paper's 'multiple' rows) instead of one for all tasks")
    p.add_argument("--max-new-tokens", type=int, default=20, help="generation length")
    p.add_argument("--num-beams", type=int, default=1, help="beam width of the test-time generation (VL-Adapter: 5; default 1)")
    p.add_argument("--average", default="vqa,gqa,nlvr,caption",
                   help="tasks the average is taken over (default: all four; VL-Adapter reports NLVR2 outside it when its "
                        "training set is far below the paper's ~86k pairs, e.g. --average vqa,gqa,caption)")
    p.add_argument("--seed", default="0", help="seed, or comma-separated seeds: one run per variant and seed (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.merge is None and args.data is None:
        p.error("--data is required (unless --merge)")
    args.variants = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS and v != PRETRAINED]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    args.average = [t.strip() for t in args.average.split(",") if t.strip()]
    if not args.average or any(t not in TASKS for t in args.average):
        p.error(f"--average: expected a comma-separated subset of {','.join(TASKS)}, got {','.join(args.average) or 'nothing'}")
    try:
        args.seeds = [int(s) for s in args.seed.split(",") if s.strip()]
    except ValueError:
        args.seeds = []
    if not args.seeds:
        p.error(f"--seed: expected an integer or comma-separated integers, got {args.seed!r}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    for name in ("steps", "eval_every", "max_val", "max_test"):
        value = getattr(args, name)
        if value is not None and value < 0:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 0, got {value}")
    return args


def split_counts(data: Path) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """split -> task -> usable samples, and per file how many rows were skipped (the readers' own counts)."""
    from mmadapters.vision.vl_adapter import SYNTH_FILES, read_split

    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    skipped: dict[str, int] = {}
    for task, files in SYNTH_FILES.items():
        for split, rel in files.items():
            rows = read_split(task, data / rel, split)
            counts[split][task] = len(rows)
            skipped[f"{rel}[{split}]" if task == "caption" else rel] = len(rows.skipped)
    return counts, skipped


def schedule(args: argparse.Namespace, n_train: int) -> tuple[int, int]:
    """(steps, eval_every): --steps or --epochs passes over the ``n_train`` training samples of all tasks."""
    per_epoch = math.ceil(n_train / args.batch_size)
    return args.steps or args.epochs * per_epoch, args.eval_every or per_epoch


def train_command(args: argparse.Namespace, variant: str, seed: int, run_dir: Path, steps: int, eval_every: int) -> list[str]:
    """``mmadapters train vl-adapter`` for one run, every setting a ``--set`` written so that YAML reads it back
    as the value meant (a string YAML would read as something else, e.g. ``yes``, is quoted as JSON)."""
    import yaml

    from mmadapters.vision.vl_adapter import DEFAULT_LR

    settings: dict[str, Any] = {
        "trainer.steps": steps, "trainer.batch_size": args.batch_size, "trainer.lr": DEFAULT_LR[variant] * args.lr_scale,
        "trainer.eval_every": eval_every, "trainer.checkpoint_every": eval_every, "trainer.seed": seed,
        "trainer.device": args.device, "trainer.progress": not args.quiet,
        "recipe.data": str(args.data), "recipe.variant": variant, "recipe.reduction_factor": args.reduction_factor,
        "recipe.max_val_samples": args.max_val or None, "recipe.max_new_tokens": args.max_new_tokens,
        "recipe.eval_batch_size": EVAL_BATCH_SIZE, "recipe.model": None if args.model is None else str(args.model),
    }
    if args.features is not None:
        settings["recipe.features"] = str(args.features)
    else:
        settings["recipe.features_cache"] = str(args.out / "features.h5")
    if args.per_task and variant in PER_TASK_OPTIONAL:
        settings["recipe.per_task"] = True
    cmd = ["train", "vl-adapter", "--output", str(run_dir)]
    for key, value in settings.items():
        if isinstance(value, float):  # YAML reads a float only with a dot (and a signed exponent): 3.0e-04
            text = f"{value:.12g}"
            mantissa, e, exponent = text.partition("e")
            text = (mantissa if "." in mantissa else mantissa + ".0") + (e + exponent)
        elif isinstance(value, str) and yaml.safe_load(value) == value:
            text = value
        else:
            text = json.dumps(value)
        cmd += ["--set", f"{key}={text}"]
    return cmd + (["--resume"] if (run_dir / "train_state.pt").is_file() else [])


def eval_command(args: argparse.Namespace, task: str, adapters: Path | None, output: Path) -> list[str]:
    """``mmadapters eval <task>`` of one run's adapters (None: the pretrained model) on the task's test split."""
    from mmadapters.vision.vl_adapter import SYNTH_FILES

    features = args.features if args.features is not None else args.out / "features.h5"
    cmd = ["eval", task, "--annotations", str(args.data / SYNTH_FILES[task]["test"]), "--features", str(features),
           *(["--adapters", str(adapters)] if adapters is not None else []), "--output", str(output),
           "--batch-size", str(EVAL_BATCH_SIZE),
           "--max-new-tokens", str(args.max_new_tokens), "--num-beams", str(args.num_beams), "--device", args.device,
           "--overwrite"]
    if args.model is not None:
        cmd += ["--model", str(args.model)]
    if args.max_test:
        cmd += ["--max-samples", str(args.max_test)]
    return cmd + (["--no-progress"] if args.quiet else [])


def mmadapters(cmd: list[str], what: str) -> None:
    """Run ``mmadapters <cmd>`` in this process; a failure stops the sweep, naming the run."""
    from mmadapters.eval.cli import main as cli

    print("$ mmadapters " + shlex.join(cmd), flush=True)
    rc = cli(cmd)
    if rc != 0:
        raise SystemExit(f"{what}: `mmadapters {' '.join(cmd[:2])}` failed with exit status {rc} (its error is above)")


def score_tests(args: argparse.Namespace, adapters: Path | None, run_dir: Path, what: str) -> dict[str, dict[str, Any]]:
    """Score every task's test split (``mmadapters eval``, one results file each in ``run_dir``)."""
    from mmadapters.eval.results_schema import read_results
    from mmadapters.vision.vl_adapter import SYNTH_FILES

    results = {}
    for task in SYNTH_FILES:
        output = run_dir / f"test_{task}.json"
        mmadapters(eval_command(args, task, adapters, output), what)
        results[task] = {**read_results(output), "output": str(output)}
    return results


def _test_scores(results: dict[str, dict[str, Any]], average: list[str]) -> tuple[dict[str, Any], float]:
    from mmadapters.vision.vl_adapter import HEADLINE

    test = {task: {"metric": HEADLINE[task], "score": r["metrics"][HEADLINE[task]], "metrics": r["metrics"],
                   "count": r["counts"]["evaluated"], "skipped": r["counts"]["skipped"], "results_file": r["output"]}
            for task, r in results.items()}
    scores = [100.0 * test[t]["score"] for t in average
              if t in test and test[t]["score"] is not None and not math.isnan(test[t]["score"])]
    return test, (sum(scores) / len(scores) if len(scores) == len(average) else math.nan)


def pretrained_record(run_dir: Path, results: dict[str, dict[str, Any]], average: list[str]) -> dict[str, Any]:
    """The table row of the pretrained model itself: nothing trains, no seed."""
    test, mean = _test_scores(results, average)
    return {"variant": PRETRAINED, "seed": None, "per_task": False, "run_dir": str(run_dir), "adapters": None,
            "parameters": {"trainable": 0, "backbone": None, "trainable_pct": 0.0}, "test": test,
            "average_tasks": list(average), "average": mean,
            "history": {"total_steps": 0, "train_seconds": 0.0, "best_step": None, "best_metrics": None,
                        "validations": []}, "config": None}


def run_record(variant: str, seed: int, per_task: bool, run_dir: Path, adapters: Path,
               results: dict[str, dict[str, Any]], average: list[str]) -> dict[str, Any]:
    """One table row's data from the run's ``train_summary.json`` and its tasks' results files."""
    summary = json.loads((run_dir / "train_summary.json").read_text(encoding="utf-8"))
    params = dict(summary["parameters"])
    params["trainable_pct"] = 100.0 * params["trainable"] / params["backbone"]
    test, mean = _test_scores(results, average)
    return {"variant": variant, "seed": seed, "per_task": per_task, "run_dir": str(run_dir), "adapters": str(adapters),
            "parameters": params, "test": test, "average_tasks": list(average), "average": mean,
            "history": {"total_steps": summary["steps"], "train_seconds": summary["timings"].get("train_s", math.nan),
                        "best_step": summary["best_step"], "best_metrics": summary["best_metrics"],
                        "validations": summary["history"]},
            "config": summary["config"]}


COLUMNS = {"vqa": "VQA", "gqa": "GQA", "nlvr": "NLVR", "caption": "CIDEr"}


def _row_name(run: dict[str, Any]) -> str:
    return run["variant"] + (" (per task)" if run.get("per_task") else "")


def _full_ft_of(runs: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any] | None:
    """The full fine-tuning run of ``run``'s seed (the row its 'vs full FT' is taken against)."""
    return next((f for f in runs if f["variant"] == "full_ft" and f.get("seed", 0) == run.get("seed", 0)), None)


def _mean_sd(values: list[float]) -> str:
    if any(math.isnan(v) for v in values):
        return "–"
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.1f} ± {sd:.1f}"


def markdown(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    several_seeds = len({r.get("seed", 0) for r in runs if r["variant"] != PRETRAINED}) > 1
    fulls = [f["average"] for f in runs if f["variant"] == "full_ft"]
    average = runs[0].get("average_tasks", list(TASKS)) if runs else list(TASKS)
    outside = [COLUMNS[t] for t in TASKS if t not in average]
    lines = [f"VL-Adapter variants on generated data ({meta['data']}), model {meta['model']}, "
             f"{meta['backbone_params']:,} backbone parameters, device {meta['device']}. Test scores x 100 (the "
             "results files hold fractions): VQA accuracy, GQA and NLVR accuracy, COCO CIDEr; average = the mean of "
             + ", ".join(COLUMNS[t] for t in average) + (f" ({', '.join(outside)} reported outside it)" if outside else "")
             + ".", "",
             "| variant | trainable params | trainable % | VQA | GQA | NLVR | CIDEr | average | vs full FT | train s | steps |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def score(run, task):
        t = run["test"].get(task)
        return math.nan if t is None or t["score"] is None else 100 * t["score"]

    def cell(value):
        return "–" if math.isnan(value) else f"{value:.1f}"

    for r in runs:
        full = _full_ft_of(runs, r)
        delta = "–" if full is None or r is full else f"{r['average'] - full['average']:+.1f}"
        if r["variant"] == PRETRAINED and fulls:  # no seed of its own: against the mean over full FT's seeds
            delta = f"{r['average'] - sum(fulls) / len(fulls):+.1f}"
        h, params = r["history"], r["parameters"]
        seeded = several_seeds and r["variant"] != PRETRAINED
        name = _row_name(r) + (f" (seed {r.get('seed', 0)})" if seeded else "")
        lines.append(f"| {name} | {params['trainable']:,} | {params['trainable_pct']:.2f} | "
                     + " | ".join(cell(score(r, t)) for t in TASKS) + f" | {cell(r['average'])} | {delta} | "
                     f"{h['train_seconds']:.0f} | {h['total_steps']} |")
    if several_seeds:  # one row per variant: mean ± sample standard deviation over its seeds
        lines += ["", "Mean ± standard deviation over seeds; 'vs full FT' is the mean of the per-seed differences.", "",
                  "| variant | seeds | trainable % | VQA | GQA | NLVR | CIDEr | average | vs full FT |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in dict.fromkeys(_row_name(r) for r in runs if r["variant"] != PRETRAINED):
            group = [r for r in runs if _row_name(r) == name]
            if len(group) < 2:
                continue
            deltas = []
            for r in group:
                full = _full_ft_of(runs, r)
                if full is not None and r is not full:
                    deltas.append(r["average"] - full["average"])
            delta = _mean_sd(deltas) if len(deltas) > 1 else "–"
            lines.append(f"| {name} | {len(group)} | {group[0]['parameters']['trainable_pct']:.2f} | "
                         + " | ".join(_mean_sd([score(r, t) for r in group]) for t in TASKS)
                         + f" | {_mean_sd([r['average'] for r in group])} | {delta} |")
    pre = next((r for r in runs if r["variant"] == PRETRAINED), None)
    if pre is not None and fulls:
        gain = sum(fulls) / len(fulls) - pre["average"]
        lines += ["", f"Gate: full fine-tuning adds {gain:+.1f} points to the pretrained model's average (mean over "
                  f"{len(fulls)} seed{'s' if len(fulls) > 1 else ''}); {'passed' if gain >= GATE_POINTS else 'FAILED'} "
                  f"(>= {GATE_POINTS:g} needed before the variants' differences from full fine-tuning are read)."]
    return "\n".join(lines) + "\n"


def write_table(out: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    from mmadapters.atomic import atomic_write_bytes
    from mmadapters.eval.results_io import json_bytes

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "vl_adapter_results.json", json_bytes({"meta": meta, "runs": runs}))
    atomic_write_bytes(out / "vl_adapter_results.md", markdown(runs, meta).encode())


SAME_SETTINGS = ("--data", "--model", "--features", "--epochs", "--steps", "--batch-size", "--eval-every", "--max-val",
                 "--max-test", "--lr-scale", "--reduction-factor", "--per-task", "--max-new-tokens", "--num-beams",
                 "--device", "--average")


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
        runs += [r for r in payload["runs"] if (r["variant"], r.get("seed", 0)) not in seen]
        seen |= {(r["variant"], r.get("seed", 0)) for r in payload["runs"]}
    meta = {**ref["meta"], "merged_from": [str(f) for f in files]}
    write_table(out, meta, runs)
    print(markdown(runs, meta))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge is not None:
        return merge(args.merge, args.out)
    from mmadapters.vision.vlt5 import resolve_vlt5_dir

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    counts, skipped_rows = split_counts(args.data)
    steps, eval_every = schedule(args, sum(counts["train"].values()))
    meta = {"data": str(args.data), "model": str(resolve_vlt5_dir(args.model)), "device": args.device,
            "backbone_params": None, "counts": counts, "skipped_rows": skipped_rows, "steps": steps, "eval_every": eval_every,
            "argv": sys.argv[1:] if argv is None else list(argv)}
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for seed in args.seeds:
        for variant in (v for v in args.variants if v != PRETRAINED):
            name = f"{variant}-seed{seed}"
            run_dir = args.out / "runs" / name
            mmadapters(train_command(args, variant, seed, run_dir, steps, eval_every), name)
            summary = json.loads((run_dir / "train_summary.json").read_text(encoding="utf-8"))
            adapters = Path(summary["best_dir"] or summary["last_dir"])  # no finite validation score: the last step's
            results = score_tests(args, adapters, run_dir, name)
            run = run_record(variant, seed, args.per_task and variant in PER_TASK_OPTIONAL, run_dir, adapters, results,
                             args.average)
            runs.append(run)
            meta["backbone_params"] = run["parameters"]["backbone"]
            print(f"[{name}] trainable {run['parameters']['trainable_pct']:.2f}%  average {run['average']:.1f}  "
                  f"train {run['history']['train_seconds']:.0f}s  " +
                  "  ".join(f"{t} {100 * r['score']:.1f}" for t, r in run["test"].items()) + "  (x 100)", flush=True)
            write_table(args.out, {**meta, "seconds": time.perf_counter() - t_all}, runs)
    if PRETRAINED in args.variants:  # after the trainings: the first one computes the default features file
        features = args.features if args.features is not None else args.out / "features.h5"
        if not features.exists():
            raise SystemExit(f"--variants {PRETRAINED}: no image features at {features}; pass --features, or train a "
                             "variant in the same sweep (its first run computes them)")
        run_dir = args.out / "runs" / PRETRAINED
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.append(pretrained_record(run_dir, score_tests(args, None, run_dir, PRETRAINED), args.average))
        if meta["backbone_params"] is None:  # no trained run in this sweep to take it from
            from mmadapters.vision.vlt5 import VLT5

            meta["backbone_params"] = sum(p.numel() for p in VLT5.from_pretrained(args.model).parameters())
        runs[-1]["parameters"]["backbone"] = meta["backbone_params"]
        print(f"[{PRETRAINED}] average {runs[-1]['average']:.1f}  " + "  ".join(
            f"{t} {100 * r['score']:.1f}" for t, r in runs[-1]["test"].items()) + "  (x 100)", flush=True)
        write_table(args.out, {**meta, "seconds": time.perf_counter() - t_all}, runs)
    print(markdown(runs, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
