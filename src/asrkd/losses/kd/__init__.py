"""Knowledge-distillation losses on tensors (teacher -> student), one module per kind.

Every loss works on already computed outputs; a wrapper runs the teacher (under
``torch.no_grad()``, in eval mode) and the student and hands the tensors over. Each loss also
detaches the teacher tensors itself, so gradients only ever reach the student (and the loss's
own parameters, e.g. the projections of :class:`HiddenStateKD`). Shared conventions and
helpers: :mod:`asrkd.losses.kd.common`.

Losses (registry name in brackets):
    * :class:`CTCFrameKD` -- frame-level KL between CTC posteriors (``"ctc_kl"``).
    * :class:`TokenKD` -- token-level KL of an attention decoder under teacher forcing
      (``"token_kl"``).
    * :class:`RNNTKD` -- collapsed-distribution RNN-T KD (Panchapagesan et al., 2021)
      (``"rnnt_kl"``).
    * :class:`HiddenStateKD` -- learned-projection regression of hidden states (``"hidden"``).

Each class also knows when it applies to a teacher/student pair (``applies``), how to build
itself from a :class:`~asrkd.training.distillation.KDConfig` (``from_config``) and how to read
its tensors from two :class:`~asrkd.models.e2e_asr.ASROutput` (``from_outputs``).
"""

from __future__ import annotations

from torch import nn

from asrkd.errors import ConfigError
from asrkd.losses.kd.common import (
    REDUCTIONS,
    check_kd_compatibility,
    kl_from_log_probs,
    softened_kl,
)
from asrkd.losses.kd.ctc import CTCFrameKD
from asrkd.losses.kd.hidden import HiddenStateKD, default_layer_map
from asrkd.losses.kd.rnnt import RNNTKD, collapsed_log_probs, rnnt_occupancy
from asrkd.losses.kd.token import TokenKD

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
        ConfigError: for an unknown name, listing the valid ones.
    """
    if name not in KD_LOSSES:
        raise ConfigError(f"unknown KD loss {name!r}; valid names: {', '.join(sorted(KD_LOSSES))}")
    return KD_LOSSES[name](**kwargs)


__all__ = [
    "KD_LOSSES",
    "REDUCTIONS",
    "RNNTKD",
    "CTCFrameKD",
    "HiddenStateKD",
    "TokenKD",
    "build_kd_loss",
    "check_kd_compatibility",
    "collapsed_log_probs",
    "default_layer_map",
    "kl_from_log_probs",
    "rnnt_occupancy",
    "softened_kl",
]
