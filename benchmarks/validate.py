"""Full statistical validation: simulated (fitted profile) against measured latency on this machine.

The claim the property test (tests/test_profile_validate.py) checks on a few
random plans, measured here over every planner's plan and random plans of the
ready scenarios that run on this machine, in interleaved rounds:

    PYTHONPATH=. python benchmarks/validate.py [--repeats 3] [--random 8] [--json out.json]
        [--decode-tokens 32 [--decode-random 4] [--no-prefill]]
        [scenarios/local-cpu.yaml scenarios/local-cpu-hetero.yaml scenarios/local-cpu-4dev.yaml]

``--decode-tokens N`` adds decode cases: every scenario generating N tokens per
sequence, planned by the planners and as random plans (random decode
micro-batch counts too), compared end to end, on TPOT and on TTFT.

It prints the CPU, the load average before and after (this figure depends on
other work on the machine: on a shared VM say so beside it), each case, and
the summary ``hpipe validate`` computes: median and p90 of |error|, the signed
bias, by plan kind, the planners' picks apart from random plans, and the
compute error in CPU time (the cost model alone, load set aside).  Scenarios
whose emulation this machine does not permit (cgroups, network namespaces:
root, ip, tc) are skipped, saying why.  Profiles come from the per-user cache
and are measured there where missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from hpipe.costmodels.cache import cpu_model
from hpipe.runtime.emulation import emulation_unsupported
from hpipe.scenario import load_scenario
from hpipe.validate import CaseOptions, error_summary, validate

READY = ["scenarios/local-cpu.yaml", "scenarios/local-cpu-hetero.yaml", "scenarios/local-cpu-4dev.yaml"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenarios", nargs="*", default=READY)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--random", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode-tokens", type=int, default=None,
                    help="decode cases at N new tokens per sequence (default: the scenario's output_tokens)")
    ap.add_argument("--decode-random", type=int, default=None, help="random plans among the decode cases")
    ap.add_argument("--no-prefill", action="store_true", help="decode cases only")
    ap.add_argument("--json", help="write the Validation JSON here")
    args = ap.parse_args()
    scs = []
    for path in args.scenarios:
        sc = load_scenario(path)
        why = emulation_unsupported(sc.model_copy(update={"costmodel": "roofline"}).resolve())
        if why:
            print(f"skipped {path}: {why}")
            continue
        scs.append(sc)
    if not scs:
        sys.exit("no scenario can run on this machine")
    load0 = os.getloadavg()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average at start "
          f"{', '.join(f'{x:.1f}' for x in load0)}", flush=True)
    res = validate(scs, opts=CaseOptions(n_random=args.random, seed=args.seed, repeats=args.repeats,
                                         output_tokens=args.decode_tokens, decode_random=args.decode_random,
                                         prefill=not args.no_prefill),
                   log=lambda m: print(m, flush=True), quiet=True)
    load1 = os.getloadavg()
    if args.json:  # first: a printing error below must not lose the measurements
        from hpipe.io import write_text

        write_text(args.json, res.model_dump_json(indent=2))
    if not res.cases:
        sys.exit("no case ran:\n" + "\n".join([*(f"failed {s}" for s in res.failed),
                                                *(f"skipped {s}" for s in res.skipped)]))

    def pct(v, w=8):
        return f"{v:+{w}.1%}" if v is not None else f"{'-':>{w}}"

    def ms(v, w):
        return f"{v * 1e3:{w}.2f}ms" if v is not None else f"{'-':>{w + 2}}"

    print(f"{'scenario':<18}{'planner':<28}{'kind':<16}{'stages':>6}{'sim s':>8}{'meas s':>8}{'error':>8}"
          f"{'cpu err':>8}{'cpu share':>10}{'groups':>7}{'tpot sim':>9}{'tpot meas':>10}{'tpot err':>9}"
          f"{'ttft err':>9}{'dec cpu':>8}{'drift':>8}")
    for c in res.cases:
        name = c.planner + "".join(f"={o}" for o in c.same_plan_as)
        line = (f"{c.scenario:<18}{name[:27]:<28}{c.kind:<16}{c.n_stages:>6}{c.simulated_latency_s:8.3f}"
                f"{c.measured_latency_s:8.3f}{c.error:+8.1%}" + pct(c.compute_error)
                + (f"{c.cpu_share:10.0%}" if c.cpu_share is not None else f"{'-':>10}"))
        if c.output_tokens:
            line += (f"{c.decode_micro_batches:>7}{ms(c.simulated_tpot_s, 7)}{ms(c.measured_tpot_s, 8)}"
                     + pct(c.tpot_error, 9) + pct(c.ttft_error, 9) + pct(c.decode_compute_error))
        else:
            line += " " * (7 + 9 + 10 + 9 + 9 + 8)
        # the machine's change of speed since the profile: the median over the case's runs (one
        # probe is noisy; the summary line below is the figure to read)
        line += pct(statistics.median(c.run_drifts) if c.run_drifts else None)
        print(line)
    n3 = sum(c.n_stages >= 3 for c in res.cases)
    print(f"\n{len(res.cases)} distinct cases ({n3} with >= 3 stages) over {len(scs)} scenarios: "
          f"median |error| {res.median_abs_error:.1%}, p90 {res.p90_abs_error:.1%}, signed bias {res.signed_bias:+.1%}")
    for label, groups in (("kind", res.by_kind), ("origin", res.by_origin)):
        for k, e in groups.items():
            if e.n:
                print(f"  {label} {k}: n {e.n}, median |error| {e.median_abs_error:.1%}, p90 {e.p90_abs_error:.1%}, "
                      f"bias {e.signed_bias:+.1%}")
    if res.compute and res.compute.n:
        print(f"  compute alone (CPU time): median |error| {res.compute.median_abs_error:.1%}, "
              f"p90 {res.compute.p90_abs_error:.1%}, bias {res.compute.signed_bias:+.1%}")
    prefill = error_summary(c.error for c in res.cases if not c.output_tokens)
    for label, e in (("prefill cases, end to end", prefill),
                     (f"decode cases ({args.decode_tokens or 'own'} tokens), end to end", res.by_kind.get("decode")),
                     ("decode TPOT", res.decode_tpot), ("decode TTFT", res.decode_ttft),
                     ("decode compute alone (CPU time)", res.decode_compute)):
        if e is not None and e.n:
            print(f"  {label}: n {e.n}, median |error| {e.median_abs_error:.1%}, p90 {e.p90_abs_error:.1%}, "
                  f"bias {e.signed_bias:+.1%}")
    if res.run_spread is not None:
        print(f"  {res.run_spread.line()}")
    for line in (res.drift_line(), res.other_load_line()):
        if line:
            print(f"  {line}")
    print(f"load average at end {', '.join(f'{x:.1f}' for x in load1)}; profiles: {res.profiles}")
    for s in res.skipped:
        print(f"skipped {s}")
    if res.failed:  # a run that died or hung: reported beside the others, and the benchmark fails
        sys.exit("\n".join(f"failed {s}" for s in res.failed))


if __name__ == "__main__":
    main()
