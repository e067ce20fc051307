"""ASRDataModule: train/val/test manifests, duration-bucketed batches, DDP-aware."""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

import asrkd.utils.dist as ddp
from asrkd.data.dataset import ManifestDataset, collate_batch, duration_batches
from asrkd.data.shards import BatchingConfig, ShardDataset, ShardLoader
from asrkd.data.tokenizer import Tokenizer
from asrkd.errors import ConfigError

log = logging.getLogger(__name__)


class DurationBatchSampler(Sampler[list[int]]):
    """Batches of similar-length utterances holding at most ``max_batch_seconds`` of audio.

    Utterances are sorted by duration inside buckets of ``bucket_size`` batches' worth, so the
    padding stays small while batch order stays random. Under DDP every rank receives the same
    number of batches (batches are dealt round-robin; the remainder is padded by repeating
    batches from the start), so no rank waits for another at the end of an epoch.

    An utterance longer than ``max_batch_seconds`` on its own would make a batch over the
    memory budget: it is left out of every epoch, counted in ``too_long`` and warned about once.
    With ``with_epoch`` the sampler yields ``(index, epoch)`` pairs, so a dataset can draw its
    per-item randomness from them (the same on a resumed run as on an uninterrupted one).

    Args:
        durations: seconds per utterance.
        max_batch_seconds: total (padded) audio per batch: longest x count.
        max_batch_size: also cap the number of utterances.
        shuffle: reshuffle every epoch (``set_epoch``), deterministically from ``seed``.
        short_first: a curriculum (SortaGrad, Amodei et al. 2016): the first epoch's batches go
            from the shortest utterances to the longest; later epochs are shuffled.
        num_replicas, rank: DDP layout; read from torch.distributed when left as None.
    """

    def __init__(
        self,
        durations: Sequence[float],
        max_batch_seconds: float,
        max_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        bucket_size: int = 50,
        with_epoch: bool = False,
        short_first: bool = False,
    ) -> None:
        self.durations = list(durations)
        self.short_first = short_first
        self.usable = [i for i, d in enumerate(self.durations) if d <= max_batch_seconds]
        self.too_long = len(self.durations) - len(self.usable)
        if self.too_long:
            log.warning(
                "left out %d utterances longer than the batch budget max_batch_seconds=%g s "
                "(raise it, or split the audio)", self.too_long, max_batch_seconds,
            )
        self.with_epoch = with_epoch
        self._resume_skip = 0
        self.max_batch_seconds = max_batch_seconds
        self.max_batch_size = max_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.bucket_size = bucket_size
        self._num_replicas = num_replicas
        self._rank = rank

    @property
    def num_replicas(self) -> int:
        return self._num_replicas if self._num_replicas is not None else ddp.world_size()

    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else ddp.rank()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> DurationBatchSampler:
        """Itself: Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler`` (as for
        torch's BatchSampler), never on the batch sampler; without this every epoch would
        repeat the first epoch's order."""
        return self

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue epoch ``epoch`` after its first ``batches_done`` batches (of this rank)."""
        self.epoch = epoch
        if batches_done >= len(self):  # the checkpoint was taken at the end of the epoch
            self.epoch, batches_done = epoch + 1, 0
        self._resume_skip = batches_done

    def _all_batches(self) -> list[list[int]]:
        # A string seed: seed + epoch would give seeds s and s + 1 the same order in every
        # epoch but one (the shard plans seed the same way).
        rng = random.Random(f"{self.seed}:{self.epoch}")
        order = list(self.usable)
        if self.shuffle:
            rng.shuffle(order)
        # Sort within large random chunks: similar lengths together, still random overall.
        chunk = max(1, self.bucket_size * 16)
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            cut = duration_batches([self.durations[i] for i in part], self.max_batch_seconds,
                                   self.max_batch_size)
            batches += [[part[j] for j in batch] for batch in cut]
        if self.short_first and self.epoch == 0:
            batches.sort(key=lambda b: max(self.durations[i] for i in b))
        elif self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]] | Iterator[list[tuple[int, int]]]:
        batches = self._all_batches()
        replicas = self.num_replicas
        per_rank = math.ceil(len(batches) / replicas)
        batches = batches + batches[: per_rank * replicas - len(batches)]
        mine = batches[self.rank :: replicas]
        skip, self._resume_skip = self._resume_skip, 0
        epoch = self.epoch
        for batch in mine[skip:]:
            yield [(index, epoch) for index in batch] if self.with_epoch else batch

    def __len__(self) -> int:
        return math.ceil(len(self._all_batches()) / self.num_replicas)


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning can checkpoint and resume mid-epoch.

    Lightning stores :meth:`state_dict` in every checkpoint and hands it back through
    :meth:`load_state_dict` before the resumed run draws its first batch. The state is the
    epoch and how many of its batches the training steps have consumed (``progress``, read from
    the trainer; the loader itself cannot tell, since Lightning prefetches a batch ahead).
    """

    def __init__(self, *args, progress: Callable[[], tuple[int, int]], **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self._progress = progress

    def state_dict(self) -> dict:
        epoch, batches_done = self._progress()
        return {"epoch": int(epoch), "batches_done": int(batches_done)}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.resume(state["epoch"], state["batches_done"])


class ASRDataModule(L.LightningDataModule):
    """Train/val/test manifests to batches of padded audio + token ids.

    The tokenizer belongs to the model (it is saved in the checkpoint); the ModelModule hands it
    over with :meth:`attach_tokenizer` before the data loaders are built (LightningCLI and the
    train script do this), so the data encodes text exactly as the model decodes it.
    """

    def __init__(
        self,
        train_manifest: str | None = None,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        max_batch_seconds: float = 120.0,
        max_batch_size: int | None = 64,
        eval_max_batch_seconds: float | None = None,
        num_workers: int = 0,
        min_duration: float | None = 0.1,
        max_duration: float | None = 20.0,
        strict: bool = True,
        speed_factors: tuple[float, ...] = (),
        edge_noise_seconds: float = 0.0,
        concat_prob: float = 0.0,
        seed: int = 0,
        short_first: bool = True,
        train_shards: str | None = None,
        shuffle_buffer: int = 1000,
        teacher_shards: object | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["teacher_shards"])
        self.teacher_shards = teacher_shards
        self.tokenizer: Tokenizer | None = None
        self.datasets: dict[str, ManifestDataset] = {}

    def attach_tokenizer(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.datasets.clear()

    def _dataset(self, split: str) -> ManifestDataset:
        if split not in self.datasets:
            manifest = getattr(self.hparams, f"{split}_manifest")
            if manifest is None:
                raise ConfigError(f"no {split}_manifest configured (set data.{split}_manifest)")
            train = split == "train"
            self.datasets[split] = ManifestDataset(
                Path(manifest),
                tokenizer=self.tokenizer,
                strict=self.hparams.strict,
                min_duration=self.hparams.min_duration,
                max_duration=self.hparams.max_duration if train else None,
                speed_factors=tuple(self.hparams.speed_factors) if train else (),
                edge_noise_seconds=self.hparams.edge_noise_seconds if train else 0.0,
                concat_prob=self.hparams.concat_prob if train else 0.0,
                seed=self.hparams.seed,
            )
        return self.datasets[split]

    def shard_batching(self) -> BatchingConfig:
        """How training batches are planned from shards, from this module's settings."""
        hp = self.hparams
        factors = tuple(hp.speed_factors)
        return BatchingConfig(
            max_batch_seconds=hp.max_batch_seconds, max_batch_size=hp.max_batch_size,
            shuffle=True, buffer_size=hp.shuffle_buffer, short_first=hp.short_first,
            min_duration=hp.min_duration, max_duration=hp.max_duration,
            # Budget as the manifest loader does: the slowest speed copy, two edge-noise draws.
            duration_scale=1.0 / min(factors) if factors else 1.0,
            duration_extra=hp.edge_noise_seconds)

    def _shard_loader(self) -> ShardLoader:
        """Training batches streamed from ``train_shards`` (see :mod:`asrkd.data.shards`)."""
        hp = self.hparams
        if hp.concat_prob:
            raise ConfigError("data.concat_prob joins random utterances of a manifest; with "
                              "data.train_shards set it to 0 (shards are read as a stream)")
        dataset = ShardDataset(hp.train_shards, self.tokenizer, self.shard_batching(),
                               hp.num_workers, speed_factors=tuple(hp.speed_factors),
                               edge_noise_seconds=hp.edge_noise_seconds,
                               seed=hp.seed, strict=hp.strict, teacher=self.teacher_shards)
        # Lightning warns that an IterableDataset's __len__ may be wrong with several workers;
        # this one's is exact (every worker yields the planned number of batches).
        warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined")
        return ShardLoader(dataset, progress=self._train_progress, num_workers=hp.num_workers)

    def _loader(self, split: str) -> DataLoader:
        if split == "train" and self.hparams.train_shards is not None:
            return self._shard_loader()
        dataset = self._dataset(split)
        train = split == "train"
        seconds = self.hparams.max_batch_seconds
        if not train and self.hparams.eval_max_batch_seconds is not None:
            seconds = self.hparams.eval_max_batch_seconds
        durations = dataset.durations
        if dataset.speed_factors:
            # A 0.9x speed copy is 11% longer: budget for the slowest factor.
            stretch = 1.0 / min(dataset.speed_factors)
            durations = [d * stretch for d in durations]
        if dataset.edge_noise_seconds:
            # Two uniform draws of up to edge_noise_seconds: on average this much longer.
            durations = [d + dataset.edge_noise_seconds for d in durations]
        if dataset.concat_prob:
            # A joined item is on average one mean utterance (and 0.15 s of gap) longer.
            extra = dataset.concat_prob * (sum(durations) / max(1, len(durations)) + 0.15)
            durations = [d + extra for d in durations]
        sampler = DurationBatchSampler(
            durations,
            max_batch_seconds=seconds,
            max_batch_size=self.hparams.max_batch_size,
            shuffle=train,
            seed=self.hparams.seed,
            with_epoch=train and bool(dataset.speed_factors or dataset.edge_noise_seconds
                                      or dataset.concat_prob),
            short_first=train and self.hparams.short_first,
        )
        if train and self.trainer is not None:
            # A resumed run: Lightning sizes the epoch from len(loader) before it hands the
            # loader its state, so the sampler must already be at the epoch being resumed.
            sampler.set_epoch(self._train_progress()[0])
        workers = self.hparams.num_workers
        kwargs = {
            "batch_sampler": sampler,
            "collate_fn": collate_batch,
            "num_workers": workers,
            "persistent_workers": workers > 0,
            # Its own generator: creating an iterator must not draw from the global RNG,
            # or a resumed run's dropout masks would drift from the uninterrupted run's.
            "generator": torch.Generator().manual_seed(self.hparams.seed),
        }
        if train:
            return ResumableDataLoader(dataset, progress=self._train_progress, **kwargs)
        return DataLoader(dataset, **kwargs)

    def _train_progress(self) -> tuple[int, int]:
        """(epoch, training batches consumed in it), as the trainer counts them."""
        loop = self.trainer.fit_loop
        batches = loop.epoch_loop.batch_progress.current.processed
        return loop.epoch_progress.current.processed, batches

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
