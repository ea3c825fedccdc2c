"""Trainability, gradients, save/load and path loading of SAFEModel."""

import json

import numpy as np

import pytest
import torch

from safe_av.data.text import SAFEProcessor
from safe_av.models.audio_encoders import masked_pool
from safe_av.models.base_vl import BaseVL
from safe_av.models.presets import load_audio_encoder, load_base
from safe_av.models.safe_model import SAFEModel
from tests.conftest import random_image, random_wave


def _batch(model, rng):
    proc = SAFEProcessor.from_model(model)
    wave = random_wave(rng, proc.sampling_rate, 1.0)
    return proc.collate([
        dict(question="which instrument sounds", answer="violin", image=random_image(rng), waveform=wave,
             num_valid=len(wave)),
        dict(question="what color", answer="red", image=random_image(rng)),
        dict(question="", answer="a drum", waveform=wave, num_valid=len(wave)),
    ])


@pytest.mark.parametrize("family", ["tiny-blip2-opt", "tiny-blip2-t5", "tiny-llava"])
def test_gradients_reach_projector_and_fusion_and_no_frozen_parameter(tiny_models, rng, family):
    cfg, vl, enc = tiny_models(family)
    torch.manual_seed(0)
    model = SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64, projector_trainable=True,
                      fusion_trainable=True).train()
    with torch.no_grad():  # open the gates so every fusion weight is on the gradient path
        model.fusion.attn_gate.fill_(0.5)
        model.fusion.ffn_gate.fill_(0.5)
    model(**_batch(model, rng)).loss.backward()
    trainable = model.trainable_parameters()
    assert trainable and all(n.startswith(("projector.", "fusion.")) for n in trainable)
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"frozen parameter {name} received a gradient"


def test_closed_gates_still_get_gradient(tiny_models, rng):
    cfg, vl, enc = tiny_models("tiny-blip2-opt")
    model = SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64).train()
    model(**_batch(model, rng)).loss.backward()
    assert model.fusion.attn_gate.grad.abs().item() > 0  # so the gates can open


def test_unfreeze_base_module_and_teacher_uses_original_weights(tiny_models, rng):
    cfg, vl, enc = tiny_models("tiny-llava")
    model = SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64, unfreeze=["multi_modal_projector"]).eval()
    try:
        names = model.trainable_parameters()
        assert any(n.startswith("base.model.model.multi_modal_projector.") for n in names)
        batch = _batch(model, rng)
        before = model.teacher_forward(batch).token_logits
        with torch.no_grad():
            model.base.model.model.multi_modal_projector.linear_1.weight.add_(0.5)
        after_student = model(**batch, use_audio=False).token_logits
        after_teacher = model.teacher_forward(batch).token_logits
        assert torch.equal(before, after_teacher)  # the teacher still sees the original weights
        # the student's visual tokens now differ from the original ones: the teacher must not reuse them
        assert not model.vision_path_original()
        student_visual = model(**batch, use_audio=False).visual_tokens
        offered = model.teacher_forward(batch, visual_tokens=student_visual).token_logits
        assert torch.equal(offered, before)
        assert (after_student - before).abs().max() > 1e-3
    finally:  # restore the shared session model
        with torch.no_grad():
            for k, v in model.anchors.items():
                dict(model.named_parameters())[k].copy_(v)
        vl.model.requires_grad_(False)


def test_lora_starts_as_identity_and_disables(tiny_models, rng):
    from peft import LoraConfig

    cfg, _, enc = tiny_models("tiny-blip2-opt")
    model_hf, proc = load_base("tiny-blip2-opt")
    base = BaseVL(model_hf, proc)
    ref = SAFEModel(BaseVL(*load_base("tiny-blip2-opt")), enc, num_audio_tokens=4, projector_hidden=64).eval()
    model = SAFEModel(base, enc, num_audio_tokens=4, projector_hidden=64,
                      lora=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    model.projector.load_state_dict(ref.projector.state_dict())
    assert any("lora_" in n for n in model.trainable_parameters())
    batch = _batch(model, rng)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, ref(**batch).logits, atol=1e-6)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
        changed = model(**batch).logits
        teacher = model.teacher_forward(batch).logits
    assert (changed - ref(**batch).logits).abs().max() > 1e-3
    assert torch.allclose(teacher, ref(**batch, use_audio=False).logits, atol=1e-6)


