"""Train one epoch from tar shards on 2 DDP processes with 2 loader workers each, recording
the utterance keys every rank trains on.

Run by tests/test_shards.py as ``python tests/ddp_shards_child.py SHARDS VAL OUT [NODES
DEVICES]`` (Lightning starts the second process itself), or under ``torchrun`` with
``NODES DEVICES`` matching its layout (two single-process "nodes" on one machine test
``trainer.num_nodes``); each rank writes ``OUT/keys_rank<r>.json`` (the keys of its training
batches, in order) and the number of batches Lightning expected.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L

import asrkd.training.pipeline as pipeline
from asrkd.training.pipeline import load_run_config, train

TINY = {
    "model.frontend.channels": "[32]", "model.frontend.strides": "[1]",
    "model.encoder.subsampling": "dw_striding", "model.encoder.d_model": "32",
    "model.encoder.n_heads": "2", "model.encoder.n_layers": "1",
    "model.encoder.subsampling_channels": "16", "model.encoder.subsampling_factor": "8",
    "model.transformer.d_model": "32", "model.transformer.n_layers": "1",
    "model.transformer.ff_dim": "64",
}


class RecordKeys(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.keys = out, []

    def on_train_batch_start(self, trainer: L.Trainer, module: object, batch: dict,
                             batch_idx: int) -> None:
        self.keys.append(list(batch["keys"]))

    def on_train_epoch_end(self, trainer: L.Trainer, module: object) -> None:
        record = {"keys": self.keys, "expected_batches": trainer.num_training_batches,
                  "world_size": trainer.world_size}
        (self.out / f"keys_rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    shards, val, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    nodes, devices = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (1, 2)
    build = pipeline.build_trainer
    pipeline.build_trainer = lambda *a, **k: build(*a, **k, extra_callbacks=[RecordKeys(out)])
    overrides = [f"{k}={v}" for k, v in TINY.items()] + [
        f"output_dir={out}", f"data.train_shards={shards}", f"data.val_manifest={val}",
        "data.num_workers=2", "data.max_batch_seconds=8", "data.shuffle_buffer=8",
        "data.speed_factors=[0.9,1.0,1.1]",
        f"trainer.num_nodes={nodes}", f"trainer.devices={devices}", "trainer.strategy=ddp",
        "trainer.accelerator=cpu", "trainer.max_epochs=1",
        "trainer.max_steps=-1", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    ]
    train(load_run_config(overrides=overrides))


if __name__ == "__main__":
    main()
