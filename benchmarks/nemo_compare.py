"""Peer comparison: our FastConformerEncoder against NeMo's ConformerEncoder (FastConformer-Small).

NeMo is not an asrkd dependency; it lives in its own virtual environment
(``benchmarks/install_nemo.sh``, default ``/tmp/nemo-venv``). This script therefore has two modes:

* worker: ``python benchmarks/nemo_compare.py --impl asrkd|nemo`` builds one implementation,
  times it and prints one JSON line. Run the ``nemo`` worker with the NeMo venv's python and
  the ``asrkd`` worker with ours; the worker imports nothing but torch and that implementation.
* driver (default): runs both workers, alternately and in both orders (asrkd then NeMo, NeMo then
  asrkd), with the same inputs and thread count, and writes
  ``benchmarks/results/nemo_compare.json`` and ``nemo_compare.md``. When NeMo cannot be run
  (venv missing, install or import failure) the reason is recorded instead of its numbers.

Both encoders: 80-dim input, d_model 176, 16 layers, 4 heads, 8x depthwise-striding subsampling
with 256 channels, relative-position attention, conv kernel 9 with batch norm, FF expansion 4,
xscaling; dropout left at each implementation's defaults. Measured: parameter count, inference
forward (eval, no_grad) and forward + backward (train mode, loss = mean of squared outputs), on
8 x 1000 frames of seeded random features, best of 3 after one warm-up.

Usage:
    python benchmarks/nemo_compare.py [--nemo-python /tmp/nemo-venv/bin/python] [--quick]
    python benchmarks/nemo_compare.py --impl asrkd [--frames 1000 --batch 8 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_NEMO_PYTHON = os.path.join(os.environ.get("NEMO_VENV", "/tmp/nemo-venv"), "bin", "python")
IMPLS = ("asrkd", "nemo")


def _load_timing():
    """asrkd's timing helpers, loaded by file path: the NeMo worker's venv lacks asrkd."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "asrkd_timing", ROOT / "src" / "asrkd" / "utils" / "timing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_times = _load_timing().run_times

# FastConformer-Small, as NeMo's fast-conformer_ctc_bpe.yaml (small) configures it.
FEAT_IN = 80
D_MODEL = 176
N_LAYERS = 16
N_HEADS = 4
SUBSAMPLING_FACTOR = 8
SUBSAMPLING_CHANNELS = 256
CONV_KERNEL = 9
FF_EXPANSION = 4


def build_encoder(impl: str):
    """The encoder for ``impl`` plus a function ``run(features (B, T, F), lengths) -> tensor``."""
    if impl == "nemo":
        from nemo.collections.asr.modules import ConformerEncoder

        encoder = ConformerEncoder(
            feat_in=FEAT_IN,
            n_layers=N_LAYERS,
            d_model=D_MODEL,
            n_heads=N_HEADS,
            subsampling="dw_striding",
            subsampling_factor=SUBSAMPLING_FACTOR,
            subsampling_conv_channels=SUBSAMPLING_CHANNELS,
            ff_expansion_factor=FF_EXPANSION,
            self_attention_model="rel_pos",
            conv_kernel_size=CONV_KERNEL,
            conv_norm_type="batch_norm",
            xscaling=True,
        )

        def run(features, lengths):
            # NeMo takes (B, F, T) and returns (B, D, T').
            out, _ = encoder(audio_signal=features.transpose(1, 2), length=lengths)
            return out

        return encoder, run
    if impl == "asrkd":
        from asrkd.models.encoder import FastConformerConfig, FastConformerEncoder

        encoder = FastConformerEncoder(
            FastConformerConfig(
                input_dim=FEAT_IN,
                d_model=D_MODEL,
                n_layers=N_LAYERS,
                n_heads=N_HEADS,
                subsampling_channels=SUBSAMPLING_CHANNELS,
                conv_kernel=CONV_KERNEL,
            )
        )

        def run(features, lengths):
            return encoder(features, lengths).output

        return encoder, run
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def worker(impl: str, batch: int, frames: int, repeats: int, threads: int) -> dict[str, object]:
    """Build and time one implementation; returns a JSON-able dict."""
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    encoder, run = build_encoder(impl)
    build_s = time.perf_counter() - started
    # Same seeded features in both venvs (same torch version, same generator).
    generator = torch.Generator().manual_seed(1234)
    features = torch.randn(batch, frames, FEAT_IN, generator=generator)
    lengths = torch.full((batch,), frames, dtype=torch.long)

    def infer() -> None:
        encoder.eval()
        with torch.no_grad():
            run(features, lengths)

    def train_step() -> None:
        encoder.train()
        encoder.zero_grad(set_to_none=True)
        run(features, lengths).float().pow(2).mean().backward()

    encoder.eval()
    with torch.no_grad():
        out_shape = list(run(features, lengths).shape)
    infer_all = run_times(infer, repeats)
    train_all = run_times(train_step, repeats)
    infer_s, train_s = min(infer_all), min(train_all)
    return {
        "impl": impl,
        "ok": True,
        "params": sum(p.numel() for p in encoder.parameters()),
        "infer_s": infer_s,
        "train_s": train_s,
        "infer_all_s": infer_all,
        "train_all_s": train_all,
        "output_shape": out_shape,
        "input_checksum": float(features.double().sum()),
        "build_s": build_s,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()),
    }


