"""Video loading speed: sampling 8 frames from 300-frame clips — decord path vs PyAV decode-all vs the DataLoader.

All variants load the same clips (mp4, H.264, written here with PyAV from a seeded generator) and produce the same
8 TSN test-time frames per clip as uint8 arrays; each is timed over one pass of all clips, the passes interleaved
round-robin over ``--reps`` repetitions so that drift in machine load hits all of them alike; medians.

- ``pyav decode-all`` (the peer): PyAV opens the clip, decodes every frame to RGB, keeps the 8 sampled ones
  (frame threading on, ``thread_type="AUTO"``: PyAV at its fastest).
- ``ours pyav``: ``load_clip(backend="pyav", timeout_s=None)`` — PyAV decoding only up to the last needed frame.
- ``ours decord``: ``load_clip(backend="decord", timeout_s=None)`` — decord seeks to each sampled frame (in-process).
- ``ours decord, time-bounded``: ``load_clip()`` with its defaults — decoding in the helper process under a timeout
  (the cost of the hang guard: the pipe copy and the round trip).
- ``ours DataLoader``: ``make_loader(VideoDataset(...), num_workers=--workers)``, persistent workers, timed over
  a full pass after a warm-up pass (steady state: worker start-up excluded, and reported separately).

Ratios are clips/s of each variant over the peer's, measured in this run. Target: ours decord ≥ 3x the peer.

    .venv/bin/python bench/video.py --quick     # smoke run: 3 clips of 60 frames, seconds
    .venv/bin/python bench/video.py             # 16 clips of 300 frames at 320x240, GOP 30, 5 repetitions
    .venv/bin/python bench/video.py --append-results docs/results.md

Writes ``--out``.json and ``--out``.md (default bench/out/video) and prints the table. Clips go to ``--work-dir``
(default out/bench_video, gitignored) and are reused while their settings match.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mmadapters.eval.results_io import write_bench_report

REPO = Path(__file__).resolve().parents[1]
PEER = "pyav decode-all"
TARGET = ("ours decord", 3.0)


# ------------------------------------------------------------------------------------------------- inputs


def write_clip(path: Path, frames: int, width: int, height: int, gop: int, seed: int) -> None:
    """A seeded clip: a drifting colour gradient, a few moving rectangles and grain (so the codec has work to do)."""
    import av

    from mmadapters.io import atomic_write_bytes

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    boxes = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(-3, 3), rng.uniform(-3, 3),
              rng.integers(0, 256, 3)) for _ in range(4)]
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "veryfast"}
        for t in range(frames):
            img = np.empty((height, width, 3), np.float32)
            img[..., 0] = 128 + 100 * np.sin((xx + 2 * t) / 40)
            img[..., 1] = 128 + 100 * np.cos((yy - t) / 30)
            img[..., 2] = (xx + yy + 3 * t) % 256
            for x0, y0, dx, dy, colour in boxes:
                x, y = int(x0 + dx * t) % width, int(y0 + dy * t) % height
                img[y:y + height // 6, x:x + width // 6] = colour
            img += rng.normal(0, 6, img.shape)
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()


def make_clips(work: Path, n: int, frames: int, width: int, height: int, gop: int, seed: int) -> list[str]:
    settings = {"n": n, "frames": frames, "width": width, "height": height, "gop": gop, "seed": seed, "version": 1}
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "clips.json"
    paths = [work / f"clip_{i:03d}.mp4" for i in range(n)]
    if manifest.is_file() and json.loads(manifest.read_text()) == settings and all(p.is_file() for p in paths):
        return [str(p) for p in paths]
    for i, p in enumerate(paths):
        write_clip(p, frames, width, height, gop, seed * 1000 + i)
    manifest.write_text(json.dumps(settings))
    return [str(p) for p in paths]


# ----------------------------------------------------------------------------------------------- variants


def pyav_decode_all(path: str, num_frames: int) -> np.ndarray:
    """The peer: decode every frame with PyAV, keep the TSN test-time ones."""
    import av

    from mmadapters.video.io import sample_indices

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return np.stack([frames[i] for i in sample_indices(len(frames), num_frames)])


def variants(paths: list[str], args) -> dict[str, Callable[[], int]]:
    from mmadapters.video.data import VideoDataset, make_loader
    from mmadapters.video.io import load_clip

    def per_clip(fn):
        def run():
            for p in paths:
                fn(p)
            return len(paths)
        return run

    loader = make_loader(VideoDataset(paths, num_frames=args.num_frames), batch_size=args.batch,
                         num_workers=args.workers, persistent_workers=args.workers > 0)
    t0 = time.perf_counter()
    warm = sum(len(b["path"]) for b in loader)  # starts the workers (and their decoder helpers)
    variants.startup_s = time.perf_counter() - t0

    def through_loader():
        n = sum(len(b["path"]) for b in loader)
        if n != len(paths):
            raise RuntimeError(f"DataLoader returned {n} of {len(paths)} clips (skipped: {loader.skipped})")
        return n

    assert warm == len(paths), loader.skipped
    return {
        PEER: per_clip(lambda p: pyav_decode_all(p, args.num_frames)),
        "ours pyav": per_clip(lambda p: load_clip(p, args.num_frames, backend="pyav", timeout_s=None)),
        "ours decord": per_clip(lambda p: load_clip(p, args.num_frames, backend="decord", timeout_s=None)),
        "ours decord, time-bounded": per_clip(lambda p: load_clip(p, args.num_frames, backend="decord")),
        "ours DataLoader": through_loader,
    }


def agreement(paths: list[str], num_frames: int) -> dict[str, float]:
    """Mean |difference| (grey levels) between the peer's frames and each of ours, on the first clip."""
    from mmadapters.video.io import load_clip

    ref = pyav_decode_all(paths[0], num_frames).astype(np.int16)
    out = {}
    for backend in ("pyav", "decord"):
        ours = load_clip(paths[0], num_frames, backend=backend, timeout_s=None).permute(0, 2, 3, 1).numpy()
        out[backend] = float(np.abs(ours.astype(np.int16) - ref).mean())
    return out


