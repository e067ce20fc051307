"""Audio loading, log-mel features, SpecAugment and speed perturbation.

One loader (soundfile + soxr) and one feature extractor (``torch.stft`` + an HTK mel
filterbank) serve training, evaluation, inference and export. torchaudio is deliberately not
used: it has no working build for the pinned torch, and the features here match its
``MelSpectrogram(mel_scale="htk")`` to within float32 rounding.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import nn

from asrkd.errors import ConfigError, UserError

SAMPLE_RATE = 16_000
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".aiff", ".aif", ".au", ".mp3")


class AudioError(UserError):
    """Audio that cannot be read or used; the message names the file and the problem."""


def load_audio(
    path: str | Path,
    sample_rate: int = SAMPLE_RATE,
    offset: float = 0.0,
    duration: float | None = None,
) -> np.ndarray:
    """Read an audio file as mono float32 at ``sample_rate``.

    Multi-channel audio is averaged to mono; other rates are resampled with soxr (high
    quality). ``offset``/``duration`` (seconds) select a segment, as in NeMo manifests.

    Raises:
        AudioError: the file is missing, unreadable, or holds no samples.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        info = sf.info(str(path))
        start = int(round(offset * info.samplerate))
        frames = -1 if duration is None else int(round(duration * info.samplerate))
        samples, file_rate = sf.read(
            str(path), start=start, frames=frames, dtype="float32", always_2d=True
        )
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"{path}: cannot read audio ({error})") from None
    return _mono_at_rate(samples, file_rate, sample_rate, str(path))


def decode_audio(data: bytes, name: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """An encoded audio file held in memory (say, a member of a tar shard), read as
    :func:`load_audio` reads a file on disk: mono float32 at ``sample_rate``.

    Raises:
        AudioError: the bytes are not audio soundfile can read, or hold no samples;
            the message names ``name``.
    """
    try:
        samples, file_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"{name}: cannot read audio ({error})") from None
    return _mono_at_rate(samples, file_rate, sample_rate, name)


