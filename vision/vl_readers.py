"""Vision-language annotation readers (VQAv2, GQA, NLVR2, COCO captions) and per-image feature sources.

Leaf module: torch, numpy, and (inside the classes that need them) h5py, safetensors and PIL.

Every reader returns a :class:`VLSplit` — a list of :class:`VLSample` with ``.path`` (the file read),
``.task`` and ``.skipped``. A malformed row raises ``ValueError`` naming the file, the row (``row i``:
0-based position in a JSON list; ``line n``: 1-based line of a JSON-lines file) and the field; with
``on_error="skip"`` the row is left out and recorded in ``.skipped`` as ``(i or n, message)``.
Problems with the whole file (missing, not JSON, empty, no rows, wrong top-level type) always raise.
Duplicate uids within a file are row errors.

Formats (those VL-T5 / VL-Adapter train on):

- :func:`read_vqa`: VQAv2 Karpathy-split JSON, a list of ``{img_id, sent, question_id, label:
  {answer: score}, answer_type, question_type, answers?}``. ``targets`` are the label's answers by
  decreasing score (empty when the label is empty or absent, as for test-server splits);
  ``answers`` holds the human answers when the row has them (a list of strings or of
  ``{"answer": ...}`` dicts) for :func:`~mmadapters.eval.metrics.vqa_accuracy`; without them, score
  with :func:`~mmadapters.eval.metrics.vqa_score_from_label` on ``label`` as VL-T5 does.
- :func:`read_gqa`: VL-T5's GQA JSON, a list of ``{img_id, sent, question_id, label}``; ``label`` is
  ``{answer: score}`` (or a bare answer string); ``targets`` = ``[best answer]``.
- :func:`read_nlvr2`: JSON lines (a JSON list is accepted too) of VL-T5's rows ``{identifier, img0,
  img1, sent, label 0|1, uid?}`` or the raw NLVR2 release's rows ``{identifier, sentence, label:
  "True"|"False", ...}``; without ``img0``/``img1`` the image ids are derived from the identifier as
  NLVR2 names its images: ``dev-850-0-3`` -> ``dev-850-0-img0`` / ``dev-850-0-img1`` (the last
  component numbers the sentence). ``uid`` = identifier; ``targets`` = ``["true"]`` or ``["false"]``.
- :func:`read_coco_karpathy`: ``dataset_coco.json`` (``{"images": [{filepath, filename, imgid, split,
  sentences: [{raw, ...}]}]}``), one sample per image of the asked splits with all its references as
  ``targets``; ``img_ids`` = ``[filename stem]`` (``COCO_val2014_000000391895``), ``uid`` = ``str(imgid)``.
  Asking for ``"train"`` includes ``"restval"`` images (Karpathy's extra training images).

Feature sources (:class:`FeatureSource`: ``source(img_id) -> (N, D)`` float32 tensor, ``.dim``,
``.num_tokens``, ``img_id in source``, ``source.stack(ids) -> (B, N, D)``):

- :class:`H5Features`: one HDF5 file, a dataset ``(N, D)`` per image id or a group per image id with a
  ``features`` dataset (VL-T5's layout, whose groups also hold boxes);
- :class:`SafetensorsDirFeatures`: ``<dir>/<img_id>.safetensors`` with the tensor ``features`` (N, D);
- :class:`ImageFeatures`: image files under a root encoded on first use by ``encode(list of PIL
  images) -> (B, N, D)`` (e.g. CLIP grid features) and kept in memory.

A missing id raises ``KeyError`` naming the source and the id; NaN/inf values or a shape other than the
source's ``(num_tokens, dim)`` raise ``ValueError``. :func:`load_features` picks the class from the path.
"""

from __future__ import annotations

import abc
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from .readers import inside_root

TASKS = ("vqa", "gqa", "nlvr", "caption")
COCO_SPLITS = ("train", "val", "test", "restval")
H5_SUFFIXES = (".h5", ".hdf5", ".hdf")
OnError = Literal["raise", "skip"]


