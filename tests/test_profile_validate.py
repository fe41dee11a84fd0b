"""`hpipe profile` and `hpipe validate` end to end on a tiny model: the profile file, the
hold-out table, the validation JSON contract, cleanup when a profiling run is killed, and
the property that simulated and measured latency agree for random small plans.

These run real worker processes (torch); they skip where torch or the runtime is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")
pytest.importorskip("hpipe.runtime.launcher")

from hpipe.costmodels.fitted import fit_link  # noqa: E402
from hpipe.costmodels.profile import PROFILER_METHOD, load_profile  # noqa: E402
from hpipe.runtime import emulation as em  # noqa: E402
from hpipe.runtime.profile_grid import codec_sizes  # noqa: E402
from hpipe.scenario import load_scenario as load_scenario_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {
    "name": "tiny-cpu",
    "model": "tiny-llama",
    "dtype": "float32",
    "workload": {"seq_len": 256, "batch_size": 2},
    "cluster": {"hosts": [{"name": "local", "devices": [
        {"name": "core", "count": 2, "peak_tflops": 0.06, "memory_gb": 4, "memory_bandwidth_gbps": 10,
         "power_w": 15, "idle_power_w": 2, "runtime": {"device": "cpu", "threads": 1}}],
        "interconnect": {"bandwidth_gbps": 20, "latency_us": 50}}]},
    "costmodel": {"kind": "fitted", "profile": "tiny.json"},
    "planner": {"kind": "hpipe", "token_granularity": 32},
}


def tiny_hetero() -> dict:
    dev = dict(TINY["cluster"]["hosts"][0]["devices"][0], count=1)
    slow = dict(dev, name="half", runtime={"device": "cpu", "threads": 1, "cpu_quota": 0.5})
    return {**TINY, "name": "tiny-hetero", "costmodel": {"kind": "fitted", "profile": "tiny-hetero.json"},
            "cluster": {"hosts": [{"name": "a", "devices": [dev]}, {"name": "b", "devices": [slow]}],
                        "network": {"bandwidth_gbps": 0.2, "latency_us": 100}}}


def run_cli(*args, timeout=300, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "hpipe", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd or ROOT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny scenario and its quick profile, measured once for the module."""
    d = tmp_path_factory.mktemp("tiny")
    path = d / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    r = run_cli("profile", str(path), "--quick", "--repeats", "3", "--warmup", "1", "-o", str(d / "tiny.json"))
    assert r.returncode == 0, r.stderr
    return path, d / "tiny.json", r


def test_profile_to_stdout_is_the_json_alone(tiny):
    """-o -: stdout is the profile and nothing else (the tables had followed it there)."""
    path, _, _ = tiny
    r = run_cli("profile", str(path), "--quick", "--repeats", "1", "--warmup", "0", "--no-links", "--no-alone",
                "-o", "-")
    assert r.returncode == 0, r.stderr
    assert {d["device"] for d in json.loads(r.stdout)["devices"]} == {"local/core-0", "local/core-1"}
    assert "held-out" in r.stderr and "wrote" not in r.stderr


