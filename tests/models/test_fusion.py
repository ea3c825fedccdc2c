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


def test_packed_context_gives_the_same_output_as_the_masked_full_context():
    """SAFEModel packs each row's prompt tokens to the front and drops the masked rest: same attention."""
    from safe_av.models.safe_model import _pack

    torch.manual_seed(0)
    d = 16
    fusion = FusionLayer(d, num_heads=2, dropout=0.0).eval()
    with torch.no_grad():
        fusion.attn_gate.fill_(1.0)
        fusion.ffn_gate.fill_(0.5)
    x, ctx = torch.randn(4, 3, d), torch.randn(4, 9, d)
    keep = torch.zeros(4, 9, dtype=torch.bool)
    keep[0, [1, 2, 7]] = True  # holes
    keep[1, 3:9] = True
    keep[2, 0] = True
    # row 3 keeps nothing: it attends to nothing, whichever way
    packed, packed_keep = _pack(ctx, keep)
    assert packed.shape == (4, 6, d) and packed_keep.sum(1).tolist() == [3, 6, 1, 0]
    assert torch.equal(packed[0, :3], ctx[0, [1, 2, 7]])  # in order
    with torch.no_grad():
        want = fusion(x, ctx, keep)
        got = fusion(x, packed, packed_keep)
        alone = x[3] + torch.tanh(fusion.ffn_gate) * fusion.feedforward(fusion.norm2(x[3]))  # no attention
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[3], alone, atol=1e-6, rtol=1e-6)


def test_context_norm_gain_and_bias_of_an_old_adapter_fold_into_the_kv_projection():
    from safe_av.models.fusion import fold_context_norm

    torch.manual_seed(0)
    d = 16
    old = FusionLayer(d, num_heads=2, dropout=0.0).eval()
    old.norm_visual = nn.LayerNorm(d)  # the layout before: its own gain and bias
    with torch.no_grad():
        old.norm_visual.weight.uniform_(0.5, 2.0)
        old.norm_visual.bias.normal_()
        old.attn_gate.fill_(1.0)
    state = {f"fusion.{k}": v for k, v in old.state_dict().items()}
    fold_context_norm(state)
    assert "fusion.norm_visual.weight" not in state and "fusion.norm_visual.bias" not in state
    new = FusionLayer(d, num_heads=2, dropout=0.0).eval()
    new.load_state_dict({k.removeprefix("fusion."): v for k, v in state.items()})  # strict: nothing left over
    x, ctx = torch.randn(2, 3, d), torch.randn(2, 5, d)
    keep = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(new(x, ctx, keep), old(x, ctx, keep), atol=1e-5, rtol=1e-5)
    assert not any("norm_visual" in n for n, _ in new.named_parameters())
