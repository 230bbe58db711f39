"""Language-dependent adapters (LDA) for tail languages of a streaming multilingual transducer.

Reference implementation of "Efficient Adapter Finetuning for Tail Languages in Streaming Multilingual
ASR" (the paper has no public code). The method, in the paper's order:

1. **Foundation.** A multilingual cascaded transducer (a causal, streaming first-pass encoder feeding a
   non-causal second pass; one predictor + joiner decodes either pass) trained on head languages is
   frozen, batch-norm statistics included, so switching adapters off restores it exactly.
2. **Language-dependent adapters.** Each tail language gets its own adapter set: a bottleneck adapter
   (LayerNorm -> Linear d->h -> swish -> Linear h->d, output zero-initialized, residual) at the end of
   every encoder block of both passes (``@block_out``; optionally after self-attention, ``@attn_out``).
   The width ``h`` is chosen so one language costs about 0.4% of the foundation's parameters
   (:func:`add_language_adapters`; the exact share is reported).
3. **Training.** Batches mix languages; each utterance's language ID picks its adapter through per-sample
   routing (:func:`mmadapters.route`), so one step trains every language in the batch, each adapter on its
   own samples only (:func:`train_lda`).
4. **Noisy student.** A teacher (the non-causal second pass of the frozen model with the languages'
   adapters, or a larger model) transcribes untranscribed tail audio; hypotheses below a confidence
   threshold are dropped (:func:`pseudo_label`). The student's adapters then train on the pseudo-labels
   plus the transcribed data with noise: SpecAugment, and optionally additive noise (:func:`noisy_student`).
5. **Checkpoint merge.** Languages peak at different steps. Every dev evaluation saves each language's
   adapter and its dev WER; the deployable model takes each language's adapter from the checkpoint where
   that language's dev WER was lowest: selection, not averaging (:func:`merge_best`).

Baseline: full fine-tuning of a copy of the whole model per language (:func:`full_finetune`).

``mmadapters train lda --config configs/lda.yaml`` runs steps 1-3 on the shared training engine (typed YAML,
DDP, resumable checkpoints, best/ by average dev WER with every language's dev WER in the history):
:mod:`mmadapters.speech.lda_train`.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import mmadapters as mma
from mmadapters.io import atomic_write_bytes
from mmadapters.speech.readers import Utterance
from mmadapters.speech.train import (
    AudioSource,
    Callback,
    EvalResult,
    TrainConfig,
    TrainResult,
    TrainState,
    _disable,
    _route,
    decode_batch,
    length_buckets,
    pad_waves,
    train,
)

DEFAULT_POINTS = ("block_out",)
TARGET_FRACTION = 0.004  # the paper: about 0.4% of the model per language
DEV_WER_NAME = "dev_wer.json"


# -- 2. language-dependent adapters -------------------------------------------------------------------------------

def adapter_config(dim: int, points: Sequence[str] = DEFAULT_POINTS) -> mma.BottleneckConfig:
    """One language's adapter: NeMo-style linear adapter (LayerNorm, d->dim, swish, dim->d, zero-init up)."""
    return mma.BottleneckConfig(bottleneck_dim=dim, target_modules=[f"@{p}" for p in points], activation="swish",
                                pre_norm=True)


@dataclass
class LanguageAdapters:
    """What :func:`add_language_adapters` put on the model."""

    languages: list[str]
    dim: int
    points: list[str]
    per_language_parameters: int  # parameters of one language's adapter set
    base_parameters: int  # parameters of the foundation model (no adapters)

    @property
    def fraction(self) -> float:
        """One language's adapters as a fraction of the foundation's parameters."""
        return self.per_language_parameters / self.base_parameters

    def as_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction, "percent": 100.0 * self.fraction}


def _adapter_size(model: nn.Module, dim: int, points: Sequence[str]) -> int:
    name = "lda-size-probe"
    mma.add_adapter(model, name, adapter_config(dim, points))
    try:
        return mma.parameter_report(model).per_adapter[name]
    finally:
        mma.delete_adapter(model, name)


