"""RNN-T loss against plain references, and the RNNTransducer head (shapes, decoding, overfit).

Run ``python tests/test_rnnt.py`` for a quick speed comparison of rnnt_loss with F.ctc_loss.
"""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch
import torch.nn.functional as F

from asrkd.decoding.rnnt import rnnt_beam, rnnt_greedy
from asrkd.losses import rnnt_loss
from asrkd.losses.rnnt import rnnt_joint_loss
from asrkd.models.common import Hypothesis
from asrkd.models.rnnt import JointNetwork, PredictionNetwork, RNNTConfig, RNNTransducer

# ----------------------------------------------------------------------------- references


def naive_rnnt_nll(log_probs: torch.Tensor, targets: list[int], blank: int = 0) -> float:
    """Forward-variable DP written as plainly as possible, for one utterance.

    Args:
        log_probs: (T, U+1, V) log-probabilities of this utterance only (no padding).
        targets: the U labels.
    """
    frames, cols, _ = log_probs.shape
    alpha = [[-math.inf] * cols for _ in range(frames)]
    alpha[0][0] = 0.0
    for t in range(frames):
        for u in range(cols):
            if t == 0 and u == 0:
                continue
            terms = []
            if t > 0:
                terms.append(alpha[t - 1][u] + float(log_probs[t - 1, u, blank]))
            if u > 0:
                terms.append(alpha[t][u - 1] + float(log_probs[t, u - 1, targets[u - 1]]))
            peak = max(terms)
            alpha[t][u] = peak + math.log(sum(math.exp(x - peak) for x in terms))
    return -(alpha[frames - 1][cols - 1] + float(log_probs[frames - 1, cols - 1, blank]))


def brute_force_rnnt_nll(log_probs: torch.Tensor, targets: list[int], blank: int = 0) -> float:
    """Sum over every alignment path explicitly (tiny inputs only).

    A path is T blanks and U labels in some order, ending with a blank: choose which of the
    first T+U-1 moves are labels.
    """
    frames, cols, _ = log_probs.shape
    n_labels = cols - 1
    path_scores = []
    for label_moves in itertools.combinations(range(frames + n_labels - 1), n_labels):
        t = u = 0
        score = 0.0
        for move in range(frames + n_labels):
            if move in label_moves:
                score += float(log_probs[t, u, targets[u]])
                u += 1
            else:
                score += float(log_probs[t, u, blank])
                t += 1
        assert (t, u) == (frames, n_labels)
        path_scores.append(score)
    return -torch.logsumexp(torch.tensor(path_scores, dtype=torch.float64), 0).item()


