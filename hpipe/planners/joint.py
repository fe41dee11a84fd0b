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
micro-batches that divides the batch is tried (slicing and micro-batching
compose: each micro-batch is sliced alike), and the plan with the least exact
makespan wins.
"""

from __future__ import annotations

import math

import numpy as np

from hpipe.errors import InfeasibleError
from hpipe.memory import raise_if_model_cannot_fit
from hpipe.planners import partition as alg1
from hpipe.planners import slicing as alg2
from hpipe.planners.common import finish, items_arrays, micro_batch_sizes, uniform_slices
from hpipe.planners.costs import CostTables


def micro_batch_options(batch_size: int) -> list[int]:
    return [m for m in range(1, batch_size + 1) if batch_size % m == 0]


def _items_key(slices, sizes):
    return ("items", tuple(slices), tuple(sizes))


def plan_hpipe(setup, tables: CostTables | None = None, sequences=None, micro_batches=None,
               fixed_slices=None, planner: str = "hpipe", max_rounds: int = 8):
    """Search the joint plan; returns a Plan (or raises InfeasibleError).

    ``fixed_slices`` pins the slicing (gpipe-balanced uses the whole sequence);
    ``micro_batches`` pins the micro-batch count."""
    raise_if_model_cannot_fit(setup)
    tables = tables or CostTables(setup)
    sequences = sequences or alg1.device_sequences(tables)
    options = [micro_batches] if micro_batches else micro_batch_options(setup.batch_size)
    best = (math.inf, None, None, None)
    for m in options:
        sizes = micro_batch_sizes(setup.batch_size, m)
        res = _joint(tables, sequences, sizes, fixed_slices, max_rounds)
        if res is not None and res[0] < best[0]:
            best = (res[0], res[1], res[2], m)
    lat, part, slices, m = best
    if part is None:
        raise InfeasibleError(_no_fit_message(setup, tables, sequences, fixed_slices, planner))
    return finish(setup, planner, part.stages, slices, m)


def _joint(tables, sequences, sizes, fixed_slices, max_rounds):
    """Alternate partition and slicing for one micro-batch split; (latency, partition,
    slices) or None when nothing fits."""
    setup = tables.setup
    g, L = setup.granularity, setup.seq_len // setup.granularity
    n_dev = len(setup.cluster.devices)
    if fixed_slices is not None:
        starts = [list(fixed_slices)]
    else:
        # even slices, finer ones as fallbacks when the first do not fit anywhere
        counts = sorted({min(L, c) for c in (2 * n_dev, 4 * n_dev, L)})
        starts = [uniform_slices(setup.seq_len, g, k) for k in counts]
    for slices in starts:
        best = (math.inf, None, None)
        for _ in range(max_rounds):
            n, c, b = items_arrays(slices, sizes)
            pc = alg1.PartitionCosts(tables, n, c, b, max(slices), max(sizes))
            parts = alg1.search(pc, sequences)
            if not parts:
                break
            round_best = (parts[0][0], parts[0][1], tuple(slices))
            if fixed_slices is None:
                for _, part in parts[:2]:
                    cand = _best_slicing(tables, part, sizes)
                    if cand is not None and cand[0] < round_best[0]:
                        round_best = (cand[0], part, cand[1])
            if round_best[0] < best[0] * (1 - 1e-12):
                best = round_best
                slices = list(round_best[2])
            else:
                break
        if best[1] is not None:
            return best
    return None


def _best_slicing(tables, part, sizes, top: int = 8):
    nmax = alg2.max_slice_tokens(tables, part.stages, max(sizes))
    if nmax == 0:
        return None
    grid = alg2.SliceGrid(tables, part.stages, sizes, nmax)
    cands, _ = alg2.best_slicings(grid, top=top)
    best = None
    for _, s in cands:
        n, c, b = items_arrays(s, sizes)
        lat = alg1.table_makespan(tables, part.stages, n, c, b, _items_key(s, sizes))
        if best is None or lat < best[0]:
            best = (lat, s)
    return best


def _no_fit_message(setup, tables, sequences, fixed_slices, planner):
    """Why nothing fits, in GB: the least possible worst shortfall over all splits of
    the model over the devices (finest slices, one sequence per micro-batch)."""
    g = setup.granularity
    max_slice = max(fixed_slices) if fixed_slices else g
    mem = tables.memory_matrix(1, max_slice, 1)
    worst = math.inf
    for seq in sequences:
        smats = [mem - tables.capacity(d) for d in seq]
        links = np.full((len(seq), len(seq), mem.shape[0]), -math.inf)
        val, _ = alg1.minmax_dp(smats, links, start=-math.inf)
        worst = min(worst, val)
    return (f"{planner}: no split of {setup.model.name} (batch {setup.batch_size} x {setup.seq_len} tokens) "
            f"over the {len(setup.cluster.devices)} devices fits in memory, even with slices of "
            f"{max_slice} tokens: the best split still leaves a device {worst / 1e9:.2f} GB short")
