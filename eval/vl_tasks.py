"""``mmadapters eval vqa|gqa|nlvr|caption``: VL-T5 (+ adapters) on VQAv2, GQA, NLVR2 and COCO captions.

One evaluation, four tasks, in the order it runs:

1. **Samples**: the annotation file is read with :mod:`mmadapters.vision.vl_readers` (malformed rows are skipped
   and listed with the reader's message, unless ``--on-bad-rows raise``).
2. **Model**: a VL-T5 directory (default: the one ``--adapters`` was trained on, else the shipped tiny VL-T5),
   and the ``--adapters``: a ``mmadapters train vl-adapter`` output's ``best/`` (restored with
   :func:`~mmadapters.vision.vl_adapter.load_trained`: adapters, trained LayerNorms and visual projection,
   the task's adapter active), a directory of core adapters or one adapter directory.
3. **Features**: ``--features`` (``.h5`` / folder of ``.safetensors``) or computed from ``--images`` with a CLIP.
4. **Per-sample records** (:class:`~mmadapters.vision.vl_adapter.VLPredictor`, the recipe's one prediction
   path, run by :func:`mmadapters.eval.sample_runner.run_samples`: logged as they finish so a crashed run
   resumes, sharded over torchrun ranks): greedy (or beam) generation with the task prefix; a
   record holds the prediction and what its metric needs — the human answers or soft label (VQA), the target
   (GQA, NLVR2), the references (captioning) — plus the question/answer type. A sample whose image has no
   features, whose features hold NaN/inf or have the wrong shape, or that has nothing to be scored against,
   is skipped with the reason.
5. **Metrics from the records** (:func:`~mmadapters.vision.vl_adapter.task_metrics`, which the recipe's
   validation uses too): VQA accuracy (official normalization; VL-T5's soft-label score for rows without
   human answers), GQA / NLVR2 exact-match accuracy, captioning CIDEr and BLEU-4 computed over all records at
   the end (CIDEr's IDF depends on the whole set, so it is never averaged over batches). ``per_group``: VQA
   per answer type and per question type, GQA yes/no vs open questions, NLVR2 per label.
6. **Results**: :mod:`mmadapters.eval.results_schema`, written by rank 0
   (:func:`mmadapters.eval.sample_runner.evaluate` runs steps 4 to 6).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from mmadapters import distributed

from .sample_runner import Summary, evaluate

RESULT_TASK = {"vqa": "vqa", "gqa": "gqa", "nlvr": "nlvr", "caption": "captioning"}  # the results' "task" field


# ---------------------------------------------------------------------------------------------- model and adapters


def _dir_digest(directory: Path) -> str:
    """sha256 over the relative names and bytes of every file under ``directory`` (identifies the adapters)."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(path.relative_to(directory).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def resolve_model_dir(model: str | None, adapters: str | None) -> Path:
    """``--model``, else the VL-T5 recorded in the adapters' ``vl_adapter.json`` when it exists, else the shipped one."""
    from mmadapters.vision.vlt5 import resolve_vlt5_dir

    if model is None and adapters is not None:
        meta_path = Path(adapters) / "vl_adapter.json"
        if meta_path.is_file():
            from mmadapters.io import read_json_object

            recorded = read_json_object(meta_path, "VL-Adapter checkpoint metadata").get("model_dir")
            if isinstance(recorded, str) and Path(recorded).is_dir():
                return Path(recorded)
    return resolve_vlt5_dir(model)


def load_vl_model(model_dir: Path, adapters: str | None, task: str, *, adapter_name: str | None = None,
                  device: str | torch.device = "cpu"):
    """``(model, setup, parameters)``: the VL-T5 with ``adapters`` loaded and ``task``'s adapter active.

    ``setup`` is a :class:`~mmadapters.vision.vl_variants.VariantSetup` (or None without adapters);
    ``parameters`` = ``{"trainable", "total", ...}`` (trainable: what the adapters' training changed).
    """
    import mmadapters as mma
    from mmadapters.io import CONFIG_NAME, checkpoint_adapter_dirs
    from mmadapters.vision.vl_adapter import TRAINED_META, load_trained
    from mmadapters.vision.vl_variants import VariantSetup, parameter_report
    from mmadapters.vision.vlt5 import VLT5

    model = VLT5.from_pretrained(model_dir, device=device)
    backbone = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if adapters is None:
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval(), None, {"trainable": 0, "total": backbone, "backbone": backbone, "adapters": 0}
    directory = Path(adapters)
    if not directory.is_dir():
        raise FileNotFoundError(f"--adapters: directory not found: {directory}")
    if (directory / TRAINED_META).is_file():
        setup = load_trained(model, directory)
        if task not in setup.adapter_for:
            raise ValueError(f"{directory / TRAINED_META}: these adapters were trained for tasks {list(setup.tasks)}, "
                             f"not {task!r}")
        report = parameter_report(model, setup)
        if adapter_name is not None:
            if adapter_name not in setup.adapters:
                raise ValueError(f"--adapter-name: {adapter_name!r} is not one of {setup.adapters} in {directory}")
            setup.adapter_for[task] = adapter_name
        setup.activate(model, task)
        parameters = {"trainable": report.trainable, "total": report.backbone + report.adapters, "backbone": report.backbone,
                      "adapters": report.adapters, "extras": report.extras, "variant": setup.variant}
        return model.eval(), setup, parameters
    if (directory / CONFIG_NAME).is_file():
        names = [mma.load_adapter(model, directory)]
    else:
        if not checkpoint_adapter_dirs(directory):
            raise ValueError(f"--adapters: {directory} holds no {TRAINED_META}, no {CONFIG_NAME} and no "
                             f"<name>/{CONFIG_NAME}; expected a train output's best/ or an adapter checkpoint")
        names = mma.load_adapters(model, directory)
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(f"--adapter-name: {adapter_name!r} is not one of {names} in {directory}")
        chosen = adapter_name
    elif task in names:
        chosen = task
    elif "shared" in names:
        chosen = "shared"
    elif len(names) == 1:
        chosen = names[0]
    else:
        raise ValueError(f"--adapters: {directory} holds adapters {names}; none is named {task!r} or 'shared': pass "
                         "--adapter-name")
    mma.freeze_base(model, adapters=names)
    setup = VariantSetup("adapters", (task,), {task: chosen}, names, [])
    setup.activate(model, task)
    core = mma.parameter_report(model)
    return model.eval(), setup, {"trainable": core.adapters, "total": core.base + core.adapters, "backbone": core.base,
                                 "adapters": core.adapters}


