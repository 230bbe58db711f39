"""``mmadapters eval videoqa`` and ``mmadapters eval dfer``: per-sample, resumable, rank-sharded evaluators.

Both hand their samples to :func:`mmadapters.eval.sample_runner.evaluate`: samples are scored batch by batch,
each sample's record is appended to ``<output>.samples.jsonl`` as soon as its batch is done, a rerun after a
crash scores only the missing ones, and the metrics are computed from all records once every sample is
evaluated or skipped; rank 0 writes the :mod:`~mmadapters.eval.results_schema` file.

**videoqa** — a sample is one question (id ``line<N>`` of the jsonl). Its video's frames are sampled and
encoded by the frozen CLIP through :class:`~mmadapters.video.data.FrameFeatureCache` (the cache training
used, so a trained run's features are found again), its candidate texts by
:func:`~mmadapters.video.qa_features.encode_candidates` (``--candidate-text``; with ``--adapters`` the run's
recorded ``candidate_text``, ``frame_features`` and ``num_frames`` are used; a contradicting flag is an error).
Scores: a Tem-Adapter from ``--adapters``
(:func:`~mmadapters.video.tem_train.load_tem_run`), else the zero-shot frame-mean cosine. Record:
``{"scores", "prediction", "answer", "options", "q_type", "video"}``; metrics ``acc`` and ``chance``, per
question type in ``per_group``.

**dfer** — a sample is one clip of a DFEW/MAFW/FERV39k list (id: its frame folder relative to
``--data-dir``), loaded with its cues by :func:`~mmadapters.video.dfer.load_split` and classified with
test-time TSN frames. Model: a FineCLIPER from ``--adapters``
(:func:`~mmadapters.video.fineclipper_train.load_fineclipper_run`), else the untrained
:class:`~mmadapters.video.fineclipper.FineClipper` with no cues and no adapters — frozen CLIP's frame mean
scored against the positive/negative class descriptions. Record ``{"pred", "label"}``; metrics ``uar``,
``war``, per-class recall in ``per_group``.

A video or clip that cannot be read (or lacks a cue the model needs) is skipped with its reason;
``--fail-fast`` stops at the first one instead.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .results_io import default_cache_dir

VIDEOQA_TASK = "videoqa_multiple_choice"
DFER_TASK = "dfer"


def files_sha256(paths: Sequence[Path]) -> str:
    """One SHA-256 over the bytes of ``paths`` (in the order given): identifies saved adapters in the settings."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _check_common(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    if args.num_frames is not None and args.num_frames < 1:
        raise ValueError(f"--num-frames: expected an integer >= 1, got {args.num_frames}")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")


# ------------------------------------------------------------------------------------------------ videoqa


@torch.inference_mode()
def score_questions(model: torch.nn.Module | None, frames: Tensor, candidates: Tensor, mask: Tensor) -> Tensor:
    """Scores (B, K) of questions: ``frames`` (B, T, D) and ``candidates`` (B, K, D) L2-normalized, ``mask`` (B, K).

    ``model`` a Tem-Adapter (eval mode), or None for the zero-shot frame-mean cosine.
    """
    from mmadapters.video.tem_adapter import frame_mean_scores

    if model is None:
        return frame_mean_scores(frames, candidates, mask)
    return model(frames.float(), candidates.float(), mask=mask).scores.float()


def videoqa_metrics(records: list[dict]) -> tuple[dict[str, float], dict[str, dict[str, float | None]]]:
    """(``acc`` and ``chance``, per question type ``{acc, questions}``) of question records."""
    from mmadapters.video.qa_features import videoqa_accuracy

    return videoqa_accuracy([r["prediction"] == r["answer"] for r in records], [r["options"] for r in records],
                            [r.get("q_type") for r in records])


