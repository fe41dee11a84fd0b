"""The exact evaluator against the plain recurrence, an event loop and the simulator."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hpipe.plan import Plan, Stage
from hpipe.planners.evaluate import (chain_bound, chain_completion, chain_times, makespan_s, scan, shared_completion,
                                     shares_resources)
from tests.planner_cases import examples, scenario_dicts, setup_of


def naive(t, d=None):
    P, I = t.shape
    d = np.zeros_like(t) if d is None else d
    C = np.zeros((P, I))
    for i in range(I):
        for p in range(P):
            C[p, i] = max(C[p, i - 1] if i else 0.0, C[p - 1, i] + d[p - 1, i] if p else 0.0) + t[p, i]
    return C


def random_chain(P, I, seed):
    """(hold times, delays, the generator): P positions x I items, some zero."""
    rng = np.random.default_rng(seed)
    t = rng.exponential(1.0, (P, I)) * (rng.random((P, I)) > 0.1)
    d = rng.exponential(0.3, (P, I)) * (rng.random((P, I)) > 0.5)
    return t, d, rng


@settings(max_examples=examples(60), deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_chain_matches_recurrence_and_event_loop(P, I, seed):
    t, d, _ = random_chain(P, I, seed)
    C = naive(t, d)
    assert np.allclose(chain_completion(t, d), C, rtol=1e-12, atol=1e-12)
    keys = [frozenset([("r", p)]) for p in range(P)]
    assert np.allclose(shared_completion(t, keys, d), C, rtol=1e-12, atol=1e-12)


def test_scan_is_the_recurrence():
    arrive = np.array([0.0, 5.0, 1.0, 9.0])
    t = np.array([2.0, 1.0, 3.0, 1.0])
    assert np.allclose(scan(arrive, t), [2.0, 6.0, 9.0, 10.0])


def test_a_link_crossed_twice_serialises_both_hops():
    # positions: stage0, hop A->B, stage1, hop A->B again, stage2; two items
    t = np.array([[1.0, 1.0], [2.0, 2.0], [0.5, 0.5], [2.0, 2.0], [1.0, 1.0]])
    ab = frozenset([("A", "B")])
    keys = [("stage", 0), ab, ("stage", 1), ab, ("stage", 2)]
    assert shares_resources(keys)
    C = shared_completion(t, keys)
    # item 0: stage0 0-1, hop 1-3, stage1 3-3.5; item 1: stage0 1-2, hop 3-5 (waits);
    # item 0's second hop is ready at 3.5 but the link is busy until 5: 5-7
    assert C[1, 1] == 5.0 and C[3, 0] == 7.0
    assert np.all(C >= naive(t) - 1e-12)
    assert not shares_resources([("stage", 0), ab, ("stage", 1), frozenset([("B", "A")])])


def _random_plan(setup, draw, interleave=False):
    devs = setup.cluster.device_ids
    k = draw.draw(st.integers(1, min(len(devs), setup.n_units)))
    order = draw.draw(st.permutations(devs))[:k] if interleave else devs[:k]
    cuts = sorted(draw.draw(st.sets(st.integers(1, setup.n_units - 1), min_size=k - 1, max_size=k - 1)))
    bounds = [0, *cuts, setup.n_units]
    L = setup.seq_len // setup.granularity
    n_sl = draw.draw(st.integers(1, L))
    sl = [setup.granularity] * (n_sl - 1) + [setup.seq_len - setup.granularity * (n_sl - 1)]
    return Plan(planner="x", scenario="random", slices=sl,
                micro_batches=draw.draw(st.integers(1, setup.batch_size)),
                stages=[Stage(devices=[order[i]], units=(a, b)) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))])


@settings(max_examples=examples(25), deadline=None)
@given(scenario_dicts(tight_memory=False), st.data())
def test_plan_makespan_uses_the_cost_model(data, draw):
    setup = setup_of(data)
    plan = _random_plan(setup, draw)
    t, d, keys = chain_times(setup, plan)
    cost = setup.cost
    for i, (_, _, b, n, c) in enumerate(plan.items(setup.batch_size)):
        for j, stg in enumerate(plan.stages):
            assert np.isclose(t[2 * j, i], cost.stage_compute_s(stg.start, stg.end, stg.devices, n, c, b), rtol=1e-12)
            if j:
                prev = plan.stages[j - 1]
                nb = setup.units[prev.end - 1].out_bytes(n, b, setup.dtype_bytes)
                total = cost.transfer_time_s(prev.devices[0], stg.devices[0], nb)
                assert np.isclose(t[2 * j - 1, i] + d[2 * j - 1, i], total, rtol=1e-12)
    if not shares_resources(keys):
        assert np.isclose(makespan_s(setup, plan), naive(t, d)[-1, -1], rtol=1e-12)


@settings(max_examples=examples(40), deadline=None)
@given(scenario_dicts(tight_memory=False, max_devices=4, max_hosts=3), st.data())
def test_prediction_is_the_simulated_latency(data, draw):
    from hpipe.sim import simulate

    setup = setup_of(data)
    plan = _random_plan(setup, draw, interleave=True)
    assert np.isclose(makespan_s(setup, plan), simulate(setup, plan).latency_s, rtol=1e-9, atol=1e-15)


@settings(max_examples=examples(20), deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.sampled_from([0.05, 1.0, 10.0]), st.sampled_from([0.0, 500.0]))
def test_a_pipeline_crossing_the_network_twice_matches_the_simulator(n_slices, mb, net_gbps, lat_us):
    from hpipe.sim import simulate

    dev = {"name": "g", "count": 2, "peak_tflops": 1.0, "memory_gb": 1.0, "memory_bandwidth_gbps": 100.0,
           "power_w": 50.0}
    setup = setup_of({
        "name": "twice", "model": {"family": "llama", "n_layers": 2, "d_model": 128, "n_heads": 4, "d_ff": 256,
                                   "vocab_size": 500, "max_seq_len": 512},
        "workload": {"seq_len": 64, "batch_size": 3},
        "cluster": {"hosts": [{"name": "a", "devices": [dev]}, {"name": "b", "devices": [dev]}],
                    "network": {"bandwidth_gbps": net_gbps, "latency_us": lat_us}},
        "planner": {"token_granularity": 16, "memory_reserve_gb": 0.0}})
    order = ["a/g-0", "b/g-0", "a/g-1", "b/g-1"]
    sl = [16] * (n_slices - 1) + [64 - 16 * (n_slices - 1)]
    plan = Plan(planner="x", scenario="twice", slices=sl, micro_batches=mb,
                stages=[Stage(devices=[d], units=(a, b)) for d, (a, b) in zip(order, [(0, 2), (2, 3), (3, 5), (5, 6)])])
    assert shares_resources(chain_times(setup, plan)[2])
    assert np.isclose(makespan_s(setup, plan), simulate(setup, plan).latency_s, rtol=1e-9)


@settings(max_examples=examples(60), deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_chain_bound_is_a_lower_bound_met_by_a_lone_bottleneck(P, I, seed):
    t, d, rng = random_chain(P, I, seed)
    exact = naive(t, d)[-1, -1]
    assert chain_bound(t, d) <= exact * (1 + 1e-12)
    # links shared by every hop: contention only delays, the bound still holds
    keys = [frozenset([("r", 0)]) if p % 2 else ("stage", p) for p in range(P)]
    assert chain_bound(t, d) <= shared_completion(t, keys, d)[-1, -1] * (1 + 1e-12)
    # one position far slower than the rest: it is busy without a gap from the moment the first
    # item reaches it, so the makespan is exactly the bound (its first item's way in, its
    # total, the last item's way out)
    slow = rng.integers(P)
    t[slow] += 100.0
    assert np.isclose(chain_bound(t, d), naive(t, d)[-1, -1], rtol=1e-12)


def test_chain_bound_by_hand():
    # two positions, two items: position 1 waits for item 0 (2 + delay 1), holds 5 + 5,
    # nothing after it; position 0 holds 2 + 2 then item 1 still needs 1 + 5 after it
    t = np.array([[2.0, 2.0], [5.0, 5.0]])
    d = np.array([[1.0, 1.0], [0.0, 0.0]])
    assert chain_bound(t, d) == max(0 + 4 + (1 + 5), (2 + 1) + 10 + 0) == 13.0
    assert naive(t, d)[-1, -1] == 13.0
