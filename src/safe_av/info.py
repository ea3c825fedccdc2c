"""``safe info``: parameter counts, frozen/trainable split and a predicted peak training memory.

Nothing is downloaded. Real checkpoints are built on the ``meta`` device from the architecture files
shipped in :mod:`safe_av.presets` (``model.arch`` / ``model.audio_arch``, or found from the hub name in
``model.base`` / ``model.audio_encoder``); tiny presets are built for real by their CPU builders. SAFE's
own parts (projector, fusion) are built on meta from the dimensions SAFEModel derives them from, and
LoRA is counted from the language model's ``nn.Linear`` modules that peft's name matching would hit.

The memory estimate (formulas in ``docs/memory.md``) is::

    peak = weights + fp32 master copies + gradients + AdamW states + stored activations + backward transient

- weights: every parameter at ``model.dtype``; the model's ``_keep_in_fp32_modules`` (BLIP-2's Q-Former and
  query tokens, FlanT5's ``wo``) are fp32 only in a float16 model, as transformers' dtype plan does. With
  ``model.load_in`` the base model's ``nn.Linear`` weights (not ``lm_head``, never the ``_keep_in_fp32_modules``,
  which transformers adds to bitsandbytes' skip list) take 1 byte + a 4-byte scale per output row (8-bit) or
  0.5 byte + a 4-byte absmax per 64 weights (4-bit). SAFE's projector/fusion are fp32; LoRA follows the layer
  it wraps (the model's dtype; fp32 over a quantized layer). Each unfrozen base parameter also has its anchor
  copy θ* (its own dtype) from the phase that unfreezes it on; with ``loss.fisher`` (the default) every module
  any phase unfreezes has both its anchor and its fp32 Fisher diagonal from the first phase on.
- trainable parameters: gradients and two AdamW states at the parameter's own dtype (SAFE's fp32 parts: 4 + 8
  bytes; an unfrozen base module or LoRA in a bf16 model: 2 + 4 bytes; nothing upcasts them, and there is no
  fp32 master copy - the column stays for the table's format and is 0).
- activations: what autograd saves for one step at the phase's batch size, counted per layer for the
  language-model sequence ``visual + audio + text`` tokens. The LM is frozen but still saves what it needs
  to pass gradients back to the audio tokens (norm inputs, q/k/v/o for SDPA, the FFN activation's inputs;
  eager attention's scores; frozen ``nn.Linear`` layers save nothing, but bitsandbytes' quantized ones save
  their input). Gradient checkpointing keeps only each layer's input, plus one
  layer's activations rematerialised during backward. The frozen vision and audio encoders run without
  gradients and save nothing, unless the phase unfreezes them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from safe_av.config import PhaseConfig, SAFEConfig

GiB = 1024**3
DEFAULT_TEXT_TOKENS = 32
"""Text tokens per sample (question + answer) assumed by the activation estimate."""
DEFAULT_ANSWER_TOKENS = 8
"""Decoder tokens per sample for encoder-decoder LMs (FlanT5): the answer."""

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Elements of size ``ffn_dim`` that the FFN's activation function saves for its backward, per token.
_ACT_SAVED = {"relu": 1, "gelu": 1, "silu": 1, "swish": 1, "quick_gelu": 2, "gelu_new": 4, "gelu_fast": 4,
              "gelu_pytorch_tanh": 1, "gelu_python": 4}


# ----------------------------------------------------------------------------- model parts


@dataclass
class LMShape:
    """The language model's dimensions, read from its config."""

    kind: str
    """``decoder`` or ``encoder-decoder``."""
    hidden: int
    layers: int
    heads: int
    q_dim: int
    kv_dim: int
    ffn: int
    gated: bool
    act: str
    vocab: int
    decoder_layers: int = 0
    norm_fp32: bool = False
    """RMSNorm that upcasts its input to fp32 (Llama, T5): the saved norm input is 4 bytes per element."""
    softmax_fp32: bool = False
    """Eager attention takes the softmax in fp32 and casts it back (OPT, Llama: ``softmax(dtype=float32)
    .to(query.dtype)``): below fp32 it saves the fp32 softmax output (for the softmax's backward) and its cast
    copy (for ``P @ V``), 4 + e bytes per score; T5 saves one e-byte tensor per score. Measured with
    saved-tensor hooks on the tiny models (``test_eager_attention_scores_match_autograd``)."""


@dataclass
class Parts:
    """The modules of a SAFE model, split the way the summary reports them."""

    base_name: str
    audio_name: str
    family: str
    """``blip2-opt``, ``blip2-t5`` or ``llava``."""
    base_model: nn.Module
    components: dict[str, nn.Module]
    """Report row -> module (vision encoder, Q-Former / projector of the base, language model)."""
    unfreezable: dict[str, nn.Module]
    """Names ``phase.unfreeze`` may use -> module (``BaseVL.vision_modules()``)."""
    audio_encoder: nn.Module
    audio_kind: str
    audio_dim: int
    projector: nn.Module
    fusion: nn.Module | None
    lora_params: int
    lora_linears: list[tuple[int, int]]
    """(in, out) of every ``nn.Linear`` LoRA wraps."""
    lm: LMShape
    lm_module: nn.Module
    num_visual_tokens: int
    vision_seq: int
    """Tokens the vision encoder runs on per image."""
    vision_hidden: int
    vision_layers: int
    vision_ffn: int
    keep_fp32: frozenset[int] = frozenset()
    """``id()`` of the base parameters inside the model's ``_keep_in_fp32_modules`` (BLIP-2: Q-Former, query
    tokens; FlanT5: every FFN ``wo``): transformers loads them in fp32 when ``dtype`` is float16 only (its
    ``_get_dtype_plan``; bf16 and fp32 models keep them at the model's dtype), and bitsandbytes never quantizes
    them (``get_modules_to_not_convert`` adds them to the skip list for any dtype)."""
    notes: list[str] = field(default_factory=list)


def _meta_model(cls, config):
    with torch.device("meta"):
        model = cls(config)
    model.tie_weights()
    return model


