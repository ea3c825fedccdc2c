"""Curriculum difficulty of a sample: clip length plus question type.

The spec's stages filter samples by difficulty (stage 1 easy only, stage 2 easy +
medium, ...). The level is the clip-length level, shifted by the question type and
clamped to ``easy..hard``.

Clip length (`length_level`):

============================  =========
duration                      level
============================  =========
``< 5 s``                     easy
``5 s ≤ d ≤ 10 s``            medium
``> 10 s``                    hard
unknown (file not probed)     medium
no audio (image-only sample)  easy
============================  =========

Question-type shift (`TYPE_SHIFT`, matched on the last ``/`` part of
``question_type``, case-insensitive):

=====================================================  =====  ==========================
question type                                          shift  why
=====================================================  =====  ==========================
MUSIC-AVQA ``Counting`` ``Temporal`` ``Comparative``     +1   multi-step reasoning
MUSIC-AVQA ``Existential`` ``Location``                   0   single look-up
VQA v2 ``yes/no``                                        -1   binary answer
VQA v2 ``number``                                        +1   counting
VQA v2 ``other``                                          0
``caption`` (AudioCaps, Clotho)                           0   describe what is heard
``dialog`` (AVSD)                                         0   (+1 from turn 5 on: long history)
anything else / None                                      0
=====================================================  =====  ==========================

So a 3 s MUSIC-AVQA "Audio/Counting" clip is medium, a 12 s "Visual/Location" is
hard, a VQA yes/no question is easy and a VQA "number" question is medium.
"""

from __future__ import annotations

LEVELS = ("easy", "medium", "hard")

SHORT_MAX_S = 5.0
"""Clips strictly shorter than this are easy."""
LONG_MIN_S = 10.0
"""Clips strictly longer than this are hard."""

TYPE_SHIFT: dict[str, int] = {
    "counting": 1,
    "temporal": 1,
    "comparative": 1,
    "existential": 0,
    "location": 0,
    "yes/no": -1,
    "number": 1,
    "other": 0,
    "caption": 0,
    "dialog": 0,
}
LATE_DIALOG_TURN = 5
"""AVSD turns from this (0-based) index on carry a long history: one level harder."""


def length_level(duration_s: float | None, *, has_audio: bool = True) -> int:
    """Level index (0 easy, 1 medium, 2 hard) from the clip length.

    Args:
        duration_s: clip length in seconds, or None when it was not probed.
        has_audio: False for image-only samples, which start at easy.
    """
    if not has_audio:
        return 0
    if duration_s is None:
        return 1
    if duration_s < SHORT_MAX_S:
        return 0
    if duration_s <= LONG_MIN_S:
        return 1
    return 2


def type_shift(question_type: str | None) -> int:
    """Level shift for a question type (see the table in the module docstring)."""
    if not question_type:
        return 0
    key = question_type.lower()
    if key in TYPE_SHIFT:  # "yes/no" contains a slash itself
        return TYPE_SHIFT[key]
    return TYPE_SHIFT.get(key.rsplit("/", 1)[-1], 0)


def difficulty_of(
    duration_s: float | None,
    question_type: str | None,
    *,
    has_audio: bool = True,
    turn: int | None = None,
) -> str:
    """Difficulty label of a sample.

    Args:
        duration_s: audio clip length in seconds (None: unknown).
        question_type: `Sample.question_type`, e.g. ``"Audio-Visual/Temporal"``, ``"yes/no"``.
        has_audio: whether the sample has an audio clip.
        turn: AVSD dialog turn index (0-based), if any.

    Returns:
        ``"easy"``, ``"medium"`` or ``"hard"``.
    """
    level = length_level(duration_s, has_audio=has_audio) + type_shift(question_type)
    if turn is not None and turn >= LATE_DIALOG_TURN:
        level += 1
    return LEVELS[min(max(level, 0), len(LEVELS) - 1)]
