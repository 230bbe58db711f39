"""Saving and loading adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

The JSON holds the method and its hyperparameters, the adapted modules, a fingerprint of the base
(each adapted module's parameter names and shapes), the library version and a SHA-256 of the weights
file. Files are written to a temporary name and renamed, so an interrupted save never leaves a
half-written file under the real name; the checksum catches a weights file from another save.
Weights are read with safetensors only (nothing is unpickled).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig
from .model import SHARED_ATTR, add_adapter, delete_adapter, get_config, state_of, wrappers
from .targets import Target, iter_logical_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def _library_version() -> str:
    from . import __version__

    return __version__


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _module_fingerprint(module: nn.Module) -> dict[str, list[int]]:
    return {n: list(p.shape) for n, p in module.named_parameters()}


def adapter_state(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, list[int]]]]:
    """(tensors keyed by ``module.role.param`` / ``mma_shared.alias.param``, base fingerprint)."""
    tensors: dict[str, torch.Tensor] = {}
    fingerprint: dict[str, dict[str, list[int]]] = {}
    for w in wrappers(model):
        if name not in w.adapters:
            continue
        fingerprint[w.module_name] = _module_fingerprint(w.base_layer)
        for pname, p in w.adapters[name].named_parameters():
            tensors[f"{w.module_name}.{pname}"] = p.detach()
    shared = model._modules.get(SHARED_ATTR)
    for alias, key in state_of(model).shared.get(name, {}).items():
        for pname, p in shared[key].named_parameters():
            tensors[f"{SHARED_ATTR}.{alias}.{pname}"] = p.detach()
    return tensors, fingerprint


def save_adapter(model: nn.Module, name: str, directory: str | os.PathLike) -> Path:
    """Save adapter ``name`` (weights only) to ``directory``. Returns the directory."""
    config = get_config(model, name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, fingerprint = adapter_state(model, name)
    contiguous = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS_NAME}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(contiguous, tmp, metadata={"format": "pt", "mmadapters_adapter": name})
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.replace(tmp, directory / WEIGHTS_NAME)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    meta = {
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "name": name,
        "config": config.to_dict(),
        "targets": [{"name": t.name, "parts": sorted(t.parts), "dim": t.dim} for t in state_of(model).targets[name]],
        "fingerprint": fingerprint,
        "weights_sha256": digest,
    }
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return directory


def read_adapter_config(directory: str | os.PathLike) -> tuple[dict, AdapterConfig]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter config not found (expected {CONFIG_NAME} in {directory})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key in ("config", "fingerprint", "name", "weights_sha256"):
        if key not in meta:
            raise ValueError(f"{path}: field {key!r} is missing")
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
        for pname, shape in fingerprint[module_name].items():
            if pname not in have:
                raise ValueError(f"{source}: module {module_name!r} has no parameter {pname!r} here "
                                 f"(saved base had shape {shape})")
            if list(have[pname]) != list(shape):
                raise ValueError(f"{source}: shape mismatch at module {module_name!r} ({pname}): adapter was saved "
                                 f"for {shape}, this base has {list(have[pname])}")


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> str:
    """Load an adapter saved by :func:`save_adapter` onto ``model``. Returns the adapter's name."""
    directory = Path(directory)
    meta, config = read_adapter_config(directory)
    name = name or meta["name"]
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: adapter weights not found")
    data = weights.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
        raise ValueError(f"{weights}: checksum differs from field 'weights_sha256' of {directory / CONFIG_NAME} "
                         "(truncated, or from another save)")
    try:
        tensors = load_file(str(weights))
    except SafetensorError as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
    check_fingerprint(model, meta["fingerprint"], str(directory / CONFIG_NAME))
    # Re-resolving patterns could pick other modules on another model: inject exactly where it was saved.
    modules = {n: m for n, m, _, _ in iter_logical_modules(model)}
    targets = []
    for i, t in enumerate(meta.get("targets", [])):
        try:
            targets.append(Target(t["name"], modules[t["name"]], t.get("dim"), set(t.get("parts", []))))
        except (KeyError, TypeError):
            raise ValueError(f"{directory / CONFIG_NAME}: field 'targets[{i}]' is not a valid target {t!r}") from None
    add_adapter(model, name, config, _targets=targets)
    try:
        _copy_in(model, name, tensors, weights)
    except Exception:
        delete_adapter(model, name)
        raise
    return name


def _copy_in(model: nn.Module, name: str, tensors: dict, source: Path) -> None:
    expected, _ = adapter_state(model, name)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match the adapter built from its config; "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, param in expected.items():
            value = tensors[key]
            if value.shape != param.shape:
                raise ValueError(f"{source}: tensor {key!r} has shape {list(value.shape)}, expected {list(param.shape)}")
            param.copy_(value.to(param.dtype))
