"""Roofline v2 against measured GPU kernel times (issue 12) and its calibration on CPU profiles.

The GPU checks read ``../shared/reference/gpu-kernels/`` (or ``$HPIPE_GPU_REFERENCE``) and skip
where it is absent.  Bounds are the issue's targets.  The mutation tests break one term of the
model on purpose (through the constants table) and assert that a target then fails, so the
targets are known to be able to fail.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hpipe import reference as ref
from hpipe.costmodels import roofline as rl
from hpipe.devices import DEVICES, GENERATIONS as GENERATION_NAMES
from hpipe.errors import InputError
from hpipe.scenario import load_scenario, parse_scenario

V1 = {"kind": "roofline", "version": 1}
V2 = {"kind": "roofline", "kernel_overhead_us": 0}  # the reference is kernel time: no launch gaps
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cases():
    try:
        return ref.load_cases()
    except ref.ReferenceMissing as e:
        pytest.skip(f"GPU reference data absent: {e}")


@pytest.fixture(scope="module")
def v2(cases):
    return ref.predict(cases, V2)


def group_stats(cases, pred, label):
    idx = ref.groups(cases)[label]
    assert idx, label
    return ref.stats([pred[i] / cases[i].seconds for i in idx])


# ---- the targets ------------------------------------------------------------------
def check_targets(cases, pred) -> list[str]:
    """Every issue-12 target that ``pred`` misses (empty: all met)."""
    missed = []
    for label in ("7B TP1 attn+MLP, empty cache, n>=128 (fit GPUs)",
                  "issue's 35: 7B TP1 attn+MLP, empty cache (MLP incl. H100)"):
        s = group_stats(cases, pred, label)
        if not (s["median"] <= 0.08 and s["p90"] <= 0.15):
            missed.append(f"{label}: median {s['median']:.1%}, p90 {s['p90']:.1%}")
    for label in ("attention, empty cache", "attention, context c>0"):
        s = group_stats(cases, pred, label)
        if not 0.9 <= s["ratio"] <= 1.1:
            missed.append(f"{label}: pred/meas {s['ratio']:.2f}")
    growth = float(np.median(list(ref.context_growth(cases, pred).values())))
    if not 0.85 <= growth <= 1.15:
        missed.append(f"context growth {growth:.2f} of measured")
    for (gpu, k), (meas, p) in ref.slicing(cases, pred).items():
        if meas < 1 and p >= 1:
            missed.append(f"slicing {gpu} x{k}: measured {meas:.2f}, predicted {p:.2f}")
    s = group_stats(cases, pred, "HOLD-OUT: all MLP (n 1-4096)")
    if not (s["median"] <= 0.10 and s["p90"] <= 0.20):
        missed.append(f"hold-out: median {s['median']:.1%}, p90 {s['p90']:.1%}")
    return missed


def test_v2_meets_every_target(cases, v2):
    assert check_targets(cases, v2) == []


def test_v1_is_unchanged_and_misses_the_targets(cases):
    """Version 1 still gives the figures the issue measured (13%, p90 28%, attention 0.80)."""
    v1 = ref.predict(cases, V1)
    s = group_stats(cases, v1, "issue's 35: 7B TP1 attn+MLP, empty cache (MLP incl. H100)")
    assert s["n"] == 35
    assert s["median"] == pytest.approx(0.132, abs=0.002) and s["p90"] == pytest.approx(0.283, abs=0.002)
    assert group_stats(cases, v1, "attention, empty cache")["ratio"] == pytest.approx(0.80, abs=0.01)
    assert len(check_targets(cases, v1)) >= 4


def test_slicing_is_cheaper_where_measured(cases, v2):
    sl = ref.slicing(cases, v2)
    assert len(sl) == 6  # a100 and a40, 2/4/8 slices
    for (gpu, k), (meas, pred) in sl.items():
        assert meas < 1 and pred < 1, (gpu, k, meas, pred)
        assert abs(pred - meas) < 0.06, (gpu, k, meas, pred)


def test_decode_sized_mlp_is_memory_bound_and_right(cases, v2):
    s = group_stats(cases, v2, "MLP, 1-64 tokens (decode-sized)")
    assert s["median"] <= 0.05 and s["p90"] <= 0.10


def test_fit_used_only_fit_rows():
    """The constants in the table are the ones --fit prints from the A100/A40 7B TP1 rows."""
    cases = ref.load_cases() if ref.reference_dir().is_dir() else pytest.skip("GPU reference data absent")
    from hpipe.models import MODELS

    units = {u.kind: u for u in MODELS["llama-2-7b"].units()}
    pts = [rl.FitPoint(units[cs.kind], cs.n, cs.c, 1, cs.tp, DEVICES[cs.device_type].fp16_tflops * 1e12,
                       DEVICES[cs.device_type].memory_bandwidth_gbps * 1e9, 2, cs.seconds)
           for cs in cases if ref.is_fit_case(cs)]
    assert {cs.gpu for cs in cases if ref.is_fit_case(cs)} == {"a100", "a40"}
    k = rl.fit_constants(pts, rl.GENERATIONS["ampere"], fixed={"kernel_floor_mflop": 0.0})
    np.testing.assert_allclose(k.as_vector(), rl.GENERATIONS["ampere"].as_vector(), rtol=0.02)


# ---- mutations: break one term, a target must fail ------------------------------------------
def _with_ampere(monkeypatch, **changes):
    k = replace(rl.GENERATIONS["ampere"], **changes)
    for gen in ("ampere", "hopper"):
        monkeypatch.setitem(rl.GENERATIONS, gen, k)


def test_mutation_one_attention_efficiency_breaks_slicing(cases, monkeypatch):
    """One efficiency for the whole attention kernel (no cheaper context rectangle): slicing is
    predicted to cost more than one shot, against the measurement."""
    a = rl.GENERATIONS["ampere"]
    _with_ampere(monkeypatch, attn_context_efficiency=a.attn_causal_efficiency,
                 attn_context_half_rows=a.attn_causal_half_rows)
    missed = check_targets(cases, ref.predict(cases, V2))
    assert any(m.startswith("slicing") for m in missed), missed


def test_mutation_no_n_dependence_breaks_context_growth(cases, monkeypatch):
    """Attention efficiency constant in the slice length: short slices against a long context come
    out too cheap (growth with context 0.79x of measured) and short-slice error doubles; the
    slicing ratio alone stays below 1 (the causal/context split carries it)."""
    _with_ampere(monkeypatch, attn_causal_half_rows=1.0, attn_context_half_rows=1.0)
    missed = check_targets(cases, ref.predict(cases, V2))
    assert any(m.startswith("context growth") for m in missed), missed


def test_mutation_size_independent_gemm_breaks_mlp(cases, monkeypatch):
    """GEMM efficiency independent of size: mid-sized GEMMs (128-512 tokens) come out too fast."""
    _with_ampere(monkeypatch, gemm_half_outputs=1.0)
    assert check_targets(cases, ref.predict(cases, V2))


# ---- the table and the device catalog ---------------------------------------------------------
def test_one_row_per_generation_and_every_device_has_one():
    assert set(rl.GENERATIONS) == set(GENERATION_NAMES)
    for d in DEVICES.values():
        assert d.generation in GENERATION_NAMES, d.name
    assert DEVICES["H100"].generation == "hopper" and DEVICES["P100"].generation == "pascal"
    assert DEVICES["CPU"].generation == "cpu"


def _scn(costmodel, device=None):
    device = device or {"name": "g", "peak_tflops": 100, "memory_gb": 40, "memory_bandwidth_gbps": 1000,
                        "power_w": 300}
    return {"name": "t", "model": "llama-2-7b", "workload": {"seq_len": 1024, "batch_size": 1},
            "cluster": {"hosts": [{"name": "h", "devices": [device]}]}, "costmodel": costmodel}


def test_custom_device_generation_default_and_explicit():
    s = parse_scenario(_scn("roofline")).resolve()
    assert s.cluster.devices[0].spec.generation == "ampere"
    cpu = {"name": "c", "peak_tflops": 0.06, "memory_gb": 4, "memory_bandwidth_gbps": 10, "power_w": 15,
           "runtime": {"device": "cpu"}}
    assert parse_scenario(_scn("roofline", cpu)).resolve().cluster.devices[0].spec.generation == "cpu"
    volta = {**cpu, "generation": "volta"}
    assert parse_scenario(_scn("roofline", volta)).resolve().cluster.devices[0].spec.generation == "volta"
    with pytest.raises(InputError, match="generation"):
        parse_scenario(_scn("roofline", {**cpu, "generation": "kepler"}))
    with pytest.raises(InputError, match="generation"):
        parse_scenario(_scn("roofline", {"type": "A100-80GB", "generation": "ampere"}))


def test_version_1_fields_refused_with_version_2():
    with pytest.raises(InputError, match="version-1"):
        parse_scenario(_scn({"kind": "roofline", "compute_efficiency": 0.5})).resolve()
    s = parse_scenario(_scn({"kind": "roofline", "version": 1, "compute_efficiency": 0.5})).resolve()
    assert s.cost.describe()["version"] == 1


def test_launch_overhead_is_a_floor_not_a_sum():
    """Version 2: a unit takes the longer of its kernels and the host's launches."""
    s = parse_scenario(_scn({"kind": "roofline", "kernel_overhead_us": 1000})).resolve()
    mlp = s.units[2]
    dev = s.cluster.devices[0].id
    assert float(s.cost.unit_time_s(mlp, dev, 1, 0, 1)) == pytest.approx(5 * 1000e-6)
    big = float(s.cost.unit_time_s(mlp, dev, 4096, 0, 1))
    s0 = parse_scenario(_scn({"kind": "roofline", "kernel_overhead_us": 0})).resolve()
    assert big == pytest.approx(float(s0.cost.unit_time_s(mlp, dev, 4096, 0, 1)))


