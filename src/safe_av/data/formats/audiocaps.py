"""AudioCaps (Kim et al., NAACL 2019) reader.

Official ``dataset/{train,val,test}.csv`` have the header
``audiocap_id,youtube_id,start_time,caption``: one row per caption; a training
clip has one caption, a val/test clip five rows (one per annotator). Rows of the
same clip (``youtube_id`` + ``start_time``) are grouped into one `Sample` whose
``answers`` are its captions in file order. The clip is the 10 s of the YouTube
video from ``start_time``; AudioCaps ships no audio, so the downloaded files
are named by ``youtube_id``.

Expected ``--root`` layout::

    ROOT/
      train.csv  val.csv  test.csv
      audio/train/<youtube_id>.wav     (also found: Y<youtube_id>.wav, as some
      audio/val/<youtube_id>.wav        mirrors name them since ids may start
      audio/test/<youtube_id>.wav       with "-"; and .flac/.mp3/.ogg)

A clip whose audio was never downloaded still yields a `Sample` (path of the
expected ``.wav``); ``safe data validate`` reports it as missing.

Rejected as bad entries (naming file, line, column and value): a non-numeric
``audiocap_id`` or ``start_time``, an empty ``youtube_id`` or caption, and a repeated
``audiocap_id`` (the first row is kept; a duplicated row would otherwise add its
caption to the clip twice).
"""

from __future__ import annotations

from pathlib import Path

from safe_av.data.difficulty import difficulty_of
from safe_av.data.formats._common import DurationProbe, find_file, first_existing, read_csv_rows
from safe_av.data.records import BadEntry, ReadResult, Sample

SPLITS = ("train", "val", "test")
COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")


def annotation_path(root: str | Path, split: str) -> Path:
    """The ``{split}.csv`` of ``root`` (or ``root/dataset``)."""
    return find_file(Path(root), [f"{split}.csv", f"dataset/{split}.csv"], f"AudioCaps {split} captions")


def audio_path(root: Path, split: str, youtube_id: str) -> Path:
    """``audio/{split}/{youtube_id}.wav`` or the ``Y``-prefixed mirror name, whichever exists."""
    return first_existing(root / "audio" / split, [youtube_id, f"Y{youtube_id}"])


def read(root: str | Path, split: str, *, probe_durations: bool = True) -> ReadResult:
    """Read one split, grouping the caption rows of each clip.

    Args:
        root: dataset root (layout in the module docstring).
        split: ``train``, ``val`` or ``test``.
        probe_durations: read each audio header for ``duration_s``.

    Raises:
        FileNotFoundError: no CSV for ``split``.
        DataError: the CSV header lacks a column.
    """
    root = Path(root)
    path = annotation_path(root, split)
    result = ReadResult()
    groups: dict[tuple[str, int], list[tuple[int, str]]] = {}
    first_line: dict[int, int] = {}
    for line, row in read_csv_rows(path, COLUMNS, result.bad):
        where = f"{path}:{line}"
        parsed = _parse_row(row, where, result)
        if parsed is None:
            continue
        cap_id, youtube_id, start, caption = parsed
        if cap_id in first_line:
            result.bad.append(BadEntry(where, "audiocap_id", row.get("audiocap_id"),
                                       f"duplicate audiocap_id (first on line {first_line[cap_id]})"))
            continue
        first_line[cap_id] = line
        groups.setdefault((youtube_id, start), []).append((cap_id, caption))
    probe = DurationProbe(probe_durations)
    for (youtube_id, start), rows in groups.items():
        audio = audio_path(root, split, youtube_id)
        duration = probe(audio)
        result.samples.append(
            Sample(
                id=f"{youtube_id}_{start}",
                dataset="audiocaps",
                question="",
                answers=[caption for _, caption in rows],
                audio=str(audio),
                question_type="caption",
                attributes={
                    "youtube_id": youtube_id,
                    "start_time": start,
                    "audiocap_ids": [cap_id for cap_id, _ in rows],
                    "duration_s": duration,
                },
                difficulty=difficulty_of(duration, "caption"),
            )
        )
    return result


def _parse_row(row: dict, where: str, result: ReadResult) -> tuple[int, str, int, str] | None:
    values = {c: (row.get(c) or "").strip() for c in COLUMNS}
    for column in ("audiocap_id", "start_time"):
        try:
            values[column] = int(float(values[column]))
        except (ValueError, OverflowError):
            result.bad.append(BadEntry(where, column, row.get(column), "expected a number"))
            return None
    for column in ("youtube_id", "caption"):
        if not values[column]:
            result.bad.append(BadEntry(where, column, row.get(column), "missing or empty"))
            return None
    return values["audiocap_id"], values["youtube_id"], values["start_time"], values["caption"]
