"""The planner's exact shortcuts change no plan.

The partition DPs skip work that provably cannot change their answers: caps at or above
the uncapped min-sum answer's largest cost reuse that answer (``minsum_dp_reusing``),
device orders that share a prefix compute its cells once (``prefixes``), and each block
of candidates starts at its first finite row.  ``tests/test_planner_partition.py`` checks
each against the plain DPs on random matrices; here the whole planner runs once as it is
and once with the plain DPs (no shortcut at all: the reference DPs of those tests), and
the Plans must be equal, field for field, on ready scenarios and on random small cases.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings

from hpipe.planners import make_plan
from hpipe.planners import partition as alg1
from hpipe.planners import slicing as alg2
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
