"""The zero-shot (and few-shot adapter) image classification evaluator behind ``mmadapters zeroshot``.

One run: load a CLIP, open a dataset split, build (or load the cached) zero-shot classifier, encode
the images, optionally fit Tip-Adapter / Tip-Adapter-F / CapS-Adapter on K shots per class (tuned on
the validation split only), score, and write a results JSON in CLIP_benchmark's schema::

    {"dataset", "model", "pretrained", "task", "metrics": {"acc1", "acc5", "mean_per_class_recall"},
     "counts": {...}, "timings": {...}, "settings": {...}, "adapter": {...} | null,
     "mmadapters_version", "run_key", "created"}

Result files are never silently replaced by a *different* run: an existing output whose ``run_key``
(a hash of what determines the numbers: model and weights, dataset, split, class names, templates,
adapter, shots, seed) differs stops the run unless ``overwrite`` is set. Re-running the same
configuration refreshes the file. Files are written atomically.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .metrics import classification_metrics
from .readers import (
    CoopSplitDataset,
    CsvDataset,
    ImageDataset,
    ImageFolderDataset,
    Unreadable,
    WdsDataset,
    collate_with_skips,
    read_classnames,
    read_templates,
    wds_templates_file,
)
from .results_io import check_overwrite, jsonable, results_key, write_results

FORMATS = ("imagefolder", "csv", "coop", "wds")
ADAPTERS = ("none", "tip", "tip-f", "caps")
DEFAULT_OUTPUT = "{dataset}_{model}_{task}.json"
MAX_LISTED_SKIPS = 1000


class UnreadableImageError(RuntimeError):
    """An image could not be read and the run was asked to fail (``on_error="fail"``)."""


@dataclass
class ZeroShotConfig:
    """Everything a run depends on; field names follow the command-line flags."""

    model: str | None = None  # None: the shipped tiny CLIP
    pretrained: str | None = None
    dataset: str = "synth-shapes"  # a format (imagefolder, csv, coop, wds) or a generated task name
    dataset_root: str | None = None
    split: str = "test"
    batch_size: int = 64
    num_workers: int = 0
    templates: str | None = None
    classnames: str | None = None
    output: str | None = DEFAULT_OUTPUT
    predictions: str | None = None
    device: str = "cpu"
    adapter: str = "none"
    shots: int = 16
    support_root: str | None = None
    captions: str | None = None
    on_error: str = "skip"
    cache_dir: str | None = None
    seed: int = 0
    val_split: str = "val"
    overwrite: bool = False
    progress: bool = True


def default_cache_dir() -> Path:
    """``$MMADAPTERS_CACHE``, else ``$XDG_CACHE_HOME/mmadapters``, else ``~/.cache/mmadapters``."""
    if os.environ.get("MMADAPTERS_CACHE"):
        return Path(os.environ["MMADAPTERS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmadapters"


def _slug(value: str | None) -> str:
    text = "none" if not value else str(value)
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text).strip("_") or "none"


def prepare_dataset_root(config: ZeroShotConfig, cache_dir: Path) -> tuple[str, Path]:
    """(format, root). A generated task (``synth-shapes`` ...) is written into its root when missing."""
    if config.dataset in FORMATS:
        if not config.dataset_root:
            raise ValueError(f"--dataset {config.dataset} needs --dataset-root")
        return config.dataset, Path(config.dataset_root)
    from mmadapters.vision.synth import TASKS, generate_task

    if config.dataset not in TASKS:
        raise ValueError(f"--dataset {config.dataset!r}: expected a format ({', '.join(FORMATS)}) or a generated "
                         f"task ({', '.join(sorted(TASKS))})")
    root = Path(config.dataset_root) if config.dataset_root else cache_dir / "datasets" / config.dataset
    meta = root / "task.json"
    if not meta.is_file():  # generated once with the task's canonical settings; --seed does not change the data
        print(f"generating {config.dataset} into {root}")
        generate_task(config.dataset, root, progress=config.progress)
    else:
        try:
            recorded = json.loads(meta.read_text(encoding="utf-8")).get("task")
        except (ValueError, AttributeError):
            recorded = None
        if recorded != config.dataset:
            raise ValueError(f"{meta}: field 'task' is {recorded!r}, expected {config.dataset!r}; point "
                             "--dataset-root at that task's folder (or an empty one to generate it)")
    return "imagefolder", root


def open_split(fmt: str, root: Path, split: str, transform, classnames: list[str] | None) -> ImageDataset:
    """The reader for ``split`` of a dataset in format ``fmt`` rooted at ``root``."""
    if fmt == "imagefolder":
        split_dir = root / split
        if split_dir.is_dir():
            return ImageFolderDataset(split_dir, transform, classnames)
        if any((root / s).is_dir() for s in ("train", "val", "test")):
            raise FileNotFoundError(f"{root}: no folder for split {split!r} (expected {split_dir})")
        return ImageFolderDataset(root, transform, classnames)  # a flat image folder is its own split
    if fmt == "csv":
        csv_path = root if root.is_file() else root / f"{split}.csv"
        return CsvDataset(csv_path, transform, classnames)
    if fmt == "coop":
        return CoopSplitDataset(root, split, transform)
    if fmt == "wds":
        return WdsDataset(root, split, transform, classnames)
    raise ValueError(f"unknown dataset format {fmt!r}; expected one of {FORMATS}")


def resolve_classnames(config: ZeroShotConfig, root: Path) -> tuple[list[str] | None, str]:
    """(class names or None to take the reader's, where they came from)."""
    if config.classnames:
        return read_classnames(config.classnames), str(config.classnames)
    base = root if root.is_dir() else root.parent
    if (base / "classnames.txt").is_file():
        return read_classnames(base / "classnames.txt"), str(base / "classnames.txt")
    return None, "dataset"


def resolve_templates(config: ZeroShotConfig, root: Path) -> tuple[list[str], str]:
    from mmadapters.vision.zeroshot import DEFAULT_TEMPLATES

    if config.templates:
        return read_templates(config.templates), str(config.templates)
    base = root if root.is_dir() else root.parent
    for candidate in (base / "templates.txt", wds_templates_file(base)):
        if candidate.is_file():
            return read_templates(candidate), str(candidate)
    return list(DEFAULT_TEMPLATES), "built-in"


def read_captions(path: Path) -> dict[Path, str]:
    """``captions.jsonl`` lines ``{"image": <path relative to the file's folder>, "caption": ...}`` -> {abs path: caption}."""
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    out: dict[Path, str] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i}: not valid JSON ({e})") from e
        for key in ("image", "caption"):
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise ValueError(f"{path}: line {i} field {key!r}: expected a string")
        out[(path.parent / record["image"]).resolve()] = record["caption"]
    return out


