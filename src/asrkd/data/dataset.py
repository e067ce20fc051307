"""NeMo-style JSONL manifests, validated line by line, and the dataset over them."""

from __future__ import annotations

import gzip
import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from asrkd.data.audio_processing import SAMPLE_RATE, AudioError, load_audio, speed_perturb
from asrkd.data.tokenizer import PAD_ID, Tokenizer
from asrkd.errors import ConfigError, UserError
from asrkd.models.common import pad_sequences

log = logging.getLogger(__name__)


# How far a manifest's duration may be from the audio file's (rounding in other tools).
DURATION_TOLERANCE = 0.1


class ManifestError(UserError):
    """A manifest line that cannot be used; the message names the manifest, line and problem."""


@dataclass(frozen=True)
class ManifestEntry:
    """One validated manifest line."""

    audio_filepath: Path
    duration: float
    text: str | None
    offset: float = 0.0
    speaker: str | None = None
    line: int = 0
    # Only ``duration`` seconds from ``offset`` are the utterance, even at offset 0 (a Lhotse
    # cut shorter than its recording); otherwise an offset-0 line is the whole file.
    segment: bool = False

    @property
    def is_segment(self) -> bool:
        """Whether the utterance is part of its file (read ``duration`` from ``offset``)."""
        return bool(self.offset) or self.segment


def utterance_key(audio_filepath: str | Path | ManifestEntry, offset: float = 0.0) -> str:
    """A stable id of one utterance: its resolved audio path, plus ``@offset`` if nonzero.

    Several utterances cut from one file differ by offset, so the offset is part of the key.
    The teacher cache is keyed by it.
    """
    if isinstance(audio_filepath, ManifestEntry):
        entry = audio_filepath
        if entry.segment and not entry.offset:  # the file's start: its duration tells it apart
            return f"{Path(entry.audio_filepath).resolve()}@0.0+{entry.duration!r}"
        audio_filepath, offset = entry.audio_filepath, entry.offset
    path = str(Path(audio_filepath).resolve())
    return f"{path}@{float(offset)!r}" if offset else path


def speed_key(key: str, factor: float) -> str:
    """The key of utterance ``key`` read at speed ``factor``: ``key`` itself at 1.0, else
    ``key#speed=<factor>``. A teacher cache stores each speed-perturbed copy under its own key,
    so the student's perturbed audio finds the teacher outputs of exactly that audio."""
    factor = float(factor)
    return key if math.isclose(factor, 1.0) else f"{key}#speed={factor!r}"


@dataclass
class ManifestReport:
    """What reading a manifest kept, filtered and skipped (and why)."""

    path: Path
    kept: int = 0
    filtered_short: int = 0
    filtered_long: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_problems: list[str] = field(default_factory=list)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        parts = [f"{self.path}: kept {self.kept}"]
        if self.filtered_short or self.filtered_long:
            parts.append(
                f"filtered {self.filtered_short} too short, {self.filtered_long} too long"
            )
        if self.skipped_total:
            reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
            parts.append(f"skipped {self.skipped_total} bad lines ({reasons})")
            parts.append("first: " + "; ".join(self.first_problems))
        return "; ".join(parts)


