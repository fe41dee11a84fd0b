"""The fitted model's decode steps come from timed decode points (n = 1), not from the prefill fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from hpipe.costmodels.fitted import DECODE_FEATURES, fit_report, predict, split_decode
from hpipe.costmodels.profile import UnitSamples, load_profile
from hpipe.scenario import load_scenario
from tests.test_fitted import SCENARIO, fitted_scenario, synthetic_profile

# A decode step's true law: 1 ms of launches, 20 us per sequence, 3 ns per cached token read.
DECODE_TRUE = {"1": 1e-3, "b": 2e-5, "bc": 3e-9}


def decode_law(kind, c, b):
    coef = np.array([DECODE_TRUE.get(f, 0.0) for f in DECODE_FEATURES[kind]])
    return predict(kind, coef, 1, c, b, DECODE_FEATURES)


def with_decode_points(prof, contexts=(128, 512, 520, 530), batches=(1, 2)):
    for d in prof["devices"]:
        for kind, u in d["units"].items():
            for c in contexts:
                for b in batches:
                    u["n"].append(1), u["c"].append(c), u["b"].append(b)
                    u["seconds"].append(float(decode_law(kind, c, b)))
    return prof


def with_step_probe(prof, two_hops_s=(0.004, 0.005, 0.0045), ratio=1.2):
    """The step-loop probe's entries (``hpipe.runtime.step_probe``) for the first two devices."""
    a, b = (d["device"] for d in prof["devices"][:2])
    prof["step_hops"] = [{"between": [a, b], "point": [1, 512, 2], "forward_bytes": 4096, "return_bytes": 16,
                          "hops_s": list(two_hops_s)}]
    for d in prof["devices"]:
        d["after_wait"] = {"point": [1, 512, 2], "cpu_seconds": [0.01 * ratio, 0.01 * ratio],
                           "back_to_back_cpu_seconds": 0.01}
    return prof


def test_step_loop_costs_come_from_the_probe(tmp_path):
    """A decode message costs the ping-pong's time plus half of what the probe's two hops took
    beyond it; a stage after a wait computes the probe's after-wait ratio longer."""
    prof = with_step_probe(with_decode_points(synthetic_profile(noise=0.0)), two_hops_s=(0.004, 0.009, 0.005),
                           ratio=1.2)
    setup = load_scenario(fitted_scenario(tmp_path, prof, "probe.json")).resolve()
    cost = setup.cost
    a, b = setup.cluster.device_ids[:2]
    wire = float(cost.transfer_time_s(a, b, 4096) + cost.transfer_time_s(a, b, 16))
    assert cost.step_overhead_s(a, b) == pytest.approx((0.005 - wire) / 2)  # the median round
    assert cost.step_overhead_s(b, a) == cost.step_overhead_s(a, b) and cost.step_overhead_s(a, a) == 0.0
    assert cost.after_wait_factor(a) == pytest.approx(1.2)
    # without the probe: no overhead, no factor (and a ratio below 1 is not believed)
    plain = load_scenario(fitted_scenario(tmp_path, with_step_probe(with_decode_points(
        synthetic_profile(noise=0.0)), ratio=0.7), "low.json")).resolve()
    assert plain.cost.after_wait_factor(a) == 1.0
    none = load_scenario(fitted_scenario(tmp_path, with_decode_points(synthetic_profile(noise=0.0)),
                                         "none.json")).resolve()
    assert none.cost.step_overhead_s(a, b) == 0.0 and none.cost.after_wait_factor(a) == 1.0
    assert "unprobed_step_pairs" not in none.cost.describe()  # prefill only: no decode hop to price
    # generating, it says which decode hops it priced without a probe (and not the probed ones)
    def generating(prof, name):
        path = fitted_scenario(tmp_path, prof, name)
        data = yaml.safe_load(path.read_text())
        data["workload"]["output_tokens"] = 8
        path.write_text(yaml.safe_dump(data))
        return load_scenario(path).resolve().cost

    unprobed = generating(with_decode_points(synthetic_profile(noise=0.0)), "none.json")
    assert unprobed.step_overhead_s(a, b) == 0.0
    assert unprobed.describe()["unprobed_step_pairs"] == [[a, b]]
    probed = generating(with_step_probe(with_decode_points(synthetic_profile(noise=0.0))), "probed.json")
    assert probed.step_overhead_s(a, b) > 0.0
    assert "unprobed_step_pairs" not in probed.describe()


