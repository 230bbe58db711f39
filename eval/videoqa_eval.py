"""Multiple-choice VideoQA evaluation (SUTD-TrafficQA format): frame-mean CLIP zero-shot or Tem-Adapter.

One run: read the annotation jsonl (official list layout or object layout, see
:mod:`mmadapters.video.readers`), sample ``num_frames`` frames of each video (TSN test-time sampling),
encode them and every question+candidate text with a frozen CLIP (features cached on disk), score
the candidates, and write a results JSON in the house schema (CLIP_benchmark's fields plus counts,
timings and settings)::

    {"dataset", "model", "pretrained", "task": "videoqa_multiple_choice",
     "metrics": {"acc", "acc_by_q_type", "chance"}, "counts": {...}, "timings": {...}, "settings": {...},
     "adapter": {...} | null, "mmadapters_version", "run_key", "created"}

Methods: ``zeroshot`` scores a candidate by the cosine of the mean frame feature and its text feature;
``tem-adapter`` trains :class:`~mmadapters.video.tem_adapter.TemAdapter` on ``train_annotations``
first (optionally with either official-code bug switched on for the ablation).

A video that cannot be decoded is skipped with all its questions and counted by reason
(``on_error="fail"`` stops instead). Options that are empty strings (SUTD-TrafficQA pads yes/no
questions) are masked out of scoring and of the loss. Accuracy is over the evaluated questions.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .results_io import check_overwrite, jsonable, results_key, write_results
from .videoqa_config import DEFAULT_OUTPUT, METHODS, TASK, VideoQAConfig  # noqa: F401  (re-exported)

MAX_LISTED_SKIPS = 1000


class UnreadableVideoError(RuntimeError):
    """A video could not be decoded and the run was asked to fail (``on_error="fail"``)."""


@dataclass
class EncodedSplit:
    """A split's frozen-CLIP features and the bookkeeping of what was read."""

    features: Any  # mmadapters.video.tem_adapter.VideoQAFeatures
    lines: list[int]  # annotation line of each kept question
    q_types: list[str | None]
    vid_filenames: list[str]
    num_questions: int  # in the file
    num_videos: int  # distinct videos in the file
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"video", "questions", "reason"}
    texts_at_context_limit: int = 0  # fused texts the tokenizer may have cut
    seconds: float = 0.0
    frames_cached: int = 0  # videos whose frame features were found in the cache
    frames_computed: int = 0  # videos decoded and encoded by this call

    @property
    def skipped_questions(self) -> int:
        return sum(s["questions"] for s in self.skipped)


def default_cache_dir() -> Path:
    from .zeroshot_eval import default_cache_dir as base

    return base()


def videoqa_metrics(scores: torch.Tensor, answers: torch.Tensor, q_types: list[str | None] | None = None,
                    mask: torch.Tensor | None = None) -> dict[str, Any]:
    """Accuracy of argmax(scores) (N, K) against ``answers`` (N,), per question type, and the chance level."""
    n = len(answers)
    if n == 0:
        return {"acc": float("nan"), "acc_by_q_type": {}, "chance": float("nan")}
    correct = scores.argmax(dim=1) == answers
    options = mask.sum(1).float() if mask is not None else torch.full((n,), float(scores.shape[1]))
    by_type: dict[str, list[bool]] = {}
    for t, ok in zip(q_types or [None] * n, correct.tolist(), strict=True):
        by_type.setdefault(str(t), []).append(ok)
    return {"acc": correct.float().mean().item(),
            "acc_by_q_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())} if q_types else {},
            "chance": (1.0 / options).mean().item()}


