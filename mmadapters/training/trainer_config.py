"""``TrainerConfig``: the ``trainer:`` section of a training YAML (torch-free; re-exported by ``trainer``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

# Fields that may change between a run and its --resume: they do not change what is computed.
RESUMABLE_CHANGES = ("steps", "progress", "log_every", "eval_every", "checkpoint_every", "max_minutes")


@dataclass
class TrainerConfig:
    """How adapters are trained; the recipe decides what is trained (its own ``recipe:`` section)."""

    steps: int = field(default=1000, metadata={"help": "Optimizer steps (0: only validate and save the initial adapters)."})
    batch_size: int = field(default=32, metadata={
        "help": "GLOBAL batch size: the items of one optimizer step, split evenly over the ranks under torchrun."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate of AdamW."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's decoupled weight decay."})
    no_decay: list[str] = field(default_factory=list, metadata={
        "help": "Trainable parameter names (fnmatch patterns, e.g. '*.bias', '*ln_*', 'logit_scale') that get no weight "
                "decay: norms, biases, embeddings and temperatures in CLIP-style pretraining."})
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW's (beta1, beta2)."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW's epsilon (Tip-Adapter-F's official code: 1e-4)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Fraction of the steps with a linear warmup from ~0 to lr."})
    schedule: Literal["constant", "linear", "cosine", "step"] = field(default="linear", metadata={
        "help": "Learning rate after the warmup: constant, linear decay to 0, cosine decay to 0, or step (multiplied "
                "by step_gamma every step_every steps, as torch's StepLR)."})
    step_every: int | None = field(default=None, metadata={
        "help": "schedule: step: decay the learning rate every this many steps after the warmup (required there)."})
    step_gamma: float = field(default=0.5, metadata={"help": "schedule: step: the factor of each decay, in (0, 1]."})
    grad_accum_steps: int = field(default=1, metadata={
        "help": "Split each optimizer step's batch into this many micro-batches whose gradients are accumulated: the "
                "same items and (up to float rounding) the same update as one big batch, with less memory. "
                "batch_size must divide by grad_accum_steps x the number of ranks."})
    precision: Literal["fp32", "bf16", "fp16"] = field(default="fp32", metadata={
        "help": "Training forward passes in fp32, or under torch.autocast in bf16 or fp16 (fp16 with a gradient "
                "scaler, checkpointed for --resume); the trained parameters stay fp32. Works on CPU and CUDA."})
    group_batches: bool = field(default=True, metadata={
        "help": "When the task defines batch_groups() (e.g. VL-Adapter: its tasks), draw every batch from one group; "
                "false: batches mix the groups."})
    grad_clip: float | None = field(default=1.0, metadata={"help": "Clip the global gradient norm to this (null: no clipping)."})
    eval_every: int = field(default=100, metadata={"help": "Validate every this many steps (and at the end); 0: only at the end."})
    checkpoint_every: int = field(default=100, metadata={
        "help": "Write train_state.pt every this many steps (and at the end); 0: only at the end."})
    max_minutes: float | None = field(default=None, metadata={
        "help": "Wall-time budget (training, validation and checkpoints; earlier sessions of a resumed run included): "
                "the step that reaches it is the last, and the learning-rate decay follows the budget when it is "
                "further along than the steps (null: no budget)."})
    log_every: int = field(default=10, metadata={"help": "Record the training loss in history.jsonl every this many steps."})
    seed: int = field(default=0, metadata={"help": "Seeds the data order, dropout and every other random choice."})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ... (under torchrun, cuda means each rank's GPU)."})
    select_metric: str | None = field(default=None, metadata={
        "help": "Validation metric that picks best/ (default: the recipe's)."})
    select_mode: Literal["max", "min"] | None = field(default=None, metadata={
        "help": "Whether a larger (max) or smaller (min) select_metric is better (default: the recipe's)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar (rank 0)."})
    find_unused_parameters: bool = field(default=False, metadata={
        "help": "Under torchrun: set when some trainable parameters get no gradient in a step (DDP must then search "
                "the graph for them, which costs time)."})

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first out-of-range field."""

        def bad(name: str, expected: str) -> None:
            err = ValueError(f"trainer.{name}: expected {expected}, got {getattr(self, name)!r}")
            err.field = name  # config_io names where the value came from (the file or a --set)
            raise err

        for name in ("steps", "eval_every", "checkpoint_every", "seed"):
            if getattr(self, name) < 0:
                bad(name, "an integer >= 0")
        for name in ("batch_size", "log_every", "grad_accum_steps"):
            if getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            bad("lr", "a finite number >= 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            bad("weight_decay", "a finite number >= 0")
        if not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in self.adam_betas):
            bad("adam_betas", "two numbers in [0, 1)")
        if not (math.isfinite(self.adam_eps) and self.adam_eps > 0):
            bad("adam_eps", "a positive number")
        if not all(isinstance(p, str) and p for p in self.no_decay):
            bad("no_decay", "a list of non-empty fnmatch patterns of parameter names")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            bad("warmup_ratio", "a number in [0, 1]")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            bad("grad_clip", "a positive number or null")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            bad("max_minutes", "a positive number of minutes or null")
        if self.schedule not in ("constant", "linear", "cosine", "step"):
            bad("schedule", "'constant', 'linear', 'cosine' or 'step'")
        if self.schedule == "step" and (self.step_every is None or self.step_every < 1):
            bad("step_every", "an integer >= 1 with schedule: step (decay every this many steps)")
        if self.step_every is not None and self.step_every < 1:
            bad("step_every", "an integer >= 1 or null")
        if not (math.isfinite(self.step_gamma) and 0.0 < self.step_gamma <= 1.0):
            bad("step_gamma", "a number in (0, 1]")
        if self.precision not in ("fp32", "bf16", "fp16"):
            bad("precision", "'fp32', 'bf16' or 'fp16'")
        if self.select_mode not in (None, "max", "min"):
            bad("select_mode", "'max', 'min' or null")
        if not self.device:
            bad("device", "a device name such as cpu or cuda")
