"""V:N:M channel permutation (paper section 4.2; DESIGN.md, "Channel permutation").

Find an input permutation P_i (columns) and an output permutation P_o (rows) of
a score matrix S so that S_{V:N:M}(P_o S P_i) keeps more importance than
S_{V:N:M}(S). The mask itself is always stored in original coordinates, so a
permutation only changes *which* weights are kept, never what the model
computes with them.

Algorithm (alternating assignment, every step a scipy linear sum assignment):

1. Start from the identity; this is also the fallback.
2. Input step (P_o fixed): the columns sit in groups of M slots. For each slot
   position p = 0..M-1, take the channel in slot p out of every group and
   re-seat these G channels, one per group, by an LSA of size G x G. The gain
   of putting channel j back into group g is measured on the **column-norm
   proxy**: per V-row block b, the block keeps the 4 columns of largest L1
   norm c[b, j], so adding j to the group's M-1 other members adds
   max(0, c[b, j] - t4[b, g]) to the kept column norm, where t4 is the 4th
   largest norm among those members. Summed over row blocks this is the exact
   change of the proxy "sum over blocks of the 4 largest column norms", so
   every LSA move never lowers the proxy (keeping everyone in place is one of
   its solutions). The proxy ignores the final n-of-4 choice per row.
3. Output step (P_i fixed): the same with rows and V-row blocks: for slot
   position q = 0..V-1, the row in slot q leaves every block and the rows are
   re-seated by a (row blocks x row blocks) LSA whose cost is, per group,
   the column norm the block loses (its M-4 smallest column norms with the row
   added). Again exact for the proxy.
4. After every step the true kept importance of S_{V:N:M} is evaluated; the
   step is kept only if it increased it (otherwise it is undone), and the
   search stops early when a round changes nothing. A last check with
   ``vnm_mask`` returns the identity if the result is not better, so the
   result never keeps less than the unpermuted matrix.

Why this decomposition: an LSA of all C channels against C group slots would be
11008 x 11008 for an MLP layer and needs a cost that depends on the other
members of each group; removing one member per group makes the G x G problem
exact for the proxy and cheap (G = C / M), at the price of moving at most one
channel per group per position (M positions per round let every channel move).

Cost (4096 x 11008 at 64:2:5): 2 rounds x (5 input LSAs of 2202 x 2202 + 64
output LSAs of 64 x 64); see benchmarks/bench_permutation.py.

Layers that read the same tensor share P_i: ``find_shared_permutation`` runs
the input step on the column norms of all of them stacked (each layer
normalised by its total importance) and the output step per layer.

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
# Elements per chunk of the cost-matrix computations (bounds peak memory).
_CHUNK = 1 << 24
# Largest LSA of the input step (groups x groups); bigger layers are split into random chunks.
_LSA_GROUPS = 512


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
    scores: Sequence[Tensor], pattern: VNMPattern | str, rounds: int = 2
) -> tuple[Tensor, list[Tensor]]:
    """One input permutation shared by layers that read the same tensor, one output permutation each.

    The shared step maximises the sum over layers of the importance fraction
    kept; it is accepted only when no layer loses, so every layer keeps at
    least what it keeps unpermuted.

    Args:
        scores: (out_i, in) score matrices with the same number of columns.
        pattern: the V:N:M pattern.
        rounds: alternating rounds.
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
    if p.is_nm or rounds == 0:
        return in_perm, out_perms

    # Kept importance as a fraction of each layer's total (layers of a group weigh the same).
    totals = [max(float(s.sum(dtype=torch.float64)), 1e-30) for s in mats]
    base = [kept_importance(s, p) / t for s, t in zip(mats, totals, strict=True)]
    kept = list(base)
    for r in range(rounds):
        changed = False
        # 1. Input step, shared by all layers: kept only if no layer loses and the total gains.
        cand_in = _input_step(mats, p, in_perm, out_perms, seed=r)
        cand_kept = [kept_importance(s, p, cand_in, o) / t for s, o, t in zip(mats, out_perms, totals, strict=True)]
        if _better(cand_kept, kept):
            in_perm, kept, changed = cand_in, cand_kept, True
        # 2. Output step, per layer: each layer's rows are independent of the others.
        for i, s in enumerate(mats):
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


