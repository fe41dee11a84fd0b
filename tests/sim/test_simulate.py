"""``hpipe.sim.simulate`` on real scenarios and plans: durations from the cost model,
the timeline's invariants, memory infeasibility, and the trace and Gantt outputs."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpipe.costmodels import CostModel, CostModelConfig
from hpipe.plan import Plan
from hpipe.result import Result
from hpipe.scenario import load_scenario, parse_scenario
from hpipe.sim import directed_links, infeasible_result, simulate
from hpipe.sim.trace import chrome_trace, gantt_png

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama7b():
    return load_scenario(ROOT / "scenarios" / "paper-llama7b.yaml").resolve()


# ---- a tiny case worked by hand, through the whole path ---------------------------------
class PerToken(CostModel):
    """Every unit takes (n + c) ms: simple enough to check a timeline by hand."""

    name = "per-token-test"

    def unit_time_s(self, unit, device_id, n, c, b, tp=1):
        return (np.asarray(n, float) + np.asarray(c, float)) * 1e-3 / tp


def _tiny_setup():
    setup = parse_scenario({
        "name": "tiny-two-hosts", "model": "tiny-llama", "dtype": "float16",
        "workload": {"seq_len": 64, "batch_size": 1},
        "cluster": {"hosts": [{"name": "a", "devices": [{"name": "dev", "peak_tflops": 1, "memory_gb": 4,
                                                          "memory_bandwidth_gbps": 100, "power_w": 100,
                                                          "idle_power_w": 10}],
                               "interconnect": {"bandwidth_gbps": 100, "latency_us": 0}},
                              {"name": "b", "devices": [{"name": "dev", "peak_tflops": 1, "memory_gb": 4,
                                                          "memory_bandwidth_gbps": 100, "power_w": 200,
                                                          "idle_power_w": 20}],
                               "interconnect": {"bandwidth_gbps": 100, "latency_us": 0}}],
                    # (interconnect latency 0 written out: left out, it is the devices' own 10 us)
                    # one 32-token activation of tiny-llama: 32 x 256 x 2 B = 16384 B = 131072 bit
                    "network": {"bandwidth_gbps": 0.131072, "latency_us": 500}},
        "planner": {"token_granularity": 32},
    }).resolve()
    setup.cost = PerToken(CostModelConfig(kind="per-token-test"), setup)
    return setup


def test_golden_event_log_through_the_cost_model():
    setup = _tiny_setup()
    plan = Plan(planner="hand", scenario="tiny-two-hosts", slices=[32, 32],
                stages=[{"devices": ["a/dev-0"], "units": [0, 5]}, {"devices": ["b/dev-0"], "units": [5, 10]}])
    r = simulate(setup, plan)
    # By hand: a stage of 5 units takes 5 x (n + c) ms: slice 0 (32 + 0) 0.16 s, slice 1 (32 + 32) 0.32 s.
    # The hop holds the 0.131072 Gbit/s link for 1 ms, then 0.5 ms of latency.
    #   a: s0 [0, 0.16], s1 [0.16, 0.48];  link: s0 [0.16, 0.161] -> arrives 0.1615, s1 [0.48, 0.481] -> 0.4815
    #   b: s0 [0.1615, 0.3215], s1 waits for its input: [0.4815, 0.8015]
    got = sorted((e.kind, e.device, e.dst, e.link, e.stage, e.slice, round(e.start_s, 9), round(e.end_s, 9))
                 for e in r.events)
    assert got == sorted([
        ("compute", "a/dev-0", None, None, 0, 0, 0.0, 0.16),
        ("compute", "a/dev-0", None, None, 0, 1, 0.16, 0.48),
        ("transfer", "a/dev-0", "b/dev-0", "a->b", 1, 0, 0.16, 0.161),
        ("transfer", "a/dev-0", "b/dev-0", "a->b", 1, 1, 0.48, 0.481),
        ("compute", "b/dev-0", None, None, 1, 0, 0.1615, 0.3215),
        ("compute", "b/dev-0", None, None, 1, 1, 0.4815, 0.8015),
    ])
    assert r.latency_s == pytest.approx(0.8015)
    assert r.throughput_tokens_per_s == pytest.approx(64 / 0.8015)
    assert r.utilization == pytest.approx({"a/dev-0": 0.48 / 0.8015, "b/dev-0": 0.48 / 0.8015})
    # energy: idle power over the makespan plus busy time above idle, per device
    assert r.dynamic_energy_j == pytest.approx(90 * 0.48 + 180 * 0.48)
    assert r.energy_j == pytest.approx((10 + 20) * 0.8015 + 90 * 0.48 + 180 * 0.48)
    assert r.feasible and r.infeasible is None


def test_busy_time_counts_overlapping_intervals_once():
    """A device's busy time is the union of its compute and all-reduce intervals: overlap (a
    compute beside an all-reduce, or one inside another) counts once, so utilization stays
    at most 1.  Summing each interval from its own start (``b - a``) survived every
    simulated timeline, whose intervals on one device never overlap (audit R1)."""
    from hpipe.result import Event, _union_s, summarize

    assert _union_s([(0.0, 2.0), (1.0, 3.0)]) == 3.0
    assert _union_s([(1.0, 3.0), (0.0, 2.0), (1.5, 2.5), (4.0, 5.0)]) == 4.0
    setup = _tiny_setup()
    plan = Plan(planner="hand", scenario="tiny-two-hosts", slices=[32, 32],
                stages=[{"devices": ["a/dev-0"], "units": [0, 5]}, {"devices": ["b/dev-0"], "units": [5, 10]}])

    def ev(device, kind, a, b):
        return Event(device=device, kind=kind, stage=0, micro_batch=0, slice=0, start_s=a, end_s=b)

    events = [ev("a/dev-0", "compute", 0.0, 2.0), ev("a/dev-0", "allreduce", 1.0, 3.0),
              ev("a/dev-0", "compute", 1.5, 2.5), ev("a/dev-0", "compute", 4.0, 5.0),
              ev("b/dev-0", "compute", 0.0, 2.0), ev("b/dev-0", "compute", 1.0, 5.0)]
    r = summarize(setup, plan, events, {})
    assert r.latency_s == 5.0
    assert r.utilization == pytest.approx({"a/dev-0": 0.8, "b/dev-0": 1.0})
    assert r.bubble_fraction == pytest.approx(0.1)


# ---- invariants on random plans of the paper's testbed ------------------------------------
@st.composite
def plans(draw, setup):
    devices = list(draw(st.permutations(setup.cluster.device_ids)))
    n_used = draw(st.integers(1, len(devices)))
    devices = devices[:n_used]
    n_stages = draw(st.integers(1, min(n_used, 5)))
    dev_cuts = sorted(draw(st.sets(st.integers(1, n_used - 1), min_size=n_stages - 1,
                                   max_size=n_stages - 1))) if n_stages > 1 else []
    groups = [devices[a:b] for a, b in zip([0, *dev_cuts], [*dev_cuts, n_used])]
    unit_cuts = sorted(draw(st.sets(st.integers(1, setup.n_units - 1), min_size=n_stages - 1,
                                    max_size=n_stages - 1))) if n_stages > 1 else []
    bounds = list(zip([0, *unit_cuts], [*unit_cuts, setup.n_units]))
    g = setup.granularity
    cuts = sorted(draw(st.sets(st.integers(1, setup.seq_len // g - 1), max_size=7)))
    slices = [(b - a) * g for a, b in zip([0, *cuts], [*cuts, setup.seq_len // g])]
    mb = draw(st.integers(1, 3))
    return Plan(planner="random", scenario=setup.name, slices=slices, micro_batches=mb,
                stages=[{"devices": grp, "units": list(u)} for grp, u in zip(groups, bounds)])


def _stage_windows(events):
    """(stage, micro_batch, slice) -> [first start, last end] of the stage's work on that item."""
    win = {}
    for e in events:
        if e.kind == "transfer" and e.link is not None:
            continue
        k = (e.stage, e.micro_batch, e.slice)
        a, b = win.get(k, (np.inf, -np.inf))
        win[k] = (min(a, e.start_s), max(b, e.end_s))
    return win


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_plans_respect_devices_links_and_dependencies(llama7b, data):
    setup = llama7b
    plan = data.draw(plans(setup)).check(setup)
    r = simulate(setup, plan)
    events = r.events
    eps = 1e-9

    # never two things at once on a device, nor two transfers at once on a link
    tracks = defaultdict(list)
    for e in events:
        key = ("link", e.link) if (e.kind == "transfer" and e.link) else ("device", e.device)
        tracks[key].append((e.start_s, e.end_s))
    for key, spans in tracks.items():
        spans.sort()
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            assert b0 >= a1 - eps, f"{key} runs [{a0}, {a1}] and [{b0}, {b1}] at once"

    # never start before the input is there, nor before the previous item on the stage
    win = _stage_windows(events)
    order = [(m, s) for m, s, *_ in plan.items(setup.batch_size)]
    hop = {(e.stage, e.micro_batch, e.slice): e for e in events if e.kind == "transfer" and e.link}
    for j, stg in enumerate(plan.stages):
        for k, (m, s) in enumerate(order):
            start = win[(j, m, s)][0]
            if k:
                assert start >= win[(j, *order[k - 1])][1] - eps
            if j:
                assert start >= win[(j - 1, m, s)][1] - eps
                h = hop[(j, m, s)]
                lat = setup.cluster.route(h.device, h.dst).latency_s
                assert start >= h.end_s + lat - eps
                assert h.start_s >= win[(j - 1, m, s)][1] - eps

    # The links each hop and each tensor-parallel stage (its input forward and all-reduce ring)
    # hold.  Where none is held by two of them, nothing contends: every stage holds its devices
    # for exactly the cost model's stage time and the makespan is the exact recurrence below;
    # otherwise contention may only delay.
    def links(src, dst):
        return set(directed_links(setup.cluster.route(src, dst), src))  # full duplex

    users = [links(plan.stages[j - 1].devices[0], plan.stages[j].devices[0]) for j in range(1, len(plan.stages))]
    for stg in plan.stages:
        if stg.tp > 1:
            ring = list(stg.devices) + [stg.devices[0]]
            users.append(set().union(*(links(a, b2) for a, b2 in zip(stg.devices, stg.devices[1:])),
                                     *(links(a, b2) for a, b2 in zip(ring, ring[1:]))))
    shared = any(users[a] & users[b2] for a in range(len(users)) for b2 in range(a + 1, len(users)))

    items = plan.items(setup.batch_size)
    _, _, b, n, c = (np.array(x, float) for x in zip(*items))
    for j, stg in enumerate(plan.stages):
        want = np.broadcast_to(setup.cost.stage_compute_s(stg.start, stg.end, stg.devices, n, c, b), (len(items),))
        got = np.array([win[(j, m, s)][1] - win[(j, m, s)][0] for m, s in order])
        if shared and stg.tp > 1:
            assert np.all(got >= want * (1 - 1e-9) - 1e-12)
        else:
            assert np.allclose(got, want, rtol=1e-9, atol=1e-12)

    # with no link shared between hops, the makespan is the exact recurrence
    # (hops as stages of their own: hold = transfer time - latency, then latency)
    hop_links = [frozenset(e.link for e in events if e.kind == "transfer" and e.link and e.stage == j)
                 for j in range(1, len(plan.stages))]
    t = np.array([np.broadcast_to(setup.cost.stage_compute_s(s.start, s.end, s.devices, n, c, b), (len(items),))
                  for s in plan.stages]).T
    C = np.zeros_like(t)
    H = np.zeros_like(t)
    for i in range(len(items)):
        for j, stg in enumerate(plan.stages):
            ready = 0.0
            if j:
                src, dst = plan.stages[j - 1].devices[0], stg.devices[0]
                nbytes = setup.units[plan.stages[j - 1].end - 1].out_bytes(n[i], b[i], setup.dtype_bytes)
                total = float(setup.cost.transfer_time_s(src, dst, nbytes))
                lat = min(setup.cluster.route(src, dst).latency_s, total)
                H[i, j] = max(H[i - 1, j] if i else 0.0, C[i, j - 1]) + total - lat
                ready = H[i, j] + lat
            C[i, j] = max(C[i - 1, j] if i else 0.0, ready) + t[i, j]
    if not shared:
        assert r.latency_s == pytest.approx(C[-1, -1], rel=1e-9)
    else:
        assert r.latency_s >= C[-1, -1] * (1 - 1e-9)  # contention only ever delays
    assert all(hop_links)  # every hop was drawn on a link track


