"""Writers of tiny fixtures in each official format, written as the releases write them.

Records copy the real field names, types and quirks (MUSIC-AVQA's string-encoded
lists and ``anser``; AudioCaps' one row per caption; Clotho's quoted file names with
commas and non-ASCII; DSTC7 AVSD's ``dialogs`` list and ``__UNDISCLOSED__``; VQA v2's
split question/annotation files), not the synthetic generator's output.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image


def write_tone(
    path: Path,
    seconds: float,
    *,
    sr: int = 16000,
    channels: int = 1,
    freq: float = 440.0,
    amp: float = 0.5,
    subtype: str = "PCM_16",
) -> Path:
    """A sine tone file; stereo files get the same tone at half amplitude on the right."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(seconds * sr))) / sr
    tone = amp * np.sin(2 * np.pi * freq * t)
    data = tone if channels == 1 else np.stack([tone, 0.5 * tone], axis=1)
    sf.write(str(path), data, sr, subtype=subtype)
    return path


def write_jpg(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


def write_frames(folder: Path, n: int) -> Path:
    """``n`` frames named like the official extraction; frame k has red value 10*k."""
    for k in range(1, n + 1):
        write_jpg(folder / f"{k:08d}.jpg", color=(10 * k, 0, 0))
    return folder


# ---------------------------------------------------------------------------- MUSIC-AVQA
MUSICAVQA_RECORDS = [
    {
        "video_id": "00000238",
        "question_id": 8,
        "type": '["Audio-Visual", "Counting"]',
        "question_content": "How many instruments are sounding in the video?",
        "templ_values": "[]",
        "question_deleted": 0,
        "anser": "two",
    },
    {
        "video_id": "sa00007434",
        "question_id": 28884,
        "type": '["Visual", "Counting"]',
        "question_content": "Are there <Object> and <Object> instruments in the video?",
        "templ_values": '["piano", "ukulele"]',
        "question_deleted": 0,
        "anser": "no",
    },
    {
        "video_id": "00000272",
        "question_id": 50,
        "type": '["Audio-Visual", "Temporal"]',
        "question_content": "Where is the <FL> sounding instrument?",
        "templ_values": '["first"]',
        "question_deleted": 0,
        "anser": "left",
    },
    {
        "video_id": "00000238",
        "question_id": 9,
        "type": '["Audio", "Comparative"]',
        "question_content": "Is the <Object> louder than the <Object>?",
        "templ_values": '["violin", "piano"]',
        "question_deleted": 1,
        "anser": "yes",
    },
]
MUSICAVQA_DURATIONS = {"00000238": 3.0, "sa00007434": 7.0, "00000272": 12.0}


def write_musicavqa(root: Path, records: list | None = None, split: str = "train") -> Path:
    (root / "json").mkdir(parents=True, exist_ok=True)
    (root / "json" / f"avqa-{split}.json").write_text(
        json.dumps(records if records is not None else MUSICAVQA_RECORDS, indent=4)
    )
    for video_id, seconds in MUSICAVQA_DURATIONS.items():
        write_tone(root / "audio" / f"{video_id}.wav", seconds)
        write_frames(root / "frames" / video_id, 3)
    return root


# ----------------------------------------------------------------------------- AudioCaps
AUDIOCAPS_TRAIN = [
    ["91139", "r1nicOVtvkQ", "130", "A woman talks nearby as water pours"],
    ["58146", "-0hkWHqhZIo", "30", "Birds chirping, then a dog barks"],  # id starting with "-"
]
AUDIOCAPS_VAL = [[str(97151 + i), "rqfQRErjfk8", "170", f"val caption {i}"] for i in range(5)] + [
    [str(97200 + i), "rqu8iB22I_Y", "5", f"second clip caption {i}"] for i in range(5)
]


def write_audiocaps(root: Path) -> Path:
    for split, rows in (("train", AUDIOCAPS_TRAIN), ("val", AUDIOCAPS_VAL)):
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
            writer.writerows(rows)
    write_tone(root / "audio" / "train" / "r1nicOVtvkQ.wav", 10.0, sr=8000)
    write_tone(root / "audio" / "train" / "Y-0hkWHqhZIo.wav", 4.0, sr=8000)  # mirror naming
    write_tone(root / "audio" / "val" / "rqfQRErjfk8.wav", 10.0, sr=8000)
    write_tone(root / "audio" / "val" / "rqu8iB22I_Y.wav", 6.0, sr=8000)
    return root


# -------------------------------------------------------------------------------- Clotho
CLOTHO_NAMES = ["Santa Motor, 1.wav", "Plaça de l'Àngel.wav"]


def write_clotho(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "clotho_captions_development.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
        for name in CLOTHO_NAMES:
            writer.writerow([name] + [f" {name[:5]} caption, number {i} " for i in range(1, 6)])
    for name, seconds in zip(CLOTHO_NAMES, (15.5, 22.0), strict=True):
        write_tone(root / "development" / name, seconds, sr=8000)
    return root


# ---------------------------------------------------------------------------------- AVSD
AVSD_TRAIN = {
    "type": "AVSD",
    "dialogs": [
        {
            "image_id": "QRTUI",
            "caption": "a person walks into the kitchen",
            "summary": "a man enters and drinks water",
            "dialog": [
                {"question": "is there sound ?", "answer": "yes , a tap running ."},
                {"question": "how many people ?", "answer": "just one man ."},
                {"question": "does he talk ?", "answer": "no he does not ."},
            ],
        }
    ],
}
AVSD_TEST = {
    "type": "AVSD",
    "dialogs": [
        {
            "image_id": "ZZ9XY",
            "caption": "c",
            "summary": "s",
            "dialog": [{"question": "q0 ?", "answer": "a0 ."}, {"question": "q1 ?", "answer": "__UNDISCLOSED__"}],
        }
    ],
}


def write_avsd(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train_set4DSTC7-AVSD.json").write_text(json.dumps(AVSD_TRAIN))
    (root / "test_set4DSTC7-AVSD.json").write_text(json.dumps(AVSD_TEST))
    for video_id in ("QRTUI", "ZZ9XY"):
        write_tone(root / "audio" / f"{video_id}.wav", 8.0, sr=8000)
        write_frames(root / "frames" / video_id, 2)
    return root


# -------------------------------------------------------------------------------- VQA v2
def vqa_answers(texts: list[str]) -> list[dict]:
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


VQA_QUESTIONS = {
    "info": {},
    "task_type": "Open-Ended",
    "data_type": "mscoco",
    "license": {},
    "data_subtype": "val2014",
    "questions": [
        {"image_id": 42, "question": "What color is the bus?", "question_id": 42000},
        {"image_id": 42, "question": "Is it raining?", "question_id": 42001},
        {"image_id": 73, "question": "How many dogs are there?", "question_id": 73000},
    ],
}
VQA_ANNOTATIONS = {
    "info": {},
    "license": {},
    "data_subtype": "val2014",
    "annotations": [
        {
            "question_id": 42000,
            "image_id": 42,
            "question_type": "what color is the",
            "answer_type": "other",
            "multiple_choice_answer": "red",
            "answers": vqa_answers(["dark red"] + ["red"] * 8 + ["maroon"]),
        },
        {
            "question_id": 42001,
            "image_id": 42,
            "question_type": "is it",
            "answer_type": "yes/no",
            "multiple_choice_answer": "no",
            "answers": vqa_answers(["no"] * 10),
        },
        {
            "question_id": 73000,
            "image_id": 73,
            "question_type": "how many",
            "answer_type": "number",
            "multiple_choice_answer": "2",
            "answers": vqa_answers(["2"] * 7 + ["3"] * 3),
        },
    ],
}


def write_vqav2(root: Path, questions: dict | None = None, annotations: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions or VQA_QUESTIONS))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations or VQA_ANNOTATIONS))
    for image_id in (42, 73):
        write_jpg(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    return root