def measure(fns: dict[str, Callable[[], int]], reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up: imports, helper start, page cache
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------------------------------------- output


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Machine: {result['machine']}; Python {result['python']}, decord {result['decord']}, PyAV {result['av']}. "
             f"{s['clips']} clips of {s['frames']} frames, {s['width']}x{s['height']} H.264 (GOP {s['gop']}), "
             f"{s['num_frames']} TSN frames per clip; DataLoader: {s['workers']} workers, batch {s['batch']}; "
             f"{s['reps']} interleaved repetitions, medians.", "",
             f"| variant | clips/s | ratio vs {PEER} | target |", "|---|---|---|---|"]
    for name, v in result["variants"].items():
        target = ""
        if name == TARGET[0]:
            target = f"≥ {TARGET[1]:g}x: {'yes' if v['ratio'] >= TARGET[1] else '**no**'}"
        lines.append(f"| {name} | {v['clips_per_s']:.1f} | {v['ratio']:.2f} | {target} |")
    lines += ["", f"DataLoader start-up (first pass, {s['workers']} workers): {result['loader_startup_s']:.2f} s. "
              "Mean |difference| from the peer's frames (grey levels): "
              + ", ".join(f"{k} {v:.2f}" for k, v in result["agreement"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 clips of 60 frames at 160x120, 1 repetition: seconds")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--frames", type=int, default=300, help="frames per clip")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--gop", type=int, default=30, help="keyframe interval of the written clips")
    ap.add_argument("--num-frames", type=int, default=8, help="frames sampled per clip")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    ap.add_argument("--batch", type=int, default=4, help="DataLoader batch size")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default=str(REPO / "out" / "bench_video"))
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "video"))
    ap.add_argument("--append-results", default=None, help="append the markdown table to this file (docs/results.md)")
    args = ap.parse_args(argv)
    if args.quick:  # smaller defaults; options given explicitly win
        for name, value in {"clips": 3, "frames": 60, "width": 160, "height": 120, "reps": 1}.items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    import av
    import decord
    import torch

    torch.set_num_threads(1)  # decoding is the subject; keep torch's resize/permute threads out of the way
    start = time.time()
    paths = make_clips(Path(args.work_dir) / ("quick" if args.quick else "full"), args.clips, args.frames, args.width,
                       args.height, args.gop, args.seed)
    fns = variants(paths, args)
    times = measure(fns, args.reps)
    peer = statistics.median(times[PEER])
    result = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/video.py",
                                                     *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.node() or 'host'}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "python": platform.python_version(), "decord": decord.__version__, "av": av.__version__,
        "settings": {"clips": args.clips, "frames": args.frames, "width": args.width, "height": args.height,
                     "gop": args.gop, "num_frames": args.num_frames, "workers": args.workers, "batch": args.batch,
                     "reps": args.reps, "seed": args.seed, "quick": args.quick},
        "peer": PEER,
        "variants": {name: {"seconds": t, "median_s": statistics.median(t),
                            "clips_per_s": args.clips / statistics.median(t),
                            "ratio": peer / statistics.median(t)} for name, t in times.items()},
        "target": {"variant": TARGET[0], "ratio": TARGET[1]},
        "loader_startup_s": variants.startup_s,
        "agreement": agreement(paths, args.num_frames),
    }
    result["target"]["met"] = result["variants"][TARGET[0]]["ratio"] >= TARGET[1]
    result["wall_seconds"] = round(time.time() - start, 1)
    write_bench_report(args.out, result, markdown(result), title="Video loading benchmark", append_to=args.append_results)
    return result


if __name__ == "__main__":
    main()
