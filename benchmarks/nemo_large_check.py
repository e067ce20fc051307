"""``asrkd import-nemo`` at a realistic size: a random-weight FastConformer-Large CTC model.

Two steps, in two venvs (NeMo's, ``benchmarks/install_nemo.sh``, and asrkd's)::

    /tmp/nemo-venv/bin/python benchmarks/nemo_large_check.py make /tmp/nemo-large
    .venv/bin/python benchmarks/nemo_large_check.py check /tmp/nemo-large

``make`` builds NeMo's ``EncDecCTCModelBPE`` with FastConformer-Large's encoder (d_model 512,
17 layers, 8 heads, conv kernel 9, 8x dw-striding subsampling with 256 channels, 80 mels) and
a BPE-128 tokenizer of the AN4 training transcripts, randomises what NeMo initialises to
constants (batch-norm statistics, biases, positional biases), saves ``large.nemo`` (~470 MB)
and records NeMo's encoder output and CTC log-probs on one AN4 test utterance. ``check``
imports the file and prints the largest differences on the valid frames (the tiny fixtures of
``tests/test_nemo_import.py`` test every option; this measures float32 drift through a
realistic depth and the import's time and memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
UTTERANCE = "an4/audio/test/fcaw/an406-fcaw-b.flac"  # 4.0 s
LARGE = {"n_layers": 17, "d_model": 512, "n_heads": 8, "subsampling_conv_channels": 256,
         "feat_in": 80, "att_context_size": [-1, -1]}


def make(out: Path, shared: Path) -> None:
    import soundfile as sf
    from nemo.collections.asr.models import EncDecCTCModelBPE
    from nemo_fixtures import ENCODER, PREPROCESSOR, _config, _perturb, _tokenizer
    from omegaconf import OmegaConf

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _tokenizer(shared, Path(tmp), vocab=128)
        torch.manual_seed(0)
        config = _config("ctc", {**ENCODER, **LARGE}, Path(tmp))
        config["preprocessor"] = {**PREPROCESSOR, "features": 80}
        model = EncDecCTCModelBPE(cfg=OmegaConf.create(config)).eval()
        _perturb(model, 0)
        model.save_to(str(out / "large.nemo"))
    model = EncDecCTCModelBPE.restore_from(str(out / "large.nemo"), map_location="cpu").eval()
    wave = torch.from_numpy(sf.read(str(shared / UTTERANCE), dtype="float32")[0])[None]
    length = torch.tensor([wave.shape[1]])
    with torch.no_grad():
        feats, frames = model.preprocessor(input_signal=wave, length=length)
        encoded, encoded_len = model.encoder(audio_signal=feats, length=frames)
        log_probs = model.decoder(encoder_output=encoded)
    valid = int(encoded_len[0])
    torch.save({"utterance": UTTERANCE, "encoder": encoded[0, :, :valid].T.clone(),
                "log_probs": log_probs[0, :valid].clone(),
                "params": sum(p.numel() for p in model.parameters())}, out / "large.pt")
    print(f"wrote {out / 'large.nemo'} ({(out / 'large.nemo').stat().st_size / 1e6:.0f} MB, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")


def check(out: Path, shared: Path) -> None:
    from asrkd.data.audio_processing import load_audio
    from asrkd.models.nemo_import import import_nemo

    reference = torch.load(out / "large.pt", weights_only=True)
    start = time.perf_counter()
    model, summary = import_nemo(out / "large.nemo")
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wave = torch.from_numpy(load_audio(shared / reference["utterance"]))[None]
    with torch.no_grad():
        encoded = model.encode(wave, torch.tensor([wave.shape[1]]))
        frames = int(encoded.lengths[0])
        log_probs = model.ctc.log_probs(encoded.output)[0, :frames]
    ours = torch.cat([log_probs[:, 4:], log_probs[:, :1]], dim=1)
    enc_ref = reference["encoder"]
    result = {
        "nemo_params": reference["params"], "asrkd_params": summary["params"],
        "frames": frames, "nemo_frames": enc_ref.shape[0],
        "encoder_max_abs_diff": float((encoded.output[0, :frames] - enc_ref).abs().max()),
        "encoder_abs_max": float(enc_ref.abs().max()),
        "log_probs_max_abs_diff": float((ours - reference["log_probs"]).abs().max()),
        "import_seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb),
        "file_mb": round((out / "large.nemo").stat().st_size / 1e6),
    }
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("make", "check"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    (make if args.step == "make" else check)(args.out, args.shared)


if __name__ == "__main__":
    main()
