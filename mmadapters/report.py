"""Parameter report: what trains, what the adapters cost, relative to the base model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .model import _all_adapter_param_ids, adapter_names, adapter_parameters, state_of


@dataclass
class ParameterReport:
    base: int  # parameters of the base model (no adapter)
    adapters: int  # parameters of all adapters on the model
    total: int  # base + adapters
    trainable: int  # parameters with requires_grad
    per_adapter: dict[str, int] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)

    @property
    def trainable_pct_of_base(self) -> float:
        return 100.0 * self.trainable / self.base if self.base else 0.0

    @property
    def adapters_pct_of_base(self) -> float:
        return 100.0 * self.adapters / self.base if self.base else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["trainable_pct_of_base"] = self.trainable_pct_of_base
        out["adapters_pct_of_base"] = self.adapters_pct_of_base
        return out

    def __str__(self) -> str:
        rows = [("base", self.base, 100.0)]
        rows += [(f"adapter {n!r}" + (" (active)" if n in self.active else ""), c, 100.0 * c / max(self.base, 1))
                 for n, c in self.per_adapter.items()]
        rows += [("all adapters", self.adapters, self.adapters_pct_of_base),
                 ("trainable", self.trainable, self.trainable_pct_of_base),
                 ("total", self.total, 100.0 * self.total / max(self.base, 1))]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'parameters':<{width}}  {'count':>12}  {'% of base':>9}"]
        lines += [f"{name:<{width}}  {count:>12,}  {pct:>8.3f}%" for name, count, pct in rows]
        return "\n".join(lines)


def parameter_report(model: nn.Module) -> ParameterReport:
    """Counts each parameter once, even when shared across layers or adapters."""
    adapter_ids = _all_adapter_param_ids(model)
    params = {id(p): p for p in model.parameters()}  # deduplicated
    base = sum(p.numel() for i, p in params.items() if i not in adapter_ids)
    adapters = sum(p.numel() for i, p in params.items() if i in adapter_ids)
    per_adapter = {}
    for name in adapter_names(model):
        uniq = {id(p): p for p in adapter_parameters(model, name).values()}
        per_adapter[name] = sum(p.numel() for p in uniq.values())
    from .composition import active_names

    return ParameterReport(
        base=base, adapters=adapters, total=base + adapters,
        trainable=sum(p.numel() for p in params.values() if p.requires_grad),
        per_adapter=per_adapter, active=active_names(state_of(model).active),
    )
