"""Typed configs from YAML: dataclasses filled from mappings, with errors that name the file and the field.

``from_mapping(TrainerConfig, {"steps": 10}, source="run.yaml", path="trainer")`` checks every value against
the field's annotation (nested dataclasses, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``,
``Literal[...]``, ``int``/``float``/``bool``/``str``/``Path``/``Any``) and rejects unknown keys::

    run.yaml: trainer.stpes: unknown key (expected one of: batch_size, ..., steps, ...; did you mean 'steps'?)

``bool`` is not accepted for an ``int`` (YAML's ``yes`` is no step count); an ``int`` is fine for a ``float``,
and so is a numeric string, since YAML 1.1 (PyYAML) reads ``3e-4`` (no dot) as the string ``"3e-4"``.

Messages name where a value came from: the file, or the ``--set KEY=VALUE`` that overrode it (:class:`Origins`).
YAML anchors and aliases are allowed up to :data:`MAX_EXPANDED_NODES` nodes once every alias is expanded (an
"alias bomb" of 2 KB expands to billions; it is refused before anything is built from it), never recursively.

Torch-free: the command line validates a config before any model is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = ["ConfigError", "MAX_EXPANDED_NODES", "Origins", "apply_overrides", "dump_yaml", "from_mapping", "load_yaml",
           "to_mapping"]

# A training config has tens of values; a list of this many expanded nodes is no config but an alias bomb.
MAX_EXPANDED_NODES = 100_000


class ConfigError(ValueError):
    """A config that does not fit its dataclass: the message names the file, the dotted field path and what was expected."""


class Origins(str):
    """The name of a config's file (it *is* that string) that also knows which dotted paths ``--set`` overrode.

    ``origins.at("recipe.lr")`` is ``"--set recipe.lr=0.1"`` when that flag set the value (or the section holding
    it), else the file's name. A path that only ``--set`` created (``foo`` for ``--set foo.bar=1``) is blamed on
    the flag too."""

    overrides: dict[str, str]
    created: dict[str, str]

    def __new__(cls, source: str, overrides: list[str] = (), data: Mapping | None = None,
                flags: Mapping[str, str] | None = None) -> Origins:
        """``overrides``: the ``--set`` items in order; ``data``: the file's mapping (before they were applied);
        ``flags``: dotted path -> the other flag that set it last (``{"trainer.device": "--device cuda"}``)."""
        self = super().__new__(cls, source)
        self.overrides, self.created = {}, {}
        for item in overrides:
            key = ".".join(p.strip() for p in item.partition("=")[0].split("."))
            self.overrides[key] = f"--set {item}"
            node: Any = data if data is not None else {}
            parts = key.split(".")
            for depth in range(len(parts) - 1):  # the sections this key adds to the file's
                node = node.get(parts[depth]) if isinstance(node, Mapping) else None
                if node is None:
                    for d in range(depth, len(parts) - 1):
                        self.created.setdefault(".".join(parts[: d + 1]), f"--set {item}")
                    break
        self.overrides.update(flags or {})
        return self

    def at(self, path: str) -> str:
        parts = path.split(".") if path else []
        for n in range(len(parts), 0, -1):  # the longest --set key that holds this path
            found = self.overrides.get(".".join(parts[:n]))
            if found is not None:
                return found
        return self.created.get(path, str(self))


def _where(source: str, path: str) -> str:
    if isinstance(source, Origins):
        source = source.at(path)
    return f"{source}: {path}" if path else source


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit
        return f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(tp: Any) -> str:
    """A reader's name for an annotation: ``int``, ``list[str]``, ``'max' | 'min'``, ``TrainerConfig``."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = typing.get_args(tp)
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if args else getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


