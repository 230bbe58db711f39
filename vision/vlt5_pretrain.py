"""``mmadapters train vlt5-pretrain``: pretrain a (tiny) VL-T5 from scratch on generated scenes, on the training engine.

The shipped tiny VL-T5 (``vision/assets/tiny_vlt5``) is made by this recipe (``scripts/pretrain_tiny_vlt5.py`` runs it
and writes the asset's README). The engine (:mod:`mmadapters.training`) owns the loop: data order, AdamW, warmup and
schedule, gradient clipping, ``trainer.max_minutes``, checkpoints and ``--resume``, best-checkpoint selection.
This module supplies what is VL-T5 pretraining's:

- **Data**: the *pretraining* stream of :func:`mmadapters.vision.synth_vl.generate_vl` (``pretrain=True``, ids
  ``synthpt_*``, ``data_seed`` 1 where the downstream tasks use 0), generated into ``data`` when absent, so no
  downstream image is ever seen here. CLIP grid features of every image (default: the shipped tiny CLIP, last
  visual block, ``num_visual_tokens`` tokens) are computed once into ``<data>/features_tiny_clip_<N>.h5``.
- **Vocabulary**: a word-level T5-layout tokenizer (:mod:`mmadapters.vision.vl_tokenizer`, 100 sentinels) over every
  text of the pretraining set (captions, questions, answers, NLVR statements) and the task prefixes, so downstream
  fine-tuning finds its words. With ``init`` (continue from a saved VL-T5) that model's tokenizer is kept.
- **Objectives**, one drawn per training item (an item is one training image) with the ``objectives`` weights:

  * ``caption``: ``"caption: "`` -> one of the image's reference captions;
  * ``span``: ``"span prediction: "`` + one of the image's captions or questions under T5 span corruption
    (:func:`span_corrupt`: ``noise_density`` of the words in spans of mean length ``mean_span``, each replaced by a
    sentinel) -> the sentinel-marked spans, conditioned on the image as VL-T5's visual MLM is;
  * ``vqa`` / ``gqa`` (off by default: QA-style pretraining): ``"vqa: "`` / ``"gqa: "`` + one of the image's
    pretraining-stream questions -> its answer; the VQA answer is drawn in proportion to its soft score (VL-T5's
    official target; ``vqa_target: best`` takes the best-scored one). The prefixes are VL-Adapter's.

  The draws come from a generator seeded by ``(trainer.seed, the batch's item indices)``: a pure function of the
  data position, so ``--resume`` repeats them.
- **Loss**: T5's token-mean cross-entropy over the batch's targets.
- **Validation** (held-out ``val`` images of the pretraining stream): greedy captions scored by
  ``mmadapters eval caption``'s own predictor and metrics (:func:`~mmadapters.vision.vl_adapter.predict_records`,
  :func:`~mmadapters.vision.vl_adapter.task_metrics`: pycocoevalcap CIDEr and BLEU-4) — ``caption_cider`` selects
  best/ —, the per-token loss of every objective in use under a fixed draw (``<objective>_loss``) and, for the QA
  objectives, ``vqa_accuracy`` / ``gqa_accuracy`` of greedy answers.
- **Saving**: best/ and last/ are VL-T5 directories (:meth:`~mmadapters.vision.vlt5.VLT5.save_pretrained`: the T5 in
  transformers' layout, the visual projection, the tokenizer, ``vlt5.json``; fp16 weights by default), loadable with
  ``VLT5.from_pretrained(dir)`` and usable as ``recipe.model`` of ``mmadapters train vl-adapter``.

Trainer defaults are the shipped model's: 3,000 steps, batch 32, AdamW lr 1e-3, weight decay 0.01 (on every
parameter: the engine's AdamW has one group), 5% warmup then cosine decay, gradient clipping at 1. Example
(``configs/vlt5-pretrain.yaml``)::

    mmadapters train vlt5-pretrain --config configs/vlt5-pretrain.yaml --set trainer.max_minutes=25
    mmadapters train vlt5-pretrain --config configs/vlt5-pretrain.yaml --resume      # after a crash
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmadapters import distributed
from mmadapters.training.recipe import Recipe

from .vl_adapter import SYNTH_FILES, TASK_PREFIX, FeatureCache, predict_records, read_split, task_metrics
from .vl_readers import VLSample, load_features

SPAN_PREFIX = "span prediction: "
OBJECTIVES = ("caption", "span", "vqa", "gqa")
QA = ("vqa", "gqa")
SPLIT_NAMES = ("train", "val", "test")


def _help(text: str, default: Any = None, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text})


@dataclass
class Objectives:
    """Relative weights of the pretraining objectives (each training item draws one)."""

    caption: float = _help("'caption: ' -> one of the image's reference captions.", 0.5)
    span: float = _help("'span prediction: ' + a corrupted caption or question -> the masked spans.", 0.5)
    vqa: float = _help("'vqa: ' + a question of the image -> its answer (QA-style pretraining).", 0.0)
    gqa: float = _help("'gqa: ' + a relational question of the image -> its answer (QA-style pretraining).", 0.0)

    def __post_init__(self) -> None:
        for name in OBJECTIVES:
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"objectives.{name}: expected a finite weight >= 0, got {getattr(self, name)!r}")
        if not any(getattr(self, name) for name in OBJECTIVES):
            raise ValueError(f"every weight is 0; give at least one of {list(OBJECTIVES)} a positive weight")

    def used(self) -> list[str]:
        return [name for name in OBJECTIVES if getattr(self, name) > 0]


@dataclass
class VLT5PretrainConfig:
    """The ``recipe:`` section of ``mmadapters train vlt5-pretrain``."""

    data: str = _help("Pretraining data folder; generated with generate_vl(pretrain=True) when absent or made with "
                      "other arguments.", "data/vl_pretrain")
    n_images: int = _help("Images of the pretraining stream (split 80/10/10 into train/val/test).", 6000)
    data_seed: int = _help("Seed of the generated data (the downstream tasks use 0).", 1)
    questions_per_image: int = _help("VQA-like and GQA-like questions generated per image (0-10 each).", 3)
    features: str | None = _help("CLIP grid features of the images (.h5 or a folder of .safetensors); None: "
                                 "<data>/features_tiny_clip_<num_visual_tokens>.h5, computed once with clip_model.")
    clip_model: str | None = _help("open_clip model computing the features (None: the shipped VL-T5's feature CLIP, "
                                   "vision/assets/tiny_vlt5/feature_clip).")
    clip_pretrained: str | None = _help("Pretrained tag or weights file of clip_model.")
    init: str | None = _help("Continue from this VL-T5 directory (its tokenizer and dropout kept; the size fields "
                             "below must match it). None: a fresh model of the size below.")
    d_model: int = _help("T5 width.", 128)
    d_ff: int = _help("T5 feed-forward width (ReLU FFN, T5 v1.0 layout, tied embeddings).", 256)
    num_layers: int = _help("Encoder layers, and as many decoder layers.", 3)
    num_heads: int = _help("Attention heads.", 4)
    dropout: float = _help("T5 dropout rate.", 0.1)
    num_visual_tokens: int = _help("CLIP grid tokens per image (a perfect square).", 16)
    objectives: Objectives = _help("Objective weights.", default_factory=Objectives)
    noise_density: float = _help("Span corruption: share of the words masked.", 0.15)
    mean_span: float = _help("Span corruption: mean length of a masked span, in words.", 3.0)
    vqa_target: Literal["sampled", "best"] = _help("VQA training answer: drawn in proportion to its soft score "
                                                   "(VL-T5), or always the best-scored one.", "sampled")
    max_val_images: int | None = _help("Validate on at most this many val images (None: all).", None)
    max_val_questions: int | None = _help("Validate VQA/GQA accuracy on at most this many val questions each.", 300)
    eval_batch_size: int = _help("Batch size of validation.", 64)
    max_new_tokens: int = _help("Generation length in validation.", 48)
    fp16: bool = _help("Store best/ and last/ weights in float16 (the shipped layout).", True)

    def __post_init__(self) -> None:
        for name in ("n_images", "d_model", "d_ff", "num_layers", "num_heads", "num_visual_tokens", "eval_batch_size",
                     "max_new_tokens", "max_val_images", "max_val_questions"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        checks = {"questions_per_image": (0 <= self.questions_per_image <= 10, "an integer in [0, 10]"),
                  "dropout": (0.0 <= self.dropout < 1.0, "a number in [0, 1)"),
                  "noise_density": (0.0 < self.noise_density < 1.0, "a number in (0, 1)"),
                  "mean_span": (self.mean_span >= 1.0, "a number >= 1"),
                  "vqa_target": (self.vqa_target in ("sampled", "best"), "'sampled' or 'best'")}
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model: {self.d_model} is not a multiple of num_heads={self.num_heads}")
        if self.questions_per_image == 0 and any(getattr(self.objectives, t) for t in QA):
            raise ValueError("objectives: vqa/gqa need questions; questions_per_image is 0")

    def features_path(self) -> Path:
        if self.features is not None:
            return Path(self.features)
        clip = "tiny_clip" if self.clip_model is None else re.sub(r"[^A-Za-z0-9_.-]+", "_", self.clip_model)
        return Path(self.data) / f"features_{clip}_{self.num_visual_tokens}.h5"


# ---------------------------------------------------------------------------------------------- objectives


def span_corrupt(ids: Sequence[int], rng: random.Random, sentinels: Sequence[int], density: float,
                 mean_span: float) -> tuple[list[int], list[int]]:
    """T5 span corruption of a token list: ``(input with each noise span replaced by a sentinel, target of
    sentinel + span tokens)``. ``round(len * density)`` tokens (at least 1, never all) are masked in
    ``round(noise / mean_span)`` spans that alternate with kept runs, starting with a kept run."""
    n = len(ids)
    num_noise = min(max(1, round(n * density)), n - 1) if n > 1 else 0
    if num_noise == 0:
        return list(ids), []
    num_spans = max(1, min(round(num_noise / mean_span), num_noise, n - num_noise, len(sentinels)))

    def parts(total: int, k: int) -> list[int]:
        cuts = sorted(rng.sample(range(1, total), k - 1)) if k > 1 else []
        return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]

    noise, keep = parts(num_noise, num_spans), parts(n - num_noise, num_spans)
    inp: list[int] = []
    tgt: list[int] = []
    pos = 0
    for k in range(num_spans):
        inp += [*ids[pos:pos + keep[k]], sentinels[k]]
        pos += keep[k]
        tgt += [sentinels[k], *ids[pos:pos + noise[k]]]
        pos += noise[k]
    inp += ids[pos:]
    return inp, tgt


def qa_answer(sample: VLSample, rng: random.Random, how: str = "sampled") -> str:
    """The training answer of a VQA/GQA sample: drawn in proportion to the soft label's scores (``"sampled"``;
    VL-T5's VQA target), or the best-scored answer (``"best"``; GQA has one answer either way)."""
    scored = [(a, s) for a, s in (sample.label or {}).items() if s > 0]
    if how == "best" or len(scored) < 2:
        return sample.targets[0]
    return rng.choices([a for a, _ in scored], weights=[s for _, s in scored])[0]


