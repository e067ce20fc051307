"""The LibriSpeech recipe end to end on its tiny LibriSpeech-shaped tree (built from AN4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.shared_data
def test_tiny_librispeech_recipe_runs_every_stage(an4_dir, tmp_path):
    exp, out = tmp_path / "exp", tmp_path / "report"
    process = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "librispeech" / "run.py"), "--tiny",
         "--shared", str(an4_dir), "--exp", str(exp), "--out", str(out)],
        capture_output=True, text=True, timeout=1200, cwd=ROOT, env={**os.environ, "CI": "true"})
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
    # Stage 0: a LibriSpeech tree read into manifests, one per evaluation set.
    prepared = json.loads((exp / "manifests" / "prepared.json").read_text())
    assert prepared["train"]["utterances"] == 96
    assert all(prepared[s]["utterances"] > 0
               for s in ("dev-clean", "dev-other", "test-clean", "test-other"))
    first = json.loads((exp / "manifests" / "train.jsonl").read_text().splitlines()[0])
    assert first["text"] == first["text"].upper() and first["speaker"].isdigit()
    # Stages 1-2: shards and the shared BPE tokenizer.
    assert json.loads((exp / "shards" / "index.json").read_text())["utterances"] == 96
    assert json.loads((exp / "tokenizer.json").read_text())["type"] == "sentencepiece"
    # Stage 3: three models trained from shards; the KD student from the sharded teacher cache.
    for name in ("teacher", "student", "student_kd"):
        run_config = json.loads((exp / name / "run_config.json").read_text())
        assert run_config["data"]["train_shards"] == str(exp / "shards")
    cache = json.loads((exp / "teacher_cache_shards" / "teacher.json").read_text())
    assert cache["speed_factors"] == [0.9, 1.0, 1.1] and cache["bytes_per_audio_hour"] > 0
    kd_config = json.loads((exp / "student_kd" / "run_config.json").read_text())
    assert kd_config["training"]["teacher_cache"] == str(exp / "teacher_cache_shards")
    # Stage 4: every model scored on the four evaluation sets, in the report.
    results = json.loads((out / "eval_sets.json").read_text())
    assert set(results) == {"teacher", "student", "student_kd"}
    assert all(set(r) == {"dev-clean", "dev-other", "test-clean", "test-other"}
               for r in results.values())
    assert "## WER on the LibriSpeech evaluation sets" in (out / "report.md").read_text()
