"""Routes: hosts do not relay traffic for others.  Every route is networkx's least-latency
path once the other hosts' interfaces are taken out, on every ready scenario and on random
clusters whose per-pair overrides make detours through a third host faster; and a pair's own
link is used where such a detour would win (least-latency routing had taken it)."""

from __future__ import annotations

import random
from pathlib import Path

import networkx as nx
import pytest

from hpipe.scenario import load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[1]


def _nx_routes(cluster):
    """Per device pair, networkx's least-latency path through the two hosts' own nodes."""
    g = cluster.graph
    assert isinstance(g, nx.Graph)
    hosts = set(cluster.hosts)
    out = {}
    for a in cluster.device_ids:
        for b in cluster.device_ids:
            if a == b:
                continue
            own = {cluster.device(a).host, cluster.device(b).host}
            sub = g.subgraph(n for n in g if n not in hosts - own)
            out[(a, b)] = nx.dijkstra_path(sub, a, b, weight=lambda u, v, e: e["latency_s"] + 1e-12)
    return out


def _edges(path):
    return {tuple(sorted(e)) for e in zip(path, path[1:])}


def _check(cluster):
    for (a, b), path in _nx_routes(cluster).items():
        route = cluster.route(a, b)
        assert set(route.links) == _edges(path), (a, b)
        data = [cluster.graph.edges[e] for e in route.links]
        assert route.bandwidth_gbps == min(d["bandwidth_gbps"] for d in data)
        assert route.latency_s == pytest.approx(sum(d["latency_s"] for d in data))


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.yaml")), ids=lambda p: p.stem)
def test_routes_are_least_latency_without_relays_on_ready_scenarios(path):
    _check(load_scenario(path).resolve().cluster)


def _random_cluster(rng: random.Random) -> dict:
    n_hosts = rng.randint(2, 5)
    lat = [rng.choice([10, 100, 100, 200]) for _ in range(3)]
    hosts = [{"name": f"h{i}", "devices": [{"type": rng.choice(["T4", "L4", "RTX3090"]), "count": rng.randint(1, 3)}],
              "interconnect": {"bandwidth_gbps": 100, "latency_us": rng.choice([5, 10, 20])}}
             for i in range(n_hosts)]
    names = [h["name"] for h in hosts]
    links = [{"between": [a, b], "bandwidth_gbps": rng.choice([1, 10, 25]), "latency_us": rng.choice(lat)}
             for i, a in enumerate(names) for b in names[i + 1:] if rng.random() < 0.6]
    return {"name": "routes", "model": "llama-7b", "dtype": "float16",
            "workload": {"seq_len": 1024, "batch_size": 1},
            "cluster": {"hosts": hosts, "network": {"bandwidth_gbps": 10, "latency_us": rng.choice(lat)},
                        "links": links}}


@pytest.mark.parametrize("seed", range(30))
def test_routes_are_least_latency_without_relays_on_random_clusters(seed):
    _check(parse_scenario(_random_cluster(random.Random(seed))).resolve().cluster)


def _three_hosts(with_c: bool = True) -> dict:
    """a and b joined by their own fast link (100 Gbit/s, 250 us); c reachable from both over
    links of lower latency (1 us) but 0.01 Gbit/s: a detour a -> c -> b has the least latency."""
    hosts = [{"name": n, "devices": [{"type": "RTX3090"}]} for n in ("a", "b", "c")[: 3 if with_c else 2]]
    links = [{"between": ["a", "b"], "bandwidth_gbps": 100, "latency_us": 250}]
    if with_c:
        links += [{"between": ["a", "c"], "bandwidth_gbps": 0.01, "latency_us": 1},
                  {"between": ["c", "b"], "bandwidth_gbps": 0.01, "latency_us": 1}]
    return {"name": "relay", "model": "llama-7b", "workload": {"seq_len": 2048, "batch_size": 1},
            "cluster": {"hosts": hosts, "network": {"bandwidth_gbps": 1, "latency_us": 100}, "links": links}}


def test_a_pairs_own_link_is_used_where_a_third_host_offers_less_latency():
    cluster = parse_scenario(_three_hosts()).resolve().cluster
    route = cluster.route("a/RTX3090-0", "b/RTX3090-0")
    assert ("a", "b") in route.links and not any("c" in e for e in route.links)
    # a host the transfer does not touch changes nothing: the same time as without it
    alone = parse_scenario(_three_hosts(with_c=False)).resolve().cluster
    nbytes = 16e6
    assert cluster.transfer_time_s("a/RTX3090-0", "b/RTX3090-0", nbytes) == \
        alone.transfer_time_s("a/RTX3090-0", "b/RTX3090-0", nbytes)
    assert cluster.transfer_time_s("a/RTX3090-0", "b/RTX3090-0", nbytes) < 0.01  # not 12.8 s at 0.01 Gbit/s