def _untie_t5_head(lm: nn.Module) -> bool:
    """A T5 checkpoint saved with ``tie_word_embeddings=false`` (FlanT5) stores its own ``lm_head``;
    transformers >= 5 builds it tied and un-ties it while loading. Mirror what loading gives."""
    cfg = lm.config
    if getattr(cfg, "model_type", "") == "t5" and getattr(cfg, "scale_decoder_outputs", True) is False:
        w = lm.lm_head.weight
        lm.lm_head.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device=w.device),
                                         requires_grad=w.requires_grad)
        return True
    return False


def _resolve_arch(explicit: str | None, name: str) -> str | None:
    from safe_av.presets import ARCH_BY_HUB_NAME, available_arches

    if explicit:
        return explicit
    if name in ARCH_BY_HUB_NAME:
        return ARCH_BY_HUB_NAME[name]
    if name in available_arches():
        return name
    return None


def _build_base(cfg: SAFEConfig) -> tuple[nn.Module, str]:
    from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    from safe_av.models.presets import TINY_BASES, build_tiny_base

    m = cfg.model
    if m.base in TINY_BASES:
        model, _ = build_tiny_base(m.base, seed=m.tiny_seed)
        return model, m.base
    arch = _resolve_arch(m.arch, m.base)
    if arch is None:
        raise ValueError(f"model.base={m.base!r}: no architecture file for it; set model.arch to one of the files "
                         "in safe_av/presets (safe info never downloads)")
    from safe_av.presets import load_arch

    config = load_arch(arch)
    classes = {"blip-2": Blip2ForConditionalGeneration, "llava": LlavaForConditionalGeneration}
    if config.model_type not in classes:
        raise ValueError(f"model.arch={arch!r}: model_type {config.model_type!r} is not a base VL model")
    model = _meta_model(classes[config.model_type], config)
    if config.model_type == "blip-2":
        _untie_t5_head(model.language_model)
    return model, arch


def _build_audio(cfg: SAFEConfig) -> tuple[nn.Module, str]:
    from transformers import ClapModel, WhisperModel

    from safe_av.models.presets import TINY_AUDIO, build_tiny_audio

    m = cfg.model
    if m.audio_encoder in TINY_AUDIO:
        model, _ = build_tiny_audio(m.audio_encoder, seed=m.tiny_seed + 1)
        return model, m.audio_encoder
    arch = _resolve_arch(m.audio_arch, m.audio_encoder)
    if arch is None:
        raise ValueError(f"model.audio_encoder={m.audio_encoder!r}: no architecture file for it; set "
                         "model.audio_arch to one of the files in safe_av/presets")
    from safe_av.presets import load_arch

    config = load_arch(arch)
    classes = {"clap": ClapModel, "whisper": WhisperModel}
    if config.model_type not in classes:
        raise ValueError(f"model.audio_arch={arch!r}: model_type {config.model_type!r} is not an audio encoder")
    return _meta_model(classes[config.model_type], config), arch


def _lm_shape(text_cfg) -> LMShape:
    mt = text_cfg.model_type
    if mt == "t5":
        q = text_cfg.num_heads * text_cfg.d_kv
        act = text_cfg.dense_act_fn
        return LMShape("encoder-decoder", text_cfg.d_model, text_cfg.num_layers, text_cfg.num_heads, q, q,
                       text_cfg.d_ff, bool(text_cfg.is_gated_act), act, text_cfg.vocab_size,
                       decoder_layers=text_cfg.num_decoder_layers, norm_fp32=True)
    if mt == "opt":
        d = text_cfg.hidden_size
        return LMShape("decoder", d, text_cfg.num_hidden_layers, text_cfg.num_attention_heads, d, d,
                       text_cfg.ffn_dim, False, text_cfg.activation_function, text_cfg.vocab_size,
                       softmax_fp32=True)
    # llama-like
    d = text_cfg.hidden_size
    heads = text_cfg.num_attention_heads
    head_dim = getattr(text_cfg, "head_dim", None) or d // heads
    kv = (getattr(text_cfg, "num_key_value_heads", None) or heads) * head_dim
    return LMShape("decoder", d, text_cfg.num_hidden_layers, heads, heads * head_dim, kv,
                   text_cfg.intermediate_size, True, getattr(text_cfg, "hidden_act", "silu"), text_cfg.vocab_size,
                   norm_fp32=True, softmax_fp32=True)


def _lora_linears(lm: nn.Module, targets: list[str]) -> list[tuple[int, int]]:
    """(in, out) of the ``nn.Linear`` modules peft's ``target_modules`` name matching selects."""
    out = []
    for name, mod in lm.named_modules():
        if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            out.append((mod.in_features, mod.out_features))
    return out


