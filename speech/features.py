"""Log-mel features with global mean/variance normalization, and SpecAugment.

The STFT is uncentred (``center=False``): feature frame ``f`` is computed from samples
``[f * hop, f * hop + win)`` and nothing else, so a stream that sees the audio chunk by chunk produces
exactly the frames of the whole utterance (:class:`FeatureStream`). A wave of ``S > 0`` samples gives
``1 + max(0, S - win) // hop`` frames (a wave shorter than one window is zero-padded to one frame).

The normalization statistics are buffers of :class:`FeatureFrontend`, so they are saved and loaded
with the model's weights (:meth:`FeatureFrontend.fit_cmvn` estimates them from training audio).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torchaudio
from torch import Tensor, nn

LOG_FLOOR = 1e-10  # power floor before the log: silence (digital zeros) stays finite


class FeatureFrontend(nn.Module):
    """Waves -> normalized log-mel frames.

    ``forward(waves (B, S) float, lengths (B,) long) -> (feats (B, T, n_mels), feat_lengths (B,))``;
    frames past a sample's length are zero.
    """

    def __init__(self, sample_rate: int = 16000, n_mels: int = 80, n_fft: int = 400, win_length: int = 400,
                 hop_length: int = 160):
        super().__init__()
        if win_length > n_fft:
            raise ValueError(f"FeatureFrontend.win_length: expected at most n_fft={n_fft}, got {win_length}")
        self.sample_rate, self.n_mels, self.win_length, self.hop_length = sample_rate, n_mels, win_length, hop_length
        self.n_fft = n_fft
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=win_length, hop_length=hop_length, n_mels=n_mels,
            center=False, power=2.0)
        self.register_buffer("cmvn_mean", torch.zeros(n_mels))
        self.register_buffer("cmvn_std", torch.ones(n_mels))

    @property
    def window(self) -> int:
        """Samples one frame reads (the STFT size: the window is zero-padded to ``n_fft``)."""
        return self.n_fft

    def num_frames(self, lengths: Tensor) -> Tensor:
        """(B,) sample counts -> (B,) frame counts (0 for an empty wave)."""
        lengths = lengths.long()
        frames = 1 + (lengths - self.window).clamp(min=0) // self.hop_length
        return torch.where(lengths > 0, frames, torch.zeros_like(frames))

    def log_mel(self, waves: Tensor) -> Tensor:
        """(B, S) -> unnormalized log-mel (B, T, n_mels), ``T = 1 + (S - window) // hop`` (S >= window)."""
        if waves.shape[-1] < self.window:
            waves = torch.nn.functional.pad(waves, (0, self.window - waves.shape[-1]))
        power = self.mel(waves.float())  # (B, n_mels, T)
        return power.clamp(min=LOG_FLOOR).log().transpose(1, 2)

    def normalize(self, logmel: Tensor) -> Tensor:
        return (logmel - self.cmvn_mean) / self.cmvn_std

    def forward(self, waves: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        if waves.dim() != 2:
            raise ValueError(f"FeatureFrontend: expected waves of shape (B, S), got {tuple(waves.shape)}")
        feats = self.normalize(self.log_mel(waves))
        feat_lengths = self.num_frames(lengths.to(waves.device))
        valid = torch.arange(feats.shape[1], device=feats.device)[None, :] < feat_lengths[:, None]
        return feats * valid[..., None], feat_lengths

    @torch.no_grad()
    def fit_cmvn(self, waves: Iterable[Tensor], max_frames: int | None = None) -> FeatureFrontend:
        """Set the global mean and standard deviation of the log-mels of ``waves`` (each (S,) or (1, S)).

        Accumulates in float64 over every frame (or the first ``max_frames``). Returns ``self``."""
        total = torch.zeros(self.n_mels, dtype=torch.float64)
        total_sq = torch.zeros(self.n_mels, dtype=torch.float64)
        count = 0
        for i, wave in enumerate(waves):
            wave = torch.as_tensor(wave)
            if wave.dim() == 2 and wave.shape[0] == 1:
                wave = wave[0]
            if wave.dim() != 1:
                raise ValueError(f"fit_cmvn: wave {i} has shape {tuple(wave.shape)}; expected (S,) mono samples")
            if wave.numel() == 0:
                continue
            logmel = self.log_mel(wave[None].to(self.cmvn_mean.device))[0].double().cpu()  # (T, n_mels)
            if max_frames is not None:
                logmel = logmel[: max_frames - count]
            total += logmel.sum(0)
            total_sq += (logmel * logmel).sum(0)
            count += logmel.shape[0]
            if max_frames is not None and count >= max_frames:
                break
        if count == 0:
            raise ValueError("fit_cmvn: got no audio frames; pass non-empty waves")
        mean = total / count
        std = (total_sq / count - mean * mean).clamp(min=1e-8).sqrt().clamp(min=1e-3)
        self.cmvn_mean.copy_(mean.float())
        self.cmvn_std.copy_(std.float())
        return self


class FeatureStream:
    """Incremental :class:`FeatureFrontend` for ``B`` synchronous streams.

    ``push(samples (B, s)) -> feats (B, t, n_mels)``: the frames whose windows are now complete;
    ``flush() -> (B, t, n_mels)``: a last zero-padded frame when the audio was shorter than one window.
    The frames equal those of ``frontend(whole_waves, lengths)`` (see the module docstring).
    """

    def __init__(self, frontend: FeatureFrontend, batch_size: int):
        self.frontend = frontend
        self.batch_size = batch_size
        self.buffer: Tensor | None = None  # samples not yet consumed (B, n)
        self.frames_out = 0

    def _empty(self) -> Tensor:
        device = self.frontend.cmvn_mean.device
        return torch.zeros(self.batch_size, 0, self.frontend.n_mels, device=device)

    def push(self, samples: Tensor) -> Tensor:
        if samples.dim() != 2 or samples.shape[0] != self.batch_size:
            raise ValueError(f"FeatureStream.push: expected samples of shape ({self.batch_size}, s), got {tuple(samples.shape)}")
        samples = samples.float().to(self.frontend.cmvn_mean.device)
        buf = samples if self.buffer is None else torch.cat([self.buffer, samples], dim=1)
        win, hop = self.frontend.window, self.frontend.hop_length
        n = 0 if buf.shape[1] < win else 1 + (buf.shape[1] - win) // hop
        if n == 0:
            self.buffer = buf
            return self._empty()
        feats = self.frontend.normalize(self.frontend.log_mel(buf[:, : (n - 1) * hop + win]))
        self.buffer = buf[:, n * hop:]
        self.frames_out += n
        return feats

    def flush(self) -> Tensor:
        buf, self.buffer = self.buffer, None
        if self.frames_out > 0 or buf is None or buf.shape[1] == 0:
            return self._empty()
        self.frames_out += 1
        return self.frontend.normalize(self.frontend.log_mel(buf))  # pads to one window, like forward()


class SpecAugment(nn.Module):
    """SpecAugment masks (Park et al. 2019) on (B, T, F) features, drawn independently per sample, after an
    optional frequency warp.

    ``freq_warp`` w > 0: each sample's mel axis is stretched by a factor drawn uniformly from [1 - w, 1 + w]
    (output bin f reads bin f / factor, linearly interpolated, the top bin repeated past the edge), which moves
    formants as a longer or shorter vocal tract would: a mel-domain form of vocal tract length perturbation
    (Jaitly & Hinton 2013), for generalizing to voices not seen in training.

    Active only in training mode; in eval mode (or with nothing configured) the input comes back
    unchanged. Masked values are 0, the global mean after normalization."""

    def __init__(self, freq_masks: int = 2, freq_mask_param: int = 27, time_masks: int = 2,
                 time_mask_param: int = 100, time_mask_p: float = 0.2, freq_warp: float = 0.0):
        super().__init__()
        if not 0.0 <= freq_warp < 0.5:
            raise ValueError(f"SpecAugment: freq_warp must lie in [0, 0.5), got {freq_warp!r}")
        self.freq_warp = float(freq_warp)
        self.freq = nn.ModuleList(torchaudio.transforms.FrequencyMasking(freq_mask_param, iid_masks=True)
                                  for _ in range(freq_masks))
        self.time = nn.ModuleList(torchaudio.transforms.TimeMasking(time_mask_param, iid_masks=True, p=time_mask_p)
                                  for _ in range(time_masks))

    def warp(self, feats: Tensor) -> Tensor:
        """(B, T, F) -> (B, T, F): each sample's mel axis stretched by its own factor in [1 - w, 1 + w]."""
        b, _, f = feats.shape
        factor = 1.0 + (torch.rand(b, 1, device=feats.device) * 2.0 - 1.0) * self.freq_warp
        pos = (torch.arange(f, device=feats.device, dtype=torch.float32)[None] / factor).clamp(max=f - 1)  # (B, F)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=f - 1)
        frac = (pos - lo).to(feats.dtype)[:, None]  # (B, 1, F)
        index = lambda i: i[:, None].expand(-1, feats.shape[1], -1)  # noqa: E731
        return torch.lerp(feats.gather(2, index(lo)), feats.gather(2, index(hi)), frac)

    def forward(self, feats: Tensor) -> Tensor:
        """(B, T, F) -> (B, T, F)."""
        if not self.training:
            return feats
        if self.freq_warp > 0.0:
            feats = self.warp(feats)
        if not len(self.freq) and not len(self.time):
            return feats
        x = feats.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T): the layout torchaudio's maskings expect
        for mask in [*self.freq, *self.time]:
            x = mask(x, 0.0)
        return x.squeeze(1).transpose(1, 2)
