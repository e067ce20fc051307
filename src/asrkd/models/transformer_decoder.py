"""Attention (Transformer) decoder: teacher-forced training, greedy and beam search.

Pre-LN layers of causal self-attention, cross-attention over the encoder states and a
feed-forward block, all on ``F.scaled_dot_product_attention``. Decoding keeps a key/value
cache: self-attention keys/values of the prefix grow by one position per step and the
cross-attention keys/values of the encoder states are computed once, so a step costs one
position per layer instead of re-running the whole prefix.

Beam search can combine the attention scores with a CTC head's (see :meth:`beam_search`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from asrkd.models.common import Hypothesis, make_pad_mask
from asrkd.models.ctc import CTCPrefixScorer, ctc_sequence_log_prob

NEG_INF = float("-inf")


@dataclass(frozen=True)
class TransformerDecoderConfig:
    """Configuration of :class:`TransformerDecoder`.

    Args:
        vocab_size: V, the shared vocabulary size.
        encoder_dim: D, the encoder output size (projected to ``d_model`` if different).
        d_model: decoder width.
        n_heads: attention heads.
        n_layers: decoder layers.
        ff_dim: feed-forward hidden size.
        dropout: dropout on residual branches, attention weights and embeddings.
        max_len: length of the precomputed positional table and the cap on decoding length.
        bos_id: start token fed first.
        eos_id: end token predicted last.
        pad_id: target padding id.
        label_smoothing: smoothing of the training cross-entropy.
    """

    vocab_size: int
    encoder_dim: int
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 4
    ff_dim: int = 1024
    dropout: float = 0.1
    max_len: int = 512
    bos_id: int = 2
    eos_id: int = 3
    pad_id: int = 1
    label_smoothing: float = 0.1


def make_decoder_io(
    targets: torch.Tensor,
    target_lengths: torch.Tensor,
    bos_id: int = 2,
    eos_id: int = 3,
    pad_id: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build teacher-forcing input and output sequences.

    Args:
        targets: (B, U) target ids; positions at or beyond ``target_lengths`` are ignored.
        target_lengths: (B,) valid target tokens.
        bos_id, eos_id, pad_id: special ids.

    Returns:
        ``(dec_in, dec_out, dec_lengths)``: (B, U+1) ``[bos] + targets`` and (B, U+1)
        ``targets + [eos]``, both padded with ``pad_id``, and (B,) ``target_lengths + 1``.
    """
    batch, max_u = targets.shape
    device = targets.device
    target_lengths = target_lengths.to(device).long()
    dec_lengths = target_lengths + 1
    valid = ~make_pad_mask(target_lengths, max_u)
    body = torch.where(valid, targets.long(), torch.full_like(targets.long(), pad_id))
    pad_col = torch.full((batch, 1), pad_id, dtype=torch.long, device=device)
    dec_in = torch.cat([torch.full_like(pad_col, bos_id), body], dim=1)
    dec_out = torch.cat([body, pad_col], dim=1)
    dec_out[torch.arange(batch, device=device), target_lengths] = eos_id
    return dec_in, dec_out, dec_lengths


