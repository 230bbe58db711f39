"""Annotation readers for the video benchmarks: SUTD-TrafficQA (VideoQA) and DFEW / MAFW / FERV39k (DFER).

Each reader returns a list of frozen dataclass rows and raises :class:`AnnotationError` (a ``ValueError``)
naming the file, the line and the field on malformed input. Media paths are resolved against a root
folder and may not leave it (``..``, absolute paths elsewhere, symlinks pointing out).

**SUTD-TrafficQA** (:func:`read_trafficqa`), JSON lines in either layout:

- the official one: the first line is the header list ``["record_id", "vid_id", "vid_filename",
  "perspective", "q_body", "q_type", "option0", "option1", "option2", "option3", "answer"]`` and every
  other line a JSON list in that order (a file without the header is read in the same column order);
  unused options are empty strings;
- objects: ``{"vid_id", "vid_filename", "question" | "q_body", "options": [...] | "option0".."option3",
  "answer", ["record_id", "q_type", "perspective"]}``.

``python -m mmadapters.video.synth trafficqa`` writes the official layout (``annotations/R2_{all,train,test}.jsonl``).

**DFEW / MAFW / FERV39k** (:func:`read_dfer_annotation`): fold files of
``<face_frame_dir> <num_frames> <label>`` lines (DFEW and FERV39k 7 classes, MAFW 11; DFEW and MAFW in 5
folds ``{DFEW,MAFW}_set_{1..5}_{train,test}.txt``, FERV39k one split ``FERV39K_{train,test}.txt``).
Labels are 1..C as the datasets number them (``label_base=1``, the default); the lists DFER-CLIP
publishes feed the label straight into a C-way cross-entropy, i.e. 0..C-1: read those with ``label_base=0``.
FERV39k's own split files (``Action/Sad/0010 Sad``: a clip folder and a
class name) are read too. Labels are stored 0-based (``label``) next to the file's value (``raw_label``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

TRAFFICQA_HEADER = ("record_id", "vid_id", "vid_filename", "perspective", "q_body", "q_type",
                    "option0", "option1", "option2", "option3", "answer")
TRAFFICQA_NUM_OPTIONS = 4

# label order of the DFER-CLIP annotation files (label i+1 is class i)
DFEW_CLASSES = ("happiness", "sadness", "neutral", "anger", "surprise", "disgust", "fear")
FERV39K_CLASSES = DFEW_CLASSES
MAFW_CLASSES = DFEW_CLASSES + ("contempt", "anxiety", "helplessness", "disappointment")
DFER_DATASETS = {"dfew": DFEW_CLASSES, "mafw": MAFW_CLASSES, "ferv39k": FERV39K_CLASSES}
DFER_FOLDS = {"dfew": 5, "mafw": 5, "ferv39k": 0}
# FERV39k's own split files name the class; its folder names are capitalized adjectives
_FERV39K_NAMES = {"happy": 0, "sad": 1, "neutral": 2, "angry": 3, "surprise": 4, "disgust": 5, "fear": 6}


class AnnotationError(ValueError):
    """A malformed annotation file: the message names the file, the line and the field."""


@dataclass(frozen=True)
class TrafficQARow:
    """One multiple-choice question about one video."""

    vid_id: int | str
    vid_filename: str
    question: str
    options: tuple[str, ...]  # always 4; unused options are ""
    answer: int  # index into options
    record_id: int | str | None = None
    q_type: str | None = None
    perspective: int | None = None
    line: int = 0  # line number in the annotation file (1-based)

    @property
    def num_options(self) -> int:
        """How many options are real (non-empty)."""
        return sum(1 for o in self.options if o.strip())

    @property
    def option_mask(self) -> tuple[bool, ...]:
        return tuple(bool(o.strip()) for o in self.options)


@dataclass(frozen=True)
class DferAnnotation:
    """One clip of a DFER annotation file: a folder of face frames, its frame count and its class."""

    frame_dir: Path  # resolved, inside the root
    num_frames: int  # as annotated (0 for FERV39k's own split files, which do not count frames)
    label: int  # 0-based
    raw_label: str  # the file's value ("3", "Sad")
    line: int = 0


def resolve_inside(root: str | os.PathLike, relative: str, where: str) -> Path:
    """``root / relative`` resolved; an :class:`AnnotationError` when it leaves ``root``."""
    if not relative or not relative.strip():
        raise AnnotationError(f"{where}: empty path")
    if "\x00" in relative:
        raise AnnotationError(f"{where}: path {relative!r} contains a NUL byte; expected a file path")
    root = Path(root).resolve()
    try:
        path = (root / relative).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise AnnotationError(f"{where}: path {relative!r} cannot be resolved ({e})") from None
    if not path.is_relative_to(root):
        raise AnnotationError(f"{where}: path {relative!r} escapes the root {root}")
    return path


# ------------------------------------------------------------------------------------------ SUTD-TrafficQA


def read_trafficqa(path: str | os.PathLike, *, video_root: str | os.PathLike | None = None) -> list[TrafficQARow]:
    """Rows of a SUTD-TrafficQA ``.jsonl`` (official list layout or object layout, see the module docstring).

    With ``video_root`` every ``vid_filename`` is checked to stay inside it (the file need not exist:
    a missing video is the loader's concern, counted as skipped).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SUTD-TrafficQA annotation file not found: {path}")
    rows: list[TrafficQARow] = []
    columns: tuple[str, ...] = TRAFFICQA_HEADER
    for number, text in _lines(path):
        if not text.strip():
            continue
        where = f"{path}: line {number}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{where}: not valid JSON ({e.msg})") from e
        except (ValueError, RecursionError) as e:  # nested too deeply, an integer of > 4300 digits
            raise AnnotationError(f"{where}: not valid JSON ({type(e).__name__}: {e})") from None
        if isinstance(record, list) and record and all(isinstance(v, str) for v in record) and "answer" in record:
            missing = [c for c in ("vid_id", "vid_filename", "q_body", "answer") if c not in record]
            if missing:
                raise AnnotationError(f"{where}: header line lacks columns {missing}")
            columns = tuple(record)
            continue
        if isinstance(record, list):
            if len(record) != len(columns):
                raise AnnotationError(f"{where}: expected a list of {len(columns)} values ({', '.join(columns)}), "
                                      f"got {len(record)}")
            record = dict(zip(columns, record, strict=True))
        elif not isinstance(record, dict):
            raise AnnotationError(f"{where}: expected a JSON list or object, got {type(record).__name__}")
        rows.append(_trafficqa_row(record, where, number))
    if video_root is not None:
        for row in rows:
            resolve_inside(video_root, row.vid_filename, f"{path}: line {row.line} field 'vid_filename'")
    return rows


