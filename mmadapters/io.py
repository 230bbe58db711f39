"""Saving and loading adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

The JSON holds the method and its hyperparameters, the adapted modules, a fingerprint of the base
(each adapted module's parameter names and shapes), the library version and a SHA-256 of the weights
file. Files are written to a temporary name and renamed, so an interrupted save never leaves a
half-written file under the real name; both files are complete before either is replaced, and a save that
fails midway puts the previous weights back, so an adapter saved there before stays loadable. The checksum
catches a weights file from another save.
Weights are read with safetensors only (nothing is unpickled).

``save_adapter(..., bits=8|4|2|1)`` stores the weights low-bit (see :mod:`mmadapters.quant` for the
scheme); the JSON then has a ``quantization`` field and ``format_version`` 2, and ``load_adapter``
dequantizes transparently. :func:`storage_report` tells what a saved adapter costs on disk.

A *checkpoint directory* holds several adapters, one subdirectory per adapter named after it
(``ckpt/<name>/adapter_config.json``): :func:`save_adapters` writes one, :func:`load_adapters` reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save
from torch import nn

from .atomic import atomic_write_bytes  # noqa: F401 - atomic_write_bytes is re-exported
from .atomic import umask as _umask
from .config import AdapterConfig
from .model import SHARED_ATTR, adapter_names, add_adapter, delete_adapter, get_active, get_config, set_active, state_of, wrappers
from .quant import CODES, OFFSET, SCALE, check_bits, dequantize_state, quantize_state
from .targets import Target, iter_logical_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 2  # 1: full precision; 2: adds the optional 'quantization' field (written only when used)


def _library_version() -> str:
    from . import __version__

    return __version__


def _module_fingerprint(module: nn.Module) -> dict[str, list[int]]:
    """Shapes of the base parameters of ``module`` under their logical names: wrappers seen through, and
    adapters on nested modules (another adapter's units) left out, so the fingerprint does not depend on
    which other adapters the model carries."""
    from .wrapper import AdaptedModule

    out: dict[str, list[int]] = {}

    def walk(m: nn.Module, prefix: str) -> None:
        if isinstance(m, AdaptedModule):
            walk(m.base_layer, prefix)
            return
        for n, p in m.named_parameters(recurse=False):
            out[prefix + n] = list(p.shape)
        for n, child in m.named_children():
            walk(child, f"{prefix}{n}.")

    walk(module, "")
    return out


def _target_meta(t: Target) -> dict:
    meta = {"name": t.name, "parts": sorted(t.parts), "dim": t.dim}
    if t.batch_dim is not None:  # only when declared: files without it stay readable by older versions
        meta["batch_dim"] = t.batch_dim
    return meta


def _comparable(fingerprint: dict[str, list[int]]) -> dict[str, list[int]]:
    """A stored fingerprint in logical names (files from before nested adapters were left out carry
    ``base_layer.`` segments and other adapters' parameters)."""
    return {n.replace("base_layer.", ""): s for n, s in fingerprint.items() if ".adapters." not in f".{n}"}


def _state(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers (a sparse fine-tuning's mask indices), by their state-dict names."""
    return [(n, t) for n, t in module.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)]


def adapter_state(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, list[int]]]]:
    """(tensors keyed by ``module.role.param`` / ``mma_shared.alias.param``, base fingerprint).

    Persistent buffers of the units count as state too (a sparse fine-tuning keeps its mask indices in one)."""
    tensors: dict[str, torch.Tensor] = {}
    fingerprint: dict[str, dict[str, list[int]]] = {}
    for w in wrappers(model):
        if name not in w.adapters:
            continue
        fingerprint[w.module_name] = _module_fingerprint(w.base_layer)
        for pname, p in _state(w.adapters[name]):
            tensors[f"{w.module_name}.{pname}"] = p.detach()
    shared = model._modules.get(SHARED_ATTR)
    for alias, key in state_of(model).shared.get(name, {}).items():
        for pname, p in _state(shared[key]):
            tensors[f"{SHARED_ATTR}.{alias}.{pname}"] = p.detach()
    return tensors, fingerprint


def save_adapter(model: nn.Module, name: str, directory: str | os.PathLike, bits: int | None = None) -> Path:
    """Save adapter ``name`` (weights only) to ``directory``. Returns the directory.

    ``bits``: None keeps every tensor as it is; 8, 4, 2 or 1 stores tensors of two or more dimensions
    as packed per-channel integer codes (:mod:`mmadapters.quant`), 1-D tensors unchanged."""
    bits = check_bits(bits)
    config = get_config(model, name)
    directory = Path(directory)
    tensors, fingerprint = adapter_state(model, name)
    contiguous = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    quantization = None
    if bits is not None:
        contiguous, quantization = quantize_state(contiguous, bits)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS_NAME}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode a plain open() would
        data = canonical_safetensors(save(contiguous, metadata={"format": "pt", "mmadapters_adapter": name}))
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        digest = hashlib.sha256(data).hexdigest()
        meta = _adapter_meta(model, name, config, fingerprint, digest, quantization)
        meta["dtypes"] = {k: _dtype_name(v.dtype) for k, v in sorted(contiguous.items())}
        _replace_pair(directory, Path(tmp), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return directory


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted: safetensors writes ``__metadata__`` in hash
    order, so two saves of one adapter differed in bytes (and in ``weights_sha256``). Offsets are unchanged."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the data section stays 8-byte aligned
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def _adapter_meta(model: nn.Module, name: str, config: AdapterConfig, fingerprint: dict, digest: str,
                  quantization: dict | None) -> dict:
    meta = {
        # Full-precision saves stay version 1 so that older readers still load them.
        "format_version": 1 if quantization is None else 2,
        "library_version": _library_version(),
        "name": name,
        "config": config.to_dict(),
        "targets": [_target_meta(t) for t in state_of(model).targets[name]],
        "fingerprint": fingerprint,
        "weights_sha256": digest,
    }
    if quantization is not None:
        meta["quantization"] = quantization
    return meta


def _replace_pair(directory: Path, weights_tmp: Path, config_bytes: bytes) -> None:
    """Put a finished weights file and its config in place together: the config is written (to a temporary
    name) before anything is replaced, and if replacing fails midway the previous weights are put back, so an
    adapter already saved in ``directory`` stays loadable (its config's checksum matches its weights)."""
    fd, config_tmp = tempfile.mkstemp(prefix=f".{CONFIG_NAME}.", suffix=".tmp", dir=directory)
    backup = None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(config_bytes)
            f.flush()
            os.fsync(f.fileno())
        weights = directory / WEIGHTS_NAME
        if weights.is_file():
            backup = Path(tempfile.mkdtemp(prefix=f".{WEIGHTS_NAME}.old-", dir=directory)) / WEIGHTS_NAME
            try:
                os.link(weights, backup)  # a second name for the old weights; nothing is copied
            except OSError:  # a file system without hard links
                shutil.copy2(weights, backup)
        os.replace(weights_tmp, weights)
        try:
            os.replace(config_tmp, directory / CONFIG_NAME)
        except BaseException:
            if backup is not None:
                os.replace(backup, weights)
            raise
    finally:
        if os.path.exists(config_tmp):
            os.unlink(config_tmp)
        if backup is not None:
            shutil.rmtree(backup.parent, ignore_errors=True)


class _NonFinite(str):
    """Stands in for NaN / Infinity while a file is parsed, so the error can name the field that holds it."""


def _first_non_finite(data: Any, where: str = "") -> str | None:
    if isinstance(data, _NonFinite):
        return where or "(top level)"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = _first_non_finite(value, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def loads_finite(text: str | bytes, source: str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and -Infinity (Python's json accepts them; JSON has no such
    numbers, and one in a hyperparameter silently collapses results): the error names ``source`` and the field."""
    data = json.loads(text, parse_constant=_NonFinite)
    where = _first_non_finite(data)
    if where is not None:
        raise ValueError(f"{source}: field {where!r} is not a finite number; expected a finite JSON number")
    return data


def read_json_object(path: Path, missing: str) -> dict:
    """The JSON object in ``path``; errors name the file (``missing``: what to say when it is absent).
    NaN and Infinity are refused (:func:`loads_finite`)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {missing}")
    try:
        data = loads_finite(path.read_bytes().decode("utf-8"), str(path))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}); expected a JSON object") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except RecursionError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except ValueError as err:  # a non-finite number (message names the field), or an integer of > 4300 digits
        raise ValueError(str(err) if str(err).startswith(str(path)) else f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def read_adapter_config(directory: str | os.PathLike) -> tuple[dict, AdapterConfig]:
    path = Path(directory) / CONFIG_NAME
    meta = read_json_object(path, f"adapter config not found (expected {CONFIG_NAME} in {directory})")
    for key in ("config", "fingerprint", "name", "weights_sha256"):
        if key not in meta:
            raise ValueError(f"{path}: field {key!r} is missing")
    for key, kind, what in (("config", dict, "an object (the adapter config)"), ("name", str, "a string"),
                            ("weights_sha256", str, "a string"),
                            ("fingerprint", dict, "an object {module: {parameter: shape}}"),
                            ("targets", list, "a list of targets"), ("quantization", dict, "an object")):
        if key in meta and not isinstance(meta[key], kind):
            raise ValueError(f"{path}: field {key!r} is {type(meta[key]).__name__}; expected {what}")
    for module_name, params in meta["fingerprint"].items():
        if not isinstance(params, dict) or not all(isinstance(s, list) and all(isinstance(d, int) for d in s)
                                                   for s in params.values()):
            raise ValueError(f"{path}: field 'fingerprint.{module_name}': expected {{parameter: [dim, ...]}}, "
                             f"got {params!r}"[:300])
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{path}: field 'format_version' is {version!r}; expected an integer")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: field 'format_version' is {meta['format_version']}; this library reads "
                         f"up to {FORMAT_VERSION} (upgrade mmadapters)")
    return meta, AdapterConfig.from_dict(meta["config"], source=f"{path}: field 'config'")


def check_fingerprint(model: nn.Module, fingerprint: dict, source: str) -> None:
    """Raise naming the first module (and parameter) whose shape differs from the saved base."""
    modules = {n: m for n, m, _, _ in iter_logical_modules(model)}
    for module_name in sorted(fingerprint):
        try:
            module = modules[module_name]
        except KeyError:
            raise ValueError(f"{source}: the adapter was saved for a base with module {module_name!r}, "
                             f"which this {type(model).__name__} does not have") from None
        have = _module_fingerprint(module)
        for pname, shape in _comparable(fingerprint[module_name]).items():
            if pname not in have:
                raise ValueError(f"{source}: module {module_name!r} has no parameter {pname!r} here "
                                 f"(saved base had shape {shape})")
            if list(have[pname]) != list(shape):
                raise ValueError(f"{source}: shape mismatch at module {module_name!r} ({pname}): adapter was saved "
                                 f"for {shape}, this base has {list(have[pname])}")


def read_adapter_weights(directory: str | os.PathLike) -> tuple[dict, AdapterConfig, dict[str, torch.Tensor]]:
    """Read and check a saved adapter without touching any model: (config JSON, config, full-precision tensors).

    Verifies the checksum and dequantizes low-bit weights; errors name the file and the field."""
    directory = Path(directory)
    meta, config = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: adapter weights not found")
    data = weights.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
        raise ValueError(f"{weights}: checksum differs from field 'weights_sha256' of {directory / CONFIG_NAME} "
                         "(truncated, or from another save)")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
    check_stored_tensors(tensors, meta, weights, directory / CONFIG_NAME)
    if "quantization" in meta:
        tensors = dequantize_state(tensors, meta["quantization"], str(directory / CONFIG_NAME))
    return meta, config, tensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_stored_tensors(tensors: dict[str, torch.Tensor], meta: dict, weights: Path, config_path: Path) -> None:
    """Refuse tensors a save could not have written: NaN/inf values, and dtypes the config does not declare.

    Files since ``dtypes`` was recorded declare each stored tensor's dtype; in older files a tensor must at least
    be of the parameter's kind (floating or integer), checked when it is copied in (:func:`_copy_in`)."""
    declared = meta.get("dtypes")
    if declared is not None and (not isinstance(declared, dict) or not all(isinstance(v, str) for v in declared.values())):
        raise ValueError(f"{config_path}: field 'dtypes' is {type(declared).__name__}; expected {{tensor: dtype name}}")
    for key, t in tensors.items():
        stored = _dtype_name(t.dtype)
        if declared is not None and key in declared:  # an unlisted tensor is reported as unexpected when copied in
            if declared[key] != stored:
                raise ValueError(f"{weights}: tensor {key!r} is stored as {stored} but field 'dtypes' of {config_path} "
                                 f"declares {declared[key]}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{weights}: tensor {key!r} holds NaN or infinite values; expected finite weights")


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None, *,
                 replace: bool = False) -> str:
    """Load an adapter saved by :func:`save_adapter` onto ``model``. Returns the adapter's name.

    ``replace``: if the model already has an adapter of that name, swap it for the saved one (the active
    composition is kept). The new one is built and filled first, so a failure leaves the old one in place."""
    directory = Path(directory)
    meta, config, tensors = read_adapter_weights(directory)
    name = name or meta["name"]
    source = str(directory / CONFIG_NAME)
    check_fingerprint(model, meta["fingerprint"], source)
    if replace and name in adapter_names(model):
        active = get_active(model)
        trial = _unused_name(model, name)
        _install(model, trial, meta, config, tensors, directory)  # proves the checkpoint fits this model
        delete_adapter(model, trial)
        delete_adapter(model, name)
        _install(model, name, meta, config, tensors, directory)
        set_active(model, active)
        return name
    _install(model, name, meta, config, tensors, directory)
    return name


