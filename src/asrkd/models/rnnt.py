"""RNN-Transducer head: prediction network, joint network, greedy and beam decoding.

The transducer sits on top of any encoder producing (B, T, D) states. Its joint output
(B, T, U+1, V) is trained with :func:`asrkd.training.rnnt_loss.rnnt_loss`. The vocabulary is the
shared one (see docs/CONVENTIONS.md); blank (id 0) is both the "no emission" symbol and the start
symbol fed to the prediction network, as in NeMo and torchaudio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from asrkd.models.common import Hypothesis

__all__ = ["RNNTConfig", "PredictionNetwork", "JointNetwork", "RNNTransducer"]

# LSTM state: (h, c), each (layers, N, pred_dim).
State = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class RNNTConfig:
    """Hyper-parameters of the transducer head.

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

    vocab_size: int
    encoder_dim: int
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
        out, new_state = self.lstm(self.dropout(self.embed(tokens.unsqueeze(1))), state)
        return self.dropout(out.squeeze(1)), new_state


class JointNetwork(nn.Module):
    """Combines encoder and prediction states: out(act(W_e enc + W_p pred))."""

    def __init__(self, config: RNNTConfig) -> None:
        super().__init__()
        if config.joint_activation not in ("tanh", "relu"):
            raise ValueError(f"unknown joint_activation {config.joint_activation!r}")
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


