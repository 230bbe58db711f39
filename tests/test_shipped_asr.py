"""The shipped tiny ASR model: loads without arguments and recognises generated speech of a head language."""

from __future__ import annotations

import shutil

import pytest

from mmadapters.eval.metrics import cer, normalize_text
from mmadapters.speech.audio import load_audio
from mmadapters.speech.decode import transcribe
from mmadapters.speech.model import TINY_ASR_DIR, load_asr, parameter_counts
from mmadapters.speech.readers import read_manifest


def test_shipped_model_loads_and_is_small():
    bundle = load_asr()
    assert parameter_counts(bundle.model)["total"] > 500_000
    assert sum(f.stat().st_size for f in TINY_ASR_DIR.iterdir()) < 15e6
    assert bundle.tokenizer.vocab_size == bundle.config.vocab_size


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (scripts/system_deps.sh)")
def test_shipped_model_transcribes_unseen_speakers(tmp_path):
    from mmadapters.speech.synth import generate

    # held-out speakers of the dev split, a seed the model never trained on
    manifest = generate(tmp_path, ["it"], utterances=1, eval_utterances=8, seed=123, workers=1, progress=False)
    utts = [u for u in read_manifest(manifest.parent / "dev.jsonl")]
    bundle = load_asr()
    hyps = transcribe(bundle, [load_audio(u.audio_path) for u in utts])
    refs = [normalize_text(u.text) for u in utts]
    score = cer(refs, [normalize_text(h) for h in hyps])
    assert score < 0.3, (score, list(zip(refs, hyps, strict=True)))  # measured 0.115; an untrained model scores ~1.0
