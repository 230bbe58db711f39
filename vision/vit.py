"""ViT backbones through timm's factory, with adapter points on every block.

``load_vit("vit_base_patch16_224", pretrained=True)`` downloads timm's weights when online;
``load_vit(name, weights="model.safetensors")`` loads a local file through timm's own path
(``pretrained_cfg_overlay=dict(file=...)``), so timm's checkpoint filtering/resizing still applies.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mmadapters as mma


@dataclass
class VitBundle:
    """A loaded timm ViT (eval mode), its eval transform and what identifies its weights."""

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> (3, H, W)
    name: str
    weights: str | None  # "timm:<tag>", a local file path, or None (random init)
    weights_sha256: str | None = None


def load_vit(name: str, *, weights: str | os.PathLike | None = None, pretrained: bool = False,
             device: str | torch.device = "cpu", declare_points: bool = True, **kwargs: Any) -> VitBundle:
    """Create timm model ``name``; ``weights`` is a local checkpoint (``.safetensors`` or a torch file).

    ``kwargs`` go to ``timm.create_model`` (``num_classes``, ``img_size``, ...). With neither ``weights``
    nor ``pretrained`` the model is randomly initialized.
    """
    import timm
    from timm.data import create_transform, resolve_data_config

    digest = None
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"ViT weights file not found: {path}")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": str(path)}
        pretrained = True
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"ViT {name!r} is not a timm model name (see timm.list_models('vit*'))") from e
        raise
    model.eval().to(device)
    if declare_points:
        declare_vit_points(model)
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    source = str(weights) if weights is not None else (f"timm:{name}" if pretrained else None)
    return VitBundle(model, transform, name, source, digest)


def vit_points(model: nn.Module) -> dict[str, mma.AdapterPoint]:
    """The adapter points of a timm ViT's ``blocks`` (patterns relative to ``model``); see :func:`declare_vit_points`."""
    blocks = getattr(model, "blocks", None)
    first = next(iter(blocks.children()), None) if blocks is not None else None
    if first is None or not hasattr(first, "attn") or not hasattr(first, "mlp"):
        raise ValueError(f"{type(model).__name__}: expected a timm ViT with .blocks[i].attn and .mlp")
    width = first.mlp.fc2.out_features
    return {
        "attn_out": mma.AdapterPoint("blocks.*.attn.proj", doc="attention output projection of each block"),
        "ffn_out": mma.AdapterPoint("blocks.*.mlp.fc2", doc="MLP output of each block"),
        "qkv": mma.AdapterPoint("blocks.*.attn.qkv", doc="fused query/key/value projection (LoRA)"),
        "fc1": mma.AdapterPoint("blocks.*.mlp.fc1", doc="first MLP projection (LoRA)"),
        "attn": mma.AdapterPoint(["blocks.*.attn.qkv", "blocks.*.attn.proj"], doc="attention linears (LoRA)"),
        "block": mma.AdapterPoint("re:blocks\\.\\d+", dim=width, doc="whole block output (B, T, D)"),
    }


def declare_vit_points(model: nn.Module) -> nn.Module:
    """Declare points on a timm ViT's ``blocks``. Returns ``model``.

    ``attn_out`` (each block's attention output projection), ``ffn_out`` (MLP output ``fc2``), ``qkv``
    and ``fc1`` (linears for LoRA), ``attn`` (``qkv`` and ``proj`` together, for LoRA) and ``block``
    (the whole block's output, width declared).
    """
    return mma.declare_adapter_points(model, vit_points(model))
