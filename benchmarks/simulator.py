"""How fast the simulator is: simulated work items per second, and the time to simulate
LLaMA-2-70B over four hosts (32 devices) at 32k tokens (target: under 2 s).

    PYTHONPATH=. python benchmarks/simulator.py [--repeat 3]

Two 70B plans: the worst case for the simulator, hand-built (one stage per device,
units shared out in proportion to each device's peak FLOP/s, the finest slicing the
scenario allows: 512 slices of 64 tokens); and, when ``hpipe.planners`` exists, the
scenario's own planner's.  A work item is one (micro-batch, slice) on one stage.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from hpipe.memory import plan_memory_bytes, plan_shortfalls
from hpipe.plan import Plan
from hpipe.result import summarize
from hpipe.scenario import load_scenario
from hpipe.sim import build
from hpipe.sim.engine import run

ROOT = Path(__file__).resolve().parents[1]


def proportional_plan(setup, slice_tokens: int) -> Plan:
    devices = setup.cluster.devices
    speed = np.array([d.spec.peak_tflops(setup.dtype) for d in devices])
    cuts = np.round(np.cumsum(speed) / speed.sum() * setup.n_units).astype(int)
    bounds, start = [], 0
    for i, end in enumerate(cuts):
        end = max(int(end), start + 1)
        end = min(end, setup.n_units - (len(devices) - 1 - i))  # leave a unit for each later stage
        bounds.append((start, end))
        start = end
    bounds[-1] = (bounds[-1][0], setup.n_units)
    return Plan(planner="proportional", scenario=setup.name, slices=[slice_tokens] * (setup.seq_len // slice_tokens),
                stages=[{"devices": [d.id], "units": list(b)} for d, b in zip(devices, bounds)]).check(setup)


def timed(fn, repeat: int):
    """Best wall-clock seconds of ``repeat`` runs (and the last run's answer)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def cpu_s(fn) -> float:
    """CPU seconds of one run: steadier than wall time on a machine shared with others."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def bench(setup, plan, origin: str, repeat: int) -> None:
    short = plan_shortfalls(setup, plan)
    n_work = len(plan.items(setup.batch_size)) * len(plan.stages)
    t_build, spec = timed(lambda: build(setup, plan), repeat)
    t_run, events = timed(lambda: run(spec), repeat)
    t_sum, result = timed(lambda: summarize(setup, plan, events, plan_memory_bytes(setup, plan)), repeat)
    total = t_build + t_run + t_sum
    cpu = cpu_s(lambda: summarize(setup, plan, run(build(setup, plan)), plan_memory_bytes(setup, plan)))
    print(f"plan      {origin}: {len(plan.stages)} stages, {len(plan.slices)} slices, "
          f"{plan.micro_batches} micro-batch(es); {'fits' if not short else 'DOES NOT FIT: ' + str(short[0])}")
    print(f"  work    {n_work} work items, {len(events)} events")
    print(f"  time    cost model {t_build * 1e3:.0f} ms + engine {t_run * 1e3:.0f} ms + metrics "
          f"{t_sum * 1e3:.0f} ms = {total:.3f} s wall, {cpu:.3f} s CPU  "
          f"(target < 2 s: {'met' if total < 2 else 'MISSED'})")
    print(f"  rate    {n_work / t_run:,.0f} work items/s in the engine, {n_work / total:,.0f} end to end")
    print(f"  result  latency {result.latency_s:.2f} s, {result.throughput_tokens_per_s:,.0f} tokens/s, "
          f"bubbles {result.bubble_fraction:.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = ap.parse_args()

    from hpipe.costmodels.cache import cpu_model

    print(f"machine   {cpu_model()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start "
          f"(the rates below are this machine's)")
    setup = load_scenario(ROOT / "scenarios" / "llama70b-4hosts-32k.yaml").resolve()
    print(f"scenario  {setup.name}: {setup.model.name}, batch {setup.batch_size} x {setup.seq_len} tokens, "
          f"{len(setup.cluster.devices)} devices on {len(setup.cluster.hosts)} hosts (best of {args.repeat})")
    bench(setup, proportional_plan(setup, setup.granularity),
          "worst case, hand-built (one stage per device, units by peak FLOP/s, 64-token slices)", args.repeat)
    try:
        from hpipe.planners import make_plan
    except ImportError:
        print("plan      the scenario's planner: hpipe.planners is not available here")
        return
    t_plan, plan = timed(lambda: make_plan(setup, setup.scenario.planner.kind), 1)
    bench(setup, plan, f"the scenario's planner, {plan.planner} ({t_plan:.1f} s to plan)", args.repeat)


if __name__ == "__main__":
    main()
