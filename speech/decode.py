"""Transducer decoding: batched greedy, beam search, streaming greedy with second-pass redecoding.

Every decoder talks to the model only through the transducer interface of
:class:`mmadapters.speech.model.CascadedTransducer`::

    enc, enc_lengths = model.encode(waves, wave_lengths, pass_="first" | "second")   # (B,T,E), (B,)
    pred, state = model.predict(tokens (B,U), state)      # (B,U,P); feed blank (0) as the start token
    logits = model.joint(enc (B,T,E), pred (B,U,P))        # (B,T,U,V), unnormalized
    stream = model.stream(B); frames = stream.push(chunk (B,s)); frames = stream.flush()   # (B,t,E)

Search space. Both decoders walk the same lattice, the standard transducer one with a cap of ``N =
max_symbols_per_frame`` symbols per frame: at frame ``t`` the model either emits blank (go to frame
``t+1``) or a symbol (stay at ``t``), and the ``N``-th symbol of a frame moves on to ``t+1`` without a
blank. The score of a path is the sum of the joint's log-softmax at each decision.

- :func:`greedy_decode` follows the arg-max of every decision, for the whole batch at once: one joint call
  per decision step on ``(B, V)``, one predictor call per step in which any sample emitted; a sample's
  predictor output and state only advance where it emitted (masked update), so no Python loop over
  samples.
- :func:`beam_search` is the *modified beam search* of k2/icefall (Kang et al., "Fast and parallel decoding
  for transducer", 2022), generalized to ``N`` symbols per frame (with ``N = 1`` it is exactly icefall's
  ``modified_beam_search``): a frame-synchronous beam over hypotheses, where hypotheses with the same token
  sequence at the same frame are merged by adding their probabilities (log-add). Within a frame it expands
  up to ``N`` times (like ESPnet's time-synchronous decoding), keeping the ``beam`` best open expansions and
  stopping as soon as none can beat the ``beam``-th hypothesis that already finished the frame. The default
  ``N`` is greedy's (5): a character model at 40 ms per frame often needs two symbols in a frame. It runs
  per utterance, with that utterance's hypotheses batched through the predictor and joiner.

Relations (tested): both walk the same lattice, so ``beam_search(beam=1, max_symbols_per_frame=1)`` equals
``greedy_decode(max_symbols_per_frame=1)`` (for ``N > 1`` beam 1 compares whole-frame continuations and may
differ from greedy); with a beam wider than the lattice the search is exact — each hypothesis's score is its
probability summed over all its alignments; and on random models a beam's hypotheses are at least as likely
as greedy's (:func:`log_likelihood`) — per utterance for a wide beam, on almost every utterance for beam 4
(a pruned beam may drop alignments, so that is no guarantee).

:class:`StreamingTranscriber` decodes the first (causal) pass while audio arrives, chunk by chunk, with the
predictor state carried across chunks, and at the end of the utterance redecodes the whole utterance with
the second (non-causal) pass. :func:`transcribe` is offline decoding of a list of waveforms.

Per-language adapters: ``transcribe(..., adapters=[...])`` and ``StreamingTranscriber(..., adapters=[...])``
run each utterance with its adapter through :func:`mmadapters.route` (one entry per utterance, ``None``
for the base model); beam search, which runs one utterance at a time, routes its hypotheses' batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SAMPLE_RATE = 16000  # mmadapters.speech.audio.SAMPLE_RATE; the models here take 16 kHz audio

__all__ = [
    "GreedyDecoder",
    "Hypothesis",
    "StreamingStats",
    "StreamingTranscriber",
    "beam_search",
    "beam_search_nbest",
    "greedy_decode",
    "log_likelihood",
    "transcribe",
]


# -- predictor state ---------------------------------------------------------------------------------------
# The predictor's state is whatever model.predict returns: a tensor or nested tuples/lists/dicts of tensors.
# Their batch dimension follows PyTorch's recurrent layers: dim 1 for 3-D tensors (nn.LSTM's (layers, B, H)),
# dim 0 otherwise (torchaudio's (B, H) per layer).
def _state_batch_dim(t: Tensor) -> int:
    return 1 if t.dim() == 3 else 0


def _map_state(fn, *states):
    first = states[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return fn(*states)
    if isinstance(first, (tuple, list)):
        return type(first)(_map_state(fn, *parts) for parts in zip(*states, strict=True))
    if isinstance(first, dict):
        return {k: _map_state(fn, *(s[k] for s in states)) for k in first}
    raise TypeError(f"decode: predictor state must be tensors in tuples/lists/dicts, got {type(first).__name__}")


def _state_where(mask: Tensor, new, old):
    """Per sample: ``new`` where ``mask`` (B,) is true, else ``old``."""

    def pick(n: Tensor, o: Tensor) -> Tensor:
        d = _state_batch_dim(n)
        shape = [1] * n.dim()
        shape[d] = -1
        return torch.where(mask.view(shape), n, o)

    return _map_state(pick, new, old)


def _state_select(state, index: Tensor):
    """Gather samples ``index`` (K,) along the batch dimension."""
    return _map_state(lambda t: t.index_select(_state_batch_dim(t), index), state)


def _state_cat(states: list):
    return _map_state(lambda *ts: torch.cat(ts, dim=_state_batch_dim(ts[0])), *states)


# -- adapters ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _routed(model: nn.Module, names: Sequence[str | None] | None) -> Iterator[None]:
    """Route the model's forward passes per sample (``names``: one adapter name or None per sample)."""
    if names is None:
        yield
        return
    import mmadapters as mma

    with mma.route(model, list(names)):
        yield


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _check_encoder_output(enc: Tensor, enc_lengths: Tensor, where: str) -> None:
    if enc.dim() != 3:
        raise ValueError(f"{where}: enc must be (B, T, E), got shape {tuple(enc.shape)}")
    if enc_lengths.shape != (enc.shape[0],):
        raise ValueError(f"{where}: enc_lengths must be ({enc.shape[0]},), got shape {tuple(enc_lengths.shape)}")
    if enc.shape[0] and int(enc_lengths.max()) > enc.shape[1]:
        raise ValueError(f"{where}: enc_lengths max {int(enc_lengths.max())} exceeds the {enc.shape[1]} frames of enc")


