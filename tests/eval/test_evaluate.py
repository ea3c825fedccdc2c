from safe_av.data.records import Sample
from safe_av.eval.evaluate import chance_accuracy, normalize_answer, shuffled_audio


def _s(i, audio, qt="Audio/Counting", answer="two"):
    return Sample(str(i), "musicavqa", "q", [answer], audio=audio, question_type=qt)


def test_shuffled_audio_never_keeps_a_samples_own_file():
    # questions of one video sit side by side: rolling within a batch would keep most clips
    samples = [_s(i, f"v{i // 3}.wav") for i in range(9)] + [_s(9, None)]
    out = shuffled_audio(samples)
    assert [s.audio for s in out[:9]] == ["v1.wav"] * 3 + ["v2.wav"] * 3 + ["v0.wav"] * 3
    assert out[9].audio is None
    assert shuffled_audio([_s(0, "a.wav"), _s(1, "a.wav")])[0].audio == "a.wav"  # one file: nothing to swap


def test_chance_and_majority_baselines():
    train = [_s(0, "a", answer="two"), _s(1, "a", answer="two"), _s(2, "a", answer="three"),
             _s(3, "a", qt="Visual/Location", answer="left")]
    test = [_s(4, "a", answer="two"), _s(5, "a", answer="four"), _s(6, "a", qt="Visual/Location", answer="left")]
    out = chance_accuracy(train, test)
    assert out["chance"] == (0.5 + 0.0 + 1.0) / 3  # two answers seen for the type; 'four' never seen
    assert out["majority"] == (1 + 0 + 1) / 3
    assert out["audio_dependent_chance"] == 0.25 and out["audio_dependent_majority"] == 0.5
    assert normalize_answer(" Two! ") == "two"
