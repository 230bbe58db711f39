"""Speech corpora on disk → :class:`Utterance` lists, and lazy audio loading that skips bad files.

Formats:

- **NeMo manifest** (JSON lines): ``{"audio_filepath", "text", "lang", "duration"}`` per line; extra keys
  are allowed (``id`` and ``speaker`` are used when present). Relative paths are relative to the
  manifest's folder (its *root*).
- **Common Voice**: ``root/{train,dev,test}.tsv`` (columns ``client_id, path, sentence, …, locale``) with the
  audio in ``root/clips/``; ``root/clip_durations.tsv`` (``clip``, ``duration[ms]``) is used when present.
- **Multilingual LibriSpeech**: ``root/<split>/transcripts.txt`` (``<spk>_<book>_<utt>`` TAB text) with the
  audio in ``root/<split>/audio/<spk>/<book>/<id>.flac`` (or ``.opus``, MLS's compressed release).

Audio paths never leave the dataset's root: after resolving ``..`` and symbolic links, a path outside it
is refused (:class:`PathEscapeError`) unless ``allow_absolute=True``. Format errors
(:class:`SpeechDataError`) name the file, the line and the field.

:class:`AsrDataset` and :func:`iter_audio_batches` load the audio lazily; a file that fails
:func:`~mmadapters.speech.audio.load_audio`'s checks becomes a :class:`Skipped` item (with the reason)
instead of an exception, unless ``fail_fast``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .audio import DEFAULT_MAX_SECONDS, SAMPLE_RATE, AudioError, load_audio

COMMON_VOICE_SPLITS = ("train", "dev", "test")
MANIFEST_SUFFIXES = (".jsonl", ".json")


class SpeechDataError(ValueError):
    """A dataset file that does not follow its format; the message names the file, line and field."""


class PathEscapeError(SpeechDataError):
    """An audio path that resolves outside the dataset's root (and absolute paths were not allowed)."""


@dataclass(frozen=True)
class Utterance:
    """One utterance: ``audio_path`` is absolute and resolved; ``duration`` in seconds when known."""

    id: str
    audio_path: str
    text: str
    lang: str
    duration: float | None = None
    speaker: str | None = None


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def resolve_audio_path(value: str, root: Path, *, source: Path, line: int | None, field: str,
                       allow_absolute: bool = False) -> str:
    """``value`` (relative to ``root``, or absolute) as a resolved absolute path inside ``root``.

    ``..`` components and symbolic links are resolved first, so neither can leave ``root``; with
    ``allow_absolute`` any path is accepted. Raises :class:`PathEscapeError` naming ``source:line``."""
    where = _where(source, line)
    if not value.strip():
        raise SpeechDataError(f"{where}: field {field!r} is empty; expected an audio file path")
    if "\x00" in value:
        raise SpeechDataError(f"{where}: field {field!r} contains a NUL byte; expected an audio file path")
    raw = Path(value)
    try:
        resolved = (raw if raw.is_absolute() else root / raw).resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise SpeechDataError(f"{where}: field {field!r} = {value!r} cannot be resolved ({err}); expected an audio "
                              "file path") from None
    if allow_absolute:
        return str(resolved)
    root_resolved = root.resolve()
    if not resolved.is_relative_to(root_resolved):
        how = "is absolute and lies" if raw.is_absolute() else "resolves (after '..' and symbolic links)"
        raise PathEscapeError(f"{where}: field {field!r} = {value!r} {how} outside the dataset root {root_resolved} "
                              f"(-> {resolved}); expected a path inside it — pass allow_absolute=True "
                              "(--allow-absolute) if you trust this file")
    return str(resolved)


# -- NeMo JSON-lines manifests -------------------------------------------------------------------------------

