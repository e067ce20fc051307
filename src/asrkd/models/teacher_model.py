"""Teacher presets: a CPU-sized teacher for the demo and the published FastConformer sizes.

Presets are functions returning a :class:`ModelConfig`; ``asrkd presets`` prints each one's
parameter count. Loading a trained teacher is :func:`load_teacher`.
"""

from __future__ import annotations

from pathlib import Path

from asrkd.data.audio_processing import FeatureConfig, SpecAugmentConfig
from asrkd.models.e2e_asr import (
    E2EASR,
    ModelConfig,
    TokenizerConfig,
    load_checkpoint,
)
from asrkd.models.encoder import FastConformerConfig
from asrkd.models.frontend import ResNet1DConfig
from asrkd.models.rnnt import RNNTConfig
from asrkd.models.transformer_decoder import TransformerDecoderConfig


def teacher_cpu(decoder: str = "transformer") -> ModelConfig:
    """~7.8 M-parameter teacher that trains in minutes on 2 CPU cores (the demo's teacher).

    FastConformer d176 x 8 layers (half of FastConformer-Small's depth), hybrid CTC + attention
    (or RNN-T) heads, characters at 4x subsampling (25 frames/s leaves room for the ~15
    characters/s of fast speech; 256 BPE pieces at 8x still emitted only "the" after 300 steps
    on the default corpus).

    The ResNet1D frontend does the 4x time reduction itself (two stages of stride 2, mel bins
    as channels) and the encoder only projects its 256 channels to d_model
    (``subsampling: none``). The earlier layout ran a stride-1 ResNet1D and then
    FastConformer's 2-D dw-striding convs over its 128 channels as if they were an ordered
    frequency axis: its 3x3 kernels slid across unordered channels and its largest tensors
    (B, T/2, 64, 128) made it the slowest part of a training step. On AN4 at equal wall-clock
    (420 s of training, lr 5e-4) validation CER fell to 37.1 % with the 1-D striding frontend
    against 51.3 % before, and each step cost 10-30 % less (docs/training-recipe.md). The
    frontend after the 2-D subsampling (``frontend_position: subsampled``) stays available.

    Features: log-mel floored 70 dB below each utterance's peak, with a std floor in the
    per-feature normalisation (see :class:`~asrkd.data.audio_processing.FeatureConfig`), so
    gain and band-limited recordings do not change what the model sees.

    No dropout: a CPU budget of minutes is a few epochs, where every model we measured was
    underfitting (validation loss at or below the augmented training loss), and dropout
    slowed both the step (by about a third in bf16) and learning per step (AN4, 583 steps:
    validation CER 13.7 % without, 19.2 % with 0.1). For runs of many epochs over a small
    corpus, set dropout 0.1 with ``training.regularization_warmup_steps`` (the AN4, FSDD and
    speechocean762 recipes do). SpecAugment stays on.
    """
    return ModelConfig(
        features=FeatureConfig(dynamic_range_db=70.0, min_std=1.0),
        frontend=ResNet1DConfig(channels=(256, 256), strides=(2, 2), kernel_size=3),
        encoder=FastConformerConfig(
            d_model=176, n_heads=4, n_layers=8, subsampling="none", subsampling_factor=1,
            dropout=0.0, dropout_pre_encoder=0.0, dropout_att=0.0,
        ),
        tokenizer=TokenizerConfig(kind="char"),
        decoder=decoder,
        # Decoder width and feed-forward size follow the encoder (d176, 4 x 176).
        transformer=TransformerDecoderConfig(d_model=None, n_heads=4, n_layers=2, ff_dim=None,
                                             dropout=0.0),
        rnnt=RNNTConfig(pred_dim=176, joint_dim=176, dropout=0.0),
        spec_augment=SpecAugmentConfig(freq_masks=2, freq_width=15, time_masks=5),
    )


def _fastconformer(d_model: int, n_layers: int, n_heads: int, decoder: str) -> ModelConfig:
    return ModelConfig(
        features=FeatureConfig(dynamic_range_db=70.0, min_std=1.0),
        frontend=ResNet1DConfig(channels=(256,), strides=(1,)),
        encoder=FastConformerConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers),
        decoder=decoder,
        transformer=TransformerDecoderConfig(d_model=None, n_heads=n_heads, n_layers=6,
                                             ff_dim=None),
        rnnt=RNNTConfig(pred_dim=640, joint_dim=640),
    )


def fastconformer_small(decoder: str = "transformer") -> ModelConfig:
    """FastConformer-Small encoder (d176, 16 layers, 4 heads: ~13 M in the encoder)."""
    return _fastconformer(176, 16, 4, decoder)


def fastconformer_medium(decoder: str = "transformer") -> ModelConfig:
    """FastConformer-Medium encoder (d256, 16 layers, 4 heads: ~30 M in the encoder)."""
    return _fastconformer(256, 16, 4, decoder)


def fastconformer_large(decoder: str = "transformer") -> ModelConfig:
    """FastConformer-Large encoder (d512, 17 layers, 8 heads: ~115 M in the encoder)."""
    return _fastconformer(512, 17, 8, decoder)


def load_teacher(path: str | Path) -> E2EASR:
    """A trained teacher from its checkpoint, frozen and in eval mode."""
    teacher = load_checkpoint(path)
    teacher.requires_grad_(False)
    return teacher.eval()
