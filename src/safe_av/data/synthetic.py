"""A small, learnable audio-visual corpus written in the official on-disk formats.

``write_synthetic(out)`` writes three datasets that the real readers load unchanged::

    OUT/musicavqa/  json/avqa-{train,val,test}.json  frames/<video_id>/0000000N.jpg  audio/<video_id>.wav
    OUT/audiocaps/  {train,val,test}.csv  audio/{split}/<youtube_id>.wav
    OUT/vqav2/      v2_OpenEnded_mscoco_{train,val}2014_questions.json  v2_mscoco_{train,val}2014_annotations.json
                    {train,val}2014/COCO_{split}2014_<image_id:012d>.jpg
    OUT/synthetic_meta.json   seed, sizes, answer vocabulary

Scenes. A "video" shows 2-3 of four instruments, each a coloured shape in one of
three slots (left / middle / right): piano = blue square, violin = red triangle,
flute = green circle, drum = yellow diamond. A random, non-empty *subset* of them
sounds, each with its own timbre (piano: decaying harmonic tone at 262 Hz; violin:
bowed sawtooth-like tone at 392 Hz with vibrato; flute: near-sine at 784 Hz with
breath noise; drum: low-passed noise burst with an 80 Hz thump), its own loudness
level (x1, x0.5, x0.25: distinct by >= 6 dB), its own entry time and number of
notes, under a slow crescendo or decrescendo of the whole mix. Clips last 2-4 s
(easy), 6-9 s (medium) or 11-13 s (hard). Frames are static (1 fps, as the
official extraction), so nothing visual tells which instrument sounds.

Questions. Every video gets a question for each (scenario, type) pair of the real
dataset (Audio: Counting, Comparative; Visual: Counting, Location; Audio-Visual:
Existential, Counting, Location, Comparative, Temporal), with MUSIC-AVQA-style
templates and placeholders. Visual answers follow from the frame alone; Audio and
Audio-Visual answers depend on which instruments sound, how loud, when and how
often, all drawn at random, so neither the frame nor the question predicts them
(yes/no targets are balanced by choosing the asked-about instrument from the
sounding or the silent ones with equal odds). Answers come from a closed
vocabulary (yes/no, zero..five, instrument names, left/middle/right), so exact
match accuracy is meaningful.

VQA v2: images of 1-3 coloured shapes with colour / shape / count / existence
questions and ten human-like answers each. AudioCaps: clips of 1-2 instruments with
template captions (which instruments, how many notes, louder/quieter), one per
training clip and five per val/test clip.

Same seed ⇒ byte-identical files (with the same numpy/Pillow/libsndfile builds).
Audio is 8 kHz 16-bit PCM by default (every partial is below 4 kHz), which keeps
the default corpus at about 10 MB (the ``small`` one about 1.5 MB) and written in
about 2 s; `load_audio` resamples it to the encoder's rate. Scenes, sounds,
pictures and questions live in `safe_av.data.synth_scenes`; this module writes them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import soundfile as sf

from safe_av.data.synth_scenes import (
    COLOR_OF,
    INSTRUMENTS,
    NUMBERS,
    POSITIONS,
    SHAPE_OF,
    Scene,
    draw_objects,
    draw_scene,
    make_scene,
    pick,
    render_audio,
    scene_questions,
    yes_no,
)

VQA_COLORS = {"red": (215, 45, 40), "green": (35, 165, 70), "blue": (40, 80, 220), "yellow": (235, 190, 25)}
VQA_SHAPES = ("circle", "square", "triangle")


def _write_wav(path: Path, wave: np.ndarray, sr: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, sr, subtype="PCM_16", format="WAV")


# ------------------------------------------------------------------------- MUSIC-AVQA
def _split_names(n: int, rng: np.random.Generator) -> list[str]:
    """Assign n items to train/val/test (~70/15/15, each split non-empty when n >= 3)."""
    n_val = n_test = max(1, round(0.15 * n)) if n >= 3 else 0
    names = ["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
    return [names[i] for i in rng.permutation(n)]


def write_musicavqa(root: Path, rng: np.random.Generator, n_videos: int, sr: int) -> dict[str, int]:
    """Write the MUSIC-AVQA part; returns question counts per split."""
    splits = _split_names(n_videos, rng)
    records: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    qid = 0
    for v, split in enumerate(splits):
        video_id = f"{v + 1:08d}"
        scene = make_scene(rng)
        _write_wav(root / "audio" / f"{video_id}.wav", render_audio(scene, sr, rng), sr)
        frame = draw_scene(scene, rng)
        frames = root / "frames" / video_id
        frames.mkdir(parents=True, exist_ok=True)
        for i in range(max(1, int(round(scene.duration)))):
            (frames / f"{i + 1:08d}.jpg").write_bytes(frame)
        for scenario, qtype, template, values, answer in scene_questions(scene, rng):
            qid += 1
            records[split].append(
                {
                    "video_id": video_id,
                    "question_id": qid,
                    "type": json.dumps([scenario, qtype]),
                    "question_content": template,
                    "templ_values": json.dumps(values),
                    "question_deleted": 0,
                    "anser": answer,
                }
            )
    (root / "json").mkdir(parents=True, exist_ok=True)
    for split, items in records.items():
        (root / "json" / f"avqa-{split}.json").write_text(json.dumps(items, indent=1))
    return {s: len(r) for s, r in records.items()}


# -------------------------------------------------------------------------- AudioCaps
def _captions(scene: Scene, rng: np.random.Generator, k: int) -> list[str]:
    names = scene.by_onset
    louder = scene.ramp[1] > scene.ramp[0]
    trend = "getting louder" if louder else "getting quieter"
    if len(names) == 1:
        n = NUMBERS[len(scene.voices[names[0]].starts)]
        inst = names[0]
        pool = [
            f"a {inst} plays {n} {'note' if n == 'one' else 'notes'}",
            f"someone plays the {inst}, {trend}",
            f"the sound of a {inst}",
            f"a {inst} is playing {n} {'time' if n == 'one' else 'times'}",
            f"a solo {inst}, {trend}",
            f"{inst} music, {trend}",
        ]
    else:
        a, b = names
        pool = [
            f"a {a} and then a {b} play",
            f"a {a} plays and a {b} joins in",
            f"{a} and {b} music, {trend}",
            f"the sound of a {a} followed by a {b}",
            f"a {b} joins a {a}, {trend}",
            f"a {a} starts before a {b}",
        ]
    return [pool[i] for i in rng.permutation(len(pool))[:k]]


def _youtube_id(rng: np.random.Generator) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), 11))


def write_audiocaps(root: Path, rng: np.random.Generator, n_clips: int, sr: int) -> dict[str, int]:
    """Write the AudioCaps part; returns caption-row counts per split."""
    splits = _split_names(n_clips, rng)
    rows: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    cap_id = 100000
    for split in splits:
        youtube_id = _youtube_id(rng)
        scene = make_scene(rng, max_visible=2)
        _write_wav(root / "audio" / split / f"{youtube_id}.wav", render_audio(scene, sr, rng), sr)
        start = int(rng.integers(0, 30)) * 10
        for caption in _captions(scene, rng, 1 if split == "train" else 5):
            cap_id += int(rng.integers(1, 50))
            rows[split].append([cap_id, youtube_id, start, caption])
    for split, items in rows.items():
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
            writer.writerows(items)
    return {s: len(r) for s, r in rows.items()}


# ----------------------------------------------------------------------------- VQA v2
def _vqa_objects(rng: np.random.Generator) -> list[tuple[str, str, str]]:
    n = int(rng.integers(1, 4))
    slots = rng.choice(len(POSITIONS), n, replace=False)
    shapes = rng.choice(len(VQA_SHAPES), n, replace=False)
    colors = list(VQA_COLORS)
    picks = [colors[int(rng.integers(len(colors)))] for _ in range(n)]
    return [(VQA_SHAPES[sh], c, POSITIONS[sl]) for sh, c, sl in zip(shapes, picks, slots, strict=True)]


def _vqa_questions(objs: list[tuple[str, str, str]], rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    """``(question, answer, question_type, answer_type)`` for an image."""
    shape, color, slot = objs[int(rng.integers(len(objs)))]
    if rng.random() < 0.5:
        ask_shape, ask_color = shape, color
    else:
        ask_shape, ask_color = str(pick(rng, list(VQA_SHAPES))), str(pick(rng, list(VQA_COLORS)))
    exists = any(o[0] == ask_shape and o[1] == ask_color for o in objs)
    return [
        (f"What color is the {shape}?", color, "what color is the", "other"),
        (f"What shape is on the {slot}?", shape, "what shape is", "other"),
        ("How many shapes are there?", str(len(objs)), "how many", "number"),
        (f"Is there a {ask_color} {ask_shape}?", yes_no(exists), "is there a", "yes/no"),
    ]


def _ten_answers(answer: str, answer_type: str, rng: np.random.Generator) -> list[dict]:
    """Ten annotator answers: mostly the truth, 0-2 plausible slips."""
    slips = {"yes/no": ["yes", "no"], "number": ["1", "2", "3", "4"], "other": list(VQA_COLORS) + list(VQA_SHAPES)}
    wrong = [a for a in slips[answer_type] if a != answer]
    out = []
    for i in range(10):
        text = str(pick(rng, wrong)) if rng.random() < 0.08 else answer
        out.append({"answer": text, "answer_confidence": "yes" if text == answer else "maybe", "answer_id": i + 1})
    return out


def write_vqav2(root: Path, rng: np.random.Generator, n_images: int, questions_per_image: int = 3) -> dict[str, int]:
    """Write the VQA v2 part (train2014 / val2014); returns question counts per split."""
    split_of = ["val" if i % 4 == 3 else "train" for i in range(n_images)]
    image_ids = sorted(int(x) for x in rng.choice(np.arange(1, 600000), n_images, replace=False))
    qs: dict[str, list] = {"train": [], "val": []}
    anns: dict[str, list] = {"train": [], "val": []}
    for image_id, split in zip(image_ids, split_of, strict=True):
        objs = _vqa_objects(rng)
        folder = root / f"{split}2014"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"COCO_{split}2014_{image_id:012d}.jpg").write_bytes(
            draw_objects([(s, VQA_COLORS[c], p) for s, c, p in objs], rng)
        )
        options = _vqa_questions(objs, rng)
        for k, i in enumerate(rng.permutation(len(options))[:questions_per_image]):
            question, answer, qtype, atype = options[i]
            qid = image_id * 1000 + k
            answers = _ten_answers(answer, atype, rng)
            texts = [a["answer"] for a in answers]
            majority = max(sorted(set(texts)), key=texts.count)
            qs[split].append({"image_id": image_id, "question": question, "question_id": qid})
            anns[split].append(
                {
                    "question_type": qtype,
                    "multiple_choice_answer": majority,
                    "answers": answers,
                    "image_id": image_id,
                    "answer_type": atype,
                    "question_id": qid,
                }
            )
    for split in qs:
        sub = f"{split}2014"
        common = {"info": {"description": "SAFE synthetic VQA v2-format set"}, "license": {}, "data_subtype": sub}
        (root / f"v2_OpenEnded_mscoco_{sub}_questions.json").write_text(
            json.dumps({**common, "task_type": "Open-Ended", "data_type": "mscoco", "questions": qs[split]})
        )
        (root / f"v2_mscoco_{sub}_annotations.json").write_text(
            json.dumps({**common, "data_type": "mscoco", "annotations": anns[split]})
        )
    return {s: len(q) for s, q in qs.items()}


# ------------------------------------------------------------------------------- entry
def write_synthetic(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_videos: int = 40,
    n_vqa_images: int = 120,
    n_audio_clips: int = 48,
    small: bool = False,
    sample_rate: int = 8000,
) -> dict[str, Path]:
    """Write the synthetic corpus (see the module docstring).

    Args:
        out_dir: output folder (created; existing files of the same names are replaced).
        seed: the corpus is a pure function of ``seed`` and the sizes.
        n_videos: MUSIC-AVQA videos, ~11 questions each (default ~450 questions).
        n_vqa_images: VQA images, 3 questions each (default 360 questions).
        n_audio_clips: AudioCaps clips (default ~100 caption rows).
        small: tiny corpus for tests (9 videos, 12 images, 6 clips), overriding sizes.
        sample_rate: audio rate in Hz.

    Returns:
        ``{"musicavqa": path, "audiocaps": path, "vqav2": path}``: the ``--root`` of each.
    """
    if small:
        n_videos, n_vqa_images, n_audio_clips = 9, 12, 6
    if min(n_videos, n_audio_clips) < 3 or n_vqa_images < 4:
        raise ValueError(
            f"write_synthetic: need n_videos >= 3, n_audio_clips >= 3, n_vqa_images >= 4, "
            f"got {n_videos}, {n_audio_clips}, {n_vqa_images}"
        )
    out = Path(out_dir)
    roots = {name: out / name for name in ("musicavqa", "audiocaps", "vqav2")}
    for path in roots.values():
        path.mkdir(parents=True, exist_ok=True)
    counts = {
        "musicavqa": write_musicavqa(roots["musicavqa"], np.random.default_rng([seed, 1]), n_videos, sample_rate),
        "audiocaps": write_audiocaps(roots["audiocaps"], np.random.default_rng([seed, 2]), n_audio_clips, sample_rate),
        "vqav2": write_vqav2(roots["vqav2"], np.random.default_rng([seed, 3]), n_vqa_images),
    }
    meta = {
        "seed": seed,
        "sizes": {"n_videos": n_videos, "n_vqa_images": n_vqa_images, "n_audio_clips": n_audio_clips,
                  "small": small},
        "sample_rate": sample_rate,
        "counts": counts,
        "answer_vocabulary": sorted({*NUMBERS, "yes", "no", *INSTRUMENTS, *POSITIONS}),
        "instruments": {n: {"shape": SHAPE_OF[n], "color": COLOR_OF[n]} for n in INSTRUMENTS},
    }
    (out / "synthetic_meta.json").write_text(json.dumps(meta, indent=1))
    return roots


def ensure_synthetic(data_cfg) -> bool:
    """Write the corpus ``data_cfg`` asks for (``data.root``, ``synth_seed``, ``synth_*`` sizes) unless the one
    on disk was written with the same seed and sizes; True when it (re)wrote it. A corpus written with other
    sizes is rewritten, not silently reused."""
    import logging

    want = {"n_videos": data_cfg.synth_videos, "n_vqa_images": data_cfg.synth_vqa_images,
            "n_audio_clips": data_cfg.synth_audio_clips, "small": False}
    meta_path = Path(data_cfg.root) / "synthetic_meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("seed") == data_cfg.synth_seed and meta.get("sizes") == want:
            return False
        why = f"it holds seed={meta.get('seed')} sizes={meta.get('sizes')}, the config asks for " \
              f"seed={data_cfg.synth_seed} sizes={want}"
    else:
        why = "absent"
    logging.getLogger(__name__).info("writing the synthetic corpus to %s (%s)", data_cfg.root, why)
    write_synthetic(data_cfg.root, seed=data_cfg.synth_seed, n_videos=want["n_videos"],
                    n_vqa_images=want["n_vqa_images"], n_audio_clips=want["n_audio_clips"])
    return True
