"""Manifests for CMU AN4 from ../shared/data/an4: speaker-disjoint validation, official test.

Validation is every 10th training speaker (sorted by name: 8 of 74 speakers, ~100 utterances),
so model choices never see the official test set, which is scored once at the end. Manifest
rows point at the shared audio with absolute paths (nothing is copied).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

VAL_EVERY = 10


def _rows(shared: Path, name: str) -> list[dict]:
    lines = (shared / name).read_text(encoding="utf-8").splitlines()
    return [
        dict(row, audio_filepath=str((shared / row["audio_filepath"]).resolve()))
        for row in map(json.loads, filter(None, lines))
    ]


def prepare(shared: Path, out: Path, limit: int | None = None) -> dict:
    """Write ``train/val/test.jsonl`` in ``out``; return corpus stats (with a summary line)."""
    train = _rows(shared, "manifest_train.jsonl")
    test = _rows(shared, "manifest_test.jsonl")
    speakers = sorted({row["speaker"] for row in train})
    val_speakers = set(speakers[::VAL_EVERY])
    splits = {
        "train": [row for row in train if row["speaker"] not in val_speakers],
        "val": [row for row in train if row["speaker"] in val_speakers],
        "test": test,
    }
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {"splits": {}}
    for split, rows in splits.items():
        if limit is not None:
            rows = rows[:: max(1, len(rows) // limit)][:limit]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        stats["splits"][split] = {
            "utterances": len(rows),
            "hours": round(sum(r["duration"] for r in rows) / 3600, 4),
            "speakers": sorted(Counter(r["speaker"] for r in rows)),
        }
    s = stats["splits"]
    stats["summary"] = (
        f"CMU AN4 (real speech, 16 kHz): train {s['train']['utterances']} utterances from "
        f"{len(s['train']['speakers'])} speakers ({s['train']['hours'] * 60:.1f} min); validation "
        f"{s['val']['utterances']} utterances from {len(s['val']['speakers'])} held-out training "
        f"speakers; official test set {s['test']['utterances']} utterances from "
        f"{len(s['test']['speakers'])} other speakers"
    )
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    import argparse

    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description="Write AN4 train/val/test manifests.")
    parser.add_argument("--shared", type=Path, default=root.parent / "shared" / "data" / "an4")
    parser.add_argument("--out", type=Path, default=root / "exp" / "an4" / "manifests")
    args = parser.parse_args()
    print(prepare(args.shared, args.out)["summary"])