def run_worker(
    python: str, impl: str, args: argparse.Namespace, timeout: float
) -> dict[str, object]:
    """Run one worker process; returns its JSON or ``{"ok": False, "error": ...}``."""
    if not Path(python).exists():
        return {"impl": impl, "ok": False, "error": f"python not found: {python}"}
    command = [
        python, str(Path(__file__).resolve()), "--impl", impl, "--batch", str(args.batch),
        "--frames", str(args.frames), "--repeats", str(args.repeats), "--threads",
        str(args.threads),
    ]
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if impl == "asrkd":
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
        )
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"impl": impl, "ok": False, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        return {
            "impl": impl,
            "ok": False,
            "error": f"worker exited with {done.returncode}",
            "stderr_tail": tail,
        }
    result = json.loads(lines[-1])
    result["process_wall_s"] = wall
    return result


def nemo_status(nemo_python: str) -> dict[str, object]:
    """Version of NeMo in its venv, or why it cannot be imported."""
    if not Path(nemo_python).exists():
        return {"available": False, "reason": f"NeMo venv python not found at {nemo_python} "
                                              "(run benchmarks/install_nemo.sh)"}
    probe = (
        "import importlib.metadata as m, torch; "
        "from nemo.collections.asr.modules import ConformerEncoder; "
        "print(m.version('nemo-toolkit'), torch.__version__)"
    )
    done = subprocess.run(
        [nemo_python, "-c", probe], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        return {"available": False,
                "reason": "import failed: " + " | ".join(done.stderr.strip().splitlines()[-5:])}
    nemo_version, torch_version = done.stdout.split()[-2:]
    return {"available": True, "nemo_version": nemo_version, "torch_version": torch_version}


def summarise(runs: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    """Best infer/train time per implementation over all its successful runs."""
    summary: dict[str, dict[str, object]] = {}
    for impl in IMPLS:
        good = [r for r in runs if r["impl"] == impl and r.get("ok")]
        if good:
            summary[impl] = {
                "params": good[0]["params"],
                "infer_s": min(r["infer_s"] for r in good),
                "train_s": min(r["train_s"] for r in good),
                "runs": len(good),
            }
    if "asrkd" in summary and "nemo" in summary:
        summary["ratio_asrkd_over_nemo"] = {
            key: summary["asrkd"][key] / summary["nemo"][key]
            for key in ("params", "infer_s", "train_s")
        }
    return summary


def markdown(report: dict[str, object]) -> str:
    """A short markdown snippet of the comparison."""
    setup = report["setup"]
    lines = [
        "### FastConformer-Small encoder: asrkd vs NeMo",
        "",
        f"CPU {report['machine']['cpu_model']}, {setup['threads']} threads, batch "
        f"{setup['batch']} x {setup['frames']} frames x {FEAT_IN} features, best of "
        f"{setup['repeats']} after a warm-up, both orders; load average at start "
        f"{report['machine']['loadavg_start']}, at end {report['machine']['loadavg_end']} "
        "(about 2 on this 2-core machine means nothing else was running).",
        "",
    ]
    nemo = report["nemo"]
    summary = report["summary"]
    if not nemo.get("available"):
        lines.append(f"NeMo could not be run: {nemo.get('reason')}")
        lines.append("")
    lines += [
        "| implementation | params | inference fwd (s) | train fwd+bwd (s) |",
        "|---|---:|---:|---:|",
    ]
    for impl in IMPLS:
        if impl in summary:
            row = summary[impl]
            name = "asrkd" if impl == "asrkd" else f"NeMo {nemo.get('nemo_version', '')}".strip()
            lines.append(
                f"| {name} | {row['params']:,} | {row['infer_s']:.3f} | {row['train_s']:.3f} |"
            )
    if "ratio_asrkd_over_nemo" in summary:
        ratio = summary["ratio_asrkd_over_nemo"]
        lines += [
            "",
            f"asrkd / NeMo: params {ratio['params']:.3f}, inference time {ratio['infer_s']:.2f}, "
            f"train time {ratio['train_s']:.2f} (below 1 = asrkd faster).",
        ]
    failures = [r for r in report["runs"] if not r.get("ok")]
    for failure in failures:
        lines.append(f"\n{failure['impl']} run failed: {failure.get('error')}")
    return "\n".join(lines) + "\n"


def driver(args: argparse.Namespace) -> dict[str, object]:
    """Run both workers in both orders and write the JSON and markdown results."""
    from_cpuinfo = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                from_cpuinfo = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pythons = {"asrkd": args.asrkd_python, "nemo": args.nemo_python}
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    nemo = nemo_status(args.nemo_python)
    runs: list[dict[str, object]] = []
    for order in (("asrkd", "nemo"), ("nemo", "asrkd")):
        for impl in order:
            if impl == "nemo" and not nemo.get("available"):
                continue
            result = run_worker(pythons[impl], impl, args, args.timeout)
            result["order"] = "->".join(order)
            runs.append(result)
            status = "ok" if result.get("ok") else f"FAILED: {result.get('error')}"
            print(f"[{result['order']}] {impl}: {status}", file=sys.stderr)
    report: dict[str, object] = {
        "setup": {
            "batch": args.batch,
            "frames": args.frames,
            "feat_in": FEAT_IN,
            "repeats": args.repeats,
            "threads": args.threads,
            "encoder": {
                "d_model": D_MODEL, "n_layers": N_LAYERS, "n_heads": N_HEADS,
                "subsampling": "dw_striding", "subsampling_factor": SUBSAMPLING_FACTOR,
                "subsampling_conv_channels": SUBSAMPLING_CHANNELS,
                "self_attention_model": "rel_pos", "conv_kernel_size": CONV_KERNEL,
                "conv_norm_type": "batch_norm", "ff_expansion_factor": FF_EXPANSION,
                "xscaling": True, "dropout": "each implementation's default",
            },
            "train_loss": "mean of squared encoder outputs",
        },
        "nemo": nemo,
        "runs": runs,
        "summary": summarise(runs),
        "machine": {
            "cpu_model": from_cpuinfo,
            "cpu_count": os.cpu_count(),
            "loadavg_start": loadavg_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "nemo_compare.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out_dir / "nemo_compare.md").write_text(text)
    print(text)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impl", choices=IMPLS, help="worker mode: time one implementation")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--nemo-python", default=DEFAULT_NEMO_PYTHON)
    parser.add_argument("--asrkd-python", default=sys.executable)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per worker")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.frames, args.repeats = 2, 64, 1
    if args.impl:
        print(json.dumps(worker(args.impl, args.batch, args.frames, args.repeats, args.threads)))
    else:
        driver(args)


if __name__ == "__main__":
    main()
