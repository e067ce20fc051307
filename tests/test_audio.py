"""Audio loading, log-mel against an independent numpy reference, SpecAugment, speed."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from asrkd.data.audio_processing import (
    AudioError,
    FeatureConfig,
    LogMelFeatures,
    SpecAugment,
    load_audio,
    speed_perturb,
)


def numpy_log_mel(audio: np.ndarray, sample_rate: int = 16000, n_mels: int = 80) -> np.ndarray:
    """Reference written from the definitions: centred frames with reflect padding, periodic
    Hann window zero-padded to n_fft, explicit DFT matrix, HTK triangular filters, log."""
    n_fft, win, hop = 512, 400, 160
    x = np.pad(audio.astype(np.float64), (n_fft // 2, n_fft // 2), mode="reflect")
    n_frames = 1 + (len(x) - n_fft) // hop
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    padded_window = np.zeros(n_fft)
    left = (n_fft - win) // 2
    padded_window[left : left + win] = window
    frames = np.stack([x[i * hop : i * hop + n_fft] for i in range(n_frames)]) * padded_window
    k = np.arange(n_fft // 2 + 1)[:, None]
    n = np.arange(n_fft)[None, :]
    dft = np.exp(-2j * np.pi * k * n / n_fft)  # (F, n_fft)
    power = np.abs(frames @ dft.T) ** 2  # (T, F)

    def mel(f):
        return 2595 * np.log10(1 + f / 700)

    def hz(m):
        return 700 * (10 ** (m / 2595) - 1)

    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    edges = hz(np.linspace(mel(0), mel(sample_rate / 2), n_mels + 2))
    fbank = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        lo, centre, hi = edges[m], edges[m + 1], edges[m + 2]
        rising = (freqs - lo) / (centre - lo)
        falling = (hi - freqs) / (hi - centre)
        fbank[:, m] = np.clip(np.minimum(rising, falling), 0, None)
    return np.log(power @ fbank + 1e-6)


@pytest.mark.parametrize("exported", [False, True], ids=["stft", "onnx_dft_conv"])
def test_log_mel_matches_numpy_reference_on_real_speech(ljspeech_dir, exported, monkeypatch):
    """Eager features (torch.stft) and the exported graph's (the windowed DFT as a strided
    convolution, see LogMelFeatures.forward) against the same reference."""
    if exported:
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    audio = load_audio(ljspeech_dir / "wav" / "LJ001-0002.wav")
    extractor = LogMelFeatures(FeatureConfig(normalize=None))
    features, lengths = extractor(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
    reference = numpy_log_mel(audio)
    assert features.shape[1] == reference.shape[0] == int(lengths[0])
    error = np.abs(features[0].double().numpy() - reference)
    # float32 FFT round-off (as in torchaudio and NeMo): 4e-4 at worst in quiet bins of loud
    # frames, 2e-6 on average.
    assert error.max() < 1e-3, error.max()
    assert error.mean() < 1e-5, error.mean()


@pytest.mark.parametrize("n_fft", [400, 512, 1024])
def test_exported_dft_conv_matches_stft(n_fft, monkeypatch):
    """Window as long as n_fft, centred in a longer one, and an odd offset (1024 - 400 = 624
    samples of zeros split 312/312; 512: 56/56), on a batch with per-row lengths."""
    extractor = LogMelFeatures(FeatureConfig(n_fft=n_fft, normalize=None))
    audio = torch.randn(3, 8000, generator=torch.Generator().manual_seed(n_fft))
    lengths = torch.tensor([8000, 5001, 1234])
    eager, eager_lengths = extractor(audio, lengths)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    exported, exported_lengths = extractor(audio, lengths)
    assert torch.equal(eager_lengths, exported_lengths)
    torch.testing.assert_close(exported, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(40))
def test_per_utterance_reflect_padding_matches_definition(seed):
    """Both code paths (rows longer than the padding, and rows that reflect more than once)
    against the definition: reflect at the row's start and at its own end, zeros after."""
    from asrkd.data.audio_processing import reflect_pad_per_utterance

    g = torch.Generator().manual_seed(seed)
    batch, samples = int(torch.randint(1, 5, (1,), generator=g)), int(
        torch.randint(2, 600, (1,), generator=g)
    )
    pad = int(torch.randint(1, 200, (1,), generator=g))
    lengths = torch.randint(1, samples + 1, (batch,), generator=g)
    lengths[0] = samples
    audio = torch.randn(batch, samples, generator=g)
    expected = torch.zeros(batch, samples + 2 * pad)
    for b, length in enumerate(lengths.tolist()):
        for i in range(-pad, length + pad):
            source = abs(i)
            if source > length - 1:
                source = 2 * (length - 1) - source
            if 0 <= source < length:
                expected[b, i + pad] = audio[b, source]
    assert torch.equal(reflect_pad_per_utterance(audio, lengths, pad), expected)


