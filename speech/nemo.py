"""NeMo cache-aware streaming FastConformer transducers (``.nemo`` files) as an ASR backbone of this library.

``load_asr("model.nemo")`` hands a ``.nemo`` file (the kind of stt_en_fastconformer_hybrid_large_streaming_multi) to
:func:`load_nemo`. The file is a tar of ``model_config.yaml``, ``model_weights.ckpt`` and the tokenizer's files; it is
read in memory (never extracted), the config with ``yaml.safe_load`` and the weights with
``torch.load(weights_only=True)``: nothing else is unpickled. The model is rebuilt here, NeMo's modules in NeMo's
order under this library's names, and proven against NeMo 3.0.0 itself (scripts/make_nemo_fixtures.py,
tests/test_nemo.py):

::

    waves (B, S) ─ NemoMelFrontend ─► (B, F, n_mels) ─ FastConformerEncoder ─► enc (B, T, D) ─┐
    tokens (B, U) ─ Predictor (embedding + LSTM) ─► pred (B, U, P) ───────────── NemoJoint ◄──┘ ─► (B, T, U, V)

- :class:`NemoMelFrontend` — NeMo's ``AudioToMelSpectrogramPreprocessor``: pre-emphasis, a centred zero-padded STFT
  with the file's own window and mel filterbank, log with NeMo's guard, ``per_feature`` / ``all_features`` / no
  normalization, ``pad_to``;
- :class:`FastConformerEncoder` — NeMo's ``ConformerEncoder`` as cache-aware streaming models configure it:
  ``dw_striding`` causal subsampling (x4, x8, ...; padded frames masked before every convolution), input scaled by
  ``sqrt(d_model)`` (xscaling), Transformer-XL relative-position attention with per-head biases ``u`` / ``v``,
  ``chunked_limited`` attention contexts (one or several: :meth:`FastConformerEncoder.set_att_context_size`), a
  causal depthwise convolution with BatchNorm or LayerNorm, macaron feed-forwards;
- the transducer: NeMo's ``RNNTDecoder`` (embedding + LSTM, this library's :class:`~mmadapters.speech.model.Predictor`)
  and ``RNNTJoint`` (ReLU, tanh or sigmoid); the blank is the last id.

Streaming is NeMo's cache-aware streaming: :meth:`NemoTransducer.stream_step` is NeMo's
``encoder.cache_aware_stream_step`` (same chunk in, same frames and next caches out) and :func:`feature_chunks` cuts
features into chunks as NeMo's ``CacheAwareStreamingAudioBuffer`` does; :meth:`NemoTransducer.stream` streams waves
chunk by chunk (features computed as audio arrives) for :class:`~mmadapters.speech.decode.StreamingTranscriber`.
There is one pass: ``pass_`` is accepted and ignored, and :meth:`NemoTransducer.second` returns the streamed frames
as they are.

A hybrid RNN-T + CTC model (``EncDecHybridRNNTCTCModel`` / ``...BPEModel``) loads its RNN-T branch; the CTC decoder's
weights are left out. Character vocabularies (``labels``) and SentencePiece BPE tokenizers (``tokenizer.type: bpe``)
load. What NeMo can configure but this loader does not rebuild (other subsamplings, ``regular`` attention, absolute
positions, CTC-only or TDT models, ...) is refused naming the config field.

Adapter points (:func:`declare_nemo_points`): ``attn_out``, ``ffn_out``, ``block_out`` on every encoder block
(self-attention output, second feed-forward output before its 1/2 scaling, block output; (B, T, D)), ``attn`` (LoRA on
the q/k/v/out projections), ``predictor_out`` (the LSTM output) and ``joiner_in`` (the joint's two input projections).
"""

from __future__ import annotations

import io
import math
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mmadapters as mma

from .conformer import FeedForward, lengths_to_mask
from .model import Predictor

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"
INF_VAL = 10000.0  # NeMo's attention mask fill value and the base of its sinusoidal positions
MAX_CONTEXT = 10000  # NeMo's cache size for an unlimited left context
SAMPLE_RATE = 16000  # what this library's audio loader delivers


# -- the .nemo file ---------------------------------------------------------------------------------------------
@dataclass
class NemoArchive:
    """A ``.nemo`` file read in memory: its ``config`` (model_config.yaml), ``state`` (model_weights.ckpt) and the
    other members' bytes by name (``files``; tokenizer files)."""

    path: Path
    config: dict[str, Any]
    state: dict[str, Tensor]
    files: dict[str, bytes] = field(default_factory=dict)


def _member_name(member: tarfile.TarInfo, path: Path) -> str:
    name = PurePosixPath(member.name)
    parts = [p for p in name.parts if p not in ("", ".")]
    if name.is_absolute() or ".." in parts:
        raise ValueError(f"{path}: unsafe member name {member.name!r} in the .nemo tar (absolute or with '..')")
    return "/".join(parts)


