"""Transducer decoding: batched greedy, modified beam search, streaming greedy + second pass, transcribe.

A tiny stand-in transducer (same interface as CascadedTransducer: encode / predict / joint / stream) gives
full control over the vocabulary and the frames, for exact checks of the search (brute force over the
lattice); the real tiny CascadedTransducer checks streaming and transcription end to end."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import mmadapters as mma
from mmadapters.speech.decode import (
    GreedyDecoder,
    StreamingTranscriber,
    beam_search,
    beam_search_nbest,
    greedy_decode,
    log_likelihood,
    transcribe,
)

HOP = 40


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one thread is faster than two, and far faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FakeStream:
    def __init__(self, model: FakeTransducer, batch: int):
        self.model, self.buf = model, torch.zeros(batch, 0)

    def push(self, chunk):
        self.buf = torch.cat([self.buf, chunk], dim=1)
        t = self.buf.shape[1] // HOP
        frames, self.buf = self.buf[:, : t * HOP], self.buf[:, t * HOP :]
        return self.model.frames(frames)

    def flush(self):
        return self.model.frames(self.buf[:, :0])


class FakeSecond(nn.Module):
    """A non-causal "second pass": adds the utterance mean of the valid frames."""

    def forward(self, enc, lengths):
        mask = (torch.arange(enc.shape[1])[None] < lengths[:, None]).unsqueeze(-1)
        return enc + (enc * mask).sum(1, keepdim=True) / lengths.clamp(min=1).view(-1, 1, 1), lengths


class FakeTransducer(nn.Module):
    """Causal framing (HOP samples per frame) + LSTM predictor + additive joiner; the "second pass" adds a
    non-causal term (the utterance mean) so the passes differ."""

    blank = 0

    def __init__(self, vocab: int = 6, dim: int = 8, seed: int = 0, scale: float = 1.0, blank_bias: float = 0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(HOP, dim)
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.enc_lin = nn.Linear(dim, 16)
        self.pred_lin = nn.Linear(dim, 16)
        self.out = nn.Linear(16, vocab)
        self.second = FakeSecond()
        with torch.no_grad():
            self.out.weight.mul_(scale)
            self.out.bias[0] += blank_bias

    def frames(self, waves):
        b, s = waves.shape
        return torch.tanh(self.inp(waves.reshape(b, s // HOP, HOP)))

    def encode(self, waves, lengths, pass_="first"):
        t = waves.shape[1] // HOP
        enc = self.frames(waves[:, : t * HOP])
        lengths = lengths // HOP
        return self.second(enc, lengths) if pass_ == "second" else (enc, lengths)

    def predict(self, tokens, state=None):
        return self.lstm(self.embed(tokens), state)

    def joint(self, enc, pred):
        if enc.dim() == 3:
            enc = enc.unsqueeze(2)
        return self.out(torch.tanh(self.enc_lin(enc) + self.pred_lin(pred).unsqueeze(1)))

    def stream(self, batch_size):
        return FakeStream(self, batch_size)


class FakeTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i - 1) for i in ids)


class Bundle:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer


def _enc(b=3, t=7, dim=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(b, t, dim, generator=g)
    lengths = torch.tensor([t, max(1, t - 3), max(1, t - 5)][:b] + [t] * max(0, b - 3))
    return enc, lengths


def _greedy_reference(model, enc, n):
    """Scalar greedy on one utterance enc (T,E)."""
    tokens = []
    pred, state = model.predict(torch.tensor([[0]]), None)
    for t in range(enc.shape[0]):
        for _ in range(n):
            k = int(model.joint(enc[t].view(1, 1, -1), pred)[0, 0, 0].argmax())
            if k == 0:
                break
            tokens.append(k)
            pred, state = model.predict(torch.tensor([[k]]), state)
    return tokens


# -- greedy ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5])
def test_greedy_batched_equals_per_utterance_reference(n):
    model = FakeTransducer(seed=n, blank_bias=0.5)
    enc, lengths = _enc(b=4, t=9)
    with torch.no_grad():
        hyps = greedy_decode(model, enc, lengths, max_symbols_per_frame=n)
        ref = [_greedy_reference(model, enc[b, : lengths[b]], n) for b in range(4)]
    assert hyps == ref
    assert any(hyps) and all(len(h) <= n * int(ln) for h, ln in zip(hyps, lengths, strict=True))
    assert all(0 not in h for h in hyps)


def test_greedy_padding_does_not_leak():
    model = FakeTransducer(seed=3)
    enc, lengths = _enc(b=3, t=8)
    alone = [greedy_decode(model, enc[b : b + 1, : lengths[b]], lengths[b : b + 1])[0] for b in range(3)]
    garbage = enc.clone()
    garbage[1, lengths[1] :] = 100.0
    assert greedy_decode(model, garbage, lengths) == alone


def test_greedy_decoder_any_chunking_same_tokens():
    model = FakeTransducer(seed=4)
    enc, lengths = _enc(b=2, t=10)
    lengths = torch.tensor([10, 10])
    whole = greedy_decode(model, enc, lengths)
    for cuts in ([1] * 10, [3, 3, 4], [0, 7, 0, 3]):
        dec = GreedyDecoder(model, 2)
        pos = 0
        for c in cuts:
            dec.advance(enc[:, pos : pos + c])
            pos += c
        assert dec.hypotheses() == whole


def test_greedy_errors():
    model = FakeTransducer()
    enc, lengths = _enc()
    with pytest.raises(ValueError, match="max_symbols_per_frame"):
        greedy_decode(model, enc, lengths, max_symbols_per_frame=0)
    with pytest.raises(ValueError, match="enc must be"):
        greedy_decode(model, enc[0], lengths)
    with pytest.raises(ValueError, match="exceeds"):
        greedy_decode(model, enc, lengths + 10)


# -- beam search ----------------------------------------------------------------------------------------------
def _brute_force(model, enc, n, max_len=100):
    """log P(y) for every token sequence y (up to max_len tokens) over all paths of the lattice capped at n
    symbols per frame."""
    out: dict[tuple, float] = {}

    def lp(seq, t):
        pred, _ = model.predict(torch.tensor([[0, *seq]]), None)
        return torch.log_softmax(model.joint(enc[t].view(1, 1, -1), pred[:, -1:])[0, 0, 0], -1)

    def walk(t, k, seq, score):
        if t == enc.shape[0]:
            out[seq] = float(torch.logaddexp(torch.tensor(out.get(seq, -math.inf)), torch.tensor(score)))
            return
        logp = lp(seq, t)
        walk(t + 1, 0, seq, score + float(logp[0]))
        for v in range(1, logp.shape[0] if len(seq) < max_len else 1):
            if k + 1 == n:
                walk(t + 1, 0, seq + (v,), score + float(logp[v]))
            else:
                walk(t, k + 1, seq + (v,), score + float(logp[v]))

    walk(0, 0, (), 0.0)
    return out


@pytest.mark.parametrize("n", [1, 2])
def test_beam_search_unpruned_is_exact(n):
    """With a beam wider than the lattice, every hypothesis's score is its exact probability (merging sums
    all alignments) and the best is the most probable sequence."""
    model = FakeTransducer(vocab=3, seed=5 + n)
    enc, _ = _enc(b=1, t=3)
    with torch.no_grad():
        exact = _brute_force(model, enc[0], n)
        hyps = beam_search_nbest(model, enc, torch.tensor([3]), beam=10_000, nbest=10_000, max_symbols_per_frame=n)[0]
    assert abs(math.log(sum(math.exp(v) for v in exact.values()))) < 1e-5  # the lattice is a distribution
    assert len(hyps) == len(exact)
    for h in hyps:
        assert h.score == pytest.approx(exact[tuple(h.tokens)], abs=1e-5)
    assert tuple(hyps[0].tokens) == max(exact, key=exact.get)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_equals_greedy_one_symbol(seed):
    """beam 1 with one symbol per frame is greedy: both take the arg-max over blank and every symbol."""
    model = FakeTransducer(seed=seed)
    enc, lengths = _enc(b=3, t=12, seed=seed)
    with torch.no_grad():
        beam = beam_search(model, enc, lengths, beam=1, max_symbols_per_frame=1)
        assert beam == greedy_decode(model, enc, lengths, max_symbols_per_frame=1)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_beam_not_worse_than_greedy_in_log_likelihood(n):
    """On random tiny models, log P(y|x) (all alignments of y in the lattice both search): a wide beam (64) is
    at least greedy's on every utterance and better on most; beam 4 is better in total and on all but at most
    one of 16 utterances — a pruned beam can drop alignments of greedy's hypothesis, so for it this is no
    per-utterance guarantee (such an utterance goes to greedy's answer as the beam widens)."""
    total = {"greedy": 0.0, 4: 0.0}
    worse4 = better64 = 0
    for seed in range(4):
        model = FakeTransducer(vocab=5, seed=10 + seed, scale=3.0)
        enc, lengths = _enc(b=4, t=10, seed=seed)
        with torch.no_grad():
            g = log_likelihood(model, enc, lengths, greedy_decode(model, enc, lengths, max_symbols_per_frame=n),
                               max_symbols_per_frame=n)
            b4, b64 = (log_likelihood(model, enc, lengths, beam_search(model, enc, lengths, beam=k, max_symbols_per_frame=n),
                                      max_symbols_per_frame=n) for k in (4, 64))
        assert bool((b64 >= g - 1e-4).all()), (seed, g, b64)
        better64 += int((b64 > g + 1e-4).sum())
        worse4 += int((b4 < g - 1e-4).sum())
        total["greedy"] += float(g.sum())
        total[4] += float(b4.sum())
    assert worse4 <= 1 and total[4] > total["greedy"] and better64 >= 8


@pytest.mark.parametrize("n", [1, 2, None])
def test_log_likelihood_matches_brute_force(n):
    model = FakeTransducer(vocab=3, seed=2)
    enc, _ = _enc(b=1, t=2)
    seqs = [(), (1,), (2, 1), (1, 1, 2), (2, 2, 1, 1)]
    with torch.no_grad():
        exact = _brute_force(model, enc[0], n=n or 5, max_len=4)  # 5 per frame > any length tested: uncapped
        got = log_likelihood(model, enc.expand(len(seqs), -1, -1), torch.tensor([2] * len(seqs)), [list(s) for s in seqs],
                             max_symbols_per_frame=n)
    for seq, g in zip(seqs, got.tolist(), strict=True):
        assert g == pytest.approx(exact.get(seq, -math.inf), abs=1e-4)


def test_beam_errors():
    model = FakeTransducer()
    enc, lengths = _enc()
    with pytest.raises(ValueError, match="beam must be"):
        beam_search(model, enc, lengths, beam=0)
    with pytest.raises(ValueError, match="adapters has 1"):
        beam_search(model, enc, lengths, adapters=["x"])


# -- transcribe -----------------------------------------------------------------------------------------------
def _waves(lengths=(400, 120, 280, 40, 360), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for n in lengths]


@pytest.mark.parametrize("pass_", ["first", "second"])
def test_transcribe_keeps_order_and_does_not_depend_on_batching(pass_):
    bundle = Bundle(FakeTransducer(seed=7), FakeTokenizer())
    waves = _waves()
    alone = []
    for w in waves:
        enc, n = bundle.model.encode(w[None], torch.tensor([w.shape[0]]), pass_=pass_)
        alone.append(FakeTokenizer().decode(greedy_decode(bundle.model, enc, n)[0]))
    for bs in (1, 2, 5):
        assert transcribe(bundle, waves, pass_=pass_, batch_size=bs) == alone
    assert any(alone)
    beam = transcribe(bundle, waves, decode="beam", pass_=pass_, batch_size=2)
    assert len(beam) == len(waves) and all(isinstance(t, str) for t in beam)


def test_transcribe_errors():
    bundle = Bundle(FakeTransducer(), FakeTokenizer())
    with pytest.raises(ValueError, match="decode must be"):
        transcribe(bundle, _waves(), decode="viterbi")
    with pytest.raises(ValueError, match="pass_ must be"):
        transcribe(bundle, _waves(), pass_="third")
    with pytest.raises(ValueError, match=r"waves\[1\]"):
        transcribe(bundle, [torch.zeros(80), torch.zeros(2, 80)])


def test_transcribe_routes_adapters_per_utterance():
    model = FakeTransducer(seed=8)
    for i, name in enumerate(["de", "fr"]):
        mma.add_adapter(model, name, mma.LoRAConfig(r=2, target_modules=["enc_lin", "pred_lin", "out"]))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in mma.adapter_parameters(model, name).values():
                p.copy_(torch.randn(p.shape, generator=g))
    bundle = Bundle(model, FakeTokenizer())
    waves = _waves()
    names = ["de", None, "fr", "de", "fr"]
    routed = transcribe(bundle, waves, adapters=names, batch_size=3)
    routed_beam = transcribe(bundle, waves, adapters=names, batch_size=3, decode="beam")
    alone, alone_beam = [], []
    for w, n in zip(waves, names, strict=True):
        mma.set_active(model, n)
        alone.append(transcribe(bundle, [w])[0])
        alone_beam.append(transcribe(bundle, [w], decode="beam")[0])
    mma.set_active(model, None)
    assert routed == alone and routed_beam == alone_beam
    assert len(set(transcribe(bundle, waves[:1] * 3, adapters=["de", None, "fr"]))) > 1


# -- streaming ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [40, 100, 333, 1000])
def test_streaming_first_pass_equals_offline_greedy(chunk):
    bundle = Bundle(FakeTransducer(seed=9), FakeTokenizer())
    waves = torch.randn(2, 840, generator=torch.Generator().manual_seed(0))
    st = StreamingTranscriber(bundle, batch_size=2)
    partials = []
    for s in range(0, waves.shape[1], chunk):
        partials.append(st.push(waves[:, s : s + chunk]))
    finals = st.finish()
    first = transcribe(bundle, list(waves), pass_="first")
    assert st.first_pass_texts == first
    assert finals == transcribe(bundle, list(waves), pass_="second")
    for b in range(2):  # partials only grow, and end at the first-pass final
        seq = [p[b] for p in partials] + [first[b]]
        assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(seq))
    stats = st.stats
    assert stats.audio_seconds == pytest.approx(840 / 16000) and stats.chunks == len(partials)
    assert stats.rtf > 0 and stats.second_pass_seconds > 0
    for b in range(2):
        k = next(i for i, p in enumerate(partials) if p[b])
        assert stats.first_partial_audio_seconds[b] == pytest.approx(min(840, (k + 1) * chunk) / 16000)
        assert 0 <= stats.first_partial_wall_seconds[b] <= stats.first_pass_seconds + 1.0


