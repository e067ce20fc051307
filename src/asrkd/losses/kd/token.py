"""Token-level KD of an attention decoder under teacher forcing (``"token_kl"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from asrkd.losses.kd.common import (
    SoftenedKD,
    check_same_shape,
    reduce_losses,
    softened_kl,
)
from asrkd.models.common import make_pad_mask
from asrkd.models.transformer_decoder import make_decoder_io

if TYPE_CHECKING:
    from asrkd.models.e2e_asr import E2EASR, ASROutput
    from asrkd.training.distillation import KDConfig

class TokenKD(SoftenedKD):
    """Token-level KL of an attention decoder under teacher forcing.

    Both decoders are fed the same prefix ``<bos> y_1 .. y_U``; at each of the ``U_b + 1``
    valid positions (the last one predicts ``<eos>``) the loss is
    tau^2 * KL(softmax(t / tau) || softmax(s / tau)) summed over V; summed over each
    utterance's positions and averaged over utterances (``reduction="utterance"``, the scale of
    the attention loss) or averaged over all valid positions of the batch (``"frame"``).

    Args:
        temperature: softmax temperature tau > 0.
        reduction: ``"utterance"`` or ``"frame"``.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "utterance") -> None:
        super().__init__(temperature, reduction)

    requires = "attention decoders"

    @staticmethod
    def applies(teacher: E2EASR, student: E2EASR) -> bool:
        return teacher.decoder_type == student.decoder_type == "transformer"

    @classmethod
    def from_config(cls, config: KDConfig, teacher: E2EASR, student: E2EASR) -> TokenKD:
        return cls(temperature=config.temperature, reduction=config.reduction)

    def from_outputs(self, student: ASROutput, teacher: ASROutput, targets: torch.Tensor,
                     target_lengths: torch.Tensor) -> torch.Tensor:
        _, _, decoder_lengths = make_decoder_io(targets, target_lengths)
        return self(student.decoder_logits, teacher.decoder_logits, decoder_lengths)

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            student_logits: (B, U+1, V) decoder logits of the student.
            teacher_logits: (B, U+1, V) decoder logits of the teacher (detached here).
            lengths: (B,) number of valid decoder positions per utterance, i.e. ``U_b + 1``
                when the targets are ``y_1 .. y_U_b <eos>`` (target length + 1).

        Returns:
            Scalar loss.
        """
        check_same_shape(student_logits, teacher_logits, "TokenKD")
        teacher_logits = teacher_logits.detach()
        valid = ~make_pad_mask(lengths.to(student_logits.device), student_logits.shape[1])
        kl = softened_kl(student_logits[valid], teacher_logits[valid], self.temperature)
        return self.temperature**2 * reduce_losses(kl, None, len(lengths), self.reduction)