def read_nemo(path: str | os.PathLike) -> NemoArchive:
    """Read ``path`` (a NeMo ``.nemo`` tar) in memory; errors name the file and the member."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: .nemo file not found")
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                name = _member_name(member, path)
                if not member.isfile():
                    continue  # directories; links and devices are never followed (nothing is extracted)
                if "/" in name:
                    continue  # NeMo writes its members at the top level
                handle = tar.extractfile(member)
                if handle is not None:
                    files[name] = handle.read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a .nemo file (a tar archive of {CONFIG_MEMBER} and {WEIGHTS_MEMBER}): {err}") from None
    for needed in (CONFIG_MEMBER, WEIGHTS_MEMBER):
        if needed not in files:
            raise ValueError(f"{path}: the .nemo tar has no {needed} (members: {sorted(files)[:8]})")
    try:
        config = yaml.safe_load(files.pop(CONFIG_MEMBER).decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: {CONFIG_MEMBER} is not valid YAML ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: {CONFIG_MEMBER} must be a mapping of model settings, got {type(config).__name__}")
    try:
        state = torch.load(io.BytesIO(files.pop(WEIGHTS_MEMBER)), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many kinds (pickle, zip, runtime) for a bad file
        raise ValueError(f"{path}: {WEIGHTS_MEMBER} does not load with torch.load(weights_only=True) "
                         f"({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{path}: {WEIGHTS_MEMBER} must hold a state dict (parameter name -> tensor)")
    return NemoArchive(path, config, state, files)


# -- config -----------------------------------------------------------------------------------------------------
class _Fields:
    """Typed reads of model_config.yaml with errors naming the file and the field."""

    def __init__(self, config: dict[str, Any], path: Path):
        self.config, self.where = config, f"{path}: {CONFIG_MEMBER}"

    def error(self, name: str, message: str) -> ValueError:
        return ValueError(f"{self.where}: field '{name}' {message}")

    def get(self, name: str, default: Any = None, *, required: bool = False) -> Any:
        node: Any = self.config
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                if required:
                    raise self.error(name, "is missing")
                return default
            node = node[part]
        return default if node is None and not required else node

    def int(self, name: str, default: int | None = None, *, minimum: int | None = None) -> int:
        value = self.get(name, default, required=default is None)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(name, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be >= {minimum}, got {value}")
        return value

    def number(self, name: str, default: float | None = None) -> float:
        value = self.get(name, default, required=default is None)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.error(name, f"must be a number, got {value!r}")
        return float(value)

    def choice(self, name: str, allowed: tuple, default: Any = None) -> Any:
        value = self.get(name, default)
        if value not in allowed:
            raise self.error(name, f"is {value!r}; this loader rebuilds {' or '.join(repr(a) for a in allowed)}")
        return value


@dataclass
class FrontendSettings:
    """NeMo's ``AudioToMelSpectrogramPreprocessor`` settings (see :class:`NemoMelFrontend`)."""

    sample_rate: int = SAMPLE_RATE
    win_length: int = 400
    hop_length: int = 160
    n_fft: int = 512
    n_mels: int = 80
    preemph: float | None = 0.97
    log: bool = True
    log_zero_guard_type: str = "add"
    log_zero_guard_value: float | str = 2**-24
    normalize: str | None = "per_feature"
    pad_to: int = 16
    pad_value: float = 0.0
    mag_power: float = 2.0
    dither: float = 1e-5
    exact_pad: bool = False


@dataclass
class EncoderSettings:
    """NeMo's ``ConformerEncoder`` settings that this loader rebuilds (see :class:`FastConformerEncoder`)."""

    feat_in: int
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    subsampling_factor: int
    subsampling_channels: int
    att_context_sizes: list[list[int]]
    conv_kernel_size: int
    conv_context: tuple[int, int]
    conv_norm_type: str
    xscaling: bool = True
    dropout: float = 0.0


@dataclass
class NemoSettings:
    """Everything :class:`NemoTransducer` is built from (read from model_config.yaml by :func:`nemo_settings`)."""

    frontend: FrontendSettings
    encoder: EncoderSettings
    num_classes: int  # tokens without the blank
    pred_hidden: int
    pred_layers: int
    joint_hidden: int
    joint_activation: str = "relu"
    max_symbols_per_step: int = 10
    hybrid: bool = False  # a hybrid RNN-T + CTC model (its CTC branch is not loaded)
    model_class: str = ""


def _context_sizes(fields: _Fields) -> list[list[int]]:
    raw = fields.get("encoder.att_context_size")
    if raw is None:
        raise fields.error("encoder.att_context_size", "is missing; a cache-aware streaming model sets it")
    sizes = [raw] if raw and isinstance(raw[0], int) else raw
    out = []
    for cs in sizes:
        if (not isinstance(cs, list) or len(cs) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in cs)
                or cs[0] < -1 or cs[1] < -1):
            raise fields.error("encoder.att_context_size", f"must be [left, right] integers (>= -1) or a list of them, got {raw!r}")
        if cs[0] > 0 and cs[1] >= 0 and cs[0] % (cs[1] + 1):
            raise fields.error("encoder.att_context_size", f"{cs}: the left context must be a multiple of the chunk "
                               f"size (right + 1) for chunked_limited attention")
        if cs[1] < 0 and len(sizes) == 1:
            raise fields.error("encoder.att_context_size", f"{cs}: chunked_limited attention needs a finite right context")
        out.append(list(cs))
    return out


