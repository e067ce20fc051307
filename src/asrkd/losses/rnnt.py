"""RNN-Transducer loss in plain PyTorch (no torchaudio build exists for torch 2.13 here).

The loss is the negative log-likelihood of the target sequence summed over every monotonic
alignment in the (T, U+1) lattice (Graves, 2012). Layout and semantics follow
``torchaudio.functional.rnnt_loss`` so that either can be swapped in:

* ``logits`` (B, T, U+1, V): raw joint-network outputs (or log-probabilities when
  ``fused_log_softmax=False``).
* cell (t, u) emits blank -> (t+1, u) or label ``targets[u]`` -> (t, u+1); a path ends with the
  blank leaving (T_b-1, U_b).

How it is computed:

* Only (B, T, U+1, 2) values of the big (B, T, U+1, V) tensor enter the lattice: the blank
  and the next-target log-prob of each cell. In training the forward pass keeps the log-softmax
  of every cell (one fused kernel; a max, subtract, exp and sum written out are four passes,
  their reductions over the short V axis the slow part), and the backward pass exponentiates
  that buffer in place and turns it into the gradient: peak memory is the logits plus one
  logits-sized buffer, and no second softmax is computed. In evaluation nothing V-sized is
  kept.
* The forward variables alpha are computed one anti-diagonal (t + u = n) at a time: every cell
  of a diagonal depends only on the previous one, so the lattice takes T + U steps of two
  small vectorised operations, in float32 (nothing cancels).
* The backward variables beta are the forward variables of the per-utterance reversed lattice,
  computed in the same batched recursion as alpha (2B rows, one Python loop). The gradient is
  analytic (no autograd graph through the loop): the occupancy of each edge is
  exp(alpha + edge + beta - log P), and d(-log P)/d logit = softmax x cell occupancy minus
  the blank and label edge occupancies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["rnnt_joint_loss", "rnnt_loss"]

# Floor for log-probabilities entering the lattice recursion. A log-prob of -inf (a masked
# logit) could make log P itself -inf, and the occupancies exp(... - log P) would be
# -inf - -inf = nan; exp(-1e4) is already zero.
_LOG_PROB_FLOOR = -1.0e4
# Elements of logits log-softmaxed per chunk of utterances in the forward pass: small on CPU
# (1 MiB of float32, reused by the allocator), large on accelerators where each chunk costs
# kernel launches.
_CHUNK_ELEMENTS_CPU = 1 << 18
_CHUNK_ELEMENTS_ACCEL = 1 << 26
# Lattice cells per block of :func:`rnnt_joint_loss` (each cell: J hidden and V logit values).
_BLOCK_CELLS_CPU = 1 << 12
_BLOCK_CELLS_ACCEL = 1 << 18


def _skew(x: Tensor, fill: float) -> Tensor:
    """Lattice tensor in anti-diagonal layout: y[r, n, u] = x[r, n - u, u] (fill off the lattice).

    Args:
        x: (R, T, U+1).
        fill: value of the cells with n - u outside [0, T).

    Returns:
        (R, T + U, U+1): row n holds the cells with t + u = n.
    """
    rows, frames, cols = x.shape
    n = torch.arange(frames + cols - 1, device=x.device).view(-1, 1)
    t = n - torch.arange(cols, device=x.device).view(1, -1)
    inside = (t >= 0) & (t < frames)
    y = x.gather(1, t.clamp(0, frames - 1).expand(rows, -1, -1))
    return y.masked_fill(~inside, fill)


def _unskew(y: Tensor, frames: int) -> Tensor:
    """Inverse of :func:`_skew`: x[r, t, u] = y[r, t + u, u]; (R, T + U, U+1) -> (R, T, U+1)."""
    rows, _, cols = y.shape
    n = torch.arange(frames, device=y.device).view(-1, 1) + torch.arange(cols, device=y.device)
    return y.gather(1, n.expand(rows, -1, -1))


def _forward_variables(blank_lp: Tensor, label_lp: Tensor) -> Tensor:
    """Forward variables of the (T, U+1) lattice, one anti-diagonal at a time.

    alpha[0, 0] = 0 and
    alpha[t, u] = logaddexp(alpha[t-1, u] + blank_lp[t-1, u], alpha[t, u-1] + label_lp[t, u-1]).

    Every cell of the anti-diagonal t + u = n depends only on diagonal n - 1, so the lattice
    takes T + U steps of two small vectorised operations each (one add and a logaddexp),
    with no cumulative sums: nothing cancels, and the recursion is exact in float32. (A
    row-by-row scan needs only min(T, U+1) steps, but each is a sequential ``logcumsumexp``
    along the other side, ~30 ns per element on CPU, and its closed form needs float64.)

    Args:
        blank_lp: (R, T, U+1) log-weight of the move (t, u) -> (t+1, u).
        label_lp: (R, T, U+1) log-weight of the move (t, u) -> (t, u+1) (last column unused).

    Returns:
        (R, T, U+1) forward variables.
    """
    rows, frames, cols = blank_lp.shape
    neg_inf = float("-inf")
    blank_sk = _skew(blank_lp, neg_inf)
    # Column u of label_in holds the weight of the move into column u: label_lp[.., u-1].
    label_in = torch.nn.functional.pad(_skew(label_lp, neg_inf)[..., :-1], (1, 0), value=neg_inf)
    diagonals = blank_sk.size(1)
    # Column 0 of ``diag`` is a -inf border, so that "the cell to the left" is a plain slice.
    diag = blank_lp.new_full((rows, diagonals, cols + 1), neg_inf)
    diag[:, 0, 1] = 0.0
    # Both moves into a diagonal in one add: ``windows[n][:, 0]`` is the cell left of each
    # column on diagonal n and ``windows[n][:, 1]`` the cell itself (two overlapping views of
    # one row of ``diag``), and ``moves`` holds their edge weights in the same order.
    windows = diag.as_strided(
        (rows, diagonals, 2, cols), (diag.stride(0), diag.stride(1), 1, 1)
    ).unbind(1)
    moves = torch.stack([label_in, blank_sk], dim=2).unbind(1)
    cells = diag[..., 1:].unbind(1)  # diagonal n, columns 0..U
    both = blank_lp.new_empty(rows, 2, cols)
    move, stay = both.unbind(1)
    # Every per-diagonal view is made up front, so the loop body is two kernels alone
    # (slicing inside the loop cost as much as the arithmetic).
    for n in range(1, diagonals):
        torch.add(windows[n - 1], moves[n - 1], out=both)
        torch.logaddexp(stay, move, out=cells[n])
    return _unskew(diag[..., 1:], frames)


def _flip(x: Tensor, t_last: Tensor, u_last: Tensor) -> Tensor:
    """Per-utterance reversal of a lattice tensor: y[b, i, j] = x[b, t_last[b]-i, u_last[b]-j].

    Indices that fall outside the tensor are clamped; those cells are outside the utterance's
    valid lattice and the callers never read them.

    Args:
        x: (B, T, U+1).
        t_last: (B,) time index that becomes row 0.
        u_last: (B,) label index that becomes column 0.

    Returns:
        (B, T, U+1).
    """
    batch, frames, cols = x.shape
    t_idx = (t_last.unsqueeze(1) - torch.arange(frames, device=x.device)).clamp(0, frames - 1)
    u_idx = (u_last.unsqueeze(1) - torch.arange(cols, device=x.device)).clamp(0, cols - 1)
    y = x.gather(1, t_idx.unsqueeze(2).expand(batch, frames, cols))
    return y.gather(2, u_idx.unsqueeze(1).expand(batch, frames, cols))


def _batch_chunks(logits: Tensor) -> list[slice]:
    """Split the batch of a (B, T, U+1, V) tensor into chunks of about a fixed element count."""
    budget = _CHUNK_ELEMENTS_CPU if logits.device.type == "cpu" else _CHUNK_ELEMENTS_ACCEL
    per_utt = max(1, logits[0].numel()) if logits.size(0) else 1
    step = max(1, budget // per_utt)
    return [slice(i, i + step) for i in range(0, logits.size(0), step)]


def _edge_index(targets: Tensor, target_lengths: Tensor, blank: int) -> Tensor:
    """Vocabulary index of the two edges leaving every lattice column.

    Args:
        targets: (B, U) int target ids, arbitrary padding.
        target_lengths: (B,) valid labels per utterance.
        blank: blank id.

    Returns:
        (B, 1, U+1, 2) int64: [..., 0] = blank, [..., 1] = targets[u] for u < U_b. Padding and
        the last column point at blank so that gathers and scatters stay in range; those cells
        are masked or get zero occupancy.
    """
    batch, labels = targets.shape
    positions = torch.arange(labels, device=targets.device).unsqueeze(0)
    label_ids = torch.where(positions < target_lengths.unsqueeze(1), targets.long(), blank)
    label_ids = torch.nn.functional.pad(label_ids, (0, 1), value=blank)
    blank_ids = torch.full_like(label_ids, blank)
    return torch.stack([blank_ids, label_ids], dim=2).unsqueeze(1)


def _lattice(edges: Tensor, t_len: Tensor, u_len: Tensor,
             need_occupancy: bool) -> tuple[Tensor, Tensor | None]:
    """Log-likelihood of every utterance's lattice and, if asked, its edge occupancies.

    Args:
        edges: (B, T, U+1, 2) log-probabilities of the two edges leaving each cell: [..., 0]
            blank (to (t+1, u)), [..., 1] the next label (to (t, u+1)); float32 or float64.
        t_len: (B,) int64 valid frames; u_len: (B,) int64 valid labels.
        need_occupancy: also return the occupancies (the gradient of -log P w.r.t. ``edges``
            is minus them).

    Returns:
        log P (B,), and (B, T, U+1, 2) occupancies (posterior probability that the alignment
        uses each edge; 0 outside each utterance's lattice) or None.
    """
    batch, frames, cols, _ = edges.shape
    device = edges.device
    edges = edges.clamp_min(_LOG_PROB_FLOOR)
    # Cells outside an utterance's lattice get weight 0 (not padding garbage, never nan) so
    # the recursion stays finite there; nothing valid depends on them.
    t_pos = torch.arange(frames, device=device).view(1, frames, 1)
    u_pos = torch.arange(cols, device=device).view(1, 1, cols)
    valid = (t_pos < t_len.view(-1, 1, 1)) & (u_pos <= u_len.view(-1, 1, 1))
    edges = edges.masked_fill(~valid.unsqueeze(3), 0.0)
    blank_lp, label_lp = edges[..., 0], edges[..., 1]

    b_idx = torch.arange(batch, device=device)
    t_end = t_len - 1
    final_blank = blank_lp[b_idx, t_end, u_len]
    if not need_occupancy:
        # alpha alone gives the loss; skip beta and the occupancies.
        alpha = _forward_variables(blank_lp, label_lp)
        return alpha[b_idx, t_end, u_len] + final_blank, None

    # beta(t, u) = log-prob of finishing from (t, u) = alpha of the per-utterance reversed
    # lattice. In reversed coordinates (i, j) = (T_b-1-t, U_b-u) the move into (i, j) carries
    # the weight of the edge leaving (t, u), hence the index shift by one before flipping.
    # alpha and beta share one batched recursion (2B rows), halving the Python loop count.
    rev_down = _flip(blank_lp, t_len - 2, u_len)
    rev_right = _flip(label_lp, t_len - 1, u_len - 1)
    both = _forward_variables(torch.cat([blank_lp, rev_down]), torch.cat([label_lp, rev_right]))
    alpha, beta_rev = both[:batch], both[batch:]
    log_like = alpha[b_idx, t_end, u_len] + final_blank
    beta = _flip(beta_rev, t_end, u_len) + final_blank.view(-1, 1, 1)

    neg_inf = float("-inf")
    alpha = alpha.masked_fill(~valid, neg_inf)
    beta = beta.masked_fill(~valid, neg_inf)
    # Log-prob of finishing after each edge: beta(t+1, u) after blank (0 after the final
    # blank out of (T_b-1, U_b)), beta(t, u+1) after a label.
    after = torch.full((batch, frames, cols, 2), neg_inf, dtype=beta.dtype, device=device)
    after[:, :-1, :, 0] = beta[:, 1:]
    after[b_idx, t_end, u_len, 0] = 0.0
    after[:, :, :-1, 1] = beta[:, :, 1:]
    occupancy = torch.exp(alpha.unsqueeze(3) - log_like.view(-1, 1, 1, 1) + edges + after)
    return log_like, occupancy


class _RNNTLoss(torch.autograd.Function):
    """Per-utterance RNN-T costs with an analytic gradient (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: Tensor,
        targets: Tensor,
        logit_lengths: Tensor,
        target_lengths: Tensor,
        blank: int,
        clamp: float,
        fused_log_softmax: bool,
        need_grad: bool,
    ) -> Tensor:
        batch, frames, cols, _ = logits.shape
        device = logits.device
        t_len = logit_lengths.to(device=device, dtype=torch.long)
        u_len = target_lengths.to(device=device, dtype=torch.long)
        work_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32

        # Only (B, T, U+1, 2) values of the big tensor are needed: the blank and the next target
        # label of every cell, taken with a single gather.
        edge_index = _edge_index(targets, u_len, blank)
        index = edge_index.expand(batch, frames, cols, 2)
        log_probs = None
        if not fused_log_softmax:
            edges = logits.gather(3, index).to(work_dtype)
        elif need_grad:
            # Training: keep the log-softmax of every cell, as the backward pass needs the
            # softmax and this buffer becomes the gradient in place (peak memory: the logits
            # plus one logits-sized buffer, as for any loss; no softmax is recomputed).
            log_probs = torch.log_softmax(logits, dim=3, dtype=work_dtype)
            edges = log_probs.gather(3, index)
        else:
            # Evaluation: nothing V-sized is kept; one fused log_softmax kernel per chunk (each
            # chunk's temporary is small enough to be reused by the allocator).
            edges = torch.cat(
                [
                    torch.log_softmax(logits[part], dim=3, dtype=work_dtype).gather(3, index[part])
                    for part in _batch_chunks(logits)
                ]
            )
        log_like, occupancy = _lattice(edges, t_len, u_len, need_grad)
        if occupancy is None:
            return (-log_like).to(logits.dtype)
        ctx.save_for_backward(edge_index, occupancy, logits)
        # The log-softmax buffer is not a saved tensor: the first backward consumes it (it becomes
        # the gradient), so it is held on ctx and dropped there.
        ctx.log_probs = log_probs
        ctx.clamp = clamp
        ctx.fused = fused_log_softmax
        return (-log_like).to(logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_costs: Tensor):  # type: ignore[override]
        edge_index, occupancy, logits = ctx.saved_tensors
        batch, frames, cols, _ = logits.shape
        scale = grad_costs.to(occupancy.dtype).view(batch, 1, 1, 1)
        if ctx.clamp <= 0:
            # Fold the chain rule into the small tensor instead of a full-size multiply.
            occupancy = occupancy * scale
        # d(-log P)/d logit_k = softmax_k * occupancy(cell) - occ_blank [k = blank]
        #                       - occ_label [k = target].
        if ctx.log_probs is not None:
            grad = ctx.log_probs.exp_().mul_(occupancy.sum(dim=3).unsqueeze(3))
            ctx.log_probs = None
        elif ctx.fused:
            # A second backward through the same graph (retain_graph=True, gradcheck): the
            # buffer became the first gradient, so recompute it (the same kernels, so both
            # backward passes give identical values).
            grad = torch.log_softmax(logits, dim=3, dtype=occupancy.dtype).exp_()
            grad.mul_(occupancy.sum(dim=3).unsqueeze(3))
        else:
            # Log-probabilities came in (fused_log_softmax=False): only the two edges per cell.
            grad = torch.zeros(logits.shape, dtype=occupancy.dtype, device=logits.device)
        grad.scatter_add_(3, edge_index.expand(batch, frames, cols, 2), occupancy.neg())
        if ctx.clamp > 0:
            grad.clamp_(-ctx.clamp, ctx.clamp)
            grad.mul_(scale)
        return grad.to(logits.dtype), None, None, None, None, None, None, None


def _check_length_ranges(logit_lengths: Tensor, target_lengths: Tensor, frames: int,
                         cols: int) -> None:
    """Every utterance has 1..T frames and 0..U labels (a lattice of T x (U+1) cells)."""
    bad_t = (logit_lengths < 1) | (logit_lengths > frames)
    bad_u = (target_lengths < 0) | (target_lengths > cols - 1)
    if bool((bad_t | bad_u).any()):
        raise ValueError(
            f"lengths out of range: logit_lengths must be in [1, {frames}] and "
            f"target_lengths in [0, {cols - 1}]"
        )


def _reduce(costs: Tensor, reduction: str) -> Tensor:
    """(B,) costs reduced as ``reduction`` says ("mean", "sum" or "none")."""
    if reduction == "mean":
        return costs.mean()
    if reduction == "sum":
        return costs.sum()
    return costs


def rnnt_loss(
    logits: Tensor,
    targets: Tensor,
    logit_lengths: Tensor,
    target_lengths: Tensor,
    blank: int = 0,
    reduction: str = "mean",
    clamp: float = -1.0,
    fused_log_softmax: bool = True,
) -> Tensor:
    """RNN-Transducer loss: negative log-likelihood of each target over all alignments.

    Args:
        logits: (B, T, U+1, V) joint-network outputs (float16/bfloat16/float32/float64);
            log-probabilities instead when ``fused_log_softmax`` is False.
        targets: (B, U) int target ids, padded with anything beyond ``target_lengths``.
        logit_lengths: (B,) int valid frames per utterance, 1 <= T_b <= T.
        target_lengths: (B,) int valid labels per utterance, 0 <= U_b <= U.
        blank: blank id.
        reduction: "mean" (average over the batch), "sum" or "none" ((B,) costs).
        clamp: if > 0, clamp each utterance's gradient w.r.t. ``logits`` to [-clamp, clamp].
        fused_log_softmax: apply log-softmax over V inside the loss (memory-lean); set False to
            pass log-probabilities.

    Returns:
        Scalar loss, or (B,) per-utterance costs for ``reduction="none"``, in ``logits.dtype``.
    """
    if logits.dim() != 4 or targets.dim() != 2:
        raise ValueError(
            f"expected logits (B, T, U+1, V) and targets (B, U), got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    batch, frames, cols, vocab = logits.shape
    if targets.size(0) != batch or targets.size(1) != cols - 1:
        raise ValueError(
            f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)} "
            "(need targets.shape == (B, U) for logits (B, T, U+1, V))"
        )
    if logit_lengths.shape != (batch,) or target_lengths.shape != (batch,):
        raise ValueError("logit_lengths and target_lengths must have shape (B,)")
    if not 0 <= blank < vocab:
        raise ValueError(f"blank={blank} outside vocabulary of size {vocab}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    if batch == 0:
        costs = logits.new_zeros(0)
    else:
        _check_length_ranges(logit_lengths, target_lengths, frames, cols)
        # Inside Function.forward grad mode is always off, so decide here whether the
        # backward-only work (beta, occupancies) is needed.
        need_grad = torch.is_grad_enabled() and logits.requires_grad
        costs = _RNNTLoss.apply(
            logits,
            targets,
            logit_lengths,
            target_lengths,
            blank,
            float(clamp),
            fused_log_softmax,
            need_grad,
        )
    return _reduce(costs, reduction)


class _LatticeNLL(torch.autograd.Function):
    """-log P of each utterance from its (B, T, U+1, 2) edge log-probabilities; the gradient
    w.r.t. the edges is minus their occupancies (exact, no graph through the recursion)."""

    @staticmethod
    def forward(ctx, edges: Tensor, t_len: Tensor, u_len: Tensor) -> Tensor:  # type: ignore[override]
        log_like, occupancy = _lattice(edges, t_len, u_len, True)
        ctx.save_for_backward(occupancy)
        return -log_like

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_costs: Tensor):  # type: ignore[override]
        (occupancy,) = ctx.saved_tensors
        grad = occupancy.mul(grad_costs.to(occupancy.dtype).view(-1, 1, 1, 1)).neg_()
        return grad, None, None


