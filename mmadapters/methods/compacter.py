"""Compacter and the plain PHM adapter (Karimi Mahabadi et al. 2021).

A bottleneck adapter whose down and up projections are PHM layers: ``W = sum_i A_i (x) B_i`` (Kronecker
product), ``A_i`` of size n x n, ``B_i`` of size (out/n) x (in/n).

- Compacter: ``B_i = s_i t_i^T`` (low-rank factorized) and the ``A_i`` ("shared rule") shared by every
  PHM layer of the adapter.
- PHM adapter: full ``B_i`` and one ``A`` per layer. The released VL-Adapter scripts train this one
  while calling it Compacter; here each is named for what it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, check_choice, check_positive, register_method, target_modules_field
from ..units import AdapterUnit, channel_dim, feature_dims, on_channels
from ._common import BuildContext, bottleneck_size, make_activation, require_dims


@dataclass
class CompacterConfig(AdapterConfig):
    target_modules: list[str] | str | None = target_modules_field()
    placement: str = field(default="series", metadata={"help": "'series' or 'parallel', as for bottleneck adapters."})
    bottleneck_dim: int | None = field(default=None, metadata={"help": "Bottleneck width (a multiple of phm_dim)."})
    reduction_factor: float | None = field(default=None, metadata={"help": "Used when bottleneck_dim is unset (default 16)."})
    phm_dim: int = field(default=4, metadata={"help": "n: number of Kronecker summands and size of each A_i."})
    factorized_phm: bool = field(default=True, metadata={"help": "B_i = s_i t_i^T of rank phm_rank (Compacter)."})
    phm_rank: int = field(default=1, metadata={"help": "Rank of the factorized B_i."})
    shared_phm_rule: bool = field(default=True, metadata={"help": "Share the A_i across all PHM layers of the adapter."})
    activation: str = field(default="gelu", metadata={"help": "Non-linearity in the bottleneck."})
    scaling: float = field(default=1.0, metadata={"help": "Residual scaling of the adapter branch."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "placement", ("series", "parallel"))
        check_positive(self, "phm_dim")
        check_positive(self, "phm_rank")
        check_positive(self, "bottleneck_dim", allow_none=True)
        make_activation(self.activation, "CompacterConfig")

    @classmethod
    def compacter(cls, **kwargs) -> CompacterConfig:
        return cls(factorized_phm=True, shared_phm_rule=True, **kwargs)

    @classmethod
    def phm_adapter(cls, **kwargs) -> CompacterConfig:
        return cls(factorized_phm=False, shared_phm_rule=False, **kwargs)


class PHMRule(nn.Module):
    """The ``A_i`` matrices, (n, n, n); one per layer or one per adapter."""

    def __init__(self, n: int):
        super().__init__()
        self.phm_rule = nn.Parameter(torch.empty(n, n, n))
        nn.init.normal_(self.phm_rule, std=0.01 if n > 1 else 1.0)
        with torch.no_grad():  # start near sum_i e_i e_i^T so the product is well conditioned
            self.phm_rule += torch.eye(n).unsqueeze(0) / n


class PHMLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, n: int, factorized: bool, rank: int,
                 rule: PHMRule | None, zero: bool):
        super().__init__()
        if in_dim % n or out_dim % n:
            raise ValueError(f"CompacterConfig.phm_dim={n} must divide both {in_dim} and {out_dim}")
        self.n, self.in_dim, self.out_dim = n, in_dim, out_dim
        bo, bi = out_dim // n, in_dim // n
        if rule is None:
            self.rule = PHMRule(n)
        else:  # shared rule: reference it without registering it here (it is registered at the model root)
            object.__setattr__(self, "_shared_rule", rule)
            self.rule = None
        std = math.sqrt(2.0 / (in_dim + out_dim))
        if factorized:
            self.phm_left = nn.Parameter(torch.randn(n, bo, rank) * math.sqrt(std))
            self.phm_right = nn.Parameter(torch.zeros(n, rank, bi) if zero else torch.randn(n, rank, bi) * math.sqrt(std))
            self.phm_weight = None
        else:
            self.phm_weight = nn.Parameter(torch.zeros(n, bo, bi) if zero else torch.randn(n, bo, bi) * std)
            self.phm_left = self.phm_right = None
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def weight(self) -> Tensor:
        rule = (self.rule if self.rule is not None else self._shared_rule).phm_rule  # (n, n, n)
        b = self.phm_weight if self.phm_weight is not None else self.phm_left @ self.phm_right  # (n, bo, bi)
        # sum_i kron(A_i, B_i): (i,p,r) x (i,q,s) -> (p,q,r,s) -> (n*bo, n*bi)
        w = torch.einsum("ipr,iqs->pqrs", rule, b)
        return w.reshape(self.out_dim, self.in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight(), self.bias)


class CompacterUnit(AdapterUnit):
    def __init__(self, in_dim: int, out_dim: int, bottleneck: int, config: CompacterConfig,
                 rule: PHMRule | None, chdim: int):
        super().__init__(gate=config.gate)
        self.kind = config.placement
        self.channel_dim = chdim
        self.scaling = config.scaling
        n, f, k = config.phm_dim, config.factorized_phm, config.phm_rank
        self.down = PHMLinear(in_dim, bottleneck, n, f, k, rule, zero=False)
        self.act = make_activation(config.activation, "CompacterConfig")
        self.up = PHMLinear(bottleneck, out_dim, n, f, k, rule, zero=not config.gate)

    def change(self, x: Tensor, h: Tensor) -> Tensor:
        src = x if self.kind == "parallel" else h
        return on_channels(lambda t: self.scaling * self.up(self.act(self.down(t))), src, self.channel_dim)


def build(ctx: BuildContext):
    config: CompacterConfig = ctx.config
    rule = ctx.shared("phm_rule", lambda: PHMRule(config.phm_dim), True) if config.shared_phm_rule else None
    for target in ctx.targets:
        in_dim, out_dim = feature_dims(target.module, target.dim)
        if config.placement == "series":
            in_dim = out_dim
        require_dims(target, in_dim, out_dim, "CompacterConfig")
        bn = bottleneck_size(config, in_dim)
        bn = max(config.phm_dim, bn - bn % config.phm_dim)  # a multiple of n
        if in_dim % config.phm_dim or out_dim % config.phm_dim:
            raise ValueError(f"CompacterConfig.phm_dim={config.phm_dim} must divide the feature sizes of module "
                             f"{target.name!r} (in {in_dim}, out {out_dim})")
        yield target.name, "compacter", CompacterUnit(in_dim, out_dim, bn, config, rule, channel_dim(target.module))


register_method("compacter", CompacterConfig, build)
