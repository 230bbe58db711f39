"""Bad annotation / manifest files of every reader: each raises the reader's error naming the file, the row or
line and the field (or, with on_error="skip", leaves the row out and records why). Part of the bad-input
catalogue in docs/robustness.md."""

from __future__ import annotations

import json

import pytest

from mmadapters.speech.readers import PathEscapeError, SpeechDataError, read_common_voice, read_manifest, read_mls
from mmadapters.video.readers import AnnotationError, read_dfer_annotation, read_trafficqa
from mmadapters.vision.readers import CoopSplitDataset, CsvDataset, ImageFolderDataset, read_classnames
from mmadapters.vision.vl_readers import read_coco_karpathy, read_gqa, read_nlvr2, read_vqa


def _names(err: pytest.ExceptionInfo, *parts: str) -> None:
    text = str(err.value)
    for part in parts:
        assert part in text, f"{part!r} not in {text!r}"


# ----------------------------------------------------------------------------------------- NeMo / CV / MLS


def test_nemo_manifest_line_missing_a_field(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"audio_filepath": "a.wav", "text": "hi", "lang": "en"}\n{"audio_filepath": "b.wav", "lang": "en"}\n')
    with pytest.raises(SpeechDataError) as err:
        read_manifest(path)
    _names(err, f"{path}:2", "missing field 'text'", "expected a str")


