"""CTC head / decoding and the attention TransformerDecoder (fast, CPU)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from asrkd.decoding.attention import attention_beam, attention_beam_nbest, attention_greedy
from asrkd.decoding.ctc import (
    CTCPrefixScorer,
    ctc_greedy_decode,
    ctc_prefix_beam_search,
    ctc_sequence_log_prob,
)
from asrkd.losses import ctc_loss, label_smoothed_ce
from asrkd.models.common import Hypothesis
from asrkd.models.ctc import CTCConfig, CTCHead
from asrkd.models.transformer_decoder import (
    TransformerDecoder,
    TransformerDecoderConfig,
    make_decoder_io,
)

V = 12


def _random_log_probs(batch: int, frames: int, vocab: int, seed: int, sharp: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, frames, vocab, generator=g) * sharp).log_softmax(-1)


def _seq_log_prob(log_probs: torch.Tensor, length: int, tokens: list[int]) -> float:
    targets = torch.tensor([tokens or [0]])
    return float(
        ctc_sequence_log_prob(
            log_probs[None, :length], torch.tensor([length]), targets, torch.tensor([len(tokens)])
        )[0]
    )


def _tiny_decoder(**overrides) -> TransformerDecoder:
    cfg = dict(
        vocab_size=V,
        encoder_dim=24,
        d_model=32,
        n_heads=2,
        n_layers=2,
        ff_dim=64,
        dropout=0.0,
        max_len=64,
    )
    cfg.update(overrides)
    return TransformerDecoder(TransformerDecoderConfig(**cfg))


# ------------------------------------------------------------------------------------ CTC
def test_ctc_head_shapes_and_loss_is_mean_of_utterance_sums():
    torch.manual_seed(0)
    head = CTCHead(CTCConfig(vocab_size=V, encoder_dim=16))
    enc = torch.randn(3, 20, 16)
    lengths = torch.tensor([20, 15, 9])
    logits = head(enc)
    assert logits.shape == (3, 20, V)
    log_probs = head.log_probs(enc)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, 20), atol=1e-5)
    assert torch.allclose(head.log_probs(enc, temperature=2.0), (logits / 2).log_softmax(-1))
    targets = torch.tensor([[5, 6, 7, 5], [8, 8, 1, 1], [9, 1, 1, 1]])
    target_lengths = torch.tensor([4, 2, 1])
    loss = ctc_loss(log_probs, lengths, targets, target_lengths)
    per_utt = [
        F.ctc_loss(
            log_probs[b, : lengths[b]].unsqueeze(1),
            targets[b : b + 1, : target_lengths[b]],
            lengths[b : b + 1],
            target_lengths[b : b + 1],
            reduction="sum",
        )
        for b in range(3)
    ]
    assert torch.allclose(loss, torch.stack(per_utt).sum() / 3, atol=1e-5)
    loss.backward()
    assert head.proj.weight.grad is not None


def test_ctc_greedy_decode_hand_made():
    # Frames: a a _ a b b _ _ b | padding
    path = [5, 5, 0, 5, 6, 6, 0, 0, 6, 7, 7]
    log_probs = torch.full((2, len(path), V), -10.0)
    for t, tok in enumerate(path):
        log_probs[0, t, tok] = -0.1
        log_probs[1, t, tok] = -0.2
    hyps = ctc_greedy_decode(log_probs, torch.tensor([9, 4]))
    assert hyps[0].tokens == [5, 5, 6, 6]
    assert hyps[0].timestamps == [0, 3, 4, 8]
    assert hyps[0].score == pytest.approx(-0.9)
    assert hyps[1].tokens == [5, 5]
    assert hyps[1].score == pytest.approx(-0.8)


def test_prefix_beam_beats_greedy_in_sequence_probability():
    log_probs = _random_log_probs(6, 15, 6, seed=1, sharp=1.0)
    lengths = torch.tensor([15, 12, 15, 7, 10, 15])
    greedy = ctc_greedy_decode(log_probs, lengths)
    beam = ctc_prefix_beam_search(log_probs, lengths, beam_size=10)
    for b in range(6):
        n = int(lengths[b])
        p_greedy = _seq_log_prob(log_probs[b], n, greedy[b].tokens)
        p_beam = _seq_log_prob(log_probs[b], n, beam[b].tokens)
        assert p_beam >= p_greedy - 1e-4
        # The beam score is the prefix-merged sequence probability (pruned paths aside).
        assert beam[b].score <= p_beam + 1e-4
        assert len(beam[b].timestamps) == len(beam[b].tokens)


def test_prefix_beam_search_brute_force():
    frames, vocab = 4, 3
    for seed in range(5):
        log_probs = _random_log_probs(1, frames, vocab, seed=10 + seed)[0]
        exact: dict[tuple[int, ...], float] = {}
        for path in itertools.product(range(vocab), repeat=frames):
            labels = tuple(c for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1]))
            p = sum(float(log_probs[t, c]) for t, c in enumerate(path))
            exact[labels] = float(
                torch.logaddexp(torch.tensor(exact.get(labels, -math.inf)), torch.tensor(p))
            )
        best = max(exact, key=exact.get)
        hyp = ctc_prefix_beam_search(
            log_probs[None], torch.tensor([frames]), beam_size=64, prune_topk=vocab
        )[0]
        assert tuple(hyp.tokens) == best
        assert hyp.score == pytest.approx(exact[best], abs=1e-5)


def test_ctc_prefix_scorer_matches_ctc_loss():
    log_probs = _random_log_probs(2, 12, 7, seed=3).double()
    lengths = torch.tensor([12, 8])
    scorer = CTCPrefixScorer(log_probs, lengths, blank_id=0, eos_id=3)
    for b, tokens in [(0, [5, 6, 5]), (0, [5, 5]), (0, []), (1, [4, 6, 6, 2]), (1, [6])]:
        expected = _seq_log_prob(log_probs[b], int(lengths[b]), tokens)
        assert scorer.sequence_log_prob(tokens, utterance=b) == pytest.approx(expected, abs=1e-8)

    # Vectorised candidates: the prefix score of g+c is the sum over all continuations, so it
    # must be >= P(output == g+c), and the eos candidate gives P(output == g) exactly.
    state = scorer.advance(scorer.initial_state(), torch.tensor([5, 4]))
    cands = torch.tensor([[3, 5, 6, 0], [3, 4, 6, 0]])
    scores, _ = scorer.score(state, cands)
    for b, prefix in [(0, [5]), (1, [4])]:
        n = int(lengths[b])
        assert scores[b, 0] == pytest.approx(_seq_log_prob(log_probs[b], n, prefix), abs=1e-8)
        for j in (1, 2):
            full = _seq_log_prob(log_probs[b], n, prefix + [int(cands[b, j])])
            assert float(scores[b, j]) >= full - 1e-8
        assert scores[b, 3] == -math.inf  # blank is never a candidate label
    # Prefix of everything: with a single frame left after the prefix, psi(g+c) = sum of
    # P(output == g+c+...) over all continuations; check a case that has only one: T=1.
    one = _random_log_probs(1, 1, 5, seed=4).double()
    s1 = CTCPrefixScorer(one, eos_id=3)
    sc, _ = s1.score(s1.initial_state(), torch.tensor([[2, 4]]))
    assert torch.allclose(sc[0], one[0, 0, [2, 4]])


# ----------------------------------------------------------------------- attention decoder
def test_make_decoder_io_and_ce():
    targets = torch.tensor([[5, 6, 7], [8, 9, 0]])
    lengths = torch.tensor([3, 1])
    dec_in, dec_out, dec_lengths = make_decoder_io(targets, lengths, 2, 3, 1)
    assert dec_in.tolist() == [[2, 5, 6, 7], [2, 8, 1, 1]]
    assert dec_out.tolist() == [[5, 6, 7, 3], [8, 3, 1, 1]]
    assert dec_lengths.tolist() == [4, 2]
    logits = torch.randn(2, 4, V)
    ref = F.cross_entropy(logits.view(-1, V), dec_out.view(-1), ignore_index=1, label_smoothing=0.1)
    assert label_smoothed_ce(logits, dec_out, dec_lengths, 0.1, 1) == pytest.approx(float(ref))
    assert label_smoothed_ce(logits, dec_out, None, 0.1, 1) == pytest.approx(float(ref))
    # Per utterance: the same token losses summed (6 valid tokens) and divided by 2 utterances.
    per_utterance = label_smoothed_ce(logits, dec_out, dec_lengths, 0.1, 1, reduction="utterance")
    assert per_utterance == pytest.approx(float(ref) * 6 / 2)
    with pytest.raises(ValueError, match="reduction"):
        label_smoothed_ce(logits, dec_out, dec_lengths, reduction="batch")


def test_decoder_shapes_and_causality():
    torch.manual_seed(0)
    dec = _tiny_decoder().eval()
    enc = torch.randn(2, 10, 24)
    enc_len = torch.tensor([10, 7])
    targets = torch.randint(5, V, (2, 6))
    tlen = torch.tensor([6, 4])
    logits = dec(enc, enc_len, targets, tlen)
    assert logits.shape == (2, 7, V)
    _, dec_out, dec_len = make_decoder_io(targets, tlen)
    assert label_smoothed_ce(logits, dec_out, dec_len, 0.1).ndim == 0
    k = 3
    changed = targets.clone()
    changed[:, k] = (changed[:, k] - 5 + 1) % (V - 5) + 5
    logits2 = dec(enc, enc_len, changed, tlen)
    # targets[k] is decoder input position k+1: positions 0..k must not see it.
    assert torch.allclose(logits[:, : k + 1], logits2[:, : k + 1], atol=1e-6)
    assert not torch.allclose(logits[:, k + 1], logits2[:, k + 1])


@pytest.mark.parametrize("d_model", [32, 176, 512])
def test_decoder_inputs_weigh_token_and_position_alike(d_model):
    # The token embedding is multiplied by sqrt(d) on input; initialised at N(0, 1) it would
    # be sqrt(d) times the positions' size and the decoder nearly blind to where it is (it
    # looped on repeated spelled letters). Both must start at a comparable scale.
    torch.manual_seed(0)
    dec = _tiny_decoder(d_model=d_model, encoder_dim=d_model, n_heads=4, ff_dim=4 * d_model)
    tokens = (dec.embed.weight * dec.embed_scale).pow(2).mean().sqrt()
    positions = dec.positions[:64].pow(2).mean().sqrt()
    assert 0.5 < float(tokens / positions) < 2.0


def test_decoder_padding_invariance():
    torch.manual_seed(0)
    dec = _tiny_decoder(encoder_dim=32).eval()  # also the no-projection path
    enc = torch.randn(3, 12, 32)
    enc_len = torch.tensor([12, 5, 9])
    targets = torch.randint(5, V, (3, 7))
    tlen = torch.tensor([7, 3, 5])
    batched = dec(enc, enc_len, targets, tlen)
    for b in range(3):
        n, u = int(enc_len[b]), int(tlen[b])
        alone = dec(enc[b : b + 1, :n], enc_len[b : b + 1], targets[b : b + 1, :u], tlen[b : b + 1])
        assert torch.allclose(alone[0], batched[b, : u + 1], atol=1e-5)
    # Incremental decoding with the cache gives the teacher-forced logits.
    hyps = attention_greedy(dec, enc, enc_len)
    singles = [
        attention_greedy(dec, enc[b : b + 1, : int(enc_len[b])], enc_len[b : b + 1])[0]
        for b in range(3)
    ]
    for h, s in zip(hyps, singles):
        assert h.tokens == s.tokens
        assert h.score == pytest.approx(s.score, abs=1e-4)


@torch.no_grad()
def test_greedy_and_beam_outputs_and_beam_beats_greedy():
    torch.manual_seed(1)
    dec = _tiny_decoder().eval()
    enc = torch.randn(4, 9, 24)
    enc_len = torch.tensor([9, 6, 9, 3])
    greedy = attention_greedy(dec, enc, enc_len)
    beam = attention_beam(dec, enc, enc_len, beam_size=4, length_penalty=0.0)
    nbest = attention_beam_nbest(dec, enc, enc_len, beam_size=4, length_penalty=0.0)
    for b, (g, h) in enumerate(zip(greedy, beam)):
        assert isinstance(g, Hypothesis) and isinstance(h, Hypothesis)
        assert all(isinstance(t, int) for t in g.tokens + h.tokens)
        for tok in g.tokens + h.tokens:
            assert tok not in (0, 1, 2, 3)
        assert len(g.tokens) < int(enc_len[b]) + 1
        assert h.score >= g.score - 1e-4
        scores = [x.score for x in nbest[b]]
        assert scores == sorted(scores, reverse=True) and len(scores) <= 4
    # Greedy's score is the teacher-forced log-probability of its own output (+ eos).
    for b, g in enumerate(greedy):
        if len(g.tokens) + 1 >= int(enc_len[b]):
            continue  # ended by the length limit: eos was forced
        t = torch.tensor([g.tokens or [5]])
        logits = dec(
            enc[b : b + 1, : int(enc_len[b])], enc_len[b : b + 1], t, torch.tensor([len(g.tokens)])
        )
        _, dec_out, _ = make_decoder_io(t, torch.tensor([len(g.tokens)]), 2, 3, 1)
        ref = float(logits.log_softmax(-1)[0].gather(-1, dec_out[0, :, None]).sum())
        assert g.score == pytest.approx(ref, abs=1e-4)


def test_overfit_one_pair_greedy_beam_and_ctc():
    torch.manual_seed(0)
    dec = _tiny_decoder(encoder_dim=32)
    head = CTCHead(CTCConfig(vocab_size=V, encoder_dim=32))
    enc = torch.randn(1, 20, 32)
    enc_len = torch.tensor([20])
    target = torch.tensor([[5, 7, 7, 9, 6, 11]])
    tlen = torch.tensor([6])
    opt = torch.optim.Adam(list(dec.parameters()) + list(head.parameters()), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        _, dec_out, dec_len = make_decoder_io(target, tlen)
        loss = label_smoothed_ce(dec(enc, enc_len, target, tlen), dec_out, dec_len, 0.0)
        loss = loss + ctc_loss(head.log_probs(enc), enc_len, target, tlen)
        loss.backward()
        opt.step()
    dec.eval()
    head.eval()
    expected = target[0].tolist()
    assert attention_greedy(dec, enc, enc_len)[0].tokens == expected
    assert attention_beam(dec, enc, enc_len, beam_size=4)[0].tokens == expected
    ctc_lp = head.log_probs(enc)
    assert ctc_greedy_decode(ctc_lp, enc_len)[0].tokens == expected
    assert ctc_prefix_beam_search(ctc_lp, enc_len, beam_size=4)[0].tokens == expected
    for mode in ("rescore", "joint"):
        hyp = attention_beam(dec,
            enc, enc_len, beam_size=4, ctc_log_probs=ctc_lp, ctc_weight=0.3, ctc_mode=mode
        )[0]
        assert hyp.tokens == expected, mode
    # Pure CTC prefix scoring inside the beam (w = 1) also finds it.
    hyp = attention_beam(dec, enc, enc_len, beam_size=4, ctc_log_probs=ctc_lp, ctc_weight=1.0)[0]
    assert hyp.tokens == expected


@torch.no_grad()
def test_joint_score_is_combination_of_att_and_ctc():
    torch.manual_seed(2)
    dec = _tiny_decoder().eval()
    enc = torch.randn(2, 8, 24)
    enc_len = torch.tensor([8, 6])
    ctc_lp = _random_log_probs(2, 8, V, seed=5)
    w = 0.4
    hyps = attention_beam(dec,
        enc,
        enc_len,
        beam_size=3,
        length_penalty=0.0,
        ctc_log_probs=ctc_lp,
        ctc_weight=w,
        ctc_mode="joint",
    )
    for b, h in enumerate(hyps):
        n = int(enc_len[b])
        t = torch.tensor([h.tokens or [5]])
        tl = torch.tensor([len(h.tokens)])
        logits = dec(enc[b : b + 1, :n], enc_len[b : b + 1], t, tl)
        _, dec_out, _ = make_decoder_io(t, tl, 2, 3, 1)
        # Only the hypothesis' tokens and its eos count (an empty one is a placeholder token
        # plus eos, whose padded second position must not enter the sum).
        steps = len(h.tokens) + 1
        token_lp = logits.log_softmax(-1)[0].gather(-1, dec_out[0, :, None])[:steps]
        att = float(token_lp.sum())
        ctc = _seq_log_prob(ctc_lp[b], n, h.tokens)
        assert h.score == pytest.approx((1 - w) * att + w * ctc, abs=1e-3)
