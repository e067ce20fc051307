"""ONNX export of a trained model, and a small onnxruntime recogniser that runs it.

``asrkd export --ckpt student.ckpt --out student.onnx [--int8]`` writes:

* ``student.onnx``: waveform (B, S) float32 + lengths (B,) int64 -> CTC log-probs (B, T, V)
  + frame lengths (B,). Log-mel features are inside the graph, so a deployment needs nothing
  but onnxruntime and the tokenizer. Batch and time axes are dynamic (the dynamo exporter).
* for an RNN-T model, also ``student.encoder.onnx`` (waveform -> encoder states),
  ``student.predictor.onnx`` (one prediction-network step: label + LSTM state -> output + new
  state) and ``student.joint.onnx`` (N encoder frames + N prediction outputs -> log-probs);
  :class:`OnnxASR` runs the same label-looping greedy search over them as the torch model.
* ``student.onnx.json``: the tokenizer and how the graphs fit together.

``--int8`` quantises the weights of MatMul/Gemm to int8 (onnxruntime dynamic quantization:
activations are quantised on the fly), about 4x smaller files. Chosen by measurement on the
AN4 student (d = 96; 10 s at batch 1, one thread, interleaved A/B in one process, 2026-12-07;
RTFx float 463): per-tensor weights on every weight MatMul 583 (kept; test WER 15.01 vs
15.39 % float); per-channel weights 460 (transcripts identical to float, no faster);
only the matmuls of at least 96 x 384 weights 463 (the small ones gain too); static QDQ
quantization calibrated on 64 training utterances 443 (min-max) and 459 (99.99th percentile):
onnxruntime's fixed activation scales did not buy speed here. The features stay float (see
:func:`_quantize`), and so does their DFT, a convolution over the waveform.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from asrkd.data.tokenizer import tokenizer_from_dict
from asrkd.errors import UserError
from asrkd.models.e2e_asr import E2EASR
from asrkd.streaming import StreamFeatures, StreamingEncoder, streaming_problems
from asrkd.utils.memory import check_memory, encoder_bytes, encoder_shape

FORMAT = "asrkd-onnx-1"
OPSET = 18
log = logging.getLogger(__name__)


class _CTCGraph(nn.Module):
    """Waveform -> CTC log-probs: the exported function of a CTC model."""

    def __init__(self, model: E2EASR) -> None:
        super().__init__()
        self.model = model

    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor):  # noqa: ANN201
        encoded = self.model.encode(audio, audio_lengths)
        return self.model.ctc.log_probs(encoded.output), encoded.lengths


class _EncoderGraph(nn.Module):
    def __init__(self, model: E2EASR) -> None:
        super().__init__()
        self.model = model

    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor):  # noqa: ANN201
        encoded = self.model.encode(audio, audio_lengths)
        return encoded.output, encoded.lengths


class _PredictorGraph(nn.Module):
    def __init__(self, model: E2EASR) -> None:
        super().__init__()
        self.prediction = model.decoder.prediction

    def forward(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor):  # noqa: ANN201
        out, (h, c) = self.prediction.step(tokens, (h, c))
        return out, h, c


class _JointGraph(nn.Module):
    def __init__(self, model: E2EASR) -> None:
        super().__init__()
        self.joint = model.decoder.joint

    def forward(self, encoder_frame: torch.Tensor, pred_out: torch.Tensor) -> torch.Tensor:
        logits = self.joint.combine(
            self.joint.encoder_proj(encoder_frame), self.joint.pred_proj(pred_out)
        )
        return logits.log_softmax(-1)


class _StreamGraph(nn.Module):
    """The streaming chunk step with its state as one list argument (the exporter's form)."""

    def __init__(self, model: E2EASR) -> None:
        super().__init__()
        self.step = StreamingEncoder(model)

    def forward(self, features: torch.Tensor, state: list[torch.Tensor]):  # noqa: ANN201
        return self.step(features, *state)


def _export_streaming(model: E2EASR, out: Path) -> dict:
    """``<stem>.stream.onnx`` (one chunk of features + caches -> CTC log-probs + caches) and
    ``<stem>.stream_features.onnx`` (padded audio -> log-mel frames); returns their layout."""
    stem = out.name.removesuffix(".onnx")
    paths = {k: out.with_name(f"{stem}.{k}.onnx") for k in ("stream", "stream_features")}
    graph = _StreamGraph(model)
    state = graph.step.initial_state()
    names = [f"state{i}" for i in range(len(state))]
    chunk_frames = graph.step.chunk_frames
    frames = torch.export.Dim("frames", min=1, max=chunk_frames)
    _export(graph, (torch.randn(1, chunk_frames, model.features.config.n_mels), list(state)),
            (["features", *names], ["log_probs", *[f"{n}_out" for n in names]]),
            ({1: frames}, [None] * len(state)), paths["stream"])
    n_fft = model.features.config.n_fft
    samples = torch.export.Dim("padded_samples", min=n_fft, max=16000 * 3600)
    _export(StreamFeatures(model.features), (torch.randn(1, n_fft + 7 * 160),),
            (["padded_audio"], ["features"]), ({1: samples},), paths["stream_features"])
    return {
        "graphs": {k: p.name for k, p in paths.items()},
        "chunk_frames": chunk_frames,
        "state": [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                  for n, t in zip(names, state)],
        "features": asdict(model.features.config),
    }


def _export(module: nn.Module, args: tuple, names: tuple[list[str], list[str]],
            dynamic: tuple, path: Path) -> None:
    module.eval()
    # The exporter narrates each stage on stdout and warns about things that do not concern
    # a user (torchvision ops, axis renames); its real failures are still raised.
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), dynamo=True, dynamic_shapes=dynamic,
            input_names=names[0], output_names=names[1], opset_version=OPSET,
            external_data=False, verbose=False,
        )


