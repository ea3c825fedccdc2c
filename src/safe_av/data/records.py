"""The sample record every reader yields, and the data layer's error types.

`Sample` is the contract of ``docs/interfaces.md``: readers in
``safe_av.data.formats`` produce it; the sampler, collate and eval consume it.
Readers never raise on a malformed entry: they collect a `BadEntry` in their
`ReadResult` and go on. Loaders (audio, images) raise `DataError` subclasses whose
message names the file, the field and the bad value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASETS = ("musicavqa", "audiocaps", "clotho", "avsd", "vqav2")


@dataclass
class Sample:
    """One training / evaluation example (see ``docs/interfaces.md``)."""

    id: str
    """Unique within its dataset (e.g. MUSIC-AVQA ``question_id``)."""
    dataset: str
    """One of `DATASETS`."""
    question: str
    """Question or prompt; ``""`` for captioning (the text layer adds a prompt)."""
    answers: list[str]
    """Reference answer(s) / caption(s); the first is the training target."""
    image: str | None = None
    """Path of an image file or of a frame folder (then the middle frame is used)."""
    audio: str | None = None
    """Path of the audio file."""
    question_type: str | None = None
    """``"<Scenario>/<Type>"`` (MUSIC-AVQA), VQA ``answer_type``, ``"caption"``, ``"dialog"``."""
    attributes: dict[str, Any] = field(default_factory=dict)
    """Anything else: ``duration_s``, ``scenario``, ``type``, ``templ_values``, ``turn`` …"""
    difficulty: str | None = None
    """``easy`` ``medium`` ``hard`` (see `safe_av.data.difficulty`)."""

    @property
    def has_audio(self) -> bool:
        """Whether the sample carries an audio path."""
        return self.audio is not None

    @property
    def has_image(self) -> bool:
        """Whether the sample carries an image (file or frame folder)."""
        return self.image is not None


class DataError(ValueError):
    """A data problem; the message names the file, the field and the bad value.

    Args:
        path: the file (or ``file[index]``) where the problem is.
        field: the field, column or aspect that is wrong (``"anser"``, ``"audio"``).
        value: the offending value (shortened in the message when long).
        reason: what is wrong, in words.
    """

    def __init__(self, path: str | Path, field: str, value: Any, reason: str) -> None:
        self.path = str(path)
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{self.path}: field {field!r} = {_short(value)}: {reason}")

    def detail_under(self, field: str, path: str | Path) -> str:
        """This error told by a caller that already names ``field`` and the file ``path``: the reason, with the
        error's own field and value only when they are another (``duration_s = 12.0: too long``), and the
        inner file's name (a frame of a frame folder) when it is not ``path`` itself."""
        detail = self.reason if self.field == field else f"{self.field} = {self.value!r}: {self.reason}"
        inner = Path(self.path).name
        if Path(self.path) != Path(path) and inner not in detail:
            detail = f"{inner}: {detail}"
        return detail


@dataclass(frozen=True)
class BadEntry:
    """A malformed annotation entry or media file, collected instead of raised."""

    where: str
    """File and position, e.g. ``"avqa-train.json[12] (question_id=8)"``."""
    field: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: field {self.field!r} = {_short(self.value)}: {self.reason}"


@dataclass
class ReadResult:
    """What a reader returns: good samples, bad entries, and deliberate skips."""

    samples: list[Sample] = field(default_factory=list)
    bad: list[BadEntry] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    """Entries dropped on purpose (not errors), by reason, e.g.
    ``{"question_deleted": 3}`` or ``{"answer undisclosed": 733}``."""

    def skip(self, reason: str) -> None:
        """Count one deliberately dropped entry."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def extend(self, other: ReadResult) -> None:
        """Append another result (e.g. a second split) to this one."""
        self.samples.extend(other.samples)
        self.bad.extend(other.bad)
        for reason, n in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n


def _short(value: Any, limit: int = 160) -> str:
    """repr of ``value``; a long one keeps its head and its tail (where file names are)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit // 3] + "..." + text[-(2 * limit // 3) :]