def test_tensor_parallel_shard_is_cheaper_but_not_by_tp():
    s = parse_scenario(_scn({"kind": "roofline"}, {"type": "A100-80GB"})).resolve()
    dev = s.cluster.devices[0].id
    for u in s.units[1:3]:
        one = float(s.cost.unit_time_s(u, dev, 256, 0, 1))
        four = float(s.cost.unit_time_s(u, dev, 256, 0, 1, 4))
        assert one / 4 < four < one


# ---- CPU: the built-in row, and calibration from a profile -------------------------------------
def test_cpu_roofline_knows_small_slices_cost_more():
    """Issue 18: on the ready local-cpu scenario the plain roofline prices 16 slices of 32 tokens
    well above one 512-token pass, as the CPU profile measured (v1 said 1.0x)."""
    from hpipe.costmodels.profile import load_profile

    setup = load_scenario(ROOT / "scenarios/local-cpu.yaml").resolve()
    setup_v1 = parse_scenario({**_yaml(ROOT / "scenarios/local-cpu.yaml"), "costmodel": V1}).resolve()
    dp = load_profile(ROOT / "scenarios/profiles/local-cpu.json").devices[0]
    dev = setup.cluster.devices[0].id
    for kind in ("attn", "mlp"):
        u = next(x for x in setup.units if x.kind == kind)
        s = dp.units[kind]
        meas = {(n, c, b): t for n, c, b, t in zip(s.n, s.c, s.b, s.cpu_seconds)}
        measured = meas[(32, 0, 1)] * 16 / meas[(512, 0, 1)]  # first slice as a stand-in for each
        pred = sum(float(setup.cost.unit_time_s(u, dev, 32, c, 1)) for c in range(0, 512, 32)) \
            / float(setup.cost.unit_time_s(u, dev, 512, 0, 1))
        pred_v1 = sum(float(setup_v1.cost.unit_time_s(u, dev, 32, c, 1)) for c in range(0, 512, 32)) \
            / float(setup_v1.cost.unit_time_s(u, dev, 512, 0, 1))
        # (the stand-in under-states the measured cost: later slices attend to more context)
        assert measured > 1.3 and pred > 1.3 and pred_v1 < 1.1, (kind, measured, pred, pred_v1)


