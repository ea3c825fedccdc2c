"""Audio loading: read, mix to mono, resample, peak-normalise, pad/truncate.

Reads with soundfile (WAV, FLAC, OGG, ...) and resamples with
``scipy.signal.resample_poly`` at the exact rational ratio ``target/orig`` reduced
by their gcd. Every failure raises `AudioError`, naming the file and what is wrong.
Recoverable oddities are fixed and flagged on the returned `AudioClip` instead:
stereo is mixed (``mixed_to_mono``), another rate is resampled (``resampled``), an
over-long clip is cut (``truncated``), an all-silent clip stays zeros (``silent``).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from safe_av.data.records import DataError

SILENCE_PEAK = 1e-4
"""Peak amplitude (-80 dBFS) at or below which a clip counts as silent."""
ON_LONG = ("truncate", "error")


class AudioError(DataError):
    """An audio file that cannot be used: missing, unreadable, empty or too short."""


@dataclass
class AudioClip:
    """A fixed-length mono waveform and what was done to get it."""

    waveform: np.ndarray
    """(target_sr * max_seconds,) float32, peak-normalised, zero-padded."""
    num_valid: int
    """Samples of ``waveform`` that are real audio; the rest is padding."""
    orig_sr: int
    orig_duration_s: float
    sample_rate: int
    """The rate of ``waveform`` (the requested ``target_sr``)."""
    silent: bool = False
    truncated: bool = False
    resampled: bool = False
    mixed_to_mono: bool = False


def read_mono(path: str | Path) -> tuple[np.ndarray, int, int]:
    """Read an audio file as mono float32.

    Returns:
        ``(samples (T,), sample_rate, channels)``.

    Raises:
        AudioError: missing, unreadable/corrupt, empty (0 frames) or non-finite file.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "audio", str(path), "file not found")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, EOFError) as err:
        raise AudioError(path, "audio", path.name, f"unreadable or corrupt audio ({err})") from err
    if data.shape[0] == 0:
        raise AudioError(path, "frames", 0, "empty audio file (0 frames)")
    if not np.isfinite(data).all():
        raise AudioError(path, "samples", "NaN/inf", "audio contains non-finite samples")
    channels = data.shape[1]
    mono = data[:, 0] if channels == 1 else data.mean(axis=1)  # (T,)
    return np.ascontiguousarray(mono, dtype=np.float32), int(sr), channels


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling at the exact ratio ``target_sr / orig_sr``."""
    if orig_sr == target_sr:
        return x
    g = gcd(orig_sr, target_sr)
    return resample_poly(x, target_sr // g, orig_sr // g).astype(np.float32)


def peak_normalise(x: np.ndarray, *, silence_peak: float = SILENCE_PEAK) -> tuple[np.ndarray, bool]:
    """Scale to peak 1; a clip whose peak is at most ``silence_peak`` becomes zeros.

    Returns:
        ``(normalised, silent)``; never divides by zero.
    """
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak <= silence_peak:
        return np.zeros_like(x), True
    return (x / peak).astype(np.float32), False


def load_audio(
    path: str | Path,
    *,
    target_sr: int,
    max_seconds: float = 10.0,
    min_seconds: float = 0.1,
    on_long: str = "truncate",
) -> AudioClip:
    """Load a clip as a fixed-length mono waveform at ``target_sr``.

    Args:
        path: audio file.
        target_sr: output sample rate (16000 for Whisper, 48000 for CLAP).
        max_seconds: output length; longer clips are truncated (or rejected).
        min_seconds: clips shorter than this raise `AudioError`.
        on_long: ``"truncate"`` (keep the first ``max_seconds``) or ``"error"``.

    Returns:
        `AudioClip` with ``waveform`` (target_sr * max_seconds,) float32.

    Raises:
        AudioError: missing, corrupt, empty, non-finite, too short, or too long
            with ``on_long="error"``.
        ValueError: bad arguments.
    """
    if on_long not in ON_LONG:
        raise ValueError(f"on_long must be one of {ON_LONG}, got {on_long!r}")
    if target_sr <= 0 or max_seconds <= 0:
        raise ValueError(f"target_sr and max_seconds must be > 0, got {target_sr}, {max_seconds}")
    x, sr, channels = read_mono(path)
    duration = x.shape[0] / sr
    if duration < min_seconds:
        raise AudioError(path, "duration_s", round(duration, 4), f"too short (< {min_seconds} s)")
    truncated = duration > max_seconds
    if truncated and on_long == "error":
        raise AudioError(path, "duration_s", round(duration, 3), f"too long (> {max_seconds} s)")
    x = x[: int(np.ceil(max_seconds * sr))]  # cut before resampling: less work
    x = resample(x, sr, target_sr)
    x, silent = peak_normalise(x)
    n_out = int(round(target_sr * max_seconds))
    num_valid = min(x.shape[0], n_out)
    waveform = np.zeros(n_out, dtype=np.float32)
    waveform[:num_valid] = x[:num_valid]
    return AudioClip(
        waveform=waveform,
        num_valid=num_valid,
        orig_sr=sr,
        orig_duration_s=duration,
        sample_rate=target_sr,
        silent=silent,
        truncated=truncated,
        resampled=sr != target_sr,
        mixed_to_mono=channels > 1,
    )


def audio_problem(path: str | Path, *, min_seconds: float = 0.1, allow_silent: bool = False) -> AudioError | None:
    """Why an audio file is unusable (the error, naming its field), or None when it is fine (for validation).

    Reads the whole file (a corrupt body is caught, not only a bad header).
    Over-long, stereo or other-rate files are fine: the loader handles them.
    """
    try:
        x, sr, _ = read_mono(path)
    except AudioError as err:
        return err
    duration = x.shape[0] / sr
    if duration < min_seconds:
        return AudioError(path, "duration_s", round(duration, 4), f"too short (< {min_seconds} s)")
    if not allow_silent and float(np.abs(x).max()) <= SILENCE_PEAK:
        return AudioError(path, "samples", "all ~0", "silent clip (peak <= -80 dBFS)")
    return None


def check_audio(path: str | Path, *, min_seconds: float = 0.1, allow_silent: bool = False) -> str | None:
    """:func:`audio_problem` as a message (file, field, value, reason), or None when the file is fine."""
    err = audio_problem(path, min_seconds=min_seconds, allow_silent=allow_silent)
    return None if err is None else str(err)


def probe_duration(path: str | Path) -> float | None:
    """Clip length in seconds from the file header (cheap), or None if unreadable."""
    try:
        return float(sf.info(str(path)).duration)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, EOFError):
        return None
