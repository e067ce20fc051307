"""LibriSpeech: teacher -> student -> KD student on GPUs, streamed from tar shards.

Stages (``--stage N --stop-stage M``, as in Kaldi, ESPnet and icefall; every stage reuses what
an earlier run finished):

  0  manifests   NeMo JSONL per split from a LibriSpeech tree (``--root``, the folder holding
                 ``train-clean-100/`` ...; ``<spk>/<chapter>/<spk>-<chapter>.trans.txt``);
                 transcripts as distributed (upper case: the tokenizers normalise case)
  1  shards      the training manifest packed into tar shards (``asrkd shard``)
  2  tokenizer   a BPE model of the training transcripts, shared by the three models
  3  models      teacher, student, the teacher's top-k CTC posteriors as a sharded cache read
                 alongside the audio, KD student; test-clean scored (report.md, metrics.json)
  4  evaluation  the three models on dev-clean, dev-other, test-clean and test-other

Presets (``--gpus N``): a FastConformer-Large hybrid CTC/attention teacher (139 M parameters
with BPE 1024) and a FastConformer-Small student (17 M, 8x fewer), 8x subsampling, bf16-mixed,
DDP over N GPUs.
Batch seconds and learning rates per GPU count are in :data:`GPU_PLANS`; the training hours
there are estimates (from NeMo's published FastConformer recipes, scaled), not measurements,
until a run on real GPUs replaces them.

``--tiny`` runs every stage end to end on the CPU in a few minutes (CI): a LibriSpeech-shaped
tree is built from CMU AN4 in ``../shared/data/an4`` (symbolic links, FLAC, AN4 speakers as
LibriSpeech speaker folders), with tiny models and a few steps each. Its WER means nothing; it
proves the recipe runs.

Usage:
    python recipes/librispeech/run.py --root /data/LibriSpeech --gpus 8
    python recipes/librispeech/run.py --tiny --exp /tmp/ls_exp --out /tmp/ls_report
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF = Path(__file__).resolve().parent / "conf"

TRAIN_SETS = ("train-clean-100", "train-clean-360", "train-other-500")
EVAL_SETS = ("dev-clean", "dev-other", "test-clean", "test-other")


@dataclass(frozen=True)
class GPUPlan:
    """Per-GPU-count settings of the full recipe (estimates until measured on GPUs)."""

    max_batch_seconds: float  # padded audio per batch per GPU (H100 80 GB, bf16)
    teacher_lr: float
    student_lr: float
    teacher_steps: int
    student_steps: int
    estimated_hours: str  # teacher + student + KD student, all 960 h, on this many H100s


# Per-GPU batch fixed; the global batch grows with GPUs, the peak lr with its square root
# (from 1e-3 for one GPU's ~1000 s batch), capped at NeMo's FastConformer 5e-3 (AdamW, Noam-like
# warmup then cosine here). Steps: ~100 epochs of 960 h for 8 GPUs (NeMo trains its Large CTC
# for 1000+ epochs-equivalent on more GPUs; ours is a budget, not a reproduction).
GPU_PLANS = {
    1: GPUPlan(1000.0, 1e-3, 1.5e-3, 400_000, 300_000, "~900 h (estimate)"),
    2: GPUPlan(1000.0, 1.4e-3, 2e-3, 250_000, 200_000, "~500 h (estimate)"),
    4: GPUPlan(1000.0, 2e-3, 3e-3, 170_000, 130_000, "~270 h (estimate)"),
    8: GPUPlan(1000.0, 2.8e-3, 4e-3, 120_000, 90_000, "~150 h (estimate)"),
    16: GPUPlan(1000.0, 4e-3, 5e-3, 80_000, 60_000, "~90 h (estimate)"),
}

# --tiny: models small enough to train a few steps on 2 CPU cores in seconds.
TINY_MODEL = [
    "model.frontend.channels=[32]", "model.frontend.strides=[1]",
    "model.encoder.subsampling=dw_striding", "model.encoder.d_model=32",
    "model.encoder.n_heads=2", "model.encoder.n_layers=1",
    "model.encoder.subsampling_channels=16", "model.encoder.subsampling_factor=8",
    "model.transformer.d_model=32", "model.transformer.n_layers=1",
    "model.transformer.ff_dim=64",
]


def prepare(root: Path, out: Path, train_sets: tuple[str, ...]) -> dict:
    """Stage 0: one NeMo manifest per split folder (``librispeech_to_manifest``), then
    ``train.jsonl`` (the chosen training sets), ``val.jsonl`` (dev-clean: the checkpoint
    selection) and ``test.jsonl`` (test-clean, the report's main table)."""
    from asrkd.data.converters import librispeech_to_manifest

    out.mkdir(parents=True, exist_ok=True)
    for name in train_sets + EVAL_SETS:
        if not (root / name).is_dir():
            raise SystemExit(f"{root / name} not found (--root is the LibriSpeech folder; "
                             f"training sets: {', '.join(TRAIN_SETS)})")
        if not (out / f"{name}.jsonl").is_file():
            librispeech_to_manifest(root / name, out / f"{name}.jsonl")
    joined = {"train": "".join((out / f"{name}.jsonl").read_text() for name in train_sets),
              "val": (out / "dev-clean.jsonl").read_text(),
              "test": (out / "test-clean.jsonl").read_text()}
    for name, text in joined.items():
        (out / f"{name}.jsonl").write_text(text)
    counts = {}
    for name in ("train",) + EVAL_SETS:
        lines = [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines() if x]
        counts[name] = {"utterances": len(lines),
                        "hours": round(sum(x["duration"] for x in lines) / 3600, 3)}
    (out / "prepared.json").write_text(json.dumps(counts, indent=2))
    return counts


def build_tiny_tree(an4: Path, root: Path, train_utterances: int = 96) -> None:
    """A LibriSpeech-shaped tree from CMU AN4 (symbolic links): AN4 training speakers as
    train-clean-100, its ten test speakers split over the four evaluation sets."""
    manifests = {name: [json.loads(x) for x in (an4 / f"manifest_{name}.jsonl").read_text()
                        .splitlines() if x.strip()] for name in ("train", "test")}
    speakers = sorted({x["speaker"] for x in manifests["test"]})
    groups = {"train-clean-100": manifests["train"][:train_utterances]}
    for i, name in enumerate(EVAL_SETS):
        mine = set(speakers[i::len(EVAL_SETS)])
        groups[name] = [x for x in manifests["test"] if x["speaker"] in mine][:12]
    numbers: dict[str, int] = {}
    for split, lines in groups.items():
        by_speaker: dict[str, list[dict]] = {}
        for line in lines:
            by_speaker.setdefault(line["speaker"], []).append(line)
        for speaker, utterances in by_speaker.items():
            number = numbers.setdefault(speaker, 100 + len(numbers))
            folder = root / split / str(number) / "1"
            folder.mkdir(parents=True, exist_ok=True)
            rows = []
            for n, line in enumerate(utterances):
                name = f"{number}-1-{n:04d}"
                link = folder / f"{name}.flac"
                if not link.exists():
                    os.symlink((an4 / line["audio_filepath"]).resolve(), link)
                rows.append(f"{name} {line['text'].upper()}")
            (folder / f"{number}-1.trans.txt").write_text("\n".join(rows) + "\n")


def train_tokenizer(train_manifest: Path, out: Path, vocab_size: int) -> dict:
    """Stage 2: a BPE model of the training transcripts, saved as JSON (``tokenizer_from``)."""
    from asrkd.data.dataset import read_manifest
    from asrkd.data.tokenizer import build_tokenizer

    if out.is_file():
        return json.loads(out.read_text())
    texts = [entry.text for entry in read_manifest(train_manifest, check_audio=False)[0]]
    tokenizer = build_tokenizer("bpe", texts, vocab_size)
    out.write_text(json.dumps(tokenizer.to_dict()))
    return tokenizer.to_dict()


def evaluate_sets(exp: Path, manifests: Path, report: Path) -> dict:
    """Stage 4: WER/CER of the three models on each evaluation set (``eval_sets.json`` and a
    table appended to ``report.md``)."""
    from asrkd.recipe import MODELS
    from asrkd.training.pipeline import evaluate

    results: dict[str, dict] = {}
    for name in MODELS:
        for split in EVAL_SETS:
            metrics = evaluate(exp / name / "model.ckpt", manifests / f"{split}.jsonl",
                               out_jsonl=report / f"{name}_{split}_utterances.jsonl")
            results.setdefault(name, {})[split] = {
                "wer": metrics["wer"], "cer": metrics["cer"],
                "utterances": metrics["utterances"], "method": metrics["method"]}
    (report / "eval_sets.json").write_text(json.dumps(results, indent=2))
    lines = ["", "## WER on the LibriSpeech evaluation sets", "",
             "| model | " + " | ".join(EVAL_SETS) + " |", "|---|" + "---:|" * len(EVAL_SETS)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[s]['wer']:.2f}"
                                                  for s in EVAL_SETS) + " |")
    report_md = report / "report.md"
    text = report_md.read_text() if report_md.is_file() else ""
    text = text.split("\n## WER on the LibriSpeech evaluation sets")[0].rstrip("\n")
    report_md.write_text(text + "\n" + "\n".join(lines) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="the LibriSpeech folder")
    parser.add_argument("--train-sets", nargs="+", default=list(TRAIN_SETS),
                        choices=TRAIN_SETS)
    parser.add_argument("--gpus", type=int, default=8, choices=sorted(GPU_PLANS))
    parser.add_argument("--nodes", type=int, default=1,
                        help="Lightning num_nodes (multi-node: see docs/multi-node.md)")
    parser.add_argument("--workers", type=int, default=4, help="loader workers per GPU")
    parser.add_argument("--shard-seconds", type=float, default=3600.0)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--stop-stage", type=int, default=4)
    parser.add_argument("--exp", type=Path, default=ROOT / "exp" / "librispeech")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "librispeech")
    parser.add_argument("--tiny", action="store_true",
                        help="CI: every stage on a LibriSpeech-shaped tree built from AN4")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data" / "an4")
    args = parser.parse_args()
    from asrkd.recipe import run_recipe

    exp, out = args.exp.resolve(), args.out.resolve()
    manifests, shards, tokenizer = exp / "manifests", exp / "shards", exp / "tokenizer.json"
    if args.tiny:
        if not (args.shared / "manifest_train.jsonl").is_file():
            raise SystemExit(f"AN4 not found at {args.shared} (pass --shared PATH)")
        args.root = exp / "LibriSpeech"
        args.train_sets = ["train-clean-100"]
        build_tiny_tree(args.shared, args.root)
    elif args.root is None:
        raise SystemExit("--root (the LibriSpeech folder) is required unless --tiny")

    def run(stage: int) -> bool:
        return args.stage <= stage <= args.stop_stage

    if run(0):
        print(json.dumps(prepare(args.root, manifests, tuple(args.train_sets)), indent=2))
    if run(1) and not (shards / "index.json").is_file():
        from asrkd.data.shards import write_shards

        print(json.dumps(write_shards(manifests / "train.jsonl", shards,
                                      shard_seconds=60.0 if args.tiny else args.shard_seconds)))
    if run(2):
        train_tokenizer(manifests / "train.jsonl", tokenizer, 48 if args.tiny else
                        args.vocab_size)
    if run(3):
        plan, overrides, per_model = _plan(args, shards, tokenizer)
        run_recipe(manifests, out, exp, plan=plan, overrides=overrides,
                   stage_overrides=per_model,
                   configs={name: CONF / f"{name}.yaml"
                            for name in ("teacher", "student", "student_kd")},
                   corpus_summary=_summary(manifests), title="asrkd on LibriSpeech"
                   + (" (tiny CI tree from AN4: the numbers mean nothing)" if args.tiny else ""),
                   notes=PUBLISHED)
    if run(4):
        evaluate_sets(exp, manifests, out)


