"""peft interop for LoRA: write and read peft's on-disk LoRA format (checked against peft 0.21.2).

A peft LoRA directory holds ``adapter_config.json`` (the fields of peft's ``LoraConfig``) and
``adapter_model.safetensors`` (or, from old saves, a pickled ``adapter_model.bin``). Tensors are keyed
``base_model.model.<module path>.<tensor>``, where the module path is the module's name in the plain
base model, and ``<tensor>`` depends on the layer (peft's shapes are ours):

===========================  ==========================================================================
layer                        tensors under the module path
===========================  ==========================================================================
nn.Linear                    ``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r)
nn.Conv1d/2d/3d              ``lora_A.weight`` (r, in, *kernel), ``lora_B.weight`` (out, r, 1, ...)
nn.Embedding                 ``lora_embedding_A`` (r, num_embeddings), ``lora_embedding_B`` (dim, r)
nn.MultiheadAttention        in_proj: ``lora_A.weight`` (r, E), ``lora_B.weight`` (3E, r);
                             out_proj: ``base_layer.out_proj.lora_A.weight`` (r, E),
                             ``base_layer.out_proj.lora_B.weight`` (E, r)
===========================  ==========================================================================

Both libraries compute ``h + s * B A x`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with rslora), so the
tensors carry over unchanged. Deliberate choices:

- a LoRA trained with ``gate=True`` exports with its gate folded into ``lora_B`` (same outputs; peft has
  no gate);
- peft's per-module ``rank_pattern`` / ``alpha_pattern`` are refused on import (one LoRAConfig has one
  rank and one alpha) unless every entry repeats the global value;
- unknown config fields (from a newer peft) are ignored with a warning; known fields that change the
  math (DoRA, biases, other LoRA variants, base-rewriting initializations) are refused by name;
- peft's nn.MultiheadAttention layer (every release up to at least 0.21.2) adds the out_proj delta twice
  in its forward and in merges (``W_out + 2 s B A``; huggingface/peft PR #3774 fixes it). Files follow
  the peft that reads or wrote them: export writes the out_proj ``lora_B`` halved for such a peft
  (``peft_version``, default :data:`PEFT_VERSION`), and import doubles it for files whose
  ``peft_version`` is such a peft, so outputs match peft's both ways and export -> import is exact.
  When a peft release carries the fix, set :data:`PEFT_MHA_FIX_VERSION` to it.

A backbone converted from another library (a transformers CLIP loaded as open_clip) carries a translator
(:func:`set_peft_translator`) that re-keys LoRAs saved on the original model onto its own modules.

peft itself is not needed at run time: the format is plain JSON + safetensors.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from .io import atomic_write_bytes, read_json_object
from .methods.lora import LoRAConfig, LoRAConv, LoRAEmbedding, LoRALinear, LoRAMultiheadAttention
from .model import add_adapter, delete_adapter, get_config, wrappers
from .targets import Target, iter_logical_modules, resolve_targets

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
MHA_OUT = ".base_layer.out_proj"  # where peft keys the out_proj LoRA of an nn.MultiheadAttention

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

PEFT_VERSION = "0.21.2"  # the peft release this module was checked against; export's default target
PEFT_MHA_FIX_VERSION: str | None = None  # first peft release adding the MHA out_proj delta once; None: none yet


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"0.21.2"``, ``"0.22.0.dev0@abc123"`` -> ``(0, 21, 2)``, ``(0, 22, 0)``."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version.strip())
    if match is None:
        raise ValueError(f"peft version {version!r}: expected a version like '0.21.2'")
    return tuple(int(g or 0) for g in match.groups())


def peft_doubles_mha_out_proj(version: str | None) -> bool:
    """Whether peft ``version`` adds an nn.MultiheadAttention's out_proj LoRA delta twice (None: a peft older
    than 0.18, which wrote no version)."""
    if PEFT_MHA_FIX_VERSION is None or version is None:
        return True
    return _version_tuple(version) < _version_tuple(PEFT_MHA_FIX_VERSION)

# -- config fields -----------------------------------------------------------------------------------------
# Fields that only select modules or describe the save: the weights name the modules, so they are not needed.
_IGNORED_FIELDS = {
    "peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
    "inference_mode", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "ensure_weight_tying",
    # read explicitly below
    "r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "lora_bias", "use_dora", "fan_in_fan_out",
    "rank_pattern", "alpha_pattern", "init_lora_weights",
}
# Fields that must be off (null / false / empty): each changes the computation or the base model.
_MUST_BE_OFF = {
    "use_dora": "DoRA (weight-decomposed LoRA) adds a magnitude vector; mmadapters' LoRA has none",
    "lora_bias": "a trainable bias on lora_B is not part of mmadapters' LoRA",
    "layer_replication": "layer replication changes the base model's architecture",
    "modules_to_save": "fully trained copies of whole modules are not a LoRA adapter",
    "trainable_token_indices": "trainable token embeddings are not a LoRA adapter",
    "target_parameters": "LoRA on bare parameters (peft's ParamWrapper) is not supported",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "use_qalora": "QALoRA is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "arrow_config": "Arrow routing is not supported",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "kasa_config": "KaSA is not supported",
}
# init_lora_weights values after which the adapter is relative to the unchanged base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _is_off(value) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


# -- the per-layer tensor layout ---------------------------------------------------------------------------

@dataclass
class _Slot:
    key: str  # peft key without PREFIX
    param: Tensor  # our parameter holding it
    is_b: bool  # the output factor (where a gate folds in)
    mha_out: bool = False  # out_proj factor of an nn.MultiheadAttention (see peft_doubles_mha_out_proj)


def _slots(module_name: str, unit: nn.Module) -> list[_Slot]:
    """peft keys of one LoRA unit and the parameters of ours that hold them."""
    p = module_name
    if isinstance(unit, LoRALinear | LoRAConv):
        return [_Slot(f"{p}.lora_A.weight", unit.lora_A.weight, False), _Slot(f"{p}.lora_B.weight", unit.lora_B.weight, True)]
    if isinstance(unit, LoRAEmbedding):
        return [_Slot(f"{p}.lora_embedding_A", unit.lora_A, False), _Slot(f"{p}.lora_embedding_B", unit.lora_B, True)]
    if isinstance(unit, LoRAMultiheadAttention):
        slots = []
        if unit.in_proj is not None:
            slots += [_Slot(f"{p}.lora_A.weight", unit.in_proj.lora_A.weight, False),
                      _Slot(f"{p}.lora_B.weight", unit.in_proj.lora_B.weight, True)]
        if unit.out_proj is not None:
            slots += [_Slot(f"{p}{MHA_OUT}.lora_A.weight", unit.out_proj.lora_A.weight, False),
                      _Slot(f"{p}{MHA_OUT}.lora_B.weight", unit.out_proj.lora_B.weight, True, mha_out=True)]
        return slots
    raise TypeError(f"{module_name}: {type(unit).__name__} is not a LoRA unit")


def _module_problem(module: nn.Module) -> str | None:
    """Why peft's LoRA layer for ``module`` would compute something other than ours, or None."""
    if isinstance(module, _CONV_TYPES):
        if module.groups != 1:
            return f"a grouped convolution (groups={module.groups})"
        if any(d != 1 for d in module.dilation):
            return f"a dilated convolution (dilation={module.dilation}); peft's lora_A ignores dilation"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}; peft's lora_A always pads with zeros"
        return None
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return f"an nn.Embedding with max_norm={module.max_norm}; peft renormalizes the LoRA table with it"
        if hasattr(module, "embed_scale"):
            return "an embedding with embed_scale; peft scales the LoRA output by it"
        return None
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            return "an nn.MultiheadAttention with kdim/vdim != embed_dim"
        return None
    if isinstance(module, nn.Linear):
        return None
    return f"a {type(module).__name__} (supported: nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, nn.MultiheadAttention)"