def test_profile_writes_what_the_fitted_model_needs(tiny):
    path, prof_path, r = tiny
    prof = load_profile(prof_path)
    assert prof.versions.torch and prof.hardware.cpu_model and prof.created
    assert prof.settings.grid == "quick"  # --quick: costmodel auto says so when it plans on it
    assert prof.versions.profiler == PROFILER_METHOD  # else every fresh profile would read as stale
    assert {d.device for d in prof.devices} == {"local/core-0", "local/core-1"}
    for d in prof.devices:
        assert set(d.units) == {"embed", "attn", "mlp", "head"}
        assert 0 < d.cpu_share <= 1.05
        # two devices on the host: the planners' tensor-parallel stage splits units in two,
        # and the shards are timed, not derived
        (shard,) = d.shards
        assert shard.tp == 2 and set(shard.units) == {"attn", "mlp"}
        assert shard.units["mlp"].n == d.units["mlp"].n
        # two CPU devices share this machine: each also timed alone, over the same grid
        assert set(d.alone) == set(d.units)
        assert all(d.alone[k].n == d.units[k].n and d.alone[k].cpu_seconds for k in d.units)
        # every codec this torch has, timed encoding and decoding on the device over a few sizes
        from hpipe.runtime.codecs import HAS_FP8

        assert set(d.codecs) == ({"int8", "fp8", "int4"} if HAS_FP8 else {"int8", "int4"})
        for cs in d.codecs.values():
            assert cs.values == codec_sizes(load_scenario_file(path).resolve())
            assert len(cs.encode_cpu_s) == len(cs.decode_cpu_s) == len(cs.values)
            assert cs.encode_cpu_s[-1] > cs.encode_cpu_s[0]  # 512K values take longer than 64
    assert len(prof.links) == 1 and prof.links[0].bandwidth_gbps > 0
    # the two devices of the host form a tensor-parallel group: its all-reduce is timed,
    # and the fitted model charges that, not a ring built from the ping-pong
    (ar,) = prof.all_reduces
    assert ar.devices == ["local/core-0", "local/core-1"] and len(ar.seconds) == len(ar.sizes_bytes)
    # of what the runtime reduces: whole rows of d_model, each the fresh output of a shard
    row_bytes = load_scenario_file(path).resolve().model.d_model * 4  # float32
    assert ar.sizes_bytes == sorted(set(ar.sizes_bytes)) and all(s % row_bytes == 0 for s in ar.sizes_bytes)
    # one group: nothing to time it beside; each member's shard back to back and between
    # all-reduces, at every size, for the shards' after-wait ratio
    assert ar.seconds_together is None
    for timings in (ar.shard_cpu_s, ar.shard_after_wait_cpu_s):
        assert len(timings) == 2 and all(len(t) == len(ar.sizes_bytes) and min(t) > 0 for t in timings)
        assert all(t[-1] > t[0] for t in timings)  # the largest shard takes longer than one row's
    # the hold-out error is printed, and the fitted model loads from the scenario
    assert "held-out" in r.stdout and "median" in r.stdout
    # on CPU time, the basis predictions use, and the command says where it wrote the profile
    assert "(cpu time)" in r.stdout and prof.holdout["basis"] == "cpu"
    # the machine's speed before and after, on the devices' cores, for later runs to be set against
    from hpipe.runtime.speed import PROBE_VERSION

    probe = prof.speed_probe
    assert probe.version == PROBE_VERSION and probe.cores == [None]  # the devices are not pinned
    assert all(0 < x < 5 for x in probe.before_s + probe.after_s) and len(probe.before_s) == len(probe.after_s) == 1
    assert f"wrote {prof_path}" in r.stderr
    assert "co-location: units timed alone take" in r.stdout
    from hpipe.scenario import load_scenario

    setup = load_scenario(path).resolve()
    assert setup.cost.name == "fitted"
    assert setup.cost.colocated() == [(frozenset({"local/core-0", "local/core-1"}), 2)]
    lat, per_byte = fit_link(ar.sizes_bytes, ar.seconds)
    assert float(setup.cost.allreduce_time_s(["local/core-0", "local/core-1"], 65536)) == \
        pytest.approx(lat + 65536 * per_byte)
    # the fitted model prices int8 from the profile's timings (a two-coefficient fit over six
    # sizes), not the memory-pass model; the fit follows the timings at most sizes (a median
    # over sizes: one size timed while the machine was loaded must not fail it)
    from hpipe.codecs import get_codec
    from hpipe.costmodels import CostModel

    cs = prof.device("local/core-0").codecs["int8"]
    assert setup.cost.has_codec_timing("local/core-0", "int8")
    int8 = get_codec("int8")
    k = np.asarray(cs.values, float)
    enc, dec = setup.cost.codec_time_s(int8, "local/core-0", k)
    pass_enc, pass_dec = CostModel.codec_time_s(setup.cost, int8, "local/core-0", k)
    assert not np.allclose(enc, pass_enc) and not np.allclose(dec, pass_dec)
    assert np.median(np.abs(enc / np.asarray(cs.encode_cpu_s) - 1)) < 0.3
    assert np.median(np.abs(dec / np.asarray(cs.decode_cpu_s) - 1)) < 0.3


def test_chain_outweighs_the_cache():
    import torch

    from hpipe.models import get_model
    from hpipe.runtime.profile_units import CHAIN_MIN_BLOCKS, chain_blocks, last_level_cache_bytes

    spec = get_model("small-llama")
    block_bytes = sum(u.weight_bytes(4) for u in spec.units()[1:3])
    assert chain_blocks(spec, "float32", 0) == CHAIN_MIN_BLOCKS
    n = chain_blocks(spec, "float32", 32 << 20)  # a 32 MB L3: blocks worth 64 MB or more
    assert n * block_bytes >= 64 << 20 and (n - 1) * block_bytes < 64 << 20
    assert chain_blocks(spec, "float32", 1 << 40) == spec.n_layers  # never more than the model has
    assert chain_blocks(spec, "float16", 32 << 20) > n  # half the bytes per block: more blocks
    assert last_level_cache_bytes(torch.device("cpu")) >= 0


def test_validate_json_contract(tiny):
    path, _, _ = tiny
    r = run_cli("validate", str(path), "--planners", "hpipe,base", "--random", "1", "--repeats", "2",
                "--json", "-", "--quiet")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)  # stdout holds the JSON alone
    assert {"cases", "median_abs_error", "p90_abs_error"} <= set(data)
    # hpipe, base and one random plan, each distinct plan once
    assert len(data["cases"]) + sum(len(c["same_plan_as"]) for c in data["cases"]) == 3
    assert len({json.dumps([c["stages"], c["slices"], c["micro_batches"]]) for c in data["cases"]}) == len(data["cases"])
    for c in data["cases"]:
        assert {"planner", "simulated_latency_s", "measured_latency_s", "error"} <= set(c)
        assert c["error"] == pytest.approx((c["simulated_latency_s"] - c["measured_latency_s"])
                                           / c["measured_latency_s"])
    assert data["profiled"] == []  # the module's profile was current: not measured again
    assert data["quick_profiles"] == [TINY["name"]]  # --quick: said, since its errors run larger
    # honest statistics: signed errors, their mean, by kind and by origin; each case says what it is
    assert data["signed_bias"] == pytest.approx(sum(c["error"] for c in data["cases"]) / len(data["cases"]))
    kinds = {c["kind"] for c in data["cases"]}
    assert set(data["by_kind"]) == kinds and sum(k["n"] for k in data["by_kind"].values()) == len(data["cases"])
    assert data["by_origin"]["random"]["n"] == sum(not c["chosen_by_planner"] for c in data["cases"])
    for c in data["cases"]:
        assert c["n_stages"] == len(c["stages"]) and c["chosen_by_planner"] == (not c["planner"].startswith("random"))
        assert c["compute_error"] is not None and 0 < c["cpu_share"] <= 1.05
    out = path.parent / "v.json"  # to a file: said under the table, as simulate and sweep say it
    r = run_cli("validate", str(path), "--planners", "base", "--random", "0", "--json", str(out))
    assert r.returncode == 0 and f"wrote the Validation JSON to {out}" in "".join(r.stdout.split("\n")), r.stdout
    assert json.loads(out.read_text())["cases"]
    # the machine's noise beside the errors: every case ran twice
    spread = data["run_spread"]
    assert spread["runs"] == 2 and spread["n"] == len(data["cases"])
    # and the machine's drift since the profile: a probe before every run, against the profile's
    for c in data["cases"]:
        assert len(c["run_drifts"]) == 2 and all(-0.9 < x < 10 for x in c["run_drifts"])
        assert len(c["other_cpu_cores"]) == 2 and all(x >= 0 for x in c["other_cpu_cores"])  # Linux: /proc/stat
    drift = data["machine_drift"]
    assert drift["n"] == 2 * len(data["cases"]) == 2 * drift["cases"] and len(drift["by_round"]) == 2
    assert spread["median"] == pytest.approx(float(np.median(
        [max(c["measured_runs_s"]) / min(c["measured_runs_s"]) - 1 for c in data["cases"]])))


