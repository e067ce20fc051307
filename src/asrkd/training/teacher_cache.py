"""Offline teacher outputs: run the teacher once, keep its top-k CTC log-probs, distil from them.

Frame-level CTC KD (:class:`~asrkd.losses.kd.CTCFrameKD`) runs the teacher on every
training step. When the teacher's input never changes from epoch to epoch its outputs do not
either, so :func:`cache_teacher` runs it once over a manifest and stores, per utterance and
per valid encoder frame, the ``k`` largest CTC log-probabilities and their token ids.
:class:`TeacherCache` pads them into batches and :class:`CachedCTCFrameKD` is the
``CTCFrameKD`` loss computed from them (equal to it when ``k`` is the vocabulary size).

**Validity constraint.** A cache is only valid when the teacher's input is deterministic: the
same waveform in, the same posteriors out. That holds here because the teacher runs in eval
mode, where SpecAugment is off and dropout is inactive (SpecAugment is part of the model, so
the student's masks never reach the teacher's input), and because every audio-level change
the training set makes is one of a few fixed speed factors (``data.speed_factors``):
:func:`cache_teacher` runs the teacher on each factor's copy of every utterance and stores it
under :func:`~asrkd.data.dataset.speed_key`, the key the training set gives that copy. A
training set whose speed factors the cache lacks is refused before training
(:meth:`TeacherCache.check_speed_factors`).

File format (one file, loadable with ``torch.load(weights_only=True)``): a dict of plain
containers and tensors::

    format               "asrkd-teacher-cache-1"
    teacher_checkpoint   str | None
    manifest             str
    vocab_size, subsampling_factor, top_k   int
    temperature          float  (values are top-k of log_softmax(logits / temperature))
    speed_factors        list[float], the speed copies cached (absent in older files: [1.0])
    keys                 list[str], one per utterance and speed factor (see :func:`speed_key`)
    lengths              (N,) int64 valid encoder frames per utterance
    offsets              (N + 1,) int64 start row of each utterance in values / indices
    values               (sum(lengths), k) float32 log-probs, largest first
    indices              (sum(lengths), k) int16 (int32 when V > 32767) token ids
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from asrkd.data.audio_processing import speed_perturb
from asrkd.data.dataset import ManifestDataset, duration_batches, speed_key, utterance_key
from asrkd.data.tokenizer import BLANK_ID
from asrkd.errors import UserError
from asrkd.losses.kd.common import (
    SoftenedKD,
    check_blank_weight,
    check_kd_compatibility,
    check_temperature,
    delay_frames,
    kl_from_log_probs,
    reduce_losses,
    upcast_half,
)
from asrkd.models.common import make_pad_mask, pad_sequences
from asrkd.models.e2e_asr import E2EASR, ASROutput, load_checkpoint

CACHE_FORMAT = "asrkd-teacher-cache-1"


def cache_teacher(
    checkpoint: str | Path | E2EASR,
    manifest: str | Path,
    out_path: str | Path,
    top_k: int = 8,
    batch_seconds: float = 120.0,
    temperature: float = 1.0,
    device: str | torch.device = "cpu",
    speed_factors: Sequence[float] = (),
) -> dict:
    """Run the teacher over a manifest and store its top-k CTC log-probs in one file.

    Args:
        checkpoint: teacher checkpoint path, or an :class:`E2EASR` (it needs a CTC head).
        manifest: NeMo JSONL manifest; ``text`` is not needed (unlabelled audio is fine).
        out_path: cache file to write (atomically: temp file + rename).
        top_k: log-probs kept per frame (clamped to the vocabulary size V; V keeps them all).
        batch_seconds: padded audio seconds per teacher batch.
        temperature: stored values are the top-k of ``log_softmax(logits / temperature)``.
            Keep the default 1.0: the top-k support does not depend on it and
            :class:`CachedCTCFrameKD` re-softens at its own temperature anyway.
        device: where the teacher runs.
        speed_factors: the training set's ``data.speed_factors``: the teacher also runs on
            each factor's speed-perturbed copy of every utterance (empty: the audio as is).

    Returns:
        ``{"path", "utterances", "speed_factors", "frames", "mb", "seconds"}``; utterances
        counts each speed copy.
    """
    start = time.perf_counter()
    check_temperature(temperature)
    if top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    model, checkpoint_name = _prepare_teacher(checkpoint)
    was_training = model.training
    model.eval()  # no SpecAugment, no dropout: the outputs are a function of the audio alone
    model.to(device)
    vocab = model.vocab_size
    k = min(int(top_k), vocab)
    index_dtype = torch.int16 if vocab <= torch.iinfo(torch.int16).max else torch.int32

    factors = check_speed_factors(speed_factors)
    # The dataset reads the audio as is; each speed copy is made here, as the training set does.
    dataset = ManifestDataset(manifest, require_text=False)
    keys = [utterance_key(entry) for entry in dataset.entries]
    first = {}  # duplicate lines share a key; the teacher runs on the first one only
    for index, key in enumerate(keys):
        first.setdefault(key, index)
    entries = [dataset.entries[i] for i in first.values()]
    wanted = list(first.values())

    per_copy: dict[tuple[float, int], tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for batch in duration_batches(entries, batch_seconds):
                items = [dataset[wanted[i]] for i in batch]
                for factor in factors:
                    outputs = _teacher_topk(model, [item["audio"].numpy() for item in items],
                                            factor, k, temperature, device,
                                            dataset.sample_rate)
                    for item, (values, indices) in zip(items, outputs, strict=True):
                        per_copy[factor, item["index"]] = (values, indices.to(index_dtype))
    finally:
        model.train(was_training)

    # Manifest order, each utterance's speed copies together.
    cache_keys = [speed_key(key, factor) for key in first for factor in factors]
    ordered = [per_copy[factor, i] for i in wanted for factor in factors]
    lengths_t = torch.tensor([v.shape[0] for v, _ in ordered], dtype=torch.long)
    offsets = torch.zeros(len(ordered) + 1, dtype=torch.long)
    offsets[1:] = lengths_t.cumsum(0)
    payload = {
        "format": CACHE_FORMAT,
        "teacher_checkpoint": checkpoint_name,
        "manifest": str(Path(manifest).resolve()),
        "vocab_size": vocab,
        "subsampling_factor": model.subsampling_factor,
        "frame_timing": frame_timing(model),
        "top_k": k,
        "temperature": float(temperature),
        "speed_factors": list(factors),
        "keys": cache_keys,
        "lengths": lengths_t,
        "offsets": offsets,
        "values": torch.cat([v for v, _ in ordered]) if ordered else torch.zeros(0, k),
        "indices": (
            torch.cat([i for _, i in ordered]) if ordered else torch.zeros(0, k, dtype=index_dtype)
        ),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out_path)  # readers never see a half-written cache
    return {
        "path": str(out_path),
        "utterances": len(ordered),
        "speed_factors": list(factors),
        "frames": int(lengths_t.sum()),
        "mb": round(out_path.stat().st_size / 2**20, 3),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _prepare_teacher(checkpoint: str | Path | E2EASR) -> tuple[E2EASR, str | None]:
    """The teacher model of a checkpoint path (or the model itself) and the path's name."""
    if isinstance(checkpoint, E2EASR):
        model, name = checkpoint, None
    else:
        model, name = load_checkpoint(checkpoint), str(Path(checkpoint).resolve())
    if model.ctc is None:
        raise UserError("the teacher has no CTC head; a teacher cache stores CTC posteriors")
    return model, name


