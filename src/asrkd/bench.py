"""``asrkd bench``: teacher, student and KD student measured side by side in one run.

Same machine, same process, same thread count (2 by default) for every figure:

* size: parameters, checkpoint MB, FLOPs per second of audio (eval forward, 1 x 10 s);
* inference RTFx (audio seconds / wall seconds, features + model + decoding) for every
  decoding method the model has (CTC greedy, attention beam; RNN-T greedy and beam), at batch
  1 and batch 16, on 10 s clips cut from the default corpus's test split;
* the same for the ONNX export (onnxruntime, CTC greedy) and its int8 quantization, plus
  the WER of float and int8 ONNX transcripts on the whole test split;
* training: audio seconds per second of a forward + loss + backward + AdamW step (batch of
  8 x 10 s), its FLOPs, the model-FLOPs utilisation (MFU) against an fp32 matmul peak
  measured in the same run, and the peak RSS of a fresh process doing one such step;
* NeMo's ConformerEncoder against ours, when NeMo's separate venv exists
  (``benchmarks/install_nemo.sh``); otherwise the reason it is missing.

RNN-T decoding rows come from untrained ``*_rnnt`` presets unless an RNN-T checkpoint is
given: the demo's models use attention decoders. An untrained transducer emits up to
``max_symbols_per_frame`` labels per frame, so these rows are an upper bound on decoding cost.

Writes ``BENCHMARKS.md``, a JSON file and a PNG plot (RTFx vs WER).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.flop_counter import FlopCounterMode

from asrkd.data.dataset import ManifestDataset, duration_batches
from asrkd.data.tokenizer import CharTokenizer
from asrkd.losses import ASRLoss
from asrkd.models.common import pad_sequences
from asrkd.models.e2e_asr import E2EASR, build_model, load_checkpoint
from asrkd.models.presets import get_preset
from asrkd.utils.markdown import carry_sections
from asrkd.utils.metrics import corpus_error_rates
from asrkd.utils.threads import torch_threads
from asrkd.utils.timing import best_time, cpu_model, peak_rss_mb

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("teacher", "student", "student_kd")


@dataclass(frozen=True)
class BenchPlan:
    clips: int = 16  # 10 s clips: batch 1 runs over all of them, batch 16 over one batch
    clip_seconds: float = 10.0
    batch: int = 16
    rnnt_clips: int = 2  # untrained transducers are slow to decode: fewer clips
    train_batch: int = 8
    train_seconds: float = 10.0
    repeats: int = 3
    timing_seconds: float = 0.5  # RTFx: each batch repeats until this much time has run
    matmul_size: int = 2048
    longform_minutes: tuple[float, ...] = (1.0, 10.0, 60.0)


QUICK = BenchPlan(clips=2, clip_seconds=2.0, batch=2, rnnt_clips=1, train_batch=2,
                  train_seconds=2.0, repeats=1, timing_seconds=0.0, matmul_size=256,
                  longform_minutes=(0.05, 0.1))


def test_clips(corpus: Path, plan: BenchPlan) -> list[np.ndarray]:
    """``plan.clips`` clips of ``plan.clip_seconds``, concatenating test utterances in order
    (real speech, so decoders emit what they would in use)."""
    dataset = ManifestDataset(corpus / "test.jsonl")
    target = int(plan.clip_seconds * 16000)
    clips, current, index = [], [], 0
    while len(clips) < plan.clips:
        current.append(dataset[index % len(dataset)]["audio"].numpy())
        index += 1
        if sum(len(c) for c in current) >= target:
            clips.append(np.concatenate(current)[:target])
            current = []
    return clips


def _batches(clips: list[np.ndarray], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [pad_sequences([torch.from_numpy(c) for c in clips[i : i + size]])
            for i in range(0, len(clips), size)]


def rtfx(
    run, batches: list[tuple[torch.Tensor, torch.Tensor]], repeats: int,  # noqa: ANN001
    timing_seconds: float = 0.0, sample_rate: int = 16000,
) -> float:
    """Audio seconds / wall seconds of ``run(audio, lengths)`` over padded batches.

    One untimed warm-up batch first; then each batch counts its fastest of at least
    ``repeats`` runs, repeated until ``timing_seconds`` of runs have passed. A single pass let
    two identical students differ by 40 % at batch 1 (377 vs 528 RTFx) on this 2-core VM, and
    one run of a 0.9 s batch put the teacher's batch-16 RTFx below its batch-1 figure. The
    one RTFx of ``asrkd bench`` and ``benchmarks/models.py``; ``asrkd evaluate`` times its
    batches the same way (:func:`~asrkd.utils.timing.best_time`) as it transcribes them.
    """
    run(*batches[0])
    wall = sum(
        best_time(partial(run, audio, lengths), repeats, warmup=0, min_seconds=timing_seconds)
        for audio, lengths in batches
    )
    return round(sum(float(lengths.sum()) for _, lengths in batches) / sample_rate / wall, 1)


def clip_rtfx(run, clips: list[np.ndarray], batch_size: int, plan: BenchPlan) -> float:  # noqa: ANN001
    """:func:`rtfx` over ``clips`` in batches of ``batch_size``, with ``plan``'s repeats."""
    return rtfx(run, _batches(clips, batch_size), plan.repeats, plan.timing_seconds)


