"""Generated multilingual speech: espeak-ng reading sentences of real words, with varied speakers and noise.

``python -m mmadapters.speech.synth --languages en,de,es --utterances N --seed S --out DIR`` writes a small
multilingual ASR data set for the LDA recipe (head languages with ample data, tail languages with little):

- **Text.** A sentence is 3–7 words (``--words-per-utterance``) drawn from (the first ``--vocabulary`` words of)
  the shipped word list of its language
  (``speech/assets/wordlists/<lang>.txt``: the most frequent words of the wordfreq package, letters only,
  made by ``scripts/make_wordlists.py``) with Zipf–Mandelbrot weights ``1 / (rank + ZIPF_OFFSET)``.
  Lowercase, no punctuation: the text is exactly the words espeak-ng reads.
- **Speakers.** Each language has ``speakers`` synthetic speakers, each an espeak-ng voice variant
  (``+m3``, ``+f2``, ``+klatt4``, ...) with its own speaking rate, pitch and word gap; every utterance
  jitters rate and pitch around its speaker's (``--shared-speakers``: the same speakers, each a distinct
  variant, in every language). The last ``heldout_speakers`` speakers speak only the dev and
  test splits, the others only train and unlabeled, so evaluation is on unseen voices.
- **Audio.** espeak-ng's 22,050 Hz output is resampled to 16 kHz (``torchaudio.functional.resample``),
  normalized to a random level (gain), padded with random leading/trailing silence and mixed with white,
  pink or brown noise at a random SNR; written as 16 kHz mono PCM16 wav.
- **Splits.** Per language: ``train`` (head: ``utterances``; tail: ``tail_utterances``), ``dev`` and
  ``test`` (``eval_utterances`` each) and, for tail languages only, ``unlabeled``: audio for noisy-student
  training. Its rows still carry the ``text`` the audio was made from so pseudo-labels can be scored, but
  **recipes must not read that text for training** — it is the untranscribed pool of the paper.

**Foundation data** (``--foundation``, issue 20): every language in train, the tail at ``--tail-fraction``
(0.12) of the head's utterances, 2–5 words from 400-word vocabularies, 8 shared training voices plus 2 held-out
voices for dev/test, SNR 25–40 dB; any flag given explicitly overrides the preset.

Layout of ``DIR``: ``audio/<lang>/<split>/<lang>_<split>_<index>.wav``; ``manifest.jsonl`` (every
utterance) and ``{train,dev,test,unlabeled}.jsonl``, NeMo JSONL rows ``{"audio_filepath": path relative to
DIR, "duration": seconds, "text", "lang", "split", "speaker", "snr_db"}``; ``tokenizer/tokenizer.json``
(a character tokenizer over every character of the languages' word lists, so tail-only letters are targets);
``synth_config.json`` (the settings, the
speaker table, word-list checksums, counts and hours; written last, so its presence means a complete run).

Determinism: the same arguments and seed give byte-identical files, with any number of ``workers``.
Utterance ``i`` of (language, split) depends only on (seed, language, split, i) and speaker ``k`` of a
language only on (seed, language, k), so adding a language or raising a count does not change the files
already there. (A different espeak-ng version speaks differently; its version is in ``synth_config.json``.)
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import wave
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmadapters.io import atomic_write_bytes

__all__ = [
    "DEFAULT_LANGUAGES",
    "EXTRA_LANGUAGES",
    "HEAD_LANGUAGES",
    "LANGUAGES",
    "SAMPLE_RATE",
    "SPLITS",
    "TAIL_LANGUAGES",
    "VARIANTS",
    "LanguageInfo",
    "Speaker",
    "SynthError",
    "UtterancePlan",
    "find_espeak",
    "FOUNDATION",
    "generate",
    "load_wordlist",
    "main",
    "make_sentence",
    "make_shared_speakers",
    "make_speakers",
    "plan_utterance",
    "render_utterance",
]

# Bump when anything that changes the bytes of the output changes (sampling order, signal chain, defaults).
GENERATOR_VERSION = 1
SAMPLE_RATE = 16000
SPLITS: tuple[str, ...] = ("train", "dev", "test", "unlabeled")
WORDLIST_DIR = Path(__file__).resolve().parent / "assets" / "wordlists"
MIN_WORD_CHARS, MAX_WORD_CHARS = 2, 14  # characters per word in the shipped lists
MIN_WORDS, MAX_WORDS = 3, 7  # words per sentence
ZIPF_OFFSET = 10.0  # weight of rank r (1-based) is 1/(r + ZIPF_OFFSET): Zipf-like but the top words do not swamp sentences

ESPEAK_AMPLITUDE = 50  # espeak-ng -a: half the default, so loud variants do not clip before our own gain
SPEAKER_RATE_WPM = (130, 200)  # espeak-ng -s of a speaker (words per minute)
SPEAKER_PITCH = (20, 80)  # espeak-ng -p of a speaker (0..99)
SPEAKER_WORD_GAP = (0, 2)  # espeak-ng -g of a speaker (units of 10 ms)
RATE_JITTER = 0.08  # per-utterance rate: speaker's rate x (1 +- RATE_JITTER)
PITCH_JITTER = 6  # per-utterance pitch: speaker's pitch +- PITCH_JITTER
LEVEL_DBFS = -23.0  # RMS level of the speech before the per-utterance gain
GAIN_DB = (-8.0, 4.0)
SILENCE_S = (0.05, 0.35)  # leading and trailing silence, each drawn separately
NOISE_KINDS: tuple[str, ...] = ("white", "pink", "brown")
DEFAULT_NOISE_SNR = (15.0, 35.0)
DEFAULT_TAIL_FRACTION = 0.12  # --foundation: tail train utterances per head train utterance
# --foundation: the settings of the foundation's pretraining data (issue 20), applied to every flag left unset.
# Every language is in train (the tail at DEFAULT_TAIL_FRACTION of the head), sentences of 2-5 words from a
# 400-word vocabulary, 8 voices shared by all languages plus 2 held-out voices that speak only dev and test.
FOUNDATION: dict[str, Any] = {
    "tail_fraction": DEFAULT_TAIL_FRACTION,
    "words_per_utterance": (2, 5),
    "vocabulary": 400,
    "speakers": 10,
    "heldout_speakers": 2,
    "shared_speakers": True,
    "noise_snr": (25.0, 40.0),
}
PEAK = 0.99  # a mix louder than this is scaled down as a whole (keeps its SNR)


class SynthError(RuntimeError):
    """espeak-ng is missing or failed, a word list is missing, or an output folder is not usable."""


@dataclass(frozen=True)
class LanguageInfo:
    """One language of the generator: ``voice`` is the espeak-ng voice, ``role`` its default part ("head" or "tail")."""

    code: str
    name: str
    voice: str
    script: str
    role: str


LANGUAGES: dict[str, LanguageInfo] = {
    info.code: info
    for info in (
        LanguageInfo("en", "English", "en-us", "Latin", "head"),
        LanguageInfo("de", "German", "de", "Latin", "head"),
        LanguageInfo("es", "Spanish", "es", "Latin", "head"),
        LanguageInfo("fr", "French", "fr-fr", "Latin", "head"),
        LanguageInfo("it", "Italian", "it", "Latin", "head"),
        LanguageInfo("ru", "Russian", "ru", "Cyrillic", "head"),
        LanguageInfo("pt", "Portuguese", "pt", "Latin", "tail"),
        LanguageInfo("nl", "Dutch", "nl", "Latin", "tail"),
        LanguageInfo("pl", "Polish", "pl", "Latin", "tail"),
        LanguageInfo("sv", "Swedish", "sv", "Latin", "tail"),
        LanguageInfo("cs", "Czech", "cs", "Latin", "tail"),
        LanguageInfo("uk", "Ukrainian", "uk", "Cyrillic", "tail"),
        # more tail languages, on request (not in DEFAULT_LANGUAGES)
        LanguageInfo("ro", "Romanian", "ro", "Latin", "tail"),
        LanguageInfo("tr", "Turkish", "tr", "Latin", "tail"),
        LanguageInfo("el", "Greek", "el", "Greek", "tail"),
        LanguageInfo("hi", "Hindi", "hi", "Devanagari", "tail"),
        LanguageInfo("bg", "Bulgarian", "bg", "Cyrillic", "tail"),
    )
}
HEAD_LANGUAGES: tuple[str, ...] = ("en", "de", "es", "fr", "it", "ru")
TAIL_LANGUAGES: tuple[str, ...] = ("pt", "nl", "pl", "sv", "cs", "uk")
DEFAULT_LANGUAGES: tuple[str, ...] = HEAD_LANGUAGES + TAIL_LANGUAGES
EXTRA_LANGUAGES: tuple[str, ...] = tuple(c for c in LANGUAGES if c not in DEFAULT_LANGUAGES)

# espeak-ng voice variants (``espeak-ng --voices=variant``, the file column) that speakers are drawn from.
# Left out: whispering and novelty robots. Those missing from the installed espeak-ng are skipped (recorded
# in synth_config.json).
VARIANTS: tuple[str, ...] = (
    *(f"m{i}" for i in range(1, 9)),
    *(f"f{i}" for i in range(1, 6)),
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
    "adam", "Alex", "Alicia", "Andrea", "Andy", "Annie", "antonio", "aunty", "belinda", "benjamin", "boris",
    "caleb", "croak", "david", "Denis", "Diogo", "ed", "edward", "edward2", "Gene", "Gene2", "grandma", "grandpa",
    "gustave", "Henrique", "Hugo", "iven", "iven2", "iven3", "iven4", "Jacky", "john", "kaukovalta", "Lee",
    "linda", "marcelo", "Marco", "Mario", "max", "Michael", "michel", "miguel", "Mike", "norbert", "pablo",
    "paul", "pedro", "quincy", "rob", "robert", "sandro", "shelby", "steph", "steph2", "steph3", "travis",
    "victor", "zac", "anika",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ espeak-ng


def find_espeak() -> str:
    """Absolute path of the ``espeak-ng`` binary on ``PATH``; :class:`SynthError` saying how to install it if absent."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise SynthError(
            "the espeak-ng binary was not found on PATH; generated speech needs it. Install it with "
            "`apt-get install espeak-ng` (Debian/Ubuntu) or `bash scripts/system_deps.sh`."
        )
    return binary


