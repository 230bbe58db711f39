"""Audio loading for speech: decode with soundfile, check, mix or refuse channels, resample to 16 kHz.

``load_audio`` returns a float32 waveform ``(S,)`` in [-1, 1] at ``sample_rate`` or raises
:class:`AudioError`, whose message names the file, what is wrong with it and what was expected, and
whose ``kind`` says which check failed (evaluators count skipped files by it):

======================  ==============================================================================
kind                    the file …
======================  ==============================================================================
``missing``             does not exist (or is not a regular file)
``unsupported_format``  is in a container/codec libsndfile cannot decode (m4a, aac, wma, …, or mp3 with
                        a libsndfile older than 1.1)
``corrupt``             cannot be decoded, is truncated (fewer samples than its header declares),
                        holds non-finite samples or declares a sample rate outside 1 kHz..768 kHz
``empty``               decodes to 0 samples
``silent``              has a peak amplitude below :data:`SILENCE_PEAK` (all ~0)
``channels``            has more than one channel and ``mono="error"``
``too_long``            lasts longer than ``max_seconds``
======================  ==============================================================================

WAV, FLAC, OGG (Vorbis/Opus) and, with libsndfile ≥ 1.1, MP3 decode through soundfile. libsndfile
quietly shortens a truncated WAV to the bytes present, so the RIFF header's ``data`` size is checked here.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import torch

SAMPLE_RATE = 16000
DEFAULT_MAX_SECONDS = 60.0
SILENCE_PEAK = 1e-4  # ~ -80 dBFS; below 16-bit dither level x3: nothing audible is left
# Sample rates a header may plausibly declare (telephone 8 kHz is common, 1 kHz is not speech; 768 kHz is the
# highest rate audio interfaces record). Outside, the header is corrupt: a 1 Hz rate would resample one
# second of samples into hours (gigabytes), a 2 GHz rate a minute of speech into a few samples.
SAMPLE_RATE_RANGE = (1000, 768000)
MONO_MODES = ("error", "mix")
KINDS = ("missing", "unsupported_format", "corrupt", "empty", "silent", "channels", "too_long")

# Extensions of formats libsndfile never decodes: say so, and how to convert, instead of "corrupt".
_FOREIGN = {".m4a": "AAC/ALAC in MP4", ".mp4": "MP4", ".aac": "AAC", ".wma": "WMA", ".webm": "WebM",
            ".amr": "AMR", ".ac3": "AC-3", ".mka": "Matroska"}
_CONVERT = "convert it first, e.g. `ffmpeg -i {src} -ac 1 -ar 16000 {dst}`"


class AudioError(ValueError):
    """A file that cannot be used as speech input. ``path``: the file; ``kind``: one of :data:`KINDS`."""

    def __init__(self, path: str | os.PathLike, kind: str, problem: str):
        self.path = str(path)
        self.kind = kind
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def _wav_data_shortfall(path: Path, size: int) -> tuple[int, int] | None:
    """(declared, present) bytes of a RIFF/WAVE ``data`` chunk when fewer are present; else None."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return None
        endian = "<" if head[:4] == b"RIFF" else ">"
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, csize = chunk[:4], struct.unpack(endian + "I", chunk[4:])[0]
            if cid == b"data":
                # 0 and 0xFFFFFFFF mark "length unknown" (streamed writers): nothing to compare with.
                if csize in (0, 0xFFFFFFFF):
                    return None
                present = size - (pos + 8)
                return (csize, present) if present < csize else None
            pos += 8 + csize + (csize & 1)
    return None


def _wav_declares_no_samples(path: Path) -> bool:
    """True for a RIFF/WAVE file whose ``data`` chunk is declared 0 bytes and nothing follows it."""
    try:
        data = path.read_bytes()[:4096]
    except OSError:
        return False
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return False
    i = data.find(b"data", 12)
    return i >= 0 and len(data) == i + 8 and struct.unpack("<I", data[i + 4:i + 8])[0] == 0


