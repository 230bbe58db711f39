"""The evaluators behind ``mmadapters eval zeroshot`` and ``mmadapters eval fewshot`` (flags: ``eval_clip_args``).

Both score images one batch at a time through :func:`mmadapters.eval.sample_runner.run_samples`: each
image's record is ``{"label": int, "top5": [class indices, best first]}`` (top-k with k = min(5, C)),
appended to ``<output>.samples.jsonl`` as soon as its batch is done. A rerun of an interrupted evaluation
(same settings, hence the same ``run_key``) takes the recorded images from that log and evaluates only
the rest. Metrics come from the records alone — ``acc1`` (top5[0] == label), ``acc5`` (label in top5;
NaN with fewer than 5 classes, as CLIP_benchmark reports it), ``mean_per_class_recall`` — so a resumed
run gives exactly the numbers of an uninterrupted one. An unreadable image is skipped with its reason
(``--fail-fast`` stops instead). ``per_group`` holds each class's recall and image count.

- zeroshot: logits ``100 · f · W`` with the cached zero-shot classifier W (``vision.zeroshot``); the
  datasets, class names and templates are resolved exactly as ``mmadapters zeroshot`` resolves them.
- fewshot: the cache model saved by ``mmadapters train tip-adapter|caps-adapter``
  (``vision.fewshot_train.load_cache_model``); the CLIP must be the one recorded with it.

Under torchrun the images are sharded over the ranks and rank 0 writes the results file.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

TOPK = 5


class UnreadableImage(ValueError):
    """An image that could not be opened or decoded (the reader's reason is the message)."""


def _slug(value: str | None) -> str:
    text = "none" if not value else str(value)
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text).strip("_") or "none"


def fill_output(template: str, **fields: str | None) -> Path:
    """``template`` with ``{dataset} {model} {pretrained} {task} {kind}`` filled in (file-name safe)."""
    try:
        return Path(template.format(**{k: _slug(v) for k, v in fields.items()}))
    except (KeyError, IndexError, ValueError) as e:
        names = " ".join(f"{{{k}}}" for k in fields)
        raise ValueError(f"--output {template!r}: only {names} can be filled in ({e})") from None


def sample_ids(dataset, root: Path) -> list[str]:
    """A stable id per image of ``dataset``: its path relative to the dataset root when inside it."""
    base = root if root.is_dir() else root.parent
    ids = []
    for path, _ in dataset.samples:
        p = Path(path)
        try:
            ids.append(p.resolve().relative_to(base.resolve()).as_posix())
        except ValueError:
            ids.append(str(path))
    return ids


def encode_batch(model: torch.nn.Module, images: Tensor, device: torch.device | str) -> Tensor:
    """(B, 3, H, W) images -> (B, D) L2-normalized CLIP image features (float32)."""
    with torch.inference_mode():
        feats = model.encode_image(images.to(device))
    return torch.nn.functional.normalize(feats.float(), dim=-1)


def make_predict(dataset, clip_model: torch.nn.Module, score: Callable[[Tensor], Tensor],
                 device: torch.device | str) -> Callable[[list[int]], list[dict | BaseException]]:
    """``predict(indices)`` for run_samples: read the images, encode the readable ones, score them.

    ``score`` maps (B, D) normalized features to (B, C) logits. Records are ``{"label", "top5"}``; an
    unreadable image gives an :class:`UnreadableImage` carrying the reader's reason.
    """
    from .readers import Unreadable

    def predict(indices: list[int]) -> list[dict | BaseException]:
        out: list[dict | BaseException | None] = [None] * len(indices)
        images, labels, slots = [], [], []
        for j, i in enumerate(indices):
            item = dataset[i]
            if isinstance(item, Unreadable):
                out[j] = UnreadableImage(item.reason)
                continue
            image, label, _ = item
            images.append(image)
            labels.append(int(label))
            slots.append(j)
        if images:
            feats = encode_batch(clip_model, torch.stack(images), device)
            with torch.inference_mode():
                logits = score(feats).float().cpu()
            top = logits.topk(min(TOPK, logits.shape[1]), dim=1).indices.tolist()
            for j, label, t in zip(slots, labels, top, strict=True):
                out[j] = {"label": label, "top5": t}
        return out  # type: ignore[return-value]

    return predict


