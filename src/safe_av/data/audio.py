"""Audio loading: read, mix to mono, resample, peak-normalise, pad/truncate.

Reads with soundfile (WAV, FLAC, OGG, ...) and resamples with
``scipy.signal.resample_poly`` at the exact rational ratio ``target/orig`` reduced
by their gcd. Every failure raises `AudioError`, naming the file and what is wrong.

What `load_audio` does with odd but usable input, and how the caller learns of it:

* stereo is mixed (flag ``mixed_to_mono``), another rate is resampled (``resampled``);
* an over-long clip is cut to its first ``max_seconds`` (``truncated``); only those
  frames are read from disk (a 1-hour file costs what ``max_seconds`` of it cost), a
  WARNING names the file, its duration and the limit once per file and process (so
  once per DataLoader worker at most), and training and evaluation count it
  (``item["audio_truncated"]`` → ``batch["audio_truncated"]``; copied to the item's ``meta`` for the evaluation
  records);
* a silent clip (peak <= -80 dBFS in the part used) raises `AudioError` with the
  reason `SILENT_REASON` - the one ``safe data validate`` gives - so training,
  evaluation and the feature cache skip and count it; ``allow_silent=True`` is the
  opt-in for a caller that wants zeros (flag ``silent``).

`audio_problem` (``safe data validate``) reads the whole file in blocks and also
reports a WAV whose data chunk declares more frames than the file holds (a truncated
download): soundfile itself silently reads what is there, which is what training uses.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from fractions import Fraction
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from safe_av.data.records import DataError

log = logging.getLogger(__name__)

SILENCE_PEAK = 1e-4
"""Peak amplitude (-80 dBFS) at or below which a clip counts as silent."""
SILENT_REASON = "silent clip (peak <= -80 dBFS)"
"""The reason of the `AudioError` for a silent clip (loader and validation alike)."""
ON_LONG = ("truncate", "error")
SAMPLE_RATES = (1_000, 768_000)
"""The sample rates (Hz) a clip may have: telephone-band up to the highest rate audio interfaces record. A header
outside them is an error (a corrupt header, or not audio); polyphase resampling from, say, 5,000,011 Hz would build
a filter of hundreds of MB."""
MAX_RESAMPLE_FACTOR = 10_000
"""The largest up/down factor of exact polyphase resampling (its filter has ~20 taps per unit: 1.6 MB at this bound);
rarer ratios (44101 -> 16000 Hz reduces to 16000/44101) resample at the nearest ratio with factors up to this: a
relative rate error below 1e-4 (at most 5e-5 over every rate in SAMPLE_RATES to 16 or 48 kHz; 0.1 cent of pitch)."""
_READ_ERRORS = (sf.SoundFileError, RuntimeError, OSError, ValueError, EOFError)
_WARNED_CUT: set[str] = set()  # files whose truncation was logged at WARNING in this process
_PCM_TAGS = (1, 3, 6, 7, 0xFFFE)  # WAVE format tags with one block_align per frame: PCM, float, A/mu-law, extensible


class AudioError(DataError):
    """An audio file that cannot be used: missing, a directory, unreadable, empty, too short or silent."""


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
    """All ~0 (only with ``allow_silent=True``: otherwise `load_audio` raises)."""
    truncated: bool = False
    """Longer than ``max_seconds``: only its first ``max_seconds`` are in ``waveform``."""
    resampled: bool = False
    mixed_to_mono: bool = False


def path_problem(path: str | Path) -> AudioError | None:
    """Why ``path`` cannot be opened as an audio file (missing, a directory, not a regular file), or None."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # one system call: this runs for every sample loaded
    except FileNotFoundError:
        return AudioError(path, "audio", str(path), "file not found")
    except OSError as err:
        return AudioError(path, "audio", str(path), f"cannot read the file ({err.strerror or err})")
    if stat.S_ISDIR(mode):
        return AudioError(path, "audio", str(path), "is a directory")
    if not stat.S_ISREG(mode):
        return AudioError(path, "audio", str(path), "not a regular file")
    return None


def read_audio(path: str | Path, *, max_seconds: float | None = None) -> tuple[np.ndarray, int, int, int]:
    """Read (the head of) an audio file as mono float32, and its full length.

    Args:
        path: audio file.
        max_seconds: read only the first ``ceil(max_seconds * sr)`` frames (None: all).

    Returns:
        ``(samples (T,), sample_rate, channels, total_frames)``; ``total_frames`` is the
        whole file's length (from its header), T ≤ it.

    Raises:
        AudioError: missing, a directory, unreadable/corrupt, empty (0 frames) or non-finite
            (in the part read).
    """
    path = Path(path)
    problem = path_problem(path)
    if problem is not None:
        raise problem
    try:
        with sf.SoundFile(str(path)) as f:
            sr, channels, total = int(f.samplerate), int(f.channels), int(f.frames)
            problem = sample_rate_problem(path, sr)  # raised below: AudioError is a ValueError, caught here
            want = -1 if max_seconds is None or not f.seekable() else min(total, int(np.ceil(max_seconds * sr)))
            data = None if problem else f.read(frames=want, dtype="float32", always_2d=True)
    except _READ_ERRORS as err:
        raise AudioError(path, "audio", path.name, f"unreadable or corrupt audio ({err})") from err
    if problem is not None:
        raise problem
    if want < 0 or data.shape[0] < want:  # read to the end (or the body ended early): that is the length
        total = data.shape[0]
    if data.shape[0] == 0:
        raise AudioError(path, "frames", 0, "empty audio file (0 frames)")
    if not np.isfinite(data).all():
        raise AudioError(path, "samples", "NaN/inf", "audio contains non-finite samples")
    mono = data[:, 0] if channels == 1 else data.mean(axis=1)  # (T,)
    return np.ascontiguousarray(mono, dtype=np.float32), sr, channels, total