def _yaml(path):
    import yaml

    return yaml.safe_load(Path(path).read_text())


def test_calibration_predicts_held_out_points_far_better():
    """Fit on three quarters of local-cpu.json's points, predict the quarter held out: calibrated
    v2 within ~6% median where the GPU (Ampere) row is off by ~200% and v1 by far more."""
    from hpipe.costmodels.calibration import holdout_errors, profile_points
    from hpipe.costmodels.profile import load_profile

    prof = load_profile(ROOT / "scenarios/profiles/local-cpu.json")
    pts = profile_points(prof, prof.devices[0], peak_tflops=0.06, bandwidth_gbps=10)
    calibrated, uncalibrated = holdout_errors(pts, rl.GENERATIONS["ampere"], "cpu")
    assert np.median(calibrated) < 0.10 and np.percentile(calibrated, 90) < 0.30
    assert np.median(uncalibrated) > 5 * np.median(calibrated)


def test_calibration_through_the_scenario(tmp_path):
    """costmodel {kind: roofline, calibration: PROFILE} refits the generation of the profiled device
    and prices another device of that generation with it; a profile device it cannot place is refused
    only when none can be placed."""
    data = _yaml(ROOT / "scenarios/local-cpu-hetero.yaml")
    data["costmodel"] = {"kind": "roofline", "calibration": "profiles/local-cpu-hetero.json"}
    setup = parse_scenario(data, file=str(ROOT / "scenarios/local-cpu-hetero.yaml")).resolve()
    d = setup.cost.describe()
    assert "cpu" in d["calibrated_on"] and "fast/core-0" in d["calibrated_on"]["cpu"]
    assert setup.cost.constants["cpu"] != rl.GENERATIONS["cpu"]
    # the calibrated model predicts the profile's own points of both devices (CPU-time basis): one
    # fit for a full core and one held to 50% by a cgroup (declared at half the peak; the per-kernel
    # dispatch floor scales with it): median 12% and 8%, where one fit per device gives 6-8%
    from hpipe.costmodels.calibration import points_by_generation
    from hpipe.costmodels.profile import load_profile

    pts, _ = points_by_generation(load_profile(ROOT / "scenarios/profiles/local-cpu-hetero.json"), setup)["cpu"]
    err = np.abs(rl.predict_points(pts, setup.cost.constants["cpu"]) / [p.seconds for p in pts] - 1)
    assert np.median(err) < 0.15
    # a GPU scenario cannot place the CPU profile's devices: a clear error naming the file
    gpu = _scn({"kind": "roofline", "calibration": str(ROOT / "scenarios/profiles/local-cpu.json")},
               {"type": "A100-80GB"})
    with pytest.raises(InputError, match="local-cpu.json"):
        parse_scenario(gpu).resolve()
    missing = _scn({"kind": "roofline", "calibration": str(tmp_path / "nope.json")})
    with pytest.raises(InputError, match="no such profile"):
        parse_scenario(missing).resolve()


