"""``mmadapters train vl-adapter``: the VL-Adapter recipe (:mod:`mmadapters.vision.vl_adapter`) on the training engine.

The engine (:mod:`mmadapters.training`) owns the loop — data order, AdamW, warmup and schedule, gradient
clipping, DDP, checkpoints, ``--resume``, best-checkpoint selection. This module supplies what is VL-Adapter's:

- :class:`VLTrainConfig`, the YAML's ``recipe:`` section: the data (a folder written by
  ``python -m mmadapters.vision.synth_vl`` or explicit per-task annotation files), the image features
  (an ``.h5`` file or a folder of ``<img_id>.safetensors``, or computed from the images with a CLIP), the
  VL-T5 (default: the shipped tiny one), the variant and its sizes (every field of
  :class:`~mmadapters.vision.vl_variants.VariantConfig`) and the text lengths;
- :class:`VLTrainTask`, the engine's ``TrainTask``:

  * a training item is one sample of one task; the items of all tasks are concatenated (task order of
    ``tasks``) and ``batch_groups`` gives each item's task, so the engine draws every batch from one task, as the
    paper does (tasks take turns in shuffled rounds that pass over each task about once;
    ``--set trainer.group_batches=false`` mixes tasks in proportion to their sizes instead);
  * ``get_batch`` groups a batch's items by task (one :class:`~mmadapters.vision.vl_adapter.Batch` per task,
    built by :func:`~mmadapters.vision.vl_adapter.make_batch`: per variant, each task has its own adapter and
    its task prefix before the text — VL-Adapter's choice: prefixes for the variants whose tasks share
    adapters, none for full fine-tuning and per-task adapters, ``recipe.task_prefix`` to force it,
    :func:`~mmadapters.vision.vl_variants.uses_task_prefix`). The answer a VQA item trains on is drawn anew
    each time the question is drawn, in proportion to the answers' soft scores (``recipe.vqa_target: sample``,
    VL-T5's / VL-Adapter's VQA loader; ``best``: always the top answer), and the reference caption a captioning
    item trains on is drawn at random; both from a generator seeded by ``(seed, the batch's item indices)``, a
    pure function of the data position, so ``--resume`` and DDP ranks see the same draws (a question is drawn
    again in another batch of another epoch; only a batch of the very same items in the same order would repeat
    the draw);
  * ``loss`` runs each task group with its adapter active and returns the **item-weighted mean** of the
    groups' losses: ``sum_g n_g * loss_g / sum_g n_g`` (``loss_g``: T5's mean token cross-entropy of group
    ``g``, ``n_g``: its number of items). It is therefore a mean over this rank's items, and DDP's average
    of the ranks' gradients is the gradient of the global batch's mean when the ranks hold equal shares (the
    engine cuts every global batch evenly). Items whose features are unusable (NaN values, a wrong shape)
    are dropped from the batch and counted in ``skipped_training_items``; samples whose images have no
    features at all are left out when the task is built (reported once);
  * ``validate`` generates greedily on each task's validation split (at most ``max_val_samples`` per task)
    with ``mmadapters eval``'s own predictor and metrics and returns ``vqa_accuracy``, ``gqa_accuracy``,
    ``nlvr_accuracy``, ``caption_cider`` and ``caption_bleu4`` and ``average``, the mean of the tasks'
    headlines (tasks without a score left out). All are fractions on ``mmadapters eval``'s scale
    (accuracies in [0, 1], CIDEr as pycocoevalcap computes it); ``average`` x 100 is the paper's average.
    The best checkpoint is selected on ``average`` (max) — on the validation split only;
  * ``save`` writes :func:`~mmadapters.vision.vl_adapter.save_trained`'s layout: ``adapters/<name>/`` (the
    core's format, :func:`mmadapters.save_adapters`), ``trained_backbone.safetensors`` (the shared LayerNorms
    and visual projection the variant unfreezes; everything for ``full_ft``) and ``vl_adapter.json``;
    :func:`~mmadapters.vision.vl_adapter.load_trained` restores all of it onto a fresh VL-T5.

Trainer defaults are the paper's: AdamW, linear warmup over 10% of the steps then linear decay, gradient
clipping at 5, weight decay 0.01, learning rate 1e-3 (the single shared adapter's; use 3e-4 for
``multiple_adapters`` / ``half_shared_*``, 1e-4 for ``full_ft``: :data:`~mmadapters.vision.vl_adapter.DEFAULT_LR`).

Example (``configs/vl-adapter.yaml``)::

    python -m mmadapters.vision.synth_vl --out data/vl --n-images 60 --seed 0
    mmadapters train vl-adapter --config configs/vl-adapter.yaml
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmadapters import distributed
from mmadapters.training.recipe import Recipe

from .vl_adapter import (
    HEADLINE,
    SYNTH_FILES,
    TASK_PREFIX,
    VQA_TARGETS,
    Batch,
    FeatureCache,
    make_batch,
    open_feature_source,
    predict_records,
    read_split,
    save_trained,
    task_metrics,
)
from .vl_readers import VLSample, filter_with_features
from .vl_variants import TASKS, VariantConfig, VariantSetup, parameter_report, setup_variant

VAL_AVERAGE = "average"


def _help(text: str, default: Any = None, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class VLTrainConfig(VariantConfig):
    """The ``recipe:`` section of ``mmadapters train vl-adapter`` (the variant fields come from VariantConfig)."""

    data: str | None = _help("Folder written by `python -m mmadapters.vision.synth_vl` (or laid out like it: "
                             "vqa/karpathy_{train,val}.json, gqa/{train,valid}.json, nlvr/{train,valid}.json, "
                             "coco/dataset_coco.json, images/).")
    train_files: dict[str, str] = _help("Task -> training annotation file, overriding the data folder's "
                                        "(caption: a dataset_coco.json, its Karpathy 'train' + 'restval' images).",
                                        default_factory=dict)
    val_files: dict[str, str] = _help("Task -> validation annotation file, overriding the data folder's "
                                      "(caption: a dataset_coco.json, its Karpathy 'val' images).", default_factory=dict)
    features: str | None = _help("Image features: an .h5 file or a folder of <img_id>.safetensors (VL-T5's "
                                 "num_visual_tokens x visual_dim per image). None: computed from `images` with `clip_model`.")
    images: str | None = _help("Image folder for computed features (default: <data>/images).")
    image_pattern: str = _help("File name of an image inside `images`, with {img_id}.", "{img_id}.png")
    features_cache: str | None = _help("Computed features of every image in `images` are written once to this .h5 "
                                       "file (or folder of .safetensors) and read from it afterwards (also by `mmadapters "
                                       "eval --features`); None: computed per use and kept in memory only.")
    clip_model: str | None = _help("open_clip model computing the features (default: the CLIP the shipped VL-T5 was "
                                   "pretrained on, vision/assets/tiny_vlt5/feature_clip).")
    clip_pretrained: str | None = _help("Pretrained tag or weights file for `clip_model`.")
    model: str | None = _help("VL-T5 directory (default: the shipped tiny VL-T5).")
    max_train_samples: int | None = _help("Train on at most this many samples per task (None: all).")
    max_val_samples: int | None = _help("Validate on at most this many samples per task (None: all).", 200)
    eval_batch_size: int = _help("Generation batch size in validation.", 64)
    max_text_length: int = _help("Encoder tokens kept (task prefix, when the variant uses it, + question).", 40)
    vqa_target: Literal["sample", "best"] = _help(
        "VQA training target: 'sample' (the default, VL-T5's and VL-Adapter's loaders) draws an answer each time the "
        "question is drawn, with probability proportional to its soft score (the file's label, VQA's "
        "min(1, annotators / 3)); 'best' always trains on the best-scored answer (this recipe before).", "sample")
    max_target_length: int = _help("Target tokens kept in training.", 20)
    max_new_tokens: int = _help("Generation length in validation.", 20)
    on_bad_rows: Literal["skip", "raise"] = _help("Malformed annotation rows: skip and report them, or raise.", "skip")

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"VLTrainConfig.tasks: unknown task(s) {unknown}; expected some of {TASKS}")
        for name in ("train_files", "val_files"):
            bad = sorted(set(getattr(self, name)) - set(TASKS))
            if bad:
                raise ValueError(f"VLTrainConfig.{name}: unknown task(s) {bad}; expected keys among {TASKS}")
        if self.data is None:
            missing = [t for t in self.tasks if t not in self.train_files]
            if missing:
                raise ValueError(f"VLTrainConfig.data: no data folder and no train_files for task(s) {missing}; "
                                 "give `data` (a synth_vl folder) or a training file per task")
            if self.features is None and self.images is None:
                raise ValueError("VLTrainConfig.features: no feature source; give `features`, `images` or `data`")
        for name in ("eval_batch_size", "max_text_length", "max_target_length", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"VLTrainConfig.{name}: expected a positive integer, got {value!r}")
        for name in ("max_train_samples", "max_val_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"VLTrainConfig.{name}: expected None or a positive integer, got {value!r}")
        if self.vqa_target not in VQA_TARGETS:
            raise ValueError(f"VLTrainConfig.vqa_target: expected one of {list(VQA_TARGETS)}, got {self.vqa_target!r}")
        if "{img_id}" not in self.image_pattern:
            raise ValueError(f"VLTrainConfig.image_pattern: expected a file name with {{img_id}}, got {self.image_pattern!r}")

    def annotation_file(self, task: str, split: str) -> Path:
        """The file ``task``'s ``split`` ("train" or "val") is read from."""
        explicit = (self.train_files if split == "train" else self.val_files).get(task)
        if explicit is not None:
            return Path(explicit)
        if self.data is None:
            raise ValueError(f"VLTrainConfig.{split}_files: no {split} file for task {task!r} and no `data` folder")
        return Path(self.data) / SYNTH_FILES[task][split]