def width_for_fraction(model: nn.Module, fraction: float = TARGET_FRACTION, points: Sequence[str] = DEFAULT_POINTS) -> int:
    """Bottleneck width whose adapter set is closest to ``fraction`` of the model's base parameters (≥ 1).

    An adapter's size is affine in its width, so two probe adapters (width 1 and 2) measure it exactly."""
    base = mma.parameter_report(model).base
    one, two = _adapter_size(model, 1, points), _adapter_size(model, 2, points)
    slope, intercept = two - one, one - (two - one)
    return max(1, round((fraction * base - intercept) / slope))


def add_language_adapters(model: nn.Module, languages: Sequence[str], *, dim: int | None = None,
                          fraction: float = TARGET_FRACTION, points: Sequence[str] = DEFAULT_POINTS,
                          freeze: bool = True) -> LanguageAdapters:
    """Add one bottleneck adapter set per language (named by its language code) at ``points`` of ``model``.

    ``dim``: bottleneck width; None sizes it so one language is about ``fraction`` of the base model.
    ``freeze``: freeze the foundation (weights and batch-norm statistics) so that only the languages'
    adapters train (:func:`mmadapters.freeze_base` with ``adapters=languages``)."""
    languages = list(languages)
    if not languages or len(set(languages)) != len(languages):
        raise ValueError(f"add_language_adapters: argument 'languages' must be distinct language codes, got {languages}")
    existing = [lang for lang in languages if lang in mma.adapter_names(model)]
    if existing:
        raise ValueError(f"add_language_adapters: the model already has adapters {existing}")
    if dim is None:
        dim = width_for_fraction(model, fraction, points)
    base = mma.parameter_report(model).base
    for lang in languages:
        mma.add_adapter(model, lang, adapter_config(dim, points))
    mma.set_active(model, None)  # languages are chosen per sample (route) or explicitly (set_active)
    if freeze:
        mma.freeze_base(model, adapters=languages)
    per = mma.parameter_report(model).per_adapter[languages[0]]
    return LanguageAdapters(languages, dim, list(points), per, base)


def language_router(languages: Sequence[str]):
    """``utterance -> adapter name``: its language's adapter, or None (the base) for other languages."""
    known = frozenset(languages)

    def adapter_for(u: Utterance) -> str | None:
        return u.lang if u.lang in known else None

    return adapter_for


# -- 3. training with per-sample language routing; 5. per-evaluation adapter checkpoints --------------------------

class AdapterCheckpoints(Callback):
    """At every dev evaluation, save the languages' adapters to ``directory/step-NNNNNN/<lang>/`` and record the
    dev WER of each language in ``directory/dev_wer.json`` (rewritten atomically each time)."""

    def __init__(self, directory: str | Path, languages: Sequence[str]):
        self.directory = Path(directory)
        self.languages = list(languages)
        self.checkpoints: list[Path] = []
        self.dev_wers: list[dict[str, float]] = []

    def on_eval(self, state: TrainState, result: EvalResult) -> None:
        path = mma.save_adapters(state.model, self.directory / f"step-{state.step:06d}", names=self.languages)
        wers = result.wers()
        self.checkpoints.append(path)
        self.dev_wers.append({lang: wers.get(lang, math.nan) for lang in self.languages})
        record = [{"step": int(p.name.split("-")[1]), "checkpoint": p.name, "dev_wer": w}
                  for p, w in zip(self.checkpoints, self.dev_wers, strict=True)]
        atomic_write_bytes(self.directory / DEV_WER_NAME, (json.dumps(record, indent=2) + "\n").encode())


@dataclass
class LdaRun:
    result: TrainResult
    checkpoints: list[Path] = field(default_factory=list)
    dev_wers: list[dict[str, float]] = field(default_factory=list)  # one per checkpoint


