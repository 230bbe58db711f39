"""NeMo cache-aware streaming FastConformer transducers (``.nemo`` files) as an ASR backbone of this library.

``load_asr("model.nemo")`` hands a ``.nemo`` file (the kind of stt_en_fastconformer_hybrid_large_streaming_multi) to
:func:`load_nemo`: the file is read safely and its config checked (:mod:`.nemo_archive`), the model is rebuilt here,
NeMo's modules in NeMo's order under this library's names, NeMo's weights are renamed to ours
(:func:`load_nemo_state`), and the result is proven against NeMo 3.0.0 itself (scripts/make_nemo_fixtures.py,
tests/test_nemo.py):

::

    waves (B, S) ─ NemoMelFrontend ─► (B, F, n_mels) ─ FastConformerEncoder ─► enc (B, T, D) ─┐
    tokens (B, U) ─ Predictor (embedding + LSTM) ─► pred (B, U, P) ─────────────── Joiner ◄──┘ ─► (B, T, U, V)

- :class:`~mmadapters.speech.nemo_features.NemoMelFrontend` (:mod:`.nemo_features`) — NeMo's
  ``AudioToMelSpectrogramPreprocessor``;
- :class:`~mmadapters.speech.fastconformer.FastConformerEncoder` (:mod:`.fastconformer`) — NeMo's
  ``ConformerEncoder`` as cache-aware streaming models configure it, with its streaming caches and chunking;
- the transducer (here): NeMo's ``RNNTDecoder`` (embedding + LSTM, this library's
  :class:`~mmadapters.speech.model.Predictor`) and ``RNNTJoint`` (this library's
  :class:`~mmadapters.speech.model.Joiner` with ReLU, tanh or sigmoid); the blank is the last id.

Streaming is NeMo's cache-aware streaming: :meth:`NemoTransducer.stream_step` is NeMo's
``encoder.cache_aware_stream_step`` and :func:`~mmadapters.speech.fastconformer.feature_chunks` cuts features into
chunks as NeMo's ``CacheAwareStreamingAudioBuffer`` does; :meth:`NemoTransducer.stream` streams waves chunk by chunk
(features computed as audio arrives, :class:`NemoStream`) for :class:`~mmadapters.speech.decode.StreamingTranscriber`.
There is one pass: ``pass_`` is accepted and ignored, and :meth:`NemoTransducer.second` returns the streamed frames
as they are.

A hybrid RNN-T + CTC model (``EncDecHybridRNNTCTCModel`` / ``...BPEModel``) loads its RNN-T branch; the CTC decoder's
weights are left out.

Adapter points (:func:`declare_nemo_points`): ``attn_out``, ``ffn_out``, ``block_out`` on every encoder block
(self-attention output, second feed-forward output before its 1/2 scaling, block output; (B, T, D)), ``attn`` (LoRA on
the q/k/v/out projections), ``predictor_out`` (the LSTM output) and ``joiner_in`` (the joint's two input projections).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mmadapters as mma

from .fastconformer import FastConformerEncoder, NemoStreamState, feature_chunks
from .model import Joiner, Predictor
from .nemo_archive import (
    WEIGHTS_MEMBER,
    NemoCharTokenizer,
    NemoSentencePieceTokenizer,
    NemoSettings,
    nemo_settings,
    nemo_tokenizer,
    read_nemo,
)
from .nemo_features import NemoMelFrontend


# -- transducer -------------------------------------------------------------------------------------------------
class NemoStream:
    """Streaming of ``B`` synchronous waves through :meth:`NemoTransducer.stream_step` (for
    :class:`~mmadapters.speech.decode.StreamingTranscriber`): ``push(wave_chunk (B, s)) -> (B, t, D)`` frames that
    became final, ``flush() -> (B, r, D)`` the rest. Features are computed as audio arrives (a feature frame is final
    once every sample its window reads is in) and cut into chunks by :func:`feature_chunks` as soon as a chunk is
    complete, so the frames equal NeMo's cache-aware streaming of the whole waves. Needs a frontend without utterance
    normalization (``normalize: NA``, as NeMo's streaming models)."""

    def __init__(self, model: NemoTransducer, batch_size: int):
        frontend = model.frontend
        if frontend.settings.normalize is not None:
            raise ValueError(f"NemoTransducer.stream: the frontend normalizes each utterance ({frontend.settings.normalize!r}); "
                             "stream the features of whole utterances with NemoTransducer.stream_features instead")
        if batch_size < 1:
            raise ValueError(f"NemoTransducer.stream: expected a positive number of streams, got {batch_size}")
        self.model, self.batch_size = model, batch_size
        self.device = frontend.window.device
        self.waves = torch.zeros(batch_size, 0, device=self.device)
        self.feats = torch.zeros(batch_size, 0, frontend.settings.n_mels, device=self.device)
        self.cfg = model.encoder.streaming_settings()
        self.state = model.encoder.initial_state(batch_size, self.device)
        self.chunks_done, self.finished = 0, False

    def _features(self, final: bool) -> None:
        """Append the feature frames that became final (all of them, and NeMo's one padding frame, when ``final``)."""
        fe, s = self.model.frontend, self.model.frontend.settings
        n, pad, hop = self.waves.shape[1], self.model.frontend.pad_amount, s.hop_length
        valid = max(0, (n + 2 * pad - s.n_fft) // hop)
        ready = valid if final else min(valid, max(0, (n + pad - s.n_fft) // hop + 1))
        have = self.feats.shape[1]
        if ready > have:
            lengths = torch.full((self.batch_size,), n, dtype=torch.long, device=self.device)
            x = fe.preemphasis(self.waves, lengths)
            lo, hi = have * hop - pad, (ready - 1) * hop - pad + s.n_fft  # the samples frames have..ready-1 read
            seg = F.pad(x[:, max(0, lo) : min(n, hi)], (max(0, -lo), max(0, hi - n)))
            self.feats = torch.cat([self.feats, fe.log_mel(seg).transpose(1, 2)], dim=1)
        if final:  # NeMo's STFT yields one frame more than the valid ones (padding), and its buffer counts it
            self.feats = torch.cat([self.feats, self.feats.new_full((self.batch_size, 1, s.n_mels), s.pad_value)], dim=1)

    def _run(self, final: bool) -> Tensor:
        total = self.feats.shape[1]
        lengths = torch.full((self.batch_size,), total, dtype=torch.long, device=self.device)
        out = []
        for k, piece in enumerate(feature_chunks(self.feats, lengths, self.cfg)):
            if k < self.chunks_done:
                continue
            complete = piece.features.shape[1] == (self.cfg.chunk_size[0] if k == 0 else
                                                   self.cfg.pre_encode_cache_size[1] + self.cfg.chunk_size[1])
            if not final and not complete:
                break
            enc, enc_lengths, self.state = self.model.encoder.stream_step(
                piece.features, piece.lengths, self.state, keep_all_outputs=final and piece.keep_all_outputs,
                drop_extra_pre_encoded=piece.drop_extra_pre_encoded)
            out.append(enc[:, : int(enc_lengths.max())])
            self.chunks_done = k + 1
        if not out:
            return self.feats.new_zeros(self.batch_size, 0, self.model.encoder.settings.d_model)
        return torch.cat(out, dim=1)

    def push(self, wave_chunk: Tensor) -> Tensor:
        if self.finished:
            raise RuntimeError("NemoStream.push: the stream was flushed; start a new one with model.stream()")
        if wave_chunk.dim() == 1 and self.batch_size == 1:
            wave_chunk = wave_chunk[None]
        self.waves = torch.cat([self.waves, wave_chunk.detach().to(self.device, torch.float32)], dim=1)
        self._features(final=False)
        return self._run(final=False)

    def flush(self) -> Tensor:
        if self.finished:
            raise RuntimeError("NemoStream.flush: the stream was already flushed")
        self.finished = True
        self._features(final=True)
        return self._run(final=True)


class NemoTransducer(nn.Module):
    """A NeMo cache-aware streaming FastConformer transducer (see the module docstring); ``blank`` is the last id."""

    def __init__(self, settings: NemoSettings):
        super().__init__()
        self.settings = settings
        s = settings
        self.frontend = NemoMelFrontend(s.frontend)
        self.encoder = FastConformerEncoder(s.encoder)
        self.predictor = Predictor(s.num_classes + 1, s.pred_hidden, s.pred_hidden, s.pred_layers, 0.0)
        self.joint_net = Joiner(s.encoder.d_model, s.pred_hidden, s.joint_hidden, s.num_classes + 1, s.joint_activation)
        self.blank = s.num_classes
        self.vocab_size = s.num_classes + 1
        self.max_symbols_per_step = s.max_symbols_per_step

    @property
    def sampling_rate(self) -> int:
        return self.settings.frontend.sample_rate

    # -- encoder -------------------------------------------------------------------------------------------------
    def features(self, waves: Tensor, wave_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """NeMo's mel features ``(B, F, n_mels)`` and their lengths (B,)."""
        return self.frontend(waves, wave_lengths)

    def encode(self, waves: Tensor, wave_lengths: Tensor, pass_: str = "second") -> tuple[Tensor, Tensor]:
        """``waves (B, S)``, ``wave_lengths (B,)`` -> ``(enc (B, T, D), enc_lengths (B,))``: the whole utterances with the
        current attention context (one pass; ``pass_`` is ignored)."""
        feats, lengths = self.frontend(waves, wave_lengths)
        return self.encoder(feats, lengths)

    def second(self, enc: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """There is no second pass: the (streamed) frames are returned as they are."""
        return enc, lengths

    def set_att_context_size(self, context: list[int]) -> None:
        """Pick one of a multi-lookahead model's attention contexts (``[left, right]`` encoder frames)."""
        self.encoder.set_att_context_size(context)

    def initial_state(self, batch_size: int = 1) -> NemoStreamState:
        return self.encoder.initial_state(batch_size)

    def stream_step(self, chunk: Tensor, lengths: Tensor, state: NemoStreamState, *, keep_all_outputs: bool = True,
                    drop_extra_pre_encoded: int | None = None) -> tuple[Tensor, Tensor, NemoStreamState]:
        """NeMo's ``cache_aware_stream_step`` (see :meth:`FastConformerEncoder.stream_step`)."""
        return self.encoder.stream_step(chunk, lengths, state, keep_all_outputs=keep_all_outputs,
                                        drop_extra_pre_encoded=drop_extra_pre_encoded)

    def stream_waves(self, waves: Tensor, wave_lengths: Tensor) -> list[tuple[Tensor, Tensor, NemoStreamState]]:
        """Cache-aware streaming of whole waves ``(B, S)`` as NeMo's streaming script runs it (features of the whole
        waves, without ``pad_to``, cut by :func:`feature_chunks`): per chunk, the output of :meth:`stream_step`."""
        feats, _ = self.frontend(waves, wave_lengths)
        counts = self.frontend.stream_lengths(wave_lengths)
        return self.stream_features(feats[:, : int(counts.max())], counts)

    def stream_features(self, feats: Tensor, lengths: Tensor) -> list[tuple[Tensor, Tensor, NemoStreamState]]:
        """Cache-aware streaming of features ``(B, F, n_mels)`` with ``lengths`` as :func:`feature_chunks` takes them:
        per chunk, the output of :meth:`stream_step`."""
        state = self.initial_state(feats.shape[0])
        out = []
        for piece in feature_chunks(feats, lengths, self.encoder.streaming_settings()):
            enc, enc_lengths, state = self.stream_step(piece.features, piece.lengths, state,
                                                       keep_all_outputs=piece.keep_all_outputs,
                                                       drop_extra_pre_encoded=piece.drop_extra_pre_encoded)
            out.append((enc, enc_lengths, state))
        return out

    def stream(self, batch_size: int = 1) -> NemoStream:
        """A wave-level :class:`NemoStream` for ``batch_size`` synchronous streams."""
        return NemoStream(self, batch_size)

    # -- decoder -------------------------------------------------------------------------------------------------
    def predict(self, tokens: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Prediction network: ``tokens (B, U)`` -> ``(B, U, P)`` and the LSTM state; the blank (last id) is the start
        token (its embedding is NeMo's padding row)."""
        return self.predictor(tokens, state)

    def joint(self, enc: Tensor, pred: Tensor) -> Tensor:
        """Joint logits ``(B, T, U, V)`` for ``enc (B, T, D)``, ``pred (B, U, P)`` (other shapes broadcast)."""
        return self.joint_net(enc, pred)

    def forward(self, waves: Tensor, wave_lengths: Tensor, targets: Tensor, target_lengths: Tensor) -> dict[str, Tensor]:
        """RNN-T loss (``torchaudio.functional.rnnt_loss``, blank last, batch mean): ``{"loss"}``."""
        import torchaudio

        enc, lengths = self.encode(waves, wave_lengths)
        enc = enc[:, : int(lengths.max())]  # pad_to may leave frames past the longest (rnnt_loss wants none)
        targets = targets.long()
        start = torch.full((targets.shape[0], 1), self.blank, dtype=torch.long, device=targets.device)
        pred, _ = self.predict(torch.cat([start, targets], dim=1))
        logits = self.joint(enc, pred).float()
        loss = torchaudio.functional.rnnt_loss(logits, targets.int(), lengths.int(), target_lengths.int(), blank=self.blank,
                                               reduction="mean")
        return {"loss": loss}


def declare_nemo_points(model: NemoTransducer) -> NemoTransducer:
    """Adapter points (see the module docstring)."""
    d = model.settings.encoder.d_model
    blocks = "re:encoder\\.layers\\.\\d+"
    mma.declare_adapter_points(model, {
        "attn_out": mma.AdapterPoint(f"{blocks}\\.attn", dim=d, doc="self-attention output (B, T, D)"),
        "ffn_out": mma.AdapterPoint(f"{blocks}\\.ffn2", dim=d, doc="second feed-forward output (B, T, D)"),
        "block_out": mma.AdapterPoint(blocks, dim=d, doc="end of each FastConformer block (B, T, D)"),
        "attn": mma.AdapterPoint([f"{blocks}\\.attn\\.linear_{n}" for n in ("q", "k", "v", "out")],
                                 doc="attention projections (LoRA)"),
        "predictor_out": mma.AdapterPoint("predictor.lstm", dim=model.settings.pred_hidden, doc="LSTM output (B, U, P)"),
        "joiner_in": mma.AdapterPoint(["joint_net.enc_proj", "joint_net.pred_proj"], doc="the joint's input projections"),
    })
    return model


# -- weights ------------------------------------------------------------------------------------------------------
_RENAMES = [
    (r"preprocessor\.featurizer\.(window|fb)$", r"frontend.\1"),
    (r"encoder\.pre_encode\.out\.", "encoder.subsampling.out."),
    (r"encoder\.layers\.(\d+)\.norm_feed_forward([12])\.", r"encoder.layers.\1.ffn\2.norm."),
    (r"encoder\.layers\.(\d+)\.feed_forward([12])\.linear1\.", r"encoder.layers.\1.ffn\2.fc1."),
    (r"encoder\.layers\.(\d+)\.feed_forward([12])\.linear2\.", r"encoder.layers.\1.ffn\2.fc2."),
    (r"encoder\.layers\.(\d+)\.norm_self_att\.", r"encoder.layers.\1.attn_norm."),
    (r"encoder\.layers\.(\d+)\.self_attn\.", r"encoder.layers.\1.attn."),
    (r"encoder\.layers\.(\d+)\.norm_conv\.", r"encoder.layers.\1.conv.norm."),
    (r"encoder\.layers\.(\d+)\.conv\.pointwise_conv1\.", r"encoder.layers.\1.conv.pointwise1."),
    (r"encoder\.layers\.(\d+)\.conv\.pointwise_conv2\.", r"encoder.layers.\1.conv.pointwise2."),
    (r"encoder\.layers\.(\d+)\.conv\.depthwise_conv\.", r"encoder.layers.\1.conv.depthwise."),
    (r"encoder\.layers\.(\d+)\.conv\.batch_norm\.", r"encoder.layers.\1.conv.conv_norm."),
    (r"encoder\.layers\.(\d+)\.norm_out\.", r"encoder.layers.\1.out_norm."),
    (r"decoder\.prediction\.embed\.", "predictor.embedding."),
    (r"decoder\.prediction\.dec_rnn\.lstm\.", "predictor.lstm."),
    (r"joint\.enc\.", "joint_net.enc_proj."),
    (r"joint\.pred\.", "joint_net.pred_proj."),
    (r"joint\.joint_net\.\d+\.", "joint_net.out."),
]
_IGNORED = re.compile(r"ctc_decoder\.")  # a hybrid model's CTC branch


def _our_name(key: str) -> str | None:
    m = re.match(r"encoder\.pre_encode\.conv\.(\d+)\.(.+)$", key)
    if m:  # NeMo's Sequential interleaves activations: conv 0, then (depthwise 3i + 2, pointwise 3i + 3)
        index = int(m.group(1))
        ours = 0 if index == 0 else (2 * ((index - 2) // 3) + 1 + (index - 2) % 3 if (index - 2) % 3 < 2 else None)
        return None if ours is None else f"encoder.subsampling.convs.{ours}.{m.group(2)}"
    for pattern, repl in _RENAMES:
        new, n = re.subn("^" + pattern, repl, key)
        if n:
            return new
    return None


def load_nemo_state(model: NemoTransducer, state: dict[str, Tensor], source: str) -> None:
    """Rename NeMo's parameters to ours and load them; anything missing, unexpected or of another shape raises
    naming ``source``."""
    expected = model.state_dict()
    tensors: dict[str, Tensor] = {}
    unexpected = []
    for key, t in state.items():
        if _IGNORED.match(key):
            continue
        name = _our_name(key)
        if name is None or name not in expected:
            unexpected.append(key)
            continue
        if t.dim() == 3 and expected[name].dim() == 2 and t.shape[-1] == 1:
            t = t[..., 0]  # NeMo's pointwise Conv1d (kernel 1) is our Linear
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}; model_config.yaml needs "
                             f"{tuple(expected[name].shape)}")
        tensors[name] = t
    missing = sorted(set(expected) - set(tensors))
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match model_config.yaml: missing (our names) {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
                         f"{' …' if len(unexpected) > 5 else ''}")
    model.load_state_dict({n: t.to(expected[n].dtype) for n, t in tensors.items()})



# -- loading ------------------------------------------------------------------------------------------------------
@dataclass
class NemoBundle:
    """What :func:`mmadapters.speech.model.load_asr` returns for a ``.nemo`` file (the fields of ``AsrBundle``)."""

    model: NemoTransducer
    tokenizer: NemoCharTokenizer | NemoSentencePieceTokenizer
    config: dict[str, Any]  # model_config.yaml
    path: Path | None = None


def load_nemo(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> NemoBundle:
    """A NeMo cache-aware streaming FastConformer RNN-T (or hybrid RNN-T + CTC: its RNN-T branch) ``.nemo`` file in eval
    mode, float32, with adapter points declared."""
    archive = read_nemo(path)
    settings = nemo_settings(archive.config, archive.path)
    tokenizer = nemo_tokenizer(archive, settings.num_classes)
    model = NemoTransducer(settings)
    load_nemo_state(model, archive.state, f"{archive.path}: {WEIGHTS_MEMBER}")
    declare_nemo_points(model).to(device).eval()
    return NemoBundle(model, tokenizer, archive.config, archive.path)



__all__ = ["NemoBundle", "NemoStream", "NemoTransducer", "declare_nemo_points", "load_nemo",
           "load_nemo_state"]
