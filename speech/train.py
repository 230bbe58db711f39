"""The transducer training loop: pretraining, full fine-tuning and adapter training share it.

::

    from mmadapters.speech.train import TrainConfig, train
    result = train(model, tokenizer, train_utts, dev=dev_utts, config=TrainConfig(steps=2000, lr=1e-3))

What one step does, in order:

1. **Batching.** Utterances are bucketed by length: sorted by duration (ties broken at random), cut into
   batches whose *padded* audio (longest utterance × batch size) stays under ``batch_seconds``, and the
   batch order is shuffled; every pass over the data draws new buckets. Audio is read when a batch needs
   it (:func:`mmadapters.speech.audio.load_audio`); a file that fails to load, or a transcript the
   tokenizer cannot encode, is skipped and counted (``TrainResult.skipped``), never retried.
2. **Forward.** ``model.train()`` (SpecAugment is on; batch-norm statistics of a frozen base stay frozen
   when :func:`mmadapters.freeze_base` set that up); optional additive noise on the waveforms. With
   ``adapter_for`` (utterance -> adapter name or None), the batch runs under
   ``mmadapters.route(model, names)``: each sample goes through its own adapter, so a mixed-language
   batch trains every language's adapter with its own samples only.
3. **Update.** AdamW on the parameters with ``requires_grad`` only (no weight decay on biases and norms),
   learning rate warmup then cosine decay (or Noam, or constant), gradient-norm clipping. A step whose
   loss is not finite is skipped and counted.
4. **Dev evaluation** every ``eval_every`` steps and at the end: greedy (or beam) decoding of the chosen
   encoder pass, WER and CER per language on :func:`mmadapters.eval.metrics.normalize_text`-normalized
   strings, each language's samples routed to their adapter when ``adapter_for`` is given.

Callbacks (:class:`Callback`) see every step and every evaluation and may stop training; checkpointing
is a callback (e.g. the LDA recipe saves each language's adapter at every evaluation).

Determinism: the same ``seed``, data and model give the same parameters (batches, SpecAugment masks,
dropout and noise all draw from seeded generators). A wall-time budget (``max_seconds``) ends training
at a time-dependent step and stretches the learning-rate schedule by elapsed time, so runs with a time
budget are reproducible only up to where they stop.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import mmadapters as mma
from mmadapters.eval.metrics import cer, normalize_text, wer
from mmadapters.speech.audio import SAMPLE_RATE, AudioError, load_audio
from mmadapters.speech.readers import Utterance

AdapterFor = Callable[[Utterance], "str | None"]
SCHEDULES = ("cosine", "noam", "constant")


@dataclass
class TrainConfig:
    """Settings of :func:`train`."""

    steps: int = 1000  # optimizer steps (upper bound when max_seconds is set)
    batch_seconds: float = 40.0  # padded audio per batch: longest utterance (s) x batch size
    max_batch_size: int = 64
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 1e-3
    schedule: str = "cosine"  # "cosine": warmup then cosine to min_lr_ratio; "noam": warmup then 1/sqrt(step); "constant"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 5.0  # max global gradient norm (0 disables)
    eval_every: int = 0  # dev evaluation every N steps (0: only at the end)
    max_seconds: float | None = None  # wall-time budget for training (evaluations included)
    seed: int = 0
    device: str = "cpu"
    max_audio_seconds: float = 30.0  # longer files are skipped (load_audio raises)
    noise_snr_db: float | None = None  # additive white noise at this SNR on every training waveform (noisy student)
    eval_pass: str = "second"  # encoder pass decoded at dev evaluation: "first" (streaming) or "second"
    eval_decode: str = "greedy"  # "greedy" or "beam"
    eval_batch_seconds: float = 120.0
    log_every: int = 10  # loss history granularity (steps)
    progress: bool | None = None  # tqdm bars; None: only when writing to a terminal

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        if self.eval_pass not in ("first", "second"):
            raise ValueError(f"TrainConfig.eval_pass: expected 'first' or 'second', got {self.eval_pass!r}")
        if self.eval_decode not in ("greedy", "beam"):
            raise ValueError(f"TrainConfig.eval_decode: expected 'greedy' or 'beam', got {self.eval_decode!r}")
        for name in ("steps", "max_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.batch_seconds <= 0 or self.eval_batch_seconds <= 0:
            raise ValueError("TrainConfig.batch_seconds / eval_batch_seconds: expected positive seconds")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr: expected a positive learning rate, got {self.lr!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# -- results and callbacks ------------------------------------------------------------------------------------

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

    def as_dict(self, hypotheses: bool = False) -> dict:
        out = {"per_language": self.per_language, "average_wer": self.average_wer, "skipped": self.skipped,
               "seconds": self.seconds}
        if hypotheses:
            out["hypotheses"] = self.hypotheses
        return out


@dataclass
class TrainState:
    """What callbacks see. Set ``should_stop`` to end training after this step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0  # optimizer steps done
    loss: float = math.nan  # loss of the last step
    lr: float = 0.0
    elapsed: float = 0.0  # seconds since training started
    should_stop: bool = False