def test_streaming_next_utterance_and_errors():
    bundle = Bundle(FakeTransducer(seed=9), FakeTokenizer())
    st = StreamingTranscriber(bundle, second_pass=None)
    w = torch.randn(400, generator=torch.Generator().manual_seed(1))
    st.push(w[:200])
    st.push(w[200:])
    a = st.finish()
    st.push(w)
    assert st.finish() == a == st.first_pass_texts == transcribe(bundle, [w], pass_="first")
    with pytest.raises(ValueError, match=r"wave_chunk must be \(1, samples\)"):
        st.push(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="second_pass"):
        StreamingTranscriber(bundle, second_pass="rescore")


# -- the real tiny cascaded transducer ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from mmadapters.speech.model import AsrBundle, CascadedTransducer, tiny_asr_config
    from mmadapters.speech.tokenizer import CharTokenizer

    tokenizer = CharTokenizer(list("abcdefghij "))
    torch.manual_seed(0)
    model = CascadedTransducer(tiny_asr_config(tokenizer.vocab_size)).eval()
    with torch.no_grad():  # a random joiner emits one symbol at every step; these weights give varied outputs
        model.joiner.enc_proj.weight.mul_(8)
        model.joiner.out.weight.normal_(0, 0.5)
        model.joiner.out.bias.normal_(0, 1)
        model.joiner.out.bias[0] += 2
    return AsrBundle(model, tokenizer, model.config)