def test_one_devices_profile_prices_another_device_of_its_generation():
    """Calibrate on local-cpu.json (two full cores), then predict a device that profile never saw:
    the core held to 50% in local-cpu-hetero.json (its own declared 0.03 TF/s, 5 GB/s): median 21%
    against 82% for the uncalibrated GPU row.  Looser than a calibration on its own profile (8%):
    the two profiles were made in different setups (the hetero one in network namespaces and
    cgroups), and its per-call overhead is twice local-cpu.json's."""
    from hpipe.costmodels.calibration import profile_points
    from hpipe.costmodels.profile import load_profile

    data = _yaml(ROOT / "scenarios/local-cpu-hetero.yaml")
    data["costmodel"] = {"kind": "roofline", "calibration": "profiles/local-cpu.json"}
    setup = parse_scenario(data, file=str(ROOT / "scenarios/local-cpu-hetero.yaml")).resolve()
    assert set(setup.cost.calibrated) == {"cpu"}
    assert "slow" not in setup.cost.calibrated["cpu"]  # the slow core was not in that profile
    prof = load_profile(ROOT / "scenarios/profiles/local-cpu-hetero.json")
    slow = prof.device("slow/halfcore-0")
    pts = profile_points(prof, slow, peak_tflops=0.03, bandwidth_gbps=5)
    y = np.array([p.seconds for p in pts])
    calibrated = np.median(np.abs(rl.predict_points(pts, setup.cost.constants["cpu"]) / y - 1))
    gpu_row = np.median(np.abs(rl.predict_points(pts, rl.GENERATIONS["ampere"]) / y - 1))
    assert calibrated < 0.30 and gpu_row > 3 * calibrated, (calibrated, gpu_row)


