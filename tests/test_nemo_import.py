"""``asrkd import-nemo``: NeMo FastConformer CTC checkpoints as asrkd models.

The fixtures (``tests/data/nemo/<variant>.nemo`` and ``.pt``) were made by
``benchmarks/nemo_fixtures.py`` in NeMo's own venv: tiny FastConformer CTC models with random
batch-norm statistics and biases, and NeMo's encoder output, CTC log-probs and greedy
transcripts on three AN4 test utterances. NeMo is never imported here; the tests that need the
audio skip when ../shared/data is absent (a user's clone). ``test_live_nemo`` rebuilds the
fixtures with a NeMo venv (``ASRKD_NEMO_PYTHON``) when there is one and skips otherwise.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from asrkd.cli import main
from asrkd.data.audio_processing import load_audio
from asrkd.models.e2e_asr import load_checkpoint
from asrkd.models.nemo_import import NemoImportError, import_nemo, read_nemo
from conftest import ROOT

FIXTURES = ROOT / "tests" / "data" / "nemo"
VARIANTS = ("ctc_a", "ctc_b")


def _reference(variant: str) -> dict:
    return torch.load(FIXTURES / f"{variant}.pt", weights_only=True)


def _to_nemo_order(log_probs: torch.Tensor) -> torch.Tensor:
    """asrkd's (blank, pad, bos, eos, pieces...) columns as NeMo's (pieces..., blank)."""
    return torch.cat([log_probs[:, 4:], log_probs[:, :1]], dim=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_model_computes_what_nemo_computes(variant, an4_dir):
    model, summary = import_nemo(FIXTURES / f"{variant}.nemo")
    reference = _reference(variant)
    assert summary["pieces"] == reference["log_probs"][0].shape[1] - 1
    waves = [torch.from_numpy(load_audio(an4_dir.parent / name))
             for name in reference["utterances"]]
    lengths = torch.tensor([len(w) for w in waves])
    with torch.no_grad():
        for wave, enc_ref, lp_ref in zip(waves, reference["encoder"], reference["log_probs"]):
            encoded = model.encode(wave[None], torch.tensor([len(wave)]))
            frames = int(encoded.lengths[0])
            assert frames == enc_ref.shape[0]
            torch.testing.assert_close(encoded.output[0, :frames], enc_ref, atol=1e-4, rtol=0)
            log_probs = model.ctc.log_probs(encoded.output)[0, :frames]
            torch.testing.assert_close(_to_nemo_order(log_probs), lp_ref, atol=1e-4, rtol=0)
            assert log_probs[:, 1:4].max() < -1000  # pad/bos/eos: rows NeMo does not have
        # NeMo's own greedy transcripts (model.transcribe), one padded batch here.
        audio = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
        texts = [h.text for h in model.infer(audio, lengths, method="ctc_greedy")]
    assert texts == reference["greedy"]
    assert any(len(t.split()) > 1 for t in texts)  # the fixture is not degenerate


def test_checkpoint_from_the_cli_tokenises_like_nemo(tmp_path, capsys):
    out = tmp_path / "teacher.ckpt"
    assert main(["import-nemo", str(FIXTURES / "ctc_a.nemo"), "--out", str(out)]) == 0
    assert "EncDecCTCModelBPE" in capsys.readouterr().out
    model = load_checkpoint(out)
    imported, _ = import_nemo(FIXTURES / "ctc_a.nemo")
    for key, value in imported.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # NeMo's ids are SentencePiece's; asrkd's are the same pieces 4 places on, and the text
    # reaches SentencePiece unchanged (no lowercasing or digit spelling).
    tokenizer = model.tokenizer
    processor = tokenizer.processor
    for text in ("rubout g m e f three nine", "Stop 7"):  # "S" and "7" are <unk> pieces
        assert tokenizer.encode(text) == [i + 4 for i in processor.encode(text)]
    text = "rubout g m e f three nine"
    assert tokenizer.decode(tokenizer.encode(text)) == processor.decode(processor.encode(text))
    assert model.features.config.preemphasis == 0.97 and model.features.config.n_mels == 64
    assert model.frontend is None and model.decoder is None


def test_imported_model_exports_to_onnx(tmp_path):
    from asrkd.export import OnnxASR, export_onnx

    model, _ = import_nemo(FIXTURES / "ctc_b.nemo")
    export_onnx(model, tmp_path / "m.onnx")
    torch.manual_seed(0)
    audio = 0.1 * torch.randn(2, 16000)
    lengths = torch.tensor([16000, 11000])
    with torch.no_grad():
        encoded = model.encode(audio, lengths)
        expected = model.ctc.log_probs(encoded.output)
    got, got_lengths = OnnxASR(tmp_path / "m.onnx").ctc_log_probs(audio.numpy(), lengths.numpy())
    assert got_lengths.tolist() == encoded.lengths.tolist()
    for b, frames in enumerate(encoded.lengths.tolist()):
        assert abs(got[b, :frames] - expected[b, :frames].numpy()).max() < 1e-4


def _rewrite(source: Path, target: Path, config_changes: dict | None = None,
             extra_weights: dict | None = None) -> Path:
    """A copy of ``source`` with changed config keys (dotted paths) or extra weights."""
    archive = read_nemo(source)
    config = archive.config
    for dotted, value in (config_changes or {}).items():
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    with tarfile.open(source) as src, tarfile.open(target, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("model_config.yaml"):
                data = yaml.safe_dump(config).encode()
            elif member.name.endswith("model_weights.ckpt") and extra_weights:
                state = torch.load(io.BytesIO(data), weights_only=True)
                buffer = io.BytesIO()
                torch.save({**state, **extra_weights}, buffer)
                data = buffer.getvalue()
            if data is None:
                dst.addfile(member)
            else:
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
    return target


@pytest.mark.parametrize(("change", "named"), [
    ({"target": "nemo.collections.asr.models.rnnt_bpe_models.EncDecRNNTBPEModel"}, "target="),
    ({"encoder.subsampling": "striding"}, "encoder.subsampling='striding'"),
    ({"encoder.self_attention_model": "abs_pos"}, "encoder.self_attention_model='abs_pos'"),
    ({"encoder.att_context_size": [[70, 13], [70, 0]]}, "encoder.att_context_size="),
    ({"encoder.att_context_style": "chunked_limited"}, "encoder.att_context_style="),
    ({"encoder.causal_downsampling": True}, "encoder.causal_downsampling=True"),
    ({"encoder.conv_norm_type": "group_norm"}, "encoder.conv_norm_type='group_norm'"),
    ({"tokenizer.type": "wpe"}, "tokenizer.type='wpe'"),
    ({"preprocessor.window": "hamming"}, "preprocessor.window='hamming'"),
    ({"preprocessor.frame_splicing": 3}, "preprocessor.frame_splicing=3"),
    ({"preprocessor.exact_pad": True}, "preprocessor.exact_pad=True"),
    ({"preprocessor.features": 80}, "preprocessor.featurizer.fb"),
])
def test_unsupported_models_are_refused_by_name(tmp_path, change, named):
    path = _rewrite(FIXTURES / "ctc_a.nemo", tmp_path / "m.nemo", change)
    if "features" in next(iter(change)):  # the mel count must also be the encoder's input
        path = _rewrite(path, tmp_path / "m2.nemo", {"encoder.feat_in": 80})
    with pytest.raises(NemoImportError, match=named.replace("[", r"\[")):
        import_nemo(path)


def test_unknown_weights_are_refused(tmp_path, capsys):
    path = _rewrite(FIXTURES / "ctc_a.nemo", tmp_path / "m.nemo",
                    extra_weights={"encoder.layers.0.adapter_layer.linear.weight":
                                   torch.zeros(2, 2)})
    with pytest.raises(NemoImportError, match="adapter_layer"):
        import_nemo(path)
    # The CLI: exit 2 and one line, no traceback, no checkpoint.
    assert main(["import-nemo", str(path), "--out", str(tmp_path / "x.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "adapter_layer" in err
    assert not (tmp_path / "x.ckpt").exists()
    assert main(["import-nemo", str(tmp_path / "absent.nemo"), "--out", "x.ckpt"]) == 2
    (tmp_path / "not.nemo").write_text("hello")
    with pytest.raises(NemoImportError, match="not a .nemo archive"):
        import_nemo(tmp_path / "not.nemo")


NEMO_PYTHON = os.environ.get("ASRKD_NEMO_PYTHON")


@pytest.mark.skipif(not NEMO_PYTHON, reason="set ASRKD_NEMO_PYTHON to a NeMo venv's python "
                    "(benchmarks/install_nemo.sh) to rebuild the NeMo fixtures live")
def test_live_nemo(tmp_path, an4_dir):
    """Rebuild the fixtures with the NeMo at hand and check the importer against them."""
    subprocess.run([NEMO_PYTHON, str(ROOT / "benchmarks" / "nemo_fixtures.py"),
                    "--shared", str(an4_dir.parent), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for variant in VARIANTS:
        model, _ = import_nemo(tmp_path / f"{variant}.nemo")
        reference = torch.load(tmp_path / f"{variant}.pt", weights_only=True)
        for name, expected in zip(reference["utterances"], reference["log_probs"]):
            wave = torch.from_numpy(load_audio(an4_dir.parent / name))
            with torch.no_grad():
                encoded = model.encode(wave[None], torch.tensor([len(wave)]))
                got = model.ctc.log_probs(encoded.output)[0, : int(encoded.lengths[0])]
            torch.testing.assert_close(_to_nemo_order(got), expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_student_distils_from_an_imported_teacher(tmp_path, an4_dir):
    """The issue's three commands: import, then ``student_kd_nemo`` with the teacher's
    tokenizer, features timing and 8x frames (the preset shrunk to run in seconds)."""
    import json

    from asrkd.training.pipeline import load_run_config, train

    teacher = tmp_path / "teacher.ckpt"
    assert main(["import-nemo", str(FIXTURES / "ctc_a.nemo"), "--out", str(teacher)]) == 0
    manifest = tmp_path / "an4.jsonl"
    rows = [json.loads(line) for line in
            (an4_dir / "manifest_test.jsonl").read_text().splitlines()[:6]]
    manifest.write_text("".join(
        json.dumps({**row, "audio_filepath": str(an4_dir / row["audio_filepath"])}) + "\n"
        for row in rows))
    overrides = [
        f"training.teacher_checkpoint={teacher}", f"output_dir={tmp_path / 'student'}",
        f"data.train_manifest={manifest}", f"data.val_manifest={manifest}",
        "model.frontend.channels=[32,32,32]", "model.encoder.d_model=32",
        "model.encoder.n_layers=1", "data.max_batch_seconds=20", "data.speed_factors=[]",
        "trainer.max_steps=2", "trainer.max_epochs=-1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    result = train(load_run_config(["student_kd_nemo"], overrides))
    assert result["steps"] == 2
    student = load_checkpoint(tmp_path / "student" / "model.ckpt")
    assert student.tokenizer.to_dict() == load_checkpoint(teacher).tokenizer.to_dict()
    assert student.subsampling_factor == 8 and not student.features.config.count_last_frame