def make_videoqa_predict(*, cache, clip, model: torch.nn.Module | None, root: Path, template: str,
                         device: torch.device, num_workers: int, fail_fast: bool, candidate_text: str = "question_answer",
                         frame_features: str = "normalized") -> Callable[[list[Any]], list]:
    """``predict`` for :func:`run_samples`: TrafficQA rows -> question records (or the video's VideoError)."""
    from mmadapters.video.io import VideoError
    from mmadapters.video.qa_features import encode_candidates, scale_frames
    from mmadapters.video.readers import trafficqa_video_path

    def predict(rows: list[Any]) -> list[dict | BaseException]:
        paths = [str(trafficqa_video_path(r, root)) for r in rows]
        stats = cache.build(list(dict.fromkeys(paths)), num_workers=num_workers, fail_fast=fail_fast)
        bad = {b.path: b.reason for b in stats.skipped}
        good = [i for i, p in enumerate(paths) if p not in bad]
        out: list[dict | BaseException] = [VideoError(bad[p]) if p in bad else None for p in paths]  # type: ignore[misc]
        if not good:
            return out
        videos = list(dict.fromkeys(paths[i] for i in good))
        frames = scale_frames(cache.load(videos), frame_features)[[videos.index(paths[i]) for i in good]]
        kept = [rows[i] for i in good]
        candidates, mask = encode_candidates(clip, kept, template=template, candidate_text=candidate_text,
                                             device=str(device), dim=frames.shape[-1])
        scores = score_questions(model, frames.to(device), candidates.to(device), mask.to(device)).cpu()
        for i, row, s in zip(good, kept, scores, strict=True):
            out[i] = {"scores": [None if math.isinf(x) else x for x in s.tolist()], "prediction": int(s.argmax()),
                      "answer": row.answer, "options": row.num_options, "q_type": row.q_type, "video": row.vid_filename}
        return out

    return predict


