"""Speaker-disjoint manifests for speechocean762 (../shared/data/speechocean762).

50 non-native speakers (Mandarin L1; adults and children), 20 read prompts each, every prompt
distinct. Speakers sorted by id: every 10th from the first validates, every 10th from the
sixth tests, the other 40 train (800 / 100 / 100 utterances). Test speakers and sentences are
therefore both unseen. Rows point at the shared audio with absolute paths.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def split_of(index: int) -> str:
    """Split of the speaker at ``index`` in id order."""
    if index % 10 == 0:
        return "val"
    if index % 10 == 5:
        return "test"
    return "train"


def prepare(shared: Path, out: Path, limit: int | None = None,
            extra_train: list[dict] | None = None) -> dict:
    """Write ``train/val/test.jsonl`` in ``out`` and return corpus stats with a summary line.

    ``extra_train`` rows (absolute paths) join the training split only."""
    lines = (shared / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [dict(r, audio_filepath=str((shared / r["audio_filepath"]).resolve()))
            for r in map(json.loads, filter(None, lines))]
    speakers = sorted({r["speaker"] for r in rows})
    split = {s: split_of(i) for i, s in enumerate(speakers)}
    splits = {name: [r for r in rows if split[r["speaker"]] == name]
              for name in ("train", "val", "test")}
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {"splits": {}}
    for name, part in splits.items():
        if limit is not None:
            part = part[:: max(1, len(part) // limit)][:limit]
        if name == "train":
            stats["real_train_utterances"] = len(part)
            part = part + list(extra_train or [])
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        words = Counter(w for r in part for w in r["text"].split())
        stats["splits"][name] = {
            "utterances": len(part),
            "hours": round(sum(r["duration"] for r in part) / 3600, 4),
            "speakers": sorted({r.get("speaker", "?") for r in part}),
            "vocabulary_size": len(words),
        }
    train_words = Counter(w for r in splits["train"] + list(extra_train or [])
                          for w in r["text"].split())
    test_words = [w for r in splits["test"] for w in r["text"].split()]
    oov = sum(train_words[w] == 0 for w in test_words) / max(1, len(test_words))
    s = stats["splits"]
    stats["test_oov_rate"] = round(oov, 4)
    stats["summary"] = (
        f"speechocean762 (real non-native read speech, adults and children): train "
        f"{stats['real_train_utterances']} utterances from 40 speakers"
        + (f" plus {len(extra_train)} other utterances" if extra_train else "")
        + f", validation {s['val']['utterances']} from 5 other speakers, test "
        f"{s['test']['utterances']} from 5 more; test sentences are all unseen, "
        f"{100 * oov:.1f} % of test words never occur in training"
    )
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
