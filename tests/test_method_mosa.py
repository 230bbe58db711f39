"""MoSA: the split is an exact partition, training runs sparse modules (and only they get gradients),
eval runs the full adapter, merge_mosa gives a plain bottleneck adapter with identical outputs, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from toys import make_toy, toy_input

import mmadapters as mma
from mmadapters.methods.bottleneck import BottleneckConfig, BottleneckUnit
from mmadapters.methods.mosa import TENSORS, MoSAConfig, MoSAUnit, merge_mosa, split_positions
from mmadapters.model import wrappers

PTS = ["@attn_out", "@ffn_out"]


def _units(model, name="a") -> dict[str, MoSAUnit]:
    return {w.module_name: u for w in wrappers(model) for u in w.units(name) if isinstance(u, MoSAUnit)}


def _perturb(model, name="a", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mma.adapter_parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _mosa_model(toy="mlp", **kw):
    model = make_toy(toy)
    kw.setdefault("bottleneck_dim", 6)
    kw.setdefault("num_modules", 3)
    mma.add_adapter(model, "a", MoSAConfig(target_modules=PTS, **kw))
    return model


def test_split_is_an_exact_balanced_partition_rebuilt_from_the_seed():
    parts = split_positions(23, 4, seed=7)
    flat = torch.cat(parts)
    assert sorted(flat.tolist()) == list(range(23))  # disjoint and covering
    assert sorted(p.numel() for p in parts) == [5, 6, 6, 6]
    assert all(torch.equal(a, b) for a, b in zip(parts, split_positions(23, 4, seed=7), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(parts, split_positions(23, 4, seed=8), strict=True))

    model = _mosa_model("transformer", num_modules=4)
    units = _units(model)
    assert len(units) == 4
    for unit in units.values():
        for t in TENSORS:
            pos = [unit.positions(t, i) for i in range(4)]
            numel = unit.dense(t).numel()
            assert sorted(torch.cat(pos).tolist()) == list(range(numel)), t
            assert max(p.numel() for p in pos) - min(p.numel() for p in pos) <= 1
    a, b = units["blocks.0.attn"], units["blocks.1.attn"]  # the split differs between layers
    assert not torch.equal(a.positions("down_weight", 0), b.positions("down_weight", 0))
    # no overhead: exactly the parameters of the plain bottleneck adapter
    plain = make_toy("transformer")
    mma.add_adapter(plain, "a", BottleneckConfig(target_modules=PTS, bottleneck_dim=6))
    assert mma.parameter_report(model).per_adapter["a"] == mma.parameter_report(plain).per_adapter["a"]


def test_init_is_the_bottleneck_init_and_the_identity():
    model, x = make_toy("mlp"), toy_input("mlp")
    with torch.no_grad():
        y0 = model(x)
    mma.add_adapter(model, "a", MoSAConfig(target_modules=PTS, bottleneck_dim=6, num_modules=3))
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x), y0)  # Up is zero: identity in training and eval
        model.eval()
        assert torch.equal(model(x), y0)
    for unit in _units(model).values():
        assert torch.count_nonzero(unit.dense("up_weight")) == 0 and torch.count_nonzero(unit.dense("down_weight")) > 0


def test_training_forward_uses_only_the_drawn_modules_and_only_they_get_gradients():
    model, x = _mosa_model(num_modules=3), toy_input("mlp")
    _perturb(model)
    mma.freeze_base(model)
    unit = _units(model)["fc1"]
    model.train()
    torch.manual_seed(3)
    out = model(x)
    down, up = unit.last_modules
    assert len(down) == len(up) == 1
    # the unit's change equals a bottleneck built from the drawn modules' entries only
    xin = torch.randn(5, 20)
    torch.manual_seed(11)
    got = unit.change(None, xin)
    d, u = unit.last_modules
    dw, db = unit.dense("down_weight", d), unit.dense("down_bias", d)
    uw, ub = unit.dense("up_weight", u), unit.dense("up_bias", u)
    ref = torch.relu(3 * (xin @ dw.T + db)) @ (3 * uw).T + 3 * ub  # rescaled by num_modules / active_modules
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert not torch.allclose(got, unit.to_bottleneck().change(None, xin))  # the full adapter differs
    out.pow(2).mean().backward()
    for t in TENSORS:
        active = down if t.startswith("down") else up
        for i, chunk in enumerate(unit.chunks[t]):
            if i in active:
                assert chunk.grad is not None and chunk.grad.abs().sum() > 0, (t, i)
            else:
                assert chunk.grad is None, f"inactive module {i} of {t} received a gradient"


def test_draws_vary_and_active_modules_controls_how_many():
    model, x = _mosa_model(num_modules=4, active_modules=2), toy_input("mlp")
    unit = _units(model)["fc2"]
    model.train()
    torch.manual_seed(0)
    seen = set()
    with torch.no_grad():
        for _ in range(20):
            model(x)
            down, up = unit.last_modules
            assert len(down) == len(up) == 2 and len(set(down)) == 2
            seen.add(tuple(down))
    assert len(seen) > 2


@pytest.mark.parametrize("toy", ["mlp", "transformer", "conv"])
def test_eval_output_equals_the_merged_plain_bottleneck(toy, tmp_path):
    model, x = _mosa_model(toy, placement="parallel" if toy == "mlp" else "series", activation="gelu",
                           train_biases="adapted"), toy_input(toy)
    fresh = copy.deepcopy(make_toy(toy))
    _perturb(model)
    model.eval()
    with torch.no_grad():
        y = model(x)
    merge_mosa(model, "a")
    config = mma.get_config(model, "a")
    assert type(config) is BottleneckConfig and config.bottleneck_dim == 6 and config.activation == "gelu"
    assert config.train_biases == "adapted"
    assert mma.get_active(model) == "a"
    assert all(isinstance(u, BottleneckUnit) or u.kind == "weight" for w in wrappers(model) for u in w.units("a"))
    with torch.no_grad():
        if toy == "conv":  # channel-first features: linear's reduction order may depend on requires_grad (see merge_mosa)
            torch.testing.assert_close(model(x), y, rtol=0, atol=1e-6)
        else:
            assert torch.equal(model(x), y)
    # the merged adapter is an ordinary bottleneck adapter on disk
    mma.save_adapter(model, "a", tmp_path / "a")
    mma.load_adapter(fresh, tmp_path / "a")
    assert mma.get_config(fresh, "a") == config
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_merge_keeps_trainability_and_refuses_other_methods():
    model = _mosa_model()
    mma.add_adapter(model, "lora", mma.LoRAConfig(r=2, target_modules=["fc1"]))
    mma.freeze_base(model)
    merge_mosa(model, "a")
    assert all(p.requires_grad for p in mma.adapter_parameters(model, "a").values())
    with pytest.raises(ValueError, match="'lora' is a LoRAConfig"):
        merge_mosa(model, "lora")
    with pytest.raises(ValueError, match="'a' is a BottleneckConfig"):
        merge_mosa(model, "a")


def test_save_load_round_trip_rebuilds_the_split(tmp_path):
    model, x = _mosa_model("transformer", mask_seed=5), toy_input("transformer")
    fresh = make_toy("transformer")
    _perturb(model)
    mma.save_adapter(model, "a", tmp_path / "a")
    mma.load_adapter(fresh, tmp_path / "a")
    assert mma.get_config(fresh, "a") == mma.get_config(model, "a")
    for name, unit in _units(model).items():
        other = _units(fresh)[name]
        for t in TENSORS:
            assert torch.equal(other.dense(t), unit.dense(t))
            assert all(torch.equal(other.positions(t, i), unit.positions(t, i)) for i in range(3))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_trains_on_a_tiny_regression():
    model, x = _mosa_model(num_modules=2, bottleneck_dim=8), toy_input("mlp")
    target = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    mma.freeze_base(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.eval()
    with torch.no_grad():
        start = (model(x) - target).pow(2).mean().item()
    torch.manual_seed(0)
    for _ in range(40):
        model.train()
        opt.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x) - target).pow(2).mean().item() < 0.7 * start


def test_config_errors():
    with pytest.raises(ValueError, match="MoSAConfig.active_modules: expected at most num_modules=2"):
        MoSAConfig(num_modules=2, active_modules=3)
    with pytest.raises(ValueError, match="MoSAConfig.num_modules"):
        MoSAConfig(num_modules=0)
    with pytest.raises(ValueError, match="MoSAConfig.placement"):
        MoSAConfig(placement="both")
    with pytest.raises(ValueError, match="MoSAConfig.activation"):
        MoSAConfig(activation="softmax")
    model = make_toy("mlp")
    with pytest.raises(ValueError, match=r"MoSAConfig.num_modules: 8 exceeds the bottleneck width 4 at module 'fc1'"):
        mma.add_adapter(model, "a", MoSAConfig(target_modules=PTS, bottleneck_dim=4, num_modules=8))
    assert mma.adapter_names(model) == []
    cfg = MoSAConfig(target_modules=PTS, reduction_factor=2, num_modules=3, mask_seed=4)
    assert mma.AdapterConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("rescale", [True, False])
def test_rescaled_sparse_training_is_unbiased_for_the_merged_adapter(rescale):
    # linear parallel adapter, 2 modules, 1 drawn: averaging the training output over the 4 equally likely
    # (down, up) draws gives the expectation; with rescaling it equals the eval (merged) output exactly
    model = _mosa_model(placement="parallel", activation="identity", num_modules=2, rescale=rescale)
    _perturb(model)
    unit = _units(model)["fc1"]
    xin, h = torch.randn(5, 10), torch.zeros(5, 20)
    with torch.no_grad():
        unit.eval()
        full = unit.change(xin, h)
        unit.train()
        outs = []
        for d in range(2):
            for u in range(2):
                draws = iter([[d], [u]])
                unit._draw = lambda draws=draws: next(draws)
                outs.append(unit.change(xin, h))
        mean = torch.stack(outs).mean(0)
    if rescale:
        torch.testing.assert_close(mean, full, rtol=1e-5, atol=1e-6)
    else:  # unscaled: each entry is drawn with probability 1/2, so E = Up (Down x + d) / 4 + u / 2, not the merged adapter
        dw, db, uw, ub = (unit.dense(t) for t in ("down_weight", "down_bias", "up_weight", "up_bias"))
        torch.testing.assert_close(mean, (xin @ dw.T + db) @ uw.T / 4 + ub / 2, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(mean, full, atol=1e-3)
