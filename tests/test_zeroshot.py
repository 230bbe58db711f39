"""The zero-shot classifier (batched = class-by-class reference), its on-disk cache, and image feature extraction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmadapters.vision.clip import load_clip, tiny_clip_config, write_clip_dir
from mmadapters.vision.readers import ImageFolderDataset, collate_with_skips
from mmadapters.vision.zeroshot import (
    build_classifier,
    cached_classifier,
    classifier_key,
    extract_image_features,
    zeroshot_logits,
)

CLASSES = ["red circle", "blue square", "green triangle", "yellow star", "a {weird} name"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}", "{c}"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    directory = write_clip_dir(tmp_path_factory.mktemp("clip") / "tiny", tiny_clip_config(), seed=0)
    return load_clip(f"local-dir:{directory}")


def _reference(clip, classnames, templates):
    """CLIP_benchmark's computation, one class at a time."""
    columns = []
    with torch.no_grad():
        for c in classnames:
            emb = clip.model.encode_text(clip.tokenizer([t.replace("{c}", c) for t in templates]))
            emb = F.normalize(emb, dim=-1).mean(dim=0)
            columns.append(emb / emb.norm())
    return torch.stack(columns, dim=1)


def test_classifier_equals_class_by_class_reference(clip):
    w = build_classifier(clip.model, clip.tokenizer, CLASSES, TEMPLATES, batch_size=4, progress=False)
    assert w.shape == (16, len(CLASSES))
    torch.testing.assert_close(w, _reference(clip, CLASSES, TEMPLATES), rtol=0, atol=1e-6)
    torch.testing.assert_close(w.norm(dim=0), torch.ones(len(CLASSES)))
    feats = torch.randn(3, 16)
    torch.testing.assert_close(zeroshot_logits(feats, w), 100 * F.normalize(feats, dim=-1) @ w)
    with pytest.raises(ValueError, match="need class names and templates"):
        build_classifier(clip.model, clip.tokenizer, CLASSES, [])


def test_classifier_cache_hit_miss_and_corrupt_file(clip, tmp_path):
    kwargs = dict(model_name=clip.info.model, weights_identity=clip.info.identity(), cache_dir=tmp_path, progress=False)
    first = cached_classifier(clip.model, clip.tokenizer, CLASSES, TEMPLATES, **kwargs)
    assert not first.cache_hit and first.path.is_file() and first.path.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temp files left behind
    second = cached_classifier(clip.model, clip.tokenizer, CLASSES, TEMPLATES, **kwargs)
    assert second.cache_hit and second.path == first.path
    torch.testing.assert_close(second.weights, first.weights, rtol=0, atol=0)
    # the key covers model, weights, class names and templates (order included)
    keys = {
        classifier_key("m", "w", CLASSES, TEMPLATES), classifier_key("m2", "w", CLASSES, TEMPLATES),
        classifier_key("m", "w2", CLASSES, TEMPLATES), classifier_key("m", "w", CLASSES[::-1], TEMPLATES),
        classifier_key("m", "w", CLASSES, TEMPLATES[:2]),
    }
    assert len(keys) == 5
    other = cached_classifier(clip.model, clip.tokenizer, CLASSES, TEMPLATES[:1], **kwargs)
    assert not other.cache_hit and other.path != first.path
    first.path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable cached classifier"):
        rebuilt = cached_classifier(clip.model, clip.tokenizer, CLASSES, TEMPLATES, **kwargs)
    assert not rebuilt.cache_hit
    torch.testing.assert_close(rebuilt.weights, first.weights, rtol=0, atol=0)
    assert cached_classifier(clip.model, clip.tokenizer, CLASSES, TEMPLATES, **kwargs).cache_hit


def test_extract_image_features_skips_unreadable(clip, tmp_path):
    for name, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (24, 24), color).save(tmp_path / name / f"{i}.png")
    (tmp_path / "b" / "1.png").write_bytes(b"\x89PNG broken")
    ds = ImageFolderDataset(tmp_path, clip.preprocess)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_with_skips)
    seen = []
    out = extract_image_features(clip.model, loader, progress=False, on_unreadable=seen.append)
    assert out.features.shape == (5, 16) and out.labels.tolist() == [0, 0, 0, 1, 1]
    torch.testing.assert_close(out.features.norm(dim=-1), torch.ones(5))
    assert len(out.skipped) == 1 and seen == out.skipped and out.skipped[0].path.endswith("b/1.png")
    with torch.no_grad():
        direct = F.normalize(clip.model.encode_image(torch.stack([ds[0][0], ds[5][0]])), dim=-1)
    torch.testing.assert_close(out.features[[0, 4]], direct, rtol=0, atol=1e-5)

    def fail(item):
        raise RuntimeError(f"unreadable {item.path}")

    with pytest.raises(RuntimeError, match="unreadable .*1.png"):
        extract_image_features(clip.model, loader, progress=False, on_unreadable=fail)