def _run(args: Sequence[str], data: bytes | None = None) -> bytes:
    try:
        proc = subprocess.run(list(args), input=data, capture_output=True, check=False)
    except OSError as exc:
        raise SynthError(f"could not run {args[0]}: {exc}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise SynthError(f"`{' '.join(args)}` failed with exit status {proc.returncode}: {err}")
    return proc.stdout


@functools.cache
def espeak_info(binary: str) -> tuple[str, frozenset[str], frozenset[str]]:
    """(version, voice names, variant file names) of an espeak-ng binary."""
    version_line = _run([binary, "--version"]).decode("utf-8", "replace").strip()
    # "eSpeak NG text-to-speech: 1.51  Data at: ..."
    version = version_line.split(":", 1)[1].split()[0] if ":" in version_line else version_line
    voices = set()
    for line in _run([binary, "--voices"]).decode("utf-8", "replace").splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2:
            voices.add(parts[1])
    variants = set()
    for line in _run([binary, "--voices=variant"]).decode("utf-8", "replace").splitlines()[1:]:
        for part in line.split():
            if part.startswith("!v/"):
                variants.add(part[3:])
    return version, frozenset(voices), frozenset(variants)


def _parse_wav(data: bytes, what: str) -> tuple[np.ndarray, int]:
    """Samples (float64 in [-1, 1)) and sample rate of espeak-ng's ``--stdout`` wav (its chunk sizes are not filled in)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SynthError(f"espeak-ng gave no wav for {what} ({len(data)} bytes)")
    pos, rate, channels, bits = 12, None, None, None
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk == b"fmt ":
            fmt = data[pos + 8 : pos + 8 + 16]
            channels = int.from_bytes(fmt[2:4], "little")
            rate = int.from_bytes(fmt[4:8], "little")
            bits = int.from_bytes(fmt[14:16], "little")
        elif chunk == b"data":
            if rate is None or channels != 1 or bits != 16:
                raise SynthError(f"espeak-ng wav for {what}: expected mono 16-bit, got channels={channels} bits={bits}")
            body = data[pos + 8 :]
            body = body[: len(body) - len(body) % 2]
            return np.frombuffer(body, dtype="<i2").astype(np.float64) / 32768.0, rate
        pos += 8 + size + (size & 1)
    raise SynthError(f"espeak-ng wav for {what} has no data chunk")


# ------------------------------------------------------------------------------------------------ text


@functools.cache
def load_wordlist(lang: str) -> tuple[str, ...]:
    """The shipped word list of ``lang`` in frequency-rank order (``speech/assets/wordlists/<lang>.txt``)."""
    path = WORDLIST_DIR / f"{lang}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SynthError(f"word list {path} is missing; make it with `python scripts/make_wordlists.py --languages {lang}`") from None
    words = tuple(w for w in (line.strip() for line in text.splitlines()) if w)
    if len(words) < 50:
        raise SynthError(f"word list {path} has {len(words)} words; expected at least 50 (one per line)")
    return words


@functools.cache
def _cumulative_weights(n: int) -> np.ndarray:
    weights = 1.0 / (np.arange(1, n + 1, dtype=np.float64) + ZIPF_OFFSET)
    cum = np.cumsum(weights)
    return cum / cum[-1]


def make_sentence(rng: np.random.Generator, words: Sequence[str], min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> str:
    """A sentence of ``min_words..max_words`` words of ``words`` (rank order) drawn with weights ``1/(rank + ZIPF_OFFSET)``.

    A word is not repeated right after itself. Uses ``1 + k + repeats`` draws of ``rng``.
    """
    cum = _cumulative_weights(len(words))
    k = int(rng.integers(min_words, max_words + 1))
    out: list[str] = []
    while len(out) < k:
        word = words[min(int(np.searchsorted(cum, rng.random(), side="right")), len(words) - 1)]
        if not out or out[-1] != word:
            out.append(word)
    return " ".join(out)


# ------------------------------------------------------------------------------------------------ speakers and plans


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


@dataclass(frozen=True)
class Speaker:
    """A synthetic speaker: an espeak-ng voice variant with its own rate (wpm), pitch (0..99) and word gap (10 ms units)."""

    id: str
    variant: str
    rate: int
    pitch: int
    word_gap: int
    heldout: bool


def make_speakers(lang: str, seed: int, n: int, heldout: int, variants: Sequence[str] = VARIANTS) -> list[Speaker]:
    """The ``n`` speakers of ``lang``; the last ``heldout`` of them speak only dev and test. Speaker k depends on (seed, lang, k)."""
    if not variants:
        raise SynthError("no espeak-ng voice variants to draw speakers from")
    speakers = []
    for k in range(n):
        rng = _rng(seed, _key(lang), _key("speaker"), k)
        variant = variants[int(rng.integers(len(variants)))]
        rate = int(rng.integers(SPEAKER_RATE_WPM[0], SPEAKER_RATE_WPM[1] + 1))
        pitch = int(rng.integers(SPEAKER_PITCH[0], SPEAKER_PITCH[1] + 1))
        gap = int(rng.integers(SPEAKER_WORD_GAP[0], SPEAKER_WORD_GAP[1] + 1))
        speakers.append(Speaker(f"{lang}-s{k:02d}", variant, rate, pitch, gap, k >= n - heldout))
    return speakers


def make_shared_speakers(seed: int, n: int, heldout: int, variants: Sequence[str] = VARIANTS) -> list[Speaker]:
    """``n`` speakers with distinct voice variants, the same in every language; the last ``heldout`` speak only dev and test.

    The variants are a seeded permutation of ``variants``, so no held-out speaker shares a variant with a training
    speaker, and speaker k depends only on (seed, k) and ``variants``.
    """
    if n > len(variants):
        raise SynthError(f"{n} shared speakers need {n} distinct voice variants; espeak-ng has {len(variants)} of VARIANTS")
    order = _rng(seed, _key("shared-speakers")).permutation(len(variants))
    speakers = []
    for k in range(n):
        rng = _rng(seed, _key("shared-speaker"), k)
        rate = int(rng.integers(SPEAKER_RATE_WPM[0], SPEAKER_RATE_WPM[1] + 1))
        pitch = int(rng.integers(SPEAKER_PITCH[0], SPEAKER_PITCH[1] + 1))
        gap = int(rng.integers(SPEAKER_WORD_GAP[0], SPEAKER_WORD_GAP[1] + 1))
        speakers.append(Speaker(f"s{k:02d}", variants[int(order[k])], rate, pitch, gap, k >= n - heldout))
    return speakers


@dataclass(frozen=True)
class UtterancePlan:
    """Everything needed to render one utterance; ``path`` is relative to the output folder.

    ``snr_db`` is None for clean audio. The noise samples come from ``noise_key`` (a numpy seed sequence).
    """

    lang: str
    split: str
    index: int
    path: str
    text: str
    speaker: str
    voice: str
    variant: str
    rate: int
    pitch: int
    word_gap: int
    gain_db: float
    lead_s: float
    trail_s: float
    noise: str
    snr_db: float | None
    noise_key: tuple[int, ...]


def plan_utterance(
    seed: int,
    lang: str,
    split: str,
    index: int,
    speakers: Sequence[Speaker],
    noise_snr: tuple[float, float] | None = DEFAULT_NOISE_SNR,
    words_per_utterance: tuple[int, int] = (MIN_WORDS, MAX_WORDS),
    vocabulary: int | None = None,
) -> UtterancePlan:
    """Utterance ``index`` of ``split`` in ``lang``: a function of (seed, lang, split, index) and the speaker table only.

    train and unlabeled draw from the non-held-out speakers, dev and test from the held-out ones (all
    speakers when none is held out). The sentence has ``words_per_utterance`` (low, high) words from the first
    ``vocabulary`` words of the language's list (all of it when None).
    """
    eval_split = split in ("dev", "test")
    pool = [s for s in speakers if s.heldout == eval_split] or list(speakers)
    rng = _rng(seed, _key(lang), _key(split), index)
    text = make_sentence(rng, load_wordlist(lang)[:vocabulary], *words_per_utterance)
    spk = pool[int(rng.integers(len(pool)))]
    rate = int(round(spk.rate * (1.0 + rng.uniform(-RATE_JITTER, RATE_JITTER))))
    pitch = int(np.clip(spk.pitch + int(rng.integers(-PITCH_JITTER, PITCH_JITTER + 1)), 0, 99))
    gain_db = float(rng.uniform(*GAIN_DB))
    lead_s, trail_s = (float(x) for x in rng.uniform(SILENCE_S[0], SILENCE_S[1], size=2))
    noise = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
    snr = float(rng.uniform(*noise_snr)) if noise_snr is not None else None
    return UtterancePlan(
        lang=lang,
        split=split,
        index=index,
        path=f"audio/{lang}/{split}/{lang}_{split}_{index:06d}.wav",
        text=text,
        speaker=spk.id,
        voice=LANGUAGES[lang].voice,
        variant=spk.variant,
        rate=rate,
        pitch=pitch,
        word_gap=spk.word_gap,
        gain_db=round(gain_db, 4),
        lead_s=round(lead_s, 4),
        trail_s=round(trail_s, 4),
        noise=noise if snr is not None else "none",
        snr_db=round(snr, 3) if snr is not None else None,
        noise_key=(seed, _key(lang), _key(split), index, _key("noise")),
    )


# ------------------------------------------------------------------------------------------------ audio


def _coloured_noise(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """(n,) zero-mean unit-RMS noise: white, pink (1/f power) or brown (1/f^2 power)."""
    x = rng.standard_normal(n)
    if kind != "white" and n > 1:
        spec = np.fft.rfft(x)
        f = np.arange(spec.shape[0], dtype=np.float64)
        f[0] = 1.0
        spec = spec / (np.sqrt(f) if kind == "pink" else f)
        spec[0] = 0.0
        x = np.fft.irfft(spec, n)
    rms = math.sqrt(float(np.mean(x * x))) if n else 0.0
    return x / rms if rms > 0 else x


def _resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    if orig == new:
        return x
    import torch
    import torchaudio.functional as AF

    # one thread: the result must not depend on how many threads a worker happens to get
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        y = AF.resample(torch.from_numpy(x.astype(np.float32)), orig, new)
    finally:
        torch.set_num_threads(threads)
    return y.numpy().astype(np.float64)


def render_utterance(plan: UtterancePlan, espeak: str) -> np.ndarray:
    """The 16 kHz PCM16 samples ``(S,)`` (int16) of ``plan``: espeak-ng -> resample -> gain -> silence -> noise -> peak limit."""
    what = f"{plan.lang} {plan.split} #{plan.index} ({plan.voice}+{plan.variant}: {plan.text!r})"
    args = [espeak, "-v", f"{plan.voice}+{plan.variant}", "-s", str(plan.rate), "-p", str(plan.pitch), "-g", str(plan.word_gap)]
    args += ["-a", str(ESPEAK_AMPLITUDE), "-b", "1", "--stdout", "--stdin"]
    speech, rate = _parse_wav(_run(args, plan.text.encode("utf-8")), what)
    speech = _resample(speech, rate, SAMPLE_RATE)
    rms = math.sqrt(float(np.mean(speech * speech))) if speech.size else 0.0
    if rms < 1e-5:
        raise SynthError(f"espeak-ng produced silence for {what}")
    speech_rms = 10.0 ** ((LEVEL_DBFS + plan.gain_db) / 20.0)
    speech = speech * (speech_rms / rms)
    lead, trail = round(plan.lead_s * SAMPLE_RATE), round(plan.trail_s * SAMPLE_RATE)
    x = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    if plan.snr_db is not None:
        noise = _coloured_noise(np.random.default_rng(list(plan.noise_key)), plan.noise, x.shape[0])
        x = x + noise * (speech_rms / 10.0 ** (plan.snr_db / 20.0))
    peak = float(np.max(np.abs(x)))
    if peak > PEAK:
        x = x * (PEAK / peak)
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype("<i2")


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono PCM16 wav file of ``samples`` (S,) int16."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())
    return buf.getvalue()


def _replace_write(path: Path, data: bytes) -> None:
    """Write via a temporary name and an atomic rename, without fsync.

    An interrupted run never leaves a half-written wav under its real name; durability is restored once per
    run by ``os.sync()`` before ``synth_config.json`` is written (an fsync per wav cost more than synthesis).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _render_task(task: tuple[UtterancePlan, str, str]) -> int:
    """Worker: render one plan, write its wav under ``out``; returns the number of samples."""
    plan, espeak, out = task
    samples = render_utterance(plan, espeak)
    _replace_write(Path(out) / plan.path, wav_bytes(samples))
    return int(samples.shape[0])


def _worker_init() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


# ------------------------------------------------------------------------------------------------ data set


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json_line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False)


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"synth: {name}={value!r}; expected an integer >= 0")
    return value


