"""KDWrapper: a frozen teacher, a trainable student, the ASR loss and the KD losses.

The teacher is held outside the module tree on purpose: ``parameters()``, ``state_dict()``
and ``train()`` then see only the student (and the projections of hidden-state KD), so no
optimizer can touch the teacher, no checkpoint contains it, and Lightning's ``train()`` calls
cannot switch its dropout or batch-norm updates back on. Device and dtype moves still reach it
(``_apply`` is forwarded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from asrkd.models.e2e_asr import E2EASR, ASROutput
from asrkd.models.transformer_decoder import make_decoder_io
from asrkd.training.kd_losses import (
    KD_LOSSES,
    REDUCTIONS,
    RNNTKD,
    CTCFrameKD,
    HiddenStateKD,
    TokenKD,
    check_kd_compatibility,
    default_layer_map,
)
from asrkd.training.teacher_cache import CachedCTCFrameKD, TeacherCache


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
        layer_map: (student layer, teacher layer) pairs for ``hidden``; None maps uniformly.
        hidden_loss: ``mse`` or ``cosine``.
        rnnt_chunk_size: frames per chunk in ``rnnt_kl`` (memory).
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
    layer_map: tuple[tuple[int, int], ...] | None = None
    hidden_loss: str = "mse"
    rnnt_chunk_size: int = 16
    reduction: str = "utterance"

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(
                f"kd.reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}"
            )
        unknown = [name for name in self.losses if name not in KD_LOSSES]
        if unknown:
            raise ValueError(
                f"unknown KD loss {unknown[0]!r} in kd.losses; valid names: "
                f"{', '.join(sorted(KD_LOSSES))}"
            )
        if self.weights is not None and len(self.weights) != len(self.losses):
            raise ValueError("kd.weights needs one weight per entry of kd.losses")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"kd.alpha must be within [0, 1], got {self.alpha}")


class KDLoss(nn.Module):
    """The configured KD losses, applied to teacher and student :class:`ASROutput`.

    ``forward`` returns ``kd_<name>`` for each loss and ``kd`` (their weighted sum).
    """

    def __init__(self, config: KDConfig, teacher: E2EASR, student: E2EASR) -> None:
        super().__init__()
        self.config = config
        self.weights = dict(zip(config.losses, config.weights or [1.0] * len(config.losses)))
        frame_level = any(name != "token_kl" for name in config.losses)
        check_kd_compatibility(
            teacher.vocab_size,
            student.vocab_size,
            teacher.subsampling_factor,
            student.subsampling_factor,
            frame_level=frame_level,
        )
        needs = {
            "ctc_kl": (teacher.ctc is not None and student.ctc is not None, "a CTC head"),
            "token_kl": (
                teacher.decoder_type == student.decoder_type == "transformer",
                "attention decoders",
            ),
            "rnnt_kl": (teacher.decoder_type == student.decoder_type == "rnnt", "RNN-T decoders"),
            "hidden": (True, ""),
        }
        for name in config.losses:
            ok, what = needs[name]
            if not ok:
                raise ValueError(f"KD loss {name!r} needs teacher and student with {what}")
        self.losses = nn.ModuleDict()
        t = config.temperature
        if "ctc_kl" in config.losses:
            self.losses["ctc_kl"] = CTCFrameKD(
                temperature=t, blank_weight=config.blank_weight, reduction=config.reduction
            )
        if "token_kl" in config.losses:
            self.losses["token_kl"] = TokenKD(temperature=t, reduction=config.reduction)
        if "rnnt_kl" in config.losses:
            self.losses["rnnt_kl"] = RNNTKD(
                temperature=t, chunk_size=config.rnnt_chunk_size, reduction=config.reduction
            )
        if "hidden" in config.losses:
            n_student = student.encoder.config.n_layers
            n_teacher = teacher.encoder.config.n_layers
            layer_map = config.layer_map or default_layer_map(n_student, n_teacher)
            self.losses["hidden"] = HiddenStateKD(
                [student.encoder.output_dim] * n_student,
                [teacher.encoder.output_dim] * n_teacher,
                [tuple(pair) for pair in layer_map],
                loss=config.hidden_loss,
                reduction=config.reduction,
            )

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
        parts: dict[str, torch.Tensor] = {}
        lengths = student.encoder_lengths
        for name, loss in self.losses.items():
            if name == "ctc_kl":
                value = loss(student.ctc_logits, teacher.ctc_logits, lengths)
            elif name == "token_kl":
                _, _, decoder_lengths = make_decoder_io(targets, target_lengths)
                value = loss(student.decoder_logits, teacher.decoder_logits, decoder_lengths)
            elif name == "rnnt_kl":
                value = loss(
                    student.decoder_logits, teacher.decoder_logits, targets, lengths,
                    target_lengths,
                )
            else:
                value = loss(student.hidden_states, teacher.hidden_states, lengths)
            parts[f"kd_{name}"] = value
        parts["kd"] = sum(self.weights[name] * parts[f"kd_{name}"] for name in self.losses)
        return parts


class KDWrapper(nn.Module):
    """Distil ``teacher`` into ``student``.

    With a :class:`~asrkd.training.teacher_cache.TeacherCache` (``asrkd cache-teacher``) the
    frame-level CTC KD reads the teacher's stored top-k log-probs instead of running the
    teacher, so long student runs pay for the teacher once; ``teacher`` may then be None.

    Args:
        teacher: trained E2EASR; frozen here (eval, ``requires_grad_(False)``, ``no_grad``).
        student: E2EASR to train; same vocabulary (and frame rate for frame-level KD).
        asr_loss_fn: supervised loss on the student (``ASRLoss``).
        kd_loss_fn: :class:`KDLoss` (built from a :class:`KDConfig` by :meth:`from_config`).
        alpha: share of the KD term: total = (1 - alpha) * asr + alpha * kd.
        distil_final_output: distil output distributions; when False only the ``hidden``
            loss (intermediate layers) is used.
    """

    def __init__(
        self,
        teacher: E2EASR,
        student: E2EASR,
        asr_loss_fn: nn.Module,
        kd_loss_fn: KDLoss | None,
        distil_final_output: bool = True,
        alpha: float = 0.5,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        super().__init__()
        if teacher is None and teacher_cache is None:
            raise ValueError("KDWrapper needs a teacher or a teacher cache")
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        object.__setattr__(self, "teacher", teacher)  # deliberately not a submodule
        self.teacher_cache = teacher_cache
        self.cached_ctc_kd: CachedCTCFrameKD | None = None
        self.cached_weight = 1.0
        self.student = student
        self.asr_loss_fn = asr_loss_fn
        self.kd_loss_fn = kd_loss_fn
        self.alpha = alpha
        if not distil_final_output and kd_loss_fn is not None:
            kept = [name for name in kd_loss_fn.losses if name == "hidden"]
            if not kept:
                raise ValueError(
                    "distil_final_output=False leaves only hidden-state KD; add 'hidden' to "
                    "kd.losses"
                )
            for name in list(kd_loss_fn.losses):
                if name != "hidden":
                    del kd_loss_fn.losses[name]
        self.distil_final_output = distil_final_output

    @classmethod
    def from_config(
        cls,
        teacher: E2EASR,
        student: E2EASR,
        asr_loss_fn: nn.Module,
        config: KDConfig,
        distil_final_output: bool = True,
        teacher_cache: TeacherCache | None = None,
    ) -> KDWrapper:
        if teacher_cache is not None:
            if tuple(config.losses) != ("ctc_kl",):
                raise ValueError(
                    "a teacher cache holds CTC posteriors only: set kd.losses to [ctc_kl] "
                    f"(got {list(config.losses)}), or train without training.teacher_cache"
                )
            teacher_cache.check_compatible(student)
            wrapper = cls(teacher, student, asr_loss_fn, None, distil_final_output,
                          config.alpha, teacher_cache)
            wrapper.cached_ctc_kd = CachedCTCFrameKD(
                config.temperature, config.blank_weight, config.reduction
            )
            wrapper.cached_weight = (config.weights or (1.0,))[0]
            return wrapper
        kd_loss = KDLoss(config, teacher, student)
        return cls(teacher, student, asr_loss_fn, kd_loss, distil_final_output, config.alpha)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # .to()/.double()/.cuda() must move the teacher too, though it is not a child module.
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> KDWrapper:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # never re-enable dropout or batch-norm updates in the teacher
        return self

    def forward(
        self,
        audio: torch.Tensor,
        audio_lengths: torch.Tensor,
        targets: torch.Tensor,
        target_lengths: torch.Tensor,
        keys: list[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss parts: ``asr`` (+ its own parts), ``kd_<name>``, ``kd`` and ``total``.

        ``keys`` (utterance ids, the batch's ``keys``) are needed with a teacher cache.
        """
        if self.teacher_cache is not None:
            return self._forward_cached(audio, audio_lengths, targets, target_lengths, keys)
        need_hidden = self.kd_loss_fn.needs_hidden
        with torch.no_grad():
            self.teacher.eval()
            teacher_out = self.teacher(audio, audio_lengths, targets, target_lengths, need_hidden)
        student_out = self.student(audio, audio_lengths, targets, target_lengths, need_hidden)
        asr_parts = self.asr_loss_fn(student_out, targets, target_lengths)
        kd_parts = self.kd_loss_fn(student_out, teacher_out, targets, target_lengths)
        parts = {f"asr_{k}": v for k, v in asr_parts.items() if k != "total"}
        parts["asr"] = asr_parts["total"]
        parts.update(kd_parts)
        parts["total"] = (1 - self.alpha) * parts["asr"] + self.alpha * parts["kd"]
        return parts

    def _forward_cached(
        self,
        audio: torch.Tensor,
        audio_lengths: torch.Tensor,
        targets: torch.Tensor,
        target_lengths: torch.Tensor,
        keys: list[str] | None,
    ) -> dict[str, torch.Tensor]:
        if keys is None:
            raise ValueError("KD from a teacher cache needs the batch's utterance keys")
        student_out = self.student(audio, audio_lengths, targets, target_lengths)
        asr_parts = self.asr_loss_fn(student_out, targets, target_lengths)
        parts = {f"asr_{k}": v for k, v in asr_parts.items() if k != "total"}
        parts["asr"] = asr_parts["total"]
        if not self.training and not all(key in self.teacher_cache for key in keys):
            # Validation audio is usually not in a cache written over the training set: the
            # validation loss is then the student's ASR loss (checkpoints follow val_wer).
            parts["total"] = parts["asr"]
            return parts
        logits = student_out.ctc_logits
        values, indices, teacher_lengths = self.teacher_cache.batch(
            keys, logits.shape[1], logits.shape[-1]
        )
        device = logits.device
        kd = self.cached_ctc_kd(
            logits, values.to(device), indices.to(device), student_out.encoder_lengths,
            teacher_lengths.to(device),
        )
        parts["kd_ctc_kl"] = kd
        parts["kd"] = self.cached_weight * kd
        parts["total"] = (1 - self.alpha) * parts["asr"] + self.alpha * parts["kd"]
        return parts
