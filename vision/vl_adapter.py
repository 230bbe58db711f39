"""VL-Adapter (Sung et al. 2022): multi-task VL-T5 with shared adapters, Hyperformer, Compacter, LoRA, prompts.

The method, in the paper's order:

1. **Backbone.** VL-T5 (:mod:`mmadapters.vision.vlt5`): frozen CLIP grid features, projected by a trainable
   visual projection, are prepended to the T5 encoder's text embeddings.
2. **One generative format for every task.** The input is the question or statement, after the task prefix
   (:data:`TASK_PREFIX`) for the variants whose tasks share adapters and without it for full fine-tuning and
   per-task adapters, as VL-Adapter's code does (:func:`model_input`;
   :func:`~mmadapters.vision.vl_variants.uses_task_prefix`); the output is the answer text
   (:func:`training_target`) — for VQA an answer *drawn* each time the question is drawn, with probability
   proportional to its soft score (VQA's ``min(1, annotators / 3)``, the ``label`` of the annotation file), as
   VL-T5's and VL-Adapter's VQA loaders do (``vqa_target="best"``: always the best-scored answer); the answer
   for GQA, ``"true"``/``"false"`` for NLVR2, a caption (one of the references, drawn per step) for COCO.
3. **Adapters and their sharing** (:mod:`mmadapters.vision.vl_variants`): one of ``VARIANTS`` is added,
   the backbone frozen except all LayerNorms and the visual projection.
4. **Multi-task training** runs on the training engine: ``mmadapters train vl-adapter``
   (:mod:`mmadapters.vision.vl_train`; AdamW, linear warmup over 10% of the steps then linear decay,
   gradient clipping at 5, the best checkpoint selected on the validation split only). This module gives it
   the batches (:func:`make_batch`: one task's samples, its prefix, its targets) and the checkpoint layout
   (:func:`save_trained` / :func:`load_trained`).
5. **Evaluation** — one path, used by ``mmadapters eval vqa|gqa|nlvr|caption`` (:mod:`mmadapters.eval.vl_tasks`,
   resumable and rank-sharded) and by the recipe's validation (:func:`predict_records`):
   :class:`VLPredictor` generates greedily (or with beams) and returns one record per sample,
   :func:`task_metrics` scores the records — VQA accuracy against the 10 human answers, GQA and NLVR2
   exact-match accuracy, captioning CIDEr and BLEU-4. All scores are fractions (CIDEr as pycocoevalcap
   computes it); the paper's tables show them x 100. Samples that cannot be used (missing or broken image
   features, nothing to score against) are skipped with the reason, never silently dropped.

Learning rates (:data:`DEFAULT_LR`) are the paper's: full fine-tuning 1e-4, a single shared adapter 1e-3,
multiple adapters 3e-4, Hyperformer 1e-3, Compacter 1e-3. Not given there: half-shared adapters take the
per-task adapters' 3e-4, the plain PHM adapter Compacter's 1e-3, LoRA, prompt tuning and LLaMA-Adapter V2
(one adapter for all tasks, like the shared adapter; its own paper's schedule is for a 7B LLaMA) the single
adapter's 1e-3.

**Inputs** (:func:`read_split`, :func:`open_feature_source`, shared by training and evaluation): one task's
annotation file through :mod:`mmadapters.vision.vl_readers` (:data:`SYNTH_FILES`: where
``python -m mmadapters.vision.synth_vl`` puts them), and per-image CLIP grid features from an ``.h5`` file
or a folder of ``.safetensors`` or computed from the images with a CLIP.

LLaMA-Adapter V2's early fusion needs each sample's image inside the adapters, not only in the encoder
input: every forward (training) and generate (evaluation) call runs inside
:meth:`~mmadapters.vision.vl_variants.VariantSetup.fusion`, which feeds the batch's global visual features
for that call only (a no-op for the other variants).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import mmadapters as mma
from mmadapters import distributed
from mmadapters.eval.metrics import caption_scores, exact_match_accuracy, vqa_accuracy, vqa_score_from_label
from mmadapters.io import atomic_write_bytes, read_json_object
from mmadapters.model import _all_adapter_param_ids

from . import vl_readers
from .vl_readers import FeatureSource, ImageFeatures, VLSample, load_features
from .vl_variants import VARIANTS, VariantSetup

TASK_PREFIX = {"vqa": "vqa: ", "gqa": "gqa: ", "nlvr": "nlvr: ", "caption": "caption: "}
DEFAULT_LR = {"full_ft": 1e-4, "multiple_adapters": 3e-4, "half_shared_down": 3e-4, "half_shared_up": 3e-4,
              "shared_adapter": 1e-3, "hyperformer": 1e-3, "compacter": 1e-3, "phm_adapter": 1e-3, "lora": 1e-3,
              "prompt": 1e-3, "llama_adapter_v2": 1e-3}
HEADLINE = {"vqa": "vqa_accuracy", "gqa": "accuracy", "nlvr": "accuracy", "caption": "cider"}


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


def model_input(sample: VLSample, task_prefix: bool = True) -> str:
    """The encoder's text: the task prefix (when ``task_prefix``), then the question or statement (nothing for
    captioning)."""
    return (TASK_PREFIX[sample.task] if task_prefix else "") + sample.text


VQA_TARGETS = ("sample", "best")


def training_target(sample: VLSample, rng: random.Random, vqa_target: str = "sample") -> str:
    """The decoder's target, drawn with ``rng``.

    VQA: with ``vqa_target="sample"`` (the default, VL-T5's and VL-Adapter's loaders) an answer of the soft label
    drawn with probability ``score / sum of scores`` — every call draws again, so over the epochs each answer is
    learned in proportion to its score; a label whose scores are all 0 raises ``ValueError`` (the official loader
    trains such a question with weight 0); a sample without a label (no scores) trains on its first target. With
    ``"best"``: always the best-scored answer. GQA: the answer; NLVR2: true/false; captioning: one reference drawn
    at random (so every reference is learned over the epochs)."""
    if vqa_target not in VQA_TARGETS:
        raise ValueError(f"vqa_target: expected one of {VQA_TARGETS}, got {vqa_target!r}")
    if not sample.targets:
        raise ValueError("no training target")
    if sample.task == "caption":
        return rng.choice(sample.targets)
    if sample.task == "vqa" and vqa_target == "sample" and sample.label:
        answers = [a for a, score in sample.label.items() if score > 0]
        if not answers:
            raise ValueError("no answer with a positive score to draw a training target from")
        return rng.choices(answers, weights=[sample.label[a] for a in answers])[0]
    return sample.targets[0]


@dataclass
class Batch:
    task: str
    samples: list  # the VLSamples used (bad ones removed)
    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    visual_feats: Tensor  # (B, N, D) or (B, I, N, D)
    labels: Tensor  # (B, T_out) with -100 at padding


def make_batch(model: nn.Module, task: str, samples: Sequence[VLSample], features: Callable[[str], Tensor], *,
               max_text_length: int, max_target_length: int, rng: random.Random,
               skipped: list | None = None, task_prefix: bool = True, vqa_target: str = "sample") -> Batch | None:
    """One task's training samples tokenized and stacked with their targets (``rng`` draws the VQA answers and
    the captions, :func:`training_target` with ``vqa_target``; the text after the task prefix when
    ``task_prefix``, :func:`model_input`). Samples whose features or targets are unusable are appended to
    ``skipped`` as ``(uid, reason)``; None when none is left. (Generation batches its samples in :class:`VLPredictor`.)"""
    kept, feats, targets = [], [], []
    for s in samples:
        if s.task != task:
            raise ValueError(f"make_batch: sample {s.uid!r} is a {s.task!r} sample in a {task!r} batch")
        try:
            v = visual_input(s, features)
            if feats and v.shape != feats[0].shape:
                raise ValueError(f"features of shape {tuple(v.shape)}, the batch has {tuple(feats[0].shape)}")
            targets.append(training_target(s, rng, vqa_target))
        except (KeyError, ValueError) as err:
            if skipped is not None:
                skipped.append((s.uid, str(err).strip("'\"")))
            continue
        kept.append(s)
        feats.append(v)
    if not kept:
        return None
    device = next(model.parameters()).device
    ids, mask = model.encode_text([model_input(s, task_prefix) for s in kept], max_length=max_text_length)
    labels = model.encode_targets(targets, max_length=max_target_length).to(device)
    return Batch(task, kept, ids.to(device), mask.to(device), torch.stack(feats).to(device), labels)


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
    if task == "caption":
        return vl_readers.read_coco_karpathy(path, (split,), on_error=on_error)
    reader = {"vqa": vl_readers.read_vqa, "gqa": vl_readers.read_gqa, "nlvr": vl_readers.read_nlvr2}[task]
    return reader(path, on_error=on_error)


def clip_encoder(clip_model: str | None, clip_pretrained: str | None, num_tokens: int,
                 device: str | torch.device = "cpu") -> Callable[[list], Tensor]:
    """``encode(list of PIL images) -> (B, num_tokens, width)`` CLIP grid features (:mod:`.vl_features`); no
    ``clip_model``: the shipped tiny VL-T5's feature CLIP (:func:`~mmadapters.vision.vl_features.feature_clip`)."""
    from .clip import load_clip
    from .vl_features import clip_grid_features, feature_clip

    bundle = load_clip(feature_clip(clip_model, clip_pretrained), clip_pretrained, device=device)

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
        if cache is None:
            encode = clip_encoder(clip_model, clip_pretrained, num_tokens, device)
            return ImageFeatures(images, encode, image_pattern, dim=visual_dim, num_tokens=num_tokens)
        if distributed.is_main():
            _extract(images, image_pattern, image_ids, Path(cache), clip_model=clip_model, clip_pretrained=clip_pretrained,
                     num_tokens=num_tokens, device=device, progress=progress)
        distributed.barrier()
        source = load_features(cache)
    if (source.num_tokens, source.dim) != (num_tokens, visual_dim):
        raise ValueError(f"{source}: features are {source.num_tokens} tokens x {source.dim}, the VL-T5 expects "
                         f"{num_tokens} x {visual_dim} (its vlt5.json)")
    return source


