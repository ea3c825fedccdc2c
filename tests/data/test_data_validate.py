"""validate / main_validate / main_synth on good and broken dataset roots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import data_fixtures as fx
import pytest

from safe_av.data.validate import main_synth, main_validate, validate


@pytest.mark.parametrize("format", ["musicavqa", "audiocaps", "clotho", "avsd", "vqav2"])
def test_official_fixtures_validate(format, request):
    root = request.getfixturevalue(f"{format}_root")
    report = validate(format, root)
    assert report.ok, "\n".join(map(str, report.bad))
    assert report.files_checked > 0 and sum(report.samples.values()) > 0


def test_broken_media_and_entries_are_all_reported(musicavqa_root, capsys):
    (musicavqa_root / "audio" / "00000272.wav").write_bytes(b"RIFF....WAVEgarbage")  # corrupt
    (musicavqa_root / "audio" / "sa00007434.wav").unlink()  # missing
    for frame in (musicavqa_root / "frames" / "00000238").iterdir():
        frame.write_bytes(b"not a jpeg")  # unreadable frames
    records = fx.MUSICAVQA_RECORDS + [{"video_id": "00000238", "question_id": 77}]  # entry missing keys
    (musicavqa_root / "json" / "avqa-train.json").write_text(json.dumps(records))
    report = validate("musicavqa", musicavqa_root, ["train"])
    assert not report.ok and len(report.bad) == 4
    by_field = {b.field: b for b in report.bad}
    assert (
        by_field["question_content"].reason == "missing key" and "question_id=77" in by_field["question_content"].where
    )
    audio = {Path(b.value).name: b for b in report.bad if b.field == "audio"}
    # each entry names the sample, the field and the file once, then what is wrong
    assert audio["00000272.wav"].reason.startswith("unreadable or corrupt")
    assert str(audio["sa00007434.wav"]).endswith("sa00007434.wav': file not found")
    assert str(audio["sa00007434.wav"]).count("field 'audio'") == 1
    assert "00000002.jpg" in str(by_field["image"]) and "unreadable or corrupt" in str(by_field["image"])  # middle of 3
    code = main_validate(argparse.Namespace(format="musicavqa", root=str(musicavqa_root), split=None))
    out = capsys.readouterr().out
    assert code == 1 and "PROBLEMS FOUND" in out and out.count("BAD ") == 4


def test_missing_splits_are_listed_and_explicit_split_raises(tmp_path, capsys):
    fx.write_musicavqa(tmp_path)
    report = validate("musicavqa", tmp_path)
    assert report.ok and report.samples == {"train": 3} and report.missing_splits == ["val", "test"]
    assert "question_deleted x1" in report.summary()
    with pytest.raises(FileNotFoundError, match="avqa-val.json"):
        validate("musicavqa", tmp_path, ["val"])
    empty = validate("vqav2", tmp_path / "nothing")
    assert not empty.ok and empty.bad[0].field == "annotations" and "does not exist" in empty.bad[0].reason
    assert main_validate(argparse.Namespace(format="musicavqa", root=str(tmp_path), split=None)) == 0
    assert "OK" in capsys.readouterr().out
    # through the CLI: --split limits the check to the named splits, and a named split without its file fails
    from safe_av.cli import main

    assert main(["data", "validate", "--format", "musicavqa", "--root", str(tmp_path), "--split", "train"]) == 0
    assert "splits without annotation file" not in capsys.readouterr().out  # val/test were not asked for
    assert main(["data", "validate", "--format", "musicavqa", "--root", str(tmp_path), "--split", "val"]) == 2
    assert "avqa-val.json" in capsys.readouterr().err


def test_main_synth_writes_and_validates(tmp_path, capsys):
    assert main_synth(tmp_path / "s", 3, small=True) == 0
    out = capsys.readouterr().out
    assert out.count(": OK") == 3 and "BAD" not in out


def test_a_truncated_annotation_file_is_one_bad_entry_not_an_abort(tmp_path, capsys):
    fx.write_musicavqa(tmp_path)
    train = tmp_path / "json" / "avqa-train.json"
    val = train.with_name(train.name.replace("train", "val"))
    val.write_text(train.read_text()[:40])  # cut mid-file
    report = validate("musicavqa", tmp_path)
    assert report.samples == {"train": 3} and len(report.bad) == 1  # train still checked
    assert val.name in str(report.bad[0]) and not report.ok
    assert main_validate(argparse.Namespace(format="musicavqa", root=str(tmp_path), split=None)) == 1


def test_empty_annotation_list_says_no_entries(tmp_path, capsys):
    fx.write_musicavqa(tmp_path, [])
    report = validate("musicavqa", tmp_path)
    assert not report.ok and report.samples == {"train": 0}
    assert [(b.where, b.field, b.value, b.reason) for b in report.bad] == [
        (str(tmp_path / "json" / "avqa-train.json"), "entries", 0, "no entries")
    ]
    assert main_validate(argparse.Namespace(format="musicavqa", root=str(tmp_path), split=None)) == 1
    out = capsys.readouterr().out
    assert f"BAD {tmp_path / 'json' / 'avqa-train.json'}: field 'entries' = 0: no entries" in out


def test_non_utf8_split_is_one_bad_entry_and_other_splits_are_checked(tmp_path):
    fx.write_musicavqa(tmp_path)
    train = tmp_path / "json" / "avqa-train.json"
    val = train.with_name("avqa-val.json")
    val.write_bytes(train.read_bytes().replace(b'"anser": "', b'"anser": "\xff', 1))
    report = validate("musicavqa", tmp_path)
    assert report.samples == {"train": 3} and len(report.bad) == 1
    assert report.bad[0].where == str(val) and report.bad[0].field == "encoding"
    assert str(report.bad[0].value).startswith("byte 0xff at position ")


def test_directory_truncated_wav_and_bomb_image_are_named(musicavqa_root):
    """A directory where a clip should be, a WAV cut short (header says more), an image over PIL's pixel limit:
    each one bad entry naming the file and what is wrong, nothing raised."""
    import struct

    from PIL import Image

    (musicavqa_root / "audio" / "00000238.wav").unlink()
    (musicavqa_root / "audio" / "00000238.wav").mkdir()
    wav = musicavqa_root / "audio" / "sa00007434.wav"  # 7 s at 16 kHz, 16-bit
    wav.write_bytes(wav.read_bytes()[: 44 + 2 * 16000])
    frame = musicavqa_root / "frames" / "00000272" / "00000002.jpg"  # the middle of 3
    Image.new("RGB", (8, 8)).save(frame, format="BMP")
    data = bytearray(frame.read_bytes())
    data[18:26] = struct.pack("<ii", 50_000, 50_000)
    frame.write_bytes(bytes(data))
    report = validate("musicavqa", musicavqa_root, ["train"])
    got = {Path(b.value).name: b.reason for b in report.bad}
    assert got == {
        "00000238.wav": "is a directory",
        "sa00007434.wav": "frames = '16000 of 112000': file shorter than its header says: 16000 of 112000 frames "
                          "(truncated download?)",
        "00000272": f"00000002.jpg: pixels = 2500000000: exceeds the limit of {2 * Image.MAX_IMAGE_PIXELS} pixels (PIL "
                    "decompression-bomb guard; a huge image or a corrupt size in its header)",
    }


def test_data_error_told_under_its_field_and_file():
    """What validate's entries and the API's InputErrors add after naming the field and the file themselves."""
    from safe_av.data.records import DataError

    assert DataError("/d/x.wav", "audio", "/d/x.wav", "file not found").detail_under("audio", "/d/x.wav") == \
        "file not found"
    assert DataError("/d/x.wav", "duration_s", 12.0, "too long").detail_under("audio", "/d/x.wav") == \
        "duration_s = 12.0: too long"
    assert DataError("/d/frames/v1/003.jpg", "image", "003.jpg", "corrupt").detail_under("image", "/d/frames/v1") \
        == "003.jpg: corrupt"
    assert DataError("/d/frames/v1/003.jpg", "image", "x", "003.jpg is corrupt").detail_under("image", "/d/frames/v1") \
        == "003.jpg is corrupt"


@pytest.mark.parametrize("value", ["0", "-3", "601"])
def test_validate_refuses_a_max_audio_seconds_outside_the_config_range(value, capsys):
    """0 used to become 10 silently (``or 10.0``) and a negative value judged every clip silent."""
    from safe_av.cli import main as cli

    with pytest.raises(SystemExit) as exc:
        cli(["data", "validate", "--format", "musicavqa", "--root", ".", "--max-audio-seconds", value])
    assert exc.value.code == 2 and f"--max-audio-seconds: {value}: must be in (0, 600]" in capsys.readouterr().err
