"""``mmadapters train lda``: the LDA recipe (language-dependent adapters) on the training engine.

The paper's training step (:mod:`mmadapters.speech.lda`, steps 1-3 and 5) as a
:class:`~mmadapters.training.recipe.Recipe`:

1. **Foundation.** The cascaded transducer (``model``: a :func:`~mmadapters.speech.model.save_asr` directory,
   default the shipped tiny model) is frozen, batch-norm statistics included.
2. **Language-dependent adapters.** One bottleneck adapter set per language at ``points`` of both passes,
   ``adapter_dim`` wide or sized to ``fraction`` of the model (:func:`~mmadapters.speech.lda.add_language_adapters`).
3. **Training.** Batches mix languages; each utterance runs through its own language's adapter (per-sample
   routing, :func:`mmadapters.route`), so one step trains every language in the batch on its own samples.
   The loss is the transducer loss of both passes (:meth:`CascadedTransducer.forward
   <mmadapters.speech.model.CascadedTransducer.forward>`), SpecAugment on; optional additive white noise
   (``noise_snr_db``, the noisy-student recipe's augmentation).
5. **Checkpoint selection.** Every validation decodes the dev set and reports each language's WER
   (``dev_wer_<lang>``) and their average (``dev_wer``, the engine's default selection metric, lower is
   better). The engine keeps ``best/`` at the best average; the per-language WERs stay in ``history.jsonl``
   so the paper's per-language selection (:func:`~mmadapters.speech.lda.merge_best`) can be made from it.

Saved adapters (``best/``, ``last/``) are in the core format (:func:`mmadapters.save_adapters`: one
subdirectory per language) plus ``lda.json`` (languages, width, points, the model directory), and load with
``mmadapters asr eval --adapters DIR`` or ``mmadapters eval asr --adapters DIR``.

Unusable training items are skipped and counted, never retried: text the tokenizer cannot encode and audio
without a positive duration are dropped before training; audio that fails to load when its batch needs it
is left out of that batch (``train_skipped`` in the validation metrics).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

import mmadapters as mma
from mmadapters.io import atomic_write_bytes
from mmadapters.speech.lda import DEFAULT_POINTS, TARGET_FRACTION, add_language_adapters, language_router
from mmadapters.speech.readers import Utterance, read_speech_dataset
from mmadapters.speech.train import (
    AudioSource,
    EvalResult,
    _encodable,
    add_noise,
    encode_targets,
    evaluate,
    pad_waves,
)
from mmadapters.training.recipe import Recipe

SELECT_METRIC = "dev_wer"
INFO_NAME = "lda.json"


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
        "Adapter points of both encoder passes: block_out (end of each block), attn_out, ffn_out.")})
    noise_snr_db: float | None = field(default=None, metadata={"help": "Additive white noise at this SNR (dB) on every "
                                                                       "training waveform; null: SpecAugment only."})
    max_audio_seconds: float = field(default=30.0, metadata={"help": "Longer audio files are skipped (training and validation)."})
    eval_pass: Literal["first", "second"] = field(default="second", metadata={"help": "Encoder pass decoded at validation: "
                                                                                       "first (streaming) or second."})
    eval_decode: Literal["greedy", "beam"] = field(default="greedy", metadata={"help": "Decoding at validation."})
    beam: int = field(default=4, metadata={"help": "Beam size when eval_decode is beam."})
    eval_batch_seconds: float = field(default=120.0, metadata={"help": "Padded audio seconds per validation batch."})

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


@dataclass
class LdaBatch:
    """A collated training batch: ``waves`` (B, S) zero-padded, ``lengths`` (B,), ``targets`` (B, U) padded with the
    blank, ``target_lengths`` (B,), ``languages`` (B,) the adapter each sample runs through; ``bad``: items of the
    requested indices whose audio failed to load (left out)."""

    waves: Tensor
    lengths: Tensor
    targets: Tensor
    target_lengths: Tensor
    languages: list[str]
    bad: int = 0

    def __len__(self) -> int:
        return len(self.languages)


class LdaTask:
    """The LDA recipe as the engine's TrainTask: the frozen transducer with one adapter set per language."""

    select_metric = SELECT_METRIC
    select_mode = "min"

    def __init__(self, config: LdaConfig, *, device: str | torch.device = "cpu", seed: int = 0, progress: bool = False):
        from mmadapters.speech.model import load_asr

        self.config = config
        self.device = torch.device(device)
        self.progress = progress
        train = read_split(config, "train")
        dev = read_split(config, "dev")
        train_path, dev_path = config.source("train")[0], config.source("dev")[0]
        present = sorted({u.lang for u in train})
        self.languages = list(config.languages) if config.languages is not None else present
        missing = [lang for lang in self.languages if lang not in present]
        if missing:
            raise ValueError(f"recipe.languages: no training utterance in {missing} in {train_path} (it has {present})")
        keep = set(self.languages)
        dev = [u for u in dev if u.lang in keep]
        if config.dev_per_language is not None:
            counts: Counter[str] = Counter()
            chosen = []
            for u in dev:
                if counts[u.lang] < config.dev_per_language:
                    counts[u.lang] += 1
                    chosen.append(u)
            dev = chosen
        no_dev = sorted(keep - {u.lang for u in dev})
        if no_dev:
            raise ValueError(f"recipe.dev_manifest: no validation utterance in {no_dev} in {dev_path}; every language needs dev "
                             "data (its WER selects checkpoints)")
        self.dev = dev

        self.bundle = load_asr(config.model, device=self.device)
        self.tokenizer = self.bundle.tokenizer
        self.model: nn.Module = self.bundle.model
        self.adapters = add_language_adapters(self.model, self.languages, dim=config.adapter_dim, fraction=config.fraction,
                                              points=config.points, freeze=True)
        self._route = language_router(self.languages)

        # training items: usable text and audio with a known positive duration; the rest is skipped and counted
        candidates = [u for u in train if u.lang in keep]
        source = AudioSource(candidates, config.max_audio_seconds)
        usable: list[int] = []
        for i, u in enumerate(candidates):
            if not _encodable(self.tokenizer, u.text):
                source.bad[i] = "text: empty or not encodable by the tokenizer"
            elif source.duration(i) > 0:
                usable.append(i)
        if not usable:
            raise ValueError(f"{train_path}: none of the {len(candidates)} training utterances in {self.languages} is usable "
                             f"(skipped: {source.skipped() or 'no audio'})")
        self._source = source
        self._usable = usable
        self.train_utterances = [candidates[i] for i in usable]
        self.seed = seed
        self.last_eval: EvalResult | None = None

    # -- the engine's TrainTask ----------------------------------------------------------------------------------
    def train_size(self) -> int:
        return len(self._usable)

    def skipped(self) -> dict[str, int]:
        """Training utterances never trained on, by reason (text or audio problems)."""
        return self._source.skipped()

    def get_batch(self, indices: list[int]) -> LdaBatch:
        """Load and collate training items ``indices`` (positions in :attr:`train_utterances`) on the task's device.
        Audio that fails to load is left out (and never loaded again); noise is drawn from torch's global RNG, which
        the engine's checkpoints restore."""
        loaded = [(k, w) for k in indices if (w := self._source.load(self._usable[k])) is not None]
        utts = [self.train_utterances[k] for k, _ in loaded]
        bad = len(indices) - len(loaded)
        if not loaded:
            empty = torch.zeros(0, 0, device=self.device)
            zeros = torch.zeros(0, dtype=torch.long, device=self.device)
            return LdaBatch(empty, zeros, torch.zeros(0, 1, dtype=torch.long, device=self.device), zeros, [], bad)
        waves, lengths = pad_waves([w for _, w in loaded])
        if self.config.noise_snr_db is not None:
            waves = add_noise(waves, lengths, self.config.noise_snr_db, None)
        targets, target_lengths = encode_targets(self.tokenizer, [u.text for u in utts])
        return LdaBatch(waves.to(self.device), lengths.to(self.device), targets.to(self.device), target_lengths.to(self.device),
                        [u.lang for u in utts], bad)

    def loss(self, model: nn.Module, batch: LdaBatch) -> Tensor:
        """Transducer loss of both passes (``w1 * rnnt(first) + w2 * rnnt(second)``, each the batch mean), every
        sample routed through its language's adapter. A batch whose audio all failed gives a zero loss that still
        reaches the adapters (so distributed gradient reduction sees every parameter)."""
        if not len(batch):
            return sum((p.sum() for p in model.parameters() if p.requires_grad), torch.zeros((), device=self.device)) * 0.0
        if not model.training:
            model.train()
        with mma.route(model, batch.languages):
            out = model(batch.waves, batch.lengths, batch.targets, batch.target_lengths)
        return out["loss"]

    def validate(self) -> dict[str, float]:
        """Dev WER/CER per language (``dev_wer_<lang>``, ``dev_cer_<lang>``) and their averages (``dev_wer``,
        ``dev_cer``: each language counts once), each utterance decoded through its language's adapter."""
        c = self.config
        result = evaluate(self.model, self.tokenizer, self.dev, adapter_for=self._route, pass_=c.eval_pass, decode=c.eval_decode,
                          beam=c.beam, batch_seconds=c.eval_batch_seconds, device=self.device,
                          max_audio_seconds=c.max_audio_seconds, progress=self.progress, desc="validation")
        self.last_eval = result
        return validation_metrics(result, self.languages, train_skipped=sum(self.skipped().values()))

    def save(self, directory: Path) -> None:
        """The languages' adapters in the core format (``directory/<lang>/``) and ``lda.json``."""
        directory = Path(directory)
        mma.save_adapters(self.model, directory, names=self.languages)
        info = {"recipe": "lda", "languages": self.languages, "adapters": self.adapters.as_dict(),
                "model": None if self.bundle.path is None else str(Path(self.bundle.path).resolve()),
                "eval_pass": self.config.eval_pass, "eval_decode": self.config.eval_decode}
        atomic_write_bytes(directory / INFO_NAME, (json.dumps(info, indent=1) + "\n").encode())

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return {"trainable": trainable, "total": total, "base": self.adapters.base_parameters,
                "per_language": self.adapters.per_language_parameters, "languages": len(self.languages)}


