"""LLaMA-Adapter (Zhang et al. 2023) and its V2 (Gao et al. 2023): zero-init gated adaptation prompts.

V1: every adapted attention module owns ``P`` learnable *adaptation prompts* ``(P, D)``, tokens in the
space of the attention's input. Its queries attend to the prompts *separately* from the sequence: the
prompts go through the module's own key and value projections, the scores over the prompts get their own
softmax, and the result is multiplied by a per-head gate that starts at zero before it joins the attention
output (through the output projection)::

    out = base_attention(x) + W_o [ g_h * softmax(q_h k_p,h^T * s) v_p,h ]_heads

so the adapter is the identity at initialization and the pretrained attention is never disturbed by
random prompts. The gate ``g`` is one raw scalar per head (V1 used ``tanh`` of one scalar per layer); at
zero it blocks the prompts' gradients but receives its own, so training opens it. The original adapts the
top ``L`` layers only (``num_layers``).

V2 adds, without touching the prompts:

- *unlocked bias, scale and norm*: each Linear named in ``bias_scale`` learns a per-output-channel scale
  ``s`` (init 1) and bias ``b`` (init 0), ``y -> s * (y + b)`` (for ``nn.MultiheadAttention``, on the
  output of its ``out_proj``); norms are unlocked with the core's ``train_norms`` (per-adapter weight and
  bias deltas), existing biases with ``train_biases``;
- *early fusion*: per-sample visual tokens ``(B, V, D_vis)`` (a projected global image feature: ``V = 1``,
  or ``V = P`` tokens) pass through a trainable projection ``D_vis -> D`` and are *added* to the adaptation
  prompts of the first ``visual_layers`` adapted attention modules only; the later ones keep text-only
  prompts. Feed them with :func:`visual_tokens` (a context) or :func:`set_visual_tokens`::

      cfg = LlamaAdapterConfig(target_modules="@attn", num_prompts=10, visual_dim=512, visual_layers=1,
                               bias_scale=["mlp.fc1", "mlp.fc2"], train_norms=True)
      mma.add_adapter(model, "vl", cfg)
      with llama_adapter.visual_tokens(model, clip_image_features):  # (B, 512) or (B, V, 512)
          logits = model(tokens)

  Without visual tokens the adapter runs text-only. The tokens' batch must be the forward's batch (put
  the early layers where the batch is not expanded, e.g. a T5 encoder rather than a beam-searched decoder).
  ``LlamaAdapterConfig.v2(bias_scale, ...)`` presets the V2 unlocking (``train_norms=True``).

Supported attention modules (dispatch by type): ``nn.MultiheadAttention`` (the toy transformer, open_clip's
CLIP towers: ``"@attn"``), and transformers' ``T5Attention`` / ``MT5Attention`` (VL-T5). Prompts see no
attention mask (they are not sequence positions, so a causal mask does not apply to them) and no position
bias. For ``nn.MultiheadAttention`` the prompt path reads the attention's base ``in_proj``/``out_proj``
weights: weight edits that other units make to that same module (LoRA inside the attention,
``train_biases`` deltas) shape the sequence path only. For T5, the prompt path calls the module's own
``q``/``k``/``v``/``o`` Linears, so adapters on those (``bias_scale``, LoRA) shape both paths.

Not mergeable: the prompt attention depends on the input.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, check_positive, register_method
from ..units import AdapterUnit, NotMergeable
from ._common import BuildContext

VISUAL_ALIAS = "visual_proj"


@dataclass
class LlamaAdapterConfig(AdapterConfig):
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Attention modules that get adaptation prompts (nn.MultiheadAttention, transformers T5Attention), "
                "as in any target_modules: names, globs, 're:' regexes or '@points' ('@attn')."})
    num_prompts: int = field(default=10, metadata={"help": "P: adaptation prompt tokens per adapted attention module."})
    num_layers: int | None = field(default=None, metadata={
        "help": "Adapt only the last N matched attention modules, in model order (LLaMA-Adapter's top-L layers); "
                "None adapts all of them."})
    init_std: float = field(default=1.0, metadata={
        "help": "Standard deviation of the initial prompts (they stand where normalized hidden states stand)."})
    bias_scale: list[str] | str | None = field(default=None, metadata={
        "help": "V2's unlocked bias and scale: modules (patterns as target_modules; nn.Linear, or "
                "nn.MultiheadAttention for its out_proj) whose output y becomes s * (y + b) with a learnable "
                "per-output-channel scale s (init 1) and bias b (init 0). Norms: train_norms=True."})
    visual_dim: int | None = field(default=None, metadata={
        "help": "D_vis: feature size of the visual tokens for early fusion; None: a text-only adapter."})
    visual_layers: int = field(default=1, metadata={
        "help": "Early fusion: the visual tokens (projected to D) are added to the prompts of the first "
                "visual_layers adapted attention modules only (model order); later ones stay text-only."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.bias_scale, tuple):
            self.bias_scale = list(self.bias_scale)
        elif self.bias_scale is not None and not isinstance(self.bias_scale, str | list):
            raise TypeError(f"LlamaAdapterConfig.bias_scale: expected a string or a list of strings, "
                            f"got {type(self.bias_scale).__name__}")
        check_positive(self, "num_prompts")
        check_positive(self, "num_layers", allow_none=True)
        check_positive(self, "init_std")
        check_positive(self, "visual_dim", allow_none=True)
        check_positive(self, "visual_layers")
        if self.gate:
            raise ValueError("LlamaAdapterConfig.gate: the adaptation prompts always carry their own zero-init "
                             "per-head gates; leave gate=False")

    @classmethod
    def v2(cls, bias_scale: list[str] | str, **kwargs) -> LlamaAdapterConfig:
        """LLaMA-Adapter V2's unlocking: prompts plus bias/scale on the ``bias_scale`` Linears and norm deltas
        (``train_norms=True``); add ``visual_dim=...`` for early fusion."""
        return cls(bias_scale=bias_scale, **{"train_norms": True, **kwargs})


# -- early fusion ------------------------------------------------------------------------------------------

class VisualProjection(nn.Module):
    """The trainable ``D_vis -> D`` projection of one adapter, shared by its early layers.

    ``tokens`` (a plain attribute, not state) holds the visual tokens of the current batch, set by
    :func:`set_visual_tokens`."""

    def __init__(self, visual_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(visual_dim, dim)
        self.tokens: Tensor | None = None

    def projected(self, dtype: torch.dtype) -> Tensor | None:
        """(B, V, D) projected visual tokens, or None when none are set."""
        if self.tokens is None:
            return None
        w = self.proj.weight
        return self.proj(self.tokens.to(device=w.device, dtype=w.dtype)).to(dtype)


def _visual_projections(model: nn.Module, adapter: str | None) -> dict[str, VisualProjection]:
    from ..model import get_config, state_of
    from ..targets import SHARED_ATTR

    state = state_of(model)
    names = [adapter] if adapter is not None else list(state.configs)
    found: dict[str, VisualProjection] = {}
    for name in names:
        config = get_config(model, name)
        if not isinstance(config, LlamaAdapterConfig) or config.visual_dim is None:
            if adapter is not None:
                raise ValueError(f"adapter {name!r} has no early fusion (it needs a LlamaAdapterConfig with visual_dim set)")
            continue
        key = state.shared[name][VISUAL_ALIAS]
        found[name] = model._modules[SHARED_ATTR][key]
    if not found:
        raise ValueError("set_visual_tokens: no adapter on this model takes visual tokens (add one with "
                         "LlamaAdapterConfig(visual_dim=...))")
    return found


def set_visual_tokens(model: nn.Module, tokens: Tensor | None, adapter: str | None = None) -> None:
    """Feed the visual tokens of the next forward passes to the early layers' prompts.

    ``tokens``: ``(B, D_vis)`` (one global image feature per sample) or ``(B, V, D_vis)`` with ``V`` equal
    to 1 or ``num_prompts``; sample ``b`` of the batch gets ``tokens[b]``. ``None`` clears them (text-only).
    ``adapter``: one adapter's name; by default every LLaMA-Adapter adapter of ``model`` with early fusion."""
    for name, fusion in _visual_projections(model, adapter).items():
        if tokens is not None:
            config: LlamaAdapterConfig = _config(model, name)
            if tokens.dim() not in (2, 3) or tokens.shape[-1] != config.visual_dim:
                raise ValueError(f"set_visual_tokens: adapter {name!r} expects tokens (B, V, {config.visual_dim}) "
                                 f"or (B, {config.visual_dim}), got shape {tuple(tokens.shape)}")
            if tokens.dim() == 2:
                tokens = tokens.unsqueeze(1)
            if tokens.shape[1] not in (1, config.num_prompts):
                raise ValueError(f"set_visual_tokens: adapter {name!r} adds the visual tokens to its "
                                 f"{config.num_prompts} prompts: expected V = 1 or {config.num_prompts}, got "
                                 f"V = {tokens.shape[1]} (shape {tuple(tokens.shape)})")
        fusion.tokens = tokens


