"""Low-bit adapter storage: file sizes, accuracy, exact 1-bit scheme, round trips, errors, storage_report."""

from __future__ import annotations

import copy
import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from toys import LORA_TARGETS, POINT_TARGETS, make_toy, toy_input

import mmadapters as mma
from mmadapters.io import WEIGHTS_NAME
from mmadapters.quant import pack, packed_size, unpack

BITS = [8, 4, 2, 1]


def _perturb(model, name="a", seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mma.adapter_parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _methods(toy: str) -> dict[str, mma.AdapterConfig]:
    pts = POINT_TARGETS[toy]
    return {
        "lora": mma.LoRAConfig(r=4, target_modules=LORA_TARGETS[toy], train_biases="adapted", gate=True),
        "bottleneck": mma.BottleneckConfig(bottleneck_dim=4, pre_norm=True, target_modules=pts),
        "compacter": mma.CompacterConfig.compacter(bottleneck_dim=4, phm_dim=2, target_modules=pts),
        "hyper": mma.HyperAdapterConfig(task_embedding_dim=4, layer_embedding_dim=4, hidden_dim=8, bottleneck_dim=4,
                                        target_modules=pts),
    }


def _close_to_scheme(saved: torch.Tensor, loaded: torch.Tensor, bits: int) -> None:
    """The loaded tensor is what the documented scheme allows for ``saved`` (per channel = dim 0)."""
    w = saved.reshape(saved.shape[0], -1)
    q = loaded.reshape(loaded.shape[0], -1)
    if bits == 1:
        expected = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=1, keepdim=True)
        assert torch.equal(q, expected)
        return
    step = (w.max(dim=1).values - w.min(dim=1).values) / (2**bits - 1)
    err = (q - w).abs().max(dim=1).values
    assert torch.all(err <= step / 2 * (1 + 1e-4) + 1e-7), (err, step)


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 13, 64):
        codes = torch.randint(0, 2**bits, (n,), generator=g)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits) == math.ceil(n * bits / 8)
        assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("method", ["lora", "bottleneck", "compacter", "hyper"])
@pytest.mark.parametrize("toy", ["mlp", "transformer", "conv"])
def test_round_trip_every_bit_width(toy, method, tmp_path):
    model = make_toy(toy)
    base = copy.deepcopy(model)
    mma.add_adapter(model, "a", _methods(toy)[method])
    _perturb(model)
    saved = {k: v.detach().clone() for k, v in mma.adapter_parameters(model, "a").items()}
    x = toy_input(toy)
    for bits in BITS:
        d = mma.save_adapter(model, "a", tmp_path / f"b{bits}", bits=bits)
        meta = json.loads((d / "adapter_config.json").read_text())
        q = meta["quantization"]
        assert meta["format_version"] == 2 and q["bits"] == bits and q["scheme"] == ("sign" if bits == 1 else "affine")
        assert set(q["tensors"]) == {k for k, v in saved.items() if v.dim() >= 2}
        for k, info in q["tensors"].items():
            assert info == {"shape": list(saved[k].shape), "dtype": "float32"}
        other = copy.deepcopy(base)
        assert mma.load_adapter(other, d, name="q") == "q"
        loaded = mma.adapter_parameters(other, "q")
        assert loaded.keys() == saved.keys()
        for k, v in saved.items():
            if v.dim() < 2:
                assert torch.equal(loaded[k], v), f"{k}: 1-D tensors are stored unchanged"
            else:
                _close_to_scheme(v, loaded[k].detach(), bits)
        with torch.no_grad():
            assert torch.isfinite(other(x)).all()


def test_full_precision_save_is_unchanged(tmp_path):
    model = make_toy("mlp")
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, target_modules=["fc1"]))
    _perturb(model)
    d = mma.save_adapter(model, "a", tmp_path / "a")
    meta = json.loads((d / "adapter_config.json").read_text())
    assert meta["format_version"] == 1 and "quantization" not in meta
    stored = load_file(str(d / WEIGHTS_NAME))
    assert stored.keys() == mma.adapter_parameters(model, "a").keys()


@pytest.mark.parametrize("bits", BITS)
def test_zero_initialized_lora_b_round_trips_exactly(bits, tmp_path):
    model = make_toy("mlp")
    mma.add_adapter(model, "a", mma.LoRAConfig(r=4, target_modules=["fc1", "fc2"]))  # B = 0
    mma.save_adapter(model, "a", tmp_path / "a", bits=bits)
    other = make_toy("mlp")
    mma.load_adapter(other, tmp_path / "a")
    for unit in (other.fc1.adapters["a"]["lora"], other.fc2.adapters["a"]["lora"]):
        assert torch.equal(unit.lora_B.weight, torch.zeros_like(unit.lora_B.weight))
        assert torch.isfinite(unit.lora_A.weight).all()
    with torch.no_grad():
        torch.testing.assert_close(other(toy_input("mlp")), make_toy("mlp")(toy_input("mlp")), rtol=0, atol=0)