def _random_batch(
    frame_lengths: list[int],
    label_lengths: list[int],
    vocab: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    batch = len(frame_lengths)
    frames, labels = max(frame_lengths), max(label_lengths)
    logits = torch.randn(batch, frames, labels + 1, vocab, generator=gen, dtype=dtype) * 2
    targets = torch.randint(1, vocab, (batch, labels), generator=gen)
    for b, n in enumerate(label_lengths):
        targets[b, n:] = 1  # pad id, as in the shared vocabulary
    return logits, targets, torch.tensor(frame_lengths), torch.tensor(label_lengths)


# ----------------------------------------------------------------------------- loss values


@pytest.mark.parametrize(
    ("frames", "labels", "vocab"),
    [(1, 0, 3), (1, 2, 3), (2, 1, 4), (3, 3, 5), (4, 2, 3), (4, 3, 5), (2, 3, 4)],
)
def test_loss_matches_brute_force_and_naive_dp(frames: int, labels: int, vocab: int) -> None:
    logits, targets, t_len, u_len = _random_batch([frames], [labels], vocab, seed=frames * labels)
    loss = rnnt_loss(logits, targets, t_len, u_len, reduction="none")[0].item()
    log_probs = logits[0].log_softmax(-1)
    target_list = targets[0].tolist()
    assert abs(loss - brute_force_rnnt_nll(log_probs, target_list)) < 1e-4
    assert abs(loss - naive_rnnt_nll(log_probs, target_list)) < 1e-4


def test_loss_matches_naive_dp_on_longer_sequences() -> None:
    # Both loop orientations: T > U+1 (loop over labels) and T < U+1 (loop over frames).
    for frames, labels in [(12, 5), (4, 9)]:
        logits, targets, t_len, u_len = _random_batch([frames], [labels], 7, seed=frames)
        loss = rnnt_loss(logits, targets, t_len, u_len, reduction="none")[0].item()
        ref = naive_rnnt_nll(logits[0].log_softmax(-1), targets[0].tolist())
        assert abs(loss - ref) < 1e-9


def test_nonzero_blank_id() -> None:
    logits, targets, t_len, u_len = _random_batch([4], [2], 5, seed=3)
    targets[0] = torch.tensor([0, 1])  # with blank=4, ids 0 and 1 are ordinary labels
    loss = rnnt_loss(logits, targets, t_len, u_len, blank=4, reduction="none")[0].item()
    ref = brute_force_rnnt_nll(logits[0].log_softmax(-1), [0, 1], blank=4)
    assert abs(loss - ref) < 1e-9


def test_mixed_lengths_equal_per_utterance_losses() -> None:
    frame_lengths, label_lengths = [7, 3, 5, 1, 7], [4, 2, 0, 3, 1]
    logits, targets, t_len, u_len = _random_batch(frame_lengths, label_lengths, 6, seed=1)
    # Garbage in the padding must not leak into any utterance.
    for b, (t, u) in enumerate(zip(frame_lengths, label_lengths, strict=True)):
        logits[b, t:] = 1e3
        logits[b, :, u + 1 :] = -1e3
    costs = rnnt_loss(logits, targets, t_len, u_len, reduction="none")
    singles = []
    for b, (t, u) in enumerate(zip(frame_lengths, label_lengths, strict=True)):
        single = rnnt_loss(
            logits[b : b + 1, :t, : u + 1],
            targets[b : b + 1, :u],
            torch.tensor([t]),
            torch.tensor([u]),
            reduction="none",
        )
        singles.append(single[0])
        ref = naive_rnnt_nll(logits[b, :t, : u + 1].log_softmax(-1), targets[b, :u].tolist())
        assert abs(costs[b].item() - ref) < 1e-9
    singles_t = torch.stack(singles)
    torch.testing.assert_close(costs, singles_t)
    torch.testing.assert_close(rnnt_loss(logits, targets, t_len, u_len), singles_t.mean())
    torch.testing.assert_close(
        rnnt_loss(logits, targets, t_len, u_len, reduction="sum"), singles_t.sum()
    )


def test_padded_gradient_is_zero_and_matches_single() -> None:
    frame_lengths, label_lengths = [6, 3], [3, 1]
    logits, targets, t_len, u_len = _random_batch(frame_lengths, label_lengths, 5, seed=2)
    logits.requires_grad_(True)
    rnnt_loss(logits, targets, t_len, u_len, reduction="sum").backward()
    grad = logits.grad
    assert grad is not None
    assert grad[1, 3:].abs().max() == 0 and grad[1, :, 2:].abs().max() == 0
    single = logits[1:2, :3, :2].detach().clone().requires_grad_(True)
    rnnt_loss(single, targets[1:2, :1], t_len[1:], u_len[1:], reduction="sum").backward()
    torch.testing.assert_close(grad[1, :3, :2], single.grad[0])


def test_float32_matches_float64() -> None:
    logits, targets, t_len, u_len = _random_batch([60, 41], [20, 13], 32, seed=4)
    ref = rnnt_loss(logits, targets, t_len, u_len, reduction="none")
    logits32 = logits.float().requires_grad_(True)
    out = rnnt_loss(logits32, targets, t_len, u_len, reduction="none")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-5)
    out.sum().backward()
    logits64 = logits.clone().requires_grad_(True)
    rnnt_loss(logits64, targets, t_len, u_len, reduction="sum").backward()
    torch.testing.assert_close(logits32.grad.double(), logits64.grad, atol=1e-5, rtol=1e-4)


def test_half_precision_logits() -> None:
    logits, targets, t_len, u_len = _random_batch([8], [3], 6, seed=5)
    half = logits.to(torch.bfloat16).requires_grad_(True)
    out = rnnt_loss(half, targets, t_len, u_len)
    assert out.dtype == torch.bfloat16
    ref = rnnt_loss(half.detach().double(), targets, t_len, u_len)
    assert abs(out.item() - ref.item()) < 0.1
    out.backward()
    assert half.grad is not None and half.grad.dtype == torch.bfloat16


