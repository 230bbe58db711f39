"""Tip-Adapter (training-free) and Tip-Adapter-F (trainable cache keys) on precomputed CLIP features.

Tip-Adapter keeps a key-value cache of the few-shot support set: keys F (N, D) are the L2-normalized
support image features, values L (N, C) their one-hot labels. For an image feature f (B, D):

    clip_logits  = 100 · f · W                      W: (D, C) zero-shot classifier
    A            = exp(−β (1 − f · Fᵀ))              (B, N) affinities to the cached shots
    logits       = clip_logits + α · A · L           (B, C)

α weighs the cache against CLIP's prior, β sharpens the affinities. Both come from a grid search
(β: 200 steps in 0.1..13, the top of the official configs' 7–13; α: 0 and 20 log-spaced values) on a
**validation** split. The official code grid-searches
on the test set in some scripts; we never do: ``search`` only ever receives validation features.

Tip-Adapter-F turns the keys into a trainable ``nn.Linear`` initialized from F and trains only them
(AdamW, lr 1e-3, eps 1e-4, cosine schedule, 20 epochs) as the official code does: at the fixed initial
α, β of its configs (not at searched values: a searched α = 0 would give the keys no gradient), on
augmented views (random crop, flip) of the support images (training on the keys themselves teaches
nothing: each key matches its own sample perfectly), with F the mean of the views' features (official:
10 augmented passes; ``fewshot.encode_views``). The official code keeps the epoch with the best **test**
accuracy; ``TipAdapterF.fit`` keeps the epoch with the best searched **validation** accuracy.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .fewshot import SupportSet, check_clip_weights, check_features, check_labels

# β from 0.1 to 13 in 200 linear steps (official configs: 7 to 13). α: 0 (zero-shot CLIP, so the search never ends below zero-shot
# accuracy on validation) and 20 log-spaced values from 0.1 to 1000 — the right α scales with how spread
# the zero-shot logits are, which differs between backbones (1-2 for OpenAI CLIP on ImageNet), and where the
# prompts say nothing (class names the text tower never saw) the cache must outweigh them: 100 was an edge.
DEFAULT_BETAS: tuple[float, ...] = tuple(torch.linspace(0.1, 13.0, 200).tolist())
# Tip-Adapter-F trains at these (the official configs' init_alpha / init_beta for most datasets).
INIT_ALPHA, INIT_BETA = 1.0, 1.0
DEFAULT_ALPHAS: tuple[float, ...] = (0.0, *torch.logspace(-1, 3, 20).tolist())

# Elements of the largest temporary of the grid search (float32: 2^24 elements = 64 MiB).
_MAX_ELEMS = 1 << 24


def as_grid(name: str, values: Sequence[float] | Tensor | None, default: Sequence[float]) -> Tensor:
    """A 1-D float32 grid from user values (or the default); errors name the option."""
    if values is None:
        values = default
    grid = torch.as_tensor(values, dtype=torch.float32).flatten()
    if grid.numel() == 0:
        raise ValueError(f"{name}: the search grid is empty")
    if not torch.isfinite(grid).all():
        raise ValueError(f"{name}: the search grid has NaN or inf values")
    return grid


def margins(base: Tensor, labels: Tensor) -> Tensor:
    """(..., M, C) logits, (M,) labels -> (..., M, C) u = base_y − base_c, with u_y set to 1 (see ``correct_interval``)."""
    y = labels.view(-1, 1).expand(*base.shape[:-1], 1)
    return (base.gather(-1, y) - base).scatter_(-1, y, 1.0)


def correct_interval(u: Tensor, cache: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """For which α is ``base + α · cache`` right? Returns (lo, hi): right exactly when lo < α < hi.

    Args:
        u: (..., M, C) ``margins(base, labels)``; cache: (..., M, C) cache logits (the two broadcast); labels: (M,).

    The true class y beats class c when u_c + α v_c > 0, with u = base_y − base_c and v = cache_y − cache_c:
    for v_c > 0 that is α > −u_c/v_c, for v_c < 0 it is α < −u_c/v_c, and for v_c = 0 it needs u_c > 0
    (then −u_c/v_c is −inf; with u_c < 0 it is +inf, with u_c = 0 NaN: never right). So the good α form
    one open interval, found in O(C) per image instead of trying every α on all C classes. Setting
    u_y = 1 makes the true class's own column (v_y = 0) a non-constraint. Exact ties count as errors.
    Returns two (..., M) tensors (the broadcast shape of u and cache without C).
    """
    y = labels.view(-1, 1)
    v = cache.gather(-1, y.expand(*cache.shape[:-1], 1)) - cache  # (..., M, C)
    t = -u / v
    below = v < 0
    lo = t.masked_fill(below, -torch.inf).amax(-1)
    hi = t.masked_fill_(~below, torch.inf).amin(-1)
    return lo, hi


def _class_summer(values: Tensor) -> tuple[Tensor | None, Callable[[Tensor], Tensor]]:
    """How to sum (..., N) over each class's shots -> (..., C), i.e. ``x @ values`` for one-hot values.

    With the same number of shots K in every class (what ``sample_shots`` gives) the columns are put in
    shot-major order (column k·C + c is shot k of class c) and the sum is K vector adds over (..., K, C),
    several times faster than the matmul. Returns (column order or None, the summing function).
    """
    n, c = values.shape
    labels = values.argmax(1)
    counts = values.sum(0).long()
    k = int(counts[0].item())
    if k == 0 or not bool((counts == k).all()):
        return None, lambda x: x @ values
    by_class = torch.argsort(labels, stable=True)
    rank = torch.empty_like(labels)
    rank[by_class] = torch.arange(n, device=labels.device) - (torch.cumsum(counts, 0) - counts)[labels[by_class]]
    return torch.argsort(rank * c + labels), lambda x: x.unflatten(-1, (k, c)).sum(-2)


def grid_accuracy(bases: Tensor, affinity: Tensor, values: Tensor, betas: Tensor, alphas: Tensor, labels: Tensor) -> Tensor:
    """Validation accuracy of ``bases[g] + α · exp(−β (1 − affinity)) · L`` over a whole grid at once.

    Args:
        bases: (G, M, C) logits without the cache term (G variants, e.g. one per CapS γ).
        affinity: (M, N) affinities of the M validation images to the N support images.
        values: (N, C) one-hot cache values L.
        betas: (B,), alphas: (P,) the grid.
        labels: (M,) validation labels.

    Returns:
        (G, B, P) top-1 accuracies. Per β the cache logits are one pass over (M, N), shared by every g;
        per (g, β) and image the α values that classify it right form one interval (``correct_interval``),
        so the α axis costs a comparison, not a pass over the classes. Rows and β values go through in
        chunks so no temporary exceeds ``_MAX_ELEMS`` elements; nothing loops per grid point in Python.
    """
    g_count, m, c = bases.shape
    n = affinity.shape[1]
    order, class_sum = _class_summer(values)
    if order is not None:
        affinity = affinity[:, order]
    per_row = max(n, g_count * 4 * c, g_count * alphas.numel())
    rows = max(1, min(m, _MAX_ELEMS // per_row))
    correct = torch.zeros(g_count, betas.numel(), alphas.numel(), device=bases.device)
    alphas = alphas.to(bases.device)
    for r0 in range(0, m, rows):
        aff = affinity[r0 : r0 + rows] - 1  # (m', N)
        y = labels[r0 : r0 + rows]
        u = margins(bases[:, r0 : r0 + rows], y).unsqueeze(1)  # (G, 1, m', C)
        chunk = max(1, _MAX_ELEMS // (aff.shape[0] * per_row))
        for b0 in range(0, betas.numel(), chunk):
            beta = betas[b0 : b0 + chunk].to(bases.device).view(-1, 1, 1)
            cache = class_sum(torch.mul(beta, aff).exp_())  # (b, m', C)
            lo, hi = correct_interval(u, cache, y)  # (G, b, m')
            inside = (alphas > lo.unsqueeze(-1)) & (alphas < hi.unsqueeze(-1))  # (G, b, m', P)
            correct[:, b0 : b0 + chunk] += inside.sum(-2)
    return correct / m


def at_edge(chosen: dict[str, float], grids: dict[str, Tensor]) -> list[str]:
    """The searched hyperparameters whose value is the top of a grid of several values (the grid may be too short)."""
    return [k for k, v in chosen.items() if grids[k].numel() > 1 and v >= grids[k].max().item()]


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of (M, C) logits against (M,) labels, as a fraction."""
    return (logits.argmax(-1) == labels).float().mean().item()


