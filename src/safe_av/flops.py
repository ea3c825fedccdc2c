"""Training FLOPs per step from the configs, and model FLOPs utilisation (MFU).

Counting rule (matmul FLOPs; a multiply-add is 2 FLOPs), per token a weight matrix with N elements sees:

==========================  =========  ===============================================================
part                        FLOPs/tok  why
==========================  =========  ===============================================================
frozen, no gradient         2N         forward only (vision encoder, frozen audio encoder: nothing
                                       trainable upstream, so autograd records nothing)
frozen, passes gradients    4N         forward 2N + gradient w.r.t. its input 2N (no weight gradient):
                                       the frozen LM between the audio tokens and the loss
trainable                   6N         forward 2N + input gradient 2N + weight gradient 2N
trainable, input needs none 4N         forward 2N + weight gradient 2N (``weight_grad``: the first layer
                                       of SAFE's projector, fed frozen audio features, and of an unfrozen
                                       base projector behind a frozen vision path)
==========================  =========  ===============================================================

The distillation / retention teacher's no-grad forward is its own row (``teacher forward``, 2N over the
distilled rows); LoRA adapters cost nothing before the first phase that trains them (they are switched off).

Attention adds, per layer and sequence, ``2·2·s_q·s_k·d`` forward (QK^T and AV, full matrices counted,
as PaLM/Chinchilla do); its backward is 2x the forward whenever gradients pass through it (it has no
weights). Gradient checkpointing adds one extra forward (2N and the attention forward) of the checkpointed
layers. Embedding lookups, norms, biases and element-wise ops are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from safe_av.config import SAFEConfig

MODES = ("frozen", "input_grad", "weight_grad", "trainable")
_MULT = {"frozen": 1, "input_grad": 2, "weight_grad": 2, "trainable": 3}  # x 2N per token
"""``weight_grad``: a trainable matrix whose input needs no gradient (the first layer of SAFE's projector,
fed frozen audio features) costs forward + weight gradient = 4N."""

#: Dense peak FLOP/s by device (bf16/fp16 tensor cores, no sparsity). None: not meaningful (CPU).
DEVICE_PEAK_FLOPS: dict[str, float | None] = {
    "H100 SXM": 989e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "CPU": None,
}


def peak_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of a device, from its name (``torch.cuda.get_device_name()``), or None."""
    if not device_name:
        return None
    name = device_name.upper()
    if "H100" in name and "PCIE" in name:
        return 756e12
    for key in ("H200", "H100", "A100"):
        if key in name:
            return DEVICE_PEAK_FLOPS[key]
    return None


def mfu(flops_per_step: float, step_time_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the device's peak (None when the peak is unknown)."""
    if peak is None or peak <= 0 or step_time_s <= 0:
        return None
    return flops_per_step / step_time_s / peak


def matmul_flops(n_params: float, tokens: float, mode: str, *, recompute: bool = False) -> float:
    """FLOPs of weight matrices with ``n_params`` elements applied to ``tokens`` tokens in ``mode``."""
    if mode not in _MULT:
        raise ValueError(f"mode={mode!r}: one of {MODES}")
    f = 2.0 * _MULT[mode] * n_params * tokens
    if recompute and mode != "frozen":
        f += 2.0 * n_params * tokens
    return f


def attention_flops(seq_q: int, seq_k: int, dim: int, *, layers: int = 1, sequences: int = 1,
                    mode: str = "frozen", recompute: bool = False) -> float:
    """QK^T and AV: ``2·2·s_q·s_k·d`` forward per layer and sequence; backward 2x forward unless frozen."""
    fwd = 4.0 * seq_q * seq_k * dim * layers * sequences
    mult = 1 if mode == "frozen" else 3
    return fwd * mult + (fwd if recompute and mode != "frozen" else 0.0)


@dataclass
class FlopsRow:
    name: str
    params: int
    """Matmul weight elements counted (per token)."""
    mode: str
    flops: float


@dataclass
class FlopsReport:
    rows: list[FlopsRow]
    batch_size: int
    phase: str

    @property
    def total(self) -> float:
        return sum(r.flops for r in self.rows)

    def row(self, name: str) -> FlopsRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)


