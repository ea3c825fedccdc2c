"""Give a *tiny* random base VL model real VL ability first, so there is something to keep.

The demo's base model is built from a transformers config with random weights; on its own it
answers nothing, and "retention" of nothing is meaningless. So before SAFE training, the
whole tiny base is trained on the image-only questions (VQA v2 + MUSIC-AVQA's Visual questions,
without audio), after its vision tower was given sight (``train.pretrain.vision``, then kept frozen) and,
with ``train.pretrain.sound_text``, interleaved with audio questions whose sound is described in words, and
saved with ``save_pretrained`` to a cache folder keyed by everything that
determines it. SAFE then loads it through the same ``from_pretrained(path)`` as a real checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from safe_av.config import SAFEConfig, to_dict
from safe_av.data.records import Sample
from safe_av.data.text import SAFEProcessor, move_batch
from safe_av.models.base_vl import BaseVL
from safe_av.models.presets import AUDIO_TOKEN, build_tiny_base
from safe_av.training.build_once import build_once
from safe_av.training.data import BatchStream, SAFEDataset
from safe_av.training import pretrain_sound_text as sound_text
from safe_av.training.pretrain_vision import pretrain_vision_tower
from safe_av.training.supervised import fit

log = logging.getLogger(__name__)


def corpus_texts(samples: list[Sample], cfg: SAFEConfig | None = None) -> list[str]:
    """Every question and answer (and the sound descriptions' words when ``cfg`` uses them): the tiny
    tokenizer's vocabulary."""
    extra = sound_text.vocabulary() if cfg is not None and cfg.train.pretrain.sound_text.enabled else []
    return [t for s in samples for t in [s.question, *s.answers]] + extra


def _key(cfg: SAFEConfig, samples: list[Sample]) -> str:
    ids = sorted(f"{s.dataset}/{s.id}/{s.answers[0] if s.answers else ''}" for s in samples)
    # the encoder has its own key; the cache folder is where the key is used, not part of it (a moved or
    # shared cache keeps its bases)
    recipe = {k: v for k, v in to_dict(cfg.train.pretrain).items() if k not in ("audio", "cache_dir")}
    if not cfg.train.pretrain.vision.enabled:
        recipe.pop("vision")  # bases pretrained before the vision stage existed keep their key
    if cfg.train.pretrain.sound_text.enabled:  # descriptions fill the audio tokens' places
        recipe["sound_text_layout"] = [cfg.model.num_audio_tokens, cfg.model.audio_position]
    else:
        recipe.pop("sound_text")  # ... and so do those pretrained before the sound descriptions
    if not cfg.data.augment:
        recipe["augment"] = False  # (augmented images, the default, leave older keys as they were)
    blob = json.dumps({"recipe": 4, "base": cfg.model.base, "seed": cfg.model.tiny_seed, "pretrain": recipe,
                       "samples": ids, "max_len": cfg.data.max_text_length}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained_base_folder(cfg: SAFEConfig, train: list[Sample], vocabulary: list[Sample]) -> Path:
    """Where :func:`pretrain_tiny_base` keeps (or will keep) the base for these inputs."""
    return Path(cfg.train.pretrain.cache_dir) / f"{cfg.model.base}-{_key(cfg, train + vocabulary)}"


def pretrain_tiny_base(cfg: SAFEConfig, train: list[Sample], vocabulary: list[Sample], *,
                       device: torch.device | str = "cpu") -> Path:
    """Train (or reuse) the tiny base on image-only questions; return its folder.

    Args:
        cfg: the run's config (``model.base`` a tiny preset, ``train.pretrain`` the recipe).
        train: image-only training samples (audio is ignored).
        vocabulary: samples whose text the tokenizer must cover.
    """
    return build_once(pretrained_base_folder(cfg, train, vocabulary), "pretrained tiny base",
                      lambda out: _build_tiny_base(cfg, train, vocabulary, out, device))


def _build_tiny_base(cfg: SAFEConfig, train: list[Sample], vocabulary: list[Sample], out: Path,
                     device: torch.device | str) -> None:
    pre = cfg.train.pretrain
    torch.manual_seed(cfg.model.tiny_seed)
    model, processor = build_tiny_base(cfg.model.base, corpus_texts(vocabulary, cfg), seed=cfg.model.tiny_seed)
    base = BaseVL(model, processor)
    model.to(device)
    vision = None
    if pre.vision.enabled:  # first give the random vision tower sight (training/pretrain_vision.py)
        vision = pretrain_vision_tower(base.vision_tower, processor.image_processor, pre.vision, device=device)
    model.requires_grad_(True)
    if vision and pre.vision.freeze:
        base.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    proc = _processor(cfg, base, audio_tokens=0)
    image_only = [dataclasses.replace(s, audio=None) for s in train]  # the sampler pools by audio presence
    # seeded by the base's own seed (in its cache key), not train.seed: SAFE runs with other seeds share the base
    dataset = SAFEDataset(image_only, sampling_rate=16000, augment=cfg.data.augment, seed=cfg.model.tiny_seed)
    stream = BatchStream(dataset, proc.collate, batch_size=pre.batch_size, dataset_weights=None,
                         seed=cfg.model.tiny_seed)
    stream.configure(0.0, None)
    steps = max(1, int(pre.epochs * stream.batches_per_epoch()))
    t0 = time.time()
    batches = (move_batch(stream.next(), device) for _ in range(steps))
    described = None
    if pre.sound_text.enabled:  # interleave audio questions with the sound described in words
        batches, steps, described = _with_sound_text(cfg, base, batches, steps, device)
    loss = fit(params, pre.lr, batches, steps, lambda batch: _vl_loss(base, batch), what="base")
    model.eval().requires_grad_(False)
    report = {"steps": steps, "final_loss": loss, "seconds": round(time.time() - t0, 1),
              "samples": len(train)}
    if described is not None:
        report["sound_text"] = described()
    model.to("cpu").save_pretrained(out)
    processor.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps(report | ({"vision": vision} if vision else {}), indent=2))


def _with_sound_text(cfg: SAFEConfig, base: BaseVL, vqa_batches, vqa_steps: int, device):
    """VQA batches interleaved with described-sound batches; the step count; a held-out report function."""
    pre, st = cfg.train.pretrain, cfg.train.pretrain.sound_text
    n_words = cfg.model.num_audio_tokens
    collate = sound_text.described_collate(_processor(cfg, base, audio_tokens=n_words))
    rows = sound_text.described_rows(st.scenes, st.seed, n_words)
    held = sound_text.described_rows(st.held_out_scenes, st.seed + 1, n_words)
    log.info("pretrain base: %d described-sound questions (%d scenes) interleaved at %.2f per VQA batch",
             len(rows), st.scenes, st.share)
    described = (move_batch(b, device) for b in sound_text.batches(rows, collate, pre.batch_size, st.seed))
    steps = sound_text.interleaved_steps(vqa_steps, st.share)
    mixed = sound_text.interleave(vqa_batches, described, st.share)

    def report() -> dict:
        out = sound_text.held_out_accuracy(lambda b, first: _answer_logits(base, move_batch(b, device), first),
                                           held, collate)
        log.info("pretrain base: held-out accuracy on described-sound questions %.3f", out["overall"])
        return out | {"scenes": st.scenes, "questions": len(rows), "held_out_questions": len(held)}

    return mixed, steps, report


def _processor(cfg: SAFEConfig, base: BaseVL, *, audio_tokens: int) -> SAFEProcessor:
    """The base's text side for its pretraining batches; ``audio_tokens`` placeholders (the ``<audio>`` token,
    where SAFE will put its audio tokens) that the sound descriptions fill, or none."""
    return SAFEProcessor(tokenizer=base.tokenizer, image_processor=base.image_processor,
                         image_token_id=base.image_token_id, num_image_tokens=base.num_image_tokens,
                         audio_token_id=base.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN) if audio_tokens else -1,
                         num_audio_tokens=audio_tokens, family=base.family, is_encoder_decoder=base.is_encoder_decoder,
                         max_length=cfg.data.max_text_length, audio_position=cfg.model.audio_position)


def _answer_logits(base: BaseVL, batch: dict, first: torch.Tensor) -> torch.Tensor:
    """(B, V) logits predicting each row's first answer token (at ``first`` in its labels)."""
    labels = batch["labels"]
    first = first.to(labels.device)
    rows = torch.arange(len(labels), device=labels.device)
    out = base.model(pixel_values=batch["images"], input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"], labels=labels if base.is_encoder_decoder else None)
    return out.logits[rows, first] if base.is_encoder_decoder else out.logits[rows, first - 1]


def _vl_loss(base: BaseVL, batch: dict) -> torch.Tensor:
    """The plain VL model's own loss on image+text batches (its forward, image tokens filled by it)."""
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if batch.get("images") is None or not bool(batch["has_images"].all()):
        raise ValueError("base pretraining takes image-only samples with an image each")
    out = base.model(pixel_values=batch["images"], labels=batch["labels"] if base.is_encoder_decoder else None,
                     **kwargs)
    if base.is_encoder_decoder:
        return out.loss
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=-100)
