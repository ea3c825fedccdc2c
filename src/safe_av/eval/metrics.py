"""Evaluation metrics: pure functions, no model code.

Each metric states the reference implementation it reproduces; ``docs/metrics.md`` has the
definitions and the tests in ``tests/eval/`` pin the numbers.

- VQA v2 accuracy: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (master).
- MUSIC-AVQA accuracy: GeWu-Lab/MUSIC-AVQA ``net_grd_avst/main_avst.py::test`` (pooled per question).
- BLEU-1..4, ROUGE-L, CIDEr-D: coco-caption / ``pycocoevalcap`` 1.2 scorers (on the same tokens).
- Retrieval R@k and mAP@10: DCASE 2022 task 6B ``eval_script.py`` (text->audio); audio->text as in
  Mei et al.'s audio-text retrieval code (AP divided by the number of relevant captions).
"""

from __future__ import annotations

import ast
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "normalize_vqa_answer",
    "vqa_accuracy",
    "vqa_corpus_accuracy",
    "avqa_accuracy",
    "AVQA_TABLE_ROWS",
    "parse_avqa_type",
    "temporal_accuracy",
    "classification_accuracy",
    "tokenize_caption",
    "bleu",
    "rouge_l",
    "cider_d",
    "caption_metrics",
    "retrieval_metrics",
    "feature_cosine_similarity",
    "attention_correlation",
]

# ---------------------------------------------------------------------------------------------
# VQA v2
# ---------------------------------------------------------------------------------------------

