"""What a profiling process times on its own device: every unit of a short chain at every grid
point (beside busy neighbours, then alone), tensor-parallel shards, and the codecs
(``hpipe.runtime.profiler`` has the whole method)."""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from hpipe.runtime import emulation

if TYPE_CHECKING:
    from hpipe.runtime.profile_worker import ProfileJob

TRIM = 0.2  # trimmed mean: drop this share of samples at each end
CHAIN_MIN_BLOCKS = 2  # distinct transformer blocks in the timed chain, at least
CACHE_MULTIPLE = 2  # ... and enough of them that their weights outweigh the last-level cache this much


def alone_repeats(repeats: int) -> int:
    """Timed sweeps of a device's units alone: half the profile's.  What the fitted model takes
    from them is one ratio (alone over busy) fitted across the whole grid, which averages the
    noise of single points, and the sweeps run one device at a time (four devices with CPU
    quotas of 0.4-0.6 would otherwise triple the profile's time)."""
    return max(1, (repeats + 1) // 2)


def trimmed_mean(xs) -> float:
    xs = np.sort(np.asarray(xs, float))
    k = int(len(xs) * TRIM)
    return float(xs[k:len(xs) - k].mean()) if len(xs) > 2 * k else float(xs.mean())


def spread(xs) -> float:
    q25, q50, q75 = np.percentile(xs, [25, 50, 75])
    return float((q75 - q25) / q50) if q50 > 0 else 0.0


def time_units(job: ProfileJob, report, turns=None, finished=None) -> tuple[dict[str, dict], list[dict],
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

    from hpipe.models import check_tensor_parallel
    from hpipe.runtime.model import TORCH_DTYPES, build_units, make_caches
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
                    times, cpu_times = (gpu_chain if gpu else cpu_chain)(units, inp, c, caches[(tp, b)])
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
                    (gpu_chain if gpu else cpu_chain)(chains[1], ids[p], p[1], caches[(1, p[2])])
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
               "seconds": [trimmed_mean(by_point[p]) for p in pts],
               "spread": [spread(by_point[p]) for p in pts]}
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
                _, cpu_times = cpu_chain(units1, x1, point[1], cache1)
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


def time_codecs(job: ProfileJob) -> dict[str, dict]:
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
            rec[f"{what}_s"] = [max(trimmed_mean(wall[(name, what, k)]), 1e-7) for k in ks]
            if not gpu:
                rec[f"{what}_cpu_s"] = [max(float(np.mean(cpu[(name, what, k)])), 1e-7) for k in ks]
        out[name] = rec
    return out


def cpu_chain(units, x, c, caches) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each unit of the chain, each call timed on its own."""
    times, cpu_times = [], []
    for u in units:
        t0, cpu0 = time.perf_counter(), time.thread_time()
        x = u(x, c, caches.get(u.unit.index))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.thread_time() - cpu0)
    return times, cpu_times


def gpu_chain(units, x, c, caches) -> tuple[list[float], list[None]]:
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
