"""The training engine: adapters of any backbone, one loop, single process or torchrun.

A recipe hands :func:`train` a :class:`TrainTask` (a model whose base is frozen and whose adapters have
``requires_grad``, plus the data and the validation metric) and a :class:`TrainerConfig`.

**Data stream.** Step ``s`` trains on the GLOBAL batch of stream positions ``[s*B, (s+1)*B)``, where the
stream is one permutation of ``range(train_size)`` per epoch, each drawn from ``(seed, epoch)`` only
(:mod:`mmadapters.training.sampler`). Under torchrun with ``W`` ranks, rank ``r`` takes the contiguous
slice ``[r*B/W, (r+1)*B/W)`` of it (``B`` must divide by ``W``). The items of a step therefore depend on
the seed and the step alone: 1 rank or 4, fresh or resumed, step ``s`` sees the same items.

**Batch groups.** A task may define ``batch_groups()``: a group id per training item (VL-Adapter: the task of
each sample). With ``group_batches`` (the default), every global batch then comes from one group; groups take
turns in shuffled rounds that pass over each group about once, still a function of the seed and the step alone
(:mod:`mmadapters.training.sampler`).

**Accumulation.** With ``grad_accum_steps = N``, the step's global batch is cut into N micro-batches (micro-batch
``m``: the slice ``[m*B/N, (m+1)*B/N)``, each rank its contiguous share of each); each micro-batch's loss, divided
by N, is back-propagated and the gradients add up, so the step applies the gradient of the same global batch's
mean (up to float summation order) with a 1/N of the activations in memory. Under DDP all but the last
micro-batch run under ``no_sync`` (one gradient all-reduce per step).

**Precision.** ``precision: bf16|fp16`` runs each training forward under ``torch.autocast`` on the trainer's
device (backward outside it, as torch recommends); the parameters, the optimizer and ``validate`` stay fp32.
fp16 adds a ``torch.amp.GradScaler`` (CPU and CUDA): gradients are unscaled before clipping, a step whose
gradients overflow is skipped by the scaler (the learning-rate schedule still advances; ``skipped`` and
``loss_scale`` in the history), 50 overflowing steps in a row stop the run, and the scaler's state is in
``train_state.pt`` so ``--resume`` continues with the same scale. ``fp32`` runs no autocast at all.

**DDP.** The engine wraps ``task.model`` in a small module whose ``forward(batch)`` returns
``task.loss(task.model, batch)`` (a scalar mean over the rank's items) and puts that module under
``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA with ``device_ids=[local_rank]``,
``broadcast_buffers=False``). DDP reduces only parameters with ``requires_grad``, i.e. the adapters; the
frozen base is neither broadcast nor reduced (it is checked once to be identical on every rank). Averaging
the ranks' gradients of their local means gives the gradient of the global batch's mean, so W ranks follow
the single-process run of the same global batch (up to float summation order). AdamW sees the trainable
parameters only; the learning rate follows a linear warmup over ``warmup_ratio * steps`` steps then a
constant, linear, cosine or step decay (``step``: times ``step_gamma`` every ``step_every`` steps counted from the
end of the warmup, torch's StepLR; ``LambdaLR``); gradients are clipped to ``grad_clip``. A non-finite loss
or gradient norm stops the run with an error (the step is not applied, best/ stays as it was).

**Validation and outputs.** Every ``eval_every`` steps and at the end, rank 0 runs ``task.validate()``
(the other ranks wait) and, when ``select_metric`` improves, saves the adapters with ``task.save`` into a
temporary folder that then replaces ``best/``. The output folder holds::

    config.yaml          the resolved run config (written by ``mmadapters train``)
    history.jsonl        one line per event: {"kind": "train", "step", "loss", "lr", "grad_norm"} every
                         log_every steps (appended 10 at a time, and at each validation and checkpoint),
                         {"kind": "eval", "step", "metrics", "best"} per validation
    best/                the adapters of the best validation score (task.save) + train_best.json
    last/                the adapters after the last step
    train_state.pt       the resumable state (see below)
    train_summary.json   best step and metrics, validation history, parameter counts, timings, library
                         version, git commit, the resolved config

Every file and folder gets the mode a plain ``open()``/``mkdir`` gives under the process's umask (``best/`` and
``last/`` are built in temporary folders, whose 0700/0600 modes are replaced before they are swapped in).
While :func:`train` runs, it holds the folder's lock (:func:`~mmadapters.training.checkpoint.run_lock`): a second
run into the same folder, or a ``--resume`` of it, is refused with the holder's pid.

**Checkpoints.** Every ``checkpoint_every`` steps and at the end, rank 0 writes ``train_state.pt``
atomically (:mod:`mmadapters.training.checkpoint`): trainable parameters by name, optimizer and scheduler
state, every rank's RNG states (python, numpy, torch CPU, CUDA), the step (= the data position), the best
score, the history, fp16's gradient-scaler state, the data order (mixed or grouped) and fingerprints of the
config and of the trainable parameters. ``resume=True``
continues from it and reaches the same weights, bit for bit on CPU, as a run that was never interrupted.
Only rank 0 writes files.

**Time budget.** With ``max_minutes``, training stops after the step at which the wall time spent training,
validating and checkpointing (earlier sessions of a resumed run included) reaches the budget; that step
then counts as the last one (validated, checkpointed, saved; ``stopped_by: "time"`` in the summary), and
the learning-rate decay follows whichever is further along, the steps or the budget. Where a run stops
then depends on the machine's speed, so only the steps it did repeat bit for bit.

**Hooks.** A task may define ``on_validated(step, metrics, output_dir)``: rank 0 calls it after every
validation, once the entry is in ``history.jsonl`` (a recipe keeps its own per-validation outputs with it,
e.g. per-group best checkpoints). Buffers of modules that train (batch-norm statistics of a fully trained
model) are checkpointed with the trainable parameters.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from .. import distributed as dist_utils
from ..atomic import umask
from .checkpoint import (
    _digest,
    capture_rng,
    check_resumable,
    comparable_config,
    config_fingerprint,
    load_train_state,
    parameter_fingerprint,
    prepare_output,
    restore_rng,
    run_lock,
    save_train_state,
)
from .config_io import to_mapping
from .sampler import StepSampler, check_batch_split
from .trainer_config import TrainerConfig

__all__ = ["LossModule", "TrainSummary", "TrainTask", "TrainerConfig", "check_device", "lr_lambda", "run_on_main",
           "seed_everything", "train", "wrap_for_training"]

HISTORY_NAME = "history.jsonl"
HISTORY_FLUSH_ENTRIES = 10  # training-loss entries buffered before they are appended (so a quiet run can be watched)
SUMMARY_NAME = "train_summary.json"
BEST_INFO_NAME = "train_best.json"


@runtime_checkable
class TrainTask(Protocol):
    """What a recipe gives the engine. ``model`` carries the adapters; exactly its trainable parameters have
    ``requires_grad``. The engine calls ``model.train()`` before training steps and ``model.eval()`` (under
    ``torch.no_grad``) around ``validate``; a task that wants parts of the model in eval mode while training
    (e.g. a frozen backbone's dropout) sets that in ``loss``."""

    model: nn.Module
    select_metric: str  # default validation metric for best-checkpoint selection
    select_mode: str  # "max" | "min"

    def train_size(self) -> int:
        """Number of training items."""

    def get_batch(self, indices: list[int]) -> Any:
        """Load and collate those training items, on the task's device."""

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Scalar mean loss over the batch's items; ``model`` is the module to call (task.model)."""

    def validate(self) -> dict[str, float]:
        """Metrics of task.model on the validation split."""

    def save(self, directory: Path) -> None:
        """Write the trained adapters (core format) into ``directory``."""

    def parameter_counts(self) -> dict[str, int]:
        """{"trainable": int, "total": int}."""

    # optional: on_validated(step: int, metrics: dict[str, float], output_dir: Path) -> None (see the module docstring)
    # optional: batch_groups() -> Sequence[Hashable], one group id per training item (see the module docstring)


@dataclass
class TrainSummary:
    """What :func:`train` returns (and writes as ``train_summary.json``)."""

    output: str
    steps: int
    select_metric: str
    select_mode: str
    best_step: int | None
    best_score: float | None
    best_metrics: dict[str, float] | None
    best_dir: str | None
    last_dir: str
    final_metrics: dict[str, float]
    resumed_from: int | None
    world_size: int
    parameters: dict[str, int]
    timings: dict[str, float]
    history: list[dict] = field(default_factory=list)  # the validation entries
    stopped_by: str = "steps"  # "steps", or "time" when trainer.max_minutes ended the run at step `steps`
    library: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    created: str = ""  # UTC ISO time the summary was written

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "mmadapters.train_summary/1", **asdict(self)}


