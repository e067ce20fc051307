"""RNN-T greedy decoding speed: today's search against the frame-by-frame ones it replaced.

Decodes the test utterances of a corpus with a trained transducer (an ``asrkd`` checkpoint),
encoder outputs computed once, and times the search alone at batch 1 and batch 16:

* ``issue_time``: the greedy search as it was when issue 17 was filed (2026-12-01): frame by
  frame, one ``nn.LSTM`` call per emitted label;
* ``frame_looping``: the same frame-by-frame loop with today's prediction-network step (the
  reference of ``tests/test_rnnt.py``);
* ``label_looping``: :func:`asrkd.decoding.rnnt.rnnt_greedy`.

Every search must give the same tokens and frames for every utterance (checked; the script
fails otherwise). RTFx = audio seconds / search seconds, best of ``--repeats`` passes over the
whole test set, the three searches alternating so that drift on a shared VM hits them alike.

Usage: python benchmarks/rnnt_greedy.py --ckpt exp/an4_rnnt/student/model.ckpt
       --manifest exp/an4_rnnt/manifests/test.jsonl [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from asrkd.data.dataset import ManifestDataset
from asrkd.decoding.rnnt import rnnt_greedy
from asrkd.models.common import Hypothesis, pad_sequences
from asrkd.models.e2e_asr import load_checkpoint
from asrkd.models.rnnt import RNNTransducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_rnnt import frame_looping_greedy  # noqa: E402

Search = Callable[[RNNTransducer, torch.Tensor, torch.Tensor, int], list[Hypothesis]]


def issue_time_greedy(transducer: RNNTransducer, encoder_out: torch.Tensor,
                      lengths: torch.Tensor, limit: int) -> list[Hypothesis]:
    """The greedy search of 2026-12-01: frame by frame, the prediction network stepped with
    ``nn.LSTM`` (its step then was ``lstm(embed(tokens))``)."""
    prediction = transducer.prediction

    def lstm_step(tokens: torch.Tensor, state=None):  # noqa: ANN001, ANN202
        out, new_state = prediction.lstm(prediction.embed(tokens.unsqueeze(1)), state)
        return out.squeeze(1), new_state

    prediction.step = lstm_step  # an instance attribute shadows the method
    try:
        return frame_looping_greedy(transducer, encoder_out, lengths, limit)
    finally:
        del prediction.step


SEARCHES: dict[str, Search] = {
    "issue_time": issue_time_greedy,
    "frame_looping": frame_looping_greedy,
    "label_looping": lambda t, e, n, limit: rnnt_greedy(t, e, n, max_symbols_per_frame=limit),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, type=Path)
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, help="utterances (default: all)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_checkpoint(args.ckpt).eval()
    if model.decoder_type != "rnnt":
        raise SystemExit(f"{args.ckpt} has no RNN-T decoder")
    transducer = model.decoder
    cap = transducer.config.max_symbols_per_frame
    dataset = ManifestDataset(args.manifest)
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    audio = [dataset[i]["audio"] for i in range(count)]
    order = sorted(range(count), key=lambda i: len(audio[i]))  # batches of similar lengths
    audio_seconds = sum(len(a) for a in audio) / 16000

    results: dict = {"checkpoint": str(args.ckpt), "manifest": str(args.manifest),
                     "utterances": count, "audio_seconds": round(audio_seconds, 1),
                     "threads": args.threads, "max_symbols_per_frame": cap}
    for batch_size in (1, 16):
        batches = []
        with torch.no_grad():
            for start in range(0, count, batch_size):
                wave, lengths = pad_sequences([audio[i] for i in order[start:start + batch_size]])
                encoded = model.encode(wave, lengths)
                batches.append((encoded.output, encoded.lengths))
        outputs: dict[str, list[Hypothesis]] = {}
        best = dict.fromkeys(SEARCHES, float("inf"))
        for _ in range(args.repeats):
            for name, search in SEARCHES.items():
                start = time.perf_counter()
                hyps = [h for enc, n in batches for h in search(transducer, enc, n, cap)]
                best[name] = min(best[name], time.perf_counter() - start)
                outputs[name] = hyps
        reference = outputs["issue_time"]
        for name, hyps in outputs.items():
            same = sum(h.tokens == r.tokens and h.timestamps == r.timestamps
                       for h, r in zip(hyps, reference, strict=True))
            if same != count:
                raise SystemExit(f"{name}: {count - same} of {count} hypotheses differ "
                                 f"from the issue-time search at batch {batch_size}")
        row = {name: round(audio_seconds / seconds, 1) for name, seconds in best.items()}
        row["speedup_vs_issue_time"] = round(best["issue_time"] / best["label_looping"], 2)
        row["speedup_vs_frame_looping"] = round(best["frame_looping"] / best["label_looping"], 2)
        results[f"batch_{batch_size}"] = row
        print(f"batch {batch_size}: search RTFx {row} (identical hypotheses: {count}/{count})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
