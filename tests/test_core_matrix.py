"""One parametrized matrix (method config x toy model) checks every promise the core makes once."""

from __future__ import annotations

import copy

import pytest
import torch
from toys import LORA_TARGETS, POINT_TARGETS, make_toy, toy_input

import mmadapters as mma

TOYS = ["mlp", "transformer", "conv"]


def _configs(toy: str) -> dict[str, tuple[mma.AdapterConfig, bool]]:
    """name -> (config, mergeable)."""
    lora, pts = LORA_TARGETS[toy], POINT_TARGETS[toy]
    out = {
        "lora": (mma.LoRAConfig(r=4, alpha=8, target_modules=lora), True),
        "lora_rslora_bitfit_norms": (mma.LoRAConfig(r=2, rslora=True, target_modules=lora, train_biases="all",
                                                    train_norms=True), True),
        "lora_gate": (mma.LoRAConfig(r=2, target_modules=lora, gate=True), True),
        "series": (mma.BottleneckConfig(placement="series", bottleneck_dim=4, target_modules=pts), False),
        "series_linear": (mma.BottleneckConfig(placement="series", activation="identity", bottleneck_dim=4,
                                               target_modules=pts), toy == "mlp"),
        "parallel": (mma.BottleneckConfig(placement="parallel", reduction_factor=2, pre_norm=True,
                                          target_modules=pts), False),
        "parallel_linear_gate": (mma.BottleneckConfig(placement="parallel", activation="identity", gate=True,
                                                      bottleneck_dim=4, target_modules=pts), toy == "mlp"),
        "post_norm": (mma.BottleneckConfig(post_norm=True, bottleneck_dim=4, target_modules=pts), False),
        "compacter": (mma.CompacterConfig.compacter(bottleneck_dim=4, phm_dim=2, target_modules=pts), False),
        "phm_adapter": (mma.CompacterConfig.phm_adapter(bottleneck_dim=4, phm_dim=2, target_modules=pts), False),
        "hyper": (mma.HyperAdapterConfig(task_embedding_dim=8, layer_embedding_dim=8, hidden_dim=8,
                                         bottleneck_dim=4, target_modules=pts), False),
        "mosa": (mma.MoSAConfig(bottleneck_dim=4, num_modules=2, target_modules=pts), False),
        "mosa_linear_parallel_gate": (mma.MoSAConfig(placement="parallel", activation="identity", bottleneck_dim=4,
                                                     num_modules=4, active_modules=2, gate=True, target_modules=pts),
                                      toy == "mlp"),
        "sorsa": (mma.SORSAConfig(r=4, target_modules=lora), True),
        "sorsa_alpha_bitfit": (mma.SORSAConfig(r=2, alpha=4.0, target_modules=lora, train_biases="adapted"), True),
        "bitfit_only": (mma.LoRAConfig(r=1, target_modules=lora[:1], train_biases="adapted"), True),
        "half_shared_down": (mma.BottleneckConfig(bottleneck_dim=4, share_down="g", target_modules=pts), False),
        "half_shared_up_linear": (mma.BottleneckConfig(activation="identity", bottleneck_dim=4, share_up="g", target_modules=pts),
                                  toy == "mlp"),
        "sparse_ft": (mma.SparseFTConfig(density=0.1, target_modules=lora), True),
        "sparse_ft_k_biases": (mma.SparseFTConfig(num_params=40, include_biases=True, target_modules=lora,
                                                  train_norms=True), True),
    }
    if toy == "transformer":
        out["llama_adapter"] = (mma.LlamaAdapterConfig(target_modules="@attn", num_prompts=3), False)
        out["llama_adapter_v2"] = (mma.LlamaAdapterConfig(target_modules="@attn", num_prompts=2, num_layers=2, train_norms=True,
                                                          bias_scale=["mlp.fc1", "mlp.fc2", "@attn"], train_biases="adapted",
                                                          visual_dim=6, visual_layers=1), False)
    return out


CASES = [(toy, name) for toy in TOYS for name in _configs(toy)]


def _setup(toy: str, name: str):
    model = make_toy(toy)
    base = copy.deepcopy(model)
    config, mergeable = _configs(toy)[name]
    x = toy_input(toy)
    with torch.no_grad():
        y0 = model(x)
    mma.add_adapter(model, "a", config)
    return model, base, config, mergeable, x, y0


def _perturb(model, name="a", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mma.adapter_parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("toy,name", CASES)
def test_identity_at_init(toy, name):
    model, _, _, _, x, y0 = _setup(toy, name)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("toy,name", CASES)
def test_freeze_base_grads_reach_only_adapters(toy, name):
    model, _, _, _, x, _ = _setup(toy, name)
    _perturb(model)  # gates and zero-initialized layers would otherwise block some gradients
    mma.freeze_base(model)
    adapter_ids = {id(p) for p in mma.adapter_parameters(model, "a").values()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(id(p) in adapter_ids for p in trainable)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.train()
    model(x).float().pow(2).mean().backward()
    for k, v in model.named_buffers():  # batch-norm running statistics stay frozen
        assert torch.equal(v, buffers[k]), f"base buffer {k} changed while training adapters"
    for n, p in model.named_parameters():
        if id(p) not in adapter_ids:
            assert p.grad is None, f"base parameter {n} received a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    report = mma.parameter_report(model)
    assert report.trainable == report.per_adapter["a"] == sum(p.numel() for p in trainable)
    assert report.base == sum(p.numel() for p in make_toy(toy).parameters())


@pytest.mark.parametrize("toy,name", CASES)
def test_merge_unmerge(toy, name):
    model, base, _, mergeable, x, _ = _setup(toy, name)
    _perturb(model)
    with torch.no_grad():
        y = model(x)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        if not mergeable:
            with pytest.raises(ValueError, match="adapter 'a'"):
                mma.merge(model)
            for k, v in model.state_dict().items():  # all or nothing: nothing changed
                assert torch.equal(v, before[k]), k
            return
        mma.merge(model)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
        mma.unmerge(model)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} not restored bit-exactly"
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("toy,name", CASES)
def test_save_load_round_trip(toy, name, tmp_path):
    model, base, config, _, x, _ = _setup(toy, name)
    _perturb(model)
    mma.save_adapter(model, "a", tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = mma.load_adapter(base, tmp_path / "a", name="b")
    assert loaded == "b" and mma.get_active(base) == "b"
    assert mma.get_config(base, "b") == config
    with torch.no_grad():
        torch.testing.assert_close(base(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("toy", TOYS)
def test_mismatched_base_names_the_module(toy, tmp_path):
    model, *_ = _setup(toy, "lora")
    mma.save_adapter(model, "a", tmp_path / "a")
    other = make_toy(toy, width=24)
    with pytest.raises(ValueError, match=r"shape mismatch at module '[\w.]+'.*saved for \[\d+(, \d+)*\], this base has"):
        mma.load_adapter(other, tmp_path / "a")
    assert mma.adapter_names(other) == []  # nothing half-added
