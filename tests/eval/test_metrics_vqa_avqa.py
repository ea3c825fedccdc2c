"""VQA v2 accuracy (official vqaEval.py behaviour), MUSIC-AVQA pooling, temporal and class accuracy.

Expected values are worked out by hand from the official algorithm:
  pred is normalised (punctuation -> digits/articles -> contractions); references are only
  punctuation-processed, and only when they are not all identical; the score is the mean over
  leaving out each of the n references of min(1, matches_among_the_other_n-1 / 3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safe_av.eval.metrics import (
    AVQA_TABLE_ROWS,
    avqa_accuracy,
    classification_accuracy,
    normalize_vqa_answer,
    temporal_accuracy,
    vqa_accuracy,
    vqa_corpus_accuracy,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),  # lower-case, then number word -> digit
        ("none", "0"),  # 'none' is in the tool's number map
        ("yes.", "yes"),  # a period not followed by a digit is dropped
        ("3.5", "3.5"),  # ... but kept before a digit
        ("dont", "don't"),  # contraction table adds the apostrophe
        ("don't", "don't"),  # apostrophe is not in the master punctuation list: kept
        ("a dog", "dog"),  # articles dropped
        ("The", ""),  # ... even when nothing is left
        ("1,000", "1000"),  # a digit-comma-digit anywhere => every punctuation mark is deleted
        ("red, blue", "red blue"),  # ', ' present => ',' deleted (the space stays)
        ("red,blue", "red blue"),  # no space around it => ',' becomes a space
        ("t-shirt", "t shirt"),
        ("  Yes!\n", "yes"),
        ("." * 40, "." * 8),  # re.UNICODE passed as `count`: only 32 periods removed
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    "k, expected",
    [
        # 10 references, k of them equal to the prediction.
        # held-out ref is a match (k times): min(1,(k-1)/3); not a match (10-k times): min(1,k/3)
        (0, 0.0),  # (0 + 10*0)/10
        (1, 0.3),  # (1*0 + 9*(1/3))/10 = 3/10
        (2, 0.6),  # (2*(1/3) + 8*(2/3))/10 = (2/3 + 16/3)/10 = 6/10
        (3, 0.9),  # (3*(2/3) + 7*1)/10 = (2 + 7)/10
        (4, 1.0),  # (4*1 + 6*1)/10
        (10, 1.0),
    ],
)
def test_vqa_accuracy_match_counts(k, expected):
    answers = ["2"] * k + ["3"] * (10 - k)
    assert vqa_accuracy("2", answers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("Two", ["2"] * 10, 1.0),  # prediction normalised: "two" -> "2"
        ("2", ["two"] * 10, 0.0),  # references are never digit-mapped
        ("yes.", ["yes"] * 10, 1.0),
        ("yes", ["yes."] * 10, 0.0),  # identical references are not processed at all
        ("yes", ["yes."] * 9 + ["no"], 1.0),  # differing references get punctuation processing
        ("yes", ["Yes"] * 4 + ["no"] * 6, 0.0),  # ... but never lower-casing
        ("dont", ["don't"] * 10, 1.0),
        ("don't", ["don't"] * 10, 1.0),
        ("dont", ["dont"] * 10, 0.0),  # prediction becomes "don't", the reference stays "dont"
        ("a dog", ["dog"] * 10, 1.0),
        ("The dog", ["dog"] * 10, 1.0),
        ("dog", ["a dog"] * 10, 0.0),  # reference articles stay
        ("1,000", ["1000"] * 10, 1.0),
        ("red, blue", ["red blue"] * 10, 1.0),
        ("t-shirt", ["t-shirt"] * 3 + ["shirt"] * 7, 0.9),  # both sides -> "t shirt"; 3 matches
        ("cat", ["cat", "cat"], 1 / 3),  # 2 refs: each held out leaves 1 match -> 1/3
        ("cat", ["cat"], 0.0),  # 1 ref: holding it out leaves none
    ],
)
def test_vqa_accuracy_corner_cases(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalize_references_option_and_errors():
    assert vqa_accuracy("2", ["two"] * 10, normalize_references=True) == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("yes", "yes")


def test_vqa_corpus_accuracy_groups_and_official_rounding():
    records = [
        {"prediction": "yes", "answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is this"},  # 1.0
        {
            "prediction": "2",
            "answers": ["2"] * 2 + ["3"] * 8,
            "answer_type": "number",
            "question_type": "how many",
        },  # 0.6
        {"prediction": "red", "answers": ["blue"] * 10, "answer_type": "other", "question_type": "what color is"},  # 0
        {"prediction": "three", "answers": ["3"] * 10, "answer_type": "number", "question_type": "how many"},  # 1.0
        {
            "prediction": "red",
            "answers": ["red"] + ["blue"] * 9,
            "answer_type": "other",
            "question_type": "what color is",
        },  # 0.3
        {"prediction": "no", "answers": ["no"] * 10},  # 1.0, no types: overall only
    ]
    out = vqa_corpus_accuracy(records)
    assert out["n"] == 6
    assert out["overall"] == pytest.approx(3.9 / 6)  # (1 + .6 + 0 + 1 + .3 + 1) / 6 = 0.65
    assert out["per_answer_type"] == pytest.approx({"yes/no": 1.0, "number": 0.8, "other": 0.15})
    assert out["per_question_type"] == pytest.approx({"is this": 1.0, "how many": 0.8, "what color is": 0.15})
    assert out["official"] == {
        "overall": 65.0,
        "perAnswerType": {"yes/no": 100.0, "number": 80.0, "other": 15.0},
        "perQuestionType": {"is this": 100.0, "how many": 80.0, "what color is": 15.0},
    }
    # round(100 * 1/3, 2) = 33.33 as the tool prints it
    thirds = [{"prediction": p, "answers": ["a1"] * 10} for p in ("a1", "b", "c")]
    assert vqa_corpus_accuracy(thirds)["official"]["overall"] == 33.33
    with pytest.raises(ValueError, match="record 0"):
        vqa_corpus_accuracy([{"answers": ["x"]}])


def _avqa_records():
    recs = []
    recs += [{"question_type": "Audio/Counting", "correct": c} for c in (True, True, False)]
    recs += [{"question_type": "Audio/Comparative", "correct": False}]
    recs += [
        {"question_type": "Visual/Location", "prediction": "Yes ", "answer": "yes"},  # strip/lower -> correct
        {"question_type": "Visual/Location", "prediction": "left", "answers": ["left"]},
    ]
    recs += [{"question_type": "Audio-Visual/Temporal", "correct": c} for c in (True, False, False, False)]
    recs += [{"question_type": "['Audio-Visual', 'Existential']", "correct": True}]  # the dataset's own format
    recs += [{"question_type": "Visual/Comparative", "correct": False}]  # not one of the 9: overall, by_type only
    recs += [{"question_type": "Music/Unknown", "correct": True}]  # unparsable: overall only
    return recs


def test_avqa_accuracy_pools_per_question_like_the_official_test():
    out = avqa_accuracy(_avqa_records())
    t = out["table"]
    assert list(t) == [label for label, _ in AVQA_TABLE_ROWS] + ["Overall"]
    assert t["Audio Counting"] == pytest.approx(2 / 3)
    assert t["Audio Comparative"] == 0.0
    assert t["Audio (avg)"] == pytest.approx(2 / 4)  # pooled: (2+0)/(3+1); a mean of types would be 1/3
    assert t["Visual Counting"] is None and t["Visual Location"] == 1.0 and t["Visual (avg)"] == 1.0
    assert t["AV Temporal"] == 0.25 and t["AV Existential"] == 1.0
    assert t["AV (avg)"] == pytest.approx(2 / 5)  # (1+1)/(4+1)
    assert t["Overall"] == out["overall"] == pytest.approx(7 / 13)  # all 13 records, incl. the last two
    assert out["counts"]["Audio-Visual/Temporal"] == 4 and out["counts"]["Visual/Comparative"] == 1  # in by_type only
    assert out["by_scenario"] == pytest.approx({"Audio": 0.5, "Visual": 1.0, "Audio-Visual": 0.4})


def test_temporal_accuracy():
    assert temporal_accuracy(_avqa_records()) == 0.25
    assert temporal_accuracy([{"question_type": "Audio/Counting", "correct": True}]) is None


def test_avqa_errors():
    with pytest.raises(ValueError, match="no records"):
        avqa_accuracy([])
    with pytest.raises(ValueError, match="record 0 needs"):
        avqa_accuracy([{"question_type": "Audio/Counting"}])


def test_classification_accuracy():
    assert classification_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.3, 0.2]])  # argmax -> 1, 0, 0
    assert classification_accuracy(logits, torch.tensor([1, 1, 0])) == pytest.approx(2 / 3)
    assert classification_accuracy(np.eye(3), np.arange(3)) == 1.0
    with pytest.raises(ValueError, match="preds"):
        classification_accuracy([1, 2], [1])
