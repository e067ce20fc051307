"""Write NeMo-style JSONL manifests from common corpus layouts."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import soundfile as sf

from asrkd.data.audio_processing import AUDIO_EXTENSIONS

log = logging.getLogger(__name__)


def _entry(audio: Path, text: str, manifest_dir: Path, speaker: str | None) -> dict:
    info = sf.info(str(audio))
    try:
        audio_filepath = str(audio.resolve().relative_to(manifest_dir.resolve()))
    except ValueError:
        audio_filepath = str(audio.resolve())
    entry = {"audio_filepath": audio_filepath, "duration": round(info.duration, 4), "text": text}
    if speaker is not None:
        entry["speaker"] = speaker
    return entry


def write_manifest(entries: Iterable[dict], out_path: str | Path) -> int:
    """Write entries as JSONL (UTF-8, one object per line); returns the count."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for entry in entries:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(out_path)
    return count


def librispeech_to_manifest(root: str | Path, out_path: str | Path) -> int:
    """Manifest for a LibriSpeech-style tree: ``<speaker>/<chapter>/<spk>-<ch>.trans.txt``
    lines ``<utt-id> <TRANSCRIPT>`` beside ``<utt-id>.flac`` (or another audio extension).

    The speaker is the first dash-separated field of the utterance id. Missing audio for a
    transcript line is reported and skipped.
    """
    root, out_path = Path(root), Path(out_path)
    entries = []
    missing = 0
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            audio = next(
                (trans.parent / (utt_id + ext) for ext in AUDIO_EXTENSIONS
                 if (trans.parent / (utt_id + ext)).is_file()),
                None,
            )
            if audio is None:
                missing += 1
                continue
            entries.append(_entry(audio, text.strip(), out_path.parent, utt_id.split("-")[0]))
    if missing:
        log.warning("%s: %d transcript lines had no audio file and were skipped", root, missing)
    return write_manifest(entries, out_path)


def folder_to_manifest(
    root: str | Path,
    out_path: str | Path,
    transcripts: str | Path | None = None,
    speaker_from: str | None = None,
) -> int:
    """Manifest for a folder of audio files.

    Transcripts come either from one TSV file (``transcripts``: ``<file name or stem>\\t<text>``
    per line, relative paths allowed) or, when ``transcripts`` is None, from a ``.txt`` file
    beside each audio file with the same stem. ``speaker_from="parent"`` takes the speaker
    from the containing folder's name.
    """
    root, out_path = Path(root), Path(out_path)
    audio_files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS
    )
    table: dict[str, str] | None = None
    if transcripts is not None:
        table = {}
        with Path(transcripts).open(encoding="utf-8", newline="") as handle:
            for row in csv.reader(handle, delimiter="\t"):
                if len(row) >= 2 and row[0].strip():
                    table[row[0].strip()] = row[1].strip()
    entries, missing = [], 0
    for audio in audio_files:
        if table is not None:
            relative = str(audio.relative_to(root))
            text = table.get(relative, table.get(audio.name, table.get(audio.stem)))
        else:
            sidecar = audio.with_suffix(".txt")
            text = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
        if not text:
            missing += 1
            continue
        speaker = audio.parent.name if speaker_from == "parent" else None
        entries.append(_entry(audio, text, out_path.parent, speaker))
    if missing:
        log.warning("%s: %d audio files had no transcript and were skipped", root, missing)
    return write_manifest(entries, out_path)
