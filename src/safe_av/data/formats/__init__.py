"""Readers for the official on-disk formats: ``read(root, split) -> ReadResult``.

Each module documents the ``--root`` layout it expects; ``LAYOUTS.md`` beside this
file collects them for the README.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from safe_av.data.formats import audiocaps, avsd, clotho, musicavqa, vqav2
from safe_av.data.records import ReadResult

READERS: dict[str, Callable[..., ReadResult]] = {
    "musicavqa": musicavqa.read,
    "audiocaps": audiocaps.read,
    "clotho": clotho.read,
    "avsd": avsd.read,
    "vqav2": vqav2.read,
}
SPLITS: dict[str, tuple[str, ...]] = {
    "musicavqa": musicavqa.SPLITS,
    "audiocaps": audiocaps.SPLITS,
    "clotho": clotho.SPLITS,
    "avsd": avsd.SPLITS,
    "vqav2": vqav2.SPLITS,
}


def read(format: str, root: str | Path, split: str) -> ReadResult:
    """Read ``split`` of dataset ``format`` under ``root``.

    Raises:
        ValueError: unknown format.
        FileNotFoundError: the split's annotation file is missing.
    """
    if format not in READERS:
        raise ValueError(f"format: unknown dataset format {format!r}; choose from {sorted(READERS)}")
    return READERS[format](root, split)
