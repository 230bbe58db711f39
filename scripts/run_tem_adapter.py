"""Tem-Adapter vs frame-mean CLIP zero-shot vs the official code's behaviour, on generated moving-shape VideoQA.

    python scripts/run_tem_adapter.py --out out/tem_adapter            # generate (once), train, evaluate, table

A sweep over the command line, run in this process:

- the data: ``python -m mmadapters.video.synth trafficqa`` (unless ``--data`` / ``--train`` + ``--test``);
- ``zeroshot``: ``mmadapters eval videoqa`` without adapters (cosine of the mean frame feature and each
  candidate's text);
- every trained variant, for every ``--seeds`` value: ``mmadapters train tem-adapter --set ...`` then
  ``mmadapters eval videoqa --adapters RUN/last`` on the held-out split. ``tem-adapter`` is the paper's
  method with both official-code bugs fixed; ``official`` has both bugs (``repeat`` pairing, unshifted
  "future" target), ``official-repeat`` / ``official-unshifted`` one each (``recipe.official_*`` switches).

Training protocol (the official code's): every training question trains (``recipe.val_annotations`` is the
training file, so the run's validation reports training accuracy and never sees the held-out split) for
``--epochs`` passes, and the last aligners are scored. The frozen CLIP's frame features are cached on disk
once and shared by every run. Each run's folder and results file are named by a hash of its settings, so
rerunning the script reuses finished runs. ``--max-minutes`` stops starting new runs when the budget is
spent (the runs left out are listed). Writes ``tem_adapter_results.json`` (every run's metrics, results file
and command) and ``tem_adapter_results.md`` under ``--out``.

The frozen CLIP (``--model``): ``tiny`` (default) is the vision issue's tiny CLIP, trained on single large
shapes in stills; its frame features of these clips hardly carry the objects' colour, shape or position,
and every method scores at chance with it. ``video`` loads ``video/assets/video_clip`` when someone has
built it with ``scripts/pretrain_video_clip.py`` (not shipped: no run so far taught it position), and
``local-dir:DIR`` any such output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

VARIANTS = {  # name -> (official_repeat_pairing, official_unshifted_future); None: not trained
    "zeroshot": None,
    "tem-adapter": (False, False),
    "official": (True, True),
    "official-repeat": (True, False),
    "official-unshifted": (False, True),
}
DESCRIPTIONS = {
    "zeroshot": "frame-mean CLIP zero-shot (cosine of mean frame feature and text)",
    "tem-adapter": "Tem-Adapter, both official-code bugs fixed (this library's default)",
    "official": "official-code behaviour: `repeat` pairing + unshifted future target",
    "official-repeat": "only the `repeat` pairing bug (candidates see other questions' videos)",
    "official-unshifted": "only the unshifted future target (reconstruction instead of prediction)",
}
VIDEO_CLIP_DIR = Path(__file__).resolve().parent.parent / "video" / "assets" / "video_clip"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/tem_adapter"), help="results folder")
    p.add_argument("--data", type=Path, default=None, help="a generated QA set (default: OUT/trafficqa; generated "
                   "when missing)")
    p.add_argument("--train", type=Path, default=None, help="train jsonl (default: DATA/annotations/R2_train.jsonl)")
    p.add_argument("--test", type=Path, default=None, help="held-out jsonl (default: DATA/annotations/R2_test.jsonl)")
    p.add_argument("--video-root", type=Path, default=None, help="folder the vid_filename paths are relative to")
    p.add_argument("--n", type=int, default=400, help="clips to generate (3 questions each; 20%% held out)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--q-types", default="U,R,F", help="question types to generate")
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--template", default="{question} {answer}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2", help="training seeds of the trained variants")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training questions (the paper: 50)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--schedule", default="cosine", choices=("constant", "linear", "cosine"),
                   help="learning-rate decay over the steps (the paper halves it every 10 epochs; the engine offers "
                        "constant, linear and cosine)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these small matrices)")
    p.add_argument("--workers", type=int, default=1, help="generator processes / decoding workers")
    p.add_argument("--max-minutes", type=float, default=10.0, help="start no new run after this much wall time")
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: the library's cache)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="tiny",
                   help="frozen CLIP: 'tiny' (the vision issue's tiny CLIP, trained on stills), 'video' "
                        "(video/assets/video_clip, when built by scripts/pretrain_video_clip.py), or any name "
                        "mmadapters.vision.clip.load_clip accepts (local-dir:DIR ...)")
    return p.parse_args(argv)


def resolve_model(name: str) -> str | None:
    """``--model`` -> the name :func:`mmadapters.vision.clip.load_clip` takes (None: the shipped tiny CLIP)."""
    if name == "tiny":
        return None
    if name == "video":
        if not (VIDEO_CLIP_DIR / "open_clip_config.json").is_file():
            raise SystemExit(f"--model video: expected {VIDEO_CLIP_DIR}/open_clip_config.json; build it with "
                             "python scripts/pretrain_video_clip.py --output video/assets/video_clip, or pass --model tiny")
        return f"local-dir:{VIDEO_CLIP_DIR}"
    return name


def locate(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(train jsonl, test jsonl, video root), generating the data set when needed."""
    data = args.data or args.out / "trafficqa"
    train = args.train or data / "annotations" / "R2_train.jsonl"
    test = args.test or data / "annotations" / "R2_test.jsonl"
    if not (args.train and args.test) and not (train.is_file() and test.is_file()):
        from mmadapters.video.synth import main as synth_main

        print(f"generating {args.n} clips into {data}", flush=True)
        code = synth_main(["trafficqa", "--n", str(args.n), "--seed", str(args.data_seed), "--out", str(data),
                           "--q-types", args.q_types, "--workers", str(args.workers), "--no-progress"])
        if code:
            raise SystemExit(f"generation failed ({code})")
    if args.video_root:
        return train, test, args.video_root
    from mmadapters.video.readers import read_trafficqa

    first = read_trafficqa(test)[0].vid_filename
    for root in (test.parent, data, data / "videos", test.parent.parent, test.parent.parent / "videos"):
        if (root / first).is_file():
            return train, test, root
    raise SystemExit(f"{test}: cannot find video {first!r} under {data} or {test.parent}; pass --video-root")


