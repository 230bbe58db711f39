"""``mmadapters train tip-adapter`` and ``mmadapters train caps-adapter``: few-shot cache models as recipes.

Both recipes run on the training engine (:mod:`mmadapters.training`). ``build_task`` loads the CLIP,
opens (or generates) the dataset, samples K shots per class from the train split, encodes the support
images (and, for CapS, their captions), the validation images and the zero-shot classifier **once**, then
fits the cache model on those features:

- ``tip-adapter`` with ``variant: tip`` and ``caps-adapter`` are training-free: their hyperparameters are
  searched on the validation features in ``build_task``; the engine runs with ``trainer.steps: 0``, which
  means validate + save.
- ``tip-adapter`` with ``variant: tip-f`` (Tip-Adapter-F): (α, β) are first searched as Tip-Adapter does, then
  the engine trains the cache keys (the only parameter with ``requires_grad``) with the cross-entropy of the
  Tip-F logits at the official fixed initial (α, β) = (1, 1) (a searched α = 0 would give the keys no
  gradient) on ``recipe.views`` augmented views (random crop, flip) of the support images; the cache keys are
  the mean of those views, as in the official code (a training item is one view of one image). ``validate``
  searches (α, β) again for the current keys on the **validation** split only (on a copy, so training keeps
  its (α, β) and resuming is bit-identical) and reports the accuracy of the searched model's logits; the
  engine keeps the best validation step in ``best/``. The official code picks the epoch by test accuracy; we
  never look at test.

What is saved (:func:`save_cache_model`, loaded by :func:`load_cache_model`) is the fitted **cache model**,
not a core adapter: ``cache_model.safetensors`` (the zero-shot classifier W (D, C), the cache keys and
labels, Tip-F's trained keys, CapS's caption keys and frozen KL rescaling) and ``cache_model.json`` (kind,
α/β/γ/δ, class names, templates, the CLIP it was built with, data settings, validation metrics (null where
undefined), the tensors' shapes and dtypes). Tip's cache is not injected into the backbone: it is a classifier
head on top of frozen CLIP image features
(logits = 100·f·W + α·exp(−β(1 − f·Kᵀ))·L), with no module of the CLIP to attach to, so the core's
bottleneck/LoRA adapter format (weights keyed by the backbone modules they wrap, checked against the
backbone's fingerprint) does not describe it. The JSON records the CLIP's weights identity instead, and
``mmadapters eval fewshot --adapters DIR`` refuses a different CLIP.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CACHE_FORMAT = "mmadapters.cache_model"
CACHE_FORMAT_VERSION = 1
CACHE_WEIGHTS = "cache_model.safetensors"
CACHE_CONFIG = "cache_model.json"
KINDS = ("tip", "tip-f", "caps")


# ---------------------------------------------------------------------------------------------------
# The recipes' typed configs (the YAML's `recipe:` section)


@dataclass
class FewShotRecipeConfig:
    """What both few-shot recipes read: the data, the shots, the CLIP and the search grids."""

    dataset: str = field(default="shapes-sketch", metadata={
        "help": "a dataset format (imagefolder, csv, coop, wds) or a generated task (shapes-sketch, colours-noisy, ...)"})
    dataset_root: str | None = field(default=None, metadata={
        "help": "dataset location; for a generated task default <cache_dir>/datasets/<task> (generated on first use)"})
    train_split: str = field(default="train", metadata={"help": "split the K shots per class are sampled from"})
    val_split: str = field(default="val", metadata={"help": "split the hyperparameters are searched on (never test)"})
    support_root: str | None = field(default=None, metadata={
        "help": "an image folder of support images instead of the train split"})
    classnames: str | None = field(default=None, metadata={
        "help": "class names file, one per line (default: <root>/classnames.txt, else the dataset's names)"})
    templates: str | None = field(default=None, metadata={
        "help": "prompt templates file with {c} (default: <root>/templates.txt, else a built-in set)"})
    shots: int = field(default=16, metadata={"help": "support images per class (K)"})
    seed: int = field(default=0, metadata={"help": "seed of the shot sampling"})
    data_seed: int | None = field(default=None, metadata={
        "help": "generated task: draw it afresh from this seed, same recipe (default: the canonical draw, seed 0)"})
    model: str | None = field(default=None, metadata={
        "help": "open_clip model name, local-dir:DIR or hf-hub:org/repo (default: the shipped tiny CLIP)"})
    pretrained: str | None = field(default=None, metadata={"help": "pretrained tag or weights file for a built-in model name"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "classifier/dataset/weights cache (default: $MMADAPTERS_CACHE or ~/.cache/mmadapters)"})
    train_per_class: int | None = field(default=None, metadata={"help": "generated task: train images per class"})
    val_per_class: int | None = field(default=None, metadata={"help": "generated task: val images per class"})
    test_per_class: int | None = field(default=None, metadata={"help": "generated task: test images per class"})
    image_size: int | None = field(default=None, metadata={"help": "generated task: image side in pixels"})
    feature_batch_size: int = field(default=64, metadata={"help": "images per batch when encoding features"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes for encoding"})
    on_error: Literal["skip", "fail"] = field(default="skip", metadata={
        "help": "an unreadable support/validation image: skip it (counted in the saved JSON) or fail"})
    alphas: list[float] | None = field(default=None, metadata={"help": "α grid (default: 0 and 20 log-spaced in 0.1..1000)"})
    betas: list[float] | None = field(default=None, metadata={
        "help": "β grid (default: 200 steps in 0.1..13 for Tip, 0.1..50 for CapS)"})


@dataclass
class TipRecipeConfig(FewShotRecipeConfig):
    """``recipe:`` of ``mmadapters train tip-adapter``."""

    variant: Literal["tip", "tip-f"] = field(default="tip-f", metadata={
        "help": "tip: training-free (trainer.steps must be 0); tip-f: the cache keys train (Tip-Adapter-F)"})
    views: int = field(default=10, metadata={
        "help": "tip-f: augmented passes (random crop, flip) over the support images; the keys are their mean "
                "and the keys train on them (official: 10)"})


@dataclass
class CapsRecipeConfig(FewShotRecipeConfig):
    """``recipe:`` of ``mmadapters train caps-adapter`` (training-free: trainer.steps must be 0)."""

    captions: str | None = field(default=None, metadata={
        "help": "captions of the support images, JSONL {image, caption} or TSV (default: <root>/captions.jsonl)"})
    gammas: list[float] | None = field(default=None, metadata={"help": "γ grid of the KL term (default: 0 and 49 in 0.1..100)"})
    deltas: list[float] | None = field(default=None, metadata={"help": "δ grid of the caption affinity (default: 0, 0.1, ..., 1)"})
    temperature: float = field(default=0.5, metadata={"help": "T of the class distributions of the KL term (TIP-X: 0.5)"})


# ---------------------------------------------------------------------------------------------------
# Data: the dataset, the shots and every feature the fit needs, computed once


@dataclass
class FewShotData:
    """Encoded few-shot data. Features are L2-normalized float32 on CPU.

    Attributes:
        weights: (D, C) zero-shot classifier.
        support_feats: (N, D), support_labels: (N,), support_paths: N image paths.
        support_views: (V, N, D) augmented views of the support images (Tip-F), or None.
        caption_feats: (N, D) text features of ``caps_prompt(class, caption)`` per support image, or None.
        val_feats: (M, D), val_labels: (M,).
        info: JSON-ready description (dataset, root, counts, skipped images, timings, CLIP identity).
    """

    classnames: list[str]
    templates: list[str]
    weights: Tensor
    support_feats: Tensor
    support_labels: Tensor
    support_paths: list[str]
    caption_feats: Tensor | None
    val_feats: Tensor
    val_labels: Tensor
    clip_info: Any
    info: dict[str, Any]
    support_views: Tensor | None = None


def _cache_dir(config: FewShotRecipeConfig) -> Path:
    from mmadapters.eval.results_io import default_cache_dir

    return Path(config.cache_dir) if config.cache_dir else default_cache_dir()


def recipe_flag(field: str) -> str:
    """How a recipe's YAML names a setting in errors: ``recipe.<field>``."""
    return f"recipe.{field}"