def _lines(path: Path) -> list[tuple[int, str]]:
    """(1-based number, text) of the lines of a UTF-8 file; another encoding raises naming the line."""
    out = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                out.append((number, raw.decode("utf-8")))
            except UnicodeDecodeError as e:
                raise AnnotationError(f"{path}: line {number}: not UTF-8 text ({e})") from None
    return out


def trafficqa_video_path(row: TrafficQARow, video_root: str | os.PathLike) -> Path:
    """The video file of ``row`` under ``video_root`` (never outside it)."""
    return resolve_inside(video_root, row.vid_filename, f"line {row.line} field 'vid_filename'")


def _trafficqa_row(record: dict, where: str, number: int) -> TrafficQARow:
    def field_(name: str, kinds: tuple[type, ...], *alternatives: str):
        for key in (name, *alternatives):
            if key in record:
                value = record[key]
                if not isinstance(value, kinds) or isinstance(value, bool):
                    raise AnnotationError(f"{where} field {key!r}: expected {' or '.join(k.__name__ for k in kinds)}, "
                                          f"got {value!r}")
                return value
        raise AnnotationError(f"{where}: missing field {name!r}")

    vid_id = field_("vid_id", (int, str))
    filename = field_("vid_filename", (str,))
    question = field_("question", (str,), "q_body")
    if "options" in record:
        options = record["options"]
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise AnnotationError(f"{where} field 'options': expected a list of strings, got {options!r}")
    else:
        options = [field_(f"option{i}", (str,)) for i in range(TRAFFICQA_NUM_OPTIONS)]
    if not 2 <= len(options) <= TRAFFICQA_NUM_OPTIONS:
        raise AnnotationError(f"{where} field 'options': expected 2..{TRAFFICQA_NUM_OPTIONS} options, got {len(options)}")
    options = list(options) + [""] * (TRAFFICQA_NUM_OPTIONS - len(options))
    answer = field_("answer", (int,))
    if not 0 <= answer < TRAFFICQA_NUM_OPTIONS or not options[answer].strip():
        raise AnnotationError(f"{where} field 'answer': {answer} does not index a non-empty option "
                              f"(options {options})")
    perspective = record.get("perspective")
    if perspective is not None and (not isinstance(perspective, int) or isinstance(perspective, bool)):
        raise AnnotationError(f"{where} field 'perspective': expected an int (1 or 3), got {perspective!r}")
    q_type = record.get("q_type")
    if q_type is not None and not isinstance(q_type, str):
        raise AnnotationError(f"{where} field 'q_type': expected a string, got {q_type!r}")
    return TrafficQARow(vid_id=vid_id, vid_filename=filename, question=question, options=tuple(options), answer=answer,
                        record_id=record.get("record_id"), q_type=q_type, perspective=perspective, line=number)


# ------------------------------------------------------------------------------------ DFEW / MAFW / FERV39k


