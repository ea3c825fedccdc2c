"""safe info: shipped architecture files, parameter counts vs published numbers, memory estimate."""

import copy
import socket

import pytest
import torch

from safe_av.config import SAFEConfig
from safe_av.info import (_act_elems_lm_layer, build_parts, format_table, lm_activation_bytes, main,
                          model_summary)
from safe_av.presets import ARCHES, available_arches, load_arch

# Published parameter counts (hub model pages' safetensors totals / model cards):
#   Salesforce/blip2-opt-2.7b  3.74e9 ("3.74B params"; OPT-2.7B ties lm_head to its embeddings)
#   Salesforce/blip2-flan-t5-xl 3.94e9 (fp32 safetensors 9.96 GB + 5.81 GB = 15.77 GB / 4 B)
#   llava-hf/llava-1.5-7b-hf   7.06e9 ("7.06B params")
#   openai/whisper-large-v3    1.54e9 for WhisperForConditionalGeneration (Whisper paper: 1550M); its encoder
#                              is 32 layers of d=1280, ffn 5120: 32*(4*1280^2+2*1280*5120+...) + convs = 0.637e9
#   laion/clap-htsat-unfused   153.5e6 total ("153M params"); the HTSAT-tiny audio tower is Swin-T sized
PUBLISHED = {"blip2-opt-2.7b": 3.745e9, "blip2-flan-t5-xl": 3.94e9, "llava-1.5-7b": 7.06e9}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("safe info tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


_PARTS = {}


def parts_for(base, audio="clap-htsat-unfused"):
    key = (base, audio)
    if key not in _PARTS:
        cfg = SAFEConfig()
        cfg.model.base, cfg.model.audio_encoder = base, audio
        _PARTS[key] = (cfg, build_parts(cfg))
    return _PARTS[key]


def test_arch_files_load_as_transformers_configs():
    assert set(available_arches()) == set(ARCHES)
    c = load_arch("blip2-opt-2.7b")
    assert type(c).__name__ == "Blip2Config" and c.num_query_tokens == 32
    assert (c.vision_config.hidden_size, c.vision_config.num_hidden_layers, c.vision_config.image_size,
            c.vision_config.patch_size, c.vision_config.qkv_bias) == (1408, 39, 224, 14, True)
    assert (c.qformer_config.hidden_size, c.qformer_config.num_hidden_layers) == (768, 12)
    assert (c.text_config.hidden_size, c.text_config.num_hidden_layers, c.text_config.ffn_dim,
            c.text_config.vocab_size) == (2560, 32, 10240, 50304)
    t5 = load_arch("Salesforce/blip2-flan-t5-xl").text_config  # hub names resolve too
    assert (t5.d_model, t5.d_ff, t5.num_heads, t5.num_layers, t5.vocab_size) == (2048, 5120, 32, 24, 32128)
    ll = load_arch("llava-1.5-7b")
    assert (ll.text_config.hidden_size, ll.text_config.intermediate_size, ll.text_config.vocab_size,
            ll.vision_config.image_size, ll.vision_config.patch_size) == (4096, 11008, 32064, 336, 14)
    w = load_arch("whisper-large-v3")
    assert (w.d_model, w.encoder_layers, w.num_mel_bins, w.vocab_size) == (1280, 32, 128, 51866)
    cl = load_arch("clap-htsat-unfused")
    assert (cl.audio_config.hidden_size, list(cl.audio_config.depths), cl.audio_config.enable_fusion) == (
        768, [2, 2, 6, 2], False)
    with pytest.raises(ValueError, match="no architecture file"):
        load_arch("nope")


@pytest.mark.parametrize("base", sorted(PUBLISHED))
def test_base_parameter_counts_match_published(base):
    cfg, parts = parts_for(base)
    s = model_summary(cfg, parts=parts)
    assert s.base_params == pytest.approx(PUBLISHED[base], rel=0.01)


def test_blip2_opt_component_counts():
    cfg, parts = parts_for("blip2-opt-2.7b")
    s = model_summary(cfg, parts=parts)
    assert s.base_params == 3_744_761_856  # ~3.8e9 shown by safe info; 3.745e9 published
    assert s.row("vision encoder").params == pytest.approx(0.986e9, rel=0.01)  # EVA ViT-g, ~1B
    assert s.row("language model").params == pytest.approx(2.65e9, rel=0.01)  # OPT-2.7B: 2,651,596,800
    # SAFE parts are built from the config dims: projector 768 -> 4096 -> 2560 + LayerNorm
    assert s.row("SAFE projector").params == 768 * 4096 + 4096 + 4096 * 2560 + 2560 + 2 * 2560


def test_audio_encoder_counts():
    _, parts = parts_for("blip2-opt-2.7b", "whisper-large-v3")
    n_enc = sum(p.numel() for p in parts.audio_encoder.parameters())
    assert n_enc == pytest.approx(0.637e9, rel=0.01)
    _, parts = parts_for("blip2-opt-2.7b", "clap-htsat-unfused")
    n_clap = sum(p.numel() for p in parts.audio_encoder.parameters())
    assert 27e6 <= n_clap <= 30e6  # HTSAT-tiny audio tower: 27.5M (+0.66M audio projection not used by SAFE)
    assert parts.audio_dim == 768


def _tiny_cfg(base="tiny-blip2-opt", audio="tiny-clap", lora=False):
    cfg = SAFEConfig()
    cfg.model.base, cfg.model.audio_encoder, cfg.model.num_audio_tokens = base, audio, 4
    cfg.model.projector.hidden_dim = 64
    cfg.model.lora.enabled = lora
    return cfg


@pytest.mark.parametrize("base,unfreeze,lora", [("tiny-blip2-opt", ["qformer"], False),
                                                ("tiny-llava", ["multi_modal_projector"], False),
                                                ("tiny-blip2-t5", ["language_projection"], False),
                                                ("tiny-blip2-opt", [], True)])
def test_tiny_counts_equal_the_real_safe_model(base, unfreeze, lora):
    from safe_av.models.build import build_safe_model

    cfg = _tiny_cfg(base, lora=lora)
    cfg.train.phases[-1].train = ["projector", "fusion", "base"] + (["lora"] if lora else [])
    cfg.train.phases[-1].unfreeze = unfreeze
    for idx, ph in enumerate(cfg.train.phases):
        s = model_summary(cfg, phase=idx)
        model = build_safe_model(cfg.model, projector_trainable="projector" in ph.train,
                                 fusion_trainable="fusion" in ph.train,
                                 unfreeze=ph.unfreeze if "base" in ph.train else ())
        if lora and "lora" not in ph.train:
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(False)
        assert s.total_params == sum(p.numel() for p in model.parameters())
        assert s.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
        if lora:
            assert s.row("LoRA").params == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def _saved_bytes(fn, params):
    pids = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in pids:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("base", ["tiny-blip2-opt", "tiny-llava", "tiny-blip2-t5"])
def test_lm_activation_formula_matches_autograd(base):
    """The frozen LM's saved tensors (what backward to the audio tokens needs), measured with autograd's
    saved-tensor hooks, against the per-layer formula: within 10%."""
    from safe_av.models.base_vl import BaseVL
    from safe_av.models.presets import build_tiny_base

    model, proc = build_tiny_base(base)
    bvl = BaseVL(model, proc)
    parts = build_parts(_tiny_cfg(base))
    b, s, a = 4, 48, 8
    emb = torch.randn(b, s, bvl.hidden_size, requires_grad=True)
    mask = torch.ones(b, s, dtype=torch.long)
    labels = torch.randint(0, 20, (b, a)) if bvl.is_encoder_decoder else None

    def step():
        out = bvl.language_model(emb * 1.0, mask, labels=labels)
        logits = out.logits.float()
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long))

    measured = _saved_bytes(step, list(model.parameters()))
    stored, _ = lm_activation_bytes(parts.lm, b, s, dtype_bytes=4, answer_tokens=a)
    out_seq = a if bvl.is_encoder_decoder else s
    stored += parts.lm.vocab * out_seq * 4 * b  # log-softmax output saved by cross-entropy
    assert stored == pytest.approx(measured, rel=0.10)


