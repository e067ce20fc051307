"""Frame-level KD between CTC posteriors (``"ctc_kl"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from asrkd.data.tokenizer import BLANK_ID
from asrkd.losses.kd.common import (
    SoftenedKD,
    check_blank_weight,
    check_same_shape,
    delay_frames,
    reduce_losses,
    softened_kl,
    upcast_half,
)
from asrkd.models.common import make_pad_mask

if TYPE_CHECKING:
    from asrkd.models.e2e_asr import E2EASR, ASROutput
    from asrkd.training.distillation import KDConfig

class CTCFrameKD(SoftenedKD):
    """Frame-level KL between teacher and student CTC posteriors (Hinton-style).

    loss = tau^2 * sum_{valid frames f} w_f * KL(p_T(f) || q_S(f)) / sum_f w_f, where p_T and
    q_S are the softmaxes of the logits divided by ``temperature`` and the KL is summed over V.
    Multiplying by tau^2 keeps gradient magnitudes comparable across temperatures; it also gives
    the exact identity ``loss(tau * s, tau * t; temperature=tau) == tau**2 * loss(s, t; 1)``.

    Frame weights w_f (computed from the teacher at temperature 1, i.e. its real posteriors):
        * 1 by default;
        * ``blank_weight`` on frames whose teacher argmax is blank (CTC posteriors are mostly
          blank spikes; < 1 shifts the loss towards frames that carry tokens);
        * 0 on frames whose teacher blank probability exceeds ``blank_threshold`` (if set).
    ``reduction="utterance"`` (default) sums the weighted KL over each utterance's frames and
    averages over utterances, the scale of the CTC loss; ``"frame"`` takes the weighted mean
    over the valid frames of the batch. If every frame has weight 0 the loss is 0.

    Args:
        temperature: softmax temperature tau > 0.
        blank_weight: weight of frames where the teacher's argmax is blank (1.0 = no change).
        blank_threshold: drop frames whose teacher blank probability is above this (None = keep).
        reduction: ``"utterance"`` or ``"frame"`` (see above).
        delay: frames by which the teacher's posteriors are delayed before the comparison
            (:func:`~asrkd.losses.kd.common.delay_frames`; 0 = none).
    """

    def __init__(
        self,
        temperature: float = 2.0,
        blank_weight: float = 1.0,
        blank_threshold: float | None = None,
        reduction: str = "utterance",
        delay: int = 0,
    ) -> None:
        super().__init__(temperature, reduction)
        self.blank_weight = check_blank_weight(blank_weight)
        self.blank_threshold = None if blank_threshold is None else float(blank_threshold)
        self.delay = int(delay)

    def frame_weights(self, teacher_logits: torch.Tensor) -> torch.Tensor | None:
        """Weights (N,) for teacher logits (N, V) of valid frames; None means all 1."""
        if self.blank_weight == 1.0 and self.blank_threshold is None:
            return None
        teacher_logits = upcast_half(teacher_logits)
        weights = torch.ones(
            teacher_logits.shape[:-1], dtype=teacher_logits.dtype, device=teacher_logits.device
        )
        if self.blank_weight != 1.0:
            is_blank = teacher_logits.argmax(-1) == BLANK_ID
            weights = torch.where(is_blank, weights * self.blank_weight, weights)
        if self.blank_threshold is not None:
            blank_prob = torch.softmax(teacher_logits, dim=-1)[..., BLANK_ID]
            weights = torch.where(
                blank_prob > self.blank_threshold, torch.zeros_like(weights), weights
            )
        return weights

    requires = "a CTC head"

    @staticmethod
    def applies(teacher: E2EASR, student: E2EASR) -> bool:
        return teacher.ctc is not None and student.ctc is not None

    @classmethod
    def from_config(cls, config: KDConfig, teacher: E2EASR, student: E2EASR) -> CTCFrameKD:
        return cls(temperature=config.temperature, blank_weight=config.blank_weight,
                   reduction=config.reduction, delay=config.ctc_delay)

    def from_outputs(self, student: ASROutput, teacher: ASROutput, targets: torch.Tensor,
                     target_lengths: torch.Tensor) -> torch.Tensor:
        return self(student.ctc_logits, teacher.ctc_logits, student.encoder_lengths)

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            student_logits: (B, T, V) CTC logits of the student (pre-softmax).
            teacher_logits: (B, T, V) CTC logits of the teacher (detached here).
            lengths: (B,) valid frames per utterance (encoder output lengths).

        Returns:
            Scalar loss.
        """
        check_same_shape(student_logits, teacher_logits, "CTCFrameKD")
        teacher_logits = delay_frames(teacher_logits.detach(), self.delay)
        valid = ~make_pad_mask(lengths.to(student_logits.device), student_logits.shape[1])
        # Select valid frames first: padding never enters any arithmetic.
        student = student_logits[valid]  # (N, V)
        teacher = teacher_logits[valid]  # (N, V)
        kl = softened_kl(student, teacher, self.temperature)  # (N,)
        weights = self.frame_weights(teacher)
        return self.temperature**2 * reduce_losses(kl, weights, len(lengths), self.reduction)
