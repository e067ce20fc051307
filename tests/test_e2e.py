"""E2EASR assembly: builder, presets, decoding methods, ASR loss, checkpoints, learning."""

from __future__ import annotations

import functools
import os
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from asrkd.data.audio_processing import SpecAugmentConfig
from asrkd.data.tokenizer import CharTokenizer
from asrkd.losses import ASRLoss, ASRLossConfig, Supervised
from asrkd.models.common import pad_sequences
from asrkd.models.e2e_asr import (
    E2EASR,
    CheckpointError,
    ModelConfig,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from asrkd.models.encoder import FastConformerConfig
from asrkd.models.frontend import ResNet1DConfig
from asrkd.models.presets import PRESETS, get_preset
from asrkd.models.rnnt import RNNTConfig
from asrkd.models.transformer_decoder import TransformerDecoderConfig


def tiny_config(decoder: str = "transformer", ctc: bool = True) -> ModelConfig:
    return ModelConfig(
        frontend=ResNet1DConfig(channels=(32,), strides=(1,)),
        encoder=FastConformerConfig(
            d_model=64, n_heads=2, n_layers=2, subsampling_channels=32, dropout=0.0,
            conv_norm="layer_norm",
            dropout_pre_encoder=0.0, dropout_att=0.0,
        ),
        decoder=decoder,
        ctc=ctc,
        transformer=TransformerDecoderConfig(d_model=64, n_heads=2, n_layers=1, ff_dim=128,
                                        dropout=0.0),
        rnnt=RNNTConfig(pred_dim=64, joint_dim=64, dropout=0.0),
        spec_augment=None,
    )


def random_batch(seconds=(1.0, 0.6), seed=0):
    generator = torch.Generator().manual_seed(seed)
    waves = [0.1 * torch.randn(int(16000 * s), generator=generator) for s in seconds]
    return pad_sequences(waves)


@pytest.mark.parametrize("decoder", ["transformer", "rnnt", "none"])
def test_forward_loss_and_every_decoding_method(decoder):
    torch.manual_seed(0)
    tokenizer = CharTokenizer.english()
    model = build_model(tiny_config(decoder), tokenizer)
    audio, lengths = random_batch()
    targets = torch.full((2, 11), tokenizer.pad_id)
    targets[0] = torch.tensor(tokenizer.encode("hello there"))
    targets[1, :2] = torch.tensor(tokenizer.encode("hi"))
    target_lengths = torch.tensor([11, 2])
    output = model(audio, lengths, targets, target_lengths)
    assert output.ctc_logits.shape[:2] == output.encoder_out.shape[:2]
    assert output.encoder_lengths.tolist() == [13, 8]  # 101 and 61 frames, 8x subsampling
    parts = ASRLoss()(output, targets, target_lengths)
    assert torch.isfinite(parts["total"])
    parts["total"].backward()
    family = {"transformer": "attention", "rnnt": "rnnt", "none": None}[decoder]
    methods = ["ctc_greedy", "ctc_beam"] + (
        [f"{family}_greedy", f"{family}_beam"] if family else []
    )
    for method in methods:
        hypotheses = model.infer(audio, lengths, method=method, beam_size=3)
        assert len(hypotheses) == 2 and all(isinstance(h.text, str) for h in hypotheses)
    with pytest.raises(ValueError, match="does not fit"):
        model.infer(audio, lengths, method="rnnt_greedy" if decoder != "rnnt" else
                    "attention_greedy")


def test_default_search_per_model_kind():
    # auto: CTC greedy wherever there is a CTC head (measured as accurate as joint CTC/attention
    # search on AN4, and several times faster); the decoder's own search otherwise.
    tokenizer = CharTokenizer.english()
    expected = {("transformer", True): ("ctc_greedy", "attention_beam"),
                ("transformer", False): ("attention_beam", "attention_beam"),
                ("rnnt", True): ("rnnt_greedy", "rnnt_greedy"),
                ("none", True): ("ctc_greedy", "ctc_greedy")}
    for (decoder, ctc), (default, own) in expected.items():
        model = build_model(tiny_config(decoder, ctc=ctc), tokenizer)
        assert (model.default_method(), model.decoder_method()) == (default, own), decoder
    model = build_model(tiny_config("transformer"), tokenizer)
    model.set_decoding(method="attention_beam")
    assert model.default_method() == "attention_beam"


def test_fused_rnnt_joint_training_matches_materialised_lattice():
    # training.asr_loss.rnnt_fused_joint: the same loss and gradients for every parameter,
    # with the (B, T', U+1, V) lattice evaluated block by block inside the loss.
    tokenizer = CharTokenizer.english()
    audio, lengths = random_batch()
    targets = torch.full((2, 11), tokenizer.pad_id)
    targets[0] = torch.tensor(tokenizer.encode("hello there"))
    targets[1, :2] = torch.tensor(tokenizer.encode("hi"))
    target_lengths = torch.tensor([11, 2])
    results = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_config("rnnt"), tokenizer).eval()
        objective = Supervised(model, ASRLoss(ASRLossConfig(rnnt_fused_joint=fused)))
        parts = objective(audio, lengths, targets, target_lengths)
        parts["total"].backward()
        results[fused] = (parts, {n: p.grad for n, p in model.named_parameters()
                                  if p.grad is not None})
    (plain, plain_grads), (fused_parts, fused_grads) = results[False], results[True]
    torch.testing.assert_close(fused_parts["rnnt"], plain["rnnt"])
    torch.testing.assert_close(fused_parts["total"], plain["total"])
    assert fused_grads.keys() == plain_grads.keys()
    assert any(name.startswith("decoder.joint.output") for name in fused_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_presets_sizes():
    tokenizer = CharTokenizer.english()
    counts = {name: build_model(PRESETS[name](), tokenizer).num_parameters()
              for name in ("teacher_cpu", "student_cpu", "teacher_cpu_rnnt", "student_cpu_rnnt")}
    assert 5e6 <= counts["teacher_cpu"] <= 15e6
    assert counts["student_cpu"] <= 0.25 * counts["teacher_cpu"]
    assert counts["student_cpu_rnnt"] <= 0.25 * counts["teacher_cpu_rnnt"]
    small = build_model(get_preset("fastconformer_small"), tokenizer)
    encoder = sum(p.numel() for p in small.encoder.parameters())
    assert 12e6 <= encoder <= 15e6
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("teacher_huge")


@pytest.mark.parametrize("decoder", ["transformer", "rnnt"])
def test_checkpoint_round_trip_transcribes_identically(tmp_path, decoder):
    torch.manual_seed(0)
    model = build_model(tiny_config(decoder), CharTokenizer.english()).eval()
    audio, lengths = random_batch()
    before = [h.text for h in model.infer(audio, lengths)]
    path = save_checkpoint(model, tmp_path / "m.ckpt")
    payload = torch.load(path, weights_only=True)  # loads without pickle of any object
    assert set(payload) >= {"model_config", "tokenizer", "state_dict"}
    loaded = load_checkpoint(path)
    assert [h.text for h in loaded.infer(audio, lengths)] == before
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_crafted_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with path.open("wb") as handle:
        pickle.dump({"format": "asrkd-checkpoint-1", "payload": _Evil()}, handle)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_checkpoint_from_a_different_config_is_named(tmp_path):
    model = build_model(tiny_config(), CharTokenizer.english())
    path = save_checkpoint(model, tmp_path / "m.ckpt")
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["encoder"]["d_model"] = 96
    torch.save(payload, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="weights do not fit the config"):
        load_checkpoint(tmp_path / "other.ckpt")


def test_transcribe_reads_files(tmp_path, ljspeech_dir):
    model = build_model(tiny_config(), CharTokenizer.english())
    files = sorted((ljspeech_dir / "wav").glob("*.wav"))[:2]
    texts = model.transcribe(files, method="ctc_greedy")
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


@functools.cache
def overfit(decoder: str, corpus: Path, steps: int) -> tuple[float, E2EASR, list[dict]]:
    """Train a small model on 20 utterances (BPE: 8x subsampling leaves too few frames for
    characters); return its CER on them, the model and its two batches.

    Cached: tests of what happens after training (ONNX export) reuse the same run."""
    from asrkd.data.dataset import ManifestDataset, collate_batch, read_manifest
    from asrkd.data.tokenizer import build_tokenizer
    from asrkd.utils.metrics import corpus_error_rates

    torch.manual_seed(0)
    texts = [entry.text for entry in read_manifest(corpus / "train.jsonl")[0]]
    tokenizer = build_tokenizer("bpe", texts, vocab_size=96)
    # The CPU presets' arrangement: the frontend strides 4x in time, no 2-D subsampling (at 8x
    # the corpus's fastest sentences have more BPE tokens than frames, which CTC cannot emit).
    config = replace(
        tiny_config(decoder),
        frontend=ResNet1DConfig(channels=(64, 96), strides=(2, 2)),
        encoder=replace(tiny_config().encoder, d_model=96, n_layers=3, n_heads=4,
                        subsampling="none", subsampling_factor=1),
        spec_augment=SpecAugmentConfig(freq_masks=0, time_masks=0),
        # This memorising full-context transducer emits up to 30 labels at one frame (all of an
        # utterance in its first ~10 frames); the default cap of 5 per frame would measure the
        # truncation of greedy decoding (CER 0.02-0.07, by CPU), not what it learnt.
        rnnt=replace(tiny_config().rnnt, max_symbols_per_frame=30),
    )
    model = build_model(config, tokenizer)
    dataset = ManifestDataset(corpus / "train.jsonl", tokenizer)
    items = [dataset[i] for i in range(20)]
    batches = [collate_batch(items[i : i + 10]) for i in (0, 10)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = ASRLoss()
    model.train()
    for step in range(steps):
        batch = batches[step % 2]
        output = model(batch["audio"], batch["audio_lengths"], batch["targets"],
                       batch["target_lengths"])
        loss = loss_fn(output, batch["targets"], batch["target_lengths"])["total"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    # The hybrid model's default: attention beam search with joint CTC scoring (pure attention
    # greedy search still loops on a few utterances after this little training).
    method = {"transformer": "attention_beam", "rnnt": "rnnt_greedy", "none": "ctc_greedy"}
    hypotheses, references = [], []
    for batch in batches:
        found = model.infer(batch["audio"], batch["audio_lengths"], method=method[decoder])
        hypotheses += [h.text for h in found]
        references += [tokenizer.normalizer(t) for t in batch["texts"]]
    return corpus_error_rates(references, hypotheses)["cer"], model.eval(), batches


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["none", "transformer", "rnnt"])
def test_learning_is_real(decoder, tiny_corpus):
    steps = {"none": 200, "transformer": 250, "rnnt": 300}[decoder]
    cer, model, batches = overfit(decoder, tiny_corpus, steps=steps)
    assert cer < 0.05, f"{decoder}: CER {cer:.3f} on its 20 training utterances"
    if decoder == "rnnt":
        # A trained transducer (bursts of up to 30 labels at one frame): the label-looping
        # greedy search gives the frame-by-frame search's hypotheses, with and without the cap.
        from asrkd.decoding.rnnt import rnnt_greedy
        from test_rnnt import assert_same_hypotheses, frame_looping_greedy

        with torch.no_grad():
            for batch in batches:
                encoded = model.encode(batch["audio"], batch["audio_lengths"])
                for limit in (5, 30):
                    want = frame_looping_greedy(model.decoder, encoded.output, encoded.lengths,
                                                limit)
                    assert_same_hypotheses(
                        rnnt_greedy(model.decoder, encoded.output, encoded.lengths, limit), want)
                    for b, n in enumerate(encoded.lengths.tolist()):  # one utterance at a time
                        alone = rnnt_greedy(model.decoder, encoded.output[b : b + 1, :n],
                                            encoded.lengths[b : b + 1], limit)
                        assert_same_hypotheses(alone, want[b : b + 1])


ARRANGEMENTS = {
    # ResNet1D on log-mel frames, then 2-D dw-striding over its channels (the original layout).
    "features": {},
    # 2-D dw-striding over the ordered mel axis, then ResNet1D on the subsampled d_model sequence.
    "subsampled": {"frontend": ResNet1DConfig(channels=(64,), strides=(1,)),
                   "frontend_position": "subsampled"},
    # ResNet1D strides in time itself (1-D, mel bins as channels); the encoder only projects.
    "strided_1d": {"frontend": ResNet1DConfig(channels=(32, 32), strides=(2, 2))},
}


@pytest.mark.parametrize("arrangement", sorted(ARRANGEMENTS))
def test_frontend_arrangements_are_padding_invariant(arrangement):
    torch.manual_seed(0)
    config = replace(tiny_config("none"), **ARRANGEMENTS[arrangement])
    if arrangement == "strided_1d":
        config = replace(config, encoder=replace(config.encoder, subsampling="none",
                                                 subsampling_factor=1))
    else:
        config = replace(config, encoder=replace(config.encoder, subsampling_factor=4))
    model = build_model(config, CharTokenizer.english()).eval()
    assert model.subsampling_factor == 4
    audio, lengths = random_batch((1.0, 0.55))
    batched = model.encode(audio, lengths)
    assert batched.lengths.tolist() == [26, 14]  # 101 and 56 frames, 4x, ceil per stage
    alone = model.encode(audio[1:, : lengths[1]], lengths[1:])
    torch.testing.assert_close(batched.output[1, :14], alone.output[0], atol=1e-5, rtol=1e-4)
    assert batched.output[1, 14:].abs().max() == 0


def test_frontend_arrangement_errors_name_the_setting():
    base = tiny_config()
    with pytest.raises(ValueError, match="last channels must equal it"):
        replace(base, frontend_position="subsampled")
    with pytest.raises(ValueError, match="frontend_position must be one of"):
        replace(base, frontend_position="after")
    with pytest.raises(ValueError, match="subsampling_factor must be 1"):
        FastConformerConfig(subsampling="none", subsampling_factor=4)
    with pytest.raises(ValueError, match="dw_striding needs >= 2"):
        FastConformerConfig(subsampling_factor=1)


def test_intermediate_ctc_in_training_only():
    torch.manual_seed(0)
    tokenizer = CharTokenizer.english()
    model = build_model(replace(tiny_config(), inter_ctc_layers=(1,)), tokenizer)
    audio, lengths = random_batch()
    targets = torch.tensor([tokenizer.encode("hello"), tokenizer.encode("hi") + [1] * 3])
    target_lengths = torch.tensor([5, 2])
    model.train()
    output = model(audio, lengths, targets, target_lengths)
    assert len(output.inter_ctc_logits) == 1 and output.hidden_states is None
    assert output.inter_ctc_logits[0].shape == output.ctc_logits.shape
    parts = ASRLoss()(output, targets, target_lengths)
    expected = 0.7 * parts["ctc_final"] + 0.3 * parts["ctc_inter"]
    torch.testing.assert_close(parts["ctc"], expected)
    parts["total"].backward()
    model.eval()
    assert model(audio, lengths, targets, target_lengths).inter_ctc_logits is None
    with pytest.raises(ValueError, match="inter_ctc_layers .2.: each must be a conformer block"):
        replace(tiny_config(), inter_ctc_layers=(2,))


def test_regularization_warmup_ramps_dropout_and_specaugment():
    from types import SimpleNamespace

    from asrkd.training.callbacks import RegularizationWarmup, _regularizers

    config = replace(
        tiny_config(), spec_augment=SpecAugmentConfig(),
        encoder=replace(tiny_config().encoder, dropout=0.2, dropout_att=0.1),
    )
    model = build_model(config, CharTokenizer.english())
    before = {(id(m), name): getattr(m, name) for m, name in _regularizers(model)}
    assert any(v == 0.2 for v in before.values()) and any(v == 0.1 for v in before.values())
    assert model.spec_augment.strength == 1.0
    callback = RegularizationWarmup(steps=10)
    module = SimpleNamespace(student=model)
    callback.on_train_start(None, module)
    for step, factor in ((0, 0.0), (5, 0.5), (10, 1.0), (25, 1.0)):
        callback.on_train_batch_start(SimpleNamespace(global_step=step), module, None, 0)
        for m, name in _regularizers(model):
            assert getattr(m, name) == pytest.approx(before[(id(m), name)] * factor)
    callback.on_train_batch_start(SimpleNamespace(global_step=0), module, None, 0)
    callback.on_train_end(None, module)  # a run that stops early leaves full strength
    assert all(getattr(m, n) == before[(id(m), n)] for m, n in _regularizers(model))