def test_a_decode_hop_costs_what_the_probe_measured_even_where_the_ping_pong_was_slower(tmp_path):
    """Two quota devices sharing a core ping-ponged at ~10 ms one way, the step loop hopped in ~4:
    the hop is priced at the probe's, not at the ping-pong's (nor below nothing)."""
    prof = with_step_probe(with_decode_points(synthetic_profile(noise=0.0)), two_hops_s=(0.008, 0.008, 0.008))
    for lk in prof["links"]:
        lk["one_way_s"] = [0.010 + 1e-9 * n for n in lk["sizes_bytes"]]  # a 10 ms ping-pong
    setup = load_scenario(fitted_scenario(tmp_path, prof, "slow-ping.json")).resolve()
    cost = setup.cost
    a, b = setup.cluster.device_ids[:2]
    hop = cost.transfer_time_s(a, b, 4096) + cost.step_overhead_s(a, b)
    back = cost.transfer_time_s(b, a, 16) + cost.step_overhead_s(b, a)
    assert hop + back == pytest.approx(0.008, rel=1e-3)  # the probe's two hops, not 20 ms
    assert hop > 0 and back > 0
    assert cost.tp_step_overhead_s([a, b]) == 0.0  # a hand-over never shortens a TP stage's compute
    # a probe faster than the link's latency allows: the overhead stops at minus the fit's
    # latency, so each message still costs at least nothing (unbounded: 16 bytes would cost -2 ms)
    fast = with_step_probe(with_decode_points(synthetic_profile(noise=0.0)), two_hops_s=(0.0,) * 3)
    for lk in fast["links"]:
        lk["one_way_s"] = [0.010 + 1e-6 * n for n in lk["sizes_bytes"]]
    cost = load_scenario(fitted_scenario(tmp_path, fast, "fast-probe.json")).resolve().cost
    latency = 0.010 + 256e-6  # the fit's latency: its fastest small message (256 bytes)
    assert cost.step_overhead_s(a, b) == pytest.approx(-latency, rel=1e-6)
    assert 0.0 <= cost.transfer_time_s(a, b, 16) + cost.step_overhead_s(a, b) < 1e-4


def test_decode_points_get_their_own_fit(tmp_path):
    plain = load_scenario(fitted_scenario(tmp_path, synthetic_profile(noise=0.0), "plain.json")).resolve()
    setup = load_scenario(fitted_scenario(tmp_path, with_decode_points(synthetic_profile(noise=0.0)),
                                          "dec.json")).resolve()
    attn, mlp = setup.units[1], setup.units[2]
    c = np.array([200, 515, 600])
    for unit in (attn, mlp):
        got = setup.cost.unit_time_s(unit, "local/core-0", 1, c, 2)
        np.testing.assert_allclose(got, decode_law(unit.kind, c, 2), rtol=1e-3)
        # the prefill fit alone extrapolates to something else entirely
        extrapolated = plain.cost.unit_time_s(unit, "local/core-0", 1, c, 2)
        assert np.all(np.abs(extrapolated / got - 1) > 0.2)
    # prefill slices are unchanged by the decode points
    n = np.array([32, 128])
    np.testing.assert_allclose(setup.cost.unit_time_s(attn, "local/core-0", n, 64, 2),
                               plain.cost.unit_time_s(attn, "local/core-0", n, 64, 2), rtol=1e-6)
    assert setup.cost.has_decode_fit("local/core-0") and not plain.cost.has_decode_fit("local/core-0")


def test_hold_out_report_lists_decode_apart(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(with_decode_points(synthetic_profile(noise=0.0))))
    rep = fit_report(load_profile(path))["local/core-0"]
    assert rep["attn/decode"]["max_rel_error"] < 1e-3
    assert rep["attn"]["max_rel_error"] < 1e-3  # prefill fit not spoilt by the decode points


