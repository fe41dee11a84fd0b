"""Cached cost tables the planners search with: the cost model evaluated once, reused everywhere.

A search visits thousands of candidate stages; calling the cost model per unit
each time would dominate planning.  Two observations make it cheap without
changing a single number's meaning:

* Units of the same kind have the same shape (every attention part of a model
  is alike), and devices of the same type cost the same.  Units and devices are
  grouped by *fingerprint*: the cost model is probed at a handful of
  (tokens, context, batch) points and things that answer identically (and hold
  the same bytes) share one table.  A cost model that told layers or devices
  apart would simply give more groups.
* A single-device stage's time is the sum of its units' times
  (``CostModel.stage_compute_s``), so the time of units [k, e) is
  ``sum_class (count_class[e] - count_class[k]) * time_class``.

Totals agree with ``stage_compute_s`` up to floating-point summation order;
plans are still scored at the end with ``evaluate.makespan_s``, which calls the
cost model itself.  Tensor-parallel stages (megatron, tp-terapipe) call
``stage_compute_s`` directly.
"""

from __future__ import annotations

import numpy as np

from hpipe.memory import SPLIT_KINDS, kv_tokens
from hpipe.planners.evaluate import hop_resource
from hpipe.planners.groups import device_kind, tp_degrees


def _weighted(counts, ct):
    """``np.tensordot(counts, ct, axes=1)`` (units of each class times each class's time),
    the same dot product without tensordot's per-call overhead."""
    return np.dot(counts.reshape(1, -1), ct.reshape(len(counts), -1)).reshape(ct.shape[1:])


GRID_ROWS_BYTES = 256 << 20
"""How much the slice grids' rows may keep between partitions (oldest dropped first)."""


