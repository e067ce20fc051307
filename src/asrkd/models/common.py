"""Small pieces shared by every model part: padding masks and the hypothesis type."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def make_pad_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Return a boolean mask (B, T) that is True on padded positions.

    Args:
        lengths: (B,) valid lengths.
        max_len: T; defaults to ``lengths.max()``.
    """
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) >= lengths.unsqueeze(1)


@dataclass
class Hypothesis:
    """One decoding result.

    ``tokens`` are token ids without blank/bos/eos; ``score`` is the total log-probability the
    decoder assigned (length-normalised where the decoder says so); ``text`` is filled in by the
    model that owns the tokenizer.
    """

    tokens: list[int]
    score: float = 0.0
    text: str = ""
    timestamps: list[int] = field(default_factory=list)
