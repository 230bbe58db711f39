"""The mixture gate's config and unit (method ``"mixture_gate"``); see :mod:`mmadapters.mixture`."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ..config import AdapterConfig, check_positive, register_method, target_modules_field
from ..units import AdapterUnit, channel_dim, feature_dims, on_channels


@dataclass
class MixtureGateConfig(AdapterConfig):
    adapters: list[str] = field(default_factory=list, metadata={
        "help": "The adapters the gate mixes, in the order of the Mixture's children."})
    target_modules: list[str] | str | None = target_modules_field()
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of the gate."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.adapters) < 2 or not all(isinstance(a, str) for a in self.adapters):
            raise ValueError(f"MixtureGateConfig.adapters: expected two or more adapter names, got {self.adapters!r}")
        check_positive(self, "temperature")


class MixtureGateUnit(AdapterUnit):
    """Per-token weights over ``n`` adapters from the module's output ``h``: ``softmax(W h / T)``."""

    kind = "gate"

    def __init__(self, dim: int, n: int, temperature: float, chdim: int):
        super().__init__(gate=False)
        self.proj = nn.Linear(dim, n)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.temperature = temperature
        self.channel_dim = chdim
        self.n = n

    def mix_weights(self, h: Tensor) -> Tensor:
        """``h`` (..., D, ...) -> weights with the feature dimension replaced by ``n`` (summing to 1)."""
        return on_channels(lambda t: (self.proj(t) / self.temperature).softmax(-1), h, self.channel_dim)

    def merge_into(self, base, params):
        return params  # alone, a gate changes nothing


def _build(ctx):
    config: MixtureGateConfig = ctx.config
    for target in ctx.targets:
        _, out_dim = feature_dims(target.module, target.dim)
        if out_dim is None:
            raise ValueError(f"MixtureGateConfig: cannot tell the output width of {target.name!r}; "
                             "declare it with AdapterPoint(dim=...)")
        yield target.name, "gate", MixtureGateUnit(out_dim, len(config.adapters), config.temperature,
                                                   channel_dim(target.module))


register_method("mixture_gate", MixtureGateConfig, _build)
