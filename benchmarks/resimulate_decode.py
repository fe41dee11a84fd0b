"""Re-simulate the decode cases of `hpipe validate --json` files under this tree's model.

As ``resimulate.py`` does for prefill: the measured runs do not depend on the cost model,
so each decode case is simulated again from the profile the file names and its TPOT and
end-to-end errors printed per scenario (median and p90 of |error|, signed bias).
``--without`` drops the decode step loop's terms to see what each is worth:
``step-overhead`` (a message's hand-over to an idle loop), ``after-wait`` (compute after
a wait), or ``both``.

    PYTHONPATH=. python benchmarks/resimulate_decode.py benchmarks/results/validate-decode-2026-12-02-quiet.json

A file whose profile the run kept under /tmp is given as ``FILE:FOLDER`` (see resimulate.py).
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from hpipe.costmodels.fitted import Fitted
from hpipe.plan import Plan, Stage
from hpipe.scenario import load_scenario
from hpipe.sim import simulate
from validate_files import ROOT, profile_path, read

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("files", nargs="+", metavar="FILE[:FOLDER]")
ap.add_argument("--without", choices=["step-overhead", "after-wait", "both"])
ap.add_argument("--cases", action="store_true", help="print each case's TPOT error as run and now")
args = ap.parse_args()
if args.without in ("step-overhead", "both"):
    Fitted.step_overhead_s = lambda self, src, dst: 0.0
if args.without in ("after-wait", "both"):
    Fitted.after_wait_factor = lambda self, device_id: 1.0
rows = []
for arg in args.files:
    d, path, folder = read(arg)
    for sc, prof in d["profiles"].items():
        cases = [c for c in d["cases"] if c["scenario"] == sc and c.get("output_tokens")]
        if not cases:
            continue
        data = yaml.safe_load((ROOT / "scenarios" / f"{sc}.yaml").read_text())
        data["costmodel"] = {"kind": "fitted", "profile": str(profile_path(prof, path, folder))}
        data["workload"]["output_tokens"] = cases[0]["output_tokens"]
        tmp = Path(tempfile.mkdtemp())
        (tmp / "s.yaml").write_text(yaml.safe_dump(data))
        setup = load_scenario(tmp / "s.yaml").resolve()
        for c in cases:
            plan = Plan(planner="x", scenario=sc, stages=[Stage(devices=s[0], units=tuple(s[1])) for s in c["stages"]],
                        slices=c["slices"], micro_batches=c["micro_batches"],
                        decode_micro_batches=c["decode_micro_batches"])
            r = simulate(setup, plan)
            rows.append((sc, (r.tpot_s - c["measured_tpot_s"]) / c["measured_tpot_s"],
                         (r.latency_s - c["measured_latency_s"]) / c["measured_latency_s"]))
            if args.cases:
                print(f"{sc:16s} {c['planner']:26s} TPOT error as run {c['tpot_error']:+.1%}, now {rows[-1][1]:+.1%}; "
                      f"end to end {c['error']:+.1%}, now {rows[-1][2]:+.1%}")
if not rows:
    sys.exit("no decode cases in " + ", ".join(args.files) + " (resimulate.py re-simulates prefill cases)")
for sc in [*dict.fromkeys(r[0] for r in rows), "all"]:
    sel = [r for r in rows if sc in ("all", r[0])]
    for i, name in ((1, "TPOT"), (2, "end to end")):
        e = [r[i] for r in sel]
        a = [abs(x) for x in e]
        print(f"{sc:16s} {name:10s} n {len(e):2d} median {statistics.median(a):5.1%} p90 {np.percentile(a, 90):5.1%} "
              f"bias {statistics.mean(e):+.1%}")
