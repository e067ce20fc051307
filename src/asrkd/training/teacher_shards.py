"""A teacher cache for sharded data: compressed top-k posteriors, one file per audio shard.

:func:`~asrkd.training.teacher_cache.cache_teacher` keeps a whole corpus's top-k log-probs in
one file that every rank loads into memory: 6 k bytes per encoder frame (float32 values, int16
ids), fine for hours of audio, not for thousands. :func:`cache_teacher_shards` runs the
teacher over a shard set (:mod:`asrkd.data.shards`) and writes, for each audio shard
``shard-000123.tar``, a ``shard-000123.npz`` that the shard loader reads alongside it, so no
process ever holds more than the shards it is streaming. Per frame it stores only the kept
log-probs, quantised:

- tokens of the top k whose log-prob is at least :data:`MIN_LOG_PROB` (-15.9 nats: a confident
  teacher's blank frames keep a handful, not k), at least one per frame;
- each log-prob as ``round(-log p / STEP)`` in one byte (STEP = 1/16 nat: a relative error of
  at most 3 % in a kept probability, below the softening of any KD temperature > 1);
- token ids as uint16 (int32 beyond 65535 tokens), and a count per frame in one byte;

all deflated (``numpy.savez_compressed``). The loss renormalises the teacher over the kept
tokens (:class:`~asrkd.training.teacher_cache.CachedCTCFrameKD`), so what is dropped is mass
the teacher gave ~0 anyway. ``teacher.json`` in the same folder holds the metadata, bytes per
audio hour among them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from asrkd.data.audio_processing import SAMPLE_RATE, decode_audio
from asrkd.data.dataset import duration_batches, speed_key
from asrkd.data.shards import iter_shard, read_index
from asrkd.errors import UserError
from asrkd.models.e2e_asr import E2EASR
from asrkd.training.teacher_cache import (
    CacheChecks,
    TeacherCacheKeyError,
    _prepare_teacher,
    _teacher_topk,
    check_speed_factors,
    frame_timing,
)
from asrkd.utils.io import atomic_write_text

SHARDED_FORMAT = "asrkd-teacher-shards-1"
META_NAME = "teacher.json"
STEP = 1.0 / 16.0  # nats per quantisation level of a stored log-prob
MIN_LOG_PROB = -255 * STEP  # tokens below it are not stored (p < 1.2e-7)


def compress_topk(values: torch.Tensor, indices: torch.Tensor, vocab_size: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One utterance's top-k ``(values (T, k), indices (T, k))``, largest first, as
    ``(counts (T,) uint8, ids (n,) uint16 (int32 for a vocabulary over 65536), levels (n,)
    uint8)``: per frame, the tokens
    whose log-prob is at least :data:`MIN_LOG_PROB` (the first always), their log-probs
    relative to the frame's best in levels of :data:`STEP` nats."""
    values = values.double().numpy()
    relative = values - values[:, :1]  # the loss renormalises: only differences matter
    keep = relative >= MIN_LOG_PROB
    keep[:, 0] = True
    counts = keep.sum(1).astype(np.uint8)
    levels = np.rint(-relative[keep] / STEP).clip(0, 255).astype(np.uint8)
    id_dtype = np.uint16 if vocab_size <= 2**16 else np.int32
    return counts, indices.numpy()[keep].astype(id_dtype), levels


