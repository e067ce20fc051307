"""Training-loader throughput: tar shards vs one file per utterance, warm and cold page cache.

One epoch of training batches (decode, resample to 16 kHz, collate; no augmentation, which
costs the same either way) through the manifest loader (``ManifestDataset`` +
``DurationBatchSampler``) and through the shard loader (``ShardDataset``), with 0 and 2 loader
workers, the configurations interleaved and repeated; the median counts. "cold" drops the page
cache before each epoch (``/proc/sys/vm/drop_caches``, needs root; skipped otherwise), which is
what a first epoch on a corpus larger than memory looks like; "warm" reads from memory.

With ``--teacher CKPT`` it also writes the teacher's CTC posteriors over the manifest (each
speed copy) as a one-file cache and as a sharded cache and reports bytes per frame and per
audio hour of each.

Usage: python benchmarks/shards.py [--manifest M] [--json benchmarks/results/shards.json]
       [--teacher exp/an4/teacher/model.ckpt] [--no-throughput]
       [--markdown BENCHMARKS.md]  (updates its "Data at scale" section)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from asrkd.data.datamodule import DurationBatchSampler
from asrkd.data.dataset import ManifestDataset, collate_batch
from asrkd.data.shards import BatchingConfig, ShardDataset, ShardLoader, write_shards
from asrkd.utils.markdown import update_section

ROOT = Path(__file__).resolve().parents[1]
DROP = Path("/proc/sys/vm/drop_caches")


def drop_page_cache() -> bool:
    """Drop the page cache (root only); False where that is not allowed."""
    try:
        subprocess.run(["sync"], check=True)
        DROP.write_text("3\n")
        return True
    except OSError:
        return False


def epoch_files(manifest: Path, workers: int, batch_seconds: float) -> tuple[int, float]:
    dataset = ManifestDataset(manifest)
    sampler = DurationBatchSampler(dataset.durations, batch_seconds, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch,
                        num_workers=workers)
    return _drain(loader)


def epoch_shards(shards: Path, workers: int, batch_seconds: float) -> tuple[int, float]:
    dataset = ShardDataset(shards, None, BatchingConfig(max_batch_seconds=batch_seconds),
                           num_workers=workers, rank=0, world_size=1)
    return _drain(ShardLoader(dataset, progress=None))


def _drain(loader: DataLoader) -> tuple[int, float]:
    utterances, samples = 0, 0
    for batch in loader:
        utterances += len(batch["keys"])
        samples += int(batch["audio_lengths"].sum())
    return utterances, samples / 16000


def measure_loaders(manifest: Path, shards: Path, repeats: int, batch_seconds: float,
                    cold: bool) -> tuple[dict, bool]:
    """Median utterances/s per (loader, page cache, workers), the configurations interleaved."""
    cold_ok = cold and drop_page_cache()
    runs: dict[str, list[float]] = {}
    for _ in range(repeats):
        # Cold first: by the warm runs each kind's bytes have been read in this repeat.
        for cache in ("cold", "warm") if cold_ok else ("warm",):
            for workers in (0, 2):
                for kind in ("files", "shards"):
                    if cache == "cold":
                        drop_page_cache()
                    begin = time.perf_counter()
                    utterances, _ = (epoch_files(manifest, workers, batch_seconds)
                                     if kind == "files" else
                                     epoch_shards(shards, workers, batch_seconds))
                    elapsed = time.perf_counter() - begin
                    runs.setdefault(f"{kind}/{cache}/{workers}", []).append(utterances / elapsed)
    return {key: {"utterances_per_s": round(statistics.median(v), 1),
                  "runs": [round(x, 1) for x in v]} for key, v in runs.items()}, cold_ok


def measure_teacher_cache(teacher: Path, manifest: Path, shards: Path,
                          speed_factors: list[float]) -> dict:
    """Bytes of the one-file teacher cache (float32 top-8) and of the sharded one (pruned,
    quantised, deflated) for the same teacher, audio and speed copies."""
    from asrkd.training.teacher_cache import cache_teacher
    from asrkd.training.teacher_shards import cache_teacher_shards

    torch.set_num_threads(2)
    one = cache_teacher(teacher, manifest, shards.parent / "one_file_cache.pt",
                        speed_factors=speed_factors)
    sharded = cache_teacher_shards(teacher, shards, shards.parent / "teacher_cache",
                                   speed_factors=speed_factors)
    hours = sharded["audio_hours"]
    one_bytes = (shards.parent / "one_file_cache.pt").stat().st_size
    return {
        "teacher": str(teacher), "top_k": sharded["top_k"], "speed_factors": speed_factors,
        "audio_hours": hours, "frames": sharded["frames"],
        "one_file_bytes": one_bytes,
        "one_file_bytes_per_audio_hour": round(one_bytes / hours),
        "one_file_bytes_per_frame": round(one_bytes / one["frames"], 2),
        "sharded_bytes": sharded["bytes"],
        "sharded_bytes_per_audio_hour": sharded["bytes_per_audio_hour"],
        "sharded_bytes_per_frame": sharded["bytes_per_frame"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path,
                        default=ROOT.parent / "shared" / "data" / "an4" / "manifest_train.jsonl")
    parser.add_argument("--shard-seconds", type=float, default=300.0)
    parser.add_argument("--batch-seconds", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" /
                        "shards.json")
    parser.add_argument("--markdown", type=Path, help="update this file's section")
    parser.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure with the page cache dropped (root only)")
    parser.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the loaders (--no-throughput: keep --json's rows)")
    parser.add_argument("--teacher", type=Path,
                        help="also measure the teacher-cache size of this trained teacher")
    parser.add_argument("--speed-factors", type=float, nargs="+", default=[0.9, 1.0, 1.1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        start = time.perf_counter()
        summary = write_shards(args.manifest, shards, shard_seconds=args.shard_seconds)
        write_seconds = time.perf_counter() - start
        source_bytes = sum(Path(e["audio_filepath"]).stat().st_size if Path(
            e["audio_filepath"]).is_absolute() else (args.manifest.parent / e["audio_filepath"])
            .stat().st_size for e in map(json.loads, args.manifest.read_text().splitlines()))
        result = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "manifest": str(args.manifest), "utterances": summary["utterances"],
            "hours": summary["hours"], "shards": summary["shards"],
            "shard_seconds": args.shard_seconds, "shard_bytes": summary["bytes"],
            "source_bytes": source_bytes, "write_seconds": round(write_seconds, 2),
            "cpu_count": os.cpu_count(),
        }
        if args.throughput:
            result["rows"], result["cold_cache_measured"] = measure_loaders(
                args.manifest, shards, args.repeats, args.batch_seconds, args.cold)
        else:
            for key in ("date", "write_seconds", "rows", "cold_cache_measured"):
                result[key] = previous[key]
        if args.teacher:
            result["teacher_cache"] = measure_teacher_cache(args.teacher, args.manifest, shards,
                                                            args.speed_factors)
        elif "teacher_cache" in previous:
            result["teacher_cache"] = previous["teacher_cache"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if args.markdown:
        update_section(args.markdown, "data-loading", markdown(result, args.json))


def markdown(result: dict, json_path: Path) -> str:
    rows = result["rows"]
    shown = json_path.relative_to(ROOT) if json_path.resolve().is_relative_to(ROOT) else json_path
    lines = [
        "## Data at scale: training loader from tar shards vs files",
        "",
        f"`python benchmarks/shards.py` ({result['date']}, {result['cpu_count']} cores): one "
        f"epoch of training batches ({result['utterances']} AN4 utterances, "
        f"{result['hours']:.2f} h, FLAC) decoded, resampled and collated, median of the "
        "interleaved repeats; shards of "
        f"{result['shard_seconds']:.0f} s ({result['shards']} tar files, "
        f"{result['shard_bytes'] / 2**20:.1f} MB vs {result['source_bytes'] / 2**20:.1f} MB of "
        f"source files, written in {result['write_seconds']:.1f} s). Cold: page cache dropped "
        f"before each epoch. Raw figures: [`{shown}`]({shown}).",
        "",
        "| page cache | loader workers | files utt/s | shards utt/s | shards / files |",
        "|---|---:|---:|---:|---:|",
    ]
    for cache in ("warm", "cold"):
        for workers in (0, 2):
            files, shards = rows.get(f"files/{cache}/{workers}"), rows.get(
                f"shards/{cache}/{workers}")
            if files and shards:
                lines.append(f"| {cache} | {workers} | {files['utterances_per_s']:.0f} | "
                             f"{shards['utterances_per_s']:.0f} | "
                             f"{shards['utterances_per_s'] / files['utterances_per_s']:.2f} |")
    cache = result.get("teacher_cache")
    if cache:
        factors = ", ".join(f"{f:g}" for f in cache["speed_factors"])
        lines += [
            "",
            f"Teacher cache size, `--teacher {Path(cache['teacher']).name}` ({cache['teacher']}"
            f"), top-{cache['top_k']} CTC log-probs of every encoder frame of every speed copy "
            f"({factors}: {cache['audio_hours']:.2f} h of audio, {cache['frames']} frames):",
            "",
            "| cache | bytes / frame | MB / audio hour |",
            "|---|---:|---:|",
            f"| one file (`--manifest`: float32 values, int16 ids) | "
            f"{cache['one_file_bytes_per_frame']:.1f} | "
            f"{cache['one_file_bytes_per_audio_hour'] / 1e6:.2f} |",
            f"| sharded (`--shards`: pruned below -16 nats, 1/16-nat bytes, deflated) | "
            f"{cache['sharded_bytes_per_frame']:.1f} | "
            f"{cache['sharded_bytes_per_audio_hour'] / 1e6:.2f} |",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
