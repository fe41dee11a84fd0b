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
