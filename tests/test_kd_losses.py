"""Tests for the tensor-level KD losses (asrkd.losses.kd) and pseudo-label filtering."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from asrkd.losses.kd import (
    KD_LOSSES,
    RNNTKD,
    CTCFrameKD,
    HiddenStateKD,
    TokenKD,
    build_kd_loss,
    check_kd_compatibility,
    default_layer_map,
    rnnt_occupancy,
)
from asrkd.training.pseudo_labels import filter_pseudo_labels, nbest_agreement


def _f(x: object) -> float:
    """float() of a tensor without the requires_grad warning."""
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rnnt_inputs(seed: int = 0, b: int = 2, t: int = 5, u: int = 3, v: int = 6):
    g = _gen(seed)
    student = torch.randn(b, t, u + 1, v, generator=g, dtype=torch.float64)
    teacher = torch.randn(b, t, u + 1, v, generator=g, dtype=torch.float64)
    targets = torch.randint(5, v, (b, u), generator=g) if v > 5 else torch.full((b, u), v - 1)
    logit_lengths = torch.tensor([t] + [max(t - 2, 1)] * (b - 1))
    target_lengths = torch.tensor([u] + [max(u - 1, 0)] * (b - 1))
    return student, teacher, targets, logit_lengths, target_lengths


# ---------------------------------------------------------------------------------------------
# Zero for identical inputs, positive otherwise (T = 1)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_cls", [CTCFrameKD, TokenKD])
def test_frame_and_token_kd_zero_iff_identical(loss_cls: type) -> None:
    x = torch.randn(2, 1, 7, generator=_gen(1))
    y = torch.randn(2, 1, 7, generator=_gen(2))
    lengths = torch.tensor([1, 1])
    loss = loss_cls(temperature=2.0)
    assert abs(_f(loss(x, x.clone(), lengths))) < 1e-6
    assert _f(loss(y, x, lengths)) > 1e-4


def test_rnnt_kd_zero_iff_identical() -> None:
    student, teacher, targets, _, _ = _rnnt_inputs(b=1, t=1, u=2)
    lens_t, lens_u = torch.tensor([1]), torch.tensor([2])
    for weighting in ("uniform", "occupancy"):
        loss = RNNTKD(weighting=weighting)
        assert abs(_f(loss(teacher, teacher.clone(), targets, lens_t, lens_u))) < 1e-6
        assert _f(loss(student, teacher, targets, lens_t, lens_u)) > 1e-4


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_kd_zero_iff_identical(kind: str) -> None:
    loss = HiddenStateKD([4], [4], [(0, 0)], loss=kind)
    with torch.no_grad():  # identity projection: student == teacher means zero loss
        loss.projections[0].weight.copy_(torch.eye(4))
        loss.projections[0].bias.zero_()
    h = torch.randn(2, 1, 4, generator=_gen(3))
    lengths = torch.tensor([1, 1])
    assert abs(_f(loss([h], [h.clone()], lengths).detach())) < 1e-6
    assert _f(loss([h], [torch.randn(2, 1, 4, generator=_gen(4))], lengths).detach()) > 1e-4


# ---------------------------------------------------------------------------------------------
# Hand-computed tiny cases
# ---------------------------------------------------------------------------------------------


def test_ctc_kd_hand_case_with_temperature_and_blank_weighting() -> None:
    s = [[0.5, 1.0, -1.0], [0.0, 0.3, 2.0]]
    t = [[2.0, 0.0, 0.0], [0.1, 1.5, -0.5]]  # frame 0: teacher argmax blank; frame 1: not
    student = torch.tensor([s], dtype=torch.float64)
    teacher = torch.tensor([t], dtype=torch.float64)
    lengths = torch.tensor([2])
    tau = 2.0
    kls = [
        _kl(_softmax([v / tau for v in t[f]]), _softmax([v / tau for v in s[f]])) for f in range(2)
    ]

    # One utterance: "utterance" sums over its frames, "frame" averages them.
    plain = CTCFrameKD(temperature=tau)(student, teacher, lengths)
    assert _f(plain) == pytest.approx(tau**2 * (kls[0] + kls[1]), rel=1e-10)
    mean = CTCFrameKD(temperature=tau, reduction="frame")(student, teacher, lengths)
    assert _f(mean) == pytest.approx(tau**2 * (kls[0] + kls[1]) / 2, rel=1e-10)

    weighted = CTCFrameKD(temperature=tau, blank_weight=0.5)(student, teacher, lengths)
    assert _f(weighted) == pytest.approx(tau**2 * (0.5 * kls[0] + kls[1]), rel=1e-10)
    weighted = CTCFrameKD(temperature=tau, blank_weight=0.5, reduction="frame")(
        student, teacher, lengths
    )
    assert _f(weighted) == pytest.approx(tau**2 * (0.5 * kls[0] + kls[1]) / 1.5, rel=1e-10)

    # Teacher blank prob (temperature 1) of frame 0 is e^2 / (e^2 + 2) ~ 0.79 > 0.7: dropped.
    assert _softmax(t[0])[0] > 0.7 > _softmax(t[1])[0]
    dropped = CTCFrameKD(temperature=tau, blank_threshold=0.7)(student, teacher, lengths)
    assert _f(dropped) == pytest.approx(tau**2 * kls[1], rel=1e-10)

    # Every frame dropped: 0, and still differentiable.
    student.requires_grad_(True)
    none_left = CTCFrameKD(blank_threshold=0.0)(student, teacher, lengths)
    assert _f(none_left) == 0.0
    none_left.backward()
    assert student.grad is not None and torch.all(student.grad == 0)


def test_token_kd_hand_case() -> None:
    s = [[1.0, 0.0, 0.5], [0.2, 0.2, 0.9], [9.0, 9.0, 9.0]]  # last position is padding
    t = [[0.0, 2.0, 0.5], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]
    student = torch.tensor([s], dtype=torch.float64)
    teacher = torch.tensor([t], dtype=torch.float64)
    expected = (_kl(_softmax(t[0]), _softmax(s[0])) + _kl(_softmax(t[1]), _softmax(s[1]))) / 2
    value = TokenKD(reduction="frame")(student, teacher, torch.tensor([2]))
    assert _f(value) == pytest.approx(expected, rel=1e-10)
    value = TokenKD()(student, teacher, torch.tensor([2]))  # one utterance: the sum
    assert _f(value) == pytest.approx(2 * expected, rel=1e-10)


def test_utterance_reduction_sums_frames_and_averages_utterances() -> None:
    """Two utterances of 3 and 1 frames: (kl_00 + kl_01 + kl_02 + kl_10) / 2, whereas the
    frame mean divides by 4; the 1-frame utterance weighs a quarter, not half."""
    g = _gen(11)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    lengths = torch.tensor([3, 1])
    kl = [[_kl(_softmax(t[b, f].tolist()), _softmax(s[b, f].tolist())) for f in range(3)]
          for b in range(2)]
    total = kl[0][0] + kl[0][1] + kl[0][2] + kl[1][0]
    assert _f(CTCFrameKD(temperature=1.0)(s, t, lengths)) == pytest.approx(total / 2)
    assert _f(CTCFrameKD(temperature=1.0, reduction="frame")(s, t, lengths)) == pytest.approx(
        total / 4
    )
    assert _f(TokenKD()(s, t, lengths)) == pytest.approx(total / 2)
    with pytest.raises(ValueError, match="reduction"):
        CTCFrameKD(reduction="batch")


def _collapse(logits: list[float], label: int | None) -> list[float]:
    p = _softmax(logits)
    if label is None:
        return [p[0], 1.0 - p[0]]
    return [p[0], p[label], 1.0 - p[0] - p[label]]


def test_rnnt_kd_hand_case_three_way_and_two_way() -> None:
    # B=1, T=1, U=1, V=3 (blank 0, symbols 1 and 2), target y_1 = 2.
    s = [[0.3, -0.2, 1.0], [1.2, 0.4, -0.7]]  # rows u = 0 (3-way) and u = 1 (2-way)
    t = [[1.0, 0.5, -0.5], [0.0, 2.0, 0.1]]
    student = torch.tensor([[s]], dtype=torch.float64)
    teacher = torch.tensor([[t]], dtype=torch.float64)
    targets = torch.tensor([[2]])
    node0 = _kl(_collapse(t[0], 2), _collapse(s[0], 2))
    node1 = _kl(_collapse(t[1], None), _collapse(s[1], None))
    one = torch.tensor([1])
    value = RNNTKD(reduction="frame")(student, teacher, targets, one, one)
    assert _f(value) == pytest.approx((node0 + node1) / 2, rel=1e-10)
    # "utterance": the node mean times T + U = 2 nodes on every alignment path.
    value = RNNTKD()(student, teacher, targets, one, one)
    assert _f(value) == pytest.approx(node0 + node1, rel=1e-10)

    tau = 3.0
    node0 = _kl(_collapse([v / tau for v in t[0]], 2), _collapse([v / tau for v in s[0]], 2))
    node1 = _kl(_collapse([v / tau for v in t[1]], None), _collapse([v / tau for v in s[1]], None))
    value = RNNTKD(temperature=tau, reduction="frame")(student, teacher, targets, one, one)
    assert _f(value) == pytest.approx(tau**2 * (node0 + node1) / 2, rel=1e-10)


def test_hidden_kd_hand_case() -> None:
    loss = HiddenStateKD([2], [1], {0: 0}, loss="mse", reduction="frame")
    with torch.no_grad():
        loss.projections[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        loss.projections[0].bias.fill_(0.5)
    hs = torch.tensor([[[1.0, 1.0], [0.0, 2.0], [5.0, 5.0]]])  # (1, 3, 2); frame 2 padding
    ht = torch.tensor([[[3.0], [1.0], [0.0]]])
    # projected: 3.5, 4.5 -> squared errors 0.25, 12.25 -> mean 6.25
    assert _f(loss([hs], [ht], torch.tensor([2]))) == pytest.approx(6.25)
    loss.reduction = "utterance"  # one utterance: the sum over its frames
    assert _f(loss([hs], [ht], torch.tensor([2]))) == pytest.approx(12.5)

    cos = HiddenStateKD([2], [2], [(0, 0)], loss="cosine", reduction="frame")
    with torch.no_grad():
        cos.projections[0].weight.copy_(torch.eye(2))
        cos.projections[0].bias.zero_()
    hs = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    ht = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]])  # cos = 0 and 1 -> losses 1, 0
    assert _f(cos([hs], [ht], torch.tensor([2]))) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# Padding invariance (garbage, including inf/nan, in padded positions)
# ---------------------------------------------------------------------------------------------


def _garbage_pad(x: torch.Tensor, dim: int, extra: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = extra
    junk = torch.randn(shape, generator=_gen(9), dtype=x.dtype) * 1e3
    junk.view(-1)[0] = _f("nan")
    junk.view(-1)[-1] = _f("inf")
    return torch.cat([x, junk], dim=dim)


@pytest.mark.parametrize("loss", [CTCFrameKD(blank_weight=0.3), TokenKD(temperature=1.5)])
def test_frame_and_token_kd_padding_invariance(loss: torch.nn.Module) -> None:
    g = _gen(5)
    s = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    t = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    lengths = torch.tensor([4, 2])
    ref_s = s.clone().requires_grad_(True)
    ref = loss(ref_s, t, lengths)
    ref.backward()
    padded_s = _garbage_pad(s, 1, 3).requires_grad_(True)
    padded = loss(padded_s, _garbage_pad(t, 1, 3), lengths)
    padded.backward()
    assert _f(padded) == pytest.approx(_f(ref), rel=1e-12)
    assert torch.allclose(padded_s.grad[:, :4], ref_s.grad)
    assert torch.all(padded_s.grad[:, 4:] == 0)
    # Also the padding inside the batch (utterance 1, frames 2..3) must be ignored.
    s2 = s.clone()
    s2[1, 2:] = 1e4
    assert _f(loss(s2, t, lengths)) == pytest.approx(_f(ref), rel=1e-12)


@pytest.mark.parametrize("weighting", ["uniform", "occupancy"])
def test_rnnt_kd_padding_invariance(weighting: str) -> None:
    student, teacher, targets, t_len, u_len = _rnnt_inputs(seed=3)
    loss = RNNTKD(chunk_size=2, weighting=weighting)
    ref = loss(student, teacher, targets, t_len, u_len)
    # Pad T by 2 and U by 1 with garbage; pad the targets with blank (ids beyond U_b are junk).
    s = _garbage_pad(_garbage_pad(student, 1, 2), 2, 1)
    t = _garbage_pad(_garbage_pad(teacher, 1, 2), 2, 1)
    tg = torch.cat([targets, torch.zeros(targets.shape[0], 1, dtype=targets.dtype)], dim=1)
    s.requires_grad_(True)
    padded = loss(s, t, tg, t_len, u_len)
    padded.backward()
    assert _f(padded) == pytest.approx(_f(ref), rel=1e-10)
    assert torch.isfinite(s.grad).all()


def test_hidden_kd_padding_invariance() -> None:
    loss = HiddenStateKD([3], [5])
    g = _gen(6)
    hs, ht = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 5, generator=g)
    lengths = torch.tensor([4, 3])
    ref = loss([hs], [ht], lengths)
    padded = loss([_garbage_pad(hs, 1, 2)], [_garbage_pad(ht, 1, 2)], lengths)
    assert _f(padded) == pytest.approx(_f(ref), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Temperature scaling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_cls", [CTCFrameKD, TokenKD])
def test_temperature_scaling_identity(loss_cls: type) -> None:
    """loss(tau * s, tau * t; temperature=tau) == tau^2 * loss(s, t; temperature=1)."""
    g = _gen(7)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    lengths = torch.tensor([3, 2])
    base = loss_cls(temperature=1.0)(s, t, lengths)
    for tau in (0.5, 2.0, 4.0):
        scaled = loss_cls(temperature=tau)(tau * s, tau * t, lengths)
        assert _f(scaled) == pytest.approx(tau**2 * _f(base), rel=1e-10)


def test_rnnt_temperature_scaling_identity() -> None:
    student, teacher, targets, t_len, u_len = _rnnt_inputs(seed=8)
    base = RNNTKD(temperature=1.0)(student, teacher, targets, t_len, u_len)
    scaled = RNNTKD(temperature=2.5)(2.5 * student, 2.5 * teacher, targets, t_len, u_len)
    assert _f(scaled) == pytest.approx(2.5**2 * _f(base), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# Gradients reach the student only
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_cls", [CTCFrameKD, TokenKD])
def test_gradients_student_only_frame_token(loss_cls: type) -> None:
    g = _gen(10)
    s = torch.randn(2, 3, 5, generator=g).requires_grad_(True)
    t = torch.randn(2, 3, 5, generator=g).requires_grad_(True)
    loss_cls()(s, t, torch.tensor([3, 2])).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_gradients_student_only_rnnt() -> None:
    student, teacher, targets, t_len, u_len = _rnnt_inputs(seed=11)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    RNNTKD(chunk_size=2, weighting="occupancy")(student, teacher, targets, t_len, u_len).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_gradients_student_and_projections_only_hidden() -> None:
    loss = HiddenStateKD([3, 3], [6, 6, 6, 6], loss="cosine")
    g = _gen(12)
    hs = [torch.randn(2, 4, 3, generator=g).requires_grad_(True) for _ in range(2)]
    ht = [torch.randn(2, 4, 6, generator=g).requires_grad_(True) for _ in range(4)]
    loss(hs, ht, torch.tensor([4, 2])).backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in hs)
    assert all(h.grad is None for h in ht)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())


# ---------------------------------------------------------------------------------------------
# RNN-T chunking, joint callables and occupancy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["uniform", "occupancy"])
@pytest.mark.parametrize("checkpoint_chunks", [True, False])
def test_rnnt_chunked_equals_unchunked(weighting: str, checkpoint_chunks: bool) -> None:
    student, teacher, targets, t_len, u_len = _rnnt_inputs(seed=13, t=7)
    n_t = student.shape[1]
    results = []
    for chunk in (1, 3, n_t):
        s = student.clone().requires_grad_(True)
        loss = RNNTKD(
            temperature=2.0,
            chunk_size=chunk,
            weighting=weighting,
            checkpoint_chunks=checkpoint_chunks,
        )
        value = loss(s, teacher, targets, t_len, u_len)
        value.backward()
        results.append((value.detach(), s.grad))
    for value, grad in results[:-1]:
        assert torch.allclose(value, results[-1][0], rtol=1e-12, atol=0)
        assert torch.allclose(grad, results[-1][1], rtol=1e-10, atol=1e-14)


def test_rnnt_forward_from_joint_matches_forward() -> None:
    g = _gen(14)
    b, n_t, u, v, d = 2, 6, 3, 7, 5
    enc = torch.randn(b, n_t, d, generator=g, dtype=torch.float64, requires_grad=True)
    pred = torch.randn(b, u + 1, d, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(d, v, generator=g, dtype=torch.float64)
    w_t = torch.randn(d, v, generator=g, dtype=torch.float64)
    targets = torch.randint(5, v, (b, u), generator=g)
    t_len, u_len = torch.tensor([6, 4]), torch.tensor([3, 1])

    def joint(w: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        return torch.tanh(enc[:, t0:t1, None, :] + pred[:, None, :, :]) @ w

    loss = RNNTKD(chunk_size=4)
    full = loss(joint(w_s, 0, n_t), joint(w_t, 0, n_t).detach(), targets, t_len, u_len)
    grads_full = torch.autograd.grad(full, (enc, pred))
    chunked = loss.forward_from_joint(
        lambda t0, t1: joint(w_s, t0, t1),
        lambda t0, t1: joint(w_t, t0, t1),
        n_t,
        targets,
        t_len,
        u_len,
    )
    grads_chunked = torch.autograd.grad(chunked, (enc, pred))
    assert torch.allclose(full, chunked, rtol=1e-12)
    for a, c in zip(grads_full, grads_chunked, strict=True):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-14)


def _brute_force_occupancy(lb: torch.Tensor, ly: torch.Tensor, n_t: int, n_u: int) -> torch.Tensor:
    """Enumerate every alignment of one utterance: (T_b - 1) blanks and U_b labels interleaved,
    then the final blank at (T_b - 1, U_b)."""
    occ = torch.zeros(lb.shape, dtype=torch.float64)
    total = 0.0
    for label_steps in itertools.combinations(range(n_t - 1 + n_u), n_u):
        t = u = 0
        prob, nodes = 1.0, []
        for step in range(n_t - 1 + n_u):
            nodes.append((t, u))
            if step in label_steps:
                prob *= math.exp(_f(ly[t, u]))
                u += 1
            else:
                prob *= math.exp(_f(lb[t, u]))
                t += 1
        nodes.append((t, u))
        prob *= math.exp(_f(lb[t, u]))
        total += prob
        for node in nodes:
            occ[node] += prob
    return occ / total


def test_rnnt_occupancy_matches_brute_force() -> None:
    _, teacher, targets, t_len, u_len = _rnnt_inputs(seed=15, b=2, t=4, u=3)
    from asrkd.losses.kd.rnnt import _next_labels, collapsed_log_probs

    next_labels, has_label = _next_labels(targets, u_len, targets.shape[1] + 1)
    dist = collapsed_log_probs(teacher, next_labels, has_label)
    gamma = rnnt_occupancy(dist[..., 0], dist[..., 1], t_len, u_len)
    for b in range(2):
        tb, ub = int(t_len[b]), int(u_len[b])
        expected = _brute_force_occupancy(dist[b, ..., 0], dist[b, ..., 1], tb, ub)
        assert torch.allclose(gamma[b], expected, atol=1e-10)
        # every alignment visits T_b + U_b nodes
        assert _f(gamma[b].sum()) == pytest.approx(tb + ub, rel=1e-10)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_rnnt_occupancy_weighting_is_weighted_mean(tau: float) -> None:
    """Nodes are weighted by the teacher's temperature-1 occupancy; KL is at temperature tau."""
    student, teacher, targets, t_len, u_len = _rnnt_inputs(seed=16)
    from asrkd.losses.kd.common import kl_from_log_probs
    from asrkd.losses.kd.rnnt import _next_labels, collapsed_log_probs

    next_labels, has_label = _next_labels(targets, u_len, targets.shape[1] + 1)
    td = collapsed_log_probs(teacher, next_labels, has_label)
    kl = kl_from_log_probs(
        collapsed_log_probs(teacher, next_labels, has_label, tau),
        collapsed_log_probs(student, next_labels, has_label, tau),
    )
    gamma = rnnt_occupancy(td[..., 0], td[..., 1], t_len, u_len)
    expected = tau**2 * (gamma * kl).sum() / gamma.sum()
    loss = RNNTKD(temperature=tau, weighting="occupancy", reduction="frame")
    assert _f(loss(student, teacher, targets, t_len, u_len)) == pytest.approx(_f(expected),
                                                                             rel=1e-10)
    # Occupancy sums to T_b + U_b per utterance, so the utterance reduction is the expected KL
    # along the teacher's alignments, summed over nodes: sum(gamma * kl) / B.
    expected = tau**2 * (gamma * kl).sum() / len(t_len)
    loss = RNNTKD(temperature=tau, weighting="occupancy")
    assert _f(loss(student, teacher, targets, t_len, u_len)) == pytest.approx(_f(expected),
                                                                             rel=1e-10)


