"""RNN-T KD on collapsed lattice distributions (Panchapagesan et al., 2021; ``"rnnt_kl"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from asrkd.data.tokenizer import BLANK_ID
from asrkd.errors import ConfigError
from asrkd.losses.kd.common import (
    SoftenedKD,
    check_same_shape,
    kl_from_log_probs,
    upcast_half,
    weighted_mean,
)
from asrkd.models.common import make_pad_mask

if TYPE_CHECKING:
    from asrkd.models.e2e_asr import E2EASR, ASROutput
    from asrkd.training.distillation import KDConfig

# Stand-in for log(0) in the RNN-T lattice recursions: finite so that cumulative sums never
# produce inf - inf = nan, and small enough that exp() of it is exactly 0 in float64.
_LATTICE_NEG = -1.0e5

JointFn = Callable[[int, int], torch.Tensor]



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
    x = upcast_half(joint_logits) / temperature
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


# Node weightings of RNNTKD (KDConfig.rnnt_weighting).
RNNT_WEIGHTINGS = ("uniform", "occupancy")


class RNNTKD(SoftenedKD):
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
        super().__init__(temperature, reduction)
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        if weighting not in RNNT_WEIGHTINGS:
            raise ConfigError(
                f"weighting must be one of {', '.join(RNNT_WEIGHTINGS)}, got {weighting!r}"
            )
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
                   weighting=config.rnnt_weighting, reduction=config.reduction)

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
        check_same_shape(student_joint, teacher_joint, "RNNTKD")
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
            return tau**2 * weighted_mean(kl[valid], weights[valid])
        # Zero padded nodes with where() (not a product: they may hold inf/nan).
        weighted = torch.where(valid, kl * weights, torch.zeros_like(kl)).sum((1, 2))
        mass = torch.where(valid, weights, torch.zeros_like(weights)).sum((1, 2))
        per_utterance = weighted / torch.where(mass > 0, mass, torch.ones_like(mass))
        path_nodes = (t_len + target_lengths.to(device)).to(kl.dtype)
        return tau**2 * (per_utterance * path_nodes).mean()
