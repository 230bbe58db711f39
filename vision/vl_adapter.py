"""VL-Adapter (Sung et al. 2022): multi-task VL-T5 with shared adapters, Hyperformer, Compacter, LoRA, prompts.

The method, in the paper's order:

1. **Backbone.** VL-T5 (:mod:`mmadapters.vision.vlt5`): frozen CLIP grid features, projected by a trainable
   visual projection, are prepended to the T5 encoder's text embeddings.
2. **One generative format for every task.** The input is the task prefix (:data:`TASK_PREFIX`) and the
   question or statement; the output is the answer text — the best-scored answer for VQA, the answer for
   GQA, ``"true"``/``"false"`` for NLVR2, a caption (one of the references, drawn per step) for COCO.
3. **Adapters and their sharing** (:mod:`mmadapters.vision.vl_variants`): one of :data:`VARIANTS` is added,
   the backbone frozen except all LayerNorms and the visual projection.
4. **Multi-task training** (:func:`train_multitask`): every step takes a batch of one task (each epoch
   visits every task's batches once, in a random order, so tasks are sampled in proportion to their size)
   and activates that task's adapter; AdamW, linear warmup over 10% of the steps then linear decay, gradient
   clipping at 5; validation every ``eval_every`` steps selects the best checkpoint on the validation
   split only.
5. **Evaluation** (:func:`evaluate`): greedy decoding; VQA accuracy against the 10 human answers, GQA and
   NLVR2 exact-match accuracy, captioning BLEU-4 and CIDEr. Samples that cannot be used (missing image
   features, no answers) are skipped and counted, never silently dropped.

Learning rates (:data:`DEFAULT_LR`) are the paper's: full fine-tuning 1e-4, a single shared adapter 1e-3,
multiple adapters 3e-4, Hyperformer 1e-3, Compacter 1e-3. Not given there: half-shared adapters take the
per-task adapters' 3e-4, the plain PHM adapter Compacter's 1e-3, LoRA, prompt tuning and LLaMA-Adapter V2
(one adapter for all tasks, like the shared adapter; its own paper's schedule is for a 7B LLaMA) the single
adapter's 1e-3.

**Inputs** (:func:`read_split`, :func:`open_feature_source`, shared by ``mmadapters train vl-adapter`` and
``mmadapters eval vqa|gqa|nlvr|caption``): one task's annotation file through :mod:`mmadapters.eval.vl_readers`
(:data:`SYNTH_FILES`: where ``python -m mmadapters.vision.synth_vl`` puts them), and per-image CLIP grid
features from an ``.h5`` file or a folder of ``.safetensors`` or computed from the images with a CLIP.

LLaMA-Adapter V2's early fusion needs each sample's image inside the adapters, not only in the encoder
input: every forward (training) and generate (evaluation) call runs inside
:meth:`VariantSetup.fusion`, which feeds the batch's global visual features for that call only (a no-op
for the other variants). Pass ``setup`` to :func:`evaluate` for such a model, or it runs text-only prompts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import mmadapters as mma
from mmadapters import distributed
from mmadapters.eval.vl_metrics import caption_scores, exact_match_accuracy, vqa_accuracy, vqa_score_from_label
from mmadapters.io import atomic_write_bytes, read_json_object
from mmadapters.model import _all_adapter_param_ids

from .vl_variants import (
    TASKS,
    VARIANTS,
    VariantConfig,
    VariantParameters,
    VariantSetup,
    parameter_report,
    setup_variant,
)

if TYPE_CHECKING:
    from mmadapters.eval.vl_readers import FeatureSource, VLSample

TASK_PREFIX = {"vqa": "vqa: ", "gqa": "gqa: ", "nlvr": "nlvr: ", "caption": "caption: "}
DEFAULT_LR = {"full_ft": 1e-4, "multiple_adapters": 3e-4, "half_shared_down": 3e-4, "half_shared_up": 3e-4,
              "shared_adapter": 1e-3, "hyperformer": 1e-3, "compacter": 1e-3, "phm_adapter": 1e-3, "lora": 1e-3,
              "prompt": 1e-3, "llama_adapter_v2": 1e-3}
HEADLINE = {"vqa": "vqa_accuracy", "gqa": "accuracy", "nlvr": "accuracy", "caption": "cider"}


@dataclass
class VLAdapterConfig(VariantConfig):
    """One VL-Adapter run: the variant (fields of :class:`VariantConfig`) and how it trains and is evaluated."""

    lr: float | None = field(default=None, metadata={"help": "Peak learning rate; None: DEFAULT_LR[variant]."})
    epochs: int = field(default=20, metadata={"help": "Passes over every task's training data (paper: 20)."})
    steps: int | None = field(default=None, metadata={"help": "Optimizer steps; overrides epochs when set."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size (every batch holds one task)."})
    eval_batch_size: int = field(default=64, metadata={"help": "Generation batch size."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of the steps with linear warmup."})
    grad_clip: float = field(default=5.0, metadata={"help": "Maximum gradient norm."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=0, metadata={"help": "Seeds adapter initialization, batch order and caption draws."})
    eval_every: int = field(default=0, metadata={"help": "Validate every N steps; 0: at the end of every epoch."})
    max_val_samples: int | None = field(default=None, metadata={"help": "Validate on at most this many samples per task."})
    max_text_length: int = field(default=40, metadata={"help": "Input tokens (prefix + text) kept."})
    max_target_length: int = field(default=20, metadata={"help": "Target tokens kept in training."})
    max_new_tokens: int = field(default=20, metadata={"help": "Generation length."})
    device: str = field(default="cpu", metadata={"help": "Where the model trains."})
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("epochs", "batch_size", "eval_batch_size", "max_text_length", "max_target_length", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"VLAdapterConfig.{name}: expected a positive integer, got {value!r}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"VLAdapterConfig.steps: expected None or a positive integer, got {self.steps!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"VLAdapterConfig.warmup_ratio: expected a value in [0, 1), got {self.warmup_ratio!r}")
        if self.eval_every < 0:
            raise ValueError(f"VLAdapterConfig.eval_every: expected >= 0, got {self.eval_every!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.variant]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tasks"] = list(self.tasks)
        out["learning_rate"] = self.learning_rate
        return out


# ---------------------------------------------------------------------------------------------- inputs

class FeatureCache:
    """Remembers the features of each image (an h5 source reads from disk on every call)."""

    def __init__(self, source: FeatureSource):
        self.source = source
        self._cache: dict[str, Tensor] = {}

    def __call__(self, img_id: str) -> Tensor:
        if img_id not in self._cache:
            self._cache[img_id] = self.source(img_id)
        return self._cache[img_id]


def visual_input(sample: VLSample, features: Callable[[str], Tensor]) -> Tensor:
    """``(N, D)`` for one image, ``(I, N, D)`` for an image pair (NLVR2). Raises KeyError/ValueError from the source."""
    if not sample.img_ids:
        raise ValueError("no image id")
    feats = [features(i) for i in sample.img_ids]
    return feats[0] if len(feats) == 1 else torch.stack(feats)


def model_input(sample: VLSample) -> str:
    """The encoder's text: the task prefix, then the question or statement (nothing for captioning)."""
    return TASK_PREFIX[sample.task] + sample.text