def test_idle_lora_is_switched_off_exactly_and_back_on_when_it_matters(tiny_models, rng):
    from peft import LoraConfig

    _, _, enc = tiny_models("tiny-blip2-opt")
    model = SAFEModel(BaseVL(*load_base("tiny-blip2-opt")), enc, num_audio_tokens=4, projector_hidden=64,
                      lora=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    batch = _batch(model, rng)
    assert model.lora_active  # trainable from the start
    with torch.no_grad():
        on = model(**batch).logits
        model.set_trainable(projector=True, fusion=True, lora=False)  # a phase that does not train LoRA
        assert not model.lora_active  # frozen and lora_B == 0: the identity, skipped
        assert torch.equal(model(**batch).logits, on)
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        lora_b[0].fill_(0.1)  # e.g. a trained LoRA loaded from a checkpoint
        assert model.sync_lora_active()
        changed = model(**batch).logits
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        # this phase does not train them, trained or not (peft's enable_adapters(True) used to make them trainable:
        # a phase after the LoRA one would have put them in its optimizer)
        assert lora and not any(p.requires_grad for p in lora)
        assert not any("lora_" in n for n in model.trainable_parameters())
        with model.adapters_disabled():  # the teacher's switch restores the state it found
            assert torch.equal(model(**batch).logits, on)
        assert model.lora_active and torch.equal(model(**batch).logits, changed)
        assert not any(p.requires_grad for p in lora)  # peft's enable_adapters(True) had set them trainable
        assert (changed - on).abs().max() > 1e-4


def test_save_and_load_round_trip_without_pickle(tiny_models, rng, tmp_path):
    cfg, vl, enc = tiny_models("tiny-blip2-opt")
    torch.manual_seed(1)
    model = SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64).eval()
    with torch.no_grad():
        model.fusion.attn_gate.fill_(0.3)
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter.safetensors", "adapter_config.json"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["num_audio_tokens"] == 4 and config["projector_hidden"] == 64
    loaded = SAFEModel.from_pretrained(tmp_path / "adapter", base=vl, audio_encoder=enc).eval()
    batch = _batch(model, rng)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    # only the adapter is saved, not the frozen base
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter" / "adapter.safetensors")).keys()
    assert all(k.startswith(("projector.", "fusion.")) for k in keys)


def test_from_pretrained_names_missing_file(tiny_models, tmp_path):
    cfg, vl, enc = tiny_models("tiny-blip2-opt")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        SAFEModel.from_pretrained(tmp_path, base=vl, audio_encoder=enc)


@pytest.mark.parametrize("family,audio", [("tiny-blip2-t5", "tiny-whisper"), ("tiny-llava", "tiny-clap")])
def test_build_from_local_path(tmp_path, rng, family, audio):
    """Real loading code (from_pretrained on a folder) on tiny models saved to disk."""
    model, proc = load_base(family)
    model.save_pretrained(tmp_path / "base")
    proc.save_pretrained(tmp_path / "base")
    enc_model, fe = load_audio_encoder(audio)
    enc_model.save_pretrained(tmp_path / "audio")
    fe.save_pretrained(tmp_path / "audio")
    from safe_av.models.audio_encoders import AudioEncoder

    m1 = SAFEModel(BaseVL(model, proc), AudioEncoder(enc_model, fe), num_audio_tokens=4, projector_hidden=64)
    m2 = SAFEModel(BaseVL(*load_base(str(tmp_path / "base"))),
                   AudioEncoder(*load_audio_encoder(str(tmp_path / "audio"))), num_audio_tokens=4,
                   projector_hidden=64)
    m2.load_state_dict(m1.state_dict())
    m1.eval(), m2.eval()
    batch = _batch(m1, rng)
    with torch.no_grad():
        assert torch.allclose(m1(**batch).logits, m2(**batch).logits, atol=1e-6)


def test_masked_pool_segments():
    tokens = torch.arange(10, dtype=torch.float32).view(1, 10, 1).repeat(2, 1, 1)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :8] = True  # 8 valid -> segments of 2
    mask[1, :2] = True  # 2 valid, 4 segments -> nearest token repeated
    out = masked_pool(tokens, mask, 4)[..., 0]
    assert out[0].tolist() == [0.5, 2.5, 4.5, 6.5]
    assert out[1].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_generate_for_each_family(tiny_models, rng):
    for family in ["tiny-blip2-opt", "tiny-blip2-t5", "tiny-llava"]:
        cfg, vl, enc = tiny_models(family)
        model = SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64).eval()
        wave = random_wave(rng, enc.sampling_rate, 1.0)
        out = model.generate([random_image(rng), None], [wave, wave], ["what is it", ""], max_new_tokens=3)
        assert len(out) == 2 and all(isinstance(s, str) for s in out)