def _logaddexp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) for Python floats, safe for -inf."""
    hi, lo = max(a, b), min(a, b)
    if lo == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))


@dataclass
class _BeamHyp:
    """One beam entry: a label prefix, its path log-prob and cached prediction state."""

    tokens: tuple[int, ...]
    score: float
    timestamps: tuple[int, ...]
    pred_proj: Tensor  # (J,) projected prediction output after ``tokens``
    state: State  # each (layers, 1, pred_dim)


class RNNTransducer(nn.Module):
    """RNN-T head over encoder states: training logits plus greedy and beam decoding."""

    def __init__(self, config: RNNTConfig) -> None:
        super().__init__()
        if not 0 <= config.blank_id < config.vocab_size:
            raise ValueError("blank_id must be inside the vocabulary")
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
        return self.joint(encoder_out, self.prediction(targets))

    def _max_symbols(self, max_symbols_per_frame: int | None) -> int:
        limit = (
            self.config.max_symbols_per_frame
            if max_symbols_per_frame is None
            else max_symbols_per_frame
        )
        if limit < 1:
            raise ValueError("max_symbols_per_frame must be >= 1")
        return limit

    @torch.no_grad()
    def greedy_search(
        self,
        encoder_out: Tensor,
        encoder_lengths: Tensor,
        max_symbols_per_frame: int | None = None,
    ) -> list[Hypothesis]:
        """Batched greedy decoding: at every frame emit the arg-max label until blank wins.

        A frame is left after blank or after ``max_symbols_per_frame`` labels; in the latter
        case the blank log-prob of that frame is still added, so ``score`` is always the
        log-probability of a complete alignment path. Only utterances that emitted a label
        advance the prediction network; frames past each utterance's length are skipped, so
        the result of an utterance does not depend on the rest of the batch. Call ``eval()``
        first for deterministic output.

        Args:
            encoder_out: (B, T, D) encoder states.
            encoder_lengths: (B,) valid frames.
            max_symbols_per_frame: label cap per frame; defaults to the config's.

        Returns:
            B hypotheses with token ids (never blank), path log-prob and emission frames.
        """
        limit = self._max_symbols(max_symbols_per_frame)
        batch, frames, _ = encoder_out.shape
        device = encoder_out.device
        lengths = encoder_lengths.to(device)
        enc_proj = self.joint.encoder_proj(encoder_out)  # (B, T, J)

        last = torch.full((batch,), self.blank_id, dtype=torch.long, device=device)
        pred_out, state = self.prediction.step(last)
        pred_proj = self.joint.pred_proj(pred_out)  # (B, J)
        scores = torch.zeros(batch, dtype=torch.float64, device=device)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        stamps: list[list[int]] = [[] for _ in range(batch)]

        for t in range(frames):
            done = lengths <= t  # finished utterances take no part in this frame
            emitted = torch.zeros(batch, dtype=torch.long, device=device)
            while not bool(done.all()):
                log_probs = self.joint.combine(enc_proj[:, t], pred_proj).log_softmax(-1).double()
                best = log_probs.argmax(dim=-1)
                emit = ~done & (best != self.blank_id) & (emitted < limit)
                leave = ~done & ~emit
                # Leaving a frame is taking its blank (forced when the cap is hit).
                scores += torch.where(leave, log_probs[:, self.blank_id], 0.0)
                done = done | leave
                if not bool(emit.any()):
                    break
                idx = emit.nonzero().squeeze(1)
                labels = best[idx]
                scores[idx] += log_probs[idx, labels]
                emitted[idx] += 1
                for b, label in zip(idx.tolist(), labels.tolist(), strict=True):
                    tokens[b].append(label)
                    stamps[b].append(t)
                # Step the prediction network for the emitting utterances only.
                sub_state = (state[0][:, idx], state[1][:, idx])
                new_out, (h, c) = self.prediction.step(labels, sub_state)
                state[0][:, idx] = h
                state[1][:, idx] = c
                pred_proj[idx] = self.joint.pred_proj(new_out)

        return [
            Hypothesis(tokens=tokens[b], score=float(scores[b]), timestamps=stamps[b])
            for b in range(batch)
        ]

    @torch.no_grad()
    def beam_search(
        self,
        encoder_out: Tensor,
        encoder_lengths: Tensor,
        beam_size: int = 4,
        max_symbols_per_frame: int | None = None,
        merge: str = "max",
    ) -> list[Hypothesis]:
        """Time-synchronous beam search with prefix merging, one utterance at a time.

        At each frame every beam entry may emit up to ``max_symbols_per_frame`` labels before
        taking the frame's blank; entries reaching the next frame with the same label sequence
        are merged. Label expansions are pruned to the ``beam_size`` best, and any expansion
        already worse than the ``beam_size``-th entry for the next frame is dropped (extending a
        prefix can only lower its score). The prediction network output of each prefix is
        cached, since many entries share prefixes.

        Args:
            encoder_out: (B, T, D) encoder states.
            encoder_lengths: (B,) valid frames.
            beam_size: entries kept per frame.
            max_symbols_per_frame: label cap per frame; defaults to the config's.
            merge: "max" keeps the better of two merged paths, so ``score`` is the log-prob of
                one alignment path (comparable with greedy); "sum" adds their probabilities
                (log-prob of the label sequence over the merged alignments).

        Returns:
            B best hypotheses (token ids never blank, score, emission frames of the kept path).
        """
        if beam_size < 1:
            raise ValueError("beam_size must be >= 1")
        if merge not in ("max", "sum"):
            raise ValueError(f"unknown merge {merge!r}")
        limit = self._max_symbols(max_symbols_per_frame)
        lengths = encoder_lengths.tolist()
        return [
            self._beam_one(encoder_out[b, : int(lengths[b])], beam_size, limit, merge)
            for b in range(encoder_out.size(0))
        ]

    def _beam_one(self, encoder_out: Tensor, beam_size: int, limit: int, merge: str) -> Hypothesis:
        """Beam search over one utterance's (T_b, D) encoder states."""
        device = encoder_out.device
        blank = self.blank_id
        enc_proj = self.joint.encoder_proj(encoder_out)  # (T_b, J)
        cache: dict[tuple[int, ...], tuple[Tensor, State]] = {}

        def predict(prefixes: list[tuple[int, ...]], parents: list[_BeamHyp]) -> None:
            """Fill the cache for new prefixes, stepping the LSTM once for all of them."""
            todo = [i for i, p in enumerate(prefixes) if p not in cache]
            if not todo:
                return
            last = torch.tensor([prefixes[i][-1] for i in todo], device=device)
            state = (
                torch.cat([parents[i].state[0] for i in todo], dim=1),
                torch.cat([parents[i].state[1] for i in todo], dim=1),
            )
            out, (h, c) = self.prediction.step(last, state)
            proj = self.joint.pred_proj(out)
            for n, i in enumerate(todo):
                cache[prefixes[i]] = (proj[n], (h[:, n : n + 1], c[:, n : n + 1]))

        start_out, start_state = self.prediction.step(
            torch.full((1,), blank, dtype=torch.long, device=device)
        )
        beam = [_BeamHyp((), 0.0, (), self.joint.pred_proj(start_out)[0], start_state)]

        for t in range(encoder_out.size(0)):
            arrived: dict[tuple[int, ...], _BeamHyp] = {}  # entries that took blank at t
            active = beam
            for emitted in range(limit + 1):
                if not active:
                    break
                log_probs = self.joint.combine(
                    enc_proj[t].unsqueeze(0), torch.stack([h.pred_proj for h in active])
                ).log_softmax(-1)
                lp = log_probs.double().cpu()
                for n, hyp in enumerate(active):
                    score = hyp.score + float(lp[n, blank])
                    old = arrived.get(hyp.tokens)
                    if old is None:
                        arrived[hyp.tokens] = _BeamHyp(
                            hyp.tokens, score, hyp.timestamps, hyp.pred_proj, hyp.state
                        )
                    elif merge == "sum":
                        best = hyp if score > old.score else old
                        merged = _logaddexp(score, old.score)
                        arrived[hyp.tokens] = _BeamHyp(
                            best.tokens, merged, best.timestamps, best.pred_proj, best.state
                        )
                    elif score > old.score:
                        arrived[hyp.tokens] = _BeamHyp(
                            hyp.tokens, score, hyp.timestamps, hyp.pred_proj, hyp.state
                        )
                if emitted == limit:
                    break
                # Label expansions: the beam_size best over all (entry, label) pairs.
                lp[:, blank] = -math.inf
                cand = torch.tensor([h.score for h in active], dtype=torch.float64).unsqueeze(1)
                cand = cand + lp
                k = min(beam_size, cand.numel())
                top_scores, top_idx = cand.flatten().topk(k)
                # Nothing below the beam_size-th arrived score can survive this frame.
                floor = -math.inf
                if len(arrived) >= beam_size:
                    floor = sorted((h.score for h in arrived.values()), reverse=True)[beam_size - 1]
                vocab = lp.size(1)
                parents: list[_BeamHyp] = []
                prefixes: list[tuple[int, ...]] = []
                new_scores: list[float] = []
                for score, flat in zip(top_scores.tolist(), top_idx.tolist(), strict=True):
                    if score == -math.inf or score <= floor:
                        continue
                    parent = active[flat // vocab]
                    parents.append(parent)
                    prefixes.append(parent.tokens + (flat % vocab,))
                    new_scores.append(score)
                predict(prefixes, parents)
                active = []
                for parent, prefix, score in zip(parents, prefixes, new_scores, strict=True):
                    proj, state = cache[prefix]
                    active.append(_BeamHyp(prefix, score, parent.timestamps + (t,), proj, state))
            beam = sorted(arrived.values(), key=lambda h: h.score, reverse=True)[:beam_size]

        best = max(beam, key=lambda h: h.score)
        return Hypothesis(
            tokens=list(best.tokens), score=best.score, timestamps=list(best.timestamps)
        )
