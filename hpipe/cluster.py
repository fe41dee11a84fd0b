"""The cluster graph: devices and the links between them (``LinkGraph``; ``Cluster.graph``
gives it as a networkx graph on demand).

Nodes are devices (``HOST/NAME-i``) and one network interface per host
(``HOST``).  Devices of a host are joined pairwise by the host's interconnect;
each device reaches its host's interface over the same interconnect (half its
latency on each side); interfaces are joined by the network or a per-pair override.
A transfer between two devices of one host takes their interconnect; between hosts, it goes
up to the sender's interface, over that pair's network link and down to the receiver: hosts
do not relay traffic for others, so a pair's own link is used even where a detour through a
third host has less latency (least-latency routing had sent a 100 Gbit/s pair's traffic over
two 0.01 Gbit/s links of a host the plan did not use).  Its bandwidth is the narrowest link
on the path and its latency the sum.  This is the least-latency path among those that pass
no other host's interface (tests/test_cluster_routes.py checks it against networkx).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from hpipe.devices import DeviceSpec
from hpipe.errors import InputError, suggest


@dataclass(frozen=True)
class Device:
    id: str
    """HOST/NAME-i: stable across runs."""
    host: str
    spec: DeviceSpec
    placement: object | None
    """hpipe.scenario.Placement for the runtime, or None (cpu, 1 thread)."""
    ordinal: int
    """i in HOST/NAME-i."""
    usable_memory_bytes: float
    """Memory a plan may fill: the device's memory less the framework reserve."""
    entry: tuple[int, int] = (0, 0)
    """(host, entry) indices of the scenario entry it comes from, for messages that name the
    field: ``cluster.hosts[h].devices[e]`` (``i`` counts per name across a host's entries)."""

    @property
    def runtime_device(self) -> str:
        d = getattr(self.placement, "device", "cpu") if self.placement else "cpu"
        if d == "cuda":
            return f"cuda:{self.ordinal}"
        return d


@dataclass(frozen=True)
class Route:
    bandwidth_gbps: float
    latency_s: float
    links: tuple[tuple[str, str], ...]
    """Edges on the path, each as a sorted (node, node) pair: the resources a transfer occupies."""

    @property
    def bottleneck(self) -> tuple[str, str] | None:
        return self.links[0] if self.links else None

    def directed(self, src: str) -> list[tuple[str, str]]:
        """The edges oriented from ``src`` along the path, in path order: what a transfer
        from ``src`` holds (links are full duplex, one resource per direction)."""
        remaining = list(self.links)
        node, out = src, []
        while remaining:
            edge = next((e for e in remaining if node in e), None)
            if edge is None:  # not a simple path from src: keep the rest as given
                out.extend(remaining)
                break
            remaining.remove(edge)
            nxt = edge[1] if edge[0] == node else edge[0]
            out.append((node, nxt))
            node = nxt
        return out


