"""Memory estimates that turn an out-of-memory kill into a clear error before the work."""

from __future__ import annotations

import ctypes
import functools
import math

from asrkd.errors import UserError

# Floats alive per attention head and per (query, key) pair at the peak of a full-context
# encoder pass: relative-position scores over 2T-1 offsets and their shift, content scores,
# the mask, softmax. Measured (peak RSS growth of E2EASR.encode on 30-240 s of audio, 1
# thread): 16 on the AN4 teacher (4 heads), 17 on the student (1 head).
ATTENTION_FLOATS_PER_PAIR = 17


def encoder_shape(model) -> dict:  # noqa: ANN001
    """What :func:`encoder_bytes` needs to know of an E2EASR (also stored with ONNX exports)."""
    hop = model.features.config.hop_length
    return {"n_heads": model.encoder.config.n_heads, "d_model": model.encoder.config.d_model,
            "hop_length": hop, "frame_samples": hop * model.subsampling_factor,
            "n_mels": model.features.config.n_mels}


def encoder_bytes(shape: dict, batch: int, samples: int) -> int:
    """Estimated peak memory of encoding ``batch`` waveforms of ``samples`` samples at once,
    in inference, with an encoder of :func:`encoder_shape` ``shape``: the attention scores of
    every head, which grow with the square of the length, plus the layers' activations."""
    frames = math.ceil(samples / shape["frame_samples"]) + 1
    pairs = ATTENTION_FLOATS_PER_PAIR * shape["n_heads"] * frames * frames
    layers = 16 * shape["d_model"] * frames  # feed-forward expansion, residuals, conv module
    features = 4 * shape["n_mels"] * (samples // shape["hop_length"] + 1)
    return 4 * batch * (pairs + layers + features)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(need: int, what: str, advice: str) -> None:
    """Raise :class:`UserError` when ``need`` bytes exceed 80 % of the memory available
    now (``what`` says for what, ``advice`` what to do instead)."""
    available = available_memory_bytes()
    if available is not None and need > 0.8 * available:
        raise UserError(f"{what} needs about {need / 2**30:.1f} GiB, more than the "
                        f"{available / 2**30:.1f} GiB available; {advice}")


@functools.cache
def _malloc_trim():  # noqa: ANN202
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand memory that the C allocator holds but no tensor uses back to the system (glibc's
    ``malloc_trim``; a no-op elsewhere).

    Long-form transcription decodes batches of different shapes one after the other, and
    glibc keeps the freed blocks: the AN4 teacher's peak RSS over a 23.8-minute recording was
    1.2-1.4x that of its first minute, varying from run to run, with the same batches.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


__all__ = ["ATTENTION_FLOATS_PER_PAIR", "available_memory_bytes", "check_memory",
           "encoder_bytes", "encoder_shape", "release_free_memory"]
