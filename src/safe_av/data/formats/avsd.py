"""AVSD (Audio-Visual Scene-Aware Dialog, DSTC7 track 3 / DSTC8) reader.

Two annotation shapes exist and both are read:

* DSTC7/DSTC8 release ``{train,valid,test}_set4DSTC7-AVSD.json``::

      {"type": "...", "dialogs": [
          {"image_id": "QRTUI", "caption": "...", "summary": "...",
           "dialog": [{"question": "...", "answer": "..."}, ...]}, ...]}

* ``avsd_{train,val,test}.json``: an object keyed by Charades video id, each value
  ``{"caption", "summary", "dialog": [{"question", "answer"}]}`` (``"data"`` is
  accepted for ``"dialog"``).

One `Sample` per turn: ``id`` ``"<video_id>_<turn>"``, ``attributes["history"]`` holds
the previous turns as ``[question, answer]`` pairs, plus ``caption``, ``summary``,
``turn``. Turns whose answer is ``__UNDISCLOSED__`` (the DSTC7 test set hides the
last answer) are skipped and counted in ``ReadResult.skipped``.

Rejected as bad entries (naming file, position, field and value): a dialog that is not
an object or has no list of turns, a missing ``image_id``, a second dialog for the same
video (the first is kept: its sample ids ``<video_id>_<turn>`` would repeat), and a turn
whose question or answer is missing or not a string. The turns after such a turn are
dropped too (their history would be broken): the bad entry says how many, and they are
counted in ``ReadResult.skipped`` as ``"turn after a malformed turn"``.

Expected ``--root`` layout (the Charades videos, audio and 1 fps frames extracted)::

    ROOT/
      train_set4DSTC7-AVSD.json  valid_set4DSTC7-AVSD.json  test_set4DSTC7-AVSD.json
        (or avsd_train.json  avsd_val.json  avsd_test.json)
      audio/<video_id>.wav
      frames/<video_id>/000001.jpg ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safe_av.data.difficulty import difficulty_of
from safe_av.data.formats._common import DurationProbe, find_file, first_existing, load_json
from safe_av.data.records import BadEntry, ReadResult, Sample

SPLITS = ("train", "val", "test")
DSTC_PREFIX = {"train": "train", "val": "valid", "valid": "valid", "test": "test"}
UNDISCLOSED = "__UNDISCLOSED__"


def annotation_path(root: str | Path, split: str) -> Path:
    """The dialog JSON of ``split`` (DSTC7, DSTC8 or ``avsd_{split}.json`` naming)."""
    prefix = DSTC_PREFIX.get(split, split)
    names = [f"{prefix}_set4DSTC7-AVSD.json", f"{prefix}_set4DSTC8-AVSD.json", f"avsd_{split}.json"]
    return find_file(Path(root), names, f"AVSD {split} dialogs")


def read(root: str | Path, split: str, *, probe_durations: bool = True) -> ReadResult:
    """Read one split, one `Sample` per dialog turn.

    Raises:
        FileNotFoundError: no dialog file for ``split``.
        DataError: the file is not JSON.
    """
    root = Path(root)
    path = annotation_path(root, split)
    data = load_json(path)
    result = ReadResult()
    probe = DurationProbe(probe_durations)
    first: dict[str, str] = {}
    for where, video_id, record in _dialogs(data, str(path), result):
        if video_id in first:
            result.bad.append(BadEntry(where, "image_id", video_id,
                                       f"duplicate dialog for this video (the first, at {first[video_id]}, is used)"))
            continue
        first[video_id] = where.removeprefix(str(path))
        _read_dialog(record, video_id, where, root, probe, result)
    return result


def _dialogs(data: Any, path: str, result: ReadResult):
    """Yield ``(where, video_id, record)`` for either annotation shape."""
    if isinstance(data, dict) and isinstance(data.get("dialogs"), list):
        for i, record in enumerate(data["dialogs"]):
            where = f"{path}[dialogs][{i}]"
            video_id = record.get("image_id") if isinstance(record, dict) else None
            if not isinstance(video_id, str) or not video_id.strip():
                result.bad.append(BadEntry(where, "image_id", video_id, "missing, empty or not a string"))
                continue
            yield where, video_id, record
    elif isinstance(data, dict):
        for video_id, record in data.items():
            if not video_id.strip():  # it names the video's frames folder and audio file
                result.bad.append(BadEntry(f"{path}[{video_id!r}]", "<video id key>", video_id, "empty video id"))
                continue
            yield f"{path}[{video_id!r}]", video_id, record
    else:
        result.bad.append(BadEntry(path, "<root>", type(data).__name__, "expected a JSON object"))


def _read_dialog(record: Any, video_id: str, where: str, root: Path, probe: DurationProbe, result: ReadResult) -> None:
    if not isinstance(record, dict):
        result.bad.append(BadEntry(where, "<dialog>", type(record).__name__, "expected a JSON object"))
        return
    turns = record.get("dialog", record.get("data"))
    if not isinstance(turns, list):
        result.bad.append(BadEntry(where, "dialog", turns, "missing or not a list of turns"))
        return
    audio = first_existing(root / "audio", [video_id])
    duration = probe(audio)
    history: list[list[str]] = []
    for t, turn in enumerate(turns):
        q, a = (turn.get("question"), turn.get("answer")) if isinstance(turn, dict) else (None, None)
        broken = [(f, v) for f, v in (("question", q), ("answer", a)) if not isinstance(v, str) or not v.strip()]
        if broken:  # an empty answer would be an empty training target; an empty question, no question
            field, value = broken[0]
            dropped = len(turns) - t - 1  # later turns would carry a broken history
            more = f"; the {dropped} later turn(s) of this dialog are dropped too" if dropped else ""
            what = "empty string" if isinstance(value, str) else "missing or not a string"
            result.bad.append(BadEntry(f"{where}[dialog][{t}]", field, turn, f"{what}{more}"))
            for _ in range(dropped):
                result.skip("turn after a malformed turn")
            return
        if a.strip() == UNDISCLOSED:
            result.skip("answer undisclosed")
            continue
        result.samples.append(
            Sample(
                id=f"{video_id}_{t}",
                dataset="avsd",
                question=q.strip(),
                answers=[a.strip()],
                image=str(root / "frames" / video_id),
                audio=str(audio),
                question_type="dialog",
                attributes={
                    "video_id": video_id,
                    "turn": t,
                    "history": [list(p) for p in history],
                    "caption": record.get("caption", ""),
                    "summary": record.get("summary", ""),
                    "duration_s": duration,
                },
                difficulty=difficulty_of(duration, "dialog", turn=t),
            )
        )
        history.append([q.strip(), a.strip()])
