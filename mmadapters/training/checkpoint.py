"""``train_state.pt``: everything a run needs to continue bit-identically after a crash.

A plain dict of tensors and Python scalars/lists/dicts, so it loads with ``torch.load(weights_only=True)``
(nothing is unpickled): trainable parameters by name, optimizer and scheduler state, every rank's RNG
states (python ``random``, numpy as lists of ints, torch CPU, CUDA), the step (which is also the data
position), the best score so far, the history, and fingerprints of the trainer config and of the
trainable parameters (names, shapes, dtypes) so that ``--resume`` refuses a state from another run.
Written to a temporary file, fsynced and renamed: a kill -9 leaves the previous state or the new one.

A run holds its output folder's lock (:func:`run_lock`, ``flock`` on ``.train.lock``) from before the first file
is written until it ends; the kernel releases it when the process dies, even by kill -9. A second run (or a
``--resume``) of a folder whose run is alive is refused with the holder's pid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .trainer_config import RESUMABLE_CHANGES, TrainerConfig

# TrainerConfig fields added after states were first written: a state without one was written with its default.
ADDED_FIELDS = ("precision", "grad_accum_steps", "step_every", "step_gamma")

STATE_NAME = "train_state.pt"
LOCK_NAME = ".train.lock"
FORMAT = "mmadapters.train_state/1"

__all__ = ["FORMAT", "LOCK_NAME", "STATE_NAME", "RunFolderBusy", "capture_rng", "check_resumable", "config_fingerprint",
           "load_train_state", "parameter_fingerprint", "prepare_output", "restore_rng", "run_lock", "save_train_state"]


# -- the run folder's lock ----------------------------------------------------------------------------------

class RunFolderBusy(RuntimeError):
    """Another live process trains into this output folder."""


_held: dict[str, list] = {}  # real path of a locked folder -> [fd, depth]: this process's locks (re-entrant)


@contextlib.contextmanager
def run_lock(output: str | os.PathLike) -> Iterator[Path]:
    """Hold ``output``'s lock (creating the folder) for the ``with`` block; re-entrant in one process.

    The lock is ``flock`` on ``output/.train.lock``, whose text is the holder's pid; it is removed on release
    (while still held, and a lock taken on a file that was meanwhile removed is taken again, so two processes
    never both believe they hold it). Raises :class:`RunFolderBusy` naming the folder and the holder's pid."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"{output}: the output must be a directory, and this is a file")
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(output)
    if key in _held:
        _held[key][1] += 1
        try:
            yield output
        finally:
            _held[key][1] -= 1
        return
    path = output / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            try:
                pid = path.read_text().strip() or "unknown"
            except OSError:
                pid = "unknown"
            raise RunFolderBusy(f"{output}: another training run (pid {pid}) is writing into this folder; wait for it "
                                "to end (or stop it) before training or resuming here, or choose another --output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino  # not a file its last holder removed meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _held[key] = [fd, 1]
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield output
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)  # releases the flock
        if created:
            with contextlib.suppress(OSError):
                output.rmdir()  # a run refused before writing anything leaves no empty folder behind


# -- RNG states ---------------------------------------------------------------------------------------------

def capture_rng(cuda: bool) -> dict[str, Any]:
    """This process's RNG states in weights_only-loadable form."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if cuda and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- fingerprints -------------------------------------------------------------------------------------------

def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def comparable_config(trainer: dict[str, Any], run: dict[str, Any] | None) -> dict[str, Any]:
    """What must stay the same across --resume: the trainer config less :data:`RESUMABLE_CHANGES`, and the
    rest of the run's config (the recipe section) when given."""
    # group_batches is checked through what it decides, the state's data order (a task without groups ignores it)
    out = {f"trainer.{k}": v for k, v in trainer.items() if k not in RESUMABLE_CHANGES and k != "group_batches"}
    for section, value in (run or {}).items():
        if section in ("trainer", "output", "recipe_name"):  # the recipe section itself is compared
            continue
        if isinstance(value, dict):
            out.update({f"{section}.{k}": v for k, v in _flatten(value).items()})
        else:
            out[section] = value
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_fingerprint(comparable: dict[str, Any]) -> str:
    return _digest(comparable)


