"""Audio loading: every bad input has a clear error or a flag; real values are checked."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from data_fixtures import write_tone

from safe_av.data.audio import (
    SILENT_REASON,
    AudioError,
    check_audio,
    load_audio,
    probe_duration,
    resample,
    wav_declared_frames,
)
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


@pytest.mark.parametrize("sr", [44101, 767_999, 7_999])
def test_odd_rate_resamples_near_the_exact_ratio_with_a_bounded_filter(tmp_path, sr):
    """16000/44101 does not reduce: exact polyphase would build a ~900k-tap filter (and 20 M taps for a 1 MHz
    header); the nearest ratio with factors <= 10000 keeps length and pitch."""
    path = write_tone(tmp_path / "a.wav", 1.0, sr=sr, freq=440.0)
    clip = load_audio(path, target_sr=16000, max_seconds=1.0)
    assert clip.resampled and clip.orig_sr == sr
    assert abs(clip.num_valid - 16000) <= 2
    spectrum = np.abs(np.fft.rfft(clip.waveform))
    assert np.argmax(spectrum) * 16000 / clip.waveform.size == pytest.approx(440.0, abs=2.0)


@pytest.mark.parametrize("sr", [500, 1_000_003, 5_000_011])
def test_sample_rate_outside_the_supported_range_is_an_error_naming_it(tmp_path, sr):
    path = tmp_path / "odd.wav"
    sf.write(path, np.full(int(sr * 0.2), 0.5, dtype=np.float32), sr)
    with pytest.raises(AudioError, match=rf"odd.wav: field 'sample_rate' = {sr}: outside the supported"):
        load_audio(path, target_sr=16000, max_seconds=1.0)
    assert f"field 'sample_rate' = {sr}" in check_audio(path)


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


def test_silent_clip_is_an_error_unless_allowed(tmp_path):
    """A silent clip is rejected with validate's reason (so loaders skip and count it); opt-in keeps zeros."""
    path = write_tone(tmp_path / "silent.wav", 1.0, amp=0.0)
    with pytest.raises(AudioError) as err:
        load_audio(path, target_sr=16000, max_seconds=2.0)
    assert (err.value.field, err.value.value, err.value.reason) == ("samples", "all ~0", SILENT_REASON)
    assert err.value.path.endswith("silent.wav")
    assert check_audio(path) == str(err.value)  # the same message as safe data validate
    clip = load_audio(path, target_sr=16000, max_seconds=2.0, allow_silent=True)
    assert clip.silent and clip.num_valid == 16000
    assert np.all(clip.waveform == 0) and np.isfinite(clip.waveform).all()
    assert check_audio(path, allow_silent=True) is None


def test_clip_silent_in_the_part_used_is_an_error(tmp_path):
    """Silent for its first max_seconds, loud later: what the model would get is silence."""
    path = tmp_path / "late.wav"
    data = np.zeros(3 * 8000, dtype=np.float32)
    data[2 * 8000:] = 0.5
    sf.write(str(path), data, 8000)
    pattern = (r"late.wav: field 'samples'.*silent clip \(peak <= -80 dBFS\) in its first 1 s, the part used "
               r"\(data.max_audio_seconds\)$")
    with pytest.raises(AudioError, match=pattern):
        load_audio(path, target_sr=8000, max_seconds=1.0)
    assert load_audio(path, target_sr=8000, max_seconds=3.0).num_valid == 24000


def test_over_long_clip_is_read_only_in_part_with_the_same_output(tmp_path, monkeypatch, caplog):
    """Only ceil(max_seconds * sr) frames are read, yet the full duration is known; the waveform equals a full
    read cut afterwards; the cut is logged once per file."""
    import safe_av.data.audio as audio

    path = write_tone(tmp_path / "long.wav", 30.0, sr=8000, channels=2, freq=300.0)
    asked = []
    real_read = sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        asked.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    with caplog.at_level("WARNING", logger="safe_av.data.audio"):
        clip = load_audio(path, target_sr=16000, max_seconds=2.5)
        load_audio(path, target_sr=16000, max_seconds=2.5)
    assert asked == [20000, 20000]  # 2.5 s at 8 kHz, not 240000
    assert clip.truncated and clip.orig_duration_s == pytest.approx(30.0) and clip.num_valid == 40000
    full, sr = sf.read(str(path), dtype="float32", always_2d=True)
    ref = audio.peak_normalise(audio.resample(full.mean(axis=1)[:20000], 8000, 16000))[0]
    np.testing.assert_array_equal(clip.waveform, ref[:40000])
    cut = [r.getMessage() for r in caplog.records if "cut" in r.getMessage()]
    assert len(cut) == 1 and "long.wav lasts 30.00 s" in cut[0] and "first 2.5 s" in cut[0]


