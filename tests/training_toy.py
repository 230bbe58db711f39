"""A toy recipe for the training engine's tests: a frozen MLP regressor + a core adapter on generated data.

Also a script, so tests can run the engine in a subprocess (kill -9, torchrun)::

    python tests/training_toy.py [--ddp-report DIR] <mmadapters train arguments without the recipe name>

runs ``mmadapters train toy ...``; ``--ddp-report DIR`` first writes, per rank, what DDP registered
(``DIR/ddp.rank{r}.json``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mmadapters as mma
from mmadapters.training.recipe import Recipe
from mmadapters.training.trainer import TrainerConfig

ADAPTER = "toy"


@dataclass
class ToyConfig:
    n_train: int = field(default=48, metadata={"help": "training items"})
    n_val: int = field(default=24, metadata={"help": "validation items"})
    dim: int = 6
    hidden: int = 16
    method: Literal["lora", "bottleneck"] = "lora"
    rank: int = 4
    dropout: float = 0.1
    data_seed: int = 0
    step_sleep: float = 0.0  # seconds per training step (the kill -9 test needs time to kill)
    record_saves: bool = False  # append "rank R" to <output>/save_calls.log on every save
    nan_at_call: int | None = None  # the loss is NaN on this call of loss() (1-based)
    loss_factor: float = 1.0  # multiplies the loss: large gradients overflow fp16's initial loss scale
    tags: list[str] = field(default_factory=list)
    scales: dict[str, float] = field(default_factory=dict)


class MLP(nn.Module):
    """(B, dim) -> (B,) regressor."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 1)
        mma.declare_adapter_points(self, {"hidden": "fc1", "mid": "fc2"})

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x))))).squeeze(-1)


def make_data(n: int, dim: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.linspace(-1.0, 1.0, dim)
    return x, torch.sin(x @ w) + 0.5 * x[:, 0] * x[:, 1]


class ToyTask:
    select_metric = "mse"
    select_mode = "min"

    def __init__(self, config: ToyConfig, trainer: TrainerConfig):
        self.config = config
        self.device = torch.device(trainer.device)
        with torch.random.fork_rng(devices=[]):  # the frozen base is the same whatever the trainer seed
            torch.manual_seed(1234 + config.data_seed)
            model = MLP(config.dim, config.hidden)
        if config.method == "lora":
            adapter = mma.LoRAConfig(r=config.rank, alpha=2.0 * config.rank, dropout=config.dropout, target_modules=["fc1", "fc2"])
        else:
            adapter = mma.BottleneckConfig(bottleneck_dim=config.rank, dropout=config.dropout, target_modules=["@hidden", "@mid"])
        mma.add_adapter(model, ADAPTER, adapter)
        mma.freeze_base(model)
        self.model = model.to(self.device)
        self.train_x, self.train_y = make_data(config.n_train, config.dim, config.data_seed)
        self.val_x, self.val_y = make_data(config.n_val, config.dim, config.data_seed + 1)
        self.calls = 0

    def train_size(self) -> int:
        return len(self.train_x)

    def get_batch(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        idx = torch.tensor(indices, dtype=torch.long)
        return self.train_x[idx].to(self.device), self.train_y[idx].to(self.device)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        self.calls += 1
        if self.config.step_sleep:
            time.sleep(self.config.step_sleep)
        x, y = batch
        loss = F.mse_loss(model(x), y) * self.config.loss_factor
        if self.config.nan_at_call == self.calls:
            loss = loss * float("nan")
        return loss

    def validate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            pred = self.model(self.val_x.to(self.device))
        mse = F.mse_loss(pred, self.val_y.to(self.device)).item()
        return {"mse": mse, "mae": (pred - self.val_y.to(self.device)).abs().mean().item()}

    def save(self, directory: Path) -> None:
        mma.save_adapter(self.model, ADAPTER, directory)
        if self.config.record_saves:
            with open(Path(directory).parent / "save_calls.log", "a") as f:
                f.write(f"rank {os.environ.get('RANK', '0')}\n")

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"trainable": trainable, "total": sum(p.numel() for p in self.model.parameters())}


def build_toy_task(config: ToyConfig, trainer: TrainerConfig) -> ToyTask:
    return ToyTask(config, trainer)


TOY_RECIPE = Recipe(name="toy", config_class=ToyConfig, build_task=build_toy_task,
                    trainer_defaults={"lr": 0.01, "batch_size": 8, "log_every": 1, "progress": False},
                    description="toy: LoRA on a frozen MLP regressor (engine tests)")


def run_toy(output: str | Path, *, recipe: dict | None = None, resume: bool = False, **trainer: object):
    """Train the toy in this process the way ``mmadapters train toy`` does. Returns (task, summary)."""
    from mmadapters.training.trainer import seed_everything, train

    config = TrainerConfig(**{**TOY_RECIPE.trainer_defaults, "steps": 12, "eval_every": 4, "checkpoint_every": 4, **trainer})
    seed_everything(config.seed, 0)
    task = build_toy_task(ToyConfig(**(recipe or {})), config)
    return task, train(task, config, output, resume=resume)


def trained_adapter(directory: str | Path) -> dict[str, Tensor]:
    """The saved adapter tensors of a run folder's best/ or last/."""
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def _ddp_report(directory: Path) -> None:
    from mmadapters import distributed
    from mmadapters.training.trainer import seed_everything, wrap_for_training

    distributed.init_from_env("cpu")
    trainer = TrainerConfig(device="cpu")
    seed_everything(0, 0)
    task = build_toy_task(ToyConfig(dropout=0.0), trainer)
    ddp = wrap_for_training(task, trainer)
    data = ddp._get_ddp_logging_data()
    trainable = [p for p in task.model.parameters() if p.requires_grad]
    report = {"type": type(ddp).__name__, "num_parameter_tensors": data["num_parameter_tensors"],
              "total_parameter_size_bytes": data["total_parameter_size_bytes"],
              "broadcast_buffers": data["broadcast_buffers"], "trainable_tensors": len(trainable),
              "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
              "all_tensors": len(list(task.model.parameters()))}
    (directory / f"ddp.rank{distributed.rank()}.json").write_text(json.dumps(report))
    del ddp


def main(argv: list[str]) -> int:
    from mmadapters.eval import train_cli

    if argv[:1] == ["--ddp-report"]:
        _ddp_report(Path(argv[1]))
        argv = argv[2:]
    train_cli.register_recipe("toy", "training_toy:TOY_RECIPE")
    return train_cli.main(["toy", *argv])


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))