@contextlib.contextmanager
def _quiet_logger(name: str | None):  # noqa: ANN202
    """Raise a logger to ERROR for the duration (None: the root logger), then restore it."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _quantize(path: Path, keep_float_shapes: list[list[int]]) -> None:
    """Replace ``path`` by its int8 dynamic quantization: MatMul/Gemm with constant weights.

    Products of two activations (attention scores) stay float, and so does every MatMul whose
    weight has a shape in ``keep_float_shapes``: the mel filterbank. Its input is the power
    spectrum, whose dynamic range (1e-10 to 1e3) a per-tensor uint8 scale flattens to zero;
    quantizing it made a trained model's int8 transcripts differ from its float ones by 92%
    WER (measured in tests/test_export.py before this exclusion).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(path)).graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    keep_float = [
        node.name for node in graph.node
        if node.op_type in ("MatMul", "Gemm")
        and any(shapes.get(name) in keep_float_shapes for name in node.input)
    ]
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        target = Path(tmp) / path.name
        # onnxruntime's quantizer logs a pre-processing suggestion on the root logger.
        with _quiet_logger(None):
            quantize_dynamic(str(path), str(target), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"],
                             nodes_to_exclude=keep_float,
                             extra_options={"MatMulConstBOnly": True})
        os.replace(target, path)


