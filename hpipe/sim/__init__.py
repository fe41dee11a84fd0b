"""The simulator behind `hpipe simulate`: a Plan on a Setup in, a RunResult out.

``build`` turns a plan into a ``PipelineSpec`` whose every duration comes from
the scenario's cost model (generation adds the decode steps and their feedback
edge: ``hpipe.sim.decode``; the very calls the planners make, so a planner's
prediction and the simulation agree wherever the plan has no contention the
planner ignored); ``engine.run`` plays it out; ``hpipe.result.summarize``
turns the timeline into the Result figures, the same code path as measured
runs.  A plan that does not fit in a device's memory is still simulated (its
timeline shows what it would do) but its result is marked infeasible, naming
each device and its shortfall.
"""

from __future__ import annotations

import numpy as np

from hpipe.codecs import plan_boundary_costs, stage_codec_s
from hpipe.costmodels import split_transfer, with_step_overhead
from hpipe.memory import plan_memory_bytes, plan_shortfalls
from hpipe.plan import Plan
from hpipe.result import RunResult, decode_figures, summarize
from hpipe.sim.engine import HopSpec, PipelineSpec, StageSpec, run

__all__ = ["build", "simulate", "infeasible_result", "directed_links", "PipelineSpec"]


def _vec(x, n: int) -> np.ndarray:
    """A cost-model answer as a float vector of one value per work item."""
    return np.broadcast_to(np.asarray(x, float), (n,)).astype(float)


def directed_links(route, src: str) -> list[tuple[str, str]]:
    """The route's edges oriented from ``src`` along the path, in path order."""
    return route.directed(src)


def _link_name(edge: tuple[str, str]) -> str:
    return f"{edge[0]}->{edge[1]}"


def bottleneck_link(route, edges) -> str | None:
    """The narrowest link of a route (``route.links`` lists it first), named as oriented
    along the path: the track a transfer is drawn on, in simulated and measured timelines."""
    bottleneck = next((e for e in edges if set(e) == set(route.links[0])), None) if edges else None
    return _link_name(bottleneck) if bottleneck else None


def transfer_link(cluster, src: str, dst: str) -> str | None:
    route = cluster.route(src, dst)
    return bottleneck_link(route, directed_links(route, src))


