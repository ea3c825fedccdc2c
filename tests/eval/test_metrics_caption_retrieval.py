"""Captioning (BLEU / ROUGE-L / CIDEr-D), retrieval and retention diagnostics.

Captioning parity: against pycocoevalcap 1.2 (coco-caption) on the same tokens, tolerance
1e-12 absolute (in practice bit-identical); skipped when pycocoevalcap is not installed. The
hand-computed cases below run always.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from safe_av.eval.metrics import (
    attention_correlation,
    bleu,
    caption_metrics,
    cider_d,
    feature_cosine_similarity,
    retrieval_metrics,
    rouge_l,
    tokenize_caption,
)

PREDICTIONS = [
    "A dog barks while a car passes by.",
    "Rain falls on a tin roof.",
    "A man is speaking and birds are chirping.",
    "Water is running from a tap",
    "Someone's typing on a keyboard.",
    "An engine idles (loudly) and then revs.",
    "Birds",
    "Thunder rumbles in the distance, and it's raining heavily!",
]
REFERENCES = [
    ["A dog is barking as cars drive past.", "A dog barks loudly and a car goes by.", "Dog barking, traffic."],
    ["Heavy rain is falling onto a metal roof.", "Rain drops hit a tin roof steadily."],
    [
        "A man talks while birds chirp in the background.",
        "Birds are chirping and a man speaks.",
        "A person is speaking outdoors with birds singing.",
        "Man speaking, birds tweeting.",
        "A man speaks.",
    ],
    ["Water runs out of a faucet into a sink."],
    ["A person types quickly on a computer keyboard.", "Keys clack as someone is typing."],
    ["An engine is idling and then revving up.", "A car engine idles then revs loudly.", "Motor revving."],
    ["Birds chirp.", "Many birds are singing in a forest."],
    [
        "Thunder rumbles while heavy rain falls.",
        "It is raining and thunder roars far away.",
        "Distant thunder and rain.",
    ],
]


def _coco_scores(preds: list[str], refs: list[list[str]]):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [p] for i, p in enumerate(preds)}
    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    r, _ = Rouge().compute_score(gts, res)
    c, _ = Cider().compute_score(gts, res)
    return b, float(r), float(c)


def test_caption_metrics_equal_pycocoevalcap_on_same_tokens():
    preds = [tokenize_caption(p) for p in PREDICTIONS]
    refs = [[tokenize_caption(r) for r in rs] for rs in REFERENCES]
    b, r, c = _coco_scores(preds, refs)
    ours = caption_metrics(PREDICTIONS, REFERENCES)  # tokenises itself -> the same tokens
    assert [ours[f"bleu_{k}"] for k in range(1, 5)] == pytest.approx(b, abs=1e-12, rel=0)
    assert ours["rouge_l"] == pytest.approx(r, abs=1e-12, rel=0)
    assert ours["cider_d"] == pytest.approx(c, abs=1e-12, rel=0)


def test_caption_metrics_equal_pycocoevalcap_on_random_corpus():
    rng = np.random.default_rng(0)
    vocab = "a dog barks loudly while the car engine runs birds chirp in background man speaks water".split()
    sent = lambda lo, hi: " ".join(rng.choice(vocab, size=rng.integers(lo, hi)))  # noqa: E731
    preds = [sent(1, 12) for _ in range(60)]
    refs = [[sent(2, 14) for _ in range(rng.integers(1, 6))] for _ in range(60)]
    b, r, c = _coco_scores(preds, refs)
    ours = caption_metrics(preds, refs, tokenize=False)
    assert [ours[f"bleu_{k}"] for k in range(1, 5)] == pytest.approx(b, abs=1e-12, rel=0)
    assert ours["rouge_l"] == pytest.approx(r, abs=1e-12, rel=0)
    assert ours["cider_d"] == pytest.approx(c, abs=1e-12, rel=0)


def test_bleu_by_hand_with_coco_smoothing():
    # candidate 3 words, reference 6: p1 = p2 = p3 = 1 (up to the 1e-15/1e-9 constants);
    # 4-grams: 0 matches of 0 -> (0 + 1e-15) / (0 + 1e-9) = 1e-6; brevity penalty exp(1 - 6/3).
    out = bleu(["the cat sat"], [["the cat sat on the mat"]], tokenize=False)
    bp = math.exp(1 - 6 / 3)
    assert out["bleu_1"] == pytest.approx(bp, rel=1e-8)
    assert out["bleu_3"] == pytest.approx(bp, rel=1e-8)
    assert out["bleu_4"] == pytest.approx(1e-6**0.25 * bp, rel=1e-6)


def test_bleu_closest_ref_len_and_pooled_ref_counts():
    out = bleu(["a b c d"], [["a b c", "a b c d e"]], tokenize=False)
    # all 4 unigrams occur in some reference; ref length: |4-3| = |4-5| -> tie -> shorter (3) -> ratio > 1
    assert out["bleu_1"] == pytest.approx(1.0, rel=1e-8)


def test_rouge_l_by_hand():
    # LCS("a b c d", "a c d e f") = "a c d" = 3; P = 3/4, R = 3/5;
    # F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * 0.45 / (0.6 + 1.08) = 1.098 / 1.68
    assert rouge_l(["a b c d"], [["a c d e f"]], tokenize=False) == pytest.approx(1.098 / 1.68, abs=1e-12)


def test_cider_d_perfect_caption_on_disjoint_corpus_is_ten():
    # Every n-gram occurs in one of the two items only: idf = log 2 > 0, cosine 1 for n = 1..4
    # (both captions have 4-grams), no length gap -> 10 * mean(1, 1, 1, 1) = 10.
    preds = ["a dog barks loudly", "rain falls on the roof"]
    assert cider_d(preds, [[p] for p in preds], tokenize=False) == pytest.approx(10.0, abs=1e-12)


def test_tokenize_caption():
    assert tokenize_caption("A dog's barking, isn't it?") == "a dog 's barking is n't it"
    assert tokenize_caption("An engine (loudly) revs... 3.5 times; 1,000 birds!") == (
        "an engine -lrb- loudly -rrb- revs 3.5 times 1,000 birds"
    )
    assert tokenize_caption("A high-pitched whistle") == "a high-pitched whistle"


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java for the Stanford PTB tokenizer")
def test_tokenizer_matches_coco_ptb_tokenizer():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = PREDICTIONS + [r for rs in REFERENCES for r in rs]
    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert [tokenize_caption(c) for c in captions] == [ptb[i][0] for i in range(len(captions))]


def test_caption_input_errors():
    with pytest.raises(ValueError, match="predictions"):
        bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="references\\[0\\]"):
        rouge_l(["a"], ["a"])


# ------------------------------------------------------------------------------------ retrieval

# 3 audio clips (rows) x 6 captions (columns); captions 2i and 2i+1 describe audio i.
SIM = np.array(
    [
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],
        [0.5, 0.4, 0.3, 0.2, 0.9, 0.1],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    ]
)
GT = [0, 0, 1, 1, 2, 2]


def test_retrieval_metrics_hand_computed():
    out = retrieval_metrics(SIM, GT, ks=(1, 2, 5, 10))
    a2t, t2a = out["audio_to_text"], out["text_to_audio"]
    # audio->text ranks of the relevant captions: a0 -> {1, 5}, a1 -> {4, 5}, a2 -> {1, 2}
    assert a2t["R@1"] == pytest.approx(2 / 3) and a2t["R@2"] == pytest.approx(2 / 3)
    assert a2t["R@5"] == 1.0 and a2t["R@10"] == 1.0
    # AP = (sum of precision at each hit) / 2 relevant:
    # a0 (1/1 + 2/5)/2 = 0.7; a1 (1/4 + 2/5)/2 = 0.325; a2 (1/1 + 2/2)/2 = 1 -> mean 2.025/3 = 0.675
    assert a2t["mAP@10"] == pytest.approx(0.675, abs=1e-12)
    # text->audio rank of the one relevant audio per caption (ties -> lower audio index):
    # c0: 1; c1: [.1,.4,.2] -> 3; c2: [.8,.3,.3] -> a1 ties a2, a1 first -> 2;
    # c3: [.2,.2,.4] -> a0 ties a1, a0 first -> a1 at 3; c4: [.3,.9,.5] -> 2; c5: 1
    assert t2a["R@1"] == pytest.approx(2 / 6) and t2a["R@2"] == pytest.approx(4 / 6)
    assert t2a["R@5"] == 1.0
    # mAP@10 = mean(1/rank) = (1 + 1/3 + 1/2 + 1/3 + 1/2 + 1)/6 = 11/18
    assert t2a["mAP@10"] == pytest.approx(11 / 18, abs=1e-12)
    # the same with a boolean relevance matrix and with torch input
    rel = np.zeros((3, 6), dtype=bool)
    rel[GT, np.arange(6)] = True
    assert retrieval_metrics(torch.tensor(SIM), rel, ks=(1, 2, 5, 10)) == out


def test_text_to_audio_matches_dcase_2022_formula():
    """Independent check against the DCASE 2022 task 6B eval_script loop on a random matrix."""
    rng = np.random.default_rng(1)
    n_audio, per = 30, 5
    gt = np.repeat(np.arange(n_audio), per)
    sim = rng.normal(size=(n_audio, n_audio * per)) + 2.0 * (np.arange(n_audio)[:, None] == gt[None, :])
    r1, r5, r10, ap = [], [], [], []
    for j in range(sim.shape[1]):
        ranked = np.argsort(-sim[:, j], kind="stable")[:10]
        preds = ranked == gt[j]
        r1.append(preds[:1].sum()), r5.append(preds[:5].sum()), r10.append(preds[:10].sum())
        positions = np.arange(1, 11, dtype=float)[preds]
        ap.append(np.sum(np.arange(1, len(positions) + 1) / positions) if len(positions) else 0.0)
    out = retrieval_metrics(sim, gt)["text_to_audio"]
    assert out == pytest.approx({"R@1": np.mean(r1), "R@5": np.mean(r5), "R@10": np.mean(r10), "mAP@10": np.mean(ap)})


def test_rank_beyond_cutoff_scores_zero():
    sim = np.eye(12)
    sim[0, 0] = -1.0  # caption 0's audio falls to the last place (rank 12)
    t2a = retrieval_metrics(sim, np.arange(12))["text_to_audio"]
    assert t2a["R@10"] == pytest.approx(11 / 12) and t2a["mAP@10"] == pytest.approx(11 / 12)


def test_retrieval_input_errors():
    with pytest.raises(ValueError, match="gt has 5 entries"):
        retrieval_metrics(SIM, [0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="at least one relevant"):
        retrieval_metrics(SIM, [0, 0, 1, 1, 1, 1])


# ---------------------------------------------------------------------------------- retention


def test_feature_cosine_similarity():
    a = np.array([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, T=2, D=2)
    b = np.array([[[2.0, 0.0], [1.0, 0.0]]])
    assert feature_cosine_similarity(a, b) == pytest.approx(0.5)  # cos = 1 and 0
    assert feature_cosine_similarity(torch.tensor(a), torch.tensor(b), mask=torch.tensor([[1, 0]])) == pytest.approx(
        1.0
    )
    assert feature_cosine_similarity(a, -a) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="differ"):
        feature_cosine_similarity(a, b[..., :1])
    with pytest.raises(ValueError, match="no position"):
        feature_cosine_similarity(a, b, mask=np.zeros((1, 2)))


def test_attention_correlation():
    m1 = np.array([[0.5, 0.5], [1.0, 0.0]])
    m2 = np.array([[0.5, 0.5], [0.0, 1.0]])  # deviations are exact negatives of m1's -> r = -1
    a = np.stack([m1, m1])[None]  # (B=1, H=2, Q=2, K=2)
    b = np.stack([2 * m1 + 1, m2])[None]  # head 0: affine copy -> r = 1; head 1: r = -1
    assert attention_correlation(a, b) == pytest.approx(0.0, abs=1e-12)
    assert attention_correlation(torch.tensor(a), torch.tensor(a)) == pytest.approx(1.0)
    assert attention_correlation([a, a], [b, a]) == pytest.approx(0.5)  # (1 - 1 + 1 + 1) / 4
    # masking the second query row leaves constant maps (no correlation) -> nan
    mask = np.array([[1, 1], [0, 0]])
    assert math.isnan(attention_correlation(a, b, mask=mask))
    # masking key 0 keeps 2 entries per map, still perfectly (anti)correlated
    assert attention_correlation(a, b, mask=np.array([0, 1])) == pytest.approx(0.0, abs=1e-12)