# -- greedy --------------------------------------------------------------------------------------------------
class GreedyDecoder:
    """Batched transducer greedy search that can be fed frames a chunk at a time.

    Holds, per sample, the predictor output for the last emitted token ``pred (B,1,P)``, the predictor
    state and the tokens emitted so far; :meth:`advance` consumes frames ``(B,t,E)`` and continues from
    there, so feeding an encoder output in any chunking gives the same tokens as feeding it at once.
    """

    def __init__(self, model: nn.Module, batch_size: int, *, max_symbols_per_frame: int = 5,
                 device: torch.device | str | None = None) -> None:
        if max_symbols_per_frame < 1:
            raise ValueError(f"GreedyDecoder: max_symbols_per_frame must be >= 1, got {max_symbols_per_frame}")
        self.model = model
        self.batch_size = batch_size
        self.max_symbols_per_frame = max_symbols_per_frame
        self.blank = int(getattr(model, "blank", 0))
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        self.tokens: list[list[int]] = [[] for _ in range(batch_size)]
        self.frames_seen = torch.zeros(batch_size, dtype=torch.long)
        start = torch.full((batch_size, 1), self.blank, dtype=torch.long, device=self.device)
        with torch.no_grad():
            self.pred, self.state = model.predict(start, None)

    @torch.no_grad()
    def advance(self, frames: Tensor, lengths: Tensor | None = None) -> None:
        """Decode frames ``(B,t,E)``; ``lengths (B,)`` = how many of the ``t`` frames are real per sample."""
        b, t, _ = frames.shape
        if b != self.batch_size:
            raise ValueError(f"GreedyDecoder.advance: frames have batch {b}, the decoder was made for {self.batch_size}")
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long)
        lengths = lengths.to(self.device)
        self.frames_seen += lengths.cpu()
        emitted: list[Tensor] = []  # per decision step: token (B,), -1 where nothing was emitted
        none = torch.full((b,), -1, dtype=torch.long, device=self.device)
        for i in range(t):
            active = lengths > i  # (B,)
            if not bool(active.any()):
                break
            frame = frames[:, i : i + 1]  # (B,1,E)
            for _ in range(self.max_symbols_per_frame):
                logits = self.model.joint(frame, self.pred)[:, 0, 0]  # (B,V)
                best = logits.argmax(-1)
                emit = active & (best != self.blank)
                if not bool(emit.any()):
                    break
                pred, state = self.model.predict(best.unsqueeze(1), self.state)
                if bool(emit.all()):
                    self.pred, self.state = pred, state
                else:
                    self.pred = torch.where(emit.view(b, 1, 1), pred, self.pred)
                    self.state = _state_where(emit, state, self.state)
                emitted.append(torch.where(emit, best, none))
                active = emit  # a sample that emitted blank is done with this frame
        if emitted:
            steps = torch.stack(emitted, dim=1).tolist()  # (B, steps)
            for hyp, row in zip(self.tokens, steps, strict=True):
                hyp.extend(k for k in row if k >= 0)

    def hypotheses(self) -> list[list[int]]:
        """Tokens emitted so far, per sample (copies)."""
        return [list(h) for h in self.tokens]


