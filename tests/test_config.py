"""The config loader: YAML 1.1 number quirks are converted to the field's type."""

from __future__ import annotations

import pytest

from asrkd.config import ConfigError, from_dict, load_yaml
from asrkd.training.optim import OptimConfig
from asrkd.training.pipeline import DataConfig, load_run_config


def test_exponent_numbers_become_floats(tmp_path):
    # PyYAML reads `5e-4` (no dot) as the string '5e-4'; AdamW would crash on it.
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  optim:\n    lr: 5e-4\n    warmup_steps: 1e2\n")
    assert load_yaml(path)["training"]["optim"]["lr"] == "5e-4"  # the quirk itself
    config = load_run_config([path], ["model.encoder.dropout=1e-1"])
    assert config.training.optim.lr == 5e-4 and isinstance(config.training.optim.lr, float)
    assert config.training.optim.warmup_steps == 100
    assert isinstance(config.training.optim.warmup_steps, int)
    assert config.model_config().encoder.dropout == pytest.approx(0.1)
    overridden = load_run_config(overrides=["training.optim.lr=3e-4"])
    assert overridden.training.optim.lr == pytest.approx(3e-4)


def test_optional_and_tuple_fields_are_coerced():
    data = from_dict(DataConfig, {"min_duration": "5e-2", "max_batch_size": 64,
                                  "speed_factors": [1, "9e-1"]})
    assert data.min_duration == pytest.approx(0.05)
    assert data.speed_factors == (1.0, 0.9)
    assert all(isinstance(x, float) for x in data.speed_factors)
    assert from_dict(OptimConfig, {"betas": ["9e-1", 0.98]}).betas == (0.9, 0.98)


def test_non_numbers_are_errors_that_name_the_key():
    with pytest.raises(ConfigError, match="'training.optim.lr' needs a number, got 'fast'"):
        load_run_config(overrides=["training.optim.lr=fast"])
    with pytest.raises(ConfigError, match="warmup_steps' needs an integer, got 2.5"):
        load_run_config(overrides=["training.optim.warmup_steps=2.5"])


def test_bf16_auto_precision_resolves_by_hardware(monkeypatch):
    from asrkd.training import trainer

    monkeypatch.setattr(trainer, "native_bf16_cpu", lambda: True)
    assert trainer.resolve_precision("bf16-auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(trainer, "native_bf16_cpu", lambda: False)
    assert trainer.resolve_precision("bf16-auto", "cpu") == "32-true"
    assert trainer.resolve_precision("16-mixed", "cpu") == "16-mixed"  # explicit values pass
    assert trainer.TRAINER_DEFAULTS["precision"] == "bf16-auto"


@pytest.mark.parametrize("preset", ["student_cpu_streaming", "student_nemo", "student_cpu"])
def test_the_base_config_keeps_each_presets_features(preset):
    """The base model_config.yaml once set features (normalize: per_feature) for every preset,
    which silently made the streaming preset's features need the whole utterance."""
    from asrkd.models.presets import get_preset

    config = load_run_config(overrides=[f"model_preset={preset}"]).model_config()
    assert config.features == get_preset(preset).features
    assert config.encoder == get_preset(preset).encoder