def train_lda(model: nn.Module, tokenizer, train_utterances: Sequence[Utterance], dev: Sequence[Utterance], *,
              languages: Sequence[str], config: TrainConfig | None = None, checkpoint_dir: str | Path | None = None,
              callbacks: Sequence[Callback] = ()) -> LdaRun:
    """Train the languages' adapters together on mixed-language batches, each sample routed to its language's
    adapter (the base is frozen by :func:`add_language_adapters`). Utterances of other languages are ignored.

    With ``checkpoint_dir``, every dev evaluation (``config.eval_every`` and the end) saves the adapters and
    the per-language dev WER there, for :func:`merge_best`."""
    languages = list(languages)
    missing = [lang for lang in languages if lang not in mma.adapter_names(model)]
    if missing:
        raise ValueError(f"train_lda: no adapter for languages {missing}; call add_language_adapters first")
    keep = set(languages)
    train_utts = [u for u in train_utterances if u.lang in keep]
    dev_utts = [u for u in dev if u.lang in keep]
    if not train_utts:
        raise ValueError(f"train_lda: no training utterance in languages {languages}")
    saver = AdapterCheckpoints(checkpoint_dir, languages) if checkpoint_dir is not None else None
    result = train(model, tokenizer, train_utts, config=config, dev=dev_utts, adapter_for=language_router(languages),
                   callbacks=[*callbacks, *([saver] if saver else [])])
    if saver is None:
        return LdaRun(result)
    return LdaRun(result, saver.checkpoints, saver.dev_wers)


# -- 4. noisy student ---------------------------------------------------------------------------------------------

@dataclass
class PseudoLabels:
    kept: list[Utterance]  # the input utterances with the teacher's transcript as text
    confidence: dict[str, float]  # utterance id -> teacher confidence (every decoded utterance)
    dropped: dict[str, int]  # reason -> count

    def as_dict(self) -> dict:
        return {"kept": len(self.kept), "dropped": self.dropped,
                "mean_confidence_kept": (sum(self.confidence[u.id] for u in self.kept) / len(self.kept)) if self.kept else math.nan}