def test_memory_levers_are_consistent():
    cfg, parts = parts_for("llava-1.5-7b")
    cfg = copy.deepcopy(cfg)
    cfg.model.frozen_prefix = False  # every position's activations kept: what checkpointing is measured against
    s = model_summary(cfg, parts=parts)
    lev = {m.lever: m for m in s.levers}
    base = lev["as configured"]
    assert s.memory is s.levers[0]
    assert base.gradients == 4 * s.trainable_params and base.optimizer == 8 * s.trainable_params
    assert base.peak == pytest.approx(base.weights + base.master + base.gradients + base.optimizer
                                      + base.activations + base.transient)
    assert lev["bf16"].weights < 0.55 * base.weights
    assert lev["4-bit"].weights < lev["8-bit"].weights < lev["bf16"].weights
    assert lev["grad checkpointing"].activations < 0.2 * base.activations
    assert lev["4-bit + bf16 + checkpointing"].peak < lev["bf16 + checkpointing"].peak < lev["bf16"].peak
    # the LLaVA LM layer at bf16: norms 2d + q,k,v,o 4d + gated FFN 3f per token, for 576+8+32 tokens
    seq = 576 + 8 + 32
    per_layer = seq * (6 * 4096 + 3 * 11008)
    assert _act_elems_lm_layer(parts.lm, seq, eager=False) == per_layer
    assert lev["bf16"].activations > 32 * per_layer * 2 * cfg.train.phases[-1].batch_size