class Callback:
    """Hooks into :func:`train`; override what you need."""

    def on_step(self, state: TrainState) -> None:
        """After every optimizer step."""

    def on_eval(self, state: TrainState, result: EvalResult) -> None:
        """After every dev evaluation (``state.step`` is the step it scored)."""

    def on_end(self, state: TrainState) -> None:
        """Once, after the last step and the final evaluation."""


@dataclass
class TrainResult:
    steps: int
    seconds: float  # training wall time, evaluations included
    eval_seconds: float
    losses: list[tuple[int, float]]  # (step, mean loss over the last log_every steps)
    evals: list[tuple[int, EvalResult]]
    skipped: dict[str, int]  # reason -> count of utterances never trained on
    nonfinite_steps: int
    trainable_parameters: int
    stopped_by: str  # "steps", "time" or "callback"

    @property
    def final_eval(self) -> EvalResult | None:
        return self.evals[-1][1] if self.evals else None

    def as_dict(self) -> dict:
        return {"steps": self.steps, "seconds": self.seconds, "eval_seconds": self.eval_seconds, "losses": self.losses,
                "evals": [{"step": s, **e.as_dict()} for s, e in self.evals], "skipped": self.skipped,
                "nonfinite_steps": self.nonfinite_steps, "trainable_parameters": self.trainable_parameters,
                "stopped_by": self.stopped_by}


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


