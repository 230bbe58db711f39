"""Video clip loading: frame sampling (TSN segments, random, strided) and decoding with decord, PyAV as fallback.

    frames = load_clip("clip.mp4", num_frames=8)                      # (8, 3, H, W) uint8, TSN test-time frames
    frames = load_clip("clip.mp4", 8, training=True, seed=0, size=224)  # random frame per segment, short side 224
    frames = load_clip("faces/0001/", 16, strategy="strided", stride=2)  # a frame directory (DFEW style)

A *frame directory* holds one image file per frame; files are ordered by natural sort (``2.jpg`` before
``10.jpg``) and sampled exactly like a video's frames.

Decoding order: decord (``VideoReader`` with ``seek(0)`` before ``get_batch``, which keeps memory flat on long
videos), then PyAV when decord cannot read the file; PyAV decodes only up to the last frame it needs.

Robustness. Every failure raises :class:`VideoError` (a ``ValueError``) naming the file and what is wrong:

- missing, empty (0 bytes), non-video, truncated or corrupt files; directories without images;
- frame counts that lie: a header's count is trusted only as far as frames actually decode. When PyAV finds the
  stream ending early, a small shortfall (at most ``max(2, 5%)`` of the claimed frames, as B-frame and edit-list
  quirks produce) re-samples over the frames that exist; a larger one is a truncated file and raises;
- absurd frame sizes: a frame over :data:`MAX_FRAME_PIXELS` (4096x4096, 16.8 Mpx) or with its long side more than
  :data:`MAX_ASPECT` (20) times its short side is refused from the container's header (PyAV reads width and
  height without decoding the clip), or from each image's header in a frame directory, before any frame is
  decoded. No benchmark comes near them (DFEW/MAFW/FERV39k faces are a few hundred pixels, SUTD-TrafficQA and
  Kinetics at most 1080p, DCI 4K is 8.8 Mpx at 1.9:1), while an 8000x8000 3-frame clip (23 KB on disk) took
  6.5 GB in ``mmadapters eval videoqa`` and a 10000x10 one 5.8 GB per clip at ``size=224``. (Opening a refused
  file still costs what FFmpeg's stream probe decodes: about 200 MB for that 8000x8000 one, in the helper.)
  Below the limits, resizing (``size=``) and the CLIP preprocessing of the feature cache hold one frame at a
  time as float, never a whole clip;
- hangs: with ``timeout_s`` set (the default, :data:`DEFAULT_TIMEOUT_S`), native decoding runs in a helper
  *process* and a call that does not finish in time kills that process and raises. A process rather than a
  watchdog thread, because a decoder stuck in native code can neither be interrupted nor stopped from Python
  (a thread would spin on forever), and a decoder that crashes (a segfault in FFmpeg on a corrupt file) takes
  only the helper down, not the caller or its DataLoader worker. The cost: one helper per calling process,
  started on first use (about 0.2 s; it imports numpy, decord and PyAV but not torch) and restarted after a
  kill, plus a copy of the sampled frames through a pipe (about 1 ms per MB; 8 frames at 320x240 are 1.8 MB).
  ``timeout_s=None`` decodes in the calling thread: no copy and no helper, but no bound either.
  Helpers are per process (POSIX pipes): a forked DataLoader worker starts its own on its first clip, so the
  ``VideoReader`` is always created inside the worker's process tree, never shared across a fork.

This module imports torch only inside :func:`load_clip`, so the helper process loads it by file path without
torch or the rest of the package.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import random
import re
import select
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

STRATEGIES = ("uniform", "random", "strided")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_TIMEOUT_S = 20.0  # a 300-frame clip decodes in well under a second; this only bounds hangs
DEFAULT_STRIDE = 4
BACKENDS = ("auto", "decord", "pyav")
MAX_FRAME_PIXELS = 4096 * 4096  # per frame; see the module docstring for why these two limits
MAX_ASPECT = 20  # long side / short side of a frame


class VideoError(ValueError):
    """A clip that cannot be loaded: ``str(err)`` is ``"<path>: <what is wrong>"``.

    ``VideoError(message)`` with one argument (how pickling and torch's DataLoader re-raise it from a worker) keeps
    the message; ``path`` and ``reason`` are then None and the message."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        if reason is None:
            self.path, self.reason = None, str(path)
            super().__init__(str(path))
            return
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# ----------------------------------------------------------------------------------------------- sampling


def sample_indices(num_total: int, num_frames: int, strategy: str = "uniform", *, training: bool = False,
                   stride: int = DEFAULT_STRIDE, rng: random.Random | None = None) -> list[int]:
    """Indices (sorted, in ``[0, num_total)``, length ``num_frames``) of the frames to decode.

    - ``"uniform"`` (TSN): ``num_frames`` equal segments; the middle frame of each at test time, a random frame
      of each in training. Fewer frames than segments repeat frames.
    - ``"random"``: ``num_frames`` distinct random frames (every frame plus random repeats when the clip is short).
    - ``"strided"``: ``num_frames`` consecutive frames ``stride`` apart; the window is centred at test time and
      placed at random in training. A window longer than the clip repeats the last frame.

    ``rng`` supplies the randomness (default: the ``random`` module, which DataLoader workers seed).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: expected >= 1")
    if num_total < 1:
        raise ValueError(f"num_total={num_total}: expected >= 1 frame to sample from")
    if stride < 1:
        raise ValueError(f"stride={stride}: expected >= 1")
    rng = rng if rng is not None else random.Random(random.getrandbits(64))  # from the module's generator
    n, t = num_total, num_frames
    if strategy == "uniform":
        seg = n / t
        if not training:
            return [min(int(seg * (i + 0.5)), n - 1) for i in range(t)]
        out = []
        for i in range(t):
            lo = min(int(seg * i), n - 1)
            hi = max(lo + 1, min(int(seg * (i + 1)), n))
            out.append(rng.randrange(lo, hi))
        return out
    if strategy == "random":
        if n >= t:
            return sorted(rng.sample(range(n), t))
        return sorted(list(range(n)) + rng.choices(range(n), k=t - n))
    span = (t - 1) * stride + 1
    start = 0 if span >= n else (rng.randrange(0, n - span + 1) if training else (n - span) // 2)
    return [min(start + i * stride, n - 1) for i in range(t)]


def _needs_rng(strategy: str, training: bool) -> bool:
    return training or strategy == "random"


# ----------------------------------------------------------------------------------------------- decoding
# Everything from here to load_clip runs in the helper process too: numpy, decord, PyAV and PIL only.


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(directory: str | os.PathLike) -> list[Path]:
    """The image files of a frame directory in frame order (natural sort of the names)."""
    directory = Path(directory)
    files = [p for p in directory.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _tolerated_shortfall(claimed: int) -> int:
    return max(2, int(0.05 * claimed))


def check_frame_size(path: str | os.PathLike, width: int, height: int) -> None:
    """Raise :class:`VideoError` for frames over :data:`MAX_FRAME_PIXELS` or more elongated than :data:`MAX_ASPECT`."""
    if width < 1 or height < 1:
        raise VideoError(path, f"frame size {width}x{height} (width x height): expected at least 1x1")
    if width * height > MAX_FRAME_PIXELS:
        raise VideoError(path, f"frames are {width}x{height} (width x height: {width * height:,} pixels); expected at "
                               f"most {MAX_FRAME_PIXELS:,} pixels per frame (MAX_FRAME_PIXELS, 4096x4096); refused "
                               "before decoding (downscale the video first)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        ratio = round(max(width, height) / min(width, height), 1)
        raise VideoError(path, f"frames are {width}x{height} (width x height: {ratio:g}:1); expected a long side at most "
                               f"{MAX_ASPECT} times the short side (MAX_ASPECT); refused before decoding")


def _probe_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the container's header (no frame is decoded), or None when PyAV cannot tell."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                return None
            ctx = container.streams.video[0].codec_context
            return (int(ctx.width), int(ctx.height)) if ctx.width and ctx.height else None
    except (av.error.FFmpegError, OSError, ValueError):
        return None  # the decoders report what is wrong with the file


def _decode_frame_dir(path: str, spec: dict) -> tuple[np.ndarray, list[int], int, str]:
    from PIL import Image

    files = frame_files(path)
    if not files:
        raise VideoError(path, f"frame directory has no image files ({', '.join(IMAGE_EXTENSIONS)})")
    indices = _indices(len(files), spec)
    frames, cache = [], {}
    for i in indices:
        if i not in cache:
            try:
                with Image.open(files[i]) as img:
                    check_frame_size(files[i], *img.size)  # from the image's header, before it decodes
                    cache[i] = np.asarray(img.convert("RGB"))
            except VideoError:
                raise
            except Exception as err:  # PIL raises several types for unreadable images
                raise VideoError(files[i], f"frame {i} of frame directory {path} cannot be read "
                                           f"({type(err).__name__}: {err})") from None
        frames.append(cache[i])
    if len({f.shape for f in frames}) > 1:
        raise VideoError(path, f"frames of different sizes in a frame directory: {sorted({f.shape for f in frames})}")
    return np.stack(frames), indices, len(files), "frames"


def _indices(num_total: int, spec: dict) -> list[int]:
    rng = random.Random(spec["seed"]) if spec.get("seed") is not None else None
    return sample_indices(num_total, spec["num_frames"], spec["strategy"], training=spec["training"],
                          stride=spec["stride"], rng=rng)


def _decode_decord(path: str, spec: dict) -> tuple[np.ndarray, list[int], int, str]:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=spec.get("threads", 1))
    total = len(reader)
    if total < 1:
        raise VideoError(path, "decord reports no frames")
    indices = _indices(total, spec)
    reader.seek(0)  # decord keeps long videos' memory flat only when a batch starts from a seek
    frames = reader.get_batch(indices).asnumpy()
    if frames.ndim == 4:  # the header was checked before (_probe_size); this covers files PyAV cannot open
        check_frame_size(path, frames.shape[2], frames.shape[1])
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise VideoError(path, f"decord returned frames of shape {frames.shape}, expected ({len(indices)}, H, W, 3)")
    return frames, indices, total, "decord"


def _pyav_claimed_frames(container, stream) -> int:
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration and stream.time_base and rate:
        return max(1, int(round(float(stream.duration * stream.time_base * rate))))
    if container.duration and rate:
        return max(1, int(round(container.duration / 1_000_000 * float(rate))))
    return 0  # unknown: decode everything once to count


def _decode_pyav(path: str, spec: dict) -> tuple[np.ndarray, list[int], int, str]:
    import av

    try:
        container = av.open(path)
    except av.error.FFmpegError as err:
        raise VideoError(path, f"not a readable video ({err})") from None
    with container:
        if not container.streams.video:
            raise VideoError(path, "the file has no video stream")
        ctx = container.streams.video[0].codec_context
        if ctx.width and ctx.height:  # some streams only know their size once a frame decodes (checked then)
            check_frame_size(path, int(ctx.width), int(ctx.height))
        claimed = _pyav_claimed_frames(container, container.streams.video[0])
    if claimed == 0:  # unknown: one pass counts the frames (keeping none), the next decodes the sampled ones
        _, claimed = _pyav_read(path, set())
        if claimed == 0:
            raise VideoError(path, "no frame decodes")
    indices = _indices(claimed, spec)
    got, decoded = _pyav_read(path, set(indices))
    if decoded >= claimed or max(indices) < decoded:
        return np.stack([got[i] for i in indices]), indices, claimed, "pyav"
    # the stream ended before a frame we need: the header's count lied
    if decoded == 0:
        raise VideoError(path, f"header claims {claimed} frames but none decodes (truncated or corrupt)")
    if claimed - decoded > _tolerated_shortfall(claimed):
        raise VideoError(path, f"header claims {claimed} frames but only {decoded} decode (truncated or corrupt)")
    indices = _indices(decoded, spec)
    got, again = _pyav_read(path, set(indices))
    if again < decoded:
        raise VideoError(path, f"decodes {decoded} frames on one pass and {again} on the next (corrupt)")
    return np.stack([got[i] for i in indices]), indices, decoded, "pyav"


def _pyav_read(path: str, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode frames in order up to the last wanted one: ({index: HxWx3}, decoded); an empty ``wanted`` decodes
    every frame and keeps none (counting them)."""
    import av

    last = max(wanted) if wanted else math.inf
    got: dict[int, np.ndarray] = {}
    n = 0
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if n in wanted:
                    check_frame_size(path, frame.width, frame.height)  # a stream may change size midway
                    got[n] = frame.to_ndarray(format="rgb24")
                n += 1
                if n > last:
                    break
    except av.error.FFmpegError as err:
        if n == 0:
            raise VideoError(path, f"cannot decode ({err})") from None
        raise VideoError(path, f"decoding failed after {n} frames ({err}): truncated or corrupt") from None
    return got, n


def _decode(path: str, spec: dict) -> tuple[np.ndarray, list[int], int, str]:
    """(frames (T, H, W, 3) uint8, indices, frame count, backend) for a file or frame directory."""
    if os.path.isdir(path):
        return _decode_frame_dir(path, spec)
    backend = spec.get("backend", "auto")
    if backend == "pyav":
        return _decode_pyav(path, spec)  # checks the frame size from the header it opens
    size = _probe_size(path)
    if size is not None:
        check_frame_size(path, *size)
    try:
        return _decode_decord(path, spec)
    except Exception as err:  # decord raises RuntimeError/DECORDError/IndexError; PyAV gets the last word
        if backend == "decord":
            raise VideoError(path, f"decord cannot read it ({type(err).__name__}: {_first_line(err)})") from None
        first = f"decord: {type(err).__name__}: {_first_line(err)}"
    try:
        return _decode_pyav(path, spec)
    except VideoError as err:
        raise VideoError(path, f"{err.reason}; {first}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    # decord prefixes its messages with "[hh:mm:ss] /its/source.cc:123: "
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text[0])[:300] if text else ""


# ----------------------------------------------------------------------------------------- helper process
_HEADER = struct.Struct("<Q")


def _serve() -> None:
    """The helper's loop: a JSON request per line on stdin; an 8-byte length, a JSON header and the frames on stdout."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything native code prints goes to stderr, never into the protocol
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            frames, indices, total, backend = _decode(request["path"], request["spec"])
            frames = np.ascontiguousarray(frames, dtype=np.uint8)
            header = {"ok": True, "shape": list(frames.shape), "indices": indices, "total": total, "backend": backend}
            payload = memoryview(frames).cast("B")  # written from the array itself: no second copy of the clip
        except VideoError as err:
            header, payload = {"ok": False, "reason": err.reason, "path": err.path}, b""
        except Exception as err:  # anything else a decoder throws is still a bad file, not a helper failure
            header, payload = {"ok": False, "reason": f"{type(err).__name__}: {_first_line(err)}"}, b""
        data = json.dumps(header).encode()
        out.write(_HEADER.pack(len(data)) + data)
        out.write(payload)
        out.flush()


_BOOT = ("import importlib.util,sys;s=importlib.util.spec_from_file_location('_mmadapters_video_decoder',sys.argv[1]);"
         "m=importlib.util.module_from_spec(s);sys.modules[s.name]=m;s.loader.exec_module(m);m._serve()")


class _Decoder:
    """One helper process, owned by the process that started it."""

    def __init__(self) -> None:
        self.log = tempfile.TemporaryFile(mode="a+b")  # O_APPEND: truncating it between requests is safe
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=env, close_fds=True)
        self.pid = os.getpid()

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.proc.poll() is None

    def close(self) -> None:
        if self.pid != os.getpid():
            return  # a forked child must not touch its parent's helper
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.log):
            try:
                f.close()
            except OSError:
                pass

    def _stderr_tail(self) -> str:
        try:
            self.log.seek(0)
            lines = [ln for ln in self.log.read().decode(errors="replace").splitlines() if ln.strip()]
            return "; ".join(lines[-3:])[-500:]
        except OSError:
            return ""

    def _read_exact(self, n: int, deadline: float) -> bytearray:
        """``n`` bytes from the helper, read straight into one buffer (the clip is never held twice)."""
        fd = self.proc.stdout.fileno()
        buf = bytearray(n)
        view, done = memoryview(buf), 0
        while done < n:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
            got = os.readv(fd, [view[done:done + (1 << 22)]])
            if not got:
                raise EOFError
            done += got
        return buf

    def request(self, path: str, spec: dict, timeout_s: float) -> tuple[np.ndarray, list[int], int, str]:
        self.log.seek(0)
        self.log.truncate()
        deadline = time.monotonic() + timeout_s
        self.proc.stdin.write(json.dumps({"path": path, "spec": spec}).encode() + b"\n")
        self.proc.stdin.flush()
        (size,) = _HEADER.unpack(self._read_exact(_HEADER.size, deadline))
        header = json.loads(self._read_exact(size, deadline))
        if not header["ok"]:
            raise VideoError(header.get("path", path), header["reason"])
        shape = header["shape"]
        payload = self._read_exact(int(np.prod(shape)), deadline)
        frames = np.frombuffer(payload, dtype=np.uint8).reshape(shape)  # writable: torch takes it without a copy
        return frames, header["indices"], header["total"], header["backend"]


_decoder: _Decoder | None = None
_decoder_lock = threading.Lock()


def _close_decoder() -> None:
    global _decoder
    if _decoder is not None:
        _decoder.close()
        _decoder = None


def _forget_decoder_after_fork() -> None:
    global _decoder, _decoder_lock
    _decoder, _decoder_lock = None, threading.Lock()  # the parent's helper and lock are not ours


atexit.register(_close_decoder)
os.register_at_fork(after_in_child=_forget_decoder_after_fork)


def _decode_bounded(path: str, spec: dict, timeout_s: float) -> tuple[np.ndarray, list[int], int, str]:
    global _decoder
    with _decoder_lock:
        for attempt in (0, 1):
            if _decoder is None or not _decoder.alive():
                if _decoder is not None:
                    _decoder.close()
                _decoder = _Decoder()
            try:
                return _decoder.request(path, spec, timeout_s)
            except BrokenPipeError:  # the helper died between calls (killed, crashed): start a new one once
                _close_decoder()
                if attempt:
                    raise VideoError(path, "the decoder process could not be started") from None
            except TimeoutError:
                _close_decoder()
                raise VideoError(path, f"decoding did not finish within {timeout_s:g} s (timeout_s); the decoder "
                                       "process was killed (a stalled file system, or a file that hangs the "
                                       "decoder)") from None
            except EOFError:
                code, tail = _decoder.proc.wait(), _decoder._stderr_tail()
                _close_decoder()
                why = f"signal {-code}" if code < 0 else f"exit code {code}"
                raise VideoError(path, f"the decoder process died on this file ({why})" + (f": {tail}" if tail else "")) from None
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------- public


def load_clip(path: str | os.PathLike, num_frames: int = 8, strategy: str = "uniform", *, stride: int = DEFAULT_STRIDE,
              size: int | Sequence[int] | None = None, training: bool = False, seed: int | None = None,
              timeout_s: float | None = DEFAULT_TIMEOUT_S, backend: str = "auto", threads: int = 1,
              return_indices: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[int]]:
    """Sample ``num_frames`` frames of a video file or frame directory: uint8 ``(T, 3, H, W)``, RGB.

    ``strategy``/``training``/``stride``: see :func:`sample_indices`. ``seed`` makes random sampling repeatable
    (default: drawn from the ``random`` module, which DataLoader workers seed per worker).
    ``size``: an int resizes the short side to ``size`` keeping the aspect ratio; ``(H, W)`` resizes to exactly
    that; None keeps the decoded size. Resizing is bilinear with antialiasing, in torch after decoding.
    ``timeout_s``: bound on decoding (in a helper process; see the module docstring); None decodes in-process.
    ``backend``: ``"auto"`` (decord, then PyAV), ``"decord"`` or ``"pyav"``. ``threads``: decord's decoder threads.
    ``return_indices``: also return the frame indices that were decoded.
    Raises :class:`VideoError` (naming the file) for anything unreadable, and ``ValueError`` for bad arguments.
    """
    import torch
    import torch.nn.functional as F

    path = os.fspath(path)
    sample_indices(1, num_frames, strategy, stride=stride)  # argument errors before any decoding
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s}: expected a positive number of seconds or None")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoError(path, "no such file or directory") from None
    except OSError as err:
        raise VideoError(path, f"cannot stat it ({err.strerror})") from None
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")
    if seed is None and _needs_rng(strategy, training):
        seed = random.getrandbits(62)
    spec = {"num_frames": num_frames, "strategy": strategy, "stride": stride, "training": training,
            "seed": seed, "backend": backend, "threads": threads}
    if timeout_s is None:
        frames, indices, _, _ = _decode(path, spec)
    else:
        frames, indices, _, _ = _decode_bounded(path, spec, timeout_s)
    hwc = torch.from_numpy(np.array(frames, copy=not frames.flags.writeable))  # (T, H, W, 3), the decoded buffer
    clip = hwc.permute(0, 3, 1, 2).contiguous() if size is None else _resize(hwc, size, F)
    return (clip, list(indices)) if return_indices else clip


def _resize(hwc: torch.Tensor, size: int | Sequence[int], F: Any) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> uint8 (T, 3, H', W'), one frame at a time: only one frame is ever held as float
    (a whole full-size clip as float is 4x its decoded size: 1.6 GB for 8 frames of 4096x4096)."""
    import torch

    h, w = hwc.shape[1:3]
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"size={size}: expected a positive short-side length or (H, W)")
        scale = size / min(h, w)
        target = (size, max(1, round(w * scale))) if h <= w else (max(1, round(h * scale)), size)
    else:
        target = tuple(int(s) for s in size)
        if len(target) != 2 or min(target) < 1:
            raise ValueError(f"size={size!r}: expected a positive int (short side) or (H, W)")
    if target == (h, w):
        return hwc.permute(0, 3, 1, 2).contiguous()
    out = torch.empty((hwc.shape[0], hwc.shape[3], *target), dtype=hwc.dtype)
    for t in range(hwc.shape[0]):
        frame = hwc[t].permute(2, 0, 1).contiguous().unsqueeze(0).float()  # contiguous while still uint8
        resized = F.interpolate(frame, size=target, mode="bilinear", antialias=True, align_corners=False)
        out[t] = resized[0].round_().clamp_(0, 255)
    return out
