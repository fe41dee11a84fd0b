"""Every planner asked for, planned and simulated on one setup: the rows of `hpipe simulate`,
and of each value of `hpipe sweep`.

A planner that finds no plan (``InfeasibleError``) or cannot take this input
(``PlannerInputError``: a sequence cut too finely for the slicing DP, say) is an infeasible
row with its reason, so that the others still compare.  Whether the input as a whole is at
fault, no planner being able to take it, is the caller's to say: a sweep asks that across
every value, not at each.
"""

from __future__ import annotations

from collections.abc import Callable

from hpipe.errors import InfeasibleError, PlannerInputError
from hpipe.result import RunResult


def compare_planners(setup, planners: list[str], on_planner: Callable[[str], None] | None = None
                     ) -> tuple[list[RunResult], list[PlannerInputError]]:
    """One simulated result per planner, in order, and the input errors of those that could not
    take the setup (their rows are infeasible ones).  ``on_planner(name)`` is called before each."""
    from hpipe.planners import make_plan
    from hpipe.sim import infeasible_result, simulate

    results, limits = [], []
    for name in planners:
        if on_planner:
            on_planner(name)
        try:
            results.append(simulate(setup, make_plan(setup, name)))
        except InfeasibleError as e:
            results.append(infeasible_result(setup, name, str(e)))
        except PlannerInputError as e:
            limits.append(e)
            results.append(infeasible_result(setup, name, e.problem))
    return results, limits