def test_phase_trainability_and_table():
    cfg, parts = parts_for("blip2-opt-2.7b")
    s0 = model_summary(cfg, phase=0, parts=parts)
    assert s0.trainable_params == s0.row("SAFE projector").params
    s2 = model_summary(cfg, parts=parts)  # default: the last phase (projector + fusion)
    assert s2.phase_index == len(cfg.train.phases) - 1
    assert s2.trainable_params == s2.row("SAFE projector").params + s2.row("SAFE fusion").params
    text = format_table(s2)
    for word in ("vision encoder", "Q-Former", "language model", "audio encoder", "SAFE fusion", "PEAK",
                 "grad checkpointing", "4-bit"):
        assert word in text
    with pytest.raises(ValueError):
        model_summary(cfg, phase=7, parts=parts)


def test_main_prints_summary(capsys):
    assert main(_tiny_cfg()) == 0
    out = capsys.readouterr().out
    assert "PEAK" in out and "TFLOP" in out


def test_unknown_base_without_arch_is_refused():
    cfg = SAFEConfig()
    cfg.model.base = "someone/some-model"
    with pytest.raises(ValueError, match="model.arch"):
        build_parts(cfg)


# Peak memory measured on one NVIDIA H100 80GB (torch 2.11, transformers 5.17), randomly initialised weights
# built from these same architecture files: CLAP tower + base on the GPU, SAFE projector + fusion trained with
# AdamW under bf16 autocast, LM fed [32|576 visual][8 audio][32 text] embeddings; torch.cuda.max_memory_allocated
# over the second step (optimizer states allocated), no teacher pass (distillation and retention off). GiB.
H100_MEASURED = [
    ("blip2-opt-2.7b", "bfloat16", False, 8, 10.12),
    ("blip2-opt-2.7b", "float32", False, 8, 21.91),  # fp32 weights + bf16 autocast: bf16 weight copies saved
    ("llava-1.5-7b", "bfloat16", False, 4, 27.34),
    ("llava-1.5-7b", "bfloat16", True, 8, 20.31),
]


@pytest.mark.parametrize("base,dtype,gc,batch,measured", H100_MEASURED)
def test_predicted_peak_matches_h100_measurement(base, dtype, gc, batch, measured):
    cfg = SAFEConfig()
    cfg.model.base, cfg.model.audio_encoder = base, "clap-htsat-unfused"
    cfg.model.dtype, cfg.train.mixed_precision, cfg.model.gradient_checkpointing = dtype, "bf16", gc
    cfg.train.phases[-1].batch_size = batch
    cfg.loss.distillation = cfg.loss.retention = False
    # measured before the frozen-prefix split and the label-window logits existed (session 1)
    cfg.model.frozen_prefix = cfg.model.label_logits_only = False
    s = model_summary(cfg, parts=parts_for(base)[1])
    peak = s.memory.peak
    if base.startswith("blip2") and dtype == "bfloat16":
        # the measurement (bench/gpu_check.py's _keep_fp32) forced the Q-Former and query tokens to fp32, which
        # from_pretrained(dtype=bfloat16) does not do (only for float16): add the 2 extra bytes per parameter
        peak += 2 * s.row("Q-Former").params
    assert peak / 2**30 == pytest.approx(measured, rel=0.05)


