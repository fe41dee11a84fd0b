"""Exact makespan of a plan: what chooses between candidate plans and fills ``predicted``.

The pipeline is a chain of resources: stage 0, the link into stage 1, stage 1,
the link into stage 2, ...  Work item i (``Plan.items`` order) on chain
position p waits for item i at position p-1 and for item i-1 at position p,
so its completion time follows the flow-shop recurrence

    C[i][p] = max(C[i-1][p], C[i][p-1]) + t[i][p].

A link position carries the transfer of ``units[end-1].out_bytes(n, b)`` from
the previous stage's first device to the stage's first device and holds the
link for the whole transfer time (a link carries one transfer at a time).

Per position the recurrence is a max-plus scan, which numpy does in one
pass: with S the prefix sums of t, C[i] = S[i] + max_{k<=i}(A[k] - S[k-1])
where A is the arrival from the previous position.  When two boundaries of a
plan share a link (e.g. a pipeline that leaves a host and comes back), item
order no longer fixes the order on that link, and a small event loop serves
the link first come, first served instead.

Stage times come from ``CostModel.stage_compute_s`` (the simulator's
definition), transfer times from ``CostModel.transfer_time_s``.
"""

from __future__ import annotations

import heapq

import numpy as np


def item_arrays(plan, batch_size: int):
    """(b, n, c) float arrays over the plan's work items, in execution order."""
    items = plan.items(batch_size)
    b = np.array([it[2] for it in items], float)
    n = np.array([it[3] for it in items], float)
    c = np.array([it[4] for it in items], float)
    return b, n, c


def link_key(cluster, src: str, dst: str):
    """The resource a transfer from src to dst holds: its route's narrowest link
    (what ``Route.bottleneck`` names), or None for a transfer that needs none."""
    if src == dst:
        return None
    return cluster.route(src, dst).bottleneck


def chain_times(setup, plan):
    """Time of every work item at every chain position, and the positions' resources.

    Returns ``(t, keys)``: ``t`` has shape (2*stages - 1, items); rows alternate
    stage 0, link 0->1, stage 1, ...; ``keys[p]`` names the resource of row p
    (("stage", j) for a stage, the link's edge for a transfer)."""
    cost = setup.cost
    b, n, c = item_arrays(plan, setup.batch_size)
    rows, keys = [], []
    for j, st in enumerate(plan.stages):
        if j > 0:
            prev = plan.stages[j - 1]
            nbytes = setup.units[prev.end - 1].out_bytes(n, b, setup.dtype_bytes)
            rows.append(np.broadcast_to(cost.transfer_time_s(prev.devices[0], st.devices[0], nbytes), n.shape))
            keys.append(link_key(setup.cluster, prev.devices[0], st.devices[0]) or ("none", j))
        rows.append(np.broadcast_to(cost.stage_compute_s(st.start, st.end, st.devices, n, c, b), n.shape))
        keys.append(("stage", j))
    return np.array(rows, float), keys


def scan(arrive, t):
    """C[i] = max(C[i-1], arrive[i]) + t[i] with C[-1] = 0, for all i at once."""
    s = np.cumsum(t)
    prev = np.concatenate(([0.0], s[:-1]))
    return s + np.maximum.accumulate(np.maximum(arrive, 0.0) - prev)


def chain_completion(t):
    """Completion times C (same shape as t) of a chain whose positions each have a
    resource of their own."""
    C = np.empty_like(t)
    arrive = np.zeros(t.shape[1])
    for p in range(t.shape[0]):
        arrive = C[p] = scan(arrive, t[p])
    return C


def makespan_from_times(t, keys=None) -> float:
    """Makespan of a chain of item times; ``keys`` (resource per row) only matter
    when some resource appears in more than one row."""
    if t.size == 0:
        return 0.0
    if keys is None or len(set(keys)) == len(keys):
        return float(chain_completion(t)[-1, -1])
    return float(shared_completion(t, keys)[-1, -1])


def shared_completion(t, keys):
    """Completion times when resources repeat along the chain: every operation
    (item i, position p) becomes ready when (i, p-1) is done (and, on a stage, when
    (i-1, p) is done); each resource then serves ready operations in order of
    readiness (ties: earlier item, earlier position)."""
    P, I = t.shape
    C = np.full((P, I), np.nan)
    free_at: dict = {}
    ready = [(0.0, 0, 0)]  # (ready time, item, position)
    while ready:
        r, i, p = heapq.heappop(ready)
        key = keys[p]
        start = max(r, free_at.get(key, 0.0))
        C[p, i] = end = start + t[p, i]
        free_at[key] = end
        # successors: the same item at the next position, the next item at this
        # position (item order is fixed per position, as on a stage)
        if p + 1 < P and (i == 0 or not np.isnan(C[p + 1, i - 1])):
            heapq.heappush(ready, (end if i == 0 else max(end, C[p + 1, i - 1]), i, p + 1))
        if i + 1 < I and (p == 0 or not np.isnan(C[p - 1, i + 1])):
            heapq.heappush(ready, (end if p == 0 else max(end, C[p - 1, i + 1]), i + 1, p))
    return C


def makespan_s(setup, plan) -> float:
    """The plan's exact makespan (seconds) under the scenario's cost model."""
    t, keys = chain_times(setup, plan)
    return makespan_from_times(t, keys)