def count_flops(model: E2EASR, seconds: float = 10.0) -> dict[str, int]:
    """FLOPs of an eval-mode forward (no targets) over one ``seconds`` clip: ``total`` and
    the ``frontend``'s share of it (``torch.utils.flop_counter``: matmuls and convolutions)."""
    counter = FlopCounterMode(display=False)
    audio = 0.1 * torch.randn(1, int(16000 * seconds), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad(), counter:
        model(audio, torch.tensor([audio.shape[1]]))
    frontend = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                   if name.split(".")[-1] == "frontend" and name.count(".") == 1)
    return {"total": counter.get_total_flops(), "frontend": frontend}


def matmul_peak(size: int, repeats: int) -> float:
    """Best fp32 FLOP/s of a square matmul on the current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = best_time(lambda: torch.matmul(a, b), max(3, repeats))
    return 2 * size**3 / seconds


def training_step(model: E2EASR, plan: BenchPlan, copy_model: bool = True) -> dict[str, float]:
    """Audio seconds per second, FLOPs and seconds of one training step on random audio.

    Runs on a copy (unless ``copy_model`` is False): the optimizer step and batch-norm
    statistics must not change the model that is measured (and exported) afterwards.
    """
    if copy_model:
        model = copy.deepcopy(model)
    samples = int(16000 * plan.train_seconds)
    generator = torch.Generator().manual_seed(0)
    audio = 0.1 * torch.randn(plan.train_batch, samples, generator=generator)
    lengths = torch.full((plan.train_batch,), samples)
    tokens = int(plan.train_seconds * 14)  # ~14 characters per second of read speech
    targets = torch.randint(5, model.vocab_size, (plan.train_batch, tokens), generator=generator)
    target_lengths = torch.full((plan.train_batch,), tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn = ASRLoss()
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        output = model(audio, lengths, targets, target_lengths)
        loss_fn(output, targets, target_lengths)["total"].backward()
        optimizer.step()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    seconds = best_time(step, plan.repeats, warmup=0)
    return {
        "audio_seconds_per_second": round(plan.train_batch * plan.train_seconds / seconds, 1),
        "step_seconds": round(seconds, 3),
        "step_flops": counter.get_total_flops(),
    }


def peak_rss_of_training(source: str, plan: BenchPlan, threads: int) -> dict[str, float]:
    """Peak RSS of a fresh process that loads the model (a checkpoint path, or
    ``preset:<name>``) and runs training steps of ``plan.train_batch`` x
    ``plan.train_seconds``: ``peak_mb``, and ``step_mb``, what the steps added to the
    high-water mark left by loading. A fresh process per model, since the mark only grows."""
    command = [sys.executable, "-m", "asrkd.bench", "--rss-child", source,
               "--threads", str(threads), "--train-batch", str(plan.train_batch),
               "--train-seconds", str(plan.train_seconds)]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=900)
    return json.loads(output.stdout.strip().splitlines()[-1])


def _rss_child(source: str, plan: BenchPlan) -> dict[str, float]:
    model = _load(source)
    before = peak_rss_mb()
    training_step(model, replace(plan, repeats=1), copy_model=False)
    peak = peak_rss_mb()
    return {"peak_mb": round(peak, 1), "step_mb": round(peak - before, 1)}


def run_longform(checkpoint: str | Path, wav: str | Path, threads: int,
                 config: dict | None = None) -> dict:
    """Transcribe ``wav`` with :class:`~asrkd.longform.LongFormTranscriber` in a fresh process:
    ``result`` (its ``to_dict``), ``seconds`` (transcription only, the model loaded) and
    ``peak_rss_mb`` of that process (VmHWM: a child's ``ru_maxrss`` would start from its
    parent's, which here holds a recording and models)."""
    command = [sys.executable, "-m", "asrkd.bench", "--longform-child", str(checkpoint),
               str(wav), "--threads", str(threads), "--longform-config", json.dumps(config or {})]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=7200)
    return json.loads(output.stdout.strip().splitlines()[-1])


