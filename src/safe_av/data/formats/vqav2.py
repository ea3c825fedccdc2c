"""VQA v2 (Goyal et al., CVPR 2017) reader.

Official files (as unzipped from visualqa.org)::

    v2_OpenEnded_mscoco_{train,val}2014_questions.json
        {"info", "task_type", "data_type", "license", "data_subtype": "train2014",
         "questions": [{"image_id": 458752, "question": "...", "question_id": 458752000}]}
    v2_mscoco_{train,val}2014_annotations.json
        {"info", "license", "data_subtype", "annotations": [
            {"question_id", "image_id", "question_type": "what is this",
             "answer_type": "yes/no" | "number" | "other", "multiple_choice_answer": "...",
             "answers": [{"answer": "...", "answer_confidence": "yes", "answer_id": 1}, ... x10]}]}

`Sample.answers` are the ten human answers, reordered (multiset unchanged, so the
VQA accuracy min(#matches/3, 1) is unaffected) so that one equal to
``multiple_choice_answer`` comes first: it is the training target. Test splits
(``test``/``test-dev`` → ``*test2015*``/``*test-dev2015*`` questions, images in
``test2015/``) have no annotations: their samples have ``answers == []``.

Rejected as bad entries (naming file, index, field and value), as the MUSIC-AVQA reader
does: a question or annotation that is not an object or lacks/mistypes a field, an
empty question, an empty ``multiple_choice_answer``, an unknown ``answer_type``, a
question without annotation, and duplicates: a repeated ``question_id`` in the questions
or in the annotations keeps the first occurrence and reports each later one. An empty
*human* answer does not reject its question: the official evaluator scores it as an
annotator whose answer matches no prediction, and so does ``vqa_accuracy``; such
questions are counted in the reader's log.

Expected ``--root`` layout::

    ROOT/
      v2_OpenEnded_mscoco_train2014_questions.json   v2_mscoco_train2014_annotations.json
      v2_OpenEnded_mscoco_val2014_questions.json     v2_mscoco_val2014_annotations.json
        (the JSON files may also sit in ROOT/Questions/ and ROOT/Annotations/)
      train2014/COCO_train2014_<image_id:012d>.jpg
      val2014/COCO_val2014_<image_id:012d>.jpg
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safe_av.data.difficulty import difficulty_of
from safe_av.data.formats._common import find_file, load_json
from safe_av.data.records import BadEntry, DataError, ReadResult, Sample

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
SUBTYPE = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test-dev2015"}
ANSWER_TYPES = ("yes/no", "number", "other")


def subtype(split: str) -> str:
    """COCO subtype of a split: ``train`` → ``train2014``; ``test-dev`` → ``test-dev2015``."""
    return SUBTYPE.get(split, split)


def question_path(root: str | Path, split: str) -> Path:
    name = f"v2_OpenEnded_mscoco_{subtype(split)}_questions.json"
    return find_file(Path(root), [name, f"Questions/{name}", f"questions/{name}"], f"VQA v2 {split} questions")


def annotation_path(root: str | Path, split: str) -> Path:
    name = f"v2_mscoco_{subtype(split)}_annotations.json"
    return find_file(Path(root), [name, f"Annotations/{name}", f"annotations/{name}"], f"VQA v2 {split} annotations")


def image_path(root: Path, split: str, image_id: int) -> Path:
    """``{sub}/COCO_{sub}_{image_id:012d}.jpg``; test-dev images live in ``test2015/``."""
    sub = subtype(split)
    folder = "test2015" if sub == "test-dev2015" else sub
    return root / folder / f"COCO_{folder}_{image_id:012d}.jpg"


def read(root: str | Path, split: str) -> ReadResult:
    """Read one split, joining questions and annotations on ``question_id``.

    Raises:
        FileNotFoundError: a questions (or, for train/val, annotations) file is missing.
        DataError: a file is not JSON.
    """
    root = Path(root)
    q_path = question_path(root, split)
    questions = _list_field(load_json(q_path), "questions", q_path)
    result = ReadResult()
    annotations: dict[int, dict] | None = None
    if subtype(split).endswith("2014"):
        a_path = annotation_path(root, split)
        annotations = _index_annotations(_list_field(load_json(a_path), "annotations", a_path), str(a_path), result)
    first: dict[str, int] = {}
    for i, q in enumerate(questions):
        where = f"{q_path}[questions][{i}]"
        sample = _parse(q, where, root, split, annotations, result)
        if sample is None:
            continue
        if sample.id in first:
            result.bad.append(BadEntry(where, "question_id", q["question_id"],
                                       f"duplicate question_id (first at [questions][{first[sample.id]}])"))
            continue
        first[sample.id] = i
        result.samples.append(sample)
    partial = sum(any(not a.strip() for a in s.answers) for s in result.samples)
    if partial:
        log.info("%s: %d question(s) have an empty human answer among their %s; kept and scored as the official "
                 "evaluator scores them (that annotator matches no prediction)", q_path, partial,
                 "ten" if all(len(s.answers) == 10 for s in result.samples) else "answers")
    return result


def _list_field(data: Any, key: str, path: Path) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(path, key, type(data.get(key) if isinstance(data, dict) else data).__name__, "expected a list")
    return data[key]


def _index_annotations(items: list, where: str, result: ReadResult) -> dict[int, dict]:
    """Annotations by ``question_id``; a malformed id or a repeated one (the first is kept) is a bad entry."""
    index: dict[int, dict] = {}
    first: dict[int, int] = {}
    for i, ann in enumerate(items):
        qid = ann.get("question_id") if isinstance(ann, dict) else None
        if not isinstance(qid, int) or isinstance(qid, bool):
            result.bad.append(BadEntry(f"{where}[annotations][{i}]", "question_id", qid, "missing or not an integer"))
            continue
        if qid in first:
            result.bad.append(BadEntry(f"{where}[annotations][{i}]", "question_id", qid,
                                       f"duplicate annotation for this question_id (the first, at "
                                       f"[annotations][{first[qid]}], is used)"))
            continue
        first[qid] = i
        index[qid] = ann
    return index


def _parse(
    q: Any, where: str, root: Path, split: str, annotations: dict[int, dict] | None, result: ReadResult
) -> Sample | None:
    if not isinstance(q, dict):
        result.bad.append(BadEntry(where, "<question>", type(q).__name__, "expected a JSON object"))
        return None
    for key, types in (("question_id", int), ("image_id", int), ("question", str)):
        if not isinstance(q.get(key), types) or isinstance(q.get(key), bool):
            result.bad.append(BadEntry(where, key, q.get(key), "missing or wrong type"))
            return None
    if not q["question"].strip():
        result.bad.append(BadEntry(f"{where} (question_id={q['question_id']})", "question", q["question"],
                                   "empty string"))
        return None
    qid, image_id = q["question_id"], q["image_id"]
    attributes: dict[str, Any] = {"image_id": image_id}
    answers: list[str] = []
    answer_type = None
    if annotations is not None:
        parsed = _parse_annotation(annotations.get(qid), f"{where} (question_id={qid})", result)
        if parsed is None:
            return None
        answers, answer_type, extra = parsed
        attributes.update(extra)
    return Sample(
        id=str(qid),
        dataset="vqav2",
        question=q["question"].strip(),
        answers=answers,
        image=str(image_path(root, split, image_id)),
        question_type=answer_type,
        attributes=attributes,
        difficulty=difficulty_of(None, answer_type, has_audio=False),
    )


def _parse_annotation(ann: dict | None, where: str, result: ReadResult) -> tuple[list[str], str, dict] | None:
    if ann is None:
        result.bad.append(BadEntry(where, "annotation", None, "no annotation for this question_id"))
        return None
    raw = ann.get("answers")
    if (
        not isinstance(raw, list)
        or not raw
        or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in raw)
    ):
        result.bad.append(BadEntry(where, "answers", raw, "expected a non-empty list of {'answer': str}"))
        return None
    mca, answer_type = ann.get("multiple_choice_answer"), ann.get("answer_type")
    if not isinstance(mca, str):
        result.bad.append(BadEntry(where, "multiple_choice_answer", mca, "missing or not a string"))
        return None
    if not mca.strip():
        result.bad.append(BadEntry(where, "multiple_choice_answer", mca, "empty string"))
        return None
    if answer_type not in ANSWER_TYPES:
        result.bad.append(BadEntry(where, "answer_type", answer_type, f"expected one of {ANSWER_TYPES}"))
        return None
    answers = [a["answer"] for a in raw]  # an empty one stays: it matches no prediction, as officially
    if mca in answers:  # move one copy to the front; the multiset is unchanged
        answers.remove(mca)
        answers.insert(0, mca)
    elif not answers[0].strip():  # the front answer is the training target: never an empty one
        first = next((a for a in answers if a.strip()), None)
        if first is None:
            result.bad.append(BadEntry(where, "answers", raw, "every human answer is empty"))
            return None
        answers.remove(first)
        answers.insert(0, first)
    extra = {"question_type_vqa": ann.get("question_type"), "multiple_choice_answer": mca}
    return answers, answer_type, extra
