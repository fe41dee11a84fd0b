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

from hpipe.planners.evaluate import hop_resource, makespan_from_times, shares_resources

INF = math.inf
MAX_TOKEN_UNITS = 4096
"""Most token units (seq_len / token_granularity) the DP slices: its tables hold every (q, p)
pair, so time and memory grow with the square.  Planning hpipe at 16, 32 and 64k tokens
in units of 16 (1024-4096 units) took 3.5, 11.8 and 52 s and 0.34, 1.1 and 3.7 GB; 1M
tokens (65,536 units) was killed at 24 GB (2-core Intel Xeon VM, 2026-12-03)."""


def check_token_units(setup) -> None:
    """A PlannerInputError naming planner.token_granularity, with the smallest that would do,
    where the sequence has more token units than the DP can hold."""
    from hpipe.errors import PlannerInputError

    L = setup.seq_len // setup.granularity
    if L <= MAX_TOKEN_UNITS:
        return
    least = -(-setup.seq_len // MAX_TOKEN_UNITS)
    fits = next(g for g in range(least, setup.seq_len + 1) if setup.seq_len % g == 0)
    raise PlannerInputError(f"{setup.seq_len} tokens in units of {setup.granularity} make {L} token "
                            f"units to slice; the slicing DP's time and memory grow with their square (at most "
                            f"{MAX_TOKEN_UNITS}): give planner.token_granularity {fits} or more",
                            file=getattr(setup.scenario, "source_path", None), field="planner.token_granularity")


class SliceGrid:
    """h and g over all (q, p) slices of one partition, stored transposed: [p, q]."""

    def __init__(self, tables, stages, micro_batch_sizes, max_slice_tokens: int | None = None):
        setup = tables.setup
        check_token_units(setup)  # make_plan checks the SLICING planners first; this guards any other caller
        self.g = setup.granularity
        self.L = L = setup.seq_len // self.g
        # the slices (q, p) of the grid, those memory allows, and where each lies in the
        # list: the same for every partition of this length and memory cap (read-only)
        cap = max_slice_tokens if max_slice_tokens is not None and max_slice_tokens < setup.seq_len else None
        ck = ("slice-grid", L, self.g, cap)
        if ck not in tables._cache:
            q, p = np.triu_indices(L + 1, k=1)
            n_all = ((p - q) * self.g).astype(float)
            c_all = (q * self.g).astype(float)
            keep = None
            if cap is not None:
                keep = n_all <= cap  # slices longer than memory allows are never used
                q, p = q[keep], p[keep]
            pair_index = np.full((L + 1, L + 1), -1)
            flat = p * (L + 1) + q  # where (p, q) lies in a flat (L+1, L+1) array
            pair_index.reshape(-1)[flat] = np.arange(len(p))
            for a in (q, p, n_all, c_all, pair_index, keep, flat):
                if a is not None:
                    a.flags.writeable = False
            tables._cache[ck] = (q, p, n_all, c_all, keep, pair_index, flat)
        q, p, n_all, c_all, keep, self.pair_index, flat = tables._cache[ck]
        n = n_all if keep is None else n_all[keep]
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
                keys.append(("tp", tables.canonical_group(devs), tuple(tables.counts(s, e)),
                             int(tables.unit_class[s - 1]) if s else -1))  # a group's kind, its host included
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
            rows_b = {}
            for k, what in spec.items():
                # each row over every (q, p) slice, kept in the tables: partitions share
                # most of their stages and hops, so most rows are found there
                ck = (k, b)
                full = tables.grid_rows.get(ck)
                if full is None:
                    bb = np.full_like(n_all, float(b))
                    if k[0] == "link":
                        (pd, _, pe), (dd, _, _) = what
                        full = tables.transfer_times(pd[0], dd[0], pe, n_all, bb, key=("grid", L, self.g, b))
                    else:
                        devs, s_, e_ = what
                        full = tables.stage_time(devs, s_, e_, n_all, c_all, bb, key=("grid", L, self.g, b))
                    full = np.array(np.broadcast_to(full, n_all.shape), float)
                    tables.grid_rows.put(ck, full)
                rows_b[k] = full if keep is None else full[keep]
            self.rows_by_b[b] = rows_b
            it = iter(rows_b.values())
            hb = np.array(next(it), float)  # the elementwise max of the rows, one row at a time
            for r in it:                      # (max is exact: the order does not matter)
                np.maximum(hb, r, out=hb)
            gsum += hb * micro_batch_sizes.count(b)
            if b == bmax:
                h, rows = hb, rows_b
        with np.errstate(invalid="ignore", divide="ignore"):
            safe = np.where(h > 0, h, 1.0)
            pos = h > 0  # the max of r / h where h > 0 (0 if none), without the 0s written out
            rho_of = {k: float(np.clip(np.max(r / safe, where=pos, initial=0.0), 0.0, 1.0)) for k, r in rows.items()}
        self.rho = np.array([rho_of[k] for k in keys])
        rho = self.rho
        self.w = float(rho.sum() - max(rho[0], rho[-1])) if len(rho) > 1 else 0.0
        self.HT = np.full((L + 1, L + 1), INF)
        self.GT = np.full((L + 1, L + 1), INF)
        self.HT.reshape(-1)[flat] = h  # [p, q], one flat index array
        self.GT.reshape(-1)[flat] = gsum
        # for exact makespans of candidate slicings straight from the rows
        self.keys = keys
        self.sizes = list(micro_batch_sizes)
        self._stack = None
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
        return self.makespans([slices_tokens])[0]

    def makespans(self, slicings) -> list[float]:
        """``makespan`` of each slicing; those with as many slices are scanned together
        (``partition.batch_completion``, the same arithmetic)."""
        from hpipe.planners.partition import batch_completion

        if self._stack is None:  # (positions, slices of the grid) per micro-batch size
            self._stack = {b: np.array([r[k] for k in self.keys]) for b, r in self.rows_by_b.items()}
            self._lat = np.array(self.latency)[:, None]
            self._shared = shares_resources(self.resources)
        out: list = [INF] * len(slicings)
        groups: dict = {}
        for i, sl in enumerate(slicings):
            pos = np.concatenate(([0], np.cumsum(sl) // self.g)).astype(int)
            idx = self.pair_index[pos[1:], pos[:-1]]
            if np.any(idx < 0):
                continue
            # rows hold whole transfer times (latency included: an upper bound for the DP);
            # the recurrence wants the links' hold and the latency apart
            per_b = {b: st[:, idx] for b, st in self._stack.items()}
            total = np.concatenate([per_b[b] for b in self.sizes], axis=1)
            delay = np.minimum(self._lat, total)
            if self._shared:
                out[i] = makespan_from_times(total - delay, self.resources, delay)
            else:
                groups.setdefault(total.shape, []).append((i, total - delay, delay))
        for members in groups.values():
            C = batch_completion(np.stack([m[1] for m in members]), np.stack([m[2] for m in members]))
            for (i, _, _), v in zip(members, C.tolist()):
                out[i] = v
        return out

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
    t = np.asarray(t, float)
    # position-major (L+1, K): each step reads a contiguous block of rows; the loop is
    # bound by numpy's per-call overhead, so it keeps to few calls per position (the max
    # h of each path is read off the back-pointers afterwards, not carried along)
    f = np.full((L + 1, K), INF)
    f[0] = 0.0
    back = np.zeros((L + 1, K), np.intp)
    ar = np.arange(K)
    starts = [int(x) for x in qmin]
    capped = bool(np.isfinite(t).any())
    for p in range(1, L + 1):
        q0 = starts[p]
        vals = f[q0:p] + GT[p, q0:p, None]  # (p - q0, K)
        if capped:
            np.putmask(vals, HT[p, q0:p, None] > t, INF)
        j = vals.argmin(axis=0)
        f[p] = vals[j, ar]
        j += q0
        back[p] = j
    return f[L], _path_max_h(back, L, lambda pos, prev: HT[pos, prev]), back.T


def _path_max_h(back, L, h_of):
    """Max h along each column's path in ``back`` (L+1, K), all paths walked back at once;
    ``h_of(pos, prev)`` gives each column's h of the slice [prev, pos)."""
    K = back.shape[1]
    ar = np.arange(K)
    hm = np.zeros(K)
    pos = np.full(K, L)
    live = pos > 0
    while live.any():
        prev = back[pos, ar]
        np.maximum(hm, h_of(pos, prev), out=hm, where=live)  # a finished path stays at 0 (back[0] is 0)
        pos = prev
        live = pos > 0
    return hm


def _path_max_h_flat(back, L, h_flat, base):
    """``_path_max_h`` of ``back`` (K, L+1), contiguous, each column's h of the slice
    [prev, pos) at ``h_flat[base + pos (L+1) + prev]``: every read one flat index array
    (numpy's indexing with two arrays costs about twice as much), the same values."""
    K = back.shape[0]
    b_flat = back.reshape(-1)
    row = np.arange(K) * (L + 1)
    hm = np.zeros(K)
    pos = np.full(K, L)
    live = pos > 0
    while live.any():
        prev = b_flat[row + pos]
        np.maximum(hm, h_flat[base + pos * (L + 1) + prev], out=hm, where=live)  # a finished path stays (back[0] is 0)
        pos = prev
        live = pos > 0
    return hm


def _batch_dp_many(problems, block_cells: int = 1 << 21):
    """``_batch_dp`` of several (GT, HT, thresholds, earliest starts) of one L at once:
    the thresholds of all side by side, each column reading its own grid.  The window
    is the union of theirs; rows outside a problem's own window hold inf for its
    columns (slices too long for memory, or above its threshold), so every column's
    minimum, and the first position of it, is what ``_batch_dp`` finds alone.

    The loop over end positions is bound by numpy's per-call overhead, so each column's
    grid entries, masked by its threshold, are gathered before it for a block of rows at
    a time (the band of (p, q) with starts[p] <= q < p, at most ``block_cells`` values a
    block): the loop itself then adds, takes the argmin and reads off the minimum.  The
    same sums and comparisons as ``_batch_dp``, so the same values and back-pointers
    (inf + f is inf, as ``_batch_dp``'s masked entries are)."""
    L = problems[0][0].shape[0] - 1
    N = len(problems)
    t = np.concatenate([np.asarray(p[2], float) for p in problems])
    col = np.concatenate([np.full(len(p[2]), i) for i, p in enumerate(problems)])
    edges = np.cumsum([0] + [len(p[2]) for p in problems]).tolist()  # each problem's columns
    K = len(t)
    starts = np.minimum.reduce([np.asarray(p[3]) for p in problems]).astype(np.intp)
    starts[0] = 0
    capped = bool(np.isfinite(t).any())
    lens = np.arange(L + 1) - starts  # window length per end position
    lens[0] = 0
    offs = np.concatenate(([0], np.cumsum(lens)))
    # threshold-major (K, positions): numpy's argmin copies its input unless it reduces
    # over the last axis, so each column's window lies along that axis
    f = np.full((K, L + 1), INF)
    f[:, 0] = 0.0
    back = np.zeros((K, L + 1), np.intp)
    ar = np.arange(K)
    starts_l, offs_l = starts.tolist(), offs.tolist()
    p = 1
    while p <= L:
        # a block of rows [p, p_hi): its band gathered at once
        p_hi = p + 1
        while p_hi <= L and (offs_l[p_hi + 1] - offs_l[p]) * K <= block_cells:
            p_hi += 1
        lo, hi = offs_l[p], offs_l[p_hi]
        bl = lens[p:p_hi]
        pp = np.repeat(np.arange(p, p_hi), bl)
        qq = np.arange(hi - lo) - np.repeat(offs[p:p_hi] - lo, bl) + np.repeat(starts[p:p_hi], bl)
        G = np.empty((K, hi - lo))  # (K, band): each problem's grid in its columns, inf above its thresholds
        for i, pr in enumerate(problems):
            dst = G[edges[i]:edges[i + 1]]
            dst[:] = pr[0][pp, qq]
            if capped:
                np.putmask(dst, pr[1][pp, qq] > t[edges[i]:edges[i + 1], None], INF)
        for r in range(p, p_hi):
            q0, a = starts_l[r], offs_l[r] - lo
            vals = f[:, q0:r] + G[:, a:a + r - q0]  # (K, r - q0), contiguous
            j = vals.argmin(axis=1)
            # vals[ar, j] read off the flat array: one index array is about twice as quick
            f[:, r] = vals.ravel()[ar * (r - q0) + j]
            back[:, r] = j  # relative to the window's start: made absolute after the loop
        p = p_hi
    back += starts  # (K, L+1) + (L+1,): one call instead of one per position
    HT = problems[0][1] if N == 1 else np.stack([pr[1] for pr in problems])  # (N, L+1, L+1), contiguous
    hm = _path_max_h_flat(back, L, HT.reshape(-1), col * (L + 1) ** 2)
    out, lo = [], 0
    for p_ in problems:
        hi = lo + len(p_[2])
        out.append((f[lo:hi, L], hm[lo:hi], back[lo:hi]))
        lo = hi
    return out


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


def _minmax_dp_many(HTs, qmins) -> list[float]:
    """``_minmax_dp`` of several grids of one L side by side (one loop over positions for
    all).  Each row scans from the earliest start of any grid; a grid's entries before its
    own earliest start are inf (``qmin`` is the first finite column of each row), and
    max(f, inf) = inf never lowers a minimum (nor raises one that is inf anyway): the
    same max and min over the same finite values, so the same floats."""
    if len(HTs) <= 1:
        return [_minmax_dp(H, q) for H, q in zip(HTs, qmins)]
    L = HTs[0].shape[0] - 1
    H = np.stack(HTs)  # (N, L+1, L+1)
    q = np.minimum.reduce([np.asarray(x) for x in qmins]).tolist()
    f = np.full((len(HTs), L + 1), INF)
    f[:, 0] = 0.0
    for p in range(1, L + 1):
        q0 = q[p]
        f[:, p] = np.maximum(f[:, q0:p], H[:, p, q0:p]).min(axis=1)
    return [float(x) for x in f[:, L]]


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
    return best_slicings_many([grid], top, batch, method, fan)[0]


def best_slicings_many(grids, top: int = 8, batch: int = 128, method: str = "bisect", fan: int = 16):
    """``best_slicings`` of several grids (partitions of one scenario) at once, the same
    answers: each grid's search runs as before, but the threshold batches of all of
    them go through one DP pass (``_batch_dp_many``), so the loop over positions, whose
    numpy calls are what the slicing costs, runs once for all."""
    qmins = [_earliest_starts(g) for g in grids]
    t_lbs = _minmax_dp_many([g.HT for g in grids], qmins)
    gens = [_search(g, top, batch, method, fan, qm, t) for g, qm, t in zip(grids, qmins, t_lbs)]
    out: list = [None] * len(gens)
    pending = {}
    for i, gen in enumerate(gens):
        try:
            pending[i] = next(gen)
        except StopIteration as stop:
            out[i] = stop.value
    while pending:
        results = _batch_dp_many(list(pending.values()))
        nxt = {}
        for (i, _), res in zip(pending.items(), results):
            try:
                nxt[i] = gens[i].send(res)
            except StopIteration as stop:
                out[i] = stop.value
        pending = nxt
    return out


def _earliest_starts(grid: SliceGrid):
    """Earliest start per end position: slices longer than the memory allows are out
    (HT[p, q] is finite only for q < p: the first finite column of row p is its first start)."""
    finite = np.isfinite(grid.HT)
    qmin = np.where(finite.any(axis=1), np.argmax(finite, axis=1), np.arange(grid.L + 1))
    qmin[0] = 0
    return qmin


def _search(grid: SliceGrid, top: int, batch: int, method: str, fan: int, qmin=None, t_lb=None):
    """``best_slicings`` of one grid as a generator: it yields each batch of thresholds
    as (GT, HT, thresholds, earliest starts) and is sent ``_batch_dp``'s answer.
    (``qmin``, ``t_lb``: its ``_earliest_starts`` and least max h, if found already.)"""
    L, g = grid.L, grid.g
    GT, HT = grid.GT, grid.HT
    finite = np.isfinite(HT)
    if qmin is None:
        qmin = _earliest_starts(grid)
    if t_lb is None:
        t_lb = _minmax_dp(HT, qmin)
    if not np.isfinite(t_lb):
        return [], 0
    thresholds = np.sort(HT[finite & (HT >= t_lb)])
    # distinct values, as np.unique gives them (which would import numpy.ma: start-up time)
    thresholds = thresholds[np.concatenate(([True], thresholds[1:] != thresholds[:-1]))[:len(thresholds)]]
    # candidates keyed by (sum g, max h): one slicing reached from several thresholds
    # gives the same pair, so paths are rebuilt only for the final few
    found: dict[tuple[float, float], tuple[float, np.ndarray, int]] = {}

    def consider(ts):
        ts = np.asarray(ts, float)
        fL, hL, back = yield (GT, HT, ts, np.maximum(qmin, _window(HT, ts.max())))
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

    f_inf = float((yield from consider([INF]))[0])
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
            yield from consider(thresholds[i:hi])
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
            for k, f in zip(chunk, (yield from consider(thresholds[chunk]))):
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
                for k, f in zip(chunk, (yield from consider(thresholds[chunk]))):
                    F[k] = f
                best = min(v[0] for v in found.values())
            tried += len(mids)
            intervals = nxt
    ranked = sorted(found.values(), key=lambda v: v[0])[:top]
    return [(v, _path(back[k], L, g)) for v, back, k in ranked], tried


def max_slice_tokens(tables, stages, micro_batch: int) -> int:
    """Longest slice the partition's memory allows (``CostTables.max_slice_tokens``)."""
    return tables.max_slice_tokens(stages, micro_batch)
