"""The optimiser and learning-rate schedule of every asrkd run: AdamW with linear warmup,
then cosine decay to a floor (or Noam, or constant)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from asrkd.errors import ConfigError


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
            raise ConfigError(f"optim.schedule must be cosine, noam or constant: {self.schedule}")


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


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], config: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable ``parameters`` and its per-step schedule. Norms, biases and
    positional biases (parameters of fewer than 2 dimensions) are not weight-decayed."""
    decay, no_decay = [], []
    for parameter in parameters:
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=config.betas,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config, total_steps))
    return optimizer, scheduler