# Data tables of the official tool (vqaEval.py, master). Kept as data, including entries that
# can never fire (keys with a capital "I" are looked up after lower-casing) and the odd
# "somebody'd" -> "somebodyd", because reproducing the tool means reproducing its tables.
_VQA_CONTRACTIONS: dict[str, str] = dict(
    pair.split("=")
    for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
    howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
    itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
    mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
    neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
    'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
    shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
    somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
    somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
    someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
    something'dve=something'd've somethingll=something'll thats=that's thered=there'd
    thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
    theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
    wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
    whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
    whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
    whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
    wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
    you'dve=you'd've youll=you'll youre=you're youve=you've
    """.split()
)
_VQA_NUMBER_WORDS = dict(
    none="0", zero="0", one="1", two="2", three="3", four="4", five="5",
    six="6", seven="7", eight="8", nine="9", ten="10",
)  # fmt: skip
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# The punctuation list of the master tool: no apostrophe, no colon, no period (periods have
# their own rule below). Order matters only in theory; kept as in the tool.
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
              ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
# The tool's period regex reads "(?!<=\d)(\.)(?!\d)": the first group is a *lookahead* for the
# literal "<=" + digit (a typo for a lookbehind), so in effect a period is dropped unless a
# digit follows it ("5." -> "5", "3.5" stays, "x.5" stays).
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The tool calls periodStrip.sub("", text, re.UNICODE): the flag lands in the *count*
# argument, so at most int(re.UNICODE) == 32 periods are removed. Reproduced on purpose.
_VQA_PERIOD_MAX_SUBS = int(re.UNICODE)


def _vqa_process_punctuation(text: str) -> str:
    """The tool's ``processPunctuation``: drop or space out punctuation, then strip periods."""
    strip_all = _VQA_DIGIT_COMMA.search(text) is not None  # "1,000": glue, never split
    out = text
    for p in _VQA_PUNCT:
        # The test looks at the *input* text, the replacement works on the running output.
        if strip_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VQA_PERIOD.sub("", out, count=_VQA_PERIOD_MAX_SUBS)


def _vqa_process_digit_article(text: str) -> str:
    """The tool's ``processDigitArticle``: lower-case, number words -> digits, drop articles,
    then expand contractions written without the apostrophe ("dont" -> "don't")."""
    words = [_VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _VQA_ARTICLES]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(s: str) -> str:
    """Normalise a *predicted* answer exactly as the official VQA v2 tool does.

    Steps: newlines/tabs -> spaces, strip, ``processPunctuation`` then ``processDigitArticle``.

    Args:
        s: Raw answer text.

    Returns:
        The normalised answer (may be ``""``, e.g. for ``"the"``).
    """
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_process_digit_article(_vqa_process_punctuation(s))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, normalize_references: bool = False) -> float:
    """VQA v2 accuracy of one prediction, exactly as the official tool computes it.

    The prediction is always normalised (:func:`normalize_vqa_answer`). The reference answers
    are only touched when they are not all identical, and then only by ``processPunctuation``
    (the tool assumes references were normalised when the dataset was built, which holds for
    the VQA v2 annotation files). The score is the mean, over leaving out each reference in
    turn, of ``min(#matches among the others / 3, 1)``; with 10 references and k exact matches
    that is 0, 0.3, 0.6, 0.9, 1.0 for k = 0..4+.

    Args:
        prediction: Model answer.
        answers: The reference answers (10 in VQA v2; any number >= 1 is accepted, as the tool).
        normalize_references: Off = official behaviour. On = also apply the full prediction
            normalisation to every reference (useful for references that were not VQA-normalised;
            not comparable with published numbers).

    Returns:
        Accuracy in [0, 1].
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"vqa_accuracy: answers must be a non-empty list of strings, got {answers!r}")
    pred = normalize_vqa_answer(prediction)
    refs = list(answers)
    if normalize_references:
        refs = [normalize_vqa_answer(a) for a in refs]
    elif len(set(refs)) > 1:
        refs = [_vqa_process_punctuation(a) for a in refs]
    matches = [a == pred for a in refs]
    total = sum(matches)
    # Leave-one-out: the tool removes the held-out answer *record* (unique answer_id), so
    # exactly one entry goes even when several references share the same text.
    per_holdout = [min(1, float(total - m) / 3) for m in matches]
    return float(sum(per_holdout)) / len(per_holdout)


def _get(record: Any, key: str, default: Any = None) -> Any:
    if isinstance(record, Mapping):
        return record.get(key, default)
    return getattr(record, key, default)


def _official_percent(values: list[float], ndigits: int = 2) -> float:
    # Same expression and order as vqaEval.setAccuracy, so the rounding is identical.
    return round(100 * float(sum(values)) / len(values), ndigits)


def vqa_corpus_accuracy(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """VQA v2 accuracy over a set of questions: overall, per answer type, per question type.

    Args:
        records: One per question with ``prediction`` (str) and ``answers`` (list[str]); optional
            ``answer_type`` (``yes/no``, ``number``, ``other``) and ``question_type`` (e.g.
            ``"what color is"``). Records without a type are counted only in ``overall``.

    Returns:
        ``{"overall", "per_answer_type", "per_question_type"}`` as fractions in [0, 1] (unrounded
        means of the per-question accuracies), ``"n"``, and ``"official"``: the same three numbers
        as the tool reports them (percent, rounded to 2 decimals, keys ``overall``,
        ``perAnswerType``, ``perQuestionType``).
    """
    if len(records) == 0:
        raise ValueError("vqa_corpus_accuracy: no records")
    accs: list[float] = []
    by_ans: dict[str, list[float]] = defaultdict(list)
    by_q: dict[str, list[float]] = defaultdict(list)
    for i, r in enumerate(records):
        pred, answers = _get(r, "prediction"), _get(r, "answers")
        if pred is None or answers is None:
            raise ValueError(f"vqa_corpus_accuracy: record {i} needs 'prediction' and 'answers', got {r!r}")
        acc = vqa_accuracy(str(pred), answers)
        accs.append(acc)
        if _get(r, "answer_type") is not None:
            by_ans[str(_get(r, "answer_type"))].append(acc)
        if _get(r, "question_type") is not None:
            by_q[str(_get(r, "question_type"))].append(acc)
    return {
        "overall": sum(accs) / len(accs),
        "per_answer_type": {k: sum(v) / len(v) for k, v in by_ans.items()},
        "per_question_type": {k: sum(v) / len(v) for k, v in by_q.items()},
        "n": len(accs),
        "official": {
            "overall": _official_percent(accs),
            "perAnswerType": {k: _official_percent(v) for k, v in by_ans.items()},
            "perQuestionType": {k: _official_percent(v) for k, v in by_q.items()},
        },
    }


# ---------------------------------------------------------------------------------------------
# MUSIC-AVQA
# ---------------------------------------------------------------------------------------------

_SCENARIOS = {"audio": "Audio", "visual": "Visual", "audio-visual": "Audio-Visual",
              "audio_visual": "Audio-Visual", "audiovisual": "Audio-Visual", "av": "Audio-Visual"}  # fmt: skip
_QTYPES = {t.lower(): t for t in ("Counting", "Comparative", "Location", "Existential", "Temporal")}

# (row label as the official test() prints it, the "<Scenario>/<Type>" keys pooled into it).
AVQA_TABLE_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Audio Counting", ("Audio/Counting",)),
    ("Audio Comparative", ("Audio/Comparative",)),
    ("Audio (avg)", ("Audio/Counting", "Audio/Comparative")),
    ("Visual Counting", ("Visual/Counting",)),
    ("Visual Location", ("Visual/Location",)),
    ("Visual (avg)", ("Visual/Counting", "Visual/Location")),
    ("AV Existential", ("Audio-Visual/Existential",)),
    ("AV Location", ("Audio-Visual/Location",)),
    ("AV Counting", ("Audio-Visual/Counting",)),
    ("AV Comparative", ("Audio-Visual/Comparative",)),
    ("AV Temporal", ("Audio-Visual/Temporal",)),
    ("AV (avg)", ("Audio-Visual/Existential", "Audio-Visual/Location", "Audio-Visual/Counting",
                  "Audio-Visual/Comparative", "Audio-Visual/Temporal")),
)  # fmt: skip


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and extra spaces (exact-match AVQA scoring)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def parse_avqa_type(qtype: Any) -> tuple[str, str] | None:
    """``"Audio/Counting"``, the dataset's ``"['Audio', 'Counting']"`` or a 2-sequence."""
    if qtype is None:
        return None
    if isinstance(qtype, str):
        text = qtype.strip()
        if text.startswith("["):
            try:
                parts = list(ast.literal_eval(text))
            except (ValueError, SyntaxError):
                return None
        else:
            parts = text.split("/")
    else:
        parts = list(qtype)
    if len(parts) != 2:
        return None
    scenario = _SCENARIOS.get(str(parts[0]).strip().lower())
    kind = _QTYPES.get(str(parts[1]).strip().lower())
    if scenario is None or kind is None:
        return None
    return scenario, kind


