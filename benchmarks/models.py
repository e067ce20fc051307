"""Model cost benchmark: parameters, FLOPs, training-step time and inference speed per preset.

Usage: python benchmarks/models.py [--presets a,b] [--json FILE] [--quick] [--threads N]

For every preset the model is built with ``build_model(PRESETS[name](), CharTokenizer.english())``
and measured on CPU with a fixed thread count (2 by default):

* ``params``: all parameters (features and decoders included).
* ``flops_per_audio_second``: FLOPs of one inference-style forward (eval mode, no targets:
  features -> frontend -> encoder -> CTC head) over 1 x 10 s of audio, divided by 10.
  ``frontend_flops_share`` is the ResNet1D frontend's part of those FLOPs (0 without one).
  Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions).
* ``forward_s`` / ``forward_backward_s``: wall seconds of a training-mode forward (with
  ~150-token targets, so the decoder runs too) and of forward + supervised loss + backward, on
  a batch of 8 x 10 s; best of ``--repeats`` after one warm-up.
* ``train_peak_rss_mb``: peak resident memory (``VmHWM``) of a fresh process that builds
  the model and runs one training step (forward + loss + backward + AdamW step) on the
  training batch (random character targets, ~14 per second); ``train_step_rss_mb`` is how
  much of it the step adds over the built model. FLOPs, RTFx and peak RSS are measured by the
  same functions as ``asrkd bench`` (:mod:`asrkd.bench`).
* ``rtfx``: audio seconds / wall seconds of ``model.infer(..., method="ctc_greedy")`` on
  8 x 10 s (eval mode, one warm-up, best of 3).

It also times :func:`asrkd.losses.rnnt_loss` forward + backward against
``F.ctc_loss`` (with its log-softmax) at B=8, T=125, U=40, V=33 and reports the ratio
``rnnt_over_ctc``; and the joint network + RNN-T loss at B=8, T=125, U=30, V=256, J=320
with the lattice materialised (``rnnt_loss``) vs fused (``rnnt_joint_loss``): time, and the
peak memory one step adds, in fresh processes (``rnnt_joint``). ``--quick`` shrinks every
shape for a smoke test (numbers meaningless).
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
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from asrkd.bench import BenchPlan, count_flops, peak_rss_of_training, rtfx
from asrkd.data.tokenizer import CharTokenizer
from asrkd.losses import ASRLoss, rnnt_joint_loss, rnnt_loss
from asrkd.models.e2e_asr import E2EASR, build_model
from asrkd.models.presets import PRESETS
from asrkd.models.rnnt import JointNetwork, RNNTConfig
from asrkd.utils.timing import best_time, cpu_model, peak_rss_mb

SAMPLE_RATE = 16000
DEFAULT_PRESETS = (
    "teacher_cpu",
    "teacher_cpu_rnnt",
    "student_cpu",
    "student_cpu_rnnt",
    "fastconformer_small",
)
TEXT = (
    "the quick brown fox jumps over the lazy dog while the committee considered "
    "several proposals for the new railway station near the river "
)


@dataclass(frozen=True)
class Shapes:
    """Sizes of every measurement (``quick`` shrinks them all)."""

    flops_seconds: float = 10.0
    batch: int = 8
    seconds: float = 10.0
    target_tokens: int = 150
    repeats: int = 2
    infer_repeats: int = 3
    loss_batch: int = 8
    loss_frames: int = 125
    loss_labels: int = 40
    loss_vocab: int = 33
    loss_repeats: int = 10
    # Joint network + RNN-T loss, whole lattice vs fused (the RNN-T issue's memory shape).
    joint_batch: int = 8
    joint_frames: int = 125
    joint_labels: int = 30
    joint_vocab: int = 256
    joint_dim: int = 320

    @classmethod
    def quick(cls) -> Shapes:
        return cls(
            flops_seconds=1.0,
            batch=2,
            seconds=1.0,
            target_tokens=10,
            repeats=1,
            infer_repeats=1,
            loss_batch=2,
            loss_frames=16,
            loss_labels=5,
            loss_repeats=2,
            joint_batch=2,
            joint_frames=16,
            joint_labels=5,
            joint_vocab=16,
            joint_dim=8,
        )


def make_audio(batch: int, seconds: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) noise 'audio' at 16 kHz (timings do not depend on content) and (B,) lengths."""
    generator = torch.Generator().manual_seed(seed)
    samples = int(SAMPLE_RATE * seconds)
    audio = 0.1 * torch.randn(batch, samples, generator=generator)
    return audio, torch.full((batch,), samples, dtype=torch.long)


