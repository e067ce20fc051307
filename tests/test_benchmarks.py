"""Smoke test of benchmarks/models.py (tiny shapes; the numbers themselves are not checked)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_PRESET_KEYS = {
    "params",
    "flops_per_audio_second",
    "frontend_flops_share",
    "forward_s",
    "forward_backward_s",
    "rtfx",
}


def _load_benchmark_module():
    spec = importlib.util.spec_from_file_location(
        "asrkd_benchmark_models", ROOT / "benchmarks" / "models.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_models_benchmark_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "models.json"
    _load_benchmark_module().main(["--quick", "--presets", "student_cpu", "--json", str(out)])
    report = json.loads(out.read_text())
    assert set(report["presets"]) == {"student_cpu"}
    row = report["presets"]["student_cpu"]
    assert PER_PRESET_KEYS <= set(row)
    for key in PER_PRESET_KEYS - {"frontend_flops_share"}:
        assert row[key] > 0, key
    assert 0 < row["frontend_flops_share"] < 1  # student_cpu has a ResNet1D frontend
    assert report["rnnt_over_ctc"] > 0
    joint = report["rnnt_joint"]
    for variant in ("materialised", "fused"):
        assert joint[variant]["seconds"] > 0
        assert isinstance(joint[variant]["step_mb"], float)  # from a fresh process
    machine = report["machine"]
    assert machine["threads"] == 2
    assert machine["torch_version"] and machine["cpu_model"]
    assert len(machine["loadavg"]) == 3
