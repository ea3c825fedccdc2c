"""Run a SAFE model over evaluation sets: VQA retention, AVQA accuracy, and "does audio matter"."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import Counter, defaultdict

import torch
from torch.utils.data import DataLoader

from safe_av.data.records import Sample
from safe_av.data.text import SAFEProcessor, move_batch
from safe_av.eval.metrics import (  # noqa: F401 (normalize_answer: also this module's name for it)
    AVQA_TABLE_ROWS,
    avqa_accuracy,
    feature_cosine_similarity,
    normalize_answer,
    parse_avqa_type,
    temporal_accuracy,
    vqa_accuracy,
)
from safe_av.training.data import SAFEDataset

AUDIO_SCENARIOS = ("Audio", "Audio-Visual")


def is_audio_dependent(question_type) -> bool:
    """Whether an AVQA question's scenario needs the audio (Audio, Audio-Visual), read by the same parser as the
    per-type table (``parse_avqa_type``: ``"Audio/Counting"``, the dataset's ``"['Audio', 'Counting']"``, ...)."""
    parsed = parse_avqa_type(question_type)
    return parsed is not None and parsed[0] in AUDIO_SCENARIOS


def predict(model, processor: SAFEProcessor, samples: list[Sample], *, batch_size: int = 16,
            max_new_tokens: int = 8, use_audio: bool = True, shuffle_audio: bool = False,
            max_seconds: float = 10.0, feature_cache=None) -> list[dict]:
    """Greedy answers for ``samples``; one record per sample that could be loaded.

    Args:
        use_audio: False removes the audio tokens (the "audio masked" view).
        shuffle_audio: give every sample the clip of another audio file (see :func:`shuffled_audio`).
    """
    if shuffle_audio:
        samples = shuffled_audio(samples)
    dataset = SAFEDataset(samples, sampling_rate=processor.sampling_rate, max_seconds=max_seconds,
                          with_answers=False, feature_cache=feature_cache)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=processor.collate)
    records = []
    with eval_mode(model):
        for batch in loader:
            if batch.get("empty"):
                continue
            batch = move_batch(batch, model.device)
            preds = model.generate_from_batch(batch, max_new_tokens=max_new_tokens, use_audio=use_audio)
            for meta, pred in zip(batch["meta"], preds):
                records.append(dict(meta, prediction=pred))
    return records


def shuffled_audio(samples: list[Sample]) -> list[Sample]:
    """Each sample gets the next distinct audio file (sorted, rotated by one): never its own clip.

    Rotating clips within a batch is not enough: a video's questions sit side by side, so a neighbour's
    clip is often the same file.
    """
    files = sorted({s.audio for s in samples if s.audio is not None})
    if len(files) < 2:
        return list(samples)
    nxt = {f: files[(i + 1) % len(files)] for i, f in enumerate(files)}
    return [dataclasses.replace(s, audio=nxt[s.audio]) if s.audio is not None else s for s in samples]


def truncated(records: list[dict]) -> int:
    """How many of ``records`` had their clip cut to ``data.max_audio_seconds`` (longer clips are read only as far as
    the encoder takes; each file is also logged)."""
    return sum(1 for r in records if r.get("audio_truncated"))


def loaded(samples: list[Sample], records: list[dict]) -> list[Sample]:
    """The ``samples`` that gave a record in ``records`` (their files loaded), in order: the set every other
    condition and baseline of the same evaluation is scored on."""
    seen = {(r["dataset"], r["id"]) for r in records}
    return [s for s in samples if (s.dataset, s.id) in seen]


def score_vqa(records: list[dict]) -> float | None:
    """Mean official VQA accuracy (fraction); ``None`` without records (every sample failed to load). Sets each
    record's ``score`` (its own VQA accuracy), as :func:`score_avqa` sets ``correct``."""
    if not records:
        return None
    for r in records:
        r["score"] = vqa_accuracy(r["prediction"], r["answers"])
    return sum(r["score"] for r in records) / len(records)


class PredictionLog:
    """The records behind an evaluation's metrics, one per question and condition, as ``(set, condition, record)``;
    written one JSON line each (``set``, ``condition`` and the record's keys) by ``safe train`` and ``safe eval``.
    Records are kept by reference: the ``score`` / ``correct`` the scorers set later are written too."""

    def __init__(self):
        self.lines: list[tuple[str, str, dict]] = []

    def keep(self, records: list[dict], set_name: str, condition: str) -> list[dict]:
        self.lines.extend((set_name, condition, r) for r in records)
        return records

    def of(self, set_name: str, condition: str) -> list[dict]:
        return [r for s, c, r in self.lines if s == set_name and c == condition]

    def write(self, path) -> None:
        with open(path, "w") as f:
            for set_name, condition, r in self.lines:
                f.write(json.dumps(dict(set=set_name, condition=condition, **r), default=str) + "\n")


