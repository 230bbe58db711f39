"""The training engine shared by every recipe (it knows no backbone).

- :mod:`.config_io`: typed dataclass configs from YAML (``ConfigError`` names file or ``--set``, dotted path,
  expectation; alias bombs refused);
- :mod:`.trainer_config`: ``TrainerConfig``, the ``trainer:`` section (torch-free);
- :mod:`.recipe`: ``Recipe`` and ``build_run_config`` for ``mmadapters train <recipe> --config FILE.yaml``;
- :mod:`.sampler`: the deterministic, world-size-independent data stream (mixed or one group per batch,
  micro-batches for gradient accumulation);
- :mod:`.checkpoint`: ``train_state.pt`` (atomic, ``weights_only`` loadable), the output-folder guard and lock;
- :mod:`.trainer`: ``train(task, config, output, resume=...)`` with DDP, precision (fp32/bf16/fp16), gradient
  accumulation, validation and best/ selection, a wall-time budget and an ``on_validated`` hook.

The public names are importable from here (``from mmadapters.training import TrainerConfig, train``). Importing
this package imports nothing heavy: the torch-free names load at once, ``train``, ``TrainTask``, ... (which
import torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config_io import ConfigError, apply_overrides, dump_yaml, from_mapping, load_yaml, to_mapping
from .recipe import Recipe, RunConfig, build_run_config, load_recipe
from .trainer_config import TrainerConfig

# name -> submodule, imported on first access (they import torch)
_LAZY = {
    "train": "trainer", "TrainTask": "trainer", "TrainSummary": "trainer", "seed_everything": "trainer",
    "lr_lambda": "trainer", "check_device": "trainer", "run_on_main": "trainer",
    "StepSampler": "sampler", "load_train_state": "checkpoint", "RunFolderBusy": "checkpoint", "run_lock": "checkpoint",
}

__all__ = ["ConfigError", "Recipe", "RunConfig", "TrainerConfig", "apply_overrides", "build_run_config", "dump_yaml",
           "from_mapping", "load_recipe", "load_yaml", "to_mapping", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
