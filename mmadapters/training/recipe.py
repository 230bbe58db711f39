"""A training recipe: its typed config section and how it builds a :class:`~mmadapters.training.trainer.TrainTask`.

``mmadapters train <recipe> --config run.yaml`` reads::

    output: runs/my-run          # run directory (or --output)
    trainer: {steps: 200, batch_size: 16, lr: 3.0e-4, eval_every: 50}
    recipe:  {...}               # the recipe's own config_class

:func:`build_run_config` turns that mapping into a :class:`RunConfig`: the recipe's ``trainer_defaults`` go
under the file's ``trainer:`` values, and every section is checked by :mod:`.config_io`. Torch-free.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config_io import ConfigError, _where, from_mapping, to_mapping
from .trainer_config import TrainerConfig

if TYPE_CHECKING:
    from .trainer import TrainTask

__all__ = ["Recipe", "RunConfig", "build_run_config", "load_recipe"]

SECTIONS = ("output", "trainer", "recipe")


@dataclass(frozen=True)
class Recipe:
    """One paper's training procedure, as the engine sees it."""

    name: str
    config_class: type  # dataclass of the YAML's `recipe:` section
    build_task: Callable[[Any, TrainerConfig], TrainTask]  # (recipe config, trainer config) -> task on trainer.device
    trainer_defaults: dict = field(default_factory=dict)  # recipe-specific defaults for TrainerConfig fields
    description: str = ""

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.config_class):
            raise TypeError(f"Recipe {self.name!r}: config_class must be a dataclass, got {self.config_class!r}")
        known = {f.name for f in dataclasses.fields(TrainerConfig)}
        unknown = sorted(set(self.trainer_defaults) - known)
        if unknown:
            raise TypeError(f"Recipe {self.name!r}: trainer_defaults has unknown TrainerConfig field(s) {unknown}")


@dataclass
class RunConfig:
    """A whole run: where it writes, how it trains, what it trains."""

    output: str
    trainer: TrainerConfig
    recipe: Any  # the recipe's config_class instance

    def to_mapping(self) -> dict[str, Any]:
        return {"output": self.output, "trainer": to_mapping(self.trainer), "recipe": to_mapping(self.recipe)}


def build_run_config(recipe: Recipe, data: Mapping[str, Any], *, source: str, output: str | None = None,
                     device: str | None = None) -> RunConfig:
    """Check ``data`` (the YAML's top level, overrides applied) against ``recipe``; ``output``/``device`` (the
    command-line flags) win over the file's values. Errors are :class:`ConfigError` naming ``source`` (a file name,
    or :class:`~.config_io.Origins` to blame values that ``--set`` gave on the flag) and the path."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"{_where(source, str(key))}: unknown key (expected one of: {', '.join(SECTIONS)})")
    out = output if output is not None else data.get("output")
    if out is None:
        raise ConfigError(f"{source}: output: missing (set `output:` in the file or pass --output DIR)")
    if not isinstance(out, str) or not out.strip():
        where = "--output" if output is not None else _where(source, "output")
        raise ConfigError(f"{where}: expected a directory path (string), got {out!r}")
    trainer_data = data.get("trainer") or {}
    if not isinstance(trainer_data, Mapping):
        raise ConfigError(f"{_where(source, 'trainer')}: expected a mapping of TrainerConfig fields, "
                          f"got {type(trainer_data).__name__}")
    merged = {**recipe.trainer_defaults, **trainer_data}
    if device is not None:
        merged["device"] = device
    trainer = from_mapping(TrainerConfig, merged, source=source, path="trainer")
    recipe_data = data.get("recipe")
    recipe_config = from_mapping(recipe.config_class, {} if recipe_data is None else recipe_data, source=source, path="recipe")
    return RunConfig(output=out, trainer=trainer, recipe=recipe_config)


def load_recipe(name: str, target: str) -> Recipe:
    """Import ``"module:attribute"`` and check that it is a :class:`Recipe`."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"recipe {name!r}: target {target!r} is not of the form 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"recipe {name!r}: cannot import {module_name} ({type(err).__name__}: {err})") from None
    try:
        recipe = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"recipe {name!r}: {module_name} has no attribute {attr!r}") from None
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe {name!r}: {target} is a {type(recipe).__name__}, not a mmadapters.training.recipe.Recipe")
    return recipe
