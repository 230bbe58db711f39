"""Frozen-CLIP features of multiple-choice VideoQA (SUTD-TrafficQA rows), shared by training and evaluation.

- :func:`fuse_question_answer` — one candidate's text (question and answer fused by a template);
- :func:`candidate_texts` — every candidate's text as ``candidate_text`` asks: ``"question_answer"`` (ours, the
  paper's description) or ``"options"`` (the official code: the option alone);
- :func:`encode_candidates` — the frozen CLIP text features of every candidate (N, K, D), with the
  mask of real options (SUTD-TrafficQA pads yes/no questions with empty options);
- :func:`scale_frames` — frame features as ``frame_features`` asks: ``"normalized"`` (unit L2 norm, ours) or
  ``"raw"`` (CLIP's unnormalized output, as the official code feeds them);
- :func:`encode_split` — a whole annotation file: frame features from
  :class:`~mmadapters.video.data.FrameFeatureCache` (computed once per weights, file and sampling) and text
  features, as a :class:`VideoQASplit` (what ``mmadapters train tem-adapter`` trains and validates on);
- :func:`videoqa_accuracy` — accuracy, chance level and per-question-type accuracy (training's validation and
  ``mmadapters eval videoqa`` report the same numbers).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

DEFAULT_TEMPLATE = "{question} {answer}"
CANDIDATE_TEXTS = ("question_answer", "options")
FRAME_FEATURES = ("normalized", "raw")


def fuse_question_answer(question: str, answer: str, template: str = DEFAULT_TEMPLATE) -> str:
    """One candidate's text: ``template`` with ``{question}`` and ``{answer}`` filled in (other braces kept)."""
    if "{answer}" not in template:
        raise ValueError(f"template {template!r}: expected an '{{answer}}' placeholder")
    return template.replace("{question}", question.strip()).replace("{answer}", answer.strip())


def candidate_texts(rows, *, candidate_text: str = "question_answer", template: str = DEFAULT_TEMPLATE) -> list[str]:
    """The N·K candidate texts of TrafficQA ``rows``, question-major (row b's K options, then row b+1's).

    ``"question_answer"``: ``template`` fills in the question and the option (the paper's "question and answer
    fused by a template"); ``"options"``: the option alone — what the official code scores (it encodes the
    question too but never uses it), ``template`` unused.
    """
    if candidate_text == "options":
        return [option.strip() for row in rows for option in row.options]
    if candidate_text != "question_answer":
        raise ValueError(f"candidate_text {candidate_text!r}: expected one of {', '.join(CANDIDATE_TEXTS)}")
    return [fuse_question_answer(row.question, option, template) for row in rows for option in row.options]


def scale_frames(frames: Tensor, frame_features: str = "normalized") -> Tensor:
    """``frames`` (..., D) CLIP image features -> float, L2-normalized per frame (``"normalized"``) or as CLIP
    gives them (``"raw"``, the official code's input)."""
    if frame_features not in FRAME_FEATURES:
        raise ValueError(f"frame_features {frame_features!r}: expected one of {', '.join(FRAME_FEATURES)}")
    frames = frames.float()
    return torch.nn.functional.normalize(frames, dim=-1) if frame_features == "normalized" else frames


