"""FineCLIPER: descriptions, cue providers, zero-init fusion, training, UAR/WAR evaluation, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmadapters.video.cues import CallableCues, CueError, PrecomputedCues, render_masks
from mmadapters.video.dfer import load_split, tsn_indices
from mmadapters.video.fineclipper import DFEW_CLASSES, FineClipper, FineClipperConfig, class_descriptions
from mmadapters.vision.clip import load_clip, tiny_clip_config, write_clip_dir

CLASSES = ("happy", "sad", "angry")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    write_clip_dir(d, tiny_clip_config(embed_dim=16, image_size=32, width=32, layers=1))
    return d


def _bundle(clip_dir):
    return load_clip(f"local-dir:{clip_dir}")


def _make_clips(root, n_per_class=4, frames=6, size=32, seed=0, with_cues=True):
    """Frame dirs whose colour drifts in a class-specific direction over time, with masks/landmarks cues."""
    rng = np.random.default_rng(seed)
    rows, descriptions = [], {}
    for label in range(len(CLASSES)):
        for i in range(n_per_class):
            d = root / f"{CLASSES[label]}_{i}"
            d.mkdir(parents=True)
            masks = np.zeros((frames, size, size), np.uint8)
            marks = np.zeros((frames, 5, 2), np.float32)
            for t in range(frames):
                img = np.full((size, size, 3), 90, np.uint8)
                img[..., label] = np.uint8(90 + 20 * t)
                img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{t:05d}.png")
                masks[t, 8:24, 8:24] = 1
                masks[t, 20:24, 10:22] = 4
                marks[t] = rng.uniform(0, size, (5, 2))
                marks[t, 0, 1] = 20 - label * 3 * t / frames  # the mouth corner moves with the class
            if with_cues:
                np.savez(d / "cues.npz", masks=masks, landmarks=marks)
                descriptions[d.name] = f"the face changes like {CLASSES[label]}"
            rows.append((str(d), label))
    (root / "descriptions.json").write_text(json.dumps(descriptions))
    return rows


def test_descriptions_positive_and_negative_per_class():
    pos, neg = class_descriptions(DFEW_CLASSES)
    assert len(pos) == len(neg) == 7 and len(set(pos)) == 7
    assert pos[0].startswith("a face showing happiness") and neg[0].startswith("a face not showing happiness")
    p, n = class_descriptions(["boredom"])  # unknown classes get a generic pair, never an error
    assert "boredom" in p[0] and "not" in n[0]


def test_tsn_indices_middle_at_test_random_in_training():
    assert tsn_indices(16, 4, training=False) == [2, 6, 10, 14]
    g = torch.Generator().manual_seed(0)
    idx = tsn_indices(16, 4, training=True, generator=g)
    assert all(4 * k <= i < 4 * (k + 1) for k, i in enumerate(idx))
    assert tsn_indices(3, 8, training=False) == sorted(tsn_indices(3, 8, training=False))  # fewer frames than segments


def test_render_masks_palette_and_errors():
    m = np.zeros((2, 4, 4), np.uint8)
    m[:, 1:3, 1:3] = 3
    img = render_masks(m, 8)
    assert img.shape == (2, 3, 8, 8) and img.dtype == torch.uint8
    assert img[0, :, 0, 0].tolist() == [0, 0, 0] and img[0, :, 3, 3].tolist() != [0, 0, 0]
    with pytest.raises(ValueError, match="labels must lie"):
        render_masks(np.full((1, 2, 2), 99, np.uint8), 4)


def test_untrained_model_is_frozen_clip_on_the_frame_mean(clip_dir, tmp_path):
    rows = _make_clips(tmp_path, n_per_class=1)
    b = _bundle(clip_dir)
    model = FineClipper(b.model, b.tokenizer, CLASSES, FineClipperConfig(num_landmarks=5))
    split = load_split(rows, cues=PrecomputedCues(tmp_path), needed=model.config.cues, progress=False)
    from mmadapters.video.dfer import Batcher

    batch = Batcher(model, 4)(split.clips, training=False)
    logits = model(**batch)
    import mmadapters as mma

    mma.set_active(model.clip, None)
    with torch.no_grad():
        f = model.clip.encode_image(model.preprocess(batch["frames"].flatten(0, 1))).float().view(3, 4, -1).mean(1)
    v = F.normalize(f, dim=-1)
    expect = model.log_scale.exp() * (v @ model.pos_text.T - v @ model.neg_text.T)
    torch.testing.assert_close(logits, expect, atol=1e-4, rtol=1e-4)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_on(model, split, out, *, steps: int = 24, lr: float = 1e-2):
    """`mmadapters train fineclipper`'s task and engine on in-memory clips (validation on the training clips)."""
    from mmadapters.training.trainer import TrainerConfig, train
    from mmadapters.video.fineclipper_train import FineClipperTask

    task = FineClipperTask(model, split, split, num_frames=4, metadata={"recipe": "fineclipper"})
    summary = train(task, TrainerConfig(steps=steps, batch_size=6, lr=lr, weight_decay=0.01, schedule="cosine",
                                        eval_every=0, checkpoint_every=0, log_every=1, progress=False), out)
    losses = [e["loss"] for e in map(json.loads, (out / "history.jsonl").read_text().splitlines()) if e["kind"] == "train"]
    return summary, losses


