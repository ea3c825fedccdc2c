"""AudioProjector: audio-encoder tokens -> language-model embedding space."""

from __future__ import annotations

import torch
from torch import nn


class AudioProjector(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> LayerNorm (the spec's projector).

    Args:
        audio_dim: width of the audio encoder's tokens (from its config).
        output_dim: the language model's embedding width (from its config).
        hidden_dim: MLP width (spec: 4096).
        dropout: dropout after the GELU (spec: 0.1).
        output_scale: initial LayerNorm gain. The LM's own token embeddings are usually far from unit
            variance; starting the audio tokens at the embeddings' RMS keeps them in the range the frozen
            LM was trained on. The gain stays trainable.
    """

    def __init__(self, audio_dim: int, output_dim: int, *, hidden_dim: int = 4096, dropout: float = 0.1,
                 output_scale: float = 1.0):
        super().__init__()
        self.projection = nn.Sequential(
            nn.Linear(audio_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, output_dim),
            nn.LayerNorm(output_dim),
        )
        with torch.no_grad():
            self.projection[-1].weight.fill_(output_scale)
        # Per-channel statistics of the frozen encoder's features (identity until set): a frozen encoder's
        # features share a large constant part across clips, which would otherwise drown what differs.
        self.register_buffer("input_mean", torch.zeros(audio_dim))
        self.register_buffer("input_std", torch.ones(audio_dim))

    @torch.no_grad()
    def set_input_stats(self, features: torch.Tensor) -> None:
        """Standardise inputs with the mean/std of ``features`` (N, ..., D_audio), e.g. the training clips."""
        flat = features.reshape(-1, features.shape[-1]).float()
        self.input_mean.copy_(flat.mean(0))
        self.input_std.copy_(flat.std(0).clamp(min=1e-4))

    def forward(self, audio_tokens: torch.Tensor) -> torch.Tensor:
        """(B, K, D_audio) -> (B, K, D_lm)."""
        return self.projection((audio_tokens - self.input_mean) / self.input_std)
