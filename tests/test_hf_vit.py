"""load_vit loads transformers ViT saves (google/vit-*) exactly and refuses files that do not fit, never
falling back to random weights."""

from __future__ import annotations

import json

import pytest
import torch

from mmadapters.vision.vit import load_vit

transformers = pytest.importorskip("transformers")

VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 192, "intermediate_size": 768, "num_attention_heads": 3,
       "num_hidden_layers": 2}
TIMM = {"img_size": 32, "patch_size": 8, "depth": 2}  # vit_tiny: width 192, 3 heads, mlp 768


def _randomize_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))


def test_transformers_vit_model_folder_equals_its_features(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    hf = ViTModel(ViTConfig(**VIT)).eval()  # with its tanh pooler, which timm has not
    _randomize_norms(hf)
    hf.save_pretrained(tmp_path / "vit")
    torch.manual_seed(1)
    bundle = load_vit("vit_tiny_patch16_224", weights=tmp_path / "vit", num_classes=0, **TIMM)
    assert bundle.weights == str(tmp_path / "vit" / "model.safetensors") and bundle.weights_sha256
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        torch.testing.assert_close(bundle.model.forward_features(x), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(bundle.model(x), ref[:, 0], rtol=0, atol=1e-5)  # num_classes=0: the CLS feature


def test_transformers_vit_classifier_file_keeps_its_head(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    hf = ViTForImageClassification(ViTConfig(**VIT, num_labels=5, layer_norm_eps=1e-6)).eval()
    _randomize_norms(hf)
    hf.save_pretrained(tmp_path / "cls")
    bundle = load_vit("vit_tiny_patch16_224", weights=tmp_path / "cls" / "model.safetensors", num_classes=5, **TIMM)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), hf(pixel_values=x).logits, rtol=0, atol=1e-5)
    # another num_classes: a fresh head, the backbone still from the file
    headless = load_vit("vit_tiny_patch16_224", weights=tmp_path / "cls", num_classes=0, **TIMM)
    with torch.no_grad():
        torch.testing.assert_close(headless.model(x), hf.vit(pixel_values=x).last_hidden_state[:, 0], rtol=0, atol=1e-5)


def test_wrong_format_or_size_raises_instead_of_random_weights(tmp_path):
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel

    # an open_clip-style state dict (the bug: it loaded as random weights, logging "Unexpected keys")
    save_file({"visual.conv1.weight": torch.zeros(8, 3, 8, 8), "token_embedding.weight": torch.zeros(4, 8)},
              str(tmp_path / "clip.safetensors"))
    with pytest.raises(ValueError, match=r"clip\.safetensors: do not fit timm model VisionTransformer"):
        load_vit("vit_tiny_patch16_224", weights=tmp_path / "clip.safetensors", num_classes=0, **TIMM)
    # a transformers ViT of another width than the timm name
    ViTModel(ViTConfig(**{**VIT, "hidden_size": 96, "intermediate_size": 384})).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="of another shape"):
        load_vit("vit_tiny_patch16_224", weights=tmp_path / "small", num_classes=0, **TIMM)
    # a transformers ViT with a module timm's ViT has not
    hf = tmp_path / "masked"
    ViTModel(ViTConfig(**VIT), use_mask_token=True).save_pretrained(hf)
    with pytest.raises(ValueError, match="'embeddings.mask_token' has no timm ViT counterpart"):
        load_vit("vit_tiny_patch16_224", weights=hf, num_classes=0, **TIMM)
    cfg = json.loads((tmp_path / "small" / "config.json").read_text())
    (tmp_path / "small" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="config.json: field 'hidden_act'"):
        load_vit("vit_tiny_patch16_224", weights=tmp_path / "small", num_classes=0, **TIMM)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a safetensors file"):
        load_vit("vit_tiny_patch16_224", weights=tmp_path / "junk.safetensors", **TIMM)
    with pytest.raises(FileNotFoundError, match="expected model.safetensors"):
        load_vit("vit_tiny_patch16_224", weights=tmp_path, **TIMM)
