"""Algorithm 2 against brute force over every slicing, and its bound against the exact makespan."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hpipe.planners import slicing as alg2
from hpipe.planners.common import items_arrays, micro_batch_sizes
from hpipe.planners.costs import CostTables
from hpipe.planners.partition import chain_rows
from hpipe.planners.evaluate import chain_completion, shares_resources
from tests.planner_cases import examples, hand_scenario, scenario_dicts, setup_of


def compositions(L):
    for r in range(L):
        for cuts in itertools.combinations(range(1, L), r):
            b = (0, *cuts, L)
            yield [y - x for x, y in zip(b, b[1:])]


@st.composite
def sliced_case(draw):
    data = draw(scenario_dicts(max_devices=3, max_granules=7, tight_memory=draw(st.booleans())))
    setup = setup_of(data)
    devs = setup.cluster.device_ids
    k = draw(st.integers(1, min(len(devs), setup.n_units)))
    order = draw(st.permutations(devs))[:k]
    cuts = sorted(draw(st.sets(st.integers(1, setup.n_units - 1), min_size=k - 1, max_size=k - 1)))
    bounds = [0, *cuts, setup.n_units]
    tp_first = draw(st.booleans()) and len(devs) > k  # sometimes a tensor-parallel stage
    stages = []
    spare = [d for d in devs if d not in order]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        group = (order[i], spare[0]) if (i == 0 and tp_first) else (order[i],)
        stages.append((group, a, b))
    sizes = micro_batch_sizes(setup.batch_size, draw(st.integers(1, setup.batch_size)))
    return setup, stages, sizes


@settings(max_examples=examples(40), deadline=None)
@given(sliced_case(), st.sampled_from([1, 2, 64]), st.sampled_from([("sweep", 2), ("bisect", 2), ("bisect", 5)]))
def test_slicing_dp_is_the_minimum_over_all_slicings(case, batch, method):
    setup, stages, sizes = case
    tables = CostTables(setup)
    nmax = alg2.max_slice_tokens(tables, stages, max(sizes))
    grid = alg2.SliceGrid(tables, stages, sizes, nmax or None)
    g = setup.granularity
    objs = {tuple(x * g for x in comp): grid.objective([x * g for x in comp]) for comp in compositions(grid.L)}
    feasible = {s: v for s, v in objs.items() if math.isfinite(v) and max(s) <= (nmax or math.inf)}
    got, _ = alg2.best_slicings(grid, top=3, batch=batch, method=method[0], fan=method[1])
    if nmax == 0 or not feasible:
        assert nmax == 0 or not got
        return
    best = min(feasible.values())
    assert math.isclose(got[0][0], best, rel_tol=1e-9)
    for v, s in got:  # each candidate reproduces the value it claims, and fits
        assert sum(s) == setup.seq_len and all(x % g == 0 for x in s) and max(s) <= nmax
        assert math.isclose(grid.objective(s), v, rel_tol=1e-9)


@settings(max_examples=examples(40), deadline=None)
@given(sliced_case(), st.data())
def test_bound_is_above_the_exact_makespan(case, draw):
    setup, stages, sizes = case
    tables = CostTables(setup)
    grid = alg2.SliceGrid(tables, stages, sizes, None)
    comp = draw.draw(st.sampled_from(list(compositions(grid.L))))
    s = [x * setup.granularity for x in comp]
    n, c, b = items_arrays(s, sizes)
    t, d, keys = chain_rows(tables, stages, n, c, b)
    assume(not shares_resources(keys))  # the bound is for a chain (links crossed once)
    exact = chain_completion(t, d)[-1, -1]
    assert exact <= grid.objective(s) * (1 + 1e-9)


@settings(max_examples=examples(25), deadline=None)
@given(sliced_case())
def test_grid_matches_the_cost_model(case):
    setup, stages, sizes = case
    tables = CostTables(setup)
    grid = alg2.SliceGrid(tables, stages, sizes, None)
    g, cost = setup.granularity, setup.cost
    for q, p in [(0, grid.L), (grid.L - 1, grid.L), (0, 1)]:
        n, c = (p - q) * g, q * g
        per_b = {}
        for bsz in set(sizes):
            xs = [float(cost.stage_compute_s(s, e, list(d), n, c, bsz)) for d, s, e in stages]
            xs += [float(cost.transfer_time_s(stages[j - 1][0][0], stages[j][0][0],
                                              setup.units[stages[j - 1][2] - 1].out_bytes(n, bsz, setup.dtype_bytes)))
                   for j in range(1, len(stages))]
            per_b[bsz] = max(xs)
        assert math.isclose(grid.HT[p, q], per_b[max(sizes)], rel_tol=1e-12)
        assert math.isclose(grid.GT[p, q], sum(per_b[x] for x in sizes), rel_tol=1e-12)


@settings(max_examples=examples(25), deadline=None)
@given(sliced_case(), st.data())
def test_grid_makespan_is_the_exact_makespan(case, draw):
    from hpipe.plan import Plan, Stage
    from hpipe.planners.evaluate import makespan_s

    setup, stages, sizes = case
    tables = CostTables(setup)
    grid = alg2.SliceGrid(tables, stages, sizes, None)
    comp = draw.draw(st.sampled_from(list(compositions(grid.L))))
    s = [x * setup.granularity for x in comp]
    # the plan's own micro-batch split must give these sizes
    plan = Plan(planner="x", scenario="random", slices=s, micro_batches=len(sizes),
                stages=[Stage(devices=list(d), units=(a, b)) for d, a, b in stages])
    assert plan.micro_batch_sizes(setup.batch_size) == sizes
    assert math.isclose(grid.makespan(s), makespan_s(setup, plan), rel_tol=1e-9)


@settings(max_examples=examples(15), deadline=None)
@given(st.lists(sliced_case(), min_size=2, max_size=3), st.sampled_from([("bisect", 2), ("bisect", 16), ("sweep", 2)]))
def test_slicings_run_side_by_side_are_each_grids_own(cases, method):
    """``best_slicings_many`` (one DP pass for several grids) answers what ``best_slicings``
    answers for each grid alone: the same slicings, the same bounds."""
    # grids of one scenario (one L): the first case's setup with each case's stage shapes
    setup = cases[0][0]
    tables = CostTables(setup)
    ids = setup.cluster.device_ids
    grids = []
    for _, stages, sizes in cases:
        U = setup.n_units
        k = min(len(stages), len(ids), U)
        bounds = [0, *[min(max(st[2], i + 1), U - k + i + 1) for i, st in enumerate(stages[:k - 1])], U]
        bounds = sorted(set(bounds))
        st_ = [((ids[i],), a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        sz = [min(x, setup.batch_size) for x in sizes] or [1]
        nmax = alg2.max_slice_tokens(tables, st_, max(sz))
        if nmax:
            grids.append(alg2.SliceGrid(tables, st_, sz, nmax))
    together = alg2.best_slicings_many(grids, top=4, method=method[0], fan=method[1])
    for grid, got in zip(grids, together):
        assert got == alg2.best_slicings(grid, top=4, method=method[0], fan=method[1])


def _random_dp_problem(rng, L, ties: bool):
    """(GT, HT, thresholds, earliest starts) as ``_search`` makes them: finite only below the
    diagonal and within the earliest start, a few thresholds (inf among them)."""
    # few distinct values: equal sums, so the first-minimum tie-breaking is tested too
    vals = (lambda n: rng.integers(1, 4, n).astype(float)) if ties else (lambda n: rng.random(n))
    GT = np.full((L + 1, L + 1), INF := math.inf)
    HT = np.full((L + 1, L + 1), INF)
    qmin = np.zeros(L + 1, int)
    for p in range(1, L + 1):
        qmin[p] = rng.integers(max(0, p - 1 - rng.integers(0, L)), p)
        GT[p, qmin[p]:p] = vals(p - qmin[p])
        HT[p, qmin[p]:p] = vals(p - qmin[p])
    finite = HT[np.isfinite(HT)]
    t = list(rng.choice(finite, size=rng.integers(1, 6)))
    if rng.random() < 0.5:
        t.append(INF)
    return GT, HT, t, qmin


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), L=st.integers(1, 24), n=st.integers(1, 4), ties=st.booleans(),
       block=st.sampled_from([1, 7, 50, 1 << 21]))
def test_batched_dp_is_each_problems_own(seed, L, n, ties, block):
    """``_batch_dp_many`` (band gathered in blocks) gives every problem exactly what
    ``_batch_dp`` gives it alone: values, max h along the path, back-pointers."""
    rng = np.random.default_rng(seed)
    problems = [_random_dp_problem(rng, L, ties) for _ in range(n)]
    for prob, (f, hm, back) in zip(problems, alg2._batch_dp_many(problems, block_cells=block)):
        f0, hm0, back0 = alg2._batch_dp(*prob)
        np.testing.assert_array_equal(f, f0)
        # where no slicing meets a threshold, the path (and its max h) is arbitrary
        reach = np.isfinite(f0)
        np.testing.assert_array_equal(hm[reach], hm0[reach])
        for k in np.flatnonzero(reach):
            assert alg2._path(back[k], L, 1) == alg2._path(back0[k], L, 1)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), L=st.integers(1, 24), n=st.integers(1, 4), ties=st.booleans())
def test_least_max_h_side_by_side_is_each_grids_own(seed, L, n, ties):
    """``_minmax_dp_many`` (grids side by side, each with its own earliest starts: slices
    too long for its memory inf) gives each grid exactly what ``_minmax_dp`` gives it alone."""
    rng = np.random.default_rng(seed)
    problems = [_random_dp_problem(rng, L, ties) for _ in range(n)]
    HTs, qmins = [p[1] for p in problems], [p[3] for p in problems]
    assert alg2._minmax_dp_many(HTs, qmins) == [alg2._minmax_dp(H, q) for H, q in zip(HTs, qmins)]


def test_too_many_token_units_is_bad_input_naming_a_granularity_that_fits():
    """1M tokens in units of 32 would need (32768+1)^2-sized tables: the planner was killed at
    24 GB.  It is refused at once, with the smallest granularity that divides the sequence,
    by every planner that slices with the DP, and by no other."""
    import pytest

    from hpipe.errors import PlannerInputError
    from hpipe.planners import REGISTRY, SLICING, make_plan
    from hpipe.scenario import load_scenario

    from conftest import ROOT

    sets = ["cluster.hosts[0].devices[0].memory_gb=1000000", "costmodel=roofline"]
    setup = load_scenario(ROOT / "scenarios" / "local-cpu.yaml", overrides=[*sets, "workload.seq_len=1048576"]).resolve()
    for name in SLICING:
        with pytest.raises(PlannerInputError, match="32768 token units .* give planner.token_granularity 256 or "
                                                    "more") as e:
            make_plan(setup, name)
        assert e.value.field == "planner.token_granularity" and e.value.exit_code == 2
    assert SLICING < set(REGISTRY)
    coarse = load_scenario(ROOT / "scenarios" / "local-cpu.yaml",
                           overrides=[*sets, "workload.seq_len=65536", "planner.token_granularity=8"]).resolve()
    for name in set(REGISTRY) - SLICING:  # 8192 units: no tables to fill, so these plan
        assert make_plan(coarse, name).slices == [65536], name
    at_most = load_scenario(ROOT / "scenarios" / "local-cpu.yaml",
                            overrides=[*sets, "workload.seq_len=12288", "planner.token_granularity=3"]).resolve()
    assert at_most.seq_len // at_most.granularity == alg2.MAX_TOKEN_UNITS
    alg2.check_token_units(at_most)  # 4096 units: allowed


def test_grid_makespan_is_exact_where_two_hops_share_a_link():
    """h0 -> h1 -> h0 -> h1: the first and third hops hold the same link.  The grid's shared-link
    path must split each hop into the link's hold and the latency after, as the exact
    recurrence does (a mutation that kept the latency inside the hold survived)."""
    from hpipe.plan import Plan, Stage
    from hpipe.planners.evaluate import makespan_s

    setup = setup_of(hand_scenario("zigzag", {"h0": ["p", "q"], "h1": ["r", "s"]},
                                   {"bandwidth_gbps": 0.5, "latency_us": 3000.0}))
    stages = [(("h0/p-0",), 0, 2), (("h1/r-0",), 2, 3), (("h0/q-0",), 3, 5), (("h1/s-0",), 5, 6)]
    sizes = micro_batch_sizes(2, 2)
    grid = alg2.SliceGrid(CostTables(setup), stages, sizes, None)
    assert shares_resources(grid.resources)
    for comp in ([1, 1, 1, 1], [2, 2], [1, 3], [4]):
        s = [x * 16 for x in comp]
        plan = Plan(planner="x", scenario="zigzag", slices=s, micro_batches=2,
                    stages=[Stage(devices=list(d), units=(a, b)) for d, a, b in stages])
        assert math.isclose(grid.makespan(s), makespan_s(setup, plan), rel_tol=1e-9), comp


def test_bound_weight_counts_each_position_by_its_share_of_the_bottleneck():
    """w = sum of rho_j less the larger end, rho_j = max over slices of X_j / h: a stage that is
    somewhere the bottleneck counts 1, a link a thousand times faster than the stages next to
    nothing.  A looser w (every position counted whole, or the end not taken off) keeps the
    bound valid but ranks the shortlist by the wrong sum (audit M32); here it is checked
    against the rows themselves."""
    setup = setup_of(hand_scenario("fast-link", {"h0": ["p"], "h1": ["q"], "h2": ["r"]},
                                   {"bandwidth_gbps": 1e5, "latency_us": 0.0}, seq_len=128))
    stages = [(("h0/p-0",), 0, 2), (("h1/q-0",), 2, 4), (("h2/r-0",), 4, 6)]
    sizes = micro_batch_sizes(2, 2)
    grid = alg2.SliceGrid(CostTables(setup), stages, sizes, None)
    rows = grid.rows_by_b[max(sizes)]
    h = np.maximum.reduce([np.asarray(r, float) for r in rows.values()])
    want = {k: float(np.max(np.asarray(r, float) / h)) for k, r in rows.items()}
    assert [k[0] for k in grid.keys] == ["stage", "link", "stage", "link", "stage"]
    assert np.allclose(grid.rho, [want[k] for k in grid.keys], rtol=1e-12)
    assert max(grid.rho) == 1.0 and all(r < 0.05 for k, r in zip(grid.keys, grid.rho) if k[0] == "link")
    assert grid.w == pytest.approx(grid.rho.sum() - max(grid.rho[0], grid.rho[-1]), rel=1e-12)
    assert grid.w < 2.0  # three stages: at most the two that are not the larger end, plus ~0 links
