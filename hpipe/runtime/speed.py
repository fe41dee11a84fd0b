"""How fast this machine is right now: one short, fixed piece of work, timed.

A profile prices work at the speed the machine had while it was measured.  A shared
VM does not keep that speed: on the 2-core AMD EPYC VM of 2026-12-02 the same decode
plans, on the same profile, measured 27% slower in the afternoon than in the morning
(``benchmarks/results/decode-gaps-4dev-*-afternoon.txt``), which turned a +21% error
into -4.5%.  The probe times the same work at profiling and before every measured run,
so that a validation can say how far the machine itself moved (``hpipe.validate``: the
drift beside the errors) instead of leaving it inside them.

The work is what a CPU stage does most: a float32 matmul on one thread, about 25 ms a
repeat on that VM, in the launcher process while no worker runs.
"""

from __future__ import annotations

import statistics
import time

PROBE_SIZE = 256
"""Side of the square float32 matrices multiplied."""
PROBE_ITERS = 50
"""Multiplications per repeat (about 25 ms on a 2-core AMD EPYC VM, 2026-12-02)."""


def probe_s(repeats: int = 5) -> float:
    """Median wall seconds of one repeat of the fixed work (the median: one repeat caught
    by a burst of other load does not move it; a slower machine moves them all)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as a CPU stage of the scenarios here runs
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(PROBE_SIZE, PROBE_SIZE, generator=gen)
        b = torch.randn(PROBE_SIZE, PROBE_SIZE, generator=gen)
        a @ b  # first call: allocation and dispatch set-up, not the machine's speed
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(PROBE_ITERS):
                a @ b
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)