def _unused_name(model: nn.Module, name: str) -> str:
    taken = set(adapter_names(model))
    i = 0
    while f"{name}__incoming{i}" in taken:
        i += 1
    return f"{name}__incoming{i}"


def _declared_batch_dims(model: nn.Module) -> dict[str, int]:
    """Module name -> batch dimension, for every module an adapter point with a ``batch_dim`` covers."""
    from .points import declared_points
    from .targets import resolve_targets

    dims: dict[str, int] = {}
    for point in declared_points(model):
        for target in resolve_targets(model, [f"@{point}"]):
            if target.batch_dim is not None:
                dims[target.name] = target.batch_dim
    return dims


def _install(model: nn.Module, name: str, meta: dict, config: AdapterConfig, tensors: dict, directory: Path) -> None:
    # Re-resolving patterns could pick other modules on another model: inject exactly where it was saved.
    modules = {n: m for n, m, _, _ in iter_logical_modules(model)}
    targets = []
    for i, t in enumerate(meta.get("targets", [])):
        try:
            targets.append(Target(t["name"], modules[t["name"]], t.get("dim"), set(t.get("parts", [])), t.get("batch_dim")))
        except (KeyError, TypeError):
            raise ValueError(f"{directory / CONFIG_NAME}: field 'targets[{i}]' is not a valid target {t!r}") from None
    if any(t.batch_dim is None for t in targets):  # files written before targets recorded it: ask the points
        declared = _declared_batch_dims(model)
        for t in targets:
            if t.batch_dim is None:
                t.batch_dim = declared.get(t.name)
    _check_shapes_before_building(model, config, targets, tensors, directory)
    add_adapter(model, name, config, _targets=targets)
    try:
        _copy_in(model, name, tensors, directory / WEIGHTS_NAME)
    except Exception:
        delete_adapter(model, name)
        raise


