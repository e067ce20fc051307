"""Teacher -> student -> KD student on CMU AN4 (real speech), scored on the official test set.

AN4 (``../shared/data/an4``): 948 training utterances from 74 speakers and the official
130-utterance test set from 10 other speakers, close-talking microphone, 16 kHz. Validation is
every 10th training speaker (8 speakers, 98 utterances; see ``prepare.py``), so every choice
was made without the test set, which is scored once at the end. Writes reports/an4/report.md
and metrics.json in the demo's schema.

Text: the manifests' transcripts, lowercase, as distributed (no ``<s>`` markers). Spelled
letters are single-letter words ("p i t t s b u r g h"), so WER counts each letter, as in the
published AN4 results; the recogniser's character vocabulary covers every transcript.

Usage: python recipes/an4/run.py [--quick] [--shared ../shared/data/an4] [--decoder rnnt]

``--decoder rnnt`` runs the same three stages with transducers (presets ``teacher_rnnt``,
``student_rnnt``, ``student_kd_rnnt``: RNN-T + CTC, KD with ``rnnt_kl`` + ``ctc_kl``), scores
them with RNN-T greedy search (and RNN-T beam search and CTC greedy of the same checkpoints)
and writes reports/an4_rnnt.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from asrkd.recipe import MANY_EPOCH_DROPOUT, RecipePlan, run_recipe

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare import prepare  # noqa: E402

OVERRIDES = [
    "data.speed_factors=[0.9,1.0,1.1]",
    # Many epochs of a small corpus: dropout 0.1, ramped (instead of the CPU presets' 0).
    *MANY_EPOCH_DROPOUT,
]
# ~88 epochs of the teacher (60 s batches, ~45 per epoch; 4000 steps, ~45 min on 2 cores) and
# 3000 steps of each student: at 2000 / 1500 steps all three were still improving when the
# cosine schedule ended (teacher best val WER 9.7 % at 2000 steps, 7.1 % at 4000;
# docs/training-recipe.md, "Full-length runs").
# Test scored twice: CTC greedy (the comparison with the no-LM results), and CTC prefix beam
# search with a character 6-gram LM of the training transcripts (weight, bonus and the penalty
# for words outside them tuned per model on the validation speakers), the comparison with
# the results that use an LM (Kaldi's decodes with AN4's word list and unigram LM).
FULL = RecipePlan(teacher_steps=4000, student_steps=3000, max_batch_seconds=60.0,
                val_every_steps=100, warmup_steps=100, lm_order=6,
                lm_penalties=(0.0, 4.0, 8.0))
QUICK = RecipePlan(teacher_steps=4, student_steps=3, max_batch_seconds=20.0,
                 val_every_steps=2, warmup_steps=1, lm_order=3, lm_weights=(0.0, 0.5),
                 lm_bonuses=(0.0, 1.0))

RNNT_CONFIGS = {"teacher": "teacher_rnnt", "student": "student_rnnt",
                "student_kd": "student_kd_rnnt"}

PUBLISHED = [
    "## Published results on the AN4 test set",
    "",
    "| system | test WER |",
    "|---|---:|",
    "| ESPnet2 Transformer, no LM (egs2/an4/asr1/README.md) | 7.6 % |",
    "| ESPnet2 Transformer + LM | 7.4 % |",
    "| Kaldi tri3 SAT GMM + AN4 unigram LM (egs/an4/s5/RESULTS) | 5.95 % |",
    "| NeMo Jasper tutorial, greedy | 20.7 % |",
    "",
    "Text normalisation: the corpus transcripts as distributed, lowercase; spelled letters are",
    "separate words, so a misrecognised letter is one word error, as in those results.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data" / "an4")
    parser.add_argument("--quick", action="store_true", help="tiny run (CI)")
    parser.add_argument("--decoder", choices=("transformer", "rnnt"), default="transformer",
                        help="the models' decoder (default: %(default)s, with CTC)")
    parser.add_argument("--out", type=Path, help="default: reports/an4 (an4_rnnt for rnnt)")
    parser.add_argument("--exp", type=Path, help="default: exp/an4 (an4_rnnt for rnnt)")
    parser.add_argument("--decoding", help="test decoding for all three models "
                        f"(default: {FULL.decoding}; rnnt_greedy for rnnt)")
    parser.add_argument("--teacher-cache", action=argparse.BooleanOptionalAction,
                        default=FULL.kd_teacher_cache,
                        help="distil from the teacher's CTC posteriors stored once per speed "
                        "factor (ctc_kl only) instead of running the teacher on every KD step "
                        "(transformer decoder only; default: %(default)s)")
    args = parser.parse_args()
    rnnt = args.decoder == "rnnt"
    name = "an4_rnnt" if rnnt else "an4"
    args.out = args.out or ROOT / "reports" / name
    args.exp = args.exp or ROOT / "exp" / name
    decoding = args.decoding or ("rnnt_greedy" if rnnt else FULL.decoding)
    if not (args.shared / "manifest_train.jsonl").is_file():
        raise SystemExit(f"AN4 not found at {args.shared} (pass --shared PATH)")
    corpus = args.exp / "manifests"
    stats = prepare(args.shared, corpus, limit=12 if args.quick else None)
    run_recipe(
        report_dir=args.out,
        corpus_dir=corpus,
        exp_dir=args.exp,
        plan=replace(QUICK if args.quick else FULL, decoding=decoding,
                     extra_decodings=("rnnt_beam", "ctc_greedy") if rnnt else (),
                     kd_teacher_cache=args.teacher_cache and not rnnt),
        overrides=OVERRIDES,
        corpus_summary=stats["summary"],
        title="asrkd on real speech: CMU AN4" + (", transducers" if rnnt else ""),
        configs=RNNT_CONFIGS if rnnt else None,
        notes=PUBLISHED,
    )


if __name__ == "__main__":
    main()
