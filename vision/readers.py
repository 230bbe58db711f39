"""Image classification datasets in the on-disk formats benchmarks ship, and how a run opens them.

Every reader is a map-style ``torch.utils.data.Dataset`` whose items are ``(image, label, path)``
(``image`` = ``transform(PIL RGB image)``, ``label`` an int, ``path`` a string naming the file), and
``classnames`` in label order:

- :class:`ImageFolderDataset`: ``root/<class>/<image>``, classes in sorted folder order;
- :class:`CsvDataset`: ``path,label`` rows (label = class index or class name; paths relative to the CSV);
- :class:`CoopSplitDataset`: CoOp's ``split_zhou_<Name>.json`` (``{"train"|"val"|"test": [[relpath, label, classname], ...]}``);
- :class:`WdsDataset`: CLIP_benchmark's webdataset layout, ``root/<split>/*.tar`` shards of
  ``<key>.{webp,jpg,png}`` + ``<key>.cls``, with ``classnames.txt`` and
  ``zeroshot_classification_templates.txt`` at the root (read with the standard library's tarfile).

An image that cannot be read or decoded does not raise: its item is an :class:`Unreadable` marker
(path, label, reason) that :func:`collate_with_skips` separates from the batch so evaluators can count
it. Format errors (a bad CSV row, a path escaping the dataset root, a missing label) raise with the
file, the row/entry and the field named.

Opening a dataset the way ``mmadapters eval zeroshot|fewshot`` and the few-shot recipes do:
:func:`prepare_dataset_root` (a format and its root, or a generated task written on first use),
:func:`open_split` (the reader of one split), :func:`resolve_classnames` / :func:`resolve_templates`
(a given file, else the dataset root's, else the reader's names / a built-in template set) and
:func:`image_loader` (a DataLoader that sets unreadable images aside).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_PATH_COLUMNS = ("path", "filepath", "file", "filename", "image", "image_path")
_LABEL_COLUMNS = ("label", "class", "classname", "target", "class_id")
_INDEX_RE = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses
# Images over these limits are skipped and counted, judged from the header before decoding: an 80000x1 PNG of
# 314 bytes resized to 224 on its short side is a 224x17,920,000 image (+1.4 GB). No benchmark comes near them
# (ImageNet's largest images are about 10 Mpx; panoramas are about 1:10).
MAX_PIXELS = 40_000_000
MAX_ASPECT = 50  # longer side / shorter side


@dataclass(frozen=True)
class Unreadable:
    """The item of an image that could not be opened or decoded."""

    path: str
    label: int
    reason: str


def folder_classname(folder: str) -> str:
    """A class folder's name as a class name: underscores become spaces (``"sea_lion"`` -> ``"sea lion"``)."""
    return folder.replace("_", " ").strip()


def split_lines(text: str) -> list[str]:
    """``text`` split at line feeds only, a trailing ``\\r`` dropped. ``str.splitlines`` also splits at U+0085,
    U+2028, ``\\x0c``...: one of those inside a class name made two classes and shifted every later label."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Non-empty, stripped lines of a text file (one class name / template per line; lines end at ``\\n``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    lines = [line.strip() for line in split_lines(_read_text(path, f"one {what} per line"))]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path}: expected one {what} per line, found none")
    return lines


def _read_text(path: Path, expected: str) -> str:
    """The UTF-8 text of ``path``; a file in another encoding raises ``ValueError`` naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); expected {expected}") from None


def check_unique_classnames(classnames: Sequence[str], where: str) -> None:
    """Raise ``ValueError`` naming the first repeated class name and its positions: two classes with one name
    give two identical zero-shot classifier columns, and the second could never be predicted."""
    first: dict[str, int] = {}
    for i, name in enumerate(classnames):
        if name in first:
            raise ValueError(f"{where}: class name {name!r} appears twice (classes {first[name]} and {i}); expected "
                             "distinct class names")
        first[name] = i


def read_classnames(path: str | os.PathLike) -> list[str]:
    """Class names, one per line, in label order; repeated names raise naming the file."""
    names = read_lines(path, "class name")
    check_unique_classnames(names, str(path))
    return names