def _extract(images: Path, pattern: str, image_ids: Sequence[str] | None, out: Path, *, clip_model: str | None,
             clip_pretrained: str | None, num_tokens: int, device: str | torch.device, progress: bool) -> None:
    """Write the CLIP grid features of the ``image_ids`` (None: every image matching ``pattern``) whose files
    exist to ``out`` with :func:`~mmadapters.vision.vl_features.extract_features`."""
    from .clip import load_clip
    from .vl_features import extract_features

    if image_ids is None:
        image_ids = ImageFeatures(images, lambda ims: torch.zeros(0), pattern).ids
    paths = {i: images / pattern.replace("{img_id}", i) for i in dict.fromkeys(image_ids)}
    paths = {i: p for i, p in paths.items() if p.is_file()}
    if not paths:
        raise FileNotFoundError(f"{images}: none of the {len(set(image_ids))} images asked for is there "
                                f"(pattern {pattern!r})")
    extract_features(paths, load_clip(clip_model, clip_pretrained, device=device), out, num_tokens=num_tokens,
                     progress=progress)


# ---------------------------------------------------------------------------------------------- evaluation


class MissingFeaturesError(LookupError):
    """A sample's image has no features in the source (the message names the source and the image id)."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0]) if self.args else ""


def unscorable_reason(sample: VLSample) -> str | None:
    """Why ``sample`` cannot be scored (no human answers / label for VQA, no target otherwise), else None."""
    if sample.task == "vqa":
        return None if sample.answers or sample.label else "no human answers and no label to score against"
    return None if sample.targets else "no target to score against"


class VLPredictor:
    """``predictor(samples) -> [record | exception]``: generation for one task (module docstring, step 5).

    A record holds the prediction and what the task's metric needs: the human answers and soft label plus
    answer/question type (VQA), the references (captioning), the targets (GQA, NLVR2). A sample that cannot
    be scored, or whose features are missing (:class:`MissingFeaturesError`) or unusable (``ValueError``),
    gets the exception instead. Samples are batched by the shape of their visual input (``(N, D)`` for one
    image, ``(2, N, D)`` for an NLVR2 pair). The encoder text has the task prefix when ``setup.task_prefix``
    (as in training; always without a setup). The caller activates the task's adapter and sets eval mode.
    """

    def __init__(self, model: nn.Module, setup: VariantSetup | None, task: str, features: Callable[[str], Tensor], *,
                 max_text_length: int = 40, max_new_tokens: int = 20, num_beams: int = 1):
        if task not in HEADLINE:
            raise ValueError(f"task {task!r}: expected one of {list(HEADLINE)}")
        self.model, self.setup, self.task, self.features = model, setup, task, features
        self.max_text_length, self.max_new_tokens, self.num_beams = max_text_length, max_new_tokens, num_beams
        self.task_prefix = True if setup is None else bool(setup.task_prefix)

    def _visual(self, sample: VLSample) -> Tensor | BaseException:
        reason = unscorable_reason(sample)
        if reason is not None:
            return ValueError(f"sample {sample.uid!r}: {reason}")
        try:
            return visual_input(sample, self.features)
        except KeyError as e:
            return MissingFeaturesError(e.args[0] if e.args else f"no features for {sample.img_ids}")
        except ValueError as e:
            return e

    def record(self, sample: VLSample, prediction: str) -> dict[str, Any]:
        out: dict[str, Any] = {"prediction": prediction, "img_ids": list(sample.img_ids)}
        if self.task == "vqa":
            out.update(answers=sample.answers, label=sample.label, answer_type=sample.meta.get("answer_type"),
                       question_type=sample.meta.get("question_type"))
        elif self.task == "caption":
            out["references"] = list(sample.targets)
        else:
            out["targets"] = list(sample.targets)
        if self.task != "caption":
            out["question"] = sample.text
        return out

    def __call__(self, samples: Sequence[VLSample]) -> list[dict[str, Any] | BaseException]:
        outs: list[Any] = [self._visual(s) for s in samples]
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for k, v in enumerate(outs):
            if isinstance(v, Tensor):
                by_shape[tuple(v.shape)].append(k)
        device = next(self.model.parameters()).device
        for positions in by_shape.values():
            feats = torch.stack([outs[k] for k in positions]).to(device)
            ids, mask = self.model.encode_text([model_input(samples[k], self.task_prefix) for k in positions],
                                               max_length=self.max_text_length)
            fusion = self.setup.fusion(self.model, feats) if self.setup is not None else contextlib.nullcontext()
            with torch.no_grad(), fusion:
                generated = self.model.generate(ids.to(device), mask.to(device), feats, max_new_tokens=self.max_new_tokens,
                                                num_beams=self.num_beams)
            for k, text in zip(positions, self.model.decode(generated), strict=True):
                outs[k] = self.record(samples[k], text)
        return outs


def predict_records(model: nn.Module, setup: VariantSetup | None, task: str, samples: Sequence[VLSample],
                    features: Callable[[str], Tensor], *, batch_size: int = 64, max_text_length: int = 40,
                    max_new_tokens: int = 20) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """``(records, skipped)``: :class:`VLPredictor`'s records (with ``"id"``) of ``samples``, in batches, with
    ``task``'s adapter active and the model in eval mode (its mode is restored); ``skipped`` = ``(uid, reason)``.
    The in-memory counterpart of ``mmadapters eval``'s resumable sample runner, for validation."""
    was_training = model.training
    model.eval()
    if setup is not None:
        setup.activate(model, task)
    predictor = VLPredictor(model, setup, task, features, max_text_length=max_text_length, max_new_tokens=max_new_tokens)
    records: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            for sample, out in zip(chunk, predictor(chunk), strict=True):
                if isinstance(out, BaseException):
                    skipped.append((sample.uid, f"{type(out).__name__}: {out}"))
                else:
                    records.append({**out, "id": sample.uid})
    finally:
        model.train(was_training)
    return records, skipped


