"""Long-form transcription (asrkd.longform): windows, pauses, segments, alignment, words,
subtitles, bounded memory, and the one-pass memory guard."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from asrkd.cli import main
from asrkd.data.tokenizer import CharTokenizer
from asrkd.errors import UserError
from asrkd.longform import (
    AudioSource,
    LongFormConfig,
    LongFormTranscriber,
    Word,
    _false_runs,
    ctc_align,
    to_srt,
)
from asrkd.models.e2e_asr import build_model, save_checkpoint
from test_e2e import tiny_config


def _model(decoder: str = "transformer", ctc: bool = True):  # noqa: ANN202
    torch.manual_seed(0)
    return build_model(tiny_config(decoder, ctc=ctc), CharTokenizer.english()).eval()


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)


def test_false_runs():
    mask = torch.tensor([0, 0, 1, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    assert _false_runs(mask) == [(0, 2), (3, 4), (6, 9)]
    assert _false_runs(torch.ones(3, dtype=torch.bool)) == []


def test_segments_cut_in_pauses_split_long_pieces_and_drop_silence():
    lf = LongFormTranscriber(_model(), config=LongFormConfig(min_pause_seconds=0.24,
                                                             max_segment_seconds=1.6))
    assert (lf.pause_frames, lf.segment_frames) == (3, 20)
    marks = torch.zeros(60, dtype=torch.bool)
    marks[2:8] = True  # a word, then a 4-frame pause (cut at its middle, frame 10)
    marks[12:14] = True  # a word, then a 1-frame gap (no cut)
    marks[15:17] = True  # a word, then silence to frame 30 (cut at 23)
    marks[30:55] = True  # 25 frames of speech with one 1-frame gap at 40
    marks[40] = False
    spans = lf.segments(marks)
    # Pauses of >= 3 frames: 8-12 (cut 10), 17-30 (cut 23), 55-60 (cut 57). The piece 23-57
    # is over 20 frames: cut again in the middle of its longest run inside, the gap at 40.
    # 57-60 holds no token.
    assert spans == [(0, 10), (10, 23), (23, 40), (40, 57)]
    # Segments up to 50 frames, neighbours joined up to 25: 0-10 and 10-23 only.
    lf = LongFormTranscriber(_model(), config=LongFormConfig(
        min_pause_seconds=0.24, max_segment_seconds=4.0, merge_seconds=2.0))
    assert lf.segments(marks) == [(0, 23), (23, 57)]


def test_ctc_align_is_the_viterbi_path():
    torch.manual_seed(1)
    frames, vocab, blank = 6, 4, 0
    log_probs = torch.randn(frames, vocab).log_softmax(-1)
    for tokens in ([1, 2], [2, 2], [3, 1, 3]):
        best, best_first = -math.inf, None
        # Every frame labelling that collapses to ``tokens``.
        for path in itertools.product(range(vocab), repeat=frames):
            collapsed = [k for k, _ in itertools.groupby(path) if k != blank]
            if collapsed != tokens:
                continue
            score = float(sum(log_probs[t, s] for t, s in enumerate(path)))
            if score > best:
                first, previous = [], blank
                for t, s in enumerate(path):
                    if s != blank and s != previous:
                        first.append(t)
                    previous = s
                best, best_first = score, first
        assert ctc_align(log_probs, tokens, blank) == best_first, tokens


def test_ctc_align_more_tokens_than_frames_spreads_them():
    log_probs = torch.zeros(3, 5).log_softmax(-1)
    assert ctc_align(log_probs, [1, 2, 3, 4], 0) == [0, 0, 1, 2]


def test_words_and_times_from_token_frames():
    model = _model()
    lf = LongFormTranscriber(model)
    tokenizer = model.tokenizer
    tokens = tokenizer.encode("ab c")
    words = lf._words(tokens, [3, 4, 6, 10])
    step = lf.frame_seconds
    assert words == [Word("ab", round(3 * step, 3), round(5 * step, 3)),
                     Word("c", round(10 * step, 3), round(11 * step, 3))]
    assert [w.start for w in lf._words(tokens, None)] == [None, None]


def test_srt():
    words = [Word("hello", 0.5, 0.9), Word("world", 1.0, 1.4), Word("again", 3.0, 3.5)]
    assert to_srt(words) == ("1\n00:00:00,500 --> 00:00:01,400\nhello world\n\n"
                             "2\n00:00:03,000 --> 00:00:03,500\nagain\n\n")
    assert to_srt(words, max_chars=8).count("-->") == 3
    with pytest.raises(UserError, match="word timestamps"):
        to_srt([Word("x", None, None)])


@pytest.mark.parametrize(("decoder", "method"), [
    ("transformer", "ctc_greedy"), ("transformer", "attention_beam"), ("rnnt", "rnnt_greedy"),
])
def test_short_audio_is_one_utterance_as_infer(decoder, method):
    model = _model(decoder)
    audio = _noise(3.0)
    expected = model.infer(torch.from_numpy(audio)[None], torch.tensor([len(audio)]),
                           method=method)[0]
    result = LongFormTranscriber(model, method).transcribe(audio)
    assert result.text == expected.text and result.method == method
    assert result.segments == [(0.0, 3.0)]
    assert len(result.words) == len(expected.text.split())
    assert all(0 <= w.start < w.end <= 3.0 + lf_step(model) for w in result.words)


def lf_step(model) -> float:  # noqa: ANN001
    return LongFormTranscriber(model).frame_seconds


def test_windows_keep_every_frame_once_as_the_whole_file_would():
    """With context covering the whole file every window sees all of it, so the joined
    frames must equal one pass's, frame for frame: the bookkeeping of kept frames."""
    model = _model()
    audio = _noise(7.3)
    lf = LongFormTranscriber(model, config=LongFormConfig(window_seconds=2.0,
                                                          context_seconds=10.0))
    assert len(lf.windows(len(audio))) == 4
    with torch.inference_mode():
        marks = lf.token_frames(AudioSource(audio))
        encoded = model.encode(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
        direct = model.ctc(encoded.output[0]).argmax(-1) != model.ctc.config.blank_id
    assert torch.equal(marks, direct)


def test_long_audio_is_cut_and_every_piece_decoded(tmp_path):
    model = _model("rnnt")
    speech, pause = _noise(4.0), np.zeros(16000, np.float32)
    audio = np.concatenate([speech, pause, _noise(4.0, 1), pause, _noise(4.0, 2)])
    lf = LongFormTranscriber(model, config=LongFormConfig(max_segment_seconds=6.0,
                                                          min_pause_seconds=0.4))
    forced = torch.zeros(math.ceil(len(audio) / lf.frame_samples) + 1, dtype=torch.bool)
    forced[::2] = True  # tokens everywhere ...
    seconds = lf.frame_seconds
    for start in (4.0, 9.0):  # ... but in the two pauses
        forced[round(start / seconds) : round((start + 1) / seconds)] = False
    lf.token_frames = lambda source: forced[: math.ceil(source.samples / lf.frame_samples) + 1]
    result = lf.transcribe(audio)
    assert len(result.segments) == 3
    starts = [a for a, _ in result.segments]  # cut in the pauses (4-5 s, 9-10 s)
    assert starts[0] == 0 and 4 < starts[1] < 5 and 9 < starts[2] < 10
    pieces = [audio[round(a * 16000) : round(b * 16000)] for a, b in result.segments]
    expected = [model.infer(torch.from_numpy(p)[None], torch.tensor([len(p)]))[0].text
                for p in pieces]
    assert result.text == " ".join(t for t in expected if t)
    for word in result.words:  # times are in the recording, not in the piece
        assert any(a - 1e-6 <= word.start < word.end <= b + seconds for a, b in result.segments)


def test_audio_source_reads_spans_of_a_resampled_file(tmp_path):
    audio = _noise(1.5)  # written as 3 s of 8 kHz stereo
    path = tmp_path / "a.wav"
    sf.write(path, np.stack([audio, audio], 1), 8000)
    source = AudioSource(path)
    assert source.samples == 48000
    from asrkd.data.audio_processing import load_audio

    whole = load_audio(path)
    span = source.read(16000, 32000)
    assert len(span) == 16000
    assert np.abs(span[100:-100] - whole[16100:31900]).max() < 1e-3
    assert len(source.read(47000, 60000)) == 1000


def test_memory_stays_bounded_and_one_pass_is_refused(monkeypatch):
    model = _model()
    lf = LongFormTranscriber(model)
    assert lf.memory_bytes() < 2**30
    import asrkd.utils.memory

    monkeypatch.setattr(asrkd.utils.memory, "available_memory_bytes", lambda: 64 * 2**20)
    audio = torch.zeros(1, 16000 * 600)
    with pytest.raises(UserError, match=r"encoding 1 x 600 s of audio in one pass.*asrkd infer"):
        model.infer(audio, torch.tensor([audio.size(1)]))


def test_cli_writes_words_segments_and_subtitles(tmp_path):
    model = _model()
    checkpoint = save_checkpoint(model, tmp_path / "m.ckpt")
    path = tmp_path / "long.wav"
    sf.write(path, np.concatenate([_noise(6.0), np.zeros(16000, np.float32), _noise(6.0, 1)]),
             16000)
    main(["infer", "--ckpt", str(checkpoint), "--max-segment-seconds", "8", "--out",
          str(tmp_path / "r.jsonl"), "--srt", str(tmp_path / "r.srt"), str(path)])
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert row["method"] == "ctc_greedy" and row["duration"] == 13.0
    assert row["segments"] and all(b - a <= 8.0 for a, b in row["segments"])
    assert len(row["words"]) == len(row["text"].split())
    srt = (tmp_path / "r.srt").read_text()
    assert srt == to_srt([Word(w["word"], w["start"], w["end"]) for w in row["words"]])


@pytest.mark.parametrize(("decoder", "ctc"), [("rnnt", False), ("transformer", False)])
def test_pauses_without_a_ctc_head(decoder, ctc):
    """A transducer marks the frames where greedy search emits; an attention-only model the
    frames 20 dB above the recording's quietest tenth."""
    model = _model(decoder, ctc=ctc)
    audio = np.concatenate([_noise(3.0), np.zeros(16000, np.float32), _noise(3.0, 1)])
    lf = LongFormTranscriber(model, config=LongFormConfig(window_seconds=2.0))
    with torch.inference_mode():
        marks = lf.token_frames(AudioSource(audio))
        encoded = model.encode(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
    assert marks.numel() == int(encoded.lengths[0])
    if decoder == "transformer":  # the silent second, and only it, is quiet
        quiet = (~marks).nonzero().view(-1)
        assert 3.0 <= quiet.min() * lf.frame_seconds and quiet.max() * lf.frame_seconds < 4.1
