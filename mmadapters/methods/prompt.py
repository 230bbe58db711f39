"""Prompt tokens (prompt tuning, Lester et al. 2021; VPT, Jia et al. 2022).

Learnable tokens inserted into the token sequence a target module outputs (an embedding layer, or a
block for deep prompts). ``mode="prepend"`` inserts ``num_tokens`` tokens at ``position`` (0: before
all tokens; 1: after a class token); ``mode="replace"`` overwrites the tokens at those positions (deep
prompts: each later block replaces the previous block's prompts with its own). With ``reparameterize``
the tokens are produced by a two-layer MLP from an embedding, as in prefix tuning / VL-Adapter's prompt
baseline; the MLP can be dropped after training.

The backbone is responsible for attention masks: a model that prepends prompts must extend its mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, check_choice, check_positive, register_method, target_modules_field
from ..units import AdapterUnit, feature_dims
from ._common import BuildContext, require_dims


@dataclass
class PromptConfig(AdapterConfig):
    target_modules: list[str] | str | None = target_modules_field()
    num_tokens: int = field(default=10, metadata={"help": "Number of prompt tokens."})
    position: int = field(default=0, metadata={"help": "Sequence index where prompts go (1 keeps a leading CLS token first)."})
    mode: str = field(default="prepend", metadata={"help": "'prepend' inserts tokens; 'replace' overwrites existing ones."})
    seq_dim: int = field(default=1, metadata={"help": "Sequence dimension of the target's output: 1 for (B, T, D), 0 for (T, B, D)."})
    reparameterize: bool = field(default=False, metadata={"help": "Produce prompts with an MLP from an embedding."})
    reparam_hidden: int = field(default=512, metadata={"help": "Hidden width of the reparameterization MLP."})
    init_std: float = field(default=0.02, metadata={"help": "Standard deviation of the initial prompt tokens."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "num_tokens")
        check_choice(self, "mode", ("prepend", "replace"))
        if self.seq_dim not in (0, 1):
            raise ValueError(f"PromptConfig.seq_dim: expected 0 or 1, got {self.seq_dim!r}")
        if self.position < 0:
            raise ValueError(f"PromptConfig.position: expected >= 0, got {self.position!r}")


class PromptUnit(AdapterUnit):
    kind = "series"

    def __init__(self, dim: int, config: PromptConfig):
        super().__init__(gate=config.gate)
        self.config = config
        self.prompts = nn.Parameter(torch.randn(config.num_tokens, dim) * config.init_std)
        self.mlp = None
        if config.reparameterize:
            self.mlp = nn.Sequential(nn.Linear(dim, config.reparam_hidden), nn.Tanh(), nn.Linear(config.reparam_hidden, dim))

    def tokens(self) -> Tensor:
        """(P, D) prompt tokens."""
        p = self.prompts if self.mlp is None else self.prompts + self.mlp(self.prompts)
        return self.gated(p)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        cfg = self.config
        if h.dim() != 3:
            raise ValueError(f"PromptConfig: expected a (B, T, D) or (T, B, D) token sequence, got shape {tuple(h.shape)}")
        seq = h if cfg.seq_dim == 1 else h.transpose(0, 1)  # (B, T, D)
        p = self.tokens().to(seq.dtype).unsqueeze(0).expand(seq.shape[0], -1, -1)
        pos = cfg.position
        if cfg.mode == "prepend":
            out = torch.cat([seq[:, :pos], p, seq[:, pos:]], dim=1)
        else:
            if pos + cfg.num_tokens > seq.shape[1]:
                raise ValueError(f"PromptConfig: cannot replace tokens {pos}..{pos + cfg.num_tokens - 1} "
                                 f"of a sequence of length {seq.shape[1]}")
            out = torch.cat([seq[:, :pos], p, seq[:, pos + cfg.num_tokens:]], dim=1)
        return out if cfg.seq_dim == 1 else out.transpose(0, 1)


def build(ctx: BuildContext):
    for target in ctx.targets:
        _, dim = feature_dims(target.module, target.dim)
        require_dims(target, dim, dim, "PromptConfig")
        yield target.name, "prompt", PromptUnit(dim, ctx.config)


register_method("prompt", PromptConfig, build)