def test_log_mel_is_padding_invariant_and_batched(ljspeech_dir):
    short = load_audio(ljspeech_dir / "wav" / "LJ001-0002.wav")
    long = load_audio(ljspeech_dir / "wav" / "LJ001-0001.wav")
    extractor = LogMelFeatures()
    alone, alone_len = extractor(torch.from_numpy(short)[None], torch.tensor([len(short)]))
    batch = torch.zeros(2, len(long))
    batch[0, : len(short)] = torch.from_numpy(short)
    batch[1] = torch.from_numpy(long)
    feats, lengths = extractor(batch, torch.tensor([len(short), len(long)]))
    assert int(lengths[0]) == int(alone_len[0])
    torch.testing.assert_close(feats[0, : lengths[0]], alone[0], atol=1e-4, rtol=1e-4)
    assert feats[0, lengths[0] :].abs().max() == 0
    # per-feature normalisation: zero mean, unit variance on valid frames
    valid = feats[1, : lengths[1]]
    assert valid.mean(0).abs().max() < 1e-3
    assert (valid.std(0, unbiased=False) - 1).abs().max() < 1e-2


def test_load_audio_resamples_and_downmixes(tmp_path, fsdd_dir):
    audio = load_audio(fsdd_dir / "wav" / "0_george_0.wav")  # 8 kHz file
    info = sf.info(str(fsdd_dir / "wav" / "0_george_0.wav"))
    assert info.samplerate == 8000
    assert abs(len(audio) - 2 * info.frames) <= 2
    tone = np.sin(2 * np.pi * 440 * np.arange(48000) / 48000).astype(np.float32)
    stereo = np.stack([tone, 0.5 * tone], axis=1)
    sf.write(tmp_path / "stereo48k.wav", stereo, 48000, subtype="PCM_24")
    mono = load_audio(tmp_path / "stereo48k.wav")
    assert mono.ndim == 1 and abs(len(mono) - 16000) <= 2
    assert abs(np.abs(mono).max() - 0.75) < 0.02


