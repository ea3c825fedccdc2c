"""FusionLayer's cross-attention equals torch's nn.MultiheadAttention with the same weights."""

import torch
from torch import nn

from safe_av.models.fusion import FusionLayer


def test_cross_attention_matches_multihead_attention_with_masks_and_weights():
    torch.manual_seed(0)
    d, h = 32, 4
    fusion = FusionLayer(d, num_heads=h, dropout=0.0).eval()
    mha = nn.MultiheadAttention(d, h, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([fusion.q_proj.weight, fusion.kv_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([fusion.q_proj.bias, fusion.kv_proj.bias]))
        mha.out_proj.weight.copy_(fusion.out_proj.weight)
        mha.out_proj.bias.normal_()
        fusion.out_proj.bias.copy_(mha.out_proj.bias)
    x, ctx = torch.randn(3, 5, d), torch.randn(3, 7, d)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[1, 4:] = False  # padded context
    want, want_w = mha(x, ctx, ctx, key_padding_mask=~keep, need_weights=True)
    got, got_w = fusion._cross_attention(x, ctx, keep, need_weights=True)
    fast, none = fusion._cross_attention(x, ctx, keep, need_weights=False)  # the SDPA path used in training
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast, want, atol=1e-5, rtol=1e-5)
    assert none is None and torch.all(got_w[1, :, 4:] == 0)


def test_gate_scale_keeps_closed_gates_closed():
    torch.manual_seed(0)
    fusion = FusionLayer(16, num_heads=2, gate_scale=10.0).train()
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 4, 16)
    out = fusion(x, ctx, torch.ones(2, 4, dtype=torch.bool))
    assert torch.equal(out, x)  # gates at 0: the audio tokens pass unchanged (DESIGN invariant 2)
    out.sum().backward()
    # the gates get gradient, scaled by gate_scale
    assert fusion.attn_gate.grad.abs().item() > 0 and fusion.ffn_gate.grad.abs().item() > 0