def read_templates(path: str | os.PathLike) -> list[str]:
    """Templates, one per line, each containing ``{c}`` where the class name goes."""
    templates = read_lines(path, "template")
    for i, t in enumerate(templates, 1):
        if "{c}" not in t:
            raise ValueError(f"{path}: template {i} {t!r} has no '{{c}}' placeholder for the class name")
    return templates


def size_problem(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` pixels is not decoded (see :data:`MAX_PIXELS`), or None."""
    if width * height > MAX_PIXELS:
        return f"too many pixels ({width}x{height}; limit {MAX_PIXELS})"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"aspect ratio over 1:{MAX_ASPECT} ({width}x{height})"
    return None


def inside_root(root: Path, relative: str, where: str, error: type[ValueError] = ValueError) -> Path:
    """``root / relative`` resolved, refusing paths that leave ``root`` (``..``, absolute paths, symlinked escapes)
    with ``error`` (a ValueError) naming ``where``. The image and the VL readers share it."""
    if not relative or not relative.strip():
        raise error(f"{where}: empty path")
    if "\x00" in relative:
        raise error(f"{where}: path {relative!r} contains a NUL byte; expected a file path")
    try:
        path = (root / relative).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise error(f"{where}: path {relative!r} cannot be resolved ({e})") from None
    if not path.is_relative_to(root.resolve()):
        raise error(f"{where}: path {relative!r} escapes the dataset root {root}")
    return path



class ImageDataset(Dataset):
    """Base reader: ``samples`` [(file path, label)], ``classnames`` in label order, an image ``transform``."""

    def __init__(self, samples: Sequence[tuple[str, int]], classnames: Sequence[str] | None,
                 transform: Callable[[Any], Any] | None = None):
        self.samples = list(samples)
        self.classnames = list(classnames) if classnames is not None else None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def _read_bytes(self, index: int) -> bytes | str:
        """The image's encoded bytes, or a file path PIL can open."""
        return self.samples[index][0]

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        try:
            source = self._read_bytes(index)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:  # reads the header
                too_big = size_problem(*img.size)
                if too_big:
                    return Unreadable(str(path), label, too_big)
                image = img.convert("RGB")  # decodes fully: truncated files fail here, not later
            if self.transform is not None:
                image = self.transform(image)
        except Exception as e:  # any decoder failure marks the image; the run goes on
            return Unreadable(str(path), label, f"{type(e).__name__}: {e}")
        return image, label, str(path)


class ImageFolderDataset(ImageDataset):
    """``root/<class folder>/<image>``; labels follow sorted folder names; class names from folder names.

    A class folder or image that is a symlink leading out of ``within`` (default ``root``; the dataset root when
    ``root`` is one of its split folders) raises, as a CSV row or CoOp entry escaping the root does.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, classnames: Sequence[str] | None = None,
                 *, within: str | os.PathLike | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        boundary = Path(within) if within is not None else root
        folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not folders:
            raise ValueError(f"{root}: expected one sub-folder per class, found none")
        if classnames is not None and len(classnames) != len(folders):
            raise ValueError(f"{root}: {len(folders)} class folders but {len(classnames)} class names were given")
        samples = []
        for label, folder in enumerate(folders):
            linked = (root / folder).is_symlink()
            for file in sorted((root / folder).iterdir()):
                if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
                    if linked or file.is_symlink():  # resolving every file would cost a stat per path component
                        inside_root(boundary, os.path.relpath(file, boundary), f"{root}: image {folder}/{file.name} (a symlink)")
                    samples.append((str(file), label))
        if not samples:
            raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        names = list(classnames) if classnames is not None else [folder_classname(f) for f in folders]
        check_unique_classnames(names, f"{root}: class names" + (" (from folder names)" if classnames is None else ""))
        self.root = root
        self.folders = folders
        super().__init__(samples, names, transform)


class CsvDataset(ImageDataset):
    """Rows ``path,label`` (an optional header names the columns). Paths are relative to the CSV's folder.

    A label is a class index (``0 <= label < len(classnames)``) or a class name. Without ``classnames``,
    name labels define the classes (sorted); index labels then need ``classnames``.
    """

    def __init__(self, csv_path: str | os.PathLike, transform: Callable | None = None,
                 classnames: Sequence[str] | None = None):
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise FileNotFoundError(f"CSV file not found: {csv_path}")
        try:
            with open(csv_path, newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
        except UnicodeDecodeError as e:
            raise ValueError(f"{csv_path}: not UTF-8 text ({e}); expected rows 'path,label'") from None
        except csv.Error as e:
            raise ValueError(f"{csv_path}: row {reader.line_num}: not readable CSV ({e})") from None
        if not rows:
            raise ValueError(f"{csv_path}: empty CSV; expected rows 'path,label'")
        header = [c.strip().lower() for c in rows[0][1]]
        path_col, label_col = 0, 1
        if any(c in _PATH_COLUMNS for c in header) and any(c in _LABEL_COLUMNS for c in header):
            path_col = next(i for i, c in enumerate(header) if c in _PATH_COLUMNS)
            label_col = next(i for i, c in enumerate(header) if c in _LABEL_COLUMNS)
            rows = rows[1:]
        root = csv_path.parent
        parsed: list[tuple[Path, str, int]] = []
        for line, row in rows:
            if len(row) <= max(path_col, label_col):
                raise ValueError(f"{csv_path}: row {line}: expected fields 'path,label', got {row!r}")
            path = inside_root(root, row[path_col].strip(), f"{csv_path}: row {line} field 'path'")
            parsed.append((path, row[label_col].strip(), line))
        all_int = all(_INDEX_RE.fullmatch(label) for _, label, _ in parsed)
        if classnames is None:
            if all_int:
                raise ValueError(f"{csv_path}: labels are class indices; give the class names (a classnames file)")
            classnames = sorted({label for _, label, _ in parsed})
        check_unique_classnames(classnames, f"{csv_path}: class names")
        index = {name: i for i, name in enumerate(classnames)}
        samples = []
        for path, label, line in parsed:
            if _INDEX_RE.fullmatch(label) and label not in index:
                value = int(label)
                if not 0 <= value < len(classnames):
                    raise ValueError(f"{csv_path}: row {line} field 'label': class index {value} is outside "
                                     f"[0, {len(classnames)})")
            elif label in index:
                value = index[label]
            else:
                raise ValueError(f"{csv_path}: row {line} field 'label': expected a class index or one of the "
                                 f"{len(classnames)} class names, got {label!r}")
            samples.append((str(path), value))
        self.csv_path = csv_path
        super().__init__(samples, classnames, transform)


def find_coop_split(root: str | os.PathLike) -> Path:
    """The one ``split_zhou_*.json`` in ``root`` (or ``root`` itself when it is that file)."""
    root = Path(root)
    if root.is_file():
        return root
    found = sorted(root.glob("split_zhou_*.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"{root}: expected exactly one CoOp split file split_zhou_<Name>.json, found "
                                f"{[p.name for p in found] or 'none'}")
    return found[0]


class CoopSplitDataset(ImageDataset):
    """One split of CoOp's ``split_zhou_<Name>.json``: entries ``[relative path, label, class name]``.

    Paths are relative to the dataset's image folder, which CoOp keeps next to the JSON under a
    dataset-specific name (``images``, ``jpg``, ``2750``, ...): ``image_root`` defaults to the JSON's
    folder or the first of its sub-folders that holds the split's first image.
    """

    def __init__(self, root: str | os.PathLike, split: str = "test", transform: Callable | None = None,
                 image_root: str | os.PathLike | None = None):
        split_file = find_coop_split(root)
        text = _read_text(split_file, "CoOp's split JSON")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # also JSON nested too deeply, integers of > 4300 digits
            raise ValueError(f"{split_file}: not valid JSON ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict) or split not in data:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{split_file}: no split {split!r}; expected keys train/val/test, found {keys}")
        names: dict[int, str] = {}
        for key, entries in data.items():
            if not isinstance(entries, list):
                raise ValueError(f"{split_file}: field {key!r}: expected a list of [path, label, classname]")
            for i, entry in enumerate(entries):
                where = f"{split_file}: {key}[{i}]"
                if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                        and isinstance(entry[1], int) and isinstance(entry[2], str)):
                    raise ValueError(f"{where}: expected [relative path, integer label, class name], got {entry!r}")
                if names.setdefault(entry[1], entry[2]) != entry[2]:
                    raise ValueError(f"{where} field 'classname': label {entry[1]} is named both "
                                     f"{names[entry[1]]!r} and {entry[2]!r}")
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"{split_file}: labels must be 0..C-1, found {sorted(names)}")
        classnames = [names[i] for i in range(len(names))]
        check_unique_classnames(classnames, f"{split_file}: field 'classname'")
        entries = data[split]
        if not entries:
            raise ValueError(f"{split_file}: split {split!r} is empty")
        if image_root is None:
            first = entries[0][0]
            candidates = [split_file.parent] + sorted(d for d in split_file.parent.iterdir() if d.is_dir())
            image_root = next((c for c in candidates if "\x00" not in first and (c / first).exists()), split_file.parent)
        image_root = Path(image_root)
        samples = [(str(inside_root(image_root, rel, f"{split_file}: {split}[{i}] field 'path'")), label)
                   for i, (rel, label, _) in enumerate(entries)]
        self.split_file, self.image_root = split_file, image_root
        super().__init__(samples, classnames, transform)


@dataclass(frozen=True)
class _TarMember:
    shard: str
    name: str
    offset: int  # byte offset of the member's data in an uncompressed tar; -1 for compressed shards
    size: int


def _key_and_ext(member_name: str) -> tuple[str, str]:
    # webdataset's convention: the key is everything up to the first dot of the file's base name
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class WdsDataset(ImageDataset):
    """CLIP_benchmark's wds layout: ``root/<split>/*.tar`` of ``<key>.<image ext>`` + ``<key>.cls``.

    Class names come from ``root/classnames.txt`` (templates from
    ``root/zeroshot_classification_templates.txt``, see :func:`wds_templates_file`).
    """

    def __init__(self, root: str | os.PathLike, split: str = "test", transform: Callable | None = None,
                 classnames: Sequence[str] | None = None):
        root = Path(root)
        shards = sorted((root / split).glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"{root / split}: expected webdataset shards *.tar (CLIP_benchmark's wds layout)")
        if classnames is None:
            classnames = read_classnames(root / "classnames.txt")
        self.members: list[_TarMember] = []
        samples: list[tuple[str, int]] = []
        for shard in shards:
            try:
                with tarfile.open(shard) as tar:
                    compressed = not isinstance(tar.fileobj, io.BufferedReader)
                    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
                    for info in tar:
                        if info.isfile():
                            key, ext = _key_and_ext(info.name)
                            groups.setdefault(key, {})[ext] = info
                    for key, files in groups.items():
                        where = f"{shard}: sample {key!r}"
                        image_ext = next((e for e in ("webp", "jpg", "jpeg", "png") if e in files), None)
                        if image_ext is None:
                            raise ValueError(f"{where}: no image member (.webp, .jpg, .jpeg or .png)")
                        if "cls" not in files:
                            raise ValueError(f"{where}: no label member {key}.cls")
                        raw = tar.extractfile(files["cls"]).read()
                        text = raw.decode("utf-8", errors="replace").strip()
                        if not _INDEX_RE.fullmatch(text) or not 0 <= int(text) < len(classnames):
                            raise ValueError(f"{where} field 'cls': expected a class index in [0, {len(classnames)}), "
                                             f"got {text!r}")
                        info = files[image_ext]
                        self.members.append(_TarMember(str(shard), info.name, -1 if compressed else info.offset_data,
                                                       info.size))
                        samples.append((f"{shard}/{info.name}", int(text)))
            except (tarfile.TarError, EOFError, OSError) as e:  # EOFError: a truncated compressed shard
                raise ValueError(f"{shard}: not a readable tar shard ({type(e).__name__}: {e})") from e
        if not samples:
            raise ValueError(f"{root / split}: the shards hold no samples")
        self.root = root
        super().__init__(samples, classnames, transform)

    def _read_bytes(self, index: int) -> bytes:
        m = self.members[index]
        if m.offset < 0:
            with tarfile.open(m.shard) as tar:
                return tar.extractfile(m.name).read()
        with open(m.shard, "rb") as f:  # opened per read: safe in DataLoader workers, no shared handles
            f.seek(m.offset)
            return f.read(m.size)


def wds_templates_file(root: str | os.PathLike) -> Path:
    return Path(root) / "zeroshot_classification_templates.txt"


def collate_with_skips(batch: list) -> tuple[torch.Tensor | list | None, torch.Tensor, list[str], list[Unreadable]]:
    """Collate ``(image, label, path)`` items, setting :class:`Unreadable` ones aside.

    Returns ``(images (B, 3, H, W) or a list when not tensors or None when empty, labels (B,), paths, skipped)``.
    """
    good = [item for item in batch if not isinstance(item, Unreadable)]
    skipped = [item for item in batch if isinstance(item, Unreadable)]
    labels = torch.tensor([label for _, label, _ in good], dtype=torch.long)
    paths = [path for _, _, path in good]
    if not good:
        return None, labels, paths, skipped
    images = [image for image, _, _ in good]
    stacked = torch.stack(images) if isinstance(images[0], torch.Tensor) else images
    return stacked, labels, paths, skipped


# ---------------------------------------------------------------------------------------------------
# Opening a dataset for a run

FORMATS = ("imagefolder", "csv", "coop", "wds")
FLAT_SPLIT = "test"  # the one split a flat image folder holds: the evaluators' default --split


def seeded_name(task: str, data_seed: int | None) -> str:
    """The folder name of a generated task drawn from ``data_seed``: ``<task>`` for the canonical seed (None
    or 0), else ``<task>_seed<S>``."""
    return task if not data_seed else f"{task}_seed{data_seed}"


# Sizes of a generated task that a run may override (generate_task's keyword arguments; None: the task's own).
SIZE_OPTIONS: tuple[str, ...] = ("train_per_class", "val_per_class", "test_per_class", "image_size")


def generator_sizes(sizes: Mapping[str, int | None] | None = None) -> dict[str, int]:
    """generate_task's sizes: the given ones (not None), else generate_task's defaults."""
    import inspect

    from mmadapters.vision.synth import generate_task

    params, sizes = inspect.signature(generate_task).parameters, sizes or {}
    return {k: sizes[k] if sizes.get(k) is not None else params[k].default for k in SIZE_OPTIONS}


def generated_root(base: Path, task: str, data_seed: int | None = None,
                   sizes: Mapping[str, int | None] | None = None) -> Path:
    """``base/<task>`` for the canonical sizes and seed, else a folder whose name records the data seed and the
    sizes, so two draws never overwrite each other."""
    name = seeded_name(task, data_seed)
    if not sizes or all(sizes.get(k) is None for k in SIZE_OPTIONS):
        return base / name
    s = generator_sizes(sizes)
    return base / f"{name}_tr{s['train_per_class']}_va{s['val_per_class']}_te{s['test_per_class']}_px{s['image_size']}"


def cli_flag(field: str) -> str:
    """How the command line names a setting: ``dataset_root`` -> ``--dataset-root``."""
    return "--" + field.replace("_", "-")


def prepare_dataset_root(dataset: str, dataset_root: str | os.PathLike | None, cache_dir: Path, *,
                         progress: bool = True, data_seed: int | None = None,
                         sizes: Mapping[str, int | None] | None = None, data_dir: str | os.PathLike | None = None,
                         flag: Callable[[str], str] = cli_flag) -> tuple[str, Path]:
    """(format, root) of ``--dataset``/``--dataset-root`` (``--data-seed``): the dataset resolver of ``mmadapters
    eval``, the few-shot recipes and ``fewshot-compare``; ``flag`` names their settings in errors.

    A generated task is written into its root (default ``generated_root(data_dir or cache_dir/datasets, ...)``)
    when missing; given ``sizes`` (None: the task's own), an existing root is brought up to date with them. A
    root that holds another task, or the task drawn from another seed than a given ``data_seed``, is refused.
    """
    if dataset in FORMATS:
        if not dataset_root:
            raise ValueError(f"{flag('dataset')} {dataset} needs {flag('dataset_root')} (the dataset's location)")
        if data_seed is not None:
            raise ValueError(f"{flag('data_seed')} applies to generated tasks only, not to {flag('dataset')} {dataset}")
        return dataset, Path(dataset_root)
    from mmadapters.vision.synth import TASKS, generate_task

    if dataset not in TASKS:
        raise ValueError(f"{flag('dataset')} {dataset!r}: expected a format ({', '.join(FORMATS)}) or a generated "
                         f"task ({', '.join(sorted(TASKS))})")
    base = Path(data_dir) if data_dir else cache_dir / "datasets"
    root = Path(dataset_root) if dataset_root else generated_root(base, dataset, data_seed, sizes)
    sized = bool(sizes) and any(v is not None for v in sizes.values())
    size_kwargs = generator_sizes(sizes) if sized else {}  # none given: generate_task's own
    meta = root / "task.json"
    if not meta.is_file():
        if progress:
            print(f"generating {dataset} into {root}")
        generate_task(dataset, root, progress=progress, seed=data_seed or 0, **size_kwargs)
        return "imagefolder", root
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
        recorded, seed = record.get("task"), record.get("seed")
    except (ValueError, AttributeError):
        recorded = seed = None
    if recorded != dataset:
        raise ValueError(f"{meta}: field 'task' is {recorded!r}, expected {dataset!r}; point {flag('dataset_root')} at "
                         "that task's folder (or an empty one to generate it)")
    if data_seed is not None and seed != data_seed:
        raise ValueError(f"{meta}: field 'seed' is {seed!r}, expected {flag('data_seed')} {data_seed}; leave "
                         f"{flag('dataset_root')} out (the seeded task goes to <cache dir>/datasets/"
                         f"{seeded_name(dataset, data_seed)}) or point it at an empty folder")
    if sized:  # no-op when the folder already holds these sizes
        generate_task(dataset, root, progress=progress, seed=data_seed or 0, **size_kwargs)
    return "imagefolder", root


def dataset_name(dataset: str, fmt: str, root: Path) -> str:
    """The name results carry: a generated task's own name, else the root's (file) name."""
    return dataset if fmt != dataset else (root.stem if root.is_file() else root.name)


def open_split(fmt: str, root: Path, split: str, transform, classnames: list[str] | None) -> ImageDataset:
    """The reader for ``split`` of a dataset in format ``fmt`` rooted at ``root``."""
    if fmt == "imagefolder":
        split_dir = root / split
        if split_dir.is_dir():
            return ImageFolderDataset(split_dir, transform, classnames, within=root)
        if any((root / s).is_dir() for s in ("train", "val", "test")):
            raise FileNotFoundError(f"{root}: no folder for split {split!r} (expected {split_dir})")
        if split != FLAT_SPLIT:  # every image would be evaluated (or fitted on) as that split: test images included
            raise ValueError(f"{root}: a flat image folder (class folders, no train/val/test folders) is one split, read "
                             f"as {FLAT_SPLIT!r}; it has no split {split!r}: evaluate it with --split left at its "
                             f"default ({FLAT_SPLIT}), or put the images in {root}/<split>/<class>/ folders")
        return ImageFolderDataset(root, transform, classnames)
    if fmt == "csv":
        return CsvDataset(root if root.is_file() else root / f"{split}.csv", transform, classnames)
    if fmt == "coop":
        return CoopSplitDataset(root, split, transform)
    if fmt == "wds":
        return WdsDataset(root, split, transform, classnames)
    raise ValueError(f"unknown dataset format {fmt!r}; expected one of {FORMATS}")


def _base(root: Path) -> Path:
    return root if root.is_dir() else root.parent


def resolve_classnames(classnames: str | os.PathLike | None, root: Path) -> tuple[list[str] | None, str]:
    """(class names, or None to take the reader's; where they came from): the given file, else
    ``<root>/classnames.txt``."""
    if classnames:
        return read_classnames(classnames), str(classnames)
    if (_base(root) / "classnames.txt").is_file():
        return read_classnames(_base(root) / "classnames.txt"), str(_base(root) / "classnames.txt")
    return None, "dataset"


def resolve_templates(templates: str | os.PathLike | None, root: Path) -> tuple[list[str], str]:
    """(templates, where they came from): the given file, else ``<root>/templates.txt``, else CLIP_benchmark's
    ``zeroshot_classification_templates.txt``, else :data:`mmadapters.vision.zeroshot.DEFAULT_TEMPLATES`."""
    if templates:
        return read_templates(templates), str(templates)
    for candidate in (_base(root) / "templates.txt", wds_templates_file(_base(root))):
        if candidate.is_file():
            return read_templates(candidate), str(candidate)
    from mmadapters.vision.zeroshot import DEFAULT_TEMPLATES

    return list(DEFAULT_TEMPLATES), "built-in"


def image_loader(dataset: Dataset, *, batch_size: int, num_workers: int = 0, device: str = "cpu"):
    """A DataLoader of ``collate_with_skips`` batches over ``dataset`` in order (``num_workers`` processes read)."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_with_skips, pin_memory=str(device).startswith("cuda"))
