"""Tiny models for the core's test matrix (peft's custom-model tests are the pattern)."""

from __future__ import annotations

import torch
from torch import nn

import mmadapters as mma
from mmadapters.demo import TinyTransformer


class MLP(nn.Module):
    def __init__(self, width: int = 20):
        super().__init__()
        self.fc1 = nn.Linear(10, width)
        self.norm = nn.LayerNorm(width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, 8)
        mma.declare_adapter_points(self, {"attn_out": "fc1", "ffn_out": "fc2"})

    def forward(self, x):
        return self.fc2(self.act(self.norm(self.fc1(x))))


class ConvNet(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, 4)
        mma.declare_adapter_points(self, {"attn_out": "conv1", "ffn_out": "conv2"})

    def forward(self, x):
        h = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.head(self.pool(h).flatten(1))


def make_toy(kind: str, width: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        model = MLP(width or 20)
    elif kind == "conv":
        model = ConvNet(width or 8)
    elif kind == "transformer":
        model = TinyTransformer(vocab=16, dim=width or 16, depth=2, heads=2)
    else:
        raise ValueError(kind)
    return model.eval()


def toy_input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return torch.randn(4, 10, generator=g)
    if kind == "conv":
        return torch.randn(2, 3, 6, 6, generator=g)
    return torch.randint(0, 16, (3, 7), generator=g)


# Targets per (toy, method family): LoRA needs layers it knows; adapters go to the adapter points.
LORA_TARGETS = {"mlp": ["fc1", "fc2"], "conv": ["conv1", "conv2"], "transformer": ["@attn", "mlp.fc1", "embed"]}
POINT_TARGETS = {"mlp": ["@attn_out", "@ffn_out"], "conv": ["@attn_out", "@ffn_out"],
                 "transformer": ["@attn_out", "@ffn_out"]}