def _joint_edges(combine: Callable[[Tensor, Tensor], Tensor], encoder_proj: Tensor,
                 pred_proj: Tensor, index: Tensor, work_dtype: torch.dtype) -> Tensor:
    """Blank and next-label log-probabilities of one block of lattice cells."""
    logits = combine(encoder_proj.unsqueeze(2), pred_proj.unsqueeze(1))
    return torch.log_softmax(logits, dim=3, dtype=work_dtype).gather(3, index)


def _lattice_blocks(batch: int, frames: int, cols: int, budget: int
                    ) -> list[tuple[slice, slice]]:
    """(utterances, frames) blocks of a (B, T, U+1) lattice with about ``budget`` cells
    each: whole utterances together while they fit, else frame ranges of one utterance."""
    per_utt = frames * cols
    if per_utt <= budget:
        step = max(1, budget // per_utt)
        return [(slice(b, b + step), slice(0, frames)) for b in range(0, batch, step)]
    span = max(1, budget // cols)
    return [(slice(b, b + 1), slice(t, t + span))
            for b in range(batch) for t in range(0, frames, span)]


def rnnt_joint_loss(
    combine: Callable[[Tensor, Tensor], Tensor],
    encoder_proj: Tensor,
    pred_proj: Tensor,
    targets: Tensor,
    logit_lengths: Tensor,
    target_lengths: Tensor,
    blank: int = 0,
    reduction: str = "mean",
    block_cells: int | None = None,
) -> Tensor:
    """RNN-T loss with the joint network fused in: the (B, T, U+1, V) logits never exist whole.

    The joint is evaluated block by block (a few utterances, or a frame range of one), and
    only the blank and next-label log-probabilities of each cell, (B, T, U+1, 2), are kept.
    In training each block is checkpointed (:func:`torch.utils.checkpoint.checkpoint`): the
    backward pass recomputes one block's joint at a time and back-propagates the lattice
    gradient through it, so peak memory holds one block's activations and logits instead of
    the whole lattice's hidden layer, logits, log-softmax and gradient (the role of NeMo's
    fused joint batches and of k2's pruned loss). The price is a second joint forward pass.
    Same value and gradients as ``rnnt_loss(combine(enc[:, :, None], pred[:, None]), ...)``
    (dropout in ``combine`` replays the same mask: checkpoint restores the RNG state).

    Args:
        combine: (B', T', 1, J) and (B', 1, U+1, J) -> (B', T', U+1, V) logits, e.g.
            :meth:`asrkd.models.rnnt.JointNetwork.combine`.
        encoder_proj: (B, T, J) projected encoder states.
        pred_proj: (B, U+1, J) projected prediction-network states.
        targets, logit_lengths, target_lengths, blank, reduction: as :func:`rnnt_loss`.
        block_cells: lattice cells per block (each holds J hidden and V logit values; default
            4096 on CPU, 2**18 elsewhere).

    Returns:
        Scalar loss, or (B,) per-utterance costs for ``reduction="none"``, in float32
        (float64 for float64 inputs).
    """
    if encoder_proj.dim() != 3 or pred_proj.dim() != 3 or targets.dim() != 2:
        raise ValueError(
            f"expected encoder_proj (B, T, J), pred_proj (B, U+1, J) and targets (B, U), got "
            f"{tuple(encoder_proj.shape)}, {tuple(pred_proj.shape)} and {tuple(targets.shape)}"
        )
    batch, frames, _ = encoder_proj.shape
    cols = pred_proj.size(1)
    if pred_proj.size(0) != batch or targets.shape != (batch, cols - 1):
        raise ValueError(
            f"shapes disagree: encoder_proj {tuple(encoder_proj.shape)}, pred_proj "
            f"{tuple(pred_proj.shape)}, targets {tuple(targets.shape)} (need targets (B, U) "
            "for pred_proj (B, U+1, J))"
        )
    if logit_lengths.shape != (batch,) or target_lengths.shape != (batch,):
        raise ValueError("logit_lengths and target_lengths must have shape (B,)")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    work_dtype = torch.float64 if encoder_proj.dtype == torch.float64 else torch.float32
    if batch == 0:
        costs = encoder_proj.new_zeros(0, dtype=work_dtype)
    else:
        _check_length_ranges(logit_lengths, target_lengths, frames, cols)
        device = encoder_proj.device
        t_len = logit_lengths.to(device=device, dtype=torch.long)
        u_len = target_lengths.to(device=device, dtype=torch.long)
        index = _edge_index(targets, u_len, blank)  # (B, 1, U+1, 2)
        need_grad = torch.is_grad_enabled() and (encoder_proj.requires_grad
                                                 or pred_proj.requires_grad)
        if block_cells is None:
            block_cells = _BLOCK_CELLS_CPU if device.type == "cpu" else _BLOCK_CELLS_ACCEL
        blocks = _lattice_blocks(batch, frames, cols, block_cells)
        rows = []
        for utts, span in blocks:
            enc, pred = encoder_proj[utts, span], pred_proj[utts]
            block_index = index[utts].expand(enc.size(0), enc.size(1), cols, 2)
            if need_grad:
                rows.append(torch.utils.checkpoint.checkpoint(
                    _joint_edges, combine, enc, pred, block_index, work_dtype,
                    use_reentrant=False))
            else:
                rows.append(_joint_edges(combine, enc, pred, block_index, work_dtype))
        # Reassemble (B, T, U+1, 2): groups of whole utterances, or each utterance's frames.
        if blocks[0][1] == slice(0, frames):
            edges = torch.cat(rows)
        else:
            per_utt = len(rows) // batch
            edges = torch.cat([torch.cat(rows[b * per_utt:(b + 1) * per_utt], dim=1)
                               for b in range(batch)])
        if need_grad:
            costs = _LatticeNLL.apply(edges, t_len, u_len)
        else:
            costs = -_lattice(edges, t_len, u_len, False)[0]
    return _reduce(costs, reduction)