def training_target(sample: VLSample, rng: random.Random) -> str:
    """The decoder's target: the best-scored answer (VQA), the answer (GQA), true/false (NLVR2), or one
    reference caption drawn at random (so every reference is learned over the epochs)."""
    if not sample.targets:
        raise ValueError("no training target")
    return rng.choice(sample.targets) if sample.task == "caption" else sample.targets[0]


@dataclass
class Batch:
    task: str
    samples: list  # the VLSamples used (bad ones removed)
    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    visual_feats: Tensor  # (B, N, D) or (B, I, N, D)
    labels: Tensor | None  # (B, T_out) with -100 at padding; None for generation


def make_batch(model: nn.Module, task: str, samples: Sequence[VLSample], features: Callable[[str], Tensor], *,
               max_text_length: int, max_target_length: int | None = None, rng: random.Random | None = None,
               skipped: list | None = None) -> Batch | None:
    """Tokenize and stack one task's samples; with ``rng`` also the training targets. Samples whose features
    or targets are unusable are appended to ``skipped`` as ``(uid, reason)``; None when none is left."""
    kept, feats, targets = [], [], []
    for s in samples:
        if s.task != task:
            raise ValueError(f"make_batch: sample {s.uid!r} is a {s.task!r} sample in a {task!r} batch")
        try:
            v = visual_input(s, features)
            if feats and v.shape != feats[0].shape:
                raise ValueError(f"features of shape {tuple(v.shape)}, the batch has {tuple(feats[0].shape)}")
            if rng is not None:
                targets.append(training_target(s, rng))
        except (KeyError, ValueError) as err:
            if skipped is not None:
                skipped.append((s.uid, str(err).strip("'\"")))
            continue
        kept.append(s)
        feats.append(v)
    if not kept:
        return None
    device = next(model.parameters()).device
    ids, mask = model.encode_text([model_input(s) for s in kept], max_length=max_text_length)
    labels = model.encode_targets(targets, max_length=max_target_length).to(device) if rng is not None else None
    return Batch(task, kept, ids.to(device), mask.to(device), torch.stack(feats).to(device), labels)


