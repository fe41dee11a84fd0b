"""Generation scenarios: accepted, and memory holds the KV cache of prompt plus output."""

from pathlib import Path

import pytest
import yaml

from hpipe.errors import InputError
from hpipe.memory import kv_tokens, plan_memory_bytes
from hpipe.planners import make_plan
from hpipe.scenario import parse_scenario

ROOT = Path(__file__).resolve().parents[1]


def _paper(output_tokens: int):
    d = yaml.safe_load((ROOT / "scenarios/paper-llama7b.yaml").read_text())
    d["workload"]["output_tokens"] = output_tokens
    return parse_scenario(d).resolve()


def test_kv_cache_grows_by_the_output_tokens_exactly():
    s0, s1 = _paper(0), _paper(256)
    assert kv_tokens(s0) == 2048 and kv_tokens(s1) == 2048 + 256
    plan = make_plan(s0, "base")
    m0, m1 = plan_memory_bytes(s0, plan), plan_memory_bytes(s1, plan)
    for st in plan.stages:
        n_attn = sum(u.kind == "attn" for u in s0.units[st.start:st.end])
        # llama-7b: 2 (K and V) x 4096 x 2 bytes per token and layer, batch 6, 256 more tokens
        extra = n_attn * 2 * 4096 * 2 * 6 * 256
        d = st.devices[0]
        assert m1[d] - m0[d] == pytest.approx(extra)


def test_gpt_positions_bound_prompt_plus_output():
    """A 2048-token prompt fills gpt3-2.7b's 2048 learned positions.  Its first new token comes
    from the prompt's logits (no new position); the second needs position 2048."""
    d = yaml.safe_load((ROOT / "scenarios/paper-gpt3-2.7b.yaml").read_text())
    d["workload"]["output_tokens"] = 1
    parse_scenario(d, "x.yaml")
    d["workload"]["output_tokens"] = 2
    with pytest.raises(InputError) as e:
        parse_scenario(d, "x.yaml")
    assert e.value.field == "workload.output_tokens" and "learned positions (2048)" in str(e.value)
    assert "use 2049 positions" in str(e.value)


def test_decode_groups_on_a_prefill_only_scenario_are_refused_not_ignored():
    from hpipe.plan import Plan, Stage

    s0 = _paper(0)
    plan = Plan(planner="x", scenario=s0.name, stages=[Stage(devices=[d], units=u) for d, u in
                                                        [("host-b/RTX3090-0", (0, 33)), ("host-b/RTX3090-1", (33, 66))]],
                slices=[2048], decode_micro_batches=2)
    with pytest.raises(InputError) as e:
        plan.check(s0, file="p.json")
    assert e.value.field == "decode_micro_batches" and "output_tokens" in str(e.value)
    plan.check(_paper(8))  # fine where the scenario generates
