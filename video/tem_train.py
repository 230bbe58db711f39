"""Tem-Adapter on the training engine: ``mmadapters train tem-adapter --config configs/tem-adapter.yaml``.

The frozen CLIP encodes every video's sampled frames and every question+candidate text once
(:func:`mmadapters.video.qa_features.encode_split`, frame features cached on disk); the engine then trains
the two aligners of :class:`~mmadapters.video.tem_adapter.TemAdapter` on those features with the paper's
loss, validates accuracy on a validation split every ``trainer.eval_every`` steps and keeps the best one.

Loss. The official code *sums* the hinge over the batch and weights it 0.01, and averages the
future-feature MSE (:meth:`~mmadapters.video.tem_adapter.TemAdapter.loss`). The engine wants a mean over the batch's
items (so that ranks under DDP average to the single-process gradient), so the hinge enters as its
per-question mean times the *global* batch size: on every full batch the value and gradient are exactly
the official loss (``hinge_reduction: sum``). ``hinge_reduction: mean`` drops that factor.

The official schedule (Adam, lr 1e-4 halved every 10 epochs) has no step-halving schedule in the engine;
the recipe's trainer defaults are Adam-equivalent AdamW (``weight_decay: 0``) at 1e-4, constant, with the
official gradient clip 12.

Validation never reads the test split: ``val_annotations`` names a file, or ``val_fraction`` of the
*videos* of ``train_annotations`` (all questions of a held-out video go together) is held out with
``split_seed``. ``val_annotations`` equal to ``train_annotations`` trains on every question and reports
training accuracy (the protocol of ``scripts/run_tem_adapter.py``: fixed steps, ``last/`` evaluated).

Official-code options (today's defaults are ours; each is recorded with the run and
``mmadapters eval videoqa --adapters`` uses the recorded value, an explicit contradicting flag is an error):

- ``candidate_text``: ``question_answer`` (default) scores ``template`` filled with question and option — the
  paper's description, and on the generated worlds the only way a candidate can tell "starts left" questions from
  their reverse; ``options`` scores the option alone, as the official code does (it encodes the question but
  never uses it), so ``template`` is unused.
- ``frame_features``: ``normalized`` (default) feeds unit-L2 frame features, on the scale of the (normalized)
  candidate texts; ``raw`` feeds CLIP's unnormalized image features, as the official code does. The sinusoidal
  positions have norm ``sqrt(D/2)`` per frame whatever the input: measured on the shipped tiny CLIP (D = 96,
  24 generated test videos × 8 frames) that is 6.93 against 1.0 at unit norm (~7×; 31.7× the frames' own
  change over time, 0.22) but 0.46× the raw features (norm 14.9, range 13.6–16.6; 2.1× their change over
  time, 3.28). ViT-B/32 (D = 512): positions 16.0, raw features ~10. Normalizing thus lets the positions
  drown the frame content at the Temporal Aligner's input; ``raw`` is the scale the official code trained at.
- ``num_frames``: frames per video (default 8, uniform TSN middles). The official code takes 8 clips × 16
  consecutive frames and flattens them into 128 frames for the Temporal Aligner: ``num_frames: 128`` gives it
  128 evenly spaced frames (the same count; evenly spaced rather than 8 bursts of 16), ``max_frames`` 1024.

A run directory's ``best/`` and ``last/`` hold ``tem_adapter.safetensors`` (weights + the module config,
:func:`~mmadapters.video.tem_adapter.save_tem_adapter`) and ``tem_adapter.json`` (the frozen CLIP, frame
sampling, text template, candidate text and frame scale the features were made with); :func:`load_tem_run`
reads both.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .qa_features import CANDIDATE_TEXTS, DEFAULT_TEMPLATE, FRAME_FEATURES, VideoQAFeatures, VideoQASplit, videoqa_accuracy
from .tem_adapter import TemAdapter, TemAdapterConfig, load_tem_adapter, save_tem_adapter

RECIPE_NAME = "tem-adapter"
WEIGHTS_NAME = "tem_adapter.safetensors"
META_NAME = "tem_adapter.json"


@dataclass
class TemAdapterRecipeConfig:
    """The ``recipe:`` section of ``mmadapters train tem-adapter`` (paths are relative to the working directory)."""

    train_annotations: str = field(default="", metadata={"help": "SUTD-TrafficQA jsonl of the training split (required)"})
    val_annotations: str | None = field(default=None, metadata={
        "help": "jsonl of the validation split (default: hold out val_fraction of the training videos)"})
    val_fraction: float = field(default=0.2, metadata={"help": "share of training videos held out for validation"})
    split_seed: int = field(default=0, metadata={"help": "seed of the held-out video choice"})
    video_root: str | None = field(default=None, metadata={
        "help": "folder the vid_filename paths are relative to (default: each annotation file's folder)"})
    model: str | None = field(default=None, metadata={
        "help": "frozen CLIP: open_clip name, local-dir:DIR or hf-hub:org/repo (default: the shipped tiny CLIP)"})
    pretrained: str | None = field(default=None, metadata={"help": "pretrained tag or weights file for a built-in name"})
    num_frames: int = field(default=8, metadata={
        "help": "frames sampled per video (TSN test-time sampling); official: 128 (8 clips x 16 frames)"})
    candidate_text: Literal["question_answer", "options"] = field(default="question_answer", metadata={
        "help": "candidate texts: question_answer (template, ours) or options (the option alone, official code)"})
    frame_features: Literal["normalized", "raw"] = field(default="normalized", metadata={
        "help": "frame features: normalized (unit L2, ours) or raw (CLIP's unnormalized output, official code)"})
    template: str = field(default=DEFAULT_TEMPLATE, metadata={
        "help": "question+answer fusion template (candidate_text: question_answer only)"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "frame-feature and weights cache (default: $MMADAPTERS_CACHE or ~/.cache/mmadapters)"})
    num_workers: int = field(default=0, metadata={"help": "video decoding worker processes"})
    on_error: Literal["skip", "fail"] = field(default="skip", metadata={
        "help": "unreadable videos: skip their questions (counted) or stop"})
    semantic_width: int | None = field(default=None, metadata={"help": "Semantic Aligner width (default: dim // 4)"})
    gamma_init: float = field(default=1e-4, metadata={"help": "initial per-channel scale γ of the text update"})
    semantic_dropout: float = field(default=0.2, metadata={"help": "Semantic Aligner dropout"})
    temporal_dropout: float = field(default=0.1, metadata={"help": "Temporal Aligner dropout"})
    margin: float = field(default=1.0, metadata={"help": "hinge margin"})
    hinge_weight: float = field(default=0.01, metadata={"help": "weight of the multiple-choice hinge"})
    future_weight: float = field(default=1.0, metadata={"help": "weight of the future-feature MSE"})
    hinge_reduction: Literal["sum", "mean"] = field(default="sum", metadata={
        "help": "sum: the hinge summed over the global batch (official; the 0.01 weight is set for it); mean: per question"})
    official_repeat_pairing: bool = field(default=False, metadata={
        "help": "official-code bug: candidates attend to other questions' videos (repeat instead of repeat_interleave)"})
    official_unshifted_future: bool = field(default=False, metadata={
        "help": "official-code bug: the 'future' target is the decoder's own input frames"})
    eval_batch_size: int = field(default=256, metadata={"help": "questions per batch in validation"})

    def __post_init__(self) -> None:
        if self.val_annotations is None and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"recipe.val_fraction: expected a number in (0, 1) when no val_annotations is given, "
                             f"got {self.val_fraction}")
        if self.num_frames < 2:
            raise ValueError(f"recipe.num_frames: expected >= 2 (the Temporal Aligner predicts the next frame), "
                             f"got {self.num_frames}")
        for name, allowed in (("candidate_text", CANDIDATE_TEXTS), ("frame_features", FRAME_FEATURES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"recipe.{name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.eval_batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"recipe.eval_batch_size >= 1 and recipe.num_workers >= 0 expected, got "
                             f"{self.eval_batch_size} and {self.num_workers}")


def hold_out_videos(vid_filenames: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) question indices: ``ceil(fraction · V)`` of the V distinct videos (seeded) go to val.

    All questions about one video land on the same side, so validation never sees a training video.
    """
    videos = sorted(set(vid_filenames))
    if len(videos) < 2:
        raise ValueError(f"recipe.val_fraction: holding out videos needs at least 2 readable training videos, "
                         f"got {len(videos)}; give recipe.val_annotations")
    random.Random(seed).shuffle(videos)
    n_val = min(max(1, math.ceil(fraction * len(videos))), len(videos) - 1)
    held = set(videos[:n_val])
    train = [i for i, v in enumerate(vid_filenames) if v not in held]
    val = [i for i, v in enumerate(vid_filenames) if v in held]
    return train, val


