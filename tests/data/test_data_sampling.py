"""CurriculumBatchSampler: audio share, sharding, resume, determinism, weights, filters."""

from __future__ import annotations

from collections import Counter
from itertools import chain

import pytest

from safe_av.data.records import Sample
from safe_av.data.sampling import CurriculumBatchSampler

LEVELS = ("easy", "medium", "hard")


def make_samples() -> list[Sample]:
    """80 MUSIC-AVQA + 40 AudioCaps (audio) and 200 VQA (no audio); difficulty cycles."""
    out = []
    for name, n, audio in (("musicavqa", 80, True), ("audiocaps", 40, True), ("vqav2", 200, False)):
        for i in range(n):
            out.append(
                Sample(
                    id=f"{name}{i}",
                    dataset=name,
                    question="q",
                    answers=["a"],
                    audio=f"{name}{i}.wav" if audio else None,
                    difficulty=LEVELS[i % 3],
                )
            )
    return out


SAMPLES = make_samples()


def sampler(**kw) -> CurriculumBatchSampler:
    args = {"batch_size": 8, "audio_ratio": 0.25, "seed": 1} | kw
    return CurriculumBatchSampler(SAMPLES, **args)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.4, 0.5, 0.75, 1.0])
def test_every_batch_has_the_requested_audio_count(ratio):
    s = sampler(audio_ratio=ratio)
    batches = list(s)
    assert len(batches) == len(s) > 0
    want = round(ratio * 8)
    for batch in batches:
        assert len(batch) == 8 and len(set(batch)) == 8
        assert sum(SAMPLES[i].has_audio for i in batch) == want


def test_epoch_length_follows_the_scarcer_needed_pool():
    assert len(sampler(audio_ratio=0.25)) == 200 // 6  # non-audio: 6 per batch
    assert len(sampler(audio_ratio=0.75)) == 120 // 6  # audio: 6 per batch
    assert len(sampler(audio_ratio=1.0)) == 120 // 8
    assert len(sampler(audio_ratio=0.0)) == 200 // 8
    assert len(sampler(audio_ratio=0.75, drop_last=False)) == 20
    assert len(sampler(audio_ratio=0.25, drop_last=False)) == 34  # ceil(200 / 6)


def test_no_sample_repeats_within_an_epoch_without_weights():
    flat = list(chain.from_iterable(sampler(audio_ratio=0.5)))
    assert len(flat) == len(set(flat))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("weights", [None, {"musicavqa": 1.0, "audiocaps": 3.0}])
def test_ranks_see_disjoint_samples(world_size, weights):
    seen = []
    lengths = set()
    for rank in range(world_size):
        s = sampler(audio_ratio=0.5, rank=rank, world_size=world_size, dataset_weights=weights)
        s.set_epoch(4)
        batches = list(s)
        lengths.add(len(batches))
        seen.append(set(chain.from_iterable(batches)))
    assert len(lengths) == 1  # same number of steps on every rank
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not seen[a] & seen[b]


def test_resume_yields_the_same_remaining_order():
    full = sampler(audio_ratio=0.5)
    full.set_epoch(2)
    reference = list(full)
    run = sampler(audio_ratio=0.5)
    run.set_epoch(2)
    it = iter(run)
    head = [next(it) for _ in range(5)]
    state = run.state_dict()
    assert state == {"epoch": 2, "position": 5, "seed": 1, "world_size": 1}
    resumed = sampler(audio_ratio=0.5)
    resumed.load_state_dict(state)
    assert head + list(resumed) == reference
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["position"] == 0


def test_deterministic_from_seed_and_epoch():
    a, b, c = sampler(seed=7), sampler(seed=7), sampler(seed=8)
    assert list(a.epoch_batches(0)) == list(b.epoch_batches(0))
    assert a.epoch_batches(0) != c.epoch_batches(0)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    first, second = list(a), list(a)  # iterating moves to the next epoch
    assert first == b.epoch_batches(0) and second == b.epoch_batches(1)


