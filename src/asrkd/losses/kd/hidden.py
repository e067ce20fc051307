"""Hidden-state KD: learned projections regress teacher layers (``"hidden"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from asrkd.errors import ConfigError
from asrkd.losses.kd.common import (
    check_reduction,
    reduce_losses,
    upcast_half,
)
from asrkd.models.common import make_pad_mask

if TYPE_CHECKING:
    from asrkd.models.e2e_asr import E2EASR, ASROutput
    from asrkd.training.distillation import KDConfig

def default_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Map student layers uniformly onto teacher layers, last to last.

    Student layer i (0-based) -> teacher layer ``(i + 1) * n_teacher // n_student - 1``;
    e.g. 4 -> 8 gives [(0, 1), (1, 3), (2, 5), (3, 7)], and equal depths map i -> i.

    Args:
        n_student: number of student layers.
        n_teacher: number of teacher layers.
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"need >= 1 layer each, got student {n_student}, teacher {n_teacher}")
    return [(i, max((i + 1) * n_teacher // n_student - 1, 0)) for i in range(n_student)]


class HiddenStateKD(nn.Module):
    """Regress mapped teacher hidden states from projected student hidden states.

    For each mapped pair (student layer i -> teacher layer j) a learned ``nn.Linear(Ds_i, Dt_j)``
    projects the student state to the teacher's width. The per-frame loss is either the mean
    squared error over the feature dimension (``"mse"``) or ``1 - cosine similarity``
    (``"cosine"``); it is summed over each utterance's frames and averaged over utterances
    (``reduction="utterance"``) or averaged over the valid frames of the batch (``"frame"``),
    then averaged over the pairs. The projections are parameters of this module: put them in
    the optimizer.

    Args:
        student_dims: width of each student layer (list index = layer index).
        teacher_dims: width of each teacher layer.
        layer_map: pairs ``(student_layer, teacher_layer)`` or a dict ``{student: teacher}``;
            None uses :func:`default_layer_map`.
        loss: ``"mse"`` or ``"cosine"``.
        reduction: ``"utterance"`` or ``"frame"``.
    """

    def __init__(
        self,
        student_dims: Sequence[int],
        teacher_dims: Sequence[int],
        layer_map: Sequence[tuple[int, int]] | Mapping[int, int] | None = None,
        loss: str = "mse",
        reduction: str = "utterance",
    ) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        if loss not in ("mse", "cosine"):
            raise ConfigError(f"loss must be 'mse' or 'cosine', got {loss!r}")
        self.student_dims = [int(d) for d in student_dims]
        self.teacher_dims = [int(d) for d in teacher_dims]
        if layer_map is None:
            pairs = default_layer_map(len(self.student_dims), len(self.teacher_dims))
        elif isinstance(layer_map, Mapping):
            pairs = [(int(s), int(t)) for s, t in layer_map.items()]
        else:
            pairs = [(int(s), int(t)) for s, t in layer_map]
        if not pairs:
            raise ValueError("layer_map is empty")
        for s, t in pairs:
            if not 0 <= s < len(self.student_dims):
                raise ValueError(
                    f"student layer {s} out of range (student has {len(self.student_dims)} layers)"
                )
            if not 0 <= t < len(self.teacher_dims):
                raise ValueError(
                    f"teacher layer {t} out of range (teacher has {len(self.teacher_dims)} layers)"
                )
        self.layer_map: list[tuple[int, int]] = pairs
        self.loss = loss
        self.projections = nn.ModuleList(
            nn.Linear(self.student_dims[s], self.teacher_dims[t]) for s, t in pairs
        )

    requires = ""

    @staticmethod
    def applies(teacher: E2EASR, student: E2EASR) -> bool:
        return True

    @classmethod
    def from_config(cls, config: KDConfig, teacher: E2EASR, student: E2EASR) -> HiddenStateKD:
        n_student = student.encoder.config.n_layers
        n_teacher = teacher.encoder.config.n_layers
        layer_map = config.layer_map or default_layer_map(n_student, n_teacher)
        return cls([student.encoder.output_dim] * n_student,
                   [teacher.encoder.output_dim] * n_teacher,
                   [tuple(pair) for pair in layer_map], loss=config.hidden_loss,
                   reduction=config.reduction)

    def from_outputs(self, student: ASROutput, teacher: ASROutput, targets: torch.Tensor,
                     target_lengths: torch.Tensor) -> torch.Tensor:
        return self(student.hidden_states, teacher.hidden_states, student.encoder_lengths)

    def forward(
        self,
        student_hidden: Sequence[torch.Tensor],
        teacher_hidden: Sequence[torch.Tensor],
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            student_hidden: per student layer, (B, T, Ds_i).
            teacher_hidden: per teacher layer, (B, T, Dt_j) (detached here).
            lengths: (B,) valid frames (shared: the frame rates must agree).

        Returns:
            Scalar loss.

        Raises:
            ValueError: if a mapped layer is missing, a width does not match the configured
                one, or teacher and student frame counts T differ.
        """
        losses = []
        for (s, t), proj in zip(self.layer_map, self.projections, strict=True):
            if s >= len(student_hidden) or t >= len(teacher_hidden):
                raise ValueError(
                    f"layer pair {s}->{t}: got {len(student_hidden)} student and "
                    f"{len(teacher_hidden)} teacher hidden states"
                )
            hs, ht = student_hidden[s], teacher_hidden[t].detach()
            if hs.shape[1] != ht.shape[1]:
                raise ValueError(
                    f"layer pair {s}->{t}: frame count differs: teacher T={ht.shape[1]} vs "
                    f"student T={hs.shape[1]}; hidden-state KD needs equal frame rates"
                )
            if hs.shape[0] != ht.shape[0]:
                raise ValueError(
                    f"layer pair {s}->{t}: batch size differs: teacher "
                    f"{ht.shape[0]} vs student {hs.shape[0]}"
                )
            if hs.shape[-1] != proj.in_features or ht.shape[-1] != proj.out_features:
                raise ValueError(
                    f"layer pair {s}->{t}: widths (student {hs.shape[-1]}, teacher "
                    f"{ht.shape[-1]}) do not match the configured ({proj.in_features}, "
                    f"{proj.out_features})"
                )
            valid = ~make_pad_mask(lengths.to(hs.device), hs.shape[1])
            pred = proj(upcast_half(hs[valid]))  # (N, Dt)
            target = upcast_half(ht[valid]).to(pred.dtype)
            if self.loss == "mse":
                per_frame = (pred - target).pow(2).mean(-1)
            else:
                per_frame = 1.0 - torch.cosine_similarity(pred, target, dim=-1, eps=1e-8)
            losses.append(reduce_losses(per_frame, None, len(lengths), self.reduction))
        return torch.stack(losses).mean()
