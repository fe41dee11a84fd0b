"""Pipelined execution on this machine against the whole model in one process.

For ``scenarios/local-cpu.yaml`` (small-llama, 2 x 512 tokens, two one-thread
workers) or, where a GPU is, ``scenarios/local-cpu-gpu.yaml`` (one CPU core
and cuda:0: plans that mix a CPU and a GPU stage) it prints, per plan:

* measured latency of the pipelined run (median of ``--repeats`` runs, each
  after a warm-up pass), and the single-process latency of the whole model on
  each of the scenario's first two devices (and on all CPU threads);
* the *ideal* pipelined latency: the exact pipeline recurrence over the
  measured compute times of every stage and item, with free transfers;
* the share of the latency outside layer compute: bubbles (ideal minus the
  busiest device's compute) and framework overhead (measured minus ideal:
  transfers, receive/send bookkeeping, process scheduling).

    PYTHONPATH=. python benchmarks/runtime.py [--repeats 3] [--scenario scenarios/local-cpu.yaml] [--planners-only]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from hpipe.plan import Plan, Stage
from hpipe.runtime.launcher import execute, make_ids, runtime_spec
from hpipe.runtime.model import build_units, make_caches, run_units
from hpipe.runtime.weights import RandomWeights
from hpipe.scenario import load_scenario


def single_process_s(setup, ids, threads: int, device: str = "cpu", slices=None, repeats: int = 3) -> float:
    """Median seconds of the whole model in this process on ``device``, slice by slice."""
    torch.set_num_threads(threads)
    spec = runtime_spec(setup)
    w = RandomWeights(spec)
    t_ids = torch.from_numpy(ids).to(device)
    units = build_units(spec, 0, spec.n_units, w, dtype=setup.dtype, device=device)
    times = []
    for rep in range(repeats + 1):  # the first is a warm-up
        caches = make_caches(units, *t_ids.shape)
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            pos = 0
            for n in (slices or [t_ids.shape[1]]):
                run_units(units, t_ids[:, pos:pos + n], pos, caches)
                pos += n
        _sync(device)
        if rep:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cpu() -> str:
    from hpipe.costmodels.cache import cpu_model

    return cpu_model()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def ideal_latency_s(result) -> tuple[float, float]:
    """Exact pipeline recurrence on the measured compute times (transfers free), and the
    busiest device's compute time.  Each device is its own chain: a tensor-parallel stage's
    shards run out of step (one starts its next item while the other ends this one's head),
    so its slowest shard per item, chained, overshot the run itself (megatron: 1.417 s
    "ideal" against 1.398 s measured, a negative overhead)."""
    plan = result.plan
    n_items = plan.micro_batches * len(plan.slices)
    dur: dict[tuple[str, int], float] = {}  # (device, item) -> compute seconds
    busy: dict[str, float] = {}
    for e in result.events:
        if e.kind != "compute":
            continue
        i = e.micro_batch * len(plan.slices) + e.slice
        dur[e.device, i] = dur.get((e.device, i), 0.0) + e.end_s - e.start_s
        busy[e.device] = busy.get(e.device, 0.0) + e.end_s - e.start_s
    done: dict[str, float] = {}  # device -> when its latest item ended
    handed = np.zeros(n_items)  # when the previous stage had each item done, on all its devices
    for st in plan.stages:
        ends = np.zeros(n_items)
        for i in range(n_items):
            for d in st.devices:
                done[d] = max(handed[i], done.get(d, 0.0)) + dur.get((d, i), 0.0)
                ends[i] = max(ends[i], done[d])
        handed = ends
    return float(handed.max()), max(busy.values())


def hand_plans(setup, share0: float | None = None) -> list[Plan]:
    """Plans over the scenario's first two devices.  ``share0``: the share of the blocks the
    first device gets when the two differ in speed (None: the same kind of device)."""
    n = setup.n_units
    devs = setup.cluster.device_ids[:2]
    if share0 is None:
        cut = n // 2 + 1  # the head (vocab projection) is heavy: give stage 0 one unit more
    else:
        cut = min(max(1, 1 + 2 * round((n - 2) / 2 * share0)), n - 1)  # the embedding, then whole blocks
    even = [setup.seq_len // 4] * 4
    g = setup.granularity
    # later slices attend to a longer prefix: make them shorter (the HPipe idea, by hand)
    shrinking = [6 * g, 5 * g, 3 * g, 2 * g]
    shrinking[0] += setup.seq_len - sum(shrinking)
    two = [Stage(devices=[devs[0]], units=(0, cut)), Stage(devices=[devs[1]], units=(cut, n))]
    out = [
        Plan(planner="base (1 slice)", scenario=setup.name, stages=two, slices=[setup.seq_len]),
        Plan(planner="4 even slices", scenario=setup.name, stages=two, slices=even),
        Plan(planner="4 shrinking slices", scenario=setup.name, stages=two, slices=shrinking),
        Plan(planner=f"{setup.batch_size} micro-batches", scenario=setup.name, stages=two,
             slices=[setup.seq_len], micro_batches=setup.batch_size),
    ]
    if share0 is None:  # tensor parallelism over a CPU and a GPU would only wait for the CPU
        out.append(Plan(planner="tensor parallel x2", scenario=setup.name,
                        stages=[Stage(devices=devs, units=(0, n))], slices=[setup.seq_len]))
    return [p.check(setup) for p in out] + planner_plans(setup)


def planner_plans(setup) -> list[Plan]:
    """Every planner's plan under the scenario's cost model (auto: this machine's cached profile),
    each distinct plan once (named after every planner that chose it)."""
    from hpipe.planners import make_plan
    from hpipe.scenario import PLANNER_NAMES
    from hpipe.validate import plan_key

    out: dict[str, Plan] = {}
    for name in PLANNER_NAMES:
        try:
            p = make_plan(setup, name).check(setup)
        except Exception as e:  # noqa: BLE001  (a planner without a plan here: say so, go on)
            print(f"{name}: no plan ({e})")
            continue
        k = plan_key(p)
        if k in out:
            out[k] = out[k].model_copy(update={"planner": f"{out[k].planner} = {name}"})
        else:
            out[k] = p
    return list(out.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="scenarios/local-cpu.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--planners-only", action="store_true", help="the planners' plans, not the hand-made ones")
    args = ap.parse_args()
    setup = load_scenario(args.scenario).resolve()
    auto = getattr(setup.cost, "auto", None)
    if auto is not None and auto.used == "roofline" and auto.runs_here:  # as `hpipe execute` does
        from hpipe.runtime.profile_cache import measure_into_cache

        print(f"no profile of this machine yet: measuring a quick one into {auto.profile_path}", flush=True)
        measure_into_cache(setup, quiet=True)
        setup = load_scenario(args.scenario).resolve()
        auto = setup.cost.auto
    print(f"cost model: {setup.cost.name}" + (f" ({auto.note()})" if auto else ""))
    print(f"CPU: {_cpu()}, {os.cpu_count()} logical CPUs; load average at start "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    ids = make_ids(setup)
    first_two = setup.cluster.devices[:2]
    where = [(d.runtime_device, d.placement.threads if d.placement else 1) for d in first_two]
    if any(dev.startswith("cuda") for dev, _ in where) and not torch.cuda.is_available():
        sys.exit(f"{args.scenario}: runs a stage on a GPU, and torch sees no CUDA device here")
    gpus = [torch.cuda.get_device_name(dev) for dev, _ in where if dev.startswith("cuda")]
    print(f"{setup.name}: {setup.model.name} ({setup.model.param_count() / 1e6:.1f}M params), batch "
          f"{setup.batch_size} x {setup.seq_len} tokens, {setup.dtype}, torch {torch.__version__}"
          + (f", {', '.join(gpus)}" if gpus else ""))

    mixed = len(set(where)) > 1
    share0 = None
    if mixed:  # give each device blocks in proportion to its speed
        t0, t1 = (single_process_s(setup, ids, threads, dev, repeats=1) for dev, threads in where)
        share0 = t1 / (t0 + t1)
    plans = planner_plans(setup) if args.planners_only else hand_plans(setup, share0)
    # This machine may be shared: measure the single process and every plan in turn, once per
    # round, so a change of background load hits all of them alike; report medians over rounds.
    refs = {w: [] for w in dict.fromkeys(where)}
    all_threads = []
    runs = {p.planner: [] for p in plans}
    for _ in range(args.repeats):
        for (dev, threads), ts in refs.items():
            ts.append(single_process_s(setup, ids, threads, dev, repeats=1))
        if not mixed:
            all_threads.append(single_process_s(setup, ids, len(os.sched_getaffinity(0)), repeats=1))
        best = min(ts[-1] for ts in refs.values())
        for p in plans:
            r = execute(setup, p, quiet=True, warmup=1, timeout_s=120)
            runs[p.planner].append((r, best))
    for (dev, threads), ts in refs.items():
        print(f"single process, whole model, {dev} {threads} thread(s): {statistics.median(ts) * 1e3:8.1f} ms  "
              f"(rounds: {', '.join(f'{t * 1e3:.0f}' for t in ts)})")
    if all_threads:
        print(f"single process, whole model, all threads: {statistics.median(all_threads) * 1e3:8.1f} ms")
    ref_dev, ref_threads = min(refs, key=lambda w: statistics.median(refs[w]))
    one = statistics.median(refs[(ref_dev, ref_threads)])
    if mixed:
        print(f"split by speed: the first device ({where[0][0]}) gets {share0:.1%} of the work")
    print()
    hdr = (f"{'plan':<22}{'measured ms':>12}{'ideal ms':>10}{'speed-up':>9}{'busiest':>9}"
           f"{'bubbles':>9}{'overhead':>9}{'ms/item':>8}{'1-proc sliced ms':>17}")
    print(hdr)
    print("-" * len(hdr))
    for p in plans:
        rs = runs[p.planner]
        speedup = statistics.median(single / r.latency_s for r, single in rs)
        r = sorted(rs, key=lambda x: x[0].latency_s)[len(rs) // 2][0]
        ideal, busiest = ideal_latency_s(r)
        lat = r.latency_s
        sliced = (single_process_s(setup, ids, ref_threads, ref_dev, slices=p.slices, repeats=1)
                  if len(p.slices) > 1 else one)
        print(f"{p.planner:<22}{lat * 1e3:12.1f}{ideal * 1e3:10.1f}{speedup:8.2f}x{busiest / lat:9.1%}"
              f"{(ideal - busiest) / lat:9.1%}{(lat - ideal) / lat:9.1%}"
              f"{(lat - ideal) * 1e3 / (p.micro_batches * len(p.slices)):8.2f}{sliced * 1e3:17.1f}")
    med = {p.planner: statistics.median(r.latency_s for r, _ in runs[p.planner]) for p in plans}
    fastest = min(med, key=med.get)
    hp = next((p.planner for p in plans if p.planner.split(" = ")[0] == "hpipe"), None)
    if hp is not None:
        sp = statistics.median(single / r.latency_s for r, single in runs[hp])
        print(f"\nhpipe plan: {med[hp] * 1e3:.1f} ms, {sp:.2f}x one process ({ref_dev}, {ref_threads} thread(s)); "
              f"fastest plan measured: {fastest} ({med[fastest] * 1e3:.1f} ms)"
              + ("  -> hpipe's plan is the fastest" if fastest == hp else
                 f"  -> hpipe's plan is {med[hp] / med[fastest] - 1:.1%} slower than the fastest"))
    print(f"load average at end {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print()
    print("speed-up: median over rounds of the single-process latency on the faster of the two devices /")
    print("pipelined latency; the other columns are from the median run of each plan.")
    print("busiest: compute share of the busiest device; bubbles: (ideal - busiest) / measured;")
    print("overhead: (measured - ideal) / measured, the framework's share (transfers, send/recv, scheduling);")
    print("ms/item: that overhead per work item.  1-proc sliced: one process on the faster device, same slices.")


if __name__ == "__main__":
    main()