class CacheModel(nn.Module):
    """What Tip-Adapter and CapS-Adapter share: the zero-shot classifier W (D, C) and a labelled cache
    (buffers ``clip_weights``, ``cache_labels`` (N,), one-hot ``cache_values`` L (N, C))."""

    def _init_cache(self, clip_weights: Tensor, support: SupportSet) -> SupportSet:
        """Check and register W and the cache labels; returns ``support`` on W's device."""
        if not isinstance(support, SupportSet):
            raise TypeError(f"support: expected a SupportSet, got {type(support).__name__}")
        w = check_clip_weights(clip_weights, support.dim)
        support = support.to(w.device)
        labels = check_labels("support.labels", support.labels, num_classes=w.shape[1])
        self.register_buffer("clip_weights", w)
        self.register_buffer("cache_labels", labels.clone())
        self.register_buffer("cache_values", F.one_hot(labels, w.shape[1]).float())
        return support

    @property
    def num_classes(self) -> int:
        return self.clip_weights.shape[1]

    @property
    def dim(self) -> int:
        return self.clip_weights.shape[0]

    def clip_logits(self, feats: Tensor) -> Tensor:
        """(B, D) -> (B, C): zero-shot CLIP logits 100 · f · W."""
        return 100.0 * feats @ self.clip_weights