def test_difficulty_filter():
    s = sampler(audio_ratio=0.5, difficulties={"easy", "medium"})
    used = set(chain.from_iterable(s))
    assert used and {SAMPLES[i].difficulty for i in used} == {"easy", "medium"}


def test_dataset_weights_set_the_mix():
    s = sampler(audio_ratio=1.0, dataset_weights={"musicavqa": 3.0, "audiocaps": 1.0})
    counts = Counter(SAMPLES[i].dataset for e in range(6) for i in chain.from_iterable(s.epoch_batches(e)))
    share = counts["musicavqa"] / (counts["musicavqa"] + counts["audiocaps"])
    assert 0.68 < share < 0.82  # 0.75 expected; 720 draws
    only = sampler(audio_ratio=1.0, dataset_weights={"audiocaps": 0.0})
    assert {SAMPLES[i].dataset for i in chain.from_iterable(only)} == {"musicavqa"}


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no eligible audio-bearing sample"):
        CurriculumBatchSampler(SAMPLES[120:], batch_size=4, audio_ratio=0.5)
    with pytest.raises(ValueError, match="dataset_weights names 'clotho'"):
        sampler(dataset_weights={"clotho": 1.0})
    with pytest.raises(ValueError, match=r"audio_ratio must be in \[0, 1\], got 1.5"):
        sampler(audio_ratio=1.5)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        sampler(rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed=3 but this sampler has seed=1"):
        sampler().load_state_dict({"epoch": 0, "position": 1, "seed": 3})
    with pytest.raises(ValueError, match="position=999 outside"):
        sampler().load_state_dict({"epoch": 0, "position": 999})


def test_batch_stream_falls_back_when_a_stage_filter_empties_a_pool(caplog):
    """Audio-free samples all easy, a stage asking for medium/hard at ratio 0.5: the stream drops the difficulty
    filter with a warning (it crashed mid-run at the stage change); data without audio-free samples cannot be drawn
    at ratio 0.5 and says so."""
    import logging

    from safe_av.training.data import BatchStream, SAFEDataset

    samples = ([Sample(f"a{i}", "musicavqa", "q", ["a"], audio=f"/x/{i}.wav", difficulty=d)
                for i, d in enumerate(["easy", "medium", "hard"] * 4)]
               + [Sample(f"v{i}", "vqav2", "q", ["a"], image=f"/x/{i}.jpg", difficulty="easy") for i in range(12)])
    stream = BatchStream(SAFEDataset(samples, sampling_rate=16000), lambda b: b, batch_size=4, dataset_weights=None,
                         seed=0)
    with caplog.at_level(logging.WARNING, logger="safe_av.training.data"):
        stream.configure(0.5, ["medium", "hard"])
    assert stream.difficulties is None and stream.batches_per_epoch() > 0
    assert "ignoring the difficulty filter" in caplog.text and "no eligible audio-free sample" in caplog.text
    # asking for the same stage again (what a resume does after restoring the stream) is no change: the stream
    # stays where it was instead of jumping to a new epoch
    stream.epoch, stream.position = 2, 3
    state = stream.state_dict()
    stream.configure(0.5, ["hard", "medium"])
    assert (stream.epoch, stream.position) == (2, 3)
    again = BatchStream(SAFEDataset(samples, sampling_rate=16000), lambda b: b, batch_size=4, dataset_weights=None,
                        seed=0)
    again.load_state_dict(state)
    again.configure(0.5, ["medium", "hard"])
    assert (again.epoch, again.position) == (2, 3) and again.difficulties is None
    caplog.clear()
    audio_only = BatchStream(SAFEDataset(samples[:12], sampling_rate=16000), lambda b: b, batch_size=4,
                             dataset_weights=None, seed=0)
    with caplog.at_level(logging.WARNING, logger="safe_av.training.data"):
        audio_only.configure(0.5, None)
    assert "audio_ratio=0.5 cannot be drawn: this phase's data has no audio-free sample" in caplog.text
