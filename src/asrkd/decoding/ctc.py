"""CTC decoding on log-probabilities ``(B, T, V)`` with per-utterance lengths.

- :func:`ctc_greedy_decode` - best path: argmax per frame, collapse repeats, drop blanks.
- :func:`ctc_prefix_beam_search` - standard CTC prefix beam search in log space, keeping for
  every prefix the probability of ending in blank and in non-blank (optionally fused with a
  token n-gram LM).
- :class:`CTCPrefixScorer` - the CTC prefix probability of Watanabe et al. (2017), "Hybrid
  CTC/attention architecture for end-to-end speech recognition", used to score candidate
  extensions of attention-decoder hypotheses in joint CTC/attention beam search.
- :func:`ctc_sequence_log_prob` - exact log P(labels | input) of whole sequences, for rescoring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from asrkd.models.common import Hypothesis, logaddexp, make_pad_mask
from asrkd.models.lm import LMFusion

NEG_INF = float("-inf")


def ctc_greedy_decode(
    log_probs: torch.Tensor, lengths: torch.Tensor, blank_id: int = 0
) -> list[Hypothesis]:
    """Best-path decoding: argmax per frame, collapse repeats, drop blanks.

    Args:
        log_probs: (B, T, V) log-probabilities (logits give the same tokens but not the score).
        lengths: (B,) valid frames.
        blank_id: CTC blank index.

    Returns:
        One :class:`Hypothesis` per utterance; ``score`` is the best path's log-probability
        (sum of per-frame maxima), ``timestamps`` the first frame of each emitted token.
    """
    batch, frames, _ = log_probs.shape
    best, ids = log_probs.detach().max(dim=-1)  # (B, T)
    pad = make_pad_mask(lengths.to(ids.device), frames)
    scores = best.float().masked_fill(pad, 0.0).sum(dim=-1)
    # A frame emits a token if it is not blank, not padding, and differs from the previous frame.
    prev = F.pad(ids[:, :-1], (1, 0), value=blank_id)
    emit = (ids != blank_id) & (ids != prev) & ~pad
    ids_list = ids.tolist()
    emit_list = emit.tolist()
    hyps = []
    for b in range(batch):
        frames_b = [t for t, e in enumerate(emit_list[b]) if e]
        hyps.append(
            Hypothesis(
                tokens=[ids_list[b][t] for t in frames_b],
                score=float(scores[b]),
                timestamps=frames_b,
            )
        )
    return hyps


def _prefix_beam_search_one(
    frames: list[list[float]],
    beam_size: int,
    blank_id: int,
    prune_topk: int,
    fusion: LMFusion | None = None,
) -> list[tuple[tuple[int, ...], float, tuple[int, ...]]]:
    """Prefix beam search over one utterance.

    Args:
        frames: T rows of V log-probabilities (Python floats: the inner loop is scalar work).
        beam_size: prefixes kept after each frame.
        blank_id: CTC blank index.
        prune_topk: tokens per frame considered for *extending* a prefix.
        fusion: shallow fusion with a token LM: prefixes are ranked by their CTC log-prob
            plus ``weight * log P_lm(prefix) + length_bonus * len(prefix)`` minus
            ``unk_penalty`` per word outside the LM's training words, and finished ones also
            score ``weight * log P_lm(</s> | prefix)``.

    Returns:
        Up to ``beam_size`` ``(prefix, score, timestamps)`` sorted best first; ``score`` is the
        CTC log-prob, plus the fusion terms when ``fusion`` is given.
    """
    # prefix -> [log P(prefix, ends in blank), log P(prefix, ends in non-blank), timestamps,
    #            best single contribution (used to pick the timestamps of merged paths)]
    beam: dict[tuple[int, ...], list] = {(): [0.0, NEG_INF, (), 0.0]}
    # prefix -> (fusion score of the prefix, LM state); depends on the prefix only, so it is
    # kept for the whole utterance (the same extensions come back frame after frame).
    # With a word penalty each entry also follows the last (partial) word: its text and
    # whether it has already been penalised.
    lm_scores: dict[tuple[int, ...], tuple[float, tuple[int, ...], str, bool]] = {}
    penalty = fusion.unk_penalty if fusion is not None else 0.0
    if fusion is not None:
        lm_scores[()] = (0.0, fusion.lm.initial_state(), "", False)
        if penalty:
            pieces, words, stems = (
                fusion.lm.word_pieces(),
                fusion.lm.words,
                fusion.lm.word_prefixes,
            )

    def lm_score(prefix: tuple[int, ...]) -> float:
        cached = lm_scores.get(prefix)
        if cached is None:
            before, state, word, penalised = lm_scores[prefix[:-1]]
            token = prefix[-1]
            value, state = fusion.lm.score(state, token)
            score = before + fusion.weight * value + fusion.length_bonus
            if penalty:
                starts, text = pieces[token]
                if starts:
                    if word and not penalised and word not in words:
                        score -= penalty
                    word, penalised = text, False
                else:
                    word += text
                if word and not penalised and word not in stems:
                    score, penalised = score - penalty, True
            cached = lm_scores[prefix] = (score, state, word, penalised)
        return cached[0]

    def rank(item) -> float:
        prefix, (lp_b, lp_nb, _, _) = item
        total = logaddexp(lp_b, lp_nb)
        return total if fusion is None else total + lm_score(prefix)

    vocab = len(frames[0]) if frames else 0
    for t, row in enumerate(frames):
        if prune_topk < vocab:
            top = sorted(range(vocab), key=row.__getitem__, reverse=True)[:prune_topk]
        else:
            top = list(range(vocab))
        top = [c for c in top if c != blank_id]
        p_blank = row[blank_id]
        nxt: dict[tuple[int, ...], list] = {}

        def add(prefix, lp_b, lp_nb, ts, contrib, nxt=nxt):
            entry = nxt.get(prefix)
            if entry is None:
                nxt[prefix] = [lp_b, lp_nb, ts, contrib]
                return
            entry[0] = logaddexp(entry[0], lp_b)
            entry[1] = logaddexp(entry[1], lp_nb)
            if contrib > entry[3]:
                entry[2], entry[3] = ts, contrib

        for prefix, (lp_b, lp_nb, ts, _) in beam.items():
            total = logaddexp(lp_b, lp_nb)
            # Stay on the same prefix: emit blank, or repeat the last token. These are never
            # pruned (they keep the prefix's own mass), only new extensions are.
            stay_b = total + p_blank
            add(prefix, stay_b, NEG_INF, ts, stay_b)
            if prefix:
                last = prefix[-1]
                stay_nb = lp_nb + row[last]
                add(prefix, NEG_INF, stay_nb, ts, stay_nb)
            for c in top:
                lp_c = row[c]
                # A repeated token needs a blank in between to start a new label.
                ext = (lp_b if prefix and c == prefix[-1] else total) + lp_c
                add(prefix + (c,), NEG_INF, ext, ts + (t,), ext)
        ranked = sorted(nxt.items(), key=rank, reverse=True)
        beam = dict(ranked[:beam_size])
    if fusion is None:
        return [
            (prefix, logaddexp(lp_b, lp_nb), ts) for prefix, (lp_b, lp_nb, ts, _) in beam.items()
        ]
    finished = []
    for prefix, (lp_b, lp_nb, ts, _) in beam.items():
        score, state, word, penalised = lm_scores[prefix]
        end = fusion.weight * fusion.lm.log_prob(state, fusion.lm.eos_id)
        if penalty and word and not penalised and word not in words:
            end -= penalty
        finished.append((prefix, logaddexp(lp_b, lp_nb) + score + end, ts))
    return sorted(finished, key=lambda item: item[1], reverse=True)


def ctc_prefix_beam_search(
    log_probs: torch.Tensor,
    lengths: torch.Tensor,
    beam_size: int = 8,
    blank_id: int = 0,
    prune_topk: int | None = None,
    fusion: LMFusion | None = None,
) -> list[Hypothesis]:
    """CTC prefix beam search (log space, blank / non-blank prefix probabilities).

    Unlike best-path decoding this sums the probability of all alignments of a label prefix,
    so it finds sequences whose total probability beats the best path's.

    Args:
        log_probs: (B, T, V) log-probabilities.
        lengths: (B,) valid frames.
        beam_size: prefixes kept per frame.
        blank_id: CTC blank index.
        prune_topk: per frame, only the ``prune_topk`` most likely tokens may extend a prefix
            (staying on a prefix via blank or its last token is always scored). Defaults to
            ``beam_size``; ``V`` or more disables pruning.
        fusion: optional shallow fusion with a token n-gram LM
            (:class:`~asrkd.models.lm.LMFusion`).

    Returns:
        The best :class:`Hypothesis` per utterance; ``score`` is the prefix-merged
        log-probability of the label sequence (plus the fusion terms with ``fusion``),
        ``timestamps`` the emission frame of each token along the most probable contributing
        path of the last merge.
    """
    if prune_topk is None:
        prune_topk = beam_size
    rows = log_probs.detach().float().cpu()
    lens = lengths.tolist()
    hyps = []
    for b in range(rows.shape[0]):
        frames = rows[b, : int(lens[b])].tolist()
        results = _prefix_beam_search_one(frames, beam_size, blank_id, prune_topk, fusion)
        prefix, score, ts = results[0]
        hyps.append(Hypothesis(tokens=list(prefix), score=score, timestamps=list(ts)))
    return hyps


@dataclass
class CTCPrefixState:
    """CTC prefix-scoring state of N hypotheses (rows).

    Attributes:
        r: (T, 2, N) log forward variables of each prefix g: ``r[t, 0]`` = log r^n_t(g)
            (paths of frames 0..t emitting g and ending in its last label), ``r[t, 1]`` =
            log r^b_t(g) (ending in blank).
        score: (N,) log CTC prefix probability psi(g) (0 for the empty prefix).
        last: (N,) last label of g, -1 for the empty prefix.
        length: (N,) number of labels in g.
        batch_index: (N,) utterance of each row (index into the scorer's log_probs).
    """

    r: torch.Tensor
    score: torch.Tensor
    last: torch.Tensor
    length: torch.Tensor
    batch_index: torch.Tensor

    def index_select(self, rows: torch.Tensor) -> CTCPrefixState:
        """Keep / reorder rows (e.g. after beam pruning). ``rows``: (M,) row indices."""
        return CTCPrefixState(
            r=self.r[:, :, rows],
            score=self.score[rows],
            last=self.last[rows],
            length=self.length[rows],
            batch_index=self.batch_index[rows],
        )


class CTCPrefixScorer:
    """CTC prefix scores for joint CTC/attention decoding (Watanabe et al., 2017).

    For a prefix g and candidate label c it returns log psi(g+c): the log-probability that the
    CTC output *starts with* g+c; for c = eos, the log-probability that the output *is* g. The
    forward recursion over frames is a Python loop of tensor ops, vectorised over all
    hypotheses and candidates at once, so the cost per decoding step is O(T) small kernels.

    Args:
        log_probs: (T, V) for one utterance or (B, T, V) for a batch.
        lengths: (B,) valid frames; defaults to T for every utterance.
        blank_id: CTC blank index (never a valid candidate: scored -inf).
        eos_id: end-of-sentence id; scoring it returns the full-sequence probability.
    """

    def __init__(
        self,
        log_probs: torch.Tensor,
        lengths: torch.Tensor | None = None,
        blank_id: int = 0,
        eos_id: int = 3,
    ) -> None:
        if log_probs.dim() == 2:
            log_probs = log_probs.unsqueeze(0)
        # Work in float32 at least; padded frames never reach a result (masked by lengths).
        dtype = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
        self.x = log_probs.detach().to(dtype)  # (B, T, V)
        batch, frames, _ = self.x.shape
        if lengths is None:
            lengths = torch.full((batch,), frames, dtype=torch.long)
        self.lengths = lengths.to(self.x.device).long().clamp(max=frames)
        self.frames = frames
        self.blank_id = blank_id
        self.eos_id = eos_id

    def initial_state(self, batch_index: torch.Tensor | None = None) -> CTCPrefixState:
        """State of the empty prefix for the rows' utterances.

        Args:
            batch_index: (N,) utterance of each row; defaults to one row per utterance.
        """
        device = self.x.device
        if batch_index is None:
            batch_index = torch.arange(self.x.shape[0], device=device)
        batch_index = batch_index.to(device)
        n = batch_index.numel()
        r = torch.full((self.frames, 2, n), NEG_INF, dtype=self.x.dtype, device=device)
        # The empty prefix is reached only through blanks.
        r[:, 1] = self.x[batch_index, :, self.blank_id].cumsum(dim=1).transpose(0, 1)
        return CTCPrefixState(
            r=r,
            score=torch.zeros(n, dtype=self.x.dtype, device=device),
            last=torch.full((n,), -1, dtype=torch.long, device=device),
            length=torch.zeros(n, dtype=torch.long, device=device),
            batch_index=batch_index,
        )

    def final_score(self, state: CTCPrefixState) -> torch.Tensor:
        """(N,) log P(CTC output == g) for each row's prefix g (the eos score)."""
        last_frame = (self.lengths[state.batch_index] - 1).clamp(min=0)
        r_end = state.r[last_frame, :, torch.arange(state.r.shape[2], device=state.r.device)]
        return torch.logaddexp(r_end[:, 0], r_end[:, 1])

    def score(
        self, state: CTCPrefixState, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix scores of extending each row's prefix by each of its candidates.

        Args:
            state: N rows.
            candidates: (N, C) candidate label ids per row (eos allowed; blank scores -inf).

        Returns:
            ``(scores, r_new)``: (N, C) log psi(g+c) (for c = eos: log P(output == g)), and
            (T, 2, N, C) forward variables of the extended prefixes for :meth:`select`.
        """
        x, frames = self.x, self.frames
        n, n_cand = candidates.shape
        device = x.device
        cand = candidates.to(device)
        # (T, N, C) log-probs of each candidate at each frame; blank of each row (T, N).
        x_c = x[state.batch_index.unsqueeze(1), :, cand].permute(2, 0, 1)
        x_b = x[state.batch_index, :, self.blank_id].transpose(0, 1)
        r_prev = state.r  # (T, 2, N)
        # phi_t(g, c): probability of g just before c may be emitted at t+1. A repeated label
        # needs a blank between, so only the blank-ending paths of g count.
        total_prev = torch.logaddexp(r_prev[:, 0], r_prev[:, 1])  # (T, N)
        same = cand == state.last.unsqueeze(1)  # (N, C)
        phi = torch.where(same.unsqueeze(0), r_prev[:, 1].unsqueeze(2), total_prev.unsqueeze(2))

        r_new = torch.full((frames, 2, n, n_cand), NEG_INF, dtype=x.dtype, device=device)
        empty = (state.length == 0).unsqueeze(1)  # only the empty prefix may start at frame 0
        r_new[0, 0] = torch.where(empty, x_c[0], torch.full_like(x_c[0], NEG_INF))
        # g+c (length L+1) cannot be emitted before frame L: skip those frames.
        start = max(1, int(state.length.min()) if n else 1)
        xs = torch.stack((x_c, x_b.unsqueeze(2).expand(-1, -1, n_cand)), dim=1)  # (T, 2, N, C)
        for t in range(start, frames):
            # r^n_t = (r^n_{t-1} + phi_{t-1}) x_t(c);  r^b_t = (r^b_{t-1} + r^n_{t-1}) x_t(blank)
            incoming = torch.stack((phi[t - 1], r_new[t - 1, 0]))
            torch.logaddexp(r_new[t - 1], incoming, out=r_new[t])
            r_new[t] += xs[t]

        # psi(g+c) = sum over the first frame at which c is emitted: r^n_0 + sum_t phi_{t-1} x_t.
        terms = torch.empty((frames, n, n_cand), dtype=x.dtype, device=device)
        terms[0] = r_new[0, 0]
        terms[1:] = phi[:-1] + x_c[1:]
        beyond = make_pad_mask(self.lengths[state.batch_index], frames).transpose(0, 1)
        terms = terms.masked_fill(beyond.unsqueeze(2), NEG_INF)
        scores = torch.logsumexp(terms, dim=0)  # (N, C)

        is_eos = cand == self.eos_id
        if bool(is_eos.any()):
            final = self.final_score(state).unsqueeze(1).expand(-1, n_cand)
            scores = torch.where(is_eos, final, scores)
        scores = scores.masked_fill(cand == self.blank_id, NEG_INF)
        return scores, r_new

    def select(
        self,
        state: CTCPrefixState,
        scores: torch.Tensor,
        r_new: torch.Tensor,
        rows: torch.Tensor,
        cand_index: torch.Tensor,
        tokens: torch.Tensor,
    ) -> CTCPrefixState:
        """Build the state of chosen extensions (M of them) from :meth:`score`'s outputs.

        Args:
            state: the N-row state that was scored.
            scores: (N, C) from :meth:`score`.
            r_new: (T, 2, N, C) from :meth:`score`.
            rows: (M,) parent row of each chosen extension.
            cand_index: (M,) position of the chosen candidate within its row's C candidates.
            tokens: (M,) chosen label ids (must not be eos).
        """
        device = r_new.device
        rows = rows.to(device)
        cand_index = cand_index.to(device)
        return CTCPrefixState(
            r=r_new[:, :, rows, cand_index],
            score=scores[rows, cand_index],
            last=tokens.to(device).long(),
            length=state.length[rows] + 1,
            batch_index=state.batch_index[rows],
        )

    def advance(self, state: CTCPrefixState, tokens: torch.Tensor) -> CTCPrefixState:
        """Extend every row's prefix by one label. ``tokens``: (N,) labels (not eos)."""
        scores, r_new = self.score(state, tokens.view(-1, 1))
        rows = torch.arange(tokens.numel(), device=r_new.device)
        return self.select(state, scores, r_new, rows, torch.zeros_like(rows), tokens.view(-1))

    def sequence_log_prob(self, tokens: list[int], utterance: int = 0) -> float:
        """log P(CTC output == tokens) for one utterance, by stepping through the prefixes."""
        state = self.initial_state(torch.tensor([utterance], device=self.x.device))
        for tok in tokens:
            state = self.advance(state, torch.tensor([tok], device=self.x.device))
        return float(self.final_score(state)[0])


def ctc_sequence_log_prob(
    log_probs: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    target_lengths: torch.Tensor,
    blank_id: int = 0,
) -> torch.Tensor:
    """Exact log P(targets | input) under CTC for each utterance (-inf where impossible).

    The forward algorithm of ``F.ctc_loss`` (its negative log-likelihood, without the
    ``zero_infinity`` that training uses), batch-first.

    Args:
        log_probs: (B, T, V) log-probabilities.
        lengths: (B,) valid frames.
        targets: (B, U) padded label sequences (empty sequences allowed).
        target_lengths: (B,) label lengths.
        blank_id: CTC blank index.

    Returns:
        (B,) log-probabilities.
    """
    if log_probs.dtype != torch.float64:
        log_probs = log_probs.float()
    nll = F.ctc_loss(log_probs.transpose(0, 1), targets.long(), lengths.long(),
                     target_lengths.long(), blank=blank_id, reduction="none", zero_infinity=False)
    return -nll
