"""`costmodel: auto`, the per-user profile cache, validate's statistics and the energy label --
the parts that need no worker processes (see test_profile_validate.py for those)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from hpipe.costmodels.cache import cache_dir, cached_profile_path, profile_key
from hpipe.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "scenarios" / "local-cpu.yaml"
COMMITTED = ROOT / "scenarios" / "profiles" / "local-cpu.json"  # measured on another VM of this kind


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HPIPE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "profiles"


def _with(tmp_path, **changes) -> Path:
    data = yaml.safe_load(LOCAL.read_text())
    for k, v in changes.items():
        data[k] = v
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HPIPE_CACHE_DIR", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "profiles"
    monkeypatch.delenv("HPIPE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "hpipe" / "profiles"
    monkeypatch.chdir(tmp_path)  # a relative folder is the current one's, not the scenario's
    monkeypatch.setenv("HPIPE_CACHE_DIR", "rel")
    assert cache_dir() == tmp_path / "rel" / "profiles"


def test_auto_does_not_price_a_generating_scenario_on_a_cached_profile_without_decode_steps(cache):
    """The cache key holds the workload's shape, not output_tokens: a prefill-only profile sits at
    the key of the same scenario generating tokens.  auto does not take it there (its decode
    would be extrapolated from prefill slices); a run measures one with decode steps instead."""
    pytest.importorskip("torch")
    path = cached_profile_path(load_scenario(LOCAL).resolve())
    path.parent.mkdir(parents=True)
    shutil.copy(COMMITTED, path)  # prefill only
    gen = load_scenario(LOCAL, overrides=["workload.output_tokens=8"]).resolve()
    assert cached_profile_path(gen) == path
    assert gen.cost.auto.used == "roofline" and "timed no decode steps" in gen.cost.auto.reason
    assert gen.cost.auto.runs_here  # so execute (and generate) measure one
    assert load_scenario(LOCAL).resolve().cost.auto.used == "fitted"


def test_auto_is_roofline_until_the_cache_holds_a_profile_then_fitted(cache):
    pytest.importorskip("torch")  # runs_here needs the runtime installed
    setup = load_scenario(LOCAL).resolve()
    assert setup.cost.name == "roofline"
    choice = setup.cost.auto
    assert choice.used == "roofline" and choice.runs_here and "no profile" in choice.reason
    path = cached_profile_path(setup)
    assert Path(choice.profile_path) == path and path.parent == cache
    assert path.name.startswith("local-cpu-")
    path.parent.mkdir(parents=True)
    shutil.copy(COMMITTED, path)
    setup = load_scenario(LOCAL).resolve()
    assert setup.cost.name == "fitted" and setup.cost.auto.used == "fitted"
    d = setup.cost.describe()
    assert d["auto"]["used"] == "fitted" and d["profile_path"] == str(path)


def test_key_changes_with_what_the_profile_measured(tmp_path, cache):
    base = load_scenario(LOCAL).resolve()
    data = yaml.safe_load(LOCAL.read_text())
    data["cluster"]["hosts"][0]["devices"][0]["runtime"]["threads"] = 2
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(data))
    assert profile_key(load_scenario(p).resolve()) != profile_key(base)
    data = yaml.safe_load(LOCAL.read_text())
    data["workload"]["seq_len"] = 1024
    p.write_text(yaml.safe_dump(data))
    assert profile_key(load_scenario(p).resolve()) != profile_key(base)
    data = yaml.safe_load(LOCAL.read_text())
    data["planner"]["kind"] = "terapipe"  # not something the profile measured
    p.write_text(yaml.safe_dump(data))
    assert profile_key(load_scenario(p).resolve()) == profile_key(base)
    # nor is a host's interconnect: links inside a host are never shaped, so a sweep over
    # its figures (or an `interconnect: {}`) shares the profile; a network link is shaped
    for ic in ({}, {"bandwidth_gbps": 5.0}, {"latency_us": 400.0}):
        data = yaml.safe_load(LOCAL.read_text())
        data["cluster"]["hosts"][0]["interconnect"] = ic
        p.write_text(yaml.safe_dump(data))
        assert profile_key(load_scenario(p).resolve()) == profile_key(base), ic
    hetero = yaml.safe_load((ROOT / "scenarios" / "local-cpu-hetero.yaml").read_text())
    p.write_text(yaml.safe_dump(hetero))
    before = profile_key(load_scenario(p).resolve())
    hetero["cluster"]["network"]["bandwidth_gbps"] = 0.2
    p.write_text(yaml.safe_dump(hetero))
    assert profile_key(load_scenario(p).resolve()) != before
    # nor is a network no pair of hosts crosses: hpipe says a --set of it changes nothing, and
    # under auto it had picked another profile (to measure again) all the same
    hetero["cluster"]["links"] = [{"between": ["fast", "slow"], "bandwidth_gbps": 0.1, "latency_us": 200}]
    p.write_text(yaml.safe_dump(hetero))
    linked = profile_key(load_scenario(p).resolve())
    hetero["cluster"]["network"]["bandwidth_gbps"] = 5.0
    p.write_text(yaml.safe_dump(hetero))
    assert profile_key(load_scenario(p).resolve()) == linked
    data = yaml.safe_load(LOCAL.read_text())
    data["cluster"]["network"] = {"bandwidth_gbps": 1, "latency_us": 10}  # one host
    p.write_text(yaml.safe_dump(data))
    assert profile_key(load_scenario(p).resolve()) == profile_key(base)


def test_key_changes_with_the_profilers_method(monkeypatch, cache):
    from hpipe.costmodels import profile as profile_mod

    setup = load_scenario(LOCAL).resolve()
    before = profile_key(setup)
    monkeypatch.setattr(profile_mod, "PROFILER_METHOD", profile_mod.PROFILER_METHOD + 1)
    assert profile_key(setup) != before  # a profile measured the old way is not found, so measured again


def test_auto_without_runtime_placements_is_roofline(tmp_path, cache):
    data = yaml.safe_load((ROOT / "scenarios" / "paper-llama7b.yaml").read_text())
    data["costmodel"] = "auto"
    p = tmp_path / "paper.yaml"
    p.write_text(yaml.safe_dump(data))
    setup = load_scenario(p).resolve()
    assert setup.cost.name == "roofline" and not setup.cost.auto.runs_here
    assert "runtime: placement" in setup.cost.auto.reason


def test_auto_settings_are_checked(tmp_path, cache):
    from hpipe.errors import InputError

    p = _with(tmp_path, costmodel={"kind": "auto", "roofline": {"compute_efficiency": 0.5}, "speed": 1})
    with pytest.raises(InputError) as e:
        load_scenario(p).resolve()
    assert "speed" in str(e.value) and "unknown key" in str(e.value)
    p = _with(tmp_path, costmodel={"kind": "auto", "roofline": {"version": 1, "compute_efficiency": 0.5}})
    assert load_scenario(p).resolve().cost.config.compute_efficiency == 0.5


def test_cli_says_which_cost_model_and_how_to_get_a_profile(cli, cache):
    pytest.importorskip("torch")
    r = cli("simulate", str(LOCAL), "--planner", "hpipe", "--json", "-")
    assert r.returncode == 0, r.stderr
    # not a terminal: no profile is measured behind the user's back, but it says so and how
    assert "cost model auto: roofline" in r.stderr and "hpipe profile" in r.stderr and "about" in r.stderr
    assert json.loads(r.stdout)["cost_model"]["auto"]["used"] == "roofline"
    assert not cache.exists()


def test_validate_statistics():
    from hpipe.plan import Plan, Stage
    from hpipe.validate import dedup, error_summary, plan_kind

    setup = load_scenario(ROOT / "scenarios" / "paper-llama7b.yaml").resolve()
    n = setup.n_units
    d0, d1 = setup.cluster.device_ids[:2]
    two = [Stage(devices=[d0], units=(0, 10)), Stage(devices=[d1], units=(10, n))]
    a = Plan(planner="gpipe", scenario=setup.name, stages=two, slices=[setup.seq_len])
    b = a.model_copy(update={"planner": "megatron"})
    c = a.model_copy(update={"slices": [setup.seq_len // 2] * 2})
    out = dedup([a, b, c])
    assert [(p.planner, same) for p, same in out] == [("gpipe", ["megatron"]), ("gpipe", [])]
    assert plan_kind(setup, a) == "pipeline"
    assert plan_kind(setup, a.model_copy(update={"micro_batches": 2})) == "micro-batch"
    tp = Plan(planner="x", scenario=setup.name, stages=[Stage(devices=[d0, d1], units=(0, n))], slices=[setup.seq_len])
    assert plan_kind(setup, tp) == "tensor-parallel"
    assert plan_kind(setup, a.model_copy(update={"stages": [Stage(devices=[d0], units=(0, n))]})) == "single-device"
    s = error_summary([-0.1, -0.3, 0.2])
    assert s.n == 3 and s.signed_bias == pytest.approx(-0.2 / 3) and s.median_abs_error == pytest.approx(0.2)


def test_energy_meter_interpolates_and_unrolls_wraps(tmp_path, monkeypatch):
    from hpipe.runtime import energy

    assert energy.counter_for([_Dev("cpu")]) is None or (Path("/sys/class/powercap").exists())
    pkg = tmp_path / "intel-rapl:0"
    pkg.mkdir()
    (pkg / "energy_uj").write_text("900000\n")
    (pkg / "max_energy_range_uj").write_text("1000000\n")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a subzone: not counted again
    monkeypatch.setattr(energy, "POWERCAP", tmp_path)
    counter = energy.counter_for([_Dev("cpu"), _Dev("cpu")])
    assert counter is not None and counter.kind == "rapl" and counter.wrap_j == pytest.approx(1.0)
    assert energy.counter_for([_Dev("cpu"), _Dev("cuda:0")]) is None  # a package counter cannot split them
    m = energy.Meter(counter)
    m.samples = [(0.0, 0.9), (1.0, 0.95), (2.0, 0.05)]  # wrapped: 0.95 -> 1.05 J
    assert m.joules_between(0.5, 1.5) == pytest.approx(0.075)
    assert m.joules_between(0.0, 2.0) == pytest.approx(0.15)
    assert m.joules_between(-1.0, 1.0) is None  # not bracketed by samples


class _Dev:
    def __init__(self, runtime_device):
        self.runtime_device = runtime_device


def test_quiet_drops_the_which_model_note_and_sweep_says_each_note_once(cli, cache):
    """-q keeps the datasheet warning (it changes what the figures mean) but not the plain
    'fitted, from this profile' line; a sweep says each distinct note once, naming the values
    it holds for, instead of once per value (and twice for the first)."""
    pytest.importorskip("torch")
    path = cached_profile_path(load_scenario(LOCAL).resolve())  # seq_len 512
    path.parent.mkdir(parents=True)
    shutil.copy(COMMITTED, path)
    r = cli("simulate", str(LOCAL), "-q")
    assert r.returncode == 0 and "cost model auto" not in r.stderr, r.stderr
    r = cli("simulate", str(LOCAL))
    assert r.returncode == 0 and r.stderr.count("cost model auto: fitted") == 1, r.stderr
    assert "a quick one" not in r.stderr  # the committed profile has no grid marker
    data = json.loads(COMMITTED.read_text())
    data["settings"]["grid"] = "quick"
    path.write_text(json.dumps(data))
    r = cli("simulate", str(LOCAL))
    assert r.returncode == 0 and "(a quick one: a coarse grid" in " ".join(r.stderr.split()), r.stderr

    r = cli("sweep", str(LOCAL), "--set", "planner.micro_batches=1,2")  # one note for all: no values named
    assert r.returncode == 0 and r.stderr.count("cost model auto: fitted") == 1 and "[" not in r.stderr, r.stderr
    r = cli("sweep", str(LOCAL), "--set", "workload.seq_len=256,128", "-q")  # no profile for either
    err = " ".join(r.stderr.split())
    assert r.returncode == 0 and err.count("cost model auto: roofline") == 2, r.stderr  # two profiles, one each
    assert "[workload.seq_len = 256]" in err and "[workload.seq_len = 128]" in err, r.stderr
    # each value's advice measures that value's profile: without its --set, `hpipe execute` had
    # measured the file's seq_len 512, a profile neither value takes
    assert "--set workload.seq_len=256` measures" in err and "--set workload.seq_len=128` measures" in err, r.stderr
    # a generating value needs a profile with decode steps: the file's prefill-only one would not do
    r = cli("sweep", str(LOCAL), "--set", "workload.seq_len=256", "--set", "workload.output_tokens=0,8", "-q")
    err = " ".join(r.stderr.split())
    assert r.returncode == 0 and err.count("cost model auto: roofline") == 2, r.stderr
    assert "`hpipe execute " in err and err.count("--set workload.output_tokens=8` measures") == 1, r.stderr
    assert "output_tokens=0" not in err, r.stderr
    # a swept key outside the cache key: one profile, one note, its advice without the swept value
    r = cli("sweep", str(LOCAL), "--set", "workload.seq_len=256", "--set", "planner.micro_batches=1,2", "-q")
    err = " ".join(r.stderr.split())
    assert r.returncode == 0 and err.count("cost model auto: roofline") == 1 and "[" not in err, r.stderr
    advice = next(line for line in r.stderr.splitlines() if "measures this machine once" in line)
    assert "--set workload.seq_len=256`" in advice and "micro_batches" not in advice, r.stderr


def test_a_sweep_that_auto_would_price_on_two_models_takes_the_roofline_for_all(cli, cache, tmp_path):
    """The cache holds a profile for seq_len 512 only: auto would price 512 fitted and 256 on
    the roofline, rows that do not compare.  The sweep prices both on the roofline and says so,
    naming the profile that would price them all; the figures are the roofline's own."""
    pytest.importorskip("torch")
    path = cached_profile_path(load_scenario(LOCAL).resolve())  # seq_len 512
    path.parent.mkdir(parents=True)
    shutil.copy(COMMITTED, path)
    out = tmp_path / "sweep.json"
    r = cli("sweep", str(LOCAL), "--set", "workload.seq_len=512,256", "--planner", "base", "--json", str(out))
    assert r.returncode == 0, r.stderr
    err = " ".join(r.stderr.split())
    assert "fits workload.seq_len = 512 only: every value of the sweep is priced on the roofline" in err, r.stderr
    assert f"profile: {path}" in err and "cost model auto: fitted" not in err
    assert "measures this machine once" not in err  # no advice to measure a profile that exists
    runs = json.loads(out.read_text())["runs"]
    swept = [run["results"][0]["latency_s"] for run in runs]
    for run in runs:  # the JSON says auto chose the roofline, and why, as simulate's does
        assert run["cost_model"]["kind"] == "roofline" and run["cost_model"]["auto"]["used"] == "roofline", run
        assert "so that the rows compare" in run["cost_model"]["auto"]["reason"]
    alone = tmp_path / "one.json"
    assert cli("simulate", str(LOCAL), "--planner", "base", "--set", "costmodel=roofline",
               "--json", str(alone)).returncode == 0
    assert swept[0] == json.loads(alone.read_text())["results"][0]["latency_s"]
    fitted = tmp_path / "fitted.json"
    assert cli("simulate", str(LOCAL), "--planner", "base", "--json", str(fitted)).returncode == 0  # auto: fitted
    assert json.loads(fitted.read_text())["results"][0]["latency_s"] != swept[0]