YES_NO = frozenset({"yes", "no"})


def _vqa_score(record: Mapping[str, Any]) -> float:
    if record.get("answers"):
        return vqa_accuracy(record["prediction"], record["answers"])
    return vqa_score_from_label(record["prediction"], record.get("label") or {})


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def task_metrics(task: str, records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, float], dict[str, dict[str, float]] | None]:
    """``(metrics, per_group)`` of ``task`` over :class:`VLPredictor` records (with ``"id"``); the headline
    (:data:`HEADLINE`) comes first, NaN when there is no record. ``per_group``: VQA per answer type and per
    question type, GQA yes/no vs open questions, NLVR2 per label; None for captioning. CIDEr and BLEU-4 are
    computed over all records at once (CIDEr's IDF depends on the whole set, so it is never averaged over batches)."""
    groups: dict[str, list] = defaultdict(list)
    if task == "vqa":
        scores = [_vqa_score(r) for r in records]
        for r, s in zip(records, scores, strict=True):
            for key in ("answer_type", "question_type"):
                if r.get(key):
                    groups[f"{key}={r[key]}"].append(s)
        metrics = {"vqa_accuracy": _mean(scores)}
        per_group = {g: {"vqa_accuracy": _mean(v), "count": len(v)} for g, v in sorted(groups.items())}
    elif task in ("gqa", "nlvr"):
        metrics = {"accuracy": exact_match_accuracy([r["prediction"] for r in records], [r["targets"] for r in records])}
        for r in records:
            if task == "nlvr":
                groups[f"label={r['targets'][0]}"].append(r)
            else:
                groups["answer=yes/no" if r["targets"][0].strip().lower() in YES_NO else "answer=open"].append(r)
        per_group = {g: {"accuracy": exact_match_accuracy([r["prediction"] for r in v], [r["targets"] for r in v]),
                         "count": len(v)} for g, v in sorted(groups.items())}
    elif task == "caption":
        scores = caption_scores({r["id"]: r["prediction"] for r in records}, {r["id"]: r["references"] for r in records})
        metrics, per_group = {"cider": scores["cider"], "bleu4": scores["bleu4"]}, None
    else:
        raise ValueError(f"task {task!r}: expected one of {list(HEADLINE)}")
    return metrics, per_group or None


