"""Any recogniser as a sequence-level teacher: a small interface for ``asrkd pseudo-label``.

A :class:`Transcriber` turns waveforms into :class:`Transcript` s (text, a confidence on one
scale, and the number of units it was averaged over). ``pseudo-label`` filters and writes
them whatever produced them, which is Distil-Whisper's pseudo-label route for any teacher:

* :class:`ModelTranscriber`: an asrkd model (an imported NeMo one included);
* :class:`HFCTCTranscriber`: a Hugging Face CTC model folder (wav2vec2, HuBERT, ... with
  ``AutoModelForCTC`` and its processor);
* :class:`HFSeq2SeqTranscriber`: a Hugging Face speech seq2seq folder (Whisper, ... with
  ``AutoModelForSpeechSeq2Seq`` and its processor), greedy generation.

The openai-whisper and faster-whisper packages are not adapted (yet); they fit behind the same
interface.

Hugging Face models load from a local folder only (``local_files_only``: nothing is
downloaded at run time) and need the optional ``transformers`` package
(``pip install asrkd[hf]``). :func:`load_transcriber` reads the command line's teacher spec.

Confidence is the average log-probability per emitted unit, the scale of
:func:`asrkd.training.pseudo_labels.per_token_confidence`: CTC, the best path's log-probability
over all frames divided by the emitted tokens; seq2seq, the generated tokens'
log-probabilities (end of text included) averaged over them, as for asrkd's attention decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from asrkd.errors import UserError

HF_KINDS = ("hf-ctc", "hf-seq2seq")


@dataclass(frozen=True)
class Transcript:
    """One utterance's transcript: ``text``, ``confidence`` (average log-probability per
    unit) and ``units`` (tokens emitted; 0 for an empty transcript)."""

    text: str
    confidence: float
    units: int


@runtime_checkable
class Transcriber(Protocol):
    """What ``pseudo-label`` needs from a teacher."""

    name: str
    sample_rate: int

    def transcribe(self, audio: list[np.ndarray]) -> list[Transcript]:
        """Transcripts of a batch of mono float32 waveforms at ``sample_rate``."""
        ...


class ModelTranscriber:
    """An asrkd model decoding with ``method`` (None: its default); ``role`` names the setting
    in the error raised when the method does not fit the model."""

    def __init__(self, model, method: str | None = None, beam_size: int = 4,  # noqa: ANN001
                 role: str = "method") -> None:
        from asrkd.training.pseudo_labels import _check_method

        self.model = model.eval()
        self.method = method or model.decoder_method()
        _check_method(model, self.method, role)
        self.beam_size = beam_size
        self.sample_rate = model.features.config.sample_rate
        self.name = f"asrkd {self.method}"
        config = model.config
        self.length_penalty = config.decoding.length_penalty if config is not None else 1.0

    def transcribe(self, audio: list[np.ndarray]) -> list[Transcript]:
        from asrkd.models.common import pad_sequences
        from asrkd.training.pseudo_labels import per_token_confidence

        batch, lengths = pad_sequences([torch.as_tensor(a) for a in audio])
        found = self.model.infer(batch, lengths, method=self.method, beam_size=self.beam_size)
        return [Transcript(h.text, per_token_confidence(h, self.method, self.length_penalty),
                           len(h.tokens)) for h in found]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face teachers need the transformers package: pip install "
                        "'asrkd[hf]' (or pip install transformers, with torch kept pinned)"
                        ) from None
    return transformers


def _local_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not a local Hugging Face model folder (no config.json); "
                        "models are never downloaded at run time, save one with "
                        "save_pretrained() first")
    return folder


class _HFBase:
    def __init__(self, folder: str | Path, auto_model: str) -> None:
        transformers = _transformers()
        folder = _local_folder(folder)
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(
                folder, local_files_only=True)
            self.model = getattr(transformers, auto_model).from_pretrained(
                folder, local_files_only=True).eval()
        except (OSError, ValueError) as error:
            raise UserError(f"{folder}: cannot load a {auto_model} with its processor "
                            f"({error})") from None
        extractor = getattr(self.processor, "feature_extractor", self.processor)
        self.sample_rate = int(extractor.sampling_rate)
        self.name = f"{self.model.config.model_type} ({folder.name})"

    def _inputs(self, audio: list[np.ndarray]) -> dict:
        return self.processor([np.asarray(a, dtype=np.float32) for a in audio],
                              sampling_rate=self.sample_rate, return_tensors="pt",
                              padding=True, return_attention_mask=True)


class HFCTCTranscriber(_HFBase):
    """A Hugging Face CTC model (``AutoModelForCTC``), greedy best path."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__(folder, "AutoModelForCTC")
        self.blank_id = int(self.model.config.pad_token_id)

    def transcribe(self, audio: list[np.ndarray]) -> list[Transcript]:
        inputs = self._inputs(audio)
        with torch.no_grad():
            logits = self.model(inputs["input_values"],
                                attention_mask=inputs.get("attention_mask")).logits
        log_probs = logits.float().log_softmax(-1)
        samples = torch.tensor([len(a) for a in audio])
        frames = self.model._get_feat_extract_output_lengths(samples).tolist()
        best, ids = log_probs.max(-1)
        out = []
        for row, valid in enumerate(frames):
            path = ids[row, :valid].tolist()
            tokens = [t for i, t in enumerate(path)
                      if t != self.blank_id and (i == 0 or t != path[i - 1])]
            text = self.processor.decode(ids[row, :valid]) if tokens else ""
            score = float(best[row, :valid].sum())
            out.append(Transcript(text.strip(), score / max(len(tokens), 1), len(tokens)))
        return out


