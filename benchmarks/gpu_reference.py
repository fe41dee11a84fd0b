"""How well does the roofline predict measured GPU kernel times?  v1 and v2 side by side.

Reads Vidur's per-operator prefill profiles from ``../shared/reference/gpu-kernels/`` (or
``$HPIPE_GPU_REFERENCE``), sums them into hpipe's units (hpipe.reference) and
prints, for roofline version 1 and version 2:

* per GPU and unit kind: median |error|, p90, median predicted/measured;
* the issue-12 groups (Llama-2-7B TP 1 attention + MLP, attention only, context growth,
  decode-sized MLP, embedding);
* the slicing ratio: attention time of one 4096-token prefill cut into 2, 4, 8 slices over
  the one-shot time, measured and predicted;
* the hold-out (H100, Llama-2-70B, TP 2/4/8 shards), never used for fitting.

    PYTHONPATH=. python benchmarks/gpu_reference.py            # the tables
    PYTHONPATH=. python benchmarks/gpu_reference.py --fit      # refit Ampere's constants (prints them)
    PYTHONPATH=. python benchmarks/gpu_reference.py --fit-cpu  # refit the CPU row on scenarios/profiles/local-cpu.json
    PYTHONPATH=. python benchmarks/gpu_reference.py --cpu      # calibration on the CPU profiles only

The reference times are device kernel time (no launch gaps), so v2 is evaluated with
``kernel_overhead_us: 0``; v1 with its defaults (what a scenario gets).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpipe import reference as ref  # noqa: E402
from hpipe.costmodels.roofline import (GENERATIONS, FitPoint, constants_literal,  # noqa: E402
                                       fit_constants, floor_kept_at_zero)
from hpipe.devices import DEVICES  # noqa: E402
from hpipe.models import MODELS  # noqa: E402

V1 = {"kind": "roofline", "version": 1}
V2 = {"kind": "roofline", "kernel_overhead_us": 0}


def report(cases, p1, p2) -> None:
    r1 = [p / cs.seconds for cs, p in zip(cases, p1)]
    r2 = [p / cs.seconds for cs, p in zip(cases, p2)]

    def row(label, idx):
        a, b = ref.stats([r1[i] for i in idx]), ref.stats([r2[i] for i in idx])
        print(f"| {label} | {a['n']} | {a['median']:.1%} | {a['p90']:.1%} | {a['ratio']:.2f} "
              f"| {b['median']:.1%} | {b['p90']:.1%} | {b['ratio']:.2f} |")

    head = "| group | cases | v1 median abs. err | v1 p90 | v1 pred/meas | v2 median | v2 p90 | v2 pred/meas |"
    print("\n## Issue-12 groups (fit: A100 + A40, Llama-2-7B, TP 1; hold-out: the rest)\n")
    print(head)
    print("|---|---|---|---|---|---|---|---|")
    for label, idx in ref.groups(cases).items():
        row(label, idx)

    print("\n## Per GPU, model, TP and unit kind\n")
    print(head.replace("group", "gpu / model / tp / kind"))
    print("|---|---|---|---|---|---|---|---|")
    per: dict[tuple, list[int]] = defaultdict(list)
    for i, cs in enumerate(cases):
        per[(cs.gpu, cs.model, cs.tp, cs.kind)].append(i)
    for key in sorted(per):
        row(" / ".join(str(k) for k in key), per[key])

    print("\n## Context growth: (t(n, c_max) - t(n, 0)) predicted / measured\n")
    g1, g2 = ref.context_growth(cases, p1), ref.context_growth(cases, p2)
    print("| gpu | n | c_max | v1 | v2 |\n|---|---|---|---|---|")
    for key in sorted(g1):
        print(f"| {key[0]} | {key[1]} | {key[2]} | {g1[key]:.2f} | {g2[key]:.2f} |")
    print(f"| median | | | {np.median(list(g1.values())):.2f} | {np.median(list(g2.values())):.2f} |")

    print("\n## Slicing one 4096-token prefill: attention time of k slices / one shot\n")
    s1, s2 = ref.slicing(cases, p1), ref.slicing(cases, p2)
    print("| gpu | slices | measured | v1 | v2 |\n|---|---|---|---|---|")
    for key in sorted(s1):
        print(f"| {key[0]} | {key[1]} | {s1[key][0]:.2f} | {s1[key][1]:.2f} | {s2[key][1]:.2f} |")


# ---- fitting ------------------------------------------------------------------------------
def fit_points(cases) -> list[FitPoint]:
    """The A100 and A40 rows of Llama-2-7B at TP 1, as points for the fit."""
    units = {name: {u.kind: u for u in MODELS[name].units()} for name in ("llama-2-7b",)}
    pts = []
    for cs in cases:
        if not ref.is_fit_case(cs):
            continue
        spec = DEVICES[cs.device_type]
        pts.append(FitPoint(units[cs.model][cs.kind], cs.n, cs.c, 1, cs.tp, spec.fp16_tflops * 1e12,
                            spec.memory_bandwidth_gbps * 1e9, 2, cs.seconds))
    return pts


def fit_gpu(cases) -> None:
    pts = fit_points(cases)
    k = fit_constants(pts, GENERATIONS["ampere"], fixed={floor_kept_at_zero("ampere"): 0.0})
    print(f"# fitted on {len(pts)} rows (A100-80GB + A40, Llama-2-7B, TP 1): paste into roofline._AMPERE")
    print(constants_literal(k))


def fit_cpu(profile_path: str) -> None:
    from hpipe.costmodels.calibration import profile_points
    from hpipe.costmodels.profile import load_profile

    prof = load_profile(profile_path)
    dp = prof.devices[0]
    # the device figures the ready local-cpu scenario declares for these cores
    pts = profile_points(prof, dp, peak_tflops=0.06, bandwidth_gbps=10.0)
    k = fit_constants(pts, GENERATIONS["cpu"], fixed={floor_kept_at_zero("cpu"): 0.0})
    print(f"# fitted on {len(pts)} points of {profile_path} device {dp.device}: paste into GENERATIONS['cpu']")
    print(constants_literal(k))


CPU_PROFILES = (("scenarios/local-cpu.yaml", "scenarios/profiles/local-cpu.json"),
                ("scenarios/local-cpu-hetero.yaml", "scenarios/profiles/local-cpu-hetero.json"))


def cpu_report() -> None:
    """Calibration on this project's CPU profiles: error on the quarter of each device's points held
    out of the fit (the fitted model's seeded rule), calibrated v2 against the uncalibrated rows."""
    from hpipe.costmodels.calibration import device_spec_for, holdout_errors, profile_points
    from hpipe.costmodels.fitted import holdout_mask
    from hpipe.costmodels.profile import load_profile
    from hpipe.costmodels.roofline import predict_points
    from hpipe.scenario import load_scenario

    root = Path(__file__).resolve().parents[1]
    print("\n## CPU profiles: roofline v2 calibrated on 3/4 of a device's points, error on the 1/4 held out\n")
    print("| profile | device | points held out | calibrated median / p90 | built-in cpu row | Ampere row | v1 |")
    print("|---|---|---|---|---|---|---|")
    for scn, path in CPU_PROFILES:
        setup = load_scenario(root / scn).resolve()
        v1 = load_scenario(root / scn)
        v1.costmodel = {"kind": "roofline", "version": 1}
        v1 = v1.resolve()
        prof = load_profile(root / path)
        for dp in prof.devices:
            spec = device_spec_for(dp, setup)
            pts = profile_points(prof, dp, spec.peak_tflops(prof.dtype), spec.memory_bandwidth_gbps)
            test = [p for p, keep in zip(pts, holdout_mask(len(pts))) if not keep]
            y = np.array([p.seconds for p in test])
            cal, amp = holdout_errors(pts, GENERATIONS["ampere"])
            row = np.abs(predict_points(test, GENERATIONS["cpu"]) / y - 1)
            dev = next(d.id for d in v1.cluster.devices if d.spec.name == dp.label)
            e1 = np.abs(np.array([float(v1.cost.unit_time_s(p.unit, dev, p.n, p.c, p.b, p.tp)) for p in test]) / y - 1)

            def f(e):
                return f"{np.median(e):.1%} / {np.percentile(e, 90):.1%}"
            print(f"| {path} | {dp.device} | {len(test)} | {f(cal)} | {f(row)} | {f(amp)} | {f(e1)} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fit", action="store_true", help="refit Ampere's constants on the fit rows and print them")
    ap.add_argument("--fit-cpu", metavar="PROFILE", nargs="?", const="scenarios/profiles/local-cpu.json",
                    help="refit the CPU row on an `hpipe profile` JSON and print it")
    ap.add_argument("--cpu", action="store_true", help="only the CPU-profile calibration table (no GPU reference needed)")
    args = ap.parse_args()
    if args.cpu:
        cpu_report()
        return 0
    if args.fit_cpu:
        fit_cpu(args.fit_cpu)
        return 0
    try:
        cases = ref.load_cases()
    except ref.ReferenceMissing as e:
        print(f"gpu_reference: the GPU reference data is absent: {e}", file=sys.stderr)
        return 2
    if args.fit:
        fit_gpu(cases)
        return 0
    print(f"{len(cases)} measured unit times from {ref.reference_dir()}")
    report(cases, ref.predict(cases, V1), ref.predict(cases, V2))
    cpu_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