def test_validate_probes_the_machine_just_before_each_run(tiny, monkeypatch):
    """Round by round, every case: the probe, then its run (no worker running during a probe),
    each case's drifts in its runs' order; the runs faked, the probe counted."""
    import hpipe.runtime
    import hpipe.validate as hv
    from hpipe.result import RunResult

    path, prof_path, _ = tiny
    log = []
    counter = iter(range(1000))

    def fake_drift(setup, plan):
        log.append(("probe", plan.planner))
        return next(counter) / 100

    def fake_execute(setup, plan, **kw):
        log.append(("run", plan.planner))
        return RunResult(planner=plan.planner, latency_s=1.0 + len(log) / 1000, throughput_tokens_per_s=1.0,
                         energy_j=0.0, dynamic_energy_j=0.0, peak_memory_mb={}, utilization={},
                         bubble_fraction=0.0, plan=None, events=[])

    monkeypatch.setattr(hv, "probe_drift", fake_drift)
    monkeypatch.setattr(hpipe.runtime, "execute", fake_execute)
    sc = load_scenario_file(path)
    res = hv.validate([sc], opts=hv.CaseOptions(planners=("hpipe", "base"), n_random=1, repeats=2),
                      profile_paths={sc.name: str(prof_path)}, quiet=True)
    n = len(res.cases)
    assert log == [(kind, c.planner) for _ in range(2) for c in res.cases for kind in ("probe", "run")]
    for k, c in enumerate(res.cases):
        # drifts handed out in probe order: case k's are k/100 (round 1) and (n + k)/100 (round 2)
        assert c.run_drifts == [k / 100, (n + k) / 100]


# The property below is split in two claims, each measured so that a loaded 2-core machine
# cannot fail it while a wrong model still does (the single end-to-end bound of 30% failed at
# 34% once under load, and a wall-clock bound loose enough never to flake would hide a
# missing unit):
# * COMPUTE_BOUND: each device's compute, in the CPU time of its stage thread (which other
#   processes hardly inflate), against the fitted model's compute time for the same items.
#   The quick profile's own hold-out error on CPU time is 3-11% per unit kind here (measured
#   at a load of 5.7 on 2 cores); at a load of 14 a 4-slice plan's compute came out 7-10%
#   over the prediction, and dropping attention's context terms moved it to 15-22%.
# * REPLAY_BOUND: the simulator's latency for the plan with each device's compute slowed by
#   the factor that device's compute was slowed in the measured run (its measured compute wall
#   time over the predicted compute), against that run's latency: the schedule, the transfers
#   and the overlap the simulator models, with the run's own load folded in.  (A ratio of the
#   plan's latency to the unsliced plan's, run back to back, was tried first: at a load of 14
#   the three rounds' ratios were 1.06, 1.43 and 0.76.)
# * ROUNDS: medians over three runs, not two.  This VM's speed drifts from run to run by
#   itself: the same one-device plan took 1.20 s and 1.43 s of CPU time, then 1.89 s and
#   1.36 s, in consecutive runs on a machine otherwise idle (2026-12-01), and the mean of
#   two such runs (what a median of two is) missed COMPUTE_BOUND in 2 of 5 tries; the median
#   of three in 1 of 7.  A plan that misses a bound is measured ROUNDS times more and judged on
#   the median of all its runs: a drift passes, a model error (systematic) still misses.
# * REPROFILE: a plan that still misses after its second rounds has its quick profile measured
#   again and is judged afresh on new rounds.  A profile made under one load predicts the CPU
#   time of runs made under another poorly: beside a one-core busy loop (CI run, 2026-12-03,
#   2-core AMD EPYC) a profile measured while the loop started predicted a stage at 1.09 s of
#   CPU time that then measured 0.86 s, in both rounds.  A model error (a dropped term) misses
#   against any profile, so the bound is not loosened by this.
# * Co-location: a quiet run in which one core idles is faster than the profile timed beside
#   a busy neighbour (one-device plans 25% over their prediction); the profile now times each
#   device alone too, and the simulator prices the idle-neighbour stretches alone.
COMPUTE_BOUND = 0.20
REPLAY_BOUND = 0.15
ROUNDS = 3