def build_parts(cfg: SAFEConfig) -> Parts:
    """Build the base VL model, the audio encoder and SAFE's parts without downloading anything."""
    from safe_av.models.fusion import FusionLayer
    from safe_av.models.projector import AudioProjector

    base, base_name = _build_base(cfg)
    audio_model, audio_name = _build_audio(cfg)
    m = cfg.model
    notes: list[str] = []
    if base.config.model_type == "blip-2":
        lm_module = base.language_model
        text_cfg = base.config.text_config
        family = "blip2-opt" if base.config.use_decoder_only_language_model else "blip2-t5"
        qformer = _ModuleGroup(qformer=base.qformer, query_tokens=_ParamHolder(base.query_tokens))
        components = {"vision encoder": base.vision_model, "Q-Former": qformer,
                      "base projector": base.language_projection, "language model": lm_module}
        unfreezable = {"vision_model": base.vision_model, "qformer": base.qformer,
                       "language_projection": base.language_projection}
        vc = base.config.vision_config
        num_visual = base.config.num_query_tokens
        vision_seq = (vc.image_size // vc.patch_size) ** 2 + 1
    else:
        lm_module = _ModuleGroup(language_model=base.model.language_model, lm_head=base.lm_head)
        text_cfg = base.config.text_config
        family = "llava"
        components = {"vision encoder": base.model.vision_tower, "base projector": base.model.multi_modal_projector,
                      "language model": lm_module}
        unfreezable = {"vision_tower": base.model.vision_tower,
                       "multi_modal_projector": base.model.multi_modal_projector}
        vc = base.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        num_visual = n + (1 if base.config.vision_feature_select_strategy == "full" else 0)
        vision_seq = n + 1
    lm = _lm_shape(text_cfg)
    if audio_model.config.model_type == "clap":
        audio_enc, audio_dim = audio_model.audio_model, audio_model.config.audio_config.hidden_size
    else:
        audio_enc, audio_dim = audio_model.get_encoder(), audio_model.config.d_model
    with torch.device("meta"):
        projector = AudioProjector(audio_dim, lm.hidden, hidden_dim=m.projector.hidden_dim,
                                   dropout=m.projector.dropout)
        fusion = (FusionLayer(lm.hidden, num_heads=m.fusion.num_heads, ffn_mult=m.fusion.ffn_mult,
                              dropout=m.fusion.dropout) if m.fusion.enabled else None)
    lora_linears: list[tuple[int, int]] = []
    if m.lora.enabled:
        lora_target = base.language_model if family != "llava" else base.model.language_model
        lora_linears = _lora_linears(lora_target, list(m.lora.target_modules))
        if not lora_linears:
            notes.append(f"model.lora.target_modules={m.lora.target_modules} matches no nn.Linear of the "
                         "language model (peft would refuse it)")
    lora_params = sum(m.lora.r * (i + o) for i, o in lora_linears)
    # transformers' dtype plan matches every name in _keep_in_fp32_modules as a pattern inside parameter names
    keep = [re.compile(k.replace("*", ".*")) for k in (getattr(base, "_keep_in_fp32_modules", None) or ())]
    keep_fp32 = frozenset(id(p) for n, p in base.named_parameters() if any(k.search(n) for k in keep))
    return Parts(base_name=base_name, audio_name=audio_name, family=family, base_model=base,
                 components=components, unfreezable=unfreezable, audio_encoder=audio_enc,
                 audio_kind=audio_model.config.model_type, audio_dim=audio_dim, projector=projector,
                 fusion=fusion, lora_params=lora_params, lora_linears=lora_linears, lm=lm, lm_module=lm_module,
                 num_visual_tokens=num_visual, vision_seq=vision_seq, vision_hidden=vc.hidden_size,
                 vision_layers=vc.num_hidden_layers, vision_ffn=vc.intermediate_size, keep_fp32=keep_fp32,
                 notes=notes)


class _ParamHolder(nn.Module):
    """Wraps a bare parameter (BLIP-2's query tokens) so it can sit in a module group."""

    def __init__(self, p: nn.Parameter):
        super().__init__()
        self.p = p


class _ModuleGroup(nn.Module):
    """Several existing modules seen as one (not registered in the model; parameters are shared)."""

    def __init__(self, **mods: nn.Module):
        super().__init__()
        for k, v in mods.items():
            self.add_module(k, v)


# ----------------------------------------------------------------------------- counting


def _unique_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(module.named_parameters())  # named_parameters de-duplicates tied weights


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for _, p in _unique_params(module))


def _linear_weight_ids(module: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> set[int]:
    ids = set()
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear) and not any(s in name.split(".") for s in skip):
            ids.add(id(mod.weight))
    return ids


def _kept_bytes(dtype: str) -> int:
    """Bytes per element of a ``_keep_in_fp32_modules`` parameter in a model loaded at ``dtype``: fp32 only for
    float16 (transformers' ``_get_dtype_plan``), else the model's dtype."""
    return 4 if dtype == "float16" else _DTYPE_BYTES[dtype]


def _param_bytes(p: nn.Parameter, dtype: str, keep_fp32: frozenset[int] = frozenset()) -> int:
    """Bytes per element of an unquantized base parameter (a trainable one's gradient and AdamW states too)."""
    return _kept_bytes(dtype) if id(p) in keep_fp32 else _DTYPE_BYTES[dtype]


def _lora_bytes(dtype: str, load_in: str) -> int:
    """Bytes per LoRA element: peft moves the adapters to the dtype of the layer they wrap (the model's dtype),
    except over a bitsandbytes layer (an integer weight), where they stay fp32."""
    return 4 if load_in != "none" else _DTYPE_BYTES[dtype]


def _storage_bytes(module: nn.Module, dtype: str, load_in: str, quantize: bool,
                   keep_fp32: frozenset[int] = frozenset()) -> float:
    """Bytes of ``module``'s parameters stored at ``dtype``, with bitsandbytes quantization of its ``nn.Linear``
    weights when ``load_in`` is set and ``quantize`` is True. Parameters in ``keep_fp32`` (the model's
    ``_keep_in_fp32_modules``) are never quantized and are fp32 in a float16 model."""
    lin = _linear_weight_ids(module) if (quantize and load_in != "none") else set()
    total = 0.0
    for _, p in _unique_params(module):
        n = p.numel()
        if id(p) in keep_fp32:
            total += n * _kept_bytes(dtype)
        elif id(p) in lin:
            if load_in == "8bit":
                total += n * 1 + 4 * p.shape[0]
            else:
                total += n * 0.5 + 4 * math.ceil(n / 64)
        else:
            total += n * _DTYPE_BYTES[dtype]
    return total


# ----------------------------------------------------------------------------- summary types


@dataclass
class Row:
    """One component of the model."""

    name: str
    params: int
    trainable: int
    weight_bytes: float


@dataclass
class Memory:
    """Predicted training memory (bytes) for one setting."""

    lever: str
    weights: float
    master: float
    gradients: float
    optimizer: float
    activations: float
    transient: float

    @property
    def peak(self) -> float:
        return self.weights + self.master + self.gradients + self.optimizer + self.activations + self.transient


@dataclass
class Summary:
    base: str
    audio: str
    phase: str
    phase_index: int
    batch_size: int
    visual_tokens: int
    audio_tokens: int
    text_tokens: int
    rows: list[Row]
    memory: Memory
    levers: list[Memory]
    settings: dict
    notes: list[str] = field(default_factory=list)
    teacher_rows: int = 0
    """Rows of a batch the distillation / retention teacher is predicted to run on (in the transient)."""
    teacher_share: float = 0.0
    """The expected share of distilled rows they come from (:func:`teacher_row_share`)."""

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def trainable_params(self) -> int:
        return sum(r.trainable for r in self.rows)

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def base_params(self) -> int:
        """Parameters of the base VL model (vision path + language model)."""
        return sum(r.params for r in self.rows if r.name in ("vision encoder", "Q-Former", "base projector",
                                                              "language model"))


