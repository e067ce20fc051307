"""FastConformer encoder and ResNet1D frontend: shapes, lengths, padding invariance, context."""

from __future__ import annotations

import math

import pytest
import torch

from asrkd.models.common import make_pad_mask
from asrkd.models.encoder import (
    ConvSubsampling,
    FastConformerConfig,
    FastConformerEncoder,
    RelPositionalEncoding,
    RelPositionMultiHeadAttention,
    attention_block_mask,
    subsampled_lengths,
)
from asrkd.models.frontend import ResNet1D, ResNet1DConfig

F_DIM = 16


def small_config(**kw) -> FastConformerConfig:
    base = dict(
        input_dim=F_DIM,
        d_model=64,
        n_heads=4,
        n_layers=2,
        subsampling_channels=16,
        conv_kernel=9,
    )
    base.update(kw)
    return FastConformerConfig(**base)


def make_encoder(seed: int = 0, **kw) -> FastConformerEncoder:
    torch.manual_seed(seed)
    enc = FastConformerEncoder(small_config(**kw))
    # Non-trivial BatchNorm statistics and positional biases, so that the checks are not
    # passing thanks to identity-like defaults.
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, RelPositionMultiHeadAttention):
            with torch.no_grad():
                m.pos_bias_u.normal_()
                m.pos_bias_v.normal_()
    return enc.eval()


def _batch_vs_alone(model, lengths: list[int], out_fn, grad: bool = False) -> None:
    """Each utterance alone must match its slice of the padded batch (valid frames)."""
    torch.manual_seed(1)
    t_max = max(lengths)
    x = torch.randn(len(lengths), t_max, F_DIM)
    # Padding full of junk: it must be ignored, not just happen to be zero.
    pad = make_pad_mask(torch.tensor(lengths), t_max)
    x[pad] = 1e3
    with torch.set_grad_enabled(grad):
        y, y_len = out_fn(model(x, torch.tensor(lengths)))
        for b, n in enumerate(lengths):
            y1, y1_len = out_fn(model(x[b : b + 1, :n], torch.tensor([n])))
            assert int(y_len[b]) == int(y1_len[0]) == y1.size(1)
            torch.testing.assert_close(y[b, : y1.size(1)], y1[0], atol=1e-5, rtol=1e-5)
            # Padded positions are zero.
            assert torch.all(y[b, int(y_len[b]) :] == 0)


@pytest.mark.parametrize("att_context", [None, (8, 2), (-1, 0)])
@pytest.mark.parametrize("conv_norm", ["batch_norm", "layer_norm"])
def test_encoder_padding_invariance(att_context, conv_norm):
    enc = make_encoder(att_context=att_context, conv_norm=conv_norm)
    _batch_vs_alone(enc, [200, 137, 61, 8, 1], lambda o: (o.output, o.lengths))


def test_encoder_grad_and_no_grad_paths_agree():
    """The subsampling takes a different (faster) route without autograd: same function."""
    enc = make_encoder()
    # Lengths of every parity, so each stage sees both even and odd lengths.
    lengths = [203, 202, 100, 64, 33, 17, 2]
    _batch_vs_alone(enc, lengths, lambda o: (o.output, o.lengths), grad=True)
    x = torch.randn(len(lengths), 203, F_DIM)
    with torch.no_grad():
        y0 = enc(x, torch.tensor(lengths)).output
    y1 = enc(x, torch.tensor(lengths)).output
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)


def test_hidden_states_padding_invariance_and_count():
    enc = make_encoder(n_layers=3)
    x = torch.randn(2, 90, F_DIM)
    out = enc(x, torch.tensor([90, 41]), return_hidden=True)
    assert out.hidden_states is not None and len(out.hidden_states) == 3
    torch.testing.assert_close(out.hidden_states[-1], out.output)
    assert out.output.shape == (2, subsampled_lengths(90, 8), 64)
    assert enc.output_dim == 64

    def encode_hidden(x, lengths):
        return enc(x, lengths, return_hidden=True)

    _batch_vs_alone(encode_hidden, [90, 41], lambda o: (o.hidden_states[0], o.lengths))
    assert enc(x, torch.tensor([90, 41])).hidden_states is None