# -- export ------------------------------------------------------------------------------------------------

def export_peft(model: nn.Module, name: str, directory: str | os.PathLike, *,
                base_model_name_or_path: str | None = None, peft_version: str = PEFT_VERSION) -> Path:
    """Write LoRA adapter ``name`` of ``model`` in peft's format, loadable with
    ``peft.PeftModel.from_pretrained(base, directory)`` where ``base`` is the plain base model (without
    mmadapters' wrappers). ``peft_version``: the peft that will read the files (it decides how an
    nn.MultiheadAttention's out_proj factor is written; see the module docstring).

    Raises ValueError naming the adapter and the reason when peft cannot represent it (another method,
    norm/bias tuning, LoRA on an nn.MultiheadAttention's out_proj alone, dilated or grouped convolutions,
    embeddings with max_norm). Returns the directory."""
    config = get_config(model, name)
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"export_peft: adapter {name!r} is a {config.method!r} adapter ({type(config).__name__}); "
                         "peft's LoRA format holds LoRA adapters only")
    if config.train_norms or config.train_biases != "none":
        raise ValueError(f"export_peft: adapter {name!r} has train_norms={config.train_norms}, "
                         f"train_biases={config.train_biases!r}; peft's LoRA format stores no norm or bias deltas "
                         "(expected train_norms=False, train_biases='none')")
    halve_mha_out = peft_doubles_mha_out_proj(peft_version)
    tensors: dict[str, Tensor] = {}
    targets: list[str] = []
    for w in wrappers(model):
        if name not in w.adapters:
            continue
        for role, unit in w.adapters[name].items():
            if role != "lora":
                raise ValueError(f"export_peft: adapter {name!r} has a {role!r} unit at {w.module_name!r}; "
                                 "peft's LoRA format holds lora_A/lora_B only")
            problem = _module_problem(w.base_layer)
            if problem is None and isinstance(unit, LoRAMultiheadAttention) and unit.in_proj is None:
                problem = ("LoRA on its out_proj alone; peft adapts an nn.MultiheadAttention's in_proj and out_proj "
                           "together (target the attention module itself)")
            if problem is not None:
                raise ValueError(f"export_peft: adapter {name!r} at module {w.module_name!r}: {problem}")
            with torch.no_grad():
                for slot in _slots(w.module_name, unit):
                    value = slot.param.detach()
                    if slot.is_b and unit.gate is not None:  # peft has no gate: fold it into B
                        value = value * unit.gate.detach().to(value.dtype)
                    if slot.mha_out and halve_mha_out:  # that peft adds this delta twice
                        value = value * 0.5
                    tensors[PREFIX + slot.key] = value.to("cpu").contiguous()
            targets.append(w.module_name)
    if not targets:
        raise ValueError(f"export_peft: adapter {name!r} has no LoRA layers on this model")

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / SAFETENSORS_NAME, save(tensors, metadata={"format": "pt"}))
    peft_config = {
        "peft_type": "LORA",
        "peft_version": peft_version,
        "task_type": None,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _peft_target_modules(model, targets),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": config.rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
    }
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode())
    return directory


