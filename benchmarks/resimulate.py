"""Re-simulate the cases of `hpipe validate --json` files under this tree's model.

The measured runs do not depend on the cost model, so a model change can be judged on
runs already made: each prefill case is simulated again from the profile the file names,
and its error printed as run and now, per scenario and together (median and p90 of
|error|, signed bias), as in the README's validation tables.  Generating cases are left
out (and counted): benchmarks/resimulate_decode.py re-simulates those.

    PYTHONPATH=. python benchmarks/resimulate.py \
        benchmarks/results/validate-{local-cpu-hetero,local-cpu-4dev,local-cpu-gpt-3dev}-2026-12-02-quiet.json \
        benchmarks/results/validate-4dev-paced-2026-12-02-quiet.json:benchmarks/results/profiles-2026-12-02-paced-quiet

A file whose profile the run kept under /tmp is given with the folder of its copy,
``FILE:FOLDER`` (``validate_files``); the script says so, naming the candidates.
"""
import sys, statistics, tempfile
from pathlib import Path
import numpy as np, yaml
from hpipe.plan import Plan, Stage
from hpipe.scenario import load_scenario
from hpipe.sim import simulate
from validate_files import ROOT, profile_path, read

rows, skipped = [], 0
for arg in sys.argv[1:]:
    d, path, folder = read(arg)
    setups = {}
    for sc, prof in d["profiles"].items():
        tmp = Path(tempfile.mkdtemp())
        data = yaml.safe_load((ROOT / "scenarios" / f"{sc}.yaml").read_text())
        data["costmodel"] = {"kind": "fitted", "profile": str(profile_path(prof, path, folder))}
        (tmp / "s.yaml").write_text(yaml.safe_dump(data))
        setups[sc] = load_scenario(tmp / "s.yaml").resolve()
    for c in d["cases"]:
        if c.get("output_tokens"):  # a generating case: benchmarks/resimulate_decode.py
            skipped += 1
            continue
        plan = Plan(planner="x", scenario=c["scenario"], stages=[Stage(devices=s[0], units=tuple(s[1])) for s in c["stages"]],
                    slices=c["slices"], micro_batches=c["micro_batches"])
        sim = simulate(setups[c["scenario"]], plan).latency_s
        rows.append(dict(sc=c["scenario"], stages=len(c["stages"]), kind=c["kind"], origin=c["chosen_by_planner"],
                         asrun=c["error"], now=(sim - c["measured_latency_s"]) / c["measured_latency_s"]))
def stat(name, sel):
    if not sel:
        print(f"{name:28s} n  0")
        return
    for key in ("asrun", "now"):
        e = [r[key] for r in sel]
        a = [abs(x) for x in e]
        print(f"{name:28s} {key:5s} n {len(e):2d} median {statistics.median(a):5.1%} p90 {np.percentile(a, 90):5.1%} bias {statistics.mean(e):+.1%}")
for sc in dict.fromkeys(r["sc"] for r in rows):
    stat(sc, [r for r in rows if r["sc"] == sc])
if skipped:
    print(f"({skipped} generating cases left out: benchmarks/resimulate_decode.py re-simulates those)")
stat("all", rows)
stat(">= 3 stages", [r for r in rows if r["stages"] >= 3])
stat("tensor-parallel", [r for r in rows if r["kind"] == "tensor-parallel"])
stat("planners' picks", [r for r in rows if r["origin"]])
stat("random plans", [r for r in rows if not r["origin"]])
