"""RNN-T search over a :class:`~asrkd.models.rnnt.RNNTransducer`: batched label-looping greedy
decoding and time-synchronous beam search with prefix merging."""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asrkd.errors import ConfigError
from asrkd.models.common import Hypothesis, logaddexp
from asrkd.models.rnnt import DecodingLSTM, RNNTransducer, State, joint_logits, lstm_steps

log = logging.getLogger(__name__)


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
    window: int = 8,
) -> list[Hypothesis]:
    """Batched greedy decoding: at every frame emit the arg-max label until blank wins.

    A frame is left after blank or after ``max_symbols_per_frame`` labels; in the latter
    case the blank log-prob of that frame is still added, so ``score`` is always the
    log-probability of a complete alignment path. Frames past each utterance's length are
    skipped, so the result of an utterance does not depend on the rest of the batch. The
    prediction and joint networks run without dropout, as in eval mode.

    The search loops over labels, not frames (the label-looping idea of NeMo's batched
    greedy decoder): while an utterance emits nothing its prediction output does not change,
    so the joint is evaluated for its next ``window`` frames at once and the utterance jumps
    to the first frame where a label wins. Each pass of the loop costs one joint evaluation
    over ``(B, window)`` and one prediction-network step (:class:`~asrkd.models.rnnt.
    DecodingLSTM`), so a batch takes about ``U_max + T / window`` passes instead of
    ``T + U_max``. A pass does only what choosing the path needs; the path's score is computed
    afterwards in one joint evaluation over its ``T + U`` nodes. One utterance is searched
    with Python scalars instead of batch masks (half the kernels per label). Hypotheses are
    those of the frame-by-frame search.

    Args:
        encoder_out: (B, T, D) encoder states.
        encoder_lengths: (B,) valid frames.
        max_symbols_per_frame: label cap per frame; defaults to the config's.
        window: frames looked ahead per pass (memory ``B * window * V``). A wider window
            takes fewer passes through silence but evaluates the joint on more frames that
            an emission makes useless; 8 was fastest of 4-24 on the AN4 transducers at batch
            1 and 16 (``benchmarks/rnnt_greedy.py``).

    Returns:
        B hypotheses with token ids (never blank), path log-prob and emission frames.
    """
    limit = _max_symbols(transducer, max_symbols_per_frame)
    if window < 1:
        raise ConfigError("window must be >= 1")
    joint = transducer.joint
    lstm = transducer.prediction.for_decoding()
    lengths = encoder_lengths.to(encoder_out.device).long()
    enc_proj = joint.encoder_proj(encoder_out)  # (B, T, J)
    search = _search_one if encoder_out.size(0) == 1 else _search_batch
    tokens, stamps, prefixes = search(transducer, lstm, enc_proj, lengths, limit, window)
    scores = _path_scores(transducer, enc_proj, lengths, tokens, stamps, prefixes)
    return [
        Hypothesis(tokens=tokens[b], score=scores[b], timestamps=stamps[b])
        for b in range(len(tokens))
    ]


def _search_one(transducer: RNNTransducer, lstm: DecodingLSTM, enc_proj: Tensor,
                lengths: Tensor, limit: int, window: int
                ) -> tuple[list[list[int]], list[list[int]], Tensor]:
    """The greedy path of one utterance: its labels, their frames and the (1, U+1, J)
    projected prediction outputs after each label prefix."""
    joint = transducer.joint
    blank = transducer.blank_id
    enc = enc_proj[0, : int(lengths[0])]
    state = [(h[0], c[0]) for h, c in lstm.start(1)]
    out, state = lstm.step_one(blank, state)
    pred = joint.search_pred_proj(out)  # (J,)
    prefixes = [pred]
    tokens: list[int] = []
    stamps: list[int] = []
    frame, emitted, frames = 0, 0, enc.size(0)
    while frame < frames:
        best = joint.search_logits(enc[frame : frame + window], pred).argmax(-1).tolist()
        # At the cap the current frame takes its blank; a label can win from the next one.
        first = 1 if emitted >= limit else 0
        jump = next((j for j in range(first, len(best)) if best[j] != blank), None)
        if jump is None:
            frame, emitted = frame + len(best), 0
            continue
        if jump:
            frame, emitted = frame + jump, 0
        label = best[jump]
        tokens.append(label)
        stamps.append(frame)
        emitted += 1
        out, state = lstm.step_one(label, state)
        pred = joint.search_pred_proj(out)
        prefixes.append(pred)
    return [tokens], [stamps], torch.stack(prefixes).unsqueeze(0)


