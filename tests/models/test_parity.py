"""DESIGN invariant 1: no audio => the base model, exactly (logits vs transformers' own forward)."""

import pytest
import torch

from safe_av.data.text import SAFEProcessor
from safe_av.models.safe_model import SAFEModel
from tests.conftest import random_image, random_wave

FAMILIES = ["tiny-blip2-opt", "tiny-blip2-t5", "tiny-llava"]


def _safe(tiny_models, base, audio="tiny-clap", **kw):
    cfg, vl, enc = tiny_models(base, audio)
    torch.manual_seed(0)
    kw.setdefault("fusion_trainable", kw.get("fusion", True))
    return SAFEModel(vl, enc, num_audio_tokens=cfg.num_audio_tokens, projector_hidden=64, **kw).eval()


def _plain_logits(model: SAFEModel, proc: SAFEProcessor, question: str, answer: str, image):
    """The transformers model's own forward on the same image + text."""
    enc = proc.encode(question, answer, has_image=True, has_audio=False)
    pixel_values = proc.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    input_ids = torch.tensor([enc.input_ids])
    kwargs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    if model.base.is_encoder_decoder:
        kwargs["labels"] = torch.tensor([enc.labels])
    with torch.no_grad():
        return model.base.model(**kwargs).logits[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_no_audio_matches_plain_model_single_and_mixed_batch(tiny_models, rng, family):
    model = _safe(tiny_models, family)
    proc = SAFEProcessor.from_model(model)
    img_a, img_b = random_image(rng), random_image(rng, (30, 30))
    wave = random_wave(rng, proc.sampling_rate, 2.0)
    q, a = "what color is the left instrument", "red"
    expected = _plain_logits(model, proc, q, a, img_b)

    # one sample
    single = proc.collate([dict(question=q, answer=a, image=img_b)])
    with torch.no_grad():
        got = model(**single).logits[0]
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5

    # inside a padded batch mixing audio and audio-less samples (the audio-less one is row 1)
    batch = proc.collate([
        dict(question="how many sounds are there in the whole clip", answer="three", image=img_a,
             waveform=wave, num_valid=len(wave)),
        dict(question=q, answer=a, image=img_b),
        dict(question="", answer="a dog barks", waveform=wave, num_valid=len(wave) // 2),
    ])
    assert batch["has_audio"].tolist() == [True, False, True]
    with torch.no_grad():
        logits = model(**batch).logits[1]
    mask = batch["attention_mask"][1].bool()
    if model.base.is_encoder_decoder:  # decoder positions: right-padded targets
        n = expected.shape[0]
        got = logits[:n]
    else:
        got = logits[mask]
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_closed_gates_leave_outputs_unchanged(tiny_models, rng, family):
    """DESIGN invariant 2: adding the fusion layer (gates at 0) changes nothing."""
    with_fusion = _safe(tiny_models, family, fusion=True)
    without = _safe(tiny_models, family, fusion=False)
    without.projector.load_state_dict(with_fusion.projector.state_dict())
    proc = SAFEProcessor.from_model(with_fusion)
    wave = random_wave(rng, proc.sampling_rate, 1.5)
    batch = proc.collate([dict(question="which instrument sounds", answer="violin", image=random_image(rng),
                               waveform=wave, num_valid=len(wave))])
    with torch.no_grad():
        a, b = with_fusion(**batch).logits, without(**batch).logits
    assert torch.equal(a, b)
    with torch.no_grad():  # and the gates really are what keeps them equal
        with_fusion.fusion.attn_gate.fill_(0.5)
        c = with_fusion(**batch).logits
    assert (c - b).abs().max() > 1e-4


@pytest.mark.parametrize("position", ["after_image", "before_answer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_is_the_model_without_audio(tiny_models, rng, family, position):
    """The teacher's logits for an audio sample equal the same sample encoded without audio."""
    model = _safe(tiny_models, family, audio_position=position)
    proc = SAFEProcessor.from_model(model)
    img = random_image(rng)
    wave = random_wave(rng, proc.sampling_rate, 1.0)
    q, a = "is the violin on the left", "yes"
    with_audio = proc.collate([dict(question=q, answer=a, image=img, waveform=wave, num_valid=len(wave)),
                               dict(question="what is it", answer="a drum", image=img)])
    without = proc.collate([dict(question=q, answer=a, image=img)])
    teacher = model.teacher_forward(with_audio)
    with torch.no_grad():
        ref = model(**without)
        student = model(**with_audio)
    # reusing the student's visual tokens (no second vision pass) gives the same teacher
    reused = model.teacher_forward(with_audio, visual_tokens=student.visual_tokens)
    assert model.vision_path_original() and torch.equal(reused.token_logits, teacher.token_logits)
    sel = teacher.token_labels[0] != -100
    ref_sel = ref.token_labels[0] != -100
    assert torch.equal(teacher.token_labels[0][sel], ref.token_labels[0][ref_sel])
    assert (teacher.token_logits[0][sel] - ref.token_logits[0][ref_sel]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_audio_position_places_the_placeholders(tiny_models, family):
    """``before_answer``: the audio placeholders follow the prompt, the answer follows them (labels only on it)."""
    model = _safe(tiny_models, family, audio_position="before_answer")
    proc = SAFEProcessor.from_model(model)
    assert proc.audio_position == "before_answer"
    k = model.num_audio_tokens
    late = proc.encode("is the violin playing", "yes", has_image=True, has_audio=True)
    proc.audio_position = "after_image"
    early = proc.encode("is the violin playing", "yes", has_image=True, has_audio=True)
    ids = late.input_ids
    audio = [i for i, t in enumerate(ids) if t == model.audio_token_id]
    assert len(audio) == k and audio == list(range(audio[0], audio[0] + k))
    assert sorted(ids) == sorted(early.input_ids) and ids != early.input_ids  # same tokens, other order
    image = [i for i, t in enumerate(ids) if t == model.base.image_token_id]
    assert max(image) < audio[0]
    if model.base.is_encoder_decoder:
        assert audio[-1] == len(ids) - 2 and ids[-1] == proc.tokenizer.eos_token_id  # then the encoder's eos
    else:
        answer = [i for i, lab in enumerate(late.labels) if lab != -100]
        assert answer[0] == audio[-1] + 1  # the answer right after the audio tokens
