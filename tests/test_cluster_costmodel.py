"""Cluster graph routes and the roofline cost model, checked against hand arithmetic."""

import numpy as np
import pytest

from hpipe.scenario import parse_scenario

SCN = {
    "name": "c",
    "model": "llama-7b",
    "workload": {"seq_len": 1024, "batch_size": 1},
    "cluster": {
        "hosts": [
            {"name": "a", "devices": [{"type": "P100", "count": 2}], "interconnect": {"bandwidth_gbps": 100, "latency_us": 10}},
            {"name": "b", "devices": [{"type": "RTX3090"}]},
            {"name": "c", "devices": [{"type": "T4"}]},
        ],
        "network": {"bandwidth_gbps": 1, "latency_us": 200},
        "links": [{"between": ["a", "c"], "bandwidth_gbps": 10, "latency_us": 50}],
    },
    "costmodel": {"kind": "roofline", "version": 1, "compute_efficiency": 0.5, "memory_efficiency": 1.0,
                  "link_efficiency": 1.0, "kernel_overhead_us": 0},
}


@pytest.fixture
def setup():
    return parse_scenario(SCN).resolve()


def test_routes_inside_between_and_overridden(setup):
    cl = setup.cluster
    r = cl.route("a/P100-0", "a/P100-1")
    assert (r.bandwidth_gbps, r.latency_s) == (100, pytest.approx(10e-6))
    r = cl.route("a/P100-0", "b/RTX3090-0")
    # network latency plus half of each host's interconnect latency (10 us both)
    assert r.bandwidth_gbps == 1 and r.latency_s == pytest.approx(210e-6)
    assert r.bottleneck == ("a", "b")
    r = cl.route("c/T4-0", "a/P100-1")
    assert r.bandwidth_gbps == 10 and r.latency_s == pytest.approx(60e-6)
    # host b has no interconnect given: its device's catalog PCIe 4.0 default applies to its uplink
    assert cl.graph.edges["b/RTX3090-0", "b"]["bandwidth_gbps"] == 252
    # 1 MB over 1 Gbit/s: 8 ms + 0.21 ms
    assert cl.transfer_time_s("a/P100-0", "b/RTX3090-0", 1e6) == pytest.approx(8.21e-3)
    assert setup.cost.transfer_time_s("a/P100-0", "b/RTX3090-0", 1e6) == pytest.approx(8.21e-3)


@pytest.mark.parametrize("given,want", [
    (None, (252, 10e-6)),  # the RTX 3090's catalog PCIe 4.0
    ({}, (252, 10e-6)),
    ({"bandwidth_gbps": 126}, (126, 10e-6)),  # the latency stays the device's: it had become 0
    ({"latency_us": 30}, (252, 30e-6)),
    ({"bandwidth_gbps": 126, "latency_us": 0}, (126, 0.0)),
])
def test_an_interconnect_figure_left_out_is_the_devices_own(given, want):
    """``--set cluster.hosts[1].interconnect.bandwidth_gbps=126`` on a host with no
    interconnect made one whose latency was 0: a sweep of its bandwidth moved its latency too."""
    import copy

    data = copy.deepcopy(SCN)
    data["cluster"]["hosts"][1]["devices"] = [{"type": "RTX3090", "count": 2}]
    if given is not None:
        data["cluster"]["hosts"][1]["interconnect"] = given
    r = parse_scenario(data).resolve().cluster.route("b/RTX3090-0", "b/RTX3090-1")
    assert (r.bandwidth_gbps, r.latency_s) == (want[0], pytest.approx(want[1]))

def test_roofline_compute_and_memory_bound(setup):
    mlp = setup.units[2]
    # big slice: compute bound on a P100 at 18.7 TF x 0.5
    t = setup.cost.unit_time_s(mlp, "a/P100-0", 2048, 0, 1)
    assert t == pytest.approx(mlp.flops(2048, 0, 1) / (18.7e12 * 0.5))
    # one token: weight streaming dominates (memory bound at 732 GB/s)
    t1 = setup.cost.unit_time_s(mlp, "a/P100-0", 1, 0, 1)
    assert t1 == pytest.approx(mlp.bytes_moved(1, 0, 1, 2) / 732e9)
    # vectorised over context
    tc = setup.cost.unit_time_s(setup.units[1], "b/RTX3090-0", 128, np.array([0, 512]), 1)
    assert tc.shape == (2,) and tc[1] > tc[0]


def test_tensor_parallel_stage_adds_allreduce(setup):
    cost = setup.cost
    one = cost.stage_compute_s(1, 3, ["a/P100-0"], 512, 0, 1)
    two = cost.stage_compute_s(1, 3, ["a/P100-0", "a/P100-1"], 512, 0, 1)
    shards = one / 2
    ar_bytes = 512 * 4096 * 2
    allreduce = 2 * 2 * (2 - 1) * (10e-6 + ar_bytes / 2 / (100e9 / 8))
    bcast = 10e-6 + ar_bytes / (100e9 / 8)
    assert two == pytest.approx(shards + allreduce + bcast)


