"""Tiny random-weight NeMo CTC models and NeMo's outputs on real speech (tests/test_nemo_import).

Runs in NeMo's own venv (``benchmarks/install_nemo.sh``), never in asrkd's:

    /tmp/nemo-venv/bin/python benchmarks/nemo_fixtures.py [--shared ../shared/data]

For each variant in ``VARIANTS`` (a CTC, an RNN-T and a hybrid RNNT-CTC model) it builds the
NeMo model with a FastConformer encoder (dw_striding 8x) and a SentencePiece BPE tokenizer
trained on the AN4 training transcripts, makes its outputs non-degenerate (random batch-norm
statistics, biases and positional biases, which NeMo initialises to 0/1, so that a mapping
mistake changes the numbers; then 60 training steps, 150 for transducers, on the three
utterances, so that its output depends on its input and the greedy transcripts differ), saves
it as ``tests/data/nemo/<variant>.nemo`` and records, on three AN4 test utterances (one at a
time, batch 1), NeMo's encoder output, CTC log-probabilities, RNN-T joint log-probabilities
over the lattice of the reference transcript (first frames) and greedy transcripts (for a
hybrid, of both decoders) into ``tests/data/nemo/<variant>.pt``. The references come from the
saved file, restored as a user would load it.

The variants cover the options the importer maps differently: the CTC model takes the less
common branch of each (shared positional biases, no biases, layer norm in the conv module, no
xscaling, causal convolutions, limited attention context), the transducers the common
FastConformer settings (per-layer positional biases, biases, batch norm, xscaling, full
context), with a 2-layer (RNN-T) and a 1-layer (hybrid) prediction network.

NeMo's own forward runs on each utterance alone (batch 1; asrkd's batches give every utterance
what it gives alone, NeMo's subsampling does not mask padding between its convolutions).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
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
BRANCH_B = {"untie_biases": False, "use_bias": False, "conv_norm_type": "layer_norm",
            "xscaling": False, "conv_context_size": "causal", "att_context_size": [12, 3]}
# name: (model kind, encoder changes)
VARIANTS = {
    "ctc": ("ctc", BRANCH_B),
    "rnnt": ("rnnt", {}),
    "hybrid": ("hybrid", {"conv_kernel_size": 5}),
    # NeMo's Longformer-style local attention, a window shorter than the utterances.
    "ctc_local": ("ctc", {"self_attention_model": "rel_pos_local_attn",
                          "att_context_size": [4, 4]}),
}
CLASSES = {
    "ctc": "EncDecCTCModelBPE",
    "rnnt": "EncDecRNNTBPEModel",
    "hybrid": "EncDecHybridRNNTCTCBPEModel",
}
JOINT_FRAMES = 8  # RNN-T joint log-probs are recorded for the first frames of each utterance


def _tokenizer(shared: Path, out: Path, vocab: int = VOCAB) -> Path:
    import sentencepiece as spm

    texts = [json.loads(line)["text"] for line in
             (shared / "an4" / "manifest_train.jsonl").read_text().splitlines() if line.strip()]
    corpus = out / "text.txt"
    corpus.write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / "tokenizer"),
                                   vocab_size=vocab, model_type="bpe", character_coverage=1.0,
                                   bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2,
                                   # No NFKC table: a 1 KiB model file instead of 240 KiB.
                                   normalization_rule_name="identity")
    with open(out / "vocab.txt", "w") as listing:
        processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        for i in range(processor.get_piece_size()):
            listing.write(processor.id_to_piece(i) + "\n")
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



def _loss(model: torch.nn.Module, kind: str, wave: torch.Tensor, text: str) -> torch.Tensor:
    # A copy: NeMo's preprocessor adds its training dither to the input in place.
    encoded, lengths = model.forward(input_signal=wave[None].clone(),
                                     input_signal_length=torch.tensor([len(wave)]))[:2]
    targets = torch.tensor([model.tokenizer.text_to_ids(text)])
    target_lengths = torch.tensor([targets.shape[1]])
    if kind == "ctc":  # forward gave log-probs
        return model.loss(log_probs=encoded, targets=targets, input_lengths=lengths,
                          target_lengths=target_lengths)
    decoder, _, _ = model.decoder(targets=targets, target_length=target_lengths)
    joint = model.joint(encoder_outputs=encoded, decoder_outputs=decoder)
    loss = model.loss(log_probs=joint, targets=targets, input_lengths=lengths,
                      target_lengths=target_lengths)
    if kind == "hybrid":
        ctc = model.ctc_decoder(encoder_output=encoded)
        loss = loss + model.ctc_loss(log_probs=ctc, targets=targets, input_lengths=lengths,
                                     target_lengths=target_lengths)
    return loss


def _fit(model: torch.nn.Module, kind: str, waves: list[torch.Tensor], texts: list[str],
         steps: int) -> None:
    """A few training steps on the utterances themselves: a random FastConformer's output
    hardly depends on its input (one piece wins everywhere), which would leave the greedy
    transcripts nothing to check. Batch norm stays in eval mode, keeping the random
    statistics."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    start = time.perf_counter()
    for step in range(steps):
        if step % 30 == 0:
            print(f"  step {step}/{steps}, {time.perf_counter() - start:.0f} s", flush=True)
        for wave, text in zip(waves, texts):
            loss = _loss(model, kind, wave, text)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def _config(kind: str, encoder: dict, tokenizer_dir: Path) -> dict:
    d = encoder["d_model"]
    config = {
        "sample_rate": 16000,
        "tokenizer": {"dir": str(tokenizer_dir), "type": "bpe"},
        "preprocessor": PREPROCESSOR,
        "spec_augment": {
            "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
            "freq_masks": 2, "time_masks": 10, "freq_width": 27, "time_width": 0.05},
        "encoder": encoder,
        "optim": {"name": "adamw", "lr": 1e-3},
        # transcribe() reads use_start_end_token from validation_ds.
        "validation_ds": {"manifest_filepath": None, "sample_rate": 16000, "batch_size": 1,
                          "shuffle": False, "use_start_end_token": False},
    }
    ctc_decoder = {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": d,
                   "num_classes": -1, "vocabulary": []}
    if kind == "ctc":
        return {**config, "decoder": ctc_decoder}
    config.update({
        "model_defaults": {"enc_hidden": d, "pred_hidden": 24, "joint_hidden": 28},
        "decoder": {"_target_": "nemo.collections.asr.modules.RNNTDecoder",
                    "normalization_mode": None, "random_state_sampling": False,
                    "blank_as_pad": True, "vocab_size": -1,
                    "prednet": {"pred_hidden": 24, "pred_rnn_layers": 2 if kind == "rnnt" else 1,
                                "t_max": None, "dropout": 0.1}},
        "joint": {"_target_": "nemo.collections.asr.modules.RNNTJoint", "log_softmax": None,
                  "preserve_memory": False, "fuse_loss_wer": False, "num_classes": -1,
                  "vocabulary": [],
                  "jointnet": {"encoder_hidden": d, "pred_hidden": 24, "joint_hidden": 28,
                               "activation": "relu", "dropout": 0.1}},
        "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": 10}},
        "loss": {"loss_name": "default"},
    })
    if kind == "hybrid":
        config["aux_ctc"] = {"ctc_loss_weight": 0.3, "use_cer": False,
                             "ctc_reduction": "mean_batch", "decoder": ctc_decoder,
                             "decoding": {"strategy": "greedy"}}
    return config