def read_mono(path: str | Path, *, max_seconds: float | None = None) -> tuple[np.ndarray, int, int]:
    """Read an audio file (or its first ``max_seconds``) as mono float32.

    Returns:
        ``(samples (T,), sample_rate, channels)``.

    Raises:
        AudioError: as `read_audio`.
    """
    x, sr, channels, _ = read_audio(path, max_seconds=max_seconds)
    return x, sr, channels


def wav_declared_frames(path: str | Path) -> int | None:
    """Frames the ``data`` chunk header of a PCM/float RIFF-WAVE file declares (cheap: header only).

    Returns:
        The declared frame count, or None when ``path`` is not such a WAV, its header is
        unreadable, or the size is a streaming writer's placeholder (0 or 0xFFFFFFFF).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            tag = block_align = None
            for _ in range(64):  # chunks before "data" are few (fmt, fact, LIST, ...)
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, size = chunk[:4], int.from_bytes(chunk[4:], "little")
                if cid == b"data":
                    if tag not in _PCM_TAGS or not block_align or size in (0, 0xFFFFFFFF):
                        return None
                    return size // block_align
                skip = size + (size & 1)  # chunks are word-aligned
                if cid == b"fmt ":
                    body = f.read(min(size, 16))
                    if len(body) < 14:
                        return None
                    tag, block_align = int.from_bytes(body[:2], "little"), int.from_bytes(body[12:14], "little")
                    skip -= len(body)
                f.seek(skip, 1)
    except OSError:
        return None
    return None


#: cut clips named at WARNING per process; later ones at DEBUG (every cut is still counted: truncated_audio)
CUT_WARNINGS = 5


def warn_truncated(path: str | Path, duration_s: float, max_seconds: float) -> None:
    """Log once per file and process that a clip is cut to its first ``max_seconds``: the first
    :data:`CUT_WARNINGS` files at WARNING, then one note that the rest go to DEBUG (a corpus of long clips would
    otherwise fill the log; the counts say how many)."""
    key = str(path)
    if key in _WARNED_CUT:
        return
    if len(_WARNED_CUT) < 100_000:
        _WARNED_CUT.add(key)
    n = len(_WARNED_CUT)
    level = logging.WARNING if n <= CUT_WARNINGS else logging.DEBUG
    log.log(level, "audio clip cut: %s lasts %.2f s; only its first %g s are used (data.max_audio_seconds)",
            path, duration_s, max_seconds)
    if n == CUT_WARNINGS:
        log.warning("further cut clips are logged at DEBUG only; every one is counted (metrics.json: truncated_audio, "
                    "eval_samples.*.truncated_audio; safe eval: n_truncated_audio; the feature cache's stats: "
                    "'truncated')")


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling at the ratio ``target_sr / orig_sr``: exact when it reduces to factors up to
    :data:`MAX_RESAMPLE_FACTOR` (every common rate), else the nearest ratio that does (the filter's length grows
    with the factors: 20 taps per unit)."""
    if orig_sr == target_sr:
        return x
    g = gcd(orig_sr, target_sr)
    up, down = target_sr // g, orig_sr // g
    if max(up, down) > MAX_RESAMPLE_FACTOR:
        ratio = Fraction(target_sr, orig_sr)
        limit = MAX_RESAMPLE_FACTOR if ratio <= 1 else max(1, MAX_RESAMPLE_FACTOR * orig_sr // target_sr)
        near = ratio.limit_denominator(limit)
        up, down = near.numerator, near.denominator
    return resample_poly(x, up, down).astype(np.float32)


def sample_rate_problem(path: str | Path, sr: int) -> AudioError | None:
    """An `AudioError` naming the sample rate when it is outside :data:`SAMPLE_RATES`, else None."""
    lo, hi = SAMPLE_RATES
    if lo <= sr <= hi:
        return None
    return AudioError(path, "sample_rate", sr, f"outside the supported {lo}-{hi} Hz (a corrupt header?)")


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
    allow_silent: bool = False,
) -> AudioClip:
    """Load a clip as a fixed-length mono waveform at ``target_sr``.

    Only the first ``max_seconds`` are read from disk; the full duration comes from the header.

    Args:
        path: audio file.
        target_sr: output sample rate (16000 for Whisper, 48000 for CLAP).
        max_seconds: output length; longer clips are truncated (or rejected).
        min_seconds: clips shorter than this raise `AudioError`.
        on_long: ``"truncate"`` (keep the first ``max_seconds``, flag ``truncated``, log a
            WARNING once per file) or ``"error"``.
        allow_silent: return a silent clip as zeros (flag ``silent``) instead of raising.

    Returns:
        `AudioClip` with ``waveform`` (target_sr * max_seconds,) float32.

    Raises:
        AudioError: missing, a directory, corrupt, empty, non-finite, too short, silent (unless
            ``allow_silent``; reason `SILENT_REASON`), or too long with ``on_long="error"``.
        ValueError: bad arguments.
    """
    if on_long not in ON_LONG:
        raise ValueError(f"on_long must be one of {ON_LONG}, got {on_long!r}")
    if target_sr <= 0 or max_seconds <= 0:
        raise ValueError(f"target_sr and max_seconds must be > 0, got {target_sr}, {max_seconds}")
    x, sr, channels, total = read_audio(path, max_seconds=max_seconds)  # cut before resampling: less work
    duration = total / sr
    if duration < min_seconds:
        raise AudioError(path, "duration_s", round(duration, 4), f"too short (< {min_seconds} s)")
    truncated = duration > max_seconds
    if truncated and on_long == "error":
        raise AudioError(path, "duration_s", round(duration, 3), f"too long (> {max_seconds} s)")
    silent_raw = float(np.abs(x).max()) <= SILENCE_PEAK
    x = resample(x, sr, target_sr)
    x, silent = peak_normalise(x)
    if silent and not allow_silent:
        raise _silent(path, max_seconds if truncated else None,
                      "" if silent_raw else f" after resampling {sr} -> {target_sr} Hz")
    if truncated:
        warn_truncated(path, duration, max_seconds)
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


