"""Tem-Adapter's official-code options: candidate text, frame-feature scale, frame count (train -> eval)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mmadapters.vision.clip import tiny_clip_config, write_clip_dir


def cli_main(argv: list[str]) -> int:
    from mmadapters.eval import cli

    return cli.main(argv)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clip")
    write_clip_dir(d, tiny_clip_config(embed_dim=16, image_size=32, width=32, layers=1))
    return d


@pytest.fixture(scope="module")
def qa_root(tmp_path_factory) -> Path:
    from mmadapters.video.synth_traffic import generate_trafficqa

    return generate_trafficqa(tmp_path_factory.mktemp("qa"), n=8, seed=0, size=32, num_frames=16, progress=False)


def rows_of(qa_root: Path, split: str = "train"):
    from mmadapters.video.readers import read_trafficqa

    return read_trafficqa(qa_root / "annotations" / f"R2_{split}.jsonl", video_root=qa_root / "videos")


def test_candidate_texts_options_drop_the_question(qa_root):
    from mmadapters.video.qa_features import candidate_texts

    rows = rows_of(qa_root)[:2]
    ours = candidate_texts(rows)
    official = candidate_texts(rows, candidate_text="options", template="ignored {answer}")
    assert len(ours) == len(official) == 2 * len(rows[0].options)
    assert official[: len(rows[0].options)] == [o.strip() for o in rows[0].options]
    assert ours[0] == f"{rows[0].question.strip()} {rows[0].options[0].strip()}" != official[0]
    with pytest.raises(ValueError, match="candidate_text 'answers': expected one of question_answer, options"):
        candidate_texts(rows, candidate_text="answers")


def test_scale_frames_raw_keeps_clip_norms():
    from mmadapters.video.qa_features import scale_frames

    frames = torch.randn(2, 3, 8) * 5
    assert torch.equal(scale_frames(frames, "raw"), frames)
    assert torch.allclose(scale_frames(frames).norm(dim=-1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="frame_features 'unit'"):
        scale_frames(frames, "unit")


def test_recipe_options_are_checked_and_official_frame_count_runs():
    from mmadapters.video.tem_adapter import TemAdapter, TemAdapterConfig
    from mmadapters.video.tem_train import TemAdapterRecipeConfig

    for field, value in (("candidate_text", "question"), ("frame_features", "l2")):
        with pytest.raises(ValueError, match=f"recipe.{field}: expected one of"):
            TemAdapterRecipeConfig(train_annotations="x.jsonl", **{field: value})
    assert TemAdapterRecipeConfig(train_annotations="x.jsonl", num_frames=128).num_frames == 128
    # the official 8 clips x 16 frames = 128 frames through both aligners, with the future prediction
    model = TemAdapter(TemAdapterConfig.for_dim(16))
    out = model(torch.randn(2, 128, 16), torch.randn(2, 4, 16), torch.tensor([0, 3]))
    assert out.prediction.shape == (2, 127, 16) and out.scores.shape == (2, 4)


def test_encode_split_honours_the_options(qa_root, clip_dir, tmp_path):
    from mmadapters.video.qa_features import encode_split
    from mmadapters.vision.clip import load_clip

    clip = load_clip(f"local-dir:{clip_dir}", None, seed=0, declare_points=False)
    common = {"video_root": qa_root / "videos", "cache_dir": tmp_path / "cache"}
    annotations = qa_root / "annotations" / "R2_train.jsonl"
    ours = encode_split(clip, annotations, num_frames=4, **common)
    official = encode_split(clip, annotations, num_frames=6, candidate_text="options", frame_features="raw", **common)
    assert ours.features.frames.shape[1] == 4 and official.features.frames.shape[1] == 6
    assert torch.allclose(ours.features.frames.norm(dim=-1), torch.ones(ours.features.frames.shape[:2]), atol=1e-5)
    raw_norms = official.features.frames.norm(dim=-1)
    assert not torch.allclose(raw_norms, torch.ones_like(raw_norms), atol=1e-2)
    # the same frames at either scale: the raw ones normalize to ours (same sampled frames at T = 4)
    raw4 = encode_split(clip, annotations, num_frames=4, frame_features="raw", **common)
    assert torch.allclose(torch.nn.functional.normalize(raw4.features.frames, dim=-1), ours.features.frames, atol=1e-5)
    real = ours.features.mask
    assert not torch.allclose(ours.features.candidates[real], official.features.candidates[real], atol=1e-3)
    with pytest.raises(ValueError, match="frame_features 'unit'"):
        encode_split(clip, annotations, frame_features="unit", **common)


def test_old_runs_load_with_todays_defaults(tmp_path):
    from mmadapters.video.tem_adapter import TemAdapter, TemAdapterConfig
    from mmadapters.video.tem_train import load_tem_run, save_tem_run

    save_tem_run(TemAdapter(TemAdapterConfig.for_dim(16)), tmp_path / "old", {
        "recipe": "tem-adapter", "clip": {}, "num_frames": 4, "template": "{question} {answer}"})
    _, meta = load_tem_run(tmp_path / "old")
    assert meta["candidate_text"] == "question_answer" and meta["frame_features"] == "normalized"
    save_tem_run(TemAdapter(TemAdapterConfig.for_dim(16)), tmp_path / "bad", {
        "recipe": "tem-adapter", "clip": {}, "num_frames": 4, "template": "{question} {answer}", "frame_features": "l2"})
    with pytest.raises(ValueError, match="field 'frame_features': expected one of normalized, raw"):
        load_tem_run(tmp_path / "bad")


def test_train_then_eval_with_the_official_options(qa_root, clip_dir, tmp_path, capsys):
    """Train with options-only texts, raw features and 6 frames; eval reads them from the run and scores the
    test questions exactly as the saved model does on features built the same way."""
    from mmadapters.eval.results_schema import read_results
    from mmadapters.video.qa_features import encode_split
    from mmadapters.video.tem_train import load_tem_run, predict_scores
    from mmadapters.vision.clip import load_clip

    out, cache = tmp_path / "run", tmp_path / "cache"
    recipe = {"train_annotations": str(qa_root / "annotations" / "R2_train.jsonl"), "video_root": str(qa_root / "videos"),
              "model": f"local-dir:{clip_dir}", "num_frames": 6, "cache_dir": str(cache), "candidate_text": "options",
              "frame_features": "raw"}
    config = tmp_path / "tem.yaml"
    config.write_text(yaml.safe_dump({"output": str(out), "recipe": recipe, "trainer": {
        "progress": False, "seed": 0, "steps": 4, "batch_size": 4, "lr": 1e-3, "eval_every": 2, "checkpoint_every": 2}}))
    assert cli_main(["train", "tem-adapter", "--config", str(config)]) == 0
    model, meta = load_tem_run(out / "best")
    assert (meta["candidate_text"], meta["frame_features"], meta["num_frames"]) == ("options", "raw", 6)

    common = ["eval", "videoqa", "--annotations", str(qa_root / "annotations" / "R2_test.jsonl"), "--video-root",
              str(qa_root / "videos"), "--adapters", str(out / "best"), "--cache-dir", str(cache), "--no-progress"]
    predictions = tmp_path / "pred.jsonl"
    assert cli_main([*common, "--output", str(tmp_path / "test.json"), "--predictions", str(predictions)]) == 0
    settings = read_results(tmp_path / "test.json")["settings"]
    assert (settings["candidate_text"], settings["frame_features"], settings["num_frames"]) == ("options", "raw", 6)
    clip = load_clip(f"local-dir:{clip_dir}", None, seed=0, declare_points=False)
    test = encode_split(clip, qa_root / "annotations" / "R2_test.jsonl", video_root=qa_root / "videos", num_frames=6,
                        candidate_text="options", frame_features="raw", cache_dir=cache)
    expected = predict_scores(model, test.features)
    got = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(got) == len(expected)
    for record, row in zip(got, expected, strict=True):
        assert record["prediction"] == int(row.argmax())
        assert [s for s in record["scores"] if s is not None] == pytest.approx(row[row.isfinite()].tolist(), abs=1e-4)

    # a flag contradicting the run is an error naming it; --template has no use with options-only texts
    assert cli_main([*common, "--output", str(tmp_path / "x.json"), "--candidate-text", "question_answer"]) == 2
    assert "--candidate-text 'question_answer': the Tem-Adapter" in capsys.readouterr().err
    assert cli_main([*common, "--output", str(tmp_path / "y.json"), "--template", "{question} {answer}"]) == 2
    assert "--template" in capsys.readouterr().err
    # zero-shot with the official candidate texts
    zs = ["eval", "videoqa", "--annotations", str(qa_root / "annotations" / "R2_test.jsonl"), "--video-root",
          str(qa_root / "videos"), "--model", f"local-dir:{clip_dir}", "--cache-dir", str(cache), "--no-progress",
          "--num-frames", "6", "--candidate-text", "options", "--output", str(tmp_path / "zs.json")]
    assert cli_main(zs) == 0
    assert read_results(tmp_path / "zs.json")["settings"]["candidate_text"] == "options"
