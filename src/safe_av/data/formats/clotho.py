"""Clotho v2 (Drossos et al., ICASSP 2020; DCASE 2021+) reader.

Official ``clotho_captions_{development,validation,evaluation}.csv`` have the header
``file_name,caption_1,caption_2,caption_3,caption_4,caption_5``: one row per clip,
five captions each. Quirks handled: file names contain spaces, commas and
non-ASCII characters (CSV-quoted; read as UTF-8, BOM tolerated, latin-1 fallback);
captions may carry stray surrounding whitespace (stripped). Splits may be given as
``development/validation/evaluation`` or ``train/val/test``.

Expected ``--root`` layout (the official 7z archives unpack to one folder per split)::

    ROOT/
      clotho_captions_development.csv  clotho_captions_validation.csv  clotho_captions_evaluation.csv
      development/<file_name>   validation/<file_name>   evaluation/<file_name>   (44.1 kHz .wav, 15-30 s)
"""

from __future__ import annotations

from pathlib import Path

from safe_av.data.difficulty import difficulty_of
from safe_av.data.formats._common import DurationProbe, find_file, read_csv_rows
from safe_av.data.records import BadEntry, ReadResult, Sample

SPLITS = ("development", "validation", "evaluation")
ALIASES = {"train": "development", "val": "validation", "test": "evaluation"}
CAPTION_COLUMNS = tuple(f"caption_{i}" for i in range(1, 6))


def annotation_path(root: str | Path, split: str) -> Path:
    """The ``clotho_captions_{split}.csv`` of ``root``."""
    split = ALIASES.get(split, split)
    name = f"clotho_captions_{split}.csv"
    return find_file(Path(root), [name, f"captions/{name}"], f"Clotho {split} captions")


def read(root: str | Path, split: str, *, probe_durations: bool = True) -> ReadResult:
    """Read one split.

    Args:
        root: dataset root (layout in the module docstring).
        split: ``development``/``validation``/``evaluation`` (or ``train``/``val``/``test``).
        probe_durations: read each audio header for ``duration_s``.

    Raises:
        FileNotFoundError: no CSV for ``split``.
        DataError: the CSV header lacks a column.
    """
    root = Path(root)
    split = ALIASES.get(split, split)
    path = annotation_path(root, split)
    probe = DurationProbe(probe_durations)
    result = ReadResult()
    seen: set[str] = set()
    for line, row in read_csv_rows(path, ("file_name", *CAPTION_COLUMNS), result.bad):
        where = f"{path}:{line}"
        name = (row.get("file_name") or "").strip()
        if not name:
            result.bad.append(BadEntry(where, "file_name", row.get("file_name"), "missing or empty"))
            continue
        if name in seen:
            result.bad.append(BadEntry(where, "file_name", name, "duplicate file_name"))
            continue
        captions = [(row.get(c) or "").strip() for c in CAPTION_COLUMNS]
        empty = [c for c, text in zip(CAPTION_COLUMNS, captions, strict=True) if not text]
        if empty:
            result.bad.append(BadEntry(where, empty[0], row.get(empty[0]), "missing or empty caption"))
            continue
        seen.add(name)
        audio = root / split / name
        duration = probe(audio)
        result.samples.append(
            Sample(
                id=name,
                dataset="clotho",
                question="",
                answers=captions,
                audio=str(audio),
                question_type="caption",
                attributes={"file_name": name, "duration_s": duration},
                difficulty=difficulty_of(duration, "caption"),
            )
        )
    return result
