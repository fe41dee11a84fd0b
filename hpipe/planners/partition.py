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

from hpipe.planners.common import items_arrays
from hpipe.planners.evaluate import hop_resource, makespan_from_times, split_transfer

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

    def __init__(self, tables, slices, sizes, recut: bool = True):
        self.tables = tables
        self.slices, self.sizes = list(slices), list(sizes)
        self.n, self.c, self.b = items_arrays(self.slices, self.sizes)
        self.key = ("items", tuple(self.slices), tuple(self.sizes))
        self.recut = recut
        mem_slice = tables.setup.granularity if recut else max(self.slices)
        self.mem = tables.memory_matrix(1, mem_slice, max(self.sizes))
        self.U = len(tables.units)
        self._smat: dict = {}
        self._rows: dict = {}
        self._links = None

    def stage_matrix(self, device: str):
        """(U+1, U+1): total busy time of units [k, e) on ``device`` over the items;
        inf where k >= e or the stage does not fit the device's memory."""
        ck = (self.tables.device_group[device], self.tables.capacity(device))
        if ck not in self._smat:
            P = self.tables.prefix_totals(device, self.n, self.c, self.b, self.key)
            S = P[None, :] - P[:, None]
            S[self.mem > self.tables.capacity(device)] = INF
            self._smat[ck] = S
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


    def makespan(self, part: Partition):
        """(exact makespan, slices it was scored with): the current slices if the
        partition holds them, else those cut down to its longest slice."""
        nmax = self.tables.max_slice_tokens(part.stages, max(self.sizes)) if self.recut else max(self.slices)
        if nmax >= max(self.slices):
            return table_makespan(self.tables, part.stages, self.n, self.c, self.b, self.key, self._rows), \
                tuple(self.slices)
        cut = recut_slices(self.slices, nmax, self.tables.setup.granularity)
        n, c, b = items_arrays(cut, self.sizes)
        return table_makespan(self.tables, part.stages, n, c, b, ("items", cut, tuple(self.sizes))), cut


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
    rows, delays, keys = [], [], []
    zero = np.zeros(np.shape(n))
    prev = None
    for j, (devs, s, e) in enumerate(stages):
        if prev is not None:
            pdevs, ps, pe = prev
            rk = ("link", pdevs[0], devs[0], int(tables.unit_class[pe - 1]))
            if rk not in cache:
                total = tables.transfer_times(pdevs[0], devs[0], pe, n, b, key)
                cache[rk] = split_transfer(cluster, pdevs[0], devs[0], total)
            rows.append(cache[rk][0])
            delays.append(cache[rk][1])
            keys.append(hop_resource(cluster, pdevs[0], devs[0]))
        if len(devs) == 1:
            rk = ("stage", tables.device_group[devs[0]], s, e)
            if rk not in cache:
                cache[rk] = tables.range_time(devs[0], s, e, n, c, b, key)
        else:
            rk = ("tp", tuple(devs), s, e)
            if rk not in cache:
                cache[rk] = np.broadcast_to(tables.cost.stage_compute_s(s, e, list(devs), n, c, b), np.shape(n))
        rows.append(cache[rk])
        delays.append(zero)
        keys.append(("stage", j))
        prev = (devs, s, e)
    return np.array(rows, float), np.array(delays, float), keys


def table_makespan(tables, stages, n, c, b, key=None, rows_cache=None) -> float:
    """Exact makespan (``evaluate``'s recurrence) with stage times from the tables."""
    t, d, keys = chain_rows(tables, stages, n, c, b, key, rows_cache)
    return makespan_from_times(t, keys, d)