def _speechlike(n_samples, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n_samples) / 16000
    f0 = 120 + 80 * torch.rand(b, 1, generator=g)
    return 0.3 * torch.sin(2 * math.pi * f0 * t) * (1 + torch.sin(2 * math.pi * 3 * t)) + 0.05 * torch.randn(b, n_samples, generator=g)


@pytest.mark.parametrize("chunk", [160, 640, 2500, 16000])
def test_tiny_model_streaming_first_pass_equals_offline(tiny, chunk):
    waves = _speechlike(12000)
    st = StreamingTranscriber(tiny, batch_size=2)
    partials = [st.push(waves[:, s : s + chunk]) for s in range(0, waves.shape[1], chunk)]
    finals = st.finish()
    assert st.first_pass_texts == transcribe(tiny, list(waves), pass_="first")
    assert finals == transcribe(tiny, list(waves), pass_="second")
    assert len(set("".join(st.first_pass_texts))) >= 3 and len(set("".join(finals))) >= 3 and finals != st.first_pass_texts
    for b in range(2):
        seq = [p[b] for p in partials] + [st.first_pass_texts[b]]
        assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(seq))
    if any(p[0] for p in partials):
        assert 0 < st.stats.first_partial_audio_seconds[0] <= 12000 / 16000
    assert st.stats.audio_seconds == pytest.approx(0.75)