@torch.no_grad()
def sequence_confidence(model: nn.Module, enc: torch.Tensor, enc_lengths: torch.Tensor,
                        hypotheses: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per-token geometric-mean probability of each hypothesis under the transducer, all alignments summed:
    ``exp(log P(y | x) / (U + 1))`` (U tokens plus the final blank). enc (B, T, E) -> (B,) in (0, 1];
    NaN for empty hypotheses."""
    from mmadapters.speech.decode import log_likelihood

    out = torch.full((len(hypotheses),), math.nan, device=enc.device)
    keep = [i for i, h in enumerate(hypotheses) if len(h)]  # rnnt_loss needs U >= 1 somewhere in the batch
    if keep:
        idx = torch.tensor(keep, device=enc.device)
        u = torch.tensor([len(hypotheses[i]) for i in keep], dtype=torch.float32, device=enc.device)
        ll = log_likelihood(model, enc[idx], enc_lengths[idx], [hypotheses[i] for i in keep]).float()
        out[idx] = torch.exp(ll / (u + 1))
    return out


def pseudo_label(teacher, utterances: Sequence[Utterance], *, adapter_for=None, pass_: str = "second", decode: str = "greedy",
                 min_confidence: float = 0.0, batch_seconds: float = 120.0, device: str | torch.device = "cpu",
                 max_audio_seconds: float = 30.0, progress: bool | None = None) -> PseudoLabels:
    """Transcribe untranscribed ``utterances`` with ``teacher`` (an :class:`AsrBundle`: model + tokenizer) and keep
    the confident ones as pseudo-labelled utterances.

    The teacher decodes ``pass_`` (default the non-causal second pass) greedily or by beam search, each sample
    through ``adapter_for(utterance)`` (e.g. its language's adapter). Dropped: unreadable audio, empty
    hypotheses, and confidence (:func:`sequence_confidence`) below ``min_confidence``."""
    model, tokenizer = teacher.model, teacher.tokenizer
    source = AudioSource(utterances, max_audio_seconds)
    durations = [source.duration(i) for i in range(len(utterances))]
    batches = sorted(length_buckets(durations, batch_seconds, random.Random(0), max_batch_size=256), key=lambda b: b[0])
    was_training = model.training
    model.eval()
    kept: dict[int, Utterance] = {}
    confidence: dict[str, float] = {}
    dropped: dict[str, int] = {}
    try:
        for batch in tqdm(batches, desc="pseudo-labelling", unit="batch", leave=False, disable=_disable(progress)):
            items = [(i, w) for i in batch if (w := source.load(i)) is not None]
            if not items:
                continue
            waves, lengths = pad_waves([w for _, w in items])
            waves, lengths = waves.to(device), lengths.to(device)
            names = [adapter_for(utterances[i]) for i, _ in items] if adapter_for is not None else None
            hyps, enc, enc_lengths = decode_batch(model, waves, lengths, pass_=pass_, decode=decode, adapters=names)
            with _route(model, names):  # the predictor/joiner may carry adapters too
                conf = sequence_confidence(model, enc, enc_lengths, hyps)
            for (i, _), ids, c in zip(items, hyps, conf.tolist(), strict=True):
                u = utterances[i]
                text = tokenizer.decode(list(ids)).strip()
                confidence[u.id] = c
                if not ids or not text:
                    dropped["empty hypothesis"] = dropped.get("empty hypothesis", 0) + 1
                elif c < min_confidence:
                    dropped["low confidence"] = dropped.get("low confidence", 0) + 1
                else:
                    kept[i] = replace(u, text=text)
    finally:
        model.train(was_training)
    for reason, n in source.skipped().items():
        dropped[reason] = n
    return PseudoLabels([kept[i] for i in sorted(kept)], confidence, dropped)


def noisy_student(model: nn.Module, tokenizer, pseudo_labelled: Sequence[Utterance], labelled: Sequence[Utterance],
                  dev: Sequence[Utterance], *, languages: Sequence[str], config: TrainConfig | None = None,
                  noise_snr_db: float | None = 20.0, checkpoint_dir: str | Path | None = None) -> LdaRun:
    """The student step: train the languages' adapters on pseudo-labels + transcribed data with noise.

    SpecAugment is on in training (``model.train()``); ``noise_snr_db`` adds white noise at that SNR on the
    waveforms as well (None: SpecAugment only). Otherwise exactly :func:`train_lda`."""
    config = replace(config or TrainConfig(), noise_snr_db=noise_snr_db)
    return train_lda(model, tokenizer, [*labelled, *pseudo_labelled], dev, languages=languages, config=config,
                     checkpoint_dir=checkpoint_dir)


# -- 5. checkpoint merge --------------------------------------------------------------------------------------------

@dataclass
class MergeResult:
    chosen: dict[str, Path]  # language -> checkpoint its adapter comes from
    dev_wer: dict[str, float]  # language -> its best dev WER
    model: nn.Module | None = None
    output_dir: Path | None = None

    def as_dict(self) -> dict:
        return {"chosen": {k: str(v) for k, v in self.chosen.items()}, "dev_wer": self.dev_wer,
                "output_dir": None if self.output_dir is None else str(self.output_dir)}


def best_checkpoints(checkpoints: Sequence[str | Path], dev_wers: Sequence[Mapping[str, float]],
                     languages: Sequence[str] | None = None) -> dict[str, tuple[Path, float]]:
    """Per language, the checkpoint with the lowest dev WER (the earliest on ties; NaN never wins)."""
    if len(checkpoints) != len(dev_wers) or not checkpoints:
        raise ValueError(f"merge_best: {len(checkpoints)} checkpoints but {len(dev_wers)} dev WER records; "
                         "give one non-empty WER mapping per checkpoint")
    if languages is None:
        languages = sorted({lang for w in dev_wers for lang in w})
    best: dict[str, tuple[Path, float]] = {}
    for lang in languages:
        scored = [(w[lang], k) for k, w in enumerate(dev_wers) if lang in w and not math.isnan(w[lang])]
        if not scored:
            raise ValueError(f"merge_best: no checkpoint has a dev WER for language {lang!r}")
        value, k = min(scored)
        best[lang] = (Path(checkpoints[k]), float(value))
    return best


def merge_best(checkpoints: Sequence[str | Path], dev_wers: Sequence[Mapping[str, float]], *, model: nn.Module | None = None,
               output_dir: str | Path | None = None, languages: Sequence[str] | None = None,
               overwrite: bool = False) -> MergeResult:
    """Assemble each language's adapter from the checkpoint where its dev WER was best (selection, not averaging),
    into ``model`` (replacing its adapters of those names) and/or a deployable adapter directory ``output_dir``
    (``output_dir/<lang>/`` + ``selection.json``), via :func:`mmadapters.select_from_checkpoints`."""
    best = best_checkpoints(checkpoints, dev_wers, languages)
    sources = {lang: path for lang, (path, _) in best.items()}
    out = mma.select_from_checkpoints(sources, model, output_dir=output_dir, overwrite=overwrite)
    return MergeResult({k: v[0] for k, v in best.items()}, {k: v[1] for k, v in best.items()},
                       model=model, output_dir=Path(output_dir) if output_dir is not None else (None if model is not None else out))


def load_language_adapters(model: nn.Module, directory: str | Path, languages: Sequence[str] | None = None, *,
                           replace: bool = False) -> list[str]:
    """Load language adapters saved by :func:`mmadapters.save_adapters` (e.g. :func:`merge_best`'s ``output_dir``)
    onto a foundation model, ready for per-sample routing. Returns the languages loaded."""
    return mma.load_adapters(model, directory, languages, replace=replace)


def read_dev_wers(directory: str | Path) -> tuple[list[Path], list[dict[str, float]]]:
    """The (checkpoints, dev WERs) recorded by :class:`AdapterCheckpoints` in ``directory``."""
    path = Path(directory) / DEV_WER_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dev WER record (train_lda(..., checkpoint_dir=...) writes it)")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of {{step, checkpoint, dev_wer}} entries")
    checkpoints, wers = [], []
    for k, e in enumerate(entries):
        if not isinstance(e, dict) or "checkpoint" not in e or not isinstance(e.get("dev_wer"), dict):
            raise ValueError(f"{path}: entry {k} needs fields 'checkpoint' (a name) and 'dev_wer' (language -> WER)")
        checkpoints.append(Path(directory) / e["checkpoint"])
        wers.append({lang: (math.nan if v is None else float(v)) for lang, v in e["dev_wer"].items()})
    return checkpoints, wers


# -- baseline: full fine-tuning per language -------------------------------------------------------------------------

def full_finetune(model: nn.Module, tokenizer, train_utterances: Sequence[Utterance], dev: Sequence[Utterance], *,
                  language: str, config: TrainConfig | None = None) -> tuple[nn.Module, TrainResult]:
    """Baseline: a deep copy of ``model`` with every parameter trainable, fine-tuned on one language's data.

    Returns (the fine-tuned copy, its training result); ``model`` is left untouched."""
    tuned = copy.deepcopy(model)
    for p in tuned.parameters():
        p.requires_grad_(True)
    train_utts = [u for u in train_utterances if u.lang == language]
    if not train_utts:
        raise ValueError(f"full_finetune: no training utterance in language {language!r}")
    start = time.perf_counter()
    result = train(tuned, tokenizer, train_utts, config=config, dev=[u for u in dev if u.lang == language])
    result.seconds = time.perf_counter() - start
    return tuned, result


__all__ = [
    "AdapterCheckpoints", "DEFAULT_POINTS", "LanguageAdapters", "LdaRun", "MergeResult", "PseudoLabels", "TARGET_FRACTION",
    "adapter_config", "add_language_adapters", "best_checkpoints", "full_finetune", "language_router", "load_language_adapters",
    "merge_best",
    "noisy_student", "pseudo_label", "read_dev_wers", "sequence_confidence", "width_for_fraction",
]
