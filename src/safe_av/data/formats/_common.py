"""Helpers shared by the format readers: locating files, JSON/CSV, duration probes."""

from __future__ import annotations

import ast
import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safe_av.data.audio import probe_duration
from safe_av.data.records import BadEntry, DataError

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")


def find_file(root: Path, candidates: Iterable[str], what: str) -> Path:
    """The first of ``root/candidate`` that exists.

    Raises:
        FileNotFoundError: none exists; the message lists every path tried.
    """
    tried = [root / c for c in candidates]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{what} not found; tried: " + ", ".join(str(p) for p in tried))


def load_json(path: Path) -> Any:
    """Parse a JSON annotation file (UTF-8, as JSON requires).

    Raises:
        FileNotFoundError: the file is missing.
        DataError: the file is not UTF-8 (names the byte, its position and line) or not valid JSON
            (names the line and column).
    """
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(path, "encoding", f"byte 0x{raw[err.start]:02x} at position {err.start} (line {line})",
                        f"not valid UTF-8 ({err.reason})") from err
    del raw  # VQA v2's annotations are hundreds of MB: not twice in memory while parsing
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(path, "json", f"line {err.lineno} col {err.colno}", f"invalid JSON: {err.msg}") from err
    except RecursionError as err:
        raise DataError(path, "json", "nesting", "invalid annotation file: nested too deeply to parse") from err


def read_csv_rows(path: Path, required: Iterable[str], bad: list[BadEntry]) -> list[tuple[int, dict[str, str | None]]]:
    """Read a CSV with a header; UTF-8 (BOM tolerated), falling back to latin-1.

    Records are split only at ``\\n`` / ``\\r`` (never at the other characters ``str.splitlines`` breaks on, such as
    U+2028 or the byte 0x85 that cp1252's ellipsis becomes under latin-1). A record with more fields than the header
    (an unquoted comma in a caption) or one that runs over several lines (an unbalanced quote swallows the rows
    after it) is appended to ``bad`` and left out, never cut or merged silently; a missing field reads as None.

    Returns:
        ``(line, row)`` per record, ``line`` the 1-based line it starts on.

    Raises:
        FileNotFoundError: the file is missing.
        DataError: the header lacks a required column, or the CSV cannot be parsed (names the line).
    """
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, dict[str, str | None]]] = []
    header: list[str] | None = None
    end = 0  # the last line read so far
    try:
        for record in reader:
            first, end = end + 1, reader.line_num
            if not record:  # a blank line
                continue
            if header is None:
                header = record
                missing = [c for c in required if c not in header]
                if missing:
                    raise DataError(path, "header", header, f"missing column(s) {missing}")
                continue
            where = f"{path}:{first}"
            if end > first:
                bad.append(BadEntry(where, "row", record, f"the record runs over lines {first}-{end} (an unbalanced "
                                                          "quote?); left out"))
            elif len(record) > len(header):
                bad.append(BadEntry(where, "row", record[len(header):], f"{len(record)} fields, the header has "
                                                                        f"{len(header)} (an unquoted comma?)"))
            else:
                rows.append((first, dict(zip(header, record + [None] * (len(header) - len(record))))))
    except csv.Error as err:
        raise DataError(path, "csv", f"line {reader.line_num}", f"malformed CSV: {err}") from err
    if header is None:
        raise DataError(path, "header", [], f"missing column(s) {list(required)} (the file is empty)")
    return rows


def decode_str_list(value: Any) -> list[str] | None:
    """Decode a list of strings stored as a JSON string (MUSIC-AVQA ``type``,
    ``templ_values``); a Python-repr string or a real list is accepted too.

    Returns:
        The list, or None when ``value`` is not such a list.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            try:
                value = ast.literal_eval(value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # e.g. "{[1]: 2}", "[[[[..."
                return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def first_existing(base: Path, stems: Iterable[str], suffixes: Iterable[str] = AUDIO_SUFFIXES) -> Path:
    """``base/stem+suffix`` for the first stem/suffix that exists, else the first candidate."""
    candidates = [base / f"{stem}{suffix}" for stem in stems for suffix in suffixes]
    for path in candidates:
        if path.is_file():
            return path
    return candidates[0]


class DurationProbe:
    """Cached audio durations (header read only); None for a missing/unreadable file."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._cache: dict[str, float | None] = {}

    def __call__(self, path: Path | str) -> float | None:
        if not self.enabled:
            return None
        key = str(path)
        if key not in self._cache:
            self._cache[key] = probe_duration(key) if Path(key).is_file() else None
        return self._cache[key]
