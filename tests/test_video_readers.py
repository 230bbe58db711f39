"""Video benchmark annotation readers: SUTD-TrafficQA jsonl (both layouts), DFEW / MAFW / FERV39k folds."""

from __future__ import annotations

import json

import pytest

from mmadapters.video.readers import (
    DFEW_CLASSES,
    MAFW_CLASSES,
    TRAFFICQA_HEADER,
    AnnotationError,
    dfer_annotation_path,
    read_dfer_annotation,
    read_trafficqa,
    trafficqa_video_path,
)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


OFFICIAL_ROW = [9875, 20485, "b_1ZV411k741_clip_023.mp4", 1, "What type of accident happened in the video?", "E",
                "Head-on collision", "No accident happened.", "Others", "", 1]


def test_trafficqa_official_layout_with_header(tmp_path):
    path = write_lines(tmp_path / "R2_test.jsonl", [json.dumps(list(TRAFFICQA_HEADER)), json.dumps(OFFICIAL_ROW),
                                                    "", json.dumps([1, 2, "v.mp4", 3, "Q?", "U", "Yes", "No", "", "", 0])])
    rows = read_trafficqa(path)
    assert len(rows) == 2
    row = rows[0]
    assert (row.record_id, row.vid_id, row.vid_filename, row.perspective, row.q_type) == (
        9875, 20485, "b_1ZV411k741_clip_023.mp4", 1, "E")
    assert row.question.startswith("What type") and row.answer == 1
    assert row.options == ("Head-on collision", "No accident happened.", "Others", "")
    assert row.num_options == 3 and row.option_mask == (True, True, True, False)
    assert rows[1].line == 4 and rows[1].num_options == 2


def test_trafficqa_headerless_lists_and_object_layout(tmp_path):
    assert read_trafficqa(write_lines(tmp_path / "a.jsonl", [json.dumps(OFFICIAL_ROW)]))[0].answer == 1
    objects = [{"vid_id": "v0", "vid_filename": "videos/v0.mp4", "question": "What happens next?",
                "options": ["it grows", "it turns red", "it moves left", "nothing"], "answer": 2, "q_type": "F"},
               {"vid_id": 7, "vid_filename": "v7.mp4", "q_body": "Which shape?", "option0": "a", "option1": "b",
                "option2": "c", "option3": "d", "answer": 3}]
    rows = read_trafficqa(write_lines(tmp_path / "b.jsonl", [json.dumps(o) for o in objects]), video_root=tmp_path)
    assert rows[0].options[2] == "it moves left" and rows[0].q_type == "F" and rows[0].record_id is None
    assert rows[1].question == "Which shape?" and rows[1].options == ("a", "b", "c", "d")
    assert trafficqa_video_path(rows[0], tmp_path) == (tmp_path / "videos" / "v0.mp4").resolve()


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 1: not valid JSON"),
    (json.dumps(OFFICIAL_ROW[:-1]), "expected a list of 11 values"),
    (json.dumps({**dict(zip(TRAFFICQA_HEADER, OFFICIAL_ROW, strict=True)), "answer": 3}), "field 'answer'"),
    (json.dumps({**dict(zip(TRAFFICQA_HEADER, OFFICIAL_ROW, strict=True)), "answer": "1"}), "field 'answer': expected int"),
    (json.dumps({"vid_id": 1, "vid_filename": "v.mp4", "options": ["a", "b"], "answer": 0}), "missing field 'question'"),
    (json.dumps({"vid_id": 1, "vid_filename": "v.mp4", "question": "q", "options": ["a"] * 5, "answer": 0}),
     "field 'options': expected 2..4"),
    ("3", "expected a JSON list or object"),
])
def test_trafficqa_errors_name_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [line])
    with pytest.raises(AnnotationError, match=message) as info:
        read_trafficqa(path)
    assert str(path) in str(info.value)


def test_trafficqa_paths_cannot_escape_the_video_root(tmp_path):
    row = {"vid_id": 1, "vid_filename": "../../etc/passwd", "question": "q", "options": ["a", "b"], "answer": 0}
    path = write_lines(tmp_path / "esc.jsonl", [json.dumps(row)])
    assert read_trafficqa(path)[0].vid_filename == "../../etc/passwd"  # no root given: nothing to check against
    with pytest.raises(AnnotationError, match=r"line 1 field 'vid_filename'.*escapes the root"):
        read_trafficqa(path, video_root=tmp_path / "videos")
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        read_trafficqa(tmp_path / "missing.jsonl")


