"""How fast this machine is right now: one short, fixed piece of work, timed.

A profile prices work at the speed the machine had while it was measured.  A shared
VM does not keep that speed: on the 2-core AMD EPYC VM of 2026-12-02 the same decode
plans, on the same profile, measured 27% slower in the afternoon than in the morning
(``benchmarks/results/decode-gaps-4dev-*-afternoon.txt``), which turned a +21% error
into -4.5%.  The probe times the same work at profiling and before every measured run,
so that a validation can say how far the machine itself moved (``hpipe.validate``: the
drift beside the errors) instead of leaving it inside them.

The work is a CPU stage's two kinds, on one thread: a float32 matmul that stays in the
caches (prefill is bound by arithmetic) and a matrix-vector product over a matrix larger
than the last-level cache (a decode step reads its weights from memory).  It runs in the
launcher process while no worker runs, pinned in turn to each core the devices are
pinned to (a core's neighbours on the host are what slows it).  It is a proxy: it runs
without the devices' CPU quotas, and time stolen by the hypervisor lengthens it in full
where a quota device, idle part of each period, may hide some of it.
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

_gemv_matrix = None  # allocated once per process: filling 64 MB would cost more than reading it


def probe_by_core(cores=None, repeats: int = 5) -> dict:
    """{core: seconds of one repeat of the fixed work there}: the median repeat of each part,
    summed, on each of ``cores`` in turn (None, or no core given: one probe wherever the
    scheduler puts it, under the key None).  The median: one repeat caught by a burst of
    other load does not move it; a slower machine moves them all."""
    cores = sorted(set(cores)) if cores else [None]
    return {core: _probe_on(core, repeats) for core in cores}


def drift(now: dict, then: dict) -> float | None:
    """How much longer (positive) the probe took ``now`` than ``then`` on the cores both
    measured, averaged over them: ``probe_by_core`` results (None: no core in common)."""
    common = [c for c in now if c in then and then[c] > 0]
    if not common:
        return None
    return statistics.mean(now[c] / then[c] for c in common) - 1


def _probe_on(core, repeats: int) -> float:
    import torch

    global _gemv_matrix
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as a CPU stage of the scenarios here runs
    with _pinned(core):
        try:
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(GEMM_SIZE, GEMM_SIZE, generator=gen)
            b = torch.randn(GEMM_SIZE, GEMM_SIZE, generator=gen)
            if _gemv_matrix is None:
                _gemv_matrix = torch.full((GEMV_SIZE, GEMV_SIZE), 0.5)
            x = torch.full((GEMV_SIZE,), 0.25)
            a @ b, _gemv_matrix @ x  # first calls: allocation and dispatch set-up, not the machine's speed
            gemm, gemv = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(GEMM_ITERS):
                    a @ b
                t1 = time.perf_counter()
                for _ in range(GEMV_ITERS):
                    _gemv_matrix @ x
                gemm.append(t1 - t0)
                gemv.append(time.perf_counter() - t1)
            return statistics.median(gemm) + statistics.median(gemv)
        finally:
            torch.set_num_threads(threads)


@contextlib.contextmanager
def _pinned(core):
    """Run this thread on ``core`` (None, or no affinity control here: leave it be)."""
    if core is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {core})
    except OSError:  # a core this process may not use: measure where it may run
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def device_cores(setup, device_ids) -> list[int]:
    """The cores the devices are pinned to (``placement.cores``); empty when none is."""
    out = set()
    for d in device_ids:
        placement = setup.cluster.device(d).placement
        out.update(getattr(placement, "cores", None) or [])
    return sorted(out)
