"""V:N:M channel permutation (paper section 4.2; docs/design.md, "Channel permutation").

Find an input permutation P_i (columns) and an output permutation P_o (rows) of
a score matrix S so that S_{V:N:M}(P_o S P_i) keeps more importance than
S_{V:N:M}(S). The mask itself is always stored in original coordinates, so a
permutation only changes *which* weights are kept, never what the model
computes with them.

Algorithm (alternating assignment, every step a scipy linear sum assignment):

1. Start from the identity; it is also what is returned when nothing helps.
2. Input step (P_o fixed): the columns sit in groups of M slots. For each slot
   position p = 0..M-1, take the channel in slot p out of every group and
   re-seat these channels, one per group, by an LSA. With the other M-1
   members of a group fixed, the importance the group keeps with channel j is
   computed exactly under S_{V:N:M}: per V-row block, j enters the 4 kept
   columns when its column norm beats the 4th best of the others (t4), and
   then each row keeps the top n of its 3 remaining values plus
   max(0, S[r, j] - the n-th of them). So each LSA maximises the true kept
   importance over one channel per group, everyone else fixed (leaving all in
   place is one of its solutions).
3. Output step (P_i fixed): the same with rows and V-row blocks: for slot
   position q = 0..V-1, the row in slot q leaves every block and the rows are
   re-seated by an LSA whose gain is what a row keeps (top n per group) on the
   4 columns per group that the block's other rows choose; for very large
   layers this gain is linearised to a matrix product (the row's scores on
   those columns).
4. After every step the true kept importance (``vnm_mask``) is evaluated; the
   step is kept only if it gains more than a relative 1e-5 (otherwise it is
   undone), and the search stops early when a round changes nothing. Hence
   the result never keeps less than the unpermuted matrix.

Approximations, and why: an LSA of all C channels against C group slots would
be 11008 x 11008 for an MLP layer and its cost depends on the other members of
each group, so it is not linear. Taking one member out of each group makes the
G x G problem exact (G = C / M), at the price of moving one channel per group
per position (M positions per round let every channel move). Cost per
position is G x G x rows (the per-row hinge sums); above ``_INPUT_BUDGET`` the
groups are split into random chunks of K groups, redrawn at every position,
and a channel moves only within its chunk (K = 29 for 4096 x 11008 at M = 5;
MiniLM's layers are solved whole). The output step ignores that the incoming
row may change its block's column choice (it is credited with the old one).

Cost: 4096 x 11008, 2 rounds, about a minute on 2 CPU cores (64:2:5 and 64:2:8;
benchmarks/bench_sparsify.py permutation).

Layers that read the same tensor share P_i: ``find_shared_permutation`` runs
the input step on all of them stacked (each layer's scores divided by its
total importance, its rows padded to whole V-row blocks) and the output step
per layer; a shared step is kept only if no layer loses.

Constrained input search (joint attention permutations, sparsify_): ``in_segments`` keeps every column inside
its segment (a head: the LSA forbids moves across segments, and the groups of one LSA chunk are drawn from
one segment where possible); ``in_ties`` searches one permutation of base columns repeated over tied copies
(grouped-query attention: the n_rep query heads reading one kv head take that kv head's permutation). The
tied input step runs on the copies stacked as extra rows (exact when the head size is a multiple of M;
otherwise an M-group straddling two heads is scored as if its neighbours were those of the stacked copy),
and every step is accepted on the true kept importance of the real matrix.

References: Zhao et al., "Beyond 2:4: exploring V:N:M sparsity for efficient
transformer inference on GPUs", arXiv 2410.16135, section 4.2; Zhang et al.,
"Plug-and-Play: an efficient post-training pruning method for LLMs" (ICLR
2024) for channel reallocation by linear sum assignment.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..masks import block_rows, check_permutation, vnm_mask
from ..pattern import KEPT_COLUMNS, VNMPattern, as_pattern

__all__ = ["find_permutation", "find_shared_permutation", "kept_importance"]

logger = logging.getLogger(__name__)

# A step (or the final result) counts as better only above this relative
# margin, well above float32 summation noise of the kept importance, so that
# ``(p * vnm_mask(p)).sum() >= unpermuted`` also holds when summed in float32.
_REL_TOL = 1e-5
# Elements per chunk of the cost-matrix computations: bounds peak memory and keeps each chunk in
# the CPU's L2/L3 cache (the hinge sums are memory-bound).
_CHUNK = 1 << 22
# Element operations of one input-step position (chunks x groups x rows); sets the LSA chunk size.
_INPUT_BUDGET = 1 << 28
_MIN_LSA_GROUPS = 16
# Output step: above this many elements per position (blocks^2 x groups x M) the row gain is
# linearised (one matrix product) instead of taking each row's top n per group exactly.
_OUTPUT_BUDGET = 1 << 25


def kept_importance(
    scores: Tensor, pattern: VNMPattern | str, in_perm: Tensor | None = None, out_perm: Tensor | None = None
) -> float:
    """Importance kept by S_{V:N:M} of ``scores[out_perm][:, in_perm]`` (float64 sum)."""
    p = _permuted(scores.float(), in_perm, out_perm)
    return float((p * vnm_mask(p, pattern)).sum(dtype=torch.float64))


def find_permutation(scores: Tensor, pattern: VNMPattern | str, rounds: int = 2) -> tuple[Tensor, Tensor]:
    """Input and output permutations under which S_{V:N:M} keeps more importance.

    Args:
        scores: (out, in) non-negative importance scores.
        pattern: the V:N:M pattern (N:4 patterns return identities: every
            column of a group is kept there, nothing to choose).
        rounds: alternating (input step, output step) rounds.
    Returns:
        ``(in_perm, out_perm)`` int64 on ``scores.device``: ``p = scores[out_perm][:, in_perm]``
        keeps at least as much importance as ``scores`` under ``vnm_mask``.
    """
    in_perm, out_perms = find_shared_permutation([scores], pattern, rounds)
    return in_perm, out_perms[0]


def find_shared_permutation(
    scores: Sequence[Tensor],
    pattern: VNMPattern | str,
    rounds: int = 2,
    *,
    fixed_out: dict[int, Tensor] | None = None,
    in_segments: Tensor | None = None,
    in_ties: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """One input permutation shared by layers that read the same tensor, one output permutation each.

    The shared step maximises the sum over layers of the importance fraction
    kept; it is accepted only when no layer loses, so every layer keeps at
    least what it keeps unpermuted.

    Args:
        scores: (out_i, in) score matrices with the same number of columns.
        pattern: the V:N:M pattern.
        rounds: alternating rounds.
        fixed_out: layer index -> an output permutation that layer must keep (not searched): the rows of a
            layer whose output feeds the next linear through element-wise ops only (gate/up -> down_proj)
            are ordered as that linear's input permutation (joint permutations, sparsify_).
        in_segments: (in,) int64 segment id per column (per base column with ``in_ties``): the input
            permutation maps every column to a column of the same segment (``segments[in_perm] == segments``;
            one permutation per attention head).
        in_ties: (copies, base) int64 column ids, every column once: column ``in_ties[r, k]`` is copy r of base
            column k, and the input permutation is one permutation ``b`` of the base columns applied to every
            copy: ``in_perm[in_ties[r, k]] == in_ties[r, b[k]]`` (grouped-query attention: o_proj's input
            columns of the query heads that read one kv head).
    Returns:
        ``(in_perm, [out_perm_i])``, int64 tensors on the scores' device.
    """
    p = as_pattern(pattern)
    mats = _check_scores(scores)
    if not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    device = mats[0].device
    cols = mats[0].shape[1]
    in_perm = torch.arange(cols, device=device)
    out_perms = [torch.arange(s.shape[0], device=device) for s in mats]
    fixed_out = dict(fixed_out or {})
    for i, perm in fixed_out.items():
        if not 0 <= i < len(mats):
            raise ValueError(f"fixed_out names layer {i}, but there are {len(mats)} score matrices")
        checked = check_permutation(perm, mats[i].shape[0], f"fixed_out[{i}]")
        out_perms[i] = checked.to(device) if checked is not None else out_perms[i]
    ties, segments = _check_constraints(in_ties, in_segments, cols, device)
    if p.is_nm or rounds == 0:
        return in_perm, out_perms
    base_perm = torch.arange(cols if ties is None else ties.shape[1], device=device)

    # Kept importance as a fraction of each layer's total (layers of a group weigh the same).
    totals = [max(float(s.sum(dtype=torch.float64)), 1e-30) for s in mats]
    base = [kept_importance(s, p) / t for s, t in zip(mats, totals, strict=True)]
    kept = [kept_importance(s, p, None, o) / t for s, o, t in zip(mats, out_perms, totals, strict=True)]
    for r in range(rounds):
        changed = False
        # 1. Input step, shared by all layers: kept only if no layer loses and the total gains.
        if ties is None:
            cand_base = _input_step(mats, p, base_perm, out_perms, seed=r, segments=segments)
        else:  # the tied copies stacked as rows of one matrix of base columns
            copies = [s[:, t] for s in mats for t in ties]
            copy_outs = [o for o in out_perms for _ in ties]
            cand_base = _input_step(copies, p, base_perm, copy_outs, seed=r, segments=segments)
        cand_in = _expand_ties(cand_base, ties)
        cand_kept = [kept_importance(s, p, cand_in, o) / t for s, o, t in zip(mats, out_perms, totals, strict=True)]
        if _better(cand_kept, kept):
            in_perm, base_perm, kept, changed = cand_in, cand_base, cand_kept, True
        # 2. Output step, per layer: each layer's rows are independent of the others.
        for i, s in enumerate(mats):
            if i in fixed_out:
                continue
            cand_out = _output_step(s, p, in_perm, out_perms[i])
            k = kept_importance(s, p, in_perm, cand_out) / totals[i]
            if k > kept[i] * (1 + _REL_TOL):
                out_perms[i], kept[i], changed = cand_out, k, True
        logger.debug("permutation round %d: kept %s (unpermuted %s)", r, kept, base)
        if not changed:
            break
    return in_perm, out_perms


# ---------------------------------------------------------------------------
# helpers


def _check_scores(scores: Sequence[Tensor]) -> list[Tensor]:
    if isinstance(scores, Tensor):
        raise TypeError("find_shared_permutation takes a list of score matrices; use find_permutation for one")
    mats = []
    for i, s in enumerate(scores):
        if not isinstance(s, Tensor) or s.dim() != 2:
            raise ValueError(f"scores[{i}] must be a 2-D tensor (out, in), got {getattr(s, 'shape', type(s))}")
        s = s.detach().float()
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"scores[{i}] contains NaN or Inf")
        if bool((s < 0).any()):
            raise ValueError(f"scores[{i}] has negative entries; importance scores must be >= 0")
        mats.append(s)
    if not mats:
        raise ValueError("scores is empty")
    if len({s.shape[1] for s in mats}) != 1 or len({s.device for s in mats}) != 1:
        raise ValueError(
            f"layers sharing an input permutation need the same in_features and device, got "
            f"{[tuple(s.shape) for s in mats]}"
        )
    return mats


def _check_constraints(
    ties: Tensor | None, segments: Tensor | None, cols: int, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """in_ties and in_segments checked and moved to ``device`` (find_shared_permutation)."""
    base = cols
    if ties is not None:
        ties = torch.as_tensor(ties, dtype=torch.int64).to(device)
        if ties.dim() != 2 or ties.numel() != cols:
            raise ValueError(
                f"in_ties must be (copies, base) column ids covering {cols} columns, got {tuple(ties.shape)}"
            )
        if not torch.equal(ties.flatten().sort().values, torch.arange(cols, device=device)):
            raise ValueError("in_ties must hold every column id exactly once")
        base = ties.shape[1]
    if segments is not None:
        segments = torch.as_tensor(segments, dtype=torch.int64).to(device)
        if segments.shape != (base,):
            raise ValueError(f"in_segments must have one id per {'base ' if ties is not None else ''}column "
                             f"({base}), got {tuple(segments.shape)}")  # fmt: skip
    return ties, segments


def _expand_ties(base: Tensor, ties: Tensor | None) -> Tensor:
    """The input permutation of the real columns from the permutation ``base`` of the tied base columns."""
    if ties is None:
        return base
    real = torch.empty(ties.numel(), dtype=torch.int64, device=base.device)
    real[ties.flatten()] = ties[:, base].flatten()
    return real


def _permuted(s: Tensor, in_perm: Tensor | None, out_perm: Tensor | None) -> Tensor:
    out_perm = check_permutation(out_perm, s.shape[0], "out_perm")
    in_perm = check_permutation(in_perm, s.shape[1], "in_perm")
    if out_perm is not None:
        s = s[out_perm]
    if in_perm is not None:
        s = s[:, in_perm]
    return s


def _pad_to(s: Tensor, rows: int, cols: int) -> Tensor:
    r, c = s.shape
    rp, cp = -(-r // rows) * rows, -(-c // cols) * cols
    if (rp, cp) == (r, c):
        return s
    out = s.new_zeros(rp, cp)
    out[:r, :c] = s
    return out


def _better(new: list[float], old: list[float]) -> bool:
    no_loss = all(n >= o for n, o in zip(new, old, strict=True))
    return no_loss and sum(new) > sum(old) * (1 + _REL_TOL)


def _stacked_rows(mats: list[Tensor], p: VNMPattern, out_perms: list[Tensor]) -> Tensor:
    """Rows of all layers in their current order, each layer zero-padded to whole V-row blocks and
    divided by its total importance, with one extra all-zero column (index ``in``) for padding."""
    v = block_rows(p)
    parts = []
    for s, o in zip(mats, out_perms, strict=True):
        total = float(s.sum())
        q = _pad_to(s[o], v, 1) / (total if total > 0 else 1.0)
        parts.append(q)
    stacked = torch.cat(parts)
    return torch.cat([stacked, stacked.new_zeros(stacked.shape[0], 1)], 1)


def _input_step(
    mats: list[Tensor],
    p: VNMPattern,
    in_perm: Tensor,
    out_perms: list[Tensor],
    seed: int,
    segments: Tensor | None = None,
) -> Tensor:
    """One sweep over the M slot positions, re-seating one channel per group by LSA each time.

    For large layers the groups are split at random into chunks (redrawn at
    every position) so that one position costs about ``_INPUT_BUDGET``
    element operations; a channel then moves only within its chunk. With
    ``segments`` a channel moves only to a slot of its own segment (the groups
    are ordered by the segment of their slot before chunking).
    """
    m = p.m
    v = block_rows(p)
    s = _stacked_rows(mats, p, out_perms)  # (Rt, C + 1)
    cols = s.shape[1] - 1
    c = s.view(-1, v, cols + 1).sum(1)  # (Bt, C + 1) column L1 norms per V-row block
    groups = -(-cols // m)
    chunk = max(_MIN_LSA_GROUPS, _INPUT_BUDGET // max(1, groups * s.shape[0]))
    perm = in_perm.clone()
    gen = torch.Generator().manual_seed(seed)
    for pos in range(m):
        # 1. Groups that have a channel in slot `pos` (the last group may be partial), shuffled.
        members = torch.full((groups * m,), cols, dtype=torch.long, device=perm.device)  # `cols` = padding
        members[:cols] = perm
        members = members.view(groups, m)
        g_all = torch.arange(groups)
        g_all = g_all[g_all * m + pos < cols]
        if g_all.numel() < 2:
            continue
        g_all = g_all[torch.randperm(g_all.numel(), generator=gen)].to(perm.device)
        if segments is not None:  # chunks of one segment where possible: moves across segments are forbidden
            g_all = g_all[torch.sort(segments[g_all * m + pos], stable=True).indices]
        # 2. Equal chunks of K groups (plus one shorter remainder), solved as a batch.
        n_chunks = -(-g_all.numel() // chunk)
        k = -(-g_all.numel() // n_chunks)
        full = (g_all.numel() // k) * k
        for g_idx in (g_all[:full].view(-1, k), g_all[full:].view(1, -1)):
            if g_idx.shape[1] < 2:
                continue
            slots = g_idx * m + pos  # (Bc, K)
            moving = perm[slots]  # channels taken out, one per group
            rest = members[g_idx][..., [i for i in range(m) if i != pos]]  # (Bc, K, M-1)
            gain = _input_gain(s, c, rest, moving, p)  # (Bc, K, K)
            if segments is not None:  # channel j may only take a slot of its own segment (j's own slot is one)
                gain[segments[moving][:, :, None] != segments[slots][:, None, :]] = float("-inf")
            # 3. Re-seat them: maximise the importance kept, with everyone else fixed.
            for b, cost in enumerate(gain.cpu().double().numpy()):
                rows, assigned = linear_sum_assignment(cost, maximize=True)
                perm[slots[b, assigned]] = moving[b, rows]
    return perm


def _input_gain(s: Tensor, c: Tensor, rest: Tensor, moving: Tensor, p: VNMPattern) -> Tensor:
    """gain[i, j, g]: importance kept by group g of batch i (over all row blocks) when channel
    ``moving[i, j]`` joins the members ``rest[i, g]``, under S_{V:N:M}.

    Per row block b, the group keeps the 4 columns of largest norm: the rest's
    top 4 (a1..a4), or a1..a3 and j when c[b, j] > t4[b, g]. With j in, a row
    keeps sum(top n of its 3 values on a1..a3) + max(0, S[r, j] - (n-th of them)).
    Batched over independent problems (dim 0) so that small chunks cost few torch calls.
    """
    v, n = block_rows(p), p.n
    rows = s.shape[0]
    nb = c.shape[0]
    bc, k = moving.shape
    # 1. The rest's 4 strongest columns per row block, strongest first, and the 4th norm t4.
    top = c[:, rest].topk(KEPT_COLUMNS, dim=-1)  # (Bt, Bc, K, 4)
    t4 = top.values[..., -1]  # (Bt, Bc, K)
    kept_cols = torch.gather(rest.expand(nb, -1, -1, -1), 3, top.indices)  # column ids
    index = kept_cols.view(nb, 1, -1).expand(-1, v, -1)
    vals = torch.gather(s.view(nb, v, -1), 2, index).view(nb, v, bc, k, KEPT_COLUMNS)
    # 2. Without j: top n of the 4 per row, summed per block.
    base = sum(_sorted_desc(vals.unbind(-1))[:n]).sum(1)  # (Bt, Bc, K)
    # 3. With j replacing a4: top n of a1..a3 plus the hinge on the n-th of them.
    top3 = _sorted_desc(vals[..., : KEPT_COLUMNS - 1].unbind(-1))[:n]
    u_sum = sum(top3).sum(1)  # (Bt, Bc, K)
    u_n = top3[-1].reshape(rows, bc, 1, k)
    y = s[:, moving]  # (R, Bc, Kj)
    enter = c[:, moving][..., None] > t4[:, :, None, :]  # (Bt, Bc, Kj, Kg)
    gain = torch.empty(bc, k, k, dtype=torch.float32, device=s.device)
    step = max(1, _CHUNK // max(1, rows * k * k))
    for i in range(0, bc, step):
        sl = slice(i, i + step)
        # (R, Bc', Kj, Kg) summed over the V rows of each block; the reduced dims stay contiguous.
        hinge = (y[:, sl, :, None] - u_n[:, sl]).clamp_min_(0).view(nb, v, -1).sum(1).view(nb, -1, k, k)
        with_j = torch.where(enter[:, sl], u_sum[:, sl, None, :] + hinge, base[:, sl, None, :])
        gain[sl] = with_j.sum(0)
    return gain


def _sorted_desc(x: tuple[Tensor, ...]) -> list[Tensor]:
    """Element-wise sort of 3 or 4 same-shaped tensors, largest first (min/max network: topk
    over a last dim of 3 or 4 is much slower on CPU)."""
    if len(x) == 3:
        a, b, c = x
        hi, lo = torch.maximum(a, b), torch.minimum(a, b)
        return [torch.maximum(hi, c), torch.maximum(lo, torch.minimum(hi, c)), torch.minimum(lo, c)]
    if len(x) == 4:
        a, b, c, d = x
        hi1, lo1, hi2, lo2 = torch.maximum(a, b), torch.minimum(a, b), torch.maximum(c, d), torch.minimum(c, d)
        mid_hi, mid_lo = torch.minimum(hi1, hi2), torch.maximum(lo1, lo2)
        return [
            torch.maximum(hi1, hi2),
            torch.maximum(mid_hi, mid_lo),
            torch.minimum(mid_hi, mid_lo),
            torch.minimum(lo1, lo2),
        ]
    return list(torch.stack(x, -1).sort(-1, descending=True).values.unbind(-1))


def _output_step(s: Tensor, p: VNMPattern, in_perm: Tensor, out_perm: Tensor) -> Tensor:
    """One sweep over the V slot positions, re-seating one row per row block by LSA each time.

    The gain of row r in block b is what r keeps with the 4 columns per group
    that the block's other rows select (``_output_gain``); a row that would
    change the block's selection is credited with the old one.
    """
    v, m = block_rows(p), p.m
    rows = s.shape[0]
    blocks = -(-rows // v)
    if blocks < 2:
        return out_perm
    q = _pad_to(s[:, in_perm], 1, m)
    q3 = q.view(rows, -1, m)  # (R, G, M), original row order
    perm = out_perm.clone()
    block_norm = torch.zeros(blocks, q3.shape[1], m, device=q.device)
    block_norm.index_add_(0, torch.arange(rows, device=perm.device) // v, q3[perm])
    for pos in range(v):
        b_idx = torch.arange(blocks, device=perm.device)
        b_idx = b_idx[b_idx * v + pos < rows]
        if b_idx.numel() < 2:
            continue
        slots = b_idx * v + pos
        moving = perm[slots]
        rest = block_norm[b_idx] - q3[moving]  # (Bp, G, M)
        # Zero-padded columns have norm 0 and are never preferred over a real column with norm > 0.
        sel = rest.topk(KEPT_COLUMNS, dim=-1).indices  # (Bp, G, 4): the block's columns without the row
        gain = _output_gain(q3[moving], sel, p.n)  # (Bp rows, Bp blocks)
        r_ix, assigned = linear_sum_assignment(gain.cpu().double().numpy(), maximize=True)
        new = torch.empty_like(moving)
        new[torch.as_tensor(assigned, device=perm.device)] = moving[torch.as_tensor(r_ix, device=perm.device)]
        perm[slots] = new
        block_norm[b_idx] = rest + q3[new]
    return perm


def _output_gain(rows: Tensor, sel: Tensor, n: int) -> Tensor:
    """gain[r, b]: importance row r keeps in block b with the block's column choice ``sel[b]``.

    Exact per row (top n of its scores on the 4 chosen columns of each group) when
    small enough; otherwise linearised as the sum of its scores on those columns.
    """
    k, b = rows.shape[0], sel.shape[0]
    if k * b * rows.shape[1] * rows.shape[2] > _OUTPUT_BUDGET:
        onehot = torch.zeros(b, *rows.shape[1:], device=rows.device).scatter_(2, sel, 1.0)
        return rows.flatten(1) @ onehot.flatten(1).t()
    vals = torch.gather(rows[:, None].expand(-1, b, -1, -1), 3, sel[None].expand(k, -1, -1, -1))
    return sum(_sorted_desc(vals.unbind(-1))[:n]).sum(-1)