def export_onnx(model: E2EASR, out: str | Path, int8: bool = False) -> dict:
    """Export ``model`` (see the module doc); returns the sidecar description it wrote."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    samples = torch.export.Dim("samples", min=800, max=16000 * 3600)
    audio = torch.randn(2, 32000)
    lengths = torch.tensor([32000, 24000])
    wave_axes = ({0: batch, 1: samples}, {0: batch})
    graphs: dict[str, str] = {}
    if model.ctc is not None:
        _export(_CTCGraph(model), (audio, lengths),
                (["audio", "audio_lengths"], ["log_probs", "lengths"]), wave_axes, out)
        graphs["ctc"] = out.name
    if model.decoder_type == "rnnt":
        stem = out.name.removesuffix(".onnx")
        rnnt = model.decoder.config
        n = torch.export.Dim("hyps", min=1, max=4096)
        paths = {k: out.with_name(f"{stem}.{k}.onnx") for k in ("encoder", "predictor", "joint")}
        _export(_EncoderGraph(model), (audio, lengths),
                (["audio", "audio_lengths"], ["encoder_out", "lengths"]), wave_axes,
                paths["encoder"])
        state = torch.zeros(rnnt.pred_layers, 2, rnnt.pred_dim)
        _export(_PredictorGraph(model), (torch.tensor([0, 5]), state, state.clone()),
                (["tokens", "h", "c"], ["pred_out", "h_out", "c_out"]),
                ({0: n}, {1: n}, {1: n}), paths["predictor"])
        _export(_JointGraph(model),
                (torch.randn(2, rnnt.encoder_dim), torch.randn(2, rnnt.pred_dim)),
                (["encoder_frame", "pred_out"], ["log_probs"]), ({0: n}, {0: n}),
                paths["joint"])
        graphs.update({k: p.name for k, p in paths.items()})
    if not graphs:
        raise UserError("nothing to export: the model has neither a CTC head nor an RNN-T")
    # A model trained for streaming also gets its chunk step (asrkd.streaming).
    streaming = None if streaming_problems(model) else _export_streaming(model, out)
    if int8:
        filterbank = [list(buffer.shape) for name, buffer in model.features.named_buffers()
                      if "fbank" in name]
        for name in [*graphs.values(), *(streaming["graphs"].values() if streaming else ())]:
            _quantize(out.with_name(name), filterbank)
    description = {
        "format": FORMAT,
        "graphs": graphs,
        "tokenizer": model.tokenizer.to_dict(),
        "sample_rate": model.features.config.sample_rate,
        "blank_id": 0,
        "int8": int8,
        "encoder": encoder_shape(model),  # for the memory check of long inputs
        # What `asrkd infer --ckpt` runs on the same model, so that both print the same text.
        "default_method": model.default_method(),
        "streaming": streaming,
        "rnnt": None if model.decoder_type != "rnnt" else {
            "pred_layers": model.decoder.config.pred_layers,
            "pred_dim": model.decoder.config.pred_dim,
            "max_symbols_per_frame": model.decoder.config.max_symbols_per_frame,
        },
    }
    Path(f"{out}.json").write_text(json.dumps(description, indent=1), encoding="utf-8")
    return description


def _read_description(path: Path) -> dict:
    """The ``.json`` sidecar that ``asrkd export`` wrote beside ``path``, checked."""
    sidecar = Path(f"{path}.json")
    if not sidecar.is_file():
        raise FileNotFoundError(f"{sidecar} not found (written by `asrkd export` beside "
                                f"{path.name})")
    description = json.loads(sidecar.read_text(encoding="utf-8"))
    if description.get("format") != FORMAT:
        raise UserError(f"{sidecar}: not an asrkd ONNX export ({FORMAT})")
    return description


def _sessions(path: Path, graphs: dict[str, str], threads: int) -> dict:
    """onnxruntime CPU sessions of the graph files named in ``graphs``, beside ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return {name: ort.InferenceSession(str(path.with_name(file)), options,
                                       providers=["CPUExecutionProvider"])
            for name, file in graphs.items()}


