"""Every loss of asrkd, split by kind; nothing here runs a model.

- :func:`ctc_loss` (:mod:`asrkd.losses.ctc`), :func:`label_smoothed_ce`
  (:mod:`asrkd.losses.attention`), :func:`rnnt_loss` (:mod:`asrkd.losses.rnnt`): the
  per-decoder supervised losses, all in nats per utterance by default;
  :func:`rnnt_joint_loss` is the RNN-T loss with the joint network fused in (memory-lean).
- :class:`ASRLoss` / :class:`ASRLossConfig` (:mod:`asrkd.losses.asr`): their weighted sum on an
  :class:`~asrkd.models.e2e_asr.ASROutput`; :class:`Supervised` is the training objective
  without a teacher.
- :mod:`asrkd.losses.kd`: the knowledge-distillation family and its registry.

Layering: losses read model outputs (``asrkd.models``) but the models, the decoders and the
decoding strategies never import a loss.
"""

from asrkd.losses.asr import ASRLoss, ASRLossConfig, Supervised
from asrkd.losses.attention import label_smoothed_ce
from asrkd.losses.ctc import ctc_loss
from asrkd.losses.kd import (
    KD_LOSSES,
    RNNTKD,
    CTCFrameKD,
    HiddenStateKD,
    TokenKD,
    build_kd_loss,
    check_kd_compatibility,
)
from asrkd.losses.rnnt import rnnt_joint_loss, rnnt_loss

__all__ = [
    "KD_LOSSES",
    "RNNTKD",
    "ASRLoss",
    "ASRLossConfig",
    "CTCFrameKD",
    "HiddenStateKD",
    "Supervised",
    "TokenKD",
    "build_kd_loss",
    "check_kd_compatibility",
    "ctc_loss",
    "label_smoothed_ce",
    "rnnt_joint_loss",
    "rnnt_loss",
]