def _check_line(
    record: object, manifest: Path, require_text: bool, check_audio: bool
) -> tuple[ManifestEntry | None, str | None, str | None]:
    """Validate one parsed line. Returns (entry, None, None) or (None, reason, detail)."""
    if not isinstance(record, dict):
        return None, "not an object", f"expected a JSON object, got {type(record).__name__}"
    required = ["audio_filepath", "duration"] + (["text"] if require_text else [])
    missing = [key for key in required if key not in record]
    if missing:
        return None, "missing key", f"missing key(s) {', '.join(missing)}"
    path_value, duration = record["audio_filepath"], record["duration"]
    if not isinstance(path_value, str) or not path_value:
        return None, "wrong type", "audio_filepath must be a non-empty string"
    if isinstance(duration, bool) or not isinstance(duration, (int, float)):
        return None, "wrong type", f"duration must be a number, got {duration!r}"
    if not math.isfinite(duration) or duration <= 0:
        return None, "bad duration", f"duration must be positive, got {duration!r}"
    offset = record.get("offset", 0.0) or 0.0
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or offset < 0:
        return None, "wrong type", f"offset must be a non-negative number, got {offset!r}"
    text = record.get("text")
    if text is not None and not isinstance(text, str):
        return None, "wrong type", f"text must be a string, got {type(text).__name__}"
    if require_text and not (text or "").strip():
        return None, "empty text", "text is empty"
    speaker = record.get("speaker")
    audio_path = Path(path_value)
    if not audio_path.is_absolute():
        audio_path = (manifest.parent / audio_path).resolve()
        if not audio_path.is_relative_to(manifest.parent.resolve()):
            return None, "path outside manifest folder", (
                f"relative audio_filepath {path_value!r} points outside the manifest's folder; "
                "use an absolute path"
            )
    if check_audio:
        if not audio_path.is_file():
            return None, "missing file", f"audio file {audio_path} not found"
        try:
            info = sf.info(str(audio_path))
        except (sf.LibsndfileError, RuntimeError) as error:
            return None, "unreadable audio", f"cannot read {audio_path} ({error})"
        if info.frames == 0:
            return None, "empty audio", f"{audio_path} holds no samples"
        available = info.frames / info.samplerate - float(offset)
        segment = bool(offset) or record.get("segment") is True
        if float(duration) > available + DURATION_TOLERANCE or (
            not segment and abs(available - float(duration)) > DURATION_TOLERANCE
        ):
            return None, "duration mismatch", (
                f"duration {duration} s disagrees with the file ({available:.3f} s from offset "
                f"{offset}); batching budgets trust it, so fix it to the file's length"
            )
    entry = ManifestEntry(
        audio_filepath=audio_path,
        duration=float(duration),
        text=text.strip() if isinstance(text, str) else None,
        offset=float(offset),
        speaker=None if speaker is None else str(speaker),
        segment=record.get("segment") is True,
    )
    return entry, None, None


LHOTSE_CUT_TYPES = ("MonoCut", "MultiCut", "MixedCut", "Cut")


def _is_lhotse_cut(record: object) -> bool:
    return isinstance(record, dict) and (
        record.get("type") in LHOTSE_CUT_TYPES or ("recording" in record
                                                   and "supervisions" in record))


def _from_lhotse_cut(cut: dict, manifest: Path) -> tuple[dict, str | None, str | None]:
    """A Lhotse cut (a line of a CutSet JSONL, as ``CutSet.to_file`` writes it) as the
    NeMo-style record it stands for: the recording's file, the cut's ``start`` as ``offset``
    and its ``duration``, the texts of its supervisions joined in order, the first
    supervision's speaker. Returns (record, None, None) or ({}, reason, detail).

    A relative source path is looked up next to the manifest, then in the working directory
    (Lhotse stores paths as given, usually relative to where its recipe ran).
    """
    kind = cut.get("type", "MonoCut")
    if kind == "MixedCut" or "tracks" in cut:
        return {}, "unsupported cut", (
            "a MixedCut (padded or mixed in Lhotse) is not supported; give the cuts before "
            "mixing, or write the mix to audio files")
    recording = cut.get("recording")
    if not isinstance(recording, dict) or not recording.get("sources"):
        return {}, "unsupported cut", "the cut has no recording with sources (features-only " \
            "cuts are not supported: asrkd computes its own features from audio)"
    source = recording["sources"][0]
    if len(recording["sources"]) > 1 or source.get("type") != "file":
        return {}, "unsupported cut", (
            f"recording source type {source.get('type')!r}: only single 'file' sources are "
            "supported (for Lhotse Shar, read the shards with Lhotse and write files)")
    channels = cut.get("channel", 0)
    channels = channels if isinstance(channels, list) else [channels]
    if sorted(channels) != sorted(recording.get("channel_ids", [0])):
        return {}, "unsupported cut", (
            f"the cut uses channels {channels} of a recording with {recording.get('channel_ids')}"
            "; asrkd averages all channels of a file")
    audio = Path(str(source.get("source", "")))
    if not audio.is_absolute():
        beside = manifest.parent / audio
        audio = (beside if beside.exists() else Path.cwd() / audio).resolve()
    supervisions = [s for s in cut.get("supervisions") or [] if isinstance(s, dict)]
    texts = [s["text"] for s in supervisions if isinstance(s.get("text"), str) and s["text"]]
    record = {"audio_filepath": str(audio), "duration": cut.get("duration"),
              "offset": cut.get("start", 0.0)}
    if texts:
        record["text"] = " ".join(texts)
    full = recording.get("duration")
    if isinstance(full, (int, float)) and isinstance(record["duration"], (int, float)) and (
            record["duration"] < full - 1e-3):
        record["segment"] = True
    speakers = [s["speaker"] for s in supervisions if s.get("speaker") is not None]
    if speakers:
        record["speaker"] = speakers[0]
    return record, None, None


