"""Generation on this machine's CPU: decode tokens/s pipelined against one process, and how
the time splits between prefill and decode.

For ``scenarios/local-cpu.yaml`` (small-llama, two one-thread workers) with
``--output-tokens`` new tokens per sequence it prints, per configuration:

* one process: the whole model in this process on one thread, prefill then
  ``output_tokens - 1`` cached decode steps (what one worker could do alone);
* pipelined: two stages (the blocks split evenly), decode groups 1 (one group:
  a stage idles while the other works) and ``batch`` (one sequence per group:
  both stages busy), measured through ``hpipe.runtime.execute`` -- prefill
  time (first work to the last prefill compute), decode time (from there to
  the last token), decode tokens/s, TTFT and TPOT as the Result reports them.

Runs are interleaved (one of each configuration per repeat) and the median is
printed, so a load that drifts over the run hits every configuration alike.

    PYTHONPATH=. python benchmarks/generate.py [--repeats 3] [--output-tokens 64] [--seq-len 256] [--batch 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from hpipe.costmodels.cache import cpu_model
from hpipe.plan import Plan, Stage
from hpipe.runtime.launcher import execute, make_ids, runtime_spec
from hpipe.runtime.model import build_units, make_caches, run_units
from hpipe.runtime.weights import RandomWeights
from hpipe.scenario import load_scenario, parse_scenario


def one_process(setup, ids) -> dict:
    """Prefill, then greedy cached decode steps, in this process on one thread."""
    torch.set_num_threads(1)
    spec = runtime_spec(setup)
    units = build_units(spec, 0, spec.n_units, RandomWeights(spec), dtype=setup.dtype)
    x = torch.from_numpy(ids)  # (B, T)
    B, T = x.shape
    caches = make_caches(units, B, T + setup.output_tokens)
    with torch.inference_mode():
        t0 = time.perf_counter()
        nxt = run_units(units, x, 0, caches)[:, -1].argmax(-1)  # (B,)
        t1 = time.perf_counter()
        for t in range(setup.output_tokens - 1):
            nxt = run_units(units, nxt[:, None], T + t, caches)[:, -1].argmax(-1)
        t2 = time.perf_counter()
    steps = setup.output_tokens - 1
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_tokens_per_s": B * steps / (t2 - t1),
            "ttft_s": t1 - t0, "tpot_s": (t2 - t1) / steps}


def pipelined(setup, plan, ids) -> dict:
    r = execute(setup, plan, inputs=ids.tolist(), quiet=True, warmup=1, timeout_s=120)
    prefill_end = max(e.end_s for e in r.events if e.phase == "prefill" and e.kind == "compute")
    decode_s = r.latency_s - prefill_end
    return {"prefill_s": prefill_end, "decode_s": decode_s,
            "decode_tokens_per_s": setup.batch_size * (setup.output_tokens - 1) / decode_s,
            "ttft_s": r.ttft_s, "tpot_s": r.tpot_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="scenarios/local-cpu.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    load_at_start = f"{os.getloadavg()[0]:.2f}"

    sc = load_scenario(args.scenario)
    data = sc.model_dump(exclude_unset=True, exclude={"source_path"})
    data["workload"] = {**data["workload"], "seq_len": args.seq_len, "batch_size": args.batch,
                        "output_tokens": args.output_tokens}
    setup = parse_scenario(data, args.scenario).resolve()
    ids = make_ids(setup)
    devs = setup.cluster.device_ids[:2]
    half = 1 + 2 * (setup.model.n_layers // 2)  # embedding and the first half of the blocks
    configs = {"one process (1 thread)": None}
    for groups in sorted({1, args.batch}):
        configs[f"2 stages, {groups} decode group{'s' if groups > 1 else ''}"] = Plan(
            planner="even", scenario=setup.name, slices=[args.seq_len], decode_micro_batches=groups,
            stages=[Stage(devices=[devs[0]], units=(0, half)), Stage(devices=[devs[1]], units=(half, setup.n_units))])
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    for _ in range(args.repeats):  # interleaved
        for name, plan in configs.items():
            runs[name].append(one_process(setup, ids) if plan is None else pipelined(setup, plan.check(setup), ids))

    print(f"{setup.model.name}, batch {args.batch} x {args.seq_len} prompt tokens, {args.output_tokens} new tokens, "
          f"{setup.dtype}; CPU: {cpu_model()}; load average {load_at_start} at start, {os.getloadavg()[0]:.2f} at "
          f"the end; median of {args.repeats} interleaved runs")
    cols = ["prefill_s", "decode_s", "decode_tokens_per_s", "ttft_s", "tpot_s"]
    print(f"{'configuration':34s} " + " ".join(f"{c:>20s}" for c in cols) + f" {'decode share':>13s}")
    for name, rs in runs.items():
        med = {c: statistics.median(r[c] for r in rs) for c in cols}
        share = med["decode_s"] / (med["prefill_s"] + med["decode_s"])
        print(f"{name:34s} " + " ".join(f"{med[c]:20.4g}" for c in cols) + f" {share:13.0%}")


if __name__ == "__main__":
    main()