def _block_column_norms(mats: list[Tensor], p: VNMPattern, out_perms: list[Tensor]) -> Tensor:
    """(row blocks of all layers, in) column L1 norms per V-row block, each layer normalised by its total."""
    v = block_rows(p)
    norms = []
    for s, o in zip(mats, out_perms, strict=True):
        q = _pad_to(s[o], v, 1)
        total = float(s.sum())
        norms.append(q.view(-1, v, q.shape[1]).sum(1) / (total if total > 0 else 1.0))
    return torch.cat(norms)


def _input_step(mats: list[Tensor], p: VNMPattern, in_perm: Tensor, out_perms: list[Tensor], seed: int) -> Tensor:
    """One sweep over the M slot positions, re-seating one channel per group by LSA each time.

    For large layers the groups are split at random into chunks of at most
    ``_LSA_GROUPS`` and each chunk is solved on its own (a channel moves only
    within its chunk at one position; chunks are redrawn at every position).
    """
    m = p.m
    c = _block_column_norms(mats, p, out_perms)  # (Bt, C)
    cols = c.shape[1]
    groups = -(-cols // m)
    perm = in_perm.clone()
    gen = torch.Generator().manual_seed(seed)
    for pos in range(m):
        # 1. Groups that have a channel in slot `pos` (the last group may be partial).
        g_all = torch.arange(groups)
        g_all = g_all[g_all * m + pos < cols]
        if g_all.numel() < 2:
            continue
        g_all = g_all[torch.randperm(g_all.numel(), generator=gen)]
        members = torch.full((groups * m,), -1, dtype=torch.long, device=perm.device)
        members[:cols] = perm
        members = members.view(groups, m)
        n_chunks = -(-g_all.numel() // _LSA_GROUPS)
        for g_idx in g_all.tensor_split(n_chunks):
            g_idx = g_idx.to(perm.device)
            slots = g_idx * m + pos
            moving = perm[slots]  # channels taken out, one per group
            # 2. t4[b, g]: 4th largest column norm among the group's other members (0 if fewer than 4).
            rest = members[g_idx][:, [k for k in range(m) if k != pos]]  # (Gp, M-1), -1 = padding
            rest_norm = torch.where(rest >= 0, c[:, rest.clamp_min(0)], torch.zeros((), device=c.device))
            if rest.shape[1] >= KEPT_COLUMNS:
                t4 = rest_norm.topk(KEPT_COLUMNS, dim=-1).values[..., -1]  # (Bt, Gp)
            else:
                t4 = torch.zeros(rest_norm.shape[:2], device=c.device)
            # 3. Re-seat: gain[j, g] = sum_b max(0, c[b, j] - t4[b, g]), maximised by LSA.
            gain = _pairwise_gain(c[:, moving], t4)
            rows, assigned = linear_sum_assignment(gain.cpu().double().numpy(), maximize=True)
            new = torch.empty_like(moving)
            new[torch.as_tensor(assigned, device=perm.device)] = moving[torch.as_tensor(rows, device=perm.device)]
            perm[slots] = new
    return perm


def _pairwise_gain(x: Tensor, t4: Tensor) -> Tensor:
    """gain[j, g] = sum_b max(0, x[b, j] - t4[b, g]), computed in chunks of j."""
    bt, n = x.shape
    out = torch.empty(n, t4.shape[1], dtype=torch.float32, device=x.device)
    step = max(1, _CHUNK // max(1, bt * t4.shape[1]))
    xt = x.t().contiguous()  # (n, Bt)
    for j in range(0, n, step):
        out[j : j + step] = (xt[j : j + step, :, None] - t4[None]).clamp_min_(0).sum(1)
    return out


def _output_step(s: Tensor, p: VNMPattern, in_perm: Tensor, out_perm: Tensor) -> Tensor:
    """One sweep over the V slot positions, re-seating one row per row block by LSA each time.

    The gain of row r in block b is the sum of r's scores in the 4 columns per
    group that the block's other rows select (column-norm proxy, linearised:
    a row that would change the block's selection is credited with the old
    one, a lower bound). One matrix product per position.
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
        sel = torch.zeros_like(rest).scatter_(2, rest.topk(KEPT_COLUMNS, dim=-1).indices, 1.0)
        gain = q3[moving].flatten(1) @ sel.flatten(1).t()  # (Bp rows, Bp blocks)
        r_ix, assigned = linear_sum_assignment(gain.cpu().double().numpy(), maximize=True)
        new = torch.empty_like(moving)
        new[torch.as_tensor(assigned, device=perm.device)] = moving[torch.as_tensor(r_ix, device=perm.device)]
        perm[slots] = new
        block_norm[b_idx] = rest + q3[new]
    return perm
