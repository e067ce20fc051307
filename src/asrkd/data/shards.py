"""Tar shards of a manifest's audio and text, streamed by an iterable dataset.

A manifest of one small file per utterance is fine for a few hundred hours on a local disk; for
thousands of hours on network storage, reading a few large sequential files per worker is what
keeps GPUs fed. :func:`write_shards` packs a manifest into tar files of about
``shard_seconds`` of audio each, WebDataset's layout (members that share a base name form one
sample)::

    shards/index.json          format, utterance durations per shard (the epoch plan reads it)
    shards/shard-000000.tar    000000.flac 000000.json 000001.wav 000001.json ...

Each ``.json`` member holds the utterance's ``text``, ``duration``, ``speaker`` and ``key``
(:func:`~asrkd.data.dataset.utterance_key` of the manifest line, so a teacher cache written from
the manifest is found from the shards); the audio member is the original file's bytes
(segments of a longer file, with an ``offset``, are cut and stored as FLAC or float WAV).
Plain ``tarfile``: no dependency, and any WebDataset reader can open the shards.

:class:`ShardDataset` streams them: per epoch, every rank and loader worker (a *slot*) gets
whole shards (shuffled, balanced by audio seconds), reads them sequentially and cuts batches
from windows of ``buffer_size`` utterances sorted by duration (the manifest sampler's sorted
chunks). The epoch's batches are planned from the index's durations alone, identically on every
rank, before any audio is read: that makes every slot yield the same number of batches (DDP
ranks never wait for one another at the end of an epoch; a slot with fewer splits its largest
batches), every utterance appear exactly once per epoch, and a resumed run skip the batches it
already trained on without decoding them.
"""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import asrkd.utils.dist as ddp
from asrkd.data.audio_processing import SAMPLE_RATE, AudioError, decode_audio
from asrkd.data.dataset import (
    ManifestEntry,
    collate_batch,
    duration_batches,
    make_item,
    read_manifest,
    utterance_key,
)
from asrkd.data.tokenizer import Tokenizer
from asrkd.errors import ConfigError, UserError
from asrkd.utils.io import atomic_write_text

log = logging.getLogger(__name__)

SHARD_FORMAT = "asrkd-shards-1"
INDEX_NAME = "index.json"
# Audio formats stored as the original file's bytes (soundfile reads them from memory).
_AS_IS = {".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au"}


class ShardError(UserError):
    """A shard directory, index or member that cannot be used; the message says which."""


@dataclass(frozen=True)
class Shard:
    """One tar shard of an index: its path and the durations of its utterances, in order."""

    path: Path
    durations: tuple[float, ...]

    @property
    def seconds(self) -> float:
        return sum(self.durations)