def _is_correct(record: Any, index: int) -> bool:
    correct = _get(record, "correct")
    if correct is not None:
        return bool(correct)
    pred = _get(record, "prediction")
    answer = _get(record, "answer")
    if answer is None:
        answers = _get(record, "answers")
        answer = answers[0] if answers else None
    if pred is None or answer is None:
        raise ValueError(f"record {index} needs 'correct' or 'prediction' plus 'answer'/'answers', got {record!r}")
    return normalize_answer(str(pred)) == normalize_answer(str(answer))


def avqa_accuracy(records: Sequence[Any]) -> dict[str, Any]:
    """MUSIC-AVQA accuracy, pooled the way the official ``net_grd_avst`` test prints it.

    Every group number (``Audio (avg)``, ``Visual (avg)``, ``AV (avg)``, ``Overall``) is pooled
    per question (correct / questions over the group), not a mean of the type accuracies.
    ``Overall`` counts every record, including ones whose type is not one of the nine.

    Args:
        records: One per question, with ``question_type`` (``"Audio/Counting"``,
            ``"Audio-Visual/Temporal"``, or the dataset's ``"['Audio', 'Counting']"``) and either
            ``correct`` (bool) or ``prediction`` plus ``answer`` (or ``answers[0]``), compared
            after :func:`normalize_answer`. Mappings or objects with those attributes.

    Returns:
        ``overall`` (fraction), ``n``, ``by_type`` (``"<Scenario>/<Type>"`` -> fraction, every
        parsable type present, also ones outside the nine), ``by_scenario`` (the table's three
        ``(avg)`` rows), ``counts`` (questions per type) and ``table``: the 13 official rows in
        print order (fraction, ``None`` where a row has no questions).
    """
    if len(records) == 0:
        raise ValueError("avqa_accuracy: no records")
    correct: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    n_correct = 0
    for i, r in enumerate(records):
        ok = _is_correct(r, i)
        n_correct += ok
        parsed = parse_avqa_type(_get(r, "question_type"))
        if parsed is not None:
            key = f"{parsed[0]}/{parsed[1]}"
            count[key] += 1
            correct[key] += ok

    def pooled(keys: Sequence[str]) -> float | None:
        total = sum(count[k] for k in keys if k in count)
        return sum(correct[k] for k in keys if k in count) / total if total else None

    overall = n_correct / len(records)
    table: dict[str, float | None] = {label: pooled(keys) for label, keys in AVQA_TABLE_ROWS}
    table["Overall"] = overall
    averages = {"Audio": table["Audio (avg)"], "Visual": table["Visual (avg)"], "Audio-Visual": table["AV (avg)"]}
    return {
        "overall": overall,
        "n": len(records),
        "by_type": {k: correct[k] / count[k] for k in sorted(count)},
        "by_scenario": {s: v for s, v in averages.items() if v is not None},
        "counts": dict(sorted(count.items())),
        "table": table,
    }


