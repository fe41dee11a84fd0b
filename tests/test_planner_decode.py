"""Generation planning: hpipe against brute force for every objective, plans' predictions
against the simulator, and the baselines' decode groups.

The brute force enumerates every ordered device subset, cut set, slicing, micro-batch
count (the divisors of the batch, as the planner) and decode group count of a tiny
scenario, and scores each plan exactly (``decode.plan_figures``: the simulator's semantics;
checked against the simulator itself below)."""

from __future__ import annotations

import itertools

import pytest

from hpipe.memory import plan_shortfalls
from hpipe.plan import Plan, Stage
from hpipe.planners import make_plan
from hpipe.planners.decode import plan_figures
from hpipe.planners.joint import micro_batch_options
from hpipe.scenario import parse_scenario
from hpipe.sim import simulate

pytestmark = pytest.mark.timeout(900)


def _roofline_v1(overhead_us):
    """The cases below were shaped on the round-1 roofline's constants (which devices are
    decode- or prefill-bound); where the roofline has versions, pin that one."""
    from hpipe.costmodels.roofline import RooflineConfig

    cm = {"kind": "roofline", "kernel_overhead_us": overhead_us}
    if "version" in RooflineConfig.model_fields:
        cm["version"] = 1
    return cm


def _scenario(devices, network=None, n_layers=2, seq_len=32, batch=2, output_tokens=16, objective="latency",
              d_model=128, overhead_us=5.0, granularity=16):
    hosts = {}
    for host, name, tflops, bw in devices:
        hosts.setdefault(host, []).append({"name": name, "peak_tflops": tflops, "memory_gb": 1.0,
                                           "memory_bandwidth_gbps": bw, "power_w": 100.0})
    data = {"name": "tiny-gen", "dtype": "float16",
            "model": {"family": "llama", "n_layers": n_layers, "d_model": d_model, "n_heads": 4,
                      "d_ff": 2 * d_model, "vocab_size": 1000, "max_seq_len": 1024},
            "workload": {"seq_len": seq_len, "batch_size": batch, "output_tokens": output_tokens},
            "cluster": {"hosts": [{"name": h, "devices": d, "interconnect": {"bandwidth_gbps": 100.0,
                                                                             "latency_us": 10.0}}
                                  for h, d in hosts.items()]},
            "costmodel": _roofline_v1(overhead_us),
            "planner": {"token_granularity": granularity, "memory_reserve_gb": 0.0, "objective": objective}}
    if network:
        data["cluster"]["network"] = network
    return parse_scenario(data).resolve()


# Decode-dominated: a compute-rich but bandwidth-poor device (prefill wants it) and a
# bandwidth-rich one on another host behind a slow, high-latency link.
DECODE_HEAVY = dict(devices=[("a", "flops", 20.0, 20.0), ("b", "bw", 2.0, 400.0)],
                    network={"bandwidth_gbps": 1.0, "latency_us": 500.0}, output_tokens=24,
                    d_model=256, seq_len=256, granularity=64)
THREE = dict(devices=[("a", "fast", 10.0, 300.0), ("a", "slow", 2.0, 100.0), ("b", "mid", 5.0, 200.0)],
             network={"bandwidth_gbps": 10.0, "latency_us": 200.0}, batch=3, output_tokens=12)
PREFILL_HEAVY = dict(devices=[("a", "x", 1.0, 200.0), ("a", "y", 1.0, 200.0)], seq_len=64, output_tokens=4)
# Decode bound by KV-cache reads (long prompt, small model): a step's time grows with its
# batch, so several groups in flight keep both stages busy (pipelined decode pays).
# (Two hosts: one host's pair would rather be a tensor-parallel stage.)
KV_BOUND = dict(devices=[("a", "x", 1.0, 100.0), ("b", "y", 1.0, 100.0)], d_model=128, seq_len=1024,
                granularity=256, batch=4, output_tokens=16, network={"bandwidth_gbps": 100.0, "latency_us": 10.0})
