"""Memory estimates that turn an out-of-memory kill into a clear error before the work."""

from __future__ import annotations

import math

from asrkd.errors import UserError

# Floats alive per attention head and per (query, key) pair at the peak of a full-context
# encoder pass: relative-position scores over 2T-1 offsets and their shift, content scores,
# the mask, softmax. Measured (peak RSS growth of E2EASR.encode on 30-240 s of audio, 1
# thread): 16 on the AN4 teacher (4 heads), 17 on the student (1 head).
ATTENTION_FLOATS_PER_PAIR = 17


def encoder_bytes(model, batch: int, samples: int) -> int:  # noqa: ANN001
    """Estimated peak memory of encoding ``batch`` waveforms of ``samples`` samples at once
    with ``model`` (an E2EASR) in inference: the attention scores of every head, which grow
    with the square of the length, plus the layers' activations."""
    hop = model.features.config.hop_length
    frames = math.ceil(samples / (hop * model.subsampling_factor)) + 1
    encoder = model.encoder.config
    pairs = ATTENTION_FLOATS_PER_PAIR * encoder.n_heads * frames * frames
    layers = 16 * encoder.d_model * frames  # feed-forward expansion, residuals, conv module
    features = 4 * model.features.config.n_mels * (samples // hop + 1)
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


__all__ = ["ATTENTION_FLOATS_PER_PAIR", "available_memory_bytes", "check_memory",
           "encoder_bytes"]