def _kind_name(kind) -> str:
    if kind == "number":
        return "a non-negative number"
    return "a " + " or ".join(t.__name__ for t in getattr(kind, "__args__", (kind,)))


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _field(obj: dict, key: str, kind, where: str, *, required: bool = True, default=None):
    if key not in obj or obj[key] is None:
        if required:
            raise SpeechDataError(f"{where}: missing field {key!r}; expected {_kind_name(kind)}")
        return default
    value = obj[key]
    if kind == "number":
        try:  # float() of a 400-digit JSON integer overflows
            seconds = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds) or seconds < 0:
            raise SpeechDataError(f"{where}: field {key!r} = {_short(value)}; expected a non-negative number of seconds")
        return seconds
    if not isinstance(value, kind):
        raise SpeechDataError(f"{where}: field {key!r} is {type(value).__name__} ({_short(value)}); expected {_kind_name(kind)}")
    return value


def read_manifest(path: str | os.PathLike, *, allow_absolute: bool = False, root: str | os.PathLike | None = None,
                  lang: str | None = None) -> list[Utterance]:
    """Read a NeMo JSON-lines manifest.

    ``root``: what relative ``audio_filepath`` values are relative to and may not leave (default: the
    manifest's folder). ``lang``: the language of lines without a ``lang`` key (without it such a line is
    an error). Blank lines are skipped. The id is the line's ``id`` key, else the audio path relative to
    ``root`` without its suffix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    base = Path(root) if root is not None else path.parent
    base_resolved = base.resolve()
    out: list[Utterance] = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise SpeechDataError(f"{path}: not UTF-8 text ({e}); expected a JSON-lines manifest") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = _where(path, lineno)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpeechDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected one JSON object "
                                  "per line") from None
        except (ValueError, RecursionError) as e:  # nested too deeply, an integer of > 4300 digits
            raise SpeechDataError(f"{where}: invalid JSON ({type(e).__name__}: {e}); expected one JSON object per "
                                  "line") from None
        if not isinstance(obj, dict):
            raise SpeechDataError(f"{where}: a JSON {type(obj).__name__}; expected an object with audio_filepath, "
                                  "text, lang")
        audio = _field(obj, "audio_filepath", str, where)
        text = _field(obj, "text", str, where)
        utt_lang = _field(obj, "lang", str, where, required=lang is None, default=lang)
        if not utt_lang.strip():
            raise SpeechDataError(f"{where}: field 'lang' is empty; expected a language code")
        duration = _field(obj, "duration", "number", where, required=False)
        speaker = _field(obj, "speaker", str | int, where, required=False)
        audio_path = resolve_audio_path(audio, base, source=path, line=lineno, field="audio_filepath",
                                        allow_absolute=allow_absolute)
        utt_id = _field(obj, "id", str | int, where, required=False)
        if utt_id is None:
            rel = Path(audio_path)
            rel = rel.relative_to(base_resolved) if rel.is_relative_to(base_resolved) else Path(rel.name)
            utt_id = rel.with_suffix("").as_posix()
        out.append(Utterance(id=str(utt_id), audio_path=audio_path, text=text, lang=utt_lang, duration=duration,
                             speaker=None if speaker is None else str(speaker)))
    return out


def write_manifest(path: str | os.PathLike, utterances: Iterable[Utterance], *, allow_absolute: bool = False) -> Path:
    """Write ``utterances`` as a NeMo manifest at ``path`` (atomically), audio paths relative to its folder.

    An audio file outside that folder has no relative path that :func:`read_manifest` accepts: it raises
    :class:`PathEscapeError` unless ``allow_absolute``, which writes such paths absolute (read them back
    with ``allow_absolute=True``). Returns ``path``."""
    from mmadapters.io import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.parent.resolve()
    lines = []
    for i, u in enumerate(utterances):
        if not isinstance(u, Utterance):
            raise TypeError(f"write_manifest: utterances[{i}] is {type(u).__name__}; expected an Utterance")
        audio = Path(u.audio_path).resolve()
        if audio.is_relative_to(root):
            audio_field = audio.relative_to(root).as_posix()
        elif allow_absolute:
            audio_field = str(audio)
        else:
            raise PathEscapeError(f"{path}: utterance {u.id!r} has audio {audio} outside the manifest's folder {root}; "
                                  "expected audio under it — pass allow_absolute=True to write absolute paths")
        obj = {"audio_filepath": audio_field, "duration": u.duration, "text": u.text, "lang": u.lang, "id": u.id}
        if u.speaker is not None:
            obj["speaker"] = u.speaker
        lines.append(json.dumps(obj, ensure_ascii=False))
    atomic_write_bytes(path, ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))
    return path


# -- Common Voice ------------------------------------------------------------------------------------------

def _tsv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a tab-separated file with a header; quotes are literal (Common Voice style)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = next(reader)
        except StopIteration:
            raise SpeechDataError(f"{path}: empty file; expected a header line of tab-separated column names") from None
        except UnicodeDecodeError as e:
            raise SpeechDataError(f"{path}: not UTF-8 text ({e})") from None
        except csv.Error as e:
            raise SpeechDataError(f"{path}:1: not a readable TSV header ({e})") from None
        header = [h.strip() for h in header]
        try:
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise SpeechDataError(f"{path}:{reader.line_num}: {len(row)} tab-separated fields; expected "
                                          f"{len(header)} (the header's columns: {', '.join(header)})")
                yield reader.line_num, dict(zip(header, row, strict=True))
        except UnicodeDecodeError as e:
            raise SpeechDataError(f"{path}:{reader.line_num + 1}: not UTF-8 text ({e})") from None
        except csv.Error as e:  # e.g. a field longer than csv's field size limit
            raise SpeechDataError(f"{path}:{reader.line_num}: not readable TSV ({e})") from None


def _tsv_header(path: Path) -> list[str]:
    with open(path, "rb") as f:
        first = f.readline()  # bytes: decoding only this line, so a bad byte further down is reported at its line
    try:
        return [h.strip() for h in first.decode("utf-8").rstrip("\r\n").split("\t")]
    except UnicodeDecodeError as e:
        raise SpeechDataError(f"{path}:1: not UTF-8 text ({e}); expected a header of tab-separated column names") from None


def _clip_durations(root: Path) -> dict[str, float]:
    path = root / "clip_durations.tsv"
    if not path.is_file():
        return {}
    out = {}
    for lineno, row in _tsv_rows(path):
        if "clip" not in row or "duration[ms]" not in row:
            raise SpeechDataError(f"{path}: missing column 'clip' or 'duration[ms]'; expected both")
        try:
            out[row["clip"]] = float(row["duration[ms]"]) / 1000.0
        except ValueError:
            raise SpeechDataError(f"{path}:{lineno}: field 'duration[ms]' = {row['duration[ms]']!r}; expected a number") from None
    return out


def read_common_voice(root: str | os.PathLike, split: str, *, lang: str | None = None,
                      allow_absolute: bool = False) -> list[Utterance]:
    """Read a Common Voice split: ``root/<split>.tsv`` with the clips in ``root/clips/``.

    ``lang``: the language code to give every utterance (a Common Voice folder holds one language, and its
    locale, e.g. ``zh-CN``, may differ from a model's codes); None: each row's ``locale`` column. The id is
    the clip's file name without suffix; the speaker is ``client_id``."""
    root = Path(root)
    tsv = root / f"{split}.tsv"
    if not tsv.is_file():
        found = sorted(p.stem for p in root.glob("*.tsv")) if root.is_dir() else []
        raise FileNotFoundError(f"{tsv}: Common Voice split {split!r} not found; expected {{train,dev,test}}.tsv in "
                                f"{root}" + (f" (found: {', '.join(found)})" if found else ""))
    header = _tsv_header(tsv)
    for column in ("path", "sentence"):
        if column not in header:
            raise SpeechDataError(f"{tsv}:1: missing column {column!r}; expected client_id, path, sentence, …, locale")
    if lang is None and "locale" not in header:
        raise SpeechDataError(f"{tsv}:1: missing column 'locale' and no lang given; expected a locale column or "
                              "lang=<code>")
    durations = _clip_durations(root)
    clips = root / "clips"
    out = []
    for lineno, row in _tsv_rows(tsv):
        where = f"{tsv}:{lineno}"
        utt_lang = lang if lang is not None else row["locale"].strip()
        if not utt_lang:
            raise SpeechDataError(f"{where}: field 'locale' is empty; expected a language code (or pass lang=)")
        audio_path = resolve_audio_path(row["path"], clips, source=tsv, line=lineno, field="path",
                                        allow_absolute=allow_absolute)
        out.append(Utterance(id=Path(row["path"]).stem, audio_path=audio_path, text=row["sentence"], lang=utt_lang,
                             duration=durations.get(row["path"]), speaker=row.get("client_id") or None))
    return out


# -- Multilingual LibriSpeech ------------------------------------------------------------------------------

def read_mls(root: str | os.PathLike, split: str, *, lang: str, allow_absolute: bool = False) -> list[Utterance]:
    """Read a Multilingual LibriSpeech split: ``root/<split>/transcripts.txt`` + ``audio/<spk>/<book>/<id>.flac``.

    ``lang``: the language code of the corpus (MLS has one language per release folder). Audio in ``.opus``
    (MLS's compressed release) is used where no ``.flac`` exists."""
    if not isinstance(lang, str) or not lang.strip():
        raise ValueError(f"read_mls: lang={lang!r}; expected the corpus's language code (MLS folders hold one language)")
    split_dir = Path(root) / split
    transcripts = split_dir / "transcripts.txt"
    if not transcripts.is_file():
        raise FileNotFoundError(f"{transcripts}: MLS transcripts not found; expected <root>/<split>/transcripts.txt "
                                "(id<TAB>text per line)")
    audio_root = split_dir / "audio"
    out = []
    with open(transcripts, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise SpeechDataError(f"{transcripts}: not UTF-8 text ({e})") from None
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        where = f"{transcripts}:{lineno}"
        if "\t" not in line:
            raise SpeechDataError(f"{where}: no TAB; expected <speaker>_<book>_<utterance><TAB><text>")
        utt_id, text = line.split("\t", 1)
        parts = utt_id.split("_")
        if len(parts) != 3 or not all(parts):
            raise SpeechDataError(f"{where}: id {utt_id!r} is not <speaker>_<book>_<utterance>")
        spk, book, _ = parts
        rel = f"{spk}/{book}/{utt_id}.flac"
        if not (audio_root / rel).exists() and (audio_root / rel).with_suffix(".opus").exists():
            rel = rel[:-len(".flac")] + ".opus"
        audio_path = resolve_audio_path(rel, audio_root, source=transcripts, line=lineno, field="id",
                                        allow_absolute=allow_absolute)
        out.append(Utterance(id=utt_id, audio_path=audio_path, text=text.strip(), lang=lang, speaker=spk))
    return out


# -- dispatch ------------------------------------------------------------------------------------------------

def read_speech_dataset(path: str | os.PathLike, *, split: str = "test", lang: str | None = None,
                        allow_absolute: bool = False) -> list[Utterance]:
    """Read whatever ``path`` is: a manifest file (``.jsonl``/``.json``), or a folder holding a Common Voice
    split (``<split>.tsv`` + ``clips/``), an MLS split (``<split>/transcripts.txt``) or a manifest
    (``<split>.jsonl``, else ``manifest.jsonl``). ``lang``: see the format's reader (required for MLS)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise SpeechDataError(f"{path}: unknown dataset file; expected a NeMo manifest (.jsonl) or a folder "
                                  "(Common Voice, MLS)")
        return read_manifest(path, allow_absolute=allow_absolute, lang=lang)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: speech dataset not found; expected a manifest file or a dataset folder")
    if (path / f"{split}.tsv").is_file() and (path / "clips").is_dir():
        return read_common_voice(path, split, lang=lang, allow_absolute=allow_absolute)
    if (path / split / "transcripts.txt").is_file():
        if lang is None:
            raise ValueError(f"{path}: an MLS corpus; pass lang=<code> (--lang) to name its language")
        return read_mls(path, split, lang=lang, allow_absolute=allow_absolute)
    for name in (f"{split}.jsonl", "manifest.jsonl"):
        if (path / name).is_file():
            return read_manifest(path / name, allow_absolute=allow_absolute, lang=lang)
    raise SpeechDataError(f"{path}: no known speech dataset layout for split {split!r}; expected {split}.tsv + clips/ "
                          f"(Common Voice), {split}/transcripts.txt (MLS), or {split}.jsonl / manifest.jsonl (NeMo)")


# -- lazy audio --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Skipped:
    """An utterance whose audio could not be used: ``kind`` as :class:`AudioError`'s, ``reason`` its message."""

    utterance: Utterance
    kind: str
    reason: str


@dataclass
class AudioBatch:
    """Loaded utterances: ``waves`` (B, S) zero-padded float32, ``lengths`` (B,) long; ``skipped``: the
    batch's utterances that failed to load (not in ``waves``). B may be 0 when all were skipped."""

    utterances: list[Utterance]
    waves: torch.Tensor
    lengths: torch.Tensor
    skipped: list[Skipped]

    @property
    def seconds(self) -> float:
        return float(self.lengths.sum().item()) / SAMPLE_RATE


class AsrDataset(torch.utils.data.Dataset):
    """Utterances with their audio loaded on access: item ``i`` is ``(utterance, wave (S,))`` or a
    :class:`Skipped` (``fail_fast``: the :class:`AudioError` is raised instead)."""

    def __init__(self, utterances: Sequence[Utterance], *, sample_rate: int = SAMPLE_RATE,
                 max_seconds: float | None = DEFAULT_MAX_SECONDS, mono: str = "error", fail_fast: bool = False):
        self.utterances = list(utterances)
        self.sample_rate, self.max_seconds, self.mono, self.fail_fast = sample_rate, max_seconds, mono, fail_fast

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, i: int) -> tuple[Utterance, torch.Tensor] | Skipped:
        utt = self.utterances[i]
        try:
            return utt, load_audio(utt.audio_path, sample_rate=self.sample_rate, max_seconds=self.max_seconds, mono=self.mono)
        except AudioError as err:
            if self.fail_fast:
                raise
            return Skipped(utt, err.kind, str(err))


def collate_audio(items: Sequence[tuple[Utterance, torch.Tensor] | Skipped]) -> AudioBatch:
    """Pad the loaded items of a batch to ``(B, S_max)``; keep the skipped ones aside."""
    loaded = [it for it in items if not isinstance(it, Skipped)]
    skipped = [it for it in items if isinstance(it, Skipped)]
    lengths = torch.tensor([w.shape[0] for _, w in loaded], dtype=torch.long)
    waves = torch.zeros(len(loaded), int(lengths.max()) if loaded else 0)
    for row, (_, w) in enumerate(loaded):
        waves[row, :w.shape[0]] = w
    return AudioBatch([u for u, _ in loaded], waves, lengths, skipped)


def iter_audio_batches(utterances: Sequence[Utterance], batch_size: int, *, sample_rate: int = SAMPLE_RATE,
                       max_seconds: float | None = DEFAULT_MAX_SECONDS, mono: str = "error", fail_fast: bool = False,
                       num_workers: int = 0) -> Iterator[AudioBatch]:
    """Batches of ``batch_size`` utterances in order (fewer loaded where some were skipped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    dataset = AsrDataset(utterances, sample_rate=sample_rate, max_seconds=max_seconds, mono=mono, fail_fast=fail_fast)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate_audio)
    yield from loader