def _longform_child(checkpoint: str, wav: str, config: dict) -> dict:
    from asrkd.longform import LongFormConfig, LongFormTranscriber

    model = load_checkpoint(checkpoint)
    start = time.perf_counter()
    result = LongFormTranscriber(model, config=LongFormConfig(**config),
                                 progress=False).transcribe(wav)
    return {"result": result.to_dict(), "seconds": time.perf_counter() - start,
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def longform_rows(checkpoint: str | Path, clips: list[np.ndarray], plan: BenchPlan,
                  threads: int, workdir: Path) -> dict[str, dict]:
    """RTFx and peak RSS of ``asrkd infer``'s long-form path on recordings of
    ``plan.longform_minutes`` (the clips repeated), one fresh process each."""
    rows = {}
    speech = np.concatenate(clips)
    for minutes in plan.longform_minutes:
        samples = int(minutes * 60 * 16000)
        wav = workdir / f"longform_{minutes:g}min.wav"
        sf.write(wav, np.resize(speech, samples), 16000, subtype="PCM_16")
        run = run_longform(checkpoint, wav, threads)
        wav.unlink()
        rows[f"{minutes:g}"] = {"rtfx": round(samples / 16000 / run["seconds"], 1),
                                "peak_rss_mb": run["peak_rss_mb"],
                                "segments": len(run["result"]["segments"])}
    return rows


def _load(source: str) -> E2EASR:
    if source.startswith("preset:"):
        torch.manual_seed(0)
        return build_model(get_preset(source.removeprefix("preset:")), CharTokenizer.english())
    return load_checkpoint(source)


def onnx_rows(model: E2EASR, clips: list[np.ndarray], plan: BenchPlan, manifest: Path | None,
              threads: int, workdir: Path) -> dict[str, dict]:
    """RTFx at batch 1 and 16 and test-split WER of the float and int8 ONNX exports."""
    from asrkd.export import OnnxASR, export_onnx

    rows = {}
    for name, int8 in (("onnx", False), ("onnx_int8", True)):
        path = workdir / f"{name}.onnx"
        export_onnx(model, path, int8=int8)
        session = OnnxASR(path, threads=threads)

        def run(audio, lengths, session=session):  # noqa: ANN001, ANN202
            return session.infer(audio.numpy(), lengths.numpy(), "ctc_greedy")

        row = {"file_mb": round(path.stat().st_size / 1e6, 2),
               "rtfx_b1": clip_rtfx(run, clips, 1, plan),
               f"rtfx_b{plan.batch}": clip_rtfx(run, clips, plan.batch, plan)}
        if manifest is not None:
            row["wer"], row["texts"], row["differ_from_torch"] = _onnx_wer(session, manifest,
                                                                           model)
            row["utterances"] = len(row["texts"])
        rows[name] = row
    if "texts" in rows["onnx"]:
        rows["onnx_int8"]["wer_vs_float"] = round(corpus_error_rates(
            rows["onnx"]["texts"], rows["onnx_int8"]["texts"])["wer"], 4)
        rows["onnx_int8"]["wer_change"] = round(rows["onnx_int8"]["wer"] - rows["onnx"]["wer"], 4)
        for row in rows.values():
            row.pop("texts")
    return rows


def _onnx_wer(session, manifest: Path, model: E2EASR) -> tuple[float, list[str], int]:  # noqa: ANN001
    """WER of the ONNX transcripts, the transcripts, and how many differ from PyTorch's."""
    dataset = ManifestDataset(manifest)
    references, hypotheses, differ = [], [], 0
    for batch in duration_batches(dataset.entries, 120.0):
        items = [dataset[i] for i in batch]
        audio, lengths = pad_sequences([item["audio"] for item in items])
        texts = session.infer(audio.numpy(), lengths.numpy(), "ctc_greedy")
        expected = model.infer(audio, lengths, method="ctc_greedy")
        differ += sum(text != hyp.text for text, hyp in zip(texts, expected))
        hypotheses += texts
        references += [model.tokenizer.normalizer(item["text"]) for item in items]
    return round(corpus_error_rates(references, hypotheses)["wer"], 4), hypotheses, differ


def decoding_rows(model: E2EASR, clips: list[np.ndarray], plan: BenchPlan,
                  methods: list[str]) -> dict[str, dict]:
    rows = {}
    for method in methods:
        use = clips[: plan.rnnt_clips] if method.startswith("rnnt") else clips

        def run(audio, lengths, method=method):  # noqa: ANN001, ANN202
            return model.infer(audio, lengths, method=method)

        rows[method] = {"rtfx_b1": clip_rtfx(run, use, 1, plan),
                        f"rtfx_b{plan.batch}": clip_rtfx(run, use, plan.batch, plan)}
    return rows


def _methods(model: E2EASR) -> list[str]:
    methods = ["ctc_greedy"] if model.ctc is not None else []
    if model.decoder_type == "transformer":
        methods.append("attention_beam")
    if model.decoder_type == "rnnt":
        methods += ["rnnt_greedy", "rnnt_beam"]
    return methods


def nemo_comparison(quick: bool, threads: int) -> dict:
    """Run benchmarks/nemo_compare.py (both implementations, both orders) if it can run."""
    script = ROOT / "benchmarks" / "nemo_compare.py"
    if not script.is_file():
        return {"missing": f"{script} not found (bench runs from a source checkout)"}
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(script), "--out-dir", tmp, "--threads", str(threads)]
        if quick:
            command.append("--quick")
        process = subprocess.run(command, capture_output=True, text=True, timeout=1200)
        result_file = Path(tmp) / "nemo_compare.json"
        if not result_file.is_file():
            return {"missing": f"nemo_compare.py failed: {process.stderr.strip()[-300:]}"}
        report = json.loads(result_file.read_text())
    if not report["nemo"].get("available"):
        return {"missing": report["nemo"].get("reason", "NeMo venv not available") +
                " (install it with `bash benchmarks/install_nemo.sh`)"}
    return {"summary": report["summary"], "nemo_version": report["nemo"].get("nemo_version")}