@dataclass
class ImageTexts:
    """One image's pre-tokenized texts (token ids without ``</s>``)."""

    img_id: str
    captions: list[list[int]]
    questions: dict[str, list[tuple[VLSample, list[int]]]]  # "vqa"/"gqa" -> (sample, question ids)

    def span_texts(self) -> list[list[int]]:
        return self.captions + [ids for qs in self.questions.values() for _, ids in qs]


@dataclass
class PretrainBatch:
    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    visual_feats: Tensor  # (B, N, D)
    labels: Tensor  # (B, T_out), -100 at padding


# ---------------------------------------------------------------------------------------------- data


def prepare_data(config: VLT5PretrainConfig, progress: bool = True) -> tuple[dict, Path]:
    """Generate the pretraining set (if needed) and its features (if needed) on rank 0; returns
    (dataset.json's record, the features path). The other ranks wait."""
    from .synth_vl import generate_vl

    path = config.features_path()
    meta = Path(config.data) / "dataset.json"
    record: dict = {}
    if distributed.is_main():
        before = meta.read_bytes() if meta.is_file() else None
        record = generate_vl(config.data, n_images=config.n_images, seed=config.data_seed, pretrain=True,
                             vqa_per_image=config.questions_per_image, gqa_per_image=config.questions_per_image,
                             progress=progress)
        if config.features is None and path.exists() and meta.read_bytes() != before:
            path.unlink()  # the data was (re)generated: our cached features are of other images
        if not path.exists():
            from .clip import load_clip
            from .vl_features import extract_features, feature_clip

            images = sorted((Path(config.data) / "images").glob("*.png"))
            bundle = load_clip(feature_clip(config.clip_model, config.clip_pretrained), config.clip_pretrained)
            extract_features({p.stem: p for p in images}, bundle, path,
                             num_tokens=config.num_visual_tokens, batch_size=128, progress=progress)
    distributed.barrier()
    if not record:
        record = json.loads(meta.read_text(encoding="utf-8"))
    return record, path


