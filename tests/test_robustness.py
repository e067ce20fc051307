"""The bad-input table of docs/robustness.md, one parametrised case per row.

Every case asserts what the user sees: the message (naming the item and what to do) when
``strict``, or the count in the report when bad items are skipped (``strict: false``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asrkd.cli import main
from asrkd.data.audio_processing import AudioError, load_audio
from asrkd.data.datamodule import DurationBatchSampler
from asrkd.data.dataset import ManifestDataset, ManifestError, collate_batch, read_manifest
from asrkd.data.tokenizer import CharTokenizer
from asrkd.models.e2e_asr import CheckpointError, build_model, load_checkpoint, save_checkpoint
from test_e2e import tiny_config

SR = 16_000


def _tone(seconds: float, rate: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Five good utterances (wav/utt{i}.wav, 0.5-1.5 s) and their manifest lines."""
    (tmp_path / "wav").mkdir()
    lines = []
    for i in range(5):
        seconds = 0.5 * (1 + i % 3)
        sf.write(tmp_path / "wav" / f"utt{i}.wav", _tone(seconds), SR)
        lines.append({"audio_filepath": f"wav/utt{i}.wav", "duration": seconds,
                      "text": f"utterance {i}"})
    (tmp_path / "lines.json").write_text(json.dumps(lines))
    return tmp_path


def _write_manifest(folder: Path, bad_line: bytes) -> Path:
    """The good lines with ``bad_line`` as line 3."""
    lines = [json.dumps(x).encode() for x in json.loads((folder / "lines.json").read_text())]
    lines.insert(2, bad_line)
    path = folder / "m.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _line(**fields: object) -> bytes:
    record = {"audio_filepath": "wav/bad.wav", "duration": 1.0, "text": "bad one"}
    record.update(fields)
    return json.dumps({k: v for k, v in record.items() if v is not _DROP}).encode()


_DROP = object()


def _prepare_bad_audio(folder: Path, kind: str) -> None:
    path = folder / "wav" / "bad.wav"
    if kind == "good":
        sf.write(path, _tone(1.0), SR)
    elif kind == "corrupt":
        path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio at all")
    elif kind == "empty":
        sf.write(path, np.zeros(0, dtype=np.float32), SR)


# (case id, bad manifest line, audio file to create, message (strict), skip reason (not strict))
MANIFEST_CASES = [
    ("broken-json", b'{"audio_filepath": "wav/bad.wav", "duration": 1.0', "good",
     "broken JSON", "broken JSON"),
    ("not-an-object", b'["wav/bad.wav", 1.0, "bad one"]', "good",
     "expected a JSON object", "not an object"),
    ("missing-audio-key", _line(audio_filepath=_DROP), "good",
     "missing key.s. audio_filepath", "missing key"),
    ("missing-duration", _line(duration=_DROP), "good",
     "missing key.s. duration", "missing key"),
    ("missing-text", _line(text=_DROP), "good", "missing key.s. text", "missing key"),
    ("duration-not-a-number", _line(duration="1.0s"), "good",
     "duration must be a number", "wrong type"),
    ("duration-negative", _line(duration=-1.0), "good",
     "duration must be positive", "bad duration"),
    ("path-not-a-string", _line(audio_filepath=7), "good",
     "audio_filepath must be a non-empty string", "wrong type"),
    ("text-not-a-string", _line(text=["bad", "one"]), "good",
     "text must be a string", "wrong type"),
    ("empty-text", _line(text="  "), "good", "text is empty", "empty text"),
    ("non-utf8-text", b'{"audio_filepath": "wav/bad.wav", "duration": 1.0, "text": "caf\xe9"}',
     "good", "not valid UTF-8", "not UTF-8"),
    ("missing-file", _line(audio_filepath="wav/nowhere.wav"), "good",
     "nowhere.wav not found", "missing file"),
    ("path-outside-folder", _line(audio_filepath="../elsewhere.wav"), "good",
     "points outside the manifest's folder; use an absolute path",
     "path outside manifest folder"),
    ("corrupt-audio", _line(), "corrupt", "cannot read", "unreadable audio"),
    ("zero-length-audio", _line(), "empty", "holds no samples", "empty audio"),
    ("duration-disagrees", _line(duration=3.0), "good",
     "duration 3.0 s disagrees with the file .1.000 s", "duration mismatch"),
    ("offset-past-end", _line(duration=0.5, offset=0.8), "good",
     "disagrees with the file", "duration mismatch"),
]


