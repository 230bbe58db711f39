"""Image classification with CLIP: the evaluators behind ``mmadapters eval zeroshot`` (and its CLIP_benchmark-style
door ``mmadapters zeroshot``) and ``mmadapters eval fewshot``. Flags: :mod:`mmadapters.eval.eval_clip_args`.

Both score images one batch at a time through :func:`mmadapters.eval.sample_runner.evaluate`: each
image's record is ``{"label": int, "top5": [class indices, best first]}`` (top-k with k = min(5, C)),
appended to ``<output>.samples.jsonl`` as soon as its batch is done. A rerun of an interrupted evaluation
(same settings, hence the same ``run_key``) takes the recorded images from that log and evaluates only
the rest. Metrics come from the records alone — ``acc1`` (top5[0] == label), ``acc5`` (label in top5;
NaN with fewer than 5 classes, as CLIP_benchmark reports it), ``mean_per_class_recall`` — so a resumed
run gives exactly the numbers of an uninterrupted one. An unreadable image is skipped with its reason
(``--fail-fast`` / ``--on-error fail`` stops instead). ``per_group`` holds each class's recall and image
count. With ``--num-workers N`` the images are read ahead by N DataLoader worker processes.

- zeroshot: logits ``100 · f · W`` with the cached zero-shot classifier W (``vision.zeroshot``). With
  ``--adapter tip|tip-f|caps --shots K`` a Tip-Adapter / Tip-Adapter-F / CapS-Adapter is first fitted on K
  support images per class (the train split or ``--support-root``; CapS with their captions) with its
  hyperparameters searched on ``--val-split`` only, and the images are scored with it (task
  ``fewshot_classification``; what was fitted is in the results' ``adapter`` field).
- fewshot: the cache model saved by ``mmadapters train tip-adapter|caps-adapter``
  (``vision.fewshot_train.load_cache_model``); the CLIP must be the one recorded with it.

Datasets are opened by :mod:`mmadapters.vision.readers`. Under torchrun the images are sharded over the
ranks and rank 0 writes the results file.

Both tasks put ``"random_init"`` at the results' top level: true when the CLIP is a built-in open_clip name
loaded without ``--pretrained`` (random weights; ``"pretrained"`` is then null), so a number measured on an
untrained model says so in its file.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .results_io import default_cache_dir

TOPK = 5
ADAPTERS = ("none", "tip", "tip-f", "caps")


class UnreadableImage(ValueError):
    """An image that could not be opened or decoded (the reader's reason is the message)."""


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


def _items(batch: list) -> list:
    return batch  # the DataLoader hands the dataset items over as they are (Unreadable markers included)


class ReadAhead:
    """Dataset items for the batches run_samples will ask for, read ahead by DataLoader worker processes.

    :meth:`start` takes the index lists in the order they will be requested. With ``num_workers`` 0, or for a request
    that is not the next planned batch (run_samples retrying a failed batch one image at a time), items are read in
    this process. (A thread pool reading ahead in this process was measured slower than reading inline: decoding and
    the model contend for the GIL; bench/zeroshot.py's 2,000 images 1.74-1.90 s inline, 1.93-2.36 s with 1-4 threads.)
    """

    def __init__(self, dataset, num_workers: int):
        self.dataset, self.num_workers = dataset, num_workers
        self.planned: deque = deque()
        self.it = None

    def start(self, batches: list[list[int]]) -> ReadAhead:
        self.planned = deque(batches)
        if self.num_workers > 0 and batches:
            from torch.utils.data import DataLoader

            self.it = iter(DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers, collate_fn=_items))
        return self

    def read(self, indices: list[int]) -> list:
        if self.it is not None and self.planned and self.planned[0] == indices:
            self.planned.popleft()
            batch = next(self.it)
            if not self.planned:
                self.close()
            return batch
        return [self.dataset[i] for i in indices]

    def close(self) -> None:
        """Stop the workers now (dropping the last reference to the iterator shuts them down), not at some later
        garbage collection: also when the run stops early."""
        self.it = None


