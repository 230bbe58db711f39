"""WER / CER / edit distance / normalize_text: hand-computed cases, corpus-level pooling, scripts with marks."""

from __future__ import annotations

import math
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmadapters.eval.metrics import cer, edit_distance, normalize_text, wer


@pytest.mark.parametrize(("ref", "hyp", "d"), [
    ("kitten", "sitting", 3),
    ("", "abc", 3),
    ("abc", "", 3),
    ("", "", 0),
    ("flaw", "lawn", 2),
    (["the", "cat"], ["the", "cat", "sat"], 1),
    (["a", "b", "c"], ["c", "b", "a"], 2),
])
def test_edit_distance_hand_computed(ref, hyp, d):
    assert edit_distance(ref, hyp) == d
    assert edit_distance(hyp, ref) == d


def test_wer_hand_computed():
    assert wer(["the cat sat"], ["the cat sat"]) == 0.0
    # sat→sit (substitution) and the second "the" deleted: 2 edits / 6 reference words
    assert wer(["the cat sat on the mat"], ["the cat sit on mat"]) == pytest.approx(2 / 6)
    assert wer(["a"], ["a b c"]) == 2.0  # insertions can push WER above 1
    assert wer(["a b c"], [""]) == 1.0
    assert wer(["hello   world"], ["hello world"]) == 0.0  # whitespace-split


def test_wer_is_corpus_level_not_a_mean_of_utterances():
    refs, hyps = ["a b", "c d e f"], ["a x", "c d e f"]
    assert wer(refs, hyps) == pytest.approx(1 / 6)  # a per-utterance mean would give 0.25
    assert cer(["ab", "cdef"], ["ax", "cdef"]) == pytest.approx(1 / 6)


def test_cer_counts_spaces():
    assert cer(["ab cd"], ["abcd"]) == pytest.approx(1 / 5)  # the deleted space is an edit, and 5 reference chars
    assert cer(["ab cd"], ["ab cd"]) == 0.0
    assert cer(["ab"], ["a b"]) == pytest.approx(1 / 2)


def test_cer_on_combining_marks_counts_code_points():
    # की = क + ी (vowel sign II), कि = क + ि (vowel sign I): one substitution out of 2 code points
    assert cer(["की"], ["कि"]) == pytest.approx(1 / 2)


def test_empty_references_give_nan_and_bad_inputs_raise():
    assert math.isnan(wer([""], ["a"]))
    assert math.isnan(cer([], []))
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"hypotheses\[0\] is int; expected str"):
        cer(["a"], [1])
    with pytest.raises(TypeError, match="references is a str; expected a list of strings"):
        wer("hello world", ["hello world"])


@pytest.mark.parametrize(("raw", "normalized"), [
    ("Hello, World!", "hello world"),
    ("Don't STOP — “now”…", "don't stop now"),
    ("l’été", "l'été"),  # typographic apostrophe inside a word becomes '
    ("rock 'n' roll", "rock n roll"),  # quotes at word edges are punctuation
    ("e-mail\taddress\n", "e mail address"),
    ("50% of €5 #1", "50 of 5 1"),
    ("Straße", "straße"),  # no casefold: ß stays
    ("¿Qué tal? ¡Bien!", "qué tal bien"),
    ("“你好，世界。”", "你好 世界"),
])
def test_normalize_text(raw, normalized):
    assert normalize_text(raw) == normalized


def test_normalize_keeps_combining_marks():
    hindi = "नमस्ते, दुनिया!"
    out = normalize_text(hindi)
    assert out == "नमस्ते दुनिया"
    assert "\u094d" in out and "\u0941" in out  # virama and vowel sign U survive
    arabic = "مَرْحَبًا، عالم"
    assert normalize_text(arabic) == "مَرْحَبًا عالم" and "\u064e" in normalize_text(arabic)  # fatha kept
    # Vietnamese: decomposed and precomposed spellings normalize to the same NFC string, tone marks kept
    decomposed = "Tie\u0302\u0301ng Vie\u0323\u0302t."
    assert normalize_text(decomposed) == normalize_text("Tiếng Việt") == "tiếng việt"
    assert unicodedata.is_normalized("NFC", normalize_text(decomposed))
    assert normalize_text("की's") == "की's"  # an apostrophe after a vowel sign is still inside the word
    assert unicodedata.is_normalized("NFC", normalize_text("İSTANBUL"))


def test_normalized_wer_ignores_case_and_punctuation_only():
    refs = [normalize_text("The cat, the HAT.")]
    assert wer(refs, [normalize_text("the cat the hat")]) == 0.0
    assert wer(refs, [normalize_text("the bat the hat")]) == pytest.approx(1 / 4)


words = st.lists(st.sampled_from(["a", "b", "c", "dd"]), max_size=6)


@settings(max_examples=60, deadline=None)
@given(words, words, words)
def test_edit_distance_is_a_metric(x, y, z):
    assert edit_distance(x, x) == 0
    assert edit_distance(x, y) == edit_distance(y, x)
    assert abs(len(x) - len(y)) <= edit_distance(x, y) <= max(len(x), len(y))
    assert edit_distance(x, z) <= edit_distance(x, y) + edit_distance(y, z)
    if x:
        assert wer([" ".join(x)], [" ".join(y)]) == edit_distance(x, y) / len(x)
