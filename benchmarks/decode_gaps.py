"""Where a decode step's time goes, measured against the simulator's account of it.

For a scenario that runs here, generating ``--output-tokens`` tokens per sequence, three
plans run interleaved ``--repeats`` times: the whole model on one device, and two stages
(the blocks split evenly) with one decode group and with one group per sequence.  For
each it prints, per decode step and stage, in milliseconds (medians over steps and runs):

* compute: predicted (fitted model), measured wall, measured CPU time of the stage thread
  (``decode_compute_cpu_s`` / steps; hardly moved by other processes);
* hop: from one stage's compute end to the next stage's compute start for the same step,
  and the return hop (last stage's end of step t to stage 0's start of step t + 1),
  measured and simulated -- with one decode group no device is busy with another group, so
  this is the whole cost of a message between stages in the step loop (send, wire, the
  receiving thread, the hand-over to the compute loop);
* TPOT simulated and measured;
* each measured hop split where the receiving thread had the message: sender's compute end
  to received ("wire"), then to the receiver's compute start ("to compute": the hand-over to
  the loop, or the wait behind its compute of another group);
* CPU time per decode step beyond the compute stamps, of the stage's decode loop thread and of
  its whole process (receiving threads, sends): the per-step work the simulator has no term
  for, in a load-insensitive unit.

Load-insensitive reading: the CPU-time column against the predicted one is the cost
model's own error; the hop columns are small intervals, so read the medians, and compare
plans run back to back rather than absolute figures on a loaded machine.

    PYTHONPATH=. python benchmarks/decode_gaps.py [scenarios/local-cpu.yaml] [--output-tokens 32] [--repeats 3]
        [--devices A,B | --plans PLAN.json ...]

``--plans`` runs the given Plan JSON files (``hpipe plan -o``: any number of stages, one
device each) instead of the three built-in plans, under their paths.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections import defaultdict
from pathlib import Path

from hpipe.costmodels.cache import cpu_model
from hpipe.plan import Plan, Stage, load_plans
from hpipe.runtime.launcher import launch, make_ids, measured_result, runtime_spec
from hpipe.runtime.generation import generation_config
from hpipe.scenario import load_scenario
from hpipe.sim import simulate
from hpipe.validate import ensure_profile, with_fitted, with_output_tokens


def step_times(events) -> dict:
    """{(stage, group, step): (start, end)} of the decode compute (a stage's first device)."""
    out = {}
    for e in events:
        if e.kind == "compute" and e.phase == "decode":
            key = (e.stage, e.micro_batch, e.slice)
            a, b = out.get(key, (e.start_s, e.end_s))
            out[key] = (min(a, e.start_s), max(b, e.end_s))
    return out


def breakdown(events, n_stages: int) -> dict[str, list[float]]:
    """Per-step intervals (seconds): compute per stage, hop per boundary, and the return hop."""
    st = step_times(events)
    out: dict[str, list[float]] = defaultdict(list)
    for (j, g, t), (a, b) in st.items():
        out[f"compute {j}"].append(b - a)
        if j > 0 and (j - 1, g, t) in st:
            out[f"hop {j - 1}->{j}"].append(a - st[(j - 1, g, t)][1])
        if j == 0 and t > 0 and (n_stages - 1, g, t - 1) in st:
            out["return"].append(a - st[(n_stages - 1, g, t - 1)][1])
    return out


def arrival_split(run, n_stages: int) -> dict[str, list[float]]:
    """Measured, one-device stages: each decode message's hop split at the moment the
    receiving thread had it (its record's end): sender's compute end -> received ("wire"),
    received -> the receiver's compute start ("to compute": the hand-over to the loop, or
    the wait behind the loop's own compute of another group).  Raw clock of one host."""
    comp, recv = {}, {}
    for rec in run.records.values():
        d, j = rec["decode"], rec["stage"]
        for kind, g, t, t0, t1, _ in d["events"]:
            if kind == "compute":
                comp[(j, g, t)] = (t0, t1)
        for g, t, _src, _post, done, _nb in d["recvs"]:
            recv[(j, g, t)] = done
    out: dict[str, list[float]] = defaultdict(list)
    for (j, g, t), done in recv.items():
        prev = (j - 1, g, t) if j > 0 else (n_stages - 1, g, t - 1)  # stage 0 gets step t's ids from t - 1
        name = f"hop {j - 1}->{j}" if j > 0 else "return"
        if prev in comp and (j, g, t) in comp:
            out[f"{name} wire"].append(done - comp[prev][1])
            out[f"{name} to compute"].append(comp[(j, g, t)][0] - done)
    return out


def builtin_plans(setup, d0: str, d1: str) -> dict:
    """The whole model on ``d0``; the blocks split evenly over ``d0`` and ``d1``, with one decode
    group and with one per sequence."""
    half = 1 + 2 * (setup.model.n_layers // 2)
    two = [Stage(devices=[d0], units=(0, half)), Stage(devices=[d1], units=(half, setup.n_units))]
    plans = {"1 stage": Plan(planner="one", scenario=setup.name, slices=[setup.seq_len], decode_micro_batches=1,
                             stages=[Stage(devices=[d0], units=(0, setup.n_units))])}
    for g in sorted({1, setup.batch_size}):
        plans[f"2 stages, {g} group{'s' if g > 1 else ''}"] = Plan(
            planner=f"even-{g}", scenario=setup.name, slices=[setup.seq_len], stages=two, decode_micro_batches=g)
    return plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", nargs="?", default="scenarios/local-cpu.yaml")
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--devices", help="the two devices, A,B (default: the scenario's first two)")
    ap.add_argument("--plans", nargs="+", type=Path, metavar="PLAN.json",
                    help="run these plans instead of the built-in three")
    args = ap.parse_args()
    if args.plans and args.devices:
        ap.error("--plans and --devices: one or the other")

    sc = with_output_tokens(load_scenario(args.scenario), args.output_tokens)
    ids = sc.model_copy(update={"costmodel": "roofline"}).resolve().cluster.device_ids
    pair = [d.strip() for d in args.devices.split(",")] if args.devices else ids[:2]
    if not args.plans and (len(pair) != 2 or set(pair) - set(ids) or pair[0] == pair[1]):  # before a profile is measured
        ap.error(f"--devices: two distinct devices of {sc.name} ({', '.join(ids)}), got {args.devices!r}")
    given = {}
    for f in args.plans or []:
        for i, p in enumerate(load_plans(f)):  # file-named errors (InputError)
            if p.scenario != sc.name:
                ap.error(f"--plans: {f}: a plan of {p.scenario!r}, not of {sc.name!r}")
            if any(len(st.devices) > 1 for st in p.stages):
                # the breakdown reads one device per stage (its stamps, its CPU time)
                ap.error(f"--plans: {f}: tensor-parallel stages are not broken down here")
            given[str(f) if i == 0 else f"{f}[{i}]"] = p
    path, why = ensure_profile(sc, log=print, quiet=True)
    setup = with_fitted(sc, Path(path)).resolve()
    plans = given or builtin_plans(setup, *pair)
    plans = {k: p.check(setup, file=k) for k, p in plans.items()}
    sims = {k: simulate(setup, p) for k, p in plans.items()}
    load0 = os.getloadavg()
    runs, overhead, splits = defaultdict(list), defaultdict(list), defaultdict(lambda: defaultdict(list))
    spec, ids = runtime_spec(setup), make_ids(setup)
    for _ in range(args.repeats):  # interleaved: drifting load hits every plan alike
        for k, p in plans.items():
            run = launch(setup, p, ids=ids, spec=spec, timeout_s=120, generation=generation_config(setup, p, spec))
            runs[k].append(measured_result(setup, p, run, spec=spec))
            for name, xs in arrival_split(run, len(p.stages)).items():
                splits[k][name].extend(xs)
            for role, rec in run.records.items():  # CPU time per decode item beyond the compute stamps
                d = rec["decode"]
                n = len(d["events"]) or 1
                overhead[(k, rec["stage"])].append(((d["loop_cpu_s"] - d["compute_cpu_s"]) / n,
                                                    (d["process_cpu_s"] - d["compute_cpu_s"]) / n))
    load1 = os.getloadavg()
    steps = args.output_tokens - 1
    print(f"{setup.name}: {setup.model.name}, batch {setup.batch_size} x {setup.seq_len}, {args.output_tokens} new "
          f"tokens; CPU {cpu_model()}; load average {load0[0]:.1f} -> {load1[0]:.1f}; profile {path}")
    ms = 1e3
    for k, p in plans.items():
        sim, rs = sims[k], runs[k]
        tpot_m = min(r.tpot_s for r in rs)
        print(f"\n{k}: TPOT simulated {sim.tpot_s * ms:.2f} ms, measured {tpot_m * ms:.2f} ms "
              f"(fastest of {len(rs)}), error {(sim.tpot_s - tpot_m) / tpot_m:+.1%}; end to end "
              f"{sim.latency_s:.3f} s vs {min(r.latency_s for r in rs):.3f} s")
        sb = breakdown(sim.events, len(p.stages))
        mb = defaultdict(list)
        for r in rs:
            for name, xs in breakdown(r.events, len(p.stages)).items():
                mb[name].extend(xs)
        groups = p.decode_groups(setup.batch_size)
        for name in sorted(sb):
            line = f"  {name:<12} simulated {statistics.median(sb[name]) * ms:7.3f}  measured {statistics.median(mb[name]) * ms:7.3f}"
            if name.startswith("compute"):
                j = int(name.split()[1])
                dev = p.stages[j].devices[0]
                cpu = [r.decode_compute_cpu_s[dev] / (steps * groups) for r in rs if r.decode_compute_cpu_s]
                if cpu:
                    line += f"  cpu {statistics.median(cpu) * ms:7.3f}"
                o = overhead[(k, j)]
                if o:
                    line += (f"  beyond the stamps, CPU per step: loop thread {statistics.median(x[0] for x in o) * ms:6.3f}"
                             f", process {statistics.median(x[1] for x in o) * ms:6.3f}")
            print(line)
        for name in sorted(splits[k]):
            print(f"  {name:<22} measured {statistics.median(splits[k][name]) * ms:7.3f}")


if __name__ == "__main__":
    main()
