"""MixDA mixture gate: starts as the uniform Average, learns which adapter to use, saves and loads."""

from __future__ import annotations

import copy

import pytest
import torch
from toys import make_toy, toy_input

import mmadapters as mma

POINTS = ["@attn_out", "@ffn_out"]


def _two_adapters(toy: str):
    model = make_toy(toy)
    for n in ("a", "b"):
        mma.add_adapter(model, n, mma.BottleneckConfig(bottleneck_dim=4, target_modules=POINTS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in ("a", "b"):
            for p in mma.adapter_parameters(model, n).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("toy", ["mlp", "conv", "transformer"])
def test_new_gate_mixes_uniformly(toy):
    model = _two_adapters(toy)
    x = toy_input(toy)
    mma.set_active(model, mma.Average("a", "b"))
    with torch.no_grad():
        avg = model(x)
    mma.add_mixture_gate(model, "gate", ["a", "b"])
    mma.set_active(model, mma.Mixture("a", "b", gate="gate"))
    with torch.no_grad():
        mix = model(x)
    torch.testing.assert_close(mix, avg, atol=1e-6, rtol=1e-6)


def test_gate_learns_to_pick_the_right_adapter_and_round_trips(tmp_path):
    model = _two_adapters("mlp")
    x = torch.randn(64, 10)
    mma.set_active(model, "a")
    with torch.no_grad():
        target = model(x)
    mma.add_mixture_gate(model, "gate", ["a", "b"], temperature=0.5)
    mma.set_active(model, mma.Mixture("a", "b", gate="gate"))
    mma.freeze_base(model, adapters=["gate"])  # MixDA stage 2: domain adapters stay frozen
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(any(p is q for q in mma.adapter_parameters(model, "gate").values()) for p in trainable)
    opt = torch.optim.Adam(trainable, lr=0.1)
    losses = []
    for _ in range(60):
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    wrapper = next(w for w in mma.model.wrappers(model) if "gate" in w.adapters)
    with torch.no_grad():
        weights = wrapper.adapters["gate"]["gate"].mix_weights(wrapper.base_layer(x))
    assert weights[:, 0].mean() > 0.8  # adapter "a" wins

    mma.save_adapter(model, "gate", tmp_path / "gate")
    fresh = _two_adapters("mlp")
    mma.load_adapter(fresh, tmp_path / "gate")
    mma.set_active(fresh, mma.Mixture("a", "b", gate="gate"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert mma.get_config(fresh, "gate").adapters == ["a", "b"]


def test_mixture_errors():
    model = _two_adapters("mlp")
    mma.add_mixture_gate(model, "gate", ["a", "b"])
    mma.add_adapter(model, "c", mma.BottleneckConfig(bottleneck_dim=2, target_modules=POINTS))
    x = torch.randn(2, 10)
    mma.set_active(model, mma.Mixture("a", "b", "c", gate="gate"))
    with pytest.raises(ValueError, match="mixes 2 adapters"):
        model(x)
    mma.set_active(model, mma.Mixture("a", "b", gate="gate"))
    with pytest.raises(ValueError, match="input"):
        mma.merge(model)
    with pytest.raises(ValueError, match="two or more"):
        mma.add_mixture_gate(model, "g2", ["a"])
    with pytest.raises(ValueError, match="may not be nested"):
        mma.set_active(model, mma.Average(mma.Mixture("a", "b", gate="gate"), "c"))
    tr = make_toy("transformer")
    mma.add_adapter(tr, "l", mma.LoRAConfig(r=2, target_modules=["@attn"]))
    mma.add_adapter(tr, "m", mma.LoRAConfig(r=2, target_modules=["@attn"]))
    mma.add_mixture_gate(tr, "g", ["l", "m"])
    mma.set_active(tr, mma.Mixture("l", "m", gate="g"))
    with pytest.raises(ValueError, match="edit weights"):
        tr(toy_input("transformer"))


def test_composition_round_trips_through_dict():
    from mmadapters.composition import from_dict

    comp = mma.Stack(mma.Mixture("a", mma.Stack("b", "c"), gate="g"), "d")
    assert from_dict(comp.to_dict()) == comp
    assert comp.names() == ["a", "b", "c", "g", "d"]
    assert copy.deepcopy(comp) == comp