def _audio_member(entry: ManifestEntry) -> tuple[bytes, str]:
    """(encoded bytes, extension) of an entry's audio: the file as is, or its segment."""
    suffix = entry.audio_filepath.suffix.lower()
    if not entry.is_segment and suffix in _AS_IS:
        return entry.audio_filepath.read_bytes(), suffix
    info = sf.info(str(entry.audio_filepath))
    start = int(round(entry.offset * info.samplerate))
    frames = int(round(entry.duration * info.samplerate))
    pcm16 = info.subtype == "PCM_16"
    samples, rate = sf.read(str(entry.audio_filepath), start=start, frames=frames,
                            dtype="int16" if pcm16 else "float32", always_2d=True)
    buffer = io.BytesIO()
    if pcm16:  # lossless and about half the size
        sf.write(buffer, samples, rate, format="FLAC", subtype="PCM_16")
        return buffer.getvalue(), ".flac"
    sf.write(buffer, samples, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue(), ".wav"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # the same manifest gives byte-identical shards
    tar.addfile(info, io.BytesIO(data))


def write_shards(manifest: str | Path, out_dir: str | Path, shard_seconds: float = 3600.0,
                 shuffle: bool = True, seed: int = 0, require_text: bool = True,
                 strict: bool = True) -> dict:
    """Pack the utterances of ``manifest`` (NeMo JSONL or a Lhotse CutSet, see
    :func:`~asrkd.data.dataset.read_manifest`) into tar shards of about ``shard_seconds`` of
    audio each under ``out_dir``, with ``index.json``.

    ``shuffle`` (seeded) mixes the utterances before packing, so that a shard holds many
    speakers: a batching window mixes only what it holds, and consecutive manifest lines are
    often one speaker. Returns the index's summary (shards, utterances, hours, bytes).
    """
    if not shard_seconds > 0:
        raise ConfigError(f"shard_seconds must be positive, got {shard_seconds}")
    entries, report = read_manifest(manifest, strict=strict, require_text=require_text)
    if not entries:
        raise ShardError(f"{manifest}: no utterances to shard ({report.summary()})")
    order = list(range(len(entries)))
    if shuffle:
        random.Random(seed).shuffle(order)
    groups: list[list[ManifestEntry]] = [[]]
    seconds = 0.0
    for index in order:
        entry = entries[index]
        if groups[-1] and seconds + entry.duration > shard_seconds:
            groups.append([])
            seconds = 0.0
        groups[-1].append(entry)
        seconds += entry.duration
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, total_bytes = [], 0
    for number, group in enumerate(groups):
        name = f"shard-{number:06d}.tar"
        tmp = out_dir / (name + ".tmp")
        with tarfile.open(tmp, "w") as tar:
            for position, entry in enumerate(group):
                data, suffix = _audio_member(entry)
                meta = {"key": utterance_key(entry), "text": entry.text,
                        "duration": entry.duration, "speaker": entry.speaker}
                _add_member(tar, f"{position:06d}{suffix}", data)
                _add_member(tar, f"{position:06d}.json", json.dumps(meta).encode())
        tmp.replace(out_dir / name)
        total_bytes += (out_dir / name).stat().st_size
        shards.append({"path": name, "durations": [entry.duration for entry in group]})
    summary = {"shards": len(shards), "utterances": len(entries),
               "hours": round(sum(e.duration for e in entries) / 3600, 4),
               "bytes": total_bytes}
    index = {"format": SHARD_FORMAT, "manifest": str(Path(manifest).resolve()),
             "shard_seconds": shard_seconds, **summary, "shards": shards}
    atomic_write_text(out_dir / INDEX_NAME, json.dumps(index))  # last: marks a complete set
    return {"out_dir": str(out_dir), **summary}


def read_index(directory: str | Path) -> list[Shard]:
    """The shards of ``directory`` (written by :func:`write_shards`), in index order."""
    directory = Path(directory)
    path = directory / INDEX_NAME
    if not path.is_file():
        raise ShardError(f"{directory}: no {INDEX_NAME} (write shards with `asrkd shard`)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ShardError(f"{path}: broken JSON ({error.msg})") from None
    if not isinstance(index, dict) or index.get("format") != SHARD_FORMAT:
        raise ShardError(f"{path}: not an asrkd shard index ({SHARD_FORMAT})")
    shards = [Shard(directory / s["path"], tuple(float(d) for d in s["durations"]))
              for s in index["shards"]]
    missing = [str(s.path) for s in shards if not s.path.is_file()]
    if missing:
        raise ShardError(f"{directory}: {len(missing)} shard(s) of the index missing, first "
                         f"{missing[0]}")
    return shards


def iter_shard(path: Path) -> Iterator[tuple[int, dict, bytes, str]]:
    """``(position, metadata, audio bytes, audio member name)`` of each utterance of one shard,
    in order, read sequentially."""
    pending: dict[int, dict] = {}
    with tarfile.open(path, "r|") as tar:  # stream mode: one sequential pass
        for member in tar:
            stem, _, suffix = member.name.partition(".")
            if not member.isfile() or not stem.isdigit():
                continue
            data = tar.extractfile(member).read()
            sample = pending.setdefault(int(stem), {})
            if suffix == "json":
                sample["meta"] = json.loads(data)
            else:
                sample["audio"], sample["name"] = data, member.name
            if "meta" in sample and "audio" in sample:
                del pending[int(stem)]
                yield int(stem), sample["meta"], sample["audio"], f"{path}:{sample['name']}"
    if pending:
        raise ShardError(f"{path}: samples {sorted(pending)[:3]} lack their audio or json member")


def shard_texts(directory: str | Path) -> list[str]:
    """Every transcript of a shard set (to train a tokenizer on), in shard order."""
    texts = []
    for shard in read_index(directory):
        with tarfile.open(shard.path, "r|") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    texts.append(json.loads(tar.extractfile(member).read()).get("text") or "")
    return texts


# ---------------------------------------------------------------------------------------------
# The epoch plan: which slot reads which shards, and which utterances form each batch
# ---------------------------------------------------------------------------------------------

Batch = list[tuple[int, int]]  # (shard number, position in the shard) per utterance


@dataclass(frozen=True)
class BatchingConfig:
    """How the shard stream is batched.

    Attributes:
        max_batch_seconds: padded audio per batch (longest x count), as for manifests.
        max_batch_size: also cap the utterances per batch.
        shuffle: shuffle shards and utterances per epoch (training); else index order.
        buffer_size: utterances per batching window (sorted by duration, then cut into
            batches); the reader holds at most this many encoded utterances.
        short_first: in epoch 0 each window's batches go from the shortest utterances to the
            longest instead of shuffled (the manifest sampler's curriculum, per window: a
            stream cannot sort a whole epoch; for a corpus within one window the same).
        min_duration, max_duration: utterances outside are left out (never decoded).
        duration_scale, duration_extra: a planned duration is ``d * scale + extra`` (room for
            speed perturbation and edge noise, as the manifest loader budgets).
    """

    max_batch_seconds: float = 120.0
    max_batch_size: int | None = 64
    shuffle: bool = True
    buffer_size: int = 1000
    short_first: bool = False
    min_duration: float | None = None
    max_duration: float | None = None
    duration_scale: float = 1.0
    duration_extra: float = 0.0


def _slot_shards(shards: Sequence[Shard], slots: int, rng: random.Random | None
                 ) -> list[list[int]]:
    """Shard numbers per slot: shuffled (with ``rng``), each to the slot holding the fewest
    audio seconds so far, so slots get about equal audio."""
    order = list(range(len(shards)))
    if rng is not None:
        rng.shuffle(order)
    load = [0.0] * slots
    assigned: list[list[int]] = [[] for _ in range(slots)]
    for number in order:
        slot = min(range(slots), key=lambda s: (load[s], s))
        assigned[slot].append(number)
        load[slot] += shards[number].seconds
    return assigned


def _window_batches(items: list[tuple[tuple[int, int], float]], config: BatchingConfig,
                    rng: random.Random | None, ascending: bool = False) -> list[Batch]:
    """A slot's (id, duration) items, in the order it reads them, cut into batches one window of
    ``buffer_size`` items at a time: the window sorted by duration and cut in that order into
    batches that fill the budget, so a batch holds utterances of nearly equal length. With
    ``rng`` (training) ties are broken at random and the window's batches shuffled, unless
    ``ascending`` (the short-first curriculum) leaves them shortest first. This is the manifest
    sampler's sorted chunk (:class:`~asrkd.data.datamodule.DurationBatchSampler`): a corpus
    within one window and one chunk gets the same batches from both. A window's batches are
    complete once its last item is read, so the reader holds at most a window of encoded
    utterances.

    Why not fixed duration buckets filled from a shuffle buffer (Lhotse's dynamic bucketing,
    which this replaced): a batch spreads over its bucket's whole duration range, so on AN4
    (10 buckets) padding added 9.4 % to a batch's audio, against 2.3 % here and 3.7 % for the
    manifest sampler, and shards and manifest trained on different batches."""
    batches: list[Batch] = []
    size = max(1, config.buffer_size)
    for start in range(0, len(items), size):
        window = items[start:start + size]
        if rng is not None:
            rng.shuffle(window)  # random ties; the sort is stable
        cut = [[window[j][0] for j in batch] for batch in duration_batches(
            [duration for _, duration in window], config.max_batch_seconds,
            config.max_batch_size)]
        if rng is not None and not ascending:
            rng.shuffle(cut)
        batches += cut
    return batches


def _equalise(batches: list[Batch], count: int, slot: int) -> list[Batch]:
    """``batches`` made ``count`` long by splitting the largest batch in two, repeatedly (each
    half stays where the batch was); no utterance is dropped or repeated."""
    batches = list(batches)
    while len(batches) < count:
        largest = max(range(len(batches)), key=lambda b: len(batches[b]), default=None)
        if largest is None or len(batches[largest]) < 2:
            raise ShardError(
                f"slot {slot} has too few utterances for {count} batches: the shards are too "
                "unequal for this many ranks x loader workers; write smaller shards "
                "(--shard-seconds) or use fewer loader workers")
        batch = batches[largest]
        half = len(batch) // 2
        batches[largest:largest + 1] = [batch[:half], batch[half:]]
    return batches


def plan_epoch(shards: Sequence[Shard], slots: int, epoch: int, seed: int,
               config: BatchingConfig) -> tuple[list[list[int]], list[list[Batch]]]:
    """The epoch's plan for ``slots`` readers (DDP ranks x loader workers; slot
    ``rank * workers + worker``): the shard numbers each reads, in order, and the batches it
    yields, every slot the same number. A pure function of the index's durations, the epoch,
    the seed and the layout, so every rank computes the same plan.

    Raises:
        ShardError: fewer shards than slots (a slot would have nothing to read).
    """
    if len(shards) < slots:
        raise ShardError(
            f"{len(shards)} shard(s) for {slots} readers (ranks x loader workers): every reader "
            "needs a shard of its own; write smaller shards (--shard-seconds) or use fewer "
            "loader workers")
    shuffle = config.shuffle
    assigned = _slot_shards(shards, slots, random.Random(f"{seed}:{epoch}") if shuffle else None)

    def planned(d: float) -> float:
        return d * config.duration_scale + config.duration_extra

    def usable(d: float) -> bool:
        return ((config.min_duration is None or d >= config.min_duration)
                and (config.max_duration is None or d <= config.max_duration)
                and planned(d) <= config.max_batch_seconds)

    if not any(usable(d) for s in shards for d in s.durations):
        raise ShardError("no utterance of the shards fits the duration limits and batch budget")
    per_slot = []
    for slot, numbers in enumerate(assigned):
        items = [((n, p), planned(d)) for n in numbers
                 for p, d in enumerate(shards[n].durations) if usable(d)]
        rng = random.Random(f"{seed}:{epoch}:{slot}") if shuffle else None
        per_slot.append(_window_batches(items, config, rng, config.short_first and epoch == 0))
    count = max(len(b) for b in per_slot)
    return assigned, [_equalise(b, count, s) for s, b in enumerate(per_slot)]


# ---------------------------------------------------------------------------------------------
# Reading: the iterable dataset and its resumable loader
# ---------------------------------------------------------------------------------------------


class ShardDataset(IterableDataset):
    """Batches streamed from the shards of ``directory`` (see the module docstring).

    Yields collated batches (:func:`~asrkd.data.dataset.collate_batch`), so use it with
    ``DataLoader(dataset, batch_size=None)`` (:class:`ShardLoader` does). Items are augmented
    like :class:`~asrkd.data.dataset.ManifestDataset`'s (speed perturbation, edge noise),
    their randomness drawn from the seed, the epoch and the utterance's key, so a resumed run
    sees the same audio as an uninterrupted one.

    Args:
        directory: shard directory (``index.json``).
        tokenizer: items carry token ids when given.
        batching: :class:`BatchingConfig`.
        num_workers: loader workers per rank (the plan has ranks x workers slots).
        teacher: a :class:`~asrkd.training.teacher_cache.ShardedTeacherCache` whose per-shard
            top-k posteriors are read alongside the audio (batches carry ``teacher``).
        rank, world_size: DDP layout; read from torch.distributed when None.
    """

    def __init__(self, directory: str | Path, tokenizer: Tokenizer | None = None,
                 batching: BatchingConfig = BatchingConfig(), num_workers: int = 0,
                 speed_factors: tuple[float, ...] = (), edge_noise_seconds: float = 0.0,
                 seed: int = 0, strict: bool = True, teacher: object | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 sample_rate: int = SAMPLE_RATE) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.shards = read_index(self.directory)
        self.tokenizer = tokenizer
        self.batching = batching
        self.num_workers = num_workers
        self.speed_factors = tuple(speed_factors)
        self.edge_noise_seconds = edge_noise_seconds
        self.seed = seed
        self.strict = strict
        self.teacher = teacher
        self.sample_rate = sample_rate
        self._rank, self._world_size = rank, world_size
        self.epoch = 0
        self.skip = 0  # batches of this rank already trained on in this epoch (resume)
        self._plan: tuple[int, tuple[int, int], tuple] | None = None
        self._first_index = np.cumsum([0] + [len(s.durations) for s in self.shards])

    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else ddp.rank()

    @property
    def world_size(self) -> int:
        return self._world_size if self._world_size is not None else ddp.world_size()

    def pin_layout(self) -> None:
        """Fix rank and world size now (in the rank's process, before workers start)."""
        self._rank, self._world_size = self.rank, self.world_size

    def plan(self) -> tuple[list[list[int]], list[list[Batch]]]:
        """This epoch's :func:`plan_epoch` (computed once per epoch and layout)."""
        workers = max(1, self.num_workers)
        layout = (self.world_size, workers)
        if self._plan is None or self._plan[:2] != (self.epoch, layout):
            slots = layout[0] * layout[1]
            self._plan = (self.epoch, layout,
                          plan_epoch(self.shards, slots, self.epoch, self.seed, self.batching))
        return self._plan[2]

    def __len__(self) -> int:
        """Batches this rank yields per epoch (all its workers together)."""
        return len(self.plan()[1][0]) * max(1, self.num_workers)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(1, self.num_workers):
            raise ConfigError(f"ShardDataset planned for {self.num_workers} loader workers but "
                              f"runs in {workers}; pass the loader's num_workers")
        assigned, batches = self.plan()
        # The loader takes batches from its workers in turn, from worker 0. Batch j of the
        # rank's epoch comes from slot j % workers; a run resumed after `skip` batches starts
        # with batch `skip`, so its worker w reads slot (w + skip) % workers, of whose batches
        # those numbered below `skip` are done.
        virtual = (worker + self.skip) % workers
        slot = self.rank * workers + virtual
        done = max(0, (self.skip - virtual + workers - 1) // workers)
        mine = batches[slot][done:]
        yield from self._stream(assigned[slot], mine)

    def _stream(self, numbers: list[int], batches: list[Batch]) -> Iterator[dict]:
        wanted = {uid: b for b, batch in enumerate(batches) for uid in batch}
        loaded: dict[tuple[int, int], tuple] = {}
        next_batch = 0
        for number in numbers:
            shard = self.shards[number]
            if not any((number, p) in wanted for p in range(len(shard.durations))):
                continue  # nothing of it left this epoch (resumed past it)
            teacher = self.teacher.shard(shard.path) if self.teacher is not None else None
            for position, meta, data, name in iter_shard(shard.path):
                if (number, position) not in wanted:
                    continue
                # Held encoded until its batch is complete: the batching window costs the
                # compressed bytes, not float32 waveforms.
                loaded[number, position] = (meta, data, name, teacher)
                while next_batch < len(batches) and all(
                        uid in loaded for uid in batches[next_batch]):
                    items = [self._item(uid, *loaded.pop(uid)) for uid in batches[next_batch]]
                    next_batch += 1
                    batch = collate_batch(items)
                    if batch is not None:
                        yield batch
        if next_batch < len(batches):
            raise ShardError(f"{self.directory}: shards hold fewer utterances than the index "
                             "lists (rewrite them with `asrkd shard`)")

    def _item(self, uid: tuple[int, int], meta: dict, data: bytes, name: str,
              teacher: object | None) -> dict | None:
        try:
            audio = decode_audio(data, name, self.sample_rate)
        except AudioError as error:
            if self.strict:
                raise
            log.warning("skipped unloadable audio (%s)", error)
            return None
        key = meta["key"]
        rng = random.Random(f"{self.seed}:{self.epoch}:{key}")
        index = int(self._first_index[uid[0]]) + uid[1]
        item = make_item(audio, meta.get("text") or "", index, key, rng, self.tokenizer,
                         self.speed_factors, self.edge_noise_seconds, self.sample_rate)
        if teacher is not None:
            item["teacher"] = teacher.utterance(item["key"])
        return item


class ShardLoader(DataLoader):
    """The DataLoader of a :class:`ShardDataset`: one batch per dataset yield, a fresh epoch
    plan per epoch, and Lightning's mid-epoch resume (``state_dict`` / ``load_state_dict``,
    as :class:`~asrkd.data.datamodule.ResumableDataLoader`)."""

    def __init__(self, dataset: ShardDataset, progress: Callable[[], tuple[int, int]] | None,
                 **kwargs) -> None:  # noqa: ANN003
        workers = kwargs.pop("num_workers", dataset.num_workers)
        # Workers are started afresh each epoch (not persistent): they must see its plan.
        # Its own generator: creating an iterator (every epoch) must not draw from the global
        # RNG, or a resumed run's dropout masks would drift from the uninterrupted run's.
        kwargs.setdefault("generator", torch.Generator().manual_seed(dataset.seed))
        super().__init__(dataset, batch_size=None, num_workers=workers,
                         persistent_workers=False, **kwargs)
        self._progress = progress
        self._resume: tuple[int, int] | None = None

    def state_dict(self) -> dict:
        epoch, batches_done = self._progress()
        return {"epoch": int(epoch), "batches_done": int(batches_done)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (int(state["epoch"]), int(state["batches_done"]))

    def _position(self) -> tuple[int, int]:
        """(epoch, batches of it already done) where the next iterator starts: a pending
        resume, else the trainer's current epoch from its start."""
        dataset: ShardDataset = self.dataset
        if self._resume is None:
            epoch = self._progress()[0] if self._progress is not None else dataset.epoch
            return epoch, 0
        epoch, done = self._resume
        dataset.epoch = epoch
        if done >= len(dataset):  # the checkpoint was taken at the end of the epoch
            return epoch + 1, 0
        return epoch, done

    def __len__(self) -> int:
        """Batches of the epoch about to start (Lightning reads it when it (re)loads the
        loader; each epoch's plan has its own count)."""
        self.dataset.epoch = self._position()[0]
        return len(self.dataset)

    def __iter__(self):  # noqa: ANN204 - DataLoader's
        dataset: ShardDataset = self.dataset
        dataset.pin_layout()
        dataset.epoch, dataset.skip = self._position()
        self._resume = None
        return super().__iter__()


def shard_keys(directory: str | Path) -> list[str]:
    """The keys of a shard set in shard order (each utterance's ``key`` member field)."""
    return [meta["key"] for shard in read_index(directory)
            for _, meta, _, _ in iter_shard(shard.path)]


__all__ = [
    "INDEX_NAME",
    "SHARD_FORMAT",
    "BatchingConfig",
    "Shard",
    "ShardDataset",
    "ShardError",
    "ShardLoader",
    "iter_shard",
    "plan_epoch",
    "read_index",
    "shard_keys",
    "shard_texts",
    "write_shards",
]
