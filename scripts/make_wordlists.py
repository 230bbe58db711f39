"""Extract the shipped word lists of the generated speech data set from the ``wordfreq`` package.

For every language of :data:`mmadapters.speech.synth.LANGUAGES` this writes
``speech/assets/wordlists/<lang>.txt``: the most frequent words of the language, one per line, in
frequency-rank order (line 1 = most frequent), UTF-8, NFC. A word is kept only when

- every character is a letter of the language's alphabet (:data:`ALPHABETS`; Devanagari: letters and
  vowel signs / virama of the Devanagari block) — no digits, apostrophes, hyphens or foreign scripts;
- it is 2..14 characters long;
- (Latin scripts) it has a vowel, so web tokens like ``www`` or ``xd`` that espeak-ng would spell out
  letter by letter are dropped.

wordfreq casefolds its words, which turns Greek final sigma into ``σ``; a word-final ``σ`` is written
back as ``ς``. (German ``ß`` is casefolded to ``ss`` by wordfreq; espeak-ng reads both alike.)

Usage (needs the ``data`` extra: ``pip install -e .[data]``)::

    python scripts/make_wordlists.py                 # all languages, 2500 words each
    python scripts/make_wordlists.py --words 2500 --languages en,de

The generator (``python -m mmadapters.speech.synth``) reads only the shipped files, so generating data
needs no wordfreq and gives the same sentences whatever wordfreq version is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import unicodedata
from pathlib import Path

from mmadapters.io import atomic_write_bytes
from mmadapters.speech.synth import LANGUAGES, MAX_WORD_CHARS, MIN_WORD_CHARS, WORDLIST_DIR

_LATIN = "abcdefghijklmnopqrstuvwxyz"
# The letters each language writes (lowercase). Words with any other character are dropped.
ALPHABETS: dict[str, str] = {
    "en": _LATIN,
    "de": _LATIN + "äöüß",
    "es": _LATIN + "áéíóúüñ",
    "fr": _LATIN + "àâæçéèêëîïôœùûüÿ",
    "it": _LATIN + "àèéìíîòóùú",
    "pt": _LATIN + "áâãàçéêíóôõú",
    "nl": _LATIN + "áéíóúëïöüè",
    "pl": _LATIN + "ąćęłńóśźż",
    "sv": _LATIN + "åäöé",
    "cs": _LATIN + "áčďéěíňóřšťúůýž",
    "ro": _LATIN + "ăâîșțşţ",
    "tr": "abcçdefgğhıijklmnoöprsştuüvyzâîû",
    "ru": "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
    "uk": "абвгґдеєжзиіїйклмнопрстуфхцчшщьюя",
    "bg": "абвгдежзийклмнопрстуфхцчшщъьюя",
    "el": "αβγδεζηθικλμνξοπρσςτυφχψωάέήίόύώϊϋΐΰ",
}
# Vowels (incl. syllabic consonants in Czech) for the spelled-out-token filter of Latin-script languages.
_VOWELS = set("aeiouyáéíóúýàèìòùâêîôûäëïöüÿãõåæœěůăıαεηιουω") | set("rl")  # r, l: Czech 'vlk', 'prst'


def _devanagari_ok(ch: str) -> bool:
    # letters, vowel signs, virama, nukta, candrabindu/anusvara/visarga; not digits (U+0966..096F) or danda
    return 0x0900 <= ord(ch) <= 0x097F and unicodedata.category(ch) in ("Lo", "Mn", "Mc")


def keep_word(word: str, lang: str) -> bool:
    """Whether ``word`` (already NFC, lowercase) goes into the shipped list of ``lang``."""
    if not MIN_WORD_CHARS <= len(word) <= MAX_WORD_CHARS:
        return False
    if LANGUAGES[lang].script == "Devanagari":
        return all(_devanagari_ok(ch) for ch in word) and unicodedata.category(word[0]) == "Lo"
    alphabet = ALPHABETS[lang]
    if any(ch not in alphabet for ch in word):
        return False
    if LANGUAGES[lang].script == "Latin":
        vowels = _VOWELS if lang == "cs" else _VOWELS - {"r", "l"}
        return any(ch in vowels for ch in word)
    return True


def extract(lang: str, n_words: int) -> list[str]:
    """The ``n_words`` most frequent kept words of ``lang`` in rank order (needs wordfreq)."""
    import wordfreq

    out: list[str] = []
    seen: set[str] = set()
    for candidates in (20_000, 60_000, 200_000):
        for raw in wordfreq.top_n_list(lang, candidates, wordlist="best"):
            word = unicodedata.normalize("NFC", raw)
            if lang == "el" and word.endswith("σ"):
                word = word[:-1] + "ς"
            if word in seen or not keep_word(word, lang):
                continue
            seen.add(word)
            out.append(word)
            if len(out) == n_words:
                return out
        out.clear()
        seen.clear()
    raise SystemExit(f"make_wordlists: wordfreq has only {len(out)} usable words for {lang!r}, wanted {n_words}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--languages", default=",".join(LANGUAGES), help="comma-separated codes (default: all of LANGUAGES)")
    parser.add_argument("--words", type=int, default=2500, help="words per language (default 2500)")
    parser.add_argument("--out", type=Path, default=WORDLIST_DIR, help="output folder (default: the shipped speech/assets/wordlists)")
    args = parser.parse_args(argv)
    langs = [c.strip() for c in args.languages.split(",") if c.strip()]
    unknown = [c for c in langs if c not in LANGUAGES]
    if unknown:
        parser.error(f"unknown language(s) {unknown}; expected codes of {sorted(LANGUAGES)}")
    print(f"wordfreq {importlib.metadata.version('wordfreq')}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for lang in langs:
        words = extract(lang, args.words)
        data = ("\n".join(words) + "\n").encode("utf-8")
        atomic_write_bytes(args.out / f"{lang}.txt", data)
        total += len(data)
        print(f"{lang}: {len(words)} words, {len(data) / 1024:.1f} KiB", file=sys.stderr)
    print(f"total {total / 1024:.1f} KiB in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
