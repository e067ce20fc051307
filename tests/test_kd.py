"""Distillation end to end: frozen teacher, student-only checkpoints, config errors, DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asrkd.config import ConfigError
from asrkd.data.tokenizer import CharTokenizer
from asrkd.losses import ASRLoss
from asrkd.models.e2e_asr import build_model, save_checkpoint
from asrkd.training.callbacks import parameters_fingerprint
from asrkd.training.distillation import KDConfig, build_kd
from asrkd.training.pipeline import load_run_config, train
from test_e2e import random_batch, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _teacher_checkpoint(tmp_path: Path, decoder: str = "transformer") -> Path:
    torch.manual_seed(1)
    teacher = build_model(tiny_config(decoder), CharTokenizer.english())
    return save_checkpoint(teacher, tmp_path / "teacher.ckpt")


def _targets(tokenizer, texts):
    encoded = [tokenizer.encode(t) for t in texts]
    targets = torch.full((len(texts), max(map(len, encoded))), tokenizer.pad_id)
    for row, ids in enumerate(encoded):
        targets[row, : len(ids)] = torch.tensor(ids)
    return targets, torch.tensor([len(ids) for ids in encoded])


@pytest.mark.parametrize("decoder, losses", [
    ("transformer", ("ctc_kl", "token_kl", "hidden")),
    ("rnnt", ("ctc_kl", "rnnt_kl")),
])
def test_kd_loss_is_zero_when_student_equals_teacher(decoder, losses):
    tokenizer = CharTokenizer.english()
    torch.manual_seed(0)
    teacher = build_model(tiny_config(decoder), tokenizer)
    student = build_model(tiny_config(decoder), tokenizer)
    student.load_state_dict(teacher.state_dict())
    config = KDConfig(temperature=1.0, losses=losses)
    wrapper = build_kd(student, ASRLoss(), teacher=teacher, config=config)
    if "hidden" in losses:  # identity projections: equal states give zero distance
        for projection in wrapper.kd_loss_fn.losses["hidden"].projections:
            torch.nn.init.eye_(projection.weight)
            torch.nn.init.zeros_(projection.bias)
    wrapper.eval()
    audio, lengths = random_batch()
    targets, target_lengths = _targets(tokenizer, ["hello there", "hi"])
    parts = wrapper(audio, lengths, targets, target_lengths)
    for name in losses:
        assert parts[f"kd_{name}"].abs() < 1e-5, (name, parts[f"kd_{name}"])
    assert torch.isclose(parts["total"], 0.5 * parts["asr"] + 0.5 * parts["kd"])


def test_wrapper_keeps_teacher_out_of_the_trainable_tree():
    tokenizer = CharTokenizer.english()
    teacher = build_model(tiny_config(), tokenizer)
    student = build_model(tiny_config(), tokenizer)
    wrapper = build_kd(student, ASRLoss(), teacher=teacher, config=KDConfig())
    wrapper.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    trainable = {id(p) for p in wrapper.parameters()}
    assert not trainable & {id(p) for p in teacher.parameters()}
    assert not any(k.startswith("teacher") for k in wrapper.state_dict())
    wrapper.double()
    assert next(teacher.parameters()).dtype == torch.float64


def test_mismatched_vocabulary_and_frame_rate_are_named():
    from dataclasses import replace

    teacher = build_model(tiny_config(), CharTokenizer.english())
    student = build_model(tiny_config(), CharTokenizer(list("abc ")))
    with pytest.raises(ValueError, match="vocabulary size 33 .teacher. vs 9 .student."):
        build_kd(student, ASRLoss(), teacher=teacher, config=KDConfig())
    config = tiny_config()
    student = build_model(
        replace(config, encoder=replace(config.encoder, subsampling_factor=4)),
        CharTokenizer.english(),
    )
    with pytest.raises(ValueError, match="frame rate 8 .teacher. vs 4 .student."):
        build_kd(student, ASRLoss(), teacher=teacher, config=KDConfig())


def test_rnnt_weighting_reaches_the_loss_and_changes_it():
    tokenizer = CharTokenizer.english()
    torch.manual_seed(0)
    teacher = build_model(tiny_config("rnnt"), tokenizer)
    student = build_model(tiny_config("rnnt"), tokenizer)
    audio, lengths = random_batch()
    targets, target_lengths = _targets(tokenizer, ["hello there", "hi"])
    values = {}
    for weighting in ("uniform", "occupancy"):
        config = KDConfig(losses=("rnnt_kl",), rnnt_weighting=weighting)
        wrapper = build_kd(student, ASRLoss(), teacher=teacher, config=config).eval()
        assert wrapper.kd_loss_fn.losses["rnnt_kl"].weighting == weighting
        values[weighting] = wrapper(audio, lengths, targets, target_lengths)["kd_rnnt_kl"]
    assert values["uniform"] > 0 and values["occupancy"] > 0
    assert not torch.isclose(values["uniform"], values["occupancy"])
    run = load_run_config(overrides=["training.kd.rnnt_weighting=occupancy"])
    assert run.training.kd.rnnt_weighting == "occupancy"
    with pytest.raises(ConfigError, match="rnnt_weighting must be one of uniform, occupancy"):
        load_run_config(overrides=["training.kd.rnnt_weighting=occupancy_mean"])


def test_config_typos_name_the_key():
    with pytest.raises(ConfigError, match="'training.kd.temprature' .did you mean 'temperature'"):
        load_run_config(overrides=["training.kd.temprature=2"])
    with pytest.raises(ConfigError, match="'trainer.max_step'"):
        from asrkd.training.trainer import build_trainer

        build_trainer({"max_step": 3}, "/tmp/unused")
    with pytest.raises(ConfigError, match="unknown KD loss 'ctc_kll'"):
        load_run_config(overrides=["training.kd.losses=[ctc_kll]"])


def _tiny_run_overrides(corpus: Path, out: Path, steps: int = 3) -> list[str]:
    tiny = {
        "model.frontend.channels": "[32]", "model.frontend.strides": "[1]",
        "model.encoder.subsampling": "dw_striding", "model.encoder.d_model": "64",
        "model.encoder.n_heads": "2", "model.encoder.n_layers": "2",
        "model.encoder.subsampling_channels": "32", "model.encoder.subsampling_factor": "8",
        "model.transformer.d_model": "64",
        "model.transformer.n_layers": "1", "model.transformer.ff_dim": "128",
    }
    return [f"{k}={v}" for k, v in tiny.items()] + [
        f"output_dir={out}",
        f"data.train_manifest={corpus / 'train.jsonl'}",
        f"data.val_manifest={corpus / 'val.jsonl'}",
        "data.max_batch_seconds=20",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]


@pytest.mark.slow
def test_kd_training_run_leaves_teacher_bit_identical(tmp_path, tiny_corpus):
    teacher_path = _teacher_checkpoint(tmp_path)
    teacher_before = torch.load(teacher_path, weights_only=True)["state_dict"]
    overrides = _tiny_run_overrides(tiny_corpus, tmp_path / "kd") + [
        "training.use_kd=true",
        f"training.teacher_checkpoint={teacher_path}",
        "training.kd.losses=[ctc_kl, token_kl, hidden]",
        "trainer.val_check_interval=2",
        "trainer.check_val_every_n_epoch=null",
    ]
    # TeacherStaysFrozen (always on) raises if the teacher leaves eval, gets a gradient, or
    # changes; the run finishing is part of the test.
    result = train(load_run_config(overrides=overrides))
    assert result["steps"] == 3
    student = torch.load(tmp_path / "kd" / "model.ckpt", weights_only=True)
    assert not any("teacher" in key for key in student["state_dict"])
    from asrkd.models.e2e_asr import load_checkpoint

    load_checkpoint(tmp_path / "kd" / "model.ckpt")  # loads without the teacher
    teacher_after = torch.load(teacher_path, weights_only=True)["state_dict"]
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)


@pytest.mark.slow
def test_teacher_stays_in_eval_mode_through_fit(tmp_path, tiny_corpus):
    import lightning as L

    from asrkd.data.datamodule import ASRDataModule
    teacher_path = _teacher_checkpoint(tmp_path)
    from asrkd.training.builder import build_module
    from asrkd.training.pipeline import TrainingConfig

    module = build_module(tiny_config(), CharTokenizer.english(), TrainingConfig(use_kd=True),
                          teacher_checkpoint=str(teacher_path))
    fingerprint = parameters_fingerprint(module.teacher)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            teacher = pl_module.teacher
            seen.append((any(m.training for m in teacher.modules()),
                         any(p.grad is not None for p in teacher.parameters()),
                         pl_module.model.training))

    data = ASRDataModule(str(tiny_corpus / "train.jsonl"), str(tiny_corpus / "val.jsonl"),
                         max_batch_seconds=20)
    data.attach_tokenizer(module.tokenizer)
    trainer = L.Trainer(max_steps=3, callbacks=[Spy()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=data)
    assert len(seen) == 3
    assert all(not teacher_training and not grads and student_training
               for teacher_training, grads, student_training in seen)
    assert parameters_fingerprint(module.teacher) == fingerprint


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path, tiny_corpus):
    overrides = _tiny_run_overrides(tiny_corpus, tmp_path / "ddp", steps=2) + [
        "trainer.devices=2", "trainer.strategy=ddp",
    ]
    process = subprocess.run(
        [sys.executable, "-m", "asrkd.cli", "train", *overrides],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads((tmp_path / "ddp" / "train_result.json").read_text())
    assert result["steps"] == 2


def test_kd_from_teacher_cache_equals_online_kd(tmp_path, tiny_corpus):
    from asrkd.data.dataset import ManifestDataset, collate_batch
    from asrkd.training.teacher_cache import TeacherCache, cache_teacher

    tokenizer = CharTokenizer.english()
    teacher_path = _teacher_checkpoint(tmp_path)
    manifest = tiny_corpus / "train.jsonl"
    cache_teacher(teacher_path, manifest, tmp_path / "cache.pt", top_k=tokenizer.vocab_size)
    torch.manual_seed(3)
    student = build_model(tiny_config(), tokenizer)
    config = KDConfig(losses=("ctc_kl",), temperature=2.0)
    from asrkd.models.teacher_model import load_teacher

    online = build_kd(student, ASRLoss(), teacher=load_teacher(teacher_path), config=config)
    cached = build_kd(student, ASRLoss(), config,
                      teacher_cache=TeacherCache(tmp_path / "cache.pt"))
    online.eval()
    cached.eval()  # no dropout: both see the same student outputs
    dataset = ManifestDataset(manifest, tokenizer)
    batch = collate_batch([dataset[i] for i in range(4)])
    args = (batch["audio"], batch["audio_lengths"], batch["targets"], batch["target_lengths"])
    a = online(*args)
    b = cached(*args, keys=batch["keys"])
    assert torch.allclose(a["kd_ctc_kl"], b["kd_ctc_kl"], atol=1e-5)
    assert torch.allclose(a["total"], b["total"], atol=1e-5)
    with pytest.raises(ValueError, match="kd.losses to .ctc_kl."):
        build_kd(student, ASRLoss(), KDConfig(),
                 teacher_cache=TeacherCache(tmp_path / "cache.pt"))