def score_avqa(records: list[dict]) -> dict:
    """Official-style AVQA table + the audio-dependent subset (every value ``None`` without records)."""
    if not records:
        return {"overall": None, "n": 0, "by_type": {}, "by_scenario": {}, "counts": {}, "table": {},
                "audio_dependent": None, "temporal": None}
    for r in records:
        r["correct"] = normalize_answer(r["prediction"]) == normalize_answer(r["answers"][0])
    out = avqa_accuracy(records)
    dep = [r for r in records if is_audio_dependent(r["question_type"])]
    out["audio_dependent"] = sum(r["correct"] for r in dep) / len(dep) if dep else None
    out["temporal"] = temporal_accuracy(records)
    return out


def avqa_table_rows(question_type: str | None) -> list[str]:
    """The official AVQA table rows (``AVQA_TABLE_ROWS`` labels, e.g. ``"Audio Counting"``, ``"Audio (avg)"``) a
    question of ``question_type`` counts in, ``"Overall"`` last (every question counts there)."""
    parsed = parse_avqa_type(question_type)
    key = f"{parsed[0]}/{parsed[1]}" if parsed else None
    return [label for label, keys in AVQA_TABLE_ROWS if key in keys] + ["Overall"]


def chance_accuracy(train: list[Sample], test: list[Sample]) -> dict:
    """Chance and majority baselines per question, from the training answers of the same question type.

    ``chance``: expected accuracy of a uniform guess among the answers seen for the type in training;
    ``majority``: accuracy of always answering the type's most frequent training answer.
    ``chance_by_type`` / ``majority_by_type`` / ``n_by_type``: the same per official AVQA table row (keys as
    :func:`safe_av.eval.metrics.avqa_accuracy`'s ``table``: ``"Audio Counting"``, ..., ``"AV (avg)"``,
    ``"Overall"``), pooled per question; a row without test questions has ``None`` and ``n`` 0.
    """
    answers = defaultdict(Counter)
    for s in train:
        answers[s.question_type][normalize_answer(s.answers[0])] += 1
    chance, majority, dep_chance, dep_major = [], [], [], []
    rows = [label for label, _ in AVQA_TABLE_ROWS] + ["Overall"]
    row_chance: dict[str, list[float]] = {r: [] for r in rows}
    row_major: dict[str, list[float]] = {r: [] for r in rows}
    for s in test:
        counts = answers.get(s.question_type)
        gold = normalize_answer(s.answers[0])
        c = 1.0 / len(counts) if counts and gold in counts else 0.0
        m = float(bool(counts) and counts.most_common(1)[0][0] == gold)
        chance.append(c)
        majority.append(m)
        if is_audio_dependent(s.question_type):
            dep_chance.append(c)
            dep_major.append(m)
        for row in avqa_table_rows(s.question_type):
            row_chance[row].append(c)
            row_major[row].append(m)

    def mean(x):
        return sum(x) / len(x) if x else None

    return {"chance": mean(chance), "majority": mean(majority), "audio_dependent_chance": mean(dep_chance),
            "audio_dependent_majority": mean(dep_major),
            "chance_by_type": {r: mean(v) for r, v in row_chance.items()},
            "majority_by_type": {r: mean(v) for r, v in row_major.items()},
            "n_by_type": {r: len(v) for r, v in row_chance.items()}}


@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` inside the block (no dropout in what is measured), its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def feature_similarity(model, processor: SAFEProcessor, samples: list[Sample], *, batch_size: int = 16) -> float:
    """Cosine similarity of SAFE's and the original model's last hidden states on the same VL inputs, in eval
    mode whatever mode the model is in (the trainer calls it on its training model: dropout in the adapter
    made the value noisy)."""
    dataset = SAFEDataset(samples, sampling_rate=processor.sampling_rate)
    sims = []
    with eval_mode(model):
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=processor.collate):
            if batch.get("empty"):
                continue
            batch = move_batch(batch, model.device)
            student = model(**batch, use_audio=False)
            teacher = model.teacher_forward(batch)
            mask = batch["attention_mask"].bool() if not model.base.is_encoder_decoder else None
            if mask is not None and student.hidden.shape[1] != mask.shape[1]:
                mask = None
            sims.append(feature_cosine_similarity(student.hidden, teacher.hidden, mask))
    return sum(sims) / len(sims) if sims else float("nan")