def _peft_target_modules(model: nn.Module, targets: list[str]) -> list[str] | str:
    """peft matches list entries by exact name or dotted suffix: full paths, unless one is also the suffix of
    another module's path (a root-level ``fc1`` and ``sub.fc1``); then an exact full-match regex."""
    wanted = set(targets)
    for logical, _module, _parent, _attr in iter_logical_modules(model):
        if logical and logical not in wanted and any(logical.endswith("." + t) for t in wanted):
            return "^(?:" + "|".join(re.escape(t) for t in sorted(wanted)) + ")$"
    return sorted(wanted)


# -- import ------------------------------------------------------------------------------------------------

PeftTranslator = Callable[[dict[str, Tensor], Path], "tuple[dict[str, Tensor], int] | None"]


def set_peft_translator(model: nn.Module, translator: PeftTranslator) -> nn.Module:
    """Let :func:`import_peft` read peft LoRAs saved on another implementation of ``model`` (a backbone
    converted from another library). ``translator(tensors, source)`` returns None for files already in
    ``model``'s own layout, else ``(tensors, rank)``: the same LoRA keyed by ``model``'s module paths in
    peft's layout (:data:`MHA_OUT` for an nn.MultiheadAttention's out_proj), every unit of that one rank,
    scaled as the file's ``lora_alpha`` / ``r`` say. Returns ``model``."""
    model.__dict__["_mmadapters_peft_translator"] = translator  # a plain attribute: not a submodule or parameter
    return model


