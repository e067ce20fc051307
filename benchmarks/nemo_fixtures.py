"""Tiny random-weight NeMo CTC models and NeMo's outputs on real speech (tests/test_nemo_import).

Runs in NeMo's own venv (``benchmarks/install_nemo.sh``), never in asrkd's:

    /tmp/nemo-venv/bin/python benchmarks/nemo_fixtures.py [--shared ../shared/data]

For each variant in ``VARIANTS`` it builds an ``EncDecCTCModelBPE`` with a FastConformer
encoder (dw_striding 8x) and a SentencePiece BPE tokenizer trained on the AN4 training
transcripts, makes its outputs non-degenerate (random batch-norm statistics, biases and
positional biases, which NeMo initialises to 0/1, so that a mapping mistake changes the
numbers; then 60 CTC steps on the three utterances, so that its output depends on its input
and the greedy transcripts differ), saves it as ``tests/data/nemo/<variant>.nemo`` and
records, on three AN4 test utterances (one at a time, batch 1), NeMo's encoder output, CTC
log-probabilities and greedy transcripts into ``tests/data/nemo/<variant>.pt``. The
references come from the saved file, restored as a user would load it.

The variants cover the options the importer maps differently: the common FastConformer
settings (``ctc_a``: per-layer positional biases, biases on, batch norm, xscaling, full context)
and the other branch of each (``ctc_b``: shared positional biases, no biases, layer norm in the
conv module, no xscaling, causal convolutions, limited attention context).

NeMo's own forward runs on each utterance alone (batch 1; asrkd's batches give every utterance
what it gives alone, NeMo's subsampling does not mask padding between its convolutions).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
UTTERANCES = (
    "an4/audio/test/fcaw/an406-fcaw-b.flac",
    "an4/audio/test/marh/an431-marh-b.flac",
    "an4/audio/test/fjlp/an416-fjlp-b.flac",
)
VOCAB = 40  # SentencePiece pieces (NeMo adds the blank after them)

PREPROCESSOR = {
    "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
    "sample_rate": 16000,
    "normalize": "per_feature",
    "window_size": 0.025,
    "window_stride": 0.01,
    "window": "hann",
    "features": 64,  # not 80: the importer must read the mel count from the config
    "n_fft": 512,
    "log": True,
    "frame_splicing": 1,
    "dither": 1e-5,
    "pad_to": 0,
    "pad_value": 0.0,
}
ENCODER = {
    "_target_": "nemo.collections.asr.modules.ConformerEncoder",
    "feat_in": 64,
    "feat_out": -1,
    "n_layers": 2,
    "d_model": 32,
    "subsampling": "dw_striding",
    "subsampling_factor": 8,
    "subsampling_conv_channels": 16,
    "causal_downsampling": False,
    "ff_expansion_factor": 4,
    "self_attention_model": "rel_pos",
    "n_heads": 4,
    "att_context_size": [-1, -1],
    "att_context_style": "regular",
    "xscaling": True,
    "untie_biases": True,
    "pos_emb_max_len": 5000,
    "conv_kernel_size": 9,
    "conv_norm_type": "batch_norm",
    "conv_context_size": None,
    "use_bias": True,
    "dropout": 0.1,
    "dropout_pre_encoder": 0.1,
    "dropout_emb": 0.0,
    "dropout_att": 0.1,
}
VARIANTS = {
    "ctc_a": {},
    "ctc_b": {"untie_biases": False, "use_bias": False, "conv_norm_type": "layer_norm",
              "xscaling": False, "conv_context_size": "causal", "att_context_size": [12, 3]},
}


def _tokenizer(shared: Path, out: Path) -> Path:
    import sentencepiece as spm

    texts = [json.loads(line)["text"] for line in
             (shared / "an4" / "manifest_train.jsonl").read_text().splitlines() if line.strip()]
    corpus = out / "text.txt"
    corpus.write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / "tokenizer"),
                                   vocab_size=VOCAB, model_type="bpe", character_coverage=1.0,
                                   bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2,
                                   # No NFKC table: a 1 KiB model file instead of 240 KiB.
                                   normalization_rule_name="identity")
    with open(out / "vocab.txt", "w") as vocab:
        processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        for i in range(processor.get_piece_size()):
            vocab.write(processor.id_to_piece(i) + "\n")
    return out


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random values for everything NeMo initialises to constants."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(0.3 * torch.randn(module.running_mean.shape,
                                                            generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape,
                                                          generator=generator))
        for name, param in model.named_parameters():
            if name.endswith("bias") or "pos_bias" in name or name.endswith("norm.weight"):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))



def _fit(model: torch.nn.Module, waves: list[torch.Tensor], texts: list[str], steps: int) -> None:
    """A few CTC steps on the utterances themselves: a random FastConformer's output hardly
    depends on its input (one piece wins everywhere), which would leave the greedy transcripts
    nothing to check. Batch norm stays in eval mode, keeping the random statistics."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    for _ in range(steps):
        for wave, text in zip(waves, texts):
            targets = torch.tensor([model.tokenizer.text_to_ids(text)])
            # A copy: NeMo's preprocessor adds its training dither to the input in place.
            log_probs, lengths = model.forward(input_signal=wave[None].clone(),
                                               input_signal_length=torch.tensor([len(wave)]))[:2]
            loss = model.loss(log_probs=log_probs, targets=targets, input_lengths=lengths,
                              target_lengths=torch.tensor([targets.shape[1]]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def main() -> None:
    import nemo
    import soundfile as sf
    from nemo.collections.asr.models import EncDecCTCModelBPE
    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "nemo")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [str(args.shared / name) for name in UTTERANCES]
    waves = [torch.from_numpy(sf.read(path, dtype="float32")[0]) for path in paths]
    manifest = (args.shared / "an4" / "manifest_test.jsonl").read_text().splitlines()
    text_of = {row["audio_filepath"]: row["text"] for row in map(json.loads, manifest)}
    texts = [text_of[name.removeprefix("an4/")] for name in UTTERANCES]

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = _tokenizer(args.shared, Path(tmp))
        for seed, (variant, changes) in enumerate(VARIANTS.items()):
            torch.manual_seed(seed)
            encoder = {**ENCODER, **changes}
            cfg = OmegaConf.create({
                "sample_rate": 16000,
                "tokenizer": {"dir": str(tokenizer_dir), "type": "bpe"},
                "preprocessor": PREPROCESSOR,
                "spec_augment": {
                    "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
                    "freq_masks": 2, "time_masks": 10, "freq_width": 27, "time_width": 0.05},
                "encoder": encoder,
                "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder",
                            "feat_in": encoder["d_model"], "num_classes": -1,
                            "vocabulary": []},
                "optim": {"name": "adamw", "lr": 1e-3},
                # transcribe() reads use_start_end_token from validation_ds.
                "validation_ds": {"manifest_filepath": None, "sample_rate": 16000,
                                  "batch_size": 1, "shuffle": False,
                                  "use_start_end_token": False},
            })
            model = EncDecCTCModelBPE(cfg=cfg).eval()
            _perturb(model, seed)
            _fit(model, waves, texts, steps=60)
            nemo_file = args.out / f"{variant}.nemo"
            model.save_to(str(nemo_file))
            # The reference comes from the file, as a user would load it.
            model = EncDecCTCModelBPE.restore_from(str(nemo_file), map_location="cpu").eval()
            encoded, log_probs = [], []
            with torch.no_grad():
                for wave in waves:
                    audio = wave[None]
                    length = torch.tensor([audio.shape[1]])
                    feats, frames = model.preprocessor(input_signal=audio, length=length)
                    out, out_len = model.encoder(audio_signal=feats, length=frames)
                    encoded.append(out[0, :, : int(out_len[0])].T.detach().clone())  # (T', D)
                    probs, probs_len = model.forward(input_signal=audio,
                                                     input_signal_length=length)[:2]
                    assert torch.equal(probs_len, out_len)
                    log_probs.append(probs[0, : int(probs_len[0])].detach().clone())
            hypotheses = model.transcribe(paths, batch_size=1, verbose=False)
            greedy = [h.text if hasattr(h, "text") else str(h) for h in hypotheses]
            reference = {
                "nemo_version": nemo.__version__,
                "utterances": list(UTTERANCES),
                "encoder": encoded,  # (T', D) each
                "log_probs": log_probs,  # (T', N + 1) each, NeMo's order (blank last)
                "greedy": greedy,
            }
            torch.save(reference, args.out / f"{variant}.pt")
            print(f"{variant}: {nemo_file.stat().st_size / 1024:.0f} KiB .nemo, "
                  f"{sum(p.numel() for p in model.parameters())} parameters, greedy {greedy}")


if __name__ == "__main__":
    main()