@dataclass
class VLSample:
    """One example of a vision-language task (see the issue-7 contract)."""

    task: str  # "vqa" | "gqa" | "nlvr" | "caption"
    uid: str  # question_id / identifier / str(imgid): unique within a task's split
    img_ids: list[str]  # one image, or two for NLVR2 (img0, img1)
    text: str  # the question / statement; "" for captioning (no task prefix)
    targets: list[str]  # training targets: VQA by score (best first), GQA [answer], NLVR ["true"|"false"], captions
    answers: list[str] | None = None  # VQA: the human answers, when the file has them
    label: dict[str, float] | None = None  # VQA / GQA soft label {answer: score}
    meta: dict[str, Any] = field(default_factory=dict)  # answer_type, question_type, split, path, ...


class VLSplit(list):
    """A list of :class:`VLSample` that remembers its source ``path``, ``task`` and ``skipped`` rows."""

    def __init__(self, samples: Iterable[VLSample] = (), *, path: str | os.PathLike | None = None,
                 task: str | None = None, skipped: Iterable[tuple[int, str]] = ()):
        super().__init__(samples)
        self.path = Path(path) if path is not None else None
        self.task = task
        self.skipped: list[tuple[int, str]] = list(skipped)

    def __repr__(self) -> str:
        return f"VLSplit(task={self.task!r}, path={str(self.path)!r}, samples={len(self)}, skipped={len(self.skipped)})"


class _RowError(ValueError):
    """A bad row; the reader prefixes the file and the row."""


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _inside(root: Path, relative: str, what: str) -> Path:
    return inside_root(root, relative, what, _RowError)


# ------------------------------------------------------------------------------------------ field checks


def _field(row: Mapping, name: str) -> Any:
    if name not in row:
        raise _RowError(f"field {name!r}: missing (row has {sorted(row)})")
    return row[name]


def _an_id(row: Mapping, name: str) -> str:
    value = _field(row, name)
    if isinstance(value, bool) or not isinstance(value, str | int) or (isinstance(value, str) and not value.strip()):
        raise _RowError(f"field {name!r}: expected a non-empty string or an integer id, got {value!r}")
    return str(value)


def _text(row: Mapping, name: str) -> str:
    value = _field(row, name)
    if not isinstance(value, str):
        raise _RowError(f"field {name!r}: expected a string, got {type(value).__name__}")
    return value


def _optional_str(row: Mapping, name: str) -> str | None:
    value = row.get(name)
    if value is not None and not isinstance(value, str):
        raise _RowError(f"field {name!r}: expected a string, got {type(value).__name__}")
    return value


def _soft_label(row: Mapping, name: str = "label") -> dict[str, float] | None:
    """``{answer: score}`` (a bare answer string counts as score 1); None when the row has no label."""
    if name not in row or row[name] is None:
        return None
    value = row[name]
    if isinstance(value, str):
        return {value: 1.0}
    if not isinstance(value, Mapping):
        raise _RowError(f"field {name!r}: expected {{answer: score}}, got {type(value).__name__}")
    label = {}
    for answer, score in value.items():
        try:  # float() of a 400-digit JSON integer overflows
            as_float = float(score) if isinstance(score, int | float) and not isinstance(score, bool) else math.nan
        except OverflowError:
            as_float = math.inf
        if not math.isfinite(as_float) or as_float < 0:
            raise _RowError(f"field {name!r}: score of answer {answer!r} must be a finite number >= 0, got {score!r}")
        label[answer] = as_float
    return label


def _by_score(label: Mapping[str, float] | None) -> list[str]:
    if not label:
        return []
    return sorted(label, key=lambda a: -label[a])  # stable: ties keep the file's order


def _human_answers(row: Mapping) -> list[str] | None:
    if row.get("answers") is None:
        return None
    value = row["answers"]
    if not isinstance(value, list) or not value:
        raise _RowError(f"field 'answers': expected a non-empty list of answers, got {value!r}")
    out = []
    for i, a in enumerate(value):
        if isinstance(a, Mapping):
            a = a.get("answer")
        if not isinstance(a, str):
            raise _RowError(f"field 'answers': item {i} must be a string or {{'answer': string}}, got {value[i]!r}")
        out.append(a)
    return out


# ------------------------------------------------------------------------------------------ file reading


def _read_text(path: Path, expected: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); expected {expected}") from None


