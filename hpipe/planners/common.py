"""Pieces every planner shares: work-item arrays, even splits, and turning a choice into a Plan.

``finish`` is the single exit of every planner: it builds the Plan, checks it
against the scenario, refuses it with ``InfeasibleError`` (naming each device's
shortfall in GB) when it does not fit memory, and fills ``predicted`` with the
exact makespan from ``evaluate.makespan_s``.
"""

from __future__ import annotations

import numpy as np

from hpipe.errors import InfeasibleError
from hpipe.memory import plan_shortfalls
from hpipe.plan import Plan, Stage
from hpipe.planners.evaluate import makespan_s


def micro_batch_sizes(batch_size: int, micro_batches: int) -> list[int]:
    """Sizes as ``Plan.micro_batch_sizes`` gives them (the first ones one larger)."""
    q, r = divmod(batch_size, micro_batches)
    return [q + (1 if i < r else 0) for i in range(micro_batches)]


def items_arrays(slices, sizes):
    """(n, c, b) arrays of the work items of ``Plan.items`` for these slices and
    micro-batch sizes, in execution order."""
    slices = np.asarray(slices, float)
    ctx = np.concatenate(([0.0], np.cumsum(slices)[:-1]))
    k = len(sizes)
    n = np.tile(slices, k)
    c = np.tile(ctx, k)
    b = np.repeat(np.asarray(sizes, float), len(slices))
    return n, c, b


def uniform_slices(seq_len: int, granularity: int, count: int) -> list[int]:
    """``count`` slices (at most one per granule) as equal as multiples of the
    granularity allow, the longer ones first."""
    L = seq_len // granularity
    count = max(1, min(count, L))
    q, r = divmod(L, count)
    return [(q + (1 if i < r else 0)) * granularity for i in range(count)]


def even_block_split(n_layers: int, n_units: int, k: int) -> list[tuple[int, int]]:
    """Unit ranges of an even split of the transformer blocks over k stages, as GPipe,
    TeraPipe and Megatron-LM split a model: block counts differ by at most one (the
    first stages take the extra), the embedding joins the first stage and the head
    the last.  With more stages than blocks, units are split evenly instead."""
    if k > n_layers:
        q, r = divmod(n_units, k)
        cuts = np.cumsum([0] + [q + (1 if i < r else 0) for i in range(k)])
        return [(int(a), int(b)) for a, b in zip(cuts, cuts[1:])]
    q, r = divmod(n_layers, k)
    blocks = np.cumsum([0] + [q + (1 if i < r else 0) for i in range(k)])
    cuts = [0] + [1 + 2 * int(x) for x in blocks[1:-1]] + [n_units]
    return list(zip(cuts, cuts[1:]))


def finish(setup, planner: str, stages, slices, micro_batches: int, extra: dict | None = None,
           decode_groups: int | None = None) -> Plan:
    """The Plan for this choice, checked, memory-verified and with its exact latency.

    ``stages`` are (devices, start, end) triples.  Generation: ``decode_groups`` groups
    decode at once (default: each micro-batch stays a group, a plain pipeline), and
    ``predicted`` holds the end-to-end latency and the decode figures."""
    plan = Plan(planner=planner, scenario=setup.name,
                stages=[Stage(devices=list(devs), units=(int(s), int(e))) for devs, s, e in stages],
                slices=[int(x) for x in slices], micro_batches=int(micro_batches))
    if setup.output_tokens:
        plan.decode_micro_batches = int(decode_groups or micro_batches)
    plan.check(setup)
    short = plan_shortfalls(setup, plan)
    if short:
        raise InfeasibleError(f"{planner}: the plan does not fit in memory: " + "; ".join(str(s) for s in short))
    plan.predicted = {**predicted_figures(setup, plan), **(extra or {})}
    return plan


def predicted_figures(setup, plan) -> dict:
    """The figures ``Plan.predicted`` holds of ``plan``: for a generating scenario its figures
    end to end (``decode.plan_figures``), else the prefill's exact makespan."""
    if setup.output_tokens:
        from hpipe.planners.decode import plan_figures

        return plan_figures(setup, plan)
    return {"latency_s": makespan_s(setup, plan)}
