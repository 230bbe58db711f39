"""The cascaded Conformer transducer: features, tokenizers, loss, streaming, adapter points, routing, save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import mmadapters as mma
from mmadapters.speech import model as asr
from mmadapters.speech.features import FeatureFrontend, FeatureStream, SpecAugment
from mmadapters.speech.model import CascadedTransducer, TransducerConfig, load_asr, save_asr, tiny_asr_config
from mmadapters.speech.tokenizer import CharTokenizer, SentencePieceTokenizer, TokenizerError, load_tokenizer

TEXTS = ["Hello, world!", "Grüße aus Berlin.", "the quick brown fox", "¿Dónde está?"]


def _waves(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of noisy tones (B, S) and its lengths; the padding is random, not zeros, so a
    sample whose padding leaked into its frames would be caught."""
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    t = torch.arange(s) / 16000
    waves = 0.05 * torch.randn(len(lengths), s, generator=g)
    for i, n in enumerate(lengths):
        waves[i, :n] += 0.3 * torch.sin(2 * torch.pi * (200 + 150 * i) * t[:n])
    return waves, torch.tensor(lengths)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP waits dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer.from_texts(TEXTS)


@pytest.fixture()
def model(tok) -> CascadedTransducer:
    torch.manual_seed(0)
    return CascadedTransducer(tiny_asr_config(tok.vocab_size)).eval()


def _randomize(model, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in names:
            for p in mma.adapter_parameters(model, n).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# -- tokenizers ------------------------------------------------------------------------------------------------
def test_char_tokenizer_normalizes_reserves_blank_and_round_trips(tok, tmp_path):
    ids = tok.encode("HELLO, World")
    assert min(ids) >= 1 and tok.blank == 0
    assert tok.decode(ids) == "hello world"  # normalize_text: lowercase, punctuation dropped
    assert tok.encode("hello j")[-1] == tok.unk  # "j" never seen
    assert tok.decode([0, *tok.encode("fox"), 0, tok.unk]) == "fox"  # blank and <unk> skipped
    assert tok.vocab_size == len(tok.chars) + 2
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.chars == tok.chars


def test_sentencepiece_tokenizer_round_trips(tmp_path):
    sp = SentencePieceTokenizer.train(TEXTS * 5, vocab_size=40)
    ids = sp.encode("Hello brown fox")
    assert min(ids) >= 1 and max(ids) < sp.vocab_size
    assert sp.decode(ids) == "hello brown fox"
    sp.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, SentencePieceTokenizer) and again.encode("Hello brown fox") == ids
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


def test_tokenizer_file_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kind": "words"}')
    with pytest.raises(TokenizerError, match="'kind'"):
        load_tokenizer(tmp_path)


# -- features ----------------------------------------------------------------------------------------------------
def test_frontend_frames_lengths_and_cmvn():
    fe = FeatureFrontend()
    waves, lengths = _waves([16000, 4000, 300])
    feats, n = fe(waves, lengths)
    assert feats.shape == (3, 98, 80) and n.tolist() == [98, 23, 1]  # 1 + (S - 400) // 160; short -> one frame
    assert feats[1, 23:].abs().sum() == 0
    fe.fit_cmvn(w[:k] for w, k in zip(waves, lengths.tolist(), strict=True))
    feats, _ = fe(waves[:1], lengths[:1])
    assert feats.mean().abs() < 0.2 and 0.7 < feats.std() < 1.3


@pytest.mark.parametrize("chunk", [1, 160, 401, 7000])
def test_feature_stream_equals_whole_utterance(chunk):
    fe = FeatureFrontend()
    waves, lengths = _waves([9000, 9000])
    whole, _ = fe(waves, lengths)
    st = FeatureStream(fe, 2)
    parts = [st.push(waves[:, i : i + chunk]) for i in range(0, 9000, max(chunk, 1))] + [st.flush()]
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-5, rtol=1e-5)


