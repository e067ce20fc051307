"""Fixed checkpoints and batch whose losses and transcripts must not change in a refactor.

``python tests/refactor_reference.py`` (run once, before a refactor) builds tiny seeded
checkpoints and records ``tests/data/refactor/reference.json``:
every ASR loss part, every KD loss part (``ctc_kl``, ``token_kl``, ``rnnt_kl``, ``hidden``)
and the transcripts of every decoding method, for a hybrid CTC/attention pair and a
CTC/RNN-T pair. ``tests/test_refactor_invariance.py`` rebuilds the same checkpoints (the
seeded initial weights are part of what must not change) and recomputes them with the code of
the day. Only :func:`measure` touches the library's API, so after an API change it is the one
place to adapt (it did: ``KDWrapper.from_config`` became ``build_kd``); the recorded numbers
stay.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent / "data" / "refactor"
PAIRS = {"transformer": ("ctc_kl", "token_kl", "hidden"), "rnnt": ("ctc_kl", "rnnt_kl", "hidden")}
METHODS = {
    "transformer": ("ctc_greedy", "ctc_beam", "attention_greedy", "attention_beam"),
    "rnnt": ("ctc_greedy", "ctc_beam", "rnnt_greedy", "rnnt_beam"),
}
TEXTS = ("hello there", "hi")


def _config(decoder: str, width: int, layers: int):
    from asrkd.models.e2e_asr import ModelConfig
    from asrkd.models.encoder import FastConformerConfig
    from asrkd.models.frontend import ResNet1DConfig
    from asrkd.models.rnnt import RNNTConfig
    from asrkd.models.transformer_decoder import TransformerDecoderConfig

    return ModelConfig(
        frontend=ResNet1DConfig(channels=(16,), strides=(1,)),
        encoder=FastConformerConfig(
            d_model=width, n_heads=2, n_layers=layers, subsampling_channels=16, dropout=0.0,
            dropout_pre_encoder=0.0, dropout_att=0.0, conv_kernel=5,
        ),
        decoder=decoder,
        transformer=TransformerDecoderConfig(d_model=width, n_heads=2, n_layers=1,
                                        ff_dim=2 * width, dropout=0.0),
        rnnt=RNNTConfig(pred_dim=width, joint_dim=width, dropout=0.0),
        spec_augment=None,
    )


def write_checkpoints(folder: Path) -> None:
    """Seeded tiny teacher (d32 x 2) and student (d16 x 1) per decoder, if not there yet."""
    from asrkd.data.tokenizer import CharTokenizer
    from asrkd.models.e2e_asr import build_model, save_checkpoint

    for decoder in PAIRS:
        for role, width, layers, seed in (("teacher", 32, 2, 1), ("student", 16, 1, 2)):
            path = folder / f"{decoder}_{role}.ckpt"
            if not path.is_file():
                torch.manual_seed(seed)
                save_checkpoint(build_model(_config(decoder, width, layers),
                                            CharTokenizer.english()), path)


def batch(tokenizer) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """Seeded 1.0 s and 0.6 s of noise (padded) and the targets of :data:`TEXTS`."""
    generator = torch.Generator().manual_seed(0)
    waves = [0.1 * torch.randn(int(16000 * s), generator=generator) for s in (1.0, 0.6)]
    audio = torch.zeros(2, len(waves[0]))
    for row, wave in enumerate(waves):
        audio[row, : len(wave)] = wave
    encoded = [tokenizer.encode(t) for t in TEXTS]
    targets = torch.full((2, max(map(len, encoded))), tokenizer.pad_id)
    for row, ids in enumerate(encoded):
        targets[row, : len(ids)] = torch.tensor(ids)
    lengths = torch.tensor([len(w) for w in waves])
    return audio, lengths, targets, torch.tensor([len(e) for e in encoded])


def measure(folder: Path) -> dict:
    """Loss parts and transcripts of both pairs on :func:`batch` (the library's API here)."""
    from asrkd.losses import ASRLoss
    from asrkd.models.e2e_asr import load_checkpoint
    from asrkd.training.distillation import KDConfig, build_kd

    torch.manual_seed(0)
    result: dict = {}
    for decoder, kd_losses in PAIRS.items():
        teacher = load_checkpoint(folder / f"{decoder}_teacher.ckpt").eval()
        student = load_checkpoint(folder / f"{decoder}_student.ckpt").eval()
        audio, lengths, targets, target_lengths = batch(student.tokenizer)
        with torch.no_grad():
            asr = ASRLoss()(student(audio, lengths, targets, target_lengths), targets,
                            target_lengths)
            wrapper = build_kd(student, ASRLoss(), KDConfig(losses=kd_losses), teacher=teacher)
            kd = wrapper.eval()(audio, lengths, targets, target_lengths)
        result[decoder] = {
            "asr": {k: float(v) for k, v in asr.items()},
            "kd": {k: float(v) for k, v in kd.items()},
            "transcripts": {
                name: {method: [h.text for h in model.infer(audio, lengths, method=method)]
                       for method in METHODS[decoder]}
                for name, model in (("teacher", teacher), ("student", student))
            },
        }
    return result


if __name__ == "__main__":
    import tempfile

    HERE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoints(Path(tmp))
        values = measure(Path(tmp))
    out = HERE / "reference.json"
    out.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}", file=sys.stderr)
