"""Generated video worlds: shared writing code and the command line.

Three worlds live in their own modules and write through the helpers here:

- :mod:`mmadapters.video.synth_traffic` — moving coloured shapes with events (moves left/right, grows,
  changes colour, collides) and 4-option questions about them, including "what happens next", written as
  SUTD-TrafficQA rows (for Tem-Adapter).
- :mod:`mmadapters.video.synth_faces` — cartoon faces whose expression changes over time across DFEW's 7
  classes, with the renderer's exact landmarks, part masks and a templated description of the change,
  written in the DFEW / DFER-CLIP layout (for FineCLIPER).
- :mod:`mmadapters.video.synth_motion` — one or two big shapes, one of which moves, grows/shrinks or changes colour, asked
  about in order-dependent questions (an option against its reverse), SUTD-TrafficQA rows; ``dataset.json``
  records the CLIP x-position gate (:mod:`mmadapters.video.gate`).

Command line::

    python -m mmadapters.video.synth trafficqa --n 600 --seed 0 --out data/trafficqa
    python -m mmadapters.video.synth faces --n 700 --seed 0 --out data/faces
    python -m mmadapters.video.synth motion --n 600 --seed 0 --out data/motion

Everything is a pure function of the seed: the same seed gives the same bytes (mp4 files included: libx264
runs single-threaded, the zip members of the NPZ cue files carry a fixed timestamp). Files are written to
a temporary name and renamed; ``dataset.json`` is written last, and a folder whose ``dataset.json`` records
the same arguments is left as it is.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from mmadapters.io import atomic_write_bytes, replace_directory

__all__ = [
    "FPS",
    "balanced_schedule",
    "encode_mp4",
    "key",
    "main",
    "npz_bytes",
    "png_bytes",
    "prepare_root",
    "progress_bar",
    "rng_for",
    "write_dataset_record",
    "write_frame_dir",
    "write_lines",
    "write_mp4",
]

FPS = 8
DATASET_RECORD = "dataset.json"
# A fixed zip timestamp (the earliest zip can store) so NPZ bytes depend only on the arrays.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


# ----------------------------------------------------------------------------------------------- seeding


def key(text: str) -> int:
    """A stable 32-bit integer for ``text`` (names a random stream)."""
    return zlib.crc32(text.encode("utf-8"))


def rng_for(*keys: int) -> np.random.Generator:
    """A generator that depends only on ``keys`` (seed, stream name, item index, ...)."""
    return np.random.default_rng([int(k) for k in keys])


def balanced_schedule(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` values in ``0..k-1``: consecutive blocks of ``k`` are permutations, so counts differ by at most 1.

    Returns an int64 array of shape ``(n,)``.
    """
    if n < 0 or k < 1:
        raise ValueError(f"balanced_schedule: need n >= 0 and k >= 1, got n={n}, k={k}")
    blocks = [rng.permutation(k) for _ in range((n + k - 1) // k)]
    return np.concatenate(blocks)[:n].astype(np.int64) if blocks else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------------------------- encoding


def _check_frames(frames: np.ndarray, what: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(f"{what}: expected uint8 frames of shape (T>=1, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return np.ascontiguousarray(frames)


def encode_mp4(frames: np.ndarray, *, fps: int = FPS, codec: str = "libx264", crf: int = 18) -> bytes:
    """Encode ``frames`` (T, H, W, 3) uint8 RGB as an mp4 (yuv420p) and return its bytes.

    H and W must be even (4:2:0 chroma). ``codec`` is "libx264" (CRF ``crf``, no B-frames) or "mpeg4"
    (fixed quantiser). One encoder thread, so the same frames always give the same bytes with the same
    FFmpeg/x264 build.
    """
    frames = _check_frames(frames, "encode_mp4")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"encode_mp4: frame size {w}x{h} must be even for yuv420p")
    if codec not in ("libx264", "mpeg4"):
        raise ValueError(f"encode_mp4: codec={codec!r}; expected 'libx264' or 'mpeg4'")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.thread_count = 1
        if codec == "libx264":
            # bframes=0: every decoder (decord, PyAV) returns frames in file order with exact counts
            stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "bframes=0"}
        else:
            stream.options = {"qscale": "3", "threads": "1"}
        for i in range(t):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frames[i], format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def write_mp4(path: str | os.PathLike, frames: np.ndarray, *, fps: int = FPS, codec: str = "libx264", crf: int = 18) -> Path:
    """Encode ``frames`` (T, H, W, 3) uint8 and write them atomically to ``path``; returns the path."""
    path = Path(path)
    atomic_write_bytes(path, encode_mp4(frames, fps=fps, codec=codec, crf=crf))
    return path


def png_bytes(image: np.ndarray) -> bytes:
    """PNG bytes of one (H, W, 3) uint8 RGB or (H, W) uint8 grey image (no timestamps: deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def write_frame_dir(directory: str | os.PathLike, frames: np.ndarray) -> Path:
    """Write ``frames`` (T, H, W, 3) uint8 as ``directory/00001.png ...`` (1-based, DFEW style).

    The folder is built under a temporary name and renamed into place, so a reader never sees half of it;
    an existing folder is replaced. Nothing but the frames goes into it (frame-folder loaders glob ``*``).
    """
    frames = _check_frames(frames, f"write_frame_dir({directory})")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for i, frame in enumerate(frames):
            (built / f"{i + 1:05d}.png").write_bytes(png_bytes(frame))
        replace_directory(built, directory)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    return directory


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An ``.npz`` (deflated) holding ``arrays``, readable by ``np.load``; same arrays give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    """Write text lines (each ending with a newline) atomically."""
    path = Path(path)
    atomic_write_bytes(path, "".join(f"{line}\n" for line in lines).encode("utf-8"))
    return path


# ----------------------------------------------------------------------------------------------- dataset folders


def prepare_root(root: str | os.PathLike, record: Mapping[str, Any], subdirs: Sequence[str]) -> tuple[Path, bool]:
    """Get ``root`` ready for a generator run described by ``record``.

    Returns ``(root, done)``. ``done`` is True when ``root/dataset.json`` already holds ``record`` (nothing to
    do). Otherwise the record is removed and the generator's ``subdirs`` are deleted, so a run with other
    arguments never mixes old and new files; ``dataset.json`` is written last by :func:`write_dataset_record`.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root}: output path exists and is not a directory")
    meta = root / DATASET_RECORD
    if meta.is_file():
        try:
            stored = json.loads(meta.read_text(encoding="utf-8"))
            stored.pop("summary", None)  # what the run produced, not what it was asked for
            if stored == json.loads(json.dumps(record)):
                return root, True
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # unreadable: regenerate
        meta.unlink()
    root.mkdir(parents=True, exist_ok=True)
    for sub in subdirs:
        if (root / sub).is_dir():
            shutil.rmtree(root / sub)
        elif (root / sub).exists():
            (root / sub).unlink()
    return root, False


def write_dataset_record(root: Path, record: Mapping[str, Any]) -> None:
    """Write ``root/dataset.json`` (last, atomically): the run is complete."""
    atomic_write_bytes(root / DATASET_RECORD, (json.dumps(record, indent=2) + "\n").encode("utf-8"))


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar (shown only on a terminal) or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="clip", disable=None)


