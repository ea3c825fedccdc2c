"""FLOPs formulas checked against torch's own FlopCounterMode on tiny modules; MFU arithmetic."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from safe_av.config import SAFEConfig
from safe_av.flops import (DEVICE_PEAK_FLOPS, FlopsReport, FlopsRow, attention_flops, format_flops, matmul_flops,
                           mfu, peak_flops, training_flops_per_step)


def _count(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _mlp(sizes, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def test_all_trainable_matches_flop_counter_exactly():
    net = _mlp([32, 64, 48, 16])
    x = torch.randn(4, 5, 32, requires_grad=True)
    tokens = 4 * 5
    n = sum(m.weight.numel() for m in net if isinstance(m, nn.Linear))
    assert n == 32 * 64 + 64 * 48 + 48 * 16
    out = {}
    fwd = _count(lambda: out.setdefault("y", net(x)))
    bwd = _count(lambda: out["y"].sum().backward())
    assert fwd == matmul_flops(n, tokens, "frozen") == 2 * n * tokens
    assert fwd + bwd == matmul_flops(n, tokens, "trainable") == 6 * n * tokens


def test_frozen_and_trainable_split_4n_6n():
    # input needs no grad -> L1 frozen (2N); L2 trains but its input needs no grad (4N: weight grad only);
    # L3 frozen between trainable L2 and the loss (4N: input grad only); L4 trains and passes grad (6N).
    net = _mlp([24, 40, 36, 28, 12])
    lins = [m for m in net if isinstance(m, nn.Linear)]
    lins[0].requires_grad_(False)
    lins[2].requires_grad_(False)
    x = torch.randn(3, 7, 24)
    tokens = 21
    out = {}
    total = _count(lambda: out.setdefault("y", net(x))) + _count(lambda: out["y"].sum().backward())
    n = [m.weight.numel() for m in lins]
    expected = (matmul_flops(n[0], tokens, "frozen") + matmul_flops(n[1], tokens, "weight_grad")
                + matmul_flops(n[2], tokens, "input_grad") + matmul_flops(n[3], tokens, "trainable"))
    assert total == expected == tokens * (2 * n[0] + 4 * n[1] + 4 * n[2] + 6 * n[3])


def test_frozen_stack_passing_gradient_is_4n():
    net = _mlp([16, 32, 16])
    net.requires_grad_(False)
    x = torch.randn(6, 16, requires_grad=True)  # like the audio tokens entering the frozen LM
    n = 16 * 32 + 32 * 16
    out = {}
    total = _count(lambda: out.setdefault("y", net(x))) + _count(lambda: out["y"].sum().backward())
    assert total == matmul_flops(n, 6, "input_grad") == 4 * n * 6


def test_attention_term_matches_flop_counter():
    b, h, s, t, d = 2, 3, 5, 7, 8
    q = torch.randn(b, h, s, d, requires_grad=True)
    k = torch.randn(b, h, t, d, requires_grad=True)
    v = torch.randn(b, h, t, d, requires_grad=True)
    out = {}
    fwd = _count(lambda: out.setdefault("o", torch.softmax(q @ k.transpose(-1, -2), -1) @ v))
    bwd = _count(lambda: out["o"].sum().backward())
    assert fwd == attention_flops(s, t, h * d, sequences=b, mode="frozen")
    assert fwd + bwd == attention_flops(s, t, h * d, sequences=b, mode="input_grad")


def test_recompute_adds_one_forward():
    assert matmul_flops(10, 3, "input_grad", recompute=True) - matmul_flops(10, 3, "input_grad") == 2 * 10 * 3
    assert attention_flops(4, 4, 8, mode="trainable", recompute=True) == 4 * attention_flops(4, 4, 8)
    with pytest.raises(ValueError):
        matmul_flops(1, 1, "nope")


def test_mfu_and_device_peaks():
    assert DEVICE_PEAK_FLOPS["H100 SXM"] == 989e12 and DEVICE_PEAK_FLOPS["A100"] == 312e12
    assert DEVICE_PEAK_FLOPS["H200"] == 989e12 and DEVICE_PEAK_FLOPS["CPU"] is None
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None and peak_flops(None) is None
    assert mfu(989e12, 2.0, 989e12) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, None) is None


def test_format_flops_picks_a_readable_unit():
    def table(*flops):
        rows = [FlopsRow(name=f"part{i}", params=0, mode="frozen", flops=f) for i, f in enumerate(flops)]
        return format_flops(FlopsReport(phase="p", batch_size=2, rows=rows)).splitlines()

    demo = table(38e6, 1.96e9)  # a demo step: GFLOPs, not "0.002 TFLOP"
    assert demo[1].split()[-2:] == ["0.038", "GFLOP"] and demo[3].split()[-2:] == ["1.998", "GFLOP"]
    real = table(5e11, 74.6e12)
    assert real[1].split()[-2:] == ["0.500", "TFLOP"] and real[3].split()[-2:] == ["75.100", "TFLOP"]
    assert table(2e5, 3e5)[3].split()[-2:] == ["0.500", "MFLOP"]


def _tiny_cfg(**model):
    cfg = SAFEConfig()
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.model.projector.hidden_dim = 64
    return cfg


def test_training_flops_tiny_rows_follow_the_formula():
    cfg = _tiny_cfg(base="tiny-blip2-opt", audio_encoder="tiny-whisper")
    rep = training_flops_per_step(cfg, phase=0)
    from safe_av.info import build_parts

    parts = build_parts(cfg)
    b = cfg.train.phases[0].batch_size
    seq = parts.num_visual_tokens + cfg.model.num_audio_tokens + 32
    lm = rep.row("language model")
    n_lm = sum(m.weight.numel() for m in parts.lm_module.modules() if isinstance(m, nn.Linear))
    assert lm.params == n_lm and lm.mode == "input_grad"
    # nothing in the base trains: the V image positions before the audio run forward only (frozen prefix);
    # the LM head runs on the answer's 8 positions + 1 only (label_logits_only)
    v, qd, layers = parts.num_visual_tokens, parts.lm.q_dim, parts.lm.layers
    head = parts.lm.vocab * parts.lm.hidden
    body = n_lm - head
    assert lm.flops == (2 * body * v * b + 4 * body * (seq - v) * b + 4 * head * 9 * b + 4 * v * v * qd * layers * b
                        + 3 * 4 * (seq - v) * seq * qd * layers * b)
    cfg.model.frozen_prefix = cfg.model.label_logits_only = False
    lm = training_flops_per_step(cfg, phase=0, parts=parts).row("language model")
    assert lm.flops == 4 * n_lm * seq * b + 3 * 4 * seq * seq * qd * layers * b
    proj = rep.row("SAFE projector")
    lin = [m.weight.numel() for m in parts.projector.modules() if isinstance(m, nn.Linear)]
    assert proj.flops == (4 * lin[0] + 6 * lin[1]) * cfg.model.num_audio_tokens * b
    # vision and audio encoders are frozen with nothing trainable upstream: forward only
    assert rep.row("vision encoder").mode == "frozen" and rep.row("audio encoder").mode == "frozen"
    assert rep.total == pytest.approx(sum(r.flops for r in rep.rows))
    # cached audio features: no encoder FLOPs; checkpointing adds one LM forward
    cfg.data.feature_cache = "runs/cache/audio"
    cfg.model.gradient_checkpointing = True
    rep2 = training_flops_per_step(cfg, phase=0, parts=parts)
    assert rep2.row("audio encoder").flops == 0
    head = parts.lm.vocab * parts.lm.hidden  # lm_head is not checkpointed
    extra = 2 * (n_lm - head) * seq * b + 4 * seq * seq * parts.lm.q_dim * parts.lm.layers * b
    assert rep2.row("language model").flops - lm.flops == extra


def test_unfrozen_qformer_makes_downstream_pass_gradients():
    cfg = _tiny_cfg(base="tiny-blip2-opt")
    cfg.train.phases[-1].train = ["projector", "fusion", "base"]
    cfg.train.phases[-1].unfreeze = ["qformer"]
    rep = training_flops_per_step(cfg)
    assert rep.row("vision encoder").mode == "frozen"
    assert rep.row("Q-Former").mode == "trainable"
    assert rep.row("base projector").mode == "input_grad"


def test_real_preset_vision_flops_blip2():
    cfg = SAFEConfig()
    cfg.model.base, cfg.model.audio_encoder = "blip2-opt-2.7b", "clap-htsat-unfused"
    rep = training_flops_per_step(cfg, phase=0)
    b = cfg.train.phases[0].batch_size
    vis = rep.row("vision encoder")
    # ViT-g/14 at 224: 257 tokens; ~0.985e9 matmul weights -> 2 N t per image, + attention
    assert vis.params == pytest.approx(0.985e9, rel=0.01)
    assert vis.flops == pytest.approx(2 * vis.params * 257 * b, rel=0.05)
    lm = rep.row("language model")  # the 32 query tokens before the audio: forward only (frozen prefix)
    assert lm.flops == pytest.approx(4 * 2.65e9 * (8 + 32) * b + 2 * 2.65e9 * 32 * b, rel=0.05)


def test_fusion_row_counts_the_visual_and_prompt_context_with_weight_gradients_only():
    cfg = _tiny_cfg(base="tiny-blip2-opt", audio_encoder="tiny-clap")
    from safe_av.info import build_parts

    parts = build_parts(cfg)
    d, k, v = parts.lm.hidden, cfg.model.num_audio_tokens, parts.num_visual_tokens
    idx = next(i for i, p in enumerate(cfg.train.phases) if "fusion" in p.train and "projector" in p.train)
    b = cfg.train.phases[idx].batch_size
    n_q = 2 * d * d + 2 * cfg.model.fusion.ffn_mult * d * d
    row = training_flops_per_step(cfg, phase=idx, parts=parts, text_tokens=20, answer_tokens=6).row("SAFE fusion")
    ctx = v + 14  # the prompt: text less the answer (decoder-only)
    assert row.flops == 6 * n_q * k * b + 4 * (2 * d * d) * ctx * b + 3 * 4 * k * ctx * d * b
    explicit = training_flops_per_step(cfg, phase=idx, parts=parts, prompt_tokens=3).row("SAFE fusion")
    assert explicit.flops == 6 * n_q * k * b + 4 * (2 * d * d) * (v + 3) * b + 3 * 4 * k * (v + 3) * d * b
    cfg.model.fusion.attend_text = False  # visual tokens only
    vis_only = training_flops_per_step(cfg, phase=idx, parts=parts).row("SAFE fusion")
    assert vis_only.flops == 6 * n_q * k * b + 4 * (2 * d * d) * v * b + 3 * 4 * k * v * d * b


@pytest.mark.parametrize("base,module", [("tiny-llava", "multi_modal_projector"),
                                         ("tiny-blip2-opt", "language_projection")])
def test_unfrozen_base_projector_behind_a_frozen_vision_path_has_no_input_gradient(base, module):
    """Its input (the frozen vision path's output) needs no gradient: the first layer costs forward + weight
    gradient (4N), later ones 6N - counted by FlopCounterMode on the real module."""
    from safe_av.info import build_parts

    cfg = _tiny_cfg(base=base)
    cfg.train.phases[-1].train = ["projector", "fusion", "base"]
    cfg.train.phases[-1].unfreeze = [module]
    parts = build_parts(cfg)
    rep = training_flops_per_step(cfg, parts=parts)
    row = rep.row("base projector")
    proj = parts.unfreezable[module]
    proj.requires_grad_(True)
    first = next(m for m in proj.modules() if isinstance(m, nn.Linear))
    x = torch.randn(rep.batch_size, parts.num_visual_tokens, first.in_features)  # frozen features: no grad
    out = {}
    measured = _count(lambda: out.setdefault("y", proj(x))) + _count(lambda: out["y"].sum().backward())
    assert row.flops == measured
    lins = [m.weight.numel() for m in proj.modules() if isinstance(m, nn.Linear)]
    tokens = parts.num_visual_tokens * rep.batch_size
    assert row.flops == (4 * lins[0] + 6 * sum(lins[1:])) * tokens


def test_lora_costs_nothing_before_the_first_phase_that_trains_it():
    """Frozen with lora_B zero, the adapters are switched off (SAFEModel.sync_lora_active): no FLOPs before the
    first phase that trains them; 6N while they train, 4N (passing gradients) in a later frozen phase, 2N on
    the frozen prefix's positions."""
    from safe_av.info import build_parts

    cfg = _tiny_cfg(base="tiny-blip2-opt")
    cfg.model.lora.enabled = True
    cfg.loss.distillation = cfg.loss.retention = False
    phases = cfg.train.phases
    phases[1].train = ["projector", "fusion", "lora"]
    phases[1].lr["lora"] = 1e-4
    parts = build_parts(cfg)
    plain = build_parts(_tiny_cfg(base="tiny-blip2-opt"))
    n, v = parts.lora_params, parts.num_visual_tokens
    seq = v + cfg.model.num_audio_tokens + 32
    b = [p.batch_size for p in phases]

    def lora_flops(i):
        on = training_flops_per_step(cfg, phase=i, parts=parts).row("language model").flops
        cfg.model.lora.enabled = False
        off = training_flops_per_step(cfg, phase=i, parts=plain).row("language model").flops
        cfg.model.lora.enabled = True
        return on - off

    assert n > 0 and lora_flops(0) == 0
    # phase 2 keeps the frozen prefix (LoRA frozen): the image positions run LoRA forward only
    assert lora_flops(2) == 4 * n * (seq - v) * b[2] + 2 * n * v * b[2]
    cfg.model.frozen_prefix = False
    assert [lora_flops(i) for i in range(3)] == [0, 6 * n * seq * b[1], 4 * n * seq * b[2]]


def test_teacher_forward_is_its_own_row():
    """Distillation / retention run a no-grad forward (2N) of the original LM over the distilled rows (the
    phase's expected share of the batch), at the student's row width, LoRA off; the vision path runs again when a
    module before the LM holds an anchor. Other rows keep their meaning."""
    from safe_av.config import load_config
    from safe_av.info import build_parts, phase_trainability

    cfg = load_config("configs/demo.yaml", ["train.pretrain.enabled=false"])
    parts = build_parts(cfg)
    lm = parts.lm
    seq = parts.num_visual_tokens + cfg.model.num_audio_tokens + 32
    n_lm = sum(m.weight.numel() for m in parts.lm_module.modules() if isinstance(m, nn.Linear))
    head = lm.vocab * lm.hidden
    for i, ph in enumerate(cfg.train.phases):
        rep = training_flops_per_step(cfg, phase=i, parts=parts)
        share = phase_trainability(cfg, ph).teacher_share
        if share == 0:
            assert "teacher forward" not in [r.name for r in rep.rows]
            continue
        rows = share * ph.batch_size
        t = rep.row("teacher forward")
        assert t.mode == "frozen"
        lm_fwd = (2 * (n_lm - head) * seq + 2 * head * 9 + 4 * seq * seq * lm.q_dim * lm.layers) * rows
        # demo: phase 3 unfreezes the language projection, and the Fisher pass anchors it from the start:
        # the teacher re-runs the vision path (vision encoder, Q-Former, projector) in every phase
        vis = sum(r.flops for r in training_flops_per_step(cfg, phase=0, parts=parts).rows
                  if r.name in ("vision encoder", "Q-Former", "base projector")) / cfg.train.phases[0].batch_size
        assert t.flops == pytest.approx(lm_fwd + vis * rows)
        cfg.loss.fisher = False
        no_fisher = training_flops_per_step(cfg, phase=i, parts=parts).row("teacher forward").flops
        cfg.loss.fisher = True
        # without the Fisher pass the projector is anchored from phase 3 only
        assert no_fisher == pytest.approx(lm_fwd + (vis * rows if i == 2 else 0))
        cfg.loss.distillation = cfg.loss.retention = False
        off = training_flops_per_step(cfg, phase=i, parts=parts)
        cfg.loss.distillation = cfg.loss.retention = True
        assert [r.name for r in off.rows] == [r.name for r in rep.rows][:-1]
        assert rep.total - off.total == pytest.approx(t.flops)
    # an explicit share overrides the expected one
    fixed = training_flops_per_step(cfg, phase=2, parts=parts, teacher_share=0.5).row("teacher forward")
    assert fixed.flops == pytest.approx(training_flops_per_step(cfg, phase=2, parts=parts, teacher_share=0.25)
                                        .row("teacher forward").flops * 2)
