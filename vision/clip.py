"""CLIP backbones through open_clip's own factory, with adapter points on both towers.

Every way open_clip names a model works, because loading is one call to its factory:

- a built-in name and a pretrained tag (``"ViT-B-32"``, ``"laion2b_s34b_b79k"``; downloads when online),
- a built-in name and a local weights file as ``pretrained`` (``.safetensors``, or a checkpoint that
  open_clip reads with ``torch.load(weights_only=True)``),
- ``"local-dir:DIR"`` (``DIR/open_clip_config.json`` + weights in ``DIR``) and ``"hf-hub:org/repo"``,
- nothing at all: the tiny CLIP shipped in ``mmadapters/vision/assets/tiny_clip``.

:func:`load_clip` also returns a :class:`ClipInfo` whose :meth:`ClipInfo.identity` names the weights
(a SHA-256 of local files' contents), so caches keyed by it never mix two different checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

import mmadapters as mma

TINY_CLIP_DIR = Path(__file__).resolve().parent / "assets" / "tiny_clip"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@dataclass(frozen=True)
class ClipInfo:
    """What was loaded: the name as given, the pretrained tag or file, and a content hash of local weights."""

    model: str  # as given: "ViT-B-32", "local-dir:/path", "hf-hub:org/repo"
    pretrained: str | None  # a tag, a file path, or None (local-dir/hf-hub or random init)
    weights_path: str | None = None  # the local weights file, when there is one
    weights_sha256: str | None = None  # SHA-256 over the local config + weights bytes
    seed: int | None = None  # for a randomly initialized model: the seed of its initialization

    @property
    def short_name(self) -> str:
        """A file-name friendly model name: the directory/repo name for schema names."""
        name = self.model.split(":", 1)[1] if self.model.startswith(("local-dir:", "hf-hub:")) else self.model
        return Path(name.rstrip("/")).name or name

    @property
    def random_init(self) -> bool:
        """True when no weights were loaded: a built-in name without ``pretrained`` (random init from ``seed``)."""
        return self.seed is not None

    def identity(self) -> str:
        """A string that changes whenever the weights may differ (the key of on-disk caches)."""
        if self.weights_sha256:
            return f"sha256:{self.weights_sha256}"
        if self.pretrained is None and not self.model.startswith("hf-hub:"):
            return f"{self.model}|random-init|seed={self.seed}"
        return f"{self.model}|{self.pretrained}"

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "pretrained": self.pretrained, "weights_path": self.weights_path,
                "weights_sha256": self.weights_sha256, "seed": self.seed}


@dataclass
class ClipBundle:
    """A loaded CLIP: the model (eval mode), its eval image transform, its tokenizer and :class:`ClipInfo`."""

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> (3, H, W)
    tokenizer: Callable[[list[str]], torch.Tensor]  # list of N strings -> (N, context_length) token ids
    info: ClipInfo
    extra: dict[str, Any] = field(default_factory=dict)


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0" + _file_sha256(path).encode())
    return h.hexdigest()


def _hash_cache_dir() -> Path:
    root = os.environ.get("MMADAPTERS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mmadapters")
    return Path(root) / "file_hashes"


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered on disk under (absolute path, size, mtime): hashing a 600 MB
    checkpoint takes seconds, and cache keys need it on every run."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    memo = _hash_cache_dir() / key
    try:
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs the re-hash
    return digest


def _local_dir_files(directory: Path) -> tuple[Path | None, list[Path]]:
    """(the weights file open_clip prefers, every file that can change what loads: config + weights)."""
    weights = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    preferred = [directory / n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                                         "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")]
    chosen = next((p for p in preferred if p.is_file()), weights[0] if weights else None)
    return chosen, [directory / CONFIG_NAME, *weights]


def resolve_model_name(model: str | None) -> str:
    """``None`` -> ``local-dir:`` of the shipped tiny CLIP (with a clear error when it is missing)."""
    if model is not None:
        return model
    if not (TINY_CLIP_DIR / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"the shipped tiny CLIP is missing: expected {TINY_CLIP_DIR / CONFIG_NAME} and its weights. "
            "Pass a model (--model NAME --pretrained TAG|FILE, or --model local-dir:DIR), or create it with "
            "scripts/pretrain_tiny_clip.py"
        )
    return f"local-dir:{TINY_CLIP_DIR}"


def load_clip(model: str | None = None, pretrained: str | None = None, *, device: str | torch.device = "cpu",
              cache_dir: str | None = None, seed: int = 0, declare_points: bool = True) -> ClipBundle:
    """Load a CLIP with open_clip's factory. ``model=None`` loads the shipped tiny CLIP.

    ``pretrained`` is a tag or a local weights file for a built-in ``model`` name; it must be left out for
    ``local-dir:`` and ``hf-hub:`` names (those carry their weights). Without weights, a built-in name is
    randomly initialized from ``seed``. The model is returned in eval mode on ``device`` with adapter
    points declared (:func:`declare_clip_points`).
    """
    import open_clip

    from . import hf_clip

    name = resolve_model_name(model)
    open_clip_name = name  # what open_clip loads: the converted folder for a transformers CLIP
    weights_path: Path | None = None
    digest: str | None = None
    if name.startswith(("local-dir:", "hf-hub:")):
        if pretrained:
            raise ValueError(f"pretrained={pretrained!r} given with model {name!r}: a local-dir:/hf-hub: model carries "
                             "its own weights; leave pretrained out")
        directory = Path(name[len("local-dir:"):]).expanduser() if name.startswith("local-dir:") else None
        if directory is None:
            directory = hf_clip.hub_snapshot(name[len("hf-hub:"):], cache_dir)
        if directory is not None and not (directory / CONFIG_NAME).is_file() and hf_clip.is_hf_clip_dir(directory):
            # a transformers CLIPModel folder: converted once into an open_clip folder, loaded like any other
            files = hf_clip.hf_clip_source_files(directory)
            weights_path, digest = files[1], _sha256_files(files)
            open_clip_name = f"local-dir:{hf_clip.converted_clip_dir(directory, digest, cache_dir)}"
        elif name.startswith("local-dir:"):
            if not (directory / CONFIG_NAME).is_file():
                raise FileNotFoundError(f"model {name!r}: expected an open_clip config file {directory / CONFIG_NAME} "
                                        f"or a transformers CLIP folder ({directory / hf_clip.HF_CONFIG} with "
                                        "model_type 'clip')")
            chosen, files = _local_dir_files(directory)
            weights_path, digest = chosen, _sha256_files(files)
    elif pretrained and os.path.isfile(pretrained):
        weights_path = Path(pretrained)
        digest = _sha256_files([weights_path])
    elif name.replace("/", "-") not in open_clip.list_models():
        raise ValueError(f"model {name!r} is not an open_clip built-in name (see open_clip.list_models()), "
                         "a local-dir:DIR or an hf-hub:org/repo name")
    elif pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(name.replace("/", "-")):
        raise FileNotFoundError(
            f"pretrained {pretrained!r} for model {name!r} is neither a file nor a known tag; known tags: "
            f"{open_clip.list_pretrained_tags_by_model(name.replace('/', '-'))}")

    elif pretrained:
        _check_weights_reachable(name, pretrained, cache_dir)

    torch.manual_seed(seed)  # only matters for a randomly initialized model (no weights)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(open_clip_name, pretrained=pretrained,
                                                                    device=device, cache_dir=cache_dir)
    except pickle.UnpicklingError as err:
        raise ValueError(f"pretrained {pretrained!r}: the file holds pickled Python objects, which mmadapters never "
                         f"unpickles (torch.load with weights_only=True refused it: {type(err).__name__}); expected a "
                         ".safetensors file or a plain state-dict checkpoint") from None
    if pretrained is None and not name.startswith(("local-dir:", "hf-hub:")):
        print(f"warning: model {name!r} has no pretrained weights (pass --pretrained TAG|FILE): it is randomly "
              f"initialized from seed {seed}, so results measure an untrained model", file=sys.stderr)
    clip.eval()
    if declare_points:
        declare_clip_points(clip)
    if open_clip_name != name:  # peft LoRAs saved on the transformers model import onto this one
        from mmadapters.peft_interop import set_peft_translator

        set_peft_translator(clip, hf_clip.peft_translator)
    tokenizer = open_clip.get_tokenizer(open_clip_name, cache_dir=cache_dir)
    info = ClipInfo(model=name, pretrained=pretrained or None,
                    weights_path=str(weights_path) if weights_path else None, weights_sha256=digest,
                    seed=None if (digest or pretrained or name.startswith("hf-hub:")) else seed)
    return ClipBundle(clip, preprocess, tokenizer, info)


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _check_weights_reachable(name: str, tag: str, cache_dir: str | None) -> None:
    """A pretrained tag whose weights are neither cached nor downloadable fails at once with one line, instead of
    a minute of retries and a long traceback ending in "Failed to download weights"."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name.replace("/", "-"), tag) or {}
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, n, cache_dir=cache_dir), str) for n in names):
            return
        host, source = urlparse(constants.ENDPOINT).hostname or "huggingface.co", f"the Hugging Face hub ({repo})"
    elif url:
        cached = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if cached.is_file():
            return
        host, source = urlparse(url).hostname or url, url
    else:
        return
    if not _reachable(host):
        raise FileNotFoundError(
            f"pretrained {tag!r} for model {name!r}: the weights are not in the cache ({cache_dir or 'default cache'}) and "
            f"{source} cannot be reached from this machine; download them where there is a network and pass "
            "--pretrained FILE (or copy them into the cache dir)")