def temporal_accuracy(records: Sequence[Any]) -> float | None:
    """Accuracy on the questions whose type is ``Temporal`` (any scenario).

    Args:
        records: As for :func:`avqa_accuracy`.

    Returns:
        Fraction correct, or ``None`` if no record is a temporal question.
    """
    hits = [
        _is_correct(r, i)
        for i, r in enumerate(records)
        if (p := parse_avqa_type(_get(r, "question_type"))) is not None and p[1] == "Temporal"
    ]
    return sum(hits) / len(hits) if hits else None


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def classification_accuracy(preds: Any, labels: Any) -> float:
    """Top-1 accuracy.

    Args:
        preds: (N,) predicted class ids, or (N, C) scores/logits (arg-max taken). Lists, numpy
            arrays or tensors.
        labels: (N,) true class ids.

    Returns:
        Fraction correct.
    """
    p, y = _to_numpy(preds), _to_numpy(labels)
    if p.ndim == y.ndim + 1:
        p = p.argmax(axis=-1)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"classification_accuracy: preds {p.shape} vs labels {y.shape} (need equal, non-empty)")
    return float((p == y).mean())


# ---------------------------------------------------------------------------------------------
# Captioning: BLEU (coco 'closest' ref length), ROUGE-L, CIDEr-D — pycocoevalcap 1.2 arithmetic
# ---------------------------------------------------------------------------------------------

# Tokens coco-caption drops after the Stanford PTB tokenizer. Its list spells the bracket
# tokens in upper case ("-LRB-") but runs the tokenizer with -lowerCase, so brackets survive as
# "-lrb-" etc. and count as words; reproduced.
_COCO_PUNCT = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_PUNCT_ONLY = re.compile(r"""^["'`.,?!:;\-–—…]+$""")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\d+(?:[.,]\d+)+|\w+(?:[-&/]\w+)*|\S")