# ---- the DPs ------------------------------------------------------------------------------
def minmax_dp(smats, links, start: float = 0.0):
    """Least bottleneck over cut sets and used subsets of a device sequence.

    ``smats[m]`` is device m's (U+1, U+1) stage-cost matrix (inf: not allowed),
    ``links[m', m]`` the (U+1,) cost of the boundary at unit k from m' to m;
    ``start`` is the value before the first stage (-inf for costs that may be
    negative).  Returns (value, [(m, start, end), ...]) or (inf, None)."""
    M = len(smats)
    U = smats[0].shape[0] - 1
    A = np.full((M, U + 1), INF)
    argk = np.zeros((M, U + 1), int)
    src = np.full((M, U + 1), -1)
    for m in range(M):
        B = np.full(U + 1, INF)
        B[0] = start
        if m > 0:
            X = np.maximum(A[:m], links[:m, m])
            B[1:] = X[:, 1:].min(axis=0)
            src[m, 1:] = X[:, 1:].argmin(axis=0)
        cand = np.maximum(B[:, None], smats[m])
        argk[m] = cand.argmin(axis=0)
        A[m] = cand[argk[m], np.arange(U + 1)]
    m = int(A[:, U].argmin())
    val = float(A[m, U])
    if not np.isfinite(val):
        return INF, None
    return val, _backtrack(m, U, argk, src)


def minsum_dp(smats, links, caps):
    """For each cap T: the least total (stage totals + link totals) over partitions
    whose every stage and link costs at most T.  Returns [(value, stages or None)]."""
    caps = np.asarray(caps, float)
    E = len(caps)
    M = len(smats)
    U = smats[0].shape[0] - 1
    A = np.full((E, M, U + 1), INF)
    argk = np.zeros((E, M, U + 1), int)
    src = np.full((E, M, U + 1), -1)
    for m in range(M):
        B = np.full((E, U + 1), INF)
        B[:, 0] = 0.0
        if m > 0:
            L = links[:m, m][None]  # (1, m, U+1)
            X = np.where(L <= caps[:, None, None], A[:, :m] + L, INF)
            B[:, 1:] = X[:, :, 1:].min(axis=1)
            src[:, m, 1:] = X[:, :, 1:].argmin(axis=1)
        S = smats[m][None]
        cand = np.where(S <= caps[:, None, None], B[:, :, None] + S, INF)
        argk[:, m] = cand.argmin(axis=1)
        A[:, m] = np.take_along_axis(cand, argk[:, m][:, None, :], axis=1)[:, 0]
    out = []
    for i in range(E):
        m = int(A[i, :, U].argmin())
        val = float(A[i, m, U])
        out.append((val, _backtrack(m, U, argk[i], src[i]) if np.isfinite(val) else None))
    return out


def _backtrack(m, e, argk, src):
    stages = []
    while True:
        k = int(argk[m, e])
        stages.append((m, k, e))
        if k == 0:
            break
        m, e = int(src[m, k]), k
    return stages[::-1]


def sequence_problem(pc: PartitionCosts, seq):
    smats = [pc.stage_matrix(d) for d in seq]
    return smats, pc.link_stack(seq)


def to_partition(seq, stages) -> Partition:
    return Partition(tuple(((seq[m],), s, e) for m, s, e in stages))


# ---- the search over orders ---------------------------------------------------------------
EPSILONS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 1.0, 2.5, INF)
"""Caps B*(1+eps) of the min-sum DP: from the least bottleneck (deep pipelines) up
to no cap at all (the least total work: few, fast devices, no pipeline to fill)."""


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
    for seq in sequences:
        smats, links = sequence_problem(pc, seq)
        val, stages = minmax_dp(smats, links)
        if stages is not None:
            part = to_partition(seq, stages)
            if part not in cands:
                cands[part] = pc.makespan(part)
            probs.append((cands[part][0], val, seq, smats, links))
    if not probs:
        return []
    # Orders rank by the exact makespan of their bottleneck-optimal partition: the
    # bottleneck alone hardly tells orders apart when links are not the bottleneck,
    # while fill and drain (which devices come first and last) do.
    probs.sort(key=lambda p: p[0])
    if ranked_sequences is not None:
        ranked_sequences[:] = [p[2] for p in probs]
    best_b = min(p[1] for p in probs)
    for _, val, seq, smats, links in probs[:refine]:
        if val > best_b * (1 + keep):
            continue
        for _, st in minsum_dp(smats, links, [val * (1 + e) if math.isfinite(e) else INF for e in epsilons]):
            if st is not None:
                part = to_partition(seq, st)
                if part not in cands:
                    cands[part] = pc.makespan(part)
    ranked = sorted(cands.items(), key=lambda kv: kv[1][0])
    return [(v, p, sl) for p, (v, sl) in ranked[:top]]