# ---------------------------------------------------------------------------------------------- checkpoints


def save_trained(model: nn.Module, setup: VariantSetup, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write what trained: the adapters (``adapters/<name>/``, via :func:`mmadapters.save_adapters`) and the
    trained backbone parameters (``trained_backbone.safetensors``: LayerNorms and visual projection, or
    everything for full fine-tuning), plus ``vl_adapter.json`` (setup, its ``task_prefix`` true/false, and
    ``extra``, which cannot replace the setup's fields). Files are atomic."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if setup.adapters:
        mma.save_adapters(model, directory / TRAINED_ADAPTERS, names=setup.adapters)
    adapter_ids = _all_adapter_param_ids(model)
    backbone = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                if p.requires_grad and id(p) not in adapter_ids}
    atomic_write_bytes(directory / TRAINED_BACKBONE, save(backbone, metadata={"format": "pt"}))
    meta = {**(extra or {}), "variant": setup.variant, "tasks": list(setup.tasks), "adapter_for": setup.adapter_for,
            "sizes": setup.sizes, "task_prefix": bool(setup.task_prefix)}
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
    and the first task's adapter is active. ``task_prefix`` comes from the file (a checkpoint written before it
    was recorded — no field, or the prefix table the recipe used to save under that name — was trained with
    prefixes: true). A missing file, an unknown variant or a tensor that does not match the model raises an
    error naming the file and the field or tensor.
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
    task_prefix = meta.get("task_prefix", True)
    if isinstance(task_prefix, dict):  # older checkpoints: the recipe's prefix table, always used then
        task_prefix = True
    if not isinstance(task_prefix, bool):
        raise ValueError(f"{meta_path}: field 'task_prefix' must be true or false, got {task_prefix!r}")
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
                         visual_tokens=variant in _FUSES_VISUAL_TOKENS, task_prefix=task_prefix)
    setup.activate(model, setup.tasks[0])
    return setup



__all__ = ["DEFAULT_LR", "HEADLINE", "SYNTH_FILES", "TASK_PREFIX", "TRAINED_ADAPTERS", "TRAINED_BACKBONE", "TRAINED_META",
           "VQA_TARGETS", "Batch", "FeatureCache", "MissingFeaturesError", "VLPredictor", "clip_encoder", "load_trained", "make_batch",
           "model_input", "open_feature_source", "predict_records", "read_split", "save_trained", "task_metrics",
           "training_target", "unscorable_reason", "visual_input"]
