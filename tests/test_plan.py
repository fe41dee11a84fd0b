"""Plan files: every inconsistency is refused naming the file, the field and the problem."""

import json

import pytest

from hpipe.errors import InputError
from hpipe.plan import Plan, load_plans
from hpipe.scenario import parse_scenario
from test_scenario import BASE

GOOD = {"planner": "hand", "scenario": "t",
        "stages": [{"devices": ["a/P100-0"], "units": [0, 5]}, {"devices": ["a/P100-1", "b/mygpu-0"], "units": [5, 10]}],
        "slices": [32, 16, 16], "micro_batches": 2}


@pytest.fixture(scope="module")
def setup():
    return parse_scenario(BASE).resolve()


def test_good_plan_and_items(setup, tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps([GOOD, GOOD]))
    plans = load_plans(p)
    assert len(plans) == 2
    plan = plans[0].check(setup)
    assert plan.micro_batch_sizes(2) == [1, 1]
    assert plan.items(2)[:4] == [(0, 0, 1, 32, 0), (0, 1, 1, 16, 32), (0, 2, 1, 16, 48), (1, 0, 1, 32, 0)]
    assert Plan(**{**GOOD, "micro_batches": 3}).micro_batch_sizes(7) == [3, 2, 2]


def test_a_plan_written_by_hand_may_leave_out_its_planner_and_scenario(setup, tmp_path):
    """DESIGN.md's TP-and-codecs example has neither field: it had been refused (exit 2)."""
    p = tmp_path / "p.json"
    p.write_text(json.dumps({k: v for k, v in GOOD.items() if k not in ("planner", "scenario")}))
    (plan,) = load_plans(p)
    assert (plan.planner, plan.scenario) == ("hand", "") and plan.check(setup).stages == plan.stages


@pytest.mark.parametrize("change,field,problem", [
    ({"stages": [{"devices": ["a/P100-0"], "units": [0, 4]}, {"devices": ["a/P100-1"], "units": [5, 10]}]},
     "stages[1].units", "leaves a gap"),
    ({"stages": [{"devices": ["a/P100-0"], "units": [0, 6]}, {"devices": ["a/P100-1"], "units": [5, 10]}]},
     "stages[1].units", "overlaps"),
    ({"stages": [{"devices": ["a/P100-0"], "units": [0, 5]}, {"devices": ["a/P100-1"], "units": [5, 9]}]},
     "stages", "model has 10 units"),
    ({"stages": [{"devices": ["a/P100-0"], "units": [0, 12]}]}, "stages[0].units", "past the model's 10 units"),
    ({"stages": [{"devices": ["a/P100-0"], "units": [5, 0]}]}, "stages[0].units",
     "must start at 0: the first stage starts at unit 0"),  # not "overlaps the previous stage": there is none
    ({"stages": [{"devices": ["a/P100-0"], "units": [0, 0]}, {"devices": ["a/P100-1"], "units": [0, 10]}]},
     "stages[0].units", "empty"),
    ({"stages": [{"devices": ["a/P100-9"], "units": [0, 10]}]}, "stages[0].devices[0]", "not in the scenario"),
    ({"stages": [{"devices": ["x/P100-0"], "units": [0, 10]}], "scenario": "other"}, "stages[0].devices[0]",
     "; the plan was made for scenario 'other', this is 't'"),
    ({"stages": [{"devices": ["a/P100-0"], "units": [0, 5]}, {"devices": ["a/P100-0"], "units": [5, 10]}]},
     "stages[1].devices[0]", "already used by stage 0"),
    ({"stages": [{"devices": ["a/P100-0", "a/P100-0"], "units": [0, 10]}]},
     "stages[0].devices[1]", "device 'a/P100-0' is listed twice in this stage"),  # not "used by stage 0"
    ({"slices": [32, 16]}, "slices", "not the sequence length 64"),
    ({"micro_batches": 3}, "micro_batches", "batch of 2"),
])
def test_inconsistent_plans(setup, change, field, problem):
    plan = Plan.model_validate({**GOOD, **change})
    with pytest.raises(InputError) as e:
        plan.check(setup, "p.json")
    assert str(e.value).startswith(f"p.json: field '{field}'"), str(e.value)
    assert problem in str(e.value)