def test_masked_batchnorm_training_ignores_padding():
    """Training-mode statistics use valid frames only, so padding changes nothing."""
    enc = make_encoder(dropout=0.0, dropout_pre_encoder=0.0, dropout_att=0.0).train()
    torch.manual_seed(2)
    x = torch.randn(2, 120, F_DIM)
    lengths = torch.tensor([120, 70])
    y = enc(x, lengths).output
    x_more = torch.cat([x, torch.randn(2, 40, F_DIM)], dim=1)  # 40 more padded frames
    y_more = enc(x_more, lengths).output
    torch.testing.assert_close(y_more[:, : y.size(1)], y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv_context", [None, (8, 0)])
def test_limited_context_lookahead(conv_context):
    """With att_context=(L, R), output frame t only depends on input up to a known frame.

    Receptive field to the right, in subsampled frames: every layer adds R (attention) plus the
    depthwise conv's right context (4 for the symmetric kernel 9, 0 for the causal one), since
    the conv module reads attention outputs of its neighbours. The
    8x subsampling's output frame k reads input frames up to 8k + 7.
    """
    n_layers, right = 2, 2
    enc = make_encoder(n_layers=n_layers, att_context=(8, right), conv_context=conv_context)
    conv_right = 4 if conv_context is None else conv_context[1]
    torch.manual_seed(3)
    x = torch.randn(1, 400, F_DIM)
    lengths = torch.tensor([400])
    change_from = 250
    x2 = x.clone()
    x2[:, change_from:] = torch.randn(1, 400 - change_from, F_DIM)
    with torch.no_grad():
        y = enc(x, lengths).output[0]
        y2 = enc(x2, lengths).output[0]
    first_touched = math.ceil((change_from - 7) / 8)  # first subsampled frame reading the change
    safe = first_touched - n_layers * (right + conv_right)  # frames < safe cannot see it
    torch.testing.assert_close(y2[:safe], y[:safe], atol=1e-6, rtol=1e-6)
    # The bound is tight: the next frame does change (weakly: one path through edge weights).
    assert (y2[safe] - y[safe]).abs().max() > 1e-8


def test_limited_context_left():
    """Frames far enough after a change (beyond the left context) don't see it either."""
    n_layers, left = 2, 3
    enc = make_encoder(n_layers=n_layers, att_context=(left, 0), conv_context=(8, 0))
    torch.manual_seed(4)
    x = torch.randn(1, 400, F_DIM)
    x2 = x.clone()
    x2[:, :16] += 1.0  # touches subsampled frames 0..2 (frame k reads input from 8k - 7)
    lengths = torch.tensor([400])
    with torch.no_grad():
        y = enc(x, lengths).output[0]
        y2 = enc(x2, lengths).output[0]
    # Per layer the look-back is the attention's plus the conv's (8): the conv reads attention
    # outputs of the frames before it.
    start = 2 + n_layers * (left + 8) + 1
    torch.testing.assert_close(y2[start:], y[start:], atol=1e-6, rtol=1e-6)
    assert (y2[start - 1] - y[start - 1]).abs().max() > 1e-8


@pytest.mark.parametrize("factor", [4, 8])
def test_subsampled_lengths_match_convs(factor):
    torch.manual_seed(0)
    sub = ConvSubsampling(F_DIM, 8, factor=factor, channels=4).eval()
    computed = subsampled_lengths(torch.arange(1, 201), factor)
    with torch.no_grad():
        for n in range(1, 201):
            y, y_len = sub(torch.randn(1, n, F_DIM), torch.tensor([n]))
            assert y.size(1) == int(computed[n - 1]) == int(y_len[0]), n
            assert subsampled_lengths(n, factor) == y.size(1)
    # Exact arithmetic: floor((L + 2 - 3) / 2) + 1 per stage, i.e. ceil(L / 2).
    expected = torch.arange(1, 201)
    for _ in range(int(math.log2(factor))):
        expected = (expected + 2 - 3) // 2 + 1
    assert torch.equal(computed, expected)


@pytest.mark.parametrize("att_context", [None, (4, 1), (0, 0)])
def test_short_inputs_no_nan(att_context):
    enc = make_encoder(att_context=att_context)
    for n in range(1, 9):
        with torch.no_grad():
            out = enc(torch.randn(1, n, F_DIM), torch.tensor([n]))
        assert out.output.shape == (1, 1, 64)
        assert torch.isfinite(out.output).all()
    # Mixed short lengths in one batch, in training mode too (gradients finite).
    enc.train()
    x = torch.randn(4, 30, F_DIM, requires_grad=True)
    out = enc(x, torch.tensor([30, 9, 3, 1]))
    assert torch.isfinite(out.output).all()
    out.output.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_attention_matches_explicit_formula():
    """SDPA + rel_shift path equals the written-out Transformer-XL score, on valid rows."""
    torch.manual_seed(5)
    att = RelPositionMultiHeadAttention(32, 4)
    with torch.no_grad():
        att.pos_bias_u.normal_()
        att.pos_bias_v.normal_()
    t = 7
    x = torch.randn(2, t, 32)
    pos = RelPositionalEncoding(32)(t)
    pad = make_pad_mask(torch.tensor([7, 4]), t)
    blocked = attention_block_mask(pad, (2, 1))
    y = att(x, pos, blocked)

    q, k, v = att.qkv(x).view(2, t, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    p = att.linear_pos(pos).view(1, -1, 4, 8).transpose(1, 2)  # row r: rel. position t-1-r
    rel = torch.arange(t)[:, None] - torch.arange(t)[None, :]  # i - j
    p_ij = p[:, :, (t - 1) - rel]  # (1, H, T, T, dk)
    ac = (q + att.pos_bias_u[:, None]) @ k.transpose(-1, -2)
    bd = ((q + att.pos_bias_v[:, None]).unsqueeze(3) * p_ij).sum(-1)
    scores = ((ac + bd) / math.sqrt(8)).masked_fill(blocked, -1e30)
    ref = att.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, t, 32))
    valid = ~pad
    torch.testing.assert_close(y[valid], ref[valid], atol=1e-5, rtol=1e-5)
    # Gradients too (SDPA must differentiate through the float bias). Padded query rows are
    # left out: the encoder zeroes them, and their (unused) gradients legitimately differ.
    params = [att.qkv.weight, att.linear_pos.weight, att.pos_bias_u, att.pos_bias_v]
    g = torch.autograd.grad(y[valid].square().sum(), params, retain_graph=True)
    g_ref = torch.autograd.grad(ref[valid].square().sum(), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_small_config_param_count():
    """FastConformer-Small (d176, 16 layers, 4 heads, 256 channels, kernel 9): NeMo 12.6 M."""
    enc = FastConformerEncoder(FastConformerConfig())
    n = sum(p.numel() for p in enc.parameters())
    assert abs(n - 12.6e6) / 12.6e6 < 0.02, n


def test_config_validation():
    with pytest.raises(ValueError):
        small_config(subsampling_factor=6)
    with pytest.raises(ValueError):
        small_config(conv_context=(3, 3))
    with pytest.raises(ValueError):
        small_config(d_model=66)


# ------------------------------------------------------------------------------------------
# ResNet1D
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strides", [(1, 1), (2, 1), (2, 2)])
def test_resnet1d_padding_invariance(strides):
    torch.manual_seed(0)
    cfg = ResNet1DConfig(input_dim=F_DIM, channels=(24, 32), blocks_per_stage=2, strides=strides)
    net = ResNet1D(cfg).eval()
    assert net.output_dim == 32
    _batch_vs_alone(net, [50, 33, 7, 1], lambda o: o)


def test_resnet1d_shapes_lengths_flops():
    cfg = ResNet1DConfig(input_dim=F_DIM, channels=(8, 8), strides=(2, 2), kernel_size=5)
    net = ResNet1D(cfg)
    assert net.subsampling_factor == 4
    y, y_len = net(torch.randn(3, 21, F_DIM), torch.tensor([21, 10, 1]))
    assert y.shape == (3, 6, 8)
    assert y_len.tolist() == [6, 3, 1]
    # Stage 1 (T' = 11): conv1 16->8 k5, conv2 8->8 k5, skip 16->8; stage 2 (T' = 6): no skip
    # change of channels but a stride, so a skip projection too.
    expected = 2 * (11 * (16 * 8 * 5 + 8 * 8 * 5 + 16 * 8) + 6 * (8 * 8 * 5 * 2 + 8 * 8))
    assert net.flops(21) == expected
