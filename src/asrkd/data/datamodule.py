"""ASRDataModule: train/val/test manifests, duration-bucketed batches, DDP-aware."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from asrkd.data.dataset import ManifestDataset, collate_batch
from asrkd.data.tokenizer import Tokenizer


class DurationBatchSampler(Sampler[list[int]]):
    """Batches of similar-length utterances holding at most ``max_batch_seconds`` of audio.

    Utterances are sorted by duration inside buckets of ``bucket_size`` batches' worth, so the
    padding stays small while batch order stays random. Under DDP every rank receives the same
    number of batches (batches are dealt round-robin; the remainder is padded by repeating
    batches from the start), so no rank waits for another at the end of an epoch.

    Args:
        durations: seconds per utterance.
        max_batch_seconds: total (padded) audio per batch: longest x count.
        max_batch_size: also cap the number of utterances.
        shuffle: reshuffle every epoch (``set_epoch``), deterministically from ``seed``.
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
    ) -> None:
        self.durations = list(durations)
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
        if self._num_replicas is not None:
            return self._num_replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.durations)))
        if self.shuffle:
            rng.shuffle(order)
        # Sort within large random chunks: similar lengths together, still random overall.
        chunk = max(1, self.bucket_size * 16)
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: self.durations[i])
            batch: list[int] = []
            longest = 0.0
            for index in part:
                candidate_longest = max(longest, self.durations[index])
                too_long = candidate_longest * (len(batch) + 1) > self.max_batch_seconds
                too_many = self.max_batch_size is not None and len(batch) >= self.max_batch_size
                if batch and (too_long or too_many):
                    batches.append(batch)
                    batch, candidate_longest = [], self.durations[index]
                batch.append(index)
                longest = candidate_longest
            if batch:
                batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        replicas = self.num_replicas
        per_rank = math.ceil(len(batches) / replicas)
        batches = batches + batches[: per_rank * replicas - len(batches)]
        yield from batches[self.rank :: replicas]

    def __len__(self) -> int:
        return math.ceil(len(self._all_batches()) / self.num_replicas)


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
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.tokenizer: Tokenizer | None = None
        self.datasets: dict[str, ManifestDataset] = {}

    def attach_tokenizer(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.datasets.clear()

    def _dataset(self, split: str) -> ManifestDataset:
        if split not in self.datasets:
            manifest = getattr(self.hparams, f"{split}_manifest")
            if manifest is None:
                raise ValueError(f"no {split}_manifest configured (set data.{split}_manifest)")
            train = split == "train"
            self.datasets[split] = ManifestDataset(
                Path(manifest),
                tokenizer=self.tokenizer,
                strict=self.hparams.strict,
                min_duration=self.hparams.min_duration,
                max_duration=self.hparams.max_duration if train else None,
                speed_factors=tuple(self.hparams.speed_factors) if train else (),
            )
        return self.datasets[split]

    def _loader(self, split: str) -> DataLoader:
        dataset = self._dataset(split)
        train = split == "train"
        seconds = self.hparams.max_batch_seconds
        if not train and self.hparams.eval_max_batch_seconds is not None:
            seconds = self.hparams.eval_max_batch_seconds
        sampler = DurationBatchSampler(
            dataset.durations,
            max_batch_seconds=seconds,
            max_batch_size=self.hparams.max_batch_size,
            shuffle=train,
            seed=self.hparams.seed,
        )
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_batch,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
