"""Give a *tiny* random audio encoder real hearing first, so the audio adapter has something to use.

SAFE keeps the audio encoder frozen: it relies on what CLAP or Whisper learned from large audio corpora.
A tiny encoder built from a transformers config with random weights has learned nothing; its features
barely separate the synthetic scenes (a linear probe on them cannot tell which instrument enters first),
so no adapter could answer audio questions from them. The demo therefore pretrains the tiny encoder, once
and cached, on a corpus *of its own*: fresh synthetic scenes (disjoint from SAFE's training and evaluation
data, from another seed), rendered and loaded exactly as the corpus's files are (8 kHz PCM-16, resampled,
peak-normalised, zero-padded), with supervised targets per instrument: loudness rank among the sounding
ones, number of notes, entry order and playing span. Linear heads read the encoder's masked-mean pooled
tokens, so what the questions ask is linearly present in the features the projector receives; the heads
are then dropped. The encoder is saved with ``save_pretrained`` and loaded back through the same
``from_pretrained(path)`` as a real checkpoint. Held-out accuracies go to ``pretrain.json`` and the log.

Why supervised and not CLAP's contrastive loss on captions: with about a thousand clips and a minute of
CPU time, per-attribute targets give a reliable encoder; contrastive learning needs large batches and
many more pairs to reach the same attributes. The point is an encoder that hears, not how it learned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from safe_av.config import SAFEConfig, to_dict
from safe_av.data.audio import peak_normalise, resample
from safe_av.data.synth_scenes import INSTRUMENTS, Scene, make_scene, render_audio
from safe_av.models.audio_encoders import AudioEncoder
from safe_av.models.presets import TINY_AUDIO, build_tiny_audio
from safe_av.training.build_once import build_once
from safe_av.training.supervised import epoch_batches, fit

log = logging.getLogger(__name__)

FILE_RATE = 8000
"""The synthetic corpus's file rate (``write_synthetic``'s default)."""
MAX_NOTES = 5
HEADS = {"loudness": 4, "notes": MAX_NOTES + 1, "order": 4}
"""Classes per instrument: loudness rank (0 = silent, 1 = loudest ..), notes (0..5), entry order (0 = silent)."""


def scene_targets(scene: Scene) -> dict[str, np.ndarray]:
    """Per-instrument targets (in ``INSTRUMENTS`` order) of one scene."""
    levels = sorted({v.gain for v in scene.voices.values()}, reverse=True)
    order = scene.by_onset
    out = {k: np.zeros(len(INSTRUMENTS), np.int64) for k in HEADS} | {"span": np.zeros(len(INSTRUMENTS), np.float32)}
    for i, name in enumerate(INSTRUMENTS):
        voice = scene.voices.get(name)
        if voice is None:
            continue
        out["loudness"][i] = 1 + levels.index(voice.gain)
        out["notes"][i] = min(len(voice.starts), MAX_NOTES)
        out["order"][i] = 1 + order.index(name)
        out["span"][i] = voice.span / 10.0
    return out


def _key(cfg: SAFEConfig) -> str:
    blob = json.dumps({"recipe": 1, "audio_encoder": cfg.model.audio_encoder, "seed": cfg.model.tiny_seed + 1,
                       "pretrain": to_dict(cfg.train.pretrain.audio), "max_seconds": cfg.data.max_audio_seconds},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def wants_audio_pretraining(cfg: SAFEConfig) -> bool:
    """A tiny preset encoder, with ``train.pretrain.enabled`` (the tiny models' switch) and ``.audio.enabled``."""
    return cfg.model.audio_encoder in TINY_AUDIO and cfg.train.pretrain.enabled and cfg.train.pretrain.audio.enabled


def pretrained_audio_folder(cfg: SAFEConfig) -> Path:
    """Where :func:`pretrain_tiny_audio` keeps (or will keep) the encoder for this config."""
    return Path(cfg.train.pretrain.cache_dir) / f"{cfg.model.audio_encoder}-{_key(cfg)}"


def synth_clips(encoder: AudioEncoder, n: int, rng: np.random.Generator, *, max_seconds: float,
                batch_size: int = 32) -> dict[str, torch.Tensor]:
    """``n`` fresh scenes as the encoder's input features + their targets (rendered as the corpus's files are)."""
    target_sr = encoder.sampling_rate
    n_out = int(round(target_sr * max_seconds))
    feats, fracs, targets = [], [], []
    for start in range(0, n, batch_size):
        waves, valid = [], []
        for _ in range(min(batch_size, n - start)):
            scene = make_scene(rng)
            x = render_audio(scene, FILE_RATE, rng)
            x = np.round(x * 32767).astype(np.float32) / 32767  # PCM-16, as written to disk
            x = x[: int(np.ceil(max_seconds * FILE_RATE))]
            x, _ = peak_normalise(resample(x, FILE_RATE, target_sr))
            wave = np.zeros(n_out, np.float32)
            wave[: min(len(x), n_out)] = x[:n_out]
            waves.append(wave)
            valid.append(min(len(x), n_out))
            targets.append(scene_targets(scene))
        prepared = encoder.prepare(waves, valid)
        feats.append(prepared["audio"])
        fracs.append(prepared["audio_valid_frac"])
    out = {"audio": torch.cat(feats), "audio_valid_frac": torch.cat(fracs)}
    for k in [*HEADS, "span"]:
        out[k] = torch.from_numpy(np.stack([t[k] for t in targets]))
    return out


class ProbeHeads(nn.Module):
    """Linear read-outs of the pooled features, one per target; dropped after pretraining."""

    def __init__(self, dim: int):
        super().__init__()
        n = len(INSTRUMENTS)
        self.cls = nn.ModuleDict({k: nn.Linear(dim, n * c) for k, c in HEADS.items()})
        self.span = nn.Linear(dim, n)

    def forward(self, pooled: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss, acc = pooled.new_zeros(()), {}
        for k, c in HEADS.items():
            logits = self.cls[k](pooled).view(pooled.shape[0], len(INSTRUMENTS), c)
            loss = loss + nn.functional.cross_entropy(logits.reshape(-1, c), batch[k].reshape(-1))
            acc[k] = float((logits.argmax(-1) == batch[k]).float().mean())
        span_err = (self.span(pooled) - batch["span"]) ** 2
        loss = loss + 10.0 * span_err.mean()
        acc["span_rmse_s"] = float(span_err.detach().mean().sqrt()) * 10.0
        return loss, acc


def pretrain_tiny_audio(cfg: SAFEConfig, *, device: torch.device | str = "cpu") -> Path:
    """Train (or reuse) the tiny audio encoder on its own synthetic scenes; return its folder."""
    return build_once(pretrained_audio_folder(cfg), "pretrained tiny audio encoder",
                      lambda out: _build_tiny_audio(cfg, out, device))


def _build_tiny_audio(cfg: SAFEConfig, out: Path, device: torch.device | str) -> None:
    pre = cfg.train.pretrain.audio
    t0 = time.time()
    torch.manual_seed(pre.seed)
    model, fe = build_tiny_audio(cfg.model.audio_encoder, seed=cfg.model.tiny_seed + 1)
    encoder = AudioEncoder(model, fe)
    rng = np.random.default_rng(pre.seed)
    train = synth_clips(encoder, pre.clips, rng, max_seconds=cfg.data.max_audio_seconds)
    held_out = synth_clips(encoder, max(pre.batch_size, pre.clips // 5), rng, max_seconds=cfg.data.max_audio_seconds)
    log.info("pretrain audio: %d + %d synthetic clips rendered in %.0fs", pre.clips, len(held_out["audio"]),
             time.time() - t0)
    heads = ProbeHeads(encoder.output_dim)
    encoder.encoder.requires_grad_(True)
    encoder.to(device)
    heads.to(device)
    params = [*encoder.encoder.parameters(), *heads.parameters()]

    def run(batch: dict) -> tuple[torch.Tensor, dict]:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = encoder.encode(batch["audio"], batch["audio_valid_frac"])
        return heads(out.pooled, batch)

    encoder.encoder.train()
    batches, steps = epoch_batches(pre.clips, pre.batch_size, pre.epochs, pre.seed)
    loss = fit(params, pre.lr, batches, steps, lambda idx: run({k: v[idx] for k, v in train.items()})[0],
               what="audio")
    encoder.encoder.eval()
    with torch.no_grad():
        held_loss, held_acc = run(held_out)
    log.info("pretrain audio: held-out accuracy %s", {k: round(v, 3) for k, v in held_acc.items()})
    model.requires_grad_(False)
    model.to("cpu").save_pretrained(out)
    fe.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps({
        "steps": steps, "final_loss": loss, "held_out_loss": float(held_loss),
        "held_out": {k: round(v, 4) for k, v in held_acc.items()}, "clips": pre.clips,
        "held_out_clips": len(held_out["audio"]), "seconds": round(time.time() - t0, 1)}, indent=2))
