"""The ``asrkd`` command: corpus, presets, train, evaluate, infer, export, demo, shard,
cache-teacher, pseudo-label.

User errors (bad config key, missing file, bad manifest line, unreadable checkpoint) end the
command with one readable line on stderr and exit status 2; only bugs print tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from asrkd.errors import UserError

# What `make demo` produces: the scripts work with no arguments once it has run.
DEFAULT_CKPT = "exp/demo/student_kd/model.ckpt"


def cmd_corpus(args: argparse.Namespace) -> None:
    from asrkd.data.corpus import build_corpus

    build_corpus(
        args.out,
        seed=args.seed,
        n_train=args.train,
        n_val=args.val,
        n_test=args.test,
        workers=args.workers,
        force=args.force,
    )


def cmd_presets(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from asrkd.data.tokenizer import CharTokenizer
    from asrkd.models.e2e_asr import build_model
    from asrkd.models.presets import PRESETS

    table = Table(title="asrkd model presets (character vocabulary)")
    for column in ("preset", "params", "encoder", "decoder", "d_model x layers"):
        table.add_column(column)
    for name, make in PRESETS.items():
        config = make()
        model = build_model(config, CharTokenizer.english())
        encoder = sum(p.numel() for p in model.encoder.parameters())
        table.add_row(
            name,
            f"{model.num_parameters() / 1e6:.2f} M",
            f"{encoder / 1e6:.2f} M",
            config.decoder + (" + ctc" if config.ctc else ""),
            f"{config.encoder.d_model} x {config.encoder.n_layers}",
        )
    # Off a terminal (pipes, logs) rich assumes 80 columns and would wrap the names.
    Console(width=None if sys.stdout.isatty() else 120).print(table)


def cmd_train(args: argparse.Namespace) -> None:
    from asrkd.training.pipeline import load_run_config, train

    config = load_run_config(args.config, args.overrides)
    result = train(config, resume=args.resume)
    print(json.dumps({k: v for k, v in result.items() if k != "val_history"}, indent=2))


def _fusion(args: argparse.Namespace):  # noqa: ANN202
    """The LMFusion that --lm/--lm-weight/--length-bonus ask for, or None."""
    if not getattr(args, "lm", None):
        if any(v is not None for v in (args.lm_weight, args.length_bonus, args.unk_penalty)):
            raise UserError("--lm-weight, --length-bonus and --unk-penalty need --lm")
        return None
    from asrkd.models.lm import NGramLM

    return NGramLM.load(args.lm).fusion_settings(args.lm_weight, args.length_bonus,
                                                 args.unk_penalty)


def _load_with_search(args: argparse.Namespace):  # noqa: ANN202
    """The --ckpt model with --beam-size/--ctc-weight set as its default search."""
    from asrkd.models.e2e_asr import load_checkpoint

    model = load_checkpoint(args.ckpt)
    model.set_decoding(beam_size=args.beam_size, ctc_weight=args.ctc_weight)
    return model


def _requested_method(args: argparse.Namespace) -> str | None:
    """--method, or attention_beam when only --ctc-weight (its weight) was given."""
    if args.method is None and getattr(args, "ctc_weight", None) is not None:
        return "attention_beam"
    return args.method


def cmd_evaluate(args: argparse.Namespace) -> None:
    from asrkd.training.pipeline import evaluate

    fusion = _fusion(args)
    metrics = evaluate(
        _load_with_search(args), args.manifest, method=_requested_method(args), out_jsonl=args.out,
        threads=args.threads, fusion=fusion, timing_repeats=3 if args.rtfx else 0,
    )
    if fusion is not None:
        print(f"LM: {args.lm} (order {fusion.lm.order}), weight {fusion.weight:g}, "
              f"length bonus {fusion.length_bonus:g}, unknown-word penalty "
              f"{fusion.unk_penalty:g}")
    print(
        f"WER {100 * metrics['wer']:.2f}%  CER {100 * metrics['cer']:.2f}%  "
        f"(S {metrics['substitutions']}, D {metrics['deletions']}, I {metrics['insertions']} "
        f"of {metrics['words']} words)  RTFx {metrics['rtfx']}  "
        f"[{metrics['utterances']} utterances, {metrics['method']}, {metrics['threads']} threads]"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))


def cmd_lm(args: argparse.Namespace) -> None:
    from asrkd.data.dataset import read_manifest
    from asrkd.models.e2e_asr import load_checkpoint
    from asrkd.models.lm import train_lm
    from asrkd.training.pipeline import tune_fusion

    model = load_checkpoint(args.ckpt)
    texts = []
    for manifest in args.manifest:
        texts += [entry.text for entry in read_manifest(manifest)[0] if entry.text]
    for path in args.text:
        texts += [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
    if not texts:
        raise UserError("no text to train the LM on: pass --manifest or --text")
    lm = train_lm(texts, model.tokenizer, order=args.order)
    print(f"{lm!r} from {len(texts)} sentences")
    if args.tune:
        held_out = [model.tokenizer.encode(e.text) for e in read_manifest(args.tune)[0] if e.text]
        print(f"perplexity on {args.tune}: {lm.perplexity(held_out):.2f} per token")
        result = tune_fusion(model, args.tune, lm, beam_size=args.beam_size,
                             penalties=(0.0, 5.0) if args.words else (0.0,))
        for row in result["grid"]:
            print(f"  weight {row['weight']:.1f}  bonus {row['length_bonus']:.1f}  "
                  f"penalty {row['unk_penalty']:.0f}  "
                  f"WER {100 * row['wer']:.2f}%  CER {100 * row['cer']:.2f}%")
        best = result["best"]
        lm.fusion = {"weight": best["weight"], "length_bonus": best["length_bonus"],
                     "unk_penalty": best["unk_penalty"], "tuned_on": str(args.tune),
                     "wer": best["wer"], "cer": best["cer"], "beam_size": args.beam_size}
        print(f"best on {args.tune}: weight {best['weight']:g}, length bonus "
              f"{best['length_bonus']:g}, unknown-word penalty {best['unk_penalty']:g} "
              f"(WER {100 * best['wer']:.2f}%), stored in {args.out}")
    lm.save(args.out)
    print(f"wrote {args.out}")


def expand_audio_paths(paths: list[str]) -> list[Path]:
    """Files as given; folders expand (recursively) to their audio files, sorted."""
    from asrkd.data.audio_processing import AUDIO_EXTENSIONS

    expanded: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            expanded.extend(
                sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
            )
        elif path.is_file():
            expanded.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return expanded


def cmd_export(args: argparse.Namespace) -> None:
    from asrkd.export import export_onnx
    from asrkd.models.e2e_asr import load_checkpoint

    description = export_onnx(load_checkpoint(args.ckpt), args.out, int8=args.int8)
    out = Path(args.out)
    for name, file in description["graphs"].items():
        path = out.with_name(file)
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.2f} MB{', int8' if args.int8 else ''})")
    print(f"tokenizer and layout: {out}.json")


def cmd_infer(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from asrkd.data.audio_processing import SAMPLE_RATE, AudioError, load_audio

    torch.set_num_threads(args.threads)
    if args.streaming:
        _check_streaming_arguments(args)
        from asrkd.streaming import StreamingRecognizer, transcribe_stream

        if args.onnx:
            from asrkd.export import OnnxStreamer

            source = OnnxStreamer(args.onnx, threads=args.threads)
        else:
            from asrkd.models.e2e_asr import load_checkpoint

            source = load_checkpoint(args.ckpt)
        recognizer = StreamingRecognizer(source)
        chunk_ms = args.chunk_ms or recognizer.chunk_ms
        piece = max(1, round(SAMPLE_RATE * chunk_ms / 1000))
        method = "ctc_greedy"
        print(f"decoding: {method} (streaming{' ONNX' if args.onnx else ''}: {chunk_ms:g} ms "
              f"pieces of audio, encoder chunks of {recognizer.chunk_ms:g} ms)", file=sys.stderr)

        def transcribe(audio):  # noqa: ANN001, ANN202
            *_, text = transcribe_stream(recognizer, audio, piece)
            return text
    elif args.onnx:
        from asrkd.export import OnnxASR

        if args.lm:
            raise UserError("--lm works with --ckpt models (the ONNX runner decodes greedily)")
        if args.beam_size is not None or args.ctc_weight is not None:
            raise UserError("--beam-size and --ctc-weight work with --ckpt models (the ONNX "
                            "runner decodes greedily)")
        if args.srt:
            raise UserError("--srt works with --ckpt models (word timestamps)")

        onnx_model = OnnxASR(args.onnx, threads=args.threads)
        method = args.method or onnx_model.default_method
        # Exports hold the CTC head and the transducer only (a hybrid CTC/attention model's
        # --ckpt default is CTC greedy too); say which search runs.
        print(f"decoding: {method} (ONNX graphs: {', '.join(onnx_model.sessions)})",
              file=sys.stderr)

        def transcribe(audio):  # noqa: ANN001, ANN202
            return onnx_model.infer(audio[None], np.array([len(audio)]), method=method)[0]
    else:
        from asrkd.longform import LongFormConfig, LongFormTranscriber, to_srt

        model = _load_with_search(args)
        fusion = _fusion(args)
        method = _requested_method(args)
        if fusion is not None:
            fusion.lm.check_tokenizer(model.tokenizer)
            method = method or "ctc_beam"
        method = method or model.default_method()
        print(f"decoding: {method}" + (" + LM" if fusion is not None else ""), file=sys.stderr)
        # Files longer than one segment are cut at the pauses the model hears and decoded
        # piece by piece (asrkd.longform), so memory does not grow with their length.
        longform = LongFormTranscriber(
            model, method, fusion=fusion,
            config=LongFormConfig(max_segment_seconds=args.max_segment_seconds,
                                  merge_seconds=args.merge_seconds),
        )

    files = expand_audio_paths(args.paths)
    if not files:
        raise FileNotFoundError("no audio files found in " + ", ".join(args.paths))
    srt_dir = None
    if args.srt and len(files) > 1:
        srt_dir = Path(args.srt)
        srt_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in files:
        start = time.perf_counter()
        try:
            extra = {}
            if args.onnx or args.streaming:
                audio = load_audio(path)
                result = None
                text = transcribe(audio)
                duration = len(audio) / SAMPLE_RATE
                if args.streaming:
                    chunks = recognizer.chunk_seconds
                    extra = {"chunk_ms": chunk_ms, "encoder_chunks": len(chunks),
                             "chunk_compute_ms": round(1000 * float(np.median(chunks)), 2)
                             if chunks else 0.0}
            else:
                result = longform.transcribe(path)
                text, duration = result.text, result.duration
        except AudioError as error:
            print(f"skipped: {error}", file=sys.stderr)
            continue
        elapsed = time.perf_counter() - start
        print(f"{path}\t{text}")
        row = {"audio_filepath": str(path), "duration": round(duration, 3), "text": text,
               "method": method, "seconds": round(elapsed, 4), **extra}
        if result is not None:
            row["words"] = result.to_dict()["words"]
            row["segments"] = result.to_dict()["segments"]
            if args.srt:
                srt = srt_dir / f"{path.stem}.srt" if srt_dir else Path(args.srt)
                srt.write_text(to_srt(result.words), encoding="utf-8")
        rows.append(row)
    if args.out:
        with Path(args.out).open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


def _check_streaming_arguments(args: argparse.Namespace) -> None:
    clashes = [flag for flag, given in (
        ("--lm", args.lm), ("--srt", args.srt),
        ("--beam-size", args.beam_size is not None), ("--ctc-weight", args.ctc_weight is not None),
    ) if given]
    if args.method not in (None, "ctc_greedy"):
        clashes.append(f"--method {args.method}")
    if clashes:
        raise UserError(f"--streaming decodes with CTC greedy search as the audio arrives; it "
                        f"does not combine with {', '.join(clashes)}")
    if args.chunk_ms is not None and args.chunk_ms <= 0:
        raise UserError(f"--chunk-ms must be positive, got {args.chunk_ms:g}")


def cmd_bench(args: argparse.Namespace) -> None:
    from asrkd.bench import run_bench

    checkpoints = None
    if args.ckpt:
        checkpoints = {}
        for item in args.ckpt:
            name, sep, path = item.partition("=")
            if not sep:
                raise FileNotFoundError(f"--ckpt takes name=path, got {item!r}")
            checkpoints[name] = Path(path)
    out = Path(args.out)
    results_dir = Path(args.results_dir)
    results = run_bench(
        Path(args.exp), Path(args.corpus), out, results_dir / "bench.json",
        results_dir / "bench_rtfx_vs_wer.png", quick=args.quick, threads=args.threads,
        nemo=not args.no_nemo, checkpoints=checkpoints,
    )
    print(f"wrote {out} in {results['seconds']:.0f} s")


def cmd_demo(args: argparse.Namespace) -> None:
    from asrkd.demo import run_demo

    run_demo(
        report_dir=args.out, corpus_dir=args.corpus, exp_dir=args.exp, quick=args.quick
    )


def cmd_recipe(args: argparse.Namespace) -> None:
    from asrkd.recipe import RecipePlan, run_recipe

    given = {
        "teacher_steps": args.teacher_steps, "student_steps": args.student_steps,
        "max_batch_seconds": args.max_batch_seconds, "val_every_steps": args.val_every,
        "warmup_steps": args.warmup_steps, "decoding": args.decoding,
        "lm_order": args.lm_order,
    }
    # Options not given keep RecipePlan's defaults (one place states them).
    plan = RecipePlan(kd_teacher_cache=args.teacher_cache,
                      **{key: value for key, value in given.items() if value is not None})
    configs = {name: path for name, path in (("teacher", args.teacher),
               ("student", args.student), ("student_kd", args.student_kd)) if path}
    run_recipe(args.corpus, args.out, args.exp, plan=plan, overrides=args.set,
               corpus_summary=args.summary or f"manifests in {args.corpus}",
               title=args.title, configs=configs)


def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--beam-size", type=int, default=None,
                        help="beam size of the beam searches (default: the model's)")
    parser.add_argument("--ctc-weight", type=float, default=None,
                        help="weight of the CTC prefix score in attention_beam "
                        "(joint CTC/attention search, which this option selects when "
                        "--method is not given; default: the model's)")


def _add_lm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lm", default=None,
                        help="token n-gram LM from `asrkd lm`, fused into ctc_beam decoding")
    parser.add_argument("--lm-weight", type=float, default=None,
                        help="LM weight (default: the tuned one stored with the LM)")
    parser.add_argument("--length-bonus", type=float, default=None,
                        help="score added per token (default: the tuned one)")
    parser.add_argument("--unk-penalty", type=float, default=None,
                        help="score taken per word outside the LM's training words "
                        "(default: the tuned one)")


def cmd_shard(args: argparse.Namespace) -> None:
    """``asrkd shard``: pack a manifest into tar shards and print the summary as JSON."""
    from asrkd.data.shards import write_shards

    stats = write_shards(args.manifest, args.out, shard_seconds=args.shard_seconds,
                         shuffle=args.shuffle, seed=args.seed,
                         require_text=not args.no_text, strict=not args.skip_bad)
    print(json.dumps(stats, indent=2))


def cmd_cache_teacher(args: argparse.Namespace) -> None:
    """``asrkd cache-teacher``: write the cache and print its stats as JSON."""
    from asrkd.training.teacher_cache import cache_teacher
    from asrkd.training.teacher_shards import cache_teacher_shards
    from asrkd.utils.threads import torch_threads

    if (args.manifest is None) == (args.shards is None):
        raise UserError("give either --manifest (one cache file) or --shards (a sharded cache)")
    with torch_threads(args.threads):
        if args.shards is not None:
            stats = cache_teacher_shards(args.ckpt, args.shards, args.out, top_k=args.top_k,
                                         batch_seconds=args.batch_seconds,
                                         speed_factors=args.speed_factors)
            print(json.dumps(stats, indent=2))
            return
        stats = cache_teacher(
            args.ckpt,
            args.manifest,
            args.out,
            top_k=args.top_k,
            batch_seconds=args.batch_seconds,
            temperature=args.temperature,
            speed_factors=args.speed_factors,
        )
    print(json.dumps(stats, indent=2))


def add_cache_teacher_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``cache-teacher`` subcommand to the ``asrkd`` parser's subparsers."""
    parser = subparsers.add_parser(
        "cache-teacher",
        help="store a teacher's top-k CTC log-probs over a manifest (offline KD)",
        description="Run the teacher once (eval mode, no augmentation) and store its top-k "
        "CTC log-probs per frame, for the audio as is or for each speed-perturbed copy the "
        "training set makes (--speed-factors, the same as data.speed_factors).",
    )
    parser.add_argument("--ckpt", required=True, help="teacher checkpoint")
    parser.add_argument("--manifest", help="JSONL manifest (text optional)")
    parser.add_argument("--shards", help="instead of --manifest: a shard folder (`asrkd "
                        "shard`); writes a compressed cache per shard into --out, which the "
                        "shard loader reads alongside the audio")
    parser.add_argument("--out", required=True, help="cache file (a folder with --shards)")
    parser.add_argument("--top-k", type=int, default=8, help="log-probs kept per frame")
    parser.add_argument("--batch-seconds", type=float, default=120.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--speed-factors", type=float, nargs="+", default=(),
                        metavar="F", help="training with data.speed_factors: cache each of "
                        "these speed copies of every utterance (default: the audio as is)")
    parser.add_argument("--threads", type=int, default=2)
    parser.set_defaults(func=cmd_cache_teacher)
    return parser


