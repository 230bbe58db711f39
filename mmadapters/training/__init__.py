"""The training engine shared by every recipe (it knows no backbone).

- :mod:`.config_io`: typed dataclass configs from YAML (``ConfigError`` names file, dotted path, expectation);
- :mod:`.trainer_config`: ``TrainerConfig``, the ``trainer:`` section (torch-free);
- :mod:`.recipe`: ``Recipe`` and ``build_run_config`` for ``mmadapters train <recipe> --config FILE.yaml``;
- :mod:`.sampler`: the deterministic, world-size-independent data stream;
- :mod:`.checkpoint`: ``train_state.pt`` (atomic, ``weights_only`` loadable) and the output-folder guard;
- :mod:`.trainer`: ``train(task, config, output, resume=...)`` with DDP, validation and best/ selection, a
  wall-time budget and an ``on_validated`` hook for recipes that keep per-validation outputs.

Importing this package imports nothing heavy; ``trainer`` and ``checkpoint`` import torch.
"""
