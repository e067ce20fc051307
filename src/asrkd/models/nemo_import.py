"""Import NVIDIA NeMo FastConformer checkpoints (``.nemo``: CTC, RNN-T, hybrid) as asrkd models.

``asrkd import-nemo MODEL.nemo --out teacher.ckpt`` writes an ordinary asrkd checkpoint, so
evaluate, infer, export, KD, ``cache-teacher`` and ``pseudo-label`` work on it unchanged. NeMo
itself is never imported: a ``.nemo`` file is a tar archive (gzip-compressed before NeMo 1.7)
holding ``model_config.yaml``, ``model_weights.ckpt`` (a plain state dict) and the tokenizer
files the config names as ``nemo:<file>``.

Supported: ``EncDecCTCModelBPE``, ``EncDecRNNTBPEModel`` and ``EncDecHybridRNNTCTCBPEModel``
(an LSTM prediction network, a relu or tanh joint) with a ``ConformerEncoder`` (FastConformer
``dw_striding`` subsampling, ``rel_pos`` attention with full or limited ``[left, right]``
context or ``rel_pos_local_attn`` with a symmetric window, batch or layer norm in the conv
module, symmetric or causal convolutions, with or without biases, xscaling on or off, tied or
untied positional biases, any width, depth, heads, kernel and mel count) and a SentencePiece
BPE tokenizer. Everything else is refused with a
message that names the config key and its value, before any weights are read. Every weight of
the checkpoint must be used: an unknown one (an adapter, say) is an error too.

How NeMo's numbers map to asrkd's:

* features: NeMo's ``AudioToMelSpectrogramPreprocessor`` settings become
  :meth:`FeatureConfig.nemo` (pre-emphasis, Slaney mel bank, ``S // hop`` frames, ...), and the
  mel bank and window stored in the weights are checked against the ones asrkd computes;
* vocabulary: NeMo's CTC and joint outputs are the SentencePiece pieces ``0..N-1`` then the
  blank ``N``; asrkd's are blank ``0``, pad/bos/eos ``1..3``, then the pieces from ``4``
  (piece 0 is ``<unk>``). The output rows are reordered to match, and the three rows NeMo does
  not have get zero weights and a bias of -1e4, so they take no probability mass. The
  prediction network's embedding rows move the same way; asrkd starts it with the blank, whose
  row is zero, which is NeMo's zero start vector;
* text: NeMo tokenises transcripts with SentencePiece and nothing else, so the tokenizer gets a
  pass-through :class:`TextNormalizer` (case and punctuation reach SentencePiece as written);
* layers: ``linear_q/k/v`` are concatenated into asrkd's one ``qkv`` projection, 1x1
  ``Conv1d`` weights become ``Linear`` weights, and a model without biases gets zero biases.
"""

from __future__ import annotations

import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml

from asrkd.data.audio_processing import FeatureConfig, SpecAugmentConfig, mel_filterbank
from asrkd.data.text import TextNormalizer
from asrkd.data.tokenizer import SPECIAL_TOKENS, SentencePieceTokenizer
from asrkd.errors import UserError
from asrkd.models.e2e_asr import (
    E2EASR,
    DecodingConfig,
    ModelConfig,
    TokenizerConfig,
    build_model,
)
from asrkd.models.encoder import FastConformerConfig
from asrkd.models.rnnt import RNNTConfig