def _check_shapes_before_building(model: nn.Module, config: AdapterConfig, targets: list, tensors: dict,
                                  directory: Path) -> None:
    """Build the adapter on the meta device (shapes, no memory) and compare it with the file's tensors, so that a
    config declaring absurd sizes (``"r": 2e7`` in a 1 KB folder) is refused before gigabytes are allocated."""
    trial = _unused_name(model, "shape-check")
    active = get_active(model)
    try:
        with torch.device("meta"):
            add_adapter(model, trial, config, _targets=targets)
    except Exception:  # a method that cannot build on meta: the real build and _copy_in check the shapes
        if trial in adapter_names(model):
            delete_adapter(model, trial)
        set_active(model, active)
        return
    try:
        built = {k: list(v.shape) for k, v in adapter_state(model, trial)[0].items()}
    finally:
        delete_adapter(model, trial)
        set_active(model, active)
    for key, shape in built.items():
        if key in tensors and list(tensors[key].shape) != shape:
            raise ValueError(f"{directory / CONFIG_NAME}: field 'config' builds tensor {key!r} of shape {shape}, but "
                             f"{WEIGHTS_NAME} holds {list(tensors[key].shape)}; expected the config the weights were saved with")
    _check_keys(built, tensors, directory / WEIGHTS_NAME)


