"""BitFit and norm tuning as per-adapter parameter deltas.

Instead of unfreezing the base's biases or LayerNorms (which would then be shared, and overwritten,
by every adapter), each adapter learns zero-initialized deltas for them. The base stays intact,
deltas save with the adapter, and switching adapters switches them too. Merging adds them exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..units import AdapterUnit

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm, nn.modules.instancenorm._InstanceNorm,
)


def is_norm(module: nn.Module) -> bool:
    """A normalization layer: torch's own, or a model library's leaf class named like one (transformers'
    ``T5LayerNorm``, ``LlamaRMSNorm``) that has a ``weight`` parameter."""
    if isinstance(module, NORM_TYPES):
        return True
    name = type(module).__name__
    return (name.endswith(("LayerNorm", "RMSNorm")) and isinstance(getattr(module, "weight", None), nn.Parameter)
            and next(module.children(), None) is None)


class ParamDelta(AdapterUnit):
    kind = "weight"

    def __init__(self, base: nn.Module, names: list[str]):
        super().__init__(gate=False)
        params = dict(base.named_parameters())
        # Parameter names may contain dots (out_proj.bias): store under escaped keys.
        self.deltas = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(torch.zeros_like(params[n])) for n in names})

    def delta_params(self) -> dict[str, Tensor]:
        return {k.replace("__", "."): v for k, v in self.deltas.items()}


def tuned_parameters(model_modules, target_names: set[str], train_norms: bool, train_biases: str) -> dict[str, list[str]]:
    """Which parameters of which modules (logical name -> parameter names) get deltas."""
    chosen: dict[str, list[str]] = {}
    for name, module, parent in model_modules:
        if isinstance(parent, nn.MultiheadAttention):
            continue  # its out_proj is handled through the attention module itself
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if isinstance(module, nn.MultiheadAttention):
            own += [f"out_proj.{n}" for n, _ in module.out_proj.named_parameters(recurse=False)]
        picked: list[str] = []
        if train_norms and is_norm(module):
            picked += own
        if train_biases == "all" or (train_biases == "adapted" and name in target_names):
            picked += [n for n in own if n.split(".")[-1].endswith("bias") and n not in picked]
        if picked:
            chosen[name] = picked
    return chosen