_MODELS = "nemo.collections.asr.models."
CTC_TARGET = _MODELS + "ctc_bpe_models.EncDecCTCModelBPE"
RNNT_TARGET = _MODELS + "rnnt_bpe_models.EncDecRNNTBPEModel"
HYBRID_TARGET = _MODELS + "hybrid_rnnt_ctc_bpe_models.EncDecHybridRNNTCTCBPEModel"
TARGETS = (CTC_TARGET, RNNT_TARGET, HYBRID_TARGET)
# NeMo's constructor defaults (nemo 3.0), used where a config leaves a key out, as NeMo does.
ENCODER_DEFAULTS: dict[str, Any] = {
    "feat_out": -1, "causal_downsampling": False, "subsampling": "striding",
    "subsampling_factor": 4, "subsampling_conv_channels": -1, "reduction": None,
    "ff_expansion_factor": 4, "self_attention_model": "rel_pos", "n_heads": 4,
    "att_context_size": None, "att_context_style": "regular", "xscaling": True,
    "untie_biases": True, "conv_kernel_size": 31, "conv_norm_type": "batch_norm",
    "conv_context_size": None, "use_bias": True, "dropout": 0.1, "dropout_pre_encoder": 0.1,
    "dropout_emb": 0.1, "dropout_att": 0.0, "global_tokens": 0, "stochastic_depth_drop_prob": 0.0,
}
PREPROCESSOR_DEFAULTS: dict[str, Any] = {
    "sample_rate": 16000, "window_size": 0.02, "window_stride": 0.01, "n_window_size": None,
    "n_window_stride": None, "window": "hann", "normalize": "per_feature", "n_fft": None,
    "preemph": 0.97, "features": 64, "lowfreq": 0, "highfreq": None, "log": True,
    "log_zero_guard_type": "add", "log_zero_guard_value": 2**-24, "dither": 1e-5,
    "pad_to": 16, "frame_splicing": 1, "exact_pad": False, "pad_value": 0, "mag_power": 2.0,
    "mel_norm": "slaney", "nb_augmentation_prob": 0.0,
}
# Rows asrkd has and NeMo does not (pad, bos, eos) get this bias: exp(-1e4) is 0 in float32.
ABSENT_ROW_BIAS = -1.0e4


class NemoImportError(UserError):
    """A ``.nemo`` file asrkd cannot import; the message names the config key or weight."""


