"""``mmadapters eval asr``: the shared results schema, per-utterance records, skipped files, resuming after a crash."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmadapters.eval import asr_tasks
from mmadapters.eval.cli import main
from mmadapters.eval.metrics import normalize_text, wer
from mmadapters.eval.results_schema import SCHEMA, read_results
from mmadapters.eval.sample_runner import SampleLog
from mmadapters.speech import synth
from mmadapters.speech.audio import AudioError, load_audio
from mmadapters.speech.decode import transcribe
from mmadapters.speech.model import load_asr
from mmadapters.speech.readers import read_manifest

LANGS = ["nl", "pt"]

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None and shutil.which("espeak") is None,
                                reason="espeak-ng is not installed (generated speech)")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Generated nl/pt speech, 4 test utterances per language, plus one corrupt wav (nl) in the middle."""
    root = tmp_path_factory.mktemp("asr_speech")
    synth.generate(root, LANGS, utterances=1, tail_utterances=1, eval_utterances=4, unlabeled=0, tail_languages=LANGS,
                   speakers=3, heldout_speakers=1, workers=1, progress=False)
    (root / "audio" / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"not audio at all" * 4)
    rows = [json.loads(line) for line in (root / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    rows.insert(3, {"audio_filepath": "audio/broken.wav", "text": "kapot bestand", "lang": "nl"})
    path = root / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _eval(manifest, output, *extra: str) -> int:
    return main(["eval", "asr", "--manifest", str(manifest), "--output", str(output), "--batch-size", "2", "--no-progress",
                 *extra])


def test_writes_the_shared_schema_with_per_language_metrics_and_the_skipped_file(manifest, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert _eval(manifest, out) == 0
    results = read_results(out)  # validates against the schema
    assert results["schema"] == SCHEMA and results["task"] == "asr" and results["model"] == "tiny_asr"
    assert results["dataset"] == "eval" and results["pretrained"] is None
    assert results["counts"] == {"total": 9, "evaluated": 8, "skipped": 1, "resumed": 0}
    [skip] = results["skipped"]
    assert skip["id"] == "audio/broken" and skip["reason"].startswith("AudioError: ") and "broken.wav" in skip["reason"]
    assert list(results["metrics"])[0] == "wer"
    per = results["per_group"]
    assert sorted(per) == LANGS and per["nl"]["skipped"] == 1 and per["pt"]["skipped"] == 0
    assert per["nl"]["utterances"] == per["pt"]["utterances"] == 4
    for lang in LANGS:  # corpus WER/CER from the summed edit counts of the records
        assert per[lang]["wer"] == per[lang]["word_edits"] / per[lang]["words"]
        assert per[lang]["cer"] == per[lang]["char_edits"] / per[lang]["chars"]
    assert results["metrics"]["wer"] == pytest.approx((per["nl"]["wer"] + per["pt"]["wer"]) / 2)
    pooled = (per["nl"]["word_edits"] + per["pt"]["word_edits"]) / (per["nl"]["words"] + per["pt"]["words"])
    assert results["metrics"]["wer_pooled"] == pytest.approx(pooled)
    assert results["settings"]["decode"] == "greedy" and results["timings"]["total_s"] > 0
    assert not SampleLog.paths(out)  # the samples log is removed once the results are written

    # the numbers of the decoder's transcripts of the readable files
    for lang, expected in _decoder_wers(manifest).items():
        assert per[lang]["wer"] == pytest.approx(expected)
    assert "8 of 9 samples evaluated, 1 skipped" in capsys.readouterr().out

    # against itself as the baseline: no reduction
    again = tmp_path / "again.json"
    assert _eval(manifest, again, "--baseline", str(out)) == 0
    rel = read_results(again)
    assert rel["metrics"]["relative_wer_reduction"] == 0.0
    assert all(rel["per_group"][lang]["relative_wer_reduction"] == 0.0 for lang in LANGS)


def test_a_crashed_evaluation_resumes_with_identical_metrics(manifest, tmp_path, monkeypatch):
    whole = tmp_path / "whole.json"
    assert _eval(manifest, whole) == 0

    crashed = tmp_path / "crashed.json"
    monkeypatch.setattr(asr_tasks.AsrPredictor, "__call__", _dies_after(2))  # interrupted mid-evaluation
    with pytest.raises(KeyboardInterrupt):
        _eval(manifest, crashed)
    assert not crashed.exists()
    [log] = SampleLog.paths(crashed)
    assert len(log.read_text().splitlines()) == 1 + 4  # header + two batches of two

    monkeypatch.undo()
    assert _eval(manifest, crashed) == 0
    a, b = read_results(whole), read_results(crashed)
    assert b["counts"]["resumed"] == 4 and b["counts"]["evaluated"] == a["counts"]["evaluated"]
    assert b["metrics"] == a["metrics"] and b["per_group"] == {
        lang: {**v, "audio_s": pytest.approx(v["audio_s"])} for lang, v in a["per_group"].items()}
    assert b["skipped"] == a["skipped"] and b["run_key"] == a["run_key"]
    assert not SampleLog.paths(crashed)


def test_a_log_of_other_settings_is_refused_and_restart_discards_it(manifest, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    monkeypatch.setattr(asr_tasks.AsrPredictor, "__call__", _dies_after(1))
    with pytest.raises(KeyboardInterrupt):
        _eval(manifest, out)
    monkeypatch.undo()
    assert SampleLog.paths(out)
    assert _eval(manifest, out, "--decode", "beam", "--beam", "2") == 2  # another run's samples: not mixed in
    assert "samples of another run" in capsys.readouterr().err
    assert _eval(manifest, out, "--decode", "beam", "--beam", "2", "--restart") == 0
    assert read_results(out)["counts"]["resumed"] == 0


def test_fail_fast_stops_at_the_corrupt_file(manifest, tmp_path, capsys):
    assert _eval(manifest, tmp_path / "r.json", "--fail-fast") == 2
    err = capsys.readouterr().err
    assert "mmadapters eval asr: error:" in err and "broken.wav" in err


def _dies_after(batches: int):
    """An ``AsrPredictor.__call__`` that decodes ``batches`` batches, then the process is interrupted."""
    real = asr_tasks.AsrPredictor.__call__
    calls = {"n": 0}

    def predict(self, batch):
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt
        return real(self, batch)

    return predict


def _decoder_wers(manifest) -> dict[str, float]:
    """Per-language WER of the shipped model's offline second-pass transcripts of the manifest's readable files."""
    utts, waves = [], []
    for u in read_manifest(manifest):
        try:
            waves.append(load_audio(u.audio_path))
            utts.append(u)
        except AudioError:
            pass
    hyps = transcribe(load_asr(), waves)
    return {lang: wer([normalize_text(u.text) for u in utts if u.lang == lang],
                      [normalize_text(h) for u, h in zip(utts, hyps, strict=True) if u.lang == lang]) for lang in LANGS}


def test_streaming_scores_both_passes(manifest, tmp_path):
    offline, streaming = tmp_path / "offline.json", tmp_path / "streaming.json"
    assert _eval(manifest, offline) == 0
    assert _eval(manifest, streaming, "--streaming", "--chunk-ms", "320") == 0
    a, b = read_results(offline), read_results(streaming)
    for lang in LANGS:
        assert b["per_group"][lang]["utterances"] == a["per_group"][lang]["utterances"]
        assert b["per_group"][lang]["wer"] >= 0 and b["per_group"][lang]["wer_first_pass"] >= 0
    assert b["metrics"]["wer_first_pass"] >= 0 and b["timings"]["first_partial_latency_mean_s"] > 0
    assert 0 < b["timings"]["rtf_first_pass"] <= b["timings"]["rtf"]
    assert b["settings"]["chunk_ms"] == 320 and a["settings"]["chunk_ms"] is None and a["run_key"] != b["run_key"]


def test_group_by_speaker_scores_each_voice(manifest, tmp_path, capsys):
    """--group-by speaker: per_group holds the manifest's speakers (the generator's voices; "unknown" for the
    line without one), each from the records of its utterances alone; the same edits as the per-language run."""
    by_lang, by_speaker = tmp_path / "l.json", tmp_path / "s.json"
    assert _eval(manifest, by_lang) == 0
    assert _eval(manifest, by_speaker, "--group-by", "speaker") == 0
    lang, spk = read_results(by_lang), read_results(by_speaker)
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    speakers = {str(r["speaker"]) for r in rows if "speaker" in r}
    assert len(speakers) >= 2 and sorted(spk["per_group"]) == sorted(speakers | {"unknown"})
    assert spk["per_group"]["unknown"]["skipped"] == 1 and spk["metrics"]["speakers"] == len(speakers) + 1
    assert spk["settings"]["group_by"] == "speaker" and "group_by" not in lang["settings"]
    total = lambda res, key: sum(e[key] for e in res["per_group"].values())  # noqa: E731
    assert total(spk, "word_edits") == total(lang, "word_edits") and total(spk, "utterances") == 8
    assert spk["metrics"]["wer_pooled"] == pytest.approx(lang["metrics"]["wer_pooled"])
    assert "speaker" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "asr", "--manifest", str(manifest), "--group-by", "voice"])
    capsys.readouterr()
    assert _eval(manifest, tmp_path / "b.json", "--group-by", "speaker", "--baseline", str(by_lang)) != 0
    assert "--baseline compares languages" in capsys.readouterr().err
