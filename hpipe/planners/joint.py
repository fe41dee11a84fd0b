"""The hpipe planner: Algorithm 1 and Algorithm 2 together, alternated until neither improves.

The best partition depends on the slices (a stage's busy time is summed over
the work items; its workspace grows with the longest slice) and the best
slicing on the partition.  Starting from even slices, each round

1. searches partitions for the current slices (device orders, subsets, cuts,
   memory caps: ``partition.search``), keeping the best few by exact makespan;
2. for each of those, finds the best slicings by the Algorithm 2 bound
   (``slicing.best_slicings``, within that partition's memory) and scores them
   by exact makespan;

and stops when a round does not lower the exact makespan.  Every count of
micro-batches from 1 to the batch is tried (uneven splits too; slicing and
micro-batching compose: each micro-batch is sliced alike): the alternation itself
for the extremes (the whole batch, one sequence per micro-batch); for the counts
between, a re-slicing of the best partitions those found and ``mid_rounds`` (one)
round of the alternation from the extremes' best slicing, over the device orders the
extremes' first rounds ranked best (the partition search is what tells counts apart:
re-slicing only the extremes' front runners left plans 12.8% behind exhaustive search;
one round rather than two, and the ranked orders rather than all, are heuristic cuts
for planning time, checked against exhaustive search in the tests and soaks).  Stages may be
tensor-parallel groups (``groups``); the best one-stage plan (one device or one
group, one slice) is always a candidate.  Last, the best few plans get a local
improvement pass (``improve``: a cut moved by one unit, a stage split onto an idle
device, two merged, one micro-batch more or fewer, each scored by exact makespan).
The plan with the least exact makespan wins.

Slicings are remembered per (partition, micro-batch sizes) for the whole search
(``_best_slicing``), as are stage and hop rows per item list (``CostTables``): the
rounds, starts, micro-batch counts and the improvement pass meet the same ones
again and again.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from hpipe.errors import InfeasibleError
from hpipe.memory import gb, raise_if_model_cannot_fit
from hpipe.models import decode_steps
from hpipe.planners import improve as local
from hpipe.planners import partition as alg1
from hpipe.planners import slicing as alg2
from hpipe.planners.common import finish, items_arrays, micro_batch_sizes, uniform_slices
from hpipe.planners.costs import CostTables


log = logging.getLogger("hpipe.planners")


def micro_batch_options(batch_size: int) -> list[int]:
    """Every micro-batch count: a count that does not divide the batch gives the first
    micro-batches one sequence more (``Plan.micro_batch_sizes``)."""
    return list(range(1, batch_size + 1))


def improve_plans(n_devices: int) -> int:
    """How many of the best plans the improvement pass starts from.  Four rather than two up
    to 64 devices: on 1,574 random cases against exhaustive search, plans over 2% off fell
    from 3 to 1 (worst 26.6% to 5.1%) for 8% more planning time, a drawn case 62% off (three
    stages of one host's three devices) came within 2%, and the shipped scenarios plan the
    same plans.  Its moves grow with the square of the devices: at 128 devices four cost 15%
    more time and at 512 62% (56 to 92 s CPU) for the same plans, so two there (2-core Intel
    Xeon VM, 2026-12-03)."""
    return 4 if n_devices <= 64 else 2


def plan_hpipe(setup, tables: CostTables | None = None, sequences=None, micro_batches=None,
               fixed_slices=None, planner: str = "hpipe", max_rounds: int = 8, tensor_parallel: bool = True,
               mid_rounds: int = 1, decode_candidates: int = 6, improve_top: int | None = None):
    """Search the joint plan; returns a Plan (or raises InfeasibleError).

    ``fixed_slices`` pins the slicing (gpipe-balanced uses the whole sequence);
    ``micro_batches`` pins the micro-batch count; ``tensor_parallel`` lets a stage be a
    group of identical devices of one host (``groups``); ``improve_top`` best plans get the
    local-improvement pass (``improve``; 0: none; default ``improve_plans``)."""
    raise_if_model_cannot_fit(setup)
    tables = tables or CostTables(setup)
    sequences = sequences or alg1.device_sequences(tables)
    options = [micro_batches] if micro_batches else micro_batch_options(setup.batch_size)
    # One-stage plans first (the whole model on one device or one TP group, one slice):
    # a pipeline is returned only when it is predicted faster than the best of them.
    best = _best_one_stage(tables, options, fixed_slices, tensor_parallel)
    # The full alternation runs for the extreme micro-batch counts (the whole batch at
    # once, one sequence each); every count between runs it too, started from the
    # slicings and partitions the extremes found (the partition search is what tells
    # counts apart: the best cut set for two micro-batches need not be among the best
    # few for one or for six).
    full = [m for m in options if m in (min(options), max(options))]
    good: dict = {}
    seeds: list = []
    front: list = []  # the device orders the extremes' first rounds ranked best (what the counts between search)
    scored: list = []  # every (prefill makespan, partition, slices, micro-batches) seen: generation's candidates
    if best[1] is not None:
        scored.append((best[0], best[1], tuple(best[2]), best[3]))
    for m in full:
        sizes = micro_batch_sizes(setup.batch_size, m)
        res, sliced = _joint(tables, sequences, sizes, fixed_slices, max_rounds, tp=tensor_parallel, front=front)
        if res is not None:
            seeds.append((res[0], list(res[2])))
            scored.append((res[0], res[1], tuple(res[2]), m))
            if res[0] < best[0]:
                best = (res[0], res[1], res[2], m)
        for part, r in sliced.items():
            if r is not None:
                good[part] = min(good.get(part, math.inf), r[0])
                scored.append((r[0], part, tuple(r[1]), m))
    top = sorted(good, key=good.get)[:3]
    for m in options:
        if m in full:
            continue
        sizes = micro_batch_sizes(setup.batch_size, m)
        rs = (_best_slicings(tables, top, sizes) if fixed_slices is None else
              [_fixed(tables, part, sizes, fixed_slices) for part in top])
        for part, r in zip(top, rs):
            if r is not None:
                scored.append((r[0], part, tuple(r[1]), m))
                if r[0] < best[0]:
                    best = (r[0], part, r[1], m)
        # Every count gets its round, however far behind its re-sliced front runners open:
        # the partition search is what finds its own plans.  Cutting the counts whose front
        # runners opened over 10% behind missed a fast host's pair at two micro-batches by
        # 5.3-18% (the extremes' front runners put the embedding on a slow host); on 1,604
        # random cases against exhaustive search, gaps over 2% fell from 8 to 4 (over 10%:
        # 5 to 1) for 16% more planning time there, and none on the shipped scenarios
        # (2-core Intel Xeon VM, 2026-12-03).
        if seeds:
            seeds.sort()
            res, _ = _joint(tables, front or sequences, sizes, fixed_slices, mid_rounds, tp=tensor_parallel,
                            starts=[sl for _, sl in seeds[:1]])
            if res is not None:
                scored.append((res[0], res[1], tuple(res[2]), m))
                if res[0] < best[0]:
                    best = (res[0], res[1], res[2], m)
    # a local-improvement pass over the best few (``improve``: small moves, exact scores);
    # hpipe's own search only (gpipe-balanced stands for the balanced partition alone)
    if improve_top is None:
        improve_top = improve_plans(len(tables.devices))
    if best[1] is not None and improve_top and planner == "hpipe":
        slice_for = ((lambda p, sz: _best_slicing(tables, p, sz)) if fixed_slices is None else
                     (lambda p, sz: _fixed(tables, p, sz, fixed_slices)))
        firsts: dict = {}  # each partition's best (latency, slices, micro-batches) seen, best first
        for v, p, s_, k in sorted(scored, key=lambda x: x[0]):
            firsts.setdefault(p, (v, s_, k))
        for p, (v, s_, k) in list(firsts.items())[:improve_top]:
            r = local.improve(tables, (v, p, s_, k), slice_for, options, recut=fixed_slices is None,
                              slice_many=(lambda ps, sz: _best_slicings(tables, ps, sz)) if fixed_slices is None
                              else None)
            if r[1] is not p or r[3] != k:
                scored.append((r[0], r[1], tuple(r[2]), r[3]))
            if r[0] < best[0]:
                best = r
    lat, part, slices, m = best
    if part is None:
        raise InfeasibleError(_no_fit_message(setup, tables, sequences, fixed_slices, planner, tensor_parallel))
    if decode_steps(setup.output_tokens) and planner == "hpipe":
        # Generation: the partition, slicing, micro-batches and decode groups that serve both
        # phases best for the scenario's objective (hpipe.planners.decode).
        from hpipe.planners import decode

        from hpipe.planners.baselines import even_stages, host_stages, host_stages_problem

        cands = [(p, s, k) for _, p, s, k in sorted(scored, key=lambda x: x[0])]
        cands = list(dict.fromkeys(cands))[:decode_candidates]
        # the baselines' splits too: one tensor-parallel stage per host reads each weight once
        # per step on every device at 1/tp, which decode (weight-read bound) rewards
        splits = (even_stages,) if host_stages_problem(setup) else (even_stages, host_stages)
        extra = [alg1.Partition(tuple((tuple(d), s, e) for d, s, e in f(setup))) for f in splits]
        pick = decode.choose(tables, sequences, cands, lambda p, sz: _best_slicing(tables, p, sz),
                             setup.objective, options, fixed_slices, extra_partitions=extra)
        return finish(setup, planner, pick.partition.stages, pick.slices, pick.micro_batches,
                      decode_groups=pick.groups)
    return finish(setup, planner, part.stages, slices, m)


def _best_one_stage(tables, options, fixed_slices, tensor_parallel):
    """(latency, partition, slices, micro-batches) of the best plan that runs the whole
    model as one stage (one device, or one TP group of each kind and degree) on one
    unsliced slice (the pinned slices, if any); (inf, None, None, None) if none fits."""
    setup = tables.setup
    U = setup.n_units
    slices = tuple(fixed_slices) if fixed_slices is not None else (setup.seq_len,)
    best = (math.inf, None, None, None)
    seen = set()
    for d in setup.cluster.device_ids:
        for t in [1] + (tables.tp_degrees if tensor_parallel else []):
            devs = tables.group_of(d, t)
            if len(devs) < t or (devs, t) in seen:
                continue
            seen.add((devs, t))
            part = alg1.Partition(((devs, 0, U),))
            for m in options:
                sizes = micro_batch_sizes(setup.batch_size, m)
                if tables.max_slice_tokens(part.stages, max(sizes)) < max(slices):
                    continue
                n, c, b = items_arrays(slices, sizes)
                key = ("items", tuple(slices), tuple(sizes))
                lat = alg1.table_makespan(tables, part.stages, n, c, b, key, tables.rows_cache(key))
                if lat < best[0]:
                    best = (lat, part, slices, m)
    return best


def _fixed(tables, part, sizes, slices):
    if tables.max_slice_tokens(part.stages, max(sizes)) < max(slices):
        return None
    n, c, b = items_arrays(slices, sizes)
    key = ("items", tuple(slices), tuple(sizes))
    return alg1.table_makespan(tables, part.stages, n, c, b, key, tables.rows_cache(key)), tuple(slices)


def _joint(tables, sequences, sizes, fixed_slices, max_rounds, keep_sequences: int = 8, slice_top: int = 3,
           second_start_margin: float = 0.1, tp: bool = True, starts=None, front: list | None = None):
    """Alternate partition and slicing for one micro-batch split.  Returns (best, sliced):
    best is (latency, partition, slices) or None when nothing fits; sliced maps every
    partition that was sliced to its (latency, slices) or None."""
    setup = tables.setup
    g, L = setup.granularity, setup.seq_len // setup.granularity
    n_dev = len(setup.cluster.devices)
    if fixed_slices is not None:
        starts = [list(fixed_slices)]
    elif starts is not None:
        starts = [list(x) for x in starts]
    else:
        # Two starts, as the alternation can settle in a local optimum: even slices
        # (a pipeline), and the whole sequence (no token pipeline: what wins when there
        # is too little work to fill one).  Finer even slices are fallbacks for when
        # neither fits anywhere.
        counts = sorted({min(L, c) for c in (2 * n_dev, 1)}, reverse=True)
        starts = [uniform_slices(setup.seq_len, g, k) for k in counts]
        starts += [uniform_slices(setup.seq_len, g, k) for k in sorted({min(L, 4 * n_dev), L})]
    sliced: dict = {}  # partition -> its best slicing (same partition, same answer)
    found = (math.inf, None, None)
    for start_no, slices in enumerate(starts):
        best = (math.inf, None, None)
        seqs = sequences
        for rnd in range(max_rounds):
            t0 = time.perf_counter()
            parts, ranked = _search(tables, slices, sizes, seqs, fixed_slices is None, tp)
            if not parts:
                break
            # later rounds change the slices, not which orders are good: keep the front runners
            seqs = ranked[:keep_sequences]
            if front is not None and rnd == 0:
                front.extend(s_ for s_ in seqs if s_ not in front)
            round_best = parts[0]
            if fixed_slices is None:
                # the runners-up too: a partition that is worse with these slices may
                # be better with its own
                new = [part for _, part, _ in parts[:slice_top] if part not in sliced]
                sliced.update(zip(new, _best_slicings(tables, new, sizes)))
                for _, part, _ in parts[:slice_top]:
                    cand = sliced[part]
                    if cand is not None and cand[0] < round_best[0]:
                        round_best = (cand[0], part, cand[1])
            log.debug("micro-batches %d round %d: partition %.6g s, sliced %.6g s (%d slices, %d stages), %.3f s",
                      len(sizes), rnd, parts[0][0], round_best[0], len(round_best[2]),
                      len(round_best[1].stages), time.perf_counter() - t0)
            if start_no > 0 and rnd == 0 and round_best[0] > found[0] * (1 + second_start_margin):
                break  # a later start that opens far behind is not pursued
            if round_best[0] < best[0] * (1 - 1e-4):  # stop at no (meaningful) improvement
                best = round_best
                slices = list(round_best[2])
            else:
                break
        if best[0] < found[0]:
            found = best
        if found[1] is not None and start_no >= 1:
            break  # the fallbacks only serve when neither start fits
    return (found if found[1] is not None else None), sliced


def _search(tables, slices, sizes, seqs, recut: bool, tp: bool):
    """``partition.search`` over ``seqs`` for these slices and micro-batch sizes, and the
    sequences it ranked; remembered in the tables, as the alternation often searches
    the same item list over the same sequences again (a round whose slicing did not
    change, a later start that reaches the slicing an earlier one did)."""
    ck = ("search", tuple(slices), tuple(sizes), tuple(seqs), recut, tp)
    if ck not in tables._cache:
        pc = alg1.PartitionCosts(tables, slices, sizes, recut=recut, tp=tp)
        ranked: list = []
        parts = alg1.search(pc, seqs, ranked_sequences=ranked)
        tables._cache[ck] = (parts, ranked)
    parts, ranked = tables._cache[ck]
    return list(parts), list(ranked)


def _best_slicing(tables, part, sizes, top: int = 8):
    """(exact makespan, slices) of the partition's best slicing for these micro-batch
    sizes (Algorithm 2's best few by its bound, scored exactly), or None when not even
    one granule fits.  Remembered in the tables: the alternation, the micro-batch
    counts, the improvement pass and generation's search ask again for the same ones."""
    return _best_slicings(tables, [part], sizes, top)[0]


def _best_slicings(tables, parts, sizes, top: int = 8) -> list:
    """``_best_slicing`` of several partitions, their Algorithm 2 searches run side by side
    (``slicing.best_slicings_many``: one DP pass for all)."""
    keys = [("best-slicing", p.stages, tuple(sizes), top) for p in parts]
    todo = {}
    for p, ck in zip(parts, keys):
        if ck not in tables._cache and ck not in todo:
            nmax = alg2.max_slice_tokens(tables, p.stages, max(sizes))
            if nmax == 0:
                tables._cache[ck] = None
            else:
                todo[ck] = alg2.SliceGrid(tables, p.stages, sizes, nmax)
    if todo:
        for (ck, grid), (cands, _) in zip(todo.items(), alg2.best_slicings_many(list(todo.values()), top=top)):
            slicings = [s for _, s in cands]
            tables._cache[ck] = min(zip(grid.makespans(slicings), slicings), default=None)
    return [tables._cache[ck] for ck in keys]


def _no_fit_message(setup, tables, sequences, fixed_slices, planner, tp: bool = True):
    """Why nothing fits, in GB: the least possible worst shortfall over all splits of
    the model over the devices (finest slices, one sequence per micro-batch), stages
    being single devices or (``tp``) tensor-parallel groups, as the search has them
    (``partition.sequence_problem``): a model that only a group can hold is not
    reported short by what a single device lacks."""
    g = setup.granularity
    max_slice = max(fixed_slices) if fixed_slices else g
    worst = math.inf
    for seq in sequences:
        kinds = [tables.kind[d] for d in seq]
        smats, run = [], 0
        for m, d in enumerate(seq):
            run = run + 1 if m and kinds[m] == kinds[m - 1] else 1
            degrees = [1] + ([t for t in tables.tp_degrees if t <= run] if tp else [])
            smats.append({t: tables.memory_matrix(t, max_slice, 1) - tables.capacity(d) for t in degrees})
        U = setup.n_units
        links = np.full((len(seq), len(seq), U + 1), -math.inf)
        val, _ = alg1.minmax_dp(smats, links, start=-math.inf)
        worst = min(worst, val)
    return (f"{planner}: no split of {setup.model.name} (batch {setup.batch_size} x {setup.seq_len} tokens) "
            f"over the {len(setup.cluster.devices)} devices fits in memory, even with slices of "
            f"{max_slice} tokens: the best split still leaves a device {gb(worst)} GB short")


