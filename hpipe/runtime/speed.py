"""How fast this machine is right now: one short, fixed piece of work, timed.

A profile prices work at the speed the machine had while it was measured.  A shared
VM does not keep that speed: on the 2-core AMD EPYC VM of 2026-12-02 the same decode
plans, on the same profile, measured 27% slower in the afternoon than in the morning
(``benchmarks/results/decode-gaps-4dev-*-afternoon.txt``), which turned a +21% error
into -4.5%.  The probe times the same work at profiling and before every measured run,
so that a validation can say how far the machine itself moved (``hpipe.validate``: the
drift beside the errors; the errors are left as measured).

The work is a CPU stage's two kinds, on one thread: a float32 matmul that stays in the
caches (prefill is bound by arithmetic) and a matrix-vector product over a matrix larger
than the last-level cache (a decode step reads its weights from memory).  It runs in the
launcher process while no worker runs, pinned in turn to each core the devices are
pinned to (a core's neighbours on the host are what slows it).  It is a proxy: it runs
unpaced, at the core's own speed, and time stolen by the hypervisor lengthens it in full
where a paced (slower) device, idle part of each stretch, may hide some of it.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

PROBE_VERSION = 2
"""Bumped whenever the work changes: probes of different versions are not compared."""
GEMM_SIZE = 256
"""Side of the square float32 matrices multiplied (768 KB in all: in the caches)."""
GEMM_ITERS = 50
"""Multiplications per repeat (about 25 ms on a 2-core AMD EPYC VM, 2026-12-02)."""
GEMV_SIZE = 4096
"""Side of the float32 matrix read by the matrix-vector product (64 MB: past the caches)."""
GEMV_ITERS = 4
"""Matrix-vector products per repeat."""


def probe_by_core(cores=None, repeats: int = 5) -> dict:
    """{core: seconds of one repeat of the fixed work there}: the median repeat of each part,
    summed, on each of ``cores`` in turn (None, or no core given: one probe wherever the
    scheduler puts it, under the key None; a core this process may not run on is probed
    unpinned and keyed None too).  The median: one repeat caught by a burst of other load
    does not move it; a slower machine moves them all.  About 0.05 s a repeat and core on
    the 2-core AMD EPYC VM (2026-12-02): 0.25 s a core at the default repeats."""
    import torch

    cores = sorted(set(cores)) if cores else [None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as a CPU stage of the scenarios here runs
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(GEMM_SIZE, GEMM_SIZE, generator=gen)
        b = torch.randn(GEMM_SIZE, GEMM_SIZE, generator=gen)
        m = torch.full((GEMV_SIZE, GEMV_SIZE), 0.5)  # filled once per call, read 21 times a core
        x = torch.full((GEMV_SIZE,), 0.25)
        out = {}
        for core in cores:
            with _pinned(core) as where:
                out[where] = _repeat_median_s(a, b, m, x, repeats)
        return out
    finally:
        torch.set_num_threads(threads)


def _repeat_median_s(a, b, m, x, repeats: int) -> float:
    a @ b, m @ x  # first calls: dispatch set-up and cold caches, not the machine's speed
    gemm, gemv = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(GEMM_ITERS):
            a @ b
        t1 = time.perf_counter()
        for _ in range(GEMV_ITERS):
            m @ x
        gemm.append(t1 - t0)
        gemv.append(time.perf_counter() - t1)
    return statistics.median(gemm) + statistics.median(gemv)


def drift(now: dict, then: dict) -> float | None:
    """How much longer (positive) the probe took ``now`` than ``then`` on the cores both
    measured, averaged over them: ``probe_by_core`` results (None: no core in common)."""
    common = [c for c in now if c in then and then[c] > 0]
    if not common:
        return None
    return statistics.mean(now[c] / then[c] for c in common) - 1


@contextlib.contextmanager
def _pinned(core):
    """Run this thread on ``core``; yields the core it runs on (None: not pinned, because
    none was asked for, or this process may not use it, or there is no affinity control)."""
    if core is None or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {core})
        pinned = core
    except (OSError, ValueError, OverflowError):  # a core this process may not use: measure unpinned
        pinned = None
    try:
        yield pinned
    finally:
        if pinned is not None:
            os.sched_setaffinity(0, before)


def cpu_device_cores(setup, device_ids) -> list[int] | None:
    """The cores the devices are pinned to (``placement.cores``; empty when none is), or None
    when any of them is not a CPU device: the probe says nothing about a GPU."""
    out = set()
    for d in device_ids:
        placement = setup.cluster.device(d).placement
        if getattr(placement, "device", "cpu") != "cpu":
            return None
        out.update(getattr(placement, "cores", None) or [])
    return sorted(out)