def run_bench(exp_dir: Path, corpus: Path, out_md: Path, out_json: Path, plot: Path,
              quick: bool = False, threads: int = 2, nemo: bool = True,
              checkpoints: dict[str, Path] | None = None) -> dict:
    plan = QUICK if quick else BenchPlan()
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    checkpoints = checkpoints or {name: exp_dir / name / "model.ckpt" for name in MODELS}
    missing = [str(p) for p in checkpoints.values() if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoints missing: {', '.join(missing)} (run `make demo` "
                                "first, or pass --ckpt name=path)")
    manifest = corpus / "test.jsonl"
    results: dict = {"models": {}, "rnnt_untrained": {}}
    with torch_threads(threads), tempfile.TemporaryDirectory() as tmp:
        clips = test_clips(corpus, plan)
        peak = matmul_peak(plan.matmul_size, plan.repeats)
        results["matmul_peak_gflops"] = round(peak / 1e9, 1)
        for name, path in checkpoints.items():
            model = load_checkpoint(path).eval()
            train = training_step(model, plan)
            row = {
                "checkpoint": str(path),
                "params": model.num_parameters(),
                "checkpoint_mb": round(Path(path).stat().st_size / 1e6, 2),
                "gflops_per_audio_second": round(count_flops(model, 10.0)["total"] / 10.0 / 1e9, 3),
                "wer": _demo_wer(Path(path), exp_dir),
                "decoding": decoding_rows(model, clips, plan, _methods(model)),
                # Three significant digits, not decimals: a small model's MFU on a busy
                # machine can be under 0.0005 and must not round to 0.
                "train": {**train, "mfu": float(
                    f"{train['step_flops'] / train['step_seconds'] / peak:.3g}")},
                "train_peak_rss_mb": peak_rss_of_training(str(path), plan, threads)["peak_mb"],
            }
            workdir = Path(tmp) / name
            workdir.mkdir()
            if model.ctc is not None:
                row["onnx"] = onnx_rows(model, clips, plan, manifest, threads, workdir)
            row["longform"] = longform_rows(path, clips, plan, threads, workdir)
            results["models"][name] = row
        if not any("rnnt_greedy" in row["decoding"] for row in results["models"].values()):
            for preset in ("teacher_cpu_rnnt", "student_cpu_rnnt"):
                model = _load(f"preset:{preset}").eval()
                results["rnnt_untrained"][preset] = {
                    "params": model.num_parameters(),
                    "decoding": decoding_rows(model, clips, plan, ["rnnt_greedy", "rnnt_beam"]),
                }
    results["corpus"], results["exp"] = str(corpus), str(exp_dir)
    results["nemo"] = nemo_comparison(quick, threads) if nemo else {"missing": "--no-nemo"}
    results["machine"] = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                          "threads": threads, "torch": torch.__version__,
                          "loadavg_before": load_before, "loadavg_after": list(os.getloadavg())}
    results["plan"] = asdict(plan)
    results["quick"] = quick
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results, _relative(out_json, out_md), _relative(plot, out_md))
    # Sections other benchmark scripts wrote into the file (data loading, GPU check) stay.
    out_md.write_text(carry_sections(out_md.read_text(), text) if out_md.is_file() else text)
    _plot(results, plot)
    return results


