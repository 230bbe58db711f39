"""FineCLIPER on generated cartoon-face expression clips: cue-level ablation against CLIP baselines.

    python scripts/run_fineclipper.py --data out/faces --n 700 --fold 1 --epochs 15 --output out/fineclipper

Generates the faces (``python -m mmadapters.video.synth faces``) if ``--data`` holds none, then sweeps the
command line (in this process) and reports UAR / WAR on the fold's test list for:

- ``zeroshot``: frozen CLIP's frame-mean feature scored against the positive/negative class descriptions
  (``mmadapters eval dfer`` without adapters);
- ``probe``: a CLIP linear probe on frozen frame-mean features (``recipe.linear_probe: true``, trained with
  ``--probe-lr``);
- ``frames`` / ``middle`` / ``high`` / ``all``: FineCLIPER with frames only, frames + masks + landmarks, frames +
  descriptions, and all cue levels (``recipe.cues``);
- ``finetune``: the fine-tuned CLIP baseline at FineCLIPER's trainable budget (``recipe.baseline: finetune_clip``):
  no adapters and no cues, the last image-tower block's qkv and MLP output projections of CLIP itself train under
  the frames-only head (``recipe.finetune_params``; 164,450 trainable parameters on the tiny CLIP against the
  all-levels FineCLIPER's 163,491), at ``--lr``.

``--cues exact,realistic`` runs every FineCLIPER variant that uses a cue once per cue source (``recipe.cue_source``:
the renderer's exact cues, or the realistic ones of :mod:`mmadapters.video.realistic_cues` at the recipe's default
rates, seeded with ``--cue-seed``); ``mmadapters eval dfer`` reads the test clips' cues the way the run recorded.
Zero-shot, the probe and frames-only use no cue and run once. Exact runs keep the command (and run folder) they
had before the option.

Each trained variant is ``mmadapters train fineclipper --set ...`` on the fold's training list (which is also
its validation list, so every clip trains and the test list is never read in training) for ``--epochs``
passes, then ``mmadapters eval dfer --adapters RUN/last``. Runs and results files are named by a hash of
their settings and reused when the script is run again. Writes ``results.json`` (metrics, trainable
parameters, training time, results file and command per variant) and ``results.md`` under ``--output``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

CUES = {"frames": [], "middle": ["masks", "landmarks"], "high": ["description"],
        "all": ["masks", "landmarks", "description"], "finetune": []}
NAMES = {"zeroshot": "CLIP zero-shot (frame mean, positive − negative descriptions)",
         "probe": "CLIP linear probe (frozen frame mean)",
         "frames": "FineCLIPER: frames only",
         "middle": "FineCLIPER: frames + masks + landmarks (low + middle)",
         "high": "FineCLIPER: frames + descriptions (low + high)",
         "all": "FineCLIPER: all levels",
         "finetune": "Fine-tuned CLIP (last block's qkv + MLP out) + frames-only head, all-levels budget"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="out/faces", help="generated faces folder (created if missing)")
    ap.add_argument("--n", type=int, default=700, help="clips to generate when --data is empty")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated data and of training")
    ap.add_argument("--fold", type=int, default=1)
    ap.add_argument("--num-frames", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=15, help="passes over the training list")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--probe-lr", type=float, default=1e-2, help="learning rate of the linear probe")
    ap.add_argument("--adapter-dim", type=int, default=16)
    ap.add_argument("--model", default=None, help="CLIP (default: the shipped tiny CLIP)")
    ap.add_argument("--variants", default=",".join(NAMES), help=f"comma-separated subset of: {','.join(NAMES)}")
    ap.add_argument("--cues", default="exact", help="comma-separated cue sources of the cue variants: exact, realistic")
    ap.add_argument("--cue-seed", type=int, default=0, help="seed of the realistic cues (recipe.cue_seed)")
    ap.add_argument("--output", default="out/fineclipper")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    return ap.parse_args(argv)


def sets(section: str, values: dict) -> list[str]:
    """``--set section.key=<JSON>`` per value (JSON is YAML)."""
    return [arg for key, value in values.items() for arg in ("--set", f"{section}.{key}={json.dumps(value)}")]


def tag(argv: list[str]) -> str:
    return hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:10]


def mmadapters(argv: list[str], log: list[str], *, done: bool) -> None:
    """Record ``mmadapters ARGV`` and, unless ``done`` (its output exists), run it in this process; stop on failure."""
    from mmadapters.eval.cli import main as cli_main

    log.append(shlex.join(["mmadapters", *argv]))
    if done:
        return
    print(f"$ {log[-1]}", flush=True)
    code = cli_main(argv)
    if code:
        raise SystemExit(f"`{log[-1]}` failed with exit status {code}")


def run_variant(args: argparse.Namespace, variant: str, data: Path, train_list: Path, out: Path, log: list[str],
                cues: str = "exact") -> dict:
    """Train (unless zero-shot) and evaluate one variant with ``cues`` (exact or realistic); its row of the table."""
    from mmadapters.eval.results_schema import read_results
    from mmadapters.video.readers import read_dfer_annotation

    model = ["--model", args.model] if args.model else []
    evaluate = ["eval", "dfer", "--data-dir", str(data), "--fold", str(args.fold), "--split", "test", "--device",
                args.device, "--no-progress"]
    summary, run = None, None
    if variant == "zeroshot":
        evaluate += [*model, "--num-frames", str(args.num_frames)]
    else:
        steps = args.epochs * math.ceil(len(read_dfer_annotation(train_list, "dfew", root=data)) / args.batch_size)
        probe = variant == "probe"
        recipe = {"data_dir": str(data), "fold": args.fold, "val_annotation": str(train_list), "model": args.model,
                  "num_frames": args.num_frames, "cues": [] if probe else CUES[variant],
                  "adapter_dim": 0 if probe else args.adapter_dim, "linear_probe": probe}
        if variant == "finetune":  # (the other variants keep the command, and run folder, they had before)
            recipe.update(adapter_dim=0, baseline="finetune_clip")
        if cues != "exact":
            recipe.update(cue_source=cues, cue_seed=args.cue_seed)
        trainer = {"steps": steps, "batch_size": args.batch_size, "lr": args.probe_lr if probe else args.lr,
                   "schedule": "cosine", "seed": args.seed, "eval_every": 0, "checkpoint_every": 0, "progress": False}
        argv = ["train", "fineclipper", "--device", args.device, *sets("trainer", trainer), *sets("recipe", recipe)]
        run = out / "runs" / f"{variant}{'' if cues == 'exact' else '-' + cues}-{tag(argv)}"
        done = (run / "train_summary.json").is_file()
        resume = ["--resume"] if not done and (run / "train_state.pt").is_file() else []  # cut off while saving
        mmadapters([*argv, "--output", str(run), *resume], log, done=done)
        summary = json.loads((run / "train_summary.json").read_text())
        evaluate += ["--adapters", str(run / "last")]
    results_file = out / "results" / f"{variant}{'' if cues == 'exact' else '-' + cues}-{tag(evaluate)}.json"
    mmadapters([*evaluate, "--output", str(results_file)], log, done=results_file.is_file())
    res = read_results(results_file)
    params = summary["parameters"] if summary else {"trainable": 0, "backbone": res["parameters"]["total"]}
    name = NAMES[variant] + ("" if cues == "exact" else f" ({cues} cues)")
    return {"variant": name, "key": variant if cues == "exact" else f"{variant}-{cues}", "cues": cues,
            "trainable_params": params["trainable"],
            "trainable_pct": 100.0 * params["trainable"] / params["backbone"],
            "train_seconds": summary["timings"]["train_s"] if summary else 0.0, "uar": res["metrics"]["uar"],
            "war": res["metrics"]["war"], "n": res["counts"]["evaluated"], "skipped": res["counts"]["skipped"],
            "per_class_recall": {k: v["recall"] for k, v in res["per_group"].items()}, "results": str(results_file),
            "run": str(run) if run else None}


def main(argv: list[str] | None = None) -> int:
    from mmadapters.atomic import atomic_write_bytes
    from mmadapters.eval.results_io import json_bytes
    from mmadapters.video.readers import dfer_annotation_path

    args = parse_args(argv)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in NAMES]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected among {','.join(NAMES)}")
    sources = [c.strip() for c in args.cues.split(",") if c.strip()]
    if not sources or any(c not in ("exact", "realistic") for c in sources):
        raise SystemExit(f"--cues {args.cues!r}: expected a comma-separated subset of exact,realistic")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data, out = Path(args.data), Path(args.output)
    if not (data / "dataset.json").is_file():
        from mmadapters.video.synth_faces import generate_faces

        generate_faces(data, n=args.n, seed=args.seed)
    train_list = dfer_annotation_path("dfew", data / "annotation", "train", args.fold)
    commands: list[str] = []
    results = []
    for variant in wanted:
        for cues in (sources if CUES.get(variant) else ["exact"]):  # a variant without cues runs once, as before
            results.append(run_variant(args, variant, data, train_list, out, commands, cues))
            print(f"{results[-1]['variant']}: UAR {results[-1]['uar']:.3f} WAR {results[-1]['war']:.3f}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": shlex.join(["python", "scripts/run_fineclipper.py", *(sys.argv[1:] if argv is None else argv)]),
               "commands": commands, "data": str(data), "fold": args.fold, "settings": vars(args),
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


if __name__ == "__main__":
    raise SystemExit(main())
