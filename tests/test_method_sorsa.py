"""SORSA: SVD initialization, exact zero delta at init, the residual stays frozen, the orthonormal
regularizer, merge, and bit-exact save/load onto the same base."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from toys import make_toy, toy_input

import mmadapters as mma
import mmadapters.methods.sorsa as sorsa
from mmadapters.methods.sorsa import SORSAConfig, SORSAUnit, orthonormal_regularizer, principal_factors
from mmadapters.model import wrappers

TARGETS = {"mlp": ["fc1", "fc2"], "transformer": ["@attn", "mlp.fc1", "embed"], "conv": ["conv1", "conv2"]}


def _units(model, name="a") -> dict[str, SORSAUnit]:
    return {w.module_name: u for w in wrappers(model) for u in w.units(name) if isinstance(u, SORSAUnit)}


def _perturb(model, name="a", scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mma.adapter_parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_principal_factors_are_the_leading_svd_with_canonical_signs():
    w = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    u, s, vh = principal_factors(w, 3)
    assert u.shape == (12, 3) and s.shape == (3,) and vh.shape == (3, 7)
    ref = torch.linalg.svdvals(w.double())
    torch.testing.assert_close(s.double(), ref[:3], rtol=1e-6, atol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(3), rtol=0, atol=1e-5)
    pivots = u[u.abs().argmax(dim=0), torch.arange(3)]
    assert (pivots > 0).all()
    # flipping the input's sign flips U (canonical signs), not the principal part
    u2, s2, vh2 = principal_factors(-w, 3)
    torch.testing.assert_close((u2 * s2) @ vh2, -(u * s) @ vh, rtol=0, atol=1e-5)


@pytest.mark.parametrize("toy", ["mlp", "transformer", "conv"])
def test_delta_is_exactly_zero_at_init_and_residual_is_the_svd_tail(toy):
    model, x = make_toy(toy), toy_input(toy)
    with torch.no_grad():
        y0 = model(x)
    mma.add_adapter(model, "a", SORSAConfig(r=3, target_modules=TARGETS[toy]))
    units = _units(model)
    assert units
    for unit in units.values():
        for delta in unit.delta_params().values():
            assert torch.count_nonzero(delta) == 0
    with torch.no_grad():
        assert torch.equal(model(x), y0)
    # the frozen residual W - U0 diag(S0) V0^T has the remaining singular values of W
    w = next(w for w in wrappers(model) if "weight" in _units(model)[w.module_name].principals)
    weight = w.base_layer.weight.detach().double().flatten(1)  # a conv kernel is decomposed as out x (in * k * k)
    p = _units(model)[w.module_name].principals["weight"]
    residual = weight - ((p.U0 * p.S0) @ p.V0).double()
    full = torch.linalg.svdvals(weight)
    torch.testing.assert_close(torch.linalg.svdvals(residual)[: full.numel() - 3], full[3:], rtol=0, atol=1e-5)


def test_effective_weight_is_residual_plus_trained_principal_part_and_merges_exactly():
    model, x = make_toy("mlp"), toy_input("mlp")
    base_w = model.fc1.weight.detach().clone()
    mma.add_adapter(model, "a", SORSAConfig(r=4, alpha=8.0, target_modules=["fc1"]))
    _perturb(model)
    p = _units(model)["fc1"].principals["weight"]
    s = 8.0 / 4
    expect = (base_w.double() - s * ((p.U0 * p.S0) @ p.V0).double()
              + s * ((p.sorsa_U * p.sorsa_S) @ p.sorsa_V).double())
    with torch.no_grad():
        y = model(x)
        mma.merge(model)
        torch.testing.assert_close(model.fc1.weight.double(), expect, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
        mma.unmerge(model)
    assert torch.equal(model.fc1.weight, base_w)  # the base weight itself is never edited


def test_training_touches_only_the_principal_factors():
    model, x = make_toy("transformer"), toy_input("transformer")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mma.add_adapter(model, "a", SORSAConfig(r=2, target_modules=TARGETS["transformer"]))
    mma.freeze_base(model)
    names = set(mma.adapter_parameters(model, "a"))
    assert names and all(n.rsplit(".", 1)[-1] in ("sorsa_U", "sorsa_S", "sorsa_V") for n in names)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        (model(x).pow(2).mean() + 0.1 * orthonormal_regularizer(model)).backward()
        opt.step()
    mma.set_active(model, None)
    for k, v in model.state_dict().items():
        if ".adapters." not in k:
            assert torch.equal(v, before[k.replace("base_layer.", "")]), k
    assert any(torch.count_nonzero(d) > 0 for u in _units(model).values() for d in u.delta_params().values())


def test_orthonormal_regularizer_matches_the_paper_form():
    model = make_toy("transformer")
    mma.add_adapter(model, "a", SORSAConfig(r=2, target_modules=TARGETS["transformer"]))
    assert orthonormal_regularizer(model).item() < 1e-5  # singular vectors are orthonormal at init
    _perturb(model, scale=0.2)
    terms = []
    for unit in _units(model).values():
        for p in unit.principals.values():
            eye = torch.eye(2)
            terms.append(torch.linalg.norm(p.sorsa_U.T @ p.sorsa_U - eye))
            terms.append(torch.linalg.norm(p.sorsa_V @ p.sorsa_V.T - eye))
    # 2 blocks x (q, k, v, out_proj) + 2 x fc1 + embed: 11 matrices, 22 norms
    assert len(terms) == 22
    torch.testing.assert_close(orthonormal_regularizer(model), torch.stack(terms).mean())
    torch.testing.assert_close(orthonormal_regularizer(model, "a", reduction="sum"), torch.stack(terms).sum())
    reg = orthonormal_regularizer(model)
    reg.backward()
    grads = {n: p.grad for n, p in mma.adapter_parameters(model, "a").items()}
    assert all(g is None or torch.count_nonzero(g) == 0 for n, g in grads.items() if n.endswith("sorsa_S"))
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.endswith(("sorsa_U", "sorsa_V")))
    # a few steps on the regularizer alone pull U_p, V_p back towards orthonormal
    opt = torch.optim.SGD(list(mma.adapter_parameters(model, "a").values()), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        orthonormal_regularizer(model).backward()
        opt.step()
    assert orthonormal_regularizer(model).item() < 0.5 * reg.item()


def test_orthonormal_regularizer_errors():
    model = make_toy("mlp")
    with pytest.raises(ValueError, match="no SORSA adapter"):
        orthonormal_regularizer(model)
    mma.add_adapter(model, "lora", mma.LoRAConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match="'lora' is a LoRAConfig"):
        orthonormal_regularizer(model, "lora")
    with pytest.raises(ValueError, match="reduction"):
        orthonormal_regularizer(model, reduction="max")


@pytest.mark.parametrize("toy", ["mlp", "transformer", "conv"])
def test_save_load_is_bit_exact_on_the_same_base_and_stores_only_the_factors(toy, tmp_path):
    model, x = make_toy(toy), toy_input(toy)
    fresh = copy.deepcopy(model)
    mma.add_adapter(model, "a", SORSAConfig(r=2, target_modules=TARGETS[toy]))
    _perturb(model)
    mma.save_adapter(model, "a", tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert tensors and all(k.rsplit(".", 1)[-1] in ("sorsa_U", "sorsa_S", "sorsa_V") for k in tensors)
    expected = sum(2 * (sh[0] + sh[1] + 1) for u in _units(model).values()
                   for p in u.principals.values() for sh in [(p.sorsa_U.shape[0], p.sorsa_V.shape[1])])
    assert sum(t.numel() for t in tensors.values()) == expected
    torch.set_num_threads(1)  # the SVD is recomputed on load: thread count must not matter
    try:
        mma.load_adapter(fresh, tmp_path / "a")
    finally:
        torch.set_num_threads(2)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_config_and_target_errors():
    with pytest.raises(ValueError, match="SORSAConfig.gate"):
        SORSAConfig(r=2, gate=True)
    with pytest.raises(ValueError, match="SORSAConfig.r"):
        SORSAConfig(r=0)
    with pytest.raises(ValueError, match=r"SORSAConfig.r: 9 exceeds the rank limit min\(out, in\) = 8 of fc2"):
        mma.add_adapter(make_toy("mlp"), "a", SORSAConfig(r=9, target_modules=["fc2"]))
    model = make_toy("mlp")
    with pytest.raises(ValueError, match="module 'norm' is a LayerNorm"):
        mma.add_adapter(model, "a", SORSAConfig(r=2, target_modules=["norm"]))
    assert mma.adapter_names(model) == []
    mha = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    with pytest.raises(ValueError, match="kdim/vdim"):
        mma.add_adapter(mha, "a", SORSAConfig(r=2, target_modules=["0"]))
    assert sorsa.SORSAConfig.method == "sorsa"
    cfg = SORSAConfig(r=3, alpha=6.0, target_modules=["fc1"])
    assert mma.AdapterConfig.from_dict(cfg.to_dict()) == cfg and cfg.scaling == 2.0
