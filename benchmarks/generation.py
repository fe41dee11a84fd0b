"""Generation planning benchmark: hpipe against brute force on random tiny scenarios, per
objective, and the prefill/decode split on the paper's testbed.

    PYTHONPATH=. python benchmarks/generation.py [--cases N] [--seed S]

1. Quality.  Random scenarios (2-3 custom devices of random FLOP/s, memory bandwidth and
   memory over 1-2 hosts, a 2-block model, 4 granules, batch 1-3, 4-48 output tokens):
   every ordered choice of stages (single devices and tensor-parallel groups of any of a
   host's devices: hpipe's decode search tries one group of a whole host, like or not) x
   cut set x slicing x
   micro-batch count (divisors of the batch) x decode group count is scored exactly
   (``planners.decode.plan_figures``, the simulator's semantics) and the best per objective
   compared with hpipe's plan for that objective.  Target: within 2%, and never below the
   brute force (a plan it missed: the last line says FAIL).
2. The paper testbed with 256 output tokens: every planner's end-to-end latency, TTFT and
   TPOT, and hpipe's planning CPU time.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpipe.errors import InfeasibleError  # noqa: E402
from hpipe.memory import plan_shortfalls, stage_memory_bytes  # noqa: E402
from hpipe.plan import Plan, Stage  # noqa: E402
from hpipe.planners import make_plan  # noqa: E402
from hpipe.planners.decode import OBJECTIVES, objective_key, plan_figures  # noqa: E402
from hpipe.planners.joint import micro_batch_options  # noqa: E402
from hpipe.scenario import PLANNER_NAMES, load_scenario, parse_scenario  # noqa: E402
from hpipe.sim import simulate  # noqa: E402
from hpipe.costmodels.cache import cpu_model  # noqa: E402
from hpipe.models import check_tensor_parallel  # noqa: E402


def random_scenario(rng: random.Random) -> dict:
    n_hosts = rng.choice([1, 2])
    n_dev = rng.randint(2, 3)
    per_host = [1] * n_hosts
    for _ in range(n_dev - n_hosts):
        per_host[rng.randrange(n_hosts)] += 1
    g = rng.choice([16, 64])
    d_model = rng.choice([256, 1024])
    data = {"name": "random-gen", "dtype": "float16",
            "model": {"family": rng.choice(["llama", "gpt"]), "n_layers": 2, "d_model": d_model, "n_heads": 8,
                      "d_ff": 4 * d_model, "vocab_size": rng.choice([2000, 32000]), "max_seq_len": 1024},
            "workload": {"seq_len": 4 * g, "batch_size": rng.randint(1, 3), "output_tokens": rng.choice([4, 16, 48])},
            "costmodel": {"kind": "roofline", "kernel_overhead_us": rng.choice([5.0, 20.0])},
            "planner": {"token_granularity": g, "memory_reserve_gb": 0.0}}
    probe = parse_scenario({**data, "cluster": {"hosts": [{"name": "p", "devices": [
        {"name": "x", "peak_tflops": 1, "memory_gb": 1e6, "memory_bandwidth_gbps": 1, "power_w": 1}]}]}}).resolve()
    need_gb = stage_memory_bytes(probe, 0, probe.n_units, 1, probe.seq_len, probe.batch_size) / 1e9
    hosts = []
    for h, k in enumerate(per_host):
        devices = [{"name": f"gpu{i}", "peak_tflops": rng.choice([0.5, 2.0, 8.0]),
                    "memory_gb": round(need_gb * rng.choice([0.5, 0.8, 2.0]), 9),
                    "memory_bandwidth_gbps": rng.choice([20.0, 50.0, 200.0, 800.0]), "power_w": 100.0}
                   for i in range(k)]
        hosts.append({"name": f"h{h}", "devices": devices,
                      "interconnect": {"bandwidth_gbps": rng.choice([16.0, 64.0]), "latency_us": 10.0}})
    data["cluster"] = {"hosts": hosts}
    if n_hosts > 1:
        data["cluster"]["network"] = {"bandwidth_gbps": rng.choice([0.5, 2.0, 10.0]),
                                      "latency_us": rng.choice([100.0, 1000.0])}
    return data


def compositions(k, g):
    for r in range(1, k + 1):
        for cuts in itertools.combinations(range(1, k), r - 1):
            b = (0, *cuts, k)
            yield [(y - x) * g for x, y in zip(b, b[1:])]


def cut_sets(n_units: int, k: int):
    """Every split of the units into k contiguous runs: [(start, end), ...]."""
    for cuts in itertools.combinations(range(1, n_units), k - 1):
        b = (0, *cuts, n_units)
        yield list(zip(b, b[1:]))


def stage_choices(setup):
    """Every ordered choice of disjoint stage groups: single devices, and any two or more
    devices of one host (as many as the model has heads for).  It had left groups out, and
    hpipe's pair of unlike devices came out 10% "better than brute force"."""
    groups = [(d,) for d in setup.cluster.device_ids]
    for devs in setup.cluster.hosts.values():
        groups += [g for t in range(2, len(devs) + 1) if check_tensor_parallel(setup.model, t) is None
                   for g in itertools.combinations(devs, t)]

    def rec(prefix, used):
        if prefix:
            yield tuple(prefix)
        for g in groups:
            if len(prefix) < setup.n_units and used.isdisjoint(g):
                yield from rec([*prefix, g], used | set(g))

    yield from rec([], frozenset())