def parameter_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list]:
    """name -> [shape..., dtype] of the trainable parameters."""
    return {n: [*map(int, p.shape), str(p.dtype).replace("torch.", "")] for n, p in named}


# -- the file -----------------------------------------------------------------------------------------------

def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_train_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes 0600; give the file the mode a plain open() would
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def load_train_state(path: Path) -> dict[str, Any]:
    """Read a state written by :func:`save_train_state` (weights_only: nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training state to resume from (train without --resume to start a new run)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise ValueError(f"{path}: not a readable training state ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: field 'format' is {found!r}, expected {FORMAT!r}")
    for key in ("step", "params", "optimizer", "scheduler", "rng", "best", "history", "config", "config_fingerprint",
                "param_shapes"):
        if key not in state:
            raise ValueError(f"{path}: field {key!r} is missing")
    return state


def check_resumable(state: dict[str, Any], path: Path, *, comparable: dict[str, Any], params: dict[str, list] | None) -> None:
    """Raise ValueError naming what differs between the stored run and this one (``params`` None: the config only)."""
    stored = state["config"]
    if state["config_fingerprint"] != config_fingerprint(comparable) and "trainer.precision" not in stored:
        defaults = {f"trainer.{f.name}": f.default for f in dataclasses.fields(TrainerConfig) if f.name in ADDED_FIELDS}
        stored = {**{k: v for k, v in defaults.items() if k in comparable}, **stored}  # a state from before they existed
    if config_fingerprint(stored) != config_fingerprint(comparable):
        diffs = [f"{k}: {stored.get(k, '(absent)')!r} there, {comparable.get(k, '(absent)')!r} here"
                 for k in sorted(set(stored) | set(comparable)) if stored.get(k, object()) != comparable.get(k, object())]
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise ValueError(f"{path}: was written by a run with another config ({shown or 'fingerprint differs'}); "
                         f"only {', '.join('trainer.' + k for k in RESUMABLE_CHANGES)} may change on --resume "
                         "(or choose another --output)")
    stored = state["param_shapes"]
    if params is not None and stored != params:
        missing = sorted(set(stored) - set(params))
        extra = sorted(set(params) - set(stored))
        shape = sorted(n for n in set(stored) & set(params) if stored[n] != params[n])
        parts = ([f"{len(missing)} stored parameter(s) not trainable here (first {missing[0]!r})"] if missing else []) + \
                ([f"{len(extra)} trainable parameter(s) not in the state (first {extra[0]!r})"] if extra else []) + \
                ([f"{shape[0]!r} is {stored[shape[0]]} there, {params[shape[0]]} here"] if shape else [])
        raise ValueError(f"{path}: the trainable parameters differ from this model's: {'; '.join(parts)}")


def _clean_after_crash(output: Path) -> None:
    """Put back what a kill -9 interrupted: a directory swap caught between its two renames leaves
    ``.<name>.old-*/<name>`` (moved back); unfinished temporary files and folders are removed."""
    for name in ("best", "last"):
        if (output / name).exists():
            continue
        for old in sorted(output.glob(f".{name}.old-*")):
            if (old / name).is_dir():
                os.replace(old / name, output / name)
                shutil.rmtree(old, ignore_errors=True)
                break
    for name in ("best", "last", STATE_NAME, "history.jsonl", "train_summary.json", "config.yaml"):
        for tmp in output.glob(f".{name}.*"):
            if tmp.name.endswith(".tmp") or ".old-" in tmp.name:
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def prepare_output(output: Path, resume: bool) -> Path:
    """Check ``output`` against ``resume`` (before anything is written there) and create it.

    Without --resume a folder that already holds a training state is refused; with --resume one must exist.
    Returns the state file's path."""
    output = Path(output)
    state = output / STATE_NAME
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"{output}: the output must be a directory, and this is a file")
    if resume and not state.is_file():
        raise FileNotFoundError(f"{state}: --resume needs the training state of an earlier run in this output folder, "
                                "and there is none (drop --resume to start a new run)")
    if not resume and state.exists():
        raise FileExistsError(f"{output}: holds the training state of an earlier run ({STATE_NAME}); pass --resume to "
                              "continue it, or choose another --output")
    output.mkdir(parents=True, exist_ok=True)
    if resume:
        _clean_after_crash(output)
    return state
