"""CTC output head and the CTC loss (decoding: :mod:`asrkd.decoding.ctc`).

The head is a single linear projection from encoder states to the shared vocabulary (blank 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NEG_INF = float("-inf")


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

    def loss(
        self,
        log_probs: torch.Tensor,
        lengths: torch.Tensor,
        targets: torch.Tensor,
        target_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """CTC loss, summed over each utterance and averaged over utterances.

        Args:
            log_probs: (B, T, V) log-probabilities (see :meth:`log_probs`).
            lengths: (B,) valid frames.
            targets: (B, U) target ids, padded (any pad value; padding is cut by lengths).
            target_lengths: (B,) valid target tokens.

        Returns:
            Scalar loss (nats per utterance). Impossible alignments contribute 0.
        """
        return ctc_loss(log_probs, lengths, targets, target_lengths, blank_id=self.config.blank_id)


def ctc_loss(
    log_probs: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    target_lengths: torch.Tensor,
    blank_id: int = 0,
    reduction: str = "mean",
    zero_infinity: bool = True,
) -> torch.Tensor:
    """Batch-first wrapper around ``F.ctc_loss``.

    Args:
        log_probs: (B, T, V) log-probabilities.
        lengths: (B,) valid frames.
        targets: (B, U) padded target ids.
        target_lengths: (B,) valid target tokens.
        blank_id: CTC blank index.
        reduction: ``"mean"`` (sum per utterance, mean over utterances - unlike
            ``F.ctc_loss``'s "mean", which also divides by target length), ``"sum"`` or
            ``"none"`` ((B,) negative log-likelihoods).
        zero_infinity: replace infinite losses (targets longer than the input allows) by 0.

    Returns:
        Scalar, or (B,) for ``reduction="none"``.
    """
    # F.ctc_loss wants (T, B, V); its kernels need float32/64 (half inputs are upcast).
    if log_probs.dtype != torch.float64:
        log_probs = log_probs.float()
    nll = F.ctc_loss(
        log_probs.transpose(0, 1),
        targets.long(),
        lengths.long(),
        target_lengths.long(),
        blank=blank_id,
        reduction="none",
        zero_infinity=zero_infinity,
    )
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.sum() / max(nll.numel(), 1)
    raise ValueError(f"unknown reduction {reduction!r}")


def ctc_sequence_log_prob(
    log_probs: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    target_lengths: torch.Tensor,
    blank_id: int = 0,
) -> torch.Tensor:
    """Exact log P(targets | input) under CTC for each utterance (-inf where impossible).

    Args:
        log_probs: (B, T, V) log-probabilities.
        lengths: (B,) valid frames.
        targets: (B, U) padded label sequences (empty sequences allowed).
        target_lengths: (B,) label lengths.
        blank_id: CTC blank index.

    Returns:
        (B,) log-probabilities.
    """
    nll = ctc_loss(
        log_probs,
        lengths,
        targets,
        target_lengths,
        blank_id,
        reduction="none",
        zero_infinity=False,
    )
    return -nll