def _check_keys(expected, tensors: dict, source: Path) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match the adapter built from its config; "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def _copy_in(model: nn.Module, name: str, tensors: dict, source: Path) -> None:
    expected, _ = adapter_state(model, name)
    _check_keys(expected, tensors, source)
    with torch.no_grad():
        for key, param in expected.items():
            value = tensors[key]
            if value.shape != param.shape:
                raise ValueError(f"{source}: tensor {key!r} has shape {list(value.shape)}, expected {list(param.shape)}")
            if value.is_floating_point() != param.is_floating_point() or (value.dtype == torch.bool) != (param.dtype == torch.bool):
                raise ValueError(f"{source}: tensor {key!r} is stored as {_dtype_name(value.dtype)}; the adapter's "
                                 f"parameter is {_dtype_name(param.dtype)}")
            param.copy_(value.to(param.dtype))


# -- checkpoint directories: several adapters, one subdirectory each ---------------------------------------

def replace_directory(built: Path, target: Path) -> None:
    """Move the finished directory ``built`` to ``target`` (same filesystem), replacing an existing one.

    A reader sees either the old or the new directory, never a half-written one (for an instant between
    the two renames, neither)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.replace(built, target)
    except BaseException:
        if old is not None:
            os.replace(old / target.name, target)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_adapter_dirs(directory: str | os.PathLike) -> dict[str, Path]:
    """Adapter name -> subdirectory, for every ``directory/<name>/adapter_config.json`` (sorted by name)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: checkpoint directory not found")
    return {p.name: p for p in sorted(directory.iterdir()) if not p.name.startswith(".") and (p / CONFIG_NAME).is_file()}


