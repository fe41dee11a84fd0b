"""Generation in the planners: the exact prefill + decode timeline, the objective, and the
search for a partition and a decode group count that serve both phases.

Semantics are the simulator's (``hpipe.sim.decode``): every stage runs the prefill items,
then the decode items step-major (``for t: for g:``); decode step t of group g waits on
stage 0 for the group's previous tokens on the last stage plus the ids' return hop.

**The timeline** (``timeline``).  Positions are the chain of ``evaluate``: stage 0, hop,
stage 1, ...  The prefill's completion times come from ``evaluate`` (the max-plus scan);
the decode items then follow the same recurrence, item by item, with the feedback:

    ready(t, g)  = max(return link free, C_last(deps)) + hold_ret, + latency_ret
    C(i, p)      = max(C(i-1, p), arrival(i, p)) + t(i, p);   arrival(i, p+1) = C(i, p) + d(i, p)

which is what the engine plays out when no two hops (the return included) share a
directed link; where they do, the simulator itself scores the plan (exact by definition).

**The objective** (``objective_key``): ``latency`` (end to end), ``ttft``, ``tpot`` (the
median gap) or ``throughput``.  Batch and tokens are fixed by the scenario, so
throughput (generated tokens per second of end-to-end latency) ranks plans exactly as
latency does.  Ties (ttft does not depend on decode at all) are broken by latency.

**The search** (``choose``).  One partition serves both phases (the KV cache a stage
fills in the prefill is the one it reads in decode; moving it between phases would cost
the whole cache over the slow links).  Candidates are the prefill search's partitions
(with their slicing and micro-batches) and *decode-aware* ones: Algorithm 1's DPs
(``partition.minmax_dp`` / ``minsum_dp``) run on the prefill items *plus the decode
items* (stage totals then count the decode steps' weight and KV reads), and on the decode
items alone (the min-sum at no cap is the least per-token loop for one group).  Each
candidate is sliced for the prefill (``slice_for``) and scored exactly for every
decode group count G = 1 .. batch; the best by the objective wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hpipe.costmodels import split_transfer, with_step_overhead
from hpipe.models import decode_steps
from hpipe.planners import partition as alg1
from hpipe.planners.common import items_arrays, micro_batch_sizes
from hpipe.planners.evaluate import chain_completion, hop_resource, shares_resources, shared_completion
from hpipe.result import decode_figures
from hpipe.sim.decode import DecodeWork

OBJECTIVES = ("latency", "ttft", "tpot", "throughput")


def objective_key(fig: dict, objective: str) -> tuple[float, float]:
    """What a plan is ranked by (smaller is better): the objective, then latency."""
    lat = fig["latency_s"]
    if objective == "ttft":
        return fig["ttft_s"], lat
    if objective == "tpot":
        return (fig["tpot_s"] if fig["tpot_s"] is not None else 0.0), lat
    return lat, lat  # latency, and throughput (fixed tokens: the inverse of latency)


def group_options(batch_size: int, max_options: int = 8) -> list[int]:
    """Decode group counts to try: every count up to the batch for small batches, else the
    divisors of the batch (equal groups) plus 1..max_options."""
    if batch_size <= max_options:
        return list(range(1, batch_size + 1))
    return sorted(set(range(1, max_options + 1)) | {m for m in range(1, batch_size + 1) if batch_size % m == 0})


# ---- rows: hold and delay of every item at every position ---------------------------------
@dataclass
class Rows:
    """Hold ``t`` and delay ``d`` (positions x items) of prefill and decode items, the
    return hop's hold and delay per decode item, and every position's resources."""

    pre_t: np.ndarray
    pre_d: np.ndarray
    dec_t: np.ndarray
    dec_d: np.ndarray
    ret_hold: np.ndarray
    ret_delay: np.ndarray
    keys: list
    ret_key: frozenset

    @property
    def shared(self) -> bool:
        return shares_resources(list(self.keys) + [self.ret_key])


def rows_from_tables(tables, stages, work: DecodeWork, slices, sizes, rows_cache=None) -> Rows:
    """Rows from the planners' cost tables (``partition.chain_rows``), cached per stage."""
    cache = rows_cache if rows_cache is not None else {}
    n, c, b = items_arrays(slices, sizes)
    pre_t, pre_d, keys = alg1.chain_rows(tables, stages, n, c, b, ("items", tuple(slices), tuple(sizes)),
                                         cache.setdefault(("pre", tuple(slices), tuple(sizes)), {}))
    db_, dn, dc = work.arrays()
    dec_t, dec_d, _ = alg1.chain_rows(tables, stages, dn, dc, db_, ("decode", work.steps, work.group_sizes),
                                      cache.setdefault(("dec", work.steps, work.group_sizes), {}))
    return _step_loop(tables.setup, stages, Rows(pre_t, pre_d, dec_t, dec_d, *_return_rows(tables.setup, stages, db_)))