class LossModule(nn.Module):
    """``forward(batch) -> task.loss(task.model, batch)``: the module DDP wraps, so that DDP's hooks see the
    whole step (and reduce exactly the parameters with ``requires_grad``)."""

    def __init__(self, task: TrainTask):
        super().__init__()
        self.model = task.model
        self.__dict__["_task"] = task  # not a submodule

    def forward(self, batch: Any) -> Tensor:
        return self._task.loss(self.model, batch)


def _adamw(trainable: list[tuple[str, torch.nn.Parameter]], config: TrainerConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; names matching ``config.no_decay`` form a group without weight decay."""
    import fnmatch

    plain = [p for n, p in trainable if not any(fnmatch.fnmatchcase(n, pat) for pat in config.no_decay)]
    exempt = [p for n, p in trainable if any(fnmatch.fnmatchcase(n, pat) for pat in config.no_decay)]
    groups = [{"params": plain}] + ([{"params": exempt, "weight_decay": 0.0}] if exempt else [])
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, weight_decay=config.weight_decay,
                             betas=tuple(config.adam_betas), eps=config.adam_eps)


def lr_lambda(config: TrainerConfig, spent: Callable[[], float] | None = None) -> Callable[[int], float]:
    """Multiplier of ``lr`` for step ``s`` (0-based): linear warmup to 1 over ``round(warmup_ratio * steps)``
    steps, then constant, linear to 0 or cosine to 0 at ``steps``, or ``step_gamma ** ((s - warmup) // step_every)``.
    With ``config.max_minutes``, ``spent()`` (seconds of the budget used) moves a linear or cosine decay on when
    time runs out faster than the steps (constant and step schedules do not depend on the steps' count)."""
    steps = config.steps
    warmup = round(config.warmup_ratio * steps)
    schedule = config.schedule
    budget = None if config.max_minutes is None or spent is None else 60.0 * config.max_minutes

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "step":
            return config.step_gamma ** ((s - warmup) // config.step_every)
        progress = min(1.0, (s - warmup) / max(1, steps - warmup))
        if budget is not None:
            progress = min(1.0, max(progress, spent() / budget))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def seed_everything(seed: int, rank: int) -> None:
    """Seed python, numpy and torch; ranks other than 0 get their own stream (their dropout masks differ)."""
    if rank:
        seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_device(name: str, what: str | None = None) -> torch.device:
    """``torch.device(name)``, refused at once with a ``ValueError`` when it is no device name or names a CUDA device
    this machine does not have. ``what`` starts the message: where the name came from, with it (default
    ``"trainer.device NAME"``; the command line passes ``"--device cuda"``, ``"run.yaml: trainer.device cuda"``)."""
    what = what or f"trainer.device {name}"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{what}: not a device name (expected cpu, cuda, cuda:1, ...): {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: CUDA is not available on this machine (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{what}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def _amp(config: TrainerConfig, device: torch.device) -> tuple[Callable[[], Any], Any]:
    """(a context factory for the training forward, the fp16 gradient scaler or None) for ``config.precision``."""
    if config.precision == "fp32":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float16
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"trainer.precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16 "
                         "(use fp16 or fp32)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"trainer.precision {config.precision}: autocast runs on cpu and cuda only, not {device.type} "
                         "(use fp32)")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), scaler


def _data_order(groups: list | None) -> dict[str, Any]:
    """What ``train_state.pt`` records of the data order: mixed batches, or grouped ones (a digest of the groups)."""
    if groups is None:
        return {"kind": "mixed"}
    return {"kind": "grouped", "groups": _digest([str(g) for g in groups])}


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _training_buffers(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Buffers of modules with trainable parameters of their own (e.g. batch-norm statistics of a fully trained
    model): they change with training, so checkpoints carry them. A frozen base's buffers do not change."""
    out = []
    for prefix, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            out += [(f"{prefix}.{n}" if prefix else n, b) for n, b in module.named_buffers(recurse=False) if b is not None]
    return out


def _check_same_base(model: nn.Module) -> None:
    """Under torchrun: every rank must hold the same frozen base (it is not broadcast; checksums compared)."""
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for t in [p for p in model.parameters() if not p.requires_grad] + list(model.buffers()):
            t = (t.detach().abs() if t.is_complex() else t.detach()).double()
            sums += torch.stack([t.sum(), t.square().sum(), torch.tensor(float(t.numel()), dtype=torch.float64,
                                                                          device=t.device)]).cpu()
    checks = dist_utils.gather_objects(sums.tolist())
    for r, other in enumerate(checks):
        if other != checks[0]:
            raise RuntimeError(f"rank {r}'s frozen base differs from rank 0's (checksums {other} vs {checks[0]}): build_task "
                               "must give every rank the same base weights (seed before building, load the same files)")


def wrap_for_training(task: TrainTask, config: TrainerConfig) -> nn.Module:
    """The module whose ``forward(batch)`` gives the step's loss: :class:`LossModule`, under DDP when running
    distributed (only the trainable parameters registered with DDP's reducer)."""
    module = LossModule(task)
    if not dist_utils.is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
    device = dist_utils.device_for_rank(config.device)
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
               find_unused_parameters=config.find_unused_parameters)


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when rank 0 failed in a step only it runs (validation, saving)."""


def run_on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and hand its result (or its failure) to every rank; the others wait."""
    if not dist_utils.is_distributed():
        return fn()
    if dist_utils.is_main():
        try:
            result = fn()
        except BaseException as err:
            dist_utils.broadcast_object(("error", f"{type(err).__name__}: {err}"))
            raise
        return dist_utils.broadcast_object(("ok", result))[1]
    kind, value = dist_utils.broadcast_object(None)
    if kind == "error":
        raise RankZeroFailed(f"rank 0 failed: {value}")
    return value


def _append_jsonl(path: Path, entries: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _rewrite_history(path: Path, history: list[dict]) -> None:
    from ..io import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in history).encode())


def _save_dir(task: TrainTask, output: Path, name: str, extra: dict | None = None) -> Path:
    """``task.save`` into a temporary folder next to ``output/name``, then swap it in."""
    from ..io import atomic_write_bytes, replace_directory

    built = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=output))
    try:
        task.save(built)
        if extra is not None:
            atomic_write_bytes(built / BEST_INFO_NAME, (json.dumps(extra, indent=2, sort_keys=True) + "\n").encode())
        _honour_umask(built)
        replace_directory(built, output / name)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return output / name


def _honour_umask(root: Path) -> None:
    """Give ``root`` and everything in it the mode a plain ``mkdir``/``open()`` would: temporary folders and files
    (the engine's own, and those a recipe's ``save`` builds with mkdtemp/mkstemp) are 0700/0600."""
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            if not os.path.islink(os.path.join(folder, d)):
                os.chmod(os.path.join(folder, d), 0o777 & ~mask)
        for f in files:
            if not os.path.islink(os.path.join(folder, f)):
                os.chmod(os.path.join(folder, f), 0o666 & ~mask)


def _metrics(raw: Any, select: str) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise TypeError(f"task.validate() must return a dict of metric name -> number, got {type(raw).__name__}")
    out: dict[str, float] = {}
    for k, v in raw.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"task.validate(): metric {k!r} is {v!r}, not a number") from None
    if select not in out:
        raise ValueError(f"task.validate() returned no {select!r} (the select_metric); it returned {sorted(out)} "
                       "(set trainer.select_metric to one of them)")
    return out


