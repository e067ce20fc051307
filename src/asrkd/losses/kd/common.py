"""What every KD loss shares: softened KL, reductions, argument and shape checks.

Conventions of all KD losses: batch-first tensors, padding described by ``lengths`` (never by
a pad value), one shared vocabulary of size ``V`` with blank 0, pad 1, bos 2, eos 3, unk 4.
Padded positions are removed *before* any arithmetic, so garbage (even inf/nan) in padding
cannot change a value or a gradient. Teacher tensors are detached inside each loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from asrkd.errors import ConfigError, UserError


def upcast_half(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are upcast: softmax/KL in fp16/bf16 is too coarse for KD."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def kl_from_log_probs(
    teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor
) -> torch.Tensor:
    """KL(teacher || student) summed over the last dimension.

    Terms where the teacher probability is exactly 0 contribute 0 (the ``0 log 0 = 0``
    convention) and are computed without ever forming ``0 * inf`` or ``-inf - -inf``, so no nan
    appears in the forward or the backward pass.

    Args:
        teacher_log_probs: (..., K) normalised log-probabilities of the teacher.
        student_log_probs: (..., K) normalised log-probabilities of the student.

    Returns:
        (...,) KL divergence per position.
    """
    p = teacher_log_probs.exp()
    support = p > 0
    # Replace both log terms outside the teacher's support before subtracting: where() only
    # masks values, and a nan in an unselected branch would still poison the gradient.
    log_p = torch.where(support, teacher_log_probs, torch.zeros_like(teacher_log_probs))
    log_q = torch.where(support, student_log_probs, torch.zeros_like(student_log_probs))
    return (p * (log_p - log_q)).sum(-1)


def softened_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position KL(softmax(teacher / tau) || softmax(student / tau)), summed over V.

    Not multiplied by ``tau**2``; the modules do that.

    Args:
        student_logits: (..., V).
        teacher_logits: (..., V).
        temperature: tau > 0.

    Returns:
        (...,) KL per position.
    """
    log_q = torch.log_softmax(upcast_half(student_logits) / temperature, dim=-1)
    log_p = torch.log_softmax(upcast_half(teacher_logits) / temperature, dim=-1)
    return kl_from_log_probs(log_p, log_q)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """sum(w * v) / sum(w); 0 (still attached to the graph) when there is nothing to average."""
    if weights is None:
        weights = torch.ones_like(values)
    numerator = (values * weights).sum()
    denominator = weights.sum()
    # Guard the division instead of the result: num / 0 in an unselected where() branch would
    # still send nan gradients back. With all weights 0 the numerator is exactly 0.
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return numerator / safe


REDUCTIONS = ("utterance", "frame")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce_losses(
    values: torch.Tensor, weights: torch.Tensor | None, batch_size: int, reduction: str
) -> torch.Tensor:
    """Reduce per-position losses (N,) of a batch of ``batch_size`` utterances.

    ``"utterance"``: the (weighted) sum over each utterance's positions, averaged over the
    utterances -- the scale of the CTC, attention and RNN-T losses, which are per-utterance
    negative log-likelihoods, so ``alpha`` weighs like against like. ``"frame"``: the weighted
    mean over all positions of the batch (independent of utterance length, and about a
    hundredth of the ASR loss for 3 s utterances at 25 frames/s).
    """
    if reduction == "frame":
        return weighted_mean(values, weights)
    total = values.sum() if weights is None else (values * weights).sum()
    return total / max(int(batch_size), 1)


def check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def delay_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``x`` (B, T, ...) delayed along time: frame t holds frame ``t - frames``, and the first
    ``frames`` repeat frame 0 (a teacher's leading blank). Valid frames of a padded row still
    read valid frames only; the last ``frames`` of each row's own frames drop out.

    For a streaming student, which has to emit later than a full-context teacher (it sees
    less of the future): ``ctc_delay`` in :class:`~asrkd.training.distillation.KDConfig`.
    """
    if frames == 0:
        return x
    if frames < 0:
        raise ConfigError(f"a delay must be >= 0 frames, got {frames}")
    frames = min(frames, x.shape[1])
    head = x[:, :1].expand(-1, frames, *x.shape[2:])
    return torch.cat((head, x[:, : x.shape[1] - frames]), dim=1)


def check_blank_weight(blank_weight: float) -> float:
    if blank_weight < 0:
        raise ConfigError(f"blank_weight must be >= 0, got {blank_weight}")
    return float(blank_weight)


class SoftenedKD(nn.Module):
    """Base of the KD losses between softened distributions: a checked temperature tau > 0
    and a checked reduction (see :data:`REDUCTIONS`)."""

    def __init__(self, temperature: float, reduction: str) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.reduction = check_reduction(reduction)


def check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    """Raise a ValueError naming the axis on which teacher and student outputs disagree."""
    if student.dim() != teacher.dim():
        raise ValueError(
            f"{what}: teacher has {teacher.dim()} dims {tuple(teacher.shape)} vs student "
            f"{student.dim()} dims {tuple(student.shape)}"
        )
    names = {0: "batch size"}
    names[student.dim() - 1] = "vocabulary size"
    if student.dim() >= 3:
        names[1] = "frame count T (frame rate / subsampling)"
    for axis, (s, t) in enumerate(zip(student.shape, teacher.shape, strict=True)):
        if s != t:
            name = names.get(axis, f"axis {axis}")
            raise ValueError(f"{what}: {name} differs: teacher {t} vs student {s}")


def check_kd_compatibility(
    teacher_vocab: int,
    student_vocab: int,
    teacher_frame_rate: float | None = None,
    student_frame_rate: float | None = None,
    *,
    frame_level: bool = True,
) -> None:
    """Check that a teacher/student pair can be distilled; raise a ValueError if not.

    Every output-level KD loss compares distributions over one shared vocabulary, so the sizes
    must match. Frame-level KD (CTC frame KL, RNN-T lattice KD, hidden states) also compares
    frame t of the teacher with frame t of the student, so the output frame rates (or
    equivalently the total subsampling factors) must match too.

    Args:
        teacher_vocab: V of the teacher's output head.
        student_vocab: V of the student's output head.
        teacher_frame_rate: output frame rate (Hz) or subsampling factor of the teacher encoder;
            ``None`` skips the check.
        student_frame_rate: same quantity, same unit, for the student.
        frame_level: whether frame rates must agree (False for token-level KD only).

    Raises:
        ValueError: naming every quantity that differs.
    """
    problems: list[str] = []
    if int(teacher_vocab) != int(student_vocab):
        problems.append(
            f"vocabulary size {teacher_vocab} (teacher) vs {student_vocab} (student); "
            "KD needs one shared vocabulary"
        )
    if frame_level and teacher_frame_rate is not None and student_frame_rate is not None:
        if not math.isclose(float(teacher_frame_rate), float(student_frame_rate), rel_tol=1e-6):
            problems.append(
                f"subsampling/frame rate {teacher_frame_rate} (teacher) vs "
                f"{student_frame_rate} (student); frame-level KD needs equal frame rates"
            )
    if problems:
        raise UserError("teacher/student are not KD-compatible: " + "; ".join(problems))