def _linears(module: nn.Module):
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear):
            yield name, mod.weight.numel()


def _convs(module: nn.Module):
    for name, mod in module.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            yield name, mod


def _vision_flops(parts, images: int, mode: str, recompute: bool) -> tuple[int, float]:
    enc = parts.components["vision encoder"]
    t = parts.vision_seq
    n = sum(w for _, w in _linears(enc))
    f = matmul_flops(n, t * images, mode, recompute=recompute)
    for _, conv in _convs(enc):  # patch embedding: one matmul per patch
        patches = t - 1
        f += matmul_flops(conv.weight.numel(), patches * images, mode)
        n += conv.weight.numel()
    f += attention_flops(t, t, parts.vision_hidden, layers=parts.vision_layers, sequences=images, mode=mode,
                         recompute=recompute)
    return n, f


def _qformer_flops(parts, images: int, mode: str) -> tuple[int, float]:
    qf = parts.base_model.qformer
    qc = parts.base_model.config.qformer_config
    q, t = parts.num_visual_tokens, parts.vision_seq
    n_total, f = 0, 0.0
    for name, w in _linears(qf):
        toks = t if ("crossattention" in name and (name.endswith(".key") or name.endswith(".value"))) else q
        f += matmul_flops(w, toks * images, mode)
        n_total += w
    n_cross = len(range(0, qc.num_hidden_layers, qc.cross_attention_frequency))
    f += attention_flops(q, q, qc.hidden_size, layers=qc.num_hidden_layers, sequences=images, mode=mode)
    f += attention_flops(q, t, qc.hidden_size, layers=n_cross, sequences=images, mode=mode)
    return n_total, f