def tokenize_caption(text: str) -> str:
    """Java-free stand-in for coco-caption's PTBTokenizer (``-lowerCase``) + punctuation removal.

    Lower-cases, splits PTB-style clitics (``don't`` -> ``do n't``, ``dog's`` -> ``dog 's``),
    keeps hyphenated words and numbers (``3.5``, ``1,000``) whole, turns brackets into PTB's
    ``-lrb-``/``-rrb-`` (which coco-caption keeps) and drops the other punctuation tokens.
    Matches the Java tokenizer on ordinary captions (see tests); exotic input may differ.

    Args:
        text: A caption.

    Returns:
        Space-separated tokens.
    """
    text = text.replace("\n", " ").lower()
    text = re.sub(r"(\w)n't\b", r"\1 n't", text)
    text = re.sub(r"(\w)'(s|re|ve|ll|d|m)\b", r"\1 '\2", text)
    tokens = [_PTB_BRACKETS.get(t, t) for t in _TOKEN.findall(text)]
    return " ".join(t for t in tokens if t not in _COCO_PUNCT and not _PUNCT_ONLY.match(t))


def _check_caption_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]], name: str) -> None:
    if len(predictions) != len(references) or len(predictions) == 0:
        raise ValueError(
            f"{name}: {len(predictions)} predictions vs {len(references)} reference lists (need equal, > 0)"
        )
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"{name}: references[{i}] must be a non-empty list of strings, got {refs!r}")


def _prepare(predictions, references, tokenize: bool) -> tuple[list[str], list[list[str]]]:
    if not tokenize:
        return list(predictions), [list(r) for r in references]
    return [tokenize_caption(p) for p in predictions], [[tokenize_caption(r) for r in refs] for refs in references]


def _ngram_counts(words: Sequence[str], n: int) -> dict[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def bleu(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, max_n: int = 4, tokenize: bool = True
) -> dict[str, float]:
    """Corpus BLEU-1..max_n as coco-caption's ``Bleu`` computes it.

    Clipped n-gram matches and candidate n-grams are summed over the corpus; the reference
    length per sentence is the *closest* reference length (ties -> shorter); the brevity
    penalty uses the corpus sums; the coco smoothing constants (1e-15 on matches, 1e-9 on counts)
    are kept so the numbers are identical.

    Args:
        predictions: One candidate caption per item.
        references: For each item, its reference captions.
        max_n: Highest n-gram order.
        tokenize: Apply :func:`tokenize_caption` first; ``False`` = inputs are already tokenised
            (space-separated), the setting for bit-parity with pycocoevalcap.

    Returns:
        ``{"bleu_1": ..., ..., "bleu_<max_n>": ...}`` in [0, 1].
    """
    _check_caption_inputs(predictions, references, "bleu")
    preds, refs_all = _prepare(predictions, references, tokenize)
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * max_n, [0] * max_n
    test_len = ref_len = 0
    for pred, refs in zip(preds, refs_all):
        words = pred.split()
        max_ref_counts: dict[tuple[str, ...], int] = {}
        ref_lens = []
        for ref in refs:
            ref_words = ref.split()
            ref_lens.append(len(ref_words))
            for g, c in _ngram_counts(ref_words, max_n).items():
                max_ref_counts[g] = max(max_ref_counts.get(g, 0), c)
        test_len += len(words)
        ref_len += min((abs(length - len(words)), length) for length in ref_lens)[1]
        for g, c in _ngram_counts(words, max_n).items():
            correct[len(g) - 1] += min(max_ref_counts.get(g, 0), c)
        for k in range(max_n):
            guess[k] += max(0, len(words) - k)
    scores, product = {}, 1.0
    ratio = (test_len + tiny) / (ref_len + small)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    for k in range(max_n):
        product *= float(correct[k] + tiny) / (guess[k] + small)
        scores[f"bleu_{k + 1}"] = product ** (1.0 / (k + 1)) * brevity
    return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]], *, tokenize: bool = True) -> float:
    """ROUGE-L as coco-caption's ``Rouge``: mean over items of the LCS F-measure (beta = 1.2).

    Per item, precision and recall are each maximised *separately* over the references
    (``P = max_r LCS/|c|``, ``R = max_r LCS/|r|``), then ``F = (1+b^2) P R / (R + b^2 P)``.
    Tokens come from ``split(" ")`` as in the reference code.

    Args:
        predictions, references, tokenize: As for :func:`bleu`.

    Returns:
        Corpus ROUGE-L in [0, 1].
    """
    _check_caption_inputs(predictions, references, "rouge_l")
    preds, refs_all = _prepare(predictions, references, tokenize)
    beta2 = 1.2**2
    scores = []
    for pred, refs in zip(preds, refs_all):
        cand = pred.split(" ")
        prec, rec = [], []
        for ref in refs:
            ref_tokens = ref.split(" ")
            lcs = _lcs_length(ref_tokens, cand)
            prec.append(lcs / float(len(cand)))
            rec.append(lcs / float(len(ref_tokens)))
        p, r = max(prec), max(rec)
        scores.append((1 + beta2) * p * r / float(r + beta2 * p) if p != 0 and r != 0 else 0.0)
    return float(np.mean(np.array(scores)))


