"""The command line and the main job, end to end on tiny data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from asrkd.cli import expand_audio_paths, main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asrkd.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_user_errors_are_one_line_and_nonzero(tmp_path):
    process = run_cli("train", "--model.encoder.d_modle", "3")
    assert process.returncode == 2
    assert process.stderr.strip().count("\n") == 0
    assert "unknown config key 'model.encoder.d_modle'" in process.stderr
    process = run_cli("evaluate", "--ckpt", str(tmp_path / "none.ckpt"))
    assert process.returncode == 2 and "not found" in process.stderr
    assert "Traceback" not in process.stderr


def test_config_value_errors_are_user_errors_but_bugs_keep_their_traceback(monkeypatch, capsys):
    import asrkd.cli as cli
    from asrkd.errors import ConfigError, UserError
    from asrkd.models.encoder import FastConformerConfig

    with pytest.raises(ConfigError, match="conv_kernel"):
        FastConformerConfig(conv_kernel=4)
    assert issubclass(ConfigError, UserError) and issubclass(UserError, ValueError)

    def user_problem(args):
        raise UserError("the manifest is empty")

    def bug(args):
        raise ValueError("shape mismatch (B, T) vs (B, U)")

    monkeypatch.setattr(cli, "cmd_presets", user_problem)
    assert cli.main(["presets"]) == 2
    assert "asrkd presets: error: the manifest is empty" in capsys.readouterr().err
    monkeypatch.setattr(cli, "cmd_presets", bug)
    with pytest.raises(ValueError, match="shape mismatch"):
        cli.main(["presets"])


def test_infer_folder_expands_to_audio_only(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not audio")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.flac").write_bytes(b"")
    assert [p.name for p in expand_audio_paths([str(tmp_path)])] == ["a.wav", "b.flac"]
    with pytest.raises(FileNotFoundError):
        expand_audio_paths([str(tmp_path / "missing")])


def test_presets_command_prints_parameter_counts(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "teacher_cpu" in out and "student_cpu" in out and "fastconformer_large" in out


@pytest.mark.slow
def test_quick_demo_writes_report_and_metrics(tmp_path):
    process = run_cli("demo", "--quick", "--out", str(tmp_path / "report"), "--corpus",
                      str(tmp_path / "corpus"), "--exp", str(tmp_path / "exp"))
    assert process.returncode == 0, process.stderr[-3000:]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    for name in ("teacher", "student", "student_kd"):
        for key in ("params", "checkpoint_mb", "wer", "cer", "rtfx", "train_seconds",
                    "checkpoint"):
            assert key in metrics[name], (name, key)
        assert Path(metrics[name]["checkpoint"]).is_file()
    assert metrics["student"]["params"] <= 0.25 * metrics["teacher"]["params"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| student_kd |" in report
    assert (tmp_path / "report" / "wer_vs_params.png").stat().st_size > 1000
    # evaluate and infer work on what the demo produced
    checkpoint = metrics["student_kd"]["checkpoint"]
    process = run_cli("evaluate", "--ckpt", checkpoint, "--manifest",
                      str(tmp_path / "corpus" / "test.jsonl"), "--out", str(tmp_path / "u.jsonl"))
    assert process.returncode == 0 and "WER" in process.stdout, process.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "u.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"reference", "hypothesis", "wer"} <= set(rows[0])
    process = run_cli("infer", "--ckpt", checkpoint, str(tmp_path / "corpus" / "wav" / "test"),
                      "--out", str(tmp_path / "i.jsonl"))
    assert process.returncode == 0, process.stderr[-2000:]
    assert len((tmp_path / "i.jsonl").read_text().splitlines()) == 6
    # re-running reuses every finished stage
    process = run_cli("demo", "--quick", "--out", str(tmp_path / "report"), "--corpus",
                      str(tmp_path / "corpus"), "--exp", str(tmp_path / "exp"))
    assert process.returncode == 0 and process.stdout.count("reusing") == 3
    # `asrkd recipe` is the same orchestration on manifests a user prepared: given the demo's
    # corpus and checkpoints it reuses the three stages and writes its own report
    process = run_cli("recipe", "--corpus", str(tmp_path / "corpus"), "--exp",
                      str(tmp_path / "exp"), "--out", str(tmp_path / "recipe"), "--teacher-steps",
                      "6", "--student-steps", "4", "--teacher-cache", "--title", "my corpus",
                      "--summary", "the quick demo's corpus")
    assert process.returncode == 0 and process.stdout.count("reusing") == 3, process.stderr[-2000:]
    report = (tmp_path / "recipe" / "report.md").read_text()
    assert report.startswith("# my corpus") and "the quick demo's corpus" in report
    recipe_metrics = json.loads((tmp_path / "recipe" / "metrics.json").read_text())
    assert recipe_metrics["teacher"]["checkpoint"] == metrics["teacher"]["checkpoint"]
    process = run_cli("recipe", "--corpus", str(tmp_path / "corpus"), "--student", "nowhere.yaml",
                      "--exp", str(tmp_path / "exp"), "--out", str(tmp_path / "recipe"))
    assert process.returncode == 2 and "nowhere.yaml not found" in process.stderr


@pytest.mark.slow
def test_fsdd_recipe_quick(tmp_path, fsdd_dir, an4_dir):
    # Two of the five leave-one-speaker-out folds: enough to check the per-fold splits and
    # the aggregation over folds.
    process = subprocess.run(
        [sys.executable, "recipes/fsdd/run.py", "--quick", "--shared", str(fsdd_dir),
         "--an4-dir", str(an4_dir), "--folds", "george,lucas",
         "--out", str(tmp_path / "report"), "--exp", str(tmp_path / "exp")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert {"teacher", "student", "student_kd", "folds"} <= set(metrics)
    assert set(metrics["folds"]) == {"george", "lucas"}
    for name in ("teacher", "student", "student_kd"):
        folds = [metrics["folds"][f][name]["wer"] for f in ("george", "lucas")]
        assert metrics[name]["wer"] == pytest.approx(sum(folds) / 2, abs=1e-4)
        assert metrics[name]["wer_min"] <= metrics[name]["wer"] <= metrics[name]["wer_max"]
    assert "leave-one-speaker-out" in (tmp_path / "report" / "report.md").read_text()
    for test_speaker in ("george", "lucas"):
        manifests = tmp_path / "exp" / f"fold_{test_speaker}" / "manifests"
        rows = {s: [json.loads(x) for x in (manifests / f"{s}.jsonl").read_text().splitlines()]
                for s in ("train", "val", "test")}
        speakers = {s: {r["speaker"] for r in rows[s]} for s in rows}
        files = {s: {r["audio_filepath"] for r in rows[s]} for s in rows}
        assert speakers["test"] == {test_speaker}
        assert test_speaker not in speakers["train"] | speakers["val"]
        assert not files["train"] & files["val"]  # validation recordings are held out
        assert (tmp_path / "report" / f"fold_{test_speaker}" / "report.md").is_file()


def test_fsdd_prepare_adds_narrowband_an4_to_training_only(tmp_path, fsdd_dir, an4_dir):
    import importlib.util

    import soundfile as sf

    spec = importlib.util.spec_from_file_location("fsdd_recipe", ROOT / "recipes/fsdd/run.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    prepare = recipe.prepare
    corpus = tmp_path / "fold" / "manifests"
    stats = prepare(fsdd_dir, corpus, limit=6, test_speaker="george", an4=an4_dir)
    rows = {s: [json.loads(x) for x in (corpus / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "val", "test")}
    an4_speakers = _speakers(an4_dir / "manifest_train.jsonl")
    added = [r for r in rows["train"] if r["speaker"] in an4_speakers]
    assert len(added) == 6 and stats["real_train_utterances"] == len(rows["train"]) - 6
    assert not ({r["speaker"] for r in rows["val"] + rows["test"]} & an4_speakers)
    for row in added:  # a derived 8 kHz copy under the experiment folder, same text
        assert Path(row["audio_filepath"]).is_relative_to(tmp_path)
        info = sf.info(row["audio_filepath"])
        assert info.samplerate == 8000
        assert abs(info.duration - row["duration"]) < 0.05
    assert "AN4" in stats["summary"]


def _quick_recipe(tmp_path: Path, script: str, shared: Path, *extra: str) -> dict:
    process = subprocess.run(
        [sys.executable, script, "--quick", "--shared", str(shared), *extra,
         "--out", str(tmp_path / "report"), "--exp", str(tmp_path / "exp")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    for name in ("teacher", "student", "student_kd"):
        assert {"params", "wer", "cer", "rtfx", "train_seconds", "checkpoint"} <= set(
            metrics[name])
    return metrics


def _speakers(path: Path) -> set[str]:
    return {json.loads(x)["speaker"] for x in path.read_text().splitlines()}


@pytest.mark.slow
def test_an4_recipe_quick(tmp_path, an4_dir):
    _quick_recipe(tmp_path, "recipes/an4/run.py", an4_dir)
    manifests = tmp_path / "exp" / "manifests"
    train, val = _speakers(manifests / "train.jsonl"), _speakers(manifests / "val.jsonl")
    assert not train & val
    # The official test set is the scored split, untouched by the quick subsetting's choices.
    assert _speakers(manifests / "test.jsonl") <= _speakers(an4_dir / "manifest_test.jsonl")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "ESPnet2 Transformer" in report and "Text normalisation" in report
    # The LM stage: trained, tuned on validation, stored with its weights, scored on test.
    assert "With a token 3-gram LM" in report
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    for name in ("teacher", "student", "student_kd"):
        lm = metrics[name]["lm"]
        assert lm["order"] == 3 and lm["weight"] in (0.0, 0.5) and 0.0 <= lm["wer"]
        assert (tmp_path / "exp" / name / "lm3.json").is_file()


@pytest.mark.slow
def test_an4_recipe_quick_with_transducers(tmp_path, an4_dir):
    # The shipped RNN-T presets, distilled with rnnt_kl + ctc_kl, scored by RNN-T greedy search.
    metrics = _quick_recipe(tmp_path, "recipes/an4/run.py", an4_dir, "--decoder", "rnnt")
    for name in ("teacher", "student", "student_kd"):
        assert metrics[name]["decoding"] == "rnnt_greedy"
        assert set(metrics[name]["decodings"]) == {"rnnt_beam", "ctc_greedy"}
    run = json.loads((tmp_path / "exp" / "student_kd" / "run_config.json").read_text())
    assert run["training"]["kd"]["losses"] == ["rnnt_kl", "ctc_kl"]
    assert run["model_preset"] == "student_cpu_rnnt"
    report = (tmp_path / "report" / "report.md").read_text()
    assert "transducers" in report and "| student_kd | rnnt_beam |" in report


@pytest.mark.slow
def test_speechocean762_recipe_quick(tmp_path, speechocean_dir):
    _quick_recipe(tmp_path, "recipes/speechocean762/run.py", speechocean_dir)
    manifests = tmp_path / "exp" / "manifests"
    splits = {s: _speakers(manifests / f"{s}.jsonl") for s in ("train", "val", "test")}
    assert not splits["train"] & splits["test"] and not splits["train"] & splits["val"]
    assert not splits["val"] & splits["test"]


def test_beam_size_and_ctc_weight_set_the_search(tmp_path, tiny_corpus, monkeypatch):
    import torch

    import asrkd.models.e2e_asr
    from asrkd.data.tokenizer import CharTokenizer
    from asrkd.errors import ConfigError
    from asrkd.models.e2e_asr import build_model, save_checkpoint
    from test_e2e import tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config("transformer"), CharTokenizer.english())
    default = model.config.decoding
    model.set_decoding(beam_size=7, ctc_weight=None)
    assert (model.config.decoding.beam_size, model.config.decoding.ctc_weight) == (
        7, default.ctc_weight)
    with pytest.raises(ConfigError, match="ctc_weight must be within"):
        model.set_decoding(ctc_weight=1.5)
    with pytest.raises(ConfigError, match="beam_size must be >= 1"):
        model.set_decoding(beam_size=0)
    checkpoint = save_checkpoint(model, tmp_path / "m.ckpt")
    searches = []
    real_strategy = asrkd.models.e2e_asr.strategy

    def spy(method, beam_size, length_penalty, ctc_weight, fusion):  # noqa: ANN001, ANN202
        searches.append((method, beam_size, ctc_weight))
        return real_strategy(method, beam_size, length_penalty, ctc_weight, fusion)

    monkeypatch.setattr(asrkd.models.e2e_asr, "strategy", spy)
    main(["evaluate", "--ckpt", str(checkpoint), "--manifest", str(tiny_corpus / "test.jsonl"),
          "--method", "attention_beam", "--beam-size", "3", "--ctc-weight", "0.5"])
    assert searches and set(searches) == {("attention_beam", 3, 0.5)}
    searches.clear()
    main(["evaluate", "--ckpt", str(checkpoint), "--manifest", str(tiny_corpus / "test.jsonl"),
          "--method", "attention_beam"])  # the checkpoint's own settings
    assert set(searches) == {("attention_beam", 7, default.ctc_weight)}
    searches.clear()
    main(["evaluate", "--ckpt", str(checkpoint), "--manifest", str(tiny_corpus / "test.jsonl"),
          "--ctc-weight", "0.4"])  # a CTC weight alone asks for the joint search
    assert set(searches) == {("attention_beam", 7, 0.4)}
    process = run_cli("infer", "--onnx", str(tmp_path / "m.onnx"), "--beam-size", "2",
                      str(tiny_corpus / "wav" / "test"))
    assert process.returncode == 2 and "--beam-size and --ctc-weight" in process.stderr
