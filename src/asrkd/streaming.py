"""Streaming recognition: audio in as it arrives, text out chunk by chunk, with caches.

A model trained for streaming (preset ``student_cpu_streaming``, or any model with the same four
properties, see :func:`streaming_problems`) encodes its input in chunks of ``att_context[1] + 1``
encoder frames (320 ms for that preset). Each chunk is computed once, from the new audio and
fixed-size caches of what came before:

- features: the last ``n_fft`` samples not yet framed (frames are 25 ms windows every 10 ms,
  centred as in one pass: reflection at the stream's start and end);
- each causal frontend conv: its last ``kernel_size - 1`` input frames;
- each conformer block: the attention inputs of the ``left // chunk`` chunks before (the keys
  and values the chunk may see) and the last ``conv_kernel - 1`` depthwise-conv inputs.

So a chunk costs the same whatever came before, and the result is what the one-pass forward
computes with the same chunked attention mask (training uses that forward): the chunk-by-chunk
transcript equals the one-pass transcript up to float round-off (``tests/test_streaming.py``).
The CTC head is decoded greedily as the frames arrive.

:class:`StreamingEncoder` is the chunk step as a module of tensors in, tensors out (caches as
explicit inputs and outputs), which is what an ONNX export of the step needs;
:class:`StreamingRecognizer` is the Python API: ``accept(audio)`` returns the text so far,
``finish()`` the final text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from asrkd.data.audio_processing import LogMelFeatures, reflect_pad_per_utterance
from asrkd.errors import ConfigError
from asrkd.models.e2e_asr import E2EASR

__all__ = [
    "StreamFeatures",
    "StreamingEncoder",
    "StreamingRecognizer",
    "TorchStreamer",
    "evaluate_streaming",
    "streaming_problems",
    "transcribe_stream",
]


def streaming_problems(model: E2EASR) -> list[str]:
    """What keeps ``model`` from streaming exactly (empty when it can).

    A frame's output may depend only on its own chunk and what came before, and on nothing that
    needs the whole utterance.
    """
    problems = []
    features = model.features.config
    if features.normalize is not None:
        problems.append(f"features.normalize is {features.normalize!r} (per-utterance "
                        "statistics need the whole utterance; use null)")
    if features.dynamic_range_db is not None:
        problems.append("features.dynamic_range_db is set (a floor relative to the utterance's "
                        "peak needs the whole utterance; use null)")
    if features.preemphasis is not None:
        problems.append("features.preemphasis is set (not supported by streaming)")
    if model.frontend is not None:
        if not model.frontend.config.causal:
            problems.append("frontend.causal is false (its convs read later frames)")
        if model.frontend_position != "features":
            problems.append("frontend_position is not 'features'")
    encoder = model.encoder.config
    if encoder.subsampling != "none":
        problems.append(f"encoder.subsampling is {encoder.subsampling!r} (its striding convs "
                        "read later frames; stride in a causal frontend and use 'none')")
    if encoder.att_context_style != "chunked_limited" or encoder.att_context is None:
        problems.append("encoder.att_context_style is not chunked_limited (attention over the "
                        "whole utterance or a sliding window cannot be computed chunk by chunk)")
    elif encoder.att_context[0] < 0:
        problems.append("encoder.att_context has unlimited left context (the cache would grow "
                        "with the stream)")
    if tuple(encoder.conv_context or ()) != (encoder.conv_kernel - 1, 0):
        problems.append(f"encoder.conv_context is not [{encoder.conv_kernel - 1}, 0] (the "
                        "depthwise convs read later frames)")
    if model.ctc is None:
        problems.append("the model has no CTC head (streaming decodes CTC greedily)")
    return problems


def _check_streamable(model: E2EASR) -> None:
    problems = streaming_problems(model)
    if problems:
        raise ConfigError(
            "this model cannot stream: " + "; ".join(problems)
            + ". Train one for streaming, e.g. with model_preset=student_cpu_streaming."
        )


class StreamingEncoder(nn.Module):
    """One chunk of feature frames to CTC log-probabilities, caches in and caches out.

    The state is a flat tuple of tensors (:meth:`initial_state`): two per frontend block (its
    convs' last inputs), then the attention caches ``(n_layers, B, M, D)``, the conv caches
    ``(n_layers, B, D, conv_kernel - 1)`` and the count of valid cached frames ``(1,)`` int64
    (keys not filled yet are masked, as the one-pass mask has no keys before the first frame).

    Args:
        model: a streamable :class:`E2EASR` (see :func:`streaming_problems`), in eval mode.

    Attributes:
        chunk: encoder frames per chunk (``att_context[1] + 1``).
        memory: M, cached encoder frames (``att_context[0] // chunk`` whole chunks).
        chunk_frames: feature frames per chunk (``chunk`` x the frontend's strides).
    """

    def __init__(self, model: E2EASR):
        super().__init__()
        _check_streamable(model)
        self.frontend = model.frontend
        self.encoder = model.encoder
        self.ctc = model.ctc
        left, right = model.encoder.config.att_context
        self.chunk = right + 1
        self.memory = (left // self.chunk) * self.chunk
        self.chunk_frames = self.chunk * model.subsampling_factor

    def initial_state(
        self, batch: int = 1, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, ...]:
        """Zero caches: the one-pass forward's left padding, and no valid attention keys."""
        state: list[Tensor] = []
        for block in self.frontend.blocks if self.frontend is not None else ():
            keep = block.left_pad
            state += [torch.zeros(batch, block.conv1.in_channels, keep, dtype=dtype),
                      torch.zeros(batch, block.conv2.in_channels, keep, dtype=dtype)]
        config = self.encoder.config
        state += [
            torch.zeros(config.n_layers, batch, self.memory, config.d_model, dtype=dtype),
            torch.zeros(config.n_layers, batch, config.d_model, config.conv_kernel - 1,
                        dtype=dtype),
            torch.zeros(1, dtype=torch.long),
        ]
        return tuple(state)

    def forward(self, features: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """Encode the next chunk.

        Args:
            features: (B, T, F) the next ``chunk_frames`` feature frames (fewer only in a
                stream's last call).
            state: the tuple from :meth:`initial_state` or the previous call.

        Returns:
            ``(log_probs, *state)``: (B, T', V) CTC log-probabilities of the chunk's encoder
            frames and the state for the next call.
        """
        new_state: list[Tensor] = []
        x = features.transpose(1, 2)
        n_frontend = 0
        if self.frontend is not None:
            for i, block in enumerate(self.frontend.blocks):
                x, caches = block.stream(x, (state[2 * i], state[2 * i + 1]))
                new_state += caches
            n_frontend = 2 * len(self.frontend.blocks)
        x, _ = self.encoder.subsampling(x.transpose(1, 2), None)
        x = x * self.encoder.xscale
        att_caches, conv_caches, valid = state[n_frontend:]
        t, m = x.size(1), self.memory
        pos_emb = self.encoder.pos_enc(t, x.dtype, memory=m)
        # Cache slots not filled yet (the stream's first chunks) hold no frame: block them.
        blocked = (torch.arange(m + t) < m - valid).view(1, 1, 1, m + t)
        new_att, new_conv = [], []
        for layer, att_cache, conv_cache in zip(self.encoder.layers, att_caches, conv_caches):
            x, att_cache, conv_cache = layer.stream(x, pos_emb, blocked, att_cache, conv_cache)
            new_att.append(att_cache)
            new_conv.append(conv_cache)
        valid = (valid + t).clamp(max=m)
        return (self.ctc.log_probs(x), *new_state, torch.stack(new_att), torch.stack(new_conv),
                valid)


class StreamFeatures(nn.Module):
    """Log-mel frames of already padded audio, with no per-utterance step (what streaming
    allows): the same values as :class:`~asrkd.data.audio_processing.LogMelFeatures` gives a
    model that :func:`streaming_problems` accepts."""

    def __init__(self, features: LogMelFeatures):
        super().__init__()
        self.features = features

    def forward(self, padded: Tensor) -> Tensor:
        """(1, S) padded audio -> (1, (S - n_fft) // hop + 1, n_mels)."""
        return torch.log(self.features.mel_power(padded) + self.features.config.log_floor)


class TorchStreamer:
    """What :class:`StreamingRecognizer` runs, from a PyTorch model (``export.OnnxStreamer``
    offers the same from ONNX graphs): the chunk step, its initial state, the log-mel of padded
    audio, the feature settings and the tokenizer."""

    def __init__(self, model: E2EASR):
        model.eval()
        self.step = StreamingEncoder(model)
        self.log_mel = StreamFeatures(model.features)
        self.features_config = model.features.config
        self.tokenizer = model.tokenizer
        self.chunk_frames = self.step.chunk_frames

    def initial_state(self) -> tuple[Tensor, ...]:
        return self.step.initial_state()


class StreamingRecognizer:
    """Feed audio as it arrives; read the text so far after every piece.

    ::

        recognizer = StreamingRecognizer(model)
        for piece in microphone():          # float32 samples at 16 kHz, any length
            print(recognizer.accept(piece))  # text so far (a chunk is decoded once complete)
        print(recognizer.finish())          # the final text; then reset() for the next stream

    Args:
        model: a streamable :class:`E2EASR` (see :func:`streaming_problems`; put in eval mode),
            or an ``asrkd.export.OnnxStreamer`` (the same model exported to ONNX).

    Attributes:
        step: the chunk step (for a PyTorch model, its :class:`StreamingEncoder`).
        chunk_ms: audio per encoder chunk (320 ms for ``student_cpu_streaming``).
        chunk_seconds: compute time of each encoder chunk so far (for latency figures).
        finish_seconds: compute time of :meth:`finish` (framing the end, the last chunk).
    """

    def __init__(self, model: E2EASR | object):
        streamer = TorchStreamer(model) if isinstance(model, E2EASR) else model
        self.step = streamer.step
        self._log_mel = streamer.log_mel
        self.tokenizer = streamer.tokenizer
        self.chunk_frames = streamer.chunk_frames
        self._initial_state = streamer.initial_state
        self.config = streamer.features_config
        self._pad = self.config.n_fft // 2
        self.chunk_ms = self.chunk_frames * self.config.hop_length_ms
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next :meth:`accept` starts a new one."""
        self._head: Tensor | None = torch.zeros(0)  # raw audio until the start can be padded
        self._pending = torch.zeros(0)  # padded audio from the next frame's first sample on
        self._tail = torch.zeros(0)  # the last pad + 1 raw samples (the end's reflection)
        self._frames = torch.zeros(1, 0, self.config.n_mels)
        self._state = self._initial_state()
        self._ids: list[int] = []
        self._previous = -1
        self.chunk_seconds: list[float] = []
        self.finish_seconds = 0.0
        self.finished = False

    @property
    def text(self) -> str:
        """The text decoded so far."""
        return self.tokenizer.decode(self._ids)

    @torch.no_grad()
    def accept(self, audio: np.ndarray | Tensor) -> str:
        """Take the next samples (mono float at the model's rate); return the text so far."""
        if self.finished:
            raise RuntimeError("the stream is finished: call reset() to start another")
        audio = torch.as_tensor(np.asarray(audio, dtype=np.float32)).flatten()
        self._tail = torch.cat((self._tail, audio))[-(self._pad + 1) :]
        if self._head is not None:
            self._head = torch.cat((self._head, audio))
            if self._head.numel() <= self._pad:
                return self.text
            audio, self._head = torch.cat((self._start_padding(self._head), self._head)), None
        self._pending = torch.cat((self._pending, audio))
        self._frames = torch.cat((self._frames, self._frame(final=False)), dim=1)
        self._encode(final=False)
        return self.text

    @torch.no_grad()
    def finish(self) -> str:
        """End the stream: frame and encode what is left; return the final text."""
        if self.finished:
            return self.text
        start = time.perf_counter()
        if self._head is not None:
            # Shorter than the centre padding, which then reflects more than once: pad the
            # whole stream as the one-pass features do.
            audio = self._head
            if self.config.center_pad == "constant":
                self._pending = torch.nn.functional.pad(audio, (self._pad, self._pad))
            elif audio.numel():
                self._pending = reflect_pad_per_utterance(
                    audio[None], torch.tensor([audio.numel()]), self._pad)[0]
        elif self.config.center_pad == "constant":
            self._pending = torch.cat((self._pending, torch.zeros(self._pad)))
        else:
            end = self._tail[: self._pad].flip(0)  # x[L-2], x[L-3], ... as in one pass
            self._pending = torch.cat((self._pending, end))
        frames = self._frame(final=True)
        if not self.config.count_last_frame:
            frames = frames[:, :-1]
        self._frames = torch.cat((self._frames, frames), dim=1)
        self._encode(final=True)
        self.finished = True
        self.finish_seconds = time.perf_counter() - start
        return self.text

    def _start_padding(self, head: Tensor) -> Tensor:
        if self.config.center_pad == "constant":
            return torch.zeros(self._pad)
        return head[1 : self._pad + 1].flip(0)

    def _frame(self, final: bool) -> Tensor:
        """Log-mel of every whole window in the pending audio; keep what the next needs."""
        n_fft, hop = self.config.n_fft, self.config.hop_length
        count = (self._pending.numel() - n_fft) // hop + 1
        if count <= 0:
            return torch.zeros(1, 0, self.config.n_mels)
        used = (count - 1) * hop + n_fft
        frames = self._log_mel(self._pending[None, :used])
        self._pending = self._pending[count * hop :] if not final else torch.zeros(0)
        return frames

    def _encode(self, final: bool) -> None:
        size = self.chunk_frames
        while self._frames.size(1) >= size or (final and self._frames.size(1) > 0):
            chunk, self._frames = self._frames[:, :size], self._frames[:, size:]
            start = time.perf_counter()
            log_probs, *self._state = self.step(chunk, *self._state)
            self.chunk_seconds.append(time.perf_counter() - start)
            for token in log_probs[0].argmax(-1).tolist():
                if token != self._previous and token != self.tokenizer.blank_id:
                    self._ids.append(token)
                self._previous = token


def transcribe_stream(
    recognizer: StreamingRecognizer, audio: np.ndarray, piece_samples: int
) -> Iterator[str]:
    """Feed ``audio`` to ``recognizer`` (reset first) in pieces of ``piece_samples``, as a
    live source would; yield the text after each piece and, last, the final text."""
    recognizer.reset()
    for start in range(0, len(audio), piece_samples):
        yield recognizer.accept(audio[start : start + piece_samples])
    yield recognizer.finish()


def evaluate_streaming(
    model: E2EASR,
    manifest: str | Path,
    chunk_ms: float | None = None,
    threads: int | None = 2,
    out_jsonl: str | Path | None = None,
) -> dict:
    """WER/CER of ``model`` streamed over a manifest, and what each chunk costs.

    Every utterance is fed in pieces of ``chunk_ms`` (default: the model's encoder chunk) and
    decoded as it arrives. Reports the corpus WER/CER (references normalised as
    :func:`asrkd.training.pipeline.evaluate` does), the median and 95th percentile of the
    compute time of an encoder chunk (the log-mel of its audio, computed as samples arrive, is
    not included), and the median time of ``finish()`` (the finalisation delay: framing the
    end and encoding the last, partial chunk).
    """
    from asrkd.data.dataset import ManifestDataset
    from asrkd.utils.metrics import corpus_error_rates
    from asrkd.utils.threads import torch_threads

    recognizer = StreamingRecognizer(model)
    chunk_ms = chunk_ms or recognizer.chunk_ms
    rate = model.features.config.sample_rate
    piece = max(1, round(rate * chunk_ms / 1000))
    dataset = ManifestDataset(manifest)
    normalizer = model.tokenizer.normalizer
    rows, chunk_seconds, finish_seconds = [], [], []
    with torch_threads(threads):
        for index, entry in enumerate(dataset.entries):
            audio = dataset[index]["audio"]
            *_, text = transcribe_stream(recognizer, np.asarray(audio), piece)
            chunk_seconds += recognizer.chunk_seconds
            finish_seconds.append(recognizer.finish_seconds)
            rows.append({"audio_filepath": str(entry.audio_filepath),
                         "reference": normalizer(entry.text or ""), "hypothesis": text})
    metrics = corpus_error_rates([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
    chunk_ms_all = 1000 * np.asarray(chunk_seconds)
    metrics.update({
        "utterances": len(rows),
        "chunk_ms": chunk_ms,
        "encoder_chunk_ms": recognizer.chunk_ms,
        "chunks": int(chunk_ms_all.size),
        "chunk_compute_ms": round(float(np.median(chunk_ms_all)), 2),
        "chunk_compute_ms_p95": round(float(np.percentile(chunk_ms_all, 95)), 2),
        "finalisation_ms": round(1000 * float(np.median(finish_seconds)), 2),
        "threads": threads,
    })
    if out_jsonl is not None:
        Path(out_jsonl).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return metrics
