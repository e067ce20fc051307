"""Registry of model presets by name (configs refer to presets by these names)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from asrkd.errors import UserError
from asrkd.models.e2e_asr import ModelConfig
from asrkd.models.student_model import student_cpu, student_cpu_streaming, student_nemo
from asrkd.models.teacher_model import (
    fastconformer_large,
    fastconformer_medium,
    fastconformer_small,
    teacher_cpu,
)

PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "teacher_cpu": teacher_cpu,
    "teacher_cpu_rnnt": partial(teacher_cpu, "rnnt"),
    "student_cpu": student_cpu,
    "student_cpu_rnnt": partial(student_cpu, "rnnt"),
    "student_cpu_streaming": student_cpu_streaming,
    "student_cpu_streaming_rnnt": partial(student_cpu_streaming, "rnnt"),
    "student_nemo": student_nemo,
    "student_nemo_rnnt": partial(student_nemo, "rnnt"),
    "fastconformer_small": fastconformer_small,
    "fastconformer_small_rnnt": partial(fastconformer_small, "rnnt"),
    "fastconformer_medium": fastconformer_medium,
    "fastconformer_medium_rnnt": partial(fastconformer_medium, "rnnt"),
    "fastconformer_large": fastconformer_large,
    "fastconformer_large_rnnt": partial(fastconformer_large, "rnnt"),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]()
