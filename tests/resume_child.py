"""Train a tiny model; with a kill step, SIGKILL this process right after that step.

Run by tests/test_resume.py as ``python tests/resume_child.py CORPUS OUT KILL_AT RESUME
[SHARDS]``:
a real process death (no cleanup, no exception handlers), mid-epoch, between checkpoints.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import lightning as L

import asrkd.training.pipeline as pipeline
from asrkd.training.pipeline import load_run_config, train

TINY = {
    "model.frontend.channels": "[32]", "model.frontend.strides": "[1]",
    "model.encoder.subsampling": "dw_striding", "model.encoder.d_model": "64",
    "model.encoder.n_heads": "2", "model.encoder.n_layers": "2",
    "model.encoder.subsampling_channels": "32", "model.encoder.subsampling_factor": "8",
    "model.transformer.d_model": "64", "model.transformer.n_layers": "1",
    "model.transformer.ff_dim": "128",
}


def overrides(corpus: Path, out: Path, steps: int) -> list[str]:
    return [f"{k}={v}" for k, v in TINY.items()] + [
        f"output_dir={out}",
        f"data.train_manifest={corpus / 'train.jsonl'}",
        f"data.val_manifest={corpus / 'val.jsonl'}",
        "data.max_batch_seconds=10",
        "data.speed_factors=[0.9,1.0,1.1]",  # data randomness must resume too
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        "trainer.val_check_interval=5",
        "trainer.check_val_every_n_epoch=null",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.deterministic=true",
        "training.checkpoint_every_n_steps=2",
    ]


class KillAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    corpus, out, kill_at, resume = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), \
        sys.argv[4] == "1"
    # Optional 5th argument: train from these tar shards, with 2 loader workers.
    shards = [f"data.train_shards={sys.argv[5]}", "data.num_workers=2"] \
        if len(sys.argv) > 5 else []
    if kill_at > 0:
        build = pipeline.build_trainer
        pipeline.build_trainer = lambda *a, **k: build(*a, **k, extra_callbacks=[KillAt(kill_at)])
    train(load_run_config(overrides=overrides(corpus, out, steps=14) + shards), resume=resume)


if __name__ == "__main__":
    main()
