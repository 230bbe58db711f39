"""Resolving ``target_modules`` to the modules an adapter is injected into.

Pattern semantics (peft's for names, plus globs, regexes and adapter points):

- ``"re:<regex>"``: the regex must match the whole module name;
- a pattern with ``*``, ``?`` or ``[``: a glob on the whole name (``*`` also crosses dots);
- ``"@point"``: the patterns of a declared adapter point (see :mod:`mmadapters.points`);
- anything else: the exact name, or a suffix of it at a dot boundary (``"fc1"`` matches ``"mlp.fc1"``).

Names are *logical*: once a module is wrapped by an adapter, it keeps its original name, so targets
resolve the same before and after other adapters were added.

``nn.MultiheadAttention`` reads its ``out_proj`` weights directly instead of calling it, so a match on
its ``out_proj`` is lifted to the attention module itself (with only that projection adapted).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import regex
from torch import nn

from .points import AdapterPoint, declared_points

SHARED_ATTR = "mma_shared"  # where modules shared across layers live; never a target


@dataclass
class Target:
    """One module to adapt."""

    name: str  # logical module name ("" is the root)
    module: nn.Module  # the base module (never a wrapper)
    dim: int | None = None  # output feature size, when an adapter point declares it
    parts: set[str] = field(default_factory=set)  # for nn.MultiheadAttention: {"in_proj", "out_proj"}
    batch_dim: int | None = None  # batch dimension of the module's tensors, when an adapter point declares it


def iter_logical_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, nn.Module | None, str]]:
    """Yield ``(logical_name, base_module, parent, attribute)`` for every module, wrappers seen through."""
    from .wrapper import AdaptedModule

    def walk(module: nn.Module, name: str, parent: nn.Module | None, attr: str):
        base = module.base_layer if isinstance(module, AdaptedModule) else module
        yield name, base, parent, attr
        for child_attr, child in base.named_children():
            if child_attr == SHARED_ATTR:
                continue
            child_name = f"{name}.{child_attr}" if name else child_attr
            yield from walk(child, child_name, base, child_attr)

    if isinstance(model, AdaptedModule):
        raise TypeError("the model root itself cannot be an adapter wrapper")
    yield from walk(model, prefix, None, "")


REGEX_TIMEOUT_S = 1.0  # a pattern that backtracks catastrophically (e.g. "(.*)*x") is stopped, not waited for


def _match(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        try:
            return regex.fullmatch(pattern[3:], name, timeout=REGEX_TIMEOUT_S) is not None
        except TimeoutError:
            raise ValueError(f"target pattern {pattern!r} took over {REGEX_TIMEOUT_S:g} s on module name {name!r} "
                             "(catastrophic backtracking); expected a regular expression without nested repetition") from None
        except regex.error as err:
            raise ValueError(f"target pattern {pattern!r}: not a valid regular expression ({err})") from None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def resolve_targets(model: nn.Module, patterns: str | list[str] | None, what: str = "target_modules") -> list[Target]:
    """Resolve patterns to targets, in model order. Raises if a pattern matches nothing."""
    if patterns is None:
        points = sorted(declared_points(model))
        hint = f"; this model declares adapter points {['@' + p for p in points]}" if points else ""
        raise ValueError(f"{what} is not set: name the modules to adapt{hint}")
    if isinstance(patterns, str):
        patterns = [patterns]
    modules = [(n, m, p) for n, m, p, _ in iter_logical_modules(model)]
    points = declared_points(model)

    seen: dict[str, int] = {}
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"{what}[{i}]: {pattern!r} is not a pattern; expected a module name, suffix, glob, "
                             "'re:' regex or '@point'")
        if pattern in seen:
            raise ValueError(f"{what}[{i}]: {pattern!r} repeats {what}[{seen[pattern]}]; list each pattern once")
        seen[pattern] = i
    chosen: dict[str, Target] = {}
    for pattern in patterns:
        expanded: list[tuple[str, AdapterPoint | None]]
        if pattern.startswith("@"):
            if pattern[1:] not in points:
                raise ValueError(
                    f"{what}: adapter point {pattern!r} is not declared by this model; "
                    f"declared: {sorted('@' + p for p in points) or 'none'}"
                )
            expanded = []
            for prefix, point in points[pattern[1:]]:
                for pat in point.patterns:
                    if prefix:  # point patterns are relative to the declaring submodule
                        pat = f"re:{re.escape(prefix)}\\.(?:{pat[3:]})" if pat.startswith("re:") else f"{prefix}.{pat}"
                    expanded.append((pat, point))
        else:
            expanded = [(pattern, None)]
        hits = 0
        for pat, point in expanded:
            for name, module, parent in modules:
                if not name or not _match(pat, name):
                    continue
                hits += 1
                parts: set[str] = set()
                if isinstance(parent, nn.MultiheadAttention) and name.endswith(".out_proj"):
                    name, module, parts = name[: -len(".out_proj")], parent, {"out_proj"}
                elif isinstance(module, nn.MultiheadAttention):
                    parts = {"in_proj", "out_proj"}
                target = chosen.setdefault(name, Target(name, module))
                target.parts |= parts
                if point is not None and point.dim is not None:
                    target.dim = point.dim
                if point is not None and point.batch_dim is not None:
                    target.batch_dim = point.batch_dim
        if hits == 0:
            raise ValueError(f"{what}: pattern {pattern!r} matched no module of {type(model).__name__}")
    order = {n: i for i, (n, _, _) in enumerate(modules)}
    return sorted(chosen.values(), key=lambda t: order[t.name])

