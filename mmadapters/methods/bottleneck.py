"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; He et al.'s parallel adapter).

``h + s * Up(act(Down(LN(src))))`` where ``src`` is the module's output (series placement) or its input
(parallel placement). Up is zero-initialized so a new adapter leaves the model's output unchanged.

Half-shared adapters (VL-Adapter, Sung et al. 2022): adapters whose configs name the same ``share_down``
(or ``share_up``) group use one Down (or Up) projection at each adapted module, while the other projection
stays per adapter. The shared projection lives once at the model root (``model.mma_shared``, key
``bottleneck_down__<group>__<module>``) and the units only reference it, so its parameters are counted,
trained and saved once; a saved adapter carries the shared projections it uses, and loading it onto a
model that already has them overwrites them (as for a Hyperformer hypernetwork).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, check_choice, check_positive, register_method, target_modules_field
from ..units import AdapterUnit, NotMergeable, channel_dim, feature_dims, on_channels
from ._common import BuildContext, bottleneck_size, init_last_layer, make_activation, require_dims

_GROUP_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class BottleneckConfig(AdapterConfig):
    """Config of a bottleneck adapter. Presets: :meth:`houlsby` and :meth:`pfeiffer`."""

    target_modules: list[str] | str | None = target_modules_field()
    placement: str = field(default="series", metadata={
        "help": "'series': transform the module's output; 'parallel': add a branch fed by the module's input."})
    bottleneck_dim: int | None = field(default=None, metadata={
        "help": "Width of the bottleneck. If unset, input width / reduction_factor."})
    reduction_factor: float | None = field(default=None, metadata={
        "help": "Input width / bottleneck width, used when bottleneck_dim is unset (default 16)."})
    activation: str = field(default="relu", metadata={
        "help": "Non-linearity between down and up projection: relu, gelu, swish, tanh or identity "
                "(identity makes the adapter linear, hence mergeable)."})
    pre_norm: bool = field(default=False, metadata={"help": "LayerNorm on the adapter's input (inside the branch)."})
    post_norm: bool = field(default=False, metadata={
        "help": "LayerNorm on the branch output; its scale starts at zero so the adapter starts as identity."})
    scaling: float = field(default=1.0, metadata={"help": "Residual scaling s of the adapter branch."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the bottleneck activations."})
    share_down: str | None = field(default=None, metadata={
        "help": "Group name: adapters with the same group share the Down projection at each adapted module "
                "(half-shared adapters); None keeps it per adapter."})
    share_up: str | None = field(default=None, metadata={
        "help": "Group name: adapters with the same group share the Up projection at each adapted module."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "placement", ("series", "parallel"))
        for name in ("share_down", "share_up"):
            group = getattr(self, name)
            if group is not None and (not isinstance(group, str) or not _GROUP_RE.match(group)):
                raise ValueError(f"BottleneckConfig.{name}: expected None or a group name of letters, digits, '_' "
                                 f"or '-', got {group!r}")
        check_positive(self, "bottleneck_dim", allow_none=True)
        check_positive(self, "reduction_factor", allow_none=True)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BottleneckConfig.dropout: expected a value in [0, 1), got {self.dropout!r}")
        make_activation(self.activation, "BottleneckConfig")

    @classmethod
    def houlsby(cls, **kwargs) -> BottleneckConfig:
        """Series adapters after attention and after the FFN of every block (adapter points)."""
        kwargs.setdefault("target_modules", ["@attn_out", "@ffn_out"])
        return cls(placement="series", **kwargs)

    @classmethod
    def pfeiffer(cls, **kwargs) -> BottleneckConfig:
        """One series adapter after the FFN of every block (adapter point ``ffn_out``)."""
        kwargs.setdefault("target_modules", ["@ffn_out"])
        return cls(placement="series", **kwargs)


class BottleneckUnit(AdapterUnit):
    """``shared_down`` / ``shared_up``: projections owned by the model root (half-shared adapters). They are
    referenced, not registered, so the unit's own ``named_parameters()`` (what the core saves under the
    unit) leave them out; :meth:`parameters` includes them, since routing and training need every tensor
    the unit computes with."""

    def __init__(self, in_dim: int, out_dim: int, bottleneck: int, config: BottleneckConfig, chdim: int = -1,
                 shared_down: nn.Linear | None = None, shared_up: nn.Linear | None = None):
        super().__init__(gate=config.gate)
        self.kind = config.placement
        self.channel_dim = chdim
        self.scaling = config.scaling
        self.norm = nn.LayerNorm(in_dim) if config.pre_norm else None
        if shared_down is None:
            self.down = nn.Linear(in_dim, bottleneck)
        else:
            object.__setattr__(self, "down", shared_down)  # a plain reference: registered at the model root
        self.act = make_activation(config.activation, "BottleneckConfig")
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        if shared_up is None:
            self.up = nn.Linear(bottleneck, out_dim)
            init_last_layer(self.up, zero=not (config.gate or config.post_norm))
        else:
            object.__setattr__(self, "up", shared_up)
        self.post_norm = nn.LayerNorm(out_dim) if config.post_norm else None
        if self.post_norm is not None and not config.gate:
            nn.init.zeros_(self.post_norm.weight)

    def shared_modules(self) -> list[nn.Module]:
        """The root-owned projections this unit uses (empty for a plain adapter)."""
        return [m for m in (self.__dict__.get("down"), self.__dict__.get("up")) if m is not None]

    def parameters(self, recurse: bool = True):
        # Per-sample routing checks the parameters of a unit to decide whether a cached pool slot is stale
        # and whether to stack live (trainable) tensors: the shared projections count for both.
        seen = set()
        for p in (*super().parameters(recurse), *(q for m in self.shared_modules() for q in m.parameters())):
            if id(p) not in seen:
                seen.add(id(p))
                yield p

    def branch(self, t: Tensor) -> Tensor:
        if self.norm is not None:
            t = self.norm(t)
        t = self.up(self.dropout(self.act(self.down(t))))
        if self.post_norm is not None:
            t = self.post_norm(t)
        return self.scaling * t

    def change(self, x: Tensor, h: Tensor) -> Tensor:
        return on_channels(self.branch, x if self.kind == "parallel" else h, self.channel_dim)

    def fast_forward(self):
        """The plain adapter (no gate, post-norm or dropout, features last) as one chain of functional ops:
        ``h + scaling * up(act(down(norm(src))))``, without the module calls in between."""
        act = {nn.SiLU: F.silu, nn.ReLU: F.relu, nn.Tanh: torch.tanh, nn.Identity: lambda t: t}.get(type(self.act))
        if isinstance(self.act, nn.GELU):
            approximate = self.act.approximate
            act = lambda t: F.gelu(t, approximate=approximate)  # noqa: E731
        if (act is None or self.gate is not None or self.post_norm is not None or self.channel_dim != -1
                or not isinstance(self.dropout, nn.Identity)):
            return None
        norm, down, up, scaling, parallel = self.norm, self.down, self.up, self.scaling, self.kind == "parallel"

        def forward(x: Tensor, h: Tensor) -> Tensor:
            t = x if parallel else h
            if norm is not None:
                t = F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            t = F.linear(act(F.linear(t, down.weight, down.bias)), up.weight, up.bias)
            return h + t if scaling == 1.0 else torch.add(h, t, alpha=scaling)

        forward.kind = self.kind
        return forward

    # per-sample routing: gathered down (B, bn, in), up (B, out, bn); scaling and gate folded into the
    # last affine step (up, or the post-norm's affine); bottleneck widths zero-padded (exact: padded
    # units have zero down rows and zero up columns)
    route_pad = {"down_w": 0, "down_b": 0, "up_w": 1}

    def route_group(self):
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        return ("bottleneck", self.kind, self.down.in_features, self.up.out_features, repr(self.act),
                self.norm is not None, self.post_norm is not None, self.channel_dim, p)

    def route_tensors(self):
        s = self.gated(torch.as_tensor(self.scaling, dtype=self.up.weight.dtype, device=self.up.weight.device))
        out = {"down_w": self.down.weight, "down_b": self.down.bias}
        if self.post_norm is None:
            out.update(up_w=self.up.weight * s, up_b=self.up.bias * s)
        else:
            out.update(up_w=self.up.weight, up_b=self.up.bias, post_w=self.post_norm.weight * s, post_b=self.post_norm.bias * s)
        if self.norm is not None:
            out.update(norm_w=self.norm.weight, norm_b=self.norm.bias)
        return out

    def routed_change(self, x, h, pool, idx):
        src = x if self.kind == "parallel" else h
        if self.channel_dim not in (-1, src.dim() - 1):
            src, h_ = src.movedim(self.channel_dim, -1), h.movedim(self.channel_dim, -1)
        else:
            h_ = h
        t = src.reshape(src.shape[0], -1, src.shape[-1])
        g = {k: v[idx].to(t.dtype) for k, v in pool.items()}
        if self.norm is not None:
            t = nn.functional.layer_norm(t, t.shape[-1:], eps=self.norm.eps) * g["norm_w"][:, None] + g["norm_b"][:, None]
        t = torch.baddbmm(g["down_b"][:, None], t, g["down_w"].transpose(1, 2))
        t = self.dropout(self.act(t))
        t = torch.baddbmm(g["up_b"][:, None], t, g["up_w"].transpose(1, 2))
        if self.post_norm is not None:
            t = nn.functional.layer_norm(t, t.shape[-1:], eps=self.post_norm.eps) * g["post_w"][:, None] + g["post_b"][:, None]
        t = t.reshape(h_.shape)
        return t if h_ is h else t.movedim(-1, self.channel_dim)

    def merge_into(self, base: nn.Module, params: dict[str, Tensor]) -> dict[str, Tensor]:
        if not isinstance(base, nn.Linear):
            raise NotMergeable("only adapters on nn.Linear modules are merged")
        if not isinstance(self.act, nn.Identity) or self.norm is not None or self.post_norm is not None:
            raise NotMergeable("a bottleneck with a non-linearity or LayerNorm is not linear")
        g = self.scaling * (1.0 if self.gate is None else float(self.gate))
        down_w, down_b, up_w, up_b = self.down.weight, self.down.bias, self.up.weight, self.up.bias
        bias_term = g * (up_w @ down_b + up_b)
        weight, bias = params["weight"], params.get("bias")
        if bias is None:
            if torch.count_nonzero(bias_term) > 0:
                raise NotMergeable("the base Linear has no bias to absorb the adapter's bias")
            bias = torch.zeros_like(bias_term)
        if self.kind == "parallel":  # h = Wx + b + g(U(Dx + d) + u)
            new_w, new_b = weight + g * (up_w @ down_w), bias + bias_term
        else:  # h' = (I + gUD)(Wx + b) + g(Ud + u)
            new_w = weight + g * (up_w @ (down_w @ weight))
            new_b = bias + g * (up_w @ (down_w @ bias)) + bias_term
        out = dict(params)
        out["weight"] = new_w
        if "bias" in params:
            out["bias"] = new_b
        return out


def _shared_projection(ctx: BuildContext, field_name: str, group: str, target, in_dim: int, out_dim: int,
                       zero: bool) -> nn.Linear:
    """The projection ``in_dim -> out_dim`` of ``group`` at ``target``, created by the first adapter that asks."""
    which = field_name.split("_")[1]  # "down" | "up"
    alias = f"bottleneck_{which}__{group}__{target.name.replace('.', '-')}"

    def make() -> nn.Linear:
        layer = nn.Linear(in_dim, out_dim)
        if zero:
            init_last_layer(layer, zero=True)
        ref = next((p for p in target.module.parameters() if p.is_floating_point()), None)
        return layer if ref is None else layer.to(ref.device, ref.dtype)

    layer = ctx.shared(alias, make, False)
    if not isinstance(layer, nn.Linear) or (layer.in_features, layer.out_features) != (in_dim, out_dim):
        have = (layer.in_features, layer.out_features) if isinstance(layer, nn.Linear) else type(layer).__name__
        raise ValueError(f"BottleneckConfig.{field_name}: group {group!r} already has a {which} projection of shape "
                         f"(in, out) = {have} at module {target.name!r}; adapter {ctx.adapter!r} needs {(in_dim, out_dim)} "
                         "(adapters sharing a projection need the same bottleneck width and placement)")
    return layer


def build(ctx: BuildContext):
    config: BottleneckConfig = ctx.config
    for target in ctx.targets:
        in_dim, out_dim = feature_dims(target.module, target.dim)
        if config.placement == "series":
            in_dim = out_dim
        require_dims(target, in_dim, out_dim, "BottleneckConfig")
        if config.placement == "parallel" and isinstance(target.module, nn.Embedding):
            raise ValueError(f"BottleneckConfig: a parallel adapter needs float inputs; {target.name!r} is an Embedding")
        bn = bottleneck_size(config, in_dim)
        down = up = None
        if config.share_down is not None:
            down = _shared_projection(ctx, "share_down", config.share_down, target, in_dim, bn, zero=False)
        if config.share_up is not None:
            # a shared Up starts at zero like a private one (with a gate or post-norm it is random so gradients flow)
            up = _shared_projection(ctx, "share_up", config.share_up, target, bn, out_dim,
                                    zero=not (config.gate or config.post_norm))
        yield target.name, "bottleneck", BottleneckUnit(in_dim, out_dim, bn, config, channel_dim(target.module), down, up)


register_method("bottleneck", BottleneckConfig, build)
