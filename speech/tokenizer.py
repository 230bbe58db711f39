"""Tokenizers for the transducer: characters or SentencePiece, both stored next to the model.

Common API: ``encode(text) -> list[int]`` (ids >= 1), ``decode(ids) -> str``, ``vocab_size`` (including
the blank), ``blank = 0``, ``save(dir)``; :func:`load_tokenizer` reads either kind back. Text is
normalized with :func:`mmadapters.eval.metrics.normalize_text` before building and encoding, so the
training targets are the strings the WER evaluator compares against.

Files in ``dir``: ``tokenizer.json`` (kind and, for characters, the alphabet) and, for SentencePiece,
``tokenizer.model``. Every file is written atomically.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from mmadapters.eval.metrics import normalize_text
from mmadapters.io import atomic_write_bytes

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
BLANK = 0
UNK = 1


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed (the message names the file)."""


class CharTokenizer:
    """One id per character of the normalized training text: 0 blank, 1 ``<unk>``, 2.. characters.

    Unknown characters encode to ``<unk>`` (1); ``decode`` skips blank and ``<unk>``."""

    kind = "char"
    blank = BLANK
    unk = UNK

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer: chars must be distinct single characters")
        self.chars = chars
        self._index = {c: i + 2 for i, c in enumerate(chars)}

    @classmethod
    def from_texts(cls, texts: Iterable[str], min_count: int = 1) -> CharTokenizer:
        """The alphabet of the normalized ``texts`` (characters seen at least ``min_count`` times), sorted."""
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(normalize_text(text))
        chars = sorted(c for c, n in counts.items() if n >= min_count)
        if not chars:
            raise ValueError("CharTokenizer.from_texts: the texts contain no characters")
        return cls(chars)

    @classmethod
    def for_languages(cls, languages: Iterable[str], texts: Iterable[str] = ()) -> CharTokenizer:
        """The alphabet of every word in the shipped word lists of ``languages`` (plus the space and ``texts``).

        Generated sentences are words of those lists, so every character a language can produce (a tail-only
        letter such as ``ł`` or ``ї`` included) is a training target, whatever share of the data it has.
        """
        from mmadapters.speech.synth import load_wordlist

        words = [w for lang in languages for w in load_wordlist(lang)]
        if not words:
            raise ValueError("CharTokenizer.for_languages: no languages given")
        return cls.from_texts([" ".join(words), *texts])

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 2

    def encode(self, text: str) -> list[int]:
        return [self._index.get(c, UNK) for c in normalize_text(text)]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i >= 2:
                if i >= self.vocab_size:
                    raise ValueError(f"CharTokenizer.decode: id {i} is outside the vocabulary (size {self.vocab_size})")
                out.append(self.chars[i - 2])
        return "".join(out)

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "blank": BLANK, "unk": UNK, "chars": self.chars}
        atomic_write_bytes(directory / TOKENIZER_JSON, json.dumps(meta, ensure_ascii=False, indent=1).encode())
        return directory


class SentencePieceTokenizer:
    """SentencePiece (unigram or BPE) pieces; our id = SentencePiece id + 1, so 0 stays the blank.

    SentencePiece's own ``<unk>`` (its id 0) becomes id 1; it has no BOS/EOS/PAD pieces."""

    kind = "sentencepiece"
    blank = BLANK
    unk = UNK

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_proto)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError with C++ messages
            raise TokenizerError(f"SentencePieceTokenizer: the model proto does not parse ({err})") from None
        if self.sp.unk_id() != 0:
            raise TokenizerError(f"SentencePieceTokenizer: expected <unk> at SentencePiece id 0, got {self.sp.unk_id()}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 256, model_type: str = "unigram",
              character_coverage: float = 1.0, seed_sentencepiece_size: int = 100000) -> SentencePieceTokenizer:
        """Train on the normalized ``texts``. ``vocab_size`` counts the blank (SentencePiece gets one fewer);
        with little text the vocabulary may come out smaller (``hard_vocab_limit=False``)."""
        import sentencepiece as spm

        lines = [t for t in (normalize_text(x) for x in texts) if t]
        if not lines:
            raise ValueError("SentencePieceTokenizer.train: the texts are empty after normalization")
        proto = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=proto, vocab_size=vocab_size - 1, model_type=model_type,
            character_coverage=character_coverage, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            hard_vocab_limit=False, normalization_rule_name="identity", seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=1, minloglevel=2)
        return cls(proto.getvalue())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + 1

    def encode(self, text: str) -> list[int]:
        return [i + 1 for i in self.sp.encode(normalize_text(text))]

    def decode(self, ids: Iterable[int]) -> str:
        pieces = []
        for i in ids:
            i = int(i)
            if i == BLANK:
                continue
            if not 0 < i < self.vocab_size:
                raise ValueError(f"SentencePieceTokenizer.decode: id {i} is outside the vocabulary (size {self.vocab_size})")
            if i != UNK:
                pieces.append(i - 1)
        return self.sp.decode(pieces)

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / SENTENCEPIECE_MODEL, self.model_proto)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "blank": BLANK, "unk": UNK, "model_file": SENTENCEPIECE_MODEL}
        atomic_write_bytes(directory / TOKENIZER_JSON, json.dumps(meta, indent=1).encode())
        return directory


Tokenizer = CharTokenizer | SentencePieceTokenizer


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Read the tokenizer saved in ``directory`` (``tokenizer.json`` [+ ``tokenizer.model``])."""
    path = Path(directory) / TOKENIZER_JSON
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found (expected the {TOKENIZER_JSON} that save() writes)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    kind = meta.get("kind")
    if kind == CharTokenizer.kind:
        chars = meta.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise TokenizerError(f"{path}: field 'chars' must be a list of single characters")
        try:
            tok: Tokenizer = CharTokenizer(chars)
        except ValueError as err:
            raise TokenizerError(f"{path}: {err}") from None
    elif kind == SentencePieceTokenizer.kind:
        name = meta.get("model_file", SENTENCEPIECE_MODEL)
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise TokenizerError(f"{path}: field 'model_file' must be a plain file name in the same directory, got {name!r}")
        model_path = path.parent / name
        if not model_path.is_file():
            raise TokenizerError(f"{model_path}: SentencePiece model file not found (named by {path})")
        try:
            tok = SentencePieceTokenizer(model_path.read_bytes())
        except TokenizerError as err:
            raise TokenizerError(f"{model_path}: {err}") from None
    else:
        raise TokenizerError(f"{path}: field 'kind' must be 'char' or 'sentencepiece', got {kind!r}")
    expected = meta.get("vocab_size")
    if expected is not None and expected != tok.vocab_size:
        raise TokenizerError(f"{path}: field 'vocab_size' is {expected} but the tokenizer has {tok.vocab_size} ids")
    return tok