class LinkGraph:
    """An undirected graph with node and edge attributes, kept as networkx.Graph keeps it
    (``adj[u][v]`` is the edge's attribute dict, shared by both directions; neighbours in
    the order their edges were added)."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}
        self.adj: dict[str, dict[str, dict]] = {}

    def add_node(self, n: str, **attrs) -> None:
        if n not in self.nodes:
            self.nodes[n] = {}
            self.adj[n] = {}
        self.nodes[n].update(attrs)

    def add_edge(self, u: str, v: str, **attrs) -> None:
        for n in (u, v):
            if n not in self.nodes:
                self.add_node(n)
        data = self.adj[u].get(v, {})
        data.update(attrs)
        self.adj[u][v] = data
        self.adj[v][u] = data

    def to_networkx(self):
        import networkx as nx

        g = nx.Graph()
        for n, attrs in self.nodes.items():
            g.add_node(n, **attrs)
        for u, nbrs in self.adj.items():
            for v, data in nbrs.items():
                if not g.has_edge(u, v):
                    g.add_edge(u, v, **data)
        return g


class Cluster:
    def __init__(self, link_graph: LinkGraph, devices: list[Device]):
        self.link_graph = link_graph
        self.devices = devices
        self._by_id = {d.id: d for d in devices}

    @cached_property
    def graph(self):
        """The cluster as a ``networkx.Graph`` (built on first use: the planners do not need it)."""
        return self.link_graph.to_networkx()

    @classmethod
    def from_spec(cls, spec, memory_reserve_gb: float = 0.0) -> "Cluster":
        g = LinkGraph()
        devices: list[Device] = []
        for hi, host in enumerate(spec.hosts):
            g.add_node(host.name, kind="nic", host=host.name)
            counts: Counter[str] = Counter()
            members = []
            for ei, entry in enumerate(host.devices):
                dspec = entry.spec(host.interconnect)
                for _ in range(entry.count):
                    i = counts[entry.label]
                    counts[entry.label] += 1
                    reserve = memory_reserve_gb * 1e9 if dspec.kind == "gpu" else 0.0
                    dev = Device(id=f"{host.name}/{entry.label}-{i}", host=host.name, spec=dspec,
                                 placement=entry.runtime, ordinal=i,
                                 usable_memory_bytes=max(dspec.memory_bytes - reserve, 0.0), entry=(hi, ei))
                    devices.append(dev)
                    members.append(dev)
                    g.add_node(dev.id, kind="device", host=host.name, spec=dspec)
            slowest = min(members, key=lambda d: d.spec.interconnect_gbps).spec
            bw, lat = slowest.interconnect_gbps, slowest.interconnect_latency_us * 1e-6
            given = host.interconnect
            if given is not None and given.bandwidth_gbps is not None:
                bw = given.bandwidth_gbps
            if given is not None and given.latency_us is not None:
                lat = given.latency_us * 1e-6
            for k, a in enumerate(members):
                # half the interconnect latency on each side of the host's interface, so a
                # device-to-device hop through it costs the same as the direct edge
                g.add_edge(a.id, host.name, bandwidth_gbps=bw, latency_s=lat / 2, kind="host-uplink")
                for b in members[k + 1:]:
                    g.add_edge(a.id, b.id, bandwidth_gbps=bw, latency_s=lat, kind="interconnect")
        overrides = {frozenset(l.between): l for l in spec.links}
        names = [h.name for h in spec.hosts]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                link = overrides.get(frozenset((a, b)), spec.network)
                g.add_edge(a, b, bandwidth_gbps=link.bandwidth_gbps, latency_s=link.latency_us * 1e-6,
                           kind="network")
        return cls(g, devices)

    # ---- lookups ------------------------------------------------------------
    @property
    def device_ids(self) -> list[str]:
        return [d.id for d in self.devices]

    def device(self, device_id: str) -> Device:
        try:
            return self._by_id[device_id]
        except KeyError:
            raise InputError(f"unknown device {device_id!r}{suggest(device_id, self._by_id)}") from None

    def __contains__(self, device_id: str) -> bool:
        return device_id in self._by_id

    @cached_property
    def hosts(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for d in self.devices:
            out.setdefault(d.host, []).append(d.id)
        return out

    # ---- transfers ----------------------------------------------------------
    @cached_property
    def _routes(self) -> dict[tuple[str, str], Route]:
        routes = {}
        adj = self.link_graph.adj
        for a in self.devices:
            for b in self.devices:
                if a.id == b.id:
                    continue
                path = [a.id, b.id] if a.host == b.host else [a.id, a.host, b.host, b.id]
                edges = [tuple(sorted((u, v))) for u, v in zip(path, path[1:])]
                data = [adj[u][v] for u, v in edges]
                bw = min(d["bandwidth_gbps"] for d in data)
                # bottleneck first, so simulators that hold one resource hold the narrowest
                edges.sort(key=lambda e: adj[e[0]][e[1]]["bandwidth_gbps"])
                routes[(a.id, b.id)] = Route(bandwidth_gbps=bw, latency_s=sum(d["latency_s"] for d in data),
                                       links=tuple(edges))
        return routes

    def route(self, src: str, dst: str) -> Route:
        if src == dst:
            return Route(bandwidth_gbps=float("inf"), latency_s=0.0, links=())
        return self._routes[(src, dst)]

    def transfer_time_s(self, src: str, dst: str, nbytes: float) -> float:
        """Datasheet transfer time: latency plus bytes over the narrowest link."""
        if src == dst or nbytes <= 0:
            return 0.0
        r = self.route(src, dst)
        return r.latency_s + nbytes * 8 / (r.bandwidth_gbps * 1e9)

    def summary(self) -> list[dict]:
        return [{"id": d.id, "host": d.host, "type": d.spec.name, "memory_gb": d.spec.memory_gb,
                 "peak_tflops": d.spec.fp16_tflops} for d in self.devices]
