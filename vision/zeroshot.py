"""Zero-shot classification with CLIP: the text classifier, its on-disk cache and image features.

The classifier ``W`` (D, C) follows CLIP_benchmark's convention: for class ``c`` every template is
filled in, each text embedding is L2-normalized, the class's embeddings are averaged and the mean is
re-normalized. It is built from all classes × templates at once, in batches of texts (not one class at
a time), and cached on disk keyed by (model name, weights identity, class names, templates): a second
run with the same model and prompts loads it instead of running the text tower.
Logits are ``100 · normalize(image feature) · W`` (:func:`zeroshot_logits`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

# A small default set in the spirit of CLIP's ensembles, for datasets that bring no templates.
DEFAULT_TEMPLATES = (
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a photo of the small {c}.",
    "a photo of the large {c}.",
    "a drawing of a {c}.",
    "a cropped photo of a {c}.",
    "a bright photo of a {c}.",
    "a dark photo of a {c}.",
)
CACHE_FORMAT = 1


def fill_template(template: str, classname: str) -> str:
    """``template`` with ``{c}`` replaced by ``classname`` (other braces are left alone, unlike str.format)."""
    return template.replace("{c}", classname)


@torch.inference_mode()
def encode_texts(model: nn.Module, tokenizer: Callable[[list[str]], Tensor], texts: Sequence[str], *,
                 device: str | torch.device = "cpu", batch_size: int = 512, progress: bool = False,
                 desc: str = "text") -> Tensor:
    """L2-normalized text features (N, D) of ``texts``, encoded ``batch_size`` texts at a time.

    For open_clip CLIP text towers (causal attention, feature taken at the end-of-text token) texts are
    batched by length and each batch runs only up to its longest prompt: positions after a prompt's
    end-of-text token cannot influence it through a causal mask, so the features are the full-context
    ones (to float rounding) at a fraction of the cost — prompts are ~10 of the 77 context tokens.
    """
    tokens = tokenizer(list(texts))  # (N, L): one tokenizer call for all texts
    trim = _trimmable(model)
    lengths = (tokens != 0).sum(dim=1)
    order = torch.argsort(lengths, stable=True) if trim else torch.arange(len(texts))
    out = torch.empty(0)
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=desc, disable=None if progress else True, leave=False):
        idx = order[start:start + batch_size]
        batch = tokens[idx].to(device)
        feats = _encode_trimmed(model, batch, int(lengths[idx].max())) if trim else model.encode_text(batch)
        feats = F.normalize(feats.float(), dim=-1).cpu()
        if out.numel() == 0:
            out = torch.empty(len(texts), feats.shape[-1])
        out[idx] = feats
    return out if len(texts) else torch.empty(0, 0)


def _trimmable(model: nn.Module) -> bool:
    """An open_clip CLIP whose text tower is causal and pools at the end-of-text token."""
    try:
        from open_clip.model import CLIP
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return False
    mask = getattr(model, "attn_mask", None)
    return (isinstance(model, CLIP) and mask is not None and getattr(model, "text_pool_type", "argmax") == "argmax"
            and bool(torch.equal(torch.isinf(mask), torch.ones_like(mask, dtype=torch.bool).triu(1))))


def _encode_trimmed(model: nn.Module, tokens: Tensor, length: int) -> Tensor:
    """``model.encode_text(tokens)`` computed on the first ``length`` positions only (see encode_texts)."""
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def check_classnames(classnames: Sequence[str]) -> None:
    """Class names must be distinct non-empty strings: a repeated name gives two identical classifier columns,
    and argmax would never pick the second class (its images would all count as errors)."""
    first: dict[str, int] = {}
    for i, name in enumerate(classnames):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"classnames[{i}]: expected a non-empty class name, got {name!r}")
        if name in first:
            raise ValueError(f"classnames[{i}]: class name {name!r} repeats classnames[{first[name]}]; expected "
                             "distinct class names")
        first[name] = i


def build_classifier(model: nn.Module, tokenizer: Callable[[list[str]], Tensor], classnames: Sequence[str],
                     templates: Sequence[str], *, device: str | torch.device = "cpu", batch_size: int = 512,
                     progress: bool = True) -> Tensor:
    """Zero-shot weights W (D, C): mean of normalized template embeddings per class, re-normalized."""
    if not classnames or not templates:
        raise ValueError(f"need class names and templates, got {len(classnames)} and {len(templates)}")
    check_classnames(classnames)
    texts = [fill_template(t, c) for c in classnames for t in templates]  # class-major: (C · T)
    feats = encode_texts(model, tokenizer, texts, device=device, batch_size=batch_size, progress=progress,
                         desc="classifier")
    per_class = feats.view(len(classnames), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(per_class, dim=-1).T.contiguous()  # (D, C)


def classifier_key(model_name: str, weights_identity: str, classnames: Sequence[str], templates: Sequence[str]) -> str:
    """SHA-256 hex of everything the classifier depends on."""
    payload = json.dumps({"format": CACHE_FORMAT, "model": model_name, "weights": weights_identity,
                          "classnames": list(classnames), "templates": list(templates)}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class ClassifierResult:
    weights: Tensor  # (D, C)
    cache_hit: bool
    path: Path | None  # the cache file (None without a cache dir)
    seconds: float  # time to load or build


def cached_classifier(model: nn.Module, tokenizer: Callable[[list[str]], Tensor], classnames: Sequence[str],
                      templates: Sequence[str], *, model_name: str, weights_identity: str,
                      cache_dir: str | os.PathLike | None, device: str | torch.device = "cpu",
                      batch_size: int = 512, progress: bool = True) -> ClassifierResult:
    """:func:`build_classifier`, cached as ``cache_dir/<key>.safetensors`` (written atomically).

    ``weights_identity`` must change whenever the text tower's weights may (e.g. ``ClipInfo.identity()``);
    a model with adapters on its text tower must fold the adapters into it. A cache file that is
    unreadable or does not match (shape, key) is rebuilt with a warning.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    from mmadapters.io import atomic_write_bytes

    t0 = time.perf_counter()
    check_classnames(classnames)  # before a cache hit too: a cached classifier of repeated names is as wrong
    key = classifier_key(model_name, weights_identity, classnames, templates)
    path = Path(cache_dir) / f"{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            weights = load_file(str(path))["classifier"]
            if weights.ndim == 2 and weights.shape[1] == len(classnames):
                return ClassifierResult(weights, True, path, time.perf_counter() - t0)
            warnings.warn(f"{path}: cached classifier has shape {tuple(weights.shape)}, expected (D, {len(classnames)}); "
                          "rebuilding it", stacklevel=2)
        except (SafetensorError, KeyError, OSError) as e:
            warnings.warn(f"{path}: unreadable cached classifier ({e}); rebuilding it", stacklevel=2)
    weights = build_classifier(model, tokenizer, classnames, templates, device=device, batch_size=batch_size,
                               progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"key": key, "model": model_name, "weights": weights_identity, "num_classes": str(len(classnames)),
                "num_templates": str(len(templates))}
        atomic_write_bytes(path, save({"classifier": weights}, metadata=meta))
    return ClassifierResult(weights, False, path, time.perf_counter() - t0)


