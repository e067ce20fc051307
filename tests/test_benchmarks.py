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


def _load(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(f"asrkd_benchmark_{name}",
                                                  ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_longform_and_edges_benchmarks_on_a_tiny_model(tmp_path: Path) -> None:
    import numpy as np
    import soundfile as sf
    import torch

    from asrkd.data.tokenizer import CharTokenizer
    from asrkd.models.e2e_asr import build_model, save_checkpoint
    from test_e2e import tiny_config

    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(tiny_config("transformer"), CharTokenizer.english()),
                           tmp_path / "m.ckpt")
    rng = np.random.default_rng(0)
    lines = []
    for k in range(4):
        path = tmp_path / f"u{k}.wav"
        sf.write(path, (0.1 * rng.standard_normal(16000 * (2 + k))).astype(np.float32), 16000)
        lines.append(json.dumps({"audio_filepath": str(path), "duration": 2 + k,
                                 "text": "a b"}) + "\n")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(lines))

    report = _load("longform").main(["--manifest", str(manifest), "--ckpt", str(ckpt),
                                     "--repeats", "2", "--short-seconds", "5",
                                     "--json", str(tmp_path / "lf.json")])
    assert report["recording_seconds"] == 28.0 and report["utterances"] == 8
    row = report["models"][str(ckpt)]
    assert row["peak_rss_mb_long"] > 100 and row["peak_rss_ratio"] > 0
    assert 0 <= row["words_within_tolerance"] <= 1 and row["segments"] >= 1
    assert json.loads((tmp_path / "lf.json").read_text()) == report

    edges = _load("edges").main(["--manifest", str(manifest), "--ckpt", str(ckpt),
                                 "--pad", "0.1"])
    assert set(edges["models"][str(ckpt)]) == {"as is", "0.1 s silence", "0.1 s noise floor",
                                               "0.1 s neighbours"}


def test_shard_loader_benchmark_runs_and_counts_every_utterance(tmp_path: Path,
                                                                 tiny_corpus) -> None:
    import subprocess

    from asrkd.data.tokenizer import CharTokenizer
    from asrkd.models.e2e_asr import build_model, save_checkpoint
    from test_e2e import tiny_config

    teacher = save_checkpoint(build_model(tiny_config(), CharTokenizer.english()),
                              tmp_path / "teacher.ckpt")
    out, md = tmp_path / "shards.json", tmp_path / "BENCH.md"
    process = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "shards.py"), "--manifest",
         str(tiny_corpus / "train.jsonl"), "--shard-seconds", "5", "--batch-seconds", "10",
         "--repeats", "1", "--no-cold", "--json", str(out), "--markdown", str(md),
         "--teacher", str(teacher), "--speed-factors", "1.0"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert process.returncode == 0, process.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["utterances"] == 24 and not report["cold_cache_measured"]
    assert set(report["rows"]) == {f"{k}/warm/{w}" for k in ("files", "shards") for w in (0, 2)}
    assert all(row["utterances_per_s"] > 0 for row in report["rows"].values())
    assert "| warm | 2 |" in md.read_text()
    cache = report["teacher_cache"]
    assert 0 < cache["sharded_bytes_per_frame"] < cache["one_file_bytes_per_frame"]
    assert "MB / audio hour" in md.read_text()


def test_gpu_check_runs_in_quick_mode_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py (run by gpu_check.sh on a GPU) builds the LibriSpeech presets'
    configs, steps them and writes its BENCHMARKS.md section; here with tiny shapes on CPU."""
    spec = importlib.util.spec_from_file_location("asrkd_gpu_check",
                                                  ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    md = tmp_path / "BENCH.md"
    result = module.main(["--quick", "--device", "cpu", "--steps", "1", "--warmup", "0",
                          "--json", str(tmp_path / "gpu.json"), "--markdown", str(md)])
    assert set(result["models"]) == {"teacher", "student"}
    assert all(row["audio_seconds_per_second"] > 0 for row in result["models"].values())
    assert "Quick mode" in md.read_text() and "| teacher |" in md.read_text()