@dataclass
class VideoQAFeatures:
    """Frozen-CLIP features of a multiple-choice VideoQA split.

    Several questions may share a video, so frames are stored once per video and indexed.
    """

    frames: Tensor  # (V, T, D) float: per-frame image features of each video
    video_index: Tensor  # (N,) long: the video of each question
    candidates: Tensor  # (N, K, D) float: text features of each fused question+candidate
    answers: Tensor  # (N,) long: the correct candidate
    mask: Tensor | None = None  # (N, K) bool: real candidates (None: all)

    def __post_init__(self) -> None:
        n = len(self.video_index)
        if self.candidates.shape[0] != n or self.answers.shape[0] != n:
            raise ValueError(f"VideoQAFeatures: {n} questions but candidates {tuple(self.candidates.shape)} and "
                             f"answers {tuple(self.answers.shape)}")
        if self.frames.shape[-1] != self.candidates.shape[-1]:
            raise ValueError(f"VideoQAFeatures: frame features have size {self.frames.shape[-1]}, text features "
                             f"{self.candidates.shape[-1]}")
        if n and (int(self.video_index.max()) >= len(self.frames) or int(self.video_index.min()) < 0):
            raise ValueError(f"VideoQAFeatures: video_index out of range for {len(self.frames)} videos")
        if n and (int(self.answers.min()) < 0 or int(self.answers.max()) >= self.candidates.shape[1]):
            raise ValueError(f"VideoQAFeatures: answers must lie in 0..{self.candidates.shape[1] - 1}")

    def __len__(self) -> int:
        return len(self.video_index)

    def batch(self, index: Tensor, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(frames (b, T, D), candidates (b, K, D), answers (b,), mask (b, K) | None) of questions ``index``."""
        frames = self.frames[self.video_index[index]].to(device, torch.float32)
        mask = None if self.mask is None else self.mask[index].to(device)
        return frames, self.candidates[index].to(device, torch.float32), self.answers[index].to(device), mask

    def subset(self, index: Tensor | Sequence[int]) -> VideoQAFeatures:
        index = torch.as_tensor(index, dtype=torch.long)
        return VideoQAFeatures(self.frames, self.video_index[index], self.candidates[index], self.answers[index],
                               None if self.mask is None else self.mask[index])


@dataclass
class VideoQASplit:
    """A split's features, each question's type and video, and the videos that could not be read."""

    features: VideoQAFeatures
    q_types: list[str | None]
    vid_filenames: list[str]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"video", "questions", "reason"}

    def subset(self, index: Sequence[int]) -> VideoQASplit:
        return VideoQASplit(self.features.subset(index), [self.q_types[i] for i in index],
                            [self.vid_filenames[i] for i in index], self.skipped)


@torch.inference_mode()
def encode_candidates(clip, rows, *, template: str = DEFAULT_TEMPLATE, candidate_text: str = "question_answer",
                      device: str | torch.device = "cpu", dim: int = 1) -> tuple[Tensor, Tensor]:
    """Frozen-CLIP text features of every candidate of ``rows`` (TrafficQA rows; texts: :func:`candidate_texts`).

    Returns (features (N, K, D) L2-normalized with empty options zeroed, mask (N, K) True for real options).
    ``dim`` sizes the empty result (N = 0).
    """
    from mmadapters.vision.zeroshot import encode_texts

    rows = list(rows)
    k = len(rows[0].options) if rows else 4
    texts = candidate_texts(rows, candidate_text=candidate_text, template=template)
    if texts:
        feats = encode_texts(clip.model, clip.tokenizer, texts, device=device).reshape(len(rows), k, -1)
    else:
        feats = torch.zeros(0, k, dim)
    mask = torch.tensor([r.option_mask for r in rows], dtype=torch.bool).reshape(len(rows), k)
    feats[~mask] = 0.0  # empty options carry no text
    return feats, mask


@torch.inference_mode()
def encode_split(clip, annotations: str | os.PathLike, *, video_root: str | os.PathLike | None = None,
                 num_frames: int = 8, template: str = DEFAULT_TEMPLATE, candidate_text: str = "question_answer",
                 frame_features: str = "normalized", device: str | torch.device = "cpu", on_error: str = "skip",
                 cache_dir: str | os.PathLike, num_workers: int = 0) -> VideoQASplit:
    """Read ``annotations`` and encode it with ``clip`` (a :class:`~mmadapters.vision.clip.ClipBundle`).

    Frame features (V, T, D) come from the cache under ``cache_dir/frame_features`` (the one
    ``mmadapters eval videoqa`` reads), scaled by :func:`scale_frames` (``frame_features``); candidate texts follow
    ``candidate_text`` (:func:`candidate_texts`). A video that
    cannot be decoded leaves its questions out (listed in ``skipped``); ``on_error="fail"`` raises its
    :class:`~mmadapters.video.io.VideoError` instead.
    """
    from .data import FrameFeatureCache
    from .readers import read_trafficqa, trafficqa_video_path

    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error {on_error!r}: expected 'skip' or 'fail'")
    for name, value, allowed in (("candidate_text", candidate_text, CANDIDATE_TEXTS),
                                 ("frame_features", frame_features, FRAME_FEATURES)):
        if value not in allowed:  # checked before any video is decoded
            raise ValueError(f"{name} {value!r}: expected one of {', '.join(allowed)}")
    annotations = Path(annotations)
    root = Path(video_root) if video_root is not None else annotations.parent
    rows = read_trafficqa(annotations, video_root=root)
    if not rows:
        raise ValueError(f"{annotations}: no questions")
    paths = {row.vid_filename: str(trafficqa_video_path(row, root)) for row in rows}
    cache = FrameFeatureCache(Path(cache_dir) / "frame_features", clip, num_frames=num_frames, device=device)
    bad = {b.path: b.reason for b in cache.build(list(paths.values()), num_workers=num_workers,
                                                  fail_fast=on_error == "fail").skipped}
    kept_names = [name for name, path in paths.items() if path not in bad]
    skipped = [{"video": path, "questions": sum(r.vid_filename == name for r in rows), "reason": f"VideoError: {bad[path]}"}
               for name, path in paths.items() if path in bad]
    kept = [row for row in rows if paths[row.vid_filename] not in bad]
    frames = cache.load([paths[name] for name in kept_names])
    frames = scale_frames(frames, frame_features) if kept_names else frames
    candidates, mask = encode_candidates(clip, kept, template=template, candidate_text=candidate_text, device=device,
                                         dim=frames.shape[-1] if frames.ndim == 3 else 1)
    if not kept_names:
        frames = torch.zeros(0, num_frames, candidates.shape[-1])
    position = {name: i for i, name in enumerate(kept_names)}
    features = VideoQAFeatures(frames=frames, video_index=torch.tensor([position[r.vid_filename] for r in kept], dtype=torch.long),
                               candidates=candidates, answers=torch.tensor([r.answer for r in kept], dtype=torch.long),
                               mask=mask)
    return VideoQASplit(features, [r.q_type for r in kept], [r.vid_filename for r in kept], skipped)


def videoqa_accuracy(correct: Sequence[bool], options: Sequence[int], q_types: Sequence[str | None]
                     ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """({"acc", "chance"}, per question type {"acc", "questions"}) of answered questions.

    ``correct`` whether each question's top-scored candidate is its answer, ``options`` how many real
    candidates it had (chance = mean of 1 / options).
    """
    if not correct:
        raise ValueError("videoqa_accuracy: no questions")
    groups: dict[str, list[bool]] = {}
    for t, ok in zip(q_types, correct, strict=True):
        groups.setdefault(str(t), []).append(bool(ok))
    metrics = {"acc": sum(map(bool, correct)) / len(correct), "chance": sum(1.0 / k for k in options) / len(options)}
    return metrics, {t: {"acc": sum(v) / len(v), "questions": len(v)} for t, v in sorted(groups.items())}
