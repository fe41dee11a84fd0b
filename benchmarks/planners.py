"""Planner benchmark: plan quality against exhaustive search, planning time, and how it scales.

    PYTHONPATH=. python benchmarks/planners.py [--cases N] [--seed S] [--skip-quality] [--skip-speed]
                                               [--scaling] [--profile] [--plans] [--repeat N]

1. Quality.  On small random heterogeneous scenarios (2-5 custom devices over 1-2
   hosts, some of them identical so that tensor-parallel groups exist, a 2-block
   model, 3-4 token granules, batch 1-6: ``random_scenario``), the best plan over
   *every* ordered choice of stages (single devices and TP groups), every cut set,
   every slicing and every micro-batch count is found by enumeration
   (``tests.planner_cases.exhaustive``) and compared with hpipe's plan, both
   simulated (``hpipe.sim``).  Target: hpipe within 2% of the best; the gap
   distribution is printed.
2. Speed.  CPU time of ``make_plan`` (the search alone) for the paper's LLaMA-7B
   testbed (target < 0.5 s) and for llama-2-70b over 32 devices of four types in
   four hosts at 32k tokens, granularity 64 (target < 10 s), TP groups searched;
   where the time goes (one run under cProfile, by phase); and the command line as a
   user runs it, start-up included (``hpipe plan scenarios/paper-llama7b.yaml``,
   target <= 1.5 s wall; also the interpreter alone, ``import hpipe.cli`` and loading
   the scenario).  ``--profile`` prints the raw cProfile listing too.
3. Scaling (``--scaling``).  Planning time for 8 / 32 / 128 / 512 devices (hosts of
   8 devices, four GPU types), llama-2-70b at 32k tokens.
4. Ready scenarios (``--plans``).  hpipe's plan, predicted latency and planning CPU time
   on each prefill scenario of scenarios/ (``READY``; the generating one's plans:
   benchmarks/generation.py).
5. Against another checkout (``--against PATH [--rounds N]``, e.g. a worktree of the
   commit before a speed-up): planning CPU time, start-up and ``hpipe plan`` in
   interleaved fresh processes, ratios, and whether every ready scenario's plan is the same.

For the planning-time figures alone (quiet machine):
    PYTHONPATH=. python benchmarks/planners.py --skip-quality --scaling --plans
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpipe.costmodels.cache import cpu_model  # noqa: E402
from hpipe.errors import InfeasibleError  # noqa: E402
from hpipe.memory import stage_memory_bytes  # noqa: E402
from hpipe.plan import Plan, Stage  # noqa: E402
from hpipe.planners import make_plan  # noqa: E402
from hpipe.scenario import load_scenario, parse_scenario  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def scorer():
    """Latency of a plan: simulated if the simulator is there, else the exact recurrence."""
    try:
        from hpipe.sim import simulate  # noqa: F401

        return "simulated (hpipe.sim)", lambda setup, plan: simulate(setup, plan).latency_s
    except Exception:  # noqa: BLE001 - not merged yet
        from hpipe.planners.evaluate import makespan_s

        return "exact recurrence (hpipe.planners.evaluate; simulator not merged)", makespan_s


# ---- 1. quality ----------------------------------------------------------------------------
def random_scenario(rng: random.Random) -> dict:
    """2-5 custom devices (speeds 0.5-8 TFLOP/s, memory 20-200 GB/s) over 1-2 hosts, each
    device a copy of the one before it half the time (a possible TP group), a 2-block model
    of width 256-2048, 3-4 granules of 16-128 tokens, batch 1-6.  Each device's memory is
    a random share (30%-200%) of what the whole model needs, so memory decides the split as
    often as speed does."""
    n_hosts = rng.choice([1, 2, 2])
    n_dev = rng.randint(max(2, n_hosts), 5)
    per_host = [1] * n_hosts
    for _ in range(n_dev - n_hosts):
        per_host[rng.randrange(n_hosts)] += 1
    g = rng.choice([16, 64, 128])
    d_model = rng.choice([256, 1024, 2048])
    data = {"name": "random", "dtype": "float16",
            "model": {"family": rng.choice(["llama", "gpt"]), "n_layers": 2, "d_model": d_model,
                      "n_heads": 8, "d_ff": 4 * d_model, "vocab_size": rng.choice([2000, 32000]),
                      "max_seq_len": 1024},
            "workload": {"seq_len": g * rng.randint(3, 4), "batch_size": rng.randint(1, 6)},
            "costmodel": {"kind": "roofline", "kernel_overhead_us": rng.choice([5.0, 20.0])},
            "planner": {"token_granularity": g, "memory_reserve_gb": 0.0}}
    # what the whole model needs (weights, KV cache, workspace of the whole sequence)
    probe = parse_scenario({**data, "cluster": {"hosts": [{"name": "p", "devices": [
        {"name": "x", "peak_tflops": 1, "memory_gb": 1e6, "memory_bandwidth_gbps": 1, "power_w": 1}]}]}}).resolve()
    need_gb = stage_memory_bytes(probe, 0, probe.n_units, 1, probe.seq_len, probe.batch_size) / 1e9
    hosts = []
    for h, k in enumerate(per_host):
        devices = []
        for i in range(k):
            if i and rng.random() < 0.5:
                devices.append({**devices[-1], "name": f"gpu{i}"})
                continue
            devices.append({"name": f"gpu{i}", "peak_tflops": rng.choice([0.5, 1.0, 2.0, 4.0, 8.0]),
                            "memory_gb": round(need_gb * rng.choice([0.3, 0.5, 0.8, 2.0]), 9),
                            "memory_bandwidth_gbps": rng.choice([20.0, 50.0, 200.0]), "power_w": 100.0})
        hosts.append({"name": f"h{h}", "devices": devices,
                      "interconnect": {"bandwidth_gbps": rng.choice([16.0, 64.0, 2400.0]), "latency_us": 10.0}})
    data["cluster"] = {"hosts": hosts}
    if n_hosts > 1:
        data["cluster"]["network"] = {"bandwidth_gbps": rng.choice([0.5, 2.0, 10.0]), "latency_us": 100.0}
    return data


def quality(cases: int, seed: int):
    from hpipe.sim import simulate
    from tests.planner_cases import exhaustive

    def score(setup, plan):
        return simulate(setup, plan).latency_s

    rng = random.Random(seed)
    print(f"1. Plan quality: hpipe vs exhaustive enumeration ({cases} random scenarios, both simulated)")
    print(f"   {'case':>4} {'devs':>4} {'units':>5} {'tokens':>6} {'batch':>5}  {'best s':>10} {'hpipe s':>10} "
          f"{'gap':>7}  {'enum s':>7} {'plan s':>7}  best plan / hpipe's (stages as tp:units, slices, micro-batches)")
    gaps = []
    done = 0
    while done < cases:
        data = random_scenario(rng)
        setup = parse_scenario(data).resolve()
        t0 = time.perf_counter()
        lat, stages, slices, m = exhaustive(setup)
        t_enum = time.perf_counter() - t0
        if stages is None:
            continue  # nothing fits: draw another
        ref = Plan(planner="exhaustive", scenario="random", slices=list(slices), micro_batches=m,
                   stages=[Stage(devices=list(d), units=(a, b)) for d, a, b in stages])
        best_s = score(setup, ref)
        t0 = time.perf_counter()
        try:
            plan = make_plan(setup, "hpipe")
        except InfeasibleError as e:
            print(f"   {done:>4} hpipe found nothing although the enumeration did: {e}")
            gaps.append(math.inf)
            done += 1
            continue
        t_plan = time.perf_counter() - t0
        got = score(setup, plan)
        gap = got / best_s - 1
        gaps.append(gap)
        print(f"   {done:>4} {len(setup.cluster.devices):>4} {setup.n_units:>5} {setup.seq_len:>6} "
              f"{setup.batch_size:>5}  {best_s:>10.6f} {got:>10.6f} {gap:>7.2%}  {t_enum:>7.2f} {t_plan:>7.3f}  "
              f"{_brief(ref)} / {_brief(plan)}")
        done += 1
    within = sum(g <= 0.02 for g in gaps)
    qs = statistics.quantiles(gaps, n=10) if len(gaps) > 1 else gaps
    print(f"   gap of hpipe to the best: mean {statistics.mean(gaps):.2%}, median {statistics.median(gaps):.2%}, "
          f"p90 {qs[-1]:.2%}, max {max(gaps):.2%}; exact (< 0.01%) in {sum(g < 1e-4 for g in gaps)}, "
          f"within 2% in {within}/{len(gaps)} cases ({'PASS' if within == len(gaps) else 'FAIL'}: target all within 2%)")
    return gaps


def _brief(plan) -> str:
    st = " ".join(f"{s.tp}:{s.start}-{s.end}" for s in plan.stages)
    return f"[{st}] {plan.slices} x{plan.micro_batches}"


# ---- 2. speed --------------------------------------------------------------------------------
def llama70b_scenario() -> dict:
    """llama-2-70b at 32k tokens over 32 devices of four types in four hosts."""
    def host(name, kind, bw):
        return {"name": name, "devices": [{"type": kind, "count": 8}],
                "interconnect": {"bandwidth_gbps": bw, "latency_us": 10}}

    return {"name": "llama70b-4hosts-32k", "model": "llama-2-70b", "dtype": "float16",
            "workload": {"seq_len": 32768, "batch_size": 1},
            "cluster": {"hosts": [host("host-a", "A100-40GB", 252), host("host-b", "RTX3090", 252),
                                  host("host-c", "L4", 252), host("host-d", "T4", 126)],
                        "network": {"bandwidth_gbps": 10, "latency_us": 100}},
            "planner": {"token_granularity": 64}}


def time_plan(setup, name, repeat):
    """CPU seconds of make_plan (process time: less disturbed by other load than wall time)."""
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        plan = make_plan(setup, name)
        times.append(time.process_time() - t0)
    return statistics.median(times), min(times), plan


def speed(repeat: int, profile: bool):
    print(f"2. Planning time (make_plan only, CPU seconds; median and best of runs; {cpu_name()}; "
          f"load average {load_average()}; a fixed pure-Python loop takes {python_speed_ms():.1f} ms CPU now)")
    paper_yaml = ROOT / "scenarios" / "paper-llama7b.yaml"
    t0 = time.process_time()
    paper = load_scenario(paper_yaml).resolve()
    t_load = time.process_time() - t0
    big_yaml = ROOT / "scenarios" / "llama70b-4hosts-32k.yaml"
    big = (load_scenario(big_yaml) if big_yaml.exists() else parse_scenario(llama70b_scenario())).resolve()
    make_plan(paper, "base")  # warm imports
    print(f"   loading and resolving paper-llama7b.yaml: {t_load:.3f} s CPU (first load in this process)")
    for label, setup, target, reps in [("paper LLaMA-7B testbed (6 devices, 2 hosts, 2048 tokens, g=16)", paper, 0.5, repeat),
                                        (f"llama-2-70b, {len(big.cluster.devices)} devices of 4 types in "
                                         f"{len(big.cluster.hosts)} hosts, {big.seq_len} tokens, g={big.granularity}",
                                         big, 10.0, max(1, repeat // 2))]:
        med, lo, plan = time_plan(setup, "hpipe", reps)
        print(f"   {label}: hpipe {med:.3f} s (best {lo:.3f} s; target < {target} s: "
              f"{'PASS' if med < target else 'FAIL'}); plan: {len(plan.stages)} stages "
              f"(TP degrees {[s.tp for s in plan.stages]}), {len(plan.slices)} slices, "
              f"{plan.micro_batches} micro-batches, predicted {plan.predicted['latency_s']:.4f} s")
        if setup is paper:
            where_the_time_goes(setup)
        if profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            make_plan(setup, "hpipe")
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
        for name in ("base", "gpipe", "gpipe-balanced", "terapipe", "megatron", "tp-terapipe"):
            try:
                med, _, p = time_plan(setup, name, 1)
                print(f"      {name:<15} {med:7.3f} s   predicted {p.predicted['latency_s']:.4f} s")
            except InfeasibleError as e:
                print(f"      {name:<15} infeasible: {str(e)[:100]}")
    startup(paper_yaml, repeat)


# what ``where_the_time_goes`` reports: (label, module file, function), cumulative
PHASES = [
    ("make_plan (everything)", "planners/__init__.py", "make_plan"),
    ("  one-stage plans", "planners/joint.py", "_best_one_stage"),
    ("  alternation (_joint)", "planners/joint.py", "_joint"),
    ("    Algorithm 1 over device orders (search)", "planners/partition.py", "search"),
    ("      stage/link tables (sequence_problem)", "planners/partition.py", "sequence_problem"),
    ("      bottleneck DP, orders side by side (minmax_dp_many)", "planners/partition.py", "minmax_dp_many"),
    ("      min-sum DP (minsum_dp_many, minsum_dp)", "planners/partition.py", "minsum_dp_many|minsum_dp"),
    ("      exact scoring, batched (PartitionCosts.bounds)", "planners/partition.py", "bounds"),
    ("  Algorithm 2 + exact scoring (_best_slicings)", "planners/joint.py", "_best_slicings"),
    ("    slice grid (SliceGrid.__init__)", "planners/slicing.py", "__init__"),
    ("    t_max DP (best_slicings_many)", "planners/slicing.py", "best_slicings_many"),
    ("      batched DP (_batch_dp, _batch_dp_many)", "planners/slicing.py", "_batch_dp*"),
    ("    exact scoring, batched (SliceGrid.makespans)", "planners/slicing.py", "makespans"),
    ("  local improvement (improve)", "planners/improve.py", "improve"),
    ("  memory caps (max_slice_tokens)", "planners/costs.py", "max_slice_tokens"),
    ("  cost tables (CostTables.__init__)", "planners/costs.py", "__init__"),
    ("  the Plan, checked, predicted (finish)", "planners/common.py", "finish"),
]


def where_the_time_goes(setup):
    """One profiled make_plan: calls and cumulative CPU seconds of each phase (the profiler
    slows calls down, so the shares matter more than the seconds)."""
    import cProfile
    import pstats

    prof = cProfile.Profile(time.process_time)
    prof.enable()
    make_plan(setup, "hpipe")
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = None
    print("   where the time goes (one run under cProfile, CPU s; nested rows are part of the row above):")
    for label, path, func in PHASES:
        # func: a name, names joined by "|", or a prefix ending in "*" (not nested in one another:
        # their cumulative times are summed)
        hits = [(v[1], v[3]) for (f, _, fn), v in stats.items()
                if f.endswith(path) and (fn in func.split("|") or func.endswith("*") and fn.startswith(func[:-1]))]
        calls, cum = sum(h[0] for h in hits), sum(h[1] for h in hits)
        total = total or cum
        print(f"      {label:<58} {calls:>6} calls {cum:>7.3f} s {cum / total:>6.1%}")


def startup(scenario_yaml, repeat: int):
    """Wall clock and CPU of the command line as a user runs it (a fresh interpreter each
    time, start-up included), and of its parts."""
    import os
    import resource
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rel = os.path.relpath(scenario_yaml, ROOT)
    cmds = [("python -c pass (the interpreter alone)", [sys.executable, "-c", "pass"]),
            ("import hpipe.cli", [sys.executable, "-c", "import hpipe.cli"]),
            ("load + resolve the scenario", [sys.executable, "-c",
                                             f"from hpipe.scenario import load_scenario; load_scenario({rel!r}).resolve()"]),
            (f"hpipe plan {rel}", [sys.executable, "-m", "hpipe.cli", "plan", rel])]
    print(f"   start-up included (fresh interpreter each run; median of {repeat}; wall s and CPU s of the child):")
    for label, cmd in cmds:
        walls, cpus = [], []
        for _ in range(repeat):
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            walls.append(time.perf_counter() - t0)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
        target = "  (target <= 1.5 s wall: " + ("PASS)" if statistics.median(walls) <= 1.5 else "FAIL)") \
            if label.startswith("hpipe plan") else ""
        print(f"      {label:<48} wall {statistics.median(walls):6.3f} s   CPU {statistics.median(cpus):6.3f} s{target}")


READY = ["paper-llama7b", "paper-gpt3-2.7b", "hexgen-70b", "llama70b-4hosts-32k", "local-cpu", "local-cpu-4dev",
         "local-cpu-hetero", "local-cpu-hetero-int8", "local-cpu-gpu", "local-cpu-gpt-3dev", "home-lab", "cloud-mix"]


def ready_plans(names=READY):
    """hpipe's plan for each ready scenario: what it chose, its predicted latency, CPU s."""
    print(f"4. hpipe's plans on the ready scenarios ({cpu_name()}; load average {load_average()})")
    print(f"   {'scenario':<24} {'cost model':<16} {'CPU s':>6} {'predicted s':>12}  plan (stages as tp:units, slices, "
          f"micro-batches)")
    for name in names:
        path = ROOT / "scenarios" / f"{name}.yaml"
        if not path.exists():
            continue
        setup = load_scenario(path).resolve()
        t0 = time.process_time()
        try:
            plan = make_plan(setup)
        except InfeasibleError as e:
            print(f"   {name:<24} infeasible: {str(e)[:80]}")
            continue
        dt = time.process_time() - t0
        print(f"   {name:<24} {type(setup.cost).__name__[:16]:<16} {dt:>6.2f} {plan.predicted['latency_s']:>12.6f}  "
              f"{_brief(plan)}", flush=True)