def make_predict(dataset, clip_model: torch.nn.Module, score: Callable[[Tensor], Tensor], device: torch.device | str,
                 *, reader: ReadAhead | None = None,
                 fail_fast: bool = False) -> Callable[[list[int]], list[dict | BaseException]]:
    """``predict(indices)`` for run_samples: read the images, encode the readable ones, score them.

    ``score`` maps (B, D) normalized features to (B, C) logits. Records are ``{"label", "top5"}``; an
    unreadable image gives an :class:`UnreadableImage` carrying the reader's reason (with ``fail_fast``
    it is raised, naming the file).
    """
    from mmadapters.vision.readers import Unreadable

    read = reader.read if reader is not None else (lambda indices: [dataset[i] for i in indices])

    def predict(indices: list[int]) -> list[dict | BaseException]:
        out: list[dict | BaseException | None] = [None] * len(indices)
        images, labels, slots = [], [], []
        for j, item in enumerate(read(list(indices))):
            if isinstance(item, Unreadable):
                if fail_fast:
                    raise UnreadableImage(f"{item.path}: cannot read image ({item.reason}); leave out --fail-fast "
                                          "(or use --on-error skip) to skip and count it")
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


def prediction_line(classnames: Sequence[str]) -> Callable[[str, dict], dict]:
    """The ``--predictions`` line of an image: id, label, prediction, top5 (indices) and their names."""
    return lambda i, r: {"id": i, "label": r["label"], "prediction": r["top5"][0], "top5": r["top5"],
                         "top5_names": [classnames[c] for c in r["top5"]]}


def _prepare_root(dataset: str, dataset_root: str | None, cache_dir: Path, progress: bool) -> tuple[str, Path]:
    """``vision.readers.prepare_dataset_root``; under torchrun rank 0 alone generates a missing task."""
    from mmadapters.training.trainer import run_on_main
    from mmadapters.vision.readers import prepare_dataset_root

    return run_on_main(lambda: prepare_dataset_root(dataset, dataset_root, cache_dir, progress=progress))


def _clip_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _evaluate_images(args: argparse.Namespace, *, dataset, root: Path, clip, score: Callable[[Tensor], Tensor], device,
                     classnames: list[str], **fields: Any) -> dict[str, Any] | None:
    """Score every image of ``dataset`` through :func:`~mmadapters.eval.sample_runner.evaluate`, the pending
    ones read ahead; ``fields``: its identity, settings, output_fields, timings, t_start, parameters, extra."""
    from contextlib import closing

    from mmadapters import distributed

    from .sample_runner import Summary, evaluate

    ids = sample_ids(dataset, root)
    reader = ReadAhead(dataset, getattr(args, "num_workers", 0))

    def read_ahead(log) -> closing:  # run_samples' batches: this rank's share of the images not in the log, in order
        mine = distributed.shard([i for i in range(len(dataset)) if ids[i] not in log.done])
        return closing(reader.start([mine[s:s + args.batch_size] for s in range(0, len(mine), args.batch_size)]))

    return evaluate(
        args, samples=list(range(len(dataset))), sample_id=lambda i: ids[i],
        predict=make_predict(dataset, clip.model, score, device, reader=reader, fail_fast=args.fail_fast),
        summarize=lambda outcome: Summary(*records_metrics(list(outcome.records.values()), classnames)),
        source=fields["settings"]["dataset_root"], what=f"images of split {args.split!r}",
        desc=f"{fields['identity']['task'].split('_')[0]} {args.split}", counts={"classes": len(classnames)},
        prediction=prediction_line(classnames), on_open=read_ahead, **fields)


def _in_group(args: argparse.Namespace, run: Callable[[argparse.Namespace], dict[str, Any] | None]) -> dict[str, Any] | None:
    """Run ``run(args)`` in torchrun's process group, leaving it afterwards when this call joined it."""
    from mmadapters import distributed

    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    if getattr(args, "num_workers", 0) < 0:
        raise ValueError(f"--num-workers: expected an integer >= 0, got {args.num_workers}")
    joined = not distributed.is_distributed() and distributed.init_from_env(args.device)
    try:
        return run(args)
    finally:
        if joined:
            distributed.cleanup()


def run_zeroshot(args: argparse.Namespace) -> dict[str, Any] | None:
    """``mmadapters eval zeroshot`` (= ``mmadapters zeroshot``): the results on rank 0 (which writes them), None
    on other ranks."""
    return _in_group(args, _zeroshot)