def greedy_decode(model: nn.Module, enc: Tensor, enc_lengths: Tensor, max_symbols_per_frame: int | None = None, *,
                  adapters: Sequence[str | None] | None = None) -> list[list[int]]:
    """Batched transducer greedy search.

    ``enc (B,T,E)`` encoder output of either pass, ``enc_lengths (B,)`` valid frames per sample. Per frame,
    up to ``max_symbols_per_frame`` non-blank arg-max symbols are emitted (the predictor advances only on an
    emission); None: the model's own ``max_symbols_per_step`` (a Parakeet folder's config) or 5. A token-and-duration
    model (``model.durations``, Parakeet TDT) decodes with :func:`tdt_greedy_decode`. ``adapters``: one adapter name
    (or None) per sample for the decoder's adapter points (``predictor_out``, ``joiner_in``), routed per sample.
    Returns token ids (blank excluded) per sample.
    """
    _check_encoder_output(enc, enc_lengths, "greedy_decode")
    if getattr(model, "durations", None):
        return tdt_greedy_decode(model, enc, enc_lengths, adapters=adapters)
    with _routed(model, adapters):
        dec = GreedyDecoder(model, enc.shape[0], max_symbols_per_frame=max_symbols_limit(model, max_symbols_per_frame),
                            device=enc.device)
        dec.advance(enc, enc_lengths)
    return dec.hypotheses()


def max_symbols_limit(model: nn.Module, max_symbols_per_frame: int | None) -> int:
    """``max_symbols_per_frame``, or (None) the model's own ``max_symbols_per_step``, or 5."""
    return max_symbols_per_frame if max_symbols_per_frame is not None else int(getattr(model, "max_symbols_per_step", 5))


@torch.no_grad()
def tdt_greedy_decode(model: nn.Module, enc: Tensor, enc_lengths: Tensor, *,
                      adapters: Sequence[str | None] | None = None) -> list[list[int]]:
    """Token-and-duration transducer greedy search, as transformers' ``generate`` for ``ParakeetForTDT``: per step the
    arg-max token and duration (``model.joint_logits``: token logits, then one per ``model.durations``); the frame
    pointer advances by the duration (a blank's by at least 1), the predictor on a non-blank token. At most
    ``model.max_symbols_per_step`` x frames steps per utterance. One utterance at a time, each through its own
    ``adapters[b]`` (None: the base)."""
    if adapters is not None and len(adapters) != enc.shape[0]:
        raise ValueError(f"tdt_greedy_decode: adapters has {len(adapters)} entries for a batch of {enc.shape[0]}")
    hyps: list[list[int]] = []
    for b in range(enc.shape[0]):
        with _routed(model, None if adapters is None else [adapters[b]]):
            hyps.append(_tdt_one(model, enc[b : b + 1], int(enc_lengths[b])))
    return hyps


def _tdt_one(model: nn.Module, enc: Tensor, n: int) -> list[int]:
    """:func:`tdt_greedy_decode` of one utterance ``enc (1, T, E)`` with ``n`` valid frames."""
    pred, state = model.predict(torch.full((1, 1), model.blank, dtype=torch.long, device=enc.device))
    t, out, steps = 0, [], 0
    while t < n and steps < model.max_symbols_per_step * n:
        logits = model.joint_logits(enc[:, t : t + 1], pred)[0, 0, 0]
        token = int(logits[: model.vocab_size].argmax())
        duration = model.durations[int(logits[model.vocab_size:].argmax())]
        if token == model.blank:
            duration = max(duration, 1)
        else:
            out.append(token)
            pred, state = model.predict(torch.tensor([[token]], device=enc.device), state)
        t += duration
        steps += 1
    return out


