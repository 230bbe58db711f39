"""``mmadapters eval asr`` and ``mmadapters asr transcribe`` end to end on a tiny random transducer saved to a temp dir:
metrics from the decoder's transcripts, skipped audio by reason, adapters routed per language, baselines, streaming
latency, predictions. (Generated speech, the results schema and resuming: test_eval_asr_cli.py.)"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

import mmadapters as mma
from mmadapters.eval.asr_tasks import read_baseline, relative_reduction
from mmadapters.eval.asr_transcribe import add_asr_parser, transcribe_files
from mmadapters.eval.cli import main
from mmadapters.eval.metrics import cer, normalize_text, wer
from mmadapters.eval.results_schema import read_results
from mmadapters.speech.audio import load_audio
from mmadapters.speech.decode import transcribe
from mmadapters.speech.model import CascadedTransducer, declare_asr_points, load_asr, save_asr, tiny_asr_config
from mmadapters.speech.readers import read_manifest
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


def _with_adapter(bundle, name, points, seed=1):
    """Add a randomly initialized adapter (bottleneck adapters start at zero: randomize to make it matter)."""
    declare_asr_points(bundle.model)
    mma.add_adapter(bundle.model, name, mma.BottleneckConfig(bottleneck_dim=4, target_modules=[f"@{p}" for p in points]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mma.adapter_parameters(bundle.model, name).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _eval(model_dir, manifest, output, *extra) -> int:
    return main(["eval", "asr", "--manifest", str(manifest), "--model", str(model_dir), "--output", str(output),
                 "--no-progress", *extra])


def _predictions(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_metrics_are_those_of_the_decoders_transcripts_and_bad_audio_is_skipped(model_dir, data, tmp_path, capsys):
    out, preds_path = tmp_path / "r.json", tmp_path / "preds.jsonl"
    assert _eval(model_dir, data, out, "--batch-size", "3", "--predictions", str(preds_path)) == 0
    r = read_results(out)
    c, m, per, t = r["counts"], r["metrics"], r["per_group"], r["timings"]
    assert (c["total"], c["evaluated"], c["skipped"]) == (7, 4, 3)
    reasons = {s["id"]: s["reason"] for s in r["skipped"]}
    assert set(reasons) == {"missing", "silent", "stereo"} and all(x.startswith("AudioError: ") for x in reasons.values())
    assert "not found" in reasons["missing"] and "silent" in reasons["silent"] and "channels" in reasons["stereo"]
    assert sorted(per) == ["de", "en", "fr"] and [per[x]["skipped"] for x in ("de", "en", "fr")] == [1, 1, 1]
    # the transcripts are the decoder's on the loaded audio, in manifest order
    preds = _predictions(preds_path)
    utts = read_manifest(data)
    good = [u for u in utts if u.id not in reasons]
    assert [p["id"] for p in preds] == [u.id for u in good]
    assert [p["hyp"] for p in preds] == transcribe(load_asr(model_dir), [load_audio(u.audio_path) for u in good])
    # metrics: normalized, per language, averaged with equal weight; pooled over all utterances
    for lang, e in per.items():
        mine = [p for p in preds if p["lang"] == lang]
        refs, hyps = [normalize_text(p["ref"]) for p in mine], [normalize_text(p["hyp"]) for p in mine]
        assert e["wer"] == pytest.approx(wer(refs, hyps)) and e["cer"] == pytest.approx(cer(refs, hyps))
        assert e["words"] == sum(len(x.split()) for x in refs) and e["utterances"] == len(mine)
        assert e["audio_s"] == pytest.approx(sum(p["audio_s"] for p in mine), abs=1e-3)
    assert m["wer"] == pytest.approx(np.mean([e["wer"] for e in per.values()]))
    assert m["cer"] == pytest.approx(np.mean([e["cer"] for e in per.values()]))
    refs = [normalize_text(p["ref"]) for p in preds]
    assert m["wer_pooled"] == pytest.approx(wer(refs, [normalize_text(p["hyp"]) for p in preds]))
    assert t["audio_s"] == pytest.approx(sum(p["audio_s"] for p in preds), abs=1e-3)
    assert t["rtf"] == pytest.approx(t["decode_s"] / t["audio_s"], rel=1e-2) and t["model_load_s"] > 0
    assert r["settings"]["decode"] == "greedy" and r["adapters"] is None and r["baseline"] is None
    printed = capsys.readouterr().out
    assert "average" in printed and "RTF" in printed and "4 of 7 samples evaluated, 3 skipped" in printed


def test_fail_fast_and_nothing_readable(model_dir, data, tmp_path, capsys):
    assert _eval(model_dir, data, tmp_path / "r.json", "--fail-fast") == 2
    assert "missing.wav" in capsys.readouterr().err
    bad = data.parent / "only_bad.jsonl"  # the missing, silent and stereo files
    bad.write_text("".join(line + "\n" for line in data.read_text().splitlines()[4:]))
    assert _eval(model_dir, bad, tmp_path / "r2.json") == 2
    assert "none of the 3 utterances" in capsys.readouterr().err


def test_streaming_final_text_equals_offline_second_pass(model_dir, data, tmp_path):
    offline, streaming = tmp_path / "o.jsonl", tmp_path / "s.jsonl"
    assert _eval(model_dir, data, tmp_path / "o.json", "--predictions", str(offline)) == 0
    assert _eval(model_dir, data, tmp_path / "s.json", "--streaming", "--chunk-ms", "100", "--predictions", str(streaming)) == 0
    assert [p["hyp"] for p in _predictions(streaming)] == [p["hyp"] for p in _predictions(offline)]
    r = read_results(tmp_path / "s.json")
    t = r["timings"]
    latencies = [p["latency_s"] for p in _predictions(streaming) if p["latency_s"] is not None]
    assert t["first_partial_missing"] == 4 - len(latencies)
    if latencies:  # the first partial can only come after the first chunk's audio (0.1 s) has arrived
        assert t["first_partial_latency_mean_s"] >= 0.1 and t["first_partial_latency_max_s"] == pytest.approx(max(latencies), abs=1e-4)
    assert 0 < t["rtf_first_pass"] <= t["rtf"]
    assert all("wer_first_pass" in e for e in r["per_group"].values()) and "wer_first_pass" in r["metrics"]
    assert r["settings"]["streaming"] and r["settings"]["chunk_ms"] == 100


def test_adapters_are_routed_per_language(model_dir, data, tmp_path, capsys):
    base_preds, routed_preds, stream_preds = (tmp_path / f"{n}.jsonl" for n in ("base", "routed", "stream"))
    assert _eval(model_dir, data, tmp_path / "base.json", "--predictions", str(base_preds)) == 0
    trained = load_asr(model_dir)
    # first pass, predictor and second pass (time-major layers): all routed per sample, saved and loaded
    _with_adapter(trained, "de", ["first_block_out", "predictor_out", "second_block_out"])
    mma.save_adapters(trained.model, tmp_path / "adapters")
    assert _eval(model_dir, data, tmp_path / "routed.json", "--adapters", str(tmp_path / "adapters"),
                 "--predictions", str(routed_preds)) == 0
    preds, base = _predictions(routed_preds), _predictions(base_preds)
    assert [p["adapter"] for p in preds] == [None, None, "de", None]
    # languages without an adapter run the base
    assert [p["hyp"] for p in preds if p["lang"] != "de"] == [p["hyp"] for p in base if p["lang"] != "de"]
    de = next(u for u in read_manifest(data) if u.lang == "de")
    assert [p["hyp"] for p in preds if p["lang"] == "de"] == transcribe(trained, [load_audio(de.audio_path)], adapters=["de"])
    r = read_results(tmp_path / "routed.json")
    a = r["adapters"]
    assert a["languages"] == {"de": "de"} and a["parameters"]["de"] > 0 and r["settings"]["languages_adapted"] == {"de": "de"}
    assert a["fraction_of_base"]["de"] == pytest.approx(a["parameters"]["de"] / a["base_parameters"])
    assert r["parameters"]["per_adapter"] == {"de": a["parameters"]["de"]}
    # streaming routes the same way
    assert _eval(model_dir, data, tmp_path / "stream.json", "--adapters", str(tmp_path / "adapters"), "--streaming",
                 "--predictions", str(stream_preds)) == 0
    assert [p["hyp"] for p in _predictions(stream_preds)] == [p["hyp"] for p in preds]
    assert _eval(model_dir, data, tmp_path / "x.json", "--adapters", str(tmp_path / "nope")) == 2
    assert "adapter directory not found" in capsys.readouterr().err


def test_relative_wer_reduction_against_a_baseline(model_dir, data, tmp_path):
    first = tmp_path / "first.json"
    assert _eval(model_dir, data, first) == 0
    base = json.loads(first.read_text())
    per = {lang: e["wer"] for lang, e in base["per_group"].items()}
    base["per_group"]["en"]["wer"] = per["en"] * 2
    base["per_group"]["de"]["wer"] = per["de"] / 0.8
    del base["per_group"]["fr"]
    path = tmp_path / "base.json"
    path.write_text(json.dumps(base))
    assert _eval(model_dir, data, tmp_path / "r.json", "--baseline", str(path)) == 0
    r = read_results(tmp_path / "r.json")
    m, pg = r["metrics"], r["per_group"]
    assert pg["en"]["relative_wer_reduction"] == pytest.approx(0.5) and pg["de"]["relative_wer_reduction"] == pytest.approx(0.2)
    assert m["relative_wer_reduction"] == pytest.approx(0.35)  # the mean of the per-language reductions
    base_avg = (per["en"] * 2 + per["de"] / 0.8) / 2
    assert m["relative_wer_reduction_of_average"] == pytest.approx((base_avg - (per["en"] + per["de"]) / 2) / base_avg)
    assert "relative_wer_reduction" not in pg["fr"]
    assert r["baseline"]["missing_languages"] == ["fr"] and r["baseline"]["source"] == str(path)


def test_read_baseline_errors_and_relative_reduction(tmp_path, model_dir, data):
    bad = tmp_path / "b.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"b\.json: line 1: not valid JSON"):
        read_baseline(bad)
    assert _eval(model_dir, data, tmp_path / "ok.json") == 0
    other = json.loads((tmp_path / "ok.json").read_text())
    other["per_group"] = None
    bad.write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"b\.json: field 'per_group' missing or empty"):
        read_baseline(bad)
    with pytest.raises(FileNotFoundError, match="baseline results file not found"):
        read_baseline(tmp_path / "none.json")
    assert relative_reduction(0.4, 0.3) == pytest.approx(0.25)
    assert relative_reduction(0.4, 0.5) == pytest.approx(-0.25)
    assert math.isnan(relative_reduction(0.0, 0.1)) and math.isnan(relative_reduction(math.nan, 0.1))


# -- asr transcribe ----------------------------------------------------------------------------------------

def _cli(argv):
    parser = argparse.ArgumentParser(prog="mmadapters")
    add_asr_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


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


def test_first_partial_latency_is_audio_time_of_the_chunk_plus_its_compute(model_dir, data, tmp_path, monkeypatch):
    import mmadapters.speech.decode as decode

    monkeypatch.setattr(decode, "StreamingTranscriber", _ScriptedStream)
    preds_path = tmp_path / "p.jsonl"
    head = data.parent / "good.jsonl"  # the 4 readable utterances: 0.2, 0.25, 0.3 and 0.35 s of audio (en, en, de, fr)
    head.write_text("".join(line + "\n" for line in data.read_text().splitlines()[:4]))
    assert _eval(model_dir, head, tmp_path / "r.json", "--streaming", "--chunk-ms", "100", "--predictions", str(preds_path)) == 0
    preds = _predictions(preds_path)
    assert [p["hyp"] for p in preds] == ["end", "hi end", "hi end", "hi end"]
    assert [p["first_pass"] for p in preds] == ["", "hi", "hi", "hi"]
    t = read_results(tmp_path / "r.json")["timings"]
    assert t["first_partial_missing"] == 1  # the 0.2 s utterance never reaches 0.25 s
    # the partial comes with the chunk ending at 0.25 s (a last, short chunk), 0.3 s and 0.3 s, plus compute time
    assert 0.3 <= t["first_partial_latency_median_s"] <= t["first_partial_latency_max_s"] < 0.3 + 0.05
    assert t["first_partial_latency_mean_s"] == pytest.approx((0.25 + 0.3 + 0.3) / 3, abs=0.03)
    fr = read_results(tmp_path / "r.json")["per_group"]["fr"]
    assert fr["wer_first_pass"] == wer([normalize_text("Bonjour le monde")], ["hi"])