def run_fewshot(args: argparse.Namespace) -> dict[str, Any] | None:
    """``mmadapters eval fewshot --adapters DIR``: a saved Tip / Tip-F / CapS cache model on a split."""
    return _in_group(args, _fewshot)


def _zeroshot(args: argparse.Namespace) -> dict[str, Any] | None:
    from mmadapters import distributed
    from mmadapters.vision.clip import load_clip
    from mmadapters.vision.readers import dataset_name, open_split, resolve_classnames, resolve_templates
    from mmadapters.vision.zeroshot import cached_classifier, zeroshot_logits

    if args.adapter not in ADAPTERS:
        raise ValueError(f"--adapter {args.adapter!r}: expected one of {', '.join(ADAPTERS)}")
    if args.adapter != "none" and (isinstance(args.shots, bool) or args.shots < 1):
        raise ValueError(f"--shots: expected an integer >= 1, got {args.shots}")
    t_start = time.perf_counter()
    device = distributed.device_for_rank(args.device)
    progress = args.progress and distributed.is_main()
    cache_dir = default_cache_dir(args.cache_dir)
    fmt, root = _prepare_root(args.dataset, args.dataset_root, cache_dir, progress)
    name = dataset_name(args.dataset, fmt, root)
    classnames, classnames_source = resolve_classnames(args.classnames, root)
    templates, templates_source = resolve_templates(args.templates, root)

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
                                   device=device, batch_size=max(args.batch_size, 256), progress=progress)
    timings["classifier_s"] = classifier.seconds
    weights = classifier.weights.to(device)
    settings = {"model_resolved": clip.info.model, "weights": clip.info.identity(), "dataset_format": fmt,
                "dataset_root": str(root.resolve()), "split": args.split, "classnames": classnames,
                "classnames_source": classnames_source, "templates": templates, "templates_source": templates_source,
                "seed": args.seed, "device": str(args.device), "batch_size": args.batch_size, "topk": TOPK,
                "method": "zeroshot"}
    identity = {"dataset": name, "model": clip.info.short_name, "pretrained": args.pretrained,
                "task": "zeroshot_classification"}
    extra: dict[str, Any] = {"random_init": clip.info.random_init, "classifier_cache_hit": classifier.cache_hit}
    parameters = {"trainable": 0, "total": _clip_parameters(clip.model)}
    method = "zeroshot"
    score: Callable[[Tensor], Tensor] = lambda f: zeroshot_logits(f, weights)  # noqa: E731
    if args.adapter != "none":
        t0 = time.perf_counter()
        clf, extra["adapter"] = _fit_adapter(args, fmt, root, clip, weights, classnames, device, progress)
        timings["adapter_fit_s"] = time.perf_counter() - t0
        score = clf.logits
        identity["task"] = "fewshot_classification"
        method = f"{args.adapter}-{args.shots}shot"
        settings.update(method=args.adapter, shots=args.shots, val_split=args.val_split, captions=extra["adapter"]["captions"],
                        support_root=None if args.support_root is None else str(Path(args.support_root).resolve()))
        cache = sum(t.numel() for t in clf.state_dict().values())
        parameters = {"trainable": extra["adapter"]["trainable"], "total": parameters["total"] + cache, "cache": cache}
    return _evaluate_images(
        args, dataset=dataset, root=root, clip=clip, score=score, device=device, classnames=classnames, identity=identity,
        settings=settings, output_fields={**identity, "method": method}, timings=timings, t_start=t_start,
        parameters=parameters, extra=extra)