# ----------------------------------------------------------------------------- trainability


@dataclass
class Trainability:
    projector: bool
    fusion: bool
    lora: bool
    unfrozen: list[str]
    teacher_share: float = 0.0
    """Expected share of a batch's rows the teacher runs on (distilled rows), at the phase's curriculum stage
    with the most; see :func:`teacher_row_share`. 0 when no row can be distilled."""
    anchored: list[str] = field(default_factory=list)
    """Base modules holding an anchor copy θ* in this phase (:func:`anchored_modules`)."""
    fisher: list[str] = field(default_factory=list)
    """Base modules whose diagonal Fisher is held (:func:`fisher_modules`)."""
    lora_active: bool = False
    """The LoRA adapters run in this phase (:func:`lora_active`): not before the first phase that trains them."""

    @property
    def teacher(self) -> bool:
        """The phase runs the teacher (distillation / retention) on some rows."""
        return self.teacher_share > 0


AVQA_IMAGE_QUESTION_SHARE = 0.24
"""Share of MUSIC-AVQA questions answerable from the image alone (scenario ``Visual``: Visual/Counting and
Visual/Location), the only AV-QA rows the trainer distils (``training.loop._image_question_meta``).

Taken from our synthetic corpus, which is what the demo and the benches train on:
``synth_scenes.scene_questions`` asks each of the 9 (scenario, type) pairs of MUSIC-AVQA once per video
(a second question with probability 0.25 when the pair has several templates); 2 of the 9 are Visual, and
both always have several templates, so they are 0.240 of all questions (counted over 20,000 scenes: 50,041
of 208,157), not 2/9 = 0.222. The real dataset's per-scenario split could not be checked here (the paper and
project page give it only in figures; not verified); it also has 2 Visual types of 9, so the same order is
expected, not known. Change this constant for a corpus with another mix."""

DATASET_ROWS: dict[str, tuple[bool, float]] = {
    "vqav2": (False, 1.0),  # image, every question image-only, no audio
    "musicavqa": (True, AVQA_IMAGE_QUESTION_SHARE),  # frames + audio; Visual-scenario questions only
    "avsd": (True, 0.0),  # frames + audio, but dialog turns are never image-only questions
    "audiocaps": (True, 0.0),  # captions: audio only, no image
    "clotho": (True, 0.0),
}
"""Dataset -> (its rows carry audio, share of its rows with an image and an image-only question)."""


def _dataset_rows(cfg: SAFEConfig, name: str) -> tuple[bool, float]:
    if name in DATASET_ROWS:
        return DATASET_ROWS[name]
    if name == cfg.data.avqa_dataset:  # a renamed AV-QA corpus in MUSIC-AVQA's format
        return True, AVQA_IMAGE_QUESTION_SHARE
    if name == cfg.data.vqa_dataset:
        return False, 1.0
    return True, 0.0  # unknown: assume audio-bearing rows without image-only questions


def _phases_so_far(cfg: SAFEConfig, phase: PhaseConfig) -> list[PhaseConfig]:
    """``phase`` and the phases before it (``phase`` alone when it is not one of ``cfg.train.phases``)."""
    idx = next((i for i, p in enumerate(cfg.train.phases) if p is phase), 0)  # not among them: no earlier phase
    return [*cfg.train.phases[:idx], phase]


def lora_active(cfg: SAFEConfig, phase: PhaseConfig) -> bool:
    """The LoRA adapters run in ``phase``: they train now or an earlier phase trained them. Before that they are
    frozen with ``lora_B`` zero (peft's initialisation), and ``SAFEModel.sync_lora_active`` switches them off."""
    return cfg.model.lora.enabled and any("lora" in p.train for p in _phases_so_far(cfg, phase))


def fisher_modules(cfg: SAFEConfig) -> list[str]:
    """Base modules whose diagonal Fisher (fp32) the trainer holds for the whole run (``Trainer._setup_fisher``):
    every module any phase unfreezes, with ``loss.fisher`` on and not ``loss.task_only``; else none."""
    lc = cfg.loss
    if not lc.fisher or lc.task_only:
        return []
    return list(dict.fromkeys(m for p in cfg.train.phases if "base" in p.train for m in p.unfreeze))


def anchored_modules(cfg: SAFEConfig, phase: PhaseConfig) -> list[str]:
    """Base modules with an anchor copy θ* (their original weights, ``SAFEModel.set_trainable``) in ``phase``:
    those unfrozen by it or an earlier phase, and all of :func:`fisher_modules` from the start (the Fisher pass
    unfreezes them all once, before the first phase)."""
    names = [m for p in _phases_so_far(cfg, phase) if "base" in p.train for m in p.unfreeze]
    return list(dict.fromkeys(fisher_modules(cfg) + names))


def _base_trains(cfg: SAFEConfig, phase: PhaseConfig) -> bool:
    """What the trainer's ``_distill_rows`` calls ``base_trains``: the phase unfreezes base modules, or the LoRA
    adapters train now or were trained by an earlier phase (they are then no longer the identity)."""
    if "base" in phase.train and phase.unfreeze:
        return True
    return lora_active(cfg, phase)


