"""A local-improvement pass over the joint search's best plans: small moves, scored exactly.

The DPs of ``partition`` optimise proxies (the bottleneck, then the total busy time
under caps), so a plan one small step from their answer can be faster: one that
gives the head a stage of its own on a device they left idle, say, where the
min-sum criterion counts the extra hop and not the shorter fill and drain.  This
pass looks at the neighbours of a few final candidates (partition, slicing,
micro-batch count):

* **shift**: the cut between two adjacent stages moved by one unit;
* **split**: a stage cut in two, one part going to an unused device (one per kind:
  devices of a kind are interchangeable), before or after it; the cut is tried next
  to either end of the stage (the embedding or the head alone) and where the two
  parts' busy times balance best;
* **merge**: two adjacent stages joined on either one's devices;
* **move**: a single-device stage moved to an unused device of another kind;
* **micro-batches**: one more or one fewer.

The neighbours are first ranked by exact makespan with the candidate's slices (cut
down where its memory asks), which is cheap: each gets a lower bound, and only those
that can still be among the best ``reslice`` are scanned (``_ranked``).  Those best
``reslice`` are then sliced anew (Algorithm 2, ``slice_for``) and scored by exact
makespan.  The best strictly better neighbour replaces the candidate, until none is
(steepest descent, at most ``max_steps`` moves).

Which neighbours are looked at is a heuristic (the split points, the pre-ranking with
the old slices); what is accepted is exact: the pass only ever lowers the exact
makespan, so it cannot make a plan worse.
"""

from __future__ import annotations

import math

import numpy as np

from hpipe.planners import partition as alg1
from hpipe.planners.common import items_arrays, micro_batch_sizes
from hpipe.planners.evaluate import chain_bound, makespan_from_times


def neighbours(tables, part: alg1.Partition, m: int, options) -> list[tuple[alg1.Partition, int]]:
    """(partition, micro-batch count) pairs one move away (see the module doc)."""
    st = list(part.stages)
    S = len(st)
    out: list = []

    def add(stages, mm=m):
        out.append((alg1.Partition(tuple(stages)), mm))

    # shift a cut by one unit
    for j in range(S - 1):
        (da, a, k), (db, _, e) = st[j], st[j + 1]
        for nk in (k - 1, k + 1):
            if a < nk < e:
                add(st[:j] + [(da, a, nk), (db, nk, e)] + st[j + 2:])
    # merge two adjacent stages on either one's devices
    for j in range(S - 1):
        (da, a, _), (db, _, e) = st[j], st[j + 1]
        for devs in (da, db):
            add(st[:j] + [(devs, a, e)] + st[j + 2:])
    # the unused devices, one of each kind (devices of a kind are interchangeable)
    used = set(part.devices)
    spare: dict = {}
    for d in tables.devices:
        if d not in used:
            spare.setdefault(tables.kind[d], d)
    # a stage moved to an unused device of another kind
    for j, (devs, a, e) in enumerate(st):
        for d in spare.values():
            if len(devs) == 1 and tables.kind[d] != tables.kind[devs[0]]:
                add(st[:j] + [((d,), a, e)] + st[j + 1:])
    # split a stage onto an unused device
    if spare:
        prefix = _prefix_probe(tables)
        for j, (devs, a, e) in enumerate(st):
            if e - a < 2:
                continue
            for d in spare.values():
                for first_new in (False, True):
                    for k in _split_points(prefix, devs, d, a, e, first_new):
                        parts = [((d,), a, k), (devs, k, e)] if first_new else [(devs, a, k), ((d,), k, e)]
                        add(st[:j] + parts + st[j + 1:])
    # one more or one fewer micro-batch
    for mm in (m - 1, m + 1):
        if mm in options:
            add(st, mm)
    return list(dict.fromkeys(out))


def _prefix_probe(tables):
    """Per device group: (U+1,) prefix times of one unit of each class at a mid-size item
    (for placing split points only)."""
    pn, pc, pb = tables._probe
    cache = {}

    def prefix(devs):
        key = (tables.device_group[devs[0]], len(devs))
        if key not in cache:
            if len(devs) == 1:
                per = tables.class_times(devs[0], pn, pc, pb, key="probe").sum(axis=1)
            else:
                per = tables.group_class_times(devs, pn, pc, pb, key="probe").sum(axis=1)
            cache[key] = tables.class_prefix @ per
        return cache[key]

    return prefix


def _split_points(prefix, devs, new, a: int, e: int, first_new: bool) -> list[int]:
    """Cuts k in (a, e) to try: next to either end, and where the parts balance."""
    P_old, P_new = prefix(tuple(devs)), prefix((new,))
    ks = np.arange(a + 1, e)
    if first_new:
        cost = np.maximum(P_new[ks] - P_new[a], P_old[e] - P_old[ks])
    else:
        cost = np.maximum(P_old[ks] - P_old[a], P_new[e] - P_new[ks])
    return sorted({a + 1, e - 1, int(ks[int(np.argmin(cost))])})


