"""Frozen audio encoders: CLAP's audio tower (HTSAT) and Whisper's encoder, with their feature extractors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class AudioEncoderOutput:
    tokens: torch.Tensor
    """(B, T, D) encoder tokens."""
    mask: torch.Tensor
    """(B, T) bool, True on tokens that cover real (not padded) audio."""
    pooled: torch.Tensor
    """(B, D) masked mean of the tokens."""


def masked_pool(tokens: torch.Tensor, mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Average the valid tokens of each row into ``num_tokens`` equal temporal segments.

    Args:
        tokens: (B, T, D).
        mask: (B, T) bool; valid tokens form a prefix of each row.
        num_tokens: K, segments per row.

    Returns:
        (B, K, D). Segment k of a row with L valid tokens averages tokens ``[floor(kL/K), floor((k+1)L/K))``
        (at least one token each).
    """
    b, t, d = tokens.shape
    lengths = mask.sum(1).clamp(min=1)  # (B,)
    pos = torch.arange(t, device=tokens.device).unsqueeze(0)  # (1, T)
    seg = torch.div(pos * num_tokens, lengths.unsqueeze(1), rounding_mode="floor").clamp(max=num_tokens - 1)
    weights = torch.nn.functional.one_hot(seg, num_tokens).to(tokens.dtype) * mask.unsqueeze(-1)  # (B, T, K)
    sums = torch.einsum("btk,btd->bkd", weights, tokens)
    counts = weights.sum(1).clamp(min=1).unsqueeze(-1)  # (B, K, 1)
    pooled = sums / counts
    # rows shorter than K tokens: empty segments repeat the nearest token instead of staying zero
    empty = weights.sum(1) == 0  # (B, K)
    if empty.any():
        near = torch.div(torch.arange(num_tokens, device=tokens.device).unsqueeze(0) * lengths.unsqueeze(1),
                         num_tokens, rounding_mode="floor")  # (B, K)
        fill = tokens.gather(1, near.unsqueeze(-1).expand(-1, -1, d))
        pooled = torch.where(empty.unsqueeze(-1), fill, pooled)
    return pooled


class AudioEncoder(nn.Module):
    """A frozen CLAP audio tower or Whisper encoder returning tokens + mask + pooled.

    Args:
        model: a transformers ``ClapModel`` or ``WhisperModel`` (only the audio part is kept).
        feature_extractor: its ``ClapFeatureExtractor`` / ``WhisperFeatureExtractor``.
    """

    def __init__(self, model: nn.Module, feature_extractor):
        super().__init__()
        kind = model.config.model_type
        if kind == "clap":
            self.encoder = model.audio_model
            self.output_dim = model.config.audio_config.hidden_size
        elif kind == "whisper":
            self.encoder = model.get_encoder()
            self.output_dim = model.config.d_model
        else:
            raise ValueError(f"audio encoder model_type {kind!r} is not supported (clap, whisper)")
        self.kind = kind
        self.feature_extractor = feature_extractor
        self.sampling_rate = int(feature_extractor.sampling_rate)
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True):
        # Frozen: always in eval mode (no dropout), whatever the parent does.
        super().train(mode)
        self.encoder.eval()
        return self

    def config_fingerprint(self) -> dict:
        """What determines the encoder's output: used as the feature cache's key.

        Holds a digest of the weights, so two encoders with one config but different weights (a tiny
        preset before and after its pretraining, two fine-tuned checkpoints) never share cached features.
        """
        return {"kind": self.kind, "encoder": self.encoder.config.to_dict(),
                "feature_extractor": self.feature_extractor.to_dict(), "weights": weights_digest(self.encoder)}

    def prepare(self, waveforms: list[np.ndarray], num_valid: list[int]) -> dict[str, torch.Tensor]:
        """See :func:`prepare_audio`."""
        return prepare_audio(self.feature_extractor, self.kind, waveforms, num_valid)

    @torch.no_grad()
    def forward(self, audio_values: torch.Tensor, audio_valid_frac: torch.Tensor) -> AudioEncoderOutput:
        """(B, ...) input features -> tokens (B, T, D), mask (B, T), pooled (B, D); frozen (no gradients)."""
        return self.encode(audio_values, audio_valid_frac)

    def encode(self, audio_values: torch.Tensor, audio_valid_frac: torch.Tensor) -> AudioEncoderOutput:
        """:meth:`forward` with autograd left on (for pretraining a tiny encoder)."""
        dtype = next(self.encoder.parameters()).dtype
        if self.kind == "clap":
            out = self.encoder(input_features=audio_values.to(dtype), return_dict=True)
            # HTSAT's last map is (B, C, F, T): average the frequency rows, keep time order
            tokens = out.last_hidden_state.mean(2).transpose(1, 2)  # (B, T, C)
        else:
            tokens = self.encoder(audio_values.to(dtype), return_dict=True).last_hidden_state  # (B, T, D)
        t = tokens.shape[1]
        valid = torch.ceil(audio_valid_frac.to(tokens.device).float() * t).long().clamp(1, t)
        mask = torch.arange(t, device=tokens.device).unsqueeze(0) < valid.unsqueeze(1)
        pooled = (tokens * mask.unsqueeze(-1)).sum(1) / valid.unsqueeze(1).to(tokens.dtype)
        return AudioEncoderOutput(tokens=tokens, mask=mask, pooled=pooled)



def weights_digest(module: nn.Module, *, max_elements: int = 1 << 16) -> str:
    """A short digest of a module's parameters (a strided sample of each tensor: fast on large models)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // max_elements)
        h.update(name.encode())
        h.update(flat[::step].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def prepare_audio(feature_extractor, kind: str, waveforms: list[np.ndarray],
                  num_valid: list[int]) -> dict[str, torch.Tensor]:
    """Run an encoder's own feature extractor (on CPU, in the DataLoader's collate).

    Args:
        feature_extractor: ``ClapFeatureExtractor`` or ``WhisperFeatureExtractor``.
        kind: ``clap`` or ``whisper``.
        waveforms: mono float32 arrays at the extractor's rate, already padded to the clip length.
        num_valid: true (unpadded) length of each, in samples.

    Returns:
        ``audio`` (the encoder's input features, (N, ...)) and ``audio_valid_frac`` (N,), the fraction of
        the encoder's time axis that holds real audio.
    """
    sr = int(feature_extractor.sampling_rate)
    if kind == "clap":
        # Zero-padded clips (not CLAP's repeat-padding): a repeated clip would double its events, and
        # counting / temporal questions need the real time axis; the mask marks the padding instead.
        total = int(feature_extractor.nb_max_samples)
        clips = [np.pad(w[:total], (0, max(0, total - len(w)))) for w in waveforms]
        feats = feature_extractor(clips, sampling_rate=sr, return_tensors="pt", padding="pad", truncation="rand_trunc")
    else:
        feats = feature_extractor(list(waveforms), sampling_rate=sr, return_tensors="pt")
        total = feature_extractor.n_samples
    frac = torch.tensor([min(max(int(n), 1) / total, 1.0) for n in num_valid])
    return {"audio": feats["input_features"], "audio_valid_frac": frac}