CASES = {"decode-heavy": DECODE_HEAVY, "three-devices": THREE, "prefill-heavy": PREFILL_HEAVY,
         "kv-bound": KV_BOUND}


def _compositions(total, g):
    k = total // g
    for r in range(1, k + 1):
        for cuts in itertools.combinations(range(1, k), r - 1):
            bounds = (0,) + cuts + (k,)
            yield [(b - a) * g for a, b in zip(bounds, bounds[1:])]


def brute_force(setup):
    """Every plan's figures: [(figures, plan)]."""
    devs, U = setup.cluster.device_ids, setup.n_units
    out = []
    for k in range(1, len(devs) + 1):
        for order in itertools.permutations(devs, k):
            for cuts in itertools.combinations(range(1, U), k - 1):
                bounds = (0,) + cuts + (U,)
                stages = [Stage(devices=[d], units=(a, b)) for d, a, b in zip(order, bounds, bounds[1:])]
                for slices in _compositions(setup.seq_len, setup.granularity):
                    for m in micro_batch_options(setup.batch_size):
                        for g in range(1, setup.batch_size + 1):
                            plan = Plan(planner="brute", scenario=setup.name, stages=stages, slices=slices,
                                        micro_batches=m, decode_micro_batches=g)
                            if plan_shortfalls(setup, plan):
                                continue
                            out.append((plan_figures(setup, plan), plan))
    return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    setup = _scenario(**CASES[request.param])
    return request.param, setup, brute_force(setup)


# the oracle reads the figure itself, not hpipe's own objective_key: a mutation that ranked
# tpot by latency changed both sides alike and survived (6% worse TPOT on kv-bound)
FIGURE = {"latency": "latency_s", "ttft": "ttft_s", "tpot": "tpot_s", "throughput": "latency_s"}


@pytest.mark.parametrize("objective", ["latency", "ttft", "tpot", "throughput"])
def test_hpipe_within_2_percent_of_brute_force(case, objective):
    name, setup, every = case
    setup.scenario.planner.objective = objective
    key = FIGURE[objective]
    best = min(f[key] for f, _ in every)
    plan = make_plan(setup, "hpipe")
    got = getattr(simulate(setup, plan), key)
    assert got <= best * 1.02 + 1e-12, (name, objective, got, best, plan)