def read_samples(data: Path) -> dict[str, dict[str, list[VLSample]]]:
    """split -> task -> samples of a synth_vl folder (NLVR pairs: every split, for the vocabulary only)."""
    return {split: {task: list(read_split(task, data / SYNTH_FILES[task][split], split)) for task in SYNTH_FILES}
            for split in SPLIT_NAMES}


def vocabulary_texts(samples: Mapping[str, Mapping[str, Sequence[VLSample]]]) -> list[str]:
    """Every text of the set (captions, questions, answers, statements) plus the prefixes and NLVR's answers."""
    texts = [*TASK_PREFIX.values(), SPAN_PREFIX, "true false yes no"]
    for by_task in samples.values():
        for rows in by_task.values():
            for s in rows:
                texts += [s.text, *s.targets, *(s.answers or ()), *(s.label or {})]
    return texts


# ---------------------------------------------------------------------------------------------- the task


class VLT5PretrainTask:
    """The engine's TrainTask for VL-T5 pretraining (module docstring)."""

    select_metric = "caption_cider"
    select_mode = "max"

    def __init__(self, config: VLT5PretrainConfig, *, device: str | torch.device = "cpu", seed: int = 0,
                 progress: bool = True):
        self.config, self.seed = config, seed
        self.device = distributed.device_for_rank(device)
        self.dataset, features_path = prepare_data(config, progress)
        self.source = load_features(features_path)
        if self.source.num_tokens != config.num_visual_tokens:
            raise ValueError(f"{features_path}: {self.source.num_tokens} tokens per image, num_visual_tokens is "
                             f"{config.num_visual_tokens} (delete the file to recompute it, or set `features`)")
        self.features = FeatureCache(self.source)
        self.samples = read_samples(Path(config.data))
        missing = [s.img_ids[0] for rows in self.samples.values() for s in rows["caption"] if s.img_ids[0] not in self.source]
        if missing:
            raise ValueError(f"{features_path}: no features for {len(missing)} images of {config.data} (e.g. {missing[0]}): "
                             "made for another data set? Delete it to recompute")
        torch.manual_seed(seed)
        self.model: nn.Module = self._build_model()
        for p in self.model.parameters():
            p.requires_grad_(True)
        tok = self.model.tokenizer
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id
        self.sentinels = tok.convert_tokens_to_ids([f"<extra_id_{k}>" for k in range(100)])
        if tok.unk_token_id in self.sentinels:
            raise ValueError(f"init: {config.init}: its tokenizer has no T5 sentinels <extra_id_0..99> (span corruption needs them)")
        self.prefix = {name: self._ids(TASK_PREFIX[name] if name != "span" else SPAN_PREFIX) for name in OBJECTIVES}
        self.images = {split: self._images(split) for split in SPLIT_NAMES}
        self.train = self.images["train"]
        self.objectives = config.objectives.used()
        for task in QA:
            if task in self.objectives and not any(im.questions[task] for im in self.train):
                raise ValueError(f"objectives.{task}: no training image of {config.data} has a {task} question")
        unknown = sum(tok.unk_token_id in ids for im in self.train for ids in im.span_texts())
        if unknown and distributed.is_main():
            print(f"vlt5-pretrain: {unknown} training texts hold words outside the tokenizer's vocabulary (<unk>)",
                  file=sys.stderr)

    def _build_model(self) -> nn.Module:
        from transformers import T5ForConditionalGeneration

        from .vl_tokenizer import build_word_tokenizer
        from .vlt5 import VLT5, tiny_t5_config

        config = self.config
        if config.init is not None:
            model = VLT5.from_pretrained(config.init, device=self.device)
            have = {"d_model": model.config.d_model, "d_ff": model.config.d_ff, "num_layers": model.config.num_layers,
                    "num_heads": model.config.num_heads, "num_visual_tokens": model.num_visual_tokens}
            for name, value in have.items():
                if getattr(config, name) != value:
                    raise ValueError(f"{name}: {getattr(config, name)}, but the init model {config.init} has {value} "
                                     f"(set recipe.{name}: {value})")
            if model.visual_dim != self.source.dim:
                raise ValueError(f"features: {self.source.dim}-wide, the init model {config.init} reads {model.visual_dim}")
            return model
        tokenizer = build_word_tokenizer(vocabulary_texts(self.samples), extra_ids=100)
        t5 = T5ForConditionalGeneration(tiny_t5_config(
            len(tokenizer), d_model=config.d_model, d_ff=config.d_ff, num_layers=config.num_layers, num_heads=config.num_heads,
            dropout_rate=config.dropout, relative_attention_num_buckets=32, relative_attention_max_distance=128))
        return VLT5(t5, self.source.dim, config.num_visual_tokens, tokenizer=tokenizer).to(self.device)

    def _ids(self, text: str) -> list[int]:
        return self.model.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _images(self, split: str) -> list[ImageTexts]:
        tok, rows = self.model.tokenizer, self.samples[split]

        def encode(texts: list[str]) -> list[list[int]]:
            return tok(texts, add_special_tokens=False)["input_ids"] if texts else []

        questions: dict[str, dict[str, list]] = {t: {} for t in QA}
        for task in QA:
            for s, ids in zip(rows[task], encode([s.text for s in rows[task]]), strict=True):
                if s.targets:
                    questions[task].setdefault(s.img_ids[0], []).append((s, ids))
        caps = rows["caption"]
        flat = encode([c for s in caps for c in s.targets])
        out, k = [], 0
        for s in caps:
            img = s.img_ids[0]
            out.append(ImageTexts(img, flat[k:k + len(s.targets)], {t: questions[t].get(img, []) for t in QA}))
            k += len(s.targets)
        return out

    def example(self, image: ImageTexts, objective: str, rng: random.Random) -> tuple[list[int], list[int]]:
        """(encoder ids, target ids) of one objective on one image, both ending in ``</s>``."""
        if objective == "caption":
            inp, tgt = [], rng.choice(image.captions)
        elif objective == "span":
            inp, tgt = span_corrupt(rng.choice(image.span_texts()), rng, self.sentinels, self.config.noise_density,
                                    self.config.mean_span)
        else:
            sample, inp = rng.choice(image.questions[objective])
            tgt = self._ids(qa_answer(sample, rng, self.config.vqa_target if objective == "vqa" else "best"))
        return self.prefix[objective] + inp + [self.eos], tgt + [self.eos]

    def _draw(self, image: ImageTexts, rng: random.Random) -> str:
        names = [o for o in self.objectives if o not in QA or image.questions[o]]
        return rng.choices(names, weights=[getattr(self.config.objectives, o) for o in names])[0]

    def collate(self, images: Sequence[ImageTexts], rng: random.Random, objective: str | None = None) -> PretrainBatch:
        """A padded batch: each image with ``objective`` (None: one drawn per image by the weights)."""
        pairs = [self.example(im, objective or self._draw(im, rng), rng) for im in images]

        def pad(seqs: list[list[int]], value: int) -> Tensor:
            width = max(len(s) for s in seqs)
            return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long, device=self.device)

        ids = pad([p[0] for p in pairs], self.pad)
        feats = torch.stack([self.features(im.img_id) for im in images]).to(self.device)
        return PretrainBatch(ids, (ids != self.pad).long(), feats, pad([p[1] for p in pairs], -100))

    # -- the engine's protocol ------------------------------------------------------------------------------------
    def train_size(self) -> int:
        return len(self.train)

    def get_batch(self, indices: list[int]) -> PretrainBatch:
        rng = random.Random(f"vlt5-pretrain:{self.seed}:{','.join(map(str, indices))}")  # objective and text draws
        return self.collate([self.train[i] for i in indices], rng)

    def loss(self, model: nn.Module, batch: PretrainBatch) -> Tensor:
        return model(batch.input_ids, batch.attention_mask, batch.visual_feats, labels=batch.labels).loss

    def validate(self) -> dict[str, float]:
        return self.evaluate("val", self.config.max_val_images, self.config.max_val_questions)[0]

    def evaluate(self, split: str, max_images: int | None = None, max_questions: int | None = None) -> tuple[dict, list]:
        """``(metrics, caption records)`` of the model on the first ``max_images`` images (and ``max_questions``
        questions per QA objective) of ``split`` (None: all); module docstring, "Validation"."""
        config = self.config
        images = self.images[split][:max_images]
        was_training = self.model.training
        self.model.eval()
        metrics: dict[str, float] = {}
        with torch.no_grad():
            caps = self.samples[split]["caption"][:max_images]
            records, _ = predict_records(self.model, None, "caption", caps, self.features, batch_size=config.eval_batch_size,
                                         max_new_tokens=config.max_new_tokens)
            scores, _ = task_metrics("caption", records)
            metrics.update(caption_cider=float(scores["cider"]), caption_bleu4=float(scores["bleu4"]))
            for objective in self.objectives:
                metrics[f"{objective}_loss"] = self._loss(images, objective)
                if objective in QA:
                    questions = [s for s in self.samples[split][objective] if s.targets][:max_questions]
                    out, _ = predict_records(self.model, None, objective, questions, self.features,
                                             batch_size=config.eval_batch_size, max_new_tokens=config.max_new_tokens)
                    headline = "vqa_accuracy" if objective == "vqa" else "accuracy"
                    metrics[f"{objective}_accuracy"] = float(task_metrics(objective, out)[0][headline])
        self.model.train(was_training)
        return metrics, records

    def _loss(self, images: Sequence[ImageTexts], objective: str) -> float:
        """Per-token cross-entropy of ``objective`` on ``images`` (those with a question for QA) under a fixed draw."""
        images = [im for im in images if objective not in QA or im.questions[objective]]
        rng = random.Random(1234)  # the same draw at every validation: comparable numbers
        total, count = 0.0, 0
        for start in range(0, len(images), self.config.eval_batch_size):
            batch = self.collate(images[start:start + self.config.eval_batch_size], rng, objective)
            n = int((batch.labels != -100).sum())
            total, count = total + float(self.loss(self.model, batch)) * n, count + n
        return total / count if count else math.nan

    def save(self, directory: Path) -> None:
        """A VL-T5 directory (the shipped layout); ``vlt5.json`` records the recipe config and the data under
        ``pretraining``."""
        from mmadapters.training.config_io import to_mapping

        record = {"recipe": "vlt5-pretrain", "config": to_mapping(self.config),
                  "data": {"generator": "mmadapters.vision.synth_vl.generate_vl", "args": self.dataset.get("args"),
                           "images": self.dataset.get("images")}}
        self.model.save_pretrained(directory, fp16=self.config.fp16, extra={"pretraining": record})

    def parameter_counts(self) -> dict[str, int]:
        n = sum(p.numel() for p in self.model.parameters())
        return {"trainable": n, "total": n}


