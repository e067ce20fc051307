"""How much does the order of the first batches decide? The AN4 recipe's teacher stage, with only
the training batches changed (the model's seed, the speed-perturbation draws and everything
else stay the recipe's).

    python benchmarks/batch_order.py --exp exp/order/files_s1 --order-seed 1 trainer.max_steps=500
    python benchmarks/batch_order.py --exp exp/order/shards_s1 --shards exp/an4_shards/shards \
        --order-seed 1 trainer.max_steps=500
    python benchmarks/batch_order.py --exp exp/order/plan --plan-from exp/an4_shards/shards \
        trainer.max_steps=500

Batches, one of:
- the manifest's sampler (`DurationBatchSampler`) shuffled with ``--order-seed`` (default: the
  recipe's seed), shortest-first in the first epoch unless ``--no-short-first`` (the
  ``data.short_first`` default since 2026-12-07; the runs without it in docs/scale.md are
  ``--no-short-first``, with the sampler's seeds derived as ``seed + epoch`` then);
- ``--shards DIR``: read from the shards, their epoch plan drawn with ``--order-seed``;
- ``--plan-from DIR``: the shards' epoch plan, but each utterance read from its file through the
  manifest's dataset, to tell the plan's effect from the shard reader's (``--shuffle-plan``:
  each epoch's batches in a random order instead of the order they completed).

Extra ``key=value`` overrides follow the recipe's (run ``bash recipes/an4/run.sh`` or
``recipes/an4/prepare.py`` first for exp/an4/manifests). Writes ``<exp>/teacher`` as
``recipes/an4/train_stage.py`` does; docs/scale.md has the measured table.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes" / "an4"))
from run import FULL, OVERRIDES  # noqa: E402

from asrkd.data import datamodule as dm  # noqa: E402
from asrkd.data import shards as sh  # noqa: E402
from asrkd.data.dataset import ManifestDataset, collate_batch  # noqa: E402
from asrkd.recipe import train_stage  # noqa: E402

EPOCHS_PLANNED = 200  # epochs of plan laid out for --plan-from (one loader "epoch")


def plan_from_files(module: dm.ASRDataModule, directory: Path, seed: int,
                    shuffle: bool = False) -> DataLoader:
    """The shards' epoch plans (epochs 0 .. EPOCHS_PLANNED - 1, one after the other) as batches
    of manifest indices, read from the files by the manifest's dataset; with ``shuffle`` each
    epoch's batches in a random order (the same batches, not in the order they completed)."""
    hp = module.hparams
    reader = sh.ShardDataset(directory, None, module.shard_batching(), seed=seed, rank=0,
                             world_size=1)
    dataset = ManifestDataset(hp.train_manifest, tokenizer=module.tokenizer,
                              speed_factors=tuple(hp.speed_factors), seed=hp.seed)
    index = {str(Path(e.audio_filepath).resolve()): i for i, e in enumerate(dataset.entries)}
    of_uid = {(n, position): index[meta["key"]] for n, shard in enumerate(reader.shards)
              for position, meta, _, _ in sh.iter_shard(shard.path)}
    batches = []
    for epoch in range(EPOCHS_PLANNED):
        reader.epoch = epoch
        epoch_batches = [[(of_uid[uid], epoch) for uid in batch] for batch in reader.plan()[1][0]]
        if shuffle:
            random.Random(f"{seed}:{epoch}:order").shuffle(epoch_batches)
        batches += epoch_batches
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value, after the recipe's own")
    parser.add_argument("--exp", type=Path, required=True)
    parser.add_argument("--order-seed", type=int, help="default: the run's seed")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--shards", type=Path)
    group.add_argument("--plan-from", type=Path)
    parser.add_argument("--short-first", action=argparse.BooleanOptionalAction, default=True,
                        help="shortest-first first epoch (data.short_first; default: %(default)s)")
    parser.add_argument("--shuffle-plan", action="store_true",
                        help="with --plan-from: each epoch's batches in a random order")
    parser.add_argument("--manifests", type=Path, default=ROOT / "exp" / "an4" / "manifests")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_intermixed_args()
    torch.set_num_threads(args.threads)
    overrides = list(OVERRIDES) + args.overrides
    if args.shards is not None:
        overrides.append(f"data.train_shards={args.shards}")
    overrides.append(f"data.short_first={str(args.short_first).lower()}")
    seed = args.order_seed

    if seed is not None and args.plan_from is None:
        # Only the order's seed: the sampler's or the shard plan's (the speed-perturbation
        # draws keep the run's seed, which the manifest dataset and the shard reader use).
        sampler_init = dm.DurationBatchSampler.__init__

        def seeded_sampler(self, *a, **k) -> None:  # noqa: ANN001, ANN002, ANN003
            sampler_init(self, *a, **k)
            if self.shuffle:
                self.seed = seed
        dm.DurationBatchSampler.__init__ = seeded_sampler
        plan_epoch = sh.plan_epoch
        sh.plan_epoch = lambda shards, slots, epoch, _seed, config: plan_epoch(
            shards, slots, epoch, seed, config)
    if args.plan_from is not None:
        loader = dm.ASRDataModule._loader
        directory, plan_seed = args.plan_from, seed if seed is not None else 0

        def train_from_plan(self, split: str) -> DataLoader:  # noqa: ANN001
            if split != "train":
                return loader(self, split)
            return plan_from_files(self, directory, plan_seed, args.shuffle_plan)
        dm.ASRDataModule._loader = train_from_plan

    config = ROOT / "src" / "asrkd" / "configs" / "presets" / "teacher.yaml"
    result = train_stage("teacher", FULL, args.manifests, args.exp, FULL.teacher_steps,
                         overrides, config)
    print(f"teacher: {result['train_seconds']} s, best validation WER {result['best_val_wer']}")
    for row in result.get("val_history", []):
        print(f"  step {row['step']}: val WER {100 * row['val_wer']:.1f} %, "
              f"val loss {row['val_loss']:.2f}")


if __name__ == "__main__":
    main()
