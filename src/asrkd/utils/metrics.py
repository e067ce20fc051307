"""Word and character error rates with substitution/deletion/insertion counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class ErrorCounts:
    """Edit operations of a minimum-edit alignment, summed over utterances."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_length: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """Errors per reference unit; with an empty reference, 1.0 if anything was inserted."""
        if self.reference_length == 0:
            return float(self.errors > 0)
        return self.errors / self.reference_length

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.reference_length + other.reference_length,
        )


def align_counts(reference: Sequence, hypothesis: Sequence) -> ErrorCounts:
    """Levenshtein alignment of two sequences; ties prefer substitutions (as jiwer/sclite)."""
    rows, cols = len(reference), len(hypothesis)
    # Each cell holds (cost, substitutions, deletions, insertions).
    previous = [(j, 0, 0, j) for j in range(cols + 1)]
    for i in range(1, rows + 1):
        current = [(i, 0, i, 0)]
        for j in range(1, cols + 1):
            if reference[i - 1] == hypothesis[j - 1]:
                current.append(previous[j - 1])
                continue
            sub, dele, ins = previous[j - 1], previous[j], current[j - 1]
            best = min(sub[0], dele[0], ins[0])
            if sub[0] == best:
                current.append((sub[0] + 1, sub[1] + 1, sub[2], sub[3]))
            elif dele[0] == best:
                current.append((dele[0] + 1, dele[1], dele[2] + 1, dele[3]))
            else:
                current.append((ins[0] + 1, ins[1], ins[2], ins[3] + 1))
        previous = current
    _, s, d, n = previous[cols]
    return ErrorCounts(s, d, n, rows)


def word_errors(reference: str, hypothesis: str) -> ErrorCounts:
    return align_counts(reference.split(), hypothesis.split())


def char_errors(reference: str, hypothesis: str) -> ErrorCounts:
    """Character errors over the text with runs of spaces collapsed (spaces count)."""
    return align_counts(" ".join(reference.split()), " ".join(hypothesis.split()))


def corpus_error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Corpus-level WER and CER (errors summed over utterances / reference units summed)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    words, chars = ErrorCounts(), ErrorCounts()
    for reference, hypothesis in zip(references, hypotheses):
        words = words + word_errors(reference, hypothesis)
        chars = chars + char_errors(reference, hypothesis)
    return {
        "wer": words.rate,
        "cer": chars.rate,
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
        "words": words.reference_length,
    }
