"""`asrkd bench` end to end in quick mode (tiny shapes: the figures are not checked)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from asrkd.bench import run_bench
from asrkd.data.tokenizer import CharTokenizer
from asrkd.models.e2e_asr import build_model, save_checkpoint
from asrkd.utils.timing import best_time
from test_e2e import tiny_config


@pytest.mark.slow
def test_bench_quick_writes_every_section(tmp_path, tiny_corpus):
    torch.manual_seed(0)
    checkpoints = {}
    for name, decoder in (("teacher", "transformer"), ("student", "rnnt")):
        model = build_model(tiny_config(decoder), CharTokenizer.english())
        checkpoints[name] = save_checkpoint(model, tmp_path / f"{name}.ckpt")
    out = tmp_path / "BENCHMARKS.md"
    results = run_bench(tmp_path, tiny_corpus, out, tmp_path / "b.json", tmp_path / "b.png",
                        quick=True, nemo=False, checkpoints=checkpoints)
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["models"].keys() == {"teacher", "student"}
    teacher, student = saved["models"]["teacher"], saved["models"]["student"]
    assert teacher["decoding"].keys() == {"ctc_greedy", "attention_beam"}
    assert student["decoding"].keys() == {"ctc_greedy", "rnnt_greedy", "rnnt_beam"}
    assert not saved["rnnt_untrained"]  # an RNN-T checkpoint was given: no untrained rows
    for row in saved["models"].values():
        assert row["params"] > 0 and row["train"]["audio_seconds_per_second"] > 0
        assert 0 < row["train"]["mfu"] and row["train_peak_rss_mb"] > 100
        assert row["onnx"]["onnx_int8"]["file_mb"] < row["onnx"]["onnx"]["file_mb"]
        assert row["onnx"]["onnx_int8"]["wer_vs_float"] is not None
        assert list(row["longform"]) == ["0.05", "0.1"]  # QUICK's minutes
        for longform in row["longform"].values():
            assert longform["rtfx"] > 0 and longform["peak_rss_mb"] > 100
    text = out.read_text()
    for heading in ("## Size and inference", "## Long recordings", "## Training",
                    "## Peer: NeMo", "quick mode"):
        assert heading in text
    assert "Missing: --no-nemo" in text and (tmp_path / "b.png").stat().st_size > 1000
    assert results["seconds"] < 600


def test_best_time_runs_until_min_seconds_and_keeps_the_fastest() -> None:
    durations = iter([0.03, 0.01, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02])
    calls = []

    def fn() -> None:
        calls.append(1)
        time.sleep(next(durations))

    best = best_time(fn, repeats=2, warmup=0, min_seconds=0.08)
    # Two runs (0.04 s) are not enough time; it goes on until >= 0.08 s have been timed.
    assert 4 <= len(calls) <= 6
    assert 0.009 <= best < 0.02
    calls.clear()
    durations = iter([0.001] * 10)
    best_time(fn, repeats=3, warmup=0, min_seconds=10.0, max_repeats=5)
    assert len(calls) == 5
