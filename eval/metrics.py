"""Classification metrics with CLIP_benchmark's conventions. Leaf module: numpy/torch only.

- ``acc1`` / ``acc5``: fraction of samples whose label is among the top-k logits; top-k accuracy is
  NaN when there are fewer than k classes (CLIP_benchmark reports acc5 as NaN then).
- ``mean_per_class_recall``: recall averaged over the classes that occur in the labels (balanced
  accuracy, as CLIP_benchmark computes it).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _as_tensor(x) -> torch.Tensor:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def topk_accuracy(logits, labels, k: int) -> float:
    """Top-``k`` accuracy of ``logits`` (N, C) against integer ``labels`` (N,); NaN if C < k or N == 0."""
    logits, labels = _as_tensor(logits), _as_tensor(labels).long()
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[1] < k or logits.shape[0] == 0:
        return math.nan
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).double().mean().item()


def mean_per_class_recall(predictions, labels, num_classes: int | None = None) -> float:
    """Mean over the classes present in ``labels`` (N,) of the fraction of their samples predicted right."""
    pred, labels = _as_tensor(predictions).long(), _as_tensor(labels).long()
    if pred.shape != labels.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and labels {tuple(labels.shape)} differ in shape")
    if labels.numel() == 0:
        return math.nan
    n = int(max(labels.max().item(), pred.max().item()) + 1) if num_classes is None else num_classes
    support = torch.bincount(labels, minlength=n).double()
    correct = torch.bincount(labels[pred == labels], minlength=n).double()
    present = support > 0
    return (correct[present] / support[present]).mean().item()


def classification_metrics(logits, labels) -> dict[str, float]:
    """``{"acc1", "acc5", "mean_per_class_recall"}`` for ``logits`` (N, C) and ``labels`` (N,)."""
    logits = _as_tensor(logits)
    labels = _as_tensor(labels).long()
    pred = logits.argmax(dim=1) if logits.shape[0] else labels
    return {
        "acc1": topk_accuracy(logits, labels, 1),
        "acc5": topk_accuracy(logits, labels, 5),
        "mean_per_class_recall": mean_per_class_recall(pred, labels, logits.shape[1]),
    }