# ---------------------------------------------------------------------------------------------- the command


def evaluate_vl_task(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run ``mmadapters eval <vqa|gqa|nlvr|caption>`` (flags of :mod:`mmadapters.eval.eval_vl_args`).

    Returns the results dict on rank 0 (also written to ``--output``), None on the other ranks.
    """
    from mmadapters.vision.vl_adapter import FeatureCache, VLPredictor, open_feature_source, read_split, task_metrics

    t_start = time.perf_counter()
    task = args.vl_task
    for name in ("batch_size", "max_text_length", "max_new_tokens", "num_beams"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max-samples: expected a positive integer, got {args.max_samples}")
    if args.features is None and args.images is None:
        raise ValueError("no image features: give --features (an .h5 file or a folder of .safetensors) or --images")
    distributed.init_from_env(args.device)
    device = distributed.device_for_rank(args.device)
    torch.manual_seed(args.seed)
    annotations = Path(args.annotations)
    split = getattr(args, "split", None)
    rows = read_split(task, annotations, split or "test", on_error=args.on_bad_rows)
    samples = list(rows)[: args.max_samples] if args.max_samples else list(rows)
    bad_rows = [{"id": f"{annotations.name}:{where}", "reason": message} for where, message in rows.skipped]
    model_dir = resolve_model_dir(args.model, args.adapters)
    t0 = time.perf_counter()
    model, setup, parameters = load_vl_model(model_dir, args.adapters, task, adapter_name=args.adapter_name, device=device)
    load_s = time.perf_counter() - t0
    source = open_feature_source(args.features, images=args.images, num_tokens=model.num_visual_tokens,
                                 visual_dim=model.visual_dim, clip_model=args.clip_model,
                                 clip_pretrained=args.clip_pretrained, image_pattern=args.image_pattern, device=device)
    dataset = args.dataset or (f"{annotations.stem}[{split}]" if task == "caption" else annotations.stem)
    settings = {
        "annotations": str(annotations.resolve()), "split": split, "max_samples": args.max_samples,
        "on_bad_rows": args.on_bad_rows, "model_dir": str(model_dir.resolve()),
        "adapters": None if args.adapters is None else str(Path(args.adapters).resolve()),
        "adapters_sha256": None if args.adapters is None else _dir_digest(Path(args.adapters)),
        "adapter_name": args.adapter_name, "active_adapter": None if setup is None else setup.adapter_for[task],
        "features": None if args.features is None else str(Path(args.features).resolve()),
        "images": None if args.images is None else str(Path(args.images).resolve()), "image_pattern": args.image_pattern,
        "clip_model": args.clip_model, "clip_pretrained": args.clip_pretrained,
        "max_text_length": args.max_text_length, "max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams,
        "decoding": "greedy" if args.num_beams == 1 else "beam", "batch_size": args.batch_size, "device": str(args.device),
        "seed": args.seed,
    }
    model_name = model_dir.name
    predictor = VLPredictor(model, setup, task, FeatureCache(source), max_text_length=args.max_text_length,
                            max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    return evaluate(
        args, identity={"dataset": dataset, "model": model_name, "task": RESULT_TASK[task],
                        "pretrained": None if args.adapters is None else str(args.adapters)},
        output_fields={"dataset": dataset, "model": model_name, "task": task}, settings=settings, samples=samples,
        sample_id=lambda s: s.uid, predict=predictor,
        summarize=lambda outcome: Summary(*task_metrics(task, list(outcome.records.values()))), source=annotations,
        desc=f"eval {task}", t_start=t_start, timings={"model_load_s": load_s}, loop_timing="eval_s",
        counts={"bad_rows": len(bad_rows)}, rejected=bad_rows, parameters=parameters,
        extra={"world_size": distributed.world_size()})


__all__ = ["RESULT_TASK", "evaluate_vl_task", "load_vl_model", "resolve_model_dir"]