def import_peft(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> str:
    """Load a peft LoRA directory onto ``model`` as adapter ``name`` (at the same module paths). Returns ``name``.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin`` through
    ``torch.load(weights_only=True)``). The adapter goes exactly on the modules the weights name; its
    LoRAConfig takes ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora`` and peft's ``target_modules``
    (a list as is, a regex string as ``"re:..."``; the module paths instead when those patterns would pick
    other modules here). Options mmadapters' LoRA cannot reproduce (DoRA, ``bias`` != "none", ``lora_bias``,
    per-module ``rank_pattern`` / ``alpha_pattern``, base-rewriting ``init_lora_weights``, transformers
    Conv1D layers, ...) raise a ValueError naming the file and the field; a failed import adds nothing."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    peft_cfg = _read_peft_config(config_path)
    tensors, weights_path = _read_peft_weights(directory)
    r, alpha = peft_cfg["r"], peft_cfg["lora_alpha"]
    dropout = float(peft_cfg.get("lora_dropout", 0.0) or 0.0)
    rslora = bool(peft_cfg.get("use_rslora", False))
    translator = model.__dict__.get("_mmadapters_peft_translator")
    translated = translator(tensors, weights_path) if translator is not None else None
    if translated is not None:  # saved on another implementation: its LoRAs re-packed for this model's modules
        tensors, rank = translated
        # keep peft's scale alpha / r (alpha / sqrt(r) with rslora) at the translated rank
        alpha, r, rslora = (alpha / (r ** 0.5 if rslora else r)) * rank, rank, False

    modules = {n: m for n, m, _, _ in iter_logical_modules(model)}
    parents = {n: p for n, _, p, _ in iter_logical_modules(model)}
    by_module: dict[str, dict[str, set[str]]] = {}  # module path -> part -> peft tensor names
    for key in tensors:
        path, tensor = _split_key(key, weights_path)
        part = "main"
        if path.endswith(MHA_OUT) and isinstance(modules.get(path[: -len(MHA_OUT)]), nn.MultiheadAttention):
            path, part = path[: -len(MHA_OUT)], "out_proj"
        if path not in modules:
            raise ValueError(f"{weights_path}: tensor {key!r} is for module {path!r}, which this "
                             f"{type(model).__name__} does not have")
        module = modules[path]
        if isinstance(module, nn.MultiheadAttention) and part == "main":
            part = "in_proj"
        if isinstance(parents.get(path), nn.MultiheadAttention) and path.endswith(".out_proj"):
            raise ValueError(f"{weights_path}: tensor {key!r} adapts {path!r}, the out_proj of an nn.MultiheadAttention "
                             "targeted as a plain Linear; peft ignores such a LoRA (the attention reads the weight "
                             "directly), so importing it would change the outputs")
        by_module.setdefault(path, {}).setdefault(part, set()).add(tensor)

    targets: list[Target] = []
    for path, parts in by_module.items():
        module = modules[path]
        problem = _module_problem(module)
        if problem is not None:
            hint = " (fan_in_fan_out=True: transformers Conv1D layers are not supported)" \
                if peft_cfg.get("fan_in_fan_out") else ""
            raise ValueError(f"{weights_path}: module {path!r} is {problem}{hint}")
        for part, names in parts.items():
            want = {"lora_embedding_A", "lora_embedding_B"} if isinstance(module, nn.Embedding) else {"lora_A", "lora_B"}
            if names != want:
                raise ValueError(f"{weights_path}: module {path!r}{'' if part == 'main' else ' ' + part} has tensors "
                                 f"{sorted(names)}, expected {sorted(want)}")
        if isinstance(module, nn.MultiheadAttention) and set(parts) != {"in_proj", "out_proj"} and translated is None:
            raise ValueError(f"{weights_path}: nn.MultiheadAttention {path!r} has LoRA tensors for {sorted(parts)} only; "
                             "peft writes both in_proj and out_proj")
        targets.append(Target(path, module, None, set(parts) - {"main"}))
    order = {n: i for i, n in enumerate(modules)}
    targets.sort(key=lambda t: order[t.name])
    if not targets:
        raise ValueError(f"{weights_path}: holds no LoRA tensors")

    try:
        config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, rslora=rslora,
                            target_modules=_our_target_modules(
            model, peft_cfg.get("target_modules") if translated is None else None, targets))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: {err}") from None
    add_adapter(model, name, config, _targets=targets)
    try:
        # a translated out_proj LoRA comes from a plain Linear, which peft adds once
        _copy_in(model, name, tensors, weights_path, r, double_mha_out=translated is None and peft_doubles_mha_out_proj(
            peft_cfg.get("peft_version")))
    except Exception:
        delete_adapter(model, name)
        raise
    return name


def _read_peft_config(path: Path) -> dict:
    cfg = read_json_object(path, f"peft adapter config not found (expected {CONFIG_NAME})")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: field 'peft_type' is {cfg.get('peft_type')!r}; only peft LoRA adapters ('LORA') "
                         "can be imported")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{path}: field {key!r} is {value!r}; expected a positive number")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: field 'bias' is {cfg['bias']!r}; expected 'none' (peft then stores trained base "
                         "biases, which mmadapters' LoRA does not)")
    for key, why in _MUST_BE_OFF.items():
        if not _is_off(cfg.get(key)):
            raise ValueError(f"{path}: field {key!r} is {cfg[key]!r}; {why}")
    init = cfg.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ValueError(f"{path}: field 'init_lora_weights' is {init!r}; that initialization rewrites the base "
                         "weights or changes the layer, so the adapter does not apply to the plain base (save it "
                         "from peft with path_initial_model_for_weight_conversion first)")
    for key, scalar in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"{path}: field {key!r} is {pattern!r}; expected an object")
        odd = {k: v for k, v in pattern.items() if v != cfg[scalar]}
        if odd:
            raise ValueError(f"{path}: field {key!r} gives modules their own {scalar} ({odd}); mmadapters' LoRAConfig "
                             f"has one {scalar} per adapter (split the adapter, or retrain with a uniform {scalar})")
    unknown = sorted(k for k in set(cfg) - _IGNORED_FIELDS - set(_MUST_BE_OFF) if not _is_off(cfg[k]))
    if unknown:
        warnings.warn(f"{path}: ignoring peft config field(s) {unknown} that this importer does not know "
                      "(written by a newer peft?); check the imported adapter's outputs", stacklevel=3)
    return cfg


def _read_peft_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    st, binary = directory / SAFETENSORS_NAME, directory / BIN_NAME
    if st.is_file():
        try:
            return load_file(str(st)), st
        except SafetensorError as err:
            raise ValueError(f"{st}: not a readable safetensors file ({err})") from None
    if binary.is_file():
        try:
            data = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{binary}: not a tensor-only checkpoint torch.load(weights_only=True) can read "
                             f"({type(err).__name__}: {err})") from None
        if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
            raise ValueError(f"{binary}: expected a dict of tensors")
        return data, binary
    raise FileNotFoundError(f"{directory}: no peft adapter weights (expected {SAFETENSORS_NAME} or {BIN_NAME})")


_TENSOR_SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B",
                    ".lora_embedding_A": "lora_embedding_A", ".lora_embedding_B": "lora_embedding_B"}


def _split_key(key: str, source: Path) -> tuple[str, str]:
    """``base_model.model.blocks.0.fc1.lora_A.weight`` -> (``blocks.0.fc1``, ``lora_A``)."""
    body = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix, tensor in _TENSOR_SUFFIXES.items():
        if body.endswith(suffix):
            return body[: -len(suffix)], tensor
    if ".lora_magnitude_vector" in body:
        why = "a DoRA magnitude vector (field 'use_dora')"
    elif body.endswith(".lora_B.bias"):
        why = "a lora_B bias (field 'lora_bias')"
    elif ".modules_to_save." in body or body.endswith(".bias") or body.endswith(".weight"):
        why = "a base-model weight or bias (fields 'bias' / 'modules_to_save')"
    else:
        why = "not a LoRA lora_A/lora_B or lora_embedding_A/B tensor"
    raise ValueError(f"{source}: tensor {key!r} cannot be imported: {why}")


def _our_target_modules(model: nn.Module, peft_targets, targets: list[Target]) -> list[str] | str:
    """peft's target_modules in our pattern syntax when they pick exactly the imported modules, else the paths."""
    exact = [t.name for t in targets]
    if isinstance(peft_targets, str):
        translated: list[str] | str | None = None if peft_targets.lower() == "all-linear" else "re:" + peft_targets
    elif isinstance(peft_targets, list) and all(isinstance(t, str) and not any(c in t for c in "*?[@")
                                                 and not t.startswith("re:") for t in peft_targets):
        translated = sorted(peft_targets)
    else:
        translated = None
    if translated is not None:
        try:
            picked = {(t.name, frozenset(t.parts)) for t in resolve_targets(model, translated)}
        except ValueError:  # e.g. a listed name matches nothing here
            picked = None
        if picked == {(t.name, frozenset(t.parts)) for t in targets}:
            return translated
    return exact


def _copy_in(model: nn.Module, name: str, tensors: dict[str, Tensor], source: Path, r: int,
             double_mha_out: bool) -> None:
    slots: dict[str, _Slot] = {}
    for w in wrappers(model):
        if name in w.adapters:
            for slot in _slots(w.module_name, w.adapters[name]["lora"]):
                slots[slot.key] = slot
    by_body = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in tensors.items()}
    missing, unexpected = sorted(set(slots) - set(by_body)), sorted(set(by_body) - set(slots))
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match the LoRA layers built from {CONFIG_NAME}; "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, slot in slots.items():
            value = by_body[key]
            if value.shape != slot.param.shape:
                rank = value.shape[1] if slot.is_b and value.dim() > 1 else value.shape[0]
                hint = f" (rank {rank} != field 'r' = {r})" if rank != r else ""
                raise ValueError(f"{source}: tensor {PREFIX + key!r} has shape {list(value.shape)}, expected "
                                 f"{list(slot.param.shape)}{hint}")
            value = value.to(slot.param.dtype)
            slot.param.copy_(value * 2 if slot.mha_out and double_mha_out else value)


__all__ = ["PEFT_MHA_FIX_VERSION", "PEFT_VERSION", "export_peft", "import_peft", "peft_doubles_mha_out_proj",
           "set_peft_translator"]