def test_tiny_model_transcribe_batching_and_beam(tiny):
    waves = list(_speechlike(9000, b=4, seed=1))
    waves = [waves[0], waves[1][:3000], waves[2][:6100], waves[3][:800]]
    alone = [transcribe(tiny, [w])[0] for w in waves]
    assert transcribe(tiny, waves, batch_size=3) == alone
    enc, lengths = tiny.model.encode(*_pad_list(waves), pass_="second")
    with torch.no_grad():
        g = greedy_decode(tiny.model, enc, lengths, max_symbols_per_frame=1)
        assert beam_search(tiny.model, enc, lengths, beam=1, max_symbols_per_frame=1) == g
        b = beam_search(tiny.model, enc, lengths, beam=4)
    assert transcribe(tiny, waves, decode="beam", batch_size=3) == [tiny.tokenizer.decode(h) for h in b]


def _pad_list(waves):
    lengths = torch.tensor([w.shape[0] for w in waves])
    out = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        out[i, : w.shape[0]] = w
    return out, lengths


def test_tiny_model_language_adapters_routed(tiny):
    import copy

    from mmadapters.speech.lda import add_language_adapters

    model = copy.deepcopy(tiny.model)
    add_language_adapters(model, ["de", "fr"], dim=4, freeze=False)
    for i, lang in enumerate(["de", "fr"]):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in mma.adapter_parameters(model, lang).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    bundle = type(tiny)(model, tiny.tokenizer, tiny.config)
    waves = _speechlike(6000, b=3, seed=2)
    langs = ["de", None, "fr"]
    routed = transcribe(bundle, list(waves), adapters=langs, pass_="second")
    st = StreamingTranscriber(bundle, batch_size=3, adapters=langs)
    for s in range(0, 6000, 1000):
        st.push(waves[:, s : s + 1000])
    assert st.finish() == routed
    alone, alone_first = [], []
    for w, lang in zip(waves, langs, strict=True):
        mma.set_active(model, lang)
        alone.append(transcribe(bundle, [w])[0])
        alone_first.append(transcribe(bundle, [w], pass_="first")[0])
    mma.set_active(model, None)
    assert routed == alone and st.first_pass_texts == alone_first
    assert transcribe(bundle, [waves[0]] * 2, adapters=["de", "fr"]) != transcribe(bundle, [waves[0]] * 2)
