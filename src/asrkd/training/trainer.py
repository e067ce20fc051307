"""Build the Lightning Trainer from config (Lightning does the engineering)."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

from asrkd.config import ConfigError, unknown_key_error
from asrkd.training.callbacks import (
    EpochLength,
    ImpossibleCTCCounter,
    NonFiniteGuard,
    PlainProgress,
    RegularizationWarmup,
    RNGState,
    TeacherStaysFrozen,
    TrainingTimer,
    ValidationHistory,
)
from asrkd.training.checkpointing import LAST_CHECKPOINT, AtomicCheckpointIO

AUTO_PRECISION = "bf16-auto"
TRAINER_DEFAULTS = {
    "accelerator": "cpu",
    "devices": 1,
    "max_epochs": 10,
    "gradient_clip_val": 1.0,
    "precision": AUTO_PRECISION,
    "log_every_n_steps": 20,
    "num_sanity_val_steps": 0,
    "enable_model_summary": True,
}


def native_bf16_cpu() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX-512 BF16 or AMX).

    oneDNN also "supports" bf16 on plain AVX-512 by emulation, which is slower than float32,
    so the flag in /proc/cpuinfo decides (Linux; elsewhere False)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def resolve_precision(precision: str | int | None, accelerator: str | None) -> str | int | None:
    """``bf16-auto``: ``bf16-mixed`` where the hardware computes bf16 natively, else
    ``32-true``. On this project's 2-core CPU (AVX-512 BF16) bf16-mixed made a teacher step
    1.4x faster and reached a lower validation CER at equal wall-clock on AN4 (19.2 % vs
    37.1 % after 420 s; docs/training-recipe.md). Any other value is Lightning's own."""
    if precision != AUTO_PRECISION:
        return precision
    import torch

    on_gpu = accelerator in ("gpu", "cuda") or (
        accelerator in (None, "auto") and torch.cuda.is_available()
    )
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if native_bf16_cpu() else "32-true"


def build_trainer(
    trainer_config: dict,
    output_dir: str | Path,
    early_stopping_patience: int | None = None,
    extra_callbacks: list[L.Callback] | None = None,
    checkpoint_every_n_steps: int = 50,
    regularization_warmup_steps: int = 0,
    max_bad_batches_in_a_row: int = 20,
    keep_best: int = 1,
) -> tuple[L.Trainer, dict[str, L.Callback]]:
    """A Trainer with our callbacks; ``trainer_config`` holds Lightning Trainer arguments.

    Checkpoints go to ``<output_dir>/checkpoints``: the ``keep_best`` best by validation WER, and
    ``last.ckpt`` every ``checkpoint_every_n_steps`` optimizer steps (what ``--resume``
    continues from). Both are written atomically and loaded with ``weights_only=True``.

    Returns the trainer and the named callbacks (``checkpoint``, ``last``, ``timer``,
    ``history``, ``teacher``, ``guard`` (non-finite batches, see :class:`NonFiniteGuard`),
    ``rng``, ``impossible_ctc``).
    """
    valid = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    for key in trainer_config:
        if key not in valid:
            raise unknown_key_error(key, "trainer", valid)
    kwargs = {**TRAINER_DEFAULTS, **trainer_config}
    kwargs["precision"] = resolve_precision(kwargs.get("precision"), kwargs.get("accelerator"))
    if kwargs.get("callbacks"):
        raise ConfigError("trainer.callbacks is managed by asrkd; use extra_callbacks")
    output_dir = Path(output_dir)
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="best-{step}-{val_wer:.4f}",
        monitor="val_wer",
        mode="min",
        save_top_k=keep_best,
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
        "guard": NonFiniteGuard(max_bad_batches_in_a_row),
        "rng": RNGState(),
        "impossible_ctc": ImpossibleCTCCounter(),
        "epoch_length": EpochLength(),
    }
    callbacks: list[L.Callback] = [*named.values(), LearningRateMonitor("step")]
    if regularization_warmup_steps > 0:
        callbacks.append(RegularizationWarmup(regularization_warmup_steps))
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