@pytest.fixture(scope="module")
def local_cpu(tmp_path_factory):
    """scenarios/local-cpu.yaml (the scenario validated in the README) with a quick fitted profile."""
    d = tmp_path_factory.mktemp("local-cpu")
    data = yaml.safe_load((ROOT / "scenarios" / "local-cpu.yaml").read_text())
    data["costmodel"] = {"kind": "fitted", "profile": "local-cpu.json"}
    path = d / "local-cpu.yaml"
    path.write_text(yaml.safe_dump(data))
    _profile_quick(path)
    return path


def _profile_quick(scenario: Path) -> None:
    """Measure the quick profile the scenario's costmodel names (local-cpu.json beside it)."""
    # a quick profile takes ~30 s on a quiet 2-core VM, over 300 s at a load average of 11
    r = run_cli("profile", str(scenario), "--quick", "--repeats", "3", "--warmup", "1", "--quiet",
                "-o", str(scenario.parent / "local-cpu.json"), timeout=1200)
    assert r.returncode == 0, r.stderr


@st.composite
def small_plans(draw):
    """A random valid pipeline plan for local-cpu: 1-2 stages in either device order, cut
    anywhere, 1-8 slices of multiples of 32 tokens, 1-2 micro-batches.

    Tensor-parallel stages are left out: on two CPU cores the fitted model under-predicts
    them by 10-27% (the shards run slower than half a unit while both cores compute and
    share the memory bus), a known gap that validate reports (megatron, tp-terapipe)."""
    from hpipe.plan import Plan, Stage

    n_units, g, blocks = 2 * 8 + 2, 32, 512 // 32  # small-llama: 8 blocks; 512 tokens
    devs = draw(st.permutations(["local/core-0", "local/core-1"]))
    if draw(st.booleans()):
        stages = [Stage(devices=[devs[0]], units=(0, n_units))]
    else:
        cut = draw(st.integers(1, n_units - 1))
        stages = [Stage(devices=[devs[0]], units=(0, cut)), Stage(devices=[devs[1]], units=(cut, n_units))]
    cuts = sorted(draw(st.sets(st.integers(1, blocks - 1), max_size=7)))
    edges = [0, *cuts, blocks]
    slices = [(b - a) * g for a, b in zip(edges, edges[1:])]
    return Plan(planner="random", scenario="local-cpu", stages=stages, slices=slices,
                micro_batches=draw(st.integers(1, 2)))


@pytest.mark.timeout(2400)  # its quick profile and 9 runs, on a machine loaded several times over
@settings(max_examples=3, deadline=None, derandomize=True, phases=(Phase.generate,),  # no shrinking: each
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # example runs plans
@given(plan=small_plans())
def test_compute_cpu_time_and_replayed_latency_agree(local_cpu, plan):
    """For random small plans no planner chose: (1) every device's compute CPU time is what the
    fitted model predicts for its items, within COMPUTE_BOUND; (2) the simulator, given each
    device's slowdown in the run, predicts the run's latency within REPLAY_BOUND (medians
    over ROUNDS runs)."""
    import statistics

    from hpipe.runtime import execute
    from hpipe.scenario import load_scenario
    from hpipe.sim import simulate

    def load():
        setup = load_scenario(local_cpu).resolve()
        return setup, plan.check(setup)

    setup, plan = load()
    predicted = _compute_by_device(simulate(setup, plan).events)
    cpu, replay_errors = {d: [] for d in plan.devices}, []
    unit_time_s = setup.cost.unit_time_s

    def measure_rounds():
        for _ in range(ROUNDS):
            m = execute(setup, plan, quiet=True, timeout_s=120)
            for d, t in m.compute_cpu_s.items():
                cpu[d].append(t)
            slowdown = {d: w / predicted[d] for d, w in _compute_by_device(m.events).items()}
            setup.cost.unit_time_s = (lambda unit, d, n, c, b, tp=1:
                                      unit_time_s(unit, d, n, c, b, tp) * slowdown[d])
            try:
                replayed = simulate(setup, plan).latency_s
            finally:
                del setup.cost.unit_time_s
            replay_errors.append((replayed - m.latency_s) / m.latency_s)

    def misses() -> list:
        total = sum(statistics.median(ts) for ts in cpu.values())
        out = []
        for d in plan.devices:
            measured = statistics.median(cpu[d])
            # relative to the device's compute, or to a quarter of the plan's for a device that does
            # little (an embedding-only stage: 1.0 ms predicted, 2.5 ms measured, of 800 ms)
            if abs(predicted[d] - measured) > COMPUTE_BOUND * max(measured, total / 4):
                out.append(("compute", d, predicted[d], cpu[d]))
        if abs(statistics.median(replay_errors)) > REPLAY_BOUND:
            out.append(("replay", replay_errors))
        return out

    measure_rounds()
    if misses():  # a drift of the machine's speed, or the model?  ROUNDS more runs decide (see ROUNDS)
        measure_rounds()
    first = misses()
    if first:  # or the load changed since the profile: measure it again and judge afresh (see REPROFILE)
        _profile_quick(local_cpu)
        setup, plan = load()
        predicted = _compute_by_device(simulate(setup, plan).events)
        cpu, replay_errors = {d: [] for d in plan.devices}, []
        unit_time_s = setup.cost.unit_time_s
        measure_rounds()
        if misses():
            measure_rounds()
    assert not misses(), (plan, first, misses())


def _compute_by_device(events) -> dict[str, float]:
    out: dict[str, float] = {}
    for e in events:
        if e.kind == "compute":
            out[e.device] = out.get(e.device, 0.0) + e.end_s - e.start_s
    return out


def test_validate_profiles_where_missing(tmp_path):
    sc = dict(TINY, workload={"seq_len": 64, "batch_size": 1})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sc))
    r = run_cli("validate", str(path), "--planners", "base", "--random", "0", "--json", str(tmp_path / "v.json"),
                "--quiet")
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["profiled"] and "no profile" in data["profiled"][0]
    # measured into the per-user cache (the test's own, conftest), not beside the scenario
    # where its costmodel names tiny.json: validate never writes a file it was not asked to
    assert not (tmp_path / "tiny.json").exists()
    (used,) = data["profiles"].values()
    assert Path(used).parent == Path(os.environ["HPIPE_CACHE_DIR"]) / "profiles"
    assert Path(used).name.startswith("tiny-cpu-") and load_profile(used).scenario == "tiny-cpu"
    assert used in data["profiled"][0]  # and says where it wrote
    assert f"(wrote {used})" in r.stderr  # even with --quiet, as `hpipe profile` says it


