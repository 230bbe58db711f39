"""The LDA method's pieces: language adapters sized to a budget, routed per sample, checkpoint merge, pseudo-labels.

(The recipe on the training engine: test_train_lda.py; the scripts that sweep it: the last test here.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_speech_train import make_corpus, make_model, one_thread  # noqa: F401  (one_thread: autouse fixture)

import mmadapters as mma
from mmadapters.speech import lda
from mmadapters.speech.audio import load_audio
from mmadapters.speech.model import AsrBundle
from mmadapters.speech.readers import Utterance
from mmadapters.speech.tokenizer import CharTokenizer
from mmadapters.speech.train import pad_waves

LANGS = ["xx", "yy", "zz"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Utterance]:
    return make_corpus(tmp_path_factory.mktemp("lda_wavs"), langs=("xx", "yy"))


@pytest.fixture(scope="module")
def tokenizer(corpus) -> CharTokenizer:
    return CharTokenizer.from_texts(u.text for u in corpus)


def test_adapters_sized_to_the_budget_and_base_frozen(tokenizer):
    # a model big enough for the 0.4% budget to allow several widths
    model = make_model(tokenizer, d_model=32, first_ffn_dim=512, second_d_model=32, second_ffn_dim=512, first_layers=3,
                       second_layers=2, pred_dim=128, joint_dim=128)
    base = mma.parameter_report(model).base
    info = lda.add_language_adapters(model, LANGS)
    report = mma.parameter_report(model)
    assert info.base_parameters == base and info.per_language_parameters == report.per_adapter["xx"]
    assert all(report.per_adapter[lang] == info.per_language_parameters for lang in LANGS)

    def frac(dim):
        return lda._adapter_size(model, dim, info.points) / base

    # the chosen width is the one whose size is closest to 0.4% of the base
    assert info.dim >= 2
    assert abs(frac(info.dim) - 0.004) <= min(abs(frac(info.dim - 1) - 0.004), abs(frac(info.dim + 1) - 0.004))
    assert info.fraction == pytest.approx(frac(info.dim)) and info.as_dict()["percent"] == pytest.approx(100 * info.fraction)
    # both passes adapted at the end of every block (3 + 2)
    wrapped = {w.module_name for w in mma.model.wrappers(model)}
    assert sum(n.startswith("first.") for n in wrapped) == 3 and sum(n.startswith("second.") for n in wrapped) == 2
    # only the languages' adapters train; nothing is active by default
    assert report.trainable == 3 * info.per_language_parameters
    assert mma.get_active(model) is None
    with pytest.raises(ValueError, match="already has adapters"):
        lda.add_language_adapters(model, ["xx"])
    other = make_model(tokenizer)  # tiny: 2 + 1 blocks
    both = lda.add_language_adapters(other, ["a"], dim=5, points=("block_out", "attn_out"))
    assert both.dim == 5 and len(mma.model.wrappers(other)) == 2 * 3


def test_merge_keeps_each_languages_adapter_from_its_best_checkpoint(tokenizer, tmp_path):
    model = make_model(tokenizer)
    lda.add_language_adapters(model, LANGS, dim=2)
    checkpoints = []
    for step in range(3):  # checkpoint k: every adapter weight of every language set to k + 1
        with torch.no_grad():
            for lang in LANGS:
                for p in mma.adapter_parameters(model, lang).values():
                    p.fill_(step + 1.0)
        checkpoints.append(mma.save_adapters(model, tmp_path / f"step-{step}"))
    dev_wers = [{"xx": 0.5, "yy": 0.2, "zz": math.nan},
                {"xx": 0.4, "yy": 0.3, "zz": 0.7},
                {"xx": 0.3, "yy": 0.2, "zz": 0.7}]  # yy ties at steps 0 and 2: the earliest wins
    best = lda.best_checkpoints(checkpoints, dev_wers)
    assert {k: (p.name, w) for k, (p, w) in best.items()} == {"xx": ("step-2", 0.3), "yy": ("step-0", 0.2), "zz": ("step-1", 0.7)}

    result = lda.merge_best(checkpoints, dev_wers, model=model, output_dir=tmp_path / "merged")
    expected = {"xx": 3.0, "yy": 1.0, "zz": 2.0}
    for lang, value in expected.items():  # selection, not averaging
        assert all(torch.all(p == value) for p in mma.adapter_parameters(model, lang).values()), lang
    assert result.dev_wer == {"xx": 0.3, "yy": 0.2, "zz": 0.7}
    selection = json.loads((tmp_path / "merged" / "selection.json").read_text())
    assert {k: v["source"].rsplit("/", 2)[-2] for k, v in selection["adapters"].items()} == {"xx": "step-2", "yy": "step-0", "zz": "step-1"}

    # the merged directory deploys onto a fresh foundation model, routed per sample
    fresh = make_model(tokenizer)
    assert mma.load_adapters(fresh, tmp_path / "merged") == LANGS
    for lang, value in expected.items():
        assert all(torch.all(p == value) for p in mma.adapter_parameters(fresh, lang).values())

    with pytest.raises(ValueError, match="2 checkpoints but 1"):
        lda.merge_best(checkpoints[:2], dev_wers[:1], output_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="no checkpoint has a dev WER for language 'zz'"):
        lda.best_checkpoints(checkpoints[:1], dev_wers[:1])


def test_loaded_adapters_route_the_time_major_second_pass(corpus, tokenizer, tmp_path):
    model = make_model(tokenizer).eval()
    lda.add_language_adapters(model, ["xx", "yy"], dim=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lang in ("xx", "yy"):
            for p in mma.adapter_parameters(model, lang).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    mma.save_adapters(model, tmp_path / "adapters")
    fresh = make_model(tokenizer).eval()
    mma.load_adapters(fresh, tmp_path / "adapters")
    batch = corpus[:3]
    waves, lengths = pad_waves([load_audio(u.audio_path) for u in batch])
    names = [u.lang for u in batch]
    with torch.no_grad(), mma.route(fresh, names):
        routed, _ = fresh.encode(waves, lengths, "second")
    for i, lang in enumerate(names):
        mma.set_active(fresh, lang)
        with torch.no_grad():
            alone, n = fresh.encode(waves[i : i + 1, : lengths[i]], lengths[i : i + 1], "second")
        torch.testing.assert_close(routed[i, : int(n)], alone[0], atol=1e-5, rtol=1e-5)


def test_pseudo_labels_filter_empty_and_unconfident_hypotheses(corpus, tokenizer, monkeypatch, tmp_path):
    model = make_model(tokenizer)
    chars = {c: i + 2 for i, c in enumerate(tokenizer.chars)}
    unlabeled = [Utterance(u.id, u.audio_path, "", u.lang, u.duration) for u in corpus[:4]]
    unlabeled.append(Utterance("gone", str(tmp_path / "missing.wav"), "", "xx", 1.0))
    planned = {"xx_0": ("ab", 0.9), "yy_0": ("", float("nan")), "xx_1": ("ba", 0.2), "yy_1": ("b a", 0.6)}
    order: list[str] = []

    def fake_decode(model, waves, lengths, *, pass_, decode, adapters=None):
        assert pass_ == "second" and decode == "greedy"
        ids = [[chars[c] for c in planned[uid][0]] for uid in order[-waves.shape[0]:]]
        return ids, torch.zeros(waves.shape[0], 1, 4), torch.ones(waves.shape[0], dtype=torch.long)

    def fake_confidence(model, enc, enc_lengths, hyps):
        return torch.tensor([planned[uid][1] for uid in order[-len(hyps):]])

    monkeypatch.setattr(lda, "decode_batch", fake_decode)
    monkeypatch.setattr(lda, "sequence_confidence", fake_confidence)
    real_load = lda.AudioSource.load

    def load(self, i):  # remember which utterances each batch holds, in order
        wave = real_load(self, i)
        if wave is not None:
            order.append(self.utterances[i].id)
        return wave

    monkeypatch.setattr(lda.AudioSource, "load", load)
    with pytest.warns(UserWarning, match="skipping"):
        labels = lda.pseudo_label(AsrBundle(model, tokenizer, model.config), unlabeled, min_confidence=0.5, batch_seconds=1.0)
    assert {u.id: u.text for u in labels.kept} == {"xx_0": "ab", "yy_1": "b a"}
    assert labels.dropped["empty hypothesis"] == 1 and labels.dropped["low confidence"] == 1
    assert sum(v for k, v in labels.dropped.items() if k.startswith("audio")) == 1
    assert labels.as_dict()["mean_confidence_kept"] == pytest.approx(0.75)
    assert all(u.lang == v.lang and u.audio_path == v.audio_path for u in labels.kept for v in unlabeled if v.id == u.id)


def test_sequence_confidence_is_a_per_token_probability_independent_of_padding(corpus, tokenizer):
    model = make_model(tokenizer).eval()
    waves, lengths = pad_waves([load_audio(u.audio_path) for u in corpus[:3]])
    hyps = [tokenizer.encode("ab"), [], tokenizer.encode("b a b")]
    with torch.no_grad():
        enc, enc_lengths = model.encode(waves, lengths, "second")
        conf = lda.sequence_confidence(model, enc, enc_lengths, hyps)
        single = lda.sequence_confidence(model, enc[2:3, : int(enc_lengths[2])], enc_lengths[2:3], hyps[2:])
    assert math.isnan(conf[1]) and 0 < conf[0] <= 1 and 0 < conf[2] <= 1
    torch.testing.assert_close(conf[2:], single, atol=1e-5, rtol=1e-4)
    assert torch.isnan(lda.sequence_confidence(model, enc[1:2], enc_lengths[1:2], [[]])).all()


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module




def test_pretraining_and_experiment_scripts_run_end_to_end(tmp_path):
    """scripts/pretrain_tiny_asr.py (through the engine, resumable) then the scripts/run_lda.py sweep over
    `mmadapters train lda` / `eval asr`, on a generator-shaped data dir with tiny budgets."""
    from safetensors.torch import load_file

    from mmadapters.eval.results_schema import read_results
    from mmadapters.speech.model import load_asr
    from mmadapters.speech.readers import write_manifest
    from mmadapters.speech.train import TransducerTask

    data = tmp_path / "data"
    roles = {"hh": "head", "tt": "tail", "uu": "tail"}
    utts = {s: [] for s in ("train", "dev", "test", "unlabeled")}
    for lang in roles:
        for split, texts in (("train", ["ab ba", "ba ab", "abba", "b a"]), ("dev", ["ab", "ba"]), ("test", ["a b", "bb a"]),
                             ("unlabeled", ["ab a", "ba"])):
            made = make_corpus(data / "audio" / lang / split, langs=(lang,), texts=texts, seed=len(utts[split]))
            utts[split] += [Utterance(f"{split}-{u.id}", u.audio_path, u.text, u.lang, u.duration) for u in made]
    for split, rows in utts.items():
        write_manifest(data / f"{split}.jsonl", rows)
    (data / "synth_config.json").write_text(json.dumps({"languages": {k: {"role": v} for k, v in roles.items()}, "seed": 0}))

    pretrain = _script("pretrain_tiny_asr")
    tiny = ["--set", "d_model=16", "--set", "first_layers=1", "--set", "second_layers=1", "--set", "first_ffn_dim=32",
            "--set", "second_d_model=16", "--set", "second_ffn_dim=32", "--set", "subsampling_channels=4",
            "--set", "pred_dim=16", "--set", "joint_dim=16", "--set", "pred_embed_dim=16"]
    model_dir, run_dir = tmp_path / "asr", tmp_path / "runs" / "asr"

    def stage1(output, run, *extra):
        return pretrain.main(["--data", str(data), "--output", str(output), "--run-dir", str(run), "--steps", "3",
                              "--eval-every", "2", "--warmup", "1", "--checkpoint-every", "1", "--quiet", *tiny, *extra])

    assert stage1(tmp_path / "whole", tmp_path / "runs" / "whole") == 0
    real = TransducerTask.get_batch
    calls = {"n": 0}

    def dies_at_the_third_step(self, indices):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed after the checkpoint of step 2
        return real(self, indices)

    TransducerTask.get_batch = dies_at_the_third_step
    try:
        with pytest.raises(KeyboardInterrupt):
            stage1(model_dir, run_dir)
    finally:
        TransducerTask.get_batch = real
    with pytest.raises(SystemExit, match="holds the training state of an earlier run"):
        stage1(model_dir, run_dir)
    assert stage1(model_dir, run_dir, "--resume") == 0  # the engine continues the run from step 2
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 3 and summary["parameters"]["trainable"] == summary["parameters"]["total"]
    whole, resumed = (load_file(d / "model.safetensors") for d in (tmp_path / "whole", model_dir))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)  # batch-norm statistics too
    bundle = load_asr(model_dir)
    assert bundle.tokenizer.encode("ab") and bundle.config.d_model == 16
    record = json.loads((model_dir / "training.json").read_text())
    assert record["languages"] == ["hh"] and record["train"]["steps"] == 3 and record["train"]["stopped_by"] == "steps"
    assert set(record["scores"]) == {"dev_first", "dev_second", "test_first", "test_second"}
    assert "scripts/pretrain_tiny_asr.py" in (model_dir / "README.md").read_text()
    # a second stage continues the saved model (same tokenizer, CMVN and config) and records the first stage
    stage2 = tmp_path / "asr2"
    assert pretrain.main(["--data", str(data), "--init", str(model_dir), "--output", str(stage2), "--run-dir",
                          str(tmp_path / "runs" / "asr2"), "--steps", "2", "--eval-every", "0", "--warmup", "1", "--quiet"]) == 0
    again = load_asr(stage2)
    assert again.config == bundle.config and again.tokenizer.encode("ab") == bundle.tokenizer.encode("ab")
    torch.testing.assert_close(again.model.frontend.cmvn_mean, bundle.model.frontend.cmvn_mean)
    record2 = json.loads((stage2 / "training.json").read_text())
    assert record2["train"]["steps"] == 2 and record2["previous_stages"][0]["train"]["steps"] == 3
    assert "after 3 steps in earlier stages" in (stage2 / "README.md").read_text()
    # a later stage may change training-only fields (SpecAugment, dropout, loss weights), never the architecture
    stage3 = tmp_path / "asr3"
    assert pretrain.main(["--data", str(data), "--init", str(stage2), "--output", str(stage3), "--run-dir",
                          str(tmp_path / "runs" / "asr3"), "--steps", "1", "--eval-every", "0", "--warmup", "1", "--quiet",
                          "--set", "time_mask_p=0.05", "--set", "dropout=0.0", "--precision", "bf16"]) == 0
    third = load_asr(stage3)
    assert json.loads((stage3 / "training.json").read_text())["train"]["trainer"]["precision"] == "bf16"
    assert third.config.time_mask_p == 0.05 and third.config.dropout == 0.0 and third.config.d_model == bundle.config.d_model
    assert json.loads((stage3 / "training.json").read_text())["preset"] == "custom"  # the test shrank the tiny preset
    with pytest.raises(SystemExit, match="with --init only"):
        pretrain.main(["--data", str(data), "--init", str(stage2), "--output", str(tmp_path / "asr4"), "--quiet",
                       "--set", "d_model=32"])

    run_lda = _script("run_lda")
    out = tmp_path / "lda"
    argv = ["--data", str(data), "--model", str(model_dir), "--out", str(out), "--lda-steps", "4", "--eval-every", "2",
            "--ft-steps", "2", "--ns-steps", "2", "--min-confidence", "0", "--adapter-dim", "2", "--batch-size", "4", "--quiet"]
    assert run_lda.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["languages"] == ["tt", "uu"]
    assert set(results["variants"]) == {"base", "full_ft", "lda", "lda_merge", "lda_noisy_student"}
    for v in results["variants"].values():
        assert set(v["wer"]["second"]["per_language"]) == {"tt", "uu"} and "first" in v["wer"]
    assert results["adapters"]["dim"] == 2 and 0 < results["adapters"]["fraction"] < 1
    assert set(results["merge"]) == {"tt", "uu"} and results["pseudo_labels"]["total"] == 4
    assert sorted(p.name for p in (out / "lda" / "merged").iterdir()) == ["selection.json", "tt", "uu"]
    # every number comes from an `eval asr` results file; relative reductions against base through --baseline
    lda_scores = read_results(out / "scores" / "lda_second.json")
    assert lda_scores["settings"]["baseline"] == str((out / "scores" / "base_second.json").resolve())
    assert results["variants"]["lda"]["relative_reduction"]["second"]["average"] == pytest.approx(
        lda_scores["metrics"]["relative_wer_reduction"], nan_ok=True)
    table = (out / "results.md").read_text()
    assert "| tt |" in table and "LDA + merge" in table and "Noisy student:" in table
    # the configs it ran are ordinary `mmadapters train lda` configs; a rerun continues the finished runs
    assert sorted(p.name for p in (out / "configs").iterdir()) == ["full_ft_tt.yaml", "full_ft_uu.yaml", "lda.yaml",
                                                                     "noisy_student.yaml"]
    assert run_lda.main([*argv, "--variants", "base,lda", "--decode", "beam", "--beam", "2"]) == 0
    assert json.loads((out / "lda" / "train_summary.json").read_text())["resumed_from"] == 4
    beam_scores = read_results(out / "scores" / "lda_second.json")  # --decode reaches every `eval asr`
    assert beam_scores["settings"]["decode"] == "beam" and beam_scores["settings"]["beam"] == 2
    assert "second pass, beam 2," in (out / "results.md").read_text()
    # --ship copies one variant's adapters in the save_adapters layout, with a README; they load and route
    shipped = tmp_path / "assets" / "lda"
    with pytest.raises(SystemExit, match="not among --variants"):
        run_lda.main([*argv, "--variants", "base,lda", "--ship", str(shipped)])
    assert not shipped.exists()
    assert run_lda.main([*argv, "--variants", "base,lda,lda_merge", "--ship", str(shipped)]) == 0
    assert sorted(p.name for p in shipped.iterdir()) == ["README.md", "tt", "uu"]
    for lang in ("tt", "uu"):
        assert (shipped / lang / "adapter_model.safetensors").read_bytes() == (
            out / "lda" / "merged" / lang / "adapter_model.safetensors").read_bytes()
    readme = (shipped / "README.md").read_text()
    assert "--ship" in readme and "| tt |" in readme and "LDA + merge" in readme
    assert json.loads((out / "results.json").read_text())["shipped"]["variant"] == "lda_merge"
    import mmadapters as mma
    from mmadapters.eval.asr_transcribe import resolve_adapters
    model = load_asr(model_dir).model
    lang_map, _ = resolve_adapters(model, shipped)
    assert lang_map == {"tt": "tt", "uu": "uu"} and set(mma.adapter_names(model)) >= {"tt", "uu"}


def test_pretraining_on_foundation_data_trains_every_language_with_the_generators_tokenizer(tmp_path):
    """``synth --foundation`` data (synth_config.json records a tail_fraction): every language trains, and the
    generator's tokenizer (DIR/tokenizer, every language's characters) is the model's, also for characters that
    no training text holds."""
    from mmadapters.speech.model import load_asr
    from mmadapters.speech.readers import write_manifest
    from mmadapters.speech.tokenizer import CharTokenizer

    data = tmp_path / "data"
    roles = {"hh": "head", "tt": "tail"}
    for split, texts in (("train", ["ab ba", "ba ab", "abba"]), ("dev", ["ab"]), ("test", ["ba"])):
        rows = []
        for lang in roles:
            made = make_corpus(data / "audio" / lang / split, langs=(lang,), texts=texts, seed=len(rows))
            rows += [Utterance(f"{split}-{lang}-{u.id}", u.audio_path, u.text, u.lang, u.duration) for u in made]
        write_manifest(data / f"{split}.jsonl", rows)
    (data / "synth_config.json").write_text(json.dumps({"languages": {k: {"role": v} for k, v in roles.items()},
                                                        "seed": 0, "tail_fraction": 0.12}))
    CharTokenizer.from_texts(["abxyz"]).save(data / "tokenizer")
    pretrain = _script("pretrain_tiny_asr")
    tiny = [a for kv in ("d_model=16", "first_layers=1", "second_layers=1", "first_ffn_dim=32", "second_d_model=16",
                         "second_ffn_dim=32", "subsampling_channels=4", "pred_dim=16", "joint_dim=16", "pred_embed_dim=16")
            for a in ("--set", kv)]
    out = tmp_path / "asr"
    assert pretrain.main(["--data", str(data), "--output", str(out), "--run-dir", str(tmp_path / "run"), "--steps", "1",
                          "--eval-every", "0", "--warmup", "1", "--quiet", *tiny]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["languages"] == ["hh", "tt"] and record["foundation_data"] is True
    assert record["tokenizer_source"] == str(data / "tokenizer")
    assert load_asr(out).tokenizer.encode("xyz") == CharTokenizer.from_texts(["abxyz"]).encode("xyz")
