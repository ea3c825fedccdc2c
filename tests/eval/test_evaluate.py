import pytest

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


def test_chance_and_majority_per_official_table_row():
    train = [_s(0, "a", answer="two"), _s(1, "a", answer="two"), _s(2, "a", answer="three"),
             _s(3, "a", qt="Visual/Location", answer="left"), _s(4, "a", qt="Visual/Location", answer="right"),
             _s(5, "a", qt="Audio-Visual/Comparative", answer="yes"),
             _s(6, "a", qt="Audio-Visual/Comparative", answer="no")]
    test = [_s(7, "a", answer="two"), _s(8, "a", answer="four"), _s(9, "a", qt="Visual/Location", answer="left"),
            _s(10, "a", qt="Audio-Visual/Comparative", answer="no")]
    out = chance_accuracy(train, test)
    chance, major, n = out["chance_by_type"], out["majority_by_type"], out["n_by_type"]
    # keys are the official table rows, as in avqa_accuracy()["table"]
    assert list(chance)[:3] == ["Audio Counting", "Audio Comparative", "Audio (avg)"] and list(chance)[-1] == "Overall"
    assert chance["Audio Counting"] == 0.25 and major["Audio Counting"] == 0.5 and n["Audio Counting"] == 2
    assert chance["Visual Location"] == 0.5 and n["Visual Location"] == 1
    assert chance["AV Comparative"] == 0.5 and n["AV Comparative"] == 1
    assert major["AV Comparative"] == 0.0  # tie 'yes'/'no': most_common keeps the first seen, 'yes'
    assert chance["Audio (avg)"] == 0.25 and n["Audio (avg)"] == 2
    assert chance["AV (avg)"] == 0.5 and n["Visual (avg)"] == 1
    assert chance["Overall"] == out["chance"] and n["Overall"] == 4
    assert chance["Audio Comparative"] is None and n["Audio Comparative"] == 0  # no question of the type


def test_evaluate_run_stores_per_type_baselines_and_conditions():
    """The final evaluation writes per-type chance / majority / n and the audio conditions' per-type tables."""
    from types import SimpleNamespace

    from safe_av.training.loop import evaluate_run

    train = [_s(0, "a", answer="two"), _s(1, "a", answer="three"),
             _s(2, "a", qt="Audio-Visual/Comparative", answer="yes")]
    test = [_s(3, "a.wav", answer="two"), _s(4, "b.wav", answer="three"),
            _s(5, "a.wav", qt="Audio-Visual/Comparative", answer="yes")]

    def predict(samples, use_audio=True, shuffle_audio=False):
        answer = "two" if not use_audio else ("yes" if shuffle_audio else None)
        return [{"dataset": s.dataset, "id": s.id, "question_type": s.question_type, "answers": s.answers,
                 "prediction": answer or s.answers[0]} for s in samples]

    trainer = SimpleNamespace(
        state=SimpleNamespace(original_vqa_accuracy=None), vqa_eval=[], avqa_eval=test, _predict=predict,
        eval_splits={"vqa": "val", "avqa": "test", "selection": "val"}, held_out={"vqa": 0, "avqa": 0},
        train_corpus=SimpleNamespace(of=lambda name: train),
        cfg=SimpleNamespace(data=SimpleNamespace(avqa_dataset="m")))
    out = evaluate_run(trainer)
    assert out["avqa_accuracy_by_type"]["Audio Counting"] == 1.0
    assert out["audio_masked_avqa_accuracy_by_type"]["Audio Counting"] == 0.5  # always 'two'
    assert out["audio_shuffled_avqa_accuracy_by_type"]["AV Comparative"] == 1.0  # always 'yes'
    assert out["avqa_chance_by_type"]["Audio Counting"] == 0.5 and out["avqa_chance_by_type"]["AV Comparative"] == 1.0
    assert out["avqa_majority_by_type"]["AV Comparative"] == 1.0
    assert out["avqa_n_by_type"]["Audio Counting"] == 2 and out["avqa_n_by_type"]["Overall"] == 3
    assert out["avqa_chance_by_type"]["Visual Location"] is None


def test_one_parser_and_one_notion_of_correct_for_avqa():
    """The audio-dependent subset reads question types with the per-type table's parser (the dataset's own list
    form and the AV abbreviation included), and a record without 'correct' is scored as score_avqa scores it
    (punctuation and case ignored)."""
    from safe_av.eval.evaluate import is_audio_dependent, score_avqa
    from safe_av.eval.metrics import avqa_accuracy

    assert [is_audio_dependent(t) for t in ("['Audio', 'Counting']", "AV/Counting", "audio_visual/Temporal",
                                            "Visual/Location", "Audio/Nonsense", None)] == [
        True, True, True, False, False, False]
    recs = [{"prediction": p, "answers": [a], "question_type": t} for p, a, t in (
        ("yes", "yes", "['Audio', 'Counting']"), ("two", "two", "AV/Counting"), ("no", "yes", "Audio/Counting"),
        ("left", "left", "Visual/Location"))]
    scored = score_avqa([dict(r) for r in recs])
    assert scored["audio_dependent"] == pytest.approx(2 / 3) and scored["overall"] == pytest.approx(3 / 4)
    assert avqa_accuracy([{"prediction": "Yes.", "answers": ["yes"], "question_type": "Audio/Counting"}])[
        "overall"] == 1.0
