"""Tem-Adapter: shapes, γ init, the hinge on a hand case, the two official-code bugs, training, save/load."""

from __future__ import annotations

import pytest
import torch

from mmadapters.video.tem_adapter import (
    TemAdapter,
    TemAdapterConfig,
    TemAdapterTrainConfig,
    VideoQAFeatures,
    frame_mean_scores,
    fuse_question_answer,
    load_tem_adapter,
    multiple_choice_hinge,
    pair_with_videos,
    predict_scores,
    save_tem_adapter,
    train_tem_adapter,
)

D = 32


def tiny(**overrides) -> TemAdapter:
    torch.manual_seed(0)
    return TemAdapter(TemAdapterConfig.for_dim(D, **overrides))


def test_shapes_and_gamma_init():
    model = tiny().eval()
    assert model.config.width == D // 4
    assert torch.equal(model.semantic.gamma, torch.full((D,), 1e-4))
    frames, cands, answer = torch.randn(3, 6, D), torch.randn(3, 4, D), torch.tensor([0, 3, 1])
    out = model(frames, cands, answer)
    assert out.scores.shape == (3, 4) and out.aligned_text.shape == (3, 4, D) and out.video.shape == (3, D)
    assert out.prediction.shape == out.target.shape == (3, 5, D)  # T - 1 next-frame predictions
    # γ = 1e-4: the aligned text starts (almost) at CLIP's own text feature
    assert (out.aligned_text - cands).abs().max() < 1e-2
    assert model(frames, cands).prediction is None  # no answer: scoring only
    masked = model(frames, cands, mask=torch.tensor([[True] * 4, [True, True, False, False], [True] * 4]))
    assert masked.scores[1, 2:].isneginf().all() and masked.scores[0].isfinite().all()
    losses = model.loss(out, answer)
    assert set(losses) == {"loss", "hinge", "future_mse"} and losses["loss"].ndim == 0


def test_scores_are_aligned_text_dot_mean_encoding():
    model = tiny().eval()
    frames, cands = torch.randn(2, 5, D), torch.randn(2, 4, D)
    out = model(frames, cands)
    expected = (out.aligned_text * model.temporal(frames).embedding.mean(1)[:, None]).sum(-1)
    assert torch.allclose(out.scores, expected, atol=1e-5)