def save_adapters(model: nn.Module, directory: str | os.PathLike, names: Sequence[str] | None = None,
                  bits: int | None = None) -> Path:
    """Save several adapters (default: all) to ``directory/<name>/``. Returns ``directory``.

    Each adapter's subdirectory is written to a temporary directory first and then renamed into place;
    other entries of ``directory`` are left alone."""
    bits = check_bits(bits, "save_adapters")
    names = list(adapter_names(model) if names is None else names)
    if not names:
        raise ValueError("save_adapters: the model has no adapters to save")
    for n in names:
        get_config(model, n)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for n in names:
        built = Path(tempfile.mkdtemp(prefix=f".{n}.", suffix=".tmp", dir=directory))
        os.chmod(built, 0o777 & ~_umask())  # mkdtemp makes 0700; the folder gets the mode a plain mkdir would
        try:
            save_adapter(model, n, built, bits=bits)
            replace_directory(built, directory / n)
        finally:
            shutil.rmtree(built, ignore_errors=True)
    return directory


def load_adapters(model: nn.Module, directory: str | os.PathLike, names: Sequence[str] | None = None, *,
                  replace: bool = False) -> list[str]:
    """Load adapters from a checkpoint directory written by :func:`save_adapters` (default: all of them).

    Each is loaded under its subdirectory's name. Every requested adapter is read and checked before the
    model is touched. Returns the names loaded."""
    available = checkpoint_adapter_dirs(directory)
    names = list(available if names is None else names)
    if not names:
        raise ValueError(f"{directory}: no adapter subdirectories (expected {directory}/<name>/{CONFIG_NAME})")
    missing = [n for n in names if n not in available]
    if missing:
        raise FileNotFoundError(f"{directory}: no adapter {missing[0]!r} (expected {Path(directory) / missing[0] / CONFIG_NAME}); "
                                f"this checkpoint has {sorted(available)}")
    if not replace:
        clash = [n for n in names if n in adapter_names(model)]
        if clash:
            raise ValueError(f"load_adapters: the model already has adapter(s) {clash}; pass replace=True to swap them")
    for n in names:
        read_adapter_weights(available[n])  # fail before loading anything
    for n in names:
        load_adapter(model, available[n], name=n, replace=replace)
    return names


# -- storage report ---------------------------------------------------------------------------------------