def test_reduction_modes_and_validation() -> None:
    logits, targets, t_len, u_len = _random_batch([4, 3], [2, 1], 4, seed=6)
    none = rnnt_loss(logits, targets, t_len, u_len, reduction="none")
    assert none.shape == (2,)
    torch.testing.assert_close(rnnt_loss(logits, targets, t_len, u_len), none.mean())
    torch.testing.assert_close(
        rnnt_loss(logits, targets, t_len, u_len, reduction="sum"), none.sum()
    )
    with pytest.raises(ValueError):
        rnnt_loss(logits, targets, t_len, u_len, reduction="avg")
    with pytest.raises(ValueError):
        rnnt_loss(logits, targets, torch.tensor([5, 3]), u_len)
    with pytest.raises(ValueError):
        rnnt_loss(logits, targets, torch.tensor([0, 3]), u_len)
    with pytest.raises(ValueError):
        rnnt_loss(logits, targets[:, :1], t_len, u_len)


def test_no_grad_evaluation_matches_training_path() -> None:
    logits, targets, t_len, u_len = _random_batch([6, 4, 2], [3, 0, 2], 5, seed=11)
    logits.requires_grad_(True)
    with_grad = rnnt_loss(logits, targets, t_len, u_len, reduction="none")
    with torch.no_grad():
        without = rnnt_loss(logits, targets, t_len, u_len, reduction="none")
    torch.testing.assert_close(with_grad.detach(), without)


def test_unfused_log_softmax_input() -> None:
    logits, targets, t_len, u_len = _random_batch([5, 4], [3, 2], 5, seed=7)
    fused = rnnt_loss(logits, targets, t_len, u_len, reduction="none")
    unfused = rnnt_loss(
        logits.log_softmax(-1), targets, t_len, u_len, reduction="none", fused_log_softmax=False
    )
    torch.testing.assert_close(fused, unfused)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    ("frame_lengths", "label_lengths"),
    [([4, 2, 3], [2, 0, 1]), ([2, 1], [3, 2])],  # loop over labels / loop over frames
)
def test_gradcheck(fused: bool, frame_lengths: list[int], label_lengths: list[int]) -> None:
    logits, targets, t_len, u_len = _random_batch(frame_lengths, label_lengths, 4, seed=8)
    logits.requires_grad_(True)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        if not fused:
            x = x.log_softmax(-1)
        return rnnt_loss(x, targets, t_len, u_len, reduction="none", fused_log_softmax=fused)

    assert torch.autograd.gradcheck(loss_fn, (logits,))


def test_gradient_matches_autograd_of_plain_loss() -> None:
    logits, targets, t_len, u_len = _random_batch([5], [3], 5, seed=9)
    x = logits.clone().requires_grad_(True)
    rnnt_loss(x, targets, t_len, u_len).backward()
    y = logits.clone().requires_grad_(True)
    # Autograd through an explicit alpha recursion over log_softmax (a third implementation).
    lp = y[0].log_softmax(-1)
    tgt = targets[0].tolist()
    alpha: dict[tuple[int, int], torch.Tensor] = {(0, 0): lp.new_zeros(())}
    for t in range(5):
        for u in range(4):
            if (t, u) == (0, 0):
                continue
            terms = []
            if t > 0:
                terms.append(alpha[t - 1, u] + lp[t - 1, u, 0])
            if u > 0:
                terms.append(alpha[t, u - 1] + lp[t, u - 1, tgt[u - 1]])
            alpha[t, u] = torch.logsumexp(torch.stack(terms), 0)
    (-(alpha[4, 3] + lp[4, 3, 0])).backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_gradient_clamp() -> None:
    logits, targets, t_len, u_len = _random_batch([6], [3], 5, seed=10)
    logits = (logits * 5).requires_grad_(True)
    rnnt_loss(logits, targets, t_len, u_len, clamp=0.05, reduction="sum").backward()
    assert logits.grad.abs().max() <= 0.05 + 1e-12


# ----------------------------------------------------------------------------- fused joint loss


