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
    from hpipe.runtime.profiler import decode_points, default_grid
    from hpipe.scenario import parse_scenario

    data = yaml.safe_load(SCENARIO.read_text())
    s0 = parse_scenario(data).resolve()
    assert not decode_points(s0) and all(n > 1 or c == 0 for n, c, _ in default_grid(s0).points)
    data["workload"]["output_tokens"] = 32
    s1 = parse_scenario(data).resolve()
    pts = decode_points(s1)
    L, B = s1.seq_len, s1.batch_size
    assert {c for _, c, _ in pts} >= {L, L + 31} and {b for *_, b in pts} >= {1, B}
    assert set(pts) <= set(default_grid(s1).points)


def test_a_profile_without_decode_points_is_stale_for_a_generating_scenario(tmp_path, monkeypatch):
    from hpipe.costmodels.profile import Hardware, Versions
    from hpipe.runtime import profiler
    from hpipe.scenario import parse_scenario

    monkeypatch.setattr(profiler, "_hardware", lambda: Hardware(cpu_model="test", cpu_cores=2))
    monkeypatch.setattr(profiler, "_versions", lambda: Versions(python="3", hpipe="0.1.0"))
    data = yaml.safe_load(SCENARIO.read_text())
    for dev in data["cluster"]["hosts"][0]["devices"]:
        dev.pop("runtime", None)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(synthetic_profile(noise=0.0)))
    plain = load_profile(path)
    assert profiler.stale_reason(plain, parse_scenario(data).resolve()) is None
    data["workload"]["output_tokens"] = 8
    gen = parse_scenario(data).resolve()
    assert "decode" in profiler.stale_reason(plain, gen)
    path.write_text(json.dumps(with_decode_points(synthetic_profile(noise=0.0))))
    assert profiler.stale_reason(load_profile(path), gen) is None
