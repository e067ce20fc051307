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
from conftest import ROOT, an4_test_manifest

FIXTURES = ROOT / "tests" / "data" / "nemo"
VARIANTS = ("ctc", "ctc_local", "rnnt", "hybrid")


def _reference(variant: str) -> dict:
    return torch.load(FIXTURES / f"{variant}.pt", weights_only=True)


def _to_nemo_order(log_probs: torch.Tensor) -> torch.Tensor:
    """asrkd's (blank, pad, bos, eos, pieces...) columns as NeMo's (pieces..., blank)."""
    return torch.cat([log_probs[:, 4:], log_probs[:, :1]], dim=1)


def _check_against(model, reference: dict, shared: Path) -> None:
    """Encoder output, CTC log-probs, RNN-T joint log-probs (over the lattice of the reference
    transcript) and greedy transcripts of ``model`` against NeMo's ``reference``."""
    waves = [torch.from_numpy(load_audio(shared / name)) for name in reference["utterances"]]
    with torch.no_grad():
        for i, wave in enumerate(waves):
            encoded = model.encode(wave[None], torch.tensor([len(wave)]))
            frames = int(encoded.lengths[0])
            assert frames == reference["encoder"][i].shape[0]
            torch.testing.assert_close(encoded.output[0, :frames], reference["encoder"][i],
                                       atol=1e-4, rtol=0)
            if reference["log_probs"]:
                log_probs = model.ctc.log_probs(encoded.output)[0, :frames]
                torch.testing.assert_close(_to_nemo_order(log_probs), reference["log_probs"][i],
                                           atol=1e-4, rtol=0)
                assert log_probs[:, 1:4].max() < -1000  # pad/bos/eos: rows NeMo lacks
            if reference["joint"]:
                expected = reference["joint"][i]  # (frames, U + 1, N + 1)
                targets = torch.tensor([model.tokenizer.encode(reference["texts"][i])])
                assert targets.shape[1] + 1 == expected.shape[1]
                logits = model.decoder.joint(encoded.output[:, : expected.shape[0]],
                                             model.decoder.prediction(targets))[0]
                got = logits.log_softmax(-1)
                torch.testing.assert_close(torch.cat([got[..., 4:], got[..., :1]], -1), expected,
                                           atol=1e-4, rtol=0)
        # NeMo's own greedy transcripts (model.transcribe), here from one padded batch.
        audio = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
        lengths = torch.tensor([len(w) for w in waves])
        assert [h.text for h in model.infer(audio, lengths)] == reference["greedy"]
        if "ctc_greedy" in reference:  # a hybrid's CTC head
            texts = [h.text for h in model.infer(audio, lengths, method="ctc_greedy")]
            assert texts == reference["ctc_greedy"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_model_computes_what_nemo_computes(variant, an4_dir):
    model, summary = import_nemo(FIXTURES / f"{variant}.nemo")
    reference = _reference(variant)
    assert summary["pieces"] == 40
    assert (model.ctc is not None) == (variant != "rnnt")
    assert (model.decoder is not None) == (variant in ("rnnt", "hybrid"))
    _check_against(model, reference, an4_dir.parent)
    # The fixtures are not degenerate: some transcript has two words.
    assert any(len(t.split()) > 1 for t in reference.get("ctc_greedy", reference["greedy"]))


def test_checkpoint_from_the_cli_tokenises_like_nemo(tmp_path, capsys):
    out = tmp_path / "teacher.ckpt"
    assert main(["import-nemo", str(FIXTURES / "hybrid.nemo"), "--out", str(out)]) == 0
    assert "EncDecHybridRNNTCTCBPEModel" in capsys.readouterr().out
    model = load_checkpoint(out)
    imported, _ = import_nemo(FIXTURES / "hybrid.nemo")
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
    assert model.frontend is None and model.config.decoding.method == "rnnt_greedy"
    assert model.config.rnnt.joint_activation == "relu"
    assert model.config.rnnt.max_symbols_per_frame == 10


def test_imported_model_exports_to_onnx(tmp_path):
    from asrkd.export import OnnxASR, export_onnx
    from test_export import assert_onnx_ctc_matches

    model, _ = import_nemo(FIXTURES / "ctc.nemo")
    export_onnx(model, tmp_path / "m.onnx")
    torch.manual_seed(0)
    assert_onnx_ctc_matches(model, OnnxASR(tmp_path / "m.onnx"), 0.1 * torch.randn(2, 16000),
                            torch.tensor([16000, 11000]))


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
    ({"target": "nemo.collections.asr.models.ctc_models.EncDecCTCModel"}, "target="),
    ({"encoder.subsampling": "striding"}, "encoder.subsampling='striding'"),
    ({"encoder.self_attention_model": "abs_pos"}, "encoder.self_attention_model='abs_pos'"),
    ({"encoder.self_attention_model": "rel_pos_local_attn", "encoder.att_context_size": [6, 3]},
     "encoder.att_context_size=.6, 3.*symmetric"),
    ({"encoder.att_context_size": [[70, 13], [70, 0]]}, "encoder.att_context_size="),
    ({"encoder.att_context_style": "chunked_limited"}, "encoder.att_context_style="),
    ({"encoder.causal_downsampling": True}, "encoder.causal_downsampling=True"),
    ({"encoder.conv_norm_type": "group_norm"}, "encoder.conv_norm_type='group_norm'"),
    ({"tokenizer.type": "wpe"}, "tokenizer.type='wpe'"),
    ({"preprocessor.window": "hamming"}, "preprocessor.window='hamming'"),
    ({"preprocessor.frame_splicing": 3}, "preprocessor.frame_splicing=3"),
    ({"preprocessor.exact_pad": True}, "preprocessor.exact_pad=True"),
    ({"preprocessor.features": 80}, "preprocessor.featurizer.fb"),
    ({"joint.jointnet.activation": "sigmoid"}, "joint.jointnet.activation='sigmoid'"),
    ({"joint.num_extra_outputs": 5}, "joint.num_extra_outputs=5"),
    ({"decoder.prednet.norm": "layer"}, "decoder.prednet.norm='layer'"),
    ({"decoder._target_": "nemo.collections.asr.modules.StatelessTransducerDecoder"},
     "decoder._target_="),
])
def test_unsupported_models_are_refused_by_name(tmp_path, change, named):
    transducer = any(key.startswith(("joint", "decoder")) for key in change)
    source = FIXTURES / ("rnnt.nemo" if transducer else "ctc.nemo")
    path = _rewrite(source, tmp_path / "m.nemo", change)
    if "features" in next(iter(change)):  # the mel count must also be the encoder's input
        path = _rewrite(path, tmp_path / "m2.nemo", {"encoder.feat_in": 80})
    with pytest.raises(NemoImportError, match=named.replace("[", r"\[")):
        import_nemo(path)


