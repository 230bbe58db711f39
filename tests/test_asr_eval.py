"""The ASR evaluator and its commands, end to end on a tiny random transducer saved to a temp dir."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

import mmadapters as mma
from mmadapters.eval.asr_eval import add_asr_parser, evaluate_asr, read_baseline, relative_reduction, transcribe_files
from mmadapters.eval.metrics import cer, normalize_text, wer
from mmadapters.speech.audio import AudioError, load_audio
from mmadapters.speech.decode import transcribe
from mmadapters.speech.model import CascadedTransducer, declare_asr_points, load_asr, save_asr, tiny_asr_config
from mmadapters.speech.readers import read_manifest, write_manifest
from mmadapters.speech.tokenizer import CharTokenizer

TEXTS = {"en": ["Hello, world!", "hello"], "de": ["Hallo Welt."], "fr": ["Bonjour le monde"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model whose joiner leans a little towards blank (short, varied hypotheses, fast decoding)."""
    d = tmp_path_factory.mktemp("asr") / "model"
    tok = CharTokenizer.from_texts([t.lower() for ts in TEXTS.values() for t in ts])
    torch.manual_seed(0)
    model = CascadedTransducer(tiny_asr_config(tok.vocab_size))
    with torch.no_grad():
        model.joiner.out.bias[0] += 0.5
    save_asr(d, model, tok)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A manifest with 4 good utterances over 3 languages and 3 bad files (missing, silent, stereo)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    i = 0
    for lang, texts in TEXTS.items():
        for text in texts:
            path = root / lang / f"{i}.wav"
            path.parent.mkdir(exist_ok=True)
            sf.write(path, (0.1 * rng.standard_normal(3200 + 800 * i)).astype(np.float32), 16000)
            rows.append({"audio_filepath": f"{lang}/{i}.wav", "text": text, "lang": lang, "duration": (3200 + 800 * i) / 16000})
            i += 1
    sf.write(root / "silent.wav", np.zeros(3200, np.float32), 16000)
    sf.write(root / "stereo.wav", 0.1 * rng.standard_normal((3200, 2)).astype(np.float32), 16000)
    rows += [{"audio_filepath": "missing.wav", "text": "gone", "lang": "en"},
             {"audio_filepath": "silent.wav", "text": "nothing", "lang": "de"},
             {"audio_filepath": "stereo.wav", "text": "two", "lang": "fr"}]
    manifest = root / "test.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest


def _with_adapter(bundle, name, points, seed=1):
    """Add a randomly initialized adapter (bottleneck adapters start at zero: randomize to make it matter)."""
    declare_asr_points(bundle.model)
    mma.add_adapter(bundle.model, name, mma.BottleneckConfig(bottleneck_dim=4, target_modules=[f"@{p}" for p in points]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mma.adapter_parameters(bundle.model, name).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_evaluate_asr_end_to_end(model_dir, data):
    bundle = load_asr(model_dir)
    utts = read_manifest(data)
    r = evaluate_asr(bundle, utts, progress=False, return_predictions=True, batch_size=3)
    c, m, t = r["counts"], r["metrics"], r["timings"]
    assert (c["utterances"], c["evaluated"], c["skipped"]) == (7, 4, 3)
    assert c["skipped_by_reason"] == {"channels": 1, "missing": 1, "silent": 1}
    assert {s["path"].rsplit("/", 1)[1] for s in c["skipped_files"]} == {"missing.wav", "silent.wav", "stereo.wav"}
    assert sorted(m["per_language"]) == ["de", "en", "fr"]
    assert [m["per_language"][x]["skipped"] for x in ("de", "en", "fr")] == [1, 1, 1]
    # the transcripts are the decoder's on the loaded audio, in manifest order
    good = [u for u in utts if "wav" in u.audio_path and u.id[-1].isdigit()]
    expected = transcribe(bundle, [load_audio(u.audio_path) for u in good])
    assert [p["hypothesis"] for p in r["predictions"]] == expected
    # metrics: normalized, per language, averaged with equal weight; pooled over all utterances
    for lang, e in m["per_language"].items():
        preds = [p for p in r["predictions"] if p["lang"] == lang]
        refs, hyps = [normalize_text(p["reference"]) for p in preds], [normalize_text(p["hypothesis"]) for p in preds]
        assert e["wer"] == wer(refs, hyps) and e["cer"] == cer(refs, hyps)
        assert e["words"] == sum(len(x.split()) for x in refs) and e["adapter"] is None
        assert e["audio_s"] == pytest.approx(sum(p["audio_s"] for p in preds), abs=1e-3)
    assert m["wer"] == pytest.approx(np.mean([e["wer"] for e in m["per_language"].values()]))
    assert m["cer"] == pytest.approx(np.mean([e["cer"] for e in m["per_language"].values()]))
    refs = [normalize_text(p["reference"]) for p in r["predictions"]]
    assert m["wer_pooled"] == wer(refs, [normalize_text(p["hypothesis"]) for p in r["predictions"]])
    assert t["audio_s"] == pytest.approx(sum(p["audio_s"] for p in r["predictions"]), abs=1e-3)
    assert t["rtf"] == pytest.approx(t["decode_s"] / t["audio_s"], rel=1e-2)
    assert r["mmadapters_version"] == mma.__version__ and r["task"] == "asr"
    assert r["settings"]["decode"] == "greedy" and r["adapters"] is None and r["baseline"] is None
    json.dumps(r)  # serializable as is


def test_fail_fast_and_nothing_readable(model_dir, data, tmp_path):
    bundle = load_asr(model_dir)
    utts = read_manifest(data)
    with pytest.raises(AudioError, match="missing.wav"):
        evaluate_asr(bundle, utts[4:], progress=False, fail_fast=True)
    with pytest.raises(ValueError, match="none of the 3 utterances could be evaluated"):
        evaluate_asr(bundle, utts[4:], progress=False)
    with pytest.raises(ValueError, match="decode='viterbi'"):
        evaluate_asr(bundle, utts, decode="viterbi")


def test_streaming_final_text_equals_offline_second_pass(model_dir, data):
    bundle = load_asr(model_dir)
    utts = read_manifest(data)[:4]
    offline = evaluate_asr(bundle, utts, progress=False, return_predictions=True)
    r = evaluate_asr(bundle, utts, progress=False, streaming=True, chunk_ms=100, return_predictions=True)
    assert [p["hypothesis"] for p in r["predictions"]] == [p["hypothesis"] for p in offline["predictions"]]
    t = r["timings"]
    lat = t["first_partial_latency_s"]
    assert lat["count"] + lat["no_partial"] == 4
    if lat["count"]:
        # the first partial can only come after the first chunk's audio (0.1 s) has arrived
        assert lat["mean"] >= 0.1 and lat["max"] <= max(p["audio_s"] for p in r["predictions"]) + t["decode_s"]
    assert 0 < t["rtf_first_pass"] <= t["rtf"]
    assert all("wer_first_pass" in e for e in r["metrics"]["per_language"].values())
    assert r["settings"]["streaming"] and r["settings"]["chunk_ms"] == 100


def test_adapters_are_routed_per_language(model_dir, data, tmp_path):
    utts = read_manifest(data)[:4]
    base = evaluate_asr(load_asr(model_dir), utts, progress=False, return_predictions=True)
    bundle = load_asr(model_dir)
    # first pass, predictor and second pass (time-major layers): all routed per sample
    _with_adapter(bundle, "de", ["first_block_out", "predictor_out", "second_block_out"])
    r = evaluate_asr(bundle, utts, adapters=["de"], progress=False, return_predictions=True, batch_size=4)
    preds = r["predictions"]
    assert [p["adapter"] for p in preds] == [None, None, "de", None]
    assert r["metrics"]["per_language"]["de"]["adapter"] == "de" and r["metrics"]["per_language"]["fr"]["adapter"] is None
    # languages without an adapter run the base (even though "de", the first adapter added, is active)
    assert [p["hypothesis"] for p in preds if p["lang"] != "de"] == [p["hypothesis"] for p in base["predictions"]
                                                                      if p["lang"] != "de"]
    de = [u for u in utts if u.lang == "de"]
    assert [p["hypothesis"] for p in preds if p["lang"] == "de"] == transcribe(bundle, [load_audio(de[0].audio_path)],
                                                                               adapters=["de"])
    a = r["adapters"]
    assert a["languages"] == {"de": "de"} and a["parameters"]["de"] > 0
    assert a["fraction_of_base"]["de"] == pytest.approx(a["parameters"]["de"] / a["base_parameters"])
    # streaming routes the same way
    s = evaluate_asr(bundle, utts, adapters={"de": "de"}, streaming=True, progress=False, return_predictions=True)
    assert [p["hypothesis"] for p in s["predictions"]] == [p["hypothesis"] for p in preds]
    with pytest.raises(KeyError, match="no adapter named 'xx'"):
        evaluate_asr(bundle, utts, adapters={"fr": "xx"}, progress=False)


def test_adapters_from_a_checkpoint_directory(model_dir, data, tmp_path):
    utts = read_manifest(data)[:4]
    trained = load_asr(model_dir)
    # Batch-first, non-nested points only: mmadapters.io (not this evaluator) does not yet keep a time-major
    # point's batch_dim through save/load, and fingerprints a block with the adapters of its sub-modules.
    _with_adapter(trained, "de", ["first_block_out", "predictor_out"], seed=1)
    _with_adapter(trained, "fr", ["predictor_out"], seed=2)
    mma.save_adapters(trained.model, tmp_path / "adapters")
    expected = evaluate_asr(trained, utts, adapters=["de", "fr"], progress=False, return_predictions=True)
    r = evaluate_asr(load_asr(model_dir), utts, adapters=tmp_path / "adapters", progress=False, return_predictions=True)
    assert [p["hypothesis"] for p in r["predictions"]] == [p["hypothesis"] for p in expected["predictions"]]
    assert [p["adapter"] for p in r["predictions"]] == [None, None, "de", "fr"]
    assert r["adapters"]["source"] == str(tmp_path / "adapters")
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        evaluate_asr(load_asr(model_dir), utts, adapters=tmp_path / "nope", progress=False)


def test_relative_wer_reduction_against_a_baseline(model_dir, data, tmp_path):
    bundle = load_asr(model_dir)
    utts = read_manifest(data)[:4]
    first = evaluate_asr(bundle, utts, progress=False)
    per = first["metrics"]["per_language"]
    base = {"metrics": {"per_language": {"en": {"wer": per["en"]["wer"] * 2}, "de": {"wer": per["de"]["wer"] / 0.8},
                                         "es": {"wer": 0.5}}}}
    path = tmp_path / "base.json"
    path.write_text(json.dumps(base))
    r = evaluate_asr(bundle, utts, progress=False, baseline=path)
    rel = r["metrics"]["relative_wer_reduction"]
    assert rel["languages"] == ["de", "en"]
    assert rel["per_language"]["en"] == pytest.approx(0.5) and rel["per_language"]["de"] == pytest.approx(0.2)
    assert rel["average"] == pytest.approx(0.35)
    base_avg = (per["en"]["wer"] * 2 + per["de"]["wer"] / 0.8) / 2
    assert rel["of_average_wer"] == pytest.approx((base_avg - (per["en"]["wer"] + per["de"]["wer"]) / 2) / base_avg)
    assert r["metrics"]["per_language"]["en"]["relative_wer_reduction"] == pytest.approx(0.5)
    assert "relative_wer_reduction" not in r["metrics"]["per_language"]["fr"]
    assert r["baseline"]["missing_languages"] == ["fr"] and r["baseline"]["source"] == str(path)


def test_read_baseline_errors_and_relative_reduction(tmp_path):
    bad = tmp_path / "b.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"b\.json: not valid JSON"):
        read_baseline(bad)
    bad.write_text(json.dumps({"metrics": {"acc1": 0.5}}))
    with pytest.raises(ValueError, match=r"b\.json: field 'metrics.per_language' missing"):
        read_baseline(bad)
    bad.write_text(json.dumps({"metrics": {"per_language": {"en": {"wer": "low"}}}}))
    with pytest.raises(ValueError, match=r"field 'metrics.per_language.en.wer' is 'low'; expected a number"):
        read_baseline(bad)
    with pytest.raises(FileNotFoundError, match="baseline results file not found"):
        read_baseline(tmp_path / "none.json")
    assert relative_reduction(0.4, 0.3) == pytest.approx(0.25)
    assert relative_reduction(0.4, 0.5) == pytest.approx(-0.25)
    assert math.isnan(relative_reduction(0.0, 0.1)) and math.isnan(relative_reduction(math.nan, 0.1))


# -- command line ----------------------------------------------------------------------------------------

def _cli(argv):
    parser = argparse.ArgumentParser(prog="mmadapters")
    add_asr_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_asr_eval_writes_results_and_guards_overwrite(model_dir, data, tmp_path, capsys):
    out = tmp_path / "res" / "asr.json"
    preds = tmp_path / "preds.jsonl"
    argv = ["asr", "eval", "--manifest", str(data), "--output", str(out), "--model", str(model_dir), "--no-progress",
            "--predictions", str(preds)]
    assert _cli(argv) == 0
    printed = capsys.readouterr().out
    assert "average" in printed and "skipped: channels 1, missing 1, silent 1" in printed and "RTF" in printed
    res = json.loads(out.read_text())
    assert res["dataset"] == "test" and res["model"] == str(model_dir) and res["run_key"]
    assert res["timings"]["model_load_s"] > 0 and res["settings"]["manifest"] == str(data)
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == 4 and {"id", "lang", "reference", "hypothesis"} <= set(lines[0])
    assert "predictions" not in res
    # same run: refreshed; a different run into the same file: refused, unless --overwrite
    assert _cli(argv) == 0
    assert _cli([*argv, "--decode", "beam"]) == 2
    assert "holds the results of a different run" in capsys.readouterr().err
    assert _cli([*argv, "--decode", "beam", "--overwrite", "--baseline", str(out)]) == 0
    res2 = json.loads(out.read_text())
    assert res2["settings"]["decode"] == "beam" and res2["settings"]["beam"] == 4
    assert "relative_wer_reduction" in res2["metrics"]
    # bad inputs: a clear error and exit status 2
    assert _cli(["asr", "eval", "--manifest", str(tmp_path / "none.jsonl"), "--output", str(out)]) == 2
    assert "speech dataset not found" in capsys.readouterr().err


def test_cli_transcribe(model_dir, data, tmp_path, capsys):
    utts = read_manifest(data)
    good = [utts[0].audio_path, utts[2].audio_path]
    assert _cli(["asr", "transcribe", *good, "--model", str(model_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    bundle = load_asr(model_dir)
    expected = transcribe(bundle, [load_audio(p) for p in good])
    assert lines == [f"{p}\t{t}" for p, t in zip(good, expected, strict=True)]
    assert _cli(["asr", "transcribe", good[0], utts[4].audio_path, "--model", str(model_dir)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(good[0]) and "missing.wav: audio file not found" in captured.err
    assert _cli(["asr", "transcribe", good[0], "--model", str(model_dir), "--adapters", str(tmp_path)]) == 2
    assert "--adapters needs --lang" in capsys.readouterr().err


def test_transcribe_files_with_a_language_adapter(model_dir, data, tmp_path):
    trained = load_asr(model_dir)
    _with_adapter(trained, "de", ["first_block_out", "predictor_out"])
    mma.save_adapters(trained.model, tmp_path / "ad")
    path = read_manifest(data)[2].audio_path
    rows = transcribe_files([path], model=str(model_dir), adapters=str(tmp_path / "ad"), lang="de")
    assert rows == [(path, transcribe(trained, [load_audio(path)], adapters=["de"])[0], None)]
    rows = transcribe_files([path], model=str(model_dir), adapters=str(tmp_path / "ad"), lang="fr")  # no adapter: base
    assert rows == [(path, transcribe(load_asr(model_dir), [load_audio(path)])[0], None)]


def test_manifest_round_trip_feeds_the_evaluator(model_dir, data, tmp_path):
    utts = read_manifest(data)[:2]
    copy = write_manifest(data.parent / "copy.jsonl", utts)
    r = evaluate_asr(load_asr(model_dir), read_manifest(copy), progress=False)
    assert r["counts"]["evaluated"] == 2 and list(r["metrics"]["per_language"]) == ["en"]


class _ScriptedStream:
    """Stands in for StreamingTranscriber: a partial appears once 0.25 s of audio has been pushed (never for
    utterances shorter than that); the final text is the partial plus " end"."""

    def __init__(self, bundle, batch_size=1, **kwargs):
        self.pushed, self.first_pass_texts = 0, []

    def push(self, chunk):
        self.pushed += chunk.shape[-1]
        return ["hi" if self.pushed >= 4000 else ""]

    def finish(self):
        text = "hi" if self.pushed >= 4000 else ""
        self.first_pass_texts, self.pushed = [text], 0
        return [f"{text} end".strip()]


def test_first_partial_latency_is_audio_time_of_the_chunk_plus_its_compute(model_dir, data, monkeypatch):
    import mmadapters.speech.decode as decode

    monkeypatch.setattr(decode, "StreamingTranscriber", _ScriptedStream)
    utts = read_manifest(data)[:4]  # 0.2, 0.25, 0.3 and 0.35 s of audio (en, en, de, fr)
    r = evaluate_asr(load_asr(model_dir), utts, streaming=True, chunk_ms=100, progress=False, return_predictions=True)
    assert [p["hypothesis"] for p in r["predictions"]] == ["end", "hi end", "hi end", "hi end"]
    assert [p["first_pass"] for p in r["predictions"]] == ["", "hi", "hi", "hi"]
    lat = r["timings"]["first_partial_latency_s"]
    assert lat["no_partial"] == 1 and lat["count"] == 3  # the 0.2 s utterance never reaches 0.25 s
    # the partial comes with the chunk ending at 0.25 s (a last, short chunk), 0.3 s and 0.3 s, plus compute time
    assert 0.3 <= lat["median"] <= lat["max"] < 0.3 + 0.05
    assert lat["mean"] == pytest.approx((0.25 + 0.3 + 0.3) / 3, abs=0.03)
    assert r["metrics"]["per_language"]["en"]["first_partial_latency_s"]["count"] == 1
    by_lang = r["metrics"]["per_language"]
    assert by_lang["fr"]["wer_first_pass"] == wer([normalize_text("Bonjour le monde")], ["hi"])