def test_load_audio_reports_bad_files(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "nope.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunkjunkjunk")
    with pytest.raises(AudioError, match="junk.wav: cannot read audio"):
        load_audio(tmp_path / "junk.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="no samples"):
        load_audio(tmp_path / "empty.wav")


def test_spec_augment_masks_only_valid_frames_in_training():
    torch.manual_seed(0)
    features = torch.randn(3, 200, 80)
    lengths = torch.tensor([200, 120, 50])
    features[1, 120:] = 0
    features[2, 50:] = 0
    augment = SpecAugment()
    augment.eval()
    assert torch.equal(augment(features, lengths), features)
    augment.train()
    masked = augment(features, lengths)
    assert (masked == 0).float().mean() > (features == 0).float().mean()
    # time masks never exceed the time_width fraction of each utterance per mask
    for row, length in enumerate(lengths.tolist()):
        zero_frames = (masked[row, :length] == 0).all(dim=1).sum().item()
        assert zero_frames <= augment.config.time_masks * int(length * 0.05) + 1


def test_speed_perturb_changes_duration():
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    assert abs(len(speed_perturb(audio, 1.1)) - 16000 / 1.1) < 3
    assert abs(len(speed_perturb(audio, 0.9)) - 16000 / 0.9) < 3
    assert speed_perturb(audio, 1.0) is audio


def test_dynamic_range_floor_makes_features_gain_invariant_and_empty_bands_zero(fsdd_dir):
    # An 8 kHz recording upsampled to 16 kHz has no signal above 4 kHz, and FSDD's test speaker
    # is 13 dB quieter than the others: with an absolute floor both change the features.
    audio = torch.from_numpy(load_audio(fsdd_dir / "wav" / "0_george_0.wav"))
    quiet = audio * 10 ** (-20 / 20)
    lengths = torch.tensor([len(audio)])
    absolute = LogMelFeatures(FeatureConfig())
    relative = LogMelFeatures(FeatureConfig(dynamic_range_db=70.0, min_std=1.0))
    loud_abs, _ = absolute(audio[None], lengths)
    quiet_abs, _ = absolute(quiet[None], lengths)
    assert (loud_abs - quiet_abs).abs().max() > 0.5  # the absolute floor is not gain-invariant
    loud, _ = relative(audio[None], lengths)
    soft, _ = relative(quiet[None], lengths)
    torch.testing.assert_close(loud, soft, atol=2e-3, rtol=0)
    above_4k = slice(66, 80)  # HTK mel bins whose centres lie above 4 kHz (80 bins, 0-8 kHz)
    assert loud_abs[0, :, above_4k].std(0).mean() > 0.9  # noise blown up to unit variance
    assert loud[0, :, above_4k].std(0).mean() < 0.6  # mostly at the floor (edge clicks remain)
    # Padding invariance holds with the per-utterance floor, and silence stays finite.
    batch = torch.zeros(2, len(audio) + 4000)
    batch[0, : len(audio)] = audio
    feats, out_lengths = relative(batch, torch.tensor([len(audio), 0]))
    torch.testing.assert_close(feats[0, : out_lengths[0]], loud[0], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(feats).all()


def test_all_features_normalisation_keeps_the_spectral_shape(fsdd_dir):
    # One mean and variance per utterance (NeMo's all_features): gain-invariant like
    # per_feature, padding-invariant, but the utterance's average spectrum survives; with
    # per_feature every bin averages to zero, so a one-word recording loses its vowel's shape.
    audio = torch.from_numpy(load_audio(fsdd_dir / "wav" / "2_george_0.wav"))
    lengths = torch.tensor([len(audio)])
    config = FeatureConfig(dynamic_range_db=70.0, min_std=1.0, normalize="all_features")
    features = LogMelFeatures(config)
    loud, _ = features(audio[None], lengths)
    soft, _ = features(audio[None] * 0.1, lengths)
    torch.testing.assert_close(loud, soft, atol=2e-3, rtol=0)
    assert abs(loud.mean().item()) < 1e-4 and abs(loud.std(unbiased=False).item() - 1) < 1e-3
    profile = loud[0].mean(0)  # average over frames, per mel bin
    assert profile.std() > 0.5  # the spectral envelope is kept ...
    per_feature = LogMelFeatures(FeatureConfig(dynamic_range_db=70.0, min_std=1.0))
    assert per_feature(audio[None], lengths)[0][0].mean(0).abs().max() < 1e-4  # ... not here
    batch = torch.zeros(2, len(audio) + 4000)
    batch[0, : len(audio)] = audio
    feats, out_lengths = features(batch, torch.tensor([len(audio), 0]))
    torch.testing.assert_close(feats[0, : out_lengths[0]], loud[0], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(feats).all()
