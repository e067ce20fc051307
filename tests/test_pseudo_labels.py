"""Sequence-level KD: pseudo-labelling (unlabelled) audio with a teacher, filtering, report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from asrkd.cli import build_parser
from asrkd.data.dataset import read_manifest
from asrkd.data.tokenizer import CharTokenizer
from asrkd.models.common import Hypothesis
from asrkd.models.e2e_asr import build_model, save_checkpoint
from asrkd.training.pseudo_labels import (
    per_token_confidence,
    pseudo_label,
    transcript_agreement,
)
from test_e2e import tiny_config


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_model(tiny_config("transformer"), CharTokenizer.english()).eval()


def _unlabelled(tiny_corpus, tmp_path, split="val", limit=6):
    """The split's first lines without ``text``, written elsewhere (absolute audio paths)."""
    lines = []
    for line in (tiny_corpus / f"{split}.jsonl").read_text().splitlines()[:limit]:
        record = json.loads(line)
        del record["text"]
        record["audio_filepath"] = str(tiny_corpus / record["audio_filepath"])
        lines.append(json.dumps(record))
    path = tmp_path / "unlabelled.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_unlabelled_audio_with_open_thresholds_keeps_every_transcript(
    tmp_path, tiny_corpus, teacher
):
    # The model's default method (attention beam search + CTC) on 2 lines: an untrained
    # decoder runs to its length limit, which is slow on CPU.
    manifest = _unlabelled(tiny_corpus, tmp_path, limit=2)
    out = tmp_path / "out" / "pseudo.jsonl"
    report = pseudo_label(
        teacher, manifest, out, beam_size=2, min_confidence=-math.inf, min_agreement=0.0
    )
    assert report["method"] == "attention_beam" and report["agreement_with"] == "ctc_greedy"
    assert report["total"] == 2
    empty = report["dropped"].get("empty transcript", 0)
    assert set(report["dropped"]) <= {"empty transcript"}  # only empty texts can be dropped
    assert report["kept"] == 2 - empty and report["kept_share"] == report["kept"] / 2
    assert report["references"] == 0 and report["wer_kept"] is None

    entries, _ = read_manifest(out)  # a valid manifest (text required by default)
    assert len(entries) == report["kept"]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for record, entry in zip(records, entries, strict=True):
        assert record["text"] == entry.text and record["text"].strip()
        assert record["teacher_confidence"] <= 0 and 0 <= record["teacher_agreement"] <= 1
        assert "original_text" not in record and "speaker" in record  # extra fields kept


def test_impossible_threshold_keeps_nothing_and_says_so(tmp_path, tiny_corpus, teacher):
    manifest = _unlabelled(tiny_corpus, tmp_path)
    out = tmp_path / "none.jsonl"
    # Log-probs are <= 0, so no transcript reaches a per-token average of +1.
    report = pseudo_label(
        teacher, manifest, out, method="ctc_greedy", min_confidence=1.0, agreement_with=None
    )
    assert report["kept"] == 0 and report["kept_share"] == 0.0
    assert report["dropped"]["low confidence"] == 6
    assert "no utterance passed" in report["warning"]
    assert read_manifest(out)[0] == []


def test_labelled_input_reports_kept_share_and_wer(tmp_path, tiny_corpus, teacher):
    manifest = tiny_corpus / "val.jsonl"
    everything = pseudo_label(
        teacher,
        manifest,
        tmp_path / "all.jsonl",
        method="ctc_greedy",
        min_confidence=-math.inf,
        agreement_with="ctc_beam",
        min_agreement=0.0,
        beam_size=2,
    )
    nonempty = everything["kept"]
    assert nonempty >= 1, "the tiny teacher should transcribe something"
    assert everything["references"] == 6 and everything["wer_kept"] is not None
    confidences = sorted(
        json.loads(line)["teacher_confidence"]
        for line in (tmp_path / "all.jsonl").read_text().splitlines()
    )
    # A threshold between two written confidences (rounded to 1e-4) that lie well apart.
    gaps = [i for i in range(1, len(confidences)) if confidences[i] - confidences[i - 1] > 3e-4]
    assert gaps, f"confidences too close to split: {confidences}"
    split = gaps[len(gaps) // 2]
    threshold = (confidences[split - 1] + confidences[split]) / 2
    half = pseudo_label(
        teacher,
        manifest,
        tmp_path / "half.jsonl",
        method="ctc_greedy",
        min_confidence=threshold,
        agreement_with=None,
    )
    expected = len(confidences) - split
    assert half["kept"] == expected and half["kept_share"] == round(expected / 6, 4)
    assert half["dropped"]["low confidence"] >= split
    records = [json.loads(line) for line in (tmp_path / "half.jsonl").read_text().splitlines()]
    assert all(r["original_text"] for r in records) and all(
        "teacher_agreement" not in r for r in records
    )
    strict = pseudo_label(
        teacher,
        manifest,
        tmp_path / "strict.jsonl",
        method="ctc_greedy",
        min_confidence=-math.inf,
        agreement_with="ctc_beam",
        min_agreement=1.01,
        beam_size=2,
    )
    assert strict["kept"] == 0 and strict["dropped"]["low agreement"] == 6
    assert strict["wer_kept"] is None and strict["wer_all"] == everything["wer_all"]


def test_confidence_is_per_token_for_every_decoder():
    hyp = Hypothesis(tokens=[5, 6, 7], score=-6.0)
    assert per_token_confidence(hyp, "ctc_greedy") == -2.0
    assert per_token_confidence(hyp, "rnnt_beam") == -2.0
    assert per_token_confidence(hyp, "attention_greedy") == -1.5  # eos counts
    # Beam search reports raw / (n + 1) ** lp: the same raw -6 gives the same confidence.
    assert per_token_confidence(Hypothesis([5, 6, 7], -1.5), "attention_beam", 1.0) == -1.5
    assert per_token_confidence(Hypothesis([5, 6, 7], -6.0), "attention_beam", 0.0) == -1.5
    assert transcript_agreement("abcd", "abcd") == 1.0
    assert transcript_agreement("abcd", "abxd") == 0.75
    assert transcript_agreement("ab", "xxxxxxx") == 0.0


def test_cli_and_method_errors(tmp_path, tiny_corpus, teacher, capsys):
    ckpt = save_checkpoint(teacher, tmp_path / "teacher.ckpt")
    manifest = _unlabelled(tiny_corpus, tmp_path, "test")
    parser = build_parser()
    args = parser.parse_args(
        [
            "pseudo-label",
            "--ckpt",
            str(ckpt),
            "--manifest",
            str(manifest),
            "--out",
            str(tmp_path / "p.jsonl"),
            "--method",
            "ctc_greedy",
            "--min-confidence=-inf",
            "--agreement-with",
            "none",
            "--json",
            str(tmp_path / "r.json"),
            "--threads",
            "1",
        ]
    )
    args.func(args)
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert f"kept {report['kept']} of 6" in printed and report["agreement_with"] is None
    with pytest.raises(ValueError, match="--agreement-with none"):
        pseudo_label(teacher, manifest, tmp_path / "x.jsonl", agreement_with="rnnt_greedy")
