"""FastConformer encoder (the "dw_striding" FastConformer recipe), written for padding invariance.

Layout of one forward pass::

    features (B, T, F) --ConvSubsampling (8x)--> (B, T', D) --* sqrt(D)--> dropout
        --> n_layers x ConformerLayer (rel-pos MHSA, conv module) --> (B, T', D), zero on padding

Padding invariance (docs/CONVENTIONS.md): in eval mode an utterance gives the same output on its
valid frames whether it is alone or padded inside a batch. Every module that mixes frames
(subsampling convs, depthwise conv, attention) zeroes or masks padded frames first; everything
else works frame by frame. BatchNorm in the conv module uses masked statistics in training so
that even training-mode statistics ignore padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from asrkd.errors import ConfigError
from asrkd.models.common import make_pad_mask

ATT_CONTEXT_STYLES = ("regular", "chunked_limited")

__all__ = [
    "ConformerConvModule",
    "ConformerLayer",
    "ConvSubsampling",
    "EncoderOutput",
    "FastConformerConfig",
    "FastConformerEncoder",
    "LinearSubsampling",
    "MaskedBatchNorm1d",
    "RelPositionMultiHeadAttention",
    "RelPositionalEncoding",
    "attention_block_mask",
    "rel_shift",
    "subsampled_lengths",
]


@dataclass(frozen=True)
class FastConformerConfig:
    """FastConformer hyper-parameters (defaults: FastConformer-Small, ~13 M parameters).

    Attributes:
        input_dim: feature dimension F (log-mel bins, or a frontend's ``output_dim``).
        d_model: model width D.
        n_heads: attention heads (D must be divisible by it).
        n_layers: conformer blocks.
        ff_expansion: hidden width of the feed-forward modules is ``ff_expansion * D``.
        conv_kernel: depthwise kernel of the conv module (odd).
        subsampling: ``"dw_striding"`` (FastConformer's depthwise-striding convs over the
            (time, feature) plane) or ``"none"`` (a linear projection of each frame, no time
            reduction: for a frontend that strides in time itself; ``subsampling_factor`` 1).
        subsampling_factor: time reduction of the striding convs, a power of two (2, 4, 8, 16);
            1 with ``subsampling: none``.
        subsampling_channels: channels of the striding convs.
        att_context: ``(left, right)`` frames at the subsampled rate that each frame may attend
            to (``[t - left, t + right]``); ``-1`` on a side means unlimited; ``None`` = full
            context.
        att_context_style: ``"regular"``: each frame sees ``[t - left, t + right]``;
            ``"chunked_limited"`` (NeMo's cache-aware streaming FastConformer): frames are cut
            into chunks of ``right + 1``; a frame sees its whole chunk and the
            ``left // (right + 1)`` chunks before it (``left = -1``: all of them), so a chunk
            can be encoded as it arrives, with a cache of the frames before it (see
            :mod:`asrkd.streaming`).
        conv_context: ``(left, right)`` frames the depthwise conv sees, ``left + right + 1 ==
            conv_kernel``; ``None`` = symmetric. Use ``(conv_kernel - 1, 0)`` (causal, as NeMo's
            streaming models) to keep the look-ahead of a limited-context model at
            ``att_context[1]`` frames per layer; the symmetric conv adds ``(conv_kernel - 1) // 2``.
        conv_norm: ``"batch_norm"`` (masked statistics) or ``"layer_norm"`` in the conv module.
        dropout: residual and feed-forward dropout.
        dropout_pre_encoder: dropout on the scaled subsampling output.
        dropout_emb: dropout on the relative positional embeddings.
        dropout_att: dropout on the attention probabilities.
        xscaling: multiply the subsampling output by ``sqrt(D)`` (as NeMo).
    """

    input_dim: int = 80
    d_model: int = 176
    n_heads: int = 4
    n_layers: int = 16
    ff_expansion: int = 4
    conv_kernel: int = 9
    subsampling: str = "dw_striding"
    subsampling_factor: int = 8
    subsampling_channels: int = 256
    att_context: tuple[int, int] | None = None
    att_context_style: str = "regular"
    conv_context: tuple[int, int] | None = None
    conv_norm: str = "batch_norm"
    dropout: float = 0.1
    dropout_pre_encoder: float = 0.1
    dropout_emb: float = 0.0
    dropout_att: float = 0.1
    xscaling: bool = True

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or self.d_model % 2:
            raise ConfigError(f"d_model={self.d_model} must be even and divisible by n_heads")
        if self.conv_kernel % 2 == 0:
            raise ConfigError(f"conv_kernel={self.conv_kernel} must be odd")
        if self.subsampling == "dw_striding":
            if self.subsampling_factor < 2:
                raise ConfigError(
                    f"subsampling_factor={self.subsampling_factor}: dw_striding needs >= 2 "
                    "(use subsampling: none for a frontend that subsamples itself)"
                )
            _num_subsampling_stages(self.subsampling_factor)
        elif self.subsampling == "none":
            if self.subsampling_factor != 1:
                raise ConfigError(
                    f"subsampling: none reduces no frames, so subsampling_factor must be 1, "
                    f"not {self.subsampling_factor}"
                )
        else:
            raise ConfigError(
                f"subsampling must be 'dw_striding' or 'none', not {self.subsampling!r}"
            )
        if self.conv_norm not in ("batch_norm", "layer_norm"):
            raise ConfigError(
                f"conv_norm must be 'batch_norm' or 'layer_norm', not {self.conv_norm}"
            )
        if self.att_context is not None and (
            len(self.att_context) != 2 or min(self.att_context) < -1
        ):
            raise ConfigError(
                f"att_context must be (left, right) with values >= -1: {self.att_context}"
            )
        if self.att_context_style not in ATT_CONTEXT_STYLES:
            raise ConfigError(
                f"att_context_style must be one of {ATT_CONTEXT_STYLES}, "
                f"not {self.att_context_style!r}"
            )
        if self.att_context_style == "chunked_limited" and (
            self.att_context is None or self.att_context[1] < 0
        ):
            raise ConfigError(
                "att_context_style: chunked_limited needs att_context (left, right) with "
                f"right >= 0 (chunks of right + 1 frames), not {self.att_context}"
            )
        if self.conv_context is not None and (
            len(self.conv_context) != 2
            or min(self.conv_context) < 0
            or sum(self.conv_context) + 1 != self.conv_kernel
        ):
            raise ConfigError(
                f"conv_context {self.conv_context} must be (left, right) >= 0 with "
                f"left + right + 1 == conv_kernel ({self.conv_kernel})"
            )


class EncoderOutput(NamedTuple):
    """What an encoder returns.

    Attributes:
        output: (B, T', D) encoder states, zero on padded frames.
        lengths: (B,) valid lengths of ``output``.
        hidden_states: output of every conformer block, each (B, T', D) and zero on padding,
            or None when not asked for.
    """

    output: torch.Tensor
    lengths: torch.Tensor
    hidden_states: list[torch.Tensor] | None = None


# --------------------------------------------------------------------------------------------
# Subsampling
# --------------------------------------------------------------------------------------------


def _num_subsampling_stages(factor: int) -> int:
    if factor < 1 or factor & (factor - 1):
        raise ConfigError(f"subsampling_factor must be a power of two, not {factor}")
    return factor.bit_length() - 1


def _conv_out_length(lengths: torch.Tensor | int) -> torch.Tensor | int:
    """Length after one k3 / s2 / p1 conv: ``floor((L + 2 - 3) / 2) + 1`` (0 stays 0)."""
    if isinstance(lengths, torch.Tensor):
        return torch.div(lengths + 2 - 3, 2, rounding_mode="floor") + 1
    return (lengths + 2 - 3) // 2 + 1


def subsampled_lengths(lengths: torch.Tensor | int, factor: int) -> torch.Tensor | int:
    """Valid lengths after the striding convs of :class:`ConvSubsampling`.

    Args:
        lengths: (B,) int64 input lengths (or one int).
        factor: subsampling factor, a power of two (1: no subsampling).

    Returns:
        Same type and shape as ``lengths``: ``ceil(L / 2)`` applied ``log2(factor)`` times.
    """
    for _ in range(_num_subsampling_stages(factor)):
        lengths = _conv_out_length(lengths)
    return lengths


def _mask_frames(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Make the frames a following k3 / s2 / p1 conv reads past ``lengths`` zero.

    With autograd: every padded frame, out of place (``x * valid``: one pass forward and one
    backward; ``masked_fill_`` needs two backward, and in-place ops on views make autograd clone
    the whole gradient). Without: only frame ``lengths[b]``, the one such a conv can read (see
    :class:`ConvSubsampling`), in place, which costs next to nothing.

    Args:
        x: (B, T, ...) activations, time at dim 1.
        lengths: (B,) valid frames.

    Returns:
        (B, T, ...), ``x`` itself without autograd.
    """
    b, t = x.shape[:2]
    trailing = [1] * (x.dim() - 2)
    if torch.is_grad_enabled():
        valid = ~make_pad_mask(lengths, t)
        return x * valid.view(b, t, *trailing).to(x.dtype)
    rows = torch.arange(b, device=x.device)
    cols = lengths.clamp(max=t - 1)
    # Utterances that fill all T frames have no padded frame: multiply their last frame by 1.
    keep = (lengths >= t).to(x.dtype).view(b, *trailing)
    x[rows, cols] = x[rows, cols] * keep  # (B, ...)
    return x


class ConvSubsampling(nn.Module):
    """Depthwise-striding conv subsampling of FastConformer.

    Stage 1: conv2d k3 s2 (1 -> C) + ReLU; every further stage: depthwise conv2d k3 s2, pointwise
    1x1, ReLU. Then the (C, F') planes of each frame are flattened (channel-major) and projected
    to ``d_model``.

    Padding invariance: a valid output frame j < ceil(L / 2) of a k3 / s2 / p1 conv reads input
    frames up to 2j + 1 <= L, i.e. at most the *first* padded frame L. For the utterance alone
    that frame is the conv's zero padding, so zeroing it (and the input padding) makes the batch
    case identical. Without autograd only that one frame per utterance is zeroed (saves a pass
    over the largest tensors of the encoder); with autograd all padded frames are (see
    :func:`_mask_frames`). Frames after L may keep finite garbage that no valid frame reads;
    later modules mask them.

    Speed (CPU): activations stay channels-last (B, T, F, C in memory), which oneDNN's convs
    handle without the layout reorders NCHW costs; the 1x1 convs run as one GEMM over that
    layout (PyTorch would otherwise pick its slow reference conv for them in training).

    Args:
        input_dim: feature dimension F.
        d_model: output dimension.
        factor: time (and frequency) reduction, a power of two.
        channels: conv channels C.
    """

    def __init__(self, input_dim: int, d_model: int, factor: int = 8, channels: int = 256):
        super().__init__()
        self.factor = factor
        n_stages = _num_subsampling_stages(factor)
        stages: list[nn.Module] = [nn.Conv2d(1, channels, kernel_size=3, stride=2, padding=1)]
        for _ in range(n_stages - 1):
            stages.append(
                nn.Sequential(
                    nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels),
                    nn.Conv2d(channels, channels, kernel_size=1),
                )
            )
        self.stages = nn.ModuleList(stages)
        freq = input_dim
        for _ in range(n_stages):
            freq = _conv_out_length(freq)
        self.out = nn.Linear(channels * freq, d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Subsample.

        Args:
            x: (B, T, F) features.
            lengths: (B,) valid frames.

        Returns:
            (B, T', D) subsampled sequence (not masked: the projection works frame by frame, and
            later modules mask) and its (B,) lengths.
        """
        # Zero all input padding (not just frame L): it may hold anything, even NaN.
        x = x.masked_fill(make_pad_mask(lengths, x.size(1)).unsqueeze(-1), 0.0)
        # (B, 1, T, F) with channels-last strides: oneDNN then writes channels-last output.
        x = x.unsqueeze(-1).permute(0, 3, 1, 2)
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            lengths = _conv_out_length(lengths)
            if i == 0:
                x = stage(x).transpose(1, 2)  # (B, T_1, C, F_1), a view of channels-last memory
            else:
                depthwise, pointwise = stage
                x = depthwise(x)
                b, c, t, f = x.shape
                # The 1x1 conv as one GEMM over the channels-last memory.
                weight = pointwise.weight.view(pointwise.out_channels, c)
                x = torch.addmm(pointwise.bias, x.permute(0, 2, 3, 1).reshape(-1, c), weight.t())
                x = x.view(b, t, f, -1)  # (B, T_i, F_i, C)
            if i < last:
                # In-place ReLU: conv / GEMM backward need their inputs, not their outputs, and
                # with autograd _mask_frames returns a fresh (non-view) tensor.
                x = _mask_frames(x, lengths).relu_()
            else:
                # Out of place: with autograd, in-place ops on a view make it clone gradients.
                x = F.relu(x)
            x = x.transpose(1, 2) if i == 0 else x.permute(0, 3, 1, 2)  # (B, C, T_i, F_i)
        b, c, t, f = x.shape
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))
        return x, lengths


class LinearSubsampling(nn.Module):
    """No time reduction: each frame projected to ``d_model`` (``subsampling: none``).

    For a frontend that already strides in time (a ResNet1D with strides), so the encoder's
    input layer need not treat the frontend's channels as an ordered frequency axis.
    """

    factor = 1

    def __init__(self, input_dim: int, d_model: int):
        super().__init__()
        self.out = nn.Linear(input_dim, d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F) -> (B, T, D), lengths unchanged."""
        return self.out(x), lengths


# --------------------------------------------------------------------------------------------
# Relative positional attention
# --------------------------------------------------------------------------------------------


class RelPositionalEncoding(nn.Module):
    """Sinusoidal embeddings of the relative positions ``T-1, T-2, ..., -T`` (Transformer-XL).

    Computed on the fly: the embedding of one relative position does not depend on T, which keeps
    an utterance's attention identical whether or not it is padded. One extra position (-T) makes
    the table length 2T, which lets :func:`rel_shift` work with views only (also for T = 1).

    Args:
        d_model: embedding dimension (even).
        dropout_emb: dropout on the embeddings.
    """

    def __init__(self, d_model: int, dropout_emb: float = 0.0):
        super().__init__()
        inv_freq = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dropout = nn.Dropout(dropout_emb)

    def forward(
        self, length: int, dtype: torch.dtype | None = None, memory: int = 0
    ) -> torch.Tensor:
        """Return (1, 2T + M, D) embeddings; row k embeds relative position ``T + M - 1 - k``.

        ``memory`` M: keys of M cached frames before the T queries (streaming), whose relative
        positions reach ``T + M - 1``.
        """
        pos = torch.arange(
            length + memory - 1, -length - 1, -1, device=self.inv_freq.device
        ).float()
        angles = pos.unsqueeze(1) * self.inv_freq.unsqueeze(0)  # (2T, D/2)
        # Interleave so that even dims hold sin and odd dims cos.
        pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)
        return self.dropout(pe.unsqueeze(0).to(dtype or pe.dtype))


def rel_shift(x: torch.Tensor, memory: int = 0) -> torch.Tensor:
    """Turn scores against relative positions into scores against key positions.

    Args:
        x: (B, H, T, 2T + M) scores, column k for relative position ``T + M - 1 - k``
            (from :class:`RelPositionalEncoding`); must be contiguous.
        memory: M, cached key frames before the T queries (streaming; 0 in one pass).

    Returns:
        (B, H, T, T + M) view with ``out[..., i, j] = x[..., i, T - 1 - i + j]`` (query i at
        position ``M + i`` against key j: relative position ``M + i - j``). With ``n = 2T + M``
        that element sits at ``i * (n - 1) + (T - 1) + j`` in flat row-major order, so a slice
        and two reshapes give it without a copy (and export to ONNX as plain slice/reshape).
    """
    b, h, t, n = x.shape
    x = x.reshape(b, h, t * n)[..., t - 1 : t - 1 + t * (n - 1)]
    return x.reshape(b, h, t, n - 1)[..., : t + memory]


def attention_block_mask(
    pad_mask: torch.Tensor,
    att_context: tuple[int, int] | None = None,
    style: str = "regular",
) -> torch.Tensor:
    """Boolean mask of the (query, key) pairs that may NOT attend.

    Args:
        pad_mask: (B, T) True on padded frames.
        att_context: ``(left, right)`` frames each query sees, -1 = unlimited; None = all.
        style: ``"regular"`` or ``"chunked_limited"`` (see :class:`FastConformerConfig`).

    Returns:
        (B, 1, T, T) bool, True where key j is padding or outside the query's context:
        ``[i - left, i + right]`` (regular), or the query's chunk of ``right + 1`` frames and
        the ``left // (right + 1)`` chunks before it (chunked_limited). A valid query always
        sees itself, so only padded queries can get fully blocked rows.
    """
    blocked = pad_mask[:, None, None, :]
    if att_context is None:
        return blocked
    left, right = att_context
    t = pad_mask.size(1)
    pos = torch.arange(t, device=pad_mask.device)
    if style == "chunked_limited":
        chunk = pos // (right + 1)
        offset = chunk.unsqueeze(0) - chunk.unsqueeze(1)  # (T, T): key chunk minus query chunk
        outside = offset > 0
        if left >= 0:
            outside |= offset < -(left // (right + 1))
        return blocked | outside
    if left < 0 and right < 0:
        return blocked
    offset = pos.unsqueeze(0) - pos.unsqueeze(1)  # (T, T): key minus query
    outside = torch.zeros(t, t, dtype=torch.bool, device=pad_mask.device)
    if left >= 0:
        outside |= offset < -left
    if right >= 0:
        outside |= offset > right
    return blocked | outside


class RelPositionMultiHeadAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions.

    ``score(i, j) = ((q_i + u) . k_j + (q_i + v) . W_pos r_{i-j}) / sqrt(d_k)``. The content term
    runs inside ``F.scaled_dot_product_attention`` (query ``q + u``); the positional term and the
    mask are passed to it as one additive float bias, so the only (B, H, T, *) tensors built are
    the positional scores and that bias.

    Args:
        d_model: model width D.
        n_heads: heads H.
        dropout_att: dropout on the attention probabilities.
    """

    def __init__(self, d_model: int, n_heads: int, dropout_att: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.d_k = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)  # one GEMM for q, k and v
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)
        # Zero-initialised learned biases u and v (as NeMo).
        self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.d_k))
        self.dropout_att = dropout_att

    def forward(
        self,
        x: torch.Tensor,
        pos_emb: torch.Tensor,
        block_mask: torch.Tensor,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            x: (B, T, D) input.
            pos_emb: (1, 2T + M, D) relative positional embeddings.
            block_mask: (B, 1, T, M + T) bool, True on pairs that must not attend.
            memory: (B, M, D) inputs of the M frames before ``x`` (a streaming cache), which
                serve as keys and values only; None: M = 0.

        Returns:
            (B, T, D).
        """
        b, t, d = x.shape
        h, d_k = self.n_heads, self.d_k
        if memory is None:
            q, k, v = self.qkv(x).view(b, t, 3, h, d_k).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            # Queries of the new frames only; keys and values of the cache and the new frames.
            w_q, w_kv = self.qkv.weight.split((d, 2 * d))
            b_q, b_kv = self.qkv.bias.split((d, 2 * d))
            q = F.linear(x, w_q, b_q).view(b, t, h, d_k).transpose(1, 2)
            keys = torch.cat((memory, x), dim=1)
            kv = F.linear(keys, w_kv, b_kv).view(b, keys.size(1), 2, h, d_k)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, M + T, dk)
        p = self.linear_pos(pos_emb).view(1, -1, h, d_k).transpose(1, 2)  # (1, H, 2T + M, dk)
        pos_scores = rel_shift(
            torch.matmul(q + self.pos_bias_v.unsqueeze(1), p.transpose(-2, -1)),
            k.size(2) - t,
        )  # (B, H, T, M + T)
        # A finite fill (not -inf) keeps fully blocked rows (padded queries) NaN-free: softmax
        # turns them into a harmless uniform average, and the encoder zeroes those frames.
        # exp(finfo.min - max) is exactly 0, so blocked keys contribute nothing to valid rows.
        bias = (pos_scores * (1.0 / math.sqrt(d_k))).masked_fill(
            block_mask, torch.finfo(pos_scores.dtype).min
        )
        q_u = q + self.pos_bias_u.unsqueeze(1)
        if torch.onnx.is_in_onnx_export():
            # Written out for export: the exporter mis-tracks the layout of SDPA's CPU output
            # (a later view fails) and ONNX has no fused attention to map it to anyway.
            scores = torch.matmul(q_u, k.transpose(-2, -1)) * (1.0 / math.sqrt(d_k)) + bias
            out = torch.matmul(torch.softmax(scores, dim=-1), v)
        else:
            out = F.scaled_dot_product_attention(
                q_u, k, v, attn_mask=bias, dropout_p=self.dropout_att if self.training else 0.0
            )  # (B, H, T, dk); SDPA's default scale is 1/sqrt(dk), matching the bias
        return self.out(out.transpose(1, 2).contiguous().view(b, t, d))


# --------------------------------------------------------------------------------------------
# Conformer block
# --------------------------------------------------------------------------------------------


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics count valid frames only.

    Plain BatchNorm in training mode averages over padded frames too, so an utterance's output
    (and the running statistics) would depend on how much padding its batch has. Eval mode uses
    the running statistics frame by frame and is padding-safe either way. Same parameters and
    state_dict as ``nn.BatchNorm1d``. (No SyncBatchNorm equivalent: statistics are per device.)
    """

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise.

        Args:
            x: (B, C, T).
            pad_mask: (B, T) True on padded frames; None = all frames valid.

        Returns:
            (B, C, T).
        """
        if pad_mask is None or not self.training:
            return super().forward(x)
        valid = (~pad_mask).unsqueeze(1).to(x.dtype)  # (B, 1, T)
        n = valid.sum()
        n_safe = n.clamp(min=1.0)
        mean = (x * valid).sum(dim=(0, 2)) / n_safe  # (C,)
        centred = x - mean[:, None]
        var = (centred.square() * valid).sum(dim=(0, 2)) / n_safe  # biased, as BatchNorm
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                unbiased = var * (n / (n - 1).clamp(min=1.0))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), factor)
        y = centred * torch.rsqrt(var + self.eps)[:, None]
        if self.affine:
            y = y * self.weight[:, None] + self.bias[:, None]
        return y


class FeedForward(nn.Module):
    """Linear(D, eD) -> Swish -> dropout -> Linear(eD, D).

    Args:
        d_model: width D.
        expansion: e.
        dropout: dropout between the two linears.
    """

    def __init__(self, d_model: int, expansion: int = 4, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(d_model, expansion * d_model)
        self.linear2 = nn.Linear(expansion * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.linear2(self.dropout(F.silu(self.linear1(x))))


class ConformerConvModule(nn.Module):
    """Pointwise (D -> 2D) + GLU, depthwise conv, norm, Swish, pointwise (D -> D).

    The pointwise convs are ``nn.Linear`` on (B, T, D) (same parameters as 1x1 convs, one GEMM,
    no transposes). Padded frames are zeroed before the depthwise conv so they cannot leak into
    valid frames.

    Args:
        d_model: width D.
        kernel: depthwise kernel (odd).
        norm: ``"batch_norm"`` (masked statistics) or ``"layer_norm"``.
        context: ``(left, right)`` frames of the depthwise window; None = symmetric.
    """

    def __init__(
        self,
        d_model: int,
        kernel: int = 9,
        norm: str = "batch_norm",
        context: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.context = tuple(context) if context is not None else ((kernel - 1) // 2,) * 2
        self.pointwise1 = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel, groups=d_model)
        self.norm: nn.Module
        if norm == "batch_norm":
            self.norm = MaskedBatchNorm1d(d_model)
        else:
            self.norm = nn.LayerNorm(d_model)
        self.pointwise2 = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """Convolve.

        Args:
            x: (B, T, D).
            pad_mask: (B, T) True on padded frames.

        Returns:
            (B, T, D).
        """
        x = F.glu(self.pointwise1(x), dim=-1)
        x = x.masked_fill(pad_mask.unsqueeze(-1), 0.0).transpose(1, 2)  # (B, D, T)
        return self._after_depthwise(self.depthwise(F.pad(x, self.context)), pad_mask)

    def _after_depthwise(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """Norm, Swish and the last pointwise conv: (B, D, T) -> (B, T, D)."""
        if isinstance(self.norm, MaskedBatchNorm1d):
            x = self.norm(x, pad_mask).transpose(1, 2)
        else:
            x = self.norm(x.transpose(1, 2))
        return self.pointwise2(F.silu(x))

    def stream(self, x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next frames of a causal conv module (``context == (kernel - 1, 0)``), eval mode.

        Args:
            x: (B, T, D) new frames (no padding).
            cache: (B, D, kernel - 1) depthwise inputs of the frames before them (zeros at the
                start: the one-pass conv's left padding).

        Returns:
            (B, T, D) output, and the (B, D, kernel - 1) cache for the next call.
        """
        x = F.glu(self.pointwise1(x), dim=-1).transpose(1, 2)  # (B, D, T)
        x = torch.cat((cache, x), dim=2)
        cache = x[:, :, x.size(2) - self.context[0] :]
        return self._after_depthwise(self.depthwise(x), None), cache


class ConformerLayer(nn.Module):
    """One conformer block, pre-LN residuals (as NeMo)::

        x = x + 0.5 * drop(FF1(LN(x)))
        x = x + drop(MHSA(LN(x)))
        x = x + drop(Conv(LN(x)))
        x = x + 0.5 * drop(FF2(LN(x)))
        y = LN(x)

    Args:
        config: the encoder config (uses d_model, n_heads, ff_expansion, conv_kernel,
            conv_context, conv_norm, dropout, dropout_att).
    """

    def __init__(self, config: FastConformerConfig):
        super().__init__()
        d = config.d_model
        self.norm_ff1 = nn.LayerNorm(d)
        self.ff1 = FeedForward(d, config.ff_expansion, config.dropout)
        self.norm_att = nn.LayerNorm(d)
        self.att = RelPositionMultiHeadAttention(d, config.n_heads, config.dropout_att)
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConformerConvModule(
            d, config.conv_kernel, config.conv_norm, config.conv_context
        )
        self.norm_ff2 = nn.LayerNorm(d)
        self.ff2 = FeedForward(d, config.ff_expansion, config.dropout)
        self.norm_out = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        pos_emb: torch.Tensor,
        block_mask: torch.Tensor,
        pad_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            x: (B, T, D).
            pos_emb: (1, 2T, D) relative positional embeddings.
            block_mask: (B, 1, T, T) True on (query, key) pairs that must not attend.
            pad_mask: (B, T) True on padded frames.

        Returns:
            (B, T, D); padded frames hold garbage (finite) that the caller masks.
        """
        x = x + 0.5 * self.dropout(self.ff1(self.norm_ff1(x)))
        x = x + self.dropout(self.att(self.norm_att(x), pos_emb, block_mask))
        x = x + self.dropout(self.conv(self.norm_conv(x), pad_mask))
        x = x + 0.5 * self.dropout(self.ff2(self.norm_ff2(x)))
        return self.norm_out(x)

    def stream(
        self,
        x: torch.Tensor,
        pos_emb: torch.Tensor,
        block_mask: torch.Tensor,
        att_cache: torch.Tensor,
        conv_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block on the next frames of a stream, eval mode (see :mod:`asrkd.streaming`).

        Args:
            x: (B, T, D) new frames.
            pos_emb: (1, 2T + M, D) relative positional embeddings.
            block_mask: (B, 1, T, M + T) True on (query, key) pairs that must not attend.
            att_cache: (B, M, D) attention inputs (after ``norm_att``) of the M frames before.
            conv_cache: (B, D, conv_kernel - 1) depthwise-conv inputs of the frames before.

        Returns:
            (B, T, D) output, and the attention and conv caches for the next call (the last M
            attention inputs, the last ``conv_kernel - 1`` conv inputs).
        """
        x = x + 0.5 * self.ff1(self.norm_ff1(x))
        h = self.norm_att(x)
        x = x + self.att(h, pos_emb, block_mask, memory=att_cache)
        att_cache = torch.cat((att_cache, h), dim=1)[:, h.size(1) :]
        conv, conv_cache = self.conv.stream(self.norm_conv(x), conv_cache)
        x = x + conv
        x = x + 0.5 * self.ff2(self.norm_ff2(x))
        return self.norm_out(x), att_cache, conv_cache


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------


class FastConformerEncoder(nn.Module):
    """FastConformer: 8x depthwise-striding subsampling + conformer blocks with rel-pos MHSA.

    Args:
        config: :class:`FastConformerConfig`.

    Attributes:
        output_dim: D, the width of ``EncoderOutput.output``.
        subsampling_factor: time reduction T / T'.
    """

    def __init__(self, config: FastConformerConfig | None = None):
        super().__init__()
        config = config or FastConformerConfig()
        self.config = config
        self.output_dim = config.d_model
        self.subsampling_factor = config.subsampling_factor
        self.subsampling: nn.Module
        if config.subsampling == "none":
            self.subsampling = LinearSubsampling(config.input_dim, config.d_model)
        else:
            self.subsampling = ConvSubsampling(
                config.input_dim,
                config.d_model,
                config.subsampling_factor,
                config.subsampling_channels,
            )
        self.xscale = math.sqrt(config.d_model) if config.xscaling else 1.0
        self.dropout_pre_encoder = nn.Dropout(config.dropout_pre_encoder)
        self.pos_enc = RelPositionalEncoding(config.d_model, config.dropout_emb)
        self.layers = nn.ModuleList(ConformerLayer(config) for _ in range(config.n_layers))

    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        return_hidden: bool = False,
        after_subsampling: nn.Module | None = None,
    ) -> EncoderOutput:
        """Encode.

        Args:
            x: (B, T, F) features.
            lengths: (B,) int64 valid frames.
            return_hidden: also return the output of every conformer block.
            after_subsampling: a module ``(x, lengths) -> (x, lengths)`` applied to the
                subsampled (B, T', D) sequence before the scaling and the conformer blocks (a
                frontend placed after subsampling; see ``ModelConfig.frontend_position``).

        Returns:
            :class:`EncoderOutput` with output (B, T', D) zero on padding, lengths (B,) =
            ``subsampled_lengths(lengths, subsampling_factor)`` (and any strides of
            ``after_subsampling``), and hidden_states (n_layers tensors of (B, T', D), zero on
            padding) or None.
        """
        x, lengths = self.subsampling(x, lengths)
        if after_subsampling is not None:
            x, lengths = after_subsampling(x, lengths)
        x = self.dropout_pre_encoder(x * self.xscale)
        t = x.size(1)
        pos_emb = self.pos_enc(t, x.dtype)
        pad_mask = make_pad_mask(lengths, t)
        block_mask = attention_block_mask(
            pad_mask, self.config.att_context, self.config.att_context_style
        )
        frame_pad = pad_mask.unsqueeze(-1)
        hidden: list[torch.Tensor] = []
        for layer in self.layers:
            # Zeroing after every block keeps padded frames bounded and the hidden states clean
            # for distillation; valid frames never read them anyway.
            x = layer(x, pos_emb, block_mask, pad_mask).masked_fill(frame_pad, 0.0)
            if return_hidden:
                hidden.append(x)
        if not self.layers:
            x = x.masked_fill(frame_pad, 0.0)
        return EncoderOutput(x, lengths, hidden if return_hidden else None)