def sets(section: str, values: dict) -> list[str]:
    """``--set section.key=<JSON>`` per value (JSON is YAML, so strings with braces or spaces survive)."""
    return [arg for key, value in values.items() for arg in ("--set", f"{section}.{key}={json.dumps(value)}")]


def tag(argv: list[str]) -> str:
    return hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:10]


def mmadapters(argv: list[str], log: list[str], *, done: bool) -> None:
    """Record ``mmadapters ARGV`` and, unless ``done`` (its output exists), run it in this process (same torch
    threads, no start-up per run); stop on failure."""
    from mmadapters.eval.cli import main as cli_main

    log.append(shlex.join(["mmadapters", *argv]))
    if done:
        return
    print(f"$ {log[-1]}", flush=True)
    code = cli_main(argv)
    if code:
        raise SystemExit(f"`{log[-1]}` failed with exit status {code}")


def evaluate(args: argparse.Namespace, test: Path, root: Path, name: str, extra: list[str], log: list[str]) -> dict:
    """``mmadapters eval videoqa`` into OUT/results/NAME-<hash>.json (reused when present)."""
    from mmadapters.eval.results_schema import read_results

    argv = ["eval", "videoqa", "--annotations", str(test), "--video-root", str(root), "--device", args.device,
            "--batch-size", "64", "--num-workers", str(max(args.workers - 1, 0)), "--no-progress", *extra]
    if args.cache_dir:
        argv += ["--cache-dir", str(args.cache_dir)]
    output = args.out / "results" / f"{name}-{tag(argv)}.json"
    mmadapters([*argv, "--output", str(output)], log, done=output.is_file())
    return {**read_results(output), "output": str(output)}