def test_unknown_weights_are_refused(tmp_path, capsys):
    path = _rewrite(FIXTURES / "ctc.nemo", tmp_path / "m.nemo",
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
        _check_against(model, torch.load(tmp_path / f"{variant}.pt", weights_only=True),
                       an4_dir.parent)


@pytest.mark.slow
def test_student_distils_from_an_imported_teacher(tmp_path, an4_dir):
    """The issue's three commands: import, then ``student_kd_nemo`` with the teacher's
    tokenizer, features timing and 8x frames (the preset shrunk to run in seconds)."""

    from asrkd.training.pipeline import load_run_config, train

    teacher = tmp_path / "teacher.ckpt"
    assert main(["import-nemo", str(FIXTURES / "ctc.nemo"), "--out", str(teacher)]) == 0
    manifest, _ = an4_test_manifest(an4_dir, tmp_path, 6)
    overrides = [
        f"training.teacher_checkpoint={teacher}", f"output_dir={tmp_path / 'student'}",
        f"data.train_manifest={manifest}", f"data.val_manifest={manifest}",
        "model.frontend.channels=[32,32,32]", "model.encoder.d_model=32",
        "model.encoder.n_layers=1", "model.spec_augment=null", "data.max_batch_seconds=40",
        "data.speed_factors=[]", "training.optim.lr=3e-3", "training.optim.warmup_steps=2",
        "model.encoder.dropout=0.0", "model.encoder.dropout_pre_encoder=0.0",
        "trainer.max_steps=12", "trainer.max_epochs=-1", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    ]
    result = train(load_run_config(["student_kd_nemo"], overrides))
    assert result["steps"] == 12
    # The KD loss falls: the student learns from the imported teacher.
    import csv

    rows = list(csv.DictReader(open(tmp_path / "student" / "logs" / "version_0" /
                                    "metrics.csv")))
    kd = [float(r["train/kd_ctc_kl"]) for r in rows if r.get("train/kd_ctc_kl")]
    assert len(kd) == 12 and sum(kd[-3:]) < 0.8 * sum(kd[:3]), kd
    student = load_checkpoint(tmp_path / "student" / "model.ckpt")
    assert student.tokenizer.to_dict() == load_checkpoint(teacher).tokenizer.to_dict()
    assert student.subsampling_factor == 8 and not student.features.config.count_last_frame


def test_teacher_cache_of_an_imported_teacher_checks_frame_timing(tmp_path, an4_dir):
    """A cache records the teacher's frame timing; a student whose frames do not line up with
    it (asrkd's default features count one frame more than NeMo's) is refused before training,
    one that counts like NeMo is accepted."""
    from dataclasses import replace

    from asrkd.data.audio_processing import FeatureConfig
    from asrkd.errors import UserError
    from asrkd.models.e2e_asr import build_model
    from asrkd.training.teacher_cache import TeacherCache, cache_teacher
    from test_e2e import tiny_config

    teacher, _ = import_nemo(FIXTURES / "ctc.nemo")
    manifest, _ = an4_test_manifest(an4_dir, tmp_path, 2)
    cache_teacher(teacher, manifest, tmp_path / "cache.pt")
    cache = TeacherCache(tmp_path / "cache.pt")
    assert cache.frame_timing == {"sample_rate": 16000, "hop_length": 160,
                                  "count_last_frame": False}
    student = build_model(tiny_config("none"), teacher.tokenizer)
    with pytest.raises(UserError, match="count_last_frame False .teacher. vs True .student."):
        cache.check_compatible(student)
    cache.check_compatible(build_model(
        replace(tiny_config("none"), features=FeatureConfig(count_last_frame=False)),
        teacher.tokenizer))