def test_dfew_fold_file(tmp_path):
    ann = tmp_path / "annotation"
    ann.mkdir()
    path = write_lines(dfer_annotation_path("DFEW", ann, "train", fold=3), ["clips/00001 16 1", "clips/00002 40 7"])
    assert path.name == "DFEW_set_3_train.txt"
    clips = read_dfer_annotation(path, "dfew", root=tmp_path)
    assert [(c.frame_dir, c.num_frames, c.label, c.raw_label) for c in clips] == [
        ((tmp_path / "clips/00001").resolve(), 16, 0, "1"), ((tmp_path / "clips/00002").resolve(), 40, 6, "7")]
    assert DFEW_CLASSES[clips[1].label] == "fear" and clips[1].line == 2
    # DFER-CLIP's published lists are 0-based (fed straight to a 7-way cross-entropy)
    zero = read_dfer_annotation(write_lines(ann / "zero.txt", ["clips/00001 16 0", "clips/00002 40 6"]), "dfew",
                                root=tmp_path, label_base=0)
    assert [c.label for c in zero] == [0, 6]
    with pytest.raises(AnnotationError, match=r"field 'label': expected 0..6 \(dfew, label_base=0\), got 7"):
        read_dfer_annotation(write_lines(ann / "bad.txt", ["clips/1 16 7"]), "dfew", root=tmp_path, label_base=0)
    with pytest.raises(ValueError, match="label_base=2"):
        read_dfer_annotation(path, "dfew", label_base=2)


def test_absolute_author_paths_need_strip_prefix(tmp_path):
    path = write_lines(tmp_path / "MAFW_set_1_test.txt", ["/data/lab/MAFW/faces/00025 47 11"])
    with pytest.raises(AnnotationError, match="outside the root.*strip_prefix"):
        read_dfer_annotation(path, "mafw", root=tmp_path)
    clip = read_dfer_annotation(path, "MAFW", root=tmp_path, strip_prefix="/data/lab/MAFW")[0]
    assert clip.frame_dir == (tmp_path / "faces/00025").resolve() and MAFW_CLASSES[clip.label] == "disappointment"


def test_ferv39k_both_formats(tmp_path):
    assert dfer_annotation_path("ferv39k", tmp_path, "test").name == "FERV39K_test.txt"
    ours = read_dfer_annotation(write_lines(tmp_path / "FERV39K_test.txt", ["Action/Sad/0010 30 2"]), "ferv39k")
    official = read_dfer_annotation(write_lines(tmp_path / "test_All.csv", ["Action/Sad/0010 Sad"]), "FERV39k")
    assert ours[0].label == official[0].label == 1 and official[0].num_frames == 0
    assert ours[0].frame_dir == official[0].frame_dir == (tmp_path / "Action/Sad/0010").resolve()


@pytest.mark.parametrize("dataset, line, message", [
    ("dfew", "clips/1 16 8", r"line 1 field 'label': expected 1..7"),
    ("dfew", "clips/1 16 0", r"field 'label': expected 1..7"),
    ("mafw", "clips/1 16 12", r"field 'label': expected 1..11"),
    ("dfew", "clips/1 many 3", r"field 'num_frames': expected an integer"),
    ("dfew", "clips/1 0 3", r"field 'num_frames': expected >= 1"),
    ("dfew", "clips/1 happy", r"line 1: expected '<frame_dir> <num_frames> <label>', got 2 fields"),
    ("ferv39k", "Action/x/1 Bored", r"field 'label': expected one of"),
    ("dfew", "../outside 16 3", r"field 'frame_dir'.*escapes the root"),
])
def test_dfer_errors(tmp_path, dataset, line, message):
    path = write_lines(tmp_path / "ann.txt", [line])
    with pytest.raises(AnnotationError, match=message) as info:
        read_dfer_annotation(path, dataset)
    assert str(path) in str(info.value)


def test_dfer_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="fold 6"):
        dfer_annotation_path("dfew", tmp_path, "train", fold=6)
    with pytest.raises(ValueError, match="one split"):
        dfer_annotation_path("ferv39k", tmp_path, "train", fold=2)
    with pytest.raises(ValueError, match="expected one of dfew, mafw, ferv39k"):
        read_dfer_annotation(tmp_path / "x.txt", "afew")
    with pytest.raises(AnnotationError, match="no clips"):
        read_dfer_annotation(write_lines(tmp_path / "empty.txt", [""]), "dfew")