@dataclass
class NemoArchive:
    """What :func:`read_nemo` found in a ``.nemo`` file."""

    path: Path
    config: dict
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)

    def open(self) -> tarfile.TarFile:
        return tarfile.open(self.path, "r:*")

    def read_member(self, name: str) -> bytes:
        """The bytes of member ``name`` (``nemo:`` prefix and ``./`` allowed)."""
        key = _member_key(name.removeprefix("nemo:"))
        if key not in self.members:
            raise NemoImportError(f"{self.path}: the config names {name!r}, which the archive "
                                  f"does not hold (it has {sorted(self.members)})")
        with self.open() as tar:
            handle = tar.extractfile(self.members[key])
            assert handle is not None
            return handle.read()

    def load_weights(self) -> dict[str, torch.Tensor]:
        """``model_weights.ckpt``, streamed from the archive (read once, never copied)."""
        if "model_weights.ckpt" not in self.members:
            raise NemoImportError(f"{self.path}: no model_weights.ckpt in the archive (a "
                                  "multi-rank or distributed checkpoint?)")
        with self.open() as tar:
            handle = tar.extractfile(self.members["model_weights.ckpt"])
            assert handle is not None
            try:
                state = torch.load(handle, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 - any unpickling failure is the file's
                raise NemoImportError(f"{self.path}: model_weights.ckpt is not a plain state "
                                      f"dict ({type(error).__name__}: {error})") from None
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        return state


def _member_key(name: str) -> str:
    return str(PurePosixPath(name)).removeprefix("./")


def read_nemo(path: str | Path) -> NemoArchive:
    """Open a ``.nemo`` archive and parse its ``model_config.yaml`` (weights not read yet)."""
    path = Path(path)
    if not path.is_file():
        raise NemoImportError(f"{path}: no such file")
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {_member_key(m.name): m for m in tar.getmembers() if m.isfile()}
            if "model_config.yaml" not in members:
                raise NemoImportError(f"{path}: no model_config.yaml in the archive")
            handle = tar.extractfile(members["model_config.yaml"])
            assert handle is not None
            config = yaml.safe_load(handle.read().decode("utf-8"))
    except tarfile.TarError as error:
        raise NemoImportError(f"{path}: not a .nemo archive ({error})") from None
    if not isinstance(config, dict):
        raise NemoImportError(f"{path}: model_config.yaml is not a mapping")
    return NemoArchive(path, config, members)


def _section(config: dict, key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    section = config.get(key)
    if not isinstance(section, dict):
        raise NemoImportError(f"model_config.yaml has no {key} section")
    return {**defaults, **section}


def _refuse(key: str, value: Any, why: str) -> NemoImportError:
    return NemoImportError(f"unsupported NeMo model: {key}={value!r} ({why})")


def _number(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _refuse(key, value, "expected a number") from None


def feature_config(preprocessor: dict[str, Any]) -> FeatureConfig:
    """asrkd's :class:`FeatureConfig` for a NeMo ``preprocessor`` config section."""
    p = {**PREPROCESSOR_DEFAULTS, **preprocessor}
    target = str(p.get("_target_", ""))
    if not target.endswith("AudioToMelSpectrogramPreprocessor"):
        raise _refuse("preprocessor._target_", target, "only AudioToMelSpectrogramPreprocessor")
    checks = {"window": ("hann",), "log": (True,), "frame_splicing": (1,), "exact_pad": (False,),
              "log_zero_guard_type": ("add",), "mel_norm": ("slaney",),
              "normalize": ("per_feature", "all_features", None, "NA")}
    for key, allowed in checks.items():
        if p[key] not in allowed:
            raise _refuse(f"preprocessor.{key}", p[key], f"supported: {list(allowed)}")
    if _number("preprocessor.mag_power", p["mag_power"]) != 2.0:
        raise _refuse("preprocessor.mag_power", p["mag_power"], "only the power spectrum, 2.0")
    rate = int(p["sample_rate"])
    win = (int(p["n_window_size"]) if p["n_window_size"]
           else int(_number("preprocessor.window_size", p["window_size"]) * rate))
    hop = (int(p["n_window_stride"]) if p["n_window_stride"]
           else int(_number("preprocessor.window_stride", p["window_stride"]) * rate))
    n_fft = int(p["n_fft"]) if p["n_fft"] else 2 ** math.ceil(math.log2(win))
    guard = p["log_zero_guard_value"]
    if guard == "tiny":
        guard = torch.finfo(torch.float32).tiny
    elif guard == "eps":
        guard = torch.finfo(torch.float32).eps
    preemph = p["preemph"]
    normalize = None if p["normalize"] in (None, "NA") else p["normalize"]
    config = FeatureConfig.nemo(
        sample_rate=rate, n_mels=int(p["features"]), win_length_ms=1000.0 * win / rate,
        hop_length_ms=1000.0 * hop / rate, n_fft=n_fft,
        f_min=_number("preprocessor.lowfreq", p["lowfreq"]),
        f_max=None if p["highfreq"] is None else _number("preprocessor.highfreq", p["highfreq"]),
        log_floor=_number("preprocessor.log_zero_guard_value", guard),
        preemphasis=None if preemph is None else _number("preprocessor.preemph", preemph),
        normalize=normalize, dither=_number("preprocessor.dither", p["dither"]),
    )
    if (config.win_length, config.hop_length) != (win, hop):
        raise _refuse("preprocessor.window_size", p["window_size"],
                      f"{win} samples at {rate} Hz is not a whole number of milliseconds' worth "
                      "that asrkd reproduces")
    return config


def spec_augment_config(section: dict | None) -> SpecAugmentConfig | None:
    """NeMo's ``spec_augment`` section, where asrkd's masks express it (else None: the
    imported model is meant for inference and as a teacher, which never augment)."""
    if not section:
        return None
    width = section.get("time_width", 0.05)
    if not isinstance(width, float) or not 0.0 < width < 1.0:
        return None  # a width in frames: asrkd's masks scale with the utterance
    return SpecAugmentConfig(freq_masks=int(section.get("freq_masks", 0)),
                             freq_width=int(section.get("freq_width", 10)),
                             time_masks=int(section.get("time_masks", 0)), time_width=width)


def encoder_config(encoder: dict[str, Any]) -> FastConformerConfig:
    """asrkd's :class:`FastConformerConfig` for a NeMo ``encoder`` config section."""
    e = {**ENCODER_DEFAULTS, **encoder}
    target = str(e.get("_target_", ""))
    if not target.endswith("ConformerEncoder") or "Multi" in target:
        raise _refuse("encoder._target_", target, "only ConformerEncoder")
    if e["subsampling"] != "dw_striding":
        raise _refuse("encoder.subsampling", e["subsampling"], "only FastConformer's dw_striding")
    checks = {"causal_downsampling": False, "reduction": None, "feat_out": -1,
              "att_context_style": "regular", "global_tokens": 0}
    for key, allowed in checks.items():
        if e[key] != allowed:
            raise _refuse(f"encoder.{key}", e[key], f"supported: {allowed!r}")
    # rel_pos_local_attn (NeMo's Longformer-style sliding windows) computes the same banded
    # rel_pos attention as asrkd's masked one (tests/test_nemo_import.py, variant ctc_local).
    attention = e["self_attention_model"]
    if attention not in ("rel_pos", "rel_pos_local_attn"):
        raise _refuse("encoder.self_attention_model", attention,
                      "supported: rel_pos, rel_pos_local_attn")
    if e["conv_norm_type"] not in ("batch_norm", "layer_norm"):
        raise _refuse("encoder.conv_norm_type", e["conv_norm_type"], "batch_norm or layer_norm")
    if any(str(key).startswith("adapter") for key in encoder) or encoder.get("adapters"):
        raise _refuse("encoder.adapters", encoder.get("adapters"), "adapters are not imported")
    context = e["att_context_size"]
    if context is not None:
        if (not isinstance(context, (list, tuple)) or len(context) != 2
                or not all(isinstance(c, int) for c in context)):
            raise _refuse("encoder.att_context_size", context,
                          "one [left, right] pair; multi-lookahead (cache-aware streaming) "
                          "models are not supported")
        context = None if tuple(context) == (-1, -1) else (int(context[0]), int(context[1]))
    if attention == "rel_pos_local_attn" and (
            context is None or context[0] != context[1] or context[0] < 1):
        # NeMo adds the positional scores of an asymmetric window to the wrong offsets (its
        # right part lands on the last right + 1 of 2 max(left, right) + 1 columns), so such a
        # model computes something other than banded attention; symmetric ones are exact.
        raise _refuse("encoder.att_context_size", e["att_context_size"],
                      "rel_pos_local_attn is imported with a symmetric [w, w] window only")
    kernel = int(e["conv_kernel_size"])
    conv = e["conv_context_size"]
    if conv == "causal":
        conv = (kernel - 1, 0)
    elif conv is not None:
        conv = (int(conv[0]), int(conv[1]))
        if conv == ((kernel - 1) // 2, (kernel - 1) // 2):
            conv = None
    channels = int(e["subsampling_conv_channels"])
    d_model = int(e["d_model"])
    return FastConformerConfig(
        input_dim=int(e["feat_in"]), d_model=d_model, n_heads=int(e["n_heads"]),
        n_layers=int(e["n_layers"]), ff_expansion=int(e["ff_expansion_factor"]),
        conv_kernel=kernel, subsampling="dw_striding",
        subsampling_factor=int(e["subsampling_factor"]),
        subsampling_channels=d_model if channels == -1 else channels, att_context=context,
        conv_context=conv, conv_norm=e["conv_norm_type"], xscaling=bool(e["xscaling"]),
        dropout=float(e["dropout"]), dropout_pre_encoder=float(e["dropout_pre_encoder"]),
        dropout_emb=float(e["dropout_emb"]), dropout_att=float(e["dropout_att"]),
    )


def _tokenizer(archive: NemoArchive) -> SentencePieceTokenizer:
    section = archive.config.get("tokenizer") or {}
    if section.get("type") != "bpe":
        raise _refuse("tokenizer.type", section.get("type"),
                      "only SentencePiece BPE tokenizers (type: bpe)")
    model_path = section.get("model_path")
    if not model_path:
        raise NemoImportError("tokenizer.model_path is missing from model_config.yaml")
    proto = archive.read_member(str(model_path))
    return SentencePieceTokenizer(proto, TextNormalizer(passthrough=True))


class _Weights:
    """NeMo's state dict, handed out key by key; :meth:`finish` refuses unused keys."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.used: set[str] = set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise NemoImportError(f"model_weights.ckpt has no {key!r}, which the config implies")
        self.used.add(key)
        return self.state[key].float()

    def maybe(self, key: str) -> torch.Tensor | None:
        return self.take(key) if key in self.state else None

    def finish(self) -> None:
        unused = sorted(k for k in self.state if k not in self.used
                        and not k.endswith("num_batches_tracked"))
        if unused:
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            raise NemoImportError(f"model_weights.ckpt holds weights asrkd does not know: "
                                  f"{', '.join(unused[:5])}{more}")


def _linear(w: _Weights, prefix: str, out: dict, ours: str, use_bias: bool) -> None:
    weight = w.take(f"{prefix}.weight")
    out[f"{ours}.weight"] = weight.reshape(weight.shape[0], -1)  # 1x1 Conv1d -> Linear
    bias = w.maybe(f"{prefix}.bias") if use_bias else None
    out[f"{ours}.bias"] = bias if bias is not None else torch.zeros(weight.shape[0])


def encoder_state(w: _Weights, config: FastConformerConfig, use_bias: bool,
                  prefix: str = "encoder") -> dict[str, torch.Tensor]:
    """asrkd's encoder state dict (keys under ``encoder.``) from NeMo's weights."""
    out: dict[str, torch.Tensor] = {}
    sub = f"{prefix}.pre_encode"
    stages = int(math.log2(config.subsampling_factor))
    out["encoder.subsampling.stages.0.weight"] = w.take(f"{sub}.conv.0.weight")
    out["encoder.subsampling.stages.0.bias"] = w.take(f"{sub}.conv.0.bias")
    for i in range(1, stages):  # NeMo: [conv, relu, (dw, pw, relu) * (stages - 1)]
        for part, index in ((0, 3 * i - 1), (1, 3 * i)):
            for kind in ("weight", "bias"):
                out[f"encoder.subsampling.stages.{i}.{part}.{kind}"] = w.take(
                    f"{sub}.conv.{index}.{kind}")
    out["encoder.subsampling.out.weight"] = w.take(f"{sub}.out.weight")
    out["encoder.subsampling.out.bias"] = w.take(f"{sub}.out.bias")
    shared_u, shared_v = w.maybe(f"{prefix}.pos_bias_u"), w.maybe(f"{prefix}.pos_bias_v")
    for i in range(config.n_layers):
        src, dst = f"{prefix}.layers.{i}", f"encoder.layers.{i}"
        for nemo_norm, our_norm in (("norm_feed_forward1", "norm_ff1"),
                                    ("norm_self_att", "norm_att"), ("norm_conv", "norm_conv"),
                                    ("norm_feed_forward2", "norm_ff2"), ("norm_out", "norm_out")):
            out[f"{dst}.{our_norm}.weight"] = w.take(f"{src}.{nemo_norm}.weight")
            out[f"{dst}.{our_norm}.bias"] = w.take(f"{src}.{nemo_norm}.bias")
        for nemo_ff, our_ff in (("feed_forward1", "ff1"), ("feed_forward2", "ff2")):
            for j in (1, 2):
                _linear(w, f"{src}.{nemo_ff}.linear{j}", out, f"{dst}.{our_ff}.linear{j}",
                        use_bias)
        att = f"{src}.self_attn"
        q, k, v = ({}, {}, {})
        for name, part in (("q", q), ("k", k), ("v", v)):
            _linear(w, f"{att}.linear_{name}", part, "p", use_bias)
        out[f"{dst}.att.qkv.weight"] = torch.cat([q["p.weight"], k["p.weight"], v["p.weight"]])
        out[f"{dst}.att.qkv.bias"] = torch.cat([q["p.bias"], k["p.bias"], v["p.bias"]])
        _linear(w, f"{att}.linear_out", out, f"{dst}.att.out", use_bias)
        out[f"{dst}.att.linear_pos.weight"] = w.take(f"{att}.linear_pos.weight")
        for name, shared in (("pos_bias_u", shared_u), ("pos_bias_v", shared_v)):
            own = w.maybe(f"{att}.{name}")
            if own is None and shared is None:
                raise NemoImportError(f"model_weights.ckpt has neither {att}.{name} nor "
                                      f"{prefix}.{name}")
            out[f"{dst}.att.{name}"] = own if own is not None else shared
        conv = f"{src}.conv"
        _linear(w, f"{conv}.pointwise_conv1", out, f"{dst}.conv.pointwise1", use_bias)
        out[f"{dst}.conv.depthwise.weight"] = w.take(f"{conv}.depthwise_conv.weight")
        bias = w.maybe(f"{conv}.depthwise_conv.bias") if use_bias else None
        out[f"{dst}.conv.depthwise.bias"] = bias if bias is not None else torch.zeros(
            config.d_model)
        for kind in ("weight", "bias"):
            out[f"{dst}.conv.norm.{kind}"] = w.take(f"{conv}.batch_norm.{kind}")
        if config.conv_norm == "batch_norm":
            for kind in ("running_mean", "running_var"):
                out[f"{dst}.conv.norm.{kind}"] = w.take(f"{conv}.batch_norm.{kind}")
            tracked = w.state.get(f"{conv}.batch_norm.num_batches_tracked")
            out[f"{dst}.conv.norm.num_batches_tracked"] = (
                tracked.clone() if tracked is not None else torch.tensor(0))
        _linear(w, f"{conv}.pointwise_conv2", out, f"{dst}.conv.pointwise2", use_bias)
    return out


def ctc_rows(weight: torch.Tensor, bias: torch.Tensor, pieces: int, what: str = "CTC layer"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder NeMo's output rows (pieces ``0..N-1``, blank ``N``) into asrkd's (blank ``0``,
    pad/bos/eos ``1..3`` absent, pieces from ``4``)."""
    if weight.shape[0] != pieces + 1:
        raise NemoImportError(f"the {what} has {weight.shape[0]} outputs; the tokenizer's "
                              f"{pieces} pieces and a blank make {pieces + 1}")
    absent = len(SPECIAL_TOKENS) - 2  # pad, bos, eos (blank and unk exist in both)
    dim = weight.shape[1]
    new_weight = torch.cat([weight[pieces:], torch.zeros(absent, dim), weight[:pieces]])
    new_bias = torch.cat([bias[pieces:], torch.full((absent,), ABSENT_ROW_BIAS), bias[:pieces]])
    return new_weight, new_bias


def rnnt_config(config: dict) -> RNNTConfig:
    """asrkd's :class:`RNNTConfig` for a NeMo transducer's ``decoder`` and ``joint`` sections."""
    decoder = config.get("decoder") or {}
    joint = config.get("joint") or {}
    if not str(decoder.get("_target_", "")).endswith(".RNNTDecoder"):
        raise _refuse("decoder._target_", decoder.get("_target_"),
                      "only RNNTDecoder (an LSTM prediction network)")
    if not str(joint.get("_target_", "")).endswith(".RNNTJoint"):
        raise _refuse("joint._target_", joint.get("_target_"), "only RNNTJoint")
    if not decoder.get("blank_as_pad", True):
        raise _refuse("decoder.blank_as_pad", decoder.get("blank_as_pad"), "only true")
    if decoder.get("normalization_mode") is not None:
        raise _refuse("decoder.normalization_mode", decoder.get("normalization_mode"),
                      "only null")
    prednet = {"pred_rnn_layers": 1, "norm": None, "rnn_hidden_size": -1, "dropout": 0.0,
               **(decoder.get("prednet") or {})}
    if prednet["norm"] is not None:
        raise _refuse("decoder.prednet.norm", prednet["norm"], "only null")
    hidden = int(prednet["pred_hidden"])
    if int(prednet["rnn_hidden_size"] or -1) not in (-1, hidden):
        raise _refuse("decoder.prednet.rnn_hidden_size", prednet["rnn_hidden_size"],
                      "only the embedding width, pred_hidden")
    jointnet = {"activation": "relu", "dropout": 0.0, **(joint.get("jointnet") or {})}
    if jointnet["activation"] not in ("relu", "tanh"):
        raise _refuse("joint.jointnet.activation", jointnet["activation"], "relu or tanh")
    extra = int(joint.get("num_extra_outputs", 0) or 0)
    durations = (config.get("model_defaults") or {}).get("tdt_durations")
    if extra or durations:
        raise _refuse("joint.num_extra_outputs", extra or durations,
                      "TDT duration outputs are not supported")
    greedy = ((config.get("decoding") or {}).get("greedy") or {})
    max_symbols = greedy.get("max_symbols", greedy.get("max_symbols_per_step", 10))
    return RNNTConfig(pred_dim=hidden, pred_layers=int(prednet["pred_rnn_layers"]),
                      joint_dim=int(jointnet["joint_hidden"]),
                      dropout=float(prednet["dropout"] or 0.0),
                      max_symbols_per_frame=int(max_symbols or 10),
                      joint_activation=jointnet["activation"])


def rnnt_state(w: _Weights, config: RNNTConfig, pieces: int) -> dict[str, torch.Tensor]:
    """asrkd's transducer state dict (keys under ``decoder.``) from NeMo's weights."""
    out: dict[str, torch.Tensor] = {}
    embed = w.take("decoder.prediction.embed.weight")
    if embed.shape[0] != pieces + 1:
        raise NemoImportError(f"the prediction network embeds {embed.shape[0]} symbols; the "
                              f"tokenizer's {pieces} pieces and a blank make {pieces + 1}")
    # Row 0, asrkd's blank, is the start symbol: NeMo starts from a zero vector (and keeps its
    # blank row, the padding index, at zero). pad/bos/eos are never fed.
    absent = len(SPECIAL_TOKENS) - 1
    out["decoder.prediction.embed.weight"] = torch.cat([torch.zeros(absent, embed.shape[1]),
                                                        embed[:pieces]])
    for layer in range(config.pred_layers):
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            out[f"decoder.prediction.lstm.{kind}_l{layer}"] = w.take(
                f"decoder.prediction.dec_rnn.lstm.{kind}_l{layer}")
    for nemo_name, ours in (("enc", "encoder_proj"), ("pred", "pred_proj")):
        out[f"decoder.joint.{ours}.weight"] = w.take(f"joint.{nemo_name}.weight")
        out[f"decoder.joint.{ours}.bias"] = w.take(f"joint.{nemo_name}.bias")
    # joint_net is [activation, (dropout), Linear]: the output layer is its last entry.
    last = max(int(k.split(".")[2]) for k in w.state if k.startswith("joint.joint_net."))
    out["decoder.joint.output.weight"], out["decoder.joint.output.bias"] = ctc_rows(
        w.take(f"joint.joint_net.{last}.weight"), w.take(f"joint.joint_net.{last}.bias"),
        pieces, what="joint network")
    return out


def _check_buffers(w: _Weights, features: FeatureConfig) -> None:
    """The mel bank and window NeMo stored must be the ones asrkd computes from the config."""
    fb = w.maybe("preprocessor.featurizer.fb")
    if fb is not None:
        ours = torch.from_numpy(mel_filterbank(features.n_fft, features.n_mels,
                                               features.sample_rate, features.f_min,
                                               features.f_max, scale=features.mel_scale,
                                               norm=features.mel_norm))
        theirs = fb.reshape(fb.shape[-2], fb.shape[-1]).T
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-4,
                                                            atol=1e-6):
            raise NemoImportError(
                "preprocessor.featurizer.fb in the weights is not the Slaney mel bank of the "
                f"preprocessor config ({features.n_mels} mels, n_fft {features.n_fft}, "
                f"{features.f_min}-{features.f_max} Hz): a custom filterbank is not supported")
    window = w.maybe("preprocessor.featurizer.window")
    if window is not None:
        ours = torch.hann_window(features.win_length, periodic=features.window_periodic)
        if window.shape != ours.shape or not torch.allclose(window, ours, atol=1e-6):
            raise NemoImportError("preprocessor.featurizer.window in the weights is not the "
                                  f"symmetric Hann window of {features.win_length} samples")


def import_nemo(path: str | Path) -> tuple[E2EASR, dict]:
    """Build the asrkd model of a NeMo ``.nemo`` checkpoint.

    Returns:
        The model (eval mode) and a summary of what was imported (NeMo class and version,
        parameters, vocabulary), which :func:`save_imported` stores in the checkpoint.

    Raises:
        NemoImportError: an unsupported model, naming the config key or weight.
    """
    archive = read_nemo(path)
    config = archive.config
    target = str(config.get("target", ""))
    if target not in TARGETS:
        raise _refuse("target", target, f"supported: {', '.join(TARGETS)}")
    features = feature_config(_section(config, "preprocessor", {}))
    nemo_encoder = _section(config, "encoder", ENCODER_DEFAULTS)
    encoder = encoder_config(nemo_encoder)
    if encoder.input_dim != features.n_mels:
        raise _refuse("encoder.feat_in", encoder.input_dim,
                      f"the preprocessor makes {features.n_mels} features")
    # The CTC layer: the model's decoder (CTC models) or its auxiliary CTC decoder (hybrids).
    ctc_section, ctc_prefix = None, None
    if target == CTC_TARGET:
        ctc_section, ctc_prefix = ("decoder", config.get("decoder") or {}), "decoder"
    elif target == HYBRID_TARGET:
        aux = config.get("aux_ctc") or {}
        ctc_section, ctc_prefix = ("aux_ctc.decoder", aux.get("decoder") or {}), "ctc_decoder"
    if ctc_section is not None and not str(ctc_section[1].get("_target_", "")).endswith(
            "ConvASRDecoder"):
        raise _refuse(f"{ctc_section[0]}._target_", ctc_section[1].get("_target_"),
                      "only ConvASRDecoder (CTC)")
    rnnt = rnnt_config(config) if target != CTC_TARGET else None
    tokenizer = _tokenizer(archive)
    pieces = tokenizer.processor.get_piece_size()
    model_config = ModelConfig(
        features=features, spec_augment=spec_augment_config(config.get("spec_augment")),
        frontend=None, encoder=encoder, decoder="none" if rnnt is None else "rnnt",
        rnnt=rnnt or RNNTConfig(), ctc=ctc_prefix is not None,
        tokenizer=TokenizerConfig(kind="bpe", vocab_size=tokenizer.vocab_size),
        # NeMo's default search: its transducer for RNN-T and hybrid models.
        decoding=DecodingConfig(method="auto" if rnnt is None else "rnnt_greedy"),
    )
    weights = _Weights(archive.load_weights())
    _check_buffers(weights, features)
    state = encoder_state(weights, encoder, use_bias=bool(nemo_encoder["use_bias"]))
    if ctc_prefix is not None:
        ctc_weight = weights.take(f"{ctc_prefix}.decoder_layers.0.weight")
        ctc_bias = weights.take(f"{ctc_prefix}.decoder_layers.0.bias")
        state["ctc.proj.weight"], state["ctc.proj.bias"] = ctc_rows(
            ctc_weight.reshape(ctc_weight.shape[0], -1), ctc_bias, pieces)
    if rnnt is not None:
        state.update(rnnt_state(weights, rnnt, pieces))
    weights.finish()
    model = build_model(model_config, tokenizer)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # shapes the config did not announce
        first = str(error).splitlines()[1:2] or [str(error)]
        raise NemoImportError(f"the weights do not fit model_config.yaml: "
                              f"{first[0].strip()}") from None
    if missing or unexpected:  # a mapping bug, not the user's file
        raise RuntimeError(f"import-nemo mapping incomplete: missing {missing}, "
                           f"unexpected {unexpected}")
    summary = {"source": str(Path(path).resolve()), "nemo_class": target,
               "nemo_version": config.get("nemo_version"),
               "params": model.num_parameters(), "pieces": pieces}
    return model.eval(), summary


def save_imported(path: str | Path, out: str | Path) -> dict:
    """``asrkd import-nemo``: import ``path`` and write the asrkd checkpoint ``out``."""
    from asrkd.models.e2e_asr import save_checkpoint

    model, summary = import_nemo(path)
    save_checkpoint(model, out, extra={"imported_from_nemo": summary})
    return {**summary, "checkpoint": str(out)}


__all__ = ["NemoImportError", "encoder_config", "feature_config", "import_nemo", "read_nemo",
           "rnnt_config", "save_imported"]
