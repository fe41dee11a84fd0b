"""The exact evaluator against the plain recurrence and against an event loop."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hpipe.plan import Plan, Stage
from hpipe.planners.evaluate import chain_completion, chain_times, makespan_s, scan, shared_completion
from tests.planner_cases import examples, scenario_dicts, setup_of


def naive(t):
    P, I = t.shape
    C = np.zeros((P, I))
    for i in range(I):
        for p in range(P):
            C[p, i] = max(C[p, i - 1] if i else 0.0, C[p - 1, i] if p else 0.0) + t[p, i]
    return C


@settings(max_examples=examples(60), deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_chain_matches_recurrence_and_event_loop(P, I, seed):
    rng = np.random.default_rng(seed)
    t = rng.exponential(1.0, (P, I)) * (rng.random((P, I)) > 0.1)
    C = naive(t)
    assert np.allclose(chain_completion(t), C, rtol=1e-12, atol=1e-12)
    assert np.allclose(shared_completion(t, [("r", p) for p in range(P)]), C, rtol=1e-12, atol=1e-12)


def test_scan_is_the_recurrence():
    arrive = np.array([0.0, 5.0, 1.0, 9.0])
    t = np.array([2.0, 1.0, 3.0, 1.0])
    # C = [2, 6, 9, 10]
    assert np.allclose(scan(arrive, t), [2.0, 6.0, 9.0, 10.0])


def test_shared_link_serialises_both_boundaries():
    # positions: stage0, link A, stage1, link A (shared), stage2; one item each way
    t = np.array([[1.0, 1.0], [2.0, 2.0], [0.5, 0.5], [2.0, 2.0], [1.0, 1.0]])
    keys = [("s", 0), "A", ("s", 1), "A", ("s", 2)]
    C = shared_completion(t, keys)
    # item 0: stage0 0-1, link 1-3, stage1 3-3.5; item 1: stage0 1-2, link 3-5 (waits);
    # item 0's second transfer is ready at 3.5 but the link is busy until 5: 5-7
    assert C[1, 1] == 5.0 and C[3, 0] == 7.0
    assert np.all(C >= naive(t) - 1e-12)


@settings(max_examples=examples(25), deadline=None)
@given(scenario_dicts(tight_memory=False), st.data())
def test_plan_makespan_uses_the_cost_model(data, draw):
    setup = setup_of(data)
    devs = setup.cluster.device_ids
    k = draw.draw(st.integers(1, min(len(devs), setup.n_units)))
    cuts = sorted(draw.draw(st.sets(st.integers(1, setup.n_units - 1), min_size=k - 1, max_size=k - 1)))
    bounds = [0, *cuts, setup.n_units]
    L = setup.seq_len // setup.granularity
    n_sl = draw.draw(st.integers(1, L))
    sl = [setup.granularity] * (n_sl - 1) + [setup.seq_len - setup.granularity * (n_sl - 1)]
    plan = Plan(planner="x", scenario="random", slices=sl,
                micro_batches=draw.draw(st.integers(1, setup.batch_size)),
                stages=[Stage(devices=[devs[i]], units=(a, b)) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    t, keys = chain_times(setup, plan)
    # rebuild the matrix item by item with the cost model's scalar calls
    cost = setup.cost
    for i, (_, _, b, n, c) in enumerate(plan.items(setup.batch_size)):
        for j, stg in enumerate(plan.stages):
            assert np.isclose(t[2 * j, i], cost.stage_compute_s(stg.start, stg.end, stg.devices, n, c, b), rtol=1e-12)
            if j:
                prev = plan.stages[j - 1]
                nb = setup.units[prev.end - 1].out_bytes(n, b, setup.dtype_bytes)
                assert np.isclose(t[2 * j - 1, i], cost.transfer_time_s(prev.devices[0], stg.devices[0], nb))
    if len(set(keys)) == len(keys):
        assert np.isclose(makespan_s(setup, plan), naive(t)[-1, -1], rtol=1e-12)
