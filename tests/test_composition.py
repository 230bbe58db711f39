"""Stacking, averaging, activation and deletion behave as documented in mmadapters.composition."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toys import make_toy, toy_input

import mmadapters as mma


def _lin():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def _randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mma.adapter_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _two_adapters(config_fn):
    """A small model with adapters 'a' and 'b' on layer 0, both randomized (so neither is the identity)."""
    model = _lin()
    for n, seed in (("a", 1), ("b", 2)):
        mma.add_adapter(model, n, config_fn())
        _randomize(model, n, seed)
    return model


def _delta(model, name, x):
    """Change of layer 0's output caused by adapter `name` alone."""
    mma.set_active(model, name)
    with torch.no_grad():
        return model[0](x) - model[0].base_layer(x)


def test_stack_of_parallel_units_sums_changes_and_average_weights_them():
    model = _two_adapters(lambda: mma.LoRAConfig(r=2, target_modules=["0"]))
    x = torch.randn(5, 6)
    da, db = _delta(model, "a", x), _delta(model, "b", x)
    base = model[0].base_layer(x)
    mma.set_active(model, ["a", "b"])
    with torch.no_grad():
        torch.testing.assert_close(model[0](x), base + da + db)
    mma.set_active(model, mma.Average("a", "b", weights=[0.25, 0.75]))
    with torch.no_grad():
        torch.testing.assert_close(model[0](x), base + 0.25 * da + 0.75 * db)


def test_stack_order_matters_for_series_adapters():
    model = _two_adapters(lambda: mma.BottleneckConfig(bottleneck_dim=2, target_modules=["0"]))
    x = torch.randn(5, 6)
    units = {n: model[0].adapters[n]["bottleneck"] for n in "ab"}
    with torch.no_grad():
        h = model[0].base_layer(x)
        expect_ab = units["b"](x, units["a"](x, h))
        mma.set_active(model, mma.Stack("a", "b"))
        torch.testing.assert_close(model[0](x), expect_ab)
        mma.set_active(model, ["b", "a"])
        assert not torch.allclose(model[0](x), expect_ab)
        mma.set_active(model, mma.Average("a", "b"))  # mean of the two outputs
        torch.testing.assert_close(model[0](x), 0.5 * (units["a"](x, h) + units["b"](x, h)))


def test_average_of_weight_units_averages_deltas_in_attention():
    model = make_toy("transformer")
    x = toy_input("transformer")
    for n, seed in (("a", 1), ("b", 2)):
        mma.add_adapter(model, n, mma.LoRAConfig(r=2, target_modules=["@attn"]))
        _randomize(model, n, seed)
    mma.set_active(model, mma.Average("a", "b", weights=[0.5, 0.5]))
    with torch.no_grad():
        y = model(x)
        mma.merge(model)  # the merged weights are W + 0.5 dW_a + 0.5 dW_b
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
        mma.unmerge(model)


def test_nesting_rules_come_from_one_table():
    assert mma.Stack in mma.ALLOWED_NESTINGS[mma.Average]
    model = _lin()
    for n in "abc":
        mma.add_adapter(model, n, mma.LoRAConfig(r=1, target_modules=["0"]))
    mma.set_active(model, mma.Stack("a", mma.Average("b", "c")))
    with pytest.raises(ValueError, match="appears twice"):
        mma.set_active(model, ["a", "a"])
    with pytest.raises(KeyError, match="no adapter named 'zzz'"):
        mma.set_active(model, ["a", "zzz"])
    with pytest.raises(ValueError, match="weights"):
        mma.Average("a", "b", weights=[1.0])


def test_delete_restores_plain_modules_and_shared_parts():
    model = _lin()
    mma.add_adapter(model, "h1", mma.HyperAdapterConfig(task_embedding_dim=4, layer_embedding_dim=4, hidden_dim=4,
                                                        bottleneck_dim=2, target_modules=["0", "2"]))
    mma.add_adapter(model, "h2", mma.HyperAdapterConfig(task_embedding_dim=4, layer_embedding_dim=4, hidden_dim=4,
                                                        bottleneck_dim=2, target_modules=["0", "2"]))
    # one hypernetwork, two task embeddings; the report counts shared parameters once
    assert sorted(model.mma_shared.keys()) == ["h1__task_embedding", "h2__task_embedding", "hypernet_hypernet"]
    report = mma.parameter_report(model)
    hyper = sum(p.numel() for p in model.mma_shared["hypernet_hypernet"].parameters())
    assert report.adapters == hyper + 2 * 4
    assert report.per_adapter["h1"] == hyper + 4
    mma.delete_adapter(model, "h1")
    assert "hypernet_hypernet" in model.mma_shared and mma.get_active(model) is None
    mma.delete_adapter(model, "h2")
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)
    assert not hasattr(model, "mma_shared") or "mma_shared" not in model._modules
    assert mma.adapter_names(model) == []


def test_first_adapter_becomes_active_and_inactive_adapters_do_nothing():
    model = _lin()
    x = torch.randn(2, 6)
    with torch.no_grad():
        y0 = model(x)
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, target_modules=["0"]))
    mma.add_adapter(model, "b", mma.LoRAConfig(r=2, target_modules=["2"]))
    assert mma.get_active(model) == "a"
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    mma.set_active(model, None)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
    mma.set_active(model, "a")
    mma.freeze_base(model)
    assert all(not p.requires_grad for p in mma.adapter_parameters(model, "b").values())


def test_compacter_shares_its_rule_and_phm_adapter_does_not():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    mma.add_adapter(model, "c", mma.CompacterConfig.compacter(bottleneck_dim=2, phm_dim=2, target_modules=["0", "2"]))
    mma.add_adapter(model, "p", mma.CompacterConfig.phm_adapter(bottleneck_dim=2, phm_dim=2, target_modules=["0"]))
    names = set(mma.adapter_parameters(model, "c"))
    assert "mma_shared.phm_rule.phm_rule" in names
    assert not any(n.endswith("rule.phm_rule") and not n.startswith("mma_shared") for n in names)
    assert any(n.endswith("down.rule.phm_rule") for n in mma.adapter_parameters(model, "p"))
    c_unit = model[0].adapters["c"]["compacter"]
    assert c_unit.up.phm_weight is None and c_unit.up.phm_left is not None  # factorized B_i = s_i t_i^T


def test_compacter_names_the_module_whose_size_phm_dim_does_not_divide():
    with pytest.raises(ValueError, match="phm_dim=2 must divide the feature sizes of module '2'"):
        mma.add_adapter(_lin(), "c", mma.CompacterConfig(bottleneck_dim=2, phm_dim=2, target_modules=["2"]))