def _search_batch(transducer: RNNTransducer, lstm: DecodingLSTM, enc_proj: Tensor,
                  lengths: Tensor, limit: int, window: int
                  ) -> tuple[list[list[int]], list[list[int]], Tensor]:
    """The greedy paths of a batch, all utterances in every pass: per utterance its labels
    and their frames, and the (B, U_max+1, J) projected prediction outputs after each of its
    label prefixes (padded)."""
    joint = transducer.joint
    batch, frames, width = enc_proj.shape
    device = enc_proj.device
    blank = transducer.blank_id
    # Padded by one window of frames so that every look-ahead reads inside the tensor.
    flat = torch.cat([enc_proj, enc_proj.new_zeros(batch, window, width)], 1).view(-1, width)
    offsets = torch.arange(window, device=device)
    row_offsets = (torch.arange(batch, device=device) * (frames + window)).unsqueeze(1) + offsets

    state = lstm.start(batch)
    out, state = lstm.step(torch.full((batch,), blank, dtype=torch.long, device=device), state)
    first_pred = joint.search_pred_proj(out)  # (B, J)
    passes = _compiled_label_loop()(
        flat, row_offsets, offsets, lengths.unsqueeze(1), first_pred, state, lstm.table,
        lstm.recurrent, lstm.biases, joint.pred_proj.weight, joint.pred_proj.bias,
        joint.output.weight, joint.output.bias, isinstance(joint.activation, nn.Tanh), blank,
        limit, window)

    tokens: list[list[int]] = [[] for _ in range(batch)]
    stamps: list[list[int]] = [[] for _ in range(batch)]
    if not passes[0]:
        return tokens, stamps, first_pred.unsqueeze(1)
    found, labels, frame_at, preds = (torch.stack(x) for x in passes)
    found, frame_at = found.squeeze(2), frame_at.squeeze(2)  # (passes, B)
    pass_ids, rows = found.t().nonzero(as_tuple=True)[::-1]  # ordered by utterance, then pass
    counts = found.sum(0)
    for b, (label_list, frame_list) in enumerate(zip(
        labels[pass_ids, rows].split(counts.tolist()), frame_at[pass_ids, rows].split(
            counts.tolist()), strict=True)):
        tokens[b], stamps[b] = label_list.tolist(), frame_list.tolist()
    # Prefix k >= 1 of utterance b is the prediction output of the pass of its k-th label.
    prefixes = first_pred.unsqueeze(1).repeat(1, int(counts.max()) + 1, 1)
    position = found.long().cumsum(0)[pass_ids, rows]  # k of each label
    prefixes[rows, position] = preds[pass_ids, rows]
    return tokens, stamps, prefixes