def quick_rows(tables, part: alg1.Partition, slices, m: int, caches: dict, recut: bool = True):
    """(hold times, delays, resources, slices) of ``part``'s chain with ``slices``, cut down
    to what its memory allows (``recut``); None where they do not fit (not even one granule,
    or without ``recut``, not as they are)."""
    setup = tables.setup
    sizes = micro_batch_sizes(setup.batch_size, m)
    nmax = tables.max_slice_tokens(part.stages, max(sizes))
    if nmax == 0 or (not recut and nmax < max(slices)):
        return None
    # the neighbours of a plan share its slices and mostly their cut-down forms too
    ik = ("recut", tuple(slices), nmax, tuple(sizes))
    if ik not in caches:
        sl = alg1.recut_slices(slices, nmax, setup.granularity)
        caches[ik] = sl, ("items", sl, tuple(sizes)), items_arrays(sl, sizes)
    sl, key, (n, c, b) = caches[ik]
    t, d, keys = alg1.chain_rows(tables, part.stages, n, c, b, key, caches.setdefault(key, {}))
    return t, d, keys, sl


def quick_makespan(tables, part: alg1.Partition, slices, m: int, caches: dict, recut: bool = True):
    """(exact makespan, slices) of ``part`` with ``slices``, cut down to what its memory
    allows (``recut``; else (inf, None) where they do not fit as they are)."""
    r = quick_rows(tables, part, slices, m, caches, recut)
    if r is None:
        return math.inf, None
    t, d, keys, sl = r
    return makespan_from_times(t, keys, d), sl


def _ranked(tables, cands, slices, caches, recut, k):
    """The ``k`` best of ``cands`` = [(partition, micro-batches)] by exact makespan with
    ``slices`` (ties: the earlier first), as (makespan, index, partition, micro-batches,
    slices), best first; those that do not fit are left out.

    The same answer as scoring every candidate (``quick_makespan``), for less: each gets a
    cheap lower bound first (``chain_bound``), and only those that can still be among the
    k best are scanned (``best_by_bound``).  On a large cluster most of the one-move
    neighbours of a plan are then never scanned.  Rows are not kept between the two: they
    come from the caches again for the few scanned."""
    bounded = []
    for i, (p, mm) in enumerate(cands):
        r = quick_rows(tables, p, slices, mm, caches, recut)
        if r is not None:
            bounded.append((chain_bound(r[0], r[1]), i, (p, mm)))

    def exact(x):
        p, mm = x
        return quick_makespan(tables, p, slices, mm, caches, recut)

    return [(v, i, p, mm, sl) for v, i, (p, mm), sl in best_by_bound(bounded, exact, k)]


def best_by_bound(bounded, exact, k: int) -> list:
    """The ``k`` smallest (value, index, item, extra) by (value, index), best first, of
    ``bounded`` = [(lower bound, index, item)] where ``exact(item)`` -> (value, extra); items
    of infinite value are left out.  Items are scored in the order of their bounds, and
    scoring stops once the next bound exceeds the k-th best value (allowing for the
    bound's rounding: it sums in another order than the exact scan), so the answer is what
    scoring every item would give, ties included."""
    best: list = []
    if k <= 0:
        return best
    for lb, i, item in sorted(bounded, key=lambda x: x[:2]):
        if len(best) == k and lb * (1 - 1e-9) > best[-1][0]:
            break
        v, extra = exact(item)
        if math.isfinite(v):
            best.append((v, i, item, extra))
            best.sort(key=lambda x: x[:2])
            del best[k:]
    return best


def improve(tables, start, slice_for, options, max_steps: int = 6, reslice: int = 3, recut: bool = True,
            slice_many=None):
    """Steepest descent from ``start`` = (latency, partition, slices, micro-batches);
    ``slice_for(partition, sizes)`` -> (latency, slices) or None.  Returns the best
    (latency, partition, slices, micro-batches) reached (``start`` if no move helps).
    Without ``recut`` (pinned slices) only neighbours that hold the slices as they are
    count.  ``slice_many(partitions, sizes)``, if given, slices several partitions at once
    (the same answers as ``slice_for``, which is then asked for them again)."""
    setup = tables.setup
    best = start
    caches: dict = {}
    seen = {(start[1], start[3])}
    for _ in range(max_steps):
        lat, part, slices, m = best
        cands = [x for x in neighbours(tables, part, m, options) if x not in seen]
        quick = _ranked(tables, cands, slices, caches, recut, reslice)
        step = None
        if slice_many is not None:
            for mm in dict.fromkeys(x[3] for x in quick[:reslice]):
                slice_many([x[2] for x in quick[:reslice] if x[3] == mm], micro_batch_sizes(setup.batch_size, mm))
        for v, _, p, mm, sl in quick[:reslice]:
            seen.add((p, mm))
            r = slice_for(p, micro_batch_sizes(setup.batch_size, mm))
            cand = (v, p, sl, mm)
            if r is not None and r[0] < cand[0]:
                cand = (r[0], p, tuple(r[1]), mm)
            if cand[0] < (step or best)[0] * (1 - 1e-9):
                step = cand
        if step is None:
            break
        best = step
    return best