def records_metrics(records: Sequence[dict], classnames: Sequence[str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(metrics, per-class) from ``{"label", "top5"}`` records: acc1, acc5, mean per-class recall."""
    from .metrics import mean_per_class_recall

    labels = torch.tensor([int(r["label"]) for r in records], dtype=torch.long)
    preds = torch.tensor([int(r["top5"][0]) for r in records], dtype=torch.long)
    n = len(records)
    acc1 = (preds == labels).double().mean().item() if n else float("nan")
    hits5 = [int(r["label"]) in [int(c) for c in r["top5"][:TOPK]] for r in records]
    acc5 = sum(hits5) / n if n and len(classnames) >= TOPK else float("nan")
    metrics = {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": mean_per_class_recall(preds, labels, len(classnames))}
    per_class: dict[str, dict[str, float]] = {}
    counts = torch.bincount(labels, minlength=len(classnames))
    correct = torch.bincount(labels[preds == labels], minlength=len(classnames))
    duplicated = len(set(classnames)) != len(classnames)
    for c, name in enumerate(classnames):
        key = f"{name} ({c})" if duplicated else name
        total = int(counts[c])
        per_class[key] = {"recall": correct[c].item() / total if total else None, "images": total}
    return metrics, per_class


def write_predictions(path: Path, ids: Sequence[str], records: dict[str, dict], classnames: Sequence[str]) -> None:
    """One JSON line per evaluated image, in dataset order: id, label, prediction, top5 (indices) and their names."""
    import json

    from mmadapters.io import atomic_write_bytes

    lines = [json.dumps({"id": i, "label": r["label"], "prediction": r["top5"][0], "top5": r["top5"],
                         "top5_names": [classnames[c] for c in r["top5"]]}, ensure_ascii=False)
             for i in ids if (r := records.get(i)) is not None]
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _cache_dir(args: argparse.Namespace) -> Path:
    from .zeroshot_eval import default_cache_dir

    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def _prepare_root(config, cache_dir: Path) -> tuple[str, Path]:
    """``zeroshot_eval.prepare_dataset_root``; under torchrun rank 0 alone generates a missing task."""
    from mmadapters.training.trainer import run_on_main

    from .zeroshot_eval import prepare_dataset_root

    return run_on_main(lambda: prepare_dataset_root(config, cache_dir))


def _clip_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def evaluate_samples(*, args: argparse.Namespace, dataset, ids: list[str], clip, score: Callable[[Tensor], Tensor],
                     device, classnames: list[str], identity: dict[str, Any], settings: dict[str, Any],
                     output_fields: dict[str, str | None], timings: dict[str, float], t_start: float,
                     parameters: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The shared second half: resumable sample loop, metrics from records, results written by rank 0."""
    from mmadapters import distributed

    from .results_io import check_overwrite
    from .results_schema import build_results, run_key, write_results
    from .sample_runner import SampleLog, run_samples

    key = run_key(settings=settings, **identity)
    output = fill_output(args.output, **output_fields)
    if distributed.is_main():
        check_overwrite(output, key, args.overwrite)  # before any work: the file holds another run
    log = SampleLog.open(output, key, restart=args.restart)
    t0 = time.perf_counter()
    outcome = run_samples(list(range(len(dataset))), sample_id=lambda i: ids[i],
                          predict=make_predict(dataset, clip.model, score, device), batch_size=args.batch_size,
                          log=log, fail_fast=args.fail_fast, progress=args.progress,
                          desc=f"{identity['task'].split('_')[0]} {args.split}")
    timings["evaluate_s"] = time.perf_counter() - t0
    records = list(outcome.records.values())
    if not records:
        raise ValueError(f"{settings['dataset_root']}: none of the {len(dataset)} images of split {args.split!r} could be read "
                         f"(first reason: {outcome.skipped[0]['reason'] if outcome.skipped else 'none'})")
    metrics, per_class = records_metrics(records, classnames)
    timings["total_s"] = time.perf_counter() - t_start
    counts = {"total": outcome.total, "evaluated": len(records), "skipped": len(outcome.skipped),
              "resumed": outcome.resumed, "classes": len(classnames)}
    results = build_results(metrics=metrics, counts=counts, skipped=outcome.skipped, settings=settings,
                            timings={k: round(v, 4) for k, v in timings.items()}, parameters=parameters,
                            per_group=per_class, extra=extra, **identity)
    if distributed.is_main():
        write_results(output, results, overwrite=args.overwrite)
        results["output"] = str(output)
        if getattr(args, "predictions", None):
            write_predictions(Path(args.predictions), ids, outcome.records, classnames)
            results["predictions"] = str(args.predictions)
    log.remove()
    return results if distributed.is_main() else None


def _in_group(args: argparse.Namespace, run: Callable[[argparse.Namespace], dict[str, Any] | None]) -> dict[str, Any] | None:
    """Run ``run(args)`` in torchrun's process group, leaving it afterwards when this call joined it."""
    from mmadapters import distributed

    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    joined = not distributed.is_distributed() and distributed.init_from_env(args.device)
    try:
        return run(args)
    finally:
        if joined:
            distributed.cleanup()


def run_zeroshot(args: argparse.Namespace) -> dict[str, Any] | None:
    """``mmadapters eval zeroshot``: returns the results on rank 0 (which writes them), None on other ranks."""
    return _in_group(args, _zeroshot)


def run_fewshot(args: argparse.Namespace) -> dict[str, Any] | None:
    """``mmadapters eval fewshot --adapters DIR``: a saved Tip / Tip-F / CapS cache model on a split."""
    return _in_group(args, _fewshot)


def _zeroshot(args: argparse.Namespace) -> dict[str, Any] | None:
    from mmadapters import distributed
    from mmadapters.vision.clip import load_clip
    from mmadapters.vision.zeroshot import cached_classifier, zeroshot_logits

    from .zeroshot_eval import ZeroShotConfig, open_split, resolve_classnames, resolve_templates

    t_start = time.perf_counter()
    device = distributed.device_for_rank(args.device)
    cache_dir = _cache_dir(args)
    config = ZeroShotConfig(model=args.model, pretrained=args.pretrained, dataset=args.dataset,
                            dataset_root=args.dataset_root, split=args.split, templates=args.templates,
                            classnames=args.classnames, cache_dir=str(cache_dir), seed=args.seed,
                            progress=args.progress and distributed.is_main())
    fmt, root = _prepare_root(config, cache_dir)
    dataset_name = args.dataset if fmt != args.dataset else (root.stem if root.is_file() else root.name)
    classnames, classnames_source = resolve_classnames(config, root)
    templates, templates_source = resolve_templates(config, root)

    t0 = time.perf_counter()
    clip = load_clip(args.model, args.pretrained, device=device, cache_dir=str(cache_dir / "weights"), seed=args.seed,
                     declare_points=False)
    timings = {"model_load_s": time.perf_counter() - t0}
    dataset = open_split(fmt, root, args.split, clip.preprocess, classnames)
    classnames = classnames or dataset.classnames
    if dataset.labels and max(dataset.labels) >= len(classnames):
        raise ValueError(f"{root}: labels go up to {max(dataset.labels)} but there are {len(classnames)} class names "
                         f"(from {classnames_source})")
    classifier = cached_classifier(clip.model, clip.tokenizer, classnames, templates, model_name=clip.info.model,
                                   weights_identity=clip.info.identity(), cache_dir=cache_dir / "classifiers",
                                   device=device, batch_size=max(args.batch_size, 256),
                                   progress=args.progress and distributed.is_main())
    timings["classifier_s"] = classifier.seconds
    weights = classifier.weights.to(device)
    settings = {"model_resolved": clip.info.model, "weights": clip.info.identity(), "dataset_format": fmt,
                "dataset_root": str(root.resolve()), "split": args.split, "classnames": classnames,
                "classnames_source": classnames_source, "templates": templates, "templates_source": templates_source,
                "seed": args.seed, "device": str(args.device), "batch_size": args.batch_size, "topk": TOPK}
    identity = {"dataset": dataset_name, "model": clip.info.short_name, "pretrained": args.pretrained,
                "task": "zeroshot_classification"}
    return evaluate_samples(
        args=args, dataset=dataset, ids=sample_ids(dataset, root), clip=clip, score=lambda f: zeroshot_logits(f, weights),
        device=device, classnames=classnames, identity=identity, settings=settings,
        output_fields={"dataset": dataset_name, "model": clip.info.short_name, "pretrained": args.pretrained,
                       "task": "zeroshot_classification"},
        timings=timings, t_start=t_start, parameters={"trainable": 0, "total": _clip_parameters(clip.model)},
        extra={"classifier_cache_hit": classifier.cache_hit})


def _fewshot(args: argparse.Namespace) -> dict[str, Any] | None:
    from mmadapters import distributed
    from mmadapters.vision.clip import load_clip
    from mmadapters.vision.fewshot_train import CACHE_CONFIG, CACHE_WEIGHTS, load_cache_model

    from .zeroshot_eval import ZeroShotConfig, open_split

    t_start = time.perf_counter()
    device = distributed.device_for_rank(args.device)
    cache_dir = _cache_dir(args)
    adapters = Path(args.adapters)
    loaded = load_cache_model(adapters, device=device)
    cfg, source = loaded.config, adapters / CACHE_CONFIG
    recorded_clip, data = cfg.get("clip") or {}, cfg.get("data") or {}
    model_name = args.model if args.model is not None else recorded_clip.get("model")
    pretrained = args.pretrained if args.model is not None else recorded_clip.get("pretrained")

    t0 = time.perf_counter()
    clip = load_clip(model_name, pretrained, device=device, cache_dir=str(cache_dir / "weights"),
                     seed=int(recorded_clip.get("seed") or 0), declare_points=False)
    timings = {"model_load_s": time.perf_counter() - t0}
    if recorded_clip.get("identity") and clip.info.identity() != recorded_clip["identity"]:
        raise ValueError(f"{source}: field 'clip.identity' is {recorded_clip['identity']!r} but the CLIP loaded "
                         f"({model_name}) is {clip.info.identity()!r}; the cache model only fits the CLIP it was "
                         "built with")

    if args.dataset is not None:
        dataset_arg, root_arg = args.dataset, args.dataset_root
    else:  # the data the adapters were fitted on: a generated task by its name, else its format and root
        if not data.get("dataset") or not data.get("format") or not data.get("root"):
            raise ValueError(f"{source}: fields 'data.dataset', 'data.format' and 'data.root' are needed to find the "
                             "dataset; pass --dataset (and --dataset-root)")
        dataset_arg = data["dataset"] if data.get("generated") else data["format"]
        root_arg = args.dataset_root or data["root"]
    config = ZeroShotConfig(dataset=dataset_arg, dataset_root=root_arg, split=args.split, cache_dir=str(cache_dir),
                            progress=args.progress and distributed.is_main())
    fmt, root = _prepare_root(config, cache_dir)
    dataset_name = dataset_arg if fmt != dataset_arg else (root.stem if root.is_file() else root.name)
    classnames = loaded.classnames
    dataset = open_split(fmt, root, args.split, clip.preprocess, classnames)
    if dataset.classnames is not None and len(dataset.classnames) != len(classnames):
        raise ValueError(f"{root}: split {args.split!r} has {len(dataset.classnames)} classes but the cache model in "
                         f"{adapters} was fitted on {len(classnames)}")
    model = loaded.model
    weights_file = adapters / CACHE_WEIGHTS
    parameters = dict(cfg.get("parameters") or {})
    parameters.setdefault("trainable", sum(p.numel() for p in model.parameters() if p.requires_grad))
    parameters["total"] = _clip_parameters(clip.model) + sum(t.numel() for t in model.state_dict().values())
    settings = {"model_resolved": clip.info.model, "weights": clip.info.identity(), "dataset_format": fmt,
                "dataset_root": str(root.resolve()), "split": args.split, "classnames": classnames,
                "adapters": str(adapters.resolve()), "adapters_sha256": _file_sha256(weights_file), "kind": loaded.kind,
                "hyperparams": cfg.get("hyperparams"), "shots": data.get("shots"), "shot_seed": data.get("seed"),
                "device": str(args.device), "batch_size": args.batch_size, "topk": TOPK}
    if args.split == data.get("val_split") and args.dataset is None:
        print(f"warning: evaluating on {args.split!r}, the split the hyperparameters were searched on")
    identity = {"dataset": dataset_name, "model": clip.info.short_name, "pretrained": pretrained,
                "task": "fewshot_classification"}
    extra = {"adapter": {"kind": loaded.kind, "directory": str(adapters), "hyperparams": cfg.get("hyperparams"),
                         "shots": data.get("shots"), "validation": cfg.get("validation")}}
    return evaluate_samples(
        args=args, dataset=dataset, ids=sample_ids(dataset, root), clip=clip, score=model.logits, device=device,
        classnames=classnames, identity=identity, settings=settings,
        output_fields={"dataset": dataset_name, "model": clip.info.short_name, "pretrained": pretrained,
                       "task": "fewshot_classification", "kind": loaded.kind},
        timings=timings, t_start=t_start, parameters=parameters, extra=extra)
