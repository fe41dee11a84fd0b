"""The local-improvement pass (``hpipe.planners.improve``): the moves it looks at, and that
what it accepts only ever lowers the exact makespan of a plan that still fits."""

from __future__ import annotations

import math

from hypothesis import given, settings

from hpipe.memory import plan_shortfalls
from hpipe.plan import Plan, Stage
from hpipe.planners import improve as local
from hpipe.planners.costs import CostTables
from hpipe.planners.evaluate import makespan_s
from hpipe.planners.joint import _best_slicing, plan_hpipe
from hpipe.planners.partition import Partition, recut_slices, table_makespan
from hpipe.scenario import parse_scenario
from tests.planner_cases import examples, scenario_dicts, setup_of


def _three_devices():
    dev = {"peak_tflops": 1.0, "memory_gb": 1.0, "memory_bandwidth_gbps": 100.0, "power_w": 50.0}
    return parse_scenario({
        "name": "three", "model": {"family": "llama", "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128,
                                   "vocab_size": 1000, "max_seq_len": 512},
        "workload": {"seq_len": 64, "batch_size": 4},
        "cluster": {"hosts": [{"name": "h", "devices": [{**dev, "name": "a"}, {**dev, "name": "b", "peak_tflops": 2.0},
                                                         {**dev, "name": "c", "peak_tflops": 4.0}]}]},
        "planner": {"token_granularity": 16, "memory_reserve_gb": 0.0}}).resolve()


def test_the_moves_of_a_two_stage_plan():
    setup = _three_devices()
    tables = CostTables(setup)
    a, b, c = setup.cluster.device_ids
    part = Partition((((a,), 0, 3), ((b,), 3, 6)))
    got = set(local.neighbours(tables, part, 2, options=[1, 2, 3, 4]))
    P = lambda *st: Partition(tuple(st))  # noqa: E731
    expected = {
        (P(((a,), 0, 2), ((b,), 2, 6)), 2), (P(((a,), 0, 4), ((b,), 4, 6)), 2),  # shift the cut
        (P(((a,), 0, 6)), 2), (P(((b,), 0, 6)), 2),  # merge
        (P(((c,), 0, 3), ((b,), 3, 6)), 2), (P(((a,), 0, 3), ((c,), 3, 6)), 2),  # move to the unused kind
        (P(((a,), 0, 3), ((b,), 3, 5), ((c,), 5, 6)), 2),  # split: the head alone on the unused device
        (P(((c,), 0, 1), ((a,), 1, 3), ((b,), 3, 6)), 2),  # split: the embedding alone
        (part, 1), (part, 3),  # one micro-batch fewer, one more
    }
    assert expected <= got
    for p, m in got:  # every neighbour is a plan: contiguous units, disjoint devices
        assert p.stages[0][1] == 0 and p.stages[-1][2] == setup.n_units
        assert all(x[2] == y[1] for x, y in zip(p.stages, p.stages[1:]))
        assert len(set(p.devices)) == len(p.devices) and m in (1, 2, 3, 4)


def _unimproved(data):
    """(setup, hpipe's plan without the pass, its cost tables, its partition); None if infeasible."""
    from hpipe.errors import InfeasibleError

    setup = setup_of(data)
    try:
        plan = plan_hpipe(setup, improve_top=0)
    except InfeasibleError:
        return None
    return setup, plan, CostTables(setup), Partition(tuple((tuple(s.devices), s.start, s.end) for s in plan.stages))


@settings(max_examples=examples(12), deadline=None)
@given(scenario_dicts(max_devices=4, max_hosts=2, max_layers=2, max_granules=4, max_batch=4))
def test_the_pass_only_lowers_the_exact_makespan_of_a_plan_that_fits(data):
    got = _unimproved(data)
    if got is None:
        return
    setup, plan, tables, part = got
    start = (plan.predicted["latency_s"], part, tuple(plan.slices), plan.micro_batches)
    lat, part2, slices, m = local.improve(tables, start, lambda p, sz: _best_slicing(tables, p, sz),
                                          list(range(1, setup.batch_size + 1)))
    assert lat <= start[0]
    got = Plan(planner="hpipe", scenario=setup.name, slices=list(slices), micro_batches=m,
               stages=[Stage(devices=list(d), units=(s, e)) for d, s, e in part2.stages])
    got.check(setup)
    assert plan_shortfalls(setup, got) == []
    assert math.isclose(makespan_s(setup, got), lat, rel_tol=1e-9)


@settings(max_examples=examples(12), deadline=None)
@given(scenario_dicts(max_devices=4, max_hosts=2, max_layers=2, max_granules=4, max_batch=4))
def test_ranking_by_bound_first_is_the_ranking_of_every_neighbour_scored(data):
    """``_ranked`` skips candidates whose lower bound is past the k-th best; its answer is
    the plain one: score every neighbour exactly, sort by (makespan, index), keep k."""
    unimproved = _unimproved(data)
    if unimproved is None:
        return
    setup, plan, tables, part = unimproved
    options = list(range(1, setup.batch_size + 1))
    cands = local.neighbours(tables, part, plan.micro_batches, options)
    for recut in (True, False):
        plain = sorted(x for x in (_plain_score(tables, p, tuple(plan.slices), mm, recut, i)
                                   for i, (p, mm) in enumerate(cands)) if x is not None)
        for k in (1, 3):
            assert local._ranked(tables, cands, tuple(plan.slices), {}, recut, k) == plain[:k]


