"""Sequence-level KD: label (unlabelled) audio with a teacher's transcripts, keep the good ones.

:func:`pseudo_label` transcribes every line of a manifest with the teacher, scores each
transcript by the teacher's confidence (average log-probability per token) and, optionally,
by its agreement with a second decoding of the same audio (e.g. CTC greedy vs attention beam
search: 1 - CER between the two), keeps the lines that pass both thresholds
(:func:`filter_pseudo_labels`) and writes them as a NeMo manifest a
student can be trained on. When the input has reference text, the report also gives the WER
of the kept pseudo-labels, i.e. how much label noise the student will see.

Confidence per method (``Hypothesis.score`` means different things per decoder, so it is
converted to one scale, the average log-probability per emitted unit):

=================  ===============================================  =========================
method             ``Hypothesis.score``                             confidence
=================  ===============================================  =========================
ctc_greedy         best-path log-prob (sum over frames)             score / max(n, 1)
ctc_beam           prefix-merged log-prob of the label sequence     score / max(n, 1)
rnnt_greedy/beam   log-prob of the (merged) alignment               score / max(n, 1)
attention_greedy   log-prob of the tokens and eos                   score / (n + 1)
attention_beam     raw / (n + 1) ** length_penalty, raw = (1 - w)   raw / (n + 1)
                   log P_att + w log P_ctc (eos included)
=================  ===============================================  =========================

n is the number of tokens; the attention decoder's eos is a real prediction and counts as
one more unit.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from asrkd.data.dataset import ManifestDataset, duration_batches
from asrkd.data.text import TextNormalizer
from asrkd.errors import UserError
from asrkd.models.common import Hypothesis
from asrkd.models.e2e_asr import DECODING_METHODS, E2EASR, load_checkpoint
from asrkd.utils.metrics import align_counts, char_errors, corpus_error_rates

if TYPE_CHECKING:
    from asrkd.transcribers import Transcriber

DROP_REASONS = ("empty transcript", "low confidence", "low agreement")


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


def per_token_confidence(hypothesis: Hypothesis, method: str, length_penalty: float = 1.0) -> float:
    """The hypothesis's average log-probability per unit (see the module docstring's table).

    Args:
        hypothesis: a decoder's result (``tokens`` without bos/eos, ``score``).
        method: the decoding method that produced it.
        length_penalty: the exponent attention beam search normalised its score with.
    """
    n = len(hypothesis.tokens)
    if method == "attention_beam":
        # Undo the length normalisation, then average over the tokens plus eos.
        return hypothesis.score * (n + 1) ** length_penalty / (n + 1)
    if method == "attention_greedy":
        return hypothesis.score / (n + 1)
    return hypothesis.score / max(n, 1)


def transcript_agreement(main: str, other: str) -> float:
    """1 - CER of ``other`` against ``main``, clipped to [0, 1] (1: identical transcripts)."""
    return max(0.0, 1.0 - char_errors(main, other).rate)


def _check_method(model: E2EASR, method: str, what: str) -> None:
    """Fail before any decoding if ``method`` cannot run on this model."""
    if method not in DECODING_METHODS or method == "auto":
        raise UserError(
            f"{what} {method!r} is not a decoding method; choose from "
            f"{', '.join(m for m in DECODING_METHODS if m != 'auto')}"
        )
    family = method.split("_")[0]
    needs = {
        "ctc": model.ctc is not None,
        "attention": model.decoder_type == "transformer",
        "rnnt": model.decoder_type == "rnnt",
    }
    if not needs[family]:
        hint = " (pass agreement_with=None / --agreement-with none)" if "agree" in what else ""
        raise UserError(
            f"{what} {method!r} does not fit this teacher (decoder {model.decoder_type}, "
            f"{'with' if model.ctc is not None else 'no'} CTC head){hint}"
        )


def pseudo_label(
    checkpoint: str | Path | E2EASR | Transcriber,
    manifest: str | Path,
    out_manifest: str | Path,
    method: str | None = None,
    beam_size: int = 4,
    min_confidence: float = -0.5,
    agreement_with: str | None = "ctc_greedy",
    min_agreement: float = 0.8,
    batch_seconds: float = 120.0,
) -> dict:
    """Transcribe a manifest with the teacher and write the confident transcripts.

    Args:
        checkpoint: the teacher: an asrkd checkpoint path or :class:`E2EASR`, or any
            :class:`~asrkd.transcribers.Transcriber` (a Hugging Face model, ...; those give
            one transcript each, so ``agreement_with`` must be None).
        manifest: NeMo JSONL manifest; ``text`` is optional (unlabelled audio).
        out_manifest: JSONL to write (atomically): one line per kept utterance, the input
            line's fields with an absolute ``audio_filepath``, ``text`` = teacher transcript,
            ``teacher_confidence``, ``teacher_agreement`` (when computed) and
            ``original_text`` (when the input line had text).
        method: teacher decoding method (None: the decoder's own search, e.g. attention beam;
            CTC greedy for a CTC-only model).
        beam_size: beam for beam-search methods.
        min_confidence: keep utterances whose per-token average log-prob is >= this.
        agreement_with: second decoding method to compare with (None or "none": skip).
        min_agreement: keep utterances whose agreement (1 - CER between the two decodings)
            is >= this.
        batch_seconds: padded audio seconds per teacher batch.

    Returns:
        Report: ``total``, ``kept``, ``kept_share``, ``dropped`` (reason -> count; one
        utterance can fail several filters), ``mean_confidence``, ``mean_agreement``,
        ``references`` (input lines with text), ``wer_kept`` / ``cer_kept`` (kept
        pseudo-labels vs references; None without references or kept lines), ``wer_all``
        (every transcript vs references, before filtering), ``warning`` (when nothing was
        kept), settings and ``seconds``.
    """
    from asrkd.transcribers import ModelTranscriber

    start = time.perf_counter()
    if agreement_with is not None and agreement_with.strip().lower() in ("", "none"):
        agreement_with = None
    if isinstance(checkpoint, (str, Path)):
        checkpoint = load_checkpoint(checkpoint)
    if isinstance(checkpoint, E2EASR):
        teacher = ModelTranscriber(checkpoint, method, beam_size)
        second = (ModelTranscriber(checkpoint, agreement_with, beam_size, role="agreement_with")
                  if agreement_with is not None else None)
        normalizer = checkpoint.tokenizer.normalizer
    else:
        if agreement_with is not None:
            raise UserError(f"agreement_with={agreement_with!r} needs an asrkd teacher (two "
                            f"decodings of one model); {checkpoint.name} gives one transcript")
        if method is not None:
            raise UserError(f"method={method!r} applies to asrkd teachers only")
        teacher, second = checkpoint, None
        normalizer = TextNormalizer()  # external text: compare normalised with the references
    method = teacher.method if isinstance(teacher, ModelTranscriber) else teacher.name

    dataset = ManifestDataset(manifest, require_text=False, sample_rate=teacher.sample_rate)
    entries = dataset.entries
    transcripts: list = [None] * len(entries)
    agreement: list[float | None] = [None] * len(entries)
    for batch in duration_batches(entries, batch_seconds):
        audio = [dataset[i]["audio"].numpy() for i in batch]
        found = teacher.transcribe(audio)
        other = second.transcribe(audio) if second is not None else None
        for row, index in enumerate(batch):
            transcripts[index] = found[row]
            if other is not None:
                agreement[index] = transcript_agreement(found[row].text, other[row].text)

    confidence = [t.confidence for t in transcripts]
    n_tokens = [t.units for t in transcripts]
    keep, share = filter_pseudo_labels(
        confidence,
        n_tokens,
        min_confidence=min_confidence,
        agreement=agreement if agreement_with is not None else None,
        min_agreement=min_agreement,
        scores_are_normalized=True,
        drop_empty=True,  # an empty text line would be rejected by read_manifest
    )
    keep_list = keep.tolist()

    dropped: Counter = Counter()
    for index, kept in enumerate(keep_list):
        if kept:
            continue
        # `not x >= t` (rather than x < t) also counts nan as failing, as the filter does.
        if n_tokens[index] == 0:
            dropped["empty transcript"] += 1
        if not confidence[index] >= min_confidence:
            dropped["low confidence"] += 1
        if agreement[index] is not None and not agreement[index] >= min_agreement:
            dropped["low agreement"] += 1

    raw_lines = Path(manifest).read_bytes().splitlines()
    out_manifest = Path(out_manifest)
    out_manifest.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_manifest.with_name(out_manifest.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for index, entry in enumerate(entries):
            if not keep_list[index]:
                continue
            # Keep every field of the input line (speaker, offset, ...), not just the parsed ones.
            record = json.loads(raw_lines[entry.line - 1].decode("utf-8"))
            original = record.pop("text", None)
            # Absolute path: the output manifest may live in another folder than the input.
            record["audio_filepath"] = str(entry.audio_filepath)
            record["text"] = transcripts[index].text
            record["teacher_confidence"] = round(confidence[index], 4)
            if agreement[index] is not None:
                record["teacher_agreement"] = round(agreement[index], 4)
            if original is not None:
                record["original_text"] = original
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(out_manifest)

    labelled = [i for i, entry in enumerate(entries) if entry.text]
    kept_labelled = [i for i in labelled if keep_list[i]]

    def rates(indices: list[int]) -> dict | None:
        if not indices:
            return None
        return corpus_error_rates(
            [normalizer(entries[i].text) for i in indices],
            [normalizer(transcripts[i].text) for i in indices],
        )

    kept_rates, all_rates = rates(kept_labelled), rates(labelled)
    finite = [c for c in confidence if math.isfinite(c)]
    agreements = [a for a in agreement if a is not None]
    kept_count = int(keep.sum())
    report = {
        "manifest": str(manifest),
        "out_manifest": str(out_manifest),
        "method": method,
        "agreement_with": agreement_with,
        "min_confidence": min_confidence,
        "min_agreement": min_agreement if agreement_with is not None else None,
        "total": len(entries),
        "kept": kept_count,
        "kept_share": round(share, 4),
        "dropped": {reason: dropped[reason] for reason in DROP_REASONS if dropped[reason]},
        "mean_confidence": round(sum(finite) / len(finite), 4) if finite else None,
        "mean_agreement": round(sum(agreements) / len(agreements), 4) if agreements else None,
        "references": len(labelled),
        "wer_kept": None if kept_rates is None else round(kept_rates["wer"], 4),
        "cer_kept": None if kept_rates is None else round(kept_rates["cer"], 4),
        "wer_all": None if all_rates is None else round(all_rates["wer"], 4),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if entries and kept_count == 0:
        report["warning"] = (
            "no utterance passed the filters; lower min_confidence / min_agreement "
            "(--min-confidence, --min-agreement)"
        )
    return report


def format_report(report: dict) -> str:
    """A few readable lines for the terminal."""
    lines = [
        f"kept {report['kept']} of {report['total']} utterances "
        f"({100 * report['kept_share']:.1f}%) -> {report['out_manifest']}",
        f"teacher {report['method']}"
        + (f", agreement with {report['agreement_with']}" if report["agreement_with"] else "")
        + f"; mean confidence {report['mean_confidence']}"
        + (
            f", mean agreement {report['mean_agreement']}"
            if report["mean_agreement"] is not None
            else ""
        ),
    ]
    if report["dropped"]:
        reasons = ", ".join(f"{n} {why}" for why, n in report["dropped"].items())
        lines.append(f"dropped: {reasons}")
    if report["references"]:
        kept = "n/a" if report["wer_kept"] is None else f"{100 * report['wer_kept']:.2f}%"
        lines.append(
            f"WER of kept pseudo-labels vs references: {kept} "
            f"(all transcripts: {100 * report['wer_all']:.2f}%)"
        )
    if "warning" in report:
        lines.append("warning: " + report["warning"])
    return "\n".join(lines)


__all__ = [
    "DROP_REASONS",
    "format_report",
    "per_token_confidence",
    "pseudo_label",
    "transcript_agreement",
]
