"""`mmadapters eval videoqa` and `mmadapters eval dfer`: shared schema, resume after a crash, bad samples skipped."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from mmadapters.eval.results_schema import read_results
from mmadapters.vision.clip import tiny_clip_config, write_clip_dir


def eval_main(argv: list[str]) -> int:
    """``mmadapters eval ...`` (through the top-level CLI once it has the subcommand, else our parsers)."""
    from mmadapters.eval import cli, eval_video_args

    if "eval" in cli.build_parser()._subparsers._group_actions[0].choices:  # noqa: SLF001
        return cli.main(["eval", *argv])
    parser = argparse.ArgumentParser(prog="mmadapters eval")
    eval_video_args.register(parser.add_subparsers(dest="task", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clip")
    write_clip_dir(d, tiny_clip_config(embed_dim=16, image_size=32, width=32, layers=1))
    return d


@pytest.fixture(scope="module")
def qa_root(tmp_path_factory) -> Path:
    """Generated TrafficQA-style clips, plus a corrupt video asked about in the test split."""
    from mmadapters.video.synth_traffic import generate_trafficqa

    root = generate_trafficqa(tmp_path_factory.mktemp("qa"), n=6, seed=0, size=32, num_frames=16, progress=False)
    (root / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    test = root / "annotations" / "R2_test.jsonl"
    row = json.loads(test.read_text().splitlines()[1])
    row[1:3] = [999, "broken.mp4"]
    with open(test, "a") as f:
        f.write(json.dumps(row) + "\n")
    return root


@pytest.fixture(scope="module")
def faces_root(tmp_path_factory) -> Path:
    """Generated DFEW-style face clips; one test clip's first frame is a corrupt PNG."""
    from mmadapters.video.synth_faces import generate_faces

    root = generate_faces(tmp_path_factory.mktemp("faces"), n=14, seed=0, size=32, num_frames=8, folds=2, videos=False,
                          progress=False)
    first = (root / "annotation" / "DFEW_set_1_test.txt").read_text().split()[0]
    frame = sorted((root / first).iterdir())[0]
    frame.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def videoqa_args(qa_root: Path, clip_dir: Path, tmp_path: Path, output: Path, *extra: str, frames: int = 4) -> list[str]:
    return ["videoqa", "--annotations", str(qa_root / "annotations" / "R2_test.jsonl"), "--video-root", str(qa_root / "videos"),
            "--model", f"local-dir:{clip_dir}", "--num-frames", str(frames), "--cache-dir", str(tmp_path / "cache"),
            "--output", str(output), "--batch-size", "2", "--no-progress", *extra]


def dfer_args(faces_root: Path, clip_dir: Path, output: Path, *extra: str) -> list[str]:
    return ["dfer", "--data-dir", str(faces_root), "--fold", "1", "--split", "test", "--model", f"local-dir:{clip_dir}",
            "--num-frames", "3", "--output", str(output), "--batch-size", "3", "--no-progress", *extra]


def test_videoqa_zeroshot_schema_and_corrupt_video(qa_root, clip_dir, tmp_path, capsys):
    out, predictions = tmp_path / "zs.json", tmp_path / "pred" / "zs.jsonl"
    assert eval_main(videoqa_args(qa_root, clip_dir, tmp_path, out, "--predictions", str(predictions))) == 0
    r = read_results(out)
    assert r["task"] == "videoqa_multiple_choice" and r["settings"]["method"] == "zeroshot"
    assert list(r["metrics"]) == ["acc", "chance"] and 0.0 <= r["metrics"]["acc"] <= 1.0
    rows = (qa_root / "annotations" / "R2_test.jsonl").read_text().splitlines()
    assert r["counts"]["total"] == len(rows) - 1  # minus the header line
    assert r["counts"]["skipped"] == 1 and r["skipped"][0]["id"] == f"line{len(rows)}"
    assert r["skipped"][0]["reason"].startswith("VideoError: ") and "broken.mp4" in r["skipped"][0]["reason"]
    assert set(r["per_group"]) <= {"U", "R", "F"}
    assert sum(g["questions"] for g in r["per_group"].values()) == r["counts"]["evaluated"]
    assert r["parameters"]["trainable"] == 0
    assert not list(tmp_path.glob("zs.json.samples*"))  # the log is removed once the results are written
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [p["id"] for p in lines] == [f"line{n}" for n in range(2, len(rows))]  # file order, the broken one left out
    assert sum(p["prediction"] == p["answer"] for p in lines) / len(lines) == r["metrics"]["acc"]
    assert {"scores", "options", "q_type", "video"} <= set(lines[0])
    capsys.readouterr()
    assert eval_main(videoqa_args(qa_root, clip_dir, tmp_path, tmp_path / "ff.json", "--fail-fast")) == 2
    assert "broken.mp4" in capsys.readouterr().err


