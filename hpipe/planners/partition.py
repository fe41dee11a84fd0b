"""Algorithm 1, extended: layer-level units over an ordered, partly used set of devices.

HPipe's workload distribution is a dynamic program over (units covered,
devices used) minimising the bottleneck stage.  hpipe keeps that DP and adds
what the paper leaves out:

* **Memory caps.**  A stage [k, e) may go to a device only when its weights,
  the KV cache of its attention units for the whole batch and sequence, and
  the workspace of the largest slice fit (``CostTables.memory_matrix``, the
  arithmetic of ``memory.stage_memory_bytes``).
* **Unused devices.**  Any device of the sequence may be skipped, so the DP
  picks the subset as well as the cuts.
* **Links as stages.**  Each boundary's transfers occupy the link between the
  two devices; a link's total time competes for the bottleneck like a stage's.
* **Device order.**  ``device_sequences`` lists the orders worth trying: every
  order of hosts (for up to five hosts), inside a host every order of its device
  types where few, fastest-first otherwise; devices of one host stay together,
  so each slow inter-host link is crossed at most once.

For a fixed work-item list (slices x micro-batches), a stage's cost is its busy
time over all items; the DP value is the least possible bottleneck
``B* = min max(stage totals, link totals)``.  Among partitions whose every
stage and link stays within ``B* (1 + eps)``, ``minsum_dp`` finds the one with
the least total busy time (fewer, faster devices, fewer transfers: less
pipeline fill and drain).  The candidates of a few ``eps`` are then compared by
exact makespan (``evaluate``), which is what decides.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from hpipe.costmodels import split_transfer
from hpipe.planners.common import items_arrays
from hpipe.planners.evaluate import chain_completion, makespan_from_times, shares_resources

INF = math.inf


@dataclass(frozen=True)
class Partition:
    """Stages as (devices, start, end), in pipeline order."""

    stages: tuple[tuple[tuple[str, ...], int, int], ...]

    @property
    def devices(self) -> list[str]:
        return [d for devs, _, _ in self.stages for d in devs]


# ---- device orders -----------------------------------------------------------------------
def device_sequences(tables, max_sequences: int = 256, max_host_perms: int = 120,
                     max_free_orders: int = 24) -> list[tuple[str, ...]]:
    """Orders of all devices to run the DP on (the DP itself picks which to use).

    Devices of one *kind* (same host, same cost-table group, same memory) are
    interchangeable, so only orders of kinds matter.  When those number at most
    ``max_free_orders`` (small clusters), every one is tried, hosts interleaved
    too: with little work to pipeline, memory can make a detour across a slow link
    the best choice.  Otherwise hosts stay contiguous.  Hosts: every order when there are at most five
    (120 orders), otherwise fastest-first and slowest-first by aggregate speed.
    Inside a host, devices of one type (same cost-table group and memory) stay
    together; the order of the types is exhaustive when the product over hosts stays
    within ``max_sequences``, fastest-first (and its reverse) otherwise."""
    cluster = tables.setup.cluster
    hosts = cluster.hosts
    speed = {d: tables.speed_key(d) for d in cluster.device_ids}

    def type_groups(ids):
        groups: dict = {}
        for d in ids:
            groups.setdefault((tables.device_group[d], tables.capacity(d)), []).append(d)
        return sorted(groups.values(), key=lambda g: speed[g[0]])  # fastest first

    host_groups = {h: type_groups(ids) for h, ids in hosts.items()}
    kinds = [g for gs in host_groups.values() for g in gs]
    n_free = math.factorial(len(cluster.device_ids)) // math.prod(math.factorial(len(g)) for g in kinds)
    if n_free <= max_free_orders:
        return _multiset_orders(kinds)
    names = list(hosts)
    if math.factorial(len(names)) <= max_host_perms:
        host_orders = list(itertools.permutations(names))
    else:
        agg = {h: sum(1.0 / speed[d] for d in hosts[h]) for h in names}
        fast = tuple(sorted(names, key=lambda h: -agg[h]))
        host_orders = [fast, fast[::-1]]

    def inner_orders(h, exhaustive):
        gs = host_groups[h]
        if exhaustive:
            return [tuple(d for g in perm for d in g) for perm in itertools.permutations(gs)]
        fast = tuple(d for g in gs for d in g)
        return [fast] if len(gs) == 1 else [fast, tuple(d for g in gs[::-1] for d in g)]

    n_inner = math.prod(math.factorial(len(g)) for g in host_groups.values())
    exhaustive = len(host_orders) * n_inner <= max_sequences
    inner = {h: inner_orders(h, exhaustive) for h in names}
    out = []
    for ho in host_orders:
        for combo in itertools.product(*(inner[h] for h in ho)):
            out.append(tuple(d for part in combo for d in part))
    return out


def _multiset_orders(kinds):
    """Every distinct order of the devices when devices of one kind are alike."""
    counts = [len(k) for k in kinds]
    out = []

    def rec(prefix, left):
        if not any(left):
            used = [0] * len(kinds)
            seq = []
            for k in prefix:
                seq.append(kinds[k][used[k]])
                used[k] += 1
            out.append(tuple(seq))
            return
        for k, n in enumerate(left):
            if n:
                left[k] -= 1
                prefix.append(k)
                rec(prefix, left)
                prefix.pop()
                left[k] += 1

    rec([], counts)
    return out


# ---- the DP tables for one work-item list -----------------------------------------------
class PartitionCosts:
    """Stage and link totals over the work items of one slicing, with memory masks.

    With ``recut`` (the hpipe planner), memory is checked for the shortest slices
    (one granule): a partition that holds more than the current slices allow is
    still a candidate, scored with its longer slices cut down to what it can hold,
    so the slicing step can take it from there.  Without (a fixed slicing), memory
    is checked for the slices as they are."""

    def __init__(self, tables, slices, sizes, recut: bool = True, tp: bool = True):
        self.tables = tables
        self.tp = tp
        """Whether stages may be tensor-parallel groups (``sequence_problem``)."""
        self.slices, self.sizes = list(slices), list(sizes)
        self.n, self.c, self.b = items_arrays(self.slices, self.sizes)
        self.key = ("items", tuple(self.slices), tuple(self.sizes))
        self.recut = recut
        self.mem_slice = tables.setup.granularity if recut else max(self.slices)
        self.mem = tables.memory_matrix(1, self.mem_slice, max(self.sizes))
        self.U = len(tables.units)
        self._smat: dict = {}
        self._times: dict = {}
        self._links = None

    def stage_matrix(self, device: str, tp: int = 1, strict: bool = False):
        """(U+1, U+1): total busy time of units [k, e) over the items on ``device``
        (``tp`` 1) or on a tensor-parallel group of ``tp`` devices of its kind; inf where
        k >= e or the stage does not fit the device's memory (with ``strict``, at the
        current slices as they are, not cut down)."""
        mem_slice = max(self.slices) if strict else self.mem_slice
        # A device's group stands for it alone; a TP group's cost also depends on its host's
        # links (scatter, all-reduce), so groups are keyed by kind, which names the host: two
        # hosts of one GPU with different intra-host links once shared one TP matrix.
        who = self.tables.device_group[device] if tp == 1 else ("kind", self.tables.kind[device])
        ck = (who, self.tables.capacity(device), tp, mem_slice)
        if ck not in self._smat:
            tk = (who, tp)
            if tk not in self._times:
                if tp == 1:
                    P = self.tables.prefix_totals(device, self.n, self.c, self.b, self.key)
                    S = P[None, :] - P[:, None]
                else:
                    devs = self.tables.group_of(device, tp)
                    P = self.tables.group_prefix_totals(devs, self.n, self.c, self.b, self.key)
                    S = P[None, :] - P[:, None] + \
                        self.tables.scatter_totals(devs, self.n, self.b, self.key)[:, None]
                ovh = self.tables.cost.stage_overhead_s(self.tables.group_of(device, tp))
                if ovh:
                    S = S + ovh * len(self.n)
                S[self.tables.lower_triangle] = INF
                self._times[tk] = S
            mem = self.tables.memory_matrix(tp, mem_slice, max(self.sizes))
            self._smat[ck] = np.where(mem > self.tables.capacity(device), INF, self._times[tk])
        return self._smat[ck]

    def link_totals(self, src: str, dst: str):
        """(U+1,): total transfer time across a boundary at unit k from src to dst."""
        return self.tables.transfer_totals(src, dst, self.n, self.b, self.key)

    def link_stack(self, seq):
        """(M, M, U+1): link totals from seq[m'] to seq[m] (diagonal: zero)."""
        if self._links is None:
            ids = self.tables.devices
            self._index = {d: i for i, d in enumerate(ids)}
            self._links = np.zeros((len(ids), len(ids), self.U + 1))
            for i, a in enumerate(ids):
                for j, d in enumerate(ids):
                    if i != j:
                        self._links[i, j] = self.link_totals(a, d)
        idx = np.array([self._index[d] for d in seq])
        return self._links[np.ix_(idx, idx)]


    def needs_recut(self, part: Partition) -> bool:
        """Whether the partition cannot hold the current slices as they are."""
        return self.recut and self.tables.max_slice_tokens(part.stages, max(self.sizes)) < max(self.slices)

    def items_for(self, part: Partition):
        """(slices, n, c, b, cache key) a partition is scored with: the current slices if it
        holds them, else those cut down to its longest slice."""
        nmax = self.tables.max_slice_tokens(part.stages, max(self.sizes)) if self.recut else max(self.slices)
        if nmax >= max(self.slices):
            return tuple(self.slices), self.n, self.c, self.b, self.key
        sl = recut_slices(self.slices, nmax, self.tables.setup.granularity)
        n, c, b = items_arrays(sl, self.sizes)
        return sl, n, c, b, ("items", sl, tuple(self.sizes))

    def makespan(self, part: Partition, bound_only: bool = False):
        """(exact makespan, slices it was scored with): the current slices if the
        partition holds them, else those cut down to its longest slice.  With
        ``bound_only``, a partition whose hops share a link gets the recurrence without
        that contention instead (a lower bound, cheap), and a third element says whether
        the value is exact."""
        sl, n, c, b, key = self.items_for(part)
        t, d, keys = chain_rows(self.tables, part.stages, n, c, b, key, self.tables.rows_cache(key))
        if not bound_only:
            return makespan_from_times(t, keys, d), sl
        if shares_resources(keys):
            return float(chain_completion(t, d)[-1, -1]), sl, False
        return makespan_from_times(t, None, d), sl, True


    def bounds(self, parts) -> list[tuple]:
        """``makespan(part, bound_only=True)`` of many partitions at once: those whose
        chains have the same shape are scanned together (``batch_completion``), which is
        what the search spends its time on otherwise (numpy's per-call overhead)."""
        out: list = [None] * len(parts)
        groups: dict = {}
        for i, part in enumerate(parts):
            sl, n, c, b, key = self.items_for(part)
            t, d, keys = chain_rows(self.tables, part.stages, n, c, b, key, self.tables.rows_cache(key))
            exact = not shares_resources(keys)
            groups.setdefault(t.shape, []).append((i, t, d, sl, exact))
        for members in groups.values():
            C = batch_completion(np.stack([m[1] for m in members]), np.stack([m[2] for m in members]))
            for (i, _, _, sl, exact), v in zip(members, C.tolist()):
                out[i] = (v, sl, exact)
        return out


def batch_completion(t, d) -> np.ndarray:
    """(N,): the last completion time of N chains of one shape (N, positions, items),
    each position a resource of its own: ``evaluate.chain_completion``'s scan, the same
    arithmetic, on all chains at once."""
    N, P, I = t.shape
    arrive = np.zeros((N, I))
    zero = np.zeros((N, 1))
    C = arrive
    for p in range(P):
        s = np.cumsum(t[:, p], axis=1)
        prev = np.concatenate((zero, s[:, :-1]), axis=1)
        C = s + np.maximum.accumulate(np.maximum(arrive, 0.0) - prev, axis=1)
        arrive = C + d[:, p]
    return C[:, -1] if I else np.zeros(N)


def recut_slices(slices, max_tokens: int, granularity: int) -> tuple[int, ...]:
    """Each slice longer than ``max_tokens`` split into the fewest near-equal pieces
    (multiples of the granularity) that are not."""
    out = []
    for s in slices:
        if s <= max_tokens:
            out.append(int(s))
            continue
        k = -(-s // max_tokens)
        q, r = divmod(s // granularity, k)
        out += [(q + (1 if i < r else 0)) * granularity for i in range(k)]
    return tuple(out)


def chain_rows(tables, stages, n, c, b, key=None, rows_cache=None):
    """Hold times, delays and resources of ``stages`` over the items, as
    ``evaluate.chain_times`` (single-device stages from the tables, tensor-parallel
    ones from the cost model itself).  ``rows_cache`` (a dict, for one item list)
    remembers rows between candidates."""
    cache = rows_cache if rows_cache is not None else {}
    cluster = tables.setup.cluster
    unit_class = tables.unit_class_list
    groups = tables.device_group
    rows, delays, keys = [], [], []
    zero = cache.get("zero")
    if zero is None:
        zero = cache["zero"] = np.zeros(np.shape(n))
    prev = None
    for j, (devs, s, e) in enumerate(stages):
        if prev is not None:
            pdevs, ps, pe = prev
            rk = ("link", pdevs[0], devs[0], unit_class[pe - 1])
            hit = cache.get(rk)
            if hit is None:
                total = tables.transfer_times(pdevs[0], devs[0], pe, n, b, key)
                hit = cache[rk] = split_transfer(cluster, pdevs[0], devs[0], total)
            rows.append(hit[0])
            delays.append(hit[1])
            keys.append(tables.hop_resource(pdevs[0], devs[0]))
        # a group's rows depend on its kind (its host's links), not only its device type
        rk = ("stage", groups[devs[0]], s, e) if len(devs) == 1 else ("tp", tables.canonical_group(devs), s, e)
        hit = cache.get(rk)
        if hit is None:
            hit = cache[rk] = tables.stage_time(devs, s, e, n, c, b, key)
        rows.append(hit)
        delays.append(zero)
        keys.append(("stage", j))
        prev = (devs, s, e)
    return np.array(rows, float), np.array(delays, float), keys


def table_makespan(tables, stages, n, c, b, key=None, rows_cache=None) -> float:
    """Exact makespan (``evaluate``'s recurrence) with stage times from the tables."""
    t, d, keys = chain_rows(tables, stages, n, c, b, key, rows_cache)
    return makespan_from_times(t, keys, d)


# ---- the DPs ------------------------------------------------------------------------------
# A device sequence has M positions.  A stage is a run of positions m-t+1..m: one device
# (t = 1) or a tensor-parallel group of t devices of one kind (``groups``).  ``smats[m]``
# maps each degree t allowed to end at position m to its (U+1, U+1) cost matrix (inf: not
# allowed); a bare matrix means t = 1 only.  ``links[m', m]`` is the (U+1,) cost of the
# boundary at unit k from the stage ending at position m' to the stage starting at m
# (devices of one kind are interchangeable, so the link from a group's last device costs
# what the link from its first does).  Stages come back as (positions, start, end).

def _degrees(smats):
    return [x if isinstance(x, dict) else {1: x} for x in smats]


def minmax_dp(smats, links, start: float = 0.0):
    """Least bottleneck over cut sets, used subsets and groupings of a device sequence.

    ``start`` is the value before the first stage (-inf for costs that may be
    negative).  Returns (value, [(positions, start, end), ...]) or (inf, None)."""
    return minmax_dp_many([(smats, links)], start)[0]


def minmax_dp_many(problems, start: float = 0.0, prefixes=None) -> list:
    """``minmax_dp`` of several (smats, links) of one shape (device orders of one cluster),
    run side by side (``_dp_many``); the same answers."""
    return [(v, st) if st is not None else (INF, None)
            for ((v, st),) in _dp_many(problems, [[INF]] * len(problems), np.maximum, start, prefixes=prefixes)]


def minsum_dp(smats, links, caps, block_width: int = 40):
    """For each cap T: the least total (stage totals + link totals) over partitions
    whose every stage and link costs at most T.  Returns [(value, stages or None)].
    (``block_width``: end units per block of ``_dp_many``; the answer does not
    depend on it.)"""
    return _dp_many([(smats, links)], [caps], np.add, 0.0, block_width)[0]


def minsum_dp_many(problems, caps_list, block_width: int = 40, prefixes=None) -> list:
    """``minsum_dp`` of several (smats, links) of one shape, each with its caps (as many
    for each), run side by side (``_dp_many``); the same answers."""
    return _dp_many(problems, caps_list, np.add, 0.0, block_width, prefixes=prefixes)


def path_max_cost(smats, links, stages) -> float:
    """The largest stage or link cost along ``stages`` ((positions, start, end), as the DPs
    return them): the least cap under which the min-sum DP still admits every one of them."""
    smats = _degrees(smats)
    z, prev = -INF, None
    for pos, s, e in stages:
        z = max(z, float(smats[pos[-1]][len(pos)][s, e]))
        if prev is not None:
            z = max(z, float(links[prev, pos[0], s]))
        prev = pos[-1]
    return z


def minsum_dp_reusing(problems, caps_list, uncapped=None, block_width: int = 40) -> list:
    """``minsum_dp_many``'s answers, exactly, without running the DP for the caps that
    cannot change the uncapped answer.  ``uncapped`` (each problem's ``(value, stages)``
    with no cap; found here if not given); each caps list ascending.

    Why it is exact: let P be the uncapped answer and Z the largest stage or link cost on
    it (``path_max_cost``).  A cap T >= Z admits every stage and link of P.  Capping only
    turns candidates into inf, so every DP cell's capped value is >= its uncapped value;
    along P, by induction from its first stage, each cell's capped value is <= what P's
    prefix costs (all of P's terms are admitted and summed in the same order), which is
    the uncapped value: equal.  Ties go to the first minimum (k, degree t, source
    position, last position): an index before P's with capped value <= the minimum would
    have uncapped value <= it too, hence equal, and the uncapped DP would have taken that
    earlier index instead.  So at every cell on P the capped DP picks P's own choice, and
    its answer is P, value and stages alike.  If nothing fits uncapped, nothing fits
    under any cap.  Caps below Z are run (``minsum_dp_many``), the same count for all
    problems (the most any needs), so they still run side by side."""
    if not problems:
        return []
    if uncapped is None:
        uncapped = [r[0] for r in minsum_dp_many(problems, [[INF]] * len(problems), block_width)]
    need = []
    for (smats, links), caps, (_, st) in zip(problems, caps_list, uncapped):
        assert list(caps) == sorted(caps), "caps ascending"
        z = path_max_cost(smats, links, st) if st is not None else -INF
        need.append(sum(1 for c in caps if c < z))
    E = max(need)
    run = minsum_dp_many(problems, [list(c)[:E] for c in caps_list], block_width) if E else [[] for _ in problems]
    return [r + [u] * (len(c) - E) for r, u, c in zip(run, uncapped, caps_list)]


def _dp_many(problems, caps_list, op, start, block_width: int = 40, max_cells: int = 1 << 19,
             max_side_by_side: int = 1 << 16, prefixes=None) -> list:
    """The DP behind ``minmax_dp`` (``op`` max, caps inf) and ``minsum_dp`` (``op`` add) for
    several problems (smats, links) with as many positions and units, each with its caps
    (E of them for all): for each problem, [(value, stages or None)] per cap.

    A stage [k, e) of degree t ending at position m costs op(best value up to k, S[k, e]),
    S above the cap counting as inf; the value at (m, e) is the least over k and t, the
    first k and the first t (in ascending order) on ties.  What numpy costs here is calls,
    not arithmetic, for small models (orders run side by side: one call for all) and
    memory traffic for large ones (each S read as column blocks, transposed so that the
    argmin reduces over the last axis -- numpy's argmin copies its input otherwise --
    contiguous, and only up to the last row finite in the block: stages end after they
    start, so half of S is inf).  Rows left out are inf in every S, so inf in every
    candidate, and the first minimum and its value are what the whole of S gives (all
    inf: argmin 0 either way).  Problems run side by side only when each position's
    degrees are in ascending order in every problem (the order ties are broken in), and
    only while one problem's candidates (E (U+1)^2) number at most ``max_side_by_side``
    (beyond that the arithmetic, not the calls, is what costs, and stacking the capped
    matrices of the problems would add to it); groups are sized to about ``max_cells``
    candidate values.

    ``prefixes`` (optional, one sequence per problem: its device order) says which
    problems agree up to a position: where two have equal ``prefix[:m + 1]`` their stage
    matrices and links up to position m are the same (``sequence_problem`` builds them
    from the order's prefix alone), so with equal caps every DP cell up to m is too.
    Position m is then computed for the first of them only and copied to the others:
    the 15 orders of the paper testbed have 54 distinct prefixes among their 90."""
    if not problems:
        return []
    smats_l = [_degrees(p[0]) for p in problems]
    E = len(caps_list[0])
    assert all(len(c) == E for c in caps_list), "problems run side by side need as many caps"
    U1 = next(iter(smats_l[0][0].values())).shape[0]
    ascending = all(list(d) == sorted(d) for sm in smats_l for d in sm)
    cells = E * U1 * U1
    per = max(1, max_cells // cells) if ascending and cells <= max_side_by_side else 1
    out: list = []
    for lo in range(0, len(problems), per):
        out += _dp_chunk(smats_l[lo:lo + per], [p[1] for p in problems[lo:lo + per]],
                         np.array(caps_list[lo:lo + per], float), op, start, block_width,
                         None if prefixes is None else prefixes[lo:lo + per])
    return out


def _dp_chunk(smats_l, links_l, caps, op, start, width, prefixes=None):
    """``_dp_many`` of one group: N problems side by side, caps (N, E)."""
    N, E = caps.shape
    # A stage cost equal to the cap can come out of the prefix differences an ulp above it:
    # it still fits (the bottleneck DP's own stage, capped at its own value).
    caps = caps * (1 + 1e-12)
    M = len(smats_l[0])
    U = next(iter(smats_l[0][0].values())).shape[0] - 1
    U1 = U + 1
    links = np.stack(links_l)  # (N, M, M, U+1)
    A = np.full((N, E, M, U1), INF)
    argk = np.zeros((N, E, M, U1), int)
    argt = np.ones((N, E, M, U1), int)
    src = np.full((N, E, M, U1), -1)
    uncapped = bool(np.all(caps == INF))  # S <= inf everywhere (S is never nan)
    # column blocks of S, k up to the last row finite in any S of the group
    distinct = {id(S): S for sm in smats_l for d in sm for S in d.values()}
    last = np.full(U1, -1)
    for S in distinct.values():
        fin = np.isfinite(S)
        last = np.maximum(last, np.where(fin.any(axis=0), U1 - 1 - np.argmax(fin[::-1], axis=0), -1))
    bounds = np.linspace(0, U1, max(1, U1 // width) + 1).round().astype(int).tolist()
    blocks = [(e0, e1, max(int(last[e0:e1].max()) + 1, 1)) for e0, e1 in zip(bounds, bounds[1:])]
    blocked: dict = {}  # (id(S), caps, block) -> (E or 1, e, k) contiguous
    buf = np.empty(N * E * max(e1 - e0 for e0, e1, _ in blocks) * U1)

    def block_of(S, cap_row, b):
        key = (id(S), None if uncapped else cap_row.tobytes(), b)
        if key not in blocked:
            e0, e1, ke = blocks[b]
            ST = np.ascontiguousarray(S[:ke, e0:e1].T)[None]  # (1, e, k); strided operands are slow
            X = ST if uncapped else np.where(ST <= cap_row[:, None, None], ST, INF)
            fin = np.isfinite(X).any(axis=(0, 1))
            blocked[key] = X, (int(fin.argmax()) if fin.any() else ke)  # and its first row with a finite entry
        return blocked[key]

    # Rows before the first finite one of every block a candidate array reads are inf (over
    # the cap, or the stage does not fit), so their candidates op(B, inf) are inf: leaving
    # them out changes no finite minimum nor its first position (shifted back by the rows
    # left out), and a cell whose candidates are all inf is not taken (v < A fails) whatever
    # position its argmin names.  op(B, inf) is inf for max always, for + unless B = -inf,
    # which only a start of -inf makes.
    trim = op is np.maximum or start > -INF

    cap_rows = [c.tobytes() for c in caps]
    for m in range(M):
        live = range(N)
        if prefixes is not None:  # the first problem of each (prefix up to m, caps) computes it
            first: dict = {}
            rep = [first.setdefault((tuple(prefixes[i][:m + 1]), cap_rows[i]), i) for i in range(N)]
            live = [i for i in range(N) if rep[i] == i]
        for t in sorted({t for i in live for t in smats_l[i][m]}):
            sel = [i for i in live if t in smats_l[i][m]]
            ns = len(sel)
            ix = slice(None) if ns == N else np.array(sel)
            f = m - t + 1
            B = np.full((ns, E, U1), INF)
            B[:, :, 0] = start
            sb = np.full((ns, E, U1), -1)
            if f > 0:
                L = links[ix, :f, f][:, None]  # (ns, 1, f, U+1)
                X = op(A[ix, :, :f], L)
                if not uncapped:
                    X = np.where(L <= caps[ix][:, :, None, None], X, INF)
                B[:, :, 1:] = X[..., 1:].min(axis=2)
                sb[:, :, 1:] = X[..., 1:].argmin(axis=2)
            Ss = [smats_l[i][m][t] for i in sel]
            # uncapped, the problems that share a matrix (devices of one kind at m) read it
            # once, broadcast; capped, each its own (its caps), stacked
            if uncapped:
                groups: dict = {}
                for j, S in enumerate(Ss):
                    groups.setdefault(id(S), (S, []))[1].append(j)
                parts = [(S, js if len(js) < ns else slice(None)) for S, js in groups.values()]
            else:
                parts = [(None, slice(None))]
            k = np.empty((ns, E, U1), np.intp)
            v = np.empty((ns, E, U1))
            for S, js in parts:
                Bj = B[js]
                nj = Bj.shape[0]
                for b, (e0, e1, ke) in enumerate(blocks):
                    mats = [block_of(S, None, b)] if S is not None else \
                        [block_of(S_, caps[i], b) for S_, i in zip(Ss, sel)]  # inf where over the cap
                    k0 = min(min(x[1] for x in mats), ke - 1) if trim else 0
                    w = ke - k0
                    # candidates written into one reused buffer (contiguous): a fresh array
                    # per block costs its page faults, and the capped matrices are not stacked
                    cand = buf[:nj * E * (e1 - e0) * w].reshape(nj, E, e1 - e0, w)  # (n, E, e, k - k0)
                    if S is not None:
                        op(Bj[:, :, None, k0:ke], mats[0][0][None, ..., k0:], out=cand)
                    else:
                        for j, (X, _) in enumerate(mats):
                            op(Bj[j, :, None, k0:ke], X[..., k0:], out=cand[j])
                    kb = cand.argmin(axis=3)
                    # the minima read off the flat array (one index array: quicker than two)
                    vb = cand.reshape(-1)[np.arange(0, kb.size * w, w) + kb.ravel()].reshape(kb.shape)
                    kb += k0
                    if isinstance(js, slice):
                        k[:, :, e0:e1] = kb
                        v[:, :, e0:e1] = vb
                    else:
                        k[js, :, e0:e1] = kb
                        v[js, :, e0:e1] = vb
            Am = A[ix, :, m]
            better = v < Am
            A[ix, :, m] = np.where(better, v, Am)
            argk[ix, :, m] = np.where(better, k, argk[ix, :, m])
            argt[ix, :, m] = np.where(better, t, argt[ix, :, m])
            # sb's entry at k along its last axis (take_along_axis), read off the flat array
            src_k = sb.reshape(-1)[(np.arange(0, sb.size, U1).reshape(ns, E, 1) + k).reshape(-1)].reshape(k.shape)
            src[ix, :, m] = np.where(better, src_k, src[ix, :, m])
        if len(live) < N:
            dup = [i for i in range(N) if rep[i] != i]
            of = [rep[i] for i in dup]
            for X in (A, argk, argt, src):
                X[dup, :, m] = X[of, :, m]
    out = []
    for n in range(N):
        res = []
        for e in range(E):
            mm = int(A[n, e, :, U].argmin())
            val = float(A[n, e, mm, U])
            res.append((val, _backtrack(mm, U, argk[n, e], argt[n, e], src[n, e]) if np.isfinite(val) else None))
        out.append(res)
    return out


def _backtrack(m, e, argk, argt, src):
    stages = []
    while True:
        k, t = int(argk[m, e]), int(argt[m, e])
        stages.append((tuple(range(m - t + 1, m + 1)), k, e))
        if k == 0:
            break
        m, e = int(src[m, e]), k
    return stages[::-1]


def sequence_problem(pc: PartitionCosts, seq, strict: bool = False):
    """Stage matrices per position and degree, and the link stack, of one device order.
    A group of degree t may end at position m when the t positions up to m are devices
    of one kind (``groups.device_kind``) and t splits the model evenly."""
    tables = pc.tables
    kinds = [tables.kind[d] for d in seq]
    smats = []
    run = 0
    for m, d in enumerate(seq):
        run = run + 1 if m and kinds[m] == kinds[m - 1] else 1
        opts = {1: pc.stage_matrix(d, 1, strict)}
        if pc.tp:
            for t in tables.tp_degrees:
                if t <= run:
                    opts[t] = pc.stage_matrix(d, t, strict)
        smats.append(opts)
    return smats, pc.link_stack(seq)


def to_partition(seq, stages) -> Partition:
    return Partition(tuple((tuple(seq[m] for m in pos), s, e) for pos, s, e in stages))


# ---- the search over orders ---------------------------------------------------------------
EPSILONS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 1.0, 2.5, INF)
"""Caps B*(1+eps) of the min-sum DP: from the least bottleneck (deep pipelines) up
to no cap at all (the least total work: few, fast devices, no pipeline to fill)."""


def _score_new(pc: PartitionCosts, cands: dict) -> None:
    """Lower-bound makespans (exact unless hops share a link) for the candidates not yet scored."""
    new = [p for p, v in cands.items() if v is None]
    for p, v in zip(new, pc.bounds(new)):
        cands[p] = v


def search(pc: PartitionCosts, sequences, epsilons=EPSILONS, keep: float = 0.1, refine: int = 6, top: int = 4,
           ranked_sequences: list | None = None):
    """Best partitions over the given device sequences, by exact makespan.

    Every sequence gets the bottleneck DP and its partition an exact evaluation;
    the ``refine`` sequences whose partitions score best (among those within
    ``keep`` of the least bottleneck) also get the min-sum DP at caps B*(1+eps).
    Returns up to ``top`` distinct (makespan, Partition, slices scored with)
    triples, best first (empty: nothing fits).  ``ranked_sequences``, if a list,
    receives the feasible sequences, best first."""
    probs = []
    cands: dict[Partition, tuple] = {}
    problems = [sequence_problem(pc, seq) for seq in sequences]
    for seq, (smats, links), (val, stages) in zip(sequences, problems, minmax_dp_many(problems, prefixes=sequences)):
        if stages is not None:
            part = to_partition(seq, stages)
            cands.setdefault(part, None)
            probs.append((part, val, seq, smats, links))
    if not probs:
        return []
    _score_new(pc, cands)
    probs = [(cands[p][0], val, seq, smats, links) for p, val, seq, smats, links in probs]
    # Orders rank by the exact makespan of their bottleneck-optimal partition: the
    # bottleneck alone hardly tells orders apart when links are not the bottleneck,
    # while fill and drain (which devices come first and last) do.
    probs.sort(key=lambda p: p[0])
    if ranked_sequences is not None:
        ranked_sequences[:] = [p[2] for p in probs]
    best_b = min(p[1] for p in probs)
    strict = pc.recut and max(pc.slices) > pc.mem_slice
    caps_of = [[INF] if rank >= refine or val > best_b * (1 + keep) else
               [val * (1 + e) if math.isfinite(e) else INF for e in epsilons]
               for rank, (_, val, _, _, _) in enumerate(probs)]
    # the min-sum DPs of all orders side by side: every order uncapped, then the refined
    # orders at those of their caps that can change that answer (``minsum_dp_reusing``: the
    # same answers as running every cap)
    founds = minsum_dp_many([p[3:5] for p in probs], [[INF]] * len(probs), prefixes=[p[2] for p in probs])
    refined = [i for i, c in enumerate(caps_of) if len(c) > 1]
    for i, r in zip(refined, minsum_dp_reusing([probs[i][3:5] for i in refined], [caps_of[i] for i in refined],
                                               [founds[i][0] for i in refined])):
        founds[i] = r
    for rank, (_, val, seq, smats, links) in enumerate(probs):
        # the refined orders get caps B*(1+eps); the rest the uncapped min-sum only (the least
        # total work: what wins when there are too few items to pipeline, whatever the bottleneck)
        caps = caps_of[rank]
        found = founds[rank]
        if strict and any(st is not None and pc.needs_recut(to_partition(seq, st)) for _, st in found):
            # also among the partitions that hold the current slices as they are: the
            # cheapest partition overall may need its slices cut, and lose by it
            found += minsum_dp(sequence_problem(pc, seq, strict=True)[0], links, caps)
        for _, st in found:
            if st is not None:
                cands.setdefault(to_partition(seq, st), None)
    _score_new(pc, cands)
    # Partitions whose hops share a link (a pipeline that crosses between hosts twice) are
    # scored exactly (an event loop, slow) only when their bound could reach the top.
    while True:
        ranked = sorted(cands.items(), key=lambda kv: kv[1][0])[:top]
        loose = [p for p, v in ranked if not v[2]]
        if not loose:
            break
        for p in loose:
            v, sl = pc.makespan(p)
            cands[p] = (v, sl, True)
    return [(v, p, sl) for p, (v, sl, _) in ranked]