def test_training_learns_and_leaves_clip_untouched(clip_dir, tmp_path):
    rows = _make_clips(tmp_path, n_per_class=4)
    b = _bundle(clip_dir)
    before = [(p, p.detach().clone()) for p in b.model.parameters()]
    torch.manual_seed(0)
    model = FineClipper(b.model, b.tokenizer, CLASSES, FineClipperConfig(num_landmarks=5, adapter_dim=4))
    backbone = sum(p.numel() for n, p in model.clip.named_parameters() if "fineclipper" not in n)
    assert 0 < trainable(model) < backbone
    split = load_split(rows, cues=PrecomputedCues(tmp_path), needed=model.config.cues, progress=False)
    summary, losses = train_on(model, split, tmp_path / "run")
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])
    assert summary.final_metrics["war"] >= 0.75 and summary.parameters["trainable"] == trainable(model)
    for p, v in before:  # every backbone tensor is unchanged; only the added modules trained
        torch.testing.assert_close(p.detach(), v, rtol=0, atol=0)
    # a second run with the same seed gives the same weights (CPU determinism)
    b2 = _bundle(clip_dir)
    torch.manual_seed(0)
    model2 = FineClipper(b2.model, b2.tokenizer, CLASSES, FineClipperConfig(num_landmarks=5, adapter_dim=4))
    train_on(model2, split, tmp_path / "run2")
    for (n1, p1), (_, p2) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        torch.testing.assert_close(p1, p2, msg=n1)


def test_cue_levels_ablate_and_missing_cues_are_named(clip_dir, tmp_path):
    rows = _make_clips(tmp_path, n_per_class=1, with_cues=False)
    b = _bundle(clip_dir)
    frames_only = FineClipper(b.model, b.tokenizer, CLASSES, FineClipperConfig(cues=(), adapter_dim=0))
    assert trainable(frames_only) > 0  # temporal encoder, α, τ still train
    assert not frames_only.mask_gate.requires_grad and not frames_only.description_proj.weight.requires_grad
    split = load_split(rows, cues=PrecomputedCues(tmp_path), needed=(), progress=False)
    assert len(split.clips) == 3 and not split.skipped
    # a model that needs masks: the clips without cue files are skipped with the reason named …
    split = load_split(rows, cues=PrecomputedCues(tmp_path), needed=("masks",), progress=False)
    assert not split.clips and len(split.skipped) == 3 and "cue 'masks' is missing" in split.skipped[0]["reason"]
    assert rows[0][0] in split.skipped[0]["path"]
    # … or raise with fail_fast
    with pytest.raises(CueError, match="masks"):
        load_split(rows, cues=PrecomputedCues(tmp_path), needed=("masks",), fail_fast=True, progress=False)
    with pytest.raises(ValueError, match="unknown cue"):
        FineClipper(b.model, b.tokenizer, CLASSES, FineClipperConfig(cues=("audio",)))
    with pytest.raises(ValueError, match="duplicates"):
        FineClipper(b.model, b.tokenizer, ("happy", "happy"), FineClipperConfig(cues=()))


def test_callable_cues_wrap_a_user_detector(tmp_path):
    rows = _make_clips(tmp_path, n_per_class=1, with_cues=False)
    calls = []

    def detector(frames):
        calls.append(frames.shape)
        return np.tile(np.array([[[16.0, 8.0]]], np.float32), (frames.shape[0], 3, 1))

    split = load_split(rows, cues=CallableCues(landmarks=detector), needed=("landmarks",), progress=False)
    assert len(split.clips) == 3 and calls[0] == (6, 3, 32, 32)
    np.testing.assert_allclose(split.clips[0].landmarks[0, 0], [0.5, 0.25])


def test_bad_cue_files_get_named_errors(tmp_path):
    rows = _make_clips(tmp_path, n_per_class=1)
    d = rows[0][0]
    np.savez(f"{d}/cues.npz", masks=np.zeros((2, 32, 32), np.uint8))  # fewer cue frames than frames
    split = load_split(rows[:1], cues=PrecomputedCues(tmp_path), needed=("masks",), progress=False)
    assert "has 2 frames but frame 5 was sampled" in split.skipped[0]["reason"]
    (tmp_path / "descriptions.json").write_text("[1, 2]")
    with pytest.raises(CueError, match="descriptions.json"):
        PrecomputedCues(tmp_path)(rows[1][0], [0], (32, 32))


def test_linear_probe_trains_only_a_head_on_frozen_frame_means(clip_dir, tmp_path):
    rows = _make_clips(tmp_path, n_per_class=4)
    b = _bundle(clip_dir)
    with pytest.raises(ValueError, match="linear_probe.*cues=\\(\\) and adapter_dim=0"):
        FineClipperConfig(linear_probe=True)
    model = FineClipper(b.model, b.tokenizer, CLASSES, FineClipperConfig(cues=(), adapter_dim=0, linear_probe=True))
    assert trainable(model) == 16 * 3 + 3 and all(p.requires_grad == n.startswith("probe.") for n, p in model.named_parameters())
    split = load_split(rows, progress=False)
    summary, losses = train_on(model, split, tmp_path / "run", steps=60, lr=3e-2)
    assert summary.final_metrics["war"] >= 0.75 and losses[-1] < losses[0]
