"""The transducer's engine task: learning, frozen bases, per-sample routing, skipped items, noise, validation."""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import mmadapters as mma
from mmadapters.speech.model import CascadedTransducer, load_asr, tiny_asr_config
from mmadapters.speech.readers import Utterance
from mmadapters.speech.tokenizer import CharTokenizer
from mmadapters.speech.train import TransducerTask, add_noise, evaluate, length_buckets
from mmadapters.training.trainer import TrainerConfig, seed_everything, train

SR = 16000
TEXTS = ["ab ba", "ba ab ab", "abba", "b a", "aab", "bab a"]
TONES = {"a": 300.0, "b": 700.0, " ": 0.0}


def tone_wave(text: str, rng: np.random.Generator, seconds_per_char: float = 0.12) -> np.ndarray:
    """A tone per character (silence for spaces) plus a little noise: learnable, and different per text."""
    n = int(SR * seconds_per_char)
    t = np.arange(n) / SR
    parts = [0.3 * np.sin(2 * np.pi * TONES.get(c, 500.0) * t) if TONES.get(c, 500.0) else np.zeros(n) for c in text]
    wave = np.concatenate([np.zeros(n // 2), *parts, np.zeros(n // 2)])
    return (wave + 0.005 * rng.standard_normal(wave.size)).astype(np.float32)


def make_corpus(root: Path, langs=("xx", "yy"), texts=TEXTS, seed: int = 0) -> list[Utterance]:
    """One wav per (language, text) under ``root``; utterances alternate languages."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    utts = []
    for k, text in enumerate(texts):
        for lang in langs:
            wave = tone_wave(text, rng)
            path = root / f"{lang}_{k}.wav"
            sf.write(path, wave, SR)
            utts.append(Utterance(id=f"{lang}_{k}", audio_path=str(path), text=text, lang=lang, duration=wave.size / SR))
    return utts


def make_model(tokenizer, seed: int = 0, **overrides) -> CascadedTransducer:
    torch.manual_seed(seed)
    return CascadedTransducer(tiny_asr_config(tokenizer.vocab_size, **overrides))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Utterance]:
    return make_corpus(tmp_path_factory.mktemp("wavs"))


@pytest.fixture(scope="module")
def tokenizer(corpus) -> CharTokenizer:
    return CharTokenizer.from_texts(u.text for u in corpus)


def run(task, output, steps: int = 8, **kw):
    """Train ``task`` with the engine, quietly, the way ``mmadapters train`` does."""
    config = TrainerConfig(**{"steps": steps, "batch_size": 4, "lr": 3e-3, "warmup_ratio": 0.1, "eval_every": 0,
                              "checkpoint_every": 0, "log_every": 1, "progress": False, **kw})
    return train(task, config, output)


@pytest.fixture(scope="module")
def trained(corpus, tokenizer, tmp_path_factory):
    """The whole tiny model trained from scratch for 20 steps, validated at 10 and 20."""
    seed_everything(0, 0)
    task = TransducerTask(make_model(tokenizer), tokenizer, corpus, corpus[:4])
    output = tmp_path_factory.mktemp("trained")
    summary = run(task, output, steps=20, eval_every=10, log_every=5)
    return task, summary, output


def test_training_reduces_the_loss_and_best_reproduces_its_dev_scores(trained, tokenizer, corpus):
    task, summary, output = trained
    events = [json.loads(line) for line in (output / "history.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["kind"] == "train"]
    assert losses[-1] < 0.6 * losses[0], losses
    evals = [e for e in events if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [10, 20]
    for e in evals:  # each language's dev WER and CER; their mean selects best/
        m = e["metrics"]
        assert m["dev_wer"] == pytest.approx((m["dev_wer_xx"] + m["dev_wer_yy"]) / 2) and not math.isnan(m["dev_cer_yy"])
        assert m["dev_utterances"] == 4 and m["dev_skipped"] == 0 and m["train_skipped"] == 0
    assert summary.parameters["trainable"] == summary.parameters["total"] == sum(p.numel() for p in task.model.parameters())
    best = load_asr(output / "best")  # the whole model, as save_asr writes it
    again = evaluate(best.model, best.tokenizer, corpus[:4], progress=False)
    assert again.average_wer == summary.best_metrics["dev_wer"]


def test_only_adapter_parameters_change_under_freeze_base(corpus, tokenizer, tmp_path):
    model = make_model(tokenizer)
    mma.add_adapter(model, "task", mma.BottleneckConfig(bottleneck_dim=4, target_modules=["@block_out"]))
    mma.freeze_base(model)
    adapter_keys = {k for k in model.state_dict() if ".adapters." in k}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = run(TransducerTask(model, tokenizer, corpus, corpus[:2]), tmp_path, steps=4)
    after = model.state_dict()
    assert summary.parameters["trainable"] == mma.parameter_report(model).per_adapter["task"]
    for k in before:  # weights, CMVN statistics, batch-norm running statistics
        if k not in adapter_keys:
            assert torch.equal(before[k], after[k]), f"base tensor {k} changed"
    assert any(not torch.equal(before[k], after[k]) for k in adapter_keys)


def _grads(model, names):
    return {n: {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in mma.adapter_parameters(model, n).items()}
            for n in names}


def test_routed_mixed_batch_trains_each_language_adapter_on_its_own_samples(corpus, tokenizer, tmp_path):
    from mmadapters.speech.audio import load_audio
    from mmadapters.speech.train import encode_targets, pad_waves

    # no SpecAugment and no dropout: the gradients below are deterministic
    model = make_model(tokenizer, freq_masks=0, time_masks=0)
    for lang in ("xx", "yy"):
        mma.add_adapter(model, lang, mma.BottleneckConfig(bottleneck_dim=3, target_modules=["@block_out"], pre_norm=True))
    mma.freeze_base(model, adapters=["xx", "yy"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lang in ("xx", "yy"):
            for p in mma.adapter_parameters(model, lang).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    batch = corpus[:6]  # xx, yy, xx, yy, xx, yy
    waves, lengths = pad_waves([load_audio(u.audio_path) for u in batch])
    targets, target_lengths = encode_targets(tokenizer, [u.text for u in batch])
    model.train()
    with mma.route(model, [u.lang for u in batch]):
        model(waves, lengths, targets, target_lengths)["loss"].backward()
    mixed = _grads(model, ["xx", "yy"])
    for lang in ("xx", "yy"):
        model.zero_grad()
        idx = [i for i, u in enumerate(batch) if u.lang == lang]
        mma.set_active(model, lang)
        sub_w, sub_l = pad_waves([load_audio(batch[i].audio_path) for i in idx])
        sub_t, sub_tl = encode_targets(tokenizer, [batch[i].text for i in idx])
        model(sub_w, sub_l, sub_t, sub_tl)["loss"].backward()
        alone = _grads(model, [lang])[lang]
        for k in alone:  # the batch loss is a mean over B samples: the language's share is len(idx) / B
            torch.testing.assert_close(mixed[lang][k], alone[k] * len(idx) / len(batch), atol=2e-5, rtol=1e-3)
    mma.set_active(model, None)

    # through the engine: a language without samples keeps its adapter exactly
    before = {n: {k: v.clone() for k, v in mma.adapter_parameters(model, n).items()} for n in ("xx", "yy")}
    only_xx = [u for u in corpus if u.lang == "xx"]
    run(TransducerTask(model, tokenizer, only_xx, only_xx[:1], route=lambda u: u.lang), tmp_path, steps=3)
    assert all(torch.equal(before["yy"][k], v) for k, v in mma.adapter_parameters(model, "yy").items())
    assert any(not torch.equal(before["xx"][k], v) for k, v in mma.adapter_parameters(model, "xx").items())


def test_bad_audio_and_untokenizable_text_are_skipped_and_counted(corpus, tokenizer, tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    extra = [Utterance(id="broken", audio_path=str(broken), text="ab", lang="xx", duration=1.0),
             Utterance(id="missing", audio_path=str(tmp_path / "nope.wav"), text="ab", lang="xx", duration=1.0),
             Utterance(id="empty-text", audio_path=corpus[0].audio_path, text=" ", lang="xx", duration=corpus[0].duration)]
    task = TransducerTask(make_model(tokenizer), tokenizer, corpus[:4] + extra, corpus[:2])
    assert task.train_size() == 6 and task.skipped() == {"text: empty or not encodable by the tokenizer": 1}
    with pytest.warns(UserWarning, match="skipping utterance"):
        batch = task.get_batch(list(range(6)))  # the two bad files fail when their batch needs them
    assert len(batch) == 4 and batch.bad == 2 and batch.waves.shape[0] == 4
    assert sum(task.skipped().values()) == 3 and task.get_batch([4, 5]).bad == 2  # never retried
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = run(task, tmp_path / "run", steps=3)
    assert summary.final_metrics["train_skipped"] == 3
    empty = task.get_batch([4])
    assert len(empty) == 0 and task.loss(task.model, empty).item() == 0.0
    with pytest.warns(UserWarning):
        scores = evaluate(task.model, tokenizer, corpus[:2] + extra[:1], progress=False)
    assert sum(scores.skipped.values()) == 1 and scores.per_language["xx"]["utterances"] == 1
    with pytest.raises(ValueError, match="none of the 2 training utterances is usable"):
        TransducerTask(make_model(tokenizer), tokenizer, [extra[2], extra[2]], corpus[:2], where="train.jsonl")


def test_length_buckets_cover_everything_once_within_the_budget():
    rng = random.Random(0)
    durations = [rng.uniform(0.5, 6.0) for _ in range(200)] + [25.0]
    batches = length_buckets(durations, 20.0, random.Random(1), max_batch_size=16)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(durations)))
    for b in batches:
        assert len(b) <= 16
        assert len(b) == 1 or max(durations[i] for i in b) * len(b) <= 20.0
    assert batches == length_buckets(durations, 20.0, random.Random(1), max_batch_size=16)
    assert batches != length_buckets(durations, 20.0, random.Random(2), max_batch_size=16)


def test_noise_keeps_padding_zero_and_draws_from_the_global_rng():
    waves = torch.ones(2, 10)
    waves[1, 4:] = 0  # padding
    noisy = add_noise(waves, torch.tensor([10, 4]), 10.0, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[1, 4:], torch.zeros(6)) and not torch.equal(noisy[0], waves[0])
    power = (noisy[0] - 1).pow(2).mean()
    assert 0.01 < float(power) < 1.0  # 10 dB below a unit-power signal: 0.1
    torch.manual_seed(5)
    a = add_noise(waves, torch.tensor([10, 4]), 10.0, None)
    torch.manual_seed(5)
    assert torch.equal(a, add_noise(waves, torch.tensor([10, 4]), 10.0, None))  # the engine's checkpoints restore it


def test_evaluate_with_beam_search_and_routing_matches_per_language_activation(trained, corpus):
    task = trained[0]
    model, tokenizer = task.model, task.tokenizer
    for lang in ("xx", "yy"):
        mma.add_adapter(model, lang, mma.BottleneckConfig(bottleneck_dim=2, target_modules=["@block_out"]))
    mma.set_active(model, None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lang in ("xx", "yy"):
            for p in mma.adapter_parameters(model, lang).values():
                p.copy_(torch.randn(p.shape, generator=g) * 1.0)
    for decode in ("greedy", "beam"):
        routed = evaluate(model, tokenizer, corpus[:4], adapter_for=lambda u: u.lang, decode=decode, progress=False)
        assert any(routed.hypotheses.values())  # something decoded, so the comparison below means something
        for lang in ("xx", "yy"):
            mma.set_active(model, lang)
            alone = evaluate(model, tokenizer, [u for u in corpus[:4] if u.lang == lang], decode=decode, progress=False)
            assert alone.per_language[lang] == routed.per_language[lang]
            assert all(routed.hypotheses[k] == v for k, v in alone.hypotheses.items())
        mma.set_active(model, None)
