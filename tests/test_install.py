"""asrkd works installed from a wheel, not only from a checkout.

``pip install .`` (not editable) of a copy of the source into a fresh target folder, then, from
an empty working directory, ``asrkd presets`` and a 2-step ``asrkd train --config teacher``
(a preset shipped as package data, found by name) on a tiny manifest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_runs_from_an_empty_directory(tmp_path, tiny_corpus):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(site), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    assert not (site / "asrkd" / "configs").is_symlink()
    assert (site / "asrkd" / "configs" / "presets" / "teacher.yaml").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def asrkd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "asrkd.cli", *args], cwd=empty, env=env,
                              capture_output=True, text=True, timeout=600)

    where = subprocess.run([sys.executable, "-c", "import asrkd; print(asrkd.__file__)"],
                           cwd=empty, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout

    presets = asrkd("presets")
    assert presets.returncode == 0, presets.stderr[-2000:]
    assert "teacher_cpu" in presets.stdout and "student_cpu" in presets.stdout

    tiny = {
        "model.encoder.d_model": "64", "model.encoder.n_heads": "2",
        "model.encoder.n_layers": "1", "model.frontend.channels": "[32,32]",
        "model.transformer.n_layers": "1", "model.transformer.ff_dim": "128",
    }
    train = asrkd(
        "train", "--config", "teacher", *(f"{k}={v}" for k, v in tiny.items()),
        f"data.train_manifest={tiny_corpus / 'train.jsonl'}",
        f"data.val_manifest={tiny_corpus / 'val.jsonl'}",
        "data.max_batch_seconds=20", "output_dir=run", "trainer.max_steps=2",
        "trainer.max_epochs=-1", "trainer.enable_progress_bar=false",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert (empty / "run" / "model.ckpt").is_file()  # relative to the working directory
    assert not (site / "run").exists()
