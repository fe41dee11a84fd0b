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


def _gpt_at(seq_len, output_tokens, batch_size=2):
    d = {"name": "t", "model": {"family": "gpt", "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 256,
                                "vocab_size": 128, "max_seq_len": 64},
         "workload": {"seq_len": seq_len, "batch_size": batch_size, "output_tokens": output_tokens},
         "cluster": {"hosts": [{"name": "a", "devices": [{"type": "P100"}]}]},
         "planner": {"token_granularity": 1}}
    return parse_scenario(d, "t.yaml").resolve()


@pytest.mark.parametrize("output_tokens", [2, 33])
def test_profiled_decode_contexts_stay_within_the_positions_a_run_uses(output_tokens):
    """The profiler times decode steps up to the last one a run makes: step t feeds position
    seq_len + t, the last t = output_tokens - 2.  It timed one past that, which a GPT filling
    its learned positions (now allowed) does not have: profiling failed with 'position 65
    beyond the model's max_seq_len 64'."""
    pytest.importorskip("torch")
    from hpipe.runtime.profile_grid import decode_points

    setup = _gpt_at(65 - output_tokens, output_tokens)
    for quick in (True, False):
        contexts = {c for _, c, _ in decode_points(setup, quick)}
        assert contexts and max(contexts) == 63, contexts  # the last position, 0-based


def test_no_decode_points_without_decode_steps_and_enough_for_a_fit_with_one():
    """One new token comes from the prefill's logits: no decode step to time (the profile is not
    asked for one, and is not stale without).  One step of one sequence still gets the three
    points a decode fit of its own needs."""
    pytest.importorskip("torch")
    from hpipe.costmodels.fitted import MIN_DECODE_POINTS
    from hpipe.runtime.profile_grid import decode_points

    assert decode_points(_gpt_at(64, 1)) == [] and decode_points(_gpt_at(64, 0)) == []
    assert len(decode_points(_gpt_at(32, 2, batch_size=1))) >= MIN_DECODE_POINTS


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


def test_the_planners_memory_tables_hold_the_output_tokens_kv_too():
    """The DP's memory matrix is stage_memory_bytes, prompt plus output: a mutation that sized
    the planner's KV cache to the prompt alone survived every test (no random case generates)."""
    from hpipe.memory import stage_memory_bytes
    from hpipe.planners.costs import CostTables

    s = _paper(256)
    t = CostTables(s)
    g = s.granularity
    for tp in (1, 2):
        m = t.memory_matrix(tp, g, 2)
        for a, e in ((0, 5), (3, 40), (30, s.n_units)):
            assert m[a, e] == pytest.approx(stage_memory_bytes(s, a, e, tp, g, 2)), (tp, a, e)


def test_peak_memory_takes_the_largest_micro_batch():
    """Batch 3 in two micro-batches is 2 + 1 sequences: the workspace is the two's (a mutation
    taking the smallest reported plans that overflow as feasible)."""
    from hpipe.memory import stage_memory_bytes

    s = _paper(0)
    plan = make_plan(s, "base").model_copy(update={"micro_batches": 2})
    d = yaml.safe_load((ROOT / "scenarios/paper-llama7b.yaml").read_text())
    d["workload"]["batch_size"] = 3
    s3 = parse_scenario(d).resolve()
    need = plan_memory_bytes(s3, plan)
    st = plan.stages[0]
    assert need[st.devices[0]] == stage_memory_bytes(s3, st.start, st.end, st.tp, max(plan.slices), 2)
    assert need[st.devices[0]] > stage_memory_bytes(s3, st.start, st.end, st.tp, max(plan.slices), 1)


def test_tied_embeddings_are_held_once_in_the_models_need():
    from hpipe.memory import model_need_bytes

    def need(tied):
        d = {"name": "t", "model": {"family": "gpt", "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 256,
                                    "vocab_size": 1000, "max_seq_len": 64, "tie_embeddings": tied},
             "workload": {"seq_len": 32, "batch_size": 1},
             "cluster": {"hosts": [{"name": "a", "devices": [{"type": "P100"}]}]}}
        return model_need_bytes(parse_scenario(d).resolve())

    (untied, kv0), (tied, kv1) = need(False), need(True)
    assert untied - tied == 1000 * 64 * 2 and kv0 == kv1  # one vocab x d_model table at fp16