# ---- 5. this tree against another checkout -----------------------------------------------------
_CHILD = """
import json, sys, time
from hpipe.scenario import load_scenario
from hpipe.planners import make_plan
what, reps = sys.argv[1], int(sys.argv[2])
if what == "plans":  # every ready scenario's plan, whole (stages, slices, codecs, predicted)
    out = {}
    for path in sys.argv[3:]:
        try:
            out[path] = make_plan(load_scenario(path).resolve()).model_dump(mode="json")
        except Exception as e:  # noqa: BLE001 - reported, compared as text
            out[path] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))
else:  # CPU seconds of make_plan, best of ``reps`` in this process (imports warmed first)
    setup = load_scenario(what).resolve()
    make_plan(setup, "base")
    times = []
    for _ in range(reps):
        setup = load_scenario(what).resolve()
        t0 = time.process_time()
        plan = make_plan(setup)
        times.append(time.process_time() - t0)
    print(json.dumps([min(times), plan.predicted["latency_s"]]))
"""


def against(other: Path, rounds: int, reps: int = 3):
    """This tree against another checkout of hpipe (``--against PATH``, e.g. a worktree of
    the commit before a speed-up): rounds interleaved A, B, A, B..., each a fresh
    interpreter with that tree alone on the path (run from a neutral directory: ``python
    -c`` puts the working directory first on sys.path, which would load this tree for both).
    Prints medians over rounds and the ratio this/other of: make_plan CPU s (best of
    ``reps`` in a process) on the paper testbed and the 70B x 32 devices scenario;
    ``import hpipe.cli``, loading the scenario and ``hpipe plan`` with start-up (wall and
    CPU of the child); then whether every ready scenario's plan is the same."""
    import json
    import os
    import resource
    import subprocess
    import tempfile

    trees = {"this": ROOT, "other": other.resolve()}
    neutral = tempfile.mkdtemp(prefix="hpipe-against-")
    paper = str(ROOT / "scenarios" / "paper-llama7b.yaml")
    big = str(ROOT / "scenarios" / "llama70b-4hosts-32k.yaml")

    def child(tree, args):
        env = {**os.environ, "PYTHONPATH": str(tree)}
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, *args], cwd=neutral, env=env, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return out.stdout, wall, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime

    print(f"5. This tree ({ROOT}) against {trees['other']} ({cpu_name()}; load average {load_average()}; "
          f"a fixed pure-Python loop takes {python_speed_ms():.1f} ms CPU now); "
          f"{rounds} interleaved rounds, medians; ratio = this / other")
    cases = [("make_plan paper testbed, CPU s", ["-c", _CHILD, paper, str(reps)], "plan"),
             ("make_plan 70B x 32 devices x 32k, CPU s", ["-c", _CHILD, big, "1"], "plan"),
             ("import hpipe.cli", ["-c", "import hpipe.cli"], "wall"),
             ("load + resolve paper-llama7b.yaml", ["-c", "from hpipe.scenario import load_scenario; "
                                                          f"load_scenario({paper!r}).resolve()"], "wall"),
             ("hpipe plan paper-llama7b.yaml", ["-m", "hpipe.cli", "plan", paper, "-q"], "wall")]
    for label, args, kind in cases:
        got: dict = {"this": [], "other": []}
        for _ in range(rounds):
            for name, tree in trees.items():
                out, wall, cpu = child(tree, args)
                got[name].append(json.loads(out.strip().splitlines()[-1]) if kind == "plan" else (wall, cpu))
        med = {n: [statistics.median(x[i] for x in v) for i in range(2)] for n, v in got.items()}
        if kind == "plan":
            print(f"   {label:<44} this {med['this'][0]:7.3f}  other {med['other'][0]:7.3f}  "
                  f"ratio {med['this'][0] / med['other'][0]:.2f}   predicted latency this "
                  f"{got['this'][0][1]:.6f} s, other {got['other'][0][1]:.6f} s", flush=True)
        else:
            print(f"   {label:<44} wall this {med['this'][0]:6.3f} other {med['other'][0]:6.3f} "
                  f"(ratio {med['this'][0] / med['other'][0]:.2f});  CPU this {med['this'][1]:6.3f} "
                  f"other {med['other'][1]:6.3f} (ratio {med['this'][1] / med['other'][1]:.2f})", flush=True)
    paths = [str(p) for p in sorted((ROOT / "scenarios").glob("*.yaml"))]
    plans = {n: json.loads(child(t, ["-c", _CHILD, "plans", "0", *paths])[0].strip().splitlines()[-1])
             for n, t in trees.items()}
    print("   the plans on every ready scenario (whole Plan JSON compared; predicted latency this / other):")
    for path in paths:
        a, b = plans["this"][path], plans["other"][path]
        la = a["predicted"]["latency_s"] if isinstance(a, dict) else math.nan
        lb = b["predicted"]["latency_s"] if isinstance(b, dict) else math.nan
        verdict = ("identical" if a == b else "better" if la < lb else "worse" if la > lb else
                   "different plan, same latency")
        print(f"      {Path(path).stem:<26} {verdict:<12} {la:.6f} / {lb:.6f} s")


