"""Label-smoothed cross-entropy of an attention decoder under teacher forcing."""

from __future__ import annotations

import torch

from asrkd.errors import ConfigError
from asrkd.models.common import make_pad_mask


def label_smoothed_ce(
    logits: torch.Tensor,
    dec_out: torch.Tensor,
    dec_lengths: torch.Tensor | None,
    smoothing: float = 0.1,
    pad_id: int = 1,
    reduction: str = "token",
) -> torch.Tensor:
    """Label-smoothed cross-entropy over valid target tokens.

    The smoothed target puts ``1 - smoothing`` on the reference and spreads ``smoothing``
    uniformly over all V classes (as ``F.cross_entropy(label_smoothing=...)``).

    Args:
        logits: (B, L, V) decoder logits.
        dec_out: (B, L) reference ids.
        dec_lengths: (B,) valid positions; if None, positions equal to ``pad_id`` are ignored.
        smoothing: label smoothing in [0, 1).
        pad_id: padding id (used only when ``dec_lengths`` is None).
        reduction: ``"token"``: mean over the valid tokens of the batch (nats per token);
            ``"utterance"``: sum over each utterance's tokens, mean over utterances (nats per
            utterance, the scale of a CTC or RNN-T loss).

    Returns:
        Scalar loss.
    """
    if reduction not in ("token", "utterance"):
        raise ConfigError(f"reduction must be 'token' or 'utterance', got {reduction!r}")
    logp = logits.float().log_softmax(dim=-1)
    if dec_lengths is None:
        valid = dec_out != pad_id
    else:
        valid = ~make_pad_mask(dec_lengths.to(logits.device), dec_out.shape[1])
    target = dec_out.long().masked_fill(~valid, 0)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    loss = (1.0 - smoothing) * nll - smoothing * logp.mean(dim=-1) if smoothing > 0 else nll
    if reduction == "utterance":
        return (loss * valid).sum() / max(dec_out.shape[0], 1)
    return (loss * valid).sum() / valid.sum().clamp(min=1)
