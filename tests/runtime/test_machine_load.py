"""Other processes' CPU during a run: the machine's busy time less the run's own.

The arithmetic on fake counters (what is subtracted, the floor at 0), and the counters of
this Linux machine: a process burning a core beside the window is seen, its CPU time
read from /proc.  A real run's figure: tests/runtime/test_runtime_execute.py.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from hpipe.runtime import machine_load
from hpipe.runtime.machine_load import LoadWindow, machine_busy_cpu_s, process_cpu_s

linux = pytest.mark.skipif(machine_busy_cpu_s() is None, reason="no /proc/stat here")


def test_other_cores_are_busy_time_less_the_runs_own(monkeypatch):
    busy = iter([100.0, 106.0])  # the machine: 6 CPU seconds over the window
    own = iter([10.0, 11.0])  # the launcher and its forkserver: 1
    clock = iter([50.0, 52.0])  # 2 s of wall time
    monkeypatch.setattr(machine_load, "machine_busy_cpu_s", lambda: next(busy))
    monkeypatch.setattr(machine_load, "own_cpu_s", lambda pids=(): next(own))
    monkeypatch.setattr(machine_load, "_clock", lambda: next(clock))
    w = LoadWindow.start()
    # workers 3 s: others 6 - 1 - 3 = 2 CPU seconds over 2 s
    assert w.other_cpu_cores(3.0) == pytest.approx(1.0)


def test_other_cores_never_below_zero_and_none_without_counters(monkeypatch):
    busy = iter([100.0, 101.5])
    monkeypatch.setattr(machine_load, "machine_busy_cpu_s", lambda: next(busy))
    monkeypatch.setattr(machine_load, "own_cpu_s", lambda pids=(): 0.0)
    w = LoadWindow.start()
    time.sleep(0.01)
    assert w.other_cpu_cores(2.0) == 0.0  # the clocks tick at 10 ms: the workers can exceed the machine
    # counters that stand still (gVisor's /proc/stat of zeros) saw not even the run itself: unknown, not quiet
    monkeypatch.setattr(machine_load, "machine_busy_cpu_s", lambda: 0.0)
    assert LoadWindow.start().other_cpu_cores(2.0) is None
    monkeypatch.setattr(machine_load, "machine_busy_cpu_s", lambda: None)
    assert LoadWindow.start() is None


@linux
def test_a_process_burning_a_core_beside_the_window_is_seen():
    """The burner spins until it has had 0.5 CPU seconds, however long a loaded machine takes to
    give them (a fixed 1 s saw 0.06 of them beside six busy loops on its core), then sleeps: the
    window must count what it burnt as another process's work, in core-seconds."""
    w = LoadWindow.start()
    burner = subprocess.Popen([sys.executable, "-c", "import time\nwhile time.process_time() < 0.5: pass\n"
                               "time.sleep(120)"])
    try:
        deadline = time.monotonic() + 90
        while (seen := process_cpu_s(burner.pid)) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        other = w.other_cpu_cores(0.0)  # read before the burner is reaped: not this process's own
        wall_s = time.monotonic() - w.wall_s
    finally:
        burner.kill()
        burner.wait()
    assert seen >= 0.3  # it ran, even on a loaded machine
    assert other * wall_s >= seen - 0.05  # and it shows as another process's work (the ticks are 10 ms)
    assert process_cpu_s(burner.pid) == 0.0  # gone
