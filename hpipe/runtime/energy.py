"""Measured energy where the machine has counters; otherwise the modelled figure, labelled so.

A measured run's ``energy_j`` is *modelled* by default: the datasheet (or
scenario) power of each device times its measured busy time, plus idle power
over the makespan (``hpipe.result.summarize``).  Where the machine exposes
energy counters the run is metered instead and labelled ``measured``:

* CPUs: RAPL, ``/sys/class/powercap/intel-rapl:N/energy_uj`` (package domains;
  AMD's RAPL shows there too).  A package counter covers the whole socket --
  other processes on it included -- so it is used only when every plan device
  is a CPU device of this host.
* GPUs: NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
  Volta and later), when ``pynvml`` is installed; used only when every plan
  device is a GPU.

A thread samples the counters every ``SAMPLE_S`` while the workers run, with
``time.perf_counter`` stamps -- the clock the workers stamp their events with
on one host -- and the energy of the measured run is interpolated between its
first event's start and its last event's end (the warm-up run is left out).
Counters wrap (RAPL at ``max_energy_range_uj``); wraps are unrolled.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import numpy as np

POWERCAP = Path("/sys/class/powercap")
SAMPLE_S = 0.01


def _rapl_packages() -> list[Path]:
    """Readable RAPL package domains (intel-rapl:0, intel-rapl:1, ...; not their subzones)."""
    out = []
    if not POWERCAP.is_dir():
        return out
    for d in sorted(POWERCAP.glob("intel-rapl:*")):
        if d.name.count(":") != 1:
            continue  # a subzone (core, uncore, dram) of a package
        with contextlib.suppress(OSError, ValueError):
            int((d / "energy_uj").read_text())
            out.append(d)
    return out


def _nvml_handles(indices: list[int]):
    try:
        import pynvml  # optional: not a dependency of hpipe
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        hs = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        for h in hs:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        return pynvml, hs
    except Exception:  # noqa: BLE001  (no driver, an older GPU without the counter)
        return None


class Counter:
    """Cumulative joules of a set of counters, read as one figure."""

    def __init__(self, kind: str, read, wrap_j: float | None = None):
        self.kind = kind
        self.read = read
        self.wrap_j = wrap_j


def counter_for(devices) -> Counter | None:
    """A counter that covers exactly the plan's ``devices`` (Device objects), or None."""
    kinds = {d.runtime_device.split(":")[0] for d in devices}
    if kinds == {"cpu"}:
        pkgs = _rapl_packages()
        if not pkgs:
            return None
        wrap = 0.0
        with contextlib.suppress(OSError, ValueError):
            wrap = sum(int((p / "max_energy_range_uj").read_text()) for p in pkgs) * 1e-6

        def read_rapl() -> float:
            return sum(int((p / "energy_uj").read_text()) for p in pkgs) * 1e-6

        return Counter("rapl", read_rapl, wrap or None)
    if kinds == {"cuda"}:
        idx = sorted({int(d.runtime_device.split(":")[1]) if ":" in d.runtime_device else 0 for d in devices})
        nv = _nvml_handles(idx)
        if nv is None:
            return None
        pynvml, hs = nv

        def read_nvml() -> float:
            return sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in hs) * 1e-3  # mJ

        return Counter("nvml", read_nvml)
    return None


class Meter:
    """Samples a Counter on a thread; ``joules_between(t0, t1)`` on the perf_counter clock."""

    def __init__(self, counter: Counter):
        self.counter = counter
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpipe-energy", daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.samples.append((time.perf_counter(), self.counter.read()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> "Meter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self._sample()

    def joules_between(self, t0: float, t1: float) -> float | None:
        if len(self.samples) < 2:
            return None
        t = np.array([s[0] for s in self.samples])
        e = np.array([s[1] for s in self.samples])
        if self.counter.wrap_j:  # unroll wraps of the cumulative counter
            e = e + np.concatenate([[0.0], np.cumsum(np.diff(e) < 0)]) * self.counter.wrap_j
        if t0 < t[0] or t1 > t[-1]:
            return None  # the run is not bracketed by samples
        return float(np.interp(t1, t, e) - np.interp(t0, t, e))
