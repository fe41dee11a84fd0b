"""`simulate` on generating scenarios: decode figures from the cost model's own step times."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from hpipe.plan import Plan, Stage
from hpipe.scenario import parse_scenario
from hpipe.sim import simulate

ROOT = Path(__file__).resolve().parents[2]


def _setup(name="paper-llama7b", **workload):
    d = yaml.safe_load((ROOT / "scenarios" / f"{name}.yaml").read_text())
    d["workload"].update(workload)
    return parse_scenario(d).resolve()


def _plan(setup, stages, slices=None, mb=1, groups=None):
    return Plan(planner="hand", scenario=setup.name, stages=[Stage(devices=[d], units=u) for d, u in stages],
                slices=slices or [setup.seq_len], micro_batches=mb, decode_micro_batches=groups)


def test_one_group_token_period_is_the_loop_round_trip():
    """One group (the whole batch): step t's token gap is every stage's step time at context
    seq_len + t, plus each forward hop, plus the ids' return -- nothing overlaps."""
    s = _setup(output_tokens=9)
    plan = _plan(s, [("host-a/P100-0", (0, 33)), ("host-b/RTX3090-0", (33, 66))], groups=1)
    r = simulate(s, plan)
    B, L = s.batch_size, s.seq_len
    cost = s.cost
    periods = []
    for t in range(1, 9):  # the gap before token t+1 is decode step t-1 (context L + t - 1)
        c = L + t - 1
        stage = sum(cost.stage_compute_s(st.start, st.end, st.devices, 1, c, B) for st in plan.stages)
        hop = cost.transfer_time_s("host-a/P100-0", "host-b/RTX3090-0", s.units[32].out_bytes(1, B, s.dtype_bytes))
        back = cost.token_return_s("host-b/RTX3090-0", "host-a/P100-0", B)
        periods.append(float(stage + hop + back))
    assert r.tpot_s == pytest.approx(float(np.median(periods)), rel=1e-9)
    assert r.ttft_s == pytest.approx(simulate(_setup(output_tokens=0), plan).latency_s, rel=1e-9)
    assert r.latency_s == pytest.approx(r.ttft_s + sum(periods), rel=1e-9)
    assert r.output_tokens_per_s == pytest.approx(B * 9 / r.latency_s)


def test_decode_groups_default_to_the_micro_batches_and_are_recorded():
    s = _setup("local-cpu", output_tokens=4)
    plan = _plan(s, [("local/core-0", (0, 9)), ("local/core-1", (9, 18))], mb=2)
    r = simulate(s, plan)
    assert r.plan.decode_micro_batches == 2
    dec = [e for e in r.events if e.phase == "decode" and e.kind == "compute"]
    assert len(dec) == 2 * 3 * 2  # stages x steps x groups
    assert {(e.micro_batch, e.slice) for e in dec} == {(g, t) for g in range(2) for t in range(3)}


def test_prefill_only_scenarios_carry_no_decode_figures():
    s = _setup("local-cpu")
    r = simulate(s, _plan(s, [("local/core-0", (0, 18))]))
    assert r.ttft_s is None and r.tpot_s is None and r.plan.decode_micro_batches is None
    assert all(e.phase == "prefill" for e in r.events)