def test_validate_never_writes_over_a_stale_named_profile(tmp_path, monkeypatch):
    """A scenario's fitted profile from another machine (a tracked file) is left as it is; the
    fresh profile goes to the cache, and validate says so."""
    monkeypatch.setenv("HPIPE_CACHE_DIR", str(tmp_path / "cache"))  # empty: the test above filled the session's
    sc = dict(TINY, workload={"seq_len": 64, "batch_size": 1})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sc))
    other = json.loads((ROOT / "scenarios" / "profiles" / "local-cpu.json").read_text())
    other["hardware"]["cpu_model"] = "Some Other CPU"
    (tmp_path / "tiny.json").write_text(json.dumps(other))
    before = (tmp_path / "tiny.json").read_bytes()
    r = run_cli("validate", str(path), "--planners", "base", "--random", "0", "--json", "-", "--quiet")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert (tmp_path / "tiny.json").read_bytes() == before
    assert "tiny.json" in data["profiled"][0] and "cache" in data["profiled"][0]
    assert Path(data["profiles"]["tiny-cpu"]).parent == Path(os.environ["HPIPE_CACHE_DIR"]) / "profiles"


def _with_gpu(sc: dict, device: str) -> dict:
    """``sc`` with its second core replaced by a device that runs on ``device``."""
    core = dict(sc["cluster"]["hosts"][0]["devices"][0], count=1)
    gpu = dict(core, name="gpu", peak_tflops=20, memory_gb=8, memory_bandwidth_gbps=500,
               runtime={"device": device})
    return {**sc, "cluster": {"hosts": [dict(sc["cluster"]["hosts"][0], devices=[core, gpu])]}}