def test_decode_changes_the_plan_where_it_dominates():
    """The prefill-optimal plan is far from the end-to-end optimum when decode dominates."""
    setup = _scenario(**DECODE_HEAVY)
    prefill_only = _scenario(**{**DECODE_HEAVY, "output_tokens": 0})
    pre_plan = make_plan(prefill_only, "hpipe")
    gen_plan = make_plan(setup, "hpipe")
    pre_as_gen = simulate(setup, pre_plan.model_copy(update={"decode_micro_batches": 1}))
    assert simulate(setup, gen_plan).latency_s < 0.8 * pre_as_gen.latency_s
    # ...while time to first token still wants the prefill's plan
    setup.scenario.planner.objective = "ttft"
    ttft_plan = make_plan(setup, "hpipe")
    assert ttft_plan.stages == pre_plan.stages
    assert ttft_plan.predicted["ttft_s"] == pytest.approx(pre_plan.predicted["latency_s"], rel=1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_predicted_figures_are_the_simulated_ones(name):
    setup = _scenario(**CASES[name])
    for planner in ("hpipe", "base", "gpipe", "gpipe-balanced", "terapipe", "megatron", "tp-terapipe"):
        plan = make_plan(setup, planner)
        r = simulate(setup, plan)
        for k in ("latency_s", "ttft_s", "tpot_s", "tpot_p90_s", "output_tokens_per_s"):
            assert plan.predicted[k] == pytest.approx(getattr(r, k), rel=1e-9), (planner, k)


@pytest.mark.parametrize("name", list(CASES))
def test_step_loop_costs_are_priced_alike_by_planner_and_simulator(name):
    """With a cost model that knows the decode step loop's costs (a hop's hand-over to an idle
    loop, compute after a wait), the planners' exact timeline still gives the simulator's
    figures, and the costs make decode slower."""
    from hpipe.planners.decode import plan_figures

    setup = _scenario(**CASES[name])
    plans = {p: make_plan(setup, p) for p in ("hpipe", "gpipe", "terapipe", "megatron", "tp-terapipe")}
    before = {p: simulate(setup, plan).latency_s for p, plan in plans.items()}
    setup.cost.step_overhead_s = lambda src, dst: 0.0 if src == dst else 0.002
    setup.cost.after_wait_factor = lambda device_id: 1.3
    for p, plan in plans.items():
        r = simulate(setup, plan)
        fig = plan_figures(setup, plan)
        for k in ("latency_s", "ttft_s", "tpot_s", "tpot_p90_s"):
            assert fig[k] == pytest.approx(getattr(r, k), rel=1e-9), (p, k)
        if len(plan.stages) > 1:
            assert r.latency_s > before[p] * 1.01, p
        assert make_plan(setup, "hpipe").predicted["latency_s"] <= min(
            simulate(setup, q).latency_s for q in plans.values()) * (1 + 1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_a_step_loop_faster_than_the_ping_pong_is_priced_alike_by_planner_and_simulator(name):
    """A negative step overhead (the step loop measured faster than the link's ping-pong),
    larger than the route's latency: it shortens the hop's delay and then its hold, alike in
    the planners' timeline and the simulator, and makes decode faster."""
    from hpipe.planners.decode import plan_figures

    setup = _scenario(**CASES[name])
    plans = {p: make_plan(setup, p) for p in ("hpipe", "gpipe", "terapipe")}
    before = {p: simulate(setup, plan).latency_s for p, plan in plans.items()}
    real = setup.cost.transfer_time_s

    def faster(src, dst):  # past the route's latency, into the hold, never past an 8-byte transfer
        if src == dst:
            return 0.0
        lat = setup.cluster.route(src, dst).latency_s
        return -(lat + 0.5 * (float(real(src, dst, 8)) - lat))

    assert any(faster(a, b) < -setup.cluster.route(a, b).latency_s
               for a in setup.cluster.device_ids for b in setup.cluster.device_ids if a != b)
    assert all(float(real(a, b, 8)) + faster(a, b) >= 0
               for a in setup.cluster.device_ids for b in setup.cluster.device_ids if a != b)
    setup.cost.step_overhead_s = faster
    after = {}
    for p, plan in plans.items():
        r = simulate(setup, plan)
        fig = plan_figures(setup, plan)
        for k in ("latency_s", "ttft_s", "tpot_s", "tpot_p90_s"):
            assert fig[k] == pytest.approx(getattr(r, k), rel=1e-9), (p, k)
        after[p] = r.latency_s
        assert r.latency_s <= before[p] * (1 + 1e-12), p
    # (a plan bound by its compute may not notice its hops)
    assert any(after[p] < before[p] * (1 - 1e-6) for p, plan in plans.items() if len(plan.stages) > 1)


@pytest.mark.parametrize("tp", [2, 4])
def test_a_tensor_parallel_stage_after_the_first_pays_one_hand_over(tp):
    """A hand-built plan whose second stage is tensor parallel over 2 or 4 devices: the leader's
    hand-over to its peers joins the stage's time once (not once per peer's forward), and the
    planners' timeline still gives the simulator's figures."""
    from hpipe.plan import Plan, Stage
    from hpipe.planners.decode import plan_figures

    devs = [("a", "x", 5.0, 200.0)] + [("b", f"p{i}", 5.0, 200.0) for i in range(4)]
    setup = _scenario(devs, network={"bandwidth_gbps": 10.0, "latency_us": 200.0}, batch=2, output_tokens=6)
    ids = setup.cluster.device_ids
    plan = Plan(planner="manual", scenario=setup.name, slices=[32], micro_batches=1,
                stages=[Stage(devices=[ids[0]], units=(0, 3)), Stage(devices=ids[1:1 + tp], units=(3, 6))])
    base = simulate(setup, plan)
    setup.cost.step_overhead_s = lambda src, dst: 0.0 if src == dst else 0.002
    setup.cost.after_wait_factor = lambda device_id: 1.3
    r, fig = simulate(setup, plan), plan_figures(setup, plan)
    for k in ("latency_s", "ttft_s", "tpot_s", "tpot_p90_s"):
        assert fig[k] == pytest.approx(getattr(r, k), rel=1e-9), k
    # per token: a hop, the return, and the stage's hand-over to its peers: 3 x 2 ms, then the
    # factor on both stages' compute (well under 6 ms more on this tiny model)
    assert 0.006 < r.tpot_s - base.tpot_s < 0.012


def test_pipelined_decode_groups_pay_where_steps_grow_with_the_batch():
    setup = _scenario(**KV_BOUND)
    plan = make_plan(setup, "hpipe")
    assert len(plan.stages) == 2 and plan.decode_micro_batches > 1
    one = simulate(setup, plan.model_copy(update={"decode_micro_batches": 1}))
    decode_s = plan.predicted["latency_s"] - plan.predicted["ttft_s"]
    assert decode_s < 0.92 * (one.latency_s - one.ttft_s)  # here: 3.57 ms against 3.97


def test_baselines_decode_as_plain_pipelines():
    """Each prefill micro-batch stays a decode group: base and terapipe one group, gpipe one
    per sequence."""
    setup = _scenario(**THREE)
    assert make_plan(setup, "base").decode_micro_batches == 1
    assert make_plan(setup, "terapipe").decode_micro_batches == 1
    g = make_plan(setup, "gpipe")
    assert g.decode_micro_batches == g.micro_batches == setup.batch_size


@pytest.mark.parametrize("m,g", [(2, 1), (4, 1), (1, 3), (2, 4), (4, 4)])
def test_the_closed_form_timeline_is_the_simulators_on_a_slow_return_link(m, g):
    """Across a slow link every decode step's ids take real time back to the first stage,
    and queue there behind the other groups' (the return link is one resource); a group's
    first step waits for the last of the prefill micro-batches it holds.  The closed form
    (``timeline``) must equal the simulator.  Mutations that dropped the return queue, or
    let a first step wait for its first micro-batch only, survived the other cases."""
    setup = _scenario(devices=[("a", "x", 1.0, 100.0), ("b", "y", 1.0, 100.0)], batch=4, output_tokens=6,
                      network={"bandwidth_gbps": 1e-7, "latency_us": 300.0})  # ids: 0.08 s a row
    U = setup.n_units
    plan = Plan(planner="hand", scenario=setup.name, slices=[16, 16], micro_batches=m, decode_micro_batches=g,
                stages=[Stage(devices=["a/x-0"], units=(0, 3)), Stage(devices=["b/y-0"], units=(3, U))])
    got, r = plan_figures(setup, plan), simulate(setup, plan)
    for k in ("latency_s", "ttft_s", "tpot_s", "tpot_p90_s"):
        assert got[k] == pytest.approx(getattr(r, k), rel=1e-9), k


@pytest.mark.parametrize("m,g", [(1, 3), (1, 4), (2, 4)])
def test_returned_ids_queue_on_their_link_in_the_closed_form_too(m, g):
    """Three hosts, a model 2 wide: a step's activations (4 bytes a row) cross faster than its
    ids come back (8), so the groups' returns queue on the last-to-first link.  Without that
    queue the closed form said TPOT 1.42 s where the simulator says 2.84 s."""
    from tests.planner_cases import hand_scenario

    setup = parse_scenario(hand_scenario(
        "narrow", {"a": ["x"], "b": ["y"], "c": ["z"]}, {"bandwidth_gbps": 1e-7, "latency_us": 300.0},
        seq_len=32, batch_size=4, output_tokens=6, costmodel=_roofline_v1(5.0),
        model={"family": "llama", "n_layers": 2, "d_model": 2, "n_heads": 1, "d_ff": 4, "vocab_size": 1000,
               "max_seq_len": 1024})).resolve()
    plan = Plan(planner="hand", scenario=setup.name, slices=[16, 16], micro_batches=m, decode_micro_batches=g,
                stages=[Stage(devices=["a/x-0"], units=(0, 2)), Stage(devices=["b/y-0"], units=(2, 4)),
                        Stage(devices=["c/z-0"], units=(4, setup.n_units))])
    got, r = plan_figures(setup, plan), simulate(setup, plan)
    for k in ("latency_s", "ttft_s", "tpot_s", "tpot_p90_s"):
        assert got[k] == pytest.approx(getattr(r, k), rel=1e-9), k


def test_decode_group_counts_tried_include_one_group_per_sequence():
    from hpipe.planners.decode import group_options

    assert [group_options(b) for b in (1, 3, 8)] == [[1], [1, 2, 3], list(range(1, 9))]
    assert group_options(12) == [1, 2, 3, 4, 5, 6, 7, 8, 12]  # 1..8 and the divisors: 12 groups of one


def test_one_new_token_is_a_prefill():
    """output_tokens=1: the token comes from the prefill's logits, no decode step runs.  Every
    planner plans it (an all-reduce over no decode items, and the decode-aware search over
    none, had raised), and hpipe's plan is the prefill-only plan, its TTFT the latency."""
    from hpipe.errors import InfeasibleError
    from hpipe.planners import REGISTRY

    # two devices on a host (host_stages: one tensor-parallel stage), a third behind a link
    case = dict(devices=[("a", "x", 10.0, 100.0), ("a", "y", 10.0, 100.0), ("b", "z", 5.0, 200.0)],
                network={"bandwidth_gbps": 1.0, "latency_us": 100.0})
    setup = _scenario(**case, output_tokens=1)
    prefill_only = _scenario(**case, output_tokens=0)
    planned = []
    for name in REGISTRY:
        try:
            plan = make_plan(setup, name)
        except InfeasibleError:
            continue
        r = simulate(setup, plan)
        assert r.ttft_s == pytest.approx(r.latency_s, rel=1e-12) and r.tpot_s is None, (name, r)
        planned.append(name)
        if name == "megatron":
            assert max(len(st.devices) for st in plan.stages) == 2, plan
    assert {"hpipe", "megatron", "tp-terapipe"} <= set(planned), planned
    gen, pre = make_plan(setup, "hpipe"), make_plan(prefill_only, "hpipe")
    assert (gen.stages, gen.slices, gen.micro_batches) == (pre.stages, pre.slices, pre.micro_batches)
    assert gen.predicted["latency_s"] == pytest.approx(pre.predicted["latency_s"], rel=1e-9)


def test_objective_key_breaks_ties_by_latency():
    """Every objective ranks by its figure, then by latency: among plans with equal TTFT (or
    TPOT) the one that finishes sooner wins.  A ``ttft`` key that dropped the latency
    tie-break survived, since the brute-force oracle reads the figure alone (audit E1)."""
    from hpipe.planners.decode import objective_key

    assert objective_key({"latency_s": 2.0, "ttft_s": 1.0, "tpot_s": None}, "ttft") == (1.0, 2.0)
    assert objective_key({"latency_s": 2.0, "ttft_s": 1.0, "tpot_s": 0.5}, "tpot") == (0.5, 2.0)
    assert objective_key({"latency_s": 2.0, "ttft_s": 1.0, "tpot_s": None}, "tpot") == (0.0, 2.0)
    slow = {"latency_s": 3.0, "ttft_s": 1.0, "tpot_s": 0.1}
    fast = {"latency_s": 2.0, "ttft_s": 1.0, "tpot_s": 0.1}
    for objective in ("ttft", "tpot", "latency", "throughput"):
        assert min([slow, fast], key=lambda f: objective_key(f, objective)) is fast, objective
