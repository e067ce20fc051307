"""How much a model depends on where its utterances start and end.

Scores the utterances of a manifest one by one (``E2EASR.infer``, the model's default search)
as they are, and with audio added around each of them: ``--pad`` seconds of digital silence,
of noise at the utterance's own noise floor (what ``data.edge_noise_seconds`` trains with),
and of the neighbouring utterances' audio (the manifest's order, as if cut from one recording
a little too generously). A model that only works on tightly end-pointed clips cannot
transcribe pieces cut from a longer recording (``asrkd.longform``).

Usage: python benchmarks/edges.py --manifest exp/an4/manifests/test.jsonl
       --ckpt exp/an4/teacher/model.ckpt [--ckpt ...] [--pad 0.1 --pad 0.25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from asrkd.data.audio_processing import SAMPLE_RATE, load_audio
from asrkd.data.dataset import noise_floor
from asrkd.models.e2e_asr import load_checkpoint
from asrkd.utils.metrics import corpus_error_rates


def _floor_noise(audio: np.ndarray, seconds: float, seed: int) -> np.ndarray:
    """``seconds`` of noise at the utterance's noise floor on each side (the training
    augmentation's noise, at a fixed length)."""
    level = noise_floor(audio, SAMPLE_RATE)
    rng = np.random.default_rng(seed)
    pad = int(seconds * SAMPLE_RATE)
    return np.concatenate([(rng.standard_normal(pad) * level).astype(np.float32), audio,
                           (rng.standard_normal(pad) * level).astype(np.float32)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--ckpt", required=True, action="append")
    parser.add_argument("--pad", type=float, action="append", help="seconds (default 0.1, 0.25)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pads = args.pad or [0.1, 0.25]

    rows = [json.loads(line) for line in args.manifest.read_text().splitlines() if line.strip()]
    audio = [load_audio(row["audio_filepath"]) for row in rows]
    references = [row["text"] for row in rows]
    joined = np.concatenate(audio)
    bounds = np.cumsum([0] + [len(a) for a in audio])
    variants: dict[str, list[np.ndarray]] = {"as is": audio}
    for pad in pads:
        n = int(pad * SAMPLE_RATE)
        zeros = np.zeros(n, np.float32)
        variants[f"{pad:g} s silence"] = [np.concatenate([zeros, a, zeros]) for a in audio]
        variants[f"{pad:g} s noise floor"] = [_floor_noise(a, pad, k) for k, a in enumerate(audio)]
        variants[f"{pad:g} s neighbours"] = [joined[max(0, bounds[k] - n) : bounds[k + 1] + n]
                                            for k in range(len(audio))]
    results: dict = {"manifest": str(args.manifest), "utterances": len(rows), "models": {}}
    for ckpt in args.ckpt:
        model = load_checkpoint(ckpt)
        row = {}
        for name, waves in variants.items():
            texts = [model.infer(torch.from_numpy(w)[None], torch.tensor([len(w)]))[0].text
                     for w in waves]
            row[name] = round(corpus_error_rates(references, texts)["wer"], 4)
        results["models"][ckpt] = row
        print(ckpt, json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
