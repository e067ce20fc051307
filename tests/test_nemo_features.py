"""NeMo-compatible features: ``FeatureConfig.nemo()`` against NeMo's own preprocessor.

The reference (``tests/data/nemo_features.pt``) was recorded by ``benchmarks/nemo_reference.py``
in NeMo's venv from three AN4 test utterances in ``../shared/data``; those tests skip when the
shared data is absent (a user's clone). NeMo itself is never imported here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asrkd.data.audio_processing import (
    FeatureConfig,
    LogMelFeatures,
    hz_to_mel,
    load_audio,
    mel_filterbank,
    mel_to_hz,
)
from asrkd.errors import ConfigError
from conftest import ROOT

REFERENCE = ROOT / "tests" / "data" / "nemo_features.pt"


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


def _nemo_config(reference) -> FeatureConfig:
    config = reference["config"]
    return FeatureConfig.nemo(
        n_mels=config["features"], n_fft=config["n_fft"],
        win_length_ms=1000 * config["window_size"], hop_length_ms=1000 * config["window_stride"],
    )


def test_slaney_scale_and_norm():
    # Linear at 200/3 Hz per mel up to 1 kHz (15 mel), then 27 mel per factor 6.4.
    np.testing.assert_allclose(hz_to_mel([0.0, 500.0, 1000.0, 6400.0], "slaney"),
                               [0.0, 7.5, 15.0, 42.0], atol=1e-9)
    freqs = np.array([0.0, 300.0, 999.0, 1000.0, 1001.0, 4000.0, 8000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(freqs, "slaney"), "slaney"), freqs, rtol=1e-12)
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(freqs)), freqs, rtol=1e-12)  # htk
    # Slaney normalisation: every filter has unit area in Hz (the wide ones, where the FFT bins
    # sample the triangle finely, to well under 1 %).
    fb = mel_filterbank(4096, 40, 16000, scale="slaney", norm="slaney")
    area = fb.sum(0) * (16000 / 4096)
    np.testing.assert_allclose(area[10:], 1.0, rtol=5e-3)
    with pytest.raises(ConfigError, match="mel scale"):
        FeatureConfig(mel_scale="mel")
    with pytest.raises(ConfigError, match="center_pad"):
        FeatureConfig(center_pad="edge")
    with pytest.raises(ConfigError, match="preemphasis"):
        FeatureConfig(preemphasis=1.5)


def test_filterbank_and_window_equal_nemos(reference):
    extractor = LogMelFeatures(_nemo_config(reference))
    torch.testing.assert_close(extractor.fbank, reference["fb"], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(extractor.window, reference["window"], atol=1e-7, rtol=0)


def test_features_equal_nemos_on_real_speech(reference, an4_dir):
    shared = an4_dir.parent
    extractor = LogMelFeatures(_nemo_config(reference)).eval()
    waves = [torch.from_numpy(load_audio(shared / name)) for name in reference["utterances"]]
    lengths = torch.tensor([len(w) for w in waves])
    assert torch.equal(lengths, reference["samples"])
    audio = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    features, frames = extractor(audio, lengths)
    assert torch.equal(frames, reference["frames"])  # S // hop: NeMo's valid-frame count
    for row, expected in enumerate(reference["features"]):
        got = features[row, : int(frames[row])]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert features[row, int(frames[row]):].abs().sum() == 0  # padding is zero, as NeMo's
    # Each utterance alone gives what it gives in the padded batch.
    # (Its tensor keeps the S // hop + 1 centred frames; the last is padding, zero.)
    alone, alone_frames = extractor(waves[2][None], lengths[2:])
    assert alone.shape[1] == int(frames[2]) + 1 and alone_frames.tolist() == [int(frames[2])]
    torch.testing.assert_close(alone[0, :-1], features[2, : int(frames[2])], atol=1e-5, rtol=0)
    assert alone[0, -1].abs().sum() == 0


def test_asrkd_defaults_are_unchanged_by_the_nemo_options():
    """The NeMo options default to asrkd's features, so existing checkpoints keep theirs."""
    torch.manual_seed(0)
    audio = torch.randn(2, 8000)
    lengths = torch.tensor([8000, 5000])
    default = LogMelFeatures(FeatureConfig())
    explicit = LogMelFeatures(FeatureConfig(preemphasis=None, window_periodic=True,
                                            center_pad="reflect", mel_scale="htk", mel_norm=None,
                                            count_last_frame=True, unbiased_std=False))
    a, la = default(audio, lengths)
    b, lb = explicit(audio, lengths)
    assert torch.equal(a, b) and torch.equal(la, lb) and la.tolist() == [51, 32]
    nemo, lengths_nemo = LogMelFeatures(FeatureConfig.nemo())(audio, lengths)
    assert lengths_nemo.tolist() == [50, 31]


def test_frame_level_kd_needs_frames_that_line_up():
    """A student with asrkd's features under a NeMo-featured teacher counts one frame more per
    utterance: frame-level KD refuses it, token-level KD and matching frames are fine."""
    from dataclasses import replace

    from asrkd.data.tokenizer import CharTokenizer
    from asrkd.errors import UserError
    from asrkd.losses import ASRLoss
    from asrkd.models.e2e_asr import build_model
    from asrkd.training.distillation import KDConfig, build_kd
    from test_e2e import tiny_config

    tokenizer = CharTokenizer.english()
    teacher = build_model(replace(tiny_config(), features=FeatureConfig.nemo()), tokenizer)
    student = build_model(tiny_config(), tokenizer)
    with pytest.raises(UserError, match="count_last_frame False .teacher. vs True .student."):
        build_kd(student, ASRLoss(), teacher=teacher, config=KDConfig(losses=("ctc_kl",)))
    build_kd(student, ASRLoss(), teacher=teacher, config=KDConfig(losses=("token_kl",)))
    # Other feature details (mel scale, pre-emphasis, padding) may differ: each model
    # featurises the waveform for itself.
    counted_alike = build_model(
        replace(tiny_config(), features=FeatureConfig(count_last_frame=False)), tokenizer)
    build_kd(counted_alike, ASRLoss(), teacher=teacher, config=KDConfig(losses=("ctc_kl",)))