def _transformer_points(prefix: str, blocks: nn.Module) -> dict[str, mma.AdapterPoint]:
    """Points for one tower's ``resblocks``: attention output, MLP output, the attention for LoRA."""
    first = next(iter(blocks.children()), None)
    if first is None or not hasattr(first, "attn") or not hasattr(first, "mlp"):
        return {}
    width = first.mlp.c_proj.out_features
    points = {
        "attn_out": mma.AdapterPoint(f"{prefix}.*.attn", dim=width, doc="attention output of each residual block"),
        "ffn_out": mma.AdapterPoint(f"{prefix}.*.mlp.c_proj", doc="MLP output of each residual block"),
        "mlp_in": mma.AdapterPoint(f"{prefix}.*.mlp.c_fc", doc="first MLP projection (LoRA)"),
    }
    if isinstance(first.attn, nn.MultiheadAttention):
        points["attn"] = mma.AdapterPoint(f"{prefix}.*.attn", doc="nn.MultiheadAttention (LoRA on in_proj/out_proj)")
    else:  # open_clip's custom Attention: its projections are Linear-like submodules
        points["attn"] = mma.AdapterPoint(f"{prefix}.*.attn.out_proj", doc="attention output projection (LoRA)")
    return points


def declare_clip_points(model: nn.Module) -> nn.Module:
    """Declare adapter points on an open_clip model's towers. Returns ``model``.

    Both towers get ``attn_out`` (attention output of each residual block), ``ffn_out`` (its MLP
    output), ``mlp_in`` and ``attn`` (the ``nn.MultiheadAttention``, for LoRA on its projections); so
    ``"@attn"`` adapts both towers. ``image_*`` / ``text_*`` names select one tower (``"@image_attn"``).
    A timm vision tower gets the ViT points of :func:`mmadapters.vision.vit.declare_vit_points`; a
    vision tower without transformer blocks (ModifiedResNet) declares none.
    """
    towers: list[tuple[str, nn.Module, nn.Module]] = []
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(getattr(visual, "transformer", None), "resblocks"):
        towers.append(("image", visual, visual.transformer.resblocks))
    text = getattr(model, "text", None)  # CustomTextCLIP keeps its text tower in .text
    text_owner = text if text is not None and hasattr(getattr(text, "transformer", None), "resblocks") else model
    if hasattr(getattr(text_owner, "transformer", None), "resblocks"):
        towers.append(("text", text_owner, text_owner.transformer.resblocks))
    if not towers and not hasattr(getattr(visual, "trunk", None), "blocks"):
        raise ValueError(f"{type(model).__name__}: found no transformer resblocks in either tower to declare points on")
    for tower, owner, blocks in towers:
        points = _transformer_points("transformer.resblocks", blocks)
        mma.declare_adapter_points(owner, {**points, **{f"{tower}_{k}": v for k, v in points.items()}})
    trunk = getattr(visual, "trunk", None)  # a timm vision tower (open_clip's TimmModel)
    if trunk is not None and hasattr(trunk, "blocks"):
        from .vit import vit_points

        points = vit_points(trunk)
        mma.declare_adapter_points(trunk, {**points, **{f"image_{k}": v for k, v in points.items()}})
    return model


def write_clip_dir(directory: str | os.PathLike, model_cfg: dict[str, Any], model: nn.Module | None = None, *,
                   preprocess_cfg: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Write an open_clip ``local-dir:`` folder: ``open_clip_config.json`` + ``open_clip_model.safetensors``.

    ``model`` defaults to a fresh model built from ``model_cfg`` (random init from ``seed``). Files are
    written atomically. Returns the directory (load it with ``load_clip(f"local-dir:{directory}")``).
    """
    from open_clip import CLIP
    from safetensors.torch import save

    from mmadapters.io import atomic_write_bytes

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model is None:
        torch.manual_seed(seed)
        model = CLIP(**model_cfg)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    atomic_write_bytes(directory / WEIGHTS_NAME, save(state))
    return directory


def tiny_clip_config(*, embed_dim: int = 16, image_size: int = 32, width: int = 32, layers: int = 1,
                     context_length: int = 16) -> dict[str, Any]:
    """A very small open_clip ``model_cfg`` (ViT vision tower, the standard 49408-token tokenizer)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width, "heads": 2, "layers": layers},
    }