@torch.inference_mode()
def encode_split(clip, annotations: str | os.PathLike, *, video_root: str | os.PathLike | None = None,
                 num_frames: int = 8, template: str = "{question} {answer}", device: str = "cpu",
                 on_error: str = "skip", cache_dir: str | os.PathLike | None = None, num_workers: int = 0,
                 progress: bool = False) -> EncodedSplit:
    """Read ``annotations`` and encode it with ``clip`` (a :class:`~mmadapters.vision.clip.ClipBundle`).

    Frame features come from :class:`~mmadapters.video.data.FrameFeatureCache` (computed once per weights,
    file and sampling, under ``cache_dir/frame_features``); frame features (V, T, D) and candidate text
    features (N, K, D) are L2-normalized here.
    """
    import tempfile

    from mmadapters.video.data import FrameFeatureCache
    from mmadapters.video.io import VideoError
    from mmadapters.video.readers import read_trafficqa, trafficqa_video_path
    from mmadapters.video.tem_adapter import VideoQAFeatures

    t0 = time.perf_counter()
    annotations = Path(annotations)
    root = Path(video_root) if video_root is not None else annotations.parent
    rows = read_trafficqa(annotations, video_root=root)
    if not rows:
        raise ValueError(f"{annotations}: no questions")
    first_row = {}
    for row in rows:
        first_row.setdefault(row.vid_filename, row)
    per_video = Counter(row.vid_filename for row in rows)
    paths = {name: str(trafficqa_video_path(row, root)) for name, row in first_row.items()}

    with tempfile.TemporaryDirectory() as scratch:  # no cache_dir: features live for this call only
        cache = FrameFeatureCache(Path(cache_dir) / "frame_features" if cache_dir else scratch, clip,
                                  num_frames=num_frames, device=device)
        try:
            stats = cache.build(list(paths.values()), num_workers=num_workers, fail_fast=on_error == "fail")
        except VideoError as e:
            raise UnreadableVideoError(f"{e}; use on_error='skip' to count it and go on") from e
        bad = {b.path: b.reason for b in stats.skipped}
        skipped = [{"video": paths[name], "questions": per_video[name], "reason": f"VideoError: {bad[paths[name]]}"}
                   for name in paths if paths[name] in bad]
        kept_names = [name for name in paths if paths[name] not in bad]
        frames = cache.load([paths[name] for name in kept_names])
    kept_videos = {name: i for i, name in enumerate(kept_names)}
    frames = torch.nn.functional.normalize(frames.float(), dim=-1) if kept_names else frames

    kept = [row for row in rows if row.vid_filename in kept_videos]
    text_feats, mask, at_limit = encode_candidates(clip, kept, template=template, device=device,
                                                   dim=frames.shape[-1] if frames.ndim == 3 else 1)
    if not kept_names:
        frames = torch.zeros(0, num_frames, text_feats.shape[-1])
    features = VideoQAFeatures(
        frames=frames,
        video_index=torch.tensor([kept_videos[r.vid_filename] for r in kept], dtype=torch.long),
        candidates=text_feats,
        answers=torch.tensor([r.answer for r in kept], dtype=torch.long),
        mask=mask)
    return EncodedSplit(features, [r.line for r in kept], [r.q_type for r in kept], [r.vid_filename for r in kept],
                        len(rows), len(paths), skipped, at_limit, time.perf_counter() - t0,
                        frames_cached=stats.hits, frames_computed=stats.computed)


