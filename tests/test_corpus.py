"""Tests for the synthetic default corpus and the espeak-ng wrapper (tiny builds, a few seconds)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asrkd.data.corpus import (
    build_corpus,
    generate_digits,
    generate_sentences,
    normalize_text,
)
from asrkd.data.tts import EspeakSynthesizer, VoiceNotFoundError

SIZES = {"n_train": 12, "n_val": 4, "n_test": 4}
SPLITS = ("train", "val", "test")
ALLOWED = re.compile(r"^[a-z']+( [a-z']+)*$")


def _manifest(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corpus")
    stats = build_corpus(root, seed=3, workers=2, progress=False, **SIZES)
    return root, stats


def test_manifests_load_and_match_durations(corpus: tuple[Path, dict]) -> None:
    root, stats = corpus
    for split in SPLITS:
        rows = _manifest(root, split)
        assert len(rows) == SIZES[f"n_{split}"] == stats["splits"][split]["utterances"]
        for row in rows:
            assert set(row) == {"audio_filepath", "duration", "text", "speaker"}
            assert not Path(row["audio_filepath"]).is_absolute()
            audio, sr = sf.read(root / row["audio_filepath"], dtype="float32")
            info = sf.info(root / row["audio_filepath"])
            assert sr == 16000 and audio.ndim == 1 and info.subtype == "PCM_16"
            assert len(audio) / sr == pytest.approx(row["duration"], abs=1e-3)
            assert 1.0 <= row["duration"] <= 8.0
            assert np.abs(audio).max() > 0.01  # not silence


def test_splits_disjoint_in_speakers_and_sentences(corpus: tuple[Path, dict]) -> None:
    root, _ = corpus
    speakers = {s: {r["speaker"] for r in _manifest(root, s)} for s in SPLITS}
    texts = {s: [r["text"] for r in _manifest(root, s)] for s in SPLITS}
    all_texts = [t for s in SPLITS for t in texts[s]]
    assert len(set(all_texts)) == len(all_texts)  # unique, hence disjoint across splits
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not speakers[a] & speakers[b]


def test_texts_use_only_allowed_characters(corpus: tuple[Path, dict]) -> None:
    root, _ = corpus
    for split in SPLITS:
        for row in _manifest(root, split):
            assert ALLOWED.match(row["text"]), row["text"]


def test_stats_file(corpus: tuple[Path, dict]) -> None:
    root, stats = corpus
    on_disk = json.loads((root / "stats.json").read_text())
    assert on_disk == stats
    assert stats["config"]["seed"] == 3 and stats["config"]["sample_rate"] == 16000
    for split in SPLITS:
        s = stats["splits"][split]
        assert s["hours"] > 0 and s["vocabulary_size"] > 0
        assert s["num_speakers"] == len(s["speakers"])


def test_same_seed_gives_identical_corpus(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = corpus
    # A different worker count on purpose: scheduling must not matter.
    build_corpus(tmp_path, seed=3, workers=1, progress=False, **SIZES)
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (root / f"{split}.jsonl").read_bytes()
        for row in _manifest(root, split):
            path = row["audio_filepath"]
            assert (tmp_path / path).read_bytes() == (root / path).read_bytes(), path


def test_existing_corpus_is_reused(corpus: tuple[Path, dict]) -> None:
    root, stats = corpus
    wav = root / _manifest(root, "train")[0]["audio_filepath"]
    before = {p: p.stat().st_mtime_ns for p in (root / "stats.json", root / "train.jsonl", wav)}
    assert build_corpus(root, seed=3, progress=False, **SIZES) == stats
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_unfinished_build_is_not_reused(tmp_path: Path) -> None:
    sizes = {"n_train": 3, "n_val": 1, "n_test": 1}
    build_corpus(tmp_path, seed=1, progress=False, **sizes)
    wav = tmp_path / "wav" / "train" / "train_000000.wav"
    old = wav.stat().st_mtime_ns
    # Simulate an interrupted (re)build: everything there except the final stats.json.
    (tmp_path / "stats.json").unlink()
    stats = build_corpus(tmp_path, seed=1, progress=False, **sizes)
    assert (tmp_path / "stats.json").is_file() and stats["splits"]["train"]["utterances"] == 3
    assert wav.stat().st_mtime_ns != old


def test_sentences_unique_deterministic_and_normalised() -> None:
    a = generate_sentences(300, seed=5)
    assert a == generate_sentences(300, seed=5)
    assert a != generate_sentences(300, seed=6)
    assert len(set(a)) == 300
    assert all(ALLOWED.match(t) and 2 <= len(t.split()) <= 20 for t in a)


def test_digit_corpus_is_band_limited_spoken_digits(tmp_path: Path) -> None:
    """kind="digits" (the FSDD recipe's synthetic speakers): single digit words, each digit
    equally often, files from 0.3 s, and with bandwidth_hz nothing above the band."""
    assert sorted(generate_digits(20, seed=0)) == sorted(
        "zero one two three four five six seven eight nine".split() * 2
    )
    stats = build_corpus(tmp_path, seed=2, n_train=10, n_val=0, n_test=0, kind="digits",
                         bandwidth_hz=4000.0, workers=1, progress=False)
    assert stats["config"]["kind"] == "digits" and stats["config"]["bandwidth_hz"] == 4000.0
    rows = _manifest(tmp_path, "train")
    assert len({r["speaker"] for r in rows}) == 10
    for row in rows:
        assert row["text"] in generate_digits(10, seed=0)
        audio, sr = sf.read(tmp_path / row["audio_filepath"], dtype="float64")
        assert 0.3 <= row["duration"] <= 8.0
        power = np.abs(np.fft.rfft(audio)) ** 2
        freqs = np.fft.rfftfreq(len(audio), 1 / sr)
        assert power[freqs > 4100].sum() < 1e-4 * power.sum()
    with pytest.raises(ValueError, match="kind"):
        build_corpus(tmp_path / "x", n_train=1, n_val=0, n_test=0, kind="poems", progress=False)


def test_text_normalisation() -> None:
    # The corpus reads numbers the British way (asrkd.data.text tests the speller itself).
    assert normalize_text("115 and 2005") == "one hundred and fifteen and two thousand and five"
    assert normalize_text("Anna's 3 DOGS, rock-n-roll! 'quoted'") == (
        "anna's three dogs rock n roll quoted"
    )


def _log_spectrum(audio: np.ndarray) -> np.ndarray:
    """Long-term average log power spectrum of the frames with speech."""
    frames = np.lib.stride_tricks.sliding_window_view(audio, 512)[::256] * np.hanning(512)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    loud = power.sum(axis=1) > 0.01 * power.sum(axis=1).max()
    return np.log10(power[loud].mean(axis=0) + 1e-10)


def test_different_voices_sound_different() -> None:
    tts = EspeakSynthesizer()
    text = "the quick brown fox jumps over the lazy dog"
    male, sr = tts.synthesize(text, "en-us+m3", seed=1)
    male2, _ = tts.synthesize(text, "en-us+m3", seed=1)
    female, _ = tts.synthesize(text, "en-gb-x-rp+f3", seed=1)
    assert sr == 22050 and male.dtype == np.float32
    same = np.abs(_log_spectrum(male) - _log_spectrum(male2)).mean()
    different = np.abs(_log_spectrum(male) - _log_spectrum(female)).mean()
    # Repeating a voice barely moves the spectrum; another voice moves it a lot.
    assert different > 0.15 and different > 5 * same, (same, different)


def test_missing_voice_raises_clear_error() -> None:
    tts = EspeakSynthesizer()
    with pytest.raises(VoiceNotFoundError, match="no such voice"):
        tts.synthesize("hello", "en-gb")  # a language tag, not a voice name
    with pytest.raises(VoiceNotFoundError, match="variant"):
        tts.synthesize("hello", "en-us+no_such_variant")  # espeak itself would ignore this
    # The failure must not leave a wrong voice half-selected.
    audio, _ = tts.synthesize("hello", "en-us")
    assert audio.size > 0


def test_list_voices_are_usable_english_speakers() -> None:
    tts = EspeakSynthesizer()
    voices = tts.list_voices()
    bases = {v.split("+")[0] for v in voices}
    assert {"en", "en-us"} <= bases and len(bases) >= 4
    assert len(voices) >= 50 and all("+" in v for v in voices)
    assert "m1" in tts.list_variants()