def _texts(hypotheses: list) -> list[str]:
    if hypotheses and isinstance(hypotheses[0], list):  # (best, all) from older transducers
        hypotheses = hypotheses[0]
    return [h.text if hasattr(h, "text") else str(h) for h in hypotheses]


def main() -> None:
    import nemo
    import nemo.collections.asr.models as asr_models
    import soundfile as sf
    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "nemo")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [str(args.shared / name) for name in UTTERANCES]
    waves = [torch.from_numpy(sf.read(path, dtype="float32")[0]) for path in paths]
    manifest = (args.shared / "an4" / "manifest_test.jsonl").read_text().splitlines()
    text_of = {row["audio_filepath"]: row["text"] for row in map(json.loads, manifest)}
    texts = [text_of[name.removeprefix("an4/")] for name in UTTERANCES]

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = _tokenizer(args.shared, Path(tmp))
        for seed, (variant, (kind, changes)) in enumerate(VARIANTS.items()):
            if variant not in args.variants:
                continue
            torch.manual_seed(seed)
            cls = getattr(asr_models, CLASSES[kind])
            cfg = OmegaConf.create(_config(kind, {**ENCODER, **changes}, tokenizer_dir))
            model = cls(cfg=cfg).eval()
            _perturb(model, seed)
            # Transducers learn to emit more slowly than CTC.
            _fit(model, kind, waves, texts, steps=60 if kind == "ctc" else 150)
            nemo_file = args.out / f"{variant}.nemo"
            model.save_to(str(nemo_file))
            # The reference comes from the file, as a user would load it.
            model = cls.restore_from(str(nemo_file), map_location="cpu").eval()
            reference = {"nemo_version": nemo.__version__, "utterances": list(UTTERANCES),
                         "texts": texts, "encoder": [], "log_probs": [], "joint": []}
            with torch.no_grad():
                for wave, text in zip(waves, texts):
                    audio, length = wave[None], torch.tensor([len(wave)])
                    feats, frames = model.preprocessor(input_signal=audio, length=length)
                    out, out_len = model.encoder(audio_signal=feats, length=frames)
                    reference["encoder"].append(out[0, :, : int(out_len[0])].T.clone())  # (T, D)
                    if kind == "ctc":
                        probs = model.forward(input_signal=audio, input_signal_length=length)[0]
                    elif kind == "hybrid":
                        probs = model.ctc_decoder(encoder_output=out)
                    if kind != "rnnt":  # (T, N + 1), NeMo's order (blank last)
                        reference["log_probs"].append(probs[0, : int(out_len[0])].clone())
                    if kind != "ctc":  # (JOINT_FRAMES, U + 1, N + 1) for the reference text
                        targets = torch.tensor([model.tokenizer.text_to_ids(text)])
                        decoder, _, _ = model.decoder(
                            targets=targets, target_length=torch.tensor([targets.shape[1]]))
                        joint = model.joint(encoder_outputs=out[:, :, :JOINT_FRAMES],
                                            decoder_outputs=decoder)
                        reference["joint"].append(joint[0].clone())
            reference["greedy"] = _texts(model.transcribe(paths, batch_size=1, verbose=False))
            if kind == "hybrid":
                model.change_decoding_strategy(decoder_type="ctc")
                reference["ctc_greedy"] = _texts(model.transcribe(paths, batch_size=1,
                                                                  verbose=False))
            torch.save(reference, args.out / f"{variant}.pt")
            print(f"{variant}: {nemo_file.stat().st_size / 1024:.0f} KiB .nemo, "
                  f"{sum(p.numel() for p in model.parameters())} parameters, greedy "
                  f"{reference['greedy']} {reference.get('ctc_greedy', '')}")

if __name__ == "__main__":
    main()