@torch.inference_mode()
def encode_candidates(clip, rows, *, template: str = "{question} {answer}", device: str = "cpu",
                      dim: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Frozen-CLIP text features of every question+candidate of ``rows`` (TrafficQA rows).

    Returns (features (N, K, D) L2-normalized with empty options zeroed, mask (N, K) True for real options,
    the number of fused texts at the tokenizer's context limit). ``dim`` sizes the empty result (N = 0).
    """
    from mmadapters.video.tem_adapter import fuse_question_answer
    from mmadapters.vision.zeroshot import encode_texts

    rows = list(rows)
    k = len(rows[0].options) if rows else 4
    texts = [fuse_question_answer(row.question, option, template) for row in rows for option in row.options]
    at_limit = 0
    if texts:
        tokens = clip.tokenizer(texts)
        at_limit = int(((tokens != 0).sum(1) >= tokens.shape[1]).sum())
        feats = encode_texts(clip.model, clip.tokenizer, texts, device=device).reshape(len(rows), k, -1)
    else:
        feats = torch.zeros(0, k, dim)
    mask = torch.tensor([r.option_mask for r in rows], dtype=torch.bool).reshape(len(rows), k)
    feats[~mask] = 0.0  # empty options carry no text
    return feats, mask, at_limit


def score_split(method: str, test: EncodedSplit, train: EncodedSplit | None = None, *,
                official_repeat_pairing: bool = False, official_unshifted_future: bool = False, epochs: int = 50,
                batch_size: int = 128, lr: float = 1e-4, lr_halve_every: int = 10, seed: int = 0,
                device: str = "cpu") -> tuple[torch.Tensor, dict[str, Any] | None]:
    """Scores (N, K) of ``test`` by ``method``; for ``tem-adapter`` also its training record."""
    from mmadapters.video.tem_adapter import (
        TemAdapter,
        TemAdapterConfig,
        TemAdapterTrainConfig,
        frame_mean_scores,
        predict_scores,
        train_tem_adapter,
    )

    f = test.features
    if method == "zeroshot":
        if len(f) == 0:
            return torch.empty(0, f.candidates.shape[1]), None
        return frame_mean_scores(f.frames[f.video_index], f.candidates, f.mask), None
    if method != "tem-adapter":
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if train is None or len(train.features) == 0:
        raise ValueError("method 'tem-adapter' needs a training split with readable videos (train_annotations)")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    config = TemAdapterConfig.for_dim(train.features.frames.shape[-1], official_repeat_pairing=official_repeat_pairing,
                                      official_unshifted_future=official_unshifted_future)
    model = TemAdapter(config)
    history = train_tem_adapter(model, train.features, TemAdapterTrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, lr_halve_every=lr_halve_every, seed=seed, device=device))
    scores = predict_scores(model, f, device=device) if len(f) else torch.empty(0, f.candidates.shape[1])
    info = {"kind": "tem-adapter", "config": asdict(config), "train_questions": len(train.features),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "epochs": epochs, "final": history[-1] if history else None, "fit_s": round(time.perf_counter() - t0, 3)}
    return scores, info


def evaluate_videoqa(config: VideoQAConfig) -> dict[str, Any]:
    """Run one evaluation and write its results (and predictions). Returns the results dictionary."""
    from mmadapters import __version__
    from mmadapters.io import atomic_write_bytes
    from mmadapters.vision.clip import load_clip as load_clip_model

    t_start = time.perf_counter()
    if config.method not in METHODS:
        raise ValueError(f"--method {config.method!r}: expected one of {', '.join(METHODS)}")
    if config.on_error not in ("skip", "fail"):
        raise ValueError(f"--on-error {config.on_error!r}: expected skip or fail")
    if not config.annotations:
        raise ValueError("--annotations: the jsonl file of the evaluated split is required")
    if config.method == "tem-adapter" and not config.train_annotations:
        raise ValueError("--method tem-adapter trains on --train-annotations (a jsonl file); none given")
    if config.num_frames < 2 or config.epochs < 0 or config.batch_size < 1:
        raise ValueError("--num-frames must be >= 2 (Tem-Adapter predicts the next frame), --epochs >= 0, "
                         "--batch-size >= 1")
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    dataset = config.dataset or Path(config.annotations).stem
    t0 = time.perf_counter()
    clip = load_clip_model(config.model, config.pretrained, device=config.device,
                           cache_dir=str(cache_dir / "weights"), seed=config.seed, declare_points=False)
    load_s = time.perf_counter() - t0
    model_label = clip.info.short_name if config.model else "tiny_clip"
    task = TASK if config.method == "zeroshot" else f"{TASK}_{_variant(config)}"
    run_key = results_key({"weights": clip.info.identity(), **{k: v for k, v in asdict(config).items()
                                                               if k not in ("output", "predictions", "overwrite", "progress",
                                                                            "cache_dir", "device", "num_workers")}})
    out_path = None
    if config.output:
        from .zeroshot_eval import output_path

        out_path = output_path(config.output, dataset=dataset, model=model_label, pretrained=None, task=task)
        check_overwrite(out_path, run_key, config.overwrite)

    common = {"num_frames": config.num_frames, "template": config.template, "device": config.device,
              "on_error": config.on_error, "cache_dir": cache_dir, "num_workers": config.num_workers,
              "progress": config.progress}
    test = encode_split(clip, config.annotations, video_root=config.video_root, **common)
    train = None
    if config.method == "tem-adapter":
        train = encode_split(clip, config.train_annotations, video_root=config.video_root, **common)
    scores, adapter = score_split(config.method, test, train, official_repeat_pairing=config.official_repeat_pairing,
                                  official_unshifted_future=config.official_unshifted_future, epochs=config.epochs,
                                  batch_size=config.batch_size, lr=config.lr, lr_halve_every=config.lr_halve_every,
                                  seed=config.seed, device=config.device)
    results = build_results(dataset=dataset, model=model_label, pretrained=config.pretrained, task=task, test=test,
                            train=train, scores=scores, adapter=adapter, settings={
                                **{k: v for k, v in asdict(config).items() if k != "progress"},
                                "cache_dir": str(cache_dir), "weights": clip.info.as_dict()},
                            run_key=run_key, version=__version__, extra_timings={"model_load_s": round(load_s, 4)})
    results["timings"]["total_s"] = round(time.perf_counter() - t_start, 4)
    if config.predictions:
        pred_path = Path(config.predictions)
        pred_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(pred_path, prediction_lines(test, scores))
    if out_path is not None:
        write_results(out_path, results)
    return results


def _variant(config: VideoQAConfig) -> str:
    bugs = [name for name, on in (("repeat", config.official_repeat_pairing),
                                  ("unshifted", config.official_unshifted_future)) if on]
    return "tem_adapter" + ("_official_" + "_".join(bugs) if bugs else "")


def prediction_lines(test: EncodedSplit, scores: torch.Tensor) -> bytes:
    """JSON lines ``{"line", "vid_filename", "answer", "prediction", "scores"}`` of the evaluated questions."""
    f = test.features
    lines = [json.dumps({"line": ln, "vid_filename": v, "answer": int(a), "prediction": int(s.argmax()),
                         "scores": [round(x, 5) if x != float("-inf") else None for x in s.tolist()]})
             for ln, v, a, s in zip(test.lines, test.vid_filenames, f.answers, scores, strict=True)]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def build_results(*, dataset: str, model: str, pretrained: str | None, task: str, test: EncodedSplit,
                  train: EncodedSplit | None, scores: torch.Tensor, adapter: dict[str, Any] | None,
                  settings: dict[str, Any], run_key: str, version: str,
                  extra_timings: dict[str, float] | None = None) -> dict[str, Any]:
    """The results dictionary of one scored split (house schema; see the module docstring)."""
    f = test.features
    reasons = Counter(s["reason"].split(":", 1)[0] for s in test.skipped)
    counts = {"questions": test.num_questions, "evaluated": len(f), "skipped": test.skipped_questions,
              "skipped_by_reason": dict(reasons), "videos": test.num_videos, "videos_skipped": len(test.skipped),
              "options": int(f.candidates.shape[1]), "options_masked": int((~f.mask).sum()) if f.mask is not None else 0,
              "texts_at_context_limit": test.texts_at_context_limit,
              "skipped_videos": test.skipped[:MAX_LISTED_SKIPS]}
    if train is not None:
        counts.update({"train_questions": train.num_questions, "train_evaluated": len(train.features),
                       "train_skipped": train.skipped_questions})
    timings = {**(extra_timings or {}), "features_s": round(test.seconds + (train.seconds if train else 0.0), 4),
               "videos_from_cache": test.frames_cached + (train.frames_cached if train else 0),
               "videos_encoded": test.frames_computed + (train.frames_computed if train else 0),
               "adapter_fit_s": (adapter or {}).get("fit_s", 0.0)}
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": task,
        "metrics": videoqa_metrics(scores, f.answers, test.q_types, f.mask),
        "counts": counts,
        "timings": timings,
        "settings": jsonable(settings),
        "adapter": jsonable(adapter),
        "mmadapters_version": version,
        "run_key": run_key,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