def _config(model: nn.Module, name: str) -> LlamaAdapterConfig:
    from ..model import get_config

    return get_config(model, name)  # type: ignore[return-value]


def clear_visual_tokens(model: nn.Module, adapter: str | None = None) -> None:
    """Back to text-only prompts (same as ``set_visual_tokens(model, None, adapter)``)."""
    set_visual_tokens(model, None, adapter)


@contextmanager
def visual_tokens(model: nn.Module, tokens: Tensor, adapter: str | None = None) -> Iterator[None]:
    """``with visual_tokens(model, tokens): model(text)`` — the tokens apply inside the block only
    (the previous ones are restored on exit). Shapes as in :func:`set_visual_tokens`."""
    fusions = _visual_projections(model, adapter)
    previous = {name: f.tokens for name, f in fusions.items()}
    set_visual_tokens(model, tokens, adapter)
    try:
        yield
    finally:
        for name, fusion in fusions.items():
            fusion.tokens = previous[name]


# -- units -------------------------------------------------------------------------------------------------

class AdaptionPrompt(AdapterUnit):
    """Zero-init gated attention of a module's queries over ``P`` learnable prompts.

    ``prompts``: (P, D_kv) in the attention's key/value input space; ``prompt_gate``: (H,) zeros."""

    kind = "parallel"

    def __init__(self, base: nn.Module, config: LlamaAdapterConfig, visual: VisualProjection | None):
        super().__init__(gate=False)
        self.flavor = "mha" if isinstance(base, nn.MultiheadAttention) else "qkvo"
        heads = base.num_heads if self.flavor == "mha" else base.n_heads
        prompt_dim = _prompt_dim(base)
        # Not registered as submodules: the base belongs to the model, the projection to mma_shared.
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_visual", visual)
        self.prompts = nn.Parameter(torch.randn(config.num_prompts, prompt_dim) * config.init_std)
        self.prompt_gate = nn.Parameter(torch.zeros(heads))

    @property
    def fused(self) -> bool:
        """Whether this unit is an early layer that receives visual tokens."""
        return self._visual is not None

    def effective_prompts(self, batch: int, dtype: torch.dtype) -> Tensor:
        """(1 or B, P, D) prompts: with visual tokens set on an early layer, ``prompts + proj(tokens)``."""
        p = self.prompts.to(dtype).unsqueeze(0)
        vis = self._visual.projected(dtype) if self._visual is not None else None
        if vis is None:
            return p
        if vis.shape[0] != batch:
            raise ValueError(f"LLaMA-Adapter early fusion: the visual tokens are for a batch of {vis.shape[0]}, "
                             f"this forward has {batch} samples (set_visual_tokens with one row per sample)")
        return p + vis

    def change(self, x: Tensor, h: Tensor) -> Tensor:
        return self._mha_change(x) if self.flavor == "mha" else self._qkvo_change(x)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return h + self.change(x, h).to(h.dtype)

    def _prompt_attention(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """q (B, H, L, d), k/v (1|B, H, P, d) -> gated (B, H, L, d); softmax over the prompts alone."""
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        attn = scores.softmax(dim=-1).to(v.dtype)
        return torch.matmul(attn, v) * self.prompt_gate.to(v.dtype).view(1, -1, 1, 1)

    def _mha_change(self, x: Tensor) -> Tensor:
        m: nn.MultiheadAttention = self._base
        unbatched = x.dim() == 2
        q_in = x.unsqueeze(0) if unbatched else (x if m.batch_first else x.transpose(0, 1))  # (B, L, E)
        b, length, e = q_in.shape
        heads, d = m.num_heads, m.head_dim
        if m._qkv_same_embed_dim:
            wq, wk, wv = m.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        bq, bk, bv = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None, None, None)
        prompts = self.effective_prompts(b, q_in.dtype)  # (1|B, P, E_kv)
        q = F.linear(q_in, wq.to(q_in.dtype), None if bq is None else bq.to(q_in.dtype))
        k = F.linear(prompts, wk.to(q_in.dtype), None if bk is None else bk.to(q_in.dtype))
        v = F.linear(prompts, wv.to(q_in.dtype), None if bv is None else bv.to(q_in.dtype))
        q = q.view(b, length, heads, d).transpose(1, 2)
        k = k.view(k.shape[0], -1, heads, d).transpose(1, 2)
        v = v.view(v.shape[0], -1, heads, d).transpose(1, 2)
        a = self._prompt_attention(q, k, v, 1.0 / math.sqrt(d)).transpose(1, 2).reshape(b, length, e)
        out = F.linear(a, m.out_proj.weight.to(a.dtype))  # the output projection's bias is already in h
        if unbatched:
            return out.squeeze(0)
        return out if m.batch_first else out.transpose(0, 1)

    def _qkvo_change(self, x: Tensor) -> Tensor:
        m = self._base
        b, length = x.shape[0], x.shape[1]
        heads, d = m.n_heads, m.key_value_proj_dim
        prompts = self.effective_prompts(b, x.dtype)
        q = m.q(x).view(b, length, heads, d).transpose(1, 2)
        k = m.k(prompts).view(prompts.shape[0], -1, heads, d).transpose(1, 2)
        v = m.v(prompts).view(prompts.shape[0], -1, heads, d).transpose(1, 2)
        a = self._prompt_attention(q, k, v, float(getattr(m, "scaling", 1.0))).transpose(1, 2).reshape(b, length, -1)
        # o is linear: o(a) - o(0) is W_o a with whatever (linear) adapters sit on o, and no bias twice.
        return m.o(a) - m.o(a.new_zeros(1, a.shape[-1]))