def rows_from_cost(setup, plan, work: DecodeWork) -> Rows:
    """Rows straight from the cost model, as the simulator builds them (``predicted``)."""
    from hpipe.planners.evaluate import chain_times

    stages = [(tuple(st.devices), st.start, st.end) for st in plan.stages]
    pre_t, pre_d, keys = chain_times(setup, plan)
    db_, dn, dc = work.arrays()
    dec_t, dec_d, _ = chain_times(setup, plan, arrays=(db_, dn, dc))
    return _step_loop(setup, stages, Rows(pre_t, pre_d, dec_t, dec_d, *_return_rows(setup, stages, db_)))


def _step_loop(setup, stages, rows: Rows) -> Rows:
    """The decode step loop's own costs, as the simulator adds them (``hpipe.sim.build``):
    in a multi-stage plan every stage computes its decode steps ``after_wait_factor`` slower
    than back to back, and each hop's and the return's message takes ``step_overhead_s`` more
    (``with_step_overhead``: on the delay, and off the hold too where it is negative); a
    tensor-parallel stage's leader hands each step's input to its peers
    (``CostModel.tp_step_overhead_s``, one stage or many)."""
    cost = setup.cost
    multi = len(stages) > 1
    dec_t = rows.dec_t.copy()
    for j, (devs, _, _) in enumerate(stages):
        if multi:
            dec_t[2 * j] *= cost.stage_after_wait_factor(devs)
        dec_t[2 * j] += cost.tp_step_overhead_s(devs)
    if not multi:  # one stage: no hop, the sampler feeds the driver in-process
        return Rows(rows.pre_t, rows.pre_d, dec_t, rows.dec_d, rows.ret_hold, rows.ret_delay, rows.keys, rows.ret_key)
    dec_d = rows.dec_d.copy()
    for j in range(1, len(stages)):  # positions: stage 0, hop 1, stage 1, hop 2, ...
        dec_t[2 * j - 1], dec_d[2 * j - 1] = with_step_overhead(
            dec_t[2 * j - 1], dec_d[2 * j - 1], cost.step_overhead_s(stages[j - 1][0][0], stages[j][0][0]))
    ret_hold, ret_delay = with_step_overhead(rows.ret_hold, rows.ret_delay,
                                             cost.step_overhead_s(stages[-1][0][0], stages[0][0][0]))
    return Rows(rows.pre_t, rows.pre_d, dec_t, dec_d, ret_hold, ret_delay, rows.keys, rows.ret_key)


def _return_rows(setup, stages, b):
    src, dst = stages[-1][0][0], stages[0][0][0]
    total = np.broadcast_to(np.asarray(setup.cost.token_return_s(src, dst, b), float), np.shape(b))
    hold, delay = split_transfer(setup.cluster, src, dst, total)
    return hold, delay, _keys(setup, stages), hop_resource(setup.cluster, src, dst)


def _keys(setup, stages):
    keys = []
    for j, (devs, _, _) in enumerate(stages):
        if j > 0:
            keys.append(hop_resource(setup.cluster, stages[j - 1][0][0], devs[0]))
        keys.append(("stage", j))
    return keys


# ---- the timeline --------------------------------------------------------------------------
def timeline(rows: Rows, work: DecodeWork, batch_size: int, prefill_completion=None) -> dict:
    """Latency (end to end), TTFT, TPOT (median, p90) and output tokens/s of a plan.

    Exact where no two positions share a link (``rows.shared`` false).  Otherwise the
    prefill is still exact (``evaluate.shared_completion``) but decode items see only their
    own position's queue: their few bytes hardly contend, and such a plan's ``predicted``
    comes from the simulator (``plan_figures``)."""
    C = prefill_completion if prefill_completion is not None else prefill_times(rows)
    P = C.shape[0]
    last = C[:, -1].tolist() if C.size else [0.0] * P
    c_last = C[-1].tolist() + [0.0] * work.n_decode  # the last stage's completion of every item
    t = rows.dec_t.T.tolist()  # (items, positions)
    d = rows.dec_d.T.tolist()
    rh, rd = rows.ret_hold.tolist(), rows.ret_delay.tolist()
    ret_free = 0.0
    n_pre = work.n_prefill
    deps = [work.deps(s, g) for s in range(work.steps) for g in range(work.n_groups)]
    for k in range(work.n_decode):
        dep = max(c_last[x] for x in deps[k])
        if rh[k] > 0 or rd[k] > 0:
            ret_free = max(ret_free, dep) + rh[k]
            arrive = ret_free + rd[k]
        else:
            arrive = dep
        tk, dk = t[k], d[k]
        for p in range(P):
            end = (last[p] if last[p] > arrive else arrive) + tk[p]
            last[p] = end
            arrive = end + dk[p]
        c_last[n_pre + k] = last[P - 1]
    latency = max(last) if last else 0.0
    times = [[c_last[i] for i in work.token_items(s)] for s in range(batch_size)]
    return {"latency_s": latency, **decode_figures(times, 0.0, latency)}


