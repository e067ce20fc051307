"""ResNet1D frontend: residual 1-D conv stages over the log-mel sequence, padding-invariant.

Normalisation choice: LayerNorm over the channels of each frame. It is the one common norm that
is padding-invariant in training *and* eval mode with no extra machinery: BatchNorm's training
statistics mix in padded frames (and couple utterances of a batch), GroupNorm / InstanceNorm
average over time and so over padding. A per-frame LayerNorm never looks at another frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from asrkd.errors import ConfigError
from asrkd.models.common import make_pad_mask

__all__ = ["ResNet1D", "ResNet1DConfig", "ResidualBlock1D"]


@dataclass(frozen=True)
class ResNet1DConfig:
    """ResNet1D hyper-parameters.

    Attributes:
        input_dim: feature dimension F.
        channels: output channels of each stage.
        blocks_per_stage: residual blocks in every stage.
        kernel_size: conv kernel (odd, so that "same" padding is symmetric).
        strides: time stride of each stage (applied by its first block); same length as
            ``channels``.
        dropout: dropout after the first conv of each block.
        causal: pad every conv on the left only (``kernel_size - 1`` frames), so an output frame
            reads no input frame after its own (a streaming model: no look-ahead, and its
            convolution states can be cached chunk by chunk); False: "same" padding, one frame
            of look-ahead per conv at k3.
    """

    input_dim: int = 80
    channels: tuple[int, ...] = (256, 256)
    blocks_per_stage: int = 1
    kernel_size: int = 3
    strides: tuple[int, ...] = (1, 1)
    dropout: float = 0.0
    causal: bool = False

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.strides) or not self.channels:
            raise ConfigError("channels and strides need one entry per stage (at least one stage)")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size={self.kernel_size} must be odd")
        if self.blocks_per_stage < 1 or min(self.strides) < 1:
            raise ConfigError("blocks_per_stage and strides must be >= 1")


def _strided_lengths(lengths: torch.Tensor, stride: int) -> torch.Tensor:
    """Length after a conv with odd kernel k, padding k // 2 and this stride: ceil(L / s)."""
    if stride == 1:
        return lengths
    return torch.div(lengths - 1, stride, rounding_mode="floor") + 1


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over C of a (B, C, T) tensor (per frame; see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ResidualBlock1D(nn.Module):
    """conv -> LN -> ReLU -> dropout -> conv -> LN, plus skip, then ReLU.

    The skip is the identity, or a 1x1 conv (with the block's stride) when channels or stride
    change. Padded frames are zero on input and are zeroed again before the second conv and on
    output, so a valid frame never reads padding (only zeros, like the conv's own padding).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel.
        stride: time stride of the first conv and the skip.
        dropout: dropout after the first activation.
        causal: left padding only (``kernel_size - 1`` frames): output frame j of the first conv
            reads input frames ``stride * j - kernel_size + 1 .. stride * j``, the same frames
            the strided skip ends on, and the lengths are the same as with "same" padding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dropout: float = 0.0,
        causal: bool = False,
    ):
        super().__init__()
        # Causal: the convs pad nothing and forward pads kernel_size - 1 zeros on the left.
        self.left_pad = kernel_size - 1 if causal else 0
        pad = 0 if causal else kernel_size // 2
        self.stride = stride
        # No conv bias: the LayerNorm right after supplies one.
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size, stride, pad, bias=False)
        self.norm1 = _ChannelLayerNorm(out_channels)
        self.conv2 = nn.Conv1d(out_channels, out_channels, kernel_size, 1, pad, bias=False)
        self.norm2 = _ChannelLayerNorm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.skip: nn.Module | None = None
        if in_channels != out_channels or stride != 1:
            self.skip = nn.Conv1d(in_channels, out_channels, 1, stride)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the block.

        Args:
            x: (B, C_in, T), zero on padded frames.
            lengths: (B,) valid frames.

        Returns:
            (B, C_out, T') zero on padded frames, and (B,) lengths ``ceil(L / stride)``.
        """
        lengths = _strided_lengths(lengths, self.stride)
        y = self.conv1(F.pad(x, (self.left_pad, 0)) if self.left_pad else x)
        pad = make_pad_mask(lengths, y.size(-1)).unsqueeze(1)  # (B, 1, T')
        y = self.dropout(F.relu(self.norm1(y))).masked_fill(pad, 0.0)
        y = self.norm2(self.conv2(F.pad(y, (self.left_pad, 0)) if self.left_pad else y))
        y = y + (x if self.skip is None else self.skip(x))
        return F.relu(y).masked_fill(pad, 0.0), lengths

    def stream(
        self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The next frames of a causal block, eval mode (see :mod:`asrkd.streaming`).

        Args:
            x: (B, C_in, T) new frames; T a multiple of the stride except in a stream's last
                call, so that every call starts on a stride boundary as the one-pass conv does.
            cache: the last ``kernel_size - 1`` inputs of each conv, (B, C_in, k - 1) and
                (B, C_out, k - 1) (zeros at the start: the one-pass left padding).

        Returns:
            (B, C_out, ceil(T / stride)) output and the caches for the next call.
        """
        keep = self.left_pad
        x_in = torch.cat((cache[0], x), dim=2)
        y = F.relu(self.norm1(self.conv1(x_in)))
        y_in = torch.cat((cache[1], y), dim=2)
        y = self.norm2(self.conv2(y_in)) + (x if self.skip is None else self.skip(x))
        return F.relu(y), (x_in[:, :, x_in.size(2) - keep :], y_in[:, :, y_in.size(2) - keep :])


class ResNet1D(nn.Module):
    """Stages of residual 1-D conv blocks over a feature sequence.

    Args:
        config: :class:`ResNet1DConfig`.

    Attributes:
        output_dim: channels of the last stage.
        subsampling_factor: product of the strides.
    """

    def __init__(self, config: ResNet1DConfig | None = None):
        super().__init__()
        config = config or ResNet1DConfig()
        self.config = config
        blocks = []
        in_ch = config.input_dim
        for out_ch, stride in zip(config.channels, config.strides):
            for i in range(config.blocks_per_stage):
                blocks.append(
                    ResidualBlock1D(
                        in_ch, out_ch, config.kernel_size, stride if i == 0 else 1,
                        config.dropout, config.causal,
                    )
                )
                in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.output_dim = in_ch
        self.subsampling_factor = 1
        for s in config.strides:
            self.subsampling_factor *= s

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the stages.

        Args:
            x: (B, T, F) features.
            lengths: (B,) valid frames.

        Returns:
            (B, T', C) zero on padded frames, and (B,) lengths (``ceil(L / s)`` per strided
            stage).
        """
        x = x.masked_fill(make_pad_mask(lengths, x.size(1)).unsqueeze(-1), 0.0).transpose(1, 2)
        for block in self.blocks:
            x, lengths = block(x, lengths)
        return x.transpose(1, 2), lengths

    def flops(self, num_frames: int) -> int:
        """Multiply-accumulates x 2 of the convs for one utterance of ``num_frames`` frames.

        Norms, activations and additions (a few % of the total) are not counted. Divide by the
        utterance duration for FLOPs per second of audio.
        """
        total = 0
        t = num_frames
        for block in self.blocks:
            t = (t - 1) // block.stride + 1
            for conv in (block.conv1, block.conv2, block.skip):
                if conv is not None:
                    macs = conv.in_channels * conv.out_channels * conv.kernel_size[0]
                    total += 2 * macs * t
        return total