@pytest.mark.parametrize("family", ["tiny-blip2-opt", "tiny-llava"])
def test_gradient_checkpointing_still_reaches_audio_tokens(rng, family):
    """Checkpointing the frozen LM must not cut the gradient path to the audio tokens."""
    from safe_av.models.audio_encoders import AudioEncoder

    enc = AudioEncoder(*load_audio_encoder("tiny-clap"))
    grads = []
    for checkpointing in (False, True):
        hf, proc = load_base(family)
        if checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        model = SAFEModel(BaseVL(hf, proc), enc, num_audio_tokens=4, projector_hidden=64, projector_dropout=0.0,
                          fusion_dropout=0.0).train()
        batch = _batch(model, np.random.default_rng(0))
        model(**batch).loss.backward()
        grads.append(model.projector.projection[0].weight.grad.clone())
        if checkpointing:
            lm = model.base.language_model_module()
            assert any(getattr(m, "gradient_checkpointing", False) and m.training for m in lm.modules())
    assert grads[1].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_checkpointing_flag_follows_transformers_switch():
    """``BaseVL.checkpointing`` (looked up on the layers found once) agrees with transformers' own test, also when
    checkpointing is switched on or off after the model was built (a fresh base: the shared fixtures stay as
    they are)."""
    from peft import LoraConfig

    from safe_av.models.audio_encoders import AudioEncoder

    vl = BaseVL(*load_base("tiny-blip2-opt"))
    SAFEModel(vl, AudioEncoder(*load_audio_encoder("tiny-clap")), num_audio_tokens=4, projector_hidden=64,
              lora=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    assert vl.checkpointing is False and vl.model.is_activation_checkpointing is False
    vl.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert vl.checkpointing is True and vl.model.is_activation_checkpointing is True
    vl.model.gradient_checkpointing_disable()
    assert vl.checkpointing is False and vl.model.is_activation_checkpointing is False


def test_train_mode_base_has_no_dropout(tiny_models, rng):
    """The frozen base computes the same in train and eval mode (its dropout is removed)."""
    cfg, vl, enc = tiny_models("tiny-blip2-opt")
    model = SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64, projector_dropout=0.0, fusion_dropout=0.0)
    batch = _batch(model, rng)
    with torch.no_grad():
        a = model.train()(**batch).logits
        b = model.eval()(**batch).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["tiny-blip2-opt", "tiny-blip2-t5"])
def test_fusion_context_sees_the_question_but_never_the_answer(tiny_models, rng, family):
    cfg, vl, enc = tiny_models(family)
    torch.manual_seed(0)
    model = SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64, fusion_dropout=0.0).eval()
    with torch.no_grad():
        model.fusion.attn_gate.fill_(1.0)
    proc = SAFEProcessor.from_model(model)
    img, wave = random_image(rng), random_wave(rng, proc.sampling_rate, 1.0)

    def audio_tokens(question, answer):
        batch = proc.collate([dict(question=question, answer=answer, image=img, waveform=wave, num_valid=len(wave))])
        with torch.no_grad():
            emb = model.build_inputs(**batch)["embeds"]
        return emb[batch["input_ids"] == model.audio_token_id]

    a = audio_tokens("which instrument sounds first", "violin")
    b = audio_tokens("which instrument sounds first", "drum")
    c = audio_tokens("how many instruments are sounding", "violin")
    assert torch.equal(a, b)  # the answer is not in the context
    assert (a - c).abs().max() > 1e-4  # the question is


def test_teacher_on_selected_rows_matches_full_batch(tiny_models, rng):
    """The loop runs the teacher only on the distilled rows: same values as on the whole batch."""
    from safe_av.training.loop import _select_rows

    cfg, vl, enc = tiny_models("tiny-blip2-opt")
    model = SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64).eval()
    batch = _batch(model, rng)  # rows: image+audio, image only, audio only
    rows = torch.tensor([True, True, False])
    full = model.teacher_forward(batch)
    sub = model.teacher_forward(_select_rows(batch, rows))
    assert sub.token_logits.shape == full.token_logits[rows].shape
    assert torch.allclose(sub.token_logits, full.token_logits[rows], atol=1e-5)


