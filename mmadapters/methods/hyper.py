"""Hypernetwork-generated adapters (Hyperformer, Karimi Mahabadi et al. 2021).

One hypernetwork, shared by every adapter that names it, generates the weights of a bottleneck adapter
at each layer from ``task embedding (+) layer embedding``:
``z = LayerNorm(MLP([t; l]))``, then linear generators map ``z`` to Down/Up weights and biases.

Each adapter added with a HyperAdapterConfig is one *task* (or language): it owns only its task
embedding, so ``set_active`` and per-sample routing select tasks by adapter name. A saved task
carries the hypernetwork with it; loading it onto a model that already has that hypernetwork
overwrites the shared weights with the saved ones (they are the same when the tasks were trained
together).

``hypernet_groups`` splits the adapted modules into groups with one hypernetwork (and one set of layer
embeddings) each, all driven by the task's one embedding: VL-Adapter's Hyperformer has one hypernetwork
for the encoder and one for the decoder, e.g.
``{"encoder": ["@enc_attn_out", "@enc_ffn_out"], "decoder": ["@dec_attn_out", "@dec_cross_out", "@dec_ffn_out"]}``.

``block_types`` (Hyperformer++, the efficient shared hypernetwork of the Hyperformer paper and of its code's
``efficient_unique_hyper_net``) names the adapter positions, e.g. ``{"attention": [...], "feed_forward": [...]}``:
the hypernetwork then takes ``[task; layer; block type]``, a block-type embedding (``layer_embedding_dim`` wide)
beside the layer embedding, and the layer index of a module is its rank among the modules of its block type in
its group (model order: the transformer block's index when every block has every position). Without it (the
default) each adapted module of a group has its own layer embedding and no block type is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, check_positive, register_method, target_modules_field
from ..targets import resolve_targets
from ..units import AdapterUnit, channel_dim, feature_dims, on_channels
from ._common import BuildContext, bottleneck_size, make_activation, require_dims


@dataclass
class HyperAdapterConfig(AdapterConfig):
    target_modules: list[str] | str | None = target_modules_field()
    hypernet: str = field(default="hypernet", metadata={
        "help": "Name of the shared hypernetwork; adapters with the same name share it (one per task)."})
    task_embedding_dim: int = field(default=512, metadata={"help": "Size of the task (or language) embedding."})
    layer_embedding_dim: int = field(default=512, metadata={"help": "Size of the layer-id embedding."})
    hidden_dim: int = field(default=128, metadata={"help": "Width of the hypernetwork's projection z."})
    bottleneck_dim: int | None = field(default=None, metadata={"help": "Width of the generated bottleneck."})
    reduction_factor: float | None = field(default=None, metadata={"help": "Used when bottleneck_dim is unset (default 16)."})
    activation: str = field(default="relu", metadata={"help": "Non-linearity of the generated adapter."})
    placement: str = field(default="series", metadata={"help": "'series' or 'parallel'."})
    hypernet_groups: dict[str, list[str]] | None = field(default=None, metadata={
        "help": "Group name -> target patterns (as target_modules): each group of adapted modules gets its own "
                "hypernetwork and layer embeddings (e.g. one for the encoder, one for the decoder); the task "
                "embedding is shared. None: one hypernetwork for all targets."})
    block_types: dict[str, list[str]] | None = field(default=None, metadata={
        "help": "Block-type name -> target patterns (e.g. attention / cross-attention / feed-forward positions): the "
                "hypernetwork is fed a block-type embedding beside the task and layer embeddings, layers counted per "
                "block type (Hyperformer++). None: one layer embedding per adapted module, no block type."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("task_embedding_dim", "layer_embedding_dim", "hidden_dim"):
            check_positive(self, name)
        make_activation(self.activation, "HyperAdapterConfig")
        if self.hypernet_groups is not None:
            if not isinstance(self.hypernet_groups, dict) or not self.hypernet_groups:
                raise ValueError("HyperAdapterConfig.hypernet_groups: expected None or a non-empty dict "
                                 f"{{group name: target patterns}}, got {self.hypernet_groups!r}")
            groups = {}
            for group, patterns in self.hypernet_groups.items():
                if not isinstance(group, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", group):
                    raise ValueError(f"HyperAdapterConfig.hypernet_groups: group name {group!r} must be letters, "
                                     "digits, '_' or '-'")
                patterns = [patterns] if isinstance(patterns, str) else list(patterns)
                if not patterns or not all(isinstance(p, str) for p in patterns):
                    raise ValueError(f"HyperAdapterConfig.hypernet_groups[{group!r}]: expected target patterns, "
                                     f"got {patterns!r}")
                groups[group] = patterns
            self.hypernet_groups = groups
        if self.block_types is not None:
            self.block_types = _named_patterns(self.block_types, "block_types", "block-type name")


def _named_patterns(value, field_name: str, what: str) -> dict[str, list[str]]:
    """``{name: [pattern, ...]}`` checked (a bare pattern string becomes a list); ValueError naming the field."""
    if not isinstance(value, dict) or not value:
        raise ValueError(f"HyperAdapterConfig.{field_name}: expected None or a non-empty dict "
                         f"{{{what}: target patterns}}, got {value!r}")
    out = {}
    for name, patterns in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise ValueError(f"HyperAdapterConfig.{field_name}: {what} {name!r} must be letters, digits, '_' or '-'")
        patterns = [patterns] if isinstance(patterns, str) else list(patterns) if isinstance(patterns, list | tuple) else None
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"HyperAdapterConfig.{field_name}[{name!r}]: expected target patterns, got {value[name]!r}")
        out[name] = patterns
    return out


class HyperNetwork(nn.Module):
    """Shared across tasks. Generators are keyed by the adapted module's (in, out, bottleneck) shape."""

    def __init__(self, config: HyperAdapterConfig, num_layers: int, block_types: list[str] | None = None):
        super().__init__()
        self.num_layers = num_layers
        self.block_types = list(block_types) if block_types else []  # the block-type embedding's rows, in order
        self.layer_embedding = nn.Embedding(num_layers, config.layer_embedding_dim)
        nn.init.normal_(self.layer_embedding.weight, std=0.02)
        inputs = config.task_embedding_dim + config.layer_embedding_dim
        if self.block_types:
            self.block_type_embedding = nn.Embedding(len(self.block_types), config.layer_embedding_dim)
            nn.init.normal_(self.block_type_embedding.weight, std=0.02)
            inputs += config.layer_embedding_dim
        self.project = nn.Sequential(
            nn.Linear(inputs, config.hidden_dim),
            nn.ReLU(),
            nn.Linear(config.hidden_dim, config.hidden_dim),
            nn.LayerNorm(config.hidden_dim),
        )
        self.generators = nn.ModuleDict()
        self.hidden_dim = config.hidden_dim

    def generator(self, in_dim: int, out_dim: int, bn: int) -> nn.ModuleDict:
        key = f"d{in_dim}_{out_dim}_{bn}"
        if key not in self.generators:
            h = self.hidden_dim
            gen = nn.ModuleDict({
                "down_w": nn.Linear(h, bn * in_dim), "down_b": nn.Linear(h, bn),
                "up_w": nn.Linear(h, out_dim * bn), "up_b": nn.Linear(h, out_dim),
            })
            for name in ("up_w", "up_b"):  # generated Up starts at zero: adapters start as the identity
                nn.init.zeros_(gen[name].weight)
                nn.init.zeros_(gen[name].bias)
            for name in ("down_w", "down_b"):
                nn.init.normal_(gen[name].weight, std=1e-2)
                nn.init.zeros_(gen[name].bias)
            ref = next(self.parameters())
            self.generators[key] = gen.to(ref.device, ref.dtype)
        return self.generators[key]


class TaskEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(dim) * 0.02)


class HyperAdapterUnit(AdapterUnit):
    def __init__(self, hypernet: HyperNetwork, task: TaskEmbedding, layer: int, in_dim: int, out_dim: int,
                 bn: int, config: HyperAdapterConfig, chdim: int, block_type: int | None = None):
        super().__init__(gate=config.gate)
        # Shared modules live at the model root; keep plain references so parameters are not duplicated.
        object.__setattr__(self, "_hypernet", hypernet)
        object.__setattr__(self, "_task", task)
        self.kind = config.placement
        self.layer, self.in_dim, self.out_dim, self.bn, self.channel_dim = layer, in_dim, out_dim, bn, chdim
        self.block_type = block_type  # row of the hypernetwork's block-type embedding (None: no block type)
        self.act = make_activation(config.activation, "HyperAdapterConfig")
        hypernet.generator(in_dim, out_dim, bn)

    def generated(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        net = self._hypernet
        parts = [self._task.embedding, net.layer_embedding.weight[self.layer]]
        if self.block_type is not None:
            parts.append(net.block_type_embedding.weight[self.block_type])
        z = net.project(torch.cat(parts))
        gen = net.generator(self.in_dim, self.out_dim, self.bn)
        return (gen["down_w"](z).view(self.bn, self.in_dim), gen["down_b"](z),
                gen["up_w"](z).view(self.out_dim, self.bn), gen["up_b"](z))

    def change(self, x: Tensor, h: Tensor) -> Tensor:
        dw, db, uw, ub = self.generated()
        src = x if self.kind == "parallel" else h
        return on_channels(lambda t: F.linear(self.act(F.linear(t, dw, db)), uw, ub), src, self.channel_dim)


def _owners(ctx: BuildContext, field: str, sets: dict[str, list], two: str, none: str, noun: str) -> dict[str, str]:
    """Adapted module name -> the one name of ``sets`` (name -> target patterns, the config's ``field``) whose
    patterns select it; a module selected by two names, or an adapted module by none, is an error naming the field."""
    owner: dict[str, str] = {}
    for name, patterns in sets.items():
        for t in resolve_targets(ctx.model, patterns, what=f"HyperAdapterConfig.{field}[{name!r}]"):
            if t.name in owner and owner[t.name] != name:
                raise ValueError(f"HyperAdapterConfig.{field}: module {t.name!r} {two} {owner[t.name]!r} and "
                                 f"{name!r}; each adapted module needs exactly one")
            owner[t.name] = name
    for t in ctx.targets:
        if t.name not in owner:
            raise ValueError(f"HyperAdapterConfig.{field}: adapted module {t.name!r} {none} "
                             f"({noun}: {sorted(sets)})")
    return owner


def _grouped_targets(ctx: BuildContext) -> dict[str, list]:
    """Hypernetwork alias -> the targets it generates adapters for, in model order."""
    config: HyperAdapterConfig = ctx.config
    if config.hypernet_groups is None:
        return {f"hypernet_{config.hypernet}": list(ctx.targets)}
    owner = _owners(ctx, "hypernet_groups", config.hypernet_groups, "is in groups", "is in no group", "groups")
    out: dict[str, list] = {f"hypernet_{config.hypernet}_{g}": [] for g in config.hypernet_groups}
    for t in ctx.targets:
        out[f"hypernet_{config.hypernet}_{owner[t.name]}"].append(t)
    return {alias: targets for alias, targets in out.items() if targets}


def _block_type_of(ctx: BuildContext) -> dict[str, str]:
    """Adapted module name -> its block type (``block_types``); every target needs exactly one."""
    return _owners(ctx, "block_types", ctx.config.block_types, "is of block types", "has no block type", "block types")


def build(ctx: BuildContext):
    config: HyperAdapterConfig = ctx.config
    groups = _grouped_targets(ctx)  # checks the groups before anything is created
    kinds = _block_type_of(ctx) if config.block_types is not None else None
    task = ctx.shared("task_embedding", lambda: TaskEmbedding(config.task_embedding_dim), True)
    for alias, targets in groups.items():
        yield from _build_group(ctx, alias, targets, task, kinds)


def _build_group(ctx: BuildContext, alias: str, targets: list, task: TaskEmbedding, kinds: dict[str, str] | None):
    config: HyperAdapterConfig = ctx.config
    if kinds is None:  # one layer embedding per adapted module
        positions = [(layer, None) for layer in range(len(targets))]
        n, types = len(targets), []
    else:  # layer = rank among the group's modules of the same block type; block types in order of appearance
        types = list(dict.fromkeys(kinds[t.name] for t in targets))
        seen = dict.fromkeys(types, 0)
        positions = []
        for t in targets:
            positions.append((seen[kinds[t.name]], types.index(kinds[t.name])))
            seen[kinds[t.name]] += 1
        n = max(seen.values())
    hypernet = ctx.shared(alias, lambda: HyperNetwork(config, n, types), False)
    if hypernet.num_layers != n or hypernet.block_types != types:
        raise ValueError(f"HyperAdapterConfig: hypernetwork {alias[len('hypernet_'):]!r} was built for {hypernet.num_layers} "
                         f"layers and block types {hypernet.block_types}, this adapter has {n} and {types}")
    for (layer, block_type), target in zip(positions, targets, strict=True):
        in_dim, out_dim = feature_dims(target.module, target.dim)
        if config.placement == "series":
            in_dim = out_dim
        require_dims(target, in_dim, out_dim, "HyperAdapterConfig")
        bn = bottleneck_size(config, in_dim)
        yield target.name, "hyper", HyperAdapterUnit(hypernet, task, layer, in_dim, out_dim, bn, config,
                                                     channel_dim(target.module), block_type)


register_method("hyper", HyperAdapterConfig, build)