def cider_d(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    tokenize: bool = True,
    n: int = 4,
    sigma: float = 6.0,
) -> float:
    """CIDEr-D as coco-caption's ``Cider`` (which implements CIDEr-D).

    TF-IDF n-gram vectors (n = 1..4; document frequency over the *evaluated* items' reference
    sets, ``idf = log(N_items) - log(max(1, df))``), clipped similarity
    ``sum min(v_c, v_r) v_r / (|v_c||v_r|)``, a Gaussian length penalty
    ``exp(-(l_c - l_r)^2 / (2 sigma^2))`` with the lengths taken, as in the reference code, as
    the number of *bigrams*; averaged over n and references, times 10, then over items.

    Args:
        predictions, references, tokenize: As for :func:`bleu`.
        n: Highest n-gram order.
        sigma: Length-penalty width.

    Returns:
        Corpus CIDEr-D (0 .. ~10; typical captioning values 0.2 - 1.5).
    """
    _check_caption_inputs(predictions, references, "cider_d")
    preds, refs_all = _prepare(predictions, references, tokenize)
    test_counts = [_ngram_counts(p.split(), n) for p in preds]
    ref_counts = [[_ngram_counts(r.split(), n) for r in refs] for refs in refs_all]
    doc_freq: dict[tuple[str, ...], float] = defaultdict(float)
    for refs in ref_counts:
        for g in {g for ref in refs for g in ref}:
            doc_freq[g] += 1
    log_n_items = np.log(float(len(ref_counts)))

    def to_vec(counts):
        vec = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = float(tf) * (log_n_items - np.log(max(1.0, doc_freq.get(g, 0.0))))
            vec[k][g] = w
            norm[k] += pow(w, 2)
            if k == 1:  # the reference code measures length in bigrams
                length += tf
        return vec, [np.sqrt(x) for x in norm], length

    scores = []
    for test, refs in zip(test_counts, ref_counts):
        vec_c, norm_c, len_c = to_vec(test)
        total = np.zeros(n)
        for ref in refs:
            vec_r, norm_r, len_r = to_vec(ref)
            delta = float(len_c - len_r)
            val = np.zeros(n)
            for k in range(n):
                for g, w in vec_c[k].items():
                    w_r = vec_r[k].get(g, 0.0)
                    val[k] += min(w, w_r) * w_r
                if norm_c[k] != 0 and norm_r[k] != 0:
                    val[k] /= norm_c[k] * norm_r[k]
                val[k] *= np.e ** (-(delta**2) / (2 * sigma**2))
            total += val
        scores.append(np.mean(total) / len(refs) * 10.0)
    return float(np.mean(np.array(scores)))