def run_metadata(config: TemAdapterRecipeConfig, clip_info: dict[str, Any], model_config: TemAdapterConfig) -> dict[str, Any]:
    """What an evaluation needs to rebuild the features a saved Tem-Adapter was trained on."""
    from mmadapters import __version__

    return {"recipe": RECIPE_NAME, "clip": {"model": config.model, "pretrained": config.pretrained, **{
        k: clip_info.get(k) for k in ("weights_sha256", "seed")}}, "num_frames": config.num_frames,
        "template": config.template, "candidate_text": config.candidate_text,
        "frame_features": config.frame_features, "tem_adapter_config": asdict(model_config), "library_version": __version__}


def save_tem_run(model: TemAdapter, directory: str | Path, metadata: dict[str, Any]) -> None:
    """``directory/tem_adapter.safetensors`` and ``directory/tem_adapter.json``, each written atomically."""
    from mmadapters.eval.results_io import json_bytes
    from mmadapters.io import atomic_write_bytes

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tem_adapter(model, directory / WEIGHTS_NAME)
    atomic_write_bytes(directory / META_NAME, json_bytes(metadata))


def load_tem_run(directory: str | Path) -> tuple[TemAdapter, dict[str, Any]]:
    """(model in eval mode, metadata) of a directory written by :func:`save_tem_run` (a run's ``best/`` or ``last/``)."""
    directory = Path(directory)
    weights, meta_path = directory / WEIGHTS_NAME, directory / META_NAME
    for path in (weights, meta_path):
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: not a Tem-Adapter run directory (expected {path.name}; "
                                    f"`mmadapters train tem-adapter` writes it into OUTPUT/best/ and OUTPUT/last/)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("recipe") != RECIPE_NAME:
        raise ValueError(f"{meta_path}: field 'recipe': expected {RECIPE_NAME!r}, got "
                         f"{meta.get('recipe') if isinstance(meta, dict) else type(meta).__name__!r}")
    for key, kind in (("num_frames", int), ("template", str), ("clip", dict)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{meta_path}: field {key!r}: expected {kind.__name__}, got {meta.get(key)!r}")
    # runs recorded before these options existed used today's defaults
    meta.setdefault("candidate_text", "question_answer")
    meta.setdefault("frame_features", "normalized")
    for key, allowed in (("candidate_text", CANDIDATE_TEXTS), ("frame_features", FRAME_FEATURES)):
        if meta[key] not in allowed:
            raise ValueError(f"{meta_path}: field {key!r}: expected one of {', '.join(allowed)}, got {meta[key]!r}")
    return load_tem_adapter(weights), meta


@torch.inference_mode()
def predict_scores(model: TemAdapter, data: VideoQAFeatures, *, batch_size: int = 256,
                   device: str | torch.device = "cpu") -> Tensor:
    """Scores (N, K) of every question (eval mode, no future prediction; masked options at -inf)."""
    model.to(device).eval()
    out = []
    for index in torch.arange(len(data)).split(batch_size):
        frames, candidates, _, mask = data.batch(index, device)
        out.append(model(frames, candidates, mask=mask).scores.float().cpu())
    return torch.cat(out) if out else torch.empty(0, data.candidates.shape[1])


class TemAdapterTask:
    """The engine's TrainTask for Tem-Adapter: precomputed frozen-CLIP features, the paper's loss, val accuracy.

    ``hinge_scale`` turns the per-question hinge mean back into the official batch sum (the global batch size
    for ``hinge_reduction: sum``, 1 for ``mean``). ``metadata`` (:func:`run_metadata`) is what
    :func:`save_tem_run` records next to the weights.
    """

    select_metric = "acc"
    select_mode = "max"

    def __init__(self, model: TemAdapter, train: VideoQASplit, val: VideoQASplit, *, metadata: dict[str, Any],
                 device: str | torch.device = "cpu", hinge_scale: float = 1.0, eval_batch_size: int = 256,
                 backbone_parameters: int = 0):
        self.model: nn.Module = model.to(device).train()
        self.train, self.val, self.device = train, val, torch.device(device)
        self.hinge_scale, self.eval_batch_size = hinge_scale, eval_batch_size
        self.metadata = metadata
        self.backbone_parameters = backbone_parameters

    def train_size(self) -> int:
        return len(self.train.features)

    def get_batch(self, indices: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(frames (b, T, D), candidates (b, K, D), answers (b,), mask (b, K)) on the task's device."""
        return self.train.features.batch(torch.as_tensor(indices, dtype=torch.long), self.device)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor, Tensor | None]) -> Tensor:
        """``w_h · scale · mean_b hinge_b + w_f · future_mse`` (scale = global batch for the official sum)."""
        frames, candidates, answers, mask = batch
        if not model.training:
            model.train()
        out = model(frames, candidates, answers, mask)
        config = self.model.config  # the same config as `model`'s (DDP wraps self.model)
        parts = self.model.loss(out, answers, mask)
        hinge = parts["hinge"] * (self.hinge_scale / len(answers))
        return config.hinge_weight * hinge + config.future_weight * parts["future_mse"]

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Accuracy on the validation split (``acc``, ``acc_<q_type>`` per question type, ``chance``)."""
        was_training = self.model.training
        f = self.val.features
        scores = predict_scores(self.model, f, batch_size=self.eval_batch_size, device=self.device)
        self.model.train(was_training)
        options = f.mask.sum(1).tolist() if f.mask is not None else [f.candidates.shape[1]] * len(f)
        metrics, per_type = videoqa_accuracy((scores.argmax(1) == f.answers).tolist(), options, self.val.q_types)
        return {"acc": metrics["acc"], **{f"acc_{t}": g["acc"] for t, g in per_type.items()}, "chance": metrics["chance"]}

    def save(self, directory: Path) -> None:
        save_tem_run(self.model, directory, self.metadata)

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"trainable": trainable, "total": trainable + self.backbone_parameters,
                "backbone": self.backbone_parameters}


def build_task(config: TemAdapterRecipeConfig, trainer: Any) -> TemAdapterTask:
    """The engine's entry point: encode the splits with the frozen CLIP, build the aligners (seeded)."""
    from mmadapters.distributed import device_for_rank
    from mmadapters.eval.results_io import default_cache_dir
    from mmadapters.vision.clip import load_clip

    from .qa_features import encode_split

    if not config.train_annotations:
        raise ValueError("recipe.train_annotations: the SUTD-TrafficQA jsonl of the training split is required")
    device = device_for_rank(trainer.device)
    cache_dir = default_cache_dir(config.cache_dir)
    clip = load_clip(config.model, config.pretrained, device=device, cache_dir=str(cache_dir / "weights"),
                     seed=trainer.seed, declare_points=False)
    backbone = sum(p.numel() for p in clip.model.parameters())
    common = {"video_root": config.video_root, "num_frames": config.num_frames, "template": config.template,
              "candidate_text": config.candidate_text, "frame_features": config.frame_features,
              "device": device, "on_error": config.on_error, "cache_dir": cache_dir, "num_workers": config.num_workers}
    train = encode_split(clip, config.train_annotations, **common)
    if not config.val_annotations:
        train_idx, val_idx = hold_out_videos(train.vid_filenames, config.val_fraction, config.split_seed)
        train, val = train.subset(train_idx), train.subset(val_idx)
    elif Path(config.val_annotations).resolve() == Path(config.train_annotations).resolve():
        val = train  # validation reports training accuracy; every question trains
    else:
        val = encode_split(clip, config.val_annotations, **common)
    metadata_clip = clip.info.as_dict()
    del clip
    for name, split, source in (("training", train, config.train_annotations),
                                ("validation", val, config.val_annotations or config.train_annotations)):
        if len(split.features) == 0:
            raise ValueError(f"{source}: the {name} split has no question with a readable video "
                             f"({len(split.skipped)} videos skipped)")
    torch.manual_seed(trainer.seed)  # the aligners' initialization
    model_config = TemAdapterConfig.for_dim(
        int(train.features.frames.shape[-1]), semantic_width=config.semantic_width, gamma_init=config.gamma_init,
        semantic_dropout=config.semantic_dropout, temporal_dropout=config.temporal_dropout, margin=config.margin,
        hinge_weight=config.hinge_weight, future_weight=config.future_weight,
        official_repeat_pairing=config.official_repeat_pairing, official_unshifted_future=config.official_unshifted_future)
    # hinge per question × global batch = the official batch sum (see the module docstring)
    return TemAdapterTask(TemAdapter(model_config), train, val, device=device,
                          hinge_scale=float(trainer.batch_size) if config.hinge_reduction == "sum" else 1.0,
                          eval_batch_size=config.eval_batch_size, backbone_parameters=backbone,
                          metadata=run_metadata(config, metadata_clip, model_config))


def _recipe():
    from mmadapters.training.recipe import Recipe

    return Recipe(
        name=RECIPE_NAME, config_class=TemAdapterRecipeConfig, build_task=build_task,
        trainer_defaults={"lr": 1e-4, "batch_size": 128, "weight_decay": 0.0, "schedule": "constant",
                          "grad_clip": 12.0, "select_metric": "acc", "select_mode": "max"},
        description="Tem-Adapter (ICCV'23): Semantic + Temporal Aligner on frozen CLIP features, multiple-choice VideoQA")


def __getattr__(name: str) -> Any:
    # RECIPE is built on first access, so this module imports (and its task can be used) without the engine
    if name == "RECIPE":
        recipe = _recipe()
        globals()["RECIPE"] = recipe
        return recipe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