def encode_fewshot(clip: Any, fmt: str, root: Path, classnames: list[str] | None, templates: list[str],
                   weights_for: Callable[[list[str]], Tensor], *, kind: str, shots: int, seed: int, val_split: str,
                   train_split: str = "train", support_root: str | None = None, views: int = 0,
                   captions: str | None = None, batch_size: int = 64, num_workers: int = 0, device: str = "cpu",
                   progress: bool = True, on_unreadable: Callable[[Any], None] | None = None,
                   flag: Callable[[str], str] = recipe_flag) -> FewShotData:
    """Sample ``shots`` images per class (``sample_shots(train labels, shots, seed)``) from ``train_split`` (or
    the image folder ``support_root``) and encode what a few-shot fit needs, once: the shots (and ``views``
    augmented passes over them, seeded with ``seed``; 0: none), the ``val_split`` images, and for ``kind`` caps
    the prompt ``caps_prompt(class, caption)`` of each shot (captions from ``captions``, default
    ``<root>/captions.jsonl``). ``weights_for(classnames)`` gives the (D, C) zero-shot classifier.

    The few-shot path of ``mmadapters train tip-adapter|caps-adapter`` and of ``mmadapters zeroshot --adapter``;
    ``flag`` names their settings in errors. ``info`` holds the counts, skipped images, captions file and
    ``features_s``.
    """
    from mmadapters.vision.caps_adapter import read_captions, support_prompts
    from mmadapters.vision.fewshot import augmented_transform, encode_views, sample_shots
    from mmadapters.vision.readers import ImageFolderDataset, image_loader, open_split
    from mmadapters.vision.zeroshot import encode_texts, extract_image_features

    captions_path = None
    if kind == "caps":
        captions_path = Path(captions) if captions else (root if root.is_dir() else root.parent) / "captions.jsonl"
        if not captions_path.is_file():
            raise FileNotFoundError(f"{flag('captions')}: CapS-Adapter needs captions for the support images; no file "
                                    f"{captions_path} (JSON lines {{\"image\": <path relative to the file>, \"caption\": "
                                    "...} or TSV)")

    def support_reader(transform):
        if support_root:
            return ImageFolderDataset(support_root, transform, classnames)
        try:
            return open_split(fmt, root, train_split, transform, classnames)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"{flag('train_split')} samples its support images from the {train_split} split (or "
                             f"{flag('support_root')}): {e}") from e

    support_ds = support_reader(clip.preprocess)
    names = classnames or support_ds.classnames
    try:
        val_ds = open_split(fmt, root, val_split, clip.preprocess, names)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{flag('val_split')}: the hyperparameters are searched on a validation split "
                         f"({val_split!r}), never on test: {e}") from e
    for what, ds in (("support", support_ds), ("validation", val_ds)):
        if ds.classnames is not None and len(ds.classnames) != len(names):
            raise ValueError(f"the {what} set has {len(ds.classnames)} classes, expected {len(names)}")
    weights = weights_for(names)

    def features(ds, desc: str):
        loader = image_loader(ds, batch_size=batch_size, num_workers=num_workers, device=device)
        return extract_image_features(clip.model, loader, device=device, progress=progress,
                                      on_unreadable=on_unreadable, desc=desc)

    t0 = time.perf_counter()
    index = sample_shots(torch.tensor(support_ds.labels), shots, seed, num_classes=len(names)).tolist()
    support = features(torch.utils.data.Subset(support_ds, index), "support images")
    val = features(val_ds, f"{val_split} images")
    support_views = None
    if views:
        augmented = torch.utils.data.Subset(support_reader(augmented_transform(clip.preprocess)), index)
        support_views, _, view_paths = encode_views(clip.model, augmented, views, seed=seed, batch_size=batch_size,
                                                    device=device)
        if view_paths != support.paths:
            raise ValueError(f"{root}: a support image could not be read; Tip-F's augmented views need every one")
    features_s = time.perf_counter() - t0
    if not support.paths:
        raise ValueError(f"{root}: none of the {len(index)} sampled support images could be read")
    if not val.paths:
        raise ValueError(f"{root}: none of the {len(val_ds)} images of split {val_split!r} could be read")
    caption_feats = None
    if captions_path is not None:
        prompts = support_prompts(support.paths, support.labels, names, read_captions(captions_path),
                                  source=str(captions_path))
        caption_feats = encode_texts(clip.model, clip.tokenizer, prompts, device=device,
                                     batch_size=max(batch_size, 256), progress=progress, desc="captions")
    info = {
        "captions": None if captions_path is None else str(captions_path.resolve()),
        "counts": {"classes": len(names), "support_sampled": len(index), "support_images": len(support.paths),
                   "val_images": len(val.paths), "support_skipped": len(support.skipped), "val_skipped": len(val.skipped)},
        "skipped": [{"id": s.path, "reason": s.reason} for s in [*support.skipped, *val.skipped]],
        "features_s": features_s,
    }
    return FewShotData(names, templates, weights.float().cpu(), support.features, support.labels, support.paths,
                       caption_feats, val.features, val.labels, clip.info, info, support_views)


