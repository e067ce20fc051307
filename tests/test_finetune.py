"""Fine-tuning from a trained checkpoint (``training.init_checkpoint``) and checkpoint
averaging (``training.average_best``)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from asrkd.data.tokenizer import CharTokenizer
from asrkd.models.e2e_asr import CheckpointError, build_model, read_checkpoint, save_checkpoint
from asrkd.training.pipeline import (
    _initialise,
    average_state_dicts,
    load_run_config,
    train,
)
from resume_child import overrides
from test_e2e import tiny_config


def _state(path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


@pytest.mark.slow
def test_fine_tuning_starts_from_the_checkpoint(tmp_path, tiny_corpus):
    first = train(load_run_config(overrides=overrides(tiny_corpus, tmp_path / "a", steps=4)))
    # lr 0: AdamW leaves every weight where it started (its decay is scaled by lr too), so the
    # fine-tuned model must equal the checkpoint it started from, tokenizer included.
    again = load_run_config(overrides=overrides(tiny_corpus, tmp_path / "b", steps=2) + [
        f"training.init_checkpoint={first['checkpoint']}", "training.optim.lr=0",
        "model.tokenizer.kind=char_from_data"])  # ignored: the checkpoint's tokenizer is used
    train(again)
    start, tuned = _state(first["checkpoint"]), _state(tmp_path / "b" / "model.ckpt")
    assert start.keys() == tuned.keys()
    changed = [k for k in start if not torch.equal(start[k], tuned[k])]
    # Only batch-norm running statistics move without a learning rate.
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert all(k.endswith(statistics) for k in changed), changed
    assert any(k.endswith(".weight") for k in start)
    assert (read_checkpoint(tmp_path / "b" / "model.ckpt")["tokenizer"]
            == read_checkpoint(first["checkpoint"])["tokenizer"])
    # Without the checkpoint the same run starts from random weights.
    fresh = load_run_config(overrides=overrides(tiny_corpus, tmp_path / "c", steps=2)
                            + ["training.optim.lr=0"])
    train(fresh)
    other = _state(tmp_path / "c" / "model.ckpt")
    assert not all(torch.equal(start[k], other[k]) for k in start if k in other)


def test_init_checkpoint_of_another_model_is_named(tmp_path):
    path = save_checkpoint(build_model(tiny_config(), CharTokenizer.english()),
                           tmp_path / "small.ckpt")
    config = tiny_config()
    wider = build_model(replace(config, encoder=replace(config.encoder, d_model=96)),
                        CharTokenizer.english())
    with pytest.raises(CheckpointError, match=r"does not fit this run's model \(.*is \(.*64"):
        _initialise(wider, str(path))
    other_vocab = build_model(tiny_config(), CharTokenizer(list("abc ")))
    with pytest.raises(CheckpointError, match="another tokenizer"):
        _initialise(other_vocab, str(path))


def test_average_state_dicts():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(7), "h": torch.tensor([1.0],
                                                                                 dtype=torch.bfloat16)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9), "h": torch.tensor([2.0],
                                                                                 dtype=torch.bfloat16)}
    mean = average_state_dicts([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0]))
    assert mean["n"].item() == 7  # counters are not averaged
    assert mean["h"].dtype == torch.bfloat16 and mean["h"].item() == 1.5


@pytest.mark.slow
def test_average_best_keeps_the_average_only_where_it_validates_better(tmp_path, tiny_corpus):
    config = load_run_config(overrides=overrides(tiny_corpus, tmp_path / "avg", steps=12) + [
        "trainer.val_check_interval=3", "training.average_best=3"])
    result = train(config)
    averaged = result["averaged"]
    assert averaged["checkpoints"] == 3 and len(set(averaged["steps"])) == 3
    assert json.loads((tmp_path / "avg" / "train_result.json").read_text())["averaged"] == averaged
    assert len(list((tmp_path / "avg" / "checkpoints").glob("best-*.ckpt"))) == 3
    final = _state(tmp_path / "avg" / "model.ckpt")
    best_path = min((tmp_path / "avg" / "checkpoints").glob("best-*.ckpt"),
                    key=lambda p: float(p.stem.split("val_wer=")[1]))
    best = {k.removeprefix("model."): v for k, v in
            torch.load(best_path, weights_only=True)["state_dict"].items()
            if k.startswith("model.")}
    same_as_best = all(torch.equal(final[k], best[k]) for k in final)
    assert same_as_best == (not averaged["used"])
    assert averaged["used"] == (averaged["val_wer_average"] <= averaged["val_wer_best"])


def test_average_best_must_be_positive():
    from asrkd.errors import ConfigError

    config = load_run_config(overrides=["training.average_best=0"])
    with pytest.raises(ConfigError, match="average_best=0"):
        train(config)
