"""A word-level T5-style tokenizer for tiny VL-T5 models trained on generated text.

Real T5 checkpoints keep their own SentencePiece tokenizer files; this one exists for the tiny models
that the tests and ``scripts/pretrain_tiny_vlt5.py`` build from a small, closed vocabulary (the
generated scenes' captions and questions). It is a ``tokenizers`` WordLevel model (NFKC + lowercase
normalizer, ``\\w+|[^\\w\\s]+`` pre-tokenizer) with T5's layout of ids:

    <pad> = 0, </s> = 1, <unk> = 2, then the words (most frequent first), then the sentinels
    <extra_id_{n-1}> ... <extra_id_0> (so <extra_id_0> is the last id, as in T5)

and T5's post-processor (``</s>`` appended to every sequence). :func:`save_word_tokenizer` writes
``tokenizer.json`` + ``tokenizer_config.json``, which ``transformers.AutoTokenizer.from_pretrained(dir)``
loads as a ``PreTrainedTokenizerFast`` — the same call that loads a real T5 checkpoint's tokenizer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def sentinel(k: int) -> str:
    """The k-th T5 span-corruption sentinel token, ``<extra_id_k>``."""
    return f"<extra_id_{k}>"


def _pipeline():
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    return normalizer, pre_tokenizers.Whitespace()


def word_counts(texts: Iterable[str]) -> Counter[str]:
    """How often each word occurs in ``texts``, after the tokenizer's own normalization and splitting."""
    normalizer, pre_tokenizer = _pipeline()
    counts: Counter[str] = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"word_counts: expected strings, got {type(text).__name__}")
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    return counts


def build_word_tokenizer(texts: Iterable[str], *, extra_ids: int = 100, min_frequency: int = 1,
                         max_words: int | None = None, model_max_length: int = 512):
    """Build a T5-layout word-level ``PreTrainedTokenizerFast`` from ``texts``.

    Words are ordered by frequency (ties alphabetically), so the same texts always give the same ids.
    Words seen fewer than ``min_frequency`` times, or beyond the ``max_words`` most frequent, map to ``<unk>``.
    """
    from tokenizers import Tokenizer, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if extra_ids < 0:
        raise ValueError(f"build_word_tokenizer: extra_ids must be >= 0, got {extra_ids}")
    counts = word_counts(texts)
    reserved = {PAD, EOS, UNK, *(sentinel(k) for k in range(extra_ids))}
    words = sorted((w for w, c in counts.items() if c >= min_frequency and w not in reserved), key=lambda w: (-counts[w], w))
    if max_words is not None:
        words = words[:max_words]
    if not words:
        raise ValueError("build_word_tokenizer: the texts contain no words to build a vocabulary from")
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for w in words:
        vocab[w] = len(vocab)
    for k in range(extra_ids - 1, -1, -1):
        vocab[sentinel(k)] = len(vocab)

    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer, tok.pre_tokenizer = _pipeline()
    # Special tokens are matched before normalization, so "<extra_id_3>" survives the lowercase/split steps.
    tok.add_special_tokens([PAD, EOS, UNK, *(sentinel(k) for k in range(extra_ids - 1, -1, -1))])
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                       special_tokens=[(EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[sentinel(k) for k in range(extra_ids)],
        model_max_length=model_max_length, clean_up_tokenization_spaces=True, padding_side="right")


def save_word_tokenizer(tokenizer, directory: str | os.PathLike) -> Path:
    """Write the tokenizer's files into ``directory``, each one atomically (temp dir + rename).

    Only ``tokenizer.json`` and ``tokenizer_config.json`` are kept (what ``AutoTokenizer`` needs).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=directory))
    try:
        tokenizer.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if not (tmp / name).is_file():
                raise RuntimeError(f"save_word_tokenizer: {type(tokenizer).__name__}.save_pretrained wrote no {name}")
        for name in TOKENIZER_FILES:
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def train_word_tokenizer(texts: Iterable[str], directory: str | os.PathLike, **kwargs):
    """:func:`build_word_tokenizer` + :func:`save_word_tokenizer`; returns the tokenizer as
    ``AutoTokenizer.from_pretrained(directory)`` loads it (so callers use exactly what is on disk)."""
    from transformers import AutoTokenizer

    save_word_tokenizer(build_word_tokenizer(texts, **kwargs), directory)
    return AutoTokenizer.from_pretrained(str(directory))


__all__ = ["EOS", "PAD", "TOKENIZER_FILES", "UNK", "build_word_tokenizer", "save_word_tokenizer", "sentinel",
           "train_word_tokenizer", "word_counts"]
