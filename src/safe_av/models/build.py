"""Build a SAFEModel from the typed config."""

from __future__ import annotations

from safe_av.config import ModelConfig
from safe_av.models.audio_encoders import AudioEncoder
from safe_av.models.base_vl import BaseVL
from safe_av.models.presets import load_audio_encoder, load_base
from safe_av.models.safe_model import SAFEModel


def build_base(cfg: ModelConfig, *, texts: list[str] | None = None, base: str | None = None) -> BaseVL:
    """The frozen VL model named by ``cfg.base`` (or ``base``: e.g. a pretrained tiny model's folder)."""
    model, processor = load_base(base or cfg.base, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                                 load_in=cfg.load_in, texts=texts, seed=cfg.tiny_seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return BaseVL(model, processor)


def build_audio_encoder(cfg: ModelConfig, *, path: str | None = None) -> AudioEncoder:
    """The frozen audio encoder named by ``cfg.audio_encoder`` (or ``path``: e.g. a pretrained tiny encoder)."""
    model, fe = load_audio_encoder(path or cfg.audio_encoder, dtype=cfg.dtype, seed=cfg.tiny_seed + 1)
    return AudioEncoder(model, fe)


def lora_config(cfg: ModelConfig):
    if not cfg.lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules))


def build_safe_model(cfg: ModelConfig, *, base: BaseVL | None = None, audio_encoder: AudioEncoder | None = None,
                     texts: list[str] | None = None, projector_trainable: bool = True,
                     fusion_trainable: bool = False, unfreeze=()) -> SAFEModel:
    """Compose the model; trainability starts as phase 1 (projector only) unless told otherwise."""
    base = base or build_base(cfg, texts=texts)
    audio_encoder = audio_encoder or build_audio_encoder(cfg)
    return SAFEModel(
        base, audio_encoder, num_audio_tokens=cfg.num_audio_tokens, projector_hidden=cfg.projector.hidden_dim,
        projector_dropout=cfg.projector.dropout, fusion=cfg.fusion.enabled, fusion_heads=cfg.fusion.num_heads,
        fusion_ffn_mult=cfg.fusion.ffn_mult, fusion_dropout=cfg.fusion.dropout, fusion_gate_scale=cfg.fusion.gate_scale,
        audio_position=cfg.audio_position,
        fusion_text=cfg.fusion.attend_text,
        projector_trainable=projector_trainable, fusion_trainable=fusion_trainable and cfg.fusion.enabled,
        unfreeze=unfreeze, lora=lora_config(cfg), frozen_prefix=cfg.frozen_prefix,
    )
