"""The two encoders of the cascaded transducer.

:class:`CausalConformer` — the streaming first pass, written here because torchaudio's ``Conformer``
sees the whole utterance:

- causal ×4 subsampling: two stride-2 3×3 convolutions padded on the left in time only, so subsampled
  frame ``t`` reads feature frames ``<= 4t + 3`` (``ceil(ceil(T/2)/2)`` frames for ``T`` features);
- chunked self-attention: frames are grouped in chunks of ``chunk_size``; a frame attends to every
  frame of its own chunk and of the ``left_chunks`` chunks before it (``left_chunks < 0``: all of them);
- a causal depthwise convolution (left padding only) with LayerNorm instead of BatchNorm, so the block
  has no running statistics and adapters switched off restore the base exactly;
- no positional encoding in attention: the convolutions carry position (as torchaudio's Conformer).

:class:`ConformerStream` runs it chunk by chunk with caches (subsampling input frames, projected
keys/values of the left chunks per layer, the depthwise convolution's last ``kernel - 1`` inputs), and
yields exactly the frames of :meth:`CausalConformer.forward` on the whole utterance.

:class:`NonCausalConformer` — the second pass: torchaudio's ``Conformer`` layers (time-major inside,
``(T, B, D)``), with the padded frames zeroed at each depthwise convolution's input so that a sample's
output does not depend on how much padding its batch has (a batched run equals a run alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) -> (B, max_len) bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class CausalSubsampling(nn.Module):
    """(B, T, F) features -> (B, ceil(ceil(T/2)/2), D): two causal stride-2 convolutions + a projection."""

    def __init__(self, n_mels: int, channels: int, d_model: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=2)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2)
        freq = ((n_mels - 3) // 2 + 1 - 3) // 2 + 1
        if freq < 1:
            raise ValueError(f"CausalSubsampling: n_mels={n_mels} is too small for two 3x3 stride-2 convolutions")
        self.proj = nn.Linear(channels * freq, d_model)

    @staticmethod
    def out_lengths(lengths: Tensor) -> Tensor:
        """(B,) feature frames -> (B,) subsampled frames: ``ceil(ceil(T / 2) / 2)``."""
        return ((lengths + 1) // 2 + 1) // 2

    def project(self, x: Tensor) -> Tensor:
        """(B, C, T, F') -> (B, T, D)."""
        b, c, t, f = x.shape
        return self.proj(x.permute(0, 2, 1, 3).reshape(b, t, c * f))

    def forward(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = feats.unsqueeze(1)  # (B, 1, T, F)
        x = F.relu(self.conv1(F.pad(x, (0, 0, 2, 0))))  # left-pad time only: causal
        x = F.relu(self.conv2(F.pad(x, (0, 0, 2, 0))))
        return self.project(x), self.out_lengths(lengths)


class ChunkedSelfAttention(nn.Module):
    """Multi-head self-attention with an optional cache of the left context's keys/values.

    ``forward(x (B, T, D), mask (B, 1, T, S) bool or None, past_kv (B, S - T, 2D) or None)
    -> (out (B, T, D), kv (B, T, 2D))`` where ``kv`` are this input's projected keys and values
    (for the caller to cache). ``mask`` is True where a query may attend to a key."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"ChunkedSelfAttention: d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor, mask: Tensor | None = None, past_kv: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, t, d = x.shape
        q, kv = self.qkv(x).split([d, 2 * d], dim=-1)
        full_kv = kv if past_kv is None else torch.cat([past_kv, kv], dim=1)
        k, v = full_kv.split(d, dim=-1)
        h = self.num_heads

        def heads(z: Tensor) -> Tensor:
            return z.reshape(b, z.shape[1], h, d // h).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, t, d)), kv


class CausalConvModule(nn.Module):
    """Conformer convolution module with a causal depthwise convolution and LayerNorm.

    ``forward(x (B, T, D), cache (B, D, kernel - 1) or None) -> (y (B, T, D), new cache)``: the cache
    holds the depthwise convolution's previous inputs (zeros at the start of an utterance)."""

    def __init__(self, d_model: int, kernel_size: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.pointwise1 = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model)
        self.conv_norm = nn.LayerNorm(d_model)
        self.pointwise2 = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.kernel_size = kernel_size

    def forward(self, x: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = F.glu(self.pointwise1(self.norm(x)), dim=-1).transpose(1, 2)  # (B, D, T)
        if cache is None:
            cache = y.new_zeros(y.shape[0], y.shape[1], self.kernel_size - 1)
        y = torch.cat([cache, y], dim=2)
        new_cache = y[:, :, y.shape[2] - (self.kernel_size - 1):]
        y = self.depthwise(y).transpose(1, 2)  # (B, T, D)
        y = self.pointwise2(F.silu(self.conv_norm(y)))
        return self.dropout(y), new_cache


class FeedForward(nn.Module):
    """LayerNorm -> Linear -> SiLU -> Linear (with dropout), (B, T, D) -> (B, T, D)."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.dropout(F.silu(self.fc1(self.norm(x))))))


@dataclass
class BlockState:
    """Streaming state of one block: projected keys/values of the left chunks (B, S, 2D) and the
    depthwise convolution's cache (B, D, kernel - 1)."""

    kv: Tensor | None = None
    conv: Tensor | None = None


class CausalConformerBlock(nn.Module):
    """Macaron Conformer block: ½FFN, chunked self-attention, causal conv, ½FFN, LayerNorm.

    ``forward(x (B, T, D), mask, state: BlockState | None) -> (y (B, T, D), BlockState)``; the returned
    state holds this call's keys/values and conv cache (the stream trims the keys/values it keeps)."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, kernel_size: int, dropout: float = 0.0):
        super().__init__()
        self.ffn1 = FeedForward(d_model, ffn_dim, dropout)
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = ChunkedSelfAttention(d_model, num_heads, dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.conv = CausalConvModule(d_model, kernel_size, dropout)
        self.ffn2 = FeedForward(d_model, ffn_dim, dropout)
        self.out_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, mask: Tensor | None = None, state: BlockState | None = None) -> tuple[Tensor, BlockState]:
        state = state or BlockState()
        x = x + 0.5 * self.ffn1(x)
        a, kv = self.attn(self.attn_norm(x), mask, state.kv)
        x = x + self.attn_dropout(a)
        c, conv_cache = self.conv(x, state.conv)
        x = x + c
        x = x + 0.5 * self.ffn2(x)
        past = kv if state.kv is None else torch.cat([state.kv, kv], dim=1)
        return self.out_norm(x), BlockState(past, conv_cache)


class CausalConformer(nn.Module):
    """The streaming first-pass encoder: ``forward(feats (B, T, F), lengths (B,)) -> (enc (B, T', D), lengths')``
    with ``T' = ceil(ceil(T/2)/2)`` (one frame per 40 ms at a 10 ms hop)."""

    def __init__(self, n_mels: int, d_model: int, num_layers: int, num_heads: int, ffn_dim: int, kernel_size: int,
                 chunk_size: int, left_chunks: int, subsampling_channels: int, dropout: float = 0.0):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"CausalConformer.chunk_size: expected a positive number of frames, got {chunk_size}")
        self.d_model, self.chunk_size, self.left_chunks = d_model, chunk_size, left_chunks
        self.subsampling = CausalSubsampling(n_mels, subsampling_channels, d_model)
        self.layers = nn.ModuleList(CausalConformerBlock(d_model, num_heads, ffn_dim, kernel_size, dropout)
                                    for _ in range(num_layers))

    def attention_mask(self, lengths: Tensor, t: int) -> Tensor:
        """(B, 1, T, T) bool: own chunk + ``left_chunks`` previous chunks, valid keys only; the diagonal is
        always allowed so padded queries never see an all-masked row (their outputs are not used)."""
        pos = torch.arange(t, device=lengths.device)
        chunk = pos // self.chunk_size
        allowed = chunk[None, :] <= chunk[:, None]
        if self.left_chunks >= 0:
            allowed = allowed & (chunk[None, :] >= chunk[:, None] - self.left_chunks)
        mask = allowed[None] & lengths_to_mask(lengths, t)[:, None, :]
        return (mask | torch.eye(t, dtype=torch.bool, device=lengths.device)[None]).unsqueeze(1)

    def forward(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x, lengths = self.subsampling(feats, lengths)
        mask = self.attention_mask(lengths, x.shape[1])
        for layer in self.layers:
            x, _ = layer(x, mask)
        return x, lengths


class ConformerStream:
    """Chunk-by-chunk :class:`CausalConformer` for ``B`` synchronous streams.

    ``push(feats (B, t, F)) -> (B, n * chunk_size, D)``: the encoder frames of every chunk completed so far;
    ``flush() -> (B, r, D)``: the frames of the last, partial chunk. Concatenated, they equal
    ``encoder(all_feats, lengths)`` for the whole utterance."""

    def __init__(self, encoder: CausalConformer, batch_size: int):
        self.encoder = encoder
        self.batch_size = batch_size
        self.sub1: Tensor | None = None  # (B, 1, n, F) feature frames the first convolution still needs
        self.sub2: Tensor | None = None  # (B, C, n, F') first-convolution outputs the second still needs
        self.pending: Tensor | None = None  # (B, n < chunk_size, D) subsampled frames waiting for a full chunk
        self.states = [BlockState() for _ in encoder.layers]

    @staticmethod
    def _conv_step(conv: nn.Conv2d, buf: Tensor | None, new: Tensor) -> tuple[Tensor, Tensor]:
        """Run a causal stride-2 conv on buffered + new frames (B, C, n, F); return (outputs, buffer to keep)."""
        if buf is None:  # the two zero frames of the causal left padding
            buf = new.new_zeros(new.shape[0], new.shape[1], 2, new.shape[3])
        buf = torch.cat([buf, new], dim=2)
        n_out = 0 if buf.shape[2] < 3 else (buf.shape[2] - 3) // 2 + 1
        out = F.relu(conv(buf[:, :, : 2 * (n_out - 1) + 3])) if n_out else buf.new_zeros(buf.shape[0], conv.out_channels, 0, 0)
        return out, buf[:, :, 2 * n_out:]

    def _run(self, x: Tensor) -> Tensor:
        """One chunk (B, n <= chunk_size, D) through every layer, updating the caches."""
        keep = self.encoder.chunk_size * self.encoder.left_chunks if self.encoder.left_chunks >= 0 else None
        for i, layer in enumerate(self.encoder.layers):
            x, state = layer(x, None, self.states[i])
            if keep is not None:
                state.kv = state.kv[:, state.kv.shape[1] - keep:] if keep else state.kv[:, :0]
            self.states[i] = state
        return x

    def push(self, feats: Tensor) -> Tensor:
        if feats.dim() != 3 or feats.shape[0] != self.batch_size:
            raise ValueError(f"ConformerStream.push: expected feats of shape ({self.batch_size}, t, F), got {tuple(feats.shape)}")
        sub = self.encoder.subsampling
        y1, self.sub1 = self._conv_step(sub.conv1, self.sub1, feats.unsqueeze(1))
        if y1.shape[2] == 0:
            return feats.new_zeros(self.batch_size, 0, self.encoder.d_model)
        y2, self.sub2 = self._conv_step(sub.conv2, self.sub2, y1)
        x = sub.project(y2) if y2.shape[2] else feats.new_zeros(self.batch_size, 0, self.encoder.d_model)
        if self.pending is not None:
            x = torch.cat([self.pending, x], dim=1)
        c = self.encoder.chunk_size
        n_full = x.shape[1] // c * c
        self.pending = x[:, n_full:]
        outs = [self._run(x[:, i: i + c]) for i in range(0, n_full, c)]
        return torch.cat(outs, dim=1) if outs else x[:, :0]

    def flush(self) -> Tensor:
        """The last partial chunk's frames; the stream is finished afterwards."""
        x, self.pending = self.pending, None
        if x is None or x.shape[1] == 0:
            param = next(self.encoder.parameters())
            return torch.zeros(self.batch_size, 0, self.encoder.d_model, device=param.device, dtype=param.dtype)
        return self._run(x)


class NonCausalConformer(nn.Module):
    """The second pass: torchaudio ``Conformer`` over the whole first-pass output.

    ``forward(x (B, T, E), lengths (B,)) -> (y (B, T, E), lengths)``; ``in_proj``/``out_proj`` map E to the
    Conformer's width and back when they differ (Identity otherwise). Its layers are time-major inside:
    ``conformer.conformer_layers[i]`` and its ``self_attn`` take and return (T, B, D)."""

    def __init__(self, input_dim: int, d_model: int, num_layers: int, num_heads: int, ffn_dim: int, kernel_size: int,
                 dropout: float = 0.0):
        super().__init__()
        self.in_proj = nn.Linear(input_dim, d_model) if d_model != input_dim else nn.Identity()
        self.conformer = torchaudio.models.Conformer(
            input_dim=d_model, num_heads=num_heads, ffn_dim=ffn_dim, num_layers=num_layers,
            depthwise_conv_kernel_size=kernel_size, dropout=dropout, use_group_norm=False)
        self.out_proj = nn.Linear(d_model, input_dim) if d_model != input_dim else nn.Identity()
        self._valid: Tensor | None = None  # (B, T) while forward runs: which frames are real
        for layer in self.conformer.conformer_layers:
            # sequential = [pointwise, GLU, depthwise, norm, SiLU, pointwise, dropout]
            layer.conv_module.sequential[2].register_forward_pre_hook(self._zero_padded_frames)

    def _zero_padded_frames(self, module: nn.Module, args: tuple) -> tuple | None:
        """Depthwise-conv input (B, C, T): zero the padded frames, as a lone sample's zero padding would be."""
        if self._valid is None:
            return None
        x = args[0]
        return (x * self._valid[:, None, : x.shape[-1]].to(x.dtype),)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        valid = lengths_to_mask(lengths, x.shape[1])
        x = self.in_proj(x).transpose(0, 1)  # (T, B, D)
        self._valid = valid
        try:
            for layer in self.conformer.conformer_layers:
                x = layer(x, ~valid)
        finally:
            self._valid = None
        return self.out_proj(x.transpose(0, 1)), lengths
