"""The model-level API: add, activate, freeze, report, merge, delete.

State lives on the model itself: the adapters' units inside :class:`AdaptedModule` wrappers, modules
shared across layers in ``model.mma_shared``, and the configs and active composition in a plain
attribute (``model._mma_state``), so a model carries its adapters wherever it goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from . import methods  # noqa: F401  (registers the built-in methods)
from .composition import Composition, active_names, parse_composition
from .config import AdapterConfig, check_adapter_name, get_method
from .methods._common import BuildContext
from .methods.tuning import ParamDelta, tuned_parameters
from .targets import SHARED_ATTR, Target, iter_logical_modules, resolve_targets
from .units import NotMergeable
from .wrapper import AdaptedModule


@dataclass
class AdapterState:
    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    shared: dict[str, dict[str, str]] = field(default_factory=dict)  # adapter -> {alias: key in mma_shared}
    targets: dict[str, list[Target]] = field(default_factory=dict)  # adapter -> where its method's units are
    active: str | Composition | None = None
    merged: str | Composition | None = None


def state_of(model: nn.Module) -> AdapterState:
    state = model.__dict__.get("_mma_state")
    if state is None:
        state = AdapterState()
        object.__setattr__(model, "_mma_state", state)
    return state


def wrappers(model: nn.Module) -> list[AdaptedModule]:
    """Every adapter wrapper in ``model``, in module order. The walk goes through the base modules only, never
    into adapters' units or the shared modules, so its cost does not grow with the number of adapters."""
    out: list[AdaptedModule] = []

    def walk(module: nn.Module) -> None:
        if isinstance(module, AdaptedModule):
            out.append(module)
            module = module.base_layer
        for attr, child in module._modules.items():
            if child is not None and attr != SHARED_ATTR:
                walk(child)

    walk(model)
    return out


def _wrap(logical: dict[str, tuple[nn.Module, nn.Module | None, str]], name: str) -> AdaptedModule:
    """The wrapper of logical module ``name`` (``logical``: name -> (base module, parent, attribute), from one walk
    of the model), creating it and swapping it into its parent if needed."""
    if name not in logical:
        raise KeyError(f"no module named {name!r}")
    module, parent, attr = logical[name]
    if parent is None:
        raise ValueError("the model root itself cannot be adapted; target a submodule")
    current = parent._modules[attr]
    if isinstance(current, AdaptedModule):
        return current
    wrapper = AdaptedModule(module, name)
    setattr(parent, attr, wrapper)
    return wrapper


def _shared_dict(model: nn.Module) -> nn.ModuleDict:
    if SHARED_ATTR not in model._modules:
        model.add_module(SHARED_ATTR, nn.ModuleDict())
    return model._modules[SHARED_ATTR]


def add_adapter(model: nn.Module, name: str, config: AdapterConfig, *, _targets: list[Target] | None = None) -> nn.Module:
    """Inject adapter ``name`` described by ``config``. The first adapter added becomes active.

    Returns ``model`` (modified in place)."""
    check_adapter_name(name)
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"add_adapter: config must be an AdapterConfig, got {type(config).__name__}")
    state = state_of(model)
    if name in state.configs:
        raise ValueError(f"adapter {name!r} already exists on this model; delete_adapter() it first or pick another name")
    if state.merged is not None:
        raise RuntimeError("adapters are merged into the base: unmerge(model) before adding adapters")
    spec = get_method(config.method)
    targets = _targets if _targets is not None else resolve_targets(model, config.target_modules)
    shared = _shared_dict(model)
    aliases: dict[str, str] = {}

    def get_shared(alias: str, factory, per_adapter: bool) -> nn.Module:
        key = f"{name}__{alias}" if per_adapter else alias
        if key not in shared:
            shared[key] = factory()
        aliases[alias] = key
        return shared[key]

    ctx = BuildContext(model=model, adapter=name, config=config, targets=targets, shared=get_shared)
    try:
        units = list(spec.build_units(ctx))  # build everything before touching the model
        walked = list(iter_logical_modules(model))
        logical = {n: (m, p, a) for n, m, p, a in walked}
        tuned = tuned_parameters([(n, m, p) for n, m, p, _ in walked], {t.name for t in targets}, config.train_norms,
                                 config.train_biases)
        units += [(mod_name, "tuning", ParamDelta(logical[mod_name][0], names)) for mod_name, names in tuned.items()]
    except Exception:
        for key in set(aliases.values()) - _shared_in_use(state):
            del shared[key]
        raise
    batch_dims = {t.name: t.batch_dim for t in targets if t.batch_dim is not None}
    for module_name, role, unit in units:
        wrapper = _wrap(logical, module_name)
        wrapper.add_unit(name, role, unit)
        if module_name in batch_dims:
            wrapper.batch_dim = batch_dims[module_name]
    state.configs[name] = config
    state.shared[name] = aliases
    state.targets[name] = targets
    if not shared:
        del model._modules[SHARED_ATTR]
    if state.active is None:
        set_active(model, name)
    else:
        _propagate_active(model)
    return model


def _shared_in_use(state: AdapterState) -> set[str]:
    return {key for aliases in state.shared.values() for key in aliases.values()}


def adapter_names(model: nn.Module) -> list[str]:
    return list(state_of(model).configs)