@pytest.mark.parametrize(
    "bad_line, audio, message, reason",
    [case[1:] for case in MANIFEST_CASES],
    ids=[case[0] for case in MANIFEST_CASES],
)
def test_bad_manifest_line(folder, bad_line, audio, message, reason, caplog):
    _prepare_bad_audio(folder, audio)
    manifest = _write_manifest(folder, bad_line)
    with pytest.raises(ManifestError, match=rf"m\.jsonl, line 3: .*{message}.*strict: false"):
        read_manifest(manifest)
    entries, report = read_manifest(manifest, strict=False)
    assert len(entries) == 5 and report.skipped == {reason: 1}
    # One summary warning for the whole manifest, naming the first problem's line.
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipped 1 bad lines" in warnings[0].message
    assert "line 3" in warnings[0].message


def test_text_outside_the_tokenizer(folder):
    manifest = _write_manifest(folder, _line(audio_filepath="wav/utt0.wav", duration=0.5,
                                             text="naïve café"))
    with pytest.raises(ManifestError, match="line 3: text has symbols the tokenizer lacks: 'é"):
        ManifestDataset(manifest, tokenizer=CharTokenizer.english())
    dataset = ManifestDataset(manifest, tokenizer=CharTokenizer.english(), strict=False)
    assert len(dataset) == 5 and dataset.report.skipped["unknown symbols"] == 1


def test_audio_that_vanishes_during_training(folder):
    """A file that passed the manifest check but cannot be read when its batch comes."""
    manifest = _write_manifest(folder, _line(audio_filepath="wav/utt0.wav", duration=0.5))
    dataset = ManifestDataset(manifest)
    (folder / "wav" / "utt1.wav").unlink()
    index = next(i for i, e in enumerate(dataset.entries) if e.audio_filepath.name == "utt1.wav")
    with pytest.raises(AudioError, match=r"m\.jsonl, line 2: .*utt1\.wav: audio file not found"):
        dataset[index]
    lenient = ManifestDataset(manifest, strict=False)
    index = next(i for i, e in enumerate(lenient.entries) if e.audio_filepath.name == "utt2.wav")
    (folder / "wav" / "utt2.wav").unlink()
    assert lenient[index] is None and lenient.failed_loads == 1
    batch = collate_batch([lenient[0], lenient[index]])
    assert len(batch["texts"]) == 1  # the bad item is dropped, the batch goes on
    assert collate_batch([None, None]) is None  # the training step skips an empty batch


# --- audio formats that must load correctly (not errors) ---------------------------------