def _label_loop(flat: Tensor, row_offsets: Tensor, offsets: Tensor, lengths: Tensor,
                pred: Tensor, state: list[tuple[Tensor, Tensor]], table: Tensor,
                recurrent: list[Tensor], biases: list[Tensor], pred_weight: Tensor,
                pred_bias: Tensor, out_weight: Tensor, out_bias: Tensor, tanh: bool,
                blank: int, limit: int, window: int
                ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """The passes of :func:`_search_batch` until every utterance has left its last frame.

    ``flat``: the (B * (T + window), J) projected encoder states, each utterance padded by a
    window; ``row_offsets`` (B, window) the rows of each utterance's first window; ``lengths``
    (B, 1); ``pred`` (B, J) the projected prediction output after blank; ``state`` the
    :class:`~asrkd.models.rnnt.DecodingLSTM` state after it; the rest its and the joint's
    weights. Returns, per pass that emitted: which utterances emitted (B, 1), their labels
    (B,), their frames (B, 1) and the (B, J) projected prediction outputs of the step.

    Every pass works on the whole batch: an utterance past its last frame has no valid frame
    in its window, so it neither jumps nor emits (cheaper than indexing subsets), and
    everything stays (B, 1) so that no pass spends a kernel on reshaping. Written in
    TorchScript's subset of Python: a pass is ~30 small kernels, and compiled it runs without
    the Python interpreter between them (see :func:`_compiled_label_loop`).
    """
    batch, width = lengths.size(0), flat.size(1)
    later = offsets > 0  # (W,): every frame of a window but the current one
    ends = row_offsets[:, :1] + lengths  # (B, 1): row of each utterance's last frame + 1
    frame = torch.zeros_like(lengths)  # current frame, (B, 1)
    no_labels = torch.zeros_like(lengths)
    emitted = no_labels  # labels emitted at the current frame
    found_at: list[Tensor] = []
    labels_at: list[Tensor] = []
    frames_at: list[Tensor] = []
    preds_at: list[Tensor] = []
    while True:
        rows = frame + row_offsets  # (B, W) rows of flat in each utterance's window
        valid = rows < ends
        ahead = flat.index_select(0, rows.view(-1)).view(batch, window, width)
        best = joint_logits(ahead, pred.unsqueeze(1), out_weight, out_bias, tanh).argmax(-1)
        # At the cap the current frame (column 0) takes its blank. (Not an in-place `&=` on
        # wins[:, :1]: TorchScript applies that to a copy, and the search never left the
        # frame.)
        wins = (best != blank) & valid & (later | (emitted < limit))
        found = wins.any(1, keepdim=True)
        first = wins.byte().argmax(1, keepdim=True)
        # First frame where a label wins, or past the valid frames of the window.
        jump = torch.where(found, first, valid.sum(1, keepdim=True))
        frame = frame + jump
        if not bool(found.any()):
            if not bool((frame < lengths).any()):
                break
            emitted = no_labels  # every utterance that can still emit has left its frame
            continue
        # A label at a new frame is its first there; rows that neither jumped nor emitted
        # are past their last frame.
        emitted = (jump == 0) * emitted + found
        labels = best.gather(1, first).view(-1)
        # One prediction-network step for the batch; only the emitting rows take it.
        out, new_state = lstm_steps(table.index_select(0, labels), state, recurrent, biases)
        state = [(torch.where(found, h, old_h), torch.where(found, c, old_c))
                 for (h, c), (old_h, old_c) in zip(new_state, state)]
        new_pred = F.linear(out, pred_weight, pred_bias)
        pred = torch.where(found, new_pred, pred)
        found_at.append(found)  # (B, 1), flattened by the caller after stacking
        labels_at.append(labels)
        frames_at.append(frame)
        preds_at.append(new_pred)
    return found_at, labels_at, frames_at, preds_at


@functools.cache
def _compiled_label_loop() -> Callable[..., tuple[list[Tensor], ...]]:
    """:func:`_label_loop` compiled by TorchScript, or the function itself where it cannot be.

    At batch 16 on the AN4 transducers the search spent most of its time in the Python
    interpreter between ~30 kernels per pass on (16, 8) tensors; compiled, the whole greedy
    search took 78 instead of 126 ms (student, test set, 1 thread side by side, identical
    hypotheses). TorchScript is deprecated upstream in favour of ``torch.compile``, which needs
    a C++ toolchain at run time and compiles for tens of seconds on first use (and again per
    new batch shape): too much for a decoding call. Compiled once per process (~0.1 s); if a
    later torch drops or breaks ``torch.jit.script``, the same code runs uncompiled.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_label_loop)
    except Exception as error:  # noqa: BLE001 - any failure means: run it in Python
        log.warning("RNN-T greedy search runs uncompiled (torch.jit.script failed: %s)", error)
        return _label_loop


def _path_scores(transducer: RNNTransducer, enc_proj: Tensor, lengths: Tensor,
                 tokens: list[list[int]], stamps: list[list[int]], prefixes: Tensor
                 ) -> list[float]:
    """Log-probability of each greedy path, from one joint evaluation over its nodes: the
    label arcs (frame t_k, prefix k-1) and, at every frame t, the blank arc after the labels
    emitted up to t."""
    batch, frames, _ = enc_proj.shape
    device = enc_proj.device
    n_labels = torch.tensor([len(t) for t in tokens], device=device)
    label_rows = torch.repeat_interleave(torch.arange(batch, device=device), n_labels)
    label_frames = torch.tensor([t for s in stamps for t in s], dtype=torch.long, device=device)
    label_ids = torch.tensor([y for t in tokens for y in t], dtype=torch.long, device=device)
    starts = torch.cumsum(n_labels, 0) - n_labels
    label_k = torch.arange(label_ids.numel(), device=device) - starts[label_rows]  # prefix k-1
    # Labels emitted at or before each frame: the prediction prefix of that frame's blank.
    emitted = torch.zeros(batch, frames, dtype=torch.long, device=device)
    emitted.index_put_((label_rows, label_frames), torch.ones_like(label_rows), accumulate=True)
    after = emitted.cumsum(1)
    blank_rows, blank_frames = (torch.arange(frames, device=device) < lengths.unsqueeze(1)
                                ).nonzero(as_tuple=True)
    rows = torch.cat([label_rows, blank_rows])
    logits = transducer.joint.search_logits(
        enc_proj[rows, torch.cat([label_frames, blank_frames])],
        prefixes[rows, torch.cat([label_k, after[blank_rows, blank_frames]])],
    )
    symbols = torch.cat([label_ids, torch.full_like(blank_rows, transducer.blank_id)])
    log_probs = logits.log_softmax(-1).gather(1, symbols.unsqueeze(1)).squeeze(1)
    scores = torch.zeros(batch, dtype=torch.float64, device=device)
    return scores.index_add_(0, rows, log_probs.double()).tolist()


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
