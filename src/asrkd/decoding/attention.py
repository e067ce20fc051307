"""Attention-decoder search: batched greedy and beam search with a key/value cache, and
joint CTC/attention scoring (ESPnet style) or CTC rescoring of the n-best."""

from __future__ import annotations

import math
from typing import Any

import torch

from asrkd.decoding.ctc import CTCPrefixScorer, ctc_sequence_log_prob
from asrkd.errors import ConfigError
from asrkd.models.common import Hypothesis
from asrkd.models.transformer_decoder import TransformerDecoder

NEG_INF = float("-inf")


def _length_limits(
    decoder: TransformerDecoder,
    encoder_lengths: torch.Tensor,
    max_len: int | None,
    max_len_ratio: float,
) -> list[int]:
    """Per-utterance cap on emitted tokens (eos included)."""
    if max_len is not None:
        return [max(1, int(max_len))] * encoder_lengths.numel()
    return [
        max(1, min(decoder.config.max_len, int(math.ceil(max_len_ratio * int(n)))))
        for n in encoder_lengths.tolist()
    ]


def _next_logp(
    decoder: TransformerDecoder, logits: torch.Tensor, force_eos: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities with never-emitted ids removed; rows in ``force_eos`` may only end.

    Args:
        logits: (N, V).
        force_eos: (N,) bool.
    """
    logp = logits.float().log_softmax(dim=-1)
    logp[:, decoder.never_emit] = NEG_INF
    if bool(force_eos.any()):
        eos = decoder.config.eos_id
        forced = torch.full_like(logp, NEG_INF)
        forced[:, eos] = logp[:, eos]
        logp = torch.where(force_eos.unsqueeze(1), forced, logp)
    return logp


@torch.no_grad()
def attention_greedy(
    decoder: TransformerDecoder,
    encoder_out: torch.Tensor,
    encoder_lengths: torch.Tensor,
    max_len: int | None = None,
    max_len_ratio: float = 1.0,
) -> list[Hypothesis]:
    """Batched greedy decoding, each utterance stopping at its own eos.

    Args:
        encoder_out: (B, T, D) encoder states.
        encoder_lengths: (B,) valid frames.
        max_len: cap on tokens per utterance (eos included); by default
            ``ceil(max_len_ratio * encoder_length)`` capped by ``config.max_len``.
        max_len_ratio: tokens allowed per encoder frame when ``max_len`` is None.

    Returns:
        One :class:`Hypothesis` per utterance (tokens without bos/eos); ``score`` is the
        sum of the chosen tokens' log-probabilities, eos included. Blank, pad and bos are
        never emitted; an utterance that reaches its limit is ended with eos.
    """
    cfg = decoder.config
    batch = encoder_out.shape[0]
    device = encoder_out.device
    limits = _length_limits(decoder, encoder_lengths, max_len, max_len_ratio)
    limit_t = torch.tensor(limits, device=device)
    memory_kv, memory_mask = decoder.encode_memory(encoder_out, encoder_lengths)
    tokens = torch.full((batch,), cfg.bos_id, dtype=torch.long, device=device)
    scores = torch.zeros(batch, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(batch)]
    cache = None
    for t in range(max(limits)):
        logits, cache = decoder.step(tokens, t, memory_kv, memory_mask, cache)
        logp = _next_logp(decoder, logits, limit_t <= t + 1)
        best, tokens = logp.max(dim=-1)
        scores = scores + best.masked_fill(done, 0.0)
        for b, tok in enumerate(tokens.tolist()):
            if not done[b] and tok != cfg.eos_id:
                out[b].append(tok)
        done = done | (tokens == cfg.eos_id)
        if bool(done.all()):
            break
    return [Hypothesis(tokens=out[b], score=float(scores[b])) for b in range(batch)]


@torch.no_grad()
def attention_beam(
    decoder: TransformerDecoder,
    encoder_out: torch.Tensor,
    encoder_lengths: torch.Tensor,
    **options: Any,
) -> list[Hypothesis]:
    """Batched beam search; returns the best hypothesis per utterance.

    ``options`` are the keyword arguments of :func:`attention_beam_nbest` (``beam_size``,
    ``length_penalty``, ``ctc_log_probs``, ``ctc_weight``, ``max_len``, ``ctc_mode``,
    ``max_len_ratio``).
    """
    nbest = attention_beam_nbest(decoder, encoder_out, encoder_lengths, **options)
    return [hyps[0] for hyps in nbest]


@torch.no_grad()
def attention_beam_nbest(
    decoder: TransformerDecoder,
    encoder_out: torch.Tensor,
    encoder_lengths: torch.Tensor,
    beam_size: int = 4,
    length_penalty: float = 1.0,
    ctc_log_probs: torch.Tensor | None = None,
    ctc_weight: float = 0.0,
    max_len: int | None = None,
    ctc_mode: str = "joint",
    max_len_ratio: float = 1.0,
) -> list[list[Hypothesis]]:
    """Batched beam search (B * beam rows per step) with length normalisation.

    Scoring: a hypothesis y (eos included, |y| tokens) has raw score
    ``s(y) = (1 - w) * log P_att(y) + w * log P_ctc(y)`` with ``w = ctc_weight`` (w = 0:
    attention only), and is ranked by ``s(y) / |y| ** length_penalty`` (0: raw sum,
    1: mean per token). ``Hypothesis.score`` is that normalised score.

    CTC modes (only when ``ctc_log_probs`` is given and ``ctc_weight > 0``):

    - ``"joint"`` (ESPnet style): every step scores the most likely attention candidates
      (``int(1.5 * beam) + 1`` per row) with the CTC prefix probability
      (:class:`CTCPrefixScorer`), so CTC prunes the search itdecoder. Costs O(T) small tensor
      ops per step.
    - ``"rescore"``: attention-only search, then the n-best finished hypotheses are
      rescored with the exact CTC sequence probability (``F.ctc_loss``).

    Search: each step keeps the ``beam`` best non-eos extensions; extensions ending in eos
    are moved to a finished list. An utterance stops once it has ``beam`` finished
    hypotheses and no live one can still beat the best finished one (exact for
    length_penalty 0, where scores only fall as hypotheses grow; the usual heuristic
    otherwise), or when it reaches its length limit (live hypotheses are then ended with
    eos).

    Args:
        encoder_out: (B, T, D) encoder states.
        encoder_lengths: (B,) valid frames.
        beam_size: hypotheses kept per utterance.
        length_penalty: exponent of the length normalisation.
        ctc_log_probs: (B, T, V) CTC log-probabilities over the same frames.
        ctc_weight: w in [0, 1].
        max_len: cap on tokens per utterance (eos included); by default
            ``ceil(max_len_ratio * encoder_length)`` capped by ``config.max_len``.
        ctc_mode: ``"joint"`` or ``"rescore"``.
        max_len_ratio: tokens allowed per encoder frame when ``max_len`` is None.

    Returns:
        Per utterance, up to ``beam_size`` hypotheses (tokens without bos/eos), best first.
    """
    cfg = decoder.config
    if ctc_mode not in ("joint", "rescore"):
        raise ConfigError(f"ctc_mode must be 'joint' or 'rescore', not {ctc_mode!r}")
    use_ctc = ctc_log_probs is not None and ctc_weight > 0
    joint = use_ctc and ctc_mode == "joint"
    w = ctc_weight if joint else 0.0
    batch = encoder_out.shape[0]
    device = encoder_out.device
    k = beam_size
    n = batch * k
    vocab = cfg.vocab_size
    eos = cfg.eos_id
    limits = _length_limits(decoder, encoder_lengths, max_len, max_len_ratio)
    limit_rows = torch.tensor(limits, device=device).repeat_interleave(k)

    # Every row b*k + j is beam j of utterance b.
    memory_kv, memory_mask = decoder.encode_memory(encoder_out, encoder_lengths)
    memory_kv = [
        (kk.repeat_interleave(k, dim=0), vv.repeat_interleave(k, dim=0)) for kk, vv in memory_kv
    ]
    memory_mask = memory_mask.repeat_interleave(k, dim=0)
    ys = torch.full((n, 1), cfg.bos_id, dtype=torch.long, device=device)
    att = torch.zeros(n, device=device)  # log P_att of each live prefix
    total = torch.zeros(n, device=device)  # combined raw score of each live prefix
    # Only beam 0 is alive at first, so the first step does not pick k copies of one token.
    alive0 = (torch.arange(n, device=device) % k) == 0
    att = att.masked_fill(~alive0, NEG_INF)
    total = total.masked_fill(~alive0, NEG_INF)
    scorer = None
    ctc_state = None
    if joint:
        scorer = CTCPrefixScorer(ctc_log_probs, encoder_lengths, blank_id=0, eos_id=eos)
        ctc_state = scorer.initial_state(
            torch.arange(batch, device=ctc_log_probs.device).repeat_interleave(k)
        )
    n_cand = min(vocab, int(1.5 * k) + 1) if joint else min(vocab, 2 * k)

    # finished[b]: (tokens, attention log-prob, combined raw score)
    finished: list[list[tuple[list[int], float, float]]] = [[] for _ in range(batch)]
    done = [False] * batch
    cache = None
    for t in range(max(limits)):
        logits, cache = decoder.step(ys[:, -1], t, memory_kv, memory_mask, cache)
        logp = _next_logp(decoder, logits, limit_rows <= t + 1)  # (N, V)
        cand_att, cand_tok = logp.topk(n_cand, dim=-1)  # (N, C)
        cand_att = att.unsqueeze(1) + cand_att
        if joint:
            ctc_scores, r_new = scorer.score(ctc_state, cand_tok)
            cand_total = (1 - w) * cand_att + w * ctc_scores.to(cand_att)
            # 0 * -inf is NaN (w = 0 or 1): those candidates are impossible anyway.
            cand_total = torch.where(cand_total.isnan(), NEG_INF, cand_total)
        else:
            cand_total = cand_att
        dead = torch.tensor(done, device=device).repeat_interleave(k)
        cand_total = cand_total.masked_fill(dead.unsqueeze(1), NEG_INF)

        # Best 2k extensions per utterance: at most k of them end in eos, so at least k
        # continue.
        flat = cand_total.view(batch, k * n_cand)
        top_score, top_idx = flat.topk(min(2 * k, k * n_cand), dim=-1)  # (B, 2k)
        top_row = top_idx // n_cand + torch.arange(batch, device=device).unsqueeze(1) * k
        top_cand = top_idx % n_cand
        top_tok = cand_tok[top_row, top_cand]
        top_is_eos = top_tok == eos
        top_alive = torch.isfinite(top_score)

        # Move eos extensions to the finished lists.
        for b, j in (top_is_eos & top_alive).nonzero().tolist():
            row = int(top_row[b, j])
            tokens = ys[row, 1:].tolist()
            finished[b].append(
                (tokens, float(cand_att[row, top_cand[b, j]]), float(top_score[b, j]))
            )

        # The k best non-eos extensions become the new beams (stable sort keeps rank order).
        order = torch.where(top_is_eos, 1, 0).argsort(dim=-1, stable=True)[:, :k]
        sel_row = top_row.gather(1, order).reshape(-1)
        sel_cand = top_cand.gather(1, order).reshape(-1)
        sel_tok = top_tok.gather(1, order).reshape(-1)
        sel_total = top_score.gather(1, order).reshape(-1)
        sel_total = sel_total.masked_fill(top_is_eos.gather(1, order).reshape(-1), NEG_INF)

        ys = torch.cat([ys[sel_row], sel_tok.unsqueeze(1)], dim=1)
        att = cand_att[sel_row, sel_cand].masked_fill(~torch.isfinite(sel_total), NEG_INF)
        total = sel_total
        cache = [(kk[sel_row], vv[sel_row]) for kk, vv in cache]
        if joint:
            ctc_state = scorer.select(ctc_state, ctc_scores, r_new, sel_row, sel_cand, sel_tok)

        # Stopping rule per utterance (see docstring).
        live_best = total.view(batch, k).max(dim=-1).values.tolist()
        for b in range(batch):
            if done[b]:
                continue
            if t + 1 >= limits[b] or live_best[b] == NEG_INF:
                done[b] = True
                continue
            if len(finished[b]) >= k:
                best_fin = max(s / (len(tok) + 1) ** length_penalty for tok, _, s in finished[b])
                # Live bound at the current length (+1 for the eos still to come).
                bound = live_best[b] / (t + 2) ** length_penalty
                if bound <= best_fin:
                    done[b] = True
        if all(done):
            break

    results: list[list[Hypothesis]] = []
    for b in range(batch):
        ranked = sorted(
            finished[b],
            key=lambda f: f[2] / (len(f[0]) + 1) ** length_penalty,
            reverse=True,
        )[:k]
        if not ranked:  # cannot happen with a length limit, but never return nothing
            ranked = [([], NEG_INF, NEG_INF)]
        if use_ctc and not joint:
            ranked = _ctc_rescore(
                ranked, ctc_log_probs[b], encoder_lengths[b], ctc_weight, length_penalty
            )
        results.append(
            [
                Hypothesis(tokens=tok, score=s / (len(tok) + 1) ** length_penalty)
                for tok, _, s in ranked
            ]
        )
    return results


def _ctc_rescore(
    nbest: list[tuple[list[int], float, float]],
    ctc_log_probs: torch.Tensor,
    length: torch.Tensor,
    ctc_weight: float,
    length_penalty: float,
) -> list[tuple[list[int], float, float]]:
    """Rescore one utterance's n-best with ``(1 - w) * att + w * log P_ctc`` and re-rank.

    Args:
        nbest: ``(tokens, attention log-prob, raw score)`` entries.
        ctc_log_probs: (T, V) CTC log-probabilities.
        length: () valid frames.
        ctc_weight: w.
        length_penalty: exponent of the length normalisation.
    """
    count = len(nbest)
    max_u = max(1, max(len(tok) for tok, _, _ in nbest))
    targets = torch.full((count, max_u), 0, dtype=torch.long)
    for i, (tok, _, _) in enumerate(nbest):
        targets[i, : len(tok)] = torch.tensor(tok, dtype=torch.long)
    target_lengths = torch.tensor([len(tok) for tok, _, _ in nbest])
    lp = ctc_log_probs.unsqueeze(0).expand(count, -1, -1)
    lengths = length.reshape(1).expand(count).cpu()
    ctc = ctc_sequence_log_prob(lp.cpu(), lengths, targets, target_lengths).tolist()
    rescored = []
    for (tok, att, _), c in zip(nbest, ctc):
        s = (1 - ctc_weight) * att + ctc_weight * c
        rescored.append((tok, att, s if s == s else NEG_INF))  # NaN (0 * -inf) -> -inf
    return sorted(rescored, key=lambda f: f[2] / (len(f[0]) + 1) ** length_penalty, reverse=True)