def test_one_bit_is_sign_times_mean_abs_per_output_channel(tmp_path):
    model = make_toy("mlp")
    mma.add_adapter(model, "a", mma.BottleneckConfig(bottleneck_dim=6, target_modules=["fc1"]))
    _perturb(model, std=0.5)
    unit = model.fc1.adapters["a"]["bottleneck"]
    down = unit.down.weight.detach().clone()  # (6, 20): 6 output channels
    mma.save_adapter(model, "a", tmp_path / "a", bits=1)
    other = make_toy("mlp")
    mma.load_adapter(other, tmp_path / "a")
    got = other.fc1.adapters["a"]["bottleneck"].down.weight.detach()
    for c in range(down.shape[0]):
        expected = torch.sign(down[c]) * down[c].abs().mean()
        assert torch.equal(got[c], expected)
    assert torch.equal(other.fc1.adapters["a"]["bottleneck"].down.bias, unit.down.bias)  # bias kept


def _wide_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()


def test_file_size_shrinks_with_bit_width(tmp_path):
    model = _wide_model()
    mma.add_adapter(model, "a", mma.BottleneckConfig(bottleneck_dim=64, target_modules=["0"]))  # (64,256) + (256,64)
    _perturb(model)
    full = mma.save_adapter(model, "a", tmp_path / "full")
    fp32 = (full / WEIGHTS_NAME).stat().st_size
    sizes = {}
    for bits in BITS:
        d = mma.save_adapter(model, "a", tmp_path / f"b{bits}", bits=bits)
        sizes[bits] = (d / WEIGHTS_NAME).stat().st_size
        per_channel = 4 if bits == 1 else 8  # scale (+ offset), float32
        payload = sum(packed_size(64 * 256, bits) + rows * per_channel for rows in (64, 256)) + 4 * (64 + 256)
        assert payload <= sizes[bits] <= payload + 2048  # the rest is the safetensors header
        assert sizes[bits] / fp32 < bits / 32 + 0.05, (bits, sizes[bits] / fp32)
    assert sizes[8] > sizes[4] > sizes[2] > sizes[1]
    assert sizes[1] / fp32 < 0.06


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("config", [mma.LoRAConfig(r=4, target_modules=["fc1", "fc2"]),
                                    mma.BottleneckConfig(bottleneck_dim=8, target_modules=["@ffn_out", "@attn_out"])],
                         ids=["lora", "bottleneck"])
def test_eight_bit_changes_outputs_by_under_two_percent(config, tmp_path):
    model = make_toy("mlp")
    x = toy_input("mlp")
    with torch.no_grad():
        y0 = model(x)
    mma.add_adapter(model, "a", config)
    _perturb(model, std=0.3)  # random, non-trivial B / up projections
    with torch.no_grad():
        y = model(x)
    assert _relative(y, y0) > 0.1  # the adapter does change the outputs
    mma.save_adapter(model, "a", tmp_path / "a", bits=8)
    other = make_toy("mlp")
    mma.load_adapter(other, tmp_path / "a")
    with torch.no_grad():
        y8 = other(x)
    assert _relative(y8, y) < 0.02
    assert float((y8 - y).norm() / (y - y0).norm()) < 0.05  # also small against the adapter's own effect


def test_bad_bits_name_the_argument(tmp_path):
    model = make_toy("mlp")
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, target_modules=["fc1"]))
    for bad in (3, 0, 16, True, "4", 4.0):
        with pytest.raises(ValueError, match=r"argument 'bits' must be None \(full precision\) or one of \[8, 4, 2, 1\]"):
            mma.save_adapter(model, "a", tmp_path / "x", bits=bad)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="storage_report: argument 'bits'"):
        mma.storage_report(model, "a", bits=5)


def test_non_finite_weights_refuse_low_bit(tmp_path):
    model = make_toy("mlp")
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, target_modules=["fc1"]))
    with torch.no_grad():
        model.fc1.adapters["a"]["lora"].lora_A.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'fc1.lora.lora_A.weight' has NaN or infinite values.*bits=4"):
        mma.save_adapter(model, "a", tmp_path / "a", bits=4)


def _quantized_dir(tmp_path, bits=4):
    model = make_toy("mlp")
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, target_modules=["fc1"]))
    _perturb(model)
    return mma.save_adapter(model, "a", tmp_path / "a", bits=bits)