@dataclass
class ImageFeatures:
    """Features of the readable images of a dataset, in loader order."""

    features: Tensor  # (N, D), L2-normalized
    labels: Tensor  # (N,)
    paths: list[str]
    skipped: list[Any] = field(default_factory=list)  # readers.Unreadable markers


@torch.inference_mode()
def extract_image_features(model: nn.Module, loader: Iterable, *, device: str | torch.device = "cpu",
                           progress: bool = True, on_unreadable: Callable[[Any], None] | None = None,
                           desc: str = "images") -> ImageFeatures:
    """Encode every batch of ``loader`` (batches from ``readers.collate_with_skips``) with ``model.encode_image``.

    Unreadable images are collected in ``skipped``; ``on_unreadable`` is called for each (it may raise to
    stop the run).
    """
    feats, labels, paths, skipped = [], [], [], []
    for images, batch_labels, batch_paths, batch_skipped in tqdm(loader, desc=desc, disable=None if progress else True):
        for item in batch_skipped:
            if on_unreadable is not None:
                on_unreadable(item)
            skipped.append(item)
        if images is None:
            continue
        out = model.encode_image(images.to(device, non_blocking=True))
        feats.append(F.normalize(out.float(), dim=-1).cpu())
        labels.append(batch_labels)
        paths.extend(batch_paths)
    if not feats:
        return ImageFeatures(torch.empty(0, 0), torch.empty(0, dtype=torch.long), [], skipped)
    return ImageFeatures(torch.cat(feats), torch.cat(labels), paths, skipped)


def zeroshot_logits(image_features: Tensor, classifier: Tensor) -> Tensor:
    """``100 · normalize(f) · W``: image features (B, D), classifier (D, C) -> logits (B, C)."""
    return 100.0 * F.normalize(image_features.float(), dim=-1) @ classifier.to(image_features.device).float()