def test_tensor_parallel_keeps_embedding_and_head_whole_on_every_rank(setup):
    # The runtime replicates the embedding and the head on every rank: their time is not
    # divided by tp (LLaMA-7B's head at 2048 tokens is ~12.6 ms on a 3090, not 6.3), and
    # their weights count whole on each device.
    from hpipe.memory import stage_memory_bytes

    cost, U = setup.cost, setup.n_units
    pair = ["a/P100-0", "a/P100-1"]
    head = setup.units[U - 1]
    one = float(cost.stage_compute_s(U - 1, U, ["a/P100-0"], 512, 0, 1))
    two = float(cost.stage_compute_s(U - 1, U, pair, 512, 0, 1))
    fwd = float(cost.transfer_time_s(pair[0], pair[1], setup.units[U - 2].out_bytes(512, 1, 2)))
    assert two == pytest.approx(one + fwd)
    assert float(cost.stage_compute_s(0, 1, pair, 512, 0, 1)) == pytest.approx(
        float(cost.stage_compute_s(0, 1, ["a/P100-0"], 512, 0, 1)))
    db = setup.dtype_bytes
    w_head, w_embed = head.weight_bytes(db), setup.units[0].weight_bytes(db)
    w_split = sum(u.weight_bytes(db) for u in setup.units[1:U - 1])
    kv = sum(u.kv_bytes_per_token(db) for u in setup.units) * setup.seq_len * setup.batch_size
    ws = max(float(u.workspace_bytes(16, 1, db)) for u in setup.units)
    assert stage_memory_bytes(setup, 0, U, 2, 16, 1) == pytest.approx(w_embed + w_head + w_split / 2 + kv / 2 + ws)


def test_tensor_parallel_allreduce_waits_for_the_slowest_shard_of_each_unit(setup):
    # Two ranks whose shards are slow on alternate units: each unit's all-reduce waits for
    # that unit's slower shard, so the stage costs the sum of per-unit maxima (4 x 3 ms),
    # not the larger of the two ranks' sums (2 x 3 + 2 x 1 = 8 ms).
    import types

    cost = setup.cost
    slow = {("a/P100-0", 1), ("a/P100-0", 3), ("a/P100-1", 2), ("a/P100-1", 4)}

    def unit_time_s(self, unit, device_id, n, c, b, tp=1):
        return np.asarray(3e-3 if (device_id, unit.index) in slow else 1e-3)

    stub = types.SimpleNamespace(setup=setup, dtype_bytes=2, SPLIT_KINDS=cost.SPLIT_KINDS,
                                 LEADER_KINDS=cost.LEADER_KINDS)
    stub.unit_time_s = types.MethodType(unit_time_s, stub)
    stub.allreduce_time_s = lambda devs, nbytes: 0.0 * np.asarray(nbytes)
    stub.transfer_time_s = lambda a, b, nbytes: 0.0 * np.asarray(nbytes)
    stub.stage_overhead_s = lambda devs: 0.0
    stub.tp_unit_time_s = types.MethodType(type(cost).tp_unit_time_s, stub)
    stub.tp_scatter_s = types.MethodType(type(cost).tp_scatter_s, stub)
    t = type(cost).stage_compute_s(stub, 1, 5, ["a/P100-0", "a/P100-1"], 512, 0, 1)
    assert float(t) == pytest.approx(12e-3)


def test_a_tensor_parallel_head_runs_on_the_leader_alone_and_the_embedding_on_every_rank(setup):
    # The runtime reads the leader's logits only, so its peers skip the head; every rank needs
    # the embedding's output, so the slowest rank's embedding counts.
    cost = setup.cost
    units = setup.units
    head, embed = units[-1], units[0]
    assert head.kind == "head" and embed.kind == "embed"
    lead, peer = "a/P100-0", "b/RTX3090-0"  # a slower leader than its peer, and the other way round
    for devs in ([lead, peer], [peer, lead]):
        assert float(cost.tp_unit_time_s(head, devs, 512, 0, 1)) == pytest.approx(
            float(cost.unit_time_s(head, devs[0], 512, 0, 1)))
        assert float(cost.tp_unit_time_s(embed, devs, 512, 0, 1)) == pytest.approx(
            max(float(cost.unit_time_s(embed, d, 512, 0, 1)) for d in devs))
    assert float(cost.unit_time_s(head, lead, 512, 0, 1)) != pytest.approx(float(cost.unit_time_s(head, peer, 512, 0, 1)))


