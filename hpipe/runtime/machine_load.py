"""How much of this machine's CPU other processes took while a run measured.

A measured run on a shared machine is slower than its prediction when something else
computes beside it, and the run alone cannot tell. Over the run, the machine's busy CPU
time (``/proc/stat``: user, nice and system, over every core) less the CPU time of the
run's own processes (this one, its forkserver, and the workers on this host, which
report their own) is what other processes used. ``execute`` says so when it is a sizeable
share of a core; ``RunResult.other_cpu_cores`` keeps the figure.

Interrupt and softirq time are left out of "busy": the kernel charges them to no process,
and a run's own loopback traffic would show there as somebody else's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from hpipe.procwatch import proc_stat

OTHER_CPU_NOTE_CORES = 0.25
"""``execute`` prints a note when other processes used at least this many cores on average."""


_clock = time.monotonic  # the wall clock of a window (tests replace it)


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def machine_busy_cpu_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (user + nice + system over every
    core), or None where ``/proc/stat`` cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 4:
        return None
    user, nice, system = (int(x) for x in fields[1:4])
    return (user + nice + system) / _clock_ticks()


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used; 0 when it is gone."""
    rest = proc_stat(pid)
    if rest is None:
        return 0.0
    return (int(rest[11]) + int(rest[12])) / _clock_ticks()  # utime, stime (fields 14, 15)


def own_cpu_s(helper_pids=()) -> float:
    """This process's CPU seconds, its reaped children's (``tc``, ``ip``), and the live
    ``helper_pids``' (the forkserver)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + sum(process_cpu_s(p) for p in helper_pids)


@dataclass
class LoadWindow:
    """The machine's busy CPU time and the launcher's own, read when a run starts."""

    wall_s: float
    busy_s: float
    own_s: float

    @classmethod
    def start(cls, helper_pids=()) -> LoadWindow | None:
        busy = machine_busy_cpu_s()
        if busy is None:
            return None
        return cls(_clock(), busy, own_cpu_s(helper_pids))

    def other_cpu_cores(self, workers_cpu_s: float, helper_pids=()) -> float | None:
        """Cores other processes kept busy on average since ``start``: the machine's busy CPU
        time less the launcher's own and ``workers_cpu_s`` (the run's workers on this host),
        over the wall time; never below 0 (the clocks tick at 10 ms).  None when the machine's
        counters did not see even half of the run's own CPU time: a sandbox that reports
        ``/proc/stat`` as zeros (gVisor before 2026-06) would otherwise read as a quiet machine."""
        busy = machine_busy_cpu_s()
        wall = _clock() - self.wall_s
        if busy is None or wall <= 0:
            return None
        ours = (own_cpu_s(helper_pids) - self.own_s) + workers_cpu_s
        if busy - self.busy_s < 0.5 * ours:
            return None
        return max((busy - self.busy_s) - ours, 0.0) / wall