def run_videoqa(args: argparse.Namespace) -> dict[str, Any] | None:
    """``mmadapters eval videoqa``: returns the results (rank 0) after writing them."""
    from mmadapters import distributed
    from mmadapters.video.data import FrameFeatureCache
    from mmadapters.video.qa_features import DEFAULT_TEMPLATE
    from mmadapters.video.readers import read_trafficqa
    from mmadapters.video.tem_train import META_NAME, WEIGHTS_NAME, load_tem_run
    from mmadapters.vision.clip import load_clip

    from .sample_runner import Summary, evaluate

    t_start = time.perf_counter()
    _check_common(args)
    if args.num_workers < 0:
        raise ValueError(f"--num-workers: expected an integer >= 0, got {args.num_workers}")
    distributed.init_from_env(args.device)
    device = distributed.device_for_rank(args.device)
    cache_dir = default_cache_dir(args.cache_dir)
    adapter, meta, adapters_dir = None, None, None
    if args.adapters:
        adapters_dir = Path(args.adapters)
        adapter, meta = load_tem_run(adapters_dir)
        for flag, given, recorded in (("--num-frames", args.num_frames, meta["num_frames"]),
                                      ("--template", args.template, meta["template"]),
                                      ("--candidate-text", args.candidate_text, meta["candidate_text"])):
            if given is not None and given != recorded:
                raise ValueError(f"{flag} {given!r}: the Tem-Adapter in {adapters_dir} was trained on features made with "
                                 f"{recorded!r} (field {flag[2:].replace('-', '_')!r} of {META_NAME}); leave {flag} out")
    recorded_clip = meta["clip"] if meta else {}
    model_name = args.model if args.model is not None else recorded_clip.get("model")
    pretrained = args.pretrained if args.pretrained is not None else recorded_clip.get("pretrained")
    num_frames = args.num_frames or (meta["num_frames"] if meta else 8)
    template = args.template or (meta["template"] if meta else DEFAULT_TEMPLATE)
    candidate_text = args.candidate_text or (meta["candidate_text"] if meta else "question_answer")
    # zero-shot: the frame-mean cosine is taken on unit-norm frames (scale-free per frame)
    frame_features = meta["frame_features"] if meta else "normalized"
    if args.template is not None and candidate_text == "options":
        raise ValueError(f"--template {args.template!r}: candidate texts are the options alone (candidate_text "
                         "'options'), no template is used; leave --template out or use --candidate-text question_answer")

    t0 = time.perf_counter()
    clip = load_clip(model_name, pretrained, device=device, cache_dir=str(cache_dir / "weights"), seed=args.seed,
                     declare_points=False)
    timings = {"model_load_s": time.perf_counter() - t0}
    if recorded_clip.get("weights_sha256") and clip.info.weights_sha256 != recorded_clip["weights_sha256"]:
        raise ValueError(f"{adapters_dir / META_NAME}: field 'clip.weights_sha256': the Tem-Adapter was trained on CLIP "
                         f"weights {recorded_clip['weights_sha256'][:12]}..., the CLIP loaded now hashes to "
                         f"{str(clip.info.weights_sha256)[:12]}...; pass the training CLIP (--model/--pretrained)")
    if adapter is not None:
        width = int(clip.model.text_projection.shape[1]) if hasattr(clip.model, "text_projection") else adapter.config.dim
        if width != adapter.config.dim:
            raise ValueError(f"{adapters_dir}: the Tem-Adapter expects {adapter.config.dim}-d CLIP features, the CLIP "
                             f"gives {width}-d")
        adapter = adapter.to(device).eval()

    annotations = Path(args.annotations)
    root = Path(args.video_root) if args.video_root else annotations.parent
    rows = read_trafficqa(annotations, video_root=root)
    if not rows:
        raise ValueError(f"{annotations}: no questions")
    cache = FrameFeatureCache(cache_dir / "frame_features", clip, num_frames=num_frames, device=device)
    method = "tem_adapter" if adapter is not None else "zeroshot"
    settings = {"annotations": str(annotations.resolve()), "video_root": str(root.resolve()), "method": method,
                "adapters": str(adapters_dir.resolve()) if adapters_dir else None,
                "adapters_sha256": files_sha256([adapters_dir / WEIGHTS_NAME, adapters_dir / META_NAME]) if adapters_dir else None,
                "model_resolved": clip.info.model, "weights": clip.info.identity(), "num_frames": num_frames,
                "template": template, "candidate_text": candidate_text, "frame_features": frame_features,
                "sampling": "uniform (TSN middles)", "seed": args.seed, "device": str(args.device),
                "batch_size": args.batch_size}
    identity = {"dataset": args.dataset or annotations.stem, "model": clip.info.short_name, "pretrained": pretrained,
                "task": VIDEOQA_TASK}
    clip_params = sum(p.numel() for p in clip.model.parameters())
    adapter_params = sum(p.numel() for p in adapter.parameters()) if adapter is not None else 0
    predict = make_videoqa_predict(cache=cache, clip=clip, model=adapter, root=root, template=template, device=device,
                                   num_workers=args.num_workers, fail_fast=args.fail_fast,
                                   candidate_text=candidate_text, frame_features=frame_features)
    return evaluate(
        args, identity=identity, output_fields={**identity, "method": method}, settings=settings, samples=rows,
        sample_id=lambda r: f"line{r.line}", predict=predict,
        summarize=lambda outcome: Summary(*videoqa_metrics(list(outcome.records.values()))),
        source=settings["annotations"], what="questions", counts={"videos": len({r.vid_filename for r in rows})},
        timings=timings, t_start=t_start, parameters={"trainable": adapter_params, "total": adapter_params + clip_params},
        desc=f"videoqa {identity['dataset']}")


# ---------------------------------------------------------------------------------------------------- dfer


def dfer_metrics(records: list[dict], classes: Sequence[str]) -> tuple[dict[str, float], dict[str, dict[str, float | None]]]:
    """Metrics of clip records ``{"pred", "label"}``: UAR, WAR, and per class ``{recall, clips}`` (recall None if absent)."""
    from .metrics import uar, war

    y = torch.tensor([r["label"] for r in records], dtype=torch.long)
    p = torch.tensor([r["pred"] for r in records], dtype=torch.long)
    per_class: dict[str, dict[str, float | None]] = {}
    for k, name in enumerate(classes):
        members = y == k
        n = int(members.sum())
        per_class[name] = {"recall": float((p[members] == k).double().mean()) if n else None, "clips": n}
    return {"uar": uar(y, p, len(classes)), "war": war(y, p)}, per_class


