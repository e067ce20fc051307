"""Cross-cutting training concerns as Lightning callbacks (the engineering around the
:class:`~asrkd.modelmodule.ModelModule`, which holds the science)."""

from __future__ import annotations

import hashlib
import random
import time

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.data import sized_len
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from asrkd.errors import UserError


class TrainingDivergedError(UserError, RuntimeError):
    """Too many batches in a row had a non-finite loss or gradient; the run stops."""


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain containers (``weights_only`` loads them)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])


class RNGState(L.Callback):
    """Checkpoints the Python, numpy and torch RNG states.

    Lightning restores weights, optimizer, scheduler, loops and (through the resumable data
    loader) the data position; with the RNG states too, dropout and SpecAugment of a resumed
    run draw what the uninterrupted run drew (bit-identical resume)."""

    def state_dict(self) -> dict:
        return {"rng": rng_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        if "rng" in state_dict:
            set_rng_state(state_dict["rng"])

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:  # noqa: ANN001
        if "asrkd_rng" in checkpoint:  # written by asrkd before the state lived here
            set_rng_state(checkpoint["asrkd_rng"])


class EpochLength(L.Callback):
    """Re-reads the number of training batches at the start of every epoch.

    Lightning reads the train loader's length once per fit and caps every epoch at it (the
    combined loader's ``limits``), but a duration-batched epoch has its own number of batches
    (each epoch cuts its own sorted chunks; a short-first epoch 0 differs from the shuffled
    ones). Without this an epoch longer than the first is cut short, its last batches never
    trained (AN4: 829 of 850 utterances in epoch 1), and with epoch-based validation a shorter
    epoch skips its validation. Lightning has no public hook for it: the limits live on
    ``fit_loop._combined_loader`` (pinned Lightning; ``test_every_epoch_trains_all_its_batches``
    fails if that moves).
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = getattr(trainer.fit_loop, "_combined_loader", None)
        limit = trainer.limit_train_batches
        if loader is None or not (isinstance(limit, int) or limit == 1.0):
            return  # a fractional limit: Lightning's own count
        if len(loader.flattened) != 1 or (length := sized_len(loader.flattened[0])) is None:
            return  # several loaders (their combination is Lightning's), or unsized data
        batches = min(length, limit) if isinstance(limit, int) else length
        loader.limits = [batches]  # read by the epoch's iterator, created after this hook
        trainer.fit_loop.max_batches = batches
        if isinstance(trainer.val_check_interval, float) and trainer.val_check_batch is not None:
            trainer.val_check_batch = max(1, int(batches * trainer.val_check_interval))


class NonFiniteGuard(L.Callback):
    """One bad batch must not poison the weights: a batch whose loss or gradient is NaN/inf
    gets no update (its gradients are dropped before clipping and the optimizer step) and is
    counted in ``train/skipped_batches``; ``max_in_a_row`` such batches in a row stop the run
    with :class:`TrainingDivergedError` (the last checkpoint on disk predates them).

    Every rank backpropagates every batch, so distributed runs need no special case: a
    non-finite gradient reaches all ranks through the all-reduce, and each drops it.
    """

    def __init__(self, max_in_a_row: int = 20) -> None:
        self.max_in_a_row = max_in_a_row
        self.skipped = 0
        self.in_a_row = 0
        self._loss_was_bad = False

    def _skip(self, trainer: L.Trainer, pl_module: L.LightningModule, why: str) -> None:
        self.skipped += 1
        self.in_a_row += 1
        pl_module.log("train/skipped_batches", float(self.skipped), batch_size=1)
        rank_zero_info(f"warning: skipped a batch at step {trainer.global_step}: {why}")
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingDivergedError(
                f"{self.in_a_row} batches in a row had a non-finite loss or gradient (last "
                f"at step {trainer.global_step}: {why}); stopped. Their updates were skipped, "
                "and the last checkpoint on disk predates them: lower training.optim.lr or "
                "check the data, then continue with --resume"
            )

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:  # noqa: ANN001
        if not torch.isfinite(loss):
            self._loss_was_bad = True
            self._skip(trainer, pl_module, f"loss is {float(loss.detach())}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        loss_was_bad, self._loss_was_bad = self._loss_was_bad, False
        if not grads:
            return
        if not torch.isfinite(torch.stack([g.detach().abs().max() for g in grads])).all():
            # A parameter without a gradient is left alone by the optimizer.
            optimizer.zero_grad(set_to_none=True)
            if not loss_was_bad:  # else counted already
                self._skip(trainer, pl_module, "non-finite gradient")
            return
        self.in_a_row = 0

    def state_dict(self) -> dict:
        return {"skipped_batches": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped_batches", 0))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:  # noqa: ANN001
        if "asrkd_counters" in checkpoint:  # written by asrkd before the state lived here
            self.skipped = int(checkpoint["asrkd_counters"].get("skipped_batches", 0))


class ImpossibleCTCCounter(L.Callback):
    """Counts training utterances with fewer encoder frames than tokens (``train/
    impossible_ctc``): CTC cannot align them and ``zero_infinity`` turns their loss into 0, so
    without this the model quietly learns nothing from them (too many tokens per second for
    the subsampling). Warns once."""

    def __init__(self) -> None:
        self.count = 0
        self._warned = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        model = pl_module.model
        if batch is None or model.ctc is None:
            return
        _, target_lengths = pl_module.targets(batch)
        frames = model.features.output_lengths(batch["audio_lengths"]) // model.subsampling_factor
        impossible = int((frames < target_lengths.to(frames.device)).sum())
        self.count += impossible
        if impossible and not self._warned:
            self._warned = True
            rank_zero_info(
                f"warning: {impossible} utterances in a batch have more tokens than encoder "
                "frames, so CTC cannot learn them; use a subword tokenizer or a smaller "
                "subsampling_factor (counted in train/impossible_ctc)"
            )
        pl_module.log("train/impossible_ctc", float(self.count), batch_size=len(frames))

    def state_dict(self) -> dict:
        return {"impossible_ctc": self.count}

    def load_state_dict(self, state_dict: dict) -> None:
        self.count = int(state_dict.get("impossible_ctc", 0))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:  # noqa: ANN001
        if "asrkd_counters" in checkpoint:
            self.count = int(checkpoint["asrkd_counters"].get("impossible_ctc", 0))


def parameters_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer, bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class TeacherStaysFrozen(L.Callback):
    """Fails the run the moment the teacher leaves eval mode, gets a gradient, or changes."""

    def __init__(self, check_every_n_batches: int = 50) -> None:
        self.check_every = check_every_n_batches
        self.fingerprint: str | None = None

    @staticmethod
    def _teacher(pl_module: L.LightningModule):  # noqa: ANN205
        return getattr(pl_module, "teacher", None)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        teacher = self._teacher(pl_module)
        if teacher is not None:
            self.fingerprint = parameters_fingerprint(teacher)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        teacher = self._teacher(pl_module)
        if teacher is None or batch_idx % self.check_every:
            return
        if any(module.training for module in teacher.modules()):
            raise RuntimeError("the teacher left eval mode during training")
        if any(p.requires_grad or p.grad is not None for p in teacher.parameters()):
            raise RuntimeError("a teacher parameter requires or holds a gradient")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        teacher = self._teacher(pl_module)
        if teacher is not None and parameters_fingerprint(teacher) != self.fingerprint:
            raise RuntimeError("teacher weights changed during distillation")


class TrainingTimer(L.Callback):
    """Wall-clock seconds spent in ``fit`` (reported in the demo table).

    Checkpointed, so a resumed run reports the time of all its parts (not the lost work
    between the last checkpoint and a crash).
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._before = 0.0
        self._start = 0.0

    def elapsed(self) -> float:
        """Seconds in ``fit`` so far, over every resumed part of the run."""
        return self._before + time.perf_counter() - self._start

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._start = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.seconds = self.elapsed()

    def state_dict(self) -> dict:
        return {"seconds": self.elapsed() if self._start else self._before}

    def load_state_dict(self, state_dict: dict) -> None:
        self._before = float(state_dict.get("seconds", 0.0))


class ValidationHistory(L.Callback):
    """Keeps (step, seconds, val_wer, val_cer, val_loss) after every validation, for the report
    plots. ``seconds`` is the run's wall-clock time in ``fit`` so far (from ``timer``), so runs
    with different step costs can be compared at equal time."""

    def __init__(self, timer: TrainingTimer | None = None) -> None:
        self.history: list[dict] = []
        self.timer = timer

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        if self.timer is not None:
            row["seconds"] = round(self.timer.elapsed(), 1)
        for key in ("val_wer", "val_cer", "val_loss"):
            if key in metrics:
                row[key] = float(metrics[key])
        self.history.append(row)


class PlainProgress(L.Callback):
    """One line every ``every`` steps (for logs and CI, where a live progress bar is noise)."""

    def __init__(self, every: int = 25) -> None:
        self.every = every
        self._start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        step = trainer.global_step
        if step % self.every or not trainer.is_global_zero:
            return
        elapsed = time.perf_counter() - self._start
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        eta = f", eta {elapsed / step * (total - step):.0f} s" if total and step else ""
        loss = trainer.callback_metrics.get("train/total")
        loss_text = f" loss {float(loss):.3f}" if loss is not None else ""
        print(
            f"step {step}{'/' + str(total) if total else ''}{loss_text} "
            f"({elapsed:.0f} s{eta})",
            flush=True,
        )


def _regularizers(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every dropout rate and SpecAugment strength inside ``module``."""
    found = []
    for child in module.modules():
        if isinstance(child, nn.Dropout):
            found.append((child, "p"))
        elif isinstance(child, nn.RNNBase):
            found.append((child, "dropout"))
        elif type(child).__name__ == "SpecAugment":
            found.append((child, "strength"))
        else:
            found += [(child, name) for name in ("dropout_att", "dropout")
                      if isinstance(getattr(child, name, None), float)]
    return found


class RegularizationWarmup(L.Callback):
    """Dropout and SpecAugment rise linearly from 0 to their configured values over ``steps``.

    Regularisation sized for long runs slows the start of short ones: on AN4 at equal steps
    (583, 420 s) a teacher with every dropout at 0 reached validation CER 13.7 % against
    19.2 % with 0.1, and both still had a validation loss below the (augmented) training loss,
    i.e. they were underfitting. Ramping keeps the fast start and the full regularisation for
    the rest of a long run. Only the model being trained is touched (a KD teacher stays in
    eval mode). The rates depend only on the global step, so a resumed run matches.
    """

    def __init__(self, steps: int) -> None:
        self.steps = max(1, int(steps))
        self._targets: list[tuple[nn.Module, str, float]] = []

    def _apply(self, factor: float) -> None:
        for module, name, value in self._targets:
            setattr(module, name, value * factor)

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        model = getattr(pl_module, "student", pl_module)
        self._targets = [(m, name, float(getattr(m, name))) for m, name in _regularizers(model)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._apply(min(1.0, trainer.global_step / self.steps))

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._apply(1.0)
