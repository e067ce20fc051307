"""Training choices compared at equal wall-clock: validation CER against seconds of training.

Each experiment is one ``asrkd train`` run (a subprocess, so runs cannot leak state into each
other) with dotted overrides over a base config. Our budget is CPU time, not steps, so every
run gets the same number of *seconds*: a short probe first measures the experiment's own
seconds per optimizer step (steps 25-50, past the one-time costs), and the run then trains for
``budget / (seconds per step)`` steps, so a learning-rate schedule that depends on the total
(cosine) ends where the budget ends. Validation runs about ``--evals`` times per run; its rows
carry the run's wall-clock seconds (``ValidationHistory``).

Usage::

    python benchmarks/convergence.py --corpus exp/an4/manifests --budget 420 \\
        --out benchmarks/results/convergence/an4 --only base,lr1e-3

writes ``<out>/<name>.json`` per experiment (overrides, seconds per step, steps, history) and
``<out>/summary.md`` + ``<out>/val_cer_vs_seconds.png`` over every result in ``<out>``.
Experiments are defined in :data:`EXPERIMENTS` (add your own with ``--add "name=k=v;k=v"``).
Step costs measured by a probe move with anything else the machine runs (a 2-core VM): an
experiment that changes only the optimisation, not the architecture or batches, should reuse
its reference's measured cost with ``--add "name@reference=k=v"``.
A finished experiment is skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# name -> dotted overrides (over --config and the corpus / budget overrides).
EXPERIMENTS: dict[str, list[str]] = {
    "base": [],
}

_STEP_LINE = re.compile(r"^step (\d+)(?:/\d+)?(?: loss [-\d.naninf]+)? \((\d+) s")


def _common(corpus: Path, out: Path) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.train_manifest={corpus / 'train.jsonl'}",
        f"data.val_manifest={corpus / 'val.jsonl'}",
        f"data.test_manifest={corpus / 'test.jsonl'}",
        "trainer.max_epochs=-1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.check_val_every_n_epoch=null",
    ]


def _train(config: str, overrides: list[str], log: Path) -> tuple[dict, list[tuple[int, float]]]:
    """Run ``asrkd train``; return its ``train_result.json`` and the (step, seconds) progress
    lines. A finished run of the same command (the log's first line) is reused."""
    command = [PY, "-m", "asrkd.cli", "train", "--config", config, *overrides]
    output_dir = Path([o for o in overrides if o.startswith("output_dir=")][-1].split("=", 1)[1])
    result_file = output_dir / "train_result.json"
    if log.is_file() and result_file.is_file():
        text = log.read_text()
        if text.split("\n", 1)[0] == " ".join(command):
            return json.loads(result_file.read_text()), _progress(text)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as handle:
        handle.write(" ".join(command) + "\n")
        handle.flush()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                              cwd=ROOT, check=False)
    if done.returncode:
        raise RuntimeError(f"training failed (exit {done.returncode}); see {log}")
    return json.loads(result_file.read_text()), _progress(log.read_text())


def _progress(text: str) -> list[tuple[int, float]]:
    return [(int(m.group(1)), float(m.group(2)))
            for m in map(_STEP_LINE.match, text.splitlines()) if m]


def seconds_per_step(config: str, overrides: list[str], work: Path) -> float:
    """Seconds per optimizer step between steps 25 and 50 of a probe run (no validation)."""
    probe = work / "probe"
    _, progress = _train(
        config,
        overrides + [f"output_dir={probe}", "trainer.max_steps=50", "trainer.limit_val_batches=0",
                     "trainer.val_check_interval=1000"],
        work / "probe.log",
    )
    marks = dict(progress)
    if 25 not in marks or 50 not in marks:
        raise RuntimeError(f"probe printed no step 25/50 lines; see {work / 'probe.log'}")
    return max(1e-3, (marks[50] - marks[25]) / 25)