def test_power_and_memory_reserve(setup):
    d = setup.cluster.device("a/P100-0")
    assert setup.cost.busy_power_w(d.id) == 250 and setup.cost.idle_power_w(d.id) == 30
    assert d.usable_memory_bytes == pytest.approx(16e9 - 0.5e9)


def test_custom_device_and_cpu_reserve():
    data = {**SCN, "cluster": {"hosts": [{"name": "h", "devices": [
        {"type": "CPU"}, {"name": "x", "peak_tflops": 5, "memory_gb": 2, "memory_bandwidth_gbps": 100,
                          "power_w": 100, "count": 2}]}]}}
    setup = parse_scenario(data).resolve()
    assert setup.cluster.device_ids == ["h/CPU-0", "h/x-0", "h/x-1"]
    assert setup.cluster.device("h/CPU-0").usable_memory_bytes == 32e9
    assert setup.cost.idle_power_w("h/x-1") == pytest.approx(10)
    assert setup.cluster.device("h/x-0").usable_memory_bytes == pytest.approx(2e9 - 0.5e9)  # a GPU: reserve


@pytest.mark.parametrize("entry", [{"runtime": {"device": "cpu"}}, {"generation": "cpu"},
                                   {"runtime": {"device": "cpu"}, "generation": "ampere"}],
                         ids=["placed-on-a-cpu", "generation-cpu", "placed-on-a-cpu-priced-as-ampere"])
def test_a_custom_cpu_device_keeps_no_reserve(entry):
    """memory_reserve_gb is for GPUs (CUDA context, allocator); a custom device placed on a CPU
    (scenarios/local-cpu.yaml's cores) or priced as one is a CPU and keeps none."""
    data = {**SCN, "cluster": {"hosts": [{"name": "h", "devices": [
        {"name": "core", "peak_tflops": 0.06, "memory_gb": 4, "memory_bandwidth_gbps": 10, "power_w": 15, **entry}]}]}}
    setup = parse_scenario(data).resolve()
    assert setup.cluster.device("h/core-0").spec.kind == "cpu"
    assert setup.cluster.device("h/core-0").usable_memory_bytes == 4e9


def test_bf16_runs_at_the_fp32_rate_where_the_generation_has_no_bf16():
    """A P100 (Pascal) has no bf16 arithmetic: bf16 GEMMs run through fp32 math, so they are
    priced at its fp32 peak; an RTX 3090 (Ampere) runs bf16 as fast as fp16.  (bf16 had been
    priced at the fp16 peak everywhere: the paper testbed in bf16 came out as fast as in fp16.)"""
    from pathlib import Path

    from hpipe.devices import DEVICES
    from hpipe.planners import make_plan
    from hpipe.scenario import load_scenario
    from hpipe.sim import simulate

    p100, rtx = DEVICES["P100"], DEVICES["RTX3090"]
    assert p100.peak_tflops("bfloat16") == p100.fp32_tflops < p100.peak_tflops("float16") == p100.fp16_tflops
    assert rtx.peak_tflops("bfloat16") == rtx.fp16_tflops > rtx.peak_tflops("float32")
    paper = Path(__file__).resolve().parents[1] / "scenarios" / "paper-llama7b.yaml"
    latency = {}
    for dtype in ("float16", "bfloat16"):
        setup = load_scenario(paper, overrides=[f"dtype={dtype}"]).resolve()
        latency[dtype] = simulate(setup, make_plan(setup, "gpipe")).latency_s  # all six devices
    assert latency["bfloat16"] > 1.2 * latency["float16"], latency


def test_token_return_carries_eight_bytes_per_sampled_id(setup):
    """The decode loop's feedback edge: b sampled ids of 8 bytes (int64) each, at the route's
    latency and bandwidth.  By hand: a/P100-0 -> b/RTX3090-0 is 1 Gbit/s, 210 us; 4 ids are
    32 bytes, 256 ns on the wire (audit 3: 4 bytes per id survived)."""
    t = setup.cost.token_return_s("b/RTX3090-0", "a/P100-0", 4)
    assert float(t) == pytest.approx(210e-6 + 32 * 8 / 1e9, rel=1e-12)
    assert float(setup.cost.token_return_s("a/P100-0", "a/P100-0", 4)) == 0.0


def test_a_negative_step_overhead_shortens_the_delay_then_the_hold():
    """with_step_overhead by hand: +0.2 lengthens the delay; -0.5 takes the 0.3 s delay to zero
    and the remaining 0.2 s off the hold; -2 leaves nothing (never below zero)."""
    from hpipe.costmodels import with_step_overhead

    assert tuple(map(float, with_step_overhead(1.0, 0.3, 0.2))) == pytest.approx((1.0, 0.5))
    assert tuple(map(float, with_step_overhead(1.0, 0.3, -0.5))) == pytest.approx((0.8, 0.0))
    assert tuple(map(float, with_step_overhead(1.0, 0.3, -2.0))) == (0.0, 0.0)
