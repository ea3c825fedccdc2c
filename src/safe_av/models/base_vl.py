"""Adapters over transformers' BLIP-2 and LLaVA: vision path, token embeddings, language model.

SAFE never re-implements these models: it asks them for visual tokens
(``get_image_features``), embeds text with their own embedding table and calls their language
model with ``inputs_embeds`` - exactly what their own ``forward`` does once the image
placeholders are filled, which is why the no-audio path matches the plain model bit for bit.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration


@dataclass
class LMOutput:
    logits: torch.Tensor
    """(B, T, V) - for encoder-decoder models, over the decoder positions."""
    hidden: torch.Tensor
    """(B, T, D) last hidden states at the same positions."""


class BaseVL(nn.Module):
    """A frozen BLIP-2 (OPT or FlanT5) or LLaVA (Llama/Vicuna) model seen through one interface.

    Args:
        model: ``Blip2ForConditionalGeneration`` or ``LlavaForConditionalGeneration``.
        processor: its processor (image processor + tokenizer).
    """

    def __init__(self, model: nn.Module, processor):
        super().__init__()
        self.model = model
        self.processor = processor
        cfg = model.config
        if isinstance(model, Blip2ForConditionalGeneration):
            self.family = "blip2"
            self.is_encoder_decoder = not cfg.use_decoder_only_language_model
            self.num_image_tokens = cfg.num_query_tokens
        elif isinstance(model, LlavaForConditionalGeneration):
            self.family = "llava"
            self.is_encoder_decoder = False
            vc = cfg.vision_config
            n = (vc.image_size // vc.patch_size) ** 2
            self.num_image_tokens = n + (1 if cfg.vision_feature_select_strategy == "full" else 0)
        else:
            raise ValueError(f"base model {type(model).__name__} is not supported "
                             "(Blip2ForConditionalGeneration, LlavaForConditionalGeneration)")
        self.image_token_id = int(cfg.image_token_index)
        self.hidden_size = model.get_input_embeddings().embedding_dim
        self.vocab_size = model.get_output_embeddings().out_features
        self.model.requires_grad_(False)
        disable_dropout(self.model)
        self.model.eval()

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def family_name(self) -> str:
        return "blip2-t5" if self.is_encoder_decoder else ("blip2-opt" if self.family == "blip2" else "llava")

    @property
    def padding_side(self) -> str:
        # decoder-only: left padding, so answers end at the same position; encoder-decoder: right.
        return "right" if self.is_encoder_decoder else "left"

    def train(self, mode: bool = True):
        # Dropout is removed from the frozen base at construction (the teacher and the student must see the
        # same network), so train mode changes only one thing: transformers' gradient checkpointing, which
        # runs only in training mode.
        return super().train(mode)

    def language_model_module(self) -> nn.Module:
        """The language model (decoder / encoder-decoder) inside the VL model: where LoRA goes."""
        return self.model.language_model if self.family == "blip2" else self.model.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        """The image encoder (BLIP-2's ViT, LLaVA's CLIP vision tower); its forward returns ``pooler_output``."""
        return self.model.vision_model if self.family == "blip2" else self.model.model.vision_tower

    def vision_modules(self) -> dict[str, nn.Module]:
        """Named modules of the visual path that phase 3 may unfreeze."""
        if self.family == "blip2":
            return {"vision_model": self.vision_tower, "qformer": self.model.qformer,
                    "language_projection": self.model.language_projection}
        return {"vision_tower": self.vision_tower, "multi_modal_projector": self.model.model.multi_modal_projector}

    @functools.cached_property
    def _cache_keyword(self) -> str:
        """transformers renamed the language model's ``past_key_values`` argument to ``cache`` during 5.x."""
        lm = self.model.language_model if self.family == "blip2" else self.model
        return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    @functools.cached_property
    def _checkpointable(self) -> list[nn.Module]:
        """The modules that carry transformers' ``gradient_checkpointing`` switch (its decoder/encoder layers and
        stacks). Found once: ``PreTrainedModel.is_activation_checkpointing`` walks every module of the model on
        each call, which cost 1.3 ms of a 32 ms demo step (bench/step_overhead.py) when asked once a forward.
        Layers are never added after construction (LoRA replaces only linears inside them)."""
        return [m for m in self.model.modules() if hasattr(m, "gradient_checkpointing")]

    @property
    def checkpointing(self) -> bool:
        """Whether transformers' gradient (activation) checkpointing is on for the model (its own test,
        ``is_activation_checkpointing``, over the modules that can have it)."""
        return any(m.gradient_checkpointing for m in self._checkpointable)

    @property
    def max_positions(self) -> int | None:
        """How many positions the decoder-only language model has (its ``max_position_embeddings``); None for
        encoder-decoder models (relative positions) or when the config does not say."""
        if self.is_encoder_decoder:
            return None
        value = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        return int(value) if value else None

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, D) with the language model's own embedding table."""
        return self.model.get_input_embeddings()(input_ids)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, V, D) visual tokens in the language model's space."""
        if self.family == "blip2":
            return self.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        cfg = self.model.config
        feats = self.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True,
        ).pooler_output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def language_model(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *,
                       labels: torch.Tensor | None = None, frozen_prefix: int = 0,
                       logits_to_keep: int = 0) -> LMOutput:
        """Run the language model on embeddings.

        Args:
            inputs_embeds: (B, L, D); for encoder-decoder models the encoder input.
            attention_mask: (B, L).
            labels: encoder-decoder only: (B, T) decoder targets (the decoder input is them shifted right).
            frozen_prefix: decoder-only: the first ``frozen_prefix`` positions need no gradient (nothing in them
                or before them trains: the caller's promise). They run first without autograd and the rest
                attends to their cached keys/values, so the backward pass never goes through them and their
                activations are not kept: the same outputs (up to float rounding), less work and memory
                (LLaVA's 576 image tokens before the audio, BLIP-2's 32). 0: one plain call.
            logits_to_keep: decoder-only: logits for the last ``logits_to_keep`` positions only (transformers'
                own argument: the LM head never runs on the rest); 0 = all. Hidden states are always complete.
        """
        if self.is_encoder_decoder:
            lm = self.model.language_model
            out = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                     output_hidden_states=True, return_dict=True)
            return LMOutput(logits=out.logits, hidden=out.decoder_hidden_states[-1])
        # Positions from the mask, so a left-padded row sees the same positions as it would unpadded.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        lm = self.model.language_model if self.family == "blip2" else self.model
        length, c, keep = inputs_embeds.shape[1], int(frozen_prefix), int(logits_to_keep)
        keep = 0 if keep >= length else max(keep, 0)
        if c <= 0 or c >= length:
            out = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                     output_hidden_states=True, return_dict=True, logits_to_keep=keep)
            return LMOutput(logits=out.logits, hidden=out.hidden_states[-1])
        rest = length - c
        # logits from the prefix only when the kept window reaches into it (1 = the fewest transformers allows)
        head_keep = 0 if keep == 0 else (keep - rest if keep > rest else 1)
        with torch.no_grad():
            head = lm(inputs_embeds=inputs_embeds[:, :c], attention_mask=attention_mask[:, :c],
                      position_ids=position_ids[:, :c], use_cache=True, output_hidden_states=True, return_dict=True,
                      logits_to_keep=head_keep)
        cache = head.cache if hasattr(head, "cache") else head.past_key_values
        out = lm(inputs_embeds=inputs_embeds[:, c:], attention_mask=attention_mask, position_ids=position_ids[:, c:],
                 use_cache=True, output_hidden_states=True, return_dict=True,
                 logits_to_keep=keep if 0 < keep <= rest else 0, **{self._cache_keyword: cache})
        logits = out.logits if 0 < keep <= rest else torch.cat([head.logits, out.logits], 1)
        return LMOutput(logits=logits, hidden=torch.cat([head.hidden_states[-1], out.hidden_states[-1]], 1))

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """Greedy (by default) generation from embeddings; returns only the new token ids (B, T_new)."""
        kwargs.setdefault("do_sample", False)
        tok = self.tokenizer
        kwargs.setdefault("pad_token_id", tok.pad_token_id)
        kwargs.setdefault("eos_token_id", tok.eos_token_id)
        if self.is_encoder_decoder or self.family == "blip2":
            return self.model.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                                      **kwargs)
        return self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout of a frozen model: ``nn.Dropout`` modules and the float ``*dropout*`` attributes
    that transformers' attention and decoder layers pass to ``F.dropout``."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if ("dropout" in name or name == "layerdrop") and isinstance(value, float):
                setattr(module, name, 0.0)