def _mono_at_rate(samples: np.ndarray, file_rate: int, sample_rate: int, name: str
                  ) -> np.ndarray:
    if samples.size == 0:
        raise AudioError(f"{name}: audio holds no samples")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if file_rate != sample_rate:
        mono = soxr.resample(mono, file_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


MEL_SCALES = ("htk", "slaney")
# Slaney's Auditory Toolbox scale (librosa's default, ``htk=False``): linear at 200/3 Hz per mel
# up to 1 kHz (15 mel), logarithmic above, 27 mel per factor 6.4.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def _check_mel_scale(scale: str) -> None:
    if scale not in MEL_SCALES:
        raise ConfigError(f"unknown mel scale {scale!r}; choose one of {', '.join(MEL_SCALES)}")


def _check_mel_norm(norm: str | None) -> None:
    if norm not in (None, "slaney"):
        raise ConfigError(f"unknown mel filter normalisation {norm!r}; choose slaney or null")


def hz_to_mel(frequency: np.ndarray | float, scale: str = "htk") -> np.ndarray:
    """Frequency in Hz on the HTK (``2595 log10(1 + f / 700)``) or Slaney mel scale."""
    _check_mel_scale(scale)
    f = np.asarray(frequency, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    linear = f / _SLANEY_HZ_PER_MEL
    above = _SLANEY_BREAK_MEL + np.log(np.maximum(f, _SLANEY_BREAK_HZ) / _SLANEY_BREAK_HZ) / (
        _SLANEY_LOG_STEP)
    return np.where(f >= _SLANEY_BREAK_HZ, above, linear)


def mel_to_hz(mel: np.ndarray | float, scale: str = "htk") -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    _check_mel_scale(scale)
    m = np.asarray(mel, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    linear = m * _SLANEY_HZ_PER_MEL
    above = _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOG_STEP * (np.maximum(m, _SLANEY_BREAK_MEL)
                                                          - _SLANEY_BREAK_MEL))
    return np.where(m >= _SLANEY_BREAK_MEL, above, linear)


def mel_filterbank(
    n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None,
    scale: str = "htk", norm: str | None = None,
) -> np.ndarray:
    """Triangular mel filters, shape ``(n_fft // 2 + 1, n_mels)``.

    ``scale="htk", norm=None`` is torchaudio's ``melscale_fbanks(norm=None, mel_scale="htk")``;
    ``scale="slaney", norm="slaney"`` is ``librosa.filters.mel`` with its defaults (NeMo's
    filterbank): each filter scaled by ``2 / (its upper edge - its lower edge in Hz)``, i.e. to
    constant energy per Hz.
    """
    _check_mel_norm(norm)
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_points = np.linspace(hz_to_mel(f_min, scale), hz_to_mel(f_max, scale), n_mels + 2)
    hz_points = mel_to_hz(mel_points, scale)
    widths = np.diff(hz_points)  # (n_mels + 1,)
    slopes = hz_points[None, :] - fft_freqs[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    if norm == "slaney":
        filters = filters * (2.0 / (hz_points[2:] - hz_points[:-2]))[None, :]
    return filters.astype(np.float32)


@dataclass(frozen=True)
class FeatureConfig:
    """Log-mel settings (the NeMo / Kaldi defaults for 16 kHz ASR)."""

    sample_rate: int = SAMPLE_RATE
    n_mels: int = 80
    win_length_ms: float = 25.0
    hop_length_ms: float = 10.0
    n_fft: int = 512
    f_min: float = 0.0
    f_max: float | None = None
    log_floor: float = 1e-6
    # "per_feature": each mel bin to zero mean and unit variance over the utterance (NeMo's
    # default); "all_features": one mean and variance over every bin and frame of the
    # utterance (NeMo's all_features), which keeps the utterance's average spectral shape;
    # None: raw log-mel.
    normalize: str | None = "per_feature"
    dither: float = 0.0
    # Floor every mel power at this many dB below the utterance's loudest bin (None: only the
    # absolute ``log_floor``). Makes the features independent of the recording's gain, and
    # turns bins with no signal (8 kHz audio upsampled to 16 kHz has none above 4 kHz) into a
    # constant that per-feature normalisation maps to zero, instead of blowing their
    # resampling noise up to unit variance. Presets use 70 dB: the empty 4-8 kHz bins of FSDD's
    # upsampled recordings sit at a median 83 dB below the peak (70 dB clamps nearly all of
    # them, 80 dB about half), while 70 dB clamps 3 % of AN4's bins and 12 % of
    # speechocean762's (mostly silence); Whisper's log-mel uses 80 dB.
    dynamic_range_db: float | None = None
    # Per-feature normalisation divides by max(std, min_std) (natural-log units; 1.0 is 4.3 dB).
    # A bin that sits at the floor with a rare frame just above it has a tiny std, and dividing
    # by it would turn those frames into spikes of 5+ (seen on FSDD's empty 4-8 kHz bins).
    # Speech bins vary by 2-3 units, so the floor leaves them alone. Presets use 1.0.
    min_std: float = 0.0
    # Where NeMo's AudioToMelSpectrogramPreprocessor differs (FeatureConfig.nemo() sets them all,
    # with log_floor 2**-24): the defaults are asrkd's, NeMo's value is in brackets.
    preemphasis: float | None = None  # y[t] = x[t] - a x[t-1], zero past each length [0.97]
    window_periodic: bool = True  # Hann window; False: symmetric [False]
    center_pad: str = "reflect"  # how centred frames are padded at both ends ["constant": zeros]
    mel_scale: str = "htk"  # ["slaney"]
    mel_norm: str | None = None  # ["slaney": each filter to constant energy per Hz]
    # An utterance of S samples gives S // hop + 1 centred frames; NeMo counts the last one as
    # padding (S // hop valid frames) [False].
    count_last_frame: bool = True
    unbiased_std: bool = False  # per-feature std over n - 1 frames instead of n [True]

    def __post_init__(self) -> None:
        _check_mel_scale(self.mel_scale)
        if self.center_pad not in ("reflect", "constant"):
            raise ConfigError(f"features.center_pad must be reflect or constant, got "
                              f"{self.center_pad!r}")
        _check_mel_norm(self.mel_norm)
        if self.preemphasis is not None and not 0.0 <= self.preemphasis < 1.0:
            raise ConfigError(f"features.preemphasis must be in [0, 1), got {self.preemphasis}")

    @classmethod
    def nemo(cls, **changes: object) -> FeatureConfig:
        """The features of NeMo's ``AudioToMelSpectrogramPreprocessor`` with its defaults
        (80 mels, 25/10 ms, n_fft 512, per-feature normalisation, dither off as at inference),
        which NeMo's FastConformer models use; ``changes`` set other fields (such as a model
        config's n_mels). Matches NeMo 3.0's features to 4e-6 on AN4 speech
        (``tests/test_nemo_features.py``)."""
        nemo = {"preemphasis": 0.97, "window_periodic": False, "center_pad": "constant",
                "mel_scale": "slaney", "mel_norm": "slaney", "count_last_frame": False,
                "unbiased_std": True, "log_floor": 2.0**-24, "normalize": "per_feature",
                "dynamic_range_db": None, "min_std": 0.0}
        return cls(**{**nemo, **changes})

    @property
    def win_length(self) -> int:
        return int(round(self.sample_rate * self.win_length_ms / 1000))

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate * self.hop_length_ms / 1000))


def reflect_pad_per_utterance(
    audio: torch.Tensor, lengths: torch.Tensor, pad: int
) -> torch.Tensor:
    """Reflect-pad each row at its own end, as ``center=True`` would for the row alone.

    A batched ``torch.stft(center=True)`` reflects at the end of the padded tensor, so the last
    frames of a short utterance would see the batch's zero padding instead of its own samples.
    Reflecting at each row's own end keeps every utterance's features independent of what it
    is batched with.

    Args:
        audio: (B, S) waveforms. lengths: (B,) valid samples. pad: samples added on each side.

    Returns:
        (B, S + 2 * pad): row b holds ``pad`` reflected samples, its ``lengths[b]`` samples,
        ``pad`` reflected samples, then zeros.
    """
    batch, samples = audio.shape
    positions = torch.arange(samples, device=audio.device)
    audio = audio * (positions[None, :] < lengths[:, None])  # whatever the padding held
    if torch.onnx.is_in_onnx_export() or int(lengths.min()) <= pad:
        # Exported graphs (no data-dependent branch) and rows shorter than the padding, which
        # reflect more than once: gather every output sample from its reflected source.
        index = torch.arange(-pad, samples + pad, device=audio.device).expand(batch, -1)
        last = (lengths - 1).clamp(min=0)[:, None]
        source = index.abs()  # reflect at the start
        source = torch.where(source > last, 2 * last - source, source)  # reflect at each end
        valid = (source >= 0) & (source <= last) & (index < last + 1 + pad)
        return audio.gather(1, source.clamp(0, samples - 1)) * valid
    # Every row is longer than the padding: only 2 * pad samples per row need moving, which
    # is ~20x cheaper than gathering all of them (this was a quarter of log-mel's time).
    out = torch.nn.functional.pad(audio, (pad, pad))
    out[:, :pad] = audio[:, 1 : pad + 1].flip(1)
    offsets = torch.arange(pad, device=audio.device)[None, :]
    tail = audio.gather(1, lengths[:, None] - 2 - offsets)  # x[L-2], x[L-3], ...
    return out.scatter_(1, lengths[:, None] + pad + offsets, tail)


def _dft_pairs(window: torch.Tensor, n_fft: int) -> torch.Tensor:
    """The windowed one-sided DFT of ``torch.stft`` restricted to the window's support: a
    (2 * (n_fft // 2 + 1), win_length) matrix whose rows alternate real and imaginary parts;
    column j is sample ``(n_fft - win_length) // 2 + j`` of an ``n_fft`` frame, where
    ``torch.stft`` centres a shorter window.

    Built from the window with integer and float32 ops in the traced forward; the exporter
    folds them into one constant (0.8 MB at n_fft 512, measured in the file).
    """
    start = (n_fft - window.shape[0]) // 2
    n = torch.arange(start, start + window.shape[0], device=window.device)
    k = torch.arange(n_fft // 2 + 1, device=window.device)[:, None]
    # (k * n) mod n_fft in integers: exact angles in [0, 2 pi) however large k * n gets.
    angle = ((k * n) % n_fft).float() * (2 * math.pi / n_fft)
    basis = torch.stack([torch.cos(angle), -torch.sin(angle)], dim=1) * window  # (F, 2, win)
    return basis.reshape(-1, window.shape[0])


class LogMelFeatures(nn.Module):
    """Batched, length-aware log-mel spectrogram.

    Frames are centred (reflect padding, per utterance), as in torchaudio and NeMo, so an
    utterance of S samples gives ``S // hop + 1`` frames. Padded frames are zeroed and
    excluded from the per-utterance normalisation, so a batch's padding does not change any
    utterance.
    """

    def __init__(self, config: FeatureConfig = FeatureConfig()) -> None:
        super().__init__()
        self.config = config
        # float32 STFT, as torchaudio and NeMo: its round-off reaches 4e-4 in the log-mel of
        # quiet bins of loud frames (mean 2e-6 on LJSpeech), far below anything a recogniser
        # resolves; float64 kept 1e-7 but doubled the cost of the features, a third of the
        # student's inference time.
        window = torch.hann_window(config.win_length, periodic=config.window_periodic)
        self.register_buffer("window", window, persistent=False)
        fbank = mel_filterbank(
            config.n_fft, config.n_mels, config.sample_rate, config.f_min, config.f_max,
            scale=config.mel_scale, norm=config.mel_norm,
        )
        self.register_buffer("fbank", torch.from_numpy(fbank), persistent=False)
        self.register_buffer(
            "fbank_pairs", torch.from_numpy(fbank).repeat_interleave(2, dim=0), persistent=False
        )

    @property
    def frame_rate(self) -> float:
        return self.config.sample_rate / self.config.hop_length

    def output_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames for ``sample_lengths`` samples: ``S // hop + 1`` centred frames, or
        ``S // hop`` with ``count_last_frame=False``."""
        frames = torch.div(sample_lengths, self.config.hop_length, rounding_mode="floor")
        return frames + 1 if self.config.count_last_frame else frames

    def mel_power(self, audio: torch.Tensor) -> torch.Tensor:
        """Mel power of every whole ``n_fft`` frame, ``hop`` apart, of already padded audio.

        Args:
            audio: (B, S) float waveforms, centre padding included.

        Returns:
            (B, (S - n_fft) // hop + 1, n_mels), before the log.
        """
        config = self.config
        # |X|^2 = re^2 + im^2 is folded into the mel matmul: interleaved (re, im) pairs meet a
        # filterbank with every row doubled, which is much cheaper than strided .real/.imag
        # views or a sum over a size-2 axis.
        if torch.onnx.is_in_onnx_export():
            # onnxruntime's STFT was a quarter of an exported student's time (a DFT per frame:
            # 11 of 40 ms for 10 s on one thread); the same windowed DFT as one strided
            # convolution is a GEMM.
            # Only the window's support is multiplied (400 of 512 samples by default).
            start = (config.n_fft - config.win_length) // 2
            end = audio.shape[1] - (config.n_fft - config.win_length - start)
            pairs = torch.nn.functional.conv1d(
                audio[:, None, start:end], _dft_pairs(self.window, config.n_fft)[:, None],
                stride=config.hop_length,
            ).transpose(1, 2)  # (B, T, 2F)
        else:
            spec = torch.stft(
                audio,
                n_fft=config.n_fft,
                hop_length=config.hop_length,
                win_length=config.win_length,
                window=self.window,
                center=False,
                return_complex=True,
            )  # (B, F, T)
            batch, bins, frames = spec.shape
            pairs = torch.view_as_real(spec.transpose(1, 2)).reshape(batch, frames, 2 * bins)
        return torch.matmul(pairs.square(), self.fbank_pairs)  # (B, T, n_mels)

    def forward(
        self, audio: torch.Tensor, audio_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute features.

        Args:
            audio: (B, S) float waveforms, zero padded.
            audio_lengths: (B,) valid samples per utterance.

        Returns:
            features (B, T, n_mels) and frame lengths (B,).
        """
        config = self.config
        audio = audio.float()
        if config.dither > 0 and self.training:
            audio = audio + config.dither * torch.randn_like(audio)
        if config.preemphasis is not None or config.center_pad == "constant":
            # Zero past each length: what the padding held never enters the frames.
            positions = torch.arange(audio.shape[1], device=audio.device)
            valid = positions[None, :] < audio_lengths[:, None]
            audio = audio * valid
            if config.preemphasis is not None:
                audio = torch.cat([audio[:, :1], audio[:, 1:] - config.preemphasis * audio[:, :-1]],
                                  dim=1) * valid
        pad = config.n_fft // 2
        if config.center_pad == "constant":
            audio = torch.nn.functional.pad(audio, (pad, pad))
        else:
            audio = reflect_pad_per_utterance(audio, audio_lengths, pad)
        mel = self.mel_power(audio)  # (B, T, n_mels)
        lengths = self.output_lengths(audio_lengths).clamp(max=mel.shape[1])
        frame_mask = (
            torch.arange(mel.shape[1], device=audio.device)[None, :] < lengths[:, None]
        ).unsqueeze(-1)  # (B, T, 1)
        if config.dynamic_range_db is not None:
            # The loudest bin of each utterance's valid frames (padding is zero and would not
            # raise it anyway); a silent utterance floors at a tiny constant.
            peak = (mel * frame_mask).amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
            floor = (peak * 10.0 ** (-config.dynamic_range_db / 10)).clamp(min=1e-20)
            features = torch.log(torch.maximum(mel, floor))
        else:
            features = torch.log(mel + config.log_floor)
        if config.normalize == "per_feature":
            count = lengths.clamp(min=1).to(features.dtype)[:, None, None]
            mean = (features * frame_mask).sum(1, keepdim=True) / count
            dof = (count - 1).clamp(min=1) if config.unbiased_std else count
            var = ((features - mean).square() * frame_mask).sum(1, keepdim=True) / dof
            std = var.sqrt().clamp(min=config.min_std)
            features = (features - mean) / (std + 1e-5)
        elif config.normalize == "all_features":
            count = (lengths.clamp(min=1) * features.shape[2]).to(features.dtype)[:, None, None]
            mean = (features * frame_mask).sum((1, 2), keepdim=True) / count
            dof = (count - 1).clamp(min=1) if config.unbiased_std else count
            var = ((features - mean).square() * frame_mask).sum((1, 2), keepdim=True) / dof
            std = var.sqrt().clamp(min=config.min_std)
            features = (features - mean) / (std + 1e-5)
        elif config.normalize is not None:
            raise ConfigError(f"unknown feature normalisation {config.normalize!r}")
        return features * frame_mask, lengths


@dataclass(frozen=True)
class SpecAugmentConfig:
    """Masks as in NeMo's FastConformer recipes; time masks scale with utterance length."""

    freq_masks: int = 2
    freq_width: int = 27
    time_masks: int = 10
    time_width: float = 0.05  # fraction of the utterance's frames


class SpecAugment(nn.Module):
    """Frequency and time masking (Park et al. 2019), respecting each utterance's length.

    Active only in training mode. Masked values are set to zero, which is the mean of
    normalised features. ``strength`` (0..1, default 1) scales the mask widths; a training
    schedule may raise it from 0 (see ``RegularizationWarmup``).
    """

    def __init__(self, config: SpecAugmentConfig = SpecAugmentConfig()) -> None:
        super().__init__()
        self.config = config
        self.strength = 1.0

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Args: features (B, T, F), lengths (B,). Returns masked features (B, T, F)."""
        if not self.training:
            return features
        batch, frames, bins = features.shape
        config = self.config
        device = features.device
        keep = torch.ones(batch, frames, bins, dtype=torch.bool, device=device)
        bin_index = torch.arange(bins, device=device)
        frame_index = torch.arange(frames, device=device)
        freq_width = int(round(config.freq_width * self.strength))
        for _ in range(config.freq_masks):
            width = torch.randint(0, freq_width + 1, (batch, 1), device=device)
            start = (torch.rand(batch, 1, device=device) * (bins - width + 1)).long()
            band = (bin_index >= start) & (bin_index < start + width)  # (B, F)
            keep &= ~band[:, None, :]
        max_width = (lengths.float() * config.time_width * self.strength).long().clamp(min=0)
        for _ in range(config.time_masks):
            width = (torch.rand(batch, device=device) * (max_width + 1).float()).long()
            start = (torch.rand(batch, device=device) * (lengths - width + 1).float()).long()
            span = (frame_index >= start[:, None]) & (frame_index < (start + width)[:, None])
            keep &= ~span[:, :, None]
        return features * keep


def speed_perturb(audio: np.ndarray, factor: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Change speed and pitch by ``factor`` (Ko et al. 2015) by resampling.

    Playing the waveform resampled from ``sample_rate * factor`` to ``sample_rate`` makes it
    ``factor`` times faster (shorter).
    """
    if math.isclose(factor, 1.0):
        return audio
    return soxr.resample(audio, sample_rate * factor, sample_rate, quality="HQ").astype(
        np.float32
    )
