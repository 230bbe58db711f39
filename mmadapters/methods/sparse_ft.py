"""Composable sparse fine-tuning (Ansell et al. 2022): sparse, real-valued differences added to the base.

A sparse fine-tuning (SFT) of adapter ``name`` is, for every targeted parameter ``W`` (shape ``S``), a
difference ``dW`` that is nonzero only on a fixed set of entries (the mask). It is stored compactly as
``indices`` (``(k,)`` flat positions into ``W``, int32, sorted; a buffer) and ``values`` (``(k,)``, the
trainable parameter), so the adapter costs ``k`` numbers plus ``k`` indices, and the model runs with
``W + dW``: no new layer, no inference cost once merged. A tensor whose mask covers every entry is kept
dense (``values`` of shape ``S``, no indices): the full fine-tuning phase below uses that.

Lottery-ticket sparse fine-tuning (:func:`lottery_ticket_sparse_ft`), the paper's procedure:

1. fine-tune every entry of the targeted parameters (a dense difference) for ``full_steps``;
2. keep the ``K`` entries that changed most, ``|theta_1 - theta_0|``, selected globally over all targets
   (so a layer that matters gets more of the budget);
3. reset to the base (the dense difference is simply deleted: the base weights were never touched);
4. fine-tune only the ``K`` selected entries, from a zero difference, for ``sparse_steps``.

Composition: SFTs learned separately (a language's from masked language modelling, a task's from
labelled data) compose by addition, ``W + dW_lang + dW_task``. ``set_active(model, ["lang", "task"])``
(a :class:`~mmadapters.composition.Stack`) does exactly that, since weight differences of a stack add
up, and :func:`mmadapters.merge` folds the sum into the base exactly (unmerge restores it bit-exactly).
:func:`compose` does either, or builds one adapter holding the sum (union of the masks).

Which parameters of a target module get a difference: its own parameters other than biases (``weight``
of a Linear, a convolution, an Embedding, a LayerNorm; ``in_proj_weight`` and ``out_proj.weight`` of an
``nn.MultiheadAttention``, as the target's parts say), plus the biases with ``include_biases``.

Saving: the mask indices are buffers; ``mmadapters.io`` must store the units' persistent buffers along
with their parameters for a selected mask to survive a save/load. A mask drawn at random from
``seed`` (an adapter added directly, the paper's random-mask baseline) is rebuilt from the config
either way. An adapter whose selected mask was never filled refuses to run rather than run a wrong mask.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..composition import Stack
from ..config import AdapterConfig, register_method, target_modules_field
from ..targets import Target, iter_logical_modules
from ..units import AdapterUnit
from ._common import BuildContext

_ROLE = "sparse"
_UNFILLED = -1  # index value of a selected mask that has not been filled (or loaded) yet


@dataclass
class SparseFTConfig(AdapterConfig):
    target_modules: list[str] | str | None = target_modules_field()
    density: float = field(default=0.01, metadata={
        "help": "Fraction of the targeted entries that get a nonzero difference (the paper's default: 1%). "
                "Ignored when num_params is set."})
    num_params: int | None = field(default=None, metadata={
        "help": "K: the number of entries with a nonzero difference, counted globally over all targets."})
    include_biases: bool = field(default=False, metadata={
        "help": "Also learn sparse differences for the targets' biases (they then share the budget K)."})
    num_entries: dict[str, int] | None = field(default=None, metadata={
        "help": "Entries per targeted tensor ('module.param' -> k), written by the selection "
                "(lottery_ticket_sparse_ft, from_dense_delta, compose). None: a random mask of the budget, "
                "spread over the tensors in proportion to their size, drawn from seed."})
    seed: int = field(default=0, metadata={"help": "Seed of the random mask (used when num_entries is None)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.gate:
            raise ValueError(f"{name}.gate: not supported (a zero gate on a zero difference would block every "
                             "gradient; a sparse difference starts at zero and needs no gate)")
        if isinstance(self.density, bool) or not isinstance(self.density, int | float) or not 0.0 < self.density <= 1.0:
            raise ValueError(f"{name}.density: expected a fraction in (0, 1], got {self.density!r}")
        if self.num_params is not None and (isinstance(self.num_params, bool) or not isinstance(self.num_params, int)
                                            or self.num_params < 1):
            raise ValueError(f"{name}.num_params: expected a positive integer or None, got {self.num_params!r}")
        if self.num_entries is not None:
            if not isinstance(self.num_entries, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for k, v in self.num_entries.items()):
                raise ValueError(f"{name}.num_entries: expected a mapping 'module.param' -> non-negative integer, "
                                 f"got {self.num_entries!r}")
            self.num_entries = dict(self.num_entries)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{name}.seed: expected an integer, got {self.seed!r}")

    def budget(self, total: int) -> int:
        """K for ``total`` targeted entries: ``num_params``, or ``density * total`` (at least 1)."""
        if self.num_params is not None:
            k = self.num_params
        else:
            k = max(1, int(self.density * total))
        if k > total:
            raise ValueError(f"{type(self).__name__}.num_params: K={k} is larger than the {total} entries of the "
                             "targeted tensors; lower num_params or target more modules")
        return k


# -- which tensors a target contributes --------------------------------------------------------------------

def _is_bias(pname: str) -> bool:
    return pname.split(".")[-1].endswith("bias")


def target_tensors(target: Target, include_biases: bool) -> dict[str, nn.Parameter]:
    """The parameters of ``target`` that get a sparse difference: name (relative to the module) -> parameter."""
    module = target.module
    if isinstance(module, nn.MultiheadAttention):
        own = {}
        if "in_proj" in target.parts:
            own.update({n: p for n, p in module.named_parameters(recurse=False) if n.endswith(("proj_weight", "proj_bias"))})
        if "out_proj" in target.parts:
            own.update({f"out_proj.{n}": p for n, p in module.out_proj.named_parameters(recurse=False)})
    else:
        own = dict(module.named_parameters(recurse=False))
    if not own:
        raise ValueError(f"SparseFTConfig.target_modules: module {target.name!r} ({type(module).__name__}) has no "
                         "parameters of its own; target the leaf modules that hold weights (Linear, Conv, Embedding, "
                         "LayerNorm, MultiheadAttention)")
    chosen = {n: p for n, p in own.items() if include_biases or not _is_bias(n)}
    if not chosen:
        raise ValueError(f"SparseFTConfig.target_modules: module {target.name!r} ({type(module).__name__}) has only "
                         f"biases ({sorted(own)}); set include_biases=True or target another module")
    return chosen


def _key(module_name: str, pname: str) -> str:
    return f"{module_name}.{pname}"


def _random_counts(sizes: Mapping[str, int], k: int) -> dict[str, int]:
    """Spread ``k`` over tensors in proportion to their sizes (largest remainder; each at most its size)."""
    total = sum(sizes.values())
    quotas = {n: k * s / total for n, s in sizes.items()}
    counts = {n: min(sizes[n], math.floor(q)) for n, q in quotas.items()}
    left = k - sum(counts.values())
    for n in sorted(sizes, key=lambda n: (counts[n] - quotas[n], n)):
        if left == 0:
            break
        if counts[n] < sizes[n]:
            counts[n] += 1
            left -= 1
    return counts


def _random_indices(key: str, numel: int, k: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    return torch.randperm(numel, generator=g)[:k].sort().values


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


# -- the unit -----------------------------------------------------------------------------------------------

class SparseTensorDelta(nn.Module):
    """The difference of one tensor of shape ``S``: ``values`` ``(k,)`` at flat ``indices`` ``(k,)``
    (dense when ``k`` is the tensor's size: ``values`` of shape ``S`` and no indices)."""

    def __init__(self, key: str, shape: Sequence[int], k: int, indices: Tensor | None):
        super().__init__()
        self.key = key
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)
        self.dense_mode = k == self.numel
        self.values = nn.Parameter(torch.zeros(self.shape if self.dense_mode else (k,)))
        if self.dense_mode:
            self.register_buffer("indices", None)
        else:
            idx = torch.full((k,), _UNFILLED, dtype=_index_dtype(self.numel)) if indices is None else indices
            self.register_buffer("indices", idx.to(_index_dtype(self.numel)))
        self._checked: tuple[int, int] | None = None

    @property
    def k(self) -> int:
        return self.values.numel()

    def flat_indices(self) -> Tensor:
        """``(k,)`` int64 flat positions of the mask."""
        if self.indices is None:
            return torch.arange(self.numel, device=self.values.device)
        self._check_filled()
        return self.indices.long()

    def _check_filled(self) -> None:
        stamp = (self.indices.data_ptr(), self.indices._version)  # re-check only after the buffer changed
        if stamp == self._checked:
            return
        if self.indices.numel() and int(self.indices.min()) < 0:
            raise RuntimeError(
                f"sparse_ft: the mask of {self.key!r} was never filled: the adapter was built from a config with "
                "num_entries (a selected mask) but its indices were not set. Load it with mmadapters.load_adapter "
                "from a save that stores the mask, or build it with lottery_ticket_sparse_ft / from_dense_delta / compose")
        self._checked = stamp

    def dense(self) -> Tensor:
        """The difference as a dense tensor of shape ``S`` (differentiable in ``values``)."""
        if self.indices is None:
            return self.values
        self._check_filled()
        return self.values.new_zeros(self.numel).index_put((self.indices,), self.values).view(self.shape)

    @torch.no_grad()
    def fill(self, indices: Tensor, values: Tensor | None = None) -> None:
        """Set the mask (``(k,)`` flat positions, any order, no repeats) and optionally the values there."""
        indices = indices.reshape(-1).long()
        if indices.numel() != self.k:
            raise ValueError(f"sparse_ft: {self.key!r} holds {self.k} entries, got {indices.numel()} indices")
        order = indices.argsort()
        indices = indices[order]
        if indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= self.numel):
            raise ValueError(f"sparse_ft: indices of {self.key!r} must lie in [0, {self.numel})")
        if indices.numel() > 1 and bool((indices[1:] == indices[:-1]).any()):
            raise ValueError(f"sparse_ft: indices of {self.key!r} repeat an entry")
        if self.indices is not None:
            self.indices.copy_(indices.to(self.indices.dtype))
        elif not torch.equal(indices.cpu(), torch.arange(self.numel)):
            raise ValueError(f"sparse_ft: {self.key!r} is dense; its mask is every entry")
        if values is None:
            self.values.zero_()
        else:
            values = values.reshape(-1)[order.to(values.device)]
            self.values.copy_(values.view_as(self.values).to(self.values))