class TipAdapter(CacheModel):
    """Training-free Tip-Adapter over a support set of precomputed CLIP features.

    Args:
        clip_weights: (D, C) zero-shot classifier with L2-normalized columns.
        support: the K-shot cache (its ``caption_feats`` are ignored).
        alpha, beta: initial hyperparameters (``search`` replaces them).

    Buffers: ``clip_weights`` (D, C), ``cache_keys`` F (N, D), ``cache_values`` L (N, C) one-hot.
    """

    kind = "tip"

    def __init__(self, clip_weights: Tensor, support: SupportSet, *, alpha: float = 1.0, beta: float = 1.0):
        super().__init__()
        support = self._init_cache(clip_weights, support)
        self.register_buffer("cache_keys", support.image_feats.clone())
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.hyperparams: dict[str, Any] = {"kind": self.kind, "alpha": self.alpha, "beta": self.beta}

    def affinity(self, feats: Tensor) -> Tensor:
        """(B, D) -> (B, N): cosine similarities f · Fᵀ to the cached keys."""
        return feats @ self.cache_keys.T

    def cache_logits(self, feats: Tensor, beta: float | None = None) -> Tensor:
        """(B, D) -> (B, C): A · L with A = exp(−β (1 − f · Fᵀ))."""
        beta = self.beta if beta is None else beta
        return torch.exp(beta * (self.affinity(feats) - 1)) @ self.cache_values

    def forward(self, feats: Tensor) -> Tensor:
        """(B, D) L2-normalized features -> (B, C) logits (differentiable; no input checks)."""
        return self.clip_logits(feats) + self.alpha * self.cache_logits(feats)

    @torch.no_grad()
    def logits(self, feats: Tensor) -> Tensor:
        """(B, D) L2-normalized image features -> (B, C) logits. Each row depends only on its own image."""
        feats = check_features("feats", feats, dim=self.dim).to(self.clip_weights.device)
        return self(feats)

    def _check_val(self, val_feats: Tensor, val_labels: Tensor) -> tuple[Tensor, Tensor]:
        device = self.clip_weights.device
        val_feats = check_features("val_feats", val_feats, dim=self.dim).to(device)
        val_labels = check_labels("val_labels", val_labels, rows=val_feats.shape[0], num_classes=self.num_classes)
        return val_feats, val_labels.to(device)

    @torch.no_grad()
    def search(
        self,
        val_feats: Tensor,
        val_labels: Tensor,
        *,
        alphas: Sequence[float] | Tensor | None = None,
        betas: Sequence[float] | Tensor | None = None,
    ) -> dict[str, Any]:
        """Pick (α, β) maximizing top-1 accuracy on the validation features; sets and returns them.

        Args:
            val_feats: (M, D) L2-normalized validation image features.
            val_labels: (M,) validation labels.
            alphas, betas: grids (default: α = 0 and 20 log-spaced values in 0.1..1000; β in 0.1..13, 200 steps).

        The whole grid is evaluated in a few batched tensor operations (``grid_accuracy``). Ties go to
        the first grid point in (β, α) order, so an unhelpful cache leaves α = 0 (zero-shot).
        Returns ``self.hyperparams``.
        """
        start = time.perf_counter()
        val_feats, val_labels = self._check_val(val_feats, val_labels)
        alpha_grid = as_grid("alphas", alphas, DEFAULT_ALPHAS)
        beta_grid = as_grid("betas", betas, DEFAULT_BETAS)
        base = self.clip_logits(val_feats)
        acc = grid_accuracy(
            base[None], self.affinity(val_feats), self.cache_values, beta_grid, alpha_grid, val_labels
        )[0]
        b, a = divmod(int(torch.argmax(acc).item()), alpha_grid.numel())
        self.alpha, self.beta = alpha_grid[a].item(), beta_grid[b].item()
        self.hyperparams.update(
            alpha=tidy(self.alpha),
            beta=tidy(self.beta),
            val_acc1=acc[b, a].item(),
            zeroshot_val_acc1=accuracy(base, val_labels),
            val_images=val_feats.shape[0],
            support_images=self.cache_labels.numel(),
            grid={"alphas": describe_grid(alpha_grid), "betas": describe_grid(beta_grid)},
            at_edge=at_edge({"alpha": self.alpha, "beta": self.beta}, {"alpha": alpha_grid, "beta": beta_grid}),
            search_seconds=round(time.perf_counter() - start, 4),
        )
        return self.hyperparams


