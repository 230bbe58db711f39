"""CapS-Adapter: a caption-based multimodal support set on top of Tip-Adapter and TIP-X.

The support set holds K images per class, each with a caption. CLIP encodes the images (F_img, (N, D))
and the prompts ``caps_prompt(class, caption)`` = "A photo of {class}. {caption}" (F_cap, (N, D)).
For an L2-normalized image feature f (B, D), in the order of the paper:

    aff        = (1 − δ) · f · F_imgᵀ + δ · f · F_capᵀ           (B, N) multimodal affinity
    p(x)       = softmax(x · W / T), T = 0.5                     a distribution over the C classes
    KL_ij      = KL(p(f_i) ‖ p(F_img_j))                         (B, N), TIP-X's intra-modal distance
    kl_logits  = −rescale(KL) · L                                (B, C); rescale maps KL onto aff's range
    logits     = 100 · f · W + γ · kl_logits + α · exp(−β (1 − aff)) · L

With δ = 0 and γ = 0 this is Tip-Adapter. α, β, γ, δ are searched on a **validation** split only
(the official Tip and CapS code tune on the test set).

Differences from the official code, on purpose:

- The official CapS code applies the softmax to raw feature **vectors** (a "distribution" over the D
  embedding dimensions) before the KL. That is not TIP-X's quantity: it ignores the classes entirely
  and changes under a rotation of the embedding space, which leaves every CLIP similarity unchanged.
  We compute the KL between class distributions, as TIP-X defines it (tested).
- The official few-shot loader overwrites its prompt template inside the loop over classes, so every class
  after the first is prompted "A photo of {first class}." with its captions: the class names stop telling
  the support images apart. ``support_prompts`` builds each image's prompt from its own class's name (tested).
- TIP-X's KL loop over test batches drops the last partial batch; here the KL is one batched matmul
  over all rows (``kl_divergence``).
- TIP-X rescales the KL matrix by the min/max over the whole test set, so one image's logits depend
  on the other test images. We freeze that affine map (``kl_range``, ``aff_range``) on the validation
  features during the search, so ``logits`` is per image.

Captioning and text-to-image generation are plug-ins (``Captioner``, ``ImageGenerator``): on the generated
tasks :mod:`mmadapters.vision.captioners` gives the shipped VL-T5, a noisy simulated captioner and the generator
as text-to-image; captions can also be read from a file (``read_captions``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .fewshot import SupportSet, caps_prompt, check_features, check_labels
from .readers import split_lines
from .tip_adapter import DEFAULT_ALPHAS, CacheModel, accuracy, as_grid, at_edge, describe_grid, grid_accuracy, tidy

if TYPE_CHECKING:
    from PIL import Image

# The official CapS/SuS-X joint grid: δ 11 × γ 50 × β 200 × α 20 (here α adds 0, plain zero-shot).
DEFAULT_DELTAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
DEFAULT_GAMMAS: tuple[float, ...] = (0.0, *torch.logspace(-1, 2, 49).tolist())  # 0 and 0.1 .. 100
DEFAULT_CAPS_BETAS: tuple[float, ...] = tuple(torch.linspace(0.1, 50.0, 200).tolist())  # SuS-X / CapS: up to 50


# ---------------------------------------------------------------------------------------------------
# Plug-ins: captioning and text-to-image generation (optional; nothing here needs them)


@runtime_checkable
class Captioner(Protocol):
    """Anything that captions images, e.g. a multimodal LM wrapper: one caption per image, same order."""

    def caption(self, images: Sequence[Image.Image]) -> list[str]: ...


@runtime_checkable
class ImageGenerator(Protocol):
    """Anything that renders a text prompt to an image (the paper's text-to-image support images)."""

    def generate(self, prompts: Sequence[str], *, seed: int = 0) -> list[Image.Image]: ...


def caption_key(path: str | os.PathLike) -> str:
    """The key ``read_captions`` uses for an image path: absolute and normalized (symlinks not resolved)."""
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def caption_images(captioner: Captioner, image_paths: Iterable[str | os.PathLike], *, batch_size: int = 16) -> dict[str, str]:
    """Caption image files with a plug-in ``Captioner``; returns ``{caption_key(path): caption}``."""
    from PIL import Image

    paths = [Path(p) for p in image_paths]
    out: dict[str, str] = {}
    for s in range(0, len(paths), batch_size):
        batch = paths[s : s + batch_size]
        images = []
        for p in batch:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        captions = captioner.caption(images)
        if not isinstance(captions, list) or len(captions) != len(batch) or not all(isinstance(c, str) for c in captions):
            raise ValueError(
                f"{type(captioner).__name__}.caption: expected a list of {len(batch)} strings (one per image), "
                f"got {type(captions).__name__} of length {len(captions) if hasattr(captions, '__len__') else '?'}"
            )
        out.update({caption_key(p): c for p, c in zip(batch, captions, strict=True)})
    return out


_TSV_HEADERS = {("image", "caption"), ("path", "caption")}


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """Read one caption per image from a JSONL or TSV file.

    Formats (chosen by suffix: ``.jsonl``/``.json`` or ``.tsv``/``.txt``; otherwise by the first line):

    - JSONL: one object per line, ``{"image": relpath, "caption": str}``.
    - TSV: ``relpath<TAB>caption`` per line (the caption is everything after the first tab); an optional
      header line ``image<TAB>caption`` is skipped.

    Relative paths are resolved against the captions file's folder. Blank lines are skipped. Returns
    ``{caption_key(image_path): caption}``. Errors name the file, the line and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist (expected a .jsonl or .tsv file)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    lines = split_lines(text)  # not str.splitlines: U+2028, U+0085... inside a caption stay in it
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        fmt = "jsonl"
    elif suffix in (".tsv", ".txt", ".tab"):
        fmt = "tsv"
    else:
        first = next((ln for ln in lines if ln.strip()), "")
        fmt = "jsonl" if first.lstrip().startswith("{") else "tsv"
    folder = path.parent
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    first_content = True
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if fmt == "jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f'{where}: not valid JSON ({e.msg}); expected {{"image": relpath, "caption": str}}') from None
            if not isinstance(record, dict):
                raise ValueError(f'{where}: expected a JSON object {{"image": relpath, "caption": str}}, got {type(record).__name__}')
            rel, caption = record.get("image"), record.get("caption")
            if not isinstance(rel, str) or not rel.strip():
                raise ValueError(f"{where}: field 'image' must be a non-empty string (a path relative to {folder}), got {rel!r}")
            if not isinstance(caption, str):
                raise ValueError(f"{where}: field 'caption' must be a string, got {caption!r}")
        else:
            parts = line.rstrip("\r\n").split("\t", 1)
            if len(parts) < 2:
                raise ValueError(f"{where}: expected 'relpath<TAB>caption', found no tab")
            rel, caption = parts
            if first_content and (rel.strip().lower(), caption.strip().lower()) in _TSV_HEADERS:
                first_content = False  # only the first content line may be a header
                continue
            if not rel.strip():
                raise ValueError(f"{where}: field 'image' (the relpath before the tab) is empty")
        if not caption.strip():
            raise ValueError(f"{where}: field 'caption' is empty for image {rel!r}")
        key = caption_key(folder / rel.strip())
        if key in out and out[key] != caption.strip():
            raise ValueError(f"{where}: field 'image' {rel!r} already has a different caption on line {first_line[key]}")
        out[key] = caption.strip()
        first_line.setdefault(key, lineno)
        first_content = False
    if not out:
        raise ValueError(f"{path}: no captions found (expected {'JSONL records' if fmt == 'jsonl' else 'relpath<TAB>caption lines'})")
    return out


def support_prompts(
    image_paths: Sequence[str | os.PathLike],
    labels: Sequence[int] | Tensor,
    classnames: Sequence[str],
    captions: Mapping[str, str],
    *,
    source: str = "captions",
) -> list[str]:
    """The CapS prompt for each support image: ``caps_prompt(classnames[label], captions[path])``.

    ``captions`` is keyed by ``caption_key`` (what ``read_captions`` returns). A missing caption raises
    an error that names ``source`` (e.g. the captions file) and the first missing images.
    """
    labels = labels.tolist() if isinstance(labels, Tensor) else list(labels)
    if len(labels) != len(image_paths):
        raise ValueError(f"labels: expected {len(image_paths)} labels (one per support image), got {len(labels)}")
    missing = [os.fspath(p) for p in image_paths if caption_key(p) not in captions]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise KeyError(f"{source}: no caption for {len(missing)} of {len(image_paths)} support images: {shown}")
    bad = [y for y in labels if not 0 <= y < len(classnames)]
    if bad:
        raise ValueError(f"labels: expected class indices in [0, {len(classnames)}) (the classnames), found {bad[0]}")
    return [caps_prompt(classnames[y], captions[caption_key(p)]) for p, y in zip(image_paths, labels, strict=True)]


# ---------------------------------------------------------------------------------------------------
# The KL term (TIP-X), on class distributions


def class_log_probs(feats: Tensor, clip_weights: Tensor, temperature: float = 0.5) -> Tensor:
    """(B, D) features, (D, C) classifier -> (B, C) log p(x) = log softmax(x · W / T) over the classes."""
    return F.log_softmax(feats @ clip_weights / temperature, dim=-1)


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p_i ‖ q_j) for every pair: (M, C), (N, C) log-probabilities -> (M, N), all rows at once.

    KL_ij = Σ_c p_ic log p_ic − Σ_c p_ic log q_jc: a row term and one matmul, so no batch is dropped.
    Rounding can leave values a hair below zero; they are clamped to 0.
    """
    p = log_p.exp()
    return ((p * log_p).sum(-1, keepdim=True) - p @ log_q.T).clamp_min(0)


class CapsAdapter(CacheModel):
    """CapS-Adapter over precomputed CLIP features (see the module docstring for the formula).

    Args:
        clip_weights: (D, C) zero-shot classifier with L2-normalized columns.
        support: K-shot support set with ``caption_feats`` (N, D).
        alpha, beta, gamma, delta: initial hyperparameters (``search`` replaces them).
        temperature: T of the class distributions (TIP-X: 0.5).

    Buffers: ``clip_weights``, ``image_keys`` F_img, ``caption_keys`` F_cap, ``cache_labels``,
    ``cache_values`` L, ``support_log_probs`` (N, C), and the frozen rescaling ranges ``kl_range`` and
    ``aff_range`` (first from the support set against itself, then from validation by ``search``).
    """

    kind = "caps"

    def __init__(
        self,
        clip_weights: Tensor,
        support: SupportSet,
        *,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 0.0,
        delta: float = 0.0,
        temperature: float = 0.5,
    ):
        super().__init__()
        if isinstance(support, SupportSet) and support.caption_feats is None:
            raise ValueError("support.caption_feats: CapS-Adapter needs caption features of shape (N, D), got None")
        if not temperature > 0:
            raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
        support = self._init_cache(clip_weights, support)
        self.register_buffer("image_keys", support.image_feats.clone())
        self.register_buffer("caption_keys", support.caption_feats.clone())
        self.temperature = float(temperature)
        self.register_buffer("support_log_probs", class_log_probs(self.image_keys, self.clip_weights, self.temperature))
        self.alpha, self.beta, self.gamma, self.delta = float(alpha), float(beta), float(gamma), float(delta)
        self.register_buffer("kl_range", torch.zeros(2))
        self.register_buffer("aff_range", torch.zeros(2))
        self.calibrate(self.image_keys)
        self.hyperparams: dict[str, Any] = {
            "kind": self.kind, "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "delta": self.delta,
            "temperature": self.temperature,
        }

    # -- the terms, in the paper's order ----------------------------------------------------------

    def affinity(self, feats: Tensor, delta: float | None = None) -> Tensor:
        """(B, D) -> (B, N): (1 − δ) · f · F_imgᵀ + δ · f · F_capᵀ."""
        delta = self.delta if delta is None else delta
        return (1 - delta) * (feats @ self.image_keys.T) + delta * (feats @ self.caption_keys.T)

    def kl_divergence(self, feats: Tensor) -> Tensor:
        """(B, D) -> (B, N): KL(p(f_i) ‖ p(F_img_j)) between class distributions at temperature T."""
        return kl_divergence(class_log_probs(feats, self.clip_weights, self.temperature), self.support_log_probs)

    def kl_logits(self, feats: Tensor) -> Tensor:
        """(B, D) -> (B, C): −rescale(KL) · L, with the affine map frozen in ``kl_range``/``aff_range``."""
        return -self._rescale(self.kl_divergence(feats)) @ self.cache_values

    def _rescale(self, kl: Tensor) -> Tensor:
        (k_lo, k_hi), (a_lo, a_hi) = self.kl_range, self.aff_range
        return (kl - k_lo) * ((a_hi - a_lo) / (k_hi - k_lo).clamp_min(1e-12)) + a_lo

    def forward(self, feats: Tensor) -> Tensor:
        """(B, D) L2-normalized features -> (B, C) logits (no input checks)."""
        cache = torch.exp(self.beta * (self.affinity(feats) - 1)) @ self.cache_values
        out = self.clip_logits(feats) + self.alpha * cache
        if self.gamma != 0:
            out = out + self.gamma * self.kl_logits(feats)
        return out

    @torch.no_grad()
    def logits(self, feats: Tensor) -> Tensor:
        """(B, D) L2-normalized image features -> (B, C) logits. Each row depends only on its own image."""
        feats = check_features("feats", feats, dim=self.dim).to(self.clip_weights.device)
        return self(feats)

    @torch.no_grad()
    def calibrate(self, feats: Tensor, delta: float | None = None) -> None:
        """Freeze the KL rescaling: map [min, max] of KL(feats, support) onto [min, max] of aff(feats, δ)."""
        kl = self.kl_divergence(feats)
        aff = self.affinity(feats, delta)
        self.kl_range.copy_(torch.stack([kl.min(), kl.max()]))
        self.aff_range.copy_(torch.stack([aff.min(), aff.max()]))

    # -- the search ---------------------------------------------------------------------------------

    @torch.no_grad()
    def search(
        self,
        val_feats: Tensor,
        val_labels: Tensor,
        *,
        alphas: Sequence[float] | Tensor | None = None,
        betas: Sequence[float] | Tensor | None = None,
        gammas: Sequence[float] | Tensor | None = None,
        deltas: Sequence[float] | Tensor | None = None,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Pick (α, β, γ, δ) maximizing top-1 accuracy on the validation features; sets and returns them.

        One full joint grid, as the official code searches: every δ (default 0, 0.1, …, 1) × γ (0 and 49
        log-spaced in 0.1..100) × β (200 steps in 0.1..50) × α (0 and 20 log-spaced in 0.1..1000), batched per
        δ (``grid_accuracy`` takes all γ at once). Ties go to the first grid point in (δ, γ, β, α) order, so
        an unhelpful caption or KL term leaves δ = 0, γ = 0 (Tip-Adapter). The KL matrix is computed once (it
        does not depend on δ); its rescaling to the affinity range is taken on the validation features for
        each δ and frozen with the chosen δ. Returns ``self.hyperparams``.
        """
        start = time.perf_counter()
        device = self.clip_weights.device
        val_feats = check_features("val_feats", val_feats, dim=self.dim).to(device)
        val_labels = check_labels("val_labels", val_labels, rows=val_feats.shape[0], num_classes=self.num_classes).to(device)
        alpha_grid, beta_grid = as_grid("alphas", alphas, DEFAULT_ALPHAS), as_grid("betas", betas, DEFAULT_CAPS_BETAS)
        gamma_grid = as_grid("gammas", gammas, DEFAULT_GAMMAS)
        delta_grid = as_grid("deltas", deltas, DEFAULT_DELTAS)
        if ((delta_grid < 0) | (delta_grid > 1)).any():
            raise ValueError(f"deltas: δ mixes image and caption affinities and must lie in [0, 1], got {delta_grid.tolist()}")

        base = self.clip_logits(val_feats)
        values = self.cache_values
        kl = self.kl_divergence(val_feats)
        k_lo, k_hi = kl.min(), kl.max()
        kl_per_class = (kl - k_lo) @ values  # (M, C): Σ_j∈c (KL_ij − k_lo)
        shots = values.sum(0, keepdim=True)  # (1, C) shots per class
        s_img, s_cap = val_feats @ self.image_keys.T, val_feats @ self.caption_keys.T

        acc = torch.empty(delta_grid.numel(), gamma_grid.numel(), beta_grid.numel(), alpha_grid.numel())
        for i, delta in enumerate(tqdm(delta_grid.tolist(), desc="caps search (δ)", disable=not progress, leave=False)):
            aff = (1 - delta) * s_img + delta * s_cap
            scale = (aff.max() - aff.min()) / (k_hi - k_lo).clamp_min(1e-12)
            kl_logits = -(scale * kl_per_class + aff.min() * shots)  # −Σ_j∈c rescale(KL_ij)
            bases = base + gamma_grid.to(device).view(-1, 1, 1) * kl_logits
            acc[i] = grid_accuracy(bases, aff, values, beta_grid, alpha_grid, val_labels).cpu()
        d_i, g_i, b_i, a_i = (int(i) for i in torch.unravel_index(torch.argmax(acc), acc.shape))
        self.delta, self.gamma = delta_grid[d_i].item(), gamma_grid[g_i].item()
        self.beta, self.alpha = beta_grid[b_i].item(), alpha_grid[a_i].item()
        self.calibrate(val_feats, self.delta)
        grids = {"alpha": alpha_grid, "beta": beta_grid, "gamma": gamma_grid}
        self.hyperparams.update(
            alpha=tidy(self.alpha),
            beta=tidy(self.beta),
            gamma=tidy(self.gamma),
            delta=tidy(self.delta),
            temperature=self.temperature,
            val_acc1=acc[d_i, g_i, b_i, a_i].item(),
            tip_val_acc1=acc[0, 0].max().item() if delta_grid[0] == 0 and gamma_grid[0] == 0 else None,
            zeroshot_val_acc1=accuracy(base, val_labels),
            val_images=val_feats.shape[0],
            support_images=self.cache_labels.numel(),
            grid={"deltas": [tidy(d) for d in delta_grid.tolist()], "gammas": describe_grid(gamma_grid),
                  "betas": describe_grid(beta_grid), "alphas": describe_grid(alpha_grid), "points": acc.numel()},
            at_edge=at_edge({"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma}, grids),
            search_seconds=round(time.perf_counter() - start, 4),
        )
        return self.hyperparams