def test_projector_input_statistics_are_saved_with_the_adapter(tiny_models, rng, tmp_path):
    cfg, vl, enc = tiny_models("tiny-blip2-opt")
    model = SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64).eval()
    feats = torch.randn(10, 4, enc.output_dim) * 3 + 5
    model.projector.set_input_stats(feats)
    normed = (feats - model.projector.input_mean) / model.projector.input_std
    assert normed.reshape(-1, enc.output_dim).mean(0).abs().max() < 1e-4
    model.save_pretrained(tmp_path / "a")
    loaded = SAFEModel.from_pretrained(tmp_path / "a", base=vl, audio_encoder=enc).eval()
    assert torch.equal(loaded.projector.input_mean, model.projector.input_mean)
    batch = _batch(model, rng)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


@pytest.mark.parametrize("family,position", [("tiny-blip2-opt", "after_image"), ("tiny-llava", "after_image"),
                                             ("tiny-blip2-opt", "before_answer")])
def test_frozen_prefix_split_gives_the_same_loss_logits_and_gradients(tiny_models, rng, family, position,
                                                                      monkeypatch):
    """Positions before the first <audio> column run without autograd (cached keys/values): same numbers."""
    cfg, vl, enc = tiny_models(family)
    torch.manual_seed(0)
    model = SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64, fusion_dropout=0.0,
                      projector_dropout=0.0, audio_position=position).train()
    model.set_trainable(projector=True, fusion=True)
    with torch.no_grad():
        model.fusion.attn_gate.fill_(0.5)
        model.fusion.ffn_gate.fill_(0.5)
    batch = _batch(model, rng)
    seen = []
    lm = model.base.language_model

    def spy(*a, **k):
        seen.append(k.get("frozen_prefix", 0))
        return lm(*a, **k)

    monkeypatch.setattr(model.base, "language_model", spy)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.trainable_parameters().items()}

    split, g_split = run()
    first_audio = int((batch["input_ids"] == model.audio_token_id).any(0).nonzero()[0, 0])
    assert seen[-1] == first_audio > 0  # the image tokens (and padding) before the audio ran without autograd
    monkeypatch.setattr(model, "_frozen_prefix", lambda inputs: 0)
    whole, g_whole = run()
    assert seen[-1] == 0
    torch.testing.assert_close(split.loss, whole.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.logits, whole.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(split.hidden, whole.hidden, atol=1e-4, rtol=1e-4)
    for n in g_whole:
        torch.testing.assert_close(g_split[n], g_whole[n], atol=1e-5, rtol=1e-4, msg=n)


def test_no_frozen_prefix_when_the_base_trains_or_without_autograd(tiny_models, rng):
    cfg, vl, enc = tiny_models("tiny-llava")
    model = SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64).train()
    batch = _batch(model, rng)
    model.set_trainable(projector=True, fusion=True)
    assert model._frozen_prefix(model.build_inputs(**batch)) > 0
    with torch.no_grad():  # evaluation, the teacher: nothing to save
        assert model._frozen_prefix(model.build_inputs(**batch)) == 0
    try:
        model.set_trainable(projector=True, fusion=True, unfreeze=["multi_modal_projector"])
        assert model._frozen_prefix(model.build_inputs(**batch)) == 0  # the image tokens now need gradients
        model.set_trainable(projector=True, fusion=True, lora=True)  # LoRA would be no-op here, still: base trains
        assert model.base_trains and model._frozen_prefix(model.build_inputs(**batch)) == 0
    finally:
        model.set_trainable(projector=True, fusion=True)
        model.base.model.requires_grad_(False)


def test_adapter_saved_with_a_context_norm_gain_and_bias_loads_folded(tiny_models, rng, tmp_path):
    """Adapters written before the fusion's context norm lost its gain/bias load with them folded into kv_proj."""
    from safetensors.torch import load_file, save_file

    cfg, vl, enc = tiny_models("tiny-blip2-opt")
    torch.manual_seed(0)
    model = SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64).eval()
    with torch.no_grad():
        model.fusion.attn_gate.fill_(1.0)
    model.save_pretrained(tmp_path / "a")
    # rewrite the file as the old layout: gain g and bias b on the norm, kv_proj holding W and c with
    # W g = the saved weight and W b + c = the saved bias
    state = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    g = torch.rand(vl.hidden_size) + 0.5
    b = torch.randn(vl.hidden_size) * 0.1
    w_old = state["fusion.kv_proj.weight"] / g
    state["fusion.kv_proj.bias"] = state["fusion.kv_proj.bias"] - w_old @ b
    state["fusion.kv_proj.weight"] = w_old
    state["fusion.norm_visual.weight"], state["fusion.norm_visual.bias"] = g, b
    save_file(state, str(tmp_path / "a" / "adapter.safetensors"))
    loaded = SAFEModel.from_pretrained(tmp_path / "a", base=vl, audio_encoder=enc).eval()
    batch = _batch(model, rng)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,prefix", [("tiny-blip2-opt", True), ("tiny-blip2-opt", False), ("tiny-llava", True)])