def load_average() -> str:
    import os

    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def python_speed_ms(repeats: int = 5) -> float:
    """Median CPU milliseconds of a fixed pure-Python loop: how fast this (shared, drifting)
    machine runs interpreted code right now, the kind of work planning is.  449feb7 planned
    the paper testbed in 0.600 s and in 0.794 s twenty minutes apart on one VM (2026-12-02);
    set figures against this one to compare them."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        acc = 0
        for i in range(300_000):
            acc += i * i
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1e3


def scaling_scenario(n_devices: int) -> dict:
    """llama-2-70b at 32k tokens over ``n_devices`` GPUs: hosts of 8 of one type, the types
    A100-80GB, RTX3090, L4, T4 in turn, PCIe inside a host, 10 Gbit/s between hosts."""
    kinds = ["A100-80GB", "RTX3090", "L4", "T4"]
    hosts = [{"name": f"h{i}", "devices": [{"type": kinds[i % 4], "count": 8}],
              "interconnect": {"bandwidth_gbps": 252, "latency_us": 10}} for i in range(n_devices // 8)]
    return {"name": f"scale-{n_devices}", "model": "llama-2-70b", "dtype": "float16",
            "workload": {"seq_len": 32768, "batch_size": 1},
            "cluster": {"hosts": hosts, "network": {"bandwidth_gbps": 10, "latency_us": 100}},
            "planner": {"token_granularity": 64}}


def scaling(sizes=(8, 32, 128, 512)):
    print(f"3. Scaling: llama-2-70b, 32k tokens, g=64, hosts of 8 GPUs of four types ({cpu_name()}; "
          f"a fixed pure-Python loop takes {python_speed_ms():.1f} ms CPU now)")
    print(f"   {'devices':>7} {'hosts':>5} {'load s':>7} {'plan CPU s':>10} {'stages':>6} {'TP':>14} {'predicted s':>11}")
    for n in sizes:
        t0 = time.process_time()
        setup = parse_scenario(scaling_scenario(n)).resolve()
        t_load = time.process_time() - t0
        t0 = time.process_time()
        try:
            plan = make_plan(setup, "hpipe")
        except InfeasibleError as e:
            print(f"   {n:>7} infeasible: {str(e)[:100]}")
            continue
        dt = time.process_time() - t0
        tps = sorted({s.tp for s in plan.stages})
        print(f"   {n:>7} {n // 8:>5} {t_load:>7.2f} {dt:>10.2f} {len(plan.stages):>6} {str(tps):>14} "
              f"{plan.predicted['latency_s']:>11.3f}", flush=True)


def cpu_name() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--plans", action="store_true", help="hpipe's plan on every ready scenario")
    ap.add_argument("--sizes", default="8,32,128,512", help="device counts for --scaling (comma-separated)")
    ap.add_argument("--against", type=Path, metavar="PATH",
                    help="also compare this tree with another checkout of hpipe (its repository root): planning "
                         "CPU time, start-up and every ready scenario's plan, interleaved fresh processes")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds for --against")
    args = ap.parse_args()
    if not args.skip_quality:
        quality(args.cases, args.seed)
    if not args.skip_speed:
        speed(args.repeat, args.profile)
    if args.scaling:
        scaling(tuple(int(x) for x in args.sizes.split(",")))
    if args.plans:
        ready_plans()
    if args.against:
        against(args.against, args.rounds)


if __name__ == "__main__":
    main()
