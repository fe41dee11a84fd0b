"""Fuzzing the scenario and plan loaders: nothing but a clean InputError comes out."""

import copy
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpipe.errors import InputError
from hpipe.plan import load_plans
from hpipe.scenario import load_scenario, parse_scenario
from test_scenario import BASE

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


ALL_PATHS = [p for p in _paths(BASE) if p]


@st.composite
def mutated(draw):
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ALL_PATHS))
        node = data
        try:
            for p in path[:-1]:
                node = node[p]
            if draw(st.booleans()) and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = draw(values)
        except (KeyError, IndexError, TypeError):
            pass
    return data


@settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", 300)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_scenarios_fail_cleanly(data):
    try:
        parse_scenario(data, "fuzz.yaml").resolve()
    except InputError as e:
        assert str(e).startswith("fuzz.yaml: ")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_arbitrary_text_fails_cleanly(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    try:
        load_scenario(p).resolve()
    except InputError as e:
        assert str(p) in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values)
def test_arbitrary_plan_json_fails_cleanly(tmp_path, value):
    setup = parse_scenario(BASE).resolve()
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(value))
    try:
        for plan in load_plans(p):
            plan.check(setup, str(p))
    except InputError as e:
        assert str(p) in str(e)
