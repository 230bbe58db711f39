"""ViT backbones through timm's factory, with adapter points on every block.

``load_vit("vit_base_patch16_224", pretrained=True)`` downloads timm's weights when online;
``load_vit(name, weights=FILE_OR_DIR)`` loads local weights strictly: every tensor of the model comes from
the file and every tensor of the file is used (only the classifier is left out when ``num_classes``
asks for another head; timm's own pretrained path relaxes the whole check then, which let a
wrong-format file load as random weights). Two formats load:

- timm state dicts (``.safetensors`` or a tensor-only torch checkpoint), through the model's own
  ``checkpoint_filter_fn`` (position embedding resizing and the like);
- transformers ``ViTModel`` / ``ViTForImageClassification`` saves (google/vit-*: a folder with
  ``config.json`` + ``model.safetensors``, or the weights file), converted exactly: query/key/value
  merged into ``qkv``; ``attention.output.dense`` -> ``attn.proj``; ``intermediate.dense`` /
  ``output.dense`` -> ``mlp.fc1`` / ``fc2``; ``layernorm_before`` / ``_after`` -> ``norm1`` / ``norm2``;
  ``layernorm`` -> ``norm``; ``classifier`` -> ``head``. The model's LayerNorms take the config's
  ``layer_norm_eps`` (transformers' default 1e-12 without a config.json). ``ViTModel``'s tanh ``pooler``
  is a head timm has not, so it is dropped like a classifier.

Any other file raises a ValueError naming the file and the keys that do not fit.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

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
    """Create timm model ``name``; ``weights`` is a local timm checkpoint or a transformers ViT save (see the
    module docstring), loaded strictly. ``kwargs`` go to ``timm.create_model`` (``num_classes``,
    ``img_size``, ...). With neither ``weights`` nor ``pretrained`` the model is randomly initialized."""
    import timm
    from timm.data import create_transform, resolve_data_config

    from .clip import _file_sha256

    digest = state = path = None
    if weights is not None:
        path, state, eps = _read_weights(Path(weights))
        digest = _file_sha256(path)
        if eps is not None:  # a transformers ViT: its LayerNorm epsilon, for an exact conversion
            kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=eps))
        if pretrained:
            raise ValueError(f"load_vit({name!r}): give weights= or pretrained=True, not both")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"ViT {name!r} is not a timm model name (see timm.list_models('vit*'))") from e
        raise
    if state is not None:
        _load_strict(model, state, path)
    model.eval().to(device)
    if declare_points:
        declare_vit_points(model)
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    source = str(path) if path is not None else (f"timm:{name}" if pretrained else None)
    return VitBundle(model, transform, name, source, digest)


def _read_weights(weights: Path) -> tuple[Path, dict[str, Tensor], float | None]:
    """(the weights file, its tensors in timm's naming, the LayerNorm eps of a transformers ViT or None)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = weights if weights.is_dir() else weights.parent
    if weights.is_dir():
        found = [weights / n for n in ("model.safetensors", "pytorch_model.bin") if (weights / n).is_file()]
        if not found:
            raise FileNotFoundError(f"ViT weights folder {weights}: expected model.safetensors or pytorch_model.bin")
        weights = found[0]
    if not weights.is_file():
        raise FileNotFoundError(f"ViT weights file not found: {weights}")
    try:
        if weights.suffix == ".safetensors":
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError) as err:
        raise ValueError(f"ViT weights {weights}: not a safetensors file or a tensor-only torch checkpoint "
                         f"({type(err).__name__}: {err})") from None
    except Exception as err:  # torch.load(weights_only=True) refusing pickled objects
        raise ValueError(f"ViT weights {weights}: holds pickled Python objects, which mmadapters never unpickles "
                         f"({type(err).__name__})") from None
    for key in ("state_dict", "model"):  # timm's training checkpoints wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"ViT weights {weights}: expected a dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(_HF_LAYER.match(k) for k in state):
        return weights, state, None
    eps = 1e-12  # transformers' ViTConfig default
    config = directory / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
        except ValueError as err:
            raise ValueError(f"{config}: not valid JSON ({err})") from None
        if cfg.get("model_type") not in (None, "vit"):
            raise ValueError(f"{config}: field 'model_type' is {cfg['model_type']!r}; a transformers ViT has 'vit'")
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{config}: field 'hidden_act' is {cfg['hidden_act']!r}; timm's ViT uses exact 'gelu'")
        eps = float(cfg.get("layer_norm_eps", eps))
    return weights, hf_vit_to_timm(state, weights), eps


_HF_LAYER = re.compile(r"^(?:vit\.)?encoder\.layer\.(\d+)\.(.+)$")
_HF_RENAMES = {"attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
               "layernorm_before": "norm1", "layernorm_after": "norm2"}
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
           "classifier.weight": "head.weight", "classifier.bias": "head.bias"}


def hf_vit_to_timm(state: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    """transformers ViT tensors -> timm VisionTransformer tensors (see the module docstring). An unknown key
    raises ValueError naming it and ``source``; ``pooler.*`` (a head timm has not) is dropped."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        body = key.removeprefix("vit.")
        if body.startswith("pooler."):
            continue
        if body in _HF_TOP:
            out[_HF_TOP[body]] = value
        elif (m := _HF_LAYER.match(key)) is not None:
            layer, rest = m.groups()
            qm = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
            module, _, tensor = rest.rpartition(".")
            if qm is not None:
                qkv.setdefault((layer, qm.group(2)), {})[qm.group(1)] = value
            elif module in _HF_RENAMES:
                out[f"blocks.{layer}.{_HF_RENAMES[module]}.{tensor}"] = value
            else:
                raise ValueError(f"ViT weights {source}: tensor {key!r} has no timm ViT counterpart")
        else:
            raise ValueError(f"ViT weights {source}: tensor {key!r} has no timm ViT counterpart")
    for (layer, tensor), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"ViT weights {source}: layer {layer} has attention {tensor}s {sorted(parts)}, "
                             "expected query, key and value")
        out[f"blocks.{layer}.attn.qkv.{tensor}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def _load_strict(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Load ``state`` into ``model`` with every key accounted for; only a classifier ``head`` that the file
    lacks or whose shape the requested ``num_classes`` changed is left out (the new head keeps its fresh
    initialization)."""
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    head = [k for k in state if k.startswith("head.") and (k not in own or own[k].shape != state[k].shape)]
    state = {k: v for k, v in state.items() if k not in head}
    fresh_head = bool(head) or not any(k.startswith("head.") for k in state)  # no usable classifier in the file
    missing = sorted(set(own) - set(state) - ({k for k in own if k.startswith("head.")} if fresh_head else set()))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"ViT weights {source}: do not fit timm model {type(model).__name__} "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}; "
            f"{len(wrong)} of another shape, e.g. {wrong[:3]}). Expected a timm state dict for this model name "
            "or a transformers ViT save (google/vit-*) of the same size")
    model.load_state_dict(state, strict=False)


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
