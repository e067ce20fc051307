"""Streaming: chunked attention, causal convs, and chunk-by-chunk inference equal to one pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from asrkd.cli import main
from asrkd.data.audio_processing import FeatureConfig
from asrkd.data.tokenizer import CharTokenizer
from asrkd.errors import ConfigError, UserError
from asrkd.export import OnnxStreamer, export_onnx
from asrkd.models.common import make_pad_mask
from asrkd.models.e2e_asr import E2EASR, ModelConfig, build_model, save_checkpoint
from asrkd.models.encoder import FastConformerConfig, attention_block_mask
from asrkd.models.frontend import ResNet1D, ResNet1DConfig
from asrkd.models.presets import get_preset
from asrkd.streaming import (
    StreamingEncoder,
    StreamingRecognizer,
    evaluate_streaming,
    streaming_problems,
)
from asrkd.training.pipeline import evaluate


def streaming_model(seed: int = 0) -> E2EASR:
    """The streaming preset with every parameter and BatchNorm statistic randomised, so that
    attention, positional biases and normalisation all matter (fresh weights leave the
    positional biases at zero and BatchNorm at the identity)."""
    torch.manual_seed(seed)
    model = build_model(get_preset("student_cpu_streaming"), CharTokenizer.english())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def one_pass_log_probs(model: E2EASR, audio: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        out = model.encode(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
        return model.ctc.log_probs(out.output)[0]


def streamed_log_probs(recognizer: StreamingRecognizer, audio: np.ndarray, piece: int):
    chunks = []
    step = recognizer.step

    def record(*args):
        out = step(*args)
        chunks.append(out[0][0])
        return out

    recognizer.step = record
    for start in range(0, len(audio), piece):
        recognizer.accept(audio[start : start + piece])
    text = recognizer.finish()
    return torch.cat(chunks) if chunks else torch.zeros(0), text


def test_chunked_limited_mask_sees_its_chunk_and_the_chunks_before():
    # Chunks of 2 frames (right = 1), one chunk of left context (left = 2), 7 frames, 1 padded.
    blocked = attention_block_mask(make_pad_mask(torch.tensor([6]), 7), (2, 1), "chunked_limited")
    sees = (~blocked[0, 0]).int().tolist()
    assert sees[0] == [1, 1, 0, 0, 0, 0, 0]
    assert sees[1] == [1, 1, 0, 0, 0, 0, 0]  # frame 1 sees frame 0 and nothing later
    assert sees[2] == [1, 1, 1, 1, 0, 0, 0]  # its chunk (2, 3) and chunk (0, 1)
    assert sees[3] == [1, 1, 1, 1, 0, 0, 0]
    assert sees[4] == [0, 0, 1, 1, 1, 1, 0]  # chunk (0, 1) is two chunks back: out of context
    assert sees[6] == [0, 0, 0, 0, 1, 1, 0]  # frame 6 is padding: it blocks itself
    # A regular window of the same (left, right) is a different mask.
    assert not torch.equal(blocked, attention_block_mask(make_pad_mask(torch.tensor([6]), 7),
                                                         (2, 1)))


def test_causal_frontend_reads_no_later_frame():
    torch.manual_seed(0)
    x = torch.randn(1, 40, 8)
    changed = x.clone()
    changed[:, 20:] += 1.0
    lengths = torch.tensor([40])
    for causal in (True, False):
        frontend = ResNet1D(ResNet1DConfig(input_dim=8, channels=(16, 16), strides=(2, 2),
                                           causal=causal)).eval()
        a, lengths_a = frontend(x, lengths)
        b, _ = frontend(changed, lengths)
        assert lengths_a.item() == 10  # same lengths as "same" padding: ceil(40 / 4)
        # Output frame 4 ends on input frame 16 (stride 4): causal, it never sees frame 20.
        assert torch.equal(a[:, :5], b[:, :5]) == causal


@pytest.mark.parametrize(("seconds", "pieces"), [
    (0.01, (160, 1000)),  # shorter than the centre padding: framed at the end, in one go
    (0.3, (160, 4000)),  # one partial chunk
    (4.77, (7777, 10**6)),  # 15 chunks, the last partial; more frames than a chunk can see
])
def test_streaming_equals_one_pass_for_any_piece_size(seconds, pieces):
    model = streaming_model()
    audio = (0.1 * np.random.default_rng(1).standard_normal(int(16000 * seconds))).astype(
        np.float32)
    expected = one_pass_log_probs(model, audio)
    expected_text = model.tokenizer.decode(
        [t for i, t in enumerate(expected.argmax(-1).tolist())
         if t != model.tokenizer.blank_id and (i == 0 or t != expected.argmax(-1)[i - 1])])
    for piece in pieces:
        got, text = streamed_log_probs(StreamingRecognizer(model), audio, piece)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert text == expected_text


def test_the_attention_cache_matters():
    """A cache one chunk short changes the output of a long stream: the test above exercises
    the cached keys (4.77 s is 120 encoder frames, more than the 72 a chunk can see)."""
    model = streaming_model()
    audio = (0.1 * np.random.default_rng(1).standard_normal(16000 * 5)).astype(np.float32)
    expected = one_pass_log_probs(model, audio)
    recognizer = StreamingRecognizer(model)
    recognizer.step.memory -= recognizer.step.chunk
    recognizer.reset()
    got, _ = streamed_log_probs(recognizer, audio, 5120)
    assert (got - expected).abs().max() > 1e-3


def test_state_has_a_fixed_size_however_long_the_stream():
    model = streaming_model()
    step = StreamingEncoder(model)
    state = step.initial_state()
    shapes = [s.shape for s in state]
    features = torch.randn(1, step.chunk_frames, model.features.config.n_mels)
    with torch.no_grad():
        for _ in range(12):
            log_probs, *state = step(features, *state)
    assert [s.shape for s in state] == shapes
    assert log_probs.shape[1] == step.chunk == 8
    assert state[-1].item() == step.memory == 64


def test_a_model_that_cannot_stream_is_refused_with_its_reasons():
    model = build_model(get_preset("student_cpu"), CharTokenizer.english())
    problems = " ".join(streaming_problems(model))
    for reason in ("normalize", "dynamic_range_db", "frontend.causal", "chunked_limited",
                   "conv_context"):
        assert reason in problems
    with pytest.raises(ConfigError, match="cannot stream"):
        StreamingRecognizer(model)
    assert streaming_problems(streaming_model()) == []


def test_cli_streaming_prints_what_one_pass_ctc_greedy_prints(tmp_path, capsys):
    checkpoint = save_checkpoint(streaming_model(), tmp_path / "stream.ckpt")
    rng = np.random.default_rng(2)
    wav = tmp_path / "a.wav"
    sf.write(wav, (0.1 * rng.standard_normal(16000 * 3)).astype(np.float32), 16000)
    main(["infer", "--ckpt", str(checkpoint), "--method", "ctc_greedy", str(wav),
          "--out", str(tmp_path / "one_pass.jsonl"), "--threads", "1"])
    main(["infer", "--ckpt", str(checkpoint), "--streaming", "--chunk-ms", "100", str(wav),
          "--out", str(tmp_path / "stream.jsonl"), "--threads", "1"])
    assert "streaming: 100 ms pieces of audio, encoder chunks of 320 ms" in capsys.readouterr().err
    one_pass = json.loads((tmp_path / "one_pass.jsonl").read_text())
    stream = json.loads((tmp_path / "stream.jsonl").read_text())
    assert stream["text"] == one_pass["text"]
    assert stream["encoder_chunks"] == 10 and stream["chunk_compute_ms"] > 0
    assert main(["infer", "--ckpt", str(checkpoint), "--streaming", "--method",
                 "attention_beam", str(wav)]) != 0
    assert "does not combine with --method attention_beam" in capsys.readouterr().err


def tiny_streaming_config() -> ModelConfig:
    """A small streamable model (quick to export): chunks of 4 frames, 2 chunks of memory."""
    return ModelConfig(
        features=FeatureConfig(normalize=None),
        frontend=ResNet1DConfig(channels=(32, 32), strides=(2, 2), causal=True),
        encoder=FastConformerConfig(d_model=32, n_heads=2, n_layers=2, subsampling="none",
                                    subsampling_factor=1, att_context=(8, 3),
                                    att_context_style="chunked_limited", conv_context=(8, 0),
                                    dropout=0.0, dropout_pre_encoder=0.0, dropout_att=0.0),
        decoder="none",
        spec_augment=None,
    )


def test_onnx_export_streams_as_the_torch_model_does(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(tiny_streaming_config(), CharTokenizer.english()).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    description = export_onnx(model, tmp_path / "s.onnx")
    assert description["streaming"]["chunk_frames"] == 16
    audio = (0.1 * np.random.default_rng(3).standard_normal(16000 * 2 + 77)).astype(np.float32)
    expected, expected_text = streamed_log_probs(StreamingRecognizer(model), audio, 3000)
    got, text = streamed_log_probs(StreamingRecognizer(OnnxStreamer(tmp_path / "s.onnx", 1)),
                                   audio, 3000)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, one_pass_log_probs(model, audio), atol=1e-4, rtol=1e-4)
    assert text == expected_text
    wav = tmp_path / "a.wav"
    sf.write(wav, audio, 16000)
    main(["infer", "--onnx", str(tmp_path / "s.onnx"), "--streaming", str(wav),
          "--threads", "1"])
    captured = capsys.readouterr()
    assert "streaming ONNX: 160 ms pieces" in captured.err
    assert captured.out == f"{wav}\t{text}\n"
    # The export of a model that cannot stream has no streaming graphs, and the runner says so.
    sidecar = json.loads((tmp_path / "s.onnx.json").read_text())
    (tmp_path / "full.onnx.json").write_text(json.dumps({**sidecar, "streaming": None}))
    with pytest.raises(UserError, match="not the export of a model trained for streaming"):
        OnnxStreamer(tmp_path / "full.onnx")


def test_evaluate_streaming_scores_what_one_pass_scores(tiny_corpus):
    model = streaming_model()
    manifest = tiny_corpus / "test.jsonl"
    streamed = evaluate_streaming(model, manifest, chunk_ms=250, threads=1)
    one_pass = evaluate(model, manifest, method="ctc_greedy", threads=1)
    assert streamed["utterances"] == one_pass["utterances"] > 0
    assert (streamed["wer"], streamed["cer"]) == (one_pass["wer"], one_pass["cer"])
    assert streamed["chunks"] > streamed["utterances"] and streamed["chunk_compute_ms"] > 0
    assert streamed["encoder_chunk_ms"] == 320 and streamed["chunk_ms"] == 250
