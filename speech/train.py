"""Training a cascaded transducer on the training engine: batches, loss and validation of every speech run.

:class:`TransducerTask` is the engine's ``TrainTask`` (:mod:`mmadapters.training.trainer`) for a
:class:`~mmadapters.speech.model.CascadedTransducer`, whatever trains — language adapters (the LDA recipe,
:mod:`mmadapters.speech.lda_train`), the whole model (its full fine-tuning baseline), or a model from scratch
(``scripts/pretrain_tiny_asr.py``). The engine picks a step's utterances; the task then

1. **loads the batch**: audio is read when its batch needs it (:func:`mmadapters.speech.audio.load_audio`);
   a file that fails to load, or a transcript the tokenizer cannot encode, is skipped and counted, never
   retried; optional additive white noise at ``noise_snr_db`` (drawn from torch's global RNG, which the
   engine's checkpoints restore);
2. **computes the loss**: ``model.train()`` (SpecAugment on; a frozen base's batch-norm statistics stay
   frozen, :func:`mmadapters.freeze_base`), the transducer loss of both passes, each sample through its
   own adapter when the task routes (``route``: utterance -> adapter name or None, per-sample routing with
   :func:`mmadapters.route`, so a mixed-language batch trains each language's adapter on its samples only);
3. **validates**: :func:`evaluate` decodes the dev set (greedy or beam, either encoder pass) and scores WER
   and CER per language on :func:`mmadapters.eval.metrics.normalize_text`-normalized strings, each
   language routed to its adapter; ``dev_wer`` (the mean over languages, each counting once) selects best/.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import mmadapters as mma
from mmadapters.eval.metrics import cer, normalize_text, wer
from mmadapters.speech.audio import SAMPLE_RATE, AudioError, load_audio
from mmadapters.speech.readers import Utterance

AdapterFor = Callable[[Utterance], "str | None"]
SELECT_METRIC = "dev_wer"


# -- data --------------------------------------------------------------------------------------------------------

class AudioSource:
    """Reads utterances' audio on demand; remembers durations and the files that failed (never retried)."""

    def __init__(self, utterances: Sequence[Utterance], max_seconds: float = 30.0):
        self.utterances = list(utterances)
        self.max_seconds = max_seconds
        self.bad: dict[int, str] = {}  # index -> reason
        self._durations: dict[int, float] = {}

    def duration(self, i: int) -> float:
        """Seconds of utterance ``i``: the manifest's duration, else measured by loading the file once."""
        if i not in self._durations:
            d = self.utterances[i].duration
            if d is None or not d > 0:
                wave = self.load(i)
                d = wave.numel() / SAMPLE_RATE if wave is not None else 0.0
            self._durations[i] = float(d)
        return self._durations[i]

    def load(self, i: int) -> Tensor | None:
        """(S,) float waveform at 16 kHz, or None (and remembered) when the file cannot be used."""
        if i in self.bad:
            return None
        try:
            return load_audio(self.utterances[i].audio_path, sample_rate=SAMPLE_RATE, max_seconds=self.max_seconds, mono="mix")
        except (AudioError, OSError) as err:
            self.bad[i] = f"audio: {type(err).__name__}"
            warnings.warn(f"skipping utterance {self.utterances[i].id!r}: {err}", stacklevel=3)
            return None

    def skipped(self) -> dict[str, int]:
        return dict(Counter(self.bad.values()))


