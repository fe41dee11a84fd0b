"""hpipe's whole search against exhaustive enumeration of the plan space on small cases.

Every ordered choice of stages (single devices and tensor-parallel groups of identical
devices), every cut set, every slicing and every micro-batch count is scored
(``planner_cases.exhaustive``); hpipe's plan, simulated, must be within 2% of the best,
itself simulated (the simulator cross-checks the enumeration's evaluator)."""

from __future__ import annotations

import math

from hypothesis import given, settings

from hpipe.errors import InfeasibleError
from hpipe.plan import Plan, Stage
from hpipe.planners import make_plan
from hpipe.sim import simulate
from tests.planner_cases import examples, exhaustive, scenario_dicts, setup_of

BOUND = 1.02


@settings(max_examples=examples(12), deadline=None)
@given(scenario_dicts(max_devices=4, max_hosts=2, max_layers=2, max_granules=4, max_batch=6))
def test_hpipe_is_within_2_percent_of_the_whole_plan_space(data):
    setup = setup_of(data)
    lat, stages, slices, m = exhaustive(setup)
    try:
        plan = make_plan(setup, "hpipe")
    except InfeasibleError:
        assert stages is None, "hpipe found nothing, the enumeration found a plan"
        return
    assert stages is not None
    ref = Plan(planner="exhaustive", scenario=setup.name, slices=list(slices), micro_batches=m,
               stages=[Stage(devices=list(d), units=(a, b)) for d, a, b in stages])
    best = simulate(setup, ref).latency_s
    assert math.isclose(best, lat, rel_tol=1e-9)  # the enumeration's evaluator is the simulator's figure
    got = simulate(setup, plan).latency_s
    assert got <= best * BOUND, f"hpipe {got:.6g} s vs best {best:.6g} s ({got / best - 1:.1%}): {plan} vs {ref}"
