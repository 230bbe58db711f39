"""HF-transformers CLIP folders (``config.json`` with ``model_type: "clip"``) converted once into open_clip.

:func:`mmadapters.vision.clip.load_clip` calls :func:`converted_clip_dir` for a ``local-dir:`` or
``hf-hub:`` source that is a transformers ``CLIPModel`` save; it writes an ordinary open_clip
``local-dir:`` folder (config + weights + the source's own tokenizer files, which open_clip's
``HFTokenizer`` reads with transformers' ``AutoTokenizer``) into the cache, keyed by the source files'
SHA-256, and loading then takes the one open_clip path. The weights map exactly:

=====================================================  ===============================================
transformers ``CLIPModel``                             open_clip ``CLIP``
=====================================================  ===============================================
``*.encoder.layers.i.self_attn.{q,k,v}_proj``          ``*.transformer.resblocks.i.attn.in_proj_*``
                                                       (rows stacked q, k, v)
``*.self_attn.out_proj``                               ``*.attn.out_proj``
``*.layer_norm1`` / ``layer_norm2``                    ``*.ln_1`` / ``ln_2``
``*.mlp.fc1`` / ``fc2``                                ``*.mlp.c_fc`` / ``c_proj``
``vision_model.pre_layrnorm`` / ``post_layernorm``     ``visual.ln_pre`` / ``visual.ln_post``
``vision_model.embeddings.patch_embedding``            ``visual.conv1``
``vision_model.embeddings.{class,position}_embedding`` ``visual.class_embedding`` / ``positional_embedding``
``text_model.embeddings.token_embedding``              ``token_embedding``
``text_model.embeddings.position_embedding``           ``positional_embedding``
``text_model.final_layer_norm``                        ``ln_final``
``visual_projection`` / ``text_projection`` (Linear)   ``visual.proj`` / ``text_projection`` (transposed)
``logit_scale``                                        ``logit_scale``
=====================================================  ===============================================

``hidden_act: quick_gelu`` becomes open_clip's ``quick_gelu``; the text pooling follows transformers
(the highest token id for the legacy ``eos_token_id == 2``, else the first ``eos_token_id``).
:func:`peft_translator` maps peft LoRA tensors saved on the HF model onto the converted one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

HF_CONFIG = "config.json"
# transformers' weight files, in the order transformers prefers them
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer.json",
                   "added_tokens.json")
PREPROCESSOR = "preprocessor_config.json"
_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")
_TOWER = {"text_model": "", "vision_model": "visual."}
_RENAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}
_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}


def is_hf_clip_dir(directory: Path) -> bool:
    """True when ``directory/config.json`` names ``model_type: "clip"`` (a transformers CLIPModel save)."""
    path = directory / HF_CONFIG
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") == "clip"
    except (OSError, ValueError, AttributeError):
        return False


def hub_snapshot(repo: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The local snapshot of hub repo ``repo`` when it is a transformers CLIP (no ``open_clip_config.json``,
    a ``config.json`` with model_type "clip"): its config, weights, tokenizer and preprocessor files. None
    for an open_clip repo, or when the hub cannot answer (open_clip's own loading then reports the error)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        hf_hub_download(repo, "open_clip_config.json", cache_dir=cache_dir)
        return None
    except Exception:  # not there (or no network): look for a transformers config instead
        pass
    try:
        config = Path(hf_hub_download(repo, HF_CONFIG, cache_dir=cache_dir))
    except Exception:
        return None
    if not is_hf_clip_dir(config.parent):
        return None
    small = [HF_CONFIG, PREPROCESSOR, *TOKENIZER_FILES]
    for weights in (["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"], ["pytorch_model.bin"]):
        folder = Path(snapshot_download(repo, allow_patterns=small + weights, cache_dir=cache_dir))
        if any((folder / n).is_file() for n in HF_WEIGHTS):
            return folder
    raise FileNotFoundError(f"hf-hub:{repo}: a transformers CLIP repo without weights (expected one of {list(HF_WEIGHTS)})")


def hf_clip_source_files(directory: Path) -> list[Path]:
    """The files whose bytes decide the converted model: config, weights, tokenizer and preprocessor files."""
    weights = _weight_files(directory)
    extra = [directory / n for n in (*TOKENIZER_FILES, PREPROCESSOR) if (directory / n).is_file()]
    return [directory / HF_CONFIG, *weights, *extra]


def _weight_files(directory: Path) -> list[Path]:
    for name in HF_WEIGHTS:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: expected a transformers shard index with a 'weight_map' object ({err})") from None
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{path}: shard file(s) {missing} are missing from {directory}")
            return [path, *(directory / s for s in shards)]
        return [path]
    raise FileNotFoundError(f"HF CLIP folder {directory}: no weights (expected one of {list(HF_WEIGHTS)})")


def _read_weights(directory: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    files = _weight_files(directory)
    if files[0].name == "pytorch_model.bin":
        try:
            state = torch.load(files[0], map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{files[0]}: not a tensor-only checkpoint torch.load(weights_only=True) can read "
                             f"({type(err).__name__})") from None
        return dict(state)
    state: dict[str, Tensor] = {}
    for path in files if len(files) == 1 else files[1:]:
        state.update(load_file(str(path)))
    return state


def open_clip_config(directory: Path) -> dict[str, Any]:
    """The open_clip ``open_clip_config.json`` content for the HF CLIP in ``directory``.

    Raises ValueError naming ``config.json`` and the field for a CLIP that open_clip's CLIP cannot express."""
    from transformers import CLIPConfig

    path = directory / HF_CONFIG
    try:
        cfg = CLIPConfig.from_pretrained(str(directory))
    except Exception as err:  # transformers raises several types for a malformed config
        raise ValueError(f"{path}: not a readable transformers CLIPConfig ({type(err).__name__}: {err})") from None
    t, v = cfg.text_config, cfg.vision_config
    acts = {t.hidden_act, v.hidden_act}
    if acts not in ({"quick_gelu"}, {"gelu"}):
        raise ValueError(f"{path}: fields text_config.hidden_act / vision_config.hidden_act are {t.hidden_act!r} / "
                         f"{v.hidden_act!r}; expected both 'quick_gelu' or both 'gelu'")
    for tower, sub in (("text_config", t), ("vision_config", v)):
        if sub.hidden_size % sub.num_attention_heads:
            raise ValueError(f"{path}: field {tower}.hidden_size {sub.hidden_size} is not a multiple of "
                             f"num_attention_heads {sub.num_attention_heads}")
    if getattr(v, "num_channels", 3) != 3:
        raise ValueError(f"{path}: field vision_config.num_channels is {v.num_channels}; open_clip's CLIP expects 3")
    text_cfg = {
        "context_length": t.max_position_embeddings, "vocab_size": t.vocab_size, "width": t.hidden_size,
        "heads": t.num_attention_heads, "layers": t.num_hidden_layers, "mlp_ratio": t.intermediate_size / t.hidden_size,
        "norm_kwargs": {"eps": t.layer_norm_eps},
        # transformers pools at the highest id for the legacy eos_token_id 2, else at the first eos_token_id
        "pool_type": "argmax" if t.eos_token_id == 2 else "eos", "eos_id": t.eos_token_id,
        "hf_tokenizer_name": str(directory),  # a local-dir: config makes open_clip read the folder's own tokenizer
    }
    vision_cfg = {
        "image_size": v.image_size, "patch_size": v.patch_size, "width": v.hidden_size, "layers": v.num_hidden_layers,
        "head_width": v.hidden_size // v.num_attention_heads, "mlp_ratio": v.intermediate_size / v.hidden_size,
        "norm_kwargs": {"eps": v.layer_norm_eps},
    }
    preprocess: dict[str, Any] = {}
    pre_path = directory / PREPROCESSOR
    if pre_path.is_file():
        try:
            pre = json.loads(pre_path.read_text())
        except ValueError as err:
            raise ValueError(f"{pre_path}: not valid JSON ({err})") from None
        if "image_mean" in pre and "image_std" in pre:
            preprocess = {"mean": list(pre["image_mean"]), "std": list(pre["image_std"]), "interpolation": "bicubic",
                          "resize_mode": "shortest"}
    return {"model_cfg": {"embed_dim": cfg.projection_dim, "quick_gelu": acts == {"quick_gelu"},
                          "vision_cfg": vision_cfg, "text_cfg": text_cfg},
            "preprocess_cfg": preprocess}