def _fit_adapter(args: argparse.Namespace, fmt: str, root: Path, clip, weights: Tensor, classnames: list[str], device,
                 progress: bool) -> tuple[Any, dict[str, Any]]:
    """Fit ``--adapter`` on ``--shots`` images per class (sampled with ``--seed``) of the train split or
    ``--support-root``, its hyperparameters searched on ``--val-split``: the recipes' few-shot data
    (``vision.fewshot_train.encode_fewshot``, no augmented views) and ``fit_fewshot``. Returns (classifier with
    ``.logits((B, D)) -> (B, C)``, what was fitted as JSON-ready info)."""
    from mmadapters.vision.fewshot import fit_fewshot, support_set
    from mmadapters.vision.fewshot_train import encode_fewshot
    from mmadapters.vision.readers import cli_flag

    def on_unreadable(item) -> None:
        if args.fail_fast:
            raise UnreadableImage(f"{item.path}: cannot read image ({item.reason}); leave out --fail-fast (or use "
                                  "--on-error skip) to skip and count it")

    data = encode_fewshot(clip, fmt, root, classnames, [], lambda names: weights, kind=args.adapter, shots=args.shots,
                          seed=args.seed, val_split=args.val_split, support_root=args.support_root,
                          captions=args.captions, batch_size=args.batch_size, num_workers=args.num_workers,
                          device=str(device), progress=progress, on_unreadable=on_unreadable,
                          flag=lambda f: f"--adapter {args.adapter}" if f == "train_split" else cli_flag(f))
    caption_feats = None if data.caption_feats is None else data.caption_feats.to(device)
    support = support_set(data.support_feats.to(device), data.support_labels.to(device), caption_feats=caption_feats)
    clf = fit_fewshot(args.adapter, weights, support, data.val_feats.to(device), data.val_labels.to(device),
                      seed=args.seed, progress=progress)
    counts = data.info["counts"]
    info = {"kind": args.adapter, "shots": args.shots, **{k: counts[k] for k in (
                "support_images", "support_skipped", "val_images", "val_skipped")},
            "captions": data.info["captions"],
            "trainable": clf.keys.weight.numel() if args.adapter == "tip-f" else 0,  # Tip-F trains its cache keys
            "hyperparams": clf.hyperparams}
    return clf, info


def _fewshot(args: argparse.Namespace) -> dict[str, Any] | None:
    from mmadapters import distributed
    from mmadapters.vision.clip import load_clip
    from mmadapters.vision.fewshot_train import CACHE_CONFIG, CACHE_WEIGHTS, load_cache_model
    from mmadapters.vision.readers import dataset_name, open_split

    t_start = time.perf_counter()
    device = distributed.device_for_rank(args.device)
    progress = args.progress and distributed.is_main()
    cache_dir = default_cache_dir(args.cache_dir)
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
    fmt, root = _prepare_root(dataset_arg, root_arg, cache_dir, progress)
    classnames = loaded.classnames
    dataset = open_split(fmt, root, args.split, clip.preprocess, classnames)
    if dataset.classnames is not None and len(dataset.classnames) != len(classnames):
        raise ValueError(f"{root}: split {args.split!r} has {len(dataset.classnames)} classes but the cache model in "
                         f"{adapters} was fitted on {len(classnames)}")
    model = loaded.model
    parameters = dict(cfg.get("parameters") or {})
    parameters.setdefault("trainable", sum(p.numel() for p in model.parameters() if p.requires_grad))
    parameters["total"] = _clip_parameters(clip.model) + sum(t.numel() for t in model.state_dict().values())
    settings = {"model_resolved": clip.info.model, "weights": clip.info.identity(), "dataset_format": fmt,
                "dataset_root": str(root.resolve()), "split": args.split, "classnames": classnames,
                "adapters": str(adapters.resolve()), "adapters_sha256": _file_sha256(adapters / CACHE_WEIGHTS),
                "kind": loaded.kind, "hyperparams": cfg.get("hyperparams"), "shots": data.get("shots"),
                "shot_seed": data.get("seed"), "device": str(args.device), "batch_size": args.batch_size, "topk": TOPK}
    if args.split == data.get("val_split") and args.dataset is None:
        print(f"warning: evaluating on {args.split!r}, the split the hyperparameters were searched on")
    identity = {"dataset": dataset_name(dataset_arg, fmt, root), "model": clip.info.short_name, "pretrained": pretrained,
                "task": "fewshot_classification"}
    extra = {"random_init": clip.info.random_init,
             "adapter": {"kind": loaded.kind, "directory": str(adapters), "hyperparams": cfg.get("hyperparams"),
                         "shots": data.get("shots"), "validation": cfg.get("validation")}}
    return _evaluate_images(
        args, dataset=dataset, root=root, clip=clip, score=model.logits, device=device, classnames=classnames,
        identity=identity, settings=settings, output_fields={**identity, "kind": loaded.kind}, timings=timings,
        t_start=t_start, parameters=parameters, extra=extra)