# ---------------------------------------------------------------------------------------------- the task


@dataclass
class VLTrainBatch:
    """One engine batch: a :class:`~mmadapters.vision.vl_adapter.Batch` per task present (in ``tasks`` order)."""

    parts: list[Batch]
    skipped: list[tuple[str, str]]  # (uid, reason) of items dropped from this batch

    @property
    def size(self) -> int:
        return sum(len(p.samples) for p in self.parts)


def validation_name(task: str, metric: str) -> str:
    """``vqa_accuracy``, ``gqa_accuracy``, ``nlvr_accuracy``, ``caption_cider``, ``caption_bleu4``."""
    return metric if metric.startswith(task) else f"{task}_{metric}"


def validation_scores(model: nn.Module, setup: VariantSetup, val: Mapping[str, Sequence[VLSample]],
                      features: Callable[[str], Tensor], config: VLTrainConfig) -> dict[str, float]:
    """``{"average", "vqa_accuracy", ...}`` of ``model`` on the ``val`` samples (task -> samples), as
    :meth:`VLTrainTask.validate` computes them: greedy generation and each task's metrics through the
    evaluation path of ``mmadapters eval`` (:func:`~mmadapters.vision.vl_adapter.predict_records`,
    :func:`~mmadapters.vision.vl_adapter.task_metrics`). Every score is a fraction on ``mmadapters eval``'s
    scale (accuracies in [0, 1], CIDEr as pycocoevalcap computes it); ``average`` is the mean of the tasks'
    headlines on that scale (x 100: the paper's average), tasks without a score left out, NaN when none has one."""
    metrics: dict[str, float] = {}
    headlines: list[float] = []
    for task in config.tasks:
        samples = val.get(task)
        if not samples:
            continue
        records, _ = predict_records(model, setup, task, samples, features, batch_size=config.eval_batch_size,
                                     max_text_length=config.max_text_length, max_new_tokens=config.max_new_tokens)
        scores, _ = task_metrics(task, records)
        for name, value in scores.items():
            metrics[validation_name(task, name)] = float(value)
        if not math.isnan(scores[HEADLINE[task]]):
            headlines.append(scores[HEADLINE[task]])
    return {VAL_AVERAGE: sum(headlines) / len(headlines) if headlines else math.nan, **metrics}