def brute_force(setup):
    """Every plan's figures (``stage_choices`` x cuts x slicings x micro-batches x groups)."""
    U = setup.n_units
    out = []
    for groups in stage_choices(setup):
        for ranges in cut_sets(U, len(groups)):
            stages = [Stage(devices=list(devs), units=r) for devs, r in zip(groups, ranges)]
            for slices in compositions(setup.seq_len // setup.granularity, setup.granularity):
                for m in micro_batch_options(setup.batch_size):
                    for g in range(1, setup.batch_size + 1):
                        plan = Plan(planner="brute", scenario=setup.name, stages=stages, slices=slices,
                                    micro_batches=m, decode_micro_batches=g)
                        if not plan_shortfalls(setup, plan):
                            out.append(plan_figures(setup, plan))
    return out


def quality(n_cases: int, seed: int) -> None:
    rng = random.Random(seed)
    gaps = {o: [] for o in OBJECTIVES}
    done = 0
    while done < n_cases:
        data = random_scenario(rng)
        setup = parse_scenario(data).resolve()
        every = brute_force(setup)
        if not every:
            continue
        done += 1
        row = []
        for obj in OBJECTIVES:
            setup.scenario.planner.objective = obj
            best = min(objective_key(f, obj)[0] for f in every)
            try:
                got = objective_key(simulate(setup, make_plan(setup, "hpipe")).model_dump(), obj)[0]
            except InfeasibleError:
                got = float("inf")
            gaps[obj].append(got / best - 1 if best > 0 else 0.0)
            row.append(f"{obj} {gaps[obj][-1]:+.2%}")
        print(f"case {done}: {len(setup.cluster.device_ids)} devices, batch {setup.batch_size}, "
              f"{setup.output_tokens} out, {len(every)} plans: " + ", ".join(row), flush=True)
    ok = True
    for obj, g in gaps.items():
        print(f"{obj:10s} gap to brute force: median {statistics.median(g):.2%}, min {min(g):+.2%}, "
              f"max {max(g):+.2%}, within 2%: {sum(x <= 0.02 for x in g)}/{len(g)}")
        ok &= max(g) <= 0.02 and min(g) > -1e-9  # below the brute force: a plan it did not try
    print("PASS" if ok else "FAIL", "(every objective within 2% of brute force, none below it)")


def paper() -> None:
    path = Path(__file__).resolve().parents[1] / "scenarios" / "paper-llama7b-generate.yaml"
    setup = load_scenario(path).resolve()
    for name in PLANNER_NAMES:
        t = time.process_time()
        plan = make_plan(setup, name)
        cpu = time.process_time() - t
        r = simulate(setup, plan)
        print(f"{name:15s} end-to-end {r.latency_s:7.3f} s  TTFT {r.ttft_s:6.3f} s  decode {r.latency_s - r.ttft_s:6.3f} s  "
              f"TPOT {r.tpot_s * 1e3:6.2f} ms  decode groups {plan.decode_micro_batches}  plan CPU {cpu:.2f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    print(f"{cpu_model()}, load average {os.getloadavg()[0]:.2f} at start (the plan CPU times depend on both)",
          flush=True)
    if not args.skip_quality:
        quality(args.cases, args.seed)
    paper()
