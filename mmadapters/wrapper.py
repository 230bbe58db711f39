"""The one wrapper every adapted module gets: base module + per-adapter units + composition.

``AdaptedModule`` replaces a target module in its parent. It keeps the original as ``base_layer``
and the units of each adapter in ``adapters[adapter_name][role]``. Attribute reads it does not know
fall through to the base module, so code that reads ``module.weight`` or ``module.in_features`` of a
wrapped module keeps working.

Forward, for the active composition (see :mod:`mmadapters.composition`):
1. weight units: the base runs with ``W + sum c_i * dW_i`` through ``torch.func.functional_call``;
2. parallel and series units: applied to the output (the first element when it is a tuple).

For a single active adapter the wrapper caches its plan (which units edit weights, which change activations and
each one's :meth:`~mmadapters.units.AdapterUnit.fast_forward`), rebuilt when the adapter's units change. A
streaming model calls every wrapper once per few frames, where this per-call bookkeeping is the cost.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .composition import Average, Composition, Mixture, weighted_leaves
from .units import AdapterUnit, NotMergeable

# Keyword names under which modules commonly receive their main input.
_INPUT_KWARGS = ("input", "x", "hidden_states", "query", "inputs_embeds", "src", "tgt")


class AdaptedModule(nn.Module):
    def __init__(self, base_layer: nn.Module, name: str):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        # Plain attributes (not state): set by the model-level API.
        self.module_name = name
        self.active: str | Composition | None = None
        self.merged: str | Composition | None = None
        self._original_params: dict[str, Tensor] | None = None
        self.route_plan = None  # set inside ``mmadapters.route``: per-sample adapters
        self.batch_dim: int | None = None  # where the batch is in this module's input/output (default 0)
        self._plans: dict[str, tuple] = {}  # adapter -> (its units, has weight units, activation steps)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = super().__getattr__("base_layer")
            return getattr(base, name)

    # -- adapter bookkeeping --------------------------------------------------------------------------
    def add_unit(self, adapter: str, role: str, unit: AdapterUnit) -> None:
        if adapter not in self.adapters:
            self.adapters[adapter] = nn.ModuleDict()
        if role in self.adapters[adapter]:
            raise ValueError(f"{self.module_name}: adapter {adapter!r} already has a {role!r} unit")
        param = next(self.base_layer.parameters(), None)
        if param is not None:  # new units live where the base lives, in float32 or the base's float dtype
            dtype = param.dtype if param.dtype.is_floating_point else None
            on_meta = any(p.is_meta for p in unit.parameters())  # a shape-only build (load_adapter's dry run)
            unit.to(device=None if on_meta else param.device, dtype=dtype)
        self.adapters[adapter][role] = unit

    def remove_adapter(self, adapter: str) -> None:
        if adapter in self.adapters:
            del self.adapters[adapter]

    def units(self, adapter: str) -> list[AdapterUnit]:
        return list(self.adapters[adapter].values()) if adapter in self.adapters else []

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.route_plan is not None:
            return self._routed_forward(self.route_plan, args, kwargs)
        comp = self.active
        if comp is None or self.merged is not None:
            return self.base_layer(*args, **kwargs)
        if isinstance(comp, str):
            return self._single_forward(comp, args, kwargs)
        overrides = self._weight_overrides(comp)
        out = functional_call(self.base_layer, overrides, args, kwargs) if overrides else self.base_layer(*args, **kwargs)
        if not self._has_activation_units(comp):
            return out
        h, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        x = _main_input(args, kwargs)
        h = self._apply_composition(comp, x, h)
        return (h, *rest) if rest is not None else h

    def _plan(self, adapter: str) -> tuple:
        """(units, has weight units, activation steps), rebuilt whenever the adapter's units are not those it was
        built from (an identity check: code that swaps units in place, as merge_mosa does, is seen)."""
        units = tuple(self.adapters[adapter]._modules.values()) if adapter in self.adapters else ()
        plan = self._plans.get(adapter)
        if plan is None or plan[0] != units:  # modules compare by identity
            steps = tuple(u.fast_forward() or u for u in units if u.kind in ("parallel", "series"))
            plan = self._plans[adapter] = (units, any(u.kind == "weight" for u in units), steps)
        return plan

    def _single_forward(self, adapter: str, args: tuple, kwargs: dict) -> Any:
        """One active adapter: its cached plan (the same computation as the general path)."""
        _, has_weights, steps = self._plan(adapter)
        if has_weights:
            out = functional_call(self.base_layer, self._weight_overrides(adapter), args, kwargs)
        else:
            out = self.base_layer(*args, **kwargs)
        if not steps:
            return out
        h, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        x = _main_input(args, kwargs)
        for step in steps:
            if x is None and getattr(step, "kind", None) == "parallel":
                raise TypeError(f"{self.module_name}: a parallel adapter needs the module's input tensor")
            h = step(x, h)
        return (h, *rest) if rest is not None else h

    def _weight_overrides(self, comp: str | Composition) -> dict[str, Tensor]:
        deltas: dict[str, Tensor] = {}
        for adapter, coef in weighted_leaves(comp):
            for unit in self.units(adapter):
                if unit.kind != "weight":
                    continue
                for pname, delta in unit.delta_params().items():
                    delta = unit.gated(delta) * coef if coef != 1.0 else unit.gated(delta)
                    deltas[pname] = deltas[pname] + delta if pname in deltas else delta
        if not deltas:
            return {}
        params = dict(self.base_layer.named_parameters())
        return {name: params[name] + delta.to(params[name].dtype) for name, delta in deltas.items()}

    def _has_activation_units(self, comp: str | Composition) -> bool:
        names = [comp] if isinstance(comp, str) else comp.names()
        return any(u.kind != "weight" for n in names for u in self.units(n))

    def _apply_composition(self, comp: str | Composition, x: Tensor | None, h: Tensor) -> Tensor:
        if isinstance(comp, str):
            for unit in self.units(comp):
                if unit.kind == "parallel":
                    if x is None:
                        raise TypeError(f"{self.module_name}: a parallel adapter needs the module's input tensor")
                    h = unit(x, h)
                elif unit.kind == "series":
                    h = unit(x, h)
            return h
        if isinstance(comp, Mixture):
            return self._apply_mixture(comp, x, h)
        if isinstance(comp, Average):
            total = h
            for child, w in zip(comp.children, comp.weights, strict=True):
                out = self._apply_composition(child, x, h)
                if out.shape != h.shape:
                    raise ValueError(f"{self.module_name}: Average needs children that keep the output shape")
                total = total + w * (out - h)
            return total
        for child in comp.children:  # Stack
            h = self._apply_composition(child, x, h)
        return h

    def _routed_forward(self, plan, args: tuple, kwargs: dict) -> Any:
        from .routing import RoutingError, groups_at, routed_mha, stacked

        groups = groups_at(self, plan)
        if not groups:
            return self.base_layer(*args, **kwargs)
        base_param = next(self.base_layer.parameters(), None)
        if base_param is not None:
            device = base_param.device
        else:  # a parameter-free module (an activation, a container of them): the input's device
            device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), torch.device("cpu"))
        weight_groups = [g for g in groups if g[1].kind == "weight"]
        if weight_groups:
            if len(weight_groups) > 1 or not isinstance(self.base_layer, nn.MultiheadAttention):
                raise RoutingError(f"{self.module_name}: per-sample weight edits are supported for LoRA on "
                                   "nn.MultiheadAttention only")
            key, rep, members = weight_groups[0]
            pool, idx = stacked(self, plan, key, rep, members, device)
            self._check_batch(args[0] if args else kwargs.get("query"), len(plan.names))
            out = routed_mha(self.base_layer, args, kwargs, pool, idx, self.module_name)
        else:
            out = self.base_layer(*args, **kwargs)
        act = [g for g in groups if g[1].kind != "weight"]
        if not act:
            return out
        h, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        x = _main_input(args, kwargs)
        bd_h = self._check_batch(h, len(plan.names))
        bd_x = self._check_batch(x, len(plan.names)) if x is not None else 0
        h = h.movedim(bd_h, 0)
        x = x.movedim(bd_x, 0) if x is not None else None
        for key, rep, members in act:
            if rep.kind == "parallel" and x is None:
                raise RoutingError(f"{self.module_name}: a parallel adapter needs the module's input tensor")
            pool, idx = stacked(self, plan, key, rep, members, device)
            h = rep.routed_apply(x, h, pool, idx)
        h = h.movedim(0, bd_h)
        return (h, *rest) if rest is not None else h

    def _check_batch(self, t: Tensor, batch: int) -> int:
        """Which dimension of ``t`` is the batch, checked against the number of routed samples."""
        if self.batch_dim is not None:
            dim = self.batch_dim
        elif isinstance(self.base_layer, nn.MultiheadAttention) and not self.base_layer.batch_first and t.dim() == 3:
            dim = 1
        else:
            dim = 0
        if t.dim() <= dim or t.shape[dim] != batch:
            from .routing import RoutingError

            raise RoutingError(f"{self.module_name}: route() got {batch} adapter names but this module's tensor has shape "
                               f"{tuple(t.shape)} (batch expected in dim {dim}); give one name per sample")
        return dim

    def _apply_mixture(self, comp: Mixture, x: Tensor | None, h: Tensor) -> Tensor:
        names = [n for child in comp.children for n in ([child] if isinstance(child, str) else child.names())]
        if any(u.kind == "weight" for n in names for u in self.units(n)):
            raise ValueError(f"{self.module_name}: a Mixture mixes outputs per token; its adapters must not edit "
                             "weights (LoRA inside nn.MultiheadAttention, BitFit/norm deltas)")
        outs = [self._apply_composition(child, x, h) for child in comp.children]
        gates = [u for u in self.units(comp.gate) if u.kind == "gate"]
        if not gates:
            if all(o is h for o in outs):
                return h  # none of the mixed adapters acts here
            raise ValueError(f"{self.module_name}: adapter {comp.gate!r} has no mixture gate here; "
                             "create it with mmadapters.add_mixture_gate")
        gate = gates[0]
        if gate.n != len(outs):
            raise ValueError(f"{self.module_name}: gate {comp.gate!r} mixes {gate.n} adapters, the Mixture has {len(outs)}")
        w = gate.mix_weights(h)
        cd = gate.channel_dim % h.dim()
        total = h
        for i, out in enumerate(outs):
            total = total + w.narrow(cd, i, 1) * (out - h)
        return total

    # -- merging --------------------------------------------------------------------------------------
    def merged_params(self, comp: str | Composition) -> dict[str, Tensor]:
        """The base's parameters with ``comp`` folded in. Raises NotMergeable naming the adapter."""
        params = {n: p.detach() for n, p in self.base_layer.named_parameters()}
        # Weight deltas act on the base before any activation unit runs (as in forward), so fold them first.
        params.update({n: p.detach() for n, p in self._weight_overrides(comp).items()})
        return self._merge(comp, params)

    def _merge(self, comp: str | Composition, params: dict[str, Tensor]) -> dict[str, Tensor]:
        if isinstance(comp, str):
            for unit in self.units(comp):
                if unit.kind == "weight":
                    continue
                try:
                    params = unit.merge_into(self.base_layer, params)
                except NotMergeable as err:
                    raise NotMergeable(f"adapter {comp!r} at {self.module_name!r}: {err}") from None
            return params
        if isinstance(comp, Mixture):
            raise NotMergeable(f"a Mixture's gate depends on the input; it cannot be folded into {self.module_name!r}")
        if isinstance(comp, Average):
            out = dict(params)
            for child, w in zip(comp.children, comp.weights, strict=True):
                child_params = self._merge(child, params)
                for k in out:
                    out[k] = out[k] + w * (child_params[k] - params[k])
            return out
        for child in comp.children:
            params = self._merge(child, params)
        return params

    @torch.no_grad()
    def apply_merge(self, comp: str | Composition, new_params: dict[str, Tensor]) -> None:
        own = dict(self.base_layer.named_parameters())
        self._original_params = {n: p.detach().clone() for n, p in own.items()}
        for name, value in new_params.items():
            own[name].copy_(value)
        self.merged = comp

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None or self._original_params is None:
            return
        own = dict(self.base_layer.named_parameters())
        for name, value in self._original_params.items():
            own[name].copy_(value)
        self._original_params = None
        self.merged = None


def _main_input(args: tuple, kwargs: dict) -> Tensor | None:
    if args and isinstance(args[0], Tensor):
        return args[0]
    for key in _INPUT_KWARGS:
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key]
    return None