def _resolve_languages(languages: Sequence[str] | str, tail_languages: Sequence[str] | str | None) -> tuple[list[str], dict[str, str]]:
    if isinstance(languages, str):
        languages = [c.strip() for c in languages.split(",") if c.strip()]
    if isinstance(tail_languages, str):
        tail_languages = [c.strip() for c in tail_languages.split(",") if c.strip()]
    if not languages:
        raise ValueError("synth: languages is empty; expected codes such as en,de,es")
    known = ", ".join(LANGUAGES)
    for code in [*languages, *(tail_languages or ())]:
        if code not in LANGUAGES:
            raise ValueError(f"synth: unknown language {code!r}; expected one of: {known}")
    if tail_languages is not None:
        outside = [c for c in tail_languages if c not in languages]
        if outside:
            raise ValueError(f"synth: tail_languages {outside} are not among languages {list(languages)}")
    # table order, so that the order given on the command line does not change the manifest
    ordered = [c for c in LANGUAGES if c in set(languages)]
    roles = {c: ("tail" if c in tail_languages else "head") if tail_languages is not None else LANGUAGES[c].role for c in ordered}
    return ordered, roles


def _iter_plans(
    langs: Sequence[str],
    roles: dict[str, str],
    counts: dict[str, dict[str, int]],
    speakers: dict[str, list[Speaker]],
    seed: int,
    noise_snr: tuple[float, float] | None,
    words_per_utterance: tuple[int, int],
    vocabulary: int | None,
) -> Iterator[UtterancePlan]:
    for lang in langs:
        for split in SPLITS:
            for i in range(counts[roles[lang]].get(split, 0)):
                yield plan_utterance(seed, lang, split, i, speakers[lang], noise_snr, words_per_utterance, vocabulary)