def test_profile_of_a_gpu_this_machine_lacks_is_an_input_error(tmp_path):
    import torch

    if torch.cuda.device_count() >= 8:
        pytest.skip("this machine has a cuda:7")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_with_gpu(TINY, "cuda:7")))
    r = run_cli("profile", str(path), "--quick")
    # not timed on the CPU instead: the file, the field and what this machine has
    assert r.returncode == 2, r.stderr
    assert "s.yaml: field 'cluster.hosts[0].devices[" in r.stderr and "].runtime.device'" in r.stderr
    assert "local/gpu-0 runs on cuda:7" in r.stderr
    assert not (tmp_path / "tiny.json").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_profile_times_a_gpu_on_the_gpu(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_with_gpu(TINY, "cuda:0")))
    r = run_cli("profile", str(path), "--quick", "--repeats", "3", "--warmup", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    prof = load_profile(tmp_path / "tiny.json")
    assert prof.hardware.gpus
    cpu, gpu = prof.device("local/core-0"), prof.device("local/gpu-0")
    assert gpu.placement["device"] == "cuda:0" and gpu.cpu_share is None
    assert all(not s.cpu_seconds for s in gpu.units.values())  # GPU time, not the launching thread's
    assert gpu.codecs and all(cs.encode_s and not cs.encode_cpu_s for cs in gpu.codecs.values())
    assert cpu.cpu_share is not None and all(s.cpu_seconds for s in cpu.units.values())
    # the GPU link goes through host memory over gloo (a CPU stage is in the group)
    assert len(prof.links) == 1 and prof.links[0].bandwidth_gbps > 0


@pytest.mark.skipif(bool(em.netns_unsupported()), reason=str(em.netns_unsupported()))
@pytest.mark.timeout(600)
def test_two_groups_time_their_all_reduces_alone_and_together(tmp_path):
    """Two emulated hosts of two devices each: two tensor-parallel groups, whose all-reduce
    chains are timed each in turn and then both at once (what a stage pays while the other
    host's devices compute), and the fitted model prices the busy all-reduce from the latter."""
    host = TINY["cluster"]["hosts"][0]
    sc = {**TINY, "name": "tiny-2x2", "costmodel": {"kind": "fitted", "profile": "tiny-2x2.json"},
          "cluster": {"hosts": [dict(host, name="a"), dict(host, name="b")],
                      "network": {"bandwidth_gbps": 0.2, "latency_us": 100}}}
    path = tmp_path / "tiny-2x2.yaml"
    path.write_text(yaml.safe_dump(sc))
    r = run_cli("profile", str(path), "--quick", "--repeats", "1", "--warmup", "1",
                "-o", str(tmp_path / "tiny-2x2.json"))
    assert r.returncode == 0, r.stderr
    # the workers name each other's emulated host: no c10d warning per connection
    assert "hostname of the client socket" not in r.stderr, r.stderr
    prof = load_profile(tmp_path / "tiny-2x2.json")
    assert sorted(ar.devices for ar in prof.all_reduces) == [["a/core-0", "a/core-1"], ["b/core-0", "b/core-1"]]
    for ar in prof.all_reduces:
        assert len(ar.seconds_together) == len(ar.seconds) == len(ar.sizes_bytes)
        assert min(ar.seconds_together) > 0 and len(ar.shard_after_wait_cpu_s) == 2
    setup = load_scenario_file(path).resolve()
    ar = prof.all_reduces[0]
    lat, per_byte = fit_link(ar.sizes_bytes, ar.seconds_together)
    assert float(setup.cost.allreduce_busy_time_s(ar.devices, 65536)) == pytest.approx(lat + per_byte * 65536)
    # the cross-host links were shaped as the scenario asks: priced as measured, none moved
    cross = [lk for lk in prof.links if lk.emulated is not None]
    assert cross
    for lk in cross:
        assert lk.emulated.asked_latency_us == pytest.approx(setup.cluster.route(*lk.between).latency_s * 1e6)
        setup.cost.transfer_time_s(*lk.between, 1e6)
    assert "reshaped_links" not in setup.cost.describe()


@pytest.mark.skipif(bool(em.netns_unsupported() or em.cgroup_unsupported()),
                    reason=str(em.netns_unsupported() or em.cgroup_unsupported()))
def test_profile_killed_midway_leaves_nothing(tmp_path):
    path = tmp_path / "hetero.yaml"
    path.write_text(yaml.safe_dump(tiny_hetero()))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "hpipe", "profile", str(path), "--quick", "--quiet"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    children: set[int] = set()
    while time.monotonic() < deadline and not (len(em.leftovers(p.pid)) == 3 and len(children) >= 2):
        children |= _children(p.pid)
        time.sleep(0.1)
    assert len(em.leftovers(p.pid)) == 3, "the run did not set up its namespaces and cgroup"
    time.sleep(1.0)  # let the workers get into the namespaces and the cgroup
    p.send_signal(signal.SIGTERM)
    p.wait(30)
    assert p.returncode != 0
    assert not em.leftovers(p.pid)
    time.sleep(0.5)
    alive = [c for c in children if Path(f"/proc/{c}").exists() and "zombie" not in _state(c)]
    assert not alive, f"profiling workers still running: {alive}"


def _children(pid: int) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.add(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _state(pid: int) -> str:
    try:
        return "zombie" if (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z") else "alive"
    except OSError:
        return "zombie"


@pytest.mark.skipif(bool(em.netns_unsupported() or em.cgroup_unsupported()),
                    reason=str(em.netns_unsupported() or em.cgroup_unsupported()))
@pytest.mark.timeout(900)
def test_four_device_scenario_runs_plans_that_cross_the_slow_link_three_times(tmp_path):
    """scenarios/local-cpu-4dev.yaml: four quota-limited devices on two emulated hosts; a
    4-stage plan that zigzags between the hosts sends every item over the shaped link three
    times (both directions), and the run's result labels its energy as modelled."""
    from hpipe.plan import Plan, Stage
    from hpipe.runtime import execute
    from hpipe.scenario import load_scenario

    data = yaml.safe_load((ROOT / "scenarios" / "local-cpu-4dev.yaml").read_text())
    data["costmodel"] = "roofline"  # the run is the point here, not a profile
    path = tmp_path / "4dev.yaml"
    path.write_text(yaml.safe_dump(data))
    setup = load_scenario(path).resolve()
    quotas = {}
    for d in setup.cluster.devices:  # the quotas on each physical core add up to at most one core
        for core in d.placement.cores:
            quotas[core] = quotas.get(core, 0.0) + d.placement.cpu_quota
    assert len(setup.cluster.devices) == 4 and all(q <= 1.0 + 1e-9 for q in quotas.values())
    order = ["east/big-0", "west/big-0", "east/little-0", "west/little-0"]
    plan = Plan(planner="zigzag", scenario=setup.name, slices=[256, 256],
                stages=[Stage(devices=[d], units=u) for d, u in zip(order, [(0, 5), (5, 10), (10, 14), (14, 18)])]
                ).check(setup)
    r = execute(setup, plan, quiet=True, timeout_s=120)
    crossings = [e for e in r.events if e.kind == "transfer" and e.device.split("/")[0] != e.dst.split("/")[0]]
    assert len(crossings) == 3 * len(plan.slices)
    assert set(r.compute_cpu_s) == set(order) and r.energy_source in ("modelled", "measured")


def test_first_execute_under_auto_measures_a_profile_and_says_so(tmp_path, monkeypatch):
    """costmodel auto with an empty cache: execute says what it does and about how long it takes,
    measures a quick profile into the cache, then plans and predicts on it; the next run reuses it."""
    monkeypatch.setenv("HPIPE_CACHE_DIR", str(tmp_path / "cache"))
    sc = dict(TINY, costmodel="auto", workload={"seq_len": 64, "batch_size": 2})
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(sc))
    r = run_cli("execute", str(path), "--planner", "base", "--json", "-", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "no profile of this machine" in r.stderr and "measuring a quick one (about" in r.stderr
    (prof,) = (tmp_path / "cache" / "profiles").glob("tiny-cpu-*.json")
    used = json.loads(r.stdout)["cost_model"]
    assert used["kind"] == "fitted" and used["auto"]["used"] == "fitted" and used["profile_path"] == str(prof)
    r = run_cli("execute", str(path), "--planner", "base", "--json", "-", "--quiet")
    assert r.returncode == 0 and "measuring" not in r.stderr and "cost model auto" not in r.stderr  # --quiet


def test_validate_keeps_the_other_cases_when_a_run_fails(tiny, monkeypatch):
    """A hung or dead run (WorkerError) is that case's failure, named with its error; the other
    cases are still run and reported, and the failed one is not run again in later rounds."""
    import hpipe.runtime
    import hpipe.validate as hv
    from hpipe.errors import WorkerError
    from hpipe.result import RunResult

    path, prof_path, _ = tiny
    ran = []

    def fake_execute(setup, plan, **kw):
        ran.append(plan.planner)
        if plan.planner == "base":
            raise WorkerError("stage 1 (local/core-1): timed out after 0.001s")
        return RunResult(planner=plan.planner, latency_s=1.0, throughput_tokens_per_s=1.0, energy_j=0.0,
                         dynamic_energy_j=0.0, peak_memory_mb={}, utilization={}, bubble_fraction=0.0,
                         plan=None, events=[])

    monkeypatch.setattr(hv, "probe_drift", lambda setup, plan: None)
    monkeypatch.setattr(hpipe.runtime, "execute", fake_execute)
    sc = load_scenario_file(path)
    res = hv.validate([sc], opts=hv.CaseOptions(planners=("hpipe", "base"), n_random=0, repeats=2),
                      profile_paths={sc.name: str(prof_path)}, quiet=True)
    assert [c.planner for c in res.cases] == ["hpipe"]
    assert res.failed == ["tiny-cpu: base (round 1): stage 1 (local/core-1): timed out after 0.001s"]
    assert ran == ["hpipe", "base", "hpipe"]


def test_validate_refuses_before_any_work(tiny, tmp_path, monkeypatch):
    """What validate cannot do as asked is refused up front (nothing profiled or written), not
    after minutes of measuring: a --profile that is another file, stdout or another model's
    profile; a bad --timeout; two scenarios of one name; no case; a model that cannot fit
    (exit 3); a profile cache that takes no file."""
    path, prof_path, _ = tiny
    monkeypatch.setenv("HPIPE_CACHE_DIR", str(tmp_path / "cache"))
    other = tmp_path / "other.yaml"
    other.write_text(path.read_text())
    before = other.read_text()
    base = ("validate", str(path), "--quiet")
    for args, code, said in [
            (("--profile", str(other)), 2, "exists and is not a profile hpipe reads"),
            (("--profile", "-"), 2, "give a file, not -"),
            (("--profile", str(ROOT / "scenarios" / "profiles" / "local-cpu.json")), 2, "a profile of another model"),
            (("--timeout", "-5"), 2, "field '--timeout': must be a number of seconds above 0"),
            (("--planners", "", "--random", "0"), 2, "no case to validate"),
            ((str(other),), 2, "has the same name 'tiny-cpu'")]:
        planners = () if "--planners" in args else ("--planners", "hpipe", "--random", "0")
        r = run_cli(*base, *planners, *args)
        assert r.returncode == code and said in r.stderr, (args, r.returncode, r.stderr)
    assert other.read_text() == before
    broken = tmp_path / "broken.yaml"  # names a profile hpipe cannot read: exit 2 as in simulate, before any work
    (tmp_path / "trunc.json").write_text('{"format"')
    broken.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "name": "broken",
                                      "costmodel": {"kind": "fitted", "profile": "trunc.json"}}))
    r = run_cli("validate", str(path), str(broken), "--planners", "hpipe", "--random", "0", "--quiet")
    assert r.returncode == 2 and "field 'costmodel.profile'" in r.stderr and "JSON syntax error" in r.stderr, r.stderr
    small = tmp_path / "small.yaml"
    data = yaml.safe_load(path.read_text())
    data["cluster"]["hosts"][0]["devices"][0]["memory_gb"] = 0.001
    data["costmodel"] = "roofline"
    small.write_text(yaml.safe_dump(data))
    r = run_cli("validate", str(small), "--random", "1", "--quiet")
    assert r.returncode == 3 and "does not fit in the cluster's memory: 0.0" in r.stderr, r.stderr
    assert "0.00 GB" not in r.stderr  # a tiny model's figures keep their digits
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("HPIPE_CACHE_DIR", str(tmp_path / "a-file"))
    r = run_cli("validate", str(other), "--planners", "hpipe", "--random", "0", "--quiet", "--reprofile")
    assert r.returncode == 2 and "field '$HPIPE_CACHE_DIR': cannot write profiles" in r.stderr, r.stderr
    r = run_cli("profile", str(other), "--quick")
    assert r.returncode == 2 and "cannot write profiles" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "cache").exists()  # nothing was measured


