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

from hpipe.planners.evaluate import link_key, makespan_from_times

INF = math.inf


@dataclass(frozen=True)
class Partition:
    """Stages as (devices, start, end), in pipeline order."""

    stages: tuple[tuple[tuple[str, ...], int, int], ...]

    @property
    def devices(self) -> list[str]:
        return [d for devs, _, _ in self.stages for d in devs]


# ---- device orders -----------------------------------------------------------------------
def device_sequences(tables, max_sequences: int = 256, max_host_perms: int = 120) -> list[tuple[str, ...]]:
    """Orders of all devices to run the DP on (the DP itself picks which to use).

    Hosts stay contiguous.  Hosts: every order when there are at most five
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


# ---- the DP tables for one work-item list -----------------------------------------------
class PartitionCosts:
    """Stage and link totals over one list of work items, with memory masks."""

    def __init__(self, tables, n, c, b, max_slice: int, micro_batch: int):
        self.tables = tables
        self.n, self.c, self.b = (np.asarray(x, float) for x in (n, c, b))
        self.key = ("items", self.n.tobytes(), self.c.tobytes(), self.b.tobytes())
        self.mem = tables.memory_matrix(1, max_slice, micro_batch)
        self.U = len(tables.units)
        self._smat: dict = {}

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
        """(M, M, U+1): link totals from seq[m'] to seq[m]."""
        M = len(seq)
        out = np.zeros((M, M, self.U + 1))
        for i, a in enumerate(seq):
            for j, d in enumerate(seq):
                if i < j:
                    out[i, j] = self.link_totals(a, d)
        return out

    def makespan(self, part: Partition) -> float:
        return table_makespan(self.tables, part.stages, self.n, self.c, self.b, self.key)


def chain_rows(tables, stages, n, c, b, key=None):
    """Chain time matrix and resource keys of ``stages`` over the items (single-device
    stages from the tables, tensor-parallel ones from the cost model itself)."""
    rows, keys = [], []
    prev = None
    for j, (devs, s, e) in enumerate(stages):
        if prev is not None:
            pdevs, ps, pe = prev
            rows.append(tables.transfer_times(pdevs[0], devs[0], pe, n, b))
            keys.append(link_key(tables.setup.cluster, pdevs[0], devs[0]) or ("none", j))
        if len(devs) == 1:
            rows.append(tables.range_time(devs[0], s, e, n, c, b, key))
        else:
            rows.append(np.broadcast_to(tables.cost.stage_compute_s(s, e, list(devs), n, c, b), np.shape(n)))
        keys.append(("stage", j))
        prev = (devs, s, e)
    return np.array(rows, float), keys


def table_makespan(tables, stages, n, c, b, key=None) -> float:
    """Exact makespan (``evaluate``'s recurrence) with stage times from the tables."""
    t, keys = chain_rows(tables, stages, n, c, b, key)
    return makespan_from_times(t, keys)


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
    cols = np.arange(U + 1)
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
EPSILONS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)


def search(pc: PartitionCosts, sequences, epsilons=EPSILONS, keep: float = 0.25, top: int = 4):
    """Best partitions over the given device sequences, by exact makespan.

    Every sequence gets the bottleneck DP; those within ``keep`` of the best
    bottleneck also get the min-sum DP at caps B*(1+eps).  Returns up to ``top``
    distinct (makespan, Partition) pairs, best first (empty: nothing fits)."""
    probs = []
    for seq in sequences:
        smats, links = sequence_problem(pc, seq)
        val, stages = minmax_dp(smats, links)
        if stages is not None:
            probs.append((val, seq, smats, links, stages))
    if not probs:
        return []
    best_b = min(p[0] for p in probs)
    cands: dict[Partition, float] = {}
    for val, seq, smats, links, stages in probs:
        if val > best_b * (1 + keep):
            continue
        part = to_partition(seq, stages)
        cands.setdefault(part, pc.makespan(part))
        for _, st in minsum_dp(smats, links, [val * (1 + e) for e in epsilons]):
            if st is not None:
                part = to_partition(seq, st)
                if part not in cands:
                    cands[part] = pc.makespan(part)
    ranked = sorted(cands.items(), key=lambda kv: kv[1])
    return [(v, p) for p, v in ranked[:top]]