PUBLISHED = [
    "## Published results (LibriSpeech 960 h, test-clean / test-other WER, no LM)",
    "",
    "| system (Gulati et al. 2020, Conformer, Table 2) | params | test-clean | test-other |",
    "|---|---:|---:|---:|",
    "| Conformer (S) transducer | 10.3 M | 2.7 % | 6.3 % |",
    "| Conformer (M) transducer | 30.7 M | 2.3 % | 5.0 % |",
    "| Conformer (L) transducer | 118.8 M | 2.1 % | 4.3 % |",
    "",
    "Text normalisation: LibriSpeech's transcripts, lowercased; no other change.",
]


def _plan(args: argparse.Namespace, shards: Path, tokenizer: Path):  # noqa: ANN202
    from asrkd.recipe import RecipePlan

    common = [f"data.train_shards={shards}", f"training.tokenizer_from={tokenizer}",
              "data.speed_factors=[0.9,1.0,1.1]", f"data.num_workers={args.workers}"]
    if args.tiny:
        plan = RecipePlan(teacher_steps=6, student_steps=4, max_batch_seconds=20.0,
                          val_every_steps=3, warmup_steps=1, kd_teacher_cache=True)
        return plan, common + TINY_MODEL + [
            "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32",
            "data.num_workers=2", "data.shuffle_buffer=16", "data.eval_max_batch_seconds=60"
        ], {}
    gpu = GPU_PLANS[args.gpus]
    plan = RecipePlan(teacher_steps=gpu.teacher_steps, student_steps=gpu.student_steps,
                      max_batch_seconds=gpu.max_batch_seconds, val_every_steps=5000,
                      warmup_steps=10_000, kd_teacher_cache=True)
    return plan, common + [
        "trainer.accelerator=gpu", f"trainer.devices={args.gpus}",
        f"trainer.num_nodes={args.nodes}", "trainer.strategy=ddp",
        "trainer.precision=bf16-mixed"], {
            "teacher": [f"training.optim.lr={gpu.teacher_lr}"],
            "student": [f"training.optim.lr={gpu.student_lr}"],
            "student_kd": [f"training.optim.lr={gpu.student_lr}"]}


def _summary(manifests: Path) -> str:
    counts = json.loads((manifests / "prepared.json").read_text())
    return (f"LibriSpeech, {counts['train']['hours']:.1f} h of training audio "
            f"({counts['train']['utterances']} utterances); validation dev-clean, test "
            "test-clean (all four evaluation sets in the last table)")


if __name__ == "__main__":
    main()