def test_split_needs_enough_points():
    s = UnitSamples(n=[32, 1, 64], c=[0, 10, 0], b=[1, 1, 1], seconds=[1.0, 0.1, 2.0])
    assert split_decode(s)[1] is None  # one decode point: kept with prefill
    s = UnitSamples(n=[32, 1, 1, 1], c=[0, 10, 20, 30], b=[1, 1, 1, 1], seconds=[1.0, 0.1, 0.1, 0.1])
    pre, dec = split_decode(s)
    assert pre.n == [32] and dec.c == [10, 20, 30]


def test_profiler_grid_has_decode_points_only_when_generating():
    from hpipe.runtime.profile_grid import decode_points, default_grid
    from hpipe.scenario import parse_scenario

    data = yaml.safe_load(SCENARIO.read_text())
    s0 = parse_scenario(data).resolve()
    assert not decode_points(s0) and all(n > 1 or c == 0 for n, c, _ in default_grid(s0).points)
    data["workload"]["output_tokens"] = 32
    s1 = parse_scenario(data).resolve()
    pts = decode_points(s1)
    L, B = s1.seq_len, s1.batch_size
    # 32 new tokens: 31 decode steps at contexts L .. L + 30 (the last new token is not fed back)
    assert max(c for _, c, _ in pts) == L + 30 and {c for _, c, _ in pts} >= {L, L + 30}
    assert {b for *_, b in pts} >= {1, B}
    assert set(pts) <= set(default_grid(s1).points)


def _on_the_synthetic_profiles_machine(monkeypatch):
    """(the profiler module, the scenario's data without runtime placements), with this machine
    and its versions made those that synthetic_profile records."""
    from hpipe.costmodels.profile import Hardware, Versions
    from hpipe.runtime import profiler

    monkeypatch.setattr(profiler, "_hardware", lambda: Hardware(cpu_model="test", cpu_cores=2))
    monkeypatch.setattr(profiler, "_versions", lambda: Versions(python="3", hpipe="0.1.0"))
    data = yaml.safe_load(SCENARIO.read_text())
    for dev in data["cluster"]["hosts"][0]["devices"]:
        dev.pop("runtime", None)
    return profiler, data


def test_a_profile_without_decode_points_is_stale_for_a_generating_scenario(tmp_path, monkeypatch):
    from hpipe.scenario import parse_scenario

    profiler, data = _on_the_synthetic_profiles_machine(monkeypatch)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(synthetic_profile(noise=0.0)))
    plain = load_profile(path)
    assert profiler.stale_reason(plain, parse_scenario(data).resolve()) is None
    data["workload"]["output_tokens"] = 8
    gen = parse_scenario(data).resolve()
    assert "decode" in profiler.stale_reason(plain, gen)
    prof = with_decode_points(synthetic_profile(noise=0.0))
    path.write_text(json.dumps(prof))
    # two CPU devices: the decode step loop's hops and waits must be probed too
    assert "step-loop probe" in profiler.stale_reason(load_profile(path), gen)
    path.write_text(json.dumps(with_step_probe(prof)))
    assert profiler.stale_reason(load_profile(path), gen) is None


def test_a_profile_measured_by_another_profiler_method_is_stale(tmp_path, monkeypatch):
    from hpipe.costmodels.profile import PROFILER_METHOD
    from hpipe.scenario import parse_scenario

    profiler, data = _on_the_synthetic_profiles_machine(monkeypatch)
    setup = parse_scenario(data).resolve()
    prof = synthetic_profile(noise=0.0)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prof))
    assert profiler.stale_reason(load_profile(path), setup) is None
    prof["versions"]["profiler"] = PROFILER_METHOD - 1
    path.write_text(json.dumps(prof))
    assert f"profiler method {PROFILER_METHOD - 1}" in profiler.stale_reason(load_profile(path), setup)
    del prof["versions"]["profiler"]  # a profile from before the method was recorded
    path.write_text(json.dumps(prof))
    assert "profiler method 1" in profiler.stale_reason(load_profile(path), setup)


