"""Feature-extraction speed (times real time, one thread) and data-loader throughput.

Usage: python benchmarks/features.py [--manifest M.jsonl] [--json out.json]
Without --manifest it uses data/default/train.jsonl when the default corpus exists, else
../shared/data/ljspeech/manifest.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from asrkd.data.audio_processing import LogMelFeatures
from asrkd.data.datamodule import DurationBatchSampler
from asrkd.data.dataset import ManifestDataset, collate_batch

ROOT = Path(__file__).resolve().parents[1]


def log_mel_speed(batch: int = 16, seconds: float = 10.0, repeats: int = 5) -> float:
    """Seconds of audio featurised per second of compute, one thread, batched."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extractor = LogMelFeatures()
        audio = torch.randn(batch, int(16000 * seconds))
        lengths = torch.full((batch,), audio.shape[1])
        extractor(audio, lengths)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            extractor(audio, lengths)
        elapsed = (time.perf_counter() - start) / repeats
    finally:
        torch.set_num_threads(threads)
    return batch * seconds / elapsed


def loader_throughput(manifest: Path, workers: int, limit: int = 400) -> float:
    """Utterances per second through dataset + collate, batches of ~60 s."""
    dataset = ManifestDataset(manifest)
    sampler = DurationBatchSampler(dataset.durations[:limit], max_batch_seconds=60, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_batch, num_workers=workers
    )
    start = time.perf_counter()
    count = sum(len(batch["texts"]) for batch in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    manifest = args.manifest
    if manifest is None:
        default = ROOT / "data" / "default" / "train.jsonl"
        shared = ROOT.parent / "shared" / "data" / "ljspeech" / "manifest.jsonl"
        manifest = default if default.exists() else shared
    results = {"log_mel_x_realtime_1thread": round(log_mel_speed(), 1), "manifest": str(manifest)}
    for workers in (0, 2):
        results[f"loader_utts_per_s_{workers}_workers"] = round(
            loader_throughput(manifest, workers), 1
        )
    for key, value in results.items():
        print(f"{key:32s} {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