def _plain_score(tables, part, slices, m, recut, i):
    """(makespan, i, partition, m, slices) the plain way, beside ``quick_rows``' caches: the
    slices cut down to what the partition holds, the exact makespan from the tables; None
    where it does not fit."""
    from hpipe.planners.common import items_arrays, micro_batch_sizes

    sizes = micro_batch_sizes(tables.setup.batch_size, m)
    nmax = tables.max_slice_tokens(part.stages, max(sizes))
    if nmax == 0 or (not recut and nmax < max(slices)):
        return None
    sl = recut_slices(slices, nmax, tables.setup.granularity)
    n, c, b = items_arrays(sl, sizes)
    v = table_makespan(tables, part.stages, n, c, b)
    return (v, i, part, m, sl) if math.isfinite(v) else None


def test_ranking_by_bound_first_skips_most_neighbours_of_a_deep_pipeline(monkeypatch):
    """The bound is what saves the time: on a plan of many stages, most one-move neighbours
    are never scanned (and the answer is still the plain ranking)."""
    setup = parse_scenario({
        "name": "deep", "model": {"family": "llama", "n_layers": 8, "d_model": 64, "n_heads": 4, "d_ff": 128,
                                  "vocab_size": 1000, "max_seq_len": 512},
        "workload": {"seq_len": 256, "batch_size": 1},
        "cluster": {"hosts": [{"name": "h", "devices": [
            {"name": f"d{i}", "peak_tflops": 1.0 + i, "memory_gb": 1.0, "memory_bandwidth_gbps": 100.0,
             "power_w": 50.0} for i in range(6)]}]},
        "planner": {"token_granularity": 16, "memory_reserve_gb": 0.0}}).resolve()
    tables = CostTables(setup)
    ids = setup.cluster.device_ids
    U = setup.n_units
    cuts = [0, 3, 6, 9, 12, 15, U]
    part = Partition(tuple(((ids[j],), a, e) for j, (a, e) in enumerate(zip(cuts, cuts[1:]))))
    slices = (64, 64, 64, 64)
    cands = local.neighbours(tables, part, 1, [1])
    scanned = []
    real = local.quick_makespan
    monkeypatch.setattr(local, "quick_makespan", lambda *a, **k: scanned.append(a[1]) or real(*a, **k))
    got = local._ranked(tables, cands, slices, {}, True, 3)
    plain = sorted(x for x in (_plain_score(tables, p, slices, mm, True, i) for i, (p, mm) in enumerate(cands))
                   if x is not None)
    assert got == plain[:3]
    assert len(cands) >= 20 and len(scanned) < len(cands) / 2


def test_best_by_bound_is_the_plain_top_k_with_ties_infinities_and_any_k():
    # (bound, index, item); exact(item) -> (value, extra).  Item "c" ties "a" on value and
    # comes first by index; "d" does not fit (inf); with k = 3, "e"'s bound is the 3rd best
    # value ("b"'s) but for rounding, so it must still be scored, and it wins the tie on
    # index; "f" is past it.
    values = {"a": 2.0, "b": 3.0, "c": 2.0, "d": math.inf, "e": 3.0, "f": 9.0}
    bounded = [(1.0, 5, "a"), (2.5, 6, "b"), (1.5, 2, "c"), (0.5, 0, "d"), (3.0 * (1 + 1e-12), 1, "e"), (8.0, 7, "f")]
    scored = []

    def exact(item):
        scored.append(item)
        return values[item], item.upper()

    plain = sorted((values[x], i, x, x.upper()) for _, i, x in bounded if math.isfinite(values[x]))
    for k in range(0, 8):
        scored.clear()
        assert local.best_by_bound(bounded, exact, k) == plain[:k]
    scored.clear()
    assert [x[2] for x in local.best_by_bound(bounded, exact, 3)] == ["c", "a", "e"]
    assert "f" not in scored and "e" in scored  # pruned past the bound, scored at the tie


def test_a_step_takes_the_best_improving_neighbour_not_the_last(monkeypatch):
    """Steepest descent: of the neighbours resliced in one step, the one of least latency
    after reslicing replaces the plan, whichever place the pre-ranking gave it.  Here the
    pre-ranking's second (0.8) reslices to 0.5, and the third (0.9) also beats the start
    (1.0); a scan that kept any improving neighbour, so the last, took 0.9 (audit I4)."""
    from types import SimpleNamespace

    tables = SimpleNamespace(setup=SimpleNamespace(batch_size=4))
    start = (1.0, "P0", (32,), 1)
    monkeypatch.setattr(local, "neighbours", lambda tables, part, m, options: [("A", 1), ("B", 1), ("C", 1)])
    monkeypatch.setattr(local, "_ranked", lambda tables, cands, slices, caches, recut, k: [
        (0.7, 0, "A", 1, (32,)), (0.8, 1, "B", 1, (32,)), (0.9, 2, "C", 1, (32,))][:k])

    def slice_for(p, sizes):
        return (0.5, [16, 16]) if p == "B" else None

    assert local.improve(tables, start, slice_for, [1], max_steps=1) == (0.5, "B", (16, 16), 1)
    # without the reslicing's gain the pre-ranking's best (0.7) wins, not the last improving one
    assert local.improve(tables, start, lambda p, sizes: None, [1], max_steps=1) == (0.7, "A", (32,), 1)