@dataclass
class StorageReport:
    """What a saved adapter costs on disk, against float32 storage of the same parameters."""

    name: str
    method: str
    bits: int | None  # None: saved at full precision (dtype in ``dtypes``)
    scheme: str | None
    files: dict[str, int]  # file name -> bytes
    num_params: int
    quantized_params: int  # parameters stored as low-bit codes (the rest are kept as they were)
    dtypes: list[str] = field(default_factory=list)  # dtypes of the stored full-precision tensors
    directory: str | None = None  # None when computed from a model through a temporary save

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.num_params

    @property
    def ratio(self) -> float:
        """Bytes on disk (all files, config included) / (4 bytes x parameters)."""
        return self.total_bytes / self.fp32_bytes if self.num_params else math.nan

    @property
    def weights_ratio(self) -> float:
        """Bytes of the weights file alone / (4 bytes x parameters): what the bit width buys."""
        return self.files.get(WEIGHTS_NAME, 0) / self.fp32_bytes if self.num_params else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes, "fp32_bytes": self.fp32_bytes, "ratio": self.ratio,
                "weights_ratio": self.weights_ratio}

    def __str__(self) -> str:
        precision = "full precision" if self.bits is None else f"{self.bits}-bit {self.scheme}"
        where = self.directory or "(temporary save)"
        width = max([len(f) for f in self.files] + [len("total")]) + 2
        rows = [f"adapter {self.name!r} ({self.method}), {precision}, {where}",
                f"{'file':<{width}}{'bytes':>14}"]
        rows += [f"{f:<{width}}{b:>14,}" for f, b in sorted(self.files.items())]
        rows.append(f"{'total':<{width}}{self.total_bytes:>14,}")
        rows.append(f"parameters {self.num_params:,} ({self.quantized_params:,} low-bit); as float32 {self.fp32_bytes:,} bytes")
        rows.append(f"on disk / float32: {self.ratio:.4f} (all files), {self.weights_ratio:.4f} (weights file)")
        return "\n".join(rows)


def storage_report(source: nn.Module | str | os.PathLike, name: str | None = None, *,
                   bits: int | None = None) -> StorageReport:
    """Bytes on disk of a saved adapter, or of adapter ``name`` of a model saved at ``bits``.

    - ``storage_report("out/task")``: the adapter directory ``out/task``;
    - ``storage_report("ckpt", "en")``: adapter ``en`` of a checkpoint directory (``ckpt/en``);
    - ``storage_report(model, "en", bits=4)``: saves ``en`` into a temporary directory first.

    ``bits`` applies to the model form only (a saved directory already has its precision)."""
    if isinstance(source, nn.Module):
        if name is None:
            raise ValueError("storage_report(model, name, bits=...): argument 'name' is required with a model")
        bits = check_bits(bits, "storage_report")
        with tempfile.TemporaryDirectory(prefix="mma-storage-") as tmp:
            report = _report_dir(save_adapter(source, name, Path(tmp) / name, bits=bits))
        report.directory = None
        return report
    if bits is not None:
        raise ValueError("storage_report: argument 'bits' applies only to a model; a saved adapter's precision "
                         f"is read from its {CONFIG_NAME}")
    directory = Path(source)
    if not (directory / CONFIG_NAME).is_file() and name is not None:
        directory = directory / name
    report = _report_dir(directory)
    if name is not None and report.name != name and directory.name != name:
        raise ValueError(f"{directory / CONFIG_NAME}: holds adapter {report.name!r}, not {name!r}")
    return report


def _report_dir(directory: Path) -> StorageReport:
    meta, config = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: adapter weights not found")
    quant = meta.get("quantization") or {}
    record = quant.get("tensors", {}) if isinstance(quant, dict) else {}
    if not isinstance(record, dict):
        raise ValueError(f"{directory / CONFIG_NAME}: field 'quantization.tensors' is {type(record).__name__}; "
                         "expected an object of tensor name -> {shape, dtype}")
    for key, info in record.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"{directory / CONFIG_NAME}: field 'quantization.tensors[{key!r}].shape' is {shape!r}; "
                             "expected a list of non-negative integers")
    num, quantized, dtypes = 0, 0, set()
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                if key.endswith((CODES, SCALE, OFFSET)):
                    continue
                sl = f.get_slice(key)
                num += math.prod(sl.get_shape())
                dtypes.add(str(sl.get_dtype()))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
    for info in record.values():
        quantized += math.prod(info["shape"])
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and not p.name.startswith(".")}
    return StorageReport(name=meta["name"], method=config.method, bits=quant.get("bits"), scheme=quant.get("scheme"),
                         files=files, num_params=num + quantized, quantized_params=quantized, dtypes=sorted(dtypes),
                         directory=str(directory))
