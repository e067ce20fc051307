"""Teacher -> student -> KD student -> evaluation -> report: what every recipe runs.

Give :func:`run_recipe` prepared NeMo manifests (``train.jsonl``, ``val.jsonl``,
``test.jsonl``) and a :class:`RecipePlan`; it trains the three models from the shipped presets
(or configs of your own), scores the test split once, and writes ``report.md``,
``metrics.json`` and the convergence plot. ``asrkd demo`` and the AN4, FSDD and speechocean762
recipes are thin callers that only prepare their corpus.

Every stage writes its result to disk and is skipped when that result is already there, so
an interrupted run resumes where it stopped. The student and the KD student train on the same
data, for the same steps, from the same seed: the only difference is distillation.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from asrkd.errors import UserError
from asrkd.training.pipeline import config_path, evaluate, load_run_config, train

__all__ = ["MANY_EPOCH_DROPOUT", "MODELS", "RecipePlan", "run_recipe", "train_stage"]

console = Console()
MODELS = ("teacher", "student", "student_kd")


@dataclass(frozen=True)
class RecipePlan:
    """Step budgets, batching, test decoding and LM settings of a teacher/student/KD run.

    ``regularization_warmup``: the share of each stage's steps over which dropout and
    SpecAugment ramp up from 0 (``training.regularization_warmup_steps``).
    """

    teacher_steps: int = 2000
    student_steps: int = 1600
    max_batch_seconds: float = 60.0
    val_every_steps: int = 100
    warmup_steps: int = 100
    regularization_warmup: float = 0.4
    decoding: str = "ctc_greedy"  # test decoding, the same method for all three models
    # More searches scored on the test split for all three models (a table of their own).
    extra_decodings: tuple[str, ...] = ()
    # Distil from stored teacher CTC posteriors (``asrkd cache-teacher``, run once over the
    # training set, once per speed factor of ``data.speed_factors``) instead of running the
    # teacher on every KD step: frame-level CTC KD only.
    kd_teacher_cache: bool = False
    # Also score the test split with a token n-gram LM of this order trained on the training
    # transcripts, fused into CTC prefix beam search; the LM weight and length bonus are
    # grid-searched per model on the validation split (``asrkd lm --tune``). None: no LM.
    lm_order: int | None = None
    lm_weights: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    lm_bonuses: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    lm_beam_size: int = 8
    lm_penalties: tuple[float, ...] = (0.0,)  # unknown-word penalties (LMFusion.unk_penalty)


# Recipes that run many epochs over a small corpus: dropout 0.1 everywhere, ramped up over the
# first 40 % of each stage (RecipePlan.regularization_warmup), instead of the CPU presets' 0.
MANY_EPOCH_DROPOUT = (
    "model.encoder.dropout=0.1",
    "model.encoder.dropout_att=0.1",
    "model.encoder.dropout_pre_encoder=0.1",
    "model.transformer.dropout=0.1",
)


def _stage_overrides(plan: RecipePlan, corpus: Path, out: Path, steps: int) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.train_manifest={corpus / 'train.jsonl'}",
        f"data.val_manifest={corpus / 'val.jsonl'}",
        f"data.test_manifest={corpus / 'test.jsonl'}",
        f"data.max_batch_seconds={plan.max_batch_seconds}",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        f"trainer.val_check_interval={plan.val_every_steps}",
        "trainer.check_val_every_n_epoch=null",
        f"training.optim.warmup_steps={plan.warmup_steps}",
        f"training.regularization_warmup_steps={int(plan.regularization_warmup * steps)}",
        f"trainer.enable_progress_bar={'false' if os.environ.get('CI') else 'true'}",
    ]


def train_stage(
    name: str, plan: RecipePlan, corpus: Path, exp: Path, steps: int, extra: list[str],
    config: Path,
) -> dict:
    """Train model ``name`` into ``<exp>/<name>`` on the manifests of ``corpus`` for ``steps``
    steps with the plan's batching and schedule, ``config`` and the ``extra`` overrides; the
    KD student (``student_kd``) distils from ``<exp>/teacher``. A finished stage is reused and
    an interrupted one resumed. Returns its ``train_result.json``."""
    out = exp / name
    result_file = out / "train_result.json"
    if result_file.is_file() and (out / "model.ckpt").is_file():
        console.print(f"[green]reusing[/] {name}: {out / 'model.ckpt'}")
        return {**json.loads(result_file.read_text()), "reused": True}
    console.rule(f"training {name} ({steps} steps)")
    overrides = _stage_overrides(plan, corpus, out, steps) + list(extra)
    cache_seconds = 0.0
    if name == "student_kd":
        overrides.append(f"training.teacher_checkpoint={exp / 'teacher' / 'model.ckpt'}")
        if plan.kd_teacher_cache:
            data = load_run_config([config], overrides).data
            cache, cache_seconds = _teacher_cache(exp, corpus, data.speed_factors,
                                                  data.train_shards)
            overrides += [f"training.teacher_cache={cache}", "training.kd.losses=[ctc_kl]"]
    run_config = load_run_config([config], overrides)
    # An interrupted stage continues from its last checkpoint instead of starting over.
    result = train(run_config, resume=True)
    if cache_seconds:
        # The KD student's cost includes running the teacher once over the training set.
        result = {**result, "train_seconds": round(result["train_seconds"] + cache_seconds, 1),
                  "teacher_cache_seconds": round(cache_seconds, 1)}
        (out / "train_result.json").write_text(json.dumps(result, indent=2))
    return result


def _teacher_cache(exp: Path, corpus: Path, speed_factors: tuple[float, ...] = (),
                   shards: str | None = None) -> tuple[Path, float]:
    """The teacher's top-k CTC posteriors over the training set at each of ``speed_factors``,
    written once per teacher and set of factors: one file from ``corpus/train.jsonl``, or,
    when the stages train from ``shards``, a sharded cache that the shard loader reads."""
    from asrkd.training.teacher_cache import cache_teacher, check_speed_factors
    from asrkd.training.teacher_shards import cache_teacher_shards

    teacher = exp / "teacher" / "model.ckpt"
    path = exp / ("teacher_cache_shards" if shards else "teacher_cache.pt")
    info_file = path.with_suffix(".json")
    factors = list(check_speed_factors(speed_factors))
    if (path.exists() and info_file.is_file()
            and info_file.stat().st_mtime > teacher.stat().st_mtime):
        info = json.loads(info_file.read_text())
        if info.get("speed_factors", [1.0]) == factors:
            return path, float(info["seconds"])
    console.rule("caching the teacher's CTC posteriors over the training set")
    if shards:
        info = cache_teacher_shards(teacher, shards, path, speed_factors=factors)
    else:
        info = cache_teacher(teacher, corpus / "train.jsonl", path, speed_factors=factors)
    info_file.write_text(json.dumps({"seconds": info["seconds"], "speed_factors": factors}))
    return path, float(info["seconds"])


def _evaluations_current(exp: Path, report_dir: Path, method: str = "ctc_greedy",
                         tag: str = "test") -> bool:
    """Whether every model's stored test result (``<model>_<tag>.json``, decoded with
    ``method``) is newer than every checkpoint.

    The three RTFx are compared with each other, so they are measured in one invocation:
    one retrained model means all three are evaluated again (timings on a shared VM drift by
    20% between runs an hour apart)."""
    outs = [report_dir / f"{name}_{tag}.json" for name in MODELS]
    if not all(out.is_file() for out in outs):
        return False
    if any(json.loads(out.read_text()).get("method") != method for out in outs):
        return False
    newest = max((exp / name / "model.ckpt").stat().st_mtime for name in MODELS)
    return min(out.stat().st_mtime for out in outs) > newest


def _evaluate_stage(name: str, corpus: Path, exp: Path, report_dir: Path, reuse: bool,
                    method: str = "ctc_greedy", tag: str = "test") -> dict:
    """Score ``name`` on the test split with ``method``; ``reuse``: read the stored result."""
    out = report_dir / f"{name}_{tag}.json"
    checkpoint = exp / name / "model.ckpt"
    if reuse:
        return json.loads(out.read_text())
    console.print(f"evaluating {name} on {corpus / 'test.jsonl'} ({method})")
    metrics = evaluate(
        checkpoint,
        corpus / "test.jsonl",
        method=method,
        out_jsonl=report_dir / f"{name}_{tag}_utterances.jsonl",
        threads=2,
        timing_repeats=3,
    )
    out.write_text(json.dumps(metrics, indent=2))
    return metrics


def _lm_stage(name: str, plan: RecipePlan, corpus: Path, exp: Path, report_dir: Path,
              reuse: bool) -> dict:
    """Train the token LM on the training transcripts, tune its weight and bonus on the
    validation split for this model, and score the test split with it."""
    from asrkd.data.dataset import read_manifest
    from asrkd.models.e2e_asr import load_checkpoint
    from asrkd.models.lm import train_lm
    from asrkd.training.pipeline import tune_fusion

    out = report_dir / f"{name}_test_lm.json"
    checkpoint = exp / name / "model.ckpt"
    settings = {"order": plan.lm_order, "weights": list(plan.lm_weights),
                "bonuses": list(plan.lm_bonuses), "penalties": list(plan.lm_penalties),
                "beam_size": plan.lm_beam_size}
    if reuse and out.is_file() and json.loads(out.read_text()).get("plan") == settings:
        return json.loads(out.read_text())
    model = load_checkpoint(checkpoint)
    lm_path = exp / name / f"lm{plan.lm_order}.json"
    texts = [entry.text for entry in read_manifest(corpus / "train.jsonl")[0] if entry.text]
    start = time.perf_counter()
    lm = train_lm(texts, model.tokenizer, order=plan.lm_order)
    val = corpus / "val.jsonl"
    held_out = [model.tokenizer.encode(e.text) for e in read_manifest(val)[0] if e.text]
    perplexity = lm.perplexity(held_out)
    console.print(f"{name}: {lm!r}, validation perplexity {perplexity:.2f}; tuning on {val}")
    tuned = tune_fusion(model, val, lm, weights=plan.lm_weights, bonuses=plan.lm_bonuses,
                        beam_size=plan.lm_beam_size, penalties=plan.lm_penalties)
    best = tuned["best"]
    lm.fusion = {"weight": best["weight"], "length_bonus": best["length_bonus"],
                 "unk_penalty": best["unk_penalty"], "tuned_on": str(val), "wer": best["wer"],
                 "cer": best["cer"], "beam_size": plan.lm_beam_size}
    lm.save(lm_path)
    tune_seconds = time.perf_counter() - start
    plain = next(r for r in tuned["grid"] if r["weight"] == 0.0) if 0.0 in plan.lm_weights \
        else None
    console.print(f"evaluating {name} with the LM (weight {best['weight']:g}, bonus "
                  f"{best['length_bonus']:g}, unknown-word penalty {best['unk_penalty']:g})")
    metrics = evaluate(
        model, corpus / "test.jsonl", method="ctc_beam",
        out_jsonl=report_dir / f"{name}_test_lm_utterances.jsonl", threads=2,
        fusion=lm.fusion_settings(), timing_repeats=1, timing_seconds=0.0,
    )
    metrics["lm"].update({"path": str(lm_path), "val_perplexity": round(perplexity, 3),
                          "val_wer": best["wer"], "val_cer": best["cer"],
                          "val_wer_ctc_beam": plain["wer"] if plain else None,
                          "tune_seconds": round(tune_seconds, 1), "grid": tuned["grid"]})
    metrics["plan"] = settings
    out.write_text(json.dumps(metrics, indent=2))
    return metrics


def _plots(report_dir: Path, metrics: dict, histories: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in MODELS:
        ax.scatter(metrics[name]["params"] / 1e6, 100 * metrics[name]["wer"], s=60, label=name)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("test WER (%)")
    ax.set_title("WER vs parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(report_dir / "wer_vs_params.png", dpi=110)
    plt.close(fig)
    names.append("wer_vs_params.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name in MODELS:
        rows = [r for r in histories.get(name, []) if "val_cer" in r]
        if not rows:
            continue
        # Wall-clock seconds of training when recorded (compare runs at equal time), else steps.
        x_key = "seconds" if all("seconds" in r for r in rows) else "step"
        for ax, metric in zip(axes, ("val_cer", "val_wer")):
            ax.plot([r[x_key] for r in rows], [100 * r[metric] for r in rows], "o-", ms=3,
                    label=name)
            ax.set_xlabel("training seconds (wall clock)" if x_key == "seconds"
                          else "training step")
    for ax, what in zip(axes, ("CER", "WER")):
        ax.set_ylabel(f"validation {what} (%, CTC greedy)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Convergence: validation error against training time")
    fig.tight_layout()
    fig.savefig(report_dir / "val_wer_curves.png", dpi=110)
    plt.close(fig)
    names.append("val_wer_curves.png")
    return names


def _report(report_dir: Path, metrics: dict, corpus_summary: str, plots: list[str],
            seconds: float, title: str, reused: int, notes: Sequence[str] = ()) -> None:
    teacher, student, kd = (metrics[name] for name in MODELS)
    method = teacher["decoding"].replace("_", " ").replace("ctc", "CTC")
    lines = [
        f"# {title}",
        "",
        f"Corpus: {corpus_summary}. Test split: "
        f"{teacher['utterances']} utterances held out from training.",
        f"Decoding: {method} for all three models; RTFx = audio seconds / compute seconds, "
        "2 threads, batched (up to 240 s of audio per batch), after a warm-up pass, fastest of "
        "at least 3 timed runs (and 2 s of them) per batch, on the machine that ran this report.",
        "",
        "| model | params | checkpoint MB | WER % | CER % | RTFx | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in MODELS:
        m = metrics[name]
        lines.append(
            f"| {name} | {m['params'] / 1e6:.2f} M | {m['checkpoint_mb']:.1f} | "
            f"{100 * m['wer']:.2f} | {100 * m['cer']:.2f} | {m['rtfx']:.0f} | "
            f"{m['train_seconds']:.0f} |"
        )
    checks = [
        ("student params <= 0.25 x teacher", student["params"] <= 0.25 * teacher["params"],
         f"{student['params'] / teacher['params']:.3f} x"),
        ("student RTFx >= 3 x teacher", student["rtfx"] >= 3 * teacher["rtfx"],
         f"{student['rtfx'] / max(teacher['rtfx'], 1e-9):.2f} x"),
        ("KD student WER <= 1.10 x teacher WER", kd["wer"] <= 1.10 * teacher["wer"],
         f"{kd['wer'] / max(teacher['wer'], 1e-9):.2f} x"),
        ("KD student WER >= 10% relative below no-KD student",
         kd["wer"] <= 0.90 * student["wer"],
         f"{100 * (1 - kd['wer'] / max(student['wer'], 1e-9)):.1f}% lower"),
    ]
    if all(metrics[name].get("lm") for name in MODELS):
        t_lm, s_lm, k_lm = (metrics[name]["lm"]["wer"] for name in MODELS)
        checks += [
            ("with the LM: KD student WER <= 1.10 x teacher WER", k_lm <= 1.10 * t_lm,
             f"{k_lm / max(t_lm, 1e-9):.2f} x"),
            ("with the LM: KD student WER >= 10% relative below no-KD student",
             k_lm <= 0.90 * s_lm, f"{100 * (1 - k_lm / max(s_lm, 1e-9)):.1f}% lower"),
        ]
    lines += ["", "## Targets", "", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {what} | {'yes' if ok else 'no'} | {value} |" for what, ok, value in checks]
    if all(metrics[name].get("decodings") for name in MODELS):
        lines += ["", "## Other decodings of the same checkpoints", "",
                  "| model | decoding | WER % | CER % | RTFx |", "|---|---|---:|---:|---:|"]
        lines += [
            f"| {name} | {method} | {100 * m['wer']:.2f} | {100 * m['cer']:.2f} | "
            f"{m['rtfx']:.0f} |"
            for name in MODELS for method, m in metrics[name]["decodings"].items()
        ]
    if all(metrics[name].get("lm") for name in MODELS):
        order = teacher["lm"]["order"]
        lines += [
            "", f"## With a token {order}-gram LM", "",
            f"Kneser-Ney {order}-gram over the models' tokens, trained on the training "
            "transcripts only (`asrkd lm`), fused into CTC prefix beam search (beam "
            f"{teacher['lm']['beam_size']}); LM weight, per-token bonus and the penalty per word "
            "outside the training transcripts' words grid-searched for each model on the "
            "validation split, then the test split scored once. RTFx here is one timed pass "
            "(the beam search is Python).", "",
            "| model | LM weight | bonus | word penalty | val WER % (beam, no LM) | "
            "val WER % (LM) | test WER % | test CER % | RTFx |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in MODELS:
            lm = metrics[name]["lm"]
            plain = lm.get("val_wer_ctc_beam")
            lines.append(
                f"| {name} | {lm['weight']:g} | {lm['length_bonus']:g} | "
                f"{lm.get('unk_penalty', 0.0):g} | "
                f"{'' if plain is None else f'{100 * plain:.2f}'} | {100 * lm['val_wer']:.2f} | "
                f"{100 * lm['wer']:.2f} | {100 * lm['cer']:.2f} | {lm['rtfx']:.0f} |"
            )
    if kd.get("teacher_cache_seconds"):
        lines += ["", f"KD: frame-level CTC KL from the teacher's stored top-k posteriors "
                  f"(`asrkd cache-teacher` over the training set, "
                  f"{kd['teacher_cache_seconds']:.0f} s, counted in the KD student's training "
                  "time), so distillation steps cost what plain steps do."]
    if notes:
        lines += [""] + list(notes)
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    trained = sum(metrics[name]["train_seconds"] for name in MODELS)
    lines += [
        "",
        f"Training time of the three models: {trained:.0f} s. This invocation took "
        f"{seconds:.0f} s ({reused} of 3 training stages reused from an earlier run).",
        "",
    ]
    (report_dir / "report.md").write_text("\n".join(lines))


def run_recipe(
    corpus_dir: str | Path,
    report_dir: str | Path,
    exp_dir: str | Path,
    plan: RecipePlan | None = None,
    overrides: Sequence[str] = (),
    corpus_summary: str = "",
    title: str = "asrkd report",
    notes: Sequence[str] = (),
    configs: Mapping[str, str | Path] | None = None,
    stage_overrides: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """Train teacher, student and KD student, score the test split, write the report.

    Args:
        corpus_dir: folder with ``train.jsonl``, ``val.jsonl`` and ``test.jsonl``.
        report_dir: where ``report.md``, ``metrics.json``, plots and per-utterance
            transcripts go.
        exp_dir: checkpoints, one folder per model (``<exp_dir>/<model>/model.ckpt``).
        plan: step budgets and decoding (default :class:`RecipePlan`).
        overrides: dotted config overrides applied to every training stage.
        corpus_summary: one line that says what the corpus is (in the report).
        title: the report's heading.
        notes: extra report paragraphs (published results, caveats).
        configs: run config per model name (a YAML file or a shipped preset name); models not
            named use the shipped preset of their name (``asrkd presets``).
        stage_overrides: more dotted overrides per model name, after ``overrides`` (for
            example ``training.init_checkpoint`` of a pretrained model for one stage).

    Returns:
        The metrics written to ``metrics.json``: per model ``params``, ``wer``, ``cer``,
        ``rtfx``, ``train_seconds``, ``checkpoint`` and more.
    """
    start = time.perf_counter()
    plan = plan or RecipePlan()
    unknown = sorted((set(configs or {}) | set(stage_overrides or {})) - set(MODELS))
    if unknown:
        raise UserError(f"configs or overrides for unknown models {unknown}; models are "
                        f"{list(MODELS)}")
    configs = {name: config_path(str((configs or {}).get(name, name))) for name in MODELS}
    report_dir, corpus_dir, exp_dir = (
        Path(p).expanduser().resolve() for p in (report_dir, corpus_dir, exp_dir)
    )
    report_dir.mkdir(parents=True, exist_ok=True)
    extra = list(overrides or [])
    steps = {"teacher": plan.teacher_steps, "student": plan.student_steps,
             "student_kd": plan.student_steps}
    results = {
        name: train_stage(name, plan, corpus_dir, exp_dir, steps[name],
                            extra + list((stage_overrides or {}).get(name, ())), configs[name])
        for name in MODELS
    }
    metrics = {}
    reuse = _evaluations_current(exp_dir, report_dir, plan.decoding)
    # Each extra decoding is stored as <model>_test_<method>.json and reused like the main one.
    extra_reuse = {method: _evaluations_current(exp_dir, report_dir, method, f"test_{method}")
                   for method in plan.extra_decodings}
    for name in MODELS:
        evaluation = _evaluate_stage(name, corpus_dir, exp_dir, report_dir, reuse,
                                     plan.decoding)
        checkpoint = exp_dir / name / "model.ckpt"
        metrics[name] = {
            "params": results[name]["params"],
            "checkpoint_mb": round(checkpoint.stat().st_size / 2**20, 2),
            "wer": evaluation["wer"],
            "cer": evaluation["cer"],
            "rtfx": evaluation["rtfx"],
            "train_seconds": results[name]["train_seconds"],
            "train_steps": results[name]["steps"],
            "teacher_cache_seconds": results[name].get("teacher_cache_seconds"),
            "checkpoint": str(checkpoint),
            "substitutions": evaluation["substitutions"],
            "deletions": evaluation["deletions"],
            "insertions": evaluation["insertions"],
            "utterances": evaluation["utterances"],
            "decoding": evaluation["method"],
        }
        if plan.extra_decodings:
            decoded = {method: _evaluate_stage(name, corpus_dir, exp_dir, report_dir,
                                               extra_reuse[method], method, f"test_{method}")
                       for method in plan.extra_decodings}
            metrics[name]["decodings"] = {
                method: {key: result[key] for key in ("wer", "cer", "rtfx")}
                for method, result in decoded.items()
            }
        if plan.lm_order:
            fused = _lm_stage(name, plan, corpus_dir, exp_dir, report_dir, reuse)
            metrics[name]["lm"] = {
                "order": fused["lm"]["order"], "weight": fused["lm"]["weight"],
                "length_bonus": fused["lm"]["length_bonus"],
                "unk_penalty": fused["lm"].get("unk_penalty", 0.0),
                "beam_size": plan.lm_beam_size, "wer": fused["wer"], "cer": fused["cer"],
                "rtfx": fused["rtfx"], "val_wer": fused["lm"]["val_wer"],
                "val_wer_ctc_beam": fused["lm"]["val_wer_ctc_beam"],
                "val_perplexity": fused["lm"]["val_perplexity"],
                "tune_seconds": fused["lm"]["tune_seconds"],
            }
    histories = {name: results[name].get("val_history", []) for name in MODELS}
    plots = _plots(report_dir, metrics, histories)
    seconds = time.perf_counter() - start
    reused = sum(bool(results[name].get("reused")) for name in MODELS)
    _report(report_dir, metrics, corpus_summary, plots, seconds, title, reused, notes)
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    console.print((report_dir / "report.md").read_text(), markup=False)
    return metrics
