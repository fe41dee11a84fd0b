"""Random small heterogeneous scenarios for the planner tests (hypothesis strategies)."""

from __future__ import annotations

import os

from hypothesis import strategies as st

from hpipe.scenario import parse_scenario


def examples(n: int) -> int:
    """Hypothesis examples for a test: n, times HPIPE_TEST_SCALE (e.g. 10 for a long soak)."""
    return max(1, int(n * float(os.environ.get("HPIPE_TEST_SCALE", "1"))))


@st.composite
def scenario_dicts(draw, max_layers: int = 3, max_hosts: int = 2, max_devices: int = 4, max_granules: int = 8,
                   tight_memory: bool = True, max_batch: int = 3):
    """A tiny model on a few custom devices of random speeds, memories and links.

    Memories are drawn around the size of a few units so that the caps bind."""
    family = draw(st.sampled_from(["llama", "gpt"]))
    d_model = draw(st.sampled_from([64, 128]))
    n_layers = draw(st.integers(1, max_layers))
    model = {"family": family, "n_layers": n_layers, "d_model": d_model, "n_heads": 4,
             "d_ff": 2 * d_model, "vocab_size": draw(st.sampled_from([256, 1000])), "max_seq_len": 1024}
    g = draw(st.sampled_from([8, 16]))
    granules = draw(st.integers(1, max_granules))
    n_hosts = draw(st.integers(1, max_hosts))
    total = draw(st.integers(n_hosts, max_devices))
    per_host = [1] * n_hosts
    for _ in range(total - n_hosts):
        per_host[draw(st.integers(0, n_hosts - 1))] += 1
    # a model of this size holds ~0.03-0.5 MB per unit at fp16; memories of 0.15-1.2 MB bind
    mem_gb = st.sampled_from([0.00015, 0.0003, 0.0006, 0.0012, 1.0] if tight_memory else [1.0])
    hosts = []
    for h, k in enumerate(per_host):
        devices = []
        for i in range(k):
            if i and draw(st.booleans()):  # another of the previous kind: a possible TP group
                devices.append({**devices[-1], "name": f"{devices[-1]['name']}c{i}"})
                continue
            devices.append({"name": f"dev{draw(st.integers(0, 2))}x{i}",
                            "peak_tflops": draw(st.sampled_from([0.05, 0.2, 1.0, 5.0])),
                            "memory_gb": draw(mem_gb),
                            "memory_bandwidth_gbps": draw(st.sampled_from([5.0, 50.0, 500.0])),
                            "power_w": 100.0})
        hosts.append({"name": f"h{h}", "devices": devices,
                      "interconnect": {"bandwidth_gbps": draw(st.sampled_from([10.0, 100.0])),
                                       "latency_us": draw(st.sampled_from([0.0, 10.0]))}})
    data = {"name": "random", "model": model, "dtype": "float16",
            "workload": {"seq_len": g * granules, "batch_size": draw(st.integers(1, max_batch))},
            "cluster": {"hosts": hosts},
            "costmodel": {"kind": "roofline", "kernel_overhead_us": draw(st.sampled_from([0.0, 5.0, 50.0]))},
            "planner": {"token_granularity": g, "memory_reserve_gb": 0.0}}
    if n_hosts > 1:
        data["cluster"]["network"] = {"bandwidth_gbps": draw(st.sampled_from([0.1, 1.0, 10.0])),
                                      "latency_us": draw(st.sampled_from([0.0, 200.0]))}
    return data


def setup_of(data):
    return parse_scenario(data).resolve()


def hand_scenario(name: str, hosts: dict[str, list[str]], network: dict, *, seq_len: int = 64, batch_size: int = 2,
                  model: dict | None = None, costmodel: dict | None = None, **workload) -> dict:
    """A hand-built case: equal custom devices (1 TFLOP/s, 1 GB, 100 GB/s) on the named hosts,
    a 2-layer LLaMA 128 wide (or ``model``), the roofline, granularity 16, no memory reserve."""
    dev = {"peak_tflops": 1.0, "memory_gb": 1.0, "memory_bandwidth_gbps": 100.0, "power_w": 100.0}
    return {"name": name, "dtype": "float16",
            "model": model or {"family": "llama", "n_layers": 2, "d_model": 128, "n_heads": 4, "d_ff": 256,
                               "vocab_size": 256, "max_seq_len": 1024},
            "workload": {"seq_len": seq_len, "batch_size": batch_size, **workload},
            "cluster": {"hosts": [{"name": h, "devices": [{**dev, "name": d} for d in devs]} for h, devs in hosts.items()],
                        "network": network},
            "costmodel": costmodel or {"kind": "roofline"},
            "planner": {"token_granularity": 16, "memory_reserve_gb": 0.0}}