def make_targets(
    tokenizer: CharTokenizer, batch: int, tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, U) real character ids (English text, repeated to ``tokens``) and (B,) lengths."""
    ids = tokenizer.encode(TEXT)
    ids = (ids * (tokens // len(ids) + 1))[:tokens]
    targets = torch.tensor([ids] * batch, dtype=torch.long)
    return targets, torch.full((batch,), tokens, dtype=torch.long)


def time_training(
    model: E2EASR, tokenizer: CharTokenizer, shapes: Shapes
) -> tuple[float, float]:
    """(forward, forward + loss + backward) best wall seconds in training mode."""
    audio, lengths = make_audio(shapes.batch, shapes.seconds)
    targets, target_lengths = make_targets(tokenizer, shapes.batch, shapes.target_tokens)
    loss_fn = ASRLoss()
    model.train()

    def forward() -> None:
        # Autograd on, as in a training step; the graph is dropped when the output goes.
        model(audio, lengths, targets, target_lengths)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        output = model(audio, lengths, targets, target_lengths)
        loss_fn(output, targets, target_lengths)["total"].backward()

    fwd = best_time(forward, shapes.repeats)
    fwd_bwd = best_time(forward_backward, shapes.repeats)
    model.zero_grad(set_to_none=True)
    return fwd, fwd_bwd


def inference_rtfx(model: E2EASR, shapes: Shapes) -> float:
    """Audio seconds per wall second of CTC greedy inference (eval, best of ``infer_repeats``)."""
    model.eval()
    return rtfx(partial(model.infer, method="ctc_greedy"),
                [make_audio(shapes.batch, shapes.seconds, seed=1)], shapes.infer_repeats)


def rnnt_over_ctc(shapes: Shapes) -> dict[str, float]:
    """Time RNN-T loss vs CTC loss forward + backward on matching sizes; returns both and ratio.

    RNN-T gets (B, T, U+1, V) joint logits, CTC gets (T, B, V) logits (log-softmax included in
    both timings).
    """
    b, t, u, v = shapes.loss_batch, shapes.loss_frames, shapes.loss_labels, shapes.loss_vocab
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(1, v, (b, u), generator=generator, dtype=torch.int32)
    t_len = torch.full((b,), t, dtype=torch.int32)
    u_len = torch.full((b,), u, dtype=torch.int32)
    joint = torch.randn(b, t, u + 1, v, generator=generator).requires_grad_()
    frames = torch.randn(t, b, v, generator=generator).requires_grad_()

    def rnnt_step() -> None:
        joint.grad = None
        rnnt_loss(joint, targets, t_len, u_len, blank=0).backward()

    def ctc_step() -> None:
        frames.grad = None
        log_probs = frames.log_softmax(-1)
        F.ctc_loss(log_probs, targets.long(), t_len.long(), u_len.long(), blank=0).backward()

    rnnt_s = best_time(rnnt_step, shapes.loss_repeats)
    ctc_s = best_time(ctc_step, shapes.loss_repeats)
    return {"rnnt_s": rnnt_s, "ctc_s": ctc_s, "ratio": rnnt_s / ctc_s}


JOINT_VARIANTS = ("materialised", "fused")


def _joint_setup(shapes: Shapes) -> tuple:
    """A training-mode joint network (dropout 0.1) and its lattice inputs at ``joint_*``."""
    b, t, u = shapes.joint_batch, shapes.joint_frames, shapes.joint_labels
    torch.manual_seed(0)
    config = RNNTConfig(vocab_size=shapes.joint_vocab, encoder_dim=shapes.joint_dim,
                        pred_dim=shapes.joint_dim, joint_dim=shapes.joint_dim)
    joint = JointNetwork(config).train()
    enc = torch.randn(b, t, shapes.joint_dim).requires_grad_()
    pred = torch.randn(b, u + 1, shapes.joint_dim).requires_grad_()
    targets = torch.randint(1, shapes.joint_vocab, (b, u), dtype=torch.int32)
    t_len = torch.full((b,), t, dtype=torch.int32)
    u_len = torch.full((b,), u, dtype=torch.int32)
    return joint, enc, pred, targets, t_len, u_len


def _joint_step(variant: str, setup: tuple) -> None:
    """One forward + backward of the joint network and the RNN-T loss."""
    joint, enc, pred, targets, t_len, u_len = setup
    enc.grad = pred.grad = None
    joint.zero_grad(set_to_none=True)
    if variant == "fused":
        loss = rnnt_joint_loss(joint.combine, enc, pred, targets, t_len, u_len)
    else:
        loss = rnnt_loss(joint.combine(enc.unsqueeze(2), pred.unsqueeze(1)), targets, t_len,
                         u_len)
    loss.backward()


def _joint_memory_child(variant: str, shapes: Shapes) -> dict[str, float]:
    """Peak RSS a joint + loss step adds over its inputs: one warm-up step (the allocator's
    and thread pools' one-off growth), then the high-water mark is reset
    (``/proc/self/clear_refs``) and a second step measured."""
    setup = _joint_setup(shapes)
    _joint_step(variant, setup)
    Path("/proc/self/clear_refs").write_text("5")
    before = peak_rss_mb()
    _joint_step(variant, setup)
    return {"step_mb": round(peak_rss_mb() - before, 1)}


def rnnt_joint_costs(shapes: Shapes) -> dict[str, dict[str, float]]:
    """Joint network + RNN-T loss forward + backward, with the whole (B, T, U+1, V) lattice
    materialised (``rnnt_loss``) and fused (``rnnt_joint_loss``): best time in this process,
    and the memory a step adds, each in a fresh process with glibc told to return every block
    >= 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed memory leaves RSS."""
    setup = _joint_setup(shapes)
    results = {}
    for variant in JOINT_VARIANTS:
        command = [sys.executable, __file__, "--joint-memory-child", variant,
                   "--threads", str(torch.get_num_threads())] + (
            ["--quick"] if shapes == Shapes.quick() else [])
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        child = subprocess.run(command, capture_output=True, text=True, check=True, env=env,
                               timeout=600)
        results[variant] = {
            "seconds": best_time(partial(_joint_step, variant, setup), shapes.loss_repeats),
            **json.loads(child.stdout.strip().splitlines()[-1]),
        }
    return results


def machine_info(threads: int) -> dict[str, object]:
    """Where the numbers came from, including the load other processes put on the machine."""
    return {
        "threads": threads,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()),
    }


def benchmark_preset(name: str, shapes: Shapes) -> dict[str, float]:
    """Every per-preset measurement for one preset."""
    tokenizer = CharTokenizer.english()
    torch.manual_seed(0)
    model = build_model(PRESETS[name](), tokenizer)
    flops = count_flops(model, shapes.flops_seconds)
    forward_s, forward_backward_s = time_training(model, tokenizer, shapes)
    rss = peak_rss_of_training(f"preset:{name}", BenchPlan(train_batch=shapes.batch,
                                                          train_seconds=shapes.seconds),
                               torch.get_num_threads())
    return {
        "params": model.num_parameters(),
        "flops_per_audio_second": flops["total"] / shapes.flops_seconds,
        "frontend_flops_share": flops["frontend"] / flops["total"] if flops["total"] else 0.0,
        "forward_s": forward_s,
        "forward_backward_s": forward_backward_s,
        "rtfx": inference_rtfx(model, shapes),
        "train_peak_rss_mb": rss["peak_mb"],
        "train_step_rss_mb": rss["step_mb"],
    }


def print_table(results: dict[str, dict[str, float]], loss: dict[str, float],
                joint: dict[str, dict[str, float]] | None = None) -> None:
    """Readable summary with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="asrkd model presets (CPU)")
    for column in ("preset", "params (M)", "GFLOPs / audio s", "frontend share",
                   "fwd (s)", "fwd+bwd (s)", "train peak RSS (MB)", "RTFx (ctc greedy)"):
        table.add_column(column, justify="left" if column == "preset" else "right")
    for name, row in results.items():
        table.add_row(
            name,
            f"{row['params'] / 1e6:.2f}",
            f"{row['flops_per_audio_second'] / 1e9:.2f}",
            f"{100 * row['frontend_flops_share']:.1f}%",
            f"{row['forward_s']:.3f}",
            f"{row['forward_backward_s']:.3f}",
            f"{row['train_peak_rss_mb']:.0f} (+{row['train_step_rss_mb']:.0f})",
            f"{row['rtfx']:.1f}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"rnnt_loss fwd+bwd {loss['rnnt_s'] * 1e3:.2f} ms vs F.ctc_loss {loss['ctc_s'] * 1e3:.2f}"
        f" ms -> rnnt_over_ctc = {loss['ratio']:.2f}"
    )
    if joint:
        console.print("joint + RNN-T loss fwd+bwd: " + "; ".join(
            f"{name} {row['seconds'] * 1e3:.1f} ms, +{row['step_mb']:.1f} MB peak"
            for name, row in joint.items()))


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Run the benchmark; returns (and with ``--json`` writes) the results."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                        help="comma-separated preset names")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, help="timed runs of fwd and fwd+bwd")
    parser.add_argument("--joint-memory-child", choices=JOINT_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.joint_memory_child:
        torch.set_num_threads(args.threads)
        shapes = Shapes.quick() if args.quick else Shapes()
        result = _joint_memory_child(args.joint_memory_child, shapes)
        print(json.dumps(result))
        return result

    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; choose from {', '.join(PRESETS)}")
    shapes = Shapes.quick() if args.quick else Shapes()
    if args.repeats:
        shapes = Shapes(**{**shapes.__dict__, "repeats": args.repeats})

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        load_before = list(os.getloadavg())
        results = {name: benchmark_preset(name, shapes) for name in names}
        loss = rnnt_over_ctc(shapes)
        joint = rnnt_joint_costs(shapes)
        machine = machine_info(args.threads)
        machine["loadavg_before"] = load_before
    finally:
        torch.set_num_threads(previous_threads)

    report: dict[str, object] = {
        "presets": results,
        "rnnt_over_ctc": loss["ratio"],
        "rnnt_over_ctc_detail": {
            "rnnt_s": loss["rnnt_s"],
            "ctc_s": loss["ctc_s"],
            "shape": {"B": shapes.loss_batch, "T": shapes.loss_frames,
                      "U": shapes.loss_labels, "V": shapes.loss_vocab},
        },
        "rnnt_joint": {
            **joint,
            "shape": {"B": shapes.joint_batch, "T": shapes.joint_frames,
                      "U": shapes.joint_labels, "V": shapes.joint_vocab, "J": shapes.joint_dim},
        },
        "shapes": shapes.__dict__,
        "quick": args.quick,
        "machine": machine,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print_table(results, loss, joint)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