def run_jobs(fn, jobs: list, workers: int, desc: str, progress: bool) -> list:
    """``[fn(job) for job in jobs]`` in job order, in ``workers`` processes when > 1, with a progress bar."""
    bar = progress_bar(len(jobs), desc, progress)
    results: list = []
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(fn, jobs, chunksize=4):
                results.append(result)
                if bar is not None:
                    bar.update(1)
    else:
        for job in jobs:
            results.append(fn(job))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return results


# ----------------------------------------------------------------------------------------------- CLI


def _positive_even(text: str) -> int:
    value = int(text)
    if value < 2 or value % 2:
        raise argparse.ArgumentTypeError(f"expected an even size >= 2, got {text!r}")
    return value


def _distractor_x(text: str) -> float | None:
    if text == "random":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction of the side or 'random', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmadapters.video.synth", description="Write a generated video world.")
    sub = parser.add_subparsers(dest="world", required=True)

    def common(p: argparse.ArgumentParser, frames: int) -> None:
        p.add_argument("--n", type=int, required=True, help="number of clips")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", type=Path, required=True, help="output folder")
        p.add_argument("--size", type=_positive_even, default=64, help="frame side in pixels (even)")
        p.add_argument("--frames", type=int, default=frames, help="frames per clip")
        p.add_argument("--codec", choices=("libx264", "mpeg4"), default="libx264")
        p.add_argument("--workers", type=int, default=1, help="processes rendering clips (output is the same for any value)")
        p.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("trafficqa", help="moving shapes with events and 4-option questions (SUTD-TrafficQA rows)")
    common(t, 24)
    t.add_argument("--objects", type=int, nargs=2, default=(3, 3), metavar=("MIN", "MAX"),
                   help="objects per clip (2 or 3; a clip with a collision always has 3)")
    t.add_argument("--test-fraction", type=float, default=0.2, help="share of clips in R2_test.jsonl")
    t.add_argument("--q-types", default="U,R,F", help="question types per clip: U (what happens to X), R (before/after), "
                   "F (what happens next)")
    t.add_argument("--frame-dirs", action="store_true", help="also write frames/<video stem>/00001.png ...")

    m = sub.add_parser("motion", help="one or two big shapes that move, grow/shrink or change colour; order-dependent "
                       "4-option questions (SUTD-TrafficQA rows) and the CLIP x-position gate in dataset.json")
    common(m, 16)
    m.add_argument("--objects", type=int, nargs=2, default=(1, 2), metavar=("MIN", "MAX"), help="shapes per clip (1 or 2)")
    m.add_argument("--test-fraction", type=float, default=0.2, help="share of clips in R2_test.jsonl")
    m.add_argument("--travel", type=float, nargs=2, default=(0.3, 0.7), metavar=("LEFT", "RIGHT"),
                   help="a move's start/end centres as fractions of the side (the captions' left/right centres)")
    m.add_argument("--distractor-x", type=_distractor_x, default=0.5, metavar="X|random",
                   help="the non-acting shape's centre as a fraction of the side (default 0.5); 'random': drawn "
                        "like the actor's, the generator-version-1 world")
    m.add_argument("--gate-model", default=None, help="CLIP whose frame features the x-position probe reads "
                   "(what load_clip accepts, e.g. local-dir:DIR; default: the shipped tiny CLIP)")
    m.add_argument("--no-gate", action="store_true", help="skip the x-position probe")

    f = sub.add_parser("faces", help="cartoon faces with 7 expression classes (DFEW layout, landmarks, masks, descriptions)")
    common(f, 16)
    f.add_argument("--max-frames", type=int, default=None, help="clip lengths drawn in [--frames, --max-frames]")
    f.add_argument("--folds", type=int, default=5)
    f.add_argument("--label-base", type=int, choices=(0, 1), default=1, help="1: DFEW labels 1..7; 0: 0..6 as DFER-CLIP's lists")
    f.add_argument("--absolute-paths", action="store_true", help="absolute frame folders in the annotation files")
    f.add_argument("--no-video", action="store_true", help="frame folders only (skip the mp4 files)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    if args.world == "trafficqa":
        from .synth_traffic import generate_trafficqa

        root = generate_trafficqa(
            args.out, n=args.n, seed=args.seed, size=args.size, num_frames=args.frames, codec=args.codec,
            objects=tuple(args.objects), test_fraction=args.test_fraction, q_types=tuple(q.strip() for q in args.q_types.split(",")),
            frame_dirs=args.frame_dirs, workers=args.workers, progress=progress,
        )
    elif args.world == "motion":
        from .synth_motion import generate_motion

        root = generate_motion(
            args.out, n=args.n, seed=args.seed, size=args.size, num_frames=args.frames, codec=args.codec,
            objects=tuple(args.objects), test_fraction=args.test_fraction, travel=tuple(args.travel),
            distractor_x=args.distractor_x, gate_model=args.gate_model,
            gate=not args.no_gate, workers=args.workers, progress=progress,
        )
    else:
        from .synth_faces import generate_faces

        root = generate_faces(
            args.out, n=args.n, seed=args.seed, size=args.size, num_frames=args.frames, max_frames=args.max_frames,
            codec=args.codec, folds=args.folds, label_base=args.label_base, absolute_paths=args.absolute_paths,
            videos=not args.no_video, workers=args.workers, progress=progress,
        )
    print(json.dumps(json.loads((root / DATASET_RECORD).read_text(encoding="utf-8"))["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