class VLTrainTask:
    """The engine's TrainTask for VL-Adapter (module docstring)."""

    select_metric = VAL_AVERAGE
    select_mode = "max"

    def __init__(self, config: VLTrainConfig, *, device: str | torch.device = "cpu", seed: int = 0, progress: bool = True):
        from .vlt5 import VLT5, resolve_vlt5_dir

        self.config, self.seed = config, seed
        self.device = distributed.device_for_rank(device)
        self.model_dir = resolve_vlt5_dir(config.model)
        torch.manual_seed(seed)  # the adapters' initialization
        self.model: nn.Module = VLT5.from_pretrained(self.model_dir, device=self.device, seed=seed)
        self.setup = setup_variant(self.model, config)
        self.model.train()
        self.data_report: dict[str, Any] = {"rows_skipped": {}, "no_features": {}}
        self.train: dict[str, list] = {}
        self.val: dict[str, list] = {}
        splits = {"train": self.train, "val": self.val}
        for task in config.tasks:
            for split, store in splits.items():
                path = config.annotation_file(task, split)
                if split == "val" and task not in config.val_files and not path.exists():
                    continue  # a data folder without this validation file: train only
                rows = read_split(task, path, split, on_error=config.on_bad_rows)
                if rows.skipped:
                    self.data_report["rows_skipped"][f"{path}[{split}]"] = len(rows.skipped)
                store[task] = rows
        images = config.images if config.images is not None else (Path(config.data) / "images" if config.data else None)
        self.source = open_feature_source(
            config.features, images=images, num_tokens=self.model.num_visual_tokens, visual_dim=self.model.visual_dim,
            clip_model=config.clip_model, clip_pretrained=config.clip_pretrained, image_pattern=config.image_pattern,
            cache=config.features_cache, device=self.device, progress=progress)
        self.features = FeatureCache(self.source)
        for split, store in splits.items():
            for task, rows in store.items():
                kept = filter_with_features(rows, self.source)
                if kept.skipped[len(rows.skipped):]:
                    self.data_report["no_features"][f"{task}[{split}]"] = len(kept.skipped) - len(rows.skipped)
                limit = config.max_train_samples if split == "train" else config.max_val_samples
                store[task] = list(kept)[:limit] if limit else list(kept)
        self.items: list[tuple[str, int]] = [(t, i) for t in config.tasks for i in range(len(self.train.get(t, ())))]
        if not self.items:
            raise ValueError(f"vl-adapter: no usable training sample in tasks {list(config.tasks)} "
                             f"(skipped: {self.data_report})")
        self.skipped_training_items = 0
        if distributed.is_main():
            if any(self.data_report.values()):
                print(f"vl-adapter: data left out: {self.data_report}", file=sys.stderr)
            print(f"vl-adapter: validation scores are fractions (accuracies 0-1, CIDEr as pycocoevalcap computes it, "
                  f"as in `mmadapters eval`); {VAL_AVERAGE} = their mean over the tasks' headlines "
                  f"({', '.join(validation_name(t, HEADLINE[t]) for t in config.tasks)}), x 100 = the paper's average",
                  file=sys.stderr)

    # -- the engine's protocol ------------------------------------------------------------------------------------
    def train_size(self) -> int:
        return len(self.items)

    def batch_groups(self) -> list[str]:
        """The task of each training item: the engine draws each batch from one task."""
        return [task for task, _ in self.items]

    def get_batch(self, indices: list[int]) -> VLTrainBatch:
        """The items at ``indices``, grouped by task: one tokenized, stacked :class:`Batch` per task."""
        rng = random.Random(f"vl-adapter:{self.seed}:{','.join(map(str, indices))}")  # VQA answer and caption draws
        by_task: dict[str, list] = {}
        for index in indices:
            task, i = self.items[index]
            by_task.setdefault(task, []).append(self.train[task][i])
        parts, skipped = [], []
        for task in self.config.tasks:
            if task in by_task:
                batch = make_batch(self.model, task, by_task[task], self.features, max_text_length=self.config.max_text_length,
                                   max_target_length=self.config.max_target_length, rng=rng, skipped=skipped,
                                   task_prefix=self.setup.task_prefix, vqa_target=self.config.vqa_target)
                if batch is not None:
                    parts.append(batch)
        self.skipped_training_items += len(skipped)
        return VLTrainBatch(parts, skipped)

    def loss(self, model: nn.Module, batch: VLTrainBatch) -> Tensor:
        """Item-weighted mean of the task groups' losses (module docstring); 0 (with a graph) for an empty batch."""
        if not batch.parts:  # every item unusable: a zero that still reaches every trainable parameter (DDP)
            return sum((p.sum() for p in self.model.parameters() if p.requires_grad), torch.zeros((), device=self.device)) * 0.0
        total = batch.size
        loss = torch.zeros((), device=self.device)
        for part in batch.parts:
            self.setup.activate(self.model, part.task)
            with self.setup.fusion(self.model, part.visual_feats):  # early fusion (LLaMA-Adapter V2) for this call only
                out = model(part.input_ids, part.attention_mask, part.visual_feats, labels=part.labels)
            loss = loss + out.loss * (len(part.samples) / total)
        return loss

    def validate(self) -> dict[str, float]:
        """Per-task validation scores and their average, all fractions (module docstring)."""
        return validation_scores(self.model, self.setup, self.val, self.features, self.config)

    def save(self, directory: Path) -> None:
        """``save_trained``'s layout (adapters in the core format + trained backbone parameters + vl_adapter.json)."""
        from mmadapters.training.config_io import to_mapping

        save_trained(self.model, self.setup, directory,
                     extra={"recipe": "vl-adapter", "model_dir": str(self.model_dir),
                            "task_prefixes": {t: TASK_PREFIX[t] for t in self.setup.tasks} if self.setup.task_prefix else {},
                            "vqa_target": self.config.vqa_target, "headline": HEADLINE, "config": to_mapping(self.config)})

    def parameter_counts(self) -> dict[str, int]:
        report = parameter_report(self.model, self.setup)
        return {"trainable": report.trainable, "total": report.backbone + report.adapters, "backbone": report.backbone,
                "adapters": report.adapters, "extras": report.extras}


