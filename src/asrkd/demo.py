"""``make demo``: the embedded default corpus, then teacher -> student -> KD student -> report.

The orchestration is :func:`asrkd.recipe.run_recipe`, which the real-speech recipes share;
this module only builds the default corpus and sizes the run (:data:`FULL`, :data:`QUICK`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from asrkd.recipe import RecipePlan, console, run_recipe

__all__ = ["FULL", "QUICK", "DemoPlan", "run_demo"]


@dataclass(frozen=True)
class DemoPlan(RecipePlan):
    """A :class:`~asrkd.recipe.RecipePlan` plus the sizes of the generated corpus."""

    n_train: int = 6000
    n_val: int = 300
    n_test: int = 300


# The test split is also scored with a character 6-gram LM of the training sentences (a
# smaller weight grid than the recipes' keeps the demo within its 45 minutes).
FULL = DemoPlan(kd_teacher_cache=True, lm_order=6, lm_weights=(0.0, 0.4, 0.8),
                lm_bonuses=(0.0, 1.0, 2.0))
QUICK = DemoPlan(
    n_train=24, n_val=6, n_test=6, teacher_steps=6, student_steps=4, max_batch_seconds=20.0,
    val_every_steps=3, warmup_steps=2, kd_teacher_cache=True,
)


def run_demo(
    report_dir: str | Path = "reports/demo",
    corpus_dir: str | Path = "data/default",
    exp_dir: str | Path = "exp/demo",
    quick: bool = False,
    plan: DemoPlan | None = None,
) -> dict:
    """Build the default corpus in ``corpus_dir``, then run every stage (reusing finished
    ones) and write report.md + metrics.json to ``report_dir``."""
    from asrkd.data.corpus import build_corpus

    plan = plan or (QUICK if quick else FULL)
    console.rule("default corpus")
    stats = build_corpus(Path(corpus_dir).expanduser().resolve(), n_train=plan.n_train,
                         n_val=plan.n_val, n_test=plan.n_test)
    train_split = stats["splits"]["train"]
    summary = (
        f"embedded default corpus: {train_split['utterances']} training utterances, "
        f"{train_split['hours']:.2f} h, {train_split['num_speakers']} synthetic voices"
    )
    return run_recipe(corpus_dir, report_dir, exp_dir, plan=plan, corpus_summary=summary,
                      title="asrkd demo report")