def cmd_pseudo_label(args: argparse.Namespace) -> None:
    """``asrkd pseudo-label``: write the kept pseudo-labels and print the report."""
    from asrkd.training.pseudo_labels import format_report, pseudo_label
    from asrkd.transcribers import HF_KINDS, load_transcriber
    from asrkd.utils.threads import torch_threads

    external = args.ckpt.partition(":")[0] in HF_KINDS
    agreement = args.agreement_with
    if agreement is None:  # the default: a second decoding where the teacher has one
        agreement = None if external else "ctc_greedy"
    with torch_threads(args.threads):
        teacher = load_transcriber(args.ckpt, args.method, args.beam_size) if external else \
            args.ckpt
        report = pseudo_label(
            teacher,
            args.manifest,
            args.out,
            method=None if external else args.method,
            beam_size=args.beam_size,
            min_confidence=args.min_confidence,
            agreement_with=agreement,
            min_agreement=args.min_agreement,
            batch_seconds=args.batch_seconds,
        )
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def add_pseudo_label_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``pseudo-label`` subcommand to the ``asrkd`` parser's subparsers."""
    parser = subparsers.add_parser(
        "pseudo-label",
        help="label audio with a teacher's confident transcripts (sequence-level KD)",
        description="Transcribe a manifest (text optional) with the teacher, keep the "
        "transcripts that pass the confidence and agreement filters, write them as a manifest. "
        "Negative thresholds other than plain numbers need '=': --min-confidence=-inf.",
    )
    parser.add_argument("--ckpt", required=True,
                        help="the teacher: an asrkd checkpoint (an imported NeMo model too), or "
                        "hf-ctc:FOLDER / hf-seq2seq:FOLDER (a local Hugging Face CTC model "
                        "folder such as wav2vec2's, or a speech seq2seq one such as "
                        "Whisper's; needs the transformers package)")
    parser.add_argument("--manifest", required=True, help="JSONL manifest (text optional)")
    parser.add_argument("--out", required=True, help="pseudo-labelled JSONL manifest to write")
    parser.add_argument("--method", default=None, help="decoding method (default: model's)")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=-0.5,
        help="minimum average log-prob per token (default -0.5)",
    )
    parser.add_argument(
        "--agreement-with",
        default=None,
        help="second decoding of an asrkd teacher to compare with, or 'none' (default: "
        "ctc_greedy for asrkd teachers, none for Hugging Face ones)",
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=0.8,
        help="minimum 1 - CER between the two decodings (default 0.8)",
    )
    parser.add_argument("--batch-seconds", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the report as JSON")
    parser.set_defaults(func=cmd_pseudo_label)
    return parser


def cmd_import_nemo(args: argparse.Namespace) -> None:
    """``asrkd import-nemo``: convert a NeMo checkpoint into an asrkd checkpoint."""
    from asrkd.models.nemo_import import save_imported

    summary = save_imported(args.nemo, args.out)
    print(f"imported {summary['nemo_class'].rsplit('.', 1)[-1]} (NeMo "
          f"{summary['nemo_version']}): {summary['params'] / 1e6:.2f} M parameters, "
          f"{summary['pieces']} SentencePiece pieces -> {summary['checkpoint']}")


def add_import_nemo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``import-nemo`` subcommand to the ``asrkd`` parser's subparsers."""
    parser = subparsers.add_parser(
        "import-nemo",
        help="turn a NeMo FastConformer CTC checkpoint (.nemo) into an asrkd checkpoint",
        description="Read a .nemo file (NeMo itself is not needed) and write an asrkd "
        "checkpoint with the same features, tokenizer and weights, which evaluate, infer, "
        "export, KD (training.teacher_checkpoint), cache-teacher and pseudo-label take like "
        "any other. Supported: EncDecCTCModelBPE with a FastConformer encoder; anything else is "
        "refused with the config key that makes it unsupported.",
    )
    parser.add_argument("nemo", help="the .nemo file")
    parser.add_argument("--out", required=True, help="asrkd checkpoint to write")
    parser.set_defaults(func=cmd_import_nemo)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asrkd", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    corpus = sub.add_parser("corpus", help="build the embedded default speech corpus")
    corpus.add_argument("--out", default="data/default")
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--train", type=int, default=3000)
    corpus.add_argument("--val", type=int, default=300)
    corpus.add_argument("--test", type=int, default=300)
    corpus.add_argument("--workers", type=int, default=2)
    corpus.add_argument("--force", action="store_true", help="rebuild even if present")
    corpus.set_defaults(func=cmd_corpus)

    presets = sub.add_parser("presets", help="print each model preset's parameter count")
    presets.set_defaults(func=cmd_presets)

    train = sub.add_parser(
        "train",
        help="train a model (teacher, student, or KD student)",
        description="Config files merge over configs/*.yaml in order; then dotted overrides, "
        "e.g. --trainer.max_epochs 5 --model.encoder.d_model 144 training.kd.alpha=0.7",
    )
    train.add_argument("--config", action="append", default=[], help="YAML file (repeatable)")
    train.add_argument(
        "--resume", action="store_true",
        help="continue from <output_dir>/checkpoints/last.ckpt if present (weights, optimizer, "
        "scheduler, data position, RNG); otherwise start afresh",
    )
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="WER/CER/RTFx of a checkpoint on a manifest")
    evaluate.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"default: {DEFAULT_CKPT}")
    evaluate.add_argument("--manifest", default="data/default/test.jsonl")
    evaluate.add_argument("--method", default=None, help="decoding method (default: model's)")
    evaluate.add_argument("--out", default=None, help="per-utterance results (JSONL)")
    evaluate.add_argument("--json", default=None, help="write the metrics as JSON")
    evaluate.add_argument("--threads", type=int, default=2)
    evaluate.add_argument("--rtfx", action="store_true",
                          help="time each batch 3 more times and report the fastest (RTFx as in "
                               "the reports); without it RTFx is that of the one decoding pass")
    _add_search_arguments(evaluate)
    _add_lm_arguments(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    lm = sub.add_parser(
        "lm", help="train a token n-gram LM for CTC beam search (and tune its weight)",
        description="Kneser-Ney n-gram over the model's own tokens, trained on transcripts; "
        "with --tune, the LM weight and length bonus are grid-searched on a validation "
        "manifest and stored with the LM (evaluate/infer --lm then use them).",
    )
    lm.add_argument("--ckpt", default=DEFAULT_CKPT, help="the model whose tokenizer the LM uses")
    lm.add_argument("--manifest", action="append", default=[],
                    help="training text from a manifest's transcripts (repeatable)")
    lm.add_argument("--text", action="append", default=[],
                    help="training text, one sentence per line (repeatable)")
    lm.add_argument("--order", type=int, default=6, help="n-gram order (default: %(default)s)")
    lm.add_argument("--tune", default=None, help="validation manifest for the weight search")
    lm.add_argument("--beam-size", type=int, default=8)
    lm.add_argument("--words", action="store_true",
                    help="also tune a penalty for words outside the training text's words")
    lm.add_argument("--out", required=True, help="LM file (JSON)")
    lm.set_defaults(func=cmd_lm)

    infer = sub.add_parser("infer", help="transcribe audio files or folders")
    infer.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"default: {DEFAULT_CKPT}")
    infer.add_argument(
        "paths", nargs="*", default=["data/default/wav/test"],
        help="audio files or folders (default: the default corpus's test audio)",
    )
    infer.add_argument("--method", default=None)
    infer.add_argument("--onnx", default=None,
                       help="run an `asrkd export` ONNX file with onnxruntime instead of --ckpt")
    infer.add_argument("--out", default=None,
                       help="write JSONL: text, method, timing, word timestamps, segments")
    infer.add_argument("--srt", default=None,
                       help="write subtitles: this .srt file (one input file) or a folder of "
                       "<name>.srt (several; --ckpt models)")
    infer.add_argument("--max-segment-seconds", type=float, default=15.0,
                       help="files longer than this are cut at pauses into pieces at most "
                       "this long (default: %(default)s)")
    infer.add_argument("--merge-seconds", type=float, default=0.0,
                       help="join neighbouring pieces again while at most this long, for models "
                       "trained with data.concat_prob (default: %(default)s)")
    infer.add_argument("--streaming", action="store_true",
                       help="feed each file in pieces of --chunk-ms as a live stream and decode "
                       "chunk by chunk with caches (a model trained for streaming, such as "
                       "preset student_cpu_streaming, as --ckpt or its --onnx export; CTC "
                       "greedy)")
    infer.add_argument("--chunk-ms", type=float, default=None,
                       help="--streaming: audio per piece fed (default: the model's encoder "
                       "chunk, 320 ms for student_cpu_streaming)")
    infer.add_argument("--threads", type=int, default=2)
    _add_search_arguments(infer)
    _add_lm_arguments(infer)
    infer.set_defaults(func=cmd_infer)

    export = sub.add_parser(
        "export", help="export to ONNX (waveform -> CTC log-probs; RNN-T graphs too)"
    )
    export.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"default: {DEFAULT_CKPT}")
    export.add_argument("--out", default="exp/demo/student_kd.onnx")
    export.add_argument("--int8", action="store_true", help="int8 dynamic quantization")
    export.set_defaults(func=cmd_export)

    bench = sub.add_parser("bench", help="teacher/student/KD student speed, size, ONNX, NeMo")
    bench.add_argument("--exp", default="exp/demo", help="folder with <name>/model.ckpt")
    bench.add_argument("--ckpt", action="append", default=[],
                       help="name=path instead of the demo's three (repeatable)")
    bench.add_argument("--corpus", default="data/default", help="clips from its test split")
    bench.add_argument("--out", default="BENCHMARKS.md")
    bench.add_argument("--results-dir", default="benchmarks/results",
                       help="where the JSON and the plot go")
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--quick", action="store_true", help="tiny shapes: checks the pipeline")
    bench.add_argument("--no-nemo", action="store_true", help="skip the NeMo comparison")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="corpus -> teacher -> student -> KD student -> report")
    demo.add_argument("--out", default="reports/demo")
    demo.add_argument("--corpus", default="data/default")
    demo.add_argument("--exp", default="exp/demo")
    demo.add_argument("--quick", action="store_true", help="tiny run to check the pipeline")
    demo.set_defaults(func=cmd_demo)

    recipe = sub.add_parser(
        "recipe", help="teacher -> student -> KD student -> report on your own manifests",
        description="Train teacher, student and KD student on CORPUS/{train,val,test}.jsonl "
        "(NeMo manifests), score the test split once, write report.md and metrics.json. "
        "Finished stages are reused, so a rerun resumes.")
    recipe.add_argument("--corpus", required=True, help="folder with train/val/test.jsonl")
    recipe.add_argument("--out", default="reports/recipe", help="report folder")
    recipe.add_argument("--exp", default="exp/recipe", help="checkpoints, one folder per model")
    # None: asrkd.recipe.RecipePlan's default (stated there only).
    recipe.add_argument("--teacher-steps", type=int, default=None)
    recipe.add_argument("--student-steps", type=int, default=None,
                        help="for the student and the KD student alike")
    recipe.add_argument("--max-batch-seconds", type=float, default=None)
    recipe.add_argument("--val-every", type=int, default=None,
                        help="validation interval in steps")
    recipe.add_argument("--warmup-steps", type=int, default=None)
    recipe.add_argument("--decoding", default=None, help="test decoding method")
    recipe.add_argument("--teacher-cache", action="store_true",
                        help="distil from stored teacher CTC posteriors (frame-level CTC KD)")
    recipe.add_argument("--lm-order", type=int, default=None,
                        help="also score with a tuned token n-gram LM of this order")
    for name in ("teacher", "student", "student-kd"):
        recipe.add_argument(f"--{name}", default=None, metavar="CONFIG",
                            help=f"run config of the {name} (default: the shipped preset)")
    recipe.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override for every stage (repeatable)")
    recipe.add_argument("--summary", default="", help="one line saying what the corpus is")
    recipe.add_argument("--title", default="asrkd report")
    recipe.set_defaults(func=cmd_recipe)

    shard = sub.add_parser(
        "shard", help="pack a manifest's audio and text into tar shards (streamed training)",
        description="Write tar shards of about --shard-seconds of audio each (WebDataset "
        "layout: <n>.flac + <n>.json per utterance) and index.json; train from them with "
        "data.train_shards=OUT. The manifest may be NeMo JSONL or a Lhotse CutSet "
        "(cuts.jsonl[.gz]).")
    shard.add_argument("--manifest", required=True, help="NeMo JSONL manifest or Lhotse cuts")
    shard.add_argument("--out", required=True, help="shard folder to write")
    shard.add_argument("--shard-seconds", type=float, default=3600.0,
                       help="audio per shard (default: %(default)s); at least ranks x loader "
                       "workers shards are needed")
    shard.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                       help="mix utterances across shards before packing (default: on)")
    shard.add_argument("--seed", type=int, default=0)
    shard.add_argument("--no-text", action="store_true", help="unlabelled audio")
    shard.add_argument("--skip-bad", action="store_true",
                       help="skip bad manifest lines (counted) instead of stopping")
    shard.set_defaults(func=cmd_shard)

    add_cache_teacher_parser(sub)
    add_pseudo_label_parser(sub)
    add_import_nemo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "train":
        args.overrides = unknown
    elif unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    try:
        args.func(args)
    except (UserError, FileNotFoundError) as error:
        # Problems the user can fix (asrkd.errors); anything else is a bug and keeps its traceback.
        print(f"asrkd {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