def train(args: argparse.Namespace, train_file: Path, root: Path, variant: str, seed: int, model: str | None,
          log: list[str]) -> tuple[Path, dict]:
    """``mmadapters train tem-adapter`` into OUT/runs/VARIANT-seedS-<hash> (reused when finished)."""
    from mmadapters.video.readers import read_trafficqa

    repeat, unshifted = VARIANTS[variant]
    steps = args.epochs * math.ceil(len(read_trafficqa(train_file, video_root=root)) / args.batch_size)
    recipe = {"train_annotations": str(train_file), "val_annotations": str(train_file), "video_root": str(root),
              "model": model, "num_frames": args.num_frames, "template": args.template,
              "num_workers": max(args.workers - 1, 0), "official_repeat_pairing": repeat,
              "official_unshifted_future": unshifted}
    if args.cache_dir:
        recipe["cache_dir"] = str(args.cache_dir)
    trainer = {"steps": steps, "batch_size": args.batch_size, "lr": args.lr, "schedule": args.schedule, "seed": seed,
               "eval_every": 0, "checkpoint_every": 0, "progress": False}
    argv = ["train", "tem-adapter", "--device", args.device, *sets("trainer", trainer), *sets("recipe", recipe)]
    run = args.out / "runs" / f"{variant}-seed{seed}-{tag(argv)}"
    done = (run / "train_summary.json").is_file()
    resume = ["--resume"] if not done and (run / "train_state.pt").is_file() else []  # cut off while saving
    mmadapters([*argv, "--output", str(run), *resume], log, done=done)
    return run, json.loads((run / "train_summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    import torch

    from mmadapters import __version__
    from mmadapters.atomic import atomic_write_bytes
    from mmadapters.eval.results_io import json_bytes

    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected among {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    train_file, test_file, root = locate(args)
    model = resolve_model(args.model)
    common = ["--model", model] if model else []

    runs, left_out, commands = [], [], []
    for variant in variants:
        for seed in [0] if VARIANTS[variant] is None else seeds:
            if (time.perf_counter() - t_start) / 60 > args.max_minutes:
                left_out.append(f"{variant} seed {seed}")
                continue
            t0 = time.perf_counter()
            if VARIANTS[variant] is None:
                run, summary = None, None
                results = evaluate(args, test_file, root, variant, [*common, "--num-frames", str(args.num_frames),
                                                                    "--template", args.template], commands)
            else:
                run, summary = train(args, train_file, root, variant, seed, model, commands)
                results = evaluate(args, test_file, root, f"{variant}-seed{seed}", ["--adapters", str(run / "last")],
                                   commands)
            runs.append({"variant": variant, "seed": seed, "metrics": results["metrics"], "per_group": results["per_group"],
                         "counts": results["counts"], "parameters": results["parameters"], "results": results["output"],
                         "run": str(run) if run else None, "train_s": summary["timings"]["train_s"] if summary else 0.0,
                         "run_s": round(time.perf_counter() - t0, 2)})
            print(f"{variant:20s} seed {seed}: acc {results['metrics']['acc']:.4f}", flush=True)

    payload = {"summary": summarize(runs, variants), "runs": runs, "left_out": left_out,
               "total_s": round(time.perf_counter() - t_start, 2),
               "command": shlex.join(["python", "scripts/run_tem_adapter.py", *(sys.argv[1:] if argv is None else argv)]),
               "commands": commands, "threads": args.threads, "mmadapters_version": __version__,
               "model": {"flag": args.model, "name": model}}
    atomic_write_bytes(args.out / "tem_adapter_results.json", json_bytes(payload))
    atomic_write_bytes(args.out / "tem_adapter_results.md", markdown(payload).encode())
    print(markdown(payload))
    return 0


def summarize(runs: list[dict], variants: list[str]) -> dict[str, dict]:
    """Per variant: mean and std of accuracy over seeds, per-q_type means, seeds run."""
    out = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        accs = [r["metrics"]["acc"] for r in mine]
        types = sorted({t for r in mine for t in r["per_group"]})
        out[variant] = {"acc_mean": statistics.fmean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "acc_runs": accs, "seeds": [r["seed"] for r in mine],
                        "acc_by_q_type": {t: statistics.fmean(r["per_group"][t]["acc"] for r in mine if t in r["per_group"])
                                          for t in types},
                        "chance": mine[0]["metrics"]["chance"]}
    return out


def markdown(payload: dict) -> str:
    summary, runs = payload["summary"], payload["runs"]
    types = sorted({t for s in summary.values() for t in s["acc_by_q_type"]})
    lines = ["| variant | accuracy (mean ± std over seeds) | " + " | ".join(f"q_type {t}" for t in types) + " | what |",
             "|---|---|" + "---|" * len(types) + "---|"]
    for variant, s in summary.items():
        by_type = " | ".join(f"{s['acc_by_q_type'].get(t, float('nan')):.3f}" for t in types)
        spread = f" ± {s['acc_std']:.3f} (n={len(s['seeds'])})" if variant != "zeroshot" else ""
        lines.append(f"| {variant} | {s['acc_mean']:.3f}{spread} | {by_type} | {DESCRIPTIONS[variant]} |")
    if runs:
        c = runs[0]["counts"]
        lines += ["", f"Held-out questions: {c['evaluated']} ({c['skipped']} skipped); chance "
                  f"{runs[0]['metrics']['chance']:.3f}. Total {payload['total_s']:.1f}s on {payload['threads']} threads. "
                  f"Frozen CLIP: `--model {payload['model']['flag']}`."]
    lines.append(f"Command: `{payload['command']}`")
    if payload["left_out"]:
        lines.append(f"Left out (time budget): {', '.join(payload['left_out'])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
