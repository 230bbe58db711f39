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


# ---------------------------------------------------------------------------------------------------------
# Dynamic facial expression recognition (DFEW / MAFW / FERV39k convention)


def war(y_true, y_pred) -> float:
    """Weighted average recall = overall accuracy over the samples (N,); NaN for N == 0."""
    t, p = _as_tensor(y_true).long(), _as_tensor(y_pred).long()
    if t.shape != p.shape:
        raise ValueError(f"y_true {tuple(t.shape)} and y_pred {tuple(p.shape)} differ in shape")
    return math.nan if t.numel() == 0 else (t == p).double().mean().item()


def uar(y_true, y_pred, num_classes: int | None = None) -> float:
    """Unweighted average recall: recall per class present in ``y_true``, averaged with equal weights."""
    return mean_per_class_recall(y_pred, y_true, num_classes)


# ---------------------------------------------------------------------------------------------------------
# Speech recognition: corpus-level WER / CER on the strings given (normalize first with normalize_text)

_PUNCT_CATEGORIES = ("P", "S")  # Unicode punctuation and symbols; combining marks (M*) are kept


def normalize_text(text: str) -> str:
    """The normalization the ASR evaluator applies before WER/CER (a separate, explicit step).

    NFC-compose, lowercase (``str.casefold`` is not used: it rewrites ß → ss), replace every Unicode
    punctuation or symbol character by a space except apostrophes inside a word (``don't``; ``’`` becomes
    ``'``), keep combining marks (Devanagari vowel signs, Arabic harakat, …) and collapse whitespace.
    Numbers are kept as written (no spelling out); a hyphen splits words (``e-mail`` → ``e mail``).
    """
    import unicodedata

    def word_char(c: str) -> bool:  # letters, digits and the combining marks that belong to them
        return c.isalnum() or unicodedata.category(c)[0] == "M"

    # NFC again after lower(): Unicode does not promise that lowercasing keeps a string in NFC.
    text = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).lower())
    out = []
    n = len(text)
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if ch in "'’" and 0 < i < n - 1 and word_char(text[i - 1]) and word_char(text[i + 1]):
            out.append("'")
        elif cat[0] in _PUNCT_CATEGORIES:
            out.append(" ")
        else:
            out.append(ch)
    return " ".join("".join(out).split())


def edit_distance(ref: list | str, hyp: list | str) -> int:
    """Levenshtein distance (substitutions + deletions + insertions) between two token sequences."""
    if len(ref) < len(hyp):
        ref, hyp = hyp, ref
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def _check_pairs(references, hypotheses) -> tuple[list[str], list[str]]:
    for name, seq in (("references", references), ("hypotheses", hypotheses)):
        if isinstance(seq, str):  # a bare string would be scored character by character, silently
            raise TypeError(f"{name} is a str; expected a list of strings (one per utterance): wrap it as [{name[:-1]}]")
    refs, hyps = list(references), list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses: they must pair one to one")
    for name, seq in (("references", refs), ("hypotheses", hyps)):
        for i, s in enumerate(seq):
            if not isinstance(s, str):
                raise TypeError(f"{name}[{i}] is {type(s).__name__}; expected str")
    return refs, hyps


def wer(references, hypotheses) -> float:
    """Corpus word error rate: total word edits / total reference words (whitespace-split, as given).

    NaN when the references hold no words at all (the rate is undefined).
    """
    refs, hyps = _check_pairs(references, hypotheses)
    edits = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps, strict=True))
    words = sum(len(r.split()) for r in refs)
    return math.nan if words == 0 else edits / words


def cer(references, hypotheses) -> float:
    """Corpus character error rate: total character edits / total reference characters (spaces count)."""
    refs, hyps = _check_pairs(references, hypotheses)
    edits = sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True))
    chars = sum(len(r) for r in refs)
    return math.nan if chars == 0 else edits / chars


# ---------------------------------------------------------------------------------------------------------
# Vision-language: VQA accuracy, GQA/NLVR2 exact match, captioning BLEU-4/CIDEr (standard library only;
# pycocoevalcap is imported when caption_scores runs)

from .vl_metrics import caption_scores, exact_match_accuracy, vqa_accuracy, vqa_normalize  # noqa: E402, F401
