"""Speech audio loading (every bad-file case) and the NeMo / Common Voice / MLS readers, incl. path escapes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from mmadapters.speech.audio import SAMPLE_RATE, SILENCE_PEAK, AudioError, audio_duration, load_audio
from mmadapters.speech.readers import (
    AsrDataset,
    PathEscapeError,
    Skipped,
    SpeechDataError,
    Utterance,
    collate_audio,
    iter_audio_batches,
    read_common_voice,
    read_manifest,
    read_mls,
    read_speech_dataset,
    write_manifest,
)


def tone(seconds: float = 0.25, sr: int = SAMPLE_RATE, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


def write_wav(path, seconds=0.25, sr=SAMPLE_RATE, channels=1, fmt=None, subtype=None, data=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(seconds, sr, channels=channels) if data is None else data, sr, format=fmt, subtype=subtype)
    return path


# -- load_audio --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["wav", "flac", "ogg"])
def test_load_audio_formats_round_trip(tmp_path, suffix):
    x = tone(0.5)
    path = write_wav(tmp_path / f"a.{suffix}", data=x)
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.shape == (len(x),)
    if suffix != "ogg":  # lossless
        assert torch.allclose(wave, torch.from_numpy(x), atol=1e-3)
    assert audio_duration(path) == pytest.approx(0.5)


def test_load_audio_mp3_when_libsndfile_supports_it(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile cannot write MP3")
    path = write_wav(tmp_path / "a.mp3", seconds=1.0)
    wave = load_audio(path)
    assert abs(wave.shape[0] - SAMPLE_RATE) < 0.1 * SAMPLE_RATE


def test_load_audio_resamples_to_16k(tmp_path):
    path = write_wav(tmp_path / "a.wav", seconds=0.5, sr=8000)
    wave = load_audio(path)
    assert wave.shape == (8000,)
    spectrum = torch.fft.rfft(wave).abs()
    assert spectrum.argmax().item() == pytest.approx(440 * 0.5, abs=2)  # bin = f * S / sr = 440 * 8000/16000
    assert load_audio(path, sample_rate=8000).shape == (4000,)


def test_load_audio_mono_mix_and_channel_error(tmp_path):
    path = write_wav(tmp_path / "stereo.wav", channels=2)
    with pytest.raises(AudioError, match=r"stereo\.wav: has 2 channels; expected mono .*mono='mix'") as e:
        load_audio(path)
    assert e.value.kind == "channels"
    mixed = load_audio(path, mono="mix")
    x = tone()
    assert torch.allclose(mixed, torch.from_numpy(0.75 * x), atol=1e-3)
    with pytest.raises(ValueError, match="mono='both'"):
        load_audio(path, mono="both")


def _kind(path, **kw):
    with pytest.raises(AudioError) as e:
        load_audio(path, **kw)
    assert str(path) in str(e.value)
    return e.value


def test_load_audio_missing(tmp_path):
    err = _kind(tmp_path / "nope.wav")
    assert err.kind == "missing" and "not found" in str(err)
    (tmp_path / "dir.wav").mkdir()
    assert _kind(tmp_path / "dir.wav").kind == "missing"


def test_load_audio_corrupt_and_zero_bytes(tmp_path):
    garbage = tmp_path / "g.wav"
    garbage.write_bytes(b"this is not audio" * 20)
    err = _kind(garbage)
    assert err.kind == "corrupt" and "cannot decode" in str(err)
    zero = tmp_path / "zero.flac"
    zero.write_bytes(b"")
    assert _kind(zero).kind == "empty"


@pytest.mark.parametrize("suffix", ["wav", "flac"])
def test_load_audio_truncated(tmp_path, suffix):
    path = write_wav(tmp_path / f"t.{suffix}", seconds=1.0, data=(np.random.default_rng(0).standard_normal(16000) * 0.1)
                     .astype(np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = _kind(path)
    assert err.kind == "corrupt"
    assert "truncated" in str(err) or "cannot decode" in str(err)


def test_load_audio_empty_wav(tmp_path):
    path = write_wav(tmp_path / "e.wav", data=np.zeros(0, np.float32))
    err = _kind(path)
    assert err.kind == "empty" and "0 samples" in str(err)


def test_load_audio_silent(tmp_path):
    path = write_wav(tmp_path / "s.wav", data=np.zeros(4000, np.float32), subtype="FLOAT")
    err = _kind(path)
    assert err.kind == "silent" and "-inf dBFS" in str(err)
    quiet = write_wav(tmp_path / "q.wav", data=np.full(4000, SILENCE_PEAK / 2, np.float32), subtype="FLOAT")
    assert _kind(quiet).kind == "silent"
    audible = write_wav(tmp_path / "ok.wav", data=np.full(4000, SILENCE_PEAK * 2, np.float32), subtype="FLOAT")
    assert load_audio(audible).shape == (4000,)


def test_load_audio_non_finite(tmp_path):
    x = tone()
    x[10] = np.nan
    path = write_wav(tmp_path / "nan.wav", data=x, subtype="FLOAT")
    assert _kind(path).kind == "corrupt"


def test_load_audio_too_long(tmp_path):
    path = write_wav(tmp_path / "long.wav", seconds=2.0)
    err = _kind(path, max_seconds=1.5)
    assert err.kind == "too_long" and "2.00 s" in str(err) and "at most 1.5 s" in str(err)
    assert load_audio(path, max_seconds=None).shape == (32000,)


def test_load_audio_unsupported_format_says_how_to_convert(tmp_path):
    path = tmp_path / "voice.m4a"
    path.write_bytes(b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 64)
    err = _kind(path)
    assert err.kind == "unsupported_format" and "ffmpeg -i voice.m4a -ac 1 -ar 16000 voice.wav" in str(err)


# -- NeMo manifests ------------------------------------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for name in ("en/a.wav", "de/b.wav"):
        write_wav(root / name)
    return root


def _manifest(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_read_manifest(corpus):
    m = _manifest(corpus / "m.jsonl", [
        {"audio_filepath": "en/a.wav", "duration": 0.25, "text": "hello world", "lang": "en", "split": "test"},
        "",
        {"audio_filepath": "de/b.wav", "text": "grüße", "lang": "de", "speaker": "s1", "id": "utt-b"},
    ])
    utts = read_manifest(m)
    assert utts == [
        Utterance("en/a", str((corpus / "en/a.wav").resolve()), "hello world", "en", 0.25, None),
        Utterance("utt-b", str((corpus / "de/b.wav").resolve()), "grüße", "de", None, "s1"),
    ]
    assert os.path.isabs(utts[0].audio_path)


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", r"m\.jsonl:2: invalid JSON"),
    ('["a"]', r"m\.jsonl:2: a JSON list; expected an object"),
    ('{"text": "x", "lang": "en"}', r"m\.jsonl:2: missing field 'audio_filepath'"),
    ('{"audio_filepath": "en/a.wav", "lang": "en"}', r"m\.jsonl:2: missing field 'text'"),
    ('{"audio_filepath": "en/a.wav", "text": "x"}', r"m\.jsonl:2: missing field 'lang'"),
    ('{"audio_filepath": "en/a.wav", "text": 5, "lang": "en"}', r"m\.jsonl:2: field 'text' is int \(5\); expected a str"),
    ('{"audio_filepath": 3, "text": "x", "lang": "en"}', r"m\.jsonl:2: field 'audio_filepath' is int"),
    ('{"audio_filepath": "en/a.wav", "text": "x", "lang": "en", "duration": "1s"}', r"m\.jsonl:2: field 'duration' = '1s'"),
    ('{"audio_filepath": "en/a.wav", "text": "x", "lang": "en", "duration": -1}', r"field 'duration' = -1"),
    ('{"audio_filepath": "", "text": "x", "lang": "en"}', r"m\.jsonl:2: field 'audio_filepath' is empty"),
])
def test_read_manifest_errors_name_file_line_and_field(corpus, line, message):
    m = _manifest(corpus / "m.jsonl", [{"audio_filepath": "en/a.wav", "text": "ok", "lang": "en"}, line])
    with pytest.raises(SpeechDataError, match=message):
        read_manifest(m)


def test_read_manifest_default_lang_and_missing_file(corpus):
    m = _manifest(corpus / "m.jsonl", [{"audio_filepath": "en/a.wav", "text": "x"}])
    assert read_manifest(m, lang="en")[0].lang == "en"
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(corpus / "absent.jsonl")


def test_manifest_paths_cannot_escape_the_root(tmp_path, corpus):
    outside = write_wav(tmp_path / "secret.wav")
    (corpus / "link.wav").symlink_to(outside)
    for value in ("../secret.wav", "en/../../secret.wav", str(outside), "link.wav"):
        m = _manifest(corpus / "m.jsonl", [{"audio_filepath": value, "text": "x", "lang": "en"}])
        with pytest.raises(PathEscapeError, match=r"m\.jsonl:1: field 'audio_filepath' .* outside the dataset root"):
            read_manifest(m)
        assert read_manifest(m, allow_absolute=True)[0].audio_path == str(outside.resolve())
    # absolute paths that stay inside the root, and harmless '..', are fine
    inside = _manifest(corpus / "m.jsonl", [{"audio_filepath": str(corpus / "en/a.wav"), "text": "x", "lang": "en"},
                                            {"audio_filepath": "de/../en/a.wav", "text": "y", "lang": "en"}])
    assert {u.audio_path for u in read_manifest(inside)} == {str((corpus / "en/a.wav").resolve())}


def test_write_manifest_round_trip_relative_and_atomic(tmp_path, corpus):
    utts = read_manifest(_manifest(corpus / "m.jsonl", [
        {"audio_filepath": "en/a.wav", "duration": 0.25, "text": "hello", "lang": "en", "speaker": "s"},
        {"audio_filepath": "de/b.wav", "text": "ß ä", "lang": "de"}]))
    out = write_manifest(corpus / "out.jsonl", utts)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [x["audio_filepath"] for x in lines] == ["en/a.wav", "de/b.wav"]
    assert read_manifest(out) == utts
    assert not [p for p in corpus.iterdir() if p.name.endswith(".tmp")]
    # audio outside the manifest's folder: refused unless written absolute
    sub = corpus / "sub" / "m.jsonl"
    with pytest.raises(PathEscapeError, match="outside the manifest's folder"):
        write_manifest(sub, utts)
    write_manifest(sub, utts, allow_absolute=True)
    assert read_manifest(sub, allow_absolute=True) == utts


# -- Common Voice ------------------------------------------------------------------------------------------

CV_HEADER = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment\n"


@pytest.fixture
def common_voice(tmp_path):
    root = tmp_path / "cv"
    write_wav(root / "clips" / "common_voice_de_1.wav")
    write_wav(root / "clips" / "common_voice_de_2.wav")
    (root / "test.tsv").write_text(CV_HEADER
                                   + 'c1\tcommon_voice_de_1.wav\tEr sagte "Hallo".\t2\t0\t\t\t\tde\t\n'
                                   + "c2\tcommon_voice_de_2.wav\tZweiter Satz\t2\t0\t\t\t\tde\t\n", encoding="utf-8")
    (root / "clip_durations.tsv").write_text("clip\tduration[ms]\ncommon_voice_de_1.wav\t250\n", encoding="utf-8")
    return root


def test_read_common_voice(common_voice):
    utts = read_common_voice(common_voice, "test")
    assert [u.id for u in utts] == ["common_voice_de_1", "common_voice_de_2"]
    assert utts[0].text == 'Er sagte "Hallo".'  # quotes are literal
    assert utts[0].lang == "de" and utts[0].speaker == "c1" and utts[0].duration == 0.25 and utts[1].duration is None
    assert utts[0].audio_path == str((common_voice / "clips" / "common_voice_de_1.wav").resolve())
    assert {u.lang for u in read_common_voice(common_voice, "test", lang="de-x")} == {"de-x"}
    assert read_speech_dataset(common_voice, split="test") == utts


def test_read_common_voice_errors(common_voice):
    with pytest.raises(FileNotFoundError, match=r"split 'dev' not found.*found: clip_durations, test"):
        read_common_voice(common_voice, "dev")
    (common_voice / "dev.tsv").write_text("client_id\tpath\tlocale\nc\tx.wav\tde\n", encoding="utf-8")
    with pytest.raises(SpeechDataError, match=r"dev\.tsv:1: missing column 'sentence'"):
        read_common_voice(common_voice, "dev")
    (common_voice / "dev.tsv").write_text(CV_HEADER + "c1\tx.wav\tonly three\n", encoding="utf-8")
    with pytest.raises(SpeechDataError, match=r"dev\.tsv:2: 3 tab-separated fields; expected 10"):
        read_common_voice(common_voice, "dev")
    (common_voice / "dev.tsv").write_text(CV_HEADER + "c1\t../../etc/passwd\ts\t0\t0\t\t\t\tde\t\n", encoding="utf-8")
    with pytest.raises(PathEscapeError, match=r"dev\.tsv:2: field 'path'"):
        read_common_voice(common_voice, "dev")
    (common_voice / "dev.tsv").write_text("client_id\tpath\tsentence\nc\tx.wav\ts\n", encoding="utf-8")
    with pytest.raises(SpeechDataError, match="missing column 'locale' and no lang given"):
        read_common_voice(common_voice, "dev")
    assert read_common_voice(common_voice, "dev", lang="de")[0].lang == "de"


# -- Multilingual LibriSpeech ------------------------------------------------------------------------------

@pytest.fixture
def mls(tmp_path):
    root = tmp_path / "mls_german"
    write_wav(root / "test" / "audio" / "10" / "20" / "10_20_000001.flac")
    write_wav(root / "test" / "audio" / "11" / "21" / "11_21_000002.flac")
    (root / "test" / "transcripts.txt").write_text("10_20_000001\tguten tag\n\n11_21_000002\tauf wiedersehen\n",
                                                   encoding="utf-8")
    return root


def test_read_mls(mls):
    utts = read_mls(mls, "test", lang="de")
    assert [(u.id, u.text, u.lang, u.speaker) for u in utts] == [("10_20_000001", "guten tag", "de", "10"),
                                                                 ("11_21_000002", "auf wiedersehen", "de", "11")]
    assert utts[0].audio_path == str((mls / "test/audio/10/20/10_20_000001.flac").resolve())
    assert read_speech_dataset(mls, split="test", lang="de") == utts
    with pytest.raises(ValueError, match="pass lang"):
        read_speech_dataset(mls, split="test")


def test_read_mls_errors(mls):
    t = mls / "test" / "transcripts.txt"
    t.write_text("10_20_000001\tok\nno tab here\n", encoding="utf-8")
    with pytest.raises(SpeechDataError, match=r"transcripts\.txt:2: no TAB"):
        read_mls(mls, "test", lang="de")
    t.write_text("10_20\tbad id\n", encoding="utf-8")
    with pytest.raises(SpeechDataError, match=r"transcripts\.txt:1: id '10_20' is not"):
        read_mls(mls, "test", lang="de")
    with pytest.raises(FileNotFoundError, match="transcripts not found"):
        read_mls(mls, "train", lang="de")


def test_read_speech_dataset_dispatch_errors(tmp_path, corpus):
    m = _manifest(corpus / "test.jsonl", [{"audio_filepath": "en/a.wav", "text": "x", "lang": "en"}])
    assert read_speech_dataset(corpus) == read_manifest(m)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(SpeechDataError, match="unknown dataset file"):
        read_speech_dataset(tmp_path / "x.csv")
    with pytest.raises(SpeechDataError, match="no known speech dataset layout"):
        read_speech_dataset(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_speech_dataset(tmp_path / "absent")


# -- lazy loading with skips -------------------------------------------------------------------------------

def test_dataset_skips_bad_files_with_reasons_unless_fail_fast(tmp_path):
    good = write_wav(tmp_path / "good.wav", seconds=0.5)
    short = write_wav(tmp_path / "short.wav", seconds=0.25)
    silent = write_wav(tmp_path / "silent.wav", data=np.zeros(800, np.float32))
    utts = [Utterance(p.stem, str(p), "t", "en") for p in (good, tmp_path / "missing.wav", silent, short)]
    ds = AsrDataset(utts)
    assert isinstance(ds[1], Skipped) and ds[1].kind == "missing" and "missing.wav" in ds[1].reason
    batches = list(iter_audio_batches(utts, 3))
    assert len(batches) == 2
    b0 = batches[0]
    assert [u.id for u in b0.utterances] == ["good"] and [s.kind for s in b0.skipped] == ["missing", "silent"]
    assert b0.waves.shape == (1, 8000) and b0.lengths.tolist() == [8000] and b0.seconds == pytest.approx(0.5)
    both = collate_audio([ds[0], ds[3]])
    assert both.waves.shape == (2, 8000) and both.lengths.tolist() == [8000, 4000]
    assert both.waves[1, 4000:].abs().sum() == 0
    empty = collate_audio([ds[1]])
    assert empty.waves.shape == (0, 0) and empty.utterances == []
    with pytest.raises(AudioError, match="missing.wav"):
        list(iter_audio_batches(utts, 2, fail_fast=True))