def caption_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, tokenize: bool = True
) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D in one dict (keys ``bleu_1..4``, ``rouge_l``, ``cider_d``).

    Args:
        predictions, references, tokenize: As for :func:`bleu`.
    """
    _check_caption_inputs(predictions, references, "caption_metrics")
    preds, refs = _prepare(predictions, references, tokenize)
    out = bleu(preds, refs, tokenize=False)
    out["rouge_l"] = rouge_l(preds, refs, tokenize=False)
    out["cider_d"] = cider_d(preds, refs, tokenize=False)
    return out


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------


def _rank_metrics(scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int], map_k: int) -> dict[str, float]:
    """scores, relevant: (Q, I). Ties broken by item index (stable sort)."""
    order = np.argsort(-scores, axis=1, kind="stable")  # (Q, I)
    hits = np.take_along_axis(relevant, order, axis=1)  # (Q, I) bool, in rank order
    out = {f"R@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}
    top = hits[:, :map_k].astype(float)  # (Q, k)
    precision_at_hit = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1) * top
    n_relevant = relevant.sum(axis=1)  # (Q,)
    out[f"mAP@{map_k}"] = float((precision_at_hit.sum(axis=1) / n_relevant).mean())
    return out


def retrieval_metrics(
    sim: Any, gt: Any, *, ks: Sequence[int] = (1, 5, 10), map_k: int = 10
) -> dict[str, dict[str, float]]:
    """Audio<->text retrieval: R@k and mAP@k in both directions.

    Definitions (per query, then averaged over queries):
        - R@k = 1 if at least one relevant item is among the top k, else 0.
        - AP@k = (1 / R) * sum over relevant items at rank i <= k of precision@i, with R the
          number of relevant items of the query. text->audio has R = 1, so AP@10 = 1/rank
          (0 beyond 10): DCASE 2022 task 6B ``eval_script.py``. audio->text divides by the
          number of captions of the audio (Clotho 5, AudioCaps test 5), as Mei et al.; for
          R <= k this equals the usual ``1 / min(R, k)`` normalisation.
        - Ranking is by descending similarity; ties go to the lower item index.

    Args:
        sim: (n_audio, n_text) similarity matrix (numpy or torch). Rows are audio clips,
            columns are captions.
        gt: Either (n_text,) ints, the audio index of each caption, or an (n_audio, n_text)
            boolean relevance matrix.
        ks: Cut-offs for recall.
        map_k: Cut-off for mAP.

    Returns:
        ``{"audio_to_text": {"R@1", "R@5", "R@10", "mAP@10"}, "text_to_audio": {...}}``.
    """
    s = _to_numpy(sim).astype(np.float64)
    if s.ndim != 2:
        raise ValueError(f"retrieval_metrics: sim must be (n_audio, n_text), got shape {s.shape}")
    g = _to_numpy(gt)
    if g.ndim == 1:
        if g.shape[0] != s.shape[1] or g.min() < 0 or g.max() >= s.shape[0]:
            raise ValueError(
                f"retrieval_metrics: gt has {g.shape[0]} entries in [{g.min()}, {g.max()}], "
                f"need {s.shape[1]} audio indices in [0, {s.shape[0] - 1}]"
            )
        relevant = np.zeros(s.shape, dtype=bool)
        relevant[g.astype(int), np.arange(s.shape[1])] = True
    elif g.shape == s.shape:
        relevant = g.astype(bool)
    else:
        raise ValueError(f"retrieval_metrics: gt shape {g.shape} fits neither ({s.shape[1]},) nor {s.shape}")
    if not relevant.any(axis=1).all() or not relevant.any(axis=0).all():
        raise ValueError("retrieval_metrics: every audio and every caption needs at least one relevant item")
    return {
        "audio_to_text": _rank_metrics(s, relevant, ks, map_k),
        "text_to_audio": _rank_metrics(s.T, relevant.T, ks, map_k),
    }


# ---------------------------------------------------------------------------------------------
# Retention diagnostics
# ---------------------------------------------------------------------------------------------


def _as_float_tensor(x: Any) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device="cpu", dtype=torch.float64)


def feature_cosine_similarity(a: Any, b: Any, mask: Any = None) -> float:
    """Mean cosine similarity between two feature sets, e.g. original vs SAFE hidden states.

    Args:
        a: (..., D) features (numpy or torch), e.g. (B, T, D).
        b: Same shape as ``a``.
        mask: Optional (...) with the leading shape of ``a`` (e.g. (B, T) attention mask);
            non-zero = include the position.

    Returns:
        Mean over the included positions of ``cos(a[i], b[i])`` along the last dim.
    """
    ta, tb = _as_float_tensor(a), _as_float_tensor(b)
    if ta.shape != tb.shape or ta.ndim == 0:
        raise ValueError(f"feature_cosine_similarity: shapes {tuple(ta.shape)} and {tuple(tb.shape)} differ")
    cos = torch.nn.functional.cosine_similarity(ta, tb, dim=-1, eps=1e-12)  # (...)
    if mask is None:
        return float(cos.mean())
    m = _as_float_tensor(mask)
    if m.shape != cos.shape:
        raise ValueError(f"feature_cosine_similarity: mask {tuple(m.shape)} must be {tuple(cos.shape)}")
    m = (m != 0).to(cos.dtype)
    if m.sum() == 0:
        raise ValueError("feature_cosine_similarity: mask selects no position")
    return float((cos * m).sum() / m.sum())


def attention_correlation(attn_a: Any, attn_b: Any, mask: Any = None) -> float:
    """Mean Pearson correlation between matching attention maps.

    Each (Q, K) map (per sample and head: the last two dims) is flattened and correlated with
    its counterpart; the correlations are averaged. Maps where either side is constant over the
    included entries have no correlation and are left out.

    Args:
        attn_a: (..., Q, K) attention probabilities, e.g. (B, H, Q, K); or a list/tuple of such
            tensors (one per layer), all maps of all layers averaged together.
        attn_b: Same shape(s) as ``attn_a``.
        mask: Optional, broadcastable to (..., Q, K); non-zero = include the entry (e.g. drop
            padding keys with ``key_mask[:, None, None, :]``).

    Returns:
        Mean correlation in [-1, 1], ``nan`` if no map had variance.
    """
    if isinstance(attn_a, (list, tuple)):
        if not isinstance(attn_b, (list, tuple)) or len(attn_a) != len(attn_b):
            raise ValueError("attention_correlation: attn_a and attn_b must be lists of equal length")
        rs = [_map_correlations(a, b, mask) for a, b in zip(attn_a, attn_b)]
        r = torch.cat(rs) if rs else torch.empty(0)
    else:
        r = _map_correlations(attn_a, attn_b, mask)
    r = r[~torch.isnan(r)]
    return float(r.mean()) if r.numel() else float("nan")


def _map_correlations(attn_a: Any, attn_b: Any, mask: Any) -> torch.Tensor:
    ta, tb = _as_float_tensor(attn_a), _as_float_tensor(attn_b)
    if ta.shape != tb.shape or ta.ndim < 2:
        raise ValueError(f"attention_correlation: shapes {tuple(ta.shape)} and {tuple(tb.shape)} must match, >= 2-D")
    m = torch.ones_like(ta) if mask is None else torch.broadcast_to((_as_float_tensor(mask) != 0).double(), ta.shape)
    flat = ta.shape[:-2].numel() if ta.ndim > 2 else 1
    xa, xb, w = (t.reshape(flat, -1) for t in (ta, tb, m))  # (maps, Q*K)
    n = w.sum(dim=1)  # (maps,)
    mean_a = (xa * w).sum(1) / n.clamp(min=1)
    mean_b = (xb * w).sum(1) / n.clamp(min=1)
    da, db = (xa - mean_a[:, None]) * w, (xb - mean_b[:, None]) * w
    cov = (da * db).sum(1)
    var_a, var_b = (da * da).sum(1), (db * db).sum(1)
    degenerate = (var_a <= 1e-30) | (var_b <= 1e-30) | (n < 2)
    r = cov / torch.sqrt(var_a * var_b).clamp(min=1e-300)
    return torch.where(degenerate, torch.full_like(r, float("nan")), r)
