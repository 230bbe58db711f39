"""bench/asr.py smoke test: a --quick run on a random tiny model writes the results JSON and markdown with every
section, and --manifest audio is read through the speech readers. Offline, a few seconds."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "asr.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_asr", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # the run sets --threads for the whole process
    sys.modules.pop(spec.name, None)


def test_quick_run_writes_every_section(bench, tmp_path):
    out = tmp_path / "asr"
    result = bench.main(["--quick", "--tiny", "--threads", "1", "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["command"].startswith(".venv/bin/python bench/asr.py --quick")
    assert "tiny_asr_config" in saved["model"] and saved["threads"] == 1
    s = saved["streaming"]
    assert set(s["rtf"]) == {"base", "adapters", "adapters_general_path", "base_with_second_pass"}
    assert all(v > 0 and math.isfinite(v) for v in s["rtf"].values())
    assert s["rtf"]["base_with_second_pass"] > 0 and s["audio_seconds"] == pytest.approx(0.5)
    assert set(s["first_partial"]) == {"base", "adapters"}
    assert set(s["ratios"]) == {"adapters / base (streaming RTF)", "adapters, general composition path / base"}
    assert isinstance(s["same_transcripts"], bool)
    assert [row["section"] for row in saved["mixed"]] == ["mixed batch (offline)", "mixed batch (streaming)"]
    for row in saved["mixed"]:
        assert row["B"] == 4 and row["K"] == 2
        assert set(row["seconds"]) == {"one_language", "routed_mixed", "routed_one_language", "grouped_by_language"}
        assert set(row["ratios"]) == {"routed mixed / one language", "routed mixed / grouped by language",
                                      "routed one language / one language"}
        assert all(v > 0 for v in row["ratios"].values())
        assert row["routed_equals_grouped"] is True and isinstance(row["same_transcripts"], bool)
    assert saved["adapters"]["languages"] == ["de", "es"] and 0 < saved["adapters"]["per_language_percent"] < 5
    md = out.with_suffix(".md").read_text()
    assert md == bench.markdown(result)
    for text in ("RTF, first pass (no adapters)", "adapters / base (streaming RTF)", "routed mixed / one language",
                 "| mixed batch (streaming) |", "≤ 1.10", "Same transcripts"):
        assert text in md


def test_manifest_audio(bench, tmp_path):
    sf = pytest.importorskip("soundfile")
    lines = []
    for i, seconds in enumerate([0.6, 0.2, 1.5]):
        wave = bench.speechlike(seconds, i).numpy()
        sf.write(tmp_path / f"u{i}.wav", wave, 16000)
        lines.append(json.dumps({"audio_filepath": f"u{i}.wav", "duration": seconds, "text": "a b", "lang": "en"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    args = argparse.Namespace(manifest=str(tmp_path / "m.jsonl"), seconds=1.0, utterances=4)
    waves, text = bench.load_waves(args)
    # the 0.2 s utterance is shorter than half of --seconds; the 1.5 s one is cut to 1 s
    assert [w.shape[0] for w in waves] == [9600, 16000] and "2 utterances from" in text


def test_model_folder(bench, tmp_path):
    """--model DIR benches a saved model (e.g. the foundation before it ships); a NeMo or Parakeet bundle, or
    --model with --tiny, is refused with a message."""
    from mmadapters.speech.model import CascadedTransducer, save_asr, tiny_asr_config
    from mmadapters.speech.tokenizer import CharTokenizer

    tokenizer = CharTokenizer(list("abcdefgh"))
    torch.manual_seed(0)
    save_asr(tmp_path / "m", CascadedTransducer(tiny_asr_config(tokenizer.vocab_size)), tokenizer)
    result = bench.main(["--quick", "--threads", "1", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "asr")])
    assert result["model"].startswith(str(tmp_path / "m")) and result["adapters"]["per_language_percent"] > 0
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--tiny", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "asr2")])