def encode_targets(tokenizer, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Texts -> targets (B, U_max) long padded with 0 (the blank), target_lengths (B,) long."""
    ids = [tokenizer.encode(t) for t in texts]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    out = torch.zeros(len(ids), max(1, int(lengths.max()) if ids else 1), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    return out, lengths


def _encodable(tokenizer, text: str) -> bool:
    try:
        return len(tokenizer.encode(text)) > 0
    except (KeyError, ValueError):
        return False


def add_noise(waves: Tensor, lengths: Tensor, snr_db: float, generator: torch.Generator) -> Tensor:
    """White noise at ``snr_db`` relative to each utterance's power (padding stays zero). waves (B, S)."""
    mask = torch.arange(waves.shape[1])[None, :] < lengths[:, None]
    power = (waves.pow(2) * mask).sum(1) / lengths.clamp(min=1)
    scale = (power / 10 ** (snr_db / 10)).sqrt()
    noise = torch.randn(waves.shape, generator=generator) * scale[:, None]
    return waves + noise * mask


def move_to(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to(device)`` unless every tensor is already there (moving is then a no-op; skipping it also avoids
    ``nn.Module.to`` on adapted models: ``AdaptedModule`` shadows ``nn.Module._apply``)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device == device or (device.index is None and t.device.type == device.type) for t in tensors):
        return model
    return model.to(device)


def _route(model: nn.Module, names: list[str | None] | None):
    if names is None or all(n is None for n in names):
        return contextlib.nullcontext()
    return mma.route(model, names)


# -- learning rate ---------------------------------------------------------------------------------------------------

def lr_factor(config: TrainConfig, step: int, progress: float) -> float:
    """Multiplier of ``config.lr`` at optimizer step ``step`` (0-based); ``progress`` in [0, 1] is how far
    through the budget training is (steps or time, whichever is further)."""
    warm = max(1, config.warmup_steps)
    if config.schedule == "noam":  # Vaswani et al.: rises linearly, then decays as 1/sqrt(step); peak 1 at `warm`
        s = step + 1
        return min(s / warm, math.sqrt(warm / s))
    ramp = min(1.0, (step + 1) / warm)
    if config.schedule == "constant":
        return ramp
    if step + 1 <= warm:
        return ramp
    start = warm / max(config.steps, warm + 1)
    t = min(1.0, max(0.0, (progress - start) / max(1e-9, 1.0 - start)))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.AdamW, list[nn.Parameter]]:
    """AdamW over the parameters that require gradients; biases and norm scales (1-D) get no weight decay."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    if not params:
        raise ValueError("train: the model has no parameter with requires_grad=True (freeze_base froze everything?)")
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr), list(params.values())


# -- evaluation ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def decode_batch(model: nn.Module, waves: Tensor, lengths: Tensor, *, pass_: str = "second", decode: str = "greedy",
                 beam: int = 4, adapters: Sequence[str | None] | None = None) -> tuple[list[list[int]], Tensor, Tensor]:
    """Token ids for a padded batch (B, S): ``model.encode(..., pass_)`` then greedy or beam decoding, each sample
    through ``adapters[b]`` (None: the base). Returns (hypotheses, enc (B, T, E), enc_lengths (B,))."""
    from mmadapters.speech.decode import beam_search, greedy_decode

    names = list(adapters) if adapters is not None else None
    with _route(model, names):
        enc, enc_lengths = model.encode(waves, lengths, pass_=pass_)
        if decode == "greedy":
            return greedy_decode(model, enc, enc_lengths), enc, enc_lengths
    # beam search runs one utterance at a time over its beam: it routes each utterance itself
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
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=_disable(progress)):
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


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


# -- training ----------------------------------------------------------------------------------------------------------

def train(model: nn.Module, tokenizer, train_utterances: Sequence[Utterance], *, config: TrainConfig | None = None,
          dev: Sequence[Utterance] | None = None, adapter_for: AdapterFor | None = None,
          callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train ``model`` (a :class:`~mmadapters.speech.model.CascadedTransducer`) in place with the transducer loss
    of both passes on ``train_utterances``; see the module docstring for what one step does.

    Only parameters with ``requires_grad`` train (call :func:`mmadapters.freeze_base` first for adapters).
    ``adapter_for`` maps an utterance to the adapter its sample runs through (None: the base), in training
    and in dev evaluation. Returns the loss history, dev evaluations, skip counts and timings."""
    config = config or TrainConfig()
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    noise_gen = torch.Generator().manual_seed(config.seed + 1)
    device = torch.device(config.device)
    move_to(model, device)
    optimizer, params = make_optimizer(model, config)
    state = TrainState(model, optimizer)

    source = AudioSource(train_utterances, config.max_audio_seconds)
    usable = []
    for i, u in enumerate(train_utterances):
        if not _encodable(tokenizer, u.text):
            source.bad[i] = "text: empty or not encodable by the tokenizer"
        elif source.duration(i) > 0:
            usable.append(i)
    if not usable:
        raise ValueError(f"train: none of the {len(train_utterances)} training utterances is usable "
                         f"(skipped: {source.skipped() or 'no audio'})")

    def batches() -> Iterator[list[int]]:
        while True:
            idx = [i for i in usable if i not in source.bad]
            if not idx:
                raise ValueError(f"train: every training utterance failed to load ({source.skipped()})")
            for b in length_buckets([source.duration(i) for i in idx], config.batch_seconds, rng, config.max_batch_size):
                yield [idx[j] for j in b]

    losses: list[tuple[int, float]] = []
    evals: list[tuple[int, EvalResult]] = []
    window: list[float] = []
    nonfinite = 0
    eval_seconds = 0.0
    stopped_by = "steps"

    def run_eval() -> None:
        nonlocal eval_seconds
        if not dev:
            return
        result = evaluate(model, tokenizer, dev, adapter_for=adapter_for, pass_=config.eval_pass, decode=config.eval_decode,
                          batch_seconds=config.eval_batch_seconds, device=device, max_audio_seconds=config.max_audio_seconds,
                          progress=config.progress, desc=f"dev @ step {state.step}")
        eval_seconds += result.seconds
        evals.append((state.step, result))
        for cb in callbacks:
            cb.on_eval(state, result)

    bar = tqdm(total=config.steps, desc="train", unit="step", disable=_disable(config.progress))
    data = batches()
    model.train()
    try:
        while state.step < config.steps:
            elapsed = time.perf_counter() - start
            if config.max_seconds is not None and elapsed >= config.max_seconds:
                stopped_by = "time"
                break
            batch = next(data)
            keep = [(i, w) for i in batch if (w := source.load(i)) is not None]
            if not keep:
                continue
            utts = [train_utterances[i] for i, _ in keep]
            waves, lengths = pad_waves([w for _, w in keep])
            if config.noise_snr_db is not None:
                waves = add_noise(waves, lengths, config.noise_snr_db, noise_gen)
            targets, target_lengths = encode_targets(tokenizer, [u.text for u in utts])
            progress = state.step / config.steps
            if config.max_seconds:
                progress = max(progress, elapsed / config.max_seconds)
            state.lr = config.lr * lr_factor(config, state.step, progress)
            for group in optimizer.param_groups:
                group["lr"] = state.lr
            names = [adapter_for(u) for u in utts] if adapter_for is not None else None
            with _route(model, names):
                out = model(waves.to(device), lengths.to(device), targets.to(device), target_lengths.to(device))
            loss = out["loss"]
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                nonfinite += 1
                state.step += 1
                bar.update(1)
                continue
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            state.step += 1
            state.loss = float(loss.detach())
            state.elapsed = time.perf_counter() - start
            window.append(state.loss)
            if len(window) >= config.log_every:
                losses.append((state.step, sum(window) / len(window)))
                window = []
            bar.update(1)
            bar.set_postfix(loss=f"{state.loss:.3f}", lr=f"{state.lr:.2e}")
            for cb in callbacks:
                cb.on_step(state)
            if config.eval_every and state.step % config.eval_every == 0 and state.step < config.steps:
                run_eval()
            if state.should_stop:
                stopped_by = "callback"
                break
    finally:
        bar.close()
    if window:
        losses.append((state.step, sum(window) / len(window)))
    if not evals or evals[-1][0] != state.step:
        run_eval()
    state.elapsed = time.perf_counter() - start
    for cb in callbacks:
        cb.on_end(state)
    model.eval()
    return TrainResult(steps=state.step, seconds=state.elapsed, eval_seconds=eval_seconds, losses=losses, evals=evals,
                       skipped=source.skipped(), nonfinite_steps=nonfinite,
                       trainable_parameters=sum(p.numel() for p in params), stopped_by=stopped_by)
