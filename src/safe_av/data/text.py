"""Text side of the pipeline and collation: prompts, placeholders, padding, labels.

``SAFEProcessor`` turns loaded samples into the batch ``SAFEModel`` takes - the spec's
``collate_multimodal_batch``: ``input_ids, attention_mask, audio, images, labels, has_audio,
has_images`` (+ ``audio_valid_frac`` and, with the feature cache, ``audio_features``).

Token layout per sample (placeholders are expanded to V image and K audio tokens)::

    BLIP-2 OPT   [<image>xV][<audio>xK]<bos> Question: q Answer: a<eos>        (left-padded)
    LLaVA        <bos>[<image>xV][<audio>xK] USER: q ASSISTANT: a<eos>         (left-padded)
    BLIP-2 T5    encoder [<image>xV][<audio>xK] Question: q Answer:<eos>        (right-padded)
                 decoder labels  a<eos>

Labels are -100 everywhere except the answer and its end token, so the loss is masked on the prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from safe_av.models.audio_encoders import prepare_audio

log = logging.getLogger(__name__)
_WARNED_TRUNCATION: list[bool] = []  # an over-long question was logged in this process

CAPTION_PROMPT = "Describe the sound."


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    """Decoder-only: same length as input_ids. Encoder-decoder: the decoder targets."""
    truncated: bool = False


@dataclass
class SAFEProcessor:
    tokenizer: object
    image_processor: object
    image_token_id: int
    num_image_tokens: int
    audio_token_id: int
    num_audio_tokens: int
    family: str
    """``blip2`` or ``llava``."""
    is_encoder_decoder: bool
    audio_feature_extractor: object = None
    audio_kind: str = "clap"
    max_length: int = 512
    audio_position: str = "after_image"
    """Where the ``<audio>`` placeholders go: right after the image's (``after_image``) or after the prompt,
    just before the answer (``before_answer``; the encoder input's end for encoder-decoders)."""
    stats: dict = field(default_factory=lambda: {"truncated": 0})

    @classmethod
    def from_model(cls, model, *, max_length: int = 512) -> "SAFEProcessor":
        base = model.base
        return cls(tokenizer=base.tokenizer, image_processor=base.image_processor,
                   image_token_id=base.image_token_id, num_image_tokens=base.num_image_tokens,
                   audio_token_id=model.audio_token_id, num_audio_tokens=model.num_audio_tokens,
                   family=base.family, is_encoder_decoder=base.is_encoder_decoder,
                   audio_feature_extractor=model.audio_encoder.feature_extractor,
                   audio_kind=model.audio_encoder.kind, max_length=max_length,
                   audio_position=getattr(model, "audio_position", "after_image"))

    @property
    def sampling_rate(self) -> int:
        return int(self.audio_feature_extractor.sampling_rate)

    @property
    def padding_side(self) -> str:
        return "right" if self.is_encoder_decoder else "left"

    # ------------------------------------------------------------------ text

    def prompt(self, question: str) -> str:
        question = question.strip() or CAPTION_PROMPT
        if self.family == "llava":
            return f"USER: {question} ASSISTANT:"
        return f"Question: {question} Answer:"

    def _ids(self, text: str) -> list[int]:
        # split_special_tokens: a user's "<audio>" or "<image>" (or "</s>") is text, never a placeholder or control
        # token (a question naming "<audio>" gave one placeholder more than there were audio embeddings)
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def encode(self, question: str, answer: str | None, *, has_image: bool, has_audio: bool,
               count: bool = True) -> Encoded:
        """Token ids and labels for one sample (``answer=None`` at inference); ``count=False``: a look at the length
        (the API's check), not counted in ``stats`` nor logged."""
        tok = self.tokenizer
        media = [self.image_token_id] * (self.num_image_tokens if has_image else 0)
        audio = [self.audio_token_id] * (self.num_audio_tokens if has_audio else 0)
        late = self.audio_position == "before_answer"
        if not late:
            media += audio
        prompt = self._ids(self.prompt(question))
        answer_ids = (self._ids(" " + answer.strip()) + [tok.eos_token_id]) if answer is not None else []
        if self.is_encoder_decoder:
            head, tail = media, [tok.eos_token_id]
        else:
            head = media + [tok.bos_token_id] if self.family == "blip2" else [tok.bos_token_id] + media
            tail = answer_ids
        # max_length bounds the text (prompt + answer), not the media placeholders: LLaVA alone has 576 visual tokens
        room = self.max_length - len(answer_ids) - (1 if self.is_encoder_decoder else 0)
        if room < 1:
            raise ValueError(f"data.max_text_length={self.max_length}: too short for a {len(answer_ids)}-token answer")
        truncated = len(prompt) > room
        if truncated:  # cut the question, keep the template's answer cue ("Answer:", "ASSISTANT:")
            self.stats["truncated"] += int(count)
            prompt = self._cut_prompt(question, room, log_it=count)
        if late:
            prompt = prompt + audio
        ids = head + prompt + tail
        if self.is_encoder_decoder:
            return Encoded(ids, answer_ids, truncated)
        labels = [-100] * (len(head) + len(prompt)) + answer_ids
        return Encoded(ids, labels, truncated)

    def _cut_prompt(self, question: str, room: int, *, log_it: bool = True) -> list[int]:
        """The prompt's ids within ``room``: the template around the question's first tokens (tokenized in pieces;
        only an over-long question gets here). Logged once per process."""
        marker = "\x00"
        before, after = self.prompt(marker).split(marker)
        head, tail = self._ids(before.rstrip()), self._ids(after)
        keep = max(room - len(head) - len(tail), 0)
        if log_it and not _WARNED_TRUNCATION:
            _WARNED_TRUNCATION.append(True)
            log.warning("a question longer than data.max_text_length=%d tokens is cut to its first %d tokens (the "
                        "prompt's answer cue is kept; every cut is counted: processor.stats['truncated'])",
                        self.max_length, keep)
        return (head + self._ids(" " + question.strip())[:keep] + tail)[:room]

    # ------------------------------------------------------------------ batch

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, r in enumerate(rows):
            if self.padding_side == "left" and not self.is_encoder_decoder:
                out[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            else:
                out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def collate(self, items: list[dict]) -> dict:
        """Collate loaded items into a model batch.

        Each item: ``question``, ``answer`` (or None), ``image`` (PIL or None), ``waveform`` (np.ndarray at
        ``sampling_rate`` or None) with ``num_valid``, or ``audio_features`` (cached (K, D) tensor), ``meta``
        (dict), and optionally ``audio_truncated`` (bool: its clip was cut to ``data.max_audio_seconds``).
        Items that are None (skipped bad samples) are dropped and counted in ``skipped``.

        Every batch, the empty one (``{"empty": True, ...}``, when every item was skipped) included, holds
        ``skipped`` (int: None items) and ``audio_truncated`` (int: items whose ``audio_truncated`` is true;
        0 when none).
        """
        skipped = sum(1 for it in items if it is None)
        items = [it for it in items if it is not None]
        audio_truncated = sum(1 for it in items if it.get("audio_truncated"))
        if not items:
            return {"empty": True, "skipped": skipped, "audio_truncated": 0}
        enc = [self.encode(it["question"], it.get("answer"), has_image=it.get("image") is not None,
                           has_audio=_has_audio(it)) for it in items]
        pad = self.tokenizer.pad_token_id
        input_ids = self._pad([e.input_ids for e in enc], pad)
        attention_mask = self._pad([[1] * len(e.input_ids) for e in enc], 0)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if any(it.get("answer") is not None for it in items):
            batch["labels"] = self._pad([e.labels for e in enc], -100)
        has_images = torch.tensor([it.get("image") is not None for it in items])
        has_audio = torch.tensor([_has_audio(it) for it in items])
        batch["has_images"], batch["has_audio"] = has_images, has_audio
        images = [it["image"] for it in items if it.get("image") is not None]
        batch["images"] = (self.image_processor(images=images, return_tensors="pt")["pixel_values"]
                           if images else None)
        audio_items = [it for it in items if _has_audio(it)]
        batch["audio"] = batch["audio_valid_frac"] = batch["audio_features"] = None
        if audio_items and all(it.get("audio_features") is not None for it in audio_items):
            batch["audio_features"] = torch.stack([torch.as_tensor(it["audio_features"]) for it in audio_items])
        elif audio_items:
            batch.update(prepare_audio(self.audio_feature_extractor, self.audio_kind,
                                       [it["waveform"] for it in audio_items],
                                       [it.get("num_valid", len(it["waveform"])) for it in audio_items]))
        batch["meta"] = [it.get("meta", {}) for it in items]
        batch["skipped"] = skipped
        batch["audio_truncated"] = audio_truncated
        return batch


def _has_audio(item: dict) -> bool:
    return item.get("waveform") is not None or item.get("audio_features") is not None


def move_batch(batch: dict, device) -> dict:
    """Tensors to ``device``; everything else as is."""
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