def get_config(model: nn.Module, name: str) -> AdapterConfig:
    state = state_of(model)
    if name not in state.configs:
        raise KeyError(f"no adapter named {name!r}; this model has {list(state.configs) or 'none'}")
    return state.configs[name]


def set_active(model: nn.Module, adapters: str | list | Composition | None) -> nn.Module:
    """Choose what runs in forward: a name, a list (stacked in order), a Stack/Average, or None."""
    state = state_of(model)
    if state.merged is not None:
        raise RuntimeError("adapters are merged into the base: unmerge(model) before changing the active adapters")
    comp = parse_composition(adapters)
    for n in active_names(comp):
        get_config(model, n)
    state.active = comp
    _propagate_active(model)
    return model


def _propagate_active(model: nn.Module) -> None:
    comp = state_of(model).active
    for w in wrappers(model):
        w.active = comp


def get_active(model: nn.Module) -> str | Composition | None:
    return state_of(model).active


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """All parameters of adapter ``name``: its units' and the shared modules it uses (deduplicated)."""
    get_config(model, name)
    out: dict[str, nn.Parameter] = {}
    for w in wrappers(model):
        if name in w.adapters:
            for pname, p in w.adapters[name].named_parameters():
                out[f"{w.module_name}.{pname}"] = p
    shared = model._modules.get(SHARED_ATTR)
    for alias, key in state_of(model).shared.get(name, {}).items():
        for pname, p in shared[key].named_parameters():
            out[f"{SHARED_ATTR}.{alias}.{pname}"] = p
    return out


def _all_adapter_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for w in wrappers(model):
        ids |= {id(p) for p in w.adapters.parameters()}
    if SHARED_ATTR in model._modules:
        ids |= {id(p) for p in model._modules[SHARED_ATTR].parameters()}
    return ids


def freeze_base(model: nn.Module, freeze_norm_stats: bool = True, adapters: list[str] | None = None) -> nn.Module:
    """Only the active adapters' parameters (their units, shared modules, gates, deltas) stay trainable;
    or those of ``adapters`` (e.g. every adapter that :func:`mmadapters.route` trains in mixed batches).

    With ``freeze_norm_stats`` (default) the base's batch-norm layers also keep their running statistics
    in training mode (they normalize with them, as in eval), so training adapters never changes the base
    and switching adapters off restores it exactly (NeMo freezes them for the same reason)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in active_names(state_of(model).active) if adapters is None else adapters:
        for p in adapter_parameters(model, name).values():
            p.requires_grad_(True)
    set_norm_stats_frozen(model, freeze_norm_stats)
    return model


_FROZEN_STATS_HOOK = "_mma_frozen_stats_hook"


def _use_running_stats(module: nn.Module, args) -> None:
    module.training = False  # model.train() sets it again; this runs before every forward


def set_norm_stats_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (or release) the running statistics of the base's batch-norm layers."""
    adapter_ids = _all_adapter_param_ids(model)
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.track_running_stats:
            continue
        if any(id(p) in adapter_ids for p in module.parameters()):
            continue  # an adapter's own norm layer trains normally
        handle = module.__dict__.get(_FROZEN_STATS_HOOK)
        if frozen and handle is None:
            object.__setattr__(module, _FROZEN_STATS_HOOK, module.register_forward_pre_hook(_use_running_stats))
        elif not frozen and handle is not None:
            handle.remove()
            del module.__dict__[_FROZEN_STATS_HOOK]


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name``; wrappers left with no adapter are replaced by their base module."""
    state = state_of(model)
    get_config(model, name)
    if state.merged is not None:
        raise RuntimeError("adapters are merged into the base: unmerge(model) before deleting adapters")
    for w in wrappers(model):
        w.remove_adapter(name)
    for _name, _module, parent, attr in list(iter_logical_modules(model)):
        current = parent._modules.get(attr) if parent is not None else None
        if isinstance(current, AdaptedModule) and len(current.adapters) == 0:
            setattr(parent, attr, current.base_layer)
    del state.configs[name]
    state.targets.pop(name, None)
    aliases = state.shared.pop(name, {})
    in_use = _shared_in_use(state)
    for key in set(aliases.values()) - in_use:
        del model._modules[SHARED_ATTR][key]
    if SHARED_ATTR in model._modules and len(model._modules[SHARED_ATTR]) == 0:
        del model._modules[SHARED_ATTR]
    if name in active_names(state.active):
        state.active = None
    _propagate_active(model)
    return model


# -- merging -------------------------------------------------------------------------------------------

def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights. Exact for LoRA, weight deltas and linear bottlenecks.

    Either every adapted module merges or none does (a ValueError names the adapter that cannot)."""
    state = state_of(model)
    if state.merged is not None:
        raise RuntimeError("adapters are already merged; unmerge(model) first")
    comp = state.active
    if comp is None:
        raise ValueError("merge: no adapter is active (set_active first)")
    plans = []
    for w in wrappers(model):
        if not any(n in w.adapters for n in active_names(comp)):
            continue
        try:
            plans.append((w, w.merged_params(comp)))
        except NotMergeable as err:
            raise ValueError(f"merge: {err}; unmerged adapters keep working unmerged") from None
    for w, params in plans:
        w.apply_merge(comp, params)
    state.merged = comp
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the base weights saved by :func:`merge` (bit-exact)."""
    for w in wrappers(model):
        w.unmerge()
    state_of(model).merged = None
    return model