def image_loader(dataset, config: ZeroShotConfig):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers,
                      collate_fn=collate_with_skips, pin_memory=config.device.startswith("cuda"))


def output_path(template: str, *, dataset: str, model: str, pretrained: str | None, task: str) -> Path:
    """Fill ``{dataset} {model} {pretrained} {task}`` (file-name safe) into the output template."""
    try:
        return Path(template.format(dataset=_slug(dataset), model=_slug(model), pretrained=_slug(pretrained),
                                    task=_slug(task)))
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"--output {template!r}: only {{dataset}}, {{model}}, {{pretrained}} and {{task}} can be "
                         f"filled in ({e})") from e


def evaluate_zeroshot(config: ZeroShotConfig) -> dict[str, Any]:
    """Run one evaluation and write its results (and predictions). Returns the results dictionary."""
    from mmadapters import __version__
    from mmadapters.io import atomic_write_bytes
    from mmadapters.vision.clip import load_clip
    from mmadapters.vision.zeroshot import cached_classifier, extract_image_features, zeroshot_logits

    t_start = time.perf_counter()
    if config.adapter not in ADAPTERS:
        raise ValueError(f"--adapter {config.adapter!r}: expected one of {', '.join(ADAPTERS)}")
    if config.on_error not in ("skip", "fail"):
        raise ValueError(f"--on-error {config.on_error!r}: expected skip or fail")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}: CUDA is not available on this machine")
    if config.batch_size < 1 or config.num_workers < 0 or config.shots < 1:
        raise ValueError("--batch-size and --shots must be >= 1 and --num-workers >= 0")
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    fmt, root = prepare_dataset_root(config, cache_dir)
    dataset_name = config.dataset if fmt != config.dataset else (root.stem if root.is_file() else root.name)
    classnames, classnames_source = resolve_classnames(config, root)
    templates, templates_source = resolve_templates(config, root)

    t0 = time.perf_counter()
    clip = load_clip(config.model, config.pretrained, device=config.device, cache_dir=str(cache_dir / "weights"),
                     seed=config.seed, declare_points=False)
    load_s = time.perf_counter() - t0
    model_label = config.model or "tiny_clip"
    dataset = open_split(fmt, root, config.split, clip.preprocess, classnames)
    classnames = classnames or dataset.classnames
    if max(dataset.labels) >= len(classnames):
        raise ValueError(f"{root}: labels go up to {max(dataset.labels)} but there are {len(classnames)} class names "
                         f"(from {classnames_source})")
    task = "zeroshot_classification" if config.adapter == "none" else f"{config.adapter}_{config.shots}shot_classification"
    run_key = results_key({"model": clip.info.model, "weights": clip.info.identity(), "dataset": dataset_name,
                        "format": fmt, "root": str(root.resolve()), "split": config.split, "classnames": classnames,
                        "templates": templates, "task": task, "seed": config.seed, "val_split": config.val_split,
                        "support_root": config.support_root, "captions": config.captions})
    out_path = None
    if config.output:
        out_path = output_path(config.output, dataset=dataset_name, model=clip.info.short_name if config.model else
                               model_label, pretrained=config.pretrained and Path(config.pretrained).stem, task=task)
        check_overwrite(out_path, run_key, config.overwrite)

    classifier = cached_classifier(clip.model, clip.tokenizer, classnames, templates, model_name=clip.info.model,
                                   weights_identity=clip.info.identity(), cache_dir=cache_dir / "classifiers",
                                   device=config.device, batch_size=max(config.batch_size, 256),
                                   progress=config.progress)

    def on_unreadable(item: Unreadable) -> None:
        if config.on_error == "fail":
            raise UnreadableImageError(f"{item.path}: cannot read image ({item.reason}); use --on-error skip to "
                                       "count it and go on")

    t0 = time.perf_counter()
    feats = extract_image_features(clip.model, image_loader(dataset, config), device=config.device,
                                   progress=config.progress, on_unreadable=on_unreadable, desc=f"{config.split} images")
    features_s = time.perf_counter() - t0
    if not feats.paths:
        raise ValueError(f"{root}: none of the {len(dataset)} images of split {config.split!r} could be read")

    adapter_info = None
    fit_s = 0.0
    weights = classifier.weights.to(config.device)
    if config.adapter == "none":
        logits = zeroshot_logits(feats.features.to(config.device), weights).cpu()
    else:
        t0 = time.perf_counter()
        clf, adapter_info = _fit_adapter(config, fmt, root, clip, weights, classnames, on_unreadable)
        fit_s = time.perf_counter() - t0
        with torch.inference_mode():
            logits = clf.logits(feats.features.to(config.device)).float().cpu()
    metrics = classification_metrics(logits, feats.labels)

    if config.predictions:
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices.tolist()
        lines = [json.dumps({"path": p, "label": int(y), "prediction": t[0], "top5": t})
                 for p, y, t in zip(feats.paths, feats.labels.tolist(), top, strict=True)]
        pred_path = Path(config.predictions)
        pred_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(pred_path, ("\n".join(lines) + "\n").encode())

    reasons: dict[str, int] = {}
    for item in feats.skipped:
        kind = item.reason.split(":", 1)[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    settings = {k: v for k, v in asdict(config).items() if k not in ("progress",)}
    settings.update({"dataset_format": fmt, "dataset_root": str(root), "classnames_source": classnames_source,
                     "templates_source": templates_source, "model_resolved": clip.info.model,
                     "weights": clip.info.as_dict(), "cache_dir": str(cache_dir)})
    results = {
        "dataset": dataset_name,
        "model": model_label,
        "pretrained": config.pretrained,
        "task": task,
        "metrics": metrics,
        "counts": {
            "images": len(dataset), "evaluated": len(feats.paths), "skipped": len(feats.skipped),
            "skipped_by_reason": reasons, "classes": len(classnames), "templates": len(templates),
            "skipped_images": [{"path": s.path, "reason": s.reason} for s in feats.skipped[:MAX_LISTED_SKIPS]],
        },
        "timings": {
            "model_load_s": round(load_s, 4), "classifier_s": round(classifier.seconds, 4),
            "classifier_cache_hit": classifier.cache_hit, "features_s": round(features_s, 4),
            "adapter_fit_s": round(fit_s, 4), "total_s": round(time.perf_counter() - t_start, 4),
        },
        "settings": settings,
        "adapter": adapter_info,
        "mmadapters_version": __version__,
        "run_key": run_key,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    if out_path is not None:
        write_results(out_path, results)
    return results


def _fit_adapter(config: ZeroShotConfig, fmt: str, root: Path, clip, weights: torch.Tensor, classnames: list[str],
                 on_unreadable) -> tuple[Any, dict[str, Any]]:
    """Support = ``shots`` images per class (seeded) from the train split or ``support_root``; tuned on val."""
    from mmadapters.vision.fewshot import SupportSet, caps_prompt, fit_fewshot, sample_shots
    from mmadapters.vision.zeroshot import encode_texts, extract_image_features

    captions = None
    if config.adapter == "caps":
        base = root if root.is_dir() else root.parent
        cap_path = Path(config.captions) if config.captions else base / "captions.jsonl"
        if not cap_path.is_file():
            raise FileNotFoundError(f"--adapter caps needs captions for the support images: no {cap_path}; pass "
                                    "--captions FILE (JSON lines {\"image\": <path relative to the file>, \"caption\": ...})")
        captions = read_captions(cap_path)

    if config.support_root:
        support_ds = ImageFolderDataset(config.support_root, clip.preprocess, classnames)
    else:
        support_ds = open_split(fmt, root, "train", clip.preprocess, classnames)
    try:
        val_ds = open_split(fmt, root, config.val_split, clip.preprocess, classnames)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--adapter {config.adapter} tunes its hyperparameters on a validation split "
                         f"(--val-split {config.val_split!r}), never on test: {e}") from e
    for name, ds in (("support", support_ds), ("validation", val_ds)):
        if len(ds.classnames or classnames) != len(classnames):
            raise ValueError(f"the {name} set has {len(ds.classnames)} classes, the test split {len(classnames)}")

    index = sample_shots(torch.tensor(support_ds.labels), config.shots, config.seed, num_classes=len(classnames))
    shots = torch.utils.data.Subset(support_ds, index.tolist())
    support_feats = extract_image_features(clip.model, image_loader(shots, config), device=config.device,
                                           progress=config.progress, on_unreadable=on_unreadable, desc="support images")
    val_feats = extract_image_features(clip.model, image_loader(val_ds, config), device=config.device,
                                       progress=config.progress, on_unreadable=on_unreadable, desc="val images")
    if not support_feats.paths or not val_feats.paths:
        raise ValueError("no readable support or validation images")
    caption_feats = None
    if captions is not None:
        texts = []
        for path, label in zip(support_feats.paths, support_feats.labels.tolist(), strict=True):
            caption = captions.get(Path(path).resolve())
            if caption is None:
                raise ValueError(f"--captions: no caption for support image {path}")
            texts.append(caps_prompt(classnames[label], caption))
        caption_feats = encode_texts(clip.model, clip.tokenizer, texts, device=config.device,
                                     progress=config.progress, desc="captions")
    dev = config.device
    support = SupportSet(support_feats.features.to(dev), support_feats.labels.to(dev),
                         None if caption_feats is None else caption_feats.to(dev))
    clf = fit_fewshot(config.adapter, weights, support, val_feats.features.to(dev), val_feats.labels.to(dev),
                      seed=config.seed, progress=config.progress)
    hyper = {k: jsonable(v) for k, v in clf.hyperparams.items()}
    info = {"kind": config.adapter, "shots": config.shots, "support_images": len(support_feats.paths),
            "support_skipped": len(support_feats.skipped), "val_images": len(val_feats.paths),
            "val_skipped": len(val_feats.skipped), "captions": captions is not None, "hyperparams": hyper}
    return clf, info
