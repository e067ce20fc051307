"""Record NeMo's log-mel features of real speech, for tests/test_nemo_features.py.

Runs in NeMo's own venv (``benchmarks/install_nemo.sh``), never in asrkd's:

    /tmp/nemo-venv/bin/python benchmarks/nemo_reference.py [--shared ../shared/data]

It builds NeMo's ``AudioToMelSpectrogramPreprocessor`` with the settings every FastConformer
config uses (25 ms windows, 10 ms hop, 80 mels, n_fft 512, per-feature normalisation), puts it
in eval mode (dither off, as at inference) and featurises a few AN4 test utterances together in
one zero-padded batch, so the reference also covers NeMo's handling of padding. Writes
``tests/data/nemo_features.pt``: NeMo's version, the preprocessor config, the utterances (paths
relative to the shared data folder; the audio itself is not stored), their valid frame counts,
the features of each utterance's valid frames, and NeMo's mel filterbank (``fb``) and window
as stored in a ``.nemo`` checkpoint's weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
# Three test speakers (two female, one male), 0.8-4 s each: a batch with real padding.
UTTERANCES = (
    "an4/audio/test/fcaw/an406-fcaw-b.flac",
    "an4/audio/test/marh/an431-marh-b.flac",
    "an4/audio/test/fjlp/an416-fjlp-b.flac",
)
CONFIG = {
    "sample_rate": 16000,
    "window_size": 0.025,
    "window_stride": 0.01,
    "window": "hann",
    "features": 80,
    "n_fft": 512,
    "normalize": "per_feature",
    "log": True,
    "frame_splicing": 1,
    "dither": 1e-5,
    "pad_to": 0,
}


def main() -> None:
    import nemo
    from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "nemo_features.pt")
    args = parser.parse_args()

    waves = []
    for name in UTTERANCES:
        samples, rate = sf.read(str(args.shared / name), dtype="float32")
        if rate != CONFIG["sample_rate"] or samples.ndim != 1:
            raise SystemExit(f"{name}: expected 16 kHz mono, got {rate} Hz, shape {samples.shape}")
        waves.append(torch.from_numpy(samples))
    lengths = torch.tensor([len(w) for w in waves])
    audio = torch.zeros(len(waves), int(lengths.max()))
    for row, wave in enumerate(waves):
        audio[row, : len(wave)] = wave

    preprocessor = AudioToMelSpectrogramPreprocessor(**CONFIG).eval()
    with torch.no_grad():
        features, frames = preprocessor(input_signal=audio, length=lengths)  # (B, F, T)
    state = preprocessor.state_dict()
    reference = {
        "nemo_version": nemo.__version__,
        "config": CONFIG,
        "utterances": list(UTTERANCES),
        "samples": lengths,
        "frames": frames.detach().clone().long(),  # clone: NeMo tags its outputs
        "features": [features[row, :, : int(frames[row])].T.contiguous()
                     for row in range(len(waves))],  # (T_b, F) each
        "fb": state["featurizer.fb"].squeeze(0).T.contiguous().float(),  # (n_fft // 2 + 1, F)
        "window": state["featurizer.window"].float(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB): NeMo {nemo.__version__}, "
          f"frames {frames.tolist()} for samples {lengths.tolist()}")


if __name__ == "__main__":
    main()
