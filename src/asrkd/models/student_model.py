"""Student presets: at most a quarter of the teacher's parameters, several times faster."""

from __future__ import annotations

from dataclasses import replace

from asrkd.data.audio_processing import FeatureConfig, SpecAugmentConfig
from asrkd.models.e2e_asr import ModelConfig, TokenizerConfig
from asrkd.models.encoder import FastConformerConfig
from asrkd.models.frontend import ResNet1DConfig
from asrkd.models.rnnt import RNNTConfig
from asrkd.models.transformer_decoder import TransformerDecoderConfig


def student_cpu(decoder: str = "transformer") -> ModelConfig:
    """Student of :func:`~asrkd.models.teacher_model.teacher_cpu`.

    Same features, subsampling (4x, by the same 1-D striding ResNet1D layout) and vocabulary
    (characters) as the teacher, so frame-level KD lines up; a thin frontend (96 channels),
    d96 x 6 layers, one decoder layer.

    One attention head (d_k 96): the (B, H, T, T) score tensors cost the same per head
    whatever the width, and at d96 their element-wise work (relative-position shift, bias,
    softmax) rivals the matmuls. On LJSpeech (222 s, one batch, 2 threads, fresh weights)
    CTC inference took 725 ms with four heads, 559 ms with two and 496 ms with one, same
    parameter count; with two heads the demo student measured 2.96x the teacher's RTFx,
    short of the 3x target.

    No dropout, for the reasons given in :func:`~asrkd.models.teacher_model.teacher_cpu`.
    """
    return ModelConfig(
        features=FeatureConfig(dynamic_range_db=70.0, min_std=1.0),
        frontend=ResNet1DConfig(channels=(96, 96), strides=(2, 2), kernel_size=3),
        encoder=FastConformerConfig(
            d_model=96, n_heads=1, n_layers=6, subsampling="none", subsampling_factor=1,
            dropout=0.0, dropout_pre_encoder=0.0, dropout_att=0.0,
        ),
        tokenizer=TokenizerConfig(kind="char"),
        decoder=decoder,
        transformer=TransformerDecoderConfig(d_model=None, n_heads=4, n_layers=1, ff_dim=None,
                                             dropout=0.0),
        rnnt=RNNTConfig(pred_dim=96, joint_dim=96, dropout=0.0),
        spec_augment=SpecAugmentConfig(freq_masks=2, freq_width=15, time_masks=5),
    )


def student_cpu_streaming(decoder: str = "transformer") -> ModelConfig:
    """:func:`student_cpu` made streamable, as NeMo's cache-aware FastConformer.

    Three changes, each what streaming needs and nothing more:

    - features without per-utterance statistics (``normalize: None``, no dynamic-range floor
      relative to the utterance's peak): every frame's features depend on its own 25 ms of
      audio only (NeMo's streaming models use ``normalize: NA`` for the same reason);
    - a causal frontend and causal depthwise convs in the conformer blocks: no frame reads a
      later one, so their states are the last ``kernel - 1`` frames;
    - chunked attention (``att_context_style: chunked_limited``, ``att_context: [64, 7]``):
      chunks of 8 encoder frames (320 ms of audio at the 4x frame rate of 40 ms), each seeing
      itself and the 8 chunks (2.56 s) before it.

    So a 320 ms chunk is encoded when it has arrived, with caches, at a cost that does not
    grow with what came before (:mod:`asrkd.streaming`), and the one-pass forward used in
    training computes exactly what chunk-by-chunk inference does. The CTC head decodes the
    stream; the attention decoder (trained alongside, as in :func:`student_cpu`) rescores
    finished utterances only.
    """
    base = student_cpu(decoder)
    return replace(
        base,
        features=FeatureConfig(normalize=None),
        frontend=replace(base.frontend, causal=True),
        encoder=replace(
            base.encoder,
            att_context=(64, 7),
            att_context_style="chunked_limited",
            conv_context=(base.encoder.conv_kernel - 1, 0),
        ),
    )


def student_nemo(decoder: str = "none") -> ModelConfig:
    """Student of an imported NeMo FastConformer teacher (``asrkd import-nemo``).

    NeMo's features (:meth:`FeatureConfig.nemo`, 80 mels, as every FastConformer checkpoint
    uses) and 8x time reduction, so the teacher's CTC frames and the student's line up for
    ``ctc_kl`` and ``hidden``; the tokenizer is the teacher's (KD takes it from
    ``training.teacher_checkpoint``). The 8x comes from a ResNet1D frontend with three stride-2
    stages (``ceil(L / 2)`` each, the same frame count as NeMo's dw-striding convs) and the
    encoder only projects (``subsampling: none``), as in :func:`student_cpu`. Encoder shapes of
    FastConformer-Small (d176, 16 layers, 4 heads): 12.8 M parameters with CTC over 1024
    pieces, 9x fewer than a FastConformer-Large teacher's encoder alone (112 M). CTC only by
    default (NeMo's CTC checkpoints); ``student_nemo_rnnt`` adds a transducer of NeMo-Small's
    sizes.
    """
    return ModelConfig(
        features=FeatureConfig.nemo(),
        frontend=ResNet1DConfig(channels=(176, 176, 176), strides=(2, 2, 2), kernel_size=3),
        encoder=FastConformerConfig(
            d_model=176, n_heads=4, n_layers=16, subsampling="none", subsampling_factor=1,
            dropout=0.1, dropout_pre_encoder=0.1, dropout_att=0.1,
        ),
        tokenizer=TokenizerConfig(kind="bpe", vocab_size=1024),
        decoder=decoder,
        rnnt=RNNTConfig(pred_dim=320, joint_dim=320, dropout=0.1),
        spec_augment=SpecAugmentConfig(),
    )
