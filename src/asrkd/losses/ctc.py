"""CTC loss, batch-first, summed per utterance and averaged over utterances."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from asrkd.errors import ConfigError


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
    raise ConfigError(f"unknown reduction {reduction!r}")
