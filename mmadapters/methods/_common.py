"""Pieces several methods share: activations, the build context, weight initialization."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..targets import Target

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def make_activation(name: str, owner: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"{owner}.activation: expected one of {sorted(ACTIVATIONS)}, got {name!r}") from None


@dataclass
class BuildContext:
    """Handed to a method's builder: where to inject, and access to modules shared across layers."""

    model: nn.Module
    adapter: str
    config: AdapterConfig
    targets: list[Target]
    shared: Callable[[str, Callable[[], nn.Module], bool], nn.Module]
    # shared(alias, factory, per_adapter): a module stored once at the model root. per_adapter=False
    # shares it between adapters that use the same alias (a Hyperformer hypernetwork); True keeps one
    # per adapter (Compacter's shared rule, a task embedding).


def init_last_layer(layer: nn.Module, zero: bool) -> None:
    """Zero the output layer so an adapter starts as the identity; with a gate the gate does that instead."""
    weight = getattr(layer, "weight", None)
    if weight is None:
        return
    if zero:
        nn.init.zeros_(weight)
    else:
        nn.init.normal_(weight, std=1.0 / math.sqrt(max(1, weight.shape[-1])))
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)


def bottleneck_size(config, in_dim: int) -> int:
    """``bottleneck_dim`` if set, else ``in_dim / reduction_factor`` (at least 1)."""
    if config.bottleneck_dim is not None:
        return int(config.bottleneck_dim)
    rf = config.reduction_factor if config.reduction_factor is not None else 16
    return max(1, int(in_dim // rf))


def require_dims(target, in_dim, out_dim, owner: str) -> None:
    if in_dim is None or out_dim is None:
        raise ValueError(
            f"{owner}: cannot infer the feature size of module {target.name!r} "
            f"({type(target.module).__name__}); declare it on the adapter point (AdapterPoint(..., dim=D))"
        )