def test_a_profile_short_of_the_workload_is_stale(tiny):
    """A profile timed up to 256 tokens at batch 2 does not describe 512 tokens, or 4 sequences
    (the fit would extrapolate): validate measures one that does, a run says so."""
    from hpipe.costmodels.profile import load_profile
    from hpipe.runtime.profiler import stale_reason

    path, prof_path, _ = tiny
    prof = load_profile(prof_path)
    assert stale_reason(prof, load_scenario_file(path).resolve()) is None
    for sets, said in ((["workload.seq_len=512"], "up to 256 tokens at batch 2, the scenario's workload is 512 "
                                                  "tokens at batch 2"),
                       (["workload.batch_size=4"], "the scenario's workload is 256 tokens at batch 4")):
        why = stale_reason(prof, load_scenario_file(path, overrides=sets).resolve())
        assert why is not None and said in why, why
    assert stale_reason(prof, load_scenario_file(path, overrides=["workload.seq_len=128"]).resolve()) is None


def test_validate_names_the_links_its_profile_did_not_measure(tiny, tmp_path, monkeypatch):
    """A profile without links (--no-links) prices transfers on the scenario's figures: the
    validation says which pairs (it had said nothing)."""
    import hpipe.runtime
    import hpipe.validate as hv
    from hpipe.result import RunResult

    path, prof_path, _ = tiny
    data = json.loads(prof_path.read_text())
    assert data["links"]
    no_links = tmp_path / "no-links.json"
    no_links.write_text(json.dumps({**data, "links": [], "step_hops": []}))
    monkeypatch.setattr(hv, "probe_drift", lambda setup, plan: None)
    monkeypatch.setattr(hpipe.runtime, "execute", lambda setup, plan, **kw: RunResult(
        planner=plan.planner, latency_s=1.0, throughput_tokens_per_s=1.0, energy_j=0.0, dynamic_energy_j=0.0,
        peak_memory_mb={}, utilization={}, bubble_fraction=0.0, plan=None, events=[]))
    sc = load_scenario_file(path)
    said = {}
    for profile in (no_links, prof_path):
        res = hv.validate([sc], opts=hv.CaseOptions(planners=("base",), n_random=0),
                          profile_paths={sc.name: str(profile)}, quiet=True)
        said[profile] = json.loads(res.model_dump_json())["unmeasured_links"]
    assert said[prof_path] == {}
    # base: two stages, one hop; not the other pairs the planner asked the cost model about
    assert said[no_links] == {"tiny-cpu": [["local/core-0", "local/core-1"]]}, said