def build_task(config: VLT5PretrainConfig, trainer: Any) -> VLT5PretrainTask:
    """The Recipe's factory: a :class:`VLT5PretrainTask` on ``trainer.device`` seeded with ``trainer.seed``."""
    return VLT5PretrainTask(config, device=trainer.device, seed=trainer.seed, progress=bool(getattr(trainer, "progress", True)))


TRAINER_DEFAULTS: Mapping[str, Any] = {"steps": 3000, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.01, "warmup_ratio": 0.05,
                                       "schedule": "cosine", "grad_clip": 1.0, "eval_every": 500, "checkpoint_every": 500,
                                       "select_metric": VLT5PretrainTask.select_metric, "select_mode": "max"}

RECIPE = Recipe(name="vlt5-pretrain", config_class=VLT5PretrainConfig, build_task=build_task,
                trainer_defaults=dict(TRAINER_DEFAULTS),
                description="VL-T5 pretraining from scratch on generated scenes (captioning, span corruption, optional "
                            "VQA/GQA-style QA); best/ and last/ are VL-T5 directories")

__all__ = ["OBJECTIVES", "RECIPE", "TRAINER_DEFAULTS", "Objectives", "PretrainBatch", "VLT5PretrainConfig",
           "VLT5PretrainTask", "build_task", "qa_answer", "span_corrupt", "vocabulary_texts"]