def convert_state_dict(hf_state: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    """transformers CLIPModel tensors -> open_clip CLIP tensors (see the module table). Every source tensor is
    used (``position_ids`` buffers aside); an unknown one raises ValueError naming it and ``source``."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str, str], dict[str, Tensor]] = {}  # (prefix, layer, weight|bias) -> q/k/v
    for key, value in hf_state.items():
        if key.endswith("embeddings.position_ids"):
            continue  # an index buffer old saves carry; open_clip derives positions itself
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif (m := _LAYER.match(key)) is not None:
            tower, layer, rest = m.groups()
            prefix = f"{_TOWER[tower]}transformer.resblocks.{layer}."
            qm = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if qm is not None:
                qkv.setdefault((prefix, layer, qm.group(2)), {})[qm.group(1)] = value
                continue
            module, _, tensor = rest.rpartition(".")
            if module not in _RENAMES:
                raise ValueError(f"{source}: tensor {key!r} has no open_clip counterpart")
            out[prefix + _RENAMES[module] + "." + tensor] = value
        else:
            raise ValueError(f"{source}: tensor {key!r} has no open_clip counterpart")
    for (prefix, layer, tensor), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{source}: layer {prefix}{layer}: expected q_proj, k_proj and v_proj {tensor}s, "
                             f"found {sorted(parts)}")
        out[f"{prefix}attn.in_proj_{tensor}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def converted_clip_dir(source: Path, digest: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The open_clip ``local-dir:`` folder converted from HF CLIP folder ``source`` (files hashing to ``digest``),
    built on first use under ``<cache>/hf_clip/<digest>`` and reused afterwards. The folder appears atomically
    (built in a temporary sibling, then renamed), so a crashed or concurrent conversion never leaves half a folder."""
    from open_clip import CLIP
    from safetensors.torch import save_file

    root = Path(cache_dir) if cache_dir else Path(os.environ.get("MMADAPTERS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mmadapters"))
    target = root / "hf_clip" / digest
    if (target / "open_clip_config.json").is_file():
        return target
    config = open_clip_config(source)
    state = convert_state_dict(_read_weights(source), _weight_files(source)[0])
    model = CLIP(**config["model_cfg"])
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{source}: the weights do not fit the CLIP that {HF_CONFIG} describes; missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", dir=target.parent))
    try:
        config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = str(target)
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "open_clip_model.safetensors"))
        copied = [n for n in TOKENIZER_FILES if (source / n).is_file()]
        if "tokenizer_config.json" not in copied:
            raise FileNotFoundError(f"HF CLIP folder {source}: no tokenizer (expected tokenizer_config.json with "
                                    "vocab.json and merges.txt, as CLIPTokenizer.save_pretrained writes)")
        for name in copied:
            shutil.copyfile(source / name, tmp / name)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "open_clip_config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- peft LoRA saved on the HF model ---------------------------------------------------------------------------

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?:[\w.]*?)?(text_model|vision_model)\.encoder\.layers\.(\d+)\."
                       r"(self_attn\.[qkvo]\w*_proj|mlp\.fc[12])\.(lora_[AB])\.weight$")
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


