"""CTC output head (loss: :func:`asrkd.losses.ctc_loss`; decoding: :mod:`asrkd.decoding.ctc`).

The head is a single linear projection from encoder states to the shared vocabulary (blank 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CTCConfig:
    """Configuration of :class:`CTCHead`.

    Args:
        vocab_size: V, the shared vocabulary size (blank included).
        encoder_dim: D, the encoder output size.
        blank_id: index of the CTC blank.
        dropout: dropout on the encoder states before the projection.
    """

    vocab_size: int = 0
    encoder_dim: int = 0
    blank_id: int = 0
    dropout: float = 0.0


class CTCHead(nn.Module):
    """Linear CTC output layer.

    ``forward`` returns raw logits (the KD code scales them by a temperature before the
    softmax); :meth:`log_probs` returns normalised log-probabilities for the loss and decoding.
    """

    def __init__(self, config: CTCConfig) -> None:
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        self.proj = nn.Linear(config.encoder_dim, config.vocab_size)

    def forward(self, encoder_out: torch.Tensor) -> torch.Tensor:
        """Project encoder states to vocabulary logits.

        Args:
            encoder_out: (B, T, D) encoder states.

        Returns:
            (B, T, V) raw logits.
        """
        return self.proj(self.dropout(encoder_out))

    def log_probs(self, encoder_out: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Return ``log_softmax(logits / temperature)``.

        Args:
            encoder_out: (B, T, D) encoder states.
            temperature: softmax temperature (1.0 for training and decoding).

        Returns:
            (B, T, V) log-probabilities, float32 even under mixed precision.
        """
        logits = self.forward(encoder_out).float()
        if temperature != 1.0:
            logits = logits / temperature
        return logits.log_softmax(dim=-1)