_EXPECT = {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path (string)"}


def _scalar(tp: type, value: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        try:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                return float(value.strip())
        except (ValueError, OverflowError):
            pass
    elif tp in (str, Path):
        if isinstance(value, str):
            return tp(value)
    raise ConfigError(f"{where}: expected {_EXPECT[tp]}, got {_show(value)} ({type(value).__name__})")


def _parse(tp: Any, value: Any, source: str, path: str) -> Any:
    where = _where(source, path)
    if tp is Any or tp is object:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {_show(value)}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_mapping(tp, value, source=source, path=path)
    if tp in _EXPECT:
        return _scalar(tp, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        for choice in args:  # exact type too: YAML's true is not the literal 1
            if type(value) is type(choice) and value == choice:
                return choice
        raise ConfigError(f"{where}: expected one of {', '.join(repr(a) for a in args)}; got {_show(value)}")
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None:
            if len(options) < len(args):
                return None
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got null")
        if len(options) == 1:  # X | None: X's own message is the most precise
            return _parse(options[0], value, source, path)
        for option in options:
            try:
                return _parse(option, value, source, path)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)} ({type(value).__name__})")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list ({_type_name(tp)}), got {_show(value)} ({type(value).__name__})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} items ({_type_name(tp)}), got {len(value)}")
            return tuple(_parse(a, v, source, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        items = [_parse(item, v, source, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping ({_type_name(tp)}), got {_show(value)} ({type(value).__name__})")
        key_tp, val_tp = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            key = _parse(key_tp, k, source, path)
            out[key] = _parse(val_tp, v, source, f"{path}.{k}" if path else str(k))
        return out
    raise TypeError(f"{where}: the config class uses annotation {tp!r}, which config_io cannot parse")


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError) as err:
        raise TypeError(f"{cls.__name__}: cannot resolve its field annotations ({err})") from None


def from_mapping(cls: type, data: Any, *, source: str, path: str = "") -> Any:
    """An instance of dataclass ``cls`` from the mapping ``data``; every error is a :class:`ConfigError`.

    ``source`` names the file (or ``--set``) in messages, ``path`` the dotted position of ``data`` in it.
    Errors raised by the dataclass's own ``__post_init__`` checks (ValueError/TypeError) are re-raised as
    ConfigError with the same prefix."""
    where = _where(source, path)
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"from_mapping: {cls!r} is not a dataclass type")
    if not isinstance(data, Mapping):
        what = "the top level" if not path else "this section"
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields at {what}, "
                          f"got {_show(data)} ({type(data).__name__})")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    allowed = ", ".join(sorted(fields)) or "(none)"
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be strings, got {_show(key)} ({type(key).__name__}) "
                              f"(expected one of: {allowed})")
        sub = f"{path}.{key}" if path else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{_where(source, sub)}: unknown key (expected one of: {allowed}){hint}")
        kwargs[key] = _parse(hints[key], value, source, sub)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            sub = f"{path}.{name}" if path else name
            raise ConfigError(f"{_where(source, sub)}: missing required field (expected {_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        name = getattr(err, "field", None)  # a check that names its field (TrainerConfig's) also names its path
        if isinstance(name, str) and name in fields:
            sub = f"{path}.{name}" if path else name
            source_at = source.at(sub) if isinstance(source, Origins) else source
            raise ConfigError(f"{source_at}: {err}") from None
        raise ConfigError(f"{where}: {err}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, not a silent override, and
    that a document whose aliases expand past :data:`MAX_EXPANDED_NODES` nodes (or into themselves) is refused
    after composing (a graph as small as the text) and before constructing (where the copies would be made)."""

    def get_single_node(self):  # noqa: ANN201 - PyYAML's signature
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node


class _AliasBomb(ValueError):
    pass


def _check_expansion(root: yaml.Node) -> None:
    """Raise :class:`_AliasBomb` when ``root`` expanded as a tree (every alias copied) exceeds the budget or
    contains itself. Linear in the composed graph: each node's expanded size is computed once."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: deep nesting must not hit Python's recursion limit
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _children(node)
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > MAX_EXPANDED_NODES:
                raise _AliasBomb(f"its aliases expand to more than {MAX_EXPANDED_NODES:,} values (an alias bomb?); "
                                 "write the values out or use fewer nested aliases")
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise _AliasBomb(f"an alias refers to a node that contains it (line {node.start_mark.line + 1}): a recursive "
                             "structure is no config value")
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise _AliasBomb(f"an alias refers to a node that contains it (line {child.start_mark.line + 1}): a "
                                 "recursive structure is no config value")
            if id(child) not in sizes:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: let PyYAML report it
            break
        if duplicate:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_error(source: str, err: yaml.YAMLError) -> ConfigError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    detail = problem
    if context and not problem.startswith("duplicate key"):
        where = ""
        if context_mark is not None and mark is not None and context_mark.line != mark.line:
            where = f" (line {context_mark.line + 1}, column {context_mark.column + 1})"
        detail = f"{context}{where}: {problem}"
    if mark is not None:
        return ConfigError(f"{source}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {detail}")
    return ConfigError(f"{source}: YAML syntax error: {detail}")


def parse_yaml_text(text: str, source: str) -> dict:
    """The mapping in YAML ``text`` (an empty document is ``{}``); ``source`` names it in errors."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise _yaml_error(source, err) from None
    except _AliasBomb as err:
        raise ConfigError(f"{source}: refused: {err}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as err:  # e.g. a timestamp out of range
        raise ConfigError(f"{source}: unreadable YAML value ({type(err).__name__}: {err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping (key: value lines) at the top level, got {type(data).__name__}")
    return data


def load_yaml(path: str | os.PathLike) -> dict:
    """The top-level mapping of the YAML file ``path``. Syntax errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found" if not path.exists() else f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err})") from None
    return parse_yaml_text(text, str(path))


def apply_overrides(data: Mapping, overrides: list[str]) -> dict:
    """A copy of ``data`` with each ``"dotted.key=value"`` set; the value is read as YAML (``10``, ``3e-4``,
    ``null``, ``lora``, ``[1, 2]``). Intermediate sections are created when absent."""
    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not key.strip() or any(not p.strip() for p in parts):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. trainer.steps=10")
        parts = [p.strip() for p in parts]
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else None  # noqa: S506
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({getattr(err, 'problem', err)})") from None
        except _AliasBomb as err:
            raise ConfigError(f"--set {item!r}: refused: {err}") from None
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: depth + 1])} is {_show(child)}, not a section")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def to_mapping(obj: Any) -> Any:
    """Plain YAML/JSON-able data from a dataclass (recursively): tuples become lists, paths strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k) if isinstance(k, Path) else k: to_mapping(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return obj  # YAML writes .nan / .inf
    return obj


def dump_yaml(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` (a dataclass or mapping) as YAML to ``path``, atomically (temp file + rename)."""
    from mmadapters.io import atomic_write_bytes  # lazy: it imports torch

    text = yaml.safe_dump(to_mapping(obj), sort_keys=False, default_flow_style=False, allow_unicode=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))
