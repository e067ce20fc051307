"""E2EASR: features -> ResNet1D frontend -> FastConformer -> decoder (+ CTC head).

The model receives its parts (icefall's habit) and one builder, :func:`build_model`, makes
them from a frozen :class:`ModelConfig`. Checkpoints hold the config, the tokenizer and the
weights as plain containers, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from asrkd.config import ConfigError, from_dict, to_dict
from asrkd.data.audio_processing import (
    SAMPLE_RATE,
    FeatureConfig,
    LogMelFeatures,
    SpecAugment,
    SpecAugmentConfig,
    load_audio,
)
from asrkd.data.tokenizer import Tokenizer, tokenizer_from_dict
from asrkd.decoding import METHODS, strategy
from asrkd.errors import UserError
from asrkd.models.common import Hypothesis, pad_sequences
from asrkd.models.ctc import CTCConfig, CTCHead
from asrkd.models.encoder import FastConformerConfig, FastConformerEncoder
from asrkd.models.frontend import ResNet1D, ResNet1DConfig
from asrkd.models.lm import LMFusion
from asrkd.models.rnnt import JointInputs, RNNTConfig, RNNTransducer
from asrkd.models.transformer_decoder import (
    TransformerDecoder,
    TransformerDecoderConfig,
    make_decoder_io,
)
from asrkd.utils.io import atomic_save
from asrkd.utils.memory import check_memory, encoder_bytes, encoder_shape

CHECKPOINT_FORMAT = "asrkd-checkpoint-1"
DECODER_TYPES = ("transformer", "rnnt", "none")
FRONTEND_POSITIONS = ("features", "subsampled")
DECODING_METHODS = ("auto", *METHODS)


@dataclass(frozen=True)
class DecodingConfig:
    """How :meth:`E2EASR.infer` decodes by default (``auto``: CTC greedy for models with a CTC
    head, else the decoder's search; see :meth:`E2EASR.default_method`)."""

    method: str = "auto"
    beam_size: int = 4
    ctc_weight: float = 0.3  # joint CTC/attention scoring in attention beam search
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in DECODING_METHODS:
            raise ConfigError(f"decoding method {self.method!r} not in {DECODING_METHODS}")
        if self.beam_size < 1:
            raise ConfigError(f"decoding beam_size must be >= 1, got {self.beam_size}")
        if not 0.0 <= self.ctc_weight <= 1.0:
            raise ConfigError(f"decoding ctc_weight must be within [0, 1], got {self.ctc_weight}")


@dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer to build for a new model (trained on the training manifest's texts).

    BPE is the default because of the 8x subsampling: at 12.5 encoder frames per second,
    fast speech has more characters than frames, which makes character CTC impossible
    (the loss silently becomes zero); subwords average about three characters.
    """

    kind: str = "bpe"
    vocab_size: int = 256


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines an E2EASR model."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    spec_augment: SpecAugmentConfig | None = field(default_factory=SpecAugmentConfig)
    frontend: ResNet1DConfig | None = field(default_factory=ResNet1DConfig)
    # Where the ResNet1D frontend runs: "features" (on the log-mel frames, before the
    # encoder's subsampling) or "subsampled" (on the encoder's subsampled d_model sequence,
    # before the conformer blocks; its last stage then needs d_model channels).
    frontend_position: str = "features"
    encoder: FastConformerConfig = field(default_factory=FastConformerConfig)
    decoder: str = "transformer"
    # One config per component: the decoders' and CTC head's own classes (their vocabulary,
    # encoder width and special ids are filled in from the tokenizer and encoder).
    transformer: TransformerDecoderConfig = field(default_factory=TransformerDecoderConfig)
    rnnt: RNNTConfig = field(default_factory=RNNTConfig)
    ctc: bool = True
    ctc_head: CTCConfig = field(default_factory=CTCConfig)
    # Intermediate CTC (Lee & Watanabe 2021): in training, the outputs of these conformer
    # blocks (1-based) also go through the CTC head, and ASRLoss mixes their CTC losses in
    # (``asr_loss.inter_ctc_weight``). Inference and the parameters are unchanged.
    inter_ctc_layers: tuple[int, ...] = ()
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)

    def __post_init__(self) -> None:
        if self.decoder not in DECODER_TYPES:
            raise ConfigError(f"decoder must be one of {DECODER_TYPES}, got {self.decoder!r}")
        if self.frontend_position not in FRONTEND_POSITIONS:
            raise ConfigError(
                f"frontend_position must be one of {FRONTEND_POSITIONS}, "
                f"got {self.frontend_position!r}"
            )
        if (
            self.frontend_position == "subsampled"
            and self.frontend is not None
            and self.frontend.channels[-1] != self.encoder.d_model
        ):
            raise ConfigError(
                f"frontend_position: subsampled runs the frontend on the encoder's d_model "
                f"({self.encoder.d_model}) sequence, so its last channels must equal it, "
                f"not {self.frontend.channels[-1]}"
            )
        if self.inter_ctc_layers:
            if not self.ctc:
                raise ConfigError("inter_ctc_layers needs the CTC head (ctc: true)")
            bad = [i for i in self.inter_ctc_layers if not 1 <= i < self.encoder.n_layers]
            if bad:
                raise ConfigError(
                    f"inter_ctc_layers {list(self.inter_ctc_layers)}: each must be a conformer "
                    f"block before the last, 1..{self.encoder.n_layers - 1}"
                )
        if self.decoder == "none" and not self.ctc:
            raise ConfigError("a model needs a decoder or a CTC head (decoder: none, ctc: false)")


@dataclass
class ASROutput:
    """What :meth:`E2EASR.forward` returns.

    Attributes:
        encoder_out: (B, T', D) encoder states. encoder_lengths: (B,).
        ctc_logits: (B, T', V) raw CTC logits, or None without a CTC head.
        decoder_logits: attention decoder (B, U+1, V) under teacher forcing, or RNN-T joint
            (B, T', U+1, V); None without a decoder or without targets.
        decoder_type: "transformer", "rnnt" or "none".
        hidden_states: per-layer encoder outputs when asked for (distillation).
        inter_ctc_logits: (B, T', V) CTC logits of the ``inter_ctc_layers`` blocks, in
            training mode only (None otherwise).
        rnnt_joint: an RNN-T model's projected joint inputs instead of ``decoder_logits``
            when :meth:`E2EASR.forward` was called with ``rnnt_logits=False``.
    """

    encoder_out: torch.Tensor
    encoder_lengths: torch.Tensor
    ctc_logits: torch.Tensor | None = None
    decoder_logits: torch.Tensor | None = None
    decoder_type: str = "none"
    hidden_states: list[torch.Tensor] | None = None
    inter_ctc_logits: list[torch.Tensor] | None = None
    rnnt_joint: JointInputs | None = None


class E2EASR(nn.Module):
    """End-to-end recogniser assembled from its parts.

    Args:
        frontend: ResNet1D over log-mel frames, or None (features go straight to the encoder).
        encoder: FastConformer encoder.
        decoder: TransformerDecoder, RNNTransducer or None.
        ctc: CTC head or None.
        features: log-mel extractor (part of the model so inference needs nothing else).
        spec_augment: SpecAugment, applied in training mode only.
        tokenizer: turns token ids into text in :meth:`infer`.
        config: the :class:`ModelConfig` it was built from (kept for checkpoints).
    """

    def __init__(
        self,
        frontend: ResNet1D | None,
        encoder: FastConformerEncoder,
        decoder: TransformerDecoder | RNNTransducer | None = None,
        ctc: CTCHead | None = None,
        *,
        features: LogMelFeatures | None = None,
        spec_augment: SpecAugment | None = None,
        tokenizer: Tokenizer | None = None,
        config: ModelConfig | None = None,
    ) -> None:
        super().__init__()
        if decoder is None and ctc is None:
            raise ConfigError("E2EASR needs a decoder, a CTC head, or both")
        self.features = features or LogMelFeatures()
        self.spec_augment = spec_augment
        self.frontend = frontend
        self.encoder = encoder
        self.decoder = decoder
        self.ctc = ctc
        self.tokenizer = tokenizer
        self.config = config
        self.frontend_position = config.frontend_position if config is not None else "features"

    @property
    def decoder_type(self) -> str:
        if isinstance(self.decoder, TransformerDecoder):
            return "transformer"
        if isinstance(self.decoder, RNNTransducer):
            return "rnnt"
        return "none"

    @property
    def subsampling_factor(self) -> int:
        """Feature frames per encoder frame (frontend strides x encoder subsampling)."""
        factor = self.encoder.config.subsampling_factor
        if self.frontend is not None:
            for stride in self.frontend.config.strides:
                factor *= stride
        return factor

    @property
    def vocab_size(self) -> int:
        head = self.ctc if self.ctc is not None else self.decoder
        return head.config.vocab_size

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(
        self, audio: torch.Tensor, audio_lengths: torch.Tensor, return_hidden: bool = False
    ):
        """Waveforms (B, S) + lengths -> :class:`~asrkd.models.encoder.EncoderOutput`."""
        features, lengths = self.features(audio, audio_lengths)
        if self.spec_augment is not None:
            features = self.spec_augment(features, lengths)
        if self.frontend is not None and self.frontend_position == "features":
            features, lengths = self.frontend(features, lengths)
            return self.encoder(features, lengths, return_hidden=return_hidden)
        return self.encoder(
            features, lengths, return_hidden=return_hidden, after_subsampling=self.frontend
        )

    def forward(
        self,
        audio: torch.Tensor,
        audio_lengths: torch.Tensor,
        targets: torch.Tensor | None = None,
        target_lengths: torch.Tensor | None = None,
        return_hidden: bool = False,
        rnnt_logits: bool = True,
    ) -> ASROutput:
        """Training outputs.

        Args:
            audio: (B, S) waveforms at 16 kHz. audio_lengths: (B,) samples.
            targets: (B, U) token ids padded with ``<pad>``; target_lengths: (B,).
            return_hidden: also return every conformer layer's output.
            rnnt_logits: for an RNN-T decoder, the (B, T', U+1, V) joint logits; False: their
                projected inputs (``rnnt_joint``) for the fused loss, which needs far less
                memory (:func:`~asrkd.losses.rnnt.rnnt_joint_loss`).
        """
        inter_layers = self.config.inter_ctc_layers if self.config is not None else ()
        inter = bool(inter_layers) and self.training and self.ctc is not None
        encoded = self.encode(audio, audio_lengths, return_hidden or inter)
        output = ASROutput(
            encoder_out=encoded.output,
            encoder_lengths=encoded.lengths,
            decoder_type=self.decoder_type,
            hidden_states=encoded.hidden_states if return_hidden else None,
        )
        if self.ctc is not None:
            output.ctc_logits = self.ctc(encoded.output)
        if inter:
            output.inter_ctc_logits = [self.ctc(encoded.hidden_states[i - 1])
                                       for i in inter_layers]
        if isinstance(self.decoder, RNNTransducer) and targets is not None and not rnnt_logits:
            output.rnnt_joint = self.decoder.joint_inputs(encoded.output, targets)
        elif self.decoder is not None and targets is not None:
            output.decoder_logits = self.decoder(
                encoded.output, encoded.lengths, targets, target_lengths
            )
        return output

    def set_decoding(self, **changes: object) -> None:
        """Change the default search of :meth:`infer` (fields of :class:`DecodingConfig`:
        ``method``, ``beam_size``, ``ctc_weight``, ``length_penalty``); ``None`` values keep
        the current setting. Saved with the model by the next checkpoint."""
        changes = {name: value for name, value in changes.items() if value is not None}
        if not changes:
            return
        if self.config is None:
            raise ConfigError("this model has no ModelConfig to hold decoding settings")
        self.config = replace(self.config, decoding=replace(self.config.decoding, **changes))

    def default_method(self) -> str:
        """The search :meth:`infer` runs without a ``method``: the config's, or for ``auto``
        RNN-T greedy for a transducer, CTC greedy for any model with a CTC head (hybrid
        CTC/attention included), attention beam search for an attention-only model.

        Hybrid models default to CTC greedy by measurement: on the AN4 teachers (4000 steps,
        two decoder initialisations, validation and test speakers; docs/training-recipe.md)
        joint CTC/attention beam search at beam 4 was 0.9-2.6 points worse than CTC greedy and
        at beam 10 from 1.3 better to 2.3 worse, at a third to a fifth of its speed. It is
        also what an ONNX export of the same model runs. ``decoding.method: attention_beam``
        (or ``--method``) asks for the joint search.
        """
        method = self.config.decoding.method if self.config is not None else "auto"
        if method != "auto":
            return method
        if self.decoder_type == "rnnt":
            return "rnnt_greedy"
        if self.ctc is None and self.decoder_type == "transformer":
            return "attention_beam"
        return "ctc_greedy"

    def decoder_method(self) -> str:
        """The decoder's own search (attention beam or RNN-T greedy), else CTC greedy: the
        first opinion where a second one (CTC greedy) is compared with it (pseudo-labels)."""
        if self.decoder_type == "rnnt":
            return "rnnt_greedy"
        if self.decoder_type == "transformer":
            return "attention_beam"
        return "ctc_greedy"

    @torch.inference_mode()
    def infer(
        self,
        audio: torch.Tensor,
        audio_lengths: torch.Tensor,
        method: str | None = None,
        beam_size: int | None = None,
        fusion: LMFusion | None = None,
    ) -> list[Hypothesis]:
        """Decode a batch of waveforms (B, S) to hypotheses with ``text`` filled in.

        ``method``: ctc_greedy, ctc_beam, attention_greedy, attention_beam (joint CTC scoring
        when the model has a CTC head), rnnt_greedy, rnnt_beam; None uses the config's.
        ``fusion``: a token n-gram LM fused into ``ctc_beam`` (:class:`~asrkd.models.lm.LMFusion`).
        """
        search = self.search_strategy(method, beam_size, fusion)
        check_memory(
            encoder_bytes(encoder_shape(self), audio.size(0), audio.size(1)),
            f"encoding {audio.size(0)} x {audio.size(1) / SAMPLE_RATE:.0f} s of audio in one pass",
            "transcribe long recordings with `asrkd infer` or asrkd.longform."
            "LongFormTranscriber, which cut them at pauses",
        )
        was_training = self.training
        self.eval()
        try:
            encoded = self.encode(audio, audio_lengths)
            hypotheses = search(self, encoded.output, encoded.lengths)
        finally:
            self.train(was_training)
        if self.tokenizer is not None:
            for hypothesis in hypotheses:
                hypothesis.text = self.tokenizer.decode(hypothesis.tokens)
        return hypotheses

    def search_strategy(self, method: str | None = None, beam_size: int | None = None,
                        fusion: LMFusion | None = None):  # noqa: ANN201
        """The search :meth:`infer` runs for ``method`` (None: :meth:`default_method`), with
        the decoding config's beam size, length penalty and CTC weight unless overridden."""
        decoding = self.config.decoding if self.config is not None else DecodingConfig()
        return strategy(method or self.default_method(), beam_size or decoding.beam_size,
                        decoding.length_penalty, decoding.ctc_weight, fusion)

    def transcribe(
        self, paths: list[str | Path], batch_size: int = 8, method: str | None = None
    ) -> list[str]:
        """Transcribe audio files (any rate/channels soundfile reads) to text."""
        texts: list[str] = []
        for start in range(0, len(paths), batch_size):
            waves = [torch.from_numpy(load_audio(p)) for p in paths[start : start + batch_size]]
            audio, lengths = pad_sequences(waves)
            texts.extend(h.text for h in self.infer(audio, lengths, method=method))
        return texts


def build_model(config: ModelConfig, tokenizer: Tokenizer) -> E2EASR:
    """The one place that turns a :class:`ModelConfig` (+ tokenizer) into an E2EASR."""
    vocab = tokenizer.vocab_size
    features = LogMelFeatures(config.features)
    frontend = None
    encoder_input = config.features.n_mels
    if config.frontend is not None and config.frontend_position == "subsampled":
        frontend = ResNet1D(replace(config.frontend, input_dim=config.encoder.d_model))
    elif config.frontend is not None:
        frontend = ResNet1D(replace(config.frontend, input_dim=config.features.n_mels))
        encoder_input = frontend.output_dim
    encoder = FastConformerEncoder(replace(config.encoder, input_dim=encoder_input))
    width = encoder.output_dim
    decoder: TransformerDecoder | RNNTransducer | None = None
    if config.decoder == "transformer":
        settings = config.transformer
        d_model = settings.d_model or width
        decoder = TransformerDecoder(replace(
            settings, vocab_size=vocab, encoder_dim=width, d_model=d_model,
            ff_dim=settings.ff_dim or 4 * d_model, bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        ))
    elif config.decoder == "rnnt":
        decoder = RNNTransducer(replace(config.rnnt, vocab_size=vocab, encoder_dim=width,
                                        blank_id=tokenizer.blank_id))
    ctc = None
    if config.ctc:
        ctc = CTCHead(replace(config.ctc_head, vocab_size=vocab, encoder_dim=width,
                              blank_id=tokenizer.blank_id))
    spec_augment = SpecAugment(config.spec_augment) if config.spec_augment is not None else None
    return E2EASR(
        frontend,
        encoder,
        decoder,
        ctc,
        features=features,
        spec_augment=spec_augment,
        tokenizer=tokenizer,
        config=config,
    )


def save_checkpoint(model: E2EASR, path: str | Path, extra: dict | None = None) -> Path:
    """Write model config + tokenizer + weights to one file, atomically (temp + rename)."""
    if model.config is None or model.tokenizer is None:
        raise ValueError("only models from build_model (with config and tokenizer) can be saved")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": to_dict(model.config),
        "tokenizer": model.tokenizer.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return atomic_save(payload, path)


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded; the message says why and what to do."""


def safe_load(path: str | Path) -> dict:
    """``torch.load`` with ``weights_only=True`` (an asrkd or a Lightning checkpoint).

    Raises:
        CheckpointError: a missing file, or content that needs arbitrary pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "refuse"
        first_line = (str(error).splitlines() or [""])[0]
        raise CheckpointError(
            f"{path}: refused to load ({type(error).__name__}: {first_line}). "
            "asrkd checkpoints hold only tensors and plain containers; a file that needs "
            "arbitrary pickled objects is not one of ours and is not trusted"
        ) from None


def read_checkpoint(path: str | Path) -> dict:
    """Load an asrkd checkpoint's contents safely (see :func:`safe_load`)."""
    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an asrkd checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


def load_checkpoint(path: str | Path) -> E2EASR:
    """Rebuild the model saved by :func:`save_checkpoint`, in eval mode."""
    payload = read_checkpoint(path)
    try:
        config = from_dict(ModelConfig, payload["model_config"], "model")
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None
    model = build_model(config, tokenizer_from_dict(payload["tokenizer"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        first = str(error).splitlines()[1:2] or [str(error)]
        raise CheckpointError(
            f"{path}: weights do not fit the config stored with them ({first[0].strip()})"
        ) from None
    return model.eval()


__all__ = [
    "ASROutput",
    "DecodingConfig",
    "E2EASR",
    "ModelConfig",
    "TokenizerConfig",
    "build_model",
    "load_checkpoint",
    "make_decoder_io",
    "read_checkpoint",
    "safe_load",
    "save_checkpoint",
]
