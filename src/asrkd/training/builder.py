"""From a run configuration to what the Trainer fits: the model, its objective and the
:class:`~asrkd.modelmodule.ModelModule` that holds them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from asrkd.config import to_dict
from asrkd.data.tokenizer import Tokenizer
from asrkd.errors import ConfigError, UserError
from asrkd.losses import ASRLoss, Supervised
from asrkd.modelmodule import ModelModule
from asrkd.models.e2e_asr import E2EASR, ModelConfig, build_model
from asrkd.models.teacher_model import load_teacher
from asrkd.training.distillation import build_kd
from asrkd.training.teacher_cache import TeacherCache
from asrkd.training.teacher_shards import ShardedTeacherCache, is_sharded_cache

if TYPE_CHECKING:
    from torch import nn

    from asrkd.training.pipeline import TrainingConfig


def build_objective(model: E2EASR, training: TrainingConfig,
                    teacher_checkpoint: str | None = None,
                    teacher_cache: str | None = None,
                    speed_factors: Sequence[float] = ()) -> nn.Module:
    """``training`` (a ``TrainingConfig``) as an objective over ``model``: its supervised loss,
    or a KDWrapper distilling the teacher of ``teacher_checkpoint`` (or the posteriors of
    ``teacher_cache``, in which case the teacher is never loaded) into it. ``speed_factors``
    (the training set's ``data.speed_factors``) must all be in a teacher cache."""
    asr_loss = ASRLoss(training.asr_loss)
    if not training.use_kd:
        return Supervised(model, asr_loss)
    if teacher_cache is not None:
        cache = (ShardedTeacherCache(teacher_cache) if is_sharded_cache(teacher_cache)
                 else TeacherCache(teacher_cache))
        cache.check_speed_factors(speed_factors)
        return build_kd(model, asr_loss, training.kd, teacher_cache=cache,
                        distil_final_output=training.distil_final_output)
    if teacher_checkpoint is None:
        raise ConfigError("use_kd needs training.teacher_checkpoint (a trained teacher)")
    teacher = load_teacher(teacher_checkpoint)
    if teacher.tokenizer.to_dict() != model.tokenizer.to_dict():
        raise UserError(
            "teacher and student tokenizers differ: distil with the teacher's tokenizer "
            f"(vocabulary {teacher.vocab_size} vs {model.vocab_size})"
        )
    return build_kd(model, asr_loss, training.kd, teacher=teacher,
                    distil_final_output=training.distil_final_output)


def build_module(model_config: ModelConfig, tokenizer: Tokenizer, training: TrainingConfig,
                 teacher_checkpoint: str | None = None, teacher_cache: str | None = None,
                 examples_to_log: int = 3, speed_factors: Sequence[float] = ()) -> ModelModule:
    """The ModelModule of one run (paths already resolved). Its saved hyper-parameters are
    plain containers, so Lightning checkpoints load with ``weights_only=True``, and hold what
    a resume is checked against (model config, tokenizer, use_kd). ``speed_factors``: the
    training set's, checked against a teacher cache."""
    model = build_model(model_config, tokenizer)
    objective = build_objective(model, training, teacher_checkpoint, teacher_cache,
                                speed_factors)
    hparams = {
        "model_config": to_dict(model_config),
        "tokenizer": tokenizer.to_dict(),
        "use_kd": training.use_kd,
        "teacher_checkpoint": teacher_checkpoint,
        "kd_config": to_dict(training.kd),
        "asr_loss": to_dict(training.asr_loss),
        "optim": to_dict(training.optim),
        "val_decoding": training.val_decoding,
        "distil_final_output": training.distil_final_output,
        "examples_to_log": examples_to_log,
        "teacher_cache": teacher_cache,
        "max_bad_batches_in_a_row": training.max_bad_batches_in_a_row,
    }
    return ModelModule(model, objective, training.optim, training.val_decoding,
                       examples_to_log, hparams)