def prefill_times(rows: Rows) -> np.ndarray:
    """(positions, prefill items) completion times (exact, shared links included)."""
    if rows.shared:
        return shared_completion(rows.pre_t, rows.keys, rows.pre_d)
    return chain_completion(rows.pre_t, rows.pre_d)


def simulated_figures(setup, plan) -> dict:
    """The simulator's figures (plans whose hops share a link, or devices a machine)."""
    from hpipe.sim import simulate

    r = simulate(setup, plan)
    return {k: getattr(r, k) for k in ("latency_s", "ttft_s", "tpot_s", "tpot_p90_s", "output_tokens_per_s")}


def plan_figures(setup, plan) -> dict:
    """A plan's predicted generation figures (what ``Plan.predicted`` carries)."""
    from hpipe.sim.decode import decode_groups

    plan = plan if plan.decode_micro_batches else plan.model_copy(update={"decode_micro_batches": decode_groups(plan)})
    work = DecodeWork.of(setup, plan)
    rows = rows_from_cost(setup, plan, work)
    if rows.shared or setup.cost.colocated():
        return simulated_figures(setup, plan)
    return timeline(rows, work, setup.batch_size)


# ---- the search ----------------------------------------------------------------------------
class _ExtraItems(alg1.PartitionCosts):
    """Algorithm 1's tables over the prefill items plus (or only) the decode items."""

    def __init__(self, tables, slices, sizes, work: DecodeWork, with_prefill: bool):
        super().__init__(tables, slices, sizes, recut=True)
        db_, dn, dc = work.arrays()
        if with_prefill:
            self.n, self.c, self.b = (np.concatenate(x) for x in ((self.n, dn), (self.c, dc), (self.b, db_)))
        else:
            self.n, self.c, self.b = dn, dc, db_
        self.key = ("gen", with_prefill, tuple(slices), tuple(sizes), work.steps, work.group_sizes)


def decode_aware_partitions(tables, sequences, slices, sizes, work: DecodeWork, top_sequences: int = 4,
                            caps=(0.0, 0.05, 0.2, 1.0, math.inf)) -> dict:
    """Partitions Algorithm 1 finds when the decode steps count too (see the module doc), in the
    order found (a dict used as an ordered set: string hashes vary between runs, plans must not)."""
    out: dict = {}
    for with_prefill in (True, False):
        pc = _ExtraItems(tables, slices, sizes, work, with_prefill)
        probs = []
        for seq in sequences:
            smats, links = alg1.sequence_problem(pc, seq)
            val, st = alg1.minmax_dp(smats, links)
            if st is not None:
                probs.append((val, len(probs), seq, smats, links, st))
        probs.sort(key=lambda p: p[:2])
        for val, _, seq, smats, links, st in probs[:top_sequences]:
            out[alg1.to_partition(seq, st)] = None
            for _, st2 in alg1.minsum_dp(smats, links, [val * (1 + e) if math.isfinite(e) else math.inf
                                                        for e in caps]):
                if st2 is not None:
                    out[alg1.to_partition(seq, st2)] = None
    return out


@dataclass
class Choice:
    key: tuple
    figures: dict
    partition: object
    slices: tuple
    micro_batches: int
    groups: int