def test_a_sweep_whose_values_have_profiles_of_their_own_takes_the_roofline_for_all(cli, cache, tmp_path):
    """A profile cached for each value, measured apart (another load, another grid): rows priced
    each on its own would mix measurements (a helper saw 33% more tokens cost 3% more time).
    The sweep prices every value on the roofline, says so and names a profile to use for all."""
    pytest.importorskip("torch")
    data = yaml.safe_load(LOCAL.read_text())
    paths = []
    for n in (512, 256):
        data["workload"]["seq_len"] = n
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
        paths.append(cached_profile_path(load_scenario(tmp_path / "s.yaml").resolve()))
    assert paths[0] != paths[1]
    paths[0].parent.mkdir(parents=True)
    for p in paths:
        shutil.copy(COMMITTED, p)
    out = tmp_path / "sweep.json"
    r = cli("sweep", str(LOCAL), "--set", "workload.seq_len=512,256", "--planner", "base", "--json", str(out))
    err = " ".join(r.stderr.split())
    assert r.returncode == 0 and "the values of workload.seq_len have profiles of their own, measured apart (2 files)" in err, err
    assert f"profile: {paths[0]}" in err and "cost model auto: fitted" not in err
    assert {run["cost_model"]["auto"]["used"] for run in json.loads(out.read_text())["runs"]} == {"roofline"}
    # one profile for both (a swept key outside the cache key): priced on it, as before
    r = cli("sweep", str(LOCAL), "--set", "planner.micro_batches=1,2", "--planner", "base", "--json", str(out))
    assert r.returncode == 0 and "profile of its own" not in r.stderr, r.stderr
    assert {run["cost_model"]["kind"] for run in json.loads(out.read_text())["runs"]} == {"fitted"}


