"""VL-Adapter's parameter-efficient variants on VL-T5: what is added, what trains, what it costs.

Sung et al. 2022 (VL-Adapter), Section 3 and Table 1, on :class:`~mmadapters.vision.vlt5.VLT5`:

- **Adapters** sit in each encoder layer after self-attention and after the FFN, and in each decoder layer
  after self-attention, cross-attention and the FFN (VL-T5's adapter points ``enc_attn_out``,
  ``enc_ffn_out``, ``dec_attn_out``, ``dec_cross_out``, ``dec_ffn_out``): ``h + Up(act(Down(h)))`` with
  reduction factor 8.
- **Weight sharing** across the four tasks: ``multiple_adapters`` (one set per task), ``half_shared_down``
  / ``half_shared_up`` (per-task adapters sharing the Down or the Up projection,
  :class:`~mmadapters.methods.bottleneck.BottleneckConfig` ``share_down`` / ``share_up``) and
  ``shared_adapter`` (one set for every task; the task prefix tells tasks apart).
- **Task prefixes** (``"vqa: "``, ... :data:`~mmadapters.vision.vl_adapter.TASK_PREFIX`) as VL-Adapter's code
  sets them (its ``--use_tasks_prompts``, given by the released scripts of the single shared adapter,
  Compacter, LoRA and prompt only): a variant whose tasks share an adapter or part of one
  (``shared_adapter``, ``half_shared_down`` / ``half_shared_up``, the single-set ``compacter``,
  ``phm_adapter``, ``lora``, ``prompt`` and ``llama_adapter_v2``) puts the task prefix before the text;
  ``full_ft`` and the variants with one adapter per task (``multiple_adapters``, ``hyperformer``, and the
  others with ``per_task=True``) feed the question alone, single-task style (:func:`uses_task_prefix`). The
  half-shared adapters (no released script) and LLaMA-Adapter V2 (not in VL-Adapter) follow the shared rule.
  ``VariantConfig.task_prefix`` = true / false overrides the choice for every variant (true: this library's
  behaviour before, prefixes everywhere). The choice is kept in :attr:`VariantSetup.task_prefix` and saved
  with the checkpoint, so evaluation feeds what training fed.
- **Hyperformer**: each task is a task embedding; with layer and block-type embeddings it drives one
  hypernetwork for the encoder and one for the decoder, which generate every adapter
  (:class:`~mmadapters.methods.hyper.HyperAdapterConfig` ``hypernet_groups`` and ``block_types``). The
  hypernetwork's input is ``[task; layer; block type]``: the layer embedding indexes the transformer block and
  the block type is the adapter's position in it (:data:`HYPER_BLOCK_TYPES`: self-attention, cross-attention,
  feed-forward), so the two adapters of one encoder block get different weights from one hypernetwork — the
  Hyperformer++ hypernetwork of rabeehk/hyperformer, which VL-Adapter's code carries as
  ``AdapterLayersOneHyperNetController`` (``--efficient_unique_hyper_net``; its released Hyperformer script
  passes ``--unique_hyper_net`` instead, the sibling controller that feeds only ``[task; layer]`` and gives
  each block type its own weight generators). ``hyper_block_types=False`` keeps this library's earlier form:
  one free layer embedding per adapted module and no block type.
- **Compacter** (PHM projections with rank-1 factorized ``B_i`` and the ``A_i`` shared across layers) and
  the **plain PHM adapter** (full ``B_i``, one ``A`` per layer) — the released VL-Adapter scripts train the
  latter under the name "Compacter"; here each has its own name.
- Baselines: **LoRA** on the query and value projections of every attention (self- and cross-), and
  **prompt tuning**: 40 prompts prepended to the encoder input (``@encoder_input``), produced by an MLP
  (reparameterized).
- **LLaMA-Adapter V2** (Gao et al. 2023, :mod:`mmadapters.methods.llama_adapter`; not in VL-Adapter's
  table): ``llama_prompts`` zero-init gated adaptation prompts in the self-attention of every encoder layer
  (``llama_layers`` keeps only the top ones; the tiny VL-T5 has 3 encoder layers, so "all" is the
  counterpart of the paper's top 30 of 32), V2's unlocked bias and scale on the attention and FFN output
  projections of encoder and decoder (the five adapter points above), and *early fusion*: each sample's
  global visual feature (the mean of its CLIP grid tokens over its image(s), ``(B, D_v)``) passes through
  the adapter's own projection and is added to the prompts of the first adapted encoder layer only
  (``visual_layers=1``). :meth:`VariantSetup.fusion` feeds it around each forward / generate call and
  clears it after. One adapter for all tasks; the norms train as in the other variants (the shared
  LayerNorms below, not the core's per-adapter ``train_norms`` deltas). The decoder gets no prompts: a
  beam-searched decoder's batch is not the samples' batch.
- **Also trained** in every variant, as in the paper: all LayerNorms of the backbone (T5's RMS-style
  ``T5LayerNorm`` and the visual projection's LayerNorm) and the visual projection. These are shared by
  all tasks, so :func:`setup_variant` unfreezes the base's own parameters; the core's ``train_norms``
  option would instead give each adapter private, zero-initialized deltas (per-task LayerNorms, which
  is not what the paper trains).
- ``full_ft``: everything trains, no adapter.

Sizes where the paper's are too big for a tiny model are scaled with the model width ``d`` (the paper's
backbone has ``d = 768``) and can be overridden: LoRA ``r = d / 6`` with ``alpha = r / 4`` (the paper's
``r = 128``, ``alpha = 32``: the same ``alpha / r``); Hyperformer task, layer and block-type embeddings
``2d / 3`` (512; the block type has the layer embedding's size) and hypernetwork width ``d / 6`` (128); prompt
MLP width ``d``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

from torch import Tensor, nn

import mmadapters as mma
from mmadapters.config import check_adapter_name
from mmadapters.methods import llama_adapter
from mmadapters.methods.llama_adapter import LlamaAdapterConfig
from mmadapters.methods.tuning import is_norm
from mmadapters.model import _all_adapter_param_ids
from mmadapters.targets import iter_logical_modules

TASKS = ("vqa", "gqa", "nlvr", "caption")
VARIANTS = ("full_ft", "multiple_adapters", "half_shared_down", "half_shared_up", "shared_adapter", "hyperformer",
            "compacter", "phm_adapter", "lora", "prompt", "llama_adapter_v2")
ENCODER_POINTS = ["@enc_attn_out", "@enc_ffn_out"]
DECODER_POINTS = ["@dec_attn_out", "@dec_cross_out", "@dec_ffn_out"]
ADAPTER_POINTS = ENCODER_POINTS + DECODER_POINTS
SHARED_NAME = "shared"  # the adapter every task uses in the single-set variants
LLAMA_ATTENTION = "t5.encoder.block.*.layer.0.SelfAttention"  # LLaMA-Adapter V2's prompts: encoder self-attention
# Variants whose adapters are one set for all tasks unless VariantConfig.per_task says otherwise.
_SINGLE_BY_DEFAULT = ("shared_adapter", "compacter", "phm_adapter", "lora", "prompt", "llama_adapter_v2")
_FUSES_VISUAL_TOKENS = ("llama_adapter_v2",)  # variants fed each sample's global visual feature (VariantSetup.fusion)
_PER_TASK_ONLY = ("multiple_adapters", "half_shared_down", "half_shared_up", "hyperformer")
_PARTLY_SHARED = ("half_shared_down", "half_shared_up")  # per-task adapters with a shared projection: prefixed
# Hyperformer's block types: the adapter's position inside a T5 block (the hypernetwork's block-type embedding)
HYPER_BLOCK_TYPES = {"self_attention": ["@enc_attn_out", "@dec_attn_out"], "cross_attention": ["@dec_cross_out"],
                     "feed_forward": ["@enc_ffn_out", "@dec_ffn_out"]}


def _help(text: str, default=None, **kw):
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class VariantConfig:
    """What a VL-Adapter variant adds to VL-T5. ``None`` sizes are scaled with the model width (module docstring)."""

    variant: str = _help(f"One of {VARIANTS}.", "shared_adapter")
    tasks: tuple[str, ...] = _help("Tasks trained together (each gets its prefix and, per variant, its adapter).", TASKS)
    reduction_factor: float = _help("Bottleneck adapters, Hyperformer, Compacter, PHM: d / bottleneck width.", 8.0)
    activation: str = _help("Non-linearity of the bottleneck adapters and Hyperformer's generated adapters.", "gelu")
    per_task: bool | None = _help(
        "Compacter, PHM, LoRA, prompt: one set per task (True) or one for all tasks (False, the default). "
        "Fixed by the variant for the others.")
    lora_r: int | None = _help("LoRA rank (paper: 128 at d=768; default d / 6).")
    lora_alpha: float | None = _help("LoRA alpha (paper: 32 with r=128; default r / 4, the same alpha / r).")
    prompt_tokens: int = _help("Prompt tuning: number of encoder prompts.", 40)
    prompt_hidden: int | None = _help("Prompt tuning: width of the reparameterization MLP (default d).")
    phm_dim: int = _help("Compacter / PHM: n, the number of Kronecker summands.", 4)
    phm_rank: int = _help("Compacter: rank of the factorized B_i.", 1)
    hyper_task_dim: int | None = _help("Hyperformer: task embedding size (paper 512; default 2d / 3).")
    hyper_layer_dim: int | None = _help("Hyperformer: layer embedding size (paper 512; default 2d / 3).")
    hyper_hidden: int | None = _help("Hyperformer: hypernetwork width (paper 128; default d / 6).")
    hyper_block_types: bool = _help(
        "Hyperformer: feed the hypernetwork a block-type embedding (self-attention / cross-attention / feed-forward "
        "position) beside the task and layer embeddings, the layer embedding indexing the T5 block (True, the "
        "default: Hyperformer++ as VL-Adapter's code has it); False: one layer embedding per adapted module and no "
        "block type (this library's Hyperformer before).", True)
    task_prefix: bool | None = _help(
        "Put the task prefix ('vqa: ', ...) before the encoder text. None (the default): as VL-Adapter's code does, "
        "for the variants whose tasks share an adapter or part of one (shared_adapter, half_shared_*, the single-set "
        "compacter / phm_adapter / lora / prompt / llama_adapter_v2), not for full_ft nor per-task adapters "
        "(multiple_adapters, hyperformer, per_task=True). True / False: for every variant (True: the library's "
        "behaviour before).")
    llama_prompts: int = _help("LLaMA-Adapter V2: adaptation prompts per adapted encoder self-attention.", 10)
    llama_layers: int | None = _help("LLaMA-Adapter V2: adapt the top N encoder layers only (None: all of them; "
                                     "the visual tokens join the first adapted one).")
    train_extras: bool = _help("Also train all LayerNorms and the visual projection (the paper does).", True)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"VariantConfig.variant: expected one of {VARIANTS}, got {self.variant!r}")
        self.tasks = tuple(self.tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"VariantConfig.tasks: expected distinct task names, got {self.tasks!r}")
        for t in self.tasks:
            check_adapter_name(t)
        if self.per_task is not None and self.variant not in ("compacter", "phm_adapter", "lora", "prompt"):
            raise ValueError(f"VariantConfig.per_task: variant {self.variant!r} fixes its sharing; per_task applies to "
                             "compacter, phm_adapter, lora and prompt")
        for name in ("task_prefix", "hyper_block_types"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (value is None and name == "task_prefix")):
                expected = "true, false or null" if name == "task_prefix" else "true or false"
                raise ValueError(f"VariantConfig.{name}: expected {expected}, got {value!r}")
        if self.llama_layers is not None and self.llama_layers <= 0:
            raise ValueError(f"VariantConfig.llama_layers: expected None or a positive integer, got {self.llama_layers!r}")
        for name in ("reduction_factor", "prompt_tokens", "phm_dim", "phm_rank", "llama_prompts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VariantConfig.{name}: expected a positive number, got {getattr(self, name)!r}")


@dataclass
class VariantSetup:
    """What :func:`setup_variant` did: the adapter each task runs with and what trains."""

    variant: str
    tasks: tuple[str, ...]
    adapter_for: dict[str, str | None]  # task -> adapter name to activate (None: no adapter, full fine-tuning)
    adapters: list[str]  # every adapter added
    extras: list[str]  # base parameters that train besides the adapters (LayerNorms, visual projection)
    sizes: dict[str, float] = field(default_factory=dict)  # the resolved sizes (LoRA r, Hyperformer dims, ...)
    visual_tokens: bool = False  # the adapters take each sample's global visual feature (early fusion): see fusion()
    task_prefix: bool = True  # the encoder text starts with the task prefix (module docstring; True: any setup
    # not made by setup_variant, e.g. adapters loaded without a vl_adapter.json, or a checkpoint from before)

    def activate(self, model: nn.Module, task: str) -> None:
        """Make ``task``'s adapter the active one (before a forward pass on a batch of that task)."""
        if task not in self.adapter_for:
            raise KeyError(f"task {task!r} was not set up; this {self.variant} setup has tasks {list(self.adapter_for)}")
        name = self.adapter_for[task]
        if name is not None and mma.get_active(model) != name:
            mma.set_active(model, name)

    def fusion(self, model: nn.Module, visual_feats: Tensor) -> contextlib.AbstractContextManager[None]:
        """Context for one forward or generate call on a batch with ``visual_feats`` (B, N, D_v) or
        (B, I, N, D_v): for a variant with early fusion (``visual_tokens``), the batch's
        :func:`global_visual_feature` is fed to the adapters' first layer inside the block, and removed on exit;
        otherwise nothing happens."""
        if not self.visual_tokens:
            return contextlib.nullcontext()
        return llama_adapter.visual_tokens(model, global_visual_feature(visual_feats))