def teacher_row_share(cfg: SAFEConfig, phase: PhaseConfig) -> float:
    """Expected share of a batch's rows that the teacher runs on in ``phase`` (0 when none can be).

    The trainer distils rows that have an image and an image-only question (VQA v2; MUSIC-AVQA's Visual
    questions, :data:`AVQA_IMAGE_QUESTION_SHARE` of them); while the base does not train, only those that
    also carry audio (a VL-only row is then the teacher exactly). Caption rows are never distilled.

    A batch holds ``round(audio_ratio * B)`` audio-bearing rows and the rest without audio, each part mixing
    its datasets by the phase's ``datasets`` weights (``data.sampling``). The audio ratio is the phase's
    own, or each curriculum stage's in a curriculum phase: the share returned is the largest over the stages
    that run the teacher (the phase's peak). It is an expectation: a batch drawn with more image questions
    than average distils more rows.
    """
    lc = cfg.loss
    if lc.task_only or not (lc.distillation or lc.retention):
        return 0.0
    pools: dict[bool, dict[str, float]] = {True: {}, False: {}}
    for name, w in phase.datasets.items():
        if w > 0:
            pools[_dataset_rows(cfg, name)[0]][name] = w
    base_trains = _base_trains(cfg, phase)

    def pool_share(audio: bool) -> float:
        ws = pools[audio]
        if not ws or not (audio or base_trains):
            return 0.0
        return sum(w * _dataset_rows(cfg, d)[1] for d, w in ws.items()) / sum(ws.values())

    s_audio, s_other = pool_share(True), pool_share(False)
    if phase.curriculum and cfg.curriculum.enabled and cfg.curriculum.stages:
        stages = [(s.audio_ratio, s.beta, s.gamma) for s in cfg.curriculum.stages]
    else:
        stages = [(phase.audio_ratio, lc.beta, lc.gamma)]
    b = phase.batch_size
    best = 0.0
    for ratio, beta, gamma in stages:
        if not ((lc.retention and beta > 0) or (lc.distillation and gamma > 0)):
            continue  # this stage's loss weights switch the teacher off
        # as BatchStream: a phase whose data has only one kind of row fills every slot with it
        ratio = 1.0 if not pools[False] else (0.0 if not pools[True] else ratio)
        n_audio = round(ratio * b)
        best = max(best, (n_audio * s_audio + (b - n_audio) * s_other) / b)
    return best


def teacher_rows(share: float, batch: int) -> int:
    """Rows the teacher runs on in a batch of ``batch``: the expected share rounded up to whole rows."""
    if share <= 0:
        return 0
    return min(batch, max(1, math.ceil(share * batch - 1e-9)))  # (- 1e-9: 0.25 * 16 is 4 rows, not 5)


def phase_trainability(cfg: SAFEConfig, phase: PhaseConfig) -> Trainability:
    unfrozen = list(phase.unfreeze) if "base" in phase.train else []
    return Trainability(projector="projector" in phase.train,
                        fusion="fusion" in phase.train and cfg.model.fusion.enabled,
                        lora="lora" in phase.train and cfg.model.lora.enabled, unfrozen=unfrozen,
                        teacher_share=teacher_row_share(cfg, phase), anchored=anchored_modules(cfg, phase),
                        fisher=fisher_modules(cfg), lora_active=lora_active(cfg, phase))


def _pick_phase(cfg: SAFEConfig, phase: int | None) -> tuple[int, PhaseConfig]:
    phases = cfg.train.phases
    if not phases:
        raise ValueError("train.phases is empty")
    idx = len(phases) - 1 if phase is None else phase
    if not 0 <= idx < len(phases):
        raise ValueError(f"phase={phase}: the config has phases 0..{len(phases) - 1}")
    return idx, phases[idx]


def _unfrozen_modules(parts: Parts, names: list[str]) -> list[nn.Module]:
    mods = []
    for name in names:
        if name in parts.unfreezable:
            mods.append(parts.unfreezable[name])
            continue
        try:
            mods.append(parts.base_model.get_submodule(name))
        except AttributeError:
            raise ValueError(f"unfreeze: {name!r} is not a module of the base model (try one of "
                             f"{', '.join(parts.unfreezable)} or a dotted sub-module name)") from None
    return mods


# ----------------------------------------------------------------------------- activations


def _act_elems_lm_layer(lm: LMShape, seq: int, *, eager: bool, cross_seq: int = 0) -> float:
    """Elements a frozen LM layer saves per sequence so gradients can reach its input."""
    norms = 2 if not cross_seq else 3
    attn = 2 * lm.q_dim + 2 * lm.kv_dim  # q, k, v, o (SDPA backward)
    ffn = _ACT_SAVED.get(lm.act, 1) * lm.ffn + (2 * lm.ffn if lm.gated else 0)
    per_tok = norms * lm.hidden + attn + ffn
    elems = seq * per_tok
    if eager:
        elems += lm.heads * seq * seq
    if cross_seq:  # cross-attention: q, o per decoder token; k, v over the encoder tokens
        elems += seq * 2 * lm.q_dim + cross_seq * 2 * lm.kv_dim
        if eager:
            elems += lm.heads * seq * cross_seq
    return elems


def _act_elems_trainable_block(hidden: int, ffn: int, seq: int, cross_seq: int = 0, cross_dim: int = 0) -> float:
    """A trainable transformer block saves every linear's input too (ViT / Q-Former when unfrozen)."""
    per_tok = 2 * hidden + 4 * hidden + 3 * hidden + 2 * ffn  # norm inputs, qkvo, linear inputs, act in + fc2 in
    elems = seq * per_tok
    if cross_seq:
        elems += seq * 3 * hidden + cross_seq * (cross_dim + 2 * hidden)
    return elems


def lm_activation_bytes(lm: LMShape, batch: int, seq: int, *, dtype_bytes: int, eager: bool = False,
                        answer_tokens: int = DEFAULT_ANSWER_TOKENS, checkpointing: bool = False,
                        lora_inputs_per_token: int = 0) -> tuple[float, float]:
    """Bytes the frozen language model saves for backward (layers + final norm input; not the logits),
    and the extra transient of gradient checkpointing (one layer rematerialised during backward).

    ``seq`` is the decoder-only sequence, or the encoder sequence of an encoder-decoder LM (whose decoder
    runs on ``answer_tokens``). ``lora_inputs_per_token`` adds, summed over all LoRA-wrapped linears of the
    model, the elements each saves per token (its input and its rank-r intermediate).
    """
    if lm.kind == "decoder":
        layers = [(_act_elems_lm_layer(lm, seq, eager=eager), seq)] * lm.layers
        out_seq = seq
    else:
        layers = ([(_act_elems_lm_layer(lm, seq, eager=eager), seq)] * lm.layers
                  + [(_act_elems_lm_layer(lm, answer_tokens, eager=eager, cross_seq=seq), answer_tokens)]
                  * lm.decoder_layers)
        out_seq = answer_tokens
    if lora_inputs_per_token:
        per_layer = lora_inputs_per_token / len(layers)
        layers = [(el + per_layer * sq, sq) for el, sq in layers]
    # an fp32-upcasting RMSNorm saves its input in fp32: count the extra bytes in units of dtype_bytes
    up = (4 - dtype_bytes) / dtype_bytes if (lm.norm_fp32 and dtype_bytes < 4) else 0.0
    n_norms = [2] * lm.layers + [3] * (lm.decoder_layers if lm.kind != "decoder" else 0)
    layers = [(el + up * k * lm.hidden * sq, sq) for (el, sq), k in zip(layers, n_norms)]
    if eager and lm.softmax_fp32 and dtype_bytes < 4:  # the fp32 softmax output besides its cast copy
        layers = [(el + 4 / dtype_bytes * lm.heads * sq * sq, sq) for el, sq in layers]
    if checkpointing:
        stored = sum(lm.hidden * sq for _, sq in layers)
        transient = max(el for el, _ in layers)
    else:
        stored = sum(el for el, _ in layers)
        transient = 0.0
    stored += lm.hidden * out_seq * (1 + up)  # final norm input
    return stored * dtype_bytes * batch, transient * dtype_bytes * batch


