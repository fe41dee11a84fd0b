"""Algorithm 2: cutting each sequence into token slices, TeraPipe's t_max DP made exact.

Positions are multiples of the token granularity g: a slice from position q to
p has n = (p - q) g tokens and c = q g tokens of context.  For a fixed
partition every chain position j (stages and the links between them) costs
X_j(n, c, b) per work item; per slice let

    h(q, p) = max_j X_j at the largest micro-batch      (its bottleneck time)
    g(q, p) = sum over micro-batches of max_j X_j        (its share of the sum)

For a flow shop, any monotone path through the (item, position) grid holds
one cell per item plus one cell per step to the next position, so (with a
hop's time counted whole, as if its latency held the link too: that can only
lengthen the schedule)

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

from hpipe.planners.evaluate import hop_resource, makespan_from_times

INF = math.inf


class SliceGrid:
    """h and g over all (q, p) slices of one partition, stored transposed: [p, q]."""

    def __init__(self, tables, stages, micro_batch_sizes, max_slice_tokens: int | None = None):
        setup = tables.setup
        self.g = setup.granularity
        self.L = L = setup.seq_len // self.g
        q, p = np.triu_indices(L + 1, k=1)
        if max_slice_tokens is not None:  # slices longer than memory allows are never costed
            keep = (p - q) * self.g <= max_slice_tokens
            q, p = q[keep], p[keep]
        n = ((p - q) * self.g).astype(float)
        c = (q * self.g).astype(float)
        sizes = sorted(set(micro_batch_sizes))
        bmax = max(sizes)
        # Chain positions that cost alike (same device type and unit counts, or the same
        # link and boundary) share one row: a 32-stage pipeline has only a few distinct ones.
        keys = []
        prev = None
        for devs, s, e in stages:
            if prev is not None:
                keys.append(("link", tables.pair_group(prev[0][0], devs[0])[0], int(tables.unit_class[prev[2] - 1])))
            if len(devs) == 1:
                keys.append(("stage", tables.device_group[devs[0]], tuple(tables.counts(s, e))))
            else:  # a group's input forward depends on its first unit
                keys.append(("tp", tables.device_group[devs[0]], len(devs), tuple(tables.counts(s, e)),
                             int(tables.unit_class[s - 1]) if s else -1))
            prev = (devs, s, e)
        spec = {}
        prev = None
        for (devs, s, e), k in zip(stages, keys[::2]):
            spec[k] = (devs, s, e)
        for j in range(1, len(stages)):
            spec[keys[2 * j - 1]] = (stages[j - 1], stages[j])
        rows = {}
        gsum = np.zeros_like(n)
        self.rows_by_b = {}
        for b in sizes:
            bb = np.full_like(n, float(b))
            rows_b = {}
            for k, what in spec.items():
                if k[0] == "link":
                    (pd, _, pe), (dd, _, _) = what
                    rows_b[k] = tables.transfer_times(pd[0], dd[0], pe, n, bb, key=("grid", L, self.g, b, len(n)))
                else:
                    devs, s_, e_ = what
                    rows_b[k] = np.broadcast_to(tables.stage_time(devs, s_, e_, n, c, bb,
                                                                  key=("grid", L, self.g, b, len(n))), n.shape)
            self.rows_by_b[b] = rows_b
            hb = np.maximum.reduce(list(rows_b.values()))
            gsum += hb * micro_batch_sizes.count(b)
            if b == bmax:
                h, rows = hb, rows_b
        with np.errstate(invalid="ignore", divide="ignore"):
            safe = np.where(h > 0, h, 1.0)
            rho_of = {k: float(np.clip(np.max(np.where(h > 0, r / safe, 0.0), initial=0.0), 0.0, 1.0))
                      for k, r in rows.items()}
        self.rho = np.array([rho_of[k] for k in keys])
        rho = self.rho
        self.w = float(rho.sum() - max(rho[0], rho[-1])) if len(rho) > 1 else 0.0
        self.HT = np.full((L + 1, L + 1), INF)
        self.GT = np.full((L + 1, L + 1), INF)
        self.HT[p, q] = h
        self.GT[p, q] = gsum
        # for exact makespans of candidate slicings straight from the rows
        self.keys = keys
        self.sizes = list(micro_batch_sizes)
        self.pair_index = np.full((L + 1, L + 1), -1)
        self.pair_index[p, q] = np.arange(len(p))
        cluster = setup.cluster
        self.resources = []
        self.latency = []  # per chain position: the propagation after a hop releases its links
        for j, (devs, _, _) in enumerate(stages):
            if j:
                src = stages[j - 1][0][0]
                self.resources.append(hop_resource(cluster, src, devs[0]))
                self.latency.append(tables.latency_s(src, devs[0]))
            self.resources.append(("stage", j))
            self.latency.append(0.0)

    def makespan(self, slices_tokens) -> float:
        """Exact makespan (``evaluate``'s recurrence) of this partition with these slices,
        from the grid's rows: no cost-model calls."""
        pos = np.concatenate(([0], np.cumsum(slices_tokens) // self.g)).astype(int)
        idx = self.pair_index[pos[1:], pos[:-1]]
        if np.any(idx < 0):
            return INF
        # rows hold whole transfer times (latency included: an upper bound for the DP);
        # the recurrence wants the links' hold and the latency apart
        total = np.concatenate([np.array([self.rows_by_b[b][k][idx] for k in self.keys]) for b in self.sizes],
                               axis=1)
        delay = np.minimum(np.array(self.latency)[:, None], total)
        return makespan_from_times(total - delay, self.resources, delay)

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
    # position-major (L+1, K): each step reads a contiguous block of rows; the loop is
    # bound by numpy's per-call overhead, so it keeps to few calls per position
    f = np.full((L + 1, K), INF)
    f[0] = 0.0
    hm = np.zeros((L + 1, K))
    back = np.zeros((L + 1, K), int)
    ar = np.arange(K)
    for p in range(1, L + 1):
        q0 = int(qmin[p])
        hrow = HT[p, q0:p]
        vals = f[q0:p] + GT[p, q0:p, None]  # (p - q0, K)
        vals[hrow[:, None] > t] = INF
        j = vals.argmin(axis=0)
        f[p] = vals[j, ar]
        jq = j + q0
        back[p] = jq
        hm[p] = np.maximum(hm[jq, ar], hrow[j])
    return f[L], hm[L], back.T


def _window(HT, tmax):
    """Earliest useful slice start per end position when no slice may cost more than
    ``tmax``: long slices are out, so the DP scans a few columns instead of all."""
    L = HT.shape[0] - 1
    ok = HT <= tmax
    first = np.argmax(ok, axis=1)
    none = ~ok.any(axis=1)
    first[none] = np.maximum(np.arange(L + 1)[none] - 1, 0)
    first[0] = 0
    return first


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


def best_slicings(grid: SliceGrid, top: int = 8, batch: int = 128, method: str = "bisect", fan: int = 16):
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
        ts = np.asarray(ts, float)
        fL, hL, back = _batch_dp(GT, HT, ts, np.maximum(qmin, _window(HT, ts.max())))
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

    f_inf = float(consider([INF])[0])
    tried = 1
    best = min(v[0] for v in found.values())
    if grid.w > 0:  # thresholds above this cannot win: f_inf + w t >= best
        thresholds = thresholds[thresholds < (best - f_inf) / grid.w]
    if len(thresholds) == 0:
        pass
    elif method == "sweep":
        # TeraPipe's order: ascending, stopping once f_inf + w t reaches the best
        i = 0
        while i < len(thresholds) and f_inf + grid.w * thresholds[i] < best:
            hi = i + batch
            if grid.w > 0:
                hi = min(hi, int(np.searchsorted(thresholds, (best - f_inf) / grid.w, side="left")))
            hi = max(hi, i + 1)
            consider(thresholds[i:hi])
            tried += hi - i
            best = min(v[0] for v in found.values())
            i = hi
    else:
        # Bisection over the threshold axis, branch and bound: F is non-increasing in
        # t, so on an interval (t_i, t_j) every threshold scores at least
        # F(t_j) + w t_{i+1}; intervals that cannot beat the best, and intervals on
        # which F is flat (their thresholds find nothing the left end did not), are
        # dropped.  Each level splits every surviving interval into ``fan`` parts and
        # runs all the new points as one batch.
        K = len(thresholds)
        # the first level: both ends and ``fan`` points between, one batch
        first = sorted(set(np.linspace(0, K - 1, fan + 1).round().astype(int).tolist()))
        F = {}
        for lo in range(0, len(first), batch):
            chunk = first[lo:lo + batch]
            for k, f in zip(chunk, consider(thresholds[chunk])):
                F[k] = f
        tried += len(first)
        best = min(v[0] for v in found.values())
        intervals = list(zip(first, first[1:]))
        while intervals:
            mids, nxt = [], []
            for i, j in intervals:
                if j - i <= 1 or F[i] == F[j] or F[j] + grid.w * thresholds[i + 1] >= best:
                    continue
                pts = sorted(set(np.linspace(i, j, fan + 1).round().astype(int)[1:-1].tolist()) - {i, j})
                mids += pts
                bounds = [i, *pts, j]
                nxt += list(zip(bounds, bounds[1:]))
            for lo in range(0, len(mids), batch):
                chunk = mids[lo:lo + batch]
                for k, f in zip(chunk, consider(thresholds[chunk])):
                    F[k] = f
                best = min(v[0] for v in found.values())
            tried += len(mids)
            intervals = nxt
    ranked = sorted(found.values(), key=lambda v: v[0])[:top]
    return [(v, _path(back[k], L, g)) for v, back, k in ranked], tried


def max_slice_tokens(tables, stages, micro_batch: int) -> int:
    """Longest slice the partition's memory allows (``CostTables.max_slice_tokens``)."""
    return tables.max_slice_tokens(stages, micro_batch)
