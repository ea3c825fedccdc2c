"""SAFEModel: a frozen VL model + a frozen audio encoder + the small trainable audio adapter.

Per sample the language-model input is ``[visual tokens][audio tokens][text tokens]``. The
tokenizer carries ``<image>`` and ``<audio>`` placeholders (expanded to V and K copies by
:class:`safe_av.data.text.SAFEProcessor`); this module fills them with visual tokens from the
base model's own vision path and with projected (and fused) audio tokens. A sample without
audio has no ``<audio>`` placeholders, so its input is exactly the base model's own - and so is its answer
while nothing inside the base trains (phases with LoRA or an unfrozen base module change it; ``OriginalModel`` /
``original_weights`` give the base's own answers then).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from safe_av.models.audio_encoders import AudioEncoder, masked_pool
from safe_av.models.base_vl import BaseVL
from safe_av.models.fusion import FusionLayer, fold_context_norm
from safe_av.models.presets import AUDIO_TOKEN
from safe_av.models.projector import AudioProjector

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class SAFEOutput:
    loss: torch.Tensor | None
    """Mean token cross-entropy over the answer tokens (None without labels)."""
    logits: torch.Tensor
    """(B, T, V) logits over the language model's (decoder) positions."""
    hidden: torch.Tensor
    """(B, T, D) last hidden states at the same positions."""
    token_logits: torch.Tensor | None = None
    """(B, T', V) logits aligned with ``token_labels`` (shifted for decoder-only models)."""
    token_labels: torch.Tensor | None = None
    """(B, T') targets, -100 where no loss is taken."""
    token_hidden: torch.Tensor | None = None
    """(B, T', D) hidden states aligned with ``token_labels``."""
    visual_tokens: torch.Tensor | None = None
    """(N_img, V, D) visual tokens from the base's vision path."""
    attention: torch.Tensor | None = None
    """(N_audio, K, V) fusion attention weights, when requested."""