class OnnxASR:
    """Transcribe with exported graphs and onnxruntime alone (no torch model needed).

    Args:
        path: the ``.onnx`` file given to ``asrkd export --out`` (its ``.json`` sits beside it).
        threads: onnxruntime intra-op threads.
    """

    def __init__(self, path: str | Path, threads: int = 2) -> None:
        path = Path(path)
        self.description = _read_description(path)
        self.tokenizer = tokenizer_from_dict(self.description["tokenizer"])
        self.sample_rate = int(self.description["sample_rate"])
        self.sessions = _sessions(path, self.description["graphs"], threads)

    @property
    def default_method(self) -> str:
        """The checkpoint's default search where these graphs run it (a transducer with a
        CTC head decodes with the transducer, as ``asrkd infer --ckpt`` does), else CTC
        greedy, else RNN-T greedy."""
        method = self.description.get("default_method")
        available = [m for m, graph in (("ctc_greedy", "ctc"), ("rnnt_greedy", "encoder"))
                     if graph in self.sessions]
        return method if method in available else available[0]

    def ctc_log_probs(self, audio: np.ndarray, lengths: np.ndarray):  # noqa: ANN201
        """(B, T, V) log-probs and (B,) frame lengths."""
        return self.sessions["ctc"].run(
            None, {"audio": audio.astype(np.float32), "audio_lengths": lengths.astype(np.int64)}
        )

    def _ctc_greedy(self, audio: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
        log_probs, frames = self.ctc_log_probs(audio, lengths)
        blank = self.description["blank_id"]
        results = []
        for row, length in zip(log_probs.argmax(-1), frames):
            ids = row[: int(length)]
            keep = (ids != blank) & (ids != np.concatenate([[blank], ids[:-1]]))
            results.append(ids[keep].tolist())
        return results

    def _rnnt_greedy(self, audio: np.ndarray, lengths: np.ndarray,
                     window: int = 16) -> list[list[int]]:
        """The label-looping greedy search of :func:`asrkd.decoding.rnnt.rnnt_greedy`: one joint
        run over the next ``window`` frames, then a jump to the first frame where a label wins."""
        encoder_out, frames = self.sessions["encoder"].run(
            None, {"audio": audio.astype(np.float32), "audio_lengths": lengths.astype(np.int64)}
        )
        config = self.description["rnnt"]
        limit = config["max_symbols_per_frame"]
        blank = self.description["blank_id"]
        predictor, joint = self.sessions["predictor"], self.sessions["joint"]
        results = []
        for b in range(encoder_out.shape[0]):
            h = np.zeros((config["pred_layers"], 1, config["pred_dim"]), dtype=np.float32)
            c = np.zeros_like(h)
            pred, h, c = predictor.run(None, {"tokens": np.array([blank]), "h": h, "c": c})
            tokens: list[int] = []
            t, emitted, n = 0, 0, int(frames[b])
            while t < n:
                ahead = encoder_out[b, t : min(t + window, n)]
                best = joint.run(None, {"encoder_frame": ahead,
                                        "pred_out": np.repeat(pred, len(ahead), 0)})[0].argmax(-1)
                wins = best != blank
                wins[0] &= emitted < limit  # at the cap the current frame takes its blank
                if not wins.any():
                    t, emitted = t + len(ahead), 0
                    continue
                jump = int(wins.argmax())
                if jump:
                    t, emitted = t + jump, 0
                tokens.append(int(best[jump]))
                emitted += 1
                pred, h, c = predictor.run(None, {"tokens": np.array([tokens[-1]]), "h": h,
                                                  "c": c})
            results.append(tokens)
        return results

    def infer(self, audio: np.ndarray, lengths: np.ndarray, method: str | None = None
              ) -> list[str]:
        """Texts of a batch of 16 kHz waveforms (B, S) with (B,) valid samples.

        Raises:
            UserError: before any work, when the batch would not fit in the memory available
                (exports from before this check was added are not checked).
        """
        if "encoder" in self.description:
            check_memory(encoder_bytes(self.description["encoder"], *audio.shape),
                         f"encoding {audio.shape[0]} x {audio.shape[1] / self.sample_rate:.0f} s "
                         "of audio in one pass",
                         "transcribe long recordings with `asrkd infer --ckpt`, which cuts "
                         "them at pauses")
        method = method or self.default_method
        if method == "ctc_greedy" and "ctc" in self.sessions:
            ids = self._ctc_greedy(audio, lengths)
        elif method == "rnnt_greedy" and "encoder" in self.sessions:
            ids = self._rnnt_greedy(audio, lengths)
        else:
            raise UserError(f"method {method!r} is not available in this export "
                             f"(graphs: {', '.join(self.sessions)})")
        return [self.tokenizer.decode(tokens) for tokens in ids]


class OnnxStreamer:
    """The streaming graphs of an export, in the form :class:`asrkd.streaming.StreamingRecognizer`
    runs (``StreamingRecognizer(OnnxStreamer("student.onnx"))``): the same chunk step, caches and
    features as the PyTorch model, with onnxruntime alone.

    Args:
        path: the ``.onnx`` file given to ``asrkd export --out`` for a model trained for
            streaming (its ``.json`` says so).
        threads: onnxruntime intra-op threads.
    """

    def __init__(self, path: str | Path, threads: int = 2) -> None:
        from asrkd.data.audio_processing import FeatureConfig

        path = Path(path)
        description = _read_description(path)
        layout = description.get("streaming")
        if not layout:
            raise UserError(f"{path}: not the export of a model trained for streaming (export "
                            "one whose config passes asrkd.streaming.streaming_problems)")
        self._sessions = _sessions(path, layout["graphs"], threads)
        self._layout = layout
        self.tokenizer = tokenizer_from_dict(description["tokenizer"])
        self.features_config = FeatureConfig(**{
            k: tuple(v) if isinstance(v, list) else v for k, v in layout["features"].items()
        })
        self.chunk_frames = int(layout["chunk_frames"])
        self._names = [item["name"] for item in layout["state"]]

    def initial_state(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(item["shape"], dtype=getattr(torch, item["dtype"]))
                     for item in self._layout["state"])

    def step(self, features: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = {"features": features.numpy(),
                  **{name: t.numpy() for name, t in zip(self._names, state)}}
        return tuple(torch.from_numpy(x) for x in self._sessions["stream"].run(None, inputs))

    def log_mel(self, padded: torch.Tensor) -> torch.Tensor:
        (frames,) = self._sessions["stream_features"].run(
            None, {"padded_audio": padded.numpy().astype(np.float32)})
        return torch.from_numpy(frames)


__all__ = ["OnnxASR", "OnnxStreamer", "export_onnx"]