def make_dfer_predict(*, model, num_frames: int, cues, fail_fast: bool) -> Callable[[list[Any]], list]:
    """``predict`` for :func:`run_samples`: DFER annotations -> clip records (or the reason the clip was unusable)."""
    from mmadapters.video.dfer import Batcher, load_split

    batcher = Batcher(model, num_frames)

    def predict(clips: list[Any]) -> list[dict | BaseException]:
        out: list[dict | BaseException | None] = [None] * len(clips)
        loaded = []
        for i, a in enumerate(clips):
            try:
                split = load_split([(str(a.frame_dir), a.label)], cues=cues, needed=model.config.cues, fail_fast=True,
                                   progress=False)
                loaded.append((i, split.clips[0]))
            except (ValueError, OSError) as e:  # unreadable frames, a missing or malformed cue (CueError)
                if fail_fast:
                    raise
                out[i] = e
        if loaded:
            with torch.no_grad():
                logits = model(**batcher([c for _, c in loaded], training=False)).float().cpu()
            for (i, c), row in zip(loaded, logits, strict=True):
                out[i] = {"pred": int(row.argmax()), "label": c.label}
        return out  # type: ignore[return-value]

    return predict


def clip_sample_id(frame_dir: Path, data_dir: Path) -> str:
    """A clip's id: its frame folder relative to the data root (POSIX), else the full path."""
    try:
        return frame_dir.resolve().relative_to(data_dir.resolve()).as_posix()
    except ValueError:
        return str(frame_dir)


