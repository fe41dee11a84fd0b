"""The paper's baselines as planners of their own.

* ``base``: an even split of the blocks over all devices (scenario order), the
  whole batch at once, no pipelining.
* ``gpipe``: the same even split, micro-batches of whole sequences pipelined.
* ``gpipe-balanced`` (GP-B): HPipe's balanced split (Algorithm 1 with memory,
  order and subset search) for whole-sequence micro-batches.
* ``terapipe``: the even split, the whole batch pipelined on the token
  dimension with the slicing DP (Algorithm 2).
* ``megatron``: tensor parallel inside each host, an even split of the blocks
  across hosts (pipeline parallel), whole-sequence micro-batches.
* ``tp-terapipe`` (TP-T): the megatron stages with token slicing instead of
  micro-batches.
* ``single``: no pipeline at all -- the whole model on the one device that runs it
  fastest (by the scenario's cost model) among those that hold it; the question
  "does pipelining beat my best card alone?".

Micro-batches default to the scenario's ``planner.micro_batches``, else one
sequence each.  None of them bends to fit memory: a plan that does not fit
raises ``InfeasibleError`` with each device's shortfall.
"""

from __future__ import annotations

from hpipe.errors import InfeasibleError, PlannerInputError
from hpipe.memory import plan_shortfalls
from hpipe.models import check_tensor_parallel
from hpipe.plan import Plan, Stage
from hpipe.planners import slicing as alg2
from hpipe.planners.common import even_block_split, finish, micro_batch_sizes
from hpipe.planners.costs import CostTables
from hpipe.planners.joint import plan_hpipe


def default_micro_batches(setup) -> int:
    return setup.scenario.planner.micro_batches or setup.batch_size


def even_stages(setup):
    """One device per stage, all devices in scenario order, blocks split evenly
    (fewer stages than devices only when there are more devices than units)."""
    devs = setup.cluster.device_ids
    k = min(len(devs), setup.n_units)
    ranges = even_block_split(setup.model.n_layers, setup.n_units, k)
    return [((d,), s, e) for d, (s, e) in zip(devs, ranges)]


def host_stages_problem(setup) -> str | None:
    """Why ``host_stages`` cannot be run, or None: a host with more devices than the model has
    attention heads cannot be one tensor-parallel stage (the runtime refuses it)."""
    for name, devs in setup.cluster.hosts.items():
        why = check_tensor_parallel(setup.model, len(devs))
        if why:
            return f"host {name} has {len(devs)} devices for one tensor-parallel stage, but {why}"
    return None


def host_stages(setup):
    """One tensor-parallel stage per host (scenario order), blocks split evenly."""
    hosts = list(setup.cluster.hosts.values())
    k = min(len(hosts), setup.n_units)
    ranges = even_block_split(setup.model.n_layers, setup.n_units, k)
    return [(tuple(devs), s, e) for devs, (s, e) in zip(hosts, ranges)]


def plan_base(setup):
    return finish(setup, "base", even_stages(setup), [setup.seq_len], 1)


def plan_gpipe(setup):
    return finish(setup, "gpipe", even_stages(setup), [setup.seq_len], default_micro_batches(setup))


def plan_gpipe_balanced(setup):
    return plan_hpipe(setup, micro_batches=default_micro_batches(setup), fixed_slices=[setup.seq_len],
                      planner="gpipe-balanced", tensor_parallel=False)


def plan_terapipe(setup):
    return _token_pipeline(setup, "terapipe", even_stages(setup))


def _checked_host_stages(setup, planner: str):
    """``host_stages``, or this planner does not apply (``PlannerInputError``: its row in a
    comparison, exit 2 alone)."""
    why = host_stages_problem(setup)
    if why:
        raise PlannerInputError(f"{planner}: {why}", field="--planner")
    return host_stages(setup)


def plan_megatron(setup):
    return finish(setup, "megatron", _checked_host_stages(setup, "megatron"), [setup.seq_len],
                  default_micro_batches(setup))


def plan_tp_terapipe(setup):
    return _token_pipeline(setup, "tp-terapipe", _checked_host_stages(setup, "tp-terapipe"))


def _token_pipeline(setup, name, stages):
    """The whole batch, fixed stages, slices from the Algorithm 2 DP (best of its
    candidates by exact makespan)."""
    tables = CostTables(setup)
    sizes = micro_batch_sizes(setup.batch_size, 1)
    nmax = alg2.max_slice_tokens(tables, stages, max(sizes))
    if nmax == 0:
        # not even one granule per slice fits: report the shortfall of the finest slicing
        g = setup.granularity
        plan = Plan(planner=name, scenario=setup.name,
                    stages=[Stage(devices=list(d), units=(s, e)) for d, s, e in stages],
                    slices=[g] * (setup.seq_len // g), micro_batches=1)
        short = plan_shortfalls(setup, plan)
        raise InfeasibleError(f"{name}: the plan does not fit in memory even with slices of {g} tokens: "
                              + "; ".join(str(s) for s in short))
    grid = alg2.SliceGrid(tables, stages, sizes, nmax)
    cands, _ = alg2.best_slicings(grid)
    best = min((grid.makespan(s), s) for _, s in cands)
    return finish(setup, name, stages, best[1], 1)


def plan_single(setup):
    """The whole model on one device: the fastest of those that hold it.

    The batch runs at once (one micro-batch).  Slices come from the same DP as
    terapipe's, the fastest by the cost model: on one device there is no pipeline for
    them to fill, but smaller slices make the workspace fit, and by the roofline they can
    also run faster (cloud-mix's A100: 2.45 s in 9 slices, 2.83 s whole).
    ``predicted["single_device"]`` names the device and ``predicted["sliced_to_fit"]``
    says whether the whole sequence in one slice would not have fit (it had said whether
    the plan was sliced at all, for speed too)."""
    best, reasons = None, []
    seen = set()
    for dev in setup.cluster.devices:
        # devices of one spec and memory are interchangeable alone: try one of each
        key = (dev.spec, dev.usable_memory_bytes)
        if key in seen:
            continue
        seen.add(key)
        try:
            p = _token_pipeline(setup, "single", [((dev.id,), 0, setup.n_units)])
        except InfeasibleError as e:
            reasons.append((dev.usable_memory_bytes, str(e).removeprefix("single: ")))
            continue
        if best is None or p.predicted["latency_s"] < best.predicted["latency_s"]:
            best = p
    if best is None:
        largest = max(reasons, key=lambda r: r[0])[1] if reasons else "the cluster has no device"
        raise InfeasibleError(f"single: no one device holds {setup.model.name} at batch {setup.batch_size} x "
                              f"{setup.seq_len} tokens; the largest: {largest}")
    best.predicted["single_device"] = best.stages[0].devices[0]
    whole = best.model_copy(update={"slices": [setup.seq_len]})
    best.predicted["sliced_to_fit"] = bool(plan_shortfalls(setup, whole))
    return best
