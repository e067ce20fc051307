"""Attention (Transformer) decoder: teacher-forced training and the cached decoding step.

Pre-LN layers of causal self-attention, cross-attention over the encoder states and a
feed-forward block, all on ``F.scaled_dot_product_attention``. Decoding keeps a key/value
cache: self-attention keys/values of the prefix grow by one position per step and the
cross-attention keys/values of the encoder states are computed once, so a step costs one
position per layer instead of re-running the whole prefix.

Search (greedy, beam, joint CTC/attention scoring) is in :mod:`asrkd.decoding.attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from asrkd.errors import ConfigError
from asrkd.models.common import make_pad_mask

NEG_INF = float("-inf")


@dataclass(frozen=True)
class TransformerDecoderConfig:
    """Configuration of :class:`TransformerDecoder`.

    This is also the ``model.transformer`` section of a run config: ``vocab_size``,
    ``encoder_dim`` and the special ids come from the tokenizer and the encoder
    (:func:`~asrkd.models.e2e_asr.build_model` fills them in; 0 means "not yet").

    Args:
        vocab_size: V, the shared vocabulary size.
        encoder_dim: D, the encoder output size (projected to ``d_model`` if different).
        d_model: decoder width; None: the encoder's width (so overriding the encoder's
            ``d_model`` resizes the decoder with it).
        n_heads: attention heads.
        n_layers: decoder layers.
        ff_dim: feed-forward hidden size; None: 4 x ``d_model``.
        dropout: dropout on residual branches, attention weights and embeddings.
        max_len: length of the precomputed positional table and the cap on decoding length.
        bos_id: start token fed first.
        eos_id: end token predicted last.
        pad_id: target padding id.

    The training loss (label-smoothed cross-entropy, :func:`asrkd.losses.label_smoothed_ce`)
    is :class:`~asrkd.losses.ASRLoss`'s, set by ``training.asr_loss.label_smoothing``.
    """

    vocab_size: int = 0
    encoder_dim: int = 0
    d_model: int | None = 256
    n_heads: int = 4
    n_layers: int = 4
    ff_dim: int | None = 1024
    dropout: float = 0.1
    max_len: int = 512
    bos_id: int = 2
    eos_id: int = 3
    pad_id: int = 1


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
            raise ConfigError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
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
        # Token embeddings are scaled by sqrt(d) on input, so they start at std d^-0.5 (unit rms
        # after scaling, as in Vaswani et al. and fairseq). nn.Embedding's default N(0, 1)
        # would make them sqrt(d) times larger than the sinusoidal positions (13x at d = 176),
        # leaving the decoder nearly blind to position: it then cannot tell the second "s" of
        # a spelled "s s w" from the first and loops on repeated tokens.
        nn.init.normal_(self.embed.weight, std=d**-0.5)
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
