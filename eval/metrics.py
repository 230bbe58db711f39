"""Every metric of the library, each with the conventions of its benchmark's official code. Leaf module:
numpy/torch and the standard library (pycocoevalcap is imported inside :func:`caption_scores`).

- Classification (CLIP_benchmark): ``acc1`` / ``acc5``, the fraction of samples whose label is among the
  top-k logits (NaN when there are fewer than k classes, as CLIP_benchmark reports acc5 then);
  ``mean_per_class_recall``, recall averaged over the classes that occur in the labels (balanced accuracy).
- Dynamic facial expression recognition: :func:`war`, :func:`uar`.
- Speech recognition: corpus :func:`wer` / :func:`cer` and the text normalization applied before them.
- Vision-language: the official VQA accuracy (:func:`vqa_normalize`, :func:`vqa_accuracy`, VL-T5's
  :func:`vqa_score_from_label`), exact match (GQA, NLVR2), captioning BLEU-4 and CIDEr
  (:func:`caption_scores`); the details follow.

**VQA** (:func:`vqa_normalize`, :func:`vqa_accuracy`) follows the official VQA evaluation
(``vqaEval.py``) step by step:

1. newlines and tabs become spaces, the answer is stripped;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is *deleted* when it touches a
   space in the answer (``"dog ,cat"``) or when the answer holds a comma between two digits
   (``"1,000"``), and otherwise *replaced by a space* (``"black-white"`` -> ``"black white"``). The
   conditions are tested on the answer as given, not as it is being rewritten. Then every period
   not followed by a digit is deleted (``"dog."`` -> ``"dog"``, ``"3.5"`` stays). The official pattern
   ``(?!<=\\d)(\\.)(?!\\d)`` meant "not after a digit" too, but its look-behind is mistyped as a
   look-ahead, so only "not before a digit" takes effect — kept that way here (``"5."`` -> ``"5"``).
   Apostrophes, colons and other characters are left alone;
3. lowercase, split on whitespace, number words ``none``/``zero``..``ten`` become digits, the articles
   ``a``/``an``/``the`` are dropped, and words found in the official contractions table get their
   apostrophes back (``isnt`` -> ``isn't``; the table's quirks are kept: its capitalized keys ``Im``,
   ``Ive``, ``Id've``, ``I'dve`` can never match a lowercased word, and ``somebody'd`` maps to
   ``somebodyd``).

The official script also passes ``re.UNICODE`` as the *count* of its period substitution (at most 32
periods are removed); answers with more than 32 periods do not occur, and that bug is not copied.

Accuracy for one question with ``n`` human answers is the mean over the ``n`` leave-one-out subsets of
``min(1, #answers in the subset equal to the prediction / 3)`` (``n = 10`` in VQAv2; with ``m``
matching answers that is 0, 0.3, 0.6, 0.9 and 1.0 for ``m = 0..4+``). Both the prediction and the
human answers are always normalized; some versions of the official script skip normalization when
all human answers agree, which only matters for un-normalized predictions (there it scores
``"Yes"`` against ten ``"yes"`` as 0 where this module scores 1). A question with a single answer has
no leave-one-out subset with anything in it; it is scored as exact match (1 or 0) instead. No answers
is an error.

Karpathy-split VQA files as VL-T5 ships them may hold only the soft label ``{answer: score}`` (the
scores already are these accuracies: 0.3/0.6/0.9/1 for 1/2/3/4+ matching annotators);
:func:`vqa_score_from_label` is VL-T5's accuracy for those: ``label[normalized prediction]`` or 0.

**Captioning** (:func:`caption_scores`): pycocoevalcap's ``Bleu(4)`` (corpus BLEU with the "closest"
reference length) and ``Cider`` (CIDEr-D-style, sigma 6, IDF over the scored references). The COCO
toolkit tokenizes with Stanford's Java PTBTokenizer first; this module replaces it with
:func:`caption_tokenize`, a Python approximation (see there), so scores can differ slightly from
published ones on text with unusual punctuation. CIDEr's IDF comes from the evaluated set itself:
an n-gram found in the references of every image weighs 0, so a single image always scores
CIDEr 0, and small sets score lower than large ones for the same captions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

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
# Vision-language (module docstring): VQA answers, then exact match, then captioning

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})


def _contraction_table() -> dict[str, str]:
    # The official table: pairs "written restored" separated by '|' (line ends separate pairs too).
    pairs = """
    aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't | couldn'tve couldn't've
    couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't | hadnt hadn't | hadnt've hadn't've
    hadn'tve hadn't've | hasnt hasn't | havent haven't | hed he'd | hed've he'd've | he'dve he'd've | hes he's
    howd how'd | howll how'll | hows how's | Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't
    itd it'd | itd've it'd've | it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't
    mightnt've mightn't've | mightn'tve mightn't've | mightve might've | mustnt mustn't | mustve must've
    neednt needn't | notve not've | oclock o'clock | oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at
    'ow'sat 'ow's'at | shant shan't | shed've she'd've | she'dve she'd've | she's she's | shouldve should've
    shouldnt shouldn't | shouldnt've shouldn't've | shouldn'tve shouldn't've | somebody'd somebodyd
    somebodyd've somebody'd've | somebody'dve somebody'd've | somebodyll somebody'll | somebodys somebody's
    someoned someone'd | someoned've someone'd've | someone'dve someone'd've | someonell someone'll
    someones someone's | somethingd something'd | somethingd've something'd've | something'dve something'd've
    somethingll something'll | thats that's | thered there'd | thered've there'd've | there'dve there'd've
    therere there're | theres there's | theyd they'd | theyd've they'd've | they'dve they'd've | theyll they'll
    theyre they're | theyve they've | twas 'twas | wasnt wasn't | wed've we'd've | we'dve we'd've | weve we've
    werent weren't | whatll what'll | whatre what're | whats what's | whatve what've | whens when's
    whered where'd | wheres where's | whereve where've | whod who'd | whod've who'd've | who'dve who'd've
    wholl who'll | whos who's | whove who've | whyll why'll | whyre why're | whys why's | wont won't
    wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've | wouldn'tve wouldn't've | yall y'all
    yall'll y'all'll | y'allll y'all'll | yall'd've y'all'd've | y'alld've y'all'd've | y'all'dve y'all'd've
    youd you'd | youd've you'd've | you'dve you'd've | youll you'll | youre you're | youve you've
    """
    words = pairs.replace("|", " ").split()
    return dict(zip(words[0::2], words[1::2], strict=True))


VQA_CONTRACTIONS: dict[str, str] = _contraction_table()


def _vqa_punctuation(text: str) -> str:
    out = text
    digits_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        delete = digits_comma or (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if delete else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _vqa_words(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_normalize(answer: str) -> str:
    """The official VQA answer normalization (module docstring): ``"Two dogs."`` -> ``"2 dogs"``."""
    if not isinstance(answer, str):
        raise TypeError(f"expected an answer string, got {type(answer).__name__}")
    return _vqa_words(_vqa_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def _answer_text(answer, index: int) -> str:
    if isinstance(answer, Mapping):
        if "answer" not in answer:
            raise ValueError(f"answers[{index}]: expected a string or a dict with an 'answer' field, got keys {sorted(answer)}")
        answer = answer["answer"]
    if not isinstance(answer, str):
        raise TypeError(f"answers[{index}]: expected str, got {type(answer).__name__}")
    return answer


def vqa_accuracy(prediction: str, answers: Sequence[str | Mapping[str, str]]) -> float:
    """Official VQA accuracy of one ``prediction`` against the human ``answers`` (strings or ``{"answer": ...}``).

    Mean over the leave-one-out subsets of ``min(1, matches / 3)`` after :func:`vqa_normalize` on both
    sides; one answer is scored as exact match; none raises ``ValueError``. Dataset accuracy is the
    mean of this over the questions.
    """
    if isinstance(answers, str | Mapping):
        raise TypeError("answers must be a list of the human answers (strings or {'answer': ...} dicts), not a single one")
    gts = [vqa_normalize(_answer_text(a, i)) for i, a in enumerate(answers)]
    if not gts:
        raise ValueError("vqa_accuracy: no human answers given; expected the question's answers (10 in VQAv2)")
    pred = vqa_normalize(prediction)
    matches = sum(g == pred for g in gts)
    if len(gts) == 1:
        return float(matches)
    # Leaving out a matching answer leaves matches - 1; leaving out any other leaves matches.
    total = matches * min(1.0, (matches - 1) / 3) + (len(gts) - matches) * min(1.0, matches / 3)
    return total / len(gts)


def vqa_score_from_label(prediction: str, label: Mapping[str, float]) -> float:
    """VL-T5's VQA score for Karpathy splits: the soft label's score of the normalized prediction, else 0.

    ``label`` maps answers to scores (``{"2": 1.0, "3": 0.3}``); its keys are normalized too (the
    largest score wins when two keys normalize alike).
    """
    pred = vqa_normalize(prediction)
    best = 0.0
    for answer, score in label.items():
        if vqa_normalize(answer) == pred:
            best = max(best, float(score))
    return best


# ------------------------------------------------------------------------------------------ exact match


def exact_match_accuracy(predictions: Sequence[str], targets: Sequence[str | Sequence[str]], *,
                         normalize: bool = True) -> float:
    """Fraction of ``predictions`` equal to their target (GQA, NLVR2); NaN when there are none.

    A target is a string or a list of acceptable strings. With ``normalize`` both sides go through
    :func:`vqa_normalize` (case, punctuation, articles, number words), otherwise they are compared as given.
    """
    for name, seq in (("predictions", predictions), ("targets", targets)):
        if isinstance(seq, str):
            raise TypeError(f"{name} is a str; expected a list of strings (one per question)")
    preds, golds = list(predictions), list(targets)
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} targets: they must pair one to one")
    if not preds:
        return math.nan
    norm = vqa_normalize if normalize else (lambda s: s)
    correct = 0
    for i, (p, t) in enumerate(zip(preds, golds, strict=True)):
        if not isinstance(p, str):
            raise TypeError(f"predictions[{i}] is {type(p).__name__}; expected str")
        options = [t] if isinstance(t, str) else list(t)
        if not options or not all(isinstance(o, str) for o in options):
            raise TypeError(f"targets[{i}]: expected a string or a non-empty list of strings, got {t!r}")
        correct += norm(p) in {norm(o) for o in options}
    return correct / len(preds)


# ------------------------------------------------------------------------------------------ captioning

# The tokens pycocoevalcap's PTBTokenizer drops after Stanford tokenization.
_PTB_DROPPED = frozenset({"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--",
                          "...", ";"})
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
# A token: a number with inner separators, a word with inner hyphens/apostrophes/periods/slashes, or one other character.
_TOKEN = re.compile(r"\d+(?:[.,:]\d+)+|[^\W_]+(?:['\-./][^\W_]+)*'?|\S")


def caption_tokenize(text: str) -> list[str]:
    """A Python stand-in for the COCO toolkit's Java PTBTokenizer plus its punctuation removal.

    Lowercases; splits off punctuation and symbols (``$``, ``%``, ``&``, ``#`` stay as tokens; brackets,
    quotes and ``. , ; : ? ! -`` are dropped as PTBTokenizer's output filter drops them); keeps numbers
    with inner separators (``3.5``, ``1,000``) and words with inner hyphens, periods or slashes
    (``t-shirt``, ``and/or``) whole; splits English clitics the PTB way (``don't`` -> ``do n't``,
    ``dog's`` -> ``dog 's``). Differences from Stanford's tokenizer: no abbreviation list (``st.``
    loses its period), no American/British normalization, Unicode punctuation is dropped like ASCII.
    """
    tokens: list[str] = []
    for tok in _TOKEN.findall(text.replace("\n", " ").lower()):
        if tok.endswith("'") and len(tok) > 1:  # plural possessive "dogs'": the apostrophe is its own (dropped) token
            tok = tok[:-1]
        m = _CLITIC.match(tok)
        parts = [m.group(1), m.group(2)] if m else [tok]
        for part in parts:
            if part in _PTB_DROPPED or (len(part) == 1 and not part.isalnum() and part not in "$%&#@*+=/<>~^|"):
                continue
            tokens.append(part)
    return tokens


def caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr of ``predictions`` {uid: caption} against ``references`` {uid: [captions]}.

    Scores the uids in ``predictions``; each needs a non-empty list of references (``KeyError`` /
    ``ValueError`` otherwise). Returns ``{"bleu4", "cider", "count"}`` (NaN scores when ``count`` is 0).
    Both sides are tokenized with :func:`caption_tokenize` instead of the Java PTBTokenizer, then scored
    by pycocoevalcap's ``Bleu(4)`` and ``Cider`` (see the module docstring for CIDEr's IDF on small sets;
    a caption shorter than 4 words has no 4-grams and its BLEU-4 collapses through the scorer's
    1e-15/1e-9 smoothing, e.g. 0.001 for a 2-word caption equal to its reference; identical captions of
    4+ words score 1 - 1e-10, not exactly 1, for the same reason).
    """
    if not predictions:
        return {"bleu4": math.nan, "cider": math.nan, "count": 0}
    res: dict[str, list[str]] = {}
    gts: dict[str, list[str]] = {}
    for uid in sorted(predictions, key=str):
        caption = predictions[uid]
        if not isinstance(caption, str):
            raise TypeError(f"predictions[{uid!r}] is {type(caption).__name__}; expected a caption string")
        if uid not in references:
            raise KeyError(f"predictions[{uid!r}]: no references for this uid")
        refs = references[uid]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{uid!r}]: expected a non-empty list of caption strings, got {refs!r}")
        res[uid] = [" ".join(caption_tokenize(caption))]
        gts[uid] = [" ".join(caption_tokenize(r)) for r in refs]
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider), "count": len(res)}