def global_visual_feature(visual_feats: Tensor) -> Tensor:
    """Each sample's global image feature for early fusion: ``(B, N, D_v)`` or ``(B, I, N, D_v)`` -> ``(B, D_v)``,
    the mean over the grid tokens of all the sample's images (both images of an NLVR2 pair)."""
    if visual_feats.dim() not in (3, 4):
        raise ValueError(f"visual_feats: expected (B, N, D) or (B, I, N, D), got shape {tuple(visual_feats.shape)}")
    return visual_feats.reshape(visual_feats.shape[0], -1, visual_feats.shape[-1]).float().mean(dim=1)


def uses_task_prefix(config: VariantConfig) -> bool:
    """Whether ``config``'s variant puts the task prefix before the encoder text (module docstring):
    ``config.task_prefix`` when set, else VL-Adapter's choice: yes when tasks share an adapter or part of one."""
    if config.task_prefix is not None:
        return config.task_prefix
    if config.variant == "full_ft":
        return False
    if config.variant in _PARTLY_SHARED:
        return True
    return config.variant in _SINGLE_BY_DEFAULT and not config.per_task


def unfreeze_extras(model: nn.Module) -> list[str]:
    """Make every LayerNorm of the backbone and the whole visual projection trainable (shared by all tasks).

    Returns the parameter names (logical names: adapter wrappers seen through)."""
    names: list[str] = []
    for name, module, _parent, _attr in iter_logical_modules(model):
        in_proj = name == "visual_proj" or name.startswith("visual_proj.")
        if not (is_norm(module) or in_proj):  # is_norm knows T5LayerNorm
            continue
        for pname, p in module.named_parameters(recurse=False):
            p.requires_grad_(True)
            names.append(f"{name}.{pname}")
    return names


