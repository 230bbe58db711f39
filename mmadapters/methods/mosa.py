"""MoSA: Mixture of Sparse Adapters (Split & Merge; Zhang et al., 2023).

Method. Start from a standard bottleneck adapter ``h + s * Up(act(Down(src)))`` (``src``: the module's
output for series placement, its input for parallel placement; see :mod:`.bottleneck`). **Split**: every
parameter tensor of the adapter (Down's weight and bias, Up's weight and bias) is partitioned element-wise
into ``num_modules`` disjoint random subsets of (nearly) equal size; module ``i`` is the *sparse adapter*
made of the entries in subset ``i`` (all other entries zero). **Sparse training**: in training mode every
forward of every adapted layer draws, uniformly at random, ``active_modules`` (``k``) of the modules for
Down and, independently, ``k`` for Up (the official code draws the two indices independently too) and runs
the adapter with only their entries; the other entries take no part in the forward, receive no gradient
(``grad is None``, so optimizers skip them, momentum and weight decay included) and keep their values.
**Merge**: in eval mode all modules act together, which is exactly the full adapter;
:func:`merge_mosa` turns a trained MoSA adapter into a plain bottleneck adapter of the same name whose
eval outputs are the same (see :func:`merge_mosa`), so inference and storage cost what a standard adapter costs.

Choices made here:

- Storage is the split itself: module ``i`` of tensor ``t`` is one trainable 1-D parameter
  ``chunks.<t>.<i>`` holding its entries, so the adapter has exactly as many parameters as the full one
  (no per-module copies) and an inactive module is simply absent from the graph.
- The partition is a function of ``mask_seed``, the module's name and the tensor's name, drawn with
  NumPy's legacy ``RandomState`` (whose stream NumPy keeps fixed across versions), so it is rebuilt
  identically when an adapter is loaded; the positions are non-persistent buffers.
- Initialization is the bottleneck adapter's (Down: PyTorch's Linear default; Up zero, so the model is
  unchanged at init; with ``gate=True`` Up is random and a zero gate does that).
- ``rescale=True`` (default) multiplies the drawn entries by ``num_modules / k`` in training, as inverted
  dropout does: each entry is drawn with probability ``k / num_modules``, so the sparse Down and Up are
  unbiased estimates of the full ones and (Down and Up being drawn independently) a linear adapter's
  expected training output is exactly the merged adapter's output. Without it the merged adapter sums
  what every module learned alone and overshoots (by up to ``(num_modules / k)^2`` for a linear adapter);
  ``rescale=False`` gives that unscaled form. We could not confirm from the official code which one it uses.
- Not implemented: the paper's hierarchical sparse strategy for low-data settings, pre/post LayerNorms.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, check_choice, check_positive, register_method, target_modules_field
from ..units import AdapterUnit, channel_dim, feature_dims, on_channels
from ._common import BuildContext, bottleneck_size, make_activation, require_dims
from .bottleneck import BottleneckConfig, BottleneckUnit

TENSORS = ("down_weight", "down_bias", "up_weight", "up_bias")


@dataclass
class MoSAConfig(AdapterConfig):
    """A bottleneck adapter trained as ``num_modules`` disjoint sparse modules (see the module docstring)."""

    target_modules: list[str] | str | None = target_modules_field()
    placement: str = field(default="series", metadata={
        "help": "'series': transform the module's output; 'parallel': add a branch fed by the module's input."})
    bottleneck_dim: int | None = field(default=None, metadata={
        "help": "Width of the bottleneck. If unset, input width / reduction_factor."})
    reduction_factor: float | None = field(default=None, metadata={
        "help": "Input width / bottleneck width, used when bottleneck_dim is unset (default 16)."})
    activation: str = field(default="relu", metadata={
        "help": "Non-linearity between down and up projection: relu, gelu, swish, tanh or identity."})
    scaling: float = field(default=1.0, metadata={"help": "Residual scaling s of the adapter branch."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the bottleneck activations."})
    num_modules: int = field(default=4, metadata={
        "help": "Number of disjoint sparse modules each adapter tensor is split into (at most the bottleneck width)."})
    active_modules: int = field(default=1, metadata={
        "help": "Modules drawn per forward in training mode, for Down and (independently) for Up."})
    rescale: bool = field(default=True, metadata={
        "help": "In training, scale the drawn entries by num_modules / active_modules (inverted-dropout style), so "
                "sparse training is unbiased for the merged adapter used at eval."})
    mask_seed: int = field(default=0, metadata={
        "help": "Seed of the random split (with the module and tensor names); fixed, so loading rebuilds it."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "placement", ("series", "parallel"))
        check_positive(self, "bottleneck_dim", allow_none=True)
        check_positive(self, "reduction_factor", allow_none=True)
        for name in ("num_modules", "active_modules"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoSAConfig.{name}: expected a positive integer, got {value!r}")
        if self.active_modules > self.num_modules:
            raise ValueError(f"MoSAConfig.active_modules: expected at most num_modules={self.num_modules}, "
                             f"got {self.active_modules}")
        if not isinstance(self.mask_seed, int) or isinstance(self.mask_seed, bool) or self.mask_seed < 0:
            raise ValueError(f"MoSAConfig.mask_seed: expected a non-negative integer, got {self.mask_seed!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoSAConfig.dropout: expected a value in [0, 1), got {self.dropout!r}")
        make_activation(self.activation, "MoSAConfig")

    def bottleneck_config(self) -> BottleneckConfig:
        """The plain bottleneck adapter this MoSA adapter merges into (same placement, sizes, options)."""
        return BottleneckConfig(
            target_modules=self.target_modules, placement=self.placement, bottleneck_dim=self.bottleneck_dim,
            reduction_factor=self.reduction_factor, activation=self.activation, scaling=self.scaling,
            dropout=self.dropout, gate=self.gate, train_norms=self.train_norms, train_biases=self.train_biases)


def split_positions(numel: int, num_modules: int, seed: int) -> list[Tensor]:
    """A random partition of ``range(numel)`` into ``num_modules`` sorted index sets of sizes differing by <= 1."""
    perm = np.random.RandomState(seed % 2**32).permutation(numel)
    return [torch.from_numpy(np.sort(perm[i::num_modules]).astype(np.int64)) for i in range(num_modules)]


def _tensor_seed(mask_seed: int, module_name: str, tensor: str) -> int:
    return (mask_seed * 1_000_003 + zlib.crc32(f"{module_name}/{tensor}".encode())) % 2**32


class MoSAUnit(AdapterUnit):
    """A bottleneck adapter stored as disjoint sparse modules; ``kind`` is the placement."""

    def __init__(self, in_dim: int, out_dim: int, bottleneck: int, config: MoSAConfig, module_name: str, chdim: int = -1):
        super().__init__(gate=config.gate)
        if config.num_modules > bottleneck:
            raise ValueError(f"MoSAConfig.num_modules: {config.num_modules} exceeds the bottleneck width {bottleneck} at "
                             f"module {module_name!r} (every module needs at least one entry of each tensor)")
        self.kind = config.placement
        self.channel_dim = chdim
        self.scaling = config.scaling
        self.num_modules = config.num_modules
        self.active_modules = config.active_modules
        self.train_scale = config.num_modules / config.active_modules if config.rescale else 1.0
        self.dims = (in_dim, out_dim, bottleneck)
        self.bottleneck_config = config.bottleneck_config()
        self.act = make_activation(config.activation, "MoSAConfig")
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.shapes = {"down_weight": (bottleneck, in_dim), "down_bias": (bottleneck,),
                       "up_weight": (out_dim, bottleneck), "up_bias": (out_dim,)}
        self.last_modules: tuple[list[int], list[int]] | None = None  # (down, up) modules of the last training forward
        full = BottleneckUnit(in_dim, out_dim, bottleneck, self.bottleneck_config, chdim)  # the adapter's own init
        init = {"down_weight": full.down.weight, "down_bias": full.down.bias, "up_weight": full.up.weight,
                "up_bias": full.up.bias}
        self.chunks = nn.ModuleDict()
        for t in TENSORS:
            flat = init[t].detach().reshape(-1)
            positions = split_positions(flat.numel(), self.num_modules, _tensor_seed(config.mask_seed, module_name, t))
            self.chunks[t] = nn.ParameterList([nn.Parameter(flat[p].clone()) for p in positions])
            for i, p in enumerate(positions):
                self.register_buffer(f"{t}_pos{i}", p, persistent=False)

    def positions(self, tensor: str, module: int) -> Tensor:
        """Flat indices (into the full tensor) of the entries of ``tensor`` that module ``module`` owns."""
        return getattr(self, f"{tensor}_pos{module}")

    def dense(self, tensor: str, modules: list[int] | None = None) -> Tensor:
        """The full-shape ``tensor`` with the entries of ``modules`` (default: all, i.e. the merged adapter), zeros elsewhere."""
        modules = range(self.num_modules) if modules is None else modules
        chunks = self.chunks[tensor]
        idx = torch.cat([self.positions(tensor, i) for i in modules])
        vals = torch.cat([chunks[i] for i in modules])
        out = vals.new_zeros(int(np.prod(self.shapes[tensor]))).index_put((idx,), vals)
        return out.view(self.shapes[tensor])

    def _draw(self) -> list[int]:
        return sorted(torch.randperm(self.num_modules)[: self.active_modules].tolist())

    def change(self, x: Tensor, h: Tensor) -> Tensor:
        if self.training and self.active_modules < self.num_modules:
            down, up = self._draw(), self._draw()
            self.last_modules = (down, up)
        else:
            down = up = None
        dw, db = self.dense("down_weight", down), self.dense("down_bias", down)
        uw, ub = self.dense("up_weight", up), self.dense("up_bias", up)
        if down is not None and self.train_scale != 1.0:
            dw, db, uw, ub = (t * self.train_scale for t in (dw, db, uw, ub))

        def branch(t: Tensor) -> Tensor:
            return self.scaling * F.linear(self.dropout(self.act(F.linear(t, dw, db))), uw, ub)

        return on_channels(branch, x if self.kind == "parallel" else h, self.channel_dim)

    @torch.no_grad()
    def to_bottleneck(self) -> BottleneckUnit:
        """The equivalent plain bottleneck unit (all modules merged), on this unit's device and dtype."""
        in_dim, out_dim, bottleneck = self.dims
        ref = self.chunks["down_weight"][0]
        unit = BottleneckUnit(in_dim, out_dim, bottleneck, self.bottleneck_config, self.channel_dim).to(ref.device, ref.dtype)
        unit.down.weight.copy_(self.dense("down_weight"))
        unit.down.bias.copy_(self.dense("down_bias"))
        unit.up.weight.copy_(self.dense("up_weight"))
        unit.up.bias.copy_(self.dense("up_bias"))
        if self.gate is not None:
            unit.gate.copy_(self.gate)
        unit.train(self.training)
        unit.requires_grad_(ref.requires_grad)
        return unit

    def merge_into(self, base: nn.Module, params: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.to_bottleneck().merge_into(base, params)


def build(ctx: BuildContext):
    config: MoSAConfig = ctx.config
    for target in ctx.targets:
        in_dim, out_dim = feature_dims(target.module, target.dim)
        if config.placement == "series":
            in_dim = out_dim
        require_dims(target, in_dim, out_dim, "MoSAConfig")
        if config.placement == "parallel" and isinstance(target.module, nn.Embedding):
            raise ValueError(f"MoSAConfig: a parallel adapter needs float inputs; {target.name!r} is an Embedding")
        bn = bottleneck_size(config, in_dim)
        unit = MoSAUnit(in_dim, out_dim, bn, config, target.name, channel_dim(target.module))
        unit.train(target.module.training)  # a new adapter follows its host's mode (sampling happens in training only)
        yield target.name, "mosa", unit


def merge_mosa(model: nn.Module, adapter_name: str) -> None:
    """Replace MoSA adapter ``adapter_name`` by the plain bottleneck adapter it merges into, in place.

    The adapter keeps its name, targets, place in the active composition, gate, BitFit/norm deltas and
    trainability; its config becomes :meth:`MoSAConfig.bottleneck_config`. The merged weights are exactly
    the union of the modules' entries, so eval outputs are unchanged: bit for bit where the features are the
    last dimension; on channel-first (conv) features PyTorch's ``linear`` may pick another reduction order
    depending on whether the weights require grad (differences ~1e-7). Saving it afterwards writes an
    ordinary ``"bottleneck"`` adapter."""
    from ..model import get_config, state_of, wrappers

    config = get_config(model, adapter_name)
    if not isinstance(config, MoSAConfig):
        raise ValueError(f"merge_mosa: adapter {adapter_name!r} is a {type(config).__name__}, not a MoSAConfig adapter")
    state = state_of(model)
    if state.merged is not None:
        raise RuntimeError("merge_mosa: adapters are merged into the base weights; unmerge(model) first")
    plans = []
    for w in wrappers(model):
        if adapter_name not in w.adapters:
            continue
        roles = nn.ModuleDict()
        for role, unit in w.adapters[adapter_name].items():
            if isinstance(unit, MoSAUnit):
                roles["bottleneck"] = unit.to_bottleneck()
            else:
                roles[role] = unit
        plans.append((w, roles))
    for w, roles in plans:  # everything is built before anything is swapped
        w.adapters[adapter_name] = roles
    state.configs[adapter_name] = config.bottleneck_config()


register_method("mosa", MoSAConfig, build)