def test_nemo_manifest_bad_json(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"audio_filepath": "a.wav", "text": "hi", "lang": "en"\n')
    with pytest.raises(SpeechDataError) as err:
        read_manifest(path)
    _names(err, f"{path}:1", "invalid JSON", "expected one JSON object per line")


def test_nemo_manifest_path_escaping_the_root(tmp_path):
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "m.jsonl"
    path.write_text('{"audio_filepath": "../../etc/passwd", "text": "hi", "lang": "en"}\n')
    with pytest.raises(PathEscapeError) as err:
        read_manifest(path)
    _names(err, f"{path}:1", "field 'audio_filepath'", "outside the dataset root")


def test_nemo_manifest_duration_of_400_digits(tmp_path):
    """Regression: math.isfinite() of a 400-digit JSON integer raised OverflowError (no file named)."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"audio_filepath": "a.wav", "text": "hi", "lang": "en", "duration": 1' + "0" * 400 + "}\n")
    with pytest.raises(SpeechDataError) as err:
        read_manifest(path)
    _names(err, f"{path}:1", "field 'duration'", "expected a non-negative number of seconds")


def test_common_voice_tsv_missing_column(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "test.tsv").write_text("client_id\tpath\tlocale\nc1\ta.mp3\ten\n")
    with pytest.raises(SpeechDataError) as err:
        read_common_voice(tmp_path, "test")
    _names(err, f"{tmp_path / 'test.tsv'}:1", "missing column 'sentence'")


def test_common_voice_tsv_not_utf8(tmp_path):
    """Regression: a Latin-1 header raised a bare UnicodeDecodeError."""
    (tmp_path / "clips").mkdir()
    (tmp_path / "test.tsv").write_bytes(b"client_id\tpath\tsent\xe9nce\tlocale\n")
    with pytest.raises(SpeechDataError) as err:
        read_common_voice(tmp_path, "test")
    _names(err, str(tmp_path / "test.tsv"), "not UTF-8 text")


def test_mls_transcript_with_a_malformed_id(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "transcripts.txt").write_text("10_20_30\thello\nspeaker-book\tworld\n")
    with pytest.raises(SpeechDataError) as err:
        read_mls(tmp_path, "test", lang="en")
    _names(err, f"{tmp_path / 'test' / 'transcripts.txt'}:2", "'speaker-book' is not <speaker>_<book>_<utterance>")


# ------------------------------------------------------------------------------------ image classification


def test_csv_unknown_label(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("path,label\na.png,cat\nb.png,zebra\n")
    with pytest.raises(ValueError) as err:
        CsvDataset(path, classnames=["cat", "dog"])
    _names(err, str(path), "row 3 field 'label'", "expected a class index or one of the 2 class names", "'zebra'")


def test_csv_label_with_non_ascii_digits(tmp_path):
    """Regression: '²'.isdigit() is True, so int('²') raised a bare ValueError."""
    path = tmp_path / "test.csv"
    path.write_text("path,label\na.png,\u00b2\n")
    with pytest.raises(ValueError) as err:
        CsvDataset(path, classnames=["a", "b", "c"])
    _names(err, str(path), "row 2 field 'label'")


def test_csv_path_escaping_the_root(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("path,label\n../outside.png,cat\n")
    with pytest.raises(ValueError) as err:
        CsvDataset(path)
    _names(err, str(path), "row 2 field 'path'", "escapes the dataset root")


def test_csv_with_a_nul_byte_in_a_path(tmp_path):
    """Regression: pathlib raised a bare 'embedded null byte' ValueError naming neither file nor row."""
    path = tmp_path / "test.csv"
    path.write_text("path,label\na\x00.png,cat\n")
    with pytest.raises(ValueError) as err:
        CsvDataset(path)
    _names(err, str(path), "row 2 field 'path'", "NUL byte")


def test_coop_split_bad_json(tmp_path):
    (tmp_path / "split_zhou_Pets.json").write_text('{"test": [["a.jpg", 0, "cat"]')
    with pytest.raises(ValueError) as err:
        CoopSplitDataset(tmp_path)
    _names(err, str(tmp_path / "split_zhou_Pets.json"), "not valid JSON")


def test_coop_split_path_escaping_the_root(tmp_path):
    (tmp_path / "split_zhou_Pets.json").write_text(json.dumps({"test": [["/etc/passwd", 0, "cat"]]}))
    with pytest.raises(ValueError) as err:
        CoopSplitDataset(tmp_path)
    _names(err, "split_zhou_Pets.json", "test[0] field 'path'", "escapes the dataset root")


def test_coop_split_one_label_two_names(tmp_path):
    data = {"test": [["a.jpg", 0, "cat"], ["b.jpg", 0, "dog"]]}
    (tmp_path / "split_zhou_Pets.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        CoopSplitDataset(tmp_path)
    _names(err, "split_zhou_Pets.json", "test[1] field 'classname'", "named both 'cat' and 'dog'")


def test_image_folder_class_names_that_collide(tmp_path):
    """'sea_lion' and 'sea lion' are both the class name 'sea lion': refused instead of two identical classes."""
    for folder in ("sea_lion", "sea lion"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(b"not read here")
    with pytest.raises(ValueError) as err:
        ImageFolderDataset(tmp_path)
    _names(err, str(tmp_path), "class name 'sea lion' appears twice")


def test_classnames_file_with_duplicates(tmp_path):
    path = tmp_path / "classnames.txt"
    path.write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError) as err:
        read_classnames(path)
    _names(err, str(path), "class name 'cat' appears twice (classes 0 and 2)")


# ------------------------------------------------------------------------------------------ vision-language


def _vqa_row(i, **over):
    row = {"question_id": i, "img_id": f"img{i}", "sent": "what colour?", "label": {"red": 1.0}}
    row.update(over)
    return row


def test_vqa_row_missing_a_field_raises_or_is_skipped_and_recorded(tmp_path):
    path = tmp_path / "karpathy_test.json"
    bad = _vqa_row(1)
    del bad["sent"]
    path.write_text(json.dumps([_vqa_row(0), bad, _vqa_row(2)]))
    with pytest.raises(ValueError) as err:
        read_vqa(path)
    _names(err, str(path), "row 1", "field 'sent': missing")
    split = read_vqa(path, on_error="skip")
    assert [s.uid for s in split] == ["0", "2"]
    assert len(split.skipped) == 1 and split.skipped[0][0] == 1 and "field 'sent'" in split.skipped[0][1]


def test_vqa_not_a_list(tmp_path):
    path = tmp_path / "karpathy_test.json"
    path.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError) as err:
        read_vqa(path, on_error="skip")  # a whole-file problem raises even in skip mode
    _names(err, str(path), "expected a JSON list of VQA rows, got dict")


def test_gqa_bad_label_score(tmp_path):
    path = tmp_path / "testdev.json"
    path.write_text(json.dumps([_vqa_row(0, label={"yes": -1})]))
    with pytest.raises(ValueError) as err:
        read_gqa(path)
    _names(err, str(path), "row 0", "field 'label'", "must be a finite number >= 0")


def test_nlvr2_unknown_label(tmp_path):
    path = tmp_path / "test.json"
    path.write_text('{"identifier": "dev-1-0-0", "sent": "two dogs", "label": "maybe"}\n')
    with pytest.raises(ValueError) as err:
        read_nlvr2(path)
    _names(err, str(path), "line 1", "field 'label'", "expected 0 or 1")


def test_nlvr2_bad_json_line_is_skipped_and_recorded(tmp_path):
    path = tmp_path / "test.json"
    path.write_text('{"identifier": "dev-1-0-0", "sent": "a", "label": 1}\n{"identifier": \n')
    split = read_nlvr2(path, on_error="skip")
    assert len(split) == 1 and split.skipped[0][0] == 2 and "not valid JSON" in split.skipped[0][1]


def test_vl_json_nested_too_deeply(tmp_path):
    """Regression: json.loads raised RecursionError (no file named) on 100,000 nested brackets."""
    path = tmp_path / "karpathy_test.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError) as err:
        read_vqa(path)
    _names(err, str(path), "not valid JSON", "nested too deeply")


def test_coco_karpathy_unknown_split_and_escaping_path(tmp_path):
    path = tmp_path / "dataset_coco.json"
    image = {"filepath": "val2014", "filename": "a.jpg", "imgid": 1, "split": "val", "sentences": [{"raw": "a cat"}]}
    path.write_text(json.dumps({"images": [{**image, "split": "holdout"}]}))
    with pytest.raises(ValueError) as err:
        read_coco_karpathy(path, "val")
    _names(err, str(path), "images[0]", "field 'split': unknown split 'holdout'")
    path.write_text(json.dumps({"images": [{**image, "filepath": "../.."}]}))
    with pytest.raises(ValueError) as err:
        read_coco_karpathy(path, "val", image_root=tmp_path / "images")
    _names(err, str(path), "images[0]", "fields 'filepath'/'filename'", "escapes the dataset root")


# -------------------------------------------------------------------------------------------------- video


def test_trafficqa_answer_out_of_range(tmp_path):
    path = tmp_path / "R2_test.jsonl"
    path.write_text(json.dumps({"vid_id": 1, "vid_filename": "b_1.mp4", "question": "why?", "options": ["a", "b"],
                                "answer": 3}) + "\n")
    with pytest.raises(AnnotationError) as err:
        read_trafficqa(path)
    _names(err, str(path), "line 1 field 'answer'", "does not index a non-empty option")


def test_trafficqa_video_escaping_the_root(tmp_path):
    path = tmp_path / "R2_test.jsonl"
    path.write_text(json.dumps({"vid_id": 1, "vid_filename": "../../x.mp4", "question": "why?", "options": ["a", "b"],
                                "answer": 0}) + "\n")
    with pytest.raises(AnnotationError) as err:
        read_trafficqa(path, video_root=tmp_path / "videos")
    _names(err, str(path), "line 1 field 'vid_filename'", "escapes the root")


def test_trafficqa_not_utf8(tmp_path):
    """Regression: a Latin-1 line raised a bare UnicodeDecodeError."""
    path = tmp_path / "R2_test.jsonl"
    path.write_bytes(b'{"vid_id": 1, "question": "caf\xe9"}\n')
    with pytest.raises(AnnotationError) as err:
        read_trafficqa(path)
    _names(err, str(path), "line 1", "not UTF-8 text")


def test_dfer_label_out_of_range(tmp_path):
    path = tmp_path / "DFEW_set_1_test.txt"
    path.write_text("clips/00001 16 3\nclips/00002 16 9\n")
    with pytest.raises(AnnotationError) as err:
        read_dfer_annotation(path, "dfew")
    _names(err, str(path), "line 2 field 'label'", "expected 1..7", "got 9")


def test_dfer_frame_dir_escaping_the_root(tmp_path):
    path = tmp_path / "DFEW_set_1_test.txt"
    path.write_text("/data/elsewhere/00001 16 3\n")
    with pytest.raises(AnnotationError) as err:
        read_dfer_annotation(path, "dfew")
    _names(err, str(path), "line 1 field 'frame_dir'", "is outside the root", "strip_prefix")
