"""ModelModule: the LightningModule that trains an E2EASR, alone or distilled from a teacher."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from asrkd.config import from_dict, to_dict
from asrkd.data.tokenizer import Tokenizer, tokenizer_from_dict
from asrkd.models.distillation import KDConfig, KDWrapper
from asrkd.models.e2e_asr import E2EASR, ModelConfig, build_model
from asrkd.models.teacher_model import load_teacher
from asrkd.training.losses import ASRLoss, ASRLossConfig
from asrkd.training.teacher_cache import TeacherCache
from asrkd.utils.metrics import ErrorCounts, char_errors, word_errors


class TrainingDivergedError(RuntimeError):
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


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, then cosine decay (to ``min_lr_ratio * lr``) or Noam."""

    lr: float = 5e-4
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 500
    schedule: str = "cosine"  # "cosine" | "noam" | "constant"
    min_lr_ratio: float = 0.05

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "noam", "constant"):
            raise ValueError(f"optim.schedule must be cosine, noam or constant: {self.schedule}")


def lr_factor(step: int, config: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step``."""
    warmup = max(1, config.warmup_steps)
    if config.schedule == "noam":
        return min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


class ModelModule(L.LightningModule):
    """Trains an E2EASR (``use_kd=False``) or a student distilled from a teacher.

    Args:
        model_config: the model to train (the student when distilling), a ModelConfig or dict.
        tokenizer: tokenizer dict (``Tokenizer.to_dict()``); with KD the teacher's is used.
        use_kd: wrap a frozen teacher and the student in a :class:`KDWrapper`.
        teacher_checkpoint: path of the trained teacher (asrkd checkpoint) when ``use_kd``.
        teacher_cache: a file from ``asrkd cache-teacher``; KD then reads the teacher's stored
            CTC posteriors and the teacher is not loaded (``kd.losses`` must be ``[ctc_kl]``).
        kd_config: :class:`KDConfig` (or dict).
        asr_loss: :class:`ASRLossConfig` (or dict).
        optim: :class:`OptimConfig` (or dict).
        val_decoding: decoding method for validation WER (fast methods keep epochs short).
        distil_final_output: see :class:`KDWrapper`.
        max_bad_batches_in_a_row: a batch whose loss or gradient is NaN/inf is skipped (no
            weight update) and counted; this many in a row stop the run with
            :class:`TrainingDivergedError` (the last checkpoint on disk predates them).
    """

    def __init__(
        self,
        model_config: ModelConfig | dict,
        tokenizer: dict,
        use_kd: bool = False,
        teacher_checkpoint: str | None = None,
        kd_config: KDConfig | dict | None = None,
        asr_loss: ASRLossConfig | dict | None = None,
        optim: OptimConfig | dict | None = None,
        val_decoding: str = "ctc_greedy",
        distil_final_output: bool = True,
        examples_to_log: int = 3,
        teacher_cache: str | None = None,
        max_bad_batches_in_a_row: int = 20,
    ) -> None:
        super().__init__()

        def as_config(cls, value, name):  # noqa: ANN001, ANN202
            if value is None or isinstance(value, dict):
                return from_dict(cls, value or {}, name)
            return value

        self.model_config = as_config(ModelConfig, model_config, "model")
        self.kd_config = as_config(KDConfig, kd_config, "kd")
        self.asr_loss_config = as_config(ASRLossConfig, asr_loss, "asr_loss")
        self.optim_config = as_config(OptimConfig, optim, "optim")
        # Plain containers only: Lightning checkpoints then load with weights_only=True.
        self.save_hyperparameters(
            {
                "model_config": to_dict(self.model_config),
                "tokenizer": tokenizer,
                "use_kd": use_kd,
                "teacher_checkpoint": teacher_checkpoint,
                "kd_config": to_dict(self.kd_config),
                "asr_loss": to_dict(self.asr_loss_config),
                "optim": to_dict(self.optim_config),
                "val_decoding": val_decoding,
                "distil_final_output": distil_final_output,
                "examples_to_log": examples_to_log,
                "teacher_cache": teacher_cache,
                "max_bad_batches_in_a_row": max_bad_batches_in_a_row,
            }
        )
        self.tokenizer: Tokenizer = tokenizer_from_dict(tokenizer)
        self.use_kd = use_kd
        self.val_decoding = val_decoding
        self.asr_loss = ASRLoss(self.asr_loss_config)
        self.model: E2EASR = build_model(self.model_config, self.tokenizer)
        self.kd: KDWrapper | None = None
        if use_kd and teacher_cache is not None:
            # Offline KD: the cache replaces the teacher, which is never loaded.
            self.kd = KDWrapper.from_config(
                None, self.model, self.asr_loss, self.kd_config, distil_final_output,
                teacher_cache=TeacherCache(teacher_cache),
            )
        elif use_kd:
            if teacher_checkpoint is None:
                raise ValueError("use_kd needs training.teacher_checkpoint (a trained teacher)")
            teacher = load_teacher(teacher_checkpoint)
            if teacher.tokenizer.to_dict() != tokenizer:
                raise ValueError(
                    "teacher and student tokenizers differ: distil with the teacher's tokenizer "
                    f"(vocabulary {teacher.vocab_size} vs {self.tokenizer.vocab_size})"
                )
            self.kd = KDWrapper.from_config(
                teacher, self.model, self.asr_loss, self.kd_config, distil_final_output
            )
        self._val_words = ErrorCounts()
        self._val_chars = ErrorCounts()
        self._val_examples: list[tuple[str, str]] = []
        self.skipped_batches = 0
        self.bad_in_a_row = 0
        self._loss_was_bad = False
        self.max_bad_in_a_row = max_bad_batches_in_a_row
        self.impossible_ctc = 0
        self._warned_impossible = False

    @property
    def student(self) -> E2EASR:
        """The model being trained (the student when distilling)."""
        return self.model

    @property
    def teacher(self) -> E2EASR | None:
        return self.kd.teacher if self.kd is not None else None

    def _targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "targets" in batch:
            return batch["targets"], batch["target_lengths"]
        encoded = [torch.tensor(self.tokenizer.encode(t), dtype=torch.long) for t in batch["texts"]]
        lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
        targets = torch.full((len(encoded), max(1, int(lengths.max()))), self.tokenizer.pad_id)
        for row, tokens in enumerate(encoded):
            targets[row, : len(tokens)] = tokens
        return targets.to(self.device), lengths.to(self.device)

    def loss_parts(self, batch: dict) -> dict[str, torch.Tensor]:
        targets, target_lengths = self._targets(batch)
        if self.training:
            self._count_impossible_ctc(batch, target_lengths)
        if self.kd is not None:
            return self.kd(
                batch["audio"], batch["audio_lengths"], targets, target_lengths, batch.get("keys")
            )
        output = self.model(batch["audio"], batch["audio_lengths"], targets, target_lengths)
        return self.asr_loss(output, targets, target_lengths)

    def _count_impossible_ctc(self, batch: dict, target_lengths: torch.Tensor) -> None:
        """Count utterances with fewer encoder frames than tokens: CTC cannot align them and
        ``zero_infinity`` turns their loss into 0, so without this the model quietly learns
        nothing from them (too many tokens per second for the subsampling)."""
        if self.model.ctc is None:
            return
        frames = self.model.features.output_lengths(batch["audio_lengths"])
        frames = frames // self.model.subsampling_factor
        impossible = int((frames < target_lengths.to(frames.device)).sum())
        self.impossible_ctc += impossible
        if impossible and not self._warned_impossible:
            self._warned_impossible = True
            rank_zero_info(
                f"warning: {impossible} utterances in a batch have more tokens than encoder "
                "frames, so CTC cannot learn them; use a subword tokenizer or a smaller "
                "subsampling_factor (counted in train/impossible_ctc)"
            )
        self.log("train/impossible_ctc", float(self.impossible_ctc), batch_size=len(frames))

    def _skip_bad_batch(self, why: str) -> None:
        """Count a skipped batch; stop the run when too many come in a row."""
        self.skipped_batches += 1
        self.bad_in_a_row += 1
        self.log("train/skipped_batches", float(self.skipped_batches), batch_size=1)
        rank_zero_info(f"warning: skipped a batch at step {self.global_step}: {why}")
        if self.bad_in_a_row >= self.max_bad_in_a_row:
            raise TrainingDivergedError(
                f"{self.bad_in_a_row} batches in a row had a non-finite loss or gradient (last "
                f"at step {self.global_step}: {why}); stopped. Their updates were skipped, and "
                "the last checkpoint on disk predates them: lower training.optim.lr or check "
                "the data, then continue with --resume"
            )

    def training_step(self, batch: dict | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every utterance of the batch failed to load (strict: false)
            return None
        parts = self.loss_parts(batch)
        total = parts["total"]
        if not torch.isfinite(total):
            # One bad batch must not poison the weights: skip it, count it, keep going.
            self._skip_bad_batch(f"loss is {float(total.detach())}")
            if self.trainer.world_size > 1:
                self._loss_was_bad = True
                # Every rank must join the gradient all-reduce: backpropagate anyway. The NaN
                # gradients reach all ranks, and on_before_optimizer_step drops them on each.
                return total
            return None
        batch_size = len(batch["texts"])
        for name, value in parts.items():
            show = name == "total"
            self.log(f"train/{name}", value.detach(), batch_size=batch_size, prog_bar=show)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return total

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop non-finite gradients before clipping and the step (they would turn every
        weight into NaN); a parameter without a gradient is left alone by the optimizer."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        grads = [g for g in grads if g is not None]
        loss_was_bad, self._loss_was_bad = self._loss_was_bad, False
        if not grads:  # a skipped batch: nothing was backpropagated
            return
        if not torch.isfinite(torch.stack([g.detach().abs().max() for g in grads])).all():
            optimizer.zero_grad(set_to_none=True)
            if not loss_was_bad:  # else training_step has counted it already
                self._skip_bad_batch("non-finite gradient")
            return
        self.bad_in_a_row = 0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning restores weights, optimizer, scheduler, loops and (through
        # ResumableDataLoader) the data position; the RNG states make dropout and SpecAugment
        # of a resumed run draw what the uninterrupted run drew.
        checkpoint["asrkd_rng"] = rng_state()
        checkpoint["asrkd_counters"] = {"skipped_batches": self.skipped_batches,
                                        "impossible_ctc": self.impossible_ctc}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "asrkd_rng" in checkpoint:
            set_rng_state(checkpoint["asrkd_rng"])
        counters = checkpoint.get("asrkd_counters", {})
        self.skipped_batches = counters.get("skipped_batches", 0)
        self.impossible_ctc = counters.get("impossible_ctc", 0)

    def on_validation_epoch_start(self) -> None:
        self._val_words, self._val_chars, self._val_examples = ErrorCounts(), ErrorCounts(), []

    def validation_step(self, batch: dict | None, batch_idx: int) -> None:
        if batch is None:
            return
        batch_size = len(batch["texts"])
        parts = self.loss_parts(batch)
        self.log("val_loss", parts["total"], batch_size=batch_size, sync_dist=True, prog_bar=True)
        hypotheses = self.model.infer(
            batch["audio"], batch["audio_lengths"], method=self.val_decoding
        )
        for reference, hypothesis in zip(batch["texts"], hypotheses):
            reference = self.tokenizer.normalizer(reference)
            self._val_words = self._val_words + word_errors(reference, hypothesis.text)
            self._val_chars = self._val_chars + char_errors(reference, hypothesis.text)
            if len(self._val_examples) < self.hparams.examples_to_log:
                self._val_examples.append((reference, hypothesis.text))

    def on_validation_epoch_end(self) -> None:
        counts = torch.tensor(
            [
                self._val_words.errors,
                self._val_words.reference_length,
                self._val_chars.errors,
                self._val_chars.reference_length,
            ],
            dtype=torch.float64,
            device=self.device,
        )
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        wer = float(counts[0] / counts[1].clamp(min=1))
        cer = float(counts[2] / counts[3].clamp(min=1))
        self.log("val_wer", wer, sync_dist=False, prog_bar=True)
        self.log("val_cer", cer, sync_dist=False)
        if not self.trainer.sanity_checking:
            for reference, hypothesis in self._val_examples:
                rank_zero_info(f"  ref: {reference}\n  hyp: {hypothesis}")

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's contract
        config = self.optim_config
        decay, no_decay = [], []
        for parameter in self.parameters():
            if not parameter.requires_grad:
                continue
            # Norms, biases and positional biases are not weight-decayed (standard practice).
            (no_decay if parameter.ndim < 2 else decay).append(parameter)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
            betas=config.betas,
        )
        total = self.trainer.estimated_stepping_batches if self.trainer else 10_000
        total = int(total) if math.isfinite(total) else 10_000
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, config, total)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
