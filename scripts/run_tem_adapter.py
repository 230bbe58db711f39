"""Tem-Adapter vs frame-mean CLIP zero-shot vs the official code's behaviour, on generated moving-shape VideoQA.

    python scripts/run_tem_adapter.py --out out/tem_adapter            # generate (once), encode, train, compare

Steps: generate a SUTD-TrafficQA-style moving-shape QA set with ``python -m mmadapters.video.synth trafficqa``
(or take ``--data`` / ``--train`` + ``--test``), encode its frames and question+candidate texts with a frozen
CLIP (frame features cached on disk by :class:`mmadapters.video.data.FrameFeatureCache`), then score the
held-out split with

- ``zeroshot``: cosine of the mean frame feature and each candidate's text (no training);
- ``tem-adapter``: Semantic + Temporal Aligner, trained on the train split (the paper's method, both
  official-code bugs fixed);
- ``official``: the same with both official-code bugs (``repeat`` pairing, unshifted "future" target),
  and ``official-repeat`` / ``official-unshifted`` with each bug alone.

Trained variants run for every ``--seeds`` value (same data, different initialization and shuffling) and
are reported as mean ± std. Writes ``tem_adapter_results.json`` (one house-style results record per run)
and ``tem_adapter_results.md`` under ``--out``. ``--max-minutes`` stops starting new runs when the budget
is spent (the runs left out are listed). Defaults fit in about 10 minutes on 2 CPU cores.

The frozen CLIP (``--model``): ``tiny`` (default) is the vision issue's tiny CLIP, trained on single large
shapes in stills; its frame features of these clips hardly carry the objects' colour, shape or position,
and every method scores at chance with it. ``video`` loads ``video/assets/video_clip`` when someone has
built it with ``scripts/pretrain_video_clip.py`` (not shipped: no run so far taught it position), and
``local-dir:DIR`` any such output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

VARIANTS = {
    "zeroshot": ("zeroshot", False, False),
    "tem-adapter": ("tem-adapter", False, False),
    "official": ("tem-adapter", True, True),
    "official-repeat": ("tem-adapter", True, False),
    "official-unshifted": ("tem-adapter", False, True),
}
DESCRIPTIONS = {
    "zeroshot": "frame-mean CLIP zero-shot (cosine of mean frame feature and text)",
    "tem-adapter": "Tem-Adapter, both official-code bugs fixed (this library's default)",
    "official": "official-code behaviour: `repeat` pairing + unshifted future target",
    "official-repeat": "only the `repeat` pairing bug (candidates see other questions' videos)",
    "official-unshifted": "only the unshifted future target (reconstruction instead of prediction)",
}


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
    p.add_argument("--epochs", type=int, default=30, help="training epochs (the paper: 50; 30 fits the time budget)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-halve-every", type=int, default=10)
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


VIDEO_CLIP_DIR = Path(__file__).resolve().parent.parent / "video" / "assets" / "video_clip"


def resolve_model(name: str) -> str | None:
    """``--model`` -> the name :func:`mmadapters.vision.clip.load_clip` takes (None: the shipped tiny CLIP)."""
    if name == "tiny":
        return None
    if name == "video":
        try:
            import mmadapters.video as video_pkg

            directory = Path(video_pkg.__file__).resolve().parent / "assets" / "video_clip"
        except ImportError:  # pragma: no cover - the package is installed with the repository
            directory = VIDEO_CLIP_DIR
        if not (directory / "open_clip_config.json").is_file():
            raise SystemExit(f"--model video: expected {directory}/open_clip_config.json; build it with "
                             "python scripts/pretrain_video_clip.py --output video/assets/video_clip, or pass --model tiny")
        return f"local-dir:{directory}"
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


def main(argv: list[str] | None = None) -> int:
    from mmadapters import __version__
    from mmadapters.eval.results_io import json_bytes, results_key
    from mmadapters.eval.videoqa_eval import build_results, default_cache_dir, encode_split, score_split
    from mmadapters.io import atomic_write_bytes
    from mmadapters.vision.clip import load_clip

    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected among {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    train_file, test_file, video_root = locate(args)
    cache_dir = args.cache_dir or default_cache_dir()

    model_name = resolve_model(args.model)
    clip = load_clip(model_name, device=args.device, declare_points=False)
    model_label = "tiny_clip" if model_name is None else clip.info.short_name
    common = {"video_root": video_root, "num_frames": args.num_frames, "template": args.template,
              "device": args.device, "cache_dir": cache_dir, "num_workers": max(args.workers - 1, 0)}
    t0 = time.perf_counter()
    train = encode_split(clip, train_file, **common)
    test = encode_split(clip, test_file, **common)
    encode_s = time.perf_counter() - t0
    print(f"features: train {len(train.features)} questions ({train.skipped_questions} skipped), test "
          f"{len(test.features)} ({test.skipped_questions} skipped), {encode_s:.1f}s", flush=True)

    runs, left_out = [], []
    for variant in variants:
        method, repeat, unshifted = VARIANTS[variant]
        for seed in ([0] if method == "zeroshot" else seeds):
            if (time.perf_counter() - t_start) / 60 > args.max_minutes:
                left_out.append(f"{variant} seed {seed}")
                continue
            t0 = time.perf_counter()
            scores, adapter = score_split(method, test, train, official_repeat_pairing=repeat,
                                          official_unshifted_future=unshifted, epochs=args.epochs,
                                          batch_size=args.batch_size, lr=args.lr, lr_halve_every=args.lr_halve_every,
                                          seed=seed, device=args.device)
            settings = {"variant": variant, "method": method, "official_repeat_pairing": repeat,
                        "official_unshifted_future": unshifted, "seed": seed, "epochs": args.epochs,
                        "batch_size": args.batch_size, "lr": args.lr, "lr_halve_every": args.lr_halve_every,
                        "num_frames": args.num_frames, "template": args.template, "train": str(train_file),
                        "test": str(test_file), "video_root": str(video_root), "model": args.model,
                        "weights": clip.info.as_dict()}
            record = build_results(dataset=test_file.parent.parent.name + "/" + test_file.stem, model=model_label,
                                   pretrained=None, task=f"videoqa_multiple_choice/{variant}", test=test, train=train,
                                   scores=scores, adapter=adapter, settings=settings,
                                   run_key=results_key({"weights": clip.info.identity(), **settings}), version=__version__)
            record["timings"]["run_s"] = round(time.perf_counter() - t0, 3)
            runs.append(record)
            print(f"{variant:20s} seed {seed}: acc {record['metrics']['acc']:.4f}  ({record['timings']['run_s']:.1f}s)",
                  flush=True)

    summary = summarize(runs, variants)
    total_s = time.perf_counter() - t_start
    payload = {"summary": summary, "runs": runs, "left_out": left_out, "features_s": round(encode_s, 2),
               "total_s": round(total_s, 2), "command": " ".join(["python", "scripts/run_tem_adapter.py", *(argv or sys.argv[1:])]),
               "threads": args.threads, "mmadapters_version": __version__,
               "model": {"flag": args.model, "label": model_label, **clip.info.as_dict()}}
    atomic_write_bytes(args.out / "tem_adapter_results.json", json_bytes(payload))
    atomic_write_bytes(args.out / "tem_adapter_results.md", markdown(payload, test, train).encode())
    print(markdown(payload, test, train))
    return 0


def summarize(runs: list[dict], variants: list[str]) -> dict[str, dict]:
    """Per variant: mean and std of accuracy over seeds, per-q_type means, seeds run."""
    out = {}
    for variant in variants:
        mine = [r for r in runs if r["settings"]["variant"] == variant]
        if not mine:
            continue
        accs = [r["metrics"]["acc"] for r in mine]
        types = sorted({t for r in mine for t in r["metrics"]["acc_by_q_type"]})
        out[variant] = {"acc_mean": statistics.fmean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "acc_runs": accs, "seeds": [r["settings"]["seed"] for r in mine],
                        "acc_by_q_type": {t: statistics.fmean(r["metrics"]["acc_by_q_type"].get(t, float("nan"))
                                                              for r in mine) for t in types},
                        "chance": mine[0]["metrics"]["chance"]}
    return out


def markdown(payload: dict, test, train) -> str:
    summary = payload["summary"]
    types = sorted({t for s in summary.values() for t in s["acc_by_q_type"]})
    lines = ["| variant | accuracy (mean ± std over seeds) | " + " | ".join(f"q_type {t}" for t in types) + " | what |",
             "|---|---|" + "---|" * len(types) + "---|"]
    for variant, s in summary.items():
        by_type = " | ".join(f"{s['acc_by_q_type'].get(t, float('nan')):.3f}" for t in types)
        spread = f" ± {s['acc_std']:.3f} (n={len(s['seeds'])})" if variant != "zeroshot" else ""
        lines.append(f"| {variant} | {s['acc_mean']:.3f}{spread} | {by_type} | {DESCRIPTIONS[variant]} |")
    chance = next(iter(summary.values()))["chance"] if summary else float("nan")
    lines += ["", f"Held-out questions: {len(test.features)} ({test.skipped_questions} skipped), train questions: "
              f"{len(train.features)} ({train.skipped_questions} skipped); chance {chance:.3f}. "
              f"Features {payload['features_s']:.1f}s, total {payload['total_s']:.1f}s on {payload['threads']} threads.",
              f"Frozen CLIP: {payload['model']['label']} (`--model {payload['model']['flag']}`, weights sha256 "
              f"{str(payload['model']['weights_sha256'])[:12]}).",
              f"Command: `{payload['command']}`"]
    if payload["left_out"]:
        lines.append(f"Left out (time budget): {', '.join(payload['left_out'])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