class HFSeq2SeqTranscriber(_HFBase):
    """A Hugging Face speech seq2seq model (``AutoModelForSpeechSeq2Seq``: Whisper, ...),
    greedy generation of up to ``max_new_tokens`` with the model's generation config."""

    def __init__(self, folder: str | Path, max_new_tokens: int = 128) -> None:
        super().__init__(folder, "AutoModelForSpeechSeq2Seq")
        self.max_new_tokens = max_new_tokens

    def transcribe(self, audio: list[np.ndarray]) -> list[Transcript]:
        inputs = self._inputs(audio)
        features = inputs.get("input_features", inputs.get("input_values"))
        # Room for the decoder prompt (Whisper's start, language, task, timestamp tokens).
        limit = getattr(self.model.config, "max_target_positions", None)
        max_new = self.max_new_tokens if limit is None else min(self.max_new_tokens, limit - 4)
        with torch.no_grad():
            generated = self.model.generate(
                features, attention_mask=inputs.get("attention_mask"), do_sample=False,
                num_beams=1, max_new_tokens=max_new, output_scores=True,
                return_dict_in_generate=True)
            # log p of each generated token (the decoder prompt is not generated).
            scores = self.model.compute_transition_scores(
                generated.sequences, generated.scores, normalize_logits=True)
        new = generated.sequences[:, -scores.shape[1]:]
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        out = []
        for row in range(new.shape[0]):
            tokens = new[row].tolist()
            # Up to and including the first end of text; what follows is padding.
            end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens) - 1) + 1
            logp = scores[row, :end].float()
            text = self.processor.batch_decode(new[row: row + 1, :end],
                                               skip_special_tokens=True)[0].strip()
            units = sum(t not in eos for t in tokens[:end])
            out.append(Transcript(text, float(logp.mean()), units if text else 0))
        return out


def load_transcriber(spec: str, method: str | None = None, beam_size: int = 4) -> Transcriber:
    """The teacher named on the command line: an asrkd checkpoint path, or ``hf-ctc:FOLDER`` /
    ``hf-seq2seq:FOLDER`` for a local Hugging Face CTC / speech seq2seq model folder."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in HF_KINDS:
        if method is not None:
            raise UserError(f"--method applies to asrkd checkpoints, not to {kind} teachers")
        return HFCTCTranscriber(rest) if kind == "hf-ctc" else HFSeq2SeqTranscriber(rest)
    from asrkd.models.e2e_asr import load_checkpoint

    return ModelTranscriber(load_checkpoint(spec), method, beam_size)


__all__ = ["HFCTCTranscriber", "HFSeq2SeqTranscriber", "ModelTranscriber", "Transcriber",
           "Transcript", "load_transcriber"]
