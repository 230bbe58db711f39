"""``mmadapters train lda``: the LDA recipe on the training engine, end to end on tiny generated speech: routed
adapters, the per-language checkpoint merge, the noisy student, the full fine-tuning baseline, resuming."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import mmadapters as mma
from mmadapters.eval.cli import main
from mmadapters.eval.results_schema import read_results
from mmadapters.speech import synth
from mmadapters.speech.lda_train import RECIPE, LdaConfig, LdaTask, PseudoLabelConfig
from mmadapters.speech.model import load_asr
from mmadapters.speech.train import evaluate
from mmadapters.training.trainer import TrainerConfig, train

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
    """Generated nl/pt speech (6 train, 3 dev, 2 unlabeled utterances per language) plus a training manifest with one
    corrupt file."""
    root = tmp_path_factory.mktemp("lda_speech")
    synth.generate(root, LANGS, utterances=6, tail_utterances=6, eval_utterances=3, unlabeled=2, tail_languages=LANGS,
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
    assert batch.adapters == ["nl", "nl"] and batch.waves.shape[0] == 2
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
                     "--set", "trainer.eval_every=1", "--set", "trainer.checkpoint_every=1",
                     "--set", "recipe.noise_snr_db=20", "--set", "recipe.merge=per_language", *extra])

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
    for folder in ("last", "merged"):  # the merge is rebuilt from the resumed run's history
        for lang in LANGS:
            a = load_file(tmp_path / "whole" / folder / lang / "adapter_model.safetensors")
            b = load_file(tmp_path / "crashed" / folder / lang / "adapter_model.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "merge.json").read_text() == (tmp_path / "crashed" / "merge.json").read_text()


def _engine(task, output, steps: int = 3, **kw):
    config = TrainerConfig(**{"steps": steps, "batch_size": 4, "lr": 1e-2, "eval_every": 1, "checkpoint_every": 0,
                              "progress": False, **kw})
    return train(task, config, output)


def test_merge_keeps_each_language_from_its_best_validation_and_the_base_stays_frozen(data, tmp_path):
    from safetensors.torch import load_file

    task = RECIPE.build_task(LdaConfig(data_dir=str(data), adapter_dim=4, merge="per_language"), _Trainer())
    base = {k: v.clone() for k, v in task.model.state_dict().items() if ".adapters." not in k}
    _engine(task, tmp_path, steps=4)
    assert all(torch.equal(v, task.model.state_dict()[k]) for k, v in base.items())  # weights and batch-norm statistics
    evals = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step-00000{s}" for s in (1, 2, 3, 4)]
    merge = json.loads((tmp_path / "merge.json").read_text())
    for lang in LANGS:
        wers = [e["metrics"][f"dev_wer_{lang}"] for e in evals]
        step = evals[wers.index(min(wers))]["step"]  # the earliest of the lowest
        assert merge[lang] == {"step": step, "dev_wer": min(wers)}
        chosen = load_file(tmp_path / "checkpoints" / f"step-{step:06d}" / lang / "adapter_model.safetensors")
        merged = load_file(tmp_path / "merged" / lang / "adapter_model.safetensors")
        assert chosen.keys() == merged.keys() and all(torch.equal(chosen[k], merged[k]) for k in chosen)
    bundle = load_asr()
    assert sorted(mma.load_adapters(bundle.model, tmp_path / "merged")) == LANGS  # deployable as is


def test_full_fine_tuning_baseline_trains_the_whole_model_of_one_language(data, tmp_path):
    task = RECIPE.build_task(LdaConfig(data_dir=str(data), method="full", languages=["nl"]), _Trainer())
    assert task.languages == ["nl"] and task.train_size() == 6 and not mma.adapter_names(task.model)
    counts = task.parameter_counts()
    assert counts["trainable"] == counts["total"] == sum(p.numel() for p in task.model.parameters())
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    summary = _engine(task, tmp_path, steps=2, eval_every=0, lr=1e-3)
    assert any(not torch.equal(v, task.model.state_dict()[k]) for k, v in before.items())
    best = load_asr(tmp_path / "best")  # a whole model: mmadapters eval asr --model best/
    assert json.loads((tmp_path / "best" / "lda.json").read_text())["method"] == "full"
    dev = evaluate(best.model, best.tokenizer, task.dev, progress=False)
    assert dev.per_language["nl"]["wer"] == summary.best_metrics["dev_wer_nl"]
    with pytest.raises(ValueError, match="method: full trains the whole model without adapters"):
        LdaConfig(data_dir=str(data), method="full", merge="per_language")


def test_noisy_student_trains_on_confident_teacher_labels_from_the_init_adapters(data, tmp_path):
    teacher = RECIPE.build_task(LdaConfig(data_dir=str(data), adapter_dim=4), _Trainer())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters that change the output, so that loading them shows
        for lang in LANGS:
            for p in mma.adapter_parameters(teacher.model, lang).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    mma.save_adapters(teacher.model, tmp_path / "init")
    config = LdaConfig(data_dir=str(data), adapter_dim=4, init_adapters=str(tmp_path / "init"), noise_snr_db=20.0,
                       pseudo_label=PseudoLabelConfig(min_confidence=0.0))
    student = RECIPE.build_task(config, _Trainer())
    stats = student.pseudo_stats
    assert stats["total"] == 4 and stats["kept"] + sum(stats["dropped"].values()) == 4 and stats["kept"] >= 1
    assert stats["teacher_adapters"] == str(tmp_path / "init") and 0 <= stats["wer_kept"]
    assert student.train_size() == 12 + stats["kept"]  # transcribed + pseudo-labelled
    for lang in LANGS:  # the student starts from the init adapters, which train
        mine, theirs = mma.adapter_parameters(student.model, lang), mma.adapter_parameters(teacher.model, lang)
        assert all(torch.equal(mine[k], theirs[k]) and mine[k].requires_grad for k in mine)
    student.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "lda.json").read_text())["pseudo_labels"]["kept"] == stats["kept"]
    with pytest.raises(ValueError, match=r"recipe.init_adapters: .*/nl is 4 wide, the recipe's adapters 8"):
        RECIPE.build_task(LdaConfig(data_dir=str(data), adapter_dim=8, init_adapters=str(tmp_path / "init")), _Trainer())
