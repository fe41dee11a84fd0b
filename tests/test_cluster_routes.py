"""Routes without networkx (``cluster._dijkstra_paths``) are networkx's routes: the same
paths, ties included, on every ready scenario and on random clusters with many equal-latency
alternatives (hosts joined by per-pair overrides of equal latency)."""

from __future__ import annotations

import random
from pathlib import Path

import networkx as nx
import pytest

from hpipe.cluster import _dijkstra_paths
from hpipe.scenario import load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[1]


def _nx_routes(cluster):
    g = cluster.graph
    assert isinstance(g, nx.Graph)
    paths = dict(nx.all_pairs_dijkstra_path(g, weight=lambda u, v, e: e["latency_s"] + 1e-12))
    return {(a, b): paths[a][b] for a in cluster.device_ids for b in cluster.device_ids}


def _own_routes(cluster):
    adj = cluster.link_graph.adj
    out = {}
    for a in cluster.device_ids:
        paths = _dijkstra_paths(adj, a, lambda e: e["latency_s"] + 1e-12)
        out.update({(a, b): paths[b] for b in cluster.device_ids})
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.yaml")), ids=lambda p: p.stem)
def test_routes_match_networkx_on_ready_scenarios(path):
    cluster = load_scenario(path).resolve().cluster
    assert _own_routes(cluster) == _nx_routes(cluster)


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
def test_routes_match_networkx_with_ties(seed):
    cluster = parse_scenario(_random_cluster(random.Random(seed))).resolve().cluster
    own, ref = _own_routes(cluster), _nx_routes(cluster)
    assert own == ref
    # and the routes the cost model reads are built from those paths
    for (a, b), path in ref.items():
        if a != b:
            assert set(cluster.route(a, b).links) == {tuple(sorted(e)) for e in zip(path, path[1:])}