def prepare_data(config: FewShotRecipeConfig, kind: str, *, device: str = "cpu", progress: bool = True) -> FewShotData:
    """Resolve the dataset, load the CLIP and encode everything once (:func:`encode_fewshot`)."""
    from mmadapters.training.trainer import run_on_main
    from mmadapters.vision import readers
    from mmadapters.vision.clip import load_clip
    from mmadapters.vision.zeroshot import cached_classifier

    t_start = time.perf_counter()
    if isinstance(config.shots, bool) or config.shots < 1:
        raise ValueError(f"recipe.shots: expected an integer >= 1, got {config.shots!r}")
    if config.feature_batch_size < 1 or config.num_workers < 0:
        raise ValueError("recipe.feature_batch_size must be >= 1 and recipe.num_workers >= 0")
    cache_dir = _cache_dir(config)
    # under torchrun rank 0 alone generates a missing task; the other ranks take its answer
    fmt, root = run_on_main(lambda: readers.prepare_dataset_root(
        config.dataset, config.dataset_root, cache_dir, progress=progress, data_seed=config.data_seed,
        sizes={k: getattr(config, k) for k in readers.SIZE_OPTIONS}, flag=recipe_flag))
    classnames, classnames_source = readers.resolve_classnames(config.classnames, root)
    templates, templates_source = readers.resolve_templates(config.templates, root)

    t0 = time.perf_counter()
    clip = load_clip(config.model, config.pretrained, device=device, cache_dir=str(cache_dir / "weights"),
                     seed=config.seed, declare_points=False)
    load_s = time.perf_counter() - t0
    classifier_s = []

    def weights_for(names: list[str]) -> Tensor:
        classifier = cached_classifier(clip.model, clip.tokenizer, names, templates, model_name=clip.info.model,
                                       weights_identity=clip.info.identity(), cache_dir=cache_dir / "classifiers",
                                       device=device, batch_size=max(config.feature_batch_size, 256), progress=progress)
        classifier_s.append(classifier.seconds)
        return classifier.weights

    def on_unreadable(item) -> None:
        if config.on_error == "fail":
            raise ValueError(f"{item.path}: cannot read image ({item.reason}); set recipe.on_error: skip to go on")

    data = encode_fewshot(clip, fmt, root, classnames, templates, weights_for, kind=kind, shots=config.shots,
                          seed=config.seed, val_split=config.val_split, train_split=config.train_split,
                          support_root=config.support_root, views=getattr(config, "views", 10) if kind == "tip-f" else 0,
                          captions=getattr(config, "captions", None), batch_size=config.feature_batch_size,
                          num_workers=config.num_workers, device=device, progress=progress,
                          on_unreadable=on_unreadable)
    features_s = data.info.pop("features_s")
    data.info = {
        "dataset": readers.dataset_name(config.dataset, fmt, root), "format": fmt, "generated": fmt != config.dataset,
        "root": str(root.resolve()), "train_split": config.train_split, "val_split": config.val_split,
        "support_root": config.support_root, "shots": config.shots, "seed": config.seed,
        "classnames_source": classnames_source, "templates_source": templates_source, **data.info,
        "timings": {"model_load_s": round(load_s, 4), "classifier_s": round(classifier_s[0], 4),
                    "features_s": round(features_s, 4), "total_s": round(time.perf_counter() - t_start, 4)},
    }
    return data