def test_a_plan_that_overflows_memory_is_marked_infeasible(llama7b):
    # All of LLaMA-7B (13.5 GB) and the KV cache of 6 x 2048 tokens (6.4 GB) on one 16 GB P100.
    plan = Plan(planner="one-p100", scenario="paper-llama7b", slices=[2048],
                stages=[{"devices": ["host-a/P100-0"], "units": [0, 66]}]).check(llama7b)
    r = simulate(llama7b, plan)
    assert not r.feasible
    assert "host-a/P100-0" in r.infeasible and "GB short" in r.infeasible
    assert r.peak_memory_mb["host-a/P100-0"] * 1e6 > 16e9
    assert r.latency_s > 0  # still simulated, so the timeline shows what it would do


def test_infeasible_result_without_a_plan_serialises(llama7b):
    r = infeasible_result(llama7b, "megatron", "no split fits")
    res = Result(scenario="paper-llama7b", mode="simulated", results=[r])
    back = Result.model_validate_json(res.model_dump_json())
    assert back.results[0].infeasible == "no split fits" and not back.results[0].feasible
    assert chrome_trace(res)["traceEvents"]  # metadata only, but valid


# ---- outputs ---------------------------------------------------------------------------------
def _two_results(setup):
    even = Plan(planner="even", scenario=setup.name, slices=[512] * 4,
                stages=[{"devices": [d], "units": [u, v]} for d, (u, v) in
                        zip(setup.cluster.device_ids, [(0, 12), (12, 23), (23, 34), (34, 45), (45, 56), (56, 66)])])
    tp = Plan(planner="tp", scenario=setup.name, slices=[1024, 1024], micro_batches=2,
              stages=[{"devices": setup.cluster.device_ids[:4], "units": [0, 30]},
                      {"devices": setup.cluster.device_ids[4:], "units": [30, 66]}])
    return Result(scenario=setup.name, mode="simulated",
                  results=[simulate(setup, even.check(setup)), simulate(setup, tp.check(setup))])


