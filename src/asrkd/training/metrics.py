"""Validation WER and CER as a torchmetrics ``Metric``: error and reference counts summed over
batches and, in distributed runs, over processes (corpus-level rates, not a mean of
per-batch rates). The counting is :mod:`asrkd.utils.metrics`'s, the one alignment the
evaluation reports use too."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from asrkd.utils.metrics import char_errors, word_errors


class ErrorRates(Metric):
    """Corpus-level ``wer`` and ``cer`` of hypotheses against (normalised) references."""

    full_state_update = False
    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("word_errors", "words", "char_errors", "chars"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64),
                           dist_reduce_fx="sum")

    def update(self, references: Sequence[str], hypotheses: Sequence[str]) -> None:
        for reference, hypothesis in zip(references, hypotheses, strict=True):
            words, chars = word_errors(reference, hypothesis), char_errors(reference, hypothesis)
            self.word_errors += words.errors
            self.words += words.reference_length
            self.char_errors += chars.errors
            self.chars += chars.reference_length

    def compute(self) -> dict[str, torch.Tensor]:
        return {"wer": self.word_errors / self.words.clamp(min=1),
                "cer": self.char_errors / self.chars.clamp(min=1)}