def run_dfer(args: argparse.Namespace) -> dict[str, Any] | None:
    """``mmadapters eval dfer``: returns the results (rank 0) after writing them."""
    from mmadapters import distributed
    from mmadapters.video.cues import PrecomputedCues
    from mmadapters.video.fineclipper import FineClipper, FineClipperConfig
    from mmadapters.video.fineclipper_train import (
        ADAPTER_NAME,
        HEAD_NAME,
        META_NAME,
        load_clip_for_run,
        load_fineclipper_run,
        read_run_metadata,
    )
    from mmadapters.video.readers import DFER_DATASETS, dfer_annotation_path, read_dfer_annotation
    from mmadapters.vision.clip import load_clip

    from .sample_runner import Summary, evaluate

    t_start = time.perf_counter()
    _check_common(args)
    distributed.init_from_env(args.device)
    device = distributed.device_for_rank(args.device)
    weights_cache = str(default_cache_dir(args.cache_dir) / "weights")
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise NotADirectoryError(f"--data-dir {data_dir}: not a directory")
    t0 = time.perf_counter()
    adapters_dir = Path(args.adapters) if args.adapters else None
    if adapters_dir is not None:
        meta = read_run_metadata(adapters_dir)
        for flag, given, recorded in (("--model", args.model, meta["clip"].get("model")),
                                      ("--pretrained", args.pretrained, meta["clip"].get("pretrained"))):
            if given is not None and given != recorded:
                raise ValueError(f"{flag} {given!r}: the FineCLIPER in {adapters_dir} was trained on {recorded!r} "
                                 f"(field 'clip' of {META_NAME}); leave {flag} out")
        if list(meta["classes"]) != list(DFER_DATASETS[args.dataset]):
            raise ValueError(f"{adapters_dir / META_NAME}: field 'classes': the model knows {meta['classes']}, --dataset "
                             f"{args.dataset} has {list(DFER_DATASETS[args.dataset])}")
        bundle = load_clip_for_run(meta, device=device, cache_dir=weights_cache)
        info = bundle.info
        model, meta = load_fineclipper_run(adapters_dir, device=device, bundle=bundle)
        num_frames, pretrained, method = args.num_frames or meta["num_frames"], meta["clip"].get("pretrained"), "fineclipper"
        saved = [adapters_dir / HEAD_NAME, adapters_dir / META_NAME]
        if model.config.adapter_dim > 0:
            saved += sorted(p for p in (adapters_dir / ADAPTER_NAME).iterdir() if p.is_file())
        adapters_sha = files_sha256(saved)
    else:
        bundle = load_clip(args.model, args.pretrained, device=device, cache_dir=weights_cache, seed=args.seed)
        info = bundle.info
        torch.manual_seed(args.seed)  # the (zero-initialized, hence inert) temporal residual
        model = FineClipper(bundle.model, bundle.tokenizer, DFER_DATASETS[args.dataset],
                            FineClipperConfig(cues=(), adapter_dim=0)).to(device)
        num_frames, pretrained, method, adapters_sha = args.num_frames or 16, args.pretrained, "zeroshot", None
    model.eval()
    timings = {"model_load_s": time.perf_counter() - t0}

    if args.annotation:
        annotation = Path(args.annotation)
    else:
        annotation = dfer_annotation_path(args.dataset, data_dir / "annotation", args.split,
                                          None if args.dataset == "ferv39k" else args.fold)
    clips = read_dfer_annotation(annotation, args.dataset, root=data_dir, strip_prefix=args.strip_prefix,
                                 label_base=args.label_base)
    cues_root = Path(args.cues_root) if args.cues_root else data_dir
    settings = {"annotations": str(annotation.resolve()), "data_dir": str(data_dir.resolve()), "dataset": args.dataset,
                "fold": args.fold, "split": None if args.annotation else args.split, "label_base": args.label_base,
                "strip_prefix": args.strip_prefix, "cues_root": str(cues_root.resolve()), "method": method,
                "cues": list(model.config.cues), "adapters": str(adapters_dir.resolve()) if adapters_dir else None,
                "adapters_sha256": adapters_sha, "model_resolved": info.model, "weights": info.identity(),
                "num_frames": num_frames, "sampling": "TSN (middle frame of each segment)", "seed": args.seed,
                "device": str(args.device), "batch_size": args.batch_size}
    dataset_name = annotation.stem if args.annotation else f"{args.dataset}_fold{args.fold}_{args.split}"
    identity = {"dataset": dataset_name, "model": info.short_name, "pretrained": pretrained, "task": DFER_TASK}
    base = [p for n, p in model.clip.named_parameters() if ADAPTER_NAME not in n]
    backbone = sum(p.numel() for p in base)
    if adapters_dir:  # a fine-tuned baseline's trainable CLIP tensors are counted once in the total
        backbone -= sum(p.numel() for p in base if p.requires_grad)
    # what training trained: the parts of unused cues (and all but the linear probe's head) stay frozen
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if adapters_dir else 0
    cues = PrecomputedCues(cues_root)
    if adapters_dir is not None:  # the cues the model was trained on: exact, or realistic with the recorded rates
        from mmadapters.video.realistic_cues import cues_from_record

        cues = cues_from_record(meta.get("cue_source"), cues, where=f"{adapters_dir / META_NAME}: field 'cue_source'")
        settings["cue_source"] = meta.get("cue_source") or {"source": "exact"}
    predict = make_dfer_predict(model=model, num_frames=num_frames, cues=cues, fail_fast=args.fail_fast)
    return evaluate(
        args, identity=identity, output_fields={**identity, "method": method}, settings=settings, samples=clips,
        sample_id=lambda a: clip_sample_id(a.frame_dir, data_dir), predict=predict,
        summarize=lambda outcome: Summary(*dfer_metrics(list(outcome.records.values()), model.classes)),
        source=settings["annotations"], what="clips", counts={"classes": len(model.classes)}, timings=timings,
        t_start=t_start, parameters={"trainable": trainable, "total": backbone + trainable}, desc=f"dfer {dataset_name}")
