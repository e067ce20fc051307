"""Small pieces shared by every model part: padding (the one helper for audio and token
batches) and its masks, the hypothesis type, and the scalar log-add of the beam searches."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def pad_sequences(
    sequences: list[torch.Tensor], pad_value: float = 0, min_length: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D tensors (waveforms, token ids) into (B, L) padded with ``pad_value``, and
    their (B,) lengths. L is the longest length, at least ``min_length``; the dtype is the
    first sequence's."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = max(int(lengths.max()) if len(sequences) else 0, min_length)
    dtype = sequences[0].dtype if sequences else torch.float32
    padded = torch.full((len(sequences), width), pad_value, dtype=dtype)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = sequence
    return padded, lengths


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


def logaddexp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) for Python floats, exact at -inf (faster than numpy on scalars)."""
    hi, lo = (a, b) if a > b else (b, a)
    if lo == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))
