"""Difficulty mapping table."""

from __future__ import annotations

import pytest

from safe_av.data.difficulty import difficulty_of, length_level, type_shift


@pytest.mark.parametrize("duration,level", [(0.5, 0), (4.99, 0), (5.0, 1), (10.0, 1), (10.01, 2), (None, 1)])
def test_length_level(duration, level):
    assert length_level(duration) == level


@pytest.mark.parametrize(
    "duration,qtype,expected",
    [
        (3.0, "Audio-Visual/Existential", "easy"),
        (3.0, "Audio/Counting", "medium"),
        (7.0, "Audio-Visual/Temporal", "hard"),
        (12.0, "Visual/Location", "hard"),
        (12.0, "Audio/Comparative", "hard"),  # clamped
        (7.0, "caption", "medium"),
        (4.0, "caption", "easy"),
        (None, None, "medium"),
    ],
)
def test_audio_samples(duration, qtype, expected):
    assert difficulty_of(duration, qtype) == expected


@pytest.mark.parametrize("answer_type,expected", [("yes/no", "easy"), ("other", "easy"), ("number", "medium")])
def test_vqa_samples(answer_type, expected):
    assert difficulty_of(None, answer_type, has_audio=False) == expected


def test_dialog_turns_get_harder():
    assert difficulty_of(3.0, "dialog", turn=0) == "easy"
    assert difficulty_of(3.0, "dialog", turn=7) == "medium"


def test_type_shift_is_case_insensitive():
    assert type_shift("audio-visual/COUNTING") == 1
    assert type_shift("Yes/No") == -1
    assert type_shift("unheard-of") == 0