def test_a_decode_steps_shards_are_scaled_by_the_all_reduce_chains_ratio(tmp_path):
    """A TP stage's decode step runs its shards between all-reduces as a prefill slice does:
    the shard's decode price times the chain's after-wait ratio at its rows (b, one token each)."""
    prof = with_decode_points(synthetic_profile(noise=0.0))
    plain = load_scenario(fitted_scenario(tmp_path, prof, "plain.json")).resolve().cost
    prof["all_reduces"] = [{"devices": ["local/core-0", "local/core-1"], "sizes_bytes": [2048, 4096, 1 << 20],
                            "seconds": [1e-4, 1e-4, 1e-3], "bandwidth_gbps": 1.0, "latency_us": 100.0,
                            "shard_cpu_s": [[1.0, 1.0, 1.0]] * 2, "shard_after_wait_cpu_s": [[1.3, 1.2, 1.0]] * 2}]
    cost = load_scenario(fitted_scenario(tmp_path, prof, "ratio.json")).resolve().cost
    mlp, c = cost.setup.units[2], np.array([200, 515])
    for b, ratio in ((1, 1.3), (2, 1.2)):
        np.testing.assert_allclose(cost.unit_time_s(mlp, "local/core-0", 1, c, b, tp=2),
                                   ratio * plain.unit_time_s(mlp, "local/core-0", 1, c, b, tp=2), rtol=1e-9)
    np.testing.assert_allclose(cost.unit_time_s(mlp, "local/core-0", 1, c, 2),  # a whole unit: no all-reduce
                               plain.unit_time_s(mlp, "local/core-0", 1, c, 2), rtol=1e-9)


def test_an_untimed_decode_shard_keeps_the_fixed_cost_and_splits_the_rest(tmp_path):
    """No shard timed: a decode step's tp=2 MLP shard is the decode fit's constant plus half of
    the rest, as for prefill.  By hand from DECODE_TRUE: 1 ms + (2 x 20 us) / 2 = 1.02 ms at
    batch 2 (audit 3: the whole step halved, 0.52 ms, survived)."""
    setup = load_scenario(fitted_scenario(tmp_path, with_decode_points(synthetic_profile(noise=0.0)))).resolve()
    mlp, c = setup.units[2], np.array([200, 515])
    np.testing.assert_allclose(setup.cost.unit_time_s(mlp, "local/core-0", 1, c, 2, tp=2), 1.02e-3, rtol=1e-3)
    np.testing.assert_allclose(setup.cost.unit_time_s(mlp, "local/core-0", 1, c, 2), 1.04e-3, rtol=1e-3)


@pytest.mark.parametrize("ratio,want", [(1.2, 1.2), (2.0, 1.5), (0.8, 1.0)])
def test_the_after_wait_factor_is_the_probes_ratio_kept_within_one_and_one_and_a_half(tmp_path, ratio, want):
    """after_wait_factor: the probe's after-wait over back-to-back CPU time, clipped to [1, 1.5]
    (audit 3: the upper bound dropped survived)."""
    prof = with_step_probe(with_decode_points(synthetic_profile(noise=0.0)), ratio=ratio)
    cost = load_scenario(fitted_scenario(tmp_path, prof)).resolve().cost
    assert cost.after_wait_factor("local/core-0") == pytest.approx(want, rel=1e-12)
    assert cost.stage_after_wait_factor(["local/core-0", "local/core-1"]) == pytest.approx(want, rel=1e-12)


def _profile_at(tmp_path, prof):
    for d in prof["devices"]:
        d["placement"] = {"device": "cpu", "threads": 1}  # local-cpu's runtime placement
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prof))
    return load_profile(path)


def _local(*overrides):
    return load_scenario(SCENARIO, overrides=list(overrides)).model_copy(update={"costmodel": "roofline"}).resolve()


