"""`hpipe simulate --plan` end to end, in a subprocess (exit codes and a clean stdout)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SCENARIOS, run_cli

pytestmark = pytest.mark.timeout(120)
SCENARIO = str(SCENARIOS / "paper-llama7b.yaml")

EVEN = {"planner": "even", "scenario": "paper-llama7b", "slices": [512, 512, 512, 512],
        "stages": [{"devices": [d], "units": u} for d, u in zip(
            ["host-a/P100-0", "host-a/P100-1", "host-a/P100-2", "host-a/P100-3", "host-b/RTX3090-0",
             "host-b/RTX3090-1"], [[0, 12], [12, 23], [23, 34], [34, 45], [45, 56], [56, 66]])]}
TP = {"planner": "tp", "scenario": "paper-llama7b", "slices": [1024, 1024], "micro_batches": 2,
      "stages": [{"devices": ["host-a/P100-0", "host-a/P100-1", "host-a/P100-2", "host-a/P100-3"], "units": [0, 30]},
                 {"devices": ["host-b/RTX3090-0", "host-b/RTX3090-1"], "units": [30, 66]}]}
TOO_BIG = {"planner": "one-p100", "scenario": "paper-llama7b", "slices": [2048],
           "stages": [{"devices": ["host-a/P100-0"], "units": [0, 66]}]}


def hpipe(*args):
    return run_cli(*map(str, args))


def test_a_list_of_plans_gives_one_result_each_in_order_and_stdout_is_pure_json(tmp_path):
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps([EVEN, TP, TOO_BIG]))
    trace, plot = tmp_path / "t.json", tmp_path / "g.png"
    p = hpipe("simulate", SCENARIO, "--plan", plans, "--json", "-", "--trace", trace, "--plot", plot)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)  # nothing but the JSON on stdout
    assert out["mode"] == "simulated" and out["scenario"] == "paper-llama7b"
    assert [r["planner"] for r in out["results"]] == ["even", "tp", "one-p100"]
    assert [r["feasible"] for r in out["results"]] == [True, True, False]
    assert "GB short" in out["results"][2]["infeasible"]
    for r in out["results"][:2]:
        assert r["latency_s"] > 0 and r["throughput_tokens_per_s"] == pytest.approx(6 * 2048 / r["latency_s"])
        assert 0 <= r["bubble_fraction"] < 1
    assert "even" in p.stderr  # the table went to stderr
    assert json.loads(trace.read_text())["traceEvents"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_a_plan_read_from_a_file_carries_none_of_its_planners_notes_into_the_result(tmp_path):
    """A single plan edited to run elsewhere had carried its planner's "single_device" and
    "sliced_to_fit" (and any text a hand put there) into the Result, describing another plan."""
    edited = dict(EVEN, predicted={"latency_s": 9.9, "single_device": "host-b/RTX3090-0", "sliced_to_fit": True,
                                   "note": "abc"})
    plans = tmp_path / "plan.json"
    plans.write_text(json.dumps(edited))
    p = hpipe("simulate", SCENARIO, "--plan", plans, "--json", "-", "-q")
    assert p.returncode == 0, p.stderr
    (r,) = json.loads(p.stdout)["results"]
    assert r["plan"]["predicted"] == {} and r["latency_s"] != 9.9

def test_one_plan_that_does_not_fit_exits_3_with_the_shortfall(tmp_path):
    plans = tmp_path / "plan.json"
    plans.write_text(json.dumps(TOO_BIG))
    p = hpipe("simulate", SCENARIO, "--plan", plans, "--json", tmp_path / "r.json", "-q")
    assert p.returncode == 3
    assert "host-a/P100-0" in p.stderr and "GB short" in p.stderr and "Traceback" not in p.stderr
    # the result is still written, marked infeasible
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["feasible"] is False


def test_a_plan_with_a_gap_exits_2_naming_the_field(tmp_path):
    bad = dict(EVEN, stages=[*EVEN["stages"][:1], {"devices": ["host-a/P100-1"], "units": [13, 66]}])
    plans = tmp_path / "bad.json"
    plans.write_text(json.dumps(bad))
    p = hpipe("simulate", SCENARIO, "--plan", plans)
    assert p.returncode == 2
    assert "stages[1].units" in p.stderr and "Traceback" not in p.stderr


def test_generation_scenario_shows_the_decode_columns_and_json_fields(tmp_path):
    gen = str(SCENARIOS / "paper-llama7b-generate.yaml")
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps([{**EVEN, "scenario": "paper-llama7b-generate", "decode_micro_batches": 2}]))
    trace = tmp_path / "t.json"
    p = hpipe("simulate", gen, "--plan", plans, "--trace", trace)
    assert p.returncode == 0, p.stderr
    flat = " ".join(p.stdout.split())  # the title wraps at the table's width
    for col in ("TTFT", "TPOT", "ms", "tok/s", "decode", "µb", "+ 256 out"):  # two-line headers
        assert col in flat
    p = hpipe("simulate", gen, "--plan", plans, "--json", "-")
    r = json.loads(p.stdout)["results"][0]
    assert r["ttft_s"] < r["latency_s"] and 0 < r["tpot_s"] <= r["tpot_p90_s"]
    assert r["output_tokens_per_s"] == pytest.approx(6 * 256 / r["latency_s"])
    names = {e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "compute"}
    assert "decode g1 t254" in names
    # a prefill-only scenario's table keeps its columns
    p = hpipe("simulate", SCENARIO, "--plan", _write(tmp_path, EVEN))
    assert p.returncode == 0 and "TTFT" not in p.stdout


def _write(tmp_path, plan):
    path = tmp_path / "even.json"
    path.write_text(json.dumps(plan))
    return path


def test_an_infeasible_reason_in_the_json_does_not_repeat_its_planners_name():
    """single's and gpipe's messages began 'single: ...', others' did not; the result names its
    planner beside the reason."""
    p = hpipe("simulate", SCENARIO, "--set", "workload.batch_size=600", "--planner", "single,gpipe,hpipe",
              "--json", "-", "-q")
    assert p.returncode == 3, p.stderr
    results = json.loads(p.stdout)["results"]
    assert [r["feasible"] for r in results] == [False, False, False]
    for r in results:
        assert r["infeasible"] and not r["infeasible"].startswith(r["planner"] + ":"), r["infeasible"]
