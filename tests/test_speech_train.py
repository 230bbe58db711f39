"""The transducer training loop: learning, determinism, frozen bases, per-sample routing, skips, schedules."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import mmadapters as mma
from mmadapters.speech.model import CascadedTransducer, tiny_asr_config
from mmadapters.speech.readers import Utterance
from mmadapters.speech.tokenizer import CharTokenizer
from mmadapters.speech.train import (
    Callback,
    TrainConfig,
    add_noise,
    evaluate,
    length_buckets,
    lr_factor,
    train,
)

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


def small(**kw) -> TrainConfig:
    settings = dict(steps=8, lr=3e-3, warmup_steps=2, batch_seconds=6.0, progress=False, log_every=1)
    settings.update(kw)
    return TrainConfig(**settings)


def test_training_reduces_the_loss_and_scores_dev_per_language(corpus, tokenizer):
    model = make_model(tokenizer)
    seen = []

    class Record(Callback):
        def on_eval(self, state, result):
            seen.append((state.step, sorted(result.per_language)))

    result = train(model, tokenizer, corpus, dev=corpus[:4], config=small(steps=20, eval_every=10, log_every=5),
                   callbacks=[Record()])
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.6 * first, result.losses
    assert result.steps == 20 and result.stopped_by == "steps"
    assert seen == [(10, ["xx", "yy"]), (20, ["xx", "yy"])]
    final = result.final_eval
    for lang in ("xx", "yy"):
        assert final.per_language[lang]["utterances"] == 2
        assert 0.0 <= final.per_language[lang]["wer"] and not math.isnan(final.per_language[lang]["cer"])
    assert not model.training  # left in eval mode
    assert result.trainable_parameters == sum(p.numel() for p in model.parameters())


def test_same_seed_same_parameters_other_seed_differs(corpus, tokenizer):
    states = []
    for seed in (3, 3, 4):
        model = make_model(tokenizer)
        train(model, tokenizer, corpus, config=small(steps=5, seed=seed))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_only_adapter_parameters_change_under_freeze_base(corpus, tokenizer):
    model = make_model(tokenizer)
    mma.add_adapter(model, "task", mma.BottleneckConfig(bottleneck_dim=4, target_modules=["@block_out"]))
    mma.freeze_base(model)
    adapter_keys = {k for k in model.state_dict() if ".adapters." in k}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, tokenizer, corpus, config=small(steps=4))
    after = model.state_dict()
    assert result.trainable_parameters == mma.parameter_report(model).per_adapter["task"]
    for k in before:  # weights, CMVN statistics, batch-norm running statistics
        if k not in adapter_keys:
            assert torch.equal(before[k], after[k]), f"base tensor {k} changed"
    assert any(not torch.equal(before[k], after[k]) for k in adapter_keys)


def _grads(model, names):
    return {n: {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in mma.adapter_parameters(model, n).items()}
            for n in names}


def test_routed_mixed_batch_trains_each_language_adapter_on_its_own_samples(corpus, tokenizer):
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

    # through train(): a language without samples keeps its adapter exactly
    before = {n: {k: v.clone() for k, v in mma.adapter_parameters(model, n).items()} for n in ("xx", "yy")}
    only_xx = [u for u in corpus if u.lang == "xx"]
    train(model, tokenizer, only_xx, config=small(steps=3), adapter_for=lambda u: u.lang)
    assert all(torch.equal(before["yy"][k], v) for k, v in mma.adapter_parameters(model, "yy").items())
    assert any(not torch.equal(before["xx"][k], v) for k, v in mma.adapter_parameters(model, "xx").items())


def test_bad_audio_and_untokenizable_text_are_skipped_and_counted(corpus, tokenizer, tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    extra = [Utterance(id="broken", audio_path=str(broken), text="ab", lang="xx", duration=1.0),
             Utterance(id="missing", audio_path=str(tmp_path / "nope.wav"), text="ab", lang="xx", duration=1.0),
             Utterance(id="empty-text", audio_path=corpus[0].audio_path, text=" ", lang="xx", duration=corpus[0].duration)]
    model = make_model(tokenizer)
    with pytest.warns(UserWarning, match="skipping utterance"):
        result = train(model, tokenizer, corpus[:4] + extra, config=small(steps=6, batch_seconds=30.0))
    assert sum(result.skipped.values()) == 3
    assert any(k.startswith("text") for k in result.skipped) and result.steps == 6
    with pytest.warns(UserWarning):
        scores = evaluate(model, tokenizer, corpus[:2] + extra[:1], progress=False)
    assert sum(scores.skipped.values()) == 1 and scores.per_language["xx"]["utterances"] == 1


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


def test_learning_rate_schedules():
    cos = TrainConfig(steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(cos, 0, 0.0) == pytest.approx(0.1) and lr_factor(cos, 9, 0.09) == pytest.approx(1.0)
    assert lr_factor(cos, 99, 1.0) == pytest.approx(0.1)
    values = [lr_factor(cos, s, s / 100) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    noam = TrainConfig(steps=100, warmup_steps=16, schedule="noam")
    assert lr_factor(noam, 15, 0) == pytest.approx(1.0) and lr_factor(noam, 63, 0) == pytest.approx(0.5)
    const = TrainConfig(steps=100, warmup_steps=4, schedule="constant")
    assert [lr_factor(const, s, 0) for s in (0, 3, 50)] == [0.25, 1.0, 1.0]
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


def test_time_budget_and_callback_stop(corpus, tokenizer):
    model = make_model(tokenizer)
    result = train(model, tokenizer, corpus, config=small(steps=50, max_seconds=1e-9))
    assert result.steps == 0 and result.stopped_by == "time"

    class StopAt2(Callback):
        def on_step(self, state):
            state.should_stop = state.step >= 2

    result = train(model, tokenizer, corpus, config=small(steps=50), callbacks=[StopAt2()])
    assert result.steps == 2 and result.stopped_by == "callback"


def test_frozen_model_is_refused_and_noise_keeps_padding_zero(corpus, tokenizer):
    model = make_model(tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        train(model, tokenizer, corpus, config=small())
    waves = torch.ones(2, 10)
    waves[1, 4:] = 0  # padding
    noisy = add_noise(waves, torch.tensor([10, 4]), 10.0, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[1, 4:], torch.zeros(6)) and not torch.equal(noisy[0], waves[0])
    power = (noisy[0] - 1).pow(2).mean()
    assert 0.01 < float(power) < 1.0  # 10 dB below a unit-power signal: 0.1


def test_evaluate_with_beam_search_and_routing_matches_per_language_activation(corpus, tokenizer):
    model = make_model(tokenizer)
    train(model, tokenizer, corpus, config=small(steps=20))
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