# ---- enumeration of the whole plan space (small cases only) -------------------------------
def stage_groups(setup, tp: bool = True):
    """Every device group a stage may run on: single devices, and (``tp``) groups of
    identical devices of one host whose degree the model splits evenly.  Devices of one
    kind are interchangeable, so one group per (kind, degree, members) is enough only
    for costs; the enumeration keeps every member set so that disjointness is exact."""
    import itertools

    from hpipe.planners.groups import device_kind, tp_degree_ok

    out = [(d,) for d in setup.cluster.device_ids]
    if not tp:
        return out
    kinds: dict = {}
    for d in setup.cluster.devices:
        kinds.setdefault(device_kind(setup.cluster, d.id), []).append(d.id)
    for ids in kinds.values():
        for t in range(2, len(ids) + 1):
            if tp_degree_ok(setup.model, t):
                out += list(itertools.combinations(ids, t))
    return out


def ordered_stage_choices(setup, tp: bool = True, max_stages: int | None = None):
    """Every ordered choice of disjoint stage groups (1 to max_stages stages)."""
    groups = stage_groups(setup, tp)
    limit = min(max_stages or setup.n_units, setup.n_units)

    def rec(prefix, used):
        if prefix:
            yield tuple(prefix)
        if len(prefix) == limit:
            return
        for g in groups:
            if used.isdisjoint(g):
                prefix.append(g)
                yield from rec(prefix, used | set(g))
                prefix.pop()

    yield from rec([], frozenset())


def cut_sets(n_units: int, k: int):
    import itertools

    for cuts in itertools.combinations(range(1, n_units), k - 1):
        b = (0, *cuts, n_units)
        yield list(zip(b, b[1:]))


def compositions(L: int):
    """Every composition of L granules (all 2^(L-1) slicings)."""
    import itertools

    for r in range(L):
        for cuts in itertools.combinations(range(1, L), r):
            b = (0, *cuts, L)
            yield [y - x for x, y in zip(b, b[1:])]


def exhaustive(setup, tp: bool = True, max_stages: int | None = None):
    """The least exact makespan over every ordered choice of stages (single devices and,
    with ``tp``, tensor-parallel groups), every cut set, every slicing and every
    micro-batch count, memory respected: (latency, stages, slices, micro_batches), or
    (inf, None, None, None) when nothing fits.

    Scored with the exact evaluator's recurrence from the slice grid
    (``SliceGrid.makespan``, checked against the simulator elsewhere).  Stage lists that
    differ only by which interchangeable devices of a kind they use cost the same and
    are scored once."""
    import math

    from hpipe.planners import slicing as alg2
    from hpipe.planners.common import micro_batch_sizes
    from hpipe.planners.costs import CostTables
    from hpipe.planners.groups import device_kind

    tables = CostTables(setup)
    U, g = setup.n_units, setup.granularity
    slicings = [[x * g for x in comp] for comp in compositions(setup.seq_len // g)]
    best = (math.inf, None, None, None)
    seen = set()
    for groups in ordered_stage_choices(setup, tp=tp, max_stages=max_stages):
        for ranges in cut_sets(U, len(groups)):
            stages = [(devs, a, b) for devs, (a, b) in zip(groups, ranges)]
            sig = tuple((device_kind(setup.cluster, devs[0]), len(devs), a, b) for devs, a, b in stages)
            if sig in seen:
                continue
            seen.add(sig)
            for m in range(1, setup.batch_size + 1):
                sizes = micro_batch_sizes(setup.batch_size, m)
                nmax = alg2.max_slice_tokens(tables, stages, max(sizes))
                if nmax == 0:
                    continue
                grid = alg2.SliceGrid(tables, stages, sizes, nmax)
                for s in slicings:
                    if max(s) <= nmax:
                        lat = grid.makespan(s)
                        if lat < best[0]:
                            best = (lat, stages, s, m)
    return best
