"""The supervised ASR objective: CTC plus attention CE or RNN-T, weighted (:class:`ASRLoss`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from asrkd.errors import ConfigError
from asrkd.losses.attention import label_smoothed_ce
from asrkd.losses.ctc import ctc_loss
from asrkd.losses.rnnt import rnnt_joint_loss, rnnt_loss
from asrkd.models.e2e_asr import ASROutput
from asrkd.models.transformer_decoder import make_decoder_io


@dataclass(frozen=True)
class ASRLossConfig:
    """Weights of the supervised losses (hybrid CTC/attention or CTC/transducer training).

    ``ctc_weight`` is the CTC share when the model also has a decoder; a CTC-only model uses
    CTC alone and a decoder-only model its decoder loss alone.

    CTC and RNN-T losses are per-utterance negative log-likelihoods averaged over the batch.
    ``attention_reduction="utterance"`` puts the attention cross-entropy on the same scale
    (summed over an utterance's tokens, as ESPnet does), so ``ctc_weight`` weighs like against
    like; ``"token"`` averages it over tokens, which makes it ~30x smaller than the CTC loss
    for 30-character utterances, and the decoder then barely trains.
    """

    ctc_weight: float = 0.3
    label_smoothing: float = 0.1
    attention_reduction: str = "utterance"
    # With intermediate CTC (model.inter_ctc_layers): ctc = (1 - w) * final + w * mean(inter).
    inter_ctc_weight: float = 0.3
    # RNN-T models trained without KD: evaluate the joint network block by block inside the
    # loss (rnnt_joint_loss) instead of materialising the (B, T, U+1, V) lattice. Same loss
    # and gradients; a teacher_cpu_rnnt step on 8 x 10 s took 539 instead of 1074 MB and
    # 1.40 instead of 1.79 s (idle VM, benchmarks/README.md) despite the second joint
    # forward pass. With KD the student's lattice is materialised anyway (the transducer KD
    # losses read it).
    rnnt_fused_joint: bool = True

    def __post_init__(self) -> None:
        if self.attention_reduction not in ("utterance", "token"):
            raise ConfigError(
                "attention_reduction must be 'utterance' or 'token', got "
                f"{self.attention_reduction!r}"
            )
        if not 0.0 <= self.inter_ctc_weight <= 1.0:
            raise ConfigError(
                f"inter_ctc_weight must be within [0, 1], got {self.inter_ctc_weight}"
            )
        if not 0.0 <= self.ctc_weight <= 1.0:
            raise ConfigError(f"ctc_weight must be within [0, 1], got {self.ctc_weight}")


class ASRLoss(nn.Module):
    """Supervised loss of an :class:`~asrkd.models.e2e_asr.E2EASR` output.

    Returns a dict of scalars: ``ctc`` and/or ``attention`` / ``rnnt``, and ``total`` =
    ``ctc_weight * ctc + (1 - ctc_weight) * decoder``.
    """

    def __init__(self, config: ASRLossConfig = ASRLossConfig()) -> None:
        super().__init__()
        self.config = config

    def forward(
        self, output: ASROutput, targets: torch.Tensor, target_lengths: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        if output.ctc_logits is not None:
            log_probs = output.ctc_logits.float().log_softmax(-1)
            parts["ctc"] = ctc_loss(log_probs, output.encoder_lengths, targets, target_lengths)
            if output.inter_ctc_logits:
                inter = torch.stack([
                    ctc_loss(logits.float().log_softmax(-1), output.encoder_lengths, targets,
                             target_lengths)
                    for logits in output.inter_ctc_logits
                ]).mean()
                parts["ctc_final"] = parts["ctc"]
                parts["ctc_inter"] = inter
                w = self.config.inter_ctc_weight
                parts["ctc"] = (1 - w) * parts["ctc_final"] + w * inter
        decoder_loss = None
        if output.decoder_type == "transformer" and output.decoder_logits is not None:
            _, decoder_out, decoder_lengths = make_decoder_io(targets, target_lengths)
            decoder_loss = label_smoothed_ce(
                output.decoder_logits.float(),
                decoder_out,
                decoder_lengths,
                self.config.label_smoothing,
                reduction=self.config.attention_reduction,
            )
            parts["attention"] = decoder_loss
        elif output.decoder_type == "rnnt" and output.decoder_logits is not None:
            decoder_loss = rnnt_loss(
                output.decoder_logits.float(),
                targets.int(),
                output.encoder_lengths.int(),
                target_lengths.int(),
            )
            parts["rnnt"] = decoder_loss
        elif output.decoder_type == "rnnt" and output.rnnt_joint is not None:
            joint = output.rnnt_joint
            decoder_loss = rnnt_joint_loss(
                joint.joint.combine,
                joint.encoder_proj,
                joint.pred_proj,
                targets.int(),
                output.encoder_lengths.int(),
                target_lengths.int(),
            )
            parts["rnnt"] = decoder_loss
        if decoder_loss is None:
            parts["total"] = parts["ctc"]
        elif "ctc" not in parts:
            parts["total"] = decoder_loss
        else:
            weight = self.config.ctc_weight
            parts["total"] = weight * parts["ctc"] + (1 - weight) * decoder_loss
        return parts


class Supervised(nn.Module):
    """The objective of a run without distillation: ``asr_loss`` on ``model``'s output, called
    like :class:`~asrkd.models.distillation.KDWrapper` (``keys`` unused)."""

    def __init__(self, model: nn.Module, asr_loss: ASRLoss) -> None:
        super().__init__()
        self.model = model
        self.asr_loss = asr_loss

    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor, targets: torch.Tensor,
                target_lengths: torch.Tensor, keys: list[str] | None = None
                ) -> dict[str, torch.Tensor]:
        fused = {"rnnt_logits": False} if self.asr_loss.config.rnnt_fused_joint else {}
        output = self.model(audio, audio_lengths, targets, target_lengths, **fused)
        return self.asr_loss(output, targets, target_lengths)