def test_a_tensor_parallel_stage_wider_than_the_model_has_heads_is_refused(tmp_path):
    """The runtime refuses a TP group with more ranks than attention heads; simulate had
    predicted such a plan (each rank holding less than the TP-8 plan's share) with exit 0."""
    two_heads = {**BASE, "model": {"family": "llama", "n_layers": 4, "d_model": 64, "n_heads": 2, "n_kv_heads": 1,
                                   "d_ff": 128, "vocab_size": 256}}
    setup = parse_scenario(two_heads).resolve()
    three = {**GOOD, "stages": [{"devices": ["a/P100-0", "a/P100-1", "b/mygpu-0"], "units": [0, 10]}]}
    with pytest.raises(InputError) as e:
        Plan.model_validate(three).check(setup, "p.json")
    assert str(e.value) == ("p.json: field 'stages[0].devices': tensor parallel over 3 devices, but the model has "
                            "only 2 attention heads to split"), str(e.value)
    two = {**GOOD, "stages": [{"devices": ["a/P100-0", "a/P100-1"], "units": [0, 5]},
                              {"devices": ["b/mygpu-0"], "units": [5, 10]}]}
    Plan.model_validate(two).check(setup)  # as many ranks as heads: fine

@pytest.mark.parametrize("text,problem", [
    ('{"planner": "x"', "JSON syntax error at line 1"),
    ("[]", "empty list"),
    ('[{"planner": "x", "scenario": "t", "stages": [], "slices": [64]}]', "field '[0].stages'"),
    ('{"planner": "x", "scenario": "t", "stages": [{"devices": ["a/P100-0"], "units": [0, 10]}], "slices": [64], "colour": 1}',
     "field 'colour': unknown key"),
    # a misspelled required key: its spelling, not only the key it leaves missing
    ('{"planner": "x", "scenario": "t", "stagez": [{"devices": ["a/P100-0"], "units": [0, 10]}], "slices": [64]}',
     "field 'stagez': unknown key (did you mean stages?)"),
    ('{"planner": "x", "scenario": "t", "stages": [{"devices": ["a/P100-0"], "units": [0, 10]}], "slices": [0, 64]}',
     "field 'slices[0]'"),
    ("null", "a plan is a JSON object, got null"),
    # a boolean is not a number (pydantic took true as 1 micro-batch), as in a scenario
    ('{"planner": "x", "scenario": "t", "stages": [{"devices": ["a/P100-0"], "units": [0, 10]}], "slices": [64], '
     '"micro_batches": true}', "field 'micro_batches': expected a number, got true (a boolean)"),
    ('{"planner": "x", "scenario": "t", "stages": [{"devices": ["a/P100-0"], "units": [0, 10]}], "slices": [false]}',
     "field 'slices[0]': expected a number, got false"),
    ('[{"planner": "x", "scenario": "t", "stages": [{"devices": ["a/P100-0"], "units": [0, true]}], "slices": [64]}]',
     "field '[0].stages[0].units[1]': expected a number, got true"),
    # a key twice: json.loads kept the last (a hand-edited 1 then 3 micro-batches ran 3), in silence
    ('{"planner": "x", "scenario": "t", "stages": [{"devices": ["a/P100-0"], "units": [0, 10]}], "slices": [64], '
     '"micro_batches": 1, "micro_batches": 3}', "'micro_batches' is given twice in one object"),
])
def test_malformed_plan_files(tmp_path, text, problem):
    p = tmp_path / "p.json"
    p.write_text(text)
    with pytest.raises(InputError) as e:
        load_plans(p)
    assert str(p) in str(e.value) and problem in str(e.value), str(e.value)


def test_integral_floats_are_numbers(tmp_path):
    """A plan scripted in Python or jq may write 64.0: taken as 64, as a scenario takes it."""
    p = tmp_path / "p.json"
    p.write_text('{"planner": "x", "scenario": "t", "stages": [{"devices": ["a/P100-0"], "units": [0, 10]}], '
                 '"slices": [64.0], "micro_batches": 2.0}')
    (plan,) = load_plans(p)
    assert plan.slices == [64] and plan.micro_batches == 2