def run_experiment(
    name: str, extra: list[str], args: argparse.Namespace
) -> dict:
    out = args.out / f"{name}.json"
    if out.is_file() and not args.force:
        print(f"[skip] {name}: {out} exists", flush=True)
        return json.loads(out.read_text())
    work = ROOT / "exp" / "convergence" / args.out.name / name
    work.mkdir(parents=True, exist_ok=True)
    common = _common(args.corpus, work / "run") + list(args.set) + extra
    reference = args.step_cost_from.get(name)
    if reference is not None:
        # Same architecture and batches as the reference: its step cost, measured once in a
        # quiet moment, beats a new probe that any other load on the machine would skew.
        per_step = json.loads((args.out / f"{reference}.json").read_text())["seconds_per_step"]
    else:
        per_step = seconds_per_step(args.config, common, work)
    steps = max(10, int(args.budget / per_step))
    every = max(5, steps // args.evals)
    print(f"[run] {name}: {per_step:.3f} s/step -> {steps} steps, validation every {every}",
          flush=True)
    start = time.perf_counter()
    result, _ = _train(
        args.config,
        common + [f"trainer.max_steps={steps}", f"trainer.val_check_interval={every}"],
        work / "train.log",
    )
    row = {
        "name": name,
        "overrides": list(args.set) + extra,
        "config": args.config,
        "budget_seconds": args.budget,
        "seconds_per_step": round(per_step, 4),
        "step_cost_from": reference,
        "steps": result["steps"],
        "train_seconds": result["train_seconds"],
        "wall_seconds": round(time.perf_counter() - start, 1),
        "params": result["params"],
        "best_val_wer": result["best_val_wer"],
        "history": result["val_history"],
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    return row


def _cer_at(history: list[dict], seconds: float) -> float | None:
    """Validation CER of the last evaluation at or before ``seconds`` of training."""
    rows = [r for r in history if r.get("seconds", 0) <= seconds and "val_cer" in r]
    return rows[-1]["val_cer"] if rows else None


def summarise(out: Path) -> None:
    """``summary.md`` and ``val_cer_vs_seconds.png`` over every result JSON in ``out``."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    rows = [r for r in rows if "history" in r]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.cm.tab20.colors
    for index, row in enumerate(rows):
        points = [(r["seconds"], 100 * r["val_cer"]) for r in row["history"] if "val_cer" in r]
        if points:
            ax.plot(*zip(*points), marker="os^Dv"[index % 5], ms=3,
                    linestyle="-" if index < len(colours) else "--",
                    color=colours[index % len(colours)], label=row["name"])
    ax.set_xlabel("training wall-clock seconds (2 CPU cores)")
    ax.set_ylabel("validation CER (%, CTC greedy)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "val_cer_vs_seconds.png", dpi=110)
    plt.close(fig)
    budget = min(r["budget_seconds"] for r in rows)
    # Overrides every experiment shares are listed once; the table shows what differs.
    shared = [o for o in rows[0]["overrides"] if all(o in r["overrides"] for r in rows)]
    lines = [
        f"# Convergence at equal wall-clock ({out.name})",
        "",
        f"Every run: `{' '.join(shared) or '-'}` over `{Path(rows[0]['config']).name}`, "
        f"{budget:g} s of training each.",
        "",
        "| experiment | overrides | s/step | steps | val CER @ half | val CER final "
        "| val WER final |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: r["history"][-1].get("val_cer", 9) if r["history"]
                      else 9):
        last = row["history"][-1] if row["history"] else {}
        half = _cer_at(row["history"], budget / 2)
        own = " ".join(o for o in row["overrides"] if o not in shared)
        lines.append(
            f"| {row['name']} | `{own or '-'}` | "
            f"{row['seconds_per_step']:.2f} | {row['steps']} | "
            f"{'-' if half is None else f'{100 * half:.1f}'} | "
            f"{100 * last.get('val_cer', float('nan')):.1f} | "
            f"{100 * last.get('val_wer', float('nan')):.1f} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True,
                        help="folder with train/val/test.jsonl")
    parser.add_argument("--config", default=str(ROOT / "configs" / "presets" / "teacher.yaml"))
    parser.add_argument("--budget", type=float, default=420.0,
                        help="training seconds per experiment")
    parser.add_argument("--evals", type=int, default=8, help="validations per run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="", help="comma-separated experiment names")
    parser.add_argument("--set", action="append", default=[],
                        help="override applied to every experiment (repeatable)")
    parser.add_argument("--add", action="append", default=[],
                        help="extra experiment: 'name=key=value;key=value'; 'name@ref=...' "
                             "takes its seconds per step from experiment ref (same "
                             "architecture and batches) instead of probing")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    args.corpus = args.corpus.resolve()
    args.out = args.out.resolve()
    experiments = dict(EXPERIMENTS)
    args.step_cost_from = {}
    for spec in args.add:
        name, _, rest = spec.partition("=")
        name, _, reference = name.partition("@")
        experiments[name] = [x for x in rest.split(";") if x]
        if reference:
            args.step_cost_from[name] = reference
    names = [n for n in args.only.split(",") if n] or list(experiments)
    for name in names:
        run_experiment(name, experiments[name], args)
        summarise(args.out)


if __name__ == "__main__":
    main()