def test_videoqa_resumes_after_a_crash(qa_root, clip_dir, tmp_path, monkeypatch):
    from mmadapters.eval import video_tasks

    full = tmp_path / "full.json"
    assert eval_main(videoqa_args(qa_root, clip_dir, tmp_path, full)) == 0
    reference = read_results(full)

    real, calls = video_tasks.score_questions, []

    def crash_on_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies mid-run
        return real(*a, **k)

    out = tmp_path / "crash.json"
    monkeypatch.setattr(video_tasks, "score_questions", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        eval_main(videoqa_args(qa_root, clip_dir, tmp_path, out))
    assert not out.exists() and len((tmp_path / "crash.json.samples.jsonl").read_text().splitlines()) == 1 + 2
    monkeypatch.setattr(video_tasks, "score_questions", real)
    assert eval_main(videoqa_args(qa_root, clip_dir, tmp_path, out)) == 0
    resumed = read_results(out)
    assert resumed["counts"]["resumed"] == 2 and resumed["run_key"] == reference["run_key"]
    assert resumed["metrics"] == reference["metrics"] and resumed["per_group"] == reference["per_group"]
    assert resumed["skipped"] == reference["skipped"]


def test_videoqa_with_trained_adapters(qa_root, clip_dir, tmp_path):
    """A saved Tem-Adapter scores the questions; its recorded frame count is enforced."""
    from mmadapters.video.tem_adapter import TemAdapter, TemAdapterConfig
    from mmadapters.video.tem_train import save_tem_run

    torch.manual_seed(0)
    config = TemAdapterConfig.for_dim(16)
    run = tmp_path / "best"
    save_tem_run(TemAdapter(config), run, {"recipe": "tem-adapter", "clip": {"model": f"local-dir:{clip_dir}"},
                                           "num_frames": 4, "template": "{question} {answer}"})
    out = tmp_path / "tem.json"
    assert eval_main(videoqa_args(qa_root, clip_dir, tmp_path, out, "--adapters", str(run))) == 0
    r = read_results(out)
    assert r["settings"]["method"] == "tem_adapter" and r["parameters"]["trainable"] == sum(
        p.numel() for p in TemAdapter(config).parameters())

def test_videoqa_adapter_errors_are_named(qa_root, clip_dir, tmp_path, capsys):
    from mmadapters.video.tem_adapter import TemAdapter, TemAdapterConfig
    from mmadapters.video.tem_train import save_tem_run

    run = tmp_path / "best"
    save_tem_run(TemAdapter(TemAdapterConfig.for_dim(16)), run, {"recipe": "tem-adapter", "clip": {"model": f"local-dir:{clip_dir}"},
                                                                 "num_frames": 4, "template": "{question} {answer}"})
    assert eval_main(videoqa_args(qa_root, clip_dir, tmp_path, tmp_path / "x.json", "--adapters", str(run), frames=8)) == 2
    assert "--num-frames 8: the Tem-Adapter" in capsys.readouterr().err
    assert eval_main(videoqa_args(qa_root, clip_dir, tmp_path, tmp_path / "y.json", "--adapters", str(tmp_path))) == 2
    assert "not a Tem-Adapter run directory (expected tem_adapter.safetensors" in capsys.readouterr().err


def test_dfer_zeroshot_schema_and_corrupt_clip(faces_root, clip_dir, tmp_path):
    full = tmp_path / "full.json"
    assert eval_main(dfer_args(faces_root, clip_dir, full)) == 0
    r = read_results(full)
    assert r["task"] == "dfer" and list(r["metrics"]) == ["uar", "war"]
    assert r["counts"]["total"] == 7 and r["counts"]["skipped"] == 1
    assert "unreadable frame image" in r["skipped"][0]["reason"] and r["skipped"][0]["id"].startswith("frames/")
    assert set(r["per_group"]) == {"happiness", "sadness", "neutral", "anger", "surprise", "disgust", "fear"}
    assert sum(g["clips"] for g in r["per_group"].values()) == r["counts"]["evaluated"]



def test_dfer_resumes_after_a_crash_with_a_torn_log(faces_root, clip_dir, tmp_path, monkeypatch):
    from mmadapters.eval import video_tasks

    full = tmp_path / "full.json"
    assert eval_main(dfer_args(faces_root, clip_dir, full)) == 0
    reference = read_results(full)

    real = video_tasks.make_dfer_predict

    def dies_after_one_batch(**kwargs):
        predict, calls = real(**kwargs), []

        def wrapped(batch):
            calls.append(1)
            if len(calls) == 2:
                raise SystemExit(137)  # killed
            return predict(batch)

        return wrapped

    out = tmp_path / "crash.json"
    monkeypatch.setattr(video_tasks, "make_dfer_predict", dies_after_one_batch)
    with pytest.raises(SystemExit):
        eval_main(dfer_args(faces_root, clip_dir, out))
    monkeypatch.setattr(video_tasks, "make_dfer_predict", real)
    log = tmp_path / "crash.json.samples.jsonl"
    assert len(log.read_text().splitlines()) == 1 + 3
    with open(log, "a") as f:
        f.write('{"id": "frames/000')  # the line being written when the process died
    assert eval_main(dfer_args(faces_root, clip_dir, out)) == 0
    resumed = read_results(out)
    assert resumed["counts"]["resumed"] == 3
    assert resumed["metrics"] == reference["metrics"] and resumed["per_group"] == reference["per_group"]
    assert resumed["skipped"] == reference["skipped"]