def test_validate_may_write_over_an_empty_file_an_old_profile_or_another_dtypes(tiny, tmp_path):
    """--profile's refusals are for files that hold something else: an empty placeholder, a
    profile of an older format or of the same model in another dtype are only stale."""
    from hpipe.errors import InputError
    from hpipe.validate import check_profile_target

    path, prof_path, _ = tiny
    sc = load_scenario_file(path)
    empty = tmp_path / "empty.json"
    empty.write_text("")
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**json.loads(prof_path.read_text()), "format": "hpipe-profile/0"}))
    for free in (empty, old, prof_path, tmp_path / "missing.json"):
        check_profile_target(sc, str(free))
    check_profile_target(load_scenario_file(path, overrides=["dtype=bfloat16"]), str(prof_path))
    with pytest.raises(InputError, match="a profile of another model"):
        check_profile_target(load_scenario_file(path, overrides=["model=small-llama"]), str(prof_path))
    # another scenario's profile of the same model (its devices, its links): not this one's to
    # refresh; validate had measured over it, saying only that a device's placement differed
    check_profile_target(load_scenario_file(path, overrides=["name=other"]), str(prof_path))  # current: read
    with pytest.raises(InputError, match="a profile of scenario 'tiny-cpu', not 'other', and stale"):
        check_profile_target(load_scenario_file(path, overrides=["name=other", "workload.seq_len=512"]),
                             str(prof_path))


def test_validate_says_it_does_not_check_the_scenarios_own_roofline(tmp_path, monkeypatch):
    """validate checks the fitted model on a profile of this machine; `--set costmodel=roofline`
    (or a roofline scenario) was replaced by it without a word."""
    monkeypatch.setenv("HPIPE_CACHE_DIR", str(tmp_path / "cache"))
    scen = str(ROOT / "scenarios" / "local-cpu.yaml")
    r = run_cli("validate", scen, "--set", "costmodel=roofline", "--no-prefill")  # refused after the note
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "prices on the roofline cost model; validate checks the fitted model" in err, err
    r = run_cli("validate", scen, "--no-prefill")  # auto: what validate checks, nothing to say
    assert r.returncode == 2 and "validate checks the fitted model" not in r.stderr, r.stderr


def test_validate_refuses_a_gpu_this_machine_lacks_before_it_says_it_profiles(tmp_path, monkeypatch):
    """local-cpu-gpu places a device on cuda:0: validate printed "profiling local-cpu-gpu ... ->
    PATH" and then refused the missing GPU; the placement is now checked with the others first."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("HPIPE_CACHE_DIR", str(tmp_path / "cache"))
    r = run_cli("validate", str(ROOT / "scenarios" / "local-cpu-gpu.yaml"), "--random", "0", "--planners", "hpipe")
    assert r.returncode == 2 and "0 CUDA device(s)" in r.stderr and "profiling" not in r.stderr, r.stderr
    assert not (tmp_path / "cache" / "profiles").exists() or not any((tmp_path / "cache" / "profiles").iterdir())