class SparseDeltaUnit(AdapterUnit):
    """A weight unit: ``W + dW`` for each selected parameter of the base module."""

    kind = "weight"

    def __init__(self, tensors: dict[str, SparseTensorDelta]):
        super().__init__(gate=False)
        # Parameter names may contain dots (out_proj.weight): store under escaped keys.
        self.tensors = nn.ModuleDict({n.replace(".", "__"): t for n, t in tensors.items()})

    def items(self) -> list[tuple[str, SparseTensorDelta]]:
        return [(n.replace("__", "."), t) for n, t in self.tensors.items()]

    def delta_params(self) -> dict[str, Tensor]:
        return {n: t.dense() for n, t in self.items()}


def build(ctx: BuildContext):
    config: SparseFTConfig = ctx.config
    per_target = {t.name: target_tensors(t, config.include_biases) for t in ctx.targets}
    sizes = {_key(m, n): p.numel() for m, tensors in per_target.items() for n, p in tensors.items()}
    if config.num_entries is None:
        counts = _random_counts(sizes, config.budget(sum(sizes.values())))
    else:
        missing = sorted(set(sizes) - set(config.num_entries))
        unexpected = sorted(set(config.num_entries) - set(sizes))
        if missing or unexpected:
            raise ValueError(f"SparseFTConfig.num_entries: does not match the targeted tensors; missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        too_big = [k for k, v in config.num_entries.items() if v > sizes[k]]
        if too_big:
            raise ValueError(f"SparseFTConfig.num_entries: {too_big[0]!r} asks for {config.num_entries[too_big[0]]} "
                             f"entries but the tensor has {sizes[too_big[0]]}")
        counts = config.num_entries
    for module_name, tensors in per_target.items():
        deltas = {}
        for pname, p in tensors.items():
            key = _key(module_name, pname)
            k = counts[key]
            if k == 0:
                continue
            indices = None
            if config.num_entries is None and k < p.numel():
                indices = _random_indices(key, p.numel(), k, config.seed)
            deltas[pname] = SparseTensorDelta(key, p.shape, k, indices)
        if deltas:
            yield module_name, _ROLE, SparseDeltaUnit(deltas)


register_method("sparse_ft", SparseFTConfig, build)


# -- reading an adapter ----------------------------------------------------------------------------------

def _tensors_of(model: nn.Module, name: str) -> dict[str, SparseTensorDelta]:
    from ..model import get_config, wrappers

    config = get_config(model, name)
    if not isinstance(config, SparseFTConfig):
        raise TypeError(f"sparse_ft: adapter {name!r} is a {config.method!r} adapter, not a sparse fine-tuning")
    out = {}
    for w in wrappers(model):
        if name in w.adapters and _ROLE in w.adapters[name]:
            for _pname, t in w.adapters[name][_ROLE].items():
                out[t.key] = t
    return out


def dense_deltas(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s differences as dense tensors: 'module.param' -> ``dW`` (shape of the parameter)."""
    with torch.no_grad():
        return {k: t.dense().detach().clone() for k, t in _tensors_of(model, name).items()}


def masks(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s masks: 'module.param' -> bool tensor of the parameter's shape."""
    out = {}
    for k, t in _tensors_of(model, name).items():
        m = torch.zeros(t.numel, dtype=torch.bool, device=t.values.device)
        m[t.flat_indices()] = True
        out[k] = m.view(t.shape)
    return out


# -- selection -----------------------------------------------------------------------------------------------

def select_mask(deltas: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """The ``k`` entries of largest ``|delta|``, chosen globally over all tensors.

    ``deltas``: name -> difference of any shape. Returns name -> sorted int64 flat indices ``(k_name,)``
    with ``sum k_name == k`` exactly (ties broken by position)."""
    if not deltas:
        raise ValueError("select_mask: argument 'deltas' is empty")
    names = list(deltas)
    flat = [deltas[n].detach().reshape(-1).abs().float() for n in names]
    sizes = [f.numel() for f in flat]
    total = sum(sizes)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= total:
        raise ValueError(f"select_mask: argument 'k' must be an integer in [1, {total}] (the entries of the given "
                         f"tensors), got {k!r}")
    device = flat[0].device
    top = torch.topk(torch.cat([f.to(device) for f in flat]), k, sorted=False).indices.sort().values
    out = {}
    start = 0
    for n, size in zip(names, sizes, strict=True):
        lo, hi = torch.searchsorted(top, torch.tensor([start, start + size], device=device)).tolist()
        out[n] = (top[lo:hi] - start).to(deltas[n].device)
        start += size
    return out


@dataclass
class SparseFTStats:
    """What a selection kept: K, and per tensor and per module how much of it."""

    num_params: int  # K
    total: int  # entries of the targeted tensors
    per_tensor: dict[str, tuple[int, int]]  # 'module.param' -> (kept, size)
    per_module: dict[str, float]  # module -> density of its kept entries
    threshold: float | None = None  # smallest |delta| kept (None when values were not ranked)

    @property
    def density(self) -> float:
        return self.num_params / self.total


def _expected_sizes(model: nn.Module, config: SparseFTConfig) -> tuple[list[Target], dict[str, int]]:
    from ..targets import resolve_targets

    targets = resolve_targets(model, config.target_modules)
    sizes = {_key(t.name, n): p.numel() for t in targets for n, p in target_tensors(t, config.include_biases).items()}
    return targets, sizes


def from_dense_delta(model: nn.Module, name: str, config: SparseFTConfig, deltas: Mapping[str, Tensor], *,
                     keep_values: bool = True) -> SparseFTStats:
    """Add adapter ``name``: the top-K entries of ``deltas`` (K from ``config``), selected globally.

    ``deltas``: 'module.param' -> dense difference for every tensor ``config`` targets (e.g. fine-tuned minus
    pretrained weights, or :func:`dense_deltas` of a dense adapter). ``keep_values``: the new adapter keeps
    the differences at the kept entries (magnitude pruning of a full fine-tuning); False starts them at zero
    (the lottery ticket's reset). Returns what was kept."""
    from ..model import adapter_names, add_adapter, delete_adapter

    if not isinstance(config, SparseFTConfig):
        raise TypeError(f"from_dense_delta: config must be a SparseFTConfig, got {type(config).__name__}")
    if name in adapter_names(model):
        raise ValueError(f"from_dense_delta: adapter {name!r} already exists on this model")
    targets, sizes = _expected_sizes(model, config)
    missing, unexpected = sorted(set(sizes) - set(deltas)), sorted(set(deltas) - set(sizes))
    if missing or unexpected:
        raise ValueError(f"from_dense_delta: argument 'deltas' does not match the tensors config targets; missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    for key, size in sizes.items():
        if deltas[key].numel() != size:
            raise ValueError(f"from_dense_delta: deltas[{key!r}] has {deltas[key].numel()} entries, the parameter {size}")
    k = config.budget(sum(sizes.values()))
    chosen = select_mask({key: deltas[key] for key in sizes}, k)
    counts = {key: int(idx.numel()) for key, idx in chosen.items()}
    final = dataclasses.replace(config, num_entries=counts)
    add_adapter(model, name, final, _targets=targets)
    try:
        tensors = _tensors_of(model, name)
        for key, t in tensors.items():
            idx = chosen[key]
            values = deltas[key].detach().reshape(-1)[idx.to(deltas[key].device)] if keep_values else None
            t.fill(idx, values)
    except Exception:
        delete_adapter(model, name)
        raise
    kept = [deltas[key].detach().reshape(-1)[idx.to(deltas[key].device)].abs() for key, idx in chosen.items() if idx.numel()]
    threshold = float(min(v.min() for v in kept)) if kept else None
    return _stats(counts, sizes, threshold)


def _stats(counts: Mapping[str, int], sizes: Mapping[str, int], threshold: float | None) -> SparseFTStats:
    per_module: dict[str, list[int]] = {}
    for key, size in sizes.items():
        module = _module_of(key)
        acc = per_module.setdefault(module, [0, 0])
        acc[0] += counts.get(key, 0)
        acc[1] += size
    return SparseFTStats(num_params=sum(counts.values()), total=sum(sizes.values()),
                         per_tensor={key: (counts.get(key, 0), size) for key, size in sizes.items()},
                         per_module={m: kept / size for m, (kept, size) in per_module.items()}, threshold=threshold)


def _module_of(key: str) -> str:
    """'blocks.0.fc1.weight' -> 'blocks.0.fc1'; a MultiheadAttention's 'attn.out_proj.weight' -> 'attn.out_proj'."""
    return key.rpartition(".")[0]


# -- the lottery-ticket procedure --------------------------------------------------------------------------

TrainFn = Callable[[nn.Module, list[nn.Parameter], int], object]


def lottery_ticket_sparse_ft(model: nn.Module, name: str, config: SparseFTConfig, train_fn: TrainFn,
                             full_steps: int, sparse_steps: int, *, base_adapters: Sequence[str] = ()) -> SparseFTStats:
    """Learn sparse fine-tuning ``name`` by LT-SFT: full fine-tune, keep the top-K changed entries, reset, retrain.

    ``train_fn(model, params, steps)`` is the user's training loop: it runs ``steps`` optimization steps of
    ``params`` (a fresh optimizer each call) with ``model``'s forward. It is called twice:

    1. with the dense difference of every targeted tensor (``params``: one ``values`` tensor per parameter,
       shaped like it) and ``full_steps``;
    2. after the top ``K = config.num_params`` (or ``density x`` targeted entries) of ``|dW|`` are kept,
       globally over all targets, and the difference is reset to zero: with the ``(k,)`` values of the kept
       entries and ``sparse_steps``.

    ``base_adapters``: adapters applied beneath ``name`` in both phases and not trained (the paper learns a
    task SFT on top of the source language's SFT). The base model is never modified: step 3's reset is the
    deletion of the dense difference. Parameters outside the adapter that ``train_fn`` updates itself (a
    task head) are not reset. Set ``requires_grad`` of the base as you wish beforehand (``mma.freeze_base``).

    On return the model carries adapter ``name`` (its config has ``num_entries`` filled in); the active
    composition is what it was before, or ``name`` if nothing was active. Returns the selection's stats."""
    from ..model import adapter_names, add_adapter, delete_adapter, get_active, get_config, set_active

    if not isinstance(config, SparseFTConfig):
        raise TypeError(f"lottery_ticket_sparse_ft: config must be a SparseFTConfig, got {type(config).__name__}")
    for arg, value in (("full_steps", full_steps), ("sparse_steps", sparse_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if arg == "full_steps" else 0):
            least = 1 if arg == "full_steps" else 0
            raise ValueError(f"lottery_ticket_sparse_ft: argument {arg!r} must be an integer >= {least}, got {value!r}")
    if name in adapter_names(model):
        raise ValueError(f"lottery_ticket_sparse_ft: adapter {name!r} already exists on this model")
    base_adapters = list(base_adapters)
    for n in base_adapters:
        get_config(model, n)
    before = get_active(model)
    dense_name = _unused(model, f"{name}__full")
    dense = dataclasses.replace(config, density=1.0, num_params=None, num_entries=None)
    add_adapter(model, dense_name, dense)
    try:
        set_active(model, Stack(*base_adapters, dense_name) if base_adapters else dense_name)
        train_fn(model, _trainable(model, dense_name), full_steps)
        deltas = dense_deltas(model, dense_name)
    finally:
        delete_adapter(model, dense_name)
        set_active(model, before)
    stats = from_dense_delta(model, name, config, deltas, keep_values=False)
    try:
        set_active(model, Stack(*base_adapters, name) if base_adapters else name)
        train_fn(model, _trainable(model, name), sparse_steps)
    finally:
        set_active(model, before if before is not None else name)
    return stats


def _trainable(model: nn.Module, name: str) -> list[nn.Parameter]:
    from ..model import adapter_parameters

    params = list(adapter_parameters(model, name).values())
    for p in params:
        p.requires_grad_(True)
    return params


def _unused(model: nn.Module, name: str) -> str:
    from ..model import adapter_names

    taken = set(adapter_names(model))
    i, candidate = 0, name
    while candidate in taken:
        i += 1
        candidate = f"{name}{i}"
    return candidate


# -- composition ---------------------------------------------------------------------------------------------

def compose(model: nn.Module, names: Sequence[str], new_name: str | None = None, *,
            weights: Sequence[float] | None = None) -> nn.Module:
    """Compose sparse fine-tunings by addition: ``W + sum_i dW_i`` (``W + sum_i w_i dW_i`` with ``weights``).

    Without ``new_name``: activate ``Stack(*names)`` (or ``Average(*names, weights=weights)``), which runs
    with the sum; :func:`mmadapters.merge` then folds it in exactly. With ``new_name``: add one adapter
    holding the (weighted) sum, its mask the union of the masks (the sources stay; the new one is not
    activated unless nothing was active). Returns ``model``."""
    from ..composition import Average
    from ..model import add_adapter, delete_adapter, get_config, set_active, state_of

    names = list(names)
    if not names:
        raise ValueError("compose: argument 'names' is empty; give at least one adapter")
    if len(set(names)) != len(names):
        raise ValueError(f"compose: argument 'names' repeats an adapter: {names}")
    configs = [get_config(model, n) for n in names]
    for n, c in zip(names, configs, strict=True):
        if not isinstance(c, SparseFTConfig):
            raise TypeError(f"compose: adapter {n!r} is a {c.method!r} adapter, not a sparse fine-tuning")
    if weights is not None:
        coefs = [float(w) for w in weights]
        if len(coefs) != len(names) or not all(math.isfinite(w) for w in coefs):
            raise ValueError(f"compose: argument 'weights' must be {len(names)} finite numbers, got {list(weights)}")
    if new_name is None:
        if weights is not None:
            set_active(model, Average(*names, weights=coefs))
        else:
            set_active(model, Stack(*names) if len(names) > 1 else names[0])
        return model
    coefs = coefs if weights is not None else [1.0] * len(names)
    for n, c in zip(names, configs, strict=True):
        if c.train_norms or c.train_biases != "none":
            raise ValueError(f"compose: adapter {n!r} also learns dense bias/norm deltas (train_biases/train_norms); "
                             "compose it at run time (new_name=None) instead")
    state = state_of(model)
    union: dict[str, Target] = {}
    for n in names:
        for t in state.targets[n]:
            have = union.setdefault(t.name, Target(t.name, t.module, t.dim, set(), t.batch_dim))
            have.parts |= t.parts
    order = {m: i for i, (m, *_) in enumerate(iter_logical_modules(model))}
    targets = sorted(union.values(), key=lambda t: order.get(t.name, len(order)))
    include_biases = any(c.include_biases for c in configs)
    sizes = {_key(t.name, p): v.numel() for t in targets for p, v in target_tensors(t, include_biases).items()}
    sums: dict[str, tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        for n, coef in zip(names, coefs, strict=True):
            for key, t in _tensors_of(model, n).items():
                idx, val = t.flat_indices(), t.values.detach().reshape(-1) * coef
                if key in sums:
                    idx, val = torch.cat([sums[key][0], idx.to(sums[key][0].device)]), torch.cat([sums[key][1], val.to(sums[key][1])])
                sums[key] = (idx, val)
        for key, (idx, val) in sums.items():
            uniq, inverse = torch.unique(idx, return_inverse=True)
            sums[key] = (uniq, val.new_zeros(uniq.numel()).index_add_(0, inverse, val))
    counts = {key: int(sums[key][0].numel()) if key in sums else 0 for key in sizes}
    target_names = [f"{t.name}.out_proj" if t.parts == {"out_proj"} else t.name for t in targets]
    config = dataclasses.replace(configs[0], target_modules=target_names, include_biases=include_biases,
                                 num_params=sum(counts.values()), num_entries=counts)
    add_adapter(model, new_name, config, _targets=targets)
    try:
        for key, t in _tensors_of(model, new_name).items():
            t.fill(*sums[key])
    except Exception:
        delete_adapter(model, new_name)
        raise
    return model


__all__ = ["SparseDeltaUnit", "SparseFTConfig", "SparseFTStats", "SparseTensorDelta", "compose", "dense_deltas",
           "from_dense_delta", "lottery_ticket_sparse_ft", "masks", "select_mask", "target_tensors"]