def _improves(score: float, best: float | None, mode: str) -> bool:
    if math.isnan(score):
        return False
    if best is None:
        return True
    return score > best if mode == "max" else score < best


def _library() -> dict[str, str]:
    from .. import __version__

    return {"name": "mmadapters", "version": __version__}


def _git_commit() -> str | None:
    try:
        from mmadapters.eval.results_schema import git_state
    except ImportError:
        return None
    return git_state()[0]


def train(task: TrainTask, config: TrainerConfig, output: str | os.PathLike, *, resume: bool = False,
          run_config: dict[str, Any] | None = None) -> TrainSummary:
    """Train ``task``'s adapters as ``config`` says, writing into ``output`` (see the module docstring).

    ``resume``: continue from ``output/train_state.pt`` (required to exist). ``run_config``: the whole
    resolved run config (``{"output", "trainer", "recipe"}``), recorded in the summary; its sections other
    than ``trainer``/``output`` must match the state's on ``resume``. Rank 0 holds ``output``'s lock throughout
    (:class:`~mmadapters.training.checkpoint.RunFolderBusy` when another live run holds it). Returns the
    :class:`TrainSummary`."""
    started = time.perf_counter()
    config.check()
    check_device(config.device)  # before the folder is created
    output = Path(output)
    with contextlib.ExitStack() as stack:
        run_on_main(lambda: stack.enter_context(run_lock(output)) and None)
        return _train_locked(task, config, output, resume=resume, run_config=run_config, started=started)