def test_decode_points_do_not_stretch_the_prefill_grid(tmp_path):
    """grid_gap counts prefill slices only: decode steps at contexts up to 600 (n + c = 601) do
    not cover a 576-token prompt that the prefill grid (512 tokens) falls short of (audit 3:
    counting every point survived)."""
    from hpipe.costmodels.profile import grid_gap

    prof = _profile_at(tmp_path, with_decode_points(synthetic_profile(noise=0.0), contexts=(128, 512, 600)))
    assert grid_gap(prof, _local("workload.seq_len=512")) is None
    assert grid_gap(prof, _local("workload.seq_len=576")) == (
        "the profile timed local/core-0 up to 512 tokens at batch 2, the scenario's workload is 576 tokens at batch 2")


def test_the_step_loop_probe_is_asked_of_a_profile_only_for_two_cpu_devices_or_more(tmp_path):
    """decode_gap: a generating scenario of one CPU device has no step loop between devices, so
    a profile with links but no probe serves it; two devices need the probe (audit 3: `>= 1`
    survived)."""
    from hpipe.costmodels.profile import decode_gap

    prof = _profile_at(tmp_path, with_decode_points(synthetic_profile(noise=0.0)))
    assert prof.links and not prof.step_hops
    one = "cluster.hosts[0].devices[0].count=1"
    assert decode_gap(prof, _local("workload.output_tokens=4", one)) is None
    assert decode_gap(prof, _local("workload.output_tokens=4")) == (
        "the profile has no decode step-loop probe and the scenario generates tokens")
    assert decode_gap(prof, _local(one)) is None  # no generation: no decode asked


def test_the_after_wait_ratio_is_the_mean_run_over_back_to_back():
    """AfterWait.ratio by hand: runs of 11 and 13 ms after waits, 10 ms back to back: 1.2 (the
    mean; audit 3: the slowest run, 1.3, survived, the probes here having equal runs)."""
    from hpipe.costmodels.profile import AfterWait

    aw = AfterWait(point=(1, 512, 2), cpu_seconds=[0.011, 0.013], back_to_back_cpu_seconds=0.01)
    assert aw.ratio == pytest.approx(1.2, rel=1e-12)


def test_every_device_of_the_profile_must_have_timed_decode_steps(tmp_path):
    """decode_gap: decode points on core-0 only leave core-1's steps extrapolated: a gap
    (audit 3: `any` for `all` survived, every test profile having them on all devices or none)."""
    from hpipe.costmodels.profile import decode_gap

    prof = with_step_probe(with_decode_points(synthetic_profile(noise=0.0)))
    strip = prof["devices"][1]["units"]
    for u in strip.values():
        keep = [i for i, (n, c) in enumerate(zip(u["n"], u["c"])) if not (n == 1 and c > 0)]
        for k in ("n", "c", "b", "seconds"):
            u[k] = [u[k][i] for i in keep]
    generating = _local("workload.output_tokens=4")
    assert decode_gap(_profile_at(tmp_path, prof), generating) == (
        "the profile timed no decode steps (n = 1) and the scenario generates tokens")
    full = with_step_probe(with_decode_points(synthetic_profile(noise=0.0)))
    assert decode_gap(_profile_at(tmp_path, full), generating) is None


def test_a_profile_short_of_the_last_decode_steps_context_is_a_gap(tmp_path):
    """decode_gap: the cache key leaves output_tokens out, so a profile timed for a few new
    tokens had priced many more by extrapolating its decode contexts (the emulation read:
    contexts 384-386 stood for steps up to 982).  Decode contexts here reach 530: 512 prompt
    tokens + 20 new ones end there (the last token is not fed back); 21 do not."""
    from hpipe.costmodels.profile import decode_gap

    prof = _profile_at(tmp_path, with_step_probe(with_decode_points(synthetic_profile(noise=0.0))))
    assert decode_gap(prof, _local("workload.output_tokens=20")) is None
    assert decode_gap(prof, _local("workload.output_tokens=21")) == (
        "the profile timed local/core-0's decode steps up to context 530, the scenario's last step is at 531 "
        "(512 prompt + 21 new tokens)")
