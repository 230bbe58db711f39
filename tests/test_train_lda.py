"""``mmadapters train lda``: the LDA recipe on the training engine, end to end on tiny generated speech."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import mmadapters as mma
from mmadapters.eval.cli import main
from mmadapters.eval.results_schema import read_results
from mmadapters.speech import synth
from mmadapters.speech.lda_train import RECIPE, LdaConfig, LdaTask
from mmadapters.speech.model import load_asr

LANGS = ["nl", "pt"]

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None and shutil.which("espeak") is None,
                                reason="espeak-ng is not installed (generated speech)")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny transducer runs fastest on one thread (and leaves the other cores alone)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Generated nl/pt speech (6 train, 3 dev utterances per language) plus a training manifest with one corrupt file."""
    root = tmp_path_factory.mktemp("lda_speech")
    synth.generate(root, LANGS, utterances=6, tail_utterances=6, eval_utterances=3, unlabeled=0, tail_languages=LANGS,
                   speakers=4, heldout_speakers=1, workers=1, progress=False)
    (root / "audio" / "bad.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"not audio at all" * 4)
    rows = (root / "train.jsonl").read_text(encoding="utf-8")
    bad = {"audio_filepath": "audio/bad.wav", "duration": 1.5, "text": "een twee", "lang": "nl"}
    (root / "train_with_bad.jsonl").write_text(rows + json.dumps(bad) + "\n", encoding="utf-8")
    return root


def _config(tmp_path, data, steps: int = 4) -> str:
    path = tmp_path / "lda.yaml"
    path.write_text(f"""
output: {tmp_path / 'run'}
trainer: {{steps: {steps}, batch_size: 4, lr: 1.0e-2, eval_every: 2, checkpoint_every: 2, progress: false}}
recipe:
  train_manifest: {data / 'train_with_bad.jsonl'}
  dev_manifest: {data / 'dev.jsonl'}
  languages: [nl, pt]
  adapter_dim: 8
""", encoding="utf-8")
    return str(path)


@pytest.mark.filterwarnings("ignore:skipping utterance")
def test_train_lda_end_to_end_best_adapters_reproduce_the_recorded_dev_wer(data, tmp_path, capsys):
    assert main(["train", "lda", "--config", _config(tmp_path, data)]) == 0
    run = tmp_path / "run"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    evals = [e for e in history if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:  # the average and each language's dev WER, so per-language selection works from the history
        m = e["metrics"]
        assert m["dev_wer"] == pytest.approx((m["dev_wer_nl"] + m["dev_wer_pt"]) / 2)
        assert m["dev_utterances"] == 6 and m["dev_skipped"] == 0
    assert evals[-1]["metrics"]["train_skipped"] == 1  # the corrupt training file, skipped and counted
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["select_metric"] == "dev_wer" and summary["select_mode"] == "min"
    best_metrics = summary["best_metrics"]
    assert best_metrics["dev_wer"] == min(e["metrics"]["dev_wer"] for e in evals)

    # best/ is the core format: load_adapters on a fresh foundation gives trained (non-zero) language adapters
    info = json.loads((run / "best" / "lda.json").read_text())
    assert info["languages"] == LANGS and info["adapters"]["dim"] == 8
    bundle = load_asr()
    assert sorted(mma.load_adapters(bundle.model, run / "best")) == LANGS
    for lang in LANGS:
        ups = [p for n, p in mma.adapter_parameters(bundle.model, lang).items() if "up" in n]
        assert ups and any(p.abs().sum() > 0 for p in ups)  # zero-initialized, moved by training

    # ... and `mmadapters eval asr --adapters best/` on the dev data reproduces the recorded dev WERs exactly
    out = tmp_path / "dev.json"
    assert main(["eval", "asr", "--manifest", str(data / "dev.jsonl"), "--adapters", str(run / "best"),
                 "--output", str(out), "--no-progress"]) == 0
    results = read_results(out)
    assert results["metrics"]["wer"] == best_metrics["dev_wer"]
    assert results["metrics"]["cer"] == pytest.approx(best_metrics["dev_cer"], abs=1e-12)
    for lang in LANGS:
        assert results["per_group"][lang]["wer"] == best_metrics[f"dev_wer_{lang}"]
    assert results["parameters"]["per_adapter"] == {lang: info["adapters"]["per_language_parameters"] for lang in LANGS}
    assert "best validation dev_wer" in capsys.readouterr().out


def test_config_errors_name_the_field(data, tmp_path, capsys):
    config = _config(tmp_path, data)
    assert main(["train", "lda", "--config", config, "--set", "recipe.adapter_width=4"]) == 2
    assert "recipe.adapter_width: unknown key" in capsys.readouterr().err
    assert main(["train", "lda", "--config", config, "--set", "recipe.fraction=2"]) == 2
    assert "fraction: 2.0; expected a fraction in (0, 1)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"recipe.languages: no training utterance in \['sv'\]"):
        LdaTask(LdaConfig(data_dir=str(data), languages=["nl", "sv"]))
    with pytest.raises(ValueError, match="dev_manifest: missing"):
        LdaConfig(train_manifest=str(data / "train.jsonl"))


def test_task_routes_each_sample_to_its_language_adapter(data):
    task = RECIPE.build_task(LdaConfig(data_dir=str(data), adapter_dim=4, noise_snr_db=20.0), _Trainer())
    assert task.languages == LANGS and task.train_size() == 12  # every language of the training data
    counts = task.parameter_counts()
    assert counts["trainable"] == 2 * counts["per_language"] and counts["total"] == counts["base"] + counts["trainable"]
    nl_only = [k for k, u in enumerate(task.train_utterances) if u.lang == "nl"][:2]
    batch = task.get_batch(nl_only)
    assert batch.languages == ["nl", "nl"] and batch.waves.shape[0] == 2
    task.model.train()
    task.loss(task.model, batch).backward()
    grads = {lang: [p.grad for p in mma.adapter_parameters(task.model, lang).values()] for lang in LANGS}
    assert any(g is not None and g.abs().sum() > 0 for g in grads["nl"])
    assert all(g is None for g in grads["pt"])  # a pt adapter never sees nl samples


class _Trainer:
    device = "cpu"
    seed = 0
    progress = False


@pytest.mark.filterwarnings("ignore:skipping utterance")
def test_resume_after_a_crash_reaches_the_same_adapters(data, tmp_path, monkeypatch):
    """SpecAugment, dropout and the additive noise all draw from the RNG states the engine checkpoints."""
    from safetensors.torch import load_file

    def run(output, *extra):
        return main(["train", "lda", "--config", _config(tmp_path, data, steps=3), "--output", str(output),
                     "--set", "trainer.eval_every=0", "--set", "trainer.checkpoint_every=1",
                     "--set", "recipe.noise_snr_db=20", *extra])

    assert run(tmp_path / "whole") == 0
    real = LdaTask.get_batch
    calls = {"n": 0}

    def dies_at_the_third_step(self, indices):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed after the checkpoint of step 2
        return real(self, indices)

    monkeypatch.setattr(LdaTask, "get_batch", dies_at_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed")
    monkeypatch.undo()
    assert (tmp_path / "crashed" / "train_state.pt").is_file() and not (tmp_path / "crashed" / "last").exists()
    assert run(tmp_path / "crashed", "--resume") == 0
    for lang in LANGS:
        a = load_file(tmp_path / "whole" / "last" / lang / "adapter_model.safetensors")
        b = load_file(tmp_path / "crashed" / "last" / lang / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