def test_logits_from_the_first_label_give_the_same_loss_and_token_outputs(tiny_models, rng, family, prefix):
    """The training step runs the LM head only from the position before the first label: same numbers."""
    cfg, vl, enc = tiny_models(family)
    torch.manual_seed(0)
    model = SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64, fusion_dropout=0.0, projector_dropout=0.0,
                      frozen_prefix=prefix).train()
    model.set_trainable(projector=True, fusion=True)
    batch = _batch(model, rng)
    start = model.logits_start(batch)
    first = int((batch["labels"] != -100).any(0).nonzero()[0, 0])
    assert start == first - 1 > 0
    full, cut = model(**batch), model(**batch, logits_from=start)
    assert cut.logits.shape[1] == batch["input_ids"].shape[1] - start
    torch.testing.assert_close(cut.loss, full.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cut.logits, full.logits[:, start:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cut.token_logits, full.token_logits[:, start:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cut.token_hidden, full.token_hidden[:, start:], atol=1e-5, rtol=1e-5)
    assert torch.equal(cut.token_labels, full.token_labels[:, start:])
    # the teacher, given the student's start, lines up with it position by position
    teacher = model.teacher_forward(batch, logits_from=start)
    assert teacher.token_logits.shape == cut.token_logits.shape
    torch.testing.assert_close(teacher.token_logits, model.teacher_forward(batch).token_logits[:, start:],
                               atol=1e-5, rtol=1e-5)


def test_logits_start_is_none_for_encoder_decoder_models_and_without_labels(tiny_models, rng):
    cfg, vl, enc = tiny_models("tiny-blip2-t5")
    model = SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64).eval()
    batch = _batch(model, rng)
    assert model.logits_start(batch) is None
    assert model.logits_start({k: v for k, v in batch.items() if k != "labels"}) is None


# ------------------------------------------------------------------ strict, checked adapter loading


def _fresh_blip2_opt() -> BaseVL:
    """A base of its own (LoRA is injected into the base a SAFEModel is built around)."""
    return BaseVL(*load_base("tiny-blip2-opt"))


def _trained_adapter(enc, path):
    """An adapter with every kind of tensor: projector (+ its input statistics), fusion, LoRA and an unfrozen
    base module, all moved away from their initial values; saved to ``path``."""
    from peft import LoraConfig

    torch.manual_seed(0)
    model = SAFEModel(_fresh_blip2_opt(), enc, num_audio_tokens=4, projector_hidden=64,
                      unfreeze=["language_projection"],
                      lora=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        model.fusion.attn_gate.fill_(1.0)
        for n, p in model.named_parameters():
            if "lora_B" in n or "language_projection" in n:
                p.add_(0.05 * torch.randn_like(p))
        model.projector.set_input_stats(torch.randn(6, 4, enc.output_dim) * 2 + 1)
    model.save_pretrained(path)
    return model


def test_from_pretrained_is_strict_about_missing_tensors(tiny_models, rng, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, enc = tiny_models("tiny-blip2-opt")
    model = _trained_adapter(enc, tmp_path / "full")
    saved = load_file(str(tmp_path / "full" / "adapter.safetensors"))
    assert {"projector.input_mean", "projector.input_std"} <= set(saved)
    assert any("lora_B" in k for k in saved) and any("language_projection" in k for k in saved)
    # the complete adapter loads, exactly
    loaded = SAFEModel.from_pretrained(tmp_path / "full", base=_fresh_blip2_opt(), audio_encoder=enc).eval()
    batch = _batch(model, rng)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)

    def truncated(name, drop):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text((tmp_path / "full" / "adapter_config.json").read_text())
        save_file({k: v for k, v in saved.items() if k not in drop}, str(folder / "adapter.safetensors"))
        return folder

    lora_b = next(k for k in saved if "lora_B" in k)
    proj_bias = next(k for k in saved if "language_projection.bias" in k)
    for name, drop in [("fusion", {"fusion.q_proj.weight", "projector.projection.0.weight"}), ("lora", {lora_b}),
                       ("base", {proj_bias}), ("one_buffer", {"projector.input_std"})]:
        folder = truncated(name, drop)
        with pytest.raises(ValueError) as err:
            SAFEModel.from_pretrained(folder, base=_fresh_blip2_opt(), audio_encoder=enc)
        message = str(err.value)
        assert message.startswith(f"{folder / 'adapter.safetensors'}: {len(drop)} adapter tensor(s) missing: ")
        assert all(repr(k) in message for k in drop), message
    # an adapter written before the projector's input statistics were saved (none of them): identity
    old = SAFEModel.from_pretrained(truncated("old", {"projector.input_mean", "projector.input_std"}),
                                    base=_fresh_blip2_opt(), audio_encoder=enc)
    assert torch.equal(old.projector.input_mean, torch.zeros(enc.output_dim))
    assert torch.equal(old.projector.input_std, torch.ones(enc.output_dim))
    assert torch.equal(old.fusion.q_proj.weight, model.fusion.q_proj.weight)


def test_adapter_records_base_family_and_audio_kind_and_refuses_others(tiny_models, tmp_path):
    _, vl, enc = tiny_models("tiny-blip2-opt")
    SAFEModel(vl, enc, num_audio_tokens=4, projector_hidden=64).save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["base_family"], config["audio_kind"]) == ("blip2-opt", "clap")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    _, llava, _ = tiny_models("tiny-llava")
    with pytest.raises(ValueError) as err:
        SAFEModel.from_pretrained(tmp_path / "a", base=llava, audio_encoder=enc)
    assert str(err.value) == (f"{cfg_file}: base_family='blip2-opt': the adapter was trained with a blip2-opt base, "
                              "but the base given is a llava one; load it around the base it was trained with")
    _, _, whisper = tiny_models("tiny-blip2-opt", "tiny-whisper")
    with pytest.raises(ValueError, match=r"audio_kind='clap': .* clap audio encoder, but the audio encoder given "
                                         r"is a whisper one"):
        SAFEModel.from_pretrained(tmp_path / "a", base=vl, audio_encoder=whisper)
    # adapters written before the family was recorded are not checked: this one (same widths) would load
    cfg_file.write_text(json.dumps({k: v for k, v in config.items() if k not in ("base_family", "audio_kind")}))
    assert SAFEModel.from_pretrained(tmp_path / "a", base=llava, audio_encoder=enc).base is llava


def test_base_fingerprint_warns_on_other_weights_of_the_same_family(tiny_models, tmp_path, caplog):
    from safe_av.models.safe_model import weights_fingerprint

    _, vl, enc = tiny_models("tiny-blip2-opt")
    model = _trained_adapter(enc, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    plain = SAFEModel(_fresh_blip2_opt(), enc, num_audio_tokens=4, projector_hidden=64)
    # the base's original weights: the trained language_projection (anchors) and LoRA do not change it
    assert config["base_fingerprint"] == model.base_fingerprint() == plain.base_fingerprint()
    assert len(config["base_fingerprint"]) == 16
    assert config["audio_encoder_fingerprint"] == weights_fingerprint(enc.named_parameters())
    # a bfloat16 copy of the same weights has the same fingerprint
    assert weights_fingerprint(_fresh_blip2_opt().to(torch.bfloat16).named_parameters()) == \
        weights_fingerprint(_fresh_blip2_opt().named_parameters())
    with caplog.at_level("WARNING", logger="safe_av.models.safe_model"):
        SAFEModel.from_pretrained(tmp_path / "a", base=_fresh_blip2_opt(), audio_encoder=enc)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    def other_base():
        other = _fresh_blip2_opt()
        with torch.no_grad():
            other.model.language_model.get_input_embeddings().weight[0, 0] += 0.5
        return other

    assert weights_fingerprint(other_base().named_parameters()) != config["base_fingerprint"]
    with caplog.at_level("WARNING", logger="safe_av.models.safe_model"):
        loaded = SAFEModel.from_pretrained(tmp_path / "a", base=other_base(), audio_encoder=enc)  # loads
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert config["base_fingerprint"] in warnings[0] and loaded.base_fingerprint() in warnings[0]
    assert "adapter_config.json" in warnings[0] and "base" in warnings[0]
    # without a recorded fingerprint: loads as before, silently
    caplog.clear()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(
        {k: v for k, v in config.items() if not k.endswith("fingerprint")}))
    with caplog.at_level("WARNING", logger="safe_av.models.safe_model"):
        SAFEModel.from_pretrained(tmp_path / "a", base=other_base(), audio_encoder=enc)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
