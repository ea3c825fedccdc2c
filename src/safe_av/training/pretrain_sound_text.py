"""Give a *tiny* base's language model what a real LLM brings to SAFE: reasoning over sounds told in words.

SAFE adds hearing to a frozen VL model by turning audio into a few soft tokens its language model reads. A
real LLM (OPT, FlanT5, Vicuna) arrives able to answer "Is the violin louder than the piano?" when the
context *says* how loud each one is: text pretraining gave it the words and the in-context reasoning, and
the audio tokens only have to convey what was heard. The tiny base's language model has read nothing but
the synthetic VQA questions: it has no notion of "loud", "first" or "sounding", and - measured, see
``docs/results/demo_audio_diagnosis.md`` section 5 - it cannot learn to bind a question word to the audio
tokens within the demo's budget, however the adapter is trained.

So, like its vision tower (``pretrain_vision``), the tiny base gets what a real model would already have,
and nothing more: while it learns VQA it also answers the corpus's Audio and Audio-Visual questions about
*fresh* scenes (drawn with a seed of their own, not SAFE's clips) whose sound is **described in words** where SAFE
will later put the audio tokens - ``[image] violin loud two piano quiet one . . . [bos] Question: .. Answer:``
(the sounding instruments in order of entry, each with its loudness and number of notes, padded with "."
to ``model.num_audio_tokens`` words). The base never hears anything. SAFE's adapter must then learn to put
what the description would have said into the audio tokens; with the audio removed or another clip's
given, those questions fall back to chance (the demo's ``audio_masked_*`` / ``audio_shuffled_*`` metrics).

Held-out accuracy of the base on described questions, per template, goes to its ``pretrain.json``.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from safe_av.data.formats.musicavqa import fill_template
from safe_av.data.synth_scenes import INSTRUMENTS, LEVEL_WORDS, NUMBERS, Scene, draw_scene, make_scene, scene_questions
from safe_av.data.text import SAFEProcessor

PAD_WORD = "."


def describe_sound(scene: Scene, n_words: int) -> str:
    """The scene's sound in exactly ``n_words`` words: ``<instrument> <loudness> <notes>`` per sounding
    instrument in order of entry, cut at ``n_words`` or padded with ``"."``."""
    words = [w for name in scene.by_onset
             for w in (name, LEVEL_WORDS[scene.voices[name].gain], NUMBERS[len(scene.voices[name].starts)])]
    return " ".join((words + [PAD_WORD] * n_words)[:n_words])


def vocabulary() -> list[str]:
    """Every word a description can use (for the tiny tokenizer)."""
    return [" ".join([*INSTRUMENTS, *LEVEL_WORDS.values(), *NUMBERS, PAD_WORD])]


def described_rows(n_scenes: int, seed: int, n_words: int) -> list[dict]:
    """Audio and Audio-Visual questions about ``n_scenes`` fresh scenes, each with its frame (PIL) and its
    sound's description; Visual questions are left to the VQA data."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_scenes):
        scene = make_scene(rng)
        image = Image.open(io.BytesIO(draw_scene(scene, rng))).convert("RGB")
        description = describe_sound(scene, n_words)
        for scenario, _, template, values, answer in scene_questions(scene, rng):
            if scenario != "Visual":
                rows.append({"question": fill_template(template, values), "answer": answer, "image": image,
                             "description": description, "template": template})
    return rows


def described_collate(proc: SAFEProcessor) -> Callable[[list[dict]], dict]:
    """Collate described rows with ``proc`` (whose ``num_audio_tokens`` equals the descriptions' length):
    each row's description ids replace its audio placeholders, so the words sit exactly where SAFE's audio
    tokens will; the batch carries no audio."""
    tok = proc.tokenizer

    def collate(rows: list[dict]) -> dict:
        batch = proc.collate([{"question": r["question"], "answer": r["answer"], "image": r["image"],
                               "audio_features": torch.zeros(1, 1)} for r in rows])
        ids = batch["input_ids"]
        for i, row in enumerate(rows):
            words = tok(row["description"], add_special_tokens=False)["input_ids"]
            slots = ids[i] == proc.audio_token_id
            if len(words) != int(slots.sum()):
                raise ValueError(f"description {row['description']!r}: {len(words)} tokens for "
                                 f"{int(slots.sum())} audio positions (a word outside the tokenizer?)")
            ids[i, slots] = torch.tensor(words, dtype=ids.dtype)
        batch["has_audio"] = torch.zeros(len(rows), dtype=torch.bool)
        batch["audio_features"] = None
        return batch

    return collate


def interleave(vqa: Iterator[dict], described: Iterator[dict], share: float) -> Iterator[dict]:
    """Each VQA batch followed by described batches, spread evenly: ``floor(n * share)`` of them after the
    first ``n`` VQA batches (share 1: alternate; 0.5: after every second one; 2: two after each)."""
    for i, batch in enumerate(vqa):
        yield batch
        for _ in range(math.floor((i + 1) * share) - math.floor(i * share)):
            yield next(described)


def interleaved_steps(vqa_steps: int, share: float) -> int:
    """How many batches :func:`interleave` yields for ``vqa_steps`` VQA batches."""
    return vqa_steps + math.floor(vqa_steps * share)


def batches(rows: list[dict], collate: Callable, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless seeded epochs of collated batches (the last partial batch of each epoch dropped)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(rows))
        for i in range(len(rows) // batch_size):
            yield collate([rows[j] for j in order[i * batch_size:(i + 1) * batch_size]])


@torch.no_grad()
def held_out_accuracy(answer_logits: Callable[[dict, torch.Tensor], torch.Tensor], rows: list[dict],
                      collate: Callable, batch_size: int = 64) -> dict:
    """First-answer-token accuracy per template and overall; ``answer_logits(batch, first)`` gives the (B, V)
    logits predicting each row's first answer token, ``labels[b, first[b]]``."""
    by_template = defaultdict(list)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = collate(chunk)
        labels = batch["labels"]
        first = (labels != -100).float().argmax(1)
        target = labels[torch.arange(len(chunk)), first]
        pred = answer_logits(batch, first).argmax(-1).cpu()
        for row, p, y in zip(chunk, pred.tolist(), target.tolist(), strict=True):
            by_template[row["template"]].append(p == y)
    overall = float(np.mean([v for hits in by_template.values() for v in hits]))
    return {"overall": round(overall, 4),
            "by_template": {t: round(float(np.mean(h)), 4) for t, h in sorted(by_template.items())},
            "questions": len(rows)}