def audio_problem(path: str | Path, *, min_seconds: float = 0.1, allow_silent: bool = False,
                  max_seconds: float | None = 10.0) -> AudioError | None:
    """Why an audio file is unusable (the error, naming its field), or None when it is fine (for validation).

    Reads the whole file, in blocks (bounded memory): a corrupt body is caught, not only a bad
    header. A WAV whose data chunk declares more frames than the file holds (a truncated
    download) is reported. Over-long, stereo or other-rate files are fine: the loader handles them.
    Silence is judged on the part training uses, the first ``max_seconds`` (``data.max_audio_seconds``, 10 s
    by default; None: the whole file), as `load_audio` judges it.
    """
    path = Path(path)
    problem = path_problem(path)
    if problem is not None:
        return problem
    frames, peak = 0, 0.0
    try:
        with sf.SoundFile(str(path)) as f:
            sr = int(f.samplerate)
            if (rate := sample_rate_problem(path, sr)) is not None:
                return rate
            used = None if max_seconds is None else int(np.ceil(max_seconds * sr))  # frames training reads
            for block in f.blocks(blocksize=1 << 18, dtype="float32", always_2d=True):
                if not block.size:
                    continue
                if not np.isfinite(block).all():
                    return AudioError(path, "samples", "NaN/inf", "audio contains non-finite samples")
                part = block if used is None else block[: max(used - frames, 0)]  # only the part used counts
                mono = part[:, 0] if part.shape[1] == 1 else part.mean(axis=1)
                if mono.size:
                    peak = max(peak, float(np.abs(mono).max()))
                frames += block.shape[0]
    except _READ_ERRORS as err:
        return AudioError(path, "audio", path.name, f"unreadable or corrupt audio ({err})")
    if frames == 0:
        return AudioError(path, "frames", 0, "empty audio file (0 frames)")
    declared = wav_declared_frames(path)
    if declared is not None and declared > frames:
        return AudioError(path, "frames", f"{frames} of {declared}",
                          f"file shorter than its header says: {frames} of {declared} frames (truncated download?)")
    duration = frames / sr
    if duration < min_seconds:
        return AudioError(path, "duration_s", round(duration, 4), f"too short (< {min_seconds} s)")
    if not allow_silent and peak <= SILENCE_PEAK:
        return _silent(path, max_seconds if (max_seconds is not None and duration > max_seconds) else None)
    return None


def _silent(path: Path, cut_at: float | None, how: str = "") -> AudioError:
    """The silent-clip error, worded the same by the loader and by validation; ``cut_at``: the clip is longer and
    only its first ``cut_at`` seconds are used."""
    where = "" if cut_at is None else f" in its first {cut_at:g} s, the part used (data.max_audio_seconds)"
    return AudioError(path, "samples", "all ~0", f"{SILENT_REASON}{where}{how}")


def check_audio(path: str | Path, *, min_seconds: float = 0.1, allow_silent: bool = False) -> str | None:
    """:func:`audio_problem` as a message (file, field, value, reason), or None when the file is fine."""
    err = audio_problem(path, min_seconds=min_seconds, allow_silent=allow_silent)
    return None if err is None else str(err)


def probe_duration(path: str | Path) -> float | None:
    """Clip length in seconds from the file header (cheap), or None if unreadable."""
    try:
        return float(sf.info(str(path)).duration)
    except _READ_ERRORS:
        return None