def task_batches(train: Mapping[str, Sequence[VLSample]], batch_size: int, rng: random.Random):
    """Endless stream of ``(task, samples)``: each epoch every task's shuffled batches once, interleaved at random."""
    while True:
        epoch = []
        for task, samples in train.items():
            order = list(samples)
            rng.shuffle(order)
            epoch += [(task, order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
        rng.shuffle(epoch)
        yield from epoch


def steps_per_epoch(train: Mapping[str, Sequence[VLSample]], batch_size: int) -> int:
    return sum(math.ceil(len(s) / batch_size) for s in train.values())


# ---------------------------------------------------------------------------------------------- data files and features

# The data folder of python -m mmadapters.vision.synth_vl (VL-T5's file names): task -> {split: relative path}.
SYNTH_FILES: dict[str, dict[str, str]] = {
    "vqa": {"train": "vqa/karpathy_train.json", "val": "vqa/karpathy_val.json", "test": "vqa/karpathy_test.json"},
    "gqa": {"train": "gqa/train.json", "val": "gqa/valid.json", "test": "gqa/testdev.json"},
    "nlvr": {"train": "nlvr/train.json", "val": "nlvr/valid.json", "test": "nlvr/test.json"},
    "caption": {"train": "coco/dataset_coco.json", "val": "coco/dataset_coco.json", "test": "coco/dataset_coco.json"},
}


def read_split(task: str, path: str | Path, split: str, *, on_error: str = "skip"):
    """One task's annotation file as a ``VLSplit`` (captioning: the Karpathy ``split`` of a dataset_coco.json)."""
    from mmadapters.eval import vl_readers

    if task == "caption":
        return vl_readers.read_coco_karpathy(path, (split,), on_error=on_error)
    reader = {"vqa": vl_readers.read_vqa, "gqa": vl_readers.read_gqa, "nlvr": vl_readers.read_nlvr2}[task]
    return reader(path, on_error=on_error)


def clip_encoder(clip_model: str | None, clip_pretrained: str | None, num_tokens: int,
                 device: str | torch.device = "cpu") -> Callable[[list], Tensor]:
    """``encode(list of PIL images) -> (B, num_tokens, width)`` CLIP grid features (:mod:`.vl_features`)."""
    from .clip import load_clip
    from .vl_features import clip_grid_features

    bundle = load_clip(clip_model, clip_pretrained, device=device)

    def encode(images: list) -> Tensor:
        batch = torch.stack([bundle.preprocess(im) for im in images]).to(device)
        return clip_grid_features(bundle.model, batch, num_tokens).cpu()

    return encode


def open_feature_source(features: str | Path | None, *, images: str | Path | None, num_tokens: int, visual_dim: int,
                        clip_model: str | None = None, clip_pretrained: str | None = None,
                        image_pattern: str = "{img_id}.png", cache: str | Path | None = None,
                        image_ids: Sequence[str] | None = None, device: str | torch.device = "cpu", progress: bool = False):
    """The per-image feature source a VL-T5 of ``(num_tokens, visual_dim)`` reads.

    ``features``: an ``.h5`` file or a folder of ``<img_id>.safetensors``. Without it the features are
    computed from ``images`` with the CLIP: into ``cache`` (``.h5`` or a folder; for the ``image_ids`` whose
    image files exist, default every image of the folder, so one cache serves training and every test split;
    rank 0 writes, the others wait) when given, else in memory on first use. A source whose
    shape differs from the model's raises ``ValueError`` naming both.
    """
    from mmadapters.eval.vl_readers import ImageFeatures, load_features

    if features is None and cache is not None and Path(cache).exists():
        features = cache
    if features is not None:
        source = load_features(features)
    else:
        if images is None:
            raise ValueError("no feature source: give features (an .h5 file or a folder of .safetensors) or images")
        images = Path(images)
        if not images.is_dir():
            raise FileNotFoundError(f"image folder not found: {images}")
        encode = clip_encoder(clip_model, clip_pretrained, num_tokens, device)
        if cache is None:
            return ImageFeatures(images, encode, image_pattern, dim=visual_dim, num_tokens=num_tokens)
        if distributed.is_main():
            _extract(images, image_pattern, image_ids, encode, Path(cache), progress)
        distributed.barrier()
        source = load_features(cache)
    if (source.num_tokens, source.dim) != (num_tokens, visual_dim):
        raise ValueError(f"{source}: features are {source.num_tokens} tokens x {source.dim}, the VL-T5 expects "
                         f"{num_tokens} x {visual_dim} (its vlt5.json)")
    return source


def _extract(images: Path, pattern: str, image_ids: Sequence[str] | None, encode: Callable[[list], Tensor], out: Path,
             progress: bool, batch_size: int = 32) -> None:
    """Write the features of the ``image_ids`` (None: every image matching ``pattern``) whose files exist to ``out``
    (``.h5``: one file, renamed into place; a folder: one ``<img_id>.safetensors`` each)."""
    if image_ids is None:
        from mmadapters.eval.vl_readers import ImageFeatures

        image_ids = ImageFeatures(images, lambda ims: torch.zeros(0), pattern).ids
    import os
    import tempfile

    from PIL import Image
    from safetensors.torch import save
    from tqdm.auto import tqdm

    from mmadapters.io import atomic_write_bytes

    paths = {i: images / pattern.replace("{img_id}", i) for i in dict.fromkeys(image_ids)}
    paths = {i: p for i, p in paths.items() if p.is_file() and "/" not in i and "\\" not in i and i not in (".", "..")}
    if not paths:
        raise FileNotFoundError(f"{images}: none of the {len(set(image_ids))} images asked for is there "
                                f"(pattern {pattern!r})")
    as_h5 = out.suffix.lower() in (".h5", ".hdf5")
    ids = sorted(paths)
    h5 = tmp = None
    if as_h5:
        import h5py

        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
        h5 = h5py.File(tmp, "w")
    else:
        out.mkdir(parents=True, exist_ok=True)
    try:
        for start in tqdm(range(0, len(ids), batch_size), desc=f"CLIP features -> {out.name}", disable=not progress):
            chunk = ids[start:start + batch_size]
            pil = []
            for i in chunk:
                with Image.open(paths[i]) as img:
                    pil.append(img.convert("RGB"))
            feats = encode(pil).float()
            for i, f in zip(chunk, feats, strict=True):
                if h5 is not None:
                    h5.create_dataset(i, data=f.numpy())
                else:
                    atomic_write_bytes(out / f"{i}.safetensors", save({"features": f.contiguous()}))
        if h5 is not None:
            h5.close()
            h5 = None
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
    finally:
        if h5 is not None:
            h5.close()
        if tmp is not None and tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------------------------- evaluation

def unscorable_reason(sample: VLSample) -> str | None:
    """Why ``sample`` cannot be scored (no human answers / label for VQA, no target otherwise), else None."""
    if sample.task == "vqa":
        return None if sample.answers or sample.label else "no human answers and no label to score against"
    return None if sample.targets else "no target to score against"


def evaluate(model: nn.Module, samples: Sequence[VLSample], features: Callable[[str], Tensor], task: str, *,
             setup: VariantSetup | None = None, batch_size: int = 64, max_new_tokens: int = 20,
             max_text_length: int = 40, return_predictions: bool = False, progress: bool = False) -> dict[str, Any]:
    """Greedy generation on one task's samples and that task's metrics.

    Returns ``{task: headline, "metric": its name, "score": headline, "metrics": {...}, "count": scored samples,
    "skipped": unusable samples, "skipped_examples": [(uid, reason), ...5], "seconds"}``. Headlines: VQA
    accuracy over the human answers (VL-T5's soft-label score when a row has only ``label``), GQA / NLVR2
    exact-match accuracy, captioning CIDEr (BLEU-4 alongside). Scores are fractions (CIDEr on its usual
    0-10 scale); NaN when no sample could be scored.
    """
    from tqdm.auto import tqdm

    if task not in HEADLINE:
        raise ValueError(f"evaluate: task {task!r} is not one of {list(HEADLINE)}")
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    if setup is not None:
        setup.activate(model, task)
    skipped: list[tuple[str, str]] = []
    usable = []
    for s in samples:
        reason = unscorable_reason(s)
        if reason is not None:
            skipped.append((s.uid, reason))
        else:
            usable.append(s)
    predictions: dict[str, str] = {}
    scored: list = []
    for i in tqdm(range(0, len(usable), batch_size), desc=f"eval {task}", disable=not progress, leave=False):
        batch = make_batch(model, task, usable[i:i + batch_size], features, max_text_length=max_text_length,
                           skipped=skipped)
        if batch is None:
            continue
        fusion = setup.fusion(model, batch.visual_feats) if setup is not None else contextlib.nullcontext()
        with torch.no_grad(), fusion:
            ids = model.generate(batch.input_ids, batch.attention_mask, batch.visual_feats, max_new_tokens=max_new_tokens)
        for s, pred in zip(batch.samples, model.decode(ids), strict=True):
            predictions[s.uid] = pred
            scored.append(s)
    model.train(was_training)
    metrics: dict[str, float] = {}
    preds = [predictions[s.uid] for s in scored]
    if task == "vqa":
        per = [vqa_accuracy(p, s.answers) if s.answers else vqa_score_from_label(p, s.label) for p, s in zip(preds, scored, strict=True)]
        metrics["vqa_accuracy"] = sum(per) / len(per) if per else math.nan
    elif task in ("gqa", "nlvr"):
        metrics["accuracy"] = exact_match_accuracy(preds, [list(s.targets) for s in scored])
    else:
        metrics.update(caption_scores({s.uid: predictions[s.uid] for s in scored}, {s.uid: list(s.targets) for s in scored})
                       if scored else {"bleu4": math.nan, "cider": math.nan})
    headline = metrics[HEADLINE[task]]
    out: dict[str, Any] = {task: headline, "task": task, "metric": HEADLINE[task], "score": headline, "metrics": metrics,
                           "count": len(scored), "skipped": len(skipped), "skipped_examples": skipped[:5],
                           "seconds": time.perf_counter() - t0}
    if return_predictions:
        out["predictions"] = predictions
    return out


def average_score(results: Mapping[str, Mapping[str, Any]]) -> float:
    """The paper's average: mean over tasks of the headline in percent (VQA/GQA/NLVR2 accuracy x 100, CIDEr x 100)."""
    values = [100.0 * r["score"] for r in results.values()]
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------------------------- training

@dataclass
class TrainHistory:
    variant: str
    total_steps: int
    learning_rate: float
    losses: list[tuple[int, str, float]] = field(default_factory=list)  # (step, task, loss)
    validations: list[dict[str, Any]] = field(default_factory=list)  # {"step", "scores": {task: score}, "average"}
    best_step: int | None = None
    best_average: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # task -> training samples skipped (each time seen)
    skipped_examples: list[tuple[str, str]] = field(default_factory=list)
    train_seconds: float = 0.0
    val_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_multitask(model: nn.Module, setup: VariantSetup, train: Mapping[str, Sequence[VLSample]],
                    features: Callable[[str], Tensor], config: VLAdapterConfig, *,
                    val: Mapping[str, Sequence[VLSample]] | None = None,
                    val_features: Callable[[str], Tensor] | None = None) -> TrainHistory:
    """Train ``setup``'s parameters on all tasks at once (module docstring, step 4). Returns the history.

    ``train`` / ``val``: task -> samples. With ``val``, the model ends with the parameters of the
    validation-best evaluation (average of the task headlines); without it, with the last step's.
    """
    from tqdm.auto import tqdm

    tasks = [t for t in setup.tasks if train.get(t)]
    missing = sorted(set(train) - set(setup.tasks))
    if missing:
        raise ValueError(f"train_multitask: tasks {missing} have data but were not set up (setup tasks: {list(setup.tasks)})")
    if not tasks:
        raise ValueError("train_multitask: no training samples for any task of the setup")
    train = {t: train[t] for t in tasks}
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    per_epoch = steps_per_epoch(train, config.batch_size)
    total = config.steps or per_epoch * config.epochs
    warmup = int(round(config.warmup_ratio * total))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_multitask: nothing to train (no parameter requires grad); call setup_variant first")
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)

    def schedule(step: int) -> float:  # linear warmup to the peak, then linear decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    eval_every = config.eval_every or per_epoch
    history = TrainHistory(setup.variant, total, config.learning_rate, skipped={t: 0 for t in tasks})
    best_state: dict[str, Tensor] | None = None
    val_features = val_features or features
    stream = task_batches(train, config.batch_size, rng)
    empty_in_a_row = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"train {setup.variant}", disable=not config.progress)
    step = 0
    while step < total:
        task, samples = next(stream)
        skipped: list[tuple[str, str]] = []
        model.train()
        setup.activate(model, task)
        batch = make_batch(model, task, samples, features, max_text_length=config.max_text_length,
                           max_target_length=config.max_target_length, rng=rng, skipped=skipped)
        history.skipped[task] += len(skipped)
        history.skipped_examples += skipped[: max(0, 5 - len(history.skipped_examples))]
        if batch is None:
            empty_in_a_row += 1
            if empty_in_a_row > per_epoch:
                raise ValueError(f"train_multitask: a whole epoch without a usable sample; e.g. {history.skipped_examples[:3]}")
            continue
        empty_in_a_row = 0
        with setup.fusion(model, batch.visual_feats):  # early fusion (LLaMA-Adapter V2), for this batch only
            loss = model(batch.input_ids, batch.attention_mask, batch.visual_feats, labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        history.losses.append((step, task, float(loss.detach())))
        bar.update(1)
        bar.set_postfix(task=task, loss=f"{history.losses[-1][2]:.3f}")
        if val and (step % eval_every == 0 or step == total):
            v0 = time.perf_counter()
            scores = {}
            for vt, vs in val.items():
                if vt not in setup.adapter_for or not vs:
                    continue
                vs = list(vs)[: config.max_val_samples] if config.max_val_samples else vs
                scores[vt] = evaluate(model, vs, val_features, vt, setup=setup, batch_size=config.eval_batch_size,
                                      max_new_tokens=config.max_new_tokens, max_text_length=config.max_text_length)["score"]
            finite = [s for s in scores.values() if not math.isnan(s)]
            avg = 100.0 * sum(finite) / len(finite) if finite else math.nan
            history.validations.append({"step": step, "scores": scores, "average": avg})
            history.val_seconds += time.perf_counter() - v0
            if not math.isnan(avg) and (history.best_average is None or avg > history.best_average):
                history.best_step, history.best_average = step, avg
                best_state = _trainable_state(model)
    bar.close()
    if best_state is not None:
        with torch.no_grad():
            live = dict(model.named_parameters())
            for n, value in best_state.items():
                live[n].copy_(value)
    history.train_seconds = time.perf_counter() - t0 - history.val_seconds
    return history


def save_trained(model: nn.Module, setup: VariantSetup, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write what trained: the adapters (``adapters/<name>/``, via :func:`mmadapters.save_adapters`) and the
    trained backbone parameters (``trained_backbone.safetensors``: LayerNorms and visual projection, or
    everything for full fine-tuning), plus ``vl_adapter.json`` (setup and ``extra``). Files are atomic."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if setup.adapters:
        mma.save_adapters(model, directory / TRAINED_ADAPTERS, names=setup.adapters)
    adapter_ids = _all_adapter_param_ids(model)
    backbone = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                if p.requires_grad and id(p) not in adapter_ids}
    atomic_write_bytes(directory / TRAINED_BACKBONE, save(backbone, metadata={"format": "pt"}))
    meta = {"variant": setup.variant, "tasks": list(setup.tasks), "adapter_for": setup.adapter_for,
            "sizes": setup.sizes, **(extra or {})}
    atomic_write_bytes(directory / TRAINED_META, (json.dumps(meta, indent=1, default=str) + "\n").encode())
    return directory


TRAINED_BACKBONE = "trained_backbone.safetensors"
TRAINED_META = "vl_adapter.json"
TRAINED_ADAPTERS = "adapters"


def load_trained(model: nn.Module, directory: str | os.PathLike) -> VariantSetup:
    """Restore what :func:`save_trained` wrote onto a fresh VL-T5 ``model`` (no adapters yet). Returns the setup.

    The adapters are loaded with :func:`mmadapters.load_adapters` (injected where they were saved, shared parts
    included), then the trained backbone parameters (LayerNorms and visual projection, or all of them for
    full fine-tuning) are copied in by name; afterwards exactly the saved parameters have ``requires_grad``
    and the first task's adapter is active. A missing file, an unknown variant or a tensor that does not match
    the model raises an error naming the file and the field or tensor.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from .vl_variants import _FUSES_VISUAL_TOKENS

    directory = Path(directory)
    meta_path = directory / TRAINED_META
    meta = read_json_object(meta_path, "a VL-Adapter checkpoint (written by save_trained)")
    variant = meta.get("variant")
    if variant not in VARIANTS:
        raise ValueError(f"{meta_path}: field 'variant' is {variant!r}; expected one of {VARIANTS}")
    tasks = meta.get("tasks")
    adapter_for = meta.get("adapter_for")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"{meta_path}: field 'tasks' must be a non-empty list of task names, got {tasks!r}")
    if not isinstance(adapter_for, dict) or set(adapter_for) != set(tasks):
        raise ValueError(f"{meta_path}: field 'adapter_for' must map every task of 'tasks' {tasks} to an adapter name or null")
    if mma.adapter_names(model):
        raise ValueError(f"load_trained: the model already has adapters {mma.adapter_names(model)}; start from a fresh VL-T5")
    adapters = sorted({a for a in adapter_for.values() if a is not None})
    if adapters:
        mma.load_adapters(model, directory / TRAINED_ADAPTERS, names=adapters)
    weights = directory / TRAINED_BACKBONE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: trained backbone parameters not found (named by {meta_path})")
    try:
        state = st_load(weights.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
    live = dict(model.named_parameters())
    unknown = sorted(set(state) - set(live))
    if unknown:
        raise ValueError(f"{weights}: tensors {unknown[:5]} are not parameters of this VL-T5 (with the {variant} adapters)")
    if adapters:
        mma.freeze_base(model, adapters=adapters)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    with torch.no_grad():
        for name, value in state.items():
            param = live[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{weights}: tensor {name!r} has shape {tuple(value.shape)}, the model's is {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
            param.requires_grad_(True)
    setup = VariantSetup(variant, tuple(tasks), dict(adapter_for), adapters, sorted(state), dict(meta.get("sizes") or {}),
                         visual_tokens=variant in _FUSES_VISUAL_TOKENS)
    setup.activate(model, setup.tasks[0])
    return setup


# ---------------------------------------------------------------------------------------------- one run

@dataclass
class VariantResult:
    variant: str
    parameters: VariantParameters
    history: TrainHistory
    test: dict[str, dict[str, Any]]  # task -> evaluate() output
    average: float  # the paper's average over the tested tasks (percent)
    eval_seconds: float
    config: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "parameters": self.parameters.as_dict(), "history": self.history.as_dict(),
                "test": self.test, "average": self.average, "eval_seconds": self.eval_seconds, "config": self.config}


def run_variant(load_model: Callable[[], nn.Module], config: VLAdapterConfig, train: Mapping[str, Sequence[VLSample]],
                test: Mapping[str, Sequence[VLSample]], features: Callable[[str], Tensor], *,
                val: Mapping[str, Sequence[VLSample]] | None = None, output_dir: str | os.PathLike | None = None) -> VariantResult:
    """Set up ``config.variant`` on a fresh model from ``load_model()``, train on all tasks, test each task."""
    torch.manual_seed(config.seed)
    model = load_model().to(config.device)
    setup = setup_variant(model, config)
    params = parameter_report(model, setup)
    history = train_multitask(model, setup, train, features, config, val=val)
    t0 = time.perf_counter()
    results = {task: evaluate(model, samples, features, task, setup=setup, batch_size=config.eval_batch_size,
                              max_new_tokens=config.max_new_tokens, max_text_length=config.max_text_length,
                              progress=config.progress)
               for task, samples in test.items() if task in setup.adapter_for and samples}
    eval_seconds = time.perf_counter() - t0
    if output_dir is not None:
        save_trained(model, setup, output_dir, extra={"config": config.to_dict(), "best_step": history.best_step})
    return VariantResult(config.variant, params, history, results, average_score(results), eval_seconds, config.to_dict())


__all__ = ["DEFAULT_LR", "HEADLINE", "TASKS", "TASK_PREFIX", "VARIANTS", "Batch", "FeatureCache", "TrainHistory",
           "VLAdapterConfig", "VariantConfig", "VariantParameters", "VariantResult", "VariantSetup", "average_score",
           "evaluate", "load_trained", "make_batch", "model_input", "parameter_report", "run_variant", "save_trained", "setup_variant",
           "task_batches", "train_multitask", "training_target", "unscorable_reason", "visual_input", "SYNTH_FILES",
           "clip_encoder", "open_feature_source", "read_split"]
