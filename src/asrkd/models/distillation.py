"""KDWrapper: a frozen teacher, a trainable student, the ASR loss and the KD loss.

The wrapper receives its loss functions (``asr_loss_fn``, ``kd_loss_fn``) and its teacher;
:func:`asrkd.training.distillation.build_kd` makes them from a ``KDConfig``. The teacher is a
*teacher source*: :class:`OnlineTeacher` runs a trained :class:`E2EASR` on every batch, and
``asrkd.training.teacher_cache.CachedTeacher`` reads the posteriors ``asrkd cache-teacher``
stored. Both are called the same way, so there is one forward path.

An online teacher is held outside the module tree on purpose: ``parameters()``,
``state_dict()`` and ``train()`` then see only the student (and the projections of
hidden-state KD), so no optimizer can touch the teacher, no checkpoint contains it, and
Lightning's ``train()`` calls cannot switch its dropout or batch-norm updates back on. Device
and dtype moves still reach it (``_apply`` is forwarded).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from asrkd.errors import ConfigError
from asrkd.models.e2e_asr import E2EASR, ASROutput


class TeacherSource(Protocol):
    """Where the teacher's outputs for a batch come from.

    Called after the student's forward (a cache needs the student's frame count and
    vocabulary); returns what ``kd_loss_fn`` takes as the teacher's output, or None when it
    has nothing for this batch (a cache without the validation utterances: the loss is then
    the ASR loss alone).
    """

    teacher: E2EASR | None

    def __call__(self, audio: torch.Tensor, audio_lengths: torch.Tensor, targets: torch.Tensor,
                 target_lengths: torch.Tensor, *, keys: list[str] | None,
                 student: ASROutput, need_hidden: bool, training: bool,
                 stored: Any = None) -> Any: ...


class OnlineTeacher(nn.Module):
    """A trained E2EASR run on every batch: frozen, in eval mode, under ``no_grad``."""

    def __init__(self, teacher: E2EASR) -> None:
        super().__init__()
        teacher.requires_grad_(False)
        teacher.eval()
        object.__setattr__(self, "teacher", teacher)  # deliberately not a submodule

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # .to()/.double()/.cuda() must move the teacher too, though it is not a child module.
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> OnlineTeacher:
        super().train(mode)
        self.teacher.eval()  # never re-enable dropout or batch-norm updates in the teacher
        return self

    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor, targets: torch.Tensor,
                target_lengths: torch.Tensor, *, keys: list[str] | None, student: ASROutput,
                need_hidden: bool, training: bool, stored: Any = None) -> ASROutput:
        with torch.no_grad():
            self.teacher.eval()
            return self.teacher(audio, audio_lengths, targets, target_lengths, need_hidden)


class KDWrapper(nn.Module):
    """Distil ``teacher`` into ``student``.

    Args:
        teacher: a trained E2EASR (wrapped in :class:`OnlineTeacher`, which freezes it) or a
            :class:`TeacherSource` such as a teacher cache.
        student: E2EASR to train; same vocabulary (and frame rate for frame-level KD).
        asr_loss_fn: supervised loss on the student's output (``ASRLoss``): returns a dict
            with ``total``.
        kd_loss_fn: ``(student_out, teacher_out, targets, target_lengths) -> dict`` with ``kd``
            (and its ``kd_<name>`` parts); ``needs_hidden`` says whether it reads hidden states.
        distil_final_output: whether ``kd_loss_fn`` distils output distributions; False
            requires one that uses intermediate layers only (``names == ("hidden",)``).
        alpha: share of the KD term: total = (1 - alpha) * asr + alpha * kd.
    """

    def __init__(
        self,
        teacher: E2EASR | TeacherSource,
        student: E2EASR,
        asr_loss_fn: nn.Module,
        kd_loss_fn: nn.Module,
        distil_final_output: bool = True,
        alpha: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be within [0, 1], got {alpha}")
        if not distil_final_output and tuple(getattr(kd_loss_fn, "names", ())) != ("hidden",):
            raise ConfigError("distil_final_output=False needs a KD loss of hidden states only")
        self.teacher_source = OnlineTeacher(teacher) if isinstance(teacher, E2EASR) else teacher
        self.student = student
        self.asr_loss_fn = asr_loss_fn
        self.kd_loss_fn = kd_loss_fn
        self.distil_final_output = distil_final_output
        self.alpha = alpha

    @property
    def teacher(self) -> E2EASR | None:
        """The online teacher model (None with a teacher cache)."""
        return getattr(self.teacher_source, "teacher", None)

    def forward(
        self,
        audio: torch.Tensor,
        audio_lengths: torch.Tensor,
        targets: torch.Tensor,
        target_lengths: torch.Tensor,
        keys: list[str] | None = None,
        stored_teacher: Any = None,
    ) -> dict[str, torch.Tensor]:
        """Loss parts: ``asr`` (+ its own parts as ``asr_<name>``), ``kd_<name>``, ``kd`` and
        ``total``. ``keys`` (utterance ids, the batch's ``keys``) are needed with a cache;
        ``stored_teacher`` is the batch's ``teacher`` (posteriors read from a sharded cache by
        the shard loader)."""
        need_hidden = bool(getattr(self.kd_loss_fn, "needs_hidden", False))
        student_out = self.student(audio, audio_lengths, targets, target_lengths, need_hidden)
        teacher_out = self.teacher_source(
            audio, audio_lengths, targets, target_lengths, keys=keys, student=student_out,
            need_hidden=need_hidden, training=self.training, stored=stored_teacher,
        )
        asr_parts = self.asr_loss_fn(student_out, targets, target_lengths)
        parts = {f"asr_{k}": v for k, v in asr_parts.items() if k != "total"}
        parts["asr"] = asr_parts["total"]
        if teacher_out is None:
            parts["total"] = parts["asr"]
            return parts
        parts.update(self.kd_loss_fn(student_out, teacher_out, targets, target_lengths))
        parts["total"] = (1 - self.alpha) * parts["asr"] + self.alpha * parts["kd"]
        return parts


__all__ = ["KDWrapper", "OnlineTeacher", "TeacherSource"]