# ---------------------------------------------------------------------------------------------------
# The saved cache model


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")  # as mmadapters.io declares adapter tensors: "float32", "int64"


def save_cache_model(model: nn.Module, directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``model`` (a TipAdapter, TipAdapterF or CapsAdapter) into ``directory``; both files atomically.

    ``cache_model.safetensors`` holds the module's state (parameters and buffers, CPU, contiguous);
    ``cache_model.json`` holds ``meta`` plus the format, the kind, the hyperparameters (α, β, and for CapS
    γ, δ, T) and the tensor shapes. The JSON is written last: a directory with a JSON is complete.
    """
    from safetensors.torch import save

    from mmadapters import __version__
    from mmadapters.eval.results_io import null_non_finite
    from mmadapters.eval.results_schema import jsonable
    from mmadapters.io import atomic_write_bytes

    kind = getattr(model, "kind", None)
    if kind not in KINDS:
        raise TypeError(f"save_cache_model: expected a TipAdapter, TipAdapterF or CapsAdapter, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    hyper = {"alpha": float(model.alpha), "beta": float(model.beta)}
    if kind == "caps":
        hyper.update(gamma=float(model.gamma), delta=float(model.delta), temperature=float(model.temperature))
    config = {
        "format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION, "kind": kind, "hyperparams": hyper,
        **jsonable(meta),
        "tensors": {k: list(v.shape) for k, v in state.items()},
        "dtypes": {k: _dtype_name(v) for k, v in state.items()},  # what the loader accepts
        "library": {"name": "mmadapters", "version": __version__},
    }
    atomic_write_bytes(directory / CACHE_WEIGHTS, save(state, metadata={"format": CACHE_FORMAT, "kind": kind}))
    # an undefined validation metric (acc5 with < 5 classes) is null: the loader refuses NaN/Infinity anywhere
    config = null_non_finite(config)
    atomic_write_bytes(directory / CACHE_CONFIG, (json.dumps(config, indent=2, allow_nan=False) + "\n").encode())
    return directory


@dataclass
class LoadedCacheModel:
    """What :func:`load_cache_model` returns: the model (eval mode) and its ``cache_model.json``."""

    model: nn.Module  # .logits((B, D) normalized image features) -> (B, C)
    config: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def classnames(self) -> list[str]:
        return list(self.config["classnames"])


def load_cache_model(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> LoadedCacheModel:
    """Load a cache model written by :func:`save_cache_model` (e.g. ``runs/tip/best``).

    Errors name the file and the field. Tensors are read with safetensors (no pickle). Refused: NaN / Infinity in
    the JSON (``"alpha": NaN``), NaN / inf in a tensor (Tip-F's trained keys included), and a tensor stored in
    another dtype than the JSON's ``dtypes`` declares (files without ``dtypes``: than the cache model holds).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mmadapters.io import check_stored_tensors, read_json_object
    from mmadapters.vision.fewshot import SupportSet

    directory = Path(directory)
    cfg_path, weights_path = directory / CACHE_CONFIG, directory / CACHE_WEIGHTS
    if not cfg_path.is_file():
        hint = " (it holds core adapters: load them with mmadapters.load_adapters)" if (directory / "adapter_config.json").is_file() \
            or any(directory.glob("*/adapter_config.json")) else ""
        raise FileNotFoundError(f"{directory}: no {CACHE_CONFIG}; expected the output of `mmadapters train tip-adapter` "
                                f"or `caps-adapter` (its best/ or last/ folder){hint}")
    config = read_json_object(cfg_path, f"no {CACHE_CONFIG}")
    if config.get("format") != CACHE_FORMAT:
        raise ValueError(f"{cfg_path}: field 'format' is {config.get('format')!r}, expected {CACHE_FORMAT!r}")
    if config.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: field 'format_version' is {config.get('format_version')!r}, this version of "
                         f"mmadapters reads {CACHE_FORMAT_VERSION}")
    kind = config.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{cfg_path}: field 'kind' is {kind!r}, expected one of {', '.join(KINDS)}")
    hyper = config.get("hyperparams")
    needed = ("alpha", "beta", "gamma", "delta", "temperature") if kind == "caps" else ("alpha", "beta")
    if not isinstance(hyper, dict) or any(not isinstance(hyper.get(k), int | float) for k in needed):
        raise ValueError(f"{cfg_path}: field 'hyperparams' must hold numbers {', '.join(needed)}, got {hyper!r}")
    if not isinstance(config.get("classnames"), list):
        raise ValueError(f"{cfg_path}: field 'classnames' must be a list of class names")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory}: {CACHE_CONFIG} present but {CACHE_WEIGHTS} is missing")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path}: unreadable safetensors file ({e})") from None
    shapes = {k: list(v.shape) for k, v in state.items()}
    if shapes != config.get("tensors"):
        raise ValueError(f"{weights_path}: tensors {shapes} do not match field 'tensors' of {cfg_path}")
    check_stored_tensors(state, config, weights_path, cfg_path)  # before the model checks them without the file name

    def tensor(name: str) -> Tensor:
        if name not in state:
            raise ValueError(f"{weights_path}: missing tensor {name!r} for kind {kind!r}")
        return state[name]

    from mmadapters.vision.caps_adapter import CapsAdapter
    from mmadapters.vision.tip_adapter import TipAdapter, TipAdapterF

    try:  # the constructors check shapes, kinds and normalization, naming the argument: add the file
        if kind == "caps":
            support = SupportSet(tensor("image_keys"), tensor("cache_labels"), tensor("caption_keys"))
            model = CapsAdapter(tensor("clip_weights"), support, temperature=float(hyper["temperature"]))
        else:
            cls = TipAdapterF if kind == "tip-f" else TipAdapter
            model = cls(tensor("clip_weights"), SupportSet(tensor("cache_keys"), tensor("cache_labels")))
    except (TypeError, ValueError) as e:
        raise ValueError(e.args[0] if str(e).startswith(str(weights_path)) else f"{weights_path}: {e}") from None
    if "dtypes" not in config:  # written before dtypes were declared: the cache model's own dtypes are expected
        own = model.state_dict()
        for key, t in state.items():
            if key in own and t.dtype != own[key].dtype:
                raise ValueError(f"{weights_path}: tensor {key!r} is stored as {_dtype_name(t)}; a {kind} cache "
                                 f"model holds {_dtype_name(own[key])}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights_path}: tensors do not fit a {kind} cache model ({e})") from None
    for k in needed:
        if k != "temperature":
            setattr(model, k, float(hyper[k]))
    model.hyperparams = dict(config.get("search") or hyper)
    model.requires_grad_(False)
    return LoadedCacheModel(model.to(device).eval(), config)


