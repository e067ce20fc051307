"""Long-form transcription on real speech: memory, accuracy against the pieces, timestamps.

Builds a recording by concatenating the utterances of a manifest (``--repeats`` passes, each
in a different shuffled order, so that a 6-minute test set makes a 24-minute recording), and
for each checkpoint measures, with ``asrkd.longform.LongFormTranscriber``:

* peak RSS (VmHWM) of a fresh process transcribing the first ``--short-seconds`` of the
  recording and of one transcribing all of it (the long/short ratio is the memory claim);
* WER of the long-form transcript and of the pieces transcribed one by one (``E2EASR.infer``)
  against the references, and of the long-form transcript against the pieces' transcripts;
* word timestamps: the share of words that lie within ``--tolerance`` seconds of the piece
  they fall in (start and end inside ``[piece start - tol, piece end + tol]``);
* RTFx of the long-form run.

Usage: python benchmarks/longform.py --manifest exp/an4/manifests/test.jsonl
       --ckpt exp/an4/teacher/model.ckpt [--ckpt ...] [--repeats 4] [--json out.json]
       [--min-pause-seconds S] [--merge-seconds S]  (LongFormConfig; default: its defaults)
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from asrkd.bench import run_longform
from asrkd.data.audio_processing import SAMPLE_RATE, load_audio
from asrkd.models.e2e_asr import load_checkpoint
from asrkd.utils.metrics import corpus_error_rates


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--ckpt", required=True, action="append")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--short-seconds", type=float, default=60.0)
    parser.add_argument("--tolerance", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-pause-seconds", type=float)
    parser.add_argument("--merge-seconds", type=float)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = {name: value for name in ("min_pause_seconds", "merge_seconds")
              if (value := getattr(args, name)) is not None}
    torch.set_num_threads(args.threads)

    rows = [json.loads(line) for line in args.manifest.read_text().splitlines() if line.strip()]
    audio = [load_audio(row["audio_filepath"]) for row in rows]
    order: list[int] = []
    for repeat in range(args.repeats):
        shuffled = list(range(len(rows)))
        random.Random(repeat).shuffle(shuffled)
        order += shuffled
    recording = np.concatenate([audio[i] for i in order])
    bounds = np.cumsum([0] + [len(audio[i]) for i in order]) / SAMPLE_RATE
    references = [rows[i]["text"] for i in order]
    results: dict = {"manifest": str(args.manifest), "utterances": len(order),
                     "recording_seconds": round(len(recording) / SAMPLE_RATE, 1),
                     "threads": args.threads, "longform_config": config, "models": {}}
    with tempfile.TemporaryDirectory() as folder:
        long_wav, short_wav = Path(folder) / "long.wav", Path(folder) / "short.wav"
        sf.write(long_wav, recording, SAMPLE_RATE)
        sf.write(short_wav, recording[: int(args.short_seconds * SAMPLE_RATE)], SAMPLE_RATE)
        for ckpt in args.ckpt:
            model = load_checkpoint(ckpt)
            pieces = {}
            for i in sorted(set(order)):
                wave = torch.from_numpy(audio[i])[None]
                pieces[i] = model.infer(wave, torch.tensor([wave.size(1)]))[0].text
            piece_texts = [pieces[i] for i in order]
            short = run_longform(ckpt, short_wav, args.threads, config)
            long = run_longform(ckpt, long_wav, args.threads, config)
            text = long["result"]["text"]
            words = long["result"]["words"]
            inside = 0
            for word in words:
                middle = (word["start"] + word["end"]) / 2
                k = min(int(np.searchsorted(bounds, middle, side="right")) - 1, len(order) - 1)
                inside += (word["start"] >= bounds[k] - args.tolerance
                           and word["end"] <= bounds[k + 1] + args.tolerance)
            wer_long = corpus_error_rates([" ".join(references)], [text])["wer"]
            wer_pieces = corpus_error_rates(references, piece_texts)["wer"]
            row = {
                "method": long["result"]["method"],
                "segments": len(long["result"]["segments"]),
                "wer_long_form": round(wer_long, 4),
                "wer_pieces": round(wer_pieces, 4),
                "wer_difference": round(wer_long - wer_pieces, 4),
                "wer_long_form_vs_pieces_text": round(corpus_error_rates(
                    [" ".join(piece_texts)], [text])["wer"], 4),
                "words": len(words),
                "words_within_tolerance": round(inside / max(1, len(words)), 4),
                "peak_rss_mb_short": short["peak_rss_mb"],
                "peak_rss_mb_long": long["peak_rss_mb"],
                "peak_rss_ratio": round(long["peak_rss_mb"] / short["peak_rss_mb"], 3),
                "rtfx_long_form": round(len(recording) / SAMPLE_RATE / long["seconds"], 1),
            }
            results["models"][ckpt] = row
            print(ckpt, json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
