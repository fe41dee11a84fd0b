"""The discrete-event core: stages on devices, transfers on links, in simpy.

The engine is passive about the model and the cost model: it takes a
``PipelineSpec`` whose every duration is already computed (``hpipe.sim.build``
fills it from a Setup's cost model) and plays it out.  No file I/O happens here.

Entities
--------
* **Devices** are ``simpy.Resource`` (capacity 1): a stage holds all its
  devices while it runs one work item, so no device ever runs two items at once.
* **Links** are ``simpy.Resource`` too, one per *direction* of a graph edge
  (Ethernet and PCIe are full duplex, and scenario bandwidths are one-way).
  A transfer holds every link on its path for bytes / bandwidth, acquiring them
  in one global order so that two transfers can never deadlock; the propagation
  latency then elapses *after* the links are released, outside sender and
  receiver, so the next transfer can use the wire while the bytes fly.
* **Work items** are (micro-batch, slice) pairs in ``Plan.items`` order.

Processes (simpy generators)
----------------------------
* one per stage j: for each item i in order, wait for item i's input to arrive
  (stage 0 has it at t = 0), take the stage's devices, run, release, announce;
  the in-order loop is the dependency on item i-1 (the KV cache grows in order);
* one per hop j (stage j-1 -> stage j): for each item i in order, wait for stage
  j-1 to finish it, take the links, hold them, release, and let the latency
  elapse before stage j sees the input.

With zero transfers this is exactly C[i][j] = max(C[i-1][j], C[i][j-1]) + t[i][j]
(unless devices are co-located, below).

Co-located devices (``PipelineSpec.colocated``: emulated devices sharing one machine's
caches and memory bus) run a one-device stage's item at a rate set by how many of their
neighbours compute meanwhile, between ``StageSpec.alone_compute_s`` and ``compute_s``
(``_Colocation``: processor sharing, re-timed whenever a neighbour starts or stops).

Generation (``PipelineSpec.feedback``, see ``hpipe.sim.decode``) adds one process per
decode group: for each of the group's items in order, wait until the last stage has
finished the items it depends on, carry the sampled ids back to stage 0 over the return
route (links held, then latency), and only then let stage 0 start the item.

Events recorded
---------------
* ``compute`` on each device of a stage.  A tensor-parallel stage built with
  ``allreduce_s`` (``hpipe.sim.build`` does) plays its phases out: it holds its
  devices throughout, forwards the input from its first device to each peer
  holding that link (``transfer`` with no ``link``, on the sender), runs the shards,
  then holds the ring's links for its all-reduces (``allreduce`` on every device),
  so these queue behind pipeline hops on the same links; with ``allreduce_busy_s`` the
  all-reduces cost more by the share of co-located devices outside the group at work when
  they start (the share is read once, at that moment, for the item's all-reduces together).
  Uncontended, and with no such device at work, the phases add up to exactly the cost
  model's stage time.  (Without ``allreduce_s`` the stage is
  one closed-form hold whose phases are only drawn.)
* ``transfer`` between stages: ``device`` the sender, ``dst`` the receiver, ``stage``
  the stage it feeds, ``link`` the narrowest link on the path, and the interval the
  links were held (the receiver has the bytes one route latency after ``end_s``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import simpy

from hpipe.result import Event


@dataclass
class StageSpec:
    """One pipeline stage and how long it holds its devices for each work item."""

    devices: tuple[str, ...]
    compute_s: np.ndarray
    """(n_items,) time the stage holds all its devices per item (the cost model's stage_compute_s)."""
    device_compute_s: np.ndarray | None = None
    """Tensor parallel: (tp, n_items) each device's own shard compute, for the timeline."""
    scatter_s: np.ndarray | None = None
    """Tensor parallel: (tp-1, n_items) the first device forwarding the input to each peer in turn."""
    scatter_bytes: np.ndarray | None = None
    """(n_items,) bytes of the input each peer receives."""
    scatter_links: tuple[tuple[str, ...], ...] = ()
    """Tensor parallel: the directed links each forward to a peer holds (one tuple per peer)."""
    allreduce_s: np.ndarray | None = None
    """Tensor parallel: (n_items,) the stage's all-reduces together.  When given, the stage's
    phases are played out in turn, the scatter and the all-reduces holding their links
    (``scatter_links``, ``allreduce_links``) so that they queue behind pipeline hops on
    the same links; the compute phase takes the rest of ``compute_s``."""
    allreduce_links: tuple[str, ...] = ()
    """The directed links of the group's ring."""
    allreduce_busy_s: np.ndarray | None = None
    """Tensor parallel, co-located: (n_items,) ``allreduce_s`` while every co-located device
    outside the group is at work; the all-reduces are priced between the two by the share of
    those devices at work (computing, or inside a TP stage's item) when they start
    (``_Colocation.busy_outside``)."""
    alone_compute_s: np.ndarray | None = None
    """One device in a co-located group (``PipelineSpec.colocated``): (n_items,) the item's time
    while no other device of the group computes; ``compute_s`` is its time while all do."""

    @property
    def tp(self) -> int:
        return len(self.devices)


@dataclass
class HopSpec:
    """The activation of each item moving from stage j-1's first device to stage j's first device."""

    src: str
    dst: str
    links: tuple[str, ...]
    """Directed link names the transfer holds (``u->v``); empty: no link (free and instant)."""
    bottleneck: str | None
    """The narrowest of ``links``: the track the transfer is drawn on."""
    hold_s: np.ndarray
    """(n_items,) seconds the links are held: bytes over bandwidth."""
    latency_s: np.ndarray
    """(n_items,) propagation after release, before the receiver has the bytes."""
    nbytes: np.ndarray


@dataclass
class Feedback(HopSpec):
    """Generation's feedback edge: sampled ids from the last stage back to stage 0 (a hop
    whose ``hold_s`` and ``latency_s`` are per item's ids)."""

    chains: list[list[tuple[int, tuple[int, ...]]]]
    """Per decode group, in order: (item, items the last stage must finish first)."""


@dataclass
class PipelineSpec:
    items: list[tuple[int, int]]
    """(micro_batch, slice) of each work item, in execution order (decode: (group, step))."""
    stages: list[StageSpec]
    hops: list[HopSpec | None] = field(default_factory=list)
    """hops[j] feeds stage j; hops[0] is None (stage 0 has its input at t = 0)."""
    phases: list[str] | None = None
    """Per item: "prefill" or "decode" (None: all prefill)."""
    feedback: Feedback | None = None
    """Generation: what decode items wait for before stage 0 may start them."""
    colocated: list[tuple[frozenset[str], int]] = field(default_factory=list)
    """Devices that share one machine's caches and memory bus, each group with the number of
    devices that were busy together when ``compute_s`` was measured (see ``_Colocation``)."""

    def __post_init__(self):
        if not self.hops:
            self.hops = [None] * len(self.stages)
        if len(self.hops) != len(self.stages) or self.hops[0] is not None:
            raise ValueError("hops[j] feeds stage j: one per stage, and None for stage 0")


def _hold_all(env_resources, stack: contextlib.ExitStack):
    """Request each resource in turn inside ``stack`` (released when the stack closes)."""
    for res in env_resources:
        req = stack.enter_context(res.request())
        yield req


def _occupy(env, resources, duration_s: float):
    """Hold every one of ``resources`` for ``duration_s``, released at the end; returns when
    the hold began (``t0 = yield from _occupy(...)``)."""
    if len(resources) == 1:  # the common case, without the ExitStack's cost
        with resources[0].request() as req:
            yield req
            t0 = env.now
            yield env.timeout(duration_s)
        return t0
    with contextlib.ExitStack() as stack:
        yield from _hold_all(resources, stack)
        t0 = env.now
        yield env.timeout(duration_s)
    return t0


class _Colocation:
    """Which devices of each co-located group are computing, and an event that fires each time
    that changes.

    A stage with ``alone_compute_s`` runs its item at a rate set by its busy neighbours: the
    item needs ``alone`` seconds while none computes, ``together`` while all do, and a time
    in proportion between for some of them (four devices on two cores: one, two or three
    busy).  When a neighbour starts or stops, the rest of the item's work is re-timed at the
    new rate (processor sharing, not a price fixed when the item starts: in a two-stage
    pipeline the second stage starts just after the first starts its next item)."""

    def __init__(self, env, groups: list[tuple[frozenset[str], int]]):
        self.env = env
        # A group's `together` time was measured with `size - 1` neighbours busy (the profile
        # may have timed more devices than the plan's scenario groups here).
        groups = [(g, max(size, len(g))) for g, size in groups if len(g) > 1]
        self.neighbours = {d: g - {d} for g, _ in groups for d in g}
        self.together = {d: size - 1 for g, size in groups for d in g}
        self.computing: set[str] = set()
        self.in_item: set[str] = set()
        """Devices of tensor-parallel stages in an item, all-reduces included (``busy_outside``)."""
        self.changed = env.event()

    def _set(self, devices, busy: bool) -> None:
        touched = [d for d in devices if d in self.neighbours]
        if not touched:
            return
        (self.computing.update if busy else self.computing.difference_update)(touched)
        fired, self.changed = self.changed, self.env.event()
        fired.succeed()

    @contextlib.contextmanager
    def hold(self, devices):
        """Mark ``devices`` computing for the duration of a ``with`` block (any stage's item)."""
        self._set(devices, True)
        try:
            yield
        finally:
            self._set(devices, False)

    @contextlib.contextmanager
    def in_tp_item(self, devices):
        """Mark a tensor-parallel stage's ``devices`` busy, for ``busy_outside``, for the whole of
        an item: the profile's together all-reduce was timed beside other groups running their
        own chains, all-reduces and all, as a TP stage runs an item."""
        self.in_item.update(devices)
        try:
            yield
        finally:
            self.in_item.difference_update(devices)

    def busy_outside(self, devices) -> float:
        """The share of the co-located neighbours of ``devices``, outside them, at work now:
        computing, or in a tensor-parallel stage's item."""
        others = set().union(*(self.neighbours.get(d, set()) for d in devices)) - set(devices)
        return len(others & (self.computing | self.in_item)) / len(others) if others else 0.0

    def run(self, device: str, alone_s: float, together_s: float):
        """Compute one item on ``device`` (already held) at the rate its neighbours allow."""
        others, together = self.neighbours[device], self.together[device]
        left = 1.0  # share of the item's work still to do
        with self.hold([device]):
            while left > 1e-12:
                busy = len(others & self.computing) / together
                whole_s = alone_s + (together_s - alone_s) * busy  # the item at this rate
                changed, t0 = self.changed, self.env.now
                done = self.env.timeout(left * whole_s)
                fired = yield done | changed
                if done in fired:  # (a Timeout counts as triggered from its creation: ask the condition)
                    break
                left -= (self.env.now - t0) / whole_s if whole_s > 0 else left


def run(spec: PipelineSpec) -> list[Event]:
    """Play the pipeline out; return every compute, all-reduce and transfer interval."""
    env = simpy.Environment()
    n_items = len(spec.items)
    n_stages = len(spec.stages)
    devices = {d: simpy.Resource(env, capacity=1) for st in spec.stages for d in st.devices}
    link_names = {name for hop in spec.hops if hop is not None for name in hop.links}
    for st in spec.stages:
        link_names.update(st.allreduce_links, *st.scatter_links)
    links = {name: simpy.Resource(env, capacity=1) for name in sorted(link_names)}
    # done[j][i]: stage j finished item i; arrived[j][i]: item i's input is on stage j's first device.
    done = [[env.event() for _ in range(n_items)] for _ in range(n_stages)]
    arrived: list[list[simpy.Event] | None] = [None] + [[env.event() for _ in range(n_items)]
                                                         for _ in range(1, n_stages)]
    log: list[tuple] = []
    phases = spec.phases or ["prefill"] * n_items
    items = [(mb, sl, ph) for (mb, sl), ph in zip(spec.items, phases)]
    fb = spec.feedback
    fed: dict[int, simpy.Event] = {}  # decode item -> its ids are back on stage 0
    coloc = _Colocation(env, spec.colocated)
    if fb is not None:
        fed = {i: env.event() for chain in fb.chains for i, _ in chain}
        links.update({name: simpy.Resource(env, capacity=1) for name in fb.links if name not in links})

    def stage(j: int):
        st = spec.stages[j]
        res = [devices[d] for d in st.devices]
        compute = np.asarray(st.compute_s, float).tolist()
        alone = (np.asarray(st.alone_compute_s, float).tolist()
                 if st.alone_compute_s is not None and st.tp == 1 and st.devices[0] in coloc.neighbours else None)
        for i in range(n_items):
            if j > 0:
                yield arrived[j][i]
            elif i in fed:
                yield fed[i]
            if alone is not None:
                with res[0].request() as req:
                    yield req
                    t0 = env.now
                    yield from coloc.run(st.devices[0], alone[i], compute[i])
                _record_stage(log, j, st, i, items[i], t0, env.now)
            elif st.allreduce_s is not None:
                yield from _tp_phases(env, log, links, j, st, i, items[i], res, compute[i], coloc)
            else:
                with coloc.hold(st.devices):
                    t0 = yield from _occupy(env, res, compute[i])
                _record_stage(log, j, st, i, items[i], t0, env.now)
            done[j][i].succeed()

    def hop(j: int):
        h = spec.hops[j]
        res = [links[name] for name in sorted(h.links)]  # one global order: no deadlock
        hold = np.asarray(h.hold_s, float).tolist()
        lat = np.asarray(h.latency_s, float).tolist()
        nbytes = np.asarray(h.nbytes, float).tolist()
        mb_sl = items
        for i in range(n_items):
            yield done[j - 1][i]
            if hold[i] <= 0 and lat[i] <= 0:
                arrived[j][i].succeed()
                continue
            t0 = yield from _occupy(env, res, hold[i])
            log.append(("transfer", h.src, h.dst, h.bottleneck, j, mb_sl[i], t0, env.now, nbytes[i]))
            # The wire is free again; the bytes are still in flight for the latency.
            if lat[i] > 0:
                env.timeout(lat[i]).callbacks.append(lambda _ev, e=arrived[j][i]: e.succeed())
            else:
                arrived[j][i].succeed()

    def feedback(chain):
        res = [links[name] for name in sorted(fb.links)]
        for i, deps in chain:
            yield env.all_of([done[n_stages - 1][k] for k in deps])
            hold, lat = float(fb.hold_s[i]), float(fb.latency_s[i])
            if hold <= 0 and lat <= 0:
                fed[i].succeed()
                continue
            t0 = yield from _occupy(env, res, hold)
            log.append(("transfer", fb.src, fb.dst, fb.bottleneck, 0, items[i], t0, env.now, float(fb.nbytes[i])))
            if lat > 0:
                env.timeout(lat).callbacks.append(lambda _ev, e=fed[i]: e.succeed())
            else:
                fed[i].succeed()

    for j in range(n_stages):
        env.process(stage(j))
        if j > 0:
            env.process(hop(j))
    if fb is not None:
        for chain in fb.chains:
            env.process(feedback(chain))
    env.run()
    unfinished = [j for j in range(n_stages) if n_items and not done[j][-1].processed]
    if unfinished:  # cannot happen with in-order stages and ordered link requests; guard anyway
        raise RuntimeError(f"simulation stalled: stages {unfinished} did not finish")
    return [_event(rec) for rec in log]


def _tp_phases(env, log, links, j, st, i, mb_sl, res, total_s, coloc: _Colocation):
    """A tensor-parallel stage on one item: hold the group's devices throughout; forward the
    input to each peer (holding that link), run the shards, then all-reduce (holding the
    ring's links).  Links are requested in one global (sorted) order, and a stage asks for
    links only while holding its devices, never the reverse, so nothing can deadlock."""
    with contextlib.ExitStack() as stack:
        yield from _hold_all(res, stack)
        stack.enter_context(coloc.in_tp_item(st.devices))
        scatter = 0.0
        nb = float(st.scatter_bytes[i]) if st.scatter_bytes is not None else 0.0
        if st.scatter_s is not None:
            for k, peer in enumerate(st.devices[1:]):
                dt = float(st.scatter_s[k][i])
                if dt <= 0:
                    continue
                names = sorted(st.scatter_links[k]) if st.scatter_links else []
                t0 = yield from _occupy(env, [links[x] for x in names], dt) if names else _wait(env, dt)
                # drawn on the sender as before (no ``link``: a transfer with a link is a hop
                # between stages to the readers of a timeline), though it held the link
                log.append(("transfer", st.devices[0], peer, None, j, mb_sl, t0, env.now, nb))
                scatter += dt
        ar = float(st.allreduce_s[i])
        busy = max(total_s - scatter - ar, 0.0)  # the shards (and any fixed per-item overhead)
        t0 = env.now
        with coloc.hold(st.devices):  # computing, for co-located neighbours: the shards only
            yield env.timeout(busy)
        for k, d in enumerate(st.devices):
            dt = float(st.device_compute_s[k][i]) if st.device_compute_s is not None else busy
            log.append(("compute", d, None, None, j, mb_sl, t0, t0 + min(dt, busy), 0.0))
        if st.allreduce_busy_s is not None:
            ar += (float(st.allreduce_busy_s[i]) - ar) * coloc.busy_outside(st.devices)
        if ar > 0:
            names = sorted(st.allreduce_links)
            t0 = yield from _occupy(env, [links[x] for x in names], ar) if names else _wait(env, ar)
            for d in st.devices:
                log.append(("allreduce", d, None, None, j, mb_sl, t0, env.now, 0.0))


def _wait(env, duration_s: float):
    t0 = env.now
    yield env.timeout(duration_s)
    return t0


def _record_stage(log: list, j: int, st: StageSpec, i: int, mb_sl, t0: float, t1: float) -> None:
    if st.tp == 1:
        log.append(("compute", st.devices[0], None, None, j, mb_sl, t0, t1, 0.0))
        return
    # Tensor parallel: the devices were held together for [t0, t1]; show what they did.
    # Phases: the first device forwards the input to its peers one after another, then every
    # device runs its shard, then the all-reduces (the rest of the stage's time).
    t = t0
    if st.scatter_s is not None:
        nb = float(st.scatter_bytes[i]) if st.scatter_bytes is not None else 0.0
        for k, peer in enumerate(st.devices[1:]):
            dt = float(st.scatter_s[k][i])
            if dt > 0:
                end = min(t + dt, t1)
                log.append(("transfer", st.devices[0], peer, None, j, mb_sl, t, end, nb))
                t = end
    comp_end = t
    for k, d in enumerate(st.devices):
        dt = float(st.device_compute_s[k][i]) if st.device_compute_s is not None else t1 - t
        end = min(t + dt, t1)
        log.append(("compute", d, None, None, j, mb_sl, t, end, 0.0))
        comp_end = max(comp_end, end)
    if t1 > comp_end:
        for d in st.devices:
            log.append(("allreduce", d, None, None, j, mb_sl, comp_end, t1, 0.0))


def _event(rec: tuple) -> Event:
    kind, device, dst, link, j, (mb, sl, phase), t0, t1, nbytes = rec
    # Validated construction: in pydantic 2 it is faster than model_construct.
    return Event(device=device, kind=kind, stage=j, micro_batch=mb, slice=sl,
                 start_s=t0, end_s=t1, dst=dst, nbytes=nbytes, link=link, phase=phase)
