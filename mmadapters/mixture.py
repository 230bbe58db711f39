"""Mixture-of-adapters gate (MixDA, Diao et al. 2023): a learned softmax over adapters per point.

MixDA trains domain adapters first, then freezes them and learns, at every adapter point, a gate that
weighs their changes per token: ``h + sum_i softmax(W h / T)_i * (adapter_i(h) - h)``. Here the gate is
an adapter of its own (method ``"mixture_gate"``), so it saves, loads, freezes and reports like any
other, and the mixing is a composition::

    mma.add_mixture_gate(model, "gate", ["medical", "legal"])
    mma.set_active(model, mma.Mixture("medical", "legal", gate="gate"))
    mma.freeze_base(model, adapters=["gate"])   # MixDA stage 2: only the gate (and a task adapter) train

The gate's projection starts at zero: a new gate mixes uniformly, i.e. starts as ``mma.Average``.
"""

from __future__ import annotations

from torch import nn

from .methods.mixture_gate import MixtureGateConfig, MixtureGateUnit
from .model import add_adapter, get_config, state_of

__all__ = ["MixtureGateConfig", "MixtureGateUnit", "add_mixture_gate"]


def add_mixture_gate(model: nn.Module, name: str, adapters: list[str], *, temperature: float = 1.0) -> nn.Module:
    """Add gate ``name`` at every module where any of ``adapters`` has units. Returns ``model``."""
    state = state_of(model)
    targets, seen = [], set()
    for a in adapters:
        get_config(model, a)
        for t in state.targets.get(a, []):
            if t.name not in seen:
                seen.add(t.name)
                targets.append(t)
    config = MixtureGateConfig(adapters=list(adapters), temperature=temperature,
                               target_modules=[t.name for t in targets])
    return add_adapter(model, name, config, _targets=targets)