@pytest.mark.parametrize(
    "rate, channels, subtype",
    [(SR, 2, "PCM_16"), (8000, 1, "PCM_16"), (48000, 1, "PCM_16"), (SR, 1, "PCM_24"),
     (SR, 1, "FLOAT"), (44100, 2, "PCM_24")],
    ids=["stereo", "8kHz", "48kHz", "24-bit", "float", "44.1kHz-stereo-24-bit"],
)
def test_audio_formats_load_as_16k_mono(tmp_path, rate, channels, subtype):
    tone = _tone(1.0, rate)
    samples = np.stack([tone, 0.5 * tone], axis=1) if channels == 2 else tone
    sf.write(tmp_path / "a.wav", samples, rate, subtype=subtype)
    audio = load_audio(tmp_path / "a.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - SR) <= 2
    expected_peak = 0.3 * (0.75 if channels == 2 else 1.0)  # stereo is averaged
    assert abs(np.abs(audio).max() - expected_peak) < 0.01


def test_audio_too_short_for_the_subsampling(folder):
    """20 ms gives fewer frames than 8x subsampling needs: filtered in training (counted);
    inference returns an empty transcript instead of crashing."""
    sf.write(folder / "wav" / "bad.wav", _tone(0.02), SR)
    manifest = _write_manifest(folder, _line(duration=0.02))
    entries, report = read_manifest(manifest, min_duration=0.1)
    assert len(entries) == 5 and report.filtered_short == 1
    model = build_model(tiny_config(), CharTokenizer.english()).eval()
    for samples in (0, 1, 320):
        audio = torch.from_numpy(_tone(1.0)[: max(samples, 1)])[None]
        for method in ("ctc_greedy", "attention_beam"):
            hypothesis = model.infer(audio, torch.tensor([samples]), method=method)[0]
            assert isinstance(hypothesis.text, str)


def test_audio_over_the_duration_and_batch_budget(folder, caplog):
    sf.write(folder / "wav" / "bad.wav", _tone(30.0), SR)
    manifest = _write_manifest(folder, _line(duration=30.0))
    entries, report = read_manifest(manifest, max_duration=20.0)
    assert len(entries) == 5 and report.filtered_long == 1
    # Without a max_duration the batch budget still holds: the utterance is left out.
    sampler = DurationBatchSampler([1.0, 2.0, 30.0, 1.5], max_batch_seconds=20.0)
    assert sampler.too_long == 1
    assert sorted(i for batch in sampler for i in batch) == [0, 1, 3]
    assert "left out 1 utterances longer than the batch budget" in caplog.text


# --- model, checkpoint and config errors: one line from the CLI, exit 2 -------------------

def _cli_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.fixture
def teacher_ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(build_model(tiny_config(), CharTokenizer.english()),
                           tmp_path / "teacher.ckpt")


def _kd_args(tmp_path: Path, teacher: Path) -> list[str]:
    return ["train", "training.use_kd=true", f"training.teacher_checkpoint={teacher}",
            f"output_dir={tmp_path / 'kd'}", "model_preset=student_cpu"]


def test_teacher_checkpoint_missing(tmp_path, capsys):
    err = _cli_error(capsys, *_kd_args(tmp_path, tmp_path / "no_teacher.ckpt"))
    assert "no_teacher.ckpt not found" in err


def test_teacher_student_frame_rate_mismatch(tmp_path, capsys, teacher_ckpt):
    err = _cli_error(capsys, *_kd_args(tmp_path, teacher_ckpt),
                     "model.frontend.strides=[2,1]")
    assert "frame rate 8 (teacher) vs 2 (student)" in err


def test_teacher_student_vocabulary_mismatch(tmp_path, capsys, teacher_ckpt):
    other = save_checkpoint(build_model(tiny_config(), CharTokenizer(list("abc "))),
                            tmp_path / "other.ckpt")
    err = _cli_error(capsys, *_kd_args(tmp_path, teacher_ckpt),
                     f"training.tokenizer_from={other}")
    assert "teacher and student tokenizers differ" in err and "vocabulary 33 vs 9" in err


def test_checkpoint_from_a_different_config(tmp_path, capsys, teacher_ckpt):
    payload = torch.load(teacher_ckpt, weights_only=True)
    payload["model_config"]["encoder"]["d_model"] = 32
    torch.save(payload, tmp_path / "mixed.ckpt")
    with pytest.raises(CheckpointError, match="weights do not fit the config stored with them"):
        load_checkpoint(tmp_path / "mixed.ckpt")
    err = _cli_error(capsys, "evaluate", "--ckpt", str(tmp_path / "mixed.ckpt"))
    assert "mixed.ckpt: weights do not fit" in err


def test_malicious_checkpoint_is_refused(tmp_path, capsys, teacher_ckpt):
    class Payload:
        def __reduce__(self):
            return (print, ("arbitrary code ran",))

    torch.save({"format": 1, "state_dict": Payload()}, tmp_path / "evil.ckpt")
    err = _cli_error(capsys, "evaluate", "--ckpt", str(tmp_path / "evil.ckpt"))
    assert "refused to load" in err and "not trusted" in err
    assert "arbitrary code ran" not in capsys.readouterr().out
    assert load_checkpoint(teacher_ckpt).vocab_size == 33  # a normal one loads


@pytest.mark.parametrize(
    "argv, message",
    [(["train", "--model.encoder.d_modle", "3"],
      "unknown config key 'model.encoder.d_modle' (did you mean 'd_model'"),
     (["train", "training.kd.losses=[ctc_kll]"], "unknown KD loss 'ctc_kll'"),
     (["train", "--config", "/nowhere/run.yaml"], "config file /nowhere/run.yaml not found")],
    ids=["config-key-typo", "unknown-kd-loss", "missing-config-file"],
)
def test_config_errors(capsys, argv, message):
    assert message in _cli_error(capsys, *argv)


def test_infer_on_a_folder_with_non_audio_files(tmp_path, capsys, teacher_ckpt):
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "a.wav", _tone(1.0), SR)
    (audio / "notes.txt").write_text("not audio")
    (audio / "fake.wav").write_text("not audio either")
    assert main(["infer", "--ckpt", str(teacher_ckpt), str(audio)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and "a.wav" in captured.out
    assert "skipped: " in captured.err and "fake.wav: cannot read audio" in captured.err
    assert "notes.txt" not in captured.err + captured.out