def generate(
    out: str | os.PathLike[str],
    languages: Sequence[str] | str = DEFAULT_LANGUAGES,
    *,
    utterances: int = 200,
    tail_utterances: int | None = None,
    tail_fraction: float | None = None,
    eval_utterances: int | None = None,
    unlabeled: int | None = None,
    tail_languages: Sequence[str] | str | None = None,
    seed: int = 0,
    speakers: int = 24,
    heldout_speakers: int = 6,
    noise_snr: tuple[float, float] | None = DEFAULT_NOISE_SNR,
    words_per_utterance: tuple[int, int] = (MIN_WORDS, MAX_WORDS),
    vocabulary: int | None = None,
    shared_speakers: bool = False,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Write the generated data set under ``out`` and return the path of ``manifest.jsonl``.

    Counts per language: head ``train`` = ``utterances``; tail ``train`` = ``tail_utterances``, or
    ``max(1, round(tail_fraction * utterances))`` (default ``max(1, utterances // 10)``); ``dev`` and ``test`` =
    ``eval_utterances`` each (default
    ``max(1, utterances // 10)``); tail ``unlabeled`` = ``unlabeled`` (default ``3 * tail_utterances``).
    ``tail_languages`` overrides which of ``languages`` are tail (default: the ``role`` in
    :data:`LANGUAGES`). ``noise_snr`` = (low, high) dB, or None for clean audio. A sentence has
    ``words_per_utterance`` (low, high) words from the first ``vocabulary`` words of its list (None: all).
    ``shared_speakers``: every language has the same ``speakers`` voices (:func:`make_shared_speakers`, distinct
    variants) instead of its own. ``out/tokenizer/tokenizer.json`` is a character tokenizer covering every
    character of every generated language's word list (:meth:`CharTokenizer.for_languages`).

    If ``out/synth_config.json`` records the same settings and every file of the manifest exists, nothing
    is written. Otherwise all files are (re)written and wavs under ``out/audio`` that the new manifest
    does not list are removed.
    """
    langs, roles = _resolve_languages(languages, tail_languages)
    utterances = _check_count("utterances", utterances)
    if tail_fraction is not None:
        if tail_utterances is not None:
            raise ValueError("synth: give tail_utterances or tail_fraction, not both")
        if isinstance(tail_fraction, bool) or not isinstance(tail_fraction, (int, float)) or not 0.0 < tail_fraction <= 1.0:
            raise ValueError(f"synth: tail_fraction={tail_fraction!r}; expected a number in (0, 1]")
        tail_utterances = max(1, round(tail_fraction * utterances))
    tail_n = _check_count("tail_utterances", max(1, utterances // 10) if tail_utterances is None else tail_utterances)
    eval_n = _check_count("eval_utterances", max(1, utterances // 10) if eval_utterances is None else eval_utterances)
    unlab_n = _check_count("unlabeled", 3 * tail_n if unlabeled is None else unlabeled)
    _check_count("speakers", speakers)
    _check_count("heldout_speakers", heldout_speakers)
    if speakers < 1 or heldout_speakers >= speakers:
        raise ValueError(f"synth: speakers={speakers}, heldout_speakers={heldout_speakers}; expected 0 <= heldout_speakers < speakers")
    if noise_snr is not None:
        lo, hi = (float(v) for v in noise_snr)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"synth: noise_snr={noise_snr!r}; expected (low, high) dB with low <= high")
        noise_snr = (lo, hi)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"synth: workers={workers!r}; expected an integer >= 1")
    lo_w, hi_w = words_per_utterance
    if not (isinstance(lo_w, int) and isinstance(hi_w, int) and 1 <= lo_w <= hi_w):
        raise ValueError(f"synth: words_per_utterance={words_per_utterance!r}; expected (low, high) integers with 1 <= low <= high")
    if vocabulary is not None and (isinstance(vocabulary, bool) or not isinstance(vocabulary, int) or vocabulary < max(hi_w, 2)):
        raise ValueError(f"synth: vocabulary={vocabulary!r}; expected an integer >= {max(hi_w, 2)} (words per list) or None")

    espeak = find_espeak()
    version, voices, installed_variants = espeak_info(espeak)
    for lang in langs:
        if LANGUAGES[lang].voice not in voices:
            raise SynthError(f"espeak-ng {version} at {espeak} has no voice {LANGUAGES[lang].voice!r} for language {lang!r}")
        n_words = len(load_wordlist(lang))  # also fails early on a missing list
        if vocabulary is not None and n_words < vocabulary:
            raise SynthError(f"word list {WORDLIST_DIR / f'{lang}.txt'} has {n_words} words; vocabulary={vocabulary} needs more")
    variants = [v for v in VARIANTS if v in installed_variants]
    if not variants:
        raise SynthError(f"espeak-ng {version} at {espeak} has none of the voice variants in VARIANTS (see `espeak-ng --voices=variant`)")

    counts = {
        "head": {"train": utterances, "dev": eval_n, "test": eval_n},
        "tail": {"train": tail_n, "dev": eval_n, "test": eval_n, "unlabeled": unlab_n},
    }
    if shared_speakers:
        shared = make_shared_speakers(seed, speakers, heldout_speakers, variants)
        speaker_table = {lang: shared for lang in langs}
    else:
        speaker_table = {lang: make_speakers(lang, seed, speakers, heldout_speakers, variants) for lang in langs}
    settings: dict[str, Any] = {
        "generator": "mmadapters.speech.synth",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "sample_rate": SAMPLE_RATE,
        "languages": {c: {**asdict(LANGUAGES[c]), "role": roles[c]} for c in langs},
        "counts_per_language": counts,
        "tail_fraction": tail_fraction,
        "shared_speakers": shared_speakers,
        "noise_snr_db": list(noise_snr) if noise_snr is not None else None,
        "noise_kinds": list(NOISE_KINDS),
        "gain_db": list(GAIN_DB),
        "level_dbfs": LEVEL_DBFS,
        "silence_s": list(SILENCE_S),
        "words_per_sentence": [lo_w, hi_w],
        "vocabulary": vocabulary,
        "word_weights": f"1/(rank + {ZIPF_OFFSET:g})",
        "speaker_rate_wpm": list(SPEAKER_RATE_WPM),
        "speaker_pitch": list(SPEAKER_PITCH),
        "speaker_word_gap": list(SPEAKER_WORD_GAP),
        "rate_jitter": RATE_JITTER,
        "pitch_jitter": PITCH_JITTER,
        "espeak_ng": version,
        "espeak_amplitude": ESPEAK_AMPLITUDE,
        "variants": variants,
        "speakers": {lang: [asdict(s) for s in speaker_table[lang]] for lang in langs},
        "wordlists": {lang: _sha256(WORDLIST_DIR / f"{lang}.txt") for lang in langs},
        "unlabeled_note": "unlabeled.jsonl rows keep the source text for scoring pseudo-labels only; recipes must not train on it",
    }

    root = Path(out)
    if root.exists() and not root.is_dir():
        raise SynthError(f"output {root} exists and is not a directory")
    config_path = root / "synth_config.json"
    manifest_path = root / "manifest.jsonl"
    plans = list(_iter_plans(langs, roles, counts, speaker_table, seed, noise_snr, (lo_w, hi_w), vocabulary))
    if _up_to_date(config_path, settings, root, plans):
        return manifest_path

    root.mkdir(parents=True, exist_ok=True)
    config_path.unlink(missing_ok=True)  # an interrupted run leaves no config, so it is never taken as complete
    from mmadapters.speech.tokenizer import CharTokenizer

    CharTokenizer.for_languages(langs).save(root / "tokenizer")
    for folder in sorted({str(Path(p.path).parent) for p in plans}):
        (root / folder).mkdir(parents=True, exist_ok=True)
    tasks = [(p, espeak, str(root)) for p in plans]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc="synth speech", unit="utt", disable=None)  # off when not a terminal
    lengths: list[int] = []
    try:
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                lengths.append(_render_task(task))
                if bar is not None:
                    bar.update(1)
        else:
            # spawn: workers start clean (no forked torch/OpenMP state); order is kept by imap
            with multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
                for n in pool.imap(_render_task, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers)))):
                    lengths.append(n)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    rows = []
    totals: dict[str, dict[str, dict[str, float]]] = {}
    for plan, n in zip(plans, lengths, strict=True):
        duration = n / SAMPLE_RATE  # the wav's length; JSON writes the shortest digits that read back to it
        row = {"audio_filepath": plan.path, "duration": duration, "text": plan.text, "lang": plan.lang}
        rows.append({**row, "split": plan.split, "speaker": plan.speaker, "snr_db": plan.snr_db})
        t = totals.setdefault(plan.lang, {}).setdefault(plan.split, {"utterances": 0, "seconds": 0.0})
        t["utterances"] += 1
        t["seconds"] = round(t["seconds"] + duration, 6)
    _write_jsonl(manifest_path, rows)
    for split in SPLITS:
        _write_jsonl(root / f"{split}.jsonl", [r for r in rows if r["split"] == split])
    _remove_stale(root, {p.path for p in plans})
    os.sync()  # the wavs reach the disk before the config that declares the run complete
    record = {**settings, "totals": totals, "hours": round(sum(r["duration"] for r in rows) / 3600.0, 4)}
    atomic_write_bytes(config_path, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return manifest_path


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(_json_line(r) + "\n" for r in rows).encode("utf-8"))


def _up_to_date(config_path: Path, settings: dict[str, Any], root: Path, plans: Sequence[UtterancePlan]) -> bool:
    if not config_path.is_file():
        return False
    try:
        old = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(old, dict) or {k: old.get(k) for k in settings} != json.loads(json.dumps(settings)):
        return False
    names = ["manifest.jsonl", "tokenizer/tokenizer.json", *(f"{s}.jsonl" for s in SPLITS), *(p.path for p in plans)]
    return all((root / name).is_file() for name in names)


def _remove_stale(root: Path, keep: set[str]) -> None:
    audio = root / "audio"
    if not audio.is_dir():
        return
    for path in sorted(audio.rglob("*.wav")):
        if path.relative_to(root).as_posix() not in keep:
            path.unlink()


# ------------------------------------------------------------------------------------------------ CLI


def _parse_snr(text: str) -> tuple[float, float] | None:
    if text.strip().lower() in ("none", "off", "clean"):
        return None
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"--noise-snr {text!r}: expected LOW,HIGH in dB (LOW <= HIGH), one value, or 'none'")
    return values[0], values[1]


def _parse_words(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(p) for p in text.split(","))
    except ValueError:
        lo, hi = 0, -1
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"--words-per-utterance {text!r}: expected LOW,HIGH integers with 1 <= LOW <= HIGH")
    return lo, hi


# The defaults of the flags that --foundation changes (generate()'s own defaults).
_PLAIN = {"speakers": 24, "heldout_speakers": 6, "shared_speakers": False, "noise_snr": DEFAULT_NOISE_SNR,
          "words_per_utterance": (MIN_WORDS, MAX_WORDS), "vocabulary": None, "tail_fraction": None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mmadapters.speech.synth",
        description="Generate multilingual speech with espeak-ng: 16 kHz wavs plus NeMo JSONL manifests.",
        epilog=f"Languages: {', '.join(f'{c} ({i.name}, {i.script}, {i.role})' for c, i in LANGUAGES.items())}. "
        "unlabeled.jsonl keeps the source text for scoring only: recipes must not train on it.",
    )
    parser.add_argument("--languages", default=",".join(DEFAULT_LANGUAGES), help="comma-separated codes (default: the 12 head+tail)")
    parser.add_argument("--utterances", type=int, default=200, help="train utterances per head language (default 200)")
    parser.add_argument("--tail-utterances", type=int, default=None, help="train utterances per tail language (default utterances // 10)")
    parser.add_argument("--tail-fraction", type=float, default=None,
                        help=f"tail train utterances = this x --utterances (--foundation: {DEFAULT_TAIL_FRACTION})")
    parser.add_argument("--eval-utterances", type=int, default=None, help="dev and test utterances per language (default utterances // 10)")
    parser.add_argument("--unlabeled", type=int, default=None, help="unlabeled utterances per tail language (default 3 x tail utterances)")
    parser.add_argument("--tail-languages", default=None, help="which of --languages are tail (default: the table's roles)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--speakers", type=int, default=None, help="synthetic speakers per language (default 24; --foundation: 10)")
    parser.add_argument("--heldout-speakers", type=int, default=None,
                        help="of those, speakers used only for dev/test (default 6; --foundation: 2)")
    parser.add_argument("--shared-speakers", action="store_true", default=None,
                        help="the same speakers (distinct voice variants) in every language (--foundation: on)")
    parser.add_argument("--noise-snr", type=_parse_snr, default=None,
                        help="SNR range LOW,HIGH dB, or 'none' (default 15,35; --foundation: 25,40)")
    parser.add_argument("--words-per-utterance", type=_parse_words, default=None,
                        help="LOW,HIGH words per sentence (default 3,7; --foundation: 2,5)")
    parser.add_argument("--vocabulary", type=int, default=None,
                        help="draw words from the first N of each word list (default: all 2500; --foundation: 400)")
    parser.add_argument("--foundation", action="store_true",
                        help="the foundation's pretraining data (issue 20): every flag left unset takes the FOUNDATION preset: "
                        "--tail-fraction 0.12 --words-per-utterance 2,5 --vocabulary 400 --speakers 10 --heldout-speakers 2 "
                        "--shared-speakers --noise-snr 25,40")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2); the output does not depend on it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with a one-line message on a usage or environment error)."""
    args = build_parser().parse_args(argv)
    preset = dict(FOUNDATION if args.foundation else _PLAIN)
    if args.tail_utterances is not None:
        preset["tail_fraction"] = None  # an explicit count wins over the preset's fraction
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        manifest = generate(
            args.out,
            args.languages,
            utterances=args.utterances,
            tail_utterances=args.tail_utterances,
            tail_fraction=args.tail_fraction,
            eval_utterances=args.eval_utterances,
            unlabeled=args.unlabeled,
            tail_languages=args.tail_languages,
            seed=args.seed,
            speakers=args.speakers,
            heldout_speakers=args.heldout_speakers,
            noise_snr=args.noise_snr,
            words_per_utterance=args.words_per_utterance,
            vocabulary=args.vocabulary,
            shared_speakers=args.shared_speakers,
            workers=args.workers,
            progress=not args.quiet,
        )
    except (SynthError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = json.loads((manifest.parent / "synth_config.json").read_text(encoding="utf-8"))
    n = sum(t["utterances"] for per_lang in config["totals"].values() for t in per_lang.values())
    print(f"wrote {n} utterances ({config['hours']:.2f} h) in {len(config['languages'])} languages: {manifest}")
    return 0


if __name__ == "__main__":
    # run the functions from the importable module, so spawned workers find them under their real name
    from mmadapters.speech import synth as _synth

    raise SystemExit(_synth.main())
