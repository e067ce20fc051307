"""RNN-T search over a :class:`~asrkd.models.rnnt.RNNTransducer`: batched label-looping greedy
decoding and time-synchronous beam search with prefix merging."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from asrkd.errors import ConfigError
from asrkd.models.common import Hypothesis, logaddexp
from asrkd.models.rnnt import RNNTransducer, State


@dataclass
class _BeamHyp:
    """One beam entry: a label prefix, its path log-prob and cached prediction state."""

    tokens: tuple[int, ...]
    score: float
    timestamps: tuple[int, ...]
    pred_proj: Tensor  # (J,) projected prediction output after ``tokens``
    state: State  # each (layers, 1, pred_dim)


def _max_symbols(transducer: RNNTransducer, max_symbols_per_frame: int | None) -> int:
    limit = (
        transducer.config.max_symbols_per_frame
        if max_symbols_per_frame is None
        else max_symbols_per_frame
    )
    if limit < 1:
        raise ConfigError("max_symbols_per_frame must be >= 1")
    return limit


@torch.no_grad()
def rnnt_greedy(
    transducer: RNNTransducer,
    encoder_out: Tensor,
    encoder_lengths: Tensor,
    max_symbols_per_frame: int | None = None,
    window: int = 16,
) -> list[Hypothesis]:
    """Batched greedy decoding: at every frame emit the arg-max label until blank wins.

    A frame is left after blank or after ``max_symbols_per_frame`` labels; in the latter
    case the blank log-prob of that frame is still added, so ``score`` is always the
    log-probability of a complete alignment path. Frames past each utterance's length are
    skipped, so the result of an utterance does not depend on the rest of the batch. Call
    ``eval()`` first for deterministic output.

    The search loops over labels, not frames (the label-looping idea of NeMo's batched
    greedy decoder): while an utterance emits nothing its prediction output does not change,
    so the joint is evaluated for its next ``window`` frames at once and the utterance jumps
    to the first frame where a label wins (adding the blank log-probs of the frames it
    skips). Each pass of the loop costs one joint evaluation over ``(B, window)`` and one
    prediction-network step, so a batch takes about
    ``U_max + T / window`` passes instead of ``T + U_max``. Hypotheses are those of the
    frame-by-frame search.

    Args:
        encoder_out: (B, T, D) encoder states.
        encoder_lengths: (B,) valid frames.
        max_symbols_per_frame: label cap per frame; defaults to the config's.
        window: frames looked ahead per pass (memory ``B * window * V``).

    Returns:
        B hypotheses with token ids (never blank), path log-prob and emission frames.
    """
    limit = _max_symbols(transducer, max_symbols_per_frame)
    if window < 1:
        raise ConfigError("window must be >= 1")
    batch, frames, _ = encoder_out.shape
    device = encoder_out.device
    blank = transducer.blank_id
    lengths = encoder_lengths.to(device).long()
    enc_proj = transducer.joint.encoder_proj(encoder_out)  # (B, T, J)

    last = torch.full((batch,), blank, dtype=torch.long, device=device)
    pred_out, state = transducer.prediction.step(last)
    pred_proj = transducer.joint.pred_proj(pred_out)  # (B, J)
    scores = torch.zeros(batch, dtype=torch.float64, device=device)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    stamps: list[list[int]] = [[] for _ in range(batch)]
    frame = torch.zeros(batch, dtype=torch.long, device=device)  # current frame per utterance
    emitted = torch.zeros(batch, dtype=torch.long, device=device)  # labels emitted at it
    offsets = torch.arange(window, device=device)
    rows = torch.arange(batch, device=device)

    # Every pass works on the whole batch: an utterance past its last frame has no valid
    # frame in its window, so it neither jumps nor emits (cheaper than indexing subsets).
    while bool((frame < lengths).any()):
        ahead = frame.unsqueeze(1) + offsets  # (B, W) frames looked at
        valid = ahead < lengths.unsqueeze(1)
        index = ahead.clamp(max=frames - 1).unsqueeze(2).expand(-1, -1, enc_proj.size(-1))
        log_probs = transducer.joint.combine(
            enc_proj.gather(1, index), pred_proj.unsqueeze(1)
        ).log_softmax(-1)  # (B, W, V)
        best = log_probs.argmax(-1)
        wins = (best != blank) & valid
        wins[:, 0] &= emitted < limit  # at the cap the current frame takes its blank
        found = wins.any(1)
        # First frame where a label wins, or past the valid frames of the window.
        jump = torch.where(found, wins.int().argmax(1), valid.sum(1))
        skipped = offsets.unsqueeze(0) < jump.unsqueeze(1)
        scores += (log_probs[..., blank].double() * skipped).sum(1)
        frame += jump
        emitted.masked_fill_(jump > 0, 0)
        if not bool(found.any()):
            continue
        at = jump.clamp(max=window - 1)  # rows that found nothing read a discarded value
        labels = best[rows, at]
        scores += torch.where(found, log_probs[rows, at, labels].double(), 0.0)
        emitted += found
        label_list, frame_list = labels.tolist(), frame.tolist()
        for b in found.nonzero().squeeze(1).tolist():
            tokens[b].append(label_list[b])
            stamps[b].append(frame_list[b])
        # One prediction-network step for the batch; only the emitting rows take it.
        new_out, (h, c) = transducer.prediction.step(labels, state)
        keep = found.view(1, -1, 1)
        state = (torch.where(keep, h, state[0]), torch.where(keep, c, state[1]))
        pred_proj = torch.where(found.unsqueeze(1), transducer.joint.pred_proj(new_out),
                                pred_proj)

    return [
        Hypothesis(tokens=tokens[b], score=float(scores[b]), timestamps=stamps[b])
        for b in range(batch)
    ]


@torch.no_grad()
def rnnt_beam(
    transducer: RNNTransducer,
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
        raise ConfigError("beam_size must be >= 1")
    if merge not in ("max", "sum"):
        raise ConfigError(f"unknown merge {merge!r}")
    limit = _max_symbols(transducer, max_symbols_per_frame)
    lengths = encoder_lengths.tolist()
    return [
        _beam_one(transducer, encoder_out[b, : int(lengths[b])], beam_size, limit, merge)
        for b in range(encoder_out.size(0))
    ]


def _beam_one(
    transducer: RNNTransducer, encoder_out: Tensor, beam_size: int, limit: int, merge: str
) -> Hypothesis:
    """Beam search over one utterance's (T_b, D) encoder states."""
    device = encoder_out.device
    blank = transducer.blank_id
    enc_proj = transducer.joint.encoder_proj(encoder_out)  # (T_b, J)
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
        out, (h, c) = transducer.prediction.step(last, state)
        proj = transducer.joint.pred_proj(out)
        for n, i in enumerate(todo):
            cache[prefixes[i]] = (proj[n], (h[:, n : n + 1], c[:, n : n + 1]))

    start_out, start_state = transducer.prediction.step(
        torch.full((1,), blank, dtype=torch.long, device=device)
    )
    beam = [_BeamHyp((), 0.0, (), transducer.joint.pred_proj(start_out)[0], start_state)]

    for t in range(encoder_out.size(0)):
        arrived: dict[tuple[int, ...], _BeamHyp] = {}  # entries that took blank at t
        active = beam
        for emitted in range(limit + 1):
            if not active:
                break
            log_probs = transducer.joint.combine(
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
                    merged = logaddexp(score, old.score)
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
    return Hypothesis(tokens=list(best.tokens), score=best.score, timestamps=list(best.timestamps))
