"""Codec time in the fitted cost model: a profile's codec timings are what the planner and the
simulator are charged (through ``CostModel.codec_time_s``); a profile made before codecs were
timed still loads and prices them as memory passes, and says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from hpipe.codecs import CPU_OP_OVERHEAD_S, get_codec, roofline_codec_time_s
from hpipe.costmodels.fitted import Fitted
from hpipe.planners import make_plan
from hpipe.scenario import load_scenario
from hpipe.sim import simulate

ROOT = Path(__file__).resolve().parents[1]
HETERO_INT8 = ROOT / "scenarios" / "local-cpu-hetero-int8.yaml"
OLD_PROFILE = ROOT / "scenarios" / "profiles" / "local-cpu-hetero.json"  # made before codecs were timed
SIZES = [512, 1024, 16384, 32768, 262144, 524288]


def _line(k, fixed_s, per_value_s):
    return [fixed_s + per_value_s * x for x in k]


def _with_codecs(tmp_path, enc=(2e-4, 4e-9), dec=(1e-4, 2e-9)) -> Path:
    """local-cpu-hetero-int8 on its old profile plus int8 timings on both devices (CPU time; the
    half core's quota of 0.5 doubles them on the CPU-time basis; wall time set apart, unused)."""
    prof = json.loads(OLD_PROFILE.read_text())
    for d in prof["devices"]:
        assert "codecs" not in d
        d["codecs"] = {"int8": {"values": SIZES, "encode_s": _line(SIZES, 1.0, 0.0), "decode_s": _line(SIZES, 1.0, 0.0),
                                "encode_cpu_s": _line(SIZES, *enc), "decode_cpu_s": _line(SIZES, *dec)}}
    (tmp_path / "prof.json").write_text(json.dumps(prof))
    data = yaml.safe_load(HETERO_INT8.read_text())
    data["costmodel"] = {"kind": "fitted", "profile": "prof.json"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_an_old_profile_loads_and_codecs_are_modelled_and_said_to_be():
    setup = load_scenario(HETERO_INT8).resolve()
    assert isinstance(setup.cost, Fitted)
    assert all(not dp.codecs for dp in setup.cost.profile.devices)
    k = np.array([512.0, 65536.0])
    for dev in setup.cluster.devices:
        got = setup.cost.codec_time_s(get_codec("int8"), dev.id, k)
        want = roofline_codec_time_s(get_codec("int8"), k, 4, dev.spec.memory_bandwidth_gbps, CPU_OP_OVERHEAD_S)
        np.testing.assert_allclose(got, want)
        assert not setup.cost.has_codec_timing(dev.id, "int8")
    assert setup.cost.describe()["codec_time"].startswith("modelled as memory passes")
    assert "int8 on fast/core-0" in setup.cost.describe()["codec_time"]


def test_profiled_codec_times_are_what_the_model_charges(tmp_path):
    setup = load_scenario(_with_codecs(tmp_path)).resolve()
    k = np.array([0.0, 512.0, 100_000.0, 524288.0])
    enc, dec = setup.cost.codec_time_s(get_codec("int8"), "fast/core-0", k)
    np.testing.assert_allclose(enc, [0.0, *_line(k[1:], 2e-4, 4e-9)], rtol=1e-5)
    np.testing.assert_allclose(dec, [0.0, *_line(k[1:], 1e-4, 2e-9)], rtol=1e-5)
    enc_half, _ = setup.cost.codec_time_s(get_codec("int8"), "slow/halfcore-0", k[1:])
    np.testing.assert_allclose(enc_half, 2 * np.asarray(enc[1:]), rtol=1e-5)  # CPU time over the 0.5 quota
    assert setup.cost.describe()["codec_time"] == "timed by the profile"
    # int4 was not timed: the memory-pass model, named in describe()
    assert setup.cost.has_codec_timing("fast/core-0", "int8") and not setup.cost.has_codec_timing("fast/core-0", "int4")
    # none costs nothing whatever the profile says
    assert np.all(np.asarray(setup.cost.codec_time_s(get_codec("none"), "fast/core-0", k)) == 0)


def test_the_simulator_charges_the_profiled_codec_time_to_the_stages(tmp_path):
    setup = load_scenario(_with_codecs(tmp_path)).resolve()
    p = make_plan(setup, "gpipe").model_copy(update={"codecs": ["int8"]})
    res, raw = simulate(setup, p), simulate(setup, p.model_copy(update={"codecs": None}))
    src, dst = p.stages[0].devices[0], p.stages[1].devices[0]
    k = setup.batch_size * setup.seq_len * setup.model.d_model / p.micro_batches  # one message (one slice)
    enc, _ = setup.cost.codec_time_s(get_codec("int8"), src, k)
    _, dec = setup.cost.codec_time_s(get_codec("int8"), dst, k)
    c8 = {e.device: e.end_s - e.start_s for e in res.events if e.kind == "compute" and e.slice == 0 and e.micro_batch == 0}
    c0 = {e.device: e.end_s - e.start_s for e in raw.events if e.kind == "compute" and e.slice == 0 and e.micro_batch == 0}
    quota = {"fast/core-0": 1.0, "slow/halfcore-0": 2.0}  # CPU time over the quota
    assert float(enc) == pytest.approx(quota[src] * _line([k], 2e-4, 4e-9)[0], rel=1e-5)
    assert float(dec) == pytest.approx(quota[dst] * _line([k], 1e-4, 2e-9)[0], rel=1e-5)
    assert c8[src] == pytest.approx(c0[src] + float(enc), rel=1e-9)
    assert c8[dst] == pytest.approx(c0[dst] + float(dec), rel=1e-9)


def test_the_planner_drops_a_codec_the_profile_says_is_too_slow(tmp_path):
    """With the old profile hpipe puts int8 on the 100 Mbit/s hop; timed at a second per message
    (encode), the codec cannot pay and the planner keeps the hop raw."""
    assert make_plan(load_scenario(HETERO_INT8).resolve(), "hpipe").codecs == ["int8"]
    slow = load_scenario(_with_codecs(tmp_path, enc=(1.0, 0.0))).resolve()
    assert make_plan(slow, "hpipe").codecs is None
    fast = load_scenario(_with_codecs(tmp_path, enc=(1e-5, 1e-10), dec=(1e-5, 1e-10))).resolve()
    assert make_plan(fast, "hpipe").codecs == ["int8"]


def test_a_profile_without_the_allowed_codecs_is_stale(tmp_path, monkeypatch):
    """validate and the latency benchmark re-measure a profile that did not time the codecs a
    scenario allows, as they do one without decode points for a generating scenario."""
    pytest.importorskip("torch")
    from hpipe.costmodels.profile import load_profile
    from hpipe.runtime import profiler

    old = load_profile(OLD_PROFILE)
    monkeypatch.setattr(profiler, "_hardware", lambda: old.hardware)
    monkeypatch.setattr(profiler, "_versions", lambda: old.versions)
    monkeypatch.setattr(profiler, "PROFILER_METHOD", old.versions.profiler)  # a committed profile, older
    allows = load_scenario(HETERO_INT8).resolve()
    assert "int8" in profiler.stale_reason(old, allows) and "compression" in profiler.stale_reason(old, allows)
    from hpipe.costmodels.profile import coverage_gap  # every device that timed none is named, not the first alone

    assert coverage_gap(old, allows) == ("the scenario allows compression and the profile timed no int8 codec on "
                                         "fast/core-0 or slow/halfcore-0")
    data = yaml.safe_load(HETERO_INT8.read_text())
    data.pop("compression")
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({**data, "costmodel": {"kind": "fitted",
                                                                               "profile": str(OLD_PROFILE)}}))
    assert profiler.stale_reason(old, load_scenario(tmp_path / "plain.yaml").resolve()) is None
    timed = _with_codecs(tmp_path).parent / "prof.json"
    assert profiler.stale_reason(load_profile(timed), allows) is None