def tidy(x: float) -> float:
    """A grid value for the JSON report: 6 significant digits (0.1 rather than 0.10000000149011612)."""
    return float(f"{x:.6g}")


def describe_grid(grid: Tensor) -> dict[str, float | int]:
    return {"min": tidy(grid.min().item()), "max": tidy(grid.max().item()), "steps": grid.numel()}


class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys become a trainable ``nn.Linear`` (``keys``) initialized from F.

    Only ``keys.weight`` (N, D) trains; the zero-shot classifier and the cache values stay fixed
    (they are buffers). The training inputs are ``support.views`` (V, N, D), augmented views of the
    support images, when the support set has them, else the cache keys (a fallback that teaches little:
    ``hyperparams["train_inputs"]`` says which).
    """

    kind = "tip-f"

    def __init__(self, clip_weights: Tensor, support: SupportSet, *, alpha: float = 1.0, beta: float = 1.0):
        super().__init__(clip_weights, support, alpha=alpha, beta=beta)
        n, d = self.cache_keys.shape
        self.keys = nn.Linear(d, n, bias=False).to(self.cache_keys.device)
        with torch.no_grad():
            self.keys.weight.copy_(self.cache_keys)
        views = None if support.views is None else support.views.to(self.cache_keys.device)
        self.train_views: Tensor = views if views is not None else self.cache_keys[None]  # (V, N, D)
        self.train_inputs = "augmented views" if views is not None else "cache keys"

    def affinity(self, feats: Tensor) -> Tensor:
        """(B, D) -> (B, N): f · Kᵀ with the trained keys K (not re-normalized, as in the paper)."""
        return self.keys(feats)

    def fit(
        self,
        val_feats: Tensor,
        val_labels: Tensor,
        *,
        epochs: int = 20,
        lr: float = 1e-3,
        eps: float = 1e-4,
        batch_size: int = 256,
        weight_decay: float = 0.01,
        init_alpha: float = INIT_ALPHA,
        init_beta: float = INIT_BETA,
        seed: int = 0,
        progress: bool = True,
        alphas: Sequence[float] | Tensor | None = None,
        betas: Sequence[float] | Tensor | None = None,
    ) -> dict[str, Any]:
        """Train the keys at the fixed (``init_alpha``, ``init_beta``), keep the best epoch on validation.

        1. Search (α, β) as Tip-Adapter does (the keys are still F): epoch 0, the training-free Tip.
        2. Train the keys with cross-entropy at (``init_alpha``, ``init_beta``) — the official code's fixed
           initial values — on the training inputs: epoch e uses view e mod V of every support image
           (``support.views``), batches shuffled by ``seed``; AdamW(lr, eps, weight_decay), cosine schedule.
        3. After each epoch search (α, β) on validation for the current keys; keep the best epoch (epoch 0
           included, so Tip-F never ends below Tip on validation). The official code picks the epoch by
           *test* accuracy at the initial values; we use the searched validation accuracy.

        Returns ``self.hyperparams`` (adds ``tip_val_acc1``, ``best_epoch``, ``epoch_val_acc1``, the
        training (α, β), ``train_inputs``, ``views`` and the training settings).
        """
        for name, value, ok in (
            ("epochs", epochs, isinstance(epochs, int) and epochs >= 0),
            ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
            ("lr", lr, lr > 0),
            ("eps", eps, eps > 0),
            ("init_beta", init_beta, init_beta > 0),
            ("init_alpha", init_alpha, init_alpha > 0),
        ):
            if not ok:
                raise ValueError(f"{name}: expected a positive value, got {value!r}")
        val_feats, val_labels = self._check_val(val_feats, val_labels)
        tip = dict(self.search(val_feats, val_labels, alphas=alphas, betas=betas))
        start = time.perf_counter()
        best_acc, best_epoch = tip["val_acc1"], 0
        best_state = copy.deepcopy(self.keys.state_dict())
        history = [best_acc]

        views, train_y = self.train_views, self.cache_labels
        n = train_y.numel()
        steps_per_epoch = math.ceil(n / batch_size)
        opt = torch.optim.AdamW(self.keys.parameters(), lr=lr, eps=eps, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
        gen = torch.Generator().manual_seed(int(seed))
        bar = tqdm(range(1, epochs + 1), desc="tip-f epochs", disable=not progress, leave=False)
        for epoch in bar:
            self.train()
            self.alpha, self.beta = float(init_alpha), float(init_beta)
            train_x = views[(epoch - 1) % views.shape[0]]
            perm = torch.randperm(n, generator=gen).to(train_x.device)
            for s in range(0, n, batch_size):
                idx = perm[s : s + batch_size]
                loss = F.cross_entropy(self(train_x[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            self.eval()
            acc = self.search(val_feats, val_labels, alphas=alphas, betas=betas)["val_acc1"]
            history.append(acc)
            bar.set_postfix(loss=f"{loss.item():.3f}", val_acc1=f"{acc:.4f}")
            if acc > best_acc:
                best_acc, best_epoch = acc, epoch
                best_state = copy.deepcopy(self.keys.state_dict())
        self.keys.load_state_dict(best_state)
        train_seconds = time.perf_counter() - start
        self.search(val_feats, val_labels, alphas=alphas, betas=betas)
        self.hyperparams.update(
            kind=self.kind,
            tip_val_acc1=tip["val_acc1"],
            tip_alpha=tip["alpha"],
            tip_beta=tip["beta"],
            train_alpha=float(init_alpha),
            train_beta=float(init_beta),
            train_inputs=self.train_inputs,
            views=int(views.shape[0]) if self.train_inputs == "augmented views" else 0,
            best_epoch=best_epoch,
            epoch_val_acc1=[round(a, 6) for a in history],
            epochs=epochs,
            lr=lr,
            eps=eps,
            batch_size=batch_size,
            weight_decay=weight_decay,
            seed=seed,
            train_seconds=round(train_seconds, 4),
        )
        return self.hyperparams