def read_manifest(
    path: str | Path,
    strict: bool = True,
    min_duration: float | None = None,
    max_duration: float | None = None,
    require_text: bool = True,
    check_audio: bool = True,
) -> tuple[list[ManifestEntry], ManifestReport]:
    """Read and validate a JSONL manifest.

    Each line is a JSON object with ``audio_filepath`` (absolute, or relative to the manifest's
    folder), ``duration`` (seconds), ``text`` (unless ``require_text=False``, for unlabelled
    audio), and optionally ``offset``, ``speaker`` and ``segment`` (true: only ``duration``
    seconds from ``offset`` are the utterance even at offset 0; otherwise an offset-0 line must
    be the whole file). Blank lines are ignored. A Lhotse CutSet
    (``cuts.jsonl`` or ``cuts.jsonl.gz``; cuts of audio files) is read as the NeMo manifest
    it stands for (see :func:`_from_lhotse_cut`); a ``.gz`` manifest is decompressed.

    With ``strict`` a bad line raises :class:`ManifestError` naming the manifest, the line
    number and the problem; otherwise bad lines are skipped, counted in the report, and logged
    once as a summary. Lines outside ``[min_duration, max_duration]`` are filtered (counted,
    not errors).
    """
    path = Path(path)
    if not path.is_file():
        hint = " (build the default corpus with `asrkd corpus`)" if "default" in str(path) else ""
        raise ManifestError(f"{path}: manifest not found{hint}")
    report = ManifestReport(path=path)
    entries: list[ManifestEntry] = []
    raw = path.read_bytes()
    if path.suffix == ".gz":  # Lhotse writes cuts.jsonl.gz
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ManifestError(f"{path}: not a readable gzip file ({error})") from None
    for number, raw_line in enumerate(raw.splitlines(), start=1):
        if not raw_line.strip():
            continue
        entry, reason, detail = None, None, None
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            reason, detail = "not UTF-8", f"line is not valid UTF-8 ({error.reason})"
        else:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                reason, detail = "broken JSON", f"broken JSON ({error.msg} at column {error.colno})"
            else:
                if _is_lhotse_cut(record):
                    record, reason, detail = _from_lhotse_cut(record, path)
                if reason is None:
                    entry, reason, detail = _check_line(record, path, require_text, check_audio)
        if entry is None:
            message = f"{path}, line {number}: {detail}"
            if strict:
                raise ManifestError(message + " (fix the line, or set strict: false to skip it)")
            report.skipped[reason] += 1
            if len(report.first_problems) < 3:
                report.first_problems.append(f"line {number}: {detail}")
            continue
        if min_duration is not None and entry.duration < min_duration:
            report.filtered_short += 1
            continue
        if max_duration is not None and entry.duration > max_duration:
            report.filtered_long += 1
            continue
        entries.append(ManifestEntry(**{**entry.__dict__, "line": number}))
    report.kept = len(entries)
    if report.skipped_total:
        log.warning(report.summary())
    return entries, report