@pytest.mark.parametrize("seconds,sr,channels", [(2.0, 16000, 1), (1.3, 44100, 2), (3.0, 8000, 1)])
def test_short_clips_are_read_whole_as_before(tmp_path, seconds, sr, channels):
    """A clip within max_seconds is read in full: the output equals the whole-file read (sf.read) pipeline."""
    import safe_av.data.audio as audio

    path = write_tone(tmp_path / "s.wav", seconds, sr=sr, channels=channels)
    clip = load_audio(path, target_sr=16000, max_seconds=3.0)
    full, _ = sf.read(str(path), dtype="float32", always_2d=True)
    mono = full[:, 0] if channels == 1 else full.mean(axis=1)
    ref = audio.peak_normalise(audio.resample(mono, sr, 16000))[0]
    assert not clip.truncated and clip.num_valid == min(ref.size, 48000)
    np.testing.assert_array_equal(clip.waveform[: clip.num_valid], ref[: clip.num_valid])
    assert np.all(clip.waveform[clip.num_valid:] == 0)


def test_directory_is_named_as_such(tmp_path):
    folder = tmp_path / "clip.wav"
    folder.mkdir()
    with pytest.raises(AudioError, match=r"clip.wav.*: is a directory"):
        load_audio(folder, target_sr=16000)
    assert check_audio(folder).endswith("is a directory")


def test_wav_shorter_than_its_header_is_reported_but_loads(tmp_path):
    """A truncated download: libsndfile reads what is there; validate reports the header mismatch."""
    good = write_tone(tmp_path / "good.wav", 2.0, sr=8000)
    path = tmp_path / "half.wav"
    data = good.read_bytes()
    path.write_bytes(data[: 44 + 8000 * 2])  # header + 1 s of 16-bit frames
    assert wav_declared_frames(good) == 16000 and wav_declared_frames(path) == 16000
    assert check_audio(good) is None
    assert check_audio(path) == (f"{path}: field 'frames' = '8000 of 16000': file shorter than its header says: "
                                 "8000 of 16000 frames (truncated download?)")
    clip = load_audio(path, target_sr=8000, max_seconds=2.0)  # training does not crash: it uses what is there
    assert clip.num_valid == 8000 and clip.orig_duration_s == pytest.approx(1.0)


def test_wav_header_probe_ignores_other_files(tmp_path):
    flac = write_tone(tmp_path / "a.flac", 1.0)
    assert wav_declared_frames(flac) is None and wav_declared_frames(tmp_path / "nope.wav") is None
    ulaw = write_tone(tmp_path / "u.wav", 1.0, subtype="ULAW")
    assert wav_declared_frames(ulaw) == 16000 and check_audio(ulaw) is None


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


def test_cut_clips_are_named_at_warning_a_few_times_then_at_debug(tmp_path, monkeypatch, caplog):
    import logging

    import safe_av.data.audio as audio

    monkeypatch.setattr(audio, "_WARNED_CUT", set())
    with caplog.at_level(logging.DEBUG, logger="safe_av.data.audio"):
        for i in range(audio.CUT_WARNINGS + 3):
            audio.warn_truncated(tmp_path / f"c{i}.wav", 12.0, 10.0)
        audio.warn_truncated(tmp_path / "c0.wav", 12.0, 10.0)  # once per file
    cut = [(r.levelno, r.getMessage()) for r in caplog.records if "audio clip cut" in r.getMessage()]
    assert len(cut) == audio.CUT_WARNINGS + 3
    assert [lvl for lvl, _ in cut] == [logging.WARNING] * audio.CUT_WARNINGS + [logging.DEBUG] * 3
    assert sum("further cut clips are logged at DEBUG" in r.getMessage() for r in caplog.records) == 1


def test_validate_judges_silence_on_the_part_training_uses(tmp_path):
    """Silent for its first 10 s and sounding after: the loader (first max_seconds) skips it as silent, so
    validate calls it bad too; with a longer limit both accept it."""
    import soundfile as sf

    from safe_av.data.audio import AudioError, audio_problem, load_audio

    sr = 8000
    x = np.zeros(12 * sr, np.float32)
    x[11 * sr:] = 0.5 * np.sin(np.arange(sr) / 3)
    path = tmp_path / "late.wav"
    sf.write(path, x, sr)
    err = audio_problem(path, max_seconds=10.0)
    assert err is not None and err.field == "samples" and "in its first 10 s, the part used" in err.reason
    with pytest.raises(AudioError) as raised:
        load_audio(path, target_sr=sr, max_seconds=10.0)
    assert raised.value.reason == err.reason  # the same words from the loader and from validate
    assert audio_problem(path, max_seconds=12.0) is None and audio_problem(path, max_seconds=None) is None
    assert load_audio(path, target_sr=sr, max_seconds=12.0).num_valid == 12 * sr