def test_frozen_prefix_keeps_only_the_image_tokens_keys_and_values():
    """Nothing in the base trains: the LM keeps activations for the tokens after the image only, plus the
    image tokens' keys/values (LLaVA: 576 image tokens of 616)."""
    cfg, parts = parts_for("llava-1.5-7b")
    cfg = copy.deepcopy(cfg)
    cfg.loss.distillation = cfg.loss.retention = False
    cfg.model.dtype, cfg.train.mixed_precision = "bfloat16", "bf16"
    phase = next(i for i, p in enumerate(cfg.train.phases) if "base" not in p.train and "lora" not in p.train)
    on = model_summary(cfg, parts=parts, phase=phase).memory
    cfg.model.frozen_prefix = False
    off = model_summary(cfg, parts=parts, phase=phase).memory
    lm, b, v = parts.lm, cfg.train.phases[phase].batch_size, parts.num_visual_tokens
    seq = v + cfg.model.num_audio_tokens + 32
    full, _ = lm_activation_bytes(lm, b, seq, dtype_bytes=2)
    suffix, _ = lm_activation_bytes(lm, b, seq - v, dtype_bytes=2)
    assert off.activations - on.activations == pytest.approx(full - suffix - lm.layers * 2 * lm.kv_dim * v * 2 * b)
    assert on.activations < 0.35 * off.activations
    cfg.model.frozen_prefix = True
    cfg.model.gradient_checkpointing = True  # transformers drops the cache under checkpointing: no split
    gc_on = model_summary(cfg, parts=parts, phase=phase).memory
    cfg.model.frozen_prefix = False
    assert model_summary(cfg, parts=parts, phase=phase).memory.activations == gc_on.activations


def test_teacher_pass_is_predicted_only_where_it_runs():
    """Distillation / retention add the teacher's forward (all hidden states of the distilled rows) to the
    peak, in phases with image rows only; phase 1 of the demo (captions only) has no teacher."""
    from safe_av.config import load_config

    cfg = load_config("configs/demo.yaml", ["train.pretrain.enabled=false"])
    on = [model_summary(cfg, phase=i).memory for i in range(3)]
    cfg.loss.distillation = cfg.loss.retention = False
    off = [model_summary(cfg, phase=i).memory for i in range(3)]
    assert on[0].peak == off[0].peak  # audiocaps only: no distilled rows
    for i in (1, 2):
        assert on[i].peak > off[i].peak and on[i].activations == off[i].activations
        assert on[i].transient > off[i].transient


def _phase(train, datasets, *, batch=16, curriculum=False, audio_ratio=1.0, unfreeze=()):
    from safe_av.config import PhaseConfig

    lr = {p: 1e-4 for p in train}
    return PhaseConfig("p", list(train), lr, list(unfreeze), dict(datasets), batch_size=batch, curriculum=curriculum,
                       audio_ratio=audio_ratio)


def _cfg_with(*phases, lora=True):
    cfg = _tiny_cfg(lora=lora)
    cfg.train.phases = list(phases)
    return cfg