def test_the_sweeps_roofline_keeps_autos_own_settings_and_their_paths(cli, cache, tmp_path):
    """auto's roofline, calibrated from a file beside the scenario: when the sweep prices every
    value on it, the file is still read from the scenario's folder (run from elsewhere)."""
    pytest.importorskip("torch")
    folder = tmp_path / "sc"
    folder.mkdir()
    data = yaml.safe_load(LOCAL.read_text())
    data["costmodel"] = {"kind": "auto", "roofline": {"calibration": "calib.json"}}
    (folder / "s.yaml").write_text(yaml.safe_dump(data))
    shutil.copy(COMMITTED, folder / "calib.json")
    path = cached_profile_path(load_scenario(folder / "s.yaml").resolve())
    path.parent.mkdir(parents=True)
    shutil.copy(COMMITTED, path)
    r = cli("sweep", str(folder / "s.yaml"), "--set", "workload.seq_len=512,256", "--planner", "base", "--json", "-",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    models = [run["cost_model"] for run in json.loads(r.stdout)["runs"]]
    assert all(m["kind"] == "roofline" and m["calibration"] == "calib.json" for m in models), models


def test_a_scenario_name_never_leaves_the_cache_folder(tmp_path, monkeypatch):
    """The name is part of the file name: "lab/4gpu" made a subfolder and "../../x" a file
    outside the cache."""
    from hpipe.costmodels.cache import cache_dir, cached_profile_path
    from hpipe.scenario import load_scenario

    monkeypatch.setenv("HPIPE_CACHE_DIR", str(tmp_path))
    for name in ("../../x", "lab/4gpu", ".hidden"):
        setup = load_scenario(ROOT / "scenarios" / "local-cpu.yaml", overrides=[f"name={name}"]).resolve()
        path = cached_profile_path(setup)
        assert path.parent == cache_dir() and not path.name.startswith("."), (name, path)


def test_the_profile_estimate_counts_each_cpu_devices_sweeps_alone(monkeypatch):
    """Two CPU devices on this machine: the profiler also sweeps each one's units while the
    other idles, one device at a time.  The estimate had left that out and said half the
    profile's time (35 s for 73 s, local-cpu on a 2-core AMD EPYC VM)."""
    from hpipe.runtime import profile_cache
    from hpipe.runtime.profile_units import alone_repeats

    monkeypatch.setattr(profile_cache, "load_factor", lambda n: 1.0)
    two = load_scenario(LOCAL).resolve()
    one = load_scenario(LOCAL, overrides=["cluster.hosts[0].devices[0].count=1"]).resolve()
    for warmup, repeats in ((1, 3), (2, 5)):
        chain_s = (profile_cache.estimate_profile_s(one, warmup=warmup, repeats=repeats)
                   - profile_cache.STARTUP_S) / (warmup + repeats)  # one device: no sweeps alone
        assert chain_s > 0
        assert profile_cache.estimate_profile_s(two, warmup=warmup, repeats=repeats) == pytest.approx(
            profile_cache.STARTUP_S + (warmup + repeats) * chain_s + (1 + alone_repeats(repeats)) * 2 * chain_s)
        # (one host: its link runs over loopback, unshaped, and no round trip is priced)


def test_the_profile_estimate_counts_the_links_round_trips(monkeypatch):
    """Two emulated hosts at 0.0001 Gbit/s: the ping-pongs take hours; the estimate had said
    "about 23 s" for a profile that took four minutes with a tiny model."""
    from hpipe.runtime import profile_cache
    from hpipe.runtime.profile_grid import LINK_REPEATS, link_sizes

    monkeypatch.setattr(profile_cache, "load_factor", lambda n: 1.0)
    hetero = ROOT / "scenarios" / "local-cpu-hetero.yaml"
    fast = load_scenario(hetero).resolve()
    slow = load_scenario(hetero, overrides=["cluster.network.bandwidth_gbps=0.0001"]).resolve()
    biggest = max(link_sizes(slow))
    one_way_s = biggest * 8 / (0.0001 * 1e9)
    extra = profile_cache.estimate_profile_s(slow) - profile_cache.estimate_profile_s(fast)
    assert extra > LINK_REPEATS * 2 * one_way_s
    assert extra < (LINK_REPEATS + 2) * 2 * one_way_s * 2  # every size, the largest about 3/4 of them


def test_the_estimate_reads_the_load_once_so_a_sweeps_notes_agree(monkeypatch):
    """A sweep says a note once for all values whose texts agree; the estimate in it read the
    load average anew for each value, and CI's sweep said "about 3 min" and "about 4 min"."""
    import itertools
    import os

    from hpipe.runtime import profile_cache

    loads = itertools.count(1.0, 0.7)
    monkeypatch.setattr(os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    profile_cache._load_average.cache_clear()
    try:
        assert profile_cache.load_factor(2) == profile_cache.load_factor(2)
    finally:
        profile_cache._load_average.cache_clear()


def test_the_load_factor_shares_the_machines_load_over_its_cores_and_caps_the_workers_by_a_quota(monkeypatch):
    """A container sees the whole host's load average; dividing it by the container's CFS
    quota made a quiet 8-minute profile read 'about 2 h' (load 30 on 64 cores, quota 2)."""
    from hpipe.runtime import here, profile_cache

    monkeypatch.setattr(profile_cache, "_load_average", lambda: 30.0)
    monkeypatch.setattr(here, "usable_cores", lambda: set(range(64)))
    monkeypatch.setattr(here, "cpu_quota_cores", lambda: 2.0)
    assert profile_cache.load_factor(3) == 1.5  # three workers on two cores' worth
    assert profile_cache.load_factor(1) == 1.0
    monkeypatch.setattr(here, "cpu_quota_cores", lambda: None)
    monkeypatch.setattr(profile_cache, "_load_average", lambda: 126.0)
    assert profile_cache.load_factor(2) == 2.0  # a busy machine: 128 runnable on 64 cores


def test_no_json_or_chart_is_written_into_the_profile_cache(cli, cache, tmp_path):
    """`simulate --json` into the cache had replaced the cached profile auto read (exit 0); the
    next run fell back to the roofline, "cached profile unreadable".  Outputs other than a
    profile are refused there before any work, and the profile is untouched."""
    pytest.importorskip("torch")
    path = cached_profile_path(load_scenario(LOCAL).resolve())
    path.parent.mkdir(parents=True)
    shutil.copy(COMMITTED, path)
    before = path.read_bytes()
    for cmd in (["simulate", str(LOCAL), "-q", "--json", str(path)],
                ["sweep", str(LOCAL), "--set", "planner.micro_batches=1,2", "-q", "--json", str(path)],
                ["plan", str(LOCAL), "-q", "-o", str(path.parent / "plan.json")]):
        r = cli(*cmd)
        assert r.returncode == 2 and "profile cache" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_key_changes_with_each_model_shape_field_and_the_granularity(tmp_path, cache):
    """Every field of the model's shape is in the key (a profile times units of that shape),
    and the token granularity (the profile's grid of slices steps by it); audit 3: n_kv_heads,
    and the granularity, each left out of the key, survived."""
    from hpipe.models import get_model

    base = load_scenario(LOCAL).resolve()
    shape = get_model("small-llama").to_dict()
    for field, value in (("n_kv_heads", 8), ("d_ff", 1024), ("vocab_size", 4000), ("n_layers", 4)):
        changed = json.dumps({**shape, field: value})
        assert profile_key(load_scenario(LOCAL, overrides=[f"model={changed}"]).resolve()) != profile_key(base), field
    same = json.dumps(shape)
    assert profile_key(load_scenario(LOCAL, overrides=[f"model={same}"]).resolve()) == profile_key(base)
    finer = load_scenario(LOCAL, overrides=["planner.token_granularity=16"]).resolve()
    assert finer.granularity == 16 != base.granularity and profile_key(finer) != profile_key(base)


def test_auto_is_roofline_for_hosts_that_are_other_machines(cache):
    """A host with an address runs elsewhere: no profile of it can be made here, whatever its
    placements (audit 3: the address check dropped survived)."""
    from hpipe.costmodels.cache import runs_here

    setup = load_scenario(LOCAL, overrides=["cluster.hosts[0].address=10.0.0.2"]).resolve()
    assert runs_here(setup) == "its hosts are other machines (address:)"
    assert setup.cost.name == "roofline" and not setup.cost.auto.runs_here
    assert setup.cost.auto.reason == "no measured profile possible: its hosts are other machines (address:)"


def test_error_summary_p90_by_hand():
    """|errors| 0.1, 0.2, 0.3: median 0.2, p90 0.28 (numpy's linear rule), bias -0.2/3; none: None
    (audit 3: the 95th percentile, 0.29, survived)."""
    from hpipe.validate import error_summary

    s = error_summary([-0.1, -0.3, 0.2])
    assert (s.median_abs_error, s.p90_abs_error) == (pytest.approx(0.2), pytest.approx(0.28))
    e = error_summary([])
    assert (e.median_abs_error, e.p90_abs_error, e.signed_bias, e.n) == (None, None, None, 0)


def test_energy_counters_read_joules(tmp_path, monkeypatch):
    """RAPL's energy_uj in microjoules and NVML's total energy in millijoules, both read as
    joules: 900000 uJ + 100000 uJ over two packages is 1.0 J; 1500 + 2500 mJ over two GPUs is
    4.0 J (audit 3: 1e-3 for RAPL's 1e-6, and 1e-6 for NVML's 1e-3, survived)."""
    import sys
    from types import SimpleNamespace

    from hpipe.runtime import energy

    for name, uj in (("intel-rapl:0", "900000\n"), ("intel-rapl:1", "100000\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "energy_uj").write_text(uj)
    monkeypatch.setattr(energy, "POWERCAP", tmp_path)
    assert energy.counter_for([_Dev("cpu")]).read() == pytest.approx(1.0, rel=1e-12)
    mj = {0: 1500, 1: 2500}
    fake = SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: i,
                           nvmlDeviceGetTotalEnergyConsumption=lambda h: mj[h])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    counter = energy.counter_for([_Dev("cuda:0"), _Dev("cuda:1")])
    assert counter.kind == "nvml" and counter.read() == pytest.approx(4.0, rel=1e-12)


def test_auto_passes_its_fitted_settings_to_the_fitted_model(tmp_path, cache):
    """`{kind: auto, fitted: {basis: wall}}` with a cached profile: the fitted model it builds
    fits on wall time (audit 3: auto's fitted settings dropped from its choice survived)."""
    pytest.importorskip("torch")  # runs_here needs the runtime installed
    p = _with(tmp_path, costmodel={"kind": "auto", "fitted": {"basis": "wall"}})
    path = cached_profile_path(load_scenario(p).resolve())
    path.parent.mkdir(parents=True)
    shutil.copy(COMMITTED, path)
    setup = load_scenario(p).resolve()
    assert setup.cost.name == "fitted" and setup.cost.config.basis == "wall"
    assert setup.cost.auto.spec == {"basis": "wall", "kind": "fitted", "profile": str(path)}