def _joint_batch(frame_lengths: list[int], label_lengths: list[int], vocab: int = 7,
                 dropout: float = 0.0, seed: int = 0):
    """A float64 joint network, projected inputs that require grad, and padded targets."""
    torch.manual_seed(seed)
    joint = JointNetwork(RNNTConfig(vocab_size=vocab, encoder_dim=6, pred_dim=6, joint_dim=5,
                                    dropout=dropout)).double()
    batch, frames, labels = len(frame_lengths), max(frame_lengths), max(label_lengths)
    enc = torch.randn(batch, frames, 5, dtype=torch.float64, requires_grad=True)
    pred = torch.randn(batch, labels + 1, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, vocab, (batch, labels))
    return joint, enc, pred, targets, torch.tensor(frame_lengths), torch.tensor(label_lengths)


# 1: one frame per block; 4: frame ranges of one utterance; 30: whole utterances, one or two
# per block; 10**6: the whole batch in one block.
@pytest.mark.parametrize("block_cells", [1, 4, 30, 10**6])
def test_fused_joint_loss_equals_loss_on_materialised_logits(block_cells: int) -> None:
    joint, enc, pred, targets, t_len, u_len = _joint_batch([6, 3, 1, 5], [3, 0, 2, 3])
    inputs = [enc, pred, *joint.output.parameters()]
    reference = rnnt_loss(joint.combine(enc[:, :, None], pred[:, None]), targets, t_len, u_len,
                          reduction="none")
    expected = torch.autograd.grad(reference.sum() * 1.0 + reference[0], inputs)
    fused = rnnt_joint_loss(joint.combine, enc, pred, targets, t_len, u_len, reduction="none",
                            block_cells=block_cells)
    torch.testing.assert_close(fused, reference)
    got = torch.autograd.grad(fused.sum() * 1.0 + fused[0], inputs)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        evaluated = rnnt_joint_loss(joint.combine, enc, pred, targets, t_len, u_len,
                                    reduction="none", block_cells=block_cells)
    torch.testing.assert_close(evaluated, reference.detach())


