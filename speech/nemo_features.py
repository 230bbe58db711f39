"""NeMo's mel frontend (``AudioToMelSpectrogramPreprocessor`` / ``FilterbankFeatures``) for ``.nemo`` models.

:class:`NemoMelFrontend` turns waves into the features a NeMo FastConformer was trained on: pre-emphasis, a centred
zero-padded STFT with the ``.nemo`` file's own window and mel filterbank, log with NeMo's zero guard, ``per_feature``
/ ``all_features`` / no normalization, ``pad_to``. :class:`FrontendSettings` are its settings (read from
``model_config.yaml`` by :func:`mmadapters.speech.nemo_archive.nemo_settings`). This library's own frontend
(global CMVN, uncentred STFT) is :mod:`mmadapters.speech.features`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conformer import lengths_to_mask

SAMPLE_RATE = 16000  # what this library's audio loader delivers


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



__all__ = ["SAMPLE_RATE", "FrontendSettings", "NemoMelFrontend"]
