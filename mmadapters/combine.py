"""Combining adapters: a weighted combination as a new adapter, and assembling a set from checkpoints.

:func:`average_adapters` makes one new adapter out of several.

- LoRA is linear in its weight change, so the combination is exact: ``dW_new = sum_i w_i dW_i`` at every
  adapted module. The factors are concatenated, ``A_new = [A_1; ...; A_n]`` (rank ``sum_i r_i``) and
  ``B_new = [c_1 B_1, ..., c_n B_n]`` with ``c_i = w_i * scaling_i * gate_i`` folded into each block; the
  new adapter has ``alpha = r`` (scaling 1) and no gate; it learns bias / norm deltas if any source did
  (``train_biases``: the widest setting; those deltas add up the same way, zero where a source has none),
  and its dropout (a training-only setting) is the first adapter's. ``rank=k`` instead keeps the best
  rank-``k`` approximation of ``sum_i c_i B_i A_i`` (truncated SVD, computed from QR factors so the full
  matrix is never decomposed; zero-padded when ``k`` exceeds the matrix's rank).
- Every other method's output is nonlinear in its parameters (bottleneck, Compacter, Hyperformer,
  prompts), so the new adapter is a *weight-space* average of identically configured adapters
  (AdapterSoup / model soup): ``theta_new = sum_i w_i theta_i``. That is **not** the average of the
  adapters' outputs; for that, keep the adapters and activate ``mma.Average(...)``, which averages their
  changes at run time. Modules shared by all the averaged adapters (a Hyperformer hypernetwork) are
  left as they are.

:func:`select_from_checkpoints` takes each adapter from a different checkpoint, no averaging: e.g. the
language-dependent ASR adapters keep, per language, the step where that language's dev WER was best.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import AdapterConfig, check_adapter_name
from .io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write_bytes,
    check_fingerprint,
    checkpoint_adapter_dirs,
    load_adapter,
    read_adapter_config,
    read_adapter_weights,
    replace_directory,
)
from .methods.lora import LoRAConfig
from .model import adapter_names, adapter_parameters, add_adapter, delete_adapter, get_config, state_of, wrappers

SELECTION_NAME = "selection.json"
_BIASES_ORDER = ("none", "adapted", "all")


def average_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float] | None, new_name: str, *,
                     rank: int | None = None) -> nn.Module:
    """Add adapter ``new_name``: the combination ``sum_i weights[i] * names[i]`` (see the module docstring).

    ``weights``: one number per adapter; None means uniform ``1 / len(names)``. ``rank`` (LoRA only):
    truncate the exact combination to this rank by SVD; None keeps it exact (rank ``sum_i r_i``).
    The new adapter is not activated unless nothing was active. Returns ``model``."""
    names = list(names)
    if not names:
        raise ValueError("average_adapters: argument 'names' is empty; give at least one adapter")
    if len(set(names)) != len(names):
        raise ValueError(f"average_adapters: argument 'names' repeats an adapter: {names}")
    configs = [get_config(model, n) for n in names]  # KeyError naming the unknown adapter
    check_adapter_name(new_name)
    if new_name in adapter_names(model):
        raise ValueError(f"average_adapters: adapter {new_name!r} already exists on this model; pick another new_name")
    coefs = _weights(weights, len(names))
    methods = {c.method for c in configs}
    if len(methods) > 1:
        listing = ", ".join(f"{n!r}: {c.method}" for n, c in zip(names, configs, strict=True))
        raise ValueError(f"average_adapters: adapters use different methods ({listing}); combine one method at a time")
    targets = _same_targets(model, names)
    if configs[0].method == "lora":
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"average_adapters: argument 'rank' must be a positive integer or None, got {rank!r}")
        _combine_lora(model, names, configs, coefs, new_name, targets, rank)
    else:
        if rank is not None:
            raise ValueError(f"average_adapters: argument 'rank' applies to LoRA only, not {configs[0].method!r}")
        _soup(model, names, configs, coefs, new_name, targets)
    return model


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ValueError(f"average_adapters: {n} adapters but {len(values)} weights (argument 'weights')")
    if not all(math.isfinite(w) for w in values):
        raise ValueError(f"average_adapters: argument 'weights' must be finite numbers, got {values}")
    return values


def _same_targets(model: nn.Module, names: list[str]) -> list:
    state = state_of(model)

    def where(n: str) -> dict[str, tuple]:
        return {t.name: (sorted(t.parts), t.dim) for t in state.targets[n]}

    first = where(names[0])
    for n in names[1:]:
        other = where(n)
        if other != first:
            diff = sorted(set(first) ^ set(other)) or sorted(k for k in first if first[k] != other[k])
            raise ValueError(f"average_adapters: adapters {names[0]!r} and {n!r} adapt different modules "
                             f"(first difference at {diff[0]!r}); only adapters on the same targets combine")
    return list(state.targets[names[0]])


def _add_then_fill(model: nn.Module, new_name: str, config: AdapterConfig, targets: list, fill) -> None:
    add_adapter(model, new_name, config, _targets=targets)
    try:
        with torch.no_grad():
            fill()
    except Exception:
        delete_adapter(model, new_name)
        raise


# -- LoRA: exact --------------------------------------------------------------------------------------------

def _combine_lora(model, names, configs: list[LoRAConfig], coefs, new_name, targets, rank) -> None:
    total = sum(c.r for c in configs)
    r = total if rank is None else rank
    biases = max((c.train_biases for c in configs), key=_BIASES_ORDER.index)
    config = dataclasses.replace(configs[0], r=r, alpha=float(r), rslora=False, gate=False,
                                 train_norms=any(c.train_norms for c in configs), train_biases=biases)

    def fill() -> None:
        for w in wrappers(model):
            if new_name not in w.adapters:
                continue
            for role, unit in w.adapters[new_name].items():
                sources = [w.adapters[n][role] if n in w.adapters and role in w.adapters[n] else None for n in names]
                if role == "lora":
                    _fill_lora(unit, sources, coefs, rank, f"{w.module_name}")
                elif role == "tuning":
                    _fill_sum(unit, sources, coefs, w.module_name)
                else:
                    raise ValueError(f"average_adapters: LoRA adapter at {w.module_name!r} has an unexpected {role!r} unit")

    _add_then_fill(model, new_name, config, targets, fill)


def _fill_lora(unit: nn.Module, sources: list, coefs: list[float], rank: int | None, where: str) -> None:
    """A blocks stack along dim 0 (rank), B blocks along dim 1, each B scaled by ``w_i * scaling_i * gate_i``."""
    params = dict(unit.named_parameters())
    pairs = [(a, a.replace("lora_A", "lora_B")) for a in params if "lora_A" in a]
    for src in sources:
        if src is None:
            raise ValueError(f"average_adapters: a LoRA adapter has no unit at {where!r}")
    scale = [w * s.scaling * (1.0 if s.gate is None else float(s.gate)) for w, s in zip(coefs, sources, strict=True)]
    for a_name, b_name in pairs:
        src_a = [dict(s.named_parameters())[a_name].detach() for s in sources]
        src_b = [dict(s.named_parameters())[b_name].detach() * c for s, c in zip(sources, scale, strict=True)]
        a = torch.cat(src_a, dim=0)  # (R, in, ...)
        b = torch.cat(src_b, dim=1)  # (out, R, ...)
        if rank is not None:
            a, b = _truncate(a, b, rank)
        params[a_name].copy_(a.to(params[a_name].dtype))
        params[b_name].copy_(b.to(params[b_name].dtype))


def _truncate(a: Tensor, b: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Best rank-``k`` factors of ``B A`` (``a``: (R, *in), ``b``: (out, R, *rest)), zero-padded past its rank.

    With ``B = Qb Rb`` and ``A^T = Qa Ra``, ``B A = Qb (Rb Ra^T) Qa^T``: only the small R x R core is decomposed."""
    big_r = a.shape[0]
    a2 = a.reshape(big_r, -1).double()  # (R, M)
    b2 = b.reshape(b.shape[0], big_r).double()  # (out, R)
    qb, rb = torch.linalg.qr(b2)
    qa, ra = torch.linalg.qr(a2.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    keep = min(k, s.numel())
    root = s[:keep].sqrt()
    new_b = torch.zeros(b2.shape[0], k, dtype=torch.float64)
    new_a = torch.zeros(k, a2.shape[1], dtype=torch.float64)
    new_b[:, :keep] = (qb @ u[:, :keep]) * root
    new_a[:keep] = root[:, None] * (vh[:keep] @ qa.T)
    return (new_a.reshape(k, *a.shape[1:]).to(a.dtype),
            new_b.reshape(b.shape[0], k, *b.shape[2:]).to(b.dtype))


def _fill_sum(unit: nn.Module, sources: list, coefs: list[float], where: str) -> None:
    """Linear parameters (bias / norm deltas): the weighted sum, zero where an adapter has none."""
    own = dict(unit.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in own.items()}
    for src, w in zip(sources, coefs, strict=True):
        if src is None:
            continue
        for k, p in src.named_parameters():
            if k not in total:
                raise ValueError(f"average_adapters: delta {k!r} at {where!r} has no place in the combined adapter")
            total[k] += w * p.detach().to(total[k].dtype)
    for k, p in own.items():
        p.copy_(total[k])


# -- every other method: weight-space average ------------------------------------------------------------------

def _soup(model, names, configs: list[AdapterConfig], coefs, new_name, targets) -> None:
    def comparable(c: AdapterConfig) -> dict:
        # Dropout acts in training only; target patterns are compared through the resolved targets.
        return {k: v for k, v in c.to_dict().items() if k not in ("dropout", "target_modules")}

    first = comparable(configs[0])
    for n, c in zip(names[1:], configs[1:], strict=True):
        other = comparable(c)
        diff = sorted(k for k in first if first[k] != other.get(k))
        if diff:
            raise ValueError(f"average_adapters: {configs[0].method!r} adapters {names[0]!r} and {n!r} differ in "
                             f"{diff[0]!r} ({first[diff[0]]!r} vs {other.get(diff[0])!r}); a weight-space average "
                             "needs identically configured adapters (use mma.Average to average outputs instead)")
    sources = [adapter_parameters(model, n) for n in names]
    for n, params in zip(names[1:], sources[1:], strict=True):
        for key, p in sources[0].items():
            if key not in params or params[key].shape != p.shape:
                got = list(params[key].shape) if key in params else "nothing"
                raise ValueError(f"average_adapters: parameter {key!r} is {list(p.shape)} in {names[0]!r} but "
                                 f"{got} in {n!r}")

    def fill() -> None:
        for key, p in adapter_parameters(model, new_name).items():
            values = [s[key] for s in sources]
            if all(v is values[0] for v in values) and p is values[0]:
                continue  # one module shared by all of them (and the new one): nothing to average
            total = torch.zeros_like(p, dtype=torch.float64 if p.is_floating_point() else p.dtype)
            for v, w in zip(values, coefs, strict=True):
                total += w * v.detach().to(total.dtype)
            p.copy_(total.to(p.dtype))

    _add_then_fill(model, new_name, configs[0], targets, fill)


# -- selection from checkpoints ----------------------------------------------------------------------------------

def select_from_checkpoints(sources: Mapping[str, str | os.PathLike], model: nn.Module | None = None, *,
                            output_dir: str | os.PathLike | None = None, overwrite: bool = False) -> nn.Module | Path:
    """Assemble an adapter set taking each adapter from its own checkpoint: ``{"en": "ckpt/step3", ...}``.

    A checkpoint path is either the adapter's own directory (its ``adapter_config.json`` must name the
    adapter) or a checkpoint directory with one subdirectory per adapter (``path/<name>/``, as written by
    :func:`mmadapters.io.save_adapters`). Every selected adapter is read and checked (checksum, and the
    base's fingerprint when ``model`` is given) before anything is changed.

    - ``model``: load each adapter into it under its key, replacing an adapter of that name (the active
      composition is kept). Adapters that share a module across adapters (a Hyperformer hypernetwork)
      keep the copy from the last checkpoint loaded.
    - ``output_dir``: write the assembled checkpoint directory (``output_dir/<name>/`` plus
      ``selection.json`` recording each adapter's source), built in a temporary directory and renamed
      into place. An existing non-empty ``output_dir`` is replaced only with ``overwrite=True``, and only
      if it holds nothing but adapter subdirectories and a ``selection.json``.

    At least one of the two is required. Returns ``model`` if given, else the output directory."""
    if model is None and output_dir is None:
        raise ValueError("select_from_checkpoints: give a model to load into, an output_dir to write, or both")
    if not isinstance(sources, Mapping) or not sources:
        raise ValueError("select_from_checkpoints: argument 'sources' must be a non-empty mapping adapter name -> path")
    chosen: dict[str, Path] = {}
    for key, path in sources.items():
        check_adapter_name(key)
        chosen[key] = _resolve(key, Path(path))
    read = {key: read_adapter_weights(d) for key, d in chosen.items()}
    if model is not None:
        for key, (meta, _, _) in read.items():
            check_fingerprint(model, meta["fingerprint"], str(chosen[key] / CONFIG_NAME))
    if output_dir is not None:
        _write_selection(chosen, Path(output_dir), overwrite)
    if model is None:
        return Path(output_dir)
    for key, d in chosen.items():
        load_adapter(model, d, name=key, replace=True)
    return model


def _resolve(key: str, path: Path) -> Path:
    if (path / CONFIG_NAME).is_file():
        meta, _ = read_adapter_config(path)
        if meta["name"] != key:
            raise ValueError(f"{path / CONFIG_NAME}: field 'name' is {meta['name']!r}, but it was selected as adapter "
                             f"{key!r}; point sources[{key!r}] at adapter {key!r}'s directory or at a checkpoint "
                             f"directory holding {key}/")
        return path
    if (path / key / CONFIG_NAME).is_file():
        return path / key
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint not found (sources[{key!r}])")
    available = sorted(checkpoint_adapter_dirs(path))
    raise FileNotFoundError(f"{path}: no adapter {key!r} (expected {path / key / CONFIG_NAME}, or {path / CONFIG_NAME} "
                            f"naming {key!r}); this checkpoint has {available or 'no adapters'}")


def _write_selection(chosen: dict[str, Path], output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists():
        entries = list(output_dir.iterdir()) if output_dir.is_dir() else [output_dir]
        if entries and not overwrite:
            raise FileExistsError(f"{output_dir}: already exists and is not empty; pass overwrite=True to replace it")
        strangers = [p.name for p in entries if p.name != SELECTION_NAME and not (p / CONFIG_NAME).is_file()]
        if strangers:
            raise FileExistsError(f"{output_dir}: holds {strangers[:5]}, which are not adapter checkpoints; "
                                  "refusing to replace it")
    # Read everything first: a source may live inside output_dir, which is about to be replaced.
    files = {key: {n: (d / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)} for key, d in chosen.items()}
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        record = {}
        for key, data in files.items():
            meta = json.loads(data[CONFIG_NAME])
            sub = built / key
            sub.mkdir()
            (sub / WEIGHTS_NAME).write_bytes(data[WEIGHTS_NAME])
            if meta["name"] != key:  # a subdirectory's name is the adapter's name
                meta["name"] = key
                data[CONFIG_NAME] = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
            (sub / CONFIG_NAME).write_bytes(data[CONFIG_NAME])
            record[key] = {"source": str(chosen[key].resolve()), "weights_sha256": meta["weights_sha256"]}
        atomic_write_bytes(built / SELECTION_NAME, (json.dumps({"adapters": record}, indent=2) + "\n").encode())
        replace_directory(built, output_dir)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
