"""``mmadapters train lda``: the LDA recipe (language-dependent adapters) on the training engine.

The paper's method (:mod:`mmadapters.speech.lda`) as a :class:`~mmadapters.training.recipe.Recipe`, in its order:

1. **Foundation.** The cascaded transducer (``model``: a :func:`~mmadapters.speech.model.save_asr` directory,
   default the shipped tiny model) is frozen, batch-norm statistics included.
2. **Language-dependent adapters.** One bottleneck adapter set per language at ``points`` of both passes,
   ``adapter_dim`` wide or sized to ``fraction`` of the model (:func:`~mmadapters.speech.lda.add_language_adapters`);
   ``init_adapters`` starts them from an earlier run's (e.g. its ``merged/``).
3. **Training.** Batches mix languages; each utterance runs through its own language's adapter (per-sample
   routing), so one step trains every language in the batch on its own samples: the transducer loss of
   both passes with SpecAugment, optional additive white noise (``noise_snr_db``)
   (:class:`~mmadapters.speech.train.TransducerTask`).
4. **Noisy student** (``pseudo_label:``). Before training, a teacher (``teacher_model`` with
   ``teacher_adapters``; default the foundation with ``init_adapters``) transcribes the untranscribed
   ``split`` with its non-causal second pass; labels below ``min_confidence`` are dropped
   (:func:`~mmadapters.speech.lda.pseudo_label`) and the rest join the transcribed training data. The
   split's own text, when it has one, never reaches the teacher; it only scores the kept labels
   (``pseudo_labels.wer_kept`` in ``lda.json``). With ``init_adapters`` and ``noise_snr_db`` this is the
   paper's student step.
5. **Checkpoint merge** (``merge: per_language``). Every validation saves the adapters to
   ``checkpoints/step-NNNNNN/`` and rebuilds ``merged/``: each language's adapter from the validation where
   its own dev WER (``dev_wer_<lang>`` in ``history.jsonl``) was lowest, the earliest on ties
   (:func:`~mmadapters.speech.lda.merge_best`; ``merged/selection.json`` and ``merge.json`` say which). It
   is rebuilt from the engine's history, so it follows a resumed run.

Baseline (``method: full``): every parameter of the model trains and there are no adapters; one run per
language (``languages: [xx]``) is the paper's per-language full fine-tuning. ``best/`` and ``last/`` then
hold whole models (``mmadapters eval asr --model DIR``).

Validation reports each language's dev WER/CER and their averages; ``dev_wer`` (lower is better) selects
``best/``. Saved adapters (``best/``, ``last/``, ``merged/``) are in the core format
(:func:`mmadapters.save_adapters`: one subdirectory per language) and load with
``mmadapters eval asr --adapters DIR``; ``best/`` and ``last/`` also hold ``lda.json`` (method, languages,
width, points, the model directory, pseudo-label statistics).

Unusable training items are skipped and counted, never retried: text the tokenizer cannot encode and audio
without a positive duration are dropped before training; audio that fails to load when its batch needs it
is left out of that batch (``train_skipped`` in the validation metrics).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

import mmadapters as mma
from mmadapters.io import atomic_write_bytes
from mmadapters.speech.lda import DEFAULT_POINTS, TARGET_FRACTION, add_language_adapters, language_router, merge_best, pseudo_label
from mmadapters.speech.readers import Utterance, read_speech_dataset
from mmadapters.speech.train import SELECT_METRIC, EvalSettings, TransducerTask, first_per_language
from mmadapters.training.recipe import Recipe

INFO_NAME = "lda.json"
MERGED_NAME = "merged"
MERGE_INFO_NAME = "merge.json"
CHECKPOINTS_NAME = "checkpoints"


@dataclass
class PseudoLabelConfig:
    """The ``recipe.pseudo_label:`` section: the noisy student's teacher and its untranscribed audio."""

    split: str = field(default="unlabeled", metadata={"help": (
        "Split of data_dir with the untranscribed audio (its text, if any, only scores the kept labels).")})
    manifest: str | None = field(default=None, metadata={"help": "NeMo JSONL manifest (or dataset folder, with split) of "
                                                                  "the untranscribed audio; overrides data_dir."})
    per_language: int | None = field(default=None, metadata={"help": "Use the first N utterances of each language "
                                                                      "(default: all)."})
    teacher_model: str | None = field(default=None, metadata={"help": "Teacher model directory (save_asr), e.g. a larger "
                                                                       "model (default: recipe.model)."})
    teacher_adapters: str | None = field(default=None, metadata={"help": (
        "The teacher's language adapters (a save_adapters folder, one subfolder per language; default: "
        "recipe.init_adapters). A language without one is transcribed by the bare teacher.")})
    min_confidence: float = field(default=0.5, metadata={"help": "Drop labels whose per-token probability under the "
                                                                  "teacher is below this."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"pseudo_label.min_confidence: {self.min_confidence!r}; expected a probability in [0, 1]")
        if self.per_language is not None and self.per_language < 1:
            raise ValueError(f"pseudo_label.per_language: {self.per_language!r}; expected a positive count (or null)")


@dataclass
class LdaConfig:
    """The ``recipe:`` section of ``mmadapters train lda --config FILE.yaml``."""

    data_dir: str | None = field(default=None, metadata={"help": (
        "Dataset folder (paths relative to the working directory): generated speech (python -m mmadapters.speech.synth "
        "--out DIR), a folder of <split>.jsonl NeMo "
        "manifests, Common Voice or MLS. Training reads split train_split, validation dev_split.")})
    train_manifest: str | None = field(default=None, metadata={"help": "NeMo JSONL manifest (or dataset folder) to train on; "
                                                                       "overrides data_dir for training."})
    dev_manifest: str | None = field(default=None, metadata={"help": "NeMo JSONL manifest (or dataset folder) to validate on; "
                                                                     "overrides data_dir for validation."})
    train_split: str = field(default="train", metadata={"help": "Split read from a dataset folder for training."})
    dev_split: str = field(default="dev", metadata={"help": "Split read from a dataset folder for validation."})
    lang: str | None = field(default=None, metadata={"help": "Language code of data without one (MLS, manifests without 'lang')."})
    allow_absolute: bool = field(default=False, metadata={"help": "Let manifest audio paths point outside the manifest's folder."})
    languages: list[str] | None = field(default=None, metadata={"help": (
        "Languages that get an adapter (utterances of other languages are ignored); default: every language of the "
        "training data.")})
    dev_per_language: int | None = field(default=None, metadata={"help": "Validate on the first N dev utterances of each "
                                                                         "language (default: all)."})
    model: str | None = field(default=None, metadata={"help": "ASR model directory written by save_asr (default: the shipped tiny model)."})
    adapter_dim: int | None = field(default=None, metadata={"help": "Bottleneck width of each language's adapters (default: "
                                                                    "sized by fraction)."})
    fraction: float = field(default=TARGET_FRACTION, metadata={"help": "Adapter parameters per language as a fraction of the "
                                                                        "model's (used when adapter_dim is unset; the paper: 0.004)."})
    points: list[str] = field(default_factory=lambda: list(DEFAULT_POINTS), metadata={"help": (
        "Adapter points: block_out (end of each encoder block, both passes), predictor_out (the predictor's output), "
        "attn_out, ffn_out.")})
    noise_snr_db: float | None = field(default=None, metadata={"help": "Additive white noise at this SNR (dB) on every "
                                                                       "training waveform; null: SpecAugment only."})
    max_audio_seconds: float = field(default=30.0, metadata={"help": "Longer audio files are skipped (training and validation)."})
    eval_pass: Literal["first", "second"] = field(default="second", metadata={"help": "Encoder pass decoded at validation: "
                                                                                       "first (streaming) or second."})
    eval_decode: Literal["greedy", "beam"] = field(default="greedy", metadata={"help": "Decoding at validation."})
    beam: int = field(default=4, metadata={"help": "Beam size when eval_decode is beam."})
    eval_batch_seconds: float = field(default=120.0, metadata={"help": "Padded audio seconds per validation batch."})
    method: Literal["adapters", "full"] = field(default="adapters", metadata={"help": (
        "adapters: one adapter set per language on the frozen model (LDA); full: every parameter trains, no adapters "
        "(the full fine-tuning baseline; one run per language).")})
    init_adapters: str | None = field(default=None, metadata={"help": (
        "Start the languages' adapters from this save_adapters folder (e.g. an earlier run's merged/; the noisy "
        "student continues LDA).")})
    merge: Literal["none", "per_language"] = field(default="none", metadata={"help": (
        "per_language: keep every validation's adapters under checkpoints/ and write merged/, each language's adapter "
        "from the validation with its lowest dev WER (the paper's checkpoint merge).")})
    pseudo_label: PseudoLabelConfig | None = field(default=None, metadata={"help": (
        "Noisy student: a teacher transcribes untranscribed audio and its confident labels join the training data.")})

    def __post_init__(self) -> None:
        if self.train_manifest is None and self.data_dir is None:
            raise ValueError("train_manifest: missing; expected a training manifest, or data_dir (a dataset folder)")
        if self.dev_manifest is None and self.data_dir is None and Path(self.train_manifest).is_file():
            raise ValueError("dev_manifest: missing; expected a validation manifest (or data_dir, a dataset "
                             "folder with a dev split)")
        if self.languages is not None and (not self.languages or len(set(self.languages)) != len(self.languages)):
            raise ValueError(f"languages: {self.languages!r}; expected distinct language codes (or null: every "
                             "language of the training data)")
        if self.adapter_dim is not None and self.adapter_dim < 1:
            raise ValueError(f"adapter_dim: {self.adapter_dim!r}; expected a positive width (or null)")
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction: {self.fraction!r}; expected a fraction in (0, 1)")
        if not self.points:
            raise ValueError("points: empty; expected adapter points such as [block_out]")
        if self.dev_per_language is not None and self.dev_per_language < 1:
            raise ValueError(f"dev_per_language: {self.dev_per_language!r}; expected a positive count (or null)")
        for name in ("max_audio_seconds", "eval_batch_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: {getattr(self, name)!r}; expected positive seconds")
        if self.beam < 1:
            raise ValueError(f"beam: {self.beam!r}; expected >= 1")
        if self.noise_snr_db is not None and not math.isfinite(self.noise_snr_db):
            raise ValueError(f"noise_snr_db: {self.noise_snr_db!r}; expected a finite SNR in dB (or null)")
        if self.method == "full" and (self.merge != "none" or self.init_adapters is not None):
            raise ValueError("method: full trains the whole model without adapters; merge must be none and "
                             "init_adapters null")
        if self.pseudo_label is not None and self.pseudo_label.manifest is None and self.data_dir is None:
            raise ValueError("pseudo_label.manifest: missing; expected a manifest of untranscribed audio (or data_dir, a "
                             "dataset folder with that split)")

    def source(self, which: Literal["train", "dev"]) -> tuple[str, str]:
        """(dataset path, split) that ``which`` reads."""
        explicit = self.train_manifest if which == "train" else self.dev_manifest
        split = self.train_split if which == "train" else self.dev_split
        if explicit is not None:
            return explicit, split
        if self.data_dir is None:  # dev from the training folder
            return str(self.train_manifest), split
        return self.data_dir, split


def read_split(config: LdaConfig, which: Literal["train", "dev"]) -> list[Utterance]:
    """The utterances of the training or the validation data."""
    path, split = config.source(which)
    return read_speech_dataset(path, split=split, lang=config.lang, allow_absolute=config.allow_absolute)


class LdaTask(TransducerTask):
    """The LDA recipe as the engine's TrainTask: the frozen transducer with one adapter set per language routed per
    sample (or, with ``method: full``, the whole model), on the transcribed and the pseudo-labelled data."""

    def __init__(self, config: LdaConfig, *, device: str | torch.device = "cpu", progress: bool = False):
        from mmadapters.speech.model import load_asr

        self.config = config
        self.device = torch.device(device)
        self.progress = progress
        train = read_split(config, "train")
        train_path, dev_path = config.source("train")[0], config.source("dev")[0]
        present = sorted({u.lang for u in train})
        languages = list(config.languages) if config.languages is not None else present
        missing = [lang for lang in languages if lang not in present]
        if missing:
            raise ValueError(f"recipe.languages: no training utterance in {missing} in {train_path} (it has {present})")
        keep = set(languages)
        dev = first_per_language([u for u in read_split(config, "dev") if u.lang in keep], config.dev_per_language)
        no_dev = sorted(keep - {u.lang for u in dev})
        if no_dev:
            raise ValueError(f"recipe.dev_manifest: no validation utterance in {no_dev} in {dev_path}; every language needs dev "
                             "data (its WER selects checkpoints)")

        self.bundle = load_asr(config.model, device=self.device)
        model = self.bundle.model
        self.adapters = None
        if config.method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            self.adapters = add_language_adapters(model, languages, dim=config.adapter_dim, fraction=config.fraction,
                                                  points=config.points, freeze=True)
            if config.init_adapters is not None:
                self._load_init_adapters(model, languages)
        self.pseudo_stats: dict[str, Any] | None = None
        pseudo = self._pseudo_labels(languages) if config.pseudo_label is not None else []
        settings = EvalSettings(pass_=config.eval_pass, decode=config.eval_decode, beam=config.beam,
                                batch_seconds=config.eval_batch_seconds, max_audio_seconds=config.max_audio_seconds)
        super().__init__(model, self.bundle.tokenizer, [u for u in train if u.lang in keep] + pseudo, dev,
                         route=None if self.adapters is None else language_router(languages), languages=languages,
                         device=self.device, noise_snr_db=config.noise_snr_db, eval_settings=settings, progress=progress,
                         where=f"{train_path} (languages {languages})")

    def _load_init_adapters(self, model: torch.nn.Module, languages: list[str]) -> None:
        """Replace the fresh adapters by those of ``init_adapters`` (same width), base still frozen."""
        where = self.config.init_adapters
        mma.load_adapters(model, where, languages, replace=True)
        for lang in languages:
            dim = mma.get_config(model, lang).bottleneck_dim
            if dim != self.adapters.dim:
                raise ValueError(f"recipe.init_adapters: {where}/{lang} is {dim} wide, the recipe's adapters "
                                 f"{self.adapters.dim} (set recipe.adapter_dim: {dim})")
        mma.set_active(model, None)
        mma.freeze_base(model, adapters=languages)

    def _pseudo_labels(self, languages: list[str]) -> list[Utterance]:
        """The teacher's confident transcripts of the untranscribed utterances, as training utterances."""
        from mmadapters.eval.metrics import normalize_text, wer
        from mmadapters.speech.model import load_asr

        started = time.perf_counter()
        c, pl = self.config, self.config.pseudo_label
        path = pl.manifest if pl.manifest is not None else c.data_dir
        utts = read_speech_dataset(path, split=pl.split, lang=c.lang, allow_absolute=c.allow_absolute)
        utts = first_per_language([u for u in utts if u.lang in set(languages)], pl.per_language)
        if not utts:
            raise ValueError(f"recipe.pseudo_label: no utterance in {languages} in {path} (split {pl.split!r})")
        teacher = load_asr(pl.teacher_model if pl.teacher_model is not None else c.model, device=self.device)
        adapters = pl.teacher_adapters if pl.teacher_adapters is not None else c.init_adapters
        route = language_router(mma.load_adapters(teacher.model, adapters)) if adapters is not None else None
        labels = pseudo_label(teacher, [replace(u, text="") for u in utts], adapter_for=route,
                              min_confidence=pl.min_confidence, device=self.device, max_audio_seconds=c.max_audio_seconds,
                              progress=self.progress)
        truth = {u.id: u.text for u in utts}
        scored = [u for u in labels.kept if truth[u.id].strip()]
        wer_kept = (wer([normalize_text(truth[u.id]) for u in scored], [normalize_text(u.text) for u in scored])
                    if scored else None)
        self.pseudo_stats = {**labels.as_dict(), "total": len(utts), "min_confidence": pl.min_confidence,
                             "teacher_model": str(teacher.path) if teacher.path is not None else None,
                             "teacher_adapters": adapters, "wer_kept": wer_kept, "seconds": time.perf_counter() - started}
        return labels.kept

    def save(self, directory: Path) -> None:
        """The languages' adapters in the core format (``directory/<lang>/``; ``method: full``: the whole model) and
        ``lda.json``."""
        directory = Path(directory)
        if self.adapters is None:
            super().save(directory)
        else:
            mma.save_adapters(self.model, directory, names=self.languages)
        info = {"recipe": "lda", "method": self.config.method, "languages": self.languages,
                "adapters": None if self.adapters is None else self.adapters.as_dict(),
                "model": None if self.bundle.path is None else str(Path(self.bundle.path).resolve()),
                "init_adapters": self.config.init_adapters, "pseudo_labels": self.pseudo_stats,
                "eval_pass": self.config.eval_pass, "eval_decode": self.config.eval_decode}
        atomic_write_bytes(directory / INFO_NAME, (json.dumps(info, indent=1) + "\n").encode())

    def on_validated(self, step: int, metrics: dict[str, float], output_dir: Path) -> None:
        """``merge: per_language``: keep this validation's adapters and rebuild ``merged/`` from every validation of
        the run's history (each language's adapter from its lowest dev WER)."""
        if self.config.merge != "per_language":
            return
        from mmadapters.training.trainer import HISTORY_NAME

        output_dir = Path(output_dir)
        checkpoints = output_dir / CHECKPOINTS_NAME
        mma.save_adapters(self.model, checkpoints / f"step-{step:06d}", names=self.languages)
        lines = (output_dir / HISTORY_NAME).read_text(encoding="utf-8").splitlines()
        evals = [e for e in map(json.loads, filter(str.strip, lines)) if e.get("kind") == "eval"]
        dirs = [checkpoints / f"step-{e['step']:06d}" for e in evals]
        wers = [{lang: e["metrics"].get(f"dev_wer_{lang}", math.nan) for lang in self.languages} for e in evals]
        merged = merge_best(dirs, wers, output_dir=output_dir / MERGED_NAME, languages=self.languages, overwrite=True)
        record = {lang: {"step": int(path.name.split("-")[1]), "dev_wer": merged.dev_wer[lang]}
                  for lang, path in merged.chosen.items()}
        atomic_write_bytes(output_dir / MERGE_INFO_NAME, (json.dumps(record, indent=1) + "\n").encode())

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        if self.adapters is None:
            return {**counts, "base": counts["total"], "per_language": counts["total"], "languages": len(self.languages)}
        return {**counts, "base": self.adapters.base_parameters, "per_language": self.adapters.per_language_parameters,
                "languages": len(self.languages)}


def build_task(config: LdaConfig, trainer: Any) -> LdaTask:
    """The engine's ``build_task``: an :class:`LdaTask` on ``trainer.device`` (this rank's GPU under torchrun)."""
    from mmadapters import distributed

    return LdaTask(config, device=distributed.device_for_rank(trainer.device), progress=bool(trainer.progress) and distributed.is_main())


RECIPE = Recipe(
    name="lda",
    config_class=LdaConfig,
    build_task=build_task,
    trainer_defaults={"steps": 200, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.0, "warmup_ratio": 0.05,
                      "schedule": "cosine", "grad_clip": 5.0, "eval_every": 50, "checkpoint_every": 50,
                      "select_metric": SELECT_METRIC, "select_mode": "min",
                      # per-sample routing: a language absent from a rank's share of a step leaves its adapter without
                      # a gradient, which DDP must be told about
                      "find_unused_parameters": True},
    description="Language-dependent adapters for a streaming multilingual transducer (LDA): one adapter set per "
                "language, routed per sample; noisy student, per-language checkpoint merge, full fine-tuning baseline; "
                "validation: dev WER per language and their average.",
)

__all__ = ["INFO_NAME", "MERGED_NAME", "RECIPE", "LdaConfig", "LdaTask", "PseudoLabelConfig", "build_task", "read_split"]
