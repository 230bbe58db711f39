"""Adapter units: the small modules a wrapper runs next to a base module.

Every unit is one of three kinds, which is all the composition code needs to know:

- ``"parallel"``: reads the module's *input* ``x`` and adds a change to its output (LoRA on a Linear,
  a parallel bottleneck): ``h + g * change(x)``;
- ``"series"``: reads the module's *output* ``h`` and adds a change to it (a Houlsby/Pfeiffer
  bottleneck): ``h + g * change(h)``; units that reshape ``h`` (prompt tokens) override ``forward``;
- ``"weight"``: edits the base module's own parameters, ``W + g * delta`` (LoRA inside
  ``nn.MultiheadAttention``, which reads its weights directly; BitFit and norm tuning).

``g`` is an optional zero-initialized scalar gate (LLaMA-Adapter style).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import Tensor, nn


class NotMergeable(Exception):
    """Raised by a unit whose math does not allow folding it into the base weights."""


class AdapterUnit(nn.Module, abc.ABC):
    kind: ClassVar[str] = "series"

    def __init__(self, gate: bool = False):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(())) if gate else None

    def gated(self, change: Tensor) -> Tensor:
        return change if self.gate is None else change * self.gate.to(change.dtype)

    # -- activation units ---------------------------------------------------------------------------
    def change(self, x: Tensor, h: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise TypeError(f"{type(self).__name__} is a {self.kind!r} unit and has no activation change")

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """``x``: the wrapped module's input; ``h``: its (possibly already adapted) output."""
        return h + self.gated(self.change(x, h))

    def fast_forward(self):
        """A callable ``(x, h) -> output`` equal to :meth:`forward` with less per-call overhead, or None. The wrapper
        caches it per active adapter, so it may hold references to this unit's modules but must read their
        parameters at call time (they train and load in place)."""
        return None

    # -- weight units -------------------------------------------------------------------------------
    def delta_params(self) -> dict[str, Tensor]:
        """For ``"weight"`` units: parameter name (relative to the base module) -> delta."""
        raise TypeError(f"{type(self).__name__} is a {self.kind!r} unit and edits no weights")

    # -- per-sample routing (see mmadapters.routing) -------------------------------------------------
    # A routable unit describes itself as a few tensors that can be stacked over adapters, S-LoRA style.
    # Units of one group (same key) are stacked into pools [slots, ...]; dims named in ``route_pad``
    # (ranks, bottleneck widths) are zero-padded to the largest in the pool, which changes nothing.
    route_pad: ClassVar[dict[str, int]] = {}

    def route_group(self) -> tuple | None:
        """A key: units with equal keys can share one stacked pool. ``None``: not routable."""
        return None

    def route_tensors(self) -> dict[str, Tensor]:
        """This unit's stackable tensors, scaling and gate folded in (differentiable)."""
        raise TypeError(f"{type(self).__name__} cannot be routed per sample")

    def routed_change(self, x: Tensor | None, h: Tensor, pool: dict[str, Tensor], idx: Tensor) -> Tensor:
        """The per-sample change for a batch whose sample ``b`` uses pool slot ``idx[b]``.

        ``x``, ``h``: the module's input and output with the batch first, ``(B, ..., D)``; ``self`` is a
        representative of the group (it supplies the shared structure, not the weights)."""
        raise TypeError(f"{type(self).__name__} cannot be routed per sample")

    def routed_apply(self, x: Tensor | None, h: Tensor, pool: dict[str, Tensor], idx: Tensor) -> Tensor:
        """``h`` plus the per-sample change (units may fuse the addition into their last matmul)."""
        return h + self.routed_change(x, h, pool, idx)

    # -- merging ------------------------------------------------------------------------------------
    def merge_into(self, base: nn.Module, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Return ``params`` (the base module's current parameters) with this activation unit folded in.

        Weight units need no override: the wrapper adds their deltas itself."""
        raise NotMergeable(f"{type(self).__name__} is not linear in its input")


def feature_dims(module: nn.Module, declared: int | None = None) -> tuple[int | None, int | None]:
    """(input features, output features) of a module, from its attributes or a declared size."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, module.embed_dim
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Embedding):
        return None, module.embedding_dim
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1], module.normalized_shape[-1]
    for attr in ("embed_dim", "d_model", "hidden_size", "width", "dim"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value, value
    return declared, declared


def channel_dim(module: nn.Module) -> int:
    """Which dimension of the module's output holds features: 1 for convolutions, else the last."""
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def on_channels(fn, t: Tensor, dim: int) -> Tensor:
    """Apply a last-dimension function ``fn`` to the feature dimension ``dim`` of ``t``."""
    if dim == -1 or dim == t.dim() - 1:
        return fn(t)
    return fn(t.movedim(dim, -1)).movedim(-1, dim)
