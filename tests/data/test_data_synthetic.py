"""The synthetic corpus: official formats, determinism, and answers that need the audio."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from safe_av.data.audio import load_audio
from safe_av.data.formats import audiocaps, musicavqa, vqav2
from safe_av.data.synth_scenes import QUESTION_MAKERS, Scene, Voice, make_scene, render_audio, scene_questions
from safe_av.data.synthetic import write_synthetic
from safe_av.data.validate import validate

VOCAB = {
    "yes",
    "no",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "piano",
    "violin",
    "flute",
    "drum",
    "left",
    "middle",
    "right",
}


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("format", ["musicavqa", "audiocaps", "vqav2"])
def test_synthetic_validates_in_each_format(synth_small, format):
    report = validate(format, synth_small[format])
    assert report.ok, report.summary() + "\n" + "\n".join(map(str, report.bad))
    assert all(n > 0 for n in report.samples.values()) and report.files_checked > 0


def test_same_seed_same_bytes(tmp_path, synth_small):
    again = write_synthetic(tmp_path / "again", seed=0, small=True)
    assert _digest(again["musicavqa"].parent) == _digest(synth_small["musicavqa"].parent)
    other = write_synthetic(tmp_path / "other", seed=1, small=True)
    assert _digest(other["musicavqa"]) != _digest(synth_small["musicavqa"])


def test_musicavqa_covers_every_scenario_type_pair_with_closed_answers(synth_small):
    samples = [s for split in ("train", "val", "test") for s in musicavqa.read(synth_small["musicavqa"], split).samples]
    pairs = {tuple(s.question_type.split("/")) for s in samples}
    assert pairs == set(QUESTION_MAKERS)
    assert {s.answers[0] for s in samples} <= VOCAB
    assert all("<" not in s.question for s in samples)  # placeholders were filled by the reader


def test_other_formats_read_back(synth_small):
    caps = audiocaps.read(synth_small["audiocaps"], "val").samples
    assert caps and all(len(s.answers) == 5 for s in caps)
    vqa = vqav2.read(synth_small["vqav2"], "train").samples
    assert vqa and all(len(s.answers) == 10 for s in vqa)
    assert {s.question_type for s in vqa} <= {"yes/no", "number", "other"}


def test_clip_lengths_cover_all_difficulties():
    rng = np.random.default_rng(0)
    durations = [make_scene(rng).duration for _ in range(300)]
    assert min(durations) >= 2.0 and max(durations) <= 13.0
    assert any(d < 5 for d in durations) and any(5 <= d <= 10 for d in durations) and any(d > 10 for d in durations)


def test_audio_answers_are_not_predictable_from_frame_and_question():
    """Best guess given (question, frame) is far from perfect for Audio/Audio-Visual types."""
    rng = np.random.default_rng(1)
    table: dict[tuple, dict[tuple, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for _ in range(3000):
        scene = make_scene(rng)
        frame = tuple(sorted(scene.position.items()))
        for scenario, qtype, template, values, answer in scene_questions(scene, rng):
            table[(scenario, qtype)][(template, tuple(values), frame)][answer] += 1
    for (scenario, qtype), groups in table.items():
        total = sum(sum(c.values()) for c in groups.values())
        best = sum(c.most_common(1)[0][1] for c in groups.values()) / total
        if scenario == "Visual":
            assert best == 1.0, (scenario, qtype)
        else:
            assert best < 0.75, (scenario, qtype, best)
    existential = table[("Audio-Visual", "Existential")]
    yes = sum(c["yes"] for c in existential.values()) / sum(sum(c.values()) for c in existential.values())
    assert 0.45 < yes < 0.55


def _band_energy(wave: np.ndarray, sr: int, f0: float) -> float:
    spectrum = np.abs(np.fft.rfft(wave)) ** 2
    freqs = np.fft.rfftfreq(wave.size, 1 / sr)
    return float(spectrum[(freqs > f0 * 0.97) & (freqs < f0 * 1.03)].sum() / spectrum.sum())


def test_timbre_identifies_the_sounding_instrument():
    rng = np.random.default_rng(0)

    def solo(name):
        scene = Scene(
            duration=2.0,
            position={name: "left", "piano" if name != "piano" else "drum": "right"},
            voices={name: Voice(onset=0.1, starts=[0.1, 0.8], gain=1.0)},
        )
        return render_audio(scene, 8000, rng)

    assert _band_energy(solo("flute"), 8000, 784) > 0.5
    assert _band_energy(solo("violin"), 8000, 392) > 0.2 and _band_energy(solo("violin"), 8000, 784) < 0.3
    assert _band_energy(solo("piano"), 8000, 262) > 0.3
    assert _band_energy(solo("drum"), 8000, 784) < 0.05


def test_louder_voice_is_louder_and_notes_are_countable(tmp_path):
    rng = np.random.default_rng(0)
    scene = Scene(
        duration=3.0,
        position={"flute": "left", "piano": "right"},
        voices={"flute": Voice(0.1, [0.1, 0.7, 1.3], 1.0), "piano": Voice(2.0, [2.0], 0.25)},
    )
    wave = render_audio(scene, 8000, rng)
    assert wave.shape == (24000,) and np.abs(wave).max() == pytest.approx(0.9, abs=1e-3)

    def frame(t):
        return np.abs(wave[int(t * 8000) : int((t + 0.2) * 8000)]).max()

    assert frame(0.1) > 2 * frame(2.0) > 0  # x1 vs x0.25 before the mix ramp
    envelope = np.abs(wave[:16000]).reshape(-1, 400).max(axis=1) > 0.1  # 50 ms frames, first 2 s
    onsets = np.flatnonzero(envelope[1:] & ~envelope[:-1]) + 1
    assert len(onsets) + int(envelope[0]) == 3


def test_synthetic_audio_loads_at_encoder_rate(synth_small):
    sample = musicavqa.read(synth_small["musicavqa"], "train").samples[0]
    clip = load_audio(sample.audio, target_sr=16000)
    assert clip.resampled and clip.orig_sr == 8000 and not clip.silent
    assert clip.num_valid == min(160000, int(round(clip.orig_duration_s * 16000)))


def test_ensure_synthetic_rewrites_a_corpus_of_other_sizes(tmp_path):
    import json

    from safe_av.config import DataConfig
    from safe_av.data.synthetic import ensure_synthetic

    cfg = DataConfig(root=str(tmp_path / "c"), synthetic=True, synth_videos=4, synth_vqa_images=4,
                     synth_audio_clips=3)
    assert ensure_synthetic(cfg) is True
    assert ensure_synthetic(cfg) is False  # same seed and sizes: reused
    videos = lambda: len({r["video_id"] for s in ("train", "val", "test") for r in json.loads(  # noqa: E731
        (tmp_path / "c" / "musicavqa" / "json" / f"avqa-{s}.json").read_text())})
    assert videos() == 4
    cfg.synth_videos = 6  # the config changed: never silently train on the old corpus
    assert ensure_synthetic(cfg) is True and videos() == 6
