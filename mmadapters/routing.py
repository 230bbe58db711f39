"""Per-sample routing: one batch, a different adapter for each sample (S-LoRA style).

::

    with mma.route(model, ["de", "fr", None, "de"]):   # one entry per sample; None = the base model
        y = model(x)

How it runs. Adapters of one method and shape (a *group*: e.g. LoRA on a 768→3072 Linear) are kept
stacked in device tensors, *pools* of shape ``[slots, ...]``. Every adapter in the batch holds one
slot (the same slot number in every module, so one index tensor ``idx (B,)`` serves the whole
model); slot 0 stays zero and serves ``None``. At each adapted module the base runs once on the whole
batch, and each group adds its change with gathered batched matmuls: ``bmm(x, A[idx]ᵀ)`` then
``bmm(·, B[idx]ᵀ)`` — no loop over sub-batches. LoRA inside ``nn.MultiheadAttention`` runs the
attention with per-sample low-rank terms on the packed q/k/v projection and on ``out_proj``.

Different ranks (or bottleneck widths) share a pool: each adapter's factors are zero-padded to the
largest rank in the pool, which is exact (padded rows of A and columns of B are zero) and costs the
flops of the largest rank. Group-by-rank would save those flops at the price of one gather per rank;
padding keeps one kernel per group, which is what matters when launches dominate (GPU, many adapters).

Where the weights live. An :class:`AdapterCache` maps adapters to slots with least-recently-used
eviction and a bounded number of slots. Adapter weights may stay on the CPU (see :func:`offload`)
while the pools live on the compute device: a batch uploads only the adapters it needs that are not
resident. A pool slot remembers which adapter and which parameter versions it holds, so a trained,
reloaded or replaced adapter is re-uploaded automatically. Without an explicit cache, ``route`` uses one
per model with unbounded capacity on the base's device; the same code path runs on the CPU in tests.

Training. When gradients are enabled and adapter parameters require them, pools are built from the
live parameters for each forward (differentiable stacking), so a mixed batch trains every adapter in
it at once (e.g. one adapter per language in a mixed-language batch).

Routing takes precedence over ``set_active`` inside the block. Routable units: LoRA on nn.Linear,
nn.Embedding and nn.MultiheadAttention, and bottleneck adapters (series and parallel). Others (prompts,
Compacter, BitFit/norm deltas, LoRA on convolutions) raise a clear error.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import get_config, state_of, wrappers
from .units import AdapterUnit


class RoutingError(ValueError):
    pass


@dataclass
class _Pool:
    tensors: dict[str, Tensor]
    owners: list[tuple | None]  # per slot: (adapter, parameter versions) it holds, or None (zeros)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    uploads: int = 0  # unit tensors written into pools (per module and group)


class AdapterCache:
    """Which adapters are resident on the compute device, in which slot; LRU eviction.

    ``capacity``: the most adapters resident at once (``None``: unbounded). ``device``: where pools
    live (default: each adapted module's base device). One cache serves one model.
    """

    def __init__(self, capacity: int | None = None, device: str | torch.device | None = None):
        if capacity is not None and capacity < 1:
            raise ValueError(f"AdapterCache.capacity: expected a positive number of slots or None, got {capacity!r}")
        self.capacity = capacity
        self.device = torch.device(device) if device is not None else None
        self._slots: OrderedDict[str, int] = OrderedDict()  # adapter -> slot, least recently used first
        self._pools: dict[tuple, _Pool] = {}
        self._model_id: int | None = None
        self.stats = CacheStats()

    def resident(self) -> list[str]:
        """Adapters holding a slot, least recently used first."""
        return list(self._slots)

    def _bind(self, model: nn.Module) -> None:
        if self._model_id is None:
            self._model_id = id(model)
        elif self._model_id != id(model):
            raise RoutingError("this AdapterCache already serves another model; make one cache per model")

    def acquire(self, names: Sequence[str]) -> dict[str, int]:
        """Slots for ``names`` (distinct), evicting least recently used adapters not in ``names``."""
        if self.capacity is not None and len(names) > self.capacity:
            raise RoutingError(f"the batch uses {len(names)} distinct adapters but the cache holds {self.capacity}; "
                               "raise AdapterCache(capacity=...) or split the batch")
        out: dict[str, int] = {}
        for name in names:
            if name in self._slots:
                self._slots.move_to_end(name)
                self.stats.hits += 1
            else:
                self.stats.misses += 1
                if self.capacity is not None and len(self._slots) >= self.capacity:
                    wanted = set(names)
                    victim = next(n for n in self._slots if n not in wanted)
                    slot = self._slots.pop(victim)
                    self.stats.evictions += 1
                else:
                    slot = len(self._slots) + 1  # slots are 1..len: taken in order, only ever reused by eviction
                self._slots[name] = slot
            out[name] = self._slots[name]
        return out

    def pool(self, key: tuple, units: dict[int, tuple[str, AdapterUnit] | None], device: torch.device) -> dict[str, Tensor]:
        """The stacked tensors of one group at one module, with ``units`` (slot -> (adapter, unit) or
        None for "zeros in this slot") written where the slot holds something else."""
        pool = self._pools.get(key)
        need = max(units) + 1
        have = len(pool.owners) if pool is not None else 0
        if self.capacity is not None:
            target = max(need, self.capacity + 1)
        else:  # unbounded: grow geometrically, so cycling through N adapters copies O(N) rows in all, not O(N²)
            target = have if need <= have else max(need, 2 * have)
        for slot, entry in units.items():
            if entry is None:
                if pool is not None and slot < len(pool.owners) and pool.owners[slot] is not None:
                    for t in pool.tensors.values():
                        t[slot].zero_()
                    pool.owners[slot] = None
                continue
            adapter, unit = entry
            version = (adapter, _versions(unit))
            if pool is not None and slot < len(pool.owners) and pool.owners[slot] == version:
                continue
            with torch.no_grad():
                tensors = {k: v.detach().to(device) for k, v in unit.route_tensors().items()}
            pool = _fit(pool, tensors, unit.route_pad, target, device)
            for k, v in tensors.items():
                dst = pool.tensors[k][slot]
                dst.zero_()
                dst[tuple(slice(0, n) for n in v.shape)] = v
            pool.owners[slot] = version
            self.stats.uploads += 1
        if pool is None:
            raise RoutingError(f"route: no adapter of the batch has a unit in group {key!r}")
        if len(pool.owners) < target:  # a slot given to an adapter with no unit here must still index a zero row
            pool = _grow(pool, target)
        self._pools[key] = pool
        return pool.tensors


def _versions(unit: nn.Module) -> tuple:
    """(id, version) of the unit's parameters: changes when a parameter is replaced or written in place. The
    parameter list is looked up once per unit (a unit's set of parameters never changes after it is built)."""
    params = unit.__dict__.get("_mma_route_params")
    if params is None:
        params = tuple(unit.parameters())
        object.__setattr__(unit, "_mma_route_params", params)
    return tuple((id(p), p._version) for p in params)


def _route_key(role: str, unit: AdapterUnit) -> tuple | None:
    """The unit's pool group (cached on the unit: it depends only on its shapes and method)."""
    cached = unit.__dict__.get("_mma_route_key", False)
    if cached is False:
        key = unit.route_group()
        cached = None if key is None else (role, *key)
        object.__setattr__(unit, "_mma_route_key", cached)
    return cached


def _grow(pool: _Pool, slots: int) -> _Pool:
    """``pool`` with zero rows appended up to ``slots`` slots."""
    grown = {k: torch.cat([t, t.new_zeros(slots - t.shape[0], *t.shape[1:])]) for k, t in pool.tensors.items()}
    return _Pool(grown, pool.owners + [None] * (slots - len(pool.owners)))


def _fit(pool: _Pool | None, tensors: dict[str, Tensor], pad: dict[str, int], slots: int, device) -> _Pool:
    """Grow ``pool`` (slots, padded dims) so that ``tensors`` fit; keeps existing contents."""
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    if pool is not None:
        for k, t in pool.tensors.items():
            shapes[k] = [max(a, b) for a, b in zip(shapes[k], t.shape[1:], strict=True)]
        slots = max(slots, len(pool.owners))
        if all(list(pool.tensors[k].shape) == [slots, *shapes[k]] for k in shapes):
            return pool
    new = {k: torch.zeros(slots, *shapes[k], dtype=tensors[k].dtype, device=device) for k in tensors}
    owners: list[tuple | None] = [None] * slots
    if pool is not None:
        for k, t in pool.tensors.items():
            new[k][tuple(slice(0, n) for n in t.shape)] = t
        owners[: len(pool.owners)] = pool.owners
    return _Pool(new, owners)


@dataclass
class RoutePlan:
    """What one ``route`` block hands to every adapted module."""

    names: list[str | None]
    cache: AdapterCache
    slots: dict[str, int]  # adapter -> cache slot
    distinct: list[str]  # adapters in the batch, in first-appearance order
    _idx: dict[tuple, Tensor] = field(default_factory=dict)

    def index(self, live: bool, device: torch.device) -> Tensor:
        """(B,) slot per sample: cache slots, or positions in ``distinct`` (+1) for live stacking."""
        key = (live, device)
        if key not in self._idx:
            pos = {n: i + 1 for i, n in enumerate(self.distinct)} if live else self.slots
            self._idx[key] = torch.tensor([0 if n is None else pos[n] for n in self.names], dtype=torch.long, device=device)
        return self._idx[key]


@contextlib.contextmanager
def route(model: nn.Module, adapter_names: Sequence[str | None], *, cache: AdapterCache | None = None) -> Iterator[RoutePlan]:
    """Run each sample of the next forward passes with its own adapter (``None``: the base model).

    ``adapter_names`` has one entry per sample; the batch dimension of every adapted module's input must
    equal its length (dim 0, or dim 1 for sequence-first attention). See the module docstring.
    """
    names = list(adapter_names)
    if not names:
        raise RoutingError("route: adapter_names is empty; give one entry (a name or None) per sample")
    state = state_of(model)
    if state.merged is not None:
        raise RoutingError("route: adapters are merged into the base; call unmerge(model) first")
    distinct: list[str] = []
    for n in names:
        if n is None:
            continue
        if not isinstance(n, str):
            raise RoutingError(f"route: adapter_names entries must be adapter names or None, got {n!r}")
        get_config(model, n)  # raises KeyError naming the known adapters
        if n not in distinct:
            distinct.append(n)
    if cache is None:
        cache = model.__dict__.get("_mma_route_cache")
        if cache is None or cache._model_id != id(model):  # none yet, or copied along with a deep-copied model
            cache = AdapterCache()
            object.__setattr__(model, "_mma_route_cache", cache)
    cache._bind(model)
    plan = RoutePlan(names, cache, cache.acquire(distinct), distinct)
    ws = wrappers(model)
    previous = [w.route_plan for w in ws]
    for w in ws:
        w.route_plan = plan
    try:
        yield plan
    finally:
        for w, p in zip(ws, previous, strict=True):
            w.route_plan = p


def offload(model: nn.Module, names: Sequence[str] | None = None, device: str | torch.device = "cpu") -> None:
    """Move adapters' units (all, or ``names``) to ``device`` (e.g. keep many adapters in host memory
    while the base runs on a GPU). Offloaded adapters run through :func:`route`, whose cache uploads
    what a batch needs; ``set_active`` needs them on the base's device again (``offload(model, names, "cuda")``)."""
    wanted = set(names) if names is not None else None
    for w in wrappers(model):
        for name, units in w.adapters.items():
            if wanted is None or name in wanted:
                units.to(device)


# -- what an adapted module does under a plan ----------------------------------------------------------
def groups_at(wrapper, plan: RoutePlan) -> list[tuple[tuple, AdapterUnit, dict[str, AdapterUnit]]]:
    """[(group key, representative unit, {adapter: unit})] for the adapters of ``plan`` at ``wrapper``,
    in the order each adapter applies its units."""
    groups: dict[tuple, tuple[AdapterUnit, dict[str, AdapterUnit]]] = {}
    for adapter in plan.distinct:
        if adapter not in wrapper.adapters:
            continue
        for role, unit in wrapper.adapters[adapter].items():
            key = _route_key(role, unit)
            if key is None:
                raise RoutingError(
                    f"route: adapter {adapter!r} has a {type(unit).__name__} unit ({role!r}) at {wrapper.module_name!r}, which cannot "
                    "be routed per sample; routable: LoRA on Linear/Embedding/MultiheadAttention and bottleneck adapters")
            if key not in groups:
                groups[key] = (unit, {})
            groups[key][1][adapter] = unit
    return [(k, rep, members) for k, (rep, members) in groups.items()]


def stacked(wrapper, plan: RoutePlan, key: tuple, rep: AdapterUnit, members: dict[str, AdapterUnit],
            device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
    """(pool tensors, idx (B,)) for one group: live stacks when training, else the device cache."""
    live = torch.is_grad_enabled() and any(p.requires_grad for u in members.values() for p in u.parameters())
    if live:
        return _live_stack(plan, rep, members, device), plan.index(True, device)
    units = {plan.slots[a]: (a, members[a]) if a in members else None for a in plan.distinct}
    pool = plan.cache.pool((wrapper.module_name, *key), units, plan.cache.device or device)
    return pool, plan.index(False, plan.cache.device or device)


def _live_stack(plan: RoutePlan, rep: AdapterUnit, members: dict[str, AdapterUnit], device) -> dict[str, Tensor]:
    per = [members[a].route_tensors() if a in members else None for a in plan.distinct]
    ref = next(p for p in per if p is not None)
    out: dict[str, Tensor] = {}
    for k in ref:
        shape = [max(p[k].shape[d] for p in per if p is not None) for d in range(ref[k].dim())]
        rows = [torch.zeros(shape, dtype=ref[k].dtype, device=device)]
        for p in per:
            if p is None:
                rows.append(rows[0])
                continue
            t = p[k].to(device)
            pads = []
            for d in reversed(range(t.dim())):
                pads += [0, shape[d] - t.shape[d]]
            rows.append(F.pad(t, pads) if any(pads) else t)
        out[k] = torch.stack(rows)
    return out


def routed_mha(mha: nn.MultiheadAttention, args: tuple, kwargs: dict, pool: dict[str, Tensor], idx: Tensor,
               where: str) -> tuple[Tensor, Tensor | None]:
    """nn.MultiheadAttention's forward with per-sample LoRA on ``in_proj`` and ``out_proj``.

    Same signature and results as ``mha(query, key, value, key_padding_mask, need_weights, attn_mask,
    average_attn_weights, is_causal)``; the sample's low-rank terms come from ``pool[..][idx]``."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
    bound = dict(zip(names, args, strict=False))
    for k, v in kwargs.items():
        if k not in names:
            raise TypeError(f"{where}: unexpected argument {k!r} for nn.MultiheadAttention")
        bound[k] = v
    query, key, value = bound["query"], bound.get("key", bound["query"]), bound.get("value", bound["query"])
    need_weights = bound.get("need_weights", True)
    attn_mask, kpm = bound.get("attn_mask"), bound.get("key_padding_mask")
    if mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
        raise RoutingError(f"{where}: routing supports nn.MultiheadAttention without bias_k/bias_v, add_zero_attn "
                           "or separate kdim/vdim")
    if query.dim() != 3:
        raise RoutingError(f"{where}: routing needs batched (3-D) attention inputs, got shape {tuple(query.shape)}")
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    b, L, e = query.shape
    s, h = key.shape[1], mha.num_heads
    d = e // h
    dt = query.dtype
    in_a, in_b = pool["in_A"][idx].to(dt), pool["in_B"][idx].to(dt)  # (B, r, E), (B, 3E, r)
    w, bias = mha.in_proj_weight, mha.in_proj_bias

    def project(x: Tensor, part: int) -> Tensor:
        rows = slice(part * e, (part + 1) * e) if part >= 0 else slice(None)
        base = F.linear(x, w[rows], bias[rows] if bias is not None else None)
        return base + torch.bmm(torch.bmm(x, in_a.transpose(1, 2)), in_b[:, rows].transpose(1, 2))

    if query is key and key is value:
        q, k, v = project(query, -1).chunk(3, dim=-1)
    else:
        q, k, v = project(query, 0), project(key, 1), project(value, 2)
    q, k, v = (t.reshape(b, -1, h, d).transpose(1, 2) for t in (q, k, v))  # (B, H, L|S, d)
    mask = _additive_mask(attn_mask, kpm, bound.get("is_causal", False), b, h, L, s, dt, q.device)
    p = mha.dropout if mha.training else 0.0
    if need_weights:
        scores = (q @ k.transpose(-2, -1)) / (d ** 0.5)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(-1)
        o = F.dropout(weights, p, training=mha.training) @ v
    else:
        weights = None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    o = o.transpose(1, 2).reshape(b, L, e)
    out_a, out_b = pool["out_A"][idx].to(dt), pool["out_B"][idx].to(dt)
    out = F.linear(o, mha.out_proj.weight, mha.out_proj.bias) + torch.bmm(torch.bmm(o, out_a.transpose(1, 2)), out_b.transpose(1, 2))
    if not mha.batch_first:
        out = out.transpose(0, 1)
    if weights is not None and bound.get("average_attn_weights", True):
        weights = weights.mean(1)
    return out, weights


def _additive_mask(attn_mask, kpm, is_causal, b, h, L, s, dtype, device) -> Tensor | None:
    mask = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(L, s, dtype=torch.bool, device=device).triu(1)
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(m, float("-inf"))
        m = m.to(dtype)
        mask = m.view(b, h, L, s) if m.dim() == 3 else m.view(1, 1, L, s)
    if kpm is not None:
        k = kpm
        if k.dtype == torch.bool:
            k = torch.zeros(k.shape, dtype=dtype, device=device).masked_fill(k, float("-inf"))
        k = k.to(dtype).view(b, 1, 1, s)
        mask = k if mask is None else mask + k
    return mask
