"""Decoding strategies, separate from the model modules and their losses.

Each strategy is a small frozen object, called with a model and its encoder output, that
returns one :class:`~asrkd.models.common.Hypothesis` per utterance (as whisper's
``decoding.py`` and torchaudio's ``RNNTBeamSearch`` keep search apart from the network):

=====================  ==========================================================
``ctc_greedy``         :class:`CTCGreedy` - best path of the CTC head
``ctc_beam``           :class:`CTCPrefixBeam` - prefix beam search (+ token LM fusion)
``attention_greedy``   :class:`AttentionGreedy`
``attention_beam``     :class:`AttentionBeam` - joint CTC/attention scoring when the
                       model has a CTC head
``rnnt_greedy``        :class:`RNNTGreedy` - label-looping, batched
``rnnt_beam``          :class:`RNNTBeam` - time-synchronous, prefix merging
=====================  ==========================================================

:meth:`asrkd.models.e2e_asr.E2EASR.infer` builds one with :func:`strategy` and runs it; the
search algorithms themselves are in :mod:`.ctc`, :mod:`.attention` and :mod:`.rnnt`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from asrkd.decoding.attention import attention_beam, attention_greedy
from asrkd.decoding.ctc import ctc_greedy_decode, ctc_prefix_beam_search
from asrkd.decoding.rnnt import rnnt_beam, rnnt_greedy
from asrkd.errors import UserError
from asrkd.models.common import Hypothesis
from asrkd.models.lm import LMFusion

if TYPE_CHECKING:
    from asrkd.models.e2e_asr import E2EASR

METHODS = (
    "ctc_greedy", "ctc_beam", "attention_greedy", "attention_beam", "rnnt_greedy", "rnnt_beam",
)


def _check(model: E2EASR, method: str) -> None:
    family = method.split("_")[0]
    if family == "ctc" and model.ctc is None:
        raise UserError(f"method {method!r} needs a CTC head; this model has none")
    wanted = {"attention": "transformer", "rnnt": "rnnt"}.get(family)
    if wanted is not None and model.decoder_type != wanted:
        raise UserError(f"method {method!r} does not fit a {model.decoder_type} decoder")


@dataclass(frozen=True)
class CTCGreedy:
    name = "ctc_greedy"

    def __call__(self, model: E2EASR, encoder_out: torch.Tensor,
                 lengths: torch.Tensor) -> list[Hypothesis]:
        _check(model, self.name)
        return ctc_greedy_decode(model.ctc.log_probs(encoder_out), lengths)


@dataclass(frozen=True)
class CTCPrefixBeam:
    beam_size: int = 4
    fusion: LMFusion | None = None
    name = "ctc_beam"

    def __call__(self, model: E2EASR, encoder_out: torch.Tensor,
                 lengths: torch.Tensor) -> list[Hypothesis]:
        _check(model, self.name)
        return ctc_prefix_beam_search(model.ctc.log_probs(encoder_out), lengths, self.beam_size,
                                      fusion=self.fusion)


@dataclass(frozen=True)
class AttentionGreedy:
    name = "attention_greedy"

    def __call__(self, model: E2EASR, encoder_out: torch.Tensor,
                 lengths: torch.Tensor) -> list[Hypothesis]:
        _check(model, self.name)
        return attention_greedy(model.decoder, encoder_out, lengths)


@dataclass(frozen=True)
class AttentionBeam:
    """Attention beam search; with ``ctc_weight > 0`` and a CTC head, joint CTC/attention
    scoring of every step's candidates."""

    beam_size: int = 4
    length_penalty: float = 1.0
    ctc_weight: float = 0.3
    name = "attention_beam"

    def __call__(self, model: E2EASR, encoder_out: torch.Tensor,
                 lengths: torch.Tensor) -> list[Hypothesis]:
        _check(model, self.name)
        use_ctc = model.ctc is not None and self.ctc_weight > 0
        return attention_beam(
            model.decoder, encoder_out, lengths, beam_size=self.beam_size,
            length_penalty=self.length_penalty,
            ctc_log_probs=model.ctc.log_probs(encoder_out) if use_ctc else None,
            ctc_weight=self.ctc_weight if use_ctc else 0.0,
        )


@dataclass(frozen=True)
class RNNTGreedy:
    max_symbols_per_frame: int | None = None
    name = "rnnt_greedy"

    def __call__(self, model: E2EASR, encoder_out: torch.Tensor,
                 lengths: torch.Tensor) -> list[Hypothesis]:
        _check(model, self.name)
        return rnnt_greedy(model.decoder, encoder_out, lengths, self.max_symbols_per_frame)


@dataclass(frozen=True)
class RNNTBeam:
    beam_size: int = 4
    name = "rnnt_beam"

    def __call__(self, model: E2EASR, encoder_out: torch.Tensor,
                 lengths: torch.Tensor) -> list[Hypothesis]:
        _check(model, self.name)
        return rnnt_beam(model.decoder, encoder_out, lengths, beam_size=self.beam_size)


def strategy(method: str, beam_size: int = 4, length_penalty: float = 1.0,
             ctc_weight: float = 0.3, fusion: LMFusion | None = None):  # noqa: ANN201
    """The strategy object of a method name (see :data:`METHODS`)."""
    if fusion is not None and method != "ctc_beam":
        raise UserError(f"LM fusion works with ctc_beam decoding, not {method!r}")
    if method == "ctc_greedy":
        return CTCGreedy()
    if method == "ctc_beam":
        return CTCPrefixBeam(beam_size, fusion)
    if method == "attention_greedy":
        return AttentionGreedy()
    if method == "attention_beam":
        return AttentionBeam(beam_size, length_penalty, ctc_weight)
    if method == "rnnt_greedy":
        return RNNTGreedy()
    if method == "rnnt_beam":
        return RNNTBeam(beam_size)
    raise UserError(f"unknown decoding method {method!r}; choose from {('auto',) + METHODS}")


__all__ = [
    "METHODS", "AttentionBeam", "AttentionGreedy", "CTCGreedy", "CTCPrefixBeam", "RNNTBeam",
    "RNNTGreedy", "strategy",
]
