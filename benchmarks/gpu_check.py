"""Train the LibriSpeech presets for a few hundred steps on one GPU: throughput, peak memory.

The teacher (FastConformer-Large + attention decoder + CTC) and the student
(FastConformer-Small, same heads) of ``recipes/librispeech/conf``, with a 1024-token BPE model,
one optimiser step per batch (AdamW, bf16 autocast as Lightning's ``bf16-mixed``), on synthetic
audio: speech-shaped noise of LibriSpeech's utterance lengths (12-16 s) in batches of about
``RECIPE.GPU_PLANS[1].max_batch_seconds`` padded seconds, with random transcripts of ~3 tokens per
second. Throughput does not depend on what the audio says; memory and step time do depend on
its length, hence realistic lengths. Prints and writes JSON; ``--markdown`` updates the "GPU
check" section of BENCHMARKS.md.

Usage: python benchmarks/gpu_check.py [--steps 200] [--markdown BENCHMARKS.md]
       python benchmarks/gpu_check.py --quick --device cpu   (a smoke test of this script)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import torch

from asrkd.data.corpus_vocab import ADJECTIVES, ANIMALS, FOODS, NAMES, OBJECTS, PEOPLE, PLACES
from asrkd.data.tokenizer import build_tokenizer
from asrkd.losses import ASRLoss, Supervised
from asrkd.models.e2e_asr import build_model
from asrkd.training.pipeline import load_run_config
from asrkd.utils.markdown import update_section

ROOT = Path(__file__).resolve().parents[1]


def _recipe():  # noqa: ANN202 - the LibriSpeech recipe module (its configs and GPU plans)
    spec = importlib.util.spec_from_file_location(
        "asrkd_librispeech_recipe", ROOT / "recipes" / "librispeech" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


RECIPE = _recipe()


def tokenizer(vocab_size: int, sentences: int = 20_000):  # noqa: ANN201
    """A BPE model of ``vocab_size`` pieces over random sentences of the corpus vocabulary
    (the output layer's size is what matters here, not what the pieces spell)."""
    rng = random.Random(0)
    words = [w for group in (ADJECTIVES, ANIMALS, FOODS, NAMES, OBJECTS, PEOPLE, PLACES)
             for w in group]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 25)))
             for _ in range(sentences)]
    return build_tokenizer("bpe", texts, vocab_size)


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    overrides = RECIPE.TINY_MODEL if args.quick else []
    config = load_run_config([RECIPE.CONF / f"{name}.yaml"], overrides)
    model_config = config.model_config()
    vocabulary = tokenizer(64, 500) if args.quick else tokenizer(1024)
    model = build_model(model_config, vocabulary).to(device)
    objective = Supervised(model, ASRLoss(config.training.asr_loss))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    sample_rate = model.features.config.sample_rate
    budget = 8.0 if args.quick else RECIPE.GPU_PLANS[1].max_batch_seconds
    seconds = (2.0, 2.5) if args.quick else (12.0, 16.0)
    generator = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, ...]:
        longest = torch.empty(1).uniform_(*seconds, generator=generator).item()
        size = max(1, int(budget // longest))
        lengths = (torch.rand(size, generator=generator) * (longest - seconds[0]) + seconds[0])
        lengths = (lengths * sample_rate).long()
        lengths[0] = int(longest * sample_rate)
        audio = torch.randn(size, int(lengths.max()), generator=generator) * 0.05
        tokens = (lengths.float() / sample_rate * 3).long().clamp(min=1)
        targets = torch.randint(4, model.vocab_size, (size, int(tokens.max())),
                                generator=generator)
        return (audio.to(device), lengths.to(device), targets.to(device), tokens.to(device))

    def step() -> float:
        audio, lengths, targets, tokens = batch()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = objective(audio, lengths, targets, tokens)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(lengths.sum()) / sample_rate

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, audio_seconds = time.perf_counter(), 0.0
    for _ in range(args.steps):
        audio_seconds += step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "params": model.num_parameters(),
        "steps": args.steps,
        "batch_seconds_budget": budget,
        "step_seconds": round(elapsed / args.steps, 4),
        "audio_seconds_per_second": round(audio_seconds / elapsed, 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device.type == "cuda" else None,
        # Hours of LibriSpeech 960 h epochs per day on this one device, at this throughput.
        "epochs_960h_per_day": round(audio_seconds / elapsed * 86400 / (960 * 3600), 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--json", type=Path,
                        default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    parser.add_argument("--markdown", type=Path, help="update this file's GPU check section")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run gpu_check on a machine with a GPU")
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": "bf16 autocast",
        "quick": args.quick,
        "models": {name: run_model(name, args, device) for name in ("teacher", "student")},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if args.markdown:
        update_section(args.markdown, "gpu-check", markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = ["## GPU check: LibriSpeech presets",
             "",
             f"`benchmarks/gpu_check.sh` on {result['device']} ({result['date']}, torch "
             f"{result['torch']}, {result['precision']}): synthetic 12-16 s utterances in "
             "batches of the recipe's one-GPU budget, AdamW steps after a warm-up."
             + (" **Quick mode: tiny shapes, the numbers mean nothing.**" if result["quick"]
                else ""),
             "",
             "| model | params | step s | audio s / s | peak GB | 960 h epochs / day |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in result["models"].items():
        peak = "-" if row["peak_memory_gb"] is None else f"{row['peak_memory_gb']:.1f}"
        lines.append(f"| {name} | {row['params'] / 1e6:.1f} M | {row['step_seconds']:.3f} | "
                     f"{row['audio_seconds_per_second']:.0f} | {peak} | "
                     f"{row['epochs_960h_per_day']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
