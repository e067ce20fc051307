"""RNN-Transducer head: prediction network and joint network (search: :mod:`asrkd.decoding.rnnt`).

The transducer sits on top of any encoder producing (B, T, D) states. Its joint output
(B, T, U+1, V) is trained with :func:`asrkd.losses.rnnt_loss`. The vocabulary is the
shared one (see docs/CONVENTIONS.md); blank (id 0) is both the "no emission" symbol and the start
symbol fed to the prediction network, as in NeMo and torchaudio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asrkd.errors import ConfigError

__all__ = [
    "RNNTConfig", "PredictionNetwork", "DecodingLSTM", "JointInputs", "JointNetwork",
    "RNNTransducer",
]

# LSTM state: (h, c), each (layers, N, pred_dim).
State = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class RNNTConfig:
    """Hyper-parameters of the transducer head.

    Also the ``model.rnnt`` section of a run config (``vocab_size``, ``encoder_dim`` and
    ``blank_id`` are filled in by :func:`~asrkd.models.e2e_asr.build_model`).

    Args:
        vocab_size: V, including blank.
        encoder_dim: D of the encoder states fed to the joint network.
        pred_dim: embedding and LSTM width of the prediction network.
        pred_layers: LSTM layers of the prediction network.
        joint_dim: hidden width of the joint network.
        dropout: dropout in the prediction network and before the joint output layer.
        blank_id: blank / start symbol.
        max_symbols_per_frame: default cap on labels emitted at one frame while decoding.
        joint_activation: "tanh" or "relu".
    """

    vocab_size: int = 0
    encoder_dim: int = 0
    pred_dim: int = 320
    pred_layers: int = 1
    joint_dim: int = 320
    dropout: float = 0.1
    blank_id: int = 0
    max_symbols_per_frame: int = 5
    joint_activation: str = "tanh"


class PredictionNetwork(nn.Module):
    """Label-history model: embedding + LSTM, started with the blank symbol."""

    def __init__(self, config: RNNTConfig) -> None:
        super().__init__()
        self.blank_id = config.blank_id
        self.embed = nn.Embedding(config.vocab_size, config.pred_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(
            config.pred_dim,
            config.pred_dim,
            num_layers=config.pred_layers,
            batch_first=True,
            dropout=config.dropout if config.pred_layers > 1 else 0.0,
        )

    def forward(self, targets: Tensor) -> Tensor:
        """Prediction-network outputs for every label prefix.

        Padding needs no lengths: the LSTM is causal, so positions past U_b only feed outputs
        past U_b, which the loss never reads.

        Args:
            targets: (B, U) label ids (any padding value inside the vocabulary).

        Returns:
            (B, U+1, pred_dim); position u summarises blank + targets[:u].
        """
        start = targets.new_full((targets.size(0), 1), self.blank_id)
        out, _ = self.lstm(self.dropout(self.embed(torch.cat([start, targets], dim=1))))
        return self.dropout(out)

    def step(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Advance the prediction network by one label.

        Args:
            tokens: (N,) last emitted label per hypothesis (blank at the start).
            state: LSTM state, each (layers, N, pred_dim), or None for a fresh start.

        Returns:
            (N, pred_dim) output and the new state.
        """
        x = self.dropout(self.embed(tokens))
        if self.training:  # the LSTM module applies its dropout between layers
            out, new_state = self.lstm(x.unsqueeze(1), state)
            return self.dropout(out.squeeze(1)), new_state
        # Decoding: the LSTM cell written out. One step of nn.LSTM costs ~180 us of setup on
        # a CPU (mkldnn), several times these few small ops, and search takes a step per label.
        if state is None:
            zeros = x.new_zeros(self.lstm.num_layers, x.size(0), self.lstm.hidden_size)
            state = (zeros, zeros)
        hs, cs = [], []
        for layer in range(self.lstm.num_layers):
            gates = F.linear(x, getattr(self.lstm, f"weight_ih_l{layer}"),
                             getattr(self.lstm, f"bias_ih_l{layer}")) + F.linear(
                state[0][layer], getattr(self.lstm, f"weight_hh_l{layer}"),
                getattr(self.lstm, f"bias_hh_l{layer}"))
            i, f, g, o = gates.chunk(4, dim=-1)  # nn.LSTM's gate order
            c = torch.sigmoid(f) * state[1][layer] + torch.sigmoid(i) * torch.tanh(g)
            x = torch.sigmoid(o) * torch.tanh(c)
            hs.append(x)
            cs.append(c)
        return self.dropout(x), (torch.stack(hs), torch.stack(cs))

    def for_decoding(self) -> DecodingLSTM:
        """This network's weights laid out for greedy search (see :class:`DecodingLSTM`),
        built once and kept until a parameter changes (moved, loaded or updated in place)."""
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())
        cached = self.__dict__.get("_decoding_lstm")
        if cached is None or cached[0] != key:
            cached = (key, DecodingLSTM(self))
            self.__dict__["_decoding_lstm"] = cached  # a plain attribute: not in state_dict
        return cached[1]


