"""ONNX export: parity with PyTorch on real speech, the RNN-T graphs, int8, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asrkd.cli import main
from asrkd.data.audio_processing import load_audio
from asrkd.data.tokenizer import CharTokenizer
from asrkd.export import OnnxASR, export_onnx
from asrkd.models.common import pad_sequences
from asrkd.models.e2e_asr import build_model, save_checkpoint
from asrkd.utils.metrics import corpus_error_rates
from conftest import read_jsonl
from test_e2e import overfit, tiny_config


def _real_speech(ljspeech_dir: Path, seconds: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """LJSpeech utterances cut to several lengths, batched with padding."""
    entries = read_jsonl(ljspeech_dir / "manifest.jsonl")
    waves = []
    for entry, length in zip(entries, seconds):
        audio = load_audio(ljspeech_dir / entry["audio_filepath"])
        waves.append(torch.from_numpy(audio[: int(length * 16000)]))
    return pad_sequences(waves)


def assert_onnx_ctc_matches(model, onnx: OnnxASR, audio: torch.Tensor,  # noqa: ANN001
                            lengths: torch.Tensor) -> tuple[np.ndarray, object]:
    """The exported graph's CTC log-probs and frame counts equal the PyTorch model's (within
    1e-4 on valid frames); returns the ONNX log-probs and the model's encoder output."""
    with torch.no_grad():
        encoded = model.encode(audio, lengths)
        log_probs = model.ctc.log_probs(encoded.output)
    got, got_lengths = onnx.ctc_log_probs(audio.numpy(), lengths.numpy())
    assert got_lengths.tolist() == encoded.lengths.tolist()
    for b, frames in enumerate(encoded.lengths.tolist()):
        assert np.abs(got[b, :frames] - log_probs[b, :frames].numpy()).max() < 1e-4
    return got, encoded


@pytest.mark.parametrize("decoder", ["transformer", "rnnt"])
def test_onnx_matches_pytorch_on_real_speech(tmp_path, ljspeech_dir, decoder):
    torch.manual_seed(0)
    model = build_model(tiny_config(decoder), CharTokenizer.english()).eval()
    export_onnx(model, tmp_path / "m.onnx")
    onnx = OnnxASR(tmp_path / "m.onnx")
    # Lengths unlike the export's example input: the time and batch axes are dynamic.
    audio, lengths = _real_speech(ljspeech_dir, (1.3, 4.0, 7.7))
    got, encoded = assert_onnx_ctc_matches(model, onnx, audio, lengths)
    single, _ = onnx.ctc_log_probs(audio[1:2, : lengths[1]].numpy(), lengths[1:2].numpy())
    assert np.abs(single[0] - got[1, : single.shape[1]]).max() < 1e-4  # batch-independent
    methods = ["ctc_greedy"] + (["rnnt_greedy"] if decoder == "rnnt" else [])
    for method in methods:
        expected = [h.text for h in model.infer(audio, lengths, method=method)]
        assert onnx.infer(audio.numpy(), lengths.numpy(), method) == expected
    # Same model, same default search, same text (a transducer with a CTC head: RNN-T).
    assert onnx.default_method == model.default_method() == methods[-1]
    assert onnx.infer(audio.numpy(), lengths.numpy()) == [
        h.text for h in model.infer(audio, lengths)]
    if decoder == "rnnt":
        _check_rnnt_graphs(model, onnx, encoded)


def test_onnx_refuses_a_one_pass_encode_that_would_not_fit(tmp_path, monkeypatch):
    import asrkd.utils.memory
    from asrkd.errors import UserError

    torch.manual_seed(0)
    model = build_model(tiny_config("transformer"), CharTokenizer.english()).eval()
    export_onnx(model, tmp_path / "m.onnx")
    onnx = OnnxASR(tmp_path / "m.onnx")
    assert onnx.description["encoder"]["frame_samples"] == 160 * model.subsampling_factor
    monkeypatch.setattr(asrkd.utils.memory, "available_memory_bytes", lambda: 64 * 2**20)
    audio = np.zeros((1, 16000 * 600), np.float32)
    with pytest.raises(UserError, match="600 s of audio in one pass.*--ckpt"):
        onnx.infer(audio, np.array([audio.shape[1]]))


def test_onnx_export_of_nemo_features(tmp_path, ljspeech_dir):
    """NeMo's pre-emphasis, zero centre padding and S // hop frame count export too."""
    from dataclasses import replace

    from asrkd.data.audio_processing import FeatureConfig

    torch.manual_seed(0)
    config = replace(tiny_config("none"), features=FeatureConfig.nemo())
    model = build_model(config, CharTokenizer.english()).eval()
    export_onnx(model, tmp_path / "m.onnx")
    onnx = OnnxASR(tmp_path / "m.onnx")
    assert_onnx_ctc_matches(model, onnx, *_real_speech(ljspeech_dir, (1.3, 4.0)))