def test_spec_augment_only_in_training():
    aug = SpecAugment(freq_mask_param=20, time_mask_param=10, time_mask_p=1.0)
    x = torch.randn(4, 50, 80)
    assert aug.eval()(x) is x
    torch.manual_seed(0)
    y = aug.train()(x)
    assert y.shape == x.shape and (y == 0).any() and not torch.equal(y, x)


def test_frequency_warp_stretches_each_samples_mel_axis():
    """freq_warp w: output bin f reads input bin f / a, one factor a in [1 - w, 1 + w] per sample, linearly
    interpolated (a ramp along the mel axis stays a ramp of slope 1 / a); off in eval mode and at w = 0."""
    ramp = torch.arange(80.0).expand(6, 30, 80).clone()
    aug = SpecAugment(freq_masks=0, time_masks=0, freq_warp=0.2)
    assert aug.eval()(ramp) is ramp
    assert torch.equal(SpecAugment(freq_masks=0, time_masks=0).train()(ramp), ramp)
    torch.manual_seed(0)
    out = aug.train()(ramp)
    assert out.shape == ramp.shape and torch.equal(out[:, :1].expand_as(out), out)  # the same warp in every frame
    slopes = out[:, 0, 1:40].diff(dim=-1)  # bins 1..39 stay below the edge for any factor >= 0.8
    factors = 1.0 / slopes.mean(-1)
    torch.testing.assert_close(slopes, slopes[:, :1].expand_as(slopes), atol=1e-4, rtol=0)
    assert ((factors >= 0.8 - 1e-4) & (factors <= 1.2 + 1e-4)).all() and factors.std() > 0.01
    assert float(out.max()) <= 79.0 and float(out[:, :, 0].abs().max()) == 0.0
    with pytest.raises(ValueError, match="freq_warp"):
        SpecAugment(freq_warp=0.5)
    with pytest.raises(ValueError, match="TransducerConfig.freq_warp"):
        TransducerConfig(vocab_size=4, freq_warp=-0.1)


# -- the model ---------------------------------------------------------------------------------------------------
def test_shapes_of_encode_predict_joint(model, tok):
    waves, lengths = _waves([16000, 7000])
    e1, l1 = model.encode(waves, lengths, "first")
    e2, l2 = model.encode(waves, lengths, "second")
    assert e1.shape == e2.shape == (2, 25, model.config.d_model) and l1.tolist() == l2.tolist() == [25, 11]
    pred, (h, c) = model.predict(torch.zeros(2, 1, dtype=torch.long))
    assert pred.shape == (2, 1, model.config.pred_dim) and h.shape == (1, 2, model.config.pred_dim)
    pred2, _ = model.predict(torch.tensor([[3], [4]]), (h, c))  # carried state
    assert pred2.shape == pred.shape
    assert model.joint(e1, pred).shape == (2, 25, 1, tok.vocab_size)
    assert model.joint(e1[:, 0], pred[:, 0]).shape == (2, tok.vocab_size)  # one decoding step
    with pytest.raises(ValueError, match="pass_"):
        model.encode(waves, lengths, "third")