def label_smoothed_ce(
    logits: torch.Tensor,
    dec_out: torch.Tensor,
    dec_lengths: torch.Tensor | None,
    smoothing: float = 0.1,
    pad_id: int = 1,
    reduction: str = "token",
) -> torch.Tensor:
    """Label-smoothed cross-entropy over valid target tokens.

    The smoothed target puts ``1 - smoothing`` on the reference and spreads ``smoothing``
    uniformly over all V classes (as ``F.cross_entropy(label_smoothing=...)``).

    Args:
        logits: (B, L, V) decoder logits.
        dec_out: (B, L) reference ids.
        dec_lengths: (B,) valid positions; if None, positions equal to ``pad_id`` are ignored.
        smoothing: label smoothing in [0, 1).
        pad_id: padding id (used only when ``dec_lengths`` is None).
        reduction: ``"token"``: mean over the valid tokens of the batch (nats per token);
            ``"utterance"``: sum over each utterance's tokens, mean over utterances (nats per
            utterance, the scale of a CTC or RNN-T loss).

    Returns:
        Scalar loss.
    """
    if reduction not in ("token", "utterance"):
        raise ValueError(f"reduction must be 'token' or 'utterance', got {reduction!r}")
    logp = logits.float().log_softmax(dim=-1)
    if dec_lengths is None:
        valid = dec_out != pad_id
    else:
        valid = ~make_pad_mask(dec_lengths.to(logits.device), dec_out.shape[1])
    target = dec_out.long().masked_fill(~valid, 0)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    loss = (1.0 - smoothing) * nll - smoothing * logp.mean(dim=-1) if smoothing > 0 else nll
    if reduction == "utterance":
        return (loss * valid).sum() / max(dec_out.shape[0], 1)
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def sinusoidal_positions(length: int, dim: int, offset: int = 0) -> torch.Tensor:
    """(length, dim) sinusoidal position encodings for positions ``offset..offset+length-1``."""
    pos = torch.arange(offset, offset + length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class _Attention(nn.Module):
    """Multi-head attention with separate projection steps so keys/values can be cached."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.n_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, d) -> keys and values, each (B, H, L, d/H)."""
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def attend(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Attend from queries ``x`` (B, L, d) to keys/values (B, H, S, d/H).

        ``mask``: bool, broadcastable to (B, H, L, S), True where attention is allowed.
        """
        q = self._heads(self.q_proj(x))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
        )
        b, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, length, -1))


class _DecoderLayer(nn.Module):
    """Pre-LN layer: causal self-attention, cross-attention, feed-forward."""

    def __init__(self, config: TransformerDecoderConfig) -> None:
        super().__init__()
        d = config.d_model
        self.norm_self = nn.LayerNorm(d)
        self.self_attn = _Attention(d, config.n_heads, config.dropout)
        self.norm_cross = nn.LayerNorm(d)
        self.cross_attn = _Attention(d, config.n_heads, config.dropout)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = nn.Sequential(
            nn.Linear(d, config.ff_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.ff_dim, d),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_mask: torch.Tensor,
        self_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run the layer.

        Args:
            x: (B, L, d) inputs; with a cache, the L newest positions only.
            memory_kv: cross-attention keys/values of the encoder states, (B, H, T, d/H) each.
            memory_mask: (B, 1, 1, T) bool, True on valid encoder frames.
            self_cache: self-attention keys/values of earlier positions, (B, H, S, d/H) each.

        Returns:
            ``(y, (k, v))``: (B, L, d) outputs and the self-attention keys/values of all
            positions so far (the cache for the next step).
        """
        h = self.norm_self(x)
        k, v = self.self_attn.keys_values(h)
        if self_cache is not None:
            k = torch.cat([self_cache[0], k], dim=2)
            v = torch.cat([self_cache[1], v], dim=2)
        # With a cache only the newest position is queried (L == 1) and it may see everything
        # before it, so no mask is needed; otherwise mask the future.
        causal = self_cache is None and x.shape[1] > 1
        x = x + self.dropout(self.self_attn.attend(h, k, v, causal=causal))
        h = self.norm_cross(x)
        x = x + self.dropout(self.cross_attn.attend(h, *memory_kv, mask=memory_mask))
        x = x + self.dropout(self.ff(self.norm_ff(x)))
        return x, (k, v)


class TransformerDecoder(nn.Module):
    """Autoregressive attention decoder over encoder states (shared vocabulary, bos/eos)."""

    def __init__(self, config: TransformerDecoderConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.embed_scale = math.sqrt(d)
        self.register_buffer("positions", sinusoidal_positions(config.max_len, d), persistent=False)
        self.input_proj = (
            nn.Linear(config.encoder_dim, d) if config.encoder_dim != d else nn.Identity()
        )
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(_DecoderLayer(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(d)
        self.output = nn.Linear(d, config.vocab_size)
        # Ids the decoder must never emit at inference (it only ever sees them as inputs).
        self.never_emit = sorted({0, config.pad_id, config.bos_id} - {config.eos_id})

    # ----------------------------------------------------------------------------- pieces
    def _embed(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(B, L) ids at positions offset.. -> (B, L, d) scaled embeddings + positions."""
        length = tokens.shape[1]
        if offset + length <= self.positions.shape[0]:
            pos = self.positions[offset : offset + length]
        else:  # beyond the table: compute on the fly (sinusoids extrapolate)
            pos = sinusoidal_positions(length, self.config.d_model, offset).to(tokens.device)
        x = self.embed(tokens) * self.embed_scale + pos.to(self.embed.weight.dtype)
        return self.embed_dropout(x)

    def encode_memory(
        self, encoder_out: torch.Tensor, encoder_lengths: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Cross-attention keys/values per layer and the memory mask.

        Args:
            encoder_out: (B, T, D) encoder states.
            encoder_lengths: (B,) valid frames (values < 1 are treated as 1 so that no query
                row is fully masked, which would give NaN).

        Returns:
            ``(memory_kv, memory_mask)``: per layer a (B, H, T, d/H) key/value pair, and the
            (B, 1, 1, T) bool mask (True on valid frames).
        """
        memory = self.input_proj(encoder_out)
        lengths = encoder_lengths.to(encoder_out.device).clamp(min=1)
        mask = ~make_pad_mask(lengths, encoder_out.shape[1])
        memory_kv = [layer.cross_attn.keys_values(memory) for layer in self.layers]
        return memory_kv, mask[:, None, None, :]

    def decode(
        self,
        dec_in: torch.Tensor,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
        memory_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced logits for full input sequences.

        Args:
            dec_in: (B, L) input ids starting with bos.
            memory_kv, memory_mask: from :meth:`encode_memory`.

        Returns:
            (B, L, V) logits; position i predicts token i+1 of ``dec_in``'s continuation.
        """
        x = self._embed(dec_in)
        for layer, kv in zip(self.layers, memory_kv):
            x, _ = layer(x, kv, memory_mask)
        return self.output(self.final_norm(x))

    def step(
        self,
        tokens: torch.Tensor,
        position: int,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
        memory_mask: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One incremental decoding step.

        Args:
            tokens: (N,) the newest input token of each row.
            position: its position (0 for bos).
            memory_kv, memory_mask: from :meth:`encode_memory` (N rows).
            cache: per-layer self-attention keys/values from the previous step, or None.

        Returns:
            ``(logits, cache)``: (N, V) logits of the next token and the updated cache.
        """
        x = self._embed(tokens.unsqueeze(1), offset=position)
        new_cache = []
        for i, (layer, kv) in enumerate(zip(self.layers, memory_kv)):
            x, layer_cache = layer(x, kv, memory_mask, None if cache is None else cache[i])
            new_cache.append(layer_cache)
        return self.output(self.final_norm(x))[:, 0], new_cache

    # ----------------------------------------------------------------------------- training
    def forward(
        self,
        encoder_out: torch.Tensor,
        encoder_lengths: torch.Tensor,
        targets: torch.Tensor,
        target_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            encoder_out: (B, T, D) encoder states.
            encoder_lengths: (B,) valid frames.
            targets: (B, U) target ids (without bos/eos), padded.
            target_lengths: (B,) valid target tokens.

        Returns:
            (B, U+1, V) logits for ``targets + [eos]`` given ``[bos] + targets``
            (see :func:`make_decoder_io`).
        """
        cfg = self.config
        dec_in, _, _ = make_decoder_io(targets, target_lengths, cfg.bos_id, cfg.eos_id, cfg.pad_id)
        memory_kv, memory_mask = self.encode_memory(encoder_out, encoder_lengths)
        return self.decode(dec_in, memory_kv, memory_mask)

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor
    ) -> torch.Tensor:
        """Label-smoothed CE of :meth:`forward`'s logits against ``targets + [eos]``.

        Args:
            logits: (B, U+1, V) from :meth:`forward`.
            targets: (B, U) padded target ids.
            target_lengths: (B,) valid target tokens.
        """
        cfg = self.config
        _, dec_out, dec_lengths = make_decoder_io(
            targets, target_lengths, cfg.bos_id, cfg.eos_id, cfg.pad_id
        )
        return label_smoothed_ce(logits, dec_out, dec_lengths, cfg.label_smoothing, cfg.pad_id)

    # ----------------------------------------------------------------------------- decoding
    def _length_limits(
        self, encoder_lengths: torch.Tensor, max_len: int | None, max_len_ratio: float
    ) -> list[int]:
        """Per-utterance cap on emitted tokens (eos included)."""
        if max_len is not None:
            return [max(1, int(max_len))] * encoder_lengths.numel()
        return [
            max(1, min(self.config.max_len, int(math.ceil(max_len_ratio * int(n)))))
            for n in encoder_lengths.tolist()
        ]

    def _next_logp(self, logits: torch.Tensor, force_eos: torch.Tensor) -> torch.Tensor:
        """Log-probabilities with never-emitted ids removed; rows in ``force_eos`` may only end.

        Args:
            logits: (N, V).
            force_eos: (N,) bool.
        """
        logp = logits.float().log_softmax(dim=-1)
        logp[:, self.never_emit] = NEG_INF
        if bool(force_eos.any()):
            eos = self.config.eos_id
            forced = torch.full_like(logp, NEG_INF)
            forced[:, eos] = logp[:, eos]
            logp = torch.where(force_eos.unsqueeze(1), forced, logp)
        return logp

    @torch.no_grad()
    def greedy_search(
        self,
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
        cfg = self.config
        batch = encoder_out.shape[0]
        device = encoder_out.device
        limits = self._length_limits(encoder_lengths, max_len, max_len_ratio)
        limit_t = torch.tensor(limits, device=device)
        memory_kv, memory_mask = self.encode_memory(encoder_out, encoder_lengths)
        tokens = torch.full((batch,), cfg.bos_id, dtype=torch.long, device=device)
        scores = torch.zeros(batch, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        out: list[list[int]] = [[] for _ in range(batch)]
        cache = None
        for t in range(max(limits)):
            logits, cache = self.step(tokens, t, memory_kv, memory_mask, cache)
            logp = self._next_logp(logits, limit_t <= t + 1)
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
    def beam_search(
        self,
        encoder_out: torch.Tensor,
        encoder_lengths: torch.Tensor,
        beam_size: int = 4,
        length_penalty: float = 1.0,
        ctc_log_probs: torch.Tensor | None = None,
        ctc_weight: float = 0.0,
        max_len: int | None = None,
        ctc_mode: str = "joint",
        max_len_ratio: float = 1.0,
    ) -> list[Hypothesis]:
        """Batched beam search; returns the best hypothesis per utterance.

        See :meth:`beam_search_nbest` for the arguments.
        """
        nbest = self.beam_search_nbest(
            encoder_out,
            encoder_lengths,
            beam_size=beam_size,
            length_penalty=length_penalty,
            ctc_log_probs=ctc_log_probs,
            ctc_weight=ctc_weight,
            max_len=max_len,
            ctc_mode=ctc_mode,
            max_len_ratio=max_len_ratio,
        )
        return [hyps[0] for hyps in nbest]

    @torch.no_grad()
    def beam_search_nbest(
        self,
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
          (:class:`CTCPrefixScorer`), so CTC prunes the search itself. Costs O(T) small tensor
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
        cfg = self.config
        if ctc_mode not in ("joint", "rescore"):
            raise ValueError(f"ctc_mode must be 'joint' or 'rescore', not {ctc_mode!r}")
        use_ctc = ctc_log_probs is not None and ctc_weight > 0
        joint = use_ctc and ctc_mode == "joint"
        w = ctc_weight if joint else 0.0
        batch = encoder_out.shape[0]
        device = encoder_out.device
        k = beam_size
        n = batch * k
        vocab = cfg.vocab_size
        eos = cfg.eos_id
        limits = self._length_limits(encoder_lengths, max_len, max_len_ratio)
        limit_rows = torch.tensor(limits, device=device).repeat_interleave(k)

        # Every row b*k + j is beam j of utterance b.
        memory_kv, memory_mask = self.encode_memory(encoder_out, encoder_lengths)
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
            logits, cache = self.step(ys[:, -1], t, memory_kv, memory_mask, cache)
            logp = self._next_logp(logits, limit_rows <= t + 1)  # (N, V)
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
                    best_fin = max(
                        s / (len(tok) + 1) ** length_penalty for tok, _, s in finished[b]
                    )
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
                ranked = self._ctc_rescore(
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
        self,
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
        return sorted(
            rescored, key=lambda f: f[2] / (len(f[0]) + 1) ** length_penalty, reverse=True
        )
