"""Adapter points: named places in a model that a backbone declares for configs to refer to.

A backbone says, once, which modules are e.g. its attention outputs or FFN outputs::

    declare_adapter_points(model, {
        "attn_out": AdapterPoint("blocks.*.attn", dim=512),
        "ffn_out": "blocks.*.mlp",
    })

and a config then targets ``"@ffn_out"``. Points may be declared on any submodule (a CLIP model's
visual tower, say); their patterns are relative to that submodule. The core resolves points exactly
like module-name patterns and contains no backbone code.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_ATTR = "_mma_adapter_points"


@dataclass(frozen=True)
class AdapterPoint:
    """Module-name patterns (see :mod:`mmadapters.targets`) plus facts the core cannot infer."""

    patterns: tuple[str, ...]
    dim: int | None = None  # feature size of the module's output (for modules without out_features)
    doc: str = ""
    batch_dim: int | None = None  # where the batch is in the module's input/output, if not dim 0 (per-sample routing)

    def __init__(self, patterns: str | list[str] | tuple[str, ...], dim: int | None = None, doc: str = "",
                 batch_dim: int | None = None):
        object.__setattr__(self, "patterns", (patterns,) if isinstance(patterns, str) else tuple(patterns))
        object.__setattr__(self, "dim", dim)
        object.__setattr__(self, "doc", doc)
        object.__setattr__(self, "batch_dim", batch_dim)


def declare_adapter_points(module: nn.Module, points: dict[str, str | list[str] | AdapterPoint]) -> nn.Module:
    """Attach named adapter points to ``module`` (merged with any declared before). Returns ``module``."""
    current = dict(getattr(module, _ATTR, {}))
    for name, spec in points.items():
        if not isinstance(name, str) or not name or name.startswith("@"):
            raise ValueError(f"adapter point name {name!r}: expected a plain non-empty name (no '@')")
        current[name] = spec if isinstance(spec, AdapterPoint) else AdapterPoint(spec)
    # A plain attribute, not a buffer: points are code facts, not state to save.
    object.__setattr__(module, _ATTR, current)
    return module


def declared_points(module: nn.Module) -> dict[str, list[tuple[str, AdapterPoint]]]:
    """All points visible from ``module``: name -> [(prefix of the declaring submodule, point), ...]."""
    found: dict[str, list[tuple[str, AdapterPoint]]] = {}
    from .targets import iter_logical_modules  # local import: targets imports this module

    for prefix, sub, _parent, _attr in iter_logical_modules(module):
        for name, point in getattr(sub, _ATTR, {}).items():
            found.setdefault(name, []).append((prefix, point))
    return found
