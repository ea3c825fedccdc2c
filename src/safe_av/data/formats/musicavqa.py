"""MUSIC-AVQA (GeWu-Lab, CVPR 2022) reader.

Official annotations ``avqa-{train,val,test}.json`` (repo ``data/json/``) are a JSON
list of objects::

    {"video_id": "00000238", "question_id": 8,
     "type": "[\\"Audio-Visual\\", \\"Counting\\"]",
     "question_content": "Is the <Object> louder than the <Object>?",
     "templ_values": "[\\"piano\\", \\"violin\\"]",
     "question_deleted": 0, "anser": "yes"}

Quirks handled: ``type`` and ``templ_values`` are JSON lists *encoded as strings*
(a real list or a Python-repr string is accepted too); the answer key is spelled
``anser``; placeholders ``<Object>``, ``<LR>``, ``<FL>``, ``<TH>`` … are filled in
order from ``templ_values``; ``question_deleted: 1`` entries are skipped (counted in
``ReadResult.skipped``); ``video_id`` is a string and keeps its leading zeros.

Expected ``--root`` layout (frames as written by the official
``extract_frames_adaptive.py`` at 1 fps, audio as written by ``extract_audio.py``)::

    ROOT/
      json/avqa-train.json  json/avqa-val.json  json/avqa-test.json   (or directly in ROOT/)
      frames/<video_id>/00000001.jpg 00000002.jpg ...                 (1 fps; middle frame used)
      audio/<video_id>.wav                                            (.flac/.mp3/.ogg also found)

`Sample.image` is the frame folder, `Sample.audio` the audio file;
``question_type`` is ``"<Scenario>/<Type>"``, e.g. ``"Audio-Visual/Temporal"``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from safe_av.data.difficulty import difficulty_of
from safe_av.data.formats._common import DurationProbe, decode_str_list, find_file, first_existing, load_json
from safe_av.data.records import BadEntry, ReadResult, Sample

SPLITS = ("train", "val", "test")
SCENARIOS = ("Audio", "Visual", "Audio-Visual")
PLACEHOLDER = re.compile(r"<[^<>\s]+>")
REQUIRED = {"video_id": str, "question_id": (int, str), "question_content": str, "anser": str}


def annotation_path(root: str | Path, split: str) -> Path:
    """The ``avqa-{split}.json`` of ``root`` (in ``json/`` or ``root`` itself)."""
    name = f"avqa-{split}.json"
    return find_file(Path(root), [f"json/{name}", name, f"data/json/{name}"], f"MUSIC-AVQA {split} annotations")


def fill_template(template: str, values: list[str]) -> str | None:
    """Replace the ``<...>`` placeholders in order; None if values are too few."""
    slots = PLACEHOLDER.findall(template)
    if len(values) < len(slots):
        return None
    it = iter(values)
    return PLACEHOLDER.sub(lambda _: next(it), template)


def read(root: str | Path, split: str, *, probe_durations: bool = True) -> ReadResult:
    """Read one split.

    Args:
        root: dataset root (layout in the module docstring).
        split: ``train``, ``val`` or ``test``.
        probe_durations: read each audio header for ``duration_s`` (cheap, cached
            per video); False skips it (difficulty then assumes a medium length).

    Returns:
        `ReadResult`; malformed entries are in ``bad``.

    Raises:
        FileNotFoundError: no annotation file for ``split``.
        DataError: the annotation file is not JSON or not a list.
    """
    root = Path(root)
    path = annotation_path(root, split)
    data = load_json(path)
    result = ReadResult()
    if not isinstance(data, list):
        result.bad.append(BadEntry(str(path), "<root>", type(data).__name__, "expected a JSON list of questions"))
        return result
    probe = DurationProbe(probe_durations)
    seen: set[str] = set()
    for i, entry in enumerate(data):
        where = f"{path}[{i}]"
        sample = _parse(entry, where, root, probe, result)
        if sample is None:
            continue
        if sample.id in seen:
            result.bad.append(BadEntry(where, "question_id", sample.id, "duplicate question_id"))
            continue
        seen.add(sample.id)
        result.samples.append(sample)
    return result


def _parse(entry: Any, where: str, root: Path, probe: DurationProbe, result: ReadResult) -> Sample | None:
    if not isinstance(entry, dict):
        result.bad.append(BadEntry(where, "<entry>", type(entry).__name__, "expected a JSON object"))
        return None
    where = f"{where} (question_id={entry.get('question_id')!r})"
    bad = _check_fields(entry, where)
    if bad:
        result.bad.append(bad)
        return None
    if entry.get("question_deleted", 0) not in (0, "0", False):
        result.skip("question_deleted")
        return None
    qtype = decode_str_list(entry.get("type"))
    if qtype is None or len(qtype) != 2 or qtype[0] not in SCENARIOS:
        result.bad.append(
            BadEntry(where, "type", entry.get("type"), f"expected a JSON list [scenario in {SCENARIOS}, type]")
        )
        return None
    values = decode_str_list(entry.get("templ_values", "[]"))
    if values is None:
        result.bad.append(BadEntry(where, "templ_values", entry.get("templ_values"), "expected a JSON list of strings"))
        return None
    question = fill_template(entry["question_content"], values)
    if question is None:
        result.bad.append(
            BadEntry(where, "templ_values", values, f"fewer values than placeholders in {entry['question_content']!r}")
        )
        return None
    return _sample(entry, question, qtype, values, root, probe)


def _check_fields(entry: dict, where: str) -> BadEntry | None:
    for key, types in REQUIRED.items():
        if key not in entry:
            return BadEntry(where, key, None, "missing key")
        value = entry[key]
        if not isinstance(value, types) or isinstance(value, bool):
            return BadEntry(where, key, value, f"wrong type {type(value).__name__}")
        if isinstance(value, str) and not value.strip():
            return BadEntry(where, key, value, "empty string")
    return None


def _sample(
    entry: dict, question: str, qtype: list[str], values: list[str], root: Path, probe: DurationProbe
) -> Sample:
    video_id = entry["video_id"]
    audio = first_existing(root / "audio", [video_id])
    duration = probe(audio)
    question_type = f"{qtype[0]}/{qtype[1]}"
    return Sample(
        id=str(entry["question_id"]),
        dataset="musicavqa",
        question=question,
        answers=[entry["anser"].strip()],
        image=str(root / "frames" / video_id),
        audio=str(audio),
        question_type=question_type,
        attributes={
            "video_id": video_id,
            "scenario": qtype[0],
            "type": qtype[1],
            "templ_values": values,
            "question_template": entry["question_content"],
            "duration_s": duration,
        },
        difficulty=difficulty_of(duration, question_type),
    )