def lstm_steps(inputs: Tensor, state: list[tuple[Tensor, Tensor]], recurrent: list[Tensor],
               biases: list[Tensor]) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """One step of :class:`DecodingLSTM`'s stacked LSTM for N rows: ``inputs`` (N, 4H) are the
    first layer's projected inputs (rows of its ``table``), ``state`` one (h, c) pair of
    (N, H) per layer; returns the top layer's output (N, H) and the new state.

    A free function in TorchScript's subset of Python: the batched greedy search compiles
    it into its label loop (see :func:`asrkd.decoding.rnnt.rnnt_greedy`).
    """
    x = inputs
    new: list[tuple[Tensor, Tensor]] = []
    for layer in range(len(state)):
        h, c = state[layer]
        if layer == 0:
            gates = torch.addmm(inputs, h, recurrent[0])
        else:
            # Upper layers: [x, h] @ [W_ih; W_hh]^T + b in one product.
            gates = torch.addmm(biases[layer - 1], torch.cat([x, h], dim=-1), recurrent[layer])
        x, c = lstm_cell(gates, c)
        new.append((x, c))
    return x, new


def lstm_cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The LSTM cell update from pre-activation ``gates`` (..., 4H) ordered (i, f, o, g) as in
    :class:`DecodingLSTM`, and the cell state ``c`` (..., H): the new (h, c). One sigmoid covers
    i, f and o. TorchScript compatible, like :func:`lstm_steps`."""
    h3 = 3 * c.size(-1)
    i, f, o = gates[..., :h3].sigmoid().chunk(3, dim=-1)
    c = torch.addcmul(f * c, i, gates[..., h3:].tanh())
    return o * c.tanh(), c


def joint_logits(encoder_proj: Tensor, pred_proj: Tensor, weight: Tensor, bias: Tensor,
                 tanh: bool) -> Tensor:
    """The joint network's output layer over projected inputs, without dropout (search):
    ``F.linear(act(encoder_proj + pred_proj), weight, bias)``, act tanh or ReLU. TorchScript
    compatible, like :func:`lstm_steps`."""
    hidden = encoder_proj + pred_proj
    hidden = hidden.tanh() if tanh else hidden.relu()
    return F.linear(hidden, weight, bias)


class DecodingLSTM:
    """The prediction network's LSTM prepared for search (no dropout, no autograd).

    Search steps the network once per emitted label, on a handful of rows, so each step costs
    its number of kernel launches more than its arithmetic. Here the first layer's input
    projection is folded into a (V, 4H) table indexed by the label (the embedding times
    ``W_ih`` plus both biases, computed once), and the gates are reordered to (i, f, o, g) so
    that one sigmoid and one tanh cover them: a one-layer step is one row lookup, one
    matrix product and six element-wise kernels. Same arithmetic as :meth:`PredictionNetwork.
    step` in eval mode up to float rounding.

    State: a list with one ``(h, c)`` pair per layer, each (N, H) (or (H,) for one
    hypothesis with :meth:`step_one`).
    """

    def __init__(self, network: PredictionNetwork) -> None:
        lstm = network.lstm
        hidden = lstm.hidden_size
        self.hidden = hidden
        self.layers = lstm.num_layers
        order = torch.cat([torch.arange(0, 2 * hidden), torch.arange(3 * hidden, 4 * hidden),
                           torch.arange(2 * hidden, 3 * hidden)]).to(network.embed.weight.device)
        # Built at the parameters' precision even inside an autocast region (validation under
        # bf16-mixed), since the layout is cached and reused outside it.
        with torch.no_grad(), torch.autocast(order.device.type, enabled=False):
            def weights(name: str, layer: int) -> Tensor:
                return getattr(lstm, f"{name}_l{layer}")[order]

            bias = weights("bias_ih", 0) + weights("bias_hh", 0)
            self.table = F.linear(network.embed.weight, weights("weight_ih", 0), bias)  # (V, 4H)
            self.recurrent = [weights("weight_hh", 0).t().contiguous()]  # (H, 4H) per layer
            self.biases: list[Tensor] = []
            for layer in range(1, self.layers):
                # Upper layers: [x, h] @ [W_ih; W_hh]^T + b in one product.
                self.recurrent.append(torch.cat(
                    [weights("weight_ih", layer), weights("weight_hh", layer)], dim=1
                ).t().contiguous())
                self.biases.append(weights("bias_ih", layer) + weights("bias_hh", layer))

    def start(self, rows: int) -> list[tuple[Tensor, Tensor]]:
        """The zero state of ``rows`` hypotheses (each (rows, H))."""
        zeros = self.table.new_zeros(rows, self.hidden)
        return [(zeros, zeros)] * self.layers

    def step(self, tokens: Tensor, state: list[tuple[Tensor, Tensor]]
             ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Advance N hypotheses by one label each: ``tokens`` (N,) -> output (N, H) and the
        new state."""
        return lstm_steps(self.table.index_select(0, tokens), state, self.recurrent,
                          self.biases)

    def step_one(self, token: int, state: list[tuple[Tensor, Tensor]]
                 ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """:meth:`step` for one hypothesis: ``token`` a Python int, state of (H,) vectors."""
        h, c = state[0]
        x, c = lstm_cell(torch.addmv(self.table[token], self.recurrent[0].t(), h), c)
        new = [(x, c)]
        for layer in range(1, self.layers):
            h, c = state[layer]
            gates = torch.addmv(self.biases[layer - 1], self.recurrent[layer].t(),
                                torch.cat([x, h]))
            x, c = lstm_cell(gates, c)
            new.append((x, c))
        return x, new


class JointNetwork(nn.Module):
    """Combines encoder and prediction states: out(act(W_e enc + W_p pred))."""

    def __init__(self, config: RNNTConfig) -> None:
        super().__init__()
        if config.joint_activation not in ("tanh", "relu"):
            raise ConfigError(f"unknown joint_activation {config.joint_activation!r}")
        self.encoder_proj = nn.Linear(config.encoder_dim, config.joint_dim)
        self.pred_proj = nn.Linear(config.pred_dim, config.joint_dim)
        self.activation = nn.Tanh() if config.joint_activation == "tanh" else nn.ReLU()
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.joint_dim, config.vocab_size)

    def combine(self, encoder_proj: Tensor, pred_proj: Tensor) -> Tensor:
        """Joint logits from already-projected inputs; any broadcastable shapes.

        Decoders project once and call this per step, so the projections are not repeated.

        Args:
            encoder_proj: (..., joint_dim), e.g. (B, T, 1, J) for training or (N, J) decoding.
            pred_proj: (..., joint_dim), e.g. (B, 1, U+1, J) or (N, J).

        Returns:
            (..., V) unnormalised logits.
        """
        return self.output(self.dropout(self.activation(encoder_proj + pred_proj)))

    def search_pred_proj(self, pred_out: Tensor) -> Tensor:
        """``pred_proj(pred_out)`` without the module call, for search (once per label)."""
        return F.linear(pred_out, self.pred_proj.weight, self.pred_proj.bias)

    def search_logits(self, encoder_proj: Tensor, pred_proj: Tensor) -> Tensor:
        """:meth:`combine` without dropout or module calls, for search in eval mode (a
        few microseconds less per call, and search calls it once per emitted label)."""
        return joint_logits(encoder_proj, pred_proj, self.output.weight, self.output.bias,
                            isinstance(self.activation, nn.Tanh))

    def forward(self, encoder_out: Tensor, pred_out: Tensor) -> Tensor:
        """Full lattice of joint logits.

        Args:
            encoder_out: (B, T, D).
            pred_out: (B, U+1, pred_dim).

        Returns:
            (B, T, U+1, V).
        """
        return self.combine(
            self.encoder_proj(encoder_out).unsqueeze(2), self.pred_proj(pred_out).unsqueeze(1)
        )


