"""``safe data validate``: read every record and open every file of a dataset.

`validate` runs the format's reader over the splits, then checks each distinct
audio file (`audio_problem`: missing, a directory, corrupt, shorter than its WAV
header says, empty, too short, non-finite, silent) and image (`load_image`: missing,
empty frame folder, unreadable, over PIL's pixel limit). Problems are collected as
`BadEntry` items; nothing raises except a missing annotation file for a split the
caller asked for explicitly. An annotation file that is not UTF-8 or not JSON is one
bad entry for its split (the other splits are still checked); a split with no entries
at all is one bad entry saying so.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from safe_av.config import DataConfig
from safe_av.data.audio import audio_problem
from safe_av.data.formats import READERS, SPLITS, audiocaps, avsd, clotho, musicavqa, vqav2
from safe_av.data.records import BadEntry, DataError, ReadResult
from safe_av.data.synthetic import write_synthetic
from safe_av.data.vision import ImageError, load_image


@dataclass
class ValidationReport:
    """Outcome of `validate`."""

    format: str
    root: str
    samples: dict[str, int] = field(default_factory=dict)
    """Good samples per split."""
    missing_splits: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    files_checked: int = 0
    bad: list[BadEntry] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad and sum(self.samples.values()) > 0

    def summary(self) -> str:
        """A few lines for people: counts per split, files checked, problems."""
        lines = [f"{self.format} at {self.root}: {'OK' if self.ok else 'PROBLEMS FOUND'}"]
        for split, n in self.samples.items():
            lines.append(f"  {split}: {n} samples")
        if self.missing_splits:
            lines.append(f"  splits without annotation file (not checked): {', '.join(self.missing_splits)}")
        if self.skipped:
            lines.append("  skipped on purpose: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.skipped.items())))
        lines.append(f"  media files opened: {self.files_checked}")
        lines.append(f"  bad entries: {len(self.bad)}")
        return "\n".join(lines)


def validate(format: str, root: str | Path, splits: list[str] | None = None, *,
             max_audio_seconds: float | None = None) -> ValidationReport:
    """Read every record and open every media file of a dataset.

    Args:
        format: ``musicavqa``, ``audiocaps``, ``clotho``, ``avsd`` or ``vqav2``.
        root: the dataset root (layouts in ``safe_av/data/formats/LAYOUTS.md``).
        splits: splits to check; None checks each standard split whose annotation
            file exists (and fails if there is none).
        max_audio_seconds: the part of each clip training uses (``data.max_audio_seconds``; None: its default):
            silence is judged on it, as the loader judges it.

    Raises:
        ValueError: unknown format.
        FileNotFoundError: an explicitly requested split has no annotation file.
    """
    if format not in READERS:
        raise ValueError(f"format: unknown dataset format {format!r}; choose from {sorted(READERS)}")
    report = ValidationReport(format=format, root=str(root))
    checked: set[str] = set()
    for split in splits or list(SPLITS[format]):
        try:
            result = READERS[format](root, split)
        except FileNotFoundError:
            if splits:
                raise
            report.missing_splits.append(split)
            continue
        except DataError as err:  # the annotation file itself is unreadable (truncated JSON, wrong top level)
            report.bad.append(BadEntry(err.path, err.field, err.value, err.reason))
            continue
        report.samples[split] = len(result.samples)
        report.bad.extend(result.bad)
        if not result.samples and not result.bad:  # nothing to train on, and no entry to say why
            skipped = sum(result.skipped.values())
            why = f"no usable entries (all {skipped} skipped on purpose)" if skipped else "no entries"
            report.bad.append(BadEntry(_annotation_file(format, root, split), "entries", 0, why))
        for reason, n in result.skipped.items():
            report.skipped[reason] = report.skipped.get(reason, 0) + n
        _check_media(result, checked, report,
                     DataConfig().max_audio_seconds if max_audio_seconds is None else max_audio_seconds)
    if not report.samples:
        why = ("the folder does not exist" if not Path(root).is_dir()
               else "no split annotation file found (layouts: safe_av/data/formats/LAYOUTS.md)")
        report.bad.append(BadEntry(str(root), "annotations", SPLITS[format], why))
    return report


def _annotation_file(format: str, root: str | Path, split: str) -> str:
    """The annotation file read for ``split`` (the questions file for VQA v2), to name it in a report."""
    locate = {"musicavqa": musicavqa.annotation_path, "audiocaps": audiocaps.annotation_path,
              "clotho": clotho.annotation_path, "avsd": avsd.annotation_path, "vqav2": vqav2.question_path}[format]
    try:
        return str(locate(root, split))
    except FileNotFoundError:
        return f"{root} ({split})"


def _check_media(result: ReadResult, checked: set[str], report: ValidationReport, max_audio_seconds: float) -> None:
    """Open each distinct audio/image path once; a bad file is reported once."""
    for sample in result.samples:
        for kind, path in (("audio", sample.audio), ("image", sample.image)):
            if path is None or path in checked:
                continue
            checked.add(path)
            report.files_checked += 1
            err = audio_problem(path, max_seconds=max_audio_seconds) if kind == "audio" else _image_problem(path)
            if err is not None:  # the entry names the file once
                report.bad.append(BadEntry(f"{sample.dataset} sample {sample.id}", kind, path,
                                           err.detail_under(kind, path)))


def _image_problem(path: str) -> ImageError | None:
    try:
        load_image(path)
    except ImageError as err:
        return err
    return None


def main_validate(args: argparse.Namespace) -> int:
    """CLI body of ``safe data validate --format F --root DIR [--split S ...]``.

    Prints the summary and every bad entry with its reason.

    Returns:
        0 when everything is usable, 1 otherwise.
    """
    report = validate(args.format, args.root, getattr(args, "split", None) or None,
                      max_audio_seconds=getattr(args, "max_audio_seconds", None))
    print(report.summary())
    for entry in report.bad:
        print(f"  BAD {entry}")
    return 0 if report.ok else 1


def main_synth(out: str | Path, seed: int = 0, *, small: bool = False) -> int:
    """CLI body of ``safe data synth --out DIR --seed N``: write, then validate each part.

    Returns:
        0 when every written dataset validates, 1 otherwise.
    """
    roots = write_synthetic(out, seed=seed, small=small)
    code = 0
    for format, root in roots.items():
        report = validate(format, root)
        print(report.summary())
        for entry in report.bad:
            print(f"  BAD {entry}")
        code |= 0 if report.ok else 1
    return code
