"""The wrapper's cached single-adapter plan and the bottleneck's fused forward equal the general path exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmadapters as mma
from mmadapters.wrapper import AdaptedModule


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 12)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _perturb(model, name):
    with torch.no_grad():
        for p in mma.adapter_parameters(model, name).values():
            p.add_(torch.randn_like(p) * 0.3)


def _general(model, x):
    """The same model through the general (composition) path: a one-child Stack is the single adapter."""
    active = mma.get_active(model)
    mma.set_active(model, mma.Stack(active))
    try:
        return model(x)
    finally:
        mma.set_active(model, active)


@pytest.mark.parametrize("config", [
    dict(bottleneck_dim=3, target_modules=["a", "b"], activation="swish", pre_norm=True),
    dict(bottleneck_dim=3, target_modules=["a"], activation="gelu", scaling=0.5, placement="parallel"),
    dict(bottleneck_dim=2, target_modules=["b"], activation="relu"),
    dict(bottleneck_dim=2, target_modules=["b"], activation="tanh", gate=True),      # general path inside the plan
    dict(bottleneck_dim=2, target_modules=["b"], activation="relu", dropout=0.1),    # idem
])
def test_single_adapter_plan_equals_general_path(config):
    torch.manual_seed(0)
    model = Net()
    mma.add_adapter(model, "x", mma.BottleneckConfig(**config))
    _perturb(model, "x")
    model.eval()
    inp = torch.randn(2, 5, 12)
    with torch.no_grad():
        fast, general = model(inp), _general(model, inp)
        mma.set_active(model, None)
        base = model(inp)
        mma.set_active(model, "x")
    assert torch.allclose(fast, general, atol=1e-6) and not torch.allclose(fast, base, atol=1e-3)
    fused = [u.fast_forward() for m in model.modules() if isinstance(m, AdaptedModule) for u in m.units("x")]
    plain = not config.get("gate") and not config.get("dropout")
    assert all((f is not None) == plain for f in fused)


def test_plan_follows_training_loading_and_new_units():
    torch.manual_seed(0)
    model = Net()
    mma.add_adapter(model, "x", mma.BottleneckConfig(bottleneck_dim=3, target_modules=["a"], pre_norm=True))
    inp = torch.randn(4, 12)
    with torch.no_grad():
        before = model(inp)
    _perturb(model, "x")  # in-place updates (training, loading) show through the cached plan
    with torch.no_grad():
        after = model(inp)
        assert not torch.allclose(before, after) and torch.allclose(after, _general(model, inp), atol=1e-6)
    mma.add_adapter(model, "lora", mma.LoRAConfig(r=2, target_modules=["a"]))  # new units drop the cache
    _perturb(model, "lora")
    mma.set_active(model, "lora")
    with torch.no_grad():
        assert torch.allclose(model(inp), _general(model, inp), atol=1e-6)
    loss = model(inp).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in mma.adapter_parameters(model, "lora").values())