def validation_metrics(result: EvalResult, languages: list[str], *, train_skipped: int = 0) -> dict[str, float]:
    """The flat metrics of a validation: ``dev_wer`` (the mean of the languages' WERs) first, then ``dev_cer``,
    per-language ``dev_wer_<lang>`` / ``dev_cer_<lang>`` and counts."""
    per = result.per_language
    cers = [per[lang]["cer"] for lang in languages if lang in per and not math.isnan(per[lang]["cer"])]
    metrics = {SELECT_METRIC: result.average_wer, "dev_cer": sum(cers) / len(cers) if cers else math.nan}
    for lang in languages:
        entry = per.get(lang, {"wer": math.nan, "cer": math.nan})
        metrics[f"dev_wer_{lang}"] = float(entry["wer"])
        metrics[f"dev_cer_{lang}"] = float(entry["cer"])
    metrics["dev_utterances"] = float(sum(int(per[lang]["utterances"]) for lang in per))
    metrics["dev_skipped"] = float(sum(result.skipped.values()))
    metrics["train_skipped"] = float(train_skipped)
    return metrics


def build_task(config: LdaConfig, trainer: Any) -> LdaTask:
    """The engine's ``build_task``: an :class:`LdaTask` on ``trainer.device`` (this rank's GPU under torchrun)."""
    from mmadapters import distributed

    return LdaTask(config, device=distributed.device_for_rank(trainer.device), seed=trainer.seed,
                   progress=bool(trainer.progress) and distributed.is_main())


RECIPE = Recipe(
    name="lda",
    config_class=LdaConfig,
    build_task=build_task,
    trainer_defaults={"steps": 200, "batch_size": 8, "lr": 3e-3, "weight_decay": 0.0, "warmup_ratio": 0.05,
                      "schedule": "cosine", "grad_clip": 5.0, "eval_every": 50, "checkpoint_every": 50,
                      "select_metric": SELECT_METRIC, "select_mode": "min",
                      # per-sample routing: a language absent from a rank's share of a step leaves its adapter without
                      # a gradient, which DDP must be told about
                      "find_unused_parameters": True},
    description="Language-dependent adapters for a streaming multilingual transducer (LDA): one adapter set per "
                "language, routed per sample; validation: dev WER per language and their average.",
)

__all__ = ["INFO_NAME", "RECIPE", "SELECT_METRIC", "LdaBatch", "LdaConfig", "LdaTask", "build_task", "read_split",
           "validation_metrics"]
