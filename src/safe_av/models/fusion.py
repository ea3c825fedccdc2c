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
        gate_scale: the gates are ``tanh(gate_scale * g)``. Adam moves ``g`` by about the learning rate per
            step whatever the gradient's size, so with scale 1 and the spec's small rates the gates stay
            near 0 for a whole short run (and the attention behind them gets almost no gradient); a larger
            scale opens them proportionally faster. They still start at exactly 0.
    """

    def __init__(self, hidden_dim: int, *, num_heads: int = 8, ffn_mult: int = 4, dropout: float = 0.1,
                 gate_scale: float = 1.0):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"model.fusion.num_heads={num_heads}: must divide the language model's hidden "
                             f"size {hidden_dim}")
        self.norm1 = nn.LayerNorm(hidden_dim)
        # The context's norm has no gain/bias of its own: the k/v projection right after it already has them
        # (W(g*x + b) + c = (W diag g) x + (W b + c)). With them, training would also need the gradient of
        # the k/v projection's *input* (one more matmul over every context token per step) for nothing it
        # could not learn anyway. Adapters saved with them load folded (``fold_context_norm``).
        self.norm_visual = nn.LayerNorm(hidden_dim, elementwise_affine=False)
        # cross-attention as three linears + torch's scaled_dot_product_attention: the same parameters and
        # maths as nn.MultiheadAttention, without its per-call packing/checking ops (a measurable share of a
        # small adapter's step, bench/step_overhead.py)
        self.num_heads = num_heads
        self.attn_dropout = dropout
        self.q_proj = nn.Linear(hidden_dim, hidden_dim)
        self.kv_proj = nn.Linear(hidden_dim, 2 * hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)
        for lin in (self.q_proj, self.kv_proj):  # nn.MultiheadAttention's initialisation
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.out_proj.bias)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.feedforward = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim * ffn_mult), nn.GELU(), nn.Linear(hidden_dim * ffn_mult, hidden_dim)
        )
        self.gate_scale = float(gate_scale)
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
        attn, weights = self._cross_attention(q, kv, ~key_padding, need_weights)
        gate = has_context.to(audio.dtype).view(-1, 1, 1)
        x = audio + gate * torch.tanh(self.gate_scale * self.attn_gate) * attn
        x = x + torch.tanh(self.gate_scale * self.ffn_gate) * self.feedforward(self.norm2(x))
        return (x, weights) if need_weights else x

    def _cross_attention(self, x: torch.Tensor, context: torch.Tensor, keep: torch.Tensor, need_weights: bool):
        """Multi-head attention of ``x`` (B, K, D) over ``context`` (B, C, D); ``keep`` (B, C) marks the keys.

        Returns the (B, K, D) output and, with ``need_weights``, the (B, K, C) weights averaged over heads.
        """
        b, k, d = x.shape
        c, h = context.shape[1], self.num_heads
        q = self.q_proj(x).view(b, k, h, d // h).transpose(1, 2)  # (B, h, K, d/h)
        key, value = self.kv_proj(context).view(b, c, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, C, d/h)
        mask = keep[:, None, None, :]  # (B, 1, 1, C), True = attend
        p = self.attn_dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ key.transpose(-1, -2)) * (d // h) ** -0.5
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            out = nn.functional.dropout(probs, p, self.training) @ value
            weights = probs.mean(1)
        else:
            out = nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=p)
        return self.out_proj(out.transpose(1, 2).reshape(b, k, d)), weights


def fold_context_norm(state_dict: dict, prefix: str = "fusion.") -> None:
    """In place: fold the context norm's gain and bias of an adapter saved before it lost them into the k/v
    projection, ``kv_proj(g * n + b) = (W * g) n + (W b + c)`` for the normalised context ``n``: same outputs.
    """
    gain, bias = state_dict.pop(prefix + "norm_visual.weight", None), state_dict.pop(prefix + "norm_visual.bias", None)
    if gain is None and bias is None:
        return
    w_key, b_key = prefix + "kv_proj.weight", prefix + "kv_proj.bias"
    if w_key not in state_dict:
        return
    weight = state_dict[w_key]
    if bias is not None and b_key in state_dict:
        state_dict[b_key] = state_dict[b_key] + weight @ bias.to(weight.dtype)
    if gain is not None:
        state_dict[w_key] = weight * gain.to(weight.dtype)