def test_fused_joint_loss_gradcheck() -> None:
    joint, enc, pred, targets, t_len, u_len = _joint_batch([3, 2], [2, 1], vocab=4, seed=3)

    def loss_fn(e: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return rnnt_joint_loss(joint.combine, e, p, targets, t_len, u_len, reduction="none",
                               block_cells=2)

    assert torch.autograd.gradcheck(loss_fn, (enc, pred))


def test_fused_joint_loss_replays_the_dropout_mask() -> None:
    # Training mode with dropout: the recomputed blocks must use the forward pass's masks, so
    # the gradient is that of the loss actually returned. Check it with a directional
    # derivative: (L(w + h d) - L(w - h d)) / 2h under the same seed equals grad . d.
    joint, enc, pred, targets, t_len, u_len = _joint_batch([5, 4], [3, 2], dropout=0.5, seed=4)
    weight = joint.output.weight

    def loss_at(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return rnnt_joint_loss(joint.combine, enc, pred, targets, t_len, u_len, block_cells=5)

    (grad,) = torch.autograd.grad(loss_at(0), [weight])
    direction = torch.randn_like(weight)
    step = 1e-6
    with torch.no_grad():
        weight.add_(step * direction)
        up = loss_at(0)
        weight.sub_(2 * step * direction)
        down = loss_at(0)
        weight.add_(step * direction)
    torch.testing.assert_close((up - down) / (2 * step), (grad * direction).sum(),
                               rtol=1e-5, atol=1e-7)


def test_fused_joint_loss_validates_shapes() -> None:
    joint, enc, pred, targets, t_len, u_len = _joint_batch([3, 2], [2, 1])
    with pytest.raises(ValueError, match="shapes disagree"):
        rnnt_joint_loss(joint.combine, enc, pred[:, :2], targets, t_len, u_len)
    with pytest.raises(ValueError, match="lengths out of range"):
        rnnt_joint_loss(joint.combine, enc, pred, targets, torch.tensor([4, 2]), u_len)


# ----------------------------------------------------------------------------- timing helper


def compare_rnnt_ctc_speed(
    batch: int = 8,
    frames: int = 100,
    labels: int = 30,
    vocab: int = 64,
    threads: int = 1,
    repeats: int = 20,
) -> dict[str, float]:
    """Time rnnt_loss and F.ctc_loss (forward + backward, log-softmax included) on CPU.

    Not an assertion: RNN-T must normalise a (B, T, U+1, V) tensor where CTC has (T, B, V), so
    the ratio depends on U and V as much as on the implementation.

    Returns:
        milliseconds per call for each loss and their ratio.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        rnnt_in = torch.randn(batch, frames, labels + 1, vocab, generator=gen, requires_grad=True)
        ctc_in = torch.randn(frames, batch, vocab, generator=gen, requires_grad=True)
        targets = torch.randint(1, vocab, (batch, labels), generator=gen)
        t_len = torch.full((batch,), frames)
        u_len = torch.full((batch,), labels)

        def run_rnnt() -> None:
            rnnt_loss(rnnt_in, targets, t_len, u_len).backward()

        def run_ctc() -> None:
            F.ctc_loss(ctc_in.log_softmax(-1), targets, t_len, u_len).backward()

        def best_ms(fn) -> float:
            fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times) * 1e3  # min: the shared machine adds noise, never removes it

        rnnt_ms, ctc_ms = best_ms(run_rnnt), best_ms(run_ctc)
    finally:
        torch.set_num_threads(previous)
    return {"rnnt_ms": rnnt_ms, "ctc_ms": ctc_ms, "ratio": rnnt_ms / ctc_ms}


def test_timing_helper_runs() -> None:
    result = compare_rnnt_ctc_speed(batch=2, frames=10, labels=3, vocab=8, repeats=2)
    assert result["rnnt_ms"] > 0 and result["ctc_ms"] > 0


# ----------------------------------------------------------------------------- RNNTransducer


def _tiny_model(seed: int = 0, vocab: int = 10, blank_bias: float = 0.0, layers: int = 1,
                activation: str = "tanh") -> RNNTransducer:
    torch.manual_seed(seed)
    config = RNNTConfig(
        vocab_size=vocab, encoder_dim=12, pred_dim=16, joint_dim=16, dropout=0.0,
        max_symbols_per_frame=3, pred_layers=layers, joint_activation=activation,
    )  # fmt: skip
    model = RNNTransducer(config).eval()
    with torch.no_grad():
        model.joint.output.bias[config.blank_id] += blank_bias
    return model


def path_log_prob(model: RNNTransducer, encoder_out: torch.Tensor, hyp: Hypothesis) -> float:
    """Log-prob of the alignment given by (tokens, timestamps), from the training-mode logits.

    Args:
        encoder_out: (T_b, D) states of one utterance.
    """
    targets = torch.tensor([hyp.tokens], dtype=torch.long).reshape(1, -1)
    with torch.no_grad():
        lp = (
            model(
                encoder_out.unsqueeze(0),
                torch.tensor([encoder_out.size(0)]),
                targets,
                torch.tensor([len(hyp.tokens)]),
            )[0]
            .double()
            .log_softmax(-1)
        )
    score, u = 0.0, 0
    for t in range(encoder_out.size(0)):
        while u < len(hyp.tokens) and hyp.timestamps[u] == t:
            score += float(lp[t, u, hyp.tokens[u]])
            u += 1
        score += float(lp[t, u, model.blank_id])
    assert u == len(hyp.tokens)
    return score


def test_forward_shapes() -> None:
    model = _tiny_model()
    enc = torch.randn(3, 7, 12)
    targets = torch.randint(2, 10, (3, 4))
    out = model(enc, torch.tensor([7, 5, 2]), targets, torch.tensor([4, 1, 0]))
    assert out.shape == (3, 7, 5, 10)
    loss = rnnt_loss(out, targets, torch.tensor([7, 5, 2]), torch.tensor([4, 1, 0]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@torch.no_grad()
def frame_looping_greedy(
    transducer: RNNTransducer, encoder_out: torch.Tensor, encoder_lengths: torch.Tensor,
    limit: int,
) -> list[Hypothesis]:
    """The frame-by-frame greedy search that the label-looping ``rnnt_greedy`` replaced: the
    reference its hypotheses, timestamps and scores must equal."""
    batch, frames, _ = encoder_out.shape
    device = encoder_out.device
    lengths = encoder_lengths.to(device)
    enc_proj = transducer.joint.encoder_proj(encoder_out)  # (B, T, J)

    last = torch.full((batch,), transducer.blank_id, dtype=torch.long, device=device)
    pred_out, state = transducer.prediction.step(last)
    pred_proj = transducer.joint.pred_proj(pred_out)  # (B, J)
    scores = torch.zeros(batch, dtype=torch.float64, device=device)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    stamps: list[list[int]] = [[] for _ in range(batch)]

    for t in range(frames):
        done = lengths <= t  # finished utterances take no part in this frame
        emitted = torch.zeros(batch, dtype=torch.long, device=device)
        while not bool(done.all()):
            log_probs = transducer.joint.combine(enc_proj[:, t], pred_proj).log_softmax(-1).double()
            best = log_probs.argmax(dim=-1)
            emit = ~done & (best != transducer.blank_id) & (emitted < limit)
            leave = ~done & ~emit
            # Leaving a frame is taking its blank (forced when the cap is hit).
            scores += torch.where(leave, log_probs[:, transducer.blank_id], 0.0)
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
            new_out, (h, c) = transducer.prediction.step(labels, sub_state)
            state[0][:, idx] = h
            state[1][:, idx] = c
            pred_proj[idx] = transducer.joint.pred_proj(new_out)

    return [
        Hypothesis(tokens=tokens[b], score=float(scores[b]), timestamps=stamps[b])
        for b in range(batch)
    ]


def assert_same_hypotheses(got: list[Hypothesis], want: list[Hypothesis]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.tokens == w.tokens and g.timestamps == w.timestamps
        assert abs(g.score - w.score) < 1e-4 * max(1.0, abs(w.score))


@pytest.mark.parametrize("compiled", [True, False], ids=["torchscript", "python"])
@pytest.mark.parametrize(("layers", "activation"), [(1, "tanh"), (2, "relu")])
@pytest.mark.parametrize("window", [1, 3, 32])
@pytest.mark.parametrize("blank_bias", [-3.0, 0.0, 2.5])
def test_label_looping_greedy_equals_frame_by_frame(blank_bias: float, window: int,
                                                     layers: int, activation: str,
                                                     compiled: bool, monkeypatch) -> None:
    """The batched label loop, compiled by TorchScript (what runs) and as plain Python (what
    runs where torch.jit.script fails), against the frame-by-frame search."""
    from asrkd.decoding import rnnt as search

    if compiled:
        assert isinstance(search._compiled_label_loop(), torch.jit.ScriptFunction)
    else:
        monkeypatch.setattr(search, "_compiled_label_loop", lambda: search._label_loop)
    model = _tiny_model(seed=6, blank_bias=blank_bias, layers=layers, activation=activation)
    torch.manual_seed(13)
    lengths = torch.tensor([17, 3, 11, 1, 17, 8])
    enc = torch.randn(6, 17, 12)
    enc[1, 3:] = 100.0  # padding content must not matter
    for limit in (1, 3, 8):
        want = frame_looping_greedy(model, enc, lengths, limit)
        got = rnnt_greedy(model, enc, lengths, max_symbols_per_frame=limit, window=window)
        assert_same_hypotheses(got, want)
        # One utterance takes its own search (Python scalars instead of batch masks).
        for b in (0, 3, 5):
            n = int(lengths[b])
            alone = rnnt_greedy(model, enc[b : b + 1, :n], lengths[b : b + 1],
                                max_symbols_per_frame=limit, window=window)
            assert_same_hypotheses(alone, want[b : b + 1])
    with pytest.raises(ValueError, match="window"):
        rnnt_greedy(model, enc, lengths, window=0)


@pytest.mark.parametrize("blank_bias", [0.0, 2.5])
def test_greedy_and_beam_hypotheses(blank_bias: float) -> None:
    model = _tiny_model(seed=1, blank_bias=blank_bias)
    torch.manual_seed(11)
    enc = torch.randn(4, 9, 12)
    lengths = torch.tensor([9, 6, 1, 4])
    greedy = rnnt_greedy(model, enc, lengths)
    beam = rnnt_beam(model, enc, lengths, beam_size=4)
    assert len(greedy) == len(beam) == 4
    for b in range(4):
        for hyp in (greedy[b], beam[b]):
            assert isinstance(hyp, Hypothesis)
            assert model.blank_id not in hyp.tokens
            assert len(hyp.timestamps) == len(hyp.tokens)
            assert hyp.timestamps == sorted(hyp.timestamps)
            assert all(0 <= t < lengths[b] for t in hyp.timestamps)
            # The reported score is the log-prob of the returned alignment path.
            assert abs(hyp.score - path_log_prob(model, enc[b, : lengths[b]], hyp)) < 1e-4
        assert beam[b].score >= greedy[b].score - 1e-6


def test_beam_size_one_equals_greedy() -> None:
    model = _tiny_model(seed=2, blank_bias=1.0)
    enc = torch.randn(2, 8, 12)
    lengths = torch.tensor([8, 5])
    greedy = rnnt_greedy(model, enc, lengths)
    beam = rnnt_beam(model, enc, lengths, beam_size=1)
    for g, b in zip(greedy, beam, strict=True):
        assert g.tokens == b.tokens and g.timestamps == b.timestamps
        assert abs(g.score - b.score) < 1e-5


def test_beam_sum_merge_scores_at_least_max_merge() -> None:
    model = _tiny_model(seed=3, blank_bias=1.0)
    enc = torch.randn(1, 6, 12)
    lengths = torch.tensor([6])
    best_max = rnnt_beam(model, enc, lengths, beam_size=4, merge="max")[0]
    best_sum = rnnt_beam(model, enc, lengths, beam_size=4, merge="sum")[0]
    assert best_sum.score >= best_max.score - 1e-9
    # A merged score is bounded by the sequence's log-likelihood over all alignments.
    targets = torch.tensor([best_sum.tokens], dtype=torch.long).reshape(1, -1)
    target_len = torch.tensor([len(best_sum.tokens)])
    with torch.no_grad():
        logits = model(enc, lengths, targets, target_len)
    log_like = -rnnt_loss(logits.double(), targets, lengths, target_len).item()
    assert best_sum.score <= log_like + 1e-6


def test_greedy_padded_batch_equals_single_utterances() -> None:
    model = _tiny_model(seed=4, blank_bias=1.5)
    torch.manual_seed(12)
    lengths = [9, 4, 7]
    enc = torch.randn(3, 9, 12)
    enc[1, 4:] = 100.0  # padding content must not matter
    batched = rnnt_greedy(model, enc, torch.tensor(lengths))
    for b, n in enumerate(lengths):
        alone = rnnt_greedy(model, enc[b : b + 1, :n], torch.tensor([n]))[0]
        assert alone.tokens == batched[b].tokens
        assert alone.timestamps == batched[b].timestamps
        assert abs(alone.score - batched[b].score) < 1e-5


def test_max_symbols_per_frame_is_respected() -> None:
    model = _tiny_model(seed=5, blank_bias=-5.0)  # blank almost never wins
    enc = torch.randn(1, 5, 12)
    lengths = torch.tensor([5])
    for limit in (1, 2):
        greedy = rnnt_greedy(model, enc, lengths, max_symbols_per_frame=limit)[0]
        # Greedy always prefers a label here, so it hits the cap at every frame.
        assert greedy.timestamps == [t for t in range(5) for _ in range(limit)]
        # Beam may well prefer fewer labels (each costs log-prob; every frame pays its blank).
        beam = rnnt_beam(model, enc, lengths, beam_size=3, max_symbols_per_frame=limit)[0]
        assert all(beam.timestamps.count(t) <= limit for t in range(5))
        assert beam.score >= greedy.score


def test_tiny_model_overfits_one_sequence() -> None:
    torch.manual_seed(0)
    config = RNNTConfig(
        vocab_size=8, encoder_dim=16, pred_dim=24, joint_dim=24, dropout=0.0,
        max_symbols_per_frame=3,
    )  # fmt: skip
    model = RNNTransducer(config)
    enc = torch.randn(1, 10, 16)  # fixed "encoder output"
    enc_len = torch.tensor([10])
    target = torch.tensor([[5, 6, 7, 5, 4]])
    target_len = torch.tensor([5])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        optimizer.zero_grad()
        loss = rnnt_loss(model(enc, enc_len, target, target_len), target, enc_len, target_len)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    model.eval()
    assert rnnt_greedy(model, enc, enc_len)[0].tokens == target[0].tolist()
    assert rnnt_beam(model, enc, enc_len, beam_size=3)[0].tokens == target[0].tolist()


if __name__ == "__main__":
    for n_threads in (1, 2):
        print(f"threads={n_threads}", compare_rnnt_ctc_speed(threads=n_threads))


def _eval_prediction(seed: int, layers: int) -> PredictionNetwork:
    """A small prediction network (with dropout configured) in eval mode."""
    torch.manual_seed(seed)
    config = RNNTConfig(vocab_size=10, encoder_dim=12, pred_dim=16, joint_dim=16,
                        pred_layers=layers, dropout=0.1)
    return RNNTransducer(config).prediction.eval()


@pytest.mark.parametrize("layers", [1, 2])
def test_prediction_step_equals_the_lstm_module(layers: int) -> None:
    # Decoding steps the LSTM cell written out; it must be nn.LSTM's step and forward.
    prediction = _eval_prediction(7, layers)
    tokens = torch.tensor([[3, 5, 9, 1], [2, 2, 7, 4]])
    full = prediction(tokens)  # (B, U+1, pred_dim) through nn.LSTM
    out, state = prediction.step(torch.zeros(2, dtype=torch.long))
    steps = [out]
    for u in range(tokens.size(1)):
        out, state = prediction.step(tokens[:, u], state)
        steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-6, rtol=1e-5)
    assert state[0].shape == state[1].shape == (layers, 2, 16)


@pytest.mark.parametrize("layers", [1, 2])
def test_decoding_lstm_equals_the_prediction_step(layers: int) -> None:
    # Greedy search steps DecodingLSTM (input projection folded into a table, gates
    # reordered): the same outputs and states as PredictionNetwork.step, batched and alone.
    prediction = _eval_prediction(8, layers)
    lstm = prediction.for_decoding()
    tokens = torch.tensor([[0, 3, 5, 9], [0, 2, 7, 4]])
    want_state = None
    state = lstm.start(2)
    one = [(h[1], c[1]) for h, c in state]
    for u in range(tokens.size(1)):
        want, want_state = prediction.step(tokens[:, u], want_state)
        got, state = lstm.step(tokens[:, u], state)
        got_one, one = lstm.step_one(int(tokens[1, u]), one)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got_one, want[1], atol=1e-6, rtol=1e-5)
        for layer in range(layers):
            torch.testing.assert_close(state[layer][0], want_state[0][layer], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(state[layer][1], want_state[1][layer], atol=1e-6, rtol=1e-5)
    assert prediction.for_decoding() is lstm  # kept while the weights stay as they are
    assert "_decoding_lstm" not in str(prediction.state_dict().keys())


def test_greedy_follows_weight_updates() -> None:
    # The decoding layout is rebuilt when a parameter changes in place (an optimiser step or
    # load_state_dict between validations), so search never runs on stale weights.
    model = _tiny_model(seed=9, blank_bias=1.0)
    enc = torch.randn(2, 9, 12)
    lengths = torch.tensor([9, 7])
    before = model.prediction.for_decoding()
    rnnt_greedy(model, enc, lengths)
    with torch.no_grad():
        model.prediction.embed.weight.mul_(-3.0)
        model.prediction.lstm.weight_hh_l0.add_(0.5)
    assert model.prediction.for_decoding() is not before
    assert_same_hypotheses(rnnt_greedy(model, enc, lengths),
                           frame_looping_greedy(model, enc, lengths, 3))
    other = _tiny_model(seed=10, blank_bias=1.0)
    model.load_state_dict(other.state_dict())
    assert_same_hypotheses(rnnt_greedy(model, enc, lengths),
                           frame_looping_greedy(other, enc, lengths, 3))


def test_decoding_lstm_built_under_autocast_keeps_the_parameter_dtype() -> None:
    # Validation decodes under bf16 autocast; the cached layout must still serve fp32 search.
    model = _tiny_model(seed=11, blank_bias=1.0)
    enc = torch.randn(2, 9, 12)
    lengths = torch.tensor([9, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rnnt_greedy(model, enc, lengths)
    assert model.prediction.for_decoding().table.dtype == torch.float32
    assert_same_hypotheses(rnnt_greedy(model, enc, lengths),
                           frame_looping_greedy(model, enc, lengths, 3))