def _check_rnnt_graphs(model, onnx: OnnxASR, encoded) -> None:  # noqa: ANN001
    out, lengths = onnx.sessions["encoder"].run(None, {"audio": np.zeros((1, 16000), np.float32),
                                                       "audio_lengths": np.array([16000])})
    assert out.shape[-1] == encoded.output.shape[-1] and lengths.tolist() == [
        int(model.encode(torch.zeros(1, 16000), torch.tensor([16000])).lengths[0])]
    rnnt = model.decoder
    tokens = torch.tensor([0, 7, 12])
    state = (torch.randn(rnnt.config.pred_layers, 3, rnnt.config.pred_dim),) * 2
    with torch.no_grad():
        pred, (h, c) = rnnt.prediction.step(tokens, state)
        frames = encoded.output[0, :3]
        joint = rnnt.joint.combine(rnnt.joint.encoder_proj(frames),
                                   rnnt.joint.pred_proj(pred)).log_softmax(-1)
    got = onnx.sessions["predictor"].run(
        None, {"tokens": tokens.numpy(), "h": state[0].numpy(), "c": state[1].numpy()})
    for ours, theirs in zip(got, (pred, h, c)):
        assert np.abs(ours - theirs.numpy()).max() < 1e-4
    got_joint = onnx.sessions["joint"].run(
        None, {"encoder_frame": frames.numpy(), "pred_out": pred.numpy()})[0]
    assert np.abs(got_joint - joint.numpy()).max() < 1e-4


@pytest.mark.slow
def test_int8_transcripts_match_float(tmp_path, tiny_corpus):
    """A trained model (the CTC model of the learning test): int8 transcripts are within 1%
    absolute WER of the float ones, and the matmul weights shrink about 4x."""
    import onnx

    cer, model, batches = overfit("none", tiny_corpus, 200)
    assert cer < 0.05
    export_onnx(model, tmp_path / "f.onnx")
    export_onnx(model, tmp_path / "q.onnx", int8=True)
    assert json.loads((tmp_path / "q.onnx.json").read_text())["int8"] is True
    graph = onnx.load(str(tmp_path / "f.onnx")).graph
    sizes = {init.name: 4 * int(np.prod(init.dims)) for init in graph.initializer}
    matmul_bytes = sum(sizes.get(name, 0) for node in graph.node
                       if node.op_type in ("MatMul", "Gemm") for name in node.input)
    saved = (tmp_path / "f.onnx").stat().st_size - (tmp_path / "q.onnx").stat().st_size
    assert saved > 0.6 * matmul_bytes, (saved, matmul_bytes)  # 0.75 for int8 weights alone
    float_onnx, int8_onnx = OnnxASR(tmp_path / "f.onnx"), OnnxASR(tmp_path / "q.onnx")
    floats, int8s = [], []
    for batch in batches:
        audio, lengths = batch["audio"].numpy(), batch["audio_lengths"].numpy()
        floats += float_onnx.infer(audio, lengths)
        int8s += int8_onnx.infer(audio, lengths)
    assert floats == [h.text for b in batches
                      for h in model.infer(b["audio"], b["audio_lengths"], "ctc_greedy")]
    assert corpus_error_rates(floats, int8s)["wer"] <= 0.01


def test_export_and_infer_from_the_command_line(tmp_path, ljspeech_dir, capsys):
    torch.manual_seed(0)
    model = build_model(tiny_config("none"), CharTokenizer.english())
    save_checkpoint(model, tmp_path / "m.ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "m.ckpt"), "--out",
                 str(tmp_path / "m.onnx")]) == 0
    assert "ctc: " in capsys.readouterr().out
    wav = ljspeech_dir / read_jsonl(ljspeech_dir / "manifest.jsonl")[0]["audio_filepath"]
    assert main(["infer", "--ckpt", str(tmp_path / "m.ckpt"), str(wav)]) == 0
    from_torch = capsys.readouterr()
    assert "decoding: ctc_greedy" in from_torch.err  # the user is told which search ran
    assert main(["infer", "--onnx", str(tmp_path / "m.onnx"), str(wav)]) == 0
    from_onnx = capsys.readouterr()
    assert from_onnx.out == from_torch.out
    assert "decoding: ctc_greedy (ONNX graphs: ctc)" in from_onnx.err
    assert main(["infer", "--onnx", str(tmp_path / "none.onnx"), str(wav)]) == 2
    assert "none.onnx.json not found" in capsys.readouterr().err