def length_buckets(durations: Sequence[float], batch_seconds: float, rng: random.Random,
                   max_batch_size: int = 64) -> list[list[int]]:
    """Batches of indices with similar durations: longest × size ≤ ``batch_seconds`` (a lone longer
    utterance forms its own batch), in shuffled order. Ties in duration are broken at random."""
    order = sorted(range(len(durations)), key=lambda i: (durations[i], rng.random()))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the newest utterance is the batch's longest
        if current and (durations[i] * (len(current) + 1) > batch_seconds or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def pad_waves(waves: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """List of (S_i,) -> (B, S_max) zero-padded, lengths (B,) long."""
    lengths = torch.tensor([w.numel() for w in waves], dtype=torch.long)
    out = torch.zeros(len(waves), int(lengths.max()) if len(waves) else 0)
    for i, w in enumerate(waves):
        out[i, : w.numel()] = w
    return out, lengths


def first_per_language(utterances: Sequence[Utterance], n: int | None) -> list[Utterance]:
    """The first ``n`` utterances of each language, in their order (all of them with None)."""
    if n is None:
        return list(utterances)
    seen: Counter[str] = Counter()
    out = []
    for u in utterances:
        if seen[u.lang] < n:
            seen[u.lang] += 1
            out.append(u)
    return out


def encode_targets(tokenizer, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Texts -> targets (B, U_max) long padded with 0 (the blank), target_lengths (B,) long."""
    ids = [tokenizer.encode(t) for t in texts]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    out = torch.zeros(len(ids), max(1, int(lengths.max()) if ids else 1), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    return out, lengths


def encodable(tokenizer, text: str) -> bool:
    """Whether ``text`` is a usable training target: non-empty once encoded, every character known."""
    try:
        return len(tokenizer.encode(text)) > 0
    except (KeyError, ValueError):
        return False


def add_noise(waves: Tensor, lengths: Tensor, snr_db: float, generator: torch.Generator | None) -> Tensor:
    """White noise at ``snr_db`` relative to each utterance's power (padding stays zero). waves (B, S);
    ``generator`` None draws from torch's global RNG."""
    mask = torch.arange(waves.shape[1])[None, :] < lengths[:, None]
    power = (waves.pow(2) * mask).sum(1) / lengths.clamp(min=1)
    scale = (power / 10 ** (snr_db / 10)).sqrt()
    noise = torch.randn(waves.shape, generator=generator) * scale[:, None]
    return waves + noise * mask


def _route(model: nn.Module, names: list[str | None] | None):
    if names is None or all(n is None for n in names):
        return contextlib.nullcontext()
    return mma.route(model, names)


# -- evaluation ------------------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    """Dev/test scores: per language ``{"wer", "cer", "utterances", "words"}`` plus their plain average."""

    per_language: dict[str, dict[str, float]]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    hypotheses: dict[str, str] = field(default_factory=dict)  # utterance id -> decoded text
    seconds: float = 0.0

    @property
    def average_wer(self) -> float:
        values = [v["wer"] for v in self.per_language.values() if not math.isnan(v["wer"])]
        return sum(values) / len(values) if values else math.nan

    def wers(self) -> dict[str, float]:
        return {lang: v["wer"] for lang, v in self.per_language.items()}

    def as_dict(self) -> dict:
        return {"per_language": self.per_language, "average_wer": self.average_wer, "skipped": self.skipped,
                "seconds": self.seconds}


@torch.no_grad()
def decode_batch(model: nn.Module, waves: Tensor, lengths: Tensor, *, pass_: str = "second", decode: str = "greedy",
                 beam: int = 4, adapters: Sequence[str | None] | None = None) -> tuple[list[list[int]], Tensor, Tensor]:
    """Token ids for a padded batch (B, S): ``model.encode(..., pass_)`` then greedy or beam decoding, each sample
    through ``adapters[b]`` (None: the base). Returns (hypotheses, enc (B, T, E), enc_lengths (B,))."""
    from mmadapters.speech.decode import beam_search, greedy_decode

    names = list(adapters) if adapters is not None else None
    with _route(model, names):
        enc, enc_lengths = model.encode(waves, lengths, pass_=pass_)
    # the decoders route the predictor and joiner themselves (beam search and TDT one utterance at a time)
    if decode == "greedy":
        return greedy_decode(model, enc, enc_lengths, adapters=names), enc, enc_lengths
    return beam_search(model, enc, enc_lengths, beam, adapters=names), enc, enc_lengths


def evaluate(model: nn.Module, tokenizer, utterances: Sequence[Utterance], *, adapter_for: AdapterFor | None = None,
             pass_: str = "second", decode: str = "greedy", batch_seconds: float = 120.0, device: str | torch.device = "cpu",
             max_audio_seconds: float = 30.0, progress: bool | None = None, desc: str = "dev", beam: int = 4) -> EvalResult:
    """Corpus WER/CER per language (``Utterance.lang``) of ``model`` decoding ``utterances`` (``beam``: the beam
    size when ``decode="beam"``).

    References and hypotheses pass through :func:`normalize_text` before scoring. Unreadable audio is
    skipped and counted. With ``adapter_for`` each sample runs through its own adapter (per-sample
    routing); the model's training mode is restored afterwards."""
    start = time.perf_counter()
    source = AudioSource(utterances, max_audio_seconds)
    durations = [source.duration(i) for i in range(len(utterances))]
    batches = sorted(length_buckets(durations, batch_seconds, random.Random(0), max_batch_size=256), key=lambda b: b[0])
    was_training = model.training
    model.eval()
    refs: dict[str, list[str]] = {}
    hyps: dict[str, list[str]] = {}
    texts: dict[str, str] = {}
    try:
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=None if progress is None else not progress):
            keep = [(i, w) for i in batch if (w := source.load(i)) is not None]
            if not keep:
                continue
            waves, lengths = pad_waves([w for _, w in keep])
            names = [adapter_for(utterances[i]) for i, _ in keep] if adapter_for is not None else None
            ids, _, _ = decode_batch(model, waves.to(device), lengths.to(device), pass_=pass_, decode=decode, beam=beam,
                                     adapters=names)
            for (i, _), tok in zip(keep, ids, strict=True):
                u = utterances[i]
                text = tokenizer.decode(list(tok))
                texts[u.id] = text
                refs.setdefault(u.lang, []).append(normalize_text(u.text))
                hyps.setdefault(u.lang, []).append(normalize_text(text))
    finally:
        model.train(was_training)
    per_language = {}
    for lang in sorted(refs):
        r, h = refs[lang], hyps[lang]
        per_language[lang] = {"wer": wer(r, h), "cer": cer(r, h), "utterances": len(r), "words": sum(len(x.split()) for x in r)}
    return EvalResult(per_language, source.skipped(), texts, time.perf_counter() - start)


def validation_metrics(result: EvalResult, languages: Sequence[str], *, train_skipped: int = 0) -> dict[str, float]:
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


# -- the engine's task -------------------------------------------------------------------------------------------------

@dataclass
class TransducerBatch:
    """A collated training batch: ``waves`` (B, S) zero-padded, ``lengths`` (B,), ``targets`` (B, U) padded with the
    blank, ``target_lengths`` (B,), ``adapters`` (B,) the adapter each sample runs through (None: the base);
    ``bad``: items of the requested indices whose audio failed to load (left out)."""

    waves: Tensor
    lengths: Tensor
    targets: Tensor
    target_lengths: Tensor
    adapters: list[str | None]
    bad: int = 0

    def __len__(self) -> int:
        return len(self.adapters)


@dataclass
class EvalSettings:
    """How validation decodes and reads audio."""

    pass_: str = "second"  # encoder pass: "first" (streaming) or "second"
    decode: str = "greedy"  # "greedy" or "beam"
    beam: int = 4
    batch_seconds: float = 120.0  # padded audio seconds per validation batch
    max_audio_seconds: float = 30.0  # longer files are skipped (training and validation)


class TransducerTask:
    """A :class:`~mmadapters.speech.model.CascadedTransducer` as the engine's TrainTask (see the module docstring).

    Exactly the parameters with ``requires_grad`` train: freeze the base and add adapters first
    (:func:`~mmadapters.speech.lda.add_language_adapters`), or leave every parameter trainable. Training items are
    the ``train`` utterances with encodable text and audio of positive duration (the rest is counted in
    :meth:`skipped`); ``languages`` (default: those of ``dev``) are the validation's languages. :meth:`save` writes
    the whole model (:func:`~mmadapters.speech.model.save_asr`); a recipe that trains adapters overrides it."""

    select_metric = SELECT_METRIC
    select_mode = "min"

    def __init__(self, model: nn.Module, tokenizer, train: Sequence[Utterance], dev: Sequence[Utterance], *,
                 route: AdapterFor | None = None, languages: Sequence[str] | None = None, device: str | torch.device = "cpu",
                 noise_snr_db: float | None = None, eval_settings: EvalSettings | None = None, progress: bool = False,
                 where: str = "training data"):
        self.model, self.tokenizer, self.route = model, tokenizer, route
        self.device = torch.device(device)
        self.noise_snr_db = noise_snr_db
        self.eval = eval_settings or EvalSettings()
        self.progress = progress
        self.dev = list(dev)
        self.languages = list(languages) if languages is not None else sorted({u.lang for u in self.dev})
        source = AudioSource(train, self.eval.max_audio_seconds)
        usable: list[int] = []
        for i, u in enumerate(source.utterances):
            if not encodable(tokenizer, u.text):
                source.bad[i] = "text: empty or not encodable by the tokenizer"
            elif source.duration(i) > 0:
                usable.append(i)
        if not usable:
            raise ValueError(f"{where}: none of the {len(source.utterances)} training utterances is usable "
                             f"(skipped: {source.skipped() or 'no audio'})")
        self._source, self._usable = source, usable
        self.train_utterances = [source.utterances[i] for i in usable]
        self.last_eval: EvalResult | None = None

    def train_size(self) -> int:
        return len(self._usable)

    def skipped(self) -> dict[str, int]:
        """Training utterances never trained on, by reason (text or audio problems)."""
        return self._source.skipped()

    def get_batch(self, indices: list[int]) -> TransducerBatch:
        """Load and collate training items ``indices`` (positions in :attr:`train_utterances`) on the task's device.
        Audio that fails to load is left out (and never loaded again)."""
        loaded = [(k, w) for k in indices if (w := self._source.load(self._usable[k])) is not None]
        utts = [self.train_utterances[k] for k, _ in loaded]
        bad = len(indices) - len(loaded)
        if not loaded:
            empty = torch.zeros(0, 0, device=self.device)
            zeros = torch.zeros(0, dtype=torch.long, device=self.device)
            return TransducerBatch(empty, zeros, torch.zeros(0, 1, dtype=torch.long, device=self.device), zeros, [], bad)
        waves, lengths = pad_waves([w for _, w in loaded])
        if self.noise_snr_db is not None:
            waves = add_noise(waves, lengths, self.noise_snr_db, None)
        targets, target_lengths = encode_targets(self.tokenizer, [u.text for u in utts])
        names = [self.route(u) for u in utts] if self.route is not None else [None] * len(utts)
        return TransducerBatch(waves.to(self.device), lengths.to(self.device), targets.to(self.device),
                               target_lengths.to(self.device), names, bad)

    def loss(self, model: nn.Module, batch: TransducerBatch) -> Tensor:
        """Transducer loss of both passes (``w1 * rnnt(first) + w2 * rnnt(second)``, each the batch mean), every
        sample through its adapter. A batch whose audio all failed gives a zero loss that still reaches the
        trainable parameters (so distributed gradient reduction sees every one)."""
        if not len(batch):
            return sum((p.sum() for p in model.parameters() if p.requires_grad), torch.zeros((), device=self.device)) * 0.0
        if not model.training:
            model.train()
        with _route(model, batch.adapters):
            out = model(batch.waves, batch.lengths, batch.targets, batch.target_lengths)
        return out["loss"]

    def validate(self) -> dict[str, float]:
        """Dev WER/CER per language (``dev_wer_<lang>``, ``dev_cer_<lang>``) and their averages (``dev_wer``,
        ``dev_cer``: each language counts once), each utterance decoded through its adapter."""
        e = self.eval
        result = evaluate(self.model, self.tokenizer, self.dev, adapter_for=self.route, pass_=e.pass_, decode=e.decode,
                          beam=e.beam, batch_seconds=e.batch_seconds, device=self.device, max_audio_seconds=e.max_audio_seconds,
                          progress=self.progress, desc="validation")
        self.last_eval = result
        return validation_metrics(result, self.languages, train_skipped=sum(self.skipped().values()))

    def save(self, directory: Path) -> None:
        """The whole model and its tokenizer (float32), loadable with :func:`~mmadapters.speech.model.load_asr`."""
        from mmadapters.speech.model import save_asr

        save_asr(directory, self.model, self.tokenizer)

    def parameter_counts(self) -> dict[str, int]:
        return {"trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                "total": sum(p.numel() for p in self.model.parameters())}


__all__ = ["AudioSource", "EvalResult", "EvalSettings", "SELECT_METRIC", "TransducerBatch", "TransducerTask", "add_noise",
           "decode_batch", "encodable", "encode_targets", "evaluate", "first_per_language", "length_buckets", "pad_waves",
           "validation_metrics"]
