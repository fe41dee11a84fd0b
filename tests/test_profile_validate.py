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

import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("hpipe.runtime.launcher")

from hpipe.costmodels.profile import load_profile  # noqa: E402
from hpipe.runtime import emulation as em  # noqa: E402

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
    r = run_cli("profile", str(path), "--quick", "--repeats", "3", "--warmup", "1")
    assert r.returncode == 0, r.stderr
    return path, d / "tiny.json", r


def test_profile_writes_what_the_fitted_model_needs(tiny):
    path, prof_path, r = tiny
    prof = load_profile(prof_path)
    assert prof.versions.torch and prof.hardware.cpu_model and prof.created
    assert {d.device for d in prof.devices} == {"local/core-0", "local/core-1"}
    for d in prof.devices:
        assert set(d.units) == {"embed", "attn", "mlp", "head"}
        assert 0 < d.cpu_share <= 1.05
    assert len(prof.links) == 1 and prof.links[0].bandwidth_gbps > 0
    # the hold-out error is printed, and the fitted model loads from the scenario
    assert "held-out" in r.stdout and "median" in r.stdout
    from hpipe.scenario import load_scenario

    setup = load_scenario(path).resolve()
    assert setup.cost.name == "fitted"


def test_validate_json_contract(tiny):
    path, _, _ = tiny
    r = run_cli("validate", str(path), "--planners", "hpipe,base", "--random", "1", "--json", "-", "--quiet")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)  # stdout holds the JSON alone
    assert {"cases", "median_abs_error", "p90_abs_error"} <= set(data)
    assert len(data["cases"]) == 3
    for c in data["cases"]:
        assert {"planner", "simulated_latency_s", "measured_latency_s", "error"} <= set(c)
        assert c["error"] == pytest.approx((c["simulated_latency_s"] - c["measured_latency_s"])
                                           / c["measured_latency_s"])
    assert data["profiled"] == []  # the module's profile was current: not measured again


def test_validate_profiles_where_missing(tmp_path):
    sc = dict(TINY, workload={"seq_len": 64, "batch_size": 1})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sc))
    r = run_cli("validate", str(path), "--planners", "base", "--random", "0", "--json", str(tmp_path / "v.json"),
                "--quiet")
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["profiled"] and "no profile" in data["profiled"][0]
    assert load_profile(tmp_path / "tiny.json").scenario == "tiny-cpu"


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