def test_a_decode_step_reads_the_whole_kv_cache_at_least():
    """One token after 4096 of context, batch 8 (llama-7b on an A100-class device): the step
    reads every cached key and value, so it takes at least those bytes over the bandwidth.
    A mutation that read only the new token's K/V priced it at 0.56 ms for 0.97 ms."""
    from hpipe.models import MODELS

    attn = MODELS["llama-7b"].units()[1]
    assert attn.kind == "attn"
    k = rl.GENERATIONS["ampere"]
    b, c, bw = 8, 4096, 936e9
    t = float(rl.unit_time_v2(attn, 1, c, b, 1, 71e12, bw, 2, k))
    kv_bytes = b * (c + 1) * 2 * attn.model.kv_dim * 2
    assert t >= kv_bytes / (bw * k.memory_efficiency)
    # and it grows with the context: twice the context, about twice the reads
    t2 = float(rl.unit_time_v2(attn, 1, 2 * c, b, 1, 71e12, bw, 2, k))
    assert 1.7 < t2 / t < 2.1


def test_the_causal_triangle_counts_every_query_key_pair_of_the_slice():
    """Token i of an n-token slice attends to i + 1 positions of the slice: n(n+1)/2 pairs, 4·hd
    FLOPs each per head (QK^T and PV).  The causal term is isolated as the difference of two
    compute-bound prices whose causal efficiency differs by 2× (1/0.5 − 1/1 = 1).  A mutation
    that counted n²/2 pairs priced a one-token slice's triangle at half (audit M31)."""
    from hpipe.models import MODELS

    attn = MODELS["llama-7b"].units()[1]
    m = attn.model
    one = replace(rl.GENERATIONS["ampere"], attn_causal_efficiency=1.0, attn_causal_half_rows=0.0,
                  kernel_floor_us=0.0, kernel_floor_mflop=0.0)
    half = replace(one, attn_causal_efficiency=0.5)
    peak, bw, b = 1e12, 1e30, 2  # bandwidth out of the way: the attention kernel is compute-bound
    for n, pairs in ((1, 1), (3, 6), (16, 136)):
        for c in (0, 100):
            causal_s = float(rl.unit_time_v2(attn, n, c, b, 1, peak, bw, 2, half)
                             - rl.unit_time_v2(attn, n, c, b, 1, peak, bw, 2, one))
            want_s = 4.0 * b * m.n_heads * m.head_dim * pairs / peak
            assert causal_s == pytest.approx(want_s, rel=1e-9), (n, c)