class ManifestDataset(Dataset):
    """Utterances of a manifest as waveforms (16 kHz mono) with their text and token ids.

    Args:
        manifest: JSONL manifest path.
        tokenizer: when given, items carry ``tokens``; characters the tokenizer lacks are
            errors (strict) or skipped lines.
        speed_factors: speed perturbation factors drawn uniformly per item (training).
        edge_noise_seconds: up to this many seconds (uniform, per side) of Gaussian noise at
            the utterance's noise floor (the RMS of its quietest 25 ms) added before and after
            it (training): the model cannot learn that speech starts at the first frame, and
            recognises utterances cut from longer recordings with some silence around them.
        concat_prob: probability that a training item is followed by another utterance of
            the manifest (drawn at random) after a gap of up to 0.3 s of noise at their
            noise floor, with the two transcripts joined: the model learns utterance
            boundaries inside its input, as in a segment cut from a long recording (Lhotse's
            and icefall's cut concatenation).
    """

    def __init__(
        self,
        manifest: str | Path,
        tokenizer: Tokenizer | None = None,
        sample_rate: int = SAMPLE_RATE,
        strict: bool = True,
        min_duration: float | None = None,
        max_duration: float | None = None,
        require_text: bool = True,
        speed_factors: tuple[float, ...] = (),
        edge_noise_seconds: float = 0.0,
        concat_prob: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.manifest = Path(manifest)
        self.strict = strict
        self.seed = seed
        self.failed_loads = 0
        entries, self.report = read_manifest(
            manifest, strict, min_duration, max_duration, require_text=require_text
        )
        if tokenizer is not None:
            entries = self._check_vocabulary(entries, tokenizer, strict)
        self.entries = entries
        self.tokenizer = tokenizer
        self.sample_rate = sample_rate
        self.speed_factors = tuple(speed_factors)
        if edge_noise_seconds < 0:
            raise ConfigError(f"edge_noise_seconds must be >= 0, got {edge_noise_seconds}")
        self.edge_noise_seconds = edge_noise_seconds
        if not 0.0 <= concat_prob <= 1.0:
            raise ConfigError(f"concat_prob must be within [0, 1], got {concat_prob}")
        self.concat_prob = concat_prob

    def _check_vocabulary(
        self, entries: list[ManifestEntry], tokenizer: Tokenizer, strict: bool
    ) -> list[ManifestEntry]:
        kept = []
        for entry in entries:
            unknown = tokenizer.unknown_symbols(entry.text) if entry.text else set()
            if unknown:
                detail = f"text has symbols the tokenizer lacks: {''.join(sorted(unknown))!r}"
                if strict:
                    raise ManifestError(
                        f"{self.manifest}, line {entry.line}: {detail} (normalise the text, "
                        "use a tokenizer trained on it, or set strict: false)"
                    )
                self.report.skipped["unknown symbols"] += 1
                continue
            kept.append(entry)
        if len(kept) < len(entries):
            log.warning(
                "%s: skipped %d lines with symbols outside the tokenizer",
                self.manifest,
                len(entries) - len(kept),
            )
        self.report.kept = len(kept)
        return kept

    @property
    def durations(self) -> list[float]:
        return [entry.duration for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int | tuple[int, int]) -> dict | None:
        """One utterance. ``index`` may be ``(index, epoch)`` (see DurationBatchSampler's
        ``with_epoch``): speed perturbation then depends only on the seed, epoch and index.

        A file that fails to load (say, corrupt past its header) raises :class:`AudioError`
        naming it when strict; otherwise it is logged and ``None`` is returned, which
        :func:`collate_batch` drops.
        """
        epoch = None
        if isinstance(index, tuple):
            index, epoch = index
        entry = self.entries[index]
        audio = self._load(entry)
        if audio is None:
            return None
        rng = random.Random(f"{self.seed}:{epoch}:{index}") if epoch is not None else random
        text, key = entry.text or "", utterance_key(entry)
        if self.concat_prob and len(self.entries) > 1 and rng.random() < self.concat_prob:
            other = self.entries[(index + rng.randrange(1, len(self.entries))) % len(self.entries)]
            second = self._load(other)
            if second is not None:
                floor = min(noise_floor(audio, self.sample_rate),
                            noise_floor(second, self.sample_rate))
                gap = np.random.default_rng(rng.getrandbits(32)).standard_normal(
                    int(rng.uniform(0.0, 0.3) * self.sample_rate)) * floor
                audio = np.concatenate([audio, gap.astype(np.float32), second])
                text = f"{text} {other.text or ''}".strip()
                key = f"{key}+{utterance_key(other)}"
        return make_item(audio, text, index, key, rng, self.tokenizer, self.speed_factors,
                         self.edge_noise_seconds, self.sample_rate)

    def _load(self, entry: ManifestEntry) -> np.ndarray | None:
        """An entry's waveform; None for an unloadable file when not strict (counted)."""
        try:
            return load_audio(
                entry.audio_filepath,
                self.sample_rate,
                offset=entry.offset,
                duration=entry.duration if entry.is_segment else None,
            )
        except AudioError as error:
            if self.strict:
                raise AudioError(
                    f"{self.manifest}, line {entry.line}: {error} (fix or remove the file, or "
                    "set strict: false to skip it)"
                ) from None
            self.failed_loads += 1
            log.warning("skipped unloadable audio (%s); %d so far", error, self.failed_loads)
            return None


def make_item(audio: np.ndarray, text: str, index: int, key: str, rng: random.Random | object,
              tokenizer: Tokenizer | None, speed_factors: tuple[float, ...] = (),
              edge_noise_seconds: float = 0.0, sample_rate: int = SAMPLE_RATE) -> dict:
    """One training or evaluation item from an utterance's waveform: speed perturbation (a
    factor drawn from ``speed_factors`` with ``rng``), edge noise, token ids. ``key`` becomes
    :func:`speed_key` of the factor drawn, the key a teacher cache stores that audio under."""
    factor = 1.0
    if speed_factors:
        factor = rng.choice(speed_factors)
        audio = speed_perturb(audio, factor, sample_rate)
    if edge_noise_seconds:
        audio = add_edge_noise(audio, edge_noise_seconds, sample_rate, rng)
    item = {"audio": torch.from_numpy(audio), "text": text, "index": index,
            "key": speed_key(key, factor)}
    if tokenizer is not None and text:
        item["tokens"] = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    return item


def noise_floor(audio: np.ndarray, sample_rate: int) -> float:
    """RMS of the quietest 25 ms of ``audio`` (0 for audio shorter than that)."""
    frame = max(1, sample_rate // 40)
    frames = len(audio) // frame
    if not frames:
        return 0.0
    power = (audio[: frames * frame].astype(np.float64).reshape(frames, frame) ** 2).mean(1)
    return float(np.sqrt(power.min()))


def add_edge_noise(audio: np.ndarray, max_seconds: float, sample_rate: int,
                   rng: random.Random) -> np.ndarray:
    """``audio`` with up to ``max_seconds`` (uniform, drawn per side) of Gaussian noise before
    and after it, at its :func:`noise_floor` (digital silence stays silent)."""
    floor = noise_floor(audio, sample_rate)
    noise = np.random.default_rng(rng.getrandbits(32))
    before, after = (int(rng.uniform(0, max_seconds) * sample_rate) for _ in range(2))
    return np.concatenate([
        (noise.standard_normal(before) * floor).astype(np.float32), audio,
        (noise.standard_normal(after) * floor).astype(np.float32)])


def duration_batches(entries: list[ManifestEntry] | list[float], batch_seconds: float,
                     max_batch_size: int | None = None) -> list[list[int]]:
    """Indices of ``entries`` (or of durations in seconds) sorted by duration (stable: equal
    durations keep their order) and cut in that order into batches whose padded audio
    (longest x count) stays under ``batch_seconds`` and, when given, whose size stays at most
    ``max_batch_size``."""
    durations = [e if isinstance(e, (int, float)) else e.duration for e in entries]
    order = sorted(range(len(durations)), key=durations.__getitem__)
    batches: list[list[int]] = []
    batch: list[int] = []
    for index in order:  # ascending: the utterance is the batch's longest
        too_long = durations[index] * (len(batch) + 1) > batch_seconds
        too_many = max_batch_size is not None and len(batch) >= max_batch_size
        if batch and (too_long or too_many):
            batches.append(batch)
            batch = []
        batch.append(index)
    if batch:
        batches.append(batch)
    return batches


def collate_batch(items: list[dict | None]) -> dict | None:
    """Pad a list of dataset items into a batch.

    ``None`` items (audio that failed to load with ``strict: false``) are dropped; a batch
    with none left is ``None``, which the training and validation steps skip.

    Returns a dict with ``audio`` (B, S), ``audio_lengths`` (B,), ``texts``, ``indices`` (B,),
    ``keys`` (utterance ids, see :func:`utterance_key`) and, when items carry tokens,
    ``targets`` (B, U) padded with ``<pad>`` and ``target_lengths`` (B,); when items carry
    stored teacher posteriors (shards with a teacher cache), ``teacher`` (:func:`pad_teacher`).
    """
    items = [item for item in items if item is not None]
    if not items:
        return None
    audio, audio_lengths = pad_sequences([item["audio"] for item in items])
    batch = {
        "audio": audio,
        "audio_lengths": audio_lengths,
        "texts": [item["text"] for item in items],
        "indices": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "keys": [item["key"] for item in items],
    }
    if all("tokens" in item for item in items):
        targets, target_lengths = pad_sequences(
            [item["tokens"] for item in items], pad_value=PAD_ID, min_length=1)
        batch["targets"] = targets
        batch["target_lengths"] = target_lengths
    if all("teacher" in item for item in items):
        batch["teacher"] = pad_teacher([item["teacher"] for item in items])
    return batch


def pad_teacher(outputs: list[tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored teacher posteriors of a batch, ``(values (T, k), indices (T, k))`` per utterance
    (k may differ), as ``values`` (B, T, k) padded with -inf (probability 0), ``indices``
    (B, T, k) padded with 0 and ``lengths`` (B,)."""
    frames = max(v.shape[0] for v, _ in outputs)
    k = max(v.shape[1] for v, _ in outputs)
    values = torch.full((len(outputs), frames, k), float("-inf"))
    indices = torch.zeros(len(outputs), frames, k, dtype=torch.long)
    for row, (v, i) in enumerate(outputs):
        values[row, : v.shape[0], : v.shape[1]] = v
        indices[row, : i.shape[0], : i.shape[1]] = i
    lengths = torch.tensor([v.shape[0] for v, _ in outputs], dtype=torch.long)
    return values, indices, lengths