def test_hinge_hand_case():
    scores = torch.tensor([[2.0, 1.5, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    answer = torch.tensor([0, 2])
    # row 0 (gt 2.0): max(0, 1+1.5-2)=0.5, max(0, 1+0-2)=0, max(0, 1+3-2)=2 -> 2.5 ; row 1: three times 1 -> 3
    assert multiple_choice_hinge(scores, answer).item() == pytest.approx(5.5)
    assert multiple_choice_hinge(scores, answer, margin=0.5).item() == pytest.approx(1.5 + 0 + 1.5)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert multiple_choice_hinge(scores, answer, mask=mask).item() == pytest.approx(0.5 + 3.0)
    # the official sum also includes j = gt: exactly +margin per question
    official = (1 + scores - scores.gather(1, answer[:, None])).clamp(min=0).sum()
    assert official.item() == pytest.approx(5.5 + 2)


def test_repeat_vs_repeat_interleave_pairing():
    videos = torch.tensor([10, 20, 30])  # B = 3 videos
    right = pair_with_videos(videos, 2)
    wrong = pair_with_videos(videos, 2, official_repeat=True)
    # flattened candidates: row b*K + j belongs to question b
    assert right.tolist() == [10, 10, 20, 20, 30, 30]
    assert wrong.tolist() == [10, 20, 30, 10, 20, 30]  # question 0's 2nd candidate sees video 1, ...
    frames = torch.randn(3, 4, D)
    assert pair_with_videos(frames, 4).shape == (12, 4, D)


def test_official_pairing_flag_changes_which_video_a_candidate_sees():
    frames, cands = torch.randn(3, 4, D), torch.randn(3, 4, D)
    right, wrong = tiny(gamma_init=1.0).eval(), tiny(gamma_init=1.0, official_repeat_pairing=True).eval()
    wrong.load_state_dict(right.state_dict())
    a_right, a_wrong = right.semantic(cands, frames), wrong.semantic(cands, frames, official_repeat=True)
    # candidate 0 of question 0 is row 0 under both pairings (video 0); candidate 1 of question 0 is not
    assert torch.allclose(a_right[0, 0], a_wrong[0, 0], atol=1e-6)
    assert not torch.allclose(a_right[0, 1], a_wrong[0, 1], atol=1e-4)
    # with the right pairing a candidate's aligned text depends on its own video only
    other = frames.clone()
    other[1:] = torch.randn(2, 4, D)
    assert torch.allclose(right.semantic(cands, other)[0], a_right[0], atol=1e-6)
    assert not torch.allclose(wrong.semantic(cands, other, official_repeat=True)[0], a_wrong[0], atol=1e-4)


def test_future_target_is_shifted_by_one_step():
    frames = torch.arange(2 * 4 * D, dtype=torch.float32).reshape(2, 4, D)
    cands, answer = torch.randn(2, 4, D), torch.tensor([1, 2])
    out = tiny().eval()(frames, cands, answer)
    assert torch.equal(out.target, frames[:, 1:]) and out.prediction.shape == (2, 3, D)
    bug = tiny(official_unshifted_future=True).eval()(frames, cands, answer)
    assert torch.equal(bug.target, frames) and bug.prediction.shape == (2, 4, D)
    # the decoder is causal: its output at step t does not change when later frames change
    model = tiny().eval()
    changed = frames.clone()
    changed[:, 3] += 100.0
    # (memory still sees all frames, so compare with the memory held fixed through a fixed embedding)
    guide = torch.randn(2, D)
    x = model.temporal.positions(frames)
    memory = model.temporal.encoder(x) + guide[:, None]
    mask = torch.nn.Transformer.generate_square_subsequent_mask(4)
    y1 = model.temporal.decoder(x, memory, tgt_mask=mask)
    y2 = model.temporal.decoder(model.temporal.positions(changed), memory, tgt_mask=mask)
    assert torch.allclose(y1[:, :3], y2[:, :3], atol=1e-5) and not torch.allclose(y1[:, 3], y2[:, 3])
    with pytest.raises(ValueError, match="at least 2 frames"):
        model(frames[:, :1], cands, answer)


def toy_data(n: int = 48, t: int = 4, seed: int = 0) -> VideoQAFeatures:
    """Videos whose mean frame is near the text of the right candidate: learnable from the features."""
    g = torch.Generator().manual_seed(seed)
    cands = torch.nn.functional.normalize(torch.randn(n, 4, D, generator=g), dim=-1)
    answers = torch.randint(0, 4, (n,), generator=g)
    frames = cands[torch.arange(n), answers][:, None] + 0.3 * torch.randn(n, t, D, generator=g)
    return VideoQAFeatures(frames, torch.arange(n), cands, answers)


def test_training_reduces_the_loss_and_predicts():
    data = toy_data()
    model = tiny()
    history = train_tem_adapter(model, data, TemAdapterTrainConfig(epochs=12, batch_size=16, lr=1e-3, lr_halve_every=5))
    assert len(history) == 12 and history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["hinge"] < 0.3 * history[0]["hinge"] and history[-1]["future_mse"] < history[0]["future_mse"]
    assert history[0]["lr"] == 1e-3 and history[5]["lr"] == 5e-4 and history[10]["lr"] == 2.5e-4
    scores = predict_scores(model, data, batch_size=20)
    assert scores.shape == (48, 4) and not model.training
    baseline = frame_mean_scores(data.frames, data.candidates)
    assert (baseline.argmax(1) == data.answers).float().mean() > 0.9  # the toy is solvable zero-shot


def test_features_validate_and_subset():
    data = toy_data(8)
    sub = data.subset([1, 3])
    assert len(sub) == 2 and torch.equal(sub.answers, data.answers[[1, 3]])
    with pytest.raises(ValueError, match="video_index out of range"):
        VideoQAFeatures(data.frames[:2], torch.tensor([0, 5]), data.candidates[:2], data.answers[:2])
    with pytest.raises(ValueError, match="answers must lie in 0..3"):
        VideoQAFeatures(data.frames, data.video_index, data.candidates, data.answers + 4)


def test_save_load_round_trip(tmp_path):
    model = tiny(official_unshifted_future=True).eval()
    save_tem_adapter(model, tmp_path / "tem.safetensors")
    loaded = load_tem_adapter(tmp_path / "tem.safetensors")
    assert loaded.config == model.config
    frames, cands = torch.randn(2, 3, D), torch.randn(2, 4, D)
    assert torch.allclose(loaded(frames, cands).scores, model(frames, cands).scores)


def test_config_errors_and_template():
    with pytest.raises(ValueError, match="'temporal_heads': 5 does not divide dim 32"):
        TemAdapterConfig(dim=32, temporal_heads=5)
    with pytest.raises(ValueError, match="'semantic_heads'"):
        TemAdapterConfig(dim=32, semantic_heads=3)
    assert TemAdapterConfig.for_dim(512).semantic_heads == 16 and TemAdapterConfig.for_dim(512).width == 128
    assert fuse_question_answer(" What next? ", "it grows") == "What next? it grows"
    with pytest.raises(ValueError, match="answer"):
        fuse_question_answer("q", "a", "{question}")


# ------------------------------------------------------------------------------------ evaluator end to end


def write_video(path, colour, frames: int = 6, size: int = 32) -> None:
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.zeros((size, size, 3), np.uint8)
            image[:, : 4 + 4 * i] = colour  # a bar that grows
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def qa_root(tmp_path_factory):
    import json

    root = tmp_path_factory.mktemp("qa")
    (root / "videos").mkdir()
    colours = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230)}
    for name, rgb in colours.items():
        write_video(root / "videos" / f"{name}.mp4", rgb)
    (root / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00 not a video" * 10)
    names = list(colours)
    rows = []
    for i, name in enumerate([*names, *names, "broken"]):
        options = [f"a {c} bar" for c in names] + ["nothing"]
        rows.append({"vid_id": i, "vid_filename": f"videos/{name}.mp4", "question": "What colour?", "options": options,
                     "answer": names.index(name) if name in names else 0, "q_type": "U" if i % 2 else "D"})
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n")
    return root


def test_evaluator_zeroshot_and_tem_adapter(qa_root, tmp_path):
    import json

    from mmadapters.eval.videoqa_eval import UnreadableVideoError, VideoQAConfig, evaluate_videoqa

    base = dict(annotations=str(qa_root / "train.jsonl"), num_frames=4, cache_dir=str(tmp_path / "cache"),
                progress=False)
    zs = evaluate_videoqa(VideoQAConfig(method="zeroshot", output=str(tmp_path / "zs.json"),
                                        predictions=str(tmp_path / "pred.jsonl"), **base))
    assert zs["task"] == "videoqa_multiple_choice" and zs["model"] == "tiny_clip"
    c = zs["counts"]
    assert (c["questions"], c["evaluated"], c["skipped"], c["videos"], c["videos_skipped"]) == (7, 6, 1, 4, 1)
    assert c["skipped_by_reason"] == {"VideoError": 1} and "broken.mp4" in c["skipped_videos"][0]["video"]
    assert 0.0 <= zs["metrics"]["acc"] <= 1.0 and zs["metrics"]["chance"] == 0.25
    assert set(zs["metrics"]["acc_by_q_type"]) == {"U", "D"}
    assert json.loads((tmp_path / "zs.json").read_text())["run_key"] == zs["run_key"]
    preds = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and {"line", "vid_filename", "answer", "prediction", "scores"} <= set(preds[0])

    tem = evaluate_videoqa(VideoQAConfig(method="tem-adapter", train_annotations=str(qa_root / "train.jsonl"),
                                         epochs=2, batch_size=4, official_repeat_pairing=True,
                                         output=str(tmp_path / "tem.json"), **base))
    assert tem["task"] == "videoqa_multiple_choice_tem_adapter_official_repeat"
    assert tem["timings"]["videos_encoded"] == 0 and tem["timings"]["videos_from_cache"] == 6  # 3 + 3 good videos
    assert tem["counts"]["train_evaluated"] == 6
    assert tem["adapter"]["config"]["official_repeat_pairing"] and tem["adapter"]["final"]["epoch"] == 2
    with pytest.raises(FileExistsError, match="different run"):  # another run into the same file
        evaluate_videoqa(VideoQAConfig(method="zeroshot", output=str(tmp_path / "tem.json"), **base))
    with pytest.raises(ValueError, match="train-annotations"):
        evaluate_videoqa(VideoQAConfig(method="tem-adapter", **base))
    with pytest.raises(UnreadableVideoError, match="broken.mp4"):
        evaluate_videoqa(VideoQAConfig(method="zeroshot", on_error="fail", output=None, **base))


def test_videoqa_command_line(qa_root, tmp_path, capsys):
    import json

    from mmadapters.eval.cli import main

    out = tmp_path / "cli.json"
    args = ["videoqa", "--annotations", str(qa_root / "test.jsonl"), "--method", "tem-adapter", "--train-annotations",
            str(qa_root / "train.jsonl"), "--epochs", "2", "--batch-size", "4", "--num-frames", "4",
            "--cache-dir", str(tmp_path / "cache"), "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert 0.0 <= results["metrics"]["acc"] <= 1.0 and f"accuracy {results['metrics']['acc']:.4f}" in printed
    assert results["counts"]["evaluated"] == results["counts"]["questions"] - results["counts"]["skipped"] > 0
    assert main(["videoqa", "--annotations", str(qa_root / "test.jsonl")]) == 2  # tem-adapter without a train split
    assert "--train-annotations" in capsys.readouterr().err