def _open_error(path: Path, err: Exception) -> AudioError:
    import soundfile as sf

    suffix = path.suffix.lower()
    dst = path.with_suffix(".wav").name
    if suffix in _FOREIGN:
        return AudioError(path, "unsupported_format",
                          f"{_FOREIGN[suffix]} ({suffix}) audio cannot be decoded by libsndfile "
                          f"{sf.__libsndfile_version__}; expected WAV, FLAC, OGG or MP3 — "
                          + _CONVERT.format(src=path.name, dst=dst))
    if suffix == ".mp3" and "MP3" not in sf.available_formats():
        return AudioError(path, "unsupported_format",
                          f"MP3 needs libsndfile >= 1.1, this one is {sf.__libsndfile_version__}; expected WAV, FLAC "
                          "or OGG — upgrade soundfile or " + _CONVERT.format(src=path.name, dst=dst))
    if _wav_declares_no_samples(path):
        return AudioError(path, "empty", "the WAV file holds 0 samples; expected speech audio")
    return AudioError(path, "corrupt", f"cannot decode audio ({err}); expected a readable WAV, FLAC, OGG or MP3 file "
                                       "(the file may be corrupt, truncated or in another format)")


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file's header (no decoding); raises :class:`AudioError`."""
    import soundfile as sf

    path = Path(path)
    _check_exists(path)
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as err:
        raise _open_error(path, err) from None
    return info.frames / info.samplerate if info.samplerate else 0.0


def _check_exists(path: Path) -> int:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise AudioError(path, "missing", "audio file not found") from None
    except OSError as err:
        raise AudioError(path, "missing", f"audio file cannot be accessed ({err.strerror})") from None
    if not path.is_file():
        raise AudioError(path, "missing", "is not a regular file; expected an audio file")
    if st.st_size == 0:
        raise AudioError(path, "empty", "the file is 0 bytes; expected speech audio")
    return st.st_size


def load_audio(path: str | os.PathLike, *, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = DEFAULT_MAX_SECONDS,
               mono: str = "error") -> torch.Tensor:
    """Decode ``path`` to a float32 waveform ``(S,)`` at ``sample_rate`` Hz (resampled if needed).

    ``max_seconds``: longer files raise (checked from the header, before decoding); None: no limit.
    ``mono``: ``"error"`` refuses files with more than one channel, ``"mix"`` averages the channels.
    Raises :class:`AudioError` (see the module docstring for the kinds).
    """
    import soundfile as sf

    if mono not in MONO_MODES:
        raise ValueError(f"mono={mono!r}: expected one of {', '.join(MONO_MODES)}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate={sample_rate}: expected a positive number of Hz")
    path = Path(path)
    size = _check_exists(path)
    try:
        with sf.SoundFile(str(path)) as f:
            sr, channels, declared = f.samplerate, f.channels, f.frames
            if not SAMPLE_RATE_RANGE[0] <= sr <= SAMPLE_RATE_RANGE[1]:  # before reading (and the duration check)
                raise AudioError(path, "corrupt", f"declares a sample rate of {sr} Hz; expected {SAMPLE_RATE_RANGE[0]} "
                                 f"to {SAMPLE_RATE_RANGE[1]} Hz (the header is corrupt)")
            if channels > 1 and mono == "error":
                raise AudioError(path, "channels", f"has {channels} channels; expected mono (1 channel) — "
                                 "pass mono='mix' (--mono mix) to average the channels")
            if max_seconds is not None and sr > 0 and declared / sr > max_seconds:
                raise AudioError(path, "too_long", f"lasts {declared / sr:.2f} s; expected at most {max_seconds:g} s "
                                 "(max_seconds)")
            data = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError) as err:
        raise _open_error(path, err) from None
    frames = data.shape[0]
    if frames == 0:
        raise AudioError(path, "empty", "decodes to 0 samples; expected speech audio")
    if path.suffix.lower() in (".wav", ".wave", "") and (short := _wav_data_shortfall(path, size)):
        raise AudioError(path, "corrupt", f"is truncated: its header declares {short[0]} bytes of samples but only "
                         f"{short[1]} are present")
    if declared > 0 and frames < declared:
        raise AudioError(path, "corrupt", f"is truncated: its header declares {declared} samples but only {frames} "
                         "could be decoded")
    if max_seconds is not None and frames / sr > max_seconds:  # headers may under-declare (streamed writers)
        raise AudioError(path, "too_long", f"lasts {frames / sr:.2f} s; expected at most {max_seconds:g} s (max_seconds)")
    wave = torch.from_numpy(data)
    if not torch.isfinite(wave).all():
        raise AudioError(path, "corrupt", "holds NaN or infinite samples; expected finite PCM values")
    wave = wave.mean(dim=1) if channels > 1 else wave[:, 0]
    peak = wave.abs().max().item()
    if peak < SILENCE_PEAK:
        db = "-inf" if peak == 0 else f"{20 * math.log10(peak):.0f}"
        raise AudioError(path, "silent", f"is silent (peak amplitude {peak:.2g}, {db} dBFS); expected speech with a "
                         f"peak of at least {SILENCE_PEAK:g}")
    if sr != sample_rate:
        import torchaudio.functional as AF

        wave = AF.resample(wave, sr, sample_rate)
    return wave.contiguous()
