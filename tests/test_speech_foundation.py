"""The foundation's pretraining data (issue 20): every language in train, tail fraction, held-out voices, tokenizer."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from mmadapters.speech import synth
from mmadapters.speech.tokenizer import UNK, CharTokenizer, load_tokenizer

LANGS = "en,de,pl,uk"  # two head, two tail; Latin and Cyrillic; ł/ą/ї/є occur only in the tail
TINY = ["--languages", LANGS, "--utterances", "25", "--eval-utterances", "2", "--unlabeled", "0", "--workers", "1", "--quiet"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def foundation(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    out = tmp_path_factory.mktemp("foundation") / "a"
    assert synth.main(["--foundation", "--seed", "3", "--out", str(out), *TINY]) == 0
    return out


def test_every_character_of_every_word_list_is_encodable():
    tok = CharTokenizer.for_languages(synth.LANGUAGES)
    for lang in synth.LANGUAGES:
        for word in synth.load_wordlist(lang):
            ids = tok.encode(word)
            assert ids and UNK not in ids, (lang, word)
            assert tok.decode(ids) == word
    assert " " in tok.chars and tok.decode(tok.encode("ł ї")) == "ł ї"  # word boundaries are targets too


def test_tokenizer_for_no_language_is_an_error():
    with pytest.raises(ValueError, match="no languages"):
        CharTokenizer.for_languages([])


def test_foundation_data_matches_the_preset(foundation):
    config = json.loads((foundation / "synth_config.json").read_text(encoding="utf-8"))
    rows = _rows(foundation / "manifest.jsonl")
    assert config["tail_fraction"] == synth.DEFAULT_TAIL_FRACTION and config["vocabulary"] == 400
    assert config["words_per_sentence"] == [2, 5] and config["noise_snr_db"] == [25.0, 40.0]
    assert config["shared_speakers"] is True
    # every language is in train; the tail has round(0.12 * 25) = 3 utterances per language
    train = Counter(r["lang"] for r in rows if r["split"] == "train")
    assert train == {"en": 25, "de": 25, "pl": 3, "uk": 3}
    assert {lang: info["role"] for lang, info in config["languages"].items()} == {"en": "head", "de": "head", "pl": "tail", "uk": "tail"}
    # 8 training voices and 2 held-out voices, shared by every language, with distinct variants
    table = config["speakers"]["en"]
    assert all(config["speakers"][lang] == table for lang in config["languages"])
    assert len(table) == 10 and sum(s["heldout"] for s in table) == 2
    assert len({s["variant"] for s in table}) == 10
    heldout = {s["id"] for s in table if s["heldout"]}
    train_speakers = {r["speaker"] for r in rows if r["split"] == "train"}
    eval_speakers = {r["speaker"] for r in rows if r["split"] in ("dev", "test")}
    assert eval_speakers and eval_speakers <= heldout and not train_speakers & heldout
    # SNR and words per utterance, from the recorded rows; words from the first 400 of each list
    assert all(25.0 <= r["snr_db"] <= 40.0 for r in rows)
    assert {len(r["text"].split()) for r in rows} <= {2, 3, 4, 5}
    for r in rows:
        assert set(r["text"].split()) <= set(synth.load_wordlist(r["lang"])[:400])
    # the shipped tokenizer of the data set encodes every text, tail-only letters included
    tok = load_tokenizer(foundation / "tokenizer")
    assert all(UNK not in tok.encode(r["text"]) for r in rows)
    assert {"ł", "ї"} <= set(tok.chars)


def test_foundation_seed_reproduces_and_changes_the_draw(foundation, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert synth.main(["--foundation", "--seed", "3", "--out", str(again), *TINY]) == 0
    assert synth.main(["--foundation", "--seed", "4", "--out", str(other), *TINY]) == 0
    base = (foundation / "manifest.jsonl").read_bytes()
    assert (again / "manifest.jsonl").read_bytes() == base
    first = _rows(foundation / "manifest.jsonl")
    assert (again / first[0]["audio_filepath"]).read_bytes() == (foundation / first[0]["audio_filepath"]).read_bytes()
    changed = _rows(other / "manifest.jsonl")
    assert [r["text"] for r in changed] != [r["text"] for r in first]
    speakers = [json.loads((d / "synth_config.json").read_text())["speakers"] for d in (foundation, other)]
    assert speakers[0] != speakers[1]


def test_explicit_flags_override_the_preset_and_bad_values_are_named(tmp_path, capsys):
    assert synth.main(["--foundation", "--tail-fraction", "0", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "tail_fraction=0.0" in capsys.readouterr().err
    assert synth.main(["--foundation", "--vocabulary", "3000", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "vocabulary=3000 needs more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synth.main(["--foundation", "--words-per-utterance", "5,2", "--out", str(tmp_path / "x")])
    assert "--words-per-utterance '5,2'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not both"):
        synth.generate(tmp_path / "y", "en", tail_utterances=2, tail_fraction=0.1)
    with pytest.raises(synth.SynthError, match="distinct voice variants"):
        synth.make_shared_speakers(0, 5, 1, variants=["m1", "m2"])