class BiasScale(AdapterUnit):
    """V2's unlocked bias and scale of one Linear: ``y -> scale * (y + bias)`` per output channel."""

    kind = "series"

    def __init__(self, out_features: int, prefix: str):
        super().__init__(gate=False)
        self.prefix = prefix  # where the Linear's parameters sit in the wrapped module ("" or "out_proj.")
        self.scale = nn.Parameter(torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return (h + self.bias.to(h.dtype)) * self.scale.to(h.dtype)

    def merge_into(self, base: nn.Module, params: dict[str, Tensor]) -> dict[str, Tensor]:
        w, b = f"{self.prefix}weight", f"{self.prefix}bias"
        if b not in params:
            raise NotMergeable("the base Linear has no bias to fold the learned bias into")
        s = self.scale.detach()
        return {**params, w: params[w] * s.to(params[w].dtype).unsqueeze(1),
                b: (params[b] + self.bias.detach().to(params[b].dtype)) * s.to(params[b].dtype)}


def _prompt_dim(module: nn.Module) -> int:
    """Width of the prompts: the attention's key/value input size."""
    if isinstance(module, nn.MultiheadAttention):
        if module.kdim != module.vdim:
            raise ValueError(f"LlamaAdapterConfig: nn.MultiheadAttention with kdim ({module.kdim}) != vdim "
                             f"({module.vdim}) is not supported (a prompt must feed both projections)")
        return module.kdim
    return module.k.in_features


def _is_qkvo_attention(module: nn.Module) -> bool:
    """An attention with separate ``q``/``k``/``v``/``o`` projections, ``n_heads`` and ``key_value_proj_dim``
    (transformers' T5Attention and its copies); scores are scaled by its ``scaling`` attribute, else 1 (T5
    folds the scale into its weights). Found by structure, not class name: the core knows no backbone."""
    return all(isinstance(getattr(module, a, None), nn.Module) for a in ("q", "k", "v", "o")) and all(
        isinstance(getattr(module, a, None), int) for a in ("n_heads", "key_value_proj_dim"))


def build(ctx: BuildContext):
    config: LlamaAdapterConfig = ctx.config
    targets = ctx.targets[-config.num_layers:] if config.num_layers is not None else ctx.targets
    for t in targets:
        if not (isinstance(t.module, nn.MultiheadAttention) or _is_qkvo_attention(t.module)):
            raise ValueError(f"LlamaAdapterConfig.target_modules: module {t.name!r} is a {type(t.module).__name__}; "
                             "adaptation prompts support nn.MultiheadAttention and attentions with q/k/v/o projections, "
                             "n_heads and key_value_proj_dim (e.g. transformers' T5Attention)")
    visual = None
    if config.visual_dim is not None:
        if config.visual_layers > len(targets):
            raise ValueError(f"LlamaAdapterConfig.visual_layers: {config.visual_layers} early layers asked for, but only "
                             f"{len(targets)} attention modules are adapted")
        early = [_prompt_dim(t.module) for t in targets[: config.visual_layers]]
        if len(set(early)) != 1:
            raise ValueError(f"LlamaAdapterConfig.visual_layers: the early layers have different widths {early}; one "
                             "projection of the visual tokens must fit all of them")
        visual = ctx.shared(VISUAL_ALIAS, lambda: VisualProjection(config.visual_dim, early[0]), True)
    for i, t in enumerate(targets):
        fused = visual if i < config.visual_layers else None
        yield t.name, "adaption_prompt", AdaptionPrompt(t.module, config, fused)
    if config.bias_scale is not None:
        from ..targets import resolve_targets

        for t in resolve_targets(ctx.model, config.bias_scale, what="LlamaAdapterConfig.bias_scale"):
            if isinstance(t.module, nn.MultiheadAttention):
                unit = BiasScale(t.module.out_proj.out_features, "out_proj.")
            elif isinstance(t.module, nn.Linear):
                unit = BiasScale(t.module.out_features, "")
            else:
                raise ValueError(f"LlamaAdapterConfig.bias_scale: module {t.name!r} is a {type(t.module).__name__}; "
                                 "expected nn.Linear or nn.MultiheadAttention")
            yield t.name, "bias_scale", unit


register_method("llama_adapter", LlamaAdapterConfig, build)