@dataclass
class JointInputs:
    """The joint network's projected inputs over a (T, U+1) lattice, for
    :func:`~asrkd.losses.rnnt.rnnt_joint_loss`, which evaluates the joint block by block
    instead of materialising the (B, T, U+1, V) logits.

    Attributes:
        joint: the network whose :meth:`JointNetwork.combine` makes logits.
        encoder_proj: (B, T, J). pred_proj: (B, U+1, J).
    """

    joint: JointNetwork
    encoder_proj: Tensor
    pred_proj: Tensor

    def logits(self) -> Tensor:
        """The whole (B, T, U+1, V) lattice of logits."""
        return self.joint.combine(self.encoder_proj.unsqueeze(2), self.pred_proj.unsqueeze(1))


class RNNTransducer(nn.Module):
    """RNN-T head over encoder states: the training logits over the (T, U+1) lattice."""

    def __init__(self, config: RNNTConfig) -> None:
        super().__init__()
        if not 0 <= config.blank_id < config.vocab_size:
            raise ConfigError("blank_id must be inside the vocabulary")
        self.config = config
        self.blank_id = config.blank_id
        self.prediction = PredictionNetwork(config)
        self.joint = JointNetwork(config)

    def forward(
        self,
        encoder_out: Tensor,
        encoder_lengths: Tensor,
        targets: Tensor,
        target_lengths: Tensor,
    ) -> Tensor:
        """Joint logits over the whole (T, U+1) lattice, ready for ``rnnt_loss``.

        The lengths are not needed to compute the logits (padded cells are ignored by the
        loss); they are taken so that every head shares one call signature.

        Args:
            encoder_out: (B, T, D) encoder states.
            encoder_lengths: (B,) valid frames.
            targets: (B, U) label ids, padded with any in-vocabulary id (pad id 1).
            target_lengths: (B,) valid labels.

        Returns:
            (B, T, U+1, V) unnormalised joint logits.
        """
        del encoder_lengths, target_lengths  # padding is handled by the loss's lengths
        return self.joint_inputs(encoder_out, targets).logits()

    def joint_inputs(self, encoder_out: Tensor, targets: Tensor) -> JointInputs:
        """The projected encoder and prediction states of the training lattice (the logits
        of :meth:`forward` are ``joint_inputs(...).logits()``).

        Args:
            encoder_out: (B, T, D). targets: (B, U) label ids (padding: any in-vocabulary id).
        """
        return JointInputs(self.joint, self.joint.encoder_proj(encoder_out),
                           self.joint.pred_proj(self.prediction(targets)))
