"""Teacher -> student -> KD student on speechocean762: accented read sentences (real speech).

1000 read prompts from 50 Mandarin-L1 speakers of English, adults and children
(``../shared/data/speechocean762``). Speaker-disjoint splits (``prepare.py``): 40 speakers
train, 5 validate, 5 test; every prompt is distinct, so test sentences are unseen too.
Transcripts are the prompts, not verbatim: a speaker sometimes skips or misreads a word, which
caps how low any WER measured against them can go. Writes reports/speechocean762/report.md and
metrics.json in the demo's schema.

``--extra`` adds other training speech (training split only; validation and test stay
speechocean762): ``an4`` (CMU AN4 training set, real), ``ljspeech`` (32 real sentences),
``synthetic:N`` (N sentences of the embedded espeak corpus, many voices).

Usage: python recipes/speechocean762/run.py [--quick] [--extra an4,synthetic:3000]
"""

from __future__ import annotations

import argparse
import json
import sys
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
FULL = RecipePlan(teacher_steps=2000, student_steps=1500, max_batch_seconds=60.0,
                val_every_steps=100, warmup_steps=100)
QUICK = RecipePlan(teacher_steps=4, student_steps=3, max_batch_seconds=20.0,
                 val_every_steps=2, warmup_steps=1)
# 40 training speakers are few: AN4's 74 speakers and LJSpeech's 32 sentences (real read
# speech) join training; validation and test stay speechocean762.
DEFAULT_EXTRA = "an4,ljspeech"


def _manifest_rows(folder: Path, name: str) -> list[dict]:
    lines = (folder / name).read_text(encoding="utf-8").splitlines()
    return [dict(r, audio_filepath=str((folder / r["audio_filepath"]).resolve()))
            for r in map(json.loads, filter(None, lines))]


def extra_rows(spec: str, shared_root: Path, exp: Path, quick: bool) -> list[dict]:
    """Training rows for ``--extra`` (see the module docstring)."""
    from asrkd.data.corpus import build_corpus

    rows: list[dict] = []
    for item in [x for x in spec.split(",") if x]:
        name, _, count = item.partition(":")
        if name == "an4":
            rows += _manifest_rows(shared_root / "an4", "manifest_train.jsonl")
        elif name == "ljspeech":
            rows += _manifest_rows(shared_root / "ljspeech", "manifest.jsonl")
        elif name == "synthetic":
            n = 12 if quick else int(count or 3000)
            out = exp / f"synthetic_{n}"
            build_corpus(out, n_train=n, n_val=0, n_test=0, progress=False)
            rows += _manifest_rows(out, "train.jsonl")
        else:
            raise SystemExit(f"unknown --extra source {name!r} (an4, ljspeech, synthetic:N)")
    if quick:
        rows = rows[:12]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared_root = ROOT.parent / "shared" / "data"
    parser.add_argument("--shared", type=Path, default=shared_root / "speechocean762")
    parser.add_argument("--quick", action="store_true", help="tiny run (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "speechocean762")
    parser.add_argument("--exp", type=Path, default=ROOT / "exp" / "speechocean762")
    parser.add_argument("--extra", default=DEFAULT_EXTRA,
                        help="extra training speech: an4, ljspeech, synthetic:N (comma-separated)")
    args = parser.parse_args()
    if not (args.shared / "manifest.jsonl").is_file():
        raise SystemExit(f"speechocean762 not found at {args.shared} (pass --shared PATH)")
    extra = extra_rows(args.extra, args.shared.parent, args.exp, args.quick)
    corpus = args.exp / "manifests"
    stats = prepare(args.shared, corpus, limit=12 if args.quick else None, extra_train=extra)
    run_recipe(
        report_dir=args.out,
        corpus_dir=corpus,
        exp_dir=args.exp,
        plan=QUICK if args.quick else FULL,
        overrides=OVERRIDES,
        corpus_summary=stats["summary"],
        title="asrkd on real speech: speechocean762 (non-native English, adults and children)",
        notes=[
            "Test speakers and sentences are both unseen in training. References are the read "
            "prompts, not verbatim transcripts.",
        ],
    )


if __name__ == "__main__":
    main()
