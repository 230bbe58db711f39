"""The core on real architectures, built without downloads: open_clip ViT-B-32 and a timm ViT."""

from __future__ import annotations

import copy

import pytest
import torch

import mmadapters as mma


def _train_one_step(model, forward):
    mma.freeze_base(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    loss = forward().float().pow(2).mean()
    loss.backward()
    opt.step()
    changed = sum(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
    return params, changed


def _round_trip(model, pristine, names, forward_fn, tmp_path):
    model.eval()
    with torch.no_grad():
        expected = {}
        for n in names:
            mma.set_active(model, n)
            expected[n] = forward_fn(model)
    for n in names:
        mma.save_adapter(model, n, tmp_path / n)
        mma.load_adapter(pristine, tmp_path / n)
    pristine.eval()
    with torch.no_grad():
        for n in names:
            mma.set_active(pristine, n)
            torch.testing.assert_close(forward_fn(pristine), expected[n], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def clip_model():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    return model.eval()


def test_open_clip_vit_b32_lora_and_bottleneck(clip_model, tmp_path):
    model = clip_model
    pristine = copy.deepcopy(model)
    image = torch.randn(1, 3, 224, 224)
    text = torch.randint(0, 49408, (2, 77))
    with torch.no_grad():
        ref = model.encode_image(image)
    # LoRA on every nn.MultiheadAttention of both towers plus the MLP input projections
    lora = mma.LoRAConfig(r=4, target_modules=[r"re:(visual\.)?transformer\.resblocks\.\d+\.attn", "mlp.c_fc"])
    mma.add_adapter(model, "lora", lora)
    mma.add_adapter(model, "bottleneck", mma.BottleneckConfig(bottleneck_dim=16, target_modules=["mlp.c_proj"]))
    assert len([w for w in model.modules() if isinstance(w, mma.AdaptedModule)]) == 12 * 2 * 3
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image), ref, rtol=0, atol=1e-5)  # identity at init
    report = mma.parameter_report(model)
    assert 0 < report.per_adapter["lora"] < 0.02 * report.base

    for name in ("lora", "bottleneck"):
        mma.set_active(model, name)
        model.train()
        params, changed = _train_one_step(model, lambda: model.encode_image(image) @ model.encode_text(text).T)
        assert changed > 0 and all(p.requires_grad for p in params)
    _round_trip(model, pristine, ["lora", "bottleneck"], lambda m: m.encode_image(image), tmp_path)


def test_timm_vit_lora_and_houlsby_with_declared_points(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64).eval()
    pristine = copy.deepcopy(model)
    mma.declare_adapter_points(model, {"attn_out": "blocks.*.attn.proj", "ffn_out": "blocks.*.mlp.fc2"})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    mma.add_adapter(model, "lora", mma.LoRAConfig(r=4, target_modules=["attn.qkv", "attn.proj"]))
    mma.add_adapter(model, "houlsby", mma.BottleneckConfig.houlsby(reduction_factor=8))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
    for name in ("lora", "houlsby"):
        mma.set_active(model, name)
        model.train()
        _, changed = _train_one_step(model, lambda: model(x))
        assert changed > 0
    mma.set_active(model, "lora")
    model.eval()
    with torch.no_grad():
        y = model(x)
        mma.merge(model)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
        mma.unmerge(model)
    _round_trip(model, pristine, ["lora", "houlsby"], lambda m: m(x), tmp_path)


def test_torchaudio_conformer_keyword_called_attention(tmp_path):
    """torchaudio calls its attention with query=/key=/value= keywords: parallel adapters must find the input."""
    from torchaudio.models import Conformer

    torch.manual_seed(0)
    model = Conformer(input_dim=16, num_heads=2, ffn_dim=32, num_layers=2, depthwise_conv_kernel_size=3).eval()
    pristine = copy.deepcopy(model)
    x, lengths = torch.randn(2, 10, 16), torch.tensor([10, 7])
    with torch.no_grad():
        ref = model(x, lengths)[0]
    mma.add_adapter(model, "lora", mma.LoRAConfig(r=2, target_modules=["self_attn"]))
    mma.add_adapter(model, "par", mma.BottleneckConfig(placement="parallel", bottleneck_dim=4, target_modules=["self_attn"]))
    mma.set_active(model, ["lora", "par"])
    with torch.no_grad():
        torch.testing.assert_close(model(x, lengths)[0], ref, rtol=0, atol=1e-6)
    model.train()
    _, changed = _train_one_step(model, lambda: model(x, lengths)[0])
    assert changed > 0
    model.eval()
    with torch.no_grad():
        adapted = model(x, lengths)[0]
        assert not torch.allclose(adapted, ref)
    for n in ("lora", "par"):
        mma.save_adapter(model, n, tmp_path / n)
        mma.load_adapter(pristine, tmp_path / n)
    mma.set_active(pristine, ["lora", "par"])
    with torch.no_grad():
        torch.testing.assert_close(pristine.eval()(x, lengths)[0], adapted, rtol=0, atol=1e-6)
