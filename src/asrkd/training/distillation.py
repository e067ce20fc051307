"""Distillation set-up: the KD configuration, the loss it builds, and the KDWrapper builder.

:class:`~asrkd.models.distillation.KDWrapper` (in the model layer) receives its loss functions
and its teacher; this module makes them from a :class:`KDConfig`: :class:`KDLoss` sums the
configured losses of the one registry, :data:`~asrkd.losses.kd.KD_LOSSES`, and
:func:`build_kd` picks the online teacher or a teacher cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from asrkd.errors import ConfigError
from asrkd.losses.kd import KD_LOSSES, REDUCTIONS, check_kd_compatibility
from asrkd.losses.kd.rnnt import RNNT_WEIGHTINGS
from asrkd.models.distillation import KDWrapper
from asrkd.models.e2e_asr import E2EASR, ASROutput
from asrkd.training.teacher_cache import (
    CacheChecks,
    CachedCTCKD,
    CachedTeacher,
    check_frame_timing,
)


@dataclass(frozen=True)
class KDConfig:
    """Which KD losses to use and how to weigh them.

    total = (1 - alpha) * ASR + alpha * sum_i weight_i * KD_i. The temperature-squared factor
    of Hinton et al. is inside each output-distribution loss.

    Attributes:
        alpha: share of the KD term.
        temperature: softening of output distributions (``ctc_kl``, ``token_kl``, ``rnnt_kl``).
        losses: names from ``ctc_kl``, ``token_kl``, ``rnnt_kl``, ``hidden``.
        weights: one weight per entry of ``losses`` (default 1 each).
        blank_weight: weight of teacher-blank frames in ``ctc_kl`` (1 = no down-weighting).
        ctc_delay: encoder frames by which ``ctc_kl`` delays the teacher's posteriors: a
            streaming student sees less of the future than a full-context teacher and emits
            its tokens later, so frame-by-frame agreement with the teacher's timing fights its
            CTC loss (0 = none).
        layer_map: (student layer, teacher layer) pairs for ``hidden``; None maps uniformly.
        hidden_loss: ``mse`` or ``cosine``.
        rnnt_chunk_size: frames per chunk in ``rnnt_kl`` (memory).
        rnnt_weighting: lattice nodes in ``rnnt_kl``: ``uniform`` (every valid node alike, as
            in Panchapagesan et al.) or ``occupancy`` (the teacher's posterior node occupancy,
            so the loss sits on the nodes its alignments visit).
        reduction: ``utterance`` (default): each KD loss is summed over an utterance's frames
            or tokens and averaged over utterances, the scale of the CTC / attention / RNN-T
            losses, so ``alpha`` weighs like against like; ``frame``: averaged over positions
            (about 1/70 of that scale for 3 s utterances at 25 frames/s).
    """

    alpha: float = 0.5
    temperature: float = 2.0
    losses: tuple[str, ...] = ("ctc_kl", "token_kl")
    weights: tuple[float, ...] | None = None
    blank_weight: float = 1.0
    ctc_delay: int = 0
    layer_map: tuple[tuple[int, int], ...] | None = None
    hidden_loss: str = "mse"
    rnnt_chunk_size: int = 16
    rnnt_weighting: str = "uniform"
    reduction: str = "utterance"

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ConfigError(
                f"kd.reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}"
            )
        unknown = [name for name in self.losses if name not in KD_LOSSES]
        if unknown:
            raise ConfigError(
                f"unknown KD loss {unknown[0]!r} in kd.losses; valid names: "
                f"{', '.join(sorted(KD_LOSSES))}"
            )
        if self.weights is not None and len(self.weights) != len(self.losses):
            raise ConfigError("kd.weights needs one weight per entry of kd.losses")
        if self.ctc_delay < 0:
            raise ConfigError(f"kd.ctc_delay must be >= 0 frames, got {self.ctc_delay}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"kd.alpha must be within [0, 1], got {self.alpha}")
        if self.rnnt_weighting not in RNNT_WEIGHTINGS:
            raise ConfigError(
                f"kd.rnnt_weighting must be one of {', '.join(RNNT_WEIGHTINGS)}, "
                f"got {self.rnnt_weighting!r}"
            )
        if not self.temperature > 0:  # checked here, before any teacher is loaded
            raise ConfigError(f"kd.temperature must be > 0, got {self.temperature}")


class KDLoss(nn.Module):
    """The configured KD losses, applied to teacher and student :class:`ASROutput`.

    ``forward`` returns ``kd_<name>`` for each loss and ``kd`` (their weighted sum). The losses
    run in the registry's order whatever the order of ``config.losses``.
    """

    def __init__(self, config: KDConfig, teacher: E2EASR, student: E2EASR) -> None:
        super().__init__()
        self.config = config
        self.weights = dict(zip(config.losses, config.weights or [1.0] * len(config.losses)))
        check_kd_compatibility(
            teacher.vocab_size,
            student.vocab_size,
            teacher.subsampling_factor,
            student.subsampling_factor,
            frame_level=any(name != "token_kl" for name in config.losses),
        )
        if any(name != "token_kl" for name in config.losses):
            check_frame_timing(teacher, student)
        self.losses = nn.ModuleDict()
        for name, cls in KD_LOSSES.items():
            if name not in config.losses:
                continue
            if not cls.applies(teacher, student):
                raise ConfigError(f"KD loss {name!r} needs teacher and student with {cls.requires}")
            self.losses[name] = cls.from_config(config, teacher, student)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.losses)

    @property
    def needs_hidden(self) -> bool:
        return "hidden" in self.losses

    def forward(
        self,
        student: ASROutput,
        teacher: ASROutput,
        targets: torch.Tensor,
        target_lengths: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        parts = {f"kd_{name}": loss.from_outputs(student, teacher, targets, target_lengths)
                 for name, loss in self.losses.items()}
        parts["kd"] = sum(self.weights[name] * parts[f"kd_{name}"] for name in self.losses)
        return parts


def build_kd(
    student: E2EASR,
    asr_loss_fn: nn.Module,
    config: KDConfig,
    teacher: E2EASR | None = None,
    teacher_cache: CacheChecks | None = None,
    distil_final_output: bool = True,
) -> KDWrapper:
    """The :class:`KDWrapper` of ``config``: distil ``teacher`` (run on every batch) or the
    posteriors stored in ``teacher_cache`` (``asrkd cache-teacher``; frame-level CTC KD only).

    ``distil_final_output=False`` keeps only the ``hidden`` (intermediate-layer) loss.
    """
    if teacher_cache is not None:
        if tuple(config.losses) != ("ctc_kl",):
            raise ConfigError(
                "a teacher cache holds CTC posteriors only: set kd.losses to [ctc_kl] "
                f"(got {list(config.losses)}), or train without training.teacher_cache"
            )
        teacher_cache.check_compatible(student)
        kd_loss = CachedCTCKD(config.temperature, config.blank_weight, config.reduction,
                              weight=(config.weights or (1.0,))[0], delay=config.ctc_delay)
        return KDWrapper(CachedTeacher(teacher_cache), student, asr_loss_fn, kd_loss,
                         distil_final_output, config.alpha)
    if teacher is None:
        raise ConfigError("KD needs a teacher or a teacher cache")
    if not distil_final_output:
        if "hidden" not in config.losses:
            raise ConfigError(
                "distil_final_output=False leaves only hidden-state KD; add 'hidden' to "
                "kd.losses"
            )
        hidden = [i for i, name in enumerate(config.losses) if name == "hidden"]
        weights = None if config.weights is None else tuple(config.weights[i] for i in hidden)
        config = replace(config, losses=("hidden",), weights=weights)
    return KDWrapper(teacher, student, asr_loss_fn, KDLoss(config, teacher, student),
                     distil_final_output, config.alpha)


__all__ = ["KDConfig", "KDLoss", "build_kd", "check_frame_timing"]
