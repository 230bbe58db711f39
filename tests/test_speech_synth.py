"""Generated multilingual speech: language table, word lists, determinism, manifests, audio format, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import unicodedata
import wave
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmadapters.speech import synth

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (bash scripts/system_deps.sh)")

# en, ru head; pt, uk tail: two scripts, both roles, every split
TINY = dict(utterances=3, tail_utterances=1, eval_utterances=1, unlabeled=2, speakers=4, heldout_speakers=1, progress=False)
TINY_LANGS = "en,ru,pt,uk"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    out = tmp_path_factory.mktemp("synth") / "a"
    synth.generate(out, TINY_LANGS, seed=7, workers=1, **TINY)
    return out


# ------------------------------------------------------------------------------------------------ table and word lists


def test_language_table_has_twelve_languages_two_scripts_head_and_tail():
    assert synth.HEAD_LANGUAGES == ("en", "de", "es", "fr", "it", "ru")
    assert synth.TAIL_LANGUAGES == ("pt", "nl", "pl", "sv", "cs", "uk")
    assert len(synth.DEFAULT_LANGUAGES) == 12 and len(synth.LANGUAGES) >= 12
    assert len({synth.LANGUAGES[c].script for c in synth.DEFAULT_LANGUAGES}) >= 2
    assert {i.script for i in synth.LANGUAGES.values()} >= {"Latin", "Cyrillic", "Greek", "Devanagari"}
    for code, info in synth.LANGUAGES.items():
        assert info.code == code and info.voice and info.role in ("head", "tail")
        assert info.role == ("head" if code in synth.HEAD_LANGUAGES else "tail")


@needs_espeak
def test_every_language_has_an_installed_espeak_voice():
    _, voices, variants = synth.espeak_info(synth.find_espeak())
    assert {i.voice for i in synth.LANGUAGES.values()} <= voices
    assert len(set(synth.VARIANTS) & variants) >= 60


@pytest.mark.parametrize("code", list(synth.LANGUAGES))
def test_shipped_word_list_is_letters_of_the_script(code):
    words = synth.load_wordlist(code)
    assert len(words) >= 2000 and len(set(words)) == len(words)
    script = synth.LANGUAGES[code].script.upper()
    for w in words:
        assert synth.MIN_WORD_CHARS <= len(w) <= synth.MAX_WORD_CHARS, (code, w)
        assert w == unicodedata.normalize("NFC", w) and w == w.lower(), (code, w)
        for ch in w:
            assert unicodedata.category(ch)[0] in "LM" and unicodedata.name(ch).startswith(script), (code, w, ch)


def test_word_lists_stay_small():
    total = sum(p.stat().st_size for p in synth.WORDLIST_DIR.glob("*.txt"))
    assert total < 600_000
    assert (synth.WORDLIST_DIR / "README.md").is_file()


def test_sentences_have_three_to_seven_words_with_rank_weights():
    words = synth.load_wordlist("de")
    rng = np.random.default_rng(0)
    sentences = [synth.make_sentence(rng, words) for _ in range(3000)]
    lengths = Counter(len(s.split()) for s in sentences)
    assert set(lengths) == set(range(synth.MIN_WORDS, synth.MAX_WORDS + 1))
    counts = Counter(w for s in sentences for w in s.split())
    assert set(counts) <= set(words)
    top = sum(counts[w] for w in words[:100])
    bottom = sum(counts[w] for w in words[-100:])
    assert top > 5 * bottom > 0  # Zipf-like: frequent words much more often, rare ones still used
    again = np.random.default_rng(0)
    assert [synth.make_sentence(again, words) for _ in range(50)] == sentences[:50]


# ------------------------------------------------------------------------------------------------ generated data set


def test_manifest_rows_splits_and_counts(tiny):
    rows = _rows(tiny / "manifest.jsonl")
    assert all(set(r) == {"audio_filepath", "duration", "text", "lang", "split", "speaker", "snr_db"} for r in rows)
    per = Counter((r["lang"], r["split"]) for r in rows)
    assert per == {
        ("en", "train"): 3, ("en", "dev"): 1, ("en", "test"): 1,
        ("ru", "train"): 3, ("ru", "dev"): 1, ("ru", "test"): 1,
        ("pt", "train"): 1, ("pt", "dev"): 1, ("pt", "test"): 1, ("pt", "unlabeled"): 2,
        ("uk", "train"): 1, ("uk", "dev"): 1, ("uk", "test"): 1, ("uk", "unlabeled"): 2,
    }  # fmt: skip
    for split in synth.SPLITS:
        assert _rows(tiny / f"{split}.jsonl") == [r for r in rows if r["split"] == split]
    for r in rows:
        assert not Path(r["audio_filepath"]).is_absolute() and (tiny / r["audio_filepath"]).is_file()
        words = r["text"].split()
        assert synth.MIN_WORDS <= len(words) <= synth.MAX_WORDS and set(words) <= set(synth.load_wordlist(r["lang"]))
        assert r["speaker"].startswith(r["lang"] + "-s")
    # the held-out speaker (the last of 4) speaks dev and test only
    for r in rows:
        assert (r["speaker"].endswith("-s03")) == (r["split"] in ("dev", "test"))
    config = json.loads((tiny / "synth_config.json").read_text(encoding="utf-8"))
    assert config["seed"] == 7 and config["sample_rate"] == 16000
    assert {c: v["role"] for c, v in config["languages"].items()} == {"en": "head", "ru": "head", "pt": "tail", "uk": "tail"}
    assert config["totals"]["pt"]["unlabeled"]["utterances"] == 2
    assert "must not train" in config["unlabeled_note"]


def test_wavs_are_16khz_mono_pcm16_with_manifest_durations(tiny):
    for r in _rows(tiny / "manifest.jsonl"):
        with wave.open(str(tiny / r["audio_filepath"]), "rb") as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            n = w.getnframes()
            x = np.frombuffer(w.readframes(n), dtype="<i2").astype(np.float64) / 32768
        assert r["duration"] == n / 16000
        assert 0.8 < r["duration"] < 8.0, r
        # speech plus noise: not silent, not clipped; the padded edges are quieter than the middle
        assert 0.005 < np.sqrt(np.mean(x**2)) and np.abs(x).max() <= 0.99 + 1e-4
        edge = x[: int(0.04 * 16000)]
        assert np.sqrt(np.mean(edge**2)) < np.sqrt(np.mean(x**2))


@needs_espeak
def test_same_seed_same_bytes_and_workers_do_not_matter(tiny, tmp_path):
    again = tmp_path / "again"
    synth.generate(again, TINY_LANGS, seed=7, workers=1, **TINY)
    assert _files(again) == _files(tiny)
    # the module entry point with 2 spawned worker processes writes the same bytes
    cli = tmp_path / "cli"
    cmd = [sys.executable, "-m", "mmadapters.speech.synth", "--languages", "uk,pt,ru,en", "--utterances", "3", "--tail-utterances", "1"]
    cmd += ["--eval-utterances", "1", "--unlabeled", "2", "--speakers", "4", "--heldout-speakers", "1", "--seed", "7"]
    cmd += ["--out", str(cli), "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 20 utterances" in proc.stdout
    assert _files(cli) == _files(tiny)


@needs_espeak
def test_other_seed_other_audio_and_languages_are_independent(tiny, tmp_path):
    other = synth.generate(tmp_path / "other", TINY_LANGS, seed=8, workers=1, **TINY).parent
    a, b = _files(tiny), _files(other)
    wavs = [k for k in a if k.endswith(".wav")]
    assert sum(a[k] != b.get(k) for k in wavs) == len(wavs)
    # fewer languages, more utterances: the files both runs have are the same bytes
    en = synth.generate(tmp_path / "en", "en", seed=7, workers=1, **{**TINY, "utterances": 4}).parent
    c = _files(en)
    shared = [k for k in c if k.endswith(".wav") and k in a]
    assert len(shared) == 5 and all(a[k] == c[k] for k in shared)
    assert "audio/en/train/en_train_000003.wav" in c
    rows = {r["audio_filepath"]: r for r in _rows(tiny / "manifest.jsonl")}
    assert all(rows[r["audio_filepath"]] == r for r in _rows(en / "manifest.jsonl") if r["audio_filepath"] in rows)


@needs_espeak
def test_rerun_is_a_no_op_and_a_smaller_run_removes_stale_audio(tmp_path):
    out = tmp_path / "d"
    kw = {**TINY, "utterances": 2, "eval_utterances": 0}
    synth.generate(out, "en", seed=1, workers=1, **kw)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    synth.generate(out, "en", seed=1, workers=1, **kw)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    synth.generate(out, "en", seed=1, workers=1, **{**kw, "utterances": 1})
    assert sorted(p.name for p in out.rglob("*.wav")) == ["en_train_000000.wav"]
    assert len(_rows(out / "manifest.jsonl")) == 1


def test_tail_languages_override_and_clean_audio_option():
    langs, roles = synth._resolve_languages("uk,en,pt", "en")  # command-line order does not matter
    assert langs == ["en", "pt", "uk"] and roles == {"en": "tail", "pt": "head", "uk": "head"}
    assert synth._parse_snr("none") is None and synth._parse_snr("10,20") == (10.0, 20.0) and synth._parse_snr("12") == (12.0, 12.0)
    with pytest.raises(Exception, match="LOW,HIGH"):
        synth._parse_snr("20,10")


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_language_is_named(capsys, tmp_path):
    with pytest.raises(ValueError, match=r"unknown language 'xx'.*en, de"):
        synth.generate(tmp_path / "x", "en,xx", utterances=1, progress=False)
    assert synth.main(["--languages", "en,klingon", "--out", str(tmp_path / "x"), "--utterances", "1"]) == 2
    assert "unknown language 'klingon'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tail_languages"):
        synth.generate(tmp_path / "x", "en", tail_languages="de", utterances=1, progress=False)
    with pytest.raises(ValueError, match="utterances=-1"):
        synth.generate(tmp_path / "x", "en", utterances=-1, progress=False)
    assert not (tmp_path / "x").exists()


def test_missing_espeak_says_how_to_install(monkeypatch, capsys, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(synth.SynthError, match=r"espeak-ng.*apt-get install espeak-ng.*scripts/system_deps\.sh"):
        synth.generate(tmp_path / "x", "en", utterances=1, progress=False)
    assert synth.main(["--languages", "en", "--out", str(tmp_path / "x"), "--utterances", "1"]) == 2
    assert "espeak-ng binary was not found" in capsys.readouterr().err
    assert os.environ["PATH"] == str(empty)


@needs_espeak
def test_clean_audio_has_silent_padding(tmp_path):
    out = synth.generate(tmp_path / "clean", "en", utterances=1, eval_utterances=0, noise_snr=None, workers=1, progress=False).parent
    with wave.open(str(out / "audio/en/train/en_train_000000.wav"), "rb") as w:
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    lead = int(synth.SILENCE_S[0] * 16000)
    assert not x[:lead].any() and not x[-lead:].any() and x.any()
    assert json.loads((out / "synth_config.json").read_text(encoding="utf-8"))["noise_snr_db"] is None
