"""Long-form transcription: recordings of any length in bounded memory, with word timestamps.

A full-context encoder run over a whole file needs memory that grows with the square of its
length (attention over every pair of frames): a 22-minute recording was killed by the kernel
on a 24 GiB machine. And models trained on utterances of a few seconds recognise a long
stretch of several utterances badly even where it fits: the AN4 teacher (8.8 % WER on the test
utterances one by one) made 26 % on the same utterances joined into 2.7 minutes and encoded
in one pass, and 18-20 % when encoded in overlapping 4-20 s windows with 2-4 s of context on
each side. So the recording is cut where the model hears pauses, and each piece is
transcribed as the utterance it is:

1. **Pauses.** The file is read from disk in windows of ``window_seconds`` with
   ``context_seconds`` of audio encoded and dropped on each side; the model marks the frames
   where it hears a token (CTC head: frames whose arg-max is not blank; a transducer without
   one: frames where greedy search emits; an attention-only model: frames more than 20 dB
   above the recording's quietest tenth). Runs of at least ``min_pause_seconds`` without a
   token are pauses.
2. **Segments.** The recording is cut in the middle of every pause; a piece longer than
   ``max_segment_seconds`` is cut again in the middle of its longest run without a token (or
   in its middle, if it has none); pieces without a token are dropped.
3. **Decoding.** Each segment is read again and decoded as one utterance (batched, up to
   ``batch_seconds`` of audio at once) with the requested search, LM fusion included, and the
   texts are joined.

Word timestamps come from the search's token frames (CTC spikes, transducer emissions) or,
for attention hypotheses, from a CTC forced alignment of the tokens to their segment; an
attention-only model gives none. Memory depends on the window and segment lengths, not on
the recording's: pass 1 keeps one flag per 80 ms frame.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import Tensor

from asrkd.data.audio_processing import SAMPLE_RATE, AudioError
from asrkd.decoding.rnnt import rnnt_greedy
from asrkd.errors import ConfigError, UserError
from asrkd.models.common import pad_sequences
from asrkd.utils.memory import check_memory, encoder_bytes, encoder_shape, release_free_memory


@dataclass(frozen=True)
class Word:
    """One recognised word and its time span in seconds (None without an alignment)."""

    word: str
    start: float | None
    end: float | None


@dataclass
class LongFormResult:
    """The transcript of one recording."""

    text: str
    words: list[Word]
    duration: float  # seconds of audio
    method: str  # the search that ran
    segments: list[tuple[float, float]]  # (start, end) seconds of the decoded segments

    def to_dict(self) -> dict:
        return {"text": self.text, "duration": round(self.duration, 3), "method": self.method,
                "segments": [[a, b] for a, b in self.segments],
                "words": [{"word": w.word, "start": w.start, "end": w.end} for w in self.words]}


@dataclass(frozen=True)
class LongFormConfig:
    """Windows, pauses and segments of :class:`LongFormTranscriber` (seconds)."""

    window_seconds: float = 8.0  # audio whose frames a pause-finding window keeps
    context_seconds: float = 2.0  # audio encoded on each side of it and dropped
    min_pause_seconds: float = 0.4  # shortest run without a token that cuts the recording
    max_segment_seconds: float = 15.0  # longest piece decoded as one utterance
    # Neighbouring pieces are joined again while the result is at most this long (0: never),
    # for models that recognise several utterances in one input (data.concat_prob).
    merge_seconds: float = 0.0
    batch_seconds: float = 60.0  # audio decoded together

    def __post_init__(self) -> None:
        if min(self.window_seconds, self.min_pause_seconds, self.max_segment_seconds,
               self.batch_seconds) <= 0 or min(self.context_seconds, self.merge_seconds) < 0:
            raise ConfigError("long-form window, pause, segment and batch lengths must be > 0, "
                              "context_seconds and merge_seconds >= 0")


class AudioSource:
    """Mono 16 kHz samples of a file (read from disk a span at a time) or of an array."""

    def __init__(self, audio: str | Path | np.ndarray) -> None:
        self.path: Path | None = None
        if isinstance(audio, np.ndarray):
            if audio.ndim != 1 or audio.size == 0:
                raise AudioError("audio must be a non-empty 1-D array of 16 kHz samples")
            self.array: np.ndarray | None = np.ascontiguousarray(audio, dtype=np.float32)
            self.rate = SAMPLE_RATE
            self.source_frames = audio.size
        else:
            self.path, self.array = Path(audio), None
            if not self.path.is_file():
                raise AudioError(f"{self.path}: audio file not found")
            try:
                info = sf.info(str(self.path))
            except (sf.LibsndfileError, RuntimeError, TypeError) as error:
                raise AudioError(f"{self.path}: cannot read audio ({error})") from None
            self.rate, self.source_frames = info.samplerate, info.frames
            if self.source_frames <= 0:
                raise AudioError(f"{self.path}: audio holds no samples")
        self.samples = int(round(self.source_frames * SAMPLE_RATE / self.rate))

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE

    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples ``[start, stop)`` at 16 kHz (``stop`` clipped to the end)."""
        stop = min(stop, self.samples)
        if self.array is not None:
            return self.array[start:stop]
        # Read a little more of the source than the span so that the resampler's edges fall
        # outside it (windows overlap by their context, so the edges are dropped anyway).
        margin = 64 if self.rate != SAMPLE_RATE else 0
        first = max(0, math.floor(start * self.rate / SAMPLE_RATE) - margin)
        last = min(self.source_frames, math.ceil(stop * self.rate / SAMPLE_RATE) + margin)
        try:
            with sf.SoundFile(str(self.path)) as handle:
                handle.seek(first)
                block = handle.read(last - first, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as error:
            raise AudioError(f"{self.path}: cannot read audio ({error})") from None
        mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
        if self.rate == SAMPLE_RATE:
            return np.ascontiguousarray(mono, dtype=np.float32)
        resampled = soxr.resample(mono, self.rate, SAMPLE_RATE, quality="HQ")
        offset = start - int(round(first * SAMPLE_RATE / self.rate))
        return np.ascontiguousarray(resampled[offset : offset + stop - start], dtype=np.float32)


class LongFormTranscriber:
    """Transcribe recordings of any length with an :class:`~asrkd.models.e2e_asr.E2EASR`.

    Args:
        model: the model (put in eval mode).
        method: a search name (``ctc_greedy``, ``ctc_beam``, ``attention_beam``, ...); None:
            the model's default.
        beam_size: beam of the beam searches (None: the model's decoding config).
        fusion: a token n-gram LM fused into ``ctc_beam``.
        config: windows, pauses and segments (:class:`LongFormConfig`).
        progress: show progress bars on files longer than one window (on a terminal only).
    """

    def __init__(self, model, method: str | None = None, beam_size: int | None = None,  # noqa: ANN001
                 fusion=None, config: LongFormConfig | None = None,  # noqa: ANN001
                 progress: bool = True) -> None:
        self.model = model.eval()
        self.method = method or model.default_method()
        self.search = model.search_strategy(self.method, beam_size, fusion)
        self.config = config or LongFormConfig()
        self.progress = progress
        self.frame_samples = model.features.config.hop_length * model.subsampling_factor
        self.frame_seconds = self.frame_samples / SAMPLE_RATE
        self.window_frames = max(1, round(self.config.window_seconds / self.frame_seconds))
        self.context_frames = round(self.config.context_seconds / self.frame_seconds)
        self.pause_frames = max(1, round(self.config.min_pause_seconds / self.frame_seconds))
        self.segment_frames = max(2, round(self.config.max_segment_seconds / self.frame_seconds))
        self.word_pieces = model.tokenizer.word_pieces() if model.tokenizer else None

    # -- pass 1: where the model hears tokens --------------------------------------------

    def windows(self, samples: int) -> list[tuple[int, int, int, int]]:
        """``(read start, keep start, keep stop, read stop)`` sample offsets of each window
        of pass 1: its frames from ``keep start`` to ``keep stop`` are kept (offsets are
        multiples of the frame step)."""
        step = self.window_frames * self.frame_samples
        context = self.context_frames * self.frame_samples
        return [(max(0, keep - context), keep, min(keep + step, samples),
                 min(keep + step + context, samples)) for keep in range(0, samples, step)]

    def token_frames(self, source: AudioSource) -> Tensor:
        """(T,) bool: the 80 ms frames (the encoder's frame step) where the model hears a
        token, for the whole recording, computed a window at a time."""
        # A model with neither a CTC head nor a transducer marks frames by their energy.
        by_energy = self.model.ctc is None and self.model.decoder_type != "rnnt"
        marks: list[Tensor] = []
        plan = self.windows(source.samples)
        with self._bar(source.seconds if len(plan) > 1 else 0, "finding pauses") as bar:
            for read, keep, stop, end in plan:
                audio = source.read(read, end)
                encoded = self.model.encode(torch.from_numpy(audio)[None],
                                            torch.tensor([len(audio)]))
                output = encoded.output[0, : int(encoded.lengths[0])]
                skip = (keep - read) // self.frame_samples
                count = (math.ceil((stop - keep) / self.frame_samples) if stop < source.samples
                         else output.size(0) - skip)
                kept = output[skip : skip + count]
                marks.append(self._energy(audio[keep - read : stop - read], kept.size(0))
                             if by_energy else self._marks(kept))
                bar.update(stop / SAMPLE_RATE - bar.n)
        if by_energy:
            energy = torch.cat(marks)
            return energy > torch.quantile(energy, 0.1) + math.log(100.0)  # 20 dB above
        return torch.cat(marks)

    def _marks(self, output: Tensor) -> Tensor:
        """(F,) bool of F encoder frames: CTC arg-max not blank, else a transducer emission."""
        if self.model.ctc is not None:
            return self.model.ctc(output).argmax(-1) != self.model.ctc.config.blank_id
        marks = torch.zeros(output.size(0), dtype=torch.bool)
        hyp = rnnt_greedy(self.model.decoder, output[None], torch.tensor([output.size(0)]))[0]
        marks[hyp.timestamps] = True
        return marks

    def _energy(self, audio: np.ndarray, frames: int) -> Tensor:
        """Log mean-square of the samples under each of ``frames`` frames."""
        padded = np.zeros(frames * self.frame_samples, dtype=np.float32)
        padded[: min(len(audio), padded.size)] = audio[: padded.size]
        return torch.from_numpy(np.log((padded.reshape(frames, -1) ** 2).mean(axis=1) + 1e-10))

    def segments(self, marks: Tensor) -> list[tuple[int, int]]:
        """Frame spans to decode: cut in the middle of every run of at least
        ``min_pause_seconds`` without a token, pieces over ``max_segment_seconds`` cut again in
        the middle of their longest such run of any length (or in their middle), pieces
        without a token dropped."""
        runs = _false_runs(marks)
        cuts = [0] + [(a + b) // 2 for a, b in runs if b - a >= self.pause_frames
                      and 0 < (a + b) // 2 < marks.numel()] + [marks.numel()]
        spans: list[tuple[int, int]] = []
        pending = list(zip(cuts[:-1], cuts[1:], strict=True))[::-1]
        while pending:
            start, end = pending.pop()
            if end - start <= self.segment_frames:
                if bool(marks[start:end].any()):
                    spans.append((start, end))
                continue
            inside = [(b - a, (a + b) // 2) for a, b in runs if start < (a + b) // 2 < end]
            cut = max(inside)[1] if inside else (start + end) // 2
            pending.extend([(cut, end), (start, cut)])
        merge = min(self.segment_frames, round(self.config.merge_seconds / self.frame_seconds))
        merged: list[tuple[int, int]] = []
        for start, end in spans:
            if merged and merged[-1][1] == start and end - merged[-1][0] <= merge:
                start = merged.pop()[0]
            merged.append((start, end))
        return merged

    # -- pass 2: each segment as an utterance --------------------------------------------

    @torch.inference_mode()
    def transcribe(self, audio: str | Path | np.ndarray) -> LongFormResult:
        """Transcript and word timestamps of a file (any format soundfile reads; any rate
        and channel count) or of a 1-D array of 16 kHz samples."""
        source = AudioSource(audio)
        check_memory(self.memory_bytes(), f"{source.path or 'audio'}: long-form transcription",
                     "lower max_segment_seconds / batch_seconds or free memory")
        if source.seconds <= self.config.max_segment_seconds:  # one utterance, as infer
            spans = [(0, math.ceil(source.samples / self.frame_samples))]
        else:
            spans = self.segments(self.token_frames(source))
        texts: list[str] = []
        words: list[Word] = []
        with self._bar(source.seconds if len(spans) > 1 else 0, "decoding") as bar:
            for batch in self._batches(spans):
                pieces = [torch.from_numpy(source.read(a * self.frame_samples,
                                                       b * self.frame_samples))
                          for a, b in batch]
                for (start, _), (text, segment_words) in zip(batch, self._decode(pieces),
                                                              strict=True):
                    texts.append(text)
                    words.extend(Word(w.word, _shift(w.start, start * self.frame_seconds),
                                      _shift(w.end, start * self.frame_seconds))
                                 for w in segment_words)
                bar.update(batch[-1][1] * self.frame_seconds - bar.n)
                release_free_memory()
        return LongFormResult(
            " ".join(t for t in texts if t), words, source.seconds, self.method,
            [(round(a * self.frame_seconds, 3), round(min(b * self.frame_samples,
                                                          source.samples) / SAMPLE_RATE, 3))
             for a, b in spans],
        )

    def _batches(self, spans: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
        limit = self.config.batch_seconds / self.frame_seconds
        batch: list[tuple[int, int]] = []
        for span in spans:
            longest = max([b - a for a, b in batch] + [span[1] - span[0]])
            if batch and longest * (len(batch) + 1) > limit:  # padded size of the batch
                yield batch
                batch = []
            batch.append(span)
        if batch:
            yield batch

    def _decode(self, pieces: list[Tensor]) -> list[tuple[str, list[Word]]]:
        """Text and words (seconds from each piece's start) of a batch of waveforms."""
        audio, lengths = pad_sequences(pieces)
        encoded = self.model.encode(audio, lengths)
        hyps = self.search(self.model, encoded.output, encoded.lengths)
        results = []
        for b, hyp in enumerate(hyps):
            stamps: list[int] | None = hyp.timestamps
            if len(stamps) != len(hyp.tokens):  # a search without frames: align with CTC
                stamps = self._align(encoded.output[b, : int(encoded.lengths[b])], hyp.tokens)
            results.append((self.model.tokenizer.decode(hyp.tokens),
                            self._words(hyp.tokens, stamps)))
        return results

    def _align(self, output: Tensor, tokens: list[int]) -> list[int] | None:
        """Frame of each token from a CTC forced alignment (None without a CTC head)."""
        if self.model.ctc is None:
            return None
        if not tokens:
            return []
        log_probs = self.model.ctc(output).log_softmax(-1)
        return ctc_align(log_probs, tokens, self.model.ctc.config.blank_id)

    def _words(self, tokens: list[int], stamps: list[int] | None) -> list[Word]:
        """Words of a token sequence, timed from their first and last tokens' frames."""
        if self.word_pieces is None:
            return []
        words: list[Word] = []
        text, first, last = "", None, None
        for k, token in enumerate(tokens + [-1]):  # -1: the end closes the last word
            starts, piece = (True, "") if token < 0 else self.word_pieces[token]
            if starts and text:
                words.append(Word(
                    text, None if first is None else round(first * self.frame_seconds, 3),
                    None if last is None else round((last + 1) * self.frame_seconds, 3)))
                text = ""
            if piece:
                frame = None if stamps is None else stamps[k]
                first = frame if not text else first
                last = frame
                text += piece
        return words

    # -- memory and progress -------------------------------------------------------------

    def memory_bytes(self) -> int:
        """Estimated peak memory of a transcription beyond the model: the larger of a
        pass-1 window and a pass-2 batch (it does not grow with the recording)."""
        window = (self.window_frames + 2 * self.context_frames) * self.frame_samples
        segment = self.segment_frames * self.frame_samples
        rows = max(1, int(self.config.batch_seconds // self.config.max_segment_seconds))
        shape = encoder_shape(self.model)
        return max(encoder_bytes(shape, 1, window), encoder_bytes(shape, rows, segment))

    @contextmanager
    def _bar(self, seconds: float, description: str) -> Iterator:
        """A tqdm bar over ``seconds`` of audio (a stand-in that does nothing when progress is
        off or ``seconds`` is 0)."""
        if not (self.progress and seconds):
            yield _NoBar()
            return
        from tqdm import tqdm

        bar = tqdm(total=round(seconds, 1), unit="s", desc=description, file=sys.stderr,
                   disable=None, leave=False, bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                   "{n:.0f}/{total:.0f} s [{elapsed}<{remaining}]")
        try:
            yield bar
        finally:
            bar.close()


class _NoBar:
    n = 0.0

    def update(self, amount: float) -> None:
        self.n += amount


def _shift(seconds: float | None, offset: float) -> float | None:
    return None if seconds is None else round(seconds + offset, 3)


def _false_runs(mask: Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of every run of False in a (T,) bool mask."""
    padded = torch.cat([torch.tensor([True]), mask.bool(), torch.tensor([True])]).to(torch.int8)
    edges = padded.diff()
    starts = (edges == -1).nonzero().view(-1).tolist()
    ends = (edges == 1).nonzero().view(-1).tolist()
    return list(zip(starts, ends, strict=True))


def to_srt(words: list[Word], max_seconds: float = 6.0, max_chars: int = 42,
           max_gap: float = 1.0) -> str:
    """SubRip subtitles from timed words: a cue ends before a word that would make it longer
    than ``max_seconds`` or ``max_chars`` characters, or that follows a pause over
    ``max_gap`` seconds.

    Raises:
        UserError: the words have no times (an attention-only model).
    """
    if any(w.start is None or w.end is None for w in words):
        raise UserError("subtitles need word timestamps, which this model does not give "
                        "(an attention decoder without a CTC head)")
    cues: list[list[Word]] = []
    for word in words:
        cue = cues[-1] if cues else None
        if (cue is None or word.start - cue[-1].end > max_gap
                or word.end - cue[0].start > max_seconds
                or len(" ".join(w.word for w in cue)) + 1 + len(word.word) > max_chars):
            cues.append([word])
        else:
            cue.append(word)

    def stamp(seconds: float) -> str:
        millis = int(round(seconds * 1000))
        return (f"{millis // 3_600_000:02d}:{millis // 60_000 % 60:02d}:"
                f"{millis // 1000 % 60:02d},{millis % 1000:03d}")

    return "".join(f"{k}\n{stamp(cue[0].start)} --> {stamp(cue[-1].end)}\n"
                   f"{' '.join(w.word for w in cue)}\n\n" for k, cue in enumerate(cues, 1))


def ctc_align(log_probs: Tensor, tokens: list[int], blank: int) -> list[int]:
    """Viterbi forced alignment of ``tokens`` to (T, V) CTC log-probs: the frame where each
    token's most probable path first emits it. Tokens that do not fit in T frames (more
    tokens and repeats than frames) are spread evenly instead."""
    frames = log_probs.size(0)
    labels = torch.tensor(tokens, dtype=torch.long)
    repeats = int((labels[1:] == labels[:-1]).sum()) if len(tokens) > 1 else 0
    if len(tokens) + repeats > frames:
        return [min(frames - 1, k * frames // len(tokens)) for k in range(len(tokens))]
    states = torch.full((2 * len(tokens) + 1,), blank, dtype=torch.long)
    states[1::2] = labels
    n = states.numel()
    # A label state may skip the blank before it unless it repeats the label before that.
    skip = torch.zeros(n, dtype=torch.bool)
    skip[3::2] = labels[1:] != labels[:-1]
    emit = log_probs[:, states].float()  # (T, S)
    neg = torch.tensor(float("-inf"))
    score = torch.full((n,), float("-inf"))
    score[:2] = emit[0, :2]
    back = torch.zeros(frames, n, dtype=torch.uint8)  # 0 stay, 1 from s-1, 2 from s-2
    for t in range(1, frames):
        prev1 = torch.cat([neg[None], score[:-1]])
        prev2 = torch.where(skip, torch.cat([neg.expand(2), score[:-2]]), neg)
        best, arg = torch.stack([score, prev1, prev2]).max(0)
        back[t] = arg.to(torch.uint8)
        score = best + emit[t]
    # End in the last label or the blank after it.
    state = n - 1 if score[n - 1] >= score[n - 2] else n - 2
    first = [0] * len(tokens)
    for t in range(frames - 1, -1, -1):
        if state % 2 == 1:
            first[state // 2] = t  # overwritten down to the run's first frame
        state -= int(back[t, state])
    return first


__all__ = ["AudioSource", "LongFormConfig", "LongFormResult", "LongFormTranscriber", "Word",
           "ctc_align", "to_srt"]