def dfer_annotation_path(dataset: str, annotation_dir: str | os.PathLike, split: str, fold: int | None = None) -> Path:
    """The DFER-CLIP file name of a split: ``DFEW_set_{fold}_{split}.txt``, ``MAFW_set_...``, ``FERV39K_{split}.txt``."""
    key = _dataset_key(dataset)
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r}: expected 'train' or 'test'")
    if DFER_FOLDS[key]:
        if fold is None or not 1 <= fold <= DFER_FOLDS[key]:
            raise ValueError(f"{dataset}: fold {fold!r}: expected 1..{DFER_FOLDS[key]}")
        name = f"{key.upper()}_set_{fold}_{split}.txt"
    else:
        if fold not in (None, 1):
            raise ValueError(f"{dataset} has one split, no folds (got fold {fold})")
        name = f"FERV39K_{split}.txt"
    return Path(annotation_dir) / name


def read_dfer_annotation(path: str | os.PathLike, dataset: str, *, root: str | os.PathLike | None = None,
                         strip_prefix: str | None = None, label_base: int = 1) -> list[DferAnnotation]:
    """Clips of a DFEW / MAFW / FERV39k annotation file (see the module docstring for the formats).

    Frame folders are resolved against ``root`` (default: the annotation file's folder) and must stay
    inside it. The published files carry their authors' absolute paths
    (``/data/.../DFEW/Clip/clip_224x224/00001``): pass ``strip_prefix`` (that leading part) to read them
    relative to ``root``. ``label_base``: the number of the first class in the file (1, or 0 for DFER-CLIP's lists).
    """
    if label_base not in (0, 1):
        raise ValueError(f"label_base={label_base!r}: expected 1 (labels 1..C) or 0 (labels 0..C-1)")
    first, last = label_base, label_base + len(DFER_DATASETS[_dataset_key(dataset)]) - 1
    key = _dataset_key(dataset)
    classes = DFER_DATASETS[key]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{dataset} annotation file not found: {path}")
    root = Path(root) if root is not None else path.parent
    clips: list[DferAnnotation] = []
    for number, text in _lines(path):
        parts = text.split()
        if not parts:
            continue
        where = f"{path}: line {number}"
        if len(parts) == 3:
            folder, count, raw = parts
            try:
                num_frames = int(count)
            except ValueError:
                raise AnnotationError(f"{where} field 'num_frames': expected an integer, got {count!r}") from None
            if num_frames < 1:
                raise AnnotationError(f"{where} field 'num_frames': expected >= 1, got {num_frames}")
            try:
                label = int(raw) - label_base
            except ValueError:
                raise AnnotationError(f"{where} field 'label': expected an integer {first}..{last}, "
                                      f"got {raw!r}") from None
            if not 0 <= label < len(classes):
                raise AnnotationError(f"{where} field 'label': expected {first}..{last} ({key}, label_base="
                                      f"{label_base}), got {raw}")
        elif len(parts) == 2 and key == "ferv39k":
            folder, raw = parts
            num_frames = 0  # FERV39k's own lists do not count frames
            label = _FERV39K_NAMES.get(raw.lower(), -1)
            if label < 0:
                raise AnnotationError(f"{where} field 'label': expected one of {sorted(_FERV39K_NAMES)}, got {raw!r}")
        else:
            expected = "'<frame_dir> <num_frames> <label>'" + (" or '<clip_dir> <Emotion>'" if key == "ferv39k" else "")
            raise AnnotationError(f"{where}: expected {expected}, got {len(parts)} fields")
        clips.append(DferAnnotation(_frame_dir(root, folder, strip_prefix, f"{where} field 'frame_dir'"),
                              num_frames, label, raw, number))
    if not clips:
        raise AnnotationError(f"{path}: no clips")
    return clips


def _frame_dir(root: Path, folder: str, strip_prefix: str | None, where: str) -> Path:
    if strip_prefix and folder.startswith(strip_prefix):
        folder = folder[len(strip_prefix):].lstrip("/\\")
        if not folder:
            raise AnnotationError(f"{where}: nothing left after stripping {strip_prefix!r}")
    elif os.path.isabs(folder):
        if "\x00" in folder:
            raise AnnotationError(f"{where}: path {folder!r} contains a NUL byte; expected a folder path")
        try:
            resolved = Path(folder).resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
            raise AnnotationError(f"{where}: path {folder!r} cannot be resolved ({e})") from None
        if not resolved.is_relative_to(Path(root).resolve()):
            raise AnnotationError(f"{where}: absolute path {folder!r} is outside the root {root}; pass strip_prefix "
                                  "(the leading part to drop) to read it relative to the root")
        return resolved
    return resolve_inside(root, folder, where)


def _dataset_key(dataset: str) -> str:
    key = dataset.lower().replace("-", "")
    if key not in DFER_DATASETS:
        raise ValueError(f"dataset {dataset!r}: expected one of dfew, mafw, ferv39k")
    return key