# -- beam search -------------------------------------------------------------------------------------------
@dataclass
class Hypothesis:
    """One beam-search result: ``tokens`` (blank excluded) and ``score`` = log-probability of the token
    sequence summed over the alignments the search merged (a lower bound of its probability in the lattice)."""

    tokens: list[int]
    score: float


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


@torch.no_grad()
def _beam_one(model: nn.Module, enc: Tensor, beam: int, max_symbols: int, nbest: int,
              adapter: str | None, route: bool) -> list[Hypothesis]:
    """Modified beam search on one utterance ``enc (T,E)``."""
    blank = int(getattr(model, "blank", 0))
    device = enc.device

    def predict(tokens: Tensor, state):
        with _routed(model, [adapter] * tokens.shape[0] if route else None):
            return model.predict(tokens.view(-1, 1), state)

    def logprobs(frame: Tensor, pred: Tensor) -> Tensor:  # frame (1,1,E), pred (K,1,P) -> (K,V)
        k = pred.shape[0]
        with _routed(model, [adapter] * k if route else None):
            logits = model.joint(frame.expand(k, 1, frame.shape[-1]), pred)[:, 0, 0]
        return F.log_softmax(logits.float(), dim=-1)

    # the beam at a frame boundary: token sequences, scores, predictor outputs (K,1,P) and states
    start_pred, start_state = predict(torch.tensor([blank], device=device), None)
    seqs: list[tuple[int, ...]] = [()]
    scores: list[float] = [0.0]
    pred, state = start_pred, start_state
    for t in range(enc.shape[0]):
        frame = enc[t].view(1, 1, -1)
        # hypotheses that finished frame t: seq -> [score, source, token]; source indexes `opened`
        done: dict[tuple[int, ...], list] = {}
        opened = [(seqs, scores, pred, state)]  # expansion rounds of this frame
        for v in range(max_symbols):
            r_seqs, r_scores, r_pred, r_state = opened[v]
            lp = logprobs(frame, r_pred)  # (K,V)
            for i, (s, lp_blank) in enumerate(zip(r_seqs, lp[:, blank].tolist(), strict=True)):
                sc = r_scores[i] + lp_blank  # blank: the hypothesis moves to frame t+1 unchanged
                if s in done:
                    done[s][0] = _logaddexp(done[s][0], sc)
                else:
                    done[s] = [sc, (v, i), None]
            ext = torch.tensor(r_scores, device=lp.device).unsqueeze(1) + lp  # (K,V)
            ext[:, blank] = -math.inf
            top = ext.flatten().topk(min(beam, ext.numel() - ext.shape[0]))
            v_size = lp.shape[1]
            cands = [(sc, j // v_size, j % v_size) for sc, j in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
            if len(done) >= beam:  # a symbol only lowers a score: drop expansions below the beam's worst finished one
                floor = sorted((info[0] for info in done.values()), reverse=True)[beam - 1]
                cands = [c for c in cands if c[0] > floor]
                if not cands:
                    break
            if v == max_symbols - 1:  # the last symbol of a frame moves on to the next frame
                for sc, i, k in cands:
                    s = r_seqs[i] + (k,)
                    if s in done:
                        done[s][0] = _logaddexp(done[s][0], sc)
                    else:
                        done[s] = [sc, (v, i), k]
                break
            # symbols that stay on frame t: one more expansion round
            parents = torch.tensor([i for _, i, _ in cands], dtype=torch.long, device=device)
            toks = torch.tensor([k for _, _, k in cands], dtype=torch.long, device=device)
            n_pred, n_state = predict(toks, _state_select(r_state, parents))
            opened.append(([r_seqs[i] + (k,) for _, i, k in cands], [sc for sc, _, _ in cands], n_pred, n_state))
        kept = sorted(done.items(), key=lambda kv: kv[1][0], reverse=True)[:beam]
        # predictor outputs of the kept hypotheses: reuse the source round's, one predictor call for new tokens
        preds, states, new_idx, new_parent, new_tok = [], [], [], [], []
        for j, (_s, (_, (v, i), k)) in enumerate(kept):
            _, _, r_pred, r_state = opened[v]
            if k is None:
                preds.append(r_pred[i : i + 1])
                states.append(_state_select(r_state, torch.tensor([i], device=device)))
            else:
                preds.append(None)
                states.append(None)
                new_idx.append(j)
                new_parent.append(_state_select(r_state, torch.tensor([i], device=device)))
                new_tok.append(k)
        if new_idx:
            n_pred, n_state = predict(torch.tensor(new_tok, dtype=torch.long, device=device), _state_cat(new_parent))
            for m, j in enumerate(new_idx):
                preds[j] = n_pred[m : m + 1]
                states[j] = _state_select(n_state, torch.tensor([m], device=device))
        seqs = [s for s, _ in kept]
        scores = [info[0] for _, info in kept]
        pred, state = torch.cat(preds), _state_cat(states)
    order = sorted(range(len(seqs)), key=lambda j: scores[j], reverse=True)[:nbest]
    return [Hypothesis(list(seqs[j]), scores[j]) for j in order]


def beam_search_nbest(model: nn.Module, enc: Tensor, enc_lengths: Tensor, beam: int = 4, *, nbest: int | None = None,
                      max_symbols_per_frame: int = 5, adapters: Sequence[str | None] | None = None) -> list[list[Hypothesis]]:
    """Modified beam search (see the module docstring); per sample the ``nbest`` (default ``beam``) best
    hypotheses, best first. ``enc (B,T,E)``, ``enc_lengths (B,)``. ``adapters``: one adapter name (or None)
    per sample, routed for that sample's hypotheses."""
    _check_encoder_output(enc, enc_lengths, "beam_search")
    if getattr(model, "durations", None):
        raise ValueError("beam_search: this is a token-and-duration (TDT) model; decode it greedily (decode='greedy')")
    if beam < 1:
        raise ValueError(f"beam_search: beam must be >= 1, got {beam}")
    if max_symbols_per_frame < 1:
        raise ValueError(f"beam_search: max_symbols_per_frame must be >= 1, got {max_symbols_per_frame}")
    if adapters is not None and len(adapters) != enc.shape[0]:
        raise ValueError(f"beam_search: adapters has {len(adapters)} entries for a batch of {enc.shape[0]}")
    lengths = enc_lengths.tolist()
    return [_beam_one(model, enc[b, : lengths[b]], beam, max_symbols_per_frame, nbest or beam,
                      adapters[b] if adapters is not None else None, adapters is not None)
            for b in range(enc.shape[0])]


def beam_search(model: nn.Module, enc: Tensor, enc_lengths: Tensor, beam: int = 4, *, max_symbols_per_frame: int = 5,
                adapters: Sequence[str | None] | None = None) -> list[list[int]]:
    """Modified transducer beam search; the best token sequence per sample. ``enc (B,T,E)``, ``enc_lengths (B,)``."""
    hyps = beam_search_nbest(model, enc, enc_lengths, beam, nbest=1, max_symbols_per_frame=max_symbols_per_frame,
                             adapters=adapters)
    return [h[0].tokens for h in hyps]


# -- scoring -----------------------------------------------------------------------------------------------
def _capped_forward(lp_blank: Tensor, lp_emit: Tensor, n: int) -> Tensor:
    """log P(y) over the lattice capped at ``n`` symbols per frame (forward algorithm).

    ``lp_blank (T,U+1)``: log-prob of blank at frame t after u tokens; ``lp_emit (T,U)``: of token u+1 there."""
    t_len, u1 = lp_blank.shape
    neg = torch.full((1,), -math.inf, dtype=lp_blank.dtype)
    alpha = torch.cat([torch.zeros(1, dtype=lp_blank.dtype), neg.expand(u1 - 1)])  # (U+1,): frame start, u tokens
    for t in range(t_len):
        within = [alpha]  # within[k][u]: k symbols emitted on frame t, u tokens in all
        for _ in range(n):
            prev = within[-1]
            within.append(torch.cat([neg, prev[:-1] + lp_emit[t]]))
        ends = torch.stack([w + lp_blank[t] for w in within[:n]] + [within[n]])  # blank after k < n, or the n-th symbol
        alpha = torch.logsumexp(ends, dim=0)
    return alpha[-1]


@torch.no_grad()
def log_likelihood(model: nn.Module, enc: Tensor, enc_lengths: Tensor, hyps: Sequence[Sequence[int]], *,
                   max_symbols_per_frame: int | None = None) -> Tensor:
    """``log P(y | x)`` of each hypothesis under the model, summed over all its alignments. ``enc (B,T,E)`` -> ``(B,)``.

    ``max_symbols_per_frame=None``: the standard transducer lattice (``torchaudio.functional.rnnt_loss``);
    an int ``N``: the lattice the decoders here search (at most ``N`` symbols per frame, the ``N``-th moves on).
    Used to compare decoders and to rescore first-pass hypotheses with the second pass."""
    _check_encoder_output(enc, enc_lengths, "log_likelihood")
    b = enc.shape[0]
    if len(hyps) != b:
        raise ValueError(f"log_likelihood: {len(hyps)} hypotheses for a batch of {b}")
    blank = int(getattr(model, "blank", 0))
    u = max(1, max((len(h) for h in hyps), default=0))
    targets = torch.zeros(b, u, dtype=torch.long, device=enc.device)
    for i, h in enumerate(hyps):
        targets[i, : len(h)] = torch.tensor(list(h), dtype=torch.long)
    target_lengths = torch.tensor([len(h) for h in hyps], dtype=torch.long, device=enc.device)
    start = torch.full((b, 1), blank, dtype=torch.long, device=enc.device)
    pred, _ = model.predict(torch.cat([start, targets], dim=1), None)  # (B,U+1,P)
    logits = model.joint(enc, pred).float()  # (B,T,U+1,V)
    if max_symbols_per_frame is None:
        from torchaudio.functional import rnnt_loss

        return -rnnt_loss(logits, targets.int(), enc_lengths.to(enc.device, torch.int32), target_lengths.int(), blank=blank,
                          reduction="none")
    logp = F.log_softmax(logits, dim=-1).cpu()
    out = []
    for i in range(b):
        t_i, u_i = int(enc_lengths[i]), int(target_lengths[i])
        lp_i = logp[i, :t_i, : u_i + 1]
        emit = lp_i[:, :u_i].gather(-1, targets[i, :u_i].cpu().view(1, u_i, 1).expand(t_i, u_i, 1))[..., 0]
        out.append(_capped_forward(lp_i[..., blank], emit, max_symbols_per_frame))
    return torch.stack(out).to(enc.device)


# -- offline transcription ------------------------------------------------------------------------------------
def _pad(waves: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([w.shape[0] for w in waves], dtype=torch.long)
    out = torch.zeros(len(waves), int(lengths.max()), dtype=torch.float32)
    for i, w in enumerate(waves):
        out[i, : w.shape[0]] = w
    return out.to(device), lengths.to(device)


def _decode_tokens(model: nn.Module, enc: Tensor, enc_lengths: Tensor, decode: str, *, beam: int, max_symbols_per_frame: int | None,
                   adapters: Sequence[str | None] | None) -> list[list[int]]:
    if decode == "greedy":
        return greedy_decode(model, enc, enc_lengths, max_symbols_per_frame, adapters=adapters)
    return beam_search(model, enc, enc_lengths, beam, max_symbols_per_frame=max_symbols_limit(model, max_symbols_per_frame),
                       adapters=adapters)


def transcribe(bundle: Any, waves: Sequence[Tensor], *, decode: str = "greedy", pass_: str = "second", batch_size: int = 16,
               beam: int = 4, max_symbols_per_frame: int | None = None, adapters: Sequence[str | None] | None = None) -> list[str]:
    """Transcribe 16 kHz waveforms (1-D float tensors) offline; one text per wave, in the input order.

    ``bundle``: an :class:`~mmadapters.speech.model.AsrBundle` (``.model``, ``.tokenizer``). Waves are sorted
    by length and padded into batches of ``batch_size``; ``pass_`` picks the encoder ("first": causal,
    "second": the full cascade); ``decode``: "greedy" or "beam" (``beam`` hypotheses); both decoders emit at most
    ``max_symbols_per_frame`` symbols per frame (None: the model's own limit, see :func:`greedy_decode`).
    ``adapters``: one adapter name (or None for the base) per wave, routed per sample.
    """
    if decode not in ("greedy", "beam"):
        raise ValueError(f"transcribe: decode must be 'greedy' or 'beam', got {decode!r}")
    if pass_ not in ("first", "second"):
        raise ValueError(f"transcribe: pass_ must be 'first' or 'second', got {pass_!r}")
    if batch_size < 1:
        raise ValueError(f"transcribe: batch_size must be >= 1, got {batch_size}")
    if adapters is not None and len(adapters) != len(waves):
        raise ValueError(f"transcribe: adapters has {len(adapters)} entries for {len(waves)} waves")
    for i, w in enumerate(waves):
        if not isinstance(w, Tensor) or w.dim() != 1 or w.shape[0] == 0:
            raise ValueError(f"transcribe: waves[{i}] must be a non-empty 1-D tensor (samples at 16 kHz), "
                             f"got {type(w).__name__} {tuple(getattr(w, 'shape', ()))}")
    model, tokenizer = bundle.model, bundle.tokenizer
    device = next(model.parameters()).device
    order = sorted(range(len(waves)), key=lambda i: waves[i].shape[0], reverse=True)
    texts: list[str] = [""] * len(waves)
    with torch.no_grad(), _eval_mode(model):
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            x, lengths = _pad([waves[i].float() for i in idx], device)
            names = [adapters[i] for i in idx] if adapters is not None else None
            with _routed(model, names):
                enc, enc_lengths = model.encode(x, lengths, pass_=pass_)
            hyps = _decode_tokens(model, enc, enc_lengths, decode, beam=beam, max_symbols_per_frame=max_symbols_per_frame,
                                  adapters=names)
            for i, h in zip(idx, hyps, strict=True):
                texts[i] = tokenizer.decode(h)
    return texts


# -- streaming -----------------------------------------------------------------------------------------------
@dataclass
class StreamingStats:
    """What one streamed utterance (batch) cost.

    ``audio_seconds``: audio pushed per stream; ``first_pass_seconds``: wall time spent in :meth:`push` and in
    the first-pass part of :meth:`finish`; ``second_pass_seconds``: the end-of-utterance redecoding.
    ``first_partial_audio_seconds[b]``: audio pushed when stream ``b`` first produced a non-empty partial;
    ``first_partial_wall_seconds[b]``: wall time from the start of the first push until that partial was
    returned (None: never produced one before :meth:`finish`).
    """

    audio_seconds: float = 0.0
    first_pass_seconds: float = 0.0
    second_pass_seconds: float = 0.0
    chunks: int = 0
    first_partial_audio_seconds: list[float | None] = field(default_factory=list)
    first_partial_wall_seconds: list[float | None] = field(default_factory=list)

    @property
    def compute_seconds(self) -> float:
        return self.first_pass_seconds + self.second_pass_seconds

    @property
    def rtf(self) -> float:
        """Real-time factor of the streaming first pass: compute seconds / audio seconds."""
        return self.first_pass_seconds / self.audio_seconds if self.audio_seconds else math.nan

    @property
    def rtf_total(self) -> float:
        """Real-time factor including the second pass."""
        return self.compute_seconds / self.audio_seconds if self.audio_seconds else math.nan


class StreamingTranscriber:
    """Streaming recognition of ``batch_size`` parallel streams (all receiving chunks of the same length).

    ::

        st = StreamingTranscriber(load_asr())
        for chunk in chunks:            # (s,) for batch_size 1, else (B, s); 16 kHz
            partials = st.push(chunk)   # texts so far, from the first (causal) pass
        finals = st.finish()            # second-pass redecoding of the whole utterance
        st.first_pass_texts, st.stats   # first-pass final texts; latency and compute

    The first pass runs the causal encoder's stream (``model.stream``) and greedy search on its new frames,
    with the predictor output/state and the tokens carried from chunk to chunk, so its final text equals
    offline greedy on ``model.encode(..., pass_="first")`` whatever the chunking. At :meth:`finish` the
    first-pass frames of the whole utterance (kept as they came) go through the second, non-causal encoder
    (``model.second``, as the cascade does offline: the result equals ``model.encode(..., pass_="second")``)
    and are decoded again (``second_pass``: "greedy", "beam", or None to keep the first-pass text). After :meth:`finish` the
    transcriber is ready for the next utterance; :meth:`reset` abandons the current one.
    """

    def __init__(self, bundle: Any, batch_size: int = 1, *, max_symbols_per_frame: int | None = None, second_pass: str | None = "greedy",
                 beam: int = 4, adapters: Sequence[str | None] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"StreamingTranscriber: batch_size must be >= 1, got {batch_size}")
        if second_pass not in ("greedy", "beam", None):
            raise ValueError(f"StreamingTranscriber: second_pass must be 'greedy', 'beam' or None, got {second_pass!r}")
        if adapters is not None and len(adapters) != batch_size:
            raise ValueError(f"StreamingTranscriber: adapters has {len(adapters)} entries for batch_size {batch_size}")
        self.model, self.tokenizer = bundle.model, bundle.tokenizer
        self.batch_size = batch_size
        self.max_symbols_per_frame = max_symbols_limit(self.model, max_symbols_per_frame)  # None: the model's own
        self.second_pass = second_pass
        self.beam = beam
        self.adapters = list(adapters) if adapters is not None else None
        self.device = next(self.model.parameters()).device
        self.first_pass_texts: list[str] = []
        self.final_texts: list[str] = []
        self.reset()

    def reset(self) -> None:
        """Start a new utterance (drops what was pushed)."""
        with torch.no_grad(), _eval_mode(self.model), _routed(self.model, self.adapters):
            self._stream = self.model.stream(self.batch_size)
            self._decoder = GreedyDecoder(self.model, self.batch_size, max_symbols_per_frame=self.max_symbols_per_frame,
                                          device=self.device)
        self._frames: list[Tensor] = []
        self._t0: float | None = None
        self.partial_texts: list[str] = [""] * self.batch_size
        self._decoded_lengths = [0] * self.batch_size
        self.stats = StreamingStats(first_partial_audio_seconds=[None] * self.batch_size,
                                    first_partial_wall_seconds=[None] * self.batch_size)

    def _decode_frames(self, frames: Tensor) -> list[str]:
        if frames.shape[1]:
            self._frames.append(frames)
            self._decoder.advance(frames)
        for b, h in enumerate(self._decoder.tokens):  # detokenize only the streams that got new tokens
            if len(h) != self._decoded_lengths[b]:
                self.partial_texts[b] = self.tokenizer.decode(h)
                self._decoded_lengths[b] = len(h)
        return list(self.partial_texts)

    def push(self, wave_chunk: Tensor) -> list[str]:
        """Feed the next chunk — ``(s,)`` (batch_size 1) or ``(B, s)`` samples at 16 kHz — and return the
        partial texts of the first pass."""
        chunk = wave_chunk.unsqueeze(0) if wave_chunk.dim() == 1 and self.batch_size == 1 else wave_chunk
        if chunk.dim() != 2 or chunk.shape[0] != self.batch_size:
            raise ValueError(f"StreamingTranscriber.push: wave_chunk must be ({self.batch_size}, samples)"
                             f"{' or (samples,)' if self.batch_size == 1 else ''}, got shape {tuple(wave_chunk.shape)}")
        start = time.perf_counter()
        if self._t0 is None:
            self._t0 = start
        chunk = chunk.to(self.device, torch.float32)
        with torch.no_grad(), _eval_mode(self.model), _routed(self.model, self.adapters):
            frames = self._stream.push(chunk)
            texts = self._decode_frames(frames)
        now = time.perf_counter()
        st = self.stats
        st.first_pass_seconds += now - start
        st.audio_seconds += chunk.shape[1] / SAMPLE_RATE
        st.chunks += 1
        for b, text in enumerate(texts):
            if text and st.first_partial_audio_seconds[b] is None:
                st.first_partial_audio_seconds[b] = st.audio_seconds
                st.first_partial_wall_seconds[b] = now - self._t0
        return texts

    def finish(self) -> list[str]:
        """End of utterance: flush the first pass (final first-pass texts in :attr:`first_pass_texts`), redecode
        the whole utterance with the second pass (final texts also in :attr:`final_texts`), return the final
        texts and start a new utterance (:attr:`stats` keep the finished one's)."""
        start = time.perf_counter()
        with torch.no_grad(), _eval_mode(self.model), _routed(self.model, self.adapters):
            frames = self._stream.flush()
            self.first_pass_texts = self._decode_frames(frames)
        mid = time.perf_counter()
        if self.second_pass is None or not self._frames:
            finals = list(self.first_pass_texts)
        else:
            first = torch.cat(self._frames, dim=1)  # (B,T,E) == model.encode(waves, lengths, "first")
            lengths = torch.full((self.batch_size,), first.shape[1], dtype=torch.long, device=self.device)
            with torch.no_grad(), _eval_mode(self.model):
                with _routed(self.model, self.adapters):
                    enc, enc_lengths = self.model.second(first, lengths)
                hyps = _decode_tokens(self.model, enc, enc_lengths, self.second_pass, beam=self.beam,
                                      max_symbols_per_frame=self.max_symbols_per_frame, adapters=self.adapters)
            finals = [self.tokenizer.decode(h) for h in hyps]
        end = time.perf_counter()
        stats = self.stats
        stats.first_pass_seconds += mid - start
        stats.second_pass_seconds += end - mid
        first = self.first_pass_texts
        self.reset()
        self.stats, self.first_pass_texts, self.final_texts = stats, first, finals
        return finals