@dataclass
class Setting:
    dtype: str
    load_in: str
    gradient_checkpointing: bool
    mixed_precision: str


def frozen_prefix_tokens(cfg: SAFEConfig, tr: Trainability, lm_kind: str, visual_tokens: int, text_tokens: int,
                         answer_tokens: int, *, checkpointing: bool) -> int:
    """How many leading LM positions run without autograd in a phase (``SAFEModel._frozen_prefix``): those
    before the audio tokens - the visual tokens (``after_image``) or the visual tokens and the prompt
    (``before_answer``) - when ``model.frozen_prefix`` is on, the LM is decoder-only, nothing in the base
    trains and there is no gradient checkpointing; else 0. Unpadded rows (a batch's shortest padding)."""
    from safe_av.models.safe_model import frozen_prefix_applies

    if not frozen_prefix_applies(enabled=cfg.model.frozen_prefix, encoder_decoder=lm_kind != "decoder",
                                 checkpointing=checkpointing, base_trains=bool(tr.lora or tr.unfrozen)):
        return 0
    prompt = max(text_tokens - answer_tokens, 0)
    return visual_tokens + (prompt if cfg.model.audio_position == "before_answer" else 0)


def logit_positions(cfg: SAFEConfig, lm_kind: str, seq: int, answer_tokens: int) -> int:
    """Positions the LM head runs on in a training step: a decoder's answer and the position before it with
    ``model.label_logits_only`` (``SAFEModel.logits_start``), else all ``seq``; an encoder-decoder's answer."""
    if lm_kind != "decoder":
        return answer_tokens
    return min(seq, answer_tokens + 1) if cfg.model.label_logits_only else seq


def quantized_input_elems(parts: Parts, seq: int, answer_tokens: int) -> float:
    """Elements per sample that the language model's bitsandbytes linears save for backward: each one's input
    (``in_features`` per position it runs on: ``seq``, or for an encoder-decoder's decoder the answer, its
    cross-attention keys/values the encoder's ``seq``). ``lm_head`` and the ``_keep_in_fp32_modules`` are not
    quantized. An upper bound where several linears read one tensor that is not cast (8-bit: q/k/v, gate/up
    share theirs, saved once); 4-bit casts it once per linear (to the compute dtype), so each keeps its own copy."""
    total = 0.0
    for name, mod in parts.lm_module.named_modules():
        if not isinstance(mod, nn.Linear) or name.split(".")[-1] == "lm_head" or id(mod.weight) in parts.keep_fp32:
            continue
        toks = seq
        if parts.lm.kind != "decoder" and name.startswith("decoder."):
            cross_kv = "EncDecAttention" in name and (name.endswith(".k") or name.endswith(".v"))
            toks = seq if cross_kv else answer_tokens
        total += mod.in_features * toks
    return total