def test_loss_on_both_passes_trains(model, tok):
    waves, lengths = _waves([8000, 6000])
    targets = [tok.encode("hello"), tok.encode("fox")]
    tgt = torch.zeros(2, 5, dtype=torch.long)
    for i, t in enumerate(targets):
        tgt[i, : len(t)] = torch.tensor(t)
    tl = torch.tensor([len(t) for t in targets])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        out = model(waves, lengths, tgt, tl)
        assert set(out) == {"loss", "loss_first", "loss_second"}
        assert torch.isclose(out["loss"], 0.5 * out["loss_first"] + 0.5 * out["loss_second"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["loss"].item()
    assert out["loss"].item() < 0.7 * first
    assert model.second.conformer.conformer_layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0


def test_padded_batch_equals_each_sample_alone(model):
    model = copy.deepcopy(model)  # the second pass's padding hooks must follow the copy
    hook = next(iter(model.second.conformer.conformer_layers[0].conv_module.sequential[2]._forward_pre_hooks.values()))
    assert hook.__self__ is model.second
    waves, lengths = _waves([12000, 7000, 3000])
    e1, e2, n = model.encode_both(waves, lengths)
    for i, k in enumerate(lengths.tolist()):
        a1, a2, m = model.encode_both(waves[i : i + 1, :k], lengths[i : i + 1])
        assert m.item() == n[i].item()
        torch.testing.assert_close(a1[0], e1[i, : n[i]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a2[0], e2[i, : n[i]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [160, 1111, 4000, 20000])
def test_stream_equals_first_pass_encode(model, chunk):
    waves, lengths = _waves([13000, 13000], seed=1)
    whole, _ = model.encode(waves, lengths, "first")
    st = model.stream(2)
    with torch.no_grad():
        parts = [st.push(waves[:, i : i + chunk]) for i in range(0, 13000, chunk)]
        parts.append(st.flush())
    assert sum(p.shape[1] for p in parts[:-1]) % model.config.chunk_size == 0  # whole chunks while streaming
    torch.testing.assert_close(torch.cat(parts, 1), whole.detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="flushed"):
        st.push(waves[:, :10])


def test_stream_with_unlimited_left_context(tok):
    torch.manual_seed(1)
    m = CascadedTransducer(tiny_asr_config(tok.vocab_size, left_chunks=-1, chunk_size=3)).eval()
    waves, lengths = _waves([9000])
    whole, _ = m.encode(waves, lengths, "first")
    st = m.stream(1)
    with torch.no_grad():
        out = torch.cat([st.push(waves[:, i : i + 1000]) for i in range(0, 9000, 1000)] + [st.flush()], 1)
    torch.testing.assert_close(out, whole.detach(), atol=1e-5, rtol=1e-5)


# -- adapter points ---------------------------------------------------------------------------------------------
POINTS = ["first_attn_out", "first_block_out", "second_attn_out", "second_block_out", "attn_out", "block_out",
          "ffn_out", "predictor_out", "joiner_in"]


def test_declared_points_cover_both_passes(model):
    from mmadapters.targets import resolve_targets

    names = {p: [t.name for t in resolve_targets(model, [f"@{p}"])] for p in POINTS}
    assert names["first_attn_out"] == ["first.layers.0.attn", "first.layers.1.attn"]
    assert names["second_block_out"] == ["second.conformer.conformer_layers.0"]
    assert set(names["block_out"]) == set(names["first_block_out"]) | set(names["second_block_out"])
    assert names["joiner_in"] == ["joiner.enc_proj", "joiner.pred_proj"]
    assert names["predictor_out"] == ["predictor.lstm"]
    second = resolve_targets(model, ["@second_attn_out"])[0]
    assert second.batch_dim == 1  # time-major torchaudio layer


@pytest.mark.parametrize("point", ["attn_out", "block_out", "ffn_out", "predictor_out", "joiner_in"])
def test_adapters_at_each_point_train_and_switch_off_exactly(model, tok, point):
    waves, lengths = _waves([6000, 5000])
    tgt = torch.tensor([tok.encode("fox"), tok.encode("the")])
    tl = torch.tensor([3, 3])
    with torch.no_grad():
        base1, base2, _ = model.encode_both(waves, lengths)
        base_loss = model(waves, lengths, tgt, tl)["loss"]
    mma.add_adapter(model, "de", mma.BottleneckConfig(bottleneck_dim=4, target_modules=[f"@{point}"]))
    mma.set_active(model, "de")
    mma.freeze_base(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(any(p is q for q in mma.adapter_parameters(model, "de").values()) for p in trainable)
    model.train()
    opt = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(3):
        loss = model(waves, lengths, tgt, tl)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        adapted = model(waves, lengths, tgt, tl)["loss"]
        mma.set_active(model, None)
        off1, off2, _ = model.encode_both(waves, lengths)
        off_loss = model(waves, lengths, tgt, tl)["loss"]
    assert adapted < base_loss  # the adapter learned something
    assert torch.equal(off1, base1) and torch.equal(off2, base2) and torch.equal(off_loss, base_loss)


ROUTED = {
    "bottleneck": lambda: mma.BottleneckConfig(bottleneck_dim=4, pre_norm=True,
                                               target_modules=["@attn_out", "@block_out", "@predictor_out", "@joiner_in"]),
    "lora": lambda: mma.LoRAConfig(r=2, target_modules=["@attn", "@joiner_in"]),  # incl. torchaudio's MultiheadAttention
}


@pytest.mark.parametrize("method", list(ROUTED))
def test_mixed_language_batch_routes_per_sample(model, tok, method):
    cfg = ROUTED[method]()
    for n in ("a", "b"):
        mma.add_adapter(model, n, cfg)
    _randomize(model, ["a", "b"])
    waves, lengths = _waves([9000, 6000, 7500])
    tokens = torch.tensor([[0, 3, 4], [0, 5, 6], [0, 7, 8]])
    names = ["a", None, "b"]
    with torch.no_grad(), mma.route(model, names):
        e1, e2, n = model.encode_both(waves, lengths)
        pred, _ = model.predict(tokens)
        logits = model.joint(e2, pred)
    with torch.no_grad():
        for i, name in enumerate(names):
            mma.set_active(model, name)
            k = lengths[i].item()
            a1, a2, m = model.encode_both(waves[i : i + 1, :k], lengths[i : i + 1])
            p, _ = model.predict(tokens[i : i + 1])
            torch.testing.assert_close(a1[0], e1[i, : m[0]], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a2[0], e2[i, : m[0]], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.joint(a2, p)[0], logits[i, : m[0]], atol=1e-5, rtol=1e-5)
    mma.set_active(model, None)
    # the routed adapters make a difference (sample 0 vs the base)
    with torch.no_grad():
        b1, _ = model.encode(waves[:1, :9000], lengths[:1], "first")
    assert not torch.allclose(b1[0], e1[0], atol=1e-3)


def test_stream_with_adapters_active_and_routed_per_stream(model):
    for n in ("a", "b"):
        mma.add_adapter(model, n, mma.BottleneckConfig(bottleneck_dim=4, target_modules=["@first_block_out", "@first_attn_out"]))
    _randomize(model, ["a", "b"])
    waves, lengths = _waves([8000, 8000])
    mma.set_active(model, "a")
    with torch.no_grad():
        whole, _ = model.encode(waves, lengths, "first")
        st = model.stream(2)
        out = torch.cat([st.push(waves[:, i : i + 900]) for i in range(0, 8000, 900)] + [st.flush()], 1)
    torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)
    mma.set_active(model, None)
    with torch.no_grad(), mma.route(model, ["b", "a"]):  # one language per stream
        whole, _ = model.encode(waves, lengths, "first")
        st = model.stream(2)
        out = torch.cat([st.push(waves[:, i : i + 3000]) for i in range(0, 8000, 3000)] + [st.flush()], 1)
    torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)


# -- config, sizes, save/load ------------------------------------------------------------------------------------
def test_config_json_round_trip_and_errors():
    cfg = tiny_asr_config(30, left_chunks=5)
    assert TransducerConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown field.*bogus"):
        TransducerConfig.from_dict({**cfg.to_dict(), "bogus": 1}, "x.json")
    with pytest.raises(ValueError, match="second_kernel_size"):
        tiny_asr_config(30, second_kernel_size=4)


def test_parameter_counts_and_default_size():
    counts = asr.parameter_counts(CascadedTransducer(TransducerConfig(vocab_size=256)))
    assert 2_000_000 <= counts["total"] <= 4_000_000  # fp16 ≤ 15 MB
    assert counts["adapter_budget"] == int(0.004 * counts["total"])
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "adapter_budget"))


@pytest.mark.parametrize("fp16", [False, True])
def test_save_load_round_trip(model, tok, tmp_path, fp16):
    model.frontend.fit_cmvn([_waves([8000])[0][0]])
    mma.add_adapter(model, "a", mma.BottleneckConfig(bottleneck_dim=4, target_modules=["@block_out"]))
    _randomize(model, ["a"])  # adapters are not part of the saved base
    save_asr(tmp_path / "m", model, tok, fp16=fp16)
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["weights_dtype"] == ("float16" if fp16 else "float32")
    bundle = load_asr(tmp_path / "m")
    assert bundle.config == model.config and bundle.tokenizer.chars == tok.chars and not bundle.model.training
    torch.testing.assert_close(bundle.model.frontend.cmvn_mean, model.frontend.cmvn_mean, atol=0, rtol=0)
    waves, lengths = _waves([7000])
    mma.set_active(model, None)
    with torch.no_grad():
        ref, _ = model.encode(waves, lengths, "second")
        got, _ = bundle.model.encode(waves, lengths, "second")
    tol = 5e-2 if fp16 else 0.0
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_load_errors_name_the_file(model, tok, tmp_path, monkeypatch):
    d = tmp_path / "m"
    with pytest.raises(FileNotFoundError, match="not found"):
        load_asr(d)
    save_asr(d, model, tok)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_asr(d)
    save_asr(d, model, tok)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_asr(d)
    (d / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json"):
        load_asr(d)
    monkeypatch.setattr(asr, "TINY_ASR_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="pretrain_tiny_asr.py"):
        load_asr()


def test_the_shipped_foundation_covers_every_language():
    """speech/assets/tiny_asr, the shipped foundation (issue 20): the ~3 M "small" preset trained on every language
    of `synth --foundation` data, fp16 within 10 MB, one tokenizer for all of them."""
    from mmadapters.speech.synth import DEFAULT_LANGUAGES

    folder = asr.TINY_ASR_DIR
    bundle = load_asr()
    record = json.loads((folder / "training.json").read_text(encoding="utf-8"))
    assert record["foundation_data"] is True and sorted(record["languages"]) == sorted(DEFAULT_LANGUAGES)
    assert 2.5e6 < record["parameters"]["total"] < 3.5e6 and bundle.config.d_model == 144
    assert sum(f.stat().st_size for f in folder.iterdir()) < 10e6
    for text in ("zażółć", "příliš", "привіт", "ação", "blåbär"):  # tail-only letters are ids, not unknowns
        assert bundle.tokenizer.decode(bundle.tokenizer.encode(text)) == text
    wave = torch.randn(1, 16000) * 0.05
    enc, lengths = bundle.model.encode(wave, torch.tensor([16000]))
    assert enc.shape[0] == 1 and enc.shape[-1] == 144 and int(lengths[0]) == enc.shape[1]


def test_predictor_runs_in_float32_under_cpu_bf16_autocast():
    """--precision bf16 on a CPU without native bf16 (AVX2 only): oneDNN has no bf16 LSTM there, so the predictor's
    LSTM runs in float32 inside the autocast region, with the same result as outside it."""
    pred = asr.Predictor(vocab_size=12, embed_dim=8, hidden_dim=16, num_layers=1)
    tokens = torch.tensor([[0, 3, 5], [0, 7, 1]])
    ref, (h, c) = pred(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = pred(tokens)
        again, _ = pred(tokens[:, 1:], state)  # a carried state continues it
    assert out.dtype == torch.float32 and state[0].dtype == torch.float32
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(state[0], h)
    torch.testing.assert_close(again, pred(tokens[:, 1:], (h, c))[0])