def nemo_settings(config: dict[str, Any], path: Path) -> NemoSettings:
    """Read and check model_config.yaml; what this loader does not rebuild raises naming the field."""
    f = _Fields(config, path)
    decoder_target = str(f.get("decoder._target_", ""))
    if not decoder_target.endswith("RNNTDecoder"):
        raise f.error("decoder._target_", f"is {decoder_target!r}; only transducer models (RNNTDecoder, RNN-T or "
                      "hybrid RNN-T + CTC) load, not CTC-only or other decoders")
    joint_target = str(f.get("joint._target_", ""))
    if not joint_target.endswith("RNNTJoint"):
        raise f.error("joint._target_", f"is {joint_target!r}; expected RNNTJoint")
    if f.get("loss.loss_name", "default") not in ("default", "warprnnt", "warprnnt_numba", "pytorch"):
        raise f.error("loss.loss_name", f"is {f.get('loss.loss_name')!r}: TDT and multi-blank transducers do not load "
                      "here (a plain RNN-T does)")
    if f.get("model_defaults.tdt_durations") or f.get("joint.num_extra_outputs", 0):
        raise f.error("joint.num_extra_outputs", "is set: TDT / multi-blank transducers do not load here")
    pre_target = str(f.get("preprocessor._target_", ""))
    if not pre_target.endswith("AudioToMelSpectrogramPreprocessor"):
        raise f.error("preprocessor._target_", f"is {pre_target!r}; expected AudioToMelSpectrogramPreprocessor")

    # -- frontend
    sr = f.int("preprocessor.sample_rate", SAMPLE_RATE)
    if sr != SAMPLE_RATE:
        raise f.error("preprocessor.sample_rate", f"is {sr}; this library feeds {SAMPLE_RATE} Hz audio")
    win = f.get("preprocessor.n_window_size") or int(f.number("preprocessor.window_size", 0.02) * sr)
    hop = f.get("preprocessor.n_window_stride") or int(f.number("preprocessor.window_stride", 0.01) * sr)
    n_fft = f.get("preprocessor.n_fft") or 2 ** math.ceil(math.log2(win))
    if f.int("preprocessor.frame_splicing", 1) != 1:
        raise f.error("preprocessor.frame_splicing", "must be 1")
    normalize = f.get("preprocessor.normalize", "per_feature")
    if isinstance(normalize, dict):
        raise f.error("preprocessor.normalize", "with fixed_mean / fixed_std is not supported")
    pad_to = f.get("preprocessor.pad_to", 16)
    if not isinstance(pad_to, int) or isinstance(pad_to, bool) or pad_to < 0:
        raise f.error("preprocessor.pad_to", f"must be an integer >= 0 ('max' is not supported), got {pad_to!r}")
    guard_value = f.get("preprocessor.log_zero_guard_value", 2**-24)
    if not (isinstance(guard_value, int | float) or guard_value in ("tiny", "eps")):
        raise f.error("preprocessor.log_zero_guard_value", f"must be a number, 'tiny' or 'eps', got {guard_value!r}")
    preemph = f.get("preprocessor.preemph", 0.97)
    frontend = FrontendSettings(
        sample_rate=sr, win_length=int(win), hop_length=int(hop), n_fft=int(n_fft), n_mels=f.int("preprocessor.features", 64),
        preemph=None if preemph is None else float(preemph), log=bool(f.get("preprocessor.log", True)),
        log_zero_guard_type=f.choice("preprocessor.log_zero_guard_type", ("add", "clamp"), "add"),
        log_zero_guard_value=guard_value, normalize=normalize if normalize in ("per_feature", "all_features") else None,
        pad_to=pad_to, pad_value=f.number("preprocessor.pad_value", 0.0), mag_power=f.number("preprocessor.mag_power", 2.0),
        dither=f.number("preprocessor.dither", 1e-5), exact_pad=bool(f.get("preprocessor.exact_pad", False)))
    if frontend.exact_pad and frontend.hop_length % 2:
        raise f.error("preprocessor.exact_pad", "needs an even hop length")

    # -- encoder
    enc_target = str(f.get("encoder._target_", ""))
    if not enc_target.endswith("ConformerEncoder"):
        raise f.error("encoder._target_", f"is {enc_target!r}; expected ConformerEncoder (FastConformer)")
    f.choice("encoder.subsampling", ("dw_striding",), "striding")
    if f.get("encoder.causal_downsampling", False) is not True:
        raise f.error("encoder.causal_downsampling", "must be true (the cache-aware streaming subsampling)")
    f.choice("encoder.self_attention_model", ("rel_pos",), "rel_pos")
    f.choice("encoder.att_context_style", ("chunked_limited",), "regular")
    conv_norm = f.choice("encoder.conv_norm_type", ("batch_norm", "layer_norm"), "batch_norm")
    f.choice("encoder.conv_context_style", ("regular",), "regular")
    if f.get("encoder.use_bias", True) is not True:
        raise f.error("encoder.use_bias", "must be true")
    if f.get("encoder.untie_biases", True) is not True:
        raise f.error("encoder.untie_biases", "must be true (per-layer relative-position biases)")
    if f.get("encoder.reduction") or f.int("encoder.reduction_factor", 1) > 1:
        raise f.error("encoder.reduction", "is set; time reduction inside the encoder is not supported")
    d_model = f.int("encoder.d_model", minimum=1)
    feat_out = f.int("encoder.feat_out", -1)
    if feat_out > 0 and feat_out != d_model:
        raise f.error("encoder.feat_out", f"is {feat_out}; an output projection is not supported (-1 or d_model)")
    factor = f.int("encoder.subsampling_factor", 4, minimum=2)
    if factor & (factor - 1):
        raise f.error("encoder.subsampling_factor", f"must be a power of 2, got {factor}")
    heads = f.int("encoder.n_heads", 4, minimum=1)
    if d_model % heads:
        raise f.error("encoder.n_heads", f"({heads}) must divide encoder.d_model ({d_model})")
    kernel = f.int("encoder.conv_kernel_size", 31, minimum=1)
    if kernel % 2 == 0:
        raise f.error("encoder.conv_kernel_size", f"must be odd, got {kernel}")
    conv_ctx = f.get("encoder.conv_context_size")
    if conv_ctx is None:
        conv_context = ((kernel - 1) // 2, (kernel - 1) // 2)
    elif conv_ctx == "causal":
        conv_context = (kernel - 1, 0)
    elif isinstance(conv_ctx, list) and len(conv_ctx) == 2 and conv_ctx[0] + conv_ctx[1] + 1 == kernel:
        conv_context = (int(conv_ctx[0]), int(conv_ctx[1]))
    else:
        raise f.error("encoder.conv_context_size", f"must be 'causal' or [left, right] with left + right + 1 = "
                      f"conv_kernel_size ({kernel}), got {conv_ctx!r}")
    channels = f.int("encoder.subsampling_conv_channels", -1)
    expansion = f.number("encoder.ff_expansion_factor", 4)
    encoder = EncoderSettings(
        feat_in=f.int("encoder.feat_in", minimum=1), n_layers=f.int("encoder.n_layers", minimum=1), d_model=d_model,
        n_heads=heads, d_ff=int(d_model * expansion), subsampling_factor=factor,
        subsampling_channels=d_model if channels == -1 else channels, att_context_sizes=_context_sizes(f),
        conv_kernel_size=kernel, conv_context=conv_context, conv_norm_type=conv_norm,
        xscaling=bool(f.get("encoder.xscaling", True)), dropout=f.number("encoder.dropout", 0.0))
    if encoder.feat_in != frontend.n_mels:
        raise f.error("encoder.feat_in", f"({encoder.feat_in}) must equal preprocessor.features ({frontend.n_mels})")

    # -- transducer
    if f.get("decoder.blank_as_pad", True) is not True:
        raise f.error("decoder.blank_as_pad", "must be true (the blank is the prediction network's padding embedding)")
    if f.get("decoder.normalization_mode") is not None:
        raise f.error("decoder.normalization_mode", "must be null (an LSTM without layer normalization)")
    pred_hidden = f.int("decoder.prednet.pred_hidden", minimum=1)
    rnn_hidden = f.int("decoder.prednet.rnn_hidden_size", -1)
    if rnn_hidden > 0 and rnn_hidden != pred_hidden:
        raise f.error("decoder.prednet.rnn_hidden_size", f"({rnn_hidden}) must be -1 or pred_hidden ({pred_hidden})")
    num_classes = f.int("joint.num_classes", minimum=1)
    vocab = f.get("decoder.vocab_size", num_classes)
    if vocab != num_classes:
        raise f.error("decoder.vocab_size", f"({vocab}) must equal joint.num_classes ({num_classes})")
    greedy = f.get("decoding.greedy") or {}
    max_symbols = greedy.get("max_symbols", None) if isinstance(greedy, dict) else None
    if max_symbols is None and isinstance(greedy, dict):
        max_symbols = greedy.get("max_symbols_per_step", None)
    if max_symbols is None:
        max_symbols = 10  # NeMo's default (GreedyRNNTInferConfig.max_symbols_per_step)
    if not isinstance(max_symbols, int) or max_symbols < 1:
        raise f.error("decoding.greedy.max_symbols", f"must be a positive integer, got {max_symbols!r}")
    return NemoSettings(
        frontend=frontend, encoder=encoder, num_classes=num_classes, pred_hidden=pred_hidden,
        pred_layers=f.int("decoder.prednet.pred_rnn_layers", 1, minimum=1),
        joint_hidden=f.int("joint.jointnet.joint_hidden", minimum=1),
        joint_activation=f.choice("joint.jointnet.activation", ("relu", "tanh", "sigmoid"), "relu"),
        max_symbols_per_step=max_symbols, hybrid="aux_ctc" in config, model_class=str(config.get("target", "")))


# -- frontend ---------------------------------------------------------------------------------------------------
class NemoMelFrontend(nn.Module):
    """NeMo's mel frontend (``AudioToMelSpectrogramPreprocessor`` / ``FilterbankFeatures``) with the ``.nemo`` file's
    own ``window`` (symmetric, ``win_length``) and ``fb`` (slaney mel filterbank, (1, n_mels, n_fft // 2 + 1)) buffers.

    ``forward(waves (B, S), lengths (B,)) -> (feats (B, F, n_mels), feat_lengths (B,))``: pre-emphasis (samples past
    a wave's length zeroed), STFT zero-padded by ``n_fft // 2`` on both sides, magnitude to ``mag_power``, mel, log
    with NeMo's zero guard, normalization, frames past ``S // hop`` set to ``pad_value``, ``F`` padded to a multiple
    of ``pad_to``. Dither (NeMo's, training mode only) is added in training mode."""

    def __init__(self, s: FrontendSettings):
        super().__init__()
        self.settings = s
        self.register_buffer("window", torch.hann_window(s.win_length, periodic=False))
        self.register_buffer("fb", torch.zeros(1, s.n_mels, s.n_fft // 2 + 1))

    @property
    def pad_amount(self) -> int:
        s = self.settings
        return (s.n_fft - s.hop_length) // 2 if s.exact_pad else s.n_fft // 2

    def lengths(self, wave_lengths: Tensor) -> Tensor:
        """Valid feature frames per wave: ``(S + 2 * pad - n_fft) // hop`` (0 for an empty wave)."""
        s = self.settings
        n = torch.div(wave_lengths + 2 * self.pad_amount - s.n_fft, s.hop_length, rounding_mode="floor").long()
        return torch.where(wave_lengths == 0, torch.zeros_like(n), n)

    def stream_lengths(self, wave_lengths: Tensor) -> Tensor:
        """Frames of each wave in NeMo's streaming buffer (its ``streams_length``): the STFT frames, one more than
        :meth:`lengths` (the last is padding)."""
        return self.lengths(wave_lengths) + 1

    def preemphasis(self, waves: Tensor, lengths: Tensor) -> Tensor:
        """(B, S) -> (B, S): ``x[t] - preemph * x[t - 1]`` (the first sample kept), zero past each length."""
        p = self.settings.preemph
        if p is None:
            return waves
        x = torch.cat([waves[:, :1], waves[:, 1:] - p * waves[:, :-1]], dim=1)
        return x.masked_fill(~lengths_to_mask(lengths, x.shape[1]), 0.0)

    def log_mel(self, padded: Tensor) -> Tensor:
        """Log-mel frames of an already padded signal ``(B, P)`` (frame ``i`` reads ``padded[i * hop : i * hop + n_fft]``)
        -> ``(B, n_mels, frames)``."""
        s = self.settings
        spec = torch.stft(padded, n_fft=s.n_fft, hop_length=s.hop_length, win_length=s.win_length,
                          window=self.window.to(padded.dtype), center=False, return_complex=True)
        x = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1))
        if s.mag_power != 1.0:
            x = x.pow(s.mag_power)
        x = torch.matmul(self.fb.to(x.dtype), x)
        if s.log:
            guard = s.log_zero_guard_value
            if isinstance(guard, str):
                guard = torch.finfo(x.dtype).tiny if guard == "tiny" else torch.finfo(x.dtype).eps
            x = torch.log(x + guard) if s.log_zero_guard_type == "add" else torch.log(torch.clamp(x, min=guard))
        return x

    def normalize(self, x: Tensor, lengths: Tensor) -> Tensor:
        """NeMo's ``normalize_batch`` on ``(B, n_mels, T)`` over each sample's valid frames."""
        how = self.settings.normalize
        if how is None:
            return x
        valid = lengths_to_mask(lengths, x.shape[2])[:, None, :]
        n = lengths.to(x.dtype)
        if how == "per_feature":
            mean = torch.where(valid, x, 0.0).sum(2) / n[:, None]
            std = torch.sqrt(torch.where(valid, x - mean[:, :, None], 0.0).pow(2).sum(2) / (n[:, None] - 1.0))
            std = std.masked_fill(std.isnan(), 0.0) + 1e-5
            return ((x - mean[:, :, None]) / std[:, :, None]).masked_fill(~valid, 0.0)
        mean = torch.stack([x[i, :, : int(k)].mean() for i, k in enumerate(lengths)])
        std = torch.stack([x[i, :, : int(k)].std() for i, k in enumerate(lengths)]) + 1e-5
        return (x - mean[:, None, None]) / std[:, None, None]

    def forward(self, waves: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        s = self.settings
        waves = waves.float()
        feat_lengths = self.lengths(lengths)
        if self.training and s.dither > 0:
            waves = waves + s.dither * torch.randn_like(waves)
        x = self.preemphasis(waves, lengths)
        x = self.log_mel(F.pad(x, (self.pad_amount, self.pad_amount)))
        x = self.normalize(x, feat_lengths)
        x = x.masked_fill(~lengths_to_mask(feat_lengths, x.shape[2])[:, None, :], s.pad_value)
        if s.pad_to > 0 and x.shape[2] % s.pad_to:
            x = F.pad(x, (0, s.pad_to - x.shape[2] % s.pad_to), value=s.pad_value)
        return x.transpose(1, 2), feat_lengths


# -- encoder ----------------------------------------------------------------------------------------------------
def _mask_time(x: Tensor, lengths: Tensor) -> Tensor:
    """Zero the frames of ``x (B, C, T, F)`` past ``lengths``."""
    return x * lengths_to_mask(lengths, x.shape[2])[:, None, :, None].to(x.dtype)


class CausalDwStridingSubsampling(nn.Module):
    """NeMo's causal ``dw_striding`` subsampling: a 3x3 stride-2 convolution, then (log2(factor) - 1) times a depthwise
    3x3 stride-2 and a pointwise convolution, ReLU after each stage, every stride-2 convolution padded by 2 before and
    1 after in time and frequency; frames past a sample's length are zeroed before every layer (NeMo's
    ``MaskedConvSequential``). ``forward(feats (B, T, F), lengths) -> ((B, T', D), lengths')`` with ``T -> T // 2 + 1``
    per stage."""

    def __init__(self, feat_in: int, d_model: int, channels: int, factor: int):
        super().__init__()
        stages = int(math.log2(factor))
        convs = [nn.Conv2d(1, channels, 3, stride=2)]
        for _ in range(stages - 1):
            convs += [nn.Conv2d(channels, channels, 3, stride=2, groups=channels), nn.Conv2d(channels, channels, 1)]
        self.convs = nn.ModuleList(convs)
        freq = feat_in
        for _ in range(stages):
            freq = freq // 2 + 1
        self.out = nn.Linear(channels * freq, d_model)

    @staticmethod
    def _stride(x: Tensor, conv: nn.Conv2d, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return conv(F.pad(x, (2, 1, 2, 1))), torch.div(lengths, 2, rounding_mode="floor") + 1

    def forward(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = _mask_time(feats.unsqueeze(1), lengths)
        x, lengths = self._stride(x, self.convs[0], lengths)
        x = F.relu(_mask_time(x, lengths))
        for i in range(1, len(self.convs), 2):
            x, lengths = self._stride(_mask_time(x, lengths), self.convs[i], lengths)
            x = self.convs[i + 1](_mask_time(x, lengths))
            x = F.relu(_mask_time(x, lengths))
        x = _mask_time(x, lengths)
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f)), lengths


def rel_positions(length: int, d_model: int, device: torch.device | None = None) -> Tensor:
    """NeMo's relative sinusoidal positions for ``length`` keys: ``(1, 2 * length - 1, d_model)`` for the relative
    distances ``length - 1, ..., -(length - 1)`` (sin on even, cos on odd features)."""
    positions = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(INF_VAL) / d_model))
    pe = torch.zeros(positions.shape[0], d_model, device=device)
    pe[:, 0::2] = torch.sin(positions * div)
    pe[:, 1::2] = torch.cos(positions * div)
    return pe.unsqueeze(0)


