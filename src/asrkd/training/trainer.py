"""Build the Lightning Trainer from config (Lightning does the engineering)."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

from asrkd.config import ConfigError, unknown_key_error
from asrkd.training.callbacks import (
    PlainProgress,
    TeacherStaysFrozen,
    TrainingTimer,
    ValidationHistory,
)
from asrkd.training.checkpointing import LAST_CHECKPOINT, AtomicCheckpointIO

TRAINER_DEFAULTS = {
    "accelerator": "cpu",
    "devices": 1,
    "max_epochs": 10,
    "gradient_clip_val": 1.0,
    "log_every_n_steps": 20,
    "num_sanity_val_steps": 0,
    "enable_model_summary": True,
}


def build_trainer(
    trainer_config: dict,
    output_dir: str | Path,
    early_stopping_patience: int | None = None,
    extra_callbacks: list[L.Callback] | None = None,
    checkpoint_every_n_steps: int = 50,
) -> tuple[L.Trainer, dict[str, L.Callback]]:
    """A Trainer with our callbacks; ``trainer_config`` holds Lightning Trainer arguments.

    Checkpoints go to ``<output_dir>/checkpoints``: the best by validation WER, and
    ``last.ckpt`` every ``checkpoint_every_n_steps`` optimizer steps (what ``--resume``
    continues from). Both are written atomically and loaded with ``weights_only=True``.

    Returns the trainer and the named callbacks (``checkpoint``, ``last``, ``timer``,
    ``history``, ``teacher``).
    """
    valid = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    for key in trainer_config:
        if key not in valid:
            raise unknown_key_error(key, "trainer", valid)
    kwargs = {**TRAINER_DEFAULTS, **trainer_config}
    if kwargs.get("callbacks"):
        raise ConfigError("trainer.callbacks is managed by asrkd; use extra_callbacks")
    output_dir = Path(output_dir)
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="best-{step}-{val_wer:.4f}",
        monitor="val_wer",
        mode="min",
        save_top_k=1,
        save_last=False,
    )
    last = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename=LAST_CHECKPOINT.removesuffix(".ckpt"),
        monitor=None,
        save_top_k=1,
        every_n_train_steps=max(1, checkpoint_every_n_steps),
        enable_version_counter=False,
    )
    timer = TrainingTimer()
    named = {
        "checkpoint": checkpoint,
        "last": last,
        "timer": timer,
        "history": ValidationHistory(timer),
        "teacher": TeacherStaysFrozen(),
    }
    callbacks: list[L.Callback] = [*named.values(), LearningRateMonitor("step")]
    if early_stopping_patience:
        callbacks.append(EarlyStopping("val_wer", patience=early_stopping_patience, mode="min"))
    # A live bar on a terminal; plain lines in logs and CI (a bar there is unreadable).
    if kwargs.pop("enable_progress_bar", True) and sys.stdout.isatty():
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar(leave=True))
    else:
        kwargs["enable_progress_bar"] = False
        callbacks.append(PlainProgress())
    callbacks.extend(extra_callbacks or [])
    kwargs.setdefault("default_root_dir", str(output_dir))
    if "logger" not in kwargs:
        from lightning.pytorch.loggers import CSVLogger

        kwargs["logger"] = CSVLogger(str(output_dir), name="logs")
    # Our duration-bucketed batch sampler is already DDP-aware: don't let Lightning wrap it.
    kwargs.setdefault("use_distributed_sampler", False)
    if "plugins" in kwargs:
        raise ConfigError("trainer.plugins is managed by asrkd (atomic checkpoint I/O)")
    kwargs["plugins"] = [AtomicCheckpointIO()]
    return L.Trainer(callbacks=callbacks, **kwargs), named