def _activation_bytes(parts: Parts, tr: Trainability, s: Setting, cfg: SAFEConfig, batch: int,
                      text_tokens: int, answer_tokens: int) -> tuple[float, float]:
    """(stored activations, backward transient) in bytes for one training step."""
    e = 2 if (s.dtype != "float32" or s.mixed_precision != "no") else 4
    lm = parts.lm
    k = cfg.model.num_audio_tokens
    v = parts.num_visual_tokens
    eager = cfg.model.attn_implementation == "eager"
    gc = s.gradient_checkpointing
    stored = 0.0
    transient = 0.0
    # language model
    seq = v + k + text_tokens
    out_seq = seq if lm.kind == "decoder" else answer_tokens
    logit_seq = logit_positions(cfg, lm.kind, seq, answer_tokens)
    lora_in = sum(i + cfg.model.lora.r for i, _ in parts.lora_linears) if (tr.lora and parts.lora_linears) else 0
    # the positions before the audio tokens run without autograd; the rest's attention keeps their keys/values
    prefix = frozen_prefix_tokens(cfg, tr, lm.kind, v, text_tokens, answer_tokens, checkpointing=gc)
    lm_stored, lm_transient = lm_activation_bytes(lm, batch, seq - prefix, dtype_bytes=e, eager=eager,
                                                  answer_tokens=answer_tokens, checkpointing=gc,
                                                  lora_inputs_per_token=lora_in)
    stored += lm_stored + lm.layers * 2 * lm.kv_dim * prefix * e * batch
    transient += lm_transient
    if s.load_in != "none":
        # unlike a frozen nn.Linear, a bitsandbytes matmul saves its input whenever an input needs a gradient
        # (MatMul8bitLt: ctx.tensors = (CAt, subA, A); MatMul4Bit: (A, B)), at the compute dtype: 8-bit, the
        # activations' (e); 4-bit, Linear4bit casts its input to bnb_4bit_compute_dtype, which load_base sets to
        # the model's dtype. Checkpointing: one layer's, during its recompute.
        q_bytes = _DTYPE_BYTES[s.dtype] if s.load_in == "4bit" else e
        q_in = quantized_input_elems(parts, seq - prefix, answer_tokens) * q_bytes * batch
        if gc:
            transient += q_in / (lm.layers + lm.decoder_layers)
        else:
            stored += q_in
    rows = teacher_rows(tr.teacher_share, batch)
    if rows:
        # the teacher's no-grad forward runs while the student's activations are held: it keeps every
        # layer's hidden states (output_hidden_states) plus one layer's intermediates and its logits, for
        # the distilled rows only (the expected number of them, see teacher_row_share)
        n_states = lm.layers + 1 if lm.kind == "decoder" else lm.decoder_layers + 1
        teacher = ((n_states * lm.hidden + max(lm.ffn, 3 * lm.hidden)) * out_seq + lm.vocab * logit_seq) * e * rows
        transient = max(transient, teacher)
    # autocast with weights stored in another dtype (fp32 weights + bf16 autocast): every frozen LM matmul
    # runs on a bf16 copy of its weight, and autograd keeps that copy to pass gradients back (2 B/param)
    autocast_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(s.mixed_precision)
    if autocast_dtype and autocast_dtype != s.dtype and s.load_in == "none":
        head = sum(mod.weight.numel() for name, mod in parts.lm_module.named_modules()
                   if isinstance(mod, nn.Linear) and name.split(".")[-1] == "lm_head")
        body = sum(mod.weight.numel() for mod in parts.lm_module.modules() if isinstance(mod, nn.Linear)) - head
        n_layers = lm.layers + lm.decoder_layers
        stored += 2 * (head + (0 if gc else body))
        if gc:
            transient += 2 * body / n_layers
    logit_bytes = e + (4 if e != 4 else 0) + 4  # logits, their fp32 copy, log-softmax output
    stored += lm.vocab * logit_seq * logit_bytes * batch
    transient += lm.vocab * logit_seq * 4 * batch  # gradient of the fp32 logits
    # SAFE parts (fp32 modules; matmul outputs follow autocast)
    h = cfg.model.projector.hidden_dim
    if tr.projector or tr.fusion:
        stored += batch * k * ((parts.audio_dim + 2 * h + lm.hidden) * e + h)  # + dropout mask (1 B)
    if tr.fusion and parts.fusion is not None:
        m = cfg.model.fusion.ffn_mult
        stored += batch * (k * (10 * lm.hidden + 2 * m * lm.hidden) + v * 4 * lm.hidden) * e
    # unfrozen base modules: trainable blocks save every linear input
    for name in tr.unfrozen:
        if name in ("vision_model", "vision_tower"):
            el = _act_elems_trainable_block(parts.vision_hidden, parts.vision_ffn, parts.vision_seq)
            n = parts.vision_layers
            stored += (n * parts.vision_hidden * parts.vision_seq if gc else n * el) * e * batch
            if gc:
                transient = max(transient, el * e * batch)
        elif name == "qformer":
            qc = parts.base_model.config.qformer_config
            q = parts.num_visual_tokens
            total = 0.0
            for i in range(qc.num_hidden_layers):
                cross = parts.vision_seq if i % qc.cross_attention_frequency == 0 else 0
                total += _act_elems_trainable_block(qc.hidden_size, qc.intermediate_size, q, cross,
                                                    qc.encoder_hidden_size)
            stored += total * e * batch
        elif name in ("language_projection", "multi_modal_projector"):
            stored += batch * v * (parts.vision_hidden + 2 * lm.hidden) * e
    return stored, transient


def _memory(parts: Parts, tr: Trainability, s: Setting, cfg: SAFEConfig, batch: int, text_tokens: int,
            answer_tokens: int, lever: str) -> Memory:
    def ids(names: list[str]) -> set[int]:
        return {id(p) for mod in _unfrozen_modules(parts, names) for p in mod.parameters()}

    unfrozen_ids, anchor_ids, fisher_ids = ids(tr.unfrozen), ids(tr.anchored), ids(tr.fisher)
    weights = master = grads = optim = 0.0
    for mod in parts.components.values():
        weights += _storage_bytes(mod, s.dtype, s.load_in, quantize=True, keep_fp32=parts.keep_fp32)
        for _, p in _unique_params(mod):
            n, pb = p.numel(), _param_bytes(p, s.dtype, parts.keep_fp32)
            if id(p) in unfrozen_ids:
                # nothing upcasts a trainable base parameter: its gradient and AdamW's two states
                # (zeros_like(param)) take its own dtype, and there is no fp32 master copy
                grads += pb * n
                optim += 2 * pb * n
            if id(p) in anchor_ids:  # the anchor θ* (p.detach().clone()), held as long as the model
                weights += pb * n
            if id(p) in fisher_ids:  # the diagonal Fisher, fp32
                weights += 4 * n
    # the audio encoder is loaded at model.dtype, never quantized (build_audio_encoder)
    weights += _storage_bytes(parts.audio_encoder, s.dtype, "none", quantize=False)
    safe = [(parts.projector, tr.projector), (parts.fusion, tr.fusion)]
    for mod, trains in safe:
        if mod is None:
            continue
        n = count_params(mod)
        weights += 4 * n
        if trains:
            grads += 4 * n
            optim += 8 * n
    if parts.lora_params:
        lb = _lora_bytes(s.dtype, s.load_in)
        weights += lb * parts.lora_params
        if tr.lora:
            grads += lb * parts.lora_params
            optim += 2 * lb * parts.lora_params
    act, transient = _activation_bytes(parts, tr, s, cfg, batch, text_tokens, answer_tokens)
    return Memory(lever, weights, master, grads, optim, act, transient)


def lever_settings(cfg: SAFEConfig) -> list[tuple[str, Setting]]:
    """The configured setting and each memory lever applied on top of it."""
    m, t = cfg.model, cfg.train
    base = Setting(m.dtype, m.load_in, m.gradient_checkpointing, t.mixed_precision)
    return [
        ("as configured", base),
        ("bf16", replace(base, dtype="bfloat16", mixed_precision="bf16")),
        ("grad checkpointing", replace(base, gradient_checkpointing=True)),
        ("8-bit", replace(base, load_in="8bit")),
        ("4-bit", replace(base, load_in="4bit")),
        ("bf16 + checkpointing", replace(base, dtype="bfloat16", mixed_precision="bf16",
                                         gradient_checkpointing=True)),
        ("4-bit + bf16 + checkpointing", replace(base, dtype="bfloat16", mixed_precision="bf16", load_in="4bit",
                                                 gradient_checkpointing=True)),
    ]


# ----------------------------------------------------------------------------- public API


