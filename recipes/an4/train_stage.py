"""Train one stage of the AN4 recipe (its plan and overrides) with extra overrides.

For ablations beside the recipe: the stage is trained exactly as ``run.sh`` would train it
(same steps, batching, schedule, dropout and speed perturbation), into ``<exp>/<name>``, with
the given ``key=value`` overrides added last. A finished stage is reused and an interrupted
one resumed. Two students side by side with ``--threads 1`` each train faster in total than
one after the other with 2 threads on a 2-core machine.

Usage: python recipes/an4/train_stage.py student --exp exp/an4_concat data.concat_prob=0.5
       [--config src/asrkd/configs/presets/student.yaml] [--threads 1] [--steps N]
       [--teacher-cache]
(run ``bash recipes/an4/run.sh`` once first: it writes the manifests to exp/an4/manifests)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import FULL, OVERRIDES  # noqa: E402

from asrkd.recipe import train_stage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=("teacher", "student", "student_kd"))
    parser.add_argument("overrides", nargs="*", help="key=value, after the recipe's own")
    parser.add_argument("--exp", type=Path, required=True)
    parser.add_argument("--config", type=Path,
                        help="default: the preset named like the stage")
    parser.add_argument("--manifests", type=Path, default=ROOT / "exp" / "an4" / "manifests")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int,
                        help="training steps (default: the recipe's, "
                        f"{FULL.teacher_steps} for the teacher, {FULL.student_steps} for students)")
    parser.add_argument("--teacher-cache", action="store_true",
                        help="student_kd: distil from the teacher's stored CTC posteriors "
                        "(ctc_kl only), as run.py --teacher-cache")
    args = parser.parse_intermixed_args()
    torch.set_num_threads(args.threads)
    config = args.config or ROOT / "src" / "asrkd" / "configs" / "presets" / f"{args.name}.yaml"
    steps = args.steps or (FULL.teacher_steps if args.name == "teacher" else FULL.student_steps)
    plan = replace(FULL, kd_teacher_cache=args.teacher_cache)
    result = train_stage(args.name, plan, args.manifests, args.exp, steps,
                         list(OVERRIDES) + args.overrides, config)
    print(f"{args.name}: {result['train_seconds']} s, best validation WER "
          f"{result['best_val_wer']}")


if __name__ == "__main__":
    main()
