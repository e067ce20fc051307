"""ModelModule: the LightningModule that trains an E2EASR, alone or distilled from a teacher.

It holds the science only: the model, the objective that scores a batch, the optimiser and
validation WER/CER. What the run config turns into these is
:func:`asrkd.training.builder.build_module`; the engineering (non-finite batches, RNG state
for bit-identical resume, the impossible-CTC counter, checkpoints, timing) lives in the
callbacks of :mod:`asrkd.training.callbacks`.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from asrkd.models.common import pad_sequences
from asrkd.models.e2e_asr import E2EASR
from asrkd.training.metrics import ErrorRates
from asrkd.training.optim import OptimConfig, build_optimizer


class ModelModule(L.LightningModule):
    """Trains ``model`` on ``objective``.

    Args:
        model: the E2EASR being trained (the student when distilling).
        objective: ``(audio, audio_lengths, targets, target_lengths, keys) -> dict`` of loss
            parts with ``total``: a :class:`~asrkd.losses.Supervised` loss or a
            :class:`~asrkd.models.distillation.KDWrapper` around ``model``.
        optim: AdamW and schedule settings.
        val_decoding: decoding method of the validation WER (fast methods keep epochs short).
        examples_to_log: validation (reference, hypothesis) pairs printed per validation.
        hparams: plain-container run settings saved in Lightning checkpoints (what a resume
            is checked against); the builder passes the model config, tokenizer and KD
            settings.
    """

    def __init__(
        self,
        model: E2EASR,
        objective: nn.Module,
        optim: OptimConfig = OptimConfig(),
        val_decoding: str = "ctc_greedy",
        examples_to_log: int = 3,
        hparams: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(hparams or {})
        self.model = model
        self.objective = objective
        self.optim_config = optim
        self.val_decoding = val_decoding
        self.examples_to_log = examples_to_log
        self.val_metrics = ErrorRates()
        self._val_examples: list[tuple[str, str]] = []

    @property
    def tokenizer(self):  # noqa: ANN201
        return self.model.tokenizer

    @property
    def teacher(self) -> E2EASR | None:
        """The frozen teacher when distilling from one online (None otherwise)."""
        return getattr(self.objective, "teacher", None)

    def targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded token ids and lengths of the batch (tokenised here if the loader did not)."""
        if "targets" in batch:
            return batch["targets"], batch["target_lengths"]
        encoded = [torch.tensor(self.tokenizer.encode(t), dtype=torch.long) for t in batch["texts"]]
        targets, lengths = pad_sequences(encoded, pad_value=self.tokenizer.pad_id, min_length=1)
        return targets.to(self.device), lengths.to(self.device)

    def loss_parts(self, batch: dict) -> dict[str, torch.Tensor]:
        targets, target_lengths = self.targets(batch)
        # Stored teacher posteriors travel with the batch when a sharded cache is read.
        stored = {"stored_teacher": batch["teacher"]} if "teacher" in batch else {}
        return self.objective(batch["audio"], batch["audio_lengths"], targets, target_lengths,
                              batch.get("keys"), **stored)

    def training_step(self, batch: dict | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every utterance of the batch failed to load (strict: false)
            return None
        parts = self.loss_parts(batch)
        batch_size = len(batch["texts"])
        for name, value in parts.items():
            self.log(f"train/{name}", value.detach(), batch_size=batch_size,
                     prog_bar=name == "total")
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return parts["total"]

    def validation_step(self, batch: dict | None, batch_idx: int) -> None:
        if batch is None:
            return
        parts = self.loss_parts(batch)
        self.log("val_loss", parts["total"], batch_size=len(batch["texts"]), sync_dist=True,
                 prog_bar=True)
        hypotheses = [h.text for h in self.model.infer(
            batch["audio"], batch["audio_lengths"], method=self.val_decoding)]
        references = [self.tokenizer.normalizer(text) for text in batch["texts"]]
        self.val_metrics.update(references, hypotheses)
        room = self.examples_to_log - len(self._val_examples)
        self._val_examples += list(zip(references, hypotheses))[:max(0, room)]

    def on_validation_epoch_end(self) -> None:
        rates = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log("val_wer", float(rates["wer"]), prog_bar=True)
        self.log("val_cer", float(rates["cer"]))
        if not self.trainer.sanity_checking:
            for reference, hypothesis in self._val_examples:
                rank_zero_info(f"  ref: {reference}\n  hyp: {hypothesis}")
        self._val_examples = []

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's contract
        total = self.trainer.estimated_stepping_batches if self.trainer else 10_000
        total = int(total) if math.isfinite(total) else 10_000
        optimizer, scheduler = build_optimizer(self.parameters(), self.optim_config, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "step"}}