def model_summary(cfg: SAFEConfig, *, phase: int | None = None, text_tokens: int = DEFAULT_TEXT_TOKENS,
                  answer_tokens: int = DEFAULT_ANSWER_TOKENS, parts: Parts | None = None) -> Summary:
    """Parameters per component (frozen/trainable in ``phase``, default the last) and predicted memory.

    Args:
        cfg: the SAFE config (``model`` names the base and audio encoder; ``train.phases`` the phases).
        phase: index into ``cfg.train.phases``; None = the last phase.
        text_tokens: text tokens per sample (question + answer) in the LM sequence.
        answer_tokens: decoder tokens for encoder-decoder LMs.
        parts: reuse an already built :class:`Parts` (``build_parts(cfg)``).
    """
    idx, ph = _pick_phase(cfg, phase)
    parts = parts or build_parts(cfg)
    tr = phase_trainability(cfg, ph)
    unfrozen_ids = {id(p) for mod in _unfrozen_modules(parts, tr.unfrozen) for p in mod.parameters()}
    dtype = cfg.model.dtype
    rows = []
    for name, mod in parts.components.items():
        params = _unique_params(mod)
        rows.append(Row(name, sum(p.numel() for _, p in params),
                        sum(p.numel() for _, p in params if id(p) in unfrozen_ids),
                        _storage_bytes(mod, dtype, cfg.model.load_in, quantize=True, keep_fp32=parts.keep_fp32)))
    n_audio = count_params(parts.audio_encoder)
    rows.append(Row("audio encoder", n_audio, 0, _storage_bytes(parts.audio_encoder, dtype, "none", False)))
    n_proj = count_params(parts.projector)
    rows.append(Row("SAFE projector", n_proj, n_proj if tr.projector else 0, 4 * n_proj))
    if parts.fusion is not None:
        n_fus = count_params(parts.fusion)
        rows.append(Row("SAFE fusion", n_fus, n_fus if tr.fusion else 0, 4 * n_fus))
    if cfg.model.lora.enabled:
        rows.append(Row("LoRA", parts.lora_params, parts.lora_params if tr.lora else 0,
                        _lora_bytes(dtype, cfg.model.load_in) * parts.lora_params))
    levers = [_memory(parts, tr, s, cfg, ph.batch_size, text_tokens, answer_tokens, name)
              for name, s in lever_settings(cfg)]
    notes = list(parts.notes)
    if ph.unfreeze and "base" not in ph.train:
        notes.append(f"phase {ph.name!r} lists unfreeze={ph.unfreeze} but 'base' is not in train: they stay frozen")
    k = cfg.model.num_audio_tokens
    return Summary(base=parts.base_name, audio=parts.audio_name, phase=ph.name, phase_index=idx,
                   batch_size=ph.batch_size, visual_tokens=parts.num_visual_tokens, audio_tokens=k,
                   text_tokens=text_tokens, rows=rows, memory=levers[0], levers=levers,
                   teacher_rows=teacher_rows(tr.teacher_share, ph.batch_size), teacher_share=tr.teacher_share,
                   settings=dict(dtype=cfg.model.dtype, load_in=cfg.model.load_in,
                                 gradient_checkpointing=cfg.model.gradient_checkpointing,
                                 mixed_precision=cfg.train.mixed_precision,
                                 attn_implementation=cfg.model.attn_implementation,
                                 lm_kind=parts.lm.kind, answer_tokens=answer_tokens),
                   notes=notes)


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f} {unit}" if unit == "B" else f"{n / div:.2f} {unit}"
    return str(int(n))


def _fmt_bytes(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / 2**20:.1f} MiB"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def format_table(summary: Summary) -> str:
    """An aligned text table: parameters per component, then memory for each lever."""
    s = summary
    seq = s.visual_tokens + s.audio_tokens + s.text_tokens
    out = [f"base: {s.base}   audio: {s.audio}   phase {s.phase_index + 1} ({s.phase}), "
           f"batch {s.batch_size}",
           f"LM sequence: {s.visual_tokens} visual + {s.audio_tokens} audio + {s.text_tokens} text = {seq} tokens"
           + (f" (encoder; decoder: {s.settings['answer_tokens']} answer tokens)"
              if s.settings["lm_kind"] == "encoder-decoder" else ""),
           ""]
    rows = [[r.name, _fmt_count(r.params), _fmt_count(r.trainable), _fmt_count(r.params - r.trainable),
             _fmt_bytes(r.weight_bytes)] for r in s.rows]
    rows.append(["total", _fmt_count(s.total_params), _fmt_count(s.trainable_params),
                 _fmt_count(s.total_params - s.trainable_params), _fmt_bytes(sum(r.weight_bytes for r in s.rows))])
    out += _table(["component", "params", "trainable", "frozen", "weights"], rows, {1, 2, 3, 4})
    out.append("")
    st = s.settings
    out.append(f"configured: dtype={st['dtype']} load_in={st['load_in']} "
               f"gradient_checkpointing={st['gradient_checkpointing']} mixed_precision={st['mixed_precision']}")
    mrows = [[m.lever, _fmt_bytes(m.weights), _fmt_bytes(m.master), _fmt_bytes(m.gradients),
              _fmt_bytes(m.optimizer), _fmt_bytes(m.activations), _fmt_bytes(m.transient), _fmt_bytes(m.peak)]
             for m in s.levers]
    out += _table(["setting", "weights", "fp32 master", "grads", "AdamW", "activations", "transient", "PEAK"],
                  mrows, set(range(1, 8)))
    out.append(f"teacher (distillation / retention): {s.teacher_rows} of {s.batch_size} rows per batch "
               f"(expected share {s.teacher_share:.0%} at the phase's busiest stage), in the transient"
               if s.teacher_rows else "teacher (distillation / retention): no distilled rows in this phase")
    out.append("peak = weights + fp32 master + grads + AdamW + activations + backward transient; excludes the CUDA "
               "context (~0.5 GiB) and allocator fragmentation.")
    for n in s.notes:
        out.append(f"note: {n}")
    return "\n".join(out)


def main(cfg: SAFEConfig, *, phase: int | None = None) -> int:
    """``safe info --config FILE``: print the summary of every phase's trainability and FLOPs."""
    from safe_av.flops import format_flops, training_flops_per_step

    parts = build_parts(cfg)
    summary = model_summary(cfg, phase=phase, parts=parts)
    print(format_table(summary))
    print()
    print(format_flops(training_flops_per_step(cfg, phase=phase, parts=parts)))
    return 0
