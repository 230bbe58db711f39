"""NeMo's cache-aware streaming FastConformer encoder (``ConformerEncoder`` as streaming models configure it).

- :class:`CausalDwStridingSubsampling` — ``dw_striding`` causal subsampling (x4, x8, ...; padded frames masked
  before every convolution);
- :class:`RelPositionSelfAttention` — Transformer-XL relative-position attention with per-head biases ``u`` / ``v``
  (:func:`rel_positions` are NeMo's sinusoidal relative positions);
- :class:`NemoConvModule` — a causal depthwise convolution with BatchNorm or LayerNorm and a streaming cache;
- :class:`FastConformerBlock` — NeMo's ``ConformerLayer`` (macaron feed-forwards around attention and convolution);
- :class:`FastConformerEncoder` — input scaled by ``sqrt(d_model)`` (xscaling), ``chunked_limited`` attention
  contexts (one or several: :meth:`FastConformerEncoder.set_att_context_size`), whole utterances (``forward``) or
  NeMo's ``encoder.cache_aware_stream_step`` (:meth:`FastConformerEncoder.stream_step`: same chunk in, same frames
  and next caches, :class:`NemoStreamState`, out);
- :func:`feature_chunks` — features cut into chunks as NeMo's ``CacheAwareStreamingAudioBuffer`` does, for the
  :class:`StreamingSettings` of the current context.

:class:`EncoderSettings` are what the encoder is built from (read from ``model_config.yaml`` by
:func:`mmadapters.speech.nemo_archive.nemo_settings`). This library's own streaming Conformer is
:mod:`mmadapters.speech.conformer`; its feed-forward and length mask are reused here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conformer import FeedForward, lengths_to_mask

INF_VAL = 10000.0  # NeMo's attention mask fill value and the base of its sinusoidal positions
MAX_CONTEXT = 10000  # NeMo's cache size for an unlimited left context


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
    (:meth:`~mmadapters.speech.nemo_features.NemoMelFrontend.stream_lengths`)."""
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



__all__ = ["CausalDwStridingSubsampling", "EncoderSettings", "FastConformerBlock", "FastConformerEncoder", "FeatureChunk",
           "NemoConvModule", "NemoStreamState", "RelPositionSelfAttention", "StreamingSettings", "feature_chunks",
           "rel_positions"]
