"""Algorithm 2: cutting each sequence into token slices, TeraPipe's t_max DP made exact.

Positions are multiples of the token granularity g: a slice from position q to
p has n = (p - q) g tokens and c = q g tokens of context.  For a fixed
partition every chain position j (stages and the links between them) costs
X_j(n, c, b) per work item; per slice let

    h(q, p) = max_j X_j at the largest micro-batch      (its bottleneck time)
    g(q, p) = sum over micro-batches of max_j X_j        (its share of the sum)

For a flow shop, any monotone path through the (item, position) grid holds
one cell per item plus one cell per step to the next position, so

    makespan <= sum_items max_j X_ij + sum_{j != j*} max_i X_ij
             <= sum_slices g + w * max_slices h,     w = sum_{j != j*} rho_j,

with rho_j = max over slices of X_j / h (1 for a stage that is somewhere the
bottleneck, small for a fast link) and j* the first or last position.  With
equal stages this is TeraPipe's sum t + (K - 1) t_max.  ``best_slicings``
minimises it exactly: for every distinct candidate t_max (the distinct values
of h), ascending, F(t_max) = min sum g over slicings with every h <= t_max;
the objective of the slicing found is F + w * (its max h).  Candidates stop
once F_inf + w * t_max reaches the best objective (F_inf: the unconstrained
minimum), an exact early stop: no later t_max can do better.  The DP runs for
a batch of thresholds at once (numpy, one pass over positions).

Slices longer than what the partition's memory allows (activation workspace
of the largest slice) are excluded.  The best few slicings by this bound are
then compared by exact makespan by the caller.
"""

from __future__ import annotations

import math

import numpy as np

INF = math.inf