def _train_locked(task: TrainTask, config: TrainerConfig, output: Path, *, resume: bool, run_config: dict[str, Any] | None,
                  started: float) -> TrainSummary:
    world, rank = dist_utils.world_size(), dist_utils.rank()
    main = rank == 0
    select = config.select_metric or getattr(task, "select_metric", None)
    mode = config.select_mode or getattr(task, "select_mode", None)
    if not select:
        raise ValueError("no validation metric to select best/ by: set trainer.select_metric (the task declares none)")
    if mode not in ("max", "min"):
        raise ValueError(f"select_mode: expected 'max' or 'min', got {mode!r} (set trainer.select_mode)")

    state_path = run_on_main(lambda: prepare_output(output, resume))
    train_size = task.train_size()
    if not isinstance(train_size, int) or train_size <= 0:
        raise ValueError(f"the training set is empty: task.train_size() is {train_size!r} (check the recipe's training data)")
    accum = config.grad_accum_steps
    check_batch_split(config.batch_size, world, accum)
    groups = None
    if config.group_batches and callable(getattr(task, "batch_groups", None)):
        groups = list(task.batch_groups())
    sampler = StepSampler(train_size, config.batch_size, config.seed, groups=groups)
    data_order = _data_order(groups)
    trainable = _trainable(task.model)
    if not trainable and config.steps > 0:
        raise ValueError("task.model has no trainable parameters (none has requires_grad): add adapters and "
                         "freeze the base with mmadapters.freeze_base before training (or set trainer.steps: 0 for "
                         "a training-free recipe: validate and save only)")
    params = [p for _, p in trainable]
    shapes = parameter_fingerprint(trainable)
    trainer_dict = to_mapping(config)
    comparable = comparable_config(trainer_dict, run_config)
    device = check_device(config.device)
    cuda = device.type == "cuda"
    autocast, scaler = _amp(config, device)

    if dist_utils.is_distributed():
        _check_same_base(task.model)
    seed_everything(config.seed, rank)
    # A training-free recipe (trainer.steps 0, e.g. Tip-Adapter's cache) may have nothing to optimize: AdamW and
    # DDP both refuse an empty parameter list, and the loop below never runs.
    module = wrap_for_training(task, config) if params else None
    optimizer = _adamw(trainable, config) if params else None
    timings = {"train_s": 0.0, "validate_s": 0.0, "checkpoint_s": 0.0}  # cumulative over resumed sessions
    factor = lr_lambda(config, spent=lambda: sum(timings.values()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor) if optimizer is not None else None
    buffers = _training_buffers(task.model)

    start, history = 0, []
    loss_sum, loss_count = 0.0, 0  # the training loss since the last history entry
    skipped, overflow_streak = 0, 0  # fp16: steps the scaler skipped since the last entry; in a row
    best: dict[str, Any] = {"score": None, "step": None, "metrics": None}
    if resume:
        def read() -> dict:
            state = load_train_state(state_path)
            check_resumable(state, state_path, comparable=comparable, params=shapes)
            return state

        state = run_on_main(read)
        stored_order = state.get("data_order", {"kind": "mixed"})  # states from before grouping drew mixed batches
        if stored_order != data_order:
            show = {"mixed": "mixed batches", "grouped": "one batch_groups() group per batch"}
            what = (f"was trained on {show[stored_order['kind']]}, and this run would draw {show[data_order['kind']]}"
                    if stored_order["kind"] != data_order["kind"] else "was trained on other batch_groups() than this task's")
            raise ValueError(f"{state_path}: {what}: the data order must stay the same on --resume (trainer.group_batches, "
                             "the recipe's data)")
        if state["step"] > config.steps:
            raise ValueError(f"{state_path}: the state is at step {state['step']}, beyond trainer.steps={config.steps} "
                             "(raise trainer.steps to continue training)")
        timings.update({k: float(v) for k, v in state.get("timings", {}).items() if k in timings})
        with torch.no_grad():
            for n, p in trainable:
                p.copy_(state["params"][n].to(p.device))
            for n, b in buffers:
                if n in state.get("buffers", {}):
                    b.copy_(state["buffers"][n].to(b.device))
        if optimizer is not None and scheduler is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base_lr * factor(scheduler.last_epoch)  # trainer.steps may have changed
        if scaler is not None and state.get("amp", {}).get("scaler"):
            scaler.load_state_dict(state["amp"]["scaler"])
        overflow_streak = int(state.get("amp", {}).get("overflow_streak", 0))
        rng = state["rng"]
        if len(rng) != world:
            warnings.warn(f"{state_path}: written by {len(rng)} rank(s), resumed with {world}: the data order is the same "
                          "but dropout and other random draws will not repeat those of an uninterrupted run", stacklevel=2)
        restore_rng(rng[rank % len(rng)])
        start, history, best = int(state["step"]), list(state["history"]), dict(state["best"])
        loss_sum, loss_count, *rest = (float(v) for v in state.get("log_accumulator", (0.0, 0)))
        loss_count, skipped = int(loss_count), int(rest[0]) if rest else 0
        if main:
            _rewrite_history(output / HISTORY_NAME, history)  # drop what was logged after the checkpoint
    elif main:
        _rewrite_history(output / HISTORY_NAME, [])

    last_eval = max((e["step"] for e in history if e.get("kind") == "eval"), default=None)
    last_ckpt = start if resume else None
    final_metrics: dict[str, float] = next((e["metrics"] for e in reversed(history) if e.get("kind") == "eval"), {})

    def evaluate(step: int) -> None:
        nonlocal last_eval, final_metrics
        t0 = time.perf_counter()
        task.model.eval()

        def run() -> tuple[dict, dict]:
            with torch.no_grad():
                metrics = _metrics(task.validate(), select)
            improved = _improves(metrics[select], best["score"], mode)
            if math.isnan(metrics[select]):
                warnings.warn(f"step {step}: validation {select} is NaN; best/ is left as it was", stacklevel=2)
            new_best = dict(best)
            if improved:
                new_best = {"score": metrics[select], "step": step, "metrics": metrics}
                _save_dir(task, output, "best", {"step": step, "select_metric": select, "select_mode": mode,
                                                 "metrics": metrics})
            entry = {"kind": "eval", "step": step, "metrics": metrics, "best": improved}
            _append_jsonl(output / HISTORY_NAME, [entry])
            hook = getattr(task, "on_validated", None)
            if hook is not None:
                hook(step, metrics, output)
            return entry, new_best

        entry, new_best = run_on_main(run)
        best.update(new_best)
        history.append(entry)
        last_eval, final_metrics = step, entry["metrics"]
        task.model.train()
        if main:
            flag = " (best)" if entry["best"] else ""
            shown = ", ".join(f"{k} {v:.4g}" for k, v in entry["metrics"].items())
            (bar.write if bar is not None else print)(f"step {step}: validation {shown}{flag}")
        timings["validate_s"] += time.perf_counter() - t0

    def checkpoint(step: int) -> None:
        nonlocal last_ckpt
        t0 = time.perf_counter()
        rngs = dist_utils.gather_objects(capture_rng(cuda))

        def write() -> None:
            save_train_state(state_path, {
                "step": step,
                "params": {n: p.detach().to("cpu", copy=True) for n, p in trainable},
                "buffers": {n: b.detach().to("cpu", copy=True) for n, b in buffers},
                "optimizer": optimizer.state_dict() if optimizer is not None else {},
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "rng": rngs,
                "best": best,
                "history": history,
                "config": comparable,
                "config_fingerprint": config_fingerprint(comparable),
                "param_shapes": shapes,
                "world_size": world,
                "log_accumulator": [loss_sum, loss_count, skipped],
                "data_order": data_order,
                "amp": {"scaler": scaler.state_dict(), "overflow_streak": overflow_streak} if scaler is not None else {},
                "timings": {**timings, "checkpoint_s": timings["checkpoint_s"] + time.perf_counter() - t0},
            })

        run_on_main(write)
        last_ckpt = step
        timings["checkpoint_s"] += time.perf_counter() - t0

    bar = None
    if main and config.progress and config.steps > start:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="training", dynamic_ncols=True, file=sys.stderr)
    task.model.train()
    pending: list[dict] = []
    end, stopped_by = config.steps, "steps"
    budget = None if config.max_minutes is None else 60.0 * config.max_minutes
    try:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            value = None
            for m, indices in enumerate(sampler.micro_batches(step, rank, world, accum)):
                batch = task.get_batch(indices)
                # DDP all-reduces the gradients once per step: in the backward of the last micro-batch
                sync = m == accum - 1 or not hasattr(module, "no_sync")
                with contextlib.nullcontext() if sync else module.no_sync():
                    with autocast():
                        loss = module(batch)
                    if not isinstance(loss, Tensor) or loss.numel() != 1:
                        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                        raise TypeError(f"task.loss() must return a scalar tensor (the batch mean), got {shape}")
                    part = loss / accum if accum > 1 else loss  # the sum over micro-batches: the global batch's mean
                    (scaler.scale(part) if scaler is not None else part).backward()
                part = part.detach().reshape(()).float()
                value = part.clone() if value is None else value + part
            if dist_utils.is_distributed():
                torch.distributed.all_reduce(value)
                value /= world
            loss_value = value.item()
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip (and report) the true gradients
            grad_norm = None
            if config.grad_clip is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
            overflow = grad_norm is not None and not math.isfinite(grad_norm)
            if not math.isfinite(loss_value) or (overflow and scaler is None):
                what = f"loss is {loss_value}" if not math.isfinite(loss_value) else f"gradient norm is {grad_norm}"
                kept = f"best/ keeps step {best['step']}" if best["step"] is not None else "no best/ was written"
                raise FloatingPointError(f"step {step + 1}: the training {what}; stopped before applying it ({kept}). "
                                         "Lower trainer.lr, set trainer.grad_clip, or check the data")
            lr = optimizer.param_groups[0]["lr"]
            if scaler is None:
                optimizer.step()
            else:
                scale = scaler.get_scale()
                scaler.step(optimizer)  # skipped when the gradients overflowed
                scaler.update()
                overflow = scaler.get_scale() < scale
                skipped, overflow_streak = skipped + overflow, overflow_streak + 1 if overflow else 0
                if overflow_streak >= 50:
                    raise FloatingPointError(f"step {step + 1}: the fp16 gradients overflowed in {overflow_streak} steps in a "
                                             f"row (loss scale now {scaler.get_scale():.3g}); use trainer.precision bf16 "
                                             "or fp32, or lower trainer.lr")
            with warnings.catch_warnings():  # fp16: the scheduler follows the steps even when the scaler skipped one
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                scheduler.step()
            done = step + 1
            loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
            timings["train_s"] += time.perf_counter() - t0
            if budget is not None and done < config.steps and sum(timings.values()) >= budget:
                end, stopped_by = done, "time"  # this step becomes the last one
            if done % config.log_every == 0 or done == end:
                entry = {"kind": "train", "step": done, "loss": loss_sum / loss_count, "lr": lr}
                if grad_norm is not None:  # null, not NaN (no JSON), for a step the fp16 scaler skipped
                    entry["grad_norm"] = grad_norm if math.isfinite(grad_norm) else None
                if scaler is not None:
                    entry.update(loss_scale=scaler.get_scale(), skipped=skipped)
                    skipped = 0
                history.append(entry)
                pending.append(entry)
                loss_sum, loss_count = 0.0, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{entry['loss']:.4g}", lr=f"{lr:.3g}", refresh=False)
            if bar is not None:
                bar.update(1)
            evaluating = (config.eval_every and done % config.eval_every == 0) or done == end
            checkpointing = (config.checkpoint_every and done % config.checkpoint_every == 0) or done == end
            if pending and main and (evaluating or checkpointing or len(pending) >= HISTORY_FLUSH_ENTRIES):
                _append_jsonl(output / HISTORY_NAME, pending)
                pending = []
            elif not main:
                pending = []
            if evaluating:
                evaluate(done)
            if checkpointing:
                checkpoint(done)
            if done == end:
                break
    finally:
        if bar is not None:
            bar.close()

    if last_eval != end:  # steps=0, or a resumed run that had already finished its steps
        evaluate(end)
    if last_ckpt != end:
        checkpoint(end)
    # Free DDP's reducer (it holds the process group) now: one left to the interpreter's teardown can outlive
    # destroy_process_group and abort the process on exit.
    del module
    gc.collect()

    def finish() -> TrainSummary:
        t0 = time.perf_counter()
        last_dir = _save_dir(task, output, "last")
        trained = end - start
        timing = {k: round(v, 4) for k, v in timings.items()}
        timing.update(save_last_s=round(time.perf_counter() - t0, 4), total_s=round(time.perf_counter() - started, 4),
                      steps_per_s=round(trained / timings["train_s"], 4) if timings["train_s"] > 0 else 0.0)
        summary = TrainSummary(
            output=str(output), steps=end, stopped_by=stopped_by, select_metric=select, select_mode=mode,
            best_step=best["step"], best_score=best["score"], best_metrics=best["metrics"],
            best_dir=str(output / "best") if best["step"] is not None else None, last_dir=str(last_dir),
            final_metrics=final_metrics, resumed_from=start if resume else None, world_size=world,
            parameters={k: int(v) for k, v in task.parameter_counts().items()}, timings=timing,
            history=[e for e in history if e.get("kind") == "eval"], library=_library(), git_commit=_git_commit(),
            config={**(run_config or {}), "trainer": trainer_dict},
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        from ..io import atomic_write_bytes

        atomic_write_bytes(output / SUMMARY_NAME, (json.dumps(summary.to_dict(), indent=2) + "\n").encode())
        return summary

    return run_on_main(finish)