# ---------------------------------------------------------------------------------------------------
# The engine's TrainTask


class CacheModelTask:
    """A :class:`mmadapters.training.trainer.TrainTask` over a few-shot cache model (precomputed features).

    ``model`` is the cache model; only Tip-F's ``keys.weight`` (N, D) has ``requires_grad``. A training
    item is one support image: ``get_batch`` returns its feature (B, D) and label (B,); ``loss`` is the
    cross-entropy of the model's logits (B, C) (for Tip-F at the (α, β) found before training).
    """

    select_metric = "val_acc1"
    select_mode = "max"

    def __init__(self, kind: str, data: FewShotData, config: FewShotRecipeConfig, *, device: str = "cpu",
                 progress: bool = True, settings: dict[str, Any] | None = None):
        from mmadapters.vision.fewshot import fit_fewshot, support_set

        self.kind, self.data, self.config, self.device = kind, data, config, device
        self.settings = settings or {}
        captions = None if data.caption_feats is None else data.caption_feats.to(device)
        views = None if data.support_views is None else data.support_views.to(device)
        # with views, the official cache: keys = mean of the augmented views
        support = support_set(data.support_feats.to(device), data.support_labels.to(device), views=views,
                              caption_feats=captions)
        if views is not None:  # a training item is one view of one support image: item i is view i // N of image i % N
            self.train_feats = support.views.flatten(0, 1)
            self.train_labels = support.labels.repeat(support.views.shape[0])
        else:
            self.train_feats, self.train_labels = support.image_feats, support.labels
        self.val_feats, self.val_labels = data.val_feats.to(device), data.val_labels.to(device)
        self.search_options: dict[str, Any] = {k: getattr(config, k) for k in ("alphas", "betas")
                                               if getattr(config, k, None) is not None}
        options = dict(self.search_options)
        if kind == "caps":
            options.update({k: getattr(config, k) for k in ("gammas", "deltas") if getattr(config, k, None) is not None},
                           temperature=config.temperature)
        t0 = time.perf_counter()
        # Tip-F: (α, β) searched with the keys still F; the engine trains the keys (train=False)
        self.model: nn.Module = fit_fewshot(kind, data.weights.to(device), support, self.val_feats, self.val_labels,
                                            seed=config.seed, progress=progress, train=False, **options)
        self.fit_s = time.perf_counter() - t0
        self.model.requires_grad_(False)
        if kind == "tip-f":
            # Tip-F trains at the official fixed initial (α, β), as TipAdapterF.fit does; validate searches on a copy.
            from mmadapters.vision.tip_adapter import INIT_ALPHA, INIT_BETA

            self.model.alpha, self.model.beta = INIT_ALPHA, INIT_BETA
            self.model.keys.weight.requires_grad_(True)
        self.train_hyperparams = {**self.model.hyperparams, "train_alpha": self.model.alpha,
                                  "train_beta": self.model.beta, "train_items": int(self.train_labels.numel())}

    # -- training ----------------------------------------------------------------------------------

    def train_size(self) -> int:
        return int(self.train_labels.numel())

    def get_batch(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """Support features (B, D) and labels (B,) of ``indices``, on the task's device."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.train_feats.device)
        return self.train_feats[idx], self.train_labels[idx]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean cross-entropy of the cache model's logits (B, C) against the support labels (B,)."""
        feats, labels = batch
        return F.cross_entropy(model(feats), labels)

    # -- validation and saving ---------------------------------------------------------------------

    def fitted_model(self) -> nn.Module:
        """The model as it would be saved now: for Tip-F a copy with (α, β) searched for the current keys."""
        if self.kind != "tip-f":
            return self.model
        searched = copy.deepcopy(self.model)
        searched.requires_grad_(False)
        searched.search(self.val_feats, self.val_labels, **self.search_options)
        return searched

    def _metrics(self, model: nn.Module) -> dict[str, float]:
        from mmadapters.eval.metrics import classification_metrics, topk_accuracy

        labels = self.val_labels.cpu()
        with torch.no_grad():
            logits = model.logits(self.val_feats).float().cpu()
            metrics = {f"val_{k}": v for k, v in classification_metrics(logits, labels).items()}
            metrics["val_zeroshot_acc1"] = topk_accuracy(model.clip_logits(self.val_feats).cpu(), labels, 1)
            if self.kind == "tip-f":  # the official per-epoch criterion: accuracy at the training (α, β)
                metrics["val_acc1_train_hparams"] = topk_accuracy(self.model.logits(self.val_feats).cpu(), labels, 1)
        metrics["alpha"], metrics["beta"] = float(model.alpha), float(model.beta)
        if self.kind == "caps":
            metrics["gamma"], metrics["delta"] = float(model.gamma), float(model.delta)
        return metrics

    def validate(self) -> dict[str, float]:
        """Top-1/top-5/mean per-class recall on the validation split of the (re-searched) cache model."""
        return self._metrics(self.fitted_model())

    def save(self, directory: Path) -> None:
        """Write the fitted cache model (:func:`save_cache_model`) with its validation metrics."""
        model = self.fitted_model()
        meta = {
            "classnames": self.data.classnames, "templates": self.data.templates,
            "clip": {**self.data.clip_info.as_dict(), "identity": self.data.clip_info.identity()},
            "data": {k: v for k, v in self.data.info.items() if k not in ("timings",)},
            "search": model.hyperparams, "train_hyperparams": self.train_hyperparams if self.kind == "tip-f" else None,
            "validation": self._metrics(model), "parameters": self.parameter_counts(), "settings": self.settings,
        }
        save_cache_model(model, directory, meta)

    def parameter_counts(self) -> dict[str, int]:
        """trainable: Tip-F's keys (0 for Tip/CapS); cache: every tensor of the cache model; total adds the CLIP."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        cache = sum(t.numel() for t in self.model.state_dict().values())
        backbone = int(self.data.info.get("backbone_parameters", 0))
        return {"trainable": trainable, "total": backbone + cache, "cache": cache, "backbone": backbone}


def _build(kind_of: str):
    def build_task(config: FewShotRecipeConfig, trainer: Any) -> CacheModelTask:
        kind = getattr(config, "variant", kind_of)
        steps = int(getattr(trainer, "steps", 0))
        if kind != "tip-f" and steps != 0:
            what = "recipe.variant 'tip' is" if kind_of == "tip" else "caps-adapter is"
            hint = " or recipe.variant: tip-f to train the cache keys" if kind_of == "tip" else ""
            raise ValueError(f"trainer.steps: {what} training-free and needs trainer.steps: 0 (fit + validate + save), "
                             f"got {steps}{hint}")
        device = str(getattr(trainer, "device", "cpu"))
        from mmadapters import distributed

        progress = bool(getattr(trainer, "progress", True)) and distributed.is_main()
        data = prepare_data(config, kind, device=device, progress=progress)
        data.info["backbone_parameters"] = _clip_parameters(config, data)
        settings = {"recipe": asdict(config), "kind": kind}
        return CacheModelTask(kind, data, config, device=device, progress=progress, settings=settings)

    return build_task


def _clip_parameters(config: FewShotRecipeConfig, data: FewShotData) -> int:
    """Parameters of the CLIP the features came from (for ``parameter_counts``), read from its weights file."""
    path = data.clip_info.weights_path
    if path and str(path).endswith(".safetensors") and Path(path).is_file():
        from safetensors import safe_open

        total = 0
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                total += int(torch.Size(f.get_slice(k).get_shape()).numel())
        return total
    return 0


def _recipe(name: str, config_class: type, kind: str, defaults: dict[str, Any], description: str):
    from mmadapters.training.recipe import Recipe

    return Recipe(name=name, config_class=config_class, build_task=_build(kind), trainer_defaults=defaults,
                  description=description)


# Tip-Adapter-F's schedule: AdamW lr 1e-3, cosine, ~20 epochs (1 step per epoch for 16 shots x 10 classes
# at batch 256). select_metric: validation top-1 of the re-searched model.
TIP_DEFAULTS: dict[str, Any] = {"steps": 20, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.01, "schedule": "cosine",
                                "warmup_ratio": 0.0, "grad_clip": None, "eval_every": 1, "checkpoint_every": 5,
                                "log_every": 1, "select_metric": "val_acc1", "select_mode": "max"}
CAPS_DEFAULTS: dict[str, Any] = {"steps": 0, "select_metric": "val_acc1", "select_mode": "max"}

TIP_RECIPE = _recipe("tip-adapter", TipRecipeConfig, "tip", TIP_DEFAULTS,
                     "Tip-Adapter (variant tip, training-free, steps 0) / Tip-Adapter-F (variant tip-f, trains the cache "
                     "keys) on K shots per class; hyperparameters searched on the validation split")
CAPS_RECIPE = _recipe("caps-adapter", CapsRecipeConfig, "caps", CAPS_DEFAULTS,
                      "CapS-Adapter (training-free, steps 0): image + caption cache with the TIP-X KL term; "
                      "hyperparameters searched on the validation split")
