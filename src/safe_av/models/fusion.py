"""FusionLayer: audio tokens attend to the sample's visual tokens, behind zero-initialised tanh gates."""

from __future__ import annotations

import torch
from torch import nn


class FusionLayer(nn.Module):
    """Gated cross-attention block (pre-norm, as open_flamingo's gated x-attn).

    ``x = x + tanh(g_attn) * MHA(LN(x), LN_c(c))`` then ``x = x + tanh(g_ffn) * FFN(LN(x))``, where the
    context ``c`` is the sample's visual tokens and (the spec's "text input -> fusion layer") the
    embeddings of its prompt, so the audio tokens can be read in the light of the question.
    Both gates start at 0, so adding the layer leaves the audio tokens - and every output - unchanged
    at its first step (DESIGN invariant 2). A pre-norm block is used because a post-norm block
    (``LN(x + 0)``) would change the tokens even with closed gates.

    Args:
        hidden_dim: the language model's embedding width.
        num_heads: attention heads (spec: 8); must divide ``hidden_dim``.
        ffn_mult: FFN expansion (spec: 4).
        dropout: attention dropout (spec: 0.1).
    """

    def __init__(self, hidden_dim: int, *, num_heads: int = 8, ffn_mult: int = 4, dropout: float = 0.1):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"model.fusion.num_heads={num_heads}: must divide the language model's hidden "
                             f"size {hidden_dim}")
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm_visual = nn.LayerNorm(hidden_dim)
        self.cross_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.feedforward = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim * ffn_mult), nn.GELU(), nn.Linear(hidden_dim * ffn_mult, hidden_dim)
        )
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(self, audio: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor,
                *, need_weights: bool = False):
        """Fuse audio tokens with their sample's context.

        Args:
            audio: (B, K, D) audio tokens.
            context: (B, C, D) visual tokens and/or prompt embeddings of the same samples.
            context_mask: (B, C) bool, True on real context tokens; a row without any attends to nothing.
            need_weights: also return the (B, K, C) attention weights.
        """
        q = self.norm1(audio)
        kv = self.norm_visual(context.to(q.dtype))
        has_context = context_mask.any(1)  # (B,)
        # a row with no context gets one unmasked dummy key (its output is zeroed below): no NaN softmax
        key_padding = ~context_mask
        key_padding[:, 0] &= has_context
        attn, weights = self.cross_attention(q, kv, kv, key_padding_mask=key_padding, need_weights=need_weights)
        gate = has_context.to(audio.dtype).view(-1, 1, 1)
        x = audio + gate * torch.tanh(self.attn_gate) * attn
        x = x + torch.tanh(self.ffn_gate) * self.feedforward(self.norm2(x))
        return (x, weights) if need_weights else x