def test_teacher_rows_follow_the_trainers_distilled_rows():
    """Distilled rows = an image and an image-only question (VQA v2, MUSIC-AVQA Visual); while the base does not
    train (no unfreeze, LoRA never trained) only those with audio; captions never."""
    from safe_av.info import AVQA_IMAGE_QUESTION_SHARE as Q
    from safe_av.info import phase_trainability, teacher_rows

    def share(*phases, i=-1, **kw):
        cfg = _cfg_with(*phases, **kw)
        return phase_trainability(cfg, cfg.train.phases[i]).teacher_share

    frozen = ["projector", "fusion"]
    # frozen base, VQA only: every row is the teacher exactly -> nothing distilled
    assert share(_phase(frozen, {"vqav2": 1.0}, audio_ratio=0.25)) == 0
    # LoRA trains: every VQA row is distilled
    assert share(_phase(frozen + ["lora"], {"vqav2": 1.0})) == 1.0
    # "lora" in train but the model has no LoRA (lora.enabled=false): the LM is still the teacher
    assert share(_phase(frozen + ["lora"], {"vqav2": 1.0}), lora=False) == 0
    # an unfrozen base module does the same as LoRA
    assert share(_phase(frozen + ["base"], {"vqav2": 1.0}, unfreeze=["language_projection"]), lora=False) == 1.0
    # captions (audio, no image): never distilled, whatever trains
    assert share(_phase(frozen + ["lora"], {"audiocaps": 1.0, "clotho": 1.0})) == 0
    assert share(_phase(frozen + ["lora"], {"avsd": 1.0})) == 0  # dialog turns are not image-only questions
    # frozen base, MUSIC-AVQA only: its Visual questions, which carry audio
    assert share(_phase(frozen, {"musicavqa": 1.0})) == pytest.approx(Q)
    # frozen base, MUSIC-AVQA + VQA at audio_ratio 0.5: 8 audio rows (AVQA) x Q, the 8 VQA rows skipped
    assert share(_phase(frozen, {"musicavqa": 1.0, "vqav2": 0.5}, audio_ratio=0.5)) == pytest.approx(0.5 * Q)
    # LoRA trained by an earlier phase: VQA rows are distilled in a later frozen-base phase too
    assert share(_phase(frozen + ["lora"], {"audiocaps": 1.0}), _phase(frozen, {"vqav2": 1.0})) == 1.0
    # weights mix datasets within the audio-bearing rows: 3 of 4 audio rows AVQA, 1 caption
    mixed = {"musicavqa": 0.6, "audiocaps": 0.2, "vqav2": 0.2}
    assert share(_phase(frozen + ["lora"], mixed, audio_ratio=0.25)) == pytest.approx((4 * 0.75 * Q + 12) / 16)
    # curriculum: the stage with the most distilled rows (audio ratio 1 for a frozen base: all AVQA rows)
    assert share(_phase(frozen, mixed, curriculum=True)) == pytest.approx(0.75 * Q)
    # no distillation or retention, or task-only fine-tuning: no teacher
    cfg = _cfg_with(_phase(frozen + ["lora"], {"vqav2": 1.0}))
    cfg.loss.task_only = True
    assert not phase_trainability(cfg, cfg.train.phases[0]).teacher
    cfg.loss.task_only, cfg.loss.distillation, cfg.loss.retention = False, False, False
    assert not phase_trainability(cfg, cfg.train.phases[0]).teacher
    # whole rows, rounded up; at least one when any row can be distilled
    assert [teacher_rows(s, 16) for s in (0.0, 0.001, 0.24, 0.25, 1.0)] == [0, 1, 4, 4, 16]


def test_teacher_transient_scales_with_distilled_rows():
    """The teacher's transient is per distilled row: demo phase 2 (frozen base) distils ~a quarter of the rows
    (4 of 16), phase 3 (LoRA; half its rows VL-only) the VQA rows too (10 of 16); the table says how many."""
    from safe_av.config import load_config
    from safe_av.info import build_parts

    cfg = load_config("configs/demo.yaml", ["train.pretrain.enabled=false"])
    parts = build_parts(cfg)
    s = [model_summary(cfg, phase=i, parts=parts) for i in range(3)]
    assert [x.teacher_rows for x in s] == [0, 4, 10]  # 8 x 0.6/0.8 x 0.24 + 8 VQA rows = 9.4
    assert "4 of 16 rows" in format_table(s[1]) and "no distilled rows" in format_table(s[0])
    lm, e = parts.lm, 4  # fp32 demo
    seq = 8 + cfg.model.num_audio_tokens + 32  # image, audio and text tokens
    head = 8 + 1  # logits from the position before the (8) answer tokens only (model.label_logits_only)
    per_row = (((lm.layers + 1) * lm.hidden + max(lm.ffn, 3 * lm.hidden)) * seq + lm.vocab * head) * e
    logits_grad = lm.vocab * head * 4 * 16
    for x in s[1:]:
        assert x.memory.transient == pytest.approx(per_row * x.teacher_rows + logits_grad)


def test_dataset_rows_match_the_synthetic_corpus(tmp_path):
    """DATASET_ROWS (audio?, share of distilled-kind rows) against what the trainer sees in the corpus, and the
    AV-QA constant against the synthetic question mix."""
    import numpy as np

    from safe_av.data.formats import read
    from safe_av.data.synth_scenes import make_scene, scene_questions
    from safe_av.data.synthetic import write_synthetic
    from safe_av.info import AVQA_IMAGE_QUESTION_SHARE, DATASET_ROWS
    from safe_av.training.loop import image_question

    for name, root in write_synthetic(tmp_path, seed=0, small=True).items():
        samples = read(name, root, "train").samples
        audio, share = DATASET_ROWS[name]
        assert {s.audio is not None for s in samples} == {audio}
        got = np.mean([image_question(s) and s.image is not None for s in samples])
        assert got == pytest.approx(share, abs=0.1), name
    rng = np.random.default_rng(1)
    kinds = [q[0] for _ in range(3000) for q in scene_questions(make_scene(rng), rng)]
    assert np.mean([k == "Visual" for k in kinds]) == pytest.approx(AVQA_IMAGE_QUESTION_SHARE, abs=0.01)