def _teacher_topk(model: E2EASR, waves: Sequence, factor: float, k: int, temperature: float,
                  device: str | torch.device, sample_rate: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's top-k CTC log-probs over each valid frame of each waveform (numpy, at
    ``sample_rate``) played at speed ``factor``: ``(values (T, k) float32, indices (T, k))``,
    largest first. ``model`` is in eval mode, under no_grad."""
    audio, lengths = pad_sequences(
        [torch.from_numpy(speed_perturb(wave, factor, sample_rate)) for wave in waves])
    out = model(audio.to(device), lengths.to(device))
    log_probs = torch.log_softmax(upcast_half(out.ctc_logits) / temperature, dim=-1)
    values, indices = log_probs.topk(k, dim=-1)  # (B, T, k), largest first
    return [(values[row, :n].float().cpu(), indices[row, :n].cpu())
            for row, n in enumerate(out.encoder_lengths.tolist())]


def check_speed_factors(speed_factors: Sequence[float]) -> tuple[float, ...]:
    """The distinct speed factors of a cache, sorted; ``()`` means the audio as is (1.0)."""
    factors = tuple(sorted({float(f) for f in speed_factors})) or (1.0,)
    bad = [f for f in factors if not (math.isfinite(f) and f > 0)]
    if bad:
        raise UserError(f"speed factors must be positive numbers, got {bad}")
    return factors


FRAME_TIMING = ("sample_rate", "hop_length", "count_last_frame")


def frame_timing(model: E2EASR) -> dict:
    """What decides which audio feature frame t covers and how many frames count (see
    :func:`check_frame_timing`)."""
    config = model.features.config
    return {name: getattr(config, name) for name in FRAME_TIMING}


def check_frame_timing(teacher: E2EASR | dict, student: E2EASR) -> None:
    """Raise a UserError unless feature frame t of the teacher (a model, or the
    :func:`frame_timing` a teacher cache recorded) and of the student cover the same audio
    (sample rate, hop) and both count the same valid frames.

    Each model computes its own features from the waveform, so everything else about them (mel
    count and scale, normalisation, NeMo's pre-emphasis) may differ between teacher and student:
    frame-level KD only needs its frames to line up, which a student made with asrkd's default
    features for a NeMo teacher would not (NeMo counts one frame fewer per utterance)."""
    t = teacher if isinstance(teacher, dict) else frame_timing(teacher)
    s = frame_timing(student)
    differ = [f"{name} {t[name]} (teacher) vs {s[name]} (student)"
              for name in FRAME_TIMING if name in t and t[name] != s[name]]
    if differ:
        raise UserError("frame-level KD needs the teacher's and the student's feature frames to "
                        "line up: features." + "; features.".join(differ))


class TeacherCacheKeyError(UserError, KeyError):
    """An utterance missing from a teacher cache (message printed as is, not repr-quoted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CacheChecks:
    """What a stored teacher (a :class:`TeacherCache` or a sharded one) is checked against
    before training: the student's vocabulary, frame rate and feature frames, and the training
    set's speed factors. Subclasses set ``path``, ``vocab_size``, ``subsampling_factor``,
    ``frame_timing`` and ``speed_factors``."""

    path: Path
    vocab_size: int
    subsampling_factor: int
    frame_timing: dict
    speed_factors: tuple[float, ...]

    def check_compatible(self, student: E2EASR) -> None:
        """Raise a ValueError if the student's vocabulary or frame rate differs from the
        teacher's, or a UserError if its feature frames do not line up with the teacher's
        (then cached frames cannot be matched to the student's)."""
        check_kd_compatibility(
            self.vocab_size,
            student.vocab_size,
            self.subsampling_factor,
            student.subsampling_factor,
        )
        check_frame_timing(self.frame_timing, student)

    def check_speed_factors(self, speed_factors: Sequence[float]) -> None:
        """Raise a UserError unless the cache holds every speed copy a training set read
        with ``speed_factors`` (``data.speed_factors``; empty: none) will produce."""
        needed = check_speed_factors(speed_factors)
        missing = [f for f in needed
                   if not any(math.isclose(f, have) for have in self.speed_factors)]
        if missing:
            have = ", ".join(f"{f:g}" for f in self.speed_factors)
            raise UserError(
                f"the training set is read at speed factors {[f'{f:g}' for f in needed]} but "
                f"the teacher cache {self.path} holds only {have}: rebuild it with "
                "`asrkd cache-teacher --speed-factors "
                + " ".join(f"{f:g}" for f in needed) + "`"
            )


class TeacherCache(CacheChecks):
    """A teacher cache written by :func:`cache_teacher`, read safely (``weights_only=True``).

    Attributes:
        path, teacher_checkpoint, manifest, vocab_size, subsampling_factor, top_k,
        temperature, speed_factors: the file's metadata.
        keys: utterance keys (see :func:`speed_key`), in manifest order, each utterance's
            speed copies together.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"teacher cache {self.path} not found: build it with `asrkd cache-teacher`"
            )
        payload = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
            raise UserError(f"{self.path}: not an asrkd teacher cache ({CACHE_FORMAT})")
        self.teacher_checkpoint: str | None = payload["teacher_checkpoint"]
        self.manifest: str = payload["manifest"]
        self.vocab_size: int = int(payload["vocab_size"])
        self.subsampling_factor: int = int(payload["subsampling_factor"])
        # Absent from caches written before it was recorded (then not checked).
        self.frame_timing: dict = dict(payload.get("frame_timing", {}))
        self.top_k: int = int(payload["top_k"])
        self.temperature: float = float(payload["temperature"])
        self.speed_factors: tuple[float, ...] = tuple(
            float(f) for f in payload.get("speed_factors", [1.0]))
        self.keys: list[str] = list(payload["keys"])
        self._row = {key: row for row, key in enumerate(self.keys)}
        self._lengths: torch.Tensor = payload["lengths"]
        self._offsets: torch.Tensor = payload["offsets"]
        self._values: torch.Tensor = payload["values"]
        self._indices: torch.Tensor = payload["indices"]

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self._row

    def utterance(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One utterance's ``(values (T, k), indices (T, k) int64)``."""
        row = self._row.get(key)
        if row is None:
            raise TeacherCacheKeyError(
                f"utterance {key} is not in the teacher cache {self.path}: rebuild it with "
                "`asrkd cache-teacher` on the manifest you train on"
            )
        a, b = int(self._offsets[row]), int(self._offsets[row + 1])
        return self._values[a:b], self._indices[a:b].long()

    def batch(
        self, keys: list[str], num_frames: int, vocab_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded teacher outputs for a batch of utterances.

        Args:
            keys: B utterance keys (:func:`utterance_key` of each manifest entry).
            num_frames: T, the student's padded frame count.
            vocab_size: the student's V (checked against the teacher's).

        Returns:
            ``values`` (B, T, k) float32, ``indices`` (B, T, k) int64, ``lengths`` (B,) int64.
            Values are the teacher's temperature-1 log-probs (up to a per-frame constant when
            the cache was written at another temperature, which :class:`CachedCTCFrameKD`'s
            renormalisation removes). Padding: values 0, indices 0 (blank).
        """
        if int(vocab_size) != self.vocab_size:
            raise UserError(
                f"vocabulary size {self.vocab_size} (teacher cache {self.path}) vs {vocab_size} "
                "(student); KD needs one shared vocabulary"
            )
        k = self.top_k
        values = torch.zeros(len(keys), num_frames, k, dtype=torch.float32)
        indices = torch.zeros(len(keys), num_frames, k, dtype=torch.long)
        lengths = torch.zeros(len(keys), dtype=torch.long)
        for b, key in enumerate(keys):
            v, i = self.utterance(key)
            if v.shape[0] > num_frames:
                raise UserError(
                    f"utterance {key} has {v.shape[0]} cached teacher frames but the batch has "
                    f"only {num_frames}: the audio or the subsampling differs from the cache's"
                )
            values[b, : v.shape[0]] = v
            indices[b, : v.shape[0]] = i
            lengths[b] = v.shape[0]
        # Back to the temperature-1 scale: t * log_softmax(z / t) = z - const per frame.
        if self.temperature != 1.0:
            values = values * self.temperature
        return values, indices, lengths


class CachedCTCFrameKD(SoftenedKD):
    """:class:`~asrkd.losses.kd.CTCFrameKD` with the teacher given as top-k log-probs.

    Teacher distribution per frame: ``p = softmax(values / tau)`` over its k kept tokens
    (renormalised over the kept support); student: ``q = log_softmax(student_logits / tau)``
    over the full vocabulary, read at the kept tokens. Per frame
    ``KL = sum_{j in top-k} p_j (log p_j - log q_j)``; the loss is ``tau^2 * sum_f w_f KL_f``
    over the valid frames, divided by the number of utterances (``reduction="utterance"``) or
    by ``sum_f w_f`` (``"frame"``), with ``w_f = blank_weight`` where the teacher's argmax is
    blank and 1 elsewhere. With k = V this is exactly
    ``CTCFrameKD(tau, blank_weight, reduction=...)(student_logits, teacher_logits, lengths)``:
    dividing temperature-1 log-probs by tau and renormalising equals ``softmax(logits / tau)``.
    With k < V the student is still normalised over all V, so the loss also pushes its mass
    out of tokens the teacher considered negligible.

    Args:
        temperature: softmax temperature tau > 0.
        blank_weight: weight of frames whose teacher argmax is blank (1.0 = no change).
        reduction: ``"utterance"`` or ``"frame"``.
        delay: frames by which the teacher's posteriors are delayed (see ``CTCFrameKD``).
    """

    def __init__(
        self, temperature: float = 2.0, blank_weight: float = 1.0, reduction: str = "utterance",
        delay: int = 0,
    ) -> None:
        super().__init__(temperature, reduction)
        self.blank_weight = check_blank_weight(blank_weight)
        self.delay = int(delay)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_values: torch.Tensor,
        teacher_indices: torch.Tensor,
        lengths: torch.Tensor,
        teacher_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            student_logits: (B, T, V) CTC logits of the student.
            teacher_values: (B, T, k) teacher log-probs (temperature 1, any per-frame shift).
            teacher_indices: (B, T, k) their token ids.
            lengths: (B,) valid student frames.
            teacher_lengths: (B,) cached teacher frames; if given they must equal ``lengths``
                (a mismatch means the cache does not belong to this audio).

        Returns:
            Scalar loss.
        """
        if teacher_values.shape != teacher_indices.shape:
            raise ValueError(
                f"teacher values {tuple(teacher_values.shape)} and indices "
                f"{tuple(teacher_indices.shape)} differ"
            )
        if teacher_values.dim() != 3 or teacher_values.shape[:2] != student_logits.shape[:2]:
            raise ValueError(
                f"CachedCTCFrameKD: teacher (B, T, k) {tuple(teacher_values.shape)} does not "
                f"match student (B, T, V) {tuple(student_logits.shape)} on batch size / frames"
            )
        if teacher_values.shape[-1] > student_logits.shape[-1]:
            raise ValueError(
                f"teacher keeps {teacher_values.shape[-1]} tokens per frame but the student "
                f"vocabulary has only {student_logits.shape[-1]}"
            )
        if teacher_lengths is not None and not torch.equal(
            teacher_lengths.cpu().long(), lengths.cpu().long()
        ):
            raise ValueError(
                f"cached teacher frame counts {teacher_lengths.tolist()} differ from the "
                f"student's {lengths.tolist()}: the cache was built from other audio (speed "
                "perturbation?) or another frame rate; rebuild it with `asrkd cache-teacher`"
            )
        tau = self.temperature
        teacher_values = delay_frames(teacher_values, self.delay)
        teacher_indices = delay_frames(teacher_indices, self.delay)
        valid = ~make_pad_mask(lengths.to(student_logits.device), student_logits.shape[1])
        # Select valid frames first: padding never enters any arithmetic.
        student = upcast_half(student_logits[valid])  # (N, V)
        values = teacher_values.detach().to(student.device)[valid].to(student.dtype)  # (N, k)
        ids = teacher_indices.to(student.device)[valid].long()  # (N, k)
        log_p = torch.log_softmax(values / tau, dim=-1)
        log_q = torch.log_softmax(student / tau, dim=-1).gather(-1, ids)
        kl = kl_from_log_probs(log_p, log_q)  # (N,)
        weights = None
        if self.blank_weight != 1.0:
            # The teacher's argmax is the kept token with the largest log-prob (any order).
            argmax = ids.gather(-1, values.argmax(-1, keepdim=True)).squeeze(-1)
            weights = torch.where(
                argmax == BLANK_ID,
                torch.full_like(kl, self.blank_weight),
                torch.ones_like(kl),
            )
        return tau**2 * reduce_losses(kl, weights, len(lengths), self.reduction)


# ---------------------------------------------------------------------------------------------
# CLI: asrkd cache-teacher
# ---------------------------------------------------------------------------------------------


class CachedTeacher:
    """A teacher source (:class:`~asrkd.models.distillation.TeacherSource`) that reads stored
    posteriors instead of running the teacher: from a :class:`TeacherCache` by the batch's
    keys, or, with a sharded cache (:mod:`asrkd.training.teacher_shards`), those the shard
    loader put in the batch (``stored``). Returns them padded to the student's frames, as
    ``(values, indices, lengths)``."""

    teacher = None  # no model runs

    def __init__(self, cache: CacheChecks) -> None:
        self.cache = cache

    def __call__(self, audio: torch.Tensor, audio_lengths: torch.Tensor, targets: torch.Tensor,
                 target_lengths: torch.Tensor, *, keys: list[str] | None, student: ASROutput,
                 need_hidden: bool, training: bool,
                 stored: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        logits = student.ctc_logits
        if stored is not None:
            values, indices, lengths = stored
            values, indices = _fit_frames(values, indices, logits.shape[1])
        elif not isinstance(self.cache, TeacherCache):
            if training:
                raise UserError(
                    f"the sharded teacher cache {self.cache.path} is read by the shard loader: "
                    "train from data.train_shards (the shards it was written for)")
            return None  # validation batches come from manifests: ASR loss only
        else:
            if keys is None:
                raise ValueError("KD from a teacher cache needs the batch's utterance keys")
            if not training and not all(key in self.cache for key in keys):
                # Validation audio is usually not in a cache written over the training set: the
                # validation loss is then the student's ASR loss (checkpoints follow val_wer).
                return None
            values, indices, lengths = self.cache.batch(keys, logits.shape[1], logits.shape[-1])
        device = logits.device
        return values.to(device), indices.to(device), lengths.to(device)


def _fit_frames(values: torch.Tensor, indices: torch.Tensor, frames: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (B, T', k) teacher outputs padded (-inf, 0) or cut to the student's T frames
    (cut frames are padding: the loss checks the valid lengths agree)."""
    if values.shape[1] >= frames:
        return values[:, :frames], indices[:, :frames]
    pad = frames - values.shape[1]
    return (torch.nn.functional.pad(values, (0, 0, 0, pad), value=float("-inf")),
            torch.nn.functional.pad(indices, (0, 0, 0, pad)))


class CachedCTCKD(nn.Module):
    """The KD loss of a :class:`CachedTeacher`: :class:`CachedCTCFrameKD` on the student's
    CTC logits, as ``kd_ctc_kl`` and ``kd`` (times ``weight``)."""

    names = ("ctc_kl",)
    needs_hidden = False

    def __init__(self, temperature: float = 2.0, blank_weight: float = 1.0,
                 reduction: str = "utterance", weight: float = 1.0, delay: int = 0) -> None:
        super().__init__()
        self.loss = CachedCTCFrameKD(temperature, blank_weight, reduction, delay)
        self.weight = float(weight)

    def forward(self, student: ASROutput,
                teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                targets: torch.Tensor, target_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        values, indices, lengths = teacher
        kd = self.loss(student.ctc_logits, values, indices, student.encoder_lengths, lengths)
        return {"kd_ctc_kl": kd, "kd": self.weight * kd}


__all__ = [
    "CACHE_FORMAT",
    "CachedCTCFrameKD",
    "CachedCTCKD",
    "CachedTeacher",
    "TeacherCache",
    "TeacherCacheKeyError",
    "cache_teacher",
    "check_speed_factors",
    "duration_batches",
    "speed_key",
    "utterance_key",
]