class SliceGrid:
    """h and g over all (q, p) slices of one partition, stored transposed: [p, q]."""

    def __init__(self, tables, stages, micro_batch_sizes, max_slice_tokens: int | None = None):
        setup = tables.setup
        self.g = setup.granularity
        self.L = setup.seq_len // self.g
        L = self.L
        q, p = np.triu_indices(L + 1, k=1)
        self.q, self.p = q, p
        n = ((p - q) * self.g).astype(float)
        c = (q * self.g).astype(float)
        sizes = sorted(set(micro_batch_sizes))
        bmax = max(sizes)
        per_b = {}
        for b in sizes:
            bb = np.full_like(n, float(b))
            rows = []
            prev = None
            for devs, s, e in stages:
                if prev is not None:
                    rows.append(tables.transfer_times(prev[0][0], devs[0], prev[2], n, bb))
                if len(devs) == 1:
                    rows.append(tables.range_time(devs[0], s, e, n, c, bb, key=("grid", L, self.g, b)))
                else:
                    rows.append(np.broadcast_to(tables.cost.stage_compute_s(s, e, list(devs), n, c, bb), n.shape))
                prev = (devs, s, e)
            per_b[b] = np.array(rows, float)
        X = per_b[bmax]
        h = X.max(axis=0)
        gsum = sum(per_b[b].max(axis=0) for b in micro_batch_sizes)
        ok = np.ones_like(n, bool) if max_slice_tokens is None else n <= max_slice_tokens
        self.ok = ok
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = np.where(ok[None] & (h[None] > 0), X / np.where(h > 0, h, 1.0)[None], 0.0).max(axis=1)
        rho = np.clip(rho, 0.0, 1.0)
        self.rho = rho
        self.w = float(rho.sum() - max(rho[0], rho[-1])) if len(rho) > 1 else 0.0
        self.HT = np.full((L + 1, L + 1), INF)
        self.GT = np.full((L + 1, L + 1), INF)
        self.HT[p[ok], q[ok]] = h[ok]
        self.GT[p[ok], q[ok]] = gsum[ok]

    def objective(self, slices_tokens) -> float:
        """sum g + w * max h of a slicing given in tokens."""
        pos = np.concatenate(([0], np.cumsum(slices_tokens) // self.g)).astype(int)
        hs = self.HT[pos[1:], pos[:-1]]
        gs = self.GT[pos[1:], pos[:-1]]
        if not np.all(np.isfinite(hs)):
            return INF  # a slice too long for memory
        return float(gs.sum() + self.w * hs.max())


def _batch_dp(GT, HT, t, qmin):
    """Min sum g from position 0 to each position with every slice's h <= t[k].

    Returns (f_L, hmax_L, back): value, max h of the path and back-pointers
    (K, L+1) per threshold.  ``qmin[p]`` is the earliest slice start allowed
    (memory caps on slice length)."""
    L = GT.shape[0] - 1
    K = len(t)
    f = np.full((K, L + 1), INF)
    f[:, 0] = 0.0
    hm = np.zeros((K, L + 1))
    back = np.zeros((K, L + 1), int)
    ar = np.arange(K)
    tcol = t[:, None]
    for p in range(1, L + 1):
        q0 = qmin[p]
        hrow = HT[p, q0:p]
        vals = np.where(hrow <= tcol, f[:, q0:p] + GT[p, q0:p], INF)
        j = vals.argmin(axis=1)
        f[:, p] = vals[ar, j]
        back[:, p] = j + q0
        hm[:, p] = np.maximum(hm[ar, j + q0], hrow[j])
    return f[:, L], hm[:, L], back


def _minmax_dp(HT, qmin):
    """Least possible max h over slicings (inf: no slicing fits)."""
    L = HT.shape[0] - 1
    f = np.full(L + 1, INF)
    f[0] = 0.0
    for p in range(1, L + 1):
        q0 = qmin[p]
        f[p] = np.maximum(f[q0:p], HT[p, q0:p]).min()
    return float(f[L])


def _path(back_row, L, g):
    pos = [L]
    while pos[-1] > 0:
        pos.append(int(back_row[pos[-1]]))
    pos = pos[::-1]
    return tuple(int((b - a) * g) for a, b in zip(pos, pos[1:]))


def best_slicings(grid: SliceGrid, top: int = 8, batch: int = 64):
    """The ``top`` best slicings by the bound (sum g + w max h), best first, as
    [(bound, slices in tokens)]; also returns the number of thresholds tried.
    Empty when no slicing fits."""
    L, g = grid.L, grid.g
    GT, HT = grid.GT, grid.HT
    finite = np.isfinite(HT)
    # earliest start per end position: slices longer than the memory allows are out
    qmin = np.array([int(np.argmax(finite[p, :p])) if p and finite[p, :p].any() else p for p in range(L + 1)])
    qmin[0] = 0
    t_lb = _minmax_dp(HT, qmin)
    if not np.isfinite(t_lb):
        return [], 0
    thresholds = np.unique(HT[finite & (HT >= t_lb)])
    # candidates keyed by (sum g, max h): one slicing reached from several thresholds
    # gives the same pair, so paths are rebuilt only for the final few
    found: dict[tuple[float, float], tuple[float, np.ndarray, int]] = {}

    def consider(ts):
        fL, hL, back = _batch_dp(GT, HT, np.asarray(ts, float), qmin)
        vals = fL + grid.w * hL
        worst = max((v[0] for v in found.values()), default=INF)
        for k in np.argsort(vals, kind="stable"):
            if not np.isfinite(vals[k]) or (len(found) >= top and vals[k] >= worst):
                break
            key = (float(fL[k]), float(hL[k]))
            if key not in found:
                found[key] = (float(vals[k]), back, int(k))
                if len(found) > top:
                    del found[max(found, key=lambda x: found[x][0])]
                worst = max(v[0] for v in found.values())
        return fL

    f_inf = float(consider([INF, t_lb])[0])
    tried = 2
    best = min(v[0] for v in found.values())
    i = 0
    while i < len(thresholds):
        # exact early stop: every threshold from here on costs at least f_inf + w t
        if f_inf + grid.w * thresholds[i] >= best:
            break
        hi = i + batch
        if grid.w > 0:
            hi = min(hi, int(np.searchsorted(thresholds, (best - f_inf) / grid.w, side="left")))
        hi = max(hi, i + 1)
        consider(thresholds[i:hi])
        tried += hi - i
        best = min(v[0] for v in found.values())
        i = hi
    ranked = sorted(found.values(), key=lambda v: v[0])[:top]
    return [(v, _path(back[k], L, g)) for v, back, k in ranked], tried


def max_slice_tokens(tables, stages, micro_batch: int) -> int:
    """Longest slice (a multiple of the granularity) whose workspace still fits every
    stage of the partition; 0 if not even one granule fits."""
    setup = tables.setup
    g, L = setup.granularity, setup.seq_len // setup.granularity
    best = 0
    lo, hi = 1, L
    # memory grows with the slice length: binary search the largest fitting length
    while lo <= hi:
        mid = (lo + hi) // 2
        if _fits(tables, stages, mid * g, micro_batch):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best * g


def _fits(tables, stages, slice_tokens, micro_batch):
    for devs, s, e in stages:
        need = tables.memory_matrix(len(devs), slice_tokens, micro_batch)[s, e]
        if any(need > tables.capacity(d) for d in devs):
            return False
    return True
