"""Knowledge-distillation losses on tensors (teacher -> student).

Every loss here works on already computed outputs; a wrapper runs the teacher (under
``torch.no_grad()``, in eval mode) and the student and hands the tensors over. Each loss also
detaches the teacher tensors itself, so gradients only ever reach the student (and the loss's
own parameters, e.g. the projections of :class:`HiddenStateKD`).

All losses follow the conventions of the project: batch-first tensors, padding described by
``lengths`` (never by a pad value), one shared vocabulary of size ``V`` with blank 0, pad 1,
bos 2, eos 3, unk 4. Padded positions are removed *before* any arithmetic, so garbage (even
inf/nan) in padding cannot change a value or a gradient.

Losses:
    * :class:`CTCFrameKD` -- frame-level KL between CTC posteriors (``"ctc_kl"``).
    * :class:`TokenKD` -- token-level KL of an attention decoder under teacher forcing
      (``"token_kl"``).
    * :class:`RNNTKD` -- collapsed-distribution RNN-T KD (Panchapagesan et al., 2021)
      (``"rnnt_kl"``).
    * :class:`HiddenStateKD` -- learned-projection regression of hidden states (``"hidden"``).

Helpers: :func:`check_kd_compatibility`, :func:`filter_pseudo_labels` (sequence-level KD),
:func:`default_layer_map`, :func:`rnnt_occupancy`, :func:`build_kd_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from asrkd.data.tokenizer import BLANK_ID
from asrkd.errors import ConfigError, UserError
from asrkd.models.common import make_pad_mask
from asrkd.models.transformer_decoder import make_decoder_io
from asrkd.utils.metrics import align_counts

if TYPE_CHECKING:
    from asrkd.models.e2e_asr import E2EASR, ASROutput
    from asrkd.training.distillation import KDConfig

# Stand-in for log(0) in the RNN-T lattice recursions: finite so that cumulative sums never
# produce inf - inf = nan, and small enough that exp() of it is exactly 0 in float64.
_LATTICE_NEG = -1.0e5

JointFn = Callable[[int, int], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def _upcast(x: torch.Tensor) -> torch.Tensor:
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
    log_q = torch.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    log_p = torch.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    return kl_from_log_probs(log_p, log_q)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
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


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _reduce(
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
        return _weighted_mean(values, weights)
    total = values.sum() if weights is None else (values * weights).sum()
    return total / max(int(batch_size), 1)


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
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


# ---------------------------------------------------------------------------------------------
# CTC frame-level KD
# ---------------------------------------------------------------------------------------------


class CTCFrameKD(nn.Module):
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
    """

    def __init__(
        self,
        temperature: float = 2.0,
        blank_weight: float = 1.0,
        blank_threshold: float | None = None,
        reduction: str = "utterance",
    ) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.reduction = _check_reduction(reduction)
        if blank_weight < 0:
            raise ConfigError(f"blank_weight must be >= 0, got {blank_weight}")
        self.blank_weight = float(blank_weight)
        self.blank_threshold = None if blank_threshold is None else float(blank_threshold)

    def frame_weights(self, teacher_logits: torch.Tensor) -> torch.Tensor | None:
        """Weights (N,) for teacher logits (N, V) of valid frames; None means all 1."""
        if self.blank_weight == 1.0 and self.blank_threshold is None:
            return None
        teacher_logits = _upcast(teacher_logits)
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
                   reduction=config.reduction)

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
        _check_same_shape(student_logits, teacher_logits, "CTCFrameKD")
        teacher_logits = teacher_logits.detach()
        valid = ~make_pad_mask(lengths.to(student_logits.device), student_logits.shape[1])
        # Select valid frames first: padding never enters any arithmetic.
        student = student_logits[valid]  # (N, V)
        teacher = teacher_logits[valid]  # (N, V)
        kl = softened_kl(student, teacher, self.temperature)  # (N,)
        weights = self.frame_weights(teacher)
        return self.temperature**2 * _reduce(kl, weights, len(lengths), self.reduction)


# ---------------------------------------------------------------------------------------------
# Attention-decoder token-level KD
# ---------------------------------------------------------------------------------------------


class TokenKD(nn.Module):
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
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.reduction = _check_reduction(reduction)

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
        _check_same_shape(student_logits, teacher_logits, "TokenKD")
        teacher_logits = teacher_logits.detach()
        valid = ~make_pad_mask(lengths.to(student_logits.device), student_logits.shape[1])
        kl = softened_kl(student_logits[valid], teacher_logits[valid], self.temperature)
        return self.temperature**2 * _reduce(kl, None, len(lengths), self.reduction)


