"""A streaming student on AN4, distilled, against a full-context student of the same size.

Students of the same size trained with the same recipe (the AN4 plan's student steps, batching,
schedule and speed perturbation), the KD ones from the same teacher's stored CTC posteriors:

- ``streaming``: ``student_cpu_streaming`` (chunked attention, 320 ms chunks with 2.56 s of
  left context, causal convolutions, features without per-utterance statistics), ``ctc_kl``
  against the teacher's posteriors delayed by ``CTC_DELAY`` frames;
- ``streaming_kd_no_delay``: the same with plain ``ctc_kl``;
- ``streaming_no_kd``: the same without KD (the baseline KD must beat);
- ``full_context``: ``student_cpu``, the AN4 recipe's student, plain ``ctc_kl``.

Streaming students are decoded chunk by chunk as the audio arrives (:mod:`asrkd.streaming`) and
in one pass with the same attention mask; all on the official test set (10 unseen speakers)
with CTC greedy search. Writes ``reports/streaming/report.md`` and ``metrics.json``
(``full_context_wer``, ``streaming_wer``, ``chunk_ms``, ``chunk_compute_ms``, ``checkpoint``,
...) and the streaming section of BENCHMARKS.md. Finished stages are reused; about 40 min per
student on 2 cores.

Usage: python recipes/an4/streaming.py [--teacher exp/an4/teacher] [--quick]
(the teacher: ``bash recipes/an4/run.sh``, or ``python recipes/an4/train_stage.py teacher
--exp exp/an4``; ``--quick`` trains a tiny teacher itself)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare import prepare  # noqa: E402
from run import FULL, OVERRIDES, QUICK  # noqa: E402

from asrkd.models.e2e_asr import load_checkpoint  # noqa: E402
from asrkd.recipe import train_stage  # noqa: E402
from asrkd.streaming import evaluate_streaming  # noqa: E402
from asrkd.training.pipeline import evaluate  # noqa: E402
from asrkd.utils.markdown import update_section  # noqa: E402
from asrkd.utils.timing import cpu_model  # noqa: E402

CONFIGS = ROOT / "src" / "asrkd" / "configs" / "presets"
# The streaming student emits its tokens a median 5 encoder frames (200 ms; 10th-90th
# percentile 4-6) after the full-context teacher (measured on the validation speakers from the
# CTC spikes of the streaming student trained without KD, at step 1200, against the teacher's,
# on the 22 utterances where both transcripts are right; benchmarks/ctc_delay.py), so ctc_kl
# compares each of its frames with the teacher's frame 5 before (kd.ctc_delay).
CTC_DELAY = 5
# name: (recipe stage, preset, overrides). student_kd stages distil from the teacher.
MODELS = {
    "streaming": ("student_kd", "student_cpu_streaming", (f"training.kd.ctc_delay={CTC_DELAY}",)),
    "streaming_kd_no_delay": ("student_kd", "student_cpu_streaming", ()),
    "streaming_no_kd": ("student", "student_cpu_streaming", ()),
    "full_context": ("student_kd", "student_cpu", ()),
}


def _link_teacher(exp: Path, teacher: Path) -> None:
    exp.mkdir(parents=True, exist_ok=True)
    link = exp / "teacher"
    if not link.exists():
        link.symlink_to(os.path.relpath(teacher.resolve(), exp.resolve()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data" / "an4")
    parser.add_argument("--teacher", type=Path, default=ROOT / "exp" / "an4" / "teacher",
                        help="folder with the AN4 teacher's model.ckpt (default: %(default)s)")
    parser.add_argument("--exp", type=Path, default=ROOT / "exp" / "an4_streaming",
                        help="students go to <exp>/streaming, <exp>/streaming_no_kd and "
                        "<exp>/full_context")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "streaming")
    parser.add_argument("--steps", type=int, help=f"student steps (default {FULL.student_steps})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny run (CI)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.shared / "manifest_train.jsonl").is_file():
        raise SystemExit(f"AN4 not found at {args.shared} (pass --shared PATH)")
    plan = replace(QUICK if args.quick else FULL, kd_teacher_cache=True)
    steps = args.steps or plan.student_steps
    corpus = args.exp / "manifests"
    prepare(args.shared, corpus, limit=12 if args.quick else None)
    if args.quick:
        train_stage("teacher", plan, corpus, args.exp, plan.teacher_steps, list(OVERRIDES),
                    CONFIGS / "teacher.yaml")
        args.teacher = args.exp / "teacher"
    elif not (args.teacher / "model.ckpt").is_file():
        raise SystemExit(f"no teacher at {args.teacher}: train it first (bash recipes/an4/run.sh)")
    test = corpus / "test.jsonl"
    metrics: dict = {}
    for name, (stage, preset, extra) in MODELS.items():
        exp = args.exp / name
        _link_teacher(exp, args.teacher)
        result = train_stage(stage, plan, corpus, exp, steps,
                             [*OVERRIDES, f"model_preset={preset}", *extra],
                             CONFIGS / f"{stage}.yaml")
        checkpoint = exp / stage / "model.ckpt"
        model = load_checkpoint(checkpoint)
        one_pass_rows = exp / "test_one_pass.jsonl"
        one_pass = evaluate(model, test, method="ctc_greedy", threads=args.threads,
                            out_jsonl=one_pass_rows)
        metrics[name] = {
            "preset": preset, "params": model.num_parameters(),
            "wer": one_pass["wer"], "cer": one_pass["cer"],
            "train_seconds": result["train_seconds"], "train_steps": steps,
            "checkpoint": str(checkpoint),
        }
        if preset == "student_cpu_streaming":
            streamed_rows = exp / "test_streamed.jsonl"
            streamed = evaluate_streaming(model, test, threads=args.threads,
                                          out_jsonl=streamed_rows)
            one_pass_text = _hypotheses(one_pass_rows)
            streamed["same_transcript_as_one_pass"] = sum(
                one_pass_text[path] == text for path, text in _hypotheses(streamed_rows).items())
            metrics[name]["streamed"] = streamed
    teacher_metrics = evaluate(args.teacher / "model.ckpt", test, method="ctc_greedy",
                               threads=args.threads)
    stream = metrics["streaming"]["streamed"]
    summary = {
        "full_context_wer": metrics["full_context"]["wer"],
        "streaming_wer": stream["wer"],
        "streaming_one_pass_wer": metrics["streaming"]["wer"],
        "streaming_no_kd_wer": metrics["streaming_no_kd"]["streamed"]["wer"],
        "streaming_kd_no_delay_wer": metrics["streaming_kd_no_delay"]["streamed"]["wer"],
        "ctc_delay": CTC_DELAY,
        "chunk_ms": stream["encoder_chunk_ms"],
        "chunk_compute_ms": stream["chunk_compute_ms"],
        "chunk_compute_ms_p95": stream["chunk_compute_ms_p95"],
        "finalisation_ms": stream["finalisation_ms"],
        "threads": args.threads,
        "checkpoint": metrics["streaming"]["checkpoint"],
        "teacher": {"checkpoint": str(args.teacher / "model.ckpt"),
                    "wer": teacher_metrics["wer"], "cer": teacher_metrics["cer"]},
        **metrics,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "report.md").write_text(_report(summary, args.quick))
    if not args.quick:
        update_section(ROOT / "BENCHMARKS.md", "streaming", _benchmark(summary, args.out))
    print(f"wrote {args.out / 'report.md'}: streaming WER {100 * stream['wer']:.2f} % "
          f"(one pass {100 * metrics['streaming']['wer']:.2f} %), full context "
          f"{100 * metrics['full_context']['wer']:.2f} %")


def _hypotheses(rows: Path) -> dict[str, str]:
    """Hypothesis by audio file of an ``evaluate`` or ``evaluate_streaming`` JSONL."""
    return {row["audio_filepath"]: row["hypothesis"]
            for row in map(json.loads, rows.read_text().splitlines())}


def _report(m: dict, quick: bool) -> str:
    pct = lambda x: f"{100 * x:.2f} %"  # noqa: E731
    labels = {
        "full_context": "full context (`student_cpu`), KD (`ctc_kl`)",
        "streaming": f"streaming, KD (`ctc_kl`, teacher delayed {CTC_DELAY} frames)",
        "streaming_kd_no_delay": "streaming, KD (`ctc_kl`, no delay)",
        "streaming_no_kd": "streaming, no KD",
    }
    rows = [["teacher (`teacher_cpu`, full context)", "-", "-", pct(m["teacher"]["wer"]),
             pct(m["teacher"]["cer"]), "-"]]
    for name, label in labels.items():
        model = m[name]
        stream = model.get("streamed")
        rows.append([label, f"{model['params']:,}", pct(stream["wer"]) if stream else "-",
                     pct(model["wer"]), pct(stream["cer"] if stream else model["cer"]),
                     f"{model['train_seconds']:.0f}"])
    s, stream = m["streaming"], m["streaming"]["streamed"]
    lines = [
        "# Streaming student on AN4" + (" (quick run: not a result)" if quick else ""),
        "",
        "Official AN4 test set (130 utterances, 10 speakers not in training), CTC greedy "
        "search, text as in reports/an4. All students: same size, same recipe "
        f"({s['train_steps']} steps, equal steps and, at the same cost per step, equal "
        "wall-clock); the KD ones distilled from the same teacher's stored CTC posteriors. "
        "Written by `python recipes/an4/streaming.py`.",
        "",
        "| student | params | test WER, streamed | test WER, one pass | test CER | train s |",
        "|---|---:|---:|---:|---:|---:|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "Streamed: audio fed in 320 ms pieces as a live source would, decoded chunk by chunk "
        "with caches. One pass: the whole utterance at once with the same attention mask "
        "(the computation chunk by chunk equals it up to float round-off, "
        f"tests/test_streaming.py): {stream['same_transcript_as_one_pass']} of "
        f"{stream['utterances']} test transcripts of the streaming student are the same both "
        "ways. CER: streamed for streaming students.",
        "",
        f"Latency: encoder chunks of {m['chunk_ms']:g} ms (8 frames of 40 ms), each attending "
        "to itself and the 2.56 s before it; caches of fixed size, so every chunk costs the "
        f"same. On {m['threads']} thread{'s' if m['threads'] > 1 else ''} a chunk took "
        f"{m['chunk_compute_ms']:.1f} ms (median "
        f"of {stream['chunks']}; 95th percentile {m['chunk_compute_ms_p95']:.1f} ms) for "
        f"{m['chunk_ms']:g} ms of audio, and finishing an utterance (its last, partial chunk) "
        f"{m['finalisation_ms']:.1f} ms. Algorithmic latency: up to {m['chunk_ms']:g} ms (the "
        "first frame of a chunk waits for its last) plus 16 ms of window look-ahead.",
        "",
        f"Why the delay: the streaming student emits its tokens a median {CTC_DELAY} frames "
        "(200 ms) after the full-context teacher (it cannot see as far ahead); plain `ctc_kl` "
        "asks it to match the teacher frame by frame, against its own CTC loss.",
        "",
    ]
    return "\n".join(lines)


def _benchmark(m: dict, out: Path) -> str:
    """The streaming rows of BENCHMARKS.md (a section that ``asrkd bench`` keeps)."""
    shown = out.relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    rows = []
    for name in ("streaming", "streaming_kd_no_delay", "streaming_no_kd"):
        stream = m[name]["streamed"]
        rows.append(
            f"| {name} | {m[name]['params'] / 1e6:.2f} M | {stream['encoder_chunk_ms']:g} | "
            f"{stream['chunk_compute_ms']:.1f} | {stream['chunk_compute_ms_p95']:.1f} | "
            f"{stream['finalisation_ms']:.1f} | "
            f"{stream['encoder_chunk_ms'] / stream['chunk_compute_ms']:.0f}x | "
            f"{100 * stream['wer']:.1f} |")
    return "\n".join([
        "## Streaming (chunk by chunk, with caches)",
        "",
        f"`python recipes/an4/streaming.py` ({date.today().isoformat()}, {cpu_model()}, "
        f"{m['threads']} threads, torch {torch.__version__}): the AN4 test set (130 "
        "utterances) fed to `asrkd.streaming.StreamingRecognizer` in 320 ms pieces as a live "
        "source would. Compute per encoder chunk: the chunk step (frontend, conformer blocks "
        "with their caches, CTC head), median and 95th percentile over all chunks; "
        "finalisation: `finish()` (framing the end and the last, partial chunk), median. "
        f"Report: [`{shown}/report.md`]({shown}/report.md).",
        "",
        "| model | params | chunk ms | compute ms / chunk | p95 ms | finalisation ms | "
        "faster than real time | test WER % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])


if __name__ == "__main__":
    main()