def expand_topk(counts: np.ndarray, ids: np.ndarray, levels: np.ndarray
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compress_topk`'s inverse: ``values (T, k)`` (log-probs up to a per-frame
    constant; -inf where a frame kept fewer than k = max(counts) tokens) and ``indices (T, k)``
    int64 (0 there)."""
    frames = len(counts)
    k = int(counts.max()) if frames else 1
    slot = np.arange(k)[None, :] < counts[:, None]  # (T, k): which cells hold a stored token
    values = np.full((frames, k), -np.inf, dtype=np.float32)
    indices = np.zeros((frames, k), dtype=np.int64)
    values[slot] = -levels.astype(np.float32) * STEP
    indices[slot] = ids
    return torch.from_numpy(values), torch.from_numpy(indices)


class TeacherShard:
    """The stored teacher posteriors of one audio shard, by key (see :func:`speed_key`)."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise UserError(f"teacher shard {path} not found: rebuild the sharded cache with "
                            "`asrkd cache-teacher --shards` on the shards you train from")
        with np.load(path, allow_pickle=False) as data:
            self.keys = [str(k) for k in data["keys"]]
            frames, counts = data["frames"].astype(np.int64), data["counts"]
            self._counts, self._ids, self._levels = counts, data["ids"], data["levels"]
        self.path = path
        self._frame_start = np.concatenate([[0], np.cumsum(frames)])
        self._token_start = np.concatenate([[0], np.cumsum(counts.astype(np.int64))])
        self._row = {key: row for row, key in enumerate(self.keys)}

    def utterance(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values (T, k), indices (T, k))`` of one utterance (see :func:`expand_topk`)."""
        row = self._row.get(key)
        if row is None:
            raise TeacherCacheKeyError(
                f"utterance {key} is not in the teacher shard {self.path}: rebuild the cache "
                "with `asrkd cache-teacher --shards` (with the training set's --speed-factors)")
        a, b = self._frame_start[row], self._frame_start[row + 1]
        ta, tb = self._token_start[a], self._token_start[b]
        return expand_topk(self._counts[a:b], self._ids[ta:tb], self._levels[ta:tb])


class ShardedTeacherCache(CacheChecks):
    """A folder written by :func:`cache_teacher_shards`: its metadata, and each audio shard's
    posteriors (:meth:`shard`, read by the shard loader's workers)."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory)
        meta_path = self.path / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"sharded teacher cache {self.path} has no {META_NAME}: "
                                    "build it with `asrkd cache-teacher --shards`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != SHARDED_FORMAT:
            raise UserError(f"{meta_path}: not an asrkd sharded teacher cache ({SHARDED_FORMAT})")
        self.meta = meta
        self.teacher_checkpoint: str | None = meta["teacher_checkpoint"]
        self.vocab_size = int(meta["vocab_size"])
        self.subsampling_factor = int(meta["subsampling_factor"])
        self.frame_timing = dict(meta["frame_timing"])
        self.top_k = int(meta["top_k"])
        self.speed_factors = tuple(float(f) for f in meta["speed_factors"])

    def shard(self, audio_shard: str | Path) -> TeacherShard:
        """The posteriors of the audio shard ``audio_shard`` (same stem, ``.npz``)."""
        return TeacherShard(self.path / (Path(audio_shard).stem + ".npz"))


def is_sharded_cache(path: str | Path) -> bool:
    """Whether ``path`` is a sharded teacher cache folder (else a one-file cache)."""
    return (Path(path) / META_NAME).is_file()


def cache_teacher_shards(checkpoint: str | Path | E2EASR, shards: str | Path,
                         out_dir: str | Path, top_k: int = 8, batch_seconds: float = 120.0,
                         speed_factors: Sequence[float] = (),
                         device: str | torch.device = "cpu") -> dict:
    """Run the teacher over every utterance of the shard set ``shards`` (once per speed
    factor) and write one compressed ``.npz`` per audio shard into ``out_dir``, then
    ``teacher.json``. Returns the metadata, with ``bytes`` and ``bytes_per_audio_hour`` (per
    hour of audio the teacher ran on, speed copies counted) and ``bytes_per_frame``."""
    start = time.perf_counter()
    if top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    model, checkpoint_name = _prepare_teacher(checkpoint)
    k = min(int(top_k), model.vocab_size)
    factors = check_speed_factors(speed_factors)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total_bytes = frames_total = 0
    seconds_total = 0.0
    was_training = model.training
    model.eval().to(device)
    try:
        with torch.no_grad():
            for shard in read_index(shards):
                utterances = [(meta["key"], decode_audio(data, name, SAMPLE_RATE))
                              for _, meta, data, name in iter_shard(shard.path)]
                stored: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
                seconds = [len(wave) / SAMPLE_RATE for _, wave in utterances]
                for batch in duration_batches(seconds, batch_seconds):
                    waves = [utterances[i][1] for i in batch]
                    for factor in factors:
                        outputs = _teacher_topk(model, waves, factor, k, 1.0, device,
                                                SAMPLE_RATE)
                        for i, (values, indices) in zip(batch, outputs, strict=True):
                            stored[speed_key(utterances[i][0], factor)] = compress_topk(
                                values, indices, model.vocab_size)
                seconds_total += sum(len(w) for _, w in utterances) / SAMPLE_RATE * len(factors)
                keys = list(stored)
                parts = [stored[key] for key in keys]
                target = out_dir / (shard.path.stem + ".npz")
                with open(target.with_suffix(".tmp"), "wb") as handle:
                    np.savez_compressed(
                        handle, keys=np.array(keys), frames=np.array(
                            [len(c) for c, _, _ in parts], dtype=np.int32),
                        counts=np.concatenate([c for c, _, _ in parts]),
                        ids=np.concatenate([i for _, i, _ in parts]),
                        levels=np.concatenate([q for _, _, q in parts]))
                target.with_suffix(".tmp").replace(target)
                total_bytes += target.stat().st_size
                frames_total += sum(len(c) for c, _, _ in parts)
    finally:
        model.train(was_training)
    meta = {
        "format": SHARDED_FORMAT,
        "teacher_checkpoint": checkpoint_name,
        "shards": str(Path(shards).resolve()),
        "vocab_size": model.vocab_size,
        "subsampling_factor": model.subsampling_factor,
        "frame_timing": frame_timing(model),
        "top_k": k,
        "log_prob_step": STEP,
        "min_log_prob": MIN_LOG_PROB,
        "speed_factors": list(factors),
        "frames": frames_total,
        "audio_hours": round(seconds_total / 3600, 4),
        "bytes": total_bytes,
        "bytes_per_frame": round(total_bytes / max(1, frames_total), 3),
        "bytes_per_audio_hour": round(total_bytes / max(1e-9, seconds_total / 3600)),
        "seconds": round(time.perf_counter() - start, 2),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(out_dir / META_NAME, json.dumps(meta, indent=2))
    return {"out_dir": str(out_dir), **meta}


__all__ = [
    "META_NAME",
    "MIN_LOG_PROB",
    "SHARDED_FORMAT",
    "STEP",
    "ShardedTeacherCache",
    "TeacherShard",
    "cache_teacher_shards",
    "compress_topk",
    "expand_topk",
    "is_sharded_cache",
]