def build(setup, plan: Plan, decode: bool = True) -> PipelineSpec:
    """Every duration of the plan, from the setup's cost model, vectorised over work items
    (generation's decode steps too, unless ``decode`` is False)."""
    cost = setup.cost
    db = setup.dtype_bytes
    items = plan.items(setup.batch_size)
    work = DecodeWork.of(setup, plan) if setup.output_tokens and decode else None
    if work is not None:  # generation: the decode steps follow the prefill on every stage
        items = items + work.items()
    k = len(items)
    # the decode steps among the items (none: prefill only), which the step loop's terms price
    decoding = np.arange(k) >= work.n_prefill if work is not None and work.n_decode else None
    mb, sl, b, n, c = (np.array(col) for col in zip(*items))
    b, n, c = b.astype(float), n.astype(float), c.astype(float)

    # Codecs on the boundaries: the stages pay encode and decode, the hops move the wire bytes.
    codecs = plan_boundary_costs(setup, plan, n, b, work.n_prefill if work is not None else None)
    stages = []
    for j, st in enumerate(plan.stages):
        devs = tuple(st.devices)
        codec_s = _vec(stage_codec_s(codecs, j), k)
        total = _vec(cost.stage_compute_s(st.start, st.end, list(devs), n, c, b), k) + codec_s
        spec = StageSpec(devices=devs, compute_s=total)
        alone = cost.stage_compute_alone_s(st.start, st.end, list(devs), n, c, b)
        if alone is not None:
            spec.alone_compute_s = _vec(alone, k) + codec_s
        if decoding is not None and len(plan.stages) > 1:
            # A stage of a multi-stage decode computes its steps slower than the profile's
            # back-to-back chain, whether it waited for its input (one group) or found it
            # queued (two groups: +15-18% CPU time, no wait; decode_gaps, quiet).
            scale = np.where(decoding, cost.stage_after_wait_factor(devs), 1.0)
            spec.compute_s = spec.compute_s * scale
            if spec.alone_compute_s is not None:
                spec.alone_compute_s = spec.alone_compute_s * scale
        if st.tp > 1:
            # The terms stage_compute_s sums, kept apart: the scatter and the all-reduces
            # hold the host's links in the engine (so they queue behind pipeline hops on the
            # same links); the shards take the rest of `total`.
            units = setup.units[st.start:st.end]
            split = [u for u in units if u.kind in cost.SPLIT_KINDS]
            spec.device_compute_s = np.stack([
                _vec(sum(cost.unit_time_s(u, d, n, c, b, st.tp if u.kind in cost.SPLIT_KINDS else 1)
                         for u in units if i == 0 or u.kind not in cost.LEADER_KINDS), k)
                for i, d in enumerate(devs)])
            spec.device_compute_s[0] += codec_s  # the leader decodes the input, encodes the output
            spec.allreduce_s = _vec(sum((cost.allreduce_time_s(list(devs), u.tp_allreduce_bytes(n, b, db))
                                         for u in split), np.zeros(k)), k)
            busy = [cost.allreduce_busy_time_s(list(devs), u.tp_allreduce_bytes(n, b, db)) for u in split]
            if split and all(x is not None for x in busy):
                # never below the alone price: two noisy fits can cross at large sizes (1-4 MiB on
                # local-cpu-4dev, 2026-12-03), and busy neighbours make nothing cheaper
                spec.allreduce_busy_s = np.maximum(_vec(sum(busy), k), spec.allreduce_s)
            ring = [(devs[i], devs[(i + 1) % st.tp]) for i in range(st.tp)]
            spec.allreduce_links = tuple(sorted({_link_name(e) for a, z in ring
                                                 for e in directed_links(setup.cluster.route(a, z), a)}))
            if decoding is not None:
                # The leader hands each decode step's input (stage 0: the ids) to its peers'
                # waiting loops, one stage or many; the shards wait for the slowest hand-over.
                spec.compute_s = spec.compute_s + np.where(decoding, cost.tp_step_overhead_s(devs), 0.0)
            if st.start > 0:
                in_bytes = _vec(setup.units[st.start - 1].out_bytes(n, b, db), k)
                spec.scatter_s = np.stack([_vec(cost.transfer_time_s(devs[0], d, in_bytes), k)
                                           for d in devs[1:]])
                spec.scatter_bytes = in_bytes
                spec.scatter_links = tuple(tuple(_link_name(e) for e in
                                                 directed_links(setup.cluster.route(devs[0], d), devs[0]))
                                           for d in devs[1:])
        stages.append(spec)

    hops: list[HopSpec | None] = [None]
    for j, (prev, st) in enumerate(zip(plan.stages, plan.stages[1:])):
        src, dst = prev.devices[0], st.devices[0]
        nbytes = _vec(codecs[j].wire_bytes, k)
        total = _vec(cost.transfer_time_s(src, dst, nbytes), k)
        route = setup.cluster.route(src, dst)
        # The links are held for the transfer less its latency; latency elapses after they are free.
        hold, latency = split_transfer(setup.cluster, src, dst, total)
        if decoding is not None:  # a decode step's message wakes an idle stage loop
            hold, latency = with_step_overhead(hold, latency, np.where(decoding, cost.step_overhead_s(src, dst), 0.0))
        edges = directed_links(route, src)
        hops.append(HopSpec(src=src, dst=dst, links=tuple(_link_name(e) for e in edges),
                            bottleneck=bottleneck_link(route, edges),
                            hold_s=hold, latency_s=latency, nbytes=nbytes))
    spec = PipelineSpec(items=[(int(a), int(s)) for a, s in zip(mb, sl)], stages=stages, hops=hops,
                        colocated=cost.colocated())
    if work is not None and work.n_decode:
        spec.phases = ["prefill"] * work.n_prefill + ["decode"] * work.n_decode
        spec.feedback = feedback(setup, plan, work)
    return spec


from hpipe.sim.decode import DecodeWork, feedback, token_times  # noqa: E402  (uses the helpers above)


def simulate(setup, plan: Plan) -> RunResult:
    """Simulate one plan; a plan that overflows a device's memory comes back with
    ``feasible`` false and the device and shortfall in ``infeasible``."""
    events = run(build(setup, plan))
    result = summarize(setup, plan, events, plan_memory_bytes(setup, plan))  # names the decode groups it used
    if setup.output_tokens:
        work = DecodeWork.of(setup, plan)
        times = token_times(work, result.events, len(plan.stages), setup.batch_size)
        for k, v in decode_figures(times, 0.0, result.latency_s).items():
            setattr(result, k, v)
    short = plan_shortfalls(setup, plan)
    if short:
        result.feasible = False
        result.infeasible = "does not fit in memory: " + "; ".join(str(s) for s in short)
    return result


def infeasible_result(setup, planner_name: str, reason: str) -> RunResult:
    """The result of a planner that found no plan: no figures, only why (without the planner's
    name in front, which some planners' messages carry: the result names its planner)."""
    while reason.startswith(planner_name + ": "):
        reason = reason[len(planner_name) + 2:]
    return RunResult(planner=planner_name, latency_s=None, throughput_tokens_per_s=None, energy_j=None,
                     dynamic_energy_j=None, peak_memory_mb={}, utilization={}, bubble_fraction=None,
                     plan=None, feasible=False, infeasible=reason)
