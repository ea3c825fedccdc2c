"""Audio loading: every bad input has a clear error or a flag; real values are checked."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from data_fixtures import write_tone

from safe_av.data.audio import AudioError, check_audio, load_audio, probe_duration, resample
from safe_av.data.records import DataError


def test_mono_at_target_rate_is_normalised_and_padded(tmp_path):
    path = write_tone(tmp_path / "a.wav", 2.0, sr=16000, amp=0.25)
    clip = load_audio(path, target_sr=16000, max_seconds=3.0)
    assert clip.waveform.dtype == np.float32 and clip.waveform.shape == (48000,)
    assert clip.num_valid == 32000
    assert clip.orig_sr == 16000 and clip.orig_duration_s == pytest.approx(2.0)
    assert np.abs(clip.waveform).max() == pytest.approx(1.0, abs=1e-3)  # peak-normalised from 0.25
    assert np.all(clip.waveform[32000:] == 0)
    assert not (clip.silent or clip.truncated or clip.resampled or clip.mixed_to_mono)


def test_wrong_rate_is_resampled_and_keeps_pitch(tmp_path):
    path = write_tone(tmp_path / "a.wav", 1.0, sr=44100, freq=1000.0)
    clip = load_audio(path, target_sr=16000, max_seconds=1.0)
    assert clip.resampled and clip.orig_sr == 44100 and clip.num_valid == 16000
    spectrum = np.abs(np.fft.rfft(clip.waveform))
    peak_hz = np.argmax(spectrum) * 16000 / clip.waveform.size
    assert peak_hz == pytest.approx(1000.0, abs=2.0)


def test_resample_uses_exact_ratio():
    x = np.ones(441, dtype=np.float32)
    assert resample(x, 44100, 16000).shape == (160,)
    assert resample(x, 16000, 16000) is x


def test_stereo_is_mixed_to_mono(tmp_path):
    path = write_tone(tmp_path / "s.wav", 1.0, sr=16000, channels=2, amp=0.8)
    clip = load_audio(path, target_sr=16000, max_seconds=1.0)
    assert clip.mixed_to_mono
    mono_ref = 0.75 * 0.8 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)  # (L + 0.5 L) / 2
    np.testing.assert_allclose(clip.waveform, mono_ref / np.abs(mono_ref).max(), atol=2e-3)


def test_over_long_is_truncated_and_flagged(tmp_path):
    path = write_tone(tmp_path / "long.wav", 12.5, sr=8000)
    clip = load_audio(path, target_sr=8000, max_seconds=10.0)
    assert clip.truncated and clip.num_valid == 80000 and clip.orig_duration_s == pytest.approx(12.5)
    with pytest.raises(AudioError, match=r"long.wav.*duration_s.*12.5.*too long"):
        load_audio(path, target_sr=8000, on_long="error")


def test_silent_clip_stays_zero_and_is_flagged(tmp_path):
    path = write_tone(tmp_path / "silent.wav", 1.0, amp=0.0)
    clip = load_audio(path, target_sr=16000, max_seconds=2.0)
    assert clip.silent and clip.num_valid == 16000
    assert np.all(clip.waveform == 0) and np.isfinite(clip.waveform).all()
    assert "silent" in check_audio(path)
    assert check_audio(path, allow_silent=True) is None


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match=r"nope.wav.*file not found") as err:
        load_audio(tmp_path / "nope.wav", target_sr=16000)
    assert isinstance(err.value, DataError) and isinstance(err.value, ValueError)
    assert err.value.field == "audio" and err.value.path.endswith("nope.wav")


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(AudioError, match=r"corrupt.wav.*unreadable or corrupt"):
        load_audio(path, target_sr=16000)
    assert "corrupt" in check_audio(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(str(path), np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match=r"empty.wav: field 'frames' = 0: empty audio file"):
        load_audio(path, target_sr=16000)


def test_too_short(tmp_path):
    path = write_tone(tmp_path / "short.wav", 0.05)
    with pytest.raises(AudioError, match=r"short.wav.*duration_s.*0.05.*too short"):
        load_audio(path, target_sr=16000, min_seconds=0.1)
    assert "too short" in check_audio(path)


def test_non_finite_samples(tmp_path):
    path = tmp_path / "nan.wav"
    data = np.zeros(1600, dtype=np.float32)
    data[10] = np.nan
    sf.write(str(path), data, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="non-finite"):
        load_audio(path, target_sr=16000)


def test_good_file_passes_check_and_probe(tmp_path):
    path = write_tone(tmp_path / "ok.wav", 2.5, sr=8000)
    assert check_audio(path) is None
    assert probe_duration(path) == pytest.approx(2.5)
    assert probe_duration(tmp_path / "missing.wav") is None


def test_bad_arguments(tmp_path):
    path = write_tone(tmp_path / "ok.wav", 1.0)
    with pytest.raises(ValueError, match="on_long"):
        load_audio(path, target_sr=16000, on_long="pad")