def _rewrite(d, tensors=None, edit=None):
    """Rewrite the weights and/or the config JSON, keeping the checksum consistent."""
    cfg = d / "adapter_config.json"
    meta = json.loads(cfg.read_text())
    if tensors is not None:
        save_file(tensors, str(d / WEIGHTS_NAME))
        meta["weights_sha256"] = hashlib.sha256((d / WEIGHTS_NAME).read_bytes()).hexdigest()
    if edit is not None:
        edit(meta)
    cfg.write_text(json.dumps(meta))


def test_corrupted_quantized_files_fail_clearly(tmp_path):
    d = _quantized_dir(tmp_path)
    weights = d / WEIGHTS_NAME
    good = weights.read_bytes()
    tensors = load_file(str(weights))
    meta0 = json.loads((d / "adapter_config.json").read_text())

    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="adapter_model.safetensors: checksum differs"):
        mma.load_adapter(make_toy("mlp"), d)

    weights.write_bytes(b"\xff" * 16)  # garbage with a matching checksum
    _rewrite(d, edit=lambda m: m.update(weights_sha256=hashlib.sha256(b"\xff" * 16).hexdigest()))
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors file"):
        mma.load_adapter(make_toy("mlp"), d)

    weights.write_bytes(good)
    _rewrite(d, edit=lambda m: m.update(meta0, quantization={**meta0["quantization"], "bits": 3}))
    with pytest.raises(ValueError, match=r"adapter_config.json: field 'quantization'.bits: expected one of"):
        mma.load_adapter(make_toy("mlp"), d)

    key = "fc1.lora.lora_A.weight"
    bad_shape = copy.deepcopy(meta0)
    bad_shape["quantization"]["tensors"][key]["shape"] = [2, 11]
    _rewrite(d, edit=lambda m: m.update(bad_shape))
    with pytest.raises(ValueError, match=rf"tensor '{key}.__codes' is torch.uint8 \[10\], expected torch.uint8 \[11\]"):
        mma.load_adapter(make_toy("mlp"), d)

    _rewrite(d, tensors={k: v for k, v in tensors.items() if k != key + ".__scale"}, edit=lambda m: m.update(
        {k: v for k, v in meta0.items() if k != "weights_sha256"}))
    with pytest.raises(ValueError, match=rf"quantized tensor '{key}' lacks \['{key}.__scale'\]"):
        mma.load_adapter(make_toy("mlp"), d)
    model = make_toy("mlp")
    with pytest.raises(ValueError):
        mma.load_adapter(model, d)
    assert mma.adapter_names(model) == []  # nothing half-added


def test_storage_report_from_directory_model_and_checkpoint(tmp_path):
    model = _wide_model()
    mma.add_adapter(model, "a", mma.LoRAConfig(r=8, target_modules=["0", "2"]))
    n = sum(p.numel() for p in mma.adapter_parameters(model, "a").values())
    d = mma.save_adapter(model, "a", tmp_path / "a", bits=2)
    report = mma.storage_report(d)
    assert isinstance(report, mma.StorageReport)
    assert report.name == "a" and report.method == "lora" and report.bits == 2 and report.scheme == "affine"
    assert report.num_params == report.quantized_params == n
    assert report.files == {p.name: p.stat().st_size for p in d.iterdir()}
    assert report.total_bytes == sum(report.files.values())
    assert report.ratio == pytest.approx(report.total_bytes / (4 * n))
    data = report.as_dict()
    assert data["bits"] == 2 and data["fp32_bytes"] == 4 * n and data["directory"] == str(d)
    json.dumps(data)
    text = str(report)
    assert "2-bit affine" in text and "adapter_model.safetensors" in text and "total" in text

    temp = mma.storage_report(model, "a", bits=2)
    assert temp.directory is None and temp.files == report.files and "(temporary save)" in str(temp)
    full = mma.storage_report(model, "a")
    assert full.bits is None and full.quantized_params == 0 and full.dtypes == ["F32"]
    assert full.weights_ratio > 0.95 and temp.weights_ratio < 0.25

    mma.io.save_adapters(model, tmp_path / "ckpt", bits=1)
    assert mma.storage_report(tmp_path / "ckpt", "a").bits == 1
    with pytest.raises(ValueError, match="argument 'bits' applies only to a model"):
        mma.storage_report(d, bits=4)
    with pytest.raises(ValueError, match="argument 'name' is required"):
        mma.storage_report(model)
    with pytest.raises(FileNotFoundError, match="adapter config not found"):
        mma.storage_report(tmp_path / "ckpt", "b")
