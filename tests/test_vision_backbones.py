"""CLIP (open_clip, local-dir: in a temp dir) and ViT (timm, local weights) with adapters through their points."""

from __future__ import annotations

import pytest
import torch

import mmadapters as mma
from mmadapters.vision.clip import ClipInfo, load_clip, tiny_clip_config, write_clip_dir
from mmadapters.vision.vit import load_vit


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_clip_dir(tmp_path_factory.mktemp("clip") / "tiny", tiny_clip_config(), seed=0)


def _encode(model, image, tokens):
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(tokens)


def test_clip_local_dir_identity_and_points(clip_dir):
    bundle = load_clip(f"local-dir:{clip_dir}")
    assert bundle.info.weights_sha256 and bundle.info.identity().startswith("sha256:")
    assert bundle.info.short_name == "tiny"
    assert bundle.tokenizer(["a photo of a cat", "a dog"]).shape == (2, 16)
    points = mma.declared_points(bundle.model)
    for name in ("attn_out", "ffn_out", "attn", "image_attn", "text_attn"):
        assert name in points
    assert sorted(prefix for prefix, _ in points["attn"]) == ["", "visual"]  # both towers
    again = load_clip(f"local-dir:{clip_dir}")
    assert again.info.identity() == bundle.info.identity()


@pytest.mark.parametrize("config", [
    mma.LoRAConfig(r=2, target_modules=["@attn"]),
    mma.BottleneckConfig.houlsby(bottleneck_dim=4),
    mma.BottleneckConfig(bottleneck_dim=4, target_modules=["@image_ffn_out"]),
], ids=["lora-attn", "houlsby", "image-only-bottleneck"])
def test_clip_adapters_through_points(clip_dir, config):
    bundle = load_clip(f"local-dir:{clip_dir}")
    model = bundle.model
    image = torch.randn(2, 3, 32, 32)
    tokens = bundle.tokenizer(["a red circle", "a blue square"])
    ref_img, ref_txt = _encode(model, image, tokens)
    mma.add_adapter(model, "a", config)
    mma.set_active(model, "a")
    mma.freeze_base(model)
    report = mma.parameter_report(model)
    assert 0 < report.per_adapter["a"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # identity at init; then perturb the adapter weights: outputs change
    img, txt = _encode(model, image, tokens)
    torch.testing.assert_close(img, ref_img, rtol=0, atol=1e-5)
    with torch.no_grad():
        for p in mma.adapter_parameters(model, "a").values():
            p.add_(0.3 * torch.randn_like(p))
    img, txt = _encode(model, image, tokens)
    assert not torch.allclose(img, ref_img, atol=1e-4)
    if "image" not in str(config.target_modules):
        assert not torch.allclose(txt, ref_txt, atol=1e-4)
    else:
        torch.testing.assert_close(txt, ref_txt, rtol=0, atol=1e-6)
    mma.set_active(model, None)  # adapters off: exactly the base
    img, txt = _encode(model, image, tokens)
    torch.testing.assert_close(img, ref_img, rtol=0, atol=1e-6)
    torch.testing.assert_close(txt, ref_txt, rtol=0, atol=1e-6)


def test_clip_builtin_name_with_local_weights_file(tmp_path):
    # A registered config name plus a weights file as `pretrained` (open_clip's file-path branch). A tiny
    # ModifiedResNet image tower keeps it small (built-in names are 100M+ parameters).
    import json

    import open_clip

    config = tiny_clip_config()
    config["vision_cfg"] = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mma-test-tiny-rn.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "cfg")
    bundle = load_clip("mma-test-tiny-rn", pretrained=None, seed=3)
    assert bundle.info.identity() == "mma-test-tiny-rn|random-init|seed=3"
    points = mma.declared_points(bundle.model)  # a ResNet image tower: points on the text tower only
    assert "text_attn" in points and "image_attn" not in points
    from safetensors.torch import save_file

    weights = tmp_path / "rn.safetensors"
    save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, str(weights))
    loaded = load_clip("mma-test-tiny-rn", pretrained=str(weights), seed=4)
    assert loaded.info.weights_path == str(weights) and loaded.info.weights_sha256
    assert loaded.info.identity().startswith("sha256:")
    a, b = bundle.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_clip_loading_errors(clip_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="carries its own weights"):
        load_clip(f"local-dir:{clip_dir}", pretrained="openai")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="neither a file nor a known tag"):
        load_clip("ViT-B-32", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="not an open_clip built-in"):
        load_clip("no-such-model")
    import mmadapters.vision.clip as clip_mod

    monkeypatch.setattr(clip_mod, "TINY_CLIP_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="shipped tiny CLIP is missing"):
        load_clip(None)


def test_clip_info_identity_distinguishes_weights():
    a = ClipInfo("ViT-B-32", "openai")
    b = ClipInfo("ViT-B-32", "laion2b_s34b_b79k")
    c = ClipInfo("ViT-B-32", None, seed=0)
    assert len({a.identity(), b.identity(), c.identity(), ClipInfo("ViT-B-32", None, seed=1).identity()}) == 4


def test_vit_local_weights_and_points(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = load_vit("vit_tiny_patch16_224", img_size=32, num_classes=4)
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(weights))
    torch.manual_seed(1)  # a different init: the weights must come from the file
    bundle = load_vit("vit_tiny_patch16_224", weights=weights, img_size=32, num_classes=4)
    assert bundle.weights == str(weights) and bundle.weights_sha256
    x = torch.randn(2, 3, 32, 32)
    model = bundle.model
    with torch.no_grad():
        ref = model(x)
        # every tensor comes from the file, the classifier head included (same num_classes)
        torch.testing.assert_close(src.model(x), ref, rtol=0, atol=0)
    assert set(mma.declared_points(model)) >= {"attn_out", "ffn_out", "qkv", "fc1", "attn", "block"}
    mma.add_adapter(model, "lora", mma.LoRAConfig(r=2, target_modules=["@attn", "@fc1"]))
    mma.add_adapter(model, "houlsby", mma.BottleneckConfig.houlsby(bottleneck_dim=8))
    mma.add_adapter(model, "block", mma.BottleneckConfig(bottleneck_dim=8, target_modules=["@block"]))
    for name in ("lora", "houlsby", "block"):
        mma.set_active(model, name)
        mma.freeze_base(model)
        assert mma.parameter_report(model).per_adapter[name] > 0
        with torch.no_grad():
            for p in mma.adapter_parameters(model, name).values():
                p.add_(0.3 * torch.randn_like(p))
            assert not torch.allclose(model(x), ref, atol=1e-4)
    mma.set_active(model, None)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="ViT weights file not found"):
        load_vit("vit_tiny_patch16_224", weights=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a timm model"):
        load_vit("no_such_vit")


def test_clip_with_timm_vision_tower_gets_vit_points(tmp_path):
    config = tiny_clip_config()
    config["vision_cfg"] = {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                            "timm_pool": "token", "timm_proj": "linear", "image_size": 224}
    bundle = load_clip(f"local-dir:{write_clip_dir(tmp_path / 'timm_clip', config)}")
    points = mma.declared_points(bundle.model)
    assert [prefix for prefix, _ in points["image_qkv"]] == ["visual.trunk"] and "text_attn" in points
    image = torch.randn(1, 3, 224, 224)  # open_clip builds the timm trunk at its default size
    with torch.no_grad():
        ref = bundle.model.encode_image(image)
    mma.add_adapter(bundle.model, "lora", mma.LoRAConfig(r=2, target_modules=["@image_qkv"]))
    with torch.no_grad():
        for p in mma.adapter_parameters(bundle.model, "lora").values():
            p.add_(0.3 * torch.randn_like(p))
        assert not torch.allclose(bundle.model.encode_image(image), ref, atol=1e-4)
