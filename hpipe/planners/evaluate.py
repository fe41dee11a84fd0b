"""Exact makespan of a plan: what chooses between candidate plans and fills ``predicted``.

The pipeline is a chain of positions: stage 0, the hop into stage 1, stage 1,
the hop into stage 2, ...  Work item i (``Plan.items`` order) at position p
waits for item i at position p-1 and for item i-1 at position p, so its
completion time follows the flow-shop recurrence

    C[i][p] = max(C[i-1][p], C[i][p-1] + d[i][p-1]) + t[i][p].

``t`` is how long the position's resource is held; ``d`` a pure delay after
it.  A stage holds its devices for ``CostModel.stage_compute_s`` (plus, where a
boundary has a lossy codec, its encode or decode: ``hpipe.codecs``).  A hop moves
``units[end-1].out_bytes(n, b)`` (or the codec's wire bytes) from the previous stage's first device to
the stage's first device: of the cost model's ``transfer_time_s`` the route's
latency (at most all of it) is propagation, which elapses *after* the links
are released, and the rest holds every directed link on the route.  These are
the simulator's semantics (``hpipe.sim``: devices and directed links as
resources, latency after release), so a plan's prediction is its simulated
latency.

Per position the recurrence is a max-plus scan, which numpy does in one
pass: with S the prefix sums of t, C[i] = S[i] + max_{k<=i}(A[k] - S[k-1])
where A is the arrival from the previous position.  When two hops of a plan
need the same directed link (a pipeline that crosses from host A to host B
twice), item order no longer fixes the order on that link, and a small event
loop serves the link first come, first served instead.
"""

from __future__ import annotations

import heapq

import numpy as np

from hpipe.codecs import plan_boundary_costs, stage_codec_s
from hpipe.costmodels import split_transfer


def item_arrays(plan, batch_size: int):
    """(b, n, c) float arrays over the plan's work items, in execution order."""
    items = plan.items(batch_size)
    b = np.array([it[2] for it in items], float)
    n = np.array([it[3] for it in items], float)
    c = np.array([it[4] for it in items], float)
    return b, n, c


def directed_links(route, src: str) -> frozenset:
    """The directed links (u, v) a transfer from ``src`` along ``route`` holds."""
    return frozenset(route.directed(src))


def hop_resource(cluster, src: str, dst: str):
    """What a transfer from src to dst holds: its route's directed links."""
    if src == dst:
        return frozenset()
    return directed_links(cluster.route(src, dst), src)


def chain_times(setup, plan, arrays=None):
    """Hold and delay of every work item at every chain position, and the resources.

    Returns ``(t, d, keys)``, t and d of shape (2*stages - 1, items); rows
    alternate stage 0, hop 0->1, stage 1, ...; ``keys[p]`` is ("stage", j) for a
    stage, the frozenset of directed links for a hop.  ``arrays`` (b, n, c) replaces the
    plan's prefill items (generation: its decode steps)."""
    cost = setup.cost
    cluster = setup.cluster
    b, n, c = arrays if arrays is not None else item_arrays(plan, setup.batch_size)
    rows, delays, keys = [], [], []
    zero = np.zeros_like(n)
    # wire bytes; encode/decode go to the stages; decode steps (``arrays``) travel raw
    codecs = plan_boundary_costs(setup, plan, n, b, 0 if arrays is not None else None)
    for j, st in enumerate(plan.stages):
        if j > 0:
            src, dst = plan.stages[j - 1].devices[0], st.devices[0]
            nbytes = codecs[j - 1].wire_bytes
            total = np.broadcast_to(cost.transfer_time_s(src, dst, nbytes), n.shape)
            hold, delay = split_transfer(cluster, src, dst, total)
            rows.append(hold)
            delays.append(delay)
            keys.append(hop_resource(cluster, src, dst))
        rows.append(np.broadcast_to(cost.stage_compute_s(st.start, st.end, st.devices, n, c, b)
                                    + stage_codec_s(codecs, j), n.shape))
        delays.append(zero)
        keys.append(("stage", j))
    return np.array(rows, float), np.array(delays, float), keys


def scan(arrive, t):
    """C[i] = max(C[i-1], arrive[i]) + t[i] with C[-1] = 0, for all i at once."""
    s = np.cumsum(t)
    prev = np.concatenate(([0.0], s[:-1]))
    return s + np.maximum.accumulate(np.maximum(arrive, 0.0) - prev)