def peft_translator(tensors: dict[str, Tensor], source: Path) -> tuple[dict[str, Tensor], int] | None:
    """peft LoRA tensors saved on a transformers CLIP -> the same LoRA in this converted open_clip's peft layout.

    Returns ``(tensors, rank)`` or None when no key names an HF CLIP module (a LoRA saved on the open_clip
    model itself). The q/k/v LoRAs of one layer become one ``in_proj`` LoRA of the summed rank: A stacked
    ``(r_q + r_k + r_v, E)``, B ``(3E, r_q + r_k + r_v)`` with B_q in the q rows, B_v in the v rows, zeros
    elsewhere. ``out_proj``, ``fc1`` and ``fc2`` keep their factors. Every unit is then zero-padded to the
    largest rank (exact: the padding adds nothing), the one rank of the returned adapter."""
    if not any(_PEFT_KEY.match(k) for k in tensors):
        return None
    pairs: dict[tuple[str, str], dict[str, Tensor]] = {}  # (our module path, hf module) -> lora_A/lora_B
    for key, value in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ValueError(f"{source}: tensor {key!r} adapts a module of the HF CLIP that has no open_clip module "
                             "counterpart (supported: self_attn q/k/v/out_proj, mlp fc1/fc2 of the encoder layers)")
        tower, layer, module, factor = m.groups()
        if module not in (*_QKV, "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            raise ValueError(f"{source}: tensor {key!r}: module {module!r} is not a CLIP encoder projection")
        pairs.setdefault((f"{_TOWER[tower]}transformer.resblocks.{layer}", module), {})[factor] = value
    units: dict[str, tuple[Tensor, Tensor]] = {}  # our peft key stem -> (A, B)
    in_proj: dict[str, list[tuple[int, Tensor, Tensor]]] = {}
    for (path, module), ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{source}: module {path} ({module}) has {sorted(ab)}, expected lora_A and lora_B")
        if module in _QKV:
            in_proj.setdefault(path, []).append((_QKV[module], ab["lora_A"], ab["lora_B"]))
        elif module == "self_attn.out_proj":
            units[f"{path}.attn.base_layer.out_proj"] = (ab["lora_A"], ab["lora_B"])
        else:
            units[f"{path}.{_RENAMES[module]}"] = (ab["lora_A"], ab["lora_B"])
    for path, parts in in_proj.items():
        width = parts[0][1].shape[1]
        a = torch.cat([p[1] for p in sorted(parts, key=lambda p: p[0])], dim=0)
        b = a.new_zeros(3 * width, a.shape[0])
        col = 0
        for index, _a, b_part in sorted(parts, key=lambda p: p[0]):
            b[index * width:(index + 1) * width, col:col + b_part.shape[1]] = b_part
            col += b_part.shape[1]
        units[f"{path}.attn"] = (a, b)
    rank = max(a.shape[0] for a, _ in units.values())
    out: dict[str, Tensor] = {}
    for stem, (a, b) in units.items():
        pad = rank - a.shape[0]
        out[f"{stem}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a
        out[f"{stem}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1) if pad else b
    return out, rank