# ---------------------------------------------------------------------------------------------
# RNN-T collapsed-distribution KD
# ---------------------------------------------------------------------------------------------


def _next_labels(
    targets: torch.Tensor, target_lengths: torch.Tensor, n_nodes_u: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next label y_{u+1} at each lattice row u, and whether it exists.

    Args:
        targets: (B, U) label ids (padding arbitrary).
        target_lengths: (B,) U_b.
        n_nodes_u: U + 1.

    Returns:
        next_labels (B, U+1) long -- y_{u+1} where u < U_b, else a non-blank dummy id;
        has_label (B, U+1) bool -- u < U_b.
    """
    batch = targets.shape[0]
    padded = torch.full((batch, n_nodes_u), BLANK_ID + 1, dtype=torch.long, device=targets.device)
    padded[:, : targets.shape[1]] = targets.long()
    has_label = ~make_pad_mask(target_lengths.to(targets.device), n_nodes_u)
    # Rows without a next label get a non-blank dummy: then "P(dummy) + P(rest without blank
    # and dummy)" is exactly 1 - P(blank), which is how the 2-way distribution is formed.
    next_labels = torch.where(has_label, padded, torch.full_like(padded, BLANK_ID + 1))
    return next_labels, has_label


def collapsed_log_probs(
    joint_logits: torch.Tensor,
    next_labels: torch.Tensor,
    has_label: torch.Tensor,
    temperature: float = 1.0,
    node_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Collapse RNN-T joint outputs to (blank, correct next label, rest) log-probabilities.

    Args:
        joint_logits: (B, Tc, U+1, V) joint logits for a chunk of frames.
        next_labels: (B, U+1) y_{u+1} (a non-blank dummy where ``has_label`` is False).
        has_label: (B, U+1) whether row u has a next label (u < U_b).
        temperature: logits are divided by it before normalising.
        node_mask: optional (B, Tc, U+1) bool, True on valid nodes; logits of other nodes are
            replaced by 0 first so that inf/nan padding yields finite values and zero gradients.

    Returns:
        (B, Tc, U+1, 3) log-probs ``[log P(blank), log P(y_{u+1}), log P(rest)]``; on rows
        without a next label the distribution is 2-way: ``[log P(blank), -inf, log(1-P(blank))]``.
    """
    x = _upcast(joint_logits) / temperature
    if node_mask is not None:
        x = torch.where(node_mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    vocab = x.shape[-1]
    lse = torch.logsumexp(x, dim=-1)  # (B, Tc, U1)
    idx = next_labels[:, None, :, None].expand(*x.shape[:-1], 1)
    log_blank = x[..., BLANK_ID] - lse
    log_label = x.gather(-1, idx).squeeze(-1) - lse
    # "rest" via a logsumexp over the remaining symbols instead of log(1 - pb - py): the
    # subtraction cancels catastrophically when blank + label hold almost all the mass.
    ids = torch.arange(vocab, device=x.device)
    excluded = (ids == BLANK_ID) | (ids == next_labels[..., None])  # (B, U1, V)
    log_rest3 = torch.logsumexp(x.masked_fill(excluded[:, None], float("-inf")), dim=-1) - lse
    log_rest2 = torch.logaddexp(log_label, log_rest3)  # everything but blank
    has = has_label[:, None, :].expand_as(log_blank)
    neg_inf = torch.full_like(log_label, float("-inf"))
    return torch.stack(
        [log_blank, torch.where(has, log_label, neg_inf), torch.where(has, log_rest3, log_rest2)],
        dim=-1,
    )


def _reverse_logcumsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.logcumsumexp(x.flip(dim), dim).flip(dim)


@torch.no_grad()
def rnnt_occupancy(
    log_blank: torch.Tensor,
    log_label: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
) -> torch.Tensor:
    """Posterior occupancy gamma(t, u) = alpha(t, u) beta(t, u) / P(y|x) of each lattice node.

    gamma(t, u) is the probability that the alignment passes through node (t, u); summed over
    the lattice of utterance b it equals T_b + U_b (every alignment visits that many nodes).
    Computed in float64 with one vectorised step per frame: along u, the forward recursion
    alpha(t, u) = logaddexp(alpha(t-1, u) + lb(t-1, u), alpha(t, u-1) + ly(t, u-1)) is a linear
    recurrence solved in closed form with a cumulative sum and a ``logcumsumexp``.

    Args:
        log_blank: (B, T, U+1) log P(blank | t, u).
        log_label: (B, T, U+1) log P(y_{u+1} | t, u) (ignored where u >= U_b).
        logit_lengths: (B,) T_b.
        target_lengths: (B,) U_b.

    Returns:
        (B, T, U+1) occupancy, 0 outside the valid lattice.
    """
    batch, n_t, n_u = log_blank.shape
    device = log_blank.device
    t_len = logit_lengths.to(device).long()
    u_len = target_lengths.to(device).long()
    t_ids = torch.arange(n_t, device=device)
    u_ids = torch.arange(n_u, device=device)
    valid_t = t_ids[None, :, None] < t_len[:, None, None]
    lb = log_blank.double().clamp_min(_LATTICE_NEG)
    ly = log_label.double().clamp_min(_LATTICE_NEG)
    lb = torch.where(valid_t & (u_ids[None, None, :] <= u_len[:, None, None]), lb, _LATTICE_NEG)
    ly = torch.where(valid_t & (u_ids[None, None, :] < u_len[:, None, None]), ly, _LATTICE_NEG)
    # c[b, t, u] = sum_{j < u} ly[b, t, j] (exclusive cumulative sum along u).
    c = torch.cumsum(ly, dim=-1) - ly

    alpha = torch.empty_like(lb)
    start = torch.full((batch, n_u), _LATTICE_NEG, dtype=lb.dtype, device=device)
    start[:, 0] = 0.0
    entry = start  # a_t(k): log-mass entering node (t, k) from the previous frame.
    for t in range(n_t):
        alpha[:, t] = c[:, t] + torch.logcumsumexp(entry - c[:, t], dim=-1)
        entry = alpha[:, t] + lb[:, t]

    terminal = torch.where(u_ids[None, :] == u_len[:, None], 0.0, _LATTICE_NEG).to(lb.dtype)
    beta = torch.empty_like(lb)
    after = torch.full((batch, n_u), _LATTICE_NEG, dtype=lb.dtype, device=device)
    for t in range(n_t - 1, -1, -1):
        # Frame T_b - 1 ends the lattice of utterance b: the final blank leads to "terminal".
        nxt = torch.where((t_len == t + 1)[:, None], terminal, after)
        exit_ = lb[:, t] + nxt  # b_t(k): log-mass leaving (t, k) by a blank
        beta[:, t] = _reverse_logcumsumexp(exit_ + c[:, t], dim=-1) - c[:, t]
        after = beta[:, t]

    last_t = (t_len - 1).clamp_min(0)
    batch_ids = torch.arange(batch, device=device)
    log_z = alpha[batch_ids, last_t, u_len] + lb[batch_ids, last_t, u_len]
    gamma = torch.exp(alpha + beta - log_z[:, None, None])
    valid = valid_t & (u_ids[None, None, :] <= u_len[:, None, None])
    return torch.where(valid, gamma, torch.zeros_like(gamma)).to(log_blank.dtype)


class RNNTKD(nn.Module):
    """Collapsed-distribution RNN-T KD (Panchapagesan et al., 2021).

    At every valid lattice node (t, u) -- t < T_b, u <= U_b -- the teacher and student joint
    distributions over V are collapsed to 3 outcomes: blank, the correct next label y_{u+1},
    and everything else. On the last row u == U_b there is no next label, so the distribution
    is 2-way (blank, rest). The loss is tau^2 * the mean over nodes of KL(teacher || student)
    between these small distributions.

    Node weighting (``weighting``):
        * ``"uniform"`` (default): plain mean over all valid nodes of the batch (as in the
          paper, which sums over the whole lattice).
        * ``"occupancy"``: weighted mean with the teacher's posterior node occupancy
          alpha * beta / P(y|x) (see :func:`rnnt_occupancy`), computed at temperature 1;
          concentrates the loss on nodes the teacher's alignments actually visit.

    Reduction: ``"utterance"`` (default) takes each utterance's weighted mean over its nodes
    times ``T_b + U_b`` (the number of nodes an alignment visits, so the loss is on the scale
    of the RNN-T negative log-likelihood), averaged over utterances; ``"frame"`` takes the
    weighted mean over all valid nodes of the batch.

    Memory: the log-softmax temporaries are formed for ``chunk_size`` frames at a time, and
    (when gradients are on and ``checkpoint_chunks``) each student chunk is recomputed in the
    backward pass instead of being stored, so the per-chunk (B, Tc, U+1, V) temporaries are
    never held for the whole T. With :meth:`forward_from_joint` the joint logits themselves
    are also produced chunk by chunk.

    Args:
        temperature: tau > 0, applied to the joint logits before normalising.
        chunk_size: frames per chunk.
        weighting: ``"uniform"`` or ``"occupancy"``.
        checkpoint_chunks: recompute student chunks in backward (saves memory, costs compute).
        reduction: ``"utterance"`` or ``"frame"`` (see above).
    """

    def __init__(
        self,
        temperature: float = 1.0,
        chunk_size: int = 16,
        weighting: str = "uniform",
        checkpoint_chunks: bool = True,
        reduction: str = "utterance",
    ) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.reduction = _check_reduction(reduction)
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        if weighting not in ("uniform", "occupancy"):
            raise ConfigError(f"weighting must be 'uniform' or 'occupancy', got {weighting!r}")
        self.chunk_size = int(chunk_size)
        self.weighting = weighting
        self.checkpoint_chunks = bool(checkpoint_chunks)

    requires = "RNN-T decoders"

    @staticmethod
    def applies(teacher: E2EASR, student: E2EASR) -> bool:
        return teacher.decoder_type == student.decoder_type == "rnnt"

    @classmethod
    def from_config(cls, config: KDConfig, teacher: E2EASR, student: E2EASR) -> RNNTKD:
        return cls(temperature=config.temperature, chunk_size=config.rnnt_chunk_size,
                   reduction=config.reduction)

    def from_outputs(self, student: ASROutput, teacher: ASROutput, targets: torch.Tensor,
                     target_lengths: torch.Tensor) -> torch.Tensor:
        return self(student.decoder_logits, teacher.decoder_logits, targets,
                    student.encoder_lengths, target_lengths)

    def forward(
        self,
        student_joint: torch.Tensor,
        teacher_joint: torch.Tensor,
        targets: torch.Tensor,
        logit_lengths: torch.Tensor,
        target_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Compute the loss from full joint logits.

        Args:
            student_joint: (B, T, U+1, V) student joint logits.
            teacher_joint: (B, T, U+1, V) teacher joint logits (detached here).
            targets: (B, U) label ids (no blank; padding arbitrary).
            logit_lengths: (B,) T_b, valid encoder frames.
            target_lengths: (B,) U_b, valid labels.

        Returns:
            Scalar loss.
        """
        _check_same_shape(student_joint, teacher_joint, "RNNTKD")
        if student_joint.dim() != 4:
            raise ValueError(
                f"RNNTKD expects (B, T, U+1, V) joints, got {tuple(student_joint.shape)}"
            )
        if student_joint.shape[2] != targets.shape[1] + 1:
            raise ValueError(
                f"RNNTKD: joint has U+1={student_joint.shape[2]} rows but targets have "
                f"U={targets.shape[1]} labels"
            )
        teacher_joint = teacher_joint.detach()
        return self.forward_from_joint(
            lambda t0, t1: student_joint[:, t0:t1],
            lambda t0, t1: teacher_joint[:, t0:t1],
            student_joint.shape[1],
            targets,
            logit_lengths,
            target_lengths,
        )

    def forward_from_joint(
        self,
        joint_fn_student: JointFn,
        joint_fn_teacher: JointFn,
        num_frames: int,
        targets: torch.Tensor,
        logit_lengths: torch.Tensor,
        target_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Compute the loss from callables producing joint logits one T-chunk at a time.

        ``joint_fn(t0, t1)`` must return the (B, t1 - t0, U+1, V) joint logits for frames
        ``t0 .. t1-1``, e.g. ``lambda t0, t1: joint(enc[:, t0:t1, None], pred[:, None])``.
        The teacher callable is run under ``torch.no_grad()``; the student callable is run
        inside activation checkpointing (if enabled), so it may be called twice per chunk and
        must be deterministic apart from RNG (whose state checkpointing restores).

        Args:
            joint_fn_student: (t0, t1) -> (B, t1-t0, U+1, V) student joint logits.
            joint_fn_teacher: (t0, t1) -> (B, t1-t0, U+1, V) teacher joint logits.
            num_frames: T, the padded number of frames.
            targets: (B, U) label ids.
            logit_lengths: (B,) T_b.
            target_lengths: (B,) U_b.

        Returns:
            Scalar loss.
        """
        if num_frames < 1:
            raise ValueError(f"RNNTKD needs at least one frame, got num_frames={num_frames}")
        device = targets.device
        n_u = targets.shape[1] + 1
        next_labels, has_label = _next_labels(targets, target_lengths, n_u)
        t_len = logit_lengths.to(device)
        valid_u = ~make_pad_mask(target_lengths.to(device) + 1, n_u)  # (B, U1): u <= U_b
        t_ids = torch.arange(num_frames, device=device)
        valid = (t_ids[None, :, None] < t_len[:, None, None]) & valid_u[:, None, :]  # (B,T,U1)
        tau = self.temperature

        kls: list[torch.Tensor] = []
        teacher_lb: list[torch.Tensor] = []
        teacher_ly: list[torch.Tensor] = []
        for t0 in range(0, num_frames, self.chunk_size):
            t1 = min(t0 + self.chunk_size, num_frames)
            with torch.no_grad():
                t_joint = joint_fn_teacher(t0, t1).detach()
                mask = valid[:, t0:t1]
                t_dist = collapsed_log_probs(t_joint, next_labels, has_label, tau, mask)
                if self.weighting == "occupancy":
                    # The lattice posterior uses the teacher's real (temperature 1) outputs.
                    real = t_dist
                    if tau != 1.0:
                        real = collapsed_log_probs(t_joint, next_labels, has_label, 1.0, mask)
                    teacher_lb.append(real[..., 0])
                    teacher_ly.append(real[..., 1])
                del t_joint

            def chunk_kl(t_dist: torch.Tensor, t0: int = t0, t1: int = t1) -> torch.Tensor:
                s_dist = collapsed_log_probs(
                    joint_fn_student(t0, t1), next_labels, has_label, tau, valid[:, t0:t1]
                )
                return kl_from_log_probs(t_dist, s_dist)  # (B, Tc, U1)

            if self.checkpoint_chunks and torch.is_grad_enabled():
                kls.append(checkpoint(chunk_kl, t_dist, use_reentrant=False))
            else:
                kls.append(chunk_kl(t_dist))

        kl = torch.cat(kls, dim=1)  # (B, T, U1): small, 1/V of a joint
        if self.weighting == "occupancy":
            weights = rnnt_occupancy(
                torch.cat(teacher_lb, dim=1), torch.cat(teacher_ly, dim=1), t_len, target_lengths
            ).to(kl.dtype)
        else:
            weights = torch.ones_like(kl)
        if self.reduction == "frame":
            # Select valid nodes before multiplying: padded nodes may hold inf/nan.
            return tau**2 * _weighted_mean(kl[valid], weights[valid])
        # Zero padded nodes with where() (not a product: they may hold inf/nan).
        weighted = torch.where(valid, kl * weights, torch.zeros_like(kl)).sum((1, 2))
        mass = torch.where(valid, weights, torch.zeros_like(weights)).sum((1, 2))
        per_utterance = weighted / torch.where(mass > 0, mass, torch.ones_like(mass))
        path_nodes = (t_len + target_lengths.to(device)).to(kl.dtype)
        return tau**2 * (per_utterance * path_nodes).mean()


# ---------------------------------------------------------------------------------------------
# Hidden-state KD
# ---------------------------------------------------------------------------------------------


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
        self.reduction = _check_reduction(reduction)
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
            pred = proj(_upcast(hs[valid]))  # (N, Dt)
            target = _upcast(ht[valid]).to(pred.dtype)
            if self.loss == "mse":
                per_frame = (pred - target).pow(2).mean(-1)
            else:
                per_frame = 1.0 - torch.cosine_similarity(pred, target, dim=-1, eps=1e-8)
            losses.append(_reduce(per_frame, None, len(lengths), self.reduction))
        return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------
# Sequence-level KD: pseudo-label filtering
# ---------------------------------------------------------------------------------------------


def nbest_agreement(nbest: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
    """Agreement of each utterance's n-best list with its 1-best, in [0, 1].

    For utterance b with hypotheses h_1 (best) .. h_N: mean over n >= 2 of
    ``1 - min(1, edit_distance(h_1, h_n) / max(len(h_1), 1))``; 1.0 when N == 1.
    A teacher that keeps producing the same transcript in its beam is more likely right.

    Args:
        nbest: per utterance, a list of token-id sequences, best first.

    Returns:
        (B,) float agreement.
    """
    out = []
    for hyps in nbest:
        if len(hyps) <= 1:
            out.append(1.0)
            continue
        best = list(hyps[0])
        scores = [
            1.0 - min(1.0, align_counts(best, list(h)).errors / max(len(best), 1)) for h in hyps[1:]
        ]
        out.append(sum(scores) / len(scores))
    return torch.tensor(out, dtype=torch.float32)


def filter_pseudo_labels(
    hypotheses_scores: torch.Tensor | Sequence[float] | Sequence[Sequence[float]],
    lengths: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    min_confidence: float = -0.5,
    agreement: torch.Tensor | Sequence[float] | None = None,
    min_agreement: float = 0.5,
    scores_are_normalized: bool = False,
    drop_empty: bool = True,
) -> tuple[torch.Tensor, float]:
    """Decide which teacher pseudo-labels to keep for sequence-level KD.

    Confidence is the 1-best hypothesis's average log-probability per token
    (``score / max(length, 1)``, or the score itself if ``scores_are_normalized``). An
    utterance is kept if its confidence >= ``min_confidence``, its agreement (if given)
    >= ``min_agreement``, and (with ``drop_empty``) its 1-best is not empty.

    Args:
        hypotheses_scores: (B,) 1-best log-probabilities, or (B, N) n-best ones with the best
            in column 0 (only column 0 is used for confidence).
        lengths: (B,) or (B, N) token counts of those hypotheses (without bos/eos).
        min_confidence: threshold on the per-token average log-probability (e.g. -0.5 keeps
            hypotheses whose tokens have geometric-mean probability >= exp(-0.5) ~ 0.61).
        agreement: optional (B,) scores in [0, 1], e.g. from :func:`nbest_agreement` or from
            comparing CTC and attention hypotheses.
        min_agreement: threshold on ``agreement``.
        scores_are_normalized: the scores already are per-token averages.
        drop_empty: drop utterances whose 1-best has no tokens.

    Returns:
        ``(keep, kept_share)``: keep (B,) bool mask and the kept fraction in [0, 1]
        (0.0 for an empty batch).
    """
    scores = torch.as_tensor(hypotheses_scores, dtype=torch.float64)
    lens = torch.as_tensor(lengths, dtype=torch.float64)
    if scores.dim() == 2:
        scores = scores[:, 0]
    if lens.dim() == 2:
        lens = lens[:, 0]
    if scores.shape != lens.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and lengths {tuple(lens.shape)} differ")
    confidence = scores if scores_are_normalized else scores / lens.clamp_min(1.0)
    keep = confidence >= min_confidence
    if agreement is not None:
        agree = torch.as_tensor(agreement, dtype=torch.float64)
        if agree.shape != keep.shape:
            raise ValueError(
                f"agreement {tuple(agree.shape)} does not match batch {tuple(keep.shape)}"
            )
        keep &= agree >= min_agreement
    if drop_empty:
        keep &= lens > 0
    share = float(keep.double().mean()) if keep.numel() else 0.0
    return keep, share


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

# The one registry of KD losses: ``KDLoss`` builds each from a KDConfig with ``from_config``
# and feeds it teacher and student outputs with ``from_outputs``.
KD_LOSSES: dict[str, type[nn.Module]] = {
    "ctc_kl": CTCFrameKD,
    "token_kl": TokenKD,
    "rnnt_kl": RNNTKD,
    "hidden": HiddenStateKD,
}


def build_kd_loss(name: str, **kwargs: object) -> nn.Module:
    """Build a KD loss by registry name.

    Args:
        name: one of ``KD_LOSSES`` (``ctc_kl``, ``token_kl``, ``rnnt_kl``, ``hidden``).
        **kwargs: constructor arguments of that loss.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if name not in KD_LOSSES:
        raise ConfigError(f"unknown KD loss {name!r}; valid names: {', '.join(sorted(KD_LOSSES))}")
    return KD_LOSSES[name](**kwargs)


__all__ = [
    "REDUCTIONS",
    "KD_LOSSES",
    "CTCFrameKD",
    "HiddenStateKD",
    "RNNTKD",
    "TokenKD",
    "build_kd_loss",
    "check_kd_compatibility",
    "collapsed_log_probs",
    "default_layer_map",
    "filter_pseudo_labels",
    "kl_from_log_probs",
    "nbest_agreement",
    "rnnt_occupancy",
    "softened_kl",
]