def test_rnnt_shape_errors() -> None:
    student, teacher, targets, t_len, u_len = _rnnt_inputs()
    with pytest.raises(ValueError, match="frame count"):
        RNNTKD()(student[:, :-1], teacher, targets, t_len, u_len)
    with pytest.raises(ValueError, match="U\\+1"):
        RNNTKD()(student, teacher, targets[:, :-1], t_len, u_len)


# ---------------------------------------------------------------------------------------------
# Hidden-state KD: layer maps, widths, frame-rate check
# ---------------------------------------------------------------------------------------------


def test_default_layer_map() -> None:
    assert default_layer_map(4, 8) == [(0, 1), (1, 3), (2, 5), (3, 7)]
    assert default_layer_map(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert default_layer_map(2, 5)[-1] == (1, 4)


def test_hidden_kd_different_widths_and_depths() -> None:
    student_dims, teacher_dims = [8, 8, 12, 12], [16] * 8
    loss = HiddenStateKD(student_dims, teacher_dims)
    assert loss.layer_map == [(0, 1), (1, 3), (2, 5), (3, 7)]
    assert [(p.in_features, p.out_features) for p in loss.projections] == [
        (8, 16),
        (8, 16),
        (12, 16),
        (12, 16),
    ]
    g = _gen(17)
    hs = [torch.randn(2, 5, d, generator=g) for d in student_dims]
    ht = [torch.randn(2, 5, d, generator=g) for d in teacher_dims]
    value = loss(hs, ht, torch.tensor([5, 3]))
    value.backward()
    assert value.dim() == 0 and _f(value) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    # explicit list and dict maps
    assert HiddenStateKD([8], [16, 16], {0: 1}).layer_map == [(0, 1)]
    with pytest.raises(ValueError, match="teacher layer 9"):
        HiddenStateKD([8], [16], [(0, 9)])


def test_hidden_kd_frame_count_mismatch() -> None:
    loss = HiddenStateKD([4], [4])
    with pytest.raises(ValueError, match=r"teacher T=10 vs student T=5"):
        loss([torch.randn(1, 5, 4)], [torch.randn(1, 10, 4)], torch.tensor([5]))
    with pytest.raises(ValueError, match="widths"):
        loss([torch.randn(1, 5, 3)], [torch.randn(1, 5, 4)], torch.tensor([5]))


def test_frame_level_shape_mismatch_messages() -> None:
    with pytest.raises(ValueError, match="vocabulary size differs: teacher 6 vs student 5"):
        CTCFrameKD()(torch.randn(1, 3, 5), torch.randn(1, 3, 6), torch.tensor([3]))
    with pytest.raises(ValueError, match="frame count .* teacher 6 vs student 3"):
        CTCFrameKD()(torch.randn(1, 3, 5), torch.randn(1, 6, 5), torch.tensor([3]))


# ---------------------------------------------------------------------------------------------
# Compatibility, pseudo-label filtering, registry
# ---------------------------------------------------------------------------------------------


def test_check_kd_compatibility_messages() -> None:
    check_kd_compatibility(128, 128, 4, 4)
    check_kd_compatibility(128, 128, 4, 8, frame_level=False)
    with pytest.raises(
        ValueError, match=r"vocabulary size 256 \(teacher\) vs 128 \(student\)"
    ) as e:
        check_kd_compatibility(256, 128, 4, 4)
    assert "frame rate" not in str(e.value)
    with pytest.raises(ValueError, match=r"subsampling/frame rate 4 \(teacher\) vs 8") as e:
        check_kd_compatibility(128, 128, 4, 8)
    assert "vocabulary" not in str(e.value)
    with pytest.raises(ValueError, match="vocabulary size.*subsampling/frame rate"):
        check_kd_compatibility(256, 128, 25.0, 12.5)


def test_filter_pseudo_labels() -> None:
    scores = [-1.0, -10.0, 0.0, -2.0]  # total log-probs of the 1-best
    lengths = [4, 5, 0, 2]  # per-token: -0.25, -2.0, (empty), -1.0
    keep, share = filter_pseudo_labels(scores, lengths, min_confidence=-1.0)
    assert keep.tolist() == [True, False, False, True]
    assert share == pytest.approx(0.5)

    keep, share = filter_pseudo_labels(
        scores, lengths, min_confidence=-1.0, agreement=[1.0, 1.0, 1.0, 0.2]
    )
    assert keep.tolist() == [True, False, False, False] and share == pytest.approx(0.25)

    nbest_scores = torch.tensor([[-0.1, -0.5], [-3.0, -3.1]])  # already per-token
    keep, _ = filter_pseudo_labels(
        nbest_scores, torch.tensor([[3, 3], [3, 2]]), -1.0, scores_are_normalized=True
    )
    assert keep.tolist() == [True, False]

    agree = nbest_agreement([[[5, 6, 7], [5, 6, 7], [5, 6]], [[5]], [[5, 6], [7, 8]]])
    assert agree.tolist() == pytest.approx([(1.0 + 2 / 3) / 2, 1.0, 0.0])
    keep, share = filter_pseudo_labels([], [], -1.0)
    assert keep.numel() == 0 and share == 0.0


def test_registry_builds_and_rejects_unknown() -> None:
    assert set(KD_LOSSES) == {"ctc_kl", "token_kl", "rnnt_kl", "hidden"}
    assert isinstance(build_kd_loss("ctc_kl", temperature=3.0), CTCFrameKD)
    assert isinstance(build_kd_loss("rnnt_kl", chunk_size=4), RNNTKD)
    assert isinstance(build_kd_loss("hidden", student_dims=[4], teacher_dims=[8]), HiddenStateKD)
    with pytest.raises(ValueError, match="unknown KD loss 'ctc'") as e:
        build_kd_loss("ctc")
    for name in KD_LOSSES:
        assert name in str(e.value)


def test_half_precision_inputs_are_upcast() -> None:
    g = _gen(18)
    s = torch.randn(2, 3, 5, generator=g)
    t = torch.randn(2, 3, 5, generator=g)
    lengths = torch.tensor([3, 1])
    ref = CTCFrameKD()(s, t, lengths)
    low = CTCFrameKD()(s.bfloat16(), t.bfloat16(), lengths)
    assert low.dtype == torch.float32
    assert _f(low) == pytest.approx(_f(ref), rel=5e-2)


def test_ctc_kd_delay_compares_each_student_frame_with_an_earlier_teacher_frame() -> None:
    from asrkd.losses.kd.common import delay_frames

    x = torch.arange(10.0).view(2, 5, 1)
    assert delay_frames(x, 2)[:, :, 0].tolist() == [[0, 0, 0, 1, 2], [5, 5, 5, 6, 7]]
    assert torch.equal(delay_frames(x, 0), x)
    torch.manual_seed(0)
    teacher = torch.randn(2, 9, 6)
    student = torch.randn(2, 9, 6)
    lengths = torch.tensor([9, 6])
    # The student a teacher delayed by 3 frames is compared with: its own frames 3.. against
    # the teacher's 0.., and its first 3 against the teacher's frame 0.
    shifted = torch.cat((teacher[:, :1].expand(-1, 3, -1), teacher[:, :6]), dim=1)
    torch.testing.assert_close(CTCFrameKD(delay=3)(student, teacher, lengths),
                               CTCFrameKD()(student, shifted, lengths))
    assert CTCFrameKD(delay=3)(shifted, teacher, lengths).item() < 1e-6  # perfectly delayed
    assert CTCFrameKD()(shifted, teacher, lengths).item() > 0.1
    from asrkd.errors import ConfigError
    from asrkd.training.distillation import KDConfig

    with pytest.raises(ConfigError, match="ctc_delay must be >= 0"):
        KDConfig(ctc_delay=-1)