def _loads(text: str) -> Any:
    """``json.loads``, where JSON nested deeper than Python's recursion limit and integers of more digits than
    Python converts (4300) are a ``JSONDecodeError`` like any other syntax error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (RecursionError, ValueError) as e:
        raise json.JSONDecodeError(f"nested too deeply ({type(e).__name__})" if isinstance(e, RecursionError)
                                   else str(e), text[:80], 0) from None


def _records(path: Path, what: str, *, jsonl: bool) -> list[tuple[int, str, Any]]:
    """``(index, where, record or _RowError)`` for a JSON list file (or a JSON-lines file when ``jsonl``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} annotation file not found: {path}")
    text = _read_text(path, f"{what} rows in JSON")
    if not text.strip():
        raise ValueError(f"{path}: empty file; expected {what} rows")
    if not jsonl or text.lstrip().startswith("["):
        try:
            data = _loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected a list of {what} rows") from e
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of {what} rows, got {type(data).__name__}")
        if not data:
            raise ValueError(f"{path}: the list holds no {what} rows")
        return [(i, f"row {i}", row) for i, row in enumerate(data)]
    out: list[tuple[int, str, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((number, f"line {number}", _loads(line)))
        except json.JSONDecodeError as e:
            out.append((number, f"line {number}", _RowError(f"not valid JSON ({e.msg})")))
    return out


def _parse_rows(path: Path, task: str, what: str, records: Iterable[tuple[int, str, Any]],
                parse: Callable[[Mapping], VLSample | None], on_error: str) -> VLSplit:
    _check_on_error(on_error)
    split = VLSplit(path=path, task=task)
    seen: set[str] = set()
    for index, where, row in records:
        try:
            if isinstance(row, _RowError):
                raise row
            if not isinstance(row, Mapping):
                raise _RowError(f"expected a JSON object ({what} row), got {type(row).__name__}")
            sample = parse(row)
            if sample is None:
                continue
            if sample.uid in seen:
                raise _RowError(f"uid {sample.uid!r} appears twice")
            seen.add(sample.uid)
        except _RowError as e:
            message = f"{path}: {where}: {e}"
            if on_error == "raise":
                raise ValueError(message) from None
            split.skipped.append((index, message))
            continue
        sample.meta.setdefault("row", index)
        split.append(sample)
    return split


# ------------------------------------------------------------------------------------------ readers


def read_vqa(path: str | os.PathLike, *, on_error: OnError = "raise") -> VLSplit:
    """VQAv2 Karpathy-split JSON (VL-T5's ``karpathy_{train,val,test}.json``) -> ``VLSplit`` of ``"vqa"`` samples."""
    path = Path(path)

    def parse(row: Mapping) -> VLSample:
        label = _soft_label(row)
        meta = {k: v for k in ("answer_type", "question_type") if (v := _optional_str(row, k)) is not None}
        return VLSample("vqa", _an_id(row, "question_id"), [_an_id(row, "img_id")], _text(row, "sent"),
                        _by_score(label), answers=_human_answers(row), label=label, meta=meta)

    return _parse_rows(path, "vqa", "VQA", _records(path, "VQA", jsonl=False), parse, on_error)


def read_gqa(path: str | os.PathLike, *, on_error: OnError = "raise") -> VLSplit:
    """VL-T5's GQA JSON (``{train,valid,testdev}.json``) -> ``VLSplit`` of ``"gqa"`` samples."""
    path = Path(path)

    def parse(row: Mapping) -> VLSample:
        label = _soft_label(row)
        best = _by_score(label)[:1]
        return VLSample("gqa", _an_id(row, "question_id"), [_an_id(row, "img_id")], _text(row, "sent"), best,
                        label=label)

    return _parse_rows(path, "gqa", "GQA", _records(path, "GQA", jsonl=False), parse, on_error)


_NLVR_LABELS: dict[Any, bool] = {0: False, 1: True, "false": False, "true": True}


def _nlvr_label(row: Mapping) -> bool:
    value = _field(row, "label")
    key = value.strip().lower() if isinstance(value, str) else int(value) if isinstance(value, bool) else value
    if isinstance(key, float) and key.is_integer():
        key = int(key)
    if not isinstance(key, str | int) or key not in _NLVR_LABELS:
        raise _RowError(f"field 'label': expected 0 or 1 (or \"True\"/\"False\"), got {value!r}")
    return _NLVR_LABELS[key]


def nlvr2_image_ids(identifier: str) -> tuple[str, str]:
    """NLVR2's image ids for a statement ``identifier``: ``"dev-850-0-3"`` -> ``("dev-850-0-img0", "dev-850-0-img1")``."""
    prefix, sep, sentence = identifier.rpartition("-")
    if not sep or not prefix or not sentence:
        raise _RowError(f"field 'identifier': cannot derive image ids from {identifier!r}; expected "
                        "'<split>-<set>-<pair>-<sentence>' or the fields 'img0' and 'img1'")
    return f"{prefix}-img0", f"{prefix}-img1"


def read_nlvr2(path: str | os.PathLike, *, on_error: OnError = "raise") -> VLSplit:
    """NLVR2 JSON lines (VL-T5's rows or the raw release's, see the module docstring) -> ``"nlvr"`` samples."""
    path = Path(path)

    def parse(row: Mapping) -> VLSample:
        identifier = _an_id(row, "identifier")
        text = _text(row, "sent") if "sent" in row else _text(row, "sentence")
        truth = _nlvr_label(row)
        has = ("img0" in row, "img1" in row)
        if all(has):
            img_ids = [_an_id(row, "img0"), _an_id(row, "img1")]
        elif any(has):
            raise _RowError(f"field {'img1' if has[0] else 'img0'!r}: missing while {'img0' if has[0] else 'img1'!r} "
                            "is given; give both or neither (then they come from the identifier)")
        else:
            img_ids = list(nlvr2_image_ids(identifier))
        meta = {"label": int(truth)}
        if row.get("uid") is not None:
            meta["uid"] = str(row["uid"])
        return VLSample("nlvr", identifier, img_ids, text, ["true" if truth else "false"], meta=meta)

    return _parse_rows(path, "nlvr", "NLVR2", _records(path, "NLVR2", jsonl=True), parse, on_error)


def read_coco_karpathy(path: str | os.PathLike, splits: str | Sequence[str] = ("test",), *,
                       split: str | Sequence[str] | None = None, image_root: str | os.PathLike | None = None,
                       on_error: OnError = "raise") -> VLSplit:
    """Karpathy's ``dataset_coco.json`` -> one ``"caption"`` sample per image of ``splits`` with all its references.

    ``splits``: any of ``train``, ``val``, ``test``, ``restval`` (``split`` is an alias); ``"train"``
    includes the ``restval`` images. With ``image_root`` each image's ``filepath/filename`` must stay
    inside it and is stored as ``meta["path"]``.
    """
    path = Path(path)
    wanted = split if split is not None else splits
    wanted = {wanted} if isinstance(wanted, str) else set(wanted)
    unknown = wanted - set(COCO_SPLITS)
    if unknown or not wanted:
        raise ValueError(f"unknown COCO Karpathy split(s) {sorted(unknown) or '(none given)'}; expected some of {COCO_SPLITS}")
    if "train" in wanted:
        wanted.add("restval")
    if not path.is_file():
        raise FileNotFoundError(f"COCO Karpathy file not found: {path}")
    text = _read_text(path, "Karpathy's dataset_coco.json")
    if not text.strip():
        raise ValueError(f"{path}: empty file; expected Karpathy's dataset_coco.json")
    try:
        data = _loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, Mapping) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected {{\"images\": [...]}} (Karpathy's dataset_coco.json)")
    root = Path(image_root) if image_root is not None else None

    def parse(row: Mapping) -> VLSample | None:
        image_split = _text(row, "split")
        if image_split not in COCO_SPLITS:
            raise _RowError(f"field 'split': unknown split {image_split!r}; expected one of {COCO_SPLITS}")
        if image_split not in wanted:
            return None
        filename = _text(row, "filename")
        sentences = _field(row, "sentences")
        if not isinstance(sentences, list) or not sentences:
            raise _RowError("field 'sentences': expected a non-empty list of {raw, tokens, ...}")
        refs = []
        for j, s in enumerate(sentences):
            raw = s.get("raw") if isinstance(s, Mapping) else None
            if raw is None and isinstance(s, Mapping) and isinstance(s.get("tokens"), list):
                raw = " ".join(map(str, s["tokens"]))
            if not isinstance(raw, str) or not raw.strip():
                raise _RowError(f"field 'sentences': item {j} has no caption text ('raw' or 'tokens')")
            refs.append(raw.strip())
        meta: dict[str, Any] = {"split": image_split, "filename": filename}
        filepath = _optional_str(row, "filepath") or ""
        meta["filepath"] = filepath
        if row.get("cocoid") is not None:
            meta["cocoid"] = row["cocoid"]
        if root is not None:
            meta["path"] = str(_inside(root, os.path.join(filepath, filename), "fields 'filepath'/'filename'"))
        return VLSample("caption", _an_id(row, "imgid"), [Path(filename).stem], "", refs, meta=meta)

    records = [(i, f"images[{i}]", row) for i, row in enumerate(data["images"])]
    out = _parse_rows(path, "caption", "COCO image", records, parse, on_error)
    if not out and not out.skipped:
        present = sorted({r.get("split") for r in data["images"] if isinstance(r, Mapping)} - {None}, key=str)
        raise ValueError(f"{path}: no images in split(s) {sorted(wanted)}; the file has splits {present}")
    return out


# ------------------------------------------------------------------------------------------ features


@runtime_checkable
class FeatureSource(Protocol):
    """Per-image features: ``source(img_id) -> (num_tokens, dim)`` float32 tensor."""

    @property
    def dim(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...

    def __call__(self, img_id: str) -> torch.Tensor: ...


class _Features(abc.ABC):
    """Shared checks and batching; subclasses implement ``_probe``, ``_load(img_id) -> array`` and ``__contains__``."""

    _shape: tuple[int, int] | None = None

    @property
    def dim(self) -> int:
        return self._probe()[1]

    @property
    def num_tokens(self) -> int:
        return self._probe()[0]

    @abc.abstractmethod
    def _probe(self) -> tuple[int, int]:
        """``(tokens, dim)`` of one stored feature."""

    def _check(self, img_id: str, value) -> torch.Tensor:
        try:
            t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
            t = t.detach().to("cpu", torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:  # strings, objects, complex numbers
            raise ValueError(f"{self}: features of image {img_id!r} are not numeric ({type(e).__name__}: {e}); "
                             "expected a float (N, D) array") from None
        if t.ndim != 2:
            raise ValueError(f"{self}: features of image {img_id!r} have shape {tuple(t.shape)}; expected (N, D)")
        if self._shape is not None and tuple(t.shape) != self._shape:
            raise ValueError(f"{self}: features of image {img_id!r} have shape {tuple(t.shape)}; expected "
                             f"(num_tokens, dim) = {self._shape} like the source's other images")
        if not torch.isfinite(t).all():
            raise ValueError(f"{self}: features of image {img_id!r} hold NaN or inf values")
        return t

    def _missing(self, img_id: str) -> KeyError:
        return KeyError(f"{self}: no features for image id {img_id!r}")

    def stack(self, img_ids: Sequence[str]) -> torch.Tensor:
        """Features of several images, ``(B, N, D)``."""
        return torch.stack([self(i) for i in img_ids])


class H5Features(_Features):
    """Features in one HDF5 file: dataset ``f[img_id]`` (N, D), or group ``f[img_id]`` with dataset ``features``."""

    def __init__(self, path: str | os.PathLike):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"HDF5 feature file not found: {self.path}")
        self._file = None
        self._pid = None
        try:
            with h5py.File(self.path, "r") as f:
                self._keys: dict[str, str] = {}
                first = None
                for key, item in f.items():
                    if isinstance(item, h5py.Dataset):
                        self._keys[key] = key
                    elif isinstance(item, h5py.Group) and isinstance(item.get("features"), h5py.Dataset):
                        self._keys[key] = f"{key}/features"
                    else:
                        continue
                    first = first or self._keys[key]
                if first is None:
                    raise ValueError(f"{self}: no feature datasets (expected f[img_id] of shape (N, D) or "
                                     "f[img_id]['features'])")
                shape = f[first].shape
        except OSError as e:
            raise ValueError(f"{self.path}: not a readable HDF5 file ({e})") from e
        if len(shape) != 2:
            raise ValueError(f"{self}: dataset {first!r} has shape {shape}; expected (N, D)")
        self._shape = (int(shape[0]), int(shape[1]))

    def __repr__(self) -> str:
        return f"H5Features({str(self.path)!r})"

    def _probe(self) -> tuple[int, int]:
        return self._shape

    def __contains__(self, img_id: object) -> bool:
        return img_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def ids(self) -> list[str]:
        return list(self._keys)

    def _handle(self):
        import h5py

        if self._file is None or self._pid != os.getpid():  # one handle per process (DataLoader workers)
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"] = state["_pid"] = None
        return state

    def __call__(self, img_id: str) -> torch.Tensor:
        """``(N, D)`` float32 features of ``img_id``."""
        key = self._keys.get(img_id)
        if key is None:
            raise self._missing(img_id)
        try:
            value = self._handle()[key][()]
        except (OSError, TypeError, ValueError) as e:  # a corrupt chunk, an unreadable dtype
            raise ValueError(f"{self}: dataset {key!r} of image {img_id!r} cannot be read ({type(e).__name__}: {e})") from None
        return self._check(img_id, value)


class SafetensorsDirFeatures(_Features):
    """One ``<img_id>.safetensors`` per image in ``directory``, holding the tensor ``features`` (N, D)."""

    KEY = "features"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"safetensors feature folder not found: {self.directory}")
        first = next(iter(sorted(self.directory.glob("*.safetensors"))), None)
        if first is None:
            raise ValueError(f"{self}: no <img_id>.safetensors files")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(first), framework="pt") as f:
                if self.KEY not in f.keys():
                    raise ValueError(f"{first}: no tensor {self.KEY!r} (has {sorted(f.keys())})")
                shape = tuple(f.get_slice(self.KEY).get_shape())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{first}: not a readable safetensors file ({e}); expected the tensor {self.KEY!r} (N, D)") from None
        if len(shape) != 2:
            raise ValueError(f"{first}: tensor {self.KEY!r} has shape {shape}; expected (N, D)")
        self._shape = (int(shape[0]), int(shape[1]))

    def __repr__(self) -> str:
        return f"SafetensorsDirFeatures({str(self.directory)!r})"

    def _probe(self) -> tuple[int, int]:
        return self._shape

    def _file(self, img_id: str) -> Path | None:
        if not isinstance(img_id, str) or not img_id or "/" in img_id or "\\" in img_id or img_id in (".", ".."):
            return None  # ids never name a path: nothing outside the folder can be reached
        path = self.directory / f"{img_id}.safetensors"
        return path if path.is_file() else None

    def __contains__(self, img_id: object) -> bool:
        return self._file(img_id) is not None  # type: ignore[arg-type]

    @property
    def ids(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.safetensors"))

    def __call__(self, img_id: str) -> torch.Tensor:
        """``(N, D)`` float32 features of ``img_id``."""
        from safetensors import SafetensorError, safe_open

        path = self._file(img_id)
        if path is None:
            raise self._missing(img_id)
        try:
            with safe_open(str(path), framework="pt") as f:
                if self.KEY not in f.keys():
                    raise ValueError(f"{self}: {path.name} has no tensor {self.KEY!r} (has {sorted(f.keys())})")
                value = f.get_tensor(self.KEY)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{self}: {path.name} is not a readable safetensors file ({e})") from e
        return self._check(img_id, value)


class ImageFeatures(_Features):
    """Images under ``image_root`` (``pattern`` with ``{img_id}``) encoded on first use and cached in memory.

    ``encode(list of PIL RGB images) -> (B, N, D)`` runs under ``torch.no_grad()``; e.g. a CLIP grid
    feature extractor with its preprocessing. ``dim`` / ``num_tokens`` are given or probed by encoding
    the first image found.
    """

    def __init__(self, image_root: str | os.PathLike, encode: Callable[[list], torch.Tensor],
                 pattern: str = "{img_id}.png", *, dim: int | None = None, num_tokens: int | None = None):
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_root}")
        if pattern.count("{img_id}") != 1:
            raise ValueError(f"pattern must contain '{{img_id}}' once, got {pattern!r}")
        self.encode, self.pattern = encode, pattern
        self._shape = (num_tokens, dim) if dim is not None and num_tokens is not None else None
        self._cache: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"ImageFeatures({str(self.image_root)!r}, pattern={self.pattern!r})"

    def _path(self, img_id: str) -> Path:
        relative = self.pattern.replace("{img_id}", str(img_id))
        path = (self.image_root / relative).resolve()
        if not img_id or not path.is_relative_to(self.image_root.resolve()):
            raise ValueError(f"{self}: image id {img_id!r} gives path {relative!r}, which escapes the image root")
        return path

    def __contains__(self, img_id: object) -> bool:
        try:
            return img_id in self._cache or self._path(img_id).is_file()  # type: ignore[arg-type]
        except ValueError:
            return False

    @property
    def ids(self) -> list[str]:
        prefix, suffix = self.pattern.split("{img_id}")
        found = []
        for p in sorted(self.image_root.glob(prefix + "*" + suffix)):
            rel = p.relative_to(self.image_root).as_posix()
            found.append(rel[len(prefix):len(rel) - len(suffix)])
        return found

    def _probe(self) -> tuple[int, int]:
        if self._shape is None:
            errors = []
            for img_id in self.ids:  # the first readable image sets the expected shape
                try:
                    self(img_id)
                    break
                except ValueError as e:
                    errors.append(str(e))
            if self._shape is None:
                raise ValueError(f"{self}: no readable image to probe the feature shape from ({len(errors)} failed"
                                 f"{': ' + errors[0] if errors else ''}); give dim= and num_tokens=")
        return self._shape

    def stack(self, img_ids: Sequence[str]) -> torch.Tensor:
        """``(B, N, D)`` features of ``img_ids``; the uncached ones are encoded in one ``encode`` call."""
        from PIL import Image

        todo = [i for i in dict.fromkeys(img_ids) if i not in self._cache]
        if todo:
            images = []
            for img_id in todo:
                path = self._path(img_id)
                if not path.is_file():
                    raise self._missing(img_id)
                try:
                    with Image.open(path) as img:
                        images.append(img.convert("RGB"))
                except Exception as e:  # any decoder failure: name the file
                    raise ValueError(f"{self}: cannot read image {path} for id {img_id!r} ({type(e).__name__}: {e})") from e
            with torch.no_grad():
                out = torch.as_tensor(self.encode(images))
            if out.ndim != 3 or out.shape[0] != len(todo):
                raise ValueError(f"{self}: encode returned shape {tuple(out.shape)} for {len(todo)} images; expected (B, N, D)")
            for img_id, feats in zip(todo, out, strict=True):
                checked = self._check(img_id, feats)
                if self._shape is None:
                    self._shape = tuple(checked.shape)
                self._cache[img_id] = checked
        return torch.stack([self._cache[i] for i in img_ids])

    def __call__(self, img_id: str) -> torch.Tensor:
        """``(N, D)`` float32 features of ``img_id`` (encoded once, then cached)."""
        return self.stack([img_id])[0]


def load_features(path: str | os.PathLike, *, encode: Callable[[list], torch.Tensor] | None = None,
                  pattern: str = "{img_id}.png") -> H5Features | SafetensorsDirFeatures | ImageFeatures:
    """The feature source for ``path``: an ``.h5`` file, a folder of ``.safetensors``, or (with ``encode``) images."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in H5_SUFFIXES:
        return H5Features(path)
    if path.is_dir() and next(path.glob("*.safetensors"), None) is not None:
        return SafetensorsDirFeatures(path)
    if path.is_dir() and encode is not None:
        return ImageFeatures(path, encode, pattern)
    if not path.exists():
        raise FileNotFoundError(f"feature source not found: {path}")
    raise ValueError(f"{path}: not a feature source; expected an HDF5 file ({', '.join(H5_SUFFIXES)}), a folder of "
                     "<img_id>.safetensors, or an image folder together with encode=")


def filter_with_features(samples: Sequence[VLSample], features: FeatureSource) -> VLSplit:
    """The samples whose images all have features; the others go to ``.skipped`` as (position, reason)."""
    out = VLSplit(path=getattr(samples, "path", None), task=getattr(samples, "task", None),
                  skipped=getattr(samples, "skipped", ()))
    for i, s in enumerate(samples):
        missing = [img for img in s.img_ids if img not in features]
        if missing:
            out.skipped.append((i, f"sample {s.uid!r}: no features for image(s) {missing} in {features}"))
        else:
            out.append(s)
    return out
