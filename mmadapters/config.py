"""Adapter configs: the shared base dataclass, (de)serialization and the method registry.

Every method module defines a dataclass that subclasses :class:`AdapterConfig` and registers itself
with :func:`register_method` (as peft's ``register_peft_method`` does), so adding a method touches
one file and one registration line.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

_REGISTRY: dict[str, MethodSpec] = {}


@dataclass(frozen=True)
class MethodSpec:
    """What the core needs to know about a method: its config class and how to build units."""

    name: str
    config_cls: type[AdapterConfig]
    build_units: Any  # callable(model, adapter_name, config, targets) -> list[(module_name, unit)]


def register_method(name: str, config_cls: type[AdapterConfig], build_units: Any) -> None:
    """Register a method under ``name``. Re-registering the same name replaces it (useful in tests)."""
    if not dataclasses.is_dataclass(config_cls) or not issubclass(config_cls, AdapterConfig):
        raise TypeError(f"register_method({name!r}): config_cls must be an AdapterConfig dataclass")
    config_cls.method = name
    _REGISTRY[name] = MethodSpec(name, config_cls, build_units)


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise KeyError(f"unknown adapter method {name!r}; registered methods: {known}") from None


def registered_methods() -> list[str]:
    return sorted(_REGISTRY)


def _help(text: str, default: Any):
    return field(default=default, metadata={"help": text})


TARGET_MODULES_HELP = (
    "Modules to adapt: exact names, name suffixes ('attn.out_proj' matches 'blocks.0.attn.out_proj'), "
    "glob patterns ('blocks.*.mlp.fc1'), 're:<regex>' full-match patterns, or '@point' names of adapter "
    "points the backbone declares ('@ffn_out'). A single string is one pattern."
)


def target_modules_field():
    """Each method declares ``target_modules`` where its signature wants it (LoRA: after dropout)."""
    return field(default=None, metadata={"help": TARGET_MODULES_HELP})


@dataclass(kw_only=True)
class AdapterConfig:
    """The options usable with any method (keyword-only). Subclasses add ``target_modules`` and their own fields."""

    method: ClassVar[str] = "base"

    train_norms: bool = _help(
        "Also learn per-adapter deltas for the weight and bias of every normalization layer "
        "(LayerNorm, GroupNorm, BatchNorm, RMSNorm, and leaf classes named *LayerNorm / *RMSNorm such as T5LayerNorm). "
        "Deltas start at zero, so outputs are unchanged.",
        False,
    )
    train_biases: str = _help(
        "BitFit: learn per-adapter bias deltas. 'none', 'adapted' (biases of the adapted modules) or "
        "'all' (every bias in the model).",
        "none",
    )
    gate: bool = _help(
        "Multiply each adapter's change by a learnable scalar gate initialized to zero (LLaMA-Adapter "
        "style). The adapter's own output layer is then randomly initialized so gradients can flow.",
        False,
    )

    def __post_init__(self) -> None:
        targets = getattr(self, "target_modules", None)
        if isinstance(targets, tuple):
            self.target_modules = list(targets)
        elif targets is not None and not isinstance(targets, str | list):
            raise TypeError(f"{type(self).__name__}.target_modules: expected a string or a list of strings, "
                            f"got {type(targets).__name__}")
        if self.train_biases not in ("none", "adapted", "all"):
            raise ValueError(
                f"{type(self).__name__}.train_biases: expected 'none', 'adapted' or 'all', "
                f"got {self.train_biases!r}"
            )

    # -- serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> AdapterConfig:
        """Build the right config class from a dict; unknown keys are an error naming ``source``."""
        if not isinstance(data, dict):
            raise TypeError(f"{source}: expected a JSON object for the adapter config, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", None)
        if method is None:
            raise ValueError(f"{source}: field 'method' is missing (expected one of {registered_methods()})")
        if not isinstance(method, str):
            raise ValueError(f"{source}: field 'method' is {type(method).__name__} ({method!r}); expected one of "
                             f"{registered_methods()}")
        try:
            spec = get_method(method)
        except KeyError as err:
            raise ValueError(f"{source}: field 'method': {err.args[0]}") from None
        known = {f.name for f in dataclasses.fields(spec.config_cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ValueError(
                f"{source}: unknown field(s) {unknown} for method {method!r}; known fields: {sorted(known)}"
            )
        hints = _field_types(spec.config_cls)
        for name, value in data.items():
            if name in hints and not _matches(value, hints[name]):
                raise ValueError(f"{source}: field {name!r} = {_short(value)}; expected {_type_name(hints[name])} "
                                 f"(method {method!r})")
        try:
            return spec.config_cls(**data)
        except (TypeError, ValueError) as err:  # the method's own checks (a positive rank, a known placement, ...)
            raise ValueError(f"{source}: {err}") from None

    def help(self) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(self)}


def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of a config dataclass (empty when annotations cannot be resolved)."""
    try:
        return typing.get_type_hints(cls)  # each class's annotations resolved in its own module
    except Exception:  # an annotation naming something not importable here: skip the type checks
        return {}


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits an annotation (bool is not an int; an int is a float; a list is a tuple).
    Annotations this does not understand accept anything (the config's own checks still run)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return True


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type) and not typing.get_args(hint):
        return {"bool": "true/false", "int": "an integer", "float": "a number", "str": "a string"}.get(hint.__name__,
                                                                                                      hint.__name__)
    return str(hint).replace("typing.", "")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_positive(config: AdapterConfig, name: str, allow_none: bool = False) -> None:
    value = getattr(config, name)
    if value is None and allow_none:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{type(config).__name__}.{name}: expected a positive number, got {value!r}")


def check_choice(config: AdapterConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{type(config).__name__}.{name}: expected one of {choices}, got {value!r}")


_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_adapter_name(name: str) -> None:
    """Adapter names become ModuleDict keys and file names: keep them simple."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"adapter name {name!r}: expected letters, digits, '_' or '-' (it is used as a module key)"
        )
