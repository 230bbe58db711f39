"""Property-based fuzzing of the annotation readers: arbitrary bytes, text and JSON structures either give valid
samples or raise the reader's documented errors (ValueError subclasses naming the file; never IndexError,
KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError or OverflowError escaping).

The same readers run under atheris in scripts/fuzz_atheris.py (see docs/robustness.md)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmadapters.speech import readers as speech_readers
from mmadapters.video import readers as video_readers
from mmadapters.vision import readers as image_readers
from mmadapters.vision import vl_readers

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _allowed(err: BaseException) -> bool:
    """A documented error: a ValueError that is not a bare UnicodeDecodeError, naming a file or row."""
    return isinstance(err, ValueError) and not isinstance(err, UnicodeDecodeError) and bool(str(err))


def _layout(kind: str, root: Path, data: bytes) -> Callable[[], object]:
    """Write ``data`` where reader ``kind`` looks for its file; return the call that reads it."""
    if kind == "nemo":
        (root / "m.jsonl").write_bytes(data)
        return lambda: speech_readers.read_manifest(root / "m.jsonl", lang="en")
    if kind == "common_voice":
        (root / "clips").mkdir()
        (root / "test.tsv").write_bytes(data)
        return lambda: speech_readers.read_common_voice(root, "test", lang="en")
    if kind == "mls":
        (root / "test").mkdir()
        (root / "test" / "transcripts.txt").write_bytes(data)
        return lambda: speech_readers.read_mls(root, "test", lang="en")
    if kind == "csv":
        (root / "test.csv").write_bytes(data)
        return lambda: image_readers.CsvDataset(root / "test.csv")
    if kind == "coop":
        (root / "split_zhou_X.json").write_bytes(data)
        return lambda: image_readers.CoopSplitDataset(root)
    if kind == "classnames":
        (root / "classnames.txt").write_bytes(data)
        return lambda: image_readers.read_classnames(root / "classnames.txt")
    if kind in ("vqa", "gqa", "nlvr2"):
        (root / "a.json").write_bytes(data)
        fn = {"vqa": vl_readers.read_vqa, "gqa": vl_readers.read_gqa, "nlvr2": vl_readers.read_nlvr2}[kind]
        return lambda: (fn(root / "a.json"), fn(root / "a.json", on_error="skip"))
    if kind == "coco":
        (root / "dataset_coco.json").write_bytes(data)
        return lambda: vl_readers.read_coco_karpathy(root / "dataset_coco.json", ("train", "val", "test"),
                                                     image_root=root, on_error="skip")
    if kind == "trafficqa":
        (root / "R2_test.jsonl").write_bytes(data)
        return lambda: video_readers.read_trafficqa(root / "R2_test.jsonl", video_root=root)
    if kind == "dfer":
        (root / "list.txt").write_bytes(data)
        return lambda: (video_readers.read_dfer_annotation(root / "list.txt", "dfew"),
                        video_readers.read_dfer_annotation(root / "list.txt", "ferv39k"))
    raise AssertionError(kind)


KINDS = ("nemo", "common_voice", "mls", "csv", "coop", "classnames", "vqa", "gqa", "nlvr2", "coco", "trafficqa", "dfer")


def check_reader(kind: str, data: bytes) -> None:
    """Run reader ``kind`` on ``data``; fail on any error it does not document."""
    with tempfile.TemporaryDirectory(prefix="mma-fuzz-") as tmp:
        read = _layout(kind, Path(tmp), data)
        try:
            read()
        except Exception as err:  # noqa: BLE001 - the point: which types escape
            if not _allowed(err):
                raise AssertionError(f"{kind}: undocumented {type(err).__name__}: {err}") from err


# ---------------------------------------------------------------------------------------------- strategies

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10 ** 30), 10 ** 30),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=12)
_KEYS = ["audio_filepath", "text", "lang", "duration", "id", "speaker", "question_id", "img_id", "sent", "label",
         "answers", "identifier", "img0", "img1", "sentence", "split", "filename", "filepath", "imgid", "sentences",
         "raw", "tokens", "vid_id", "vid_filename", "question", "q_body", "options", "answer", "perspective", "q_type",
         "option0", "option1", "option2", "option3", "record_id", "test", "train", "val", "images"]
_paths = st.sampled_from(["a.wav", "../x", "/etc/passwd", "", " ", "a\x00b", "clips/a.mp3", "x/../../y", "..", "."])
# dicts with the keys the readers look for, holding values of every JSON type (and path-like strings)
_rows = st.dictionaries(st.sampled_from(_KEYS), st.one_of(_json, _paths), max_size=8)
_structured = st.one_of(_rows, st.lists(_rows, max_size=4), st.dictionaries(st.sampled_from(_KEYS),
                                                                            st.lists(st.one_of(_rows, _json), max_size=3)))


def _to_bytes(value, as_lines: bool) -> bytes:
    if as_lines and isinstance(value, list):
        return "\n".join(json.dumps(v) for v in value).encode()
    return json.dumps(value).encode()


@FUZZ
@given(kind=st.sampled_from(KINDS), data=st.binary(max_size=300))
def test_readers_on_arbitrary_bytes(kind, data):
    check_reader(kind, data)


_cells = st.one_of(_paths, st.text(max_size=10), st.sampled_from(["0", "1", "7", "-1", "\u00b2", "cat", "3.5", "Sad"]))


@FUZZ
@given(kind=st.sampled_from(("common_voice", "mls", "csv", "dfer", "classnames")),
       rows=st.lists(st.lists(_cells, min_size=1, max_size=4), max_size=5), sep=st.sampled_from(["\t", ",", " "]))
def test_line_readers_on_arbitrary_tables(kind, rows, sep):
    header = {"common_voice": "client_id\tpath\tsentence\tlocale", "csv": "path,label"}.get(kind)
    lines = ([header] if header else []) + [sep.join(cells) for cells in rows]
    check_reader(kind, "\n".join(lines).encode())


@FUZZ
@given(kind=st.sampled_from(("nemo", "coop", "vqa", "gqa", "nlvr2", "coco", "trafficqa")), value=_structured,
       as_lines=st.booleans())
def test_json_readers_on_arbitrary_structures(kind, value, as_lines):
    check_reader(kind, _to_bytes(value, as_lines))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("data", [
    b"\xff\xfe\x00garbage", b"[" * 50_000 + b"]" * 50_000, b'{"a": 1' + b"0" * 5000 + b"}", b"\x00" * 64, b"",
])
def test_readers_on_known_hard_inputs(kind, data):
    """Inputs hypothesis found (or that broke readers before): non-UTF-8, deep nesting, huge integers, NULs."""
    check_reader(kind, data)
