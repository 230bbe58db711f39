"""Language-dependent adapters (LDA) for tail languages of a streaming multilingual transducer.

Reference implementation of "Efficient Adapter Finetuning for Tail Languages in Streaming Multilingual
ASR" (the paper has no public code). The method, in the paper's order:

1. **Foundation.** A multilingual cascaded transducer (a causal, streaming first-pass encoder feeding a
   non-causal second pass; one predictor + joiner decodes either pass) trained on head languages is
   frozen, batch-norm statistics included, so switching adapters off restores it exactly.
2. **Language-dependent adapters.** Each tail language gets its own adapter set: a bottleneck adapter
   (LayerNorm -> Linear d->h -> swish -> Linear h->d, output zero-initialized, residual) at the end of
   every encoder block of both passes (``@block_out``) and, by default, at the predictor's output
   (``@predictor_out``: the transducer's language model; measured better than the encoder alone at the same
   budget); optionally after self-attention (``@attn_out``).
   The width ``h`` is chosen so one language costs about 0.4% of the foundation's parameters
   (:func:`add_language_adapters`; the exact share is reported).
3. **Training.** Batches mix languages; each utterance's language ID picks its adapter through per-sample
   routing (:func:`mmadapters.route`, :func:`language_router`), so one step trains every language in the
   batch, each adapter on its own samples only.
4. **Noisy student.** A teacher (the non-causal second pass of the frozen model with the languages'
   adapters, or a larger model) transcribes untranscribed tail audio; hypotheses below a confidence
   threshold are dropped (:func:`pseudo_label`). The student's adapters then train on the pseudo-labels
   plus the transcribed data with noise: SpecAugment, and optionally additive noise.
5. **Checkpoint merge.** Languages peak at different steps. Every dev evaluation saves each language's
   adapter and its dev WER; the deployable model takes each language's adapter from the checkpoint where
   that language's dev WER was lowest: selection, not averaging (:func:`merge_best`).

Baseline: full fine-tuning of the whole model, one run per language.

This module holds the method's pieces; ``mmadapters train lda`` (:mod:`mmadapters.speech.lda_train`) runs
steps 1-5 and the baseline on the shared training engine (typed YAML, DDP, bit-identical ``--resume``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import mmadapters as mma
from mmadapters.speech.readers import Utterance
from mmadapters.speech.train import AudioSource, _route, decode_batch, length_buckets, pad_waves

# the end of every encoder block of both passes, and the predictor's output: at the same 0.4% budget the predictor
# adapter (the transducer's language model) measured 20.9% relative WER reduction against 15.3% for block_out alone
# (docs/results.md, LDA on the foundation)
DEFAULT_POINTS = ("block_out", "predictor_out")
TARGET_FRACTION = 0.004  # the paper: about 0.4% of the model per language


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
        for batch in tqdm(batches, desc="pseudo-labelling", unit="batch", leave=False, disable=None if progress is None else not progress):
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


__all__ = [
    "DEFAULT_POINTS", "LanguageAdapters", "MergeResult", "PseudoLabels", "TARGET_FRACTION", "adapter_config",
    "add_language_adapters", "best_checkpoints", "language_router", "merge_best", "pseudo_label", "sequence_confidence",
    "width_for_fraction",
]