def build_task(config: VLTrainConfig, trainer: Any) -> VLTrainTask:
    """The Recipe's factory: a :class:`VLTrainTask` on ``trainer.device`` seeded with ``trainer.seed``."""
    return VLTrainTask(config, device=trainer.device, seed=trainer.seed, progress=bool(getattr(trainer, "progress", True)))


TRAINER_DEFAULTS: Mapping[str, Any] = {"lr": 1e-3, "warmup_ratio": 0.1, "schedule": "linear", "grad_clip": 5.0,
                                       "weight_decay": 0.01, "select_metric": VAL_AVERAGE, "select_mode": "max",
                                       "find_unused_parameters": True}  # per-task adapters idle in batches without their task

RECIPE = Recipe(name="vl-adapter", config_class=VLTrainConfig, build_task=build_task, trainer_defaults=dict(TRAINER_DEFAULTS),
                description="VL-Adapter (Sung et al. 2022): multi-task VQA / GQA / NLVR2 / captioning adapters on VL-T5 "
                            "(shared, per-task, half-shared, Hyperformer, Compacter, PHM, LoRA, prompt, LLaMA-Adapter V2)")

__all__ = ["RECIPE", "TRAINER_DEFAULTS", "VAL_AVERAGE", "VLTrainBatch", "VLTrainConfig", "VLTrainTask", "build_task",
           "validation_name", "validation_scores"]
