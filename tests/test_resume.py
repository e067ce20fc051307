"""Faults and resumption: atomic checkpoints, kill -9 and resume, NaN batches."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch

import asrkd.utils.io as io_module
from asrkd.data.datamodule import DurationBatchSampler
from asrkd.modelmodule import ModelModule
from asrkd.models.e2e_asr import CheckpointError, safe_load
from asrkd.training.callbacks import TrainingDivergedError
from asrkd.training.pipeline import load_run_config, train
from asrkd.utils.io import atomic_save
from resume_child import overrides

HERE = Path(__file__).resolve().parent


def _child(corpus: Path, out: Path, kill_at: int = 0, resume: bool = False,
           shards: Path | None = None) -> int:
    process = subprocess.run(
        [sys.executable, str(HERE / "resume_child.py"), str(corpus), str(out), str(kill_at),
         "1" if resume else "0"] + ([str(shards)] if shards else []),
        capture_output=True, text=True, timeout=600,
    )
    if process.returncode not in (0, -9):
        raise AssertionError(process.stderr[-3000:])
    return process.returncode


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return safe_load(path)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["manifest", "shards"])
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_corpus, source):
    shards = None
    if source == "shards":  # streamed by 2 loader workers: their interleaving must resume too
        from asrkd.data.shards import write_shards

        shards = tmp_path / "shards"
        write_shards(tiny_corpus / "train.jsonl", shards, shard_seconds=4.0)
    assert _child(tiny_corpus, tmp_path / "whole", shards=shards) == 0
    # Killed after step 11: the last checkpoint is step 10, mid-way through the second epoch.
    assert _child(tiny_corpus, tmp_path / "cut", kill_at=11, shards=shards) == -9
    cut = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert safe_load(cut)["global_step"] == 10
    assert not list((tmp_path / "cut" / "checkpoints").glob("*.tmp-*"))
    assert not (tmp_path / "cut" / "model.ckpt").exists()
    assert _child(tiny_corpus, tmp_path / "cut", resume=True, shards=shards) == 0
    for name in ("checkpoints/last.ckpt", "model.ckpt"):
        whole, resumed = _weights(tmp_path / "whole" / name), _weights(tmp_path / "cut" / name)
        assert whole.keys() == resumed.keys()
        for key in whole:  # bit-identical: data order, RNG, optimizer and scheduler resumed
            assert torch.equal(whole[key], resumed[key]), (name, key)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    train(load_run_config(overrides=overrides(tiny_corpus, out, steps=2)))
    changed = overrides(tiny_corpus, out, steps=4) + ["model.encoder.d_model=32"]
    with pytest.raises(CheckpointError, match="model_config: encoder.d_model 64 there vs 32 now"):
        train(load_run_config(overrides=changed), resume=True)


def test_atomic_save_keeps_the_old_file_when_a_write_dies(tmp_path, monkeypatch):
    path = atomic_save({"step": 1}, tmp_path / "last.ckpt")

    def dies_half_way(obj, handle):  # noqa: ANN001
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a crash in the middle of the write

    monkeypatch.setattr(io_module.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert safe_load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_lightning_advances_the_epoch_of_the_batch_sampler():
    sampler = DurationBatchSampler([1.0] * 40, max_batch_seconds=4, seed=0)
    loader = torch.utils.data.DataLoader(range(40), batch_sampler=sampler)
    first = list(sampler)
    _set_sampler_epoch(loader, 1)  # what Lightning calls at every epoch start
    assert sampler.epoch == 1 and list(sampler) != first


def _poison(monkeypatch, bad_calls: set[int] | None, gradient: bool = False) -> None:
    """Make the training loss (or only its gradient) non-finite on the given calls."""
    original = ModelModule.loss_parts
    calls = {"n": 0}

    def loss_parts(self, batch):  # noqa: ANN001, ANN202
        parts = original(self, batch)
        if self.training:
            calls["n"] += 1
            if bad_calls is None or calls["n"] in bad_calls:
                total = parts["total"] * 1.0
                if gradient:
                    total.register_hook(lambda g: g * math.inf)
                else:
                    total = total * math.nan
                parts = {**parts, "total": total}
        return parts

    monkeypatch.setattr(ModelModule, "loss_parts", loss_parts)


@pytest.mark.parametrize("gradient", [False, True], ids=["nan-loss", "inf-gradient"])
def test_non_finite_batches_are_skipped_and_counted(tmp_path, tiny_corpus, monkeypatch,
                                                    gradient):
    _poison(monkeypatch, {2, 3}, gradient)
    result = train(load_run_config(overrides=overrides(tiny_corpus, tmp_path / "r", steps=6)))
    assert result["skipped_batches"] == 2
    weights = _weights(tmp_path / "r" / "model.ckpt")
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_too_many_bad_batches_in_a_row_stop_with_the_checkpoint_kept(tmp_path, tiny_corpus,
                                                                      monkeypatch):
    _poison(monkeypatch, set(range(5, 100)))
    config = load_run_config(overrides=overrides(tiny_corpus, tmp_path / "r", steps=40)
                             + ["training.max_bad_batches_in_a_row=4"])
    with pytest.raises(TrainingDivergedError, match="4 batches in a row .* --resume"):
        train(config)
    last = safe_load(tmp_path / "r" / "checkpoints" / "last.ckpt")
    # Skipped batches still count as steps, but their updates were dropped: the checkpoint
    # holds the weights of step 4 (the last good one), and they are finite.
    assert 4 <= last["global_step"] < 8
    assert all(torch.isfinite(w).all() for w in last["state_dict"].values()
               if w.is_floating_point())
