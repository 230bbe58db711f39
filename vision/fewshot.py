"""Few-shot CLIP classifiers on precomputed features: the interface the CLI codes against.

Everything here works on CLIP features that were already computed (no model is loaded):

- ``SupportSet`` — the K-shot cache: L2-normalized image features, labels, optional caption features.
- ``fit_fewshot(kind, clip_weights, support, val_feats, val_labels)`` — builds a Tip-Adapter
  (``"tip"``), Tip-Adapter-F (``"tip-f"``) or CapS-Adapter (``"caps"``) and searches its
  hyperparameters on the **validation** features only; the result has ``.logits(feats)`` and
  ``.hyperparams``.
- ``sample_shots(labels, k, seed)`` — K indices per class, seeded; ``support_set(feats, labels, index=...)``
  — the cache of those shots (keys: the mean of their augmented views when given).
- ``caps_prompt(classname, caption)`` — the text CapS-Adapter encodes for a captioned support image.

Shapes: N support images, M validation images, B images to classify, D feature dim, C classes.
``clip_weights`` is the zero-shot classifier ``W`` of shape (D, C) with L2-normalized columns, so
zero-shot logits are ``100 · f · W``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

FewShotKind = Literal["tip", "tip-f", "caps"]
KINDS: tuple[str, ...] = ("tip", "tip-f", "caps")

# fp16 CLIP features cast to float32 have norms within ~1e-3 of 1; anything further off was not normalized.
_NORM_TOL = 1e-2


@runtime_checkable
class FewShotClassifier(Protocol):
    """What ``fit_fewshot`` returns."""

    hyperparams: dict[str, Any]

    def logits(self, feats: Tensor) -> Tensor:
        """(B, D) L2-normalized image features -> (B, C) class logits."""
        ...


def check_features(name: str, x: Any, *, dim: int | None = None, rows: int | None = None, normalized: bool = True) -> Tensor:
    """Validate a (rows, dim) float feature matrix and return it as float32.

    Errors name the argument (``name``) and the expected shape. With ``normalized`` each row must
    have unit L2 norm (within 1e-2, loose enough for fp16 features).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape ({rows or 'N'}, {dim or 'D'}), got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected shape ({rows or 'N'}, {dim or 'D'}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows (shape ({rows}, {dim or 'D'})), got {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: expected feature dim D={dim} (shape ({rows or 'N'}, {dim})), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: is empty (shape {tuple(x.shape)})")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf")
    if normalized:
        norms = x.norm(dim=1)
        worst = (norms - 1).abs().max().item()
        if worst > _NORM_TOL:
            raise ValueError(
                f"{name}: rows must be L2-normalized (unit norm), found norms in [{norms.min().item():.4g}, "
                f"{norms.max().item():.4g}]; normalize with torch.nn.functional.normalize(x, dim=-1)"
            )
    return x


def check_labels(name: str, y: Any, *, rows: int | None = None, num_classes: int | None = None) -> Tensor:
    """Validate a (rows,) integer label vector with values in [0, num_classes); return it as int64."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor of shape ({rows or 'N'},), got {type(y).__name__}")
    if y.ndim != 1:
        raise ValueError(f"{name}: expected shape ({rows or 'N'},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer class indices (torch.long), got dtype {y.dtype}")
    if rows is not None and y.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} labels (shape ({rows},)), got {tuple(y.shape)}")
    y = y.long()
    if y.numel() and y.min().item() < 0:
        raise ValueError(f"{name}: labels must be >= 0, found {y.min().item()}")
    if num_classes is not None and y.numel() and y.max().item() >= num_classes:
        raise ValueError(f"{name}: labels must be < C={num_classes} (the columns of clip_weights), found {y.max().item()}")
    return y


def check_clip_weights(clip_weights: Any, dim: int) -> Tensor:
    """Validate the zero-shot classifier W: shape (D, C) with unit-norm columns; return it as float32."""
    if not isinstance(clip_weights, Tensor) or clip_weights.ndim != 2:
        got = tuple(clip_weights.shape) if isinstance(clip_weights, Tensor) else type(clip_weights).__name__
        raise ValueError(f"clip_weights: expected a tensor of shape (D={dim}, C), got {got}")
    if clip_weights.shape[0] != dim:
        hint = " — it looks like (C, D); pass clip_weights.T" if clip_weights.shape[1] == dim else ""
        raise ValueError(f"clip_weights: expected shape (D={dim}, C), got {tuple(clip_weights.shape)}{hint}")
    return check_features("clip_weights.T (the class embeddings)", clip_weights.T, dim=dim).T


@dataclass
class SupportSet:
    """The few-shot cache.

    Attributes:
        image_feats: (N, D) L2-normalized CLIP image features of the support images.
        labels: (N,) int64 class indices.
        caption_feats: (N, D) L2-normalized CLIP text features of ``caps_prompt(class, caption)`` for each
            support image (row i describes image i), or None (CapS-Adapter needs them; Tip does not).
        views: (V, N, D) L2-normalized features of V augmented views of each support image (``encode_views``),
            or None. Tip-Adapter-F trains on them; ``from_views`` makes ``image_feats`` their mean.
    """

    image_feats: Tensor
    labels: Tensor
    caption_feats: Tensor | None = None
    views: Tensor | None = None

    def __post_init__(self) -> None:
        self.image_feats = check_features("support.image_feats", self.image_feats)
        n, d = self.image_feats.shape
        self.labels = check_labels("support.labels", self.labels, rows=n).to(self.image_feats.device)
        if self.caption_feats is not None:
            self.caption_feats = check_features("support.caption_feats", self.caption_feats, rows=n, dim=d)
            self.caption_feats = self.caption_feats.to(self.image_feats.device)
        if self.views is not None:
            if not isinstance(self.views, Tensor) or self.views.ndim != 3 or self.views.shape[1:] != (n, d):
                got = tuple(self.views.shape) if isinstance(self.views, Tensor) else type(self.views).__name__
                raise ValueError(f"support.views: expected shape (V, N={n}, D={d}), got {got}")
            self.views = check_features("support.views", self.views.flatten(0, 1), dim=d).view(-1, n, d)
            self.views = self.views.to(self.image_feats.device)

    @classmethod
    def from_views(cls, views: Tensor, labels: Tensor, caption_feats: Tensor | None = None) -> SupportSet:
        """The cache of the official code: keys F = normalize(mean of the V views) (V, N, D) -> (N, D)."""
        keys = torch.nn.functional.normalize(views.float().mean(0), dim=-1)
        return cls(keys, labels, caption_feats, views)

    def __len__(self) -> int:
        return self.image_feats.shape[0]

    @property
    def dim(self) -> int:
        return self.image_feats.shape[1]

    def to(self, device: torch.device | str) -> SupportSet:
        caps = None if self.caption_feats is None else self.caption_feats.to(device)
        views = None if self.views is None else self.views.to(device)
        return SupportSet(self.image_feats.to(device), self.labels.to(device), caps, views)


def caps_prompt(classname: str, caption: str) -> str:
    """The text CapS-Adapter encodes for a captioned support image: ``"A photo of {classname}. {caption}"``.

    Surrounding whitespace of the caption is stripped; an empty caption gives ``"A photo of {classname}."``.
    """
    caption = caption.strip()
    return f"A photo of {classname}. {caption}" if caption else f"A photo of {classname}."


def sample_shots(labels: Tensor, k: int, seed: int, *, num_classes: int | None = None) -> Tensor:
    """Pick ``k`` indices per class from ``labels`` (N,), reproducibly.

    Returns an int64 tensor of shape (num_present_classes * k,) grouped by class in ascending order.
    One seeded permutation of all N indices decides the order, and each class takes its first ``k``
    there, so the same seed gives the same shots and the 1-shot set is inside the 4-shot set.
    Every class in ``labels`` (or, with ``num_classes``, every class in ``range(num_classes)``) must
    have at least ``k`` examples.
    """
    labels = check_labels("labels", labels, num_classes=num_classes)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (shots per class): expected an int >= 1, got {k!r}")
    if labels.numel() == 0:
        raise ValueError("labels: is empty, nothing to sample shots from")
    labels = labels.cpu()
    n_cls = num_classes if num_classes is not None else int(labels.max().item()) + 1
    counts = torch.bincount(labels, minlength=n_cls)
    wanted = torch.arange(n_cls) if num_classes is not None else torch.nonzero(counts).flatten()
    short = [c for c in wanted.tolist() if counts[c].item() < k]
    if short:
        listed = ", ".join(f"class {c} has {counts[c].item()}" for c in short[:10])
        more = f" (and {len(short) - 10} more classes)" if len(short) > 10 else ""
        raise ValueError(f"sample_shots: k={k} shots per class requested but {listed}{more}")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(labels.numel(), generator=gen)
    order = torch.argsort(labels[perm], stable=True)  # grouped by class, permutation order inside a class
    grouped = perm[order]
    sorted_labels = labels[grouped]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(labels.numel()) - starts[sorted_labels]
    return grouped[rank < k]


# The keyword options each kind accepts (forwarded to the recipe's constructor and search).
_OPTIONS: dict[str, frozenset[str]] = {
    "tip": frozenset({"alphas", "betas"}),
    "tip-f": frozenset({"alphas", "betas", "epochs", "lr", "eps", "batch_size", "weight_decay", "init_alpha", "init_beta"}),
    "caps": frozenset({"alphas", "betas", "gammas", "deltas", "temperature"}),
}


def fit_fewshot(
    kind: FewShotKind,
    clip_weights: Tensor,
    support: SupportSet,
    val_feats: Tensor,
    val_labels: Tensor,
    *,
    seed: int = 0,
    progress: bool = True,
    train: bool = True,
    **options: Any,
) -> FewShotClassifier:
    """Build a few-shot classifier and tune it on validation features only.

    Args:
        kind: ``"tip"`` (training-free Tip-Adapter), ``"tip-f"`` (Tip-Adapter-F, trains the cache keys)
            or ``"caps"`` (CapS-Adapter; needs ``support.caption_feats``).
        clip_weights: (D, C) zero-shot classifier, L2-normalized columns.
        support: the K-shot cache.
        val_feats: (M, D) L2-normalized validation image features; the only data the search sees.
        val_labels: (M,) int64 validation labels.
        seed: seeds Tip-Adapter-F's training; Tip and CapS are deterministic.
        progress: show progress bars (Tip-F epochs, CapS search).
        train: Tip-Adapter-F only: False searches (α, β) with the keys still F and leaves the training of the
            keys to the caller (``mmadapters train tip-adapter`` trains them on the training engine).
        options: per kind — tip: ``alphas``, ``betas`` (grids); tip-f: those plus ``epochs``, ``lr``,
            ``eps``, ``batch_size``, ``weight_decay``, ``init_alpha``, ``init_beta`` (the fixed training values);
            caps: ``alphas``, ``betas``, ``gammas``, ``deltas`` (one joint grid), ``temperature``.

    Returns:
        A classifier with ``.logits(feats (B, D)) -> (B, C)`` and ``.hyperparams`` (the searched values,
        ``val_acc1`` and ``zeroshot_val_acc1``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    unknown = sorted(set(options) - _OPTIONS[kind])
    if unknown:
        raise TypeError(f"fit_fewshot(kind={kind!r}): unknown option(s) {unknown}; accepted: {sorted(_OPTIONS[kind])}")
    if not isinstance(support, SupportSet):
        raise TypeError(f"support: expected a SupportSet, got {type(support).__name__}")
    w = check_clip_weights(clip_weights, support.dim)
    device = w.device
    support = support.to(device)
    val_feats = check_features("val_feats", val_feats, dim=support.dim).to(device)
    val_labels = check_labels("val_labels", val_labels, rows=val_feats.shape[0], num_classes=w.shape[1]).to(device)
    check_labels("support.labels", support.labels, num_classes=w.shape[1])

    search_keys = {"alphas", "betas", "gammas", "deltas"}
    search_opts = {k: v for k, v in options.items() if k in search_keys}
    build_opts = {k: v for k, v in options.items() if k not in search_keys}
    if kind == "tip":
        from .tip_adapter import TipAdapter

        model = TipAdapter(w, support)
        model.search(val_feats, val_labels, **search_opts)
    elif kind == "tip-f":
        from .tip_adapter import TipAdapterF

        model = TipAdapterF(w, support)
        if train:
            model.fit(val_feats, val_labels, seed=seed, progress=progress, **build_opts, **search_opts)
        elif build_opts:
            raise TypeError(f"fit_fewshot(kind='tip-f', train=False): training options {sorted(build_opts)} need train=True")
        else:
            model.search(val_feats, val_labels, **search_opts)
    else:
        from .caps_adapter import CapsAdapter

        if support.caption_feats is None:
            raise ValueError(
                "support.caption_feats: kind='caps' needs the CLIP text features of caps_prompt(class, caption) "
                "for every support image (shape (N, D)); got None — give captions or use kind='tip'"
            )
        model = CapsAdapter(w, support, **build_opts)
        model.search(val_feats, val_labels, progress=progress, **search_opts)
    return model


def support_set(feats: Tensor, labels: Tensor, *, index: Tensor | None = None, views: Tensor | None = None,
                caption_feats: Tensor | None = None) -> SupportSet:
    """The cache of the shots ``index`` (default: all) of encoded images ``feats`` (N, D), ``labels`` (N,).

    With ``views`` (V, N, D) the keys are the official cache, the mean of the shots' augmented views
    (``SupportSet.from_views``; Tip-F trains on the views), else the shots' own features. ``caption_feats``
    (N, D): CapS's prompt feature of each image, kept with its shot.
    """
    if index is not None:
        feats, labels = feats[index], labels[index]
        views = None if views is None else views[:, index]
        caption_feats = None if caption_feats is None else caption_feats[index]
    if views is not None:
        return SupportSet.from_views(views, labels, caption_feats)
    return SupportSet(feats, labels, caption_feats)


def augmented_transform(preprocess: Any) -> Any:
    """The official Tip-Adapter training augmentation for a CLIP's eval ``preprocess``: RandomResizedCrop(size,
    scale (0.5, 1), bicubic) and a horizontal flip (p 0.5), then the preprocess's own tensor conversion and
    normalization (the steps after its centre crop)."""
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    crops = [i for i, t in enumerate(steps) if isinstance(t, T.CenterCrop)]
    if not crops:
        raise ValueError(f"preprocess: expected a torchvision Compose with a CenterCrop (a CLIP eval transform), got {preprocess!r}")
    size = steps[crops[0]].size
    return T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(p=0.5), *steps[crops[0] + 1:]])


def encode_views(model: Any, dataset: Any, views: int, *, seed: int = 0, batch_size: int = 64, device: str = "cpu",
                 progress: bool = False) -> tuple[Tensor, Tensor, list[str]]:
    """Features of ``views`` augmented passes over ``dataset`` (a reader whose transform is ``augmented_transform``).

    Returns (features (V, N, D) L2-normalized float32 on CPU, labels (N,), paths). The augmentation draws from
    torch's global RNG, seeded with ``seed`` inside ``torch.random.fork_rng`` (the caller's RNG state is kept),
    so the same seed gives the same views. Every image must be readable (a view set needs all N images).
    """
    from .readers import image_loader
    from .zeroshot import extract_image_features

    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"views (augmented passes): expected an int >= 1, got {views!r}")
    passes = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(seed))
        for v in range(views):
            feats = extract_image_features(model, image_loader(dataset, batch_size=batch_size, device=device),
                                           device=device, progress=progress, desc=f"augmented view {v + 1}/{views}")
            if feats.skipped:
                raise ValueError(f"{feats.skipped[0].path}: cannot read image ({feats.skipped[0].reason}); augmented "
                                 "views need every support image")
            passes.append(feats.features.float())
    return torch.stack(passes), feats.labels, list(feats.paths)