def _sizes(config: VariantConfig, d: int) -> dict[str, float]:
    r = config.lora_r or max(1, round(d / 6))
    return {
        "d_model": d,
        "lora_r": r,
        "lora_alpha": config.lora_alpha if config.lora_alpha is not None else r / 4,
        "prompt_hidden": config.prompt_hidden or d,
        "hyper_task_dim": config.hyper_task_dim or max(4, round(2 * d / 3)),
        "hyper_layer_dim": config.hyper_layer_dim or max(4, round(2 * d / 3)),
        "hyper_hidden": config.hyper_hidden or max(8, round(d / 6)),
    }


def _adapter_configs(config: VariantConfig, sizes: dict[str, float],
                     visual_dim: int) -> tuple[dict[str, mma.AdapterConfig], bool]:
    """(adapter name -> config, one adapter per task?) for the variant."""
    v, rf = config.variant, config.reduction_factor
    bottleneck = dict(target_modules=ADAPTER_POINTS, reduction_factor=rf, activation=config.activation)
    if v in ("multiple_adapters", "shared_adapter"):
        make = lambda: mma.BottleneckConfig(**bottleneck)  # noqa: E731
    elif v == "half_shared_down":
        make = lambda: mma.BottleneckConfig(**bottleneck, share_down="vl_tasks")  # noqa: E731
    elif v == "half_shared_up":
        make = lambda: mma.BottleneckConfig(**bottleneck, share_up="vl_tasks")  # noqa: E731
    elif v == "hyperformer":
        make = lambda: mma.HyperAdapterConfig(  # noqa: E731
            target_modules=ADAPTER_POINTS, hypernet="vl", reduction_factor=rf, activation=config.activation,
            task_embedding_dim=int(sizes["hyper_task_dim"]), layer_embedding_dim=int(sizes["hyper_layer_dim"]),
            hidden_dim=int(sizes["hyper_hidden"]),
            hypernet_groups={"encoder": list(ENCODER_POINTS), "decoder": list(DECODER_POINTS)},
            block_types={k: list(v) for k, v in HYPER_BLOCK_TYPES.items()} if config.hyper_block_types else None)
    elif v in ("compacter", "phm_adapter"):
        preset = mma.CompacterConfig.compacter if v == "compacter" else mma.CompacterConfig.phm_adapter
        kw = dict(target_modules=ADAPTER_POINTS, reduction_factor=rf, phm_dim=config.phm_dim)
        if v == "compacter":
            kw["phm_rank"] = config.phm_rank
        make = lambda: preset(**kw)  # noqa: E731
    elif v == "lora":
        make = lambda: mma.LoRAConfig(r=int(sizes["lora_r"]), alpha=float(sizes["lora_alpha"]),  # noqa: E731
                                      target_modules=["@attn_q", "@attn_v"])
    elif v == "prompt":
        make = lambda: mma.PromptConfig(target_modules="@encoder_input", num_tokens=config.prompt_tokens,  # noqa: E731
                                        reparameterize=True, reparam_hidden=int(sizes["prompt_hidden"]))
    elif v == "llama_adapter_v2":  # norms: the shared LayerNorms of unfreeze_extras, as in every variant
        make = lambda: LlamaAdapterConfig.v2(  # noqa: E731
            bias_scale=list(ADAPTER_POINTS), train_norms=False, target_modules=LLAMA_ATTENTION,
            num_prompts=config.llama_prompts, num_layers=config.llama_layers, visual_dim=visual_dim, visual_layers=1)
    else:  # full_ft
        return {}, False
    per_task = v in _PER_TASK_ONLY or (v in _SINGLE_BY_DEFAULT and bool(config.per_task))
    if per_task:
        return {t: make() for t in config.tasks}, True
    return {SHARED_NAME: make()}, False