def _dtype_cfg(base, dtype, load_in="none"):
    cfg, parts = parts_for(base)
    cfg = copy.deepcopy(cfg)
    cfg.model.dtype, cfg.model.load_in = dtype, load_in
    return cfg, parts


def test_keep_in_fp32_modules_are_fp32_in_float16_only_and_never_quantized():
    """transformers keeps ``_keep_in_fp32_modules`` (BLIP-2: Q-Former + query tokens; FlanT5: the FFN ``wo``) in
    fp32 only when the model's dtype is float16 (``_get_dtype_plan``), and adds them to bitsandbytes' skip list
    for any dtype (``get_modules_to_not_convert``)."""
    from torch import nn

    _, parts = parts_for("blip2-flan-t5-xl")
    qf = parts.components["Q-Former"]
    n_qf = sum(p.numel() for p in qf.parameters())
    lm = parts.components["language model"]
    wo = [m.weight for n, m in lm.named_modules() if isinstance(m, nn.Linear) and n.endswith(".wo")]
    n_wo = sum(w.numel() for w in wo)
    n_lm = sum(p.numel() for p in lm.parameters())

    def rows(dtype, load_in="none"):
        cfg, _ = _dtype_cfg("blip2-flan-t5-xl", dtype, load_in)
        s = model_summary(cfg, parts=parts)
        return s.row("Q-Former").weight_bytes, s.row("language model").weight_bytes

    assert rows("bfloat16") == (2 * n_qf, 2 * n_lm)
    assert rows("float16") == (4 * n_qf, 2 * n_lm + 2 * n_wo)
    assert rows("float32") == (4 * n_qf, 4 * n_lm)
    # 4-bit: the Q-Former and every wo stay unquantized, at the model's dtype (fp32 under float16)
    q_bf16, lm_bf16 = rows("bfloat16", "4bit")
    assert q_bf16 == 2 * n_qf
    quantized = [m.weight for n, m in lm.named_modules()
                 if isinstance(m, nn.Linear) and n.split(".")[-1] not in ("lm_head", "wo")]
    n_q = sum(w.numel() for w in quantized)
    expected = 2 * (n_lm - n_q) + sum(w.numel() * 0.5 + 4 * -(-w.numel() // 64) for w in quantized)
    assert lm_bf16 == pytest.approx(expected)
    assert rows("float16", "8bit")[0] == 4 * n_qf
    assert wo and all(id(p) in parts.keep_fp32 for p in [*qf.parameters(), *wo])


def test_trainable_base_parameters_keep_their_dtype_with_anchor_and_fisher():
    """An unfrozen base module in a bf16 model: 2-byte gradients and two 2-byte AdamW states (zeros_like(param)),
    no fp32 master copy; plus its anchor copy θ* (bf16) and, with ``loss.fisher``, its fp32 Fisher diagonal.
    LoRA follows the base's dtype the same way."""
    cfg, _ = _dtype_cfg("llava-1.5-7b", "bfloat16")
    cfg.train.mixed_precision = "bf16"
    cfg.model.lora.enabled = True  # LoRA changes the parts: built below
    last = cfg.train.phases[-1]
    last.train = ["projector", "fusion", "base", "lora"]
    last.unfreeze = ["multi_modal_projector"]
    lparts = build_parts(cfg)
    n_mm = sum(p.numel() for p in lparts.unfreezable["multi_modal_projector"].parameters())
    s = model_summary(cfg, parts=lparts)
    m = s.memory
    n_safe = s.row("SAFE projector").params + s.row("SAFE fusion").params
    n_lora = s.row("LoRA").params
    assert m.master == 0
    assert m.gradients == 4 * n_safe + 2 * n_mm + 2 * n_lora
    assert m.optimizer == 8 * n_safe + 4 * n_mm + 4 * n_lora
    assert s.row("LoRA").weight_bytes == 2 * n_lora
    cfg.loss.fisher = False
    no_fisher = model_summary(cfg, parts=lparts, phase=len(cfg.train.phases) - 1).memory
    assert m.weights - no_fisher.weights == 4 * n_mm  # the fp32 Fisher diagonal
    # the anchor: held from the phase that unfreezes the module on; from the start when the Fisher is computed
    first = model_summary(cfg, parts=lparts, phase=0).memory
    assert no_fisher.weights - first.weights == 2 * n_mm
    cfg.loss.fisher = True
    assert model_summary(cfg, parts=lparts, phase=0).memory.weights - first.weights == (2 + 4) * n_mm


@pytest.mark.parametrize("base", ["tiny-blip2-opt", "tiny-llava"])
def test_eager_attention_scores_match_autograd(base):
    """Eager attention in bf16 (OPT, Llama): softmax(dtype=float32) saves its fp32 output and P @ V its bf16
    copy, 6 bytes per score; measured with saved-tensor hooks against the formula (within 10%)."""
    from safe_av.models.base_vl import BaseVL
    from safe_av.models.presets import build_tiny_base

    model, proc = build_tiny_base(base)
    model = model.to(torch.bfloat16)
    model.set_attn_implementation("eager")
    bvl = BaseVL(model, proc)
    parts = build_parts(_tiny_cfg(base))
    b, s = 4, 96
    emb = torch.randn(b, s, bvl.hidden_size, requires_grad=True, dtype=torch.bfloat16)
    mask = torch.ones(b, s, dtype=torch.long)

    def step():
        logits = bvl.language_model(emb * 1.0, mask).logits.float()
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long))

    measured = _saved_bytes(step, list(model.parameters()))
    stored, _ = lm_activation_bytes(parts.lm, b, s, dtype_bytes=2, eager=True)
    stored += parts.lm.vocab * s * 4 * b  # log-softmax output saved by cross-entropy
    assert stored == pytest.approx(measured, rel=0.10)
    assert parts.lm.softmax_fp32