def chain_completion(t, d=None):
    """Completion times C (same shape as t) of a chain whose positions each have a
    resource of their own; ``d`` delays each position's output (default none)."""
    C = np.empty_like(t)
    arrive = np.zeros(t.shape[1])
    for p in range(t.shape[0]):
        C[p] = scan(arrive, t[p])
        arrive = C[p] if d is None else C[p] + d[p]
    return C


def chain_bound(t, d=None) -> float:
    """A lower bound on ``chain_completion(t, d)[-1, -1]``, and so on the makespan with
    shared links too (sharing only delays): for each position p, the first item cannot
    reach it before the hold times and delays of the positions ahead of it, p then holds
    every item in turn, and the last item still has to pass the positions after it.  A
    few array sums, where the scan is a loop over the positions."""
    P, I = t.shape
    if I == 0:
        return 0.0
    dd = np.zeros_like(t) if d is None else d
    head = np.concatenate(([0.0], np.cumsum(t[:-1, 0] + dd[:-1, 0])))   # (P,) item 0 reaches p
    after = t[1:, -1] + dd[:-1, -1]                                       # last item: p -> p+1 and its hold
    tail = np.concatenate((np.cumsum(after[::-1])[::-1], [0.0]))         # (P,) from p to the end
    return float(np.max(head + t.sum(axis=1) + tail))


def shares_resources(keys) -> bool:
    """Whether two hops need a common directed link."""
    seen: set = set()
    for k in keys:
        if isinstance(k, frozenset):
            if seen & k:
                return True
            seen |= k
    return False


def makespan_from_times(t, keys=None, d=None) -> float:
    """Makespan of a chain of item hold times ``t`` (and delays ``d``); ``keys``
    (resource per row) only matter when two hops share a link."""
    if t.size == 0:
        return 0.0
    if keys is not None and shares_resources(keys):
        return float(shared_completion(t, keys, d)[-1, -1])
    C = chain_completion(t, d)
    return float(C[-1, -1])


def shared_completion(t, keys, d=None):
    """Completion times when hops share links: operation (item i, position p) is
    ready when (i, p-1) is done and its delay has passed and (i-1, p) is done; it
    starts once all its links are free, links going to ready operations first come,
    first served (ties: earlier item, earlier position)."""
    P, I = t.shape
    tl = t.tolist()
    dl = (np.zeros_like(t) if d is None else d).tolist()
    res = [k if isinstance(k, frozenset) else frozenset([k]) for k in keys]
    C = [[None] * I for _ in range(P)]
    free_at: dict = {}
    ready = [(0.0, 0, 0)]  # (ready time, item, position)
    while ready:
        r, i, p = heapq.heappop(ready)
        start = max([r] + [free_at.get(x, 0.0) for x in res[p]])
        end = start + tl[p][i]
        C[p][i] = end
        for x in res[p]:
            free_at[x] = end
        # successors: item i at the next position, item i+1 at this one, each once
        # both of its predecessors are done
        if p + 1 < P and (i == 0 or C[p + 1][i - 1] is not None):
            arrive = end + dl[p][i]
            heapq.heappush(ready, (arrive if i == 0 else max(arrive, C[p + 1][i - 1]), i, p + 1))
        if i + 1 < I and (p == 0 or C[p - 1][i + 1] is not None):
            heapq.heappush(ready, (end if p == 0 else max(end, C[p - 1][i + 1] + dl[p - 1][i + 1]), i + 1, p))
    return np.array(C, float)


def makespan_s(setup, plan) -> float:
    """The plan's exact makespan (seconds) under the scenario's cost model.

    Where devices share a machine (``CostModel.colocated``: a profile that timed them alone
    too), an item's time depends on what its neighbours do meanwhile, which the recurrence
    cannot express: the simulator plays the plan out instead.  The searches still rank
    candidates with the recurrence at the busy-neighbour prices (which misprice plans that
    leave a device idle, where the profile measured a difference)."""
    if setup.cost.colocated():
        from hpipe.sim import build, run

        events = run(build(setup, plan, decode=False))  # the prefill, as the recurrence would give
        return max((e.end_s for e in events), default=0.0)
    t, d, keys = chain_times(setup, plan)
    return makespan_from_times(t, keys, d)
