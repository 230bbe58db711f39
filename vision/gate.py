"""The gate of a few-shot task: does a handful of images carry what the prompts miss?

Tip-Adapter and CapS-Adapter gain over zero-shot CLIP only where the target domain holds something the
class prompts do not say (EuroSAT, DTD on real CLIP). The gate measures that condition with the CLIP in
use, on the task's **test** split::

    linear_probe_acc  top-1 of a logistic regression on the frozen L2-normalized image features,
                      fitted on ``shots`` (16) images per class of the train split (L2 strength chosen on val)
    zeroshot_acc      top-1 of zero-shot CLIP (100 · f · W)
    gap               linear_probe_acc − zeroshot_acc

A task whose gap is under :data:`MIN_GAP` (10 points) is still evaluated, but no adapter gain is claimed
on it. ``mmadapters fewshot-compare`` computes the gate from the features it has already encoded (no
extra pass over the images) and, for the shipped CLIP, writes it into the task's ``task.json`` under
``gate`` (atomically), so generation itself never needs a CLIP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_GAP = 0.10
SHOTS = 16
# L2 penalties tried for the probe (CLIP's linear-probe protocol sweeps sklearn's C on a held-out split).
L2_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
NOT_PASSED = "gate not passed: no adapter gain claimed"


def fit_probe(x: Tensor, y: Tensor, num_classes: int, l2: float, *, steps: int = 100) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, full batch L-BFGS: (N, D) features, (N,) labels -> W (D, C), b (C,).

    Loss: mean cross-entropy of ``x @ W + b`` plus ``l2 · ‖W‖²``. Deterministic (zero init, no sampling).
    """
    x, y = x.float().clone(), y.long().clone()  # clones: features made under inference_mode cannot enter autograd
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may run under no_grad / inference_mode
        opt.step(closure)
    return w.detach(), b.detach()


def _acc(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


def linear_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, test_x: Tensor, test_y: Tensor,
                 num_classes: int, *, l2_grid: tuple[float, ...] = L2_GRID) -> dict[str, float]:
    """Fit the probe per L2 strength on train, keep the best on val (ties: the stronger penalty), score test.

    Features (N, D) are L2-normalized and multiplied by 10 (a fixed temperature, so the penalty grid means
    the same for every CLIP). Returns ``{"test_acc", "val_acc", "l2"}``.
    """
    best: tuple[float, float, Tensor, Tensor] | None = None
    for l2 in sorted(l2_grid, reverse=True):
        w, b = fit_probe(10 * train_x, train_y, num_classes, l2)
        val_acc = _acc(10 * val_x @ w + b, val_y)
        if best is None or val_acc > best[0]:
            best = (val_acc, l2, w, b)
    assert best is not None
    val_acc, l2, w, b = best
    return {"test_acc": _acc(10 * test_x @ w + b, test_y), "val_acc": val_acc, "l2": l2}


def compute_gate(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, test_x: Tensor, test_y: Tensor,
                 clip_weights: Tensor, *, shots: int = SHOTS, seed: int = 0) -> dict[str, Any]:
    """The gate of a task from its encoded splits (features (N, D) L2-normalized on CPU, labels (N,)).

    ``shots`` images per class are sampled from train with ``sample_shots(train_y, shots, seed)`` (all of
    them if a class has fewer). ``clip_weights`` (D, C) is the zero-shot classifier. Returns the JSON-ready
    ``{"linear_probe_acc", "zeroshot_acc", "gap", "passed", "min_gap", "shots", "probe_l2"}``.
    """
    from .fewshot import sample_shots

    num_classes = clip_weights.shape[1]
    k = min(shots, int(torch.bincount(train_y, minlength=num_classes).min().item()))
    if k < 1:
        raise ValueError(f"gate: every class needs at least one train image; found a class with none ({num_classes} classes)")
    index = sample_shots(train_y, k, seed, num_classes=num_classes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a (160, D) problem: on a busy 2-core machine thread hand-offs cost 10x the maths
    try:
        probe = linear_probe(train_x[index], train_y[index], val_x, val_y, test_x, test_y, num_classes)
    finally:
        torch.set_num_threads(threads)
    zeroshot = _acc(test_x.float() @ clip_weights.float().cpu(), test_y)
    gap = probe["test_acc"] - zeroshot
    return {"linear_probe_acc": round(probe["test_acc"], 6), "zeroshot_acc": round(zeroshot, 6), "gap": round(gap, 6),
            "passed": gap >= MIN_GAP, "min_gap": MIN_GAP, "shots": k, "probe_l2": probe["l2"]}


def read_gate(root: str | Path) -> dict[str, Any] | None:
    """The ``gate`` recorded in ``root/task.json``, or None when there is none (or no readable task.json)."""
    try:
        record = json.loads((Path(root) / "task.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    gate = record.get("gate") if isinstance(record, dict) else None
    return gate if isinstance(gate, dict) else None


def write_gate(root: str | Path, gate: dict[str, Any]) -> None:
    """Record ``gate`` in ``root/task.json`` under ``gate`` (atomic rewrite; the other fields are kept)."""
    from mmadapters.io import atomic_write_bytes

    meta = Path(root) / "task.json"
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta}: cannot record the gate, the file is unreadable ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{meta}: expected a JSON object, got {type(record).__name__}")
    record["gate"] = gate
    atomic_write_bytes(meta, (json.dumps(record, indent=2) + "\n").encode("utf-8"))


def passed(gate: dict[str, Any] | None) -> bool:
    """Whether a gate (as :func:`compute_gate` returns it) lets a gain be claimed."""
    return bool(gate) and float(gate["gap"]) >= MIN_GAP