def score(tables, part, slices, m: int, groups: int, rows_cache=None, max_steps: int | None = None) -> dict:
    """Figures of one candidate (``timeline``: exact unless its hops share a link).

    ``max_steps`` (a quick look, for ranking): only the first decode steps are played and
    the decode time after the first token is scaled up to all steps."""
    setup = tables.setup
    cache = rows_cache if rows_cache is not None else {}
    sizes = micro_batch_sizes(setup.batch_size, m)
    steps = decode_steps(setup.output_tokens)
    played = min(steps, max_steps) if max_steps else steps
    work = DecodeWork(seq_len=setup.seq_len, output_tokens=played + 1, prefill_sizes=tuple(sizes),
                      n_slices=len(slices), group_sizes=tuple(micro_batch_sizes(setup.batch_size, groups)))
    rows = rows_from_tables(tables, part.stages, work, slices, sizes, cache)
    ck = ("C", tuple(slices), tuple(sizes))
    if ck not in cache:  # the prefill does not depend on the decode groups
        cache[ck] = prefill_times(rows)
    fig = timeline(rows, work, setup.batch_size, cache[ck])
    if played < steps and played > 0:
        fig["latency_s"] = fig["ttft_s"] + (fig["latency_s"] - fig["ttft_s"]) * steps / played
    return fig


def choose(tables, sequences, candidates, slice_for, objective: str, micro_options, fixed_slices=None,
           group_choices=None, slice_top: int = 4, quick_steps: int = 32, extra_partitions=()) -> Choice | None:
    """The best (partition, slices, micro-batches, decode groups) for ``objective``.

    ``candidates``: (partition, slices, micro_batches) from the prefill search, its best first;
    the ``slice_top`` most promising decode-aware partitions are sliced and join them, as do
    ``extra_partitions`` (the baselines' splits, tensor-parallel host stages among them);
    ``slice_for(partition, sizes)`` -> (prefill makespan, slices) or None slices a
    decode-aware partition for the prefill; ``micro_options`` the micro-batch counts to try
    on those.  ``group_choices`` pins the decode group counts (default: ``group_options``)."""
    setup = tables.setup
    groups = group_choices or group_options(setup.batch_size)
    cands = dict.fromkeys((p, tuple(s), m) for p, s, m in candidates)  # ordered: deterministic ties
    # decode-aware partitions, found with the best prefill candidate's slicing and with one group
    # (the per-token loop) and with as many groups as sequences (the pipelined steady state)
    if candidates:
        base_part, base_slices, base_m = candidates[0]
        sizes = micro_batch_sizes(setup.batch_size, base_m)
        found: dict = {}
        for g in sorted({1, setup.batch_size}):
            work = DecodeWork(seq_len=setup.seq_len, output_tokens=setup.output_tokens, prefill_sizes=tuple(sizes),
                              n_slices=len(base_slices), group_sizes=tuple(micro_batch_sizes(setup.batch_size, g)))
            found.update(decode_aware_partitions(tables, sequences, base_slices, sizes, work))
        # rank them with the base slicing (cut down where memory asks) and slice the best for
        # the prefill (a partition the prefill search met was sliced for its micro-batches only)
        quick = []
        for part in found:
            nmax = tables.max_slice_tokens(part.stages, max(sizes))
            if nmax == 0:
                continue
            sl = alg1.recut_slices(base_slices, nmax, setup.granularity)
            rc = {}
            key = min(objective_key(score(tables, part, sl, base_m, g, rc, max_steps=quick_steps), objective)
                      for g in sorted({1, setup.batch_size}))
            quick.append((key, len(quick), part))
        # micro-batch counts: the extremes (whole batch, one sequence each) and those the best
        # prefill candidates use (slicing for every count would cost more than the rest together)
        ms = list(dict.fromkeys([min(micro_options), max(micro_options)] + [m for _, _, m in candidates[:3]]))
        for part in [p for _, _, p in sorted(quick)[:slice_top]] + list(extra_partitions):
            best = None
            for m in ms:
                sizes = micro_batch_sizes(setup.batch_size, m)
                if fixed_slices is not None:
                    if tables.max_slice_tokens(part.stages, max(sizes)) < max(fixed_slices):
                        continue
                    r = (0.0, tuple(fixed_slices))
                else:
                    r = slice_for(part, sizes)
                if r is not None and (best is None or r[0] < best[0]):
                    best = (r[0], tuple(r[1]), m)
            if best is not None:
                cands[(part, best[1], best[2])] = None
    choice = None
    caches: dict = {}
    for part, slices, m in cands:
        rc = caches.setdefault(part, {})
        for g in groups:
            fig = score(tables, part, slices, m, g, rc)
            key = objective_key(fig, objective)
            if choice is None or key < choice.key:
                choice = Choice(key, fig, part, slices, m, g)
    return choice
