"""The planner's exact shortcuts change no plan.

The partition DPs skip work that provably cannot change their answers: caps at or above
the uncapped min-sum answer's largest cost reuse that answer (``minsum_dp_reusing``),
device orders that share a prefix compute its cells once (``prefixes``), each block
of candidates starts at its first finite row, and Algorithm 2 runs its DP problems in
groups of similar windows (``_batch_dp_grouped``).  ``tests/test_planner_partition.py`` checks
each against the plain DPs on random matrices; here the whole planner runs once as it is
and once with the plain DPs (no shortcut at all: the reference DPs of those tests), and
the Plans must be equal, field for field, on ready scenarios and on random small cases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings

from hpipe.planners import make_plan
from hpipe.planners import partition as alg1
from hpipe.planners import slicing as alg2
from hpipe.planners.costs import CostTables
from hpipe.scenario import load_scenario
from tests.planner_cases import examples, scenario_dicts, setup_of
from tests.test_planner_partition import _minmax_reference, _minsum_reference

ROOT = Path(__file__).resolve().parents[1]


def _plain(monkeypatch):
    """Every partition DP the search calls replaced by the plain one (whole matrices, each
    order alone, every cap run), and Algorithm 2's least max h found grid by grid."""
    monkeypatch.setattr(alg1, "minmax_dp_many", lambda problems, start=0.0, prefixes=None: [
        _minmax_reference(sm, lk, start) for sm, lk in problems])

    def minsum_many(problems, caps_list, block_width=40, prefixes=None):
        return [_minsum_reference(sm, lk, c) for (sm, lk), c in zip(problems, caps_list)]

    monkeypatch.setattr(alg1, "minsum_dp_many", minsum_many)
    monkeypatch.setattr(alg1, "minsum_dp_reusing", lambda problems, caps_list, uncapped=None, block_width=40:
                        minsum_many(problems, caps_list))
    monkeypatch.setattr(alg1, "minsum_dp", lambda smats, links, caps, block_width=40:
                        _minsum_reference(smats, links, caps))
    monkeypatch.setattr(alg2, "_minmax_dp_many", lambda HTs, qmins: [alg2._minmax_dp(H, q) for H, q in zip(HTs, qmins)])
    monkeypatch.setattr(alg2, "_batch_dp_grouped", lambda problems: [alg2._batch_dp_many([p])[0] for p in problems])


def _both(monkeypatch, setup_fn):
    fast = make_plan(setup_fn()).model_dump(mode="json")
    with monkeypatch.context() as m:
        _plain(m)
        plain = make_plan(setup_fn()).model_dump(mode="json")
    return fast, plain


@pytest.mark.parametrize("name", ["paper-llama7b", "paper-gpt3-2.7b"])
def test_ready_scenarios_plan_the_same_without_the_shortcuts(monkeypatch, name):
    fast, plain = _both(monkeypatch, lambda: load_scenario(ROOT / "scenarios" / f"{name}.yaml").resolve())
    assert fast == plain


@settings(max_examples=examples(12), deadline=None)
@given(scenario_dicts(max_devices=5, max_hosts=2, max_layers=2, max_granules=6, max_batch=4))
def test_random_cases_plan_the_same_without_the_shortcuts(data):
    with pytest.MonkeyPatch.context() as mp:
        try:
            fast, plain = _both(mp, lambda: setup_of(data))
        except Exception as e:  # noqa: BLE001 - infeasible: both must say so alike
            with pytest.MonkeyPatch.context() as m:
                _plain(m)
                with pytest.raises(type(e)) as again:
                    make_plan(setup_of(data))
            assert str(again.value) == str(e)
            return
    assert fast == plain


def _paper():
    return load_scenario(ROOT / "scenarios" / "paper-llama7b.yaml").resolve()


def test_grouped_slicing_dp_gives_each_problem_its_answer_alone(monkeypatch):
    """Algorithm 2's DP problems of a real search (paper testbed), run in window groups --
    the default split, every problem apart, all in one group -- against each alone."""
    seen: list = []
    real = alg2._batch_dp_grouped
    monkeypatch.setattr(alg2, "_batch_dp_grouped", lambda problems: seen.append(problems) or real(problems))
    make_plan(_paper())
    batches = [b for b in seen if len(b) > 1][:6]
    assert batches
    for cells in (alg2.CALL_CELLS, 0, 1 << 60):
        monkeypatch.setattr(alg2, "CALL_CELLS", cells)
        for problems in batches:
            for p, (f, h, back) in zip(problems, real(problems)):
                f0, h0, back0 = alg2._batch_dp_many([p])[0]
                assert np.array_equal(f, f0) and np.array_equal(h, h0) and np.array_equal(back, back0)


def test_workspace_table_is_each_length_alone():
    """``class_workspace_table`` (every slice length in one call) against ``class_workspace``
    length by length."""
    setup = _paper()
    tables = CostTables(setup)
    g, L = setup.granularity, setup.seq_len // setup.granularity
    for b in (1, 2, 6):
        ref = np.maximum.accumulate(np.array([tables.class_workspace(k * g, b) for k in range(1, L + 1)]), axis=0)
        assert np.array_equal(tables.class_workspace_table(b), ref)
