"""What the profiling processes time together: one-way message times between every pair of
devices (ping-pong), the decode step loop's hops, and each tensor-parallel group's
all-reduces (``hpipe.runtime.profiler`` has the whole method)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np

from hpipe.runtime import emulation

if TYPE_CHECKING:
    from hpipe.runtime.profile_worker import ProfileJob


class Wire:
    """Moves messages between two profiling processes as the stage loop moves activations:
    device tensors over NCCL; over gloo through host memory, so a GPU endpoint pays the
    device-to-host and host-to-device copies that a GPU stage pays."""

    def __init__(self, job: ProfileJob, timeout: timedelta):
        import torch

        self.device = torch.device(job.torch_device)
        self.nccl = job.backend == "nccl"
        self.comm = self.device if self.nccl else torch.device("cpu")
        self.timeout = timeout

    def tensor(self, numel: int, dtype=None):
        import torch

        return torch.zeros(numel, dtype=dtype or torch.uint8, device=self.device)

    def send(self, t, peer: int) -> None:
        import torch.distributed as dist

        dist.send(t.to(self.comm), peer)

    def recv(self, t, peer: int) -> None:
        import torch
        import torch.distributed as dist

        buf = t if t.device == self.comm else torch.empty_like(t, device=self.comm)
        dist.irecv(buf, peer).wait(self.timeout)
        if buf is not t:
            t.copy_(buf)
        self.sync()

    def sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def barrier(self, group=None) -> None:
        import torch.distributed as dist

        if self.nccl:
            dist.barrier(group=group, device_ids=[self.device.index or 0])
        else:
            dist.barrier(group=group)


def ping_pong(job: ProfileJob, report) -> list[dict]:
    """Every pair of devices in turn: one-way time of each message size (half a round trip)."""
    import torch

    links = []
    world = len(job.devices)
    wire = Wire(job, timedelta(seconds=job.timeout_s))
    for i in range(world):
        for j in range(i + 1, world):
            wire.barrier()
            if job.rank not in (i, j):
                continue
            peer = j if job.rank == i else i
            one_way = []
            for size in job.link_sizes:
                hdr = wire.tensor(5, torch.int64)
                buf = wire.tensor(size)
                wire.sync()
                times = []
                for rep in range(2 + job.link_repeats):
                    if job.rank == i:
                        t0 = time.perf_counter()
                        wire.send(hdr, peer)
                        wire.send(buf, peer)
                        wire.recv(hdr, peer)
                        wire.recv(buf, peer)
                        if rep >= 2:
                            times.append((time.perf_counter() - t0) / 2)
                    else:
                        wire.recv(hdr, peer)
                        wire.recv(buf, peer)
                        wire.send(hdr, peer)
                        wire.send(buf, peer)
                # The lower quartile: a round trip only gets slower when the peer waits for a
                # CPU, so the low end is what the link costs on a quiet machine.
                one_way.append(float(np.percentile(times, 25)) if times else 0.0)
            if job.rank == i:
                links.append({"between": [job.devices[i], job.devices[j]], "sizes_bytes": list(job.link_sizes),
                              "one_way_s": one_way})
                report("link", 1)  # once per pair, as the bar's total counts them
    wire.barrier()
    return links


def step_probes(job: ProfileJob, report, chain) -> tuple[list[dict], dict | None]:
    """Every pair of devices in turn plays a two-stage decode step loop
    (``hpipe.runtime.step_probe``): the two hops of each round (on the pair's first rank),
    and this device's chain CPU time after its waits, over all its pairs."""
    from hpipe.runtime.step_probe import probe_pair

    wire = Wire(job, timedelta(seconds=job.timeout_s))
    world = len(job.devices)
    hops_out, cpu, b2b = [], [], []
    for i in range(world):
        for j in range(i + 1, world):
            wire.barrier()
            if job.rank not in (i, j):
                continue
            hops, c, c0 = probe_pair(job.rank, i, j, chain, rounds=job.link_repeats, warmup=2,
                                     timeout_s=job.timeout_s)
            cpu += c
            b2b += c0
            if job.rank == i:
                b = chain.point[2]
                hops_out.append({"between": [job.devices[i], job.devices[j]], "point": list(chain.point),
                                 "forward_bytes": b * chain.d_model * chain.dtype_bytes, "return_bytes": b * 8,
                                 "hops_s": hops})
                report("link", 1)
    wire.barrier()
    # thread_time ticks may be coarser than a tiny chain: never report zero
    after = ({"point": list(chain.point), "cpu_seconds": [max(x, 1e-7) for x in cpu],
              "back_to_back_cpu_seconds": max(float(np.mean(b2b)), 1e-7)} if cpu and b2b else None)
    return hops_out, after


ALL_REDUCE_CHAIN = 32
"""All-reduces timed per message size (see ``all_reduces``)."""


def all_reduces(job: ProfileJob, report) -> list[dict]:
    """Every tensor-parallel group in turn: time of an all-reduce of each message size.

    Timed as a whole rather than built from the ping-pong: gloo's all-reduce on CPU costs
    several times what a ring of one-way sends predicts (1.2 ms against 0.5 ms for 4 KiB
    between two processes here), and a tensor-parallel stage does two per block.

    Timed as a stage pays them: a chain of ``ALL_REDUCE_CHAIN`` all-reduces, each of a tensor
    that the group's shards have just computed, and the *mean* of their times, since a
    stage's step pays their sum.  The tensor is the output of an MLP shard of the scenario's
    own model at the message's rows (``b * n`` tokens of ``d_model``), computed fresh before
    every call, as the runtime reduces each split unit's output: an all-reduce that follows a
    shard's compute costs more than one that follows another all-reduce.  Two cores of a quiet
    2-core Intel Xeon VM (gVisor), 2 MiB, last member in to last member out, 2026-12-02:
    2.8-3.1 ms back to back (what a chain with a few microseconds of compute between its
    calls timed), 3.7-3.9 ms after a GEMM, 3.8 ms mean inside a real tensor-parallel prefill
    (local-cpu, tp-terapipe), where the profile's chain priced it at 2.2-2.5 ms.  A device with
    a ``cpu_quota`` paces the shard as the runtime does (``emulation.Pace``): when slower
    devices were emulated by a CFS quota, an unpaced shard's bursts ran into the cgroup's
    throttling inside the all-reduce (2 MiB at 11 ms).

    Each call is timed from the last member in to the last member out: a member that arrives
    early waits for the others, and the cost model charges that wait already, as the slowest
    shard's compute; what the stage pays on top is the rest, up to when every member can go on
    (the early one's wake-up included).  Timed on the first member alone, the chain priced
    local-cpu-4dev's pairs at 0.87 and 1.87 ms, while inside their decode steps the last
    member's all-reduces took 0.44-0.95 ms on average (2-core Intel Xeon VM, 2026-12-02), which
    made most of the tensor-parallel plans' 17-18 ms a token of over-prediction there.  (The
    last member's own time alone, tried first, leaves the early member's wake-up out.)

    The sizes timed are whole rows of ``d_model`` (the runtime reduces nothing else): each of
    ``job.link_sizes`` rounded to rows, at least one, and the entry records the bytes reduced.

    Two more things a tensor-parallel stage meets in a run, timed in the same chain (method 4):

    * **Neighbours computing.**  With two or more groups, every group then runs its chain at
      once, size by size (``seconds_together``).  A member that waits in an all-reduce sleeps, and wakes on a
      core that a co-located device of another stage is computing on.  In a measured
      tp-terapipe run on local-cpu-4dev (two TP pairs, each member sharing its core with a member
      of the other pair; 2-core Intel Xeon VM, quiet, 2026-12-03) the all-reduces of the first
      slice, the other pair idle, took 0.4-0.5 ms last member in to last member out, and those of
      the later slices 2.4-3.0 ms on average, the other pair computing; timed so, 0.9-1.6 ms
      alone against 3.6-4.0 ms together at 256 KiB.
    * **Shards computed between all-reduces.**  The runtime runs each split unit's shard right
      after the previous all-reduce, paced.  Its CPU time there (``shard_after_wait_cpu_s``)
      came out 4-27% above the same shard's back to back (``shard_cpu_s``, the whole group at
      once, as the unit sweeps time it) on that VM, the more for small shards; tp-terapipe's
      shards between all-reduces ran 1.2-1.4x their back-to-back price in that run."""
    import torch
    import torch.distributed as dist

    from hpipe.models import check_tensor_parallel
    from hpipe.runtime.model import TORCH_DTYPES, build_units
    from hpipe.runtime.weights import RandomWeights

    wire = Wire(job, timedelta(seconds=job.timeout_s))
    spec, dtype = job.spec, TORCH_DTYPES[job.dtype]
    row_bytes = spec.d_model * dtype.itemsize
    rows = sorted({max(1, round(size / row_bytes)) for size in job.link_sizes})
    g = torch.Generator().manual_seed(job.rank)
    mlp = next(i for i, u in enumerate(spec.units()) if u.kind == "mlp")
    pace = emulation.Pace.of(job.placement if wire.device.type == "cpu" else None)  # as the runtime paces
    # collective: every process creates every group, in order.  A host with more devices than
    # the model splits into is never one TP stage: nothing to price.
    groups = [(ranks, dist.new_group(ranks)) for ranks in job.tp_groups]
    timed = [(ranks, group) for ranks, group in groups if check_tensor_parallel(spec, len(ranks)) is None]
    mine = next(((ranks, group) for ranks, group in timed if job.rank in ranks), None)
    shard = None
    if mine is not None:
        ranks, group = mine
        shard = build_units(spec, mlp, mlp + 1, RandomWeights(spec, seed=0), dtype=job.dtype, device=wire.device,
                            tp_rank=ranks.index(job.rank), tp_size=len(ranks), all_reduce=lambda x: x)[0]
    inputs = {r: torch.randn(1, r, spec.d_model, generator=g).to(wire.device, dtype) for r in rows}  # (1, rows, D)

    def one_size(group, r, back_to_back: bool):
        """(seconds, shard CPU back to back or None, shard CPU after an all-reduce) at r rows."""
        x = inputs[r]
        shard_cpu: list[float] = []

        def produce():  # the shard's output, fresh each call, as the runtime reduces it
            pace.mark()
            c0 = time.thread_time()
            y = shard(x, 0, None)
            shard_cpu.append(time.thread_time() - c0)
            pace.wait()  # at the device's speed, as the runtime's shard before its all-reduce
            return y

        with torch.inference_mode():  # as the stage loop runs its units and their all-reduces
            b2b = shard_back_to_back_cpu_s(shard, x, group, wire) if back_to_back else None
            secs = all_reduce_chain_s(produce, group, wire)
        return secs, b2b, float(np.median(shard_cpu[2:]))  # the chain's timed calls

    out = None
    for ranks, group in groups:  # each group in turn, the other devices idle
        if mine is not None and mine[0] is ranks:
            out = [one_size(group, r, back_to_back=True) for r in rows]
        if job.rank == 0:
            report("link", 1)  # once per group, as the bar's total counts them
        wire.barrier()
    together = None
    if len(timed) > 1:  # every group at once, size by size, so that each member's neighbours are busy
        together = []
        for r in rows:
            wire.barrier()  # every rank, members or not: the groups start each size together
            if mine is not None:
                together.append(one_size(mine[1], r, back_to_back=False)[0])
        wire.barrier()  # no rank leaves while another group still reduces
    if mine is None:
        return []
    ranks, group = mine
    secs, b2b, after = (list(col) for col in zip(*out))
    cpu = torch.tensor([b2b, after], dtype=torch.float64, device=wire.device)  # (2, sizes)
    every = [torch.empty_like(cpu) for _ in ranks]
    dist.all_gather(every, cpu, group=group)
    if job.rank != ranks[0]:
        return []
    # On a GPU the thread's CPU time is the kernel launches', not the shard's: no ratio there.
    # thread_time ticks may be coarser than a tiny shard: never record zero (the fitted model
    # takes no ratio from a size whose back-to-back time is at that floor).
    cpu_timed = wire.device.type == "cpu"
    return [{"devices": [job.devices[r] for r in ranks], "sizes_bytes": [r * row_bytes for r in rows],
             "seconds": secs, "seconds_together": together,
             "shard_cpu_s": [[max(v, 1e-7) for v in m[0].tolist()] for m in every] if cpu_timed else None,
             "shard_after_wait_cpu_s": [[max(v, 1e-7) for v in m[1].tolist()] for m in every] if cpu_timed else None}]


def shard_back_to_back_cpu_s(shard, x, group, wire, calls: int = 8) -> float:
    """Median CPU seconds of ``shard(x)`` run ``calls`` times back to back (after two untimed),
    the whole group starting together, unpaced: as the unit sweeps time a shard."""
    wire.barrier(group)
    cpu = []
    for rep in range(2 + calls):
        c0 = time.thread_time()
        shard(x, 0, None)
        if rep >= 2:
            cpu.append(time.thread_time() - c0)
    return float(np.median(cpu))


def all_reduce_chain_s(produce, group, wire) -> float:
    """Mean seconds of a chain of ``ALL_REDUCE_CHAIN`` all-reduces over ``group`` (after two
    untimed), each of the tensor ``produce()`` returns; each call counted from the moment its
    last member entered it to the moment its last member left it (``all_reduces``).  The
    members are processes of one host (a tensor-parallel group never spans hosts), so their
    ``perf_counter`` clocks agree.  Every member of the group calls it and gets the same figure."""
    import torch
    import torch.distributed as dist

    stamps = []  # (in, out) of each timed call on this member's clock
    wire.barrier(group)
    for rep in range(2 + ALL_REDUCE_CHAIN):
        x = produce()
        wire.sync()
        t0 = time.perf_counter()
        dist.all_reduce(x, group=group)
        wire.sync()
        if rep >= 2:
            stamps.append((t0, time.perf_counter()))
    mine = torch.tensor(stamps, dtype=torch.float64, device=wire.device)  # (calls, 2)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    both = torch.stack(every).max(dim=0).values  # (calls, 2): the last member in, the last member out
    return float((both[:, 1] - both[:, 0]).mean())