class RelPositionSelfAttention(nn.Module):
    """Transformer-XL attention with relative positions (NeMo's ``RelPositionMultiHeadAttention``).

    ``forward(query (B, T, D), keys (B, S, D), pos (1, 2S - 1, D), allowed (B, T, S) bool) -> (B, T, D)``; the
    queries are the last ``T`` of the ``S`` key positions (the first ``S - T`` are a streaming cache). Scores are
    ``((q + u) k^T + (q + v) p^T) / sqrt(d_k)`` with ``p`` the projected position of each key's distance to the
    query; disallowed pairs are filled with -10000 before the softmax and zeroed after it (as NeMo does)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.h, self.d_k = n_heads, d_model // n_heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.d_k))
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: Tensor, keys: Tensor, pos: Tensor, allowed: Tensor) -> Tensor:
        b, t, d = query.shape
        s = keys.shape[1]
        q = self.linear_q(query).view(b, t, self.h, self.d_k)
        k = self.linear_k(keys).view(b, s, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(keys).view(b, s, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos).view(pos.shape[0], -1, self.h, self.d_k).transpose(1, 2)  # (1, H, 2S - 1, d_k)
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))  # (B, H, T, S)
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # (B, H, T, 2S - 1)
        # query i sits at key position S - T + i; key j is at distance S - T + i - j, row T - 1 - i + j of ``pos``
        rows = (t - 1 - torch.arange(t, device=q.device)[:, None] + torch.arange(s, device=q.device)[None, :])
        position = position.gather(-1, rows.expand(b, self.h, t, s))
        scores = (content + position) / math.sqrt(self.d_k)
        masked = ~allowed.unsqueeze(1)
        attn = torch.softmax(scores.masked_fill(masked, -INF_VAL), dim=-1).masked_fill(masked, 0.0)
        out = torch.matmul(self.dropout(attn), v).transpose(1, 2).reshape(b, t, d)
        return self.linear_out(out)


class NemoConvModule(nn.Module):
    """NeMo's Conformer convolution module: LayerNorm, pointwise (D -> 2D), GLU, padded frames zeroed, depthwise
    convolution over ``[left, right]`` context (the cache replaces the left zero padding when streaming), BatchNorm
    or LayerNorm, Swish, pointwise.

    ``forward(x (B, T, D), valid (B, T) bool, cache (B, D, left) or None) -> (y (B, T, D), next cache or None)``."""

    def __init__(self, d_model: int, kernel_size: int, context: tuple[int, int], norm_type: str):
        super().__init__()
        self.context = context
        self.norm = nn.LayerNorm(d_model)
        self.pointwise1 = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model)
        self.conv_norm = nn.BatchNorm1d(d_model) if norm_type == "batch_norm" else nn.LayerNorm(d_model)
        self.pointwise2 = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, valid: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        left, right = self.context
        y = F.glu(self.pointwise1(self.norm(x)), dim=-1).masked_fill(~valid[..., None], 0.0).transpose(1, 2)
        if cache is None:
            y, next_cache = F.pad(y, (left, right)), None
        else:
            y = torch.cat([cache, F.pad(y, (0, right))], dim=2)
            next_cache = y[:, :, y.shape[2] - cache.shape[2]:]
        y = self.depthwise(y)
        y = self.conv_norm(y) if isinstance(self.conv_norm, nn.BatchNorm1d) else self.conv_norm(y.transpose(1, 2)).transpose(1, 2)
        return self.pointwise2(F.silu(y).transpose(1, 2)), next_cache


class FastConformerBlock(nn.Module):
    """NeMo's ``ConformerLayer``: ½ feed-forward, relative-position self-attention, convolution module, ½ feed-forward,
    LayerNorm (each sub-block with its own LayerNorm in front, residual around it).

    ``forward(x (B, T, D), pos, allowed (B, T, S), valid (B, T), cache=None)`` -> ``x`` offline, or with
    ``cache = (keys (B, C, D), conv (B, D, left))`` -> ``(x, (next keys, next conv))``; the key cache holds the last
    ``C`` normalized attention inputs."""

    def __init__(self, s: EncoderSettings):
        super().__init__()
        self.ffn1 = FeedForward(s.d_model, s.d_ff, s.dropout)
        self.attn_norm = nn.LayerNorm(s.d_model)
        self.attn = RelPositionSelfAttention(s.d_model, s.n_heads, s.dropout)
        self.conv = NemoConvModule(s.d_model, s.conv_kernel_size, s.conv_context, s.conv_norm_type)
        self.ffn2 = FeedForward(s.d_model, s.d_ff, s.dropout)
        self.out_norm = nn.LayerNorm(s.d_model)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, x: Tensor, pos: Tensor, allowed: Tensor, valid: Tensor,
                cache: tuple[Tensor, Tensor] | None = None) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        x = x + 0.5 * self.ffn1(x)
        q = self.attn_norm(x)
        keys = q if cache is None else torch.cat([cache[0], q], dim=1)
        x = x + self.dropout(self.attn(q, keys, pos, allowed))
        c, conv_cache = self.conv(x, valid, None if cache is None else cache[1])
        x = x + self.dropout(c)
        x = self.out_norm(x + 0.5 * self.ffn2(x))
        if cache is None:
            return x
        return x, (keys[:, keys.shape[1] - cache[0].shape[1]:], conv_cache)


@dataclass
class StreamingSettings:
    """NeMo's ``CacheAwareStreamingConfig`` for a ``chunked_limited`` context (``setup_streaming_params``): feature
    frames per chunk and per shift (first chunk, later chunks), encoder frames a chunk yields (``valid_out_len``),
    the attention cache size, the feature frames re-fed before each later chunk (``pre_encode_cache_size``) and the
    encoder frames they produce that are dropped (``drop_extra_pre_encoded``)."""

    chunk_size: list[int]
    shift_size: list[int]
    cache_drop_size: int
    last_channel_cache_size: int
    valid_out_len: int
    pre_encode_cache_size: list[int]
    drop_extra_pre_encoded: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class NemoStreamState:
    """Cache-aware streaming caches, NeMo's layout: ``cache_last_channel (L, B, C, D)`` (each layer's last ``C``
    normalized attention inputs), ``cache_last_time (L, B, D, left)`` (each depthwise convolution's last inputs) and
    ``cache_last_channel_len (B,)`` (how many of the ``C`` are real)."""

    cache_last_channel: Tensor
    cache_last_time: Tensor
    cache_last_channel_len: Tensor


class FastConformerEncoder(nn.Module):
    """NeMo's cache-aware streaming ``ConformerEncoder`` (see the module docstring).

    ``forward(feats (B, F, n_mels), lengths) -> (enc (B, T, D), lengths)`` on whole utterances with the current
    attention context; :meth:`stream_step` is one step of NeMo's ``cache_aware_stream_step``."""

    def __init__(self, s: EncoderSettings):
        super().__init__()
        self.settings = s
        self.subsampling = CausalDwStridingSubsampling(s.feat_in, s.d_model, s.subsampling_channels, s.subsampling_factor)
        self.layers = nn.ModuleList(FastConformerBlock(s) for _ in range(s.n_layers))
        self.xscale = math.sqrt(s.d_model) if s.xscaling else None
        self.att_context_size = list(s.att_context_sizes[0])

    # -- attention context ------------------------------------------------------------------------------------
    def set_att_context_size(self, context: list[int]) -> None:
        """Pick one of the model's attention contexts ``[left, right]`` (``encoder.att_context_size``)."""
        if list(context) not in self.settings.att_context_sizes:
            raise ValueError(f"att_context_size {list(context)}: this model was trained with {self.settings.att_context_sizes}")
        self.att_context_size = list(context)

    def streaming_settings(self) -> StreamingSettings:
        """NeMo's streaming configuration for the current context."""
        left, right = self.att_context_size
        factor = self.settings.subsampling_factor
        return StreamingSettings(
            chunk_size=[1 + factor * right, factor + factor * right], shift_size=[1 + factor * right, factor + factor * right],
            cache_drop_size=0, last_channel_cache_size=left if left >= 0 else MAX_CONTEXT, valid_out_len=right + 1,
            pre_encode_cache_size=[0, factor + 1], drop_extra_pre_encoded=1 + (factor + 1 - 1) // factor)

    def allowed(self, valid: Tensor) -> Tensor:
        """(B, S, S) bool: the chunked_limited context (chunks of right + 1 frames, left // (right + 1) chunks back)
        between valid frames."""
        left, right = self.att_context_size
        s = valid.shape[1]
        pos = torch.arange(s, device=valid.device)
        if right == -1:
            ctx = pos[None, :] >= pos[:, None] - left if left >= 0 else torch.ones(s, s, dtype=torch.bool, device=valid.device)
        else:
            chunk = torch.div(pos, right + 1, rounding_mode="trunc")
            diff = chunk[:, None] - chunk[None, :]
            back = left // (right + 1) if left >= 0 else MAX_CONTEXT
            ctx = (diff >= 0) & (diff <= back)
        return ctx[None] & valid[:, None, :] & valid[:, :, None]

    def _embed(self, x: Tensor, keys: int) -> tuple[Tensor, Tensor]:
        if self.xscale is not None:
            x = x * self.xscale
        return x, rel_positions(keys, self.settings.d_model, x.device)

    def forward(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x, lengths = self.subsampling(feats, lengths)
        x, pos = self._embed(x, x.shape[1])
        valid = lengths_to_mask(lengths, x.shape[1])
        allowed = self.allowed(valid)
        for layer in self.layers:
            x = layer(x, pos, allowed, valid)
        return x, lengths

    # -- streaming --------------------------------------------------------------------------------------------
    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> NemoStreamState:
        """Empty caches (NeMo's ``get_initial_cache_state``)."""
        s = self.settings
        if device is None:
            device = next(self.parameters()).device
        c = self.streaming_settings().last_channel_cache_size
        return NemoStreamState(torch.zeros(s.n_layers, batch_size, c, s.d_model, device=device),
                               torch.zeros(s.n_layers, batch_size, s.d_model, s.conv_context[0], device=device),
                               torch.zeros(batch_size, dtype=torch.long, device=device))

    def stream_step(self, chunk: Tensor, lengths: Tensor, state: NemoStreamState, *, keep_all_outputs: bool = True,
                    drop_extra_pre_encoded: int | None = None) -> tuple[Tensor, Tensor, NemoStreamState]:
        """NeMo's ``encoder.cache_aware_stream_step``: ``chunk (B, F, n_mels)`` feature frames (a later chunk starts
        with the ``pre_encode_cache_size`` frames before it), ``lengths (B,)`` -> ``(enc (B, T, D), enc_lengths (B,),
        next state)``. ``drop_extra_pre_encoded``: encoder frames to drop after the subsampling (None: the streaming
        setting; NeMo's streaming script passes 0 for the first chunk); ``keep_all_outputs=False`` keeps at most
        ``valid_out_len`` frames (NeMo passes True for the last chunk)."""
        cfg = self.streaming_settings()
        drop = cfg.drop_extra_pre_encoded if drop_extra_pre_encoded is None else drop_extra_pre_encoded
        x, lengths = self.subsampling(chunk, lengths)
        if drop > 0:
            x, lengths = x[:, drop:], (lengths - drop).clamp(min=0)
        t, c = x.shape[1], cfg.last_channel_cache_size
        x, pos = self._embed(x, t + c)
        positions = torch.arange(t + c, device=x.device)[None, :]
        valid = (positions < (lengths + c)[:, None]) & (positions >= (c - state.cache_last_channel_len)[:, None])
        allowed = self.allowed(valid)[:, c:]
        valid = valid[:, c:]
        channel, conv = [], []
        for i, layer in enumerate(self.layers):
            x, (next_channel, next_conv) = layer(x, pos, allowed, valid,
                                                 (state.cache_last_channel[i], state.cache_last_time[i]))
            channel.append(next_channel)
            conv.append(next_conv)
        next_state = NemoStreamState(torch.stack(channel), torch.stack(conv),
                                     torch.clamp(state.cache_last_channel_len + t - cfg.cache_drop_size, max=c))
        if not keep_all_outputs:
            x, lengths = x[:, : cfg.valid_out_len], torch.clamp(lengths, max=cfg.valid_out_len)
        return x, lengths, next_state


@dataclass
class FeatureChunk:
    """One chunk of :func:`feature_chunks`: the features NeMo feeds ``cache_aware_stream_step`` and its arguments."""

    features: Tensor  # (B, F, n_mels)
    lengths: Tensor  # (B,)
    drop_extra_pre_encoded: int
    keep_all_outputs: bool


def feature_chunks(feats: Tensor, lengths: Tensor, cfg: StreamingSettings) -> Iterator[FeatureChunk]:
    """Cut ``feats (B, T, n_mels)`` into cache-aware streaming chunks as NeMo's ``CacheAwareStreamingAudioBuffer``
    does (``pad_and_drop_preencoded=False``): a first chunk of ``chunk_size[0]`` frames, then chunks of
    ``chunk_size[1]`` frames each preceded by the ``pre_encode_cache_size[1]`` frames before it (zeros where there
    are none); a chunk shorter than the subsampling factor ends the stream. ``T`` is the longest stream's frame
    count; ``lengths`` the frames of each stream as NeMo's buffer counts them
    (:meth:`NemoMelFrontend.stream_lengths`)."""
    total = feats.shape[1]
    factor = cfg.chunk_size[1] - cfg.chunk_size[0] + 1
    start, first = 0, True
    while start < total:
        size, shift = (cfg.chunk_size[0], cfg.shift_size[0]) if first else (cfg.chunk_size[1], cfg.shift_size[1])
        chunk = feats[:, start : start + size]
        if chunk.shape[1] < (1 if first else factor):
            return
        cache = 0 if first else cfg.pre_encode_cache_size[1]
        before = feats[:, max(0, start - cache) : start]
        pad = cache - before.shape[1]
        if pad > 0:
            before = torch.cat([before.new_zeros(before.shape[0], pad, before.shape[2]), before], dim=1)
        chunk = torch.cat([before, chunk], dim=1)
        chunk_lengths = torch.clamp(lengths - start + cache, min=0, max=chunk.shape[1])
        yield FeatureChunk(chunk, chunk_lengths, 0 if first else cfg.drop_extra_pre_encoded, start + shift >= total)
        start += shift
        first = False


# -- transducer -------------------------------------------------------------------------------------------------
class NemoJoint(nn.Module):
    """NeMo's ``RNNTJoint``: ``out(act(enc_proj(enc) + pred_proj(pred)))``; 3-D ``enc (B, T, E)`` and ``pred (B, U, P)``
    give every pair ``(B, T, U, V)``, other shapes broadcast as they are."""

    def __init__(self, enc_dim: int, pred_dim: int, joint_dim: int, vocab_size: int, activation: str = "relu"):
        super().__init__()
        self.enc_proj = nn.Linear(enc_dim, joint_dim)
        self.pred_proj = nn.Linear(pred_dim, joint_dim)
        self.out = nn.Linear(joint_dim, vocab_size)
        self.activation = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[activation]

    def forward(self, enc: Tensor, pred: Tensor) -> Tensor:
        e, p = self.enc_proj(enc), self.pred_proj(pred)
        if e.dim() == 3 and p.dim() == 3:
            e, p = e.unsqueeze(2), p.unsqueeze(1)
        return self.out(self.activation(e + p))


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
        self.joint_net = NemoJoint(s.encoder.d_model, s.pred_hidden, s.joint_hidden, s.num_classes + 1, s.joint_activation)
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


# -- tokenizers -------------------------------------------------------------------------------------------------
class NemoCharTokenizer:
    """A character model's ``labels`` (id i = labels[i]; the blank is ``len(labels)``). Characters outside the labels
    are dropped when encoding."""

    kind = "char"

    def __init__(self, labels: list[str]):
        self.labels = list(labels)
        self.blank = len(self.labels)
        self._index = {c: i for i, c in enumerate(self.labels)}

    @property
    def vocab_size(self) -> int:
        return len(self.labels) + 1

    def encode(self, text: str) -> list[int]:
        return [self._index[c] for c in text if c in self._index]

    def decode(self, ids) -> str:
        return "".join(self.labels[int(i)] for i in ids if 0 <= int(i) < self.blank)


class NemoSentencePieceTokenizer:
    """The ``.nemo`` file's SentencePiece model (``tokenizer.model_path``); the blank is ``vocab_size - 1``."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.blank = self.sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        return self.blank + 1

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.blank])


def nemo_tokenizer(archive: NemoArchive, num_classes: int) -> NemoCharTokenizer | NemoSentencePieceTokenizer:
    """The tokenizer a ``.nemo`` file carries: SentencePiece (``tokenizer.type: bpe``) or characters (``labels``)."""
    fields = _Fields(archive.config, archive.path)
    tok = fields.get("tokenizer")
    if tok:
        fields.choice("tokenizer.type", ("bpe",))
        ref = str(fields.get("tokenizer.model_path", required=True))
        name = ref[len("nemo:"):] if ref.startswith("nemo:") else PurePosixPath(ref).name
        if name not in archive.files:
            raise fields.error("tokenizer.model_path", f"names {ref!r}, which the .nemo tar does not hold")
        try:
            tokenizer: Any = NemoSentencePieceTokenizer(archive.files[name])
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{archive.path}: {name} is not a SentencePiece model ({err})") from None
    else:
        labels = fields.get("labels") or fields.get("joint.vocabulary") or fields.get("decoder.vocabulary")
        if not isinstance(labels, list) or not all(isinstance(c, str) for c in labels):
            raise fields.error("labels", "is missing: a character model lists its labels (or set tokenizer)")
        tokenizer = NemoCharTokenizer(labels)
    if tokenizer.vocab_size != num_classes + 1:
        raise fields.error("joint.num_classes", f"({num_classes}) does not match the tokenizer's {tokenizer.vocab_size - 1} tokens")
    return tokenizer


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


__all__ = ["CausalDwStridingSubsampling", "FastConformerBlock", "FastConformerEncoder", "FeatureChunk", "NemoArchive",
           "NemoBundle", "NemoCharTokenizer", "NemoJoint", "NemoMelFrontend", "NemoSentencePieceTokenizer", "NemoSettings",
           "NemoStream", "NemoStreamState", "NemoTransducer", "RelPositionSelfAttention", "StreamingSettings",
           "declare_nemo_points", "feature_chunks", "load_nemo", "load_nemo_state", "nemo_settings", "nemo_tokenizer",
           "read_nemo", "rel_positions"]