def test_quantized_linears_save_their_inputs():
    """bitsandbytes' matmuls save their input when an input needs a gradient: every quantized LM linear (not
    lm_head, not the fp32-kept wo) keeps its input, at e bytes (8-bit) or the model's dtype (4-bit: Linear4bit
    casts to bnb_4bit_compute_dtype, which load_base sets to it); one layer's under checkpointing."""
    from torch import nn

    from safe_av.info import quantized_input_elems

    for base in ("llava-1.5-7b", "blip2-flan-t5-xl"):
        cfg, parts = _dtype_cfg(base, "bfloat16")
        cfg.train.mixed_precision = "bf16"
        cfg.loss.distillation = cfg.loss.retention = False
        lev = {m.lever: m for m in model_summary(cfg, parts=parts).levers}
        b = cfg.train.phases[-1].batch_size
        lm = parts.lm
        seq = parts.num_visual_tokens + cfg.model.num_audio_tokens + 32
        prefix = parts.num_visual_tokens if lm.kind == "decoder" else 0  # frozen prefix: no autograd there
        elems = quantized_input_elems(parts, seq - prefix, 8)
        if lm.kind == "decoder":
            per_tok = sum(m.in_features for n, m in parts.lm_module.named_modules()
                          if isinstance(m, nn.Linear) and not n.endswith("lm_head"))
            assert elems == per_tok * (seq - prefix)
        else:  # the decoder on the 8 answer tokens, its cross-attention k/v on the encoder's, no wo
            assert 0 < elems < sum(m.in_features for m in parts.lm_module.modules() if isinstance(m, nn.Linear)) * seq
        bf16 = lev["bf16"]
        cfg.model.load_in = "8bit"
        q8 = model_summary(cfg, parts=parts).memory
        cfg.model.load_in = "4bit"
        q4 = model_summary(cfg, parts=parts).memory
        assert q8.activations - bf16.activations == pytest.approx(elems * 2 * b)
        assert q4.activations - bf16.activations == pytest.approx(elems * 2 * b)  # bf16 compute dtype
        cfg.model.gradient_checkpointing = True
        gc4 = model_summary(cfg, parts=parts).memory
        cfg.model.load_in = "none"
        gc = model_summary(cfg, parts=parts).memory
        full = quantized_input_elems(parts, seq, 8)  # checkpointing turns the frozen prefix off
        assert gc4.activations == gc.activations
        assert gc4.transient - gc.transient == pytest.approx(full * 2 * b / (lm.layers + lm.decoder_layers))
