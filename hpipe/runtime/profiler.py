"""`hpipe profile`: time the runtime's own unit modules and links on the devices a scenario names.

What a stage runs is a chain of units (embedding, attention, MLP, ..., head)
over a slice of n tokens after c context tokens at batch b, with a KV cache.
The profiler runs exactly that code (``hpipe.runtime.model``) in one process
per scenario device, placed as the runtime places it (threads, cores, cgroup
CPU quota, network namespace: ``hpipe.runtime.emulation``), all devices at
once as in a pipeline, and times every unit call of a short chain
(embed, a few blocks, head) with ``perf_counter``.  Several distinct blocks,
not one repeated, and together at least twice the device's last-level cache
(L3 of the CPU, L2 of a GPU), so weights stream from memory as in a real stage
instead of staying in cache: with two blocks of a 31M-parameter model (12 MB,
inside a 32 MB L3) the profile was 20% faster than the stages it predicted.

The grid is swept ``warmup`` times untimed, then ``repeats`` times; a
point's figure is the trimmed mean of its samples (the middle 60%): robust to
the odd preemption by other processes, yet, unlike the median, still an
average over the slow calls every run pays too.

Each call is also timed in CPU time of the calling thread (``thread_time``; a point's
figure is the plain mean, see ``summary``):
the fitted model works on it by default, since other processes competing for
the cores inflate wall time but hardly CPU time.  ``cpu_share`` (CPU time over
wall time) says how busy the machine was.

A device whose ``runtime.device`` is ``cuda:N`` is timed on that GPU, with CUDA
events around each unit of the chain (no synchronisation between units, so
launch overhead is hidden or shown as in a stage); it has no CPU time.

Alone: the devices of one machine share its last-level cache and memory bus, so a unit
runs slower while a neighbour computes (attention at 32 tokens on the 2-core AMD EPYC VM:
1.75 ms alone, 2.1-2.6 ms beside a busy core).  A pipeline leaves devices idle part of the
time (filling, draining, one-stage plans), so after the sweeps above each CPU device in turn
sweeps its units again while the others wait at a barrier (``DeviceProfile.alone``); the
fitted model prices a unit between the two by how many neighbours are busy.  (A device
done with its timed sweeps first keeps computing, untimed, until all are done, so that
the slower devices' last sweeps are not timed beside an idle neighbour.)

Links: after the units, the device processes join one group with the backend
the runtime would use (NCCL when every device is a GPU, else gloo, over the
emulated network when there is one) and each pair ping-pongs messages of
growing size, framed as the stage loop frames them (a 5-int64 header, then
the activation bytes; a GPU endpoint over gloo pays the copies through host
memory, as a GPU stage does); half the round trip is the one-way time (its
lower quartile over the repeats).

Decode step loop: when the scenario generates tokens and every device is a CPU, each pair
then plays a two-stage decode step loop (``hpipe.runtime.step_probe``): a message handed by
the runtime's kind of receiving thread to a loop that sat idle, and a decode chain run after
that wait.  The fitted model adds the hand-over to decode hops and prices the decode steps
of a multi-stage plan by the probe's ratio (on local-cpu: hops of 1.6-1.8 ms between stages'
compute stamps against the ping-pong's 0.28 ms, compute 20-27% over the sweeps).

Codecs: each activation codec this torch has (``hpipe.runtime.codecs``: int8, fp8, int4) is
timed encoding and decoding activations of a few sizes (``codec_sizes``: a decode step of one
sequence and of the batch, a slice of the token granularity, the whole prefill), on the
device and in the device's placement, ``warmup`` + ``repeats`` sweeps as for the units.  The
fitted model prices a boundary's encode and decode from these instead of the memory-pass
model (on this CPU the codecs' unfused ops made the passes model a rough guess).

The profile records the machine, the library versions and the date (see
``hpipe.costmodels.profile``).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import platform
import queue as queue_mod
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np

from hpipe.costmodels.profile import (PROFILE_FORMAT, PROFILER_METHOD, AfterWait, AllReduceProfile, CodecSamples, DeviceProfile, EmulatedLink,
                                      Hardware, LinkProfile, Profile, Settings, ShardSamples, SpeedProbe, StepHopProfile,
                                      UnitSamples, Versions)
from hpipe.errors import HpipeError, WorkerError
from hpipe.models import decode_steps, positions_used
from hpipe.procwatch import run_watched
from hpipe.runtime import emulation
from hpipe.runtime import speed

TRIM = 0.2  # trimmed mean: drop this share of samples at each end
CHAIN_MIN_BLOCKS = 2  # distinct transformer blocks in the timed chain, at least
CACHE_MULTIPLE = 2  # ... and enough of them that their weights outweigh the last-level cache this much


# ---- the grid ------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    points: tuple[tuple[int, int, int], ...]
    """(n, c, b): slice tokens, context tokens, batch."""

    def __len__(self):
        return len(self.points)


def default_grid(setup, quick: bool = False) -> Grid:
    """Shapes a plan of this scenario can produce: slice lengths (multiples of the token
    granularity) from the smallest to the whole sequence, contexts from none (the first
    slice) to the longest a slice of that length can have, batches 1 to the batch size.
    ``quick``: fewer points, for tests."""
    L, g, B = setup.seq_len, setup.granularity, setup.batch_size
    ns = {g, L}
    k = g
    while k < L:
        ns.add(k)
        if not quick and k * 3 // 2 % g == 0 and k * 3 // 2 < L:
            ns.add(k * 3 // 2)  # between the powers of two, where the DP's slices often fall
        k *= 2
    bs = sorted({1, B, (B + 1) // 2}) if not quick else sorted({1, B})
    pts = set()
    for n in sorted(ns):
        room = L - n
        cs = {0, room}
        if not quick:
            cs |= {room // 2 // g * g, min(g, room)}
        for c in cs:
            for b in bs:
                pts.add((n, c, b))
    pts |= set(decode_points(setup, quick))
    return Grid(tuple(sorted(pts, key=lambda p: (p[0] * p[2], p[1], p[2]))))


def decode_points(setup, quick: bool = False) -> list[tuple[int, int, int]]:
    """Generation: decode steps (n = 1) over the contexts the scenario's steps see (prompt to
    prompt + output) and batches from one sequence to the batch, so the fitted model's decode
    figures are measured, not extrapolated from prefill slices.  None where no decode step
    runs: prefill only, or one new token (it comes from the prefill's logits)."""
    from hpipe.costmodels.fitted import MIN_DECODE_POINTS

    if not has_decode_steps(setup):
        return []
    L, B, N = setup.seq_len, setup.batch_size, setup.output_tokens
    # the context of the last decode step, which is also the position it feeds: step t feeds
    # position L + t, the last step is t = N - 2 (the last new token is never fed back); a
    # GPT at its last learned position has none beyond it to time
    last = positions_used(L, N) - 1
    cs = {max(L // 4, 1), L, (L + last) // 2, last} if not quick else {L, last}
    bs = sorted({1, B, (B + 1) // 2}) if not quick else sorted({1, B})
    if not quick and len(cs) * len(bs) < MIN_DECODE_POINTS:  # one sequence, one step: a fit of its own still
        cs.add(max(L // 2, 1))
    return [(1, c, b) for c in sorted(cs) for b in bs]


def has_decode_steps(setup) -> bool:
    """Whether a run makes decode steps: two or more new tokens per sequence."""
    return decode_steps(setup.output_tokens) > 0


def codec_sizes(setup) -> list[int]:
    """Activation sizes (values) the codecs are timed at: a decode step of one sequence and of
    the batch, a slice of the token granularity (one sequence, the batch), half and all of the
    batch's prefill."""
    d, L, g, B = setup.model.d_model, setup.seq_len, setup.granularity, setup.batch_size
    return sorted({d, d * B, d * g, d * g * B, d * L * B // 2, d * L * B})


def link_sizes(setup) -> list[int]:
    """Message sizes for the ping-pong: 1 KiB up to the largest activation a stage sends."""
    biggest = setup.batch_size * setup.seq_len * setup.model.d_model * setup.dtype_bytes
    sizes, s = [], 1024
    while s < biggest:
        sizes.append(s)
        s *= 4
    sizes.append(int(biggest))
    return sizes


# ---- what a profiling worker does -------------------------------------------------
@dataclass
class ProfileJob:
    """Everything one profiling process needs (picklable)."""

    rank: int
    devices: list[str]
    spec: object
    dtype: str
    seq_len: int
    """Positions the KV caches hold: the prompt plus the generated tokens."""
    grid: Grid
    warmup: int
    repeats: int
    placement: emulation.WorkerPlacement
    init_method: str
    link_sizes: list[int]
    link_repeats: int
    measure_links: bool
    tp_groups: list[list[int]] = field(default_factory=list)
    """Ranks of each host's devices (two or more): the tensor-parallel groups whose
    all-reduce is timed."""
    torch_device: str = "cpu"
    """Where this device's units run: cpu or cuda:N (the scenario's runtime.device)."""
    tp: int = 1
    """Devices of this device's host: the tensor-parallel degree of the stage the planners
    give a host, whose shards are timed too (1: none)."""
    backend: str = "gloo"
    """The torch.distributed backend the runtime would join these devices with."""
    timeout_s: float = 120.0
    """torch.distributed timeout: a device done with its units early (a GPU beside CPUs)
    waits this long for the slowest at the rendezvous; a dead worker stops the run sooner
    (the parent watches them)."""
    env: dict[str, str] = field(default_factory=dict)
    codec_sizes: list[int] = field(default_factory=list)
    """Activation sizes (values) each codec is timed at (none: codecs not timed)."""
    step_probe: bool = False
    """Play a two-stage decode step loop between every pair (``step_probe``): the scenario
    generates tokens, every device is a CPU (gloo), and the links are measured."""
    alone_ranks: list[int] = field(default_factory=list)
    """Ranks that, in this order, time their units again while all others wait idle (the CPU
    devices, when there are two or more: they share the machine's caches and memory bus)."""


def alone_repeats(repeats: int) -> int:
    """Timed sweeps of a device's units alone: half the profile's.  What the fitted model takes
    from them is one ratio (alone over busy) fitted across the whole grid, which averages the
    noise of single points, and the sweeps run one device at a time (four devices with CPU
    quotas of 0.4-0.6 would otherwise triple the profile's time)."""
    return max(1, (repeats + 1) // 2)


def _trimmed_mean(xs) -> float:
    xs = np.sort(np.asarray(xs, float))
    k = int(len(xs) * TRIM)
    return float(xs[k:len(xs) - k].mean()) if len(xs) > 2 * k else float(xs.mean())


def _spread(xs) -> float:
    q25, q50, q75 = np.percentile(xs, [25, 50, 75])
    return float((q75 - q25) / q50) if q50 > 0 else 0.0


def _time_units(job: ProfileJob, report, turns=None, finished=None) -> tuple[dict[str, dict], list[dict],
                                                                            float | None, dict, object]:
    """Samples per unit kind, per tensor-parallel shard kind, the share of wall time this
    process had a CPU (None on a GPU), the units timed alone (empty unless ``turns``), and
    the chain at a decode point for the step-loop probe (``step_probe.DecodeChain``; None
    without decode points or on a GPU).

    ``finished`` (a counter shared by every profiling process): a device done with its timed
    sweeps keeps running the chain, untimed, until every device is done -- a fast device that
    went idle would leave a slower one's last sweeps timed beside an idle neighbour (a device
    with half a core runs twice as long as a whole one).  ``turns`` (a barrier of every
    profiling process): then each device of ``job.alone_ranks`` in turn sweeps its whole units
    again while the others wait at the barrier, so the profile has each unit both beside busy
    neighbours and alone."""
    import torch

    from hpipe.runtime.model import TORCH_DTYPES, build_units, check_tensor_parallel, make_caches
    from hpipe.runtime.weights import RandomWeights

    spec = job.spec
    device = torch.device(job.torch_device)
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.set_device(device)
    n_blocks = chain_blocks(spec, job.dtype, last_level_cache_bytes(device))
    # The chain: embedding, the first n_blocks blocks, the head -- the very modules a stage builds.
    all_units = spec.units()
    blocks = list(range(1, 1 + 2 * n_blocks))
    source = RandomWeights(spec, seed=0)
    chains = {1: [u for i in [0] + blocks + [len(all_units) - 1]
                  for u in build_units(spec, i, i + 1, source, dtype=job.dtype, device=device)]}
    if job.tp > 1 and check_tensor_parallel(spec, job.tp) is None:
        # Rank 0's shard of each block, as a tensor-parallel stage of job.tp devices runs it (the
        # all-reduce is timed apart): a shard is not simply 1/tp of a unit (0.5-0.63 measured on
        # two CPU cores; smaller GEMMs on a GPU lose more).
        chains[job.tp] = [u for i in blocks for u in build_units(
            spec, i, i + 1, source, dtype=job.dtype, device=device, tp_rank=0, tp_size=job.tp,
            all_reduce=lambda x: x)]
    g = torch.Generator().manual_seed(0)
    g_dev = torch.Generator(device=device).manual_seed(0)  # fills caches where they live
    wall_cpu = [0.0, 0.0]  # seconds of wall clock and of this thread's CPU time in timed calls
    caches = {}

    def sweep(chains, warmup: int, repeats: int, samples: dict, cpu_samples: dict) -> None:
        """Passes over the whole grid, not repeats of one point back to back: a burst of
        load from another process then spoils one sample of many points, which the
        trimmed mean drops, instead of every sample of a few points."""
        for rep in range(warmup + repeats):
            for (n, c, b) in job.grid.points:
                x = ids[(n, c, b)]
                for tp, units in chains.items():
                    inp = x if tp == 1 else hidden[(n, c, b)]  # shard chains start at a block
                    times, cpu_times = (_gpu_chain if gpu else _cpu_chain)(units, inp, c, caches[(tp, b)])
                    if rep < warmup:
                        continue
                    for u, dt, dcpu in zip(units, times, cpu_times):
                        samples.setdefault((tp, u.unit.kind), {}).setdefault((n, c, b), []).append(dt)
                        if dcpu is not None:
                            cpu_samples.setdefault((tp, u.unit.kind), {}).setdefault((n, c, b), []).append(dcpu)
                            wall_cpu[0] += dt
                            wall_cpu[1] += dcpu
            report("progress", 1)

    samples: dict[tuple, dict[tuple, list]] = {}  # (tp, kind) -> point -> seconds
    cpu_samples: dict[tuple, dict[tuple, list]] = {}
    alone: dict[tuple, dict[tuple, list]] = {}
    alone_cpu: dict[tuple, dict[tuple, list]] = {}
    with torch.inference_mode():
        for tp, units in chains.items():
            for b in sorted({b for _, _, b in job.grid.points}):
                caches[(tp, b)] = make_caches(units, b, job.seq_len)
                for cache in caches[(tp, b)].values():  # uninitialised memory may hold NaNs or denormals
                    cache.k.normal_(generator=g_dev)
                    cache.v.normal_(generator=g_dev)
        ids = {p: torch.randint(0, spec.vocab_size, (p[2], p[0]), generator=g).to(device) for p in job.grid.points}
        hidden = {p: torch.randn(p[2], p[0], spec.d_model, generator=g).to(device, TORCH_DTYPES[job.dtype])
                  for p in job.grid.points} if len(chains) > 1 else {}
        sweep(chains, job.warmup, job.repeats, samples, cpu_samples)
        if finished is not None:
            with finished.get_lock():
                finished.value += 1
            while finished.value < len(job.devices):
                for p in job.grid.points:
                    if finished.value >= len(job.devices):
                        break
                    (_gpu_chain if gpu else _cpu_chain)(chains[1], ids[p], p[1], caches[(1, p[2])])
        if turns is not None and job.alone_ranks:
            for rank in job.alone_ranks:
                turns.wait(timeout=job.timeout_s)  # everyone is idle from here ...
                if rank == job.rank:  # one sweep to warm this device's caches again, then the repeats
                    sweep({1: chains[1]}, min(job.warmup, 1), alone_repeats(job.repeats), alone, alone_cpu)
                turns.wait(timeout=job.timeout_s)  # ... until this device is done

    def summary(key, samples, cpu_samples) -> dict:
        by_point = samples[key]
        pts = sorted(by_point)
        out = {"n": [p[0] for p in pts], "c": [p[1] for p in pts], "b": [p[2] for p in pts],
               "seconds": [_trimmed_mean(by_point[p]) for p in pts],
               "spread": [_spread(by_point[p]) for p in pts]}
        if key in cpu_samples:  # thread_time ticks coarser than a tiny call can take: never report zero
            # the plain mean, not trimmed: CPU time has no preemption spikes to drop, and its slow
            # tail (a call after other processes evicted the caches) is paid by every run too --
            # a trimmed mean of 5 repeats dropped it and predicted runs too fast
            out["cpu_seconds"] = [max(float(np.mean(cpu_samples[key][p])), 1e-7) for p in pts]
        return out

    kinds = ("embed", "attn", "mlp", "head")
    units_out = {kind: summary((1, kind), samples, cpu_samples) for kind in kinds}
    probe = None
    decode_pts = [p for p in job.grid.points if p[0] == 1 and p[1] > 0]
    if decode_pts and not gpu:
        # The step-loop probe's point: the batch's decode step at the middle context timed.
        bmax = max(p[2] for p in decode_pts)
        cs = sorted(p[1] for p in decode_pts if p[2] == bmax)
        point = (1, cs[len(cs) // 2], bmax)
        units1, cache1, x1 = chains[1], caches[(1, point[2])], ids[point]

        pace = emulation.Pace.of(job.placement)  # the runtime's decode step paces itself too

        def run_chain(paced: bool = True):
            pace.mark()
            t0 = time.perf_counter()
            with torch.inference_mode():
                _, cpu_times = _cpu_chain(units1, x1, point[1], cache1)
            if paced:  # a round of the loop; the back-to-back runs must not idle in between
                pace.wait()
            return time.perf_counter() - t0, sum(cpu_times)

        from hpipe.models import DTYPE_BYTES
        from hpipe.runtime.step_probe import DecodeChain

        probe = DecodeChain(point=point, run=run_chain, d_model=spec.d_model, dtype_bytes=DTYPE_BYTES[job.dtype])
    shards = [{"tp": tp, "units": {kind: summary((tp, kind), samples, cpu_samples) for kind in ("attn", "mlp")}}
              for tp in chains if tp > 1]
    alone_out = {kind: summary((1, kind), alone, alone_cpu) for kind in kinds} if alone else {}
    return units_out, shards, (wall_cpu[1] / wall_cpu[0] if wall_cpu[0] > 0 else None), alone_out, probe


def _time_codecs(job: ProfileJob) -> dict[str, dict]:
    """Encode and decode seconds of every codec this torch has, per size of ``job.codec_sizes``,
    as the stage workers call them (``hpipe.runtime.codecs``) on this device."""
    import torch

    from hpipe.codecs import CODECS
    from hpipe.runtime.codecs import HAS_FP8, decode, encode
    from hpipe.runtime.model import TORCH_DTYPES

    if not job.codec_sizes:
        return {}
    device = torch.device(job.torch_device)
    gpu = device.type == "cuda"
    dtype = TORCH_DTYPES[job.dtype]
    names = [c for c in CODECS if CODECS[c].lossy and (c != "fp8" or HAS_FP8)]
    g = torch.Generator().manual_seed(1)
    d = job.spec.d_model
    # activation-like values, shaped as a message's rows of d_model: int8 and int4 lay rows
    # out channel-major, and a 1-D tensor would skip that copy
    xs = {k: torch.randn(k // d, d, generator=g).to(device, dtype) if k % d == 0
          else torch.randn(k, generator=g).to(device, dtype) for k in job.codec_sizes}

    def timed(fn):
        if gpu:
            torch.cuda.synchronize(device)
        t0, cpu0 = time.perf_counter(), time.thread_time()
        out = fn()
        if gpu:
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0, None if gpu else time.thread_time() - cpu0

    wall: dict[tuple, list] = {}
    cpu: dict[tuple, list] = {}
    with torch.inference_mode():
        for rep in range(job.warmup + job.repeats):  # sweeps, as for the units: a burst spoils one sample each
            for name in names:
                for k, x in xs.items():
                    buf, enc_s, enc_cpu = timed(lambda: encode(x, name))
                    _, dec_s, dec_cpu = timed(lambda: decode(buf, name, x.shape, dtype))
                    if rep < job.warmup:
                        continue
                    for what, dt, dc in (("encode", enc_s, enc_cpu), ("decode", dec_s, dec_cpu)):
                        wall.setdefault((name, what, k), []).append(dt)
                        if dc is not None:
                            cpu.setdefault((name, what, k), []).append(dc)
    out = {}
    for name in names:
        ks = sorted(xs)
        rec = {"values": ks}
        for what in ("encode", "decode"):
            rec[f"{what}_s"] = [max(_trimmed_mean(wall[(name, what, k)]), 1e-7) for k in ks]
            if not gpu:
                rec[f"{what}_cpu_s"] = [max(float(np.mean(cpu[(name, what, k)])), 1e-7) for k in ks]
        out[name] = rec
    return out


def _cpu_chain(units, x, c, caches) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each unit of the chain, each call timed on its own."""
    times, cpu_times = [], []
    for u in units:
        t0, cpu0 = time.perf_counter(), time.thread_time()
        x = u(x, c, caches.get(u.unit.index))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.thread_time() - cpu0)
    return times, cpu_times


def _gpu_chain(units, x, c, caches) -> tuple[list[float], list[None]]:
    """Seconds of each unit of the chain on the GPU: CUDA events between the units, one
    synchronisation at the end, as a stage runs its units back to back (no CPU time)."""
    import torch

    events = [torch.cuda.Event(enable_timing=True) for _ in range(len(units) + 1)]
    torch.cuda.synchronize()
    events[0].record()
    for u, ev in zip(units, events[1:]):
        x = u(x, c, caches.get(u.unit.index))
        ev.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) * 1e-3 for a, b in zip(events, events[1:])], [None] * len(units)


def last_level_cache_bytes(device) -> int:
    """Size of the largest cache in front of ``device``'s memory (0 when unknown)."""
    if device.type == "cuda":
        import torch

        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
    sizes = [0]
    base = "/sys/devices/system/cpu/cpu0/cache"
    with contextlib.suppress(OSError):
        for entry in os.listdir(base):
            with contextlib.suppress(OSError, ValueError):
                text = open(os.path.join(base, entry, "size")).read().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
                sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes)


def chain_blocks(spec, dtype: str, cache_bytes: int) -> int:
    """Blocks in the timed chain: at least CHAIN_MIN_BLOCKS, enough that their weights are
    CACHE_MULTIPLE times the cache, at most the model's layers."""
    from hpipe.models import DTYPE_BYTES

    units = spec.units()
    block_bytes = sum(u.weight_bytes(DTYPE_BYTES[dtype]) for u in units[1:3])  # attention + MLP
    need = -(-CACHE_MULTIPLE * cache_bytes // max(block_bytes, 1))
    return max(1, min(spec.n_layers, max(CHAIN_MIN_BLOCKS, need)))


class _Wire:
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


def _ping_pong(job: ProfileJob, report) -> list[dict]:
    """Every pair of devices in turn: one-way time of each message size (half a round trip)."""
    import torch

    links = []
    world = len(job.devices)
    wire = _Wire(job, timedelta(seconds=job.timeout_s))
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


def _step_probes(job: ProfileJob, report, chain) -> tuple[list[dict], dict | None]:
    """Every pair of devices in turn plays a two-stage decode step loop
    (``hpipe.runtime.step_probe``): the two hops of each round (on the pair's first rank),
    and this device's chain CPU time after its waits, over all its pairs."""
    from hpipe.runtime.step_probe import probe_pair

    wire = _Wire(job, timedelta(seconds=job.timeout_s))
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
"""All-reduces timed per message size (see ``_all_reduces``)."""


def _all_reduces(job: ProfileJob, report) -> list[dict]:
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

    from hpipe.runtime.model import TORCH_DTYPES, build_units, check_tensor_parallel
    from hpipe.runtime.weights import RandomWeights

    wire = _Wire(job, timedelta(seconds=job.timeout_s))
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
    last member entered it to the moment its last member left it (``_all_reduces``).  The
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


def profile_worker(job: ProfileJob, q, turns=None, finished=None) -> None:
    """Entry of one profiling process: place itself, time the units, then the links."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # started through procwatch.run_watched: it watches the parent (a parent killed with
    # SIGKILL cannot stop us) from before this module, and torch, were imported
    code = 0
    try:
        emulation.enter(job.placement)
        os.environ.update(job.env)
        import torch

        torch.set_num_threads(job.placement.threads)

        def report(kind, k):
            q.put((kind, job.rank, k))

        units, shards, cpu_share, alone, chain = _time_units(job, report, turns, finished)
        codecs = _time_codecs(job)
        links, all_reduces, step_hops, after_wait = [], [], [], None
        if job.measure_links and len(job.devices) > 1:
            import torch.distributed as dist

            dist.init_process_group(job.backend, init_method=job.init_method, rank=job.rank,
                                    world_size=len(job.devices), timeout=timedelta(seconds=job.timeout_s))
            links = _ping_pong(job, report)
            if job.step_probe:
                step_hops, after_wait = _step_probes(job, report, chain)
            all_reduces = _all_reduces(job, report)
        q.put(("done", job.rank, {"units": units, "shards": shards, "links": links, "all_reduces": all_reduces,
                                  "cpu_share": cpu_share, "codecs": codecs,
                                  "alone": alone, "step_hops": step_hops, "after_wait": after_wait}))
    except BaseException as e:
        q.put(("error", job.rank, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
        code = 1
    finally:
        q.close()
        q.join_thread()
        os._exit(code)


# ---- the parent ------------------------------------------------------------------------
def _hardware() -> Hardware:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gpus = []
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return Hardware(cpu_model=model, cpu_cores=os.cpu_count() or 0, cpus_usable=usable, gpus=gpus,
                    hostname=socket.gethostname(), os=f"{platform.system()} {platform.release()}")


def _versions() -> Versions:
    import torch

    import hpipe

    return Versions(python=platform.python_version(), torch=torch.__version__,
                    hpipe=getattr(hpipe, "__version__", "0"), numpy=np.__version__, profiler=PROFILER_METHOD)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def profile(setup, *, grid: Grid | None = None, warmup: int = 2, repeats: int = 5, link_repeats: int = 8,
            measure_links: bool = True, quick: bool = False, timeout_s: float = 1800.0, quiet: bool = False,
            on_spawn=None, time_codecs: bool = True, time_alone: bool = True) -> Profile:
    """Measure ``setup``'s devices and links (and codecs, unless ``time_codecs`` is False;
    and, unless ``time_alone`` is False, each CPU device's units alone as well as beside the
    others); the Profile (not yet written anywhere).

    ``on_spawn(pids)`` is told the worker pids (tests use it to kill a run midway)."""
    from hpipe.progress import progress

    from hpipe.runtime.here import check_placements
    from hpipe.runtime.launcher import backend_for, placements

    check_placements(setup, setup.cluster.device_ids, who="a profile measures every device of the scenario; it has")
    why = emulation.emulation_unsupported(setup)
    if why:
        raise HpipeError(f"cannot profile {setup.name} as its scenario describes it: {why}")
    density = None if grid else ("quick" if quick else "full")  # a grid given by the caller: neither
    grid = grid or default_grid(setup, quick=quick)
    devices = setup.cluster.device_ids
    # Each device where it runs for real (a cuda:N this machine lacks is an input error, as in execute).
    torch_devices = [p.device for p in placements(setup, devices)]
    backend = backend_for(torch_devices)
    sizes = link_sizes(setup)
    by_host: dict[str, list[int]] = {}
    for r, d in enumerate(devices):
        by_host.setdefault(setup.cluster.device(d).host, []).append(r)
    tp_groups = [ranks for ranks in by_host.values() if len(ranks) > 1] if measure_links else []
    n_links = (len(devices) * (len(devices) - 1) // 2 + len(tp_groups)) if measure_links else 0
    cpu_ranks = [r for r, t in enumerate(torch_devices) if t == "cpu"]
    alone_ranks = cpu_ranks if time_alone and len(cpu_ranks) > 1 else []
    step_probe = (has_decode_steps(setup) and measure_links and len(devices) > 1 and len(cpu_ranks) == len(devices)
                  and any(n == 1 and c > 0 for n, c, _ in grid.points))
    n_pairs = len(devices) * (len(devices) - 1) // 2
    results: dict[int, dict] = {}
    # the machine's speed, before and after (no worker runs then); CPU devices only
    cores = speed.cpu_device_cores(setup, devices)
    probes = [speed.probe_by_core(cores)] if cores is not None else []
    with emulation.emulate(setup, devices) as em:
        master = em.master_addr(devices[0])
        port = _free_port() if master == "127.0.0.1" else 29500 + os.getpid() % 1000
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        jobs = [ProfileJob(rank=r, devices=devices, spec=setup.model, dtype=setup.dtype,
                           seq_len=setup.seq_len + setup.output_tokens,
                           grid=grid, warmup=warmup, repeats=repeats, placement=em.worker(d),
                           init_method=f"tcp://{master}:{port}", link_sizes=sizes, link_repeats=link_repeats,
                           measure_links=measure_links, tp_groups=tp_groups, timeout_s=timeout_s,
                           torch_device=torch_devices[r], backend=backend,
                           tp=len(by_host[setup.cluster.device(d).host]),
                           env={} if em.worker(d).ifname else {"GLOO_SOCKET_IFNAME": "lo"},
                           codec_sizes=codec_sizes(setup) if time_codecs else [], alone_ranks=alone_ranks,
                           step_probe=step_probe)
                for r, d in enumerate(devices)]
        turns, finished = ctx.Barrier(len(jobs)), ctx.Value("i", 0)
        procs = [ctx.Process(target=run_watched, args=(f"{__name__}:profile_worker", pickle.dumps(j), q, turns,
                                                       finished),
                             name=f"hpipe-profile-{j.rank}", daemon=True)
                 for j in jobs]
        with progress(quiet) as bar:
            task = bar.add_task(f"profiling {setup.name}", total=(warmup + repeats) * len(devices)
                                                                    + (min(warmup, 1) + alone_repeats(repeats))
                                                                    * len(alone_ranks)
                                                                    + n_links + (n_pairs if step_probe else 0))
            try:
                for p in procs:
                    p.start()
                if on_spawn:
                    on_spawn([p.pid for p in procs])
                t0 = time.monotonic()
                errors = {}
                while len(results) < len(procs):
                    try:
                        kind, rank, payload = q.get(timeout=0.1)
                    except queue_mod.Empty:
                        kind = None
                    if kind == "done":
                        results[rank] = payload
                    elif kind == "error":
                        errors[rank] = payload
                    elif kind in ("progress", "link"):
                        bar.advance(task)
                    if kind is not None:
                        continue
                    dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results]
                    if errors or dead:
                        time.sleep(0.3)
                        while True:
                            try:
                                kind, rank, payload = q.get_nowait()
                            except queue_mod.Empty:
                                break
                            if kind == "error":
                                errors[rank] = payload
                        r = sorted(errors)[0] if errors else dead[0]
                        what = errors.get(r, f"exited with code {procs[r].exitcode}").strip().splitlines()
                        raise WorkerError(f"profiling {devices[r]} failed: {what[0]}")
                    if time.monotonic() - t0 > timeout_s:
                        raise WorkerError(f"profiling did not finish within {timeout_s:g}s")
            finally:
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                for p in procs:
                    if p.pid is None:  # never started (an earlier start failed)
                        continue
                    p.join(2.0)
                    if p.is_alive():
                        p.kill()
                        p.join(1.0)
                q.close()
                q.cancel_join_thread()
        emulated = em.describe()
    if cores is not None:
        probes.append(speed.probe_by_core(cores))
    return _assemble(setup, devices, results, grid, warmup, repeats, emulated, probes, density)


def _assemble(setup, devices, results, grid, warmup, repeats, emulated, probes=(), density=None) -> Profile:
    """The Profile of the workers' ``results`` (``probes``: the speed probe before and after;
    ``density``: 'quick' or 'full', the default grid it measured, else None)."""
    from hpipe.costmodels.fitted import fit_link, fit_report, summarize_holdout

    devs = []
    for r, d in enumerate(devices):
        dev = setup.cluster.device(d)
        p = dev.placement
        placement = p.model_dump(exclude_none=True) if p is not None else {"threads": 1}
        devs.append(DeviceProfile(device=d, label=dev.id.split("/", 1)[1].rsplit("-", 1)[0], placement=placement,
                                  units={k: UnitSamples(**v) for k, v in results[r]["units"].items()},
                                  shards=[ShardSamples(tp=sh["tp"], units={k: UnitSamples(**v)
                                                                           for k, v in sh["units"].items()})
                                          for sh in results[r].get("shards", [])],
                                  codecs={k: CodecSamples(**v) for k, v in results[r].get("codecs", {}).items()},
                                  alone={k: UnitSamples(**v) for k, v in results[r].get("alone", {}).items()},
                                  after_wait=(AfterWait(**results[r]["after_wait"])
                                              if results[r].get("after_wait") else None),
                                  cpu_share=results[r]["cpu_share"]))
    shaped = {frozenset(lk["between"]): lk for lk in emulated.get("links", [])}
    links = []
    for r in sorted(results):
        for lk in results[r]["links"]:
            lat, per_byte = fit_link(lk["sizes_bytes"], lk["one_way_s"])
            ha, hb = (setup.cluster.device(x).host for x in lk["between"])
            em = shaped.get(frozenset((ha, hb)))
            links.append(LinkProfile(between=tuple(lk["between"]), sizes_bytes=lk["sizes_bytes"],
                                     one_way_s=lk["one_way_s"], latency_us=lat * 1e6,
                                     bandwidth_gbps=8 / per_byte / 1e9 if per_byte > 0 else 1e6,
                                     emulated=EmulatedLink(bandwidth_gbps=em["bandwidth_gbps"],
                                                           latency_us=em["latency_us"],
                                                           asked_latency_us=em.get("asked_latency_us"))
                                     if em else None))
    all_reduces = []
    for r in sorted(results):
        for ar in results[r].get("all_reduces", []):
            lat, per_byte = fit_link(ar["sizes_bytes"], ar["seconds"])
            all_reduces.append(AllReduceProfile(devices=ar["devices"], sizes_bytes=ar["sizes_bytes"],
                                                seconds=ar["seconds"], seconds_together=ar.get("seconds_together"),
                                                shard_cpu_s=ar.get("shard_cpu_s"),
                                                shard_after_wait_cpu_s=ar.get("shard_after_wait_cpu_s"),
                                                latency_us=lat * 1e6,
                                                bandwidth_gbps=8 / per_byte / 1e9 if per_byte > 0 else 1e6))
    step_hops = [StepHopProfile(**h) for r in sorted(results) for h in results[r].get("step_hops", [])]
    prof = Profile(format=PROFILE_FORMAT, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   hardware=_hardware(), versions=_versions(), scenario=setup.name, model=setup.model.to_dict(),
                   dtype=setup.dtype,
                   settings=Settings(warmup=warmup, repeats=repeats, grid=density,
                                     statistic=f"trimmed-mean (middle {1 - 2 * TRIM:.0%}) of the repeats"),
                   devices=devs, links=links, all_reduces=all_reduces, step_hops=step_hops,
                   speed_probe=SpeedProbe(version=speed.PROBE_VERSION, cores=list(probes[0]),
                                          before_s=list(probes[0].values()), after_s=list(probes[1].values()))
                   if len(probes) == 2 else None)
    from hpipe.costmodels.fitted import FittedConfig

    report = fit_report(prof, FittedConfig.model_fields["basis"].default)  # the basis predictions use
    prof.holdout = {"basis": FittedConfig.model_fields["basis"].default, "per_device": report,
                    **summarize_holdout(report)}
    return prof


def stale_reason(prof: Profile, setup) -> str | None:
    """Why a profile should be measured again for ``setup`` on this machine, or None.

    Profiles must come from the very runtime that executes (versions), be measured by this
    hpipe's profiler method (``PROFILER_METHOD``) on this machine (CPU model), and cover every
    device of the scenario with its placement."""
    from hpipe.costmodels.profile import model_mismatch

    why = model_mismatch(prof, setup.model, setup.dtype)
    if why:
        return why
    here = _hardware()
    if prof.hardware.cpu_model != here.cpu_model or prof.hardware.gpus != here.gpus:
        there = ", ".join([prof.hardware.cpu_model, *prof.hardware.gpus])
        return f"measured on {there}, this machine is {', '.join([here.cpu_model, *here.gpus])}"
    v = _versions()
    if (prof.versions.torch, prof.versions.python) != (v.torch, v.python):
        return (f"measured with torch {prof.versions.torch} / python {prof.versions.python}, "
                f"this runtime has torch {v.torch} / python {v.python}")
    if prof.versions.profiler != PROFILER_METHOD:
        return (f"measured by profiler method {prof.versions.profiler}, this hpipe measures by method "
                f"{PROFILER_METHOD} (hpipe.costmodels.profile.PROFILER_METHOD)")
    if has_decode_steps(setup) and not all(any(n == 1 and c > 0 for n, c in zip(dp.units["attn"].n, dp.units["attn"].c))
                                       for dp in prof.devices):
        return "the profile timed no decode steps (n = 1) and the scenario generates tokens"
    cpus = [d for d in setup.cluster.devices if getattr(d.placement, "device", "cpu") == "cpu"]
    # (a profile made without links, `--no-links`, has no probe either: that was asked for)
    if has_decode_steps(setup) and len(cpus) == len(setup.cluster.devices) > 1 and prof.links and not prof.step_hops:
        return "the profile has no decode step-loop probe and the scenario generates tokens"
    for d in setup.cluster.devices:
        dp = prof.device(d.id)
        placement = d.placement.model_dump(exclude_none=True) if d.placement is not None else {"threads": 1}
        if dp is None or dp.placement != placement:
            return f"device {d.id} is not measured with its placement {placement}"
        if setup.compression is not None and not set(setup.compression.allow) <= set(dp.codecs):
            return f"the profile timed no {', '.join(sorted(set(setup.compression.allow) - set(dp.codecs)))} " \
                   f"codec on {d.id} and the scenario allows compression"
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `hpipe profile`")
