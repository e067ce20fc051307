"""Crash-safe checkpoints: atomic writes, safe loads, and finding where to resume.

A checkpoint is written to a temporary file in the same folder, flushed to disk, and renamed
over the target (``os.replace`` is atomic on POSIX and Windows). A process killed mid-write
leaves the previous checkpoint intact and, at worst, a stray ``*.tmp-<pid>`` file, which the
next save of the same name removes. Every load uses ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from asrkd.models.e2e_asr import safe_load
from asrkd.utils.io import atomic_save

LAST_CHECKPOINT = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with our atomic write and safe (weights-only) load."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return safe_load(path)


def resume_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint a resumed run continues from: ``<output_dir>/checkpoints/last.ckpt``."""
    path = Path(output_dir) / "checkpoints" / LAST_CHECKPOINT
    return path if path.is_file() else None
