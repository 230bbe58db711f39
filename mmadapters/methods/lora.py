"""LoRA (Hu et al. 2021): ``W + (alpha / r) * B A`` with ``B`` zero-initialized.

Layers: ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding`` (activation path: the change is computed
from the input, which is also what per-sample routing needs) and ``nn.MultiheadAttention`` (weight path:
the attention reads its packed ``in_proj_weight`` and ``out_proj.weight`` directly, so the deltas are
added to those weights). Parameter names follow peft: ``lora_A``, ``lora_B``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig, check_positive, register_method, target_modules_field
from ..units import AdapterUnit
from ._common import BuildContext, init_last_layer


@dataclass
class LoRAConfig(AdapterConfig):
    r: int = field(default=8, metadata={"help": "Rank of the update B A."})
    alpha: float = field(default=8.0, metadata={"help": "Scale numerator: the update is (alpha / r) B A."})
    dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the LoRA branch input (Linear, Conv). Not applied inside nn.MultiheadAttention, "
                "where LoRA edits the weights."})
    target_modules: list[str] | str | None = target_modules_field()
    rslora: bool = field(default=False, metadata={"help": "Rank-stabilized scaling alpha / sqrt(r) (Kalajdzievski 2023)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "r")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout: expected a value in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALinear(AdapterUnit):
    kind = "parallel"

    def __init__(self, base: nn.Linear, config: LoRAConfig):
        super().__init__(gate=config.gate)
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, config.r, bias=False)
        self.lora_B = nn.Linear(config.r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        init_last_layer(self.lora_B, zero=not config.gate)

    def change(self, x: Tensor, h: Tensor) -> Tensor:
        return self.lora_B(self.lora_A(self.dropout(x)) * self.scaling)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        # Scale (and gate) the rank-r activations, not the output, and let the GEMM add into h: no
        # extra passes over the (..., out) tensor, which dominate LoRA's cost on memory-bound devices.
        t = self.gated(self.lora_A(self.dropout(x)) * self.scaling)
        out = torch.addmm(h.reshape(-1, h.shape[-1]), t.reshape(-1, t.shape[-1]).to(h.dtype), self.lora_B.weight.t().to(h.dtype))
        return out.view(h.shape)

    def delta_weight(self) -> Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge_into(self, base, params):
        return {**params, "weight": params["weight"] + self.gated(self.delta_weight()).to(params["weight"].dtype)}

    # per-sample routing: x (B, ..., in) -> (B, ..., out) through gathered A (B, r, in) and B (B, out, r)
    route_pad = {"A": 0, "B": 1}

    def route_group(self):
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        return ("lora_linear", self.lora_A.in_features, self.lora_B.out_features, p)

    def route_tensors(self):
        return {"A": self.lora_A.weight, "B": self.gated(self.lora_B.weight * self.scaling)}

    def routed_change(self, x, h, pool, idx):
        return self.routed_apply(x, torch.zeros_like(h), pool, idx)

    def routed_apply(self, x, h, pool, idx):
        xb = self.dropout(x.reshape(x.shape[0], -1, x.shape[-1]))
        t = torch.bmm(xb, pool["A"][idx].to(xb.dtype).transpose(1, 2))  # (B, L, r)
        hb = h.reshape(h.shape[0], -1, h.shape[-1])
        return torch.baddbmm(hb, t, pool["B"][idx].to(xb.dtype).transpose(1, 2)).view(h.shape)


class LoRAConv(AdapterUnit):
    """A: a conv with the base's kernel, stride and padding into r channels; B: a 1x1 conv to the output."""

    kind = "parallel"

    def __init__(self, base: nn.modules.conv._ConvNd, config: LoRAConfig):
        super().__init__(gate=config.gate)
        if base.groups != 1:
            raise ValueError(f"LoRAConfig: grouped convolutions (groups={base.groups}) are not supported")
        conv = type(base)
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.lora_A = conv(base.in_channels, config.r, base.kernel_size, base.stride, base.padding,
                           base.dilation, bias=False, padding_mode=base.padding_mode)
        self.lora_B = conv(config.r, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        init_last_layer(self.lora_B, zero=not config.gate)

    def change(self, x: Tensor, h: Tensor) -> Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> Tensor:
        b = self.lora_B.weight.flatten(1)  # (out, r)
        return torch.einsum("or,r...->o...", b, self.lora_A.weight) * self.scaling

    def merge_into(self, base, params):
        return {**params, "weight": params["weight"] + self.gated(self.delta_weight()).to(params["weight"].dtype)}


class LoRAEmbedding(AdapterUnit):
    """``lora_A``: (r, num_embeddings), ``lora_B``: (embedding_dim, r), as peft stores them."""

    kind = "parallel"

    def __init__(self, base: nn.Embedding, config: LoRAConfig):
        super().__init__(gate=config.gate)
        self.scaling = config.scaling
        self.padding_idx = base.padding_idx
        self.lora_A = nn.Parameter(torch.empty(config.r, base.num_embeddings))
        self.lora_B = nn.Parameter(torch.empty(base.embedding_dim, config.r))
        nn.init.normal_(self.lora_A)
        if config.gate:
            nn.init.normal_(self.lora_B, std=1.0 / math.sqrt(config.r))
        else:
            nn.init.zeros_(self.lora_B)

    def change(self, x: Tensor, h: Tensor) -> Tensor:
        return F.embedding(x, self.lora_A.T, padding_idx=self.padding_idx) @ self.lora_B.T * self.scaling

    def merge_into(self, base, params):
        delta = (self.lora_B @ self.lora_A).T * self.scaling
        return {**params, "weight": params["weight"] + self.gated(delta).to(params["weight"].dtype)}

    # per-sample routing: rows of A are looked up per token from the sample's slot, never gathered whole
    route_pad = {"A": 1, "B": 1}

    def route_group(self):
        return ("lora_embedding", self.lora_A.shape[1], self.lora_B.shape[0])

    def route_tensors(self):
        return {"A": self.lora_A.T, "B": self.gated(self.lora_B * self.scaling)}

    def routed_change(self, x, h, pool, idx):
        rows = pool["A"][idx.view(-1, *[1] * (x.dim() - 1)), x]  # (B, ..., r)
        rows = rows.reshape(x.shape[0], -1, rows.shape[-1]).to(h.dtype)
        return torch.bmm(rows, pool["B"][idx].to(h.dtype).transpose(1, 2)).reshape(h.shape)


class _LoRAPair(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, r: int, zero_b: bool):
        super().__init__()
        self.lora_A = nn.Linear(in_dim, r, bias=False)
        self.lora_B = nn.Linear(r, out_dim, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        init_last_layer(self.lora_B, zero=zero_b)

    def delta(self) -> Tensor:
        return self.lora_B.weight @ self.lora_A.weight


class LoRAMultiheadAttention(AdapterUnit):
    """LoRA on the packed q/k/v projection (``in_proj``) and/or ``out_proj`` of nn.MultiheadAttention."""

    kind = "weight"

    def __init__(self, base: nn.MultiheadAttention, config: LoRAConfig, parts: set[str]):
        super().__init__(gate=config.gate)
        if "in_proj" in parts and not base._qkv_same_embed_dim:
            raise ValueError("LoRAConfig: nn.MultiheadAttention with kdim/vdim != embed_dim is not supported "
                             "(its q/k/v weights are separate); target its out_proj only")
        e = base.embed_dim
        self.scaling = config.scaling
        self.in_proj = _LoRAPair(e, 3 * e, config.r, not config.gate) if "in_proj" in parts else None
        self.out_proj = _LoRAPair(e, e, config.r, not config.gate) if "out_proj" in parts else None

    def delta_params(self) -> dict[str, Tensor]:
        out = {}
        if self.in_proj is not None:
            out["in_proj_weight"] = self.in_proj.delta() * self.scaling
        if self.out_proj is not None:
            out["out_proj.weight"] = self.out_proj.delta() * self.scaling
        return out

    # per-sample routing: the wrapper runs the attention itself (mmadapters.routing.routed_mha) with
    # per-sample low-rank terms on the packed projection and out_proj; a missing part is stacked as zeros
    route_pad = {"in_A": 0, "in_B": 1, "out_A": 0, "out_B": 1}

    def route_group(self):
        pair = self.in_proj or self.out_proj
        return ("lora_mha", pair.lora_A.in_features)

    def route_tensors(self):
        out = {}
        for part, rows in (("in", 3), ("out", 1)):
            pair = self.in_proj if part == "in" else self.out_proj
            if pair is None:
                ref = (self.in_proj or self.out_proj).lora_A.weight
                e = ref.shape[1]
                out[f"{part}_A"] = ref.new_zeros(1, e)
                out[f"{part}_B"] = ref.new_zeros(rows * e, 1)
            else:
                out[f"{part}_A"] = pair.lora_A.weight
                out[f"{part}_B"] = self.gated(pair.lora_B.weight * self.scaling)
        return out


def build(ctx: BuildContext):
    config: LoRAConfig = ctx.config
    for target in ctx.targets:
        module = target.module
        if isinstance(module, nn.MultiheadAttention):
            unit = LoRAMultiheadAttention(module, config, target.parts)
        elif isinstance(module, nn.Linear):
            unit = LoRALinear(module, config)
        elif isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
            unit = LoRAConv(module, config)
        elif isinstance(module, nn.Embedding):
            unit = LoRAEmbedding(module, config)
        else:
            raise ValueError(
                f"LoRAConfig: module {target.name!r} is a {type(module).__name__}; LoRA supports nn.Linear, "
                "nn.Conv1d/2d/3d, nn.Embedding and nn.MultiheadAttention"
            )
        yield target.name, "lora", unit


register_method("lora", LoRAConfig, build)