class SAFEModel(nn.Module):
    """Composition of a :class:`BaseVL`, an :class:`AudioEncoder`, an :class:`AudioProjector` and an
    optional :class:`FusionLayer`. Trainability is set by keyword flags, never by subclassing.

    Args:
        base: the frozen VL model.
        audio_encoder: the frozen audio encoder.
        num_audio_tokens: K, audio tokens per clip.
        projector_hidden: projector MLP width.
        projector_dropout: projector dropout.
        fusion: build the fusion layer (False: the "simple concatenation" baseline).
        fusion_heads, fusion_ffn_mult, fusion_dropout: fusion layer shape.
        fusion_text: the fusion context holds the prompt's embeddings besides the visual tokens.
        projector_trainable, fusion_trainable: whether these train now.
        unfreeze: names of base sub-modules to train (e.g. ``qformer``, ``multi_modal_projector``).
        lora: a ``peft.LoraConfig`` to inject LoRA adapters into the language model (trainable).
        frozen_prefix: allow the language model to run the positions before the audio tokens without
            autograd while nothing in the base trains (see :meth:`_frozen_prefix`); a run-time choice, not
            saved with the adapter.
    """

    def __init__(self, base: BaseVL, audio_encoder: AudioEncoder, *, num_audio_tokens: int = 8,
                 projector_hidden: int = 4096, projector_dropout: float = 0.1, fusion: bool = True,
                 fusion_heads: int = 8, fusion_ffn_mult: int = 4, fusion_dropout: float = 0.1,
                 fusion_gate_scale: float = 1.0, audio_position: str = "after_image",
                 fusion_text: bool = True, projector_trainable: bool = True, fusion_trainable: bool = True,
                 unfreeze: list[str] | tuple[str, ...] = (), lora=None, frozen_prefix: bool = True):
        super().__init__()
        self.base = base
        self.audio_encoder = audio_encoder
        self.num_audio_tokens = num_audio_tokens
        self.audio_token_id = self._register_audio_token(base.tokenizer)
        with torch.no_grad():
            emb = base.model.get_input_embeddings().weight
            emb_rms = float(emb.float().pow(2).mean().sqrt())
        self.projector = AudioProjector(audio_encoder.output_dim, base.hidden_size, hidden_dim=projector_hidden,
                                        dropout=projector_dropout, output_scale=emb_rms)
        self.fusion = (FusionLayer(base.hidden_size, num_heads=fusion_heads, ffn_mult=fusion_ffn_mult,
                                   dropout=fusion_dropout, gate_scale=fusion_gate_scale) if fusion else None)
        self.fusion_text = fusion_text
        self.lora_config = lora
        if lora is not None:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(lora, self.base.language_model_module())
        self._arch = dict(num_audio_tokens=num_audio_tokens, projector_hidden=projector_hidden,
                          projector_dropout=projector_dropout, fusion=fusion, fusion_heads=fusion_heads,
                          fusion_ffn_mult=fusion_ffn_mult, fusion_dropout=fusion_dropout, fusion_text=fusion_text,
                          fusion_gate_scale=fusion_gate_scale, audio_position=audio_position)
        if audio_position not in ("after_image", "before_answer"):
            raise ValueError(f"audio_position={audio_position!r}: use 'after_image' or 'before_answer'")
        self.audio_position = audio_position
        self.frozen_prefix = frozen_prefix
        self.anchors: dict[str, torch.Tensor] = {}
        self.set_trainable(projector=projector_trainable, fusion=fusion_trainable, unfreeze=unfreeze,
                           lora=lora is not None)

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _register_audio_token(tokenizer) -> int:
        if AUDIO_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([AUDIO_TOKEN], special_tokens=True)
        return int(tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))

    def _base_module(self, name: str) -> nn.Module:
        named = self.base.vision_modules()
        if name in named:
            return named[name]
        try:
            return self.base.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"unfreeze: {name!r} is not a module of the base model (try one of "
                             f"{', '.join(named)} or a dotted sub-module name)") from None

    def set_trainable(self, *, projector: bool, fusion: bool, unfreeze=(), lora: bool = False) -> None:
        """Set ``requires_grad`` by composition: only the named parts train.

        Unfrozen base modules get an anchor copy of their current weights (θ*), used by EWC and to
        call the teacher with the original weights.
        """
        self.requires_grad_(False)
        self.projector.requires_grad_(projector)
        if self.fusion is not None:
            self.fusion.requires_grad_(fusion)
        elif fusion:
            raise ValueError("fusion_trainable=True but the model was built without a fusion layer")
        self.unfrozen = list(unfreeze)
        self.base_trains = bool(self.unfrozen) or lora  # anything inside the base model (see _frozen_prefix)
        self.unfrozen_ever = list(dict.fromkeys(getattr(self, "unfrozen_ever", []) + self.unfrozen))
        for name in self.unfrozen:
            module = self._base_module(name)
            module.requires_grad_(True)
            prefix = self._qualified(module)
            for pname, p in module.named_parameters():
                key = f"{prefix}.{pname}"
                if key not in self.anchors:
                    self.anchors[key] = p.detach().clone()
        if lora:
            for name, p in self.base.language_model_module().named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)
        self.sync_lora_active()

    def _lora_layers(self) -> list:
        if self.lora_config is None:
            return []
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.modules() if isinstance(m, BaseTunerLayer)]

    @torch.no_grad()
    def sync_lora_active(self) -> bool:
        """Switch the LoRA layers off while they are exactly the identity: frozen, with every ``lora_B`` zero
        (peft's initialisation), as before the phase that trains them. Saves their matmuls and dropout in
        every earlier step at no change in output; call again after loading weights. Returns the state."""
        layers = self._lora_layers()
        if not layers:
            self.lora_active = False
            return False
        lora = [(n, p) for n, p in self.base.language_model_module().named_parameters() if "lora_" in n]
        active = any(p.requires_grad for _, p in lora) or any(bool(p.any()) for n, p in lora if "lora_B" in n)
        _enable_adapters(layers, active)
        self.lora_active = active
        return active

    def _apply(self, fn, recurse: bool = True):
        # anchors (θ*) are plain tensors, not parameters: move/cast them with the module
        super()._apply(fn, recurse)
        self.anchors = {k: fn(v) for k, v in self.anchors.items()}
        return self

    def _qualified(self, module: nn.Module) -> str:
        for name, m in self.named_modules():
            if m is module:
                return name
        raise ValueError("module is not part of this model")

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter for everything that trains now."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def parameter_groups(self) -> dict[str, list[str]]:
        """Trainable parameter names by part: projector, fusion, base, lora."""
        groups: dict[str, list[str]] = {"projector": [], "fusion": [], "base": [], "lora": []}
        for n in self.trainable_parameters():
            part = ("projector" if n.startswith("projector.") else "fusion" if n.startswith("fusion.")
                    else "lora" if "lora_" in n else "base")
            groups[part].append(n)
        return groups

    # ------------------------------------------------------------------ audio

    def encode_audio(self, audio: torch.Tensor, audio_valid_frac: torch.Tensor) -> torch.Tensor:
        """Frozen encoder + masked pooling: (N, ...) features -> (N, K, D_audio). No gradient."""
        out = self.audio_encoder(audio, audio_valid_frac)
        return masked_pool(out.tokens, out.mask, self.num_audio_tokens).float()

    def audio_tokens(self, audio_features: torch.Tensor, context: torch.Tensor | None,
                     context_mask: torch.Tensor | None, *, need_weights: bool = False):
        """Projector (+ fusion with the sample's context): (N, K, D_audio) -> (N, K, D_lm)."""
        tokens = self.projector(audio_features)
        weights = None
        if self.fusion is not None and context is not None:
            fused = self.fusion(tokens, context, context_mask, need_weights=need_weights)
            tokens, weights = fused if need_weights else (fused, None)
        return tokens, weights

    def _fusion_context(self, embeds, input_ids, attention_mask, labels, visual, has_images, has_audio):
        """Per audio sample: its visual tokens, then its prompt's embeddings in order (never the answer).

        Returns (N_audio, C, D) and a (N_audio, C) validity mask, or (None, None) without a fusion layer.
        C = V + the longest prompt in the batch (padding, placeholders and the answer are left out, not masked).
        """
        if self.fusion is None:
            return None, None
        parts, masks = [], []
        n_audio = int(has_audio.sum())
        if visual is not None:
            row = (torch.cumsum(has_images.long(), 0) - 1).clamp(min=0)[has_audio]  # image row of each audio sample
            parts.append(visual[row])
            masks.append(has_images[has_audio].unsqueeze(1).expand(n_audio, visual.shape[1]))
        if self.fusion_text:
            prompt = attention_mask.bool() & (input_ids != self.audio_token_id) & (input_ids != self.base.image_token_id)
            if labels is not None and labels.shape == input_ids.shape:  # decoder-only: the answer is in the input
                prompt &= labels == -100
            text, text_mask = _pack(embeds[has_audio].detach(), prompt[has_audio])
            parts.append(text)
            masks.append(text_mask)
        if not parts:
            return None, None
        return torch.cat(parts, 1), torch.cat(masks, 1)

    # ------------------------------------------------------------------ forward

    def _strip_audio(self, input_ids, attention_mask, labels):
        """Drop ``<audio>`` placeholders and re-pad each row to the same length on the padding side.

        Decoder-only rows are left-padded, so text and answer keep their positions (right-aligned):
        student and teacher logits line up position by position.
        """
        keep = input_ids != self.audio_token_id
        if keep.all():
            return input_ids, attention_mask, labels
        order = _kept_order(keep, front=self.base.padding_side != "left")
        ids = input_ids.gather(1, order)
        kept = keep.gather(1, order)
        pad = self.base.tokenizer.pad_token_id
        ids = ids.masked_fill(~kept, pad)
        mask = attention_mask.gather(1, order).masked_fill(~kept, 0)
        if labels is not None and not self.base.is_encoder_decoder:
            labels = labels.gather(1, order).masked_fill(~kept, -100)
        return ids, mask, labels

    def build_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor | None = None, images: torch.Tensor | None = None,
                     has_images: torch.Tensor | None = None, audio: torch.Tensor | None = None,
                     audio_valid_frac: torch.Tensor | None = None, audio_features: torch.Tensor | None = None,
                     has_audio: torch.Tensor | None = None, *, use_audio: bool = True,
                     audio_permutation: torch.Tensor | None = None, need_attention: bool = False,
                     visual_tokens: torch.Tensor | None = None, **_unused) -> dict:
        """Assemble the language model's input embeddings for a collated batch.

        Args:
            input_ids: (B, L) with ``<image>`` x V and ``<audio>`` x K placeholders.
            attention_mask: (B, L).
            labels: (B, L) for decoder-only models, (B, T) decoder targets for encoder-decoder; -100 = no loss.
            images: (N_img, 3, H, W) pixel values of the samples with ``has_images``.
            has_images: (B,) bool.
            audio: (N_audio, ...) encoder input features of the samples with ``has_audio``.
            audio_valid_frac: (N_audio,) fraction of the encoder time axis holding real audio.
            audio_features: (N_audio, K, D_audio) cached encoder outputs (instead of ``audio``).
            has_audio: (B,) bool.
            use_audio: False drops the audio tokens (the teacher's and the "audio removed" view).
            audio_permutation: (N_audio,) reorders the clips across samples ("audio shuffled").
            need_attention: also return the fusion attention weights.
            visual_tokens: (N_img, V, D) the vision path's output for ``images``, already computed (the teacher
                reuses the student's); the vision path is not run again.

        Returns:
            dict with ``embeds`` (B, L', D), ``attention_mask``, ``labels``, ``visual`` (N_img, V, D) or None,
            ``attention`` (N_audio, K, C) or None, ``input_ids`` (B, L'; without the audio placeholders when
            ``use_audio`` is False).
        """
        b, device = input_ids.shape[0], input_ids.device
        has_images = has_images if has_images is not None else torch.zeros(b, dtype=torch.bool, device=device)
        has_audio = has_audio if has_audio is not None else torch.zeros(b, dtype=torch.bool, device=device)
        if not use_audio:
            input_ids, attention_mask, labels = self._strip_audio(input_ids, attention_mask, labels)
        # step 1: text embeddings (placeholders embed as padding; they are overwritten below)
        placeholder = (input_ids == self.audio_token_id) | (input_ids == self.base.image_token_id)
        embeds = self.base.embed_tokens(input_ids.masked_fill(placeholder, self.base.tokenizer.pad_token_id))
        # step 2: visual tokens from the base model's own vision path
        visual = None
        if images is not None and bool(has_images.any()):
            visual = (visual_tokens if visual_tokens is not None
                      else self.base.image_features(images.to(embeds.dtype)))  # (N_img, V, D)
            embeds = self._fill(embeds, input_ids == self.base.image_token_id, visual, "<image>")
        # step 3: audio tokens (projector, then fusion with the same sample's visual tokens)
        attention = None
        if use_audio and bool(has_audio.any()):
            if audio_features is None:
                if audio is None:
                    raise ValueError("has_audio is set but the batch has neither 'audio' nor 'audio_features'")
                audio_features = self.encode_audio(audio, audio_valid_frac)
            if audio_permutation is not None:
                audio_features = audio_features[audio_permutation]
            context, context_mask = self._fusion_context(embeds, input_ids, attention_mask, labels, visual,
                                                         has_images, has_audio)
            tokens, attention = self.audio_tokens(audio_features.float(), context, context_mask,
                                                  need_weights=need_attention)
            embeds = self._fill(embeds, input_ids == self.audio_token_id, tokens, AUDIO_TOKEN)
        return dict(embeds=embeds, attention_mask=attention_mask, labels=labels, visual=visual,
                    attention=attention, input_ids=input_ids)

    def _frozen_prefix(self, inputs: dict) -> int:
        """How many leading positions of the language model's input need no gradient: those before the first
        ``<audio>`` column of the batch, when nothing in the base model trains (its language model, LoRA and
        vision path frozen) and autograd is on. Their states depend on nothing that trains, so the language
        model runs them without autograd (``BaseVL.language_model(frozen_prefix=)``). 0 when that does not
        hold: encoder-decoder models (the encoder is bidirectional), gradient checkpointing (transformers
        turns the key/value cache off under it), no audio in the batch, anything in the base training, or
        ``model.frozen_prefix=false``.
        """
        embeds, visual = inputs["embeds"], inputs["visual"]
        if (not frozen_prefix_applies(enabled=self.frozen_prefix, encoder_decoder=self.base.is_encoder_decoder,
                                      checkpointing=self.base.checkpointing, base_trains=self.base_trains)
                or not torch.is_grad_enabled() or not embeds.requires_grad
                or (visual is not None and visual.requires_grad)):
            return 0
        first = _first_column(inputs["input_ids"] == self.audio_token_id)
        return 0 if first is None else first

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                *, logits_from: int | None = None, **batch) -> SAFEOutput:
        """Run SAFE on a collated batch (see :meth:`build_inputs` for the arguments).

        ``logits_from`` (decoder-only): compute the LM head only from this position on (the training step
        passes :meth:`logits_start`: no label before it); ``logits`` then covers those positions only and
        ``token_*`` are cut to match, with the same loss.
        """
        inputs = self.build_inputs(input_ids, attention_mask, labels, **batch)
        labels = inputs["labels"]
        length = inputs["embeds"].shape[1]
        keep = length - logits_from if (logits_from and not self.base.is_encoder_decoder) else 0
        # step 4: the frozen language model
        out = self.base.language_model(inputs["embeds"], inputs["attention_mask"], labels=labels,
                                       frozen_prefix=self._frozen_prefix(inputs), logits_to_keep=keep)
        token_logits, token_labels, token_hidden, loss = out.logits, labels, out.hidden, None
        if labels is not None:
            if not self.base.is_encoder_decoder:  # position t predicts token t+1
                start = length - out.logits.shape[1]  # the first position with logits
                token_logits, token_labels = out.logits[:, :-1], labels[:, start + 1:]
                token_hidden = out.hidden[:, start:-1]
            loss = F.cross_entropy(token_logits.float().reshape(-1, token_logits.shape[-1]),
                                   token_labels.reshape(-1), ignore_index=-100)
        return SAFEOutput(loss=loss, logits=out.logits, hidden=out.hidden, token_logits=token_logits,
                          token_labels=token_labels, token_hidden=token_hidden, visual_tokens=inputs["visual"],
                          attention=inputs["attention"])

    def logits_start(self, batch: dict) -> int | None:
        """The first position whose logits a training step needs (decoder-only: the one before the batch's
        first labelled token); ``None`` for encoder-decoder models or without labels. Student and teacher
        rows are right-aligned with the same width, so the teacher takes the same value."""
        labels, ids = batch.get("labels"), batch.get("input_ids")
        if labels is None or self.base.is_encoder_decoder or labels.shape != ids.shape:
            return None
        first = _first_column(labels != -100)
        return None if first is None else max(first - 1, 0)

    @staticmethod
    def _fill(embeds: torch.Tensor, where: torch.Tensor, tokens: torch.Tensor, what: str) -> torch.Tensor:
        n_slots, n_tokens = int(where.sum()), tokens.shape[0] * tokens.shape[1]
        if n_slots != n_tokens:
            raise ValueError(f"{what}: the batch has {n_slots} placeholder tokens but {n_tokens} "
                             f"{what} embeddings ({tokens.shape[0]} x {tokens.shape[1]}); check has_images/has_audio")
        return embeds.masked_scatter(where.unsqueeze(-1), tokens.to(embeds.dtype))

    # ------------------------------------------------------------------ teacher

    @contextlib.contextmanager
    def adapters_disabled(self):
        """LoRA adapters off inside the block (peft's own switch)."""
        layers = self._lora_layers()
        if not layers:
            yield
            return
        _enable_adapters(layers, False)
        try:
            yield
        finally:
            _enable_adapters(layers, self.lora_active)

    def vision_path_original(self) -> bool:
        """True when every base module that any phase unfroze lies inside the language model."""
        lm = self._qualified(self.base.language_model_module()) + "."
        return all(k.startswith(lm) for k in self.anchors)

    @torch.no_grad()
    def teacher_forward(self, batch: dict, *, visual_tokens: torch.Tensor | None = None,
                        logits_from: int | None = None) -> SAFEOutput:
        """The original VL model's outputs, from this same module (DESIGN invariant 4).

        Audio dropped, LoRA adapters disabled, unfrozen base modules called with their anchor
        (original) weights through ``torch.func.functional_call`` - no second copy of the model.
        ``visual_tokens``: the student's vision-path output for ``batch["images"]``; used (instead of running
        the frozen vision path again) when no module before the language model was ever unfrozen, so the
        student's visual tokens are the original ones. ``logits_from``: as in :meth:`forward` (the student's).
        """
        kwargs = dict(batch, use_audio=False, logits_from=logits_from)
        if visual_tokens is not None and self.vision_path_original():
            kwargs["visual_tokens"] = visual_tokens.detach()
        with self.adapters_disabled():
            if self.anchors:
                return torch.func.functional_call(self, self.anchors, args=(), kwargs=kwargs, strict=False)
            return self(**kwargs)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate_from_batch(self, batch: dict, *, max_new_tokens: int = 8, use_audio: bool = True,
                            audio_permutation: torch.Tensor | None = None) -> list[str]:
        """Greedy answers for a collated batch (built without answers)."""
        batch = {k: v for k, v in batch.items() if k != "labels"}
        inputs = self.build_inputs(**batch, use_audio=use_audio, audio_permutation=audio_permutation)
        limit, length = self.base.max_positions, inputs["embeds"].shape[1]
        if limit is not None and length + max_new_tokens > limit:  # past it OPT indexes out of its table
            raise ValueError(f"the batch's prompts take {length} positions and max_new_tokens={max_new_tokens} more, "
                             f"beyond the language model's {limit}: shorten the questions (data.max_text_length) "
                             "or lower max_new_tokens")
        new = self.base.generate(inputs["embeds"], inputs["attention_mask"], max_new_tokens=max_new_tokens)
        return [s.strip() for s in self.base.tokenizer.batch_decode(new, skip_special_tokens=True)]

    @torch.no_grad()
    def generate(self, images: list, audio: list, prompts: list[str], *, processor=None,
                 max_new_tokens: int = 8, max_seconds: float = 10.0) -> list[str]:
        """Answer ``prompts`` about images (paths, PIL images or None) and audio (file paths, 1-D waveforms at the
        encoder's rate, or None), one per prompt: the inputs are checked as ``safe_av.api.SAFE.answer`` checks them
        (``InputError`` naming the item and field); audio files are read as training reads them (their first
        ``max_seconds``)."""
        from safe_av.api import prepare_item
        from safe_av.data.text import SAFEProcessor, move_batch

        if not len(images) == len(audio) == len(prompts):
            raise ValueError(f"generate: {len(images)} images, {len(audio)} audio and {len(prompts)} prompts; give "
                             "one of each per item (None where an item has none)")
        processor = processor or SAFEProcessor.from_model(self)
        items = [prepare_item(q, img, aud, sampling_rate=processor.sampling_rate, max_seconds=max_seconds,
                              where=f"item {i}") for i, (img, aud, q) in enumerate(zip(images, audio, prompts))]
        batch = move_batch(processor.collate(items), self.device)
        return self.generate_from_batch(batch, max_new_tokens=max_new_tokens)

    @property
    def device(self) -> torch.device:
        return self.projector.projection[0].weight.device

    # ------------------------------------------------------------------ save / load

    def adapter_keys(self) -> tuple[list[str], list[str]]:
        """(parameter names, buffer names) of what a SAFE adapter is: projector, fusion, LoRA and any unfrozen
        base parameters, plus the projector's buffers (its input statistics)."""
        keep = {n for n in self.trainable_parameters()}
        keep |= {n for n, _ in self.named_parameters() if n.startswith(("projector.", "fusion.")) or "lora_" in n}
        keep |= set(self.anchors)  # unfrozen base parameters (their current values)
        return sorted(keep), [n for n, _ in self.named_buffers() if n.startswith("projector.")]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What a SAFE adapter is (:meth:`adapter_keys`), on CPU."""
        names, buffers = self.adapter_keys()
        params, bufs = dict(self.named_parameters()), dict(self.named_buffers())
        state = {n: params[n].detach().contiguous().cpu() for n in names}
        state.update({n: bufs[n].detach().contiguous().cpu() for n in buffers})
        return state

    def adapter_identity(self) -> dict:
        """What the adapter was trained around, recorded in ``adapter_config.json``: the base's family, the audio
        encoder's kind and a fingerprint of each one's original weights (:func:`weights_fingerprint`; None when
        the weights cannot be read, e.g. offloaded to the meta device)."""
        return dict(base_family=self.base.family_name, audio_kind=self.audio_encoder.kind,
                    base_fingerprint=self.base_fingerprint(),
                    audio_encoder_fingerprint=self.audio_encoder_fingerprint())

    def base_fingerprint(self) -> str | None:
        """:func:`weights_fingerprint` of the base's *original* weights: unfrozen parameters count with their
        anchor (θ*), LoRA's parameters are left out and peft's ``.base_layer`` is dropped from the names, so the
        value names the base checkpoint whatever was trained on top of it."""
        named = []
        for name, p in self.base.named_parameters():
            if "lora_" in name:
                continue
            named.append((name.replace(".base_layer", ""), self.anchors.get(f"base.{name}", p)))
        return weights_fingerprint(named)

    def audio_encoder_fingerprint(self) -> str | None:
        """:func:`weights_fingerprint` of the frozen audio encoder."""
        return weights_fingerprint(self.audio_encoder.named_parameters())

    def check_fingerprints(self, recorded: dict, source: str | Path) -> None:
        """Log a warning when ``recorded`` (an adapter's config) holds a base / audio encoder fingerprint that
        differs from this model's: the same family, but other weights than the adapter was trained with. Not an
        error (a re-saved or re-quantised copy of the same base may differ); nothing happens without one."""
        for key, what, compute in (("base_fingerprint", "base", self.base_fingerprint),
                                   ("audio_encoder_fingerprint", "audio encoder", self.audio_encoder_fingerprint)):
            want = recorded.get(key)
            if not want:
                continue
            found = compute()
            if found is not None and found != want:
                log.warning("%s: %s=%s, but the %s loaded has %s: the same family, but other weights than the "
                            "adapter was trained with; answers may be poor. Load it around the %s it was trained with",
                            source, key, want, what, found, what)

    def load_adapter_state(self, state: dict[str, torch.Tensor], source: str | Path, *,
                           partial_base: bool = False) -> None:
        """Copy a saved adapter state (:meth:`adapter_state_dict`) into this model, strictly.

        Every tensor :meth:`adapter_state_dict` writes for this architecture (fusion or not, its LoRA set-up and
        unfrozen base modules) must be there, with this model's shape, and nothing else. Allowed to be absent:

        - ``fusion.norm_visual.*``: adapters saved while the fusion's context norm had a gain and bias hold them,
          and they are folded into ``fusion.kv_proj`` (:func:`fold_context_norm`); they are never expected;
        - the projector's input statistics (buffers) when the file has *none* of them: adapters written before
          they were saved, trained without them; they stay the identity (mean 0, std 1);
        - with ``partial_base`` (a training checkpoint): the parameters of an unfrozen base module the run had
          not unfrozen yet when it wrote the checkpoint (the base's own weights are then the right ones); a
          module's parameters are all there or all absent.

        Raises:
            ValueError: naming ``source``: names not in the model, missing tensors, or shape mismatches. Nothing
                is copied then.
        """
        state = dict(state)
        fold_context_norm(state)  # adapters saved while the fusion's context norm had its own gain and bias
        params = dict(self.named_parameters()) | dict(self.named_buffers())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"{source}: parameters not in the model: {unknown[:5]}")
        names, buffers = self.adapter_keys()
        expected = set(names)
        if any(b in state for b in buffers):
            expected |= set(buffers)
        if partial_base:
            for name in self.unfrozen_ever:
                prefix = self._qualified(self._base_module(name)) + "."
                group = {k for k in self.anchors if k.startswith(prefix)}
                if not group & set(state):
                    expected -= group
        missing = sorted(expected - set(state))
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"{source}: {len(missing)} adapter tensor(s) missing: {missing[:5]}{more} (an "
                             "incomplete file, or one saved for another architecture, LoRA or unfreeze set-up)")
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(params[name].shape)}")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
        self.sync_lora_active()

    def save_pretrained(self, path: str | Path, *, extra_config: dict | None = None) -> None:
        """Write ``adapter.safetensors`` + ``adapter_config.json`` (no pickle).

        The config holds the architecture, ``unfreeze`` and ``lora``, and :meth:`adapter_identity` (base family,
        audio encoder kind, weight fingerprints), which :meth:`from_pretrained` checks.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.adapter_state_dict(), str(path / ADAPTER_WEIGHTS))
        config = dict(self._arch, unfreeze=self.unfrozen_ever, audio_token=AUDIO_TOKEN,
                      lora=self.lora_config.to_dict() if self.lora_config is not None else None,
                      **self.adapter_identity())
        config.update(extra_config or {})
        (path / ADAPTER_CONFIG).write_text(json.dumps(_jsonable(config), indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, base: BaseVL, audio_encoder: AudioEncoder) -> "SAFEModel":
        """Rebuild the adapter around ``base``/``audio_encoder`` and load its weights (strict).

        Raises:
            FileNotFoundError: ``adapter_config.json`` or ``adapter.safetensors`` is missing.
            ValueError: ``base``/``audio_encoder`` is of another family/kind than the adapter records
                (checked first), or the weights file has unknown or missing tensors or other shapes
                (:meth:`load_adapter_state`).

        A recorded base / audio encoder weight fingerprint that differs from the given one's is logged as a
        warning (:meth:`check_fingerprints`).
        """
        path = Path(path)
        cfg_file, w_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
        for f in (cfg_file, w_file):
            if not f.is_file():
                raise FileNotFoundError(f"SAFE adapter file not found: {f}")
        cfg = json.loads(cfg_file.read_text())
        check_adapter_family(cfg, cfg_file, base=base, audio_encoder=audio_encoder)
        lora = None
        if cfg.get("lora"):
            from peft import LoraConfig

            lora_cfg = {k: v for k, v in cfg["lora"].items() if k in LoraConfig.__dataclass_fields__}
            lora = LoraConfig(**lora_cfg)
        arch = {k: cfg[k] for k in ("num_audio_tokens", "projector_hidden", "projector_dropout", "fusion",
                                    "fusion_heads", "fusion_ffn_mult", "fusion_dropout", "fusion_text",
                                    "fusion_gate_scale", "audio_position") if k in cfg}
        model = cls(base, audio_encoder, **arch, unfreeze=cfg.get("unfreeze", []), lora=lora)
        model.check_fingerprints(cfg, cfg_file)
        model.load_adapter_state(load_file(str(w_file)), w_file)
        return model


FINGERPRINT_ELEMENTS = 256
"""Leading elements of each tensor a weight fingerprint reads."""


def weights_fingerprint(named, *, elements: int = FINGERPRINT_ELEMENTS) -> str | None:
    """A cheap fingerprint of a model's weights: sha256 over the sorted (name, shape, first ``elements`` values)
    of each ``(name, tensor)`` in ``named``, the values rounded to bfloat16 precision, so float32 and bfloat16
    copies of the same weights agree (float16 ones may not). Reads ``elements`` values a tensor: milliseconds
    for a 7B model. None when a tensor is not materialised (the meta device)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda item: item[0]):
        if t.is_meta:
            return None
        head = t.detach().reshape(-1)[:elements].to(torch.float32).to(torch.bfloat16).to("cpu", torch.float32)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(head.numpy().tobytes())
    return h.hexdigest()[:16]


def check_adapter_family(recorded: dict, source: str | Path, *, base: BaseVL | None = None,
                         audio_encoder: AudioEncoder | None = None) -> None:
    """Refuse a base / audio encoder of another family / kind than the adapter was trained with (``base_family``
    / ``audio_kind`` in its config; nothing is checked where the config has none).

    Raises:
        ValueError: naming ``source``, the recorded and the found family / kind.
    """
    checks = []
    if base is not None:
        checks.append(("base_family", "base", base.family_name))
    if audio_encoder is not None:
        checks.append(("audio_kind", "audio encoder", audio_encoder.kind))
    for key, what, found in checks:
        want = recorded.get(key)
        if want and want != found:
            raise ValueError(f"{source}: {key}={want!r}: the adapter was trained with a {want} {what}, but the "
                             f"{what} given is a {found} one; load it around the {what} it was trained with")


def _enable_adapters(layers: list, active: bool) -> None:
    """peft's ``enable_adapters`` on each LoRA layer, keeping every parameter's ``requires_grad``: peft's
    ``enable_adapters(True)`` also makes the LoRA weights trainable, which would let a phase that does not train
    LoRA (after the one that did, or with trained LoRA loaded) compute their gradients - and put them in its
    optimizer."""
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(active)
    for p, flag in flags:
        p.requires_grad_(flag)


def _pack(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's kept positions to its front, in order, and cut the width to the longest row's count.

    ``x`` (N, L, D), ``keep`` (N, L) bool -> (N, P, D) and its (N, P) mask, P = max kept per row. The fusion's
    keys and values are then computed for the prompt's tokens only, not for the padding, placeholders and
    answer a mask would hide anyway (about half of a demo row): the same attention output, less work.
    """
    if keep.shape[0] == 0:
        return x[:, :0], keep[:, :0]
    width = int(keep.sum(1).max())
    order = _kept_order(keep, front=True)[:, :width]
    packed = x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return packed, keep.gather(1, order)


def _kept_order(keep: torch.Tensor, *, front: bool) -> torch.Tensor:
    """(N, L) indices that move each row's kept positions to its front (``front``) or its end, each group in
    its original order (a stable sort of the keep flags)."""
    key = (~keep if front else keep).to(torch.uint8)
    return torch.argsort(key, dim=1, stable=True)


def frozen_prefix_applies(*, enabled: bool, encoder_decoder: bool, checkpointing: bool, base_trains: bool) -> bool:
    """Whether a step may run the positions before the audio without autograd, as far as the set-up decides
    (``model.frozen_prefix`` on, a decoder-only LM, no gradient checkpointing, nothing in the base training).
    ``SAFEModel._frozen_prefix`` adds what only the batch tells; ``safe info`` predicts memory with this."""
    return enabled and not encoder_decoder and not checkpointing and not base_trains


def _first_column(mask: torch.Tensor) -> int | None:
    """The first column of a (B, L) bool mask that is set in any row, or None."""
    columns = mask.any(0).nonzero()
    return int(columns[0, 0]) if len(columns) else None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