def test_chrome_trace_is_valid_and_names_every_track(llama7b):
    res = _two_results(llama7b)
    trace = json.loads(json.dumps(chrome_trace(res)))
    evs = trace["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    procs = {e["pid"]: e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "process_name"}
    assert procs == {1: "even", 2: "tp"}
    work = [e for e in evs if e["ph"] == "X"]
    assert len(work) == sum(len(r.events) for r in res.results)
    by_track = defaultdict(list)
    for e in work:
        assert {"pid", "tid", "ts", "dur", "name", "cat"} <= set(e)
        assert e["dur"] >= 0 and (e["pid"], e["tid"]) in names
        by_track[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
    # one track per device and one per link, with readable names
    assert "host-a/P100-0" in names.values()
    assert "link host-a->host-b" in names.values()
    for spans in by_track.values():  # Perfetto wants slices on a thread to nest, not cross
        spans.sort()
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            assert b0 >= a1 - 1e-3


def test_a_forward_sent_while_the_leader_computes_gets_its_own_track(llama7b):
    """A measured tensor-parallel leader sends its peers their input while it computes (the send
    does not wait): on the leader's own thread the bars crossed, which Perfetto cannot draw."""
    res = _two_results(llama7b)
    tp = res.results[1]
    fwd = next(e for e in tp.events if e.kind == "transfer" and not e.link)
    busy = next(e for e in tp.events if e.kind == "compute" and e.device == fwd.device and e.start_s >= fwd.end_s)
    # as measured: the send is still in flight when the leader's compute of that item starts
    fwd.start_s, fwd.end_s = busy.start_s - 1e-3, busy.start_s + 1e-3
    evs = chrome_trace(Result(scenario=res.scenario, mode="measured", results=[tp]))["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    assert f"{fwd.device} forwards to its peers" in names.values()
    by_track = defaultdict(list)
    for e in evs:
        if e["ph"] == "X":
            by_track[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
    for spans in by_track.values():
        spans.sort()
        assert all(b0 >= a1 - 1e-3 for (_, a1), (b0, _) in zip(spans, spans[1:])), names


def test_gantt_png_is_written_whole(llama7b, tmp_path):
    out = tmp_path / "figs" / "gantt.png"
    gantt_png(_two_results(llama7b), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(out.parent) == ["gantt.png"]  # no temporary file left behind


def test_gantt_of_results_without_a_timeline_still_writes_a_png(llama7b, tmp_path):
    res = Result(scenario="paper-llama7b", mode="simulated",
                 results=[infeasible_result(llama7b, "megatron", "no split fits")])
    gantt_png(res, tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_a_tensor_parallel_stage_prices_the_head_on_its_leader_alone(llama7b):
    # The runtime's TP peers skip the head (only the leader's logits are read): in the engine a
    # head-only TP stage keeps its leader busy for the head and its peer idle, whichever leads.
    from hpipe.sim import build

    setup = llama7b
    devs = setup.cluster.device_ids
    head = setup.units[-1]
    n_units = setup.n_units
    for lead, peer in ((devs[4], devs[5]), (devs[5], devs[4])):
        p = Plan(planner="hand", scenario=setup.name, slices=[1024, 1024],
                 stages=[{"devices": [devs[0]], "units": [0, n_units - 1]},
                         {"devices": [lead, peer], "units": [n_units - 1, n_units]}]).check(setup)
        last = build(setup, p).stages[-1]
        n = np.array([1024.0, 1024.0])
        c = np.array([0.0, 1024.0])
        assert np.allclose(last.device_compute_s[0], setup.cost.unit_time_s(head, lead, n, c, setup.batch_size))
        assert not last.device_compute_s[1].any()
        util = simulate(setup, p).utilization
        assert util[lead] > 0 and util[peer] == 0


@pytest.mark.parametrize("cut", [1, 5])  # a TP stage that starts right after the embedding, or later
def test_a_tensor_parallel_stage_after_the_first_forwards_its_input_to_each_peer(cut):
    """Its leader hands every item's input to each peer (holding the host's link) before the
    shards run: one scatter transfer per peer and item, of the previous unit's output bytes.
    A mutation that skipped it for a stage starting at unit 1 survived every test."""
    from hpipe.plan import Plan, Stage
    from hpipe.scenario import load_scenario
    from hpipe.sim import build, simulate

    setup = load_scenario(Path(__file__).parents[2] / "scenarios" / "paper-llama7b.yaml",
                          overrides=["workload.batch_size=1", "workload.seq_len=256"]).resolve()
    U = setup.n_units
    plan = Plan(planner="hand", scenario=setup.name, slices=[128, 128], micro_batches=1,
                stages=[Stage(devices=["host-b/RTX3090-0"], units=(0, cut)),
                        Stage(devices=["host-a/P100-0", "host-a/P100-1"], units=(cut, U))])
    spec = build(setup, plan).stages[1]
    out = setup.units[cut - 1].out_bytes(np.array([128.0, 128.0]), np.array([1.0, 1.0]), setup.dtype_bytes)
    assert spec.scatter_s is not None and spec.scatter_s.shape == (1, 2) and np.all(spec.scatter_s > 0)
    assert np.allclose(spec.scatter_bytes, out)
    events = simulate(setup, plan).events
    scatters = [e for e in events if e.kind == "transfer" and e.stage == 1 and e.device == "host-a/P100-0"
                and e.dst == "host-a/P100-1"]
    assert len(scatters) == 2 and all(e.nbytes == pytest.approx(out[0]) for e in scatters)


def test_an_all_reduce_beside_busy_neighbours_never_costs_less_than_alone(monkeypatch):
    """Two noisy fits (alone, and while other groups ran theirs) can cross; busy neighbours
    make nothing cheaper, so the busy price is held at the alone one (a mutation that took
    the smaller survived every test)."""
    from hpipe.planners import make_plan
    from hpipe.scenario import load_scenario
    from hpipe.sim import build

    setup = load_scenario(Path(__file__).parents[2] / "scenarios" / "local-cpu.yaml",
                          overrides=["costmodel=roofline"]).resolve()
    alone = setup.cost.allreduce_time_s
    monkeypatch.setattr(setup.cost, "allreduce_busy_time_s",
                        lambda devs, nbytes: 0.5 * np.asarray(alone(devs, nbytes), float), raising=False)
    plan = make_plan(setup, "megatron")
    [st] = [s for s in build(setup, plan).stages if len(s.devices) > 1]
    assert np.all(st.allreduce_s > 0) and np.array_equal(st.allreduce_busy_s, st.allreduce_s)
