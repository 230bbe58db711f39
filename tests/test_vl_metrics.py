"""VQA accuracy (official normalization and leave-one-out), exact match, captioning BLEU-4 / CIDEr."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest

from mmadapters.eval.metrics import (
    VQA_CONTRACTIONS,
    caption_scores,
    caption_tokenize,
    exact_match_accuracy,
    vqa_accuracy,
    vqa_normalize,
    vqa_score_from_label,
)


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                      # number words become digits
    ("none", "0"),
    ("the  Ten", "10"),                # articles dropped, whitespace collapsed
    ("a dog", "dog"),
    ("An apple", "apple"),
    ("isnt", "isn't"),                 # contractions get their apostrophe back
    ("cant", "can't"),
    ("can't", "can't"),                # apostrophes are not punctuation
    ("Yes!", "yes"),
    ("\tyes\n", "yes"),
    ("dog.", "dog"),                   # a period not before a digit goes
    ("5.", "5"),                       # ... also after a digit (the official look-behind is mistyped)
    ("3.5", "3.5"),                    # a decimal point stays
    ("1,000", "1000"),                 # comma between digits: punctuation is deleted, not spaced
    ("1,000 and a-b", "1000 and ab"),  # ... and then every punctuation mark is deleted
    ("black-white", "black white"),    # punctuation not touching a space becomes a space
    ("dog ,cat", "dog cat"),           # punctuation touching a space is deleted
    ("hello (world)", "hello world"),
    ("a/b", "b"),                      # "a/b" -> "a b" -> article "a" dropped
    ("Im", "im"),                      # the official table's capitalized keys never match
    ("somebody'd", "somebodyd"),       # the official table's inverted entry, kept
    ("maam", "ma'am"),
])
def test_vqa_normalize_follows_the_official_rules(raw, expected):
    assert vqa_normalize(raw) == expected


def test_contraction_table_is_complete_and_type_checked():
    assert len(VQA_CONTRACTIONS) == 120
    assert VQA_CONTRACTIONS["wouldnt've"] == "wouldn't've"
    with pytest.raises(TypeError, match="answer string"):
        vqa_normalize(3)


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers(matches, expected):
    # 3 of 10: leaving out one of the 3 matches leaves 2 (2/3), leaving out one of the 7 others leaves 3 (1):
    # (3 * 2/3 + 7 * 1) / 10 = 0.9
    answers = ["yes"] * matches + ["no"] * (10 - matches)
    assert vqa_accuracy("yes", answers) == pytest.approx(expected)


def _literal_leave_one_out(pred: str, answers: list[str]) -> float:
    gts = [vqa_normalize(a) for a in answers]
    p = vqa_normalize(pred)
    accs = [min(1.0, sum(g == p for g in gts[:i] + gts[i + 1:]) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


def test_vqa_accuracy_matches_the_literal_leave_one_out_loop():
    rng = random.Random(0)
    vocab = ["2", "two", "a dog", "dog", "isnt", "isn't", "Yes", "no", "red."]
    for _ in range(200):
        n = rng.randint(2, 12)
        answers = [rng.choice(vocab) for _ in range(n)]
        pred = rng.choice(vocab)
        assert vqa_accuracy(pred, answers) == pytest.approx(_literal_leave_one_out(pred, answers))


def test_vqa_accuracy_normalizes_both_sides_and_takes_answer_dicts():
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", [{"answer": "Two", "answer_id": i} for i in range(10)]) == 1.0
    assert vqa_accuracy("a dog", ["dog", "dog"] + ["cat"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("isnt", ["isn't"] * 4 + ["is"] * 6) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0  # some official versions skip normalization here and score 0


def test_vqa_accuracy_other_answer_counts():
    # 5 answers, 2 matching: (2 * 1/3 + 3 * 2/3) / 5 = 8/15
    assert vqa_accuracy("red", ["red", "red", "blue", "blue", "green"]) == pytest.approx(8 / 15)
    assert vqa_accuracy("red", ["Red"]) == 1.0  # one answer: exact match
    assert vqa_accuracy("red", ["blue"]) == 0.0
    with pytest.raises(ValueError, match="no human answers"):
        vqa_accuracy("red", [])
    with pytest.raises(TypeError, match="list of the human answers"):
        vqa_accuracy("red", "red")
    with pytest.raises(ValueError, match=r"answers\[1\].*'answer'"):
        vqa_accuracy("red", ["red", {"text": "red"}])


def test_vqa_score_from_label():
    label = {"2": 1.0, "3": 0.3}
    assert vqa_score_from_label("two", label) == 1.0
    assert vqa_score_from_label("Three.", label) == 0.3
    assert vqa_score_from_label("4", label) == 0.0
    assert vqa_score_from_label("2", {}) == 0.0


def test_exact_match_accuracy():
    assert exact_match_accuracy(["Yes", "the left", "two"], ["yes", "left", "2"]) == 1.0
    assert exact_match_accuracy(["Yes", "the left", "two"], ["yes", "left", "2"], normalize=False) == 0.0
    assert exact_match_accuracy(["true", "false"], ["true", "true"]) == 0.5
    assert exact_match_accuracy(["b"], [["a", "B"]]) == 1.0  # a list of acceptable targets
    assert math.isnan(exact_match_accuracy([], []))
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        exact_match_accuracy(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="predictions is a str"):
        exact_match_accuracy("ab", ["a", "b"])
    with pytest.raises(TypeError, match=r"targets\[0\]"):
        exact_match_accuracy(["a"], [[]])


def test_caption_tokenize_mimics_ptb_plus_punctuation_removal():
    text = "A man's dog doesn't (really) run -- fast, at 3.5 mph; \"quoted\" 50% $5 T-shirt dogs' and/or..."
    assert caption_tokenize(text) == ["a", "man", "'s", "dog", "does", "n't", "really", "run", "fast", "at", "3.5", "mph",
                                      "quoted", "50", "%", "$", "5", "t-shirt", "dogs", "and/or"]
    assert caption_tokenize("") == []


# Three images whose captions share no n-gram, so CIDEr's IDF gives every n-gram a weight.
_CAPTIONS = {"1": "man riding red horse on beach", "2": "two cats sleeping upon blue sofa",
             "3": "plate of green food with forks"}


def test_caption_scores_identical_captions():
    scores = caption_scores(_CAPTIONS, {k: [v] for k, v in _CAPTIONS.items()})
    assert scores["count"] == 3
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)  # the scorer's smoothing leaves 1 - 1e-10
    assert scores["cider"] == pytest.approx(10.0)  # cosine 1 for every n, times 10


def test_caption_scores_tokenization_ignores_case_and_punctuation():
    preds = {k: v.upper().replace(" on ", ", on ") + "." for k, v in _CAPTIONS.items()}
    assert caption_scores(preds, {k: [v] for k, v in _CAPTIONS.items()}) == \
        caption_scores(_CAPTIONS, {k: [v] for k, v in _CAPTIONS.items()})


def test_caption_scores_hand_computed_bleu():
    # p1..p4 = 4/5, 3/4, 2/3, 1/2; same length -> no brevity penalty; (0.2) ** 0.25
    s = caption_scores({"x": "a b c d e"}, {"x": ["a b c d f"]})
    assert s["bleu4"] == pytest.approx(0.2 ** 0.25, abs=1e-6)
    # every n-gram precision 1, 4 words against 6: brevity penalty exp(1 - 6/4)
    s = caption_scores({"x": "a b c d"}, {"x": ["a b c d e f"]})
    assert s["bleu4"] == pytest.approx(math.exp(-0.5), abs=1e-6)


def test_caption_scores_cider_idf_quirks():
    refs = {k: [v] for k, v in _CAPTIONS.items()}
    # one image: every reference n-gram occurs in all (one) images -> IDF 0 -> CIDEr 0 even for a perfect caption
    assert caption_scores({"1": _CAPTIONS["1"]}, {"1": refs["1"]})["cider"] == 0.0
    # two images, one perfect (10) and one sharing nothing with its reference (0): mean 5
    s = caption_scores({"1": _CAPTIONS["1"], "2": "completely unrelated words here now"}, refs)
    assert s["cider"] == pytest.approx(5.0)
    assert s["count"] == 2


def test_caption_scores_errors_and_empty():
    empty = caption_scores({}, {"1": ["a"]})
    assert empty["count"] == 0 and math.isnan(empty["bleu4"]) and math.isnan(empty["cider"])
    with pytest.raises(KeyError, match="no references"):
        caption_scores({"9": "a b"}, {"1": ["a b"]})
    with pytest.raises(ValueError, match=r"references\['1'\]"):
        caption_scores({"1": "a b"}, {"1": []})
    with pytest.raises(ValueError, match=r"references\['1'\]"):
        caption_scores({"1": "a b"}, {"1": "a b"})
    with pytest.raises(TypeError, match="caption string"):
        caption_scores({"1": None}, {"1": ["a b"]})


def test_metrics_module_stays_light():
    code = ("import sys, mmadapters.eval.metrics as m; assert callable(m.vqa_accuracy); "
            "assert 'pycocoevalcap' not in sys.modules and 'h5py' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
