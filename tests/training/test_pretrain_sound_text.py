"""The tiny base's sound-description pretraining: descriptions, rows, placement, interleaving, cache key."""

import json

import pytest
import torch

from safe_av.data.synth_scenes import INSTRUMENTS, NUMBERS, QUESTION_MAKERS, Scene, Voice
from safe_av.data.text import SAFEProcessor
from safe_av.models.base_vl import BaseVL
from safe_av.models.presets import AUDIO_TOKEN, build_tiny_base
from safe_av.training import pretrain as pt
from safe_av.training import pretrain_sound_text as st


def _scene() -> Scene:
    voices = {"piano": Voice(onset=0.5, starts=[0.5], gain=0.25),
              "violin": Voice(onset=0.1, starts=[0.1, 0.6], gain=1.0)}
    return Scene(duration=3.0, position={"violin": "left", "piano": "right", "drum": "middle"}, voices=voices)


def test_description_by_hand():
    assert st.describe_sound(_scene(), 9) == "violin loud two piano quiet one . . ."  # order of entry
    assert st.describe_sound(_scene(), 4) == "violin loud two piano"  # cut at the audio tokens' number


def test_rows_ask_audio_questions_their_description_answers():
    rows = st.described_rows(12, seed=3, n_words=9)
    visual = {"Is there a <Object> in the entire video?", "How many instruments are in the video?",
              "Where is the <Object>?", "What kind of instrument is the <LRer> instrument?"}
    assert rows and not {r["template"] for r in rows} & visual
    heard = [r for r in rows if r["template"] == "How many musical instruments are heard throughout the video?"]
    assert heard
    for r in heard:  # the answer is the number of instruments the description names
        assert NUMBERS.index(r["answer"]) == sum(w in INSTRUMENTS for w in r["description"].split())
    playing = [r for r in rows if r["template"] == "Is the <Object> in the video playing?"]
    for r in playing:
        name = next(w for w in r["question"].split() if w in INSTRUMENTS)
        assert (r["answer"] == "yes") == (name in r["description"].split())
    assert len({r["template"] for r in rows}) > 8 and len(QUESTION_MAKERS) == 9


@pytest.mark.parametrize("name", ["tiny-blip2-opt", "tiny-llava", "tiny-blip2-t5"])
@pytest.mark.parametrize("position", ["after_image", "before_answer"])
def test_description_sits_where_the_audio_tokens_go(name, position):
    rows = st.described_rows(2, seed=0, n_words=5)
    model, processor = build_tiny_base(name, [r["question"] + " " + r["answer"] for r in rows] + st.vocabulary())
    base = BaseVL(model, processor)
    proc = SAFEProcessor(tokenizer=base.tokenizer, image_processor=base.image_processor,
                         image_token_id=base.image_token_id, num_image_tokens=base.num_image_tokens,
                         audio_token_id=base.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN), num_audio_tokens=5,
                         family=base.family, is_encoder_decoder=base.is_encoder_decoder, audio_position=position)
    batch = st.described_collate(proc)(rows[:3])
    with_audio = proc.collate([{"question": r["question"], "answer": r["answer"], "image": r["image"],
                                "audio_features": torch.zeros(5, 4)} for r in rows[:3]])
    slots = with_audio["input_ids"] == proc.audio_token_id
    assert int(slots.sum()) == 15
    assert torch.equal(batch["input_ids"][~slots], with_audio["input_ids"][~slots])  # all else unchanged
    assert torch.equal(batch["labels"], with_audio["labels"])
    for i, r in enumerate(rows[:3]):
        assert base.tokenizer.decode(batch["input_ids"][i][slots[i]]) == r["description"]
    assert not batch["has_audio"].any() and batch["audio_features"] is None
    loss = model(pixel_values=batch["images"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"]).loss
    assert torch.isfinite(loss)


def test_interleave_spreads_the_share_evenly():
    def run(share):
        out = list(st.interleave(iter(range(200)), iter(range(1000, 2000)), share))
        assert len(out) == st.interleaved_steps(200, share)
        return out

    assert run(1.0) == [x for i in range(200) for x in (i, 1000 + i)]
    assert run(0.5)[:6] == [0, 1, 1000, 2, 3, 1001] and sum(x >= 1000 for x in run(0.5)) == 100
    assert run(2.0)[:6] == [0, 1000, 1001, 1, 1002, 1003]
    assert sum(x >= 1000 for x in run(0.3)) == 60


def test_base_pretraining_with_sound_text(small_pretrain):
    cfg, train, vocab = small_pretrain
    pre = cfg.train.pretrain
    plain = pt.pretrained_base_folder(cfg, train, vocab)
    pre.sound_text.scenes = 7
    cfg.model.num_audio_tokens = 5
    assert pt.pretrained_base_folder(cfg, train, vocab) == plain  # off: its fields are not in the key
    pre.sound_text.enabled, pre.sound_text.scenes, pre.sound_text.held_out_scenes = True, 4, 2
    on = pt.pretrained_base_folder(cfg, train, vocab)
    cfg.model.audio_position = "before_answer"
    assert len({plain, on, pt.pretrained_base_folder(cfg, train, vocab)}) == 3  # on: recipe and layout are
    cfg.model.audio_position = "after_image"

    folder = pt.pretrain_tiny_base(cfg, train, vocab)
    report = json.loads((folder / "pretrain.json").read_text())
    assert report["steps"] >= 2 and report["steps"] % 2 == 0  # share 1: a described batch after each VQA one
    sound = report["sound_text"]  # 7 (scenario, type) pairs with audio, some asked twice
    assert sound["scenes"] == 4 and sound["questions"] >= 4 * 7 and sound["held_out_questions"] >= 2 * 7
    assert 0.0 <= sound["overall"] <= 1.0 and len(sound["by_template"]) > 5