def setup_variant(model: nn.Module, config: VariantConfig | str, tasks: tuple[str, ...] | list[str] | None = None,
                  **overrides) -> VariantSetup:
    """Add the variant's adapters to a VL-T5 ``model`` and set what trains. Returns the :class:`VariantSetup`.

    ``config``: a :class:`VariantConfig` (or subclass) or a variant name; ``overrides`` replace its fields;
    ``tasks`` overrides ``config.tasks``. The model must carry no adapters yet. Afterwards exactly the
    variant's parameters have ``requires_grad`` (everything for ``full_ft``), the first task's adapter is
    active, and the model stays on the device it was on.
    """
    if isinstance(config, str):
        config = VariantConfig(variant=config, **overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if tasks is not None:
        config = dataclasses.replace(config, tasks=tuple(tasks))
    if mma.adapter_names(model):
        raise ValueError(f"setup_variant: the model already has adapters {mma.adapter_names(model)}; start from a fresh VL-T5")
    if not hasattr(model, "t5"):
        raise TypeError(f"setup_variant: expected a VLT5 model (with .t5), got {type(model).__name__}")
    ref = next(model.parameters())
    sizes = _sizes(config, int(model.t5.config.d_model))
    configs, per_task = _adapter_configs(config, sizes, int(model.visual_dim))
    for name, adapter_config in configs.items():
        mma.add_adapter(model, name, adapter_config)
    model.to(ref.device)  # modules shared at the root (hypernetworks, PHM rules) are created on the CPU
    if config.variant == "full_ft":
        for p in model.parameters():
            p.requires_grad_(True)
        extras = [n for n, _ in model.named_parameters()]
    else:
        mma.freeze_base(model, adapters=list(configs))
        extras = unfreeze_extras(model) if config.train_extras else []
    adapter_for = {t: (t if per_task else SHARED_NAME) if configs else None for t in config.tasks}
    setup = VariantSetup(config.variant, config.tasks, adapter_for, list(configs), extras, sizes,
                         visual_tokens=config.variant in _FUSES_VISUAL_TOKENS, task_prefix=uses_task_prefix(config))
    setup.activate(model, config.tasks[0])
    return setup


@dataclass
class VariantParameters:
    """Parameter counts of one variant; percentages are of the backbone (T5 + visual projection)."""

    variant: str
    backbone: int  # parameters of VL-T5 without adapters (tied embeddings counted once)
    trainable: int  # everything that trains: adapters (shared parts once) + extras
    adapters: int  # all adapter parameters, shared parts once
    extras: int  # trainable backbone parameters (LayerNorms + visual projection; everything for full_ft)
    per_task: dict[str, int] = field(default_factory=dict)  # parameters a task's adapter uses (shared parts included)

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / self.backbone

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "trainable_pct": self.trainable_pct}

    def __str__(self) -> str:
        rows = [("backbone (VL-T5 + visual projection)", self.backbone),
                ("adapters (shared parts once)", self.adapters),
                ("trained backbone parameters (LayerNorms, visual projection)" if self.variant != "full_ft"
                 else "trained backbone parameters (all)", self.extras),
                ("trainable", self.trainable)]
        by_count: dict[int, list[str]] = {}
        for task, count in self.per_task.items():
            by_count.setdefault(count, []).append(task)
        rows += [(f"  adapter parameters each of {', '.join(tasks)} uses", count) for count, tasks in by_count.items()]
        width = max(len(name) for name, _ in rows)
        lines = [f"VL-Adapter variant {self.variant!r}", f"{'parameters':<{width}}  {'count':>12}  {'% of backbone':>13}"]
        lines += [f"{name:<{width}}  {count:>12,}  {100.0 * count / max(self.backbone, 1):>12.2f}%" for name, count in rows]
        return "\n".join(lines)


def parameter_report(model: nn.Module, setup: VariantSetup) -> VariantParameters:
    """Count what trains under ``setup`` (each tensor once, however many tasks or layers share it)."""
    core = mma.parameter_report(model)
    adapter_ids = _all_adapter_param_ids(model)
    params = {id(p): p for p in model.parameters()}
    extras = sum(p.numel() for i, p in params.items() if p.requires_grad and i not in adapter_ids)
    per_task = {t: core.per_adapter[a] for t, a in setup.adapter_for.items() if a is not None}
    return VariantParameters(setup.variant, core.base, core.trainable, core.adapters, extras, per_task)


__all__ = ["ADAPTER_POINTS", "DECODER_POINTS", "ENCODER_POINTS", "HYPER_BLOCK_TYPES", "LLAMA_ATTENTION", "SHARED_NAME", "TASKS",
           "VARIANTS", "VariantConfig", "VariantParameters", "VariantSetup", "global_visual_feature", "parameter_report",
           "setup_variant", "unfreeze_extras", "uses_task_prefix"]