class BoundedCache:
    """A dict of numpy arrays that drops its oldest entries beyond ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes, self._d = max_bytes, 0, {}

    def get(self, key):
        return self._d.get(key)

    def put(self, key, value: np.ndarray) -> None:
        if key in self._d:
            return
        self._d[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes and len(self._d) > 1:
            self.nbytes -= self._d.pop(next(iter(self._d))).nbytes


class CostTables:
    def __init__(self, setup):
        self.setup = setup
        self.cost = setup.cost
        self.units = setup.units
        self.db = setup.dtype_bytes
        self.devices = setup.cluster.device_ids
        g, seq, bs = setup.granularity, setup.seq_len, setup.batch_size
        probes = {(g, 0, 1), (seq, 0, bs), (g, seq - g, bs), (min(3 * g, seq), seq - min(3 * g, seq), 1),
                  (max(seq // 2 // g, 1) * g, 0, max(bs // 2, 1))}
        pn, pc, pb = (np.array(x, float) for x in zip(*sorted(probes)))
        self._probe = (pn, pc, pb)
        # Device groups: the same datasheet (a cost model's only input about a device
        # in this codebase) and, in case a cost model tells devices apart otherwise, the
        # same answers at the probes.  Probes alone would be unsafe: two devices can
        # agree on every memory-bound probe and part on compute-bound items.
        gkey: dict = {}
        self.device_group: dict[str, int] = {}
        self.group_rep: list[str] = []
        for d in self.devices:
            spec = setup.cluster.device(d).spec
            key = (spec.model_dump_json(exclude={"name", "source"}),) + tuple(
                tuple(np.atleast_1d(self.cost.unit_time_s(u, d, pn, pc, pb)))
                for u in self._kind_reps())
            if key not in gkey:
                gkey[key] = len(self.group_rep)
                self.group_rep.append(d)
            self.device_group[d] = gkey[key]
        # Unit classes: same kind and footprint, and the same times on every device group.
        key_of: dict = {}
        self.unit_class = np.empty(len(self.units), int)
        self.class_rep: list[int] = []
        for u in self.units:
            key = (u.kind, u.weight_bytes(self.db), u.kv_bytes_per_token(self.db),
                   tuple(np.atleast_1d(u.out_bytes(pn, pb, self.db))),
                   tuple(np.atleast_1d(u.workspace_bytes(pn, pb, self.db))),
                   tuple(np.atleast_1d(u.tp_allreduce_bytes(pn, pb, self.db))),
                   tuple(tuple(np.atleast_1d(self.cost.unit_time_s(u, d, pn, pc, pb)))
                         for d in self.group_rep))
            if key not in key_of:
                key_of[key] = len(self.class_rep)
                self.class_rep.append(u.index)
            self.unit_class[u.index] = key_of[key]
        self.n_classes = len(self.class_rep)
        self.lower_triangle = np.tril_indices(len(self.units) + 1)
        """Indices of the (U+1, U+1) entries [k, e) with k >= e: no stage."""
        self.unit_class_list = [int(x) for x in self.unit_class]
        """``unit_class`` as Python ints (looked up per stage in the search's inner loops)."""
        onehot = np.zeros((len(self.units), self.n_classes), int)
        onehot[np.arange(len(self.units)), self.unit_class] = 1
        self.class_prefix = np.vstack([np.zeros(self.n_classes, int), np.cumsum(onehot, axis=0)])
        """(U+1, classes): how many units of each class lie in [0, k)."""
        self.kind: dict[str, tuple] = {d: device_kind(setup.cluster, d) for d in self.devices}
        """``groups.device_kind`` of every device (devices of one kind may form a TP group)."""
        self._kind_members: dict = {}
        for d in self.devices:
            self._kind_members.setdefault(self.kind[d], []).append(d)
        self._kind_members = {k: tuple(v) for k, v in self._kind_members.items()}
        biggest = max(len(v) for v in self._kind_members.values())
        self.tp_degrees = tp_degrees(setup.model, biggest)
        """Tensor-parallel degrees above 1 that split the model evenly and some kind has devices for."""
        self._cache: dict = {}
        self._canonical: dict = {}  # canonical_group's answers
        self._stage_granules: dict = {}  # ((devices, start, end), micro-batch) -> max_slice_tokens' term
        self._pairs: dict = {}
        self._pair_keys: dict = {}
        self._hops: dict = {}
        self.grid_rows = BoundedCache(GRID_ROWS_BYTES)
        """``slicing.SliceGrid``'s rows over every slice, per (stage or hop key, micro-batch size)."""

    def _kind_reps(self):
        seen = {}
        for u in self.units:
            seen.setdefault(u.kind, u)
        return list(seen.values())

    # ---- unit-class times ------------------------------------------------------
    def class_times(self, device: str, n, c, b, key=None):
        """(classes, *shape) array: one unit of each class on ``device`` for the given
        (n, c, b) arrays.  ``key`` names the arrays for caching (None: no cache)."""
        grp = self.device_group[device]
        ck = ("ct", grp, key)
        if key is not None and ck in self._cache:
            return self._cache[ck]
        rep = self.group_rep[grp]
        out = self._from_grid(key, n, c, b, lambda bv: self._cache.get(("ct", grp, self._grid_key(bv))))
        if out is None:
            out = np.array([np.broadcast_to(self.cost.unit_time_s(self.units[r], rep, n, c, b), np.shape(n))
                            for r in self.class_rep], float)
        if key is not None:
            self._cache[ck] = out
        return out

    # ---- items on the granule grid ---------------------------------------------------
    # Every slice of a slicing on the granule grid is one of the L (L + 1) / 2 slices
    # (q, p) that ``slicing.SliceGrid`` costs for each micro-batch size: an item list
    # of the search (key "items": its slices, cut down or not, and micro-batch sizes)
    # takes its unit times from there, once a grid has been costed, instead of calling
    # the cost model again.
    def _grid_key(self, b):
        return ("grid", self.setup.seq_len // self.setup.granularity, self.setup.granularity, b)

    def _from_grid(self, key, n, c, b, grid_times):
        """(classes, items) gathered from ``grid_times(b)`` (classes, every slice; None
        where no grid has been costed for that size yet: costing one for a few items
        would cost more than it saves) for an "items" list, or None when the items are
        not slices of a costed grid."""
        if key is None or key[0] != "items" or np.ndim(n) != 1:
            return None
        g, L = self.setup.granularity, self.setup.seq_len // self.setup.granularity
        n, c, b = np.asarray(n, float), np.asarray(c, float), np.broadcast_to(np.asarray(b, float), np.shape(n))
        q, p = c / g, (c + n) / g
        if not (np.all(q == np.floor(q)) and np.all(p == np.floor(p)) and np.all(q >= 0) and np.all(p > q)
                and np.all(p <= L)):
            return None
        q, p = q.astype(np.int64), p.astype(np.int64)
        idx = q * (L + 1) - q * (q + 1) // 2 + (p - q - 1)
        out = np.empty((self.n_classes, len(n)))
        for bv in sorted(set(b.tolist())):  # np.unique's values and order (np.unique would import numpy.ma)
            table = grid_times(float(bv))
            if table is None:
                return None
            sel = b == bv
            out[:, sel] = table[:, idx[sel]]
        return out

    def counts(self, start, end):
        """Units of each class in [start, end) (arrays of starts/ends broadcast)."""
        return self.class_prefix[end] - self.class_prefix[start]

    def range_time(self, device: str, start: int, end: int, n, c, b, key=None):
        """Time of units [start, end) on one device, per (n, c, b) element."""
        ct = self.class_times(device, n, c, b, key)
        t = _weighted(self.counts(start, end), ct)
        ovh = self.cost.stage_overhead_s([device])
        return t + ovh if ovh else t

    # ---- tensor-parallel groups ---------------------------------------------------
    def group_of(self, device: str, tp: int) -> tuple[str, ...]:
        """``tp`` devices of ``device``'s kind (the first in scenario order): what a
        group of that kind and degree costs, its members being interchangeable."""
        if tp == 1:
            return (device,)
        return self._kind_members[self.kind[device]][:tp]

    def canonical_group(self, devs) -> tuple[str, ...]:
        """The devices that stand for the group ``devs`` in the tables: the first of their
        kind (``group_of``) when all are of one kind (members are interchangeable, so
        every such group shares one entry), else the devices as given."""
        devs = tuple(devs)
        hit = self._canonical.get(devs)
        if hit is None:
            kind = self.kind[devs[0]]
            hit = self._canonical[devs] = (self.group_of(devs[0], len(devs))
                                           if len(devs) > 1 and all(self.kind[d] == kind for d in devs) else devs)
        return hit

    def group_class_times(self, devs, n, c, b, key=None):
        """(classes, *shape): one unit of each class on a tensor-parallel group
        (``CostModel.tp_unit_time_s``: split units as shards plus the all-reduce, the
        embedding whole on every rank, the head on the leader)."""
        devs = self.canonical_group(devs)
        ck = ("gct", devs, key)
        if key is not None and ck in self._cache:
            return self._cache[ck]
        out = self._from_grid(key, n, c, b, lambda bv: self._cache.get(("gct", devs, self._grid_key(bv))))
        if out is None:
            out = np.array([np.broadcast_to(self.cost.tp_unit_time_s(self.units[r], list(devs), n, c, b),
                                            np.shape(n)) for r in self.class_rep], float)
        if key is not None:
            self._cache[ck] = out
        return out

    def group_prefix_totals(self, devs, n, c, b, key=None):
        """(U+1,): total time of units [0, k) over the items on the group ``devs``."""
        ct = self.group_class_times(devs, n, c, b, key)
        return self.class_prefix @ ct.reshape(self.n_classes, -1).sum(axis=1)

    def stage_time(self, devs, start: int, end: int, n, c, b, key=None):
        """Time of units [start, end) on one device or a tensor-parallel group, per (n, c, b)
        element: ``CostModel.stage_compute_s`` from the cached class times."""
        if len(devs) == 1:
            return self.range_time(devs[0], start, end, n, c, b, key)
        t = _weighted(self.counts(start, end), self.group_class_times(devs, n, c, b, key))
        if start > 0:
            t = t + self.scatter_items(devs, start, n, b, key)
        ovh = self.cost.stage_overhead_s(list(devs))
        return t + ovh if ovh else t

    def scatter_items(self, devs, start: int, n, b, key=None):
        """Per item: the group forwarding the input of a stage starting at ``start``."""
        devs = self.canonical_group(devs)
        ck = ("scati", devs, int(self.unit_class[start - 1]), key)
        if key is not None and ck in self._cache:
            return self._cache[ck]
        out = np.broadcast_to(self.cost.tp_scatter_s(self.class_rep[self.unit_class[start - 1]] + 1, list(devs),
                                                     n, b), np.shape(n))
        if key is not None:
            self._cache[ck] = out
        return out

    def scatter_totals(self, devs, n, b, key=None):
        """(U+1,): total time, over the items, of the group forwarding the input of a
        stage starting at unit k to its peers (``CostModel.tp_scatter_s``); 0 at k = 0."""
        devs = self.canonical_group(devs)
        ck = ("scat", devs, key)
        if key is not None and ck in self._cache:
            return self._cache[ck]
        per_class = np.array([float(np.sum(self.cost.tp_scatter_s(r + 1, list(devs), n, b)))
                              for r in self.class_rep])
        out = np.concatenate(([0.0], per_class[self.unit_class]))
        if key is not None:
            self._cache[ck] = out
        return out

    def prefix_totals(self, device: str, n, c, b, key=None):
        """(U+1,) array: total time of units [0, k) over all the given items, on ``device``.
        A stage [k, e) then costs P[e] - P[k]."""
        ct = self.class_times(device, n, c, b, key)
        per_class = ct.reshape(self.n_classes, -1).sum(axis=1)
        return self.class_prefix @ per_class

    # ---- transfers -------------------------------------------------------------
    def boundary_bytes(self, n, b):
        """(classes, items): bytes each unit class hands on for each item."""
        return np.array([np.broadcast_to(self.units[r].out_bytes(n, b, self.db), np.shape(n))
                         for r in self.class_rep], float)

    def pair_group(self, src: str, dst: str) -> tuple[int, tuple[str, str]]:
        """Device pairs whose transfers cost alike (same hosts, same answers at probe
        sizes) share tables: (group id, representative pair)."""
        pk = (src, dst)
        if pk not in self._pairs:
            cl = self.setup.cluster
            probe = np.array([1.0, 1e3, 1e5, 1e7, 1e9])
            key = (src == dst, cl.device(src).host, cl.device(dst).host,
                   tuple(np.atleast_1d(self.cost.transfer_time_s(src, dst, probe))))
            if key not in self._pair_keys:
                self._pair_keys[key] = (len(self._pair_keys), pk)
            self._pairs[pk] = self._pair_keys[key]
        return self._pairs[pk]

    def transfer_totals(self, src: str, dst: str, n, b, key=None):
        """(U+1,) array: how long the links are held, over all the items, to hand on
        the activation across a boundary at unit k (the output of unit k-1); entry 0 is 0."""
        grp, (rs, rd) = self.pair_group(src, dst)
        ck = ("tt", grp, key)
        if key is not None and ck in self._cache:
            return self._cache[ck]
        nbytes = self.boundary_bytes(n, b)
        # the links are held for the transfer less its propagation latency
        lat = self.latency_s(rs, rd)
        per_class = np.array([np.sum(t - np.minimum(lat, t))
                              for t in (np.asarray(self.cost.transfer_time_s(rs, rd, row), float) for row in nbytes)])
        out = np.concatenate(([0.0], per_class[self.unit_class]))
        if key is not None:
            self._cache[ck] = out
        return out

    def hop_resource(self, src: str, dst: str):
        """``evaluate.hop_resource``, remembered per pair."""
        hit = self._hops.get((src, dst))
        if hit is None:
            hit = self._hops[(src, dst)] = hop_resource(self.setup.cluster, src, dst)
        return hit

    def latency_s(self, src: str, dst: str) -> float:
        return 0.0 if src == dst else self.setup.cluster.route(src, dst).latency_s

    def transfer_times(self, src: str, dst: str, boundary: int, n, b, key=None):
        """Transfer time (latency included) of each item's activation across the
        boundary at unit ``boundary`` (the output of unit boundary-1) from src to dst."""
        grp, (rs, rd) = self.pair_group(src, dst)
        ck = ("tx", grp, int(self.unit_class[boundary - 1]), key)
        if key is not None and ck in self._cache:
            return self._cache[ck]
        out = np.broadcast_to(self.cost.transfer_time_s(
            rs, rd, self.units[boundary - 1].out_bytes(n, b, self.db)), np.shape(n))
        if key is not None:
            self._cache[ck] = out
        return out

    # ---- memory ----------------------------------------------------------------
    def static_memory_matrix(self, tp: int):
        """(U+1, U+1): weights and KV cache one device of a ``tp`` group needs for units
        [k, e) (what does not depend on the slice)."""
        ck = ("static", tp)
        if ck in self._cache:
            return self._cache[ck]
        s = self.setup
        split = np.array([u.kind in SPLIT_KINDS for u in self.units])
        w = np.array([u.weight_bytes(self.db) for u in self.units], dtype=np.int64)
        ws_ = np.where(split, w, 0)  # split across the group
        wr = np.where(split, 0, w)   # whole: the embedding on every rank, the head on the leader (its need)
        kv = np.array([u.kv_bytes_per_token(self.db) for u in self.units], dtype=np.int64)
        WS = np.concatenate(([0], np.cumsum(ws_)))
        WR = np.concatenate(([0], np.cumsum(wr)))
        KV = np.concatenate(([0], np.cumsum(kv)))
        wmat = (WS[None, :] - WS[:, None]).astype(float) / tp + (WR[None, :] - WR[:, None]).astype(float)
        kvmat = (KV[None, :] - KV[:, None]) * kv_tokens(s) * s.batch_size / tp
        out = wmat + kvmat
        self._cache[ck] = out
        return out

    def class_workspace(self, max_slice: int, micro_batch: int) -> np.ndarray:
        """(classes,): activation workspace of one unit of each class for the slice."""
        ck = ("ws", max_slice, micro_batch)
        if ck not in self._cache:
            self._cache[ck] = np.array([float(self.units[r].workspace_bytes(max_slice, micro_batch, self.db))
                                        for r in self.class_rep])
        return self._cache[ck]

    def memory_matrix(self, tp: int, max_slice: int, micro_batch: int):
        """(U+1, U+1) array: bytes one device needs to hold units [k, e) as a stage of
        ``tp`` devices (``memory.stage_memory_bytes``, same arithmetic); inf for k >= e."""
        ck = ("mem", tp, max_slice, micro_batch)
        if ck in self._cache:
            return self._cache[ck]
        U = len(self.units)
        ws = self.class_workspace(max_slice, micro_batch)
        # range max of the workspace: units of one class need the same workspace, so
        # it is the largest over the classes present in [k, e)
        work = np.full((U + 1, U + 1), -np.inf)
        cnt = self.class_prefix[None, :, :] - self.class_prefix[:, None, :]  # (k, e, class)
        for cls in range(self.n_classes):
            work = np.where(cnt[:, :, cls] > 0, np.maximum(work, ws[cls]), work)
        out = self.static_memory_matrix(tp) + work
        out[self.lower_triangle] = np.inf
        self._cache[ck] = out
        return out

    def stage_need_bytes(self, tp: int, start: int, end: int, max_slice: int, micro_batch: int) -> float:
        """``memory_matrix(tp, max_slice, micro_batch)[start, end]`` without building the matrix."""
        ws = self.class_workspace(max_slice, micro_batch)
        present = self.counts(start, end) > 0
        return float(self.static_memory_matrix(tp)[start, end] + ws[present].max())

    def max_slice_tokens(self, stages, micro_batch: int) -> int:
        """Longest slice (a multiple of the granularity) whose workspace still fits
        every stage of a partition, given as (devices, start, end); 0 if not even one
        granule fits.  The least over the stages of ``max_granules_matrix``: a lookup
        per stage, where the search asks this of thousands of partitions."""
        ck = ("nmax", tuple(stages), micro_batch)
        hit = self._cache.get(ck)
        if hit is not None:
            return hit
        best = self.setup.seq_len // self.setup.granularity
        per_stage = self._stage_granules
        for st in stages:
            g = per_stage.get((st, micro_batch))
            if g is None:
                devs, s, e = st
                g = per_stage[(st, micro_batch)] = min(
                    int(self.max_granules_matrix(len(devs), d, micro_batch)[s, e])
                    for d in dict.fromkeys(self.capacity(x) for x in devs))
            best = min(best, g)
        out = best * self.setup.granularity
        self._cache[ck] = out
        return out

    def max_granules_matrix(self, tp: int, capacity: float, micro_batch: int) -> np.ndarray:
        """(U+1, U+1) ints: for a stage [k, e) of ``tp`` devices of ``capacity`` bytes,
        the most granules a slice may have (0..L) with the stage fitting at that length
        and every shorter one (``stage_need_bytes``, the same arithmetic; 0 for k >= e).

        Per unit class, the fitting lengths are a prefix of 1..L (workspace grows with
        the slice; a running max makes that so), so a binary search per class gives its
        count and the stage's is the least over the classes it holds.  Sums that round
        differently from ``stage_need_bytes`` at the boundary are checked and nudged, so
        the answer is what that function's comparison says."""
        ck = ("gmax", tp, capacity, micro_batch)
        out = self._cache.get(ck)
        if out is not None:
            return out
        L = self.setup.seq_len // self.setup.granularity
        ws = self.class_workspace_table(micro_batch)  # (L, classes): running max over lengths
        static = self.static_memory_matrix(tp)
        U = len(self.units)
        present = (self.class_prefix[None, :, :] - self.class_prefix[:, None, :]) > 0  # (k, e, class)
        budget = capacity - static
        count = np.full((U + 1, U + 1), L, dtype=np.int64)
        for cls in range(self.n_classes):
            c = np.searchsorted(ws[:, cls], budget, side="right")
            count = np.where(present[:, :, cls], np.minimum(count, c), count)
        valid = np.triu(np.ones((U + 1, U + 1), bool), k=1)
        count = np.where(valid, count, 0)

        def fits(k):  # (U+1, U+1) bools: the stage fits with k granules, as stage_need_bytes adds up
            wmax = np.where(present, ws[np.clip(k, 1, L) - 1], -np.inf)  # (U+1, U+1, classes)
            return (static + wmax.max(axis=2)) <= capacity

        # rounding at the boundary: step down while the count does not fit, up while one more does
        for _ in range(L + 1):
            bad = valid & (count > 0) & ~fits(count)
            if not bad.any():
                break
            count = np.where(bad, count - 1, count)
        for _ in range(L + 1):
            more = valid & (count < L) & fits(count + 1)
            if not more.any():
                break
            count = np.where(more, count + 1, count)
        self._cache[ck] = count
        return count

    def class_workspace_table(self, micro_batch: int) -> np.ndarray:
        """(L, classes): workspace of one unit of each class for slices of 1..L granules
        (``class_workspace``), as a running max over the lengths."""
        ck = ("wstab", micro_batch)
        out = self._cache.get(ck)
        if out is None:
            g, L = self.setup.granularity, self.setup.seq_len // self.setup.granularity
            out = np.maximum.accumulate(np.array([self.class_workspace(k * g, micro_batch) for k in range(1, L + 1)]),
                                        axis=0)
            self._cache[ck] = out
        return out

    def rows_cache(self, key) -> dict:
        """A dict for ``partition.chain_rows`` to keep stage and hop rows in, one per
        item list (``key``): partitions share most of their stages, and the rounds,
        starts and micro-batch counts of the search meet the same item lists again."""
        return self._cache.setdefault(("rows", key), {})

    def capacity(self, device: str) -> float:
        return self.setup.cluster.device(device).usable_memory_bytes

    def speed_key(self, device: str) -> float:
        """Seconds for one of each unit class at a mid-size item: smaller is faster."""
        pn, pc, pb = self._probe
        return float(self.class_times(device, pn, pc, pb, key="probe").sum())