def _audio_flops(parts, clips: int) -> tuple[int, float]:
    enc = parts.audio_encoder
    if parts.audio_kind == "whisper":
        cfg = enc.config
        t = cfg.max_source_positions
        n = sum(w for _, w in _linears(enc))
        f = matmul_flops(n, t * clips, "frozen")
        for name, conv in _convs(enc):
            steps = 2 * t if name.endswith("conv1") else t
            f += matmul_flops(conv.weight.numel(), steps * clips, "frozen")
            n += conv.weight.numel()
        f += attention_flops(t, t, cfg.d_model, layers=cfg.encoder_layers, sequences=clips)
        return n, f
    # CLAP HTSAT (Swin): stage i runs on (spec/patch)^2 / 4^i tokens with windowed attention
    cfg = enc.config
    t0 = (cfg.spec_size // cfg.patch_stride[0] if isinstance(cfg.patch_stride, (list, tuple))
          else cfg.spec_size // cfg.patch_stride) ** 2
    n, f = 0, 0.0
    for name, w in _linears(enc):
        parts_ = name.split(".")
        stage = int(parts_[parts_.index("layers") + 1]) if "layers" in parts_ else 0
        toks = t0 // 4 ** stage
        if "downsample" in parts_:
            toks //= 4
        f += matmul_flops(w, toks * clips, "frozen")
        n += w
    for _, conv in _convs(enc):
        f += matmul_flops(conv.weight.numel(), t0 * clips, "frozen")
        n += conv.weight.numel()
    w2 = cfg.window_size ** 2
    for i, depth in enumerate(cfg.depths):
        dim = cfg.patch_embeds_hidden_size * 2 ** i
        f += attention_flops(w2, w2, dim, layers=depth, sequences=clips * (t0 // 4 ** i) // w2)
    return n, f


def _lm_flops(parts, cfg: SAFEConfig, batch: float, seq: int, answer_tokens: int, lora_trains: bool,
              recompute: bool, prefix: int = 0, *, lora_active: bool = True,
              mode: str = "input_grad") -> tuple[int, float]:
    """``prefix`` (decoder-only): leading positions run without autograd (forward only). ``lora_active``: the
    LoRA adapters run (not before the first phase that trains them, nor in the teacher). ``mode``: input_grad
    (the student, passing gradients back to the audio tokens) or frozen (the teacher's no-grad forward)."""
    from safe_av.info import logit_positions

    lm = parts.lm
    mod = parts.lm_module
    n_total, f = 0, 0.0
    lora_targets = list(cfg.model.lora.target_modules) if (cfg.model.lora.enabled and lora_active) else []
    for name, w in _linears(mod):
        is_head = name.split(".")[-1] == "lm_head"
        toks = seq
        if is_head:
            toks = logit_positions(cfg, lm.kind, seq, answer_tokens)  # never in the frozen prefix
        elif lm.kind != "decoder" and name.startswith("decoder."):
            # the decoder runs on the answer; its cross-attention keys/values on the encoder's tokens
            cross_kv = "EncDecAttention" in name and (name.endswith(".k") or name.endswith(".v"))
            toks = seq if cross_kv else answer_tokens
        elif lm.kind == "decoder" and prefix:
            f += matmul_flops(w, prefix * batch, "frozen")
            toks = seq - prefix
        f += matmul_flops(w, toks * batch, mode, recompute=recompute and not is_head)
        n_total += w
        if lora_targets and any(name == t or name.endswith("." + t) for t in lora_targets):
            in_f, out_f = _shape(mod, name)
            r = cfg.model.lora.r
            f += matmul_flops(r * (in_f + out_f), toks * batch, "trainable" if lora_trains else mode,
                              recompute=recompute)
            if lm.kind == "decoder" and prefix:  # the frozen prefix runs the adapters forward only
                f += matmul_flops(r * (in_f + out_f), prefix * batch, "frozen")
    if lm.kind == "decoder":
        f += attention_flops(prefix, prefix, lm.q_dim, layers=lm.layers, sequences=batch, mode="frozen")
        f += attention_flops(seq - prefix, seq, lm.q_dim, layers=lm.layers, sequences=batch, mode=mode,
                             recompute=recompute)
    else:
        f += attention_flops(seq, seq, lm.q_dim, layers=lm.layers, sequences=batch, mode=mode,
                             recompute=recompute)
        f += attention_flops(answer_tokens, answer_tokens, lm.q_dim, layers=lm.decoder_layers, sequences=batch,
                             mode=mode, recompute=recompute)
        f += attention_flops(answer_tokens, seq, lm.q_dim, layers=lm.decoder_layers, sequences=batch,
                             mode=mode, recompute=recompute)
    return n_total, f


def _shape(module: nn.Module, name: str) -> tuple[int, int]:
    lin = module.get_submodule(name)
    return lin.in_features, lin.out_features


def training_flops_per_step(cfg: SAFEConfig, *, phase: int | None = None, text_tokens: int = 32,
                            answer_tokens: int = 8, prompt_tokens: int | None = None, parts=None,
                            teacher_share: float | None = None) -> FlopsReport:
    """Matmul FLOPs of one optimizer step (batch of the phase, every sample with an image and audio).

    The frozen vision path and audio encoder cost 2N per token (no gradient), unless the phase unfreezes
    part of the vision path (then that part is 6N and the frozen parts after it 4N). The audio encoder
    costs nothing when ``data.feature_cache`` is set (features are read from disk). The LM costs 4N per
    token (it passes gradients back to the audio tokens), SAFE's trainable parts 6N; gradient
    checkpointing (``model.gradient_checkpointing``) adds one forward of the LM layers.

    With ``model.frozen_prefix`` the positions before the audio tokens cost 2N (forward only, see
    ``info.frozen_prefix_tokens``) while nothing in the base trains. With ``model.label_logits_only`` a
    decoder's LM head runs on ``answer_tokens + 1`` positions only.

    The fusion's keys and values cover the visual tokens and (``model.fusion.attend_text``) the prompt's
    ``prompt_tokens`` (default: the text tokens less the answer for decoder-only models, all of them for
    encoder-decoder ones); they need a weight gradient only (the context is frozen).

    An unfrozen base projector fed by a frozen vision path (LLaVA's ``multi_modal_projector``, BLIP-2's
    ``language_projection``) costs 4N in its first layer (no input gradient), 6N after it. LoRA costs nothing
    before the first phase that trains it (``info.lora_active``: frozen with ``lora_B`` zero, the adapters are
    switched off), 6N while it trains and 4N (passing gradients) after.

    The distillation / retention teacher is its own row, ``teacher forward``: a no-grad forward (2N) of the
    LM over the distilled rows, plus the vision path when a module before the LM was ever unfrozen (see
    ``_teacher_flops``). Which rows are distilled depends on each batch's data, not on the config: the row
    count is ``teacher_share`` x the batch, by default the phase's *expected* share
    (``info.teacher_row_share``: the assumed share of image-only questions per dataset, ``info.DATASET_ROWS``
    and ``AVQA_IMAGE_QUESTION_SHARE``, mixed as the sampler mixes rows, at the curriculum stage with the most;
    0 when distillation and retention are off), not rounded to whole rows.
    """
    from safe_av.info import _pick_phase, build_parts, frozen_prefix_tokens, phase_trainability

    idx, ph = _pick_phase(cfg, phase)
    parts = parts or build_parts(cfg)
    tr = phase_trainability(cfg, ph)
    b = ph.batch_size * cfg.train.optim.grad_accum
    k, v = cfg.model.num_audio_tokens, parts.num_visual_tokens
    seq = v + k + text_tokens
    recompute = cfg.model.gradient_checkpointing
    rows: list[FlopsRow] = []

    # vision path, in order; a part is trainable if unfrozen, input_grad if something upstream trains
    order = (["vision_model", "qformer", "language_projection"] if parts.family != "llava"
             else ["vision_tower", "multi_modal_projector"])
    upstream = False
    modes = {}
    for name in order:
        if name in tr.unfrozen:
            modes[name] = "trainable"
            upstream = True
        else:
            modes[name] = "input_grad" if upstream else "frozen"
    vis_name = order[0]
    n, f = _vision_flops(parts, b, modes[vis_name], recompute and modes[vis_name] != "frozen")
    rows.append(FlopsRow("vision encoder", n, modes[vis_name], f))
    if parts.family != "llava":
        n, f = _qformer_flops(parts, b, modes["qformer"])
        rows.append(FlopsRow("Q-Former", n, modes["qformer"], f))
    proj_name = order[-1]
    proj = parts.components["base projector"]
    lins = [w for _, w in _linears(proj)]
    n = sum(lins)
    if modes[proj_name] == "trainable" and not any(modes[m] == "trainable" for m in order[:-1]):
        # unfrozen behind a frozen vision path: its first layer's input needs no gradient (as SAFE's projector)
        f = matmul_flops(lins[0], v * b, "weight_grad") + matmul_flops(sum(lins[1:]), v * b, "trainable")
    else:
        f = matmul_flops(n, v * b, modes[proj_name])
    rows.append(FlopsRow("base projector", n, modes[proj_name], f))
    # audio encoder
    if cfg.data.feature_cache:
        rows.append(FlopsRow("audio encoder", 0, "cached", 0.0))
    else:
        n, f = _audio_flops(parts, b)
        rows.append(FlopsRow("audio encoder", n, "frozen", f))
    # SAFE projector and fusion
    lins = [w for _, w in _linears(parts.projector)]
    if tr.projector:  # the first layer's input (frozen audio features) needs no gradient
        f = matmul_flops(lins[0], k * b, "weight_grad") + matmul_flops(sum(lins[1:]), k * b, "trainable")
    else:
        f = matmul_flops(sum(lins), k * b, "frozen")
    rows.append(FlopsRow("SAFE projector", sum(lins), "trainable" if tr.projector else "frozen", f))
    if parts.fusion is not None:
        d = parts.lm.hidden
        mult = cfg.model.fusion.ffn_mult
        mode = "trainable" if tr.fusion else ("input_grad" if tr.projector else "frozen")
        n_q_side = d * d + d * d + 2 * mult * d * d  # q in-proj, out-proj, FFN (per audio token)
        n_kv = 2 * d * d  # k, v in-proj (per context token)
        if prompt_tokens is None:
            prompt_tokens = text_tokens if parts.lm.kind != "decoder" else max(text_tokens - answer_tokens, 0)
        ctx = v + (prompt_tokens if cfg.model.fusion.attend_text else 0)
        kv_mode = "weight_grad" if tr.fusion else "frozen"  # the context needs no gradient
        f = matmul_flops(n_q_side, k * b, mode) + matmul_flops(n_kv, ctx * b, kv_mode)
        f += attention_flops(k, ctx, d, sequences=b, mode=mode)
        rows.append(FlopsRow("SAFE fusion", n_q_side + n_kv, mode, f))
    prefix = frozen_prefix_tokens(cfg, tr, parts.lm.kind, v, text_tokens, answer_tokens, checkpointing=recompute)
    n, f = _lm_flops(parts, cfg, b, seq, answer_tokens, tr.lora, recompute, min(prefix, seq),
                     lora_active=tr.lora_active)
    rows.append(FlopsRow("language model", n, "input_grad", f))
    # the distillation / retention teacher: a no-grad forward of the original model over the distilled rows
    share = tr.teacher_share if teacher_share is None else teacher_share
    if share > 0:
        n, f = _teacher_flops(parts, cfg, tr, share * b, seq, answer_tokens)
        rows.append(FlopsRow("teacher forward", n, "frozen", f))
    return FlopsReport(rows, b, ph.name)


def _teacher_flops(parts, cfg: SAFEConfig, tr, rows: float, seq: int, answer_tokens: int) -> tuple[int, float]:
    """``SAFEModel.teacher_forward`` on ``rows`` rows: the LM forward only (2N), LoRA adapters disabled, on the
    student's row width ``seq`` (the audio placeholders are dropped and each row re-padded to the same width, so
    their positions still run, as padding); no audio encoder, projector or fusion. The vision path runs again
    (forward only) when a module outside the language model holds an anchor (``vision_path_original()`` is
    False: the student's visual tokens are no longer the original ones); else the student's are reused."""
    from safe_av.info import _unfrozen_modules

    n, f = _lm_flops(parts, cfg, rows, seq, answer_tokens, False, False, lora_active=False, mode="frozen")
    lm_ids = {id(m) for m in parts.lm_module.modules()}
    if any(id(mod) not in lm_ids for mod in _unfrozen_modules(parts, tr.anchored)):
        nv, fv = _vision_flops(parts, rows, "frozen", False)
        n, f = n + nv, f + fv
        if parts.family != "llava":
            nv, fv = _qformer_flops(parts, rows, "frozen")
            n, f = n + nv, f + fv
        nv = sum(w for _, w in _linears(parts.components["base projector"]))
        n, f = n + nv, f + matmul_flops(nv, parts.num_visual_tokens * rows, "frozen")
    return n, f


def format_flops(report: FlopsReport, step_time_s: float | None = None, device: str | None = None) -> str:
    """A small aligned table of FLOPs per step (and MFU for a measured step time on a known device)."""
    lines = [f"training FLOPs per step (phase {report.phase!r}, {report.batch_size} samples):"]
    w = max(len(r.name) for r in report.rows)
    # one unit for the table, the largest that keeps the total >= 1 (a demo step is MFLOPs, a real one TFLOPs)
    scale, unit = next(((s, u) for s, u in ((1e12, "TFLOP"), (1e9, "GFLOP")) if report.total >= s), (1e6, "MFLOP"))
    for r in report.rows:
        lines.append(f"  {r.name.ljust(w)}  {r.mode.ljust(10)}  {r.flops / scale:12.3f} {unit}")
    lines.append(f"  {'total'.ljust(w)}  {''.ljust(10)}  {report.total / scale:12.3f} {unit}")
    peaks = ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in DEVICE_PEAK_FLOPS.items() if v and k != "H100")
    lines.append(f"  MFU = FLOPs per step / step time / device peak (dense bf16: {peaks})")
    if step_time_s is not None:
        u = mfu(report.total, step_time_s, peak_flops(device))
        lines.append(f"  at {step_time_s:.3f} s/step on {device}: MFU = " + ("n/a" if u is None else f"{u:.1%}"))
    return "\n".join(lines)
