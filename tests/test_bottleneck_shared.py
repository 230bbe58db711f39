"""Half-shared bottleneck adapters: ``share_down`` / ``share_up`` groups (VL-Adapter's half-shared setting)."""

from __future__ import annotations

import copy

import pytest
import torch
from toys import make_toy, toy_input

import mmadapters as mma
from mmadapters.methods.bottleneck import BottleneckConfig

TARGETS = ["@attn_out", "@ffn_out"]


def half_shared(share: str = "down", tasks=("vqa", "gqa"), **kw) -> torch.nn.Module:
    model = make_toy("transformer")
    for t in tasks:
        cfg = BottleneckConfig(target_modules=TARGETS, bottleneck_dim=4, **{f"share_{share}": "vl"}, **kw)
        mma.add_adapter(model, t, cfg)
    return model


def randomize_private_up(model) -> None:
    """Private Up projections start at zero; give them values so the shared Down gets gradients."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for w in mma.model.wrappers(model):
            for units in w.adapters.values():
                up = units["bottleneck"].up
                up.weight.copy_(torch.randn(up.weight.shape, generator=g) * 0.1)


def units(model, adapter):
    return [w.adapters[adapter]["bottleneck"] for w in mma.model.wrappers(model) if adapter in w.adapters]


@pytest.mark.parametrize("share", ["down", "up"])
def test_projection_is_one_tensor_for_all_tasks_and_the_other_is_private(share):
    model = half_shared(share)
    other = "up" if share == "down" else "down"
    a, b = units(model, "vqa"), units(model, "gqa")
    assert len(a) == len(b) == 4  # 2 blocks x (attn_out, ffn_out)
    for ua, ub in zip(a, b, strict=True):
        assert getattr(ua, share).weight is getattr(ub, share).weight
        assert getattr(ua, other).weight is not getattr(ub, other).weight
    keys = sorted(model.mma_shared.keys())
    assert len(keys) == 4 and all(k.startswith(f"bottleneck_{share}__vl__") for k in keys)
    # registered once: at the root, not inside the units
    assert not any(f".{share}." in n for n, _ in model.named_parameters() if ".adapters." in n)


def test_shared_down_gets_gradients_from_both_tasks():
    model = half_shared("down")
    randomize_private_up(model)
    mma.freeze_base(model, adapters=["vqa", "gqa"])
    shared = units(model, "vqa")[0].down.weight
    x = toy_input("transformer")
    grads = {}
    for task in ("vqa", "gqa"):
        model.zero_grad()
        mma.set_active(model, task)
        model(x).pow(2).mean().backward()
        grads[task] = shared.grad.clone()
        assert grads[task].abs().sum() > 0
    assert not torch.allclose(grads["vqa"], grads["gqa"])  # different private Ups -> different gradients
    # a mixed batch (per-sample routing) trains the shared projection with both tasks' gradients at once
    model.zero_grad()
    with mma.route(model, ["vqa", "gqa", "vqa"]):
        model(x).pow(2).mean().backward()
    assert shared.grad.abs().sum() > 0
    assert all(p.grad is not None for p in mma.adapter_parameters(model, "gqa").values() if p.dim() == 2)


@pytest.mark.parametrize("share", ["down", "up"])
def test_identity_at_init(share):
    model = make_toy("transformer")
    x = toy_input("transformer")
    with torch.no_grad():
        base = model(x)
    for t in ("vqa", "gqa"):
        mma.add_adapter(model, t, BottleneckConfig(target_modules=TARGETS, bottleneck_dim=4, **{f"share_{share}": "g"}))
    for t in ("vqa", "gqa"):
        mma.set_active(model, t)
        with torch.no_grad():
            assert torch.equal(model(x), base)


def test_parameter_counts_count_the_shared_part_once():
    model = half_shared("down")
    d, bn, n_modules = 16, 4, 4
    shared = n_modules * (d * bn + bn)  # one Down (weight + bias) per adapted module
    private = n_modules * (bn * d + d)  # one Up per adapted module and task
    report = mma.parameter_report(model)
    assert report.per_adapter == {"vqa": shared + private, "gqa": shared + private}
    assert report.adapters == shared + 2 * private
    mma.freeze_base(model, adapters=["vqa", "gqa"])
    assert mma.parameter_report(model).trainable == shared + 2 * private
    # against two independent adapters: exactly one Down set saved
    plain = make_toy("transformer")
    for t in ("vqa", "gqa"):
        mma.add_adapter(plain, t, BottleneckConfig(target_modules=TARGETS, bottleneck_dim=4))
    assert mma.parameter_report(plain).adapters - report.adapters == shared


def test_save_load_round_trip_carries_the_shared_projection(tmp_path):
    model = half_shared("down")
    randomize_private_up(model)
    with torch.no_grad():
        for u in units(model, "vqa"):
            u.down.weight.add_(0.05)
    x = toy_input("transformer")
    outs = {}
    for t in ("vqa", "gqa"):
        mma.set_active(model, t)
        with torch.no_grad():
            outs[t] = model(x)
        mma.save_adapter(model, t, tmp_path / t)
    fresh = make_toy("transformer")
    mma.load_adapter(fresh, tmp_path / "vqa")
    mma.load_adapter(fresh, tmp_path / "gqa")  # overwrites the shared Down with its own (identical) copy
    assert len(fresh.mma_shared) == 4
    for ua, ub in zip(units(fresh, "vqa"), units(fresh, "gqa"), strict=True):
        assert ua.down is ub.down
    for t in ("vqa", "gqa"):
        mma.set_active(fresh, t)
        with torch.no_grad():
            assert torch.allclose(fresh(x), outs[t], atol=1e-6)
    # a single task loads on its own, shared part included
    alone = make_toy("transformer")
    mma.load_adapter(alone, tmp_path / "gqa")
    with torch.no_grad():
        assert torch.allclose(alone(x), outs["gqa"], atol=1e-6)


def test_routing_matches_set_active_and_sees_updates_of_the_shared_part():
    model = half_shared("down")
    randomize_private_up(model)
    model.eval()
    x = toy_input("transformer")
    names = ["gqa", "vqa", "gqa"]

    def per_sample():
        rows = []
        for i, n in enumerate(names):
            mma.set_active(model, n)
            rows.append(model(x[i:i + 1]))
        return torch.cat(rows)

    with torch.no_grad():
        with mma.route(model, names):
            routed = model(x)
        assert torch.allclose(routed, per_sample(), atol=1e-5)
        for u in units(model, "vqa"):  # a training step on the shared part: cached pools must not go stale
            u.down.weight.mul_(1.5)
        with mma.route(model, names):
            routed = model(x)
        assert torch.allclose(routed, per_sample(), atol=1e-5)


def test_mismatched_width_in_one_group_is_an_error():
    model = make_toy("transformer")
    mma.add_adapter(model, "a", BottleneckConfig(target_modules=TARGETS, bottleneck_dim=4, share_down="g"))
    with pytest.raises(ValueError, match=r"BottleneckConfig.share_down: group 'g'.*adapter 'b'"):
        mma.add_adapter(model, "b", BottleneckConfig(target_modules=TARGETS, bottleneck_dim=8, share_down="g"))
    assert mma.adapter_names(model) == ["a"] and len(model.mma_shared) == 4  # nothing half-added
    with pytest.raises(ValueError, match="BottleneckConfig.share_up"):
        BottleneckConfig(share_up="has space")


def test_delete_keeps_the_shared_part_while_a_task_uses_it_and_deepcopy_keeps_sharing():
    model = half_shared("up", tasks=("a", "b", "c"))
    clone = copy.deepcopy(model)
    for ua, ub in zip(units(clone, "a"), units(clone, "c"), strict=True):
        assert ua.up is ub.up
    first = units(clone, "a")[0].up
    assert any(first is m for m in clone.mma_shared.values())  # the copy references its own root module
    assert not any(first is m for m in model.mma_shared.values())
    mma.delete_adapter(model, "a")
    mma.delete_adapter(model, "b")
    assert len(model.mma_shared) == 4
    mma.delete_adapter(model, "c")
    assert not hasattr(model, "mma_shared") or len(model.mma_shared) == 0


def test_config_round_trips_through_json():
    cfg = BottleneckConfig(target_modules=TARGETS, reduction_factor=8, share_down="vl")
    again = mma.AdapterConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.share_down == "vl" and again.share_up is None