def _relative(path: Path, document: Path) -> Path:
    """``path`` as a link from ``document``'s folder."""
    return Path(os.path.relpath(Path(path).resolve(), Path(document).resolve().parent))


def _demo_wer(checkpoint: Path, exp_dir: Path) -> float | None:
    """The test-split WER that the demo's report measured for this very checkpoint file."""
    for candidate in (ROOT / "reports" / exp_dir.name / "metrics.json",
                      exp_dir / "metrics.json"):
        if candidate.is_file():
            for row in json.loads(candidate.read_text()).values():
                if isinstance(row, dict) and "checkpoint" in row and \
                        Path(row["checkpoint"]).resolve() == Path(checkpoint).resolve():
                    return row.get("wer")
    return None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def markdown(results: dict, json_path: Path, plot: Path) -> str:
    plan = results["plan"]
    batch = plan["batch"]
    models = results["models"]
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `asrkd bench` in one run of {results['seconds']:.0f} s on "
        f"{results['machine']['cpu_model']} ({results['machine']['cpu_count']} cores), "
        f"{results['machine']['threads']} threads, torch {results['machine']['torch']}, "
        f"{results['date']}. Load average before/after: "
        f"{results['machine']['loadavg_before'][0]:.2f}/"
        f"{results['machine']['loadavg_after'][0]:.2f}. Raw figures: [`{json_path}`]({json_path})"
        + (" (**quick mode: tiny shapes, the numbers mean nothing**)" if results["quick"]
           else "") + ".",
        "",
        f"RTFx = audio seconds / wall seconds (features + model + decoding) on "
        f"{plan['clips']} clips of {plan['clip_seconds']:.0f} s cut from the test split of "
        f"`{results.get('corpus', 'data/default')}`, after a warm-up batch; each batch counts "
        f"its fastest of at least {plan['repeats']} runs (and {plan['timing_seconds']:g} s of "
        f"runs). WER: the test WER that the report of `{results.get('exp', 'exp/demo')}` "
        "measured for the same checkpoint (`reports/<name>/metrics.json`).",
        "",
        "## Size and inference",
        "",
        "| model | params | checkpoint MB | GFLOPs / audio s | WER % | method | RTFx b1 | "
        f"RTFx b{batch} |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, row in models.items():
        for i, (method, speed) in enumerate(row["decoding"].items()):
            head = (f"| {name} | {row['params'] / 1e6:.2f} M | {row['checkpoint_mb']:.1f} | "
                    f"{row['gflops_per_audio_second']:.2f} | {_pct(row['wer'])} |"
                    if i == 0 else "| | | | | |")
            lines.append(f"{head} {method} | {speed['rtfx_b1']:.0f} | "
                         f"{speed[f'rtfx_b{batch}']:.0f} |")
        for kind, onnx in row.get("onnx", {}).items():
            wer = _pct(onnx.get("wer"))
            lines.append(f"| | | {onnx['file_mb']:.1f} ({kind}) | | {wer} | {kind} ctc_greedy | "
                         f"{onnx['rtfx_b1']:.0f} | {onnx[f'rtfx_b{batch}']:.0f} |")
    if "teacher" in models and "student" in models:
        t, s = models["teacher"], models["student"]
        lines += ["", f"Student / teacher: {s['params'] / t['params']:.2f}x parameters, "
                  f"CTC greedy RTFx {s['decoding']['ctc_greedy']['rtfx_b1'] / t['decoding']['ctc_greedy']['rtfx_b1']:.2f}x "  # noqa: E501
                  f"at batch 1 and {s['decoding']['ctc_greedy'][f'rtfx_b{batch}'] / t['decoding']['ctc_greedy'][f'rtfx_b{batch}']:.2f}x "  # noqa: E501
                  f"at batch {batch}."]
    int8 = {n: r["onnx"]["onnx_int8"] for n, r in models.items() if "onnx" in r}
    if any("wer_change" in v for v in int8.values()):
        differ = ", ".join(f"{n} {r['onnx']['onnx']['differ_from_torch']}"
                           for n, r in models.items() if "onnx" in r)
        lines += ["", f"ONNX WER is measured here on the whole test split "
                  f"({next(iter(int8.values()))['utterances']} utterances); float ONNX "
                  f"transcripts that differ from PyTorch's: {differ}. int8 changes the WER by "
                  + ", ".join(f"{n} {100 * v['wer_change']:+.1f}" for n, v in int8.items())
                  + " points (absolute); its transcripts differ from the float ones by "
                  + ", ".join(f"{n} {_pct(v['wer_vs_float'])} %" for n, v in int8.items())
                  + " WER (the under-trained models have many near-ties)."]
    if results["rnnt_untrained"]:
        lines += ["", "## RNN-T decoding (untrained presets: an upper bound on cost)", "",
                  f"| preset | params | method | RTFx b1 | RTFx b{batch} |",
                  "|---|---:|---|---:|---:|"]
        for name, row in results["rnnt_untrained"].items():
            for method, speed in row["decoding"].items():
                lines.append(f"| {name} | {row['params'] / 1e6:.2f} M | {method} | "
                             f"{speed['rtfx_b1']:.1f} | {speed[f'rtfx_b{batch}']:.1f} |")
    longform = {n: r["longform"] for n, r in models.items() if r.get("longform")}
    if longform:
        lines += ["", "## Long recordings", "",
                  "`asrkd infer --ckpt C long.wav` (`asrkd.longform`: the recording is read in "
                  "windows, cut at pauses the model hears, and the pieces decoded in batches with "
                  "the model's default search), on the clips above repeated to each length, "
                  "written as 16-bit WAV; a fresh process per row, so peak RSS (VmHWM) includes "
                  "loading the model.", "",
                  "| model | audio min | RTFx | peak RSS MB | RSS / shortest |",
                  "|---|---:|---:|---:|---:|"]
        for name, rows in longform.items():
            first = next(iter(rows.values()))["peak_rss_mb"]
            for i, (minutes, row) in enumerate(rows.items()):
                lines.append(f"| {name if i == 0 else ''} | {minutes} | {row['rtfx']:.0f} | "
                             f"{row['peak_rss_mb']:.0f} | {row['peak_rss_mb'] / first:.2f} |")
    lines += ["", "## Training", "",
              f"One step = forward + loss + backward + AdamW on {plan['train_batch']} x "
              f"{plan['train_seconds']:.0f} s. MFU = step FLOPs / step time / fp32 matmul peak "
              f"({results['matmul_peak_gflops']:.1f} GFLOP/s, {plan['matmul_size']}^2 matmul, "
              "measured in this run). Peak RSS: a fresh process loading the model and doing "
              "one step.", "",
              "| model | audio s / s | step s | step GFLOPs | MFU | peak RSS MB |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, row in models.items():
        train = row["train"]
        lines.append(f"| {name} | {train['audio_seconds_per_second']:.1f} | "
                     f"{train['step_seconds']:.2f} | {train['step_flops'] / 1e9:.1f} | "
                     f"{100 * train['mfu']:.0f}% | {row['train_peak_rss_mb']:.0f} |")
    lines += ["", "## Peer: NeMo ConformerEncoder (FastConformer-Small configuration)", ""]
    nemo = results["nemo"]
    if "summary" in nemo and "nemo" in nemo["summary"]:
        s = nemo["summary"]
        lines += ["| implementation | params | inference s | forward+backward s |",
                  "|---|---:|---:|---:|"]
        for impl in ("asrkd", "nemo"):
            lines.append(f"| {impl} | {s[impl]['params'] / 1e6:.2f} M | {s[impl]['infer_s']:.3f}"
                         f" | {s[impl]['train_s']:.3f} |")
        ratio = s["ratio_asrkd_over_nemo"]
        lines += ["", f"asrkd is {1 / ratio['infer_s']:.2f}x NeMo {nemo.get('nemo_version')}'s "
                  f"inference speed and {1 / ratio['train_s']:.2f}x its training speed (8 x 1000 "
                  "frames, best of both orders; `benchmarks/nemo_compare.py`)."]
    else:
        lines.append(f"Missing: {nemo.get('missing')}.")
    lines += ["", f"![RTFx vs WER]({plot})", ""]
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    markers = {"torch": "o", "onnx": "s", "onnx_int8": "^"}
    for color, (name, row) in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"),
                                  results["models"].items()):
        if row["wer"] is None:
            continue
        points = [("torch", row["decoding"]["ctc_greedy"]["rtfx_b1"], row["wer"])]
        points += [(kind, onnx["rtfx_b1"], onnx["wer"])
                   for kind, onnx in row.get("onnx", {}).items() if onnx.get("wer") is not None]
        for kind, speed, wer in points:
            axis.scatter(speed, 100 * wer, color=color, marker=markers[kind], s=50,
                         label=f"{name}, {kind}")
    axis.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    axis.set_xlabel("RTFx, CTC greedy, batch 1, 2 threads (higher is faster)")
    axis.set_ylabel("WER % (default test split)")
    axis.set_title("Speed vs accuracy")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    """Child modes for measurements in a fresh process, each printing one JSON line:
    ``python -m asrkd.bench --rss-child SRC`` (:func:`peak_rss_of_training`) and
    ``python -m asrkd.bench --longform-child CKPT WAV`` (:func:`run_longform`)."""
    import argparse

    parser = argparse.ArgumentParser()
    child = parser.add_mutually_exclusive_group(required=True)
    child.add_argument("--rss-child")
    child.add_argument("--longform-child", nargs=2, metavar=("CKPT", "WAV"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=BenchPlan.train_batch)
    parser.add_argument("--train-seconds", type=float, default=BenchPlan.train_seconds)
    parser.add_argument("--longform-config", default="{}", help="LongFormConfig fields, JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.longform_child:
        print(json.dumps(_longform_child(*args.longform_child,
                                         json.loads(args.longform_config))))
        return
    plan = BenchPlan(train_batch=args.train_batch, train_seconds=args.train_seconds)
    print(json.dumps(_rss_child(args.rss_child, plan)))


if __name__ == "__main__":
    main()
